//! The daemon's status server against a real daemon delivering to real sshd:
//! `/api/v1/status` and `dispatch status`, Server-Sent Events replayed after
//! `Last-Event-ID`, `/metrics` read by the Prometheus Python client's
//! OpenMetrics parser, the token rules, and the page in headless Chromium
//! (driven through chromedriver) updating without a reload.
//!
//! Each test's status server listens on a loopback address of its own, at
//! the default port 8377.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::servers::{self, poll_until, wait_installed, Workspace};
use crate::watch_daemon::Daemon;

struct Setup {
    d: servers::OneHostDaemon,
    /// ADDRESS:PORT of the status server.
    status: String,
}

impl std::ops::Deref for Setup {
    type Target = servers::OneHostDaemon;
    fn deref(&self) -> &servers::OneHostDaemon {
        &self.d
    }
}

/// A daemon for one sshd host with the default dest_dir and its status
/// server on an address of its own; `settings`: more `[dispatch]` lines.
fn setup(install: &str, settings: &str) -> Setup {
    let status = format!("{}:8377", servers::fresh_addr());
    let d = servers::OneHostDaemon::new(
        ".",
        install,
        &format!("status_listen = {status}\n{settings}"),
    );
    Setup { d, status }
}

/// One HTTP/1.0 GET: (status code, headers lowercased, body).
fn get(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, BTreeMap<String, String>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let hdrs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, hdrs, body.to_string())
}

fn snapshot(addr: &str) -> Value {
    let (code, _, body) = get(addr, "/api/v1/status", &[]);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Follows `/api/v1/events` on a thread: (id, event) as they come.
struct Events {
    rx: mpsc::Receiver<(u64, Value)>,
    stream: TcpStream,
}

impl Events {
    fn follow(addr: &str, last_event_id: Option<u64>) -> Events {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut req =
            format!("GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req += &format!("Last-Event-ID: {id}\r\n");
        }
        req += "\r\n";
        s.write_all(req.as_bytes()).unwrap();
        let reader = BufReader::new(s.try_clone().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut id, mut data) = (None, String::new());
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse::<u64>().ok();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = v.to_string();
                } else if line.is_empty() {
                    if let (Some(i), false) = (id.take(), data.is_empty()) {
                        let v: Value = serde_json::from_str(&data).unwrap();
                        if tx.send((i, v)).is_err() {
                            break;
                        }
                    }
                    data.clear();
                }
            }
        });
        Events { rx, stream: s }
    }

    /// Events until `done` says the last one received ends it (bounded).
    fn until(
        &self,
        what: &str,
        mut done: impl FnMut(&[(u64, Value)]) -> bool,
    ) -> Vec<(u64, Value)> {
        let mut got = Vec::new();
        poll_until(Duration::from_secs(60), what, || {
            while let Ok(e) = self.rx.try_recv() {
                got.push(e);
            }
            done(&got).then_some(())
        });
        got
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn finished(evs: &[(u64, Value)], n: usize) -> bool {
    evs.iter().filter(|(_, e)| e["event"] == "finished").count() >= n
}

/// `/metrics` through the Prometheus Python client's OpenMetrics parser
/// (strict: it refuses what a scraper would): (name, labels) → value.
fn parsed_metrics(addr: &str) -> BTreeMap<(String, String), f64> {
    let (code, hdrs, body) = get(addr, "/metrics", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        hdrs["content-type"].starts_with("application/openmetrics-text"),
        "{hdrs:?}"
    );
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        print(json.dumps([s.name, json.dumps(s.labels, sort_keys=True), s.value]))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_str().unwrap().to_string(),
                ),
                v[2].as_f64().unwrap(),
            )
        })
        .collect()
}

