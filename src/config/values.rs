//! The value parsers the key table uses: durations and counts with their
//! ranges, booleans, ports, lists, `~` paths, the enumerations — and the
//! "did you mean" for an unknown key.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::{After, Ftps, HostKeyCheck, Transport, Verify};

/// A value that does not parse (e.g. `-j 0`); the message says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    pub msg: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for InvalidValue {}

impl From<String> for InvalidValue {
    fn from(msg: String) -> InvalidValue {
        InvalidValue { msg }
    }
}

/// No duration in a config is longer than this (a year): anything longer is a
/// typo, and much longer ones overflow the clock arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest `connect_timeout`, `io_timeout`, `install_timeout`, `rescan`, `max_settle`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `retry_delay` and `settle`.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Most `retries`; most `max_attempts`.
pub const MAX_RETRIES: u32 = 100;
/// `jobs` (and `-j`) and `max_sessions_per_host` ranges.
pub const JOBS: RangeInclusive<usize> = 1..=256;
pub const SESSIONS_PER_HOST: RangeInclusive<usize> = 1..=64;

/// `10`, `0.5` (seconds), or with a unit: `500ms`, `10s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, InvalidValue> {
    Ok(parse_duration_max(s, MAX_DURATION)?)
}

/// [`parse_duration`], refusing anything longer than `max` (before it is
/// converted, so no value overflows).
fn parse_duration_max(s: &str, max: Duration) -> Result<Duration, String> {
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
    let secs = v * mult;
    if secs > max.as_secs_f64() {
        return Err(format!(
            "`{s}` is too long (at most {})",
            show_duration(max)
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a duration"))
}

/// `168h (7 days)`, `1h`, `90s`: a limit, for messages, in units a config can use.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 && s.is_multiple_of(86400) {
        let days = s / 86400;
        format!(
            "{}h ({days} day{})",
            s / 3600,
            if days == 1 { "" } else { "s" }
        )
    } else if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// A duration in `0..=max` (or `(0, max]` with `positive`).
pub(super) fn duration_within(v: &str, positive: bool, max: Duration) -> Result<Duration, String> {
    let d = parse_duration_max(v, max)?;
    if positive && d.is_zero() {
        return Err(format!("`{}` must be more than 0", v.trim()));
    }
    Ok(d)
}

/// A whole number in `range`.
pub(super) fn count_within<T>(v: &str, range: RangeInclusive<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    match v.trim().parse::<T>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "`{}` is not a whole number from {} to {}",
            v.trim(),
            range.start(),
            range.end()
        )),
    }
}

/// `-j N` on the command line: the same range as `jobs`.
pub fn parse_jobs(v: &str) -> Result<usize, InvalidValue> {
    Ok(count_within(v, JOBS)?)
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Ok(true),
        "0" | "no" | "false" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean (use yes or no)")),
    }
}

pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{s}` is not a port number (1-65535)")),
    }
}

/// `scp, ftp`: the transports to try, in order, each once.
pub(super) fn parse_transfer(v: &str) -> Result<Vec<Transport>, String> {
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
}

pub(super) fn parse_ftps(v: &str) -> Result<Ftps, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Ftps::Auto),
        "off" | "no" | "false" => Ok(Ftps::Off),
        "explicit" | "yes" | "on" => Ok(Ftps::Explicit),
        "implicit" => Ok(Ftps::Implicit),
        _ => Err(format!("`{v}` (use auto, explicit, implicit, off)")),
    }
}

/// `ftp_mode`: passive (`true`) or active.
pub(super) fn parse_passive(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "passive" => Ok(true),
        "active" => Ok(false),
        _ => Err(format!("`{v}` (use passive or active)")),
    }
}

pub(super) fn parse_verify(v: &str) -> Result<Verify, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "size" => Ok(Verify::Size),
        "sha256" => Ok(Verify::Sha256),
        "none" | "off" | "no" => Ok(Verify::None),
        _ => Err(format!("`{v}` (use size, sha256, none)")),
    }
}

pub(super) fn parse_host_key_check(v: &str) -> Result<HostKeyCheck, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "strict" | "yes" => Ok(HostKeyCheck::Strict),
        "accept-new" | "accept_new" => Ok(HostKeyCheck::AcceptNew),
        "off" | "no" => Ok(HostKeyCheck::Off),
        _ => Err(format!("`{v}` (use strict, accept-new, off)")),
    }
}

pub(super) fn parse_after(v: &str) -> Result<After, String> {
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
}

/// Reject strftime codes chrono does not know (it would panic while formatting).
pub(super) fn check_strftime(t: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(t).any(|i| matches!(i, Item::Error)) {
        return Err(format!(
            "`{t}` has an invalid strftime code (escape a literal % as %%)"
        ));
    }
    Ok(())
}

/// The value, or `None` when it is empty.
pub(super) fn non_empty(v: &str) -> Option<String> {
    Some(v.to_string()).filter(|v| !v.is_empty())
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
pub fn distance(a: &str, b: &str) -> usize {
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

/// ` (did you mean `host`?)` for a key close to a known one, else nothing.
pub(super) fn did_you_mean<'k>(key: &str, known: impl IntoIterator<Item = &'k str>) -> String {
    let lower = key.to_ascii_lowercase();
    let best = known
        .into_iter()
        .map(|k| (distance(&lower, k), k))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= 3 || lower == k => format!(" (did you mean `{k}`?)"),
        _ => String::new(),
    }
}

/// `3` or `25%`.
pub(super) fn parse_host_count(v: &str) -> Result<super::HostCount, String> {
    let v = v.trim();
    if let Some(p) = v.strip_suffix('%') {
        return match p.trim().parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(super::HostCount::Percent(p)),
            _ => Err(format!("`{v}` is not a percentage (1%-100%)")),
        };
    }
    match v.parse::<usize>() {
        Ok(n) => Ok(super::HostCount::Hosts(n)),
        _ => Err(format!(
            "`{v}` is not a number of hosts or a percentage (3, 25%)"
        )),
    }
}

/// `parallel`, `serial`, `batch:N`, `batch:N%`, `canary:LIST`.
pub(super) fn parse_strategy(v: &str) -> Result<super::Strategy, String> {
    use super::{HostCount, Strategy};
    let v = v.trim();
    let (kind, arg) = v.split_once(':').unwrap_or((v, ""));
    let usage = "use parallel, serial, batch:N, batch:N% or canary:LIST (e.g. canary:1,25%,100%)";
    match (kind.trim().to_ascii_lowercase().as_str(), arg.trim()) {
        ("parallel", "") => Ok(Strategy::Parallel),
        ("serial", "") => Ok(Strategy::Serial),
        ("batch", a) if !a.is_empty() => match parse_host_count(a)? {
            HostCount::Hosts(0) => Err(format!("`{v}`: a batch of 0 hosts never ends")),
            c => Ok(Strategy::Batch(c)),
        },
        ("canary", a) if !a.is_empty() => {
            let mut sizes = Vec::new();
            for part in a.split(',') {
                match parse_host_count(part)? {
                    HostCount::Hosts(0) => return Err(format!("`{v}`: a wave of 0 hosts")),
                    c => sizes.push(c),
                }
            }
            Ok(Strategy::Canary(sizes))
        }
        _ => Err(format!("`{v}`: {usage}")),
    }
}
