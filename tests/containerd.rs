//! The kubelet path: a real containerd (Debian's 1.6) with its CRI plugin runs the conflist
//! bridge → host-local → bridge-nat for pod sandboxes started over CRI, as on a k3s node, with the
//! port mappings kubelet sends for `hostPort` and the pod names it sends in the sandbox metadata.
//! Real packets from a client behind the node's uplink; a server in each sandbox's network namespace.
//!
//! ```text
//!   client 203.0.113.2 ──veth── 203.0.113.1 [up0] node [dind-br0] 10.20.0.1 ── sandboxes 10.20.0.x
//!                                              containerd + shims run here
//! ```
//!
//! See tests/common/containerd.rs for how containerd is set up and torn down.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::{require_root, wait_for, Backend, Background, Netns, Node, BRIDGE, NETWORK_NAME};
use serde_json::{json, Value};

const UPLINK: &str = "203.0.113.1";
const CLIENT: &str = "203.0.113.2";
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Field order is drop order: containerd (and its pods) go before the namespaces and the node dir.
struct Site {
    ctrd: Containerd,
    client: Netns,
    node: Node,
}

/// A running sandbox and the servers in its network namespace.
struct Sandbox {
    id: String,
    ip: String,
    pid: u32,
    _servers: Vec<Background>,
}

impl Site {
    /// A node (backend None = auto) whose conflist has `rules` as static rules, and containerd on it.
    fn new(backend: Option<Backend>, rules: &[Value]) -> Site {
        Site::build(backend, rules, true)
    }

    /// [`Site::new`]; `port_mappings` false leaves the capability out of the conflist.
    fn build(backend: Option<Backend>, rules: &[Value], port_mappings: bool) -> Site {
        let node = match backend {
            Some(b) => Node::with_backend(b),
            None => Node::with_auto_backend(),
        };
        node.prime_firewall();
        let client = Netns::new("bn-client");
        node.veth_to(&client, "up0", "eth0", &format!("{UPLINK}/24"), &format!("{CLIENT}/24"));
        let ctrd = Containerd::start(&node, &conflist(&node, rules, port_mappings));
        Site { ctrd, client, node }
    }

