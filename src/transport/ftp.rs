//! FTP and FTPS, the fallback transport, with the `suppaftp` crate: connect
//! with a deadline, secure the connection, log in, `mkdir -p` by components,
//! stream a file in binary mode to a temporary name the caller chose, check
//! its size, rename it into place, set its permission bits.
//!
//! Why it looks the way it does:
//! - **TLS unless told otherwise.** `ftps = auto` (the default) sends `AUTH
//!   TLS` first and verifies the certificate; plain FTP, which sends the
//!   password in cleartext, is used only when the server does not offer TLS
//!   *and* the route says `ftp_cleartext = yes` (also required by `ftps =
//!   off`). A certificate problem is an error, never a reason to go plain.
//!   `AUTH TLS` is sent by us with `custom_command`; on `234` we secure the
//!   socket ourselves and hand it to suppaftp as for implicit FTPS (below),
//!   so a refusal leaves the plain connection usable without reconnecting.
//! - **Temporary names come from the caller** (`.dispatch-<random>.part`,
//!   see [`temp_name`]): short, ASCII and unique per upload, so long names,
//!   names that differ only in characters FTP cannot carry, and two senders
//!   of one name never share a temporary file. The size is checked on the
//!   temporary name before the rename, so only this upload's bytes get the
//!   final name.
//! - **The local file is read positionally** (`read_at` from offset 0): one
//!   open `File` may be uploaded to several hosts at once.
//! - **Deadlines.** Socket timeouts alone let a stalled transfer fail only
//!   after a multiple of `io_timeout` (every clean-up step waits again), and
//!   suppaftp reports them as `WouldBlock`. So each session carries a
//!   watchdog thread, kicked on progress, that shuts the control and data
//!   sockets down when no progress was made for `io_timeout`; the session is
//!   dead after that and every call fails at once.
//! - **TLS is rustls** (with ring, chosen explicitly, not a process default):
//!   vsftpd's default `require_ssl_reuse=YES` wants the data connection to
//!   resume the control connection's TLS session, which rustls does and
//!   native-tls does not. The handshake is done eagerly in our own connector
//!   so a certificate problem is reported as such, with the host and a hint.
//! - **Implicit FTPS** is built from suppaftp's explicit-mode API, because its
//!   implicit constructor has no timeouts: we secure the socket and read the
//!   greeting ourselves, then let `into_secure` adopt that stream (its `AUTH
//!   TLS` exchange goes to a throwaway loopback socket that answers `234`).
//! - **Binary type** always: suppaftp's default ASCII type turns LF into CRLF.
//! - **`mkdir -p`** tries `CWD` first and `MKD` only when that fails, because
//!   vsftpd's `550` for `MKD` on an existing directory does not say "exists"
//!   (and a concurrent session may create the directory between the two).
//! - suppaftp logs every command, `PASS` included, at trace level; login runs
//!   with trace logging held back so the password never reaches a log.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use suppaftp::rustls::pki_types::pem::PemObject;
use suppaftp::rustls::pki_types::{CertificateDer, ServerName};
use suppaftp::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use suppaftp::types::{FileType, Response};
use suppaftp::{FtpError, FtpResult, ImplFtpStream, Mode, Status, TlsConnector, TlsStream};

use super::watchdog::Watchdog;
use super::{
    io_kind, Cause, ErrorKind, Op, Progress, Protocol, TransferError, Upload, Uploaded, Uploader,
};
use crate::config::Transport;
use crate::config::{Ftps, Secret};

/// Bytes read from the local file per write to the data connection. Each
/// completed write is progress for the watchdog.
const CHUNK: usize = 128 * 1024;

/// Where a system's CA bundle usually lives, when `ftp_ca_file` is not set.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",   // RHEL, Fedora
    "/etc/ssl/ca-bundle.pem",             // SUSE
    "/etc/ssl/cert.pem",                  // BSD, macOS
];

/// Everything needed to open a session to one host.
pub struct FtpTarget<'a> {
    pub host: &'a str,
    pub port: u16,
    pub login: &'a str,
    pub password: Option<&'a Secret>,
    pub account: Option<&'a str>,
    pub ftps: Ftps,
    /// PEM roots for FTPS (private CA, self-signed); else the system's CA bundle.
    pub ca_file: Option<&'a Path>,
    /// false = active mode.
    pub passive: bool,
    /// false: upload straight to the final name (for servers that refuse RNFR/RNTO).
    pub rename: bool,
    /// `ftp_cleartext`: plain FTP allowed (with `ftps = off`, or `auto`
    /// against a server that does not offer TLS).
    pub cleartext: bool,
    pub connect_timeout: Duration,
    /// No progress for this long = stalled.
    pub io_timeout: Duration,
}

/// What one upload did.
#[derive(Debug, Clone)]
pub struct FtpUpload {
    pub bytes: u64,
    /// The file's path as the FTP server names it (inside its chroot, if any).
    pub remote_path: String,
    pub elapsed: Duration,
    /// The session is plain FTP: password and data went unencrypted.
    pub cleartext: bool,
}

/// Replies to `AUTH TLS` that mean "no TLS here" (`ftps = auto` may then
/// go plain, with `ftp_cleartext = yes`): not recognised (500), bad argument
/// (501), not implemented (502), mechanism unknown (504), unwilling (534),
/// and 530, which vsftpd without `ssl_enable` answers to every command
/// before login.
const TLS_NOT_OFFERED: &[u32] = &[500, 501, 502, 504, 530, 534];

/// A fresh temporary name for one upload: `.dispatch-<16 hex>.part`, the
/// digits from the kernel's random source (the time, pid and a counter if
/// that cannot be read). ASCII, 31 bytes.
pub fn temp_name() -> String {
    super::temp_name()
}

/// Reads a shared `File` from offset 0 with `read_at`, never touching its
/// cursor (other threads may be uploading the same `File`).
struct PositionalReader<'a> {
    file: &'a File,
    pos: u64,
    /// Told how far it has read (≈ sent: the copy writes what it reads).
    meter: Option<super::Meter<'a>>,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        if let Some(m) = self.meter.as_mut() {
            m.sent(self.pos);
        }
        Ok(n)
    }
}

type Ftp = ImplFtpStream<Tls>;

// ---------------------------------------------------------------- TLS

/// A rustls client stream over TCP, in the shape suppaftp wants. Sends
/// `close_notify` when dropped (vsftpd expects it at the end of an upload).
#[derive(Debug)]
struct Tls {
    stream: StreamOwned<ClientConnection, TcpStream>,
    close_notify: bool,
}

