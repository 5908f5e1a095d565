//! The status server (`status_listen`): a small synchronous HTTP server
//! (tiny_http) on its own thread, one more thread per Server-Sent Events
//! client (at most [`MAX_EVENT_CLIENTS`]).
//!
//! - `/` (with `/app.js`, `/app.css`): the page, no external assets; it
//!   follows `/api/v1/events` and redraws from `/api/v1/status`.
//! - `/api/v1/status`: the snapshot ([`Status::snapshot`]).
//! - `/api/v1/events`: SSE; `id:` is the event's number, a client that
//!   reconnects with `Last-Event-ID` gets the events it missed; a comment
//!   line every [`HEARTBEAT`].
//! - `/metrics`: OpenMetrics text.
//!
//! With `status_token`, every request needs it (`Authorization: Bearer
//! TOKEN`, or Basic auth with it as the password — what a browser prompts
//! for). Without one the server only listens on loopback (the config check
//! refuses anything else) and only answers requests whose `Host` is a
//! loopback name, so a web page elsewhere cannot read it through DNS
//! rebinding.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response};

use super::{Next, Status};
use crate::config::Secret;

/// Clients following `/api/v1/events` at once; more get 503.
pub const MAX_EVENT_CLIENTS: usize = 32;
/// A comment line this often on an idle event stream.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// Events are written at most this often per client (what came meanwhile
/// goes in one write): a busy daemon wakes its event threads 20 times a
/// second, not once per event.
const COALESCE: Duration = Duration::from_millis(50);

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// What `status_listen` and `status_token` say.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

