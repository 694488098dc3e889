//! Multi-uplink policy routing with real packets: replies to a forwarded port leave by the
//! uplink its `routing` block names, pod-originated traffic leaves by `routing.outbound`, and
//! CHECK, re-ADD and DEL keep the ip rules, tables and marks right.
//!
//! Topology (every address lives in a namespace the test creates):
//!
//! ```text
//!   client1 203.0.113.10/25 ── router1 ── 198.51.100.254 ══ up1 198.51.100.1 ─┐
//!                     (203.0.113.1)                     main: default via up1   node [dind-br0 10.20.0.1] ── pods
//!   client2 203.0.113.140/25 ── router2 ── 192.0.2.254 ══ up2 192.0.2.1 ───────┘      10.20.0.x
//!                     (203.0.113.129)                   main: default via up2 metric 200
//! ```
//!
//! The routers forward but know only their own two links: a reply to client2 that leaves by
//! up1 dies at router1, and the other way round. Test 5 adds a gateway-less point-to-point
//! uplink (up3), test 7 an uplink that appears after ADD (wwan0).
//!
//! Every scenario runs under both firewall backends (`NAME::iptables`, `NAME::nftables`): the
//! marks differ in where they live, the routing (ip rules, tables) is the same.

mod common;

use common::uplinks::*;
use common::{both_backends, dir_tree, require_root, Backend};
use serde_json::json;
use std::path::Path;

// ---------------------------------------------------------------- tests

/// 0. Table names land in the node's own iproute2 config (/etc/netns/NODE/iproute2), where
///    `ip route show table NAME` inside the node finds them; the machine's /etc/iproute2 is
///    left alone.
fn table_names_are_registered_in_the_nodes_own_iproute2_config(backend: Backend) {
    if !require_root() {
        return;
    }
    let machine_before = dir_tree(Path::new("/etc/iproute2"));
    let t = Topology::new(backend);
    let conf = t.conflist(two_uplink_entry(&t.node));
    let _pod = Pod::add(&t.node, &conf, "a");

    for (name, want) in [("dind_up2", "dev up2"), ("dind_up1", "dev up1"), ("dind_net1", "dev up2")] {
        let routes = t.node.ns.sh_ok(&format!("ip route show table {name}"));
        assert!(
            routes.contains("default via") && routes.contains(want),
            "table {name} in the node: {routes:?}\n{}",
            diagnostics(&t.node)
        );
    }
    let drop_in = common::netns_etc(&t.node.ns).join("iproute2/rt_tables.d/bridge-nat.conf");
    let text = std::fs::read_to_string(&drop_in).unwrap_or_else(|e| panic!("{}: {e}", drop_in.display()));
    for line in ["100\tdind_net1", "101\tdind_up2", "102\tdind_up1"] {
        assert!(text.contains(line), "{} lacks {line:?}:\n{text}", drop_in.display());
    }
    assert_eq!(dir_tree(Path::new("/etc/iproute2")), machine_before, "the machine's /etc/iproute2 changed");
    let outside = std::process::Command::new("ip").args(["route", "show", "table", "dind_up2"]).output().unwrap();
    assert!(!outside.status.success(), "dind_up2 resolves outside the node: {outside:?}");
}
both_backends!(table_names_are_registered_in_the_nodes_own_iproute2_config);

/// 1. Each routed port answers through its own uplink: client2 (behind router2 only) through
///    192.0.2.1:30080, client1 (behind router1 only) through 198.51.100.1:30081.
fn replies_leave_by_the_uplink_of_the_port(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let conf = t.conflist(two_uplink_entry(&t.node));
    let pod = Pod::add(&t.node, &conf, "a");
    let _server = pod.serve();
    assert_inbound_follows_port_uplink(&t);
    pod.cni(&t.node, "check", &conf).assert_ok("CHECK");
}
both_backends!(replies_leave_by_the_uplink_of_the_port);

