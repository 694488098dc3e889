//! A small synchronous rtnetlink client: ip rules, routes and addresses, one socket per call.
//! Synchronous on purpose: a CNI call is one short-lived process, and an async runtime would cost
//! more to start than the few requests it makes.

use super::{IpRule, Route};
use crate::error::{code, Error, Result};
use ipnetwork::IpNetwork;
use netlink_packet_core::DefaultNla;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::net::IpAddr;

/// A route of the main table, as far as next-hop discovery needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MainRoute {
    pub dst: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub scope_link: bool,
    pub table: u32,
    pub metric: u32,
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
}

fn nl_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(code::ROUTING, format!("{what}: {e}"))
}

/// Kernel error numbers that mean "already so" for an add, or "already gone" for a delete.
pub fn is_exists(e: &Error) -> bool {
    e.details == "EEXIST"
}

pub fn is_absent(e: &Error) -> bool {
    e.details == "ENOENT" || e.details == "ESRCH"
}

impl Netlink {
    pub fn open() -> Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| nl_error("open rtnetlink socket", e))?;
        socket.bind_auto().map_err(|e| nl_error("bind rtnetlink socket", e))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(|e| nl_error("connect rtnetlink socket", e))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Send one request and collect the replies until DONE (dumps) or the ACK.
    pub(super) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|e| nl_error(what, e))?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(|e| nl_error(what, e))?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| nl_error(what, e))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(nl_error(what, "zero-length netlink message"));
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    // An ACK ends a request; inside a dump it is not expected and ignored.
                    NetlinkPayload::Error(err) if err.code.is_none() && !dump => return Ok(out),
                    NetlinkPayload::Error(err) if err.code.is_none() => {}
                    NetlinkPayload::Error(err) => {
                        let io = err.to_io();
                        let name = match io.raw_os_error() {
                            Some(nix::libc::EEXIST) => "EEXIST",
                            Some(nix::libc::ENOENT) => "ENOENT",
                            Some(nix::libc::ESRCH) => "ESRCH",
                            Some(nix::libc::ENODEV) => "ENODEV",
                            Some(nix::libc::ENETUNREACH) => "ENETUNREACH",
                            _ => "",
                        };
                        return Err(Error::new(code::ROUTING, format!("{what}: {io}")).with_details(name));
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    pub fn rules(&mut self) -> Result<Vec<IpRule>> {
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRule(msg), NLM_F_REQUEST | NLM_F_DUMP, "dump ip rules")?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => rule_from_message(&r),
                _ => None,
            })
            .collect())
    }

    pub fn add_rule(&mut self, rule: &IpRule) -> Result<()> {
        let msg = rule_message(rule);
        self.request(
            RouteNetlinkMessage::NewRule(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &format!("add {rule}"),
        )
        .map(|_| ())
    }

    pub fn del_rule(&mut self, rule: &IpRule) -> Result<()> {
        let msg = rule_message(rule);
        self.request(RouteNetlinkMessage::DelRule(msg), NLM_F_REQUEST | NLM_F_ACK, &format!("delete {rule}"))
            .map(|_| ())
    }

    /// IPv4 routes of one table (the kernel filters the dump by table when asked strictly; we
    /// filter again since older kernels return every table).
    pub fn routes(&mut self, table: u32) -> Result<Vec<MainRoute>> {
        Ok(self.all_routes()?.into_iter().filter(|r| r.table == table).collect())
    }

    /// Every IPv4 unicast route of every table.
    pub fn all_routes(&mut self) -> Result<Vec<MainRoute>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST | NLM_F_DUMP, "dump routes")?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if r.header.kind == RouteType::Unicast => main_route_from_message(&r),
                _ => None,
            })
            .collect())
    }

    /// An IPv4 address configured with a peer (`ip addr add A peer B`): point-to-point addressing.
    pub fn has_peer_address(&mut self, index: u32) -> Result<bool> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies =
            self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_REQUEST | NLM_F_DUMP, "dump addresses")?;
        Ok(replies.iter().any(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                let find = |local: bool| {
                    a.attributes.iter().find_map(|x| match (x, local) {
                        (AddressAttribute::Local(ip), true) | (AddressAttribute::Address(ip), false) => Some(*ip),
                        _ => None,
                    })
                };
                matches!((find(true), find(false)), (Some(l), Some(p)) if l != p)
            }
            _ => false,
        }))
    }

    pub fn replace_route(&mut self, route: &Route, oif: u32) -> Result<()> {
        let msg = route_message(route, oif);
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &format!("add {route}"),
        )
        .map(|_| ())
    }

    pub fn del_route(&mut self, route: &Route) -> Result<()> {
        let mut msg = route_message(route, 0);
        // Delete by table and destination alone: the next hop may have changed since.
        msg.attributes.retain(|a| matches!(a, RouteAttribute::Destination(_) | RouteAttribute::Table(_)));
        msg.header.scope = RouteScope::NoWhere;
        msg.header.protocol = RouteProtocol::Unspec;
        self.request(RouteNetlinkMessage::DelRoute(msg), NLM_F_REQUEST | NLM_F_ACK, &format!("delete {route}"))
            .map(|_| ())
    }

    /// IPv4 addresses (with prefix) on the link with this index.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNetwork>> {
        self.addresses_where(AddressFamily::Inet, Some(index))
    }

    /// Every address of the node, both families: what "addressed to the node" means.
    pub fn local_addresses(&mut self) -> Result<Vec<IpAddr>> {
        let mut all = self.addresses_where(AddressFamily::Inet, None)?;
        all.extend(self.addresses_where(AddressFamily::Inet6, None)?);
        Ok(all.into_iter().map(|n| n.ip()).collect())
    }

    fn addresses_where(&mut self, family: AddressFamily, index: Option<u32>) -> Result<Vec<IpNetwork>> {
        let mut msg = AddressMessage::default();
        msg.header.family = family;
        let replies =
            self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_REQUEST | NLM_F_DUMP, "dump addresses")?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if index.is_none_or(|i| a.header.index == i) => {
                    // IPv6 addresses carry only IFA_ADDRESS; IPv4 ones IFA_LOCAL too (the peer
                    // sits in IFA_ADDRESS on point-to-point links).
                    let local = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let address = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    IpNetwork::new(local.or(address)?, a.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }

    /// Set one IPv4 per-interface setting (`IPV4_DEVCONF_*`), as writing
    /// /proc/sys/net/ipv4/conf/IF/KEY does, but over rtnetlink: a container without privileges has
    /// /proc/sys read-only and CAP_NET_ADMIN still allows this.
    pub fn set_ipv4_conf(&mut self, index: u32, key: u16, value: u32) -> Result<()> {
        // IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { key: value } } }
        let nla = |kind: u16, payload: &[u8]| -> Vec<u8> {
            let mut b = Vec::with_capacity(4 + payload.len());
            b.extend(((4 + payload.len()) as u16).to_ne_bytes());
            b.extend(kind.to_ne_bytes());
            b.extend(payload);
            b.resize((b.len() + 3) & !3, 0);
            b
        };
        const IFLA_AF_SPEC: u16 = 26;
        const IFLA_INET_CONF: u16 = 1;
        let conf = nla(IFLA_INET_CONF, &nla(key, &value.to_ne_bytes()));
        let inet = nla(nix::libc::AF_INET as u16, &conf);
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Other(DefaultNla::new(IFLA_AF_SPEC, inet)));
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK, "set an interface's IPv4 setting")
            .map(|_| ())
    }

    pub fn add_address(&mut self, index: u32, addr: IpNetwork) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = addr.prefix();
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.ip()));
        msg.attributes.push(AddressAttribute::Address(addr.ip()));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {addr}"),
        )
        .map(|_| ())
    }
}

