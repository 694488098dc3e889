//! CHECK: lock → read the record → compare with the config → verify the kernel. Changes nothing;
//! every problem is listed.

use super::node::Node;
use super::{attachment_id, kernel};
use crate::backend;
use crate::cni::{prev_result, Env};
use crate::config::NetConf;
use crate::error::{code, Error, Result};
use crate::health::view::healthy_in;
use crate::plan;
use crate::routing::apply as routes;
use crate::routing::egress;
use crate::routing::netlink::Netlink;
use crate::routing::rt_tables::RtTables;
use crate::routing::{IpRule, TableSpec};
use crate::state::{Record, Status};
use std::collections::BTreeSet;

pub fn check(conf: &NetConf, env: &Env) -> Result<()> {
    let id = attachment_id(conf, env);
    let node = Node::open(&conf.settings)?;
    let _lock = node.lock(conf.settings.lock_timeout)?;
    let rec = node.store.load(&id)?.ok_or_else(|| {
        Error::new(code::CHECK_FAILED, format!("no record of {}: ADD never completed here", id.describe()))
    })?;
    let mut problems = Vec::new();
    if rec.status != Status::Applied {
        problems.push("the last ADD did not complete".to_string());
    }
    if !rec.is_live() {
        problems.push("the record is from an earlier boot".to_string());
    }
    let mut fw = backend::open(rec.backend, &conf.settings);
    // The config and prevResult of this CHECK must still describe what was installed.
    if let Some(prev) = &conf.prev_result {
        let planned = plan::plan(conf, &id, &prev_result::parse(prev, conf.bridge.as_deref())?, env.pod.as_ref())?;
        problems.extend(fw.compare(&fw.render(&planned), &rec.firewall));
    }
    problems.extend(fw.verify(&id, &rec.firewall)?);
    problems.extend(super::snat6::problems(&mut *fw, &rec.snat6)?);
    problems.extend(kernel::check_sysctls(&rec.sysctls));
    problems.extend(check_routing(&rec, healthy_in(&conf.settings.state_dir))?);
    // What defeats the objects from outside them, and how it gets repaired, for the log.
    for w in fw.node_warnings(&rec.firewall) {
        log::warn!("{w}");
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        code::CHECK_FAILED,
        format!("check {}: {} problem(s): {}", id.describe(), problems.len(), problems.join("; ")),
    ))
}

/// ip rules, table routes as they should be resolved now, and registered table names.
/// A failed-over source rule is no problem: `healthy` says where the pods leave by now.
pub(super) fn check_routing(
    rec: &Record,
    healthy: impl Fn(&str, crate::family::Family) -> bool,
) -> Result<Vec<String>> {
    let mut nl = Netlink::open()?;
    let recorded: BTreeSet<IpRule> = rec.ip_rules.iter().cloned().collect();
    let ip_rules = egress::resolve_rules(&recorded, rec.egress.iter(), healthy);
    let other_forms: BTreeSet<IpRule> =
        egress::with_variants(&recorded, rec.egress.iter()).difference(&ip_rules).cloned().collect();
    let present: BTreeSet<IpRule> = nl.rules()?.into_iter().collect();
    let tables: BTreeSet<TableSpec> = rec.tables.iter().cloned().collect();
    let mut problems = routes::check(&mut nl, &ip_rules, &tables)?;
    for r in other_forms.intersection(&present) {
        problems.push(format!("unexpected {r}: the pods' own traffic should leave by the uplink health chose"));
    }
    let registered = RtTables::system().registered();
    for t in &rec.tables {
        if let Some(name) = &t.name {
            if !registered.contains(&(t.id, name.clone())) {
                problems.push(format!("table name {name} is not registered for table {}", t.id));
            }
        }
    }
    Ok(problems)
}
