//! The node as a whole, from the records: `check_node` lists what differs (changes nothing, takes no
//! lock), `reconcile` makes the kernel equal to the live records under the lock. The agent runs
//! the first on every change and the second only when the first finds something.

use super::check::check_routing;
use super::kernel;
use super::node::Node;
use super::snat6;
use crate::backend::{self, Converge, Objects};
use crate::config::{AttachmentId, Settings};
use crate::error::{Context, Result};
use crate::health::view::healthy_in;
use crate::routing::apply as routes;
use crate::routing::netlink::Netlink;
use crate::routing::{IpRule, TableSpec};
use crate::state::{Record, Status};
use std::collections::BTreeSet;

/// What one pass found or did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// One line per change made to the kernel.
    pub repairs: Vec<String>,
    /// What could not be made right (an uplink absent, no next hop, a failed repair).
    pub unresolved: Vec<String>,
}

/// Problems per attachment, as CHECK would report them, without the lock.
pub fn problems_per_attachment(settings: &Settings) -> Result<Vec<(AttachmentId, Vec<String>)>> {
    let records = Node::open(settings)?.store.load_all()?;
    problems_of(settings, &records.iter().filter(|r| r.is_live()).collect::<Vec<_>>())
}

/// [`problems_per_attachment`] for records already read (the agent keeps them in memory).
pub fn problems_of(settings: &Settings, records: &[&Record]) -> Result<Vec<(AttachmentId, Vec<String>)>> {
    let mut out = Vec::new();
    // One backend of each kind for the whole pass: what they read of the node, they read once.
    let mut backends = backend::every(settings);
    let healthy = healthy_in(&settings.state_dir);
    for rec in records {
        let mut problems = Vec::new();
        if rec.status != Status::Applied {
            problems.push("the last ADD did not complete".to_string());
        }
        let fw = backends.iter_mut().find(|f| f.kind() == rec.backend).expect("every backend kind is open");
        problems.extend(fw.verify(&rec.id, &rec.firewall)?);
        problems.extend(snat6::problems(&mut **fw, &rec.snat6)?);
        problems.extend(kernel::check_sysctls(&rec.sysctls));
        problems.extend(check_routing(rec, &healthy)?);
        out.push((rec.id.clone(), problems));
    }
    Ok(out)
}

/// What differs in the node's policy routing and uplink settings, for all records at once: each
/// rule, table and sysctl once, however many attachments hold it, so the cost follows the
/// number of uplinks, not of pods.
pub fn routing_problems(settings: &Settings, records: &[&Record]) -> Result<Vec<String>> {
    let ip_rules = node_rules(settings, records);
    let tables: BTreeSet<TableSpec> = records.iter().flat_map(|r| r.tables.iter().cloned()).collect();
    let sysctls: BTreeSet<_> = records.iter().flat_map(|r| r.sysctls.iter().cloned()).collect();
    let mut problems = kernel::check_sysctls(&sysctls.into_iter().collect::<Vec<_>>());
    // An uplink renumbered is an address notice, which brings the agent here.
    for mut fw in backend::every(settings) {
        let nats: Vec<_> = records.iter().filter(|r| r.backend == fw.kind()).flat_map(|r| r.snat6.clone()).collect();
        problems.extend(snat6::problems(&mut *fw, &nats)?);
    }
    if ip_rules.is_empty() && tables.is_empty() {
        return Ok(problems);
    }
    problems.extend(routes::check(&mut Netlink::open()?, &ip_rules, &tables)?);
    let registered = crate::routing::rt_tables::RtTables::system().registered();
    for t in &tables {
        if let Some(name) = t.name.as_ref().filter(|n| !registered.contains(&(t.id, n.to_string()))) {
            problems.push(format!("table name {name} is not registered for table {}", t.id));
        }
    }
    Ok(problems)
}

/// Every record's ip rules, the pods' source rules pointed where uplink health says.
fn node_rules(settings: &Settings, records: &[&Record]) -> BTreeSet<IpRule> {
    let recorded: BTreeSet<IpRule> = records.iter().flat_map(|r| r.ip_rules.iter().cloned()).collect();
    let egress: BTreeSet<&crate::routing::egress::Egress> = records.iter().filter_map(|r| r.egress.as_ref()).collect();
    crate::routing::egress::resolve_rules(&recorded, egress, healthy_in(&settings.state_dir))
}

/// Converge the kernel to exactly what the live records say, under the node lock.
pub fn reconcile(settings: &Settings) -> Result<Report> {
    let node = Node::open(settings)?;
    let _lock = node.lock(settings.lock_timeout)?;
    let records: Vec<Record> = node.store.load_all()?.into_iter().filter(|r| r.is_live()).collect();
    let mut report = Report::default();
    for mut fw in backend::every(settings) {
        let mine: Vec<(&AttachmentId, &Objects)> =
            records.iter().filter(|r| r.backend == fw.kind()).map(|r| (&r.id, &r.firewall)).collect();
        match fw.converge(&mine, Converge::Repair) {
            Ok(lines) => report.repairs.extend(lines),
            Err(e) => report.unresolved.push(format!("{} firewall: {e}", fw.kind().name())),
        }
        // After the converge: a rebuilt nftables table starts without its map's elements.
        let nats: Vec<_> = records.iter().filter(|r| r.backend == fw.kind()).flat_map(|r| r.snat6.clone()).collect();
        match snat6::repair(&mut *fw, &nats) {
            Ok(lines) => report.repairs.extend(lines),
            Err(e) => report.unresolved.push(format!("{} firewall: {e}", fw.kind().name())),
        }
    }
    let sysctls: BTreeSet<_> = records.iter().flat_map(|r| r.sysctls.iter().cloned()).collect();
    for s in sysctls {
        if kernel::check_sysctls(std::slice::from_ref(&s)).is_empty() {
            continue;
        }
        match kernel::apply_sysctls(std::slice::from_ref(&s)) {
            Ok(()) if kernel::check_sysctls(std::slice::from_ref(&s)).is_empty() => {
                report.repairs.push(format!("set sysctl {} to {}", s.path, s.value))
            }
            Ok(()) => report.unresolved.push(format!("sysctl {} cannot be set yet (interface absent?)", s.path)),
            Err(e) => report.unresolved.push(e.to_string()),
        }
    }
    let ip_rules = node_rules(settings, &records.iter().collect::<Vec<_>>());
    let tables: BTreeSet<TableSpec> = records.iter().flat_map(|r| r.tables.iter().cloned()).collect();
    if !ip_rules.is_empty() || !tables.is_empty() {
        let mut nl = Netlink::open()?;
        let (repairs, unresolved) = routes::repair(&mut nl, &ip_rules, &tables).context("repair policy routing")?;
        report.repairs.extend(repairs);
        report.unresolved.extend(unresolved);
    }
    let names: BTreeSet<(u32, String)> = tables.iter().filter_map(|t| t.name.clone().map(|n| (t.id, n))).collect();
    let registered = crate::routing::rt_tables::RtTables::system().registered();
    if !names.is_subset(&registered) {
        match kernel::register_table_names(&names) {
            Ok(()) => report.repairs.push("registered table names for iproute2".to_string()),
            Err(e) => report.unresolved.push(format!("register table names: {e}")),
        }
    }
    node.mark_applied(&records.iter().collect::<Vec<_>>());
    for r in &report.repairs {
        log::info!("repaired: {r}");
    }
    for u in &report.unresolved {
        log::warn!("not right yet: {u}");
    }
    Ok(report)
}
