//! Multi-uplink policy routing on the node: ip rules from marks and from the pod subnet to
//! per-uplink tables, and the tables' routes. What an attachment needs is planned in plan/routing.rs;
//! `apply` resolves next hops against the live uplinks and changes the kernel over rtnetlink;
//! `rt_tables` registers table names for iproute2.

pub mod apply;
mod discover;
pub mod egress;
mod messages;
pub mod neighbour;
pub mod netlink;
pub mod rt_tables;
pub mod stable6;
pub mod uplink6;

use crate::config::Outbound;
use crate::family::Family;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// One `ip rule` (or `ip -6 rule`: both families are routed by the same marks and table ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpRule {
    /// Left out for IPv4, so IPv4 rules are recorded as before and older records load as IPv4.
    #[serde(default, skip_serializing_if = "Family::is_ipv4")]
    pub family: Family,
    pub priority: u32,
    pub table: u32,
    /// (mark, mask)
    pub fwmark: Option<(u32, u32)>,
    pub from: Option<IpNetwork>,
    /// `suppress_prefixlength 0`: use the table but not its default route.
    pub suppress_default: bool,
}

impl std::fmt::Display for IpRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The IPv4 form is also the rule's key in the index, so it must not change.
        let six = if self.family.is_ipv4() { "" } else { " -6" };
        write!(f, "ip{six} rule priority {}", self.priority)?;
        if let Some(net) = self.from {
            write!(f, " from {net}")?;
        }
        if let Some((m, mask)) = self.fwmark {
            write!(f, " fwmark {m:#x}/{mask:#x}")?;
        }
        write!(f, " lookup {}", self.table)?;
        if self.suppress_default {
            write!(f, " suppress_prefixlength 0")?;
        }
        Ok(())
    }
}

/// A table this network needs, in the family of `subnet`: the bridge subnet, the uplink's own
/// subnets and a default route out of the uplink. Next hops are resolved when applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableSpec {
    pub id: u32,
    pub name: Option<String>,
    pub bridge: String,
    pub subnet: IpNetwork,
    pub outbound: Outbound,
}

/// A route as installed in one of our tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub table: u32,
    pub dst: IpNetwork,
    pub gateway: Option<std::net::IpAddr>,
    pub dev: String,
}

impl TableSpec {
    pub fn family(&self) -> Family {
        crate::family::family_of(self.subnet.ip())
    }
}

impl Route {
    pub fn family(&self) -> Family {
        crate::family::family_of(self.dst.ip())
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "route {} ", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, "via {gw} ")?;
        }
        write!(f, "dev {} table {}", self.dev, self.table)
    }
}

pub const MAIN_TABLE: u32 = 254;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_earlier_versions_load_as_ipv4_and_ipv4_rules_are_written_as_before() {
        let old = r#"{"priority":100,"table":100,"fwmark":[100,8191],"from":null,"suppressDefault":false}"#;
        let rule: IpRule = serde_json::from_str(old).expect("an old rule loads");
        assert_eq!(rule.family, Family::Ipv4);
        assert_eq!(serde_json::to_string(&rule).unwrap(), old);
        assert_eq!(rule.to_string(), "ip rule priority 100 fwmark 0x64/0x1fff lookup 100");
        let six = IpRule { family: Family::Ipv6, ..rule };
        assert!(serde_json::to_string(&six).unwrap().contains(r#""family":"ipv6""#));
        assert_eq!(six.to_string(), "ip -6 rule priority 100 fwmark 0x64/0x1fff lookup 100");
        let table = r#"{"id":100,"name":null,"bridge":"dind-br0","subnet":"10.20.0.0/24",
                        "outbound":{"interface":"eth5","gateway":null,"useDefaultRoute":false}}"#;
        let spec: TableSpec = serde_json::from_str(table).expect("an old table loads");
        assert_eq!((spec.family(), spec.outbound.gateway6), (Family::Ipv4, None));
        assert!(!serde_json::to_string(&spec).unwrap().contains("gateway6"));
    }
}
