//! The netfilter netlink socket shared by ctnetlink (conntrack) and nf_tables, with the attribute
//! encoding both use.
//!
//! Closing a netfilter netlink socket makes the kernel wait, holding nf_tables' commit mutex, for
//! the freeing of what the namespace's last commits deleted, i.e. up to one RCU grace period
//! (10–25 ms measured here). The deletion itself is in force by then; only the freeing of the old
//! objects remains. So sockets are not closed by the call: [`linger`] keeps them, and [`release`]
//! at exit hands them to a closer process that closes them once calls have stopped coming.

use crate::error::{code, Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

const NETLINK_NETFILTER: i32 = 12;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

static LINGERING: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Keep `fd` open until [`release`]; see the module comment for why.
pub fn linger(fd: OwnedFd) {
    LINGERING.lock().unwrap_or_else(|e| e.into_inner()).push(fd.into_raw_fd());
}

/// Hand the lingering sockets to this namespace's closer (see [`super::closer`]), so that this process
/// exits at once and their release stalls no later call.
pub fn release() {
    let fds = std::mem::take(&mut *LINGERING.lock().unwrap_or_else(|e| e.into_inner()));
    if !fds.is_empty() {
        super::closer::hand_over(fds);
    }
}

/// Netlink attribute writer: nested attributes are opened and closed like brackets.
#[derive(Default)]
pub struct Attrs {
    pub buf: Vec<u8>,
    open: Vec<usize>,
}

impl Attrs {
    pub fn new() -> Attrs {
        Attrs::default()
    }

    pub fn bytes(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend((len as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// nf_tables integers travel in network byte order.
    pub fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.bytes(kind, &v.to_be_bytes())
    }

    pub fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.bytes(kind, &b)
    }

    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend([0, 0]);
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        let start = self.open.pop().expect("attribute nesting: end without begin");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// A nested attribute around whatever `f` writes.
    pub fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        self.begin(kind);
        f(self);
        self.end()
    }
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterate the attributes in `buf` as (type without flags, payload).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, payload))
    })
}

pub fn find_attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == kind).map(|(_, p)| p)
}

pub fn be32_of(payload: &[u8]) -> Option<u32> {
    payload.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub fn str_of(payload: &[u8]) -> String {
    let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// One netfilter message: netlink header, nfgenmsg (family, version 0, res_id), attributes.
pub fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend((len as u32).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend(res_id.to_be_bytes());
    out.extend(attrs);
    out
}

/// A reply: either a message (type, attributes after nfgenmsg) or the ack/error of one sequence.
#[derive(Debug)]
pub enum Reply<'a> {
    Message { seq: u32, attrs: &'a [u8] },
    Ack { seq: u32, errno: i32 },
    Done { seq: u32 },
}

pub struct Socket {
    fd: Option<OwnedFd>,
    what: &'static str,
}

impl Socket {
    pub fn open(what: &'static str) -> Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned immediately.
        let fd = unsafe {
            nix::libc::socket(nix::libc::AF_NETLINK, nix::libc::SOCK_RAW | nix::libc::SOCK_CLOEXEC, NETLINK_NETFILTER)
        };
        if fd < 0 {
            return Err(Self::errno(what, "socket"));
        }
        super::closer::announce();
        // SAFETY: fd is a fresh, valid descriptor we own.
        Ok(Socket { fd: Some(unsafe { OwnedFd::from_raw_fd(fd) }), what })
    }

    fn errno(what: &str, op: &str) -> Error {
        let e = std::io::Error::last_os_error();
        Error::new(code::IO, format!("{what} netlink {op}: {e}"))
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    pub fn send(&self, msg: &[u8]) -> Result<()> {
        // SAFETY: the kernel reads msg.len() bytes from a live slice; a zeroed sockaddr_nl targets the kernel.
        let n = unsafe {
            let mut addr: nix::libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = nix::libc::AF_NETLINK as u16;
            nix::libc::sendto(
                self.raw(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const nix::libc::sockaddr_nl).cast(),
                std::mem::size_of::<nix::libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(Self::errno(self.what, "send"));
        }
        Ok(())
    }

    /// Read one datagram and hand each reply in it to `f`; false when nothing was waiting
    /// (`nonblocking`) . `f` returns false to say it has seen all it wanted.
    pub fn receive(&self, nonblocking: bool, buf: &mut [u8], mut f: impl FnMut(Reply) -> bool) -> Result<bool> {
        let flags = if nonblocking { nix::libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: the kernel writes at most buf.len() bytes into our buffer.
        let n = unsafe { nix::libc::recv(self.raw(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if nonblocking && e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(false);
            }
            return Err(Error::new(code::IO, format!("{} netlink recv: {e}", self.what)));
        }
        let mut data = &buf[..n as usize];
        let mut more = true;
        while data.len() >= 16 && more {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
            if len < 16 || len > data.len() {
                return Err(Error::new(code::IO, format!("{} netlink: truncated message", self.what)));
            }
            let body = &data[16..len];
            more = match kind {
                NLMSG_DONE => f(Reply::Done { seq }),
                NLMSG_ERROR => {
                    let errno = body.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    f(Reply::Ack { seq, errno: -errno })
                }
                _ => f(Reply::Message { seq, attrs: body.get(4..).unwrap_or(&[]) }),
            };
            data = &data[align4(len).min(data.len())..];
        }
        Ok(true)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            linger(fd);
        }
    }
}

/// An errno from the kernel as an error of `code`, naming the errno in `details` for callers
/// that tolerate some (ENOENT, EEXIST).
pub fn errno_error(errcode: u32, what: impl std::fmt::Display, errno: i32) -> Error {
    let e = std::io::Error::from_raw_os_error(errno);
    let name = match errno {
        nix::libc::ENOENT => "ENOENT",
        nix::libc::EEXIST => "EEXIST",
        nix::libc::EBUSY => "EBUSY",
        _ => "",
    };
    Error::new(errcode, format!("{what}: {e}")).with_details(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_round_trip() {
        let mut a = Attrs::new();
        a.str(1, "t").nest(2, |a| {
            a.be32(1, 7).bytes(2, &[1, 2, 3]);
        });
        let top: Vec<(u16, Vec<u8>)> = attrs(&a.buf).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(str_of(&top[0].1), "t");
        let inner = &top[1].1;
        assert_eq!(be32_of(find_attr(inner, 1).unwrap()), Some(7));
        assert_eq!(find_attr(inner, 2).unwrap(), &[1, 2, 3]);
        assert_eq!(a.buf.len() % 4, 0);
    }

    #[test]
    fn malformed_attributes_end_iteration() {
        assert_eq!(attrs(&[0xff, 0xff, 1, 0]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
        assert_eq!(find_attr(&[8, 0, 2, 0, 1], 2), None);
    }
}
