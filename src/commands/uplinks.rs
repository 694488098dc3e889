//! Egress failover as the operator sees it: each probed uplink's health and which uplink each
//! network's pods leave by, from the records and the live agent's shared judgement. Without a
//! live agent nothing is probed and every network leaves by its primary.

use crate::config::Settings;
use crate::error::Result;
use crate::health::view::View;
use crate::routing::egress::Egress;
use crate::state::Store;
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkStatus {
    pub uplink: String,
    /// None: no live agent judges it.
    pub healthy: Option<bool>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressStatus {
    pub network: String,
    /// The uplink the pods' own traffic leaves by now, read from the kernel's source rule (None:
    /// the rule is missing, or points at no table of the list).
    pub uplink: Option<String>,
    /// The uplink it should leave by, from the live agent's health (the primary without one).
    pub chosen: String,
    pub primary: String,
    pub candidates: Vec<String>,
}

/// Every network with a fallback in the live records, and the uplinks of their lists.
pub fn egress_status(settings: &Settings) -> Result<(Vec<UplinkStatus>, Vec<EgressStatus>)> {
    let Some(store) = Store::open_existing(&settings.state_dir)? else { return Ok((Vec::new(), Vec::new())) };
    let records = store.load_all()?;
    let egress: BTreeSet<&Egress> = records.iter().filter(|r| r.is_live()).filter_map(|r| r.egress.as_ref()).collect();
    if egress.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let view = View::load(&settings.state_dir);
    let healthy = |u: &str| view.as_ref().is_none_or(|v| v.is_healthy(u));
    let names: BTreeSet<&str> = egress.iter().flat_map(|e| e.uplinks.iter().map(|u| u.interface.as_str())).collect();
    let uplinks = names
        .into_iter()
        .map(|name| {
            let judged = view.as_ref().and_then(|v| v.uplinks.get(name));
            UplinkStatus {
                uplink: name.to_string(),
                healthy: judged.map(|h| h.healthy),
                reason: judged.map_or_else(|| "not probed (no live agent)".to_string(), |h| h.reason.clone()),
            }
        })
        .collect();
    let present = crate::routing::netlink::Netlink::open()?.rules()?;
    let networks = egress
        .iter()
        .map(|e| EgressStatus {
            network: e.network.clone(),
            uplink: present
                .iter()
                .find(|r| {
                    r.priority == e.priority && r.fwmark.is_none() && r.from.is_some_and(|f| e.subnets.contains(&f))
                })
                .and_then(|r| e.uplinks.iter().find(|u| u.table == r.table))
                .map(|u| u.interface.clone()),
            chosen: e.chosen(healthy).interface.clone(),
            primary: e.primary().interface.clone(),
            candidates: e.uplinks.iter().map(|u| u.interface.clone()).collect(),
        })
        .collect();
    Ok((uplinks, networks))
}

/// The lines `list` and `check` print under the attachments.
pub fn render_egress(uplinks: &[UplinkStatus], networks: &[EgressStatus]) -> String {
    let mut out = String::new();
    for u in uplinks {
        let state = match u.healthy {
            Some(true) => "healthy",
            Some(false) => "unhealthy",
            None => "unknown",
        };
        out += &format!("uplink   {:<12} {:<9} {}\n", u.uplink, state, u.reason);
    }
    for n in networks {
        let now = n.uplink.as_deref().unwrap_or("none (their source rule is missing)");
        let mut line = format!("egress   {}: pods leave by {now} (list {})", n.network, n.candidates.join(" → "));
        if n.uplink.as_deref() != Some(n.chosen.as_str()) {
            line += &format!("; should be {}: `bridge-nat reconcile` or the agent moves them", n.chosen);
        }
        out += &line;
        out.push('\n');
    }
    out
}
