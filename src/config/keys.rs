//! The key table: every config key declared once — its name, its default,
//! a line of help and the parser that checks its value and sets its field.
//! Building a [`Route`] or the [`Settings`] walks the table; so do the
//! unknown-key check ("did you mean") and the test that
//! `dispatch.example.ini` documents every key with its default.

use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

use super::ini::{RawEntry, RawSection};
use super::values::{
    check_strftime, count_within, did_you_mean, duration_within, expand_home, non_empty,
    parse_after, parse_bool, parse_ftps, parse_host_count, parse_host_key_check, parse_passive,
    parse_port, parse_strategy, parse_transfer, parse_verify, show_duration, split_list, JOBS,
    MAX_DELAY, MAX_RETRIES, MAX_TIMEOUT, SESSIONS_PER_HOST,
};
use super::{After, Ftps, HostKeyCheck, Problem, Route, Secret, Settings, Strategy, Verify};
use crate::template::{check_placeholder_quoting, placeholders, Unquotable, BUILTIN_PLACEHOLDERS};
use KeyDefault::{Computed, Required, Text, Unset};

pub const DEFAULT_DEST_DIR: &str = "~/newcx/%Y%m%d_%H%M%S";
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:8377";
const DEFAULT_KNOWN_HOSTS: &str = "~/.ssh/known_hosts";
/// `state_dir` when `$XDG_STATE_HOME` is not set.
const DEFAULT_STATE_DIR: &str = "~/.local/state/dispatch";

