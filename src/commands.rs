//! The CNI commands as pipelines: validate → plan → lock → apply as one transaction → record.
//! DEL, CHECK and GC work from the records, never from the runtime's memory.

mod nftables;

use crate::cni::Env;
use crate::config::{AttachmentId, Backend, NetConf, Protocol};
use crate::conntrack::{self, UdpFlow};
use crate::crashpoint;
use crate::error::{code, Context, Error, Result};
use crate::firewall::iptables::Iptables;
use crate::firewall::{self, Current, Family, Rule};
use crate::plan::{self, HostPort, Plan, Sysctl};
use crate::prev_result;
use crate::routing::apply::{self as routes, Applied};
use crate::routing::netlink::Netlink;
use crate::routing::rt_tables::RtTables;
use crate::routing::{IpRule, Route, TableSpec};
use crate::state::{Record, Status, Store};
use std::collections::BTreeSet;

/// Everything a node-changing command needs once the config is valid.
struct Node {
    store: Store,
    fw: Iptables,
}

impl Node {
    fn open(conf: &NetConf) -> Result<Node> {
        let store = Store::open(&conf.settings.state_dir).context("open state")?;
        let fw = Iptables::new(&conf.settings.iptables, conf.settings.lock_timeout);
        Ok(Node { store, fw })
    }

    /// Take the node's firewall from `believed` to `desired`. The fast path trusts the records;
    /// when the kernel disagrees (a flushed chain, a crashed call) the restore fails whole and we
    /// diff against what `iptables-save` reports instead.
    fn converge(&self, believed: Option<Current>, desired: &BTreeSet<Rule>, families: &[Family]) -> Result<()> {
        if let Some(believed) = believed {
            match self.fw.apply(&firewall::diff(&believed, desired), families) {
                Ok(()) => return Ok(()),
                Err(e) => log::warn!("node differs from the records, reconciling from the kernel: {e}"),
            }
        }
        let actual = self.fw.read(families).context("read firewall")?;
        self.fw.apply(&firewall::diff(&actual, desired), families).context("apply firewall transaction")
    }
}

/// What a set of records needs from the node, merged: shared pieces appear once.
#[derive(Default)]
struct Needs {
    rules: BTreeSet<Rule>,
    ip_rules: BTreeSet<IpRule>,
    tables: BTreeSet<TableSpec>,
}

impl Needs {
    fn of<'a>(records: impl Iterator<Item = &'a Record>) -> Needs {
        let mut n = Needs::default();
        for r in records {
            n.rules.extend(r.rules.iter().cloned());
            n.ip_rules.extend(r.ip_rules.iter().cloned());
            n.tables.extend(r.tables.iter().cloned());
        }
        n
    }

    fn table_names(&self) -> BTreeSet<(u32, String)> {
        self.tables.iter().filter_map(|t| t.name.clone().map(|n| (t.id, n))).collect()
    }

    fn table_ids(&self) -> BTreeSet<u32> {
        self.tables.iter().map(|t| t.id).collect()
    }

    /// The ip rules and tables `rec` uses that nobody in `self` needs any more.
    fn routing_left_by(&self, rec: &Record) -> (BTreeSet<IpRule>, BTreeSet<u32>) {
        let rules = rec.ip_rules.iter().filter(|r| !self.ip_rules.contains(r)).cloned().collect();
        let used = self.table_ids();
        let tables = rec.tables.iter().map(|t| t.id).filter(|id| !used.contains(id)).collect();
        (rules, tables)
    }
}

fn attachment_id(conf: &NetConf, env: &Env) -> AttachmentId {
    AttachmentId { network: conf.name.clone(), container_id: env.container_id.clone(), ifname: env.ifname.clone() }
}

fn all_families() -> Vec<Family> {
    vec![Family::Ipv4, Family::Ipv6]
}

/// Families touched by either state; ip6tables only runs when IPv6 rules exist or existed.
fn families_for(a: &BTreeSet<Rule>, b: &BTreeSet<Rule>) -> Vec<Family> {
    plan::families_of(a.iter().chain(b.iter()))
}

fn trusted(live: &[&Record]) -> bool {
    live.iter().all(|r| r.status == Status::Applied)
}

fn record_for(id: &AttachmentId, conf: &NetConf, planned: &Plan) -> Record {
    let mut rec = Record::new(id.clone(), &conf.cni_version);
    rec.bridge = planned.bridge.clone();
    rec.addresses = planned.addresses.iter().map(|a| a.ip.to_string()).collect();
    rec.host_ports = planned.host_ports.clone();
    rec.rules = planned.rules.iter().cloned().collect();
    rec.sysctls = planned.sysctls.clone();
    rec.ip_rules = planned.routing.ip_rules.iter().cloned().collect();
    rec.tables = planned.routing.tables.iter().cloned().collect();
    rec
}

