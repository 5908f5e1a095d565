//! INI → raw sections → validated [`Config`].
//!
//! A small strict reader instead of the `configparser` crate: section names are
//! regular expressions and install commands contain `;` and `#`, so the reader
//! keeps names and values verbatim, treats `;`/`#` as comments only at the start
//! of a line, and reports duplicates, junk and typos with `file:line` — all of
//! them at once. The legacy `general-dispatch-info.cfg` format (Python
//! configparser, `[DEFAULT]` inheritance, `key = value` or `key: value`,
//! indented continuation lines) loads unchanged.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

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

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.msg)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.msg)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
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
    Off,
    Explicit,
    Implicit,
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
    pub verify: Verify,
    pub host_key_check: HostKeyCheck,
    pub known_hosts: PathBuf,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub install_timeout: Duration,
    pub retries: u32,
    pub retry_delay: Duration,
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
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub settings: Settings,
    pub routes: Vec<Route>,
    /// Non-fatal findings (e.g. a world-readable file holding a password).
    pub warnings: Vec<String>,
}

/// Keys allowed in a route section (and in `[DEFAULT]`).
pub const ROUTE_KEYS: &[&str] = &[
    "host",
    "port",
    "ftp_port",
    "login",
    "password",
    "account",
    "identity_file",
    "dest_dir",
    "install_command",
    "transfer",
    "ftps",
    "ftp_ca_file",
    "ftp_mode",
    "ftp_rename",
    "verify",
    "host_key_check",
    "known_hosts",
    "connect_timeout",
    "io_timeout",
    "install_timeout",
    "retries",
    "retry_delay",
];

/// Keys allowed in `[dispatch]`.
pub const SETTINGS_KEYS: &[&str] = &[
    "watch",
    "recursive",
    "settle",
    "rescan",
    "max_settle",
    "ignore",
    "jobs",
    "max_sessions_per_host",
    "state_dir",
    "after",
    "spool_dir",
    "log_config",
    "max_attempts",
];

pub const DEFAULT_DEST_DIR: &str = "~/newcx/%Y%m%d_%H%M%S";

// ---------------------------------------------------------------- raw INI

#[derive(Debug, Clone)]
pub struct RawEntry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct RawSection {
    pub name: String,
    pub line: usize,
    pub entries: Vec<RawEntry>,
}

/// Name given to a section whose header was unreadable: its keys are
/// skipped instead of being blamed on the section before it.
const BROKEN: &str = "\u{0}broken";

impl RawSection {
    fn broken(line: usize) -> RawSection {
        RawSection {
            name: BROKEN.to_string(),
            line,
            entries: Vec::new(),
        }
    }

