//! The metrics server: its own threads, so that nothing a scraper does reaches the agent's loop.
//! One thread accepts; each connection gets a thread of its own, at most MAX_CONNECTIONS at a
//! time (more are closed at once). A request must arrive whole, at most 4 KiB, within 2 s; a
//! response that cannot be written within 2 s is dropped; what a refused client still sends is
//! read and dropped for at most 1 s more. A scraper that connects and sends nothing, sends
//! megabytes, or never reads therefore holds one of four slots for a few seconds at most, and
//! never a lock the loop takes.

use super::http::{parse_head, refusal_body, render_response, route_request, Head, Route, Status, MAX_REQUEST};
use super::{Metrics, STALE_AFTER};
use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A scraper, a liveness probe and a person with curl, with room to spare.
const MAX_CONNECTIONS: usize = 4;
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long, and how much, the rest of a refused request is read and dropped before closing.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 2 << 20;

/// Listen on `addr` and serve from background threads; returns the address bound (port 0 picks
/// one). Start it after the agent has blocked its signals: the threads inherit the mask, so
/// SIGTERM still reaches the loop's signalfd.
pub fn serve(addr: SocketAddr, metrics: Metrics) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| Error::io(format!("--metrics {addr}: listen"), e))?;
    let bound = listener.local_addr().map_err(|e| Error::io(format!("--metrics {addr}: local address"), e))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_connections(listener, metrics))
        .map_err(|e| Error::io("start the metrics thread", e))?;
    Ok(bound)
}

/// Frees a connection's slot however its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_connections(listener: TcpListener, metrics: Metrics) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                log::debug!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log::debug!("metrics: {MAX_CONNECTIONS} connections already open; closing one more at once");
            continue;
        }
        let slot = Slot(active.clone());
        let metrics = metrics.clone();
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            let _slot = slot;
            answer_connection(stream, &metrics);
        });
        if let Err(e) = spawned {
            log::debug!("metrics: start a connection thread: {e}");
        }
    }
}

fn answer_connection(mut stream: TcpStream, metrics: &Metrics) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let response = match read_head(&mut stream) {
        Some(Head::Request { method, path }) => match route_request(&method, &path) {
            Ok(Route::Metrics) => render_response(
                Status::Ok,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                &metrics.encode_text(),
            ),
            Ok(Route::Health) => answer_health(metrics.since_beat()),
            Err(status) => refuse(status),
        },
        Some(Head::Refused(status)) => refuse(status),
        Some(Head::Incomplete) => refuse(Status::RequestTimeout),
        None => return,
    };
    let _ = stream.write_all(&response);
    let _ = stream.shutdown(Shutdown::Write);
    discard_rest(&mut stream);
}

/// Read and drop what the peer still sends (the rest of a refused request), for at most
/// LINGER and LINGER_BYTES: closing with unread data would reset the connection and lose the
/// response, so a refused client would never learn why.
fn discard_rest(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut chunk = [0u8; 16 * 1024];
    let mut read = 0;
    while read < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

/// The request head, read within the deadline: Incomplete when it ran out, None when the peer
/// went away.
fn read_head(stream: &mut TcpStream) -> Option<Head> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let head = parse_head(&buf);
        if head != Head::Incomplete {
            return Some(head);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Some(Head::Incomplete);
        }
        let _ = stream.set_read_timeout(Some(left));
        let room = (MAX_REQUEST - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Some(Head::Incomplete),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// 200 while the loop woke within STALE_AFTER, else 503 (the liveness probe restarts the agent).
fn answer_health(since: Duration) -> Vec<u8> {
    if since < STALE_AFTER {
        let body = format!("ok: the agent's loop woke {} s ago\n", since.as_secs());
        render_response(Status::Ok, "text/plain; charset=utf-8", &body)
    } else {
        let body = format!(
            "the agent's loop has not woken for {} s (a live one wakes at least every 60 s; limit {} s)\n",
            since.as_secs(),
            STALE_AFTER.as_secs()
        );
        render_response(Status::Unavailable, "text/plain; charset=utf-8", &body)
    }
}

fn refuse(status: Status) -> Vec<u8> {
    render_response(status, "text/plain; charset=utf-8", &refusal_body(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_line(response: &[u8]) -> String {
        String::from_utf8_lossy(response).lines().next().unwrap_or("").to_string()
    }

    #[test]
    fn healthz_fails_once_the_loop_has_missed_three_minutes() {
        assert_eq!(status_line(&answer_health(Duration::from_secs(61))), "HTTP/1.1 200 OK");
        let stale = answer_health(STALE_AFTER + Duration::from_secs(1));
        assert_eq!(status_line(&stale), "HTTP/1.1 503 Service Unavailable");
        assert!(String::from_utf8_lossy(&stale).contains("has not woken for 181 s"));
    }
}
