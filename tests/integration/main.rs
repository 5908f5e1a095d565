//! The one integration test binary: runs the real `dispatch` binary against
//! real servers (sshd, vsftpd) that `servers` starts on loopback.
//! Run as root: `bash scripts/test.sh` (or `cargo test --test integration`).

mod servers;

mod config_cli;
mod correctness;
mod dispatch_ssh;
mod fallback;
mod ftp_transport;
mod harness_smoke;
mod hooks;
mod journal_watch;
mod notify;
mod packaging;
mod progress;
mod rollout;
mod status;
mod structure;
mod watch_daemon;
