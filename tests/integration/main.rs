//! The one integration test binary: runs the real `dispatch` binary against
//! real servers (sshd, vsftpd) that `servers` starts on loopback.
//! Run as root: `bash scripts/test.sh` (or `cargo test --test integration`).

mod servers;

mod dispatch_ssh;
mod fallback;
mod ftp_transport;
mod harness_smoke;
mod hooks;
mod watch_daemon;
