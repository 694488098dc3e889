//! Reliability: many calls at once, calls killed halfway, records that are corrupt or planted,
//! a firewall or ip rules changed behind the plugin's back, refused input, and the state
//! directory's permissions. Every node is left as it was found, or the difference is named.
//!
//! What the firewall backend could change runs under both (`NAME::iptables`,
//! `NAME::nftables`); where a test reads or damages the firewall, the nftables variant does
//! the same to the table `inet bridge-nat` (its elements, chains, the table itself).
//!
//! Topology (every address lives in a namespace the test creates):
//!
//! ```text
//!   outside 198.51.100.254 ──veth── 198.51.100.1 [up1] node [dind-br0 10.20.0.1] ── pods 10.20.0.x
//!   (client, and the node's default gateway)
//! ```

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    both_backends, contains_word, dir_tree, error_code, error_msg, nft_chain_rules, nft_missing_element, parallel,
    plugin_stdin, require_root, wait_for, Backend, Background, DriverOutput, Netns, Node, NETWORK_NAME, NFT_TABLE,
};
use serde_json::{json, Value};

/// Version of the conflists that need GC (the driver emulates 1.1.0 for bridge-nat).
const V110: &str = "1.1.0";
const IFNAME: &str = "eth0";
const UPLINK: &str = "198.51.100.1";
/// The outside client, which is also the node's default gateway.
const OUTSIDE: &str = "198.51.100.254";
/// How long a reply that should arrive may take (servers start in the background).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Host ports of [`routed_entry`]: 30080 to 10.20.0.10 (mark 0x65, table 101), 30081 to
/// 10.20.0.11 (mark 0x66, table 102).
const PORT_FIRST: u16 = 30080;
const PORT_SECOND: u16 = 30081;

// ---------------------------------------------------------------- topology

/// A node with an uplink to the outside namespace (its default gateway), primed so that a
/// snapshot taken now compares equal after the last DEL: nat/filter/mangle tables exist, the
/// bridge exists (the bridge plugin never deletes it), rp_filter is off.
struct Site {
    node: Node,
    outside: Netns,
}

impl Site {
    fn new(backend: Backend) -> Site {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        node.ns.sh_ok(
            "iptables -t mangle -N BN-PRIME && iptables -t mangle -X BN-PRIME && \
             ip6tables -t mangle -N BN-PRIME && ip6tables -t mangle -X BN-PRIME",
        );
        node.ns.sh_ok("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0");
        let outside = Netns::new("bn-out");
        node.veth_to(&outside, "up1", "eth0", &format!("{UPLINK}/24"), &format!("{OUTSIDE}/24"));
        node.ns.sh_ok(&format!("ip route add default via {OUTSIDE} dev up1"));
        warm_up_bridge(&node);
        Site { node, outside }
    }

    /// The harness conflist with host-local's range widened to 10.20.0.10-250 (the storm needs
    /// more than the default 41 addresses).
    fn conflist(&self, version: &str, entry: Value) -> PathBuf {
        let mut list = self.node.conflist(version, entry);
        list["plugins"][0]["ipam"]["ranges"][0][0]["rangeEnd"] = json!("10.20.0.250");
        self.node.write_conflist(&list)
    }
}

/// Let the bridge plugin create the bridge with a bridge-only network (own IPAM store), so only
/// bridge-nat's traces differ between snapshots.
fn warm_up_bridge(node: &Node) {
    let mut bridge_only = common::conflist("1.0.0", &node.dir().join("ipam-warmup"), json!({}));
    bridge_only["plugins"].as_array_mut().expect("plugins").truncate(1);
    let bridge_only = node.write_conflist(&bridge_only);
    let warm = Pod::new(node, "warmup", "warmup");
    warm.cni(node, "add", &bridge_only, &[]).assert_ok("ADD warmup");
    warm.cni(node, "del", &bridge_only, &[]).assert_ok("DEL warmup");
}

// ---------------------------------------------------------------- pods

/// A pod namespace and, once added, the ADD result the runtime got.
struct Pod {
    ns: Netns,
    id: String,
    result: Value,
}

impl Pod {
    fn new(node: &Node, name: &str, id: &str) -> Pod {
        Pod { ns: node.add_pod(name), id: id.to_string(), result: Value::Null }
    }

    /// A new pod added through the driver; panics unless ADD succeeds and used the node's backend.
    fn added(node: &Node, conf: &Path, name: &str, extra: &[&str]) -> Pod {
        let mut pod = Pod::new(node, name, &format!("ctr-{name}"));
        pod.add(node, conf, extra);
        node.assert_backend_in_use();
        pod
    }

    fn add(&mut self, node: &Node, conf: &Path, extra: &[&str]) {
        let out = self.cni(node, "add", conf, extra);
        out.assert_ok(&format!("ADD {}", self.id));
        self.result = out.json.expect("ADD prints a JSON result");
    }

    fn cni(&self, node: &Node, cmd: &str, conf: &Path, extra: &[&str]) -> DriverOutput {
        node.cni(cmd, conf, &self.ns, &self.id, IFNAME, extra)
    }

    /// CHECK through the driver must pass.
    #[track_caller]
    fn check_ok(&self, node: &Node, conf: &Path, when: &str) {
        let out = self.cni(node, "check", conf, &[]);
        assert!(out.status_ok, "CHECK {} {when} failed: {}{}\n{}", self.id, out.stdout, out.stderr, diagnostics(node));
    }

    /// The bridge-nat binary itself, as a runtime repeating a call would invoke it.
    fn direct(&self, node: &Node, command: &str, stdin: &Value) -> DriverOutput {
        node.plugin(command, &self.ns, &self.id, IFNAME, stdin)
    }

    fn env(&self, command: &str) -> Env {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), self.id.clone()),
            ("CNI_NETNS".into(), self.ns.path().to_string_lossy().into_owned()),
            ("CNI_IFNAME".into(), IFNAME.into()),
        ]
    }

    fn ipv4(&self) -> String {
        common::result_ip(&self.result, false)
    }

    /// The comment every rule of this attachment carries, as iptables-save prints it.
    fn tag(&self) -> String {
        format!("--comment \"bridge-nat:{NETWORK_NAME}:{}:{IFNAME}\"", self.id)
    }

    /// A TCP server on 8080 answering `reply`.
    fn serve(&self, reply: &str) -> Background {
        self.ns.spawn(&format!("exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo {reply}'"))
    }
}

// ---------------------------------------------------------------- config

/// The node's bridge-nat entry accepting runtime portMappings.
fn mapping_entry(node: &Node) -> Value {
    let mut e = node.bridge_nat_entry();
    e["capabilities"] = json!({ "portMappings": true });
    e
}

fn port_mapping(host_port: u16) -> String {
    json!([{ "hostPort": host_port, "containerPort": 8080, "protocol": "tcp" }]).to_string()
}

fn routed_rule(name: &str, host_port: u16, dest_ip: &str, mark: &str, table: u32, table_name: &str) -> Value {
    json!({
        "name": name, "hostPort": host_port, "destIP": dest_ip, "destPort": 8080, "protocol": "tcp",
        "routing": { "fwmark": mark, "tableId": table, "tableName": table_name, "outbound": { "interface": "up1" } }
    })
}

/// Policy routing on up1 (global table 100 "rel_out", fallback mark 0x64) and two routed
/// forwards picked by destIP: the first pod (10.20.0.10) gets 30080 (0x65, table 101 "rel_first"),
/// the second (10.20.0.11) 30081 (0x66, table 102 "rel_second").
fn routed_entry(node: &Node) -> Value {
    let mut e = node.bridge_nat_entry();
    e["routing"] = json!({
        "enabled": true, "tableId": 100, "tableName": "rel_out", "fwmark": "0x64", "rulePriority": 100,
        "outbound": { "interface": "up1" }
    });
    e["portForwarding"] = json!({ "rules": [
        routed_rule("first", PORT_FIRST, "10.20.0.10", "0x65", 101, "rel_first"),
        routed_rule("second", PORT_SECOND, "10.20.0.11", "0x66", 102, "rel_second"),
    ]});
    e
}

// ---------------------------------------------------------------- node state

/// A [`dir_tree`] as lines, for readable diffs.
fn render(tree: &BTreeMap<PathBuf, String>) -> String {
    tree.iter().map(|(p, w)| format!("{} {w}\n", p.display())).collect()
}

