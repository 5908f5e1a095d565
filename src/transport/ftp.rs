//! FTP and FTPS, the fallback transport, with the `suppaftp` crate: connect
//! with a deadline, log in, `mkdir -p` by components, stream a file in binary
//! mode to `.NAME.part`, check its size, rename it into place.
//!
//! Why it looks the way it does:
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
use super::{io_kind, ErrorKind, TransferError};
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
                "certificate not trusted ({e}); set ftp_ca_file to the CA (or the self-signed certificate) of the server"
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
}

impl From<FtpError> for Step {
    fn from(e: FtpError) -> Step {
        Step::Ftp(e)
    }
}

// ---------------------------------------------------------------- session

/// A logged-in FTP(S) session to one host, reused for several uploads.
pub struct FtpSession {
    ftp: Ftp,
    watchdog: Watchdog,
    /// `host:port`, for messages.
    addr: String,
    rename: bool,
    io_timeout: Duration,
    /// The login directory (PWD after login), if the server said.
    home: Option<String>,
    /// The `dir` argument of the last upload whose directory we are in.
    current_dir: Option<(String, String)>,
    /// Set after a deadline or connection failure: every call fails at once.
    dead: Option<String>,
}

impl FtpSession {
    /// Connect, secure (FTPS), log in, set binary type. TCP connect is bounded
    /// by `connect_timeout`; each later step by `io_timeout` of silence, and
    /// all of them together by `connect_timeout + io_timeout`.
    pub fn connect(t: &FtpTarget<'_>) -> Result<FtpSession, TransferError> {
        let addr = if t.host.contains(':') {
            format!("[{}]:{}", t.host, t.port)
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let err = |kind, what: &str, e: &dyn std::fmt::Display| {
            TransferError::new(kind, format!("ftp {addr}: {what}: {e}"))
        };
        let started = Instant::now();
        let io_timeout = t.io_timeout.max(Duration::from_millis(1));
        let connect_timeout = t.connect_timeout.max(Duration::from_millis(1));

        let config = match t.ftps {
            Ftps::Off => None,
            Ftps::Explicit | Ftps::Implicit => {
                Some(tls_config(t.ca_file).map_err(|e| err(ErrorKind::Unavailable, "FTPS", &e))?)
            }
        };

        let addrs: Vec<SocketAddr> = (t.host, t.port)
            .to_socket_addrs()
            .map_err(|e| err(ErrorKind::Connect, "cannot resolve host", &e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in &addrs {
            let left = connect_timeout.saturating_sub(started.elapsed());
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
                return Err(err(io_kind(&e), &what, &e));
            }
            (None, None) => {
                return Err(TransferError::new(
                    ErrorKind::Timeout,
                    format!(
                        "ftp {addr}: connect timed out after {:.1}s",
                        connect_timeout.as_secs_f64()
                    ),
                ))
            }
        };
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_read_timeout(Some(io_timeout))?;
            s.set_write_timeout(Some(io_timeout))?;
            s.set_nodelay(true)
        };
        setup(&tcp).map_err(|e| err(io_kind(&e), "socket setup", &e))?;
        let clone = tcp
            .try_clone()
            .map_err(|e| err(ErrorKind::Connect, "socket setup", &e))?;
        let watchdog = Watchdog::new(clone, format!("ftp {addr}"));
        watchdog.kick(connect_timeout + io_timeout);
        log::debug!("ftp {addr}: connected, waiting for the greeting");

        let r = Self::open(t, &addr, tcp, config, connect_timeout, io_timeout);
        let (ftp, home) = match r {
            Ok(x) => x,
            Err((what, step)) => {
                return Err(classify(&addr, &watchdog, io_timeout, &what, step));
            }
        };
        watchdog.disarm();
        if watchdog.fired() {
            return Err(TransferError::new(
                ErrorKind::Timeout,
                format!(
                    "ftp {addr}: login did not finish within {:.1}s",
                    (connect_timeout + io_timeout).as_secs_f64()
                ),
            ));
        }
        log::debug!(
            "ftp {addr}: logged in as {}{} in {:.0?}, login directory {}",
            t.login,
            match t.ftps {
                Ftps::Off => "",
                Ftps::Explicit => " (explicit FTPS)",
                Ftps::Implicit => " (implicit FTPS)",
            },
            started.elapsed(),
            home.as_deref().unwrap_or("unknown")
        );
        Ok(FtpSession {
            ftp,
            watchdog,
            addr,
            rename: t.rename,
            io_timeout,
            home,
            current_dir: None,
            dead: None,
        })
    }

    /// Greeting, TLS, login, binary type, PWD. An error carries the step.
    fn open(
        t: &FtpTarget<'_>,
        addr: &str,
        tcp: TcpStream,
        config: Option<Arc<ClientConfig>>,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<(Ftp, Option<String>), (String, Step)> {
        let connector = |config: &Arc<ClientConfig>, prepared| Connector {
            config: Arc::clone(config),
            io_timeout,
            prepared: Mutex::new(prepared),
        };
        let no_config = || {
            (
                "FTPS".to_string(),
                Step::Io(io::Error::other("no TLS configuration")),
            )
        };
        let greeting = "greeting".to_string();
        let mut ftp = match t.ftps {
            Ftps::Off => Ftp::connect_with_stream(tcp).map_err(|e| (greeting, e.into()))?,
            Ftps::Explicit => {
                let cfg = config.as_ref().ok_or_else(no_config)?;
                let ftp = Ftp::connect_with_stream(tcp).map_err(|e| (greeting, e.into()))?;
                log::debug!("ftp {addr}: AUTH TLS");
                ftp.into_secure(connector(cfg, None), t.host)
                    .map_err(|e| ("FTPS (AUTH TLS)".to_string(), e.into()))?
            }
            Ftps::Implicit => {
                let cfg = config.as_ref().ok_or_else(no_config)?;
                let mut tls = handshake(cfg, t.host, tcp, io_timeout)
                    .map_err(|e| ("FTPS (implicit TLS handshake)".to_string(), Step::Io(e)))?;
                let text = read_greeting(&mut tls).map_err(|e| (greeting.clone(), Step::Io(e)))?;
                if !text.starts_with("220")
                    && !text.lines().last().is_some_and(|l| l.starts_with("220"))
                {
                    let resp = Response::new(Status::Unknown, text.into_bytes());
                    return Err((greeting, Step::Ftp(FtpError::UnexpectedResponse(resp))));
                }
                // suppaftp reads its greeting and the AUTH reply from a local
                // socket, then adopts the secured stream in `into_secure`.
                let (local, mut fake) = loopback_pair()
                    .map_err(|e| ("FTPS (local socket pair)".to_string(), Step::Io(e)))?;
                fake.write_all(
                    b"220 greeting already read over TLS\r\n234 TLS already established\r\n",
                )
                .map_err(|e| ("FTPS (local socket pair)".to_string(), Step::Io(e)))?;
                let ftp = Ftp::connect_with_stream(local).map_err(|e| (greeting, e.into()))?;
                let ftp = ftp
                    .into_secure(connector(cfg, Some(tls)), t.host)
                    .map_err(|e| ("FTPS (PBSZ/PROT)".to_string(), e.into()))?;
                drop(fake);
                ftp
            }
        };
        let mut ftp = if t.passive {
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
        };

        {
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
        }
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
        Ok((ftp, home))
    }

    fn fail(&mut self, what: &str, step: Step) -> TransferError {
        let e = classify(&self.addr, &self.watchdog, self.io_timeout, what, step);
        if matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout) {
            self.current_dir = None;
            if self.dead.is_none() {
                self.dead = Some(e.msg.clone());
            }
        }
        e
    }

    fn kick(&self) {
        self.watchdog.kick(self.io_timeout);
    }

    /// Upload `local` as `dir/name`: `mkdir -p dir`, STOR to `dir/.name.part`
    /// in binary mode, check its size (SIZE), rename it to `name`. With
    /// `rename = false` the file goes straight to `name` (and is checked
    /// there). On failure the temporary file is deleted (and, without rename,
    /// a partly written `name`).
    ///
    /// `dir` is relative to the login directory (`newcx/x`, `~/newcx/x`) or
    /// absolute (`/srv/x`). The file streams: memory does not grow with its size.
    pub fn upload(
        &mut self,
        local: &Path,
        dir: &str,
        name: &str,
    ) -> Result<FtpUpload, TransferError> {
        let started = Instant::now();
        if let Some(why) = &self.dead {
            return Err(TransferError::new(
                ErrorKind::Connect,
                format!(
                    "ftp {}: session is closed after an earlier failure ({why})",
                    self.addr
                ),
            ));
        }
        if name.is_empty() || name.contains(['/', '\r', '\n']) || dir.contains(['\r', '\n']) {
            return Err(TransferError::new(
                ErrorKind::Unavailable,
                format!(
                    "ftp {}: {name:?} in {dir:?}: a name with '/' or a line break cannot be sent over FTP",
                    self.addr
                ),
            ));
        }
        let mut file = File::open(local).map_err(|e| {
            TransferError::new(
                ErrorKind::Local,
                format!("{}: cannot open: {e}", local.display()),
            )
        })?;
        let size = file
            .metadata()
            .map_err(|e| {
                TransferError::new(
                    ErrorKind::Local,
                    format!("{}: cannot stat: {e}", local.display()),
                )
            })?
            .len();
        self.kick();
        let r = self.upload_inner(&mut file, size, dir, name);
        self.watchdog.disarm();
        if r.is_err() {
            // walk the directory again next time (it may be what failed)
            self.current_dir = None;
        }
        let (bytes, remote_path) = r?;
        log::debug!(
            "{name}: {}: FTP uploaded {bytes} bytes to {remote_path} in {:.0?}",
            self.addr,
            started.elapsed()
        );
        Ok(FtpUpload {
            bytes,
            remote_path,
            elapsed: started.elapsed(),
        })
    }

    fn upload_inner(
        &mut self,
        file: &mut File,
        size: u64,
        dir: &str,
        name: &str,
    ) -> Result<(u64, String), TransferError> {
        let remote_dir = self.enter_dir(dir, name)?;
        let temp = if self.rename {
            format!(".{name}.part")
        } else {
            name.to_string()
        };
        let temp_path = join_path(&remote_dir, &temp);
        let final_path = join_path(&remote_dir, name);

        let sent = match self.store(file, size, &temp, &temp_path, name) {
            Ok(n) => n,
            Err((e, created)) => {
                if created {
                    self.discard(&temp, name);
                }
                return Err(e);
            }
        };

        // size check, on the temporary name: a wrong file never gets the final name
        self.kick();
        log::debug!("{name}: {}: FTP SIZE {temp_path}", self.addr);
        match self.ftp.size(&temp) {
            Ok(n) if n as u64 == size => {}
            Ok(n) => {
                self.discard(&temp, name);
                return Err(TransferError::new(
                    ErrorKind::Verify,
                    format!(
                        "ftp {}: {temp_path}: size check failed: the server has {n} bytes, the local file {size}; removed it",
                        self.addr
                    ),
                ));
            }
            Err(FtpError::UnexpectedResponse(r)) if matches!(reply_code(&r), 500 | 502 | 504) => {
                log::warn!(
                    "{name}: {}: the server has no SIZE command ({}); upload size not verified",
                    self.addr,
                    reply_text(&r)
                );
            }
            Err(e) => {
                let e = self.fail(&format!("SIZE {temp_path}"), e.into());
                self.discard(&temp, name);
                return Err(e);
            }
        }

        if self.rename {
            if let Err(e) = self.rename_into_place(&temp, name, &temp_path, &final_path) {
                self.discard(&temp, name);
                return Err(e);
            }
        }
        Ok((sent, final_path))
    }

    /// STOR `temp` from `file`. On error, says whether the server had
    /// accepted the STOR (so a file may exist to clean up).
    fn store(
        &mut self,
        file: &mut File,
        size: u64,
        temp: &str,
        temp_path: &str,
        name: &str,
    ) -> Result<u64, (TransferError, bool)> {
        let what = format!("STOR {temp_path}");
        self.kick();
        log::debug!("{name}: {}: FTP {what} ({size} bytes)", self.addr);
        let mut ts = match self.ftp.put_with_stream(temp) {
            Ok(ts) => ts,
            Err(e) => return Err((self.fail(&what, e.into()), false)),
        };
        {
            let data = ts.get_ref().get_ref();
            let _ = data.set_write_timeout(Some(self.io_timeout));
            let _ = data.set_read_timeout(Some(self.io_timeout));
            self.watchdog.watch_data(data.try_clone().ok());
        }
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        let mut failure: Option<Step> = None;
        let mut local_failure: Option<TransferError> = None;
        'copy: while sent < size {
            let want = usize::try_from((size - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => {
                    local_failure = Some(TransferError::new(
                        ErrorKind::Local,
                        format!("{name}: local file shrank while uploading ({sent} of {size} bytes sent)"),
                    ));
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    local_failure = Some(TransferError::new(
                        ErrorKind::Local,
                        format!("{name}: reading the local file failed: {e}"),
                    ));
                    break;
                }
            };
            let mut off = 0;
            while off < n {
                match ts.write(&buf[off..n]) {
                    Ok(0) => {
                        failure = Some(Step::Io(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "data connection closed",
                        )));
                        break 'copy;
                    }
                    Ok(w) => {
                        off += w;
                        sent += w as u64;
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
                        failure = Some(Step::Io(e));
                        break 'copy;
                    }
                }
            }
        }
        if failure.is_none() && local_failure.is_none() {
            if let Err(e) = ts.flush() {
                failure = Some(Step::Io(e));
            }
        }
        // stop watching before suppaftp closes the data socket (our clone would keep it open)
        self.watchdog.watch_data(None);
        self.kick();
        if let Some(e) = local_failure {
            // No ABOR: vsftpd only notices it as urgent data, and the in-band
            // ABOR suppaftp sends gets a second reply that would desynchronise
            // the control connection. Close the data connection normally; the
            // caller deletes the short file, which never got the final name.
            if let Err(fin) = ts.finish() {
                log::debug!("{name}: {}: closing the short transfer: {fin}", self.addr);
            }
            return Err((e, true));
        }
        let finished = ts.finish();
        match (failure, finished) {
            (None, Ok(())) => Ok(sent),
            // the server's reply says more than a broken pipe (disk full, quota…)
            (_, Err(e @ FtpError::UnexpectedResponse(_))) => {
                Err((self.fail(&what, e.into()), true))
            }
            (Some(step), _) => Err((
                self.fail(&format!("{what} after {sent} of {size} bytes"), step),
                true,
            )),
            (None, Err(e)) => Err((self.fail(&what, e.into()), true)),
        }
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
        log::debug!("{name}: {}: FTP RNFR {temp_path}", self.addr);
        if let Err(e) = self
            .ftp
            .custom_command(format!("RNFR {temp}"), &[Status::RequestFilePending])
        {
            let mut err = self.fail(
                &format!("rename {temp_path} to {final_path}: RNFR"),
                e.into(),
            );
            if err.kind == ErrorKind::Remote {
                err.msg.push_str(HINT);
            }
            return Err(err);
        }
        self.kick();
        log::debug!("{name}: {}: FTP RNTO {final_path}", self.addr);
        if let Err(e) = self.ftp.custom_command(
            format!("RNTO {name}"),
            &[Status::RequestedFileActionOk, Status::CommandOk],
        ) {
            let mut err = self.fail(
                &format!("rename {temp_path} to {final_path}: RNTO"),
                e.into(),
            );
            if err.kind == ErrorKind::Remote {
                err.msg.push_str(HINT);
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
                self.addr
            );
            return;
        }
        self.kick();
        log::debug!("{name}: {}: FTP DELE {file}", self.addr);
        if let Err(e) = self.ftp.rm(file) {
            log::warn!("{name}: {}: could not remove {file}: {e}", self.addr);
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
                    return Err(TransferError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "ftp {}: {dir}: the server did not say which directory is the login directory (PWD), so relative directories cannot be used; use an absolute dest_dir",
                            self.addr
                        ),
                    ))
                }
            }
        };
        self.kick();
        log::debug!("{name}: {}: FTP CWD {start}", self.addr);
        self.ftp
            .cwd(&start)
            .map_err(|e| self.fail(&format!("CWD {start}"), e.into()))?;
        let mut path = start;
        for comp in comps {
            path = join_path(&path, comp);
            self.kick();
            log::debug!("{name}: {}: FTP CWD {path}", self.addr);
            match self.ftp.cwd(comp) {
                Ok(()) => continue,
                Err(FtpError::UnexpectedResponse(_)) => {}
                Err(e) => return Err(self.fail(&format!("CWD {path}"), e.into())),
            }
            self.kick();
            log::debug!("{name}: {}: FTP MKD {path}", self.addr);
            let made = self.ftp.mkdir(comp);
            self.kick();
            match (made, self.ftp.cwd(comp)) {
                (_, Ok(())) => {}
                (Err(e), Err(_)) => return Err(self.fail(&format!("MKD {path}"), e.into())),
                (Ok(()), Err(e)) => {
                    return Err(self.fail(&format!("CWD {path} (just created)"), e.into()))
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
                log::debug!("ftp {}: QUIT: {e}", self.addr);
            }
            self.watchdog.disarm();
        }
    }
}

