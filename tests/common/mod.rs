//! Shared harness for the root-only integration tests.
//!
//! Every test builds its own "node" network namespace (plus pod and peer
//! namespaces) and drives the `bridge-nat` binary through `tests/driver`, a
//! small CNI runtime on top of libcni. Nothing here touches the root
//! namespace's firewall, routes or rules.
#![allow(dead_code)]

pub mod agent;
pub mod containerd;
pub mod dual_stack;
pub mod prometheus;
pub mod providers;
pub mod uplinks;

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Debian's golang-github-appc-cni-dev installs libcni.
const GOPATH: &str = "/usr/share/gocode";
/// Debian's containernetworking-plugins (bridge, host-local, portmap, ...).
const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// Pod subnet handed out by the seed conflist's host-local IPAM.
pub const POD_SUBNET: &str = "10.20.0.0/24";
pub const POD_GATEWAY: &str = "10.20.0.1";
pub const BRIDGE: &str = "dind-br0";
pub const NETWORK_NAME: &str = "dind";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The firewall backend of the bridge-nat entry (`"backend"` in the conflist entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `"backend": "iptables"`: rules through iptables-restore.
    Iptables,
    /// `"backend": "nftables"`: everything in the table `inet bridge-nat`; iptables only holds the
    /// accepts beside a FORWARD that drops by policy (chain [`NFT_ACCEPT_CHAIN`]).
    Nftables,
}

impl Backend {
    /// Names this backend in a bridge-nat entry. Entries without the field (auto) come from
    /// [`Node::with_auto_backend`].
    pub fn configure(self, entry: &mut Value) {
        let map = entry.as_object_mut().expect("a bridge-nat entry is a JSON object");
        map.insert("backend".into(), json!(self.name()));
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        }
    }
}

/// The nftables backend's chain in iptables' filter table, for the accepts beside a dropping FORWARD.
pub const NFT_ACCEPT_CHAIN: &str = "BRIDGE-NAT-NFT-FWD";

/// Two `#[test]`s for a scenario `fn NAME(backend: Backend)`: `NAME::iptables` and
/// `NAME::nftables` (so `cargo test nftables` runs every nftables variant).
#[allow(unused_macros)]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn iptables() {
                super::$name($crate::common::Backend::Iptables)
            }

            #[test]
            fn nftables() {
                super::$name($crate::common::Backend::Nftables)
            }
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use both_backends;

/// The bridge-nat entry's nftables table (family inet), present while any attachment exists.
pub const NFT_TABLE: &str = "bridge-nat";

fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// True when the tests may run. Outside CI a non-root run is skipped with a
/// note; in CI (`CI=true`) it is a hard failure so root-only coverage can't
/// silently disappear.
pub fn require_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    if euid == Some(0) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("root-only test cannot run in CI: it needs root to create network namespaces");
    }
    eprintln!("skipping: this test needs root (network namespaces, iptables)");
    false
}

/// Directory holding the `bridge-nat` binary cargo built for this test run.
pub fn plugin_bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bridge-nat"))
        .parent()
        .expect("bridge-nat binary has a parent directory")
        .to_path_buf()
}

/// CNI_PATH for the driver: our plugin first, then Debian's plugins.
pub fn cni_path() -> String {
    format!("{}:{SYSTEM_CNI_DIR}", plugin_bin_dir().display())
}

/// Builds `tests/driver/cni-driver` once per process and returns its path.
///
/// The binary is built under a process-unique name and renamed into place,
/// so concurrently running test binaries never see (or exec) a partial file.
pub fn driver() -> PathBuf {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(build_driver).clone()
}

