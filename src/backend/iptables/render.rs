//! A plan rendered as iptables rules in `iptables-save` canonical form, so that they compare equal
//! to what the kernel reports. Each rule carries a comment naming who needs it: `bridge-nat` (the
//! node's jumps), `bridge-nat:<network>` (a network's rules) or the attachment's tag (its own).

use super::rules::{Family, Rule};
use crate::config::AttachmentId;
use crate::plan::{family_of, Forward, Plan, Subnet};
use std::collections::BTreeSet;
use std::net::IpAddr;

pub const CHAIN_DNAT: &str = "BRIDGE-NAT-DNAT";
pub const CHAIN_POSTROUTING: &str = "BRIDGE-NAT-POSTRT";
pub const CHAIN_FORWARD: &str = "BRIDGE-NAT-FORWARD";
pub const CHAIN_MARK: &str = "BRIDGE-NAT-MARK";
pub const CHAIN_SAVE: &str = "BRIDGE-NAT-SAVE";
/// Per network: arrival uplink → mark. Named by a hash of the network, since chain names are short.
const CHAIN_ARRIVAL_PREFIX: &str = "BRIDGE-NAT-IN-";

/// Every rule one attachment needs, shared ones included.
pub fn render(plan: &Plan) -> BTreeSet<Rule> {
    let mut rules = BTreeSet::new();
    let tag = attachment_tag(&plan.id);
    for family in plan.families() {
        rules.extend(global_rules(family));
        for s in plan.subnets.iter().filter(|s| s.family == family) {
            rules.extend(subnet_rules(&plan.id.network, &plan.bridge, s));
        }
        for f in plan.forwards.iter().filter(|f| crate::plan::family_of(f.pod_ip) == family) {
            rules.extend(forward_rules(family, &tag, &plan.bridge, f));
        }
    }
    let arrival = &plan.routing.arrival;
    // Both families are routed by the same marks: each forward is marked in its own family's
    // mangle table, and each family that marks anything gets the plumbing.
    let mut marking = BTreeSet::new();
    for f in plan.forwards.iter().filter(|f| f.mark.is_some()) {
        rules.insert(mark_rule(&tag, f, plan.mark_mask, !arrival.is_empty()));
        marking.insert(family_of(f.pod_ip));
    }
    if !arrival.is_empty() {
        let chain = arrival_chain(&plan.id.network);
        let c = comment(&format!("bridge-nat:{}", plan.id.network));
        for f in &plan.forwards {
            let family = family_of(f.pod_ip);
            rules.insert(Rule::new(family, "mangle", CHAIN_MARK, format!("{}-j {chain}", new_to_port(&tag, f))));
            marking.insert(family);
        }
        for family in plan.forwards.iter().map(|f| family_of(f.pod_ip)).collect::<BTreeSet<_>>() {
            for a in arrival {
                let spec = format!("-i {} {c} -j MARK --set-xmark {:#x}/{:#x}", a.uplink, a.mark, plan.mark_mask);
                rules.insert(Rule::new(family, "mangle", &chain, spec));
            }
        }
    }
    for family in marking {
        rules.extend(mark_plumbing(family, plan.mark_mask));
    }
    rules
}

fn arrival_chain(network: &str) -> String {
    // FNV-1a: stable across builds, unlike std's hasher; 32 bits keep the name within 28 chars.
    let h = network.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("{CHAIN_ARRIVAL_PREFIX}{h:08x}")
}

/// The matches of a NEW connection to a forward's host port, up to the attachment's tag.
fn new_to_port(tag: &str, f: &Forward) -> String {
    let dst = host_match(f);
    let proto = f.host.protocol.as_str();
    format!(
        "{dst}-p {proto} -m {proto} --dport {} -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW -m comment --comment {tag} ",
        f.host.port
    )
}

/// Comment text that says which attachment a rule belongs to; only characters that need no quoting.
pub fn attachment_tag(id: &AttachmentId) -> String {
    let ifname: String = id
        .ifname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') { c } else { '_' })
        .collect();
    format!("bridge-nat:{}:{}:{}", id.network, id.container_id, ifname)
}

/// Tags hold no spaces or quotes, so they are written (and compared) unquoted.
pub fn comment(tag: &str) -> String {
    format!("-m comment --comment {tag}")
}

fn host_bits(family: Family) -> u8 {
    match family {
        Family::Ipv4 => 32,
        Family::Ipv6 => 128,
    }
}

/// The jumps into the plugin's chains, shared by every attachment on the node. DNAT only applies
/// to packets addressed to the node itself, never to traffic it forwards.
fn global_rules(family: Family) -> Vec<Rule> {
    let c = comment("bridge-nat");
    vec![
        Rule::new(family, "nat", "PREROUTING", format!("-m addrtype --dst-type LOCAL {c} -j {CHAIN_DNAT}")),
        Rule::new(family, "nat", "OUTPUT", format!("-m addrtype --dst-type LOCAL {c} -j {CHAIN_DNAT}")),
        Rule::new(family, "nat", "POSTROUTING", format!("{c} -j {CHAIN_POSTROUTING}")),
        Rule::new(family, "filter", "FORWARD", format!("{c} -j {CHAIN_FORWARD}")),
    ]
}

