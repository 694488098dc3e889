//! The throwaway "node": a named network namespace the bench process enters once, with the
//! bridge and uplinks the plugins need, a scratch directory, and a guard that removes all of it
//! (also when the bench panics or gets SIGINT/SIGTERM). Nothing here touches the root namespace's
//! firewall or routing: every command after `enter` runs inside the node namespace.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

pub const BRIDGE: &str = "dind-br0";
pub const BRIDGE_ADDR: &str = "10.20.0.1/16";
pub const GATEWAY: &str = "10.20.0.1";
/// Two uplinks with a default route each (different metrics), so per-port routing blocks find a
/// next hop. They are veth pairs with both ends in the node (this kernel has no dummy driver).
pub const UPLINKS: [(&str, &str, &str, &str); 2] =
    [("up1", "192.0.2.1/24", "192.0.2.254", "100"), ("up2", "198.51.100.1/24", "198.51.100.254", "200")];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM only set a flag; the bench checks it between plugin calls and panics, so the
/// guard's Drop cleans up.
pub fn install_interrupt_handler() {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        unsafe { sigaction(sig, &action) }.expect("install signal handler");
    }
}

pub fn check_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("interrupted by a signal");
    }
}

/// Runs a command (in whatever namespace the process is in) and returns stdout; panics on failure.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn setns_net(fd: &File) -> std::io::Result<()> {
    // nix's `sched` feature is not enabled in this crate; the raw call is one line.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Owns the node namespace, its /etc/netns overlay and the scratch directory.
pub struct Node {
    name: String,
    dir: PathBuf,
    etc_netns: PathBuf,
    root_ns: File,
    entered: bool,
    /// Logs to show on stderr if the bench dies.
    logs_on_panic: Vec<PathBuf>,
}

impl Node {
    /// Creates the namespace and scratch directory (from the root namespace); call `enter` next.
    pub fn create() -> Node {
        let pid = std::process::id();
        let name = format!("bn-bench-{pid}");
        let root_ns = File::open("/proc/self/ns/net").expect("open /proc/self/ns/net");
        // bridge-nat's stateDir defaults to /run/bridge-nat, tmpfs on real nodes; where this machine's
        // /run is a disk, /dev/shm stands in for it (BENCH_SCRATCH picks another place).
        let root = std::env::var_os("BENCH_SCRATCH").map(PathBuf::from).unwrap_or_else(|| {
            if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            }
        });
        let dir = root.join(format!("bridge-nat-bench-{pid}"));
        let etc_netns = Path::new("/etc/netns").join(&name);
        // Construct the guard first: whatever of the following succeeds is undone on a panic.
        let node = Node { name, dir, etc_netns, root_ns, entered: false, logs_on_panic: Vec::new() };
        let _ = fs::remove_dir_all(&node.dir);
        fs::create_dir_all(node.dir.join("bin")).expect("create scratch dir");
        // `ip netns exec` would bind-mount /etc/netns/NAME/* over /etc; give the node its own
        // iproute2 config before any plugin runs so table names could never reach the real one.
        let iproute2 = node.etc_netns.join("iproute2");
        fs::create_dir_all(iproute2.join("rt_tables.d")).expect("create /etc/netns/NAME/iproute2");
        let base = ["/etc/iproute2/rt_tables", "/usr/share/iproute2/rt_tables", "/usr/lib/iproute2/rt_tables"]
            .iter()
            .find_map(|p| fs::read_to_string(p).ok())
            .unwrap_or_else(|| "255\tlocal\n254\tmain\n253\tdefault\n0\tunspec\n".to_string());
        fs::write(iproute2.join("rt_tables"), base).expect("write per-namespace rt_tables");
        let _ = Command::new("ip").args(["netns", "del", &node.name]).output();
        run_ok("ip", &["netns", "add", &node.name]);
        node
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn show_log_on_panic(&mut self, log: PathBuf) {
        self.logs_on_panic.push(log);
    }

