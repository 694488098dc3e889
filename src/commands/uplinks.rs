//! Egress failover as the operator sees it: each probed uplink's health, per family, and which
//! uplink each network's pods leave by in each family, from the records, the kernel's source
//! rules and the live agent's shared judgement. Without a live agent nothing is probed and every
//! network leaves by its primary.

use crate::config::Settings;
use crate::error::Result;
use crate::family::{family_of, Family};
use crate::health::probe::name;
use crate::health::view::{FamilyHealth, View};
use crate::routing::egress::Egress;
use crate::state::Store;
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkStatus {
    pub uplink: String,
    /// Healthy in every family it has an address of. None: no live agent judges it.
    pub healthy: Option<bool>,
    pub reason: String,
    /// Each family's verdict (None: no live agent judges it; for IPv6 also: not probed in IPv6).
    pub ipv4: Option<FamilyHealth>,
    pub ipv6: Option<FamilyHealth>,
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
    /// The same two for the pods' IPv6 traffic, which moves by IPv6's health (None: the network
    /// has no IPv6 range). `uplink` and `chosen` are IPv4's, or IPv6's without an IPv4 range.
    pub uplink6: Option<String>,
    pub chosen6: Option<String>,
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
    let healthy = |u: &str, family| view.as_ref().is_none_or(|v| v.is_healthy(u, family));
    let names: BTreeSet<&str> = egress.iter().flat_map(|e| e.uplinks.iter().map(|u| u.interface.as_str())).collect();
    let uplinks = names
        .into_iter()
        .map(|name| {
            let judged = view.as_ref().and_then(|v| v.uplinks.get(name));
            let reason = |h: &crate::health::view::UplinkHealth| match &h.ipv6 {
                // An agent that judged both families as one.
                None => h.ipv4.reason.clone(),
                Some(v6) => format!("IPv4: {}; IPv6: {}", h.ipv4.reason, v6.reason),
            };
            UplinkStatus {
                uplink: name.to_string(),
                healthy: judged.map(|h| h.healthy()),
                reason: judged.map_or_else(|| "not probed (no live agent)".to_string(), reason),
                ipv4: judged.map(|h| h.ipv4.clone()),
                // Not probed in IPv6 (no pods of that family leave by it), or judged by an agent
                // that judged both families as one.
                ipv6: judged.and_then(|h| h.ipv6.clone()),
            }
        })
        .collect();
    let present = crate::routing::netlink::Netlink::open()?.rules()?;
    // Where a family's source rule points now, read from the kernel.
    let leaves_by = |e: &Egress, family: Family| {
        present
            .iter()
            .find(|r| {
                r.priority == e.priority
                    && r.fwmark.is_none()
                    && r.from.is_some_and(|f| family_of(f.ip()) == family && e.subnets.contains(&f))
            })
            .and_then(|r| e.uplinks.iter().find(|u| u.table == r.table))
            .map(|u| u.interface.clone())
    };
    let networks = egress
        .iter()
        .map(|e| {
            let families = e.families();
            let first = families.first().copied().unwrap_or(Family::Ipv4);
            let v6 = families.contains(&Family::Ipv6);
            EgressStatus {
                network: e.network.clone(),
                uplink: leaves_by(e, first),
                chosen: e.chosen(first, healthy).interface.clone(),
                uplink6: leaves_by(e, Family::Ipv6).filter(|_| v6),
                chosen6: v6.then(|| e.chosen(Family::Ipv6, healthy).interface.clone()),
                primary: e.primary().interface.clone(),
                candidates: e.uplinks.iter().map(|u| u.interface.clone()).collect(),
            }
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
        let missing = "none (their source rule is missing)";
        let now = n.uplink.as_deref().unwrap_or(missing);
        // A network of both families whose families leave by different uplinks names both.
        let by = match &n.uplink6 {
            _ if n.chosen6.is_none() || n.uplink == n.uplink6 => now.to_string(),
            six => format!("{now} for IPv4, {} for IPv6", six.as_deref().unwrap_or(missing)),
        };
        let mut line = format!("egress   {}: pods leave by {by} (list {})", n.network, n.candidates.join(" → "));
        let mut should = Vec::new();
        if n.uplink.as_deref() != Some(n.chosen.as_str()) {
            should.push(n.chosen.clone());
        }
        // (Said once where both families should leave by the same uplink, or the network is IPv6 only.)
        let same = n.uplink6 == n.uplink && n.chosen6.as_ref() == Some(&n.chosen);
        if let Some(c6) = n.chosen6.as_ref().filter(|c6| n.uplink6.as_ref() != Some(c6) && !same) {
            should.push(format!("{c6} for {}", name(Family::Ipv6)));
        }
        if !should.is_empty() {
            line += &format!("; should be {}: `bridge-nat reconcile` or the agent moves them", should.join(", "));
        }
        out += &line;
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(uplink: &str, chosen: &str, six: Option<(&str, &str)>) -> EgressStatus {
        EgressStatus {
            network: "dind".into(),
            uplink: Some(uplink.into()),
            chosen: chosen.into(),
            uplink6: six.map(|s| s.0.into()),
            chosen6: six.map(|s| s.1.into()),
            primary: "wan1".into(),
            candidates: vec!["wan1".into(), "wan0".into()],
        }
    }

    #[test]
    fn a_network_whose_families_leave_by_different_uplinks_names_both() {
        let line = |n| render_egress(&[], &[n]);
        assert_eq!(line(network("wan0", "wan0", None)), "egress   dind: pods leave by wan0 (list wan1 → wan0)\n");
        assert_eq!(
            line(network("wan0", "wan0", Some(("wan0", "wan0")))),
            "egress   dind: pods leave by wan0 (list wan1 → wan0)\n"
        );
        assert_eq!(
            line(network("wan0", "wan0", Some(("wan1", "wan1")))),
            "egress   dind: pods leave by wan0 for IPv4, wan1 for IPv6 (list wan1 → wan0)\n"
        );
        assert_eq!(
            line(network("wan1", "wan1", Some(("wan1", "wan0")))),
            "egress   dind: pods leave by wan1 (list wan1 → wan0); should be wan0 for IPv6: `bridge-nat reconcile` or the agent moves them\n"
        );
        assert_eq!(
            line(network("wan1", "wan0", Some(("wan1", "wan0")))),
            "egress   dind: pods leave by wan1 (list wan1 → wan0); should be wan0: `bridge-nat reconcile` or the agent moves them\n"
        );
    }

    #[test]
    fn an_uplink_judged_per_family_says_each_familys_reason() {
        let h = |healthy, reason: &str, addressed| FamilyHealth { healthy, reason: reason.into(), addressed };
        let u = UplinkStatus {
            uplink: "wwan0".into(),
            healthy: Some(true),
            reason: "IPv4: no IPv4 address; IPv6: answering".into(),
            ipv4: Some(h(false, "no IPv4 address", false)),
            ipv6: Some(h(true, "answering", true)),
        };
        assert_eq!(
            render_egress(&[u], &[]),
            "uplink   wwan0        healthy   IPv4: no IPv4 address; IPv6: answering\n"
        );
    }
}
