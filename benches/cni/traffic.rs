//! The data plane's two ends: a client namespace linked to the node the way an outside host is,
//! and pods on the node's bridge (pods.rs) with a TCP server in them. Threads enter those
//! namespaces with setns (the main thread, which spawns the plugins, stays in the node), so
//! neither end spawns a process per connection and the node's NAT is what the rate measures.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;

use crate::node::{run_ok, setns_net};
use crate::pods::{self, PodSpec};

/// The node's address on the client's link: the client connects to it, so the node DNATs.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const NODE_LINK: &str = "203.0.113.1/24";
const CLIENT_LINK: &str = "203.0.113.2/24";
/// The server's port in the pod (the measured forward's containerPort).
pub const SERVER_PORT: u16 = 8080;
/// Rates are counted per window; the report gives the median and the spread of the windows.
pub const WINDOW: Duration = Duration::from_millis(500);
pub const WARM_UP: Duration = Duration::from_millis(250);
/// Client threads, one per core of the machines the figures come from (2): with one thread the
/// rate is bound by that thread's own syscalls, and the kernel's cost per connection hides.
pub const CLIENTS: usize = 2;
/// Bounds a window's count whatever the time (far above what a veth path reaches).
const MAX_PER_WINDOW: u64 = 1_000_000;
/// A connect slower than this waited for a retransmitted SYN (a drop somewhere), not for NAT.
const SLOW: Duration = Duration::from_millis(100);

/// What the clients saw over one measurement.
#[derive(Clone, Debug, Default)]
pub struct Rate {
    /// Connections per second of each window, all client threads together.
    pub windows: Vec<f64>,
    pub connections: u64,
    pub failures: u64,
    pub first_error: Option<String>,
    pub slow: u64,
    /// Connections the server accepted over the same measurement (warm-up included).
    pub accepted: u64,
    /// Connections the clients made, warm-up included (to compare with `accepted`).
    pub attempted_ok: u64,
    /// The client threads' CPU time in user space and in the kernel over the windows, and their
    /// wall time (summed over threads): the kernel share includes the node's whole packet path,
    /// which veth runs in the sender's softirq, so a small user share says the client costs little.
    pub user_secs: f64,
    pub sys_secs: f64,
    pub wall_secs: f64,
}

impl Rate {
    /// The threads' rates as one: windows added up index by index.
    fn combine(rates: Vec<Rate>) -> Rate {
        let mut all = Rate::default();
        let windows = rates.iter().map(|r| r.windows.len()).min().unwrap_or(0);
        all.windows = (0..windows).map(|i| rates.iter().map(|r| r.windows[i]).sum()).collect();
        for r in rates {
            all.connections += r.connections;
            all.failures += r.failures;
            all.first_error = all.first_error.or(r.first_error);
            all.slow += r.slow;
            all.attempted_ok += r.attempted_ok;
            all.user_secs += r.user_secs;
            all.sys_secs += r.sys_secs;
            all.wall_secs += r.wall_secs;
        }
        all
    }
}

fn netns_file(name: &str) -> File {
    File::open(Path::new("/var/run/netns").join(name)).unwrap_or_else(|e| panic!("open netns {name}: {e}"))
}

