//! INI → raw sections → validated [`Config`].
//!
//! A small strict reader instead of the `configparser` crate: section names are
//! regular expressions and install commands contain `;` and `#`, so the reader
//! keeps names and values verbatim, treats `;`/`#` as comments only at the start
//! of a line, and reports duplicates, junk and typos with `file:line` — all of
//! them at once. The legacy `general-dispatch-info.cfg` format (Python
//! configparser, `[DEFAULT]` inheritance, `key = value` or `key: value`,
//! indented continuation lines) loads unchanged.
//!
//! Three stages, one file each: `ini.rs` (text → raw sections), `keys.rs` (the
//! key table: each key's name, default, help and parser, declared once;
//! raw sections → [`Route`]s and [`Settings`]) and `values.rs` (the parsers
//! the table uses). Placeholder templates are checked with
//! [`crate::template`]; matching a file name to a route is
//! [`crate::route`]'s.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

mod ini;
mod keys;
mod values;

pub use ini::{parse_ini, RawEntry, RawSection};
pub use keys::{Key, KeyDefault, DEFAULT_DEST_DIR, ROUTE_KEYS, SETTINGS_KEYS};
pub use values::{
    distance, expand_home, home_dir, parse_duration, parse_jobs, show_duration, split_list,
    InvalidValue, JOBS, MAX_DELAY, MAX_DURATION, MAX_RETRIES, MAX_TIMEOUT, SESSIONS_PER_HOST,
};
// moved to `template`; re-exported so the public API of `config` is unchanged
pub use crate::template::{check_placeholder_quoting, placeholders, Unquotable};

use ini::BROKEN;
use keys::{build_route, build_settings, unknown_keys, Ctx};

/// Every problem found in a config file, each with its line.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub msg: String,
}

/// A problem's text is one terminal line: control characters (a newline or
/// an escape sequence from the file) are shown escaped.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = escape_control(&self.file.display().to_string());
        let msg = escape_control(&self.msg);
        if self.line == 0 {
            write!(f, "{file}: {msg}")
        } else {
            write!(f, "{file}:{}: {msg}", self.line)
        }
    }
}

/// At most this many problems are printed, then `… and K more`.
pub const MAX_SHOWN_PROBLEMS: usize = 20;

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().take(MAX_SHOWN_PROBLEMS).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        if self.problems.len() > MAX_SHOWN_PROBLEMS {
            let file = self
                .problems
                .first()
                .map(|p| escape_control(&p.file.display().to_string()))
                .unwrap_or_default();
            write!(
                f,
                "\n{file}: … and {} more problems",
                self.problems.len() - MAX_SHOWN_PROBLEMS
            )?;
        }
        Ok(())
    }
}

/// Control characters escaped (`\n`, `\u{1b}`), everything else as is.
pub fn escape_control(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl std::error::Error for ConfigError {}

/// A password (or other secret) that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Scp,
    Ftp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Scp => "scp",
            Transport::Ftp => "ftp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ftps {
    /// Plain FTP only (needs `ftp_cleartext = yes`).
    Off,
    /// The default: AUTH TLS; plain FTP only if the server does not offer
    /// TLS and `ftp_cleartext = yes`.
    Auto,
    Explicit,
    Implicit,
}

/// A number of hosts: a count, or a percentage of the route's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCount {
    Hosts(usize),
    Percent(u32),
}

impl HostCount {
    /// Of `n` hosts: a percentage rounds up (at least 1 when `n` > 0).
    pub fn of(self, n: usize) -> usize {
        match self {
            HostCount::Hosts(k) => k.min(n),
            HostCount::Percent(p) => {
                let k = (n * p as usize).div_ceil(100);
                k.clamp(usize::from(n > 0), n)
            }
        }
    }

    /// Of `n` hosts, rounding a percentage down (a failure budget).
    pub fn of_floor(self, n: usize) -> usize {
        match self {
            HostCount::Hosts(k) => k,
            HostCount::Percent(p) => n * p as usize / 100,
        }
    }
}

