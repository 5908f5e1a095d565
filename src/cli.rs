//! What the user typed → a mode, and the modes that run in the foreground:
//! dispatch files now, explain routes, check the config, show history.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

pub use crate::app::{
    open_journal, pool, prepare, run_batch, shown, Global, Prepared, Rejected, WORKER_DIED,
};
use crate::config::{escape_control, Config};
use crate::credentials;
use crate::error::{code, Error, UsageError};
pub use crate::hook::HookCmd;
use crate::journal::{self, Journal, Source};
use crate::logging::PRINTED;
use crate::route::{self, Unroutable};
use crate::transport::ssh::{SshSession, SshTarget};
use crate::transport::TransferError;

pub const EXIT_CODES: &str = "\
Exit codes:
  0  every file reached every target and installed (or nothing to do)
  1  at least one file × host failed; the others were still done
  2  usage or configuration error: nothing was attempted
  3  a file given by hand matched no route";

const WATCH_HELP: &str = "\
Examples:
  dispatch watch /srv/drop            watch one directory (config from the default search)
  dispatch -c /etc/dispatch/dispatch.ini watch
                                      the directories of `watch` in [dispatch]
  kill -HUP PID                       reload the config (a broken one is refused, the old kept)

Exit codes:
  0  stopped by SIGTERM/SIGINT after the uploads in flight finished
  2  usage or configuration error (no drop directory, bad config, journal unusable)";

const STATUS_HELP: &str = "\
Examples:
  dispatch status                     queue, files in flight, parked failures, each host's last result
  dispatch status --json              the daemon's /api/v1/status snapshot as it is
  curl -s http://127.0.0.1:8377/metrics
                                      the same daemon's Prometheus metrics (a page at /)

Exit codes:
  0  the daemon answered and nothing is parked
  1  something is parked (see its reason), or no daemon answered
  2  usage or configuration error (status_listen = off)";

const LOCK_HELP: &str = "\
Examples:
  dispatch lock status 'web-'         each host of [web-]: free, or who holds it, since when, until when
  dispatch lock break web1            a holder that died long before its expiry

Exit codes:
  0  every host answered
  1  a host could not be asked
  2  usage or configuration error";

const RELEASES_HELP: &str = "\
Examples:
  dispatch releases 'web-'            every host of the route [web-]: its releases, the active one marked
  dispatch releases web-1.2.tar.gz --host web1 --json

Exit codes:
  0  every host answered
  1  a host could not be asked
  2  usage or configuration error (no such route, or it has no `current`)";

const ROLLBACK_HELP: &str = "\
Examples:
  dispatch rollback 'web-'            every host back to the release before its active one
  dispatch rollback 'web-' --to 20261204_101500 --host web1

The release must be a good one on every host concerned (checked before any
host is touched); the route's strategy, host lock, hooks, activate_command and
health gate apply as in a rollout.

Exit codes:
  0  every host is on the release and healthy
  1  a host failed (or was skipped after one failed)
  2  usage or configuration error (no such route or release, no `current`)";

const ROUTE_HELP: &str = "\
Examples:
  dispatch route web-1.2.tar.gz       which section, hosts, remote dir and install command
  dispatch route --json *.deb         the same as JSON, one object per file

Exit codes:
  0  every file matched a route
  2  usage or configuration error
  3  at least one file matched no route";

const CHECK_HELP: &str = "\
Examples:
  dispatch check                      every problem of the config, each with file:line
  dispatch check --connect            also log in to every route's hosts, one line per route × host
  dispatch -c legacy.cfg check --json

Exit codes:
  0  the config is valid (and, with --connect, every login worked)
  1  with --connect: at least one route × host could not log in
  2  the config has errors";

const HISTORY_HELP: &str = "\
Examples:
  dispatch history                    the newest 100 runs
  dispatch history --failed --since 2h
  dispatch history --file web-1.2.tar.gz --host web1
  dispatch history --run 42           one run in full: its state changes and whole output

Exit codes:
  0  shown (also when nothing matched or nothing was recorded yet)
  2  usage or configuration error";

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

