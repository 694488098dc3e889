//! A real containerd (Debian's 1.6 with its CRI plugin) for one test node, driven over CRI the way
//! kubelet drives it (tests/cri/cri.py): the conflist bridge → host-local → bridge-nat runs as on a
//! k3s node. Its config is tests/cri/containerd.toml, its sandbox image tests/cri/image.sh's.
//!
//! containerd runs in the node's network namespace and in a mount namespace held by
//! tests/cri/holder.sh: what `ip netns exec` gives (the node's sysfs and /etc/iproute2), but it
//! outlives containerd, so a restarted containerd still finds the pods' network namespaces it
//! mounted, as on a real node. Every mount containerd makes (pod netns, shm, rootfs) stays in that
//! namespace and goes with it; the two paths containerd 1.6 cannot be told to move (libcni's cache
//! in /var/lib/cni, shim sockets in /run/containerd) are private directories there. Its root,
//! state, sockets, runc root and CNI directories are under the node's directory; its pods' cgroups
//! under a parent of their own.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use super::{describe, run, wait_for, Node, SYSTEM_CNI_DIR};

/// The sandbox ("pause") image, built by tests/cri/image.sh and imported with `ctr`.
pub const SANDBOX_IMAGE: &str = "localhost/bridge-nat-test/pause:1";
/// CRI's containerd namespace.
const K8S_NS: &str = "k8s.io";
/// Paths containerd 1.6 uses whatever its config says; private copies are mounted over them.
const HOST_PATHS: [&str; 2] = ["/var/lib/cni", "/run/containerd"];

/// One test containerd at a time on the machine, in this process or another (two `cargo test`
/// runs): the mounts over [`HOST_PATHS`] need the host directories to exist, and a test removes
/// those it created when it ends, which would detach another test's mounts on them. The lock is
/// an flock on containerd's binary: it serialises every test of every work tree and leaves no
/// lock file behind.
const SERIAL: &str = "/usr/bin/containerd";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// The sandbox image as an OCI archive, built once per process.
fn image_archive() -> PathBuf {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| {
            // Built under a process-unique name and renamed: other test binaries may build it too.
            let out = scratch().join("cri-pause.tar");
            let tmp = scratch().join(format!(".cri-pause-{}.tar", std::process::id()));
            let res = run(Command::new("bash").arg(repo_path("tests/cri/image.sh")).arg(&tmp).arg(SANDBOX_IMAGE));
            assert!(res.status.success(), "{}", describe("tests/cri/image.sh", &res));
            fs::rename(&tmp, &out).expect("install the sandbox image archive");
            out
        })
        .clone()
}

