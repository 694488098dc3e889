//! Health-checked egress failover (issue 21) with real packets, both backends, the agent running
//! as a real process. The topology of tests/common/providers.rs: the pods' own traffic leaves by
//! wan1 (`routing.outbound.interface`), wan0 is its `fallback`; main prefers wan0; strict
//! rp_filter; each provider drops sources that are not its customer's address, and isp1 can cut
//! its upstream while wan1's link stays up. Health: one target, 300 ms rounds, 200 ms timeout,
//! unhealthy after 3 silent rounds, healthy after 3 answered ones.
//!
//! What is asserted, as the "Tests" section lists it:
//!   - the pods' TCP egress and a UDP session (one source port throughout) leave by wan1;
//!   - isp1 black-holes its upstream: egress by wan0 within failAfter × intervalMs + 1 s (and not
//!     sooner than failAfter − 1 rounds less half an interval), the session's first datagram after
//!     the switch is answered from wan0's address; CHECK passes; `list` and `check --json` show
//!     wan1 unhealthy and the pods leaving by wan0; an ADD meanwhile routes the new pod by wan0 at
//!     once, and leaves the other pods there;
//!   - isp1 recovers: egress and the session back on wan1 within recoverAfter × intervalMs + 1 s
//!     (not sooner than recoverAfter − 1 rounds less half an interval);
//!   - wan1's link goes down: the pods' source rule on wan0's table within 1 s (egress by wan0
//!     alone proves nothing: main's default is wan0); link and DHCP default back: wan1 within
//!     recoverAfter × intervalMs + 2 s;
//!   - the forward WAN1:30081 is answered through wan1 by the client on isp1's network before,
//!     during the upstream cut and after;
//!   - health written by a SIGKILLed agent is not trusted by the next ADD (wan1 is used);
//!   - DEL of every pod with the agent stopped leaves the node as before the first ADD.

mod common;

use common::agent::{bin, text, tool, Agent};
use common::providers::*;
use common::uplinks::{diagnostics, Pod, REPLY_TIMEOUT};
use common::{both_backends, require_root, wait_for, Backend, Background};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The pod's UDP session: every datagram from this source port.
const SESSION_PORT: u16 = 40000;
/// One polling attempt's connect timeout.
const TRY: Duration = Duration::from_millis(300);
/// How long one datagram or connection that must be answered at once may take.
const AT_ONCE: Duration = Duration::from_millis(1500);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// failAfter × intervalMs + 1 s: the detection deadline.
fn detection_deadline() -> Duration {
    ms(FAIL_AFTER * INTERVAL_MS + 1000)
}

/// recoverAfter × intervalMs + 1 s.
fn recovery_deadline() -> Duration {
    ms(RECOVER_AFTER * INTERVAL_MS + 1000)
}

/// Sooner than `rounds` rounds can take (less half an interval of timer slack): a switch by then
/// did not wait for them.
fn too_soon(rounds: u64) -> Duration {
    ms((rounds - 1) * INTERVAL_MS - INTERVAL_MS / 2)
}

struct Site {
    p: Providers,
    conf: PathBuf,
    /// `web` (FIRST_POD, serving the forward) first.
    pods: Vec<Pod>,
    /// The node before the first ADD.
    before: String,
    _server: Background,
}

/// The topology, one pod serving the forward, and the agent; the baseline asserted: egress and the
/// session by wan1, the forward answered, the pod rule on the primary's table.
fn site(backend: Backend) -> (Site, Agent) {
    let p = Providers::new(backend);
    p.warm_up();
    let before = p.node.snapshot();
    let conf = p.conflist();
    let web = Pod::add(&p.node, &conf, "web");
    assert_eq!(web.ipv4(), FIRST_POD, "the forward's destIP assumes host-local's first address");
    let server = web.serve();
    let agent = Agent::start(&p.node);
    let site = Site { p, conf, pods: vec![web], before, _server: server };
    // Servers start in the background: the first answers may take a moment.
    let web = &site.pods[0];
    egress_within(&site, web, WAN1, Instant::now(), REPLY_TIMEOUT);
    session_within(&site, WAN1, Instant::now(), REPLY_TIMEOUT);
    forward_within(&site, Instant::now(), REPLY_TIMEOUT);
    assert_eq!(site.p.pod_rule_table(), TABLE.to_string(), "pod rule before any fault\n{}", report(&site));
    // Both uplinks answered for recoverAfter rounds before any fault.
    std::thread::sleep(ms((RECOVER_AFTER + 1) * INTERVAL_MS));
    (site, agent)
}

