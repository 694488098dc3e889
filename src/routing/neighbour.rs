//! The node's neighbour entries for a pod's addresses on the bridge. A pod re-created with the same
//! address gets a new veth and a new MAC, but the node's entry still holds the old MAC and may stay
//! REACHABLE for many seconds; the bridge plugin sends no gratuitous ARP, so DNAT'd traffic would go
//! to a MAC that no longer exists. ADD therefore deletes such an entry, and touches no other:
//!
//! - the entry is judged against the MAC the pod's interface really has, read in `CNI_NETNS`.
//!   prevResult's MAC is only a claim: one entry pointed at a wrong MAC black-holes the pod (a STALE
//!   entry is used for ~5 s, then probed by unicast to that MAC before the kernel gives up on it);
//! - a wrong entry is deleted, not pointed at the right MAC: the node then resolves the pod on the
//!   first packet, and the pod learns the gateway's MAC from that request. A pre-seeded entry
//!   instead makes the pod broadcast for its gateway; on a bridge with ~1,000 ports the node's
//!   answer is queued behind the flood's copies and dropped, and the first connection took seconds
//!   (tests/first_packet.rs). Deleting costs one ARP/NDP round trip;
//! - an address the node has no entry for is left alone: creating entries grew the node's table by
//!   one per pod (hundreds, above `gc_thresh2`) and had the same flooding cost.

use super::netlink::{is_absent, Netlink};
use crate::error::{code, Error, Result};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::IpAddr;
use std::os::fd::AsRawFd;

pub type Mac = [u8; 6];

/// The node's entry for one address, as far as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// None for an entry still resolving or that failed to (INCOMPLETE, FAILED).
    pub mac: Option<Mac>,
}

/// What ADD does to the node's entry for one of the pod's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Delete it, so the kernel resolves the address afresh on the next packet.
    Forget,
}

/// `existing`: the node's entry for the address (None: there is none); `real`: the MAC the pod's
/// interface has, when it could be read; `reported`: prevResult's MAC for the pod.
///
/// Without an entry nothing is done, whatever the MACs (no entry is ever created). With the real
/// MAC known, an entry that differs from it goes, one that agrees stays. Without it (the namespace
/// cannot be read, or the interface is not there), an entry that agrees with prevResult stays, as
/// nothing says it is wrong, and any other goes: if it was right, that costs one round trip.
pub fn choose_action(existing: Option<Entry>, real: Option<Mac>, reported: Option<Mac>) -> Action {
    let Some(entry) = existing else { return Action::Keep };
    let trusted = real.or(reported);
    if entry.mac.is_some() && entry.mac == trusted {
        Action::Keep
    } else {
        Action::Forget
    }
}

fn message(ifindex: u32, ip: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.ifindex = ifindex;
    let dst = match ip {
        IpAddr::V4(a) => {
            msg.header.family = AddressFamily::Inet;
            NeighbourAddress::Inet(a)
        }
        IpAddr::V6(a) => {
            msg.header.family = AddressFamily::Inet6;
            NeighbourAddress::Inet6(a)
        }
    };
    msg.attributes.push(NeighbourAttribute::Destination(dst));
    msg
}

fn to_mac(bytes: &[u8]) -> Option<Mac> {
    bytes.try_into().ok()
}

impl Netlink {
    /// The node's entry for `ip` on the interface `ifindex`, by one RTM_GETNEIGH (not a dump: a
    /// busy bridge has an entry per talking pod).
    pub fn lookup_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> Result<Option<Entry>> {
        let replies = match self.request(
            RouteNetlinkMessage::GetNeighbour(message(ifindex, ip)),
            NLM_F_REQUEST | NLM_F_ACK,
            &format!("look up neighbour {ip}"),
        ) {
            Err(e) if is_absent(&e) => return Ok(None),
            other => other?,
        };
        Ok(replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => Some(Entry {
                mac: n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(b) => to_mac(b),
                    _ => None,
                }),
            }),
            _ => None,
        }))
    }

    pub fn delete_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> Result<()> {
        match self.request(
            RouteNetlinkMessage::DelNeighbour(message(ifindex, ip)),
            NLM_F_REQUEST | NLM_F_ACK,
            &format!("delete neighbour {ip}"),
        ) {
            Err(e) if !is_absent(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// The MAC of the interface `ifname` in this socket's namespace; None when there is no such
    /// interface or it has no 6-byte address.
    pub fn read_link_mac(&mut self, ifname: &str) -> Result<Option<Mac>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(ifname.to_string()));
        let replies = match self.request(
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_REQUEST | NLM_F_ACK,
            &format!("look up link {ifname}"),
        ) {
            Err(e) if is_absent(&e) || e.details == "ENODEV" => return Ok(None),
            other => other?,
        };
        Ok(replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(b) => to_mac(b),
                _ => None,
            }),
            _ => None,
        }))
    }
}

