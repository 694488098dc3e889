//! Invoking a CNI plugin exactly as a runtime does — config JSON on stdin, CNI_* in the
//! environment — and timing it from spawn to exit, with the child's peak RSS from wait4.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::libc;
use serde_json::{json, Value};

use crate::node::{BRIDGE, GATEWAY};

pub const NETWORK: &str = "bench";
pub const IFNAME: &str = "net1";

/// A contender. The order is the report's column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Portmap,
    /// bridge-nat with `"backend": "iptables"`.
    Iptables,
    /// bridge-nat with `"backend": "nftables"`.
    Nftables,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Portmap, Kind::Iptables, Kind::Nftables];

    /// The name in `BENCH_CONTENDERS`.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Portmap => "portmap",
            Kind::Iptables => "iptables",
            Kind::Nftables => "nftables",
        }
    }

    pub fn from_key(key: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.key() == key)
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Portmap => "portmap",
            Kind::Iptables => "bridge-nat iptables",
            Kind::Nftables => "bridge-nat nftables",
        }
    }

    /// Position among the contenders: each gets its own slice of pod addresses and host ports.
    pub fn slot(self) -> usize {
        self as usize
    }

    /// bridge-nat's `backend` field; None for portmap.
    pub fn backend(self) -> Option<&'static str> {
        match self {
            Kind::Portmap => None,
            Kind::Iptables => Some("iptables"),
            Kind::Nftables => Some("nftables"),
        }
    }

    pub fn is_bridge_nat(self) -> bool {
        self.backend().is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Add,
    Check,
    Del,
}

impl Op {
    pub fn env(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Check => "CHECK",
            Op::Del => "DEL",
        }
    }
}

/// One pod attachment as the runtime would describe it to a chained plugin.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub ip: Ipv4Addr,
    /// (hostPort, containerPort), tcp.
    pub mappings: Vec<(u16, u16)>,
    /// bridge-nat only: static `portForwarding.rules`.
    pub static_rules: Option<Value>,
    /// The pod's own network namespace (CNI_NETNS, prevResult's sandbox), for attachments whose pod
    /// exists (pods.rs); None: the plugin's `netns`, where there is no `net1`.
    pub sandbox: Option<String>,
}

impl Attachment {
    /// Pod address number `k` (unique per attachment): 10.20.(1 + k/250).(2 + k%250).
    pub fn pod_ip(k: u32) -> Ipv4Addr {
        assert!(k < 250 * 250, "pod index {k} out of range");
        Ipv4Addr::new(10, 20, (1 + k / 250) as u8, (2 + k % 250) as u8)
    }

    /// The MAC prevResult names for the pod's `net1`; pods.rs gives a pod's interface this one, so
    /// that prevResult tells the truth, as the bridge plugin's does.
    pub fn mac(&self) -> String {
        let o = self.ip.octets();
        format!("02:01:0a:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
    }

    /// prevResult as Debian's bridge plugin (cniVersion 1.0.0) would report it.
    fn prev_result(&self, sandbox: &str) -> Value {
        let o = self.ip.octets();
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                { "name": BRIDGE, "mac": "02:42:0a:14:00:01" },
                { "name": format!("veth{:02x}{:02x}{:02x}", o[1], o[2], o[3]), "mac": format!("02:00:0a:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3]) },
                { "name": IFNAME, "mac": self.mac(), "sandbox": sandbox }
            ],
            "ips": [{ "address": format!("{}/16", self.ip), "gateway": GATEWAY, "interface": 2 }],
            "routes": [{ "dst": "0.0.0.0/0", "gw": GATEWAY }],
            "dns": {}
        })
    }

    fn port_mappings(&self) -> Value {
        self.mappings.iter().map(|(h, c)| json!({ "hostPort": h, "containerPort": c, "protocol": "tcp" })).collect()
    }
}

/// What one invocation did.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub status: String,
    pub elapsed: Duration,
    /// When the plugin process had exited.
    pub ended: Instant,
    /// ru_maxrss of the child (KiB): the largest resident set of the plugin process or any
    /// child it waited for (iptables, iptables-restore, ...).
    pub maxrss_kib: i64,
    pub stdout: String,
    pub stderr: String,
}

