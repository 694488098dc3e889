//! ADD: validate → plan → lock → claim host ports → record intent → hold shared objects →
//! sysctls, firewall, routing → record result. A failure undoes it all (node.rs `roll_back_add`).

use super::node::{rule_key, Node};
use super::{attachment_id, kernel};
use crate::backend::{self, Firewall};
use crate::cni::{prev_result, Env};
use crate::config::{AttachmentId, NetConf};
use crate::crashpoint;
use crate::error::{Context, Error, Result};
use crate::health::view::healthy_in;
use crate::plan::{self, Plan};
use crate::routing::apply::Applied;
use crate::state::{Record, Status};

pub fn add(conf: &NetConf, env: &Env) -> Result<serde_json::Value> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        Error::invalid_config(
            "prevResult is missing: bridge-nat is a chained plugin; list it after \"bridge\" in the conflist's plugins",
        )
    })?;
    let att = prev_result::parse(prev, conf.bridge.as_deref())?;
    // Said before anything is touched: otherwise the first sign is a sysctl path that is missing.
    if crate::routing::netlink::link_index(&att.bridge).is_none() {
        let source = if conf.bridge.is_some() { "the config's \"bridge\"" } else { "prevResult" };
        return Err(Error::invalid_config(format!("bridge {} does not exist (named by {source})", att.bridge)));
    }
    let id = attachment_id(conf, env);
    let planned = plan::plan(conf, &id, &att, env.pod.as_ref())?;
    let mut fw = backend::open_for(&conf.settings);

    let node = Node::open(&conf.settings)?;
    let _lock = node.lock(conf.settings.lock_timeout)?;
    // An unreadable record of ours (corrupt, or a planted symlink) is replaced, never followed.
    let old = node.store.load(&id).unwrap_or_else(|e| {
        log::warn!("ignoring unreadable record: {e}");
        None
    });
    if let Some(old) = old.filter(|r| r.is_live()) {
        // A repeated ADD: remove the old one first, so the node holds exactly the new record. One
        // recorded with the other backend moves: removed by that backend, then added by this one.
        if old.backend == fw.kind() {
            node.remove(&mut *fw, &old).context("remove the earlier ADD")?;
        } else {
            log::info!("moving {} from the {} backend to {}", id.describe(), old.backend.name(), fw.kind().name());
            let mut was = backend::open(old.backend, &conf.settings);
            node.remove(&mut *was, &old).context(format!("remove the earlier ADD with {}", old.backend.name()))?;
        }
    }
    node.check_claims(&id, &planned.host_ports)?;

    let mut rec = record_for(conf, &planned, &*fw);
    node.store.save(&rec).context("record intent")?;
    crashpoint::reached("add:after-intent");
    let first = node.hold(&*fw, &rec)?;

    let mut applied = Applied::default();
    let result = kernel::apply_sysctls(&planned.sysctls)
        // Before the forwards exist, so that their first packet finds no entry with an old MAC.
        .inspect(|()| kernel::refresh_neighbours(&att, &env.netns, &env.ifname))
        .and_then(|()| node.install(&mut *fw, &rec, &first))
        .map(|()| super::snat6::apply(&mut *fw, &rec.snat6))
        .inspect(|_| crashpoint::reached("add:after-firewall"))
        .and_then(|nats| {
            Ok((nats, kernel::apply_routing(&planned, healthy_in(&conf.settings.state_dir), &mut applied)?))
        })
        .inspect(|_| crashpoint::reached("add:after-routing"));
    let (nats, my_routes) = match result {
        Ok(done) => done,
        Err(e) => {
            node.roll_back_add(&mut *fw, &rec, &applied);
            return Err(e.context(format!("add {}", id.describe())));
        }
    };
    rec.routes = my_routes.into_iter().collect();
    rec.snat6 = nats;
    if !rec.tables.is_empty() {
        node.sync_table_names();
    }
    rec.status = Status::Applied;
    node.store.save(&rec).context("record result")?;
    kernel::clear_udp_conntrack(&planned.host_ports);
    for w in fw.node_warnings(&rec.firewall) {
        log::warn!("{w}");
    }
    warn_unbound_rules(conf, &node, &id);
    log::info!(
        "added with {}: {} forwards, {} shared objects first held here, {} ip rules, {} routes",
        fw.kind().name(),
        planned.forwards.len(),
        first.firewall.len(),
        rec.ip_rules.len(),
        rec.routes.len()
    );
    Ok(prev.clone())
}

/// A static rule no attachment matches forwards nothing, and nothing else would say so: its pod
/// is not there, or host-local gave its `destIP` to nobody (or to a pod already gone).
fn warn_unbound_rules(conf: &NetConf, node: &Node, added: &AttachmentId) {
    for (i, r) in conf.rules.iter().enumerate() {
        match node.index.is_held(&rule_key(&conf.name, i)) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => return log::warn!("cannot tell which static rules are bound: {e}"),
        }
        let target: Vec<String> =
            [r.dest_ip.map(|ip| format!("destIP {ip}")), r.pod.as_ref().map(|p| format!("pod {p}"))]
                .into_iter()
                .flatten()
                .collect();
        log::warn!(
            "portForwarding.rules[{i}] {:?} (hostPort {}, {}) binds no live attachment, so it forwards nothing; just added {}",
            r.name,
            r.host_port,
            target.join(", "),
            added.describe()
        );
    }
}

fn record_for(conf: &NetConf, planned: &Plan, fw: &dyn Firewall) -> Record {
    let mut rec = Record::new(planned.id.clone(), &conf.cni_version);
    rec.bridge = planned.bridge.clone();
    rec.addresses = planned.addresses.iter().map(|a| a.ip.to_string()).collect();
    rec.host_ports = planned.host_ports.clone();
    rec.forwards = planned.forwards.clone();
    rec.bound_rules = planned.bound_rules.clone();
    rec.firewall = fw.render(planned);
    rec.backend = fw.kind();
    rec.reply_via = (!planned.routing.arrival.is_empty()).then(|| "arrival".to_string());
    rec.sysctls = planned.sysctls.clone();
    rec.ip_rules = planned.routing.ip_rules.iter().cloned().collect();
    rec.tables = planned.routing.tables.iter().cloned().collect();
    rec.egress = planned.routing.egress.clone();
    rec.snat6 = plan::snat6::plan(planned);
    rec
}
