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
