//! The CNI protocol at its edges: error codes a person can act on, nothing changed by a refused
//! call, idempotent ADD and DEL, the lock's bounded wait, GC and STATUS. What touches the
//! firewall runs under both backends (`NAME::iptables`, `NAME::nftables`).

mod common;

use common::{both_backends, error_code, require_root, Backend, DriverOutput, Node, NFT_TABLE};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const CID: &str = "ctr-edge";

/// A node with one pod attached through libcni; returns the conflist and the ADD result.
fn attached(node: &Node, entry: Value, version: &str) -> (std::path::PathBuf, Value, common::Netns) {
    let pod = node.add_pod("pod");
    let conf = node.write_conflist(&node.conflist(version, entry));
    let add = node.cni("add", &conf, &pod, CID, "net1", &[]);
    add.assert_ok("ADD");
    node.assert_backend_in_use();
    let result = add.json.clone().expect("ADD result");
    (conf, result, pod)
}

/// The plugin's own stdin for a direct call, as a runtime builds it.
fn stdin_for(entry: &Value, version: &str, prev: Option<&Value>) -> Value {
    let mut conf = entry.clone();
    conf["name"] = json!("dind");
    conf["cniVersion"] = json!(version);
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    conf
}

fn direct(node: &Node, command: &str, netns: &str, stdin: &Value) -> DriverOutput {
    node.exec_plugin(
        &[("CNI_COMMAND", command), ("CNI_CONTAINERID", CID), ("CNI_NETNS", netns), ("CNI_IFNAME", "net1")],
        stdin,
    )
}

fn assert_code(out: &DriverOutput, code: i64, mentions: &str) {
    assert!(!out.status_ok, "expected failure with code {code}, got success: {}", out.stdout);
    assert_eq!(error_code(out), Some(code), "stdout: {} stderr: {}", out.stdout, out.stderr);
    let msg = out.json.as_ref().and_then(|j| j["msg"].as_str()).unwrap_or_default();
    assert!(msg.contains(mentions), "message {msg:?} should mention {mentions:?}");
    assert_eq!(out.stdout.trim().lines().count(), 1, "stdout holds only the error JSON: {}", out.stdout);
}

#[test]
fn a_person_at_a_shell_gets_the_version_on_stderr_and_nothing_on_stdout() {
    let out = Command::new(env!("CARGO_BIN_EXE_bridge-nat")).env_remove("CNI_COMMAND").output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty(), "stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bridge-nat") && err.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{err}");
}

fn refused_calls_name_the_problem_and_change_nothing(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    let entry = node.bridge_nat_entry();
    let (_conf, result, pod) = attached(&node, entry.clone(), "1.0.0");
    let netns = pod.path().to_string_lossy().to_string();
    let before = node.snapshot();

    assert_code(&direct(&node, "ADD", &netns, &stdin_for(&entry, "1.0.0", None)), 7, "after \"bridge\"");
    let raw = |text: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", node.ns.name(), env!("CARGO_BIN_EXE_bridge-nat")]);
        cmd.envs([
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", CID),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/usr/lib/cni"),
        ]);
        let mut child = cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        serde_json::from_slice::<Value>(&out.stdout).expect("error JSON on stdout")
    };
    assert_eq!(raw("{not json")["code"], 6);
    assert_eq!(raw("[\"1.0.0\", \"dind\"]")["code"], 6);
    let wrong_type =
        raw(r#"{"cniVersion":"1.0.0","name":"dind","portForwarding":{"rules":[{"hostPort":"x","destPort":1}]}}"#);
    assert_eq!(wrong_type["code"], 6);
    assert!(wrong_type["msg"].as_str().unwrap().contains("portForwarding.rules[0].hostPort"), "{wrong_type}");

    let with = |patch: Value| {
        let mut stdin = stdin_for(&entry, "1.0.0", Some(&result));
        for (k, v) in patch.as_object().unwrap() {
            stdin[k] = v.clone();
        }
        stdin
    };
    let bad_port = with(json!({"portForwarding": {"rules": [{"name": "x", "hostPort": 0, "destPort": 80}]}}));
    assert_code(&direct(&node, "ADD", &netns, &bad_port), 7, "hostPort: 0");
    let outside = with(json!({"portForwarding": {"rules": [{"hostPort": 80, "destPort": 80, "destIP": "10.99.0.1"}]}}));
    assert_code(&direct(&node, "ADD", &netns, &outside), 7, "destIP: 10.99.0.1 is outside the bridge subnet");
    let shell = with(json!({"name": "dind;reboot"}));
    assert_code(&direct(&node, "ADD", &netns, &shell), 7, "name");

    assert_code(&direct(&node, "ADD", &netns, &stdin_for(&entry, "9.9.9", Some(&result))), 1, "9.9.9");
    assert_code(&direct(&node, "CHECK", &netns, &stdin_for(&entry, "0.3.1", Some(&result))), 1, "0.4.0");
    assert_code(&direct(&node, "GC", &netns, &stdin_for(&entry, "1.0.0", None)), 1, "1.1.0");
    assert_code(&direct(&node, "FROB", &netns, &stdin_for(&entry, "1.0.0", None)), 4, "CNI_COMMAND");
    let bad_id = node.exec_plugin(
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "$(reboot)"), ("CNI_NETNS", &netns), ("CNI_IFNAME", "net1")],
        &stdin_for(&entry, "1.0.0", Some(&result)),
    );
    assert_code(&bad_id, 4, "CNI_CONTAINERID");
    let no_netns = node.exec_plugin(
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", CID), ("CNI_IFNAME", "net1")],
        &stdin_for(&entry, "1.0.0", Some(&result)),
    );
    assert_code(&no_netns, 4, "CNI_NETNS");

    assert_eq!(node.snapshot(), before, "a refused call changed the node");
}
both_backends!(refused_calls_name_the_problem_and_change_nothing);

