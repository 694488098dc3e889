//! bridge-nat vs Debian's portmap (containernetworking-plugins 1.1.1), invoked side by side the
//! way a runtime invokes a chained plugin. Run as root:
//!
//! ```sh
//! cargo bench --bench cni                 # the full run (N = 0, 100, 500, 1000)
//! BENCH_REPS=3 BENCH_NS=0,100 cargo bench --bench cni   # a quick try
//! ```
//!
//! The bench builds nothing itself: cargo builds `bridge-nat` with the bench profile (= release)
//! for this target and hands over its path. Environment:
//! - `BENCH_REPS`: cycles per case (default 30 at N ≤ 100, 15 above);
//! - `BENCH_NS`: ascending background sizes (default `0,100,500,1000`);
//! - `BENCH_LOG_LEVEL`: bridge-nat's `logLevel` (default `info`, the plugin's default);
//! - `BENCH_BRIDGE_NAT`: another bridge-nat binary to measure.
//!
//! Everything happens in a throwaway network namespace the process enters once with setns, so
//! the plugins are spawned directly (no `ip netns exec` in the measured time). The Markdown report
//! goes to stdout, progress to stderr. Exit status is non-zero when the node is not clean at the
//! end or /etc/iproute2 changed.

mod node;
mod plugin;
mod report;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;

use node::{DirSnapshot, Node};
use plugin::{Attachment, Kind, Op, Plugin};
use report::{Case, Results};

const PORTMAP: &str = "/usr/lib/cni/portmap";
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// Routing tables of the bridge-nat-only case.
const ROUTED_TABLES: [u32; 2] = [101, 102];

struct Settings {
    ns: Vec<usize>,
    reps: Option<usize>,
    log_level: String,
    bridge_nat: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let ns: Vec<usize> = std::env::var("BENCH_NS")
            .unwrap_or_else(|_| "0,100,500,1000".into())
            .split(',')
            .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("BENCH_NS: {s:?} is not a number")))
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "BENCH_NS must be ascending: {ns:?}");
        let reps = std::env::var("BENCH_REPS").ok().map(|r| r.parse().expect("BENCH_REPS is a number"));
        Settings {
            ns,
            reps,
            log_level: std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            bridge_nat: std::env::var_os("BENCH_BRIDGE_NAT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bridge-nat"))),
        }
    }

    fn reps(&self, n: usize) -> usize {
        self.reps.unwrap_or(if n <= 100 { 30 } else { 15 })
    }
}

/// Copies a binary into the scratch `bin/` (a concurrent `cargo build` cannot swap it mid-run).
fn install(src: &Path, bin_dir: &Path, name: &str) -> PathBuf {
    let dst = bin_dir.join(name);
    fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {} → {}: {e}", src.display(), dst.display()));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod plugin");
    dst
}

struct Bench {
    bn: Plugin,
    pm: Plugin,
    results: Results,
    /// Next free pod index for measured attachments.
    next_pod: u32,
    /// Pod index / host port bases of the background attachments.
    max_n: usize,
    bn_background: usize,
    pm_background: usize,
}

impl Bench {
    fn plugin(&self, kind: Kind) -> &Plugin {
        match kind {
            Kind::BridgeNat => &self.bn,
            Kind::Portmap => &self.pm,
        }
    }

    fn background(&self, kind: Kind, k: usize) -> Attachment {
        let (prefix, offset) = match kind {
            Kind::BridgeNat => ("bn", 0),
            Kind::Portmap => ("pm", self.max_n),
        };
        let i = offset + k;
        Attachment {
            container_id: format!("{prefix}-bg-{k:05}"),
            ip: Attachment::pod_ip(i as u32),
            mappings: vec![(20000 + i as u16, 8080)],
            static_rules: None,
        }
    }

    /// Adds background attachments of both plugins (interleaved) until each has `n`.
    fn populate(&mut self, n: usize) {
        let from = self.bn_background;
        if n == from {
            return;
        }
        eprintln!("populating background attachments {from} → {n} for each plugin ...");
        let started = Instant::now();
        for k in from..n {
            for kind in [Kind::BridgeNat, Kind::Portmap] {
                let att = self.background(kind, k);
                let out = self.plugin(kind).run_ok(Op::Add, &att);
                self.results.record_background(kind, &format!("ADD while populating 0 → {}", self.max_n), out.elapsed);
            }
            self.bn_background = k + 1;
            self.pm_background = k + 1;
            if (k + 1) % 100 == 0 {
                eprintln!("  {} each, {:.0} s", k + 1, started.elapsed().as_secs_f64());
            }
        }
    }

