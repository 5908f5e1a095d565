//! What a foreground run shows while it works: a subscriber of the batch's
//! bus that tells, on stderr, what each file × host is doing — progress
//! bars on a terminal (one per file × host in flight and an overall one),
//! plain lines elsewhere (a pipe, journald, CI: one line each, no carriage
//! returns). Retries, fallbacks and long uploads are told the moment they
//! happen, and a step that has been waiting for [`QUIET_LIMIT`] says so
//! (`still connecting (10 s)`), so a dead host is never a silent terminal.
//! The results themselves are the console's ([`crate::app::Console`]), on
//! stdout; with bars they are printed with the bars cleared.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::event::{Event, EventKind, Sink};

/// How progress is shown (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// Bars when stderr is a terminal, lines otherwise; nothing with `--json` or `-q`.
    #[default]
    Auto,
    /// Progress bars (stderr).
    Bars,
    /// One plain line per step worth telling (stderr).
    Lines,
    /// Nothing but the results.
    None,
}

impl Mode {
    /// `Auto` decided: by `--json`/`-q` and whether stderr is a terminal.
    pub fn resolve(self, json: bool, quiet: bool) -> Mode {
        use std::io::IsTerminal;
        match self {
            Mode::Auto if json || quiet => Mode::None,
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Bars,
            Mode::Auto => Mode::Lines,
            m => m,
        }
    }
}

/// A step that has been waiting this long is told about (and again after
/// as long again).
pub const QUIET_LIMIT: Duration = Duration::from_secs(5);

/// How often a line tells a long upload's progress.
const UPLOAD_LINE_EVERY: Duration = Duration::from_secs(2);

/// One file × host between its first step and its end.
struct Flight {
    /// What it is doing: `connecting`, `uploading`, `installing`, …
    step: &'static str,
    /// When that step started, when anything last happened, when a line
    /// last told about it.
    step_since: Instant,
    last_event: Instant,
    last_line: Instant,
    /// Its bar, with bars.
    bar: Option<ProgressBar>,
}

#[derive(Default)]
struct State {
    flights: HashMap<(String, String), Flight>,
    queued: u64,
    finished: u64,
}

/// The progress subscriber of one foreground batch.
pub struct Progress {
    bars: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    state: Mutex<State>,
}

impl Progress {
    /// `None` for [`Mode::None`]; `mode` must be resolved.
    pub fn new(mode: Mode) -> Option<Arc<Progress>> {
        let (bars, overall) = match mode {
            Mode::None | Mode::Auto => return None,
            Mode::Lines => (None, None),
            Mode::Bars => {
                let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                let all = mp.add(ProgressBar::new(0));
                all.set_style(style(
                    "{prefix:>12} [{bar:30}] {pos}/{len} file × host {msg}",
                ));
                all.set_prefix("overall");
                (Some(mp), Some(all))
            }
        };
        Some(Arc::new(Progress {
            bars,
            overall,
            state: Mutex::default(),
        }))
    }