/// [`Node::snapshot`] plus the node's iproute2 config (table names) and the records.
fn node_state(node: &Node) -> String {
    format!(
        "{}### iproute2 config\n{}### records\n{}",
        node.snapshot(),
        render(&dir_tree(&common::netns_etc(&node.ns))),
        render(&dir_tree(&node.state_dir().join("records")))
    )
}

/// The lines only in `a` (-) and only in `b` (+), counting repeats.
fn line_diff(a: &str, b: &str) -> String {
    let count = |s: &str| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for l in s.lines() {
            *m.entry(l.to_string()).or_default() += 1;
        }
        m
    };
    let (ca, cb) = (count(a), count(b));
    let mut out = String::new();
    for (l, &n) in &ca {
        for _ in cb.get(l).copied().unwrap_or(0)..n {
            out += &format!("- {l}\n");
        }
    }
    for (l, &n) in &cb {
        for _ in ca.get(l).copied().unwrap_or(0)..n {
            out += &format!("+ {l}\n");
        }
    }
    if out.is_empty() {
        out = "(the same lines in another order)\n".into();
    }
    out
}

fn log_tail(node: &Node, lines: usize) -> String {
    let log = node.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[track_caller]
fn assert_same_state(node: &Node, expected: &str, actual: &str, what: &str) {
    assert!(
        expected == actual,
        "{what}: node differs (- expected, + actual)\n{}\n--- plugin log (tail)\n{}",
        line_diff(expected, actual),
        log_tail(node, 40)
    );
}

/// Everything useful when something is not where it should be.
fn diagnostics(node: &Node) -> String {
    let script = ["iptables-save", "nft list ruleset", "ip -N rule", "ip -4 route show table all", "conntrack -L 2>&1"]
        .map(|cmd| format!("echo '--- {cmd}'; {cmd}"))
        .join("; ");
    let out = node.ns.sh(&script);
    format!(
        "{}{}\n--- records\n{}--- plugin log (tail)\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        render(&dir_tree(&node.state_dir().join("records"))),
        log_tail(node, 40)
    )
}

/// Rule lines that occur more than once in iptables-save, ip6tables-save, ip rule, or one chain
/// of bridge-nat's nftables table (set elements cannot repeat).
fn duplicated_lines(node: &Node) -> Vec<String> {
    let mut dups = Vec::new();
    for cmd in ["iptables-save", "ip6tables-save", "ip -N rule", "ip -6 rule"] {
        let text = node.ns.sh_ok(cmd);
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for l in text.lines().filter(|l| l.starts_with("-A ") || cmd.contains("rule")) {
            *seen.entry(l).or_default() += 1;
        }
        dups.extend(seen.into_iter().filter(|(_, n)| *n > 1).map(|(l, n)| format!("{cmd}: {n}x {l}")));
    }
    let table = node.nft_table().unwrap_or_default();
    let mut seen: BTreeMap<(String, &str), usize> = BTreeMap::new();
    let mut chain: Option<String> = None;
    for line in table.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ").and_then(|l| l.strip_suffix(" {")) {
            chain = Some(name.to_string());
        } else if line == "}" {
            chain = None;
        } else if let Some(c) = &chain {
            if !line.is_empty() && !line.starts_with("type ") {
                *seen.entry((c.clone(), line)).or_default() += 1;
            }
        }
    }
    dups.extend(seen.into_iter().filter(|(_, n)| *n > 1).map(|((c, l), n)| format!("nft chain {c}: {n}x {l}")));
    dups
}

/// The IPv4 forwards of host `port` the firewall holds: iptables DNAT rules, or dnat4-any and
/// dnat4-addr elements.
fn forwards_of(node: &Node, port: u16) -> Vec<String> {
    match node.backend() {
        Backend::Iptables => {
            let needle = format!("--dport {port} ");
            rule_lines(node, "nat")
                .into_iter()
                .filter(|l| l.starts_with("-A BRIDGE-NAT-DNAT ") && l.contains(&needle))
                .collect()
        }
        Backend::Nftables => {
            let key = format!("tcp . {port} : ");
            ["dnat4-any", "dnat4-addr"]
                .iter()
                .flat_map(|set| node.nft_elements(set))
                .filter(|e| e.starts_with(&key) || e.contains(&format!(" . {key}")))
                .collect()
        }
    }
}

/// Whether the firewall holds anything of `pod` (forwarded by host `port`): iptables rules
/// with its comment or that port, or nftables elements with its port or its address.
fn has_traces_of(node: &Node, pod: &Pod, port: u16) -> bool {
    match node.backend() {
        Backend::Iptables => {
            let save = node.ns.sh_ok("iptables-save");
            save.contains(&pod.tag()) || save.contains(&format!("--dport {port} "))
        }
        Backend::Nftables => {
            let ip = pod.ipv4();
            node.nft_all_elements()
                .values()
                .flatten()
                .any(|e| contains_word(e, &ip) || contains_word(e, &port.to_string()))
        }
    }
}

fn record_names(node: &Node) -> BTreeSet<String> {
    let dir = node.state_dir().join("records").join(NETWORK_NAME);
    let Ok(entries) = fs::read_dir(dir) else { return BTreeSet::new() };
    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".json")).collect()
}

fn record_path(node: &Node, container_id: &str) -> PathBuf {
    node.state_dir().join("records").join(NETWORK_NAME).join(format!("{container_id}.{IFNAME}.json"))
}

/// `iptables-save -t TABLE` rule lines (`-A ...`).
fn rule_lines(node: &Node, table: &str) -> Vec<String> {
    node.ns
        .sh_ok(&format!("iptables-save -t {table}"))
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(String::from)
        .collect()
}

/// Every IPv4 rule line with its table: ("nat", "-A BRIDGE-NAT-DNAT ...").
fn all_rule_lines(node: &Node) -> BTreeSet<(String, String)> {
    ["nat", "filter", "mangle", "raw"]
        .iter()
        .flat_map(|t| rule_lines(node, t).into_iter().map(move |l| (t.to_string(), l)))
        .collect()
}

/// `ip -N rule` lines (numeric table ids).
fn ip_rules(node: &Node) -> BTreeSet<String> {
    node.ns.sh_ok("ip -N rule").lines().map(|l| l.trim().to_string()).collect()
}

/// An iptables-save line as CHECK names it when missing: "missing firewall rule: ipv4 nat -A ...",
/// the comment unquoted (the plugin's comments hold no spaces).
fn rule_as_plugin_names_it(table: &str, line: &str) -> String {
    format!("missing firewall rule: ipv4 {table} {}", line.replace('"', ""))
}

/// "100:<TAB>from all fwmark 0x65/0x1fff lookup 101" as the plugin names it in CHECK:
/// "ip rule priority 100 fwmark 0x65/0x1fff lookup 101".
fn ip_rule_as_plugin_names_it(line: &str) -> String {
    let (prio, rest) = line.split_once(':').expect("ip rule line has a priority");
    let rest = rest.trim();
    format!("ip rule priority {prio} {}", rest.strip_prefix("from all ").unwrap_or(rest))
}

// ---------------------------------------------------------------- invocation

/// CNI variables for one invocation.
type Env = Vec<(String, String)>;

/// Runs bridge-nat in the node with raw stdin bytes and exactly the given CNI variables (plus
/// CNI_PATH and `extra_env`), keeping the exit status (signals included).
fn exec_raw(node: &Node, env: &[(String, String)], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node.ns.name()])
        .arg(env!("CARGO_BIN_EXE_bridge-nat"))
        .env("CNI_PATH", common::cni_path())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // A plugin that dies before reading all of stdin closes the pipe: not our error.
    let _ = child.stdin.take().expect("piped stdin").write_all(stdin);
    child.wait_with_output().expect("wait for bridge-nat")
}

/// Runs `command` for `pod` with `BRIDGE_NAT_CRASH_AT=point` and asserts the plugin killed
/// itself there: SIGKILL, nothing on stdout, the crash point in its log.
#[track_caller]
fn crash_at(node: &Node, pod: &Pod, command: &str, stdin: &Value, point: &str) {
    let marker = format!("crash point {point}");
    let seen_before = node.log().matches(&marker).count();
    let mut env = pod.env(command);
    env.push(("BRIDGE_NAT_CRASH_AT".into(), point.into()));
    let out = exec_raw(node, &env, &serde_json::to_vec(stdin).expect("serialize stdin"));
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{command} with BRIDGE_NAT_CRASH_AT={point} was not killed: {:?}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "a killed {command} printed {:?}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(node.log().matches(&marker).count(), seen_before + 1, "log lacks {marker:?}:\n{}", log_tail(node, 10));
}

