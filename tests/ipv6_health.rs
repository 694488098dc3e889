//! Uplink health per family, with real packets, on the dual-stack node of
//! tests/common/dual_stack.rs (providers that drop foreign sources; wan1's only IPv6 gateway is
//! isp1's link-local router, fe80::1, learnt from its radvd's advertisements). The pods leave by
//! wan1, wan0 is the fallback; the agent probes 203.0.113.10 (`targets`) and 2001:db8:ffff::10
//! (`targets6`) through each uplink, ICMPv6 echo as a frame for the link-local router's MAC.
//!
//! - wan1 without an IPv4 address (an IPv6-only plan) is judged healthy for IPv6: the pods' IPv6
//!   traffic leaves by it, their IPv4 traffic by wan0; CHECK passes (wan1's table has no IPv4
//!   default, and needs none); the router's neighbour entry, deleted, is
//!   solicited again by the next round (sooner than an advertisement would bring it back), and
//!   wan1 stays healthy; isp1 drops everything the node sends
//!   beyond its router: the pods' IPv6 moves to wan0 and comes back when isp1 recovers, and their
//!   IPv4 stays where it was throughout.
//! - wan1 with both families, isp1's IPv6 upstream dark, its IPv4 fine: only the pods' IPv6
//!   source rule moves (the families' rules are separate kernel rules), and comes back.

mod common;

use common::agent::{bin, text, tool, Agent};
use common::dual_stack::*;
use common::uplinks::Pod;
use common::{both_backends, require_root, wait_for, Backend, Background, Netns};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// A TCP server in `inet` on its IPv4 address answering with the IPv4 source it sees.
const PEER_PORT4: u16 = 9002;
const WAN0_V4: &str = "198.51.100.1";
/// Rounds of 300 ms, unhealthy after 2 silent ones, healthy after 2 answered ones.
const INTERVAL_MS: u64 = 300;
/// How long polls wait, with room for a loaded machine; the switches themselves are timed against
/// `detection()` and `recovery()`.
const SWITCH: Duration = Duration::from_secs(10);
const FAIL_AFTER: u64 = 2;
const RECOVER_AFTER: u64 = 2;

/// failAfter × intervalMs + 1 s, as tests/failover.rs holds IPv4 to.
fn detection() -> Duration {
    Duration::from_millis(FAIL_AFTER * INTERVAL_MS + 1000)
}

/// recoverAfter × intervalMs + 1 s.
fn recovery() -> Duration {
    Duration::from_millis(RECOVER_AFTER * INTERVAL_MS + 1000)
}

/// The IPv6 source rule on `table` within `deadline` of `since`; the time it took.
#[track_caller]
fn expect_ipv6_moved_within(site: &Site, table: &str, since: Instant, deadline: Duration) -> Duration {
    let moved = wait_for(|| source_tables(site).1 == table, SWITCH);
    let took = since.elapsed();
    assert!(
        moved && took <= deadline,
        "IPv6 source rule on {table} after {took:?} (deadline {deadline:?})\n{}",
        report(site)
    );
    eprintln!("IPv6 source rule on table {table} after {took:?}");
    took
}

fn serve_peer_address4(inet: &Netns) -> Background {
    inet.spawn(&format!(
        "exec socat TCP4-LISTEN:{PEER_PORT4},bind={INET_V4},reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'"
    ))
}

/// The seed's entry with wan0 as the fallback and probes of both families.
fn health_entry(site: &Site) -> Value {
    let mut entry = site.entry();
    entry["routing"]["outbound"]["fallback"] = json!(["wan0"]);
    entry["routing"]["health"] = json!({ "targets": [INET_V4], "targets6": [INET], "intervalMs": INTERVAL_MS,
                                         "timeoutMs": 200, "failAfter": FAIL_AFTER, "recoverAfter": RECOVER_AFTER });
    entry
}

/// The table each family's source rule of the pods looks up now (table 100 is registered as
/// dind_wan1).
fn source_tables(site: &Site) -> (String, String) {
    let find = |rules: String, from: &str| {
        rules
            .lines()
            .find(|l| l.starts_with("110:") && l.contains(&format!("from {from} ")))
            .and_then(|l| l.split_whitespace().last())
            .map(|t| if t == "dind_wan1" { "100" } else { t }.to_string())
            .unwrap_or_default()
    };
    (find(site.node.ns.sh_ok("ip rule"), "10.20.0.0/24"), find(site.node.ns.sh_ok("ip -6 rule"), "fd00:20::/64"))
}