#[derive(Subcommand, Debug)]
pub enum LockCmd {
    /// Who holds the lock on each host of a route (or on one host)
    #[command(after_help = LOCK_HELP)]
    Status {
        /// A section name, or a host
        #[arg(value_name = "ROUTE|HOST")]
        target: String,
    },
    /// Remove a host's lock, whoever holds it (logged)
    #[command(after_help = LOCK_HELP)]
    Break {
        #[arg(value_name = "HOST")]
        host: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run as a daemon on the drop directories (from args or `watch` in [dispatch])
    #[command(after_help = WATCH_HELP)]
    Watch {
        /// Drop directories to watch (default: `watch` in [dispatch])
        #[arg(value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Called from a VCS hook: dispatch the packages of a revision
    Hook {
        #[command(subcommand)]
        vcs: HookCmd,
    },
    /// Explain which route matches each file; sends nothing
    #[command(after_help = ROUTE_HELP)]
    Route {
        /// Package names or paths (need not exist)
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate the config (all errors at once)
    #[command(after_help = CHECK_HELP)]
    Check {
        /// Also log in to every host and report
        #[arg(long)]
        connect: bool,
    },
    /// What was dispatched, where, when, how it ended
    #[command(after_help = HISTORY_HELP)]
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
        /// Only this run, in full (its state changes and whole output)
        #[arg(long, value_name = "ID")]
        run: Option<i64>,
        /// Only runs changed since: a time ago (`30m`, `2h`, `7d`) or a local date/time (`2026-01-31`, `2026-01-31 14:00`)
        #[arg(long, value_name = "WHEN", value_parser = parse_since)]
        since: Option<i64>,
        /// At most this many rows (newest first)
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Ask the running daemon what it is doing (its status server)
    #[command(after_help = STATUS_HELP)]
    Status,
    /// Each host's releases of a route (`current`), and which one is active
    #[command(after_help = RELEASES_HELP)]
    Releases {
        /// The route: its section name, or a file name it takes
        #[arg(value_name = "ROUTE")]
        route: String,
        /// Only this host (repeatable)
        #[arg(long, value_name = "HOST")]
        host: Vec<String>,
    },
    /// The rollout lock on hosts: who holds it; break a stale one by hand
    Lock {
        #[command(subcommand)]
        action: LockCmd,
    },
    /// Point a route's hosts back at an earlier release, host by host as its rollout goes
    #[command(after_help = ROLLBACK_HELP)]
    Rollback {
        /// The route: its section name, or a file name it takes
        #[arg(value_name = "ROUTE")]
        route: String,
        /// Only this host (repeatable)
        #[arg(long, value_name = "HOST")]
        host: Vec<String>,
        /// The release (its dir name); default: the one before the active one
        #[arg(long, value_name = "RELEASE")]
        to: Option<String>,
    },
    /// Write the man pages: dispatch.1 to stdout, or every page into DIR
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(hide = true)]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// `--since`: a time ago (`90s`, `30m`, `2h`, `7d`, `2w`) or a local date
/// (`2026-01-31`), date and time (`2026-01-31 14:00[:05]`, `T` also) or RFC
/// 3339 time → milliseconds since the epoch.
pub fn parse_since(s: &str) -> Result<i64, SinceError> {
    use chrono::{NaiveDate, NaiveDateTime, TimeZone};
    let s = s.trim();
    let now = chrono::Local::now();
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let num = &s[..s.len() - 1];
        if let Ok(n) = num.parse::<u32>() {
            let secs: i64 = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 604_800,
                _ => return Err(SinceError::new(s, SinceProblem::UnknownUnit)),
            };
            return Ok(now.timestamp_millis() - i64::from(n) * secs * 1000);
        }
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let local = |t: NaiveDateTime| {
        chrono::Local
            .from_local_datetime(&t)
            .earliest()
            .map(|t| t.timestamp_millis())
            .ok_or_else(|| SinceError::new(s, SinceProblem::NoSuchLocalTime))
    };
    for f in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return local(t);
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return local(t);
        }
    }
    Err(SinceError::new(s, SinceProblem::NotATime))
}

/// A `--since` value that is not a time; `input` as given (trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinceError {
    pub input: String,
    pub problem: SinceProblem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinceProblem {
    /// A number with a unit letter that is not s, m, h, d or w.
    UnknownUnit,
    /// A local date/time that does not exist (skipped by a DST change).
    NoSuchLocalTime,
    /// Neither a time ago nor a date.
    NotATime,
}

impl SinceError {
    fn new(input: &str, problem: SinceProblem) -> SinceError {
        SinceError {
            input: input.to_string(),
            problem,
        }
    }
}

impl std::fmt::Display for SinceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.input;
        match self.problem {
            SinceProblem::UnknownUnit => write!(f, "{s:?}: unknown unit (s, m, h, d, w)"),
            SinceProblem::NoSuchLocalTime => write!(f, "{s:?}: no such local time"),
            SinceProblem::NotATime => write!(
                f,
                "{s:?}: not a time ago (30m, 2h, 7d) or a date (2026-01-31, 2026-01-31 14:00)"
            ),
        }
    }
}

impl std::error::Error for SinceError {}

/// The global options each subcommand uses (by id); the others are left
/// out of its `--help` (still accepted, and ignored).
const OPTIONS_THAT_APPLY: &[(&str, &[&str])] = &[
    (
        "releases",
        &["config", "netrc", "log_config", "json", "quiet", "verbose"],
    ),
    (
        "rollback",
        &[
            "config",
            "netrc",
            "log_config",
            "jobs",
            "json",
            "quiet",
            "verbose",
        ],
    ),
    (
        "watch",
        &[
            "config",
            "netrc",
            "log_config",
            "jobs",
            "dry_run",
            "quiet",
            "verbose",
        ],
    ),
    (
        "route",
        &["config", "log_config", "json", "quiet", "verbose"],
    ),
    (
        "check",
        &[
            "config",
            "netrc",
            "log_config",
            "jobs",
            "json",
            "quiet",
            "verbose",
        ],
    ),
    (
        "history",
        &["config", "log_config", "json", "quiet", "verbose"],
    ),
    (
        "status",
        &["config", "log_config", "json", "quiet", "verbose"],
    ),
];

