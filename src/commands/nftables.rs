//! ADD, DEL, CHECK and GC for the nftables backend. A call reads only its own record and the
//! index (never every record), changes the table with one batch of element updates, and leaves
//! shared objects (the table, per-network elements, marks, ip rules, tables) to the last holder.
//! When the kernel disagrees with the records, the table is rebuilt from the records: the slow,
//! O(attachments) path that only crashes and hand edits take.

use super::{apply_routing, apply_sysctls, attachment_id, clear_udp_conntrack, record_for, Needs};
use crate::cni::Env;
use crate::config::{AttachmentId, Backend, NetConf};
use crate::crashpoint;
use crate::error::{Context, Error, Result};
use crate::index::Index;
use crate::nft::elements::{self, Element};
use crate::nft::layout::Mark;
use crate::nft::{self, Nft, Tx};
use crate::plan::{self, Plan};
use crate::routing::apply::{self as routes, Applied};
use crate::routing::netlink::Netlink;
use crate::routing::rt_tables::RtTables;
use crate::routing::IpRule;
use crate::state::{current_boot_id, NftRecord, Record, Status, Store};
use std::collections::BTreeSet;

pub fn open_index(store: &Store) -> Result<Index> {
    Index::open(store.dir(), &current_boot_id()).context("open index")
}

const TABLE_KEY: &str = "table";

fn element_key(e: &Element) -> String {
    format!("elem:{e}")
}

fn mark_key(m: &Mark) -> String {
    format!("mark:{}", m.chain())
}

fn marks_of(n: &NftRecord) -> Vec<Mark> {
    n.marks.iter().map(|&(value, mask)| Mark { value, mask }).collect()
}

/// Routing objects every backend holds in the index, so either backend's DEL knows whether
/// anyone else still needs them.
pub fn routing_keys(rec: &Record) -> Vec<String> {
    let mut keys: Vec<String> = rec.ip_rules.iter().map(|r| format!("iprule:{r}")).collect();
    for t in &rec.tables {
        keys.push(format!("rtable:{}", t.id));
        if let Some(name) = &t.name {
            keys.push(format!("rtname:{}:{name}", t.id));
        }
    }
    keys
}

/// Take holds and claims for a record (idempotent).
pub fn hold_all(index: &Index, rec: &Record) -> Result<()> {
    index.claim(&rec.id, &rec.host_ports)?;
    for k in routing_keys(rec) {
        index.hold(&k, &rec.id)?;
    }
    if let Some(n) = &rec.nft {
        index.hold(TABLE_KEY, &rec.id)?;
        for e in &n.shared {
            index.hold(&element_key(e), &rec.id)?;
        }
        for m in marks_of(n) {
            index.hold(&mark_key(&m), &rec.id)?;
        }
    }
    Ok(())
}

/// The table names that held tables carry, for iproute2.
pub fn held_table_names(index: &Index) -> Result<BTreeSet<(u32, String)>> {
    Ok(index
        .held_keys("rtname:")?
        .into_iter()
        .filter_map(|k| {
            let (id, name) = k.split_once(':')?;
            Some((id.parse().ok()?, name.to_string()))
        })
        .collect())
}

/// Refuse host ports another attachment (of either backend) holds.
fn check_claims(index: &Index, id: &AttachmentId, wanted: &[plan::HostPort]) -> Result<()> {
    for w in wanted {
        let held = index.claims(w, id)?;
        plan::check_host_ports(id, std::slice::from_ref(w), held.iter().map(|(o, h)| (o, std::slice::from_ref(h))))?;
    }
    Ok(())
}

