//! What the user typed → a mode, and the modes that run in the foreground:
//! dispatch files now, explain routes, check the config, show history.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use crate::config::Config;
use crate::credentials::{self, Netrc};
use crate::error::{code, Error};
use crate::job::{Batch, Item, Outcome};
use crate::journal::{self, Journal, Source};
use crate::route;
use crate::transport::ssh::{SshSession, SshTarget};

pub const EXIT_CODES: &str = "\
Exit codes:
  0  every file reached every target and installed (or nothing to do)
  1  at least one file × host failed; the others were still done
  2  usage or configuration error: nothing was attempted
  3  a file given by hand matched no route";

#[derive(Parser, Debug)]
#[command(
    name = "dispatch",
    version,
    about = "Upload packages to the hosts their name routes them to, and install them.",
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Files to dispatch now (`-` reads names from stdin, one a line)
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// With `-`: names on stdin are NUL-separated
    #[arg(short = '0', long = "null")]
    pub null: bool,
}

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
    /// Worker threads (default: jobs in [dispatch], 8)
    #[arg(short, long, global = true, value_name = "N")]
    pub jobs: Option<usize>,
    /// Show what would be done; connect to nothing
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// One JSON object per line (per file × host result)
    #[arg(long, global = true)]
    pub json: bool,
    /// Less output
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run as a daemon on the drop directories (from args or `watch` in [dispatch])
    Watch {
        #[arg(value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Called from a VCS hook: dispatch the packages of a revision
    Hook {
        #[command(subcommand)]
        vcs: HookCmd,
    },
    /// Explain which route matches each file; sends nothing
    Route {
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate the config (all errors at once)
    Check {
        /// Also log in to every host and report
        #[arg(long)]
        connect: bool,
    },
    /// What was dispatched, where, when, how it ended
    History {
        /// Only this file (base name or part of the path)
        #[arg(long)]
        file: Option<String>,
        /// Only this host
        #[arg(long)]
        host: Option<String>,
        /// Only failures
        #[arg(long)]
        failed: bool,
        /// At most this many rows (newest first)
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum HookCmd {
    /// svn post-commit: `dispatch hook svn REPOS REV`
    Svn {
        repos: PathBuf,
        rev: String,
        /// Dispatch in the foreground instead of handing over to the daemon's spool
        #[arg(long)]
        now: bool,
    },
    /// git post-receive (reads `old new ref` lines on stdin) or, with --commit, post-commit (HEAD)
    Git {
        /// Repository (default: $GIT_DIR or the current directory)
        #[arg(long)]
        repo: Option<PathBuf>,
        /// post-commit mode: take the files of HEAD
        #[arg(long)]
        commit: bool,
        /// Dispatch in the foreground instead of handing over to the daemon's spool
        #[arg(long)]
        now: bool,
    },
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
        let path = Config::find(self.config.as_deref())?;
        let c = Config::load(&path)?;
        for w in &c.warnings {
            log::warn!("{w}");
        }
        Ok(c)
    }

    pub fn load_netrc(&self) -> Result<Netrc, Error> {
        let n = Netrc::load(self.netrc.as_deref()).map_err(|e| Error::Usage(e.to_string()))?;
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

/// Parse arguments, start logging, run the mode. Returns the exit code.
pub fn main() -> u8 {
    let cli = match Cli::try_parse_from(subcommand_first(std::env::args_os().collect())) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    code::OK
                }
                _ => code::USAGE,
            };
        }
    };
    // the log config may come from the config file: peek at it without failing here
    let log_file = cli.global.log_config.clone().or_else(|| {
        Config::find(cli.global.config.as_deref())
            .ok()
            .and_then(|p| Config::load(&p).ok())
            .and_then(|c| c.settings.log_config)
    });
    // `dispatch FILE…` prints one line per result; without -v its stderr log
    // would only repeat the failures
    let results_on_stdout = cli.command.is_none() && cli.global.verbose == 0;
    if let Err(e) = crate::logging::init(log_file.as_deref(), cli.global.level(), results_on_stdout)
    {
        eprintln!("dispatch: {e}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dispatch: {e}");
            e.exit_code()
        }
    }
}

/// clap does not see a subcommand that follows global options with values
/// (`dispatch -c x.ini route f`); move the subcommand name to the front.
pub fn subcommand_first(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const SUBCOMMANDS: &[&str] = &["watch", "hook", "route", "check", "history", "help"];
    const WITH_VALUE: &[&str] = &["-c", "--config", "--netrc", "--log-config", "-j", "--jobs"];
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            break;
        }
        if WITH_VALUE.contains(&a.as_ref()) {
            i += 2;
            continue;
        }
        if a.starts_with('-') {
            i += 1;
            continue;
        }
        if SUBCOMMANDS.contains(&a.as_ref()) && i > 1 {
            let sub = args.remove(i);
            args.insert(1, sub);
        }
        break;
    }
    args
}