/// 2. Negative control: the same forwards without any routing block. The forward itself works
///    (client1 through up1), but client2 through up2 fails: the pod's replies follow main's
///    default out of up1 and die at router1. So test 1 is discriminating.
fn without_routing_replies_follow_main_and_die(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let conf = t.conflist(entry(&t.node, None, &[forward("plain", PORT_UP2, None)]));
    let pod = Pod::add(&t.node, &conf, "a");
    let _server = pod.serve();
    // The forward is live and the server up...
    expect_reply(&t.node, &t.client1, UP1, PORT_UP2, "pod");
    // ...but through up2 the connection never completes.
    let reply = request(&t.client2, UP2, PORT_UP2);
    assert!(!reply.ok && !reply.text.contains("pod"), "client2 got through without routing: {reply:?}");
    // The SYN reached the pod and it answered (SYN_RECV), so the reply was lost on the way out:
    let ct =
        t.node.ns.sh_ok(&format!("conntrack -L -p tcp --orig-src {CLIENT2} --orig-port-dst {PORT_UP2} 2>/dev/null"));
    assert!(
        ct.contains("SYN_RECV"),
        "expected a half-open DNAT'd connection, conntrack: {ct}\n{}",
        diagnostics(&t.node)
    );
    // ...by main's default route, out of up1.
    let route = t.node.ns.sh_ok(&format!("ip route get {CLIENT2} from {} iif {}", pod.ipv4(), common::BRIDGE));
    assert!(route.contains("dev up1"), "replies to client2 should follow main out of up1: {route}");
}
both_backends!(without_routing_replies_follow_main_and_die);

/// 3. Pod-originated traffic leaves by routing.outbound (up2, masqueraded to 192.0.2.1) though
///    main's default is up1; networks the node is directly on still use main (router1 on up1's
///    subnet sees 198.51.100.1).
fn pod_traffic_leaves_by_the_outbound_uplink_except_to_connected_networks(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let conf = t.conflist(two_uplink_entry(&t.node));
    let pod = Pod::add(&t.node, &conf, "a");
    assert_pod_outbound(&t, &pod);
}
both_backends!(pod_traffic_leaves_by_the_outbound_uplink_except_to_connected_networks);

/// 4. Tests 1 and 3 again with strict rp_filter on the node (all, up1, up2): the plugin's
///    src_valid_mark on the uplinks lets the reverse-path check use the connection's mark.
fn routing_works_under_strict_rp_filter(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    t.strict_rp_filter();
    let conf = t.conflist(two_uplink_entry(&t.node));
    let pod = Pod::add(&t.node, &conf, "a");
    for uplink in ["up1", "up2"] {
        let v = t.node.ns.sh_ok(&format!("cat /proc/sys/net/ipv4/conf/{uplink}/src_valid_mark"));
        assert_eq!(v.trim(), "1", "src_valid_mark on {uplink}");
        let v = t.node.ns.sh_ok(&format!("cat /proc/sys/net/ipv4/conf/{uplink}/rp_filter"));
        assert_eq!(v.trim(), "1", "rp_filter on {uplink}");
    }
    let _server = pod.serve();
    assert_inbound_follows_port_uplink(&t);
    assert_pod_outbound(&t, &pod);

    // Control: without src_valid_mark the reverse-path check ignores the mark, looks the client
    // up from the pod's address (rule from 10.20.0.0/24 → table 100 → up2) and drops what
    // arrives on up1. CHECK names the setting.
    t.node.ns.sh_ok("sysctl -qw net.ipv4.conf.up1.src_valid_mark=0");
    let reply = request(&t.client1, UP1, PORT_UP1);
    assert!(!reply.ok && !reply.text.contains("pod"), "up1 got through without src_valid_mark: {reply:?}");
    expect_check_failure(&t.node, &pod, &conf, &["up1/src_valid_mark"]);
}
both_backends!(routing_works_under_strict_rp_filter);

