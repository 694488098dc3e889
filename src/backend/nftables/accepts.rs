//! The nftables backend beside an iptables FORWARD that drops by policy (Docker's, a hardened
//! image's): an accept in our table cannot overrule a drop in another base chain, so where that
//! policy is DROP each network also gets, in iptables' filter table, the accepts its bridge needs
//! in a chain of its own, jumped to from the top of FORWARD.
//!
//! Every nftables record lists these rules (render stays pure); they are installed only in the
//! families whose FORWARD drops. The network's first attachment installs them and its last
//! removes them; CHECK reports them missing, and converge installs them, when the policy has
//! become DROP since. Once installed they stay while a record needs them, whatever the policy.

use super::socket::family_name;
use crate::backend::iptables::{diff, Current, Family, Rule, Transaction};
use crate::error::{Context, Result};
use crate::plan::Plan;
use std::collections::BTreeSet;

/// The chain in iptables' filter table (ip and ip6) that holds the accepts.
pub use crate::backend::iptables::NFT_ACCEPT_CHAIN as CHAIN;

/// The accepts `plan`'s network needs in each family it has, with the jump to them.
pub fn render(plan: &Plan) -> Vec<Rule> {
    let c = format!("-m comment --comment bridge-nat:{}", plan.id.network);
    let br = &plan.bridge;
    let mut rules = BTreeSet::new();
    for family in plan.families() {
        rules.insert(jump(family));
        rules.insert(Rule::new(family, "filter", CHAIN, format!("-i {br} {c} -j ACCEPT")));
        rules.insert(Rule::new(
            family,
            "filter",
            CHAIN,
            format!("-o {br} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT {c} -j ACCEPT"),
        ));
    }
    rules.into_iter().collect()
}

/// The jump from FORWARD, shared by every network of the family.
fn jump(family: Family) -> Rule {
    Rule::new(family, "filter", "FORWARD", format!("-m comment --comment bridge-nat -j {CHAIN}"))
}

fn is_jump(r: &Rule) -> bool {
    r.chain != CHAIN
}

/// Index key of one accept (all of them are shared: a network's, or the node's jump).
pub fn key(r: &Rule) -> String {
    format!("nftaccept:{r}")
}

pub fn families<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Vec<Family> {
    let set: BTreeSet<Family> = rules.into_iter().map(|r| r.family).collect();
    set.into_iter().collect()
}

/// Install `first` (the accepts nobody held before) in the families whose FORWARD `drops`,
/// creating the chain and its jump where `has_chain` says it is absent.
pub fn install_tx(first: &[&Rule], drops: &[Family], has_chain: impl Fn(Family) -> bool) -> Transaction {
    let mut tx = Transaction::default();
    for &f in drops {
        let rules: Vec<&&Rule> = first.iter().filter(|r| r.family == f && !is_jump(r)).collect();
        if rules.is_empty() {
            continue;
        }
        let lines = tx.tables.entry((f, "filter".to_string())).or_default();
        if !has_chain(f) {
            lines.push(format!(":{CHAIN} - [0:0]"));
            lines.push(format!("-I FORWARD 1 {}", jump(f).spec));
        }
        lines.extend(rules.iter().map(|r| format!("-A {CHAIN} {}", r.spec)));
    }
    tx
}

/// Remove `going` from `current` (the chain as the node holds it); a family whose jump goes loses
/// the whole chain. Only what is there is deleted: accepts never installed are no error.
pub fn remove_tx(current: &Current, going: &[&Rule]) -> Transaction {
    let going: BTreeSet<&Rule> = going.iter().copied().collect();
    let chain_goes: BTreeSet<Family> = going.iter().filter(|r| is_jump(r)).map(|r| r.family).collect();
    let desired: BTreeSet<Rule> =
        current.rules.iter().filter(|r| !going.contains(r) && !chain_goes.contains(&r.family)).cloned().collect();
    diff(current, &desired)
}

/// Take `current` to what the records `wanted` need: their accepts in every family whose FORWARD
/// `drops`, and those already there elsewhere (a policy back to ACCEPT removes nothing); what no
/// record lists goes.
pub fn converge_tx(current: &Current, wanted: &BTreeSet<&Rule>, drops: &[Family]) -> Transaction {
    let present: BTreeSet<&Rule> = current.rules.iter().collect();
    let mut desired: BTreeSet<Rule> = wanted
        .iter()
        .filter(|r| !is_jump(r) && (drops.contains(&r.family) || present.contains(*r)))
        .map(|r| (*r).clone())
        .collect();
    let jumps: Vec<Rule> = families(desired.iter()).into_iter().map(jump).collect();
    desired.extend(jumps);
    diff(current, &desired)
}

