//! Pure planning: config + prevResult → what one attachment needs, in the product's own terms:
//! forwards, what its network needs, marks, ip rules, tables and sysctls. No firewall syntax here:
//! each backend renders a plan into its own kernel objects (backend/*/render.rs).

mod routing;
pub mod snat6;

use crate::cni::prev_result::{Attachment, PodAddress};
use crate::cni::Pod;
use crate::config::{AttachmentId, NetConf, Protocol};
use crate::error::{code, Error, Result};
use ipnetwork::IpNetwork;
pub use routing::RoutingPlan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;

pub use crate::family::{family_of, Family};

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

/// One DNAT from a host port to a pod port; `mark` routes its replies (either family). Recorded as
/// planned, so `bridge-nat list` can show what forwards where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Forward {
    pub host: HostPort,
    #[serde(rename = "podIP")]
    pub pod_ip: IpAddr,
    pub pod_port: u16,
    pub mark: Option<u32>,
}

/// What every attachment of one network on one subnet needs, shared between them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Subnet {
    pub family: Family,
    pub subnet: IpNetwork,
    /// Masquerade what leaves the subnet by any other interface.
    pub masquerade: bool,
    /// The node's own 127.0.0.1:hostPort reaches pods (IPv4 only: ::1 cannot be routed out).
    pub localhost: bool,
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
    pub id: AttachmentId,
    pub bridge: String,
    pub addresses: Vec<PodAddress>,
    /// Forwarding into the bridge, hairpin and masquerade, per subnet of the attachment.
    pub subnets: Vec<Subnet>,
    pub forwards: Vec<Forward>,
    pub host_ports: Vec<HostPort>,
    pub sysctls: Vec<Sysctl>,
    pub routing: RoutingPlan,
    /// The bridge's gateway address with the subnet prefix, from prevResult.
    pub gateway: Option<IpNetwork>,
    /// The mark bits the plugin may use; every forward's mark fits inside.
    pub mark_mask: u32,
    /// Indexes of the config's static rules this attachment got a forward from.
    pub bound_rules: Vec<usize>,
}

impl Plan {
    /// Address families this attachment uses.
    pub fn families(&self) -> Vec<Family> {
        let set: BTreeSet<Family> = self.subnets.iter().map(|s| s.family).collect();
        set.into_iter().collect()
    }
}

/// Build the plan for one attachment; `pod` is the pod the runtime named in `CNI_ARGS`, if any.
pub fn plan(conf: &NetConf, id: &AttachmentId, att: &Attachment, pod: Option<&Pod>) -> Result<Plan> {
    let (forwards, bound_rules) = plan_forwards(conf, att, pod)?;
    let host_ports: Vec<HostPort> = {
        let set: BTreeSet<HostPort> = forwards.iter().map(|f| f.host).collect();
        set.into_iter().collect()
    };
    let subnets: BTreeSet<Subnet> = att
        .addresses
        .iter()
        .map(|a| Subnet {
            family: family_of(a.ip),
            subnet: a.subnet,
            masquerade: conf.masquerade,
            localhost: a.ip.is_ipv4(),
        })
        .collect();
    let mut sysctls = BTreeSet::new();
    for family in subnets.iter().map(|s| s.family).collect::<BTreeSet<_>>() {
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
    let routed_subnets: Vec<IpNetwork> = att.addresses.iter().map(|a| a.subnet).collect();
    let routing = routing::plan_routing(conf, &att.bridge, &routed_subnets, &forwards);
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
        id: id.clone(),
        routing,
        gateway,
        bridge: att.bridge.clone(),
        addresses: att.addresses.clone(),
        subnets: subnets.into_iter().collect(),
        forwards,
        host_ports,
        sysctls: sysctls.into_iter().collect(),
        mark_mask: conf.settings.mark_mask,
        bound_rules,
    })
}

/// The static rules that belong to this attachment, then the runtime's port mappings; and which
/// static rules those were. A rule with a `pod` belongs only to that pod's attachment; one with a
/// `destIP` only to the attachment holding it; with both, both must hold; with neither, to all.
fn plan_forwards(conf: &NetConf, att: &Attachment, pod: Option<&Pod>) -> Result<(Vec<Forward>, Vec<usize>)> {
    let mut out = Vec::new();
    let mut bound = Vec::new();
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
        if r.pod.as_ref().is_some_and(|want| !pod.is_some_and(|p| want.matches(p))) {
            continue;
        }
        bound.push(i);
        for ip in targets {
            let host = HostPort { port: r.host_port, protocol: r.protocol, host_ip: None };
            out.push(Forward { host, pod_ip: ip, pod_port: r.dest_port, mark: routing::mark_for(conf, &host) });
        }
    }
    for m in &conf.port_mappings {
        for a in &att.addresses {
            if m.host_ip.is_some_and(|h| h.is_ipv4() != a.ip.is_ipv4()) {
                continue;
            }
            let host = HostPort { port: m.host_port, protocol: m.protocol, host_ip: m.host_ip };
            out.push(Forward { host, pod_ip: a.ip, pod_port: m.container_port, mark: routing::mark_for(conf, &host) });
        }
    }
    Ok((out, bound))
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
                    format!("host port {w} for {} is already held as {h} by {}", id.describe(), other_id.describe()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
