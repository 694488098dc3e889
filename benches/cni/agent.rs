//! The agent's cost (issue #24): the CPU `bridge-nat watch` uses while a churn of new pods starts
//! on a node that already has N, and in the two windows after it, beside the ADD times of the same
//! churn with and without the agent. Default backend (nftables) only. Every pod is real, made as
//! the data plane makes its pods (pods.rs: a namespace and a veth on the bridge), then the plugin's
//! ADD with one port mapping; the churn makes each pod right before its ADD, as a runtime does.
//! The agent is a real process spawned from the bench, so it runs in the node namespace. Its CPU is
//! utime + stime + cutime + cstime (the children it waited for, if any) of /proc/PID/stat, in
//! clock ticks. It runs with `--log-level debug`, which logs one line per check pass: the passes
//! are counted from its log.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::plugin::{Attachment, Op, Plugin};
use crate::pods::{PodSpec, Pods};
use crate::settings::{ascending_from_env, count_from_env};
use crate::Result;

/// Pod indexes (Attachment::pod_ip) and host ports of this phase: every earlier phase's pods and
/// attachments are gone by then, but distinct ranges keep a leftover from ever being mistaken.
const POD_BASE: u32 = 50000;
const PORT_BASE: usize = 30000;
/// Pods this phase may make in all (background and every churn): the ports stay below 40000.
const MAX_PODS: usize = 9000;
/// What an agent may take to start, to stop on SIGTERM, and to settle after its first reconcile.
const START_LIMIT: Duration = Duration::from_secs(10);
const STOP_LIMIT: Duration = Duration::from_secs(5);
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// The log line the agent writes for each check pass (at debug level).
const PASS_LINE: &str = "check pass (";

pub struct AgentSettings {
    /// Ascending numbers of pods on the node before the churn.
    pub ns: Vec<usize>,
    /// New pods per churn.
    pub churn: usize,
    /// Each of the two windows measured after the churn.
    pub window: Duration,
}

/// `BENCH_AGENT=0` skips the phase; `BENCH_AGENT_NS`, `BENCH_AGENT_CHURN`, `BENCH_AGENT_WINDOW`.
pub fn from_env(var: &dyn Fn(&str) -> Option<String>, short: bool) -> Result<Option<AgentSettings>> {
    match var("BENCH_AGENT").as_deref().map(str::trim) {
        None | Some("1") => {}
        Some("0") => return Ok(None),
        Some(other) => return Err(format!("BENCH_AGENT: {other:?} is neither 0 nor 1")),
    }
    let ns = ascending_from_env(var, "BENCH_AGENT_NS", if short { "0" } else { "0,300,900" })?;
    let churn = count_from_env(var, "BENCH_AGENT_CHURN", if short { 5 } else { 40 }, 1000)?;
    let window = count_from_env(var, "BENCH_AGENT_WINDOW", if short { 2 } else { 10 }, 600)?;
    let pods = ns.last().copied().unwrap_or(0) + 2 * churn * ns.len();
    if pods > MAX_PODS {
        return Err(format!("BENCH_AGENT_NS and BENCH_AGENT_CHURN: {pods} pods in all, more than {MAX_PODS}"));
    }
    Ok(Some(AgentSettings { ns, churn, window: Duration::from_secs(window as u64) }))
}

/// One size of node.
pub struct Row {
    pub n: usize,
    /// From spawn until settled after the first reconcile; false: still busy after SETTLE_LIMIT.
    pub start_ticks: u64,
    pub settled: bool,
    pub churn_ticks: u64,
    pub churn_time: Duration,
    /// The two windows after the churn.
    pub after: [u64; 2],
    /// Check passes during the churn and in each window after it.
    pub passes: [usize; 3],
    pub with_agent: Vec<Duration>,
    pub without_agent: Vec<Duration>,
}

#[derive(Default)]
pub struct AgentCost {
    pub rows: Vec<Row>,
    /// sysconf(_SC_CLK_TCK).
    pub clk_tck: u64,
}

