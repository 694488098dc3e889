//! The pods' IPv6 egress is translated to a stable address of the uplink it leaves by, not to the
//! address the kernel would pick for a masquerade (a temporary one where `use_tempaddr=2`, whose
//! flows die when it expires). Which NATs a network needs is planned (plan/snat6.rs) and recorded;
//! the address is node state, resolved whenever a call looks (routing/stable6.rs), as the tables'
//! gateways are: ADD sets it, CHECK and the agent report a NAT to an address the uplink no longer
//! has (or when a better one now exists), reconcile and the agent repair it, and the last DEL of
//! a NAT's holders clears it. An uplink without a stable address keeps the plain masquerade.

use crate::backend::Firewall;
use crate::error::{Context, Result};
use crate::plan::snat6::Snat6;
use crate::routing::netlink::{link_index, Netlink};
use crate::routing::stable6::{self, Addr6};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

/// One NAT as the kernel has it and as it should be now.
struct State {
    nat: Snat6,
    current: Option<Ipv6Addr>,
    wanted: Option<Ipv6Addr>,
    /// The uplink's IPv6 addresses now, whatever their state.
    addresses: Vec<Addr6>,
}

/// Each NAT of `nats` once, read from the kernel and resolved against the uplinks now.
fn states(fw: &mut dyn Firewall, nats: &[Snat6]) -> Result<Vec<State>> {
    let specs: Vec<Snat6> = nats.iter().map(Snat6::spec).collect::<BTreeSet<_>>().into_iter().collect();
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let current = fw.snat6_current(&specs).context("read the ipv6 source nats")?;
    let mut nl = Netlink::open()?;
    let mut of_uplink: BTreeMap<String, Vec<Addr6>> = BTreeMap::new();
    for s in &specs {
        if !of_uplink.contains_key(&s.uplink) {
            let addresses = match link_index(&s.uplink) {
                Some(index) => stable6::addresses(&mut nl, index)?,
                None => Vec::new(),
            };
            of_uplink.insert(s.uplink.clone(), addresses);
        }
    }
    Ok(specs
        .into_iter()
        .zip(current)
        .map(|(nat, current)| {
            let addresses = of_uplink[&nat.uplink].clone();
            State { wanted: stable6::choose(&addresses), current, addresses, nat }
        })
        .collect())
}

/// What differs, one line each; None when the kernel is right.
fn problem(s: &State) -> Option<String> {
    let (nat, uplink) = (&s.nat, &s.nat.uplink);
    let has = |a: Ipv6Addr| s.addresses.iter().any(|x| x.ip == a);
    let stable = |a: Ipv6Addr| s.addresses.iter().any(|x| x.ip == a && stable6::choose(&[*x]).is_some());
    Some(match (s.current, s.wanted) {
        (a, b) if a == b => return None,
        (None, Some(b)) => format!("missing {nat} to {b}"),
        // Still there, but deprecated (or temporary): the prefix is being retired.
        (Some(a), Some(b)) if has(a) && !stable(a) => {
            format!("{nat} is to {a}, which is no longer a stable address of {uplink} (its stable address is {b})")
        }
        (Some(a), Some(b)) if has(a) => {
            format!("{nat} is to {a}, which is no longer the best stable address of {uplink} ({b} is)")
        }
        (Some(a), Some(b)) => {
            format!("stale {nat}: it is to {a}, which {uplink} no longer has (its stable address is {b})")
        }
        (Some(a), None) => format!("stale {nat}: it is to {a}, and {uplink} has no stable global ipv6 address now"),
        (None, None) => unreachable!("equal"),
    })
}

/// CHECK and the agent: what of `nats` the kernel has wrong now. Changes nothing.
pub fn problems(fw: &mut dyn Firewall, nats: &[Snat6]) -> Result<Vec<String>> {
    Ok(states(fw, nats)?.iter().filter_map(problem).collect())
}

/// Make the kernel translate `nats` as they should be now; one line per repair.
pub fn repair(fw: &mut dyn Firewall, nats: &[Snat6]) -> Result<Vec<String>> {
    Ok(fix(fw, nats)?.1)
}

/// [`repair`], returning the states as they are afterwards too.
fn fix(fw: &mut dyn Firewall, nats: &[Snat6]) -> Result<(Vec<State>, Vec<String>)> {
    let mut states = states(fw, nats)?;
    let wrong: Vec<&State> = states.iter().filter(|s| s.current != s.wanted).collect();
    let set: Vec<(Snat6, Ipv6Addr)> = wrong.iter().filter_map(|s| s.wanted.map(|a| (s.nat.clone(), a))).collect();
    let clear: Vec<Snat6> = wrong.iter().filter(|s| s.wanted.is_none()).map(|s| s.nat.clone()).collect();
    fw.snat6_change(&set, &clear).context("change the ipv6 source nats")?;
    let lines = wrong
        .iter()
        .map(|s| match s.wanted {
            Some(b) => format!("{} now translates to {b}", s.nat),
            None => format!("{} cleared: {} has no stable global ipv6 address", s.nat, s.nat.uplink),
        })
        .collect();
    for s in &mut states {
        s.current = s.wanted;
    }
    Ok((states, lines))
}

/// ADD: set this attachment's NATs; returns them with the addresses they translate to, as recorded.
/// A failure does not fail the ADD (the plain masquerade still carries the pods' traffic, as for
/// an uplink without a stable address): it is logged, CHECK reports it, reconcile and the agent
/// complete it. An nftables table made by an earlier version, without the map, is such a case.
pub fn apply(fw: &mut dyn Firewall, nats: &[Snat6]) -> Vec<Snat6> {
    match fix(fw, nats) {
        Ok((states, lines)) => applied(states, lines),
        Err(e) => {
            log::warn!("{e}; CHECK will report it until reconcile or the agent sets them");
            nats.to_vec()
        }
    }
}

fn applied(states: Vec<State>, lines: Vec<String>) -> Vec<Snat6> {
    for line in lines {
        log::debug!("{line}");
    }
    for s in states.iter().filter(|s| s.wanted.is_none() && s.addresses.iter().any(|a| a.global)) {
        // The plain masquerade then takes the source the kernel picks, perhaps a temporary one.
        log::warn!(
            "uplink {} has no stable global ipv6 address: the pods' ipv6 traffic leaving by it is masqueraded to \
             the source the kernel picks (with use_tempaddr=2 a temporary one, whose flows end when it expires) \
             until it has one",
            s.nat.uplink
        );
    }
    states.into_iter().map(|s| Snat6 { address: s.current, ..s.nat }).collect()
}

/// DEL: stop translating the NATs whose last holder is gone.
pub fn clear(fw: &mut dyn Firewall, nats: &[Snat6]) -> Result<()> {
    fw.snat6_change(&[], nats).context("clear the ipv6 source nats")
}
