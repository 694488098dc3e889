//! Static forwards that follow their pod (`portForwarding.rules[].pod`, matched against the
//! K8S_POD_NAMESPACE and K8S_POD_NAME that runtimes pass in CNI_ARGS), the warning for a static
//! rule no attachment binds, and a re-created pod with its old address and a new MAC answering at
//! once: real packets, chained after Debian's bridge + host-local and driven through libcni.
//!
//! ```text
//!   client 203.0.113.2 ──veth── 203.0.113.1 [up0] node [dind-br0] 10.20.0.1 ── pods 10.20.0.x
//!          fd00:1::2                fd00:1::1                      fd00:20::1     fd00:20::x
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    both_backends, error_code, error_msg, require_root, wait_for, Backend, Background, DriverOutput, Netns, Node,
};
use serde_json::{json, Value};

const UPLINK: &str = "203.0.113.1";
const UPLINK6: &str = "[fd00:1::1]";
const CLIENT: &str = "203.0.113.2";
const VERSION: &str = "1.0.0";
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

struct Site {
    node: Node,
    client: Netns,
}

impl Site {
    fn new(backend: Backend) -> Site {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        let client = Netns::new("bn-client");
        node.veth_to(&client, "up0", "eth0", &format!("{UPLINK}/24"), &format!("{CLIENT}/24"));
        Site { node, client }
    }

    fn conflist(&self, rules: &[Value]) -> PathBuf {
        self.node.write_conflist(&self.conflist_value(rules))
    }

    fn conflist_value(&self, rules: &[Value]) -> Value {
        let mut entry = self.node.bridge_nat_entry();
        entry["portForwarding"] = json!({ "rules": rules });
        self.node.conflist(VERSION, entry)
    }

    /// Dual stack, with host-local taking the addresses the runtime asks for (the `ips`
    /// capability), as for a pod that keeps its addresses when it is re-created.
    fn dual_stack_conflist(&self, rules: &[Value]) -> PathBuf {
        self.node.ns.sh_ok("ip addr add fd00:1::1/64 dev up0 nodad");
        self.client.sh_ok("ip addr add fd00:1::2/64 dev eth0 nodad");
        let mut list = self.conflist_value(rules);
        let bridge = &mut list["plugins"][0];
        bridge["capabilities"] = json!({ "ips": true });
        let ipam = &mut bridge["ipam"];
        ipam["ranges"]
            .as_array_mut()
            .expect("ranges")
            .push(json!([{ "subnet": "fd00:20::/64", "gateway": "fd00:20::1" }]));
        ipam["routes"].as_array_mut().expect("routes").push(json!({ "dst": "::/0" }));
        self.node.write_conflist(&list)
    }

    fn diagnostics(&self) -> String {
        let out =
            self.node.ns.sh("echo '--- iptables-save'; iptables-save; echo '--- nft list ruleset'; nft list ruleset; \
             echo '--- neighbours'; ip neigh; echo '--- addresses'; ip -br addr");
        format!(
            "{}{}\n--- plugin log\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.node.log()
        )
    }

    /// One TCP request to the node's uplink address `host`; the answer's first line.
    fn request(&self, host: &str, port: u16, timeout_s: u32) -> Option<String> {
        let out =
            self.client.sh(&format!("socat -T{timeout_s} - TCP:{host}:{port},connect-timeout={timeout_s} </dev/null"));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    #[track_caller]
    fn expect_reply(&self, port: u16, expected: &str) {
        self.expect_reply_at(UPLINK, port, expected);
    }

    #[track_caller]
    fn expect_reply_at(&self, host: &str, port: u16, expected: &str) {
        let mut last = None;
        let got = wait_for(
            || {
                last = self.request(host, port, 3);
                last.as_deref() == Some(expected)
            },
            REPLY_TIMEOUT,
        );
        assert!(got, "{host}:{port}: expected {expected:?}, last reply {last:?}\n{}", self.diagnostics());
    }
}

/// A pod namespace with what its runtime passes: CNI_ARGS (pod identity), requested addresses.
struct Pod {
    ns: Netns,
    id: String,
    args: String,
    ips: Option<String>,
    result: Value,
}

impl Pod {
    fn new(node: &Node, name: &str, args: &str) -> Pod {
        // Unknown keys make bridge and host-local refuse CNI_ARGS unless told to ignore them.
        let args = format!("IgnoreUnknown=1;{args}");
        Pod { ns: node.add_pod(name), id: format!("ctr-{name}"), args, ips: None, result: Value::Null }
    }

    /// A pod that asks host-local for `ips` (the `ips` capability).
    fn with_ips(node: &Node, name: &str, ips: &[&str]) -> Pod {
        Pod { ips: Some(json!(ips).to_string()), ..Pod::new(node, name, "") }
    }

