//! The control-plane measurement: ADD → CHECK → DEL cycles of fresh attachments on a node that
//! holds N background attachments, and the check that each backend's rules land where they belong.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::json;

use crate::node;
use crate::plugin::{Attachment, Kind, Op, Plugin};
use crate::report::{Case, Results};
use crate::{fresh_ports, Result, BACKGROUND_PORTS};

/// The routed case (bridge-nat only): per backend, two (fwmark, routing table) pairs.
fn routed_marks_tables(kind: Kind) -> [(u32, u32); 2] {
    match kind {
        Kind::Nftables => [(0x67, 103), (0x68, 104)],
        _ => [(0x65, 101), (0x66, 102)],
    }
}

pub struct Bench {
    pub plugins: BTreeMap<Kind, Plugin>,
    pub results: Results,
    /// Next free pod index for measured attachments.
    pub next_pod: u32,
    /// Size of each contender's slice of background pod indexes and host ports.
    pub max_n: usize,
    /// Background attachments each contender has on the node now.
    pub background: BTreeMap<Kind, usize>,
    /// Set when a bridge-nat CHECK failed (recorded, and the run fails).
    pub bridge_nat_check_failed: bool,
}

impl Bench {
    pub fn plugin(&self, kind: Kind) -> &Plugin {
        &self.plugins[&kind]
    }

