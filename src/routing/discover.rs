//! Resolving tables against the live routes: what each table should hold now, per family. The
//! next hop is found as the node's own routing finds it (a default via the uplink in main, else
//! in another table), so a DHCP or router-advertised gateway needs no configuration.

use super::netlink::{self, MainRoute, Netlink};
use super::{Route, TableSpec, MAIN_TABLE};
use crate::error::Result;
use crate::family::Family;
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::net::IpAddr;

const LOCAL_TABLE: u32 = 255;

/// The routes each table should hold now, and what could not be resolved (an uplink that is
/// absent or has no route yet: the pod still comes up, CHECK reports it).
pub fn resolve_tables(nl: &mut Netlink, tables: &BTreeSet<TableSpec>) -> Result<(BTreeSet<Route>, Vec<String>)> {
    let families: BTreeSet<Family> = tables.iter().map(TableSpec::family).collect();
    let all = nl.all_routes(&families.into_iter().collect::<Vec<_>>())?;
    let ours: BTreeSet<u32> = tables.iter().map(|t| t.id).collect();
    let main: Vec<MainRoute> = all.iter().filter(|r| r.table == MAIN_TABLE).cloned().collect();
    // Some edge systems (EVE-OS, some DHCP clients) keep an uplink's default in a table of its own.
    let elsewhere: Vec<MainRoute> = all
        .iter()
        .filter(|r| r.table != MAIN_TABLE && r.table != LOCAL_TABLE && !ours.contains(&r.table))
        .cloned()
        .collect();
    let mut routes = BTreeSet::new();
    let mut warnings = Vec::new();
    let mut warn = |w: String| {
        if !warnings.contains(&w) {
            warnings.push(w);
        }
    };
    for spec in tables {
        let family = spec.family();
        routes.insert(Route { table: spec.id, dst: spec.subnet, gateway: None, dev: spec.bridge.clone() });
        let uplink = &spec.outbound.interface;
        let Some(index) = netlink::link_index(uplink) else {
            warn(format!("uplink {uplink} of table {} is absent: no default route until it appears", spec.id));
            continue;
        };
        let of_family = |r: &&MainRoute| crate::family::family_of(r.dst.ip()) == family;
        let main: Vec<MainRoute> = main.iter().filter(of_family).cloned().collect();
        let elsewhere: Vec<MainRoute> = elsewhere.iter().filter(of_family).cloned().collect();
        // The uplink's own subnets, so clients next to it are answered directly.
        for r in main.iter().filter(|r| r.oif == index && is_on_link(r)) {
            routes.insert(Route { table: spec.id, dst: r.dst, gateway: None, dev: uplink.clone() });
        }
        if let Some(route) = default_route(&main, &elsewhere, spec, index) {
            routes.insert(route);
            continue;
        }
        match family {
            // An uplink without IPv4 (an IPv6-only 5G plan) carries none: nothing is missing, as
            // for IPv6 below. Its pods' IPv4 leaves by a fallback (see health/), or not at all.
            Family::Ipv4 if nl.addresses(index)?.is_empty() => {}
            Family::Ipv4 if is_point_to_point(nl, uplink, index) => {
                routes.insert(device_default(spec));
            }
            Family::Ipv4 => warn(format!(
                "uplink {uplink} of table {} has no gateway (none in main or any other table, and it is not \
                 point-to-point): no default route until one appears",
                spec.id
            )),
            // An uplink without IPv6 (an IPv4-only modem) carries none: nothing is missing.
            Family::Ipv6 if !has_global_ipv6(nl, index)? => {}
            Family::Ipv6 if is_point_to_point(nl, uplink, index) => {
                routes.insert(device_default(spec));
            }
            Family::Ipv6 => warn(format!(
                "uplink {uplink} of table {} has a global IPv6 address but no IPv6 gateway (none in main or any \
                 other table, no router advertisement, no outbound.gateway6): no IPv6 default route until one appears",
                spec.id
            )),
        }
    }
    Ok((routes, warnings))
}

/// A route of the uplink's own networks: IPv4's are of link scope; IPv6's are all of universe
/// scope, so the link-local and multicast prefixes every IPv6 link has are left out by address.
fn is_on_link(r: &MainRoute) -> bool {
    if r.gateway.is_some() || r.dst.prefix() == 0 {
        return false;
    }
    match r.dst {
        IpNetwork::V4(_) => r.scope_link,
        IpNetwork::V6(n) => !is_link_local6(n.network()) && !n.network().is_multicast(),
    }
}