/// The MAC of `ifname` inside the network namespace at `netns` (CNI_NETNS): one RTM_GETLINK on a
/// socket opened in that namespace. The socket is made by a short-lived thread that enters the
/// namespace (setns changes only the calling thread's namespace), so the process itself never
/// leaves the node's and no way back has to be found if something fails halfway. The thread is
/// joined before this returns: the process is single-threaded again when netlink/closer.rs forks.
pub fn read_pod_mac(netns: &str, ifname: &str) -> Result<Option<Mac>> {
    let (netns, ifname) = (netns.to_string(), ifname.to_string());
    let worker = std::thread::Builder::new().name("pod-netns".into()).spawn(move || -> Result<Option<Mac>> {
        let file = std::fs::File::open(&netns).map_err(|e| Error::io(format!("open {netns}"), e))?;
        // SAFETY: setns reads a descriptor we own; it affects only this thread.
        if unsafe { nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io(format!("enter network namespace {netns}"), e));
        }
        Netlink::open()?.read_link_mac(&ifname)
    });
    let worker = worker.map_err(|e| Error::io("start a thread to read the pod's interface", e))?;
    worker.join().unwrap_or_else(|_| Err(Error::new(code::INTERNAL, "the thread reading the pod's interface panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: Mac = [2, 0, 0, 0, 0, 1];
    const REAL: Mac = [2, 0, 0, 0, 0, 2];
    const WRONG: Mac = [2, 0, 0, 0, 0, 3];

    fn entry(mac: Option<Mac>) -> Option<Entry> {
        Some(Entry { mac })
    }

    #[test]
    fn no_entry_is_never_created() {
        for real in [None, Some(REAL)] {
            for reported in [None, Some(REAL), Some(WRONG)] {
                assert_eq!(choose_action(None, real, reported), Action::Keep, "real {real:?}, reported {reported:?}");
            }
        }
    }

    #[test]
    fn entry_of_a_recreated_pod_is_forgotten() {
        assert_eq!(choose_action(entry(Some(OLD)), Some(REAL), Some(REAL)), Action::Forget);
        // An entry still resolving, or that failed to (no MAC shown), goes too.
        assert_eq!(choose_action(entry(None), Some(REAL), Some(REAL)), Action::Forget);
    }

    #[test]
    fn wrong_reported_mac_never_keeps_a_wrong_entry() {
        assert_eq!(choose_action(entry(Some(OLD)), Some(REAL), Some(WRONG)), Action::Forget);
        assert_eq!(choose_action(entry(Some(WRONG)), Some(REAL), Some(WRONG)), Action::Forget);
        assert_eq!(choose_action(entry(Some(REAL)), Some(REAL), Some(WRONG)), Action::Keep);
        assert_eq!(choose_action(entry(Some(OLD)), None, Some(WRONG)), Action::Forget);
    }

    #[test]
    fn right_entry_is_kept() {
        assert_eq!(choose_action(entry(Some(REAL)), Some(REAL), None), Action::Keep);
        assert_eq!(choose_action(entry(Some(REAL)), None, Some(REAL)), Action::Keep);
    }

    #[test]
    fn unverifiable_entry_is_forgotten() {
        assert_eq!(choose_action(entry(Some(OLD)), None, Some(REAL)), Action::Forget);
        assert_eq!(choose_action(entry(Some(OLD)), None, None), Action::Forget);
        assert_eq!(choose_action(entry(None), None, Some(REAL)), Action::Forget);
        assert_eq!(choose_action(entry(None), None, None), Action::Forget);
    }
}