    /// A pod of Kubernetes namespace "default" named `name`.
    fn k8s(node: &Node, name: &str) -> Pod {
        Pod::new(node, name, &format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"))
    }

    fn cni(&self, node: &Node, cmd: &str, conf: &Path) -> DriverOutput {
        let mut extra = vec!["--args", &self.args];
        if let Some(ips) = &self.ips {
            extra.extend(["--ips", ips.as_str()]);
        }
        node.cni(cmd, conf, &self.ns, &self.id, "eth0", &extra)
    }

    #[track_caller]
    fn add(&mut self, site: &Site, conf: &Path) {
        let out = self.cni(&site.node, "add", conf);
        out.assert_ok(&format!("ADD {}", self.id));
        self.result = out.json.expect("ADD prints a JSON result");
        site.node.assert_backend_in_use();
    }

    fn ipv4(&self) -> String {
        common::result_ip(&self.result, false)
    }

    fn ipv6(&self) -> String {
        common::result_ip(&self.result, true)
    }

    /// The MAC of the pod's own interface, as the bridge plugin reported it.
    fn mac(&self) -> String {
        let ifaces = self.result["interfaces"].as_array().cloned().unwrap_or_default();
        let pod = ifaces.iter().find(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()));
        pod.and_then(|i| i["mac"].as_str()).expect("the result names the pod's MAC").to_lowercase()
    }

    fn serve(&self, reply: &str) -> Background {
        self.ns.spawn(&format!("exec socat TCP6-LISTEN:8080,ipv6only=0,reuseaddr,fork SYSTEM:'echo {reply}'"))
    }
}

fn rule(name: &str, host_port: u16, target: Value) -> Value {
    let mut r = json!({ "name": name, "hostPort": host_port, "destPort": 8080, "protocol": "tcp" });
    for (k, v) in target.as_object().expect("target fields").clone() {
        r[k] = v;
    }
    r
}

// ---------------------------------------------------------------- tests

/// A rule naming `default/web-*` forwards to whichever address host-local gave the pod; after DEL
/// and a re-ADD under a new name and a new address it forwards there; a second live pod matching
/// the rule is refused as a host-port conflict naming both.
fn forward_follows_the_pod_its_rule_names(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let conf = site.conflist(&[rule("web", 30090, json!({ "pod": "default/web-*" }))]);
    // Another pod takes the first address, so the web pod's is none a destIP could have foreseen.
    let mut other = Pod::k8s(&site.node, "db-0");
    other.add(&site, &conf);
    let _other_srv = other.serve("db-0");
    let mut first = Pod::k8s(&site.node, "web-5f7c9");
    first.add(&site, &conf);
    assert_ne!(first.ipv4(), other.ipv4());
    let _srv = first.serve("web-5f7c9");
    site.expect_reply(30090, "web-5f7c9");

    first.cni(&site.node, "del", &conf).assert_ok("DEL the first web pod");
    let mut second = Pod::k8s(&site.node, "web-8b2d1");
    second.add(&site, &conf);
    assert_ne!(second.ipv4(), first.ipv4(), "host-local gives the re-created pod a new address");
    let _srv2 = second.serve("web-8b2d1");
    site.expect_reply(30090, "web-8b2d1");
    // CHECK plans with the same pod and finds the forward it installed.
    second.cni(&site.node, "check", &conf).assert_ok("CHECK the second web pod");

    let mut third = Pod::k8s(&site.node, "web-a1b2c");
    let out = third.cni(&site.node, "add", &conf);
    assert_eq!(error_code(&out), Some(101), "a second pod for the rule is a conflict: {out:?}\n{}", site.diagnostics());
    let msg = error_msg(&out);
    for needle in [second.id.as_str(), third.id.as_str(), "30090"] {
        assert!(msg.contains(needle), "conflict message lacks {needle:?}: {msg}");
    }
    third.result = Value::Null;
    site.expect_reply(30090, "web-8b2d1");
}
both_backends!(forward_follows_the_pod_its_rule_names);

/// A static rule nobody binds (a destIP no pod holds, a pod that is not there) is named in a
/// warning after ADD, with its target and the attachment added; rules that bound are not.
fn rule_that_binds_nothing_is_warned_about(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let conf = site.conflist(&[
        rule("ghost", 30091, json!({ "destIP": "10.20.0.49" })),
        rule("first-address", 30092, json!({ "destIP": "10.20.0.10" })),
        rule("absent", 30093, json!({ "pod": "default/nobody" })),
        rule("mine", 30094, json!({ "pod": "default/a" })),
    ]);
    let mut a = Pod::k8s(&site.node, "a");
    a.add(&site, &conf);
    assert_eq!(a.ipv4(), "10.20.0.10");
    let log = site.node.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("binds no live attachment")).collect();
    let ghost = warnings.iter().find(|l| l.contains("portForwarding.rules[0] \"ghost\""));
    let ghost = ghost.unwrap_or_else(|| panic!("no warning for rule 0 \"ghost\":\n{log}"));
    assert!(ghost.contains("destIP 10.20.0.49") && ghost.contains("ctr-a"), "{ghost}");
    let absent = warnings.iter().find(|l| l.contains("portForwarding.rules[2] \"absent\""));
    assert!(absent.is_some_and(|l| l.contains("pod default/nobody")), "no warning for rule 2:\n{log}");
    for bound in ["rules[1]", "rules[3]"] {
        assert!(!warnings.iter().any(|l| l.contains(bound)), "{bound} is bound, yet warned:\n{log}");
    }
    // Rules nobody binds are no fault of this attachment's.
    a.cni(&site.node, "check", &conf).assert_ok("CHECK pod a beside rules nobody binds");

