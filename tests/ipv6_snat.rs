//! The pods' IPv6 egress is translated to a stable address of the uplink it leaves by, never to the
//! temporary (privacy) address the kernel itself would pick, and follows the uplink when it is
//! renumbered. On the dual-stack node of tests/common/dual_stack.rs, whose provider behind wan1
//! passes only sources in 2001:db8:b::/64 and whose inet server answers with the address it sees.

mod common;

use common::agent::Agent;
use common::dual_stack::*;
use common::uplinks::Pod;
use common::{both_backends, require_root, wait_for, Backend};
use serde_json::json;
use std::time::Duration;

/// wan1's global addresses that are temporary and no longer tentative.
fn temporary_addresses(site: &Site) -> Vec<String> {
    let out = site.node.ns.sh_ok("ip -6 addr show dev wan1 scope global temporary");
    out.lines()
        .filter(|l| l.contains("inet6 ") && !l.contains("tentative"))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|a| a.split('/').next()).map(str::to_string))
        .collect()
}

/// isp1 advertises its prefix for autoconfiguration, and wan1 prefers temporary addresses
/// (Ubuntu's default): the kernel then picks a temporary address as the source out of wan1.
fn give_wan1_a_preferred_temporary_address(site: &mut Site) -> (String, common::Background) {
    site.node.ns.sh_ok("sysctl -qw net.ipv6.conf.wan1.use_tempaddr=2 net.ipv6.conf.wan1.autoconf=1");
    let conf = site.node.dir().join("radvd.conf");
    let text = "interface wan { AdvSendAdvert on; MinRtrAdvInterval 3; MaxRtrAdvInterval 4;\n\
                prefix 2001:db8:b::/64 { AdvOnLink on; AdvAutonomous on; }; };\n";
    site.stop_advertising();
    std::fs::write(&conf, text).expect("write radvd.conf");
    let pid = site.node.dir().join("radvd.pid");
    let radvd = site.isp1.spawn(&format!("exec radvd -n -m stderr -C {} -p {}", conf.display(), pid.display()));
    let made = wait_for(|| !temporary_addresses(site).is_empty(), Duration::from_secs(20));
    assert!(made, "wan1 got no temporary address\n{}", site.diagnostics());
    let temporary = temporary_addresses(site).remove(0);
    // What a plain masquerade would take: the kernel's own choice of source out of wan1.
    let chosen = site.node.ns.sh_ok(&format!("ip -6 route get {INET} oif wan1"));
    assert!(chosen.contains(&format!("src {temporary} ")), "the kernel does not prefer {temporary}: {chosen}");
    (temporary, radvd)
}

fn seen_from(site: &Site, pod: &Pod, address: &str) {
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(address));
}