/// 5. A point-to-point uplink without any gateway (a cellular modem): the table's default is a
///    device route, and a client on the far end reaches the pod through 100.64.0.1.
fn point_to_point_uplink_without_gateway_gets_a_device_default(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let peer = t.add_point_to_point_uplink();
    let conf = t.conflist(entry(
        &t.node,
        Some(global_routing()),
        &[routed("via-up3", 30082, None, "0x67", 103, "dind_up3", "up3")],
    ));
    let pod = Pod::add(&t.node, &conf, "a");
    let table = t.node.ns.sh_ok("ip route show table 103");
    assert!(
        table.lines().any(|l| l.trim_start().starts_with("default dev up3") && !l.contains(" via ")),
        "table 103 must hold `default dev up3` (no via):\n{table}\n{}",
        diagnostics(&t.node)
    );
    let _server = pod.serve();
    expect_reply(&t.node, &peer, UP3, 30082, "pod");
    pod.cni(&t.node, "check", &conf).assert_ok("CHECK");
}
both_backends!(point_to_point_uplink_without_gateway_gets_a_device_default);

/// 6. CHECK notices an ip rule or a table route deleted by hand (102, naming it); a repeated
///    ADD puts it back and CHECK passes again.
fn check_names_a_deleted_rule_or_route_and_readd_restores_it(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let e = two_uplink_entry(&t.node);
    let conf = t.conflist(e.clone());
    let pod = Pod::add(&t.node, &conf, "a");
    pod.cni(&t.node, "check", &conf).assert_ok("CHECK after ADD");

    t.node.ns.sh_ok("ip rule del priority 100 fwmark 0x65/0x1fff lookup 101");
    expect_check_failure(&t.node, &pod, &conf, &["missing ip rule priority 100 fwmark 0x65/0x1fff lookup 101"]);
    pod.readd(&t.node, &e).assert_ok("re-ADD after the rule was deleted");
    let rules = t.node.ns.sh_ok("ip rule");
    assert!(rules.contains("fwmark 0x65/0x1fff lookup dind_up2"), "rule not restored:\n{rules}");
    pod.cni(&t.node, "check", &conf).assert_ok("CHECK after restoring the rule");

    t.node.ns.sh_ok("ip route del default table 101");
    expect_check_failure(&t.node, &pod, &conf, &[&format!("missing route 0.0.0.0/0 via {ROUTER2} dev up2 table 101")]);
    pod.readd(&t.node, &e).assert_ok("re-ADD after the route was deleted");
    let table = t.node.ns.sh_ok("ip route show table 101");
    assert!(table.contains(&format!("default via {ROUTER2} dev up2")), "route not restored:\n{table}");
    pod.cni(&t.node, "check", &conf).assert_ok("CHECK after restoring the route");
}
both_backends!(check_names_a_deleted_rule_or_route_and_readd_restores_it);

/// 7. An uplink that is absent at ADD (a modem not up yet): the pod still comes up, CHECK names
///    the uplink; once it exists with a gateway, a repeated ADD completes the table.
fn absent_uplink_is_reported_by_check_until_it_appears(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let e =
        entry(&t.node, Some(global_routing()), &[routed("via-wwan", 30090, None, "0x68", 104, "dind_wwan", "wwan0")]);
    let conf = t.conflist(e.clone());
    let pod = Pod::add(&t.node, &conf, "a");
    assert!(pod.ipv4().starts_with("10.20.0."), "pod has no address: {}", pod.result);
    expect_check_failure(&t.node, &pod, &conf, &["uplink wwan0 of table 104 is absent", "wwan0/src_valid_mark"]);

    let _router3 = t.add_wwan0();
    pod.readd(&t.node, &e).assert_ok("re-ADD once wwan0 exists");
    let table = t.node.ns.sh_ok("ip route show table 104");
    assert!(
        table.contains(&format!("default via {WWAN_GW} dev wwan0")),
        "table 104:\n{table}\n{}",
        diagnostics(&t.node)
    );
    pod.cni(&t.node, "check", &conf).assert_ok("CHECK once wwan0 exists");
}
both_backends!(absent_uplink_is_reported_by_check_until_it_appears);

