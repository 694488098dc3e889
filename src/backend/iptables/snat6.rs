//! IPv6 source NAT to uplinks' stable addresses (commands/snat6.rs) in ip6tables' nat table: one
//! rule per (subnet, uplink) in chain BRIDGE-NAT-SNAT6, jumped to from POSTROUTING ahead of
//! BRIDGE-NAT-POSTRT, whose plain masquerade then serves only uplinks without a stable address.
//! The addresses are node state, not the records': `converge` leaves this chain alone (it holds
//! what no record lists), and this module keeps it.

use super::render::{comment, CHAIN_POSTROUTING};
use super::rules::{Current, Family, Rule, Transaction};
use crate::plan::snat6::Snat6;
use std::net::Ipv6Addr;

pub const CHAIN: &str = "BRIDGE-NAT-SNAT6";
const NAT: &str = "nat";

fn rule(s: &Snat6, address: Ipv6Addr) -> Rule {
    let c = comment("bridge-nat:snat6");
    Rule::new(Family::Ipv6, NAT, CHAIN, format!("-s {} -o {} {c} -j SNAT --to-source {address}", s.subnet, s.uplink))
}

fn jump() -> Rule {
    Rule::new(Family::Ipv6, NAT, "POSTROUTING", format!("{} -j {CHAIN}", comment("bridge-nat")))
}

/// The value after `flag` in a rule's spec.
fn arg<'a>(spec: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = spec.split_whitespace();
    words.by_ref().find(|w| *w == flag)?;
    words.next()
}

/// Whether `r` is the rule of `s`, whatever address it translates to.
fn is_of(r: &Rule, s: &Snat6) -> bool {
    r.chain == CHAIN
        && arg(&r.spec, "-s") == Some(s.subnet.to_string().as_str())
        && arg(&r.spec, "-o") == Some(s.uplink.as_str())
}

fn address_of(r: &Rule) -> Option<Ipv6Addr> {
    arg(&r.spec, "--to-source")?.parse().ok()
}

/// What `current` (ip6tables' own chains as read) translates `s` to: nothing where the jump is
/// gone or behind the masquerade's (a firewall reload, a converge that re-inserted that one).
pub fn current(current: &Current, s: &Snat6) -> Option<Ipv6Addr> {
    if !jump_first(current) {
        return None;
    }
    current.rules.iter().find(|r| is_of(r, s)).and_then(address_of)
}

