//! dispatch: gets software packages from where they are built to the machines
//! where they run, and installs them.
//!
//! The pipeline, one module per stage: [`config`] (INI → routes) → [`route`]
//! (file name → route, placeholders) → [`credentials`] (netrc, keys) →
//! [`transport`] (SSH/SCP, FTP fallback) → [`install`] (remote command) →
//! [`job`] (file × host, worker pool) → [`journal`] (durable record).
//! [`watch`] and [`hook`] are the two other ways a package enters.

pub mod config;
pub mod error;
pub mod hook;
pub mod journal;
pub mod route;
pub mod transport;
pub mod watch;