fn build_driver() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/driver");
    let out = src.join("cni-driver");
    let tmp = src.join(format!(".cni-driver.{}.tmp", std::process::id()));
    let libcni = Path::new(GOPATH).join("src/github.com/containernetworking/cni/libcni");
    assert!(libcni.is_dir(), "libcni not found at {} (apt-get install golang-github-appc-cni-dev)", libcni.display());
    let gocache = std::env::var_os("GOCACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build"));
    let result = Command::new("go")
        .args(["build", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        .env("GOPATH", GOPATH)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", gocache)
        .output();
    let output = match result {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("`go` not found: the test driver needs it (apt-get install golang-go)")
        }
        Err(e) => panic!("cannot run `go build`: {e}"),
        Ok(o) => o,
    };
    if !output.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!("building tests/driver failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    fs::rename(&tmp, &out).expect("install cni-driver");
    out
}

/// Polls `cond` every 20ms until it holds or `timeout` passes.
pub fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `ip ARGS` in the current (root) namespace and panics on failure.
/// Only used for namespace management and `ip -n NS ...`.
fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args));
    assert!(out.status.success(), "{}", describe(&format!("ip {}", args.join(" ")), &out));
}

/// A named network namespace, deleted (with everything running in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        // A leftover from a crashed run that had the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// Runs `sh -c script` inside the namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Starts `sh -c script` in the background (stdio to /dev/null), e.g. a
    /// server. It is killed and reaped when the returned guard drops.
    pub fn spawn(&self, script: &str) -> Background {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn [{}] {script}: {e}", self.name));
        Background(child)
    }

    /// Like [`Netns::sh`] but panics on failure; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(out.status.success(), "{}", describe(&format!("[{}] {script}", self.name), &out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc: the plugin's table names then land
/// in the node's own copy of iproute2's config, never in the machine's.
fn isolate_iproute2_config(ns: &Netns) {
    let etc = Path::new("/etc/netns").join(ns.name()).join("iproute2");
    fs::create_dir_all(etc.join("rt_tables.d")).expect("create per-namespace iproute2 config");
    let base = fs::read_to_string("/etc/iproute2/rt_tables")
        .unwrap_or_else(|_| "255\tlocal\n254\tmain\n253\tdefault\n0\tunspec\n".to_string());
    fs::write(etc.join("rt_tables"), base).expect("write per-namespace rt_tables");
}