    fn prefix(kind: Kind) -> &'static str {
        match kind {
            Kind::Portmap => "pm",
            Kind::Iptables => "ipt",
            Kind::Nftables => "nft",
        }
    }

    fn background_attachment(&self, kind: Kind, k: usize) -> Attachment {
        let i = kind.slot() * self.max_n + k;
        Attachment {
            container_id: format!("{}-bg-{k:05}", Self::prefix(kind)),
            ip: Attachment::pod_ip(i as u32),
            mappings: vec![((BACKGROUND_PORTS + i) as u16, 8080)],
            static_rules: None,
            sandbox: None,
        }
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.background.get(&kind).copied().unwrap_or(0)
    }

    /// Adds background attachments of the phase's contenders (interleaved) until each has `n`.
    pub fn populate(&mut self, kinds: &[Kind], n: usize) -> Result<()> {
        let from = kinds.iter().map(|&k| self.count(k)).min().unwrap_or(n);
        if from >= n {
            return Ok(());
        }
        let names: Vec<&str> = kinds.iter().map(|k| k.label()).collect();
        eprintln!("populating background attachments {from} → {n} for {} ...", names.join(", "));
        let started = Instant::now();
        for k in from..n {
            for &kind in kinds {
                if self.count(kind) > k {
                    continue;
                }
                let att = self.background_attachment(kind, k);
                let out = self.plugin(kind).run_ok(Op::Add, &att)?;
                self.results.record_background(kind, &format!("ADD while populating 0 → {}", self.max_n), out.elapsed);
                self.background.insert(kind, k + 1);
            }
            if (k + 1) % 100 == 0 {
                eprintln!("  {} each, {:.0} s", k + 1, started.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    pub fn teardown(&mut self, kinds: &[Kind]) -> Result<()> {
        let top = kinds.iter().map(|&k| self.count(k)).max().unwrap_or(0);
        eprintln!("deleting {top} background attachments of each of {} contender(s) ...", kinds.len());
        let started = Instant::now();
        for k in (0..top).rev() {
            for &kind in kinds {
                if k >= self.count(kind) {
                    continue;
                }
                let att = self.background_attachment(kind, k);
                let out = self.plugin(kind).run_ok(Op::Del, &att)?;
                self.results.record_background(kind, "DEL of every background attachment", out.elapsed);
                self.background.insert(kind, k);
            }
            if k % 100 == 0 && k > 0 {
                eprintln!("  {k} each left, {:.0} s", started.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    fn fresh(&mut self, kind: Kind, tag: &str, mappings: usize) -> Attachment {
        let pod = self.next_pod;
        self.next_pod += 1;
        let base = fresh_ports(kind);
        Attachment {
            container_id: format!("{}-{tag}-{pod:05}", Self::prefix(kind)),
            ip: Attachment::pod_ip(pod),
            mappings: (0..mappings).map(|m| (base + m as u16, 8080 + m as u16)).collect(),
            static_rules: None,
            sandbox: None,
        }
    }

    /// One ADD → CHECK → DEL cycle. ADD and DEL must succeed (else the bench stops); a failed
    /// CHECK is recorded (portmap 1.1.1 checks ip6tables even for an IPv4-only pod and fails).
    fn cycle(&mut self, kind: Kind, att: &Attachment, case: Case, rss_candidate: bool) -> Result<()> {
        for op in [Op::Add, Op::Check, Op::Del] {
            let plugin = self.plugin(kind);
            let out = if op == Op::Check { plugin.run(op, att) } else { plugin.run_ok(op, att)? };
            if !out.ok && kind.is_bridge_nat() {
                self.bridge_nat_check_failed = true;
            }
            let case = Case { op, ..case };
            self.results.record(case, kind, out.ok, out.elapsed, || {
                let text = format!("{}: {} {}", out.status, out.stdout, out.stderr);
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            });
            self.results.record_rss(kind, op, rss_candidate, out.maxrss_kib);
        }
        Ok(())
    }

    pub fn measure(&mut self, kinds: &[Kind], n: usize, mappings: usize, reps: usize) -> Result<()> {
        eprintln!("measuring N={n}, {mappings} mapping(s), {reps} cycles per contender ...");
        let case = Case { routed: false, n, mappings, op: Op::Add };
        for r in 0..reps {
            // Rotate which contender goes first so none always runs on a warmer cache.
            let mut order = kinds.to_vec();
            order.rotate_left(r % kinds.len().max(1));
            for kind in order {
                let att = self.fresh(kind, &format!("n{n}-m{mappings}"), mappings);
                self.cycle(kind, &att, case, n == 0 && mappings == 1)?;
            }
        }
        Ok(())
    }

    /// bridge-nat only: two static forwards, each with its own routing block (mark, table, uplink).
    /// No tableName: the plugin then writes no names into /etc/iproute2, which is not overlaid here.
    pub fn measure_routed(&mut self, kinds: &[Kind], reps: usize) -> Result<()> {
        let kinds: Vec<Kind> = kinds.iter().copied().filter(|k| k.is_bridge_nat()).collect();
        if kinds.is_empty() {
            return Ok(());
        }
        eprintln!("measuring bridge-nat with two routed static rules, {reps} cycles per backend ...");
        for r in 0..reps {
            let mut order = kinds.clone();
            order.rotate_left(r % kinds.len());
            for kind in order {
                let [(mark_a, table_a), (mark_b, table_b)] = routed_marks_tables(kind);
                let port = fresh_ports(kind) + 1001;
                let rules = json!([
                    { "name": "routed-a", "hostPort": port, "destPort": 8080, "protocol": "tcp",
                      "routing": { "fwmark": format!("{mark_a:#x}"), "tableId": table_a, "outbound": { "interface": "up1" } } },
                    { "name": "routed-b", "hostPort": port + 1, "destPort": 8081, "protocol": "tcp",
                      "routing": { "fwmark": format!("{mark_b:#x}"), "tableId": table_b, "outbound": { "interface": "up2" } } }
                ]);
                let case = Case { routed: true, n: self.count(kind), mappings: 0, op: Op::Add };
                let mut att = self.fresh(kind, "routed", 0);
                att.static_rules = Some(rules);
                self.cycle(kind, &att, case, false)?;
            }
        }
        Ok(())
    }

    /// One unrecorded cycle per contender (page cache, first chains or table, the state
    /// directory), checking after ADD that each bridge-nat backend's rules are where they belong.
    pub fn warm_up(&mut self, kinds: &[Kind]) -> Result<()> {
        for &kind in kinds {
            let att = self.fresh(kind, "warmup", 1);
            let plugin = self.plugin(kind);
            plugin.run_ok(Op::Add, &att)?;
            let placed = placement_problem(kind);
            plugin.run(Op::Check, &att);
            plugin.run_ok(Op::Del, &att)?;
            if let Some(problem) = placed {
                return Err(format!("contender {}: ADD succeeded, but {problem}", kind.label()));
            }
        }
        Ok(())
    }
}

/// After one ADD on an otherwise empty node: is the backend's firewall where it should be?
fn placement_problem(kind: Kind) -> Option<String> {
    let tables = node::bridge_nat_nft_tables();
    let lines = node::bridge_nat_iptables_lines();
    match kind {
        Kind::Portmap => None,
        Kind::Iptables if lines.is_empty() => {
            Some("iptables-save shows no bridge-nat chain or rule for it (backend \"iptables\" not honoured?)".into())
        }
        Kind::Iptables if !tables.is_empty() => {
            Some(format!("backend \"iptables\" created nftables table(s) {}", tables.join(", ")))
        }
        Kind::Nftables if !tables.iter().any(|t| t == node::NFT_TABLE) => Some(format!(
            "there is no nftables table `{}` (`nft list tables`: {}); {}",
            node::NFT_TABLE,
            if tables.is_empty() { "none of bridge-nat's".to_string() } else { tables.join(", ") },
            if lines.is_empty() {
                "nor any bridge-nat rule in iptables-save".to_string()
            } else {
                format!(
                    "{} bridge-nat line(s) in iptables-save instead: this bridge-nat binary ignores \"backend\": \"nftables\"",
                    lines.len()
                )
            }
        )),
        Kind::Nftables if !lines.is_empty() => Some(format!(
            "backend \"nftables\" also wrote iptables rules, e.g. `{}`",
            lines.first().map(String::as_str).unwrap_or_default()
        )),
        _ => None,
    }
}
