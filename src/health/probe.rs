//! ICMP echo through one uplink, below routing. A probe must say whether the uplink's provider
//! carries traffic, whatever the node's routing says: main's default may be another uplink, the
//! uplink's default may live only in a table, and strict rp_filter drops an answer that arrives on
//! an uplink main would not use to reach the target. So the echo request is handed to the uplink's
//! driver as a frame for its next hop (AF_PACKET), and the answer is read off the same device
//! before IP input (and rp_filter) sees it. No table is used, in particular not the one a
//! failover switches.

use crate::routing::apply::uplink_gateway;
use crate::routing::netlink::{link_index, Netlink};
use nix::libc;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::tracker::Round;

const ETH_P_IP: u16 = 0x0800;

pub struct Probe {
    pub uplink: String,
    ifindex: u32,
    sock: Option<OwnedFd>,
    ident: u16,
    seq: u16,
    answered: bool,
    /// Why the round cannot be answered, decided when it was sent (link down, no next hop...).
    unusable: Option<String>,
    /// The uplink's address when the round was sent: the one masqueraded pod flows carry.
    pub address: Option<Ipv4Addr>,
    /// When the round was sent, and how long its first answer took (as the agent read it).
    sent: Option<Instant>,
    pub rtt: Option<Duration>,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

impl Probe {
    pub fn new(uplink: &str) -> Probe {
        let ident = (std::process::id() as u16) ^ (uplink.bytes().fold(0u16, |h, b| h.rotate_left(5) ^ u16::from(b)));
        Probe {
            uplink: uplink.into(),
            ifindex: 0,
            sock: None,
            ident,
            seq: 0,
            answered: false,
            unusable: None,
            address: None,
            sent: None,
            rtt: None,
        }
    }

    /// The socket replies arrive on, while a round is open.
    pub fn fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    /// Start a round: check the link, then send one echo request per target.
    pub fn send_round(&mut self, targets: &[IpAddr]) {
        self.answered = false;
        (self.sent, self.rtt) = (Some(Instant::now()), None);
        self.seq = self.seq.wrapping_add(1);
        self.unusable = self.try_send(targets).err();
    }

    fn try_send(&mut self, targets: &[IpAddr]) -> Result<(), String> {
        let Some(index) = link_index(&self.uplink) else {
            self.sock = None;
            return Err("link absent".into());
        };
        let link = LinkState::read(&self.uplink)?;
        if !link.up {
            return Err("link down".into());
        }
        if !link.running {
            return Err("no carrier".into());
        }
        let Some(src) = link.address else { return Err("no IPv4 address".into()) };
        self.address = Some(src);
        if targets.is_empty() {
            // Link state alone decides.
            self.answered = true;
            return Ok(());
        }
        if self.sock.is_none() || self.ifindex != index {
            self.sock = Some(open_socket(index)?);
            self.ifindex = index;
        }
        let mac = if link.noarp { None } else { Some(next_hop_mac(&self.uplink, index)?) };
        let sock = self.sock.as_ref().expect("opened above");
        for target in targets.iter().filter_map(|t| if let IpAddr::V4(v4) = t { Some(*v4) } else { None }) {
            let packet = echo_request(src, target, self.ident, self.seq);
            send_frame(sock, index, mac, &packet)?;
        }
        Ok(())
    }

    /// Read what arrived; true once an answer of this round came.
    pub fn read_replies(&mut self) -> bool {
        let Some(sock) = self.sock.as_ref() else { return self.answered };
        let mut buf = [0u8; 1500];
        loop {
            // SAFETY: buf is valid for its length; MSG_DONTWAIT never blocks.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
            if is_our_reply(&buf[..n as usize], self.ident, self.seq) {
                self.answered = true;
                self.rtt = self.rtt.or(self.sent.map(|t| t.elapsed()));
            }
        }
        self.answered
    }

    /// The round's verdict already, when no probe could be sent because the uplink cannot carry
    /// anything (down, no carrier, no address): no need to wait for answers.
    pub fn take_unusable(&mut self) -> Option<Round> {
        let link_state = |w: &str| w.starts_with("link") || w.starts_with("no carrier") || w.starts_with("no IPv4");
        self.unusable.take_if(|why| link_state(why)).map(Round::Unusable)
    }

