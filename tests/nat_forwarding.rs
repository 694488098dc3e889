//! Real packets through the plugin's NAT, chained after Debian's bridge +
//! host-local and driven through libcni.
//!
//! Topology (every address lives in a namespace the test creates):
//!
//! ```text
//!   client 203.0.113.2 ──veth── 203.0.113.1 [up0] node [dind-br0] 10.20.0.1 ── pods 10.20.0.x
//!   remote 198.51.100.2 ──veth── 198.51.100.1 [up1] node                          (test 6 only)
//! ```
//!
//! Every scenario runs under both firewall backends (`NAME::iptables`, `NAME::nftables`), and
//! on a [`Site`] the node's iptables FORWARD policy is DROP in both families (as on a Docker
//! host), so forwarded traffic only flows through the plugin's own accepts: the iptables
//! backend's chain, or the nftables backend's elements plus its accepts in iptables' FORWARD (an
//! accept in our table cannot overrule a drop in another base chain).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    both_backends, error_code, nft_missing_element, plugin_stdin, require_root, wait_for, Backend, Background,
    DriverOutput, Netns, Node, NFT_ACCEPT_CHAIN, NFT_TABLE,
};
use serde_json::{json, Value};

const UPLINK: &str = "203.0.113.1";
const UPLINK2: &str = "203.0.113.3";
const CLIENT: &str = "203.0.113.2";
const REMOTE: &str = "198.51.100.2";
const UPLINK6: &str = "fd00:1::1";

/// How long a reply that should arrive may take (servers start in the background).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- topology

/// A node with an outside client on its uplink and a FORWARD DROP policy.
struct Site {
    node: Node,
    client: Netns,
}

impl Site {
    fn new(backend: Backend) -> Site {
        Site::on(Node::with_backend(backend))
    }

    /// A site around `node` (whichever way its entries choose the backend).
    fn on(node: Node) -> Site {
        node.prime_firewall();
        node.ns.sh_ok("iptables -P FORWARD DROP && ip6tables -P FORWARD DROP");
        let client = Netns::new("bn-client");
        node.veth_to(&client, "up0", "eth0", &format!("{UPLINK}/24"), &format!("{CLIENT}/24"));
        Site { node, client }
    }

    /// Gives the uplink a second address (the node then has two host IPs).
    fn add_uplink_address(&self, addr: &str) {
        self.node.ns.sh_ok(&format!("ip addr add {addr}/24 dev up0"));
    }

    /// IPv6 on the uplink: node fd00:1::1/64, client fd00:1::2/64.
    fn add_uplink_v6(&self) {
        self.node.ns.sh_ok("ip addr add fd00:1::1/64 dev up0 nodad");
        self.client.sh_ok("ip addr add fd00:1::2/64 dev eth0 nodad");
    }

    /// A "remote server" namespace behind a second node interface.
    fn add_remote(&self) -> Netns {
        let remote = Netns::new("bn-remote");
        self.node.veth_to(&remote, "up1", "eth0", "198.51.100.1/24", &format!("{REMOTE}/24"));
        remote
    }

    fn conflist(&self, version: &str, entry: Value) -> PathBuf {
        self.node.write_conflist(&self.node.conflist(version, entry))
    }

    /// A new pod, added through the driver.
    fn add_pod(&self, conf: &Path, name: &str, extra: &[&str]) -> Pod {
        add_pod(&self.node, conf, name, extra)
    }

    fn diagnostics(&self) -> String {
        diagnostics(&self.node)
    }
}

fn add_pod(node: &Node, conf: &Path, name: &str, extra: &[&str]) -> Pod {
    let mut pod = Pod::new(node, name);
    pod.add(node, conf, extra);
    pod
}