/// One failed step → a [`TransferError`] of the right class, naming
/// `host:port` and the operation.
fn classify(
    addr: &str,
    watchdog: &Watchdog,
    io_timeout: Duration,
    what: &str,
    step: Step,
) -> TransferError {
    let mk =
        |kind, detail: String| TransferError::new(kind, format!("ftp {addr}: {what}: {detail}"));
    if watchdog.fired() {
        return mk(
            ErrorKind::Timeout,
            format!(
                "no progress for {:.1}s (io_timeout); connection closed",
                io_timeout.as_secs_f64()
            ),
        );
    }
    let io_err = |e: &io::Error| {
        if let Some(t) = tls_error(e) {
            return mk(ErrorKind::Unavailable, describe_tls(t));
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => mk(
                ErrorKind::Timeout,
                format!(
                    "no answer within {:.1}s (io_timeout)",
                    io_timeout.as_secs_f64()
                ),
            ),
            _ => mk(io_kind(e), e.to_string()),
        }
    };
    let e = match step {
        Step::Io(e) => return io_err(&e),
        Step::Ftp(e) => e,
    };
    match e {
        FtpError::ConnectionError(e) => io_err(&e),
        // into_secure wraps our connector's error in another SecureError
        FtpError::SecureError(s) => mk(
            ErrorKind::Unavailable,
            s.trim_start_matches("Secure error: ").to_string(),
        ),
        FtpError::BadResponse => mk(
            ErrorKind::Unavailable,
            "malformed reply (is this an FTP server? FTPS setting right?)".into(),
        ),
        FtpError::InvalidAddress(e) => mk(
            ErrorKind::Connect,
            format!("bad address in the server's reply: {e}"),
        ),
        FtpError::DataConnectionAlreadyOpen => {
            mk(ErrorKind::Connect, "data connection already open".into())
        }
        FtpError::UnexpectedResponse(r) => {
            let code = reply_code(&r);
            let text = reply_text(&r);
            let login = what.starts_with("login");
            let tls = what.starts_with("FTPS");
            let kind = match code {
                530 | 430 if login => ErrorKind::Auth,
                _ if login && (500..600).contains(&code) => ErrorKind::Auth,
                // AUTH TLS / PBSZ / PROT refused: this server does not do FTPS
                _ if tls => ErrorKind::Unavailable,
                421 | 425 | 426 | 450 | 451 => ErrorKind::Connect,
                _ if what == "greeting" => ErrorKind::Unavailable,
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
            mk(kind, detail)
        }
    }
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
        let k = |what: &str, s: &str| classify("h:21", &wd, io, what, resp(s)).kind;
        assert_eq!(k("login as u", "530 Login incorrect."), ErrorKind::Auth);
        assert_eq!(
            k("STOR /x/.a.part", "553 Could not create file."),
            ErrorKind::Remote
        );
        assert_eq!(
            k("MKD /x", "550 Create directory operation failed."),
            ErrorKind::Remote
        );
        assert_eq!(
            k("STOR /x/.a.part", "452 Insufficient storage"),
            ErrorKind::Remote
        );
        assert_eq!(
            k("STOR /x/.a.part", "425 Can't open data connection"),
            ErrorKind::Connect
        );
        assert_eq!(
            k("FTPS (AUTH TLS)", "530 Please login with USER and PASS."),
            ErrorKind::Unavailable
        );
        let e = classify(
            "h:21",
            &wd,
            io,
            "CWD /",
            Step::Io(io::Error::from(io::ErrorKind::WouldBlock)),
        );
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(e.msg.starts_with("ftp h:21: CWD /: "), "{}", e.msg);
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
    fn tls_config_reports_a_missing_ca_file() {
        let e = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
