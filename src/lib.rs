//! dispatch: gets software packages from where they are built to the machines
//! where they run, and installs them.
//!
//! The pipeline, one module per stage: [`config`] (INI → routes) → [`route`]
//! (file name → route, placeholders) → [`credentials`] (netrc, keys) →
//! [`transport`] (SSH/SCP, FTP fallback) → [`job`] (file × host, lanes on the
//! worker pool, verify, install) → [`journal`] (durable record). [`watch`] +
//! [`daemon`] and [`hook`] are the two other ways a package enters.

pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod error;
pub mod hook;
pub mod job;
pub mod journal;
pub mod logging;
pub mod route;
pub mod transport;
pub mod watch;