fn pods_ipv6_egress_is_seen_from_the_stable_address_and_follows_renumbering(backend: Backend) {
    if !require_root() {
        return;
    }
    let mut site = Site::new(backend);
    warm_up(&site);
    let before = routing_state(&site.node);
    let conf = site.conflist(site.entry(), true, true);
    let (temporary, _radvd) = give_wan1_a_preferred_temporary_address(&mut site);
    let pod = Pod::add(&site.node, &conf, "a");
    let _srv = serve(&pod);
    let _peer = serve_peer_address(&site.inet);
    // Not the temporary address the kernel prefers: wan1's stable one.
    seen_from(&site, &pod, WAN1);
    assert_ne!(socat_form(WAN1), socat_form(&temporary));
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK");

    // Renumbered: the stable address is replaced by another of the same prefix.
    site.node.ns.sh_ok(&format!("ip -6 addr del {WAN1}/64 dev wan1 && ip -6 addr add 2001:db8:b::2/64 dev wan1 nodad"));
    let out = pod.cni(&site.node, "check", &conf);
    assert_eq!(common::error_code(&out), Some(102), "CHECK must fail: {out:?}");
    let msg = common::error_msg(&out);
    let stale = format!(
        "stale ipv6 snat of fd00:20::/64 leaving by wan1: it is to {WAN1}, which wan1 no longer has (its stable \
         address is 2001:db8:b::2)"
    );
    assert!(msg.contains(&stale), "CHECK lacks {stale:?}: {msg}");

    // The agent repairs it at start, then follows the next renumbering as it happens.
    let _agent = Agent::start(&site.node);
    let repaired = wait_for(|| pod.cni(&site.node, "check", &conf).status_ok, Duration::from_secs(10));
    assert!(repaired, "the agent did not repair the source nat\n{}", site.diagnostics());
    seen_from(&site, &pod, "2001:db8:b::2");
    site.node.ns.sh_ok("ip -6 addr del 2001:db8:b::2/64 dev wan1 && ip -6 addr add 2001:db8:b::3/64 dev wan1 nodad");
    seen_from(&site, &pod, "2001:db8:b::3");
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK after the agent followed");

    // A deprecated address is never taken: wan1's goes deprecated (the lower one, which would
    // otherwise win), and another, with a lifetime of its own, is there.
    site.node.ns.sh_ok(
        "ip -6 addr change 2001:db8:b::3/64 dev wan1 preferred_lft 0 && \
         ip -6 addr add 2001:db8:b::4/64 dev wan1 nodad preferred_lft 3600 valid_lft 7200",
    );
    seen_from(&site, &pod, "2001:db8:b::4");

    // A firewall reload empties the nat chain the translation hangs off: the agent puts it back,
    // ahead of the masquerade again (else the pod would be seen from the temporary address).
    let reload = match backend {
        Backend::Iptables => "ip6tables -t nat -F POSTROUTING",
        Backend::Nftables => "nft flush chain inet bridge-nat nat-post",
    };
    site.node.ns.sh_ok(reload);
    let back = wait_for(|| pod.cni(&site.node, "check", &conf).status_ok, Duration::from_secs(10));
    assert!(back, "the agent did not repair the reload\n{}", site.diagnostics());
    seen_from(&site, &pod, "2001:db8:b::4");

    drop(_agent);
    // A second pod of the network, not masqueraded, keeps the firewall's shared objects (the
    // nftables table among them) after the first one's DEL, which takes its source nat along.
    let mut bare = site.entry();
    bare["portForwarding"] = json!({ "rules": [] });
    bare["masquerade"] = json!(false);
    let bare = site.conflist(bare, true, true);
    let b = Pod::add(&site.node, &bare, "b");
    assert!(snat_objects(&site).contains("2001:db8:b::4"), "{}", snat_objects(&site));
    pod.cni(&site.node, "del", &conf).assert_ok("DEL a");
    let left = snat_objects(&site);
    assert!(!left.contains("2001:db8:b::"), "a's source nat outlived its DEL:\n{left}");
    b.cni(&site.node, "del", &bare).assert_ok("DEL b");
    let after = routing_state(&site.node);
    assert_eq!(before, after, "the node differs after DEL\n{}", site.node.log());
}

/// What translates the pods' IPv6 traffic in either backend: ip6tables' nat table and the
/// nftables map (absent: nothing).
fn snat_objects(site: &Site) -> String {
    site.node.ns.sh_ok("ip6tables-save -t nat | grep -i snat; nft list map inet bridge-nat snat6-src 2>/dev/null; true")
}

/// A table made by an earlier version has no map of source addresses and no rule looking it up:
/// an ADD still succeeds (the masquerade carries the pods' traffic), CHECK names what is missing,
/// and reconcile rebuilds the table and sets the translation.
#[test]
fn an_nftables_table_from_before_the_translation_does_not_fail_an_add() {
    if !require_root() {
        return;
    }
    let site = Site::new(Backend::Nftables);
    let conf = site.conflist(site.entry(), true, true);
    let a = Pod::add(&site.node, &conf, "a");
    let listed = site.node.ns.sh_ok("nft -a list chain inet bridge-nat from-bridge");
    let handle = listed
        .lines()
        .find(|l| l.contains("comment \"snat6\""))
        .and_then(|l| l.rsplit("# handle ").next())
        .unwrap_or_else(|| panic!("no snat6 rule in from-bridge:\n{listed}"))
        .trim()
        .to_string();
    site.node.ns.sh_ok(&format!(
        "nft delete rule inet bridge-nat from-bridge handle {handle} && nft delete map inet bridge-nat snat6-src"
    ));
    let mut bare = site.entry();
    bare["portForwarding"] = json!({ "rules": [] });
    let bare = site.conflist(bare, true, true);
    let b = Pod::add(&site.node, &bare, "b");
    let _peer = serve_peer_address(&site.inet);
    seen_from(&site, &b, WAN1);
    let msg = common::error_msg(&b.cni(&site.node, "check", &bare));
    for needle in
        ["missing nftables rule snat6 in chain from-bridge", "missing ipv6 snat of fd00:20::/64 leaving by wan1"]
    {
        assert!(msg.contains(needle), "CHECK lacks {needle:?}: {msg}");
    }
    let out = common::agent::tool(&site.node, "reconcile");
    assert!(out.status.success(), "reconcile: {}", common::agent::text(&out));
    b.cni(&site.node, "check", &bare).assert_ok("CHECK b after reconcile");
    a.cni(&site.node, "check", &conf).assert_ok("CHECK a after reconcile");
    let map = site.node.ns.sh_ok("nft list map inet bridge-nat snat6-src");
    assert!(map.contains(&format!("\"wan1\" : {WAN1}")), "{map}");
}

both_backends!(pods_ipv6_egress_is_seen_from_the_stable_address_and_follows_renumbering);
