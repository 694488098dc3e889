//! What runtimes really send. containerd's CRI plugin (go-cni) writes `runtimeConfig.portMappings`
//! with capitalised keys and `"HostIP": ""`; bridge-nat reads them as portmap (Go) does. A DEL
//! never fails because of runtime input it cannot use, so libcni goes on to `bridge` and
//! `host-local` and the pod's address is released; a config that does not decode still lets DEL
//! remove the record's attachment; every failure reaches the plugin's log file and answers in the
//! config's cniVersion. Real packets, through libcni, chained after Debian's bridge + host-local.
//! (tests/containerd.rs drives the same path with a real containerd.)

mod common;

use common::{both_backends, error_code, require_root, wait_for, Backend, DriverOutput, Netns, Node};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const UPLINK: &str = "203.0.113.1";
const CLIENT: &str = "203.0.113.2";
const VERSION: &str = "1.0.0";
const CID: &str = "ctr-kubelet";

/// Exactly what containerd 1.6 passes for a pod with two `hostPort`s (go-cni's PortMapping has no
/// JSON tags).
const GO_CNI_MAPPINGS: &str = r#"[{"HostPort":30080,"ContainerPort":8080,"Protocol":"tcp","HostIP":""},
                                  {"HostPort":30053,"ContainerPort":5353,"Protocol":"udp","HostIP":""}]"#;

struct Site {
    node: Node,
    client: Netns,
    pod: Netns,
    conf: PathBuf,
}

impl Site {
    fn new(backend: Backend) -> Site {
        let node = Node::with_backend(backend);
        node.prime_firewall();
        let client = Netns::new("bn-client");
        node.veth_to(&client, "up0", "eth0", &format!("{UPLINK}/24"), &format!("{CLIENT}/24"));
        let mut entry = node.bridge_nat_entry();
        entry["capabilities"] = json!({ "portMappings": true });
        let conf = node.write_conflist(&node.conflist(VERSION, entry));
        let pod = node.add_pod("pod");
        Site { node, client, pod, conf }
    }

    fn cni(&self, cmd: &str, mappings: &str) -> DriverOutput {
        self.node.cni(cmd, &self.conf, &self.pod, CID, "eth0", &["--port-mappings", mappings])
    }

    /// host-local's lease files (one per address handed out), in its data directory.
    fn leases(&self) -> Vec<String> {
        let dir = self.node.ipam_dir().join(common::NETWORK_NAME);
        let names = std::fs::read_dir(dir).into_iter().flatten().flatten();
        let names = names.map(|e| e.file_name().to_string_lossy().into_owned());
        names.filter(|n| n.parse::<std::net::IpAddr>().is_ok()).collect()
    }

    /// The node's firewall, rules and routes, less the bridge's own routes: the bridge plugin
    /// creates the bridge on the first ADD and never deletes it.
    fn state(&self) -> String {
        let snap = self.node.snapshot();
        snap.lines().filter(|l| !l.contains(common::BRIDGE)).collect::<Vec<_>>().join("\n")
    }

    fn diagnostics(&self) -> String {
        let out = self.node.ns.sh("nft list ruleset; iptables-save; ip -br addr");
        format!("{}\n--- plugin log\n{}", String::from_utf8_lossy(&out.stdout), self.node.log())
    }

    fn tcp_reply(&self, port: u16) -> Option<String> {
        let out = self.client.sh(&format!("socat -T2 - TCP:{UPLINK}:{port},connect-timeout=2 </dev/null"));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!text.is_empty()).then_some(text)
    }

    fn udp_reply(&self, port: u16) -> Option<String> {
        let out = self.client.sh(&format!("echo ping | socat -T2 - UDP:{UPLINK}:{port}"));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!text.is_empty()).then_some(text)
    }
}

/// The pod's TCP and UDP servers, each answering with its own word.
fn serve(pod: &Netns) -> (common::Background, common::Background) {
    let tcp = pod.spawn("exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo tcp-pod'");
    let udp = pod.spawn("exec socat UDP-LISTEN:5353,reuseaddr,fork SYSTEM:'echo udp-pod'");
    (tcp, udp)
}

/// A pod started and stopped the way kubelet does it through containerd: ADD, CHECK and DEL all
/// carry go-cni's capitalised port mappings. Both forwards carry real packets, and DEL leaves the
/// node as it was, with host-local's lease released.
fn containerd_port_mappings_forward_and_del_releases_everything(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let before = site.state();
    site.cni("add", GO_CNI_MAPPINGS).assert_ok("ADD with go-cni's port mappings");
    let (_tcp, _udp) = serve(&site.pod);
    let mut got = (None, None);
    let answered = wait_for(
        || {
            got = (site.tcp_reply(30080), site.udp_reply(30053));
            got.0.as_deref() == Some("tcp-pod") && got.1.as_deref() == Some("udp-pod")
        },
        Duration::from_secs(10),
    );
    assert!(answered, "forwards from go-cni's mappings: got {got:?}\n{}", site.diagnostics());
    site.cni("check", GO_CNI_MAPPINGS).assert_ok("CHECK with go-cni's port mappings");
    let record = site.node.record(CID, "eth0").expect("a record after ADD");
    assert!(record.to_string().contains("30053"), "the record holds the UDP forward: {record}");
    assert_eq!(site.leases().len(), 1, "host-local leased one address");

    site.cni("del", GO_CNI_MAPPINGS).assert_ok("DEL with go-cni's port mappings");
    assert!(site.node.record(CID, "eth0").is_none(), "DEL forgets the record");
    assert!(site.leases().is_empty(), "DEL reached host-local: leases left {:?}", site.leases());
    assert_eq!(site.state(), before, "the node is as before the ADD");
}
both_backends!(containerd_port_mappings_forward_and_del_releases_everything);