/// A key's value when the file does not set it (or sets it to something
/// that does not parse: the problem is reported, the default stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDefault {
    /// This text, read as if the file said `key = text` (and
    /// `dispatch.example.ini` says exactly that).
    Text(&'static str),
    /// Not set: off, empty or left to something else (ssh-agent, ~/.netrc).
    Unset,
    /// None: the key must be set (every route needs a `host`).
    Required,
    /// Worked out when the file is loaded; this is what it usually is.
    Computed(&'static str),
}

/// One config key.
pub struct Key<T> {
    pub name: &'static str,
    pub default: KeyDefault,
    pub help: &'static str,
    /// Checks a value and sets the key's field of `T`.
    set: Setter<T>,
}

type Setter<T> = fn(&mut T, &str, &Scope) -> Result<(), Bad>;

/// What a value is checked against besides its own text.
#[derive(Default)]
pub(super) struct Scope {
    /// The named groups of the section's regex; `None` when there is no
    /// usable regex (then placeholders are not checked against it).
    groups: Option<Vec<String>>,
}

/// A value's problems (a key may find more than one, e.g. two bad hosts).
pub(super) struct Bad(Vec<String>);

impl From<String> for Bad {
    fn from(msg: String) -> Bad {
        Bad(vec![msg])
    }
}

/// A `~` path, or `None` when empty.
fn opt_path(v: &str) -> Result<Option<PathBuf>, String> {
    Ok(non_empty(v).map(|v| expand_home(&v)))
}

/// `connect_timeout`, `io_timeout`, `install_timeout`: more than 0, at most a week.
fn timeout(v: &str) -> Result<Duration, String> {
    duration_within(v, true, MAX_TIMEOUT)
}

/// `*slot = parsed`: for the table's one-line setters.
fn put<T>(slot: &mut T, parsed: Result<T, String>) -> Result<(), Bad> {
    *slot = parsed?;
    Ok(())
}

/// Keys allowed in a route section (and in `[DEFAULT]`), in the order
/// "did you mean" prefers them.
pub const ROUTE_KEYS: &[Key<Route>] = &[
    Key {
        name: "host",
        default: Required,
        help: "Hosts to send to (comma-separated); every route needs one.",
        set: set_hosts,
    },
    Key {
        name: "port",
        default: Text("22"),
        help: "SSH port.",
        set: |r, v, _| put(&mut r.port, parse_port(v)),
    },
    Key {
        name: "ftp_port",
        default: Text("21"),
        help: "FTP port.",
        set: |r, v, _| put(&mut r.ftp_port, parse_port(v)),
    },
    Key {
        name: "login",
        default: Unset,
        help: "Login; else ~/.netrc for the host; else the local user.",
        set: |r, v, _| put(&mut r.login, Ok(non_empty(v))),
    },
    Key {
        name: "password",
        default: Unset,
        help: "Password; else ~/.netrc for the host; else ssh-agent and keys.",
        set: |r, v, _| put(&mut r.password, Ok(Some(Secret::new(v)))),
    },
    Key {
        name: "account",
        default: Unset,
        help: "FTP account (ACCT).",
        set: |r, v, _| put(&mut r.account, Ok(non_empty(v))),
    },
    Key {
        name: "identity_file",
        default: Unset,
        help: "Private key (must exist); else ssh-agent, then ~/.ssh/id_*.",
        set: set_identity_file,
    },
    Key {
        name: "dest_dir",
        default: Text(DEFAULT_DEST_DIR),
        help: "Remote directory: strftime codes and {placeholders}; ~ is the login's home.",
        set: set_dest_dir,
    },
    Key {
        name: "install_command",
        default: Unset,
        help: "Run over SSH after upload; placeholders are shell-quoted. Unset: upload only.",
        set: set_install_command,
    },
    Key {
        name: "transfer",
        default: Text("scp, ftp"),
        help: "Transports to try, in order.",
        set: |r, v, _| put(&mut r.transfer, parse_transfer(v)),
    },
    Key {
        name: "ftps",
        default: Text("auto"),
        help: "FTPS: auto, explicit, implicit, off.",
        set: |r, v, _| put(&mut r.ftps, parse_ftps(v)),
    },
    Key {
        name: "ftp_ca_file",
        default: Unset,
        help: "PEM file of the CA of the FTP server's certificate; else the system's.",
        set: |r, v, _| put(&mut r.ftp_ca_file, opt_path(v)),
    },
    Key {
        name: "ftp_mode",
        default: Text("passive"),
        help: "FTP data connections: passive or active.",
        set: |r, v, _| put(&mut r.ftp_passive, parse_passive(v)),
    },
    Key {
        name: "ftp_rename",
        default: Text("yes"),
        help: "Upload under a temporary name and rename it into place.",
        set: |r, v, _| put(&mut r.ftp_rename, parse_bool(v)),
    },
    Key {
        name: "ftp_cleartext",
        default: Text("no"),
        help: "Allow plain FTP (password and file unencrypted).",
        set: |r, v, _| put(&mut r.ftp_cleartext, parse_bool(v)),
    },
    Key {
        name: "stream",
        default: Text("yes"),
        help: "SSH: send files back to back and read the replies as they come (no round trip per file).",
        set: |r, v, _| put(&mut r.stream, parse_bool(v)),
    },
    Key {
        name: "verify",
        default: Text("size"),
        help: "After upload: size, sha256, none.",
        set: |r, v, _| put(&mut r.verify, parse_verify(v)),
    },
    Key {
        name: "host_key_check",
        default: Text("strict"),
        help: "SSH host keys: strict, accept-new, off.",
        set: |r, v, _| put(&mut r.host_key_check, parse_host_key_check(v)),
    },
    Key {
        name: "known_hosts",
        default: Text(DEFAULT_KNOWN_HOSTS),
        help: "The known_hosts file.",
        set: |r, v, _| {
            let v = non_empty(v).unwrap_or_else(|| DEFAULT_KNOWN_HOSTS.to_string());
            put(&mut r.known_hosts, Ok(expand_home(&v)))
        },
    },
    Key {
        name: "connect_timeout",
        default: Text("10s"),
        help: "Connecting: more than 0, at most 168h.",
        set: |r, v, _| put(&mut r.connect_timeout, timeout(v)),
    },
    Key {
        name: "io_timeout",
        default: Text("60s"),
        help: "No progress for this long = stalled: more than 0, at most 168h.",
        set: |r, v, _| put(&mut r.io_timeout, timeout(v)),
    },
    Key {
        name: "install_timeout",
        default: Text("10m"),
        help: "The install command is killed after this long: more than 0, at most 168h.",
        set: |r, v, _| put(&mut r.install_timeout, timeout(v)),
    },
    Key {
        name: "retries",
        default: Text("3"),
        help: "Retries of a transient failure, 0-100.",
        set: |r, v, _| put(&mut r.retries, count_within(v, 0..=MAX_RETRIES)),
    },
    Key {
        name: "retry_delay",
        default: Text("2s"),
        help: "First delay before a retry (then doubled), at most 1h.",
        set: |r, v, _| put(&mut r.retry_delay, duration_within(v, false, MAX_DELAY)),
    },
    Key {
        name: "strategy",
        default: Text("parallel"),
        help: "Rollout: parallel, serial, batch:N, batch:N%, canary:LIST (cumulative, e.g. 1,25%,100%).",
        set: |r, v, _| put(&mut r.strategy, parse_strategy(v)),
    },
    Key {
        name: "max_failures",
        default: Unset,
        help: "Rollout: host failures (N or N% of the hosts) it goes on after; one more stops it.",
        set: |r, v, _| put(&mut r.max_failures, parse_host_count(v).map(Some)),
    },
    Key {
        name: "pre_local",
        default: Unset,
        help: "Rollout: run here before a host is touched (drain it); {host}, {section}.",
        set: |r, v, s| set_hook(&mut r.pre_local, "pre_local", v, s),
    },
    Key {
        name: "post_local",
        default: Unset,
        help: "Rollout: run here once the host is done and healthy (undrain it).",
        set: |r, v, s| set_hook(&mut r.post_local, "post_local", v, s),
    },
    Key {
        name: "pre_remote",
        default: Unset,
        help: "Rollout: run on the host before its files (stop the service).",
        set: |r, v, s| set_hook(&mut r.pre_remote, "pre_remote", v, s),
    },
    Key {
        name: "post_remote",
        default: Unset,
        help: "Rollout: run on the host after its files are installed (start the service).",
        set: |r, v, s| set_hook(&mut r.post_remote, "post_remote", v, s),
    },
    Key {
        name: "hook_timeout",
        default: Text("60s"),
        help: "Each pre_/post_ hook's deadline.",
        set: |r, v, _| put(&mut r.hook_timeout, timeout(v)),
    },
    Key {
        name: "health_check",
        default: Unset,
        help: "Rollout: run here until it succeeds, after a host's files (curl -fsS http://{host}:8080/health).",
        set: |r, v, s| set_hook(&mut r.health_check, "health_check", v, s),
    },
    Key {
        name: "health_remote",
        default: Unset,
        help: "Rollout: a health check run on the host instead.",
        set: |r, v, s| set_hook(&mut r.health_remote, "health_remote", v, s),
    },
    Key {
        name: "health_timeout",
        default: Text("60s"),
        help: "One deadline for a host's health check to pass, however many tries.",
        set: |r, v, _| put(&mut r.health_timeout, timeout(v)),
    },
    Key {
        name: "health_interval",
        default: Text("2s"),
        help: "Between two health check tries.",
        set: |r, v, _| put(&mut r.health_interval, duration_within(v, false, MAX_DELAY)),
    },
    Key {
        name: "current",
        default: Unset,
        help: "Releases: a symlink on the host pointed at each good release dir (~/app/current).",
        set: |r, v, _| put(&mut r.current, parse_current(v)),
    },
    Key {
        name: "activate_command",
        default: Unset,
        help: "Releases: run on the host after current was switched (restart the service).",
        set: |r, v, s| set_hook(&mut r.activate_command, "activate_command", v, s),
    },
    Key {
        name: "keep_releases",
        default: Unset,
        help: "Releases: successful releases kept per host, 1-100 (never the current or the previous one).",
        set: |r, v, _| put(&mut r.keep_releases, count_within(v, 1..=MAX_RETRIES).map(Some)),
    },
    Key {
        name: "lock_ttl",
        default: Text("10m"),
        help: "Rollout: the host lock expires this long after its last renewal (it is renewed while held).",
        set: |r, v, _| put(&mut r.lock_ttl, duration_within(v, true, MAX_TIMEOUT)),
    },
    Key {
        name: "lock_wait",
        default: Text("0"),
        help: "Rollout: how long to wait for a host locked by another dispatcher (0: fail at once, naming it).",
        set: |r, v, _| put(&mut r.lock_wait, duration_within(v, false, MAX_TIMEOUT)),
    },
    Key {
        name: "health_passes",
        default: Text("1"),
        help: "Consecutive passing tries a host needs, 1-100.",
        set: |r, v, _| put(&mut r.health_passes, count_within(v, 1..=MAX_RETRIES)),
    },
];

/// `current`: an absolute or `~/` path.
fn parse_current(v: &str) -> Result<Option<String>, String> {
    let v = v.trim().trim_end_matches('/');
    if v.is_empty() {
        return Ok(None);
    }
    if !(v.starts_with('/') || v.starts_with("~/")) || v.contains('\n') {
        return Err(format!("`{v}` is not an absolute or ~/ path"));
    }
    Ok(Some(v.to_string()))
}

/// What a host-level hook (`pre_local`, `health_check`, …) may name: the
/// host and the section (it runs once per host, not per file).
pub const HOOK_PLACEHOLDERS: &[&str] = &["host", "section"];

fn set_hook(slot: &mut Option<String>, key: &str, v: &str, _: &Scope) -> Result<(), Bad> {
    *slot = non_empty(v);
    let mut bad = Vec::new();
    if let Err(u) = check_placeholder_quoting(v, HOOK_PLACEHOLDERS) {
        bad.push(unquotable_message(&u, v, HOOK_PLACEHOLDERS, key));
    }
    for ph in placeholders(v) {
        if !HOOK_PLACEHOLDERS.contains(&ph.as_str()) {
            bad.push(format!(
                "{key}: unknown placeholder {{{ph}}} (a hook runs once per host: {})",
                HOOK_PLACEHOLDERS.join(", ")
            ));
        }
    }
    done(bad)
}

/// Keys allowed in `[dispatch]`, in the order "did you mean" prefers them.
pub const SETTINGS_KEYS: &[Key<Settings>] = &[
    Key {
        name: "watch",
        default: Unset,
        help: "Drop directories for `dispatch watch` (comma-separated).",
        set: |s, v, _| {
            let dirs = split_list(v).iter().map(|d| expand_home(d)).collect();
            put(&mut s.watch, Ok(dirs))
        },
    },
    Key {
        name: "recursive",
        default: Text("no"),
        help: "Watch subdirectories too.",
        set: |s, v, _| put(&mut s.recursive, parse_bool(v)),
    },
    Key {
        name: "settle",
        default: Text("2s"),
        help: "A file is sent once it held still this long: more than 0, at most 1h.",
        set: |s, v, _| put(&mut s.settle, duration_within(v, true, MAX_DELAY)),
    },
    Key {
        name: "rescan",
        default: Text("60s"),
        help: "Full rescan of the drop dirs; 0 = none; at most 168h.",
        set: |s, v, _| put(&mut s.rescan, duration_within(v, false, MAX_TIMEOUT)),
    },
    Key {
        name: "max_settle",
        default: Text("1h"),
        help: "A file still changing after this long is reported, not sent: at least settle, at most 168h.",
        set: |s, v, _| put(&mut s.max_settle, duration_within(v, true, MAX_TIMEOUT)),
    },
    Key {
        name: "ignore",
        default: Text(".*, *.part, *.tmp, *.swp, *~"),
        help: "Base names never touched (glob patterns).",
        set: |s, v, _| put(&mut s.ignore, Ok(split_list(v))),
    },
    Key {
        name: "jobs",
        default: Text("8"),
        help: "Worker threads, 1-256 (also -j N).",
        set: |s, v, _| put(&mut s.jobs, count_within(v, JOBS)),
    },
    Key {
        name: "max_sessions_per_host",
        default: Text("2"),
        help: "SSH sessions to one host at a time, 1-64.",
        set: |s, v, _| {
            let n = count_within(v, SESSIONS_PER_HOST);
            put(&mut s.max_sessions_per_host, n)
        },
    },
    Key {
        name: "state_dir",
        default: Computed(DEFAULT_STATE_DIR),
        help: "Journal (SQLite) location; default $XDG_STATE_HOME/dispatch.",
        set: |s, v, _| {
            let dir = opt_path(v)?.unwrap_or_else(default_state_dir);
            put(&mut s.state_dir, Ok(dir))
        },
    },
    Key {
        name: "after",
        default: Text("keep"),
        help: "A watched file once every host succeeded: keep, delete, move:DIR.",
        set: |s, v, _| put(&mut s.after, parse_after(v)),
    },
    Key {
        name: "spool_dir",
        default: Unset,
        help: "Where hooks hand packages to the daemon; unset: hooks dispatch in the foreground.",
        set: |s, v, _| put(&mut s.spool_dir, opt_path(v)),
    },
    Key {
        name: "log_config",
        default: Unset,
        help: "log4rs YAML config; unset: stderr.",
        set: |s, v, _| put(&mut s.log_config, opt_path(v)),
    },
    Key {
        name: "max_attempts",
        default: Text("5"),
        help: "Daemon: attempts per file × host before it is parked, 1-100.",
        set: |s, v, _| put(&mut s.max_attempts, count_within(v, 1..=MAX_RETRIES)),
    },
    Key {
        name: "status_listen",
        default: Text(DEFAULT_STATUS_LISTEN),
        help: "Daemon: the status page, API and metrics (ADDRESS:PORT), or off.",
        set: |s, v, _| put(&mut s.status_listen, parse_listen(v)),
    },
    Key {
        name: "notify_command",
        default: Unset,
        help: "Daemon: a local shell command run for each notification, the event as JSON on its stdin.",
        set: |s, v, _| put(&mut s.notify_command, Ok(non_empty(v))),
    },
    Key {
        name: "notify_url",
        default: Unset,
        help: "Daemon: a webhook (http:// or https://) each notification is POSTed to as JSON.",
        set: |s, v, _| put(&mut s.notify_url, parse_url(v)),
    },
    Key {
        name: "notify_secret",
        default: Unset,
        help: "Signs each webhook body: X-Dispatch-Signature: sha256=HMAC-SHA256(secret, body) in hex.",
        set: |s, v, _| put(&mut s.notify_secret, Ok(non_empty(v).map(Secret::new))),
    },
    Key {
        name: "notify_on",
        default: Text("failure"),
        help: "Daemon: what is notified: failure (parked, unroutable, failed reload) or all (also every success).",
        set: |s, v, _| put(&mut s.notify_all, parse_notify_on(v)),
    },
    Key {
        name: "status_token",
        default: Unset,
        help: "Bearer token the status server asks for; needed to listen on anything but loopback.",
        set: |s, v, _| put(&mut s.status_token, Ok(non_empty(v).map(Secret::new))),
    },
];

fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("dispatch"),
        _ => expand_home(DEFAULT_STATE_DIR),
    }
}

