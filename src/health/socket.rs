//! The probe's packet socket: frames for the uplink's next hop handed to its driver, and the
//! answers read off the same device before IP input (and rp_filter) sees them. One socket per
//! uplink and family, each with a filter that passes only that family's echo replies.

use crate::family::Family;
use nix::libc;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

pub fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn ethertype(family: Family) -> u16 {
    match family {
        Family::Ipv4 => ETH_P_IP,
        Family::Ipv6 => ETH_P_IPV6,
    }
}

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Classic BPF over the network header (a SOCK_DGRAM packet socket strips the link header), so a
/// busy uplink costs the agent nothing between its probes.
fn echo_reply_filter(family: Family) -> Vec<libc::sock_filter> {
    match family {
        // ldb [9]; jeq #1 (icmp); ldx 4*([0]&0xf); ldb [x+0]; jeq #0 (echo reply); ret 65535; ret 0
        Family::Ipv4 => vec![
            op(0x30, 0, 0, 9),
            op(0x15, 0, 4, 1),
            op(0xb1, 0, 0, 0),
            op(0x50, 0, 0, 0),
            op(0x15, 0, 1, 0),
            op(0x06, 0, 0, 0xffff),
            op(0x06, 0, 0, 0),
        ],
        // ldb [6]; jeq #58 (icmpv6); ldb [40]; jeq #129 (echo reply); ret 65535; ret 0
        Family::Ipv6 => vec![
            op(0x30, 0, 0, 6),
            op(0x15, 0, 3, 58),
            op(0x30, 0, 0, 40),
            op(0x15, 0, 1, 129),
            op(0x06, 0, 0, 0xffff),
            op(0x06, 0, 0, 0),
        ],
    }
}

fn link_address(index: u32, family: Family, mac: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ethertype(family).to_be();
    addr.sll_ifindex = index as i32;
    if let Some(mac) = mac {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
    }
    addr
}

/// A packet socket on the uplink that only passes echo replies of `family`.
pub fn open_socket(index: u32, family: Family) -> Result<OwnedFd, String> {
    let proto = ethertype(family).to_be();
    // SAFETY: plain socket call; the fd is owned by OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(proto)) };
    if fd < 0 {
        return Err(os_err("open packet socket (needs CAP_NET_RAW)"));
    }
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let filter = echo_reply_filter(family);
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
    // SAFETY: prog points at `filter`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(os_err("attach the echo-reply filter"));
    }
    let addr = link_address(index, family, None);
    // SAFETY: addr is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(os_err("bind the packet socket to the uplink"));
    }
    Ok(fd)
}

/// One packet as a frame for `mac` (None: a point-to-point link has no link addresses).
pub fn send_frame(
    sock: &OwnedFd,
    index: u32,
    family: Family,
    mac: Option<[u8; 6]>,
    packet: &[u8],
) -> Result<(), String> {
    let addr = link_address(index, family, mac);
    // SAFETY: packet and addr are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            libc::MSG_DONTWAIT,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(os_err("send the echo request"));
    }
    Ok(())
}

/// Let the kernel resolve the next hop (ARP, or a neighbour solicitation for IPv6) as it does for
/// any packet: one datagram to the discard port, bound to the uplink. A link-local next hop needs
/// the uplink as its scope. The answer lands in the neighbour table for the next round.
pub fn kick_resolution(uplink: &str, index: u32, gw: IpAddr) {
    let (bind, dest): (std::net::SocketAddr, std::net::SocketAddr) = match gw {
        IpAddr::V4(v4) => (([0, 0, 0, 0], 0).into(), (v4, 9).into()),
        IpAddr::V6(v6) => {
            let scope = if v6.is_unicast_link_local() { index } else { 0 };
            ((std::net::Ipv6Addr::UNSPECIFIED, 0).into(), std::net::SocketAddrV6::new(v6, 9, 0, scope).into())
        }
    };
    if let Ok(sock) = std::net::UdpSocket::bind(bind) {
        let name = std::ffi::CString::new(uplink).unwrap_or_default();
        let bytes = name.as_bytes_with_nul();
        // SAFETY: the option value is the NUL-terminated device name.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                bytes.as_ptr().cast(),
                bytes.len() as libc::socklen_t,
            )
        };
        let _ = sock.send_to(&[0], dest);
    }
}