/// 8. Two pods (per-port tables picked by destIP), removed first-in first-out: after the last
///    DEL the firewall, ip rules and every table are as before the first ADD, and the node's
///    iproute2 config holds no table names.
fn last_del_leaves_no_rules_routes_or_table_names(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let node = &t.node;
    // iptables-nft creates a table on first use and never removes it.
    node.ns.sh_ok("iptables -t mangle -N BN-PRIME && iptables -t mangle -X BN-PRIME");
    // The bridge plugin never deletes its bridge: create it first with a bridge-only network
    // (its own IPAM store, so the real network's pods get .10 and .11).
    let mut bridge_only = common::conflist(VERSION, &node.dir().join("ipam-warmup"), json!({}));
    bridge_only["plugins"].as_array_mut().expect("plugins").truncate(1);
    let bridge_only = node.write_conflist(&bridge_only);
    let warm = Pod::attach(node, &bridge_only, "warmup");
    warm.cni(node, "del", &bridge_only).assert_ok("DEL warmup");

    let etc = common::netns_etc(&node.ns);
    let config_before = dir_tree(&etc);
    let before = node.snapshot();
    // Per-rule replies, so each pod holds only its own rule's mark and table (with arrival
    // affinity every pod with a forward holds every routed uplink's).
    let mut routing = global_routing();
    routing["replyVia"] = json!("rule");
    let conf = t.conflist(entry(
        node,
        Some(routing),
        &[
            routed("a-via-up2", PORT_UP2, Some("10.20.0.10"), "0x65", 101, "dind_up2", "up2"),
            routed("b-via-up1", PORT_UP1, Some("10.20.0.11"), "0x66", 102, "dind_up1", "up1"),
        ],
    ));
    let a = Pod::add(node, &conf, "a");
    let b = Pod::add(node, &conf, "b");
    assert_eq!((a.ipv4().as_str(), b.ipv4().as_str()), ("10.20.0.10", "10.20.0.11"));
    let rules = node.ns.sh_ok("ip rule");
    assert!(rules.contains("fwmark 0x65/0x1fff") && rules.contains("fwmark 0x66/0x1fff"), "ip rule:\n{rules}");

    a.cni(node, "del", &conf).assert_ok("DEL a");
    // What b uses (its mark, its table, the shared source rules and mark plumbing) stays.
    b.cni(node, "check", &conf).assert_ok("CHECK b after DEL a");
    let rules = node.ns.sh_ok("ip rule");
    assert!(!rules.contains("fwmark 0x65/0x1fff"), "a's mark rule outlived a:\n{rules}");
    let table = node.ns.sh_ok("ip route show table 101");
    assert!(table.trim().is_empty(), "a's table 101 outlived a:\n{table}");
    let names = std::fs::read_to_string(etc.join("iproute2/rt_tables.d/bridge-nat.conf")).unwrap_or_default();
    assert!(
        !names.contains("dind_up2") && names.contains("102\tdind_up1") && names.contains("100\tdind_net1"),
        "table names after DEL a:\n{names}"
    );
    let _server = b.serve();
    expect_reply(node, &t.client1, UP1, PORT_UP1, "pod");

    b.cni(node, "del", &conf).assert_ok("DEL b");
    let after = node.snapshot();
    assert!(
        after == before,
        "node differs after the last DEL\n--- before\n{before}\n--- after\n{after}\n--- log\n{}",
        node.log()
    );
    assert_eq!(dir_tree(&etc), config_before, "the node's iproute2 config differs after the last DEL");
}
both_backends!(last_del_leaves_no_rules_routes_or_table_names);