    /// Close the round.
    pub fn finish_round(&mut self) -> Round {
        self.read_replies();
        match self.unusable.take() {
            Some(why) => Round::Silent(why),
            None if self.answered => Round::Answered,
            None => Round::Silent("no answer from the targets".into()),
        }
    }
}

struct LinkState {
    up: bool,
    running: bool,
    noarp: bool,
    address: Option<Ipv4Addr>,
}

impl LinkState {
    /// Two ioctls: flags, and the primary IPv4 address.
    fn read(name: &str) -> Result<LinkState, String> {
        // SAFETY: a plain datagram socket, closed by OwnedFd.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(os_err("socket"));
        }
        // SAFETY: fd was just opened and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *dst = src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS fills ifr_flags of a valid ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(os_err("read link flags"));
        }
        // SAFETY: the union holds flags after SIOCGIFFLAGS.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        let noarp = flags & (libc::IFF_NOARP | libc::IFF_POINTOPOINT) != 0;
        // SAFETY: SIOCGIFADDR fills ifr_addr; it fails with EADDRNOTAVAIL without an address.
        let address = if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFADDR, &mut req) } < 0 {
            None
        } else {
            // SAFETY: for AF_INET the sockaddr is a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::mem::transmute_copy(&req.ifr_ifru.ifru_addr) };
            Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
        };
        Ok(LinkState { up: flags & libc::IFF_UP != 0, running: flags & libc::IFF_RUNNING != 0, noarp, address })
    }
}

/// The MAC of the uplink's next hop, from the node's neighbour table. When there is none yet, a
/// datagram to the next hop makes the kernel resolve it for the next round.
fn next_hop_mac(uplink: &str, index: u32) -> Result<[u8; 6], String> {
    let mut nl = Netlink::open().map_err(|e| e.to_string())?;
    let gw = uplink_gateway(&mut nl, uplink, index)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no next hop on {uplink}"))?;
    if let Some(mac) = nl.lookup_neighbour(index, gw).ok().flatten().and_then(|e| e.mac) {
        return Ok(mac);
    }
    kick_resolution(uplink, gw);
    Err(format!("next hop {gw} not resolved yet"))
}

fn kick_resolution(uplink: &str, gw: IpAddr) {
    if let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") {
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
        let _ = sock.send_to(&[0], (gw, 9));
    }
}

/// A packet socket on the uplink that only passes ICMP echo replies (classic BPF), so a busy
/// uplink costs the agent nothing between its probes.
fn open_socket(index: u32) -> Result<OwnedFd, String> {
    let proto = ETH_P_IP.to_be();
    // SAFETY: plain socket call; the fd is owned by OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(proto)) };
    if fd < 0 {
        return Err(os_err("open packet socket (needs CAP_NET_RAW)"));
    }
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // ldb [9]; jeq #1 (icmp); ldx 4*([0]&0xf); ldb [x+0]; jeq #0 (echo reply); ret 65535; ret 0
    let filter = [
        libc::sock_filter { code: 0x30, jt: 0, jf: 0, k: 9 },
        libc::sock_filter { code: 0x15, jt: 0, jf: 4, k: 1 },
        libc::sock_filter { code: 0xb1, jt: 0, jf: 0, k: 0 },
        libc::sock_filter { code: 0x50, jt: 0, jf: 0, k: 0 },
        libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: 0 },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0xffff },
        libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0 },
    ];
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
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
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

fn send_frame(sock: &OwnedFd, index: u32, mac: Option<[u8; 6]>, packet: &[u8]) -> Result<(), String> {
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_IP.to_be();
    addr.sll_ifindex = index as i32;
    if let Some(mac) = mac {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
    }
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

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet holding one ICMP echo request.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend(ident.to_be_bytes());
    icmp.extend(seq.to_be_bytes());
    icmp.extend(b"bridge-nat probe");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend(total.to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 1, 0, 0]); // id 0, don't fragment, ttl 64, icmp
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend(icmp);
    ip
}

/// An echo reply to one of this round's requests.
pub fn is_our_reply(packet: &[u8], ident: u16, seq: u16) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 1 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0xf) * 4;
    let icmp = &packet[ihl.min(packet.len())..];
    icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes()
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
}
