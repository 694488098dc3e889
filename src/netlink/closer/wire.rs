//! The unix socket both ends of the closer speak: SEQPACKET on an abstract address, one byte and
//! up to SCM_MAX_FD descriptors per message, the peer's uid checked on connect and accept.

use nix::libc;
use std::os::fd::RawFd;

/// SCM_MAX_FD: most descriptors one message may carry.
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Non-blocking: a full backlog fails a connect instead of stalling the call.
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

pub fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: each descriptor was handed over to be closed, and is closed once.
        unsafe { libc::close(fd) };
    }
}

/// A connection to the listener of our uid at `name`, if there is one.
pub fn connect(name: &[u8]) -> Option<RawFd> {
    let fd = unix_socket()?;
    let (addr, len) = address(name);
    // SAFETY: addr is a valid sockaddr_un of len bytes.
    let ok = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) } == 0;
    if ok && peer_is_us(fd) {
        return Some(fd);
    }
    close_all(&[fd]);
    None
}

/// The listening socket at `name`; None when the name is taken (or there is no unix socket).
pub fn listen(name: &[u8]) -> Option<RawFd> {
    let fd = unix_socket()?;
    let (addr, len) = address(name);
    // SAFETY: addr is a valid sockaddr_un of len bytes.
    let ok =
        unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) == 0 && libc::listen(fd, 128) == 0 };
    if ok {
        return Some(fd);
    }
    close_all(&[fd]);
    None
}

/// Accept every pending connection of our uid into `conns` (non-blocking); others are dropped.
pub fn accept_all(listener: RawFd, conns: &mut Vec<RawFd>) {
    loop {
        // SAFETY: no peer address is asked for.
        let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        let conn = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), flags) };
        if conn < 0 {
            return;
        }
        if peer_is_us(conn) {
            conns.push(conn);
        } else {
            close_all(&[conn]);
        }
    }
}

/// Send `fds` over `conn`; whether all of them went.
pub fn send_fds(conn: RawFd, fds: &[RawFd]) -> bool {
    fds.chunks(MAX_FDS_PER_MESSAGE).all(|chunk| send_message(conn, chunk))
}

fn send_message(conn: RawFd, fds: &[RawFd]) -> bool {
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a size computation.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(payload) } as usize];
    let mut byte = [1u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: msghdr is plain data; every pointer in it refers to a live buffer of the stated
    // length, and the control message is written inside `control`.
    unsafe {
        let msg = header(&mut iov, &mut control);
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        libc::sendmsg(conn, &msg, libc::MSG_NOSIGNAL) == 1
    }
}

/// A one-byte message with `control` as its control buffer.
///
/// # Safety
/// The header points into `iov` and `control`: both must outlive every use of it.
unsafe fn header(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    let mut msg: libc::msghdr = std::mem::zeroed();
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Keep the descriptors of every message waiting on `conn`; false once the peer has gone.
pub fn drain(conn: RawFd, held: &mut Vec<RawFd>) -> bool {
    loop {
        match receive(conn, held) {
            Some(true) => continue,
            Some(false) => return false,
            None => return true,
        }
    }
}

/// One message: Some(true) read, Some(false) end of connection (or error), None nothing waiting.
fn receive(conn: RawFd, held: &mut Vec<RawFd>) -> Option<bool> {
    let room = (MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a size computation.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(room) } as usize];
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: every pointer in msg refers to a live buffer of the stated length; control
    // messages are read within msg_controllen as the kernel filled it.
    unsafe {
        let mut msg = header(&mut iov, &mut control);
        let n = libc::recvmsg(conn, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT);
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            return if e == Some(libc::EAGAIN) || e == Some(libc::EINTR) { None } else { Some(false) };
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
        Some(n > 0)
    }
}