/// The calls among `outs` that failed, described.
fn failures<'a>(what: &str, outs: impl IntoIterator<Item = (&'a str, &'a DriverOutput)>) -> Vec<String> {
    outs.into_iter()
        .filter(|(_, o)| !o.status_ok)
        .map(|(id, o)| format!("{what} {id}: {} {}", o.stdout.trim(), o.stderr.trim()))
        .collect()
}

/// The problems a failed CHECK lists ("... N problem(s): a; b; c").
fn check_problems(out: &DriverOutput) -> Vec<String> {
    let msg = error_msg(out);
    match msg.split_once("problem(s): ") {
        Some((_, list)) => list.split("; ").map(String::from).collect(),
        None => Vec::new(),
    }
}

// ---------------------------------------------------------------- clients

/// Retries a TCP request from `from` to `host:port` until a reply line is `expected`.
fn reply_from(from: &Netns, host: &str, port: u16, expected: &str) -> Result<(), String> {
    let mut last = String::new();
    let got = wait_for(
        || {
            let out = from.sh(&format!("socat -T3 - TCP:{host}:{port},connect-timeout=3 </dev/null"));
            last = format!(
                "{:?} {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.status.success() && String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == expected)
        },
        REPLY_TIMEOUT,
    );
    if got {
        Ok(())
    } else {
        Err(format!("{host}:{port}: expected {expected:?}, last reply {}", last.trim()))
    }
}

#[track_caller]
fn expect_reply(node: &Node, from: &Netns, host: &str, port: u16, expected: &str) {
    if let Err(e) = reply_from(from, host, port, expected) {
        panic!("[{}] {e}\n{}", from.name(), diagnostics(node));
    }
}

// ---------------------------------------------------------------- 1. storm

/// Summary of call durations: "min .. median .. max".
fn spread(mut d: Vec<Duration>) -> String {
    d.sort();
    match (d.first(), d.get(d.len() / 2), d.last()) {
        (Some(a), Some(m), Some(z)) => format!("{a:.2?} .. {m:.2?} .. {z:.2?}"),
        _ => "-".into(),
    }
}

/// Seconds of the day of a log line ("2026-11-21T05:57:55.715Z ...").
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..23)?;
    let mut parts = t.split(':');
    let (h, m, s) = (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?);
    Some(h * 3600.0 + m * 60.0 + s.parse::<f64>().ok()?)
}

/// Time from the first to the last log line containing all of `needles` (the plugin's own share
/// of a storm: its calls are serialised by the node lock).
fn log_span(node: &Node, needles: &[&str]) -> Duration {
    let times: Vec<f64> =
        node.log().lines().filter(|l| needles.iter().all(|n| l.contains(n))).filter_map(log_time).collect();
    match (times.first(), times.last()) {
        (Some(a), Some(z)) if z >= a => Duration::from_secs_f64(z - a),
        _ => Duration::ZERO,
    }
}

/// What is wrong with the firewall for `live` pods (each forwarded from its port to its 8080)
/// and `gone` ones: every live pod needs exactly one forward of its port, to its address, and
/// its accept; no gone pod's port may be forwarded; nothing else is. Under iptables every live
/// pod also has the same number of rules with its comment, `rules_per_pod` (learnt on the
/// first call, at least a DNAT and an accept).
fn storm_firewall_problems(
    node: &Node,
    live: &[(Pod, u16)],
    gone: &[(Pod, u16)],
    rules_per_pod: &mut Option<usize>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match node.backend() {
        Backend::Iptables => {
            let save = node.ns.sh_ok("iptables-save");
            let dnat: Vec<&str> = save.lines().filter(|l| l.starts_with("-A BRIDGE-NAT-DNAT ")).collect();
            for (pod, port) in live {
                let want =
                    format!("--dport {port} -m comment {} -j DNAT --to-destination {}:8080", pod.tag(), pod.ipv4());
                let n = dnat.iter().filter(|l| l.contains(&format!("--dport {port} "))).count();
                if n != 1 || !dnat.iter().any(|l| l.ends_with(&want)) {
                    problems
                        .push(format!("{} (port {port}): {n} DNAT rules, want exactly one ending {want:?}", pod.id));
                }
            }
            let counts: BTreeSet<usize> = live.iter().map(|(p, _)| save.matches(&p.tag()).count()).collect();
            match *rules_per_pod {
                None if counts.len() == 1 && counts.iter().all(|&n| n >= 2) => *rules_per_pod = counts.first().copied(),
                None => {
                    problems.push(format!("rules per pod differ or are too few (a DNAT and an accept): {counts:?}"))
                }
                Some(want) => {
                    for (pod, _) in live {
                        let own = save.matches(&pod.tag()).count();
                        if own != want {
                            problems.push(format!("{}: {own} rules, want {want}", pod.id));
                        }
                    }
                }
            }
            for (pod, port) in gone {
                if save.contains(&pod.tag()) || save.contains(&format!("--dport {port} ")) {
                    problems.push(format!("deleted {} (port {port}) still has rules", pod.id));
                }
            }
            if dnat.len() != live.len() {
                problems.push(format!("{} DNAT rules for {} live pods", dnat.len(), live.len()));
            }
            if !problems.is_empty() {
                problems.push(save);
            }
        }
        Backend::Nftables => {
            let dnat = node.nft_elements("dnat4-any");
            for (pod, port) in live {
                let key = format!("tcp . {port} : ");
                let want = format!("{key}{} . 8080", pod.ipv4());
                let n = dnat.iter().filter(|e| e.starts_with(&key)).count();
                if n != 1 || !dnat.contains(&want) {
                    problems.push(format!("{} (port {port}): {n} dnat4-any elements, want exactly {want:?}", pod.id));
                }
            }
            for (pod, port) in gone {
                if dnat.iter().any(|e| e.starts_with(&format!("tcp . {port} : "))) {
                    problems.push(format!("deleted {} (port {port}) is still forwarded", pod.id));
                }
            }
            if dnat.len() != live.len() {
                problems.push(format!("{} dnat4-any elements for {} live pods", dnat.len(), live.len()));
            }
            if !problems.is_empty() {
                problems.push(format!("dnat4-any {dnat:#?}"));
            }
        }
    }
    problems
}

