//! Two uplinks, each to its own router with one client behind it, shared by the routing, agent
//! and arrival-affinity suites. Every address lives in a namespace the test creates:
//!
//! ```text
//!   client1 203.0.113.10/25 ── router1 ── 198.51.100.254 ══ up1 198.51.100.1 ─┐
//!                     (203.0.113.1)                     main: default via up1   node [dind-br0 10.20.0.1] ── pods
//!   client2 203.0.113.140/25 ── router2 ── 192.0.2.254 ══ up2 192.0.2.1 ───────┘      10.20.0.x
//!                     (203.0.113.129)                   main: default via up2 metric 200
//! ```
//!
//! The routers forward but know only their own two links: a reply to client2 that leaves by
//! up1 dies at router1, and the other way round.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{error_code, error_msg, plugin_stdin, veth, wait_for, Backend, Background, DriverOutput, Netns, Node};
use serde_json::{json, Value};

pub const VERSION: &str = "1.0.0";
pub const UP1: &str = "198.51.100.1";
pub const ROUTER1: &str = "198.51.100.254";
pub const CLIENT1: &str = "203.0.113.10";
pub const UP2: &str = "192.0.2.1";
pub const ROUTER2: &str = "192.0.2.254";
pub const CLIENT2: &str = "203.0.113.140";
pub const UP3: &str = "100.64.0.1";
pub const UP3_PEER: &str = "100.64.0.2";
pub const P2P_CLIENT: &str = "203.0.113.200";
pub const WWAN: &str = "100.65.0.1";
pub const WWAN_GW: &str = "100.65.0.254";

/// Host ports of the standard config: 30080 is routed by up2, 30081 by up1.
pub const PORT_UP2: u16 = 30080;
pub const PORT_UP1: u16 = 30081;
/// Port of the servers on the far side that report the peer address.
pub const PEER_PORT: u16 = 9000;

/// How long a reply that should arrive may take (servers start in the background).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- topology

/// The node with two uplinks, each to its own router with one client behind it.
pub struct Topology {
    pub node: Node,
    pub router1: Netns,
    pub client1: Netns,
    /// Kept alive: client2's only way to the node.
    pub _router2: Netns,
    pub client2: Netns,
}

