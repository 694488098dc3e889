//! The CNI commands as pipelines: validate → plan → lock → apply as one transaction → record.
//! DEL, CHECK and GC work from the records, never from the runtime's memory.

use crate::cni::Env;
use crate::config::{AttachmentId, NetConf};
use crate::error::{code, Context, Error, Result};
use crate::firewall::iptables::Iptables;
use crate::firewall::{self, Current, Family, Rule};
use crate::config::Protocol;
use crate::conntrack::{self, UdpFlow};
use crate::plan::{self, HostPort, Sysctl};
use crate::prev_result;
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

    /// Take the node from `believed` to `desired`. The fast path trusts the records; when the
    /// kernel disagrees (a flushed chain, a crashed call) the restore fails whole and we diff
    /// against what `iptables-save` reports instead.
    fn converge(&self, believed: Option<Current>, desired: &BTreeSet<Rule>, families: &[Family]) -> Result<()> {
        if let Some(believed) = believed {
            match self.fw.apply(&firewall::diff(&believed, desired), families) {
                Ok(()) => return Ok(()),
                Err(e) => log::warn!("node differs from the records, reconciling from the kernel: {e}"),
            }
        }
        let actual = self.fw.read(families).context("read firewall")?;
        self.fw
            .apply(&firewall::diff(&actual, desired), families)
            .context("apply firewall transaction")
    }
}

fn attachment_id(conf: &NetConf, env: &Env) -> AttachmentId {
    AttachmentId { network: conf.name.clone(), container_id: env.container_id.clone(), ifname: env.ifname.clone() }
}

fn union_rules<'a>(records: impl Iterator<Item = &'a Record>) -> BTreeSet<Rule> {
    records.flat_map(|r| r.rules.iter().cloned()).collect()
}

fn all_families() -> Vec<Family> {
    vec![Family::Ipv4, Family::Ipv6]
}

/// Families touched by either state; ip6tables is only run when IPv6 rules exist or existed.
fn families_for<'a>(a: impl Iterator<Item = &'a Rule>, b: impl Iterator<Item = &'a Rule>) -> Vec<Family> {
    plan::families_of(a.chain(b))
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
    let node = Node::open(conf)?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    let records = node.store.load_all()?;
    let live: Vec<&Record> = records.iter().filter(|r| r.is_live()).collect();
    plan::check_host_ports(
        &id,
        &planned.host_ports,
        live.iter().map(|r| (&r.id, r.host_ports.as_slice())),
    )?;
    let old = live.iter().find(|r| r.id == id).copied();
    let others = || live.iter().copied().filter(|r| r.id != id);
    let before = union_rules(live.iter().copied());
    let desired: BTreeSet<Rule> = union_rules(others()).into_iter().chain(planned.rules.iter().cloned()).collect();
    let families = families_for(before.iter(), desired.iter());
    // A repeated ADD or a half-finished earlier call means the kernel, not the records, is the truth.
    let trust_records = old.is_none() && live.iter().all(|r| r.status == Status::Applied);
    let believed = trust_records.then(|| Current::from_rules(before.iter()));

    let mut rec = Record::new(id.clone(), &conf.cni_version);
    rec.bridge = planned.bridge.clone();
    rec.addresses = planned.addresses.iter().map(|a| a.ip.to_string()).collect();
    rec.host_ports = planned.host_ports.clone();
    rec.rules = planned.rules.iter().cloned().collect();
    rec.sysctls = planned.sysctls.clone();
    node.store.save(&rec).context("record intent")?;

    let applied = apply_sysctls(&planned.sysctls).and_then(|()| node.converge(believed, &desired, &families));
    if let Err(e) = applied {
        roll_back(&node, &before, old, &id);
        return Err(e.context(format!("add {}", plan::describe(&id))));
    }
    rec.status = Status::Applied;
    node.store.save(&rec).context("record result")?;
    mark_applied(&node.store, &live, &id);
    clear_udp_conntrack(&planned.host_ports);
    log::info!(
        "added: {} forwards, {} rules ({} shared with other attachments)",
        planned.forwards.len(),
        planned.rules.len(),
        planned.rules.iter().filter(|r| before.contains(r)).count()
    );
    Ok(prev.clone())
}

/// Put the node and the record back as they were before a failed ADD.
fn roll_back(node: &Node, before: &BTreeSet<Rule>, old: Option<&Record>, id: &AttachmentId) {
    if let Err(e) = node.converge(None, before, &all_families()) {
        log::error!("roll back after failed ADD: {e}");
    }
    let restored = match old {
        Some(r) => node.store.save(r),
        None => node.store.remove(id),
    };
    if let Err(e) = restored {
        log::error!("restore record after failed ADD: {e}");
    }
}

