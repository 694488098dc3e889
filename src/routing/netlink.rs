//! A small synchronous rtnetlink client: ip rules, routes and addresses, one socket per call.
//! Synchronous on purpose: a CNI call is one short-lived process, and an async runtime would cost
//! more to start than the few requests it makes.

pub use super::messages::MainRoute;
use super::messages::{address_family, route_message, routes_from_message, rule_from_message, rule_message};
use super::{IpRule, Route};
use crate::error::{code, Error, Result};
use crate::family::Family;
use ipnetwork::IpNetwork;
use netlink_packet_core::DefaultNla;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::net::IpAddr;

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
                            Some(nix::libc::EAFNOSUPPORT) => "EAFNOSUPPORT",
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

    /// The ip rules of both families.
    pub fn rules(&mut self) -> Result<Vec<IpRule>> {
        let mut out = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            let mut msg = RuleMessage::default();
            msg.header.family = address_family(family);
            let replies = allow_missing_family(self.request(
                RouteNetlinkMessage::GetRule(msg),
                NLM_F_REQUEST | NLM_F_DUMP,
                "dump ip rules",
            ))?;
            out.extend(replies.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => rule_from_message(&r),
                _ => None,
            }));
        }
        Ok(out)
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

    /// Routes of one table, both families (the kernel filters the dump by table when asked
    /// strictly; we filter again since older kernels return every table).
    pub fn routes(&mut self, table: u32) -> Result<Vec<MainRoute>> {
        Ok(self.all_routes(&[Family::Ipv4, Family::Ipv6])?.into_iter().filter(|r| r.table == table).collect())
    }

    /// Every unicast route of every table in these families, one entry per next hop.
    pub fn all_routes(&mut self, families: &[Family]) -> Result<Vec<MainRoute>> {
        let mut out = Vec::new();
        for &family in families {
            let mut msg = RouteMessage::default();
            msg.header.address_family = address_family(family);
            let replies = allow_missing_family(self.request(
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_REQUEST | NLM_F_DUMP,
                "dump routes",
            ))?;
            out.extend(replies.iter().flat_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if r.header.kind == RouteType::Unicast => routes_from_message(r),
                _ => Vec::new(),
            }));
        }
        Ok(out)
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

    /// IPv6 addresses (with prefix) on the link with this index, link-local ones included.
    pub fn addresses6(&mut self, index: u32) -> Result<Vec<IpNetwork>> {
        self.addresses_where(AddressFamily::Inet6, Some(index))
    }

    /// Strict checking of dump requests on (the kernel then filters a dump by the header's
    /// fields, an address dump by its link index) or off; false where the kernel has none.
    pub(super) fn set_strict(&mut self, on: bool) -> bool {
        self.socket.set_netlink_get_strict_chk(on).is_ok()
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

/// A node booted with IPv6 disabled has no IPv6 rules or routes to dump: none, not an error.
fn allow_missing_family(r: Result<Vec<RouteNetlinkMessage>>) -> Result<Vec<RouteNetlinkMessage>> {
    match r {
        Err(e) if e.details == "EAFNOSUPPORT" => Ok(Vec::new()),
        other => other,
    }
}

/// Interface index by name; None when the interface does not exist (yet).
pub fn link_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let idx = unsafe { nix::libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