/// The host-port forwards of `port` the node's firewall holds (iptables DNAT rules, or
/// dnat4-any elements).
fn forwards_of(node: &Node, port: u16) -> Vec<String> {
    match node.backend() {
        Backend::Iptables => {
            let needle = format!("--dport {port} ");
            let nat = node.ns.sh_ok("iptables-save -t nat");
            nat.lines().filter(|l| l.starts_with("-A ") && l.contains(&needle)).map(String::from).collect()
        }
        Backend::Nftables => {
            let key = format!(" . {port} : ");
            node.nft_elements("dnat4-any").into_iter().filter(|e| e.contains(&key)).collect()
        }
    }
}

fn add_twice_replaces_and_del_is_idempotent(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    let mut entry = node.bridge_nat_entry();
    entry["portForwarding"] = json!({"rules": [{"name": "web", "hostPort": 30080, "destPort": 8080}]});
    let (_conf, result, pod) = attached(&node, entry.clone(), "1.0.0");
    let netns = pod.path().to_string_lossy().to_string();
    let stdin = stdin_for(&entry, "1.0.0", Some(&result));
    let again = direct(&node, "ADD", &netns, &stdin);
    assert!(again.status_ok, "{}", again.stdout);
    assert_eq!(again.json.as_ref(), Some(&result), "ADD prints prevResult unchanged");
    let pod_ip = common::result_ip(&result, false);
    let dnat = forwards_of(&node, 30080);
    assert!(
        dnat.len() == 1 && dnat[0].contains(&pod_ip),
        "want exactly one forward of 30080 to {pod_ip} after a repeated ADD: {dnat:?}"
    );
    let table_after_add = node.nft_table();

    let state = node.state_dir();
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    let record = std::fs::read_dir(state.join("records/dind")).unwrap().next().unwrap().unwrap().path();
    assert_eq!(std::fs::metadata(&record).unwrap().permissions().mode() & 0o777, 0o600);

    let del_stdin = stdin_for(&entry, "1.0.0", None);
    assert!(direct(&node, "DEL", &netns, &del_stdin).status_ok);
    assert!(direct(&node, "DEL", &netns, &del_stdin).status_ok, "second DEL");
    assert!(direct(&node, "DEL", "/var/run/netns/gone-away", &del_stdin).status_ok, "DEL with a vanished netns");
    let none = node
        .exec_plugin(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "never-added"), ("CNI_IFNAME", "net1")], &del_stdin);
    assert!(none.status_ok, "DEL without record and without CNI_NETNS: {}", none.stdout);
    assert_eq!(node.iptables_traces(), Vec::<String>::new(), "iptables rules left after DEL");
    assert!(!node.nft_table_exists(), "table inet {NFT_TABLE} left after DEL:\n{table_after_add:?}");
}
both_backends!(add_twice_replaces_and_del_is_idempotent);

