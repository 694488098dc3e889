//! The operator's face: `bridge-nat list`, `bridge-nat uninstall`, the help, version and usage
//! answers, and the clear word a person gets for a config mistake (an unknown field, a bridge that
//! does not exist).
//!
//! The node tests attach every pod with a bridge-only network first (the bridge plugin's bridge,
//! veths and addresses stay, as they would on a node), take the "before" snapshot, and only then
//! invoke bridge-nat as the runtime's next plugin: so "as before the first ADD" compares exactly
//! what bridge-nat added.

mod common;

use common::uplinks::{Topology, UP1};
use common::{dir_tree, error_code, error_msg, netns_etc, require_root, Backend, DriverOutput, Netns, Node};
use serde_json::{json, Value};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_bridge-nat");
const VERSION: &str = "1.0.0";

// ---------------------------------------------------------------- the binary, no root

fn bridge_nat(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("CNI_COMMAND").output().expect("run bridge-nat")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_names_every_subcommand_with_one_line() {
    let out = bridge_nat(&["help"]);
    assert!(out.status.success(), "help: {out:?}");
    let help = text(&out.stdout);
    for cmd in ["check", "reconcile", "watch", "list", "uninstall", "help", "version"] {
        let line = help.lines().find(|l| l.split_whitespace().next() == Some(cmd));
        let described = line.is_some_and(|l| l.split_whitespace().count() > 2);
        assert!(described, "help has no line describing {cmd}:\n{help}");
    }
    assert!(help.contains("--yes") && help.contains("--state-dir"), "help lacks the options:\n{help}");
    assert_eq!(text(&bridge_nat(&["--help"]).stdout), help, "--help differs from help");
}

#[test]
fn version_prints_the_version_and_the_cni_versions() {
    for flag in ["--version", "version"] {
        let out = bridge_nat(&[flag]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{flag}: {out:?}");
        assert!(stdout.contains(env!("CARGO_PKG_VERSION")) && stdout.contains("1.1.0"), "{flag}: {stdout}");
    }
}

#[test]
fn an_unknown_subcommand_prints_the_usage_and_exits_2() {
    for args in [&["frobnicate"][..], &["lst"], &["list", "--frobnicate"], &["uninstall", "--state-dir", "rel"]] {
        let out = bridge_nat(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(stderr.contains("usage: bridge-nat") && stderr.contains("uninstall"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed on stdout: {}", text(&out.stdout));
    }
}

#[test]
fn no_arguments_and_no_cni_command_prints_the_about_text_as_before() {
    let out = bridge_nat(&[]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout must stay empty: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("CNI bridge-nat plugin"), "stderr: {}", text(&out.stderr));
}

// ---------------------------------------------------------------- networks and pods

/// One CNI network: a bridge-only conflist (the plugins before bridge-nat) and bridge-nat's entry.
struct Network {
    name: &'static str,
    bridge_only: PathBuf,
    entry: Value,
}

impl Network {
    /// `ranges` as host-local takes them; the entry gets the node's state dir, log and backend.
    fn new(node: &Node, name: &'static str, bridge: &'static str, ranges: Value, entry: Value) -> Network {
        let list = json!({
            "cniVersion": VERSION,
            "name": name,
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
                "ipam": {
                    "type": "host-local", "ranges": ranges, "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": node.ipam_dir().join(name)
                }
            }]
        });
        let mut full = node.bridge_nat_entry();
        for (k, v) in entry.as_object().expect("entry is an object") {
            full[k] = v.clone();
        }
        Network { name, bridge_only: node.write_conflist(&list), entry: full }
    }
}

/// A pod attached by the bridge plugin; bridge-nat is invoked on it separately.
struct Pod {
    ns: Netns,
    id: String,
    ifname: &'static str,
    prev: Value,
    mappings: Value,
}

impl Pod {
    fn attach(node: &Node, net: &Network, id: &str, ifname: &'static str, mappings: Value) -> Pod {
        let ns = node.add_pod("op");
        let out = node.cni("add", &net.bridge_only, &ns, id, ifname, &[]);
        out.assert_ok(&format!("bridge-only ADD of {id}"));
        let prev = out.json.expect("ADD prints a result");
        Pod { ns, id: id.to_string(), ifname, prev, mappings }
    }

    fn stdin(&self, net: &Network) -> Value {
        let mut stdin = net.entry.clone();
        stdin["name"] = json!(net.name);
        stdin["cniVersion"] = json!(VERSION);
        stdin["prevResult"] = self.prev.clone();
        if self.mappings.as_array().is_some_and(|m| !m.is_empty()) {
            stdin["runtimeConfig"] = json!({ "portMappings": self.mappings });
        }
        stdin
    }

    /// bridge-nat itself, as the runtime invokes the next plugin of the list.
    fn bridge_nat(&self, node: &Node, net: &Network, command: &str) -> DriverOutput {
        node.plugin(command, &self.ns, &self.id, self.ifname, &self.stdin(net))
    }
}

fn add(node: &Node, net: &Network, pod: &Pod) {
    pod.bridge_nat(node, net, "ADD").assert_ok(&format!("ADD of {} on {}", pod.id, net.name));
}

/// Runs the CLI in the node namespace with the node's state dir and log.
fn cli(node: &Node, args: &[&str]) -> Output {
    let state = node.state_dir();
    let log = node.log_file();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node.ns.name(), BIN]).args(args);
    cmd.arg("--state-dir").arg(&state).arg("--log-file").arg(&log);
    cmd.env_remove("CNI_COMMAND").output().expect("run bridge-nat")
}

#[track_caller]
fn cli_ok(node: &Node, args: &[&str]) -> String {
    let out = cli(node, args);
    assert!(out.status.success(), "bridge-nat {args:?}: {out:?}\n{}", text(&out.stderr));
    text(&out.stdout)
}

/// A pod id as runtimes make them: 64 hex digits.
const LONG_ID: &str = "3f2a9c1e7b44d0a5e6f7081923a4b5c6d7e8f90112233445566778899aabbccd";

/// Network "dind" (IPv4, policy routing): pods' own traffic leaves by up2 (table 100 "dind_out",
/// no fallback mark), 30081 is routed by up1 (0x66, table 102 "dind_up1"), 30082 is not routed;
/// both go to 10.20.0.10. Network "edge" (IPv4 and IPv6, no routing): 8080 to every pod address.
fn two_networks(node: &Node) -> (Network, Network) {
    let dind = Network::new(
        node,
        "dind",
        "dind-br0",
        json!([[{ "subnet": "10.20.0.0/24", "rangeStart": "10.20.0.10", "rangeEnd": "10.20.0.50" }]]),
        json!({
            "capabilities": { "portMappings": true },
            "routing": {
                "enabled": true, "tableId": 100, "tableName": "dind_out", "rulePriority": 100,
                "outbound": { "interface": "up2" }, "replyVia": "rule"
            },
            "portForwarding": { "rules": [
                { "name": "via-up1", "hostPort": 30081, "destIP": "10.20.0.10", "destPort": 8080, "protocol": "tcp",
                  "routing": { "fwmark": "0x66", "tableId": 102, "tableName": "dind_up1", "outbound": { "interface": "up1" } } },
                { "name": "plain", "hostPort": 30082, "destIP": "10.20.0.10", "destPort": 8080, "protocol": "tcp" }
            ] }
        }),
    );
    let edge = Network::new(
        node,
        "edge",
        "edge-br0",
        json!([
            [{ "subnet": "10.30.0.0/24", "rangeStart": "10.30.0.10", "rangeEnd": "10.30.0.50" }],
            [{ "subnet": "fd00:30::/64", "rangeStart": "fd00:30::10", "rangeEnd": "fd00:30::50" }]
        ]),
        json!({
            "capabilities": { "portMappings": true },
            "portForwarding": { "rules": [{ "name": "web", "hostPort": 8080, "destPort": 80, "protocol": "tcp" }] }
        }),
    );
    (dind, edge)
}

/// The pods of [`two_networks`]: a1 (long id) and a2 on dind, b1 (interface net1) on edge.
fn two_network_pods(node: &Node, dind: &Network, edge: &Network) -> Vec<Pod> {
    let a1 = Pod::attach(node, dind, LONG_ID, "eth0", json!([]));
    let a2 = Pod::attach(
        node,
        dind,
        "ctr-a2",
        "eth0",
        json!([{ "hostPort": 30083, "containerPort": 80, "protocol": "tcp" }]),
    );
    let b1 = Pod::attach(
        node,
        edge,
        "ctr-b1",
        "net1",
        json!([{ "hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": UP1 }]),
    );
    vec![a1, a2, b1]
}

fn nets<'a>(dind: &'a Network, edge: &'a Network) -> [&'a Network; 3] {
    [dind, dind, edge]
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Iptables => "iptables",
        Backend::Nftables => "nftables",
    }
}

