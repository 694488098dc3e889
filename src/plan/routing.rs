//! Which connections are marked, and the ip rules and tables that route by those marks and by the
//! pod subnets. Both families are routed alike: the same marks, table ids and priorities, with an
//! `ip -6 rule` beside each IPv4 one and an IPv6 table (of the same id) beside each IPv4 table.
//! Pure: next hops are resolved against the live uplinks when applied (routing/).

use super::{Forward, HostPort};
use crate::config::{GlobalRouting, NetConf, Outbound, ReplyVia, DEFAULT_RULE_PRIORITY};
use crate::family::{family_of, Family};
use crate::routing::egress::{Egress, EgressUplink};
use crate::routing::{IpRule, TableSpec, MAIN_TABLE};
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingPlan {
    pub ip_rules: BTreeSet<IpRule>,
    pub tables: BTreeSet<TableSpec>,
    /// Uplinks that need `src_valid_mark` so strict rp_filter accepts marked connections (an IPv4
    /// setting: IPv6 has no rp_filter sysctl).
    pub uplinks: BTreeSet<String>,
    /// `replyVia: "arrival"`: the mark a NEW connection to a forwarded port gets from the uplink it
    /// arrived on, for every uplink that has a table here. It overrides the forward's own mark.
    /// The same for both families: each forward is marked in its own.
    pub arrival: Vec<Arrival>,
    /// The pods' own traffic, when `routing.outbound` has a fallback: which uplinks it may leave
    /// by, in order, and by which table (the source rule above is the primary's; health moves it).
    pub egress: Option<Egress>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Arrival {
    pub uplink: String,
    pub mark: u32,
}

/// Every (uplink, mark, table) the routing configuration names: the rules' blocks, then the global
/// block (when it has a fallback mark: a table without a mark cannot be chosen by one). The first
/// mark of an uplink wins; every table of an uplink leaves by it, so the choice changes only which
/// table the reply is looked up in.
fn marked_uplinks(conf: &NetConf) -> Vec<(u32, u32, &Outbound, &Option<String>)> {
    let global = conf.routing.iter().filter_map(|g| g.fwmark.map(|m| (m, g.table_id, &g.outbound, &g.table_name)));
    let rules = conf
        .rules
        .iter()
        .filter_map(|r| r.routing.as_ref())
        .map(|rs| (rs.fwmark, rs.table_id, &rs.outbound, &rs.table_name));
    let mut seen = BTreeSet::new();
    rules.chain(global).filter(|(_, _, o, _)| seen.insert(o.interface.clone())).collect()
}

/// The mark, table and uplink a forward's replies are routed by, if any: the rule's own routing
/// block, else the network's fallback mark. The same for a forward to either family.
fn route_for<'a>(conf: &'a NetConf, host: &HostPort) -> Option<(u32, u32, &'a Outbound, &'a Option<String>)> {
    let own = conf
        .rules
        .iter()
        .find(|r| r.host_port == host.port && r.protocol == host.protocol && host.host_ip.is_none())
        .and_then(|r| r.routing.as_ref());
    match (own, &conf.routing) {
        (Some(rs), _) => Some((rs.fwmark, rs.table_id, &rs.outbound, &rs.table_name)),
        (None, Some(g)) => g.fwmark.map(|m| (m, g.table_id, &g.outbound, &g.table_name)),
        (None, None) => None,
    }
}

pub(super) fn mark_for(conf: &NetConf, host: &HostPort) -> Option<u32> {
    route_for(conf, host).map(|(mark, ..)| mark)
}

impl RoutingPlan {
    /// A mark's ip rule in one family, its table for each subnet of that family, and its uplink.
    #[allow(clippy::too_many_arguments)]
    fn route_by_mark(
        &mut self,
        family: Family,
        priority: u32,
        fwmark: (u32, u32),
        table: u32,
        name: &Option<String>,
        bridge: &str,
        subnets: &[IpNetwork],
        outbound: &Outbound,
    ) {
        let rule = IpRule { family, priority, table, fwmark: Some(fwmark), from: None, suppress_default: false };
        self.ip_rules.insert(rule);
        for subnet in subnets.iter().filter(|s| family_of(s.ip()) == family) {
            self.tables.insert(table_spec(table, name, bridge, *subnet, outbound));
        }
        if family == Family::Ipv4 {
            self.uplinks.insert(outbound.interface.clone());
        }
    }
}

