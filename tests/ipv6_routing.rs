//! IPv6 gets the same multi-uplink policy routing as IPv4, with real packets, on the dual-stack
//! node of tests/common/dual_stack.rs (providers that drop foreign sources, wan0 preferred in main,
//! wan1's gateway from router advertisements, an IPv4-only modem).

mod common;

use common::agent::{text, tool, Agent};
use common::dual_stack::*;
use common::uplinks::Pod;
use common::{both_backends, require_root, wait_for, Backend};
use serde_json::json;
use std::time::Duration;

fn ipv6_clients_are_answered_by_their_arrival_uplink(backend: Backend) {
    let Some((site, conf, pod, _srv)) = site_with_pod(backend, true, true) else { return };
    expect_arrival_marks(&site, &[PLAIN, VIA_WAN0]);
    site.expect_reply(&site.inet, WAN1_V4, PLAIN, "pod");
    // Rules and tables of both families, the same marks and ids.
    let rules6 = site.node.ns.sh_ok("ip -6 rule");
    for want in [
        "100:\tfrom all fwmark 0x64/0x1fff lookup dind_wan1",
        "100:\tfrom all fwmark 0x65/0x1fff lookup 101",
        "100:\tfrom all fwmark 0x66/0x1fff lookup 102",
        "109:\tfrom fd00:20::/64 lookup main suppress_prefixlength 0",
        "110:\tfrom fd00:20::/64 lookup dind_wan1",
    ] {
        assert!(rules6.contains(want), "ip -6 rule lacks {want:?}:\n{rules6}");
    }
    let table = |t: u32| site.node.ns.sh_ok(&format!("ip -6 route show table {t}"));
    assert!(table(100).contains("default via fe80::1 dev wan1"), "{}", table(100));
    assert!(table(100).contains("2001:db8:b::/64 dev wan1"), "{}", table(100));
    assert!(!table(100).contains("fe80::/64"), "{}", table(100));
    assert!(table(101).contains("default via 2001:db8:a::ff dev wan0"), "{}", table(101));
    // The IPv4-only modem's table has the pods' range and no IPv6 default, and that is no problem.
    assert!(table(102).contains("fd00:20::/64 dev dind-br0") && !table(102).contains("default"), "{}", table(102));
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK");
    // The pods' own IPv6 traffic leaves by routing.outbound (wan1), masqueraded to its address.
    let _peer = serve_peer_address(&site.inet);
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(WAN1));
    // The dual-stack listener sees IPv4 peers as IPv4-mapped addresses.
    site.expect_reply(&pod.ns, INET_V4, PEER_PORT, &socat_form(&format!("::ffff:{WAN1_V4}")));
    // list shows the IPv6 forwards routed by arrival.
    let listed = text(&tool(&site.node, "list"));
    assert!(listed.contains("fd00:20::"), "{listed}");
    assert!(!listed.contains("main table"), "an IPv6 forward listed as unrouted:\n{listed}");
}

/// Reverse-path filtering as firewalld sets it (`fib saddr . mark . iif oif missing drop` in filter
/// prerouting, after bridge-nat has picked or restored the connection's mark): clients through
/// either provider are answered, and the filter drops none of their TCP packets nor the pod's
/// replies. The same filter at raw priority, before any mark, judges by main alone, whose preferred
/// default leaves by wan0: a client through wan1 is dropped there, as the README says.
fn replies_by_arrival_pass_a_mark_aware_reverse_path_filter(backend: Backend) {
    let Some((site, conf, pod, _srv)) = site_with_pod(backend, true, true) else { return };
    let filter = |chain: &str, priority: &str| {
        site.node.ns.sh_ok(&format!(
            "nft add chain ip6 rpf {chain} '{{ type filter hook prerouting priority {priority}; }}' && \
             nft add rule ip6 rpf {chain} meta l4proto tcp fib saddr . mark . iif oif missing counter drop"
        ));
    };
    site.node.ns.sh_ok("nft add table ip6 rpf");
    filter("after-marks", "filter + 10");
    expect_arrival_marks(&site, &[PLAIN, VIA_WAN0]);
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK");
    let dropped = |chain: &str| site.node.ns.sh_ok(&format!("nft list chain ip6 rpf {chain}"));
    assert!(dropped("after-marks").contains("counter packets 0 "), "{}", dropped("after-marks"));

    filter("before-marks", "raw");
    site.expect_reply(&site.inet, WAN0, PLAIN, "pod");
    let through_wan1 = site.inet.sh(&format!("socat -T3 - TCP6:[{WAN1}]:{PLAIN},connect-timeout=3 </dev/null"));
    assert!(!through_wan1.status.success(), "a filter before the marks let a client through wan1 pass");
    assert!(!dropped("before-marks").contains("counter packets 0 "), "{}", dropped("before-marks"));
}

