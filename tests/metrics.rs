//! The agent's metrics as a fleet sees them: a real Prometheus (Debian's) in the node namespace
//! scrapes `bridge-nat watch --metrics` every second, and its query API finds the attachments
//! and forwards the records list, a repair counted after a route is wiped, and an uplink's health
//! going to 0 and back with the pods' egress following. And the server cannot be used against the
//! agent: scrapers that connect and say nothing, or send a 1 MiB request, do not delay a repair.
//! Real agent process, real kernel events, real packets.

mod common;

use common::agent::{text, tool, Agent};
use common::prometheus::{require_tool, Prometheus};
use common::uplinks::*;
use common::{both_backends, require_root, Backend, Background, Netns, Node, NETWORK_NAME};
use std::time::{Duration, Instant};

/// Where the agent serves, in the node namespace.
const METRICS: &str = "127.0.0.1:9469";
/// What the agent issue asks of a repair.
const REPAIR_DEADLINE: Duration = Duration::from_secs(2);
/// Scrapes every second: a few of them.
const SEEN_WITHIN: Duration = Duration::from_secs(15);

/// The node of tests/agent.rs: two uplinks, strict rp_filter, one pod answering on both ports.
fn site(backend: Backend) -> (Topology, Pod, Background) {
    let t = Topology::new(backend);
    t.strict_rp_filter();
    let conf = t.conflist(two_uplink_entry(&t.node));
    let pod = Pod::add(&t.node, &conf, "web");
    let server = pod.serve();
    expect_reply(&t.node, &t.client2, UP2, PORT_UP2, "pod");
    (t, pod, server)
}

/// Wipe up2's tables (pod traffic and port 30080's replies), then the time until client2 is
/// answered through up2 again.
#[track_caller]
fn repair_latency(t: &Topology) -> Duration {
    t.node.ns.sh_ok("ip route flush table 100 && ip route flush table 101");
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < REPAIR_DEADLINE {
        let out = t.client2.sh(&format!("socat -T1 - TCP:{UP2}:{PORT_UP2},connect-timeout=0.4 </dev/null"));
        last = text(&out);
        if out.status.success() && last.lines().any(|l| l.trim() == "pod") {
            return t0.elapsed();
        }
    }
    panic!("no answer on up2 within {REPAIR_DEADLINE:?} of the flush (last: {last:?})\n{}", diagnostics(&t.node));
}

/// `curl` of the agent's `path` in the node namespace: (HTTP status, body).
fn fetch(node: &Node, path: &str) -> (String, String) {
    let out = node.ns.exec(&["curl", "-s", "-m", "3", "-w", "\n%{http_code}", &format!("http://{METRICS}{path}")]);
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
    (code.to_string(), body.to_string())
}

fn prometheus_finds_the_attachments_and_a_repair(backend: Backend) {
    if !require_root() {
        return;
    }
    let (t, pod, _server) = site(backend);
    let node = &t.node;
    let _agent = Agent::start_with(node, &["--metrics", METRICS]);
    let prom = Prometheus::start(node, METRICS);

    let forwards =
        node.record(&pod.id, "eth0").expect("the pod's record")["forwards"].as_array().expect("forwards").len();
    assert!(forwards >= 2, "the record lists {forwards} forwards");
    let ours = |m: &serde_json::Value| {
        m["network"] == NETWORK_NAME && m["backend"] == backend.name() && m["status"] == "applied"
    };
    prom.wait_for_series("bridge_nat_attachments", SEEN_WITHIN, |m, v| ours(m) && v == 1.0);
    prom.wait_for_series("bridge_nat_forwards", SEEN_WITHIN, |m, v| ours(m) && v == forwards as f64);
    prom.wait_for_series("up{job=\"bridge-nat\"}", SEEN_WITHIN, |_, v| v == 1.0);
    let version = env!("CARGO_PKG_VERSION");
    prom.wait_for_series("bridge_nat_build_info", SEEN_WITHIN, |m, v| m["version"] == version && v == 1.0);

    let kind_route = "bridge_nat_repairs_total{kind=\"route\"}";
    let before = prom.wait_for_series(kind_route, SEEN_WITHIN, |_, _| true);
    let took = repair_latency(&t);
    eprintln!("repaired in {took:?} ({backend:?})");
    let after = prom.wait_for_series(kind_route, SEEN_WITHIN, |_, v| v > before);
    eprintln!("route repairs seen by prometheus: {before} -> {after}");
    prom.wait_for_series("bridge_nat_pass_duration_seconds_count{pass=\"check\"}", SEEN_WITHIN, |_, v| v >= 1.0);
    prom.wait_for_series("time() - bridge_nat_last_success_timestamp_seconds", SEEN_WITHIN, |_, v| v < 30.0);

    let (code, body) = fetch(node, "/healthz");
    assert_eq!(code, "200", "healthz: {body}");
    let check = tool(node, "check");
    assert!(check.status.success(), "the node is not right afterwards: {}", text(&check));
}
both_backends!(prometheus_finds_the_attachments_and_a_repair);

/// `count` shell loops in `ns`, each running `script` over and over, a little apart so that the
/// loops themselves do not take the machine's CPU from the agent.
fn hostile_loops(ns: &Netns, count: usize, script: &str) -> Vec<Background> {
    (0..count).map(|_| ns.spawn(&format!("while :; do {script}; sleep 0.05; done"))).collect()
}

