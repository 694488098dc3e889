//! The probe's packets, both families: an ICMP echo request as an IP packet ready for the wire (the
//! frame's link header is the packet socket's to add), and the test that an arriving packet is an
//! echo reply to this round's request. Pure, so every byte is unit-tested.

use std::net::{Ipv4Addr, Ipv6Addr};

const PAYLOAD: &[u8] = b"bridge-nat probe";
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const ECHO_REPLY4: u8 = 0;
const ECHO_REQUEST6: u8 = 128;
const ECHO_REPLY6: u8 = 129;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The echo message itself, checksum zero: each family sums it differently.
fn echo(kind: u8, ident: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![kind, 0, 0, 0];
    icmp.extend(ident.to_be_bytes());
    icmp.extend(seq.to_be_bytes());
    icmp.extend(PAYLOAD);
    icmp
}

/// An IPv4 packet holding one ICMP echo request.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16) -> Vec<u8> {
    let mut icmp = echo(8, ident, seq);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend(total.to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, ICMP, 0, 0]); // id 0, don't fragment, ttl 64, icmp
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend(icmp);
    ip
}

/// An IPv6 packet holding one ICMPv6 echo request. Unlike ICMP's, the ICMPv6 checksum covers a
/// pseudo-header of both addresses (RFC 4443 2.3): a router drops a request whose sum is wrong.
pub fn echo_request6(src: Ipv6Addr, dst: Ipv6Addr, ident: u16, seq: u16) -> Vec<u8> {
    let mut icmp = echo(ECHO_REQUEST6, ident, seq);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((icmp.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, ICMPV6]);
    pseudo.extend(&icmp);
    let c = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend((icmp.len() as u16).to_be_bytes());
    ip.extend([ICMPV6, 64]); // next header, hop limit
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(icmp);
    ip
}

/// An echo reply, of either family, to one of this round's requests.
pub fn is_our_reply(packet: &[u8], ident: u16, seq: u16) -> bool {
    let icmp = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 && packet[9] == ICMP => {
            let ihl = usize::from(packet[0] & 0xf) * 4;
            &packet[ihl.min(packet.len())..]
        }
        // Echo replies carry no extension headers: the ICMPv6 message follows the fixed header.
        Some(6) if packet.len() >= 40 && packet[6] == ICMPV6 => &packet[40..],
        _ => return false,
    };
    let reply = if packet[0] >> 4 == 4 { ECHO_REPLY4 } else { ECHO_REPLY6 };
    icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_valid_ipv4_and_icmp_and_its_reply_is_recognised() {
        let req = echo_request("192.0.2.1".parse().unwrap(), "198.51.100.9".parse().unwrap(), 0x1234, 7);
        assert_eq!(checksum(&req[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&req[20..]), 0, "ICMP checksum");
        assert_eq!(req[9], 1);
        assert!(!is_our_reply(&req, 0x1234, 7), "a request is not a reply");
        let mut reply = req.clone();
        reply[20] = 0;
        assert!(is_our_reply(&reply, 0x1234, 7));
        assert!(!is_our_reply(&reply, 0x1234, 8), "an earlier round's answer does not count");
        assert!(!is_our_reply(&reply, 0x4321, 7), "another prober's");
        assert!(!is_our_reply(&reply[..24], 0x1234, 7));
    }

    #[test]
    fn an_ipv6_request_sums_with_its_pseudo_header_and_its_reply_is_recognised() {
        let (src, dst): (Ipv6Addr, Ipv6Addr) = ("2001:db8:b::1".parse().unwrap(), "2001:db8:ffff::10".parse().unwrap());
        let req = echo_request6(src, dst, 0xbeef, 3);
        assert_eq!(req.len(), 40 + 8 + PAYLOAD.len());
        assert_eq!((req[0], req[6], req[7]), (0x60, 58, 64), "version, next header, hop limit");
        assert_eq!(u16::from_be_bytes([req[4], req[5]]) as usize, req.len() - 40, "payload length");
        assert_eq!((&req[8..24], &req[24..40]), (&src.octets()[..], &dst.octets()[..]));
        // What the receiver checks: the sum over the pseudo-header and the message is zero.
        let mut pseudo = [&req[8..40], &((req.len() - 40) as u32).to_be_bytes(), &[0, 0, 0, 58], &req[40..]].concat();
        assert_eq!(checksum(&pseudo), 0, "ICMPv6 checksum");
        // The same message from another source fails it: the addresses are summed.
        pseudo[15] ^= 1;
        assert_ne!(checksum(&pseudo), 0);
        assert!(!is_our_reply(&req, 0xbeef, 3), "a request is not a reply");
        let mut reply = req.clone();
        reply[40] = ECHO_REPLY6;
        assert!(is_our_reply(&reply, 0xbeef, 3));
        assert!(!is_our_reply(&reply, 0xbeef, 4), "an earlier round's answer does not count");
        assert!(!is_our_reply(&reply, 0xbee0, 3), "another prober's");
        assert!(!is_our_reply(&reply[..44], 0xbeef, 3));
        let mut not_icmp = reply.clone();
        not_icmp[6] = 17;
        assert!(!is_our_reply(&not_icmp, 0xbeef, 3), "UDP");
        let mut v4_reply_code = reply;
        v4_reply_code[40] = ECHO_REPLY4;
        assert!(!is_our_reply(&v4_reply_code, 0xbeef, 3), "type 0 is no ICMPv6 echo reply");
    }
}