fn an_ipv6_only_pod_is_routed_like_a_dual_stack_one(backend: Backend) {
    let Some((site, conf, pod, _srv)) = site_with_pod(backend, false, true) else { return };
    expect_arrival_marks(&site, &[PLAIN]);
    let _peer = serve_peer_address(&site.inet);
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(WAN1));
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK");
    assert!(!site.node.ns.sh_ok("ip -4 rule").contains("fwmark"), "an IPv6-only pod got IPv4 rules");
    // An uplink setting that would defeat this later is said at ADD: an uplink deaf to the
    // advertisements its default comes from. Temporary addresses no longer are: wan1 has a stable
    // address, which the pods' traffic is translated to (tests/ipv6_snat.rs).
    assert!(!site.node.log().contains("router advertisements"), "{}", site.node.log());
    site.node.ns.sh_ok("sysctl -qw net.ipv6.conf.wan1.accept_ra=1 net.ipv6.conf.wan1.use_tempaddr=2");
    pod.readd(&site.node, &site.entry()).assert_ok("ADD again");
    let log = site.node.log();
    assert!(log.contains("set net.ipv6.conf.wan1.accept_ra=2"), "the log lacks the accept_ra warning:\n{log}");
    assert!(!log.contains("no stable global ipv6 address"), "wan1 has a stable address:\n{log}");
}

fn check_names_deleted_ipv6_rule_and_route_and_the_agent_restores_them(backend: Backend) {
    let Some((mut site, conf, pod, _srv)) = site_with_pod(backend, true, true) else { return };
    site.expect_reply(&site.inet, WAN1, PLAIN, "pod");
    site.node.ns.sh_ok("ip -6 rule del priority 100 fwmark 0x64/0x1fff table 100 && ip -6 route del default table 100");
    let out = pod.cni(&site.node, "check", &conf);
    assert_eq!(common::error_code(&out), Some(102), "CHECK must fail: {out:?}");
    let msg = common::error_msg(&out);
    for needle in [
        "missing ip -6 rule priority 100 fwmark 0x64/0x1fff lookup 100",
        "missing route ::/0 via fe80::1 dev wan1 table 100",
    ] {
        assert!(msg.contains(needle), "CHECK lacks {needle:?}: {msg}");
    }
    let _agent = Agent::start(&site.node);
    let restored = wait_for(|| pod.cni(&site.node, "check", &conf).status_ok, Duration::from_secs(10));
    assert!(restored, "the agent did not restore them\n{}", site.diagnostics());
    site.expect_reply(&site.inet, WAN1, PLAIN, "pod");
    site.expect_mark(WAN1, PLAIN, 100);
    // The router goes away (its last advertisement says so): the agent takes its default out of
    // table 100, and CHECK says wan1 has no IPv6 gateway; it comes back, and so does the default.
    let table100 = |site: &Site| site.node.ns.sh_ok("ip -6 route show table 100");
    site.stop_advertising();
    let emptied = wait_for(|| !table100(&site).contains("default"), Duration::from_secs(10));
    assert!(emptied, "the departed router is still table 100's default:\n{}", table100(&site));
    let msg = common::error_msg(&pod.cni(&site.node, "check", &conf));
    assert!(msg.contains("uplink wan1 of table 100 has a global IPv6 address but no IPv6 gateway"), "{msg}");
    site.start_advertising();
    let back = wait_for(|| table100(&site).contains("default via fe80::1 dev wan1"), Duration::from_secs(10));
    assert!(back, "the agent did not follow the router's return:\n{}", site.diagnostics());
    site.expect_reply(&site.inet, WAN1, PLAIN, "pod");
}

fn del_and_uninstall_leave_ipv6_rules_tables_and_firewall_as_before(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    warm_up(&site);
    let before = routing_state(&site.node);
    let conf = site.conflist(site.entry(), true, true);
    // A second pod without forwards holds only the pods' source rules and table 100.
    let mut bare = site.entry();
    bare["portForwarding"] = json!({ "rules": [] });
    let bare = site.conflist(bare, true, true);
    let a = Pod::add(&site.node, &conf, "a");
    let b = Pod::add(&site.node, &bare, "b");
    assert!(site.node.ns.sh_ok("ip -6 rule").contains("fwmark 0x64/0x1fff"));
    a.cni(&site.node, "del", &conf).assert_ok("DEL a");
    assert!(site.node.ns.sh_ok("ip -6 route show table 100").contains("default via fe80::1 dev wan1"));
    b.cni(&site.node, "del", &bare).assert_ok("DEL b");
    let after = routing_state(&site.node);
    assert_eq!(before, after, "the node differs after the last DEL\n{}", site.node.log());
    // And after uninstall instead of DEL.
    let _c = Pod::add(&site.node, &conf, "c");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", site.node.ns.name(), common::agent::bin(), "uninstall", "--yes", "--state-dir"])
        .arg(site.node.state_dir())
        .arg("--log-file")
        .arg(site.node.log_file())
        .output()
        .expect("run uninstall");
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let after = routing_state(&site.node);
    assert_eq!(before, after, "the node differs after uninstall\n{}", text(&out));
}

both_backends!(
    ipv6_clients_are_answered_by_their_arrival_uplink,
    replies_by_arrival_pass_a_mark_aware_reverse_path_filter,
    an_ipv6_only_pod_is_routed_like_a_dual_stack_one,
    check_names_deleted_ipv6_rule_and_route_and_the_agent_restores_them,
    del_and_uninstall_leave_ipv6_rules_tables_and_firewall_as_before,
);
