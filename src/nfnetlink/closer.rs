//! One process per network namespace that keeps the netfilter sockets of finished calls and
//! closes them only once calls have stopped coming.
//!
//! Closing such a socket takes nf_tables' commit mutex and, holding it, waits for the freeing of
//! what the namespace's last commits deleted: up to one RCU grace period after any deletion (a
//! close right after an element deletion took 15 ms here, right after an addition 0.02 ms). While
//! calls come back to back some deletion is nearly always that recent, so a socket closed then
//! stalls the next call, whoever closes it. So the first call's child becomes a closer bound to an
//! abstract unix socket (per network namespace by nature); later calls pass their sockets to it
//! (SCM_RIGHTS) and exit. After [`QUIET_MS`] without a call, far longer than a grace period,
//! nothing is pending any more: it closes everything at once and exits.
//!
//! Both ends check the other's uid through SO_PEERCRED, so no other user can squat the name to
//! collect the sockets, nor keep the closer awake.

use nix::libc;
use std::os::fd::RawFd;

/// The abstract address (leading NUL): one per network namespace.
const NAME: &[u8] = b"\0bridge-nat/nfnetlink-closer";
/// Calls further apart than this find their sockets closed in between.
const QUIET_MS: i32 = 200;
/// Under endless churn, close what is held after a grace period of its own, rather than grow.
const MAX_HELD: usize = 512;
/// A connected caller sends at once; one that does not is dropped after this.
const RECV_TIMEOUT_US: libc::suseconds_t = 100_000;
/// SCM_MAX_FD: most descriptors one message may carry.
const MAX_FDS_PER_MESSAGE: usize = 253;

/// Hand `fds` to the closer of this network namespace, starting one when there is none. They are
/// closed in this process only if no process can be forked.
pub fn hand_over(fds: Vec<RawFd>) {
    if send(NAME, &fds) {
        close_all(&fds);
        return;
    }
    // SAFETY: fork in a single-threaded process; the child only makes raw syscalls and _exits.
    if unsafe { libc::fork() } == 0 {
        serve(fds);
    }
    // Once forked, the child's references keep the sockets open; if fork failed, this process
    // pays the wait.
    close_all(&fds);
}

/// Whether a closer of our uid took the descriptors.
fn send(name: &[u8], fds: &[RawFd]) -> bool {
    let Some(conn) = connect(name) else { return false };
    let sent = fds.chunks(MAX_FDS_PER_MESSAGE).all(|chunk| send_fds(conn, chunk));
    // SAFETY: conn is ours and closed once.
    unsafe { libc::close(conn) };
    sent
}

fn connect(name: &[u8]) -> Option<RawFd> {
    let fd = unix_socket()?;
    let (addr, len) = address(name);
    // SAFETY: addr is a valid sockaddr_un of len bytes.
    let ok = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) } == 0;
    if ok && peer_is_us(fd) {
        return Some(fd);
    }
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    None
}

/// A non-blocking SEQPACKET socket: a full backlog fails the connect instead of stalling the call.
fn unix_socket() -> Option<RawFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    (fd >= 0).then_some(fd)
}

fn address(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len();
    (addr, len as libc::socklen_t)
}

fn peer_is_us(fd: RawFd) -> bool {
    // SAFETY: ucred is plain data, written by getsockopt up to len bytes.
    unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let got =
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len);
        got == 0 && cred.uid == libc::geteuid()
    }
}

fn send_fds(conn: RawFd, fds: &[RawFd]) -> bool {
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a size computation.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(payload) } as usize];
    let mut byte = [1u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: msghdr is plain data; every pointer in it refers to a live buffer of the stated
    // length, and the control message is written inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        libc::sendmsg(conn, &msg, libc::MSG_NOSIGNAL) == 1
    }
}

fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: each descriptor was handed over to be closed, and is closed once.
        unsafe { libc::close(fd) };
    }
}

/// Wait out one RCU grace period (MEMBARRIER_CMD_GLOBAL is one synchronize_rcu()), or sleep
/// about as long where membarrier is refused.
fn grace_period() {
    // SAFETY: membarrier takes no pointers; usleep is a plain sleep.
    unsafe {
        if libc::syscall(libc::SYS_membarrier, 1, 0, 0) != 0 {
            libc::usleep(50_000);
        }
    }
}

