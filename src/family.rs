//! The address family, below every module that plans, routes or filters by it: IPv4 and IPv6 are
//! routed alike, with the same marks and table ids, so most objects only need to say which.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Records written before IPv6 was policy-routed name no family: theirs is IPv4, the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn is_ipv4(&self) -> bool {
        *self == Family::Ipv4
    }
}

pub fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    }
}
