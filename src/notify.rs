//! Notifications (`notify_command`, `notify_url`, `notify_on`): the daemon
//! tells someone when a file × host is parked, a file matches no route or a
//! config reload failed — and, with `notify_on = all`, when a file × host is
//! done.
//!
//! Durable and out of the way: a notification is first written to the
//! journal's outbox (one row per target), then a thread of its own sends the
//! due ones and records every attempt; a failed attempt is retried with the
//! one backoff ([`crate::retry`]: 2 s, 4 s, … 5 min) up to [`MAX_ATTEMPTS`]
//! times, then abandoned (logged). A slow or dead receiver only delays other
//! notifications, never a delivery; what was pending when the daemon stopped
//! is sent after it starts again.
//!
//! A webhook gets `POST` with the JSON body, `X-Dispatch-Event`,
//! `X-Dispatch-Delivery` (the outbox id: the same for every attempt of one
//! notification, so a receiver can drop a repeat) and, with
//! `notify_secret`, `X-Dispatch-Signature: sha256=HEX` — HMAC-SHA256 of the
//! exact body. A command gets the JSON on stdin, the id in
//! `DISPATCH_NOTIFICATION_ID`; exit 0 is success.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::{json, Value};

use crate::config::{Secret, Settings};
use crate::journal::{Journal, Notification, NotifyTarget};
use crate::retry::Backoff;

/// Attempts per notification before it is abandoned (about two hours).
pub const MAX_ATTEMPTS: u32 = 30;
const BACKOFF: Backoff = Backoff::new(Duration::from_secs(2));
/// A webhook answer or a command may take this long.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Where notifications go, as the config (last loaded) says.
#[derive(Clone, Default)]
struct Targets {
    command: Option<String>,
    url: Option<String>,
    secret: Option<Secret>,
    all: bool,
}

impl Targets {
    fn of(s: &Settings) -> Targets {
        Targets {
            command: s.notify_command.clone(),
            url: s.notify_url.clone(),
            secret: s.notify_secret.clone(),
            all: s.notify_all,
        }
    }

    fn kinds(&self) -> Vec<NotifyTarget> {
        let mut k = Vec::new();
        if self.command.is_some() {
            k.push(NotifyTarget::Command);
        }
        if self.url.is_some() {
            k.push(NotifyTarget::Url);
        }
        k
    }
}

/// The daemon's notifier; its thread runs until [`Notifier::stop`].
pub struct Notifier {
    journal: Arc<Journal>,
    targets: Arc<Mutex<Targets>>,
    wake: Sender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Start the sender (it also sends what an earlier run left pending).
    pub fn start(settings: &Settings, journal: Arc<Journal>) -> Result<Notifier, std::io::Error> {
        let targets = Arc::new(Mutex::new(Targets::of(settings)));
        let (wake, woken) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (j, t, s) = (
                Arc::clone(&journal),
                Arc::clone(&targets),
                Arc::clone(&stop),
            );
            std::thread::Builder::new()
                .name("notify".into())
                .spawn(move || send_loop(&j, &t, &s, &woken))?
        };
        Ok(Notifier {
            journal,
            targets,
            wake,
            stop,
            thread: Some(thread),
        })
    }

    /// SIGHUP: the reloaded config's targets.
    pub fn reload(&self, settings: &Settings) {
        *lock(&self.targets) = Targets::of(settings);
    }

    /// A failure: always notified (when a target is set).
    pub fn failure(&self, event: &str, fields: Value) {
        self.enqueue(event, fields);
    }

    /// A success: notified with `notify_on = all`.
    pub fn success(&self, event: &str, fields: Value) {
        if lock(&self.targets).all {
            self.enqueue(event, fields);
        }
    }

    fn enqueue(&self, event: &str, fields: Value) {
        let kinds = lock(&self.targets).kinds();
        if kinds.is_empty() {
            return;
        }
        let payload = payload(event, fields).to_string();
        for k in kinds {
            if let Err(e) = self.journal.add_notification(k, event, &payload) {
                log::error!("notify: cannot queue the {event} notification: {e}");
            }
        }
        let _ = self.wake.try_send(());
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(t: &Mutex<Targets>) -> std::sync::MutexGuard<'_, Targets> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// `{"event", "at", "daemon": {host, pid}, …fields}`.
fn payload(event: &str, fields: Value) -> Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut v = json!({
        "event": event,
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "daemon": {"host": host.trim(), "pid": std::process::id()},
    });
    if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), fields) {
        o.extend(extra);
    }
    v
}

