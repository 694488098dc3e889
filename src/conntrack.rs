//! Clearing stale UDP conntrack entries over ctnetlink, without the `conntrack` tool.
//!
//! A client that keeps sending UDP to a host port keeps its conntrack entry alive, and NAT is only
//! decided on a connection's first packet: without this, a re-created pod would never see that
//! traffic. Entries are dumped, matched on their original tuple, and deleted one by one (a DELETE
//! without a tuple would flush the whole table).

use crate::error::{code, Error, Result};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_DST: u16 = 2;
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
    let sock = Socket::open()?;
    let family = if family_v6 { nix::libc::AF_INET6 } else { nix::libc::AF_INET } as u8;
    let mut victims = Vec::new();
    sock.send(&message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, &[]))?;
    sock.receive(|payload| {
        if let Some(orig) = find_attr(payload, CTA_TUPLE_ORIG) {
            if matches_any(orig, flows) {
                let mut attrs = raw_attr(CTA_TUPLE_ORIG | 0x8000, orig);
                if let Some(zone) = find_attr(payload, CTA_ZONE) {
                    attrs.extend(raw_attr(CTA_ZONE, zone));
                }
                victims.push(attrs);
            }
        }
    })?;
    let mut deleted = 0;
    for attrs in victims {
        sock.send(&message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, family, &attrs))?;
        match sock.receive(|_| {}) {
            Ok(()) => deleted += 1,
            // Expired between the dump and the delete: what we wanted anyway.
            Err(e) if e.details == "ENOENT" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
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

/// Iterate netlink attributes (`len`, `type`, payload padded to 4) and return the first of `kind`.
fn find_attr(mut buf: &[u8], kind: u16) -> Option<&[u8]> {
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        if ty == kind {
            return Some(&buf[4..len]);
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    None
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn raw_attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(align4(len));
    out.extend((len as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(payload);
    out.resize(align4(len), 0);
    out
}

fn message(kind: u16, flags: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend((len as u32).to_ne_bytes());
    out.extend(((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(1u32.to_ne_bytes()); // sequence: one request in flight at a time
    out.extend(0u32.to_ne_bytes());
    out.extend([family, 0, 0, 0]); // nfgenmsg: family, NFNETLINK_V0, res_id
    out.extend(attrs);
    out
}

struct Socket {
    fd: OwnedFd,
}

fn errno_error(what: &str) -> Error {
    let e = std::io::Error::last_os_error();
    Error::new(code::IO, format!("conntrack netlink {what}: {e}"))
}

impl Socket {
    fn open() -> Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned immediately.
        let fd = unsafe {
            nix::libc::socket(nix::libc::AF_NETLINK, nix::libc::SOCK_RAW | nix::libc::SOCK_CLOEXEC, NETLINK_NETFILTER)
        };
        if fd < 0 {
            return Err(errno_error("socket"));
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        Ok(Socket { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn send(&self, msg: &[u8]) -> Result<()> {
        // SAFETY: the kernel reads msg.len() bytes from a live slice; a zeroed sockaddr_nl targets the kernel.
        let n = unsafe {
            let mut addr: nix::libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = nix::libc::AF_NETLINK as u16;
            nix::libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const nix::libc::sockaddr_nl).cast(),
                std::mem::size_of::<nix::libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(errno_error("send"));
        }
        Ok(())
    }

    /// Read replies until DONE or an ACK/error, handing each conntrack message's attributes to `f`.
    fn receive(&self, mut f: impl FnMut(&[u8])) -> Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: the kernel writes at most buf.len() bytes into our buffer.
            let n = unsafe { nix::libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(errno_error("recv"));
            }
            let mut data = &buf[..n as usize];
            while data.len() >= 16 {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                if len < 16 || len > data.len() {
                    return Err(Error::new(code::IO, "conntrack netlink: truncated message"));
                }
                let body = &data[16..len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = body.get(..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap())).unwrap_or(0);
                        if errno == 0 {
                            return Ok(());
                        }
                        let err = std::io::Error::from_raw_os_error(-errno);
                        let name = if -errno == nix::libc::ENOENT { "ENOENT" } else { "" };
                        return Err(Error::new(code::IO, format!("conntrack netlink: {err}")).with_details(name));
                    }
                    _ if body.len() >= 4 => f(&body[4..]),
                    _ => {}
                }
                data = &data[align4(len).min(data.len())..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn malformed_attributes_do_not_panic() {
        assert_eq!(find_attr(&[0xff, 0xff, 1, 0], 1), None);
        assert_eq!(find_attr(&[2, 0, 1, 0], 1), None);
        assert!(!matches_any(&[8, 0, 2, 0, 1], &[UdpFlow { port: 1, dst: None }]));
    }
}