/// The per-namespace /etc overlay, if the namespace has one.
pub fn netns_etc(ns: &Netns) -> PathBuf {
    Path::new("/etc/netns").join(ns.name())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A background process started by [`Netns::spawn`]; killed on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects `a` and `b` with a veth pair, addresses both ends ("" = none)
/// and brings them up. IPv6 addresses skip DAD so they are usable at once.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str, a_addr: &str, b_addr: &str) {
    ip(&["-n", a.name(), "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()]);
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if !addr.is_empty() {
            let mut args = vec!["-n", ns.name(), "addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ip(&args);
        }
        ip(&["-n", ns.name(), "link", "set", ifname, "up"]);
    }
}

/// What one `cni-driver` invocation produced.
#[derive(Debug)]
pub struct DriverOutput {
    pub status_ok: bool,
    pub stdout: String,
    pub stderr: String,
    /// stdout parsed as JSON (the ADD result, VERSION info or a CNI error).
    pub json: Option<Value>,
}

impl DriverOutput {
    fn from_output(out: Output) -> DriverOutput {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        DriverOutput {
            status_ok: out.status.success(),
            json: serde_json::from_str(stdout.trim()).ok(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with everything the driver printed unless it succeeded.
    #[track_caller]
    pub fn assert_ok(&self, what: &str) -> &Self {
        assert!(self.status_ok, "{what} failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    /// The `ips[].address` entries of an ADD result.
    pub fn addresses(&self) -> Vec<String> {
        let ips = self.json.as_ref().and_then(|j| j["ips"].as_array().cloned());
        ips.unwrap_or_default().iter().filter_map(|ip| ip["address"].as_str().map(str::to_owned)).collect()
    }
}

/// The CNI error code of a failed invocation (`None` on success).
pub fn error_code(out: &DriverOutput) -> Option<i64> {
    if out.status_ok {
        return None;
    }
    out.json.as_ref().and_then(|j| j["code"].as_i64())
}

/// The seed conflist: Debian's bridge + host-local (allocations stored in
/// `ipam_data_dir`), followed by the given bridge-nat entry.
pub fn conflist(version: &str, ipam_data_dir: &Path, bridge_nat_entry: Value) -> Value {
    json!({
        "cniVersion": version,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": POD_SUBNET,
                        "rangeStart": "10.20.0.10",
                        "rangeEnd": "10.20.0.50",
                        "gateway": POD_GATEWAY
                    }]],
                    // The test pods have no other interface: replies need a way back via the bridge.
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_data_dir
                }
            },
            bridge_nat_entry
        ]
    })
}

/// The minimal bridge-nat conflist entry for `backend` (see [`Backend::configure`]); None leaves
/// the field out (auto).
pub fn bridge_nat_entry(backend: Option<Backend>, state_dir: &Path, log_file: &Path) -> Value {
    let mut entry = json!({
        "type": "bridge-nat",
        "stateDir": state_dir,
        "logFile": log_file,
    });
    if let Some(b) = backend {
        b.configure(&mut entry);
    }
    entry
}

/// A simulated host: its own network namespace plus a scratch directory
/// for plugin state, logs, the libcni cache, IPAM data and conflists.
/// The directory is kept when the test panics, to inspect the log.
pub struct Node {
    pub ns: Netns,
    dir: PathBuf,
    backend: Backend,
    /// Whether entries name the backend; without the field it is auto.
    named: bool,
}

impl Node {
    /// A node whose bridge-nat entries name the iptables backend.
    pub fn new() -> Node {
        Node::with_backend(Backend::Iptables)
    }

    /// A node whose [`Node::bridge_nat_entry`] selects `backend`.
    pub fn with_backend(backend: Backend) -> Node {
        let ns = Netns::new("bn-node");
        let dir = std::env::temp_dir().join(unique("bridge-nat-test"));
        // A directory of this name is a failed run's, kept for its log by a process that had our
        // pid before (pids wrap at 32768): its records would be read as this node's (measured:
        // affinity.rs's reconcile found another test's wan0/wan1 records and failed).
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create node temp dir");
        isolate_iproute2_config(&ns);
        Node { ns, dir, backend, named: true }
    }

    /// A node whose entries have no `"backend"` field: auto, which is nftables on every machine
    /// these tests run on (they need nft, so nf_tables is there); [`Node::backend`] says so.
    pub fn with_auto_backend() -> Node {
        let mut node = Node::with_backend(Backend::Nftables);
        node.named = false;
        node
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("bridge-nat.log")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cni-cache")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// The record of one attachment of the harness network, as JSON (None when absent).
    pub fn record(&self, container_id: &str, ifname: &str) -> Option<Value> {
        let path = self.state_dir().join("records").join(NETWORK_NAME).join(format!("{container_id}.{ifname}.json"));
        let text = fs::read_to_string(path).ok()?;
        Some(serde_json::from_str(&text).expect("a record is JSON"))
    }

    /// The plugin's log so far (empty if it has not written one).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Minimal bridge-nat entry pointing state and log into this node, with the node's backend.
    pub fn bridge_nat_entry(&self) -> Value {
        bridge_nat_entry(self.named.then_some(self.backend), &self.state_dir(), &self.log_file())
    }

    /// [`conflist`] with host-local's data kept in this node's directory.
    pub fn conflist(&self, version: &str, bridge_nat_entry: Value) -> Value {
        conflist(version, &self.ipam_dir(), bridge_nat_entry)
    }

    /// Writes a conflist into the node directory and returns its path.
    pub fn write_conflist(&self, conflist: &Value) -> PathBuf {
        let path = self.dir.join(format!("{}.conflist", unique("net")));
        let text = serde_json::to_string_pretty(conflist).expect("serialize conflist");
        fs::write(&path, text).expect("write conflist");
        path
    }

    /// A pod namespace (not wired up; ADD does that).
    pub fn add_pod(&self, name: &str) -> Netns {
        Netns::new(&format!("bn-{name}"))
    }

    /// veth between this node and `other`, see [`veth`].
    pub fn veth_to(&self, other: &Netns, node_if: &str, other_if: &str, node_addr: &str, other_addr: &str) {
        veth(&self.ns, node_if, other, other_if, node_addr, other_addr);
    }

    /// Runs `cni-driver ARGS` inside the node namespace with CNI_PATH set.
    pub fn driver(&self, args: &[&str]) -> DriverOutput {
        let out = run(Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .arg(driver())
            .args(args)
            .env("CNI_PATH", cni_path()));
        DriverOutput::from_output(out)
    }

    /// `cni-driver CMD` (add/check/del) for `pod`; `extra` is appended
    /// (e.g. `["--port-mappings", "[...]"]`).
    pub fn cni(
        &self,
        cmd: &str,
        conflist: &Path,
        pod: &Netns,
        container_id: &str,
        ifname: &str,
        extra: &[&str],
    ) -> DriverOutput {
        let conflist = conflist.to_string_lossy();
        let netns = pod.path();
        let netns = netns.to_string_lossy();
        let cache = self.cache_dir();
        let cache = cache.to_string_lossy();
        let mut args = vec![
            cmd,
            "--conflist",
            &conflist,
            "--netns",
            &netns,
            "--container-id",
            container_id,
            "--ifname",
            ifname,
            "--cache-dir",
            &cache,
        ];
        args.extend_from_slice(extra);
        self.driver(&args)
    }

    /// GC with the given (containerID, ifname) attachments still valid.
    pub fn cni_gc(&self, conflist: &Path, valid: &[(&str, &str)]) -> DriverOutput {
        let valid: Vec<Value> = valid.iter().map(|(id, ifname)| json!({"containerID": id, "ifname": ifname})).collect();
        let valid = Value::Array(valid).to_string();
        self.driver(&["gc", "--conflist", &conflist.to_string_lossy(), "--valid", &valid])
    }

    pub fn cni_status(&self, conflist: &Path) -> DriverOutput {
        self.driver(&["status", "--conflist", &conflist.to_string_lossy()])
    }

    /// Firewall (iptables, iptables-legacy, the nftables table list and bridge-nat's own table),
    /// policy rules and routes of the node, normalised so two snapshots compare equal when
    /// nothing changed (comments, counters, IPv6 link-local routes and the order nft lists a
    /// set's elements in are dropped).
    pub fn snapshot(&self) -> String {
        let mut snap = String::new();
        for cmd in ["iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
            snap += &format!("### {cmd}\n");
            for line in self.ns.sh_ok(cmd).lines().filter(|l| !l.starts_with('#')) {
                snap += strip_counters(line);
                snap.push('\n');
            }
        }
        // Sorted: a table deleted and created again is listed last.
        snap += "### nft list tables\n";
        let mut tables: Vec<String> = self.ns.sh_ok("nft list tables").lines().map(|l| format!("{l}\n")).collect();
        tables.sort();
        snap += &tables.concat();
        snap += &format!("### nft list table inet {NFT_TABLE}\n");
        snap += &self.nft_table().unwrap_or_else(|| "(absent)\n".into());
        for cmd in ["ip rule", "ip -6 rule", "ip -4 route show table all", "ip -6 route show table all"] {
            snap += &format!("### {cmd}\n");
            // Link-local routes come and go with DAD timing; they are noise.
            // "linkdown" follows the bridge's carrier (lost once its last port leaves), not us.
            // The kernel adds an interface's subnet-router anycast route some time after IPv6
            // forwarding is on (a sysctl ADD sets and never reverts, as documented): kernel noise.
            let noise = |l: &&str| l.contains("fe80:") || l.starts_with("anycast ");
            for line in self.ns.sh_ok(cmd).lines().filter(|l| !noise(l)) {
                snap += &line.replace(" linkdown", "");
                snap.push('\n');
            }
        }
        snap
    }
}

/// ":CHAIN POLICY [packets:bytes]" -> ":CHAIN POLICY".
fn strip_counters(line: &str) -> &str {
    match line.rfind(" [") {
        Some(i) if line.starts_with(':') && line.ends_with(']') => &line[..i],
        _ => line,
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping node directory {} (log: {})", self.dir.display(), self.log_file().display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ------------------------------------------------------------------
// Direct plugin invocation and firewall baselines (nat_forwarding.rs)

/// The stdin a runtime gives one chained plugin: the conflist entry plus
/// the list's `name` and `cniVersion`, and the previous result if any.
pub fn plugin_stdin(version: &str, entry: &Value, prev_result: Option<&Value>) -> Value {
    let mut conf = entry.clone();
    conf["name"] = json!(NETWORK_NAME);
    conf["cniVersion"] = json!(version);
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev.clone();
    }
    conf
}

impl Node {
    /// Runs the `bridge-nat` binary itself inside the node namespace, as a
    /// runtime would: `env` holds the `CNI_*` variables, `stdin` the config.
    /// `CNI_PATH` defaults to [`cni_path`].
    pub fn exec_plugin(&self, env: &[(&str, &str)], stdin: &Value) -> DriverOutput {
        use std::io::Write;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name()])
            .arg(env!("CARGO_BIN_EXE_bridge-nat"))
            .env("CNI_PATH", cni_path())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let input = serde_json::to_vec(stdin).expect("serialize plugin stdin");
        child.stdin.take().expect("piped stdin").write_all(&input).expect("write plugin stdin");
        let out = child.wait_with_output().expect("wait for bridge-nat");
        DriverOutput::from_output(out)
    }

    /// [`Node::exec_plugin`] for one attachment: `CNI_COMMAND`,
    /// `CNI_CONTAINERID`, `CNI_NETNS` (the pod's) and `CNI_IFNAME` set.
    pub fn plugin(&self, command: &str, pod: &Netns, container_id: &str, ifname: &str, stdin: &Value) -> DriverOutput {
        let netns = pod.path();
        let netns = netns.to_string_lossy();
        self.exec_plugin(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container_id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", ifname),
            ],
            stdin,
        )
    }

    /// Creates the nat and filter tables of both families, as any node with
    /// a firewall has them. iptables-nft creates a table on first use and
    /// never removes it; with this done first, a [`Node::snapshot`] before an
    /// ADD compares equal to one after the DEL unless rules or chains remain.
    pub fn prime_firewall(&self) {
        for tool in ["iptables", "ip6tables"] {
            for table in ["nat", "filter"] {
                self.ns.sh_ok(&format!("{tool} -t {table} -N BN-PRIME && {tool} -t {table} -X BN-PRIME"));
            }
        }
    }

    /// The firewall part of [`Node::snapshot`] (iptables-save, ip6tables-save and nftables,
    /// normalised the same way).
    pub fn firewall_snapshot(&self) -> String {
        let snap = self.snapshot();
        match snap.find("### ip rule") {
            Some(i) => snap[..i].to_string(),
            None => snap,
        }
    }
}