    fn get(&self, key: &str) -> Option<&RawEntry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

/// Parse INI text into sections, in file order. Problems are appended to `problems`.
pub fn parse_ini(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<RawSection> {
    let mut sections: Vec<RawSection> = Vec::new();
    let mut err = |line: usize, msg: String| {
        problems.push(Problem {
            file: file.to_path_buf(),
            line,
            msg,
        })
    };
    // (section index, entry index) of the last key, for continuation lines
    let mut last_entry: Option<(usize, usize)> = None;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim();
        if trimmed.is_empty() {
            // a blank line ends a multi-line value (Python keeps it only if more
            // indented lines follow; we simply end the value)
            last_entry = None;
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let indented = line.starts_with(' ') || line.starts_with('\t');
        if indented {
            if let Some((s, e)) = last_entry {
                let entry = &mut sections[s].entries[e];
                if entry.value.is_empty() {
                    entry.value = trimmed.to_string();
                } else {
                    entry.value.push('\n');
                    entry.value.push_str(trimmed);
                }
                continue;
            }
        }
        if trimmed.starts_with('[') {
            last_entry = None;
            if !trimmed.ends_with(']') || trimmed.len() < 2 {
                err(
                    lineno,
                    format!("section header must end with ']': {trimmed}"),
                );
                sections.push(RawSection::broken(lineno));
                continue;
            }
            let name = trimmed[1..trimmed.len() - 1].trim().to_string();
            if name.is_empty() {
                err(lineno, "empty section name []".to_string());
                sections.push(RawSection::broken(lineno));
                continue;
            }
            if let Some(prev) = sections.iter().find(|s| s.name == name && s.name != BROKEN) {
                err(
                    lineno,
                    format!(
                        "duplicate section [{name}] (first defined on line {})",
                        prev.line
                    ),
                );
                // keep parsing its keys into a throwaway section so they are checked too
            }
            sections.push(RawSection {
                name,
                line: lineno,
                entries: Vec::new(),
            });
            continue;
        }
        let pos = match trimmed.find(['=', ':']) {
            Some(p) => p,
            None => {
                err(
                    lineno,
                    format!("expected `key = value`, `[section]` or a comment, found: {trimmed}"),
                );
                continue;
            }
        };
        let key = trimmed[..pos].trim().to_string();
        let value = trimmed[pos + 1..].trim().to_string();
        if key.is_empty() {
            err(lineno, format!("empty key name: {trimmed}"));
            continue;
        }
        let Some(sidx) = sections.len().checked_sub(1) else {
            err(lineno, format!("key `{key}` before any [section] header"));
            continue;
        };
        let section = &mut sections[sidx];
        if section.name == BROKEN {
            continue;
        }
        if let Some(prev) = section.get(&key) {
            let prev_line = prev.line;
            err(
                lineno,
                format!(
                    "[{}] duplicate key `{key}` (first set on line {prev_line})",
                    section.name
                ),
            );
            continue;
        }
        section.entries.push(RawEntry {
            key,
            value,
            line: lineno,
        });
        last_entry = Some((sidx, section.entries.len() - 1));
    }
    sections
}

// ---------------------------------------------------------------- values

/// `10`, `0.5` (seconds), or with a unit: `500ms`, `10s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (use e.g. 10, 0.5, 500ms, 10s, 5m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` is not a duration (must be ≥ 0)"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Ok(true),
        "0" | "no" | "false" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean (use yes or no)")),
    }
}

/// Split a comma-separated list, dropping empty items.
pub fn split_list(s: &str) -> Vec<String> {
    s.split([',', '\n'])
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Expand a leading `~/` (or `~`) with the local `$HOME`.
pub fn expand_home(s: &str) -> PathBuf {
    if s == "~" {
        return home_dir();
    }
    if let Some(rest) = s.strip_prefix("~/") {
        return home_dir().join(rest);
    }
    PathBuf::from(s)
}

pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn did_you_mean(key: &str, known: &[&str]) -> String {
    let lower = key.to_ascii_lowercase();
    let best = known
        .iter()
        .map(|k| (distance(&lower, k), *k))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= 3 || lower == *k => format!(" (did you mean `{k}`?)"),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- validation

struct Ctx<'a> {
    file: &'a Path,
    problems: &'a mut Vec<Problem>,
}

impl Ctx<'_> {
    fn err(&mut self, line: usize, msg: String) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            msg,
        });
    }
}

/// Key lookup in a route section with `[DEFAULT]` fallback.
struct Lookup<'a> {
    section: &'a RawSection,
    default: Option<&'a RawSection>,
}

impl<'a> Lookup<'a> {
    fn get(&self, key: &str) -> Option<&'a RawEntry> {
        self.section
            .get(key)
            .or_else(|| self.default.and_then(|d| d.get(key)))
    }
}

