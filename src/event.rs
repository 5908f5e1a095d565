//! Events: every step of a file × host delivery emits a typed [`Event`] on
//! one [`Bus`]. The journal, the log and the console are subscribers
//! ([`Sink`]s); a file × host [`Outcome`] is the fold of its events
//! ([`Outcome::apply`]).
//!
//! Sinks run inline, in the emitting lane, in the order they were added, so
//! what the journal records is on disk before the step after it starts: the
//! "uploaded" record of a file exists before its install runs.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Route, Transport};
use crate::journal::{Detail, Journal, State};
use crate::plan::Item;

/// One thing that happened to one file on one host.
#[derive(Debug, Clone)]
pub struct Event {
    /// Journal package id, if recorded.
    pub package: Option<i64>,
    /// The file's base name.
    pub file: String,
    pub host: String,
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum EventKind {
    /// Planned for this host.
    Queued,
    /// A session to the host is being opened.
    Connecting { transport: Transport },
    /// Bytes sent so far of `total` (see [`crate::transport::PROGRESS_STEP`]).
    Progress { bytes: u64, total: u64 },
    /// The temporary file is being checked.
    Verifying,
    /// An upload attempt starts; its temporary file on the host.
    Uploading { attempt: u32, temp_path: String },
    /// An attempt failed transiently; the next one starts after `delay`.
    Retrying {
        attempt: u32,
        delay: Duration,
        error: String,
    },
    /// `from` cannot be used on this host; `to` is tried.
    FallingBack {
        from: Transport,
        to: Transport,
        reason: String,
    },
    /// The verified file is in place under its final name.
    Uploaded {
        transport: Transport,
        bytes: u64,
        /// Absolute (see [`crate::route::absolute_dir`]).
        remote_path: String,
        attempt: u32,
        /// Why the transports before `transport` could not be used.
        fallback_reason: Option<String>,
        /// Sent over plain FTP.
        cleartext: bool,
        /// Was already in place (crash recovery): nothing was sent.
        resumed: bool,
        /// Sent in a pipeline (see `transport::ssh::stream`), not step by step.
        streamed: bool,
    },
    /// The install command starts.
    Installing,
    /// The end: the outcome as the lane folded it.
    Finished(Box<Outcome>),
    /// A rollout took the host's lock (`owner`), or released it (None).
    /// `file` is empty: it is about the host.
    HostLock { owner: Option<String> },
    /// A release's state on the host changed (active, previous, failed,
    /// pruned). `file` is empty.
    Release { dir: String, state: String },
}

impl Event {
    /// The event as one JSON object (`--json`, and later the status API):
    /// `{"event": KIND, "file", "host", "at": RFC 3339 UTC, …the kind's fields}`.
    /// `Finished` is the result object itself ([`Outcome`]); here it is
    /// `{"event": "finished", "state", "ok"}` for a reader of events only.
    pub fn to_json(&self) -> serde_json::Value {
        self.to_json_at(chrono::Utc::now())
    }