impl fmt::Display for HostCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostCount::Hosts(k) => write!(f, "{k}"),
            HostCount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a route's hosts are rolled out (`strategy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// Every host at once (the default).
    Parallel,
    /// One host after the other.
    Serial,
    /// Waves of this many hosts.
    Batch(HostCount),
    /// Waves up to these cumulative sizes (`canary:1,25%,100%`); hosts past
    /// the last one form a final wave.
    Canary(Vec<HostCount>),
}

impl Strategy {
    /// `hosts` in waves, in their order in the config.
    pub fn waves<T: Clone>(&self, hosts: &[T]) -> Vec<Vec<T>> {
        let n = hosts.len();
        let mut cuts: Vec<usize> = match self {
            Strategy::Parallel => vec![n],
            Strategy::Serial => (1..=n).collect(),
            Strategy::Batch(size) => {
                let k = size.of(n).max(1);
                (1..=n.div_ceil(k)).map(|i| (i * k).min(n)).collect()
            }
            Strategy::Canary(sizes) => sizes.iter().map(|s| s.of(n)).collect(),
        };
        cuts.push(n);
        let mut waves = Vec::new();
        let mut from = 0;
        for c in cuts {
            if c > from {
                waves.push(hosts[from..c].to_vec());
                from = c;
            }
        }
        waves
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Parallel => f.write_str("parallel"),
            Strategy::Serial => f.write_str("serial"),
            Strategy::Batch(k) => write!(f, "batch:{k}"),
            Strategy::Canary(list) => {
                let l: Vec<String> = list.iter().map(ToString::to_string).collect();
                write!(f, "canary:{}", l.join(","))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Size,
    Sha256,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyCheck {
    Strict,
    AcceptNew,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    Keep,
    Delete,
    Move(PathBuf),
}

/// One `[regex]` section: where matching packages go and how they are installed.
#[derive(Debug, Clone)]
pub struct Route {
    /// The section name as written (the regex source).
    pub section: String,
    /// Line of the section header.
    pub line: usize,
    /// `\A(?:section)`: anchored at the start only, like Python's `re.match`.
    pub regex: Regex,
    pub hosts: Vec<String>,
    pub port: u16,
    pub ftp_port: u16,
    pub login: Option<String>,
    pub password: Option<Secret>,
    pub account: Option<String>,
    pub identity_file: Option<PathBuf>,
    pub dest_dir: String,
    pub install_command: Option<String>,
    pub transfer: Vec<Transport>,
    pub ftps: Ftps,
    pub ftp_ca_file: Option<PathBuf>,
    pub ftp_passive: bool,
    pub ftp_rename: bool,
    /// `ftp_cleartext`: plain FTP (password and data unencrypted) allowed.
    pub ftp_cleartext: bool,
    /// `stream`: SSH deliveries pipelined (see `transport::ssh::stream`).
    pub stream: bool,
    pub verify: Verify,
    pub host_key_check: HostKeyCheck,
    pub known_hosts: PathBuf,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub install_timeout: Duration,
    pub retries: u32,
    pub retry_delay: Duration,
    /// Rollouts ([`crate::rollout`]).
    pub strategy: Strategy,
    /// Host failures tolerated before the rollout stops (`None`: 0 unless
    /// the strategy is parallel).
    pub max_failures: Option<HostCount>,
    pub pre_local: Option<String>,
    pub post_local: Option<String>,
    pub pre_remote: Option<String>,
    pub post_remote: Option<String>,
    pub hook_timeout: Duration,
    pub health_check: Option<String>,
    pub health_remote: Option<String>,
    pub health_timeout: Duration,
    pub health_interval: Duration,
    pub health_passes: u32,
    /// Releases: the symlink pointed at each good release (`~` = the login's home).
    pub current: Option<String>,
    pub activate_command: Option<String>,
    /// Successful releases kept per host (None: all).
    pub keep_releases: Option<u32>,
    /// The rollout's lock on each host: how long it holds without renewal,
    /// and how long to wait for another holder.
    pub lock_ttl: Duration,
    pub lock_wait: Duration,
}

impl Route {
    /// The route needs the rollout driver: waves, gates or hooks.
    pub fn is_rollout(&self) -> bool {
        self.strategy != Strategy::Parallel
            || self.pre_local.is_some()
            || self.post_local.is_some()
            || self.pre_remote.is_some()
            || self.post_remote.is_some()
            || self.health_check.is_some()
            || self.health_remote.is_some()
            || self.current.is_some()
    }

    /// Host failures the rollout goes on after.
    pub fn failures_allowed(&self) -> usize {
        match (self.max_failures, &self.strategy) {
            (Some(m), _) => m.of_floor(self.hosts.len()),
            (None, Strategy::Parallel) => self.hosts.len(),
            (None, _) => 0,
        }
    }
}

/// The `[dispatch]` section: global settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub watch: Vec<PathBuf>,
    pub recursive: bool,
    pub settle: Duration,
    pub rescan: Duration,
    /// Give up on a file that is still changing after this long (reported, not sent).
    pub max_settle: Duration,
    pub ignore: Vec<String>,
    pub jobs: usize,
    pub max_sessions_per_host: usize,
    pub state_dir: PathBuf,
    pub after: After,
    pub spool_dir: Option<PathBuf>,
    pub log_config: Option<PathBuf>,
    /// Daemon: how many times a failed file × host is retried before it is parked.
    pub max_attempts: u32,
    /// Daemon: where the status server listens (None: `off`).
    pub status_listen: Option<std::net::SocketAddr>,
    pub status_token: Option<Secret>,
    /// Daemon: notifications ([`crate::notify`]).
    pub notify_command: Option<String>,
    pub notify_url: Option<String>,
    pub notify_secret: Option<Secret>,
    /// `notify_on = all` (else failures only).
    pub notify_all: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub settings: Settings,
    pub routes: Vec<Route>,
    /// Non-fatal findings (e.g. a world-readable file holding a password).
    pub warnings: Vec<String>,
}

impl Config {
    /// Parse and validate config text. `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(path, text, Vec::new())
    }

    /// [`Config::parse`], adding to problems found before (undecodable lines).
    fn parse_with(
        path: &Path,
        text: &str,
        mut problems: Vec<Problem>,
    ) -> Result<Config, ConfigError> {
        let sections = parse_ini(path, text, &mut problems);
        let mut ctx = Ctx {
            file: path,
            problems: &mut problems,
        };
        let default = sections.iter().find(|s| s.name == "DEFAULT");
        let settings = build_settings(&mut ctx, sections.iter().find(|s| s.name == "dispatch"));
        let mut routes = Vec::new();
        let mut seen = Vec::new();
        for s in &sections {
            if s.name == "DEFAULT"
                || s.name == "dispatch"
                || s.name == BROKEN
                || seen.contains(&s.name)
            {
                continue;
            }
            seen.push(s.name.clone());
            if let Some(r) = build_route(&mut ctx, s, default) {
                routes.push(r);
            }
        }
        if let Some(d) = default {
            unknown_keys(&mut ctx, ROUTE_KEYS, d, "DEFAULT");
        }
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.line);
            problems.dedup_by(|a, b| a.line == b.line && a.msg == b.msg);
            return Err(ConfigError { problems });
        }
        let warnings = password_warnings(path, &routes, &settings);
        Ok(Config {
            path: path.to_path_buf(),
            settings,
            routes,
            warnings,
        })
    }

    /// Load a config file from disk.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read(path).map_err(|e| ConfigError {
            problems: vec![Problem {
                file: path.to_path_buf(),
                line: 0,
                msg: format!("cannot read config: {e}"),
            }],
        })?;
        // a byte that is not UTF-8 is an error at its line (a lossy reading
        // would silently turn a password or path into something else)
        let mut problems = Vec::new();
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            if let Err(e) = std::str::from_utf8(line) {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: i + 1,
                    msg: format!(
                        "not valid UTF-8 (byte {} of the line; save the file as UTF-8)",
                        e.valid_up_to() + 1
                    ),
                });
            }
        }
        let text = String::from_utf8_lossy(&text);
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Config::parse_with(path, text, problems)
    }

    /// `--config`, else `./dispatch.ini`, `$XDG_CONFIG_HOME/dispatch/dispatch.ini`,
    /// `/etc/dispatch/dispatch.ini`.
    pub fn find(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        let mut candidates = vec![PathBuf::from("dispatch.ini")];
        let xdg = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home_dir().join(".config"));
        candidates.push(xdg.join("dispatch/dispatch.ini"));
        candidates.push(PathBuf::from("/etc/dispatch/dispatch.ini"));
        for c in &candidates {
            if c.is_file() {
                return Ok(c.clone());
            }
        }
        Err(ConfigError {
            problems: vec![Problem {
                file: PathBuf::from("dispatch.ini"),
                line: 0,
                msg: format!(
                    "no config file found (looked in: {}); pass -c/--config PATH",
                    candidates
                        .iter()
                        .map(|c| c.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }],
        })
    }
}