/// The command line for help, man pages and completions: each
/// subcommand showing only the options that apply to it.
pub fn command() -> clap::Command {
    only_what_applies(<Cli as clap::CommandFactory>::command())
}

/// `cmd` built, its subcommands' inapplicable global options hidden.
fn only_what_applies(mut cmd: clap::Command) -> clap::Command {
    // propagates the global options into the subcommands
    cmd.build();
    let globals: Vec<String> = <Global as clap::Args>::augment_args(clap::Command::new("g"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for (sub, applies) in OPTIONS_THAT_APPLY {
        cmd = cmd.mut_subcommand(*sub, |mut sc| {
            for id in globals.iter().filter(|id| !applies.contains(&id.as_str())) {
                if sc.get_arguments().any(|a| a.get_id() == id.as_str()) {
                    sc = sc.mut_arg(id.as_str(), |a| a.hide(true));
                }
            }
            sc
        });
    }
    cmd
}

/// `dispatch SUB --help` / `-h`: SUB's help with the options that apply
/// (clap renders the rest: its own help of `dispatch`, errors).
fn subcommand_help(args: &[std::ffi::OsString]) -> Option<String> {
    let sub = args.get(1)?.to_str()?;
    let long = args.iter().any(|a| a == "--help");
    if !long && !args.iter().any(|a| a == "-h") {
        return None;
    }
    let mut cmd = command();
    let sc = cmd.find_subcommand_mut(sub)?;
    if sc.has_subcommands() {
        return None;
    }
    let help = if long {
        sc.render_long_help()
    } else {
        sc.render_help()
    };
    use std::io::IsTerminal;
    let text = if std::io::stdout().is_terminal() {
        help.ansi().to_string()
    } else {
        help.to_string()
    };
    Some(text)
}

/// Parse arguments, start logging, run the mode. Returns the exit code.
pub fn main() -> u8 {
    let args = subcommand_first(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            if e.kind() == clap::error::ErrorKind::DisplayHelp {
                if let Some(h) = subcommand_help(&args) {
                    print!("{h}");
                    return code::OK;
                }
            }
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    code::OK
                }
                _ => code::USAGE,
            };
        }
    };
    // the log config may come from the config file: peek at it without failing
    // here (a broken config is reported by the command)
    let log_file = match &cli.global.log_config {
        Some(p) => Some((p.clone(), "--log-config".to_string())),
        None => Config::find(cli.global.config.as_deref())
            .ok()
            .and_then(|p| Config::load(&p).ok())
            .and_then(|c| {
                let from = format!("log_config in {}", c.path.display());
                c.settings.log_config.map(|l| (l, from))
            }),
    };
    // `dispatch FILE…` prints one line per result; without -v its stderr log
    // would only repeat the failures
    let results_on_stdout = cli.command.is_none() && cli.global.verbose == 0;
    // and the progress output tells retries and fallbacks itself
    let g = &cli.global;
    let progress_shown = g.progress.resolve(g.json, g.quiet) != crate::progress::Mode::None;
    let stderr = crate::logging::Stderr {
        results_on_stdout,
        events_shown: results_on_stdout && progress_shown,
    };
    let log_path = log_file.as_ref().map(|(p, _)| p.as_path());
    if let Err(e) = crate::logging::init(log_path, cli.global.level(), stderr) {
        // asked for a log and cannot have it: nothing is attempted without it
        let from = log_file.map(|(_, f)| f).unwrap_or_default();
        eprintln!("dispatch: {} ({from})", escape_control(&e.to_string()));
        return code::USAGE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            print_error(&e);
            e.exit_code()
        }
    }
}

/// Print an error once, as `dispatch: …`, control characters escaped (the
/// config's problems escape their own and are capped; see [`ConfigError`]).
///
/// [`ConfigError`]: crate::config::ConfigError
pub fn print_error(e: &Error) {
    match e {
        Error::Config(c) => eprintln!("dispatch: {c}"),
        other => eprintln!("dispatch: {}", escape_control(&other.to_string())),
    }
}