impl TlsStream for Tls {
    type InnerStream = StreamOwned<ClientConnection, TcpStream>;

    fn tcp_stream(mut self) -> FtpResult<TcpStream> {
        self.close_notify = false;
        self.stream
            .get_ref()
            .try_clone()
            .map_err(FtpError::ConnectionError)
    }

    fn get_ref(&self) -> &TcpStream {
        self.stream.get_ref()
    }

    fn mut_ref(&mut self) -> &mut Self::InnerStream {
        &mut self.stream
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        if self.close_notify {
            let _ = self.stream.flush();
            self.stream.conn.send_close_notify();
            let _ = self.stream.conn.write_tls(&mut self.stream.sock);
        }
    }
}

/// Secures control and data connections. The handshake is completed here,
/// with the socket timeouts set, so certificate errors surface as such.
struct Connector {
    config: Arc<ClientConfig>,
    io_timeout: Duration,
    /// Implicit FTPS: the control connection, already secured by us, handed
    /// to suppaftp by the first `connect` (the one `into_secure` makes).
    prepared: Mutex<Option<Tls>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector(rustls)")
    }
}

impl TlsConnector for Connector {
    type Stream = Tls;

    fn connect(&self, domain: &str, stream: TcpStream) -> FtpResult<Tls> {
        if let Some(tls) = self.prepared.lock().ok().and_then(|mut p| p.take()) {
            return Ok(tls);
        }
        handshake(&self.config, domain, stream, self.io_timeout).map_err(|e| match tls_error(&e) {
            Some(t) => FtpError::SecureError(describe_tls(t)),
            None => FtpError::ConnectionError(e),
        })
    }
}

fn handshake(
    config: &Arc<ClientConfig>,
    domain: &str,
    sock: TcpStream,
    io_timeout: Duration,
) -> io::Result<Tls> {
    sock.set_read_timeout(Some(io_timeout))?;
    sock.set_write_timeout(Some(io_timeout))?;
    let name = ServerName::try_from(domain.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(Tls {
        stream,
        close_notify: true,
    })
}

/// The rustls error inside an I/O error, if that is what it is.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A TLS failure in words an operator can act on.
fn describe_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature | C::Other(_) => format!(
                "certificate not trusted ({e}); for a private CA or a self-signed certificate, set ftp_ca_file = /path/ca.pem (the CA's PEM file, or the certificate itself) in the route"
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("certificate is for another host name ({e})")
            }
            C::Expired | C::ExpiredContext { .. } => format!("certificate expired ({e})"),
            _ => format!("certificate rejected ({e})"),
        },
        _ => format!("TLS failed ({e})"),
    }
}

/// Client config with ring, the given or system roots, safe protocol versions.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let env = std::env::var_os("SSL_CERT_FILE");
    let files: Vec<&Path> = match (ca_file, env.as_deref()) {
        (Some(p), _) => vec![p],
        (None, Some(p)) => vec![Path::new(p)],
        (None, None) => SYSTEM_CA_FILES
            .iter()
            .map(Path::new)
            .filter(|p| p.exists())
            .take(1)
            .collect(),
    };
    for path in files {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("no certificate in CA file {}", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connected pair of loopback sockets (for the implicit-FTPS hand-over).
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(l.local_addr()?)?;
    let (server, _) = l.accept()?;
    Ok((client, server))
}

/// Read the server's greeting over an implicit-TLS connection, up to its
/// final line. Byte by byte: the reader must not consume anything after it.
fn read_greeting(tls: &mut Tls) -> io::Result<String> {
    let mut all = Vec::new();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if tls.stream.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the greeting",
            ));
        }
        line.push(b[0]);
        all.push(b[0]);
        if all.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "greeting too long",
            ));
        }
        if b[0] == b'\n' {
            let done =
                line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit) && line[3] == b' ';
            line.clear();
            if done {
                return Ok(String::from_utf8_lossy(&all).trim_end().to_string());
            }
        }
    }
}

/// Hand a control connection we secured (greeting read, and `AUTH TLS`
/// answered, if explicit) to suppaftp: it reads a greeting and the AUTH
/// reply from a local socket, then adopts the secured stream in
/// `into_secure`, which goes on with PBSZ/PROT over it.
fn adopt_tls(
    cfg: &Arc<ClientConfig>,
    tls: Tls,
    host: &str,
    io_timeout: Duration,
) -> Result<Ftp, (String, Step)> {
    let pair = "FTPS (local socket pair)";
    let (local, mut fake) = loopback_pair().map_err(|e| (pair.to_string(), Step::Io(e)))?;
    fake.write_all(b"220 greeting already read\r\n234 TLS already established\r\n")
        .map_err(|e| (pair.to_string(), Step::Io(e)))?;
    let ftp = Ftp::connect_with_stream(local).map_err(|e| ("greeting".to_string(), e.into()))?;
    let connector = Connector {
        config: Arc::clone(cfg),
        io_timeout,
        prepared: Mutex::new(Some(tls)),
    };
    let ftp = ftp
        .into_secure(connector, host)
        .map_err(|e| ("FTPS (PBSZ/PROT)".to_string(), e.into()))?;
    drop(fake);
    Ok(ftp)
}

// ---------------------------------------------------------------- logging

/// Holds suppaftp's trace logging (which would print `PASS <password>`) back
/// while it lives. Counted, so overlapping logins in several threads restore
/// the level only when the last one ends.
struct QuietTrace;

static QUIET: Mutex<(usize, Option<log::LevelFilter>)> = Mutex::new((0, None));

impl QuietTrace {
    fn new() -> QuietTrace {
        if let Ok(mut q) = QUIET.lock() {
            if q.0 == 0 && log::max_level() > log::LevelFilter::Debug {
                q.1 = Some(log::max_level());
                log::set_max_level(log::LevelFilter::Debug);
            }
            q.0 += 1;
        }
        QuietTrace
    }
}