/// A running server; stopped by [`Server::stop`] (or when dropped).
pub struct Server {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    status: Arc<Status>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Shared by the request thread and the event threads.
struct Shared {
    status: Arc<Status>,
    token: Option<Secret>,
    clients: AtomicUsize,
}

impl Server {
    pub fn start(status: Arc<Status>, opts: &Options) -> Result<Server, std::io::Error> {
        let http = tiny_http::Server::http(opts.listen)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let addr = http.server_addr().to_ip().unwrap_or(opts.listen);
        let http = Arc::new(http);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            status: Arc::clone(&status),
            token: opts.token.clone(),
            clients: AtomicUsize::new(0),
        });
        let thread = {
            let (http, stop) = (Arc::clone(&http), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || serve(&http, &stop, &shared))?
        };
        Ok(Server {
            addr,
            http,
            status,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (the real port when `status_listen` said 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.status.close();
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(http: &tiny_http::Server, stop: &AtomicBool, shared: &Arc<Shared>) {
    for req in http.incoming_requests() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        handle(req, shared);
    }
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

/// Headers every answer carries.
fn hardened(
    mut r: Response<std::io::Cursor<Vec<u8>>>,
    content_type: &str,
) -> Response<std::io::Cursor<Vec<u8>>> {
    for (n, v) in [
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        (
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    ] {
        if let Some(h) = header(n, v) {
            r.add_header(h);
        }
    }
    r
}

fn text(code: u16, body: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    hardened(
        Response::from_string(body).with_status_code(code),
        "text/plain; charset=utf-8",
    )
}

fn handle(req: Request, shared: &Arc<Shared>) {
    if let Err(refusal) = admit(&req, shared) {
        let _ = req.respond(refusal);
        return;
    }
    if *req.method() != Method::Get && *req.method() != Method::Head {
        let _ = req.respond(text(405, "only GET\n"));
        return;
    }
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("");
    let s = &shared.status;
    let r = match path {
        "/" | "/index.html" => hardened(Response::from_string(PAGE), "text/html; charset=utf-8"),
        "/app.js" => hardened(
            Response::from_string(SCRIPT),
            "text/javascript; charset=utf-8",
        ),
        "/app.css" => hardened(Response::from_string(STYLE), "text/css; charset=utf-8"),
        "/api/v1/status" => hardened(
            Response::from_string(s.snapshot().to_string()),
            "application/json",
        ),
        "/metrics" => hardened(
            Response::from_string(s.metrics.encode()),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/api/v1/events" => return events(req, &url, shared),
        _ => text(404, "not found\n"),
    };
    let _ = req.respond(r);
}

/// Token and Host checks; the refusal to send otherwise.
fn admit(req: &Request, shared: &Shared) -> Result<(), Response<std::io::Cursor<Vec<u8>>>> {
    let get = |name: &'static str| {
        req.headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_string())
    };
    match &shared.token {
        Some(token) => {
            if get("Authorization").is_some_and(|a| authorized(&a, token.expose())) {
                Ok(())
            } else {
                let mut r = text(401, "a token is needed (status_token)\n");
                if let Some(h) = header("WWW-Authenticate", "Basic realm=\"dispatch\"") {
                    r.add_header(h);
                }
                Err(r)
            }
        }
        None => match get("Host") {
            Some(h) if loopback_host(&h) => Ok(()),
            None => Ok(()),
            Some(_) => Err(text(
                403,
                "this server answers to loopback names only (set status_token to serve others)\n",
            )),
        },
    }
}

/// `Bearer TOKEN`, or `Basic base64(user:TOKEN)` (any user).
fn authorized(header: &str, token: &str) -> bool {
    let (scheme, value) = header.trim().split_once(' ').unwrap_or(("", ""));
    let given = match scheme.to_ascii_lowercase().as_str() {
        "bearer" => value.trim().as_bytes().to_vec(),
        "basic" => match base64_decode(value.trim()) {
            Some(d) => match d.iter().position(|b| *b == b':') {
                Some(i) => d[i + 1..].to_vec(),
                None => return false,
            },
            None => return false,
        },
        _ => return false,
    };
    constant_time_eq(&given, token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let take = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    Some(out)
}

/// `localhost`, `127.x.y.z`, `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `/api/v1/events`: answered on a thread of its own.
fn events(req: Request, url: &str, shared: &Arc<Shared>) {
    if shared.clients.fetch_add(1, Ordering::SeqCst) >= MAX_EVENT_CLIENTS {
        shared.clients.fetch_sub(1, Ordering::SeqCst);
        let _ = req.respond(text(503, "too many event clients\n"));
        return;
    }
    let last = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Last-Event-ID"))
        .map(|h| h.value.as_str().to_string())
        .or_else(|| query(url, "last_event_id"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mine = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("status-events".into())
        .spawn(move || {
            mine.status.metrics.sse_clients(1);
            let cursor = last.unwrap_or_else(|| mine.status.last_seq());
            let _ = stream(req.into_writer(), &mine.status, cursor);
            mine.status.metrics.sse_clients(-1);
            mine.clients.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        log::warn!("status: cannot start an event stream: {e}");
        shared.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

fn query(url: &str, key: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// Write the stream until the client goes or the daemon stops.
fn stream(mut w: Box<dyn Write + Send>, status: &Status, mut cursor: u64) -> std::io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
          X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\nretry: 2000\n\n",
    )?;
    w.flush()?;
    loop {
        match status.next_events(&mut cursor, HEARTBEAT) {
            Next::Events(evs) => {
                let mut out = String::new();
                for (id, data) in evs {
                    out.push_str(&format!("id: {id}\ndata: {data}\n\n"));
                }
                w.write_all(out.as_bytes())?;
                w.flush()?;
                std::thread::sleep(COALESCE);
                continue;
            }
            Next::Reset { from, to } => {
                let data =
                    serde_json::json!({"event": "reset", "missed_from": from, "kept_from": to});
                write!(w, "id: {cursor}\nevent: reset\ndata: {data}\n\n")?;
            }
            Next::Idle => w.write_all(b": heartbeat\n\n")?,
            Next::Closed => return w.flush(),
        }
        w.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_taken_as_bearer_or_basic_password_only_when_equal() {
        assert!(authorized("Bearer s3cret", "s3cret"));
        assert!(!authorized("Bearer s3cre", "s3cret"));
        // "any:s3cret"
        assert!(authorized("Basic YW55OnMzY3JldA==", "s3cret"));
        // "any:wrong"
        assert!(!authorized("Basic YW55Ondyb25n", "s3cret"));
        assert!(!authorized("s3cret", "s3cret"));
        assert_eq!(base64_decode("YW55OnMzY3JldA==").unwrap(), b"any:s3cret");
    }

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        for ok in [
            "localhost:8377",
            "127.0.0.1:8377",
            "127.0.0.9",
            "[::1]:8377",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8377",
            "10.0.0.1:8377",
            "[::2]:1",
            "localhost.evil",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }
}
