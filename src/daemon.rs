//! `dispatch watch`: the daemon. [`watch`](crate::watch) says which files are
//! complete; this module decides what to do with each one, using the journal
//! so that nothing is lost and nothing unchanged is sent twice:
//!
//! - a complete file is looked up by (path, size, mtime), then by content
//!   hash: done on every host → skipped; otherwise dispatched to the hosts
//!   that are not done (crash recovery is the same path: on start the rescan
//!   finds every file, the journal says what is left);
//! - files that arrive together form one batch (one dated directory);
//! - a failed file × host is retried with backoff up to `max_attempts`, then
//!   parked until SIGHUP or restart; unrouted files are re-checked on SIGHUP;
//! - a package in the spool (see [`spool`](crate::spool)) is journaled with
//!   the revision its hook wrote beside it, and deleted once done;
//! - SIGHUP reloads the config (a bad one is reported, the old one kept);
//!   SIGTERM/SIGINT stop intake, let in-flight work finish (bounded), exit 0.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, tick, Receiver};

use crate::app::{self as cli, Global};
use crate::config::{After, Config};
use crate::credentials::Netrc;
use crate::error::{code, Error, LostJournal, SignalStep, UsageError};
use crate::job::{self, Batch, Item, Outcome};
use crate::journal::{self, Journal, Source, State};
use crate::local::{Follow, LocalFile};
use crate::notify::Notifier;
use crate::route::{base_name, Unroutable};
use crate::spool;
use crate::status::{self, Queue, Status};
use crate::watch::{canonical_dirs, Ready, WatchOptions, Watcher};

/// Retries across batches: 2 s, 4 s, 8 s … (the one policy, [`crate::retry`]).
const DAEMON_BACKOFF: crate::retry::Backoff = crate::retry::Backoff::new(Duration::from_secs(2));

/// How long SIGTERM waits for in-flight work.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// A package being worked on.
struct Pending {
    path: PathBuf,
    route_hosts: Vec<String>,
    /// Hosts with work in flight.
    in_flight: HashSet<String>,
    ok: HashSet<String>,
    attempts: HashMap<String, u32>,
    parked: HashSet<String>,
    from_spool: bool,
    /// The descriptor the package was judged by; retries send it too.
    file: Arc<LocalFile>,
    /// Hosts where the verified upload is in place (host → dir): a retry
    /// only installs.
    placed: BTreeMap<String, String>,
}

/// What a file's route asks of it.
struct Target {
    hosts: Vec<String>,
    section: String,
    /// The route has an install command.
    installs: bool,
    /// The state that means done on a host: installed, or uploaded when
    /// there is nothing to install.
    done_state: State,
}

impl Target {
    fn of(config: &Config, item: &Item) -> Target {
        let route = &config.routes[item.route];
        let installs = route.install_command.is_some();
        Target {
            hosts: route.hosts.clone(),
            section: route.section.clone(),
            installs,
            done_state: if installs {
                State::Installed
            } else {
                State::Uploaded
            },
        }
    }
}

/// A package's hosts, as the journal has them.
struct HostsToDo {
    ok: HashSet<String>,
    todo: Vec<String>,
    attempts: HashMap<String, u32>,
}

/// A file judged to go: everything [`Daemon::enqueue`] needs.
struct Judged {
    path: PathBuf,
    item: Item,
    file: LocalFile,
    pkg: i64,
    target: Target,
    hosts: HostsToDo,
}

