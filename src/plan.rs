//! Pure planning: config + prevResult → the forwards, rules and sysctls one attachment needs.
//! Nothing here reads or changes the node, so every rule is unit-tested as text.

use crate::config::{AttachmentId, NetConf, Protocol};
use crate::error::{code, Error, Result};
use crate::firewall::{Family, Rule};
use crate::prev_result::{Attachment, PodAddress};
use crate::routing::{self, RoutingPlan};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;

pub const CHAIN_DNAT: &str = "BRIDGE-NAT-DNAT";
pub const CHAIN_POSTROUTING: &str = "BRIDGE-NAT-POSTRT";
pub const CHAIN_FORWARD: &str = "BRIDGE-NAT-FORWARD";

/// A host port this attachment holds; no two live attachments may hold overlapping ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPort {
    pub port: u16,
    pub protocol: Protocol,
    #[serde(rename = "hostIP")]
    pub host_ip: Option<IpAddr>,
}

impl HostPort {
    /// A wildcard overlaps every address; two specific addresses overlap only when equal.
    pub fn overlaps(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol.as_str()),
            None => write!(f, "{}/{}", self.port, self.protocol.as_str()),
        }
    }
}

/// One DNAT from a host port to a pod port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub host: HostPort,
    pub pod_ip: IpAddr,
    pub pod_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sysctl {
    pub path: String,
    pub value: String,
    /// An uplink's setting may wait for the uplink to appear; the bridge's may not.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

impl Sysctl {
    fn required(path: String) -> Sysctl {
        Sysctl { path, value: "1".into(), required: true }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub bridge: String,
    pub addresses: Vec<PodAddress>,
    pub forwards: Vec<Forward>,
    pub host_ports: Vec<HostPort>,
    pub rules: BTreeSet<Rule>,
    pub sysctls: Vec<Sysctl>,
    pub routing: RoutingPlan,
    /// The bridge's gateway address with the subnet prefix, from prevResult.
    pub gateway: Option<IpNetwork>,
}

pub fn families_of<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<Family> {
    let set: BTreeSet<Family> = rules.map(|r| r.family).collect();
    set.into_iter().collect()
}

pub fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    }
}

/// Build the plan for one attachment.
pub fn plan(conf: &NetConf, id: &AttachmentId, att: &Attachment) -> Result<Plan> {
    let forwards = plan_forwards(conf, att)?;
    let host_ports: Vec<HostPort> = {
        let set: BTreeSet<HostPort> = forwards.iter().map(|f| f.host).collect();
        set.into_iter().collect()
    };
    let mut rules = BTreeSet::new();
    let mut sysctls = BTreeSet::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let addrs: Vec<&PodAddress> = att.addresses.iter().filter(|a| family_of(a.ip) == family).collect();
        if addrs.is_empty() {
            continue;
        }
        rules.extend(global_rules(family));
        let subnets: BTreeSet<String> = addrs.iter().map(|a| a.subnet.to_string()).collect();
        for subnet in &subnets {
            rules.extend(network_rules(family, &conf.name, &att.bridge, subnet, conf.masquerade));
        }
        let tag = attachment_tag(id);
        for f in forwards.iter().filter(|f| family_of(f.pod_ip) == family) {
            rules.extend(forward_rules(family, &tag, &att.bridge, f));
        }
        match family {
            Family::Ipv4 => {
                sysctls.insert(Sysctl::required("/proc/sys/net/ipv4/ip_forward".into()));
                // Lets the node's own 127.0.0.1:hostPort be DNAT'd out of the bridge.
                sysctls.insert(Sysctl::required(format!("/proc/sys/net/ipv4/conf/{}/route_localnet", att.bridge)));
            }
            Family::Ipv6 => {
                sysctls.insert(Sysctl::required("/proc/sys/net/ipv6/conf/all/forwarding".into()));
            }
        }
    }
    let subnets: Vec<IpNetwork> = att.addresses.iter().filter(|a| a.ip.is_ipv4()).map(|a| a.subnet).collect();
    let routing = routing::plan_routing(conf, id, &att.bridge, &subnets, &forwards);
    rules.extend(routing.mangle.iter().cloned());
    for uplink in &routing.uplinks {
        // Strict rp_filter checks a marked connection's source against the mark's table.
        sysctls.insert(Sysctl {
            path: format!("/proc/sys/net/ipv4/conf/{uplink}/src_valid_mark"),
            value: "1".into(),
            required: false,
        });
    }
    let gateway = att
        .addresses
        .iter()
        .find_map(|a| a.gateway.filter(|g| g.is_ipv4()).and_then(|g| IpNetwork::new(g, a.subnet.prefix()).ok()));
    Ok(Plan {
        routing,
        gateway,
        bridge: att.bridge.clone(),
        addresses: att.addresses.clone(),
        forwards,
        host_ports,
        rules,
        sysctls: sysctls.into_iter().collect(),
    })
}

