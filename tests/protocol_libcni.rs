//! CNI protocol conformance through a real runtime library (libcni): ADD,
//! CHECK and DEL (twice) for every supported spec version, chained after
//! Debian's bridge + host-local, under both firewall backends (`cni_X_Y_Z::iptables`,
//! `cni_X_Y_Z::nftables`).

mod common;

use common::{both_backends, require_root, Backend, Node};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A node as bridge-nat finds it in the field: the bridge exists with its gateway (the bridge
/// plugin never removes it) and other components own rules in every table bridge-nat touches.
fn prime_like_a_real_node(node: &Node, iptables: &str) {
    node.ns.sh_ok(&format!(
        "iptables() {{ command {iptables} \"$@\"; }}; ip6tables() {{ command {ip6tables} \"$@\"; }}; ip link add dind-br0 type bridge && ip addr add 10.20.0.1/24 dev dind-br0 && ip link set dind-br0 up && \
         for t in nat filter mangle; do iptables -t $t -N KUBE-LIKE && iptables -t $t -A KUBE-LIKE -j RETURN; done && \
         iptables -t nat -A PREROUTING -j KUBE-LIKE && iptables -t filter -A FORWARD -j KUBE-LIKE && \
         iptables -t mangle -A PREROUTING -j KUBE-LIKE && ip6tables -t nat -S >/dev/null && ip6tables -S >/dev/null",
        ip6tables = iptables.replace("iptables", "ip6tables")
    ));
}

fn add_check_del(version: &str, backend: Backend) {
    add_check_del_with(version, "iptables", backend);
}

/// `iptables` is the binary the node's other components use (and, under the iptables backend,
/// the plugin's `iptables` setting).
fn add_check_del_with(version: &str, iptables: &str, backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    let pod = node.add_pod("pod");
    let mut entry = node.bridge_nat_entry();
    if backend == Backend::Iptables {
        entry["iptables"] = serde_json::json!(iptables);
    }
    entry["capabilities"] = serde_json::json!({"portMappings": true});
    entry["portForwarding"] =
        serde_json::json!({"rules": [{"name": "web", "hostPort": 30080, "destPort": 8080, "protocol": "tcp"}]});
    let conf = node.write_conflist(&node.conflist(version, entry));
    let mappings = r#"[{"hostPort": 5353, "containerPort": 53, "protocol": "udp"}]"#;
    let run = |cmd: &str| node.cni(cmd, &conf, &pod, "ctr-proto", "eth0", &["--port-mappings", mappings]);
    prime_like_a_real_node(&node, iptables);
    let before = node.snapshot();

    let add = run("add");
    add.assert_ok(&format!("ADD at {version}"));
    let result = add.json.as_ref().expect("ADD prints a JSON result");
    assert_eq!(result["cniVersion"], version, "result version must match the config: {result}");
    assert!(
        add.addresses().iter().any(|a| a.starts_with("10.20.0.")),
        "ADD result lacks the pod address: {result}\nlog:\n{}",
        node.log()
    );

    node.assert_backend_in_use();
    match backend {
        Backend::Iptables => {
            let nat = node.ns.sh_ok(&format!("{iptables}-save -t nat"));
            for want in ["--dport 30080", "--dport 5353", "-j DNAT --to-destination 10.20.0."] {
                assert!(nat.contains(want), "ADD at {version} installed no {want:?}:\n{nat}");
            }
        }
        Backend::Nftables => {
            let pod_ip = common::result_ip(result, false);
            let dnat = node.nft_elements("dnat4-any");
            let want = [format!("tcp . 30080 : {pod_ip} . 8080"), format!("udp . 5353 : {pod_ip} . 53")];
            assert_eq!(dnat, want, "ADD at {version}: dnat4-any");
        }
    }

    if version >= "0.4.0" {
        run("check").assert_ok(&format!("CHECK at {version}"));
    }
    // At 0.3.x libcni sends DEL without prevResult: the record alone must be enough.
    run("del").assert_ok(&format!("DEL at {version}"));
    assert_eq!(node.snapshot(), before, "DEL at {version} left something behind");
    run("del").assert_ok(&format!("second DEL at {version}"));
}

fn cni_0_3_0(backend: Backend) {
    add_check_del("0.3.0", backend);
}

fn cni_0_3_1(backend: Backend) {
    add_check_del("0.3.1", backend);
}

fn cni_0_4_0(backend: Backend) {
    add_check_del("0.4.0", backend);
}

fn cni_1_0_0(backend: Backend) {
    add_check_del("1.0.0", backend);
}

fn cni_1_1_0(backend: Backend) {
    add_check_del("1.1.0", backend);
}

both_backends!(cni_0_3_0, cni_0_3_1, cni_0_4_0, cni_1_0_0, cni_1_1_0);

/// The iptables backend with `"iptables": "iptables-legacy"` (no nftables counterpart).
#[test]
fn iptables_legacy_backend() {
    add_check_del_with("1.0.0", "iptables-legacy", Backend::Iptables);
}

#[test]
fn version_lists_every_supported_spec() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let out = node.driver(&["version", "--plugin", "bridge-nat"]);
    out.assert_ok("VERSION");
    let info = out.json.expect("VERSION prints JSON");
    let supported: Vec<&str> = info["supportedVersions"]
        .as_array()
        .expect("supportedVersions array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for version in VERSIONS {
        assert!(supported.contains(&version), "{version} missing from {supported:?}");
    }
}