/// A pod of this phase and its attachment: `tag` b (background) or c (churn), number `k`.
fn pod(node_name: &str, tag: &str, index: usize, port: usize) -> (PodSpec, Attachment) {
    let ip = Attachment::pod_ip(POD_BASE + index as u32);
    let att = Attachment {
        container_id: format!("agent-{tag}-{index:05}"),
        ip,
        mappings: vec![((PORT_BASE + port) as u16, 80)],
        static_rules: None,
        sandbox: None,
    };
    let spec = PodSpec::of(&att, format!("{node_name}-a{tag}{index}"), format!("ag{tag}{index}"));
    let att = Attachment { sandbox: Some(spec.netns_path()), ..att };
    (spec, att)
}

/// For each N: N pods on the bridge, the agent started and settled, a churn measured with it, the
/// agent stopped, the churn's pods deleted, the same churn without it. Every pod is deleted at the
/// end; the caller checks the node clean.
pub fn run(plugin: &Plugin, s: &AgentSettings, node_name: &str, dir: &Path, out: &mut AgentCost) -> Result<()> {
    out.clk_tck = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let max_n = s.ns.last().copied().unwrap_or(0);
    let mut pods = Pods::default();
    let mut specs = Vec::new();
    let mut background = Vec::new();
    let mut next_churn = max_n;
    let mut added = 0;
    for &n in &s.ns {
        eprintln!("=== agent cost: {n} pods on the node, churn of {} ===", s.churn);
        let started = Instant::now();
        while background.len() < n {
            let (spec, att) = pod(node_name, "b", background.len(), background.len());
            specs.push(spec);
            background.push(att);
        }
        pods.extend_to(&specs)?;
        while added < n {
            plugin.run_ok(Op::Add, &background[added])?;
            added += 1;
            if added % 100 == 0 {
                eprintln!("  {added} pods, {:.0} s", started.elapsed().as_secs_f64());
            }
        }
        eprintln!("  {n} pods ready in {:.0} s; starting the agent ...", started.elapsed().as_secs_f64());
        let mut agent = Agent::start(plugin, dir)?;
        let (start_ticks, settled) = agent.settle()?;
        let (t0, p0) = (agent.ticks()?, agent.passes());
        let begun = Instant::now();
        let with = Churn::make(plugin, node_name, s.churn, &mut next_churn)?;
        let churn_time = begun.elapsed();
        let (t1, p1) = (agent.ticks()?, agent.passes());
        std::thread::sleep(s.window);
        let (t2, p2) = (agent.ticks()?, agent.passes());
        std::thread::sleep(s.window);
        let (t3, p3) = (agent.ticks()?, agent.passes());
        agent.stop()?;
        let with_agent = with.remove(plugin)?;
        eprintln!("  the same churn without the agent ...");
        let without_agent = Churn::make(plugin, node_name, s.churn, &mut next_churn)?.remove(plugin)?;
        out.rows.push(Row {
            n,
            start_ticks,
            settled,
            churn_ticks: t1 - t0,
            churn_time,
            after: [t2 - t1, t3 - t2],
            passes: [p1 - p0, p2 - p1, p3 - p2],
            with_agent,
            without_agent,
        });
        crate::node::check_interrupted();
    }
    for att in background[..added].iter().rev() {
        plugin.run_ok(Op::Del, att)?;
    }
    Ok(())
}

/// New pods, each made (namespace, veth on the bridge) right before its ADD, one after another.
struct Churn {
    pods: Pods,
    attachments: Vec<Attachment>,
    adds: Vec<Duration>,
}

impl Churn {
    fn make(plugin: &Plugin, node_name: &str, count: usize, next: &mut usize) -> Result<Churn> {
        let mut churn = Churn { pods: Pods::default(), attachments: Vec::new(), adds: Vec::new() };
        let mut specs = Vec::new();
        for _ in 0..count {
            let (spec, att) = pod(node_name, "c", *next, *next);
            *next += 1;
            specs.push(spec);
            churn.pods.extend_to(&specs)?;
            churn.adds.push(plugin.run_ok(Op::Add, &att)?.elapsed);
            churn.attachments.push(att);
        }
        Ok(churn)
    }

