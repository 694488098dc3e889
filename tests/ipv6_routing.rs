//! IPv6 gets the same multi-uplink policy routing as IPv4, with real packets, on a dual-stack node
//! whose providers drop every packet whose source is not their customer's prefix (BCP38), so a
//! reply leaving by the wrong uplink dies:
//!
//! ```text
//!   inet (2001:db8:ffff::10, 203.0.113.10) ── isp0 ══ wan0 2001:db8:a::1  198.51.100.1 ─┐  main: preferred
//!                                          └─ isp1 ══ wan1 2001:db8:b::1  192.0.2.1 ────┤  isp1's radvd: default via fe80::1
//!                                             modem ══ wwan0 100.65.0.1 (IPv4 only) ────┘  node [dind-br0] ── pods
//! ```
//!
//! The config is the seed's: the pods' own traffic by wan1 (table 100, fallback mark 0x64), 30081
//! routed by wan0 (0x65, table 101), 30082 by the IPv4-only wwan0 (0x66, table 102), 30080 with no
//! routing block. The client (inet) reaches wan0's and wan1's addresses through each provider.
//! wan1's only IPv6 gateway is what isp1's router advertisements (radvd) install in main.

mod common;

use common::agent::{text, tool, Agent};
use common::uplinks::Pod;
use common::{both_backends, require_root, veth, wait_for, Backend, Background, Netns, Node};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

const WAN0: &str = "2001:db8:a::1";
const WAN1: &str = "2001:db8:b::1";
const WAN1_V4: &str = "192.0.2.1";
const INET: &str = "2001:db8:ffff::10";
const INET_V4: &str = "203.0.113.10";
const PLAIN: u16 = 30080;
const VIA_WAN0: u16 = 30081;
const VIA_WWAN: u16 = 30082;
const PEER_PORT: u16 = 9000;

/// A provider: its router on `uplink` of the node (addresses `node_addrs` there, `router_addrs` on
/// its side), upstream to `inet`, dropping what comes from the node with a source outside
/// `prefixes` (IPv6, IPv4).
fn provider(
    node: &Node,
    inet: &Netns,
    n: u8,
    uplink: &str,
    node_addrs: [&str; 2],
    router_addrs: &[&str],
    prefixes: [&str; 2],
) -> Netns {
    let isp = Netns::new(&format!("bn-isp{n}"));
    node.veth_to(&isp, uplink, "wan", node_addrs[0], router_addrs[0]);
    node.ns.sh_ok(&format!("ip addr add {} dev {uplink} nodad", node_addrs[1]));
    for a in &router_addrs[1..] {
        isp.sh_ok(&format!("ip addr add {a} dev wan nodad"));
    }
    veth(&isp, "transit", inet, &format!("isp{n}"), &format!("10.255.{n}.1/30"), &format!("10.255.{n}.2/30"));
    isp.sh_ok(&format!("ip addr add 2001:db8:f{n}::1/64 dev transit nodad"));
    let [prefix6, prefix4] = prefixes;
    inet.sh_ok(&format!(
        "ip addr add 2001:db8:f{n}::2/64 dev isp{n} nodad && \
         ip route add {prefix4} via 10.255.{n}.1 && ip -6 route add {prefix6} via 2001:db8:f{n}::1"
    ));
    isp.sh_ok(&format!(
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
         ip route add default via 10.255.{n}.2 && ip -6 route add default via 2001:db8:f{n}::2 && \
         ip6tables -A FORWARD -i wan ! -s {prefix6} -j DROP && iptables -A FORWARD -i wan ! -s {prefix4} -j DROP"
    ));
    isp
}

struct Site {
    node: Node,
    inet: Netns,
    isp1: Netns,
    _isps: [Netns; 2],
    radvd: Option<Background>,
}

