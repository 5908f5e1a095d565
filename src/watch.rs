//! Drop-directory watching: inotify events plus size/mtime stability → files
//! that are completely written. Detection only; what to do with a complete
//! file is the daemon's business.
//!
//! Why this shape (DESIGN §5; the measured notify 8.2 behaviour is in
//! notes/facts-testinfra-and-crates.md §B.5): a build server publishes either
//! atomically (write elsewhere or under an ignored `.part` name, then rename)
//! or by writing in place, possibly slowly. Neither a fixed delay nor a
//! debouncer tells those apart, so the raw events are used:
//!
//! * `Modify(Name(To))` of a regular file: complete at once ([`How::RenamedIn`]).
//! * `Create` / `Modify(Data)`: being written. Such a file is *never* judged
//!   complete until its writer closes it (`Access(Close(Write))`), however long
//!   it pauses; after the close its size and mtime must hold still for
//!   `settle` ([`How::Settled`]). A write after the close makes it busy again.
//! * A rescan — at start, for a new or moved-in subdirectory (inotify reports
//!   nothing for files created before notify adds the new watch, or for files
//!   inside a moved-in directory), on queue overflow, every `rescan` and on
//!   [`Watcher::rescan_now`] — walks the directories and judges files that no
//!   event told about by stability alone: seen twice with the same size and
//!   mtime at least `settle` apart, mtime older than `settle`
//!   ([`How::Rescan`]). The start-up rescan stats each file once and reports
//!   those whose mtime is already `settle` old at once (that is the catch-up
//!   after downtime), unless an event shows them being written meanwhile.
//! * A file that keeps changing for longer than `max_settle` is reported once
//!   per busy period ([`Ready::TooBusy`]) and not sent; it is reported as
//!   complete once it does settle.
//! * Names matching an ignore pattern, and anything inside an ignored
//!   directory, are never reported; renaming `x.part` to `x` reports `x`.
//!   Symlinks and special files are skipped.
//!
//! One (path, size, mtime) is reported once; the memory of what was reported
//! is pruned to the files still present at each complete rescan.
//!
//! One worker thread owns all state: no locks, and no polling — it sleeps in
//! `recv_timeout` until the next event or the earliest deadline (a heap of
//! deadlines), so an idle daemon uses no CPU. Events reach it through a
//! bounded channel; if the channel fills up the events are dropped and a
//! rescan is done instead (like an inotify queue overflow), so memory stays
//! bounded under an event storm.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};

use crate::journal::mtime_ns;

/// Capacity of the event channel between notify's thread and the worker.
const EVENT_QUEUE: usize = 16 * 1024;

/// A new or moved-in directory is walked when its event arrives and again
/// after these delays: notify adds the watch on a new directory only after it
/// has handed out the events read with its creation, so files created in
/// between would otherwise be missed.
const NEW_DIR_FOLLOW_UPS: [Duration; 2] = [Duration::from_millis(250), Duration::from_secs(2)];

/// What to watch and how patiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// Watch subdirectories too (else only the files directly in each dir).
    pub recursive: bool,
    /// How long a closed file's size and mtime must hold still.
    pub settle: Duration,
    /// Period of the safety-net rescan; zero = no periodic rescan.
    pub rescan: Duration,
    /// A file changing for longer than this is reported as too busy; zero = never.
    pub max_settle: Duration,
    /// Glob patterns (`*`, `?`) on the base name, e.g. `.*`, `*.part`.
    pub ignore: Vec<String>,
}

impl Default for WatchOptions {
    fn default() -> WatchOptions {
        WatchOptions {
            recursive: false,
            settle: Duration::from_secs(2),
            rescan: Duration::from_secs(60),
            max_settle: Duration::from_secs(600),
            ignore: [".*", "*.part", "*.tmp", "*.swp", "*~"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// A complete file, as it was when judged complete.
    File {
        path: PathBuf,
        size: u64,
        mtime_ns: i64,
        how: How,
    },
    /// Kept changing for longer than `max_settle`: report it, do not send it.
    TooBusy { path: PathBuf, for_: Duration },
    /// Something the operator should know (a watched directory vanished, an
    /// inotify limit was hit…); the watcher goes on.
    Error(String),
}

/// Why a file was judged complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum How {
    /// Renamed into the watched tree: complete when it appears.
    RenamedIn,
    /// Closed after writing, then still for `settle`.
    Settled,
    /// Found by a rescan, stable by size and mtime alone.
    Rescan,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            How::RenamedIn => "renamed in",
            How::Settled => "settled after close",
            How::Rescan => "found by rescan",
        })
    }
}

/// The watcher could not be started.
#[derive(Debug)]
pub enum WatchError {
    /// A directory to watch is missing or not a directory.
    NotADirectory {
        path: PathBuf,
        cause: Option<io::Error>,
    },
    /// notify refused (inotify limits, permissions…).
    Notify {
        path: Option<PathBuf>,
        cause: notify::Error,
    },
    /// The worker thread could not be started.
    Thread(io::Error),
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchError::NotADirectory {
                path,
                cause: Some(e),
            } => {
                write!(f, "{}: cannot watch: {e}", path.display())
            }
            WatchError::NotADirectory { path, cause: None } => {
                write!(f, "{}: cannot watch: not a directory", path.display())
            }
            WatchError::Notify {
                path: Some(p),
                cause,
            } => write!(f, "{}: cannot watch: {cause}", p.display()),
            WatchError::Notify { path: None, cause } => {
                write!(f, "cannot start file watching: {cause}")
            }
            WatchError::Thread(e) => write!(f, "cannot start the watch thread: {e}"),
        }
    }
}

impl std::error::Error for WatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WatchError::NotADirectory { cause, .. } => cause
                .as_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            WatchError::Notify { cause, .. } => Some(cause),
            WatchError::Thread(e) => Some(e),
        }
    }
}