fn metric(m: &BTreeMap<(String, String), f64>, name: &str, labels: Value) -> Option<f64> {
    let want = labels.as_object().unwrap();
    m.iter()
        .find(|((n, l), _)| {
            let l: Value = serde_json::from_str(l).unwrap();
            n == name && want.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .map(|(_, v)| *v)
}

fn names(evs: &[(u64, Value)]) -> Vec<(u64, String, String)> {
    evs.iter()
        .map(|(i, e)| {
            (
                *i,
                e["event"].as_str().unwrap_or("").to_string(),
                e["file"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Three packages through a daemon: the snapshot shows them in flight, then
/// installed; every step arrives as a numbered event; a client reconnecting
/// with `Last-Event-ID` gets exactly the events after it; `/metrics` counts
/// them; `dispatch status` answers 0.
#[test]
fn the_status_server_follows_a_daemon_delivering_several_files() {
    let s = setup("sleep 1; sha256sum {name} > {name}.installed", "");
    let d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    let first = Events::follow(&s.status, None);
    // the stream is open once the daemon counts the client
    poll_until(
        Duration::from_secs(10),
        "the event client to be counted",
        || {
            metric(
                &parsed_metrics(&s.status),
                "dispatch_status_clients",
                json!({}),
            )
            .filter(|n| *n >= 1.0)
        },
    );
    let files: Vec<(String, Vec<u8>)> = (1..=3)
        .map(|i| (format!("app-{i}.tar.gz"), vec![b'a' + i as u8; 1000 * i]))
        .collect();
    for (name, data) in &files {
        fs::write(s.drop.join(name), data).unwrap();
    }
    // in flight while the install sleeps
    let busy = poll_until(
        Duration::from_secs(30),
        "a file installing in the snapshot",
        || {
            let v = snapshot(&s.status);
            let f = v["in_flight"]
                .as_array()?
                .iter()
                .find(|f| f["step"] == "installing")?
                .clone();
            Some(f)
        },
    );
    assert!(busy["file"].as_str().unwrap().starts_with("app-"), "{busy}");
    let evs = first.until("3 finished events", |e| finished(e, 3));
    for (name, _) in &files {
        wait_installed(&s.root, name, 1, Duration::from_secs(30));
        let kinds: Vec<String> = names(&evs)
            .into_iter()
            .filter(|(_, _, f)| f == name)
            .map(|(_, k, _)| k)
            .collect();
        // (connecting: once per session, not per file)
        for k in ["queued", "uploading", "uploaded", "installing", "finished"] {
            assert!(kinds.iter().any(|x| x == k), "{name}: no {k} in {kinds:?}");
        }
    }
    assert!(names(&evs).iter().any(|(_, k, _)| k == "connecting"));
    let ids: Vec<u64> = evs.iter().map(|(i, _)| *i).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids not consecutive: {ids:?}"
    );
    let done = evs.iter().find(|(_, e)| e["event"] == "finished").unwrap();
    assert_eq!(done.1["state"], "installed", "{}", done.1);
    assert_eq!(done.1["ok"], true);
    // a client that saw up to the 4th event gets exactly what came after
    let cut = evs[3].0;
    let again = Events::follow(&s.status, Some(cut));
    let replayed = again.until("the replay", |e| e.len() >= evs.len() - 4);
    assert_eq!(names(&replayed[..evs.len() - 4]), names(&evs[4..]));
    assert_eq!(replayed[0].1, evs[4].1);
    // the snapshot once done
    let v = poll_until(Duration::from_secs(10), "3 recent results", || {
        let v = snapshot(&s.status);
        (v["recent"].as_array()?.len() >= 3 && v["in_flight"].as_array()?.is_empty()).then_some(v)
    });
    assert_eq!(v["parked"], json!([]));
    assert!(
        v["recent"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "installed"),
        "{v}"
    );
    let host = &v["hosts"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(host["state"], "installed", "{v}");
    // metrics: strict OpenMetrics, counted by result, bytes with their unit
    let m = parsed_metrics(&s.status);
    assert_eq!(
        metric(
            &m,
            "dispatch_deliveries_total",
            json!({"result": "installed", "transport": "scp", "route": "."})
        ),
        Some(3.0),
        "{m:?}"
    );
    let sent: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(
        metric(&m, "dispatch_uploaded_bytes_total", json!({})),
        Some(sent as f64)
    );
    assert_eq!(
        metric(
            &m,
            "dispatch_step_duration_seconds_count",
            json!({"step": "install"})
        ),
        Some(3.0)
    );
    assert_eq!(metric(&m, "dispatch_parked", json!({})), Some(0.0));
    assert!(metric(&m, "dispatch_last_success_timestamp_seconds", json!({})).unwrap() > 1.7e9);
    assert!(metric(
        &m,
        "dispatch_build_info",
        json!({"version": env!("CARGO_PKG_VERSION")})
    )
    .is_some());
    for (name, labels) in m.keys() {
        assert!(
            !labels.contains("app-") && !labels.contains("127.0."),
            "{name} {labels}"
        );
    }
    // the CLI
    let r =
        s.ws.dispatch()
            .args(["-c", s.cfg.to_str().unwrap(), "status"])
            .run()
            .assert_code(0);
    assert!(r.stdout.contains("parked: 0"), "{r}");
    assert!(r.stdout.contains("installed app-"), "{r}");
    let r =
        s.ws.dispatch()
            .args(["-c", s.cfg.to_str().unwrap(), "status", "--json"])
            .run()
            .assert_code(0);
    let j: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(j["recent"].as_array().unwrap().len(), 3);
    drop(d);
}

/// A failed install is parked with its reason and output: the snapshot and
/// `dispatch status` (exit 1) show it, the metrics count it.
#[test]
fn a_parked_failure_shows_with_its_reason_and_output_and_status_exits_1() {
    let s = setup("echo 'disk is full' >&2; exit 3", "");
    let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    for i in 1..=3 {
        fs::write(s.drop.join(format!("bad-{i}.deb")), format!("bad {i}")).unwrap();
    }
    let v = poll_until(Duration::from_secs(40), "3 parked", || {
        let v = snapshot(&s.status);
        (v["parked"].as_array()?.len() == 3).then_some(v)
    });
    let p = &v["parked"][0];
    assert!(
        p["output_tail"].as_str().unwrap().contains("disk is full"),
        "{v}"
    );
    assert_eq!(p["exit_status"], 3, "{v}");
    let r =
        s.ws.dispatch()
            .args(["-c", s.cfg.to_str().unwrap(), "status"])
            .run()
            .assert_code(1);
    assert!(r.stdout.contains("parked: 3"), "{r}");
    assert!(r.stdout.contains("| disk is full"), "{r}");
    let m = parsed_metrics(&s.status);
    assert_eq!(metric(&m, "dispatch_parked", json!({})), Some(3.0));
    assert_eq!(
        metric(&m, "dispatch_deliveries_total", json!({"result": "failed"})),
        Some(3.0)
    );
}

/// Anything but loopback needs a token (the config check says where); with
/// one, every request needs it; without one, only loopback Host names are
/// answered; `dispatch status` with the wrong token says so; with no daemon,
/// it says nothing answers (exit 1).
#[test]
fn the_status_server_asks_for_its_token_and_refuses_foreign_hosts() {
    let ws = Workspace::new();
    let cfg = ws.write_config("[dispatch]\nstatus_listen = 0.0.0.0:8377\n\n[x]\nhost = h\n");
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check"])
        .run()
        .assert_code(2);
    assert!(
        r.stderr.contains("dispatch.ini:2:") && r.stderr.contains("status_token"),
        "{r}"
    );

    // loopback without a token: a foreign Host is refused (DNS rebinding)
    let s = setup("true", "");
    let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    let mut raw = TcpStream::connect(&s.status).unwrap();
    raw.write_all(b"GET /api/v1/status HTTP/1.0\r\nHost: dispatch.evil.example\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 403") || answer.starts_with("HTTP/1.1 403"),
        "{answer}"
    );
    let (code, hdrs, page) = get(&s.status, "/", &[]);
    assert_eq!(code, 200);
    assert!(
        hdrs["content-security-policy"].contains("default-src 'none'"),
        "{hdrs:?}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "external asset: {page}"
    );

    // with a token
    let t = setup("true", "status_token = s3cret-token");
    let _d2 = Daemon::start(&t.ws, &t.cfg, &t.drop);
    let (code, hdrs, _) = get(&t.status, "/api/v1/status", &[]);
    assert_eq!(code, 401);
    assert!(hdrs["www-authenticate"].starts_with("Basic"), "{hdrs:?}");
    assert_eq!(
        get(&t.status, "/metrics", &[("Authorization", "Bearer wrong")]).0,
        401
    );
    assert_eq!(
        get(
            &t.status,
            "/metrics",
            &[("Authorization", "Bearer s3cret-token")]
        )
        .0,
        200
    );
    t.ws.dispatch()
        .args(["-c", t.cfg.to_str().unwrap(), "status"])
        .run()
        .assert_code(0);
    let wrong = fs::read_to_string(&t.cfg)
        .unwrap()
        .replace("s3cret-token", "other-token");
    fs::write(&t.cfg, wrong).unwrap();
    let r =
        t.ws.dispatch()
            .args(["-c", t.cfg.to_str().unwrap(), "status"])
            .run()
            .assert_code(1);
    assert!(r.stderr.contains("refused the token"), "{r}");
    assert!(!t
        .ws
        .dispatch()
        .args(["-c", t.cfg.to_str().unwrap(), "-vvv", "status"])
        .run()
        .stderr
        .contains("other-token"));

    // no daemon
    let none = ws.write_config(&format!(
        "[dispatch]\nstatus_listen = {}:8377\n\n[x]\nhost = h\n",
        servers::fresh_addr()
    ));
    let r = ws
        .dispatch()
        .args(["-c", none.to_str().unwrap(), "status"])
        .run()
        .assert_code(1);
    assert!(r.stderr.contains("no daemon answers at"), "{r}");
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let port = servers::free_port("127.0.0.1");
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/test.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let mut d = Driver {
            child,
            url,
            session: None,
            _profile: tempfile::tempdir().unwrap(),
        };
        poll_until(Duration::from_secs(20), "chromedriver to answer", || {
            ureq::get(&format!("{}/status", d.url))
                .call()
                .ok()
                .map(|_| ())
        });
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", d._profile.path().display())]}}}});
        let v: Value = ureq::post(&format!("{}/session", d.url))
            .send_json(caps)
            .unwrap()
            .into_json()
            .unwrap();
        d.session = Some(v["value"]["sessionId"].as_str().unwrap().to_string());
        d
    }

    fn post(&self, what: &str, body: Value) -> Value {
        let url = format!(
            "{}/session/{}/{what}",
            self.url,
            self.session.as_deref().unwrap()
        );
        let v: Value = ureq::post(&url)
            .send_json(body)
            .unwrap()
            .into_json()
            .unwrap();
        v["value"].clone()
    }

    fn js(&self, script: &str) -> Value {
        self.post("execute/sync", json!({"script": script, "args": []}))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(s) = &self.session {
            let _ = ureq::delete(&format!("{}/session/{s}", self.url)).call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page in a real headless Chromium: a dropped file with a slow install
/// appears in flight, then installed — on the same page, never reloaded.
#[test]
fn the_page_shows_a_file_in_flight_then_installed_without_a_reload() {
    let s = setup("sleep 3; sha256sum {name} > {name}.installed", "");
    let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    let browser = Driver::start();
    browser.post("url", json!({"url": format!("http://{}/", s.status)}));
    poll_until(
        Duration::from_secs(20),
        "the page to follow the events",
        || {
            (browser.js("return document.getElementById('live').textContent") == "live")
                .then_some(())
        },
    );
    // a mark a reload would wipe
    browser.js("window.__mark = 'same page'; return 1");
    let hostile = "a b;$(touch x)'<b>.tar.gz";
    for name in [hostile, "web-2.tar.gz", "web-3.tar.gz"] {
        fs::write(s.drop.join(name), name.as_bytes()).unwrap();
    }
    let flight = poll_until(
        Duration::from_secs(30),
        "a file in flight on the page",
        || {
            let t = browser.js("return document.querySelector('#flight tbody').innerText");
            let t = t.as_str()?.to_string();
            (t.contains("installing")).then_some(t)
        },
    );
    assert!(flight.contains(".tar.gz"), "{flight}");
    let recent = poll_until(Duration::from_secs(60), "3 installed on the page", || {
        let t = browser.js("return document.querySelector('#recent tbody').innerText");
        let t = t.as_str()?.to_string();
        (t.matches("installed").count() >= 3).then_some(t)
    });
    assert!(
        recent.contains(hostile),
        "the hostile name as text: {recent}"
    );
    // text only: the name's markup is not markup on the page
    assert_eq!(
        browser.js("return document.querySelectorAll('#recent b').length"),
        json!(0)
    );
    assert_eq!(browser.js("return window.__mark"), json!("same page"));
    assert_eq!(
        browser.js("return performance.getEntriesByType('navigation').length"),
        json!(1)
    );
    let empty = browser.js("return document.querySelector('#flight tbody').innerText");
    assert!(
        empty.as_str().unwrap().contains("nothing in flight"),
        "{empty}"
    );
}

/// A rollout route through the daemon: while a host is being worked on the
/// snapshot shows its rollout lock held, then free, and its active release.
#[test]
fn the_snapshot_shows_each_hosts_active_release_and_rollout_lock() {
    let s = setup("sleep 2; cp {name} VERSION", "");
    // the route (the config's last section) keeps releases
    let mut cfg = fs::OpenOptions::new().append(true).open(&s.cfg).unwrap();
    writeln!(cfg, "current = ~/app/current").unwrap();
    drop(cfg);
    let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    for i in 1..=3 {
        fs::write(s.drop.join(format!("rel-{i}.tgz")), format!("r{i}")).unwrap();
    }
    let host = s.sshd.addr.clone();
    let held = poll_until(
        Duration::from_secs(30),
        "the lock held in the snapshot",
        || {
            let v = snapshot(&s.status);
            v["host_state"][host.as_str()]["lock"]
                .as_str()
                .map(str::to_string)
        },
    );
    assert!(held.starts_with("rollout "), "{held}");
    let v = poll_until(
        Duration::from_secs(60),
        "the release active, the lock free",
        || {
            let v = snapshot(&s.status);
            let hs = &v["host_state"][host.as_str()];
            (hs["lock"].is_null() && hs["release"].is_string()).then(|| v.clone())
        },
    );
    let release = v["host_state"][host.as_str()]["release"]
        .as_str()
        .unwrap()
        .to_string();
    let current = fs::read_link(s.sshd.user().home.join("app/current")).unwrap();
    assert_eq!(Path::new(&release), current, "{v}");
    assert_eq!(
        fs::read_to_string(current.join("VERSION")).unwrap().len(),
        2
    );
}