pub fn run(cli: Cli) -> Result<u8, Error> {
    let g = cli.global;
    match cli.command {
        None => {
            if cli.files.is_empty() {
                return Err(Error::Usage(
                    "no files given (dispatch FILE…, or `dispatch --help`)".into(),
                ));
            }
            let files = expand_stdin(cli.files, cli.null)?;
            dispatch_files(&g, files)
        }
        Some(Command::Route { files }) => explain(&g, &files),
        Some(Command::Check { connect }) => check(&g, connect),
        Some(Command::History {
            file,
            host,
            failed,
            limit,
        }) => history(&g, file, host, failed, limit),
        Some(Command::Watch { dirs }) => crate::daemon::run(&g, dirs),
        Some(Command::Hook { vcs }) => crate::hook::run(&g, vcs),
    }
}

/// `-` among the files: read names from stdin.
fn expand_stdin(files: Vec<PathBuf>, null: bool) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for f in files {
        if f.as_os_str() != "-" {
            out.push(f);
            continue;
        }
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| Error::Usage(format!("reading file names from stdin: {e}")))?;
        use std::os::unix::ffi::OsStrExt;
        let sep = if null { b'\0' } else { b'\n' };
        for name in buf.split(|b| *b == sep) {
            let name = if null {
                name
            } else {
                name.strip_suffix(b"\r").unwrap_or(name)
            };
            if !name.is_empty() {
                out.push(PathBuf::from(std::ffi::OsStr::from_bytes(name)));
            }
        }
    }
    Ok(out)
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

pub fn pool(g: &Global, config: &Config) -> threadpool::ThreadPool {
    threadpool::Builder::new()
        .num_threads(g.jobs.unwrap_or(config.settings.jobs).max(1))
        .thread_name("worker".into())
        .build()
}

/// Route and record the files; unrouted or unreadable ones are reported.
pub struct Prepared {
    pub items: Vec<Item>,
    pub unrouted: Vec<PathBuf>,
    pub unreadable: Vec<(PathBuf, String)>,
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
        match std::fs::metadata(&f) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                p.unreadable.push((f, "not a regular file".into()));
                continue;
            }
            Err(e) => {
                p.unreadable.push((f, e.to_string()));
                continue;
            }
        }
        let Some(mut item) = Item::new(config, f.clone()) else {
            p.unrouted.push(f);
            continue;
        };
        if let Some(j) = journal {
            // by hand: no second read of every byte before the upload
            let id = match source {
                Source::Manual => journal::stat_identity(&f),
                _ => journal::file_identity(&f),
            };
            match id {
                Ok(id) => {
                    let section = &config.routes[item.route].section;
                    match j.add_package(&id, Some(section), source) {
                        Ok(pkg) => item.package = Some(pkg),
                        Err(e) => log::warn!("{}: journal: {e}", item.name),
                    }
                }
                Err(e) => {
                    p.unreadable.push((f, e.to_string()));
                    continue;
                }
            }
        }
        p.items.push(item);
    }
    p
}

/// Run a batch and collect its outcomes, printing each as it arrives.
pub fn run_batch(
    g: &Global,
    config: Arc<Config>,
    netrc: Arc<Netrc>,
    journal: Option<Arc<Journal>>,
    items: Vec<Item>,
    mut on_outcome: impl FnMut(&Outcome),
) -> Vec<Outcome> {
    let pool = pool(g, &config);
    let (tx, rx) = crossbeam_channel::unbounded();
    let batch = Batch {
        config,
        netrc,
        journal,
        when: chrono::Local::now(),
        dry_run: g.dry_run,
    };
    batch.run(items, &pool, tx);
    let mut all = Vec::new();
    for o in rx.iter() {
        on_outcome(&o);
        all.push(o);
    }
    pool.join();
    all
}

/// A file name for a terminal line: control characters (a newline in a
/// name) escaped, everything else as is.
pub fn shown(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn print_outcome(g: &Global, o: &Outcome) {
    let mut out = std::io::stdout().lock();
    if g.json {
        if let Ok(s) = serde_json::to_string(o) {
            let _ = writeln!(out, "{s}");
        }
        return;
    }
    if g.quiet && o.ok {
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
            o.error.as_deref().unwrap_or("unknown error")
        );
        if let Some(t) = &o.output_tail {
            for l in t.lines() {
                let _ = writeln!(out, "    | {l}");
            }
        }
    }
}

fn dispatch_files(g: &Global, files: Vec<PathBuf>) -> Result<u8, Error> {
    let config = g.load_config()?;
    let netrc = g.load_netrc()?;
    let journal = if g.dry_run {
        None
    } else {
        open_journal(&config)
    };
    let p = prepare(&config, journal.as_deref(), files, &Source::Manual);
    for f in &p.unrouted {
        eprintln!(
            "dispatch: {}: no route matches this name",
            shown(&route::base_name(f))
        );
        log::warn!("{}: no route matches", route::base_name(f));
    }
    for (f, e) in &p.unreadable {
        eprintln!("dispatch: {}: cannot read: {e}", f.display());
        log::error!("{}: cannot read: {e}", f.display());
    }
    let outcomes = run_batch(
        g,
        Arc::new(config),
        Arc::new(netrc),
        journal,
        p.items,
        |o| print_outcome(g, o),
    );
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    if !g.json && !g.quiet && !outcomes.is_empty() {
        eprintln!(
            "dispatch: {} file × host: {} ok, {failed} failed",
            outcomes.len(),
            outcomes.len() - failed
        );
    }
    Ok(if failed > 0 || !p.unreadable.is_empty() {
        code::FAILED
    } else if !p.unrouted.is_empty() {
        code::UNROUTED
    } else {
        code::OK
    })
}