fn is_link_local6(ip: std::net::Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

fn has_global_ipv6(nl: &mut Netlink, index: u32) -> Result<bool> {
    Ok(nl.addresses6(index)?.iter().any(|a| match a.ip() {
        IpAddr::V6(ip) => !is_link_local6(ip) && !ip.is_loopback(),
        IpAddr::V4(_) => false,
    }))
}

/// The next hop an uplink's traffic of `family` goes to, found as a table's default is (main
/// first, then the lowest-metric default via it in another table): for IPv6 often a link-local
/// router from advertisements, whose device is the uplink. None for a point-to-point uplink or
/// none found.
pub fn uplink_gateway(nl: &mut Netlink, uplink: &str, index: u32, family: Family) -> Result<Option<IpAddr>> {
    let all = nl.all_routes(&[family])?;
    let main: Vec<MainRoute> = all.iter().filter(|r| r.table == MAIN_TABLE).cloned().collect();
    let elsewhere: Vec<MainRoute> =
        all.iter().filter(|r| r.table != MAIN_TABLE && r.table != LOCAL_TABLE).cloned().collect();
    let spec = TableSpec {
        id: 0,
        name: None,
        bridge: String::new(),
        subnet: default_destination(family),
        outbound: crate::config::Outbound {
            interface: uplink.to_string(),
            gateway: None,
            gateway6: None,
            use_default_route: false,
        },
    };
    Ok(default_route(&main, &elsewhere, &spec, index).and_then(|r| r.gateway))
}

/// Point-to-point and NOARP links (cellular modems) reach the far end without a gateway; so does
/// an address configured with a peer. Anything else resolves each destination's neighbour, so a
/// device-only default would look like a route and carry nothing.
fn is_point_to_point(nl: &mut Netlink, uplink: &str, index: u32) -> bool {
    const IFF_POINTOPOINT: u32 = 0x10;
    const IFF_NOARP: u32 = 0x80;
    let flags = std::fs::read_to_string(format!("/sys/class/net/{uplink}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    flags & (IFF_POINTOPOINT | IFF_NOARP) != 0 || nl.has_peer_address(index).unwrap_or(false)
}

fn default_destination(family: Family) -> IpNetwork {
    match family {
        Family::Ipv4 => "0.0.0.0/0".parse().expect("valid network"),
        Family::Ipv6 => "::/0".parse().expect("valid network"),
    }
}

fn device_default(spec: &TableSpec) -> Route {
    Route {
        table: spec.id,
        dst: default_destination(spec.family()),
        gateway: None,
        dev: spec.outbound.interface.clone(),
    }
}

/// The table's default route in the spec's family. `main` and `elsewhere` hold routes of that
/// family only. A link-local IPv6 gateway (what router advertisements install) is kept with its
/// device, the uplink, as the kernel needs it.
fn default_route(main: &[MainRoute], elsewhere: &[MainRoute], spec: &TableSpec, index: u32) -> Option<Route> {
    let any = default_destination(spec.family());
    let uplink = &spec.outbound.interface;
    let make = |gateway: Option<IpAddr>, dev: String| Some(Route { table: spec.id, dst: any, gateway, dev });
    let configured = match spec.family() {
        Family::Ipv4 => spec.outbound.gateway.filter(IpAddr::is_ipv4),
        Family::Ipv6 => spec.outbound.gateway6,
    };
    if let Some(gw) = configured {
        return make(Some(gw), uplink.clone());
    }
    if spec.outbound.use_default_route {
        let d = main.iter().filter(|r| r.dst.prefix() == 0).min_by_key(|r| r.metric)?;
        return make(d.gateway, link_name(d.oif)?);
    }
    // A default via this uplink in main first (lowest metric: an IPv6 uplink may hear several
    // routers), then any gateway seen on it in main, then the lowest-metric default via it in
    // another table.
    let on_uplink = || main.iter().filter(|r| r.oif == index);
    let gw = on_uplink()
        .filter(|r| r.dst.prefix() == 0 && r.gateway.is_some())
        .min_by_key(|r| r.metric)
        .or_else(|| on_uplink().find(|r| r.gateway.is_some()))
        .or_else(|| {
            elsewhere
                .iter()
                .filter(|r| r.oif == index && r.dst.prefix() == 0 && r.gateway.is_some())
                .min_by_key(|r| r.metric)
        })
        .and_then(|r| r.gateway);
    match gw {
        Some(gw) => make(Some(gw), uplink.clone()),
        None => None,
    }
}

pub(super) fn link_name(index: u32) -> Option<String> {
    let mut buf = [0u8; nix::libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { nix::libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

#[cfg(test)]
#[path = "discover_tests.rs"]
mod tests;
