//! Three contenders invoked side by side the way a runtime invokes a chained plugin: Debian's
//! portmap (containernetworking-plugins 1.1.1) and bridge-nat with each of its firewall backends,
//! `"backend": "iptables"` and `"backend": "nftables"`. Run as root:
//!
//! ```sh
//! cargo bench --bench cni                 # the full run (N = 0, 100, 500, 1000; all three)
//! BENCH_REPS=3 BENCH_NS=0,100 BENCH_CONTENDERS=iptables,nftables cargo bench --bench cni  # a quick try
//! ```
//!
//! The bench builds nothing itself: cargo builds `bridge-nat` with the bench profile (= release)
//! for this target and hands over its path. Environment:
//! - `BENCH_CONTENDERS`: comma-separated subset of `portmap,iptables,nftables` (default all three;
//!   `iptables`/`nftables` are bridge-nat with that backend); the ratios need `portmap`;
//! - `BENCH_LAYOUT`: `separate` (default) measures one contender at a time, alone on the node with
//!   its own N background attachments, which it deletes before the next one starts; `shared`
//!   populates every contender to N at once and rotates them cycle by cycle (then every ruleset
//!   holds all contenders' attachments);
//! - `BENCH_REPS`: cycles per case (default 30 at N ≤ 100, 15 above);
//! - `BENCH_NS`: ascending background sizes (default `0,100,500,1000`);
//! - `BENCH_LOG_LEVEL`: bridge-nat's `logLevel` (default `info`, the plugin's default);
//! - `BENCH_BRIDGE_NAT`: another bridge-nat binary to measure.
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
/// The routed case (bridge-nat only): per backend, two (fwmark, routing table) pairs.
fn routed_marks_tables(kind: Kind) -> [(u32, u32); 2] {
    match kind {
        Kind::Nftables => [(0x67, 103), (0x68, 104)],
        _ => [(0x65, 101), (0x66, 102)],
    }
}
const ROUTED_TABLES: [u32; 4] = [101, 102, 103, 104];

type Result<T> = std::result::Result<T, String>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Separate,
    Shared,
}

struct Settings {
    contenders: Vec<Kind>,
    layout: Layout,
    ns: Vec<usize>,
    reps: Option<usize>,
    log_level: String,
    bridge_nat: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let ns = var("BENCH_NS")
            .unwrap_or_else(|| "0,100,500,1000".into())
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| format!("BENCH_NS: {s:?} is not a number")))
            .collect::<Result<Vec<usize>>>()?;
        if !ns.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("BENCH_NS must be ascending: {ns:?}"));
        }
        let max_n = ns.last().copied().unwrap_or(0);
        if BACKGROUND_PORTS + Kind::ALL.len() * max_n > usize::from(fresh_ports(Kind::Iptables)) {
            return Err(format!("BENCH_NS: {max_n} background attachments per contender do not fit the port ranges"));
        }
        let reps = match var("BENCH_REPS") {
            None => None,
            Some(r) => Some(r.trim().parse().map_err(|_| format!("BENCH_REPS: {r:?} is not a number"))?),
        };
        let mut contenders = Vec::new();
        for key in var("BENCH_CONTENDERS").unwrap_or_else(|| "portmap,iptables,nftables".into()).split(',') {
            let kind = Kind::from_key(key.trim()).ok_or_else(|| {
                format!("BENCH_CONTENDERS: {key:?} is none of portmap, iptables, nftables (comma-separated)")
            })?;
            if !contenders.contains(&kind) {
                contenders.push(kind);
            }
        }
        contenders.sort();
        let layout = match var("BENCH_LAYOUT").as_deref().map(str::trim) {
            None | Some("separate") => Layout::Separate,
            Some("shared") => Layout::Shared,
            Some(other) => return Err(format!("BENCH_LAYOUT: {other:?} is neither separate nor shared")),
        };
        Ok(Settings {
            contenders,
            layout,
            ns,
            reps,
            log_level: var("BENCH_LOG_LEVEL").unwrap_or_else(|| "info".into()),
            bridge_nat: std::env::var_os("BENCH_BRIDGE_NAT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bridge-nat"))),
        })
    }

    fn reps(&self, n: usize) -> usize {
        self.reps.unwrap_or(if n <= 100 { 30 } else { 15 })
    }

    /// Groups of contenders measured together. Separate: bridge-nat nftables first (the newest
    /// code fails soonest), portmap last (its chains outlive its last DEL).
    fn phases(&self) -> Vec<Vec<Kind>> {
        match self.layout {
            Layout::Shared => vec![self.contenders.clone()],
            Layout::Separate => [Kind::Nftables, Kind::Iptables, Kind::Portmap]
                .into_iter()
                .filter(|k| self.contenders.contains(k))
                .map(|k| vec![k])
                .collect(),
        }
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
    plugins: BTreeMap<Kind, Plugin>,
    results: Results,
    /// Next free pod index for measured attachments.
    next_pod: u32,
    /// Size of each contender's slice of background pod indexes and host ports.
    max_n: usize,
    /// Background attachments each contender has on the node now.
    background: BTreeMap<Kind, usize>,
    /// Set when a bridge-nat CHECK failed (recorded, and the run fails).
    bridge_nat_check_failed: bool,
}