/// Records a reconcile has just made true are no longer in doubt.
fn mark_applied(store: &Store, live: &[&Record], except: &AttachmentId) {
    for r in live.iter().filter(|r| r.status == Status::Applying && &r.id != except) {
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
    let records = node.store.load_all()?;
    let Some(rec) = records.iter().find(|r| r.id == id) else {
        log::info!("no record of {}: nothing to remove", plan::describe(&id));
        return Ok(());
    };
    if rec.is_live() {
        let live: Vec<&Record> = records.iter().filter(|r| r.is_live()).collect();
        let before = union_rules(live.iter().copied());
        let desired = union_rules(live.iter().copied().filter(|r| r.id != id));
        let families = families_for(before.iter(), desired.iter());
        let trust_records = live.iter().all(|r| r.status == Status::Applied);
        let believed = trust_records.then(|| Current::from_rules(before.iter()));
        node.converge(believed, &desired, &families)
            .context(format!("del {}", plan::describe(&id)))?;
        mark_applied(&node.store, &live, &id);
        clear_udp_conntrack(&rec.host_ports);
        log::info!("removed {} rules ({} kept for other attachments)", rec.rules.len(), rec.rules.iter().filter(|r| desired.contains(r)).count());
    } else {
        log::info!("record of {} is from an earlier boot: nothing on the node to remove", plan::describe(&id));
    }
    node.store.remove(&id)
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
    if let Some(prev) = &conf.prev_result {
        let att = prev_result::parse(prev, conf.bridge.as_deref())?;
        let planned = plan::plan(conf, &id, &att)?;
        let recorded: BTreeSet<&Rule> = rec.rules.iter().collect();
        for r in planned.rules.iter().filter(|r| !recorded.contains(r)) {
            problems.push(format!("config asks for a rule that was not installed: {r}"));
        }
    }
    let actual = node.fw.read(&plan::families_of(rec.rules.iter())).context("read firewall")?;
    let present: BTreeSet<&Rule> = actual.rules.iter().collect();
    for r in rec.rules.iter().filter(|r| !present.contains(r)) {
        problems.push(format!("missing rule: {r}"));
    }
    for s in &rec.sysctls {
        match std::fs::read_to_string(&s.path) {
            Ok(v) if v.trim() == s.value => {}
            Ok(v) => problems.push(format!("sysctl {} is {} instead of {}", s.path, v.trim(), s.value)),
            Err(e) => problems.push(format!("sysctl {} unreadable: {e}", s.path)),
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
    let valid: BTreeSet<(String, String)> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let node = Node::open(conf)?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    let records = node.store.load_all()?;
    let is_stale = |r: &Record| {
        r.id.network == conf.name && !valid.contains(&(r.id.container_id.clone(), r.id.ifname.clone()))
    };
    let kept: Vec<&Record> = records.iter().filter(|r| r.is_live() && !is_stale(r)).collect();
    let desired = union_rules(kept.iter().copied());
    // GC always reads the kernel: it is the moment to undo whatever a crash or an admin left.
    node.converge(None, &desired, &all_families()).context("gc")?;
    let mut removed = 0;
    for r in records.iter().filter(|r| is_stale(r) || !r.is_live()) {
        node.store.remove(&r.id)?;
        removed += 1;
    }
    mark_applied(&node.store, &kept, &AttachmentId { network: String::new(), container_id: String::new(), ifname: String::new() });
    log::info!("gc: removed {removed} stale attachment(s), kept {}", kept.len());
    Ok(())
}

pub fn status(conf: &NetConf) -> Result<()> {
    let node = Node::open(conf).map_err(|e| Error::new(code::NOT_AVAILABLE, e.msg))?;
    let _lock = node.store.lock(conf.settings.lock_timeout)?;
    node.fw.usable()
}

/// Flows to these host ports may be pinned to an old pod (or to no pod) by conntrack.
fn clear_udp_conntrack(host_ports: &[HostPort]) {
    let flows: Vec<UdpFlow> = host_ports
        .iter()
        .filter(|h| h.protocol == Protocol::Udp)
        .map(|h| UdpFlow { port: h.port, dst: h.host_ip })
        .collect();
    for v6 in [false, true] {
        let of_family: Vec<UdpFlow> = flows.iter().copied().filter(|f| f.dst.is_none_or(|d| d.is_ipv6() == v6)).collect();
        match conntrack::clear_udp(v6, &of_family) {
            Ok(0) => {}
            Ok(n) => log::info!("cleared {n} stale UDP conntrack entries"),
            Err(e) => log::warn!("clear UDP conntrack entries: {e}"),
        }
    }
}

fn apply_sysctls(sysctls: &[Sysctl]) -> Result<()> {
    for s in sysctls {
        let current = std::fs::read_to_string(&s.path).map_err(|e| Error::io(format!("read sysctl {}", s.path), e))?;
        if current.trim() != s.value {
            std::fs::write(&s.path, &s.value).map_err(|e| Error::io(format!("set sysctl {}", s.path), e))?;
        }
    }
    Ok(())
}