/// 9. Marks never touch foreign bits. kube-proxy's 0x4000 is set on the same packets by an
///    iptables rule that was there before ADD (the plugin's jump goes ahead of it), and 0x20000
///    by a rule another component adds afterwards, ahead of the plugin's marking (iptables: a
///    rule inserted before the plugin's jump; nftables: a chain of its own table hooked at
///    priority -180, before any mangle chain): the plugin's marks and CONNMARK are masked with
///    0x1fff, so every packet forwarded to the pod carries all three (0x24065), conntrack holds
///    exactly 0x65, and the connection works.
fn marks_leave_foreign_bits_alone(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let node = &t.node;
    let bridge = common::BRIDGE;
    node.ns.sh_ok(&format!(
        "iptables -t mangle -A PREROUTING -p tcp --dport {PORT_UP2} -j MARK --set-xmark 0x4000/0x4000 && \
         iptables -t mangle -A FORWARD -o {bridge} -p tcp --dport 8080 -m mark --mark 0x24065 \
           -m comment --comment bn-probe-all-bits && \
         iptables -t mangle -A FORWARD -o {bridge} -p tcp --dport 8080 -m mark ! --mark 0x24065 \
           -m comment --comment bn-probe-other"
    ));
    let conf = t.conflist(two_uplink_entry(node));
    let pod = Pod::add(node, &conf, "a");
    match backend {
        Backend::Iptables => {
            node.ns.sh_ok(&format!(
                "iptables -t mangle -I PREROUTING 1 -p tcp --dport {PORT_UP2} -j MARK --set-xmark 0x20000/0x20000"
            ));
            let mangle = node.ns.sh_ok("iptables-save -t mangle");
            let prerouting: Vec<&str> = mangle.lines().filter(|l| l.starts_with("-A PREROUTING ")).collect();
            assert!(
                prerouting.len() == 3
                    && prerouting[0].contains("0x20000/0x20000")
                    && prerouting[1].contains("-j BRIDGE-NAT-MARK")
                    && prerouting[2].contains("0x4000/0x4000"),
                "expected foreign rule, the plugin's jump, foreign rule in mangle PREROUTING:\n{mangle}"
            );
            for needle in [
                "--set-xmark 0x65/0x1fff",
                "--set-xmark 0x66/0x1fff",
                "--restore-mark --nfmask 0x1fff --ctmask 0x1fff",
                "--save-mark --nfmask 0x1fff --ctmask 0x1fff",
            ] {
                assert!(mangle.contains(needle), "mangle lacks {needle:?}:\n{mangle}");
            }
        }
        Backend::Nftables => {
            node.ns.sh_ok(&format!(
                "nft add table ip foreign && \
                 nft add chain ip foreign pre '{{ type filter hook prerouting priority -180; }}' && \
                 nft add rule ip foreign pre tcp dport {PORT_UP2} meta mark set meta mark or 0x20000"
            ));
            let marks = node.nft_elements("mark4-any");
            for want in [
                format!("tcp . {PORT_UP2} : jump mark-0x65-0x1fff"),
                format!("tcp . {PORT_UP1} : jump mark-0x66-0x1fff"),
            ] {
                assert!(marks.contains(&want), "mark4-any lacks {want:?}: {marks:?}\n{}", diagnostics(node));
            }
            let table = node.nft_table().unwrap_or_default();
            for chain in ["chain mark-0x65-0x1fff {", "chain mark-0x66-0x1fff {"] {
                assert!(table.contains(chain), "the table lacks {chain:?}:\n{table}");
            }
        }
    }
    let rules = node.ns.sh_ok("ip rule");
    assert!(rules.contains("fwmark 0x65/0x1fff"), "ip rule:\n{rules}");

    let _server = pod.serve();
    expect_reply(node, &t.client2, UP2, PORT_UP2, "pod");
    let ct = node.ns.sh_ok(&format!("conntrack -L -p tcp --orig-src {CLIENT2} --orig-port-dst {PORT_UP2} 2>/dev/null"));
    assert!(ct.contains("mark=101 "), "conntrack mark should be exactly 0x65 (101): {ct}\n{}", diagnostics(node));
    let counted = node.ns.sh_ok("iptables-save -c -t mangle");
    let packets = |comment: &str| -> u64 {
        let line = counted.lines().find(|l| l.contains(comment)).expect("probe rule");
        line.trim_start_matches('[').split(':').next().and_then(|n| n.parse().ok()).expect("packet counter")
    };
    assert!(packets("bn-probe-all-bits") > 0, "no packet to the pod carried 0x24065:\n{counted}");
    assert_eq!(packets("bn-probe-other"), 0, "packets to the pod lost a foreign bit or ours:\n{counted}");
}
both_backends!(marks_leave_foreign_bits_alone);