pub struct Plugin {
    pub kind: Kind,
    pub bin: PathBuf,
    pub cni_path: String,
    /// CNI_NETNS and the sandbox in prevResult of attachments without a pod of their own: an existing
    /// netns path without `net1` (bridge-nat looks there only for a pod whose address the node has a
    /// neighbour entry for, and then finds no MAC to trust).
    pub netns: String,
    /// bridge-nat: its own per contender, so the backends never see each other's records.
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
    pub log_level: String,
    pub stderr_file: PathBuf,
}

impl Plugin {
    /// The network config for this attachment, with prevResult and runtimeConfig as libcni
    /// would inject them.
    pub fn config(&self, att: &Attachment) -> Value {
        let mut conf = match self.kind {
            Kind::Portmap => json!({
                "cniVersion": "1.0.0",
                "name": NETWORK,
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true,
            }),
            Kind::Iptables | Kind::Nftables => json!({
                "cniVersion": "1.0.0",
                "name": NETWORK,
                "type": "bridge-nat",
                "backend": self.kind.backend(),
                "stateDir": self.state_dir,
                "logFile": self.log_file,
                "logLevel": self.log_level,
                "capabilities": { "portMappings": true },
            }),
        };
        if !att.mappings.is_empty() {
            conf["runtimeConfig"] = json!({ "portMappings": att.port_mappings() });
        }
        if let Some(rules) = &att.static_rules {
            assert!(self.kind.is_bridge_nat(), "static rules are a bridge-nat feature");
            conf["portForwarding"] = json!({ "rules": rules });
        }
        conf["prevResult"] = att.prev_result(att.sandbox.as_deref().unwrap_or(&self.netns));
        conf
    }

    /// Runs one command; the measured time spans spawn → exit (process start included).
    pub fn run(&self, op: Op, att: &Attachment) -> Outcome {
        crate::node::check_interrupted();
        let stdin_data = serde_json::to_vec(&self.config(att)).expect("encode config");
        let stderr = File::create(&self.stderr_file).expect("create stderr file");
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", op.env())
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", att.sandbox.as_deref().unwrap_or(&self.netns))
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));

        let start = Instant::now();
        #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also yields the rusage
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.bin.display()));
        {
            let mut stdin = child.stdin.take().expect("stdin piped");
            // A plugin that exits early closes the pipe; its status tells what happened.
            let _ = stdin.write_all(&stdin_data);
        }
        let mut stdout = String::new();
        let _ = child.stdout.take().expect("stdout piped").read_to_string(&mut stdout);
        let (status, rusage) = wait4(child.id() as libc::pid_t);
        let ended = Instant::now();
        let elapsed = ended - start;

        let stderr = std::fs::read_to_string(&self.stderr_file).unwrap_or_default();
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let status = if libc::WIFEXITED(status) {
            format!("exit {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("wait status {status:#x}")
        };
        Outcome { ok, status, elapsed, ended, maxrss_kib: rusage.ru_maxrss, stdout, stderr }
    }

    /// Like `run`, but a failure is an error naming the contender, the command, the attachment and
    /// everything the plugin printed (and the end of bridge-nat's log): the bench stops on it.
    pub fn run_ok(&self, op: Op, att: &Attachment) -> Result<Outcome, String> {
        let out = self.run(op, att);
        if out.ok {
            return Ok(out);
        }
        let mut msg = format!(
            "contender {} failed at {} of {} ({} after {:.1} ms)",
            self.kind.label(),
            op.env(),
            att.container_id,
            out.status,
            out.elapsed.as_secs_f64() * 1e3
        );
        for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            if !text.trim().is_empty() {
                msg.push_str(&format!("\n  {what}: {}", text.trim()));
            }
        }
        if self.kind.is_bridge_nat() {
            let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            if !tail.is_empty() {
                msg.push_str(&format!("\n  last lines of {}:", self.log_file.display()));
                for l in tail.iter().rev() {
                    msg.push_str(&format!("\n    {l}"));
                }
            }
        }
        Err(msg)
    }
}

/// Reaps `pid` with wait4 (std's Child::wait would discard the rusage).
fn wait4(pid: libc::pid_t) -> (libc::c_int, libc::rusage) {
    let mut status: libc::c_int = 0;
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return (status, rusage);
        }
        let err = std::io::Error::last_os_error();
        if r == -1 && err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        panic!("wait4({pid}) failed: {err}");
    }
}