    /// Run `print` (a result line on stdout) with the bars out of the way.
    pub fn suspend(&self, print: impl FnOnce()) {
        match &self.bars {
            Some(mp) => mp.suspend(print),
            None => print(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A line above the bars, or on stderr.
    fn line(&self, text: &str) {
        match &self.bars {
            Some(mp) => {
                let _ = mp.println(text);
            }
            None => {
                let _ = writeln!(std::io::stderr().lock(), "dispatch: {text}");
            }
        }
    }

    /// `key`'s flight now doing `step` (created, with its bar, if new).
    fn enter(&self, st: &mut State, key: &(String, String), step: &'static str) {
        let now = Instant::now();
        let bars = self.bars.as_ref();
        let f = st.flights.entry(key.clone()).or_insert_with(|| Flight {
            step,
            step_since: now,
            last_event: now,
            last_line: now,
            bar: bars.map(|mp| {
                let b = mp.add(ProgressBar::new_spinner());
                b.set_style(style("{prefix:>12} {spinner} {msg} ({elapsed})"));
                b.set_prefix(crate::config::escape_control(&key.1));
                b.enable_steady_tick(Duration::from_millis(200));
                b
            }),
        });
        if f.step != step {
            f.step = step;
            f.step_since = now;
        }
        f.last_event = now;
        if let Some(b) = &f.bar {
            b.set_message(format!("{}: {step}", crate::config::escape_control(&key.0)));
        }
    }

    fn upload_progress(&self, st: &mut State, key: &(String, String), bytes: u64, total: u64) {
        self.enter(st, key, "uploading");
        let Some(f) = st.flights.get_mut(key) else {
            return;
        };
        if let Some(b) = &f.bar {
            if b.length() != Some(total) {
                b.set_style(style(
                    "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                ));
                b.set_length(total);
            }
            b.set_position(bytes);
            return;
        }
        let now = Instant::now();
        if bytes < total && now.duration_since(f.last_line) >= UPLOAD_LINE_EVERY {
            f.last_line = now;
            let secs = now.duration_since(f.step_since).as_secs_f64().max(0.001);
            let rate = bytes as f64 / secs;
            let left = (total - bytes) as f64 / rate.max(1.0);
            let text = format!(
                "{}: {}: {}% of {} ({}/s, about {:.0} s left)",
                shown(&key.0),
                key.1,
                bytes * 100 / total.max(1),
                size(total as f64),
                size(rate),
                left
            );
            self.line(&text);
        }
    }

    fn end(&self, st: &mut State, key: &(String, String)) {
        if let Some(Flight { bar: Some(b), .. }) = st.flights.remove(key) {
            b.finish_and_clear();
            if let Some(mp) = &self.bars {
                mp.remove(&b);
            }
        }
        st.finished += 1;
        if let Some(all) = &self.overall {
            all.set_position(st.finished);
        }
    }

    /// Tell about every step that has been quiet for [`QUIET_LIMIT`].
    fn tick(&self) {
        let now = Instant::now();
        let mut lines = Vec::new();
        {
            let mut st = self.state();
            for ((file, host), f) in st.flights.iter_mut() {
                let quiet = now.duration_since(f.last_event) >= QUIET_LIMIT;
                if f.bar.is_none() && quiet && now.duration_since(f.last_line) >= QUIET_LIMIT {
                    f.last_line = now;
                    let secs = now.duration_since(f.step_since).as_secs();
                    lines.push(format!(
                        "{}: {host}: still {} ({secs} s)",
                        shown(file),
                        f.step
                    ));
                }
            }
        }
        for l in lines {
            self.line(&l);
        }
    }

    /// Start telling about quiet steps, once a second, until the returned
    /// [`Ticker`] is dropped.
    pub fn ticker(self: &Arc<Progress>) -> Ticker {
        let stop = Arc::new(AtomicBool::new(false));
        let (me, flag) = (Arc::clone(self), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_secs(1));
                    me.tick();
                }
            })
            .ok();
        Ticker { stop, handle }
    }

    /// The bars gone (the results' summary follows on a clean terminal).
    pub fn finish(&self) {
        if let Some(all) = &self.overall {
            all.finish_and_clear();
        }
        if let Some(mp) = &self.bars {
            let _ = mp.clear();
        }
    }
}

impl Sink for Progress {
    fn on(&self, e: &Event) {
        let key = (e.file.clone(), e.host.clone());
        let mut st = self.state();
        match &e.kind {
            EventKind::Queued => {
                st.queued += 1;
                if let Some(all) = &self.overall {
                    all.set_length(st.queued);
                }
            }
            EventKind::Connecting { transport } => {
                self.enter(&mut st, &key, "connecting");
                if self.bars.is_none() {
                    self.line(&format!(
                        "{}: {}: connecting by {transport}",
                        shown(&e.file),
                        e.host
                    ));
                }
            }
            EventKind::Uploading { .. } => self.enter(&mut st, &key, "uploading"),
            EventKind::Progress { bytes, total } => {
                self.upload_progress(&mut st, &key, *bytes, *total)
            }
            EventKind::Verifying => self.enter(&mut st, &key, "verifying"),
            EventKind::Uploaded { .. } => self.enter(&mut st, &key, "uploaded"),
            EventKind::Installing => self.enter(&mut st, &key, "installing"),
            EventKind::Retrying {
                attempt,
                delay,
                error,
            } => {
                self.enter(&mut st, &key, "waiting to retry");
                self.line(&format!(
                    "{}: {}: attempt {attempt} failed: {error}; retrying in {:.1} s",
                    shown(&e.file),
                    e.host,
                    delay.as_secs_f64()
                ));
            }
            EventKind::FallingBack { from, to, reason } => {
                self.enter(&mut st, &key, "falling back");
                self.line(&format!(
                    "{}: {}: {from} cannot be used ({reason}); falling back to {to}",
                    shown(&e.file),
                    e.host
                ));
            }
            EventKind::Finished(_) => self.end(&mut st, &key),
            EventKind::HostLock { .. } | EventKind::Release { .. } => {}
        }
    }
}

/// `--json`: every event as a JSON line on stdout as it happens (see
/// [`Event::to_json`]), except the end, whose record is the result object
/// the console prints.
pub struct JsonEvents;

impl Sink for JsonEvents {
    fn on(&self, e: &Event) {
        match e.kind {
            // the end's record is the result; an upload's last progress is
            // its "uploaded" (a small file has no other)
            EventKind::Finished(_) => return,
            EventKind::Progress { bytes, total } if bytes >= total => return,
            _ => {}
        }
        let line = e.to_json().to_string();
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
}

/// Stops the ticker thread when dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn shown(name: &str) -> String {
    crate::config::escape_control(name)
}

/// `1.5 MiB`, `300 KiB`, `12 B`.
fn size(bytes: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_human_wrote_them() {
        assert_eq!(size(12.0), "12 B");
        assert_eq!(size(1536.0), "1.5 KiB");
        assert_eq!(size(500.0 * 1024.0 * 1024.0), "500.0 MiB");
    }

    #[test]
    fn auto_shows_nothing_with_json_or_quiet() {
        assert_eq!(Mode::Auto.resolve(true, false), Mode::None);
        assert_eq!(Mode::Auto.resolve(false, true), Mode::None);
        assert_eq!(Mode::Lines.resolve(true, false), Mode::Lines);
    }
}
