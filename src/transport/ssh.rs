//! SSH with the `ssh2` crate (libssh2): connect with a deadline, check the host
//! key against `known_hosts`, authenticate, create directories, stream a file
//! over SCP under a temporary name, and run remote commands.
//!
//! libssh2 has no timeout by default, and with one set it waits the timeout out
//! again in every clean-up step. So every session carries a [`Watchdog`]: a
//! thread that shuts the socket down when a deadline passes without progress.
//! After that the session is dead and every call fails at once — a stalled
//! transfer fails at its deadline, not at a multiple of it.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use ssh2::{
    CheckResult, ErrorCode, ExtendedData, HashType, HostKeyType, KnownHostFileKind, Session,
};

pub mod stream;

use super::watchdog::Watchdog;
use super::{
    io_kind, Cause, ErrorKind, Meter, Op, Progress, Protocol, Source, TransferError, Upload,
    Uploaded, Uploader,
};
use crate::config::Transport;
use crate::config::{HostKeyCheck, Secret};
use crate::script::{driver_command, frame_job, rc_marker, DRIVER_GRACE};

/// Read buffer for uploads. libssh2 splits writes into 32 KiB SSH packets;
/// larger buffers did not help on loopback (notes §B.2).
const CHUNK: usize = 64 * 1024;

/// Everything needed to open a session to one host.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub login: String,
    pub password: Option<Secret>,
    pub identity_file: Option<PathBuf>,
    pub host_key_check: HostKeyCheck,
    pub known_hosts: PathBuf,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

impl SshTarget {
    fn addr(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A failure of `kind` during `op` on this host, over `protocol`.
    pub fn err(&self, kind: ErrorKind, protocol: Protocol, op: Op) -> TransferError {
        TransferError::on(kind, op, protocol, &self.host, Some(self.port))
    }
}

// ---------------------------------------------------------------- session

/// Result of a remote command.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: i32,
    pub signal: Option<String>,
    /// stdout and stderr merged, last lines only (after the marker, if one
    /// was asked for and seen).
    pub output: String,
    /// The marker passed to [`SshSession::run_script`] was printed.
    pub marked: bool,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == 0 && self.signal.is_none()
    }
}

/// Keep the last `max` bytes of a stream (on a line boundary where possible).
pub struct Tail {
    buf: Vec<u8>,
    max: usize,
}

