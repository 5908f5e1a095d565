//! SSH with the `ssh2` crate (libssh2): connect with a deadline, check the host
//! key against `known_hosts`, authenticate, create directories, stream a file
//! over SCP under a temporary name, and run remote commands.
//!
//! libssh2 has no timeout by default, and with one set it waits the timeout out
//! again in every clean-up step. So every session carries a [`Watchdog`]: a
//! thread that shuts the socket down when a deadline passes without progress.
//! After that the session is dead and every call fails at once — a stalled
//! transfer fails at its deadline, not at a multiple of it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use ssh2::{
    CheckResult, ErrorCode, ExtendedData, HashType, HostKeyType, KnownHostFileKind, Session,
};

use super::watchdog::Watchdog;
use super::{io_kind, ErrorKind, TransferError};
use crate::config::{HostKeyCheck, Secret};

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
}

/// The session's script runner: reads framed scripts from stdin (see
/// [`frame_job`]) and runs each, printing a status line after it. One remote
/// process per session instead of one login shell per file.
///
/// With bash on the host ([`BASH_DRIVER`]) a persistent `sh` ([`EXECUTOR`],
/// as `dispatch-bounded`) reads the scripts and runs each in a subshell —
/// or, for a script tagged [`IN_PLACE`], in its own shell — while bash only
/// keeps the deadline: per file at most one `sh` fork, no `timeout`, no
/// shell exec. Without bash a plain `sh` loop ([`SH_DRIVER`]) runs each
/// script with `sh -c` under coreutils `timeout`. The runners are passed as
/// quoted arguments, so the login shell only ever sees a plain `exec sh -c
/// ARG NAME ARG ARG ARG ARG`.
///
/// Each status line carries `nonce` (random per runner, see [`rc_marker`]),
/// so an install printing something that looks like one cannot end its
/// script early.
pub fn driver_command(nonce: &str) -> String {
    use crate::route::shell_quote;
    format!(
        "exec sh -c {} dispatch-sh {} {} {} {}",
        shell_quote(
            r#"if command -v bash >/dev/null 2>&1; then exec bash --norc -c "$1" dispatch-driver "$4" "$3"; fi; exec sh -c "$2" dispatch-driver "$4""#
        ),
        shell_quote(BASH_DRIVER),
        shell_quote(SH_DRIVER),
        shell_quote(EXECUTOR),
        shell_quote(nonce),
    )
}

/// One script as the runners read it: a line with the deadline in seconds,
/// each line of the script prefixed with `>`, then `.` — or `+` for a
/// script tagged [`IN_PLACE`] (the tag itself is not sent). No line of a
/// script, a quoted file name with newlines included, can end it early.
pub fn frame_job(secs: u64, script: &str) -> Vec<u8> {
    let (body, end) = match script.strip_prefix(IN_PLACE) {
        Some(body) => (body, b'+'),
        None => (script, b'.'),
    };
    let mut job = Vec::with_capacity(body.len() + 32);
    job.extend_from_slice(format!("{}\n", secs.max(1)).as_bytes());
    for line in body.split('\n') {
        job.push(b'>');
        job.extend_from_slice(line.as_bytes());
        job.push(b'\n');
    }
    job.extend_from_slice(&[end, b'\n']);
    job
}

/// What the runner prints before a script's status: `\n@@dispatch:NONCE:rc:`.
pub fn rc_marker(nonce: &str) -> Vec<u8> {
    format!("\n@@dispatch:{nonce}:rc:").into_bytes()
}

/// 16 hex digits from the kernel's random source (the time and pid if that
/// cannot be read): not a secret, just not guessable by an install's output.
fn fresh_nonce() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mixed = t ^ (u128::from(std::process::id()) << 64);
        b.copy_from_slice(&mixed.to_le_bytes()[..8]);
    }
    hex(&b)
}

