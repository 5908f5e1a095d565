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
//! - SIGHUP reloads the config (a bad one is reported, the old one kept);
//!   SIGTERM/SIGINT stop intake, let in-flight work finish (bounded), exit 0.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, tick, Receiver};

use crate::cli::Global;
use crate::config::{After, Config};
use crate::credentials::Netrc;
use crate::error::{code, Error};
use crate::job::{Batch, Item, Outcome};
use crate::journal::{self, Journal, Source, State};
use crate::route::base_name;
use crate::watch::{Ready, WatchOptions, Watcher};

/// Files the hooks leave next to the packages they spool.
pub const HOOK_META: &str = ".dispatch-meta.json";

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
}

pub fn run(g: &Global, dirs: Vec<PathBuf>) -> Result<u8, Error> {
    let config = g.load_config()?;
    let netrc = g.load_netrc()?;
    let mut dirs = if dirs.is_empty() {
        config.settings.watch.clone()
    } else {
        dirs
    };
    let spool = config.settings.spool_dir.clone();
    if let Some(s) = &spool {
        std::fs::create_dir_all(s)
            .map_err(|e| Error::Fatal(format!("{}: cannot create spool dir: {e}", s.display())))?;
        if !dirs.contains(s) {
            dirs.push(s.clone());
        }
    }
    if dirs.is_empty() {
        return Err(Error::Usage(
            "no drop directory: pass DIR… or set `watch` in [dispatch]".into(),
        ));
    }
    for d in &dirs {
        if !d.is_dir() {
            return Err(Error::Fatal(format!(
                "{}: drop directory does not exist",
                d.display()
            )));
        }
    }
    let journal = Journal::open(&config.settings.state_dir)
        .map_err(|e| Error::Fatal(format!("journal: {e}")))?;

    let signals = signal_channel()?;
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let opts = watch_options(&config, spool.is_some());
    let watcher = Watcher::start(&dirs, opts, ready_tx.clone())
        .map_err(|e| Error::Fatal(format!("watch: {e}")))?;
    log::info!(
        "watching {} (settle {:.1}s, rescan {:.0}s)",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        config.settings.settle.as_secs_f64(),
        config.settings.rescan.as_secs_f64()
    );
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let mut d = Daemon {
        g: g.clone(),
        pool: crate::cli::pool(g, &config),
        config: Arc::new(config),
        netrc: Arc::new(netrc),
        journal: Arc::new(journal),
        out_tx,
        pending: HashMap::new(),
        retries: Vec::new(),
        unrouted: HashMap::new(),
        spool,
        batch: Vec::new(),
    };
    let ticker = tick(Duration::from_millis(250));
    let mut stopping = false;
    loop {
        select! {
            recv(ready_rx) -> r => {
                if let Ok(r) = r {
                    d.on_ready(r);
                    // take what else is already waiting into the same batch
                    while let Ok(r) = ready_rx.try_recv() {
                        d.on_ready(r);
                    }
                    d.flush();
                }
            }
            recv(out_rx) -> o => {
                if let Ok(o) = o {
                    d.on_outcome(o);
                }
            }
            recv(signals) -> s => match s {
                Ok(signal_hook::consts::SIGHUP) => {
                    d.reload();
                    watcher.rescan_now();
                }
                Ok(_) | Err(_) => {
                    stopping = true;
                }
            },
            recv(ticker) -> _ => d.due_retries(),
        }
        if stopping {
            break;
        }
    }
    log::info!("stopping: no new files taken; waiting for work in flight");
    watcher.stop();
    let deadline = Instant::now() + DRAIN_LIMIT;
    while d.in_flight() > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log::warn!(
                "stopping with {} file × host still in flight; they are redone on restart",
                d.in_flight()
            );
            break;
        }
        match out_rx.recv_timeout(left) {
            Ok(o) => d.on_outcome(o),
            Err(_) => continue,
        }
    }
    log::info!("stopped");
    Ok(code::OK)
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
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(|e| Error::Fatal(format!("cannot install signal handlers: {e}")))?;
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
        .map_err(|e| Error::Fatal(format!("cannot start signal thread: {e}")))?;
    Ok(rx)
}

/// The hook metadata beside a spooled file, if any.
fn hook_source(path: &Path) -> Option<Source> {
    let meta = path.parent()?.join(HOOK_META);
    let text = std::fs::read_to_string(meta).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    Some(Source::Hook {
        vcs: s("vcs"),
        repo: s("repo"),
        rev: s("rev"),
        author: s("author"),
    })
}

impl Daemon {
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

