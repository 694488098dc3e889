//! The nftables backend beside an iptables FORWARD that drops by policy (Docker's, a hardened
//! image's): an accept in our table cannot overrule a drop in another base chain, so where that
//! policy is DROP each network also gets, in iptables' filter table, the accepts its bridge needs
//! in a chain of its own, jumped to from the top of FORWARD.
//!
//! Every nftables record lists these rules (render stays pure); they are installed only in the
//! families whose FORWARD drops. The network's first attachment installs them and its last
//! removes them; CHECK reports them missing, and converge installs them, when the policy has
//! become DROP since. Once installed they stay while a record needs them, whatever the policy.

use crate::backend::iptables::{diff, Current, Family, Rule, Transaction};
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

#[cfg(test)]
#[path = "accepts_tests.rs"]
mod tests;
