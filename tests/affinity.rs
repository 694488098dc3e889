//! Replies leave by the uplink the connection arrived on (`routing.replyVia: "arrival"`, the
//! default), with real packets under strict rp_filter, on the two-uplink topology of
//! tests/common/uplinks.rs: client1 is reachable only through up1, client2 only through up2.
//! The config is the seed's shape: global routing by up2 (table 100, fallback mark 0x64), port
//! 30081 routed by up1 (0x66, table 102), port 2376 without a routing block.
//! Also next-hop discovery: an ARP uplink without a gateway gets no device-only default, and a
//! gateway found only in another routing table is used.

mod common;

use common::uplinks::*;
use common::{both_backends, require_root, Backend, Netns, Node};
use serde_json::{json, Value};
use std::path::PathBuf;

const PLAIN: u16 = 2376;

fn seed_entry(node: &Node, reply_via: Option<&str>) -> Value {
    let mut routing = global_routing();
    if let Some(v) = reply_via {
        routing["replyVia"] = json!(v);
    }
    entry(
        node,
        Some(routing),
        &[routed("via-up1", PORT_UP1, None, "0x66", 102, "dind_up1", "up1"), forward("plain", PLAIN, None)],
    )
}

/// A connection that must not be answered (its replies leave by the wrong uplink and die).
#[track_caller]
fn expect_no_reply(node: &Node, from: &Netns, host: &str, port: u16) {
    let r = request(from, host, port);
    assert!(
        !(r.ok && r.text.lines().any(|l| l.trim() == "pod")),
        "[{}] {host}:{port} answered: {r:?}\n{}",
        from.name(),
        diagnostics(node)
    );
}

struct Site {
    t: Topology,
    pod: Pod,
    conf: PathBuf,
    _servers: [common::Background; 2],
}

fn site(backend: Backend, reply_via: Option<&str>) -> Site {
    let t = Topology::new(backend);
    t.strict_rp_filter();
    let conf = t.conflist(seed_entry(&t.node, reply_via));
    let pod = Pod::add(&t.node, &conf, "a");
    let plain = pod.ns.spawn(&format!("exec socat TCP-LISTEN:{PLAIN},reuseaddr,fork SYSTEM:'echo pod'"));
    let servers = [plain, pod.serve()];
    Site { t, pod, conf, _servers: servers }
}

fn replies_leave_by_the_uplink_the_connection_arrived_on(backend: Backend) {
    if !require_root() {
        return;
    }
    let s = site(backend, None);
    let (t, node) = (&s.t, &s.t.node);
    // A forward without a routing block: answered through whichever uplink the client came in by.
    expect_reply(node, &t.client1, UP1, PLAIN, "pod");
    expect_reply(node, &t.client2, UP2, PLAIN, "pod");
    // A forward routed by up1, reached through up2: answered through up2.
    expect_reply(node, &t.client2, UP2, PORT_UP1, "pod");
    expect_reply(node, &t.client1, UP1, PORT_UP1, "pod");
    // Pod-originated traffic still leaves by routing.outbound (up2).
    assert_pod_outbound(t, &s.pod);
    s.pod.cni(node, "check", &s.conf).assert_ok("CHECK");
}
both_backends!(replies_leave_by_the_uplink_the_connection_arrived_on);

fn reply_via_rule_is_the_seeds_behaviour(backend: Backend) {
    if !require_root() {
        return;
    }
    let s = site(backend, Some("rule"));
    let (t, node) = (&s.t, &s.t.node);
    // The fallback mark sends replies to 2376 out of up2: client2 is answered, client1 is not.
    expect_reply(node, &t.client2, UP2, PLAIN, "pod");
    expect_no_reply(node, &t.client1, UP1, PLAIN);
    // 30081's own block sends its replies out of up1: reached through up2, they die.
    expect_reply(node, &t.client1, UP1, PORT_UP1, "pod");
    expect_no_reply(node, &t.client2, UP2, PORT_UP1);
}
both_backends!(reply_via_rule_is_the_seeds_behaviour);

fn del_leaves_the_node_as_it_found_it(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let node = &t.node;
    node.ns.sh_ok("iptables -t mangle -N BN-PRIME && iptables -t mangle -X BN-PRIME");
    // host-local hands out .10 (the warm-up pod), then .11 (a) and .12 (b).
    let rules = [
        routed("via-up1", PORT_UP1, Some("10.20.0.11"), "0x66", 102, "dind_up1", "up1"),
        forward("plain", PLAIN, Some("10.20.0.12")),
    ];
    let conf = t.conflist(entry(node, Some(global_routing()), &rules));
    // The bridge plugin never deletes its bridge: a first pod leaves it, then the snapshot.
    let warm = Pod::add(node, &conf, "warm");
    warm.cni(node, "del", &conf).assert_ok("DEL warm");
    let before = node.snapshot();
    let a = Pod::add(node, &conf, "a");
    let b = Pod::add(node, &conf, "b");
    a.cni(node, "del", &conf).assert_ok("DEL a");
    b.cni(node, "check", &conf).assert_ok("CHECK b after DEL a");
    b.cni(node, "del", &conf).assert_ok("DEL b");
    assert_eq!(node.snapshot(), before, "the node differs after the last DEL\n{}", diagnostics(node));
}
both_backends!(del_leaves_the_node_as_it_found_it);

/// up4: an Ethernet (ARP) uplink to a router at 10.99.4.254, with no route via it in main.
fn ethernet_uplink_without_gateway(node: &Node) -> Netns {
    let router = Netns::new("bn-r4");
    node.veth_to(&router, "up4", "wan", "10.99.4.1/24", "10.99.4.254/24");
    router
}

fn an_ethernet_uplink_gets_a_gateway_from_another_table_or_no_default(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let node = &t.node;
    let _r4 = ethernet_uplink_without_gateway(node);
    let e = entry(node, None, &[routed("via-up4", 30084, None, "0x68", 104, "dind_up4", "up4")]);
    let conf = t.conflist(e);
    let pod = Pod::add(node, &conf, "a");
    let table = node.ns.sh_ok("ip route show table 104");
    assert!(!table.contains("default"), "no default route may be made up for up4:\n{table}");
    assert!(table.contains("10.99.4.0/24 dev up4"), "up4's own subnet stays reachable:\n{table}");
    let log = node.log();
    assert!(
        log.contains("uplink up4 of table 104 has no gateway"),
        "ADD must warn about up4's missing gateway:\n{log}"
    );
    let check = pod.cni(node, "check", &conf);
    assert_eq!(common::error_code(&check), Some(102), "CHECK must report it: {check:?}");
    assert!(common::error_msg(&check).contains("uplink up4 of table 104 has no gateway"), "{check:?}");

    // The uplink's default lives in a table of its own (EVE-OS keeps one per uplink).
    // `reconcile` (or the agent) completes the table once a gateway appears.
    node.ns.sh_ok("ip route add default via 10.99.4.254 dev up4 table 200 metric 50");
    let out = node.ns.sh(&format!(
        "{} reconcile --state-dir {} --log-file {}",
        env!("CARGO_BIN_EXE_bridge-nat"),
        node.state_dir().display(),
        node.log_file().display()
    ));
    assert!(out.status.success(), "reconcile: {out:?}");
    let table = node.ns.sh_ok("ip route show table 104");
    assert!(table.contains("default via 10.99.4.254 dev up4"), "the gateway of table 200 must be used:\n{table}");
    pod.cni(node, "check", &conf).assert_ok("CHECK once the gateway is found");
}
both_backends!(an_ethernet_uplink_gets_a_gateway_from_another_table_or_no_default);
