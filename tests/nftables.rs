//! What only the nftables backend (`"backend": "nftables"`) promises: no iptables rule at all
//! (but its accepts beside an iptables FORWARD that drops by policy), one table `inet bridge-nat`
//! that exists exactly while an attachment does and holds each attachment as set and map
//! elements, DNAT only for packets addressed to the node; and how an attachment moves between
//! backends.
//!
//! Topology (every address lives in a namespace the test creates):
//!
//! ```text
//!   client 203.0.113.2 ──veth── 203.0.113.1 [up0] node [dind-br0] 10.20.0.1 ── pods 10.20.0.x
//!   remote 198.51.100.2 ──veth── 198.51.100.1 [up1] node                  (transit test only)
//! ```
//!
//! The node has no firewall of its own: nothing creates an iptables table before the plugin.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    nft_sets, normalise_nft, parallel, require_root, wait_for, Backend, Background, DriverOutput, Netns, Node,
    NFT_ACCEPT_CHAIN, NFT_TABLE,
};
use serde_json::{json, Value};

const UPLINK: &str = "203.0.113.1";
const CLIENT: &str = "203.0.113.2";
const REMOTE: &str = "198.51.100.2";
const UPLINK6: &str = "fd00:1::1";
const CLIENT6: &str = "fd00:1::2";

/// How long a reply that should arrive may take (servers start in the background).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- topology

/// An nftables-backend node with a client on its uplink (IPv4 and IPv6), and its default route
/// via the client (so `routing.outbound` can use up0).
struct Site {
    node: Node,
    client: Netns,
}

impl Site {
    fn new() -> Site {
        let node = Node::with_backend(Backend::Nftables);
        let client = Netns::new("bn-client");
        node.veth_to(&client, "up0", "eth0", &format!("{UPLINK}/24"), &format!("{CLIENT}/24"));
        node.ns.sh_ok(&format!("ip addr add {UPLINK6}/64 dev up0 nodad && ip route add default via {CLIENT}"));
        client.sh_ok(&format!("ip addr add {CLIENT6}/64 dev eth0 nodad"));
        // An uplink with a global IPv6 address routes IPv6 too: without a gateway, CHECK says so.
        node.ns.sh_ok(&format!("ip -6 route add default via {CLIENT6} dev up0"));
        warm_up_bridge(&node);
        Site { node, client }
    }

    fn conflist(&self, entry: Value) -> PathBuf {
        self.node.write_conflist(&dual_stack_conflist(&self.node.ipam_dir(), entry))
    }
}

/// The harness conflist, dual-stack (fd00:20::/64), with host-local's IPv4 range widened to
/// 10.20.0.10-250.
fn dual_stack_conflist(ipam_dir: &Path, entry: Value) -> Value {
    let mut list = common::conflist("1.0.0", ipam_dir, entry);
    let ipam = &mut list["plugins"][0]["ipam"];
    ipam["ranges"][0][0]["rangeEnd"] = json!("10.20.0.250");
    ipam["ranges"].as_array_mut().expect("ranges").push(json!([{ "subnet": "fd00:20::/64", "gateway": "fd00:20::1" }]));
    ipam["routes"].as_array_mut().expect("routes").push(json!({ "dst": "::/0" }));
    list
}

/// Lets the bridge plugin create the bridge and its gateway addresses with a bridge-only network
/// (own IPAM store), so only bridge-nat's traces differ between snapshots.
fn warm_up_bridge(node: &Node) {
    let mut bridge_only = dual_stack_conflist(&node.dir().join("ipam-warmup"), json!({}));
    bridge_only["plugins"].as_array_mut().expect("plugins").truncate(1);
    let bridge_only = node.write_conflist(&bridge_only);
    let warm = Pod::new(node, "warmup");
    warm.cni(node, "add", &bridge_only, &[]).assert_ok("ADD warmup");
    // Until DAD is done the bridge's IPv6 gateway has no local route; without a port DAD
    // never finishes, so the first real pod would add the route and spoil the snapshot.
    let settled = || node.ns.sh_ok(&format!("ip -6 addr show dev {} tentative", common::BRIDGE)).trim().is_empty();
    assert!(wait_for(settled, Duration::from_secs(10)), "the bridge's IPv6 address stays tentative");
    warm.cni(node, "del", &bridge_only, &[]).assert_ok("DEL warmup");
}