/// The routing objects one attachment needs, given its forwards and its subnets (both families).
pub(super) fn plan_routing(conf: &NetConf, bridge: &str, subnets: &[IpNetwork], forwards: &[Forward]) -> RoutingPlan {
    let mut plan = RoutingPlan::default();
    let mask = conf.settings.mark_mask;
    let priority = conf.routing.as_ref().map_or(DEFAULT_RULE_PRIORITY, |g| g.rule_priority);
    for f in forwards {
        if let Some((mark, table, outbound, name)) = route_for(conf, &f.host) {
            plan.route_by_mark(family_of(f.pod_ip), priority, (mark, mask), table, name, bridge, subnets, outbound);
        }
    }
    // The families a client can arrive in: those of forwards to an address on one of our subnets.
    let inbound: BTreeSet<Family> = forwards
        .iter()
        .map(|f| family_of(f.pod_ip))
        .filter(|fam| subnets.iter().any(|s| family_of(s.ip()) == *fam))
        .collect();
    if conf.reply_via == ReplyVia::Arrival && !inbound.is_empty() {
        for (mark, table, outbound, name) in marked_uplinks(conf) {
            for &family in &inbound {
                plan.route_by_mark(family, priority, (mark, mask), table, name, bridge, subnets, outbound);
            }
            plan.arrival.push(Arrival { uplink: outbound.interface.clone(), mark });
        }
    }
    if let Some(g) = &conf.routing {
        for subnet in subnets {
            let family = family_of(subnet.ip());
            plan.tables.insert(table_spec(g.table_id, &g.table_name, bridge, *subnet, &g.outbound));
            // Networks the node reaches directly keep their main-table routes; only the default
            // route is replaced by the table's.
            plan.ip_rules.insert(IpRule {
                family,
                priority: g.rule_priority + 9,
                table: MAIN_TABLE,
                fwmark: None,
                from: Some(*subnet),
                suppress_default: true,
            });
            plan.ip_rules.insert(IpRule {
                family,
                priority: g.rule_priority + 10,
                table: g.table_id,
                fwmark: None,
                from: Some(*subnet),
                suppress_default: false,
            });
        }
        if subnets.iter().any(|s| s.is_ipv4()) {
            plan.uplinks.insert(g.outbound.interface.clone());
        }
        if !g.fallback.is_empty() && !subnets.is_empty() {
            plan.egress = Some(plan_egress(conf, g, bridge, subnets, &mut plan));
        }
    }
    plan
}

/// The fallback uplinks' tables, held like the others so they are ready before they are needed
/// (a failover then changes one ip rule), and what the agent needs to choose among them.
fn plan_egress(
    conf: &NetConf,
    g: &GlobalRouting,
    bridge: &str,
    subnets: &[IpNetwork],
    plan: &mut RoutingPlan,
) -> Egress {
    let mut uplinks = vec![EgressUplink { interface: g.outbound.interface.clone(), table: g.table_id }];
    for f in &g.fallback {
        for subnet in subnets {
            plan.tables.insert(table_spec(f.table_id, &f.table_name, bridge, *subnet, &f.outbound));
        }
        if subnets.iter().any(|s| s.is_ipv4()) {
            plan.uplinks.insert(f.outbound.interface.clone());
        }
        uplinks.push(EgressUplink { interface: f.outbound.interface.clone(), table: f.table_id });
    }
    Egress {
        network: conf.name.clone(),
        priority: g.rule_priority + 10,
        subnets: subnets.to_vec(),
        uplinks,
        health: g.health.clone(),
    }
}

fn table_spec(id: u32, name: &Option<String>, bridge: &str, subnet: IpNetwork, outbound: &Outbound) -> TableSpec {
    TableSpec { id, name: name.clone(), bridge: bridge.to_string(), subnet, outbound: outbound.clone() }
}