/// `dirs` made absolute, with symlinks and `.`/`..` resolved, duplicates
/// dropped (first one kept): the form the watcher reports paths under.
pub fn canonical_dirs(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, WatchError> {
    let mut out: Vec<PathBuf> = Vec::with_capacity(dirs.len());
    for d in dirs {
        let c = fs::canonicalize(d).map_err(|e| WatchError::NotADirectory {
            path: d.clone(),
            cause: Some(e),
        })?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Does the base name `name` match one of the glob `patterns` (`*` = any
/// run of characters, `?` = one character, everything else literal)?
pub fn is_ignored(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

fn glob_match(pattern: &str, name: &str) -> bool {
    if pattern.is_ascii() && name.is_ascii() {
        glob_slices(pattern.as_bytes(), name.as_bytes())
    } else {
        let p: Vec<char> = pattern.chars().collect();
        let s: Vec<char> = name.chars().collect();
        glob_slices(&p, &s)
    }
}

/// `*`/`?` matching with single-star backtracking (linear in practice).
fn glob_slices<T: PartialEq + Copy + From<u8>>(p: &[T], s: &[T]) -> bool {
    let (any, one) = (T::from(b'*'), T::from(b'?'));
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None; // (pattern index after '*', name index)
    while si < s.len() {
        if pi < p.len() && p[pi] == any {
            star = Some((pi + 1, si));
            pi += 1;
        } else if pi < p.len() && (p[pi] == one || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == any)
}

enum Msg {
    Event(Event),
    NotifyError(notify::Error),
    Rescan,
    Forget(PathBuf),
    Stop,
}

/// Watches drop directories; reports complete files on the channel given to
/// [`Watcher::start`]. Dropping it stops it too.
pub struct Watcher {
    notify: Option<notify::RecommendedWatcher>,
    ctl: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    /// Watch `dirs` (each must be an existing directory) and report on `out`.
    /// `out` should be unbounded, or drained promptly: the worker blocks while
    /// it is full. Paths are reported under the canonical form of the
    /// directories ([`canonical_dirs`]): inotify reports absolute paths, so a
    /// relative or symlinked root would match none of its events.
    pub fn start(
        dirs: &[PathBuf],
        opts: WatchOptions,
        out: Sender<Ready>,
    ) -> Result<Watcher, WatchError> {
        let dirs = &canonical_dirs(dirs)?;
        for d in dirs {
            match fs::metadata(d) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(WatchError::NotADirectory {
                        path: d.clone(),
                        cause: None,
                    })
                }
                Err(e) => {
                    return Err(WatchError::NotADirectory {
                        path: d.clone(),
                        cause: Some(e),
                    })
                }
            }
        }
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let handler = {
            let tx = tx.clone();
            let overflow = Arc::clone(&overflow);
            move |res: notify::Result<Event>| {
                let msg = match res {
                    Ok(ev) => Msg::Event(ev),
                    Err(e) => Msg::NotifyError(e),
                };
                match tx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => overflow.store(true, Ordering::Release),
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
        };
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut nw = notify::RecommendedWatcher::new(handler, config)
            .map_err(|cause| WatchError::Notify { path: None, cause })?;
        let mode = if opts.recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        for d in dirs {
            nw.watch(d, mode).map_err(|cause| WatchError::Notify {
                path: Some(d.clone()),
                cause,
            })?;
        }
        let mut worker = Worker::new(dirs.to_vec(), opts, out, rx, overflow);
        let thread = std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || worker.run())
            .map_err(WatchError::Thread)?;
        Ok(Watcher {
            notify: Some(nw),
            ctl: tx,
            thread: Some(thread),
        })
    }

    /// Walk the directories again now (e.g. after SIGHUP).
    pub fn rescan_now(&self) {
        let _ = self.ctl.send(Msg::Rescan);
    }

    /// Forget that `path` (as reported) was reported, so that the next
    /// rescan judges it again and reports it once it is stable — for a file
    /// whose handling failed and must be redone (a journal write that did
    /// not go through).
    pub fn forget(&self, path: PathBuf) {
        let _ = self.ctl.send(Msg::Forget(path));
    }

    /// Stop watching; returns once the worker thread has ended.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // notify first, so no new events; then the worker.
        drop(self.notify.take());
        let _ = self.ctl.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("watch: worker thread panicked");
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------- the worker

/// What the events say about a file not yet reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Created, no write seen yet (a writer about to write, or a hard link).
    Created,
    /// Written since its last close: wait for the close, however long.
    Writing,
    /// Closed after writing: wait for `settle` of stillness.
    Closed,
    /// Known from a rescan only: judged by size/mtime stability.
    Scanned,
}

#[derive(Debug)]
struct Track {
    phase: Phase,
    /// Last observed size and mtime (not updated by `Modify` events).
    size: u64,
    mtime_ns: i64,
    /// When that size+mtime was first observed.
    seen: Instant,
    /// Last change seen (event or a different stat).
    last_change: Instant,
    /// Start of the current busy period.
    busy_since: Instant,
    too_busy_reported: bool,
    deadline: Option<Instant>,
    /// Rescan generation that last saw it.
    gen: u32,
}

#[derive(Debug, Clone, Copy)]
struct Emitted {
    size: u64,
    mtime_ns: i64,
    gen: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    File(PathBuf),
    Dir(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanKind {
    /// The first walk: files already old enough are reported at once.
    Startup,
    /// Any other walk: two observations `settle` apart.
    Later,
}

struct Worker {
    roots: Vec<PathBuf>,
    opts: WatchOptions,
    out: Sender<Ready>,
    rx: Receiver<Msg>,
    overflow: Arc<AtomicBool>,
    files: HashMap<PathBuf, Track>,
    emitted: HashMap<PathBuf, Emitted>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    next_rescan: Option<Instant>,
    gen: u32,
    /// Roots reported missing (reported once until they come back).
    missing: Vec<PathBuf>,
    /// Start-up candidates: old enough at the first walk.
    candidates: Vec<(PathBuf, u64, i64)>,
    rescan_requested: bool,
    stopped: bool,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn dur_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Worker {
    fn new(
        roots: Vec<PathBuf>,
        opts: WatchOptions,
        out: Sender<Ready>,
        rx: Receiver<Msg>,
        overflow: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            roots,
            opts,
            out,
            rx,
            overflow,
            files: HashMap::new(),
            emitted: HashMap::new(),
            timers: BinaryHeap::new(),
            next_rescan: None,
            gen: 0,
            missing: Vec::new(),
            candidates: Vec::new(),
            rescan_requested: false,
            stopped: false,
        }
    }

    fn run(&mut self) {
        self.startup();
        while !self.stopped {
            if self.overflow.swap(false, Ordering::AcqRel) {
                log::warn!("watch: event queue overflowed; rescanning");
                self.events_lost();
            }
            if std::mem::take(&mut self.rescan_requested) {
                self.full_rescan();
            }
            // Events already waiting go before deadlines: a write queued
            // behind a deadline must be seen before that deadline is judged.
            for _ in 0..1024 {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => break,
                }
                if self.stopped {
                    return;
                }
            }
            let now = Instant::now();
            self.fire_timers(now);
            if self.next_rescan.is_some_and(|t| t <= now) {
                self.full_rescan();
            }
            if self.stopped || self.rescan_requested || self.overflow.load(Ordering::Acquire) {
                continue;
            }
            let next = [
                self.timers.peek().map(|Reverse((t, _))| *t),
                self.next_rescan,
            ]
            .into_iter()
            .flatten()
            .min();
            let msg = match next {
                Some(t) => match self
                    .rx
                    .recv_timeout(t.saturating_duration_since(Instant::now()))
                {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
            };
            self.handle(msg);
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Event(ev) => self.on_event(ev),
            Msg::NotifyError(e) => {
                let paths: Vec<String> = e.paths.iter().map(|p| p.display().to_string()).collect();
                let msg = if paths.is_empty() {
                    format!("watch: {e}")
                } else {
                    format!("{}: watch: {e}", paths.join(", "))
                };
                log::error!("{msg}");
                self.send(Ready::Error(msg));
            }
            Msg::Rescan => self.rescan_requested = true,
            Msg::Forget(p) => {
                self.emitted.remove(&p);
            }
            Msg::Stop => self.stopped = true,
        }
    }

    fn send(&mut self, r: Ready) {
        if self.out.send(r).is_err() {
            log::debug!("watch: nobody listens any more; stopping");
            self.stopped = true;
        }
    }

    fn schedule_rescan(&mut self) {
        self.next_rescan = if self.opts.rescan.is_zero() {
            None
        } else {
            Some(Instant::now() + self.opts.rescan)
        };
    }

    // ------------------------------------------------------------ start-up

    /// Walk everything once; report what is already old enough, unless an
    /// event that arrived meanwhile shows it being written.
    fn startup(&mut self) {
        let started = Instant::now();
        self.gen = self.gen.wrapping_add(1);
        let mut complete = true;
        for root in self.roots.clone() {
            complete &= self.walk(&root, ScanKind::Startup);
        }
        if complete {
            self.prune();
        }
        let candidates = std::mem::take(&mut self.candidates);
        // events that came in during the walk (bounded: a writer producing
        // events without pause must not hold the start-up back)
        for _ in 0..EVENT_QUEUE {
            let Ok(m) = self.rx.try_recv() else {
                break;
            };
            self.handle(m);
            if self.stopped {
                return;
            }
        }
        let n = candidates.len();
        for (path, size, mtime) in candidates {
            if self.files.contains_key(&path) || self.stopped {
                continue; // an event is tracking it now
            }
            self.emit(path, size, mtime, How::Rescan);
        }
        log::debug!(
            "watch: start-up scan: {} ready, {} to settle, in {:.0} ms",
            n,
            self.files.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        self.schedule_rescan();
    }

    // ------------------------------------------------------------ events

    fn root_of(&self, p: &Path) -> Option<&Path> {
        self.roots
            .iter()
            .filter(|r| p.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
            .map(|r| r.as_path())
    }

    /// Under a root, not the root itself, no ignored component, and at the
    /// top level when not recursive.
    fn admissible(&self, p: &Path) -> bool {
        let Some(root) = self.root_of(p) else {
            return false;
        };
        let Ok(rel) = p.strip_prefix(root) else {
            return false;
        };
        let mut n = 0;
        for c in rel.components() {
            match c {
                Component::Normal(name) => {
                    if is_ignored(&name.to_string_lossy(), &self.opts.ignore) {
                        return false;
                    }
                }
                _ => return false,
            }
            n += 1;
        }
        n == 1 || (n > 1 && self.opts.recursive)
    }

    fn is_root(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| r == p)
    }

    fn on_event(&mut self, ev: Event) {
        log::trace!("watch: event {:?} {:?}", ev.kind, ev.paths);
        if ev.need_rescan() {
            log::warn!("watch: inotify queue overflowed; rescanning");
            self.events_lost();
            return;
        }
        let now = Instant::now();
        for path in ev.paths {
            if self.is_root(&path) {
                if matches!(
                    ev.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
                ) {
                    self.root_gone(&path, "was removed or moved away");
                }
                continue;
            }
            match ev.kind {
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                    self.files.remove(&path);
                }
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {} // From + To come too
                EventKind::Modify(ModifyKind::Name(_)) => self.renamed_in(path, now),
                EventKind::Create(kind) => self.created(path, kind, now),
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => self.closed(path, now),
                EventKind::Modify(ModifyKind::Metadata(_)) => self.touched(&path, now),
                EventKind::Modify(_) => self.written(path, now),
                _ => {}
            }
        }
    }

    fn renamed_in(&mut self, path: PathBuf, now: Instant) {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            self.files.remove(&path); // already gone again
            return;
        };
        if meta.is_dir() {
            self.new_dir(path, now);
        } else if meta.is_file() && self.admissible(&path) {
            self.files.remove(&path);
            self.emit(path, meta.len(), mtime_ns(&meta), How::RenamedIn);
        }
    }

    fn created(&mut self, path: PathBuf, kind: CreateKind, now: Instant) {
        let meta = fs::symlink_metadata(&path);
        let is_dir = match &meta {
            Ok(m) => m.is_dir(),
            Err(_) => kind == CreateKind::Folder,
        };
        if is_dir {
            self.new_dir(path, now);
            return;
        }
        let Ok(meta) = meta else {
            return; // gone already
        };
        if !meta.is_file() || !self.admissible(&path) {
            return;
        }
        let deadline = now + self.opts.settle;
        self.change(&path, now, Some((meta.len(), mtime_ns(&meta))));
        if let Some(t) = self.files.get_mut(&path) {
            t.phase = Phase::Created;
            t.deadline = Some(deadline);
        }
        self.timers.push(Reverse((deadline, Timer::File(path))));
    }

    fn written(&mut self, path: PathBuf, now: Instant) {
        if !self.files.contains_key(&path) && !self.admissible(&path) {
            return;
        }
        self.change(&path, now, None);
        if let Some(t) = self.files.get_mut(&path) {
            t.phase = Phase::Writing;
            t.deadline = None;
        }
    }

    fn closed(&mut self, path: PathBuf, now: Instant) {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            self.files.remove(&path);
            return;
        };
        if !meta.is_file() || !self.admissible(&path) {
            return;
        }
        let deadline = now + self.opts.settle;
        self.change(&path, now, Some((meta.len(), mtime_ns(&meta))));
        if let Some(t) = self.files.get_mut(&path) {
            t.phase = Phase::Closed;
            t.deadline = Some(deadline);
        }
        self.timers.push(Reverse((deadline, Timer::File(path))));
    }

    /// chmod/utime: a file being settled starts settling again.
    fn touched(&mut self, path: &Path, now: Instant) {
        let deadline = now + self.opts.settle;
        let Some(t) = self.files.get_mut(path) else {
            return;
        };
        if t.phase != Phase::Writing {
            t.deadline = Some(deadline);
            self.timers
                .push(Reverse((deadline, Timer::File(path.to_path_buf()))));
        }
    }

    /// Record a change of `path` (creating its track), with its new size and
    /// mtime if known; report it once if it has been busy too long.
    fn change(&mut self, path: &Path, now: Instant, stat: Option<(u64, i64)>) {
        let settle = self.opts.settle;
        let gen = self.gen;
        let t = self
            .files
            .entry(path.to_path_buf())
            .or_insert_with(|| Track {
                phase: Phase::Writing,
                size: 0,
                mtime_ns: 0,
                seen: now,
                last_change: now,
                busy_since: now,
                too_busy_reported: false,
                deadline: None,
                gen,
            });
        // A pause of more than two settle periods ends a busy period.
        if now.saturating_duration_since(t.last_change) > settle * 2 {
            t.busy_since = now;
            t.too_busy_reported = false;
        }
        t.last_change = now;
        if let Some((size, mtime)) = stat {
            if (size, mtime) != (t.size, t.mtime_ns) {
                t.size = size;
                t.mtime_ns = mtime;
                t.seen = now;
            }
        }
        let busy = now.saturating_duration_since(t.busy_since);
        let max = self.opts.max_settle;
        if !max.is_zero() && busy > max && !t.too_busy_reported {
            t.too_busy_reported = true;
            log::warn!(
                "{}: still changing after {:.1}s; not reported as complete",
                path.display(),
                busy.as_secs_f64()
            );
            self.send(Ready::TooBusy {
                path: path.to_path_buf(),
                for_: busy,
            });
        }
    }

    fn new_dir(&mut self, dir: PathBuf, now: Instant) {
        if !self.opts.recursive || !self.admissible(&dir) {
            return;
        }
        log::debug!("{}: new directory; scanning it", dir.display());
        self.walk(&dir, ScanKind::Later);
        for d in NEW_DIR_FOLLOW_UPS {
            self.timers
                .push(Reverse((now + d, Timer::Dir(dir.clone()))));
        }
    }

    fn root_gone(&mut self, root: &Path, why: &str) {
        if self.missing.iter().any(|m| m == root) {
            return;
        }
        self.missing.push(root.to_path_buf());
        let msg = format!("{}: watched directory {why}", root.display());
        log::error!("{msg}");
        self.send(Ready::Error(msg));
    }

    // ------------------------------------------------------------ deadlines

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now || self.stopped {
                break;
            }
            let Some(Reverse((t, timer))) = self.timers.pop() else {
                break;
            };
            match timer {
                Timer::Dir(d) => {
                    if fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
                        self.walk(&d, ScanKind::Later);
                    }
                }
                Timer::File(p) => {
                    if self.files.get(&p).and_then(|tr| tr.deadline) == Some(t) {
                        self.judge_due(p, now);
                    }
                }
            }
        }
    }

    /// A file's deadline has come: stat it and decide.
    fn judge_due(&mut self, path: PathBuf, now: Instant) {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => m,
            _ => {
                self.files.remove(&path);
                return;
            }
        };
        let (size, mtime) = (meta.len(), mtime_ns(&meta));
        let settle = self.opts.settle;
        let Some(t) = self.files.get(&path) else {
            return;
        };
        if (size, mtime) != (t.size, t.mtime_ns) {
            self.change(&path, now, Some((size, mtime)));
            self.set_deadline(path, now + settle);
            return;
        }
        let age_ns = now_ns().saturating_sub(mtime);
        // an mtime in the future (clock skew) proves nothing either way
        let old_enough = age_ns >= dur_ns(settle) || age_ns < 0;
        match t.phase {
            Phase::Writing => {}
            Phase::Closed => self.emit(path, size, mtime, How::Settled),
            Phase::Created if size == 0 => {
                // opened, nothing written yet: wait for its events
                if let Some(t) = self.files.get_mut(&path) {
                    t.deadline = None;
                }
            }
            Phase::Created | Phase::Scanned => {
                let still_for = now.saturating_duration_since(t.seen);
                if still_for >= settle && old_enough {
                    let how = if t.phase == Phase::Created {
                        How::Settled
                    } else {
                        How::Rescan
                    };
                    self.emit(path, size, mtime, how);
                } else {
                    let to_age = Duration::from_nanos(
                        u64::try_from(dur_ns(settle).saturating_sub(age_ns)).unwrap_or(0),
                    );
                    let wait = settle
                        .saturating_sub(still_for)
                        .max(to_age)
                        .max(Duration::from_millis(1));
                    self.set_deadline(path, now + wait);
                }
            }
        }
    }

    fn set_deadline(&mut self, path: PathBuf, at: Instant) {
        if let Some(t) = self.files.get_mut(&path) {
            t.deadline = Some(at);
            self.timers.push(Reverse((at, Timer::File(path))));
        }
    }

    fn emit(&mut self, path: PathBuf, size: u64, mtime: i64, how: How) {
        self.files.remove(&path);
        let gen = self.gen;
        if let Some(e) = self.emitted.get_mut(&path) {
            if (e.size, e.mtime_ns) == (size, mtime) {
                e.gen = gen;
                return;
            }
        }
        self.emitted.insert(
            path.clone(),
            Emitted {
                size,
                mtime_ns: mtime,
                gen,
            },
        );
        log::debug!("{}: complete ({how}), {size} bytes", path.display());
        self.send(Ready::File {
            path,
            size,
            mtime_ns: mtime,
            how,
        });
    }

    // ------------------------------------------------------------ rescans

    /// Events were lost: closes may be among them, so files waiting for one
    /// fall back to being judged by stability, and everything is walked.
    fn events_lost(&mut self) {
        let now = Instant::now();
        let settle = self.opts.settle;
        let mut due = Vec::new();
        for (p, t) in self.files.iter_mut() {
            if matches!(t.phase, Phase::Writing | Phase::Created) {
                t.phase = Phase::Scanned;
                t.seen = now;
                t.deadline = Some(now + settle);
                due.push(p.clone());
            }
        }
        for p in due {
            self.timers.push(Reverse((now + settle, Timer::File(p))));
        }
        self.full_rescan();
    }

    fn full_rescan(&mut self) {
        let started = Instant::now();
        self.gen = self.gen.wrapping_add(1);
        let mut complete = true;
        for root in self.roots.clone() {
            complete &= self.walk(&root, ScanKind::Later);
        }
        if complete {
            self.prune();
        }
        log::debug!(
            "watch: rescan in {:.0} ms; {} pending, {} reported",
            started.elapsed().as_secs_f64() * 1000.0,
            self.files.len(),
            self.emitted.len()
        );
        self.schedule_rescan();
    }

    /// Forget files not seen by the last complete walk.
    fn prune(&mut self) {
        let gen = self.gen;
        self.emitted.retain(|_, e| e.gen == gen);
        self.files.retain(|_, t| t.gen == gen);
        if self.emitted.capacity() > 4 * self.emitted.len().max(1024) {
            self.emitted.shrink_to_fit();
        }
    }

    /// Walk `start` (recursively if configured). Returns whether every
    /// directory could be read.
    fn walk(&mut self, start: &Path, kind: ScanKind) -> bool {
        let mut complete = true;
        let mut stack = vec![start.to_path_buf()];
        let now = Instant::now();
        let now_sys = now_ns();
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => {
                    if self.is_root(&dir) {
                        self.missing.retain(|m| m != &dir);
                    }
                    rd
                }
                Err(e) => {
                    complete = false;
                    if self.is_root(&dir) {
                        self.root_gone(&dir.clone(), &format!("cannot be read: {e}"));
                    } else if e.kind() != io::ErrorKind::NotFound {
                        log::warn!("{}: cannot scan: {e}", dir.display());
                    }
                    continue;
                }
            };
            for entry in rd {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        log::warn!("{}: cannot scan: {e}", dir.display());
                        complete = false;
                        break;
                    }
                };
                let name = entry.file_name();
                if is_ignored(&name.to_string_lossy(), &self.opts.ignore) {
                    continue;
                }
                let Ok(ft) = entry.file_type() else {
                    continue;
                };
                if ft.is_dir() {
                    if self.opts.recursive {
                        stack.push(entry.path());
                    }
                    continue;
                }
                if !ft.is_file() {
                    continue; // symlinks, fifos, sockets, devices
                }
                let Ok(meta) = entry.metadata() else {
                    continue; // vanished
                };
                self.judge_scanned(
                    entry.path(),
                    meta.len(),
                    mtime_ns(&meta),
                    kind,
                    now,
                    now_sys,
                );
                if self.stopped {
                    return false;
                }
            }
        }
        complete
    }

    /// A file seen by a walk.
    fn judge_scanned(
        &mut self,
        path: PathBuf,
        size: u64,
        mtime: i64,
        kind: ScanKind,
        now: Instant,
        now_sys: i64,
    ) {
        let gen = self.gen;
        let settle = self.opts.settle;
        if let Some(e) = self.emitted.get_mut(&path) {
            if (e.size, e.mtime_ns) == (size, mtime) {
                e.gen = gen;
                if !self.files.contains_key(&path) {
                    return;
                }
            } else {
                // changed since it was reported: forget that, judge anew
                self.emitted.remove(&path);
            }
        }
        if let Some(t) = self.files.get_mut(&path) {
            t.gen = gen;
            if (size, mtime) != (t.size, t.mtime_ns) {
                let writing = t.phase == Phase::Writing;
                self.change(&path, now, Some((size, mtime)));
                if !writing {
                    self.set_deadline(path, now + settle);
                }
            }
            return;
        }
        let age_ns = now_sys.saturating_sub(mtime);
        if kind == ScanKind::Startup && age_ns >= dur_ns(settle) {
            self.candidates.push((path, size, mtime));
            return;
        }
        let wait_age = u64::try_from(dur_ns(settle).saturating_sub(age_ns).max(0)).unwrap_or(0);
        let deadline = now + settle.max(Duration::from_nanos(wait_age));
        self.files.insert(
            path.clone(),
            Track {
                phase: Phase::Scanned,
                size,
                mtime_ns: mtime,
                seen: now,
                last_change: now,
                busy_since: now,
                too_busy_reported: false,
                deadline: Some(deadline),
                gen,
            },
        );
        self.timers.push(Reverse((deadline, Timer::File(path))));
    }
}

