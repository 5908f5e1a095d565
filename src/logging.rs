//! Logging: log4rs from a YAML file (`--log-config`, `log_config`), else plain
//! stderr at the level asked for with `-q`/`-v`.
//!
//! Targets are module paths (`dispatch::transport::ssh`), so a `logger.yaml`
//! can turn up one stage. Lines carry the subject first (`name: host: …`).

use std::fmt;
use std::path::{Path, PathBuf};

use log::LevelFilter;
use log4rs::append::console::{ConsoleAppender, Target};
use log4rs::config::{Appender, Config, Logger, Root};
use log4rs::encode::pattern::PatternEncoder;

/// Log target of records whose message the command has already printed to
/// the terminal itself (`dispatch: x: cannot read: …`, `check`'s warnings):
/// a log file gets them, the stderr fallback only with `-v`, so each error is
/// seen once.
pub const PRINTED: &str = "dispatch::printed";

/// The stderr pattern when no logger.yaml is given.
const STDERR_PATTERN: &str = "{d(%Y-%m-%d %H:%M:%S%.3f)} {h({l:5})} [{T}] {M}: {m}{n}";

/// Start logging. A log config that cannot be loaded (missing, unreadable,
/// not YAML, not a log4rs config) is an error naming the file, and nothing is
/// started: the caller stops (exit 2) instead of running without the log it
/// was asked for.
/// What the command itself shows on the terminal, so the stderr fallback
/// leaves it out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr {
    /// A line per result: the per-file lines of `dispatch::job` are left out.
    pub results_on_stdout: bool,
    /// The progress output tells retries and fallbacks: `dispatch::event`'s
    /// lines are left out.
    pub events_shown: bool,
}

/// Start logging; `stderr` says what the stderr fallback leaves out.
pub fn init(file: Option<&Path>, level: LevelFilter, stderr: Stderr) -> Result<(), LogConfigError> {
    if let Some(path) = file {
        let fail = |cause| LogConfigError {
            path: path.to_path_buf(),
            cause,
        };
        let cfg = log4rs::config::load_config_file(path, Default::default())
            .map_err(|e| fail(LogConfigCause::Load(e.into())))?;
        return log4rs::init_config(cfg)
            .map(|_| ())
            .map_err(|e| fail(LogConfigCause::Init(e)));
    }
    init_stderr(level, stderr);
    Ok(())
}

/// A log config that cannot be used. Display: `PATH: cannot load log config: …`
/// (missing, unreadable, not YAML, not a log4rs config) or `PATH: …` (a
/// logger was already set).
#[derive(Debug)]
pub struct LogConfigError {
    pub path: PathBuf,
    pub cause: LogConfigCause,
}

#[derive(Debug)]
pub enum LogConfigCause {
    /// Missing, unreadable, not YAML, not a log4rs config (log4rs reports
    /// these as one opaque error).
    Load(Box<dyn std::error::Error + Send + Sync>),
    /// A logger is already set.
    Init(log::SetLoggerError),
}

impl fmt::Display for LogConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.cause {
            LogConfigCause::Load(e) => write!(f, "{path}: cannot load log config: {e}"),
            LogConfigCause::Init(e) => write!(f, "{path}: {e}"),
        }
    }
}

impl std::error::Error for LogConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            LogConfigCause::Load(e) => Some(&**e),
            LogConfigCause::Init(e) => Some(e),
        }
    }
}

fn init_stderr(level: LevelFilter, stderr: Stderr) {
    let console = ConsoleAppender::builder()
        .target(Target::Stderr)
        .encoder(Box::new(PatternEncoder::new(STDERR_PATTERN)))
        .build();
    // suppaftp traces every FTP command, PASS included: never below info
    let off_if = |shown: bool| if shown { LevelFilter::Off } else { level };
    let cfg = Config::builder()
        .appender(Appender::builder().build("stderr", Box::new(console)))
        .logger(Logger::builder().build("dispatch::job", off_if(stderr.results_on_stdout)))
        .logger(Logger::builder().build("dispatch::event", off_if(stderr.events_shown)))
        .logger(Logger::builder().build(
            PRINTED,
            if level >= LevelFilter::Info {
                level
            } else {
                LevelFilter::Off
            },
        ))
        .logger(Logger::builder().build("suppaftp", level.min(LevelFilter::Info)))
        .build(Root::builder().appender("stderr").build(level));
    if let Ok(cfg) = cfg {
        let _ = log4rs::init_config(cfg);
    }
}
