//! Three contenders invoked side by side the way a runtime invokes a chained plugin: Debian's
//! portmap (containernetworking-plugins 1.1.1) and bridge-nat with each of its firewall backends,
//! `"backend": "iptables"` and `"backend": "nftables"`. Run as root:
//!
//! ```sh
//! cargo bench --bench cni                 # the full run (N = 0, 100, 500, 1000; all three)
//! BENCH_SHORT=1 cargo bench --bench cni    # the CI run (tests/run): every phase, small
//! BENCH_REPS=3 BENCH_NS=0,100 BENCH_CONTENDERS=iptables,nftables cargo bench --bench cni  # a quick try
//! ```
//!
//! The bench builds nothing itself: cargo builds `bridge-nat` with the bench profile (= release)
//! for this target and hands over its path. Environment:
//! - `BENCH_SHORT=1`: every phase with smaller defaults, for CI: N = 0 and 100, 3 cycles per case,
//!   the data plane at 1 and 100 forwards for 1 s each, 2 new pods per first-connection cell. The
//!   variables below still override them;
//! - `BENCH_CONTENDERS`: comma-separated subset of `portmap,iptables,nftables` (default all three;
//!   `iptables`/`nftables` are bridge-nat with that backend); the ratios need `portmap`;
//! - `BENCH_LAYOUT`: `separate` (default) measures one contender at a time, alone on the node with
//!   its own N background attachments, which it deletes before the next one starts; `shared`
//!   populates every contender to N at once and rotates them cycle by cycle (then every ruleset
//!   holds all contenders' attachments);
//! - `BENCH_REPS`: cycles per case (default 30 at N ≤ 100, 15 above);
//! - `BENCH_NS`: ascending background sizes (default `0,100,500,1000`);
//! - `BENCH_LOG_LEVEL`: bridge-nat's `logLevel` (default `info`, the plugin's default);
//! - `BENCH_BRIDGE_NAT`: another bridge-nat binary to measure;
//! - `BENCH_DATAPLANE=0` skips the data plane (below); `BENCH_DP_SECONDS`: its measured time per
//!   contender and number of forwards (default 3); `BENCH_DP_FORWARDS`: ascending numbers of
//!   forwards on the node (default `1,100,1000`); `BENCH_DP_MAPPINGS`: port mappings per
//!   attachment that holds the other forwards (default 1: one pod per forward);
//!   `BENCH_DP_FIRST_REPS`: new pods per first-connection cell (default 5).
//! - `BENCH_AGENT=0` skips the agent's cost (below); `BENCH_AGENT_NS`: ascending numbers of pods on
//!   the node (default `0,300,900`; short: `0`); `BENCH_AGENT_CHURN`: new pods per churn (default
//!   40; short: 5); `BENCH_AGENT_WINDOW`: seconds of each of the two windows after it (default 10;
//!   short: 2).
//!
//! After the control plane, the data plane (dataplane.rs): new TCP connections per second from a
//! client namespace (two threads) through a forwarded host port to a server in a pod, with N
//! forwards on the node, each for a pod on the bridge (pods.rs), each contender alone on it; and
//! the time from a new pod's ADD to the first connection it accepts through its forward.
//!
//! Last, the agent's cost (agent.rs, nftables only): the CPU of `bridge-nat watch` during a churn
//! of new pods on a node with N pods and in the two windows after it, and the churn's ADD times with
//! and without the agent. A churn ADD that fails, or an agent that dies, fails the bench.
//!
//! Each contender has its own host-port range, pod addresses, routing tables and marks, and each
//! bridge-nat backend its own `stateDir` and log. Before measuring, every contender does one
//! unrecorded ADD → CHECK → DEL, and the bench checks that each bridge-nat backend put its rules
//! where it should (iptables chains, or the nftables table `inet bridge-nat`): a binary that
//! ignores `"backend"` is caught there. A failed ADD or DEL stops the bench with an error naming
//! the contender (the results so far are still printed); failed CHECKs are counted in the report.
//!
//! Everything happens in a throwaway network namespace the process enters once with setns, so
//! the plugins are spawned directly (no `ip netns exec` in the measured time). The Markdown report
//! goes to stdout, progress to stderr. Exit status is non-zero when a contender failed, a bridge-nat
//! CHECK failed, the node is not clean after a contender's last DEL (iptables, `nft list tables`,
//! ip rules, routing tables, state directories), or /etc/iproute2 changed.