#[track_caller]
fn expect_tables(site: &Site, v4: &str, v6: &str) {
    let mut last = (String::new(), String::new());
    let ok = wait_for(
        || {
            last = source_tables(site);
            last == (v4.to_string(), v6.to_string())
        },
        SWITCH,
    );
    assert!(ok, "source rules: want IPv4 {v4}, IPv6 {v6}; got {last:?}\n{}", report(site));
}

/// Where the pods leave by, in both families: the tables of their source rules, and the
/// addresses the internet sees.
#[track_caller]
fn expect_egress(site: &Site, pod: &Pod, (table4, from4): (&str, &str), (table6, from6): (&str, &str)) {
    expect_tables(site, table4, table6);
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(from6));
    site.expect_reply(&pod.ns, INET_V4, PEER_PORT4, from4);
}

fn report(site: &Site) -> String {
    let health = std::fs::read_to_string(site.node.state_dir().join("health.json")).unwrap_or_default();
    format!("--- health.json\n{health}\n--- list\n{}\n{}", text(&tool(&site.node, "list")), site.diagnostics())
}

/// `check --json`: the uplink's verdict in a family.
fn family_healthy(site: &Site, uplink: &str, family: &str) -> Value {
    let out = Command::new("ip")
        .args(["netns", "exec", site.node.ns.name(), bin(), "check", "--json", "--state-dir"])
        .arg(site.node.state_dir())
        .output()
        .expect("check --json");
    let json: Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    let found = json["uplinks"].as_array().into_iter().flatten().find(|u| u["uplink"] == uplink).cloned();
    found.map_or(Value::Null, |u| u[family]["healthy"].clone())
}

/// `bridge-nat list` shows `line` (white space squeezed) within a switch's time.
#[track_caller]
fn expect_listed(site: &Site, line: &str) {
    let mut list = String::new();
    let squeeze = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let shown = wait_for(
        || {
            list = text(&tool(&site.node, "list"));
            list.lines().any(|l| squeeze(l).starts_with(line))
        },
        SWITCH,
    );
    assert!(shown, "bridge-nat list has no line {line:?}:\n{list}");
}

/// What a test runs on.
struct Running {
    site: Site,
    conf: std::path::PathBuf,
    pod: Pod,
    _agent: Agent,
    _servers: [Background; 2],
}

impl Running {
    /// CNI CHECK of the pod passes: a failover, in one family or both, is no defect.
    #[track_caller]
    fn expect_check_passes(&self, when: &str) {
        self.pod.cni(&self.site.node, "check", &self.conf).assert_ok(&format!("CHECK {when}"));
    }
}

/// Node, pod (both families), the servers and the agent, with `prepare` run on the node first.
fn start(backend: Backend, prepare: &str) -> Option<Running> {
    if !require_root() {
        return None;
    }
    let site = Site::new(backend);
    site.node.ns.sh_ok(prepare);
    let conf = site.conflist(health_entry(&site), true, true);
    let pod = Pod::add(&site.node, &conf, "a");
    site.settle();
    let agent = Agent::start(&site.node);
    let servers = [serve_peer_address(&site.inet), serve_peer_address4(&site.inet)];
    Some(Running { site, conf, pod, _agent: agent, _servers: servers })
}