/// Runtime input bridge-nat cannot use fails ADD cleanly (code 6, naming the field, nothing of
/// bridge-nat's installed), but never DEL: the DEL that follows goes through to bridge and
/// host-local, and a DEL of a live pod with such input removes everything from the record.
fn unusable_runtime_input_fails_add_but_never_del(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let before = site.state();
    let bad = r#"[{"HostPort":"thirty","ContainerPort":8080,"Protocol":"tcp"}]"#;
    let add = site.cni("add", bad);
    assert_eq!(error_code(&add), Some(6), "{add:?}");
    let msg = common::error_msg(&add);
    assert!(msg.contains("runtimeConfig.portMappings[0].hostPort"), "the error names the field: {msg}");
    assert!(site.node.record(CID, "eth0").is_none(), "a refused ADD records nothing");
    site.cni("del", bad).assert_ok("DEL after the refused ADD, with the same input");
    assert!(site.leases().is_empty(), "the runtime's DEL released the address: {:?}", site.leases());

    site.cni("add", GO_CNI_MAPPINGS).assert_ok("ADD");
    site.cni("del", "[5]").assert_ok("DEL with port mappings that do not decode");
    assert!(site.node.record(CID, "eth0").is_none(), "DEL worked from the record");
    assert!(site.leases().is_empty(), "host-local got its DEL: {:?}", site.leases());
    assert_eq!(site.state(), before, "the node is as before the first ADD");
    let log = site.node.log();
    assert!(log.contains("ignoring runtimeConfig"), "the log says what DEL ignored:\n{log}");
}
both_backends!(unusable_runtime_input_fails_add_but_never_del);

/// The plugin's own stdin, as libcni builds it for the third plugin of the chain.
fn plugin_stdin(site: &Site, mutate: impl FnOnce(&mut Value)) -> Value {
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&site.conf).unwrap()).unwrap();
    let mut stdin = common::plugin_stdin(VERSION, &list["plugins"][1], None);
    mutate(&mut stdin);
    stdin
}

fn direct(site: &Site, command: &str, stdin: &Value) -> DriverOutput {
    site.node.plugin(command, &site.pod, CID, "eth0", stdin)
}

/// A config that no longer decodes (an operator's field of the wrong type) still lets DEL remove
/// the record's attachment; ADD with it fails with code 6 in the config's cniVersion, and the
/// failure is in the plugin's log file, not only on stdout.
fn undecodable_config_del_removes_the_attachment_and_failures_are_logged(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let before = site.state();
    site.cni("add", GO_CNI_MAPPINGS).assert_ok("ADD");
    let broken = plugin_stdin(&site, |c| c["portForwarding"] = json!(5));

    let add = direct(&site, "ADD", &broken);
    assert_eq!(error_code(&add), Some(6), "{add:?}");
    assert_eq!(add.json.as_ref().unwrap()["cniVersion"], VERSION, "the error speaks the config's version: {add:?}");
    let log = site.node.log();
    assert!(log.contains("ADD failed") && log.contains("portForwarding"), "the failure is logged:\n{log}");

    direct(&site, "DEL", &broken).assert_ok("DEL of a config that does not decode");
    assert!(site.node.record(CID, "eth0").is_none(), "the record's attachment is removed");
    let log = site.node.log();
    assert!(log.contains("deleting from the record alone"), "the log says how DEL worked:\n{log}");
    // bridge and host-local are the runtime's next calls; here they are released by hand.
    site.node.cni("del", &site.conf, &site.pod, CID, "eth0", &[]).assert_ok("DEL of the chain");
    assert_eq!(site.state(), before, "the node is as before the ADD");
}
both_backends!(undecodable_config_del_removes_the_attachment_and_failures_are_logged);

/// A failure before the config could be read at all still reaches a log: the config's `logFile`
/// when that field can be read, and the error answers in the config's cniVersion when that can.
#[test]
fn failures_before_decoding_are_logged_where_the_config_says() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let log: &Path = &node.dir().join("early.log");
    let stdin = json!({ "cniVersion": "0.4.0", "name": "dind", "type": "bridge-nat", "logFile": log,
                        "routing": "not an object" });
    let pod = node.add_pod("pod");
    let out = node.plugin("ADD", &pod, CID, "eth0", &stdin);
    assert_eq!(error_code(&out), Some(6), "{out:?}");
    assert_eq!(out.json.as_ref().unwrap()["cniVersion"], "0.4.0", "{out:?}");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(text.contains("ADD dind/ctr-kubelet/eth0: ADD failed: network config: field routing"), "log:\n{text}");
}
