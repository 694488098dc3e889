//! The node agent (`bridge-nat watch`) and `bridge-nat reconcile` / `check`, with real kernel
//! events and real packets. The two-uplink topology of tests/common/uplinks.rs with strict
//! rp_filter; port 30080 and pod-originated traffic are routed by up2 (tables 101 and 100), port
//! 30081 by up1 (table 102), port 30082 by up4, an uplink that only appears after the ADD.
//!
//! Faults, as an edge node meets them:
//!   (a) up2 flaps and its DHCP default comes back in main;
//!   (b) up1's router moves to another address and main's default is replaced;
//!   (c) up4 (named in the config) appears after the ADD;
//!   (d) the firewall is wiped (iptables: the plugin's chains flushed; nftables: its table deleted);
//!   (e) an ip rule is deleted by hand.
//! With the agent running, each is repaired within 2 s; without it, `check` names each and one
//! `reconcile` repairs it.

mod common;

use common::agent::{bin, text, tool, Agent};
use common::uplinks::*;
use common::{both_backends, require_root, veth, wait_for, Backend, Background, Netns, Node};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const PORT_UP4: u16 = 30082;
const UP4: &str = "10.99.4.1";
const ROUTER4: &str = "10.99.4.254";
const CLIENT4: &str = "10.98.0.10";
/// up1's router after it moves (fault b).
const ROUTER1_MOVED: &str = "198.51.100.253";
/// What the issue asks of the agent.
const REPAIR_DEADLINE: Duration = Duration::from_secs(2);

struct Site {
    t: Topology,
    pod: Pod,
    _server: Background,
    _peer_server: Background,
}

/// The topology with strict rp_filter, one pod serving on 8080, a peer-address server on client2
/// and the standard config plus a forward routed by the not-yet-present up4.
fn site(backend: Backend) -> Site {
    let t = Topology::new(backend);
    t.strict_rp_filter();
    let mut e = two_uplink_entry(&t.node);
    e["portForwarding"]["rules"]
        .as_array_mut()
        .expect("rules")
        .push(routed("via-up4", PORT_UP4, None, "0x67", 103, "dind_up4", "up4"));
    // The seed's behaviour: each port's replies by the uplink its rule names.
    e["routing"]["replyVia"] = json!("rule");
    let conf = t.conflist(e);
    let pod = Pod::add(&t.node, &conf, "web");
    let server = pod.serve();
    let peer_server = serve_peer_addr(&t.client2, PEER_PORT);
    expect_reply(&t.node, &t.client2, UP2, PORT_UP2, "pod");
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
    Site { t, pod, _server: server, _peer_server: peer_server }
}

/// A client connection that should work, tried with short timeouts until `deadline` passes after
/// `since`; returns how long it took.
#[track_caller]
fn answered_within(site: &Site, from: &Netns, host: &str, port: u16, since: Instant, deadline: Duration) -> Duration {
    let mut last = String::new();
    while since.elapsed() < deadline {
        let out = from.sh(&format!("socat -T1 - TCP:{host}:{port},connect-timeout=0.4 </dev/null"));
        last = text(&out);
        if out.status.success() && last.lines().any(|l| l.trim() == "pod") {
            return since.elapsed();
        }
    }
    panic!(
        "[{}] {host}:{port} not answered within {deadline:?} (last: {last:?})\n{}",
        from.name(),
        diagnostics(&site.t.node)
    );
}

/// The pod's own traffic to client2 leaves by up2 again (client2 sees up2's address).
#[track_caller]
fn pod_outbound_within(site: &Site, since: Instant, deadline: Duration) -> Duration {
    let mut last = String::new();
    while since.elapsed() < deadline {
        let out = site.pod.ns.sh(&format!("socat -T1 - TCP:{CLIENT2}:{PEER_PORT},connect-timeout=0.4 </dev/null"));
        last = text(&out);
        if out.status.success() && last.lines().any(|l| l.trim() == UP2) {
            return since.elapsed();
        }
    }
    panic!("pod outbound not by up2 within {deadline:?} (last: {last:?})\n{}", diagnostics(&site.t.node));
}

