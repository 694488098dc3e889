//! The iptables backend: chains in iptables' nat, filter and mangle tables, changed with one
//! `iptables-restore --noflush` per address family (with iptables-nft, one kernel transaction).
//!
//! A call sends only its own rules plus the shared rules and chains it is the first (ADD) or last
//! (DEL) to hold; it never reads other attachments' records. When the kernel disagrees (a flushed
//! chain, an admin's edit), the restore fails whole and the pipeline converges from the records.

mod render;
mod restore;
mod rules;
mod snat6;

pub use render::attachment_tag;
pub use restore::{is_legacy, nft_variant, Iptables};
#[cfg(test)]
pub use rules::parse_save;
pub use rules::{diff, Current, Family, Rule, Transaction, NFT_ACCEPT_CHAIN};

use super::{Converge, Firewall, Ipv6Addr, Objects, Snat6};
use crate::config::{AttachmentId, Backend};
use crate::error::{Context, Result};
use crate::plan::Plan;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub struct IptablesBackend {
    ipt: Iptables,
}

impl IptablesBackend {
    pub fn new(tool: &str, wait: Duration) -> IptablesBackend {
        IptablesBackend { ipt: Iptables::new(tool, wait) }
    }
}

fn rule_key(r: &Rule) -> String {
    format!("ipt:{r}")
}

fn chain_key(family: Family, table: &str, chain: &str) -> String {
    format!("iptchain:{family:?}:{table}:{chain}")
}

/// The attachment's own rules carry its tag; every other rule it needs is shared.
fn is_own(tag: &str, r: &Rule) -> bool {
    r.spec.contains(&format!("--comment {tag} "))
}

/// The own chains a set of rules lives in or jumps to, keyed for the index.
fn chains_of<'a>(rules: impl Iterator<Item = &'a Rule>) -> BTreeMap<String, (Family, String, String)> {
    Current::from_rules(rules).chains.into_iter().map(|(f, t, c)| (chain_key(f, &t, &c), (f, t, c))).collect()
}

fn families_of<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<Family> {
    let set: BTreeSet<Family> = rules.map(|r| r.family).collect();
    set.into_iter().collect()
}

fn add_lines(tx: &mut Transaction, r: &Rule, line: String) {
    tx.tables.entry((r.family, r.table.clone())).or_default().push(line);
}

impl Firewall for IptablesBackend {
    fn kind(&self) -> Backend {
        Backend::Iptables
    }

    fn render(&self, plan: &Plan) -> Objects {
        Objects { rules: render::render(plan).into_iter().collect(), nft: None }
    }

    fn shared_keys(&self, id: &AttachmentId, objects: &Objects) -> BTreeSet<String> {
        let tag = attachment_tag(id);
        let mut keys: BTreeSet<String> = objects.rules.iter().filter(|r| !is_own(&tag, r)).map(rule_key).collect();
        keys.extend(chains_of(objects.rules.iter()).into_keys());
        keys
    }

    fn install(&mut self, id: &AttachmentId, objects: &Objects, first: &BTreeSet<String>) -> Result<()> {
        let tag = attachment_tag(id);
        let mut tx = Transaction::default();
        for (key, (f, t, c)) in chains_of(objects.rules.iter()) {
            if first.contains(&key) {
                tx.tables.entry((f, t)).or_default().push(format!(":{c} - [0:0]"));
            }
        }
        for r in objects.rules.iter().filter(|r| is_own(&tag, r) || first.contains(&rule_key(r))) {
            // Jumps from built-in chains go to the top, so an earlier DROP or RETURN cannot defeat them.
            let line = match r.in_builtin_chain() {
                true => format!("-I {} 1 {}", r.chain, r.spec),
                false => format!("-A {} {}", r.chain, r.spec),
            };
            add_lines(&mut tx, r, line);
        }
        self.ipt.apply(&tx, &families_of(objects.rules.iter())).context("apply firewall transaction")
    }