/// The pod's address of one family in an ADD result, without the prefix length.
pub fn result_ip(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a))
        .find(|a| a.contains(':') == v6)
        .unwrap_or_else(|| panic!("no {} address in {result}", if v6 { "IPv6" } else { "IPv4" }))
        .to_string()
}

/// The `msg` of a CNI error (empty on success).
pub fn error_msg(out: &DriverOutput) -> String {
    out.json.as_ref().and_then(|j| j["msg"].as_str()).unwrap_or_default().to_string()
}

/// Every file, directory and symlink below `dir` with its mode and content, for before/after
/// comparisons of state directories and iproute2 config.
pub fn dir_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            let mode = meta.mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("symlink -> {}", fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default())
            } else if meta.is_dir() {
                todo.push(path.clone());
                format!("dir {mode:o}")
            } else {
                format!("file {mode:o} {}", fs::read_to_string(&path).unwrap_or_else(|e| format!("<{e}>")))
            };
            out.insert(path, what);
        }
    }
    out
}

// ------------------------------------------------------------------
// nftables: bridge-nat's own table

impl Node {
    /// `nft list table inet bridge-nat` normalised by [`normalise_nft`], or `None` when the
    /// table does not exist.
    pub fn nft_table(&self) -> Option<String> {
        let out = self.ns.exec(&["nft", "list", "table", "inet", NFT_TABLE]);
        if out.status.success() {
            return Some(normalise_nft(&String::from_utf8_lossy(&out.stdout)));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("No such file or directory"),
            "nft list table inet {NFT_TABLE} failed other than by absence: {stderr}"
        );
        None
    }

