//! rtnetlink rule and route messages to and from our own types, for both address families.

use super::{IpRule, Route};
use crate::family::{family_of, Family};
use ipnetwork::IpNetwork;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A route of any table, as far as next-hop discovery and our tables need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MainRoute {
    pub dst: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub scope_link: bool,
    pub table: u32,
    pub metric: u32,
}

pub fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::Ipv4 => AddressFamily::Inet,
        Family::Ipv6 => AddressFamily::Inet6,
    }
}

pub fn rule_message(rule: &IpRule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = address_family(rule.family);
    msg.header.action = RuleAction::ToTable;
    msg.header.table = if rule.table < 256 { rule.table as u8 } else { 0 };
    msg.attributes.push(RuleAttribute::Priority(rule.priority));
    msg.attributes.push(RuleAttribute::Table(rule.table));
    if let Some((mark, mask)) = rule.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(net) = rule.from {
        msg.header.src_len = net.prefix();
        msg.attributes.push(RuleAttribute::Source(net.network()));
    }
    if rule.suppress_default {
        msg.attributes.push(RuleAttribute::SuppressPrefixLen(0));
    }
    msg
}

pub fn rule_from_message(msg: &RuleMessage) -> Option<IpRule> {
    if msg.header.action != RuleAction::ToTable {
        return None;
    }
    let family = match msg.header.family {
        AddressFamily::Inet => Family::Ipv4,
        AddressFamily::Inet6 => Family::Ipv6,
        _ => return None,
    };
    let mut rule = IpRule {
        family,
        priority: 0,
        table: u32::from(msg.header.table),
        fwmark: None,
        from: None,
        suppress_default: false,
    };
    let (mut mark, mut mask) = (None, None);
    for a in &msg.attributes {
        match a {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Source(ip) => rule.from = IpNetwork::new(*ip, msg.header.src_len).ok(),
            RuleAttribute::SuppressPrefixLen(0) => rule.suppress_default = true,
            _ => {}
        }
    }
    if let Some(m) = mark.filter(|m| *m != 0) {
        rule.fwmark = Some((m, mask.unwrap_or(u32::MAX)));
    }
    Some(rule)
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// One entry per next hop: a multipath route (IPv6 defaults of several routers of one metric,
/// or an ECMP default) names each uplink and gateway in a next hop of its own.
pub fn routes_from_message(msg: &RouteMessage) -> Vec<MainRoute> {
    let mut dst: IpAddr = match msg.header.address_family {
        AddressFamily::Inet => Ipv4Addr::UNSPECIFIED.into(),
        AddressFamily::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
        _ => return Vec::new(),
    };
    let mut route = MainRoute {
        dst: IpNetwork::new(dst, 0).expect("a zero prefix fits"),
        gateway: None,
        oif: 0,
        scope_link: msg.header.scope == RouteScope::Link,
        table: route_table(msg),
        metric: 0,
    };
    let mut hops: Vec<&RouteNextHop> = Vec::new();
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = ip_of(d).unwrap_or(dst),
            RouteAttribute::Gateway(g) => route.gateway = ip_of(g),
            RouteAttribute::Oif(i) => route.oif = *i,
            RouteAttribute::Priority(m) => route.metric = *m,
            RouteAttribute::MultiPath(h) => hops.extend(h.iter()),
            _ => {}
        }
    }
    let Ok(dst) = IpNetwork::new(dst, msg.header.destination_prefix_length) else { return Vec::new() };
    route.dst = dst;
    if hops.is_empty() {
        return vec![route];
    }
    hops.into_iter()
        .map(|h| {
            let gateway = h.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => ip_of(g),
                _ => None,
            });
            MainRoute { oif: h.interface_index, gateway, ..route.clone() }
        })
        .collect()
}

pub fn route_message(route: &Route, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: address_family(route.family()),
        destination_prefix_length: route.dst.prefix(),
        table: if route.table < 256 { route.table as u8 } else { 0 },
        protocol: RouteProtocol::Static,
        scope: if route.gateway.is_some() { RouteScope::Universe } else { RouteScope::Link },
        kind: RouteType::Unicast,
        ..RouteHeader::default()
    };
    if route.family() == Family::Ipv6 {
        // IPv6 has no link-scope routes: the kernel keeps every IPv6 route at universe scope.
        msg.header.scope = RouteScope::Universe;
    }
    msg.attributes.push(RouteAttribute::Table(route.table));
    if route.dst.prefix() != 0 {
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(route.dst.network())));
    }
    if let Some(gw) = route.gateway.filter(|g| family_of(*g) == route.family()) {
        msg.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if oif != 0 {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_keep_their_family_through_a_message() {
        for (family, from) in [(Family::Ipv4, "10.20.0.0/24"), (Family::Ipv6, "fd00:20::/64")] {
            let rule = IpRule {
                family,
                priority: 110,
                table: 100,
                fwmark: None,
                from: Some(from.parse().unwrap()),
                suppress_default: false,
            };
            let msg = rule_message(&rule);
            assert_eq!(msg.header.family, address_family(family));
            assert_eq!(rule_from_message(&msg), Some(rule));
        }
    }

    #[test]
    fn a_link_local_gateway_and_a_multipath_default_are_read_per_next_hop() {
        let route = Route {
            table: 254,
            dst: "::/0".parse().unwrap(),
            gateway: Some("fe80::1".parse().unwrap()),
            dev: "wan1".into(),
        };
        let msg = route_message(&route, 7);
        let read = routes_from_message(&msg);
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].dst, read[0].gateway, read[0].oif), (route.dst, route.gateway, 7));

        let mut multi = msg.clone();
        multi.attributes.retain(|a| !matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Oif(_)));
        let hop = |oif: u32, gw: &str| {
            let mut h = RouteNextHop::default();
            h.interface_index = oif;
            h.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gw.parse::<IpAddr>().unwrap())));
            h
        };
        multi.attributes.push(RouteAttribute::MultiPath(vec![hop(7, "fe80::1"), hop(8, "fe80::2")]));
        let read: Vec<(u32, Option<IpAddr>)> = routes_from_message(&multi).iter().map(|r| (r.oif, r.gateway)).collect();
        assert_eq!(read, vec![(7, Some("fe80::1".parse().unwrap())), (8, Some("fe80::2".parse().unwrap()))]);
    }
}