fn parse_or<T>(
    ctx: &mut Ctx<'_>,
    sect: &str,
    entry: Option<&RawEntry>,
    default: T,
    f: impl Fn(&str) -> Result<T, String>,
) -> T {
    match entry {
        None => default,
        Some(e) => match f(&e.value) {
            Ok(v) => v,
            Err(m) => {
                ctx.err(e.line, format!("[{sect}] {}: {m}", e.key));
                default
            }
        },
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{s}` is not a port number (1-65535)")),
    }
}

fn parse_count(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| format!("`{s}` is not a whole number ≥ 0"))
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number ≥ 1")),
    }
}

fn opt_string(e: Option<&RawEntry>) -> Option<String> {
    e.map(|e| e.value.clone()).filter(|v| !v.is_empty())
}

fn build_route(ctx: &mut Ctx<'_>, s: &RawSection, default: Option<&RawSection>) -> Option<Route> {
    let name = s.name.as_str();
    for e in &s.entries {
        if !ROUTE_KEYS.contains(&e.key.as_str()) {
            let hint = did_you_mean(&e.key, ROUTE_KEYS);
            ctx.err(e.line, format!("[{name}] unknown key `{}`{hint}", e.key));
        }
    }
    let regex = match Regex::new(&format!(r"\A(?:{name})")) {
        Ok(r) => Some(r),
        Err(e) => {
            let detail = e.to_string();
            let last = detail.lines().last().unwrap_or("").trim().to_string();
            ctx.err(
                s.line,
                format!("[{name}] section name is not a valid regular expression: {last}"),
            );
            None
        }
    };
    let l = Lookup {
        section: s,
        default,
    };
    let hosts = l
        .get("host")
        .map(|e| split_list(&e.value))
        .unwrap_or_default();
    if hosts.is_empty() {
        ctx.err(
            s.line,
            format!("[{name}] host: missing (every route needs at least one host)"),
        );
    }
    for h in &hosts {
        if h.contains(char::is_whitespace) || h.starts_with('-') || h.contains('@') {
            let line = l.get("host").map(|e| e.line).unwrap_or(s.line);
            ctx.err(
                line,
                format!("[{name}] host: `{h}` is not a host name or address"),
            );
        }
    }
    let port = parse_or(ctx, name, l.get("port"), 22, parse_port);
    let ftp_port = parse_or(ctx, name, l.get("ftp_port"), 21, parse_port);
    let transfer = parse_or(
        ctx,
        name,
        l.get("transfer"),
        vec![Transport::Scp, Transport::Ftp],
        |v| {
            let mut out = Vec::new();
            for t in split_list(v) {
                let t = match t.to_ascii_lowercase().as_str() {
                    "scp" | "ssh" => Transport::Scp,
                    "ftp" => Transport::Ftp,
                    _ => return Err(format!("unknown transport `{t}` (use scp, ftp)")),
                };
                if !out.contains(&t) {
                    out.push(t);
                }
            }
            if out.is_empty() {
                return Err("empty list (use scp, ftp)".into());
            }
            Ok(out)
        },
    );
    let ftps = parse_or(ctx, name, l.get("ftps"), Ftps::Off, |v| {
        match v.trim().to_ascii_lowercase().as_str() {
            "off" | "no" | "false" => Ok(Ftps::Off),
            "explicit" | "yes" | "on" => Ok(Ftps::Explicit),
            "implicit" => Ok(Ftps::Implicit),
            _ => Err(format!("`{v}` (use off, explicit, implicit)")),
        }
    });
    let ftp_passive = parse_or(ctx, name, l.get("ftp_mode"), true, |v| {
        match v.trim().to_ascii_lowercase().as_str() {
            "passive" => Ok(true),
            "active" => Ok(false),
            _ => Err(format!("`{v}` (use passive or active)")),
        }
    });
    let ftp_rename = parse_or(ctx, name, l.get("ftp_rename"), true, parse_bool);
    let verify = parse_or(ctx, name, l.get("verify"), Verify::Size, |v| {
        match v.trim().to_ascii_lowercase().as_str() {
            "size" => Ok(Verify::Size),
            "sha256" => Ok(Verify::Sha256),
            "none" | "off" | "no" => Ok(Verify::None),
            _ => Err(format!("`{v}` (use size, sha256, none)")),
        }
    });
    let host_key_check = parse_or(
        ctx,
        name,
        l.get("host_key_check"),
        HostKeyCheck::Strict,
        |v| match v.trim().to_ascii_lowercase().as_str() {
            "strict" | "yes" => Ok(HostKeyCheck::Strict),
            "accept-new" | "accept_new" => Ok(HostKeyCheck::AcceptNew),
            "off" | "no" => Ok(HostKeyCheck::Off),
            _ => Err(format!("`{v}` (use strict, accept-new, off)")),
        },
    );
    let secs = |n| Duration::from_secs(n);
    let connect_timeout = parse_or(
        ctx,
        name,
        l.get("connect_timeout"),
        secs(10),
        parse_duration,
    );
    let io_timeout = parse_or(ctx, name, l.get("io_timeout"), secs(60), parse_duration);
    let install_timeout = parse_or(
        ctx,
        name,
        l.get("install_timeout"),
        secs(600),
        parse_duration,
    );
    let retry_delay = parse_or(ctx, name, l.get("retry_delay"), secs(2), parse_duration);
    for (key, d) in [
        ("connect_timeout", connect_timeout),
        ("io_timeout", io_timeout),
    ] {
        if d.is_zero() {
            let line = l.get(key).map(|e| e.line).unwrap_or(s.line);
            ctx.err(line, format!("[{name}] {key}: must be more than 0"));
        }
    }
    let retries = parse_or(ctx, name, l.get("retries"), 3, parse_count);
    let dest_dir = opt_string(l.get("dest_dir")).unwrap_or_else(|| DEFAULT_DEST_DIR.to_string());
    if let Some(e) = l.get("dest_dir") {
        if let Err(m) = check_strftime(&e.value) {
            ctx.err(e.line, format!("[{name}] dest_dir: {m}"));
        }
    }
    let install_command = opt_string(l.get("install_command"));
    // placeholders must name something that exists
    if let Some(r) = &regex {
        let groups: Vec<&str> = r.capture_names().flatten().collect();
        for key in ["dest_dir", "install_command"] {
            if let Some(e) = l.get(key) {
                for ph in placeholders(&e.value) {
                    if !crate::route::BUILTIN_PLACEHOLDERS.contains(&ph.as_str())
                        && !groups.contains(&ph.as_str())
                    {
                        ctx.err(
                            e.line,
                            format!(
                                "[{name}] {key}: unknown placeholder {{{ph}}} (known: {}{}{})",
                                crate::route::BUILTIN_PLACEHOLDERS.join(", "),
                                if groups.is_empty() { "" } else { ", " },
                                groups.join(", ")
                            ),
                        );
                    }
                    if key == "dest_dir" && (ph == "file" || ph == "dir") {
                        ctx.err(
                            e.line,
                            format!("[{name}] dest_dir: {{{ph}}} cannot be used in dest_dir"),
                        );
                    }
                }
            }
        }
    }
    let regex = regex?;
    Some(Route {
        section: s.name.clone(),
        line: s.line,
        regex,
        hosts,
        port,
        ftp_port,
        login: opt_string(l.get("login")),
        password: l.get("password").map(|e| Secret::new(e.value.clone())),
        account: opt_string(l.get("account")),
        identity_file: opt_string(l.get("identity_file")).map(|v| expand_home(&v)),
        dest_dir,
        install_command,
        transfer,
        ftps,
        ftp_ca_file: opt_string(l.get("ftp_ca_file")).map(|v| expand_home(&v)),
        ftp_passive,
        ftp_rename,
        verify,
        host_key_check,
        known_hosts: opt_string(l.get("known_hosts"))
            .map(|v| expand_home(&v))
            .unwrap_or_else(|| home_dir().join(".ssh/known_hosts")),
        connect_timeout,
        io_timeout,
        install_timeout,
        retries,
        retry_delay,
    })
}

/// `{name}` placeholders in a template (`{{` and `}}` are literal braces).
pub fn placeholders(t: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = t.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '{' {
            if matches!(chars.peek(), Some((_, '{'))) {
                chars.next();
                continue;
            }
            if let Some(end) = t[i + 1..].find('}') {
                let name = &t[i + 1..i + 1 + end];
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

/// Reject strftime codes chrono does not know (it would panic while formatting).
fn check_strftime(t: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(t).any(|i| matches!(i, Item::Error)) {
        return Err(format!(
            "`{t}` has an invalid strftime code (escape a literal % as %%)"
        ));
    }
    Ok(())
}

fn build_settings(ctx: &mut Ctx<'_>, s: Option<&RawSection>) -> Settings {
    let empty = RawSection {
        name: "dispatch".into(),
        line: 0,
        entries: Vec::new(),
    };
    let s = s.unwrap_or(&empty);
    for e in &s.entries {
        if !SETTINGS_KEYS.contains(&e.key.as_str()) {
            let hint = did_you_mean(&e.key, SETTINGS_KEYS);
            ctx.err(e.line, format!("[dispatch] unknown key `{}`{hint}", e.key));
        }
    }
    let n = "dispatch";
    let secs = |n| Duration::from_secs(n);
    let after = parse_or(ctx, n, s.get("after"), After::Keep, |v| {
        let v = v.trim();
        if v == "keep" {
            Ok(After::Keep)
        } else if v == "delete" {
            Ok(After::Delete)
        } else if let Some(d) = v.strip_prefix("move:") {
            if d.trim().is_empty() {
                Err("move: needs a directory (move:/srv/done)".into())
            } else {
                Ok(After::Move(expand_home(d.trim())))
            }
        } else {
            Err(format!("`{v}` (use keep, delete, move:DIR)"))
        }
    });
    Settings {
        watch: s
            .get("watch")
            .map(|e| {
                split_list(&e.value)
                    .iter()
                    .map(|d| expand_home(d))
                    .collect()
            })
            .unwrap_or_default(),
        recursive: parse_or(ctx, n, s.get("recursive"), false, parse_bool),
        settle: parse_or(ctx, n, s.get("settle"), secs(2), parse_duration),
        rescan: parse_or(ctx, n, s.get("rescan"), secs(60), parse_duration),
        max_settle: parse_or(ctx, n, s.get("max_settle"), secs(3600), parse_duration),
        ignore: s
            .get("ignore")
            .map(|e| split_list(&e.value))
            .unwrap_or_else(|| {
                [".*", "*.part", "*.tmp", "*.swp", "*~"]
                    .iter()
                    .map(|x| x.to_string())
                    .collect()
            }),
        jobs: parse_or(ctx, n, s.get("jobs"), 8, parse_positive),
        max_sessions_per_host: parse_or(ctx, n, s.get("max_sessions_per_host"), 2, parse_positive),
        state_dir: opt_string(s.get("state_dir"))
            .map(|v| expand_home(&v))
            .unwrap_or_else(default_state_dir),
        after,
        spool_dir: opt_string(s.get("spool_dir")).map(|v| expand_home(&v)),
        log_config: opt_string(s.get("log_config")).map(|v| expand_home(&v)),
        max_attempts: parse_or(ctx, n, s.get("max_attempts"), 5, parse_positive) as u32,
    }
}

fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("dispatch"),
        _ => home_dir().join(".local/state/dispatch"),
    }
}

impl Config {
    /// Parse and validate config text. `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
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
            for e in &d.entries {
                if !ROUTE_KEYS.contains(&e.key.as_str()) {
                    let hint = did_you_mean(&e.key, ROUTE_KEYS);
                    ctx.err(e.line, format!("[DEFAULT] unknown key `{}`{hint}", e.key));
                }
            }
        }
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.line);
            return Err(ConfigError { problems });
        }
        let mut warnings = Vec::new();
        if routes.iter().any(|r| r.password.is_some()) {
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
        let text = String::from_utf8_lossy(&text);
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Config::parse(path, text)
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

    /// The first route (in file order) whose regex matches the base name.
    pub fn route_for(&self, base_name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.regex.is_match(base_name))
    }
}

pub fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.mode())
}

/// Named regex captures of a match, for placeholders.
pub fn captures(route: &Route, base_name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(c) = route.regex.captures(base_name) {
        for name in route.regex.capture_names().flatten() {
            if let Some(m) = c.name(name) {
                out.insert(name.to_string(), m.as_str().to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn match_is_anchored_at_start_only_and_first_wins() {
        let c = parse("[ibps]\nhost=a\n[ibps-1]\nhost=b\n[.*\\.zip$]\nhost=c\n").unwrap();
        assert_eq!(c.route_for("ibps-1.2.tar.gz").unwrap().hosts, ["a"]);
        assert_eq!(c.route_for("x.zip").unwrap().hosts, ["c"]);
        assert!(c.route_for("x-ibps.tar").is_none());
        let c = parse("[[ibps]]\nhost=a\n").unwrap();
        assert!(c.route_for("ibps-1.2.tar.gz").is_some());
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
        for k in ROUTE_KEYS.iter().chain(SETTINGS_KEYS) {
            assert!(text.contains(&format!("{k} =")), "{k} not documented");
        }
    }
}