/// The node's entry accepting runtime portMappings, plus `extra` fields.
fn entry(node: &Node, extra: Value) -> Value {
    let mut e = node.bridge_nat_entry();
    e["capabilities"] = json!({ "portMappings": true });
    for (k, v) in extra.as_object().expect("extra fields are an object") {
        e[k] = v.clone();
    }
    e
}

fn mappings(list: &[(u16, u16, &str, Option<&str>)]) -> String {
    let list: Vec<Value> = list
        .iter()
        .map(|&(host_port, container_port, protocol, host_ip)| {
            let mut m = json!({ "hostPort": host_port, "containerPort": container_port, "protocol": protocol });
            if let Some(ip) = host_ip {
                m["hostIP"] = json!(ip);
            }
            m
        })
        .collect();
    Value::Array(list).to_string()
}

/// A pod namespace and, once added, the ADD result.
struct Pod {
    ns: Netns,
    id: String,
    result: Value,
}

impl Pod {
    fn new(node: &Node, name: &str) -> Pod {
        Pod { ns: node.add_pod(name), id: format!("ctr-{name}"), result: Value::Null }
    }

    fn cni(&self, node: &Node, cmd: &str, conf: &Path, extra: &[&str]) -> DriverOutput {
        node.cni(cmd, conf, &self.ns, &self.id, "eth0", extra)
    }

    fn add(&mut self, node: &Node, conf: &Path, extra: &[&str]) {
        let out = self.cni(node, "add", conf, extra);
        out.assert_ok(&format!("ADD {}", self.id));
        self.result = out.json.expect("ADD prints a JSON result");
    }

    /// A new pod added through the driver with `--port-mappings pm`; panics unless ADD succeeds
    /// and used the nftables backend.
    fn added(node: &Node, conf: &Path, name: &str, pm: &str) -> Pod {
        let mut pod = Pod::new(node, name);
        pod.add(node, conf, &["--port-mappings", pm]);
        node.assert_backend_in_use();
        pod
    }

    fn ip(&self, v6: bool) -> String {
        common::result_ip(&self.result, v6)
    }

    /// A TCP server on `port` (IPv4 and IPv6) answering `reply`.
    fn serve(&self, port: u16, reply: &str) -> Background {
        self.ns.spawn(&format!("exec socat TCP6-LISTEN:{port},ipv6only=0,reuseaddr,fork SYSTEM:'echo {reply}'"))
    }
}

// ---------------------------------------------------------------- clients and state