pub fn add(conf: &NetConf, env: &Env) -> Result<serde_json::Value> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        Error::invalid_config(
            "prevResult is missing: bridge-nat is a chained plugin; list it after \"bridge\" in the conflist's plugins",
        )
    })?;
    let att = prev_result::parse(prev, conf.bridge.as_deref())?;
    let id = attachment_id(conf, env);
    let planned = plan::plan(conf, &id, &att)?;
    if conf.settings.backend == Backend::Nftables {
        nftables::add(conf, env, &planned)?;
        return Ok(prev.clone());
    }
    let node = Node::open(conf)?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    let records = node.store.load_all()?;
    let live: Vec<&Record> = records.iter().filter(|r| r.is_live()).collect();
    plan::check_host_ports(&id, &planned.host_ports, live.iter().map(|r| (&r.id, r.host_ports.as_slice())))?;
    let old = live.iter().find(|r| r.id == id).copied();
    if old.is_some_and(|r| r.backend != Backend::Iptables) {
        return Err(Error::invalid_config(format!(
            "{} was added with the nftables backend; DEL it before adding it with iptables",
            plan::describe(&id)
        )));
    }
    let before = Needs::of(live.iter().copied());
    let mut after = Needs::of(live.iter().copied().filter(|r| r.id != id));
    after.rules.extend(planned.rules.iter().cloned());
    after.ip_rules.extend(planned.routing.ip_rules.iter().cloned());
    after.tables.extend(planned.routing.tables.iter().cloned());
    // A repeated ADD or a half-finished earlier call means the kernel, not the records, is the truth.
    let believed = (old.is_none() && trusted(&live)).then(|| Current::from_rules(before.rules.iter()));

    let mut rec = record_for(&id, conf, &planned);
    node.store.save(&rec).context("record intent")?;
    crashpoint::reached("add:after-intent");
    let index = nftables::open_index(&node.store)?;
    nftables::hold_all(&index, &rec)?;

    let mut applied = Applied::default();
    let result = apply_sysctls(&planned.sysctls)
        .and_then(|()| node.converge(believed, &after.rules, &families_for(&before.rules, &after.rules)))
        .inspect(|()| crashpoint::reached("add:after-firewall"))
        .and_then(|()| apply_routing(&planned, &after, &mut applied))
        .inspect(|_| crashpoint::reached("add:after-routing"));
    let my_routes = match result {
        Ok(routes) => routes,
        Err(e) => {
            roll_back(&node, &before, old, &id, &applied);
            if old.is_none() {
                release_all(&index, &rec);
            }
            return Err(e.context(format!("add {}", plan::describe(&id))));
        }
    };
    rec.routes = my_routes.into_iter().collect();
    if let Err(e) = RtTables::system().sync(&after.table_names()) {
        log::warn!("register table names: {e}");
    }
    rec.status = Status::Applied;
    node.store.save(&rec).context("record result")?;
    mark_applied(&node.store, &live, Some(&id));
    clear_udp_conntrack(&planned.host_ports);
    log::info!(
        "added: {} forwards, {} firewall rules ({} already there for other attachments), {} ip rules, {} routes",
        planned.forwards.len(),
        planned.rules.len(),
        planned.rules.iter().filter(|r| before.rules.contains(r)).count(),
        rec.ip_rules.len(),
        rec.routes.len()
    );
    Ok(prev.clone())
}

/// Gateway on the bridge, then every table and ip rule the node needs now. Returns the routes of
/// this attachment's tables as installed.
fn apply_routing(planned: &Plan, after: &Needs, applied: &mut Applied) -> Result<BTreeSet<Route>> {
    let mut nl = Netlink::open()?;
    if let Some(gw) = planned.gateway {
        routes::ensure_gateway(&mut nl, &planned.bridge, gw).context("bridge gateway")?;
    }
    if after.ip_rules.is_empty() && after.tables.is_empty() {
        return Ok(BTreeSet::new());
    }
    let (resolved, warnings) = routes::resolve_tables(&mut nl, &after.tables)?;
    for w in warnings {
        log::warn!("{w}; CHECK will report it until it is fixed");
    }
    routes::apply(&mut nl, &after.ip_rules, &resolved, applied).context("policy routing")?;
    let mine: BTreeSet<u32> = planned.routing.tables.iter().map(|t| t.id).collect();
    Ok(resolved.into_iter().filter(|r| mine.contains(&r.table)).collect())
}

