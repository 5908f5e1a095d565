//! The top-level error and the exit-code table. `main` is the only place that
//! turns an [`Error`] into a process exit code.
//!
//! Every variant carries the typed cause from the module that failed
//! ([`ConfigError`], [`JournalError`], [`WatchError`], [`NetrcError`],
//! [`HookError`], `io::Error`) plus what a reader of the message needs (the
//! path, the run id…); the text is made here, in `Display`, once.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::credentials::NetrcError;
use crate::journal::JournalError;
use crate::watch::WatchError;

/// Exit codes, as documented in the README and `--help`.
pub mod code {
    /// Every file reached every target and installed (or there was nothing to do).
    pub const OK: u8 = 0;
    /// At least one file × host failed; the others were still done.
    pub const FAILED: u8 = 1;
    /// Usage or configuration error: nothing was attempted.
    pub const USAGE: u8 = 2;
    /// A file given by hand matched no route.
    pub const UNROUTED: u8 = 3;
    /// Stopped by Ctrl-C / SIGTERM (128 + SIGINT, as shells report it).
    pub const INTERRUPTED: u8 = 130;
}

/// Errors that stop a command before (or instead of) doing its work.
#[derive(Debug)]
pub enum Error {
    /// The configuration could not be loaded; every problem is listed.
    Config(ConfigError),
    /// The command line (or what it points at) was wrong: nothing was attempted.
    Usage(UsageError),
    /// The journal could not be read (`history`).
    Journal(JournalError),
    /// The daemon's journal is unusable: the daemon does not start.
    JournalNotStarted(JournalError),
    /// The daemon's journal file was lost under it.
    JournalLost(Box<LostJournal>),
    /// `history --run ID`: the journal has no such run.
    NoSuchRun { id: i64, journal: PathBuf },
    /// `man`: writing the pages (to stdout when `dir` is `None`) failed.
    ManPage {
        dir: Option<PathBuf>,
        cause: io::Error,
    },
    /// The daemon's `spool_dir` could not be created.
    SpoolDir { path: PathBuf, cause: io::Error },
    /// A drop directory given to the daemon does not exist.
    DropDirMissing { path: PathBuf },
    /// A drop directory could not be resolved to its canonical path.
    DropDir(WatchError),
    /// The watcher could not be started.
    Watch(WatchError),
    /// The daemon's signal handling could not be set up.
    Signals { step: SignalStep, cause: io::Error },
    /// A VCS hook could not read its revision or write its files.
    Hook(HookError),
    /// `dispatch status`: the daemon could not be asked.
    Status(StatusQuery),
}

/// Why `dispatch status` got no answer.
#[derive(Debug)]
pub enum StatusQuery {
    /// `status_listen = off`.
    Off,
    /// `status_listen` has port 0 and the daemon's address file is missing.
    NoAddress { file: PathBuf, cause: io::Error },
    /// Nothing answered (no daemon, or not yet listening).
    Unreachable {
        addr: std::net::SocketAddr,
        cause: Box<ureq::Error>,
    },
    /// It answered with an HTTP error (401: the token is wrong).
    Refused {
        addr: std::net::SocketAddr,
        status: u16,
    },
    /// Its answer was not the status JSON.
    BadAnswer {
        addr: std::net::SocketAddr,
        cause: io::Error,
    },
}

impl fmt::Display for StatusQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusQuery::Off => f.write_str(
                "status_listen = off in [dispatch]: the daemon serves no status to ask",
            ),
            StatusQuery::NoAddress { file, cause } => write!(
                f,
                "status_listen has port 0 and the daemon's address is not in {}: {cause} (is the daemon running with this config?)",
                file.display()
            ),
            StatusQuery::Unreachable { addr, cause } => {
                write!(f, "no daemon answers at {addr}: {cause}")
            }
            StatusQuery::Refused { addr, status: 401 } => write!(
                f,
                "the daemon at {addr} refused the token (401): status_token differs from the daemon's"
            ),
            StatusQuery::Refused { addr, status } => {
                write!(f, "the daemon at {addr} answered HTTP {status}")
            }
            StatusQuery::BadAnswer { addr, cause } => {
                write!(f, "the answer of {addr} is not the status JSON: {cause}")
            }
        }
    }
}