// ---------------------------------------------------------------- setters

fn set_hosts(r: &mut Route, v: &str, _: &Scope) -> Result<(), Bad> {
    r.hosts = split_list(v);
    done(
        r.hosts
            .iter()
            .filter(|h| h.contains(char::is_whitespace) || h.starts_with('-') || h.contains('@'))
            .map(|h| format!("`{h}` is not a host name or address"))
            .collect(),
    )
}

fn set_identity_file(r: &mut Route, v: &str, _: &Scope) -> Result<(), Bad> {
    r.identity_file = opt_path(v)?;
    let Some(path) = &r.identity_file else {
        return Ok(());
    };
    let why = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => "is a directory".to_string(),
        Ok(_) => return Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(err) => format!("cannot be read: {err}"),
    };
    Err(Bad::from(format!(
        "{} {why} (give the private key's path, or remove the key to use ssh-agent and ~/.ssh/id_*)",
        path.display()
    )))
}

fn set_dest_dir(r: &mut Route, v: &str, scope: &Scope) -> Result<(), Bad> {
    r.dest_dir = non_empty(v).unwrap_or_else(|| DEFAULT_DEST_DIR.to_string());
    let mut bad = Vec::new();
    if let Err(m) = check_strftime(v) {
        bad.push(m);
    }
    bad.extend(unknown_placeholders("dest_dir", v, scope));
    done(bad)
}

