//! Multi-uplink policy routing on the node: ip rules from marks and from the pod subnet to
//! per-uplink tables, and the tables' routes. What an attachment needs is planned in plan/routing.rs;
//! `apply` resolves next hops against the live uplinks and changes the kernel over rtnetlink;
//! `rt_tables` registers table names for iproute2.

pub mod apply;
pub mod egress;
pub mod neighbour;
pub mod netlink;
pub mod rt_tables;

use crate::config::Outbound;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// One `ip rule`. Only IPv4 is policy-routed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpRule {
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
        write!(f, "ip rule priority {}", self.priority)?;
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

/// A table this network needs: the bridge subnet, the uplink's own subnets and a default route
/// out of the uplink. Next hops are resolved when applied.
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