struct Daemon {
    g: Global,
    config: Arc<Config>,
    netrc: Arc<Netrc>,
    journal: Arc<Journal>,
    pool: threadpool::ThreadPool,
    out_tx: crossbeam_channel::Sender<Outcome>,
    pending: HashMap<i64, Pending>,
    /// (when, package, host) retries waiting for their time.
    retries: Vec<(Instant, i64, String)>,
    /// Files no route matched, re-checked on SIGHUP.
    unrouted: HashMap<PathBuf, (u64, i64)>,
    spool: Option<PathBuf>,
    batch: Vec<Item>,
    /// The drop directories (canonical): nothing below them is reached
    /// through a symlink.
    roots: Vec<PathBuf>,
    /// Files whose journal write failed: the watcher forgets it reported
    /// them, so the next rescan (periodic or SIGHUP) hands them over again.
    redo: Vec<PathBuf>,
    /// The canonical drop dirs as started, when they came from the config
    /// (compared with a reloaded config's, which need a restart).
    config_dirs: Option<Vec<PathBuf>>,
    /// At most this many packages pending (each holds its descriptor open).
    max_open: usize,
    /// Complete files that came while `max_open` packages were pending,
    /// (path, size, mtime): judged again, in order, as packages finish.
    backlog: VecDeque<(PathBuf, u64, i64)>,
    backlogged: HashSet<PathBuf>,
    /// What the status server shows (None: `status_listen = off`).
    status: Option<Arc<Status>>,
    /// Sends notifications from the journal's outbox.
    notifier: Option<Notifier>,
}

/// `dispatch watch [DIR…]`: resolve the directories, open the journal,
/// start the watcher, serve until SIGTERM/SIGINT, then drain.
pub fn run(g: &Global, dirs: Vec<PathBuf>) -> Result<u8, Error> {
    let config = g.load_config()?;
    let netrc = g.load_netrc()?;
    let dirs = DropDirs::resolve(&config, dirs)?;
    let journal = open_journal(&config.settings.state_dir)?;
    let signals = signal_channel()?;
    // kept for as long as the daemon runs: the channel never closes
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    // serving before "watching" is logged: whoever waits for that line can ask
    let (status, server) = start_status(&config, &journal);
    let journal = Arc::new(journal);
    let notifier = match Notifier::start(&config.settings, Arc::clone(&journal)) {
        Ok(n) => Some(n),
        Err(e) => {
            log::error!("notify: cannot start the sender: {e}; no notifications are sent");
            None
        }
    };
    let watcher = start_watcher(&config, &dirs, ready_tx.clone())?;
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let max_open = crate::app::open_file_budget(crate::app::jobs(g, &config));
    let mut d = Daemon {
        g: g.clone(),
        pool: cli::pool(g, &config),
        config: Arc::new(config),
        netrc: Arc::new(netrc),
        journal,
        out_tx,
        pending: HashMap::new(),
        retries: Vec::new(),
        unrouted: HashMap::new(),
        spool: dirs.spool,
        batch: Vec::new(),
        roots: dirs.all,
        redo: Vec::new(),
        config_dirs: dirs.from_config,
        max_open,
        backlog: VecDeque::new(),
        backlogged: HashSet::new(),
        status,
        notifier,
    };
    let channels = Channels {
        ready: ready_rx,
        outcomes: out_rx,
        signals,
    };
    if let Err(e) = d.serve(&watcher, &channels) {
        watcher.stop();
        stop_status(server, &d.config);
        return Err(journal_lost(&d.journal, e));
    }
    log::info!("stopping: no new files taken; waiting for work in flight");
    watcher.stop();
    d.drain(&channels.outcomes);
    stop_status(server, &d.config);
    if let Some(n) = d.notifier.take() {
        n.stop();
    }
    log::info!("stopped");
    drop(ready_tx);
    Ok(code::OK)
}

/// The status server, when `status_listen` is not `off`. An address that
/// cannot be bound is reported and the daemon runs without it: delivering
/// matters more than showing it. The address bound is written to
/// `state_dir/status.addr` for `dispatch status` (the port `status_listen`
/// says may be 0).
fn start_status(
    config: &Config,
    journal: &Journal,
) -> (Option<Arc<Status>>, Option<status::server::Server>) {
    let Some(listen) = config.settings.status_listen else {
        return (None, None);
    };
    let st = Arc::new(Status::new(
        &config.path.display().to_string(),
        journal.last_event_id(),
    ));
    let opts = status::server::Options {
        listen,
        token: config.settings.status_token.clone(),
    };
    match status::server::Server::start(Arc::clone(&st), &opts) {
        Ok(server) => {
            log::info!(
                "status: http://{}/ (API /api/v1/status, /api/v1/events, /metrics)",
                server.addr()
            );
            let file = status::client::address_file(&config.settings.state_dir);
            if let Err(e) = std::fs::write(&file, format!("{}\n", server.addr())) {
                log::warn!("status: cannot write {}: {e}", file.display());
            }
            (Some(st), Some(server))
        }
        Err(e) => {
            log::warn!(
                "status server not started on {listen}: {e}; running without it (status_listen)"
            );
            (None, None)
        }
    }
}

