//! CNI protocol conformance through a real runtime library (libcni): ADD,
//! CHECK and DEL (twice) for every supported spec version, chained after
//! Debian's bridge + host-local.

mod common;

use common::{require_root, Node};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn add_check_del(version: &str) {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let pod = node.add_pod("pod");
    let conf = node.write_conflist(&node.conflist(version, node.bridge_nat_entry()));
    let run = |cmd: &str| node.cni(cmd, &conf, &pod, "ctr-proto", "eth0", &[]);

    let add = run("add");
    add.assert_ok(&format!("ADD at {version}"));
    let result = add.json.as_ref().expect("ADD prints a JSON result");
    assert_eq!(
        result["cniVersion"], version,
        "result version must match the config: {result}"
    );
    assert!(
        add.addresses().iter().any(|a| a.starts_with("10.20.0.")),
        "ADD result lacks the pod address: {result}\nlog:\n{}",
        node.log()
    );

    if version >= "0.4.0" {
        run("check").assert_ok(&format!("CHECK at {version}"));
    }
    run("del").assert_ok(&format!("DEL at {version}"));
    run("del").assert_ok(&format!("second DEL at {version}"));
}

#[test]
fn cni_0_3_0() {
    add_check_del("0.3.0");
}

#[test]
fn cni_0_3_1() {
    add_check_del("0.3.1");
}

#[test]
fn cni_0_4_0() {
    add_check_del("0.4.0");
}

#[test]
fn cni_1_0_0() {
    add_check_del("1.0.0");
}

#[test]
fn cni_1_1_0() {
    add_check_del("1.1.0");
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
        assert!(
            supported.contains(&version),
            "{version} missing from {supported:?}"
        );
    }
}
