//! [`TransferError`]: a transport failure as data — its [`ErrorKind`], where
//! (protocol, host, port, remote path), what was being done ([`Op`], and the
//! step as the message names it), and why ([`Cause`]). `Display` renders the
//! one-line message an operator reads (`ssh host:2222: handshake failed: …`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use super::ErrorKind;
use crate::config::Transport;

/// The protocol an operation spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The SSH connection itself, or a remote command over it.
    Ssh,
    /// The scp protocol over an SSH channel.
    Scp,
    /// The SFTP subsystem over an SSH channel.
    Sftp,
    /// FTP or FTPS.
    Ftp,
}

impl Protocol {
    /// Its name: `ssh`, `scp`, `sftp`, `ftp`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Scp => "scp",
            Protocol::Sftp => "sftp",
            Protocol::Ftp => "ftp",
        }
    }

    /// The connection it runs over: `ssh` for scp and SFTP.
    pub fn connection(self) -> &'static str {
        match self {
            Protocol::Ftp => "ftp",
            _ => "ssh",
        }
    }
}

/// What was being done when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Looking the host's name up.
    Resolve,
    /// TCP connect, socket setup.
    Connect,
    /// The SSH handshake, the FTP greeting.
    Handshake,
    /// Checking or recording the host key.
    HostKey,
    /// FTPS: AUTH TLS, the TLS handshake, PBSZ/PROT, the client's TLS setup.
    Tls,
    /// Logging in.
    Auth,
    /// Session setup after login (binary type, PWD, a session that is gone).
    Session,
    /// Finding the login's home directory.
    Home,
    /// Creating (or entering) the destination directory.
    Mkdir,
    /// Sending the file.
    Upload,
    /// Checking the uploaded file against the local one.
    Verify,
    /// Renaming the temporary file into place.
    Rename,
    /// Removing a remote file.
    Remove,
    /// Setting the file's permission bits.
    Chmod,
    /// Taking or reading the install lock.
    Lock,
    /// A script through the session's runner.
    RunScript,
    /// One remote command.
    Exec,
    /// Opening the SFTP subsystem.
    Sftp,
    /// Reading the local file.
    ReadLocal,
    /// Running the install command.
    Install,
    /// Choosing among the route's transports.
    Transfer,
}

/// Why it failed.
#[derive(Debug, Clone)]
pub enum Cause {
    Io(Arc<std::io::Error>),
    Ssh(Arc<ssh2::Error>),
    /// Rendered text: a server's reply, a remote command's output, a
    /// suppaftp error, or a sentence saying what is wrong.
    Text(String),
    /// Every transport of the route failed: each one's error, in order.
    Transports(Vec<(Transport, TransferError)>),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Io(e) => e.fmt(f),
            Cause::Ssh(e) => e.fmt(f),
            Cause::Text(s) => f.write_str(s),
            Cause::Transports(all) => f.write_str(&joined(all)),
        }
    }
}

/// `scp: …; ftp: …`
pub fn joined(errors: &[(Transport, TransferError)]) -> String {
    errors
        .iter()
        .map(|(t, e)| format!("{t}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<std::io::Error> for Cause {
    fn from(e: std::io::Error) -> Cause {
        Cause::Io(Arc::new(e))
    }
}

impl From<ssh2::Error> for Cause {
    fn from(e: ssh2::Error) -> Cause {
        Cause::Ssh(Arc::new(e))
    }
}

impl From<String> for Cause {
    fn from(s: String) -> Cause {
        Cause::Text(s)
    }
}

impl From<&str> for Cause {
    fn from(s: &str) -> Cause {
        Cause::Text(s.to_string())
    }
}

/// How the message begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    /// `ssh host[:port]: `, `ftp host:port: ` — the connection.
    Addr,
    /// `ssh host: ` — the host without its port.
    Host,
    /// `ftp: ` — the protocol alone.
    Protocol,
    /// Nothing: the step says it all.
    Bare,
}

/// A transport failure: its kind, where, what was being done, and why (the
/// fields are [`Failure`]'s; boxed, so a `Result` stays small).
#[derive(Debug, Clone)]
pub struct TransferError(Box<Failure>);

/// What a [`TransferError`] says.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: ErrorKind,
    pub op: Op,
    pub protocol: Option<Protocol>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The remote path the operation was about, where there is one.
    pub path: Option<String>,
    /// The step as the message names it (`handshake failed`, `STOR
    /// /x/.dispatch-….part`); with no cause, the whole detail.
    pub step: Cow<'static, str>,
    pub cause: Option<Cause>,
    /// Said after the cause (`; if this server does not allow renaming, …`).
    note: Option<&'static str>,
    lead: Lead,
}