/// Everything useful when a packet did not arrive.
fn diagnostics(node: &Node) -> String {
    let out = node.ns.sh("echo '--- iptables-save'; iptables-save; echo '--- ip6tables-save'; ip6tables-save; \
         echo '--- nft list ruleset'; nft list ruleset; echo '--- conntrack'; conntrack -L 2>&1; echo '--- addresses'; ip -br addr; \
         echo '--- routes'; ip route; ip -6 route");
    format!(
        "{}{}\n--- plugin log\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    )
}

/// A pod namespace and, once added, the ADD result the driver printed.
struct Pod {
    ns: Netns,
    id: String,
    result: Value,
}

impl Pod {
    /// The namespace only; [`Pod::add`] attaches it.
    fn new(node: &Node, name: &str) -> Pod {
        Pod { ns: node.add_pod(name), id: format!("ctr-{name}"), result: Value::Null }
    }

    /// ADD through the driver; panics unless it succeeds and used the node's backend.
    fn add(&mut self, node: &Node, conf: &Path, extra: &[&str]) {
        let out = self.cni(node, "add", conf, extra);
        out.assert_ok(&format!("ADD {}", self.id));
        self.result = out.json.expect("ADD prints a JSON result");
        node.assert_backend_in_use();
    }

    /// The pod's address of the given family, without the prefix length.
    fn ip(&self, v6: bool) -> String {
        common::result_ip(&self.result, v6)
    }

    fn ipv4(&self) -> String {
        self.ip(false)
    }

    fn cni(&self, node: &Node, cmd: &str, conf: &Path, extra: &[&str]) -> DriverOutput {
        node.cni(cmd, conf, &self.ns, &self.id, "eth0", extra)
    }

    /// An IPv4 TCP server on `port` answering `reply` to every connection
    /// (`$SOCAT_PEERADDR` in `reply` expands to the client's address).
    fn serve_tcp(&self, port: u16, reply: &str) -> Background {
        self.ns.spawn(&format!("exec socat TCP-LISTEN:{port},reuseaddr,fork SYSTEM:'echo {reply}'"))
    }

    /// Like [`Pod::serve_tcp`], for IPv6 and IPv4 clients.
    fn serve_tcp_dual(&self, port: u16, reply: &str) -> Background {
        self.ns.spawn(&format!("exec socat TCP6-LISTEN:{port},ipv6only=0,reuseaddr,fork SYSTEM:'echo {reply}'"))
    }

    /// A UDP server on `port` answering `reply` to every datagram's sender.
    fn serve_udp(&self, port: u16, reply: &str) -> Background {
        self.ns.spawn(&format!("exec socat UDP-LISTEN:{port},fork SYSTEM:'echo {reply}'"))
    }

    /// Appends every datagram received on `port` to `log`.
    fn record_udp(&self, port: u16, log: &Path) -> Background {
        self.ns.spawn(&format!("exec socat -u UDP-RECV:{port} OPEN:{},creat,append", log.display()))
    }
}

// ---------------------------------------------------------------- config

/// The node's bridge-nat entry plus `extra` fields, with the portMappings capability.
fn entry(node: &Node, extra: Value) -> Value {
    let mut e = node.bridge_nat_entry();
    e["capabilities"] = json!({ "portMappings": true });
    for (k, v) in extra.as_object().expect("extra fields are an object") {
        e[k] = v.clone();
    }
    e
}

/// `"portForwarding"` with the given static rules.
fn static_rules(rules: &[Value]) -> Value {
    json!({ "portForwarding": { "rules": rules } })
}

fn rule(name: &str, host_port: u16, dest_port: u16, protocol: &str, dest_ip: Option<&str>) -> Value {
    let mut r = json!({ "name": name, "hostPort": host_port, "destPort": dest_port, "protocol": protocol });
    if let Some(ip) = dest_ip {
        r["destIP"] = json!(ip);
    }
    r
}

/// A portMappings entry for the driver's `--port-mappings`.
fn mapping(host_port: u16, container_port: u16, protocol: &str, host_ip: Option<&str>) -> Value {
    let mut m = json!({ "hostPort": host_port, "containerPort": container_port, "protocol": protocol });
    if let Some(ip) = host_ip {
        m["hostIP"] = json!(ip);
    }
    m
}

fn mappings(list: &[Value]) -> String {
    Value::Array(list.to_vec()).to_string()
}

/// Adds IPv6 to the harness conflist: a second host-local range and a default route.
fn dual_stack(mut conflist: Value) -> Value {
    let ipam = &mut conflist["plugins"][0]["ipam"];
    ipam["ranges"].as_array_mut().expect("ranges").push(json!([{ "subnet": "fd00:20::/64", "gateway": "fd00:20::1" }]));
    ipam["routes"].as_array_mut().expect("routes").push(json!({ "dst": "::/0" }));
    conflist
}

// ---------------------------------------------------------------- clients

#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
}