/// A TCP server on SERVER_PORT in a pod's namespace, counting what it accepts; stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Returns once the server listens.
    pub fn start(netns: &str) -> Server {
        let mut server = Server { stop: Arc::default(), accepted: Arc::default(), thread: None };
        let (ready_tx, ready_rx) = mpsc::channel();
        let (ns, stop, accepted) = (netns_file(netns), server.stop.clone(), server.accepted.clone());
        server.thread = Some(std::thread::spawn(move || serve(ns, stop, accepted, ready_tx)));
        match ready_rx.recv() {
            Ok(Ok(())) => server,
            Ok(Err(e)) => panic!("data-plane server in {netns}: {e}"),
            Err(_) => panic!("data-plane server thread in {netns} died before listening"),
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Owns the client namespace and the measured pod with its server; Drop deletes them.
pub struct Endpoints {
    client_ns: String,
    pod: PodSpec,
    server: Option<Server>,
}

impl Endpoints {
    /// Called from the node namespace: builds the client namespace and its link to the node, and
    /// the pod `pod` with its server at SERVER_PORT.
    pub fn create(node_name: &str, pod: PodSpec) -> Endpoints {
        let mut ends = Endpoints { client_ns: format!("{node_name}-client"), pod, server: None };
        let c = ends.client_ns.clone();
        let _ = Command::new("ip").args(["netns", "del", &c]).output();
        run_ok("ip", &["netns", "add", &c]);
        run_ok("ip", &["-n", &c, "link", "set", "lo", "up"]);
        run_ok("ip", &["link", "add", "dp-client", "type", "veth", "peer", "name", "eth0", "netns", &c]);
        run_ok("ip", &["addr", "add", NODE_LINK, "dev", "dp-client"]);
        run_ok("ip", &["link", "set", "dp-client", "up"]);
        run_ok("ip", &["-n", &c, "addr", "add", CLIENT_LINK, "dev", "eth0"]);
        run_ok("ip", &["-n", &c, "link", "set", "eth0", "up"]);
        run_ok("ip", &["-n", &c, "route", "add", "default", "via", &NODE_ADDR.to_string()]);
        pods::create(std::slice::from_ref(&ends.pod)).unwrap_or_else(|e| panic!("the data plane's pod: {e}"));
        // The bridge plugin would have turned forwarding on; portmap does not, and nothing
        // measured before needed it. This is the node namespace's own setting.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding in the node namespace");
        ends.server = Some(Server::start(&ends.pod.netns));
        ends
    }

    pub fn accepted(&self) -> u64 {
        self.server.as_ref().map_or(0, Server::accepted)
    }

    /// Runs `f` on `threads` threads inside the client namespace, released together.
    fn in_client<T: Send + 'static>(&self, threads: usize, f: impl Fn() -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<JoinHandle<T>> = (0..threads)
            .map(|_| {
                let (ns, f, start) = (netns_file(&self.client_ns), f.clone(), start.clone());
                std::thread::spawn(move || {
                    setns_net(&ns).expect("setns into the client namespace");
                    start.wait();
                    f()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread panicked")).collect()
    }

    /// One connection from the client to the node's `port`, and whether the server accepted it.
    pub fn probe(&self, port: u16) -> std::result::Result<(), String> {
        let before = self.accepted();
        let mut done = self.in_client(1, move || connect_once(&sockaddr(NODE_ADDR, port)));
        done.pop().expect("one client").map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.accepted() == before {
            if Instant::now() > deadline {
                return Err("connected, but the server in the pod accepted nothing".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Connects to the node's `port` until a connection succeeds or `limit` has passed since
    /// `since` (a plugin's return); the time from `since` to the first connection `server`
    /// accepted. A refused connect (no forward yet) is retried at once, an unanswered SYN after
    /// its 1 s timeout, as a client would.
    pub fn first_connection(
        &self,
        port: u16,
        server: &Server,
        since: Instant,
        limit: Duration,
    ) -> Result<Duration, String> {
        let before = server.accepted();
        let mut done = self.in_client(1, move || {
            let mut last = String::from("no attempt");
            while since.elapsed() < limit {
                match connect_once(&sockaddr(NODE_ADDR, port)) {
                    Ok(()) => return Ok(since.elapsed()),
                    Err(e) => last = e.to_string(),
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(format!("no connection through port {port} within {limit:?} of ADD (last: {last})"))
        });
        let took = done.pop().expect("one client")?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while server.accepted() == before {
            if Instant::now() > deadline {
                return Err(format!("connected through port {port}, but the new pod's server accepted nothing"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(took)
    }

    /// Connects and closes in a loop for `seconds` (after a warm-up) from CLIENTS threads, one
    /// connection at a time each.
    pub fn measure(&self, port: u16, seconds: f64) -> Rate {
        let before = self.accepted();
        let windows = ((seconds / WINDOW.as_secs_f64()).round() as usize).max(1);
        let mut rate = Rate::combine(self.in_client(CLIENTS, move || client_loop(&sockaddr(NODE_ADDR, port), windows)));
        // The last connections may still sit in the listener's queue.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.accepted() - before < rate.attempted_ok && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        rate.accepted = self.accepted() - before;
        rate
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        drop(self.server.take());
        // Deleting a namespace deletes its veth ends, and with them the node's peers.
        let _ = Command::new("ip").args(["netns", "del", &self.client_ns]).output();
        pods::delete(std::slice::from_ref(&self.pod));
    }
}

fn set_opt<T>(fd: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    if unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, name, value as *const T as *const libc::c_void, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t }
}

fn serve(ns: File, stop: Arc<AtomicBool>, accepted: Arc<AtomicU64>, ready: mpsc::Sender<Result<(), String>>) {
    let setup = || -> io::Result<TcpListener> {
        setns_net(&ns)?;
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, SERVER_PORT))?;
        // std listens with a backlog of 128: a moment without CPU for this thread would then
        // drop SYNs and the client would wait out a 1 s retransmission.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // accept() returns EAGAIN after this, so the loop sees `stop`.
        set_opt(listener.as_raw_fd(), libc::SO_RCVTIMEO, &timeval(Duration::from_millis(50)))?;
        Ok(listener)
    };
    let listener = match setup() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("listen on port {SERVER_PORT} in the pod: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        if listener.accept().is_ok() {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
}

/// socket, two options, connect, close: nothing else per connection.
fn connect_once(addr: &libc::sockaddr_in) -> io::Result<()> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        // Close with RST: no side keeps TIME_WAIT, so ephemeral ports recycle at any rate, and
        // conntrack treats a SYN on a reset tuple as a new connection that is NATed anew.
        set_opt(fd, libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 })?;
        // A blocking connect honours the send timeout: an unanswered SYN costs 1 s, not minutes.
        set_opt(fd, libc::SO_SNDTIMEO, &timeval(Duration::from_secs(1)))?;
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if unsafe { libc::connect(fd, addr as *const libc::sockaddr_in as *const libc::sockaddr, len) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINPROGRESS) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer to the SYN within 1 s"));
            }
            return Err(e);
        }
        Ok(())
    })();
    unsafe { libc::close(fd) };
    result
}

fn client_loop(addr: &libc::sockaddr_in, windows: usize) -> Rate {
    let mut rate = Rate::default();
    let warm_up_end = Instant::now() + WARM_UP;
    while Instant::now() < warm_up_end {
        if connect_once(addr).is_ok() {
            rate.attempted_ok += 1;
        }
    }
    let (user0, sys0) = thread_cpu();
    let measured = Instant::now();
    for _ in 0..windows {
        let start = Instant::now();
        let mut ok = 0u64;
        let mut tries = 0u64;
        while tries < MAX_PER_WINDOW {
            let t = Instant::now();
            if t - start >= WINDOW {
                break;
            }
            tries += 1;
            match connect_once(addr) {
                Ok(()) => ok += 1,
                Err(e) => {
                    rate.failures += 1;
                    rate.first_error.get_or_insert_with(|| e.to_string());
                }
            }
            if t.elapsed() > SLOW {
                rate.slow += 1;
            }
        }
        rate.windows.push(ok as f64 / start.elapsed().as_secs_f64());
        rate.connections += ok;
        rate.attempted_ok += ok;
        // A path that refuses fails fast: one window of it is enough to report.
        if rate.failures > 1000 {
            break;
        }
    }
    let (user1, sys1) = thread_cpu();
    (rate.user_secs, rate.sys_secs, rate.wall_secs) = (user1 - user0, sys1 - sys0, measured.elapsed().as_secs_f64());
    rate
}

/// (user, system) CPU seconds of the calling thread.
fn thread_cpu() -> (f64, f64) {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}
