//! The first connection after ADD on a bridge crowded with 1,000 pods: a new pod's forward answers
//! at once, so does a pod re-created with its old address and a new MAC, and so does a pod whose
//! prevResult names a wrong MAC; ADD creates no neighbour entry for a new pod's address. Real
//! packets through the real bridge + host-local, driven through libcni, except where prevResult
//! has to be forged (bridge-nat then runs by itself after a bridge-only chain).
//!
//! ```text
//!   client 203.0.113.2 ──veth── 203.0.113.1 [up0] node [dind-br0] 10.20.0.1/16
//!                                                        ├── 1,000 pods 10.20.1.2 … 10.20.4.251 (netns + veth, no CNI)
//!                                                        └── pods the chain adds, 10.20.10.x
//! ```
//!
//! The crowd matters: on such a bridge every broadcast (the node's ARP request for a new pod, or
//! the pod's for its gateway) is copied to 1,000 ports, and what was pre-seeded wrongly used to
//! cost seconds there.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{both_backends, plugin_stdin, require_root, wait_for, Backend, Background, Netns, Node, BRIDGE};
use serde_json::{json, Value};

const VERSION: &str = "1.0.0";
const CROWD: usize = 1000;
const UPLINK: &str = "203.0.113.1";
/// The goal: the first connection through a new forward is answered within this of ADD's return.
const FIRST_ANSWER: Duration = Duration::from_secs(1);
const WRONG_MAC: &str = "02:00:00:00:de:ad";
/// Two crowds at once would share this machine's cores with each other's setup; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `ip [-n NS] -batch -` with `lines` on stdin; panics on failure.
fn ip_batch(netns: Option<&str>, lines: &str) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd.args(["-batch", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run ip");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), lines.as_bytes()).expect("write ip batch");
    let out = child.wait_with_output().expect("wait for ip");
    assert!(out.status.success(), "ip -batch failed: {}\n{lines}", String::from_utf8_lossy(&out.stderr));
}

/// Pods made as cheaply as possible: a namespace each, a veth whose node end is a port of the
/// bridge, an address. No IPv6 link-local addresses, so 1,000 ports do not flood each other with
/// DAD and router solicitations while the test measures. Deleted on drop.
struct Crowd {
    names: Vec<String>,
}

impl Crowd {
    fn new(node: &Node, tag: &str) -> Crowd {
        let names: Vec<String> = (0..CROWD).map(|k| format!("bn-crowd-{}-{tag}-{k}", std::process::id())).collect();
        let crowd = Crowd { names };
        ip_batch(None, &crowd.names.iter().map(|n| format!("netns add {n}\n")).collect::<String>());
        let mut node_side = String::new();
        for (k, name) in crowd.names.iter().enumerate() {
            node_side += &format!("link add cr{k} type veth peer name eth0 netns {name}\n");
            node_side += &format!("link set cr{k} addrgenmode none\nlink set cr{k} master {BRIDGE} up\n");
        }
        ip_batch(Some(node.ns.name()), &node_side);
        for (k, name) in crowd.names.iter().enumerate() {
            let addr = format!("10.20.{}.{}/16", 1 + k / 250, 2 + k % 250);
            ip_batch(
                Some(name),
                &format!("link set eth0 addrgenmode none\naddr add {addr} dev eth0\nlink set eth0 up\n"),
            );
        }
        crowd
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        let lines: String = self.names.iter().map(|n| format!("netns del {n}\n")).collect();
        let _ = std::panic::catch_unwind(|| ip_batch(None, &lines));
    }
}

/// A pod of the chain: its namespace, a server answering its name on 8080, one forward.
struct Pod {
    ns: Netns,
    id: String,
    name: String,
    host_port: u16,
    /// Addresses asked of host-local (the `ips` capability), to re-create a pod with its old one.
    ips: Option<String>,
    result: Value,
    _server: Background,
}

impl Pod {
    fn new(name: &str, host_port: u16, ips: Option<&str>) -> Pod {
        let ns = Netns::new(&format!("bn-{name}"));
        let server = ns.spawn(&format!("exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo {name}'"));
        let listening = wait_for(|| !ns.sh_ok("ss -Hltn 'sport = :8080'").trim().is_empty(), Duration::from_secs(5));
        assert!(listening, "the server in pod {name} does not listen");
        let id = format!("ctr-{name}");
        let ips = ips.map(|ip| json!([ip]).to_string());
        Pod { ns, id, name: name.to_string(), host_port, ips, result: Value::Null, _server: server }
    }

    fn mappings(&self) -> String {
        json!([{ "hostPort": self.host_port, "containerPort": 8080, "protocol": "tcp" }]).to_string()
    }

    fn driver_args(&self) -> Vec<String> {
        let mut args = vec!["--port-mappings".to_string(), self.mappings()];
        if let Some(ips) = &self.ips {
            args.extend(["--ips".to_string(), ips.clone()]);
        }
        args
    }

    fn ip(&self) -> String {
        common::result_ip(&self.result, false)
    }

    /// The MAC of the pod's own interface.
    fn mac(&self) -> String {
        let out = self.ns.sh_ok("cat /sys/class/net/eth0/address");
        out.trim().to_lowercase()
    }
}

struct Site {
    node: Node,
    client: Netns,
    /// bridge + host-local + bridge-nat.
    chain: PathBuf,
    /// bridge + host-local alone, for the pods whose prevResult bridge-nat gets forged.
    bridge_only: PathBuf,
    _crowd: Crowd,
}

impl Site {
    fn new(backend: Backend) -> Site {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        let client = Netns::new("bn-client");
        node.veth_to(&client, "up0", "eth0", &format!("{UPLINK}/24"), "203.0.113.2/24");
        let mut list = node.conflist(VERSION, bridge_nat_entry(&node));
        let bridge = &mut list["plugins"][0];
        bridge["capabilities"] = json!({ "ips": true });
        bridge["ipam"]["ranges"] = json!([[{
            "subnet": "10.20.0.0/16", "rangeStart": "10.20.10.10", "rangeEnd": "10.20.10.250", "gateway": "10.20.0.1"
        }]]);
        let chain = node.write_conflist(&list);
        list["plugins"].as_array_mut().expect("plugins").truncate(1);
        let bridge_only = node.write_conflist(&list);
        // The bridge is the bridge plugin's, made by a first pod, as on a real node.
        let mut site = Site { node, client, chain, bridge_only, _crowd: Crowd { names: Vec::new() } };
        let mut seed = Pod::new("seed", 30999, None);
        site.add(&mut seed);
        site._crowd = Crowd::new(&site.node, backend.name());
        site
    }

    /// ADD through the whole chain; returns when the driver has.
    fn add(&self, pod: &mut Pod) -> Instant {
        let args = pod.driver_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.node.cni("add", &self.chain, &pod.ns, &pod.id, "eth0", &args);
        let returned = Instant::now();
        out.assert_ok(&format!("ADD {}", pod.id));
        pod.result = out.json.expect("ADD prints a result");
        returned
    }

    fn del(&self, pod: &Pod) {
        let args = pod.driver_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.node.cni("del", &self.chain, &pod.ns, &pod.id, "eth0", &args).assert_ok(&format!("DEL {}", pod.id));
    }

    /// The bridge plugin through libcni, then bridge-nat by itself with prevResult's MAC for the
    /// pod replaced by `mac`, as a chain with a plugin reporting a wrong MAC would call it.
    fn add_reporting_mac(&self, pod: &mut Pod, mac: &str) -> Instant {
        let ips: Vec<String> = pod.ips.iter().flat_map(|i| ["--ips".to_string(), i.clone()]).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let out = self.node.cni("add", &self.bridge_only, &pod.ns, &pod.id, "eth0", &ips);
        out.assert_ok(&format!("bridge ADD {}", pod.id));
        let mut prev = out.json.expect("the bridge plugin prints a result");
        for iface in prev["interfaces"].as_array_mut().expect("interfaces") {
            if iface["sandbox"].as_str().is_some_and(|s| !s.is_empty()) {
                iface["mac"] = json!(mac);
            }
        }
        pod.result = prev.clone();
        let out = self.node.plugin("ADD", &pod.ns, &pod.id, "eth0", &self.forged_stdin(pod));
        let returned = Instant::now();
        out.assert_ok(&format!("bridge-nat ADD {} with MAC {mac} in prevResult", pod.id));
        returned
    }

    fn del_forged(&self, pod: &Pod) {
        self.node.plugin("DEL", &pod.ns, &pod.id, "eth0", &self.forged_stdin(pod)).assert_ok("bridge-nat DEL");
        let ips: Vec<String> = pod.ips.iter().flat_map(|i| ["--ips".to_string(), i.clone()]).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        self.node.cni("del", &self.bridge_only, &pod.ns, &pod.id, "eth0", &ips).assert_ok("bridge DEL");
    }

    fn forged_stdin(&self, pod: &Pod) -> Value {
        let mut entry = bridge_nat_entry(&self.node);
        entry["runtimeConfig"] = json!({ "portMappings": serde_json::from_str::<Value>(&pod.mappings()).unwrap() });
        plugin_stdin(VERSION, &entry, Some(&pod.result))
    }

    /// The node's neighbour entry for `ip` on the bridge, as `ip neigh` prints it ("" = none).
    fn neighbour(&self, ip: &str) -> String {
        self.node.ns.sh_ok(&format!("ip neigh show {ip} dev {BRIDGE}")).trim().to_string()
    }

    /// Connects from the client to the node's forwarded port until the pod's server answers, or
    /// until FIRST_ANSWER has passed since `since`; the time from `since` to the answer.
    fn first_answer(&self, pod: &Pod, since: Instant) -> Result<Duration, String> {
        let ns = std::fs::File::open(self.client.path()).expect("open the client's namespace");
        let addr: SocketAddr = format!("{UPLINK}:{}", pod.host_port).parse().expect("address");
        let expected = pod.name.clone();
        std::thread::spawn(move || {
            // SAFETY: setns on a descriptor we own; it moves only this thread.
            assert_eq!(unsafe { nix::libc::setns(ns.as_raw_fd(), nix::libc::CLONE_NEWNET) }, 0, "setns");
            let mut last = String::from("no attempt");
            while let Some(left) = FIRST_ANSWER.checked_sub(since.elapsed()).filter(|l| !l.is_zero()) {
                let reply = TcpStream::connect_timeout(&addr, left).and_then(|mut s| {
                    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                    let mut text = String::new();
                    s.read_to_string(&mut text).map(|_| text)
                });
                match reply {
                    Ok(text) if text.trim() == expected => return Ok(since.elapsed()),
                    Ok(text) => last = format!("answered {text:?}"),
                    Err(e) => last = e.to_string(),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(format!("no answer from {expected} through {addr} within {FIRST_ANSWER:?} of ADD (last: {last})"))
        })
        .join()
        .expect("client thread")
    }

    /// [`Site::first_answer`] into `report`, with what the node's neighbour table says on failure.
    fn check_first_answer(&self, pod: &Pod, since: Instant, what: &str, report: &mut Report) {
        match self.first_answer(pod, since) {
            Ok(t) => report.times.push(format!("{what} {:.1} ms", t.as_secs_f64() * 1e3)),
            Err(e) => {
                report.failures.push(format!("{what}: {e}; neighbour entry now: {:?}", self.neighbour(&pod.ip())))
            }
        }
    }
}

/// What one scenario saw: every check runs, so one run names every broken behaviour.
#[derive(Default)]
struct Report {
    times: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(failure());
        }
    }
}

fn bridge_nat_entry(node: &Node) -> Value {
    let mut entry = node.bridge_nat_entry();
    entry["capabilities"] = json!({ "portMappings": true });
    entry
}

// ---------------------------------------------------------------- tests

/// On a bridge with 1,000 pods: ADD leaves no neighbour entry for new pods' addresses; a new pod's
/// forward answers its first connection within 1 s; so does a pod re-created with its old address
/// and a new MAC (its entry pointed at the new MAC), and a pod whose prevResult names a wrong MAC,
/// new or re-created.
fn first_connection_on_a_crowded_bridge(backend: Backend) {
    if !require_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::new(backend);
    let mut report = Report::default();

    // Pods nobody talks to yet: ADD made no entry for any of them.
    let mut quiet = Vec::new();
    for i in 0..5 {
        let mut pod = Pod::new(&format!("quiet{i}"), 30100 + i, None);
        site.add(&mut pod);
        quiet.push(pod);
    }
    for pod in &quiet {
        let entry = site.neighbour(&pod.ip());
        report.check(entry.is_empty(), || format!("ADD of {} left a neighbour entry: {entry}", pod.id));
    }

    for i in 0..3 {
        let mut pod = Pod::new(&format!("fresh{i}"), 30200 + i, None);
        let returned = site.add(&mut pod);
        site.check_first_answer(&pod, returned, &format!("new pod {}", pod.id), &mut report);
    }

    // Re-created with its old address: the node's entry holds the old MAC, REACHABLE, as after
    // traffic to the old pod.
    let mut old = Pod::new("old", 30300, None);
    site.add(&mut old);
    let (addr, old_mac) = (old.ip(), old.mac());
    site.del(&old);
    drop(old);
    site.node.ns.sh_ok(&format!("ip neigh replace {addr} lladdr {old_mac} dev {BRIDGE} nud reachable"));
    let mut new = Pod::new("recreated", 30301, Some(&addr));
    let returned = site.add(&mut new);
    assert_eq!(new.ip(), addr, "host-local gave the re-created pod its old address");
    assert_ne!(new.mac(), old_mac);
    site.check_first_answer(&new, returned, "re-created pod", &mut report);
    let entry = site.neighbour(&addr);
    report.check(entry.contains(&new.mac()), || format!("re-created pod: the node's entry after: {entry}"));

    // prevResult names a wrong MAC: for a new address, then for a re-created pod.
    let mut forged = Pod::new("forged", 30400, None);
    let returned = site.add_reporting_mac(&mut forged, WRONG_MAC);
    site.check_first_answer(&forged, returned, "new pod, wrong MAC in prevResult", &mut report);
    let addr = forged.ip();
    site.del_forged(&forged);
    drop(forged);
    let mut again = Pod::new("forged-again", 30401, Some(&addr));
    let returned = site.add_reporting_mac(&mut again, WRONG_MAC);
    assert_eq!(again.ip(), addr, "host-local gave the re-created pod its old address");
    site.check_first_answer(&again, returned, "re-created pod, wrong MAC in prevResult", &mut report);
    let entry = site.neighbour(&addr);
    report.check(!entry.contains(WRONG_MAC), || format!("the node's entry points at prevResult's wrong MAC: {entry}"));

    // Entries for the pods talked to, none for the crowd nor the quiet ones.
    let count = site.node.ns.sh_ok(&format!("ip neigh show dev {BRIDGE}")).lines().count();
    report.check(count <= 10, || format!("{count} neighbour entries on the bridge, for 6 pods talked to"));
    eprintln!("{}: first answers after ADD: {}", backend.name(), report.times.join(", "));
    assert!(
        report.failures.is_empty(),
        "{} with {CROWD} pods on the bridge:\n{}\n--- ip neigh\n{}--- log\n{}",
        backend.name(),
        report.failures.join("\n"),
        site.node.ns.sh_ok(&format!("ip neigh show dev {BRIDGE}")),
        site.node.log()
    );
}
both_backends!(first_connection_on_a_crowded_bridge);