pub fn add(conf: &NetConf, env: &Env, planned: &Plan) -> Result<()> {
    let id = attachment_id(conf, env);
    let contents = elements::plan_contents(conf, planned);
    let store = Store::open(&conf.settings.state_dir).context("open state")?;
    let _lock = store.lock(conf.settings.lock_timeout)?;
    let index = open_index(&store)?;
    if let Some(old) = store.load(&id)?.filter(|r| r.is_live()) {
        if old.backend != Backend::Nftables {
            return Err(Error::invalid_config(format!(
                "{} was added with the iptables backend; DEL it before adding it with nftables",
                plan::describe(&id)
            )));
        }
        // A repeated ADD: remove the old one first, so the node holds exactly the new record.
        remove(&store, &index, &old).context("remove the earlier ADD")?;
    }
    check_claims(&index, &id, &planned.host_ports)?;

    let mut rec = record_for(&id, conf, planned);
    rec.rules.clear();
    rec.backend = Backend::Nftables;
    rec.nft = Some(NftRecord {
        own: contents.own.iter().cloned().collect(),
        shared: contents.shared.iter().cloned().collect(),
        marks: contents.marks.iter().map(|m| (m.value, m.mask)).collect(),
    });
    store.save(&rec).context("record intent")?;
    crashpoint::reached("add:after-intent");
    let others_hold_table = index.is_held(TABLE_KEY)?;
    let mut new_marks = Vec::new();
    for m in &contents.marks {
        if !index.is_held(&mark_key(m))? {
            new_marks.push(*m);
        }
    }
    hold_all(&index, &rec)?;

    let mut applied = Applied::default();
    let mut nft = Nft::open()?;
    let result = apply_sysctls(&planned.sysctls)
        .and_then(|()| install(&mut nft, &store, &rec, others_hold_table, &new_marks))
        .inspect(|()| crashpoint::reached("add:after-firewall"))
        .and_then(|()| apply_routing(planned, &Needs::of(std::iter::once(&rec)), &mut applied))
        .inspect(|_| crashpoint::reached("add:after-routing"));
    let my_routes = match result {
        Ok(r) => r,
        Err(e) => {
            roll_back(&store, &index, &rec, &applied);
            return Err(e.context(format!("add {}", plan::describe(&id))));
        }
    };
    rec.routes = my_routes.into_iter().collect();
    if !rec.tables.is_empty() {
        if let Err(e) = RtTables::system().sync(&held_table_names(&index)?) {
            log::warn!("register table names: {e}");
        }
    }
    rec.status = Status::Applied;
    store.save(&rec).context("record result")?;
    clear_udp_conntrack(&planned.host_ports);
    warn_of_forward_drops(&mut nft);
    log::info!(
        "added: {} forwards as {} nftables elements ({} shared), {} ip rules, {} routes",
        planned.forwards.len(),
        contents.own.len(),
        contents.shared.len(),
        rec.ip_rules.len(),
        rec.routes.len()
    );
    Ok(())
}

/// One batch: the table if it is not there, the shared elements and marks, then our elements.
fn install(nft: &mut Nft, store: &Store, rec: &Record, others_hold_table: bool, new_marks: &[Mark]) -> Result<()> {
    let n = rec.nft.as_ref().expect("nftables record");
    let exists = nft.table_exists()?;
    if !exists && others_hold_table {
        log::warn!("table inet bridge-nat vanished while attachments need it; rebuilding it from the records");
        return rebuild(nft, &live_nft_records(store)?);
    }
    let mut tx = Tx::default();
    if !exists {
        tx.create_table();
    }
    tx.add_elements(&n.shared);
    let marks = if exists { new_marks.to_vec() } else { marks_of(n) };
    for m in &marks {
        tx.add_mark(m);
    }
    tx.add_elements(&n.own);
    nft.commit(tx).or_else(|e| {
        log::warn!("table differs from the records ({e}); rebuilding it from them");
        rebuild(nft, &live_nft_records(store)?)
    })
}

fn live_nft_records(store: &Store) -> Result<Vec<Record>> {
    Ok(store.load_all()?.into_iter().filter(|r| r.is_live() && r.backend == Backend::Nftables).collect())
}

/// Replace the table with exactly what `records` need (no table when none).
pub fn rebuild(nft: &mut Nft, records: &[Record]) -> Result<()> {
    let mut tx = Tx::default();
    if nft.table_exists()? {
        tx.delete_table();
    }
    let (mut own, mut shared, mut marks) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for n in records.iter().filter_map(|r| r.nft.as_ref()) {
        own.extend(n.own.iter());
        shared.extend(n.shared.iter());
        marks.extend(marks_of(n));
    }
    if records.iter().any(|r| r.nft.is_some()) {
        tx.create_table();
        tx.add_elements(shared);
        for m in &marks {
            tx.add_mark(m);
        }
        tx.add_elements(own);
    }
    nft.commit(tx).context("rebuild table inet bridge-nat from the records")
}

/// Undo a failed ADD: our holds, our routing, our elements (by rebuilding without us), our record.
fn roll_back(store: &Store, index: &Index, rec: &Record, applied: &Applied) {
    if let Err(e) = remove(store, index, rec) {
        log::error!("roll back failed ADD: {e}");
    }
    let added: BTreeSet<IpRule> = applied.rules.iter().cloned().collect();
    if !added.is_empty() {
        if let Err(e) = Netlink::open().and_then(|mut nl| routes::remove(&mut nl, &added, &BTreeSet::new())) {
            log::error!("roll back routing after failed ADD: {e}");
        }
    }
    if let Err(e) = store.remove(&rec.id) {
        log::error!("remove record after failed ADD: {e}");
    }
}

pub fn del(store: &Store, rec: &Record) -> Result<()> {
    let index = open_index(store)?;
    remove(store, &index, rec).context(format!("del {}", plan::describe(&rec.id)))?;
    store.remove(&rec.id)?;
    clear_udp_conntrack(&rec.host_ports);
    Ok(())
}

