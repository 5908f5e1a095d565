//! Transports: how bytes get to a host. SSH/SCP first, FTP as the fallback.
//!
//! Every transport failure is a [`TransferError`] whose [`ErrorKind`] decides what
//! happens next: retry later (transient), try the next transport (cannot use this
//! one), or give up on this file × host (fatal). Keeping these classes apart is
//! what lets one dead host fail fast while another one falls back to FTP.

pub mod error;
pub mod ftp;
pub mod sftp_wire;
pub mod ssh;
pub mod watchdog;

pub use error::{Cause, Op, Protocol, TransferError};

use crate::config::Transport;

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
    /// Stopped by Ctrl-C / SIGTERM: not retried.
    Interrupted,
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

/// What an upload reads: an open regular file (read positionally, so
/// several uploads can share it), the size it had when judged, its
/// permission bits.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub file: &'a std::fs::File,
    pub size: u64,
    pub mode: u32,
}

/// Told the bytes sent so far: at most every [`PROGRESS_STEP`] bytes, and
/// at the end.
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// One upload: the file, where it goes (`dir/tmp_name`, to become
/// `dir/name`), and whether its sha256 is wanted.
#[derive(Debug, Clone, Copy)]
pub struct Upload<'a> {
    pub src: Source<'a>,
    pub dir: &'a str,
    pub tmp_name: &'a str,
    pub name: &'a str,
    pub want_sha: bool,
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub bytes: u64,
    /// The sha256 of what was sent, if it was asked for (and computed).
    pub sha256: Option<String>,
    /// The transport also checked the file and put it under its final name
    /// (FTP: SIZE, RNFR/RNTO); otherwise it is still `dir/tmp_name`, for
    /// the executor to verify and publish over SSH.
    pub published: bool,
    /// The bytes (and the login) went unencrypted.
    pub cleartext: bool,
}

/// A session that can send a file to its host: the SSH session (SCP) and
/// the FTP session. What only SSH can do (scripts, SFTP, the install lock)
/// stays on [`ssh::SshSession`].
pub trait Uploader {
    /// The `transfer` entry this session serves.
    fn transport(&self) -> Transport;
    /// False once a deadline passed or the connection broke.
    fn is_alive(&self) -> bool;
    /// Send `job.src` to `job.dir/job.tmp_name` (see [`Uploaded::published`]).
    fn upload(
        &mut self,
        job: Upload<'_>,
        progress: Progress<'_>,
    ) -> Result<Uploaded, TransferError>;
}

/// How often an upload reports its progress.
pub const PROGRESS_STEP: u64 = 1 << 20;

/// Calls `progress` whenever another [`PROGRESS_STEP`] has been sent, and
/// once at `total`.
pub struct Meter<'a> {
    progress: Progress<'a>,
    total: u64,
    next: u64,
}

impl<'a> Meter<'a> {
    pub fn new(progress: Progress<'a>, total: u64) -> Meter<'a> {
        Meter {
            progress,
            total,
            next: PROGRESS_STEP.min(total),
        }
    }

    pub fn sent(&mut self, bytes: u64) {
        if bytes >= self.next {
            (self.progress)(bytes);
            self.next = if bytes >= self.total {
                u64::MAX
            } else {
                (bytes + PROGRESS_STEP).min(self.total)
            };
        }
    }
}

/// A fresh temporary name for one upload: `.dispatch-<16 hex>.part`. Short
/// (any legal file name can be uploaded), ASCII (it travels in the scp and
/// FTP protocols), and random, so no two uploads — of this process or of
/// another dispatcher — ever share one.
pub fn temp_name() -> String {
    format!(".dispatch-{}.part", random_hex())
}

/// 16 hex digits from the kernel's random source (the time and pid if that
/// cannot be read): not a secret, just never the same twice.
pub fn random_hex() -> String {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mixed = (t as u64) ^ (u64::from(std::process::id()) << 40) ^ n.rotate_left(20);
        b = mixed.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_reports_every_step_in_order_and_the_end_once() {
        let mut seen = Vec::new();
        {
            let mut record = |n| seen.push(n);
            let mut m = Meter::new(&mut record, 3 * PROGRESS_STEP + 5);
            for sent in (0..=3 * PROGRESS_STEP + 5).step_by(64 * 1024) {
                m.sent(sent);
            }
            m.sent(3 * PROGRESS_STEP + 5);
            m.sent(3 * PROGRESS_STEP + 5);
        }
        assert_eq!(
            seen,
            [
                PROGRESS_STEP,
                2 * PROGRESS_STEP,
                3 * PROGRESS_STEP,
                3 * PROGRESS_STEP + 5
            ]
        );
        let mut small = Vec::new();
        {
            let mut record = |n| small.push(n);
            let mut m = Meter::new(&mut record, 10);
            m.sent(4);
            m.sent(10);
        }
        assert_eq!(small, [10]);
    }
}
