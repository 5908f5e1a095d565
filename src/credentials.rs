//! Who we log in as: login/password/account from the route, else from netrc
//! for that host, else the local user; SSH keys from `identity_file`, the
//! agent, or the default key files.
//!
//! netrc is read by a small parser of our own (not `netrc-rs`): it handles
//! `#` comments and `"quoted tokens"`, names the line of an error, and does
//! not desynchronise on non-ASCII `macdef` bodies. Like ftp(1), a netrc that
//! holds a password and is readable by others is refused for its passwords.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{file_mode, home_dir, Route, Secret};

#[derive(Debug, Clone, Default)]
pub struct Machine {
    /// `None` for the `default` entry.
    pub name: Option<String>,
    pub login: Option<String>,
    pub password: Option<Secret>,
    pub account: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Netrc {
    pub machines: Vec<Machine>,
    /// Passwords were dropped because the file is readable by others.
    pub insecure: bool,
    pub path: PathBuf,
}

/// A netrc that cannot be used. Display: `PATH:LINE: problem` (line 0 when
/// the file could not be read).
#[derive(Debug)]
pub struct NetrcError {
    pub path: PathBuf,
    pub line: usize,
    pub problem: NetrcProblem,
}

#[derive(Debug)]
pub enum NetrcProblem {
    /// The file could not be read.
    Read(std::io::Error),
    /// `machine` at the end of the file.
    MachineWithoutName,
    /// `login`, `password`, `account` or `port` at the end of the file.
    NoValue(String),
    /// `login`, `password`, `account` or `port` before any `machine`/`default`.
    NoMachine(String),
    /// A token that is not a netrc keyword.
    UnexpectedToken(String),
}

impl fmt::Display for NetrcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        match &self.problem {
            NetrcProblem::Read(e) => write!(f, "cannot read: {e}"),
            NetrcProblem::MachineWithoutName => f.write_str("`machine` without a host name"),
            NetrcProblem::NoValue(t) => write!(f, "`{t}` without a value"),
            NetrcProblem::NoMachine(t) => write!(f, "`{t}` must follow `machine` or `default`"),
            NetrcProblem::UnexpectedToken(t) => write!(f, "unexpected token `{t}`"),
        }
    }
}

impl std::error::Error for NetrcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            NetrcProblem::Read(e) => Some(e),
            _ => None,
        }
    }
}

/// Whitespace-separated tokens with their line; `"…"` quoting with `\` escapes;
/// `#` starts a comment at the start of a token.
fn tokens(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == '\n' {
            line += 1;
            chars.next();
        } else if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            while let Some(&c) = chars.peek() {
                if c == '\n' {
                    break;
                }
                chars.next();
            }
        } else {
            let start = line;
            let mut tok = String::new();
            if c == '"' {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                tok.push(n);
                            }
                        }
                        '\n' => {
                            line += 1;
                            tok.push(c)
                        }
                        _ => tok.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    tok.push(c);
                    chars.next();
                }
            }
            out.push((tok, start));
        }
    }
    out
}

impl Netrc {
    pub fn parse(path: &Path, text: &str) -> Result<Netrc, NetrcError> {
        // macdef bodies run until an empty line: strip them first, line-wise
        let mut cleaned = String::with_capacity(text.len());
        let mut in_macro = false;
        for l in text.split('\n') {
            if in_macro {
                if l.trim().is_empty() {
                    in_macro = false;
                }
                cleaned.push('\n');
                continue;
            }
            let mut words = l.split_whitespace();
            if let Some(pos) = l.split_whitespace().position(|w| w == "macdef") {
                // keep what precedes macdef on this line
                let kept: Vec<&str> = words.by_ref().take(pos).collect();
                cleaned.push_str(&kept.join(" "));
                cleaned.push('\n');
                in_macro = true;
                continue;
            }
            cleaned.push_str(l);
            cleaned.push('\n');
        }
        let err = |line, problem| NetrcError {
            path: path.to_path_buf(),
            line,
            problem,
        };
        let mut machines: Vec<Machine> = Vec::new();
        let mut toks = tokens(&cleaned).into_iter();
        while let Some((t, line)) = toks.next() {
            match t.as_str() {
                "machine" => {
                    let (name, _) = toks
                        .next()
                        .ok_or_else(|| err(line, NetrcProblem::MachineWithoutName))?;
                    machines.push(Machine {
                        name: Some(name),
                        ..Machine::default()
                    });
                }
                "default" => machines.push(Machine::default()),
                "login" | "password" | "account" | "port" => {
                    let (v, _) = toks
                        .next()
                        .ok_or_else(|| err(line, NetrcProblem::NoValue(t.clone())))?;
                    let m = machines
                        .last_mut()
                        .ok_or_else(|| err(line, NetrcProblem::NoMachine(t.clone())))?;
                    match t.as_str() {
                        "login" => m.login = Some(v),
                        "password" => m.password = Some(Secret::new(v)),
                        "account" => m.account = Some(v),
                        _ => {}
                    }
                }
                other => return Err(err(line, NetrcProblem::UnexpectedToken(other.to_string()))),
            }
        }
        Ok(Netrc {
            machines,
            insecure: false,
            path: path.to_path_buf(),
        })
    }

