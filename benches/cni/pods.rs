//! Pods on the node's bridge, made the way the bridge plugin makes them: a network namespace, a veth
//! whose node end is a port of the bridge and whose pod end is `net1` with the pod's address and a
//! default route via the gateway. The pod's MAC is the one prevResult names (`Attachment::mac`), so
//! prevResult tells the truth, as the bridge plugin's does. Unlike the bridge plugin's, the veths
//! get no IPv6 link-local address: a thousand ports doing DAD and router solicitation would flood
//! each other while the bench measures. Made and deleted with `ip -batch`, so a thousand pods cost
//! a thousand short `ip` processes, not several thousand.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::node::{BRIDGE, GATEWAY};
use crate::plugin::{Attachment, IFNAME};

/// One pod: its namespace, the name of its veth's node end, its address and MAC.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub netns: String,
    pub host_if: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

impl PodSpec {
    /// The pod of `att`, named `{prefix}-{tag}` (namespace) and `{short}` (node end, ≤ 15 bytes).
    pub fn of(att: &Attachment, netns: String, host_if: String) -> PodSpec {
        assert!(host_if.len() <= 15, "interface name {host_if} is too long");
        PodSpec { netns, host_if, ip: att.ip, mac: att.mac() }
    }

    pub fn netns_path(&self) -> String {
        Path::new("/var/run/netns").join(&self.netns).display().to_string()
    }
}

/// `ip [-n NS] -batch -` with `lines` on stdin, from the node namespace; `force`: on past a line
/// that fails (cleanup).
fn ip_batch(netns: Option<&str>, lines: &str, force: bool) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let _ = child.stdin.take().expect("stdin piped").write_all(lines.as_bytes());
    let out = child.wait_with_output().map_err(|e| format!("wait for ip: {e}"))?;
    if !out.status.success() {
        let first = lines.lines().next().unwrap_or_default();
        return Err(format!("ip -batch ({first} ...): {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Namespaces, veths on the bridge, addresses and routes of `specs`; a pod already there fails.
pub fn create(specs: &[PodSpec]) -> Result<(), String> {
    if specs.is_empty() {
        return Ok(());
    }
    ip_batch(None, &specs.iter().map(|p| format!("netns add {}\n", p.netns)).collect::<String>(), false)?;
    let mut node_side = String::new();
    for p in specs {
        let (h, ns, mac) = (&p.host_if, &p.netns, &p.mac);
        node_side += &format!("link add {h} type veth peer name {IFNAME} address {mac} netns {ns}\n");
        node_side += &format!("link set {h} addrgenmode none\nlink set {h} master {BRIDGE} up\n");
    }
    ip_batch(None, &node_side, false)?;
    for p in specs {
        let lines = format!(
            "link set lo up\nlink set {IFNAME} addrgenmode none\naddr add {}/16 dev {IFNAME}\n\
             link set {IFNAME} up\nroute add default via {GATEWAY}\n",
            p.ip
        );
        ip_batch(Some(&p.netns), &lines, false)?;
    }
    Ok(())
}

/// Deletes the pods' namespaces; their veths go with them.
pub fn delete(specs: &[PodSpec]) {
    let lines: String = specs.iter().map(|p| format!("netns del {}\n", p.netns)).collect();
    if let Err(e) = ip_batch(None, &lines, true) {
        eprintln!("cleanup: {e}");
    }
}

/// Pods that live as long as this value (the data plane's background): deleted on drop.
#[derive(Default)]
pub struct Pods {
    specs: Vec<PodSpec>,
}

impl Pods {
    /// Makes the pods of `wanted` that are not there yet (by position: those made before come first).
    pub fn extend_to(&mut self, wanted: &[PodSpec]) -> Result<(), String> {
        let new = &wanted[self.specs.len().min(wanted.len())..];
        // Recorded first, so that a half-made batch is still deleted.
        self.specs.extend_from_slice(new);
        create(new)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        delete(&self.specs);
    }
}