fn set_install_command(r: &mut Route, v: &str, scope: &Scope) -> Result<(), Bad> {
    r.install_command = non_empty(v);
    let mut bad = Vec::new();
    let names: Vec<&str> = BUILTIN_PLACEHOLDERS
        .iter()
        .copied()
        .chain(scope.groups.iter().flatten().map(String::as_str))
        .collect();
    if let Err(u) = check_placeholder_quoting(v, &names) {
        bad.push(unquotable_message(&u, v, &names, "install_command"));
    }
    bad.extend(unknown_placeholders("install_command", v, scope));
    done(bad)
}

/// `Ok` when nothing was found.
fn done(bad: Vec<String>) -> Result<(), Bad> {
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Bad(bad))
    }
}

/// Placeholders must name something that exists (and `{file}`/`{dir}` do
/// not exist yet in `dest_dir`).
fn unknown_placeholders(key: &str, v: &str, scope: &Scope) -> Vec<String> {
    let Some(groups) = &scope.groups else {
        return Vec::new();
    };
    let mut bad = Vec::new();
    for ph in placeholders(v) {
        if !BUILTIN_PLACEHOLDERS.contains(&ph.as_str()) && !groups.contains(&ph) {
            bad.push(format!(
                "unknown placeholder {{{ph}}} (known: {}{}{})",
                BUILTIN_PLACEHOLDERS.join(", "),
                if groups.is_empty() { "" } else { ", " },
                groups.join(", ")
            ));
        }
        if key == "dest_dir" && (ph == "file" || ph == "dir") {
            bad.push(format!("{{{ph}}} cannot be used in dest_dir"));
        }
    }
    bad
}