    /// [`Event::to_json`] for an event that happened `at`.
    pub fn to_json_at(&self, at: chrono::DateTime<chrono::Utc>) -> serde_json::Value {
        use serde_json::json;
        let (name, fields) = match &self.kind {
            EventKind::Queued => ("queued", json!({})),
            EventKind::Connecting { transport } => {
                ("connecting", json!({"transport": transport.to_string()}))
            }
            EventKind::Progress { bytes, total } => {
                ("progress", json!({"bytes": bytes, "total": total}))
            }
            EventKind::Verifying => ("verifying", json!({})),
            EventKind::Uploading { attempt, temp_path } => (
                "uploading",
                json!({"attempt": attempt, "temp_path": temp_path}),
            ),
            EventKind::Retrying {
                attempt,
                delay,
                error,
            } => (
                "retrying",
                json!({"attempt": attempt, "delay_ms": delay.as_millis() as u64, "error": error}),
            ),
            EventKind::FallingBack { from, to, reason } => (
                "falling_back",
                json!({"from": from.to_string(), "to": to.to_string(), "reason": reason}),
            ),
            EventKind::Uploaded {
                transport,
                bytes,
                remote_path,
                attempt,
                resumed,
                streamed,
                ..
            } => (
                "uploaded",
                json!({"transport": transport.to_string(), "bytes": bytes,
                       "remote_path": remote_path, "attempt": attempt, "resumed": resumed,
                       "streamed": streamed}),
            ),
            EventKind::Installing => ("installing", json!({})),
            EventKind::Finished(o) => ("finished", json!({"state": o.state, "success": o.ok})),
            EventKind::HostLock { owner } => ("host_lock", json!({"owner": owner})),
            EventKind::Release { dir, state } => ("release", json!({"dir": dir, "state": state})),
        };
        let mut v = json!({
            "event": name,
            "file": self.file,
            "host": self.host,
            "at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
            obj.extend(extra);
        }
        v
    }
}

/// How one file × host ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub file: String,
    pub path: String,
    pub host: String,
    pub section: String,
    /// `installed`, `uploaded` (no install command), `failed`, `dry-run`.
    pub state: String,
    pub ok: bool,
    pub transport: Option<String>,
    pub fallback_reason: Option<String>,
    /// The file on the host, absolute.
    pub remote_path: Option<String>,
    pub bytes: u64,
    pub attempts: u32,
    pub exit_status: Option<i32>,
    pub output_tail: Option<String>,
    pub error: Option<String>,
    pub elapsed_ms: u64,
    /// Sent over plain FTP (`ftp_cleartext = yes`): password and bytes were
    /// readable on the network.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cleartext: bool,
    #[serde(skip)]
    pub package: Option<i64>,
    /// The verified upload is in place in this (absolute) dir, whatever
    /// happened to the install.
    #[serde(skip)]
    pub uploaded_to: Option<String>,
    /// Worth another attempt: a transient failure before the file was in
    /// place, or a lost connection during the install (then only the install
    /// is redone, in `uploaded_to`). A failed or timed-out install is not.
    #[serde(skip)]
    pub retry: bool,
    /// Ended by Ctrl-C / SIGTERM.
    #[serde(skip)]
    pub interrupted: bool,
}

impl Outcome {
    pub fn start(item: &Item, host: &str, route: &Route) -> Outcome {
        Outcome::failed(item, host, &route.section, "")
    }

    /// A failed result for `item` on `host` (`error` empty: none yet).
    pub fn failed(item: &Item, host: &str, section: &str, error: &str) -> Outcome {
        Outcome {
            file: item.name.clone(),
            path: item.path.display().to_string(),
            host: host.to_string(),
            section: section.to_string(),
            state: "failed".into(),
            ok: false,
            transport: None,
            fallback_reason: None,
            remote_path: None,
            bytes: 0,
            attempts: 0,
            exit_status: None,
            output_tail: None,
            error: (!error.is_empty()).then(|| error.to_string()),
            elapsed_ms: 0,
            cleartext: false,
            package: item.package,
            uploaded_to: None,
            retry: false,
            interrupted: false,
        }
    }

    /// Fold one event into the outcome (see [`crate::event`]).
    pub fn apply(&mut self, e: &EventKind) {
        match e {
            EventKind::Uploading { attempt, .. } => self.attempts = *attempt,
            EventKind::Uploaded {
                transport,
                bytes,
                remote_path,
                attempt,
                fallback_reason,
                cleartext,
                ..
            } => {
                self.transport = Some(transport.to_string());
                self.bytes = *bytes;
                self.remote_path = Some(remote_path.clone());
                self.uploaded_to = remote_path.rsplit_once('/').map(|(d, _)| {
                    if d.is_empty() {
                        "/".to_string()
                    } else {
                        d.to_string()
                    }
                });
                self.attempts = self.attempts.max(*attempt);
                self.fallback_reason = fallback_reason.clone();
                self.cleartext = *cleartext;
            }
            _ => {}
        }
    }

