//! Samples, statistics and the Markdown report printed on stdout.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::process::Command;
use std::time::Duration;

use crate::plugin::{Kind, Op};

/// One row of the table. Field order is the table's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Case {
    /// The bridge-nat-only case with two per-port routing blocks sorts last.
    pub routed: bool,
    pub n: usize,
    pub mappings: usize,
    pub op: Op,
}

impl Case {
    fn label(&self) -> String {
        if self.routed {
            format!("{} (2 routing blocks)", self.op.env())
        } else {
            self.op.env().to_string()
        }
    }

    fn mappings_label(&self) -> String {
        if self.routed {
            "2 static".to_string()
        } else {
            self.mappings.to_string()
        }
    }
}

#[derive(Default)]
pub struct Samples {
    pub ok: Vec<Duration>,
    pub failed: Vec<Duration>,
    pub first_failure: Option<String>,
}

/// Median and p95 (nearest rank) in milliseconds.
pub fn median_p95(samples: &[Duration]) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
    let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
    Some((median, ms[rank - 1]))
}

fn mean_ms(samples: &[Duration]) -> f64 {
    samples.iter().map(|d| d.as_secs_f64() * 1e3).sum::<f64>() / samples.len().max(1) as f64
}

#[derive(Default)]
pub struct Results {
    pub samples: BTreeMap<(Case, Kind), Samples>,
    /// (plugin, op) → (ru_maxrss of the first measured call at N=0 with 1 mapping, max of all).
    pub rss: BTreeMap<(Kind, Op), (Option<i64>, i64)>,
    /// Background work: (plugin, what) → every call's time.
    pub background: BTreeMap<(Kind, String), Vec<Duration>>,
    /// Further Markdown sections (the data plane), printed before the notes.
    pub sections: Vec<String>,
    /// Free-form observations printed under the table.
    pub notes: Vec<String>,
}

impl Results {
    pub fn record(&mut self, case: Case, kind: Kind, ok: bool, elapsed: Duration, failure: impl FnOnce() -> String) {
        let s = self.samples.entry((case, kind)).or_default();
        if ok {
            s.ok.push(elapsed);
        } else {
            s.failed.push(elapsed);
            if s.first_failure.is_none() {
                s.first_failure = Some(failure());
            }
        }
    }

    pub fn record_rss(&mut self, kind: Kind, op: Op, first_candidate: bool, kib: i64) {
        let e = self.rss.entry((kind, op)).or_insert((None, 0));
        if first_candidate && e.0.is_none() {
            e.0 = Some(kib);
        }
        e.1 = e.1.max(kib);
    }

    pub fn record_background(&mut self, kind: Kind, what: &str, elapsed: Duration) {
        self.background.entry((kind, what.to_string())).or_default().push(elapsed);
    }

    fn cell(&self, case: Case, kind: Kind) -> (String, Option<f64>) {
        let Some(s) = self.samples.get(&(case, kind)) else { return ("—".into(), None) };
        if !s.failed.is_empty() {
            return (format!("fails {}/{}", s.failed.len(), s.failed.len() + s.ok.len()), None);
        }
        match median_p95(&s.ok) {
            Some((m, p)) => (format!("{m:.1} / {p:.1}"), Some(m)),
            None => ("—".into(), None),
        }
    }

