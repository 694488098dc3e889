//! The data plane's part of the report: connections per second, and the first connection after ADD.

use std::fmt::Write;
use std::time::Duration;

use crate::dataplane::{DataPlane, DpSettings};
use crate::plugin::Kind;
use crate::report::median_p95;
use crate::traffic::{Rate, CLIENTS, WARM_UP, WINDOW};

/// Median of the windows' rates, with the slowest and fastest window.
fn summary(rate: &Rate) -> Option<(f64, f64, f64)> {
    let mut w = rate.windows.clone();
    if w.is_empty() {
        return None;
    }
    w.sort_by(f64::total_cmp);
    let n = w.len();
    let median = if n % 2 == 1 { w[n / 2] } else { (w[n / 2 - 1] + w[n / 2]) / 2.0 };
    Some((median, w[0], w[n - 1]))
}

/// 12345.6 → "12 346" (a thin grouping that survives Markdown).
fn grouped(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

impl DataPlane {
    pub fn markdown(&self, kinds: &[Kind], settings: &DpSettings) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### Data plane: new TCP connections per second through a forwarded port\n");
        let with_ratio = |k: Kind| k.is_bridge_nat() && kinds.contains(&Kind::Portmap);
        let mut header = String::from("| forwards on the node |");
        let mut rule = String::from("|---:|");
        for &k in kinds {
            let _ = write!(header, " {} |", k.label());
            rule.push_str("---:|");
            if with_ratio(k) {
                header.push_str(" ÷ portmap |");
                rule.push_str("---:|");
            }
        }
        let _ = writeln!(out, "{header}\n{rule}");
        let mut problems = Vec::new();
        for &n in &settings.forwards {
            if !kinds.iter().any(|&k| self.rates.contains_key(&(n, k))) {
                continue;
            }
            let pm = self.rates.get(&(n, Kind::Portmap)).and_then(summary).map(|s| s.0);
            let _ = write!(out, "| {n} |");
            for &k in kinds {
                let rate = self.rates.get(&(n, k));
                let s = rate.and_then(summary);
                match s {
                    Some((median, lo, hi)) => {
                        let _ = write!(out, " {} ({}–{}) |", grouped(median), grouped(lo), grouped(hi));
                    }
                    None => out.push_str(" — |"),
                }
                if with_ratio(k) {
                    match (s, pm) {
                        (Some((m, _, _)), Some(p)) if p > 0.0 => {
                            let _ = write!(out, " {:.2}× |", m / p);
                        }
                        _ => out.push_str(" — |"),
                    }
                }
                if let Some(r) = rate {
                    if r.failures > 0 {
                        problems.push(format!(
                            "- {} at {n} forwards: {} connection(s) failed (first: {})",
                            k.label(),
                            r.failures,
                            r.first_error.as_deref().unwrap_or("?")
                        ));
                    }
                    if r.slow > 0 {
                        problems.push(format!(
                            "- {} at {n} forwards: {} connect(s) took over 100 ms (a dropped SYN)",
                            k.label(),
                            r.slow
                        ));
                    }
                    if r.accepted != r.attempted_ok {
                        problems.push(format!(
                            "- {} at {n} forwards: the client made {} connection(s), the server accepted {}",
                            k.label(),
                            r.attempted_ok,
                            r.accepted
                        ));
                    }
                }
            }
            let _ = writeln!(out);
        }
        let windows = ((settings.seconds / WINDOW.as_secs_f64()).round() as usize).max(1);
        let total: u64 = self.rates.values().map(|r| r.connections).sum();
        let share = |f: fn(&Rate) -> f64| {
            let wall: f64 = self.rates.values().map(|r| r.wall_secs).sum();
            100.0 * self.rates.values().map(f).sum::<f64>() / wall.max(1e-9)
        };
        let _ = writeln!(
            out,
            "\nConnections per second: median (slowest–fastest) of {windows} windows of {} ms per cell, after {} ms of \
             warm-up; {total} measured connections in all. A client in its own namespace, linked to the node by a \
             veth as an outside host would be, connects to the node's address on the forwarded host port and closes \
             at once (with RST, so no side keeps TIME_WAIT), one connection at a time from each of {CLIENTS} threads \
             (one per core); the node DNATs each connection to a server in a pod on the bridge (a Rust accept loop in \
             the pod's namespace). N forwards = the measured one, added last (the end of any chain that grows by \
             appending), plus N − 1 on other host ports of other attachments ({} mapping(s) each, {} attachments at \
             most, each a pod on the bridge), all installed by the contender's own ADDs; each contender is alone on \
             the node, and the bridge holds the pods of the most forwards at every N, for every contender. Before each ADD and after each DEL the port must refuse connections. Over the windows the \
             client threads spent {:.0}% of their wall time in user space and {:.0}% in the kernel (their syscalls, \
             and the node's whole packet path, which veth runs in the sender's softirq). {}",
            WINDOW.as_millis(),
            WARM_UP.as_millis(),
            settings.per_attachment,
            self.max_attachments,
            share(|r| r.user_secs),
            share(|r| r.sys_secs),
            if kinds.iter().any(|&k| with_ratio(k)) {
                "`÷ portmap` = that backend's median ÷ portmap's (above 1: more connections per second than portmap)."
            } else {
                ""
            }
        );
        if !problems.is_empty() {
            let _ = writeln!(out);
            for p in problems {
                let _ = writeln!(out, "{p}");
            }
        }
        self.first_markdown(kinds, settings, &mut out);
        out
    }

    /// Per contender and number of forwards: ADD's own time, then the time from its return to the
    /// first connection the new pod accepted.
    fn first_markdown(&self, kinds: &[Kind], settings: &DpSettings, out: &mut String) {
        if self.first.is_empty() {
            return;
        }
        let ms = |d: &[Duration]| median_p95(d).map(|(m, _)| m);
        let max_ms = |d: &[Duration]| d.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let _ = writeln!(out, "\n### First connection after ADD\n");
        let mut header = String::from("| forwards on the node |");
        let mut rule = String::from("|---:|");
        for &k in kinds {
            let _ = write!(header, " {}: ADD | first connection |", k.label());
            rule.push_str("---:|---:|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for &n in &settings.forwards {
            if !kinds.iter().any(|&k| self.first.contains_key(&(n, k))) {
                continue;
            }
            let _ = write!(out, "| {n} |");
            for &k in kinds {
                match self.first.get(&(n, k)) {
                    Some(f) => {
                        let (add, first) = (ms(&f.add).unwrap_or(0.0), ms(&f.first).unwrap_or(0.0));
                        let _ = write!(out, " {add:.1} | {first:.1} (max {:.1}) |", max_ms(&f.first));
                    }
                    None => out.push_str(" — | — |"),
                }
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "\nMedians in ms of {} new pod(s) per cell (max: the slowest). Each new pod is made as the bridge \
             plugin makes one (a namespace, a veth on the bridge, a new address, its real MAC in prevResult) with a \
             server listening, beside the N forwards' pods; then its ADD with one forward (ADD: spawn to exit), and \
             the time from the ADD's return until a connection from the client through the new forward is accepted \
             (a refused connect is retried at once, an unanswered SYN after 1 s). Over {} s the bench stops.",
            settings.first_reps,
            crate::dataplane::FIRST_LIMIT.as_secs()
        );
    }
}
