//! Transports: how bytes get to a host. SSH/SCP first, FTP as the fallback.
//!
//! Every transport failure is a [`TransferError`] whose [`ErrorKind`] decides what
//! happens next: retry later (transient), try the next transport (cannot use this
//! one), or give up on this file × host (fatal). Keeping these classes apart is
//! what lets one dead host fail fast while another one falls back to FTP.

pub mod ftp;
pub mod ssh;
pub mod watchdog;

use std::fmt;

/// What went wrong, as far as the retry and fallback logic is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect refused, timed out, reset, or a stalled transfer: retried.
    Connect,
    /// A deadline passed during a transfer or handshake: retried.
    Timeout,
    /// The host key is unknown (strict) or changed: never retried, no fallback.
    HostKey,
    /// Login rejected: not retried, but another transport may work.
    Auth,
    /// The transport cannot be used on this host (no scp, no FTP, TLS refused): fall back.
    Unavailable,
    /// The remote side refused an operation (permission denied, disk full…): fatal.
    Remote,
    /// The uploaded file does not match the local one: retried.
    Verify,
    /// Reading the local file failed: fatal.
    Local,
}

impl ErrorKind {
    /// Worth another attempt after a delay.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Verify
        )
    }

    /// The next transport in `transfer` may succeed where this one failed.
    pub fn allows_fallback(self) -> bool {
        matches!(
            self,
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Auth | ErrorKind::Unavailable
        )
    }
}

/// A transport failure, with a message that already names host, port and operation.
#[derive(Debug, Clone)]
pub struct TransferError {
    pub kind: ErrorKind,
    pub msg: String,
}

impl TransferError {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> TransferError {
        TransferError {
            kind,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for TransferError {}

/// Classify an I/O error from a socket.
pub fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock => ErrorKind::Timeout,
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::BrokenPipe
        | K::NotConnected
        | K::UnexpectedEof
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::AddrNotAvailable => ErrorKind::Connect,
        _ => ErrorKind::Connect,
    }
}
