//! A dual-stack node for the IPv6 tests, whose providers drop every packet whose source is not
//! their customer's prefix (BCP38), so a reply or a pod's packet leaving by the wrong uplink dies:
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

use super::uplinks::Pod;
use super::{require_root, veth, wait_for, Backend, Background, Netns, Node};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

pub const WAN0: &str = "2001:db8:a::1";
pub const WAN1: &str = "2001:db8:b::1";
pub const WAN1_V4: &str = "192.0.2.1";
pub const INET: &str = "2001:db8:ffff::10";
pub const INET_V4: &str = "203.0.113.10";
pub const PLAIN: u16 = 30080;
pub const VIA_WAN0: u16 = 30081;
pub const VIA_WWAN: u16 = 30082;
pub const PEER_PORT: u16 = 9000;

/// A provider: its router on `uplink` of the node (addresses `node_addrs` there, `router_addrs` on
/// its side), upstream to `inet`, dropping what comes from the node with a source outside
/// `prefixes` (IPv6, IPv4).
pub fn provider(
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

pub struct Site {
    pub node: Node,
    pub inet: Netns,
    pub isp1: Netns,
    pub isp0: Netns,
    _modem: Netns,
    radvd: Option<Background>,
}

impl Site {
    pub fn new(backend: Backend) -> Site {
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
        let mut site = Site { node, inet, isp1, isp0, _modem: modem, radvd: None };
        site.start_advertising();
        site
    }

    /// isp1's radvd: every 3-4 s, a default router lifetime of 12 s, the on-link prefix.
    pub fn start_advertising(&mut self) {
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
    pub fn stop_advertising(&mut self) {
        let pid = self.node.dir().join("radvd.pid");
        self.isp1.sh_ok(&format!("kill -TERM $(cat {})", pid.display()));
        let gone = wait_for(|| !self.default_via_ra(), Duration::from_secs(15));
        assert!(gone, "the advertised default outlived its router\n{}", self.diagnostics());
        self.radvd = None;
    }

    /// Links made a moment ago still run duplicate address detection on their link-local
    /// addresses, and a namespace whose link-local address is tentative resolves its neighbours
    /// only after a retransmission (measured: the internet's first answers to the node came 1.5 s
    /// late). A real provider's routers are up long before: an agent probing IPv6 must start
    /// after this, or its first rounds are lost.
    pub fn settle(&self) {
        let settled = || {
            [&self.node.ns, &self.inet, &self.isp0, &self.isp1]
                .iter()
                .all(|ns| ns.sh_ok("ip -6 addr show tentative").trim().is_empty())
        };
        assert!(wait_for(settled, Duration::from_secs(10)), "duplicate address detection did not end");
    }

    pub fn default_via_ra(&self) -> bool {
        self.node.ns.sh_ok("ip -6 route show default").contains("via fe80::1 dev wan1 proto ra")
    }

    pub fn entry(&self) -> Value {
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
    pub fn conflist(&self, entry: Value, v4: bool, v6: bool) -> PathBuf {
        let mut list = self.node.conflist(super::uplinks::VERSION, entry);
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

    pub fn diagnostics(&self) -> String {
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
    pub fn expect_reply(&self, from: &Netns, host: &str, port: u16, expected: &str) {
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
    pub fn marks6(&self, host: &str, port: u16) -> Vec<String> {
        let out = self.node.ns.sh_ok("conntrack -L -f ipv6 -p tcp 2>/dev/null");
        out.lines()
            .filter(|l| l.contains(&format!("dst={host} ")) && l.contains(&format!("dport={port} ")))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("mark=")).map(str::to_string))
            .collect()
    }

    #[track_caller]
    pub fn expect_mark(&self, host: &str, port: u16, mark: u32) {
        let marks = self.marks6(host, port);
        let want = format!("mark={mark}");
        assert!(!marks.is_empty() && marks.iter().all(|m| *m == want), "{host}:{port}: want {want}, got {marks:?}");
    }
}

/// An IPv6 address as socat's `$SOCAT_PEERADDR` spells it: bracketed, every group in full.
pub fn socat_form(ip: &str) -> String {
    let ip: std::net::Ipv6Addr = ip.parse().expect("an IPv6 address");
    let groups: Vec<String> = ip.segments().iter().map(|g| format!("{g:04x}")).collect();
    format!("[{}]", groups.join(":"))
}

/// The pod's server on 8080, both families.
pub fn serve(pod: &Pod) -> Background {
    pod.ns.spawn("exec socat TCP6-LISTEN:8080,ipv6only=0,reuseaddr,fork SYSTEM:'echo pod'")
}

/// A bridge-only ADD and DEL first, so the bridge (with its addresses) exists before the first
/// snapshot, as on a node that has run pods before.
pub fn warm_up(site: &Site) {
    let text = std::fs::read_to_string(site.conflist(site.entry(), true, true)).expect("conflist");
    let mut only: Value = serde_json::from_str(&text).expect("json");
    only["plugins"].as_array_mut().expect("plugins").truncate(1);
    let path = site.node.write_conflist(&only);
    let warm = Pod::attach(&site.node, &path, "warmup");
    warm.cni(&site.node, "del", &path).assert_ok("DEL warmup");
}

/// What must be as before the first ADD: ip rules of both families, every table's IPv6 and IPv4
/// routes (link-local gateways included), and the firewall.
pub fn routing_state(node: &Node) -> String {
    let rules = node.ns.sh_ok("ip rule; ip -6 rule");
    let tables = node.ns.sh_ok("ip -6 route show table all | grep -E 'table (100|101|102|dind_wan1) ' || true");
    let tables4 = node.ns.sh_ok("ip -4 route show table all | grep -E 'table (100|101|102|dind_wan1) ' || true");
    format!("{rules}\n{tables}\n{tables4}\n{}", node.firewall_snapshot())
}

/// A site with one pod of the given families added and serving, or None when not root.
pub fn site_with_pod(backend: Backend, v4: bool, v6: bool) -> Option<(Site, PathBuf, Pod, Background)> {
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
pub fn expect_arrival_marks(site: &Site, ports: &[u16]) {
    for (host, mark) in [(WAN1, 100), (WAN0, 101)] {
        for &port in ports {
            site.expect_reply(&site.inet, host, port, "pod");
            site.expect_mark(host, port, mark);
        }
    }
}

/// A server in `inet` that answers with the address it sees (`ipv6only=0`: IPv4 peers too).
pub fn serve_peer_address(inet: &Netns) -> Background {
    inet.spawn(&format!("exec socat TCP6-LISTEN:{PEER_PORT},ipv6only=0,reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'"))
}