/// Put the node and the record back as they were before a failed ADD.
fn roll_back(node: &Node, before: &Needs, old: Option<&Record>, id: &AttachmentId, applied: &Applied) {
    let added_rules: BTreeSet<IpRule> =
        applied.rules.iter().filter(|r| !before.ip_rules.contains(r)).cloned().collect();
    let used = before.table_ids();
    let new_tables: BTreeSet<u32> = applied.routes.iter().map(|r| r.table).filter(|t| !used.contains(t)).collect();
    if let Err(e) = Netlink::open().and_then(|mut nl| routes::remove(&mut nl, &added_rules, &new_tables)) {
        log::error!("roll back routing after failed ADD: {e}");
    }
    if let Err(e) = node.converge(None, &before.rules, &all_families()) {
        log::error!("roll back firewall after failed ADD: {e}");
    }
    let restored = match old {
        Some(r) => node.store.save(r),
        None => node.store.remove(id),
    };
    if let Err(e) = restored {
        log::error!("restore record after failed ADD: {e}");
    }
}

/// Drop an iptables-backend record's claims and routing holds from the index.
fn release_all(index: &crate::index::Index, rec: &Record) {
    let released = index
        .unclaim(&rec.id, &rec.host_ports)
        .and_then(|()| nftables::routing_keys(rec).iter().try_for_each(|k| index.release(k, &rec.id).map(|_| ())));
    if let Err(e) = released {
        log::warn!("release index entries: {e}");
    }
}

/// Records a reconcile has just made true are no longer in doubt.
fn mark_applied(store: &Store, live: &[&Record], except: Option<&AttachmentId>) {
    for r in live.iter().filter(|r| r.status == Status::Applying && Some(&r.id) != except) {
        let mut r = (*r).clone();
        r.status = Status::Applied;
        if let Err(e) = store.save(&r) {
            log::warn!("mark record applied: {e}");
        }
    }
}

pub fn del(conf: &NetConf, env: &Env) -> Result<()> {
    let id = attachment_id(conf, env);
    let node = Node::open(conf)?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    // The nftables backend never needs the other records: decide from ours alone.
    if let Ok(Some(rec)) = node.store.load(&id) {
        if rec.is_live() && rec.backend == Backend::Nftables {
            return nftables::del(&node.store, &rec);
        }
    }
    let records = node.store.load_all()?;
    let Some(rec) = records.iter().find(|r| r.id == id) else {
        // load_all skips unreadable files: a file that is there but not loaded is corrupt.
        if node.store.exists(&id) {
            let why = node.store.load(&id).err().unwrap_or_else(|| Error::new(code::IO, "record unreadable"));
            return del_without_record(conf, &node, &records, &id, why);
        }
        log::info!("no record of {}: nothing to remove", plan::describe(&id));
        return Ok(());
    };
    if !rec.is_live() {
        log::info!("record of {} is from an earlier boot: nothing on the node to remove", plan::describe(&id));
        return node.store.remove(&id);
    }
    let live: Vec<&Record> = records.iter().filter(|r| r.is_live()).collect();
    let before = Needs::of(live.iter().copied());
    let after = Needs::of(live.iter().copied().filter(|r| r.id != id));
    let (ip_rules, stale_tables) = after.routing_left_by(rec);
    if !ip_rules.is_empty() || !stale_tables.is_empty() {
        let mut nl = Netlink::open()?;
        routes::remove(&mut nl, &ip_rules, &stale_tables).context("remove policy routing")?;
    }
    crashpoint::reached("del:after-routing");
    let believed = trusted(&live).then(|| Current::from_rules(before.rules.iter()));
    node.converge(believed, &after.rules, &families_for(&before.rules, &after.rules))
        .context(format!("del {}", plan::describe(&id)))?;
    crashpoint::reached("del:after-firewall");
    if let Err(e) = RtTables::system().sync(&after.table_names()) {
        log::warn!("unregister table names: {e}");
    }
    release_all(&nftables::open_index(&node.store)?, rec);
    node.store.remove(&id)?;
    mark_applied(&node.store, &live, Some(&id));
    clear_udp_conntrack(&rec.host_ports);
    log::info!(
        "removed {} firewall rules ({} kept for other attachments), {} ip rules, {} tables",
        rec.rules.len(),
        rec.rules.iter().filter(|r| after.rules.contains(r)).count(),
        ip_rules.len(),
        stale_tables.len()
    );
    Ok(())
}