// ---------------------------------------------------------------- polling

/// Polls the pod's TCP egress until the internet sees `want` as its source, on a connection
/// started within `deadline` after `since`; returns how long after `since` the answer came (an
/// upper bound of when the egress moved).
#[track_caller]
fn egress_within(s: &Site, pod: &Pod, want: &str, since: Instant, deadline: Duration) -> Duration {
    let mut last = None;
    let got = wait_for(
        || {
            let started = since.elapsed();
            last = tcp_source(&pod.ns, TRY);
            last.as_deref() == Some(want) && started <= deadline
        },
        deadline.saturating_sub(since.elapsed()),
    );
    if got {
        return since.elapsed();
    }
    panic!("[{}] egress not from {want} within {deadline:?} (last: {last:?})\n{}", pod.id, report(s));
}

/// Polls the UDP session of the first pod until the server sees `want` (baseline only: after a
/// switch the first datagram must already be answered, see [`first_datagram`]).
#[track_caller]
fn session_within(s: &Site, want: &str, since: Instant, deadline: Duration) {
    let mut last = None;
    let got = wait_for(
        || {
            last = udp_source(&s.pods[0].ns, SESSION_PORT, ms(500));
            last.as_deref() == Some(want)
        },
        deadline.saturating_sub(since.elapsed()),
    );
    if got {
        return;
    }
    panic!("UDP session not from {want} within {deadline:?} (last: {last:?})\n{}", report(s));
}

/// One datagram of the session; it must be answered, with the server seeing `want`.
#[track_caller]
fn first_datagram(s: &Site, want: &str, when: &str) {
    let got = udp_source(&s.pods[0].ns, SESSION_PORT, AT_ONCE);
    assert_eq!(got.as_deref(), Some(want), "{when}: the session's first datagram\n{}", report(s));
}

/// The client on isp1's network is answered by the pod through WAN1:30081.
#[track_caller]
fn forward_within(s: &Site, since: Instant, deadline: Duration) {
    let mut last = None;
    let got = wait_for(
        || {
            last = forward_answer(&s.p.client, ms(1000));
            last.as_deref() == Some("pod")
        },
        deadline.saturating_sub(since.elapsed()),
    );
    if got {
        return;
    }
    panic!("forward {WAN1}:{FORWARD_PORT} not answered within {deadline:?} (last: {last:?})\n{}", report(s));
}

/// The conntrack entry of the pod's UDP session, as `conntrack -L` prints it.
fn session_entry(s: &Site) -> String {
    s.p.node.ns.sh_ok(&format!("conntrack -L -p udp --orig-port-src {SESSION_PORT} 2>/dev/null"))
}

/// Diagnostics plus what the agent last wrote about health.
fn report(s: &Site) -> String {
    let health = std::fs::read_to_string(s.p.node.state_dir().join("health.json"));
    format!(
        "--- health.json\n{}\n--- session\n{}\n{}",
        health.unwrap_or_else(|e| format!("<{e}>")),
        session_entry(s),
        diagnostics(&s.p.node)
    )
}

/// Polls until the pod subnet's rule looks up `table`; returns how long after `since` it did.
#[track_caller]
fn pod_rule_within(s: &Site, table: u32, since: Instant, deadline: Duration) -> Duration {
    let got = wait_for(|| s.p.pod_rule_table() == table.to_string(), deadline.saturating_sub(since.elapsed()));
    assert!(got, "the pod subnet's rule does not look up {table} within {deadline:?}\n{}", report(s));
    since.elapsed()
}

#[track_caller]
fn assert_pod_rule(s: &Site, table: u32, when: &str) {
    assert_eq!(s.p.pod_rule_table(), table.to_string(), "{when}: the pod subnet's rule\n{}", report(s));
}

/// CHECK of every pod through the driver, and `bridge-nat check`, pass.
#[track_caller]
fn assert_check_passes(s: &Site, when: &str) {
    for pod in &s.pods {
        let out = pod.cni(&s.p.node, "check", &s.conf);
        assert!(out.status_ok, "{when}: CHECK {} failed: {}{}\n{}", pod.id, out.stdout, out.stderr, report(s));
    }
    let check = tool(&s.p.node, "check");
    assert!(check.status.success(), "{when}: bridge-nat check: {}\n{}", text(&check), report(s));
}

