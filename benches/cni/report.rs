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
            format!("{} (2 routed rules)", self.op.env())
        } else {
            self.op.env().to_string()
        }
    }

    fn mappings_label(&self) -> String {
        if self.routed {
            "2 static + routing".to_string()
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
            return (format!("n/a (fails, {}/{})", s.failed.len(), s.failed.len() + s.ok.len()), None);
        }
        match median_p95(&s.ok) {
            Some((m, p)) => (format!("{m:.1} / {p:.1}"), Some(m)),
            None => ("—".into(), None),
        }
    }

    pub fn markdown(&self, reps: &BTreeMap<usize, usize>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| case | N | mappings | bridge-nat median / p95 ms | portmap median / p95 ms | ratio portmap/bridge-nat |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        let mut cases: Vec<Case> = self.samples.keys().map(|(c, _)| *c).collect();
        cases.dedup();
        for case in cases {
            let (bn, bn_m) = self.cell(case, Kind::BridgeNat);
            let (pm, pm_m) = self.cell(case, Kind::Portmap);
            let ratio = match (bn_m, pm_m) {
                (Some(b), Some(p)) if b > 0.0 => format!("{:.1}×", p / b),
                _ => "—".into(),
            };
            let _ =
                writeln!(out, "| {} | {} | {} | {bn} | {pm} | {ratio} |", case.label(), case.n, case.mappings_label());
        }
        let _ = writeln!(out);
        let reps: Vec<String> = reps.iter().map(|(n, r)| format!("N={n}: {r}")).collect();
        let _ = writeln!(
            out,
            "Each row: R fresh attachments (R per N: {}), each ADD → CHECK → DEL, the two plugins alternating; \
             time from spawn to exit of the plugin process. N = background attachments of *each* plugin \
             (1 mapping each) present in the same node namespace.",
            reps.join(", ")
        );
        // Failures, grouped by plugin and command: (first message, [(case, failed, total, median ms)]).
        let mut failures: BTreeMap<(Kind, Op), (String, Vec<String>)> = BTreeMap::new();
        for ((case, kind), s) in &self.samples {
            if let Some(f) = &s.first_failure {
                let (m, _) = median_p95(&s.failed).unwrap_or_default();
                let e = failures.entry((*kind, case.op)).or_insert_with(|| (f.clone(), Vec::new()));
                e.1.push(format!(
                    "N={} m={}: {}/{} failed, median {m:.1} ms to fail",
                    case.n,
                    case.mappings_label(),
                    s.failed.len(),
                    s.failed.len() + s.ok.len()
                ));
            }
        }
        for ((kind, op), (msg, cases)) in &failures {
            let _ = writeln!(out, "- {} {} failed: `{msg}` ({})", kind.label(), op.env(), cases.join("; "));
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Peak RSS (`ru_maxrss` from `wait4` of the plugin process, which also covers the children it waited for):"
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| plugin | op | one call at N=0, 1 mapping | max over all calls |");
        let _ = writeln!(out, "|---|---|---:|---:|");
        for ((kind, op), (first, max)) in &self.rss {
            let first = first.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "—".into());
            let _ = writeln!(out, "| {} | {} | {first} | {:.1} MiB |", kind.label(), op.env(), *max as f64 / 1024.0);
        }
        let _ = writeln!(out);
        if !self.background.is_empty() {
            let _ = writeln!(out, "Background population / teardown:");
            let _ = writeln!(out);
            for ((kind, what), v) in &self.background {
                let total: f64 = v.iter().map(|d| d.as_secs_f64()).sum();
                let _ = writeln!(
                    out,
                    "- {} {what}: {} calls, {total:.1} s total, mean {:.1} ms",
                    kind.label(),
                    v.len(),
                    mean_ms(v)
                );
            }
            let _ = writeln!(out);
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

/// The machine, for the README.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "?".into());
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let packages =
        command_line("dpkg-query", &["-W", "-f", "${Package} ${Version}, ", "containernetworking-plugins", "iptables"]);
    let mut out = String::new();
    let _ = writeln!(out, "- CPU: {model}, nproc {}", command_line("nproc", &[]));
    let _ = writeln!(out, "- kernel {kernel}; {}", command_line("iptables", &["-V"]));
    let _ = writeln!(out, "- portmap: /usr/lib/cni/portmap from {}", packages.trim_end_matches([',', ' ']));
    out
}