/// Whether POSTROUTING jumps here before it jumps to the masquerade.
fn jump_first(current: &Current) -> bool {
    let jumps = positions(current, &format!("-j {CHAIN}"));
    let masquerade = positions(current, &format!("-j {CHAIN_POSTROUTING}"));
    match (jumps.first(), masquerade.first()) {
        (Some(j), Some(m)) => j < m,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The transaction that makes `current` translate `set` and no longer `clear`; the chain and its
/// jump exist exactly while it holds a rule, and the jump precedes the masquerade's.
pub fn change(current: &Current, set: &[(Snat6, Ipv6Addr)], clear: &[Snat6]) -> Transaction {
    let mut lines = Vec::new();
    let mut kept: Vec<&Rule> = current.rules.iter().filter(|r| r.chain == CHAIN).collect();
    let chain_exists = current.chains.iter().any(|(f, t, c)| *f == Family::Ipv6 && t == NAT && c == CHAIN);
    let mut added = Vec::new();
    for (s, address) in set {
        let want = rule(s, *address);
        if kept.iter().any(|r| **r == want) || added.contains(&want) {
            continue;
        }
        added.push(want);
    }
    let going: Vec<&Rule> = kept
        .iter()
        .copied()
        .filter(|r| {
            clear.iter().any(|s| is_of(r, s)) || set.iter().any(|(s, a)| is_of(r, s) && address_of(r) != Some(*a))
        })
        .collect();
    kept.retain(|r| !going.contains(r));
    let needed = !kept.is_empty() || !added.is_empty();
    let jumps: Vec<usize> = positions(current, &format!("-j {CHAIN}"));
    let jump_first = jump_first(current);
    if needed && !chain_exists {
        lines.push(format!(":{CHAIN} - [0:0]"));
    }
    // The jump goes (again) to the top when missing or behind the masquerade's, which an ADD that
    // created BRIDGE-NAT-POSTRT's jump just inserted there.
    if !needed || !jump_first {
        lines.extend(jumps.iter().map(|_| format!("-D POSTROUTING {}", jump().spec)));
    }
    for r in &going {
        lines.push(format!("-D {CHAIN} {}", r.spec));
    }
    for r in &added {
        lines.push(format!("-A {CHAIN} {}", r.spec));
    }
    if needed && !jump_first {
        lines.push(format!("-I POSTROUTING 1 {}", jump().spec));
    }
    if !needed && chain_exists {
        lines.push(format!(":{CHAIN} - [0:0]"));
        lines.push(format!("-X {CHAIN}"));
    }
    let mut tx = Transaction::default();
    if !lines.is_empty() {
        tx.tables.insert((Family::Ipv6, NAT.to_string()), lines);
    }
    tx
}

/// Where in ip6tables' nat POSTROUTING the jumps ending in `target` stand, in order.
fn positions(current: &Current, target: &str) -> Vec<usize> {
    current
        .rules
        .iter()
        .filter(|r| r.family == Family::Ipv6 && r.table == NAT && r.chain == "POSTROUTING")
        .enumerate()
        .filter(|(_, r)| r.spec.ends_with(target))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::parse_save;

    fn s(uplink: &str) -> Snat6 {
        Snat6 { subnet: "fd00:20::/64".parse().unwrap(), bridge: "br0".into(), uplink: uplink.into(), address: None }
    }

    fn a(text: &str) -> Ipv6Addr {
        text.parse().unwrap()
    }

    fn save(body: &str) -> Current {
        parse_save(Family::Ipv6, &format!("*nat\n:POSTROUTING ACCEPT [0:0]\n{body}COMMIT\n"))
    }

    #[test]
    fn the_first_snat_creates_the_chain_and_jumps_there_before_the_masquerade() {
        let cur =
            save(":BRIDGE-NAT-POSTRT - [0:0]\n-A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT\n");
        let tx = change(&cur, &[(s("wan1"), a("2001:db8::10"))], &[]);
        let lines = &tx.tables[&(Family::Ipv6, "nat".to_string())];
        assert_eq!(
            lines,
            &vec![
                ":BRIDGE-NAT-SNAT6 - [0:0]".to_string(),
                "-A BRIDGE-NAT-SNAT6 -s fd00:20::/64 -o wan1 -m comment --comment bridge-nat:snat6 -j SNAT --to-source 2001:db8::10".to_string(),
                "-I POSTROUTING 1 -m comment --comment bridge-nat -j BRIDGE-NAT-SNAT6".to_string(),
            ]
        );
    }

    #[test]
    fn a_new_address_replaces_the_old_and_the_last_clear_removes_chain_and_jump() {
        let cur = save(concat!(
            ":BRIDGE-NAT-SNAT6 - [0:0]\n:BRIDGE-NAT-POSTRT - [0:0]\n",
            "-A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-SNAT6\n",
            "-A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT\n",
            "-A BRIDGE-NAT-SNAT6 -s fd00:20::/64 -o wan1 -m comment --comment bridge-nat:snat6 -j SNAT --to-source 2001:db8::10\n",
        ));
        assert_eq!(current(&cur, &s("wan1")), Some(a("2001:db8::10")));
        assert_eq!(current(&cur, &s("wan0")), None);
        assert!(change(&cur, &[(s("wan1"), a("2001:db8::10"))], &[]).is_empty());
        let renumbered = change(&cur, &[(s("wan1"), a("2001:db8::20"))], &[]);
        let lines = &renumbered.tables[&(Family::Ipv6, "nat".to_string())];
        assert!(lines[0].starts_with("-D BRIDGE-NAT-SNAT6 ") && lines[0].ends_with("2001:db8::10"), "{lines:?}");
        assert!(lines[1].starts_with("-A BRIDGE-NAT-SNAT6 ") && lines[1].ends_with("2001:db8::20"), "{lines:?}");
        assert_eq!(lines.len(), 2);
        // The masquerade's jump re-inserted at the top: nothing is translated, and a change
        // that adds no rule moves the jump back ahead of it.
        let behind = save(concat!(
            ":BRIDGE-NAT-SNAT6 - [0:0]\n:BRIDGE-NAT-POSTRT - [0:0]\n",
            "-A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT\n",
            "-A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-SNAT6\n",
            "-A BRIDGE-NAT-SNAT6 -s fd00:20::/64 -o wan1 -m comment --comment bridge-nat:snat6 -j SNAT --to-source 2001:db8::10\n",
        ));
        assert_eq!(current(&behind, &s("wan1")), None);
        let moved = change(&behind, &[(s("wan1"), a("2001:db8::10"))], &[]);
        assert_eq!(
            moved.tables[&(Family::Ipv6, "nat".to_string())],
            vec![
                "-D POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-SNAT6".to_string(),
                "-I POSTROUTING 1 -m comment --comment bridge-nat -j BRIDGE-NAT-SNAT6".to_string(),
            ]
        );
        let gone = change(&cur, &[], &[s("wan1")]);
        let lines = &gone.tables[&(Family::Ipv6, "nat".to_string())];
        assert_eq!(lines[0], "-D POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-SNAT6");
        assert_eq!(&lines[2..], &[":BRIDGE-NAT-SNAT6 - [0:0]".to_string(), "-X BRIDGE-NAT-SNAT6".to_string()]);
    }
}