fn explain(g: &Global, files: &[PathBuf]) -> Result<u8, Error> {
    let config = g.load_config()?;
    let netrc = g.load_netrc()?;
    let now = chrono::Local::now();
    let mut unrouted = false;
    let mut out = std::io::stdout().lock();
    for f in files {
        let name = route::base_name(f);
        let Some(r) = route::route(&config, f) else {
            unrouted = true;
            if g.json {
                let v = serde_json::json!({"file": name, "route": null});
                let _ = writeln!(out, "{v}");
            } else {
                let _ = writeln!(out, "{}: no route matches", shown(&name));
            }
            continue;
        };
        for host in &r.route.hosts {
            let creds = credentials::resolve(r.route, host, &netrc);
            let dir = route::dest_dir(&r, host, &now);
            let (dir, cmd) = match &dir {
                Ok(d) => (d.clone(), route::install_command(&r, host, d)),
                Err(e) => (format!("<refused: {}>", e.0), None),
            };
            let transfer: Vec<String> = r.route.transfer.iter().map(|t| t.to_string()).collect();
            if g.json {
                let v = serde_json::json!({
                    "file": name, "section": r.route.section, "line": r.route.line,
                    "host": host, "port": r.route.port, "login": creds.login,
                    "login_from": creds.origin, "dest_dir": dir,
                    "install_command": cmd, "transfer": transfer, "groups": r.groups,
                });
                let _ = writeln!(out, "{v}");
            } else {
                let _ = writeln!(
                    out,
                    "{}: [{}] (line {}) → {}@{host}:{} ({} from {})\n    dir:     {dir}\n    install: {}\n    via:     {}",
                    shown(&name),
                    r.route.section,
                    r.route.line,
                    creds.login,
                    r.route.port,
                    creds.login,
                    creds.origin,
                    cmd.as_deref().unwrap_or("(none: upload only)"),
                    transfer.join(", ")
                );
            }
        }
    }
    Ok(if unrouted { code::UNROUTED } else { code::OK })
}

fn check(g: &Global, connect: bool) -> Result<u8, Error> {
    let config = g.load_config()?;
    let netrc = g.load_netrc()?;
    let hosts: usize = config.routes.iter().map(|r| r.hosts.len()).sum();
    println!(
        "{}: OK ({} routes, {hosts} route × host pairs)",
        config.path.display(),
        config.routes.len()
    );
    for w in &config.warnings {
        println!("warning: {w}");
    }
    if !connect {
        return Ok(code::OK);
    }
    // one login per distinct (host, port, login)
    let mut seen = Vec::new();
    let mut failed = 0;
    let (tx, rx) = crossbeam_channel::unbounded();
    let pool = pool(g, &config);
    for r in &config.routes {
        for host in &r.hosts {
            let creds = credentials::resolve(r, host, &netrc);
            let key = (host.clone(), r.port, creds.login.clone());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let t = SshTarget {
                host: host.clone(),
                port: r.port,
                login: creds.login,
                password: creds.password,
                identity_file: r.identity_file.clone(),
                host_key_check: r.host_key_check,
                known_hosts: r.known_hosts.clone(),
                connect_timeout: r.connect_timeout,
                io_timeout: r.io_timeout,
            };
            let section = r.section.clone();
            let tx = tx.clone();
            pool.execute(move || {
                let started = std::time::Instant::now();
                let res = SshSession::connect(&t).map(|_| started.elapsed());
                let _ = tx.send((section, t.login, t.host, t.port, res));
            });
        }
    }
    drop(tx);
    for (section, login, host, port, res) in rx.iter() {
        match res {
            Ok(d) => println!(
                "[{section}] {login}@{host}:{port}: ok ({:.2}s)",
                d.as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!("[{section}] {login}@{host}:{port}: FAILED: {e}");
            }
        }
    }
    Ok(if failed > 0 { code::FAILED } else { code::OK })
}

fn history(
    g: &Global,
    file: Option<String>,
    host: Option<String>,
    failed: bool,
    limit: usize,
) -> Result<u8, Error> {
    let config = g.load_config()?;
    let j = Journal::open(&config.settings.state_dir).map_err(|e| Error::Fatal(e.to_string()))?;
    let rows = j
        .history(&journal::HistoryFilter {
            file,
            host,
            failed_only: failed,
            limit: Some(limit),
        })
        .map_err(|e| Error::Fatal(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    if g.json {
        for r in &rows {
            if let Ok(s) = serde_json::to_string(r) {
                let _ = writeln!(out, "{s}");
            }
        }
    } else {
        let _ = write!(out, "{}", journal::format_history(&rows));
    }
    Ok(code::OK)
}
