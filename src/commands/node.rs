//! The steps every pipeline shares, in one place: the state (records, index, lock), holds on
//! shared objects, installing and removing one attachment with its fallback to a rebuild from the
//! records, and undoing a failed ADD.

use super::kernel;
use crate::backend::{Converge, Firewall, Objects};
use crate::config::{AttachmentId, Backend, Settings};
use crate::error::{Context, Result};
use crate::plan::snat6::Snat6;
use crate::plan::{self, HostPort};
use crate::routing::apply::Applied;
use crate::routing::IpRule;
use crate::state::{current_boot_id, Index, Lock, Record, Status, Store};
use std::collections::BTreeSet;
use std::time::Duration;

pub struct Node {
    pub store: Store,
    pub index: Index,
}

/// Keys of shared objects an attachment holds, split by who acts on them.
#[derive(Debug, Default)]
pub struct Keys {
    pub firewall: BTreeSet<String>,
    pub ip_rules: BTreeSet<IpRule>,
    pub tables: BTreeSet<u32>,
    /// IPv6 source NATs (commands/snat6.rs) nobody else holds.
    pub snat6: Vec<Snat6>,
}

fn ip_rule_key(r: &IpRule) -> String {
    format!("iprule:{r}")
}

fn table_key(id: u32) -> String {
    format!("rtable:{id}")
}

fn table_name_key(id: u32, name: &str) -> String {
    format!("rtname:{id}:{name}")
}

/// Held by every attachment that got a forward from static rule `index` of `network`.
pub fn rule_key(network: &str, index: usize) -> String {
    format!("rule:{network}:{index}")
}

impl Node {
    pub fn open(settings: &Settings) -> Result<Node> {
        let store = Store::open(&settings.state_dir).context("open state")?;
        let index = Index::open(store.dir(), &current_boot_id()).context("open index")?;
        Ok(Node { store, index })
    }

    pub fn lock(&self, timeout: Duration) -> Result<Lock> {
        self.store.lock(timeout)
    }

    /// Refuse host ports another attachment (of either backend) holds.
    pub fn check_claims(&self, id: &AttachmentId, wanted: &[HostPort]) -> Result<()> {
        for w in wanted {
            let held = self.index.claims(w, id)?;
            let others = held.iter().map(|(o, h)| (o, std::slice::from_ref(h)));
            plan::check_host_ports(id, std::slice::from_ref(w), others)?;
        }
        Ok(())
    }

    /// Take the record's claims and holds (idempotent); returns the keys nobody held before.
    pub fn hold(&self, fw: &dyn Firewall, rec: &Record) -> Result<Keys> {
        self.index.claim(&rec.id, &rec.host_ports)?;
        let mut first = Keys::default();
        for k in fw.shared_keys(&rec.id, &rec.firewall) {
            if !self.index.is_held(&k)? {
                first.firewall.insert(k.clone());
            }
            self.index.hold(&k, &rec.id)?;
        }
        for r in &rec.ip_rules {
            self.index.hold(&ip_rule_key(r), &rec.id)?;
        }
        for t in &rec.tables {
            self.index.hold(&table_key(t.id), &rec.id)?;
            if let Some(name) = &t.name {
                self.index.hold(&table_name_key(t.id, name), &rec.id)?;
            }
        }
        for &i in &rec.bound_rules {
            self.index.hold(&rule_key(&rec.id.network, i), &rec.id)?;
        }
        for s in &rec.snat6 {
            self.index.hold(&fw.snat6_key(s), &rec.id)?;
        }
        Ok(first)
    }

    /// Drop the record's claims and holds; returns the keys nobody holds any more.
    pub fn release(&self, fw: &dyn Firewall, rec: &Record) -> Result<Keys> {
        let mut last = Keys::default();
        for k in fw.shared_keys(&rec.id, &rec.firewall) {
            if self.index.release(&k, &rec.id)? {
                last.firewall.insert(k);
            }
        }
        for r in &rec.ip_rules {
            if self.index.release(&ip_rule_key(r), &rec.id)? {
                last.ip_rules.insert(r.clone());
            }
        }
        for t in &rec.tables {
            if self.index.release(&table_key(t.id), &rec.id)? {
                last.tables.insert(t.id);
            }
            if let Some(name) = &t.name {
                self.index.release(&table_name_key(t.id, name), &rec.id)?;
            }
        }
        for &i in &rec.bound_rules {
            self.index.release(&rule_key(&rec.id.network, i), &rec.id)?;
        }
        for s in &rec.snat6 {
            if self.index.release(&fw.snat6_key(s), &rec.id)? {
                last.snat6.push(s.spec());
            }
        }
        self.index.unclaim(&rec.id, &rec.host_ports)?;
        Ok(last)
    }

    /// Re-take every hold from the records alone (GC): the index is a cache of them.
    pub fn rebuild_index(&self, fw_of: impl Fn(Backend) -> Box<dyn Firewall>, records: &[&Record]) -> Result<()> {
        self.index.clear()?;
        for r in records {
            self.hold(&*fw_of(r.backend), r)?;
        }
        Ok(())
    }

    /// Which ip rules and tables of `rec` nobody holds (after a rebuilt index).
    pub fn unheld_routing(&self, rec: &Record) -> Result<(BTreeSet<IpRule>, BTreeSet<u32>)> {
        let mut rules = BTreeSet::new();
        for r in &rec.ip_rules {
            if !self.index.is_held(&ip_rule_key(r))? {
                rules.insert(r.clone());
            }
        }
        let mut tables = BTreeSet::new();
        for t in &rec.tables {
            if !self.index.is_held(&table_key(t.id))? {
                tables.insert(t.id);
            }
        }
        Ok((rules, tables))
    }