/// `bridge-nat list` and `check --json` show wan1's health and the uplink the pods leave by.
#[track_caller]
fn assert_egress_shown(s: &Site, wan1_healthy: bool, by: &str) {
    let list = text(&tool(&s.p.node, "list"));
    let health = if wan1_healthy { "healthy" } else { "unhealthy" };
    let shown = |words: &[&str]| list.lines().any(|l| l.split_whitespace().take(words.len()).eq(words.iter().copied()));
    assert!(shown(&["uplink", "wan1", health]), "bridge-nat list does not show wan1 {health}:\n{list}");
    assert!(shown(&["uplink", "wan0", "healthy"]), "bridge-nat list does not show wan0 healthy:\n{list}");
    assert!(shown(&["egress", "dind:", "pods", "leave", "by", by]), "bridge-nat list: pods not by {by}:\n{list}");
    let out = Command::new("ip")
        .args(["netns", "exec", s.p.node.ns.name(), bin(), "check", "--json", "--state-dir"])
        .arg(s.p.node.state_dir())
        .output()
        .expect("check --json");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    let uplink = |name: &str| json["uplinks"].as_array().into_iter().flatten().find(|u| u["uplink"] == name).cloned();
    assert_eq!(uplink("wan1").map(|u| u["healthy"].clone()), Some(wan1_healthy.into()), "check --json: {json:#}");
    assert_eq!(uplink("wan0").map(|u| u["healthy"].clone()), Some(true.into()), "check --json: {json:#}");
    assert_eq!(json["egress"][0]["network"], "dind", "check --json: {json:#}");
    assert_eq!(json["egress"][0]["uplink"], by, "check --json: {json:#}");
}

/// The agent stopped, DEL of every pod leaves the node as before the first ADD.
fn del_all_leaves_the_node_as_before(s: Site) {
    for pod in &s.pods {
        pod.cni(&s.p.node, "del", &s.conf).assert_ok(&format!("DEL {}", pod.id));
    }
    // Sorted: a link that went down and up lists its IPv6 multicast route after the others'.
    let sorted = |snap: &str| {
        let mut lines: Vec<&str> = snap.lines().collect();
        lines.sort_unstable();
        lines.join("\n")
    };
    let after = s.p.node.snapshot();
    assert!(
        sorted(&after) == sorted(&s.before),
        "the node after DEL differs from before the first ADD:\n{}\n--- log\n{}",
        diff(&s.before, &after),
        s.p.node.log()
    );
}