/// A file holding a password must not be readable by others.
fn password_warnings(path: &Path, routes: &[Route], settings: &Settings) -> Vec<String> {
    let mut warnings = Vec::new();
    if routes.iter().any(|r| r.password.is_some())
        || settings.status_token.is_some()
        || settings.notify_secret.is_some()
    {
        if let Some(mode) = file_mode(path) {
            if mode & 0o077 != 0 {
                warnings.push(format!(
                    "{}: holds a password but is readable by group/others (mode {:o}); run: chmod 600 {}",
                    path.display(),
                    mode & 0o777,
                    path.display()
                ));
            }
        }
    }
    warnings
}

pub fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.mode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_make_waves_in_host_order() {
        let hosts: Vec<u32> = (1..=10).collect();
        let w = |st: &str| -> Vec<usize> {
            let c = parse(&format!("[x]\nhost = h\nstrategy = {st}\n")).unwrap();
            c.routes[0]
                .strategy
                .waves(&hosts)
                .iter()
                .map(Vec::len)
                .collect()
        };
        assert_eq!(w("parallel"), vec![10]);
        assert_eq!(w("serial"), vec![1; 10]);
        assert_eq!(w("batch:4"), vec![4, 4, 2]);
        assert_eq!(w("batch:25%"), vec![3, 3, 3, 1]);
        assert_eq!(w("canary:1,25%,100%"), vec![1, 2, 7]);
        assert_eq!(w("canary:1,5"), vec![1, 4, 5]);
        assert_eq!(w("canary:1%"), vec![1, 9]);
        let all: Vec<u32> = parse("[x]\nhost = h\nstrategy = canary:2,50%\n")
            .unwrap()
            .routes[0]
            .strategy
            .waves(&hosts)
            .concat();
        assert_eq!(all, hosts, "every host once, in order");
        for bad in [
            "batch:0",
            "batch:",
            "canary:",
            "canary:1,0",
            "rolling",
            "batch:101%",
            "serial:2",
        ] {
            assert!(
                parse(&format!("[x]\nhost = h\nstrategy = {bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn failures_allowed_count_down_and_default_to_none_but_for_parallel() {
        let allowed = |extra: &str| {
            parse(&format!("[x]\nhost = a, b, c, d\n{extra}\n"))
                .unwrap()
                .routes[0]
                .failures_allowed()
        };
        assert_eq!(allowed(""), 4);
        assert_eq!(allowed("strategy = serial"), 0);
        assert_eq!(allowed("strategy = serial\nmax_failures = 1"), 1);
        assert_eq!(allowed("strategy = serial\nmax_failures = 49%"), 1);
        assert_eq!(allowed("strategy = serial\nmax_failures = 50%"), 2);
        assert!(
            parse("[x]\nhost = h\npre_local = drain {name}\n").is_err(),
            "a hook names no file"
        );
    }

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.ini"), t)
    }

    fn lines(e: ConfigError) -> Vec<usize> {
        e.problems.iter().map(|p| p.line).collect()
    }

    #[test]
    fn legacy_file_loads_unchanged() {
        let c = parse(
            "[ibps]\nhost = 10.8.6.10\nlogin = ibpsusr\npassword = 123456\ninstall_command = touch /tmp/installed\n\n[cnaps2]\nhost = 10.8.6.10\nlogin = cnaps2\npassword = 123456\n",
        )
        .unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].login.as_deref(), Some("ibpsusr"));
        assert_eq!(c.routes[0].password.as_ref().unwrap().expose(), "123456");
        assert_eq!(c.routes[0].dest_dir, DEFAULT_DEST_DIR);
        assert_eq!(c.routes[1].install_command, None);
    }

    #[test]
    fn ftp_defaults_to_tls_when_offered_and_no_cleartext() {
        let c = parse("[a]\nhost = h\n[b]\nhost = h\nftps = off\nftp_cleartext = yes\n").unwrap();
        assert_eq!(
            (c.routes[0].ftps, c.routes[0].ftp_cleartext),
            (Ftps::Auto, false)
        );
        assert_eq!(
            (c.routes[1].ftps, c.routes[1].ftp_cleartext),
            (Ftps::Off, true)
        );
        assert_eq!(
            lines(parse("[a]\nhost = h\nftp_cleartext = maybe\n").unwrap_err()),
            vec![3]
        );
    }

    #[test]
    fn semicolons_and_hashes_are_kept_inside_values_and_names() {
        let c = parse("[^a=b:c;d#e$]\nhost = h\ninstall_command = a; b # c\n").unwrap();
        assert_eq!(c.routes[0].section, "^a=b:c;d#e$");
        assert_eq!(c.routes[0].install_command.as_deref(), Some("a; b # c"));
    }

    #[test]
    fn default_section_is_inherited_and_overridden() {
        let c = parse("[DEFAULT]\nlogin = u\nport = 2222\n[x]\nhost = h\nport = 22\n").unwrap();
        assert_eq!(c.routes[0].login.as_deref(), Some("u"));
        assert_eq!(c.routes[0].port, 22);
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let e = parse(
            "[a(]\nhost = h\n[b]\nlogin = x\n[c]\nhost = h\nport = 99999\nhots = y\n[c]\nhost = z\n",
        )
        .unwrap_err();
        let l = lines(e.clone());
        assert_eq!(l, vec![1, 3, 7, 8, 9], "{e}");
        assert!(e.to_string().contains("did you mean `host`"), "{e}");
        assert!(e.to_string().starts_with("t.ini:1: "), "{e}");
    }

    #[test]
    fn continuation_lines_join_values() {
        let c = parse("[x]\nhost = a,\n  b\n").unwrap();
        assert_eq!(c.routes[0].hosts, ["a", "b"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn unknown_placeholder_and_bad_strftime_are_errors() {
        let e =
            parse("[x]\nhost = h\ninstall_command = run {nope}\ndest_dir = /a/%Q\n").unwrap_err();
        assert_eq!(lines(e), vec![3, 4]);
        assert!(parse("[(?P<app>a)]\nhost=h\ninstall_command = run {app} {name} {file}\n").is_ok());
    }

    #[test]
    fn shipped_example_config_is_valid_and_documents_every_key() {
        let text = include_str!("../dispatch.example.ini");
        let c = parse(text).unwrap();
        assert_eq!(c.routes.len(), 2);
        let keys = ROUTE_KEYS
            .iter()
            .map(|k| (k.name, k.default))
            .chain(SETTINGS_KEYS.iter().map(|k| (k.name, k.default)));
        for (k, default) in keys {
            assert!(text.contains(&format!("{k} =")), "{k} not documented");
            // with its default: set as it is, or commented out when there is none
            let documented = match default {
                KeyDefault::Text(d) | KeyDefault::Computed(d) => format!("\n{k} = {d}\n"),
                KeyDefault::Unset => format!("\n;{k} ="),
                KeyDefault::Required => format!("\n{k} = "),
            };
            assert!(
                text.contains(&documented),
                "{k}: {documented:?} not documented"
            );
        }
    }

    #[test]
    fn a_quoted_placeholder_error_names_the_key_and_the_fix() {
        let e = parse(
            "[(?P<app>a)-]\nhost = h\ninstall_command = echo \"installing {name} for {app}\" && echo '{file}'\n",
        )
        .unwrap_err();
        assert_eq!(lines(e.clone()), vec![3], "{e}");
        let m = e.to_string();
        assert!(m.contains("install_command: {name} inside \"…\""), "{m}");
        assert!(
            m.contains("install_command = echo \"installing \"{name}\" for \"{app} && echo {file}"),
            "{m}"
        );
        // a placeholder where no mechanical fix exists: the general advice
        let m = parse("[x]\nhost = h\ninstall_command = echo `ls {dir}`\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("plain unquoted text"), "{m}");
    }

    #[test]
    fn numbers_and_durations_out_of_range_are_errors_at_their_line() {
        let e = parse(
            "[dispatch]\njobs = 100000000\nmax_sessions_per_host = 65\nsettle = 0\nrescan = 8d\nmax_attempts = 0\n\
             [x]\nhost = h\ninstall_timeout = 1e20\nio_timeout = 1e19\nconnect_timeout = 0\nretries = 101\n\
             retry_delay = 2h\nport = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            lines(e.clone()),
            vec![2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14],
            "{e}"
        );
        let m = e.to_string();
        assert!(
            m.contains("t.ini:9: [x] install_timeout: `1e20` is too long (at most 168h (7 days))"),
            "{m}"
        );
        assert!(
            m.contains("retry_delay: `2h` is too long (at most 1h)"),
            "{m}"
        );
        assert!(
            m.contains("jobs: `100000000` is not a whole number from 1 to 256"),
            "{m}"
        );
        assert!(m.contains("rescan: `8d` is not a duration"), "{m}");
        assert!(parse("[x]\nhost = h\nio_timeout = 9000h\n")
            .unwrap_err()
            .to_string()
            .contains("io_timeout: `9000h` is too long (at most 168h (7 days))"));
        // the limits themselves are fine, and rescan = 0 turns the rescan off
        let c = parse(
            "[dispatch]\njobs = 256\nmax_sessions_per_host = 64\nrescan = 0\nmax_attempts = 100\n\
             [x]\nhost = h\ninstall_timeout = 7d\nio_timeout = 168h\nretries = 100\nretry_delay = 0\n",
        );
        // `7d` is no unit: 7 days is written 168h
        assert!(c.is_err());
        let c = parse(
            "[dispatch]\njobs = 256\nmax_sessions_per_host = 64\nrescan = 0\nmax_attempts = 100\n\
             [x]\nhost = h\ninstall_timeout = 604800\nio_timeout = 168h\nretries = 100\nretry_delay = 0\n",
        )
        .unwrap();
        assert_eq!(c.settings.jobs, 256);
        assert_eq!(c.routes[0].io_timeout, Duration::from_secs(604800));
        assert!(parse("[dispatch]\nsettle = 10s\nmax_settle = 5s\n[x]\nhost = h\n").is_err());
    }

    #[test]
    fn problems_are_capped_and_escaped() {
        let mut t = String::from("[x]\nhost = h\n");
        for i in 0..25 {
            t.push_str(&format!("bad{i} = 1\n"));
        }
        t.push_str("login\u{1b}[31m = x\n");
        let m = parse(&t).unwrap_err().to_string();
        assert_eq!(m.lines().count(), MAX_SHOWN_PROBLEMS + 1, "{m}");
        assert!(m.ends_with("t.ini: … and 6 more problems"), "{m}");
        let m = parse("[x]\nhost = h\nlog\u{1b}in = x\n")
            .unwrap_err()
            .to_string();
        assert!(m.contains("log\\u{1b}in") && !m.contains('\u{1b}'), "{m}");
    }
}