impl Drop for QuietTrace {
    fn drop(&mut self) {
        if let Ok(mut q) = QUIET.lock() {
            q.0 = q.0.saturating_sub(1);
            if q.0 == 0 {
                if let Some(level) = q.1.take() {
                    log::set_max_level(level);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- replies

/// The reply code as the server sent it (suppaftp maps codes it does not
/// know, like 522 or 534, to 0).
fn reply_code(r: &Response) -> u32 {
    let text = String::from_utf8_lossy(&r.body);
    let last = text.trim_end().lines().last().unwrap_or("").trim_start();
    last.get(..3)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| r.status.code())
}

/// The reply text on one line.
fn reply_text(r: &Response) -> String {
    let text = String::from_utf8_lossy(&r.body);
    text.split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `dir` → (absolute?, components). `~`, `~/x` and `x` are relative to the
/// login directory; `/x` is absolute. Empty and `.` components are dropped.
fn split_dir(dir: &str) -> (bool, Vec<&str>) {
    let d = dir.trim();
    let (absolute, rest) = if d == "~" {
        (false, "")
    } else if let Some(r) = d.strip_prefix("~/") {
        (false, r)
    } else if let Some(r) = d.strip_prefix('/') {
        (true, r)
    } else {
        (false, d)
    };
    let comps = rest
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    (absolute, comps)
}

fn join_path(base: &str, name: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

/// A protocol step that failed, before it is turned into a [`TransferError`].
enum Step {
    Ftp(FtpError),
    Io(io::Error),
    /// We refuse to go on: the kind and why.
    Refused(ErrorKind, String),
}

impl From<FtpError> for Step {
    fn from(e: FtpError) -> Step {
        Step::Ftp(e)
    }
}

// ---------------------------------------------------------------- opening

/// The server: its host and port (shown `host:port`, `[v6]:port`).
#[derive(Debug, Clone)]
struct Peer {
    host: String,
    port: u16,
}

impl Peer {
    fn new(host: &str, port: u16) -> Peer {
        Peer {
            host: host.to_string(),
            port,
        }
    }

    /// A failure of `kind` during `op` on this server.
    fn err(&self, kind: ErrorKind, op: Op) -> TransferError {
        TransferError::on(kind, op, Protocol::Ftp, &self.host, Some(self.port))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `ftp host:port: what: e`, of the given kind.
fn error_at(
    peer: &Peer,
    kind: ErrorKind,
    op: Op,
    what: &'static str,
    e: impl Into<Cause>,
) -> TransferError {
    peer.err(kind, op).step(what).cause(e)
}

/// The TLS configuration the route's `ftps` needs (none for `off`); `off`
/// without `ftp_cleartext = yes` is refused.
fn tls_for(t: &FtpTarget<'_>, peer: &Peer) -> Result<Option<Arc<ClientConfig>>, TransferError> {
    if t.ftps == Ftps::Off && !t.cleartext {
        return Err(peer.err(ErrorKind::Unavailable, Op::Tls).step(
            format!(
                "ftps = off would send the password and the files in cleartext; set ftp_cleartext = yes in the route to allow plain FTP to {}, or use ftps = auto",
                t.host
            ),
        ));
    }
    match t.ftps {
        Ftps::Off => Ok(None),
        Ftps::Auto | Ftps::Explicit | Ftps::Implicit => {
            Ok(Some(tls_config(t.ca_file).map_err(|e| {
                error_at(peer, ErrorKind::Unavailable, Op::Tls, "FTPS", e)
            })?))
        }
    }
}

/// TCP to the first of the host's addresses that answers, all of them
/// within `connect_timeout` from `started`.
fn dial(
    t: &FtpTarget<'_>,
    peer: &Peer,
    started: Instant,
    connect_timeout: Duration,
) -> Result<TcpStream, TransferError> {
    let addrs: Vec<SocketAddr> = (t.host, t.port)
        .to_socket_addrs()
        .map_err(|e| {
            error_at(
                peer,
                ErrorKind::Connect,
                Op::Resolve,
                "cannot resolve host",
                e,
            )
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        let left = connect_timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(a, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => {
            let what = if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                format!(
                    "connect timed out after {:.1}s",
                    connect_timeout.as_secs_f64()
                )
            } else {
                "connect failed".to_string()
            };
            Err(peer.err(io_kind(&e), Op::Connect).step(what).cause(e))
        }
        None => Err(peer.err(ErrorKind::Timeout, Op::Connect).step(format!(
            "connect timed out after {:.1}s",
            connect_timeout.as_secs_f64()
        ))),
    }
}

/// Socket timeouts, and the session's watchdog, armed for the whole login.
fn arm(
    tcp: &TcpStream,
    peer: &Peer,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<Watchdog, TransferError> {
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_read_timeout(Some(io_timeout))?;
        s.set_write_timeout(Some(io_timeout))?;
        s.set_nodelay(true)
    };
    setup(tcp).map_err(|e| error_at(peer, io_kind(&e), Op::Connect, "socket setup", e))?;
    let clone = tcp
        .try_clone()
        .map_err(|e| error_at(peer, ErrorKind::Connect, Op::Connect, "socket setup", e))?;
    let watchdog = Watchdog::new(clone, format!("ftp {peer}"));
    watchdog.kick(connect_timeout + io_timeout);
    Ok(watchdog)
}

/// Greeting and TLS as `ftps` says; and whether the session is plain FTP.
fn secure(
    t: &FtpTarget<'_>,
    addr: &str,
    tcp: TcpStream,
    config: Option<&Arc<ClientConfig>>,
    io_timeout: Duration,
) -> Result<(Ftp, bool), (String, Step)> {
    let no_config = || {
        (
            "FTPS".to_string(),
            Step::Io(io::Error::other("no TLS configuration")),
        )
    };
    match t.ftps {
        Ftps::Off => {
            let ftp =
                Ftp::connect_with_stream(tcp).map_err(|e| ("greeting".to_string(), e.into()))?;
            log::warn!(
                "ftp {addr}: plain FTP (ftps = off, ftp_cleartext = yes): the password and the files travel unencrypted"
            );
            Ok((ftp, true))
        }
        Ftps::Auto | Ftps::Explicit => {
            let cfg = config.ok_or_else(no_config)?;
            explicit_tls(t, addr, tcp, cfg, io_timeout)
        }
        Ftps::Implicit => {
            let cfg = config.ok_or_else(no_config)?;
            implicit_tls(t, tcp, cfg, io_timeout).map(|ftp| (ftp, false))
        }
    }
}

/// Greeting, then `AUTH TLS`: on `234` the socket is secured; a server that
/// does not offer TLS (`ftps = auto`) is used plain only with
/// `ftp_cleartext = yes`.
fn explicit_tls(
    t: &FtpTarget<'_>,
    addr: &str,
    tcp: TcpStream,
    cfg: &Arc<ClientConfig>,
    io_timeout: Duration,
) -> Result<(Ftp, bool), (String, Step)> {
    let mut ftp = Ftp::connect_with_stream(tcp).map_err(|e| ("greeting".to_string(), e.into()))?;
    log::debug!("ftp {addr}: AUTH TLS");
    let what = "FTPS (AUTH TLS)".to_string();
    match ftp.custom_command("AUTH TLS", &[Status::AuthOk]) {
        Ok(_) => {
            // the server waits for our TLS hello: secure the socket here
            let sock = ftp
                .get_ref()
                .try_clone()
                .map_err(|e| (what.clone(), Step::Io(e)))?;
            drop(ftp);
            let tls = handshake(cfg, t.host, sock, io_timeout)
                .map_err(|e| ("FTPS (TLS handshake)".to_string(), Step::Io(e)))?;
            Ok((adopt_tls(cfg, tls, t.host, io_timeout)?, false))
        }
        Err(FtpError::UnexpectedResponse(r))
            if t.ftps == Ftps::Auto && TLS_NOT_OFFERED.contains(&reply_code(&r)) =>
        {
            let text = reply_text(&r);
            if !t.cleartext {
                return Err((
                    what,
                    Step::Refused(
                        ErrorKind::Unavailable,
                        format!(
                            "the server does not offer TLS ({text}); plain FTP would send the password and the files in cleartext, so it is not used: set ftp_cleartext = yes in the route to allow plain FTP to {}",
                            t.host
                        ),
                    ),
                ));
            }
            log::warn!(
                "ftp {addr}: the server does not offer TLS ({text}); plain FTP (ftp_cleartext = yes): the password and the files travel unencrypted"
            );
            Ok((ftp, true))
        }
        Err(e) => Err((what, e.into())),
    }
}

/// Implicit FTPS: TLS first, then the greeting over it.
fn implicit_tls(
    t: &FtpTarget<'_>,
    tcp: TcpStream,
    cfg: &Arc<ClientConfig>,
    io_timeout: Duration,
) -> Result<Ftp, (String, Step)> {
    let greeting = "greeting".to_string();
    let mut tls = handshake(cfg, t.host, tcp, io_timeout)
        .map_err(|e| ("FTPS (implicit TLS handshake)".to_string(), Step::Io(e)))?;
    let text = read_greeting(&mut tls).map_err(|e| (greeting.clone(), Step::Io(e)))?;
    if !text.starts_with("220") && !text.lines().last().is_some_and(|l| l.starts_with("220")) {
        let resp = Response::new(Status::Unknown, text.into_bytes());
        return Err((greeting, Step::Ftp(FtpError::UnexpectedResponse(resp))));
    }
    adopt_tls(cfg, tls, t.host, io_timeout)
}

/// Passive (with the control connection's address) or active mode.
fn data_mode(mut ftp: Ftp, passive: bool, connect_timeout: Duration, io_timeout: Duration) -> Ftp {
    if passive {
        // PASV with the control connection's address (the address in the
        // reply may be a private one behind NAT), data sockets with timeouts.
        ftp.set_mode(Mode::Passive);
        ftp.set_passive_nat_workaround(true);
        ftp.passive_stream_builder(move |a| {
            let s = TcpStream::connect_timeout(&a, connect_timeout)
                .map_err(FtpError::ConnectionError)?;
            s.set_read_timeout(Some(io_timeout))
                .and_then(|_| s.set_write_timeout(Some(io_timeout)))
                .map_err(FtpError::ConnectionError)?;
            Ok(s)
        })
    } else {
        ftp.active_mode(io_timeout)
    }
}

/// USER/PASS (and ACCT when the server asks), with trace logging held back.
fn login(ftp: &mut Ftp, t: &FtpTarget<'_>, addr: &str) -> Result<(), (String, Step)> {
    log::debug!("ftp {addr}: USER {}", t.login);
    let _quiet = QuietTrace::new();
    let pass = t.password.map(Secret::expose).unwrap_or("");
    match ftp.login(t.login, pass) {
        Ok(()) => {}
        Err(FtpError::UnexpectedResponse(r)) if reply_code(&r) == 202 => {}
        Err(FtpError::UnexpectedResponse(r)) if reply_code(&r) == 332 => {
            let Some(acct) = t.account else {
                return Err((
                    "login (server asks for an account; set account)".into(),
                    Step::Ftp(FtpError::UnexpectedResponse(r)),
                ));
            };
            log::debug!("ftp {addr}: ACCT {acct}");
            ftp.custom_command(
                format!("ACCT {acct}"),
                &[Status::LoggedIn, Status::CommandNotImplemented],
            )
            .map_err(|e| (format!("login as {} (ACCT)", t.login), e.into()))?;
        }
        Err(e) => return Err((format!("login as {}", t.login), e.into())),
    }
    Ok(())
}

/// How copying a file to the data connection ended.
enum Copied {
    /// Every byte written, and flushed.
    All,
    /// The data connection failed.
    DataFailed(Step),
    /// The local file could not be read, or shrank.
    LocalFailed(TransferError),
}

// ---------------------------------------------------------------- session

/// A logged-in FTP(S) session to one host, reused for several uploads.
pub struct FtpSession {
    ftp: Ftp,
    watchdog: Watchdog,
    /// `host:port`, for messages.
    peer: Peer,
    rename: bool,
    /// Plain FTP (no TLS): password and data unencrypted.
    cleartext: bool,
    io_timeout: Duration,
    /// The login directory (PWD after login), if the server said.
    home: Option<String>,
    /// The `dir` argument of the last upload whose directory we are in.
    current_dir: Option<(String, String)>,
    /// Set after a deadline or connection failure: every call fails at once.
    dead: Option<TransferError>,
}

impl FtpSession {
    /// Connect, secure (FTPS), log in, set binary type. TCP connect is bounded
    /// by `connect_timeout`; each later step by `io_timeout` of silence, and
    /// all of them together by `connect_timeout + io_timeout`.
    pub fn connect(t: &FtpTarget<'_>) -> Result<FtpSession, TransferError> {
        let peer = Peer::new(t.host, t.port);
        let addr = peer.to_string();
        let started = Instant::now();
        let io_timeout = t.io_timeout.max(Duration::from_millis(1));
        let connect_timeout = t.connect_timeout.max(Duration::from_millis(1));
        let config = tls_for(t, &peer)?;
        let tcp = dial(t, &peer, started, connect_timeout)?;
        let watchdog = arm(&tcp, &peer, connect_timeout, io_timeout)?;
        log::debug!("ftp {addr}: connected, waiting for the greeting");

        let r = Self::open(t, &addr, tcp, config, connect_timeout, io_timeout);
        let (ftp, home, cleartext) = match r {
            Ok(x) => x,
            Err((what, step)) => {
                return Err(classify(&peer, &watchdog, io_timeout, &what, step));
            }
        };
        watchdog.disarm();
        if watchdog.fired() {
            return Err(peer.err(ErrorKind::Timeout, Op::Auth).step(format!(
                "login did not finish within {:.1}s",
                (connect_timeout + io_timeout).as_secs_f64()
            )));
        }
        log::debug!(
            "ftp {addr}: logged in as {}{} in {:.0?}, login directory {}",
            t.login,
            match (t.ftps, cleartext) {
                (_, true) => " (plain FTP, cleartext)",
                (Ftps::Implicit, _) => " (implicit FTPS)",
                _ => " (explicit FTPS)",
            },
            started.elapsed(),
            home.as_deref().unwrap_or("unknown")
        );
        Ok(FtpSession {
            ftp,
            watchdog,
            peer,
            rename: t.rename,
            cleartext,
            io_timeout,
            home,
            current_dir: None,
            dead: None,
        })
    }

    /// Greeting, TLS, login, binary type, PWD; and whether the session is
    /// plain FTP. An error carries the step.
    fn open(
        t: &FtpTarget<'_>,
        addr: &str,
        tcp: TcpStream,
        config: Option<Arc<ClientConfig>>,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<(Ftp, Option<String>, bool), (String, Step)> {
        let (ftp, cleartext) = secure(t, addr, tcp, config.as_ref(), io_timeout)?;
        let mut ftp = data_mode(ftp, t.passive, connect_timeout, io_timeout);
        login(&mut ftp, t, addr)?;
        log::debug!("ftp {addr}: TYPE I");
        ftp.transfer_type(FileType::Binary)
            .map_err(|e| ("TYPE I (binary)".to_string(), e.into()))?;
        let home = match ftp.pwd() {
            Ok(h) => Some(h),
            Err(FtpError::UnexpectedResponse(r)) => {
                log::debug!(
                    "ftp {addr}: PWD refused ({}); relative dirs only before the first upload",
                    reply_text(&r)
                );
                None
            }
            Err(e) => return Err(("PWD".into(), e.into())),
        };
        Ok((ftp, home, cleartext))
    }

    fn fail(&mut self, what: &str, step: Step) -> TransferError {
        let e = classify(&self.peer, &self.watchdog, self.io_timeout, what, step);
        if matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout) {
            self.current_dir = None;
            if self.dead.is_none() {
                self.dead = Some(e.clone());
            }
        }
        e
    }

    fn kick(&self) {
        self.watchdog.kick(self.io_timeout);
    }

    /// Upload `file` (`size` bytes, read positionally from offset 0) as
    /// `dir/name`: `mkdir -p dir`, STOR to `dir/tmp_name` in binary mode,
    /// check its size (SIZE), rename it to `name` (RNFR/RNTO), then set its
    /// permission bits to `mode` with `SITE CHMOD` (a server that refuses it
    /// leaves its default bits; logged at debug). With `rename = false` the
    /// file goes straight to `name` (and is checked there). On failure the
    /// temporary file is deleted (and, without rename, a partly written
    /// `name`).
    ///
    /// `tmp_name` must be unique to this upload (see [`temp_name`]). A file
    /// that shrinks below `size` while it is sent is a local error; one that
    /// grows is sent up to `size` bytes. `dir` is relative to the login
    /// directory (`newcx/x`, `~/newcx/x`) or absolute (`/srv/x`). The file
    /// streams: memory does not grow with its size.
    pub fn upload(
        &mut self,
        src: super::Source<'_>,
        dir: &str,
        tmp_name: &str,
        name: &str,
        progress: super::Progress<'_>,
    ) -> Result<FtpUpload, TransferError> {
        let (file, size, mode) = (src.file, src.size, src.mode);
        let started = Instant::now();
        if let Some(why) = &self.dead {
            return Err(self.peer.err(ErrorKind::Connect, Op::Session).step(format!(
                "session is closed after an earlier failure ({why})"
            )));
        }
        if name.is_empty() || name.contains(['/', '\r', '\n']) || dir.contains(['\r', '\n']) {
            return Err(self
                .peer
                .err(ErrorKind::Unavailable, Op::Upload)
                .step(format!(
                    "{name:?} in {dir:?}: a name with '/' or a line break cannot be sent over FTP"
                )));
        }
        if self.rename
            && (tmp_name.is_empty() || tmp_name == name || tmp_name.contains(['/', '\r', '\n']))
        {
            return Err(self
                .peer
                .err(ErrorKind::Local, Op::Upload)
                .step(format!("{name}: unusable temporary name {tmp_name:?}")));
        }
        self.kick();
        let mut reader = PositionalReader {
            file,
            pos: 0,
            meter: Some(super::Meter::new(progress, size)),
        };
        let r = self.upload_inner(&mut reader, size, dir, tmp_name, name, mode);
        self.watchdog.disarm();
        if r.is_err() {
            // walk the directory again next time (it may be what failed)
            self.current_dir = None;
        }
        let (bytes, remote_path) = r?;
        log::debug!(
            "{name}: {}: FTP uploaded {bytes} bytes to {remote_path} in {:.0?}",
            self.peer,
            started.elapsed()
        );
        Ok(FtpUpload {
            bytes,
            remote_path,
            elapsed: started.elapsed(),
            cleartext: self.cleartext,
        })
    }

    /// True if this session is plain FTP (no TLS).
    pub fn is_cleartext(&self) -> bool {
        self.cleartext
    }

    fn upload_inner(
        &mut self,
        file: &mut PositionalReader<'_>,
        size: u64,
        dir: &str,
        tmp_name: &str,
        name: &str,
        mode: u32,
    ) -> Result<(u64, String), TransferError> {
        let remote_dir = self.enter_dir(dir, name)?;
        let temp = if self.rename { tmp_name } else { name };
        let temp_path = join_path(&remote_dir, temp);
        let final_path = join_path(&remote_dir, name);

        let sent = match self.store(file, size, temp, &temp_path, name) {
            Ok(n) => n,
            Err((e, created)) => {
                if created {
                    self.discard(temp, name);
                }
                return Err(e);
            }
        };

        // size check, on the temporary name: a wrong file never gets the final name
        self.kick();
        log::debug!("{name}: {}: FTP SIZE {temp_path}", self.peer);
        match self.ftp.size(temp) {
            Ok(n) if n as u64 == size => {}
            Ok(n) => {
                self.discard(temp, name);
                return Err(self
                    .peer
                    .err(ErrorKind::Verify, Op::Verify)
                    .step(format!("{temp_path}: size check failed"))
                    .cause(format!(
                        "the server has {n} bytes, the local file {size}; removed it"
                    ))
                    .path(temp_path));
            }
            Err(FtpError::UnexpectedResponse(r)) if matches!(reply_code(&r), 500 | 502 | 504) => {
                log::warn!(
                    "{name}: {}: the server has no SIZE command ({}); upload size not verified",
                    self.peer,
                    reply_text(&r)
                );
            }
            Err(e) => {
                let e = self
                    .fail(&format!("SIZE {temp_path}"), e.into())
                    .path(&temp_path);
                self.discard(temp, name);
                return Err(e);
            }
        }

        if self.rename {
            if let Err(e) = self.rename_into_place(temp, name, &temp_path, &final_path) {
                self.discard(temp, name);
                return Err(e);
            }
        }
        self.chmod(name, &final_path, mode);
        Ok((sent, final_path))
    }

    /// `SITE CHMOD <mode> <name>` on the final file. Not every server has it
    /// (or allows it): a refusal is logged at debug and the file keeps the
    /// server's default bits.
    fn chmod(&mut self, name: &str, final_path: &str, mode: u32) {
        let mode = mode & 0o7777;
        self.kick();
        log::debug!(
            "{name}: {}: FTP SITE CHMOD {mode:o} {final_path}",
            self.peer
        );
        if let Err(e) = self
            .ftp
            .custom_command(format!("SITE CHMOD {mode:o} {name}"), &[Status::CommandOk])
        {
            let e = self
                .fail(&format!("SITE CHMOD {mode:o} {final_path}"), e.into())
                .path(final_path);
            if self.dead.is_some() {
                log::warn!("{name}: {e}; the file is in place, its mode may not be {mode:o}");
            } else {
                log::debug!("{name}: {e}; the file keeps the server's default mode");
            }
        }
    }

    /// STOR `temp` from `file`. On error, says whether the server had
    /// accepted the STOR (so a file may exist to clean up).
    fn store(
        &mut self,
        file: &mut PositionalReader<'_>,
        size: u64,
        temp: &str,
        temp_path: &str,
        name: &str,
    ) -> Result<u64, (TransferError, bool)> {
        let what = format!("STOR {temp_path}");
        self.kick();
        log::debug!("{name}: {}: FTP {what} ({size} bytes)", self.peer);
        let mut ts = match self.ftp.put_with_stream(temp) {
            Ok(ts) => ts,
            Err(e) => return Err((self.fail(&what, e.into()).path(temp_path), false)),
        };
        {
            let data = ts.get_ref().get_ref();
            let _ = data.set_write_timeout(Some(self.io_timeout));
            let _ = data.set_read_timeout(Some(self.io_timeout));
            self.watchdog.watch_data(data.try_clone().ok());
        }
        let (sent, copied) = self.copy_data(&mut ts, file, size, name);
        // stop watching before suppaftp closes the data socket (our clone would keep it open)
        self.watchdog.watch_data(None);
        self.kick();
        let failure = match copied {
            Copied::All => None,
            Copied::DataFailed(step) => Some(step),
            Copied::LocalFailed(e) => {
                // No ABOR: vsftpd only notices it as urgent data, and the in-band
                // ABOR suppaftp sends gets a second reply that would desynchronise
                // the control connection. Close the data connection normally; the
                // caller deletes the short file, which never got the final name.
                if let Err(fin) = ts.finish() {
                    log::debug!("{name}: {}: closing the short transfer: {fin}", self.peer);
                }
                return Err((e, true));
            }
        };
        let finished = ts.finish();
        match (failure, finished) {
            (None, Ok(())) => Ok(sent),
            // the server's reply says more than a broken pipe (disk full, quota…)
            (_, Err(e @ FtpError::UnexpectedResponse(_))) => {
                Err((self.fail(&what, e.into()).path(temp_path), true))
            }
            (Some(step), _) => Err((
                self.fail(&format!("{what} after {sent} of {size} bytes"), step)
                    .path(temp_path),
                true,
            )),
            (None, Err(e)) => Err((self.fail(&what, e.into()).path(temp_path), true)),
        }
    }

    /// Copy `size` bytes of `file` to the data connection `data` (and flush
    /// it), kicking the watchdog on each write. Returns the bytes sent and
    /// how it ended.
    fn copy_data(
        &self,
        data: &mut impl Write,
        file: &mut PositionalReader<'_>,
        size: u64,
        name: &str,
    ) -> (u64, Copied) {
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from((size - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => {
                    return (
                        sent,
                        Copied::LocalFailed(
                            self.peer
                                .err(ErrorKind::Local, Op::ReadLocal)
                                .step(format!("{name}: local file shrank while uploading ({sent} of {size} bytes sent)"))
                                .bare(),
                        ),
                    );
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return (
                        sent,
                        Copied::LocalFailed(
                            self.peer
                                .err(ErrorKind::Local, Op::ReadLocal)
                                .step(format!("{name}: reading the local file failed"))
                                .cause(e)
                                .bare(),
                        ),
                    );
                }
            };
            if let Err(step) = self.write_chunk(data, &buf[..n], &mut sent) {
                return (sent, Copied::DataFailed(step));
            }
        }
        match data.flush() {
            Ok(()) => (sent, Copied::All),
            Err(e) => (sent, Copied::DataFailed(Step::Io(e))),
        }
    }

    /// Write all of `chunk`, counting what is written in `sent`.
    fn write_chunk(&self, data: &mut impl Write, chunk: &[u8], sent: &mut u64) -> Result<(), Step> {
        let mut off = 0;
        while off < chunk.len() {
            match data.write(&chunk[off..]) {
                Ok(0) => {
                    return Err(Step::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "data connection closed",
                    )));
                }
                Ok(w) => {
                    off += w;
                    *sent += w as u64;
                    self.kick();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        // a stalled socket: the session cannot be trusted any more
                        self.watchdog.fire();
                    }
                    return Err(Step::Io(e));
                }
            }
        }
        Ok(())
    }

    /// RNFR + RNTO, each checked, so the message says which one was refused.
    fn rename_into_place(
        &mut self,
        temp: &str,
        name: &str,
        temp_path: &str,
        final_path: &str,
    ) -> Result<(), TransferError> {
        const HINT: &str = "; if this server does not allow renaming, set ftp_rename = no";
        self.kick();
        log::debug!("{name}: {}: FTP RNFR {temp_path}", self.peer);
        if let Err(e) = self
            .ftp
            .custom_command(format!("RNFR {temp}"), &[Status::RequestFilePending])
        {
            let mut err = self
                .fail(
                    &format!("rename {temp_path} to {final_path}: RNFR"),
                    e.into(),
                )
                .path(final_path);
            if err.kind == ErrorKind::Remote {
                err = err.note(HINT);
            }
            return Err(err);
        }
        self.kick();
        log::debug!("{name}: {}: FTP RNTO {final_path}", self.peer);
        if let Err(e) = self.ftp.custom_command(
            format!("RNTO {name}"),
            &[Status::RequestedFileActionOk, Status::CommandOk],
        ) {
            let mut err = self
                .fail(
                    &format!("rename {temp_path} to {final_path}: RNTO"),
                    e.into(),
                )
                .path(final_path);
            if err.kind == ErrorKind::Remote {
                err = err.note(HINT);
            }
            return Err(err);
        }
        Ok(())
    }

    /// Best effort: delete a temporary (or partly written) file.
    fn discard(&mut self, file: &str, name: &str) {
        if self.dead.is_some() || self.watchdog.fired() {
            log::warn!(
                "{name}: {}: could not remove {file}: the connection is closed",
                self.peer
            );
            return;
        }
        self.kick();
        log::debug!("{name}: {}: FTP DELE {file}", self.peer);
        if let Err(e) = self.ftp.rm(file) {
            log::warn!("{name}: {}: could not remove {file}: {e}", self.peer);
        }
    }

    /// `cd` into `dir`, creating what is missing. Returns its path as the
    /// server names it.
    fn enter_dir(&mut self, dir: &str, name: &str) -> Result<String, TransferError> {
        if let Some((d, path)) = &self.current_dir {
            if d == dir {
                return Ok(path.clone());
            }
        }
        self.current_dir = None;
        let (absolute, comps) = split_dir(dir);
        let start = if absolute {
            "/".to_string()
        } else {
            match &self.home {
                Some(h) => h.clone(),
                None => {
                    return Err(self.peer.err(ErrorKind::Unavailable, Op::Mkdir).step(format!(
                        "{dir}: the server did not say which directory is the login directory (PWD), so relative directories cannot be used; use an absolute dest_dir"
                    )).path(dir))
                }
            }
        };
        self.kick();
        log::debug!("{name}: {}: FTP CWD {start}", self.peer);
        self.ftp
            .cwd(&start)
            .map_err(|e| self.fail(&format!("CWD {start}"), e.into()).path(&start))?;
        let mut path = start;
        for comp in comps {
            path = join_path(&path, comp);
            self.kick();
            log::debug!("{name}: {}: FTP CWD {path}", self.peer);
            match self.ftp.cwd(comp) {
                Ok(()) => continue,
                Err(FtpError::UnexpectedResponse(_)) => {}
                Err(e) => return Err(self.fail(&format!("CWD {path}"), e.into()).path(&path)),
            }
            self.kick();
            log::debug!("{name}: {}: FTP MKD {path}", self.peer);
            let made = self.ftp.mkdir(comp);
            self.kick();
            match (made, self.ftp.cwd(comp)) {
                (_, Ok(())) => {}
                (Err(e), Err(_)) => {
                    return Err(self.fail(&format!("MKD {path}"), e.into()).path(&path))
                }
                (Ok(()), Err(e)) => {
                    let what = format!("CWD {path} (just created)");
                    return Err(self.fail(&what, e.into()).path(&path));
                }
            }
        }
        self.current_dir = Some((dir.to_string(), path.clone()));
        Ok(path)
    }

    /// False once a deadline passed or the connection broke.
    pub fn is_alive(&self) -> bool {
        self.dead.is_none() && !self.watchdog.fired()
    }

    /// Say goodbye (bounded by `io_timeout`) and close.
    pub fn quit(mut self) {
        if self.is_alive() {
            self.kick();
            if let Err(e) = self.ftp.quit() {
                log::debug!("ftp {}: QUIT: {e}", self.peer);
            }
            self.watchdog.disarm();
        }
    }
}

/// STOR, SIZE, RNFR/RNTO: an FTP upload is checked and under its final
/// name when it returns.
impl Uploader for FtpSession {
    fn transport(&self) -> Transport {
        Transport::Ftp
    }

    fn is_alive(&self) -> bool {
        FtpSession::is_alive(self)
    }

    fn upload(
        &mut self,
        job: Upload<'_>,
        progress: Progress<'_>,
    ) -> Result<Uploaded, TransferError> {
        let u = FtpSession::upload(self, job.src, job.dir, job.tmp_name, job.name, progress)?;
        Ok(Uploaded {
            bytes: u.bytes,
            sha256: None,
            published: true,
            cleartext: u.cleartext,
        })
    }
}

/// One failed step → a [`TransferError`] of the right class, naming
/// `host:port` and the operation.
fn classify(
    peer: &Peer,
    watchdog: &Watchdog,
    io_timeout: Duration,
    what: &str,
    step: Step,
) -> TransferError {
    let op = step_op(what);
    let (kind, detail) = if watchdog.fired() {
        (
            ErrorKind::Timeout,
            Cause::Text(format!(
                "no progress for {:.1}s (io_timeout); connection closed",
                io_timeout.as_secs_f64()
            )),
        )
    } else {
        match step {
            Step::Io(e) => io_failure(e, io_timeout),
            Step::Refused(kind, why) => (kind, Cause::Text(why)),
            Step::Ftp(e) => ftp_failure(e, op, io_timeout),
        }
    };
    peer.err(kind, op).step(what.to_string()).cause(detail)
}

/// The operation an FTP step (`STOR /x/…`, `login as u`, `FTPS (AUTH TLS)`)
/// belongs to.
fn step_op(what: &str) -> Op {
    let word = what.split([' ', '(']).next().unwrap_or("");
    match word {
        "login" => Op::Auth,
        "FTPS" => Op::Tls,
        "greeting" => Op::Handshake,
        "CWD" | "MKD" => Op::Mkdir,
        "STOR" => Op::Upload,
        "SIZE" => Op::Verify,
        "rename" => Op::Rename,
        "SITE" => Op::Chmod,
        _ => Op::Session,
    }
}

/// A socket (or TLS) failure: its kind and what to say.
fn io_failure(e: io::Error, io_timeout: Duration) -> (ErrorKind, Cause) {
    if let Some(t) = tls_error(&e) {
        return (ErrorKind::Unavailable, Cause::Text(describe_tls(t)));
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => (
            ErrorKind::Timeout,
            Cause::Text(format!(
                "no answer within {:.1}s (io_timeout)",
                io_timeout.as_secs_f64()
            )),
        ),
        _ => (io_kind(&e), e.into()),
    }
}

/// A suppaftp error during `op`: its kind and what to say.
fn ftp_failure(e: FtpError, op: Op, io_timeout: Duration) -> (ErrorKind, Cause) {
    let (kind, text) = match e {
        FtpError::ConnectionError(e) => return io_failure(e, io_timeout),
        // into_secure wraps our connector's error in another SecureError
        FtpError::SecureError(s) => (
            ErrorKind::Unavailable,
            s.trim_start_matches("Secure error: ").to_string(),
        ),
        FtpError::BadResponse => (
            ErrorKind::Unavailable,
            "malformed reply (is this an FTP server? FTPS setting right?)".into(),
        ),
        FtpError::InvalidAddress(e) => (
            ErrorKind::Connect,
            format!("bad address in the server's reply: {e}"),
        ),
        FtpError::DataConnectionAlreadyOpen => {
            (ErrorKind::Connect, "data connection already open".into())
        }
        FtpError::UnexpectedResponse(r) => reply_failure(&r, op),
    };
    (kind, Cause::Text(text))
}

/// A reply the step did not expect: its kind (by code and by step) and
/// what to say.
fn reply_failure(r: &Response, op: Op) -> (ErrorKind, String) {
    let code = reply_code(r);
    let text = reply_text(r);
    let login = op == Op::Auth;
    let tls = op == Op::Tls;
    let kind = match code {
        530 | 430 if login => ErrorKind::Auth,
        _ if login && (500..600).contains(&code) => ErrorKind::Auth,
        // AUTH TLS / PBSZ / PROT refused: this server does not do FTPS
        _ if tls => ErrorKind::Unavailable,
        421 | 425 | 426 | 450 | 451 => ErrorKind::Connect,
        _ if op == Op::Handshake => ErrorKind::Unavailable,
        452 | 552 => ErrorKind::Remote,
        400..=499 => ErrorKind::Connect,
        _ => ErrorKind::Remote,
    };
    let detail = match kind {
        ErrorKind::Auth => format!("refused: {text}"),
        ErrorKind::Remote => format!("the server refused it: {text}"),
        ErrorKind::Unavailable if tls => {
            format!("the server refused it ({text}); is FTPS enabled there?")
        }
        _ => text,
    };
    (kind, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_dir_knows_home_relative_and_absolute() {
        assert_eq!(split_dir("~/newcx/2026"), (false, vec!["newcx", "2026"]));
        assert_eq!(split_dir("newcx//2026/"), (false, vec!["newcx", "2026"]));
        assert_eq!(split_dir("/srv/x"), (true, vec!["srv", "x"]));
        assert_eq!(split_dir("~"), (false, vec![]));
        assert_eq!(split_dir("./a/./b"), (false, vec!["a", "b"]));
        assert_eq!(split_dir("/"), (true, vec![]));
    }

    #[test]
    fn reply_code_reads_codes_suppaftp_does_not_know() {
        let r = Response::new(Status::Unknown, b"522 SSL connection failed\r\n".to_vec());
        assert_eq!(reply_code(&r), 522);
        let r = Response::new(
            Status::FileUnavailable,
            b"550-one\r\n more\r\n550 done\r\n".to_vec(),
        );
        assert_eq!(reply_code(&r), 550);
        assert_eq!(reply_text(&r), "550-one more 550 done");
    }

    #[test]
    fn classify_maps_replies_to_kinds() {
        let (a, _b) = loopback_pair().unwrap();
        let wd = Watchdog::new(a, "t".into());
        let resp = |s: &str| {
            Step::Ftp(FtpError::UnexpectedResponse(Response::new(
                Status::Unknown,
                s.as_bytes().to_vec(),
            )))
        };
        let io = Duration::from_secs(1);
        let k = |what: &str, s: &str| classify(&Peer::new("h", 21), &wd, io, what, resp(s)).kind;
        assert_eq!(k("login as u", "530 Login incorrect."), ErrorKind::Auth);
        assert_eq!(
            k(
                "STOR /x/.dispatch-0123456789abcdef.part",
                "553 Could not create file."
            ),
            ErrorKind::Remote
        );
        assert_eq!(
            k("MKD /x", "550 Create directory operation failed."),
            ErrorKind::Remote
        );
        assert_eq!(
            k(
                "STOR /x/.dispatch-0123456789abcdef.part",
                "452 Insufficient storage"
            ),
            ErrorKind::Remote
        );
        assert_eq!(
            k(
                "STOR /x/.dispatch-0123456789abcdef.part",
                "425 Can't open data connection"
            ),
            ErrorKind::Connect
        );
        assert_eq!(
            k("FTPS (AUTH TLS)", "530 Please login with USER and PASS."),
            ErrorKind::Unavailable
        );
        let e = classify(
            &Peer::new("h", 21),
            &wd,
            io,
            "CWD /",
            Step::Io(io::Error::from(io::ErrorKind::WouldBlock)),
        );
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(e.to_string().starts_with("ftp h:21: CWD /: "), "{e}");
    }

    #[test]
    fn watchdog_fires_after_deadline_and_shuts_the_socket() {
        let (a, mut b) = loopback_pair().unwrap();
        let wd = Watchdog::new(a.try_clone().unwrap(), "t".into());
        let t = Instant::now();
        wd.kick(Duration::from_millis(200));
        // the peer sees EOF once the watchdog shut our side down
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        let took = t.elapsed();
        assert!(wd.fired());
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[test]
    fn temp_names_are_short_ascii_hidden_and_fresh() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert!(a.starts_with(".dispatch-") && a.ends_with(".part"), "{a}");
        assert_eq!(a.len(), 31, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_graphic()), "{a}");
    }

    #[test]
    fn the_positional_reader_starts_at_zero_and_leaves_the_cursor_alone() {
        use std::io::{Seek, SeekFrom};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        f.seek(SeekFrom::Start(7)).unwrap();
        let mut got = Vec::new();
        PositionalReader {
            file: &f,
            pos: 0,
            meter: None,
        }
        .read_to_end(&mut got)
        .unwrap();
        assert_eq!(got, b"0123456789");
        assert_eq!(f.stream_position().unwrap(), 7);
    }

    #[test]
    fn tls_config_reports_a_missing_ca_file() {
        let e = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
