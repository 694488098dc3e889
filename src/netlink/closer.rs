//! One process per network namespace that keeps the netfilter sockets of finished calls and
//! closes them only once calls have stopped coming.
//!
//! Closing such a socket takes nf_tables' commit mutex and, holding it, waits for the freeing of
//! what the namespace's last commits deleted: up to one RCU grace period after any deletion (a
//! close right after an element deletion took 15 ms here, right after an addition 0.02 ms). While
//! calls come back to back some deletion is nearly always that recent, so a socket closed then
//! stalls the next call, whoever closes it. So the first call's child becomes a closer bound to an
//! abstract unix socket (per network namespace by nature). Later calls connect to it when they
//! open their first netfilter socket, which tells it a call is under way, and pass their sockets
//! (SCM_RIGHTS) over that connection when they exit. When no call is under way, the closer lets a
//! grace period pass; if no call has started meanwhile, nothing is pending any more and it closes
//! everything at once. It exits after [`QUIET_MS`] without calls.
//!
//! Both ends check the other's uid through SO_PEERCRED, so no other user can squat the name to
//! collect the sockets, nor keep the closer awake.

mod wire;

use nix::libc;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use wire::close_all;

/// The abstract address (leading NUL): one per network namespace.
const NAME: &[u8] = b"\0bridge-nat/nfnetlink-closer";
/// A pause between calls this long may be one: then wait a grace period and close.
const SETTLE_MS: i32 = 5;
/// With nothing held and no call for this long, the closer exits.
const QUIET_MS: i32 = 200;
/// A call under way that has said nothing for this long is stopped or stuck: stop waiting for it.
const STALLED_CALL_MS: i32 = 60_000;
/// Calls that never pause: past this, close anyway (after a grace period) rather than grow.
const MAX_HELD: usize = 4096;

/// This process's connection to the closer, once announced (-1: none).
static ANNOUNCED: AtomicI32 = AtomicI32::new(-1);

/// Tell this namespace's closer, if there is one, that a call is under way, so that it does not
/// close sockets while this call may be deleting.
pub fn announce() {
    if ANNOUNCED.load(Ordering::Relaxed) < 0 {
        if let Some(conn) = wire::connect(NAME) {
            ANNOUNCED.store(conn, Ordering::Relaxed);
        }
    }
}

/// Hand `fds` to the closer of this network namespace, starting one when there is none. They are
/// closed in this process only if no process can be forked.
pub fn hand_over(fds: Vec<RawFd>) {
    let announced = ANNOUNCED.swap(-1, Ordering::Relaxed);
    let conn = if announced >= 0 { Some(announced) } else { wire::connect(NAME) };
    if let Some(conn) = conn {
        let sent = wire::send_fds(conn, &fds);
        close_all(&[conn]);
        // A closer that was already leaving drops the connection: start another.
        if sent || wire::connect(NAME).is_some_and(|c| send_and_close(c, &fds)) {
            close_all(&fds);
            return;
        }
    }
    // SAFETY: the process is single-threaded, so the child inherits no lock another thread held;
    // the child never returns (serve ends in _exit).
    if unsafe { libc::fork() } == 0 {
        serve(fds);
    }
    // Once forked, the child's references keep the sockets open; if fork failed, this process
    // pays the wait.
    close_all(&fds);
}

fn send_and_close(conn: RawFd, fds: &[RawFd]) -> bool {
    let sent = wire::send_fds(conn, fds);
    close_all(&[conn]);
    sent
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

/// The forked child: keep `held` and whatever later calls send; close it all once no call has
/// been under way for a grace period; exit once none has come for QUIET_MS.
fn serve(mut held: Vec<RawFd>) -> ! {
    let max_held = detach(&held);
    let Some(listener) = wire::listen(NAME) else {
        // Another closer won the name meanwhile: give it the lot, or close them ourselves once
        // a grace period has passed.
        if !wire::connect(NAME).is_some_and(|c| send_and_close(c, &held)) {
            grace_period();
            close_all(&held);
        }
        // SAFETY: nothing is left to do in this process.
        unsafe { libc::_exit(0) };
    };
    // Connections of calls under way.
    let mut calls: Vec<RawFd> = Vec::new();
    loop {
        let mut polled: Vec<libc::pollfd> = std::iter::once(listener)
            .chain(calls.iter().copied())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        let timeout = match (calls.is_empty(), held.is_empty()) {
            (false, _) => STALLED_CALL_MS,
            (true, false) => SETTLE_MS,
            (true, true) => QUIET_MS,
        };
        // SAFETY: `polled` is a live array of that many pollfds.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if ready == 0 {
            match (calls.is_empty(), held.is_empty()) {
                (false, _) => {
                    close_all(&calls);
                    calls.clear();
                }
                (true, false) => close_while_idle(listener, &mut held),
                (true, true) => break,
            }
            continue;
        }
        for p in &polled[1..] {
            if p.revents != 0 && !wire::drain(p.fd, &mut held) {
                close_all(&[p.fd]);
                calls.retain(|&c| c != p.fd);
            }
        }
        if polled[0].revents != 0 {
            wire::accept_all(listener, &mut calls);
        }
        // Calls without a pause long enough: close now rather than run out of descriptors, at
        // the price of stalling a call or two.
        if held.len() >= max_held {
            grace_period();
            close_all(&held);
            held.clear();
        }
    }
    // Stop taking sockets before closing: a call connecting now finds no closer, or one whose
    // connection drops, and starts a closer of its own.
    close_all(&[listener]);
    close_all(&calls);
    close_all(&held);
    // SAFETY: nothing is left to do in this process.
    unsafe { libc::_exit(0) }
}

/// No call is under way: once a grace period has passed, what the last calls deleted is freed and
/// closing waits for nothing, unless a call has started meanwhile (every call connects before it
/// can delete anything). Then keep the rest for the next pause.
fn close_while_idle(listener: RawFd, held: &mut Vec<RawFd>) {
    grace_period();
    // The destroy work's own grace period is over; let its worker finish freeing.
    // SAFETY: a plain sleep.
    unsafe { libc::usleep(2_000) };
    while let Some(&fd) = held.last() {
        let mut pfd = libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; a zero timeout only looks.
        if unsafe { libc::poll(&mut pfd, 1, 0) } != 0 {
            return;
        }
        close_all(&[fd]);
        held.pop();
    }
}

/// Drop every descriptor but `keep` (stdout, the lock, ...) so nobody waits for this process,
/// and leave the caller's session and working directory. Returns how many sockets to hold at most.
fn detach(keep: &[RawFd]) -> usize {
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
        // Room for MAX_HELD sockets plus what a message brings, as far as the hard limit allows.
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return MAX_HELD.min(256);
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        MAX_HELD.min((lim.rlim_cur as usize).saturating_sub(2 * wire::MAX_FDS_PER_MESSAGE))
    }
}

#[cfg(test)]
mod tests;