/// The message for a placeholder [`check_placeholder_quoting`] refused, with
/// the template to write instead when the fix is mechanical.
fn unquotable_message(u: &Unquotable, template: &str, names: &[&str], key: &str) -> String {
    let mut msg = format!(
        "{{{}}} {}: the shell quoting of its value does not hold there, so a file name could run code on the host",
        u.placeholder, u.place
    );
    // apply the mechanical fixes one after the other: one per placeholder
    let mut fixed = None;
    let mut next = u.fix.clone();
    for _ in 0..64 {
        let Some(f) = next.take() else { break };
        match check_placeholder_quoting(&f, names) {
            Ok(()) => {
                fixed = Some(f);
                break;
            }
            Err(u2) => next = u2.fix,
        }
    }
    match fixed {
        Some(f) if f != template => {
            msg.push_str(&format!(
                "; close the quotes around it: {key} = {f}"
            ));
        }
        _ => msg.push_str(
            "; use placeholders only in plain unquoted text, where they are quoted for you (tar xzf {name}; echo \"installing \"{name}), and write a literal brace as {{ or }}",
        ),
    }
    msg
}

// ---------------------------------------------------------------- walking the table

/// Where problems go.
pub(super) struct Ctx<'a> {
    pub(super) file: &'a std::path::Path,
    pub(super) problems: &'a mut Vec<Problem>,
}