    /// Whether the table `inet bridge-nat` exists (it is listed by `nft list tables`).
    pub fn nft_table_exists(&self) -> bool {
        let wanted = format!("table inet {NFT_TABLE}");
        self.ns.sh_ok("nft list tables").lines().any(|l| l.trim() == wanted)
    }

    /// The elements of the set or map `name` of bridge-nat's table, as nft prints them
    /// (`tcp . 8080 : 10.20.0.5 . 80`), sorted; empty when the table or set does not exist.
    pub fn nft_elements(&self, name: &str) -> Vec<String> {
        self.nft_table().map(|t| nft_sets(&t).remove(name).unwrap_or_default()).unwrap_or_default()
    }

    /// Every set and map of bridge-nat's table with its elements (empty without the table).
    pub fn nft_all_elements(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.nft_table().map(|t| nft_sets(&t)).unwrap_or_default()
    }

    /// Lines of iptables-save and ip6tables-save (nft and legacy) that belong to bridge-nat:
    /// its chains, jumps to them, rules carrying its comment.
    pub fn iptables_traces(&self) -> Vec<String> {
        let mut traces = Vec::new();
        for cmd in ["iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
            for line in self.ns.sh_ok(cmd).lines() {
                if !line.starts_with('#') && line.to_lowercase().contains("bridge-nat") {
                    traces.push(format!("{cmd}: {line}"));
                }
            }
        }
        traces
    }