/// Rules shared by every attachment of one network on one subnet: accepts into and out of the
/// bridge, hairpin and localhost masquerade, and the outbound masquerade.
fn subnet_rules(network: &str, bridge: &str, s: &Subnet) -> Vec<Rule> {
    let family = s.family;
    let subnet = s.subnet;
    let c = comment(&format!("bridge-nat:{network}"));
    let mut rules = vec![
        Rule::new(family, "filter", CHAIN_FORWARD, format!("-i {bridge} {c} -j ACCEPT")),
        Rule::new(
            family,
            "filter",
            CHAIN_FORWARD,
            format!("-o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED {c} -j ACCEPT"),
        ),
        // Hairpin: a pod reaching a forwarded port through the node must get replies via the node.
        Rule::new(
            family,
            "nat",
            CHAIN_POSTROUTING,
            format!("-s {subnet} -o {bridge} -m conntrack --ctstate DNAT {c} -j MASQUERADE"),
        ),
    ];
    if s.localhost {
        rules.push(Rule::new(
            family,
            "nat",
            CHAIN_POSTROUTING,
            format!("-s 127.0.0.0/8 -o {bridge} -m conntrack --ctstate DNAT {c} -j MASQUERADE"),
        ));
    }
    if s.masquerade {
        rules.push(Rule::new(family, "nat", CHAIN_POSTROUTING, format!("-s {subnet} ! -o {bridge} {c} -j MASQUERADE")));
    }
    rules
}

fn forward_rules(family: Family, tag: &str, bridge: &str, f: &Forward) -> Vec<Rule> {
    let c = comment(tag);
    let proto = f.host.protocol.as_str();
    let bits = host_bits(family);
    let dst = match f.host.host_ip {
        Some(ip) => format!("-d {ip}/{bits} "),
        None => String::new(),
    };
    let to = match f.pod_ip {
        IpAddr::V4(ip) => format!("{ip}:{}", f.pod_port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", f.pod_port),
    };
    vec![
        Rule::new(
            family,
            "nat",
            CHAIN_DNAT,
            format!("{dst}-p {proto} -m {proto} --dport {} {c} -j DNAT --to-destination {to}", f.host.port),
        ),
        Rule::new(
            family,
            "filter",
            CHAIN_FORWARD,
            format!(
                "-d {}/{bits} -o {bridge} -p {proto} -m {proto} --dport {} -m conntrack --ctstate DNAT {c} -j ACCEPT",
                f.pod_ip, f.pod_port
            ),
        ),
    ]
}

/// `-d HOST/32 ` (or `/128`) for a forward bound to one host address, as iptables-save prints it.
fn host_match(f: &Forward) -> String {
    f.host.host_ip.map(|ip| format!("-d {ip}/{} ", host_bits(family_of(ip)))).unwrap_or_default()
}

/// New connections to a routed forward's host port get its mark, in the forward's family. With
/// arrival marks, only when no arrival mark was set first: whichever order the two rules run in,
/// the arrival uplink wins.
fn mark_rule(tag: &str, f: &Forward, mask: u32, arrival: bool) -> Rule {
    let mark = f.mark.expect("only marked forwards");
    let dst = host_match(f);
    let proto = f.host.protocol.as_str();
    let unmarked = if arrival { format!("-m mark --mark 0x0/{mask:#x} ") } else { String::new() };
    Rule::new(
        family_of(f.pod_ip),
        "mangle",
        CHAIN_MARK,
        format!(
            "{dst}-p {proto} -m {proto} --dport {} -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW \
             {unmarked}-m comment --comment {tag} -j MARK --set-xmark {mark:#x}/{mask:#x}",
            f.host.port
        ),
    )
}

/// Shared by every marked forward of a family on the node: jumps, restore on established packets
/// (both directions: strict rp_filter validates the client's later packets by the mark too), and
/// save once the connection's first packet carries one of our marks.
fn mark_plumbing(family: Family, mask: u32) -> Vec<Rule> {
    let c = "-m comment --comment bridge-nat";
    vec![
        Rule::new(family, "mangle", "PREROUTING", format!("{c} -j {CHAIN_MARK}")),
        Rule::new(family, "mangle", "POSTROUTING", format!("{c} -j {CHAIN_SAVE}")),
        Rule::new(
            family,
            "mangle",
            CHAIN_MARK,
            format!("-m conntrack --ctstate RELATED,ESTABLISHED {c} -j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}"),
        ),
        Rule::new(
            family,
            "mangle",
            CHAIN_SAVE,
            format!("-m conntrack --ctstate NEW -m mark ! --mark 0x0/{mask:#x} {c} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}"),
        ),
    ]
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "render_props.rs"]
mod props;

#[cfg(test)]
#[path = "render_marks_tests.rs"]
mod marks_tests;
