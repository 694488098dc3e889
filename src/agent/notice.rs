//! Kernel notifications, reduced to what the agent decides on. A pod's start raises a dozen of them
//! (its veth appears, joins the bridge, gets an IPv6 link-local address and routes, our table gets
//! elements): none can concern a record, and a pass for each would cost (events) × (pods).

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::AddressScope;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::net::IpAddr;

/// One notification, as far as it matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A link appeared, changed or went away; `state` is its up/running/lower-up flags.
    Link { index: u32, name: String, state: u32, gone: bool },
    /// An address came or went; IPv6 link-local ones are not reported.
    Address { index: u32 },
    /// A unicast route came or went (not in the local table, not IPv6 link-local or multicast).
    Route { table: u32, oif: Option<u32> },
    /// An ip rule came or went.
    Rule,
    /// A netfilter object changed in the named table (set elements and generation bumps are left
    /// out: CNI calls add and remove elements all day).
    Netfilter { table: String },
    /// Notifications were lost (ENOBUFS), or one could not be read: anything may have changed.
    Lost,
}

const LOCAL_TABLE: u32 = 255;

/// The notices in one buffer of rtnetlink messages.
pub fn parse_route(buf: &[u8], out: &mut Vec<Notice>) {
    let mut offset = 0;
    while offset + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || offset + len > buf.len() {
            break;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..offset + len]) {
            Ok(msg) => {
                if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                    out.extend(route_notice(inner));
                }
            }
            Err(_) => out.push(Notice::Lost),
        }
        offset += (len + 3) & !3;
    }
}

fn route_notice(msg: RouteNetlinkMessage) -> Option<Notice> {
    use RouteNetlinkMessage as M;
    match msg {
        M::NewLink(l) => Some(link(&l, false)),
        M::DelLink(l) => Some(link(&l, true)),
        M::NewAddress(a) | M::DelAddress(a) => {
            let link_local = a.header.family == AddressFamily::Inet6 && a.header.scope == AddressScope::Link;
            (!link_local).then_some(Notice::Address { index: a.header.index })
        }
        M::NewRoute(r) | M::DelRoute(r) => {
            let table = r
                .attributes
                .iter()
                .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
                .unwrap_or(u32::from(r.header.table));
            let oif = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                _ => None,
            });
            let v6_link_scoped = dst.is_some_and(|ip| match ip {
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast(),
                IpAddr::V4(_) => false,
            });
            let never_ours = table == LOCAL_TABLE || r.header.kind != RouteType::Unicast || v6_link_scoped;
            (!never_ours).then_some(Notice::Route { table, oif })
        }
        M::NewRule(_) | M::DelRule(_) => Some(Notice::Rule),
        _ => None,
    }
}

fn link(l: &netlink_packet_route::link::LinkMessage, gone: bool) -> Notice {
    let name = l
        .attributes
        .iter()
        .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
        .unwrap_or_default();
    let state = (l.header.flags & (LinkFlags::Up | LinkFlags::Running | LinkFlags::LowerUp)).bits();
    Notice::Link { index: l.header.index, name, state, gone }
}

// nf_tables message types (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_*) that say nothing about rules.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
/// Every nf_tables object's first attribute is the name of its table (NFTA_*_TABLE = 1).
const NFTA_TABLE: u16 = 1;

/// The notices in one buffer of nfnetlink messages.
pub fn parse_netfilter(buf: &[u8], out: &mut Vec<Notice>) {
    let mut offset = 0;
    while offset + 20 <= buf.len() {
        let len = u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        if len < 20 || offset + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[offset + 4], buf[offset + 5]]);
        let (subsys, msg) = (kind >> 8, kind & 0xff);
        let skip =
            subsys != NFNL_SUBSYS_NFTABLES || matches!(msg, NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM | NFT_MSG_NEWGEN);
        if !skip {
            // After the 16-byte header and the 4-byte nfgenmsg come the attributes.
            let table = table_name(&buf[offset + 20..offset + len]);
            out.push(table.map_or(Notice::Lost, |table| Notice::Netfilter { table }));
        }
        offset += (len + 3) & !3;
    }
}

fn table_name(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFTA_TABLE {
            let value = &attrs[4..len];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]).into_owned());
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests;