/// clap does not see a subcommand that follows global options with values
/// (`dispatch -c x.ini route f`); move the subcommand name to the front.
pub fn subcommand_first(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const SUBCOMMANDS: &[&str] = &[
        "watch",
        "hook",
        "route",
        "check",
        "history",
        "status",
        "releases",
        "rollback",
        "lock",
        "man",
        "completions",
        "help",
    ];
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
                return Err(UsageError::NoFiles.into());
            }
            if let Some(e) = mistyped_command(&cli.files[0]) {
                return Err(e.into());
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
            run,
            since,
            limit,
        }) => history(
            &g,
            journal::HistoryFilter {
                file,
                host,
                failed_only: failed,
                run,
                since_ms: since,
                limit: Some(limit),
            },
        ),
        Some(Command::Man { dir }) => man(dir),
        Some(Command::Completions { shell }) => {
            let mut cmd = command();
            clap_complete::generate(shell, &mut cmd, "dispatch", &mut std::io::stdout());
            Ok(code::OK)
        }
        Some(Command::Watch { dirs }) => crate::daemon::run(&g, dirs),
        Some(Command::Status) => crate::status::client::run(&g),
        Some(Command::Releases { route, host }) => releases(&g, &route, &host),
        Some(Command::Lock { action }) => lock_command(&g, action),
        Some(Command::Rollback { route, host, to }) => rollback(&g, &route, &host, to.as_deref()),
        Some(Command::Hook { vcs }) => crate::hook::run(&g, vcs),
    }
}