/// Scrapers that connect and send nothing, and ones that send a 1 MiB request, hold every slot
/// of the server over and over while a route is wiped: the repair takes no longer than without
/// them, and the server answers again once they are gone.
fn hostile_scrapers_do_not_delay_a_repair(backend: Backend) {
    if !require_root() {
        return;
    }
    require_tool("curl");
    require_tool("nc");
    let (t, _pod, _server) = site(backend);
    let node = &t.node;
    let _agent = Agent::start_with(node, &["--metrics", METRICS]);
    std::thread::sleep(Duration::from_millis(1500));
    let quiet = repair_latency(&t);

    let (host, port) = METRICS.split_once(':').expect("host:port");
    // What each of them gets: an idle connection is closed after 2 s (408), a 1 MiB request after
    // its first 4 KiB (431).
    let t0 = Instant::now();
    let idle = node.ns.sh(&format!("nc -d -w 5 {host} {port}"));
    let idle_closed = t0.elapsed();
    assert!(text(&idle).starts_with("HTTP/1.1 408"), "an idle connection got: {}", text(&idle));
    assert!(idle_closed < Duration::from_secs(4), "an idle connection was held {idle_closed:?}");
    let big = format!(
        "{{ printf 'GET /metrics HTTP/1.1\\r\\nX-Pad: '; head -c 1048576 /dev/zero | tr '\\\\0' a; }} | nc -w 5 {host} {port}"
    );
    let refused = text(&node.ns.sh(&big));
    assert!(refused.starts_with("HTTP/1.1 431"), "a 1 MiB request got: {refused:?}");

    let hostile: Vec<Background> = [
        hostile_loops(&node.ns, 6, &format!("nc -d -w 5 {host} {port} >/dev/null 2>&1")),
        hostile_loops(&node.ns, 2, &format!("{big} >/dev/null 2>&1")),
    ]
    .into_iter()
    .flatten()
    .collect();
    std::thread::sleep(Duration::from_millis(500));
    let besieged = repair_latency(&t);
    eprintln!("repair latency ({backend:?}): {quiet:?} without hostile scrapers, {besieged:?} with them");
    drop(hostile);

    let mut last = (String::new(), String::new());
    let back = common::wait_for(
        || {
            last = fetch(node, "/metrics");
            last.0 == "200" && last.1.contains("bridge_nat_repairs_total{kind=\"route\"}")
        },
        Duration::from_secs(5),
    );
    assert!(back, "the server does not answer after the hostile scrapers left: {last:?}");
    assert_eq!(fetch(node, "/").0, "404");
    let check = tool(node, "check");
    assert!(check.status.success(), "the node is not right afterwards: {}", text(&check));
}
both_backends!(hostile_scrapers_do_not_delay_a_repair);

/// Uplink health as a fleet sees it: up2 (the pods' primary, up1 the fallback) goes down and comes
/// back; Prometheus sees its health go to 0 and back to 1, each transition counted, the pods'
/// egress move to up1 and back, and probes answered with a round-trip time.
#[test]
fn prometheus_sees_an_uplink_fail_over_and_recover() {
    if !require_root() {
        return;
    }
    let t = Topology::new(Backend::Nftables);
    let mut e = two_uplink_entry(&t.node);
    e["routing"]["outbound"]["fallback"] = serde_json::json!(["up1"]);
    // Each router answers pings through its own uplink only.
    e["routing"]["health"] = serde_json::json!({
        "targets": [ROUTER1, ROUTER2], "intervalMs": 200, "timeoutMs": 150, "failAfter": 2, "recoverAfter": 2
    });
    let conf = t.conflist(e);
    let _pod = Pod::add(&t.node, &conf, "web");
    let node = &t.node;
    let _agent = Agent::start_with(node, &["--metrics", METRICS]);
    let prom = Prometheus::start(node, METRICS);
    let health = |uplink: &str, want: f64| {
        prom.wait_for_series("bridge_nat_uplink_healthy", SEEN_WITHIN, |m, v| m["uplink"] == uplink && v == want)
    };
    let egress = |uplink: &str| {
        let q = "bridge_nat_network_egress_uplink";
        prom.wait_for_series(q, SEEN_WITHIN, |m, v| m["network"] == NETWORK_NAME && m["uplink"] == uplink && v == 1.0)
    };
    let transitions = |to: &str| {
        let q = format!("bridge_nat_uplink_transitions_total{{uplink=\"up2\",to=\"{to}\"}}");
        prom.wait_for_series(&q, SEEN_WITHIN, |_, v| v == 1.0)
    };
    health("up1", 1.0);
    health("up2", 1.0);
    egress("up2");
    let answered = "bridge_nat_uplink_probes_total{uplink=\"up2\",result=\"answered\"}";
    prom.wait_for_series(answered, SEEN_WITHIN, |_, v| v >= 1.0);
    let rtt = "bridge_nat_uplink_probe_rtt_seconds_sum{uplink=\"up2\"} / bridge_nat_uplink_probe_rtt_seconds_count";
    let rtt = prom.wait_for_series(rtt, SEEN_WITHIN, |_, v| v > 0.0 && v < 0.15);
    eprintln!("up2's mean probe round trip: {:.2} ms", rtt * 1000.0);

    node.ns.sh_ok("ip link set up2 down");
    health("up2", 0.0);
    egress("up1");
    transitions("unhealthy");

    node.ns.sh_ok(&format!("ip link set up2 up && ip route replace default via {ROUTER2} dev up2 metric 200"));
    health("up2", 1.0);
    egress("up2");
    transitions("healthy");
}