/// The static rules that belong to this attachment, then the runtime's port mappings.
fn plan_forwards(conf: &NetConf, att: &Attachment) -> Result<Vec<Forward>> {
    let mut out = Vec::new();
    for (i, r) in conf.rules.iter().enumerate() {
        let targets: Vec<IpAddr> = match r.dest_ip {
            Some(ip) => {
                if att.subnet_containing(ip).is_none() {
                    let subnets: Vec<String> = att.addresses.iter().map(|a| a.subnet.to_string()).collect();
                    return Err(Error::invalid_config(format!(
                        "portForwarding.rules[{i}].destIP: {ip} is outside the bridge subnet {}",
                        subnets.join(", ")
                    )));
                }
                if !att.owns(ip) {
                    continue;
                }
                vec![ip]
            }
            None => att.addresses.iter().map(|a| a.ip).collect(),
        };
        for ip in targets {
            out.push(Forward {
                host: HostPort { port: r.host_port, protocol: r.protocol, host_ip: None },
                pod_ip: ip,
                pod_port: r.dest_port,
            });
        }
    }
    for m in &conf.port_mappings {
        for a in &att.addresses {
            if m.host_ip.is_some_and(|h| h.is_ipv4() != a.ip.is_ipv4()) {
                continue;
            }
            out.push(Forward {
                host: HostPort { port: m.host_port, protocol: m.protocol, host_ip: m.host_ip },
                pod_ip: a.ip,
                pod_port: m.container_port,
            });
        }
    }
    Ok(out)
}

/// Refuse host ports that another live attachment already holds, naming both owners.
pub fn check_host_ports<'a>(
    id: &AttachmentId,
    wanted: &[HostPort],
    others: impl Iterator<Item = (&'a AttachmentId, &'a [HostPort])>,
) -> Result<()> {
    for (other_id, held) in others {
        if other_id == id {
            continue;
        }
        for w in wanted {
            if let Some(h) = held.iter().find(|h| h.overlaps(w)) {
                return Err(Error::new(
                    code::PORT_CONFLICT,
                    format!("host port {w} for {} is already held as {h} by {}", describe(id), describe(other_id)),
                ));
            }
        }
    }
    Ok(())
}

pub fn describe(id: &AttachmentId) -> String {
    format!("network {:?} container {} interface {}", id.network, id.container_id, id.ifname)
}

/// Comment text that says which attachment a rule belongs to; only characters that need no quoting.
pub(crate) fn attachment_tag(id: &AttachmentId) -> String {
    let ifname: String = id
        .ifname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') { c } else { '_' })
        .collect();
    format!("bridge-nat:{}:{}:{}", id.network, id.container_id, ifname)
}

/// Tags hold no spaces or quotes, so they are written (and compared) unquoted.
fn comment(tag: &str) -> String {
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

/// Rules shared by every attachment of one network on one subnet.
fn network_rules(family: Family, network: &str, bridge: &str, subnet: &str, masquerade: bool) -> Vec<Rule> {
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
    if family == Family::Ipv4 {
        rules.push(Rule::new(
            family,
            "nat",
            CHAIN_POSTROUTING,
            format!("-s 127.0.0.0/8 -o {bridge} -m conntrack --ctstate DNAT {c} -j MASQUERADE"),
        ));
    }
    if masquerade {
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

#[cfg(test)]
pub(crate) mod tests;