fn diff(before: &str, after: &str) -> String {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let gone = b.iter().filter(|l| !a.contains(l)).map(|l| format!("- {l}"));
    let new = a.iter().filter(|l| !b.contains(l)).map(|l| format!("+ {l}"));
    gone.chain(new).collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------- tests

fn upstream_cut_moves_egress_and_the_session_to_the_fallback_and_back(backend: Backend) {
    if !require_root() {
        return;
    }
    let (mut s, mut agent) = site(backend);
    let entry = session_entry(&s);
    assert!(entry.contains(&format!("dst={WAN1}")), "the session is masqueraded to wan1's address: {entry}");

    s.p.isp1.cut_upstream();
    let t0 = Instant::now();
    let detection = egress_within(&s, &s.pods[0], WAN0, t0, detection_deadline());
    assert!(detection >= too_soon(FAIL_AFTER), "switched after {detection:?}, before failAfter rounds");
    assert_pod_rule(&s, TABLE + 1, "failed over");
    first_datagram(&s, WAN0, "failed over");
    forward_within(&s, Instant::now(), AT_ONCE);
    assert_check_passes(&s, "failed over");
    assert_egress_shown(&s, false, "wan0");
    let log = s.p.node.log();
    assert!(log.contains("uplink wan1 is unhealthy") && log.contains("leaves by wan0"), "switch not logged:\n{log}");

    // A pod started meanwhile leaves by wan0 at once; the ADD does not move the others back.
    let late = Pod::add(&s.p.node, &s.conf, "late");
    assert_pod_rule(&s, TABLE + 1, "right after an ADD while failed over");
    for pod in [&late, &s.pods[0]] {
        let got = tcp_source(&pod.ns, AT_ONCE);
        assert_eq!(got.as_deref(), Some(WAN0), "[{}] egress right after the ADD\n{}", pod.id, report(&s));
    }
    s.pods.push(late);
    assert_check_passes(&s, "failed over, after the ADD");

    s.p.isp1.restore_upstream();
    let t0 = Instant::now();
    let recovery = egress_within(&s, &s.pods[0], WAN1, t0, recovery_deadline());
    assert!(recovery >= too_soon(RECOVER_AFTER), "back after {recovery:?}, before recoverAfter rounds");
    assert_pod_rule(&s, TABLE, "recovered");
    first_datagram(&s, WAN1, "recovered");
    egress_within(&s, &s.pods[1], WAN1, Instant::now(), AT_ONCE);
    forward_within(&s, Instant::now(), AT_ONCE);
    assert_check_passes(&s, "recovered");
    assert_egress_shown(&s, true, "wan1");
    eprintln!("upstream cut ({backend:?}): fallback after {detection:?}, primary again after {recovery:?}");

    agent.signal("-TERM");
    assert!(agent.wait().success(), "SIGTERM must end the agent cleanly");
    del_all_leaves_the_node_as_before(s);
}
both_backends!(upstream_cut_moves_egress_and_the_session_to_the_fallback_and_back);

fn primary_link_down_moves_egress_at_once_and_back_after_recovery(backend: Backend) {
    if !require_root() {
        return;
    }
    let (s, mut agent) = site(backend);
    let node = &s.p.node;

    // Without the switch, the pods' traffic would reach main's default (wan0) only by accident,
    // through a table 100 the kernel emptied: the rule is what tells.
    node.ns.sh_ok("ip link set wan1 down");
    let t0 = Instant::now();
    let detection = pod_rule_within(&s, TABLE + 1, t0, ms(1000));
    egress_within(&s, &s.pods[0], WAN0, t0, ms(1000));
    first_datagram(&s, WAN0, "wan1 down");

    // The link and its DHCP default come back. A second more than after an upstream cut: the
    // gateway's MAC is learnt again before a probe can leave.
    node.ns.sh_ok(&format!("ip link set wan1 up && ip route replace default via {ISP1} dev wan1 metric 200"));
    let t0 = Instant::now();
    let recovery = egress_within(&s, &s.pods[0], WAN1, t0, recovery_deadline() + ms(1000));
    assert!(recovery >= too_soon(RECOVER_AFTER), "back after {recovery:?}, before recoverAfter rounds");
    assert_pod_rule(&s, TABLE, "wan1 back");
    first_datagram(&s, WAN1, "wan1 back");
    forward_within(&s, Instant::now(), AT_ONCE);
    assert_check_passes(&s, "wan1 back");
    eprintln!("link down ({backend:?}): fallback after {detection:?}, primary again after {recovery:?}");

    agent.signal("-TERM");
    assert!(agent.wait().success(), "SIGTERM must end the agent cleanly");
    del_all_leaves_the_node_as_before(s);
}
both_backends!(primary_link_down_moves_egress_at_once_and_back_after_recovery);

fn health_written_by_a_killed_agent_is_not_trusted(backend: Backend) {
    if !require_root() {
        return;
    }
    let (mut s, agent) = site(backend);
    let health = s.p.node.state_dir().join("health.json");

    s.p.isp1.cut_upstream();
    egress_within(&s, &s.pods[0], WAN0, Instant::now(), detection_deadline());
    assert!(health.exists(), "the agent writes {}", health.display());
    agent.signal("-KILL");
    drop(agent);
    s.p.isp1.restore_upstream();

    // The file still says wan1 is unhealthy, but its writer is gone: the ADD uses wan1.
    let late = Pod::add(&s.p.node, &s.conf, "late");
    assert_pod_rule(&s, TABLE, "ADD after the agent was killed");
    for pod in [&late, &s.pods[0]] {
        let got = tcp_source(&pod.ns, AT_ONCE);
        assert_eq!(got.as_deref(), Some(WAN1), "[{}] egress after the ADD\n{}", pod.id, report(&s));
    }
    s.pods.push(late);
    del_all_leaves_the_node_as_before(s);
}
both_backends!(health_written_by_a_killed_agent_is_not_trusted);
