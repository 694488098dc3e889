//! plan::plan in the product's own terms: forwards, host ports, marks, subnets, routing and
//! sysctls, and host-port conflicts. How each backend renders a plan is tested beside it.

use super::*;
use crate::cni::prev_result;
use crate::config::decode;
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

const BR: &str = "dind-br0";

pub(crate) fn conf(extra: Value) -> NetConf {
    let mut v = json!({ "cniVersion": "1.0.0", "name": "dind", "type": "bridge-nat" });
    for (k, x) in extra.as_object().expect("object").clone() {
        v[k] = x;
    }
    decode(&serde_json::to_vec(&v).unwrap())
        .and_then(|d| d.validate())
        .unwrap_or_else(|e| panic!("config {v} does not validate: {}", e.msg))
}

/// A prevResult as the bridge plugin writes it, with the given pod addresses (with prefix).
fn prev(addrs: &[&str]) -> Value {
    let ips: Vec<Value> = addrs.iter().map(|a| json!({ "interface": 2, "address": a })).collect();
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            { "name": BR, "mac": "aa:bb:cc:dd:ee:ff" },
            { "name": "veth1234", "mac": "aa:bb:cc:dd:ee:01" },
            { "name": "net1", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod" }
        ],
        "ips": ips
    })
}

pub(crate) fn att(c: &NetConf, addrs: &[&str]) -> Attachment {
    prev_result::parse(&prev(addrs), c.bridge.as_deref()).expect("prevResult parses")
}

pub(crate) fn id() -> AttachmentId {
    AttachmentId { network: "dind".into(), container_id: "CID".into(), ifname: "net1".into() }
}

fn id_of(container: &str, ifname: &str) -> AttachmentId {
    AttachmentId { network: "dind".into(), container_id: container.into(), ifname: ifname.into() }
}

fn rules_conf(rules: Value) -> NetConf {
    conf(json!({ "portForwarding": { "rules": rules } }))
}

fn hp(port: u16, protocol: Protocol, host_ip: Option<&str>) -> HostPort {
    HostPort { port, protocol, host_ip: host_ip.map(|ip| ip.parse().unwrap()) }
}

// ---------------------------------------------------------------- forwards and host ports

#[test]
fn dest_ip_outside_the_subnet_is_rejected() {
    let c = rules_conf(json!([
        { "hostPort": 30080, "destPort": 8080 },
        { "hostPort": 30081, "destIP": "10.99.0.1", "destPort": 8080 }
    ]));
    let e = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap_err();
    assert_eq!(e.code, code::INVALID_CONFIG);
    for needle in ["portForwarding.rules[1].destIP", "10.99.0.1", "10.20.0.0/24"] {
        assert!(e.msg.contains(needle), "{:?} lacks {needle:?}", e.msg);
    }
    // A v6 destIP on a v4-only attachment is outside too.
    let c = rules_conf(json!([{ "hostPort": 30081, "destIP": "fd00::10", "destPort": 8080 }]));
    let e = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap_err();
    assert!(e.msg.contains("portForwarding.rules[0].destIP: fd00::10"), "{}", e.msg);
}

#[test]
fn host_ports_are_deduplicated_and_sorted() {
    let c = conf(json!({
        "portForwarding": { "rules": [
            { "hostPort": 9000, "destPort": 1, "protocol": "udp" },
            { "hostPort": 30080, "destPort": 8080 }
        ] },
        "runtimeConfig": { "portMappings": [
            { "hostPort": 8080, "containerPort": 80 },
            { "hostPort": 9000, "containerPort": 90, "hostIP": "192.168.1.5" },
            { "hostPort": 9000, "containerPort": 90, "hostIP": "192.168.1.6" }
        ] }
    }));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24", "fd00::10/64"]), None).unwrap();
    // Dual stack: the three wildcard forwards exist twice, the two v4 hostIP ones once.
    assert_eq!(p.forwards.len(), 3 * 2 + 2);
    assert_eq!(
        p.host_ports,
        vec![
            hp(8080, Protocol::Tcp, None),
            hp(9000, Protocol::Tcp, Some("192.168.1.5")),
            hp(9000, Protocol::Tcp, Some("192.168.1.6")),
            hp(9000, Protocol::Udp, None),
            hp(30080, Protocol::Tcp, None),
        ]
    );
}