impl Topology {
    /// Builds the topology; the node's rp_filter is off (test 4 turns it on).
    pub fn new(backend: Backend) -> Topology {
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
    pub fn strict_rp_filter(&self) {
        self.node.ns.sh_ok(
            "sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.up1.rp_filter=1 net.ipv4.conf.up2.rp_filter=1",
        );
    }

    /// Point-to-point uplink `up3` (100.64.0.1 peer 100.64.0.2, no gateway anywhere) to a peer
    /// namespace that also holds a client address on the same link.
    pub fn add_point_to_point_uplink(&self) -> Netns {
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
    pub fn add_wwan0(&self) -> Netns {
        let router = Netns::new("bn-r3");
        self.node.veth_to(&router, "wwan0", "wan", &format!("{WWAN}/24"), &format!("{WWAN_GW}/24"));
        self.node.ns.sh_ok(&format!("ip route add default via {WWAN_GW} dev wwan0 metric 300"));
        router
    }

    pub fn conflist(&self, entry: Value) -> PathBuf {
        self.node.write_conflist(&self.node.conflist(VERSION, entry))
    }
}

/// A router on node uplink `uplink` (node `node_addr`/24, router `router_addr`/24), and a
/// client behind it on a /25 whose gateway is `lan_gw`. The router has no default route.
pub fn uplink_with_client(
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
pub struct Pod {
    pub ns: Netns,
    pub id: String,
    pub result: Value,
}

impl Pod {
    /// ADD through the driver; panics unless it succeeds and used the node's backend.
    pub fn add(node: &Node, conf: &Path, name: &str) -> Pod {
        let pod = Pod::attach(node, conf, name);
        node.assert_backend_in_use();
        pod
    }

    /// ADD through the driver of any conflist (bridge-nat need not be in it).
    pub fn attach(node: &Node, conf: &Path, name: &str) -> Pod {
        let mut pod = Pod { ns: node.add_pod(name), id: format!("ctr-{name}"), result: Value::Null };
        let out = pod.cni(node, "add", conf);
        out.assert_ok(&format!("ADD {}", pod.id));
        pod.result = out.json.expect("ADD prints a JSON result");
        pod
    }

    pub fn cni(&self, node: &Node, cmd: &str, conf: &Path) -> DriverOutput {
        node.cni(cmd, conf, &self.ns, &self.id, "eth0", &[])
    }

    /// ADD again by invoking the plugin directly, as a runtime repeating the call would:
    /// the entry with the list's name and version, and the result printed before as prevResult.
    pub fn readd(&self, node: &Node, entry: &Value) -> DriverOutput {
        node.plugin("ADD", &self.ns, &self.id, "eth0", &plugin_stdin(VERSION, entry, Some(&self.result)))
    }

    pub fn ipv4(&self) -> String {
        super::result_ip(&self.result, false)
    }

    /// The pod's TCP server on 8080, answering "pod".
    pub fn serve(&self) -> Background {
        self.ns.spawn("exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo pod'")
    }
}

/// A TCP server on `port` that answers with the address the connection came from.
pub fn serve_peer_addr(ns: &Netns, port: u16) -> Background {
    ns.spawn(&format!("exec socat TCP-LISTEN:{port},reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'"))
}

// ---------------------------------------------------------------- config

/// The node's bridge-nat entry with the given global routing block and static rules.
pub fn entry(node: &Node, routing: Option<Value>, rules: &[Value]) -> Value {
    let mut e = node.bridge_nat_entry();
    if let Some(r) = routing {
        e["routing"] = r;
    }
    e["portForwarding"] = json!({ "rules": rules });
    e
}

/// Global routing: pod-originated traffic leaves by up2 (table 100 "dind_net1", fallback 0x64).
pub fn global_routing() -> Value {
    json!({
        "enabled": true, "tableId": 100, "tableName": "dind_net1", "fwmark": "0x64", "rulePriority": 100,
        "outbound": { "interface": "up2" }
    })
}

/// A static TCP forward host_port → 8080 without its own routing.
pub fn forward(name: &str, host_port: u16, dest_ip: Option<&str>) -> Value {
    let mut r = json!({ "name": name, "hostPort": host_port, "destPort": 8080, "protocol": "tcp" });
    if let Some(ip) = dest_ip {
        r["destIP"] = json!(ip);
    }
    r
}

/// [`forward`] whose replies are routed by `uplink` (mark, table id and table name given).
pub fn routed(
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
pub fn two_uplink_entry(node: &Node) -> Value {
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
pub struct Reply {
    pub ok: bool,
    pub text: String,
}

pub fn request(ns: &Netns, host: &str, port: u16) -> Reply {
    let out = ns.sh(&format!("socat -T3 - TCP:{host}:{port},connect-timeout=3 </dev/null"));
    Reply {
        ok: out.status.success(),
        text: format!("{}{}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// Retries until a reply line equals `expected` (servers and addresses settle in the background).
#[track_caller]
pub fn expect_reply(node: &Node, from: &Netns, host: &str, port: u16, expected: &str) {
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
pub fn diagnostics(node: &Node) -> String {
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
pub fn expect_check_failure(node: &Node, pod: &Pod, conf: &Path, needles: &[&str]) {
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
pub fn assert_inbound_follows_port_uplink(t: &Topology) {
    expect_reply(&t.node, &t.client2, UP2, PORT_UP2, "pod");
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
}

/// The pod's own connections: to the world by routing.outbound (up2, masqueraded to up2's
/// address), to a network the node is directly on by main (router1 on up1's subnet).
pub fn assert_pod_outbound(t: &Topology, pod: &Pod) {
    let _far = serve_peer_addr(&t.client2, PEER_PORT);
    let _near = serve_peer_addr(&t.router1, PEER_PORT);
    expect_reply(&t.node, &pod.ns, CLIENT2, PEER_PORT, UP2);
    expect_reply(&t.node, &pod.ns, ROUTER1, PEER_PORT, UP1);
}
