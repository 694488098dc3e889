//! Multi-uplink policy routing: marks on new inbound connections, ip rules from marks and from
//! the pod subnet to per-uplink tables, and the tables' routes.
//!
//! `plan_routing` is pure; `apply` resolves next hops against the live main table and changes the
//! kernel over rtnetlink; `rt_tables` registers table names for iproute2.

pub mod apply;
pub mod netlink;
pub mod rt_tables;

use crate::config::{AttachmentId, NetConf, Outbound};
use crate::firewall::{Family, Rule};
use crate::plan::Forward;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

pub const CHAIN_MARK: &str = "BRIDGE-NAT-MARK";
pub const CHAIN_SAVE: &str = "BRIDGE-NAT-SAVE";

/// One `ip rule`. Only IPv4 is policy-routed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpRule {
    pub priority: u32,
    pub table: u32,
    /// (mark, mask)
    pub fwmark: Option<(u32, u32)>,
    pub from: Option<IpNetwork>,
    /// `suppress_prefixlength 0`: use the table but not its default route.
    pub suppress_default: bool,
}

impl std::fmt::Display for IpRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ip rule priority {}", self.priority)?;
        if let Some(net) = self.from {
            write!(f, " from {net}")?;
        }
        if let Some((m, mask)) = self.fwmark {
            write!(f, " fwmark {m:#x}/{mask:#x}")?;
        }
        write!(f, " lookup {}", self.table)?;
        if self.suppress_default {
            write!(f, " suppress_prefixlength 0")?;
        }
        Ok(())
    }
}

/// A table this network needs: the bridge subnet, the uplink's own subnets and a default route
/// out of the uplink. Next hops are resolved when applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableSpec {
    pub id: u32,
    pub name: Option<String>,
    pub bridge: String,
    pub subnet: IpNetwork,
    pub outbound: Outbound,
}

/// A route as installed in one of our tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub table: u32,
    pub dst: IpNetwork,
    pub gateway: Option<std::net::IpAddr>,
    pub dev: String,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "route {} ", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, "via {gw} ")?;
        }
        write!(f, "dev {} table {}", self.dev, self.table)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingPlan {
    pub ip_rules: BTreeSet<IpRule>,
    pub tables: BTreeSet<TableSpec>,
    /// mangle rules (marking, CONNMARK save/restore), applied with the other firewall rules.
    pub mangle: BTreeSet<Rule>,
    /// Uplinks that need `src_valid_mark` so strict rp_filter accepts marked connections.
    pub uplinks: BTreeSet<String>,
}

/// Which mark and table (if any) a forward's replies are routed by.
pub(crate) fn route_for_forward<'a>(
    conf: &'a NetConf,
    f: &Forward,
) -> Option<(u32, u32, &'a Outbound, &'a Option<String>)> {
    if !f.pod_ip.is_ipv4() {
        return None;
    }
    let own = conf
        .rules
        .iter()
        .find(|r| r.host_port == f.host.port && r.protocol == f.host.protocol && f.host.host_ip.is_none())
        .and_then(|r| r.routing.as_ref());
    match (own, &conf.routing) {
        (Some(rs), _) => Some((rs.fwmark, rs.table_id, &rs.outbound, &rs.table_name)),
        (None, Some(g)) => g.fwmark.map(|m| (m, g.table_id, &g.outbound, &g.table_name)),
        (None, None) => None,
    }
}

/// The routing objects one attachment needs, given its forwards and its IPv4 subnets.
pub fn plan_routing(
    conf: &NetConf,
    id: &AttachmentId,
    bridge: &str,
    subnets: &[IpNetwork],
    forwards: &[Forward],
) -> RoutingPlan {
    let mut plan = RoutingPlan::default();
    let mask = conf.settings.mark_mask;
    let priority = conf.routing.as_ref().map_or(crate::config::DEFAULT_RULE_PRIORITY, |g| g.rule_priority);
    let tag = crate::plan::attachment_tag(id);
    for f in forwards {
        let Some((mark, table, outbound, name)) = route_for_forward(conf, f) else {
            continue;
        };
        let dst = f.host.host_ip.map(|ip| format!("-d {ip}/32 ")).unwrap_or_default();
        let proto = f.host.protocol.as_str();
        plan.mangle.insert(Rule::new(
            Family::Ipv4,
            "mangle",
            CHAIN_MARK,
            format!(
                "{dst}-p {proto} -m {proto} --dport {} -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW \
                 -m comment --comment {tag} -j MARK --set-xmark {mark:#x}/{mask:#x}",
                f.host.port
            ),
        ));
        plan.ip_rules.insert(IpRule {
            priority,
            table,
            fwmark: Some((mark, mask)),
            from: None,
            suppress_default: false,
        });
        for subnet in subnets {
            plan.tables.insert(TableSpec {
                id: table,
                name: name.clone(),
                bridge: bridge.to_string(),
                subnet: *subnet,
                outbound: outbound.clone(),
            });
        }
        plan.uplinks.insert(outbound.interface.clone());
    }
    if let Some(g) = &conf.routing {
        for subnet in subnets {
            plan.tables.insert(TableSpec {
                id: g.table_id,
                name: g.table_name.clone(),
                bridge: bridge.to_string(),
                subnet: *subnet,
                outbound: g.outbound.clone(),
            });
            // Networks the node reaches directly keep their main-table routes; only the default
            // route is replaced by the table's.
            plan.ip_rules.insert(IpRule {
                priority: g.rule_priority + 9,
                table: MAIN_TABLE,
                fwmark: None,
                from: Some(*subnet),
                suppress_default: true,
            });
            plan.ip_rules.insert(IpRule {
                priority: g.rule_priority + 10,
                table: g.table_id,
                fwmark: None,
                from: Some(*subnet),
                suppress_default: false,
            });
        }
        plan.uplinks.insert(g.outbound.interface.clone());
    }
    if !plan.mangle.is_empty() {
        plan.mangle.extend(mark_plumbing(mask));
    }
    plan
}

pub const MAIN_TABLE: u32 = 254;

/// Shared by every marked forward on the node: jumps, restore on established packets (both
/// directions: strict rp_filter validates the client's later packets by the mark too), and save
/// once the connection's first packet carries one of our marks.
fn mark_plumbing(mask: u32) -> Vec<Rule> {
    let c = "-m comment --comment bridge-nat";
    vec![
        Rule::new(Family::Ipv4, "mangle", "PREROUTING", format!("{c} -j {CHAIN_MARK}")),
        Rule::new(Family::Ipv4, "mangle", "POSTROUTING", format!("{c} -j {CHAIN_SAVE}")),
        Rule::new(
            Family::Ipv4,
            "mangle",
            CHAIN_MARK,
            format!("-m conntrack --ctstate RELATED,ESTABLISHED {c} -j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}"),
        ),
        Rule::new(
            Family::Ipv4,
            "mangle",
            CHAIN_SAVE,
            format!("-m conntrack --ctstate NEW -m mark ! --mark 0x0/{mask:#x} {c} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}"),
        ),
    ]
}