    // Rules 1 and 3 stay bound by pod a while others come; once a is gone, the next ADD says so.
    let unbound_after = |pod: &mut Pod| {
        let before = site.node.log().len();
        pod.add(&site, &conf);
        let log = site.node.log();
        let new: Vec<String> =
            log[before..].lines().filter(|l| l.contains("binds no live attachment")).map(String::from).collect();
        new
    };
    let mut b = Pod::k8s(&site.node, "b");
    let warned = unbound_after(&mut b);
    for held in ["rules[1]", "rules[3]"] {
        assert!(!warned.iter().any(|l| l.contains(held)), "{held} is held by pod a: {warned:?}");
    }
    a.cni(&site.node, "del", &conf).assert_ok("DEL pod a");
    let mut c = Pod::k8s(&site.node, "c");
    let warned = unbound_after(&mut c);
    let mine = warned.iter().find(|l| l.contains("portForwarding.rules[3] \"mine\""));
    assert!(mine.is_some_and(|l| l.contains("pod default/a") && l.contains("ctr-c")), "{warned:?}");
}
both_backends!(rule_that_binds_nothing_is_warned_about);

/// A pod re-created with the addresses it had (IPv4 and IPv6) and a new MAC answers through its
/// forwards on the first try after ADD, although the node's neighbour entries held the old MAC, as
/// REACHABLE.
fn recreated_pod_with_its_old_addresses_answers_at_once(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    const ADDR: &str = "10.20.0.20";
    const ADDR6: &str = "fd00:20::20";
    let conf = site.dual_stack_conflist(&[
        rule("web", 30095, json!({ "destIP": ADDR })),
        rule("web6", 30096, json!({ "destIP": ADDR6 })),
    ]);
    // As on a node with other pods: the bridge keeps its carrier while one pod is re-created, and
    // its MAC is fixed; either change would make the kernel flush the bridge's neighbour entries.
    let mut neighbour = Pod::new(&site.node, "keeper", "");
    neighbour.add(&site, &conf);
    site.node.ns.sh_ok(&format!("ip link set {} address 02:00:00:00:be:01", common::BRIDGE));
    let mut old = Pod::with_ips(&site.node, "old", &[ADDR, ADDR6]);
    old.add(&site, &conf);
    assert_eq!((old.ipv4(), old.ipv6()), (ADDR.to_string(), ADDR6.to_string()));
    let old_mac = old.mac();
    let srv = old.serve("old");
    site.expect_reply_at(UPLINK, 30095, "old");
    site.expect_reply_at(UPLINK6, 30096, "old");
    old.cni(&site.node, "del", &conf).assert_ok("DEL the old pod");
    drop(srv);

    let dev = common::BRIDGE;
    for addr in [ADDR, ADDR6] {
        site.node.ns.sh_ok(&format!("ip neigh replace {addr} lladdr {old_mac} dev {dev} nud reachable"));
        let before = site.node.ns.sh_ok(&format!("ip neigh show {addr} dev {dev}"));
        assert!(before.contains(&old_mac) && before.contains("REACHABLE"), "entry before ADD: {before}");
    }
    // Entries for other addresses are not the ADD's business.
    const OTHERS: [&str; 2] = ["10.20.0.49", "fd00:20::49"];
    for addr in OTHERS {
        site.node.ns.sh_ok(&format!("ip neigh replace {addr} lladdr 02:00:00:00:00:49 dev {dev} nud permanent"));
    }

    let mut new = Pod::with_ips(&site.node, "new", &[ADDR, ADDR6]);
    let _srv = new.serve("new");
    new.add(&site, &conf);
    assert_eq!((new.ipv4(), new.ipv6()), (ADDR.to_string(), ADDR6.to_string()));
    assert_ne!(new.mac(), old_mac, "the re-created pod has a new MAC");
    for (host, port, addr) in [(UPLINK, 30095, ADDR), (UPLINK6, 30096, ADDR6)] {
        let reply = site.request(host, port, 1);
        let after = site.node.ns.sh(&format!("ip neigh show {addr} dev {}", common::BRIDGE));
        assert_eq!(
            reply.as_deref(),
            Some("new"),
            "first request to {host}:{port} after ADD; neighbour entry now: {}\n{}",
            String::from_utf8_lossy(&after.stdout),
            site.diagnostics()
        );
    }
    for addr in OTHERS {
        let entry = site.node.ns.sh_ok(&format!("ip neigh show {addr} dev {dev}"));
        assert!(entry.contains("02:00:00:00:00:49") && entry.contains("PERMANENT"), "{addr}: {entry}");
    }
}
both_backends!(recreated_pod_with_its_old_addresses_answers_at_once);
