//! iptables state as data: rules, the diff between two states, and the restore script that turns
//! one into the other. restore.rs runs the scripts; nothing here touches the node.

pub use crate::plan::Family;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Every chain the plugin owns starts with this; nothing else is ever flushed or deleted.
pub const CHAIN_PREFIX: &str = "BRIDGE-NAT-";

/// The nftables backend's accepts beside a dropping FORWARD (backend/nftables/accepts.rs) live in
/// this own chain of iptables' filter table. It is named here, below both backends, because the
/// iptables backend must leave it alone when it converges its own chains.
pub const NFT_ACCEPT_CHAIN: &str = "BRIDGE-NAT-NFT-FWD";

/// One rule in `iptables-save` canonical form, so that it compares equal to what the kernel reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub spec: String,
}

impl Rule {
    pub fn new(family: Family, table: &str, chain: &str, spec: impl Into<String>) -> Rule {
        Rule { family, table: table.into(), chain: chain.into(), spec: spec.into() }
    }

    /// Jumps from built-in chains go to the top, so an earlier DROP or RETURN cannot defeat them.
    pub fn in_builtin_chain(&self) -> bool {
        !is_own_chain(&self.chain)
    }

    /// The own chain this rule jumps to, if any.
    pub fn jump_target(&self) -> Option<&str> {
        let target = self.spec.rsplit_once("-j ")?.1.split_whitespace().next()?;
        is_own_chain(target).then_some(target)
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = match self.family {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        write!(f, "{v} {} -A {} {}", self.table, self.chain, self.spec)
    }
}

pub fn is_own_chain(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// What is on the node (or believed to be): rules as a list, since the kernel may hold
/// duplicates, and the own chains that exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Current {
    pub rules: Vec<Rule>,
    pub chains: BTreeSet<(Family, String, String)>,
}

impl Current {
    /// The state a set of records implies: their rules, and every own chain those rules use.
    pub fn from_rules<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Current {
        let rules: BTreeSet<&Rule> = rules.into_iter().collect();
        let chains = chains_used(rules.iter().copied());
        Current { rules: rules.into_iter().cloned().collect(), chains }
    }

    /// Split off `chain`, an own chain another backend manages: the chain, its rules and the jumps
    /// to it.
    pub fn take_chain(&mut self, chain: &str) -> Current {
        let (taken, kept): (Vec<Rule>, Vec<Rule>) =
            self.rules.drain(..).partition(|r| r.chain == chain || r.jump_target() == Some(chain));
        self.rules = kept;
        let chains = self.chains.iter().filter(|(_, _, c)| c == chain).cloned().collect();
        self.chains.retain(|(_, _, c)| c != chain);
        Current { rules: taken, chains }
    }
}

fn chains_used<'a>(rules: impl Iterator<Item = &'a Rule>) -> BTreeSet<(Family, String, String)> {
    let mut chains = BTreeSet::new();
    for r in rules {
        if is_own_chain(&r.chain) {
            chains.insert((r.family, r.table.clone(), r.chain.clone()));
        }
        if let Some(t) = r.jump_target() {
            chains.insert((r.family, r.table.clone(), t.to_string()));
        }
    }
    chains
}

/// Per family, per table: the restore lines that take `current` to `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    pub tables: BTreeMap<(Family, String), Vec<String>>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.tables.values().all(|l| l.is_empty())
    }

    /// The `iptables-restore --noflush` input for one family.
    pub fn script(&self, family: Family) -> Option<String> {
        let mut out = String::new();
        for ((f, table), lines) in &self.tables {
            if *f != family || lines.is_empty() {
                continue;
            }
            let _ = writeln!(out, "*{table}");
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = writeln!(out, "COMMIT");
        }
        (!out.is_empty()).then_some(out)
    }
}

/// The minimal change from `current` to `desired`: new own chains declared, surplus and duplicate
/// rules deleted, missing rules added (jumps inserted at the top), unused own chains removed.
pub fn diff(current: &Current, desired: &BTreeSet<Rule>) -> Transaction {
    let mut tx = Transaction::default();
    let want_chains = chains_used(desired.iter());
    fn lines<'t>(tx: &'t mut Transaction, f: Family, t: &str) -> &'t mut Vec<String> {
        tx.tables.entry((f, t.to_string())).or_default()
    }

    // Declaring an own chain creates it (or flushes a stale one nobody listed).
    for (f, t, c) in want_chains.difference(&current.chains) {
        lines(&mut tx, *f, t).push(format!(":{c} - [0:0]"));
    }
    let mut seen: BTreeSet<&Rule> = BTreeSet::new();
    let (jumps, others): (Vec<&Rule>, Vec<&Rule>) = current.rules.iter().partition(|r| r.jump_target().is_some());
    // Jumps go first so that removed chains are no longer referenced.
    for r in jumps.into_iter().chain(others) {
        let keep = desired.contains(r) && seen.insert(r);
        let chain_survives =
            !is_own_chain(&r.chain) || want_chains.contains(&(r.family, r.table.clone(), r.chain.clone()));
        if !keep && chain_survives {
            lines(&mut tx, r.family, &r.table).push(format!("-D {} {}", r.chain, r.spec));
        }
    }
    for r in desired.iter().filter(|r| !seen.contains(r)) {
        let verb = if r.in_builtin_chain() { "-I" } else { "-A" };
        let pos = if r.in_builtin_chain() { " 1" } else { "" };
        lines(&mut tx, r.family, &r.table).push(format!("{verb} {}{pos} {}", r.chain, r.spec));
    }
    // Chains that go are all flushed (by declaring them) before any is deleted, since one of
    // them may still jump to another.
    let gone: Vec<_> = current.chains.difference(&want_chains).collect();
    for (f, t, c) in &gone {
        lines(&mut tx, *f, t).push(format!(":{c} - [0:0]"));
    }
    for (f, t, c) in &gone {
        lines(&mut tx, *f, t).push(format!("-X {c}"));
    }
    tx.tables.retain(|_, l| !l.is_empty());
    tx
}

/// Parse `iptables-save` output into the part of the node this plugin cares about: its own chains,
/// their rules, and rules anywhere that jump to them.
pub fn parse_save(family: Family, text: &str) -> Current {
    let mut cur = Current::default();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("");
            if is_own_chain(chain) {
                cur.chains.insert((family, table.clone(), chain.to_string()));
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            let rule = Rule::new(family, &table, chain, unquote_comment(spec));
            if is_own_chain(chain) || rule.jump_target().is_some() {
                cur.rules.push(rule);
            }
        }
    }
    cur
}

/// `iptables-save` quotes a comment only when it holds certain characters; ours never need it.
fn unquote_comment(spec: &str) -> String {
    const KEY: &str = "--comment \"";
    let Some(start) = spec.find(KEY) else {
        return spec.to_string();
    };
    let value_start = start + KEY.len();
    match spec[value_start..].find('"') {
        Some(len) if !spec[value_start..value_start + len].contains([' ', '\\']) => format!(
            "{}--comment {}{}",
            &spec[..start],
            &spec[value_start..value_start + len],
            &spec[value_start + len + 1..]
        ),
        _ => spec.to_string(),
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "save_tests.rs"]
mod save_tests;

#[cfg(test)]
#[path = "sim_tests.rs"]
mod sim_tests;
