//! Two uplinks behind two providers that both reach one "internet", for the egress-failover tests
//! (tests/failover.rs). Every address lives in a namespace the test creates:
//!
//! ```text
//!  client 10.91.0.10 ─ isp1 ═ wan1 198.51.100.1/24 ─┐  main: default via isp0 (wan0)
//!                      │  (drops sources ≠ wan1's)  node [dind-br0 10.20.0.1] ── pods 10.20.0.x
//!     internet ────────┤  (drops sources ≠ wan0's)       default via isp1 (wan1) metric 200
//!  203.0.113.1 (probe) └ isp0 ═ wan0 192.0.2.1/24 ──┘  strict rp_filter
//!  203.0.113.80 (servers: TCP 9000, UDP 9001, each answers the source address it sees)
//! ```
//!
//! Each provider forwards only its customer's own address from the node's side (BCP38), so a
//! packet masqueraded to one uplink's address but sent out of the other dies there. Each can cut
//! its upstream (everything to and from the internet is dropped) while the node's link stays up;
//! the client on isp1's own network still reaches the node through it.

use std::path::PathBuf;
use std::time::Duration;

use super::uplinks::{Pod, VERSION};
use super::{veth, Backend, Background, Netns, Node};
use serde_json::{json, Value};

pub const WAN1: &str = "198.51.100.1";
pub const ISP1: &str = "198.51.100.254";
pub const WAN0: &str = "192.0.2.1";
pub const ISP0: &str = "192.0.2.254";
/// The health probes' target, in the internet.
pub const TARGET: &str = "203.0.113.1";
/// The internet's servers, which answer with the source address they see.
pub const SERVER: &str = "203.0.113.80";
pub const TCP_PORT: u16 = 9000;
pub const UDP_PORT: u16 = 9001;
/// A client on isp1's own network (not behind its upstream).
pub const CLIENT: &str = "10.91.0.10";
/// The forward on the primary's link: WAN1:30081 → the first pod's 8080.
pub const FORWARD_PORT: u16 = 30081;
/// host-local's first address: the forward's destIP.
pub const FIRST_POD: &str = "10.20.0.10";

/// `routing.health` of the tests: short rounds.
pub const INTERVAL_MS: u64 = 300;
pub const TIMEOUT_MS: u64 = 200;
pub const FAIL_AFTER: u64 = 3;
pub const RECOVER_AFTER: u64 = 3;
/// The global table (the primary's); the fallback's egress table is TABLE + 1.
pub const TABLE: u32 = 100;
pub const RULE_PRIORITY: u32 = 100;

/// One provider namespace: `wan` towards the node, `transit` towards the internet.
pub struct Provider {
    pub ns: Netns,
}

impl Provider {
    /// Everything to and from the internet is dropped; the node's link stays up.
    pub fn cut_upstream(&self) {
        self.ns.sh_ok("nft -f - <<'EOF'\nadd rule ip isp upstream iifname \"transit\" drop\nadd rule ip isp upstream oifname \"transit\" drop\nEOF");
    }

    pub fn restore_upstream(&self) {
        self.ns.sh_ok("nft flush chain ip isp upstream");
    }
}

/// The node, its two providers, the internet with its servers and the client behind isp1.
pub struct Providers {
    pub node: Node,
    pub isp1: Provider,
    pub isp0: Provider,
    pub internet: Netns,
    pub client: Netns,
    _servers: Vec<Background>,
}

impl Providers {
    pub fn new(backend: Backend) -> Providers {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        let internet = Netns::new("bn-inet");
        internet.sh_ok(&format!("ip addr add {TARGET}/32 dev lo && ip addr add {SERVER}/32 dev lo"));
        let isp1 = provider(&node, &internet, "wan1", WAN1, ISP1, 1);
        let isp0 = provider(&node, &internet, "wan0", WAN0, ISP0, 0);
        let client = Netns::new("bn-cli");
        veth(&isp1.ns, "lan", &client, "eth0", "10.91.0.1/24", &format!("{CLIENT}/24"));
        client.sh_ok("ip route add default via 10.91.0.1");
        internet.sh_ok("ip route add 10.91.0.0/24 via 10.255.1.1");
        node.ns.sh_ok(&format!(
            "ip route add default via {ISP0} dev wan0 && ip route add default via {ISP1} dev wan1 metric 200 && \
             sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1 \
             net.ipv4.conf.wan0.rp_filter=1 net.ipv4.conf.wan1.rp_filter=1"
        ));
        let servers = vec![
            internet.spawn(&format!("exec socat TCP-LISTEN:{TCP_PORT},reuseaddr,fork SYSTEM:'echo $SOCAT_PEERADDR'")),
            // One process answering every datagram in turn (socat's UDP-RECVFROM with fork loses
            // some when they come seconds apart).
            internet.spawn(&format!(
                "exec python3 -c 'import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.bind((\"{SERVER}\",{UDP_PORT}))\nwhile True:\n d,a=s.recvfrom(100)\n s.sendto(a[0].encode(),a)'"
            )),
        ];
        Providers { node, isp1, isp0, internet, client, _servers: servers }
    }