    fn remove(&mut self, id: &AttachmentId, objects: &Objects, last: &BTreeSet<String>) -> Result<()> {
        let tag = attachment_tag(id);
        let mut tx = Transaction::default();
        let going: Vec<&Rule> =
            objects.rules.iter().filter(|r| is_own(&tag, r) || last.contains(&rule_key(r))).collect();
        // Jumps first, so that no chain about to go is still referenced.
        let (jumps, others): (Vec<&Rule>, Vec<&Rule>) = going.into_iter().partition(|r| r.jump_target().is_some());
        for r in jumps.into_iter().chain(others) {
            add_lines(&mut tx, r, format!("-D {} {}", r.chain, r.spec));
        }
        let gone: Vec<(Family, String, String)> =
            chains_of(objects.rules.iter()).into_iter().filter(|(k, _)| last.contains(k)).map(|(_, v)| v).collect();
        // All flushed before any is deleted: one of them may still jump to another.
        for (f, t, c) in &gone {
            tx.tables.entry((*f, t.clone())).or_default().push(format!(":{c} - [0:0]"));
        }
        for (f, t, c) in &gone {
            tx.tables.entry((*f, t.clone())).or_default().push(format!("-X {c}"));
        }
        self.ipt.apply(&tx, &families_of(objects.rules.iter())).context("apply firewall transaction")
    }

    fn verify(&mut self, _id: &AttachmentId, objects: &Objects) -> Result<Vec<String>> {
        let actual = self.ipt.read(&families_of(objects.rules.iter())).context("read firewall")?;
        let present: BTreeSet<&Rule> = actual.rules.iter().collect();
        Ok(objects
            .rules
            .iter()
            .filter(|r| !present.contains(r))
            .map(|r| format!("missing firewall rule: {r}"))
            .collect())
    }

    fn compare(&self, wanted: &Objects, recorded: &Objects) -> Vec<String> {
        let recorded: BTreeSet<&Rule> = recorded.rules.iter().collect();
        let wanted: BTreeSet<&Rule> = wanted.rules.iter().collect();
        wanted
            .into_iter()
            .filter(|r| !recorded.contains(r))
            .map(|r| format!("config asks for a rule that was not installed: {r}"))
            .collect()
    }

    fn converge(&mut self, all: &[(&AttachmentId, &Objects)], _how: Converge) -> Result<Vec<String>> {
        let desired: BTreeSet<Rule> = all.iter().flat_map(|(_, o)| o.rules.iter().cloned()).collect();
        let families = [Family::Ipv4, Family::Ipv6];
        let mut actual = self.ipt.read(&families).context("read firewall")?;
        // The nftables backend's accepts beside a dropping FORWARD are its own to converge; the
        // IPv6 source NATs are node state no record lists (snat6.rs), and go with the last record.
        actual.take_chain(NFT_ACCEPT_CHAIN);
        if !all.is_empty() {
            actual.take_chain(snat6::CHAIN);
        }
        let tx = diff(&actual, &desired);
        let repairs: Vec<String> = tx
            .tables
            .iter()
            .flat_map(|((f, t), lines)| lines.iter().map(move |l| format!("iptables {f:?} {t}: {l}")))
            .collect();
        self.ipt.apply(&tx, &families).context("apply firewall transaction")?;
        Ok(repairs)
    }

    fn usable(&mut self) -> Result<()> {
        self.ipt.usable()
    }

    fn snat6_current(&mut self, wanted: &[Snat6]) -> Result<Vec<Option<Ipv6Addr>>> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let cur = self.ipt.read(&[Family::Ipv6]).context("read ip6tables' nat table")?;
        Ok(wanted.iter().map(|s| snat6::current(&cur, s)).collect())
    }

    fn snat6_change(&mut self, set: &[(Snat6, Ipv6Addr)], clear: &[Snat6]) -> Result<()> {
        if set.is_empty() && clear.is_empty() {
            return Ok(());
        }
        let cur = self.ipt.read(&[Family::Ipv6]).context("read ip6tables' nat table")?;
        self.ipt
            .apply(&snat6::change(&cur, set, clear), &[Family::Ipv6])
            .context(format!("apply chain {}", snat6::CHAIN))
    }

    fn snat6_key(&self, s: &Snat6) -> String {
        format!("snat6:ipt:{}:{}:{}", s.subnet, s.bridge, s.uplink)
    }
}
