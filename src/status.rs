//! What the daemon is doing, for people and monitors: a subscriber of the
//! batches' event bus ([`Status`] is a [`Sink`]) that keeps a snapshot
//! (queue, files in flight, parked failures, recent results, the last result
//! per host), a numbered log of recent events for Server-Sent Events, and the
//! Prometheus metrics. [`server`] serves them over HTTP (`status_listen`);
//! [`client`] is `dispatch status`.
//!
//! Event numbers start above the journal's last event id when the daemon
//! starts, so they only grow across restarts; the log keeps the last
//! [`LOG_CAPACITY`] events in memory (a client that missed more is told to
//! reload its snapshot).

pub mod client;
mod metrics;
pub mod server;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::event::{Event, EventKind, Outcome, Sink};
pub use metrics::Metrics;

/// Events kept for clients that reconnect.
pub const LOG_CAPACITY: usize = 4096;
/// Finished results kept for the page.
const RECENT: usize = 50;

/// The daemon's live state; shared by the bus, the daemon loop and the server.
pub struct Status {
    state: Mutex<State>,
    /// Notified on every new event (SSE clients wait on it).
    changed: Condvar,
    pub metrics: Metrics,
    started: chrono::DateTime<chrono::Utc>,
    config_path: String,
}

#[derive(Default)]
struct State {
    /// The number of the last event.
    seq: u64,
    /// (number, event), oldest first; made JSON only when a client reads it.
    log: VecDeque<(u64, Logged)>,
    in_flight: BTreeMap<Key, Flight>,
    recent: VecDeque<Done>,
    hosts: BTreeMap<String, Done>,
    parked: BTreeMap<(i64, String), Value>,
    /// Per host: its active release and who holds its rollout lock.
    host_state: BTreeMap<String, HostState>,
    queue: Queue,
    closed: bool,
    /// Event threads waiting in [`Status::next_events`] (no wake-up call
    /// when there are none).
    waiting: usize,
}

/// (package, file, host).
type Key = (Option<i64>, String, String);

type At = chrono::DateTime<chrono::Utc>;

/// What rollouts said of a host.
#[derive(Default, Clone, serde::Serialize)]
struct HostState {
    release: Option<String>,
    lock: Option<String>,
}

/// One entry of the event log.
#[derive(Clone)]
enum Logged {
    /// A delivery's event, as it happened.
    Event(Arc<Event>, At),
    /// A daemon-level event, already JSON.
    Note(Arc<str>),
}

impl Logged {
    fn text(&self) -> String {
        match self {
            Logged::Note(t) => t.to_string(),
            // the most frequent large one, serialized straight to text
            Logged::Event(e, at) => match &e.kind {
                EventKind::Finished(o) => serde_json::to_string(&FinishedOut {
                    event: "finished",
                    at: rfc3339(*at),
                    package: o.package,
                    success: o.ok,
                    outcome: o,
                })
                .unwrap_or_default(),
                _ => event_json(e, *at).to_string(),
            },
        }
    }
}

/// `finished` on the stream: the same object as [`event_json`] makes.
#[derive(serde::Serialize)]
struct FinishedOut<'a> {
    event: &'static str,
    at: String,
    package: Option<i64>,
    success: bool,
    #[serde(flatten)]
    outcome: &'a Outcome,
}

/// A finished file × host, for the snapshot.
#[derive(Clone)]
struct Done(Arc<Outcome>, At);

impl Done {
    fn to_json(&self) -> Value {
        result_json(&self.0, self.1)
    }
}

/// The result object of `--json`, with its package and time.
fn result_json(o: &Outcome, at: At) -> Value {
    let mut r = serde_json::to_value(o).unwrap_or_else(|_| json!({}));
    if let Some(obj) = r.as_object_mut() {
        obj.insert("package".into(), json!(o.package));
        obj.insert("at".into(), json!(rfc3339(at)));
    }
    r
}

/// An event as the stream sends it: [`Event::to_json_at`], its package and,
/// for `finished`, the whole result.
fn event_json(e: &Event, at: At) -> Value {
    let mut v = e.to_json_at(at);
    if let (EventKind::Finished(o), Some(obj)) = (&e.kind, v.as_object_mut()) {
        if let Value::Object(fields) = result_json(o, at) {
            obj.extend(fields);
        }
    }
    if let Some(obj) = v.as_object_mut() {
        obj.insert("package".into(), json!(e.package));
    }
    v
}

