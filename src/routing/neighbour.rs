//! The node's neighbour entries for a pod's addresses on the bridge. A pod re-created with the same
//! address gets a new veth and a new MAC, but the node's entry still holds the old MAC and may stay
//! REACHABLE for many seconds; the bridge plugin sends no gratuitous ARP, so DNAT'd traffic would go
//! to a MAC that no longer exists. ADD therefore sets the entry to the MAC prevResult reports.

use super::netlink::{is_absent, Netlink};
use crate::error::Result;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::IpAddr;

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

impl Netlink {
    /// Point the node's entry for `ip` on the bridge at `mac`, or forget it when the MAC is unknown
    /// (the kernel then resolves afresh on the next packet). Only this one entry is touched.
    pub fn refresh_neighbour(&mut self, ifindex: u32, ip: IpAddr, mac: Option<[u8; 6]>) -> Result<()> {
        let mut msg = message(ifindex, ip);
        let Some(mac) = mac else {
            return match self.request(
                RouteNetlinkMessage::DelNeighbour(msg),
                NLM_F_REQUEST | NLM_F_ACK,
                &format!("delete neighbour {ip}"),
            ) {
                Err(e) if !is_absent(&e) => Err(e),
                _ => Ok(()),
            };
        };
        // STALE, not REACHABLE or PERMANENT: a STALE entry is used at once, so the first packet goes
        // to the new MAC without waiting for ARP/NDP, and the kernel re-verifies it (DELAY, PROBE)
        // as for any learnt entry, so a wrong MAC heals itself and the entry ages out as usual.
        msg.header.state = NeighbourState::Stale;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &format!("replace neighbour {ip}"),
        )
        .map(|_| ())
    }
}