/// The forked child: keep `held` and whatever later calls send until calls stop, then close it all.
fn serve(mut held: Vec<RawFd>) -> ! {
    detach(&held);
    let listener = listen(NAME);
    if listener < 0 {
        // Another closer won the name meanwhile (or there is no unix socket): give it the lot,
        // or close them ourselves once a grace period has passed.
        if !send(NAME, &held) {
            grace_period();
            close_all(&held);
        }
        // SAFETY: nothing is left to do in this process.
        unsafe { libc::_exit(0) };
    }
    loop {
        let mut pfd = libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, QUIET_MS) };
        if ready == 0 {
            break;
        }
        if ready < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
        accept_all(listener, &mut held);
        if held.len() >= MAX_HELD {
            grace_period();
            close_all(&held);
            held.clear();
        }
    }
    // Stop taking sockets before closing: a call arriving now starts a closer of its own.
    // SAFETY: the listener is ours; nothing is left to do in this process afterwards.
    unsafe {
        libc::close(listener);
        close_all(&held);
        libc::_exit(0)
    }
}

/// Drop every descriptor but `keep` (stdout, the lock, ...) so nobody waits for this process,
/// and leave the caller's session and working directory.
fn detach(keep: &[RawFd]) {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    let mut next = 0u32;
    // SAFETY: closes descriptors this process does not use; setsid/chdir/setrlimit take no
    // pointers that outlive the call.
    unsafe {
        for &fd in &keep {
            if fd as u32 > next {
                libc::close_range(next, fd as u32 - 1, 0);
            }
            next = fd as u32 + 1;
        }
        libc::close_range(next, u32::MAX, 0);
        libc::setsid();
        libc::chdir(c"/".as_ptr());
        // Room for MAX_HELD sockets plus a message in flight.
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn listen(name: &[u8]) -> RawFd {
    let Some(fd) = unix_socket() else { return -1 };
    let (addr, len) = address(name);
    // SAFETY: addr is a valid sockaddr_un of len bytes.
    let ok =
        unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) == 0 && libc::listen(fd, 128) == 0 };
    if ok {
        return fd;
    }
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    -1
}

fn accept_all(listener: RawFd, held: &mut Vec<RawFd>) {
    loop {
        // SAFETY: no peer address is asked for; the connection is blocking (with a timeout below).
        let conn = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if conn < 0 {
            return;
        }
        if peer_is_us(conn) {
            let timeout = libc::timeval { tv_sec: 0, tv_usec: RECV_TIMEOUT_US };
            // SAFETY: timeout is a valid timeval of the stated size.
            unsafe {
                libc::setsockopt(
                    conn,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            while receive_fds(conn, held) {}
        }
        // SAFETY: conn is ours and closed once.
        unsafe { libc::close(conn) };
    }
}

/// Read one message and keep the descriptors it carries; false at the end of the connection.
fn receive_fds(conn: RawFd, held: &mut Vec<RawFd>) -> bool {
    let room = (MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a size computation.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(room) } as usize];
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: every pointer in msg refers to a live buffer of the stated length; control
    // messages are read within msg_controllen as the kernel filled it.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        if libc::recvmsg(conn, &mut msg, libc::MSG_CMSG_CLOEXEC) <= 0 {
            return false;
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                held.extend((0..count).map(|i| data.add(i).read_unaligned()));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn name(what: &str) -> Vec<u8> {
        format!("\0bridge-nat-test/{}/{what}", std::process::id()).into_bytes()
    }

    fn inode(fd: RawFd) -> (u64, u64) {
        // SAFETY: fstat writes into a zeroed stat of the right size.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(fd, &mut st), 0, "fstat {fd}");
            (st.st_dev, st.st_ino)
        }
    }

    #[test]
    fn descriptors_sent_arrive_as_the_same_open_files() {
        let name = name("handover");
        let listener = listen(&name);
        assert!(listener >= 0, "listen on a fresh name");
        let files: Vec<std::fs::File> = (0..3).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        assert!(send(&name, &fds), "send to a listening closer");
        let mut held = Vec::new();
        accept_all(listener, &mut held);
        assert_eq!(
            held.iter().map(|&fd| inode(fd)).collect::<Vec<_>>(),
            fds.iter().map(|&fd| inode(fd)).collect::<Vec<_>>()
        );
        assert!(held.iter().all(|fd| !fds.contains(fd)), "the closer holds descriptors of its own");
        close_all(&held);
        close_all(&[listener]);
    }

    #[test]
    fn more_descriptors_than_one_message_carries_all_arrive() {
        let name = name("many");
        let listener = listen(&name);
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let fds = vec![file.as_raw_fd(); MAX_FDS_PER_MESSAGE + 7];
        assert!(send(&name, &fds));
        let mut held = Vec::new();
        accept_all(listener, &mut held);
        assert_eq!(held.len(), fds.len());
        close_all(&held);
        close_all(&[listener]);
    }

    #[test]
    fn without_a_closer_nothing_is_sent_and_a_second_one_cannot_bind() {
        let name = name("absent");
        assert!(!send(&name, &[0]), "sent to nobody");
        let first = listen(&name);
        assert!(first >= 0);
        assert!(listen(&name) < 0, "two closers in one namespace");
        close_all(&[first]);
        assert!(!send(&name, &[0]), "sent to a closer that has gone");
    }
}
