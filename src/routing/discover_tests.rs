use super::*;
use crate::config::Outbound;

fn route(dst: &str, gateway: Option<&str>, oif: u32, table: u32, metric: u32) -> MainRoute {
    MainRoute {
        dst: dst.parse().unwrap(),
        gateway: gateway.map(|g| g.parse().unwrap()),
        oif,
        scope_link: gateway.is_none() && dst.contains('.'),
        table,
        metric,
    }
}

fn spec(subnet: &str, gateway: Option<&str>, gateway6: Option<&str>) -> TableSpec {
    TableSpec {
        id: 101,
        name: None,
        bridge: "dind-br0".into(),
        subnet: subnet.parse().unwrap(),
        outbound: Outbound {
            interface: "wan1".into(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            gateway6: gateway6.map(|g| g.parse().unwrap()),
            use_default_route: false,
        },
    }
}

fn gateway_of(r: Option<Route>) -> Option<(String, Option<IpAddr>)> {
    r.map(|r| (r.dst.to_string(), r.gateway))
}

#[test]
fn a_router_advertised_link_local_default_is_the_ipv6_gateway() {
    // wan0 (index 2) is preferred in main; wan1 (index 3) has only its RA default via fe80::1.
    let main = [
        route("::/0", Some("2001:db8:a::1"), 2, 254, 100),
        route("::/0", Some("fe80::1"), 3, 254, 1024),
        route("2001:db8:b::/64", None, 3, 254, 256),
    ];
    let got = default_route(&main, &[], &spec("fd00:20::/64", None, None), 3);
    assert_eq!(gateway_of(got), Some(("::/0".into(), Some("fe80::1".parse().unwrap()))));
    let got = default_route(&main, &[], &spec("fd00:20::/64", None, None), 2);
    assert_eq!(gateway_of(got), Some(("::/0".into(), Some("2001:db8:a::1".parse().unwrap()))));
}

#[test]
fn the_lowest_metric_default_wins_when_an_uplink_hears_several_routers() {
    let main = [route("::/0", Some("fe80::2"), 3, 254, 1024), route("::/0", Some("fe80::1"), 3, 254, 512)];
    let got = default_route(&main, &[], &spec("fd00:20::/64", None, None), 3);
    assert_eq!(gateway_of(got).and_then(|g| g.1), Some("fe80::1".parse().unwrap()));
}

#[test]
fn a_default_in_another_table_is_found_as_for_ipv4() {
    let elsewhere = [route("::/0", Some("fe80::9"), 3, 7, 20), route("::/0", Some("fe80::8"), 3, 8, 10)];
    let got = default_route(&[], &elsewhere, &spec("fd00:20::/64", None, None), 3);
    assert_eq!(gateway_of(got).and_then(|g| g.1), Some("fe80::8".parse().unwrap()));
    assert_eq!(default_route(&[], &[], &spec("fd00:20::/64", None, None), 3), None);
}

#[test]
fn each_family_takes_its_own_configured_gateway() {
    let s = spec("fd00:20::/64", Some("192.0.2.254"), Some("fe80::1"));
    assert_eq!(gateway_of(default_route(&[], &[], &s, 3)), Some(("::/0".into(), Some("fe80::1".parse().unwrap()))));
    let s = spec("10.20.0.0/24", Some("192.0.2.254"), Some("fe80::1"));
    let got = default_route(&[], &[], &s, 3);
    assert_eq!(gateway_of(got), Some(("0.0.0.0/0".into(), Some("192.0.2.254".parse().unwrap()))));
    // gateway6 alone leaves IPv4's next hop to discovery.
    assert_eq!(default_route(&[], &[], &spec("10.20.0.0/24", None, Some("fe80::1")), 3), None);
}

#[test]
fn on_link_ipv6_prefixes_leave_out_link_local_and_multicast() {
    assert!(is_on_link(&route("2001:db8:b::/64", None, 3, 254, 256)));
    assert!(!is_on_link(&route("fe80::/64", None, 3, 254, 256)));
    assert!(!is_on_link(&route("ff00::/8", None, 3, 254, 256)));
    assert!(!is_on_link(&route("2001:db8:c::/48", Some("fe80::1"), 3, 254, 1024)));
    assert!(is_on_link(&route("192.0.2.0/24", None, 3, 254, 0)));
    let mut universe = route("192.0.2.0/24", None, 3, 254, 0);
    universe.scope_link = false;
    assert!(!is_on_link(&universe));
}
