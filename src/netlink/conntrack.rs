//! Clearing stale conntrack entries over ctnetlink, without the `conntrack` tool.
//!
//! A client that keeps sending UDP to a host port keeps its conntrack entry alive, and NAT is only
//! decided on a connection's first packet: without this, a re-created pod would never see that
//! traffic. Entries are dumped, matched on their original tuple, and deleted one by one (a DELETE
//! without a tuple would flush the whole table).

use crate::error::{code, Result};
use crate::netlink::nfnetlink::{
    errno_error, find_attr, message, Attrs, Reply, Socket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use std::net::IpAddr;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

/// Entries to clear: UDP to `port`, addressed to `dst` or (None) to any address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlow {
    pub port: u16,
    pub dst: Option<IpAddr>,
}

/// Delete every UDP conntrack entry whose original direction targets one of `flows`.
/// Returns how many were deleted.
pub fn clear_udp(family_v6: bool, flows: &[UdpFlow]) -> Result<usize> {
    if flows.is_empty() {
        return Ok(0);
    }
    delete_where(family_v6, |entry| find_attr(entry, CTA_TUPLE_ORIG).is_some_and(|orig| matches_any(orig, flows)))
}

/// Delete the entries of connections from `subnets` that were masqueraded to one of `addresses`
/// (original source in a pod subnet, reply destination that address), in each family `addresses`
/// holds: what must go when the pods' traffic leaves by another uplink, or their next packets would
/// keep the old uplink's address. An entry that expired meanwhile is not an error.
pub fn clear_masqueraded(subnets: &[ipnetwork::IpNetwork], addresses: &[IpAddr]) -> Result<usize> {
    let mut deleted = 0;
    for v6 in [false, true] {
        let of_family: Vec<IpAddr> = addresses.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
        if subnets.is_empty() || of_family.is_empty() {
            continue;
        }
        deleted += delete_where(v6, |entry| is_masqueraded_from(entry, subnets, &of_family))?;
    }
    Ok(deleted)
}

/// The address of one end of a tuple, either family.
fn tuple_address(entry: &[u8], tuple: u16, source: bool) -> Option<IpAddr> {
    let ip = find_attr(entry, tuple).and_then(|t| find_attr(t, CTA_TUPLE_IP))?;
    let (v4, v6) = if source { (CTA_IP_V4_SRC, CTA_IP_V6_SRC) } else { (CTA_IP_V4_DST, CTA_IP_V6_DST) };
    match find_attr(ip, v4).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
        Some(b) => Some(IpAddr::from(b)),
        None => find_attr(ip, v6).and_then(|b| <[u8; 16]>::try_from(b).ok()).map(IpAddr::from),
    }
}

fn is_masqueraded_from(entry: &[u8], subnets: &[ipnetwork::IpNetwork], addresses: &[IpAddr]) -> bool {
    let from_pod =
        tuple_address(entry, CTA_TUPLE_ORIG, true).is_some_and(|src| subnets.iter().any(|s| s.contains(src)));
    from_pod && tuple_address(entry, CTA_TUPLE_REPLY, false).is_some_and(|dst| addresses.contains(&dst))
}

