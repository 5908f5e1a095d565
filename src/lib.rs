//! dispatch: gets software packages from where they are built to the machines
//! where they run, and installs them.
//!
//! The pipeline (ARCHITECTURE.md has the map): an entry — [`cli`] by hand,
//! [`watch`] + [`daemon`] from a drop directory, [`hook`] from a commit —
//! hands files to [`app`], which routes ([`route`]), opens ([`local`]) and
//! records ([`journal`]) them; [`plan`] turns them × hosts into deliveries
//! with their steps; [`job`] executes the steps over [`transport`] sessions
//! ([`script`] is what runs on the host, [`lock`] the install lock); every
//! step is an [`event`] that the journal and the log subscribe to.

pub mod app;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod error;
pub mod event;
pub mod hook;
pub mod interrupt;
pub mod job;
pub mod journal;
pub mod local;
pub mod lock;
pub mod logging;
pub mod notify;
pub mod plan;
pub mod progress;
pub mod retry;
pub mod rollout;
pub mod route;
pub mod script;
pub mod spool;
pub mod status;
pub mod template;
pub mod transport;
pub mod watch;