    /// What the node gets on first use and keeps whoever made it, made before a
    /// [`Node::snapshot`] meant to equal one after the last DEL: iptables-nft's mangle table, and
    /// the bridge (the bridge plugin never deletes it; a bridge-only network with its own IPAM
    /// store adds and deletes one pod).
    pub fn warm_up(&self) {
        let node = &self.node;
        node.ns.sh_ok("iptables -t mangle -N BN-PRIME && iptables -t mangle -X BN-PRIME");
        let mut bridge_only = super::conflist(VERSION, &node.dir().join("ipam-warmup"), json!({}));
        bridge_only["plugins"].as_array_mut().expect("plugins").truncate(1);
        let bridge_only = node.write_conflist(&bridge_only);
        let warm = Pod::attach(node, &bridge_only, "warmup");
        warm.cni(node, "del", &bridge_only).assert_ok("DEL warmup");
    }

    /// The bridge-nat entry: pods' own traffic by wan1 with wan0 as fallback, health probes to
    /// TARGET, and a forward WAN1:30081 → the first pod (its replies by the fallback mark 0x64,
    /// table 100, wan1's arrival table).
    pub fn entry(&self) -> Value {
        let mut e = self.node.bridge_nat_entry();
        e["routing"] = json!({
            "enabled": true, "tableId": TABLE, "fwmark": "0x64", "rulePriority": RULE_PRIORITY,
            "outbound": { "interface": "wan1", "fallback": ["wan0"] },
            "health": {
                "targets": [TARGET], "intervalMs": INTERVAL_MS, "timeoutMs": TIMEOUT_MS,
                "failAfter": FAIL_AFTER, "recoverAfter": RECOVER_AFTER
            }
        });
        e["portForwarding"] = json!({ "rules": [{
            "name": "web", "hostPort": FORWARD_PORT, "destIP": FIRST_POD, "destPort": 8080, "protocol": "tcp"
        }]});
        e
    }

    pub fn conflist(&self) -> PathBuf {
        self.node.write_conflist(&self.node.conflist(VERSION, self.entry()))
    }

    /// The tables the pod subnet's source rules (priority rulePriority + 10) look up, in the
    /// order the kernel tries them, comma-separated ("" when there is none).
    pub fn pod_rule_table(&self) -> String {
        let rules = self.node.ns.sh_ok(&format!("ip rule show priority {}", RULE_PRIORITY + 10));
        let table = |line: &str| line.split_whitespace().skip_while(|w| *w != "lookup").nth(1).map(str::to_string);
        rules.lines().filter_map(table).collect::<Vec<_>>().join(",")
    }
}

/// A provider on node uplink `uplink` (node `node_addr`/24, provider `isp_addr`/24) with a /30 to
/// the internet (10.255.N.1 provider, .2 internet), dropping what the node sends from any other
/// source than `node_addr`.
fn provider(node: &Node, internet: &Netns, uplink: &str, node_addr: &str, isp_addr: &str, n: u8) -> Provider {
    let ns = Netns::new(&format!("bn-isp{n}"));
    node.veth_to(&ns, uplink, "wan", &format!("{node_addr}/24"), &format!("{isp_addr}/24"));
    veth(&ns, "transit", internet, &format!("isp{n}"), &format!("10.255.{n}.1/30"), &format!("10.255.{n}.2/30"));
    ns.sh_ok(&format!(
        "sysctl -qw net.ipv4.ip_forward=1 && ip route add default via 10.255.{n}.2 && nft -f - <<'EOF'
table ip isp {{
  chain upstream {{
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname \"wan\" ip saddr != {node_addr} drop
    jump upstream
  }}
}}
EOF"
    ));
    let net = node_addr.rsplit_once('.').map(|(a, _)| a).expect("an IPv4 address");
    internet.sh_ok(&format!("ip route add {net}.0/24 via 10.255.{n}.1"));
    Provider { ns }
}

// ---------------------------------------------------------------- the pods' traffic

/// The source address the internet's TCP server saw for one connection from `ns` (None: no
/// answer within `timeout`).
pub fn tcp_source(ns: &Netns, timeout: Duration) -> Option<String> {
    let t = timeout.as_secs_f64();
    let out = ns.sh(&format!("socat -T{t} - TCP:{SERVER}:{TCP_PORT},connect-timeout={t} </dev/null"));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// One datagram of the pod's UDP session (always from source port `port`) and the source address
/// the server saw in its answer (None: no answer within `timeout`).
pub fn udp_source(ns: &Netns, port: u16, timeout: Duration) -> Option<String> {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('',{port}))\n\
         s.settimeout({})\ns.sendto(b'x',('{SERVER}',{UDP_PORT}))\n\
         try: print(s.recv(100).decode().strip())\nexcept socket.timeout: sys.exit(1)\n",
        timeout.as_secs_f64()
    );
    let out = ns.exec(&["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The pod's answer ("pod") to the client through WAN1's forward (None: no answer).
pub fn forward_answer(client: &Netns, timeout: Duration) -> Option<String> {
    let t = timeout.as_secs_f64();
    let out = client.sh(&format!("socat -T{t} - TCP:{WAN1}:{FORWARD_PORT},connect-timeout={t} </dev/null"));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}
