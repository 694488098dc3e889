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

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    both_backends, dir_tree, error_code, error_msg, plugin_stdin, require_root, veth, wait_for, Backend, Background,
    DriverOutput, Netns, Node,
};
use serde_json::{json, Value};

const VERSION: &str = "1.0.0";
const UP1: &str = "198.51.100.1";
const ROUTER1: &str = "198.51.100.254";
const CLIENT1: &str = "203.0.113.10";
const UP2: &str = "192.0.2.1";
const ROUTER2: &str = "192.0.2.254";
const CLIENT2: &str = "203.0.113.140";
const UP3: &str = "100.64.0.1";
const UP3_PEER: &str = "100.64.0.2";
const P2P_CLIENT: &str = "203.0.113.200";
const WWAN: &str = "100.65.0.1";
const WWAN_GW: &str = "100.65.0.254";

/// Host ports of the standard config: 30080 is routed by up2, 30081 by up1.
const PORT_UP2: u16 = 30080;
const PORT_UP1: u16 = 30081;
/// Port of the servers on the far side that report the peer address.
const PEER_PORT: u16 = 9000;

/// How long a reply that should arrive may take (servers start in the background).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- topology

/// The node with two uplinks, each to its own router with one client behind it.
struct Topology {
    node: Node,
    router1: Netns,
    client1: Netns,
    /// Kept alive: client2's only way to the node.
    _router2: Netns,
    client2: Netns,
}

impl Topology {
    /// Builds the topology; the node's rp_filter is off (test 4 turns it on).
    fn new(backend: Backend) -> Topology {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        // IPv4 settings of a new namespace are inherited from the machine's: pin them.
        node.ns.sh_ok("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0");
        let (router1, client1) = uplink_with_client(&node, "up1", UP1, ROUTER1, "203.0.113.1", CLIENT1);
        let (router2, client2) = uplink_with_client(&node, "up2", UP2, ROUTER2, "203.0.113.129", CLIENT2);
        node.ns.sh_ok(&format!(
            "ip route add default via {ROUTER1} dev up1 && ip route add default via {ROUTER2} dev up2 metric 200"
        ));
        Topology { node, router1, client1, _router2: router2, client2 }
    }

    /// Strict reverse-path filtering on the node (all, up1, up2).
    fn strict_rp_filter(&self) {
        self.node.ns.sh_ok(
            "sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.up1.rp_filter=1 net.ipv4.conf.up2.rp_filter=1",
        );
    }

    /// Point-to-point uplink `up3` (100.64.0.1 peer 100.64.0.2, no gateway anywhere) to a peer
    /// namespace that also holds a client address on the same link.
    fn add_point_to_point_uplink(&self) -> Netns {
        let peer = Netns::new("bn-p2p");
        self.node.veth_to(&peer, "up3", "eth0", "", "");
        self.node.ns.sh_ok(&format!("ip addr add {UP3} peer {UP3_PEER} dev up3"));
        peer.sh_ok(&format!(
            "ip addr add {UP3_PEER}/32 dev eth0 && ip addr add {P2P_CLIENT}/32 dev eth0 && \
             ip route add {UP3} dev eth0 src {P2P_CLIENT}"
        ));
        peer
    }

    /// Uplink `wwan0` (100.65.0.1/24) to a router at 100.65.0.254, which the node's main
    /// table uses as a (low priority) default gateway.
    fn add_wwan0(&self) -> Netns {
        let router = Netns::new("bn-r3");
        self.node.veth_to(&router, "wwan0", "wan", &format!("{WWAN}/24"), &format!("{WWAN_GW}/24"));
        self.node.ns.sh_ok(&format!("ip route add default via {WWAN_GW} dev wwan0 metric 300"));
        router
    }

    fn conflist(&self, entry: Value) -> PathBuf {
        self.node.write_conflist(&self.node.conflist(VERSION, entry))
    }
}