#[test]
fn check_host_ports_names_both_attachments() {
    let a = id_of("aaa", "net1");
    let b = id_of("bbb", "eth0");
    let held = vec![hp(22, Protocol::Tcp, None), hp(30080, Protocol::Tcp, None)];
    let wanted = vec![hp(30080, Protocol::Tcp, None)];
    let e = check_host_ports(&a, &wanted, [(&b, held.as_slice())].into_iter()).unwrap_err();
    assert_eq!(e.code, code::PORT_CONFLICT);
    assert_eq!(e.code, 101);
    assert!(e.msg.contains(&a.describe()), "{}", e.msg);
    assert!(e.msg.contains(&b.describe()), "{}", e.msg);
    assert!(e.msg.contains("30080/tcp"), "{}", e.msg);
    assert_eq!(
        e.msg,
        "host port 30080/tcp for network \"dind\" container aaa interface net1 is already held as 30080/tcp \
         by network \"dind\" container bbb interface eth0"
    );
}

#[test]
fn same_attachment_never_conflicts_with_itself() {
    let a = id();
    let held = vec![hp(30080, Protocol::Tcp, None)];
    assert!(check_host_ports(&a, &held, [(&a, held.as_slice())].into_iter()).is_ok());
    // Even among others, only the others count.
    let b = id_of("bbb", "net1");
    let other = vec![hp(22, Protocol::Tcp, None)];
    assert!(check_host_ports(&a, &held, [(&a, held.as_slice()), (&b, other.as_slice())].into_iter()).is_ok());
    // Same container, other interface: a different attachment.
    let a2 = id_of("CID", "net2");
    assert!(check_host_ports(&a, &held, [(&a2, held.as_slice())].into_iter()).is_err());
}

#[test]
fn host_port_overlap_rules() {
    let b = id_of("bbb", "net1");
    let conflict = |w: HostPort, h: HostPort| check_host_ports(&id(), &[w], [(&b, &[h][..])].into_iter()).is_err();
    assert!(!conflict(hp(80, Protocol::Tcp, None), hp(80, Protocol::Udp, None)));
    assert!(!conflict(hp(80, Protocol::Tcp, None), hp(81, Protocol::Tcp, None)));
    assert!(conflict(hp(80, Protocol::Tcp, None), hp(80, Protocol::Tcp, Some("192.168.1.5"))));
    assert!(conflict(hp(80, Protocol::Tcp, Some("192.168.1.5")), hp(80, Protocol::Tcp, None)));
    assert!(conflict(hp(80, Protocol::Tcp, Some("192.168.1.5")), hp(80, Protocol::Tcp, Some("192.168.1.5"))));
    assert!(!conflict(hp(80, Protocol::Tcp, Some("192.168.1.5")), hp(80, Protocol::Tcp, Some("192.168.1.6"))));
    assert!(check_host_ports(&id(), &[], [(&b, &[hp(80, Protocol::Tcp, None)][..])].into_iter()).is_ok());
}

#[test]
fn host_port_display() {
    assert_eq!(hp(80, Protocol::Udp, None).to_string(), "80/udp");
    assert_eq!(hp(80, Protocol::Sctp, Some("192.168.1.5")).to_string(), "192.168.1.5:80/sctp");
}

// ---------------------------------------------------------------- subnets, marks and routing

fn routed_conf() -> NetConf {
    conf(json!({
        "routing": { "tableId": 100, "tableName": "dind_net1", "fwmark": "0x64", "rulePriority": 100,
                     "outbound": { "interface": "eth5" } },
        "portForwarding": { "rules": [
            { "name": "docker-tls", "hostPort": 2376, "destPort": 2376, "protocol": "tcp" },
            { "name": "web", "hostPort": 30080, "destPort": 8080, "protocol": "tcp",
              "routing": { "fwmark": "0x65", "tableId": 101, "tableName": "dind_eth0",
                           "outbound": { "interface": "eth0" } } }
        ] }
    }))
}