// ---------------------------------------------------------------- list

/// Two networks, routed and unrouted forwards, IPv4 and IPv6: the exact table; then a record of an
/// earlier boot and an unreadable one are listed with their status; `--json` matches the records.
fn list_shows_every_attachment_and_where_replies_leave(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    let node = &t.node;
    assert_eq!(
        cli_ok(node, &["list"]).trim(),
        format!("no attachments on this node (state directory {})", node.state_dir().display())
    );
    assert!(!node.state_dir().exists(), "list created the state directory");
    let (dind, edge) = two_networks(node);
    let pods = two_network_pods(node, &dind, &edge);
    for (pod, net) in pods.iter().zip(nets(&dind, &edge)) {
        add(node, net, pod);
    }
    let b = backend_name(backend);
    let expected = format!(
        "\
NETWORK  CONTAINER     IFNAME  STATUS   BACKEND   BRIDGE    ADDRESSES
dind     3f2a9c1e7b44  eth0    applied  {b}  dind-br0  10.20.0.10
  forward  *:30081/tcp → 10.20.0.10:8080  replies: up1 (mark 0x66, table 102)
  forward  *:30082/tcp → 10.20.0.10:8080  replies: up2 (table 100, the pod's default)
  marks    0x66/0x1fff → table 102
  tables   100 dind_out → up2, 102 dind_up1 → up1
dind     ctr-a2        eth0    applied  {b}  dind-br0  10.20.0.11
  forward  *:30083/tcp → 10.20.0.11:80  replies: up2 (table 100, the pod's default)
  tables   100 dind_out → up2
edge     ctr-b1        net1    applied  {b}  edge-br0  10.30.0.10 fd00:30::10
  forward  *:8080/tcp → 10.30.0.10:80             replies: main table
  forward  *:8080/tcp → [fd00:30::10]:80          replies: main table
  forward  198.51.100.1:5353/udp → 10.30.0.10:53  replies: main table
"
    );
    let listed = cli_ok(node, &["list"]);
    assert!(listed == expected, "list:\n{listed}\nexpected:\n{expected}");

    // A record from before a reboot, and one that cannot be read.
    let edge_dir = node.state_dir().join("records/edge");
    let mut old: Value = serde_json::from_slice(&fs::read(edge_dir.join("ctr-b1.net1.json")).unwrap()).unwrap();
    old["bootId"] = json!("00000000-0000-0000-0000-000000000000");
    old["id"]["containerID"] = json!("ctr-old");
    fs::write(edge_dir.join("ctr-old.net1.json"), serde_json::to_vec(&old).unwrap()).unwrap();
    let bad = edge_dir.join("ctr-bad.eth0.json");
    fs::write(&bad, b"{\"format\": 1, \"id\": {\"netw").unwrap();
    let listed = cli_ok(node, &["list"]);
    let rows: Vec<Vec<&str>> = listed.lines().map(|l| l.split_whitespace().collect()).collect();
    let row = |cid: &str| rows.iter().find(|r| r.get(1) == Some(&cid)).cloned().unwrap_or_default();
    assert_eq!(row("ctr-bad"), ["edge", "ctr-bad", "eth0", "unreadable", "-", "-", "-"], "{listed}");
    assert_eq!(
        row("ctr-old"),
        ["edge", "ctr-old", "net1", "earlier-boot", b, "edge-br0", "10.30.0.10", "fd00:30::10"],
        "{listed}"
    );
    let error = format!("  error    record {} is corrupt: ", bad.display());
    assert!(listed.lines().any(|l| l.starts_with(&error)), "no error line for the corrupt record:\n{listed}");

    let json: Value = serde_json::from_str(&cli_ok(node, &["list", "--json"])).expect("list --json is JSON");
    assert_eq!(json["stateDir"], json!(node.state_dir()));
    let listed = json["attachments"].as_array().expect("attachments");
    assert_eq!(listed.len(), 5, "{json:#}");
    for a in listed {
        let path = PathBuf::from(a["record"].as_str().expect("record path"));
        if a["status"] == "unreadable" {
            assert_eq!(path, bad);
            assert_eq!(
                (&a["network"], &a["containerID"], &a["ifname"]),
                (&json!("edge"), &json!("ctr-bad"), &json!("eth0"))
            );
            assert!(a["error"].as_str().is_some_and(|e| e.contains("corrupt")), "{a:#}");
            continue;
        }
        let rec: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_matches_record(a, &rec);
    }
    let forward = |network: &str, port: u16| -> Vec<&Value> {
        listed
            .iter()
            .filter(|a| a["network"] == network && a["status"] == "applied")
            .flat_map(|a| a["forwards"].as_array().unwrap())
            .filter(|f| f["hostPort"] == port)
            .collect()
    };
    let reply = |f: &Value| (f["replyVia"].clone(), f["replyUplink"].clone(), f["table"].clone(), f["mark"].clone());
    assert_eq!(reply(forward("dind", 30081)[0]), (json!("mark"), json!("up1"), json!(102), json!(0x66)));
    assert_eq!(reply(forward("dind", 30082)[0]), (json!("pod-default"), json!("up2"), json!(100), Value::Null));
    assert_eq!(reply(forward("dind", 30083)[0]), (json!("pod-default"), json!("up2"), json!(100), Value::Null));
    let web = forward("edge", 8080);
    assert_eq!(web.len(), 2);
    for f in web {
        assert_eq!(reply(f), (json!("main"), Value::Null, Value::Null, Value::Null));
    }
}
common::both_backends!(list_shows_every_attachment_and_where_replies_leave);

/// One attachment of `list --json` against the record it was read from.
#[track_caller]
fn assert_matches_record(a: &Value, rec: &Value) {
    let live =
        rec["bootId"].as_str() == fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().as_deref().map(str::trim);
    let status = if live { rec["status"].clone() } else { json!("earlier-boot") };
    assert_eq!(a["status"], status, "{a:#}");
    assert_eq!(a["network"], rec["id"]["network"]);
    assert_eq!(a["containerID"], rec["id"]["containerID"]);
    assert_eq!(a["ifname"], rec["id"]["ifname"]);
    assert_eq!(a["backend"], rec["backend"]);
    assert_eq!(a["bridge"], rec["bridge"]);
    assert_eq!(a["addresses"], rec["addresses"]);
    let forwards: Vec<Value> = a["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!([f["hostIP"], f["hostPort"], f["protocol"], f["podIP"], f["podPort"], f["mark"]]))
        .collect();
    let recorded: Vec<Value> = rec["forwards"]
        .as_array()
        .expect("the record lists its forwards")
        .iter()
        .map(|f| {
            json!([f["host"]["hostIP"], f["host"]["port"], f["host"]["protocol"], f["podIP"], f["podPort"], f["mark"]])
        })
        .collect();
    assert_eq!(forwards, recorded, "forwards of {a:#}");
    let marks: Vec<Value> =
        a["marks"].as_array().unwrap().iter().map(|m| json!([m["mark"], m["mask"], m["table"]])).collect();
    let recorded: Vec<Value> = rec["ipRules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["fwmark"].is_null())
        .map(|r| json!([r["fwmark"][0], r["fwmark"][1], r["table"]]))
        .collect();
    assert_eq!(marks, recorded, "marks of {a:#}");
    let tables: Vec<Value> =
        a["tables"].as_array().unwrap().iter().map(|t| json!([t["id"], t["name"], t["uplink"]])).collect();
    let mut recorded: Vec<Value> = rec["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!([t["id"], t["name"], t["outbound"]["interface"]]))
        .collect();
    recorded.dedup();
    assert_eq!(tables, recorded, "tables of {a:#}");
}

// ---------------------------------------------------------------- uninstall

/// A two-uplink node whose firewall has every table bridge-nat uses (iptables-nft creates a
/// table on first use and never removes it: that one is the node's, not bridge-nat's).
fn uplink_node(backend: Backend) -> Topology {
    let t = Topology::new(backend);
    t.node.ns.sh_ok("iptables -t mangle -N BN-PRIME && iptables -t mangle -X BN-PRIME");
    t
}

/// Firewall, ip rules, routes, iproute2's table names (the node's own /etc overlay).
fn node_state(node: &Node) -> String {
    let tree: String = dir_tree(&netns_etc(&node.ns)).iter().map(|(p, w)| format!("{} {w}\n", p.display())).collect();
    format!("{}### iproute2 config\n{tree}", node.snapshot())
}

/// The lines only in `a` (-) and only in `b` (+).
fn line_diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out: String = la.iter().filter(|l| !lb.contains(l)).map(|l| format!("- {l}\n")).collect();
    out += &lb.iter().filter(|l| !la.contains(l)).map(|l| format!("+ {l}\n")).collect::<String>();
    out
}

#[track_caller]
fn assert_same(node: &Node, before: &str, what: &str) {
    let now = node_state(node);
    assert!(
        before == now,
        "{what}: the node differs (- before, + now)\n{}\n--- log\n{}",
        line_diff(before, &now),
        node.log()
    );
}

/// After uninstall only the lock is left in the state directory.
#[track_caller]
fn assert_only_the_lock_is_left(node: &Node) {
    let tree: Vec<String> =
        dir_tree(&node.state_dir()).iter().map(|(p, what)| format!("{} {what}", p.display())).collect();
    let lock = format!("{} file 600 ", node.state_dir().join("lock").display());
    assert_eq!(tree.iter().map(|l| l.lines().next().unwrap_or_default()).collect::<Vec<_>>(), [lock.as_str()]);
}

/// Both networks with their pods, policy routing included: `uninstall` without --yes names what
/// it would remove and changes nothing; with --yes the node is as before the first ADD; again it
/// finds nothing; the node still takes an ADD afterwards.
fn uninstall_leaves_the_node_as_before_the_first_add(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = uplink_node(backend);
    let node = &t.node;
    let (dind, edge) = two_networks(node);
    let pods = two_network_pods(node, &dind, &edge);
    let before = node_state(node);
    assert!(!node.state_dir().exists());
    for (pod, net) in pods.iter().zip(nets(&dind, &edge)) {
        add(node, net, pod);
    }
    let installed = node_state(node);
    let state_installed = dir_tree(&node.state_dir());

    let dry = cli_ok(node, &["uninstall"]);
    let firewall = match backend {
        Backend::Iptables => "iptables: ipv4 nat chain BRIDGE-NAT-DNAT",
        Backend::Nftables => "nftables: table inet bridge-nat",
    };
    for needle in [
        "would remove (nothing is changed without --yes):",
        firewall,
        "ip rule priority 100 fwmark 0x66/0x1fff lookup 102",
        "ip rule priority 110 from 10.20.0.0/24 lookup 100",
        "table 102 dind_up1: ",
        "iproute2  table name 100 dind_out",
        "/records (3 file(s))",
        "run `bridge-nat uninstall --yes` to remove it",
    ] {
        assert!(dry.contains(needle), "the dry run does not name {needle:?}:\n{dry}");
    }
    assert_same(node, &installed, "uninstall without --yes");
    assert_eq!(dir_tree(&node.state_dir()), state_installed, "uninstall without --yes changed the state directory");

    let done = cli_ok(node, &["uninstall", "--yes"]);
    assert!(done.starts_with("removed:\n") && done.contains(firewall), "{done}");
    assert_same(node, &before, "after uninstall --yes");
    assert_only_the_lock_is_left(node);
    assert!(cli_ok(node, &["uninstall", "--yes"]).starts_with("nothing of bridge-nat on this node\n"));
    assert!(cli_ok(node, &["list"]).starts_with("no attachments on this node"));

    // The node takes pods again, and gives them back.
    let a2 = &pods[1];
    add(node, &dind, a2);
    assert!(cli_ok(node, &["list"]).contains("ctr-a2"));
    a2.bridge_nat(node, &dind, "DEL").assert_ok("DEL after uninstall");
    assert_same(node, &before, "ADD and DEL after uninstall");
}
common::both_backends!(uninstall_leaves_the_node_as_before_the_first_add);

/// A routed network whose only pod's record is corrupt and whose index is gone: its unnamed table
/// is known only from the kernel (an ip rule with the plugin's mark mask), yet uninstall leaves
/// nothing of it, nor of the healthy network beside it.
fn uninstall_cleans_up_after_a_corrupt_record(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = uplink_node(backend);
    let node = &t.node;
    let (dind, _) = two_networks(node);
    let solo = Network::new(
        node,
        "solo",
        "solo-br0",
        json!([[{ "subnet": "10.40.0.0/24", "rangeStart": "10.40.0.10", "rangeEnd": "10.40.0.50" }]]),
        json!({ "portForwarding": { "rules": [
            { "name": "solo", "hostPort": 30090, "destPort": 8080, "protocol": "tcp",
              "routing": { "fwmark": "0x67", "tableId": 103, "outbound": { "interface": "up1" } } }
        ] } }),
    );
    let a1 = Pod::attach(node, &dind, LONG_ID, "eth0", json!([]));
    let c1 = Pod::attach(node, &solo, "ctr-c1", "eth0", json!([]));
    let before = node_state(node);
    add(node, &dind, &a1);
    add(node, &solo, &c1);
    let table_103 = node.ns.sh_ok("ip route show table 103");
    assert!(!table_103.is_empty(), "solo's table 103 is empty: the test would prove nothing");
    fs::write(node.state_dir().join("records/solo/ctr-c1.eth0.json"), b"{\"format\": 1, \"id\": {\"netw").unwrap();
    fs::remove_dir_all(node.state_dir().join("index")).unwrap();

    let dry = cli_ok(node, &["uninstall"]);
    for needle in ["ip rule priority 100 fwmark 0x67/0x1fff lookup 103", "table 103: "] {
        assert!(dry.contains(needle), "the dry run does not name {needle:?}:\n{dry}");
    }
    cli_ok(node, &["uninstall", "--yes"]);
    assert_same(node, &before, "uninstall beside a corrupt record");
    assert_only_the_lock_is_left(node);
}
common::both_backends!(uninstall_cleans_up_after_a_corrupt_record);

// ---------------------------------------------------------------- config mistakes

/// A typo in bridge-nat's entry does not fail the call; the log names the field and the known
/// name nearest to it.
#[test]
fn an_unknown_field_is_named_in_the_log_with_the_nearest_known_name() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    node.prime_firewall();
    let (_, mut net) = two_networks(&node);
    net.entry["portForwardin"] = json!({ "rules": [] });
    net.entry["portForwarding"]["rules"][0]["protocl"] = json!("tcp");
    let pod = Pod::attach(&node, &net, "ctr-typo", "eth0", json!([]));
    add(&node, &net, &pod);
    let log = node.log();
    for want in [
        "unknown field portForwardin in the bridge-nat config is ignored; did you mean portForwarding?",
        "unknown field portForwarding.rules[0].protocl in the bridge-nat config is ignored; did you mean protocol?",
    ] {
        assert!(log.lines().any(|l| l.contains(" WARN ") && l.contains(want)), "log lacks {want:?}:\n{log}");
    }
    assert!(!log.contains("unknown field capabilities"), "a CNI standard key was called unknown:\n{log}");
    pod.bridge_nat(&node, &net, "DEL").assert_ok("DEL");
}

/// A bridge that does not exist is named as such, with code 7, before anything is changed (the
/// sysctls included: ip_forward stays 0).
#[test]
fn a_missing_bridge_is_named_before_anything_changes() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    node.prime_firewall();
    node.ns.sh_ok("sysctl -qw net.ipv4.ip_forward=0");
    let before = node_state(&node);
    let pod = node.add_pod("nobr");
    let prev = json!({
        "cniVersion": VERSION,
        "interfaces": [{ "name": "dind-br0" }, { "name": "eth0", "sandbox": pod.path() }],
        "ips": [{ "address": "10.20.0.10/24", "gateway": "10.20.0.1", "interface": 1 }]
    });
    let mut entry = node.bridge_nat_entry();
    entry["portForwarding"] = json!({ "rules": [{ "name": "web", "hostPort": 30080, "destPort": 8080 }] });
    let stdin = common::plugin_stdin(VERSION, &entry, Some(&prev));
    let out = node.plugin("ADD", &pod, "ctr-nobr", "eth0", &stdin);
    assert_eq!(error_code(&out), Some(7), "{out:?}");
    assert_eq!(error_msg(&out), "bridge dind-br0 does not exist (named by prevResult)");
    entry["bridge"] = json!("br-typo0");
    let out = node.plugin("ADD", &pod, "ctr-nobr", "eth0", &common::plugin_stdin(VERSION, &entry, Some(&prev)));
    assert_eq!(error_code(&out), Some(7), "{out:?}");
    assert_eq!(error_msg(&out), "bridge br-typo0 does not exist (named by the config's \"bridge\")");
    assert_eq!(node.ns.sh_ok("sysctl -n net.ipv4.ip_forward").trim(), "0", "ip_forward was changed");
    assert_same(&node, &before, "ADD onto a missing bridge");
    assert!(!node.state_dir().join("records").exists(), "a record was written");
}