impl Site {
    fn new(backend: Backend) -> Site {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        // Marks live in mangle, of both families: created by the first ADD, never removed.
        node.ns.sh_ok("for t in iptables ip6tables; do $t -t mangle -N BN-PRIME && $t -t mangle -X BN-PRIME; done");
        node.ns.sh_ok("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0");
        let inet = Netns::new("bn-inet");
        inet.sh_ok(&format!("ip addr add {INET_V4}/32 dev lo && ip addr add {INET}/128 dev lo"));
        let isp0 = provider(
            &node,
            &inet,
            0,
            "wan0",
            ["198.51.100.1/24", &format!("{WAN0}/64")],
            &["198.51.100.254/24", "2001:db8:a::ff/64"],
            ["2001:db8:a::/64", "198.51.100.0/24"],
        );
        let isp1 = provider(
            &node,
            &inet,
            1,
            "wan1",
            [&format!("{WAN1_V4}/24"), &format!("{WAN1}/64")],
            &["192.0.2.254/24", "2001:db8:b::ff/64", "fe80::1/64"],
            ["2001:db8:b::/64", "192.0.2.0/24"],
        );
        // The IPv4-only modem: a link-local IPv6 address as every link has, nothing more.
        let modem = Netns::new("bn-modem");
        node.veth_to(&modem, "wwan0", "wan", "100.65.0.1/24", "100.65.0.254/24");
        // wan0 is preferred in main; wan1's only IPv6 gateway is the router that advertises
        // itself, by its link-local address. A forwarding node hears advertisements only with
        // accept_ra=2 (see the README).
        node.ns.sh_ok(
            "ip route add default via 198.51.100.254 dev wan0 && \
             ip route add default via 192.0.2.254 dev wan1 metric 200 && \
             ip route add default via 100.65.0.254 dev wwan0 metric 300 && \
             ip -6 route add default via 2001:db8:a::ff dev wan0 metric 100 && \
             sysctl -qw net.ipv6.conf.all.forwarding=1 net.ipv6.conf.wan1.accept_ra=2",
        );
        let mut site = Site { node, inet, isp1, _isps: [isp0, modem], radvd: None };
        site.start_advertising();
        site
    }

    /// isp1's radvd: every 3-4 s, a default router lifetime of 12 s, the on-link prefix.
    fn start_advertising(&mut self) {
        let conf = self.node.dir().join("radvd.conf");
        let text = "interface wan { AdvSendAdvert on; MinRtrAdvInterval 3; MaxRtrAdvInterval 4;\n\
                    prefix 2001:db8:b::/64 { AdvOnLink on; AdvAutonomous off; }; };\n";
        std::fs::write(&conf, text).expect("write radvd.conf");
        let pid = self.node.dir().join("radvd.pid");
        self.radvd =
            Some(self.isp1.spawn(&format!("exec radvd -n -m stderr -C {} -p {}", conf.display(), pid.display())));
        let heard = wait_for(|| self.default_via_ra(), Duration::from_secs(15));
        assert!(heard, "no router advertisement reached wan1\n{}", self.diagnostics());
    }

    /// radvd stopped as a router going away does it: a last advertisement with lifetime 0.
    fn stop_advertising(&mut self) {
        let pid = self.node.dir().join("radvd.pid");
        self.isp1.sh_ok(&format!("kill -TERM $(cat {})", pid.display()));
        let gone = wait_for(|| !self.default_via_ra(), Duration::from_secs(15));
        assert!(gone, "the advertised default outlived its router\n{}", self.diagnostics());
        self.radvd = None;
    }

    fn default_via_ra(&self) -> bool {
        self.node.ns.sh_ok("ip -6 route show default").contains("via fe80::1 dev wan1 proto ra")
    }