/// The record exists but cannot be read: remove whatever no readable record needs, judged from the
/// kernel (rules tagged for this attachment) and the config (its tables and marks).
fn del_without_record(conf: &NetConf, node: &Node, records: &[Record], id: &AttachmentId, why: Error) -> Result<()> {
    log::warn!("{why}; reconciling the node from the kernel and the config instead");
    let kept = Needs::of(records.iter().filter(|r| r.is_live() && &r.id != id));
    let mut nl = Netlink::open()?;
    remove_unowned_routing(&mut nl, conf, &kept)?;
    node.converge(None, &kept.rules, &all_families()).context(format!("del {}", plan::describe(id)))?;
    let mut nft = crate::nft::Nft::open()?;
    if nft.table_exists()? {
        let others: Vec<Record> =
            records.iter().filter(|r| r.is_live() && r.backend == Backend::Nftables && &r.id != id).cloned().collect();
        nftables::rebuild(&mut nft, &others).context(format!("del {}", plan::describe(id)))?;
    }
    nftables::open_index(&node.store)?.release_everywhere(id)?;
    node.store.remove(id)
}

/// ip rules and tables this network's config gives the plugin, that no kept record needs: what a
/// lost or corrupt record would otherwise leak.
fn remove_unowned_routing(nl: &mut Netlink, conf: &NetConf, kept: &Needs) -> Result<()> {
    let mut tables: BTreeSet<u32> =
        conf.rules.iter().filter_map(|r| r.routing.as_ref().map(|rs| rs.table_id)).collect();
    tables.extend(conf.routing.as_ref().map(|g| g.table_id));
    if tables.is_empty() {
        return Ok(());
    }
    let suppress_priority = conf.routing.as_ref().map(|g| g.rule_priority + 9);
    let ours = |r: &IpRule| {
        tables.contains(&r.table) || (r.suppress_default && Some(r.priority) == suppress_priority && r.from.is_some())
    };
    let stale_rules: BTreeSet<IpRule> =
        nl.rules()?.into_iter().filter(|r| ours(r) && !kept.ip_rules.contains(r)).collect();
    let used = kept.table_ids();
    let stale_tables: BTreeSet<u32> = tables.into_iter().filter(|t| !used.contains(t)).collect();
    routes::remove(nl, &stale_rules, &stale_tables).context("remove unowned policy routing")
}

