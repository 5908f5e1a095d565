//! Notifications from a real daemon delivering to real sshd: a webhook
//! receiver on loopback (Python's http.server, started and stopped by pid)
//! that is down at first gets each signed failure exactly once; a receiver
//! that does not answer never holds up a delivery; `notify_command` gets the
//! same events on stdin.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::servers::{self, poll_until, wait_installed, Workspace};
use crate::watch_daemon::Daemon;

const RECEIVER: &str = r#"
import http.server, json, sys, threading
addr, port, log, gated = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "gated"
gate = threading.Event()
if not gated:
    gate.set()
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/open-the-gate":
            gate.set()
            self.send_response(204)
            self.end_headers()
            return
        with open(log + ".started", "a") as f:
            f.write("1\n")
        # bounded: a request left unanswered for long fails the test anyway
        gate.wait(120)
        rec = {"path": self.path, "body": body.decode(),
               "headers": {k.lower(): v for k, v in self.headers.items()}}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((addr, port), Hook).serve_forever()
"#;

/// A webhook receiver; requests are logged as JSON lines. Gated, each
/// request waits (unanswered) until [`Receiver::open_gate`].
struct Receiver {
    child: Child,
    log: PathBuf,
    addr: String,
}

impl Receiver {
    fn start(ws: &Workspace, addr: &str, port: u16, gated: bool) -> Receiver {
        let script = ws.path().join("receiver.py");
        fs::write(&script, RECEIVER).unwrap();
        let log = ws.path().join(format!("hook-{port}.jsonl"));
        let gate = if gated { "gated" } else { "open" };
        let child = Command::new("/usr/bin/python3")
            .arg(&script)
            .args([addr, &port.to_string(), log.to_str().unwrap(), gate])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        poll_until(Duration::from_secs(20), "the receiver to listen", || {
            TcpStream::connect((addr, port)).ok().map(|_| ())
        });
        Receiver {
            child,
            log,
            addr: format!("{addr}:{port}"),
        }
    }

    /// Let the held requests (and every later one) be answered.
    fn open_gate(&self) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.write_all(b"POST /open-the-gate HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.contains(" 204"), "{answer}");
    }

    fn requests(&self) -> Vec<Value> {
        lines(&self.log)
    }