    /// Panics unless the plugin used the node's backend: under nftables, the table exists and
    /// iptables holds nothing of bridge-nat but the accepts beside a FORWARD that drops by policy,
    /// in that family; under iptables, no bridge-nat table exists. Catches a plugin that ignores
    /// the `backend` field.
    #[track_caller]
    pub fn assert_backend_in_use(&self) {
        match self.backend {
            Backend::Nftables => {
                let traces = self.iptables_traces_beyond_accepts();
                assert!(
                    self.nft_table_exists() && traces.is_empty(),
                    "nftables backend: want the table inet {NFT_TABLE} and no iptables rule but accepts \
                     beside a FORWARD DROP; table {}, iptables:\n{}\n--- nft list ruleset\n{}\n--- log\n{}",
                    if self.nft_table_exists() { "present" } else { "absent" },
                    traces.join("\n"),
                    String::from_utf8_lossy(&self.ns.sh("nft list ruleset").stdout),
                    self.log()
                );
            }
            Backend::Iptables => {
                assert!(!self.nft_table_exists(), "iptables backend created the table inet {NFT_TABLE}");
            }
        }
    }

    /// [`Node::iptables_traces`] less the nftables backend's accepts in a family whose FORWARD
    /// drops by policy (their chain, the jump to it, its rules).
    pub fn iptables_traces_beyond_accepts(&self) -> Vec<String> {
        let drops =
            |cmd: &str| self.ns.sh_ok(&format!("{cmd} -t filter")).lines().any(|l| l.starts_with(":FORWARD DROP"));
        let allowed: Vec<String> =
            ["iptables-save", "ip6tables-save"].into_iter().filter(|c| drops(c)).map(|c| format!("{c}: ")).collect();
        self.iptables_traces()
            .into_iter()
            .filter(|t| !(t.contains(NFT_ACCEPT_CHAIN) && allowed.iter().any(|a| t.starts_with(a.as_str()))))
            .collect()
    }

