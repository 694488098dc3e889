//! An uplink's stable IPv6 address: what the pods' IPv6 egress is translated to when it leaves by
//! that uplink (snat6/). Plain masquerade takes the address the kernel would choose as source,
//! which is a temporary (privacy) one where the uplink has `use_tempaddr=2`: such an address is
//! deprecated after a day and its flows die when it expires, so the choice is made here instead.

use super::netlink::Netlink;
use crate::error::Result;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::Ipv6Addr;

/// IFA_F_* bits (linux/if_addr.h); IFA_F_SECONDARY is IFA_F_TEMPORARY for IPv6.
const TEMPORARY: u32 = 0x01;
const OPTIMISTIC: u32 = 0x04;
const DADFAILED: u32 = 0x08;
const DEPRECATED: u32 = 0x20;
const TENTATIVE: u32 = 0x40;
const PERMANENT: u32 = 0x80;
/// A preferred lifetime that never runs out.
const FOREVER: u32 = u32::MAX;

/// One IPv6 address of an uplink as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr6 {
    pub ip: Ipv6Addr,
    pub flags: u32,
    pub global: bool,
    /// Seconds it stays preferred; 0 once deprecated.
    pub preferred: u32,
}

/// The address the pods' traffic should appear from, if any: global scope, not link-local, not
/// temporary, deprecated, tentative, optimistic or failed. Among those, deterministically: a
/// global unicast before a unique-local one, an address configured by hand (permanent) before a
/// learned one, one that never stops being preferred before one that does, then the lowest.
/// Remaining lifetimes are not compared: two prefixes refreshed by router advertisements would
/// swap places every few minutes, and every swap would cut the pods' flows.
pub fn choose(addrs: &[Addr6]) -> Option<Ipv6Addr> {
    const UNFIT: u32 = TEMPORARY | OPTIMISTIC | DADFAILED | DEPRECATED | TENTATIVE;
    addrs
        .iter()
        .filter(|a| a.global && !a.ip.is_unicast_link_local() && a.flags & UNFIT == 0 && a.preferred > 0)
        .min_by_key(|a| (a.ip.is_unique_local(), a.flags & PERMANENT == 0, a.preferred != FOREVER, a.ip))
        .map(|a| a.ip)
}

/// The IPv6 addresses of the link with this index, with their flags and lifetimes.
pub fn addresses(nl: &mut Netlink, index: u32) -> Result<Vec<Addr6>> {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    msg.header.index = index;
    // The agent asks every probe round (health/probe.rs), and a node's addresses grow with its
    // pods (a link-local one per veth): with strict checking the kernel dumps only this link's. A
    // kernel without it dumps them all, filtered below.
    let strict = nl.set_strict(true);
    let replies = nl.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_REQUEST | NLM_F_DUMP, "dump addresses");
    if strict {
        nl.set_strict(false);
    }
    Ok(replies?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                let mut out = Addr6 {
                    ip: Ipv6Addr::UNSPECIFIED,
                    // IFA_FLAGS carries every bit; the header only the low eight (older kernels).
                    flags: u32::from(a.header.flags.bits()),
                    global: a.header.scope == AddressScope::Universe,
                    preferred: FOREVER,
                };
                for attr in &a.attributes {
                    match attr {
                        AddressAttribute::Address(std::net::IpAddr::V6(ip)) => out.ip = *ip,
                        AddressAttribute::Flags(f) => out.flags = f.bits(),
                        AddressAttribute::CacheInfo(c) => out.preferred = c.ifa_preferred,
                        _ => {}
                    }
                }
                (!out.ip.is_unspecified()).then_some(out)
            }
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ip: &str, flags: u32, preferred: u32) -> Addr6 {
        Addr6 { ip: ip.parse().unwrap(), flags, global: true, preferred }
    }

    #[test]
    fn temporary_deprecated_tentative_and_link_local_addresses_are_never_chosen() {
        let unfit = [
            a("2001:db8::1", TEMPORARY, 3600),
            a("2001:db8::2", DEPRECATED, 0),
            a("2001:db8::3", 0, 0),
            a("2001:db8::4", TENTATIVE, 3600),
            a("2001:db8::5", DADFAILED, 3600),
            a("2001:db8::6", OPTIMISTIC, 3600),
            Addr6 { global: false, ..a("fe80::1", PERMANENT, FOREVER) },
        ];
        assert_eq!(choose(&unfit), None);
        let mut with_stable = unfit.to_vec();
        with_stable.push(a("2001:db8::9", 0, 1800));
        assert_eq!(choose(&with_stable), Some("2001:db8::9".parse().unwrap()));
    }

    #[test]
    fn the_choice_does_not_move_as_lifetimes_count_down() {
        let slaac = |p| vec![a("2001:db8:2::20", 0, p), a("2001:db8:1::10", 0, 3600)];
        assert_eq!(choose(&slaac(7200)), choose(&slaac(60)));
        assert_eq!(choose(&slaac(60)), Some("2001:db8:1::10".parse().unwrap()));
        // Set by hand beats learned; global beats unique-local; forever beats a lifetime.
        let mixed = [a("fd00::1", PERMANENT, FOREVER), a("2001:db8::9", 0, 60), a("2001:db8::a", PERMANENT, FOREVER)];
        assert_eq!(choose(&mixed), Some("2001:db8::a".parse().unwrap()));
        assert_eq!(choose(&mixed[..2]), Some("2001:db8::9".parse().unwrap()));
        let lifetimes = [a("2001:db8::1", 0, 60), a("2001:db8::2", 0, FOREVER)];
        assert_eq!(choose(&lifetimes), Some("2001:db8::2".parse().unwrap()));
    }
}