fn stop_status(server: Option<status::server::Server>, config: &Config) {
    if let Some(s) = server {
        s.stop();
        let _ = std::fs::remove_file(status::client::address_file(&config.settings.state_dir));
    }
}

/// The directories the daemon watches, canonical (inotify reports absolute
/// paths: only canonical ones are compared).
struct DropDirs {
    /// Every directory watched: the drop dirs and the spool.
    all: Vec<PathBuf>,
    spool: Option<PathBuf>,
    /// The drop dirs (without the spool) when they came from the config.
    from_config: Option<Vec<PathBuf>>,
}

impl DropDirs {
    /// `args`, else `watch` in the config; and `spool_dir` (created).
    fn resolve(config: &Config, args: Vec<PathBuf>) -> Result<DropDirs, Error> {
        let from_config = args.is_empty();
        let dirs = if from_config {
            config.settings.watch.clone()
        } else {
            args
        };
        let spool = config.settings.spool_dir.clone();
        if let Some(s) = &spool {
            std::fs::create_dir_all(s).map_err(|cause| Error::SpoolDir {
                path: s.clone(),
                cause,
            })?;
        }
        if dirs.is_empty() && spool.is_none() {
            return Err(UsageError::NoDropDir.into());
        }
        for d in &dirs {
            if !d.is_dir() {
                return Err(Error::DropDirMissing { path: d.clone() });
            }
        }
        let canon = |ds: &[PathBuf]| canonical_dirs(ds).map_err(Error::DropDir);
        let mut all = canon(&dirs)?;
        let spool = match spool {
            Some(s) => canon(&[s])?.pop(),
            None => None,
        };
        if let Some(s) = &spool {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        let from_config = from_config.then(|| {
            all.iter()
                .filter(|d| Some(*d) != spool.as_ref())
                .cloned()
                .collect()
        });
        Ok(DropDirs {
            all,
            spool,
            from_config,
        })
    }
}

fn start_watcher(
    config: &Config,
    dirs: &DropDirs,
    ready: crossbeam_channel::Sender<Ready>,
) -> Result<Watcher, Error> {
    let opts = watch_options(config, dirs.spool.is_some());
    let watcher = Watcher::start(&dirs.all, opts, ready).map_err(Error::Watch)?;
    log::info!(
        "watching {} (settle {:.1}s, rescan {:.0}s)",
        dirs.all
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        config.settings.settle.as_secs_f64(),
        config.settings.rescan.as_secs_f64()
    );
    Ok(watcher)
}

/// What the main loop waits on.
struct Channels {
    ready: Receiver<Ready>,
    outcomes: Receiver<Outcome>,
    signals: Receiver<i32>,
}

/// The journal, or why the daemon cannot start: a journal that exists but is
/// unusable (empty, not a journal, deleted with its WAL left) is never
/// replaced by a fresh one behind the operator's back — that would send
/// every file in the drop directories again.
fn open_journal(state_dir: &Path) -> Result<Journal, Error> {
    Journal::open(state_dir).map_err(Error::JournalNotStarted)
}

/// The journal file was deleted, replaced or truncated under the daemon:
/// save what it still sees and stop, loudly.
fn journal_lost(j: &Journal, cause: journal::JournalError) -> Error {
    let e = Error::JournalLost(Box::new(LostJournal {
        cause,
        path: j.path().to_path_buf(),
        saved: j.save_copy(),
    }));
    log::error!("{e}");
    e
}

fn watch_options(config: &Config, has_spool: bool) -> WatchOptions {
    let s = &config.settings;
    WatchOptions {
        // spooled packages live in one subdirectory per hook run
        recursive: s.recursive || has_spool,
        settle: s.settle,
        rescan: s.rescan,
        max_settle: s.max_settle,
        ignore: s.ignore.clone(),
    }
}

/// SIGHUP, SIGTERM, SIGINT as a channel.
fn signal_channel() -> Result<Receiver<i32>, Error> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM]).map_err(|cause| {
            Error::Signals {
                step: SignalStep::InstallHandlers,
                cause,
            }
        })?;
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(s).is_err() {
                    break;
                }
            }
        })
        .map_err(|cause| Error::Signals {
            step: SignalStep::StartThread,
            cause,
        })?;
    Ok(rx)
}