impl Ctx<'_> {
    pub(super) fn err(&mut self, line: usize, msg: String) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            msg,
        });
    }
}

/// Every key of `section` that is not in `keys`, reported as `[label] unknown key`.
pub(super) fn unknown_keys<T>(
    ctx: &mut Ctx<'_>,
    keys: &[Key<T>],
    section: &RawSection,
    label: &str,
) {
    for e in &section.entries {
        if !keys.iter().any(|k| k.name == e.key) {
            let hint = did_you_mean(&e.key, keys.iter().map(|k| k.name));
            ctx.err(e.line, format!("[{label}] unknown key `{}`{hint}", e.key));
        }
    }
}

/// Set every key of `target`: its default, then the value `lookup` finds,
/// reporting a bad one as `[label] key: …` at its line (the default stays).
fn apply<'s, T>(
    ctx: &mut Ctx<'_>,
    keys: &[Key<T>],
    target: &mut T,
    label: &str,
    lookup: impl Fn(&str) -> Option<&'s RawEntry>,
    scope: &Scope,
) {
    for key in keys {
        if let Text(v) = key.default {
            // a default always parses (see the tests)
            let _ = (key.set)(target, v, scope);
        }
        let Some(e) = lookup(key.name) else { continue };
        if let Err(Bad(msgs)) = (key.set)(target, &e.value, scope) {
            for m in msgs {
                ctx.err(e.line, format!("[{label}] {}: {m}", e.key));
            }
        }
    }
}