    fn teardown(&mut self) {
        eprintln!("deleting {} + {} background attachments ...", self.bn_background, self.pm_background);
        let started = Instant::now();
        for k in (0..self.bn_background.max(self.pm_background)).rev() {
            for kind in [Kind::BridgeNat, Kind::Portmap] {
                let have = if kind == Kind::BridgeNat { self.bn_background } else { self.pm_background };
                if k >= have {
                    continue;
                }
                let att = self.background(kind, k);
                let out = self.plugin(kind).run_ok(Op::Del, &att);
                self.results.record_background(kind, "DEL of every background attachment", out.elapsed);
            }
            self.bn_background = self.bn_background.min(k);
            self.pm_background = self.pm_background.min(k);
            if k % 100 == 0 && k > 0 {
                eprintln!("  {k} each left, {:.0} s", started.elapsed().as_secs_f64());
            }
        }
    }

    fn fresh(&mut self, kind: Kind, tag: &str, mappings: usize) -> Attachment {
        let pod = self.next_pod;
        self.next_pod += 1;
        let base = match kind {
            Kind::BridgeNat => 40000,
            Kind::Portmap => 50000,
        };
        Attachment {
            container_id: format!("{}-{tag}-{pod:05}", if kind == Kind::BridgeNat { "bn" } else { "pm" }),
            ip: Attachment::pod_ip(pod),
            mappings: (0..mappings).map(|m| (base + m as u16, 8080 + m as u16)).collect(),
            static_rules: None,
        }
    }

    /// One ADD → CHECK → DEL cycle. bridge-nat must succeed at every step; portmap's CHECK may
    /// fail (1.1.1 checks ip6tables even for an IPv4-only pod) and is recorded as such.
    fn cycle(&mut self, kind: Kind, att: &Attachment, case: Case, rss_candidate: bool) {
        for op in [Op::Add, Op::Check, Op::Del] {
            let plugin = self.plugin(kind);
            let out =
                if kind == Kind::Portmap && op == Op::Check { plugin.run(op, att) } else { plugin.run_ok(op, att) };
            let case = Case { op, ..case };
            self.results.record(case, kind, out.ok, out.elapsed, || {
                let text = format!("{}: {} {}", out.status, out.stdout, out.stderr);
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            });
            self.results.record_rss(kind, op, rss_candidate, out.maxrss_kib);
        }
    }

    fn measure(&mut self, n: usize, mappings: usize, reps: usize) {
        eprintln!("measuring N={n}, {mappings} mapping(s), {reps} cycles per plugin ...");
        let case = Case { routed: false, n, mappings, op: Op::Add };
        for r in 0..reps {
            // Alternate which plugin goes first so neither always runs on a warmer cache.
            let order = if r % 2 == 0 { [Kind::BridgeNat, Kind::Portmap] } else { [Kind::Portmap, Kind::BridgeNat] };
            for kind in order {
                let att = self.fresh(kind, &format!("n{n}-m{mappings}"), mappings);
                self.cycle(kind, &att, case, n == 0 && mappings == 1);
            }
        }
    }

    /// bridge-nat only: two static forwards, each with its own routing block (mark, table, uplink).
    /// No tableName: the plugin then writes no names into /etc/iproute2, which is not overlaid here.
    fn measure_routed(&mut self, reps: usize) {
        eprintln!("measuring bridge-nat with two routed static rules, {reps} cycles ...");
        let rules = json!([
            { "name": "routed-a", "hostPort": 45001, "destPort": 8080, "protocol": "tcp",
              "routing": { "fwmark": "0x65", "tableId": ROUTED_TABLES[0], "outbound": { "interface": "up1" } } },
            { "name": "routed-b", "hostPort": 45002, "destPort": 8081, "protocol": "tcp",
              "routing": { "fwmark": "0x66", "tableId": ROUTED_TABLES[1], "outbound": { "interface": "up2" } } }
        ]);
        let case = Case { routed: true, n: self.bn_background, mappings: 0, op: Op::Add };
        for _ in 0..reps {
            let mut att = self.fresh(Kind::BridgeNat, "routed", 0);
            att.static_rules = Some(rules.clone());
            self.cycle(Kind::BridgeNat, &att, case, false);
        }
    }