/// The bash runner (`$1` = the status marker's nonce, `$2` = [`EXECUTOR`]).
/// The executor is a coprocess in a process group of its own (`set -m`)
/// reading the channel (fd 5, bash's stdin) and writing the scripts' output
/// to it (fd 4); it tells bash the deadline when a script starts and its
/// status when it ends, on the coprocess pipe. bash waits for the status
/// with `read -t` (a wait with a deadline, no `sleep` process). At the
/// deadline the executor's group (it and the script's processes) gets TERM,
/// 10 s later KILL, the status is 124, as with coreutils `timeout`, and a
/// new executor reads on: the client sends the next script only after this
/// status, so nothing of it was read. fd 3 is a pipe to itself, to sleep on.
pub const BASH_DRIVER: &str = r#"set -m; exec 4>&1 5<&0 3<> <(:) </dev/null; m=$1; e=$2
up() { coproc EX { exec sh -c "$e" dispatch-bounded <&5 5<&- 3>&-; }; g=$EX_PID; i=${EX[0]}; }
up
while IFS= read -r -u "$i" t; do
  if IFS= read -r -t "$t" -u "$i" rc; then :
  elif [ $? -gt 128 ]; then
    rc=124; kill -TERM -- "-$g" 2>/dev/null
    n=0; while kill -0 -- "-$g" 2>/dev/null && [ $n -lt 100 ]; do read -r -t 0.1 -u 3 _; n=$((n + 1)); done
    kill -KILL -- "-$g" 2>/dev/null; wait "$g" 2>/dev/null; up
  else
    wait "$g" 2>/dev/null; rc=$?; kill -KILL -- "-$g" 2>/dev/null; up
  fi
  printf '\n@@dispatch:%s:rc:%s\n' "$m" "$rc"
done"#;

/// The executor under the bash runner: reads a script (see [`frame_job`]),
/// reports its deadline to bash, runs it with stdin from /dev/null and its
/// output on the channel (fd 4) and reports its exit status (`$0` in a
/// script is `dispatch-bounded`). A script ended by `+` runs without a
/// subshell: its `exit` ends the executor, whose status bash then reports
/// before starting a new one. A script cut short (end of input) never runs.
pub const EXECUTOR: &str = r#"nl='
'
while IFS= read -r t; do
  s=
  while IFS= read -r l; do case $l in '>'*) s=$s${l#?}$nl ;; *) break ;; esac; done
  case $l in . | +) ;; *) exit 0 ;; esac
  echo "$t"
  if [ "$l" = + ]; then eval "$s" </dev/null >&4 2>&1 4>&-
  else ( eval "$s" ) </dev/null >&4 2>&1 4>&-; fi
  echo "$?"
done"#;

/// First line of a script that may run in the runner's own shell rather than
/// a subshell: it only `cd`s, `exit`s, and runs one external command (see
/// `route::is_simple_command`).
pub const IN_PLACE: &str = "#dispatch:in-place\n";

/// The fallback runner (no bash; `$1` = the nonce): one `sh -c` per script,
/// stdin from /dev/null, the deadline enforced by coreutils `timeout`
/// (TERM, KILL 10 s later, status 124) when the host has it.
pub const SH_DRIVER: &str = r#"nl='
'
while IFS= read -r t; do
  s=
  while IFS= read -r l; do case $l in '>'*) s=$s${l#?}$nl ;; *) break ;; esac; done
  case $l in . | +) ;; *) exit 0 ;; esac
  if command -v timeout >/dev/null 2>&1; then timeout -k 10 "$t" sh -c "$s" </dev/null 2>&1
  else sh -c "$s" </dev/null 2>&1; fi
  printf '\n@@dispatch:%s:rc:%s\n' "$1" "$?"
done"#;

/// How much longer than a script's remote deadline the client waits: the
/// runner's TERM-then-KILL takes up to 10 s.
const DRIVER_GRACE: Duration = Duration::from_secs(15);

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

/// Serialises appends to known_hosts files within this process.
static KNOWN_HOSTS_LOCK: Mutex<()> = Mutex::new(());

