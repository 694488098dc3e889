//! The node agent as a unit file or the DaemonSet runs it, and the subcommands beside it.
#![allow(dead_code)]

use super::{wait_for, Node};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bridge-nat")
}

/// `bridge-nat SUBCOMMAND` in the node namespace with the node's state and log.
pub fn tool(node: &Node, sub: &str) -> Output {
    let state = node.state_dir();
    let log = node.log_file();
    Command::new("ip")
        .args(["netns", "exec", node.ns.name(), bin(), sub, "--state-dir"])
        .arg(&state)
        .arg("--log-file")
        .arg(&log)
        .output()
        .expect("run bridge-nat")
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The agent as a unit file or the DaemonSet runs it: `bridge-nat watch` in the node namespace.
pub struct Agent {
    child: std::process::Child,
}

impl Agent {
    pub fn start(node: &Node) -> Agent {
        Agent::start_with(node, &[])
    }

    /// With more arguments, e.g. `--log-level debug`.
    pub fn start_with(node: &Node, args: &[&str]) -> Agent {
        let child = Command::new("ip")
            .args(["netns", "exec", node.ns.name(), bin(), "watch", "--state-dir"])
            .arg(node.state_dir())
            .arg("--log-file")
            .arg(node.log_file())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent");
        let agent = Agent { child };
        let started = wait_for(|| node.log().contains("node agent started"), Duration::from_secs(10));
        assert!(started, "the agent did not start:\n{}", node.log());
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) of the agent process in clock ticks. `ip netns exec` execs the
    /// command, so the child's pid is the agent's.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("agent stat");
        let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid().to_string()]).status().expect("kill").success();
        assert!(ok, "kill {sig} {}", self.pid());
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for the agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