/// `dispatch chek`: a first argument that is no file, looks like a word
/// (no `/`, no `.`) and is one or two letters from a command is a mistyped
/// command, not a missing package.
fn mistyped_command(first: &Path) -> Option<UsageError> {
    const COMMANDS: [&str; 6] = ["watch", "hook", "route", "check", "history", "status"];
    let given = first.to_str()?;
    if given.contains(['/', '.']) || first.symlink_metadata().is_ok() {
        return None;
    }
    let lower = given.to_ascii_lowercase();
    COMMANDS
        .into_iter()
        .map(|c| (crate::config::distance(&lower, c), c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, command)| UsageError::NotACommand {
            given: escape_control(given),
            command,
        })
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
            .map_err(UsageError::Stdin)?;
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

/// The inputs that are not sent, one line (or JSON object) each. Printed
/// here; the log gets them too, but its stderr fallback shows them only
/// with -v (target PRINTED), so each is seen once.
fn report_unsent(g: &Global, p: &Prepared) {
    for f in &p.unrouted {
        let name = shown(&route::base_name(f));
        if g.json {
            print_json(&input_json(f, "unrouted", "no route matches this name"));
        } else {
            eprintln!("dispatch: {name}: no route matches this name");
        }
        log::warn!(target: PRINTED, "{name}: no route matches");
    }
    for u in &p.unreadable {
        let (f, e) = (&u.path, &u.why);
        let path = shown(&f.display().to_string());
        if g.json {
            print_json(&input_json(f, e.kind().as_str(), &e.to_string()));
        } else {
            eprintln!("dispatch: {path}: cannot read: {e}");
        }
        log::error!(target: PRINTED, "{path}: cannot read: {e}");
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
    if !g.dry_run {
        if let Err(e) = crate::interrupt::install_handlers() {
            log::warn!("cannot handle Ctrl-C cleanly: {e}");
        }
    }
    // every package is held open from judging to its last host
    crate::app::raise_open_file_limit();
    let p = prepare(&config, journal.as_deref(), files, &Source::Manual);
    let inputs = p.items.len() + p.unrouted.len() + p.unreadable.len();
    report_unsent(g, &p);
    let progress = g.progress.resolve(g.json, g.quiet);
    let outcomes = run_batch(
        g,
        Arc::new(config),
        Arc::new(netrc),
        journal,
        p.items,
        progress,
    );
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    if !g.json && !g.quiet {
        if let Some(s) = summary(outcomes.len(), failed, p.unreadable.len(), p.unrouted.len()) {
            eprintln!("dispatch: {s}");
        }
    }
    let interrupted = crate::interrupt::requested();
    let exit = if interrupted {
        code::INTERRUPTED
    } else if failed > 0 || !p.unreadable.is_empty() {
        code::FAILED
    } else if !p.unrouted.is_empty() {
        code::UNROUTED
    } else {
        code::OK
    };
    if g.json {
        let count = |k: Rejected| p.unreadable.iter().filter(|u| u.why.kind() == k).count();
        print_json(&serde_json::json!({"summary": {
            "inputs": inputs,
            "results": outcomes.len(),
            "ok": outcomes.len() - failed,
            "failed": failed,
            "unrouted": p.unrouted.len(),
            "missing": count(Rejected::Missing),
            "unreadable": count(Rejected::Unreadable),
            "refused": count(Rejected::Refused),
            "interrupted": interrupted,
            "exit_code": exit,
        }}));
    }
    if interrupted {
        eprintln!("dispatch: interrupted: temporary files removed from the hosts; nothing left half-done is reported as done");
    }
    Ok(exit)
}

/// One JSON line on stdout.
fn print_json(v: &serde_json::Value) {
    let _ = writeln!(std::io::stdout().lock(), "{v}");
}

/// The `--json` record of an input that gave no file × host result:
/// `state` is `unrouted`, `missing`, `unreadable` or `refused`.
fn input_json(path: &std::path::Path, state: &str, error: &str) -> serde_json::Value {
    serde_json::json!({
        "file": route::base_name(path),
        "path": path.to_string_lossy(),
        "host": null,
        "state": state,
        "ok": false,
        "error": error,
    })
}

/// The last line of a foreground run; every input is counted: an input that
/// could not be read is a failure, one that matched no route is unrouted.
/// `None` when there was nothing at all.
pub fn summary(
    results: usize,
    failed: usize,
    unreadable: usize,
    unrouted: usize,
) -> Option<String> {
    if results + unreadable + unrouted == 0 {
        return None;
    }
    let inputs = match unreadable {
        0 => String::new(),
        1 => " + 1 input not readable".to_string(),
        n => format!(" + {n} inputs not readable"),
    };
    let mut s = format!(
        "{results} file × host{inputs}: {} ok, {} failed",
        results - failed,
        failed + unreadable
    );
    if unrouted > 0 {
        s.push_str(&format!(", {unrouted} unrouted"));
    }
    Some(s)
}

fn explain(g: &Global, files: &[PathBuf]) -> Result<u8, Error> {
    let config = g.load_config()?;
    let netrc = g.load_netrc()?;
    let now = chrono::Local::now();
    let mut unrouted = false;
    let mut out = std::io::stdout().lock();
    for f in files {
        let name = route::base_name(f);
        let r = match route::route(&config, f) {
            Ok(r) => r,
            Err(Unroutable::BadName(why)) => {
                unrouted = true;
                let _ = writeln!(out, "{}: {why}", shown(&name));
                continue;
            }
            Err(Unroutable::NoRoute) => {
                unrouted = true;
                if g.json {
                    let v = serde_json::json!({"file": name, "route": null});
                    let _ = writeln!(out, "{v}");
                } else {
                    let _ = writeln!(out, "{}: no route matches", shown(&name));
                }
                continue;
            }
        };
        for host in &r.route.hosts {
            let creds = credentials::resolve(r.route, host, &netrc);
            let dir = route::dest_dir(&r, host, &now);
            let (dir, cmd) = match &dir {
                Ok(d) => {
                    // as the host will see it: ~ stands for the login's home
                    let shown = route::home_relative(d);
                    let cmd = route::install_command(&r, host, &shown);
                    (shown, cmd)
                }
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
        if r.route.is_rollout() {
            explain_rollout(&mut out, g, &name, r.route);
        }
    }
    Ok(if unrouted { code::UNROUTED } else { code::OK })
}

/// The waves, hooks and gates a route's rollout runs.
fn explain_rollout(out: &mut impl Write, g: &Global, name: &str, r: &crate::config::Route) {
    let lines = crate::rollout::describe(r);
    if g.json {
        let v = serde_json::json!({"file": name, "section": r.section, "rollout": lines});
        let _ = writeln!(out, "{v}");
    } else {
        for l in lines {
            let _ = writeln!(out, "    {l}");
        }
    }
}

/// `check`: the config (all its problems at once), then with `--connect`
/// one login per route × host. `--json`: an object for the config, one per
/// login, then a summary; `-q`: only problems (warnings, failed logins).
fn check(g: &Global, connect: bool) -> Result<u8, Error> {
    let config = match g.load_config_silently() {
        Ok(c) => c,
        Err(Error::Config(e)) if g.json => {
            print_config_problems(&e);
            return Ok(code::USAGE);
        }
        Err(e) => return Err(e),
    };
    let netrc = g.load_netrc()?;
    print_config_ok(g, &config);
    if !connect {
        if g.json {
            print_json(&serde_json::json!({"summary": {
                "config_ok": true, "warnings": config.warnings.len(), "exit_code": code::OK,
            }}));
        }
        return Ok(code::OK);
    }
    let logins = try_logins(g, &config, &netrc);
    let failed = logins.iter().filter(|l| l.result.is_err()).count();
    for l in &logins {
        print_login(g, l);
    }
    let exit = if failed > 0 { code::FAILED } else { code::OK };
    if g.json {
        print_json(&serde_json::json!({"summary": {
            "config_ok": true, "warnings": config.warnings.len(),
            "logins": logins.len(), "ok": logins.len() - failed, "failed": failed,
            "exit_code": exit,
        }}));
    }
    Ok(exit)
}

/// `check --json` of a config that does not load: every problem, then the summary.
fn print_config_problems(e: &crate::config::ConfigError) {
    let problems: Vec<serde_json::Value> = e
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "file": p.file.to_string_lossy(), "line": p.line, "error": p.msg,
            })
        })
        .collect();
    let file = e.problems.first().map(|p| p.file.to_string_lossy());
    print_json(&serde_json::json!({"config": file, "ok": false, "problems": problems}));
    print_json(&serde_json::json!({"summary": {
        "config_ok": false, "problems": e.problems.len(), "exit_code": code::USAGE,
    }}));
}