/// 1. 64 pods added through libcni at once, each with its own host port: every call succeeds
///    within the default lock wait, every forward carries traffic, no rule is duplicated, 64
///    records. 64 parallel DELs take the node back to its snapshot. Then 32 ADDs run
///    interleaved with 32 DELs of other pods: the firewall holds exactly the live pods' rules,
///    CHECK passes for each, and their DELs restore the snapshot again.
fn storm_of_parallel_adds_and_dels_keeps_the_node_consistent(backend: Backend) {
    if !require_root() {
        return;
    }
    const STORM: usize = 64;
    let site = Site::new(backend);
    let node = &site.node;
    let before = node.snapshot();
    let conf = site.conflist("1.0.0", mapping_entry(node));
    let add = |pod: &Pod, port: u16| {
        let t = Instant::now();
        let out = pod.cni(node, "add", &conf, &["--port-mappings", &port_mapping(port)]);
        (out, t.elapsed())
    };
    let del = |pod: &Pod, port: u16| {
        let t = Instant::now();
        let out = pod.cni(node, "del", &conf, &["--port-mappings", &port_mapping(port)]);
        (out, t.elapsed())
    };

    // Phase 1: 64 parallel ADDs.
    let mut pods: Vec<(Pod, u16)> =
        (0..STORM).map(|i| (Pod::new(node, &format!("st{i}"), &format!("storm-{i}")), 31000 + i as u16)).collect();
    let servers: Vec<Background> = pods.iter().map(|(p, _)| p.serve(&format!("pod-{}", p.id))).collect();
    let started = Instant::now();
    let adds = parallel(&pods, STORM, |(pod, port)| add(pod, *port));
    let storm_add = started.elapsed();
    let failed = failures("ADD", pods.iter().zip(&adds).map(|((p, _), (o, _))| (p.id.as_str(), o)));
    assert!(
        failed.is_empty(),
        "{} of {STORM} parallel ADDs failed:\n{}\n{}",
        failed.len(),
        failed.join("\n"),
        diagnostics(node)
    );
    eprintln!(
        "storm: {STORM} parallel ADDs (bridge + host-local + bridge-nat) took {storm_add:.2?} end to end; \
         per call min .. median .. max: {}",
        spread(adds.iter().map(|(_, d)| *d).collect())
    );
    eprintln!(
        "storm: bridge-nat's own ADDs (serialised by the node lock) spanned {:.2?} from first to last",
        log_span(node, &["ADD dind/storm-", "added:"])
    );
    for ((pod, _), (out, _)) in pods.iter_mut().zip(adds) {
        pod.result = out.json.expect("ADD prints a JSON result");
    }
    let ips: BTreeSet<String> = pods.iter().map(|(p, _)| p.ipv4()).collect();
    assert_eq!(ips.len(), STORM, "host-local handed out duplicate addresses");
    assert_eq!(record_names(node).len(), STORM, "records after the storm: {:?}", record_names(node));
    let dups = duplicated_lines(node);
    assert!(dups.is_empty(), "duplicated rules after the storm:\n{}\n{}", dups.join("\n"), diagnostics(node));
    node.assert_backend_in_use();
    // Every pod's own forward, exactly once (iptables: the same number of rules for each).
    let mut rules_per_pod = None;
    let problems = storm_firewall_problems(node, &pods, &[], &mut rules_per_pod);
    assert!(problems.is_empty(), "firewall after the storm:\n{}", problems.join("\n"));

    let started = Instant::now();
    let unreachable: Vec<String> =
        parallel(&pods, 8, |(pod, port)| reply_from(&site.outside, UPLINK, *port, &format!("pod-{}", pod.id)).err())
            .into_iter()
            .flatten()
            .collect();
    assert!(unreachable.is_empty(), "forwards without traffic:\n{}\n{}", unreachable.join("\n"), diagnostics(node));
    eprintln!("storm: {STORM} forwards answered through {UPLINK} in {:.2?}", started.elapsed());

    // Phase 2: 64 parallel DELs.
    let started = Instant::now();
    let dels = parallel(&pods, STORM, |(pod, port)| del(pod, *port));
    eprintln!(
        "storm: {STORM} parallel DELs took {:.2?} end to end; per call {}",
        started.elapsed(),
        spread(dels.iter().map(|(_, d)| *d).collect())
    );
    let failed = failures("DEL", pods.iter().zip(&dels).map(|((p, _), (o, _))| (p.id.as_str(), o)));
    assert!(failed.is_empty(), "parallel DELs failed:\n{}\n{}", failed.join("\n"), diagnostics(node));
    eprintln!(
        "storm: bridge-nat's own DELs spanned {:.2?} from first to last",
        log_span(node, &["DEL dind/storm-", "removed"])
    );
    assert!(record_names(node).is_empty(), "records after the last DEL: {:?}", record_names(node));
    assert_same_state(node, &before, &node.snapshot(), "after 64 parallel DELs");
    drop(servers);
    drop(pods);

    // Phase 3: 32 pods, then 32 new ADDs interleaved with the DELs of those 32.
    let old: Vec<(Pod, u16)> =
        (0..32).map(|i| (Pod::new(node, &format!("old{i}"), &format!("old-{i}")), 32000 + i as u16)).collect();
    let adds = parallel(&old, 32, |(pod, port)| add(pod, *port));
    let failed = failures("ADD", old.iter().zip(&adds).map(|((p, _), (o, _))| (p.id.as_str(), o)));
    assert!(failed.is_empty(), "ADDs of the old pods failed:\n{}", failed.join("\n"));
    let mut new: Vec<(Pod, u16)> =
        (0..32).map(|i| (Pod::new(node, &format!("new{i}"), &format!("new-{i}")), 33000 + i as u16)).collect();
    // Even slots add a new pod, odd slots delete an old one.
    let ops: Vec<(bool, usize)> = (0..32).flat_map(|i| [(true, i), (false, i)]).collect();
    let started = Instant::now();
    let mixed = parallel(
        &ops,
        ops.len(),
        |&(is_add, i)| {
            if is_add {
                add(&new[i].0, new[i].1)
            } else {
                del(&old[i].0, old[i].1)
            }
        },
    );
    eprintln!("storm: 32 ADDs interleaved with 32 DELs took {:.2?}", started.elapsed());
    let failed = failures(
        "mixed",
        ops.iter()
            .zip(&mixed)
            .map(|(&(is_add, i), (o, _))| (if is_add { new[i].0.id.as_str() } else { old[i].0.id.as_str() }, o)),
    );
    assert!(failed.is_empty(), "mixed run failures:\n{}\n{}", failed.join("\n"), diagnostics(node));
    for (&(is_add, i), (out, _)) in ops.iter().zip(mixed) {
        if is_add {
            new[i].0.result = out.json.expect("ADD prints a JSON result");
        }
    }

    // The firewall holds exactly the live attachments' rules.
    let expected_records: BTreeSet<String> = new.iter().map(|(p, _)| format!("{}.{IFNAME}.json", p.id)).collect();
    assert_eq!(record_names(node), expected_records, "records after the mixed run");
    let dups = duplicated_lines(node);
    assert!(dups.is_empty(), "duplicated rules after the mixed run:\n{}\n{}", dups.join("\n"), diagnostics(node));
    let problems = storm_firewall_problems(node, &new, &old, &mut rules_per_pod);
    assert!(problems.is_empty(), "firewall after the mixed run:\n{}", problems.join("\n"));
    let checks = parallel(&new, 8, |(pod, _)| pod.cni(node, "check", &conf, &[]));
    let failed = failures("CHECK", new.iter().zip(&checks).map(|((p, _), o)| (p.id.as_str(), o)));
    assert!(failed.is_empty(), "CHECK of live pods failed:\n{}\n{}", failed.join("\n"), diagnostics(node));

    let dels = parallel(&new, 32, |(pod, port)| del(pod, *port));
    let failed = failures("DEL", new.iter().zip(&dels).map(|((p, _), (o, _))| (p.id.as_str(), o)));
    assert!(failed.is_empty(), "final DELs failed:\n{}", failed.join("\n"));
    assert_same_state(node, &before, &node.snapshot(), "after the mixed run's pods were deleted");
    // The records never disagreed with the kernel: no call had to reconcile, nothing failed.
    let log = node.log();
    let complaints: Vec<&str> = log.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert!(complaints.is_empty(), "warnings or errors during the storm:\n{}", complaints.join("\n"));
}
both_backends!(storm_of_parallel_adds_and_dels_keeps_the_node_consistent);

// ---------------------------------------------------------------- 2./3. killed mid-call

/// A node with routing where Y (10.20.0.10, port 30080) lives and X (10.20.0.11, port 30081)
/// was added through the driver and then removed from bridge-nat alone, so direct calls can
/// ADD and DEL X's bridge-nat part again and again.
struct CrashBench {
    site: Site,
    entry: Value,
    conf: PathBuf,
    y: Pod,
    x: Pod,
    /// The full node state with X's bridge-nat part installed, and without it.
    with_x: String,
    without_x: String,
}

impl CrashBench {
    fn new(backend: Backend) -> CrashBench {
        let site = Site::new(backend);
        let node = &site.node;
        let entry = routed_entry(node);
        let conf = site.conflist(V110, entry.clone());
        let y = Pod::added(node, &conf, "y", &[]);
        let firewall_before_x = node.firewall_snapshot();
        let rules_before_x = ip_rules(node);
        let x = Pod::added(node, &conf, "x", &[]);
        assert_eq!((y.ipv4().as_str(), x.ipv4().as_str()), ("10.20.0.10", "10.20.0.11"));
        x.check_ok(node, &conf, "after ADD");
        let with_x = node_state(node);
        assert!(with_x.contains("fwmark 0x66/0x1fff"), "X's mark rule is missing:\n{with_x}");
        assert_eq!(forwards_of(node, PORT_SECOND).len(), 1, "X's forward is missing:\n{with_x}");
        x.direct(node, "DEL", &plugin_stdin(V110, &entry, Some(&x.result))).assert_ok("direct DEL of X");
        assert_same_state(node, &firewall_before_x, &node.firewall_snapshot(), "direct DEL of X (firewall)");
        assert_eq!(ip_rules(node), rules_before_x, "direct DEL of X left ip rule changes");
        let without_x = node_state(node);
        CrashBench { site, entry, conf, y, x, with_x, without_x }
    }

    fn node(&self) -> &Node {
        &self.site.node
    }

    /// X's stdin for direct calls, with the prevResult the runtime keeps for X.
    fn stdin(&self) -> Value {
        plugin_stdin(V110, &self.entry, Some(&self.x.result))
    }

    #[track_caller]
    fn assert_state(&self, expected: &str, what: &str) {
        assert_same_state(self.node(), expected, &node_state(self.node()), what);
    }

    #[track_caller]
    fn y_intact(&self, when: &str) {
        self.y.check_ok(self.node(), &self.conf, when);
    }
}