#[test]
fn subnets_say_what_the_network_needs_per_family() {
    let c = conf(json!({ "masquerade": false }));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24", "fd00::10/64"]), None).unwrap();
    let v4 =
        Subnet { family: Family::Ipv4, subnet: "10.20.0.0/24".parse().unwrap(), masquerade: false, localhost: true };
    let v6 = Subnet { family: Family::Ipv6, subnet: "fd00::/64".parse().unwrap(), masquerade: false, localhost: false };
    assert_eq!(p.subnets, vec![v4, v6]);
    assert_eq!(p.families(), vec![Family::Ipv4, Family::Ipv6]);
}

#[test]
fn forwards_carry_their_own_mark_or_the_fallback_mark() {
    let c = routed_conf();
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap();
    let mark_of = |port: u16| p.forwards.iter().find(|f| f.host.port == port).and_then(|f| f.mark);
    assert_eq!(mark_of(30080), Some(0x65));
    assert_eq!(mark_of(2376), Some(0x64));
    assert_eq!(p.mark_mask, 0x1fff);
    // Without a fallback mark, a forward with no routing block is not marked.
    let mut v = routed_conf_value();
    v["routing"].as_object_mut().unwrap().remove("fwmark");
    let c = conf(v);
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap();
    assert_eq!(p.forwards.iter().find(|f| f.host.port == 2376).unwrap().mark, None);
}

fn routed_conf_value() -> Value {
    json!({
        "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" } },
        "portForwarding": { "rules": [ { "hostPort": 2376, "destPort": 2376 } ] }
    })
}

#[test]
fn ipv6_forwards_are_marked_and_routed_like_ipv4_ones() {
    let c = routed_conf();
    let p = plan(&c, &id(), &att(&c, &["fd00::10/64"]), None).unwrap();
    let mark_of = |port: u16| p.forwards.iter().find(|f| f.host.port == port).and_then(|f| f.mark);
    assert_eq!((mark_of(30080), mark_of(2376)), (Some(0x65), Some(0x64)));
    let rules: Vec<String> = p.routing.ip_rules.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        rules,
        vec![
            "ip -6 rule priority 100 fwmark 0x64/0x1fff lookup 100",
            "ip -6 rule priority 100 fwmark 0x65/0x1fff lookup 101",
            "ip -6 rule priority 109 from fd00::/64 lookup 254 suppress_prefixlength 0",
            "ip -6 rule priority 110 from fd00::/64 lookup 100",
        ]
    );
    assert!(p.routing.tables.iter().all(|t| t.subnet.to_string() == "fd00::/64"));
    assert_eq!(p.routing.tables.len(), 2);
    // src_valid_mark is an IPv4 setting: an IPv6-only pod needs none.
    assert!(p.routing.uplinks.is_empty());
    assert!(p.sysctls.iter().all(|s| s.required));
}

#[test]
fn dual_stack_routes_both_families_by_the_same_marks_and_table_ids() {
    let c = routed_conf();
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24", "fd00::10/64"]), None).unwrap();
    let by_family = |f: Family| -> Vec<String> {
        let rules = p.routing.ip_rules.iter().filter(|r| r.family == f);
        rules.map(|r| format!("{} {:?} {}", r.priority, r.fwmark, r.table)).collect()
    };
    assert_eq!(by_family(Family::Ipv4), by_family(Family::Ipv6));
    assert_eq!(by_family(Family::Ipv4).len(), 4);
    let tables: Vec<(u32, String)> = p.routing.tables.iter().map(|t| (t.id, t.subnet.to_string())).collect();
    assert_eq!(
        tables,
        vec![
            (100, "10.20.0.0/24".into()),
            (100, "fd00::/64".into()),
            (101, "10.20.0.0/24".into()),
            (101, "fd00::/64".into())
        ]
    );
}