pub fn check(conf: &NetConf, env: &Env) -> Result<()> {
    let id = attachment_id(conf, env);
    let node = Node::open(conf)?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    let rec = node.store.load(&id)?.ok_or_else(|| {
        Error::new(code::CHECK_FAILED, format!("no record of {}: ADD never completed here", plan::describe(&id)))
    })?;
    let mut problems = Vec::new();
    if rec.status != Status::Applied {
        problems.push("the last ADD did not complete".to_string());
    }
    if !rec.is_live() {
        problems.push("the record is from an earlier boot".to_string());
    }
    // The config and prevResult of this CHECK must still describe what was installed.
    let planned = match &conf.prev_result {
        Some(prev) => Some(plan::plan(conf, &id, &prev_result::parse(prev, conf.bridge.as_deref())?)?),
        None => None,
    };
    if rec.backend == Backend::Nftables {
        problems.extend(nftables::check_firewall(conf, &rec, planned.as_ref())?);
    } else {
        if let Some(planned) = &planned {
            let recorded: BTreeSet<&Rule> = rec.rules.iter().collect();
            for r in planned.rules.iter().filter(|r| !recorded.contains(r)) {
                problems.push(format!("config asks for a rule that was not installed: {r}"));
            }
        }
        let actual = node.fw.read(&plan::families_of(rec.rules.iter())).context("read firewall")?;
        let present: BTreeSet<&Rule> = actual.rules.iter().collect();
        for r in rec.rules.iter().filter(|r| !present.contains(r)) {
            problems.push(format!("missing firewall rule: {r}"));
        }
    }
    for s in &rec.sysctls {
        match std::fs::read_to_string(&s.path) {
            Ok(v) if v.trim() == s.value => {}
            Ok(v) => problems.push(format!("sysctl {} is {} instead of {}", s.path, v.trim(), s.value)),
            Err(e) => problems.push(format!("sysctl {} unreadable: {e}", s.path)),
        }
    }
    let mut nl = Netlink::open()?;
    let ip_rules: BTreeSet<IpRule> = rec.ip_rules.iter().cloned().collect();
    let tables: BTreeSet<TableSpec> = rec.tables.iter().cloned().collect();
    problems.extend(routes::check(&mut nl, &ip_rules, &tables)?);
    let registered = RtTables::system().registered();
    for t in &rec.tables {
        if let Some(name) = &t.name {
            if !registered.contains(&(t.id, name.clone())) {
                problems.push(format!("table name {name} is not registered for table {}", t.id));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        code::CHECK_FAILED,
        format!("check {}: {} problem(s): {}", plan::describe(&id), problems.len(), problems.join("; ")),
    ))
}

pub fn gc(conf: &NetConf) -> Result<()> {
    let valid: BTreeSet<(String, String)> =
        conf.valid_attachments.iter().flatten().map(|a| (a.container_id.clone(), a.ifname.clone())).collect();
    let node = Node::open(conf)?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    let records = node.store.load_all()?;
    let is_stale =
        |r: &Record| r.id.network == conf.name && !valid.contains(&(r.id.container_id.clone(), r.id.ifname.clone()));
    let kept: Vec<&Record> = records.iter().filter(|r| r.is_live() && !is_stale(r)).collect();
    let after = Needs::of(kept.iter().copied());
    let mut nl = Netlink::open()?;
    for r in records.iter().filter(|r| r.is_live() && is_stale(r)) {
        let (ip_rules, stale_tables) = after.routing_left_by(r);
        routes::remove(&mut nl, &ip_rules, &stale_tables).context("gc policy routing")?;
    }
    remove_unowned_routing(&mut nl, conf, &after).context("gc")?;
    // GC always reads the kernel: it is the moment to undo whatever a crash or an admin left.
    node.converge(None, &after.rules, &all_families()).context("gc")?;
    nftables::gc(&node.store, &kept).context("gc")?;
    if let Err(e) = RtTables::system().sync(&after.table_names()) {
        log::warn!("gc table names: {e}");
    }
    let mut removed = node.store.remove_unreadable(&conf.name)?;
    for r in records.iter().filter(|r| is_stale(r) || !r.is_live()) {
        node.store.remove(&r.id)?;
        removed += 1;
    }
    mark_applied(&node.store, &kept, None);
    log::info!("gc: removed {removed} stale attachment(s), kept {}", kept.len());
    Ok(())
}

pub fn status(conf: &NetConf) -> Result<()> {
    let node = Node::open(conf).map_err(|e| Error::new(code::NOT_AVAILABLE, e.msg))?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    node.store.probe_writable().map_err(|e| Error::new(code::NOT_AVAILABLE, e.msg))?;
    match conf.settings.backend {
        Backend::Iptables => node.fw.usable(),
        Backend::Nftables => crate::nft::Nft::open()
            .and_then(|mut nft| nft.table_exists())
            .map(|_| ())
            .map_err(|e| Error::new(code::NOT_AVAILABLE, format!("nftables unusable: {}", e.msg))),
    }
}

/// Flows to these host ports may be pinned to an old pod (or to no pod) by conntrack. Only flows
/// addressed to the node are touched, not traffic it forwards to the same port elsewhere.
fn clear_udp_conntrack(host_ports: &[HostPort]) {
    let udp: Vec<&HostPort> = host_ports.iter().filter(|h| h.protocol == Protocol::Udp).collect();
    if udp.is_empty() {
        return;
    }
    let local = match Netlink::open().and_then(|mut nl| nl.local_addresses()) {
        Ok(addrs) => addrs,
        Err(e) => return log::warn!("clear UDP conntrack entries: list the node's addresses: {e}"),
    };
    let flows: Vec<UdpFlow> = udp
        .iter()
        .flat_map(|h| match h.host_ip {
            Some(ip) => vec![UdpFlow { port: h.port, dst: Some(ip) }],
            None => local.iter().map(|ip| UdpFlow { port: h.port, dst: Some(*ip) }).collect(),
        })
        .collect();
    for v6 in [false, true] {
        let of_family: Vec<UdpFlow> =
            flows.iter().copied().filter(|f| f.dst.is_none_or(|d| d.is_ipv6() == v6)).collect();
        match conntrack::clear_udp(v6, &of_family) {
            Ok(0) => {}
            Ok(n) => log::info!("cleared {n} stale UDP conntrack entries"),
            Err(e) => log::warn!("clear UDP conntrack entries: {e}"),
        }
    }
}

fn apply_sysctls(sysctls: &[Sysctl]) -> Result<()> {
    for s in sysctls {
        let current = match std::fs::read_to_string(&s.path) {
            Ok(v) => v,
            Err(e) if !s.required && e.kind() == std::io::ErrorKind::NotFound => {
                log::warn!("sysctl {} not there yet (interface absent?); CHECK will report it", s.path);
                continue;
            }
            Err(e) => return Err(Error::io(format!("read sysctl {}", s.path), e)),
        };
        if current.trim() != s.value {
            std::fs::write(&s.path, &s.value).map_err(|e| Error::io(format!("set sysctl {}", s.path), e))?;
        }
    }
    Ok(())
}
