//! What wakes the agent: the kernel's change notifications and the signals that stop it.
//!
//! rtnetlink groups: links, IPv4/IPv6 addresses, routes and rules. nfnetlink: the nf_tables group,
//! which every nf_tables change raises (iptables-nft's too; iptables-legacy raises none).

use super::notice::{parse_netfilter, parse_route, Notice};
use crate::error::{code, Error, Result};
use netlink_sys::protocols::{NETLINK_NETFILTER, NETLINK_ROUTE};
use netlink_sys::{Socket, SocketAddr};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::time::Duration;

// rtnetlink multicast groups as bind() bits: 1 << (RTNLGRP_x - 1).
const RTMGRP_LINK: u32 = 1 << 0;
const RTMGRP_IPV4_IFADDR: u32 = 1 << 4;
const RTMGRP_IPV4_ROUTE: u32 = 1 << 6;
const RTMGRP_IPV4_RULE: u32 = 1 << 7;
const RTMGRP_IPV6_IFADDR: u32 = 1 << 8;
const RTMGRP_IPV6_ROUTE: u32 = 1 << 10;
const RTMGRP_IPV6_RULE: u32 = 1 << 18;
// NFNLGRP_NFTABLES = 7.
const NFNLGRP_NFTABLES: u32 = 1 << 6;

pub enum Wake {
    /// Something in the kernel changed: what, as far as the agent decides on it (maybe nothing).
    Change(Vec<Notice>),
    /// Nothing happened before the timeout.
    Timeout,
    /// One of the extra descriptors (probe replies) is readable.
    Probe,
    /// SIGTERM or SIGINT: stop.
    Stop(Signal),
}

pub struct Events {
    route: Socket,
    netfilter: Socket,
    signals: SignalFd,
    buf: Vec<u8>,
}

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(code::IO, format!("{what}: {e}"))
}

fn subscribe(protocol: isize, groups: u32, what: &str) -> Result<Socket> {
    let mut s = Socket::new(protocol).map_err(|e| fail(&format!("open {what} socket"), e))?;
    s.bind(&SocketAddr::new(0, groups)).map_err(|e| fail(&format!("subscribe to {what} notifications"), e))?;
    s.set_non_blocking(true).map_err(|e| fail(&format!("{what} socket"), e))?;
    // A burst can overflow the queue; a lost notification only means "look again", which a large
    // buffer makes rarer and ENOBUFS still reports.
    let _ = s.set_rx_buf_sz(1 << 20);
    Ok(s)
}

impl Events {
    pub fn open() -> Result<Events> {
        let route = subscribe(
            NETLINK_ROUTE,
            RTMGRP_LINK
                | RTMGRP_IPV4_IFADDR
                | RTMGRP_IPV4_ROUTE
                | RTMGRP_IPV4_RULE
                | RTMGRP_IPV6_IFADDR
                | RTMGRP_IPV6_ROUTE
                | RTMGRP_IPV6_RULE,
            "rtnetlink",
        )?;
        let netfilter = subscribe(NETLINK_NETFILTER, NFNLGRP_NFTABLES, "nftables")?;
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block().map_err(|e| fail("block SIGTERM and SIGINT", e))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK).map_err(|e| fail("open signalfd", e))?;
        Ok(Events { route, netfilter, signals, buf: vec![0; 1 << 16] })
    }

    /// Wait until something changes, a signal arrives or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration, extra: &[RawFd]) -> Result<Wake> {
        let ms = u16::try_from(timeout.as_millis().min(60_000)).unwrap_or(u16::MAX);
        // SAFETY: the extra descriptors are the prober's sockets, open for this call.
        let extra: Vec<BorrowedFd> = extra.iter().map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) }).collect();
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.route.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.netfilter.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(extra.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(Wake::Timeout),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Wake::Timeout),
            Err(e) => return Err(fail("wait for kernel notifications", e)),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let (sig, changed) = (ready(&fds[0]), ready(&fds[1]) || ready(&fds[2]));
        if sig {
            if let Ok(Some(info)) = self.signals.read_signal() {
                let signal = Signal::try_from(info.ssi_signo as i32).unwrap_or(Signal::SIGTERM);
                return Ok(Wake::Stop(signal));
            }
        }
        let probe = fds[3..].iter().any(ready);
        if changed {
            return Ok(Wake::Change(self.drain()));
        }
        Ok(if probe { Wake::Probe } else { Wake::Timeout })
    }

    /// Read every queued notification.
    fn drain(&mut self) -> Vec<Notice> {
        let mut out = Vec::new();
        for (s, parse) in
            [(&self.route, parse_route as fn(&[u8], &mut Vec<Notice>)), (&self.netfilter, parse_netfilter)]
        {
            loop {
                match s.recv(&mut &mut self.buf[..], 0) {
                    Ok(0) => break,
                    Ok(n) => parse(&self.buf[..n], &mut out),
                    // ENOBUFS: notifications were lost; the pass that follows looks at everything.
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => out.push(Notice::Lost),
                    Err(_) => break,
                }
            }
        }
        out
    }
}