/// Fault (c)'s uplink: up4 with a router and a client behind it, and a DHCP-style default in main.
fn bring_up4(node: &Node) -> (Netns, Netns) {
    let router = Netns::new("bn-r4");
    node.veth_to(&router, "up4", "wan", &format!("{UP4}/24"), &format!("{ROUTER4}/24"));
    router.sh_ok("sysctl -qw net.ipv4.ip_forward=1");
    let client = Netns::new("bn-c4");
    veth(&router, "lan", &client, "eth0", "10.98.0.1/25", &format!("{CLIENT4}/25"));
    client.sh_ok("ip route add default via 10.98.0.1");
    node.ns.sh_ok(&format!("ip route add default via {ROUTER4} dev up4 metric 300"));
    (router, client)
}

/// The faults, each returning when it is complete (the moment the clock starts).
fn flap_up2(node: &Node) {
    node.ns.sh_ok(&format!(
        "ip link set up2 down && ip link set up2 up && ip route replace default via {ROUTER2} dev up2 metric 200"
    ));
}

fn move_router1(site: &Site) {
    // Deleting a primary address takes its secondaries with it: delete, then add.
    site.t.router1.sh_ok(&format!("ip addr del {ROUTER1}/24 dev wan && ip addr add {ROUTER1_MOVED}/24 dev wan"));
    site.t.node.ns.sh_ok(&format!("ip neigh flush dev up1; ip route replace default via {ROUTER1_MOVED} dev up1"));
}

fn wipe_firewall(node: &Node) {
    match node.backend() {
        Backend::Nftables => node.ns.sh_ok("nft delete table inet bridge-nat"),
        Backend::Iptables => node.ns.sh_ok(
            "iptables -t nat -F BRIDGE-NAT-DNAT && iptables -t mangle -F BRIDGE-NAT-MARK && \
             iptables -t filter -F BRIDGE-NAT-FORWARD",
        ),
    };
}

fn delete_ip_rule(node: &Node) {
    // Without it, replies to 30081 fall through to the global table (up2) and die at router2.
    node.ns.sh_ok("ip rule del fwmark 0x66/0x1fff lookup 102");
}

// ---------------------------------------------------------------- with the agent

fn agent_repairs_every_fault_within_two_seconds(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = site(backend);
    let node = &site.t.node;
    let _agent = Agent::start(node);
    let mut latencies = Vec::new();

    flap_up2(node);
    let t0 = Instant::now();
    latencies.push(("a: up2 flapped", answered_within(&site, &site.t.client2, UP2, PORT_UP2, t0, REPAIR_DEADLINE)));
    pod_outbound_within(&site, t0, REPAIR_DEADLINE);

    move_router1(&site);
    let t0 = Instant::now();
    latencies.push(("b: gateway moved", answered_within(&site, &site.t.client1, UP1, PORT_UP1, t0, REPAIR_DEADLINE)));

    let (_r4, c4) = bring_up4(node);
    let t0 = Instant::now();
    latencies.push(("c: uplink appeared", answered_within(&site, &c4, UP4, PORT_UP4, t0, REPAIR_DEADLINE)));

    wipe_firewall(node);
    let t0 = Instant::now();
    latencies.push(("d: firewall wiped", answered_within(&site, &site.t.client2, UP2, PORT_UP2, t0, REPAIR_DEADLINE)));

    delete_ip_rule(node);
    let t0 = Instant::now();
    latencies.push(("e: ip rule deleted", answered_within(&site, &site.t.client1, UP1, PORT_UP1, t0, REPAIR_DEADLINE)));
    pod_outbound_within(&site, t0, REPAIR_DEADLINE);

    eprintln!("repair latency ({backend:?}): {latencies:?}");
    let check = tool(node, "check");
    assert!(check.status.success(), "the node is not right after the repairs: {}", text(&check));
}
both_backends!(agent_repairs_every_fault_within_two_seconds);