fn an_ipv6_only_uplink_carries_the_pods_ipv6_and_fails_over_in_ipv6_alone(backend: Backend) {
    // wan1 loses its IPv4 address (and so its IPv4 default); the kernel's entry for the
    // advertised router is deleted, so the first probes must have it resolved.
    let prepare = "ip -4 addr flush dev wan1 && ip -6 neigh del fe80::1 dev wan1 || true";
    let Some(run) = start(backend, prepare) else { return };
    let (site, pod) = (&run.site, &run.pod);
    assert!(site.default_via_ra(), "wan1's IPv6 gateway is the advertised link-local router\n{}", report(site));
    assert!(!site.node.ns.sh_ok("ip -4 addr show dev wan1").contains("inet "), "wan1 has no IPv4 address");

    expect_listed(site, "uplink wan1 healthy IPv4: no IPv4 address; IPv6: answering");
    expect_listed(site, "egress dind: pods leave by wan0 for IPv4, wan1 for IPv6");
    expect_egress(site, pod, ("101", WAN0_V4), ("100", WAN1));
    assert_eq!(family_healthy(site, "wan1", "ipv6"), json!(true), "{}", report(site));
    assert_eq!(family_healthy(site, "wan1", "ipv4"), json!(false), "{}", report(site));
    // wan1 has no IPv4, so its table's missing IPv4 default is nothing missing.
    run.expect_check_passes("with an IPv6-only primary");
    assert!(!site.node.log().contains("uplink wan1 of table 100 has no gateway"), "{}", site.node.log());

    // The router's neighbour entry gone (expired, flushed): the next round has the kernel solicit
    // it, well before the router's next advertisement (every 3-4 s) would bring it back. Three
    // times, so that an advertisement cannot stand in for the solicitation each time.
    for _ in 0..3 {
        site.node.ns.sh_ok("ip -6 neigh del fe80::1 dev wan1");
        let resolved = || site.node.ns.sh_ok("ip -6 neigh show fe80::1 dev wan1").contains("lladdr");
        assert!(wait_for(resolved, Duration::from_millis(3 * INTERVAL_MS)), "fe80::1 not resolved\n{}", report(site));
        std::thread::sleep(Duration::from_millis(INTERVAL_MS));
    }
    assert!(!site.node.log().contains("uplink wan1 is unhealthy"), "wan1 failed:\n{}", site.node.log());

    // isp1 drops everything the node sends beyond its router; wan1's link stays up.
    site.isp1.sh_ok("ip6tables -I FORWARD -i wan -j DROP");
    expect_ipv6_moved_within(site, "101", Instant::now(), detection());
    expect_egress(site, pod, ("101", WAN0_V4), ("101", WAN0));
    expect_listed(site, "uplink wan1 unhealthy");
    run.expect_check_passes("with the pods' IPv6 failed over");
    let log = site.node.log();
    assert!(log.contains("uplink wan1 is unhealthy for IPv6"), "switch not logged:\n{log}");
    assert!(log.contains("uplink wan1 carries no IPv4"), "wan1's missing IPv4 not said:\n{log}");
    assert!(!log.contains("uplink wan0 is unhealthy"), "wan0 was judged unhealthy:\n{log}");

    site.isp1.sh_ok("ip6tables -D FORWARD 1");
    expect_ipv6_moved_within(site, "100", Instant::now(), recovery());
    expect_egress(site, pod, ("101", WAN0_V4), ("100", WAN1));
}

fn a_dark_ipv6_provider_moves_only_the_pods_ipv6(backend: Backend) {
    let Some(run) = start(backend, "true") else { return };
    let (site, pod) = (&run.site, &run.pod);
    expect_listed(site, "uplink wan1 healthy IPv4: answering; IPv6: answering");
    expect_egress(site, pod, ("100", WAN1_V4), ("100", WAN1));

    // isp1's IPv6 goes dark; its IPv4 still carries everything.
    site.isp1.sh_ok("ip6tables -I FORWARD -i wan -j DROP");
    expect_ipv6_moved_within(site, "101", Instant::now(), detection());
    expect_egress(site, pod, ("100", WAN1_V4), ("101", WAN0));
    expect_listed(site, "egress dind: pods leave by wan1 for IPv4, wan0 for IPv6");
    assert_eq!(family_healthy(site, "wan1", "ipv6"), json!(false), "{}", report(site));
    assert_eq!(family_healthy(site, "wan1", "ipv4"), json!(true), "{}", report(site));
    run.expect_check_passes("with only the pods' IPv6 failed over");
    // Several rounds later, IPv4 has not moved.
    std::thread::sleep(Duration::from_millis(4 * INTERVAL_MS));
    assert_eq!(source_tables(site), ("100".into(), "101".into()), "{}", report(site));
    site.expect_reply(&pod.ns, INET_V4, PEER_PORT4, WAN1_V4);

    site.isp1.sh_ok("ip6tables -D FORWARD 1");
    expect_ipv6_moved_within(site, "100", Instant::now(), recovery());
    expect_egress(site, pod, ("100", WAN1_V4), ("100", WAN1));
}

both_backends!(
    an_ipv6_only_uplink_carries_the_pods_ipv6_and_fails_over_in_ipv6_alone,
    a_dark_ipv6_provider_moves_only_the_pods_ipv6
);
