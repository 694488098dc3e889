//! `install.sh --demo` runs tests/demo.sh against the installed binary; here it runs against the
//! binary cargo built, so the demo a newcomer sees is checked on every run.

mod common;

use std::process::Command;

#[test]
fn two_uplink_demo_runs_and_leaves_the_node_clean() {
    if !common::require_root() {
        return;
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{dir}/tests/demo.sh"))
        .arg(common::plugin_bin_dir())
        .output()
        .expect("run tests/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    for needle in [
        "replies: the uplink it arrived on (eth0, eth5)",
        "client A   -> 198.51.100.1:2376",
        "client B   -> 192.0.2.1:2376",
        "client B   -> [2001:db8:b::1]:8443  hello from the pod",
        "table dind_net1 (IPv6)  default via fe80::1 dev eth5",
        "answered again after",
        "DEL done",
        "demo passed",
    ] {
        assert!(stdout.contains(needle), "the demo's output lacks {needle:?}:\n{stdout}");
    }
}