/// What a usage error is about; shown after `usage: `.
#[derive(Debug)]
pub enum UsageError {
    /// `dispatch` with no files.
    NoFiles,
    /// `dispatch -`: stdin could not be read.
    Stdin(io::Error),
    /// `watch` with no drop directory and no spool.
    NoDropDir,
    /// The netrc file could not be read or parsed.
    Netrc(NetrcError),
    /// A hook's input (revision, post-receive lines) is wrong.
    Hook(HookInput),
    /// `dispatch chek`: no such file, and the name is close to a command.
    NotACommand {
        given: String,
        command: &'static str,
    },
    /// `releases` / `rollback ROUTE`: no such route, or one without releases.
    NoSuchRoute { given: String, why: &'static str },
    /// `rollback`: the release is not there (as a good one) on a host.
    NoRelease { host: String, why: String },
}

/// Bad input to `dispatch hook`.
#[derive(Debug)]
pub enum HookInput {
    /// `hook svn REPOS REV`: REV is not a revision number.
    SvnRevision(String),
    /// A post-receive line is not `OLD NEW REF`; `line` counts from 1.
    ReceiveLine { line: usize, text: String },
    /// The post-receive lines could not be read from stdin.
    Stdin(io::Error),
}

/// A journal file lost under the daemon, and what became of its content.
#[derive(Debug)]
pub struct LostJournal {
    pub cause: JournalError,
    /// The journal's path.
    pub path: PathBuf,
    /// Where its content as the daemon saw it was saved (`path` when written
    /// back), or why no copy could be saved.
    pub saved: Result<PathBuf, JournalError>,
}

/// The step of setting up signal handling that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalStep {
    InstallHandlers,
    StartThread,
}

/// What went wrong while reading a revision or writing its files
/// (`dispatch hook`; defined here as the hook module uses [`Error`]).
#[derive(Debug)]
pub enum HookError {
    /// A VCS command could not be started.
    Spawn { cmd: String, err: io::Error },
    /// A VCS command failed.
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A local file or directory operation failed.
    Io {
        path: PathBuf,
        op: &'static str,
        err: io::Error,
    },
    /// Bad hook input (revision number, post-receive line).
    Input(HookInput),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) | Error::Status(StatusQuery::Off) => code::USAGE,
            _ => code::FAILED,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Usage(u) => write!(f, "usage: {u}"),
            Error::Journal(e) => write!(f, "{e}"),
            Error::JournalNotStarted(e) => write!(f, "{e}; not started"),
            Error::JournalLost(lost) => {
                let LostJournal { cause, path, saved } = &**lost;
                write!(f, "{cause}; stopping: nothing more can be recorded; ")?;
                match saved {
                    Ok(p) if p == path => write!(
                        f,
                        "its content as this daemon saw it was written back to {}",
                        p.display()
                    ),
                    Ok(p) => write!(
                        f,
                        "its content as this daemon saw it was saved to {}; to go on from \
                         there, move that file to {}",
                        p.display(),
                        path.display()
                    ),
                    Err(se) => write!(f, "no copy could be saved ({se})"),
                }
            }
            Error::NoSuchRun { id, journal } => {
                write!(f, "run {id}: no such run in {}", journal.display())
            }
            Error::ManPage { dir: None, cause } => write!(f, "writing the man page: {cause}"),
            Error::ManPage {
                dir: Some(d),
                cause,
            } => write!(f, "{}: {cause}", d.display()),
            Error::SpoolDir { path, cause } => {
                write!(f, "{}: cannot create spool dir: {cause}", path.display())
            }
            Error::DropDirMissing { path } => {
                write!(f, "{}: drop directory does not exist", path.display())
            }
            Error::DropDir(e) => write!(f, "{e}"),
            Error::Watch(e) => write!(f, "watch: {e}"),
            Error::Signals {
                step: SignalStep::InstallHandlers,
                cause,
            } => write!(f, "cannot install signal handlers: {cause}"),
            Error::Signals {
                step: SignalStep::StartThread,
                cause,
            } => write!(f, "cannot start signal thread: {cause}"),
            Error::Hook(e) => write!(f, "{e}"),
            Error::Status(e) => write!(f, "status: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::Usage(u) => u.source(),
            Error::Journal(e) | Error::JournalNotStarted(e) => Some(e),
            Error::JournalLost(lost) => Some(&lost.cause),
            Error::ManPage { cause, .. }
            | Error::SpoolDir { cause, .. }
            | Error::Signals { cause, .. } => Some(cause),
            Error::DropDir(e) | Error::Watch(e) => Some(e),
            Error::Hook(e) => Some(e),
            Error::NoSuchRun { .. } | Error::DropDirMissing { .. } | Error::Status(_) => None,
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::NoFiles => {
                f.write_str("no files given (dispatch FILE…, or `dispatch --help`)")
            }
            UsageError::Stdin(e) => write!(f, "reading file names from stdin: {e}"),
            UsageError::NoDropDir => {
                f.write_str("no drop directory: pass DIR… or set `watch` in [dispatch]")
            }
            UsageError::Netrc(e) => write!(f, "{e}"),
            UsageError::Hook(i) => write!(f, "{i}"),
            UsageError::NotACommand { given, command } => write!(
                f,
                "`{given}` is neither a file nor a command (did you mean `dispatch {command}`?)"
            ),
            UsageError::NoSuchRoute { given, why } => write!(f, "`{given}`: {why}"),
            UsageError::NoRelease { host, why } => {
                write!(f, "{host}: {why}; no host was touched")
            }
        }
    }
}

impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UsageError::Stdin(e) => Some(e),
            UsageError::Netrc(e) => Some(e),
            UsageError::Hook(i) => i.source(),
            UsageError::NoFiles
            | UsageError::NoDropDir
            | UsageError::NotACommand { .. }
            | UsageError::NoSuchRoute { .. }
            | UsageError::NoRelease { .. } => None,
        }
    }
}

impl fmt::Display for HookInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookInput::SvnRevision(rev) => write!(
                f,
                "{rev:?}: not an svn revision number (dispatch hook svn REPOS REV)"
            ),
            HookInput::ReceiveLine { line, text } => write!(
                f,
                "stdin line {line}: {text:?}: expected `OLD NEW REF` (git post-receive input)"
            ),
            HookInput::Stdin(e) => write!(f, "reading post-receive lines from stdin: {e}"),
        }
    }
}

impl std::error::Error for HookInput {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HookInput::Stdin(e) => Some(e),
            HookInput::SvnRevision(_) | HookInput::ReceiveLine { .. } => None,
        }
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::Spawn { cmd, err } => write!(f, "{cmd}: cannot run: {err}"),
            HookError::Command {
                cmd,
                status,
                stderr,
            } => {
                write!(f, "{cmd}: {status}")?;
                let tail = stderr.trim();
                if !tail.is_empty() {
                    write!(f, ": {tail}")?;
                }
                Ok(())
            }
            HookError::Io { path, op, err } => write!(f, "{}: cannot {op}: {err}", path.display()),
            HookError::Input(i) => write!(f, "{i}"),
        }
    }
}

impl std::error::Error for HookError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HookError::Spawn { err, .. } | HookError::Io { err, .. } => Some(err),
            HookError::Input(i) => Some(i),
            HookError::Command { .. } => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::Config(e)
    }
}

impl From<UsageError> for Error {
    fn from(e: UsageError) -> Error {
        Error::Usage(e)
    }
}

/// Bad input is a usage error (exit 2); the rest stops the hook (exit 1).
impl From<HookError> for Error {
    fn from(e: HookError) -> Error {
        match e {
            HookError::Input(i) => Error::Usage(UsageError::Hook(i)),
            other => Error::Hook(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_say_usage_and_exit_2_and_the_rest_exit_1() {
        let e = Error::from(UsageError::NoFiles);
        assert_eq!(
            e.to_string(),
            "usage: no files given (dispatch FILE…, or `dispatch --help`)"
        );
        assert_eq!(e.exit_code(), code::USAGE);
        let e = Error::from(HookError::Input(HookInput::SvnRevision("x".into())));
        assert_eq!(
            e.to_string(),
            "usage: \"x\": not an svn revision number (dispatch hook svn REPOS REV)"
        );
        assert_eq!(e.exit_code(), code::USAGE);
        let e = Error::from(HookError::Command {
            cmd: "svnlook".into(),
            status: "exit status 1".into(),
            stderr: " no such revision\n".into(),
        });
        assert_eq!(e.to_string(), "svnlook: exit status 1: no such revision");
        assert_eq!(e.exit_code(), code::FAILED);
        let e = Error::DropDirMissing {
            path: "/no/such".into(),
        };
        assert_eq!(e.to_string(), "/no/such: drop directory does not exist");
        assert_eq!(e.exit_code(), code::FAILED);
    }

    #[test]
    fn a_failed_step_names_its_subject_and_cause() {
        let io = || io::Error::new(io::ErrorKind::PermissionDenied, "denied");
        let e = Error::SpoolDir {
            path: "/s".into(),
            cause: io(),
        };
        assert_eq!(e.to_string(), "/s: cannot create spool dir: denied");
        let e = Error::ManPage {
            dir: None,
            cause: io(),
        };
        assert_eq!(e.to_string(), "writing the man page: denied");
        let e = Error::ManPage {
            dir: Some("/m".into()),
            cause: io(),
        };
        assert_eq!(e.to_string(), "/m: denied");
        let e = Error::Signals {
            step: SignalStep::StartThread,
            cause: io(),
        };
        assert_eq!(e.to_string(), "cannot start signal thread: denied");
        let e = Error::NoSuchRun {
            id: 7,
            journal: "/j.db".into(),
        };
        assert_eq!(e.to_string(), "run 7: no such run in /j.db");
    }
}