fn send_loop(j: &Journal, targets: &Mutex<Targets>, stop: &AtomicBool, woken: &Receiver<()>) {
    while !stop.load(Ordering::SeqCst) {
        match j.due_notifications(16) {
            Ok(due) => {
                for n in due {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let t = lock(targets).clone();
                    attempt(j, &t, &n);
                }
            }
            Err(e) => log::error!("notify: {e}"),
        }
        let now = chrono::Utc::now().timestamp_millis();
        let wait = match j.next_notification_due() {
            Ok(Some(due)) => Duration::from_millis((due - now).clamp(0, 1000) as u64),
            _ => Duration::from_secs(1),
        };
        let _ = woken.recv_timeout(wait);
    }
}

/// One try at `n`; recorded in the journal.
fn attempt(j: &Journal, t: &Targets, n: &Notification) {
    let result = match n.target {
        NotifyTarget::Url => match &t.url {
            Some(url) => post(url, t.secret.as_ref(), n),
            None => Err("notify_url is no longer set".to_string()),
        },
        NotifyTarget::Command => match &t.command {
            Some(cmd) => run_command(cmd, n),
            None => Err("notify_command is no longer set".to_string()),
        },
    };
    let tried = n.attempts + 1;
    let (error, retry) = match &result {
        Ok(()) => (None, None),
        Err(e) if tried < MAX_ATTEMPTS => {
            let d = BACKOFF.delay(tried);
            log::warn!(
                "notify: {} {} (#{}): attempt {tried} failed: {e}; next in {}s",
                n.event,
                n.target.as_str(),
                n.id,
                d.as_secs()
            );
            (Some(e.as_str()), Some(d.as_millis() as i64))
        }
        Err(e) => {
            log::error!(
                "notify: {} {} (#{}): abandoned after {tried} attempts: {e}",
                n.event,
                n.target.as_str(),
                n.id
            );
            (Some(e.as_str()), None)
        }
    };
    if result.is_ok() {
        log::info!(
            "notify: {} sent by {} (#{})",
            n.event,
            n.target.as_str(),
            n.id
        );
    }
    if let Err(e) = j.notification_attempt(n.id, error, retry) {
        log::error!("notify: cannot record attempt {tried} of #{}: {e}", n.id);
    }
}

/// `sha256=HEX` of HMAC-SHA256(secret, body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; kept total anyway
        Err(_) => return String::new(),
    };
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn post(url: &str, secret: Option<&Secret>, n: &Notification) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(SEND_TIMEOUT)
        .redirects(0)
        .build();
    let mut req = agent
        .post(url)
        .set("Content-Type", "application/json")
        .set(
            "User-Agent",
            concat!("dispatch/", env!("CARGO_PKG_VERSION")),
        )
        .set("X-Dispatch-Event", &n.event)
        .set("X-Dispatch-Delivery", &n.id.to_string());
    if let Some(s) = secret {
        req = req.set(
            "X-Dispatch-Signature",
            &signature(s.expose(), n.payload.as_bytes()),
        );
    }
    match req.send_string(&n.payload) {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, _)) => Err(format!("the webhook answered HTTP {code}")),
        // the URL may hold a token: say what failed, not where
        Err(ureq::Error::Transport(t)) => Err(format!("webhook: {}", t.kind())),
    }
}

fn run_command(cmd: &str, n: &Notification) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("/bin/sh")
        .args(["-c", cmd])
        .process_group(0)
        .env("DISPATCH_NOTIFICATION_ID", n.id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start notify_command: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // a command that does not read its input is its own business
        let _ = stdin.write_all(n.payload.as_bytes());
    }
    // read as it comes: a chatty command must not fill the pipe and hang
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = e.read_to_end(&mut buf);
            buf
        })
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > SEND_TIMEOUT => {
                crate::rollout::kill_group(&mut child);
                return Err(format!(
                    "notify_command killed after {}s",
                    SEND_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("notify_command: {e}")),
        }
    };
    let err = stderr
        .and_then(|t| t.join().ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let tail: String = err.lines().last().unwrap_or("").chars().take(200).collect();
    Err(format!("notify_command failed ({status}): {tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2.
    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
