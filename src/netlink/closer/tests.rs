use super::wire::{self, close_all, MAX_FDS_PER_MESSAGE};
use nix::libc;
use std::os::fd::{AsRawFd, RawFd};

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

fn files(n: usize) -> Vec<std::fs::File> {
    (0..n).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect()
}

/// A closer's view: the listener, and the connections accepted so far.
struct Listening {
    listener: RawFd,
    calls: Vec<RawFd>,
}

impl Listening {
    fn new(name: &[u8]) -> Listening {
        Listening { listener: wire::listen(name).expect("listen on a fresh name"), calls: Vec::new() }
    }

    fn accept(&mut self) {
        wire::accept_all(self.listener, &mut self.calls);
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        close_all(&self.calls);
        close_all(&[self.listener]);
    }
}

#[test]
fn descriptors_sent_arrive_as_the_same_open_files_then_the_call_ends() {
    let name = name("handover");
    let mut closer = Listening::new(&name);
    let files = files(3);
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let conn = wire::connect(&name).expect("connect to a listening closer");
    assert!(wire::send_fds(conn, &fds), "send");
    close_all(&[conn]);
    closer.accept();
    assert_eq!(closer.calls.len(), 1);
    let mut held = Vec::new();
    assert!(!wire::drain(closer.calls[0], &mut held), "the connection is over once the call closed it");
    assert_eq!(
        held.iter().map(|&fd| inode(fd)).collect::<Vec<_>>(),
        fds.iter().map(|&fd| inode(fd)).collect::<Vec<_>>()
    );
    assert!(held.iter().all(|fd| !fds.contains(fd)), "the closer holds descriptors of its own");
    close_all(&held);
}

#[test]
fn an_announced_call_is_under_way_until_it_hands_over_and_leaves() {
    let name = name("announced");
    let mut closer = Listening::new(&name);
    let conn = wire::connect(&name).expect("announce");
    closer.accept();
    let mut held = Vec::new();
    assert!(wire::drain(closer.calls[0], &mut held), "a call that said nothing yet is under way");
    assert!(held.is_empty());
    let files = files(2);
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    assert!(wire::send_fds(conn, &fds));
    assert!(wire::drain(closer.calls[0], &mut held), "still under way until it closes");
    assert_eq!(held.len(), 2);
    close_all(&[conn]);
    assert!(!wire::drain(closer.calls[0], &mut held), "over once closed");
    close_all(&held);
}

#[test]
fn more_descriptors_than_one_message_carries_all_arrive() {
    let name = name("many");
    let mut closer = Listening::new(&name);
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let fds = vec![file.as_raw_fd(); MAX_FDS_PER_MESSAGE + 7];
    let conn = wire::connect(&name).expect("connect");
    closer.accept();
    let mut held = Vec::new();
    assert!(wire::send_fds(conn, &fds));
    close_all(&[conn]);
    assert!(!wire::drain(closer.calls[0], &mut held));
    assert_eq!(held.len(), fds.len());
    close_all(&held);
}

#[test]
fn without_a_closer_nobody_answers_and_a_second_one_cannot_bind() {
    let name = name("absent");
    assert!(wire::connect(&name).is_none(), "connected to nobody");
    let first = Listening::new(&name);
    assert!(wire::listen(&name).is_none(), "two closers in one namespace");
    drop(first);
    assert!(wire::connect(&name).is_none(), "connected to a closer that has gone");
}