/// What one client run got back.
#[derive(Default)]
struct Reply {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Reply {
    /// A line of the answer is exactly `expected`.
    fn says(&self, expected: &str) -> bool {
        self.stdout.lines().any(|l| l.trim() == expected)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = if self.ok { "exit 0" } else { "failed" };
        write!(f, "{status}, stdout {:?}, stderr {:?}", self.stdout.trim(), self.stderr.trim())
    }
}

/// `host` is an IPv4 address or an IPv6 one in brackets.
fn request(ns: &Netns, proto: Proto, host: &str, port: u16) -> Reply {
    let v6 = if host.starts_with('[') { "6" } else { "" };
    let script = match proto {
        Proto::Tcp => format!("socat -T3 -t3 - TCP{v6}:{host}:{port},connect-timeout=3 </dev/null"),
        Proto::Udp => format!("echo ping | socat -T2 -t2 - UDP{v6}:{host}:{port}"),
    };
    let out = ns.sh(&script);
    Reply {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Retries until a reply contains `expected` (servers and addresses settle in the background).
#[track_caller]
fn expect_reply(node: &Node, from: &Netns, proto: Proto, host: &str, port: u16, expected: &str) {
    let mut last = Reply::default();
    let got = wait_for(
        || {
            last = request(from, proto, host, port);
            last.ok && last.says(expected)
        },
        REPLY_TIMEOUT,
    );
    assert!(got, "[{}] {host}:{port}: expected {expected:?}, last reply: {last}\n{}", from.name(), diagnostics(node));
}

// ---------------------------------------------------------------- tests

/// 1. TCP (static rule) and UDP (runtime portMapping) from outside reach the
///    pod through the uplink address, and the pod sees the client's address.
fn outside_client_reaches_pod_over_tcp_and_udp_without_snat(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let conf = site.conflist("1.0.0", entry(&site.node, static_rules(&[rule("web", 30080, 8080, "tcp", None)])));
    let pm = mappings(&[mapping(35353, 5353, "udp", None)]);
    let pod = site.add_pod(&conf, "a", &["--port-mappings", &pm]);
    let _tcp = pod.serve_tcp(8080, "pod-a $SOCAT_PEERADDR");
    let _udp = pod.serve_udp(5353, "pod-a $SOCAT_PEERADDR");

    let expected = format!("pod-a {CLIENT}");
    expect_reply(&site.node, &site.client, Proto::Tcp, UPLINK, 30080, &expected);
    expect_reply(&site.node, &site.client, Proto::Udp, UPLINK, 35353, &expected);
}
both_backends!(outside_client_reaches_pod_over_tcp_and_udp_without_snat);

/// 2. Two pods on one bridge, each with its own forward (static rules picked
///    by destIP): each host port reaches the right pod.
fn two_pods_each_reached_through_their_own_port(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let conf = site.conflist(
        "1.0.0",
        entry(
            &site.node,
            static_rules(&[
                rule("to-a", 30081, 8080, "tcp", Some("10.20.0.10")),
                rule("to-b", 30082, 8080, "tcp", Some("10.20.0.11")),
            ]),
        ),
    );
    let a = site.add_pod(&conf, "a", &[]);
    let b = site.add_pod(&conf, "b", &[]);
    assert_eq!((a.ipv4().as_str(), b.ipv4().as_str()), ("10.20.0.10", "10.20.0.11"));
    let _sa = a.serve_tcp(8080, "pod-a");
    let _sb = b.serve_tcp(8080, "pod-b");

    expect_reply(&site.node, &site.client, Proto::Tcp, UPLINK, 30081, "pod-a");
    expect_reply(&site.node, &site.client, Proto::Tcp, UPLINK, 30082, "pod-b");
}
both_backends!(two_pods_each_reached_through_their_own_port);

/// 3. Hairpin: a pod reaches its own forwarded port through the node's
///    uplink address, and so does another pod on the bridge.
fn hairpin_from_the_pod_itself_and_from_a_neighbour(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let conf = site.conflist("1.0.0", entry(&site.node, json!({})));
    let pm = mappings(&[mapping(30080, 8080, "tcp", None)]);
    let a = site.add_pod(&conf, "a", &["--port-mappings", &pm]);
    let b = site.add_pod(&conf, "b", &[]);
    let _server = a.serve_tcp(8080, "pod-a");

    expect_reply(&site.node, &a.ns, Proto::Tcp, UPLINK, 30080, "pod-a");
    expect_reply(&site.node, &b.ns, Proto::Tcp, UPLINK, 30080, "pod-a");
}
both_backends!(hairpin_from_the_pod_itself_and_from_a_neighbour);

/// 4. From the node itself: 127.0.0.1:hostPort and uplink:hostPort both reach the pod.
fn node_reaches_pod_through_localhost_and_its_own_address(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let conf = site.conflist("1.0.0", entry(&site.node, json!({})));
    let pm = mappings(&[mapping(30080, 8080, "tcp", None)]);
    let a = site.add_pod(&conf, "a", &["--port-mappings", &pm]);
    let _server = a.serve_tcp(8080, "pod-a");

    expect_reply(&site.node, &site.node.ns, Proto::Tcp, "127.0.0.1", 30080, "pod-a");
    expect_reply(&site.node, &site.node.ns, Proto::Tcp, UPLINK, 30080, "pod-a");
}
both_backends!(node_reaches_pod_through_localhost_and_its_own_address);

/// 5. A mapping with hostIP only answers on that address.
fn host_ip_restricts_the_mapping_to_one_address(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    site.add_uplink_address(UPLINK2);
    let conf = site.conflist("1.0.0", entry(&site.node, json!({})));
    let pm = mappings(&[mapping(30080, 8080, "tcp", Some(UPLINK))]);
    let a = site.add_pod(&conf, "a", &["--port-mappings", &pm]);
    let _server = a.serve_tcp(8080, "pod-a");

    expect_reply(&site.node, &site.client, Proto::Tcp, UPLINK, 30080, "pod-a");
    let other = request(&site.client, Proto::Tcp, UPLINK2, 30080);
    assert!(
        !other.ok && !other.says("pod-a"),
        "{UPLINK2}:30080 must not be forwarded (hostIP is {UPLINK}), got: {other}\n{}",
        site.diagnostics()
    );
    if backend == Backend::Nftables {
        let node = &site.node;
        let want = format!("{UPLINK} . tcp . 30080 : {} . 8080", a.ipv4());
        let (addr, any) = (node.nft_elements("dnat4-addr"), node.nft_elements("dnat4-any"));
        assert!(
            addr == [want.clone()] && any.is_empty(),
            "want only {want:?} in dnat4-addr: {addr:?}, dnat4-any {any:?}"
        );
    }
}
both_backends!(host_ip_restricts_the_mapping_to_one_address);

/// 6. A host port forward does not capture traffic to the same port on
///    other hosts: the pod (and the node) still reach the remote server.
fn forward_does_not_hijack_connections_to_remote_hosts(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let remote = site.add_remote();
    let _remote_server = remote.spawn("exec socat TCP-LISTEN:2376,reuseaddr,fork SYSTEM:'echo remote'");
    let conf = site.conflist("1.0.0", entry(&site.node, static_rules(&[rule("docker-tls", 2376, 2376, "tcp", None)])));
    let a = site.add_pod(&conf, "a", &[]);
    let _server = a.serve_tcp(2376, "pod-a");

    // The forward is live...
    expect_reply(&site.node, &site.client, Proto::Tcp, UPLINK, 2376, "pod-a");
    // ...yet the same port elsewhere is left alone.
    expect_reply(&site.node, &a.ns, Proto::Tcp, REMOTE, 2376, "remote");
    expect_reply(&site.node, &site.node.ns, Proto::Tcp, REMOTE, 2376, "remote");
}
both_backends!(forward_does_not_hijack_connections_to_remote_hosts);

/// Whether conntrack holds a UDP entry to uplink:`port` that is not DNAT'd
/// (its reply tuple comes from the uplink address itself).
fn undnat_udp_entry(node: &Node, port: u16) -> bool {
    let out = node.ns.sh(&format!("conntrack -L -p udp --orig-port-dst {port} 2>/dev/null"));
    let reply = format!("src={UPLINK} dst={CLIENT} sport={port}");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.contains(&reply))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// 7. A UDP flow that keeps sending from one source port follows the host
///    port to a re-created pod (the plugin clears stale conntrack entries).
fn udp_flow_follows_a_recreated_pod(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let node = &site.node;
    // Any node with a stateful firewall tracks connections; a namespace with
    // no conntrack user would not track the flow at all. The node's own firewall
    // speaks the backend's language.
    match backend {
        Backend::Iptables => node.ns.sh_ok("iptables -A INPUT -m conntrack --ctstate INVALID -j DROP"),
        Backend::Nftables => node.ns.sh_ok(
            "nft add table inet node-fw && \
             nft add chain inet node-fw input '{ type filter hook input priority filter; }' && \
             nft add rule inet node-fw input ct state invalid drop",
        ),
    };
    let conf = site.conflist("1.0.0", entry(node, json!({})));
    let pm = mappings(&[mapping(5353, 5353, "udp", None)]);
    let pm = ["--port-mappings", pm.as_str()];

    // One datagram every 100 ms from 203.0.113.2:40000, for at most a minute.
    let _sender = site.client.spawn(&format!(
        "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done \
         | socat -u - UDP-SENDTO:{UPLINK}:5353,sourceport=40000"
    ));
    assert!(
        wait_for(|| undnat_udp_entry(node, 5353), Duration::from_secs(5)),
        "the flow never got a (non-DNAT) conntrack entry before the first pod\n{}",
        site.diagnostics()
    );

    let log_a = node.dir().join("pod-a.udp");
    let mut a = Pod::new(node, "a");
    let _recv_a = a.record_udp(5353, &log_a);
    a.add(node, &conf, &pm);
    assert!(
        wait_for(|| file_len(&log_a) > 0, Duration::from_secs(5)),
        "pod A ({}) received nothing of the running flow\n{}",
        a.ipv4(),
        site.diagnostics()
    );

    a.cni(node, "del", &conf, &pm).assert_ok("DEL a");
    // With the forward gone the flow is tracked to the node again: exactly
    // the stale entry that would keep B from ever seeing it.
    assert!(
        wait_for(|| undnat_udp_entry(node, 5353), Duration::from_secs(5)),
        "no non-DNAT conntrack entry after DEL of pod A\n{}",
        site.diagnostics()
    );

    let log_b = node.dir().join("pod-b.udp");
    let mut b = Pod::new(node, "b");
    let _recv_b = b.record_udp(5353, &log_b);
    b.add(node, &conf, &pm);
    assert!(
        wait_for(|| file_len(&log_b) > 0, Duration::from_secs(5)),
        "re-created pod B ({}) received nothing of the running flow\n{}",
        b.ipv4(),
        site.diagnostics()
    );
}
both_backends!(udp_flow_follows_a_recreated_pod);

/// 8. A host port held by one pod is refused to another; the failed ADD
///    leaves the firewall as it was.
fn port_conflict_is_refused_without_touching_the_firewall(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    node.prime_firewall();
    let conf = node.write_conflist(&node.conflist("1.0.0", entry(&node, json!({}))));
    let pm = mappings(&[mapping(30080, 8080, "tcp", None)]);
    let pm = ["--port-mappings", pm.as_str()];
    let _a = add_pod(&node, &conf, "a", &pm);
    let before = node.snapshot();
    let firewall_before = node.firewall_snapshot();

    let b = Pod::new(&node, "b");
    let out = b.cni(&node, "add", &conf, &pm);
    assert_eq!(error_code(&out), Some(101), "ADD of b must be a port conflict: {out:?}");
    let msg = out.json.as_ref().and_then(|j| j["msg"].as_str()).unwrap_or_default();
    for owner in ["ctr-a", "ctr-b", "30080/tcp"] {
        assert!(msg.contains(owner), "conflict message lacks {owner:?}: {msg}");
    }
    // libcni ran bridge and host-local for b before bridge-nat refused it.
    assert_eq!(node.firewall_snapshot(), firewall_before, "the failed ADD changed the firewall");

    b.cni(&node, "del", &conf, &pm).assert_ok("DEL b");
    assert_eq!(node.snapshot(), before, "node differs after the refused pod's DEL");
}
both_backends!(port_conflict_is_refused_without_touching_the_firewall);

/// The `-A BRIDGE-NAT-DNAT ...` line of iptables-save for `port`.
fn dnat_line(node: &Node, port: u16) -> Option<String> {
    let save = node.ns.sh_ok("iptables-save -t nat");
    let dport = format!("--dport {port} ");
    save.lines().find(|l| l.starts_with("-A BRIDGE-NAT-DNAT ") && l.contains(&dport)).map(str::to_owned)
}

/// The IPv4 tcp forward of host `port` as the backend holds it: the iptables DNAT rule, or the
/// dnat4-any element `tcp . PORT : POD . DPORT`.
fn tcp_forward(node: &Node, port: u16) -> Option<String> {
    match node.backend() {
        Backend::Iptables => dnat_line(node, port),
        Backend::Nftables => {
            let key = format!("tcp . {port} : ");
            node.nft_elements("dnat4-any").into_iter().find(|e| e.starts_with(&key))
        }
    }
}

/// Deletes [`tcp_forward`] by hand, as an admin would (`iptables -D`, `nft delete element`).
/// Returns the rule as CHECK should name it.
fn delete_tcp_forward(node: &Node, port: u16, forward: &str) -> String {
    match node.backend() {
        Backend::Iptables => {
            let spec = forward.trim_start_matches("-A ").replace('"', "");
            let mut delete = vec!["iptables", "-t", "nat", "-D"];
            delete.extend(spec.split_whitespace());
            let out = node.ns.exec(&delete);
            assert!(out.status.success(), "{delete:?}: {}", String::from_utf8_lossy(&out.stderr));
            spec
        }
        Backend::Nftables => {
            node.ns.sh_ok(&format!("nft delete element inet {NFT_TABLE} dnat4-any '{{ tcp . {port} }}'"));
            forward.to_string()
        }
    }
}

/// 9. CHECK notices a forward deleted by hand (an iptables rule, an nftables map element); a
///    runtime's repeated ADD puts it back.
fn check_fails_on_a_deleted_rule_and_re_add_restores_it(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    let bridge_nat = entry(&node, static_rules(&[rule("web", 30080, 8080, "tcp", None)]));
    let conf = node.write_conflist(&node.conflist("1.0.0", bridge_nat.clone()));
    let a = add_pod(&node, &conf, "a", &[]);
    a.cni(&node, "check", &conf, &[]).assert_ok("CHECK before tampering");

    let forward = tcp_forward(&node, 30080).unwrap_or_else(|| panic!("no forward of 30080\n{}", diagnostics(&node)));
    let destination = match backend {
        Backend::Iptables => format!("--to-destination {}:8080", a.ipv4()),
        Backend::Nftables => format!(": {} . 8080", a.ipv4()),
    };
    assert!(forward.contains(&destination), "the forward of 30080 does not go to {destination:?}: {forward}");
    let named = delete_tcp_forward(&node, 30080, &forward);
    assert_eq!(tcp_forward(&node, 30080), None, "the forward is still there\n{}", diagnostics(&node));

    let check = a.cni(&node, "check", &conf, &[]);
    assert_eq!(error_code(&check), Some(102), "CHECK must fail: {check:?}");
    let msg = check.json.as_ref().and_then(|j| j["msg"].as_str()).unwrap_or_default();
    let names_it = match backend {
        Backend::Iptables => msg.contains("missing") && msg.contains(&named),
        Backend::Nftables => msg.contains(&nft_missing_element("dnat4-any", &named)),
    };
    assert!(names_it, "CHECK must name the missing forward {named:?}: {msg}");

    // A runtime repeating ADD for the same attachment (libcni cannot: the
    // bridge plugin refuses the existing veth).
    let stdin = plugin_stdin("1.0.0", &bridge_nat, Some(&a.result));
    let readd = node.plugin("ADD", &a.ns, &a.id, "eth0", &stdin);
    readd.assert_ok("direct re-ADD");
    assert_eq!(readd.json.as_ref(), Some(&a.result), "re-ADD must print the prevResult");
    assert_eq!(tcp_forward(&node, 30080).as_deref(), Some(forward.as_str()), "re-ADD did not restore the forward");
    a.cni(&node, "check", &conf, &[]).assert_ok("CHECK after re-ADD");
}
both_backends!(check_fails_on_a_deleted_rule_and_re_add_restores_it);

/// 10. After the last DEL the node is exactly as before the first ADD, with
///     pods removed in the order they were added.
fn teardown_leaves_the_node_as_it_was(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    node.prime_firewall();
    // The bridge plugin never deletes the bridge it creates: let it create
    // it first, with a bridge-only network, so only bridge-nat's traces count.
    let mut bridge_only = node.conflist("1.0.0", json!({}));
    bridge_only["plugins"].as_array_mut().expect("plugins").truncate(1);
    let bridge_only = node.write_conflist(&bridge_only);
    let warm = Pod::new(&node, "warmup");
    warm.cni(&node, "add", &bridge_only, &[]).assert_ok("ADD warmup");
    warm.cni(&node, "del", &bridge_only, &[]).assert_ok("DEL warmup");

    let before = node.snapshot();
    // Runtime mappings only: a static rule without destIP would apply to both pods and conflict.
    let conf = node.write_conflist(&node.conflist("1.0.0", entry(&node, json!({}))));
    let pm_a = mappings(&[mapping(30080, 8080, "tcp", None), mapping(35353, 5353, "udp", None)]);
    let pm_b = mappings(&[mapping(30090, 80, "tcp", Some(UPLINK)), mapping(35354, 53, "udp", None)]);
    let a = add_pod(&node, &conf, "a", &["--port-mappings", &pm_a]);
    let b = add_pod(&node, &conf, "b", &["--port-mappings", &pm_b]);
    let during = node.snapshot();
    assert!(during != before && tcp_forward(&node, 30080).is_some(), "no forwards installed:\n{during}");

    a.cni(&node, "del", &conf, &["--port-mappings", &pm_a]).assert_ok("DEL a");
    b.cni(&node, "del", &conf, &["--port-mappings", &pm_b]).assert_ok("DEL b");
    let after = node.snapshot();
    assert!(
        after == before,
        "node differs after the last DEL\n--- before\n{before}\n--- after\n{after}\n--- log\n{}",
        node.log()
    );
}
both_backends!(teardown_leaves_the_node_as_it_was);

/// 11. IPv6: a dual-stack pod is reached through the node's v6 uplink address.
fn ipv6_client_reaches_dual_stack_pod(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    site.add_uplink_v6();
    let node = &site.node;
    let conf = node.write_conflist(&dual_stack(node.conflist("1.0.0", entry(node, json!({})))));
    let pm = mappings(&[mapping(30080, 8080, "tcp", None)]);
    let a = site.add_pod(&conf, "a", &["--port-mappings", &pm]);
    let _server = a.serve_tcp_dual(8080, "pod-a");

    expect_reply(node, &site.client, Proto::Tcp, &format!("[{UPLINK6}]"), 30080, "pod-a");
    expect_reply(node, &site.client, Proto::Tcp, UPLINK, 30080, "pod-a");

    let v6 = a.ip(true);
    match backend {
        Backend::Iptables => {
            let save = node.ns.sh_ok("ip6tables-save");
            for wanted in [
                format!("-j DNAT --to-destination [{v6}]:8080"),
                format!("-A BRIDGE-NAT-FORWARD -d {v6}/128 -o {} -p tcp", common::BRIDGE),
            ] {
                assert!(save.contains(&wanted), "ip6tables-save lacks {wanted:?}:\n{save}");
            }
            assert!(!save.contains("127.0.0.0/8"), "IPv4 loopback rule in ip6tables:\n{save}");
        }
        Backend::Nftables => {
            for (set, wanted) in [
                ("dnat6-any", format!("tcp . 30080 : {v6} . 8080")),
                ("dnat4-any", format!("tcp . 30080 : {} . 8080", a.ipv4())),
            ] {
                let elements = node.nft_elements(set);
                assert!(elements.contains(&wanted), "{set} lacks {wanted:?}: {elements:?}");
            }
        }
    }
}
both_backends!(ipv6_client_reaches_dual_stack_pod);

/// 12. At 0.3.1 libcni sends DEL without prevResult; DEL without the
///     runtime's portMappings still removes every rule from the record.
fn del_without_prev_result_or_runtime_config_removes_everything(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    let conf = node.write_conflist(&node.conflist("0.3.1", entry(&node, json!({}))));
    let pm = mappings(&[mapping(30080, 8080, "tcp", None), mapping(35353, 5353, "udp", None)]);
    let a = add_pod(&node, &conf, "a", &["--port-mappings", &pm]);
    match backend {
        Backend::Iptables => {
            let save = node.ns.sh_ok("iptables-save");
            assert!(save.contains("bridge-nat") && save.contains("--dport 30080"), "ADD installed nothing:\n{save}");
        }
        Backend::Nftables => {
            let dnat = node.nft_elements("dnat4-any");
            let want = [format!("tcp . 30080 : {} . 8080", a.ipv4()), format!("udp . 35353 : {} . 5353", a.ipv4())];
            assert_eq!(dnat, want, "dnat4-any after ADD");
        }
    }

    a.cni(&node, "del", &conf, &[]).assert_ok("DEL at 0.3.1");
    let traces = node.iptables_traces();
    assert!(traces.is_empty(), "rules left after DEL:\n{}\n--- log\n{}", traces.join("\n"), node.log());
    assert!(!node.nft_table_exists(), "table inet {NFT_TABLE} left after DEL:\n{}", diagnostics(&node));
}
both_backends!(del_without_prev_result_or_runtime_config_removes_everything);

/// 13. An entry without `"backend"` is served by nftables on this machine (nf_tables is there):
///     the record says so, and iptables holds nothing of bridge-nat but the accepts beside the
///     FORWARD DROP, in IPv4 only (the network has no IPv6). They come with the network's first
///     attachment; a later one spawns no process (its iptables tool does not exist), and the last
///     DEL takes them away.
#[test]
fn an_entry_without_backend_gets_nftables_and_accepts_beside_forward_drop() {
    if !require_root() {
        return;
    }
    let site = Site::on(Node::with_auto_backend());
    let node = &site.node;
    let bridge_nat = entry(node, static_rules(&[rule("web", 30080, 8080, "tcp", Some("10.20.0.10"))]));
    assert!(bridge_nat.get("backend").is_none(), "the entry names a backend: {bridge_nat}");
    let conf = site.conflist("1.0.0", bridge_nat.clone());
    let a = site.add_pod(&conf, "a", &[]);
    assert_eq!(a.ipv4(), "10.20.0.10");
    let record = node.record(&a.id, "eth0").expect("a record of pod a");
    assert_eq!(record["backend"], json!("nftables"), "record: {record}");

    let c = "-m comment --comment";
    let want = vec![
        format!(":{NFT_ACCEPT_CHAIN} -"),
        format!("-A FORWARD {c} bridge-nat -j {NFT_ACCEPT_CHAIN}"),
        format!("-A {NFT_ACCEPT_CHAIN} -i {} {c} \"bridge-nat:dind\" -j ACCEPT", common::BRIDGE),
        format!(
            "-A {NFT_ACCEPT_CHAIN} -o {} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT {c} \"bridge-nat:dind\" -j ACCEPT",
            common::BRIDGE
        ),
    ];
    assert_eq!(node.nft_accepts("iptables-save"), want, "\n{}", site.diagnostics());
    assert_eq!(node.nft_accepts("ip6tables-save"), Vec::<String>::new(), "IPv6 accepts for an IPv4 network");
    let _server = a.serve_tcp(8080, "pod-a");
    expect_reply(node, &site.client, Proto::Tcp, UPLINK, 30080, "pod-a");
    a.cni(node, "check", &conf, &[]).assert_ok("CHECK a");

    // The network's accepts are there: a second attachment needs no iptables tool at all.
    let mut no_tool = bridge_nat.clone();
    no_tool["iptables"] = json!("/nonexistent/iptables");
    let no_tool = site.conflist("1.0.0", no_tool);
    let b = site.add_pod(&no_tool, "b", &[]);
    assert_eq!(node.record(&b.id, "eth0").expect("record of b")["backend"], json!("nftables"));
    b.cni(node, "del", &no_tool, &[]).assert_ok("DEL b (not the last) without an iptables tool");
    assert_eq!(node.nft_accepts("iptables-save"), want, "the accepts must stay while pod a is there");

    a.cni(node, "del", &conf, &[]).assert_ok("DEL a");
    let traces = node.iptables_traces();
    assert!(traces.is_empty(), "left after the last DEL:\n{}", traces.join("\n"));
    assert!(!node.nft_table_exists(), "table inet {NFT_TABLE} left after the last DEL");
}