    fn entry(&self) -> Value {
        let routed = |name: &str, port: u16, mark: &str, table: u32, uplink: &str| {
            json!({ "name": name, "hostPort": port, "destPort": 8080, "protocol": "tcp",
                    "routing": { "fwmark": mark, "tableId": table, "outbound": { "interface": uplink } } })
        };
        let mut e = self.node.bridge_nat_entry();
        e["routing"] = json!({ "tableId": 100, "tableName": "dind_wan1", "fwmark": "0x64", "rulePriority": 100,
                               "outbound": { "interface": "wan1" } });
        e["portForwarding"] = json!({ "rules": [
            { "name": "plain", "hostPort": PLAIN, "destPort": 8080, "protocol": "tcp" },
            routed("via-wan0", VIA_WAN0, "0x65", 101, "wan0"),
            routed("via-wwan", VIA_WWAN, "0x66", 102, "wwan0"),
        ] });
        e
    }

    /// The seed's conflist with host-local ranges of the given families.
    fn conflist(&self, entry: Value, v4: bool, v6: bool) -> PathBuf {
        let mut list = self.node.conflist(common::uplinks::VERSION, entry);
        let ipam = &mut list["plugins"][0]["ipam"];
        let mut ranges = Vec::new();
        let mut routes = Vec::new();
        if v4 {
            ranges.push(ipam["ranges"][0].clone());
            routes.push(json!({ "dst": "0.0.0.0/0" }));
        }
        if v6 {
            ranges.push(json!([{ "subnet": "fd00:20::/64", "gateway": "fd00:20::1" }]));
            routes.push(json!({ "dst": "::/0" }));
        }
        ipam["ranges"] = json!(ranges);
        ipam["routes"] = json!(routes);
        self.node.write_conflist(&list)
    }

    fn diagnostics(&self) -> String {
        let script = [
            "ip rule",
            "ip -6 rule",
            "ip -6 route show table all",
            "ip6tables-save -t mangle",
            "nft list ruleset",
            "conntrack -L -f ipv6 2>&1",
            "ip -br addr",
        ]
        .map(|cmd| format!("echo '--- {cmd}'; {cmd}"))
        .join("; ");
        let out = self.node.ns.sh(&script);
        format!(
            "{}{}\n--- log\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.node.log()
        )
    }

    /// A reply from the pod within the timeout, from `from` to `[host]:port`.
    #[track_caller]
    fn expect_reply(&self, from: &Netns, host: &str, port: u16, expected: &str) {
        let target = if host.contains(':') { format!("TCP6:[{host}]:{port}") } else { format!("TCP4:{host}:{port}") };
        let mut last = String::new();
        let ok = wait_for(
            || {
                let out = from.sh(&format!("socat -T3 - {target},connect-timeout=3 </dev/null"));
                last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                out.status.success() && last.lines().any(|l| l.trim() == expected)
            },
            Duration::from_secs(15),
        );
        assert!(ok, "[{}] {target}: expected {expected:?}, last {last:?}\n{}", from.name(), self.diagnostics());
    }

    /// The conntrack mark of the node's IPv6 connections to `[host]:port`.
    fn marks6(&self, host: &str, port: u16) -> Vec<String> {
        let out = self.node.ns.sh_ok("conntrack -L -f ipv6 -p tcp 2>/dev/null");
        out.lines()
            .filter(|l| l.contains(&format!("dst={host} ")) && l.contains(&format!("dport={port} ")))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("mark=")).map(str::to_string))
            .collect()
    }

    #[track_caller]
    fn expect_mark(&self, host: &str, port: u16, mark: u32) {
        let marks = self.marks6(host, port);
        let want = format!("mark={mark}");
        assert!(!marks.is_empty() && marks.iter().all(|m| *m == want), "{host}:{port}: want {want}, got {marks:?}");
    }
}

/// An IPv6 address as socat's `$SOCAT_PEERADDR` spells it: bracketed, every group in full.
fn socat_form(ip: &str) -> String {
    let ip: std::net::Ipv6Addr = ip.parse().expect("an IPv6 address");
    let groups: Vec<String> = ip.segments().iter().map(|g| format!("{g:04x}")).collect();
    format!("[{}]", groups.join(":"))
}

/// The pod's server on 8080, both families.
fn serve(pod: &Pod) -> Background {
    pod.ns.spawn("exec socat TCP6-LISTEN:8080,ipv6only=0,reuseaddr,fork SYSTEM:'echo pod'")
}