    /// The nftables backend's accepts as iptables-save (`cmd`) shows them: the chain, the jump, the
    /// rules, in order.
    pub fn nft_accepts(&self, cmd: &str) -> Vec<String> {
        self.ns
            .sh_ok(&format!("{cmd} -t filter"))
            .lines()
            .filter(|l| l.contains(NFT_ACCEPT_CHAIN))
            .map(|l| strip_counters(l).to_string())
            .collect()
    }
}

/// A problem as CHECK lists it for an element gone from bridge-nat's table:
/// `missing nftables element dnat4-any { tcp . 8080 : 10.20.0.5 . 80 }`.
pub fn nft_missing_element(set: &str, element: &str) -> String {
    format!("missing nftables element {set} {{ {element} }}")
}

/// The rule lines of `chain` in a [`normalise_nft`]ed table (its `type ... hook` line excluded).
pub fn nft_chain_rules(normalised: &str, chain: &str) -> Vec<String> {
    let header = format!("chain {chain} {{");
    let mut lines = normalised.lines().map(str::trim).skip_while(|l| *l != header).skip(1);
    let mut rules = Vec::new();
    for line in lines.by_ref() {
        if line == "}" {
            break;
        }
        if !line.is_empty() && !line.starts_with("type ") {
            rules.push(line.to_string());
        }
    }
    rules
}

/// `word` occurs in `text` with no letter or digit right before or after it.
pub fn contains_word(text: &str, word: &str) -> bool {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    text.match_indices(word)
        .any(|(i, _)| !is_word(text[..i].chars().next_back()) && !is_word(text[i + word.len()..].chars().next()))
}

/// `nft list table` output made comparable: no `# handle N` comments, and each
/// `elements = { a, b, ... }` block (which nft prints in hash order, over several lines)
/// replaced by its elements one per line, sorted.
pub fn normalise_nft(text: &str) -> String {
    let mut out = String::new();
    let mut pending: Option<(String, String)> = None; // (indent, elements text so far)
    for raw in text.lines() {
        let line = match raw.find(" # handle ") {
            Some(i) => &raw[..i],
            None => raw,
        };
        if let Some((indent, mut acc)) = pending.take() {
            acc.push(' ');
            acc.push_str(line.trim());
            if acc.trim_end().ends_with('}') {
                push_elements(&mut out, &indent, &acc);
            } else {
                pending = Some((indent, acc));
            }
            continue;
        }
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("elements = {") {
            let indent = line[..line.len() - trimmed.len()].to_string();
            if rest.trim_end().ends_with('}') {
                push_elements(&mut out, &indent, rest);
            } else {
                pending = Some((indent, rest.to_string()));
            }
            continue;
        }
        out += line.trim_end();
        out.push('\n');
    }
    if let Some((indent, acc)) = pending {
        out += &format!("{indent}elements (unterminated) {{ {acc}\n");
    }
    out
}

fn push_elements(out: &mut String, indent: &str, list: &str) {
    let inner = list.trim().trim_end_matches('}');
    let mut elements: Vec<&str> = inner.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    elements.sort_unstable();
    *out += &format!("{indent}elements = {{\n");
    for e in elements {
        *out += &format!("{indent}\t{e}\n");
    }
    *out += &format!("{indent}}}\n");
}

/// The sets and maps of a [`normalise_nft`]ed table with their elements.
pub fn nft_sets(normalised: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut sets = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_elements = false;
    for line in normalised.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("set ").or_else(|| t.strip_prefix("map ")).and_then(|r| r.strip_suffix(" {"))
        {
            current = Some(name.trim().to_string());
            sets.insert(name.trim().to_string(), Vec::new());
            in_elements = false;
        } else if t == "elements = {" {
            in_elements = true;
        } else if t == "}" {
            if in_elements {
                in_elements = false;
            } else {
                current = None;
            }
        } else if in_elements {
            if let Some(name) = &current {
                sets.get_mut(name).expect("set seen").push(t.to_string());
            }
        }
    }
    sets
}

/// Runs `f` on every item, at most `workers` at a time; results in item order.
pub fn parallel<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().map(|r| r.expect("item ran")).collect()
}