/// A router on node uplink `uplink` (node `node_addr`/24, router `router_addr`/24), and a
/// client behind it on a /25 whose gateway is `lan_gw`. The router has no default route.
fn uplink_with_client(
    node: &Node,
    uplink: &str,
    node_addr: &str,
    router_addr: &str,
    lan_gw: &str,
    client_addr: &str,
) -> (Netns, Netns) {
    let router = Netns::new("bn-rtr");
    node.veth_to(&router, uplink, "wan", &format!("{node_addr}/24"), &format!("{router_addr}/24"));
    router.sh_ok("sysctl -qw net.ipv4.ip_forward=1");
    let client = Netns::new("bn-cli");
    veth(&router, "lan", &client, "eth0", &format!("{lan_gw}/25"), &format!("{client_addr}/25"));
    client.sh_ok(&format!("ip route add default via {lan_gw}"));
    (router, client)
}

// ---------------------------------------------------------------- pods

/// A pod namespace attached through the driver, with the ADD result it printed.
struct Pod {
    ns: Netns,
    id: String,
    result: Value,
}

impl Pod {
    /// ADD through the driver; panics unless it succeeds and used the node's backend.
    fn add(node: &Node, conf: &Path, name: &str) -> Pod {
        let pod = Pod::attach(node, conf, name);
        node.assert_backend_in_use();
        pod
    }

    /// ADD through the driver of any conflist (bridge-nat need not be in it).
    fn attach(node: &Node, conf: &Path, name: &str) -> Pod {
        let mut pod = Pod { ns: node.add_pod(name), id: format!("ctr-{name}"), result: Value::Null };
        let out = pod.cni(node, "add", conf);
        out.assert_ok(&format!("ADD {}", pod.id));
        pod.result = out.json.expect("ADD prints a JSON result");
        pod
    }

    fn cni(&self, node: &Node, cmd: &str, conf: &Path) -> DriverOutput {
        node.cni(cmd, conf, &self.ns, &self.id, "eth0", &[])
    }

    /// ADD again by invoking the plugin directly, as a runtime repeating the call would:
    /// the entry with the list's name and version, and the result printed before as prevResult.
    fn readd(&self, node: &Node, entry: &Value) -> DriverOutput {
        node.plugin("ADD", &self.ns, &self.id, "eth0", &plugin_stdin(VERSION, entry, Some(&self.result)))
    }

    fn ipv4(&self) -> String {
        common::result_ip(&self.result, false)
    }

    /// The pod's TCP server on 8080, answering "pod".
    fn serve(&self) -> Background {
        self.ns.spawn("exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo pod'")
    }
}

/// A TCP server on `port` that answers with the address the connection came from.
fn serve_peer_addr(ns: &Netns, port: u16) -> Background {
    ns.spawn(&format!("exec socat TCP-LISTEN:{port},reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'"))
}

// ---------------------------------------------------------------- config

/// The node's bridge-nat entry with the given global routing block and static rules.
fn entry(node: &Node, routing: Option<Value>, rules: &[Value]) -> Value {
    let mut e = node.bridge_nat_entry();
    if let Some(r) = routing {
        e["routing"] = r;
    }
    e["portForwarding"] = json!({ "rules": rules });
    e
}

/// Global routing: pod-originated traffic leaves by up2 (table 100 "dind_net1", fallback 0x64).
fn global_routing() -> Value {
    json!({
        "enabled": true, "tableId": 100, "tableName": "dind_net1", "fwmark": "0x64", "rulePriority": 100,
        "outbound": { "interface": "up2" }
    })
}

/// A static TCP forward host_port → 8080 without its own routing.
fn forward(name: &str, host_port: u16, dest_ip: Option<&str>) -> Value {
    let mut r = json!({ "name": name, "hostPort": host_port, "destPort": 8080, "protocol": "tcp" });
    if let Some(ip) = dest_ip {
        r["destIP"] = json!(ip);
    }
    r
}

/// [`forward`] whose replies are routed by `uplink` (mark, table id and table name given).
fn routed(
    name: &str,
    host_port: u16,
    dest_ip: Option<&str>,
    mark: &str,
    table: u32,
    table_name: &str,
    uplink: &str,
) -> Value {
    let mut r = forward(name, host_port, dest_ip);
    r["routing"] = json!({
        "fwmark": mark, "tableId": table, "tableName": table_name, "outbound": { "interface": uplink }
    });
    r
}