impl Tail {
    pub fn new(max: usize) -> Tail {
        Tail {
            buf: Vec::new(),
            max,
        }
    }
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * self.max {
            let cut = self.buf.len() - self.max;
            self.buf.drain(..cut);
        }
    }
    /// The last `lines` lines, lossy UTF-8.
    pub fn lines(&self, lines: usize) -> String {
        let start = self.buf.len().saturating_sub(self.max);
        let text = String::from_utf8_lossy(&self.buf[start..]);
        let all: Vec<&str> = text.trim_end().lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Reads a command's output stream: keeps the tail, notices a marker line
/// (what follows it is the part that matters), and — for the script runner —
/// the status line that ends a script's output.
struct Scan {
    tail: Tail,
    pending: Vec<u8>,
    marker: Option<Vec<u8>>,
    marked: bool,
}

impl Scan {
    fn new(marker: Option<&str>) -> Scan {
        Scan {
            tail: Tail::new(16 * 1024),
            pending: Vec::new(),
            marker: marker.map(|m| m.as_bytes().to_vec()),
            marked: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        if !self.marked {
            if let Some(m) = &self.marker {
                if let Some(p) = find_last(&self.pending, m) {
                    self.marked = true;
                    self.tail = Tail::new(16 * 1024);
                    let mut cut = p + m.len();
                    if self.pending.get(cut) == Some(&b'\n') {
                        cut += 1;
                    }
                    self.pending.drain(..cut);
                }
            }
        }
        // keep a little unconsumed, in case a marker is split across reads
        if self.pending.len() > 64 * 1024 {
            let keep = self.pending.len() - 256;
            self.tail.push(&self.pending[..keep]);
            self.pending.drain(..keep);
        }
    }

    /// The script runner's status line, if it has arrived.
    fn status(&mut self, rc_marker: &[u8]) -> Option<i32> {
        let pos = find_last(&self.pending, rc_marker)?;
        let rest = &self.pending[pos + rc_marker.len()..];
        let nl = rest.iter().position(|b| *b == b'\n')?;
        let status = String::from_utf8_lossy(&rest[..nl])
            .trim()
            .parse()
            .unwrap_or(-1);
        self.pending.truncate(pos);
        Some(status)
    }

    fn finish(mut self, status: i32, signal: Option<String>) -> ExecOutput {
        let rest = std::mem::take(&mut self.pending);
        self.tail.push(&rest);
        ExecOutput {
            status,
            signal,
            output: self.tail.lines(20),
            marked: self.marked,
        }
    }
}

pub struct SshSession {
    sess: Session,
    watchdog: Watchdog,
    target: SshTarget,
    made_dirs: Vec<String>,
    /// A remote `scp -t DIR` receiving every file this session sends to DIR.
    sink: Option<(String, ssh2::Channel)>,
    /// A remote shell loop running one script per file (see
    /// [`driver_command`]), and the status marker it prints.
    driver: Option<(ssh2::Channel, Vec<u8>)>,
    /// A connection-level failure happened: the session is not reused.
    broken: std::cell::Cell<bool>,
    /// The session's SFTP channel, for checks and renames that need no
    /// remote process; `Err` once it proved unavailable.
    sftp: Option<Result<ssh2::Sftp, ()>>,
    /// The login's home directory, once asked (see [`SshSession::home`]).
    home: Option<String>,
}

/// Client-to-server cipher preference (see `vendor/libssh2-sys/PATCHES.md`).
const UPLOAD_CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

fn ssh_kind(e: &ssh2::Error) -> ErrorKind {
    match e.code() {
        ErrorCode::Session(-9) => ErrorKind::Timeout,
        ErrorCode::Session(-18) | ErrorCode::Session(-19) => ErrorKind::Auth,
        _ => ErrorKind::Connect,
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64(data: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

fn key_type_name(t: HostKeyType) -> &'static str {
    match t {
        HostKeyType::Rsa => "ssh-rsa",
        HostKeyType::Dss => "ssh-dss",
        HostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        HostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        HostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        HostKeyType::Ed25519 => "ssh-ed25519",
        HostKeyType::Unknown => "unknown",
    }
}

fn connect_error(
    t: &SshTarget,
    kind: ErrorKind,
    op: Op,
    what: impl Into<Cow<'static, str>>,
    e: impl Into<Cause>,
) -> TransferError {
    t.err(kind, Protocol::Ssh, op).step(what).cause(e)
}

/// TCP to the first address of the host that answers within `connect_timeout`.
fn tcp_connect(t: &SshTarget, started: Instant) -> Result<TcpStream, TransferError> {
    let addrs: Vec<_> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| connect_error(t, ErrorKind::Connect, Op::Resolve, "cannot resolve host", e))?
        .collect();
    let mut last = None;
    for a in &addrs {
        let left = t.connect_timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(a, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let Some(e) = last else {
        return Err(t
            .err(ErrorKind::Timeout, Protocol::Ssh, Op::Connect)
            .step("connect timed out"));
    };
    let what = if e.kind() == std::io::ErrorKind::TimedOut {
        format!(
            "connect timed out after {:.1}s",
            t.connect_timeout.as_secs_f64()
        )
    } else {
        "connect failed".to_string()
    };
    Err(connect_error(t, io_kind(&e), Op::Connect, what, e))
}

/// A libssh2 session over `tcp`, handshake done under the watchdog
/// (connect_timeout + io_timeout for the handshake and the login).
fn handshake(t: &SshTarget, tcp: TcpStream, watchdog: &Watchdog) -> Result<Session, TransferError> {
    let addr = t.addr();
    let mut sess = Session::new()
        .map_err(|e| connect_error(t, ErrorKind::Connect, Op::Handshake, "libssh2 init", e))?;
    sess.set_tcp_stream(tcp);
    let ms = u32::try_from(t.io_timeout.as_millis())
        .unwrap_or(u32::MAX)
        .max(1);
    sess.set_timeout(ms);
    // Uploads: AES-GCM first. With the vendored libssh2 patch (one cipher
    // call per packet) it costs both ends less CPU than chacha20-poly1305,
    // which libssh2 runs in portable C. Any failure here keeps the
    // library's default order.
    if let Err(e) = sess.method_pref(ssh2::MethodType::CryptCs, UPLOAD_CIPHERS) {
        log::debug!("ssh {addr}: cipher preference not set: {e}");
    }
    watchdog.kick(t.connect_timeout + t.io_timeout);
    sess.handshake().map_err(|e| {
        let kind = if watchdog.fired() {
            ErrorKind::Timeout
        } else {
            ssh_kind(&e)
        };
        connect_error(t, kind, Op::Handshake, "handshake failed", e)
    })?;
    Ok(sess)
}

/// Where [`SshSession::fail`] was called from.
const HOST_KEY: (Protocol, Op) = (Protocol::Ssh, Op::HostKey);
const EXEC: (Protocol, Op) = (Protocol::Ssh, Op::Exec);
const SCRIPT: (Protocol, Op) = (Protocol::Ssh, Op::RunScript);
const SCP: (Protocol, Op) = (Protocol::Scp, Op::Upload);

/// Serialises appends to known_hosts files within this process.
static KNOWN_HOSTS_LOCK: Mutex<()> = Mutex::new(());

impl SshSession {
    /// Connect, check the host key, authenticate. Every step is bounded by
    /// `connect_timeout` (TCP) and `io_timeout` (protocol).
    pub fn connect(t: &SshTarget) -> Result<SshSession, TransferError> {
        let addr = t.addr();
        let started = Instant::now();
        let tcp = tcp_connect(t, started)?;
        let _ = tcp.set_nodelay(true);
        let clone = tcp
            .try_clone()
            .map_err(|e| connect_error(t, ErrorKind::Connect, Op::Connect, "socket", e))?;
        let watchdog = Watchdog::new(clone, format!("ssh {addr}"));
        let sess = handshake(t, tcp, &watchdog)?;
        let mut s = SshSession {
            sess,
            watchdog,
            target: t.clone(),
            made_dirs: Vec::new(),
            sink: None,
            driver: None,
            broken: std::cell::Cell::new(false),
            sftp: None,
            home: None,
        };
        s.check_host_key()?;
        s.authenticate()?;
        s.watchdog.disarm();
        log::debug!(
            "ssh {addr}: logged in as {} in {:.0?}",
            t.login,
            started.elapsed()
        );
        Ok(s)
    }

    fn err(&self, kind: ErrorKind, protocol: Protocol, op: Op) -> TransferError {
        self.target.err(kind, protocol, op)
    }

    /// A failure during `op`, named `what`, because of `e`: a timeout if
    /// the watchdog fired; a connection-level one marks the session broken.
    fn fail(
        &self,
        kind: ErrorKind,
        (protocol, op): (Protocol, Op),
        what: impl Into<Cow<'static, str>>,
        e: impl Into<Cause>,
    ) -> TransferError {
        let kind = if self.watchdog.fired() {
            ErrorKind::Timeout
        } else {
            kind
        };
        let suffix = if self.watchdog.fired() {
            " (deadline passed, connection closed)"
        } else {
            ""
        };
        if matches!(kind, ErrorKind::Connect | ErrorKind::Timeout) {
            self.broken.set(true);
            // Close the socket now: tearing down the channels of a stalled
            // connection would otherwise wait io_timeout once more for each.
            self.watchdog.fire();
        }
        self.err(kind, protocol, op)
            .step(what)
            .cause(e)
            .note(suffix)
    }

    fn check_host_key(&mut self) -> Result<(), TransferError> {
        let t = &self.target;
        let addr = t.addr();
        let (key, ktype) = match self.sess.host_key() {
            Some((k, ty)) => (k.to_vec(), ty),
            None => {
                return Err(self
                    .err(ErrorKind::HostKey, Protocol::Ssh, Op::HostKey)
                    .step("server sent no host key"))
            }
        };
        let fp = self
            .sess
            .host_key_hash(HashType::Sha256)
            .map(|h| format!("SHA256:{}", base64(h, false)))
            .unwrap_or_default();
        let ktype = key_type_name(ktype);
        let mut kh = self
            .sess
            .known_hosts()
            .map_err(|e| self.fail(ErrorKind::HostKey, HOST_KEY, "known_hosts", e))?;
        if t.known_hosts.exists() {
            kh.read_file(&t.known_hosts, KnownHostFileKind::OpenSSH)
                .map_err(|e| {
                    t.err(ErrorKind::HostKey, Protocol::Ssh, Op::HostKey)
                        .step(format!("cannot read {}", t.known_hosts.display()))
                        .cause(e)
                })?;
        }
        let entry = if t.port == 22 {
            t.host.clone()
        } else {
            format!("[{}]:{}", t.host, t.port)
        };
        match kh.check_port(&t.host, t.port, &key) {
            CheckResult::Match => Ok(()),
            CheckResult::Mismatch => Err(t
                .err(ErrorKind::HostKey, Protocol::Ssh, Op::HostKey)
                .step(format!(
                    "HOST KEY CHANGED: the {ktype} key ({fp}) does not match {}. \
                     This may be an attack; refused. If the host was really reinstalled, remove \
                     the old line with: ssh-keygen -R '{entry}' -f {}",
                    t.known_hosts.display(),
                    t.known_hosts.display()
                ))),
            CheckResult::NotFound | CheckResult::Failure => match t.host_key_check {
                HostKeyCheck::Strict => Err(t
                    .err(ErrorKind::HostKey, Protocol::Ssh, Op::HostKey)
                    .step(format!(
                        "host key not known ({ktype} {fp}) and host_key_check = strict; \
                         to trust it, check the fingerprint and run: ssh-keyscan -p {} {} >> {} \
                         (or set host_key_check = accept-new)",
                        t.port,
                        t.host,
                        t.known_hosts.display()
                    ))),
                HostKeyCheck::AcceptNew => {
                    let line = format!("{entry} {ktype} {}\n", base64(&key, true));
                    self.append_known_host(&line)?;
                    log::warn!(
                        "{addr}: new host key {ktype} {fp} recorded in {}",
                        t.known_hosts.display()
                    );
                    Ok(())
                }
                HostKeyCheck::Off => {
                    log::warn!("{addr}: host key {ktype} {fp} NOT checked (host_key_check = off)");
                    Ok(())
                }
            },
        }
    }

    fn append_known_host(&self, line: &str) -> Result<(), TransferError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = &self.target.known_hosts;
        let _guard = KNOWN_HOSTS_LOCK.lock();
        let fail = |e: std::io::Error| {
            self.err(ErrorKind::HostKey, Protocol::Ssh, Op::HostKey)
                .step(format!("cannot record host key in {}", path.display()))
                .cause(e)
        };
        if let Ok(existing) = std::fs::read_to_string(path) {
            if existing.lines().any(|l| l.trim() == line.trim()) {
                return Ok(());
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        f.write_all(line.as_bytes()).map_err(fail)
    }

    fn authenticate(&mut self) -> Result<(), TransferError> {
        let t = self.target.clone();
        let login = t.login.as_str();
        let methods = self
            .sess
            .auth_methods(login)
            .map(str::to_string)
            .unwrap_or_default();
        if self.sess.authenticated() {
            return Ok(());
        }
        let mut tried: Vec<String> = Vec::new();
        let pubkey = methods.is_empty() || methods.contains("publickey");
        if pubkey {
            if let Some(key) = &t.identity_file {
                tried.push(format!("key {}", key.display()));
                if let Err(e) = self.sess.userauth_pubkey_file(login, None, key, None) {
                    log::debug!("ssh {}: key {} rejected: {e}", t.addr(), key.display());
                }
            } else {
                if std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty()) {
                    tried.push("ssh-agent".into());
                    self.try_agent(login);
                }
                for key in crate::credentials::default_keys() {
                    if self.sess.authenticated() {
                        break;
                    }
                    tried.push(format!("key {}", key.display()));
                    if let Err(e) = self.sess.userauth_pubkey_file(login, None, &key, None) {
                        log::debug!("ssh {}: key {} rejected: {e}", t.addr(), key.display());
                    }
                }
            }
        }
        if !self.sess.authenticated() {
            if let Some(pw) = &t.password {
                if methods.is_empty() || methods.contains("password") {
                    tried.push("password".into());
                    if let Err(e) = self.sess.userauth_password(login, pw.expose()) {
                        log::debug!("ssh {}: password rejected: {e}", t.addr());
                    }
                }
            }
        }
        if self.sess.authenticated() {
            return Ok(());
        }
        if self.watchdog.fired() {
            return Err(self.fail(
                ErrorKind::Timeout,
                (Protocol::Ssh, Op::Auth),
                "authentication",
                "timed out",
            ));
        }
        let tried = if tried.is_empty() {
            format!(
                "no usable method (server offers: {methods}; no key, agent or password configured)"
            )
        } else {
            format!("tried {}", tried.join(", "))
        };
        Err(t
            .err(ErrorKind::Auth, Protocol::Ssh, Op::Auth)
            .step(format!("login as {login} rejected ({tried})")))
    }

    fn try_agent(&mut self, login: &str) {
        let Ok(mut agent) = self.sess.agent() else {
            return;
        };
        if agent.connect().is_err() || agent.list_identities().is_err() {
            return;
        }
        if let Ok(ids) = agent.identities() {
            for id in ids {
                if agent.userauth(login, &id).is_ok() {
                    break;
                }
            }
        }
        let _ = agent.disconnect();
    }

    pub fn is_alive(&self) -> bool {
        !self.watchdog.fired() && !self.broken.get()
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Run a command; stdout and stderr are merged (no deadlock on large
    /// output) and only the tail is kept. The whole call is bounded by `limit`.
    pub fn exec(&mut self, cmd: &str, limit: Duration) -> Result<ExecOutput, TransferError> {
        self.watchdog.kick(limit);
        let r = self.exec_inner(cmd, None);
        self.watchdog.disarm();
        r
    }

    fn exec_inner(&mut self, cmd: &str, marker: Option<&str>) -> Result<ExecOutput, TransferError> {
        let mut ch = self
            .sess
            .channel_session()
            .map_err(|e| self.fail(ssh_kind(&e), EXEC, "open channel", e))?;
        ch.handle_extended_data(ExtendedData::Merge)
            .map_err(|e| self.fail(ssh_kind(&e), EXEC, "channel setup", e))?;
        ch.exec(cmd)
            .map_err(|e| self.fail(ssh_kind(&e), EXEC, "exec", e))?;
        let mut scan = Scan::new(marker);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match ch.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => scan.feed(&buf[..n]),
                Err(e) => return Err(self.fail(io_kind(&e), EXEC, "reading command output", e)),
            }
        }
        ch.wait_close()
            .map_err(|e| self.fail(ssh_kind(&e), EXEC, "closing channel", e))?;
        let status = ch
            .exit_status()
            .map_err(|e| self.fail(ssh_kind(&e), EXEC, "exit status", e))?;
        let signal = ch.exit_signal().ok().and_then(|s| s.exit_signal);
        Ok(scan.finish(status, signal))
    }

    /// `mkdir -p` once per directory and session.
    pub fn mkdir_p(&mut self, dir: &str) -> Result<(), TransferError> {
        if dir == "." || dir == "/" || self.made_dirs.iter().any(|d| d == dir) {
            return Ok(());
        }
        let cmd = format!("mkdir -p -- {}", crate::route::shell_quote(dir));
        let out = self.exec(&cmd, self.target.io_timeout)?;
        if !out.success() {
            return Err(self
                .err(ErrorKind::Remote, Protocol::Ssh, Op::Mkdir)
                .step(format!("cannot create directory {dir}"))
                .cause(out.output.trim())
                .path(dir));
        }
        self.made_dirs.push(dir.to_string());
        Ok(())
    }

    /// Stream `size` bytes of `file` (read positionally from offset 0, so
    /// several sessions can send one open file at once) into `dir/tmp_name`
    /// with permission bits `mode`, over SCP (the legacy scp protocol, spoken
    /// to one remote `scp -t` per directory and session, so a batch of files
    /// costs one remote process, not one per file). Returns bytes sent and,
    /// if asked, the sha256 of what was sent.
    pub fn scp_upload(
        &mut self,
        src: Source<'_>,
        dir: &str,
        tmp_name: &str,
        want_sha: bool,
        progress: Progress<'_>,
    ) -> Result<(u64, Option<String>), TransferError> {
        if tmp_name.contains(['\n', '\r', '/']) {
            return Err(self
                .err(ErrorKind::Local, Protocol::Scp, Op::Upload)
                .step(format!(
                    "temporary name {tmp_name:?} cannot travel in the scp protocol"
                ))
                .bare());
        }
        self.watchdog.kick(self.target.io_timeout);
        let r = self.sink_send(
            src,
            dir,
            tmp_name,
            want_sha,
            &mut Meter::new(progress, src.size),
        );
        self.watchdog.disarm();
        if r.is_err() {
            self.sink = None;
        }
        r
    }

    /// The session's SFTP channel; `Ok(None)` when the host has none (do it
    /// with a shell instead).
    fn sftp(&mut self) -> Result<Option<&ssh2::Sftp>, TransferError> {
        if self.sftp.is_none() {
            self.watchdog.kick(self.target.io_timeout);
            let opened = self.sess.sftp();
            self.watchdog.disarm();
            self.sftp = Some(match opened {
                Ok(s) => Ok(s),
                Err(e) => {
                    if self.watchdog.fired() {
                        return Err(self.fail(
                            ErrorKind::Timeout,
                            (Protocol::Sftp, Op::Sftp),
                            "sftp",
                            e,
                        ));
                    }
                    log::debug!("ssh {}: no SFTP ({e}); using a shell", self.target.addr());
                    Err(())
                }
            });
        }
        Ok(match &self.sftp {
            Some(Ok(s)) => Some(s),
            _ => None,
        })
    }

    /// Whether the host has an SFTP subsystem (opened once per session).
    pub fn has_sftp(&mut self) -> Result<bool, TransferError> {
        Ok(self.sftp()?.is_some())
    }

    /// The login's home directory on the host, absolute (asked once per
    /// session: SFTP's start directory, else the shell's `$HOME`).
    pub fn home(&mut self) -> Result<String, TransferError> {
        if let Some(h) = &self.home {
            return Ok(h.clone());
        }
        let addr = self.target.addr();
        let mut home = None;
        if self.sftp()?.is_some() {
            let r = self.sftp_op(Op::Home, ".", |sftp| sftp.realpath(Path::new(".")));
            match r {
                Ok(p) => home = p.to_str().map(str::to_string),
                Err(e) if !self.is_alive() => return Err(e),
                Err(e) => log::debug!("ssh {addr}: sftp realpath: {e}"),
            }
        }
        let home = match home {
            Some(h) => h,
            None => {
                let out = self.exec("printf '%s' \"$HOME\"", self.target.io_timeout)?;
                out.output.trim_end_matches('\n').to_string()
            }
        };
        if !home.starts_with('/') || home.contains(['\n', '\0']) {
            return Err(self
                .err(ErrorKind::Remote, Protocol::Ssh, Op::Home)
                .step(format!(
                    "cannot tell the login's home directory (got {home:?})"
                )));
        }
        self.home = Some(home.clone());
        Ok(home)
    }

    /// One SFTP call under the io deadline; connection-level failures mark
    /// the session broken.
    fn sftp_op<T>(
        &mut self,
        op: Op,
        path: &str,
        f: impl FnOnce(&ssh2::Sftp) -> Result<T, ssh2::Error>,
    ) -> Result<T, TransferError> {
        let Some(Ok(sftp)) = &self.sftp else {
            return Err(self
                .err(ErrorKind::Unavailable, Protocol::Sftp, op)
                .step("no SFTP")
                .path(path));
        };
        self.watchdog.kick(self.target.io_timeout);
        let r = f(sftp);
        self.watchdog.disarm();
        r.map_err(|e| match e.code() {
            ErrorCode::SFTP(_) if !self.watchdog.fired() => self
                .err(ErrorKind::Remote, Protocol::Sftp, op)
                .step("sftp")
                .cause(e),
            _ => self.fail(ssh_kind(&e), (Protocol::Sftp, op), "sftp", e),
        })
        .map_err(|e| e.path(path))
    }

    /// Size of a remote file over SFTP (`None`: it does not exist).
    pub fn sftp_size(&mut self, path: &str) -> Result<Option<u64>, TransferError> {
        match self.sftp_op(Op::Verify, path, |s| s.lstat(Path::new(path))) {
            Ok(st) => Ok(Some(st.size.unwrap_or(0))),
            Err(e) if e.kind == ErrorKind::Remote => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Remove a remote file over SFTP; a missing file is not an error.
    pub fn sftp_unlink(&mut self, path: &str) -> Result<(), TransferError> {
        match self.sftp_op(Op::Remove, path, |s| s.unlink(Path::new(path))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind == ErrorKind::Remote => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Rename `tmp` to `fin` over SFTP, replacing `fin`. SFTP v3 refuses an
    /// existing target, so `fin` is removed first (the final name is briefly
    /// absent, never partial); if another sender puts a file there in
    /// between, try again — the last rename wins, each file whole.
    pub fn sftp_rename_over(&mut self, tmp: &str, fin: &str) -> Result<(), TransferError> {
        // one request when nothing is in the way (a fresh dated dir); SFTP v3
        // cannot rename over a file, so an old one is removed and it is tried again
        let mut last = None;
        for _ in 0..5 {
            match self.sftp_op(Op::Rename, fin, |s| {
                s.rename(Path::new(tmp), Path::new(fin), None)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind == ErrorKind::Remote => last = Some(e),
                Err(e) => return Err(e),
            }
            self.sftp_unlink(fin)?;
        }
        Err(last.unwrap_or_else(|| {
            self.err(ErrorKind::Remote, Protocol::Sftp, Op::Rename)
                .step(format!("cannot rename {tmp} to {fin}"))
                .path(fin)
                .bare()
        }))
    }

    /// Create `path` exclusively (O_CREAT|O_EXCL) holding `owner`: `Ok(true)`
    /// if this call created it, `Ok(false)` if it already exists.
    pub fn sftp_create_excl(&mut self, path: &str, owner: &str) -> Result<bool, TransferError> {
        use ssh2::OpenFlags;
        let r = self.sftp_op(Op::Lock, path, |s| {
            let mut f = s.open_mode(
                Path::new(path),
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
                0o644,
                ssh2::OpenType::File,
            )?;
            let _ = f.write_all(owner.as_bytes());
            Ok(())
        });
        match r {
            Ok(()) => Ok(true),
            // it exists (someone else's), or it cannot be made at all
            Err(e) if e.kind == ErrorKind::Remote => match self.sftp_size(path)? {
                Some(_) => Ok(false),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Create the symlink `path` → `owner` (one request; it fails when
    /// anything is at `path`): `Ok(true)` taken, `Ok(false)` something is
    /// there. A server that refuses symlinks gets [`SshSession::sftp_create_excl`].
    pub fn sftp_symlink_excl(&mut self, path: &str, owner: &str) -> Result<bool, TransferError> {
        let r = self.sftp_op(Op::Lock, path, |s| {
            s.symlink(Path::new(owner), Path::new(path))
        });
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind == ErrorKind::Remote => match self.sftp_size(path)? {
                Some(_) => Ok(false),
                None => self.sftp_create_excl(path, owner),
            },
            Err(e) => Err(e),
        }
    }

    /// Who holds the lock at `path`: a symlink's target, else (a lock made
    /// by `set -C` or an older dispatch) the file's first line; `None` when
    /// nothing is there.
    pub fn sftp_lock_holder(&mut self, path: &str) -> Result<Option<String>, TransferError> {
        match self.sftp_op(Op::Lock, path, |s| s.readlink(Path::new(path))) {
            Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
            Err(e) if e.kind == ErrorKind::Remote => {
                Ok(self.sftp_read_small(path)?.map(|(text, _)| text))
            }
            Err(e) => Err(e),
        }
    }

    /// [`SshSession::sftp_create_excl`], again if the file that was in the
    /// way is gone by the time it is looked at (its holder removed it).
    pub fn sftp_create_excl_retrying(
        &mut self,
        path: &str,
        owner: &str,
    ) -> Result<bool, TransferError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.sftp_create_excl(path, owner) {
                Err(e) if e.kind == ErrorKind::Remote && tries < 5 => {
                    log::debug!("ssh {}: {path}: {e}; trying again", self.target.addr());
                }
                r => return r,
            }
        }
    }

    /// A remote file's content (small files: lock owners) and its age.
    pub fn sftp_read_small(&mut self, path: &str) -> Result<Option<(String, u64)>, TransferError> {
        let r = self.sftp_op(Op::Lock, path, |s| {
            let mut f = s.open(Path::new(path))?;
            let st = f.stat()?;
            let mut buf = Vec::new();
            let _ = (&mut f).take(4096).read_to_end(&mut buf);
            Ok((String::from_utf8_lossy(&buf).into_owned(), st.mtime))
        });
        match r {
            Ok((text, mtime)) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Ok(Some((text, now.saturating_sub(mtime.unwrap_or(now)))))
            }
            Err(e) if e.kind == ErrorKind::Remote => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Read the sink's one-byte answer: 0 = ok, 1/2 + a message line = error.
    fn sink_ack(&mut self, what: &str) -> Result<(), TransferError> {
        let Some((_, ch)) = self.sink.as_mut() else {
            return Err(self
                .err(ErrorKind::Connect, Protocol::Scp, Op::Upload)
                .step("no sink")
                .protocol_only());
        };
        let mut b = [0u8; 1];
        let n = ch.read(&mut b);
        match n {
            Ok(1) if b[0] == 0 => Ok(()),
            Ok(1) => {
                let mut msg = Vec::new();
                let mut c = [0u8; 1];
                while msg.len() < 1024 {
                    match ch.read(&mut c) {
                        Ok(1) if c[0] != b'\n' => msg.push(c[0]),
                        _ => break,
                    }
                }
                let msg = String::from_utf8_lossy(&msg).trim().to_string();
                let kind = if msg.contains("not found") && msg.contains("scp") {
                    ErrorKind::Unavailable
                } else {
                    ErrorKind::Remote
                };
                Err(self
                    .err(kind, Protocol::Scp, Op::Upload)
                    .step(format!("scp {what}"))
                    .cause(msg))
            }
            Ok(_) => Err(self.fail(
                ErrorKind::Connect,
                SCP,
                format!("scp {what}"),
                "remote scp closed the connection (is scp installed on the host?)",
            )),
            Err(e) => Err(self.fail(io_kind(&e), SCP, format!("scp {what}"), e)),
        }
    }

    fn sink_send(
        &mut self,
        src: Source<'_>,
        dir: &str,
        tmp_name: &str,
        want_sha: bool,
        meter: &mut Meter<'_>,
    ) -> Result<(u64, Option<String>), TransferError> {
        let (f, size, mode) = (src.file, src.size, src.mode);
        let io = self.target.io_timeout;
        if self.sink.as_ref().is_none_or(|(d, _)| d != dir) {
            self.sink = None;
            let mut ch = self
                .sess
                .channel_session()
                .map_err(|e| self.fail(ssh_kind(&e), SCP, "open scp channel", e))?;
            // stderr of the remote scp would otherwise fill the window unread
            ch.handle_extended_data(ExtendedData::Merge)
                .map_err(|e| self.fail(ssh_kind(&e), SCP, "scp channel setup", e))?;
            let cmd = format!("scp -d -t -- {}", crate::route::shell_quote(dir));
            ch.exec(&cmd)
                .map_err(|e| self.fail(ssh_kind(&e), SCP, "start remote scp", e))?;
            self.sink = Some((dir.to_string(), ch));
            self.sink_ack("start")?;
        }
        let header = format!("C{:04o} {size} {tmp_name}\n", mode & 0o7777);
        let w = self
            .sink
            .as_mut()
            .map(|(_, ch)| ch.write_all(header.as_bytes()));
        if let Some(Err(e)) = w {
            return Err(self.fail(io_kind(&e), SCP, "scp header", e));
        }
        self.sink_ack(&format!("to {dir}/{tmp_name}"))?;
        let mut hasher = want_sha.then(Sha256::new);
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from((size - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n =
                std::os::unix::fs::FileExt::read_at(f, &mut buf[..want], sent).map_err(|e| {
                    self.err(ErrorKind::Local, Protocol::Scp, Op::ReadLocal)
                        .step("reading local file")
                        .cause(e)
                        .bare()
                })?;
            if n == 0 {
                return Err(self
                    .err(ErrorKind::Local, Protocol::Scp, Op::ReadLocal)
                    .step(format!(
                        "local file shrank while uploading ({sent} of {size} bytes)"
                    ))
                    .bare());
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            let w = self.sink.as_mut().map(|(_, ch)| ch.write_all(&buf[..n]));
            if let Some(Err(e)) = w {
                return Err(self
                    .fail(io_kind(&e), SCP, format!("scp to {dir}/{tmp_name}"), e)
                    .path(format!("{dir}/{tmp_name}")));
            }
            sent += n as u64;
            meter.sent(sent);
            self.watchdog.kick(io);
            if crate::interrupt::requested() {
                return Err(self
                    .err(ErrorKind::Interrupted, Protocol::Scp, Op::Upload)
                    .step("upload interrupted"));
            }
        }
        // end of file: a NUL, then the sink acknowledges the whole file
        let w = self.sink.as_mut().map(|(_, ch)| ch.write_all(&[0]));
        if let Some(Err(e)) = w {
            return Err(self.fail(io_kind(&e), SCP, "scp end of file", e));
        }
        self.sink_ack(&format!("to {dir}/{tmp_name}"))?;
        Ok((sent, hasher.map(|h| hex(&h.finalize()))))
    }

    /// Run a script through the session's driver (one remote process for all
    /// files); falls back to one exec if the driver cannot be started. If
    /// `marker` is printed, only the output after it is kept. `limit` is the
    /// script's deadline on the host; the client gives up [`DRIVER_GRACE`]
    /// later.
    pub fn run_script(
        &mut self,
        script: &str,
        limit: Duration,
        marker: Option<&str>,
    ) -> Result<ExecOutput, TransferError> {
        if self.driver.is_none() {
            let nonce = crate::transport::random_hex();
            let ch = self.sess.channel_session().and_then(|mut ch| {
                ch.handle_extended_data(ExtendedData::Merge)?;
                ch.exec(&driver_command(&nonce))?;
                Ok(ch)
            });
            match ch {
                Ok(ch) => self.driver = Some((ch, rc_marker(&nonce))),
                Err(e) => {
                    log::debug!(
                        "ssh {}: no script runner ({e}); one exec per file",
                        self.target.addr()
                    );
                    self.set_read_timeout(limit + DRIVER_GRACE);
                    self.watchdog.kick(limit + DRIVER_GRACE);
                    let q = crate::route::shell_quote(script);
                    let secs = limit.as_secs().max(1);
                    let cmd = format!(
                        "if command -v timeout >/dev/null 2>&1; then exec timeout -k 10 {secs} sh -c {q} </dev/null 2>&1; \
                         else exec sh -c {q} </dev/null 2>&1; fi"
                    );
                    let r = self.exec_inner(&cmd, marker);
                    self.watchdog.disarm();
                    self.set_read_timeout(self.target.io_timeout);
                    return r;
                }
            }
        }
        // the install, not the transfer, bounds a script: a quiet install
        // longer than io_timeout is not a stalled connection
        self.set_read_timeout(limit + DRIVER_GRACE);
        self.watchdog.kick(limit + DRIVER_GRACE);
        let r = self.driver_job(script, limit, marker);
        self.watchdog.disarm();
        self.set_read_timeout(self.target.io_timeout);
        if r.is_err() {
            self.driver = None;
        }
        r
    }

    fn set_read_timeout(&self, d: Duration) {
        let ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1);
        self.sess.set_timeout(ms);
    }

    fn driver_job(
        &mut self,
        script: &str,
        limit: Duration,
        marker: Option<&str>,
    ) -> Result<ExecOutput, TransferError> {
        let Some((ch, _)) = self.driver.as_mut() else {
            return Err(self
                .err(ErrorKind::Connect, Protocol::Ssh, Op::RunScript)
                .step("no script runner")
                .bare());
        };
        if script.contains('\0') {
            return Err(self
                .err(ErrorKind::Local, Protocol::Ssh, Op::RunScript)
                .step("a script with a NUL byte cannot be run")
                .bare());
        }
        let job = frame_job(limit.as_secs(), script);
        if let Err(e) = ch.write_all(&job).and_then(|_| ch.flush()) {
            return Err(self.fail(io_kind(&e), SCRIPT, "sending script", e));
        }
        let mut scan = Scan::new(marker);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match self.driver.as_mut().map(|(ch, _)| ch.read(&mut buf)) {
                Some(Ok(0)) | None => {
                    return Err(self.fail(
                        ErrorKind::Connect,
                        SCRIPT,
                        "script runner",
                        "ended unexpectedly",
                    ))
                }
                Some(Ok(n)) => n,
                Some(Err(e)) => {
                    return Err(self.fail(io_kind(&e), SCRIPT, "reading script output", e))
                }
            };
            scan.feed(&buf[..n]);
            let rc = self
                .driver
                .as_ref()
                .map(|(_, m)| m.as_slice())
                .unwrap_or_default();
            if let Some(status) = scan.status(rc) {
                // a shell reports death by signal N as 128+N
                let signal = (129..160)
                    .contains(&status)
                    .then(|| format!("{}", status - 128));
                return Ok(scan.finish(status, signal));
            }
        }
    }
}

impl SshSession {
    /// Why did the scp upload fail? Its errors are generic; ask the host.
    pub fn diagnose_scp(&mut self, dir: &str) -> Option<TransferError> {
        let q = crate::route::shell_quote(dir);
        let cmd = format!(
            "command -v scp >/dev/null 2>&1 || exit 127; test -d {q} || exit 3; test -w {q} || exit 4; exit 0"
        );
        let out = self.exec(&cmd, self.target.io_timeout).ok()?;
        let e = |kind, op| self.err(kind, Protocol::Scp, op);
        match out.status {
            127 => {
                Some(e(ErrorKind::Unavailable, Op::Upload).step("scp is not installed on the host"))
            }
            3 => Some(
                e(ErrorKind::Remote, Op::Mkdir)
                    .step(format!("remote directory {dir} does not exist"))
                    .path(dir),
            ),
            4 => Some(
                e(ErrorKind::Remote, Op::Upload)
                    .step(format!("permission denied writing to {dir}"))
                    .path(dir),
            ),
            _ => None,
        }
    }
}

/// SCP to `dir/tmp_name`; verifying and publishing it is the executor's
/// (over SFTP or a script, see `job::publish`).
impl Uploader for SshSession {
    fn transport(&self) -> Transport {
        Transport::Scp
    }

    fn is_alive(&self) -> bool {
        SshSession::is_alive(self)
    }

    fn upload(
        &mut self,
        job: Upload<'_>,
        progress: Progress<'_>,
    ) -> Result<Uploaded, TransferError> {
        let (bytes, sha256) =
            self.scp_upload(job.src, job.dir, job.tmp_name, job.want_sha, progress)?;
        Ok(Uploaded {
            bytes,
            sha256,
            published: false,
            cleartext: false,
        })
    }
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b"", true), "");
        assert_eq!(base64(b"f", true), "Zg==");
        assert_eq!(base64(b"fo", true), "Zm8=");
        assert_eq!(base64(b"foobar", true), "Zm9vYmFy");
        assert_eq!(base64(b"fo", false), "Zm8");
    }

    #[test]
    fn tail_keeps_last_lines() {
        let mut t = Tail::new(64);
        for i in 0..1000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(t.lines(2), "line 998\nline 999");
    }

    #[test]
    fn watchdog_fires_after_deadline_and_not_before() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server_side, _) = l.accept().unwrap();
        let wd = Watchdog::new(c.try_clone().unwrap(), "t".into());
        wd.kick(Duration::from_millis(100));
        assert!(!wd.fired());
        let started = Instant::now();
        let mut b = [0u8; 1];
        // the client side is shut down by the watchdog: the server reads EOF
        let n = server_side.read(&mut b).unwrap();
        assert_eq!(n, 0);
        assert!(wd.fired());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
