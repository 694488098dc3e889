//! DEL: lock → read the record → release holds → routing, firewall → forget the record. Works
//! from the record alone: no prevResult or runtime config is needed.

use super::node::Node;
use super::{attachment_id, kernel};
use crate::backend;
use crate::cni::Env;
use crate::config::{AttachmentId, NetConf};
use crate::error::{Context, Error, Result};
use crate::routing::netlink::Netlink;
use crate::routing::IpRule;
use crate::state::Record;
use std::collections::BTreeSet;

pub fn del(conf: &NetConf, env: &Env) -> Result<()> {
    let id = attachment_id(conf, env);
    let node = Node::open(&conf.settings)?;
    let _lock = node.lock(conf.settings.lock_timeout)?;
    let rec = match node.store.load(&id) {
        Ok(Some(rec)) => rec,
        Ok(None) => {
            log::info!("no record of {}: nothing to remove", id.describe());
            return Ok(());
        }
        Err(why) => return del_without_record(conf, &node, &id, why),
    };
    if !rec.is_live() {
        log::info!("record of {} is from an earlier boot: nothing on the node to remove", id.describe());
        return node.store.remove(&id);
    }
    let mut fw = backend::open(rec.backend, &conf.settings);
    node.remove(&mut *fw, &rec).context(format!("del {}", id.describe()))?;
    node.store.remove(&id)?;
    kernel::clear_udp_conntrack(&rec.host_ports);
    Ok(())
}

/// The record exists but cannot be read: remove whatever no readable record needs, judged from the
/// kernel (rules tagged for this attachment) and the config (its tables and marks).
fn del_without_record(conf: &NetConf, node: &Node, id: &AttachmentId, why: Error) -> Result<()> {
    log::warn!("{why}; reconciling the node from the kernel and the config instead");
    let others: Vec<Record> = node.store.load_all()?.into_iter().filter(|r| r.is_live() && &r.id != id).collect();
    let others_ref: Vec<&Record> = others.iter().collect();
    remove_unowned_routing(conf, &others_ref)?;
    for mut fw in backend::every(&conf.settings) {
        let kept: Vec<Record> = others.iter().filter(|r| r.backend == fw.kind()).cloned().collect();
        node.rebuild(&mut *fw, &kept).context(format!("del {}", id.describe()))?;
    }
    node.index.release_everywhere(id)?;
    node.store.remove(id)
}

/// ip rules and tables this network's config gives the plugin that no kept record needs: what a
/// lost or corrupt record would otherwise leak.
pub(super) fn remove_unowned_routing(conf: &NetConf, kept: &[&Record]) -> Result<()> {
    let mut tables: BTreeSet<u32> =
        conf.rules.iter().filter_map(|r| r.routing.as_ref().map(|rs| rs.table_id)).collect();
    tables.extend(conf.routing.as_ref().map(|g| g.table_id));
    tables.extend(conf.routing.iter().flat_map(|g| g.fallback.iter().map(|f| f.table_id)));
    if tables.is_empty() {
        return Ok(());
    }
    let kept_rules: BTreeSet<&IpRule> = kept.iter().flat_map(|r| r.ip_rules.iter()).collect();
    let kept_tables: BTreeSet<u32> = kept.iter().flat_map(|r| r.tables.iter().map(|t| t.id)).collect();
    let suppress_priority = conf.routing.as_ref().map(|g| g.rule_priority + 9);
    let ours = |r: &IpRule| {
        tables.contains(&r.table) || (r.suppress_default && Some(r.priority) == suppress_priority && r.from.is_some())
    };
    let mut nl = Netlink::open()?;
    let stale_rules: BTreeSet<IpRule> =
        nl.rules()?.into_iter().filter(|r| ours(r) && !kept_rules.contains(r)).collect();
    let stale_tables: BTreeSet<u32> = tables.into_iter().filter(|t| !kept_tables.contains(t)).collect();
    kernel::remove_routing(&stale_rules, &stale_tables).context("remove unowned policy routing")
}