/// The standard config: global routing by up2, 30080 routed by up2 (0x65, table 101
/// "dind_up2"), 30081 routed by up1 (0x66, table 102 "dind_up1"), both to every pod.
fn two_uplink_entry(node: &Node) -> Value {
    entry(
        node,
        Some(global_routing()),
        &[
            routed("via-up2", PORT_UP2, None, "0x65", 101, "dind_up2", "up2"),
            routed("via-up1", PORT_UP1, None, "0x66", 102, "dind_up1", "up1"),
        ],
    )
}

// ---------------------------------------------------------------- clients

/// What one client run got back.
#[derive(Debug, Default)]
struct Reply {
    ok: bool,
    text: String,
}

fn request(ns: &Netns, host: &str, port: u16) -> Reply {
    let out = ns.sh(&format!("socat -T3 - TCP:{host}:{port},connect-timeout=3 </dev/null"));
    Reply {
        ok: out.status.success(),
        text: format!("{}{}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// Retries until a reply line equals `expected` (servers and addresses settle in the background).
#[track_caller]
fn expect_reply(node: &Node, from: &Netns, host: &str, port: u16, expected: &str) {
    let mut last = Reply::default();
    let got = wait_for(
        || {
            last = request(from, host, port);
            last.ok && last.text.lines().any(|l| l.trim() == expected)
        },
        REPLY_TIMEOUT,
    );
    assert!(got, "[{}] {host}:{port}: expected {expected:?}, last reply {last:?}\n{}", from.name(), diagnostics(node));
}

/// Everything useful when a packet did not arrive where it should.
fn diagnostics(node: &Node) -> String {
    let script = [
        "ip rule",
        "ip -4 route show table all",
        "iptables-save -t mangle",
        "iptables-save -t nat",
        "nft list ruleset",
        "conntrack -L 2>&1",
        "sysctl -a 2>/dev/null | grep -E 'ip_forward |rp_filter|src_valid_mark'",
        "ip -br addr",
    ]
    .map(|cmd| format!("echo '--- {cmd}'; {cmd}"))
    .join("; ");
    let out = node.ns.sh(&script);
    format!(
        "{}{}\n--- plugin log\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    )
}

/// The CNI error message of a failed invocation.
/// CHECK through the driver must fail with code 102 and name every one of `needles`.
#[track_caller]
fn expect_check_failure(node: &Node, pod: &Pod, conf: &Path, needles: &[&str]) {
    let out = pod.cni(node, "check", conf);
    assert_eq!(error_code(&out), Some(102), "CHECK must fail with 102: {out:?}\n{}", diagnostics(node));
    let msg = error_msg(&out);
    for needle in needles {
        assert!(msg.contains(needle), "CHECK message lacks {needle:?}: {msg}\n{}", diagnostics(node));
    }
}

// ---------------------------------------------------------------- shared checks

/// client2 reaches the pod through up2's address on the port routed by up2 (although main's
/// default is up1, where replies would die), and client1 through up1 on the port routed by up1.
fn assert_inbound_follows_port_uplink(t: &Topology) {
    expect_reply(&t.node, &t.client2, UP2, PORT_UP2, "pod");
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
}

/// The pod's own connections: to the world by routing.outbound (up2, masqueraded to up2's
/// address), to a network the node is directly on by main (router1 on up1's subnet).
fn assert_pod_outbound(t: &Topology, pod: &Pod) {
    let _far = serve_peer_addr(&t.client2, PEER_PORT);
    let _near = serve_peer_addr(&t.router1, PEER_PORT);
    expect_reply(&t.node, &pod.ns, CLIENT2, PEER_PORT, UP2);
    expect_reply(&t.node, &pod.ns, ROUTER1, PEER_PORT, UP1);
}

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
    let conf = t.conflist(entry(
        node,
        Some(global_routing()),
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