/// Signals one process (never a group: 0 and negative pids are refused).
fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid @ 1..) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Kills a child and reaps it; SIGTERM first (containerd shuts down cleanly on it), SIGKILL after
/// `grace`.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        kill(child.id(), nix::sys::signal::Signal::SIGTERM);
        if !wait_for(|| matches!(child.try_wait(), Ok(Some(_))), grace) {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

pub struct Containerd {
    dir: PathBuf,
    node_ns: String,
    cgroup_parent: String,
    holder: Option<Child>,
    /// The holder's mount namespace (`mnt:[inode]`), never the test's own.
    holder_mnt: Option<PathBuf>,
    daemon: Option<Child>,
    /// Host directories of [`HOST_PATHS`] that did not exist before this test.
    created: Vec<PathBuf>,
    _serial: nix::fcntl::Flock<fs::File>,
}

impl Containerd {
    /// Starts containerd for `node` with `conflist` as its only CNI network, and imports the
    /// sandbox image. The snapshotter is overlayfs, as on k3s; `BN_SNAPSHOTTER=native` picks
    /// another where overlay cannot be mounted (a /tmp that is itself on overlayfs).
    pub fn start(node: &Node, conflist: &Value) -> Containerd {
        let binary =
            fs::File::open(SERIAL).unwrap_or_else(|e| panic!("{SERIAL}: {e} (tests/install-deps.sh installs it)"));
        let serial = nix::fcntl::Flock::lock(binary, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("cannot lock {SERIAL}: {e}"));
        let dir = node.dir().join("ctrd");
        for sub in ["bin", "conf", "cni-cache", "run-containerd", "cgroup-keep"] {
            fs::create_dir_all(dir.join(sub)).expect("create containerd dirs");
        }
        // CRI 1.6 takes one bin_dir: Debian's plugins and the bridge-nat just built, side by side.
        // loopback is the lo network CRI adds to every pod.
        for plugin in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(Path::new(SYSTEM_CNI_DIR).join(plugin), dir.join("bin").join(plugin))
                .expect("link CNI plugin");
        }
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_bridge-nat"), dir.join("bin/bridge-nat"))
            .expect("link bridge-nat");
        let cgroup_parent = format!("/{}", node.dir().file_name().expect("node dir has a name").to_string_lossy());
        let mut created = Vec::new();
        for host in HOST_PATHS {
            if !Path::new(host).exists() {
                fs::create_dir_all(host).expect("create mount point");
                created.push(PathBuf::from(host));
            }
        }
        let mut ctrd = Containerd {
            dir,
            node_ns: node.ns.name().to_string(),
            cgroup_parent,
            holder: None,
            holder_mnt: None,
            daemon: None,
            created,
            _serial: serial,
        };
        ctrd.set_conflist(conflist);
        ctrd.write_config();
        ctrd.start_holder();
        ctrd.start_daemon();
        let snapshotter = snapshotter();
        let archive = image_archive();
        let out = run(Command::new("ctr")
            .args(["-a", &ctrd.socket(), "-n", K8S_NS, "images", "import", "--snapshotter", &snapshotter])
            .arg(&archive));
        assert!(out.status.success(), "{}\n--- containerd log\n{}", describe("ctr images import", &out), ctrd.log());
        ctrd
    }

    pub fn socket(&self) -> String {
        self.dir.join("containerd.sock").to_string_lossy().into_owned()
    }

    /// Replaces the one conflist CRI loads (it watches the directory; a restart makes sure).
    pub fn set_conflist(&self, conflist: &Value) {
        let text = serde_json::to_string_pretty(conflist).expect("serialize conflist");
        let tmp = self.dir.join("conf.tmp");
        fs::write(&tmp, text).expect("write conflist");
        fs::rename(&tmp, self.dir.join("conf/10-dind.conflist")).expect("install conflist");
    }

    /// containerd's own log (stdout and stderr of every start).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn write_config(&self) {
        let template =
            fs::read_to_string(repo_path("tests/cri/containerd.toml")).expect("read tests/cri/containerd.toml");
        let config = template
            .replace("@DIR@", &self.dir.to_string_lossy())
            .replace("@IMAGE@", SANDBOX_IMAGE)
            .replace("@SNAPSHOTTER@", &snapshotter());
        fs::write(self.dir.join("config.toml"), config).expect("write containerd config");
    }

    /// Starts tests/cri/holder.sh: the mount namespace containerd runs in, kept across restarts.
    fn start_holder(&mut self) {
        let log = fs::File::create(self.dir.join("holder.log")).expect("create holder log");
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "nsenter"])
            .arg(format!("--net=/var/run/netns/{}", self.node_ns))
            .arg("sh")
            .arg(repo_path("tests/cri/holder.sh"))
            .arg(&self.dir)
            .arg(&self.node_ns)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start the mount namespace holder");
        let ready = self.dir.join("holder.ready");
        let up = wait_for(|| ready.exists() || matches!(holder.try_wait(), Ok(Some(_))), Duration::from_secs(10));
        let mnt = fs::read_link(format!("/proc/{}/ns/mnt", holder.id())).ok();
        self.holder = Some(holder);
        let log = fs::read_to_string(self.dir.join("holder.log")).unwrap_or_default();
        assert!(up && ready.exists(), "the mount namespace holder did not come up:\n{log}");
        // Teardown kills every process of this namespace: it must not be the test's own.
        assert!(mnt.is_some() && mnt != fs::read_link("/proc/self/ns/mnt").ok(), "the holder shares our mounts");
        self.holder_mnt = mnt;
    }

    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().expect("holder running").id()
    }

    /// Starts containerd in the holder's namespaces and waits until CRI answers.
    pub fn start_daemon(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .expect("open containerd log");
        let mut child = Command::new("nsenter")
            .args(["--target", &self.holder_pid().to_string(), "--mount", "--net", "containerd", "--config"])
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut last = String::new();
        let mut exited = false;
        let ready = wait_for(
            || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || self.cri(&["version"]).map_err(|e| last = e).is_ok()
            },
            Duration::from_secs(30),
        );
        self.daemon = Some(child);
        assert!(ready && !exited, "containerd did not come up (last CRI error: {last})\n{}", self.log());
    }

    /// Stops containerd (SIGTERM: the pods and their shims keep running, as on a node).
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            stop_child(&mut d, Duration::from_secs(15));
        }
    }

    /// Runs tests/cri/cri.py ARGS against this containerd; stdout, or stderr as the error.
    pub fn cri(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("python3")
            .arg(repo_path("tests/cri/cri.py"))
            .args(["--socket", &self.socket(), "--stubs"])
            .arg(scratch().join("cri-stubs"))
            .args(args)
            .output()
            .map_err(|e| format!("cannot run python3 tests/cri/cri.py: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("cri.py {}: {}{}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim(), stdout))
        }
    }

    /// RunPodSandbox with `config` (a PodSandboxConfig as JSON, see tests/cri/cri.py); the
    /// sandbox's cgroups go under this containerd's parent.
    pub fn run_pod(&self, config: &Value) -> Result<String, String> {
        let mut config = config.clone();
        config["linux"]["cgroupParent"] = json!(self.cgroup_parent);
        self.cri(&["runp", &config.to_string()])
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), String> {
        self.cri(&["stopp", id]).map(drop)
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), String> {
        self.cri(&["rmp", id]).map(drop)
    }

    /// PodSandboxStatus (verbose): `status`, containerd's `info`, the sandbox's `pid`.
    pub fn inspect_pod(&self, id: &str) -> Value {
        let text = self.cri(&["inspectp", id]).unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        serde_json::from_str(&text).expect("inspectp prints JSON")
    }

    /// The sandbox's pause process, whose network namespace is the pod's.
    pub fn pod_pid(&self, id: &str) -> u32 {
        let info = self.inspect_pod(id);
        info["pid"].as_u64().unwrap_or_else(|| panic!("no pid for sandbox {id}: {info}")) as u32
    }

    /// ListPodSandbox: `{id, name, namespace, state}` each.
    pub fn pods(&self) -> Vec<Value> {
        let text = self.cri(&["pods"]).unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        serde_json::from_str(&text).expect("pods prints JSON")
    }

    /// Pids whose mount namespace is the holder's: containerd, its shims, plugins it runs.
    fn processes_in_holder(&self) -> Vec<u32> {
        let (Some(holder), Some(mnt)) = (&self.holder, &self.holder_mnt) else { return Vec::new() };
        let entries = fs::read_dir("/proc").map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
        entries
            .iter()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != holder.id() && pid != std::process::id())
            .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| &m == mnt))
            .collect()
    }

    /// Every directory of this containerd's cgroup parent, in every hierarchy, deepest first.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut dirs = Vec::new();
        for line in mountinfo.lines() {
            let fstype = line.split(" - ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("");
            let Some(point) = line.split_whitespace().nth(4) else { continue };
            if fstype != "cgroup" && fstype != "cgroup2" {
                continue;
            }
            let mut todo = vec![Path::new(point).join(self.cgroup_parent.trim_start_matches('/'))];
            while let Some(d) = todo.pop() {
                if let Ok(entries) = fs::read_dir(&d) {
                    todo.extend(entries.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
                    dirs.push(d);
                }
            }
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        dirs
    }
}

fn snapshotter() -> String {
    std::env::var("BN_SNAPSHOTTER").unwrap_or_else(|_| "overlayfs".into())
}

impl Drop for Containerd {
    /// Removes the pods as kubelet would (so their DELs run), then whatever is left whatever
    /// state it is in: containers by runc, processes by mount namespace and cgroup, the holder
    /// (and with it every mount), the cgroups, the mount points this test created.
    fn drop(&mut self) {
        use nix::sys::signal::Signal::SIGKILL;
        if matches!(self.daemon.as_mut().map(|c| c.try_wait()), Some(Ok(None))) {
            for pod in
                self.cri(&["pods"]).ok().and_then(|t| serde_json::from_str::<Vec<Value>>(&t).ok()).unwrap_or_default()
            {
                let id = pod["id"].as_str().unwrap_or_default();
                let _ = self.stop_pod(id).and_then(|_| self.remove_pod(id));
            }
        }
        if let Some(mut d) = self.daemon.take() {
            stop_child(&mut d, Duration::from_secs(10));
        }
        if let Some(holder) = &self.holder {
            let runc_root = self.dir.join("runc").join(K8S_NS);
            let runc = |args: &[&str]| {
                Command::new("nsenter")
                    .args(["--target", &holder.id().to_string(), "--mount", "runc", "--root"])
                    .arg(&runc_root)
                    .args(args)
                    .output()
            };
            let ids =
                runc(&["list", "-q"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = runc(&["kill", id, "KILL"]);
                let _ = runc(&["delete", "--force", id]);
            }
        }
        for pid in self.processes_in_holder() {
            kill(pid, SIGKILL);
        }
        // Anything still in the pods' cgroups (a pause whose shim was killed).
        for dir in self.cgroup_dirs() {
            for pid in fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().split_whitespace() {
                pid.parse().into_iter().for_each(|pid| kill(pid, SIGKILL));
            }
        }
        wait_for(|| self.processes_in_holder().is_empty(), Duration::from_secs(5));
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        // A cgroup is removable once its last task has been reaped.
        wait_for(
            || {
                self.cgroup_dirs().into_iter().for_each(|d| drop(fs::remove_dir(d)));
                self.cgroup_dirs().is_empty()
            },
            Duration::from_secs(5),
        );
        for dir in self.created.drain(..).rev() {
            let _ = fs::remove_dir(dir);
        }
        // Every mount was made in the holder's namespace: none may show in the host's.
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let ours = self.dir.to_string_lossy().into_owned();
        for line in mounts.lines().filter(|l| l.split_whitespace().nth(4).is_some_and(|p| p.starts_with(&ours))) {
            eprintln!("containerd test left a mount in the host namespace: {line}");
            if let Some(point) = line.split_whitespace().nth(4) {
                let _ = Command::new("umount").args(["--lazy", point]).output();
            }
        }
    }
}