/// The daemon's queue, as it last said.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Packages being worked on (in flight, waiting for a retry or parked).
    pub pending: usize,
    /// Complete files waiting for a free slot (open-file budget).
    pub waiting: usize,
    /// File × host retries waiting for their time.
    pub retries: usize,
}

/// One file × host between queued and finished.
struct Flight {
    step: &'static str,
    bytes: u64,
    total: u64,
    attempt: u32,
    transport: Option<String>,
    queued: Instant,
    since: chrono::DateTime<chrono::Utc>,
    upload_started: Option<Instant>,
    install_started: Option<Instant>,
}

impl Flight {
    fn to_json(&self, key: &Key) -> Value {
        json!({
            "package": key.0, "file": key.1, "host": key.2, "step": self.step,
            "bytes": self.bytes, "total": self.total, "attempt": self.attempt,
            "transport": self.transport, "since": rfc3339(self.since),
            "elapsed_ms": self.queued.elapsed().as_millis() as u64,
        })
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What an SSE client gets next.
pub enum Next {
    /// Events after the client's cursor, as JSON (the cursor is moved).
    Events(Vec<(u64, String)>),
    /// The client asked for events older than the log keeps: it should
    /// reload the snapshot; the cursor is moved to now.
    Reset { from: u64, to: u64 },
    /// Nothing new within the wait (send a heartbeat).
    Idle,
    /// The daemon is stopping.
    Closed,
}

impl Status {
    /// `first_seq`: event numbers start after it (the journal's last event id).
    pub fn new(config_path: &str, first_seq: u64) -> Status {
        Status {
            state: Mutex::new(State {
                seq: first_seq,
                ..State::default()
            }),
            changed: Condvar::new(),
            metrics: Metrics::new(),
            started: chrono::Utc::now(),
            config_path: config_path.to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // a panic elsewhere while holding it leaves plain data: keep serving
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number the event (its SSE `id:`), keep it, wake the SSE clients.
    fn record(&self, st: &mut State, v: &Value) {
        self.log(st, Logged::Note(Arc::from(v.to_string())));
    }

    fn log(&self, st: &mut State, entry: Logged) {
        st.seq += 1;
        let seq = st.seq;
        st.log.push_back((seq, entry));
        while st.log.len() > LOG_CAPACITY {
            st.log.pop_front();
        }
        if st.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// A daemon-level event (`parked`, `unrouted`, `reload_failed`, …):
    /// `fields` is a JSON object, `event` and `at` are added.
    pub fn note(&self, event: &str, fields: Value) {
        let mut v = json!({"event": event, "at": rfc3339(chrono::Utc::now())});
        if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), fields) {
            o.extend(extra);
        }
        let mut st = self.lock();
        self.record(&mut st, &v);
    }

    /// The daemon's queue after a turn of its loop; an event when it changed.
    pub fn set_queue(&self, q: Queue) {
        self.metrics.queue(q);
        let mut st = self.lock();
        if st.queue == q {
            return;
        }
        st.queue = q;
        let v = json!({"event": "queue", "at": rfc3339(chrono::Utc::now()),
                       "pending": q.pending, "waiting": q.waiting, "retries": q.retries});
        self.record(&mut st, &v);
    }

    /// A file × host given up on until SIGHUP or restart.
    pub fn park(&self, o: &Outcome, reason: &str) {
        let v = json!({
            "package": o.package, "file": o.file, "host": o.host, "section": o.section,
            "error": o.error, "reason": reason, "exit_status": o.exit_status,
            "output_tail": o.output_tail, "attempts": o.attempts,
            "at": rfc3339(chrono::Utc::now()),
        });
        let mut st = self.lock();
        st.parked
            .insert((o.package.unwrap_or(-1), o.host.clone()), v.clone());
        self.metrics.parked(st.parked.len());
        let mut e = v;
        if let Some(obj) = e.as_object_mut() {
            obj.insert("event".into(), json!("parked"));
        }
        self.record(&mut st, &e);
    }

    /// SIGHUP: the parked file × hosts are retried.
    pub fn unpark_all(&self) {
        let mut st = self.lock();
        if st.parked.is_empty() {
            return;
        }
        let n = st.parked.len();
        st.parked.clear();
        self.metrics.parked(0);
        let v = json!({"event": "unparked", "at": rfc3339(chrono::Utc::now()), "count": n});
        self.record(&mut st, &v);
    }

    pub fn parked_count(&self) -> usize {
        self.lock().parked.len()
    }

    /// `/api/v1/status`.
    pub fn snapshot(&self) -> Value {
        let st = self.lock();
        let in_flight: Vec<Value> = st.in_flight.iter().map(|(k, f)| f.to_json(k)).collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "config": self.config_path,
            "started": rfc3339(self.started),
            "uptime_s": (chrono::Utc::now() - self.started).num_seconds(),
            "last_event": st.seq,
            "queue": {"pending": st.queue.pending, "waiting": st.queue.waiting,
                      "retries": st.queue.retries, "in_flight": in_flight.len()},
            "in_flight": in_flight,
            "parked": st.parked.values().cloned().collect::<Vec<_>>(),
            "recent": st.recent.iter().map(Done::to_json).collect::<Vec<_>>(),
            "hosts": st.hosts.iter().map(|(h, d)| (h.clone(), d.to_json())).collect::<serde_json::Map<_, _>>(),
            "host_state": serde_json::to_value(&st.host_state).unwrap_or_default(),
        })
    }

    /// The events after `cursor`, waiting up to `wait` for one.
    pub fn next_events(&self, cursor: &mut u64, wait: Duration) -> Next {
        let mut st = self.lock();
        let deadline = Instant::now() + wait;
        loop {
            if st.closed {
                return Next::Closed;
            }
            if st.seq > *cursor {
                let oldest = st.log.front().map_or(st.seq + 1, |(n, _)| *n);
                if *cursor + 1 < oldest {
                    let from = *cursor + 1;
                    *cursor = st.seq;
                    return Next::Reset { from, to: oldest };
                }
                let entries: Vec<(u64, Logged)> = st
                    .log
                    .iter()
                    .filter(|(n, _)| *n > *cursor)
                    .cloned()
                    .collect();
                *cursor = st.seq;
                // made JSON without the lock held
                drop(st);
                return Next::Events(entries.into_iter().map(|(n, l)| (n, l.text())).collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Idle;
            }
            st.waiting += 1;
            st = match self.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            st.waiting -= 1;
        }
    }

    /// The number of the last event (an SSE client without Last-Event-ID
    /// starts from here).
    pub fn last_seq(&self) -> u64 {
        self.lock().seq
    }

    /// The daemon is stopping: SSE clients end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// A host-level event (lock, release): true when `e` was one.
    fn on_host_event(st: &mut State, e: &Event) -> bool {
        match &e.kind {
            EventKind::HostLock { owner } => {
                st.host_state.entry(e.host.clone()).or_default().lock = owner.clone();
            }
            EventKind::Release { dir, state } => {
                let hs = st.host_state.entry(e.host.clone()).or_default();
                if state == "active" {
                    hs.release = Some(dir.clone());
                }
            }
            _ => return false,
        }
        true
    }

    fn on_event(&self, st: &mut State, e: &Event, done: Option<(&Arc<Outcome>, At)>) {
        if Self::on_host_event(st, e) {
            return;
        }
        let key: Key = (e.package, e.file.clone(), e.host.clone());
        let now = Instant::now();
        if let EventKind::Queued = e.kind {
            st.in_flight.insert(
                key.clone(),
                Flight {
                    step: "queued",
                    bytes: 0,
                    total: 0,
                    attempt: 0,
                    transport: None,
                    queued: now,
                    since: chrono::Utc::now(),
                    upload_started: None,
                    install_started: None,
                },
            );
        }
        if let Some((o, at)) = done {
            self.finished(st, &key, o, at);
            return;
        }
        let Some(f) = st.in_flight.get_mut(&key) else {
            return;
        };
        match &e.kind {
            EventKind::Connecting { transport } => {
                f.step = "connecting";
                f.transport = Some(transport.to_string());
            }
            EventKind::Uploading { attempt, .. } => {
                f.step = "uploading";
                f.attempt = *attempt;
                f.upload_started.get_or_insert(now);
            }
            EventKind::Progress { bytes, total } => {
                f.bytes = *bytes;
                f.total = *total;
            }
            EventKind::Verifying => f.step = "verifying",
            EventKind::Retrying { .. } => {
                f.step = "retrying";
                self.metrics.retry();
            }
            EventKind::FallingBack { from, to, .. } => {
                f.transport = Some(to.to_string());
                self.metrics.fallback(&from.to_string(), &to.to_string());
            }
            EventKind::Uploaded {
                transport, bytes, ..
            } => {
                f.step = "uploaded";
                f.bytes = *bytes;
                f.total = f.total.max(*bytes);
                f.transport = Some(transport.to_string());
                if let Some(t) = f.upload_started {
                    self.metrics.step("upload", t.elapsed());
                }
            }
            EventKind::Installing => {
                f.step = "installing";
                f.install_started = Some(now);
            }
            EventKind::Queued
            | EventKind::Finished(_)
            | EventKind::HostLock { .. }
            | EventKind::Release { .. } => {}
        }
    }

    fn finished(&self, st: &mut State, key: &Key, o: &Arc<Outcome>, at: At) {
        if let Some(f) = st.in_flight.remove(key) {
            if let Some(t) = f.install_started {
                self.metrics.step("install", t.elapsed());
            }
            self.metrics.step("delivery", f.queued.elapsed());
        }
        self.metrics.delivery(o);
        let v = Done(Arc::clone(o), at);
        st.hosts.insert(o.host.clone(), v.clone());
        st.recent.push_front(v);
        st.recent.truncate(RECENT);
    }
}

impl Sink for Status {
    /// Cheap: the event is kept as it is (JSON is made only for a client
    /// that reads it, or a snapshot).
    fn on(&self, e: &Event) {
        let at = chrono::Utc::now();
        let e = Arc::new(e.clone());
        let done = match &e.kind {
            EventKind::Finished(o) => Some(Arc::new((**o).clone())),
            _ => None,
        };
        let mut st = self.lock();
        self.on_event(&mut st, &e, done.as_ref().map(|o| (o, at)));
        self.log(&mut st, Logged::Event(e, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(file: &str, kind: EventKind) -> Event {
        Event {
            package: Some(1),
            file: file.into(),
            host: "h".into(),
            kind,
        }
    }

    #[test]
    fn events_are_numbered_after_the_first_seq_and_replayed_from_a_cursor() {
        let s = Status::new("c.ini", 41);
        s.on(&ev("a", EventKind::Queued));
        s.on(&ev("a", EventKind::Installing));
        let mut cursor = 41;
        let Next::Events(all) = s.next_events(&mut cursor, Duration::ZERO) else {
            panic!("no events")
        };
        assert_eq!(all.iter().map(|e| e.0).collect::<Vec<_>>(), vec![42, 43]);
        assert_eq!(cursor, 43);
        let mut from_42 = 42;
        let Next::Events(missed) = s.next_events(&mut from_42, Duration::ZERO) else {
            panic!("no events")
        };
        assert_eq!(missed.len(), 1);
        assert!(missed[0].1.contains("\"installing\""), "{}", missed[0].1);
        assert!(matches!(
            s.next_events(&mut cursor, Duration::from_millis(10)),
            Next::Idle
        ));
        assert_eq!(s.snapshot()["in_flight"][0]["step"], "installing");
    }

    #[test]
    fn a_cursor_older_than_the_log_gets_a_reset() {
        let s = Status::new("c.ini", 0);
        for _ in 0..LOG_CAPACITY + 10 {
            s.note("queue", json!({}));
        }
        let mut cursor = 3;
        match s.next_events(&mut cursor, Duration::ZERO) {
            Next::Reset { from, to } => {
                assert_eq!((from, to), (4, 11));
                assert_eq!(cursor, (LOG_CAPACITY + 10) as u64);
            }
            _ => panic!("expected a reset"),
        }
    }

    #[test]
    fn a_finished_event_is_the_same_object_either_way() {
        let item = crate::plan::Item {
            path: "/d/a b.tgz".into(),
            name: "a b.tgz".into(),
            route: 0,
            groups: Default::default(),
            package: Some(7),
            only_hosts: None,
            file: None,
            resume: Default::default(),
            stale_temps: Default::default(),
        };
        let mut o = Outcome::failed(&item, "h", "sec", "boom");
        o.output_tail = Some("line\n\"quoted\"".into());
        let e = Event {
            package: Some(7),
            file: "a b.tgz".into(),
            host: "h".into(),
            kind: EventKind::Finished(Box::new(o)),
        };
        let at = chrono::Utc::now();
        let fast: Value =
            serde_json::from_str(&Logged::Event(Arc::new(e.clone()), at).text()).unwrap();
        assert_eq!(fast, event_json(&e, at));
    }
}