impl std::ops::Deref for TransferError {
    type Target = Failure;

    fn deref(&self) -> &Failure {
        &self.0
    }
}

impl TransferError {
    /// A failure of `kind` during `op` on `host:port` over `protocol`; the
    /// message starts with the connection (`ssh host:port: `). Say what
    /// failed with [`TransferError::step`] and why with
    /// [`TransferError::cause`].
    pub fn on(
        kind: ErrorKind,
        op: Op,
        protocol: Protocol,
        host: &str,
        port: Option<u16>,
    ) -> TransferError {
        TransferError(Box::new(Failure {
            kind,
            op,
            protocol: Some(protocol),
            host: Some(host.to_string()),
            port,
            path: None,
            step: Cow::Borrowed(""),
            cause: None,
            note: None,
            lead: Lead::Addr,
        }))
    }

    /// A failure with no host to name (the local file, the executor's own
    /// state): `detail` is the whole message.
    pub fn new(kind: ErrorKind, op: Op, detail: impl Into<Cow<'static, str>>) -> TransferError {
        TransferError(Box::new(Failure {
            kind,
            op,
            protocol: None,
            host: None,
            port: None,
            path: None,
            step: detail.into(),
            cause: None,
            note: None,
            lead: Lead::Bare,
        }))
    }

    /// A free-form detail for a message that is really unique: carries
    /// kind, op, protocol and host, and reads `detail` alone.
    pub fn detail(
        kind: ErrorKind,
        op: Op,
        protocol: Option<Protocol>,
        host: &str,
        detail: impl Into<Cow<'static, str>>,
    ) -> TransferError {
        let mut e = TransferError::new(kind, op, detail);
        e.0.protocol = protocol;
        e.0.host = Some(host.to_string());
        e
    }

    /// The failed step, as the message names it.
    pub fn step(mut self, step: impl Into<Cow<'static, str>>) -> TransferError {
        self.0.step = step.into();
        self
    }

    /// Why it failed.
    pub fn cause(mut self, cause: impl Into<Cause>) -> TransferError {
        self.0.cause = Some(cause.into());
        self
    }

    /// The remote path it was about.
    pub fn path(mut self, path: impl Into<String>) -> TransferError {
        self.0.path = Some(path.into());
        self
    }

    /// Said after the cause.
    pub fn note(mut self, note: &'static str) -> TransferError {
        self.0.note = Some(note);
        self
    }

    /// The message does not start with the connection.
    pub fn bare(mut self) -> TransferError {
        self.0.lead = Lead::Bare;
        self
    }

    /// The message starts with the protocol alone (`ftp: `).
    pub fn protocol_only(mut self) -> TransferError {
        self.0.lead = Lead::Protocol;
        self
    }

    /// The message starts with the connection and the host, not its port.
    pub fn host_only(mut self) -> TransferError {
        self.0.lead = Lead::Host;
        self
    }

    /// The same failure, of another kind.
    pub fn with_kind(mut self, kind: ErrorKind) -> TransferError {
        self.0.kind = kind;
        self
    }
}