#[test]
fn routing_plan_has_mark_rules_subnet_rules_and_one_table_per_uplink() {
    let c = routed_conf();
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap();
    let rules: Vec<String> = p.routing.ip_rules.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        rules,
        vec![
            "ip rule priority 100 fwmark 0x64/0x1fff lookup 100",
            "ip rule priority 100 fwmark 0x65/0x1fff lookup 101",
            "ip rule priority 109 from 10.20.0.0/24 lookup 254 suppress_prefixlength 0",
            "ip rule priority 110 from 10.20.0.0/24 lookup 100",
        ]
    );
    let tables: Vec<(u32, Option<String>, String)> =
        p.routing.tables.iter().map(|t| (t.id, t.name.clone(), t.outbound.interface.clone())).collect();
    assert_eq!(
        tables,
        vec![(100, Some("dind_net1".into()), "eth5".into()), (101, Some("dind_eth0".into()), "eth0".into())]
    );
    assert!(p.routing.tables.iter().all(|t| t.bridge == BR && t.subnet.to_string() == "10.20.0.0/24"));
    assert_eq!(p.routing.uplinks.iter().cloned().collect::<Vec<_>>(), vec!["eth0".to_string(), "eth5".to_string()]);
    let optional: Vec<&str> = p.sysctls.iter().filter(|s| !s.required).map(|s| s.path.as_str()).collect();
    assert_eq!(
        optional,
        vec!["/proc/sys/net/ipv4/conf/eth0/src_valid_mark", "/proc/sys/net/ipv4/conf/eth5/src_valid_mark"]
    );
}

#[test]
fn no_routing_block_means_no_routing() {
    let c = conf(json!({ "portForwarding": { "rules": [ { "hostPort": 2376, "destPort": 2376 } ] } }));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap();
    assert_eq!(p.routing, RoutingPlan::default());
    assert!(p.sysctls.iter().all(|s| s.required));
}

#[test]
fn arrival_marks_every_routed_uplink_rules_first_and_routes_by_all_their_tables() {
    let c = conf(json!({
        "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" } },
        "portForwarding": { "rules": [
            { "name": "plain", "hostPort": 2376, "destPort": 2376 },
            { "name": "web", "hostPort": 30080, "destPort": 8080,
              "routing": { "fwmark": "0x65", "tableId": 101, "outbound": { "interface": "eth0" } } },
            { "name": "also-eth0", "hostPort": 30081, "destPort": 8081,
              "routing": { "fwmark": "0x66", "tableId": 102, "outbound": { "interface": "eth0" } } }
        ] }
    }));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap();
    let arrival: Vec<(String, u32)> = p.routing.arrival.iter().map(|a| (a.uplink.clone(), a.mark)).collect();
    assert_eq!(arrival, vec![("eth0".to_string(), 0x65), ("eth5".to_string(), 0x64)]);
    // The plain forward has no block of its own: its replies can leave by either uplink's table.
    let marks: Vec<u32> = p.routing.ip_rules.iter().filter_map(|r| r.fwmark.map(|m| m.0)).collect();
    assert_eq!(marks, vec![0x64, 0x65, 0x66]);
    assert_eq!(p.routing.uplinks.len(), 2);
}

#[test]
fn reply_via_rule_means_no_arrival_marks_and_an_ipv6_only_pod_gets_them_too() {
    let mut v = json!({
        "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" }, "replyVia": "rule" },
        "portForwarding": { "rules": [ { "hostPort": 2376, "destPort": 2376 } ] }
    });
    let c = conf(v.clone());
    assert!(plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap().routing.arrival.is_empty());
    v["routing"].as_object_mut().unwrap().remove("replyVia");
    let c = conf(v);
    assert_eq!(plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap().routing.arrival.len(), 1);
    let p = plan(&c, &id(), &att(&c, &["fd00::10/64"]), None).unwrap();
    assert_eq!(p.routing.arrival.len(), 1);
    assert!(p.routing.ip_rules.iter().all(|r| r.family == Family::Ipv6));
}

