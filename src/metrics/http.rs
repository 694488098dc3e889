//! Just enough HTTP/1.x for a scraper and a liveness probe: a request head of at most 4 KiB, no
//! body, GET /metrics and GET /healthz. Pure: serve.rs reads and writes the socket.

/// The largest request head read; a longer one is refused (431) without reading further.
pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    ContentTooLarge,
    HeadersTooLarge,
    Unavailable,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::ContentTooLarge => "413 Content Too Large",
            Status::HeadersTooLarge => "431 Request Header Fields Too Large",
            Status::Unavailable => "503 Service Unavailable",
        }
    }
}

/// What the bytes read so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// No blank line yet, and still under the limit: read on.
    Incomplete,
    Request {
        method: String,
        path: String,
    },
    Refused(Status),
}

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
}

/// Parse a request head from what has been read of the connection.
pub fn parse_head(buf: &[u8]) -> Head {
    let end = find(buf, b"\r\n\r\n").map(|e| (e, 4)).or_else(|| find(buf, b"\n\n").map(|e| (e, 2)));
    let Some((end, blank)) = end else {
        return if buf.len() >= MAX_REQUEST { Head::Refused(Status::HeadersTooLarge) } else { Head::Incomplete };
    };
    // The head with its blank line must fit: serve.rs never reads more.
    if end + blank > MAX_REQUEST {
        return Head::Refused(Status::HeadersTooLarge);
    }
    let Ok(head) = std::str::from_utf8(&buf[..end]) else { return Head::Refused(Status::BadRequest) };
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) = (first.next(), first.next(), first.next(), first.next())
    else {
        return Head::Refused(Status::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Head::Refused(Status::BadRequest);
    }
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { return Head::Refused(Status::BadRequest) };
        let name = name.trim().to_ascii_lowercase();
        // Neither endpoint takes a body: one announced is refused, never read.
        let body = match name.as_str() {
            "content-length" => value.trim() != "0",
            "transfer-encoding" => true,
            _ => false,
        };
        if body {
            return Head::Refused(Status::ContentTooLarge);
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    Head::Request { method: method.to_string(), path: path.to_string() }
}

/// Which endpoint a request names: only GET /metrics and GET /healthz answer.
pub fn route_request(method: &str, path: &str) -> Result<Route, Status> {
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        _ => return Err(Status::NotFound),
    };
    if method != "GET" {
        return Err(Status::MethodNotAllowed);
    }
    Ok(route)
}

/// A whole response; the connection is closed after it.
pub fn render_response(status: Status, content_type: &str, body: &str) -> Vec<u8> {
    let allow = if status == Status::MethodNotAllowed { "Allow: GET\r\n" } else { "" };
    format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        status.line(),
        body.len()
    )
    .into_bytes()
}

/// A refusal's short text body.
pub fn refusal_body(status: Status) -> String {
    format!("{}\n", status.line())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str) -> Head {
        Head::Request { method: method.into(), path: path.into() }
    }

    #[test]
    fn a_scrapers_get_is_a_request() {
        let prom = "GET /metrics HTTP/1.1\r\nHost: 10.0.0.1:9469\r\nUser-Agent: Prometheus/2.42.0\r\n\
                    Accept: text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\nAccept-Encoding: gzip\r\n\r\n";
        assert_eq!(parse_head(prom.as_bytes()), request("GET", "/metrics"));
        assert_eq!(parse_head(b"GET /healthz?x=1 HTTP/1.0\n\n"), request("GET", "/healthz"));
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), request("GET", "/metrics"));
    }

    #[test]
    fn a_head_not_yet_ended_is_read_on_until_the_limit() {
        assert_eq!(parse_head(b""), Head::Incomplete);
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), Head::Incomplete);
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_REQUEST, b'a');
        assert_eq!(parse_head(&big), Head::Refused(Status::HeadersTooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&big), Head::Refused(Status::HeadersTooLarge));
    }

    #[test]
    fn bodies_and_garbage_are_refused() {
        let post = b"POST /metrics HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n";
        assert_eq!(parse_head(post), Head::Refused(Status::ContentTooLarge));
        let chunked = b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked), Head::Refused(Status::ContentTooLarge));
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(bad), Head::Refused(Status::BadRequest), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_get_metrics_and_healthz_answer() {
        assert_eq!(route_request("GET", "/metrics"), Ok(Route::Metrics));
        assert_eq!(route_request("GET", "/healthz"), Ok(Route::Health));
        assert_eq!(route_request("POST", "/metrics"), Err(Status::MethodNotAllowed));
        assert_eq!(route_request("HEAD", "/healthz"), Err(Status::MethodNotAllowed));
        assert_eq!(route_request("GET", "/"), Err(Status::NotFound));
        assert_eq!(route_request("DELETE", "/records"), Err(Status::NotFound));
    }

    #[test]
    fn a_response_says_its_length_and_closes() {
        let r = String::from_utf8(render_response(Status::MethodNotAllowed, "text/plain", "no\n")).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("Content-Length: 3\r\n") && r.contains("Allow: GET\r\n") && r.contains("Connection: close"));
        assert!(r.ends_with("\r\n\r\nno\n"));
    }
}
