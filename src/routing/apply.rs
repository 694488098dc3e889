//! Changing or verifying ip rules and routes of both families; what the tables should hold is
//! resolved in discover.rs.

use super::discover::link_name;
pub use super::discover::{resolve_tables, uplink_gateway};
use super::netlink::{self, Netlink};
use super::{IpRule, Route, TableSpec, MAIN_TABLE};
use crate::error::Result;
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;

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