impl Bench {
    fn plugin(&self, kind: Kind) -> &Plugin {
        &self.plugins[&kind]
    }

    fn prefix(kind: Kind) -> &'static str {
        match kind {
            Kind::Portmap => "pm",
            Kind::Iptables => "ipt",
            Kind::Nftables => "nft",
        }
    }

    fn background_attachment(&self, kind: Kind, k: usize) -> Attachment {
        let i = kind.slot() * self.max_n + k;
        Attachment {
            container_id: format!("{}-bg-{k:05}", Self::prefix(kind)),
            ip: Attachment::pod_ip(i as u32),
            mappings: vec![((BACKGROUND_PORTS + i) as u16, 8080)],
            static_rules: None,
        }
    }

    fn count(&self, kind: Kind) -> usize {
        self.background.get(&kind).copied().unwrap_or(0)
    }

    /// Adds background attachments of the phase's contenders (interleaved) until each has `n`.
    fn populate(&mut self, kinds: &[Kind], n: usize) -> Result<()> {
        let from = kinds.iter().map(|&k| self.count(k)).min().unwrap_or(n);
        if from >= n {
            return Ok(());
        }
        let names: Vec<&str> = kinds.iter().map(|k| k.label()).collect();
        eprintln!("populating background attachments {from} → {n} for {} ...", names.join(", "));
        let started = Instant::now();
        for k in from..n {
            for &kind in kinds {
                if self.count(kind) > k {
                    continue;
                }
                let att = self.background_attachment(kind, k);
                let out = self.plugin(kind).run_ok(Op::Add, &att)?;
                self.results.record_background(kind, &format!("ADD while populating 0 → {}", self.max_n), out.elapsed);
                self.background.insert(kind, k + 1);
            }
            if (k + 1) % 100 == 0 {
                eprintln!("  {} each, {:.0} s", k + 1, started.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    fn teardown(&mut self, kinds: &[Kind]) -> Result<()> {
        let top = kinds.iter().map(|&k| self.count(k)).max().unwrap_or(0);
        eprintln!("deleting {top} background attachments of each of {} contender(s) ...", kinds.len());
        let started = Instant::now();
        for k in (0..top).rev() {
            for &kind in kinds {
                if k >= self.count(kind) {
                    continue;
                }
                let att = self.background_attachment(kind, k);
                let out = self.plugin(kind).run_ok(Op::Del, &att)?;
                self.results.record_background(kind, "DEL of every background attachment", out.elapsed);
                self.background.insert(kind, k);
            }
            if k % 100 == 0 && k > 0 {
                eprintln!("  {k} each left, {:.0} s", started.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    fn fresh(&mut self, kind: Kind, tag: &str, mappings: usize) -> Attachment {
        let pod = self.next_pod;
        self.next_pod += 1;
        let base = fresh_ports(kind);
        Attachment {
            container_id: format!("{}-{tag}-{pod:05}", Self::prefix(kind)),
            ip: Attachment::pod_ip(pod),
            mappings: (0..mappings).map(|m| (base + m as u16, 8080 + m as u16)).collect(),
            static_rules: None,
        }
    }

    /// One ADD → CHECK → DEL cycle. ADD and DEL must succeed (else the bench stops); a failed
    /// CHECK is recorded (portmap 1.1.1 checks ip6tables even for an IPv4-only pod and fails).
    fn cycle(&mut self, kind: Kind, att: &Attachment, case: Case, rss_candidate: bool) -> Result<()> {
        for op in [Op::Add, Op::Check, Op::Del] {
            let plugin = self.plugin(kind);
            let out = if op == Op::Check { plugin.run(op, att) } else { plugin.run_ok(op, att)? };
            if !out.ok && kind.is_bridge_nat() {
                self.bridge_nat_check_failed = true;
            }
            let case = Case { op, ..case };
            self.results.record(case, kind, out.ok, out.elapsed, || {
                let text = format!("{}: {} {}", out.status, out.stdout, out.stderr);
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            });
            self.results.record_rss(kind, op, rss_candidate, out.maxrss_kib);
        }
        Ok(())
    }

    fn measure(&mut self, kinds: &[Kind], n: usize, mappings: usize, reps: usize) -> Result<()> {
        eprintln!("measuring N={n}, {mappings} mapping(s), {reps} cycles per contender ...");
        let case = Case { routed: false, n, mappings, op: Op::Add };
        for r in 0..reps {
            // Rotate which contender goes first so none always runs on a warmer cache.
            let mut order = kinds.to_vec();
            order.rotate_left(r % kinds.len().max(1));
            for kind in order {
                let att = self.fresh(kind, &format!("n{n}-m{mappings}"), mappings);
                self.cycle(kind, &att, case, n == 0 && mappings == 1)?;
            }
        }
        Ok(())
    }

    /// bridge-nat only: two static forwards, each with its own routing block (mark, table, uplink).
    /// No tableName: the plugin then writes no names into /etc/iproute2, which is not overlaid here.
    fn measure_routed(&mut self, kinds: &[Kind], reps: usize) -> Result<()> {
        let kinds: Vec<Kind> = kinds.iter().copied().filter(|k| k.is_bridge_nat()).collect();
        if kinds.is_empty() {
            return Ok(());
        }
        eprintln!("measuring bridge-nat with two routed static rules, {reps} cycles per backend ...");
        for r in 0..reps {
            let mut order = kinds.clone();
            order.rotate_left(r % kinds.len());
            for kind in order {
                let [(mark_a, table_a), (mark_b, table_b)] = routed_marks_tables(kind);
                let port = fresh_ports(kind) + 1001;
                let rules = json!([
                    { "name": "routed-a", "hostPort": port, "destPort": 8080, "protocol": "tcp",
                      "routing": { "fwmark": format!("{mark_a:#x}"), "tableId": table_a, "outbound": { "interface": "up1" } } },
                    { "name": "routed-b", "hostPort": port + 1, "destPort": 8081, "protocol": "tcp",
                      "routing": { "fwmark": format!("{mark_b:#x}"), "tableId": table_b, "outbound": { "interface": "up2" } } }
                ]);
                let case = Case { routed: true, n: self.count(kind), mappings: 0, op: Op::Add };
                let mut att = self.fresh(kind, "routed", 0);
                att.static_rules = Some(rules);
                self.cycle(kind, &att, case, false)?;
            }
        }
        Ok(())
    }

    /// One unrecorded cycle per contender (page cache, first chains or table, the state
    /// directory), checking after ADD that each bridge-nat backend's rules are where they belong.
    fn warm_up(&mut self, kinds: &[Kind]) -> Result<()> {
        for &kind in kinds {
            let att = self.fresh(kind, "warmup", 1);
            let plugin = self.plugin(kind);
            plugin.run_ok(Op::Add, &att)?;
            let placed = placement_problem(kind);
            plugin.run(Op::Check, &att);
            plugin.run_ok(Op::Del, &att)?;
            if let Some(problem) = placed {
                return Err(format!("contender {}: ADD succeeded, but {problem}", kind.label()));
            }
        }
        Ok(())
    }
}

/// After one ADD on an otherwise empty node: is the backend's firewall where it should be?
fn placement_problem(kind: Kind) -> Option<String> {
    let tables = node::bridge_nat_nft_tables();
    let lines = node::bridge_nat_iptables_lines();
    match kind {
        Kind::Portmap => None,
        Kind::Iptables if lines.is_empty() => {
            Some("iptables-save shows no bridge-nat chain or rule for it (backend \"iptables\" not honoured?)".into())
        }
        Kind::Iptables if !tables.is_empty() => {
            Some(format!("backend \"iptables\" created nftables table(s) {}", tables.join(", ")))
        }
        Kind::Nftables if !tables.iter().any(|t| t == node::NFT_TABLE) => Some(format!(
            "there is no nftables table `{}` (`nft list tables`: {}); {}",
            node::NFT_TABLE,
            if tables.is_empty() { "none of bridge-nat's".to_string() } else { tables.join(", ") },
            if lines.is_empty() {
                "nor any bridge-nat rule in iptables-save".to_string()
            } else {
                format!(
                    "{} bridge-nat line(s) in iptables-save instead: this bridge-nat binary ignores \"backend\": \"nftables\"",
                    lines.len()
                )
            }
        )),
        Kind::Nftables if !lines.is_empty() => Some(format!(
            "backend \"nftables\" also wrote iptables rules, e.g. `{}`",
            lines.first().map(String::as_str).unwrap_or_default()
        )),
        _ => None,
    }
}

/// What one phase did, for the report and the exit status.
struct PhaseOutcome {
    kinds: Vec<Kind>,
    background: usize,
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
        bench.teardown(&kinds)?;
        // Every contender of the phase is gone: the node must be back to where it started.
        let clean = node::inspect_clean(&state_dirs, &ROUTED_TABLES);
        for p in &clean.problems {
            eprintln!("not clean after {}: {p}", kinds.iter().map(|k| k.label()).collect::<Vec<_>>().join(", "));
        }
        outcomes.push(PhaseOutcome { kinds, background, clean });
    }
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
    let failure = bench
        .warm_up(&settings.contenders)
        .and_then(|()| run_phases(&mut bench, &settings, &mut reps_used, &mut outcomes))
        .err();

    let iproute2_after = DirSnapshot::take(Path::new("/etc/iproute2"));
    let iproute2_changes = iproute2_before.changes(&iproute2_after);
    let mut results = std::mem::take(&mut bench.results);
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
            "Node clean after deleting every attachment of {} ({} background each; iptables, `nft list tables`, ip rules, tables {ROUTED_TABLES:?}, state directories): **{}**",
            names.join(", "),
            o.background,
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
