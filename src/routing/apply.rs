//! Resolving tables against the live main table, and changing or verifying ip rules and routes.

use super::netlink::{self, MainRoute, Netlink};
use super::{IpRule, Route, TableSpec, MAIN_TABLE};
use crate::error::Result;
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The routes each table should hold now, and what could not be resolved (an uplink that is
/// absent or has no route yet: the pod still comes up, CHECK reports it).
pub fn resolve_tables(nl: &mut Netlink, tables: &BTreeSet<TableSpec>) -> Result<(BTreeSet<Route>, Vec<String>)> {
    let all = nl.all_routes()?;
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
    for spec in tables {
        routes.insert(Route { table: spec.id, dst: spec.subnet, gateway: None, dev: spec.bridge.clone() });
        let uplink = &spec.outbound.interface;
        let Some(index) = netlink::link_index(uplink) else {
            warnings.push(format!("uplink {uplink} of table {} is absent: no default route until it appears", spec.id));
            continue;
        };
        // The uplink's own subnets, so clients next to it are answered directly.
        for r in main.iter().filter(|r| r.oif == index && r.gateway.is_none() && r.scope_link && r.dst.prefix() > 0) {
            routes.insert(Route { table: spec.id, dst: r.dst, gateway: None, dev: uplink.clone() });
        }
        let p2p = || is_point_to_point(nl, uplink, index);
        match default_route(&main, &elsewhere, spec, index, p2p) {
            Some(route) => {
                routes.insert(route);
            }
            None => warnings.push(format!(
                "uplink {uplink} of table {} has no gateway (none in main or any other table, and it is not \
                 point-to-point): no default route until one appears",
                spec.id
            )),
        }
    }
    Ok((routes, warnings))
}

const LOCAL_TABLE: u32 = 255;

/// The next hop an uplink's traffic goes to, found as a table's default is (main first, then the
/// lowest-metric default via it in another table); None for a point-to-point uplink or none found.
pub fn uplink_gateway(nl: &mut Netlink, uplink: &str, index: u32) -> Result<Option<IpAddr>> {
    let all = nl.all_routes()?;
    let main: Vec<MainRoute> = all.iter().filter(|r| r.table == MAIN_TABLE).cloned().collect();
    let elsewhere: Vec<MainRoute> =
        all.iter().filter(|r| r.table != MAIN_TABLE && r.table != LOCAL_TABLE).cloned().collect();
    let spec = TableSpec {
        id: 0,
        name: None,
        bridge: String::new(),
        subnet: "0.0.0.0/0".parse().expect("valid network"),
        outbound: crate::config::Outbound { interface: uplink.to_string(), gateway: None, use_default_route: false },
    };
    Ok(default_route(&main, &elsewhere, &spec, index, || false).and_then(|r| r.gateway))
}

/// Point-to-point and NOARP links (cellular modems) reach the far end without a gateway; so does
/// an address configured with a peer. Anything else ARPs for each destination, so a device-only
/// default would look like a route and carry nothing.
fn is_point_to_point(nl: &mut Netlink, uplink: &str, index: u32) -> bool {
    const IFF_POINTOPOINT: u32 = 0x10;
    const IFF_NOARP: u32 = 0x80;
    let flags = std::fs::read_to_string(format!("/sys/class/net/{uplink}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    flags & (IFF_POINTOPOINT | IFF_NOARP) != 0 || nl.has_peer_address(index).unwrap_or(false)
}

fn default_route(
    main: &[MainRoute],
    elsewhere: &[MainRoute],
    spec: &TableSpec,
    index: u32,
    point_to_point: impl FnOnce() -> bool,
) -> Option<Route> {
    let any: IpNetwork = "0.0.0.0/0".parse().expect("valid network");
    let uplink = &spec.outbound.interface;
    let make = |gateway: Option<IpAddr>, dev: String| Some(Route { table: spec.id, dst: any, gateway, dev });
    if let Some(gw) = spec.outbound.gateway {
        return make(Some(gw), uplink.clone());
    }
    if spec.outbound.use_default_route {
        let d = main.iter().find(|r| r.dst.prefix() == 0)?;
        return make(d.gateway, link_name(d.oif)?);
    }
    // A default via this uplink in main first, then any gateway seen on it in main, then the
    // lowest-metric default via it in another table.
    let on_uplink = || main.iter().filter(|r| r.oif == index);
    let gw = on_uplink()
        .find(|r| r.dst.prefix() == 0 && r.gateway.is_some())
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
        None if point_to_point() => make(None, uplink.clone()),
        None => None,
    }
}

fn link_name(index: u32) -> Option<String> {
    let mut buf = [0u8; nix::libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { nix::libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// What one apply changed, so a failed ADD can undo exactly that.
#[derive(Debug, Default)]
pub struct Applied {
    pub rules: Vec<IpRule>,
    pub routes: Vec<Route>,
}

/// Add the missing ip rules and install the routes (replacing a stale next hop).
pub fn apply(
    nl: &mut Netlink,
    rules: &BTreeSet<IpRule>,
    routes: &BTreeSet<Route>,
    applied: &mut Applied,
) -> Result<()> {
    let existing: BTreeSet<IpRule> = nl.rules()?.into_iter().collect();
    for rule in rules.iter().filter(|r| !existing.contains(r)) {
        match nl.add_rule(rule) {
            Ok(()) => applied.rules.push(rule.clone()),
            Err(e) if netlink::is_exists(&e) => {}
            Err(e) => return Err(e),
        }
    }
    for route in routes {
        match netlink::link_index(&route.dev) {
            Some(oif) => {
                nl.replace_route(route, oif)?;
                applied.routes.push(route.clone());
            }
            None => log::warn!("{route}: device absent, not installed"),
        }
    }
    Ok(())
}

/// Remove ip rules (duplicates too) and empty whole tables; what is already gone is fine. Tables
/// are flushed rather than emptied route by route so that a call killed between installing and
/// recording routes leaves nothing behind: their ids belong to this plugin by configuration.
pub fn remove(nl: &mut Netlink, rules: &BTreeSet<IpRule>, tables: &BTreeSet<u32>) -> Result<()> {
    for rule in rules {
        loop {
            match nl.del_rule(rule) {
                Ok(()) => continue,
                Err(e) if netlink::is_absent(&e) => break,
                Err(e) => return Err(e),
            }
        }
    }
    for &table in tables {
        for r in nl.routes(table)? {
            let route = Route { table, dst: r.dst, gateway: r.gateway, dev: String::new() };
            match nl.del_route(&route) {
                Ok(()) => {}
                Err(e) if netlink::is_absent(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Every rule present, every table holding the routes it should have now.
pub fn check(nl: &mut Netlink, rules: &BTreeSet<IpRule>, tables: &BTreeSet<TableSpec>) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let existing: BTreeSet<IpRule> = nl.rules()?.into_iter().collect();
    for rule in rules.iter().filter(|r| !existing.contains(r)) {
        problems.push(format!("missing {rule}"));
    }
    let (wanted, warnings) = resolve_tables(nl, tables)?;
    problems.extend(warnings);
    let table_ids: BTreeSet<u32> = wanted.iter().map(|r| r.table).collect();
    for table in table_ids {
        let actual = nl.routes(table)?;
        for want in wanted.iter().filter(|r| r.table == table) {
            let index = netlink::link_index(&want.dev).unwrap_or(0);
            let found = actual.iter().any(|a| a.dst == want.dst && a.gateway == want.gateway && a.oif == index);
            if !found {
                problems.push(format!("missing {want}"));
            }
        }
    }
    Ok(problems)
}

/// The bridge must carry the gateway address pods route through (the bridge plugin usually has
/// set it already; a bridge re-created by hand may lack it).
pub fn ensure_gateway(nl: &mut Netlink, bridge: &str, gateway: IpNetwork) -> Result<()> {
    let Some(index) = netlink::link_index(bridge) else {
        return Err(crate::error::Error::new(crate::error::code::ROUTING, format!("bridge {bridge} does not exist")));
    };
    if nl.addresses(index)?.iter().any(|a| a.ip() == gateway.ip()) {
        return Ok(());
    }
    match nl.add_address(index, gateway) {
        Err(e) if !netlink::is_exists(&e) => Err(e),
        _ => {
            log::info!("added gateway {gateway} to bridge {bridge}");
            Ok(())
        }
    }
}

/// Make ip rules and tables what they should be now (the repair path): add missing ip rules,
/// remove rules into our tables that nobody needs, install missing routes and remove stale ones
/// (an old gateway, a subnet the uplink no longer has). Returns the repairs made and what could
/// not be resolved (an absent uplink, no next hop).
pub fn repair(
    nl: &mut Netlink,
    rules: &BTreeSet<IpRule>,
    tables: &BTreeSet<TableSpec>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut repairs = Vec::new();
    let ours: BTreeSet<u32> = tables.iter().map(|t| t.id).collect();
    let existing = nl.rules()?;
    for rule in rules.iter().filter(|r| !existing.contains(r)) {
        match nl.add_rule(rule) {
            Ok(()) => repairs.push(format!("added {rule}")),
            Err(e) if netlink::is_exists(&e) => {}
            Err(e) => return Err(e),
        }
    }
    for rule in existing.iter().filter(|r| ours.contains(&r.table) && r.table != MAIN_TABLE && !rules.contains(r)) {
        match nl.del_rule(rule) {
            Ok(()) => repairs.push(format!("removed {rule} (no record needs it)")),
            Err(e) if netlink::is_absent(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let (wanted, unresolved) = resolve_tables(nl, tables)?;
    for table in ours {
        let actual = nl.routes(table)?;
        let wanted_here: Vec<&Route> = wanted.iter().filter(|r| r.table == table).collect();
        for want in &wanted_here {
            let Some(oif) = netlink::link_index(&want.dev) else { continue };
            if !actual.iter().any(|a| a.dst == want.dst && a.gateway == want.gateway && a.oif == oif) {
                nl.replace_route(want, oif)?;
                repairs.push(format!("installed {want}"));
            }
        }
        for a in &actual {
            let wanted = wanted_here
                .iter()
                .any(|w| w.dst == a.dst && w.gateway == a.gateway && netlink::link_index(&w.dev) == Some(a.oif));
            let replaced = wanted_here.iter().any(|w| w.dst == a.dst);
            if !wanted && !replaced {
                let route = Route { table, dst: a.dst, gateway: a.gateway, dev: link_name(a.oif).unwrap_or_default() };
                match nl.del_route(&route) {
                    Ok(()) => repairs.push(format!("removed stale {route}")),
                    Err(e) if netlink::is_absent(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok((repairs, unresolved))
}