    /// Moves this (single-threaded) process into the node namespace: every process spawned from
    /// now on starts there, so plugins run without `ip netns exec` in the measured path.
    pub fn enter(&mut self) {
        let fd = File::open(self.netns_path()).expect("open node netns");
        setns_net(&fd).expect("setns into the node namespace");
        self.entered = true;
        // Sanity: we must not be in the root namespace any more.
        let here = fs::read_link("/proc/thread-self/ns/net").expect("readlink ns/net");
        let root = fs::read_link(format!("/proc/self/fd/{}", self.root_ns.as_raw_fd())).expect("readlink root ns");
        assert_ne!(here, root, "setns did not move the process out of the root namespace");
    }

    /// Bridge with the pods' gateway address and two uplinks, all inside the node namespace.
    pub fn wire(&self) {
        assert!(self.entered, "wire() runs inside the node namespace");
        run_ok("ip", &["link", "set", "lo", "up"]);
        run_ok("ip", &["link", "add", BRIDGE, "type", "bridge"]);
        run_ok("ip", &["addr", "add", BRIDGE_ADDR, "dev", BRIDGE]);
        run_ok("ip", &["link", "set", BRIDGE, "up"]);
        for (ifname, addr, gw, metric) in UPLINKS {
            let peer = format!("{ifname}-peer");
            run_ok("ip", &["link", "add", ifname, "type", "veth", "peer", "name", &peer]);
            run_ok("ip", &["addr", "add", addr, "dev", ifname]);
            run_ok("ip", &["link", "set", &peer, "up"]);
            run_ok("ip", &["link", "set", ifname, "up"]);
            run_ok("ip", &["route", "add", "default", "via", gw, "dev", ifname, "metric", metric]);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.logs_on_panic {
                let text = fs::read_to_string(log).unwrap_or_default();
                if text.is_empty() {
                    continue;
                }
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- last lines of {} ---", log.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        if self.entered {
            if let Err(e) = setns_net(&self.root_ns) {
                eprintln!("cleanup: cannot return to the root namespace: {e}");
            }
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = fs::remove_dir_all(&self.etc_netns);
        let _ = fs::remove_dir_all(&self.dir);
        eprintln!("cleanup: removed namespace {}, {} and {}", self.name, self.etc_netns.display(), self.dir.display());
    }
}

/// Every file under a directory, path → contents (symlink targets as contents).
pub struct DirSnapshot {
    files: BTreeMap<PathBuf, Vec<u8>>,
}

impl DirSnapshot {
    pub fn take(dir: &Path) -> DirSnapshot {
        fn walk(p: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
            let Ok(meta) = fs::symlink_metadata(p) else { return };
            if meta.file_type().is_symlink() {
                let target = fs::read_link(p).map(|t| t.into_os_string().into_encoded_bytes()).unwrap_or_default();
                files.insert(p.to_path_buf(), target);
            } else if meta.is_dir() {
                files.insert(p.to_path_buf(), b"<dir>".to_vec());
                if let Ok(entries) = fs::read_dir(p) {
                    for e in entries.flatten() {
                        walk(&e.path(), files);
                    }
                }
            } else {
                files.insert(p.to_path_buf(), fs::read(p).unwrap_or_default());
            }
        }
        let mut files = BTreeMap::new();
        walk(dir, &mut files);
        DirSnapshot { files }
    }

    pub fn digest(&self) -> String {
        let mut h = DefaultHasher::new();
        self.files.hash(&mut h);
        format!("{:016x} ({} entries)", h.finish(), self.files.len())
    }

    /// Paths added, removed or changed since `self`.
    pub fn changes(&self, after: &DirSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (p, v) in &self.files {
            match after.files.get(p) {
                None => out.push(format!("removed {}", p.display())),
                Some(w) if w != v => out.push(format!("changed {}", p.display())),
                Some(_) => {}
            }
        }
        for p in after.files.keys().filter(|p| !self.files.contains_key(*p)) {
            out.push(format!("added {}", p.display()));
        }
        out
    }
}

/// Portmap 1.1.1 creates these shared chains (and the jumps to them) on its first ADD and never
/// removes them, by design; anything else with "CNI-" is a per-attachment leftover.
fn is_portmap_skeleton(line: &str) -> bool {
    const CHAINS: [&str; 3] = ["CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ"];
    let l = line.trim();
    // Chain declarations ":CNI-HOSTPORT-DNAT - [0:0]".
    if let Some(rest) = l.strip_prefix(':') {
        return CHAINS.iter().any(|c| rest.split_whitespace().next() == Some(c));
    }
    // Jumps from the built-in chains and the static rules inside SETMARK/MASQ. A rule in
    // CNI-HOSTPORT-DNAT jumps to a per-container CNI-DN-* chain: never skeleton.
    let jumps_to_skeleton = CHAINS.iter().any(|c| l.ends_with(&format!("-j {c}")));
    let in_static_chain = l.starts_with("-A CNI-HOSTPORT-SETMARK ") || l.starts_with("-A CNI-HOSTPORT-MASQ ");
    (jumps_to_skeleton && !l.starts_with("-A CNI-")) || in_static_chain
}

/// bridge-nat's nftables table.
pub const NFT_TABLE: &str = "inet bridge-nat";

/// Tables `nft list tables` shows that belong to bridge-nat (any family, `bridge-nat` or
/// `bridge_nat` in the name), e.g. `["inet bridge-nat"]`.
pub fn bridge_nat_nft_tables() -> Vec<String> {
    run_ok("nft", &["list", "tables"])
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .filter(|t| {
            let t = t.to_ascii_lowercase();
            t.contains("bridge-nat") || t.contains("bridge_nat")
        })
        .map(str::to_string)
        .collect()
}

/// bridge-nat's lines in iptables-save and ip6tables-save (its chains and the jumps to them).
pub fn bridge_nat_iptables_lines() -> Vec<String> {
    let mut out = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let text = run_ok(save, &[]);
        out.extend(
            text.lines()
                .filter(|l| !l.starts_with('#') && l.to_ascii_lowercase().contains("bridge-nat"))
                .map(|l| format!("{save}: {l}")),
        );
    }
    out
}

/// What is left on the node after every attachment was deleted.
pub struct Cleanliness {
    pub problems: Vec<String>,
    /// Portmap's shared chains that outlive every attachment by design.
    pub portmap_skeleton: Vec<String>,
}

/// Reads the node's firewall (iptables and nftables), policy routing and every bridge-nat state
/// directory.
pub fn inspect_clean(state_dirs: &[PathBuf], extra_tables: &[u32]) -> Cleanliness {
    let mut problems = Vec::new();
    let mut portmap_skeleton = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let text = run_ok(save, &[]);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if line.to_ascii_lowercase().contains("bridge-nat") {
                problems.push(format!("{save}: bridge-nat left: {line}"));
            } else if line.contains("CNI-") {
                if is_portmap_skeleton(line) {
                    portmap_skeleton.push(format!("{save}: {line}"));
                } else {
                    problems.push(format!("{save}: portmap left: {line}"));
                }
            }
        }
    }
    for t in bridge_nat_nft_tables() {
        let listing = Command::new("nft")
            .args(["list", "table"])
            .args(t.split_whitespace())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let lines = listing.lines().count();
        problems.push(format!("nft list tables: table {t} left ({lines} lines in `nft list table {t}`)"));
    }
    let rules = run_ok("ip", &["rule"]);
    let rule_lines: Vec<&str> = rules.lines().filter(|l| !l.trim().is_empty()).collect();
    let defaults = ["0:", "32766:", "32767:"];
    if rule_lines.len() != 3 || !rule_lines.iter().zip(defaults).all(|(l, d)| l.starts_with(d)) {
        problems.push(format!("ip rule is not back to the 3 defaults:\n{rules}"));
    }
    for t in extra_tables {
        // A table nothing ever used does not exist: `ip route show table` then fails, which is clean.
        let out = Command::new("ip").args(["route", "show", "table", &t.to_string()]).output().expect("run ip");
        let routes = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("does not exist") {
            problems.push(format!("ip route show table {t} failed: {stderr}"));
        } else if !routes.trim().is_empty() {
            problems.push(format!("table {t} still has routes:\n{routes}"));
        }
    }
    for dir in state_dirs {
        let mut records = Vec::new();
        collect_files(&dir.join("records"), &mut records);
        for r in records {
            problems.push(format!("bridge-nat record left: {}", r.display()));
        }
    }
    Cleanliness { problems, portmap_skeleton }
}

/// Every file below `dir` (records, and temporary files a killed write would leave).
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
