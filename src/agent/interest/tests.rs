use super::*;

fn interest() -> Interest {
    let mut i = Interest {
        names: ["dind-br0", "wan1"].iter().map(|s| s.to_string()).collect(),
        tables: [100].into_iter().collect(),
        ..Interest::default()
    };
    i.indexes.insert(3, "dind-br0".into());
    i.indexes.insert(5, "wan1".into());
    i
}

fn link(index: u32, name: &str, state: u32, gone: bool) -> Notice {
    Notice::Link { index, name: name.into(), state, gone }
}

#[test]
fn a_new_pods_veth_and_its_chatter_concern_nothing() {
    let mut i = interest();
    assert_eq!(i.concern(&link(40, "veth9c1f", 1, false)), None);
    assert_eq!(i.concern(&Notice::Address { index: 40 }), None);
    assert_eq!(i.concern(&Notice::Route { table: 254, oif: Some(40) }), None);
    assert_eq!(i.concern(&Notice::Netfilter { table: "some-other-firewall".into() }), None);
    assert_eq!(i.concern(&link(40, "veth9c1f", 0, true)), None);
}

#[test]
fn the_bridge_re_announcing_itself_unchanged_concerns_nothing_after_the_first_time() {
    let mut i = interest();
    assert_eq!(i.concern(&link(3, "dind-br0", 0b11, false)), Some(Concern::Routing));
    assert_eq!(i.concern(&link(3, "dind-br0", 0b11, false)), None);
    assert_eq!(i.concern(&link(3, "dind-br0", 0b01, false)), Some(Concern::Routing), "carrier lost");
    // Rebuilt from the records (a pod was added): what was learnt of the bridge stays.
    let mut rebuilt = Interest { states: i.states.clone(), ..interest() };
    rebuilt.rebuild(&[]);
    assert!(rebuilt.names.is_empty(), "no record, no interest");
}

#[test]
fn uplinks_their_addresses_routes_rules_and_our_tables_concern_routing() {
    let mut i = interest();
    assert_eq!(i.concern(&Notice::Address { index: 5 }), Some(Concern::Routing));
    assert_eq!(i.concern(&Notice::Route { table: 254, oif: Some(5) }), Some(Concern::Routing));
    assert_eq!(i.concern(&Notice::Route { table: 100, oif: Some(40) }), Some(Concern::Routing));
    assert_eq!(i.concern(&Notice::Route { table: 254, oif: None }), Some(Concern::Routing));
    assert_eq!(i.concern(&Notice::Rule), Some(Concern::Routing));
    assert_eq!(i.concern(&link(5, "wan1", 0, true)), Some(Concern::Routing));
    assert_eq!(i.concern(&Notice::Address { index: 5 }), None, "wan1 is gone");
    assert_eq!(i.concern(&link(9, "wan1", 1, false)), Some(Concern::Routing), "wan1 is back, another index");
    assert_eq!(i.concern(&Notice::Address { index: 9 }), Some(Concern::Routing));
}

#[test]
fn our_netfilter_tables_and_lost_notifications_concern_the_firewall() {
    let mut i = interest();
    for t in ["bridge-nat", "filter", "nat", "mangle"] {
        assert_eq!(i.concern(&Notice::Netfilter { table: t.into() }), Some(Concern::Firewall), "{t}");
    }
    assert_eq!(i.concern(&Notice::Lost), Some(Concern::Firewall));
}

#[test]
fn unknown_links_and_tables_make_the_records_worth_a_look() {
    let i = interest();
    assert!(i.may_be_stale_for(&link(40, "wan4", 1, false)));
    assert!(!i.may_be_stale_for(&link(5, "wan1", 1, false)));
    assert!(i.may_be_stale_for(&Notice::Route { table: 103, oif: None }));
    assert!(!i.may_be_stale_for(&Notice::Route { table: 254, oif: Some(40) }));
    assert_eq!(sysctl_interface("/proc/sys/net/ipv4/conf/wan1/src_valid_mark").as_deref(), Some("wan1"));
    assert_eq!(sysctl_interface("/proc/sys/net/ipv4/conf/all/forwarding"), None);
    assert_eq!(sysctl_interface("/proc/sys/net/ipv4/ip_forward"), None);
}
