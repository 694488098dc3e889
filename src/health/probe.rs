//! ICMP echo through one uplink in one family, below routing. A probe must say whether the
//! uplink's provider carries traffic, whatever the node's routing says: main's default may be
//! another uplink, the uplink's default may live only in a table, and strict rp_filter drops an
//! answer that arrives on an uplink main would not use to reach the target. So the echo request is handed to the uplink's
//! driver as a frame for its next hop (AF_PACKET), and the answer is read off the same device
//! before IP input (and rp_filter) sees it. No table is used, in particular not the one a
//! failover switches. IPv6 is probed the same way (ICMPv6 echo from the uplink's stable global
//! address to its IPv6 next hop, often a link-local router from advertisements), each family by
//! a probe of its own: an uplink may carry one family and not the other (an IPv6-only 5G plan).

use super::packet::{echo_request, echo_request6, is_our_reply};
use super::socket::{kick_resolution, open_socket, os_err, send_frame};
use super::tracker::Round;
use crate::family::{family_of, Family};
use crate::routing::apply::uplink_gateway;
use crate::routing::netlink::{link_index, Netlink};
use crate::routing::stable6;
use nix::libc;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub struct Probe {
    pub uplink: String,
    pub family: Family,
    ifindex: u32,
    sock: Option<OwnedFd>,
    ident: u16,
    seq: u16,
    answered: bool,
    /// Why the round cannot be answered, decided when it was sent (link down, no next hop...).
    unusable: Option<String>,
    /// The uplink's address of the family when the round was sent: the one masqueraded pod flows
    /// carry.
    pub address: Option<IpAddr>,
    /// When the round was sent, and how long its first answer took (as the agent read it).
    sent: Option<Instant>,
    pub rtt: Option<Duration>,
}

impl Probe {
    pub fn new(uplink: &str, family: Family) -> Probe {
        let ident = (std::process::id() as u16) ^ (uplink.bytes().fold(0u16, |h, b| h.rotate_left(5) ^ u16::from(b)));
        Probe {
            uplink: uplink.into(),
            family,
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

    /// Start a round: check the link, then send one echo request per target of the family.
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
        // One rtnetlink socket for the round's questions, opened only when one is asked.
        let mut nl = None;
        let src = match self.family {
            Family::Ipv4 => link.address.map(IpAddr::V4),
            // The address the pods' IPv6 is translated to when it leaves by this uplink.
            Family::Ipv6 => {
                let nl = netlink(&mut nl)?;
                stable6::choose(&stable6::addresses(nl, index).map_err(|e| e.to_string())?).map(IpAddr::V6)
            }
        };
        // A link-local address is no IPv6 the provider routes, and one about to go (deprecated) or
        // not yet usable (tentative) carries no pod: the uplink does not carry IPv6 for the pods.
        let scope = if self.family.is_ipv4() { "" } else { "stable global " };
        let Some(src) = src else { return Err(format!("no {scope}{} address", name(self.family))) };
        self.address = Some(src);
        let targets: Vec<IpAddr> = targets.iter().copied().filter(|t| family_of(*t) == self.family).collect();
        if targets.is_empty() {
            // Link state (and an address of the family) alone decides.
            self.answered = true;
            return Ok(());
        }
        if self.sock.is_none() || self.ifindex != index {
            self.sock = Some(open_socket(index, self.family)?);
            self.ifindex = index;
        }
        // Point-to-point links (cellular modems) have no link addresses to send to.
        let mac =
            if link.noarp { None } else { Some(next_hop_mac(netlink(&mut nl)?, &self.uplink, index, self.family)?) };
        let sock = self.sock.as_ref().expect("opened above");
        for target in targets {
            let packet = match (src, target) {
                (IpAddr::V4(s), IpAddr::V4(t)) => echo_request(s, t, self.ident, self.seq),
                (IpAddr::V6(s), IpAddr::V6(t)) => echo_request6(s, t, self.ident, self.seq),
                _ => continue,
            };
            send_frame(sock, index, self.family, mac, &packet)?;
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
    /// anything (down, no carrier) or nothing of this family (no address of it): no need to wait
    /// for answers.
    pub fn take_unusable(&mut self) -> Option<Round> {
        let link_state = |w: &str| w.starts_with("link") || w.starts_with("no carrier");
        let no_address = |w: &str| w.starts_with("no ") && w.ends_with(" address");
        match self.unusable.take_if(|why| link_state(why) || no_address(why)) {
            Some(why) if no_address(&why) => Some(Round::NoAddress(why)),
            other => other.map(Round::Unusable),
        }
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

/// How the family is named in reasons and logs.
pub fn name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

fn netlink(slot: &mut Option<Netlink>) -> Result<&mut Netlink, String> {
    if slot.is_none() {
        *slot = Some(Netlink::open().map_err(|e| e.to_string())?);
    }
    Ok(slot.as_mut().expect("opened above"))
}

/// The MAC of the uplink's next hop of the family, from the node's neighbour table. When there is
/// none yet, the kernel is made to resolve it for the next round, as it would for any packet.
fn next_hop_mac(nl: &mut Netlink, uplink: &str, index: u32, family: Family) -> Result<[u8; 6], String> {
    let gw = uplink_gateway(nl, uplink, index, family)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no {} next hop on {uplink}", name(family)))?;
    if let Some(mac) = nl.lookup_neighbour(index, gw).ok().flatten().and_then(|e| e.mac) {
        return Ok(mac);
    }
    kick_resolution(uplink, index, gw);
    Err(format!("next hop {gw} not resolved yet"))
}
