//! The application context that foreground runs, hooks and the daemon
//! share: the global options and what they load (config, credentials), the
//! journal, the worker pool, preparing inputs (route, open, journal) and
//! running a batch (plan → execute → events) with its results. Nothing here
//! parses the command line; [`crate::cli`] does, and uses this module like
//! [`crate::daemon`] and [`crate::hook`] do.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use log::LevelFilter;

use crate::config::Config;
use crate::credentials::Netrc;
use crate::error::{Error, UsageError};
use crate::event::{Event, EventKind, Sink};
use crate::job::{Batch, Item, Outcome};
use crate::journal::{Journal, Source};
use crate::local::{Follow, LocalFile};
use crate::route::Unroutable;

/// The options every command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Global {
    /// Config file (default: ./dispatch.ini, $XDG_CONFIG_HOME/dispatch/dispatch.ini, /etc/dispatch/dispatch.ini)
    #[arg(short, long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// netrc file for logins and passwords (default: ~/.netrc)
    #[arg(long, global = true, value_name = "PATH")]
    pub netrc: Option<PathBuf>,
    /// log4rs YAML config (default: log_config in [dispatch], else stderr)
    #[arg(long, global = true, value_name = "PATH")]
    pub log_config: Option<PathBuf>,
    /// Worker threads, 1-256 (default: jobs in [dispatch], 8)
    #[arg(short, long, global = true, value_name = "N", value_parser = crate::config::parse_jobs)]
    pub jobs: Option<usize>,
    /// Show what would be done; connect to nothing
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// JSON lines: one object per input and per file × host result, then a summary
    #[arg(long, global = true)]
    pub json: bool,
    /// Roll out a version older than a host's active release (routes with `current`)
    #[arg(long, global = true)]
    pub allow_downgrade: bool,
    /// Less output
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// While sending: bars on a terminal, else lines (stderr); none with --json or -q
    #[arg(long, global = true, value_enum, value_name = "HOW", default_value_t = crate::progress::Mode::Auto)]
    pub progress: crate::progress::Mode,
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    pub fn level(&self) -> LevelFilter {
        match (self.quiet, self.verbose) {
            (true, _) => LevelFilter::Error,
            (false, 0) => LevelFilter::Warn,
            (false, 1) => LevelFilter::Info,
            (false, 2) => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        }
    }

    pub fn load_config(&self) -> Result<Config, Error> {
        let c = self.load_config_silently()?;
        for w in &c.warnings {
            log::warn!("{w}");
        }
        Ok(c)
    }

    /// The config, its warnings left to the caller to show.
    pub fn load_config_silently(&self) -> Result<Config, Error> {
        let path = Config::find(self.config.as_deref())?;
        Ok(Config::load(&path)?)
    }

    pub fn load_netrc(&self) -> Result<Netrc, Error> {
        let n =
            Netrc::load(self.netrc.as_deref()).map_err(|e| Error::Usage(UsageError::Netrc(e)))?;
        if n.insecure {
            log::warn!(
                "{}: holds passwords but is readable by others; its passwords are ignored (run: chmod 600 {})",
                n.path.display(),
                n.path.display()
            );
        }
        Ok(n)
    }
}

/// Open the journal; a journal that cannot be opened is a warning for manual runs.
pub fn open_journal(config: &Config) -> Option<Arc<Journal>> {
    match Journal::open(&config.settings.state_dir) {
        Ok(j) => Some(Arc::new(j)),
        Err(e) => {
            log::warn!("journal unavailable, results are not recorded: {e}");
            None
        }
    }
}

/// Worker threads: `-j`, else `jobs` in [dispatch].
pub fn jobs(g: &Global, config: &Config) -> usize {
    g.jobs.unwrap_or(config.settings.jobs).max(1)
}

pub fn pool(g: &Global, config: &Config) -> threadpool::ThreadPool {
    threadpool::Builder::new()
        .num_threads(jobs(g, config))
        .thread_name("worker".into())
        .build()
}

/// Route and record the files; unrouted or unreadable ones are reported.
pub struct Prepared {
    pub items: Vec<Item>,
    pub unrouted: Vec<PathBuf>,
    /// Inputs that cannot be sent (missing, unreadable or refused), with why.
    pub unreadable: Vec<Unsendable>,
}

/// An input that cannot be sent.
#[derive(Debug)]
pub struct Unsendable {
    pub path: PathBuf,
    pub why: Rejection,
}

/// Why an input cannot be sent. Display: the cause alone (the caller puts
/// the path and `cannot read:` in front).
#[derive(Debug)]
pub enum Rejection {
    /// It could not be stat'ed, opened or read.
    Io(std::io::Error),
    /// Its name cannot be sent as it is.
    Name(Unroutable),
}

impl Rejection {
    pub fn kind(&self) -> Rejected {
        match self {
            Rejection::Io(e) if e.kind() == std::io::ErrorKind::NotFound => Rejected::Missing,
            Rejection::Io(_) => Rejected::Unreadable,
            Rejection::Name(_) => Rejected::Refused,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Io(e) => write!(f, "{e}"),
            Rejection::Name(e) => write!(f, "{e}"),
        }
    }
}

