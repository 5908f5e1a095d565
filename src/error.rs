//! The top-level error and the exit-code table. `main` is the only place that
//! turns an [`Error`] into a process exit code.

use std::fmt;

use crate::config::ConfigError;

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
}

/// Errors that stop a command before (or instead of) doing its work.
#[derive(Debug)]
pub enum Error {
    /// The configuration could not be loaded; every problem is listed.
    Config(ConfigError),
    /// The command line was wrong.
    Usage(String),
    /// Anything else that stops the run (journal unusable, drop dir gone…).
    Fatal(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => code::USAGE,
            Error::Fatal(_) => code::FAILED,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Usage(m) => write!(f, "usage: {m}"),
            Error::Fatal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::Config(e)
    }
}