    /// One unrecorded cycle per plugin: page cache, first iptables chains, the state directory.
    fn warm_up(&mut self) {
        for kind in [Kind::BridgeNat, Kind::Portmap] {
            let att = self.fresh(kind, "warmup", 1);
            let plugin = self.plugin(kind);
            plugin.run_ok(Op::Add, &att);
            plugin.run(Op::Check, &att);
            plugin.run_ok(Op::Del, &att);
        }
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` (tests/run) runs bench targets too,
    // without it. The benchmark takes minutes, so it only runs when asked for.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benches/cni: skipped (not run by `cargo bench`); run `cargo bench --bench cni` as root");
        return ExitCode::SUCCESS;
    }
    node::install_interrupt_handler();
    let settings = Settings::from_env();
    assert!(nix::unistd::geteuid().is_root(), "the bench needs root (network namespaces, iptables)");
    assert!(Path::new(PORTMAP).is_file(), "{PORTMAP} missing: apt-get install containernetworking-plugins");
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
    let make = |kind: Kind, bin: PathBuf| Plugin {
        kind,
        bin,
        cni_path: cni_path.clone(),
        netns: netns.clone(),
        state_dir: node.dir().join("state"),
        log_file: node.dir().join("bridge-nat.log"),
        log_level: settings.log_level.clone(),
        stderr_file: node.dir().join(format!("{}.stderr", kind.label())),
    };
    let bn = make(Kind::BridgeNat, bn_bin);
    let pm = make(Kind::Portmap, pm_bin);
    let state_dir = bn.state_dir.clone();
    node.show_log_on_panic(bn.log_file.clone());

    let max_n = *settings.ns.iter().max().unwrap_or(&0);
    let mut bench = Bench {
        bn,
        pm,
        results: Results::default(),
        next_pod: 2 * max_n as u32,
        max_n,
        bn_background: 0,
        pm_background: 0,
    };
    bench.warm_up();

    let mut reps_used = BTreeMap::new();
    for &n in &settings.ns {
        bench.populate(n);
        let reps = settings.reps(n);
        reps_used.insert(n, reps);
        for mappings in [1, 10] {
            bench.measure(n, mappings, reps);
        }
        if n == 0 {
            bench.measure_routed(reps);
        }
    }
    let background_total = bench.bn_background;
    bench.teardown();

    // The node must be back to where it started.
    let clean = node::inspect_clean(&state_dir, &ROUTED_TABLES);
    let iproute2_after = DirSnapshot::take(Path::new("/etc/iproute2"));
    let iproute2_changes = iproute2_before.changes(&iproute2_after);
    let mut results = std::mem::take(&mut bench.results);
    let pass = clean.problems.is_empty() && iproute2_changes.is_empty();

    results.notes.push(format!(
        "Node clean after deleting every attachment ({background_total} background per plugin): **{}**",
        if pass { "PASS" } else { "FAIL" }
    ));
    for p in &clean.problems {
        results.notes.push(format!("- {p}"));
    }
    if !clean.portmap_skeleton.is_empty() {
        results.notes.push(format!(
            "- portmap keeps its {} shared skeleton lines (CNI-HOSTPORT-DNAT/SETMARK/MASQ chains and jumps) after its last DEL, by design; no per-attachment rule is left",
            clean.portmap_skeleton.len()
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
        "\nThe whole run (population, {} measured ADD/CHECK/DEL cycles per plugin plus {} routed ones of bridge-nat, teardown) took {:.0} s.",
        reps_used.values().sum::<usize>() * 2,
        reps_used.get(&0).copied().unwrap_or(0),
        started.elapsed().as_secs_f64()
    ));

    println!("## bridge-nat vs portmap\n");
    println!("{}", report::machine());
    println!("{}", results.markdown(&reps_used));
    eprintln!("skeleton lines tolerated: {:#?}", clean.portmap_skeleton);
    eprintln!(
        "total time {:.0} s; node clean: {}",
        started.elapsed().as_secs_f64(),
        if pass { "PASS" } else { "FAIL" }
    );
    drop(node);
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