impl Failure {
    /// `host`, `host:port` (ssh, port 22 left out), `[v6]:port` (ftp).
    fn addr(&self) -> String {
        let host = self.host.as_deref().unwrap_or("");
        match (self.protocol, self.port) {
            (_, None) => host.to_string(),
            (Some(Protocol::Ftp), Some(p)) if host.contains(':') => format!("[{host}]:{p}"),
            (Some(Protocol::Ftp), Some(p)) => format!("{host}:{p}"),
            (_, Some(22)) => host.to_string(),
            (_, Some(p)) => format!("{host}:{p}"),
        }
    }
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.unwrap_or(Protocol::Ssh);
        match self.lead {
            Lead::Addr => write!(f, "{} {}: ", proto.connection(), self.addr())?,
            Lead::Host => write!(
                f,
                "{} {}: ",
                proto.connection(),
                self.host.as_deref().unwrap_or("")
            )?,
            Lead::Protocol => write!(f, "{}: ", proto.name())?,
            Lead::Bare => {}
        }
        match (&self.cause, self.step.is_empty()) {
            (Some(c), false) => write!(f, "{}: {c}", self.step)?,
            (Some(c), true) => write!(f, "{c}")?,
            (None, _) => f.write_str(&self.step)?,
        }
        f.write_str(self.note.unwrap_or(""))
    }
}

impl std::error::Error for TransferError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Some(Cause::Io(e)) => Some(e.as_ref()),
            Some(Cause::Ssh(e)) => Some(e.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_connection_the_step_and_the_cause() {
        let e = TransferError::on(
            ErrorKind::Connect,
            Op::Handshake,
            Protocol::Ssh,
            "h",
            Some(22),
        )
        .step("handshake failed")
        .cause("boom");
        assert_eq!(e.to_string(), "ssh h: handshake failed: boom");
        let e = TransferError::on(
            ErrorKind::Remote,
            Op::Rename,
            Protocol::Ftp,
            "::1",
            Some(21),
        )
        .step("rename a to b: RNFR")
        .cause("550 no")
        .note("; hint");
        assert_eq!(
            e.to_string(),
            "ftp [::1]:21: rename a to b: RNFR: 550 no; hint"
        );
        let e = TransferError::on(
            ErrorKind::Verify,
            Op::Verify,
            Protocol::Ssh,
            "h",
            Some(2222),
        )
        .step("verification failed")
        .cause("x")
        .host_only();
        assert_eq!(e.to_string(), "ssh h: verification failed: x");
        let e = TransferError::detail(
            ErrorKind::Connect,
            Op::Session,
            Some(Protocol::Ftp),
            "h",
            "no session",
        )
        .protocol_only();
        assert_eq!(e.to_string(), "ftp: no session");
        assert_eq!(e.host.as_deref(), Some("h"));
    }

    #[test]
    fn a_failed_chain_names_each_transport_and_keeps_their_errors() {
        use std::error::Error as _;
        let scp = TransferError::on(
            ErrorKind::Connect,
            Op::Connect,
            Protocol::Ssh,
            "h",
            Some(2222),
        )
        .step("connect failed")
        .cause(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(scp.source().is_some());
        let ftp = TransferError::on(ErrorKind::Auth, Op::Auth, Protocol::Ftp, "h", Some(21))
            .step("login as u")
            .cause("refused: 530 Login incorrect.");
        let all = vec![(Transport::Scp, scp.clone()), (Transport::Ftp, ftp)];
        let e = TransferError::detail(
            ErrorKind::Auth,
            Op::Transfer,
            None,
            "h",
            "all transports failed",
        )
        .cause(Cause::Transports(all));
        assert_eq!(
            e.to_string(),
            format!(
                "all transports failed: scp: ssh h:2222: connect failed: {}; ftp: ftp h:21: login as u: refused: 530 Login incorrect.",
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
            )
        );
        let Some(Cause::Transports(kept)) = &e.cause else {
            panic!("{e:?}");
        };
        assert_eq!(kept[0].1.op, Op::Connect);
        assert_eq!(kept[1].1.kind, ErrorKind::Auth);
    }
}