/// A route section (keys it lacks come from `[DEFAULT]`), or `None` when
/// its name is not a regular expression.
pub(super) fn build_route(
    ctx: &mut Ctx<'_>,
    s: &RawSection,
    default: Option<&RawSection>,
) -> Option<Route> {
    let name = s.name.as_str();
    unknown_keys(ctx, ROUTE_KEYS, s, name);
    let regex = section_regex(ctx, s);
    let scope = Scope {
        groups: regex
            .as_ref()
            .map(|r| r.capture_names().flatten().map(str::to_string).collect()),
    };
    // an invalid section still has its keys checked
    let any_regex = regex.clone().or_else(|| Regex::new("").ok())?;
    let mut route = unset_route(s, any_regex);
    let lookup = |key: &str| s.get(key).or_else(|| default.and_then(|d| d.get(key)));
    apply(ctx, ROUTE_KEYS, &mut route, name, lookup, &scope);
    // `host` is `Required`
    if route.hosts.is_empty() {
        ctx.err(
            s.line,
            format!("[{name}] host: missing (every route needs at least one host)"),
        );
    }
    regex.map(|_| route)
}

/// `\A(?:name)`: anchored at the start only, like Python's `re.match`.
fn section_regex(ctx: &mut Ctx<'_>, s: &RawSection) -> Option<Regex> {
    match Regex::new(&format!(r"\A(?:{})", s.name)) {
        Ok(r) => Some(r),
        Err(e) => {
            let detail = e.to_string();
            let last = detail.lines().last().unwrap_or("").trim().to_string();
            ctx.err(
                s.line,
                format!(
                    "[{}] section name is not a valid regular expression: {last}",
                    s.name
                ),
            );
            None
        }
    }
}

/// A route before the table is applied: what a key not set and without a
/// [`KeyDefault::Text`] means (the others are overwritten by their default).
fn unset_route(s: &RawSection, regex: Regex) -> Route {
    let zero = Duration::ZERO;
    Route {
        section: s.name.clone(),
        line: s.line,
        regex,
        hosts: Vec::new(),
        port: 0,
        ftp_port: 0,
        login: None,
        password: None,
        account: None,
        identity_file: None,
        dest_dir: String::new(),
        install_command: None,
        transfer: Vec::new(),
        ftps: Ftps::Auto,
        ftp_ca_file: None,
        ftp_passive: true,
        ftp_rename: true,
        ftp_cleartext: false,
        stream: true,
        verify: Verify::Size,
        host_key_check: HostKeyCheck::Strict,
        known_hosts: PathBuf::new(),
        connect_timeout: zero,
        io_timeout: zero,
        install_timeout: zero,
        retries: 0,
        retry_delay: zero,
        strategy: Strategy::Parallel,
        max_failures: None,
        pre_local: None,
        post_local: None,
        pre_remote: None,
        post_remote: None,
        hook_timeout: zero,
        health_check: None,
        health_remote: None,
        health_timeout: zero,
        health_interval: zero,
        health_passes: 1,
        current: None,
        activate_command: None,
        keep_releases: None,
        lock_ttl: zero,
        lock_wait: zero,
    }
}