#[test]
fn a_held_lock_times_out_with_code_11() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let mut entry = node.bridge_nat_entry();
    entry["lockTimeoutMs"] = json!(300);
    let (_conf, result, pod) = attached(&node, entry.clone(), "1.0.0");
    let lock = node.state_dir().join("lock");
    let _holder = node.ns.spawn(&format!("exec flock {} sleep 30", lock.display()));
    assert!(common::wait_for(
        || { Command::new("flock").args(["-n", lock.to_str().unwrap(), "true"]).status().is_ok_and(|s| !s.success()) },
        std::time::Duration::from_secs(5)
    ));
    let netns = pod.path().to_string_lossy().to_string();
    let out = direct(&node, "ADD", &netns, &stdin_for(&entry, "1.0.0", Some(&result)));
    assert_code(&out, 11, "lock");
}

fn gc_removes_what_the_runtime_forgot_and_keeps_the_rest(backend: Backend) {
    if !require_root() {
        return;
    }
    let node = Node::with_backend(backend);
    let mut entry = node.bridge_nat_entry();
    entry["capabilities"] = json!({"portMappings": true});
    let conf = node.write_conflist(&node.conflist("1.1.0", entry));
    let keep = node.add_pod("keep");
    let forget = node.add_pod("forget");
    node.cni("add", &conf, &keep, "keep", "net1", &["--port-mappings", r#"[{"hostPort":30001,"containerPort":80}]"#])
        .assert_ok("ADD keep");
    node.cni(
        "add",
        &conf,
        &forget,
        "forget",
        "net1",
        &["--port-mappings", r#"[{"hostPort":30002,"containerPort":80}]"#],
    )
    .assert_ok("ADD forget");
    node.assert_backend_in_use();
    assert!(forwards_of(&node, 30002).len() == 1, "no forward of 30002 before GC");

    node.cni_gc(&conf, &[("keep", "net1")]).assert_ok("GC");
    let kept = forwards_of(&node, 30001);
    assert_eq!(kept.len(), 1, "GC removed a valid attachment's forward: {kept:?}");
    let forgotten = forwards_of(&node, 30002);
    assert!(forgotten.is_empty(), "GC left a forgotten attachment's forward: {forgotten:?}");
    let records: Vec<String> = std::fs::read_dir(node.state_dir().join("records/dind"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(records, vec!["keep.net1.json".to_string()]);
    node.cni("check", &conf, &keep, "keep", "net1", &[]).assert_ok("CHECK of the kept attachment after GC");
    node.cni("del", &conf, &forget, "forget", "net1", &[]).assert_ok("DEL of a GC'd attachment");
    assert_eq!(forwards_of(&node, 30001).len(), 1, "DEL of the GC'd attachment removed the kept forward");
}
both_backends!(gc_removes_what_the_runtime_forgot_and_keeps_the_rest);

#[test]
fn status_reports_whether_add_can_be_served() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let entry = node.bridge_nat_entry();
    let conf = node.write_conflist(&node.conflist("1.1.0", entry.clone()));
    node.cni_status(&conf).assert_ok("STATUS");

    let mut broken = entry;
    let blocker = node.dir().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    broken["stateDir"] = json!(blocker);
    let conf = node.write_conflist(&node.conflist("1.1.0", broken));
    let out = node.cni_status(&conf);
    assert_eq!(error_code(&out), Some(50), "{} {}", out.stdout, out.stderr);
}

#[test]
fn a_panic_becomes_a_cni_error_not_a_trace_on_stdout() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let entry = node.bridge_nat_entry();
    let (_conf, result, pod) = attached(&node, entry.clone(), "1.0.0");
    let netns = pod.path().to_string_lossy().to_string();
    let out = node.exec_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ctr-panic"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "net1"),
            ("BRIDGE_NAT_CRASH_AT", "panic:add:after-intent"),
        ],
        &stdin_for(&entry, "1.0.0", Some(&result)),
    );
    assert_code(&out, 199, "panicked");
    assert!(out.stderr.contains("crash point add:after-intent"), "the panic message goes to stderr: {}", out.stderr);
}