    /// Load `path` (or `~/.netrc`). A missing default file is an empty netrc.
    pub fn load(explicit: Option<&Path>) -> Result<Netrc, NetrcError> {
        let path = explicit
            .map(Path::to_path_buf)
            .unwrap_or_else(|| home_dir().join(".netrc"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
                return Ok(Netrc::default())
            }
            Err(e) => {
                return Err(NetrcError {
                    path,
                    line: 0,
                    problem: NetrcProblem::Read(e),
                })
            }
        };
        let mut n = Netrc::parse(&path, &text)?;
        let has_password = n.machines.iter().any(|m| m.password.is_some());
        if has_password && file_mode(&path).is_some_and(|m| m & 0o077 != 0) {
            n.insecure = true;
            for m in &mut n.machines {
                m.password = None;
            }
        }
        Ok(n)
    }

    /// The entry for `host`, else `default`.
    pub fn lookup(&self, host: &str) -> Option<&Machine> {
        self.machines
            .iter()
            .find(|m| m.name.as_deref() == Some(host))
            .or_else(|| self.machines.iter().find(|m| m.name.is_none()))
    }
}

/// Resolved credentials for one host of one route.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub login: String,
    pub password: Option<Secret>,
    pub account: Option<String>,
    /// Where the login came from, for `dispatch route` and logs.
    pub origin: &'static str,
}

/// Route keys first, then netrc (matched by host), then the local user.
pub fn resolve(route: &Route, host: &str, netrc: &Netrc) -> Credentials {
    let entry = netrc.lookup(host);
    // a netrc entry for another login does not lend its password
    let entry_matches = |m: &&Machine| match (&route.login, &m.login) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let entry = entry.filter(entry_matches);
    let (login, origin) = match (&route.login, entry.and_then(|m| m.login.clone())) {
        (Some(l), _) => (l.clone(), "config"),
        (None, Some(l)) => (l, "netrc"),
        (None, None) => (local_user(), "local user"),
    };
    Credentials {
        login,
        password: route
            .password
            .clone()
            .or_else(|| entry.and_then(|m| m.password.clone())),
        account: route
            .account
            .clone()
            .or_else(|| entry.and_then(|m| m.account.clone())),
        origin,
    }
}

pub fn local_user() -> String {
    if let Some(u) = std::env::var_os("USER").or_else(|| std::env::var_os("LOGNAME")) {
        if !u.is_empty() {
            return u.to_string_lossy().into_owned();
        }
    }
    // SAFETY: getuid cannot fail; getpwuid returns NULL or a pointer to static storage.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned();
        }
    }
    "root".to_string()
}

/// Private keys to try when no `identity_file` is set, in order.
pub fn default_keys() -> Vec<PathBuf> {
    let ssh = home_dir().join(".ssh");
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|k| ssh.join(k))
        .filter(|p| p.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Netrc {
        Netrc::parse(Path::new("netrc"), t).unwrap()
    }

    #[test]
    fn netrc_handles_comments_quotes_default_and_macdef() {
        let n = parse(
            "# comment\nmachine a login u password \"two words\"\nmacdef init\ncd /ü/dir\n\nmachine b login v password s3cr#t account acc\ndefault login anon password x\n",
        );
        assert_eq!(
            n.lookup("a").unwrap().password.as_ref().unwrap().expose(),
            "two words"
        );
        let b = n.lookup("b").unwrap();
        assert_eq!(b.password.as_ref().unwrap().expose(), "s3cr#t");
        assert_eq!(b.account.as_deref(), Some("acc"));
        assert_eq!(n.lookup("zzz").unwrap().login.as_deref(), Some("anon"));
    }

    #[test]
    fn netrc_errors_name_the_line() {
        let e = Netrc::parse(Path::new("n"), "machine a\n  login\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Netrc::parse(Path::new("n"), "\n\nlogin u\n").unwrap_err();
        assert!(e.to_string().starts_with("n:3:"), "{e}");
    }

    #[test]
    fn config_wins_over_netrc_and_netrc_over_local_user() {
        let c = crate::config::Config::parse(
            Path::new("t"),
            "[a]\nhost = h1\n[b]\nhost = h2\nlogin = cfg\n",
        )
        .unwrap();
        let n = parse("machine h1 login nl password np\nmachine h2 login other password op\n");
        let a = resolve(&c.routes[0], "h1", &n);
        assert_eq!((a.login.as_str(), a.origin), ("nl", "netrc"));
        assert_eq!(a.password.unwrap().expose(), "np");
        let b = resolve(&c.routes[1], "h2", &n);
        assert_eq!(b.login, "cfg");
        assert!(
            b.password.is_none(),
            "netrc password of another login must not be used"
        );
    }
}
