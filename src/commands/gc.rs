//! GC: lock → read every record → drop those the runtime no longer knows → rebuild the index and
//! every backend's firewall from the records that stay. The one command that always reads the
//! kernel: it is the moment to undo whatever a crash or an admin left.

use super::del::remove_unowned_routing;
use super::kernel;
use super::node::Node;
use crate::backend;
use crate::config::NetConf;
use crate::error::{Context, Result};
use crate::state::Record;
use std::collections::BTreeSet;

pub fn gc(conf: &NetConf) -> Result<()> {
    let valid: BTreeSet<(String, String)> =
        conf.valid_attachments.iter().flatten().map(|a| (a.container_id.clone(), a.ifname.clone())).collect();
    let node = Node::open(&conf.settings)?;
    let _lock = node.lock(conf.settings.lock_timeout)?;
    let records = node.store.load_all()?;
    let is_stale =
        |r: &Record| r.id.network == conf.name && !valid.contains(&(r.id.container_id.clone(), r.id.ifname.clone()));
    let kept: Vec<&Record> = records.iter().filter(|r| r.is_live() && !is_stale(r)).collect();
    node.rebuild_index(|kind| backend::open(kind, &conf.settings), &kept).context("gc")?;
    for r in records.iter().filter(|r| r.is_live() && is_stale(r)) {
        let (ip_rules, tables) = node.unheld_routing(r)?;
        let ip_rules = crate::routing::egress::with_variants(&ip_rules, r.egress.iter());
        kernel::remove_routing(&ip_rules, &tables).context("gc policy routing")?;
    }
    remove_unowned_routing(conf, &kept).context("gc")?;
    for mut fw in backend::every(&conf.settings) {
        let mine: Vec<Record> = kept.iter().filter(|r| r.backend == fw.kind()).map(|r| (*r).clone()).collect();
        node.rebuild(&mut *fw, &mine).context("gc")?;
    }
    node.sync_table_names();
    let mut removed = node.store.remove_unreadable(&conf.name)?;
    for r in records.iter().filter(|r| is_stale(r) || !r.is_live()) {
        node.store.remove(&r.id)?;
        removed += 1;
    }
    node.mark_applied(&kept);
    log::info!("gc: removed {removed} stale attachment(s), kept {}", kept.len());
    Ok(())
}