/// `check` of a config that loads: its size and its warnings (logged too).
fn print_config_ok(g: &Global, config: &Config) {
    let hosts: usize = config.routes.iter().map(|r| r.hosts.len()).sum();
    if g.json {
        print_json(&serde_json::json!({
            "config": config.path.to_string_lossy(), "ok": true,
            "routes": config.routes.len(), "route_hosts": hosts, "warnings": config.warnings,
        }));
    } else {
        if !g.quiet {
            println!(
                "{}: OK ({} routes, {hosts} route × host pairs)",
                shown(&config.path.display().to_string()),
                config.routes.len()
            );
        }
        for w in &config.warnings {
            println!("warning: {}", shown(w));
        }
    }
    for w in &config.warnings {
        log::warn!(target: PRINTED, "{w}");
    }
}

/// One `check --connect` login: what was tried and how it went.
struct Login {
    /// `[section] login@host:port`
    what: String,
    /// The `--json` record, without its result.
    json: serde_json::Value,
    /// How long the login took, or why it failed.
    result: Result<std::time::Duration, LoginError>,
}

/// Why a `check --connect` login failed.
#[derive(Debug)]
enum LoginError {
    Refused(TransferError),
    /// Its worker died before reporting.
    WorkerDied,
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::Refused(e) => write!(f, "{e}"),
            LoginError::WorkerDied => f.write_str(WORKER_DIED),
        }
    }
}

/// One login per route × host, each with the route's own credentials, key
/// and known_hosts (two routes to the same login@host:port may differ in any
/// of them), on the worker pool; in config order.
fn try_logins(g: &Global, config: &Config, netrc: &credentials::Netrc) -> Vec<Login> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let pool = pool(g, config);
    let mut owed = Vec::new();
    for (ri, r) in config.routes.iter().enumerate() {
        for (hi, host) in r.hosts.iter().enumerate() {
            let creds = credentials::resolve(r, host, netrc);
            let t = SshTarget {
                host: host.to_string(),
                port: r.port,
                login: creds.login,
                password: creds.password,
                identity_file: r.identity_file.clone(),
                host_key_check: r.host_key_check,
                known_hosts: r.known_hosts.clone(),
                connect_timeout: r.connect_timeout,
                io_timeout: r.io_timeout,
            };
            owed.push((
                (ri, hi),
                format!("[{}] {}@{host}:{}", r.section, t.login, r.port),
                serde_json::json!({
                    "section": r.section, "host": host, "port": r.port, "login": t.login,
                }),
            ));
            let tx = tx.clone();
            pool.execute(move || {
                let started = std::time::Instant::now();
                let res = SshSession::connect(&t)
                    .map(|_| started.elapsed())
                    .map_err(LoginError::Refused);
                let _ = tx.send(((ri, hi), res));
            });
        }
    }
    drop(tx);
    let mut results: std::collections::HashMap<_, _> = rx.iter().collect();
    pool.join();
    owed.into_iter()
        .map(|(key, what, json)| Login {
            what,
            json,
            result: results.remove(&key).unwrap_or(Err(LoginError::WorkerDied)),
        })
        .collect()
}

fn print_login(g: &Global, l: &Login) {
    if g.json {
        let mut json = l.json.clone();
        json["ok"] = l.result.is_ok().into();
        match &l.result {
            Ok(d) => json["elapsed_ms"] = (d.as_millis() as u64).into(),
            Err(e) => json["error"] = e.to_string().into(),
        }
        print_json(&json);
        return;
    }
    match &l.result {
        Ok(d) if !g.quiet => println!("{}: ok ({:.2}s)", shown(&l.what), d.as_secs_f64()),
        Ok(_) => {}
        Err(e) => println!("{}: FAILED: {}", shown(&l.what), shown(&e.to_string())),
    }
}

fn history(g: &Global, filter: journal::HistoryFilter) -> Result<u8, Error> {
    let config = g.load_config()?;
    let j = Journal::open(&config.settings.state_dir).map_err(Error::Journal)?;
    let rows = j.history(&filter).map_err(Error::Journal)?;
    let mut out = std::io::stdout().lock();
    if let Some(id) = filter.run {
        let Some(r) = rows.first() else {
            return Err(Error::NoSuchRun {
                id,
                journal: j.path().to_path_buf(),
            });
        };
        let events = j.run_events(id).map_err(Error::Journal)?;
        if g.json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["events"] = serde_json::to_value(&events).unwrap_or_default();
            let _ = writeln!(out, "{v}");
        } else {
            let _ = write!(out, "{}", journal::format_run(r, &events));
        }
        return Ok(code::OK);
    }
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