    fn started(&self) -> usize {
        lines_raw(&self.log.with_extension("jsonl.started")).len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_raw(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn lines(p: &Path) -> Vec<Value> {
    lines_raw(p)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Setup {
    d: servers::OneHostDaemon,
    hook_addr: String,
    hook_port: u16,
}

impl std::ops::Deref for Setup {
    type Target = servers::OneHostDaemon;
    fn deref(&self) -> &servers::OneHostDaemon {
        &self.d
    }
}

/// A daemon for `.deb` files to one sshd host (default dest_dir), notifying
/// a webhook (not started) and a command; `settings` more `[dispatch]` lines.
fn setup(install: &str, settings: &str) -> Setup {
    let hook_addr = servers::fresh_addr();
    let hook_port = servers::free_port(&hook_addr);
    // the daemon's HOME is the workspace: the command writes below it
    let d = servers::OneHostDaemon::new(
        ".*\\.deb$",
        install,
        &format!(
            "status_listen = off\nnotify_url = http://{hook_addr}:{hook_port}/hook\nnotify_secret = hook-secret\n\
             notify_command = cat >> \"$HOME\"/notes.jsonl && echo >> \"$HOME\"/notes.jsonl\n{settings}"
        ),
    );
    Setup {
        d,
        hook_addr,
        hook_port,
    }
}

fn journal_count(s: &Setup, sql: &str) -> i64 {
    let out = Command::new("sqlite3")
        .arg(s.ws.path().join("state/journal.sqlite"))
        .arg(sql)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Failures (a parked install, a file no route takes) reach a webhook that
/// was down when they happened: signed, each once; the command got them too;
/// every attempt is in the journal.
#[test]
fn a_webhook_down_at_first_gets_each_signed_failure_once() {
    let s = setup("echo 'no space left' >&2; exit 4", "");
    let d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    fs::write(s.drop.join("bad-1.deb"), "one").unwrap();
    fs::write(s.drop.join("readme.txt"), "no route").unwrap();
    poll_until(Duration::from_secs(40), "a failed webhook attempt", || {
        d.log().contains("attempt 1 failed: webhook").then_some(())
    });
    let hook = Receiver::start(&s.ws, &s.hook_addr, s.hook_port, false);
    poll_until(Duration::from_secs(40), "2 notifications", || {
        (hook.requests().len() >= 2).then_some(())
    });
    // a third failure, then every one was received once
    fs::write(s.drop.join("bad-2.deb"), "two").unwrap();
    let got = poll_until(Duration::from_secs(40), "3 notifications", || {
        let r = hook.requests();
        (r.len() >= 3).then_some(r)
    });
    let mut events: Vec<(String, String)> = Vec::new();
    let mut ids = Vec::new();
    for r in &got {
        let body = r["body"].as_str().unwrap();
        let sig = r["headers"]["x-dispatch-signature"].as_str().unwrap();
        assert_eq!(
            sig,
            format!("sha256={}", hmac_hex("hook-secret", body.as_bytes()))
        );
        assert_eq!(r["path"], "/hook");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(r["headers"]["x-dispatch-event"], v["event"]);
        ids.push(
            r["headers"]["x-dispatch-delivery"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        events.push((
            v["event"].as_str().unwrap().into(),
            v["file"].as_str().unwrap().into(),
        ));
        if v["event"] == "parked" {
            assert!(
                v["output_tail"].as_str().unwrap().contains("no space left"),
                "{v}"
            );
            assert_eq!(v["exit_status"], 4);
        }
    }
    events.sort();
    assert_eq!(
        events,
        [
            ("parked".to_string(), "bad-1.deb".to_string()),
            ("parked".into(), "bad-2.deb".into()),
            ("unrouted".into(), "readme.txt".into()),
        ]
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "a notification came twice: {got:?}");
    assert_eq!(hook.requests().len(), 3, "{:?}", hook.requests());
    // the command: the same three, as JSON on its stdin
    let notes = poll_until(Duration::from_secs(20), "3 command notifications", || {
        let n = lines(&s.ws.path().join("notes.jsonl"));
        (n.len() >= 3).then_some(n)
    });
    assert_eq!(notes.len(), 3);
    // every attempt recorded: the failed ones before the receiver was up too
    poll_until(Duration::from_secs(20), "6 notifications sent", || {
        let sent = journal_count(&s, "SELECT count(*) FROM notification WHERE state = 'sent'");
        (sent == 6).then_some(())
    });
    let failed = journal_count(&s, "SELECT count(*) FROM notification_attempt WHERE ok = 0");
    assert!(failed >= 1, "no failed attempt recorded");
    // a reload that fails is a failure too (the old config stays)
    let mut text = fs::read_to_string(&s.cfg).unwrap();
    text.push_str("\n[broken\n");
    fs::write(&s.cfg, text).unwrap();
    d.signal(libc::SIGHUP);
    let got = poll_until(
        Duration::from_secs(30),
        "the reload_failed notification",
        || {
            let r = hook.requests();
            (r.len() >= 4).then_some(r)
        },
    );
    let v: Value = serde_json::from_str(got[3]["body"].as_str().unwrap()).unwrap();
    assert_eq!(v["event"], "reload_failed", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("dispatch.ini:"),
        "{v}"
    );
}

/// A webhook that takes a request but does not answer holds up no
/// delivery: three more files are installed meanwhile; once it answers, it
/// has every success (`notify_on = all`).
#[test]
fn a_webhook_that_does_not_answer_never_delays_deliveries() {
    let s = setup("sha256sum {name} > {name}.installed", "notify_on = all");
    let hook = Receiver::start(&s.ws, &s.hook_addr, s.hook_port, true);
    let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    // the first success: its notification sits in the receiver, unanswered
    fs::write(s.drop.join("app-0.deb"), "first").unwrap();
    wait_installed(&s.root, "app-0.deb", 1, Duration::from_secs(30));
    poll_until(Duration::from_secs(20), "the webhook to be called", || {
        (hook.started() >= 1).then_some(())
    });
    let later: Vec<String> = (1..=3).map(|i| format!("app-{i}.deb")).collect();
    for n in &later {
        fs::write(s.drop.join(n), n.as_bytes()).unwrap();
    }
    for n in &later {
        wait_installed(&s.root, n, 1, Duration::from_secs(30));
    }
    assert!(
        hook.requests().is_empty(),
        "the receiver answered before its gate opened"
    );
    let mut names = later.clone();
    names.insert(0, "app-0.deb".into());
    hook.open_gate();
    let got = poll_until(Duration::from_secs(60), "4 success notifications", || {
        let r = hook.requests();
        (r.len() >= 4).then_some(r)
    });
    let mut files: Vec<String> = got
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
            assert_eq!(v["event"], "installed", "{v}");
            v["file"].as_str().unwrap().to_string()
        })
        .collect();
    files.sort();
    assert_eq!(files, names);
}