/// The `[dispatch]` section (all defaults when there is none).
pub(super) fn build_settings(ctx: &mut Ctx<'_>, s: Option<&RawSection>) -> Settings {
    let label = "dispatch";
    if let Some(s) = s {
        unknown_keys(ctx, SETTINGS_KEYS, s, label);
    }
    let mut settings = unset_settings();
    let lookup = |key: &str| s.and_then(|s| s.get(key));
    apply(
        ctx,
        SETTINGS_KEYS,
        &mut settings,
        label,
        lookup,
        &Scope::default(),
    );
    if let Some(e) = lookup("max_settle").or(lookup("settle")) {
        if settings.max_settle < settings.settle {
            ctx.err(
                e.line,
                format!(
                    "[dispatch] max_settle: must be at least settle ({} < {}): no file written in place would ever be sent",
                    show_duration(settings.max_settle),
                    show_duration(settings.settle)
                ),
            );
        }
    }
    status_needs_token(ctx, &settings, lookup("status_listen"));
    settings
}

/// `notify_url`: empty, or an http(s) URL.
fn parse_url(v: &str) -> Result<Option<String>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(|| format!("`{v}` is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || v.chars().any(char::is_whitespace) {
        return Err(format!("`{v}` has no host"));
    }
    Ok(Some(v.to_string()))
}

/// `notify_on`: true for `all`.
fn parse_notify_on(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "failure" | "failures" => Ok(false),
        "all" => Ok(true),
        _ => Err(format!("`{v}` is not failure or all")),
    }
}

/// `off`, or an address to listen on.
fn parse_listen(v: &str) -> Result<Option<std::net::SocketAddr>, String> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|_| {
        format!("`{v}` is not ADDRESS:PORT (127.0.0.1:8377, [::1]:8377, 0.0.0.0:8377) or off")
    })
}

/// Listening on anything but loopback needs `status_token`.
fn status_needs_token(ctx: &mut Ctx<'_>, s: &Settings, entry: Option<&RawEntry>) {
    let (Some(addr), Some(e)) = (s.status_listen, entry) else {
        return;
    };
    if !addr.ip().is_loopback() && s.status_token.is_none() {
        ctx.err(
            e.line,
            format!(
                "[dispatch] status_listen: {addr} is not loopback: set status_token too (anyone who can reach it would see every file and host)"
            ),
        );
    }
}

/// Settings before the table is applied (see [`unset_route`]).
fn unset_settings() -> Settings {
    let zero = Duration::ZERO;
    Settings {
        watch: Vec::new(),
        recursive: false,
        settle: zero,
        rescan: zero,
        max_settle: zero,
        ignore: Vec::new(),
        jobs: 0,
        max_sessions_per_host: 0,
        state_dir: default_state_dir(),
        after: After::Keep,
        spool_dir: None,
        log_config: None,
        max_attempts: 0,
        status_listen: None,
        status_token: None,
        notify_command: None,
        notify_url: None,
        notify_secret: None,
        notify_all: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Every `Text` default parses with its own key's parser (so `apply`
    /// may ignore the result), and a value the parser refuses is refused.
    #[test]
    fn every_default_in_the_key_table_is_a_valid_value() {
        let c = Config::parse(std::path::Path::new("t.ini"), "[x]\nhost = h\n").unwrap();
        let (mut r, mut s) = (c.routes[0].clone(), c.settings);
        let scope = Scope {
            groups: Some(Vec::new()),
        };
        for k in ROUTE_KEYS {
            if let Text(d) = k.default {
                assert!((k.set)(&mut r, d, &scope).is_ok(), "{}: {d}", k.name);
            }
        }
        for k in SETTINGS_KEYS {
            if let Text(d) = k.default {
                assert!((k.set)(&mut s, d, &scope).is_ok(), "{}: {d}", k.name);
            }
        }
        let port = ROUTE_KEYS.iter().find(|k| k.name == "port").unwrap();
        assert!((port.set)(&mut r, "0", &scope).is_err());
    }

    #[test]
    fn each_key_is_declared_once() {
        fn unique(mut names: Vec<&str>) -> bool {
            let n = names.len();
            names.sort();
            names.dedup();
            names.len() == n
        }
        assert!(unique(ROUTE_KEYS.iter().map(|k| k.name).collect()));
        assert!(unique(SETTINGS_KEYS.iter().map(|k| k.name).collect()));
    }
}