impl Daemon {
    /// The main loop, until SIGTERM/SIGINT; an error when the journal file
    /// is lost under the daemon.
    fn serve(&mut self, watcher: &Watcher, ch: &Channels) -> Result<(), journal::JournalError> {
        let ticker = tick(Duration::from_millis(250));
        loop {
            let stopping = self.wait_once(watcher, ch, &ticker);
            for p in self.redo.drain(..) {
                watcher.forget(p);
            }
            self.journal.check_file()?;
            if let Some(st) = &self.status {
                st.set_queue(Queue {
                    pending: self.pending.len(),
                    waiting: self.backlog.len(),
                    retries: self.retries.len(),
                });
            }
            if stopping {
                return Ok(());
            }
        }
    }

    /// Handle the next thing that happens; true on SIGTERM/SIGINT.
    fn wait_once(&mut self, watcher: &Watcher, ch: &Channels, ticker: &Receiver<Instant>) -> bool {
        select! {
            recv(ch.ready) -> r => {
                if let Ok(r) = r {
                    self.on_ready(r);
                    // take what else is already waiting into the same batch
                    while let Ok(r) = ch.ready.try_recv() {
                        self.on_ready(r);
                    }
                    self.flush();
                }
            }
            recv(ch.outcomes) -> o => {
                if let Ok(o) = o {
                    self.outcome(o);
                    self.admit();
                }
            }
            recv(ch.signals) -> s => match s {
                Ok(signal_hook::consts::SIGHUP) => {
                    self.reload();
                    watcher.rescan_now();
                }
                Ok(_) | Err(_) => return true,
            },
            recv(ticker) -> _ => self.due_retries(),
        }
        false
    }

