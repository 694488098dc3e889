//! The data-plane measurement: how many new TCP connections per second reach a pod through a
//! forwarded host port while N forwards are present on the node, per contender. Every forward is
//! installed by the contender's own ADDs; the client comes from outside the node (traffic.rs),
//! so each connection goes through the node's DNAT and FORWARD path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

use crate::plugin::{Attachment, Kind, Op, Plugin};
use crate::traffic::{Endpoints, Rate, SERVER_PORT, WARM_UP, WINDOW};
use crate::Result;

/// hostPort of the measured forward.
const MEASURED_PORT: u16 = 29000;
/// Host ports of the other forwards: `BACKGROUND_PORT + k` (kept below the control plane's
/// fresh ports, though both are never on the node at once).
const BACKGROUND_PORT: usize = 30000;
pub const MAX_FORWARDS: usize = 10000;

pub struct DpSettings {
    /// Measured time per contender and N.
    pub seconds: f64,
    /// Ascending numbers of forwards on the node, the measured one included.
    pub forwards: Vec<usize>,
    /// Port mappings per background attachment.
    pub per_attachment: usize,
}

#[derive(Default)]
pub struct DataPlane {
    pub rates: BTreeMap<(usize, Kind), Rate>,
    /// Most background attachments one contender had on the node.
    pub max_attachments: usize,
}

/// Measures each contender alone on the node, from the fewest forwards to the most, and deletes
/// every attachment it added before the next contender starts.
pub fn run(
    plugins: &BTreeMap<Kind, Plugin>,
    kinds: &[Kind],
    settings: &DpSettings,
    node_name: &str,
    first_pod: u32,
    out: &mut DataPlane,
) -> Result<()> {
    let server_ip = Attachment::pod_ip(first_pod);
    let ends = Endpoints::create(node_name, server_ip);
    for kind in [Kind::Nftables, Kind::Iptables, Kind::Portmap].into_iter().filter(|k| kinds.contains(k)) {
        eprintln!("=== data plane: {} ===", kind.label());
        let plugin = &plugins[&kind];
        // The measured forward: added after the others, so it sits at the end of every chain
        // that grows by appending (the newest pod on a busy node).
        let measured = Attachment {
            container_id: format!("dp-{}-server", kind.key()),
            ip: server_ip,
            mappings: vec![(MEASURED_PORT, SERVER_PORT)],
            static_rules: None,
        };
        let mut background: Vec<Attachment> = Vec::new();
        let mut background_forwards = 0;
        for &n in &settings.forwards {
            let started = Instant::now();
            while background_forwards < n - 1 {
                let m = settings.per_attachment.min(n - 1 - background_forwards);
                let att = Attachment {
                    container_id: format!("dp-{}-bg-{:05}", kind.key(), background.len()),
                    ip: Attachment::pod_ip(first_pod + 1 + background.len() as u32),
                    mappings: (0..m).map(|j| ((BACKGROUND_PORT + background_forwards + j) as u16, 80)).collect(),
                    static_rules: None,
                };
                plugin.run_ok(Op::Add, &att)?;
                background_forwards += m;
                background.push(att);
                if background.len().is_multiple_of(100) {
                    eprintln!("  {} attachments, {:.0} s", background.len(), started.elapsed().as_secs_f64());
                }
            }
            out.max_attachments = out.max_attachments.max(background.len());
            eprintln!(
                "  {n} forward(s) ({} other attachment(s), added in {:.0} s); measuring {} s ...",
                background.len(),
                started.elapsed().as_secs_f64(),
                settings.seconds
            );
            let refused = |when: &str| match ends.probe(MEASURED_PORT) {
                Ok(()) => Err(format!("data plane, contender {}: port {MEASURED_PORT} answers {when}", kind.label())),
                Err(_) => Ok(()),
            };
            refused("before the ADD of its forward (something else forwards it)")?;
            plugin.run_ok(Op::Add, &measured)?;
            ends.probe(MEASURED_PORT).map_err(|e| {
                format!(
                    "data plane, contender {}: after ADD, no connection from the client through port {MEASURED_PORT} to the pod: {e}",
                    kind.label()
                )
            })?;
            let rate = ends.measure(MEASURED_PORT, settings.seconds);
            plugin.run_ok(Op::Del, &measured)?;
            refused("after the DEL of its forward (the DEL left it)")?;
            let failed = (rate.failures > 0).then(|| {
                format!(
                    "data plane, contender {}: {} of {} connections through port {MEASURED_PORT} failed at {n} forwards (first: {})",
                    kind.label(),
                    rate.failures,
                    rate.failures + rate.connections,
                    rate.first_error.as_deref().unwrap_or("?")
                )
            });
            out.rates.insert((n, kind), rate);
            if let Some(e) = failed {
                return Err(e);
            }
            crate::node::check_interrupted();
        }
        let started = Instant::now();
        for att in background.iter().rev() {
            plugin.run_ok(Op::Del, att)?;
        }
        eprintln!("  deleted {} attachment(s) in {:.0} s", background.len(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

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
             at once (with RST, so no side keeps TIME_WAIT), one connection at a time from one thread; the node DNATs \
             each connection to a server in a pod on the bridge (a Rust accept loop in the pod's namespace). N forwards \
             = the measured one, added last (the end of any chain that grows by appending), plus N − 1 on other host \
             ports of other attachments ({} mapping(s) each, {} attachments at most), all installed by the \
             contender's own ADDs; each contender is alone on the node. Before each ADD and after each DEL the port \
             must refuse connections. Over the windows the client thread spent {:.0}% of the wall time in user space \
             and {:.0}% in the kernel (its syscalls, and the node's whole packet path, which veth runs in the \
             sender's softirq). {}",
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
        out
    }
}