/// Raise the soft limit on open files to the hard one (a package being
/// sent keeps its descriptor open from judging to the last host, so a run
/// of many files needs many); the soft limit now.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// How many packages may be open at once: half of what the (raised) limit
/// leaves after a reserve for the lanes' sockets (three per worker: SSH,
/// FTP control and data), the journal and the log; within 16..=8192.
pub fn open_file_budget(jobs: usize) -> usize {
    let soft = usize::try_from(raise_open_file_limit()).unwrap_or(usize::MAX);
    (soft.saturating_sub(3 * jobs + 64) / 2).clamp(16, 8192)
}

/// Why an input is not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// No such file.
    Missing,
    /// It exists but cannot be opened, read or stat'ed, or is not a file.
    Unreadable,
    /// Its name cannot be sent as it is (not UTF-8).
    Refused,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Missing => "missing",
            Rejected::Unreadable => "unreadable",
            Rejected::Refused => "refused",
        }
    }
}

impl Prepared {
    fn reject(&mut self, path: PathBuf, why: Rejection) {
        self.unreadable.push(Unsendable { path, why });
    }
}

pub fn prepare(
    config: &Config,
    journal: Option<&Journal>,
    files: Vec<PathBuf>,
    source: &Source,
) -> Prepared {
    let mut p = Prepared {
        items: Vec::new(),
        unrouted: Vec::new(),
        unreadable: Vec::new(),
    };
    for f in files {
        let mut item = match Item::new(config, f.clone()) {
            Ok(item) => item,
            Err(Unroutable::NoRoute) => {
                if let Err(e) = std::fs::metadata(&f) {
                    p.reject(f, Rejection::Io(e));
                } else {
                    p.unrouted.push(f);
                }
                continue;
            }
            Err(e @ Unroutable::BadName(_)) => {
                p.reject(f, Rejection::Name(e));
                continue;
            }
        };
        // opened once: what is judged, hashed and sent is this descriptor
        let mut local = match LocalFile::open(&f, Follow::Symlinks, None) {
            Ok(l) => l,
            Err(e) => {
                p.reject(f, Rejection::Io(e));
                continue;
            }
        };
        if let Some(j) = journal {
            // by hand: no second read of every byte before the upload
            let id = local.identity(!matches!(source, Source::Manual));
            match id {
                Ok(id) => {
                    let section = &config.routes[item.route].section;
                    match j.add_package(&id, Some(section), source) {
                        Ok(pkg) => {
                            item.package = Some(pkg);
                            item.stale_temps = crate::job::stale_temps(j, pkg);
                        }
                        Err(e) => log::warn!("{}: journal: {e}", item.name),
                    }
                }
                Err(e) => {
                    p.reject(f, Rejection::Io(e));
                    continue;
                }
            }
        }
        item.file = Some(Arc::new(local));
        p.items.push(item);
    }
    p
}

/// `--dry-run`: the waves, hooks and gates each rollout would run (a dry
/// run connects to nothing, so it runs none of them).
fn show_rollouts(g: &Global, config: &Config, items: &[Item]) {
    let mut seen = Vec::new();
    for i in items {
        let r = &config.routes[i.route];
        if !r.is_rollout() || seen.contains(&i.route) {
            continue;
        }
        seen.push(i.route);
        let lines = crate::rollout::describe(r);
        if g.json {
            println!(
                "{}",
                serde_json::json!({"section": r.section, "rollout": lines})
            );
        } else {
            println!("[{}] {}", r.section, lines.join("\n    "));
        }
    }
}

/// Run a batch and collect its outcomes; the console is one of its
/// subscribers and prints each result as it ends.
pub fn run_batch(
    g: &Global,
    config: Arc<Config>,
    netrc: Arc<Netrc>,
    journal: Option<Arc<Journal>>,
    items: Vec<Item>,
    progress: crate::progress::Mode,
) -> Vec<Outcome> {
    let pool = pool(g, &config);
    let progress = crate::progress::Progress::new(progress);
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(p) = &progress {
        sinks.push(Arc::clone(p) as Arc<dyn Sink>);
    }
    if g.json {
        sinks.push(Arc::new(crate::progress::JsonEvents));
    }
    sinks.push(Arc::new(Console::of(g, progress.clone())));
    let (tx, rx) = crossbeam_channel::unbounded();
    let batch = Batch {
        config,
        netrc,
        journal,
        when: chrono::Local::now(),
        dry_run: g.dry_run,
        sinks,
        allow_downgrade: g.allow_downgrade,
    };
    // every file × host the batch owes a result for
    let mut owed: Vec<Outcome> = Vec::new();
    for item in &items {
        let route = &batch.config.routes[item.route];
        for host in &route.hosts {
            if item.only_hosts.as_ref().is_some_and(|o| !o.contains(host)) {
                continue;
            }
            owed.push(died(item, host, &route.section));
        }
    }
    if g.dry_run {
        show_rollouts(g, &batch.config, &items);
    }
    let ticker = progress.as_ref().map(|p| p.ticker());
    batch.run(items, &pool, tx);
    // the channel closes when the last worker is done, also when one
    // panicked: its sender is dropped as it unwinds
    let all = collect(&rx, owed, &mut |o| batch.announce(o));
    pool.join();
    drop(ticker);
    if let Some(p) = &progress {
        p.finish();
    }
    all
}