// ---------------------------------------------------------------- rules that follow a pod

fn pod(ns: &str, name: &str) -> crate::cni::Pod {
    crate::cni::Pod { namespace: ns.into(), name: name.into() }
}

#[test]
fn pod_rule_follows_the_pod_whatever_its_address() {
    let c = rules_conf(json!([
        { "name": "web", "hostPort": 30080, "pod": "default/web-*", "destPort": 8080 },
        { "name": "other", "hostPort": 30081, "pod": "default/db", "destPort": 5432 }
    ]));
    for addr in ["10.20.0.10/24", "10.20.0.57/24"] {
        let a = att(&c, &[addr]);
        let p = plan(&c, &id(), &a, Some(&pod("default", "web-7d9f-x2"))).unwrap();
        assert_eq!(p.forwards.len(), 1, "{addr}");
        assert_eq!(p.forwards[0].host, hp(30080, Protocol::Tcp, None));
        assert_eq!(p.forwards[0].pod_ip, a.addresses[0].ip);
        assert_eq!(p.bound_rules, vec![0]);
    }
    let a = att(&c, &["10.20.0.10/24"]);
    // Another namespace, another name, or no pod named at all: the rules are not this attachment's.
    for other in [Some(pod("kube-system", "web-1")), Some(pod("default", "api-1")), None] {
        let p = plan(&c, &id(), &a, other.as_ref()).unwrap();
        assert!(p.forwards.is_empty() && p.bound_rules.is_empty(), "{other:?}");
    }
    let p = plan(&c, &id(), &a, Some(&pod("default", "db"))).unwrap();
    assert_eq!(p.bound_rules, vec![1]);
    assert!(plan(&c, &id(), &a, Some(&pod("default", "db-0"))).unwrap().forwards.is_empty());
}

#[test]
fn pod_and_dest_ip_must_both_match() {
    let c = rules_conf(json!([{ "hostPort": 30080, "pod": "default/web-*", "destIP": "10.20.0.10", "destPort": 80 }]));
    let web = pod("default", "web-1");
    assert_eq!(plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), Some(&web)).unwrap().forwards.len(), 1);
    assert!(plan(&c, &id(), &att(&c, &["10.20.0.11/24"]), Some(&web)).unwrap().forwards.is_empty());
    assert!(plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), Some(&pod("default", "db"))).unwrap().forwards.is_empty());
}

#[test]
fn bound_rules_name_the_static_rules_only() {
    let c = conf(json!({
        "portForwarding": { "rules": [
            { "hostPort": 1, "destIP": "10.20.0.99", "destPort": 1 },
            { "hostPort": 2, "destPort": 2 },
            { "hostPort": 3, "destIP": "10.20.0.10", "destPort": 3 }
        ] },
        "runtimeConfig": { "portMappings": [{ "hostPort": 4, "containerPort": 4 }] }
    }));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24"]), None).unwrap();
    assert_eq!(p.bound_rules, vec![1, 2]);
    assert_eq!(p.forwards.len(), 3);
}

#[test]
fn two_pods_matching_one_rule_conflict_naming_both() {
    let c = rules_conf(json!([{ "hostPort": 30080, "pod": "default/web-*", "destPort": 80 }]));
    let first = plan(&c, &id_of("A", "net1"), &att(&c, &["10.20.0.10/24"]), Some(&pod("default", "web-1"))).unwrap();
    let second = plan(&c, &id_of("B", "net1"), &att(&c, &["10.20.0.11/24"]), Some(&pod("default", "web-2"))).unwrap();
    let held = [(&first.id, first.host_ports.as_slice())];
    let e = check_host_ports(&second.id, &second.host_ports, held.into_iter()).unwrap_err();
    assert_eq!(e.code, code::PORT_CONFLICT);
    assert!(e.msg.contains("container A") && e.msg.contains("container B"), "{}", e.msg);
}