// ---------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LONG: Duration = Duration::from_secs(20);

    fn opts(settle_ms: u64) -> WatchOptions {
        WatchOptions {
            recursive: true,
            settle: Duration::from_millis(settle_ms),
            rescan: Duration::from_secs(60),
            max_settle: Duration::from_secs(600),
            ignore: vec![".*".into(), "*.part".into(), "*~".into()],
        }
    }

    fn start(dir: &Path, o: WatchOptions) -> (Watcher, Receiver<Ready>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let w = Watcher::start(&[dir.to_path_buf()], o, tx).unwrap();
        (w, rx)
    }

    /// Next `Ready::File`, skipping nothing else silently.
    fn next_file(rx: &Receiver<Ready>, within: Duration) -> (PathBuf, u64, How) {
        match rx.recv_timeout(within) {
            Ok(Ready::File {
                path, size, how, ..
            }) => (path, size, how),
            other => panic!("expected a file, got {other:?}"),
        }
    }

    fn nothing_more(rx: &Receiver<Ready>, within: Duration) {
        if let Ok(r) = rx.recv_timeout(within) {
            panic!("unexpected: {r:?}");
        }
    }

    fn set_old_mtime(p: &Path, secs_ago: u64) {
        let f = fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago))
            .unwrap();
    }

    #[test]
    fn glob_patterns_match_base_names() {
        let pats: Vec<String> = [".*", "*.part", "*~", "tmp?.bin"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(is_ignored(".hidden", &pats));
        assert!(is_ignored(".x.part", &pats));
        assert!(is_ignored("app.tar.gz.part", &pats));
        assert!(is_ignored("notes~", &pats));
        assert!(is_ignored("tmp1.bin", &pats));
        assert!(!is_ignored("tmp12.bin", &pats));
        assert!(!is_ignored("app.tar.gz", &pats));
        assert!(!is_ignored("part", &pats));
        assert!(!is_ignored("x.partial", &pats));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("**x", "yx"));
        assert!(!is_ignored("anything", &[]));
    }

    #[test]
    fn a_forgotten_file_is_reported_again_by_the_next_rescan() {
        let dropdir = tempfile::tempdir().unwrap();
        let p = dropdir.path().join("redo-1.pkg");
        fs::write(&p, b"x").unwrap();
        set_old_mtime(&p, 60);
        let (w, rx) = start(dropdir.path(), opts(100));
        let (got, _, how) = next_file(&rx, LONG);
        assert_eq!((got.as_path(), how), (p.as_path(), How::Rescan));
        // a rescan alone does not report it twice
        w.rescan_now();
        nothing_more(&rx, Duration::from_millis(600));
        w.forget(p.clone());
        w.rescan_now();
        let (again, _, _) = next_file(&rx, LONG);
        assert_eq!(again, p);
        w.stop();
    }

    #[test]
    fn watched_dirs_are_reported_under_their_canonical_paths() {
        let base = tempfile::tempdir().unwrap();
        let real = base.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let canon = fs::canonicalize(&real).unwrap();
        let dirs = canonical_dirs(&[link.clone(), real.join("."), real.clone()]).unwrap();
        assert_eq!(dirs, vec![canon.clone()], "resolved and deduplicated");
        let (w, rx) = start(&link, opts(100));
        let src = base.path().join("moved-1.pkg");
        fs::write(&src, b"m").unwrap();
        fs::rename(&src, real.join("moved-1.pkg")).unwrap();
        let (p, _, how) = next_file(&rx, LONG);
        assert_eq!((p, how), (canon.join("moved-1.pkg"), How::RenamedIn));
        w.stop();
    }

    #[test]
    fn start_fails_for_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let missing = dir.path().join("nope");
        let e = Watcher::start(std::slice::from_ref(&missing), opts(100), tx).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn renamed_in_file_is_reported_at_once() {
        let dropdir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let (w, rx) = start(dropdir.path(), opts(5000));
        let src = elsewhere.path().join("app-1.0.tar.gz");
        fs::write(&src, vec![7u8; 4096]).unwrap();
        let t0 = Instant::now();
        fs::rename(&src, dropdir.path().join("app-1.0.tar.gz")).unwrap();
        let (p, size, how) = next_file(&rx, LONG);
        let took = t0.elapsed();
        assert_eq!(p, dropdir.path().join("app-1.0.tar.gz"));
        assert_eq!((size, how), (4096, How::RenamedIn));
        assert!(took < Duration::from_secs(1), "took {took:?}");
        w.stop();
    }

    #[test]
    fn slow_writer_is_reported_once_after_close_with_final_size() {
        let dropdir = tempfile::tempdir().unwrap();
        // settle shorter than the pauses: only the open file keeps it back
        let (w, rx) = start(dropdir.path(), opts(150));
        let path = dropdir.path().join("slow.bin");
        let mut f = fs::File::create(&path).unwrap();
        let chunk = vec![1u8; 2 * 1024 * 1024];
        for _ in 0..5 {
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
            // the writer's own pace, not a wait for the watcher
            std::thread::sleep(Duration::from_millis(300)); // writer pacing, not a poll
            assert!(rx.try_recv().is_err(), "reported while still open");
        }
        drop(f);
        let (p, size, how) = next_file(&rx, LONG);
        assert_eq!(p, path);
        assert_eq!(size, 5 * chunk.len() as u64);
        assert_eq!(how, How::Settled);
        nothing_more(&rx, Duration::from_millis(600));
        w.stop();
    }

    #[test]
    fn cp_like_write_is_reported_after_settle() {
        let dropdir = tempfile::tempdir().unwrap();
        let (w, rx) = start(dropdir.path(), opts(300));
        let path = dropdir.path().join("db-2.zip");
        fs::write(&path, vec![3u8; 5_000_000]).unwrap();
        let (p, size, how) = next_file(&rx, LONG);
        assert_eq!((p, size, how), (path, 5_000_000, How::Settled));
        w.stop();
    }

    #[test]
    fn ignored_part_file_is_not_reported_but_its_rename_is() {
        let dropdir = tempfile::tempdir().unwrap();
        let (w, rx) = start(dropdir.path(), opts(200));
        let part = dropdir.path().join(".x.part");
        fs::write(&part, b"payload").unwrap();
        nothing_more(&rx, Duration::from_millis(800));
        fs::rename(&part, dropdir.path().join("x")).unwrap();
        let (p, size, how) = next_file(&rx, LONG);
        assert_eq!(
            (p, size, how),
            (dropdir.path().join("x"), 7, How::RenamedIn)
        );
        nothing_more(&rx, Duration::from_millis(500));
        w.stop();
    }

    #[test]
    fn files_inside_ignored_directories_are_not_reported() {
        let dropdir = tempfile::tempdir().unwrap();
        let (w, rx) = start(dropdir.path(), opts(100));
        fs::create_dir(dropdir.path().join(".git")).unwrap();
        fs::write(dropdir.path().join(".git/config"), b"x").unwrap();
        fs::write(dropdir.path().join("real"), b"y").unwrap();
        let (p, ..) = next_file(&rx, LONG);
        assert_eq!(p, dropdir.path().join("real"));
        nothing_more(&rx, Duration::from_millis(600));
        w.stop();
    }

    #[test]
    fn a_new_directory_with_fifty_files_is_reported_completely() {
        let dropdir = tempfile::tempdir().unwrap();
        let (w, rx) = start(dropdir.path(), opts(200));
        let sub = dropdir.path().join("batch");
        fs::create_dir(&sub).unwrap();
        for i in 0..50 {
            fs::write(sub.join(format!("f{i:02}.dat")), vec![i as u8; 1000 + i]).unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 50 {
            let (p, size, _) = next_file(&rx, LONG);
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let i: usize = name[1..3].parse().unwrap();
            assert_eq!(size, 1000 + i as u64);
            assert!(seen.insert(name), "reported twice: {p:?}");
        }
        nothing_more(&rx, Duration::from_millis(600));
        w.stop();
    }

    #[test]
    fn a_directory_moved_in_reports_both_files() {
        let dropdir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let prepared = elsewhere.path().join("spool-1");
        fs::create_dir(&prepared).unwrap();
        fs::write(prepared.join("a.rpm"), b"aaaa").unwrap();
        fs::write(prepared.join("b.rpm"), b"bb").unwrap();
        let (w, rx) = start(dropdir.path(), opts(200));
        fs::rename(&prepared, dropdir.path().join("spool-1")).unwrap();
        let mut got = [next_file(&rx, LONG), next_file(&rx, LONG)];
        got.sort();
        let d = dropdir.path().join("spool-1");
        assert_eq!(got[0].0, d.join("a.rpm"));
        assert_eq!(got[0].1, 4);
        assert_eq!(got[1].0, d.join("b.rpm"));
        assert_eq!(got[1].1, 2);
        nothing_more(&rx, Duration::from_millis(500));
        w.stop();
    }

    #[test]
    fn stable_files_present_at_start_are_reported_by_the_start_rescan() {
        let dropdir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            let p = dropdir.path().join(format!("old{i}.tgz"));
            fs::write(&p, b"old").unwrap();
            set_old_mtime(&p, 3600);
        }
        fs::write(dropdir.path().join(".hidden"), b"h").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dropdir.path().join("link")).unwrap();
        let young = dropdir.path().join("young.tgz");
        fs::write(&young, b"new").unwrap();
        let t0 = Instant::now();
        let (w, rx) = start(dropdir.path(), opts(1500));
        let mut old = Vec::new();
        for _ in 0..3 {
            let (p, _, how) = next_file(&rx, LONG);
            assert_eq!(how, How::Rescan);
            old.push(p);
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        old.sort();
        assert_eq!(old[0], dropdir.path().join("old0.tgz"));
        // the young one only once it has been still for `settle`
        let (p, size, how) = next_file(&rx, LONG);
        assert_eq!((p, size, how), (young, 3, How::Rescan));
        assert!(t0.elapsed() >= Duration::from_millis(1500));
        nothing_more(&rx, Duration::from_millis(500));
        // a rescan reports nothing already reported
        w.rescan_now();
        nothing_more(&rx, Duration::from_millis(500));
        w.stop();
    }

    #[test]
    fn a_file_that_keeps_changing_is_reported_too_busy_then_complete() {
        let dropdir = tempfile::tempdir().unwrap();
        let mut o = opts(300);
        o.max_settle = Duration::from_millis(600);
        let (w, rx) = start(dropdir.path(), o);
        let path = dropdir.path().join("log.txt");
        let mut f = fs::File::create(&path).unwrap();
        let writer_done = Instant::now() + Duration::from_millis(1500);
        let mut busy = None;
        while Instant::now() < writer_done {
            f.write_all(b"line\n").unwrap();
            if let Ok(r) = rx.recv_timeout(Duration::from_millis(50)) {
                assert!(busy.is_none(), "second report: {r:?}");
                busy = Some(r);
            }
        }
        drop(f);
        match busy {
            Some(Ready::TooBusy { path: p, for_ }) => {
                assert_eq!(p, path);
                assert!(for_ > Duration::from_millis(600));
            }
            other => panic!("expected TooBusy, got {other:?}"),
        }
        let (p, _, how) = next_file(&rx, LONG);
        assert_eq!((p, how), (path, How::Settled));
        w.stop();
    }

    #[test]
    fn non_recursive_watch_ignores_subdirectories() {
        let dropdir = tempfile::tempdir().unwrap();
        let mut o = opts(100);
        o.recursive = false;
        fs::create_dir(dropdir.path().join("sub")).unwrap();
        let old = dropdir.path().join("sub/old.bin");
        fs::write(&old, b"o").unwrap();
        set_old_mtime(&old, 3600);
        let (w, rx) = start(dropdir.path(), o);
        fs::write(dropdir.path().join("sub/new.bin"), b"n").unwrap();
        fs::write(dropdir.path().join("top.bin"), b"t").unwrap();
        let (p, ..) = next_file(&rx, LONG);
        assert_eq!(p, dropdir.path().join("top.bin"));
        nothing_more(&rx, Duration::from_millis(500));
        w.stop();
    }

    #[test]
    fn symlinks_are_skipped() {
        let dropdir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("t.bin");
        fs::write(&target, b"t").unwrap();
        let (w, rx) = start(dropdir.path(), opts(100));
        std::os::unix::fs::symlink(&target, dropdir.path().join("l.bin")).unwrap();
        // moved-in symlink too
        std::os::unix::fs::symlink(&target, elsewhere.path().join("m.bin")).unwrap();
        fs::rename(elsewhere.path().join("m.bin"), dropdir.path().join("m.bin")).unwrap();
        fs::write(dropdir.path().join("real.bin"), b"r").unwrap();
        let (p, ..) = next_file(&rx, LONG);
        assert_eq!(p, dropdir.path().join("real.bin"));
        nothing_more(&rx, Duration::from_millis(500));
        w.stop();
    }

    #[test]
    fn rewritten_file_is_reported_again_with_its_new_size() {
        let dropdir = tempfile::tempdir().unwrap();
        let (w, rx) = start(dropdir.path(), opts(150));
        let path = dropdir.path().join("pkg.war");
        fs::write(&path, b"one").unwrap();
        assert_eq!(next_file(&rx, LONG).1, 3);
        fs::write(&path, b"second").unwrap();
        assert_eq!(next_file(&rx, LONG), (path, 6, How::Settled));
        w.stop();
    }

    #[test]
    fn a_hard_link_into_the_drop_dir_is_reported() {
        let dropdir = tempfile::tempdir().unwrap();
        let src = dropdir.path().join(".staging");
        fs::create_dir(&src).unwrap();
        let orig = src.join("h.bin");
        fs::write(&orig, b"linked").unwrap();
        set_old_mtime(&orig, 60);
        let marker = dropdir.path().join("marker");
        fs::write(&marker, b"m").unwrap();
        set_old_mtime(&marker, 60);
        let (w, rx) = start(dropdir.path(), opts(200));
        assert_eq!(next_file(&rx, LONG).0, marker); // start-up scan done
                                                    // inotify gives only IN_CREATE for a link: no write, no close
        fs::hard_link(&orig, dropdir.path().join("h.bin")).unwrap();
        assert_eq!(
            next_file(&rx, LONG),
            (dropdir.path().join("h.bin"), 6, How::Settled)
        );
        w.stop();
    }

    #[test]
    fn removing_the_watched_directory_is_reported_as_an_error() {
        let parent = tempfile::tempdir().unwrap();
        let d = parent.path().join("drop");
        fs::create_dir(&d).unwrap();
        let (w, rx) = start(&d, opts(100));
        fs::remove_dir(&d).unwrap();
        match rx.recv_timeout(LONG) {
            Ok(Ready::Error(m)) => assert!(m.contains("drop"), "{m}"),
            other => panic!("expected an error, got {other:?}"),
        }
        w.stop();
    }

    /// Drive the worker without notify, with made-up events.
    fn worker(dir: &Path, o: WatchOptions) -> (Sender<Msg>, Receiver<Ready>, JoinHandle<()>) {
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        let (out, ready) = crossbeam_channel::unbounded();
        let overflow = Arc::new(AtomicBool::new(false));
        let mut w = Worker::new(vec![dir.to_path_buf()], o, out, rx, overflow);
        (tx, ready, std::thread::spawn(move || w.run()))
    }

    fn ev(kind: EventKind, p: &Path) -> Msg {
        Msg::Event(Event::new(kind).add_path(p.to_path_buf()))
    }

    #[test]
    fn after_an_overflow_a_file_waiting_for_its_close_is_judged_by_stability() {
        use notify::event::{DataChange, Flag};
        let dropdir = tempfile::tempdir().unwrap();
        let (tx, rx, h) = worker(dropdir.path(), opts(200));
        let p = dropdir.path().join("lost-close.bin");
        fs::write(&p, b"complete").unwrap();
        tx.send(ev(EventKind::Create(CreateKind::File), &p))
            .unwrap();
        tx.send(ev(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &p))
            .unwrap();
        // the close was lost: nothing, however long it stays still
        nothing_more(&rx, Duration::from_millis(1000));
        tx.send(Msg::Event(
            Event::new(EventKind::Other).set_flag(Flag::Rescan),
        ))
        .unwrap();
        assert_eq!(next_file(&rx, LONG), (p, 8, How::Rescan));
        tx.send(Msg::Stop).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn rescan_now_finds_files_that_no_event_announced() {
        let dropdir = tempfile::tempdir().unwrap();
        let marker = dropdir.path().join("marker");
        fs::write(&marker, b"m").unwrap();
        set_old_mtime(&marker, 60);
        let (tx, rx, h) = worker(dropdir.path(), opts(200));
        assert_eq!(next_file(&rx, LONG).0, marker); // start-up scan done
        let p = dropdir.path().join("unannounced.bin");
        fs::write(&p, b"abc").unwrap();
        nothing_more(&rx, Duration::from_millis(600));
        tx.send(Msg::Rescan).unwrap();
        assert_eq!(next_file(&rx, LONG), (p, 3, How::Rescan));
        // reported once
        tx.send(Msg::Rescan).unwrap();
        nothing_more(&rx, Duration::from_millis(600));
        tx.send(Msg::Stop).unwrap();
        h.join().unwrap();
    }

    /// Start-up catch-up over a large drop dir. Not a timed test: run it by
    /// hand (`cargo test --release --lib watch -- --ignored --nocapture`) to
    /// see the time and the peak RSS.
    #[test]
    #[ignore]
    fn many_files_at_start() {
        let n: usize = std::env::var("WATCH_FILES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000);
        let dropdir = tempfile::tempdir().unwrap();
        for i in 0..n {
            let p = dropdir.path().join(format!("package-{i:06}.tar.gz"));
            fs::write(&p, b"x").unwrap();
        }
        let old = SystemTime::now() - Duration::from_secs(60);
        for i in 0..n {
            let p = dropdir.path().join(format!("package-{i:06}.tar.gz"));
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let t0 = Instant::now();
        let (w, rx) = start(dropdir.path(), opts(2000));
        for _ in 0..n {
            next_file(&rx, LONG);
        }
        let took = t0.elapsed();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let hwm = status
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .unwrap_or("")
            .to_string();
        eprintln!("{n} files reported in {took:?}; {hwm}");
        let cpu = || {
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage only writes into the struct we pass.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
            Duration::from_micros(
                (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) as u64 * 1_000_000
                    + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) as u64,
            )
        };
        let c0 = cpu();
        nothing_more(&rx, Duration::from_secs(3));
        let c1 = cpu();
        w.rescan_now();
        nothing_more(&rx, Duration::from_secs(3));
        let c2 = cpu();
        eprintln!(
            "idle 3 s: {:?} CPU; one rescan of {n} files: {:?} CPU",
            c1 - c0,
            c2 - c1
        );
        w.stop();
    }
}