/// The result of a file × host whose worker died before it reported.
fn died(item: &Item, host: &str, section: &str) -> Outcome {
    Outcome::failed(item, host, section, WORKER_DIED)
}

/// The error of a file × host whose worker panicked (threadpool swallows it).
pub const WORKER_DIED: &str = "internal error: worker died";

/// Take the outcomes until every sender is gone; each one `owed` that never
/// arrived (its worker panicked) becomes a failed result, `announce`d to
/// the batch's subscribers (journal, console) like the others were by
/// their lanes.
fn collect(
    rx: &crossbeam_channel::Receiver<Outcome>,
    mut owed: Vec<Outcome>,
    announce: &mut impl FnMut(&Outcome),
) -> Vec<Outcome> {
    let mut all = Vec::with_capacity(owed.len());
    for o in rx.iter() {
        if let Some(i) = owed
            .iter()
            .position(|w| w.path == o.path && w.host == o.host)
        {
            owed.swap_remove(i);
        }
        all.push(o);
    }
    for o in owed {
        log::error!("{}: {}: {WORKER_DIED}", o.file, o.host);
        announce(&o);
        all.push(o);
    }
    all
}

/// A file name for a terminal line: control characters (a newline in a
/// name) escaped, everything else as is.
pub fn shown(name: &str) -> String {
    crate::config::escape_control(name)
}

/// The console as a subscriber: one result per file × host as it ends —
/// a line (with the install's output tail when it failed), or with `--json`
/// the result's object; `-q` leaves out what went well.
pub struct Console {
    json: bool,
    quiet: bool,
    /// Bars to clear while a result is printed.
    progress: Option<Arc<crate::progress::Progress>>,
}

impl Console {
    pub fn of(g: &Global, progress: Option<Arc<crate::progress::Progress>>) -> Console {
        Console {
            json: g.json,
            quiet: g.quiet,
            progress,
        }
    }
}

impl Sink for Console {
    fn on(&self, e: &Event) {
        if let EventKind::Finished(o) = &e.kind {
            match &self.progress {
                Some(p) => p.suspend(|| self.print(o)),
                None => self.print(o),
            }
        }
    }
}

impl Console {
    fn print(&self, o: &Outcome) {
        let mut out = std::io::stdout().lock();
        if self.json {
            if let Ok(s) = serde_json::to_string(o) {
                let _ = writeln!(out, "{s}");
            }
            return;
        }
        if self.quiet && o.ok {
            return;
        }
        let name = shown(&o.file);
        let how = o.transport.as_deref().unwrap_or("-");
        if o.ok {
            let fb = o
                .fallback_reason
                .as_ref()
                .map(|r| format!(", fallback: {r}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{name}: {}: {} ({how}, {:.2}s{fb}) {}",
                o.host,
                o.state,
                o.elapsed_ms as f64 / 1000.0,
                o.remote_path.as_deref().unwrap_or("")
            );
        } else {
            let _ = writeln!(
                out,
                "{name}: {}: FAILED: {}",
                o.host,
                shown(o.error.as_deref().unwrap_or("unknown error"))
            );
            if let Some(t) = &o.output_tail {
                for l in t.lines() {
                    let _ = writeln!(out, "    | {}", shown(l));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str) -> Item {
        Item {
            path: PathBuf::from(path),
            name: path.to_string(),
            route: 0,
            groups: Default::default(),
            package: None,
            only_hosts: None,
            file: None,
            resume: Default::default(),
            stale_temps: Default::default(),
        }
    }

    #[test]
    fn a_worker_that_panics_leaves_a_failed_result_not_a_gap() {
        let pool = threadpool::Builder::new().num_threads(2).build();
        let (tx, rx) = crossbeam_channel::unbounded();
        let owed = vec![died(&item("a"), "h1", "s"), died(&item("b"), "h1", "s")];
        let mut done = died(&item("a"), "h1", "s");
        done.ok = true;
        done.error = None;
        let tx2 = tx.clone();
        pool.execute(move || {
            let _ = tx2.send(done);
        });
        pool.execute(move || {
            let _keep = tx;
            panic!("a worker dies (this panic is part of the test)");
        });
        let mut announced = Vec::new();
        let all = collect(&rx, owed, &mut |o| announced.push(o.path.clone()));
        pool.join();
        assert_eq!(all.len(), 2);
        assert_eq!(announced, ["b"], "only the lost one is announced here");
        assert!(all.iter().any(|o| o.path == "a" && o.ok));
        let dead: Vec<_> = all.iter().filter(|o| !o.ok).collect();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].path, "b");
        assert_eq!(dead[0].error.as_deref(), Some(WORKER_DIED));
    }
}