/// Release the record's holds and take out of the node what nobody else holds.
fn remove(store: &Store, index: &Index, rec: &Record) -> Result<()> {
    let id = &rec.id;
    let n = rec.nft.clone().unwrap_or_default();
    let mut gone_shared = Vec::new();
    for e in &n.shared {
        if index.release(&element_key(e), id)? {
            gone_shared.push(e);
        }
    }
    let mut gone_marks = Vec::new();
    for m in marks_of(&n) {
        if index.release(&mark_key(&m), id)? {
            gone_marks.push(m);
        }
    }
    let table_gone = index.release(TABLE_KEY, id)?;
    let mut gone_rules = BTreeSet::new();
    for r in &rec.ip_rules {
        if index.release(&format!("iprule:{r}"), id)? {
            gone_rules.insert(r.clone());
        }
    }
    let mut gone_tables = BTreeSet::new();
    for t in &rec.tables {
        if index.release(&format!("rtable:{}", t.id), id)? {
            gone_tables.insert(t.id);
        }
        if let Some(name) = &t.name {
            index.release(&format!("rtname:{}:{name}", t.id), id)?;
        }
    }
    if !gone_rules.is_empty() || !gone_tables.is_empty() {
        let mut nl = Netlink::open()?;
        routes::remove(&mut nl, &gone_rules, &gone_tables).context("remove policy routing")?;
    }
    crashpoint::reached("del:after-routing");

    let mut nft = Nft::open()?;
    let mut tx = Tx::default();
    if table_gone {
        tx.delete_table();
    } else {
        tx.delete_elements(&n.own);
        tx.delete_elements(gone_shared.iter().copied());
        if !gone_marks.is_empty() {
            let live = nft.rules()?;
            for m in &gone_marks {
                tx.delete_mark(m, &live);
            }
        }
    }
    match nft.commit(tx) {
        Ok(()) => {}
        Err(e) if table_gone && e.details == "ENOENT" => {}
        Err(e) => {
            log::warn!("table differs from the records ({e}); rebuilding it without {}", plan::describe(id));
            let others: Vec<Record> = live_nft_records(store)?.into_iter().filter(|r| &r.id != id).collect();
            rebuild(&mut nft, &others)?;
        }
    }
    crashpoint::reached("del:after-firewall");
    if !gone_tables.is_empty() || rec.tables.iter().any(|t| t.name.is_some()) {
        if let Err(e) = RtTables::system().sync(&held_table_names(index)?) {
            log::warn!("unregister table names: {e}");
        }
    }
    index.unclaim(id, &rec.host_ports)?;
    log::info!(
        "removed {} nftables elements, {} shared ones and {} marks nobody else needs{}, {} ip rules, {} tables",
        n.own.len(),
        gone_shared.len(),
        gone_marks.len(),
        if table_gone { " (and the table, the last attachment gone)" } else { "" },
        gone_rules.len(),
        gone_tables.len()
    );
    Ok(())
}

/// The firewall part of CHECK: the table, its static rules, our marks and every element we need.
pub fn check_firewall(conf: &NetConf, rec: &Record, planned: Option<&Plan>) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let n = rec.nft.clone().unwrap_or_default();
    if let Some(planned) = planned {
        let wanted = elements::plan_contents(conf, planned);
        let recorded: BTreeSet<&Element> = n.own.iter().chain(&n.shared).collect();
        for e in wanted.own.iter().chain(&wanted.shared).filter(|e| !recorded.contains(e)) {
            problems.push(format!("config asks for an element that was not installed: {e}"));
        }
    }
    let elems: Vec<&Element> = n.own.iter().chain(&n.shared).collect();
    let mut nft = Nft::open()?;
    problems.extend(nft::check(&mut nft, &elems, &marks_of(&n))?);
    // Not a CHECK failure: the admin may accept the bridge in that firewall before its policy.
    warn_of_forward_drops(&mut nft);
    Ok(problems)
}

/// Log why forwarded pod traffic may die outside our table, if it may.
fn warn_of_forward_drops(nft: &mut Nft) {
    match nft.dropping_forward_chains() {
        Ok(chains) if chains.is_empty() => {}
        Ok(chains) => log::warn!(
            "forward chain(s) with policy drop: {}; nftables accepts cannot overrule them, so forwarded pod \
             traffic is dropped there (use the iptables backend, or accept the bridge in that firewall)",
            chains.join(", ")
        ),
        Err(e) => log::warn!("look for forward chains that drop by policy: {e}"),
    }
}

/// GC's part: the table and the index, rebuilt from the records that stay.
pub fn gc(store: &Store, kept: &[&Record]) -> Result<()> {
    let index = open_index(store)?;
    index.clear()?;
    for r in kept {
        hold_all(&index, r)?;
    }
    let nft_kept: Vec<Record> = kept.iter().filter(|r| r.backend == Backend::Nftables).map(|r| (*r).clone()).collect();
    rebuild(&mut Nft::open()?, &nft_kept)
}