    /// RunPodSandbox, then servers answering `NAME tcp` on 8080 and `NAME udp` on 8081.
    #[track_caller]
    fn run(&self, config: &Value) -> Sandbox {
        let id = self.ctrd.run_pod(config).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.diagnostics()));
        let status = self.ctrd.inspect_pod(&id);
        let ip = status["status"]["network"]["ip"].as_str().expect("the sandbox has an IP").to_string();
        let pid = self.ctrd.pod_pid(&id);
        let name = config["metadata"]["name"].as_str().expect("metadata.name");
        let servers = vec![
            serve(pid, &format!("TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo {name} tcp'")),
            serve(pid, &format!("UDP-RECVFROM:8081,fork SYSTEM:'echo {name} udp'")),
        ];
        Sandbox { id, ip, pid, _servers: servers }
    }

    /// StopPodSandbox (which runs DEL) and RemovePodSandbox, as kubelet does.
    #[track_caller]
    fn remove(&self, pod: Sandbox) {
        let Sandbox { id, _servers, .. } = pod;
        drop(_servers);
        self.ctrd.stop_pod(&id).unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", self.diagnostics()));
        self.ctrd.remove_pod(&id).unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", self.diagnostics()));
    }

    /// One request to the node's uplink address from the client; the answer's first line.
    fn request(&self, proto: &str, port: u16, timeout_s: u32) -> Option<String> {
        let script = match proto {
            "tcp" => format!("socat -T{timeout_s} - TCP:{UPLINK}:{port},connect-timeout={timeout_s} </dev/null"),
            _ => format!("echo ping | socat -t{timeout_s} -T{timeout_s} - UDP:{UPLINK}:{port}"),
        };
        let out = self.client.sh(&script);
        let text = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    #[track_caller]
    fn expect_reply(&self, proto: &str, port: u16, expected: &str) {
        let mut last = None;
        let got = wait_for(
            || {
                last = self.request(proto, port, 2);
                last.as_deref() == Some(expected)
            },
            REPLY_TIMEOUT,
        );
        assert!(got, "{UPLINK}:{port}/{proto}: expected {expected:?}, last reply {last:?}\n{}", self.diagnostics());
    }

    /// host-local's leases: files named by address in its dataDir.
    fn leases(&self) -> Vec<String> {
        let dir = self.node.ipam_dir().join(NETWORK_NAME);
        let entries = std::fs::read_dir(dir).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
        let mut names: Vec<String> = entries.iter().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.retain(|n| n.parse::<std::net::IpAddr>().is_ok());
        names.sort();
        names
    }

    /// Lines of the node's firewall (nftables and every iptables) that name `ip`.
    fn firewall_lines_naming(&self, ip: &str) -> Vec<String> {
        let all = self.node.ns.sh_ok("nft list ruleset; iptables-save; iptables-legacy-save");
        all.lines().filter(|l| common::contains_word(l, ip)).map(str::to_owned).collect()
    }

    /// The pod's veth ends still on the bridge.
    fn bridge_ports(&self) -> String {
        self.node.ns.sh_ok(&format!("ip -br link show master {BRIDGE}"))
    }

    #[track_caller]
    fn assert_gone(&self, id: &str, ip: &str) {
        assert!(self.node.record(id, "eth0").is_none(), "the record of {id} is left\n{}", self.diagnostics());
        assert!(!self.leases().contains(&ip.to_string()), "the lease of {ip} is left: {:?}", self.leases());
        let lines = self.firewall_lines_naming(ip);
        assert!(lines.is_empty(), "forwards to {ip} are left:\n{}\n{}", lines.join("\n"), self.diagnostics());
    }

    fn diagnostics(&self) -> String {
        let out =
            self.node.ns.sh("echo '--- nft list ruleset'; nft list ruleset; echo '--- iptables-save'; iptables-save; \
             echo '--- addresses'; ip -br addr");
        let log = self.ctrd.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!(
            "{}{}\n--- plugin log\n{}\n--- containerd log (last lines)\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.node.log(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

/// bridge → host-local → bridge-nat with static `rules`, at cniVersion 1.0.0.
fn conflist(node: &Node, rules: &[Value], port_mappings: bool) -> Value {
    let mut entry = node.bridge_nat_entry();
    if port_mappings {
        // What makes containerd pass the sandbox's port mappings as runtimeConfig.portMappings.
        entry["capabilities"] = json!({ "portMappings": true });
    }
    if !rules.is_empty() {
        entry["portForwarding"] = json!({ "rules": rules });
    }
    node.conflist("1.0.0", entry)
}

/// `socat ADDRESSES` in the network namespace of process `pid` (a sandbox's pause), until dropped.
fn serve(pid: u32, addresses: &str) -> Background {
    let child = Command::new("sh")
        .args(["-c", &format!("exec nsenter --net=/proc/{pid}/ns/net socat {addresses}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start socat in the sandbox");
    Background(child)
}

/// Whether a TCP server listens on `port` in the network namespace of `pid`.
fn listening(pid: u32, port: u16) -> bool {
    let out = Command::new("nsenter")
        .args([&format!("--net=/proc/{pid}/ns/net"), "ss", "-Hltn", &format!("sport = :{port}")])
        .output();
    out.is_ok_and(|o| !o.stdout.is_empty())
}

/// A PodSandboxConfig as kubelet sends it for pod `default/NAME` with these `(protocol,
/// containerPort, hostPort)` mappings (its containers' hostPorts). Each call is a new pod (uid).
fn pod(name: &str, ports: &[(&str, u16, i64)]) -> Value {
    static UID: AtomicUsize = AtomicUsize::new(0);
    let mappings: Vec<Value> = ports
        .iter()
        .map(|(proto, container, host)| json!({ "protocol": proto, "containerPort": container, "hostPort": host }))
        .collect();
    json!({
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{}", UID.fetch_add(1, Ordering::Relaxed)) },
        "hostname": name,
        "portMappings": mappings,
    })
}

/// The web pod most cases run: TCP 30080 → 8080 and UDP 30081 → 8081.
fn web(name: &str) -> Value {
    pod(name, &[("TCP", 8080, 30080), ("UDP", 8081, 30081)])
}

// ---------------------------------------------------------------- tests

/// hostPort mappings, TCP and UDP, answer through the node's uplink.
fn port_mappings_answer_over_tcp_and_udp(backend: Option<Backend>) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend, &[]);
    let web = site.run(&web("web-1"));
    site.expect_reply("tcp", 30080, "web-1 tcp");
    site.expect_reply("udp", 30081, "web-1 udp");
    assert!(site.node.record(&web.id, "eth0").is_some(), "no record for {}", web.id);
    if let Some(b) = backend {
        assert_eq!(b, site.node.backend());
        site.node.assert_backend_in_use();
    }
}

#[test]
fn port_mappings_answer_over_tcp_and_udp_auto() {
    port_mappings_answer_over_tcp_and_udp(None);
}

#[test]
fn port_mappings_answer_over_tcp_and_udp_iptables() {
    port_mappings_answer_over_tcp_and_udp(Some(Backend::Iptables));
}

/// A static rule naming `default/web-*` binds the sandbox by the name containerd passes in
/// CNI_ARGS, whatever address host-local gave it (another pod took the first one).
#[test]
fn static_rule_binds_the_sandbox_by_its_kubernetes_name() {
    if !require_root() {
        return;
    }
    let rule = json!({ "name": "web", "hostPort": 30090, "destPort": 8080, "protocol": "tcp", "pod": "default/web-*" });
    let site = Site::new(None, &[rule]);
    let db = site.run(&pod("db-0", &[]));
    let web = site.run(&pod("web-1", &[]));
    assert_ne!(db.ip, web.ip);
    site.expect_reply("tcp", 30090, "web-1 tcp");
}

/// StopPodSandbox runs DEL: the forwards, the record and the lease go; RemovePodSandbox removes it.
#[test]
fn stop_and_remove_run_del() {
    if !require_root() {
        return;
    }
    let site = Site::new(None, &[]);
    let web = site.run(&web("web-1"));
    site.expect_reply("tcp", 30080, "web-1 tcp");
    let (id, ip) = (web.id.clone(), web.ip.clone());
    assert!(site.node.record(&id, "eth0").is_some(), "no record after ADD");
    assert_eq!(site.leases(), vec![ip.clone()]);
    assert!(!site.firewall_lines_naming(&ip).is_empty(), "no forward to {ip} after ADD\n{}", site.diagnostics());
    drop(web);
    site.ctrd.stop_pod(&id).unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", site.diagnostics()));
    site.assert_gone(&id, &ip);
    assert_eq!(site.bridge_ports(), "", "a veth is left on the bridge");
    site.ctrd.remove_pod(&id).unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", site.diagnostics()));
    assert_eq!(site.ctrd.pods(), Vec::<Value>::new(), "sandboxes are left");
}

/// A pod re-created under the same name answers on the first request once its server listens.
#[test]
fn recreated_pod_with_the_same_name_answers_at_once() {
    if !require_root() {
        return;
    }
    let site = Site::new(None, &[]);
    let first = site.run(&web("web-1"));
    site.expect_reply("tcp", 30080, "web-1 tcp");
    site.remove(first);
    let second = site.run(&pod("web-1", &[("TCP", 8080, 30080)]));
    assert!(wait_for(|| listening(second.pid, 8080), Duration::from_secs(10)), "the server did not start");
    let started = Instant::now();
    let reply = site.request("tcp", 30080, 2);
    assert_eq!(
        reply.as_deref(),
        Some("web-1 tcp"),
        "first request after {:?}\n{}",
        started.elapsed(),
        site.diagnostics()
    );
}

/// Forwarding does not depend on containerd: it keeps working while containerd is down and after
/// it is back; stop and remove after the restart still run DEL.
#[test]
fn containerd_restart_keeps_forwarding_and_cleans_up_after() {
    if !require_root() {
        return;
    }
    let mut site = Site::new(None, &[]);
    let web = site.run(&web("web-1"));
    site.expect_reply("tcp", 30080, "web-1 tcp");
    site.ctrd.stop_daemon();
    site.expect_reply("tcp", 30080, "web-1 tcp");
    site.expect_reply("udp", 30081, "web-1 udp");
    site.ctrd.start_daemon();
    let status = site.ctrd.inspect_pod(&web.id);
    // protobuf's JSON leaves out enum zero values: no state is SANDBOX_READY.
    let state = &status["status"]["state"];
    assert!(state.is_null() || state == "SANDBOX_READY", "sandbox state after the restart: {state}");
    // It found the pod's netns again, so its DEL will name it, as after a restart on a real node.
    assert_eq!(status["info"]["netNamespaceClosed"], json!(false), "netns after the restart: {status}");
    site.expect_reply("tcp", 30080, "web-1 tcp");
    let (id, ip) = (web.id.clone(), web.ip.clone());
    site.remove(web);
    site.assert_gone(&id, &ip);
    assert_eq!(site.ctrd.pods(), Vec::<Value>::new(), "sandboxes are left");
}

/// Once every pod is gone, the node's firewall and ip rules are as before the first one.
fn every_pod_removed_leaves_the_node_as_before(backend: Option<Backend>) {
    if !require_root() {
        return;
    }
    let rule = json!({ "name": "web", "hostPort": 30090, "destPort": 8080, "protocol": "tcp", "pod": "default/web-*" });
    let site = Site::new(backend, &[rule]);
    let rules = || site.node.ns.sh_ok("ip rule; ip -6 rule");
    let (firewall, ip_rules) = (site.node.firewall_snapshot(), rules());
    let a = site.run(&web("web-1"));
    let b = site.run(&pod("db-0", &[("TCP", 8080, 30082)]));
    site.expect_reply("tcp", 30080, "web-1 tcp");
    site.expect_reply("tcp", 30082, "db-0 tcp");
    site.expect_reply("tcp", 30090, "web-1 tcp");
    assert_ne!(site.node.firewall_snapshot(), firewall, "the pods changed nothing: the comparison proves nothing");
    site.remove(a);
    site.remove(b);
    assert_eq!(site.node.firewall_snapshot(), firewall, "firewall after every pod is gone");
    assert_eq!(rules(), ip_rules, "ip rules after every pod is gone");
    assert_eq!(site.leases(), Vec::<String>::new());
}

#[test]
fn every_pod_removed_leaves_the_node_as_before_auto() {
    every_pod_removed_leaves_the_node_as_before(None);
}

#[test]
fn every_pod_removed_leaves_the_node_as_before_iptables() {
    every_pod_removed_leaves_the_node_as_before(Some(Backend::Iptables));
}

/// A hostPort of 70000: kubelet's API validation would refuse it, but CRI's field is an int32 and
/// containerd passes it on as `"HostPort": 70000`, so any CRI client can send it. bridge-nat cannot
/// forward it and refuses the ADD; containerd then cleans up with a DEL carrying the same runtime
/// config, which bridge-nat cannot use either. That DEL must succeed, or libcni never reaches
/// bridge and host-local: the sandbox would stay NOTREADY for ever with its veth and lease.
#[test]
fn del_with_a_runtime_config_the_plugin_cannot_use_still_succeeds() {
    if !require_root() {
        return;
    }
    let site = Site::new(None, &[]);
    let err =
        site.ctrd.run_pod(&pod("web-bad", &[("TCP", 8080, 70000)])).expect_err("RunPodSandbox with hostPort 70000");
    assert!(err.contains("bridge-nat"), "RunPodSandbox failed, but not in bridge-nat's ADD: {err}");
    let left: Vec<Value> = site.ctrd.pods();
    assert!(left.is_empty(), "the failed sandbox is left (its DEL failed?): {left:?}\n{}", site.diagnostics());
    assert_eq!(site.leases(), Vec::<String>::new(), "host-local's lease is left: DEL stopped before it");
    assert_eq!(site.bridge_ports(), "", "a veth is left on the bridge: DEL stopped before bridge");
    assert!(site.node.log().contains("70000"), "bridge-nat's log does not name what it refused:\n{}", site.node.log());
    // The node still works for the next pod.
    let _web = site.run(&web("web-1"));
    site.expect_reply("tcp", 30080, "web-1 tcp");
}

/// The same for a pod that runs: it was started while the conflist did not declare portMappings,
/// so its hostPort of 70000 never reached bridge-nat (a static rule forwards to it). The operator
/// then declares the capability and containerd restarts: the pod's DEL now carries the mapping.
/// bridge-nat cannot use it, and still removes what the record says, and the chain goes on.
#[test]
fn del_of_a_running_pod_ignores_a_runtime_config_it_cannot_use() {
    if !require_root() {
        return;
    }
    let rule = json!({ "name": "web", "hostPort": 30090, "destPort": 8080, "protocol": "tcp", "pod": "default/web-*" });
    let mut site = Site::build(None, std::slice::from_ref(&rule), false);
    let web = site.run(&pod("web-1", &[("TCP", 8080, 70000)]));
    site.expect_reply("tcp", 30090, "web-1 tcp");
    site.ctrd.set_conflist(&conflist(&site.node, &[rule], true));
    site.ctrd.stop_daemon();
    site.ctrd.start_daemon();
    let (id, ip) = (web.id.clone(), web.ip.clone());
    site.remove(web);
    site.assert_gone(&id, &ip);
    assert_eq!(site.bridge_ports(), "", "a veth is left on the bridge: DEL stopped before bridge");
    assert!(site.node.log().contains("70000"), "the DEL did not get the mapping:\n{}", site.node.log());
}
