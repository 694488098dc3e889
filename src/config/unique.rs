//! What must be unique across a network's config: host ports (with `hostIP` overlapping the
//! wildcard), marks, table ids and table names, fallback uplinks' tables included.

use super::{GlobalRouting, PortMapping, PortRule, Protocol};
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

fn invalid(msg: String) -> Error {
    Error::invalid_config(msg)
}

pub(super) fn check_unique_host_ports(rules: &[PortRule], mappings: &[PortMapping]) -> Result<()> {
    let mut seen: HashMap<(u16, Protocol, Option<IpAddr>), String> = HashMap::new();
    let claims = rules
        .iter()
        .enumerate()
        .map(|(i, r)| ((r.host_port, r.protocol, None), format!("portForwarding.rules[{i}] ({:?})", r.name)))
        .chain(
            mappings
                .iter()
                .enumerate()
                .map(|(i, m)| ((m.host_port, m.protocol, m.host_ip), format!("runtimeConfig.portMappings[{i}]"))),
        );
    for (key, who) in claims {
        let clash = seen.iter().find(|((port, proto, ip), _)| {
            *port == key.0 && *proto == key.1 && (ip.is_none() || key.2.is_none() || *ip == key.2)
        });
        if let Some((_, other)) = clash {
            return Err(invalid(format!(
                "{who}: host port {}/{} is already claimed by {other}",
                key.0,
                key.1.as_str()
            )));
        }
        seen.insert(key, who);
    }
    Ok(())
}

pub(super) fn check_unique_marks_and_tables(global: Option<&GlobalRouting>, rules: &[PortRule]) -> Result<()> {
    let mut marks: HashMap<u32, String> = HashMap::new();
    let mut tables: HashMap<u32, String> = HashMap::new();
    let mut names: HashSet<(String, u32)> = HashSet::new();
    let mut claim_name = |name: &Option<String>, id: u32, who: &str| -> Result<()> {
        if let Some(n) = name {
            if let Some((_, other_id)) = names.iter().find(|(m, i)| m == n && *i != id) {
                return Err(invalid(format!("{who}.tableName: {n:?} already names table {other_id}")));
            }
            names.insert((n.clone(), id));
        }
        Ok(())
    };
    if let Some(g) = global {
        tables.insert(g.table_id, "routing".into());
        if let Some(m) = g.fwmark {
            marks.insert(m, "routing".into());
        }
        claim_name(&g.table_name, g.table_id, "routing")?;
    }
    for (i, r) in rules.iter().enumerate() {
        let Some(rs) = &r.routing else { continue };
        let who = format!("portForwarding.rules[{i}].routing");
        if let Some(other) = marks.insert(rs.fwmark, who.clone()) {
            return Err(invalid(format!("{who}.fwmark: {:#x} is already used by {other}", rs.fwmark)));
        }
        if let Some(other) = tables.insert(rs.table_id, who.clone()) {
            return Err(invalid(format!("{who}.tableId: {} is already used by {other}", rs.table_id)));
        }
        claim_name(&rs.table_name, rs.table_id, &who)?;
    }
    for (i, f) in global.iter().flat_map(|g| g.fallback.iter()).enumerate() {
        let own_rule = |r: &PortRule| {
            r.routing
                .as_ref()
                .is_some_and(|rs| rs.table_id == f.table_id && rs.outbound.interface == f.outbound.interface)
        };
        match tables.get(&f.table_id) {
            Some(_) if rules.iter().any(own_rule) => {}
            Some(other) => {
                return Err(invalid(format!(
                    "routing.outbound.fallback[{i}]: {:?} gets table {} (routing.tableId + {}), already used by {other}; give the uplink a table in a rule's routing block",
                    f.outbound.interface,
                    f.table_id,
                    i + 1
                )))
            }
            None => {
                tables.insert(f.table_id, format!("routing.outbound.fallback[{i}]"));
            }
        }
    }
    Ok(())
}