    /// What the journal keeps of it.
    pub fn detail(&self) -> Detail {
        Detail {
            transport: self.transport.clone(),
            fallback_reason: journaled_reason(&self.fallback_reason, self.cleartext),
            attempt: self.attempts,
            remote_path: self.remote_path.clone(),
            exit_status: self.exit_status,
            output_tail: self.output_tail.clone(),
            error: self.error.clone(),
            elapsed_ms: None,
        }
    }
}

/// The journal has no column for "cleartext": the fallback reason says it.
pub fn journaled_reason(reason: &Option<String>, cleartext: bool) -> Option<String> {
    match (reason, cleartext) {
        (Some(r), true) => Some(format!("{r}; sent in cleartext (plain FTP)")),
        (None, true) => Some("sent in cleartext (plain FTP)".into()),
        (r, false) => r.clone(),
    }
}

/// A subscriber.
pub trait Sink: Send + Sync {
    fn on(&self, e: &Event);
}

/// The bus of one batch: its sinks, called in order for every event.
#[derive(Default, Clone)]
pub struct Bus {
    sinks: Vec<Arc<dyn Sink>>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn with(mut self, sink: Arc<dyn Sink>) -> Bus {
        self.sinks.push(sink);
        self
    }

    pub fn emit(&self, e: &Event) {
        for s in &self.sinks {
            s.on(e);
        }
    }
}

/// The journal as a subscriber: each step's state as it completes.
pub struct JournalSink(pub Arc<Journal>);

impl Sink for JournalSink {
    fn on(&self, e: &Event) {
        let Some(pkg) = e.package else { return };
        let (state, detail) = match &e.kind {
            EventKind::Queued => (State::Queued, Detail::default()),
            EventKind::Uploading { attempt, temp_path } => (
                State::Uploading,
                Detail {
                    attempt: *attempt,
                    remote_path: Some(temp_path.clone()),
                    ..Detail::default()
                },
            ),
            EventKind::Uploaded { resumed: true, .. } => return,
            EventKind::Uploaded {
                transport,
                remote_path,
                attempt,
                fallback_reason,
                cleartext,
                ..
            } => (
                State::Uploaded,
                Detail {
                    transport: Some(transport.to_string()),
                    fallback_reason: journaled_reason(fallback_reason, *cleartext),
                    attempt: *attempt,
                    remote_path: Some(remote_path.clone()),
                    ..Detail::default()
                },
            ),
            EventKind::Finished(o) if o.state == "dry-run" => return,
            EventKind::Finished(o) => {
                let mut d = o.detail();
                d.elapsed_ms = Some(o.elapsed_ms);
                (final_state(o), d)
            }
            _ => return,
        };
        if let Err(err) = self.0.set_state(pkg, &e.host, state, &detail) {
            log::warn!("journal: cannot record {state} for {}: {err}", e.host);
        }
    }
}

/// The journal state an outcome ends in.
fn final_state(o: &Outcome) -> State {
    match o.state.as_str() {
        "installed" => State::Installed,
        "uploaded" => State::Uploaded,
        _ => State::Failed,
    }
}

/// The log as a subscriber: one line per step that matters, subject first.
pub struct LogSink;

impl Sink for LogSink {
    fn on(&self, e: &Event) {
        let (file, host) = (&e.file, &e.host);
        match &e.kind {
            EventKind::Retrying {
                attempt,
                delay,
                error,
            } => log::warn!(
                "{file}: {host}: attempt {attempt} failed: {error}; retrying in {:.1}s",
                delay.as_secs_f64()
            ),
            EventKind::FallingBack { from, to, reason } => {
                log::warn!("{file}: {host}: {from} cannot be used ({reason}); falling back to {to}")
            }
            EventKind::Uploaded {
                transport,
                bytes,
                remote_path,
                resumed: false,
                streamed,
                ..
            } => {
                let how = if *streamed { " (streamed)" } else { "" };
                log::info!(
                    "{file}: {host}: uploaded {bytes} bytes by {transport}{how} to {remote_path}"
                )
            }
            EventKind::Uploaded {
                remote_path,
                resumed: true,
                ..
            } => {
                let dir = remote_path.rsplit_once('/').map_or("", |(d, _)| d);
                log::info!("{file}: {host}: resuming: installing the upload already in {dir}")
            }
            EventKind::Finished(o) if o.state == "installed" => {
                log::info!("{file}: {host}: installed")
            }
            _ => {}
        }
    }
}