/// 2. ADD killed at each crash point, then the runtime either (a) repeats ADD: CHECK passes and
///    the node holds exactly one copy of X's rules, ip rules and routes; or (b) calls DEL: the
///    node is exactly as before X's ADD. Y stays intact throughout.
fn add_killed_midway_is_completed_by_a_retry_or_undone_by_del(backend: Backend) {
    if !require_root() {
        return;
    }
    let b = CrashBench::new(backend);
    let node = b.node();
    for point in ["add:after-intent", "add:after-firewall", "add:after-routing"] {
        // (a) retry
        crash_at(node, &b.x, "ADD", &b.stdin(), point);
        b.y_intact(&format!("after ADD killed at {point}"));
        let retry = b.x.direct(node, "ADD", &b.stdin());
        retry.assert_ok(&format!("ADD retried after {point}"));
        assert_eq!(retry.json.as_ref(), Some(&b.x.result), "retried ADD must print prevResult");
        b.x.check_ok(node, &b.conf, &format!("after the retried ADD ({point})"));
        let dups = duplicated_lines(node);
        assert!(dups.is_empty(), "{point}: duplicates after retry:\n{}", dups.join("\n"));
        b.assert_state(&b.with_x, &format!("ADD killed at {point}, then retried"));
        b.y_intact(&format!("after the retried ADD ({point})"));
        b.x.direct(node, "DEL", &b.stdin()).assert_ok("DEL after the retried ADD");
        b.assert_state(&b.without_x, &format!("DEL after the retried ADD ({point})"));

        // (b) DEL
        crash_at(node, &b.x, "ADD", &b.stdin(), point);
        b.x.direct(node, "DEL", &b.stdin()).assert_ok(&format!("DEL after ADD killed at {point}"));
        b.assert_state(&b.without_x, &format!("ADD killed at {point}, then DEL"));
        b.y_intact(&format!("after DEL of the killed ADD ({point})"));
    }
}
both_backends!(add_killed_midway_is_completed_by_a_retry_or_undone_by_del);

/// 3. DEL killed after routing and after the firewall; then either DEL is repeated or GC runs
///    with only Y valid: the node is exactly as before X's ADD, and Y is intact.
fn del_killed_midway_is_finished_by_a_retry_or_by_gc(backend: Backend) {
    if !require_root() {
        return;
    }
    let b = CrashBench::new(backend);
    let node = b.node();
    for point in ["del:after-routing", "del:after-firewall"] {
        for recovery in ["retried DEL", "GC"] {
            b.x.direct(node, "ADD", &b.stdin()).assert_ok("direct ADD of X");
            b.assert_state(&b.with_x, "direct ADD of X");
            crash_at(node, &b.x, "DEL", &b.stdin(), point);
            b.y_intact(&format!("after DEL killed at {point}"));
            if recovery == "GC" {
                node.cni_gc(&b.conf, &[(&b.y.id, IFNAME)]).assert_ok(&format!("GC after DEL killed at {point}"));
            } else {
                b.x.direct(node, "DEL", &b.stdin()).assert_ok(&format!("DEL retried after {point}"));
            }
            b.assert_state(&b.without_x, &format!("DEL killed at {point}, then {recovery}"));
            b.y_intact(&format!("after {recovery} ({point})"));
        }
    }
}
both_backends!(del_killed_midway_is_finished_by_a_retry_or_by_gc);

// ---------------------------------------------------------------- 4. corrupt record

/// 4. X's record is half-written garbage and a stray temp file lies next to it: another pod's
///    ADD, X's DEL and GC all succeed, GC removes X's rules from the kernel, the log names the
///    unreadable record, and after the last DEL the node is as before.
fn corrupt_record_blocks_nothing_and_gc_clears_its_rules(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let node = &site.node;
    let before = node.snapshot();
    let conf = site.conflist(V110, mapping_entry(node));
    let y = Pod::added(node, &conf, "y", &["--port-mappings", &port_mapping(30080)]);
    let x = Pod::added(node, &conf, "x", &["--port-mappings", &port_mapping(30081)]);
    let record = record_path(node, &x.id);
    assert!(record.is_file(), "no record at {}", record.display());
    fs::write(&record, b"{\"format\": 1, \"id\": {\"network\": \"dind\", \"contai").expect("corrupt X's record");
    let stray = record.with_file_name(format!(".{}.{IFNAME}.json.tmp.123", x.id));
    fs::write(&stray, b"{\"format\": 1, \"st").expect("write stray temp file");

    let z = Pod::added(node, &conf, "z", &["--port-mappings", &port_mapping(30082)]);
    let dups = duplicated_lines(node);
    assert!(dups.is_empty(), "duplicates after ADD beside a corrupt record:\n{}", dups.join("\n"));
    y.check_ok(node, &conf, "after ADD of z");
    z.check_ok(node, &conf, "after ADD of z");
    let _server = z.serve("pod-z");
    expect_reply(node, &site.outside, UPLINK, 30082, "pod-z");

    x.cni(node, "del", &conf, &["--port-mappings", &port_mapping(30081)]).assert_ok("DEL of x (corrupt record)");
    node.cni_gc(&conf, &[(&y.id, IFNAME), (&z.id, IFNAME)]).assert_ok("GC");
    assert!(!has_traces_of(node, &x, 30081), "GC left x's rules (it should read the kernel):\n{}", diagnostics(node));
    assert!(
        has_traces_of(node, &y, 30080) && has_traces_of(node, &z, 30082),
        "GC removed valid rules:\n{}",
        diagnostics(node)
    );
    for (pod, port) in [(&y, 30080), (&z, 30082)] {
        assert_eq!(forwards_of(node, port).len(), 1, "{}'s forward after GC:\n{}", pod.id, diagnostics(node));
    }
    y.check_ok(node, &conf, "after GC");
    z.check_ok(node, &conf, "after GC");
    expect_reply(node, &site.outside, UPLINK, 30082, "pod-z");
    let log = node.log();
    let named = log.lines().any(|l| l.contains("unreadable record") && l.contains(&format!("{}.{IFNAME}.json", x.id)));
    assert!(named, "the log does not name the unreadable record:\n{}", log_tail(node, 30));
    assert!(
        !log.contains(".json.tmp.123"),
        "the stray temp file should be ignored, not reported:\n{}",
        log_tail(node, 30)
    );

    y.cni(node, "del", &conf, &[]).assert_ok("DEL y");
    z.cni(node, "del", &conf, &[]).assert_ok("DEL z");
    assert_same_state(node, &before, &node.snapshot(), "after the last DEL beside a corrupt record");
}
both_backends!(corrupt_record_blocks_nothing_and_gc_clears_its_rules);

/// 4b. The same with policy routing: X has its own mark rule and table. Once its record is
///     unreadable, DEL and GC must still leave no ip rule or table route of X behind (the table
///     ids and marks are the plugin's by configuration, which GC has).
fn corrupt_record_of_a_routed_pod_leaves_no_ip_rule_or_table_after_gc(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let node = &site.node;
    let conf = site.conflist(V110, routed_entry(node));
    let y = Pod::added(node, &conf, "y", &[]);
    let with_y = node.snapshot();
    let x = Pod::added(node, &conf, "x", &[]);
    assert_eq!(x.ipv4(), "10.20.0.11", "x must get the second forward");
    fs::write(record_path(node, &x.id), b"{\"format\": 1, \"id\": {\"netw").expect("corrupt X's record");
    x.cni(node, "del", &conf, &[]).assert_ok("DEL of x (corrupt record)");
    node.cni_gc(&conf, &[(&y.id, IFNAME)]).assert_ok("GC");
    y.check_ok(node, &conf, "after GC");
    assert_same_state(node, &with_y, &node.snapshot(), "GC after x's record became unreadable");
}
both_backends!(corrupt_record_of_a_routed_pod_leaves_no_ip_rule_or_table_after_gc);

// ---------------------------------------------------------------- 5. tampered firewall

/// Deletes, in the node, every rule and own chain of the plugin in `table` (jumps first).
fn delete_own_chains(node: &Node, table: &str) {
    for line in rule_lines(node, table) {
        let rest = line.trim_start_matches("-A ");
        let chain = rest.split_whitespace().next().unwrap_or("");
        if !chain.starts_with("BRIDGE-NAT-") && rest.contains("-j BRIDGE-NAT-") {
            node.ns.sh_ok(&format!("iptables -t {table} -D {rest}"));
        }
    }
    let save = node.ns.sh_ok(&format!("iptables-save -t {table}"));
    let chains: Vec<&str> =
        save.lines().filter_map(|l| l.strip_prefix(':')).filter_map(|l| l.split_whitespace().next()).collect();
    for c in chains.iter().filter(|c| c.starts_with("BRIDGE-NAT-")) {
        node.ns.sh_ok(&format!("iptables -t {table} -F {c}"));
    }
    for c in chains.iter().filter(|c| c.starts_with("BRIDGE-NAT-")) {
        node.ns.sh_ok(&format!("iptables -t {table} -X {c}"));
    }
}