    /// The table names held tables carry, for iproute2.
    pub fn held_table_names(&self) -> Result<BTreeSet<(u32, String)>> {
        Ok(self
            .index
            .held_keys("rtname:")?
            .into_iter()
            .filter_map(|k| {
                let (id, name) = k.split_once(':')?;
                Some((id.parse().ok()?, name.to_string()))
            })
            .collect())
    }

    pub fn sync_table_names(&self) {
        if let Err(e) = self.held_table_names().and_then(|names| kernel::register_table_names(&names)) {
            log::warn!("register table names: {e}");
        }
    }

    /// Every live record of one backend except `except`: the slow path's input.
    pub fn live_records(&self, kind: Backend, except: Option<&AttachmentId>) -> Result<Vec<Record>> {
        Ok(self
            .store
            .load_all()?
            .into_iter()
            .filter(|r| r.is_live() && r.backend == kind && Some(&r.id) != except)
            .collect())
    }

    /// Bring the backend's kernel objects to exactly `records`.
    pub fn rebuild(&self, fw: &mut dyn Firewall, records: &[Record]) -> Result<Vec<String>> {
        let all: Vec<(&AttachmentId, &Objects)> = records.iter().map(|r| (&r.id, &r.firewall)).collect();
        let mut repairs = fw.converge(&all, Converge::Rebuild)?;
        // A rebuilt nftables table starts with an empty map of IPv6 source addresses.
        let nats: Vec<Snat6> = records.iter().flat_map(|r| r.snat6.iter().cloned()).collect();
        match super::snat6::repair(fw, &nats) {
            Ok(lines) => repairs.extend(lines),
            Err(e) => log::warn!("{e}; the next reconcile sets them"),
        }
        Ok(repairs)
    }

    /// Install one attachment; when the kernel differs from the records, rebuild from them all.
    pub fn install(&self, fw: &mut dyn Firewall, rec: &Record, first: &Keys) -> Result<()> {
        match fw.install(&rec.id, &rec.firewall, &first.firewall) {
            Ok(()) => Ok(()),
            Err(e) => {
                log::warn!(
                    "node differs from the records ({e}); rebuilding the {} firewall from them",
                    fw.kind().name()
                );
                let records = self.live_records(fw.kind(), None)?;
                self.rebuild(fw, &records).map(|_| ())
            }
        }
    }

    /// Take one attachment off the node: holds, routing nobody else needs, then its firewall
    /// objects (rebuilding without it when the kernel differs from the records).
    pub fn remove(&self, fw: &mut dyn Firewall, rec: &Record) -> Result<()> {
        let last = self.release(fw, rec)?;
        // Whichever uplink the pods were leaving by, their source rule goes with its last holder.
        kernel::remove_routing(
            &crate::routing::egress::with_variants(&last.ip_rules, rec.egress.iter()),
            &last.tables,
        )?;
        crate::crashpoint::reached("del:after-routing");
        // Before the firewall objects: the last one out deletes the nftables table with the map.
        // A failure does not fail the DEL (the runtime must be able to remove the pod); it is said.
        if let Err(e) = super::snat6::clear(fw, &last.snat6) {
            log::warn!("{e}; `bridge-nat uninstall` or a rebuild with no attachment left removes them");
        }
        if let Err(e) = fw.remove(&rec.id, &rec.firewall, &last.firewall) {
            log::warn!(
                "node differs from the records ({e}); rebuilding the {} firewall without {}",
                fw.kind().name(),
                rec.id.describe()
            );
            let others = self.live_records(fw.kind(), Some(&rec.id))?;
            self.rebuild(fw, &others)?;
        }
        crate::crashpoint::reached("del:after-firewall");
        if !last.tables.is_empty() || rec.tables.iter().any(|t| t.name.is_some()) {
            self.sync_table_names();
        }
        log::info!(
            "removed {} firewall objects ({} shared ones nobody else needs), {} ip rules, {} tables",
            object_count(&rec.firewall),
            last.firewall.len(),
            last.ip_rules.len(),
            last.tables.len()
        );
        Ok(())
    }

    /// Undo a failed ADD: what it holds, what it installed, its routing and its record.
    pub fn roll_back_add(&self, fw: &mut dyn Firewall, rec: &Record, applied: &Applied) {
        if let Err(e) = self.remove(fw, rec) {
            log::error!("roll back failed ADD: {e}");
        }
        let added: BTreeSet<IpRule> = applied.rules.iter().cloned().collect();
        if let Err(e) = kernel::remove_routing(&added, &BTreeSet::new()) {
            log::error!("roll back routing after failed ADD: {e}");
        }
        if let Err(e) = self.store.remove(&rec.id) {
            log::error!("remove record after failed ADD: {e}");
        }
    }

    /// Records a rebuild has just made true are no longer in doubt.
    pub fn mark_applied(&self, records: &[&Record]) {
        for r in records.iter().filter(|r| r.status == Status::Applying) {
            let mut r = (*r).clone();
            r.status = Status::Applied;
            if let Err(e) = self.store.save(&r) {
                log::warn!("mark record applied: {e}");
            }
        }
    }
}

fn object_count(o: &Objects) -> usize {
    o.rules.len() + o.nft.as_ref().map_or(0, |n| n.own.len() + n.shared.len())
}