    /// The report: one table of times, one of peak RSS, the same columns in both: per contender
    /// its cell and, for bridge-nat, portmap's value ÷ its value (above 1: better than portmap).
    pub fn markdown(&self, kinds: &[Kind], reps: &BTreeMap<usize, usize>, layout: &str) -> String {
        let with_ratio = |k: Kind| k.is_bridge_nat() && kinds.contains(&Kind::Portmap);
        let ratio = |pm: Option<f64>, x: Option<f64>| match (pm, x) {
            (Some(p), Some(x)) if x > 0.0 => format!("{:.1}×", p / x),
            _ => "—".into(),
        };
        let header = |first: &str| {
            let mut h = format!("| {first} |");
            let mut rule = String::from(if first == "case" { "|---|---:|---:|" } else { "|---|" });
            if first == "case" {
                h.push_str(" N | mappings |");
            }
            for &k in kinds {
                h.push_str(&format!(" {} |", k.label()));
                rule.push_str("---:|");
                if with_ratio(k) {
                    h.push_str(" portmap ÷ |");
                    rule.push_str("---:|");
                }
            }
            format!("{h}\n{rule}")
        };

        let mut out = String::new();
        if self.samples.is_empty() {
            let _ = writeln!(out, "Nothing was measured.\n");
            for section in &self.sections {
                let _ = writeln!(out, "{section}");
            }
            for n in &self.notes {
                let _ = writeln!(out, "{n}");
            }
            return out;
        }
        let _ = writeln!(out, "{}", header("case"));
        let mut cases: Vec<Case> = self.samples.keys().map(|(c, _)| *c).collect();
        cases.dedup();
        for case in cases {
            let (_, pm) = self.cell(case, Kind::Portmap);
            let _ = write!(out, "| {} | {} | {} |", case.label(), case.n, case.mappings_label());
            for &k in kinds {
                let (text, m) = self.cell(case, k);
                let _ = write!(out, " {text} |");
                if with_ratio(k) {
                    let _ = write!(out, " {} |", ratio(pm, m));
                }
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let reps: Vec<String> = reps.iter().map(|(n, r)| format!("N={n}: {r}")).collect();
        let _ = writeln!(
            out,
            "Median / p95 in ms of R fresh attachments per row (R per N: {}), each ADD → CHECK → DEL, from spawn \
             to exit of the plugin process{}. {layout}",
            reps.join(", "),
            if kinds.iter().any(|&k| with_ratio(k)) {
                "; `portmap ÷` = portmap's median ÷ that backend's"
            } else {
                ""
            }
        );
        // Failures, grouped by contender and command.
        let mut failures: BTreeMap<(Kind, Op), (String, usize, usize, usize)> = BTreeMap::new();
        for ((case, kind), s) in &self.samples {
            if let Some(f) = &s.first_failure {
                let e = failures.entry((*kind, case.op)).or_insert_with(|| (f.clone(), 0, 0, 0));
                e.1 += s.failed.len();
                e.2 += s.failed.len() + s.ok.len();
                e.3 += 1;
            }
        }
        for ((kind, op), (msg, failed, total, cases)) in &failures {
            let _ = writeln!(
                out,
                "- {} {} fails ({failed} of {total} calls, {cases} rows): `{msg}`",
                kind.label(),
                op.env()
            );
        }
        let _ = writeln!(out);

        let _ = writeln!(out, "{}", header("peak RSS, MiB"));
        let mib = |k: i64| k as f64 / 1024.0;
        for op in [Op::Add, Op::Check, Op::Del] {
            let pm_first = self.rss.get(&(Kind::Portmap, op)).and_then(|e| e.0);
            if !kinds.iter().any(|k| self.rss.contains_key(&(*k, op))) {
                continue;
            }
            let _ = write!(out, "| {} |", op.env());
            for &k in kinds {
                let (first, max) = self.rss.get(&(k, op)).copied().unwrap_or((None, 0));
                let first_text = first.map(|f| format!("{:.1}", mib(f))).unwrap_or_else(|| "—".into());
                let _ = write!(out, " {first_text} (max {:.1}) |", mib(max));
                if with_ratio(k) {
                    let _ = write!(out, " {} |", ratio(pm_first.map(mib), first.map(mib)));
                }
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "`ru_maxrss` from `wait4` of one call at N=0 with 1 mapping (max: over every measured call); it covers the \
             children the plugin waited for (iptables-restore, iptables-save, nft, ...)."
        );
        let _ = writeln!(out);
        if !self.background.is_empty() {
            let _ = writeln!(out, "Background population / teardown:");
            let _ = writeln!(out);
            for ((kind, what), v) in &self.background {
                let total: f64 = v.iter().map(|d| d.as_secs_f64()).sum();
                let (median, p95) = median_p95(v).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "- {} {what}: {} calls, {total:.1} s total, mean {:.1} ms, median / p95 {median:.1} / {p95:.1} ms",
                    kind.label(),
                    v.len(),
                    mean_ms(v)
                );
            }
            let _ = writeln!(out);
        }
        for section in &self.sections {
            let _ = writeln!(out, "{section}");
        }
        for n in &self.notes {
            let _ = writeln!(out, "{n}");
        }
        out
    }
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The header line naming the machine and the tools, for the README.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "?".into());
    let portmap = command_line("dpkg-query", &["-W", "-f", "${Version}", "containernetworking-plugins"]);
    format!(
        "Machine: nproc {}, kernel {}, {model}; portmap from containernetworking-plugins {portmap}; {}; {}.",
        command_line("nproc", &[]),
        command_line("uname", &["-r"]),
        command_line("iptables", &["-V"]),
        command_line("nft", &["--version"]),
    )
}