/// CHECK must fail with 102 listing exactly `expected` (each once, nothing else).
#[track_caller]
fn expect_exact_check_problems(node: &Node, pod: &Pod, conf: &Path, expected: &BTreeSet<String>) {
    let out = pod.cni(node, "check", conf, &[]);
    assert_eq!(error_code(&out), Some(102), "CHECK must fail with 102: {out:?}");
    let listed = check_problems(&out);
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    let missing: Vec<&String> = expected.difference(&listed_set).collect();
    let extra: Vec<&String> = listed_set.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && listed.len() == expected.len(),
        "CHECK problems differ from what was removed\nnot reported: {missing:#?}\nreported but present: {extra:#?}\
         \n{} listed for {} removed\nmessage: {}",
        listed.len(),
        expected.len(),
        error_msg(&out)
    );
}

/// 5. Someone flushes the DNAT and FORWARD chains and deletes the ip rules: CHECK lists exactly
///    what is gone; a repeated ADD restores it all. Then the chains are deleted outright (jumps
///    first): CHECK lists every rule, and ADD restores them. Under nftables: the attachment's
///    set and map elements and the ip rules are deleted, then the chains nat-pre and pick-mark
///    flushed, then the whole table deleted; each time CHECK names what is gone and ADD puts
///    the node back exactly.
fn check_names_exactly_what_was_flushed_and_readd_restores_it(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let node = &site.node;
    let entry = routed_entry(node);
    let conf = site.conflist(V110, entry.clone());
    let rules_without = ip_rules(node);
    let a = Pod::added(node, &conf, "a", &[]);
    a.check_ok(node, &conf, "after ADD");
    let intact = node_state(node);
    let own_ip_rules: BTreeSet<String> = ip_rules(node).difference(&rules_without).cloned().collect();
    assert!(own_ip_rules.len() >= 3, "expected the plugin's ip rules, got {own_ip_rules:?}");
    let delete_own_ip_rules = || {
        for rule in &own_ip_rules {
            let (prio, selector) = rule.split_once(':').expect("priority");
            node.ns.sh_ok(&format!("ip rule del pref {prio} {}", selector.trim()));
        }
    };
    let missing_ip_rules: BTreeSet<String> =
        own_ip_rules.iter().map(|r| format!("missing {}", ip_rule_as_plugin_names_it(r))).collect();
    let readd = || a.direct(node, "ADD", &plugin_stdin(V110, &entry, Some(&a.result)));

    match backend {
        Backend::Iptables => {
            let fw_intact = all_rule_lines(node);
            // Flushed chains, deleted ip rules.
            node.ns.sh_ok("iptables -t nat -F BRIDGE-NAT-DNAT && iptables -F BRIDGE-NAT-FORWARD");
            delete_own_ip_rules();
            let gone: BTreeSet<(String, String)> = fw_intact.difference(&all_rule_lines(node)).cloned().collect();
            assert!(
                gone.iter().any(|(t, _)| t == "nat") && gone.iter().any(|(t, _)| t == "filter"),
                "the flush removed nothing? {gone:?}"
            );
            let mut expected: BTreeSet<String> = gone.iter().map(|(t, l)| rule_as_plugin_names_it(t, l)).collect();
            expected.extend(missing_ip_rules.iter().cloned());
            expect_exact_check_problems(node, &a, &conf, &expected);
            readd().assert_ok("ADD after the flush");
            a.check_ok(node, &conf, "after ADD restored the flushed rules");
            assert_same_state(node, &intact, &node_state(node), "ADD after the flush");

            // Chains deleted outright, jumps first.
            for table in ["nat", "filter", "mangle"] {
                delete_own_chains(node, table);
            }
            let left = node.ns.sh_ok("iptables-save");
            assert!(!left.contains("BRIDGE-NAT-"), "chains survived:\n{left}");
            let gone: BTreeSet<(String, String)> = fw_intact.difference(&all_rule_lines(node)).cloned().collect();
            let expected: BTreeSet<String> = gone.iter().map(|(t, l)| rule_as_plugin_names_it(t, l)).collect();
            expect_exact_check_problems(node, &a, &conf, &expected);
            readd().assert_ok("ADD after the chains were deleted");
            a.check_ok(node, &conf, "after ADD re-created the chains");
            assert_same_state(node, &intact, &node_state(node), "ADD after the chains were deleted");
        }
        Backend::Nftables => {
            // The attachment's own elements (forwards, accepts, marks: a is the only pod), and the ip rules.
            let own: Vec<(String, String)> = node
                .nft_all_elements()
                .into_iter()
                .filter(|(set, _)| ["dnat", "mark"].iter().any(|p| set.starts_with(p)))
                .flat_map(|(set, elements)| elements.into_iter().map(move |e| (set.clone(), e)))
                .collect();
            for want in ["dnat4-any", "mark4-any"] {
                assert!(own.iter().any(|(set, _)| set == want), "a has no element in {want}: {own:?}");
            }
            for (set, element) in &own {
                let key = element.split(" : ").next().expect("split yields one part");
                node.ns.sh_ok(&format!("nft delete element inet {NFT_TABLE} {set} '{{ {key} }}'"));
            }
            delete_own_ip_rules();
            let mut expected: BTreeSet<String> = own.iter().map(|(set, e)| nft_missing_element(set, e)).collect();
            expected.extend(missing_ip_rules.iter().cloned());
            expect_exact_check_problems(node, &a, &conf, &expected);
            readd().assert_ok("ADD after the elements were deleted");
            a.check_ok(node, &conf, "after ADD restored the elements");
            assert_same_state(node, &intact, &node_state(node), "ADD after the elements were deleted");

            // Flushed chains: CHECK names each rule that went, in its chain.
            let table = node.nft_table().expect("the table exists");
            let flushed = ["nat-pre", "pick-mark"];
            let rules: Vec<(&str, usize)> = flushed.iter().map(|&c| (c, nft_chain_rules(&table, c).len())).collect();
            assert!(rules.iter().all(|&(_, n)| n > 0), "chains without rules to flush: {rules:?}\n{table}");
            for chain in flushed {
                node.ns.sh_ok(&format!("nft flush chain inet {NFT_TABLE} {chain}"));
            }
            let problems = check_failure(node, &a, &conf, "after flushing nat-pre and pick-mark");
            for &(chain, n) in &rules {
                let suffix = format!(" in chain {chain}");
                let named =
                    problems.iter().filter(|p| p.starts_with("missing nftables rule ") && p.ends_with(&suffix)).count();
                assert_eq!(named, n, "CHECK must name each of the {n} rules flushed from {chain}: {problems:#?}");
            }
            let total: usize = rules.iter().map(|&(_, n)| n).sum();
            assert_eq!(problems.len(), total, "CHECK lists more than the flushed rules: {problems:#?}");
            readd().assert_ok("ADD after the flush");
            a.check_ok(node, &conf, "after ADD restored the flushed chains");
            assert_same_state(node, &intact, &node_state(node), "ADD after the flush");

            // The table deleted outright.
            node.ns.sh_ok(&format!("nft delete table inet {NFT_TABLE}"));
            let expected = BTreeSet::from([format!("nftables table inet {NFT_TABLE} is missing")]);
            expect_exact_check_problems(node, &a, &conf, &expected);
            readd().assert_ok("ADD after the table was deleted");
            a.check_ok(node, &conf, "after ADD re-created the table");
            assert_same_state(node, &intact, &node_state(node), "ADD after the table was deleted");
        }
    }
}
both_backends!(check_names_exactly_what_was_flushed_and_readd_restores_it);

/// CHECK must fail with 102; returns the problems it lists.
#[track_caller]
fn check_failure(node: &Node, pod: &Pod, conf: &Path, when: &str) -> Vec<String> {
    let out = pod.cni(node, "check", conf, &[]);
    assert_eq!(error_code(&out), Some(102), "CHECK {when} must fail with 102: {out:?}\n{}", diagnostics(node));
    let problems = check_problems(&out);
    assert!(!problems.is_empty(), "CHECK {when} lists no problems: {}", error_msg(&out));
    problems
}