impl SshSession {
    /// Connect, check the host key, authenticate. Every step is bounded by
    /// `connect_timeout` (TCP) and `io_timeout` (protocol).
    pub fn connect(t: &SshTarget) -> Result<SshSession, TransferError> {
        let addr = t.addr();
        let err = |kind, what: &str, e: &dyn std::fmt::Display| {
            TransferError::new(kind, format!("ssh {addr}: {what}: {e}"))
        };
        let started = Instant::now();
        let addrs: Vec<_> = (t.host.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| err(ErrorKind::Connect, "cannot resolve host", &e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in &addrs {
            let left = t.connect_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(a, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(s), _) => s,
            (None, Some(e)) => {
                let what = if e.kind() == std::io::ErrorKind::TimedOut {
                    format!(
                        "connect timed out after {:.1}s",
                        t.connect_timeout.as_secs_f64()
                    )
                } else {
                    "connect failed".to_string()
                };
                return Err(err(io_kind(&e), &what, &e));
            }
            (None, None) => {
                return Err(TransferError::new(
                    ErrorKind::Timeout,
                    format!("ssh {addr}: connect timed out"),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        let clone = tcp
            .try_clone()
            .map_err(|e| err(ErrorKind::Connect, "socket", &e))?;
        let watchdog = Watchdog::new(clone, format!("ssh {addr}"));
        let mut sess = Session::new().map_err(|e| err(ErrorKind::Connect, "libssh2 init", &e))?;
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
        // the handshake and auth share one deadline: connect_timeout + io_timeout
        watchdog.kick(t.connect_timeout + t.io_timeout);
        sess.handshake().map_err(|e| {
            let kind = if watchdog.fired() {
                ErrorKind::Timeout
            } else {
                ssh_kind(&e)
            };
            err(kind, "handshake failed", &e)
        })?;
        let mut s = SshSession {
            sess,
            watchdog,
            target: t.clone(),
            made_dirs: Vec::new(),
            sink: None,
            driver: None,
            broken: std::cell::Cell::new(false),
            sftp: None,
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

    fn fail(&self, kind: ErrorKind, what: &str, e: &dyn std::fmt::Display) -> TransferError {
        let kind = if self.watchdog.fired() {
            ErrorKind::Timeout
        } else {
            kind
        };
        if matches!(kind, ErrorKind::Connect | ErrorKind::Timeout) {
            self.broken.set(true);
        }
        let suffix = if self.watchdog.fired() {
            " (deadline passed, connection closed)"
        } else {
            ""
        };
        TransferError::new(
            kind,
            format!("ssh {}: {what}: {e}{suffix}", self.target.addr()),
        )
    }

    fn check_host_key(&mut self) -> Result<(), TransferError> {
        let t = &self.target;
        let addr = t.addr();
        let (key, ktype) = match self.sess.host_key() {
            Some((k, ty)) => (k.to_vec(), ty),
            None => {
                return Err(TransferError::new(
                    ErrorKind::HostKey,
                    format!("ssh {addr}: server sent no host key"),
                ))
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
            .map_err(|e| self.fail(ErrorKind::HostKey, "known_hosts", &e))?;
        if t.known_hosts.exists() {
            kh.read_file(&t.known_hosts, KnownHostFileKind::OpenSSH)
                .map_err(|e| {
                    TransferError::new(
                        ErrorKind::HostKey,
                        format!("ssh {addr}: cannot read {}: {e}", t.known_hosts.display()),
                    )
                })?;
        }
        let entry = if t.port == 22 {
            t.host.clone()
        } else {
            format!("[{}]:{}", t.host, t.port)
        };
        match kh.check_port(&t.host, t.port, &key) {
            CheckResult::Match => Ok(()),
            CheckResult::Mismatch => Err(TransferError::new(
                ErrorKind::HostKey,
                format!(
                    "ssh {addr}: HOST KEY CHANGED: the {ktype} key ({fp}) does not match {}. \
                     This may be an attack; refused. If the host was really reinstalled, remove \
                     the old line with: ssh-keygen -R '{entry}' -f {}",
                    t.known_hosts.display(),
                    t.known_hosts.display()
                ),
            )),
            CheckResult::NotFound | CheckResult::Failure => match t.host_key_check {
                HostKeyCheck::Strict => Err(TransferError::new(
                    ErrorKind::HostKey,
                    format!(
                        "ssh {addr}: host key not known ({ktype} {fp}) and host_key_check = strict; \
                         to trust it, check the fingerprint and run: ssh-keyscan -p {} {} >> {} \
                         (or set host_key_check = accept-new)",
                        t.port,
                        t.host,
                        t.known_hosts.display()
                    ),
                )),
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
            TransferError::new(
                ErrorKind::HostKey,
                format!(
                    "ssh {}: cannot record host key in {}: {e}",
                    self.target.addr(),
                    path.display()
                ),
            )
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
            return Err(self.fail(ErrorKind::Timeout, "authentication", &"timed out"));
        }
        let tried = if tried.is_empty() {
            format!(
                "no usable method (server offers: {methods}; no key, agent or password configured)"
            )
        } else {
            format!("tried {}", tried.join(", "))
        };
        Err(TransferError::new(
            ErrorKind::Auth,
            format!("ssh {}: login as {login} rejected ({tried})", t.addr()),
        ))
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
            .map_err(|e| self.fail(ssh_kind(&e), "open channel", &e))?;
        ch.handle_extended_data(ExtendedData::Merge)
            .map_err(|e| self.fail(ssh_kind(&e), "channel setup", &e))?;
        ch.exec(cmd)
            .map_err(|e| self.fail(ssh_kind(&e), "exec", &e))?;
        let mut scan = Scan::new(marker);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match ch.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => scan.feed(&buf[..n]),
                Err(e) => return Err(self.fail(io_kind(&e), "reading command output", &e)),
            }
        }
        ch.wait_close()
            .map_err(|e| self.fail(ssh_kind(&e), "closing channel", &e))?;
        let status = ch
            .exit_status()
            .map_err(|e| self.fail(ssh_kind(&e), "exit status", &e))?;
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
            return Err(TransferError::new(
                ErrorKind::Remote,
                format!(
                    "ssh {}: cannot create directory {dir}: {}",
                    self.target.addr(),
                    out.output.trim()
                ),
            ));
        }
        self.made_dirs.push(dir.to_string());
        Ok(())
    }

    /// Stream `local` into `dir/tmp_name` over SCP (the legacy scp protocol,
    /// spoken to one remote `scp -t` per directory and session, so a batch
    /// of files costs one remote process, not one per file). Returns bytes
    /// sent and, if asked, the sha256 of what was sent.
    pub fn scp_upload(
        &mut self,
        local: &Path,
        dir: &str,
        tmp_name: &str,
        want_sha: bool,
    ) -> Result<(u64, Option<String>), TransferError> {
        let mut f = std::fs::File::open(local).map_err(|e| {
            TransferError::new(
                ErrorKind::Local,
                format!("cannot open {}: {e}", local.display()),
            )
        })?;
        let size = f
            .metadata()
            .map_err(|e| {
                TransferError::new(
                    ErrorKind::Local,
                    format!("cannot stat {}: {e}", local.display()),
                )
            })?
            .len();
        if tmp_name.contains(['\n', '\r', '/']) {
            return Err(TransferError::new(
                ErrorKind::Local,
                format!("temporary name {tmp_name:?} cannot travel in the scp protocol"),
            ));
        }
        self.watchdog.kick(self.target.io_timeout);
        let r = self.sink_send(&mut f, size, dir, tmp_name, want_sha);
        self.watchdog.disarm();
        if r.is_err() {
            self.sink = None;
        }
        r
    }

    /// Check `dir/tmp_name` (its size, if `size` is given) and rename it to
    /// `dir/name` over SFTP: no remote process per file. `Ok(false)`: the
    /// host has no SFTP subsystem; do it with a shell instead.
    pub fn sftp_finalize(
        &mut self,
        dir: &str,
        tmp_name: &str,
        name: &str,
        size: Option<u64>,
    ) -> Result<bool, TransferError> {
        if self.sftp.is_none() {
            self.watchdog.kick(self.target.io_timeout);
            let opened = self.sess.sftp();
            self.watchdog.disarm();
            self.sftp = Some(match opened {
                Ok(s) => Ok(s),
                Err(e) => {
                    if self.watchdog.fired() {
                        return Err(self.fail(ErrorKind::Timeout, "sftp", &e));
                    }
                    log::debug!(
                        "ssh {}: no SFTP ({e}); renaming with a shell",
                        self.target.addr()
                    );
                    Err(())
                }
            });
        }
        let Some(Ok(sftp)) = &self.sftp else {
            return Ok(false);
        };
        let tmp = PathBuf::from(crate::route::remote_join(dir, tmp_name));
        let fin = PathBuf::from(crate::route::remote_join(dir, name));
        let addr = self.target.addr();
        let remote = |what: String, e: ssh2::Error| match e.code() {
            ErrorCode::SFTP(_) => {
                TransferError::new(ErrorKind::Remote, format!("ssh {addr}: {what}: {e}"))
            }
            _ => TransferError::new(ssh_kind(&e), format!("ssh {addr}: {what}: {e}")),
        };
        self.watchdog.kick(self.target.io_timeout);
        let r = (|| {
            if let Some(want) = size {
                let st = sftp
                    .stat(&tmp)
                    .map_err(|e| remote(format!("stat {}", tmp.display()), e))?;
                if st.size != Some(want) {
                    return Err(TransferError::new(
                        ErrorKind::Verify,
                        format!(
                            "ssh {addr}: verification failed: {} has {} bytes on the host, sent {want}",
                            tmp.display(),
                            st.size.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
                        ),
                    ));
                }
            }
            // SFTP v3 rename refuses an existing target: remove it first (the
            // final name is briefly absent, never partial)
            let _ = sftp.unlink(&fin);
            sftp.rename(&tmp, &fin, None)
                .map_err(|e| remote(format!("rename {} to {name}", tmp.display()), e))
        })();
        self.watchdog.disarm();
        if let Err(e) = &r {
            if matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout) || self.watchdog.fired() {
                self.broken.set(true);
            }
        }
        r.map(|_| true)
    }

    /// Read the sink's one-byte answer: 0 = ok, 1/2 + a message line = error.
    fn sink_ack(&mut self, what: &str) -> Result<(), TransferError> {
        let Some((_, ch)) = self.sink.as_mut() else {
            return Err(TransferError::new(ErrorKind::Connect, "scp: no sink"));
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
                Err(TransferError::new(
                    kind,
                    format!("ssh {}: scp {what}: {msg}", self.target.addr()),
                ))
            }
            Ok(_) => Err(self.fail(
                ErrorKind::Connect,
                &format!("scp {what}"),
                &"remote scp closed the connection (is scp installed on the host?)",
            )),
            Err(e) => Err(self.fail(io_kind(&e), &format!("scp {what}"), &e)),
        }
    }

    fn sink_send(
        &mut self,
        f: &mut std::fs::File,
        size: u64,
        dir: &str,
        tmp_name: &str,
        want_sha: bool,
    ) -> Result<(u64, Option<String>), TransferError> {
        let io = self.target.io_timeout;
        if self.sink.as_ref().is_none_or(|(d, _)| d != dir) {
            self.sink = None;
            let mut ch = self
                .sess
                .channel_session()
                .map_err(|e| self.fail(ssh_kind(&e), "open scp channel", &e))?;
            // stderr of the remote scp would otherwise fill the window unread
            ch.handle_extended_data(ExtendedData::Merge)
                .map_err(|e| self.fail(ssh_kind(&e), "scp channel setup", &e))?;
            let cmd = format!("scp -d -t -- {}", crate::route::shell_quote(dir));
            ch.exec(&cmd)
                .map_err(|e| self.fail(ssh_kind(&e), "start remote scp", &e))?;
            self.sink = Some((dir.to_string(), ch));
            self.sink_ack("start")?;
        }
        let header = format!("C0644 {size} {tmp_name}\n");
        let w = self
            .sink
            .as_mut()
            .map(|(_, ch)| ch.write_all(header.as_bytes()));
        if let Some(Err(e)) = w {
            return Err(self.fail(io_kind(&e), "scp header", &e));
        }
        self.sink_ack(&format!("to {dir}/{tmp_name}"))?;
        let mut hasher = want_sha.then(Sha256::new);
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from((size - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = f.read(&mut buf[..want]).map_err(|e| {
                TransferError::new(ErrorKind::Local, format!("reading local file: {e}"))
            })?;
            if n == 0 {
                return Err(TransferError::new(
                    ErrorKind::Local,
                    format!("local file shrank while uploading ({sent} of {size} bytes)"),
                ));
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            let w = self.sink.as_mut().map(|(_, ch)| ch.write_all(&buf[..n]));
            if let Some(Err(e)) = w {
                return Err(self.fail(io_kind(&e), &format!("scp to {dir}/{tmp_name}"), &e));
            }
            sent += n as u64;
            self.watchdog.kick(io);
        }
        // end of file: a NUL, then the sink acknowledges the whole file
        let w = self.sink.as_mut().map(|(_, ch)| ch.write_all(&[0]));
        if let Some(Err(e)) = w {
            return Err(self.fail(io_kind(&e), "scp end of file", &e));
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
            let nonce = fresh_nonce();
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
                    self.watchdog.kick(limit + DRIVER_GRACE);
                    let q = crate::route::shell_quote(script);
                    let secs = limit.as_secs().max(1);
                    let cmd = format!(
                        "if command -v timeout >/dev/null 2>&1; then exec timeout -k 10 {secs} sh -c {q} </dev/null 2>&1; \
                         else exec sh -c {q} </dev/null 2>&1; fi"
                    );
                    let r = self.exec_inner(&cmd, marker);
                    self.watchdog.disarm();
                    return r;
                }
            }
        }
        self.watchdog.kick(limit + DRIVER_GRACE);
        let r = self.driver_job(script, limit, marker);
        self.watchdog.disarm();
        if r.is_err() {
            self.driver = None;
        }
        r
    }

    fn driver_job(
        &mut self,
        script: &str,
        limit: Duration,
        marker: Option<&str>,
    ) -> Result<ExecOutput, TransferError> {
        let Some((ch, _)) = self.driver.as_mut() else {
            return Err(TransferError::new(ErrorKind::Connect, "no script runner"));
        };
        if script.contains('\0') {
            return Err(TransferError::new(
                ErrorKind::Local,
                "a script with a NUL byte cannot be run",
            ));
        }
        let job = frame_job(limit.as_secs(), script);
        if let Err(e) = ch.write_all(&job).and_then(|_| ch.flush()) {
            return Err(self.fail(io_kind(&e), "sending script", &e));
        }
        let mut scan = Scan::new(marker);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match self.driver.as_mut().map(|(ch, _)| ch.read(&mut buf)) {
                Some(Ok(0)) | None => {
                    return Err(self.fail(
                        ErrorKind::Connect,
                        "script runner",
                        &"ended unexpectedly",
                    ))
                }
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(self.fail(io_kind(&e), "reading script output", &e)),
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
        let addr = self.target.addr();
        match out.status {
            127 => Some(TransferError::new(
                ErrorKind::Unavailable,
                format!("ssh {addr}: scp is not installed on the host"),
            )),
            3 => Some(TransferError::new(
                ErrorKind::Remote,
                format!("ssh {addr}: remote directory {dir} does not exist"),
            )),
            4 => Some(TransferError::new(
                ErrorKind::Remote,
                format!("ssh {addr}: permission denied writing to {dir}"),
            )),
            _ => None,
        }
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