/// Idle: no polling, so next to no CPU; and its own repairs do not wake it into a loop.
fn idle_agent_uses_next_to_no_cpu_and_does_not_loop(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = site(backend);
    let node = &site.t.node;
    let agent = Agent::start(node);
    wipe_firewall(node);
    answered_within(&site, &site.t.client2, UP2, PORT_UP2, Instant::now(), Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let passes = node.log().matches("repaired:").count();
    let ticks = agent.cpu_ticks();
    std::thread::sleep(Duration::from_secs(10));
    let used = agent.cpu_ticks() - ticks;
    eprintln!("idle agent ({backend:?}): {used} clock ticks of CPU over 10 s");
    // Clock ticks are 1/100 s: 1% of a core over 10 s is 10 ticks.
    assert!(used < 10, "the idle agent used {used} ticks (>= 1% of a core) over 10 s");
    assert_eq!(node.log().matches("repaired:").count(), passes, "the agent kept repairing:\n{}", node.log());
    // Each pass's netfilter sockets are let go: more passes, no more open files.
    let open_files = || std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).expect("agent fds").count();
    let before = open_files();
    for _ in 0..3 {
        wipe_firewall(node);
        answered_within(&site, &site.t.client2, UP2, PORT_UP2, Instant::now(), Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(open_files(), before, "the agent keeps files open across passes");
}
both_backends!(idle_agent_uses_next_to_no_cpu_and_does_not_loop);

/// SIGKILL at any moment of a repair leaves nothing half-applied: a restarted agent converges to
/// exactly the node as it was before the fault. SIGTERM stops it cleanly, removing nothing.
fn killed_agent_converges_after_restart_and_sigterm_removes_nothing(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = site(backend);
    let node = &site.t.node;
    let before = sorted_snapshot(node);
    for delay_ms in [0u64, 5, 20, 60] {
        let agent = Agent::start(node);
        wipe_firewall(node);
        delete_ip_rule(node);
        std::thread::sleep(Duration::from_millis(250 + delay_ms));
        agent.signal("-KILL");
        drop(agent);
        let mut agent = Agent::start(node);
        let converged = wait_for(|| sorted_snapshot(node) == before, Duration::from_secs(5));
        assert!(converged, "after SIGKILL at +{delay_ms} ms the node did not converge\n{}", diagnostics(node));
        agent.signal("-TERM");
        let status = agent.wait();
        assert!(status.success(), "SIGTERM must end the agent cleanly: {status:?}");
        assert_eq!(sorted_snapshot(node), before, "stopping the agent changed the node");
    }
    assert!(node.log().contains("node agent stopping; nothing is removed"), "{}", node.log());
    answered_within(&site, &site.t.client2, UP2, PORT_UP2, Instant::now(), Duration::from_secs(5));
}
both_backends!(killed_agent_converges_after_restart_and_sigterm_removes_nothing);

/// The node's state with lines sorted: a repaired chain holds the same rules, maybe in another order.
fn sorted_snapshot(node: &Node) -> Vec<String> {
    let mut lines: Vec<String> = node.snapshot().lines().map(str::to_string).collect();
    lines.sort();
    lines
}

// ---------------------------------------------------------------- without the agent

/// `check` names the fault (exit 1), `reconcile` repairs it (exit 0, one line per repair), and the
/// client is answered again; `check` is clean afterwards.
#[track_caller]
fn check_names_then_reconcile_repairs(site: &Site, needles: &[&str], from: &Netns, host: &str, port: u16) {
    let node = &site.t.node;
    let check = tool(node, "check");
    assert_eq!(check.status.code(), Some(1), "check must fail after the fault: {}", text(&check));
    for needle in needles {
        assert!(text(&check).contains(needle), "check does not name {needle:?}:\n{}", text(&check));
    }
    let rec = tool(node, "reconcile");
    assert!(rec.status.success(), "reconcile must leave the node right: {}\n{}", text(&rec), diagnostics(node));
    assert!(text(&rec).contains("repaired:"), "reconcile printed no repair: {}", text(&rec));
    answered_within(site, from, host, port, Instant::now(), Duration::from_secs(5));
    let check = tool(node, "check");
    assert!(check.status.success(), "check after reconcile: {}", text(&check));
}

fn check_names_and_reconcile_repairs_each_fault_without_an_agent(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = site(backend);
    let node = &site.t.node;
    let (t, pod) = (&site.t, &site.pod);
    assert!(tool(node, "check").status.code() == Some(1), "up4 is absent: check must say so");
    let rec = tool(node, "reconcile");
    assert_eq!(rec.status.code(), Some(1), "reconcile cannot complete table 103 without up4: {}", text(&rec));
    assert!(text(&rec).contains("up4"), "reconcile must name the absent uplink: {}", text(&rec));

    let (_r4, c4) = bring_up4(node);
    check_names_then_reconcile_repairs(&site, &["table 103"], &c4, UP4, PORT_UP4);

    flap_up2(node);
    check_names_then_reconcile_repairs(
        &site,
        &["missing route 0.0.0.0/0 via 192.0.2.254 dev up2 table 101"],
        &t.client2,
        UP2,
        PORT_UP2,
    );
    pod_outbound_within(&site, Instant::now(), Duration::from_secs(5));

    move_router1(&site);
    check_names_then_reconcile_repairs(
        &site,
        &[&format!("via {ROUTER1_MOVED} dev up1 table 102")],
        &t.client1,
        UP1,
        PORT_UP1,
    );

    wipe_firewall(node);
    let what = match backend {
        Backend::Nftables => "table inet bridge-nat is missing",
        Backend::Iptables => "missing firewall rule",
    };
    check_names_then_reconcile_repairs(&site, &[what, &pod.id], &t.client2, UP2, PORT_UP2);

    delete_ip_rule(node);
    check_names_then_reconcile_repairs(
        &site,
        &["missing ip rule priority 100 fwmark 0x66/0x1fff lookup 102"],
        &t.client1,
        UP1,
        PORT_UP1,
    );

    let again = tool(node, "reconcile");
    assert!(text(&again).contains("nothing to repair"), "a second reconcile must change nothing: {}", text(&again));
    assert!(tool(node, "check").status.success());
    let json = Command::new("ip")
        .args(["netns", "exec", node.ns.name(), bin(), "check", "--json", "--state-dir"])
        .arg(node.state_dir())
        .output()
        .expect("check --json");
    let v: Value = serde_json::from_slice(&json.stdout).expect("check --json prints JSON");
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["attachments"][0]["containerID"], json!(pod.id), "{v}");
}
both_backends!(check_names_and_reconcile_repairs_each_fault_without_an_agent);

/// The agent in a container without privileges sees /proc/sys read-only: the per-interface
/// settings bridge-nat needs are then set over rtnetlink.
fn reconcile_sets_uplink_settings_when_proc_sys_is_read_only(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = site(backend);
    let node = &site.t.node;
    node.ns.sh_ok("sysctl -qw net.ipv4.conf.up1.src_valid_mark=0");
    let script = format!(
        "mount -o bind,ro /proc/sys /proc/sys && ! sh -c 'echo 1 > /proc/sys/net/ipv4/conf/up1/src_valid_mark' 2>/dev/null \
         && {} reconcile --state-dir {} --log-file {}",
        bin(),
        node.state_dir().display(),
        node.log_file().display()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", node.ns.name(), "unshare", "-m", "sh", "-c", &script])
        .output()
        .expect("reconcile under a read-only /proc/sys");
    assert!(text(&out).contains("set sysctl /proc/sys/net/ipv4/conf/up1/src_valid_mark to 1"), "{}", text(&out));
    assert_eq!(node.ns.sh_ok("cat /proc/sys/net/ipv4/conf/up1/src_valid_mark").trim(), "1");
}
both_backends!(reconcile_sets_uplink_settings_when_proc_sys_is_read_only);