mod agent;
mod agent_report;
mod controlplane;
mod dataplane;
mod dp_report;
mod node;
mod plugin;
mod pods;
mod report;
mod settings;
mod traffic;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use agent::AgentCost;
use controlplane::Bench;
use dataplane::DataPlane;
use node::{DirSnapshot, Node};
use plugin::{Kind, Plugin};
use report::Results;
use settings::{Layout, Settings};

const PORTMAP: &str = "/usr/lib/cni/portmap";
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// Host ports of background attachments: `BACKGROUND_PORTS + slot * max N + k`.
const BACKGROUND_PORTS: usize = 20000;
/// Host ports of measured attachments and of the routed rules (all below 65535 - 10).
fn fresh_ports(kind: Kind) -> u16 {
    match kind {
        Kind::Iptables => 40000,
        Kind::Nftables => 44000,
        Kind::Portmap => 50000,
    }
}
const ROUTED_TABLES: [u32; 4] = [101, 102, 103, 104];

type Result<T> = std::result::Result<T, String>;

/// Copies a binary into the scratch `bin/` (a concurrent `cargo build` cannot swap it mid-run).
fn install(src: &Path, bin_dir: &Path, name: &str) -> PathBuf {
    let dst = bin_dir.join(name);
    fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {} → {}: {e}", src.display(), dst.display()));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod plugin");
    dst
}

/// What one phase did, for the report and the exit status.
struct PhaseOutcome {
    kinds: Vec<Kind>,
    /// What was on the node, for the report.
    what: String,
    clean: node::Cleanliness,
}

fn run_phases(
    bench: &mut Bench,
    settings: &Settings,
    reps_used: &mut BTreeMap<usize, usize>,
    outcomes: &mut Vec<PhaseOutcome>,
) -> Result<()> {
    let state_dirs: Vec<PathBuf> =
        bench.plugins.values().filter(|p| p.kind.is_bridge_nat()).map(|p| p.state_dir.clone()).collect();
    for kinds in settings.phases() {
        eprintln!("=== {} ===", kinds.iter().map(|k| k.label()).collect::<Vec<_>>().join(", "));
        for &n in &settings.ns {
            bench.populate(&kinds, n)?;
            let reps = settings.reps(n);
            reps_used.insert(n, reps);
            for mappings in [1, 10] {
                bench.measure(&kinds, n, mappings, reps)?;
            }
            if n == 0 {
                bench.measure_routed(&kinds, reps)?;
            }
        }
        let background = kinds.iter().map(|&k| bench.count(k)).max().unwrap_or(0);
        let what = format!("{background} background each");
        bench.teardown(&kinds)?;
        // Every contender of the phase is gone: the node must be back to where it started.
        let clean = node::inspect_clean(&state_dirs, &ROUTED_TABLES);
        for p in &clean.problems {
            eprintln!("not clean after {}: {p}", kinds.iter().map(|k| k.label()).collect::<Vec<_>>().join(", "));
        }
        outcomes.push(PhaseOutcome { kinds, what, clean });
    }
    Ok(())
}

/// The node after a phase: the same check as after each control-plane phase.
fn check_clean(bench: &Bench, phase: &str) -> node::Cleanliness {
    let state_dirs: Vec<PathBuf> =
        bench.plugins.values().filter(|p| p.kind.is_bridge_nat()).map(|p| p.state_dir.clone()).collect();
    let clean = node::inspect_clean(&state_dirs, &ROUTED_TABLES);
    for p in &clean.problems {
        eprintln!("not clean after {phase}: {p}");
    }
    clean
}

/// The data-plane phase (dataplane.rs), then the same cleanliness check as after each phase.
fn run_dataplane(
    bench: &Bench,
    settings: &Settings,
    node_name: &str,
    dp: &mut DataPlane,
    outcomes: &mut Vec<PhaseOutcome>,
) -> Result<()> {
    let Some(dp_settings) = &settings.dataplane else { return Ok(()) };
    dataplane::run(&bench.plugins, &settings.contenders, dp_settings, node_name, bench.next_pod, dp)?;
    let clean = check_clean(bench, "the data plane");
    let what = format!("data plane: up to {} attachments each", dp.max_attachments + 1);
    outcomes.push(PhaseOutcome { kinds: settings.contenders.clone(), what, clean });
    Ok(())
}