/// `dispatch man [DIR]`: the man pages, made from the command line's own
/// definition (so they cannot drift from `--help`).
fn man(dir: Option<PathBuf>) -> Result<u8, Error> {
    match dir {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command())
                .render(&mut out)
                .map_err(|cause| Error::ManPage { dir: None, cause })?;
        }
        Some(dir) => {
            let failed = |cause| Error::ManPage {
                dir: Some(dir.clone()),
                cause,
            };
            std::fs::create_dir_all(&dir).map_err(failed)?;
            // no pages for the `help` pseudo-subcommands
            fn no_help(c: clap::Command) -> clap::Command {
                c.disable_help_subcommand(true).mut_subcommands(no_help)
            }
            let cmd = only_what_applies(no_help(<Cli as clap::CommandFactory>::command()));
            clap_mangen::generate_to(cmd, &dir).map_err(failed)?;
        }
    }
    Ok(code::OK)
}

/// `ROUTE` of `releases` / `rollback`: a section name, else the route a
/// file of that name takes; it must have `current`.
fn releases_route(
    config: &crate::config::Config,
    name: &str,
    hosts: &[String],
) -> Result<(usize, Vec<String>), Error> {
    let no = |why: &'static str| UsageError::NoSuchRoute {
        given: name.to_string(),
        why,
    };
    let idx = config
        .routes
        .iter()
        .position(|r| r.section == name)
        .or_else(|| {
            let r = route::route(config, Path::new(name)).ok()?;
            config.routes.iter().position(|x| std::ptr::eq(x, r.route))
        })
        .ok_or_else(|| no("no section of that name, and no route takes a file of that name"))?;
    let r = &config.routes[idx];
    if r.current.is_none() {
        return Err(no("its route has no `current`: it keeps no releases").into());
    }
    if let Some(h) = hosts.iter().find(|h| !r.hosts.contains(h)) {
        return Err(UsageError::NoSuchRoute {
            given: format!("--host {h}"),
            why: "not one of the route's hosts",
        }
        .into());
    }
    let chosen = r
        .hosts
        .iter()
        .filter(|h| hosts.is_empty() || hosts.contains(h))
        .cloned()
        .collect();
    Ok((idx, chosen))
}

fn release_batch(g: &Global, config: crate::config::Config) -> Result<crate::job::Batch, Error> {
    Ok(crate::job::Batch {
        netrc: Arc::new(g.load_netrc()?),
        journal: crate::app::open_journal(&config),
        when: chrono::Local::now(),
        dry_run: false,
        sinks: Vec::new(),
        allow_downgrade: false,
        config: Arc::new(config),
    })
}

/// `dispatch releases ROUTE`.
fn releases(g: &Global, name: &str, hosts: &[String]) -> Result<u8, Error> {
    let config = g.load_config()?;
    let (idx, hosts) = releases_route(&config, name, hosts)?;
    let batch = release_batch(g, config)?;
    let mut failed = false;
    for (host, r) in batch.releases(idx, &hosts) {
        match r {
            Ok(rel) if g.json => println!(
                "{}",
                serde_json::json!({"host": host, "active": rel.active, "previous": rel.previous(),
                                   "good": rel.good, "failed": rel.failed})
            ),
            Ok(rel) => print_releases(&host, &rel),
            Err(e) => {
                failed = true;
                eprintln!("dispatch: {host}: cannot list its releases: {e}");
            }
        }
    }
    Ok(if failed { code::FAILED } else { code::OK })
}

fn print_releases(host: &str, rel: &crate::rollout::HostReleases) {
    println!("{host}:");
    let mut all: Vec<(&String, &str)> = rel
        .good
        .iter()
        .map(|d| (d, "good"))
        .chain(rel.failed.iter().map(|d| (d, "failed")))
        .collect();
    all.sort();
    for (d, state) in all {
        let mark = if rel.active.as_ref() == Some(d) {
            "  * active"
        } else if rel.previous() == Some(d) {
            "  previous"
        } else {
            ""
        };
        println!("  {d}  {state}{mark}");
    }
    if rel.active.is_none() {
        println!("  (no current release)");
    }
}

/// The release `to` (default: the one before the active one on the first
/// host), as a good release on every host, else why not.
fn rollback_targets(
    found: Vec<(String, Result<crate::rollout::HostReleases, String>)>,
    to: Option<&str>,
) -> Result<(String, std::collections::BTreeMap<String, String>), UsageError> {
    let mut target = std::collections::BTreeMap::new();
    let mut wanted = to.map(str::to_string);
    for (host, r) in found {
        let no = |why: String| UsageError::NoRelease {
            host: host.clone(),
            why,
        };
        let rel = r.map_err(|e| no(format!("cannot list its releases: {e}")))?;
        if wanted.is_none() {
            let prev = rel
                .previous()
                .ok_or_else(|| no("no good release before the active one".into()))?;
            wanted = prev.rsplit('/').next().map(str::to_string);
        }
        let w = wanted.clone().unwrap_or_default();
        let dir = rel
            .find(&w)
            .ok_or_else(|| no(format!("no good release {w}")))?;
        target.insert(host, dir.clone());
    }
    Ok((wanted.unwrap_or_default(), target))
}