    /// DEL of every pod's attachment, then the pods; the ADD times.
    fn remove(self, plugin: &Plugin) -> Result<Vec<Duration>> {
        for att in self.attachments.iter().rev() {
            plugin.run_ok(Op::Del, att)?;
        }
        drop(self.pods);
        Ok(self.adds)
    }
}

/// The agent's log in the scratch directory `dir`.
pub fn log_file(dir: &Path) -> PathBuf {
    dir.join("agent-nftables.log")
}

/// `bridge-nat watch` on the contender's state directory; killed on drop if still running.
struct Agent {
    child: Child,
    log: PathBuf,
    stderr: PathBuf,
}

impl Agent {
    /// Spawns it and waits for its start line in the log.
    fn start(plugin: &Plugin, dir: &Path) -> Result<Agent> {
        let log = log_file(dir);
        let stderr = dir.join("agent-nftables.stderr");
        let err_file = File::create(&stderr).map_err(|e| format!("create {}: {e}", stderr.display()))?;
        let child = Command::new(&plugin.bin)
            .arg("watch")
            .arg("--state-dir")
            .arg(&plugin.state_dir)
            .arg("--log-file")
            .arg(&log)
            .args(["--log-level", "debug", "--interval", "300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err_file))
            .spawn()
            .map_err(|e| format!("cannot spawn {} watch: {e}", plugin.bin.display()))?;
        let mut agent = Agent { child, log, stderr };
        let line = format!("node agent started (pid {})", agent.child.id());
        let started = Instant::now();
        while !fs::read_to_string(&agent.log).unwrap_or_default().contains(&line) {
            agent.alive()?;
            if started.elapsed() > START_LIMIT {
                return Err(format!("the agent did not log {line:?} within {START_LIMIT:?}{}", agent.tails()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// The last lines of its log and stderr, for an error.
    fn tails(&self) -> String {
        let mut out = String::new();
        for file in [&self.log, &self.stderr] {
            let text = fs::read_to_string(file).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            if !tail.is_empty() {
                out += &format!("\n  last lines of {}:", file.display());
                for l in tail.iter().rev() {
                    out += &format!("\n    {l}");
                }
            }
        }
        out
    }

    fn alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the agent (pid {}) died: {status}{}", self.child.id(), self.tails())),
            Err(e) => Err(format!("the agent (pid {}): wait: {e}", self.child.id())),
        }
    }

    /// CPU used so far, in clock ticks; an error if it has died.
    fn ticks(&mut self) -> Result<u64> {
        self.alive()?;
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        // Fields after "pid (comm)": state is field 3; utime, stime, cutime, cstime are 14 to 17.
        let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        fields
            .get(11..15)
            .and_then(|f| f.iter().map(|v| v.parse::<u64>().ok()).sum::<Option<u64>>())
            .ok_or_else(|| format!("{path}: cannot read utime, stime, cutime, cstime in {stat:?}"))
    }

    /// Check passes logged so far.
    fn passes(&self) -> usize {
        fs::read_to_string(&self.log).unwrap_or_default().matches(PASS_LINE).count()
    }

    /// Waits at least 1 s, then until a 0.5 s window costs no tick; the ticks used so far, and
    /// whether it settled within SETTLE_LIMIT.
    fn settle(&mut self) -> Result<(u64, bool)> {
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let mut last = self.ticks()?;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.ticks()?;
            if now == last || started.elapsed() > SETTLE_LIMIT {
                return Ok((now, now == last));
            }
            last = now;
        }
    }

    /// SIGTERM; it must exit 0 within STOP_LIMIT.
    fn stop(mut self) -> Result<()> {
        self.alive()?;
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM).map_err(|e| format!("kill -TERM {pid}: {e}"))?;
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("the agent exited {status} on SIGTERM{}", self.tails())),
                Ok(None) if started.elapsed() > STOP_LIMIT => {
                    return Err(format!("the agent did not stop within {STOP_LIMIT:?} of SIGTERM{}", self.tails()))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("the agent: wait: {e}")),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