    /// A complete file: decide whether (and to which hosts) it goes.
    fn consider(&mut self, path: PathBuf, size: u64, mtime_ns: i64) {
        let name = base_name(&path);
        let Some(mut item) = Item::new(&self.config, path.clone()) else {
            if self
                .unrouted
                .insert(path.clone(), (size, mtime_ns))
                .is_none()
            {
                log::warn!("{name}: no route matches; left in place (re-checked on SIGHUP)");
            }
            return;
        };
        self.unrouted.remove(&path);
        let route = &self.config.routes[item.route];
        let done_state = if route.install_command.is_some() {
            State::Installed
        } else {
            State::Uploaded
        };
        let hosts = route.hosts.clone();
        let section = route.section.clone();
        let j = Arc::clone(&self.journal);
        // cheap check first: same path, size and mtime as a package we know
        let known = match j.lookup(&path, size, mtime_ns) {
            Ok(p) => p,
            Err(e) => {
                log::error!("{name}: journal: {e}");
                return;
            }
        };
        let pkg = match known {
            Some(p) => p.id,
            None => {
                let id = match journal::file_identity(&path) {
                    Ok(id) => id,
                    Err(e) => {
                        log::warn!("{}: cannot read: {e}", path.display());
                        return;
                    }
                };
                // touched but unchanged: the same content under the same path
                if let Ok(Some(p)) = j.lookup_by_hash(&path, &id.sha256) {
                    if j.is_done(p.id, &hosts, done_state).unwrap_or(false) {
                        log::debug!(
                            "{name}: content unchanged since it was dispatched; not sent again"
                        );
                        return;
                    }
                }
                let source = hook_source(&path).unwrap_or(Source::Watch);
                match j.add_package(&id, Some(&section), &source) {
                    Ok(p) => p,
                    Err(e) => {
                        log::error!("{name}: journal: {e}");
                        return;
                    }
                }
            }
        };
        if self.pending.contains_key(&pkg) {
            return; // already being worked on
        }
        let states = j.host_states(pkg).unwrap_or_default();
        let ok: HashSet<String> = states
            .iter()
            .filter(|(_, s, _)| *s == done_state || (*s == State::Installed))
            .map(|(h, _, _)| h.clone())
            .collect();
        let todo: Vec<String> = hosts.iter().filter(|h| !ok.contains(*h)).cloned().collect();
        if todo.is_empty() {
            log::debug!("{name}: already done on every host");
            return;
        }
        if !ok.is_empty() || states.iter().any(|(_, s, _)| *s != State::Queued) {
            log::info!("{name}: resuming: left to do on {}", todo.join(", "));
        }
        let attempts = states.iter().map(|(h, _, a)| (h.clone(), *a)).collect();
        item.package = Some(pkg);
        item.only_hosts = Some(todo.clone());
        self.pending.insert(
            pkg,
            Pending {
                path: path.clone(),
                route_hosts: hosts,
                in_flight: todo.into_iter().collect(),
                ok,
                attempts,
                parked: HashSet::new(),
                from_spool: self.is_spooled(&path),
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
        };
        batch.run(items, &self.pool, self.out_tx.clone());
    }

    fn on_outcome(&mut self, o: Outcome) {
        let Some(pkg) = o.package else { return };
        let max = self.config.settings.max_attempts;
        let Some(p) = self.pending.get_mut(&pkg) else {
            return;
        };
        p.in_flight.remove(&o.host);
        if o.ok {
            p.ok.insert(o.host.clone());
            log::info!(
                "{}: {}: {} ({})",
                o.file,
                o.host,
                o.state,
                o.transport.as_deref().unwrap_or("-")
            );
        } else {
            let n = p.attempts.entry(o.host.clone()).or_insert(0);
            *n += 1;
            let err = o.error.as_deref().unwrap_or("failed");
            if *n < max {
                let backoff = Duration::from_secs(2u64.saturating_pow(*n).min(300));
                log::warn!(
                    "{}: {}: failed (attempt {n} of {max}): {err}; next try in {}s",
                    o.file,
                    o.host,
                    backoff.as_secs()
                );
                self.retries
                    .push((Instant::now() + backoff, pkg, o.host.clone()));
                p.in_flight.insert(o.host.clone());
            } else {
                log::error!(
                    "{}: {}: failed {n} times, parked (retried on SIGHUP or restart): {err}",
                    o.file,
                    o.host
                );
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

    fn after(&self, p: &Pending) {
        let action = if p.from_spool {
            // spooled files are copies made by a hook
            After::Delete
        } else {
            self.config.settings.after.clone()
        };
        match action {
            After::Keep => {}
            After::Delete => {
                if let Err(e) = std::fs::remove_file(&p.path) {
                    log::warn!("{}: cannot delete after dispatch: {e}", p.path.display());
                }
                if p.from_spool {
                    if let Some(dir) = p.path.parent() {
                        // the hook's directory, once only its metadata is left
                        let only_meta = std::fs::read_dir(dir)
                            .map(|rd| rd.flatten().all(|e| e.file_name() == HOOK_META))
                            .unwrap_or(false);
                        if only_meta && Some(dir) != self.spool.as_deref() {
                            let _ = std::fs::remove_file(dir.join(HOOK_META));
                            let _ = std::fs::remove_dir(dir);
                        }
                    }
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
        let Some(mut item) = Item::new(&self.config, path.clone()) else {
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
        item.only_hosts = Some(hosts);
        self.batch.push(item);
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
                self.config = Arc::new(c);
            }
            Err(e) => {
                log::error!("config reload failed; keeping the old config:\n{e}");
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