fn request(ns: &Netns, host: &str, port: u16) -> (bool, String) {
    let v6 = if host.starts_with('[') { "6" } else { "" };
    let out = ns.sh(&format!("socat -T3 -t3 - TCP{v6}:{host}:{port},connect-timeout=3 </dev/null"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Retries until a reply line is exactly `expected`; `Err` with the last reply otherwise.
fn reply_from(from: &Netns, host: &str, port: u16, expected: &str) -> Result<(), String> {
    let mut last = String::new();
    let got = wait_for(
        || {
            let (ok, text) = request(from, host, port);
            last = text;
            ok && last.lines().any(|l| l.trim() == expected)
        },
        REPLY_TIMEOUT,
    );
    if got {
        Ok(())
    } else {
        Err(format!("[{}] {host}:{port}: expected {expected:?}, last reply {:?}", from.name(), last.trim()))
    }
}

#[track_caller]
fn expect_reply(node: &Node, from: &Netns, host: &str, port: u16, expected: &str) {
    if let Err(e) = reply_from(from, host, port, expected) {
        panic!("{e}\n{}", diagnostics(node));
    }
}

fn diagnostics(node: &Node) -> String {
    let out = node.ns.sh("echo '--- nft list ruleset'; nft list ruleset; echo '--- iptables-save'; iptables-save; \
         echo '--- ip6tables-save'; ip6tables-save; echo '--- conntrack'; conntrack -L 2>&1; \
         echo '--- ip rule'; ip rule; echo '--- routes'; ip route show table all");
    format!(
        "{}{}\n--- plugin log\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    )
}

/// `nft list tables` of the node, sorted.
fn nft_tables(node: &Node) -> Vec<String> {
    let mut tables: Vec<String> = node.ns.sh_ok("nft list tables").lines().map(|l| l.trim().to_string()).collect();
    tables.sort();
    tables
}

/// Rule and chain lines of every iptables flavour (nft and legacy, both families).
fn iptables_lines(node: &Node) -> Vec<String> {
    let mut lines = Vec::new();
    for cmd in ["iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
        let text = node.ns.sh_ok(cmd);
        lines
            .extend(text.lines().filter(|l| l.starts_with("-A ") || l.starts_with(':')).map(|l| format!("{cmd}: {l}")));
    }
    lines
}

/// Every element of bridge-nat's table that mentions `word` (an address or a port) as a word.
fn elements_mentioning(node: &Node, word: &str) -> Vec<String> {
    node.nft_all_elements()
        .into_iter()
        .flat_map(|(set, elements)| elements.into_iter().map(move |e| format!("{set}: {e}")))
        .filter(|e| common::contains_word(e, word))
        .collect()
}

// ---------------------------------------------------------------- tests

/// The harness's nft normalisation (used by every snapshot): `# handle` comments go, elements
/// are listed one per line in sorted order whatever order nft printed them in, and the set
/// parser finds each set's and map's elements (none for an empty one).
#[test]
fn nft_listings_are_normalised_and_parsed() {
    let listing = "table inet bridge-nat { # handle 7\n\
        \tmap dnat4-any { # handle 2\n\
        \t\ttype inet_proto . inet_service : ipv4_addr . inet_service\n\
        \t\telements = { udp . 53 : 10.20.0.5 . 53,\n\
        \t\t\t     tcp . 8080 : 10.20.0.5 . 80 }\n\
        \t}\n\
        \tset own4 {\n\
        \t\ttype ipv4_addr . ifname\n\
        \t}\n\
        \tset bridges {\n\
        \t\ttype ifname\n\
        \t\telements = { \"dind-br0\" }\n\
        \t}\n\
        \tchain nat-pre { # handle 9\n\
        \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
        \t\tfib daddr type local jump to-pod # handle 10\n\
        \t}\n\
        }\n";
    let reordered = listing.replace(
        "{ udp . 53 : 10.20.0.5 . 53,\n\t\t\t     tcp . 8080 : 10.20.0.5 . 80 }",
        "{ tcp . 8080 : 10.20.0.5 . 80, udp . 53 : 10.20.0.5 . 53 }",
    );
    assert_ne!(listing, reordered);
    let norm = normalise_nft(listing);
    assert_eq!(norm, normalise_nft(&reordered), "element order must not matter");
    assert!(!norm.contains("handle"), "handles must go:\n{norm}");
    assert!(norm.contains("\t\tfib daddr type local jump to-pod\n"), "rules must stay:\n{norm}");
    let sets = nft_sets(&norm);
    assert_eq!(sets["dnat4-any"], ["tcp . 8080 : 10.20.0.5 . 80", "udp . 53 : 10.20.0.5 . 53"]);
    assert_eq!(sets["own4"], Vec::<String>::new());
    assert_eq!(sets["bridges"], ["\"dind-br0\""]);
    assert_eq!(sets.len(), 3, "chains are not sets: {sets:?}");
}

/// (a) Under the nftables backend nothing lands in iptables: a pod with every feature (static
///     and runtime forwards, a hostIP, IPv4 and IPv6, masquerade, policy routing with marks)
///     works, the node's only nftables table is `inet bridge-nat`, iptables-save of every
///     flavour holds no chain or rule, and after DEL no table at all remains.
#[test]
fn no_iptables_rule_is_ever_created() {
    if !require_root() {
        return;
    }
    let site = Site::new();
    let node = &site.node;
    assert_eq!(nft_tables(node), Vec::<String>::new(), "the node starts without any nftables table");
    let before = node.snapshot();
    let conf = site.conflist(entry(
        node,
        json!({
            "routing": {
                "enabled": true, "tableId": 100, "tableName": "nft_out", "fwmark": "0x64",
                "outbound": { "interface": "up0" }
            },
            "portForwarding": { "rules": [{
                "name": "web", "hostPort": 30080, "destPort": 8080, "protocol": "tcp",
                "routing": { "fwmark": "0x65", "tableId": 101, "tableName": "nft_web", "outbound": { "interface": "up0" } }
            }]}
        }),
    ));
    let pm = mappings(&[(30081, 8080, "tcp", Some(UPLINK)), (30053, 53, "udp", None)]);
    let pod = Pod::added(node, &conf, "a", &pm);
    let _server = pod.serve(8080, "pod-a");
    expect_reply(node, &site.client, UPLINK, 30080, "pod-a");
    expect_reply(node, &site.client, &format!("[{UPLINK6}]"), 30080, "pod-a");
    expect_reply(node, &site.client, UPLINK, 30081, "pod-a");
    pod.cni(node, "check", &conf, &[]).assert_ok("CHECK");

    assert_eq!(nft_tables(node), [format!("table inet {NFT_TABLE}")], "the plugin's table must be the only one");
    let iptables = iptables_lines(node);
    assert!(iptables.is_empty(), "iptables chains or rules under the nftables backend:\n{}", iptables.join("\n"));
    let all = node.nft_all_elements();
    let (ip4, ip6) = (pod.ip(false), pod.ip(true));
    for (set, want) in [
        ("dnat4-any", format!("tcp . 30080 : {ip4} . 8080")),
        ("dnat4-any", format!("udp . 30053 : {ip4} . 53")),
        ("dnat4-addr", format!("{UPLINK} . tcp . 30081 : {ip4} . 8080")),
        ("dnat6-any", format!("tcp . 30080 : {ip6} . 8080")),
        ("masq4", format!("10.20.0.0/24 . \"{}\"", common::BRIDGE)),
        ("mark4-any", "tcp . 30080 : jump mark-0x65-0x1fff".to_string()),
    ] {
        let elements = all.get(set).cloned().unwrap_or_default();
        assert!(elements.contains(&want), "{set} lacks {want:?}: {elements:?}\n{}", diagnostics(node));
    }

    pod.cni(node, "del", &conf, &[]).assert_ok("DEL");
    assert_eq!(nft_tables(node), Vec::<String>::new(), "tables left after the last DEL");
    assert!(iptables_lines(node).is_empty(), "iptables after DEL:\n{}", iptables_lines(node).join("\n"));
    let after = node.snapshot();
    assert!(after == before, "node differs after DEL\n--- before\n{before}\n--- after\n{after}");
}

/// (b) The table exists exactly while an attachment does: absent before the first ADD,
///     present with both pods' elements, still present after the first pod's DEL with only the
///     other's (its forward still carrying traffic, CHECK passing), gone after the last DEL.
#[test]
fn the_table_lives_exactly_as_long_as_an_attachment() {
    if !require_root() {
        return;
    }
    let site = Site::new();
    let node = &site.node;
    let before = node.snapshot();
    assert!(!node.nft_table_exists(), "table before any ADD");
    let conf = site.conflist(entry(node, json!({})));
    let pm_a = mappings(&[(30080, 8080, "tcp", None)]);
    let pm_b = mappings(&[(30081, 8080, "tcp", None), (30054, 53, "udp", Some(UPLINK))]);
    let a = Pod::added(node, &conf, "a", &pm_a);
    assert!(node.nft_table_exists(), "no table after the first ADD\n{}", diagnostics(node));
    let b = Pod::added(node, &conf, "b", &pm_b);
    let (a4, b4, a6, b6) = (a.ip(false), b.ip(false), a.ip(true), b.ip(true));
    let both = node.nft_all_elements();
    assert_eq!(
        both.get("dnat4-any").cloned().unwrap_or_default(),
        [format!("tcp . 30080 : {a4} . 8080"), format!("tcp . 30081 : {b4} . 8080")],
        "dnat4-any with both pods"
    );
    assert_eq!(
        both.get("dnat4-addr").cloned().unwrap_or_default(),
        [format!("{UPLINK} . udp . 30054 : {b4} . 53")],
        "dnat4-addr with both pods"
    );

    a.cni(node, "del", &conf, &["--port-mappings", &pm_a]).assert_ok("DEL a");
    assert!(node.nft_table_exists(), "the table went with the first DEL while b lives\n{}", diagnostics(node));
    for gone in [a4.as_str(), a6.as_str(), "30080"] {
        let left = elements_mentioning(node, gone);
        assert!(left.is_empty(), "elements of a ({gone}) after its DEL: {left:?}");
    }
    let now = node.nft_all_elements();
    let get = |set: &str| now.get(set).cloned().unwrap_or_default();
    assert_eq!(get("dnat4-any"), [format!("tcp . 30081 : {b4} . 8080")], "dnat4-any after DEL a");
    assert_eq!(get("dnat6-any"), [format!("tcp . 30081 : {b6} . 8080")], "dnat6-any after DEL a");
    assert_eq!(get("dnat4-addr"), [format!("{UPLINK} . udp . 30054 : {b4} . 53")], "dnat4-addr after DEL a");
    // What b shares with any pod of the network stays.
    assert_eq!(get("bridges"), [format!("\"{}\"", common::BRIDGE)], "bridges after DEL a");
    assert_eq!(get("masq4"), [format!("10.20.0.0/24 . \"{}\"", common::BRIDGE)], "masq4 after DEL a");
    b.cni(node, "check", &conf, &[]).assert_ok("CHECK b after DEL a");
    let _server = b.serve(8080, "pod-b");
    expect_reply(node, &site.client, UPLINK, 30081, "pod-b");
    let (ok, text) = request(&site.client, UPLINK, 30080);
    assert!(!ok || !text.contains("pod"), "a's port still forwards after its DEL: {text}");

    b.cni(node, "del", &conf, &["--port-mappings", &pm_b]).assert_ok("DEL b");
    assert!(!node.nft_table_exists(), "the table outlived the last DEL\n{}", diagnostics(node));
    let after = node.snapshot();
    assert!(after == before, "node differs after the last DEL\n--- before\n{before}\n--- after\n{after}");
}

/// (c) Traffic the node forwards (client → remote:2376, an address that is not the node's)
///     is not DNAT'd although 2376 is a forwarded host port: the remote answers and sees the
///     client's own address, while the same port on the node's address reaches the pod.
#[test]
fn transit_traffic_to_a_forwarded_port_is_not_dnatted() {
    if !require_root() {
        return;
    }
    let site = Site::new();
    let node = &site.node;
    let remote = Netns::new("bn-remote");
    node.veth_to(&remote, "up1", "eth0", "198.51.100.1/24", &format!("{REMOTE}/24"));
    remote.sh_ok("ip route add default via 198.51.100.1");
    site.client.sh_ok(&format!("ip route add 198.51.100.0/24 via {UPLINK}"));
    node.ns.sh_ok("sysctl -qw net.ipv4.ip_forward=1");
    let _remote_server = remote.spawn("exec socat TCP-LISTEN:2376,reuseaddr,fork SYSTEM:'echo remote $SOCAT_PEERADDR'");

    let conf = site.conflist(entry(
        node,
        json!({ "portForwarding": { "rules": [{ "name": "docker-tls", "hostPort": 2376, "destPort": 2376 }] } }),
    ));
    let pod = Pod::added(node, &conf, "a", "[]");
    let _server = pod.serve(2376, "pod-a");
    let forward = format!("tcp . 2376 : {} . 2376", pod.ip(false));
    assert!(node.nft_elements("dnat4-any").contains(&forward), "no forward {forward:?}\n{}", diagnostics(node));

    // The forward is live...
    expect_reply(node, &site.client, UPLINK, 2376, "pod-a");
    // ...yet the client's connection through the node to the remote host is left alone,
    expect_reply(node, &site.client, REMOTE, 2376, &format!("remote {CLIENT}"));
    // and so are the pod's and the node's own.
    expect_reply(node, &pod.ns, REMOTE, 2376, "remote 198.51.100.1");
    expect_reply(node, &node.ns, REMOTE, 2376, "remote 198.51.100.1");
    let ct = node.ns.sh_ok(&format!("conntrack -L -p tcp --orig-src {CLIENT} --orig-dst {REMOTE} 2>/dev/null"));
    assert!(
        ct.lines().any(|l| l.contains(&format!("src={REMOTE} dst={CLIENT} sport=2376"))),
        "the transit connection's reply must come from the remote itself: {ct}\n{}",
        diagnostics(node)
    );
}

/// (d) 50 attachments (added 8 at a time): each one's forward, accept and nothing else is in
///     the table, CHECK passes for each; after all 50 DELs no table remains and the node is as
///     before.
#[test]
fn fifty_attachments_each_hold_their_elements_and_the_last_del_removes_the_table() {
    if !require_root() {
        return;
    }
    const PODS: usize = 50;
    let site = Site::new();
    let node = &site.node;
    let before = node.snapshot();
    let conf = site.conflist(entry(node, json!({})));
    let mut pods: Vec<(Pod, u16)> = (0..PODS).map(|i| (Pod::new(node, &format!("n{i}")), 32000 + i as u16)).collect();
    let pm = |port: u16| mappings(&[(port, 8080, "tcp", None)]);
    let adds = parallel(&pods, 8, |(pod, port)| pod.cni(node, "add", &conf, &["--port-mappings", &pm(*port)]));
    let failed: Vec<String> = pods
        .iter()
        .zip(&adds)
        .filter(|(_, o)| !o.status_ok)
        .map(|((p, _), o)| format!("ADD {}: {}{}", p.id, o.stdout.trim(), o.stderr.trim()))
        .collect();
    assert!(failed.is_empty(), "{} ADDs failed:\n{}", failed.len(), failed.join("\n"));
    for ((pod, _), out) in pods.iter_mut().zip(adds) {
        pod.result = out.json.expect("ADD prints a JSON result");
    }

    let all = node.nft_all_elements();
    let get = |set: &str| all.get(set).cloned().unwrap_or_default();
    let (dnat4, dnat6) = (get("dnat4-any"), get("dnat6-any"));
    let mut problems = Vec::new();
    for (pod, port) in &pods {
        let (ip4, ip6) = (pod.ip(false), pod.ip(true));
        for (set, elements, want) in [
            ("dnat4-any", &dnat4, format!("tcp . {port} : {ip4} . 8080")),
            ("dnat6-any", &dnat6, format!("tcp . {port} : {ip6} . 8080")),
        ] {
            if !elements.contains(&want) {
                problems.push(format!("{}: {set} lacks {want:?}", pod.id));
            }
        }
    }
    let distinct: BTreeSet<String> = pods.iter().map(|(p, _)| p.ip(false)).collect();
    assert_eq!(distinct.len(), PODS, "host-local handed out duplicate addresses");
    for (set, elements) in [("dnat4-any", &dnat4), ("dnat6-any", &dnat6)] {
        if elements.len() != PODS {
            problems.push(format!("{set} holds {} elements for {PODS} pods", elements.len()));
        }
    }
    assert!(problems.is_empty(), "elements after {PODS} ADDs:\n{}\n{}", problems.join("\n"), diagnostics(node));
    let checks = parallel(&pods, 8, |(pod, _)| pod.cni(node, "check", &conf, &[]));
    let failed: Vec<String> = pods
        .iter()
        .zip(&checks)
        .filter(|(_, o)| !o.status_ok)
        .map(|((p, _), o)| format!("CHECK {}: {}", p.id, o.stdout.trim()))
        .collect();
    assert!(failed.is_empty(), "CHECKs failed:\n{}", failed.join("\n"));
    let _server = pods[PODS - 1].0.serve(8080, "last");
    expect_reply(node, &site.client, UPLINK, pods[PODS - 1].1, "last");

    let dels = parallel(&pods, 8, |(pod, port)| pod.cni(node, "del", &conf, &["--port-mappings", &pm(*port)]));
    let failed: Vec<String> = pods
        .iter()
        .zip(&dels)
        .filter(|(_, o)| !o.status_ok)
        .map(|((p, _), o)| format!("DEL {}: {}", p.id, o.stdout.trim()))
        .collect();
    assert!(failed.is_empty(), "DELs failed:\n{}", failed.join("\n"));
    assert!(!node.nft_table_exists(), "the table outlived the last of {PODS} DELs\n{}", diagnostics(node));
    let after = node.snapshot();
    assert!(after == before, "node differs after {PODS} DELs\n--- before\n{before}\n--- after\n{after}");
}

/// The accepts beside iptables' FORWARD as iptables-save lists them for the harness network: the
/// chain, the jump, the two accepts.
fn accepts_lines() -> Vec<String> {
    let c = "-m comment --comment";
    vec![
        format!(":{NFT_ACCEPT_CHAIN} -"),
        format!("-A FORWARD {c} bridge-nat -j {NFT_ACCEPT_CHAIN}"),
        format!("-A {NFT_ACCEPT_CHAIN} -i {} {c} \"bridge-nat:dind\" -j ACCEPT", common::BRIDGE),
        format!(
            "-A {NFT_ACCEPT_CHAIN} -o {} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT {c} \"bridge-nat:dind\" -j ACCEPT",
            common::BRIDGE
        ),
    ]
}

/// `bridge-nat watch` on the node, its log in the node's log file; stopped on drop.
fn agent(node: &Node) -> Background {
    let bin = env!("CARGO_BIN_EXE_bridge-nat");
    let (state, log) = (node.state_dir(), node.log_file());
    node.ns.spawn(&format!(
        "exec {bin} watch --state-dir {} --log-file {} --interval 3600",
        state.display(),
        log.display()
    ))
}

/// iptables' FORWARD policy becomes DROP after the network's first attachment (Docker installed
/// later): the accepts were not needed then, and a later attachment's ADD adds none (it stays
/// O(1)) but logs why traffic dies; CHECK names each missing accept, for IPv4 only. The node
/// agent installs them, and those for IPv6 once ip6tables' FORWARD drops too, and traffic flows.
/// Back to ACCEPT, they stay while the network has attachments; the last DEL takes them away.
#[test]
fn a_forward_drop_after_the_first_attachment_is_named_by_check_and_repaired_by_the_agent() {
    if !require_root() {
        return;
    }
    let site = Site::new();
    let node = &site.node;
    let conf = site.conflist(entry(node, json!({})));
    let a = Pod::added(node, &conf, "quiet", &mappings(&[(30090, 8080, "tcp", None)]));
    let _server = a.serve(8080, "pod-a");
    expect_reply(node, &site.client, UPLINK, 30090, "pod-a");
    assert!(!node.log().contains("by policy"), "warning without a drop policy:\n{}", node.log());
    assert!(node.nft_accepts("iptables-save").is_empty(), "accepts without a drop policy");

    node.ns.sh_ok("iptables -P FORWARD DROP");
    let b = Pod::added(node, &conf, "loud", &mappings(&[(30091, 8080, "tcp", None)]));
    let warning = "ip filter FORWARD drop(s) by policy and hold(s) no accepts of bridge-nat yet";
    assert!(node.log().contains(warning), "no warning naming ip filter FORWARD:\n{}", node.log());
    assert!(node.nft_accepts("iptables-save").is_empty(), "a later attachment installed the accepts");
    let (ok, reply) = request(&site.client, UPLINK, 30090);
    assert!(!ok || !reply.contains("pod-a"), "forwarded through a FORWARD DROP without accepts: {reply}");

    let check = b.cni(node, "check", &conf, &[]);
    assert_eq!(common::error_code(&check), Some(102), "CHECK must fail: {check:?}");
    let msg = common::error_msg(&check);
    for line in &accepts_lines()[1..] {
        let rule = line.trim_start_matches("-A ").replace('"', "");
        let (chain, spec) = rule.split_once(' ').expect("chain and spec");
        let named = format!("missing firewall rule: ipv4 filter -A {chain} {spec}");
        assert!(msg.contains(&named), "CHECK must name {named:?}: {msg}");
    }
    assert!(!msg.contains("ipv6"), "ip6 FORWARD accepts: nothing is missing there: {msg}");

    // Its first reconcile repairs what is there; a later policy change wakes it.
    let _agent = agent(node);
    let repaired = |cmd: &str| node.nft_accepts(cmd) == accepts_lines();
    let seen = wait_for(|| repaired("iptables-save"), Duration::from_secs(20));
    assert!(seen, "the agent did not add the accepts\n{}", diagnostics(node));
    assert!(node.nft_accepts("ip6tables-save").is_empty(), "IPv6 accepts although ip6 FORWARD accepts");
    expect_reply(node, &site.client, UPLINK, 30090, "pod-a");
    node.ns.sh_ok("ip6tables -P FORWARD DROP");
    let seen = wait_for(|| repaired("ip6tables-save"), Duration::from_secs(20));
    assert!(seen, "the agent did not notice ip6 FORWARD's drop policy\n{}", diagnostics(node));
    assert!(node.log().contains("the node differs from the records"), "no check found it:\n{}", node.log());
    expect_reply(node, &site.client, &format!("[{UPLINK6}]"), 30090, "pod-a");
    for p in [&a, &b] {
        p.cni(node, "check", &conf, &[]).assert_ok("CHECK after the repair");
    }

    node.ns.sh_ok("iptables -P FORWARD ACCEPT && ip6tables -P FORWARD ACCEPT");
    let out = node.ns.exec(&[
        env!("CARGO_BIN_EXE_bridge-nat"),
        "reconcile",
        "--state-dir",
        &node.state_dir().to_string_lossy(),
        "--log-file",
        &node.log_file().to_string_lossy(),
    ]);
    assert!(out.status.success(), "reconcile: {}", String::from_utf8_lossy(&out.stdout));
    for cmd in ["iptables-save", "ip6tables-save"] {
        assert_eq!(node.nft_accepts(cmd), accepts_lines(), "reconcile removed needed accepts ({cmd})");
    }
    for p in [&a, &b] {
        p.cni(node, "del", &conf, &[]).assert_ok("DEL");
    }
    let traces = node.iptables_traces();
    assert!(traces.is_empty(), "left after the last DEL:\n{}", traces.join("\n"));
    assert!(!node.nft_table_exists(), "table after the last DEL");
}

/// The record of `pod`'s attachment names `backend`, and the node holds its forward of `port`
/// only there: an iptables DNAT rule, or a dnat4-any element, never both.
#[track_caller]
fn served_by(node: &Node, pod: &Pod, backend: &str, port: u16) {
    let record = node.record(&pod.id, "eth0").expect("a record");
    assert_eq!(record["backend"], json!(backend), "record: {record}");
    let dport = format!("--dport {port} ");
    let in_iptables = node.iptables_traces().iter().any(|t| t.contains(&dport));
    let element = format!("tcp . {port} : {} . 8080", pod.ip(false));
    let in_nft = node.nft_elements("dnat4-any").contains(&element);
    assert_eq!(
        (in_iptables, in_nft),
        (backend == "iptables", backend == "nftables"),
        "forward of {port} (iptables, nftables) for a {backend} record\n{}",
        diagnostics(node)
    );
}

/// An ADD over a live attachment recorded with the other backend moves it there: the old
/// backend's objects go (by that backend), the new one's come, the record follows, traffic
/// flows; and back. An entry without `"backend"` (auto) counts as nftables here. The last DEL
/// leaves nothing of either.
#[test]
fn an_add_with_another_backend_moves_the_attachment() {
    if !require_root() {
        return;
    }
    let site = Site::new();
    let node = &site.node;
    let web = json!({ "portForwarding": { "rules": [
        { "name": "web", "hostPort": 30095, "destPort": 8080, "protocol": "tcp" }
    ] } });
    let with_backend = |backend: Option<&str>| {
        let mut e = entry(node, web.clone());
        match backend {
            Some(b) => e["backend"] = json!(b),
            None => {
                e.as_object_mut().expect("object").remove("backend");
            }
        }
        e
    };
    let ipt = with_backend(Some("iptables"));
    let conf = site.conflist(ipt.clone());
    let mut a = Pod::new(node, "mover");
    a.add(node, &conf, &[]);
    let _server = a.serve(8080, "pod-a");
    served_by(node, &a, "iptables", 30095);
    expect_reply(node, &site.client, UPLINK, 30095, "pod-a");

    // As a runtime repeats ADD (libcni's bridge would refuse the existing veth).
    let readd = |entry: &Value| {
        let stdin = common::plugin_stdin("1.0.0", entry, Some(&a.result));
        node.plugin("ADD", &a.ns, &a.id, "eth0", &stdin).assert_ok("re-ADD with another backend");
    };
    readd(&with_backend(None));
    served_by(node, &a, "nftables", 30095);
    assert!(
        node.iptables_traces().is_empty(),
        "iptables rules left after the move:\n{}",
        node.iptables_traces().join("\n")
    );
    expect_reply(node, &site.client, UPLINK, 30095, "pod-a");
    a.cni(node, "check", &conf, &[]).assert_ok("CHECK after the move to nftables");

    readd(&ipt);
    served_by(node, &a, "iptables", 30095);
    assert!(!node.nft_table_exists(), "table inet {NFT_TABLE} left after the move back");
    expect_reply(node, &site.client, UPLINK, 30095, "pod-a");
    a.cni(node, "check", &conf, &[]).assert_ok("CHECK after the move back");

    a.cni(node, "del", &conf, &[]).assert_ok("DEL");
    assert!(node.iptables_traces().is_empty() && !node.nft_table_exists(), "left after DEL\n{}", diagnostics(node));
}

/// The netfilter sockets of finished calls are kept by one process in the node's namespace while
/// calls come back to back, and closed when they stop: after a burst of ADD, CHECK and DEL,
/// nothing of the plugin stays behind in the namespace.
#[test]
fn nothing_of_the_plugin_outlives_a_burst_of_calls() {
    if !require_root() {
        return;
    }
    let site = Site::new();
    let node = &site.node;
    let conf = site.conflist(entry(node, json!({})));
    let pods: Vec<Pod> = (0..3)
        .map(|i| Pod::added(node, &conf, &format!("burst{i}"), &mappings(&[(30100 + i, 8080, "tcp", None)])))
        .collect();
    for p in &pods {
        p.cni(node, "check", &conf, &[]).assert_ok("CHECK");
        p.cni(node, "del", &conf, &[]).assert_ok("DEL");
    }
    let left = || {
        let out =
            std::process::Command::new("ip").args(["netns", "pids", node.ns.name()]).output().expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect::<Vec<_>>()
    };
    let gone = wait_for(|| left().is_empty(), Duration::from_secs(10));
    let described: Vec<String> = left()
        .iter()
        .map(|pid| format!("{pid}: {}", std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()))
        .collect();
    assert!(gone, "processes left in the node namespace 10 s after the last call: {described:?}");
    assert!(!node.nft_table_exists(), "table after the last DEL");
}