/// Interface index by name; None when the interface does not exist (yet).
pub fn link_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let idx = unsafe { nix::libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

fn rule_message(rule: &IpRule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.action = RuleAction::ToTable;
    msg.header.table = if rule.table < 256 { rule.table as u8 } else { 0 };
    msg.attributes.push(RuleAttribute::Priority(rule.priority));
    msg.attributes.push(RuleAttribute::Table(rule.table));
    if let Some((mark, mask)) = rule.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(net) = rule.from {
        msg.header.src_len = net.prefix();
        msg.attributes.push(RuleAttribute::Source(net.network()));
    }
    if rule.suppress_default {
        msg.attributes.push(RuleAttribute::SuppressPrefixLen(0));
    }
    msg
}

fn rule_from_message(msg: &RuleMessage) -> Option<IpRule> {
    if msg.header.action != RuleAction::ToTable {
        return None;
    }
    let mut rule =
        IpRule { priority: 0, table: u32::from(msg.header.table), fwmark: None, from: None, suppress_default: false };
    let (mut mark, mut mask) = (None, None);
    for a in &msg.attributes {
        match a {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Source(ip) => rule.from = IpNetwork::new(*ip, msg.header.src_len).ok(),
            RuleAttribute::SuppressPrefixLen(0) => rule.suppress_default = true,
            _ => {}
        }
    }
    if let Some(m) = mark.filter(|m| *m != 0) {
        rule.fwmark = Some((m, mask.unwrap_or(u32::MAX)));
    }
    Some(rule)
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn main_route_from_message(msg: &RouteMessage) -> Option<MainRoute> {
    let mut dst: IpAddr = IpAddr::from([0, 0, 0, 0]);
    let mut route = MainRoute {
        dst: IpNetwork::new(dst, 0).ok()?,
        gateway: None,
        oif: 0,
        scope_link: msg.header.scope == RouteScope::Link,
        table: route_table(msg),
        metric: 0,
    };
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = IpAddr::V4(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(IpAddr::V4(*ip)),
            RouteAttribute::Oif(i) => route.oif = *i,
            RouteAttribute::Priority(m) => route.metric = *m,
            _ => {}
        }
    }
    route.dst = IpNetwork::new(dst, msg.header.destination_prefix_length).ok()?;
    Some(route)
}

fn route_message(route: &Route, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: AddressFamily::Inet,
        destination_prefix_length: route.dst.prefix(),
        table: if route.table < 256 { route.table as u8 } else { 0 },
        protocol: RouteProtocol::Static,
        scope: if route.gateway.is_some() { RouteScope::Universe } else { RouteScope::Link },
        kind: RouteType::Unicast,
        ..RouteHeader::default()
    };
    msg.attributes.push(RouteAttribute::Table(route.table));
    if route.dst.prefix() != 0 {
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(route.dst.network())));
    }
    if let Some(gw) = route.gateway {
        msg.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if oif != 0 {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}