// ---------------------------------------------------------------- 6. GC keeps valid ones

/// 6. Two routed pods; GC with only A valid: B's record, rules, mark rule, table and table name
///    are gone, B's port no longer forwards, A's traffic still flows and CHECK A passes.
fn gc_removes_the_forgotten_pod_and_keeps_the_valid_one_working(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let node = &site.node;
    let conf = site.conflist(V110, routed_entry(node));
    let a = Pod::added(node, &conf, "a", &[]);
    let b = Pod::added(node, &conf, "b", &[]);
    assert_eq!((a.ipv4().as_str(), b.ipv4().as_str()), ("10.20.0.10", "10.20.0.11"));
    let _sa = a.serve("pod-a");
    let _sb = b.serve("pod-b");
    expect_reply(node, &site.outside, UPLINK, PORT_FIRST, "pod-a");
    expect_reply(node, &site.outside, UPLINK, PORT_SECOND, "pod-b");

    node.cni_gc(&conf, &[(&a.id, IFNAME)]).assert_ok("GC with only a valid");
    assert_eq!(record_names(node), BTreeSet::from([format!("{}.{IFNAME}.json", a.id)]), "records after GC");
    assert!(!has_traces_of(node, &b, PORT_SECOND), "GC left b's rules:\n{}", diagnostics(node));
    assert!(has_traces_of(node, &a, PORT_FIRST), "GC removed a's rules:\n{}", diagnostics(node));
    let rules = node.ns.sh_ok("ip -N rule");
    assert!(!rules.contains("fwmark 0x66/0x1fff"), "GC left b's mark rule:\n{rules}");
    assert!(rules.contains("fwmark 0x65/0x1fff lookup 101"), "GC removed a's mark rule:\n{rules}");
    let table = node.ns.sh_ok("ip route show table 102");
    assert!(table.trim().is_empty(), "GC left b's table 102:\n{table}");
    let names = fs::read_to_string(common::netns_etc(&node.ns).join("iproute2/rt_tables.d/bridge-nat.conf"))
        .unwrap_or_default();
    assert!(
        !names.contains("rel_second") && names.contains("rel_first") && names.contains("rel_out"),
        "table names after GC:\n{names}"
    );

    a.check_ok(node, &conf, "after GC");
    expect_reply(node, &site.outside, UPLINK, PORT_FIRST, "pod-a");
    let out = site.outside.sh(&format!("socat -T3 - TCP:{UPLINK}:{PORT_SECOND},connect-timeout=3 </dev/null"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("pod-b"),
        "b's port still forwards after GC\n{}",
        diagnostics(node)
    );
}
both_backends!(gc_removes_the_forgotten_pod_and_keeps_the_valid_one_working);

// ---------------------------------------------------------------- 7. bad input

/// 7. Refused input: each bad stdin or environment gets its code and a message naming the
///    problem, and the node (firewall, rules, routes) and the state directory are byte for byte
///    unchanged; the shell metacharacters in a name are never run.
fn bad_input_is_refused_with_the_right_code_and_changes_nothing(backend: Backend) {
    if !require_root() {
        return;
    }
    let pwned = Path::new("/tmp/pwned");
    let _ = fs::remove_file(pwned);
    let node = Node::with_backend(backend);
    node.prime_firewall();
    let mut entry = mapping_entry(&node);
    entry["portForwarding"] = json!({ "rules": [{ "name": "web", "hostPort": 30080, "destPort": 8080 }] });
    let conf = node.write_conflist(&node.conflist("1.0.0", entry.clone()));
    let pod = Pod::added(&node, &conf, "p", &[]);
    let valid = plugin_stdin("1.0.0", &entry, Some(&pod.result));
    let with = |patch: Value| {
        let mut stdin = valid.clone();
        for (k, v) in patch.as_object().expect("patch is an object") {
            stdin[k] = v.clone();
        }
        serde_json::to_vec(&stdin).expect("serialize")
    };
    let before = node.snapshot();
    let state_before = dir_tree(&node.state_dir());

    let routed_twice = json!({ "portForwarding": { "rules": [
        { "name": "a", "hostPort": 30081, "destPort": 80, "routing": { "fwmark": "0x65", "tableId": 101, "outbound": { "interface": "lo" } } },
        { "name": "b", "hostPort": 30082, "destPort": 80, "routing": { "fwmark": "0x65", "tableId": 102, "outbound": { "interface": "lo" } } }
    ]}});
    let no_ips = json!({ "prevResult": { "cniVersion": "1.0.0", "interfaces": [{ "name": "dind-br0" }] } });
    let cases: Vec<(&str, Vec<u8>, i64, &str)> = vec![
        ("malformed JSON", b"{\"cniVersion\": \"1.0.0\", \"name\": ".to_vec(), 6, "EOF"),
        ("not an object", b"[\"1.0.0\", \"dind\"]".to_vec(), 6, "JSON object"),
        (
            "hostPort of the wrong type",
            with(json!({ "portForwarding": { "rules": [{ "hostPort": "x", "destPort": 1 }] } })),
            6,
            "portForwarding.rules[0].hostPort",
        ),
        ("masquerade of the wrong type", with(json!({ "masquerade": "yes" })), 6, "masquerade"),
        ("cniVersion 0.2.0", with(json!({ "cniVersion": "0.2.0" })), 1, "0.2.0"),
        ("cniVersion 2.0.0", with(json!({ "cniVersion": "2.0.0" })), 1, "2.0.0"),
        (
            "hostPort 70000",
            with(json!({ "portForwarding": { "rules": [{ "name": "big", "hostPort": 70000, "destPort": 80 }] } })),
            7,
            "70000",
        ),
        (
            "runtime hostPort 70000",
            with(json!({ "runtimeConfig": { "portMappings": [{ "hostPort": 70000, "containerPort": 80 }] } })),
            7,
            "70000",
        ),
        ("colliding marks", with(routed_twice), 7, "0x65"),
        ("name with shell metacharacters", with(json!({ "name": "a;touch /tmp/pwned" })), 7, "name"),
        ("prevResult without ips", with(no_ips), 7, "prevResult"),
        ("empty prevResult", with(json!({ "prevResult": {} })), 7, "prevResult"),
    ];
    let good_env = pod.env("ADD");
    let without = |key: &str| -> Env { good_env.iter().filter(|(k, _)| k != key).cloned().collect() };
    let replaced = |key: &str, value: &str| -> Env {
        good_env.iter().map(|(k, v)| (k.clone(), if k == key { value.to_string() } else { v.clone() })).collect()
    };
    let env_cases: Vec<(&str, Env, i64, &str)> = vec![
        ("missing CNI_CONTAINERID", without("CNI_CONTAINERID"), 4, "CNI_CONTAINERID"),
        ("CNI_IFNAME of 16 bytes", replaced("CNI_IFNAME", "a-very-long-name"), 4, "CNI_IFNAME"),
        (
            "CNI_CONTAINERID with shell metacharacters",
            replaced("CNI_CONTAINERID", "a;touch /tmp/pwned"),
            4,
            "CNI_CONTAINERID",
        ),
    ];
    let valid_bytes = serde_json::to_vec(&valid).expect("serialize");
    let runs = cases
        .iter()
        .map(|(what, stdin, code, mentions)| (*what, exec_raw(&node, &good_env, stdin), *code, *mentions))
        .chain(
            env_cases
                .iter()
                .map(|(what, env, code, mentions)| (*what, exec_raw(&node, env, &valid_bytes), *code, *mentions)),
        );
    let mut wrong = Vec::new();
    for (what, out, code, mentions) in runs {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json: Option<Value> = serde_json::from_str(stdout.trim()).ok();
        let got = json.as_ref().and_then(|j| j["code"].as_i64());
        let msg = json.as_ref().and_then(|j| j["msg"].as_str()).unwrap_or_default().to_string();
        if out.status.success() || got != Some(code) || !msg.contains(mentions) || stdout.trim().lines().count() != 1 {
            wrong.push(format!(
                "{what}: want code {code} naming {mentions:?}, got {:?} code {got:?}: {stdout}",
                out.status
            ));
        }
    }
    assert!(wrong.is_empty(), "refusals not as expected:\n{}", wrong.join("\n"));
    assert_same_state(&node, &before, &node.snapshot(), "after the refused calls");
    assert_eq!(
        render(&dir_tree(&node.state_dir())),
        render(&state_before),
        "a refused call changed the state directory"
    );
    assert!(!pwned.exists(), "/tmp/pwned exists: a name was run by a shell");
    pod.check_ok(&node, &conf, "after the refused calls");
}
both_backends!(bad_input_is_refused_with_the_right_code_and_changes_nothing);

/// 7b. ADD with CNI_NETNS naming a namespace that does not exist is refused with code 3
///     (container unknown) and changes nothing.
fn add_with_a_netns_path_that_does_not_exist_is_refused(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    node.prime_firewall();
    let mut entry = mapping_entry(&node);
    entry["portForwarding"] = json!({ "rules": [{ "name": "web", "hostPort": 30080, "destPort": 8080 }] });
    let conf = node.write_conflist(&node.conflist("1.0.0", entry.clone()));
    let pod = Pod::added(&node, &conf, "p", &[]);
    pod.cni(&node, "del", &conf, &[]).assert_ok("DEL");
    let before = node.snapshot();
    let state_before = render(&dir_tree(&node.state_dir()));
    let mut env = pod.env("ADD");
    for (k, v) in env.iter_mut() {
        if k == "CNI_NETNS" {
            *v = "/var/run/netns/bn-does-not-exist".into();
        }
    }
    let stdin = serde_json::to_vec(&plugin_stdin("1.0.0", &entry, Some(&pod.result))).expect("serialize");
    let out = exec_raw(&node, &env, &stdin);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json: Option<Value> = serde_json::from_str(stdout.trim()).ok();
    let code = json.as_ref().and_then(|j| j["code"].as_i64());
    let msg = json.as_ref().and_then(|j| j["msg"].as_str()).unwrap_or_default().to_string();
    let changed = line_diff(&before, &node.snapshot());
    assert!(
        !out.status.success() && code == Some(3) && msg.contains("CNI_NETNS"),
        "ADD with a missing netns: {:?} code {code:?} msg {msg:?}; node changes:\n{changed}",
        out.status
    );
    assert_same_state(&node, &before, &node.snapshot(), "after ADD with a missing netns");
    assert_eq!(render(&dir_tree(&node.state_dir())), state_before, "state directory changed");
}
both_backends!(add_with_a_netns_path_that_does_not_exist_is_refused);

// ---------------------------------------------------------------- 8. security

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

/// 8. The state directory is 0700, records and the lock 0600, the log 0600. Planted symlinks
///    (a network's record directory, the state directory, a record file) are never followed:
///    nothing is written or read through them. An unprivileged user cannot open the lock file,
///    so cannot block the plugin.
#[test]
fn state_is_private_and_planted_symlinks_are_not_followed() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    node.prime_firewall();
    let entry = mapping_entry(&node);
    let conf = node.write_conflist(&node.conflist("1.0.0", entry.clone()));
    let y = Pod::added(&node, &conf, "y", &["--port-mappings", &port_mapping(30080)]);
    let state = node.state_dir();
    let records = state.join("records");
    for (path, want) in [
        (state.clone(), 0o700),
        (records.clone(), 0o700),
        (records.join(NETWORK_NAME), 0o700),
        (record_path(&node, &y.id), 0o600),
        (state.join("lock"), 0o600),
        (node.log_file(), 0o600),
    ] {
        assert_eq!(mode(&path), want, "mode of {}", path.display());
        assert_eq!(fs::symlink_metadata(&path).expect("stat").uid(), 0, "owner of {}", path.display());
    }

    // An unprivileged user cannot open the lock, not even with the directory traversable.
    let lock = state.join("lock");
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "flock", "-n"])
            .arg(&lock)
            .arg("true")
            .output()
            .expect("run setpriv")
    };
    for (dir_mode, what) in [(0o700, "state dir 0700"), (0o711, "state dir 0711")] {
        fs::set_permissions(&state, fs::Permissions::from_mode(dir_mode)).expect("chmod state dir");
        let out = as_nobody();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("Permission denied"), "{what}: nobody ran flock: {out:?}");
    }
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).expect("chmod state dir back");
    y.check_ok(&node, &conf, "after nobody's attempts on the lock");

    // A record file planted as a symlink to a valid-looking record is not read: CHECK of that
    // attachment fails (it would pass if followed: the rules are Y's and present).
    let y_record: Value = serde_json::from_slice(&fs::read(record_path(&node, &y.id)).expect("read record")).unwrap();
    let mut evil = y_record.clone();
    evil["id"]["containerID"] = json!("ctr-evil");
    let evil_target = node.dir().join("evil-record.json");
    let evil_text = serde_json::to_string(&evil).expect("serialize");
    fs::write(&evil_target, &evil_text).expect("write evil target");
    let evil_link = record_path(&node, "ctr-evil");
    std::os::unix::fs::symlink(&evil_target, &evil_link).expect("plant symlinked record");
    let evil_pod = Pod { ns: node.add_pod("evil"), id: "ctr-evil".into(), result: Value::Null };
    let check = evil_pod.direct(&node, "CHECK", &plugin_stdin("1.0.0", &entry, None));
    assert!(
        error_code(&check) == Some(5)
            && error_msg(&check).contains("ctr-evil")
            && error_msg(&check).contains("symbolic"),
        "CHECK through a symlinked record must fail (the record must not be read): {check:?}\nevil record: {evil_text}"
    );
    let snap = node.snapshot();
    evil_pod.direct(&node, "DEL", &plugin_stdin("1.0.0", &entry, None)).assert_ok("DEL ctr-evil");
    assert_same_state(&node, &snap, &node.snapshot(), "DEL through a symlinked record");
    assert_eq!(fs::read_to_string(&evil_target).expect("evil target"), evil_text, "the symlink's target changed");
    let log = node.log();
    assert!(
        log.lines().any(|l| l.contains("unreadable record") && l.contains("ctr-evil")),
        "the log does not mention the refused record:\n{}",
        log_tail(&node, 20)
    );
    let _ = fs::remove_file(&evil_link);

    // A record file planted as a symlink is replaced, never written through.
    let victim = node.dir().join("victim.txt");
    fs::write(&victim, "precious\n").expect("write victim");
    std::os::unix::fs::symlink(&victim, record_path(&node, "ctr-w")).expect("plant symlink for w");
    let w = Pod::added(&node, &conf, "w", &["--port-mappings", &port_mapping(30081)]);
    assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious\n", "ADD wrote through the symlink");
    let w_record = record_path(&node, &w.id);
    let meta = fs::symlink_metadata(&w_record).expect("w's record");
    assert!(meta.file_type().is_file() && meta.mode() & 0o7777 == 0o600, "w's record: {meta:?}");
    w.check_ok(&node, &conf, "after ADD over a planted symlink");
    w.cni(&node, "del", &conf, &[]).assert_ok("DEL w");

    // A network's record directory planted as a symlink: ADD is refused before the node is
    // touched, and nothing lands in the target.
    let elsewhere = node.dir().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("create elsewhere");
    let state2 = node.dir().join("state2");
    fs::create_dir_all(state2.join("records")).expect("create state2");
    for d in [&state2, &state2.join("records")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).expect("chmod state2");
    }
    std::os::unix::fs::symlink(&elsewhere, state2.join("records").join(NETWORK_NAME)).expect("plant network dir");
    // The state directory itself planted as a symlink.
    let elsewhere3 = node.dir().join("elsewhere3");
    fs::create_dir_all(&elsewhere3).expect("create elsewhere3");
    let state3 = node.dir().join("state3");
    std::os::unix::fs::symlink(&elsewhere3, &state3).expect("plant state dir");
    for (state_dir, target, what) in [(&state2, &elsewhere, "records/dind"), (&state3, &elsewhere3, "stateDir")] {
        let mut e = entry.clone();
        e["stateDir"] = json!(state_dir);
        let conf2 = node.write_conflist(&node.conflist("1.0.0", e));
        let firewall = node.firewall_snapshot();
        let v = Pod::new(&node, "v", "ctr-v");
        let out = v.cni(&node, "add", &conf2, &["--port-mappings", &port_mapping(30090)]);
        assert_eq!(error_code(&out), Some(5), "ADD with a symlinked {what} must fail with 5: {out:?}");
        assert!(error_msg(&out).contains("not a plain directory"), "message: {}", error_msg(&out));
        assert_eq!(node.firewall_snapshot(), firewall, "the refused ADD ({what}) changed the firewall");
        let written: Vec<_> = fs::read_dir(target).expect("read target").flatten().map(|e| e.path()).collect();
        assert!(written.is_empty(), "files written through the symlinked {what}: {written:?}");
        v.cni(&node, "del", &conf2, &[]);
    }
    y.check_ok(&node, &conf, "at the end");
}