    /// After the watcher stopped: let work in flight finish, up to
    /// [`DRAIN_LIMIT`].
    fn drain(&mut self, outcomes: &Receiver<Outcome>) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "stopping with {} file × host still in flight; they are redone on restart",
                    self.in_flight()
                );
                break;
            }
            match outcomes.recv_timeout(left) {
                Ok(o) => self.outcome(o),
                Err(_) => continue,
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.pending.values().map(|p| p.in_flight.len()).sum()
    }

    fn is_spooled(&self, path: &Path) -> bool {
        self.spool.as_ref().is_some_and(|s| path.starts_with(s))
    }

    fn on_ready(&mut self, r: Ready) {
        match r {
            Ready::File {
                path,
                size,
                mtime_ns,
                ..
            } => self.consider(path, size, mtime_ns),
            Ready::TooBusy { path, for_ } => {
                log::warn!(
                    "{}: still changing after {:.0}s; not sent (it is looked at again once it settles)",
                    path.display(),
                    for_.as_secs_f64()
                );
            }
            Ready::Error(e) => log::error!("watch: {e}"),
        }
    }

    /// The drop directory `path` is in (the deepest, if they nest).
    fn root_of(&self, path: &Path) -> Option<&Path> {
        self.roots
            .iter()
            .filter(|r| path.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
            .map(PathBuf::as_path)
    }

    /// A complete file: decide whether (and to which hosts) it goes:
    /// route → open → identity → hosts left to do → enqueue.
    fn consider(&mut self, path: PathBuf, size: u64, mtime_ns: i64) {
        let Some(item) = self.route(&path, size, mtime_ns) else {
            return;
        };
        // opened once, no symlink followed below the drop dir: what is
        // judged, hashed and sent is this one descriptor
        let mut local = match LocalFile::open(&path, Follow::NoSymlinksBelow, self.root_of(&path)) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("{}: not sent: {e}", path.display());
                return;
            }
        };
        let target = Target::of(&self.config, &item);
        let Some(pkg) = self.identify(&path, &mut local, &target) else {
            return;
        };
        if self.pending.contains_key(&pkg) {
            return; // already being worked on
        }
        let Some(hosts) = self.hosts_to_do(&path, pkg, &target) else {
            return;
        };
        if self.pending.len() >= self.max_open {
            // its descriptor is closed now; it is judged again when there is room
            if self.backlogged.insert(path.clone()) {
                if self.backlog.is_empty() {
                    log::info!(
                        "{} packages in flight: further files wait their turn",
                        self.max_open
                    );
                }
                self.backlog.push_back((path, size, mtime_ns));
            }
            return;
        }
        self.enqueue(Judged {
            path,
            item,
            file: local,
            pkg,
            target,
            hosts,
        });
    }

    /// The file's route; a file no route takes is remembered (re-checked on
    /// SIGHUP) and reported once.
    fn route(&mut self, path: &Path, size: u64, mtime_ns: i64) -> Option<Item> {
        match Item::new(&self.config, path.to_path_buf()) {
            Ok(item) => {
                self.unrouted.remove(path);
                Some(item)
            }
            Err(e) => {
                if self
                    .unrouted
                    .insert(path.to_path_buf(), (size, mtime_ns))
                    .is_none()
                {
                    self.tell_unrouted(path, &e);
                    match e {
                        Unroutable::NoRoute => log::warn!(
                            "{}: no route matches; left in place (re-checked on SIGHUP)",
                            base_name(path)
                        ),
                        Unroutable::BadName(why) => {
                            log::error!("{}: {why}; left in place", path.display())
                        }
                    }
                }
                None
            }
        }
    }

    /// The journal's package for the file: known by (path, size, mtime),
    /// else by content (added to the journal). None when it is not sent now:
    /// its content is unchanged and done on every host, it cannot be read,
    /// or the journal failed (then it is redone at the next rescan).
    fn identify(&mut self, path: &Path, local: &mut LocalFile, t: &Target) -> Option<i64> {
        let name = base_name(path);
        let j = Arc::clone(&self.journal);
        // cheap check first: same path, size and mtime as a package we know
        let known = match j.lookup(path, local.size, local.mtime_ns) {
            Ok(p) => p,
            Err(e) => {
                log::error!("{name}: {e}; not sent now, redone at the next rescan");
                self.redo.push(path.to_path_buf());
                return None;
            }
        };
        if let Some(p) = known {
            return Some(p.id);
        }
        let id = match local.identity(true) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("{}: cannot read: {e}", path.display());
                return None;
            }
        };
        // touched but unchanged: the same content under the same path
        if let Ok(Some(p)) = j.lookup_by_hash(path, &id.sha256) {
            if j.is_done(p.id, &t.hosts, t.done_state).unwrap_or(false) {
                log::debug!("{name}: content unchanged since it was dispatched; not sent again");
                return None;
            }
        }
        let source = spool::source_of(path).unwrap_or(Source::Watch);
        match j.add_package(&id, Some(&t.section), &source) {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!("{name}: {e}; not sent now, redone at the next rescan");
                self.redo.push(path.to_path_buf());
                None
            }
        }
    }

    /// Which of the route's hosts the package is done on, and which are
    /// left; None when none is left.
    fn hosts_to_do(&self, path: &Path, pkg: i64, t: &Target) -> Option<HostsToDo> {
        let name = base_name(path);
        let states = self.journal.host_states(pkg).unwrap_or_default();
        let ok: HashSet<String> = states
            .iter()
            .filter(|(_, s, _)| *s == t.done_state || (*s == State::Installed))
            .map(|(h, _, _)| h.clone())
            .collect();
        let todo: Vec<String> = t
            .hosts
            .iter()
            .filter(|h| !ok.contains(*h))
            .cloned()
            .collect();
        if todo.is_empty() {
            log::debug!("{name}: already done on every host");
            return None;
        }
        if !ok.is_empty() || states.iter().any(|(_, s, _)| *s != State::Queued) {
            log::info!("{name}: resuming: left to do on {}", todo.join(", "));
        }
        let attempts = states.iter().map(|(h, _, a)| (h.clone(), *a)).collect();
        Some(HostsToDo { ok, todo, attempts })
    }

    /// Into the next batch, and pending until every host has an outcome.
    fn enqueue(&mut self, p: Judged) {
        let Judged {
            path,
            mut item,
            file,
            pkg,
            target,
            hosts,
        } = p;
        let placed = if target.installs {
            job::placed_uploads(&self.journal, pkg)
        } else {
            BTreeMap::new()
        };
        let file = Arc::new(file);
        item.package = Some(pkg);
        item.only_hosts = Some(hosts.todo.clone());
        item.stale_temps = job::stale_temps(&self.journal, pkg);
        item.resume = placed.clone();
        item.file = Some(Arc::clone(&file));
        self.pending.insert(
            pkg,
            Pending {
                from_spool: self.is_spooled(&path),
                path,
                route_hosts: target.hosts,
                in_flight: hosts.todo.into_iter().collect(),
                ok: hosts.ok,
                attempts: hosts.attempts,
                parked: HashSet::new(),
                file,
                placed,
            },
        );
        self.batch.push(item);
    }

    /// Start the collected files as one batch (one timestamp).
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.batch);
        log::debug!("batch of {} file(s)", items.len());
        let batch = Batch {
            config: Arc::clone(&self.config),
            netrc: Arc::clone(&self.netrc),
            journal: Some(Arc::clone(&self.journal)),
            when: chrono::Local::now(),
            dry_run: self.g.dry_run,
            sinks: self
                .status
                .iter()
                .map(|s| Arc::clone(s) as Arc<dyn crate::event::Sink>)
                .collect(),
            allow_downgrade: self.g.allow_downgrade,
        };
        batch.run(items, &self.pool, self.out_tx.clone());
    }

    /// An outcome whose final state the journal could not record is not
    /// done, whatever it says: the host is dropped from this round (no
    /// `after` for the file) and the file is redone when next seen.
    fn outcome(&mut self, o: Outcome) {
        let unrecorded = match o.package {
            Some(pkg) if o.ok => self.journal.take_unrecorded(pkg, &o.host),
            Some(pkg) => {
                let _ = self.journal.take_unrecorded(pkg, &o.host);
                None
            }
            None => None,
        };
        let (Some(why), Some(pkg)) = (unrecorded, o.package) else {
            return self.on_outcome(o);
        };
        let Some(p) = self.pending.get_mut(&pkg) else {
            return;
        };
        p.in_flight.remove(&o.host);
        log::error!(
            "{}: {}: {} but not recorded ({why}); not counted as done, redone at the next rescan",
            o.file,
            o.host,
            o.state
        );
        self.redo.push(p.path.clone());
        self.settle_package(pkg);
    }

    fn on_outcome(&mut self, o: Outcome) {
        let Some(pkg) = o.package else { return };
        let max = self.config.settings.max_attempts;
        let Some(p) = self.pending.get_mut(&pkg) else {
            return;
        };
        p.in_flight.remove(&o.host);
        if o.ok {
            if let Some(n) = &self.notifier {
                n.success(&o.state, outcome_fields(&o, None));
            }
            p.ok.insert(o.host.clone());
            log::info!(
                "{}: {}: {} ({})",
                o.file,
                o.host,
                o.state,
                o.transport.as_deref().unwrap_or("-")
            );
        } else {
            if let Some(dir) = &o.uploaded_to {
                p.placed.insert(o.host.clone(), dir.clone());
            }
            let n = p.attempts.entry(o.host.clone()).or_insert(0);
            *n += 1;
            let err = o.error.as_deref().unwrap_or("failed");
            if o.retry && *n < max {
                let backoff = DAEMON_BACKOFF.delay(*n);
                let what = if o.uploaded_to.is_some() {
                    "the install is redone where the file is"
                } else {
                    "next try"
                };
                log::warn!(
                    "{}: {}: failed (attempt {n} of {max}): {err}; {what} in {}s",
                    o.file,
                    o.host,
                    backoff.as_secs()
                );
                self.retries
                    .push((Instant::now() + backoff, pkg, o.host.clone()));
                p.in_flight.insert(o.host.clone());
            } else {
                let why = if o.retry {
                    format!("failed {n} times")
                } else {
                    "failed (not retried: a failed install or a refusal does not change by uploading again)".to_string()
                };
                log::error!(
                    "{}: {}: {why}, parked (retried on SIGHUP or restart): {err}",
                    o.file,
                    o.host
                );
                if let Some(st) = &self.status {
                    st.park(&o, &why);
                }
                if let Some(n) = &self.notifier {
                    n.failure("parked", outcome_fields(&o, Some(&why)));
                }
                p.parked.insert(o.host.clone());
            }
        }
        self.settle_package(pkg);
    }

    /// When nothing is left in flight: `after` on success, forget it.
    fn settle_package(&mut self, pkg: i64) {
        let Some(p) = self.pending.get(&pkg) else {
            return;
        };
        if !p.in_flight.is_empty() {
            return;
        }
        let all_ok = p.route_hosts.iter().all(|h| p.ok.contains(h));
        if !p.parked.is_empty() {
            // keep it pending (parked) until SIGHUP or restart
            return;
        }
        let p = match self.pending.remove(&pkg) {
            Some(p) => p,
            None => return,
        };
        if all_ok {
            self.after(&p);
        }
    }

    /// Done on every host: `after` (a spooled file is the spool's to clear).
    fn after(&self, p: &Pending) {
        if p.from_spool {
            return spool::consume(&p.path, self.spool.as_deref());
        }
        match self.config.settings.after.clone() {
            After::Keep => {}
            After::Delete => {
                if let Err(e) = std::fs::remove_file(&p.path) {
                    log::warn!("{}: cannot delete after dispatch: {e}", p.path.display());
                }
            }
            After::Move(dir) => {
                let name = p.path.file_name().map(PathBuf::from).unwrap_or_default();
                let mut dest = dir.join(&name);
                let mut n = 1;
                while dest.exists() {
                    dest = dir.join(format!("{}.{n}", name.display()));
                    n += 1;
                }
                if let Err(e) =
                    std::fs::create_dir_all(&dir).and_then(|_| std::fs::rename(&p.path, &dest))
                {
                    log::warn!(
                        "{}: cannot move to {}: {e}",
                        p.path.display(),
                        dir.display()
                    );
                }
            }
        }
    }

    /// Judge waiting files while fewer than `max_open` packages are
    /// pending, and start them.
    fn admit(&mut self) {
        while self.pending.len() < self.max_open {
            let Some((path, size, mtime_ns)) = self.backlog.pop_front() else {
                break;
            };
            self.backlogged.remove(&path);
            self.consider(path, size, mtime_ns);
        }
        self.flush();
    }

    fn due_retries(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(t, ..)| *t <= now);
        self.retries = later;
        let mut by_pkg: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for (_, pkg, host) in due {
            by_pkg.entry(pkg).or_default().push(host);
        }
        for (pkg, hosts) in by_pkg {
            self.requeue(pkg, hosts);
        }
        self.flush();
    }

    fn requeue(&mut self, pkg: i64, hosts: Vec<String>) {
        let Some(p) = self.pending.get(&pkg) else {
            return;
        };
        let path = p.path.clone();
        let Ok(mut item) = Item::new(&self.config, path.clone()) else {
            log::warn!("{}: no longer routed; dropped", path.display());
            self.pending.remove(&pkg);
            return;
        };
        if !path.exists() {
            log::warn!("{}: gone before it could be retried", path.display());
            self.pending.remove(&pkg);
            return;
        }
        item.package = Some(pkg);
        item.resume = p
            .placed
            .iter()
            .filter(|(h, _)| hosts.contains(h))
            .map(|(h, d)| (h.clone(), d.clone()))
            .collect();
        item.stale_temps = job::stale_temps(&self.journal, pkg);
        item.file = Some(Arc::clone(&p.file));
        item.only_hosts = Some(hosts);
        self.batch.push(item);
    }

    /// Drop dirs and spool_dir are taken at start: say so if a reloaded
    /// config names others (compared canonically: `drop` and `./drop/` are
    /// the same directory).
    fn dirs_unchanged(&self, c: &Config) {
        let canon = |ds: &[PathBuf]| canonical_dirs(ds).unwrap_or_else(|_| ds.to_vec());
        let spool = c
            .settings
            .spool_dir
            .as_ref()
            .map(|s| canon(std::slice::from_ref(s)));
        if spool != self.spool.clone().map(|s| vec![s]) {
            log::warn!(
                "{}: spool_dir changed; it takes effect at the next start",
                c.path.display()
            );
        }
        if let Some(old) = &self.config_dirs {
            let new: Vec<PathBuf> = canon(&c.settings.watch)
                .into_iter()
                .filter(|d| Some(d) != self.spool.as_ref())
                .collect();
            if &new != old {
                log::warn!(
                    "{}: watch changed; it takes effect at the next start",
                    c.path.display()
                );
            }
        }
    }

    /// A file no route takes, for the status page and the notifications.
    fn tell_unrouted(&self, path: &Path, e: &Unroutable) {
        let why = match e {
            Unroutable::NoRoute => "no route matches".to_string(),
            Unroutable::BadName(why) => why.to_string(),
        };
        let fields = serde_json::json!({
            "file": base_name(path), "path": path.display().to_string(), "reason": why,
        });
        if let Some(st) = &self.status {
            st.note("unrouted", fields.clone());
        }
        if let Some(n) = &self.notifier {
            n.failure("unrouted", fields);
        }
    }

    /// A reload that failed (the old config is kept).
    fn tell_reload_failed(&self, e: &Error) {
        let fields = serde_json::json!({
            "config": self.config.path.display().to_string(), "error": e.to_string(),
        });
        if let Some(st) = &self.status {
            st.note("reload_failed", fields.clone());
        }
        if let Some(n) = &self.notifier {
            n.failure("reload_failed", fields);
        }
    }

    /// SIGHUP: reload the config, retry parked failures and unrouted files.
    fn reload(&mut self) {
        match self.g.load_config() {
            Ok(c) => {
                log::info!(
                    "{}: config reloaded ({} routes)",
                    c.path.display(),
                    c.routes.len()
                );
                self.dirs_unchanged(&c);
                if let Some(n) = &self.notifier {
                    n.reload(&c.settings);
                }
                self.config = Arc::new(c);
            }
            Err(e) => {
                log::error!("config reload failed; keeping the old config:\n{e}");
                self.tell_reload_failed(&e);
            }
        }
        if let Ok(n) = self.g.load_netrc() {
            self.netrc = Arc::new(n);
        }
        let parked: Vec<(i64, Vec<String>)> = self
            .pending
            .iter_mut()
            .filter(|(_, p)| !p.parked.is_empty())
            .map(|(id, p)| {
                let hosts: Vec<String> = p.parked.drain().collect();
                for h in &hosts {
                    p.in_flight.insert(h.clone());
                    p.attempts.insert(h.clone(), 0);
                }
                (*id, hosts)
            })
            .collect();
        if let Some(st) = &self.status {
            st.unpark_all();
        }
        for (pkg, hosts) in parked {
            log::info!("package {pkg}: retrying parked hosts {}", hosts.join(", "));
            self.requeue(pkg, hosts);
        }
        for (path, (size, mtime)) in std::mem::take(&mut self.unrouted) {
            self.consider(path, size, mtime);
        }
        self.flush();
    }
}

/// What a notification says of a file × host outcome.
fn outcome_fields(o: &Outcome, parked_because: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "file": o.file, "path": o.path, "host": o.host, "section": o.section,
        "state": o.state, "ok": o.ok, "transport": o.transport,
        "remote_path": o.remote_path, "bytes": o.bytes, "attempts": o.attempts,
        "exit_status": o.exit_status, "output_tail": o.output_tail, "error": o.error,
        "reason": parked_because,
    })
}