/// Dump the family's entries and delete, one by one, those `pick` chooses (by their attributes).
fn delete_where(family_v6: bool, pick: impl Fn(&[u8]) -> bool) -> Result<usize> {
    let sock = Socket::open("conntrack")?;
    let family = if family_v6 { nix::libc::AF_INET6 } else { nix::libc::AF_INET } as u8;
    let mut victims = Vec::new();
    sock.send(&request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, &[]))?;
    receive(&sock, |payload| {
        if let Some(orig) = find_attr(payload, CTA_TUPLE_ORIG).filter(|_| pick(payload)) {
            let mut attrs = Attrs::new();
            attrs.bytes(CTA_TUPLE_ORIG | 0x8000, orig);
            if let Some(zone) = find_attr(payload, CTA_ZONE) {
                attrs.bytes(CTA_ZONE, zone);
            }
            victims.push(attrs.buf);
        }
    })?;
    let mut deleted = 0;
    for attrs in victims {
        sock.send(&request(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, family, &attrs))?;
        match receive(&sock, |_| {}) {
            Ok(()) => deleted += 1,
            // Expired between the dump and the delete: what we wanted anyway.
            Err(e) if e.details == "ENOENT" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

fn request(kind: u16, flags: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
    // One request in flight at a time: the sequence number can stay 1.
    message((NFNL_SUBSYS_CTNETLINK << 8) | kind, flags, 1, family, 0, attrs)
}

/// Read replies until DONE or an ACK/error, handing each conntrack message's attributes to `f`.
fn receive(sock: &Socket, mut f: impl FnMut(&[u8])) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut outcome = None;
    while outcome.is_none() {
        sock.receive(false, &mut buf, |reply| match reply {
            Reply::Message { attrs, .. } => {
                f(attrs);
                true
            }
            Reply::Done { .. } => {
                outcome = Some(Ok(()));
                false
            }
            Reply::Ack { errno, .. } => {
                outcome =
                    Some(if errno == 0 { Ok(()) } else { Err(errno_error(code::IO, "conntrack netlink", errno)) });
                false
            }
        })?;
    }
    outcome.unwrap_or(Ok(()))
}

fn matches_any(orig: &[u8], flows: &[UdpFlow]) -> bool {
    let Some(proto) = find_attr(orig, CTA_TUPLE_PROTO) else {
        return false;
    };
    if find_attr(proto, CTA_PROTO_NUM).and_then(|p| p.first().copied()) != Some(IPPROTO_UDP) {
        return false;
    }
    let Some(port) =
        find_attr(proto, CTA_PROTO_DST_PORT).and_then(|p| p.get(..2)).map(|b| u16::from_be_bytes([b[0], b[1]]))
    else {
        return false;
    };
    let dst = find_attr(orig, CTA_TUPLE_IP).and_then(|ip| {
        if let Some(b) = find_attr(ip, CTA_IP_V4_DST).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            Some(IpAddr::from(b))
        } else {
            find_attr(ip, CTA_IP_V6_DST).and_then(|b| <[u8; 16]>::try_from(b).ok()).map(IpAddr::from)
        }
    });
    flows.iter().any(|f| f.port == port && (f.dst.is_none() || f.dst == dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        Attrs::new().bytes(kind, payload).buf.clone()
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        raw_attr(kind | 0x8000, &parts.concat())
    }

    fn tuple(dst: [u8; 4], proto: u8, port: u16) -> Vec<u8> {
        let ip = nested(CTA_TUPLE_IP, &[raw_attr(1, &[10, 0, 0, 1]), raw_attr(CTA_IP_V4_DST, &dst)]);
        let pr = nested(
            CTA_TUPLE_PROTO,
            &[
                raw_attr(CTA_PROTO_NUM, &[proto]),
                raw_attr(2, &5000u16.to_be_bytes()),
                raw_attr(CTA_PROTO_DST_PORT, &port.to_be_bytes()),
            ],
        );
        [ip, pr].concat()
    }

    #[test]
    fn matches_udp_by_port_and_optional_address() {
        let t = tuple([192, 168, 1, 5], IPPROTO_UDP, 5353);
        assert!(matches_any(&t, &[UdpFlow { port: 5353, dst: None }]));
        assert!(matches_any(&t, &[UdpFlow { port: 5353, dst: Some("192.168.1.5".parse().unwrap()) }]));
        assert!(!matches_any(&t, &[UdpFlow { port: 5353, dst: Some("192.168.1.6".parse().unwrap()) }]));
        assert!(!matches_any(&t, &[UdpFlow { port: 53, dst: None }]));
        let tcp = tuple([192, 168, 1, 5], 6, 5353);
        assert!(!matches_any(&tcp, &[UdpFlow { port: 5353, dst: None }]));
    }

    #[test]
    fn masqueraded_pod_flows_are_found_in_either_family() {
        let side = |kind: u16, src: &str, dst: &str| {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let bytes = |a: IpAddr| match a {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            let (s, d) = if src.is_ipv4() { (CTA_IP_V4_SRC, CTA_IP_V4_DST) } else { (CTA_IP_V6_SRC, CTA_IP_V6_DST) };
            nested(kind, &[nested(CTA_TUPLE_IP, &[raw_attr(s, &bytes(src)), raw_attr(d, &bytes(dst))])])
        };
        let entry = |orig: (&str, &str), reply: (&str, &str)| {
            [side(CTA_TUPLE_ORIG, orig.0, orig.1), side(CTA_TUPLE_REPLY, reply.0, reply.1)].concat()
        };
        let subnets: Vec<ipnetwork::IpNetwork> = vec!["10.20.0.0/24".parse().unwrap(), "fd00:20::/64".parse().unwrap()];
        let left: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "2001:db8:b::1".parse().unwrap()];
        let v6 = entry(("fd00:20::2", "2001:db8:ffff::10"), ("2001:db8:ffff::10", "2001:db8:b::1"));
        assert!(is_masqueraded_from(&v6, &subnets, &left));
        let v4 = entry(("10.20.0.10", "203.0.113.10"), ("203.0.113.10", "192.0.2.1"));
        assert!(is_masqueraded_from(&v4, &subnets, &left));
        // Masqueraded to another uplink's address, or not from a pod: kept.
        let other = entry(("fd00:20::2", "2001:db8:ffff::10"), ("2001:db8:ffff::10", "2001:db8:a::1"));
        assert!(!is_masqueraded_from(&other, &subnets, &left));
        let node = entry(("2001:db8:b::1", "2001:db8:ffff::10"), ("2001:db8:ffff::10", "2001:db8:b::1"));
        assert!(!is_masqueraded_from(&node, &subnets, &left));
    }

    #[test]
    fn malformed_tuples_do_not_panic() {
        assert!(!matches_any(&[8, 0, 2, 0, 1], &[UdpFlow { port: 1, dst: None }]));
    }
}