/// The agent's cost (agent.rs), nftables only, then the same cleanliness check.
fn run_agent(
    bench: &Bench,
    settings: &Settings,
    node: &Node,
    cost: &mut AgentCost,
    outcomes: &mut Vec<PhaseOutcome>,
) -> Result<()> {
    let Some(agent_settings) = &settings.agent else { return Ok(()) };
    if !settings.contenders.contains(&Kind::Nftables) {
        eprintln!("agent cost: skipped (it measures the nftables contender, not in BENCH_CONTENDERS)");
        return Ok(());
    }
    agent::run(bench.plugin(Kind::Nftables), agent_settings, node.name(), node.dir(), cost)?;
    let clean = check_clean(bench, "the agent's cost");
    let n = agent_settings.ns.last().copied().unwrap_or(0);
    let what = format!("agent's cost: up to {n} pods and a churn of {}", agent_settings.churn);
    outcomes.push(PhaseOutcome { kinds: vec![Kind::Nftables], what, clean });
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` (tests/run) runs bench targets too,
    // without it. The benchmark takes minutes, so it only runs when asked for.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benches/cni: skipped (not run by `cargo bench`); run `cargo bench --bench cni` as root");
        return ExitCode::SUCCESS;
    }
    node::install_interrupt_handler();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("benches/cni: {e}");
            return ExitCode::FAILURE;
        }
    };
    assert!(nix::unistd::geteuid().is_root(), "the bench needs root (network namespaces, iptables, nft)");
    if settings.contenders.contains(&Kind::Portmap) {
        assert!(Path::new(PORTMAP).is_file(), "{PORTMAP} missing: apt-get install containernetworking-plugins");
    }
    assert!(settings.bridge_nat.is_file(), "{} missing", settings.bridge_nat.display());

    let started = Instant::now();
    let iproute2_before = DirSnapshot::take(Path::new("/etc/iproute2"));
    let mut node = Node::create();
    let bin_dir = node.dir().join("bin");
    let bn_bin = install(&settings.bridge_nat, &bin_dir, "bridge-nat");
    let pm_bin = install(Path::new(PORTMAP), &bin_dir, "portmap");
    node.enter();
    node.wire();
    eprintln!("node namespace {} ready in {}", node.name(), node.dir().display());

    let netns = node.netns_path().display().to_string();
    let cni_path = format!("{}:{SYSTEM_CNI_DIR}", bin_dir.display());
    let mut plugins = BTreeMap::new();
    for kind in Kind::ALL {
        let plugin = Plugin {
            kind,
            bin: if kind == Kind::Portmap { pm_bin.clone() } else { bn_bin.clone() },
            cni_path: cni_path.clone(),
            netns: netns.clone(),
            state_dir: node.dir().join(format!("state-{}", kind.key())),
            log_file: node.dir().join(format!("bridge-nat-{}.log", kind.key())),
            log_level: settings.log_level.clone(),
            stderr_file: node.dir().join(format!("{}.stderr", kind.key())),
        };
        if kind.is_bridge_nat() && settings.contenders.contains(&kind) {
            node.show_log_on_panic(plugin.log_file.clone());
        }
        if kind == Kind::Nftables && settings.agent.is_some() {
            node.show_log_on_panic(agent::log_file(node.dir()));
        }
        plugins.insert(kind, plugin);
    }

    let max_n = settings.ns.last().copied().unwrap_or(0);
    let mut bench = Bench {
        plugins,
        results: Results::default(),
        next_pod: (Kind::ALL.len() * max_n) as u32,
        max_n,
        background: BTreeMap::new(),
        bridge_nat_check_failed: false,
    };
    let mut reps_used = BTreeMap::new();
    let mut outcomes = Vec::new();
    let mut dp = DataPlane::default();
    let mut agent_cost = AgentCost::default();
    let failure = bench
        .warm_up(&settings.contenders)
        .and_then(|()| run_phases(&mut bench, &settings, &mut reps_used, &mut outcomes))
        .and_then(|()| run_dataplane(&bench, &settings, node.name(), &mut dp, &mut outcomes))
        .and_then(|()| run_agent(&bench, &settings, &node, &mut agent_cost, &mut outcomes))
        .err();

    let iproute2_after = DirSnapshot::take(Path::new("/etc/iproute2"));
    let iproute2_changes = iproute2_before.changes(&iproute2_after);
    let mut results = std::mem::take(&mut bench.results);
    if let Some(dp_settings) = settings.dataplane.as_ref().filter(|_| !dp.rates.is_empty()) {
        results.sections.push(dp.markdown(&settings.contenders, dp_settings));
    }
    if let Some(agent_settings) = settings.agent.as_ref().filter(|_| !agent_cost.rows.is_empty()) {
        results.sections.push(agent_cost.markdown(agent_settings));
    }
    let clean = outcomes.iter().all(|o| o.clean.problems.is_empty()) && iproute2_changes.is_empty();
    let pass = failure.is_none() && clean && !bench.bridge_nat_check_failed;

    if let Some(e) = &failure {
        results.notes.push(format!(
            "**Stopped early: {}** (the rows above are what was measured before)\n",
            e.lines().next().unwrap_or_default()
        ));
    }
    for o in &outcomes {
        let names: Vec<&str> = o.kinds.iter().map(|k| k.label()).collect();
        results.notes.push(format!(
            "Node clean after deleting every attachment of {} ({}; iptables, `nft list tables`, ip rules, tables {ROUTED_TABLES:?}, state directories): **{}**",
            names.join(", "),
            o.what,
            if o.clean.problems.is_empty() { "PASS" } else { "FAIL" }
        ));
        for p in &o.clean.problems {
            results.notes.push(format!("- {p}"));
        }
    }
    if let Some(skeleton) = outcomes.iter().map(|o| o.clean.portmap_skeleton.len()).max().filter(|&l| l > 0) {
        results.notes.push(format!(
            "- portmap keeps its {skeleton} shared skeleton lines (CNI-HOSTPORT-DNAT/SETMARK/MASQ chains and jumps) after its last DEL, by design; no per-attachment rule is left"
        ));
    }
    results.notes.push(format!(
        "- /etc/iproute2 {} (before {}, after {})",
        if iproute2_changes.is_empty() { "unchanged" } else { "CHANGED" },
        iproute2_before.digest(),
        iproute2_after.digest()
    ));
    for c in &iproute2_changes {
        results.notes.push(format!("  - {c}"));
    }
    results.notes.push(format!(
        "\nThe whole run (warm-up, population, {} measured ADD/CHECK/DEL cycles per contender plus {} routed ones per bridge-nat backend, teardown) took {:.0} s.",
        reps_used.values().sum::<usize>() * 2,
        reps_used.get(&0).copied().unwrap_or(0),
        started.elapsed().as_secs_f64()
    ));

    let layout = match settings.layout {
        Layout::Separate => "N = background attachments (1 mapping each) of the measured contender, alone on the node (`BENCH_LAYOUT=separate`: contenders run one after another).",
        Layout::Shared => "N = background attachments (1 mapping each) of *each* contender, all present in the node at once; contenders rotate cycle by cycle (`BENCH_LAYOUT=shared`).",
    };
    let title: Vec<&str> = settings.contenders.iter().map(|k| k.label()).collect();
    println!("## {}\n", title.join(" vs "));
    println!("{}\n", report::machine());
    println!("{}", results.markdown(&settings.contenders, &reps_used, layout));
    if let Some(o) = outcomes.iter().rev().find(|o| !o.clean.portmap_skeleton.is_empty()) {
        eprintln!("skeleton lines tolerated: {:#?}", o.clean.portmap_skeleton);
    }
    if let Some(e) = &failure {
        eprintln!("\nbenches/cni: stopped: {e}");
    }
    eprintln!(
        "total time {:.0} s; node clean: {}; result: {}",
        started.elapsed().as_secs_f64(),
        if clean { "PASS" } else { "FAIL" },
        if pass { "PASS" } else { "FAIL" }
    );
    drop(node);
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