/// What of `needed` (the accepts a record lists, in families that drop) `current` lacks.
pub fn missing(current: &Current, needed: &[&Rule]) -> Vec<String> {
    let present: BTreeSet<&Rule> = current.rules.iter().collect();
    needed.iter().filter(|r| !present.contains(*r)).map(|r| format!("missing firewall rule: {r}")).collect()
}

/// The backend's side of the accepts: where the kernel is read and written.
impl super::NftablesBackend {
    /// Install the accepts first held here, in the families whose FORWARD drops; nothing to do
    /// (no lookup, no process) for a network's later attachments.
    pub(super) fn install_accepts(&mut self, first: &[&Rule]) -> Result<()> {
        if first.is_empty() {
            return Ok(());
        }
        let nft = self.nft()?;
        let families = families(first.iter().copied());
        let drops: Vec<Family> = nft.forward_drops()?.into_iter().filter(|f| families.contains(f)).collect();
        let mut has_chain = BTreeSet::new();
        for &f in &drops {
            if nft.iptables_chain_exists(f, CHAIN)? {
                has_chain.insert(f);
            }
        }
        self.apply_accepts(install_tx(first, &drops, |f| has_chain.contains(&f)))
    }

    /// Remove the accepts last held here, where the chain exists (read first: they may never have
    /// been installed).
    pub(super) fn remove_accepts(&mut self, last: &[&Rule]) -> Result<()> {
        if last.is_empty() {
            return Ok(());
        }
        let mut there = Vec::new();
        for f in families(last.iter().copied()) {
            if self.nft()?.iptables_chain_exists(f, CHAIN)? {
                there.push(f);
            }
        }
        if there.is_empty() {
            return Ok(());
        }
        self.accepts_read.clear();
        let current = self.read_accepts(&there)?;
        self.apply_accepts(remove_tx(&current, last))
    }

    /// What of a record's accepts is missing in the families whose FORWARD drops.
    pub(super) fn verify_accepts(&mut self, rules: &[Rule]) -> Result<Vec<String>> {
        if rules.is_empty() {
            return Ok(Vec::new());
        }
        let drops = self.nft()?.forward_drops()?;
        let needed: Vec<&Rule> = rules.iter().filter(|r| drops.contains(&r.family)).collect();
        if needed.is_empty() {
            return Ok(Vec::new());
        }
        let current = self.read_accepts(&families(needed.iter().copied()))?;
        Ok(missing(&current, &needed))
    }

    /// Bring the accept chains to what `wanted` needs; reads nothing on a node where no FORWARD
    /// drops and no chain of ours is left.
    pub(super) fn converge_accepts(&mut self, wanted: &BTreeSet<&Rule>) -> Result<Vec<String>> {
        let nft = self.nft()?;
        let drops = nft.forward_drops()?;
        let mut families = Vec::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            if drops.contains(&f) || nft.iptables_chain_exists(f, CHAIN)? {
                families.push(f);
            }
        }
        if families.is_empty() {
            return Ok(Vec::new());
        }
        self.accepts_read.clear();
        let current = self.read_accepts(&families)?;
        let tx = converge_tx(&current, wanted, &drops);
        let repairs = tx
            .tables
            .iter()
            .flat_map(|((f, t), lines)| lines.iter().map(move |l| format!("iptables-nft {} {t}: {l}", family_name(*f))))
            .collect();
        self.apply_accepts(tx)?;
        Ok(repairs)
    }

    /// The families of `families` whose FORWARD drops while our chain is absent there.
    pub(super) fn forward_drops_without_accepts(&mut self, families: &[Family]) -> Result<Vec<String>> {
        if families.is_empty() {
            return Ok(Vec::new());
        }
        let nft = self.nft()?;
        let mut out = Vec::new();
        for f in nft.forward_drops()?.into_iter().filter(|f| families.contains(f)) {
            if !nft.iptables_chain_exists(f, CHAIN)? {
                out.push(format!("{} filter FORWARD", family_name(f)));
            }
        }
        Ok(out)
    }

    /// The accept chain (and jumps to it) in `families`, read once per backend until changed.
    fn read_accepts(&mut self, families: &[Family]) -> Result<Current> {
        let mut all = Current::default();
        for &f in families {
            if !self.accepts_read.contains_key(&f) {
                let mut cur = self.ipt.read(&[f]).context("read iptables' filter table")?;
                self.accepts_read.insert(f, cur.take_chain(CHAIN));
            }
            let cur = &self.accepts_read[&f];
            all.rules.extend(cur.rules.iter().cloned());
            all.chains.extend(cur.chains.iter().cloned());
        }
        Ok(all)
    }

    fn apply_accepts(&mut self, tx: crate::backend::iptables::Transaction) -> Result<()> {
        self.accepts_read.clear();
        self.ipt.apply(&tx, &[Family::Ipv4, Family::Ipv6]).context(format!("apply chain {CHAIN}"))
    }
}

#[cfg(test)]
#[path = "accepts_tests.rs"]
mod tests;