/// `dispatch rollback ROUTE [--host H…] [--to RELEASE]`: the release is
/// chosen and checked on every host first; then the rollout.
fn rollback(g: &Global, name: &str, hosts: &[String], to: Option<&str>) -> Result<u8, Error> {
    let config = g.load_config()?;
    let (idx, hosts) = releases_route(&config, name, hosts)?;
    let pool = crate::app::pool(g, &config);
    let batch = release_batch(g, config)?;
    let (release, target) = rollback_targets(batch.releases(idx, &hosts), to)?;
    let mut failed = false;
    for end in batch.rollback(idx, target, &pool) {
        failed |= end.error.is_some();
        if g.json {
            let v = serde_json::json!({"host": end.host, "release": release,
                                       "ok": end.error.is_none(), "error": end.error});
            println!("{v}");
        } else {
            match &end.error {
                None => println!("{}: rolled back to {release}", end.host),
                Some(e) => println!("{}: FAILED: {e}", end.host),
            }
        }
    }
    Ok(if failed { code::FAILED } else { code::OK })
}

/// The hosts `target` names (a section's hosts, or one host), each with the
/// route whose connection settings reach it.
fn lock_hosts(config: &crate::config::Config, target: &str) -> Result<Vec<(usize, String)>, Error> {
    if let Some(i) = config.routes.iter().position(|r| r.section == target) {
        return Ok(config.routes[i]
            .hosts
            .iter()
            .map(|h| (i, h.clone()))
            .collect());
    }
    config
        .routes
        .iter()
        .position(|r| r.hosts.iter().any(|h| h == target))
        .map(|i| vec![(i, target.to_string())])
        .ok_or_else(|| {
            UsageError::NoSuchRoute {
                given: target.to_string(),
                why: "neither a section nor a host of one",
            }
            .into()
        })
}

/// `dispatch lock status ROUTE|HOST` and `dispatch lock break HOST`.
fn lock_command(g: &Global, action: LockCmd) -> Result<u8, Error> {
    let config = g.load_config()?;
    let (target, breaking) = match &action {
        LockCmd::Status { target } => (target.clone(), false),
        LockCmd::Break { host } => (host.clone(), true),
    };
    let hosts = lock_hosts(&config, &target)?;
    if breaking && hosts.len() != 1 {
        return Err(UsageError::NoSuchRoute {
            given: target,
            why: "`lock break` takes one host, not a route",
        }
        .into());
    }
    let journal = breaking
        .then(|| crate::app::open_journal(&config))
        .flatten();
    let batch = release_batch(g, config)?;
    let mut failed = false;
    for (route, host) in hosts {
        match batch.host_lock(route, &host, breaking) {
            Ok(holder) => {
                let shown = match (&holder, breaking) {
                    (None, _) => "free".to_string(),
                    (Some(h), false) => format!("held: {h}"),
                    (Some(h), true) => {
                        log::warn!("{host}: host lock broken by hand (was {h})");
                        if let Some(j) = &journal {
                            let _ = j.admin_event("lock-break", Some(&host), h);
                        }
                        format!("broken (was {h})")
                    }
                };
                if g.json {
                    println!(
                        "{}",
                        serde_json::json!({"host": host, "holder": holder, "broken": breaking && holder.is_some()})
                    );
                } else {
                    println!("{host}: {shown}");
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("dispatch: {host}: {e}");
            }
        }
    }
    Ok(if failed { code::FAILED } else { code::OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_every_input() {
        assert_eq!(summary(0, 0, 0, 0), None);
        assert_eq!(
            summary(1, 0, 1, 0).as_deref(),
            Some("1 file × host + 1 input not readable: 1 ok, 1 failed")
        );
        assert_eq!(
            summary(2, 1, 0, 3).as_deref(),
            Some("2 file × host: 1 ok, 1 failed, 3 unrouted")
        );
    }

    #[test]
    fn a_since_that_is_no_time_says_what_it_expected() {
        let e = parse_since(" 3x ").unwrap_err();
        assert_eq!(e.problem, SinceProblem::UnknownUnit);
        assert_eq!(e.to_string(), "\"3x\": unknown unit (s, m, h, d, w)");
        assert_eq!(
            parse_since("soon").unwrap_err().to_string(),
            "\"soon\": not a time ago (30m, 2h, 7d) or a date (2026-01-31, 2026-01-31 14:00)"
        );
        assert!(parse_since("2h").is_ok());
    }

    #[test]
    fn jobs_on_the_command_line_are_range_checked() {
        assert!(Cli::try_parse_from(["dispatch", "-j", "0", "x"]).is_err());
        assert!(Cli::try_parse_from(["dispatch", "-j", "100000000", "x"]).is_err());
        let c = Cli::try_parse_from(["dispatch", "-j", "256", "x"]).unwrap();
        assert_eq!(c.global.jobs, Some(256));
    }
}
