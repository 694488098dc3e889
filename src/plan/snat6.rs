//! Which IPv6 source NATs one attachment needs: its network's masqueraded IPv6 subnet, leaving by
//! each uplink the network routes by (its IPv6 tables' uplinks: `routing.outbound`, the fallback
//! uplinks, the rules' own), is translated to that uplink's stable address. Pure; the addresses
//! are node state, found when applied (commands/snat6.rs, routing/stable6.rs).

use super::{Family, Plan};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv6Addr;

/// One IPv6 source NAT: `subnet` on `bridge`, leaving by `uplink`. Shared by every attachment of
/// the network; held in the index under the backend's key for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snat6 {
    pub subnet: IpNetwork,
    pub bridge: String,
    pub uplink: String,
    /// The address it translated to when recorded (for people: every later call resolves it
    /// again, since the uplink may have been renumbered); None where the uplink had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv6Addr>,
}

impl Snat6 {
    /// The same NAT, without the address it resolved to.
    pub fn spec(&self) -> Snat6 {
        Snat6 { address: None, ..self.clone() }
    }
}

impl std::fmt::Display for Snat6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ipv6 snat of {} leaving by {}", self.subnet, self.uplink)
    }
}

/// No uplink, no NAT of this kind: without routing the network masquerades as before.
pub fn plan(plan: &Plan) -> Vec<Snat6> {
    let uplinks: BTreeSet<&str> = plan
        .routing
        .tables
        .iter()
        .filter(|t| t.family() == Family::Ipv6)
        .map(|t| t.outbound.interface.as_str())
        .collect();
    let mut out = Vec::new();
    for s in plan.subnets.iter().filter(|s| s.family == Family::Ipv6 && s.masquerade) {
        for uplink in &uplinks {
            out.push(Snat6 {
                subnet: s.subnet,
                bridge: plan.bridge.clone(),
                uplink: uplink.to_string(),
                address: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{att, conf, id};
    use serde_json::json;

    fn nats(extra: serde_json::Value, addrs: &[&str]) -> Vec<String> {
        let c = conf(extra);
        let p = super::super::plan(&c, &id(), &att(&c, addrs), None).unwrap();
        super::plan(&p).iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_uplink_the_network_routes_ipv6_by_translates_its_masqueraded_range() {
        let routed = json!({
            "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "wan1", "fallback": ["wan2"] } },
            "portForwarding": { "rules": [ { "hostPort": 30081, "destPort": 8080,
                "routing": { "fwmark": "0x65", "tableId": 110, "outbound": { "interface": "wan0" } } } ] }
        });
        let want: Vec<String> =
            ["wan0", "wan1", "wan2"].iter().map(|u| format!("ipv6 snat of fd00::/64 leaving by {u}")).collect();
        assert_eq!(nats(routed.clone(), &["10.20.0.10/24", "fd00::10/64"]), want);
        // IPv4 alone, no masquerade (a delegated prefix), or no routing: none.
        assert!(nats(routed.clone(), &["10.20.0.10/24"]).is_empty());
        let mut unmasqueraded = routed;
        unmasqueraded["masquerade"] = json!(false);
        assert!(nats(unmasqueraded, &["fd00::10/64"]).is_empty());
        assert!(nats(json!({}), &["fd00::10/64"]).is_empty());
    }
}