/// A bridge-only ADD and DEL first, so the bridge (with its addresses) exists before the first
/// snapshot, as on a node that has run pods before.
fn warm_up(site: &Site) {
    let text = std::fs::read_to_string(site.conflist(site.entry(), true, true)).expect("conflist");
    let mut only: Value = serde_json::from_str(&text).expect("json");
    only["plugins"].as_array_mut().expect("plugins").truncate(1);
    let path = site.node.write_conflist(&only);
    let warm = Pod::attach(&site.node, &path, "warmup");
    warm.cni(&site.node, "del", &path).assert_ok("DEL warmup");
}

/// What must be as before the first ADD: ip rules of both families, every table's IPv6 and IPv4
/// routes (link-local gateways included), and the firewall.
fn routing_state(node: &Node) -> String {
    let rules = node.ns.sh_ok("ip rule; ip -6 rule");
    let tables = node.ns.sh_ok("ip -6 route show table all | grep -E 'table (100|101|102|dind_wan1) ' || true");
    let tables4 = node.ns.sh_ok("ip -4 route show table all | grep -E 'table (100|101|102|dind_wan1) ' || true");
    format!("{rules}\n{tables}\n{tables4}\n{}", node.firewall_snapshot())
}

/// A site with one pod of the given families added and serving, or None when not root.
fn site_with_pod(backend: Backend, v4: bool, v6: bool) -> Option<(Site, PathBuf, Pod, Background)> {
    if !require_root() {
        return None;
    }
    let site = Site::new(backend);
    let conf = site.conflist(site.entry(), v4, v6);
    let pod = Pod::add(&site.node, &conf, "a");
    let srv = serve(&pod);
    Some((site, conf, pod, srv))
}

/// Each provider's path to `ports`; the arrival uplink wins, so each connection carries its
/// uplink's mark (wan1 0x64 = 100, wan0 0x65 = 101) whatever the forward's own block says.
fn expect_arrival_marks(site: &Site, ports: &[u16]) {
    for (host, mark) in [(WAN1, 100), (WAN0, 101)] {
        for &port in ports {
            site.expect_reply(&site.inet, host, port, "pod");
            site.expect_mark(host, port, mark);
        }
    }
}

/// A server in `inet` that answers with the address it sees (`ipv6only=0`: IPv4 peers too).
fn serve_peer_address(inet: &Netns) -> Background {
    inet.spawn(&format!("exec socat TCP6-LISTEN:{PEER_PORT},ipv6only=0,reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'"))
}

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

fn an_ipv6_only_pod_is_routed_like_a_dual_stack_one(backend: Backend) {
    let Some((site, conf, pod, _srv)) = site_with_pod(backend, false, true) else { return };
    expect_arrival_marks(&site, &[PLAIN]);
    let _peer = serve_peer_address(&site.inet);
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(WAN1));
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK");
    assert!(!site.node.ns.sh_ok("ip -4 rule").contains("fwmark"), "an IPv6-only pod got IPv4 rules");
    // Uplink settings that would defeat this later are said at ADD: an uplink deaf to the
    // advertisements its default comes from, and one whose masquerade would take temporary addresses.
    assert!(!site.node.log().contains("router advertisements"), "{}", site.node.log());
    site.node.ns.sh_ok("sysctl -qw net.ipv6.conf.wan1.accept_ra=1 net.ipv6.conf.wan1.use_tempaddr=2");
    pod.readd(&site.node, &site.entry()).assert_ok("ADD again");
    let log = site.node.log();
    for needle in ["set net.ipv6.conf.wan1.accept_ra=2", "uplink wan1 prefers temporary IPv6 addresses"] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }
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
    an_ipv6_only_pod_is_routed_like_a_dual_stack_one,
    check_names_deleted_ipv6_rule_and_route_and_the_agent_restores_them,
    del_and_uninstall_leave_ipv6_rules_tables_and_firewall_as_before,
);
