use super::*;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::route::{RouteHeader, RouteMessage};

fn wire(msg: RouteNetlinkMessage) -> Vec<u8> {
    let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
    nl.finalize();
    let mut buf = vec![0; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

fn notices(buf: &[u8]) -> Vec<Notice> {
    let mut out = Vec::new();
    parse_route(buf, &mut out);
    out
}

#[test]
fn links_carry_name_and_state_and_several_messages_in_one_buffer_are_read() {
    let mut up = LinkMessage::default();
    up.header.index = 7;
    up.header.flags = LinkFlags::Up | LinkFlags::Running | LinkFlags::Broadcast;
    up.attributes.push(LinkAttribute::IfName("wan1".into()));
    let mut gone = LinkMessage::default();
    gone.header.index = 9;
    gone.attributes.push(LinkAttribute::IfName("veth1234".into()));
    let mut buf = wire(RouteNetlinkMessage::NewLink(up));
    buf.extend(wire(RouteNetlinkMessage::DelLink(gone)));
    let state = (LinkFlags::Up | LinkFlags::Running).bits();
    assert_eq!(
        notices(&buf),
        vec![
            Notice::Link { index: 7, name: "wan1".into(), state, gone: false },
            Notice::Link { index: 9, name: "veth1234".into(), state: 0, gone: true },
        ]
    );
}

#[test]
fn ipv6_link_local_addresses_and_routes_are_not_notices() {
    let mut ll = AddressMessage::default();
    ll.header.family = AddressFamily::Inet6;
    ll.header.scope = AddressScope::Link;
    ll.header.index = 4;
    assert!(notices(&wire(RouteNetlinkMessage::NewAddress(ll))).is_empty());
    let mut global = AddressMessage::default();
    global.header.family = AddressFamily::Inet;
    global.header.index = 4;
    assert_eq!(notices(&wire(RouteNetlinkMessage::NewAddress(global))), vec![Notice::Address { index: 4 }]);

    let route = |dst: RouteAddress, table: u8| {
        let mut r = RouteMessage::default();
        r.header = RouteHeader { table, kind: RouteType::Unicast, ..RouteHeader::default() };
        r.header.address_family =
            if matches!(dst, RouteAddress::Inet6(_)) { AddressFamily::Inet6 } else { AddressFamily::Inet };
        r.attributes.push(RouteAttribute::Destination(dst));
        r.attributes.push(RouteAttribute::Oif(4));
        wire(RouteNetlinkMessage::NewRoute(r))
    };
    assert!(notices(&route(RouteAddress::Inet6("fe80::".parse().unwrap()), 254)).is_empty());
    assert!(notices(&route(RouteAddress::Inet6("ff00::".parse().unwrap()), 254)).is_empty());
    assert!(notices(&route(RouteAddress::Inet("10.0.0.1".parse().unwrap()), 255)).is_empty());
    assert_eq!(
        notices(&route(RouteAddress::Inet("0.0.0.0".parse().unwrap()), 100)),
        vec![Notice::Route { table: 100, oif: Some(4) }]
    );
}

/// An nfnetlink message: header, nfgenmsg, then a NFTA_*_TABLE attribute.
fn nft(msg: u16, table: &str) -> Vec<u8> {
    let mut attr = table.as_bytes().to_vec();
    attr.push(0);
    let alen = 4 + attr.len();
    let mut body = vec![1, 0, 0, 0]; // nfgenmsg: family inet-ish, version, res_id
    body.extend((alen as u16).to_ne_bytes());
    body.extend(NFTA_TABLE.to_ne_bytes());
    body.extend(&attr);
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let len = 16 + body.len();
    let mut buf = (len as u32).to_ne_bytes().to_vec();
    buf.extend(((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    buf.extend([0u8; 10]);
    buf.extend(body);
    buf
}

#[test]
fn set_elements_and_generations_are_not_notices_but_rules_and_tables_are() {
    let mut buf = nft(NFT_MSG_NEWSETELEM, "bridge-nat");
    buf.extend(nft(NFT_MSG_DELSETELEM, "bridge-nat"));
    buf.extend(nft(NFT_MSG_NEWGEN, ""));
    buf.extend(nft(8, "bridge-nat")); // DELRULE
    buf.extend(nft(2, "filter")); // DELTABLE
    let mut out = Vec::new();
    parse_netfilter(&buf, &mut out);
    assert_eq!(
        out,
        vec![Notice::Netfilter { table: "bridge-nat".into() }, Notice::Netfilter { table: "filter".into() }]
    );
}
