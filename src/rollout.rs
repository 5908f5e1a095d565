//! Rollouts: what happens around a host's deliveries when its route has a
//! `strategy` other than parallel, hooks or a health check. The waves come
//! from [`Strategy::waves`](crate::config::Strategy::waves); the executor
//! ([`crate::job`]) runs them one after the other and stops starting hosts
//! once more than `max_failures` failed. For one host, [`run_host`] is:
//!
//! 1. `pre_local` (here: drain it at the load balancer) — if it fails the
//!    host is left untouched and not drained;
//! 2. `pre_remote` (on the host) — if it fails nothing is sent, the host is
//!    undrained;
//! 3. the host's deliveries (every file: upload, verify, install);
//! 4. `post_remote`, then the health gate: `health_check` (here) or
//!    `health_remote` (on the host) tried every `health_interval` until
//!    `health_passes` tries in a row pass, within one `health_timeout`;
//! 5. `post_local` (undrain) — only for a host that is healthy; a host left
//!    drained is reported loudly.
//!
//! Hooks run with `sh -c`, their placeholders shell-quoted, and
//! `DISPATCH_HOST`, `DISPATCH_ROUTE`, `DISPATCH_ROLLOUT` in the environment;
//! each within `hook_timeout`.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Route;
use crate::template::{expand, shell_quote};

/// Runs a command on the target host within a deadline: Ok on exit 0, else
/// what went wrong (the executor opens the SSH session for it).
pub type Remote<'a> = &'a mut dyn FnMut(&str, Duration) -> Result<String, String>;

/// What a host's deliveries did.
pub struct Delivered {
    /// Every file went in.
    pub ok: bool,
    /// The one (absolute) dir they went to: the release, with `current`.
    pub release: Option<String>,
}

/// One host of a rollout.
pub struct HostRun<'a> {
    pub route: &'a Route,
    pub host: &'a str,
    /// Names this rollout in the hooks' environment.
    pub rollout: &'a str,
    /// What is rolled out: the route's `(?P<version>…)` and the content's
    /// sha256, written in the release's mark.
    pub version: Option<&'a str>,
    pub sha256: Option<&'a str>,
    /// The release dir, once the host's files are in (`DISPATCH_RELEASE`).
    pub release: std::cell::RefCell<Option<String>>,
}

/// How a host's gates went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Gates {
    /// Why the deliveries did not run (pre_local or pre_remote failed).
    pub before: Option<String>,
    /// Why a host whose deliveries ran is not good (post_remote, health,
    /// post_local).
    pub after: Option<String>,
    /// pre_local ran and post_local did not (or failed): the host is still
    /// drained.
    pub left_drained: bool,
    /// Its release was rolled back (`current`) and it is healthy on the old
    /// one: undrained, still failed.
    pub rolled_back: bool,
    /// Releases whose state changed: (dir, active | previous | failed).
    pub releases: Vec<(String, &'static str)>,
}

impl HostRun<'_> {
    fn command(&self, template: &str) -> String {
        let vars: BTreeMap<String, String> = [
            ("host".to_string(), self.host.to_string()),
            ("section".to_string(), self.route.section.clone()),
        ]
        .into();
        expand(template, &vars, shell_quote)
    }

    /// A local hook (`sh -c`), within `limit`.
    fn local(&self, key: &str, template: &str, limit: Duration) -> Result<(), String> {
        let cmd = self.command(template);
        run_local(&cmd, &self.env(), limit).map_err(|e| format!("{key} {e}"))
    }

    fn remote(
        &self,
        key: &str,
        template: &str,
        limit: Duration,
        remote: Remote<'_>,
    ) -> Result<(), String> {
        let mut cmd = String::new();
        for (k, v) in self.env() {
            cmd += &format!("{k}={} ", shell_quote(&v));
        }
        cmd += &format!("sh -c {}", shell_quote(&self.command(template)));
        remote(&cmd, limit)
            .map(|_| ())
            .map_err(|e| format!("{key} {e}"))
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("DISPATCH_HOST", self.host.to_string()),
            ("DISPATCH_ROUTE", self.route.section.clone()),
            ("DISPATCH_ROLLOUT", self.rollout.to_string()),
        ];
        if let Some(r) = self.release.borrow().as_ref() {
            env.push(("DISPATCH_RELEASE", r.clone()));
        }
        env
    }

    /// The health gate: `health_passes` passing tries in a row within one
    /// `health_timeout`. None when the route has no health check.
    fn healthy(&self, remote: Remote<'_>) -> Option<Result<(), String>> {
        let r = self.route;
        let (key, template, local) = match (&r.health_check, &r.health_remote) {
            (Some(c), _) => ("health_check", c, true),
            (None, Some(c)) => ("health_remote", c, false),
            (None, None) => return None,
        };
        let deadline = Instant::now() + r.health_timeout;
        let (mut passes, mut tries, mut last) = (0, 0, String::new());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(Err(format!(
                    "{key}: not healthy within {}s ({tries} tries, {passes} of {} passes in a row; last: {last})",
                    r.health_timeout.as_secs(),
                    r.health_passes
                )));
            }
            tries += 1;
            let limit = left.min(r.hook_timeout);
            let res = if local {
                run_local(&self.command(template), &self.env(), limit)
            } else {
                self.remote(key, template, limit, &mut *remote)
            };
            match res {
                Ok(()) => {
                    passes += 1;
                    if passes >= r.health_passes {
                        return Some(Ok(()));
                    }
                }
                Err(e) => {
                    passes = 0;
                    last = e;
                }
            }
            let pause = r
                .health_interval
                .min(deadline.saturating_duration_since(Instant::now()));
            std::thread::sleep(pause);
        }
    }
}

/// What a route's rollout will do, for `dispatch route` (a line each).
pub fn describe(r: &Route) -> Vec<String> {
    let waves: Vec<String> = r
        .strategy
        .waves(&r.hosts)
        .iter()
        .map(|w| format!("[{}]", w.join(", ")))
        .collect();
    let allowed = r.failures_allowed();
    let mut lines = vec![format!(
        "rollout: {} in {} wave(s): {}; stops once more than {allowed} host(s) failed",
        r.strategy,
        waves.len(),
        waves.join(" ")
    )];
    let hook = |k: &str, v: &Option<String>| v.as_ref().map(|c| format!("{k}: {c}"));
    let health = match (&r.health_check, &r.health_remote) {
        (Some(c), _) | (None, Some(c)) => Some(format!(
            "{}: {c} ({} pass(es) in a row, every {:.1}s, within {:.0}s)",
            if r.health_check.is_some() {
                "health_check"
            } else {
                "health_remote"
            },
            r.health_passes,
            r.health_interval.as_secs_f64(),
            r.health_timeout.as_secs_f64()
        )),
        (None, None) => None,
    };
    let steps = [
        hook("pre_local", &r.pre_local),
        hook("pre_remote", &r.pre_remote),
        Some("the host's files (upload, verify, install)".into()),
        r.current.as_ref().map(|c| {
            format!(
                "{c} → the new release{}",
                r.activate_command
                    .as_ref()
                    .map_or(String::new(), |a| format!(", then activate_command: {a}"))
            )
        }),
        hook("post_remote", &r.post_remote),
        health,
        hook("post_local (once healthy)", &r.post_local),
    ];
    for (i, l) in steps.into_iter().flatten().enumerate() {
        lines.push(format!("  per host {}. {l}", i + 1));
    }
    if r.current.is_some() {
        lines.push(format!(
            "  a host not healthy on its new release is rolled back to the previous one; releases kept: {}",
            r.keep_releases.map_or("all".to_string(), |k| k.to_string())
        ));
    }
    lines
}

/// One host through its gates around `deliver` (which runs the host's
/// deliveries and says whether every one succeeded).
pub fn run_host(h: &HostRun<'_>, remote: Remote<'_>, deliver: impl FnOnce() -> Delivered) -> Gates {
    let r = h.route;
    let mut g = Gates::default();
    if let Some(pre) = &r.pre_local {
        if let Err(e) = h.local("pre_local", pre, r.hook_timeout) {
            g.before = Some(format!("{e}; the host was left untouched"));
            return g;
        }
        g.left_drained = true;
    }
    if let Some(pre) = &r.pre_remote {
        if let Err(e) = h.remote("pre_remote", pre, r.hook_timeout, &mut *remote) {
            g.before = Some(format!("{e}; nothing was sent"));
            undrain(h, &mut g);
            return g;
        }
    }
    let d = deliver();
    let delivered = d.ok;
    h.release.replace(d.release.clone());
    // releases: current → the new release, activated, before post_remote
    // and the health gate (which check the new release)
    let mut switched: Option<(String, String)> = None;
    if delivered && r.current.is_some() {
        match d.release.as_deref().map(|dir| switch(h, dir, &mut *remote)) {
            Some(Ok(prev)) => switched = d.release.clone().map(|dir| (dir, prev)),
            Some(Err(e)) => g.after = Some(e),
            None => {
                g.after = Some("current: this host's files did not go to one release dir".into())
            }
        }
    }
    if delivered && g.after.is_none() {
        if let Some(post) = &r.post_remote {
            if let Err(e) = h.remote("post_remote", post, r.hook_timeout, &mut *remote) {
                g.after = Some(e);
            }
        }
    }
    let mut health = if g.after.is_none() {
        h.healthy(&mut *remote)
    } else {
        None
    };
    if let Some((dir, prev)) = &switched {
        health = releases_after(h, dir, prev, health, &mut g, &mut *remote);
    }
    match health {
        Some(Err(e)) => g.after = Some(e),
        // healthy, or no check and every file went in: undrain
        Some(Ok(())) => undrain(h, &mut g),
        None if delivered && g.after.is_none() => undrain(h, &mut g),
        // rolled back and healthy on the old release: undrained, still failed
        None if g.rolled_back => undrain(h, &mut g),
        None => {}
    }
    if g.left_drained {
        log::error!(
            "{}: left drained: post_local was not run ({}); undrain it by hand once it is fixed",
            h.host,
            g.after.as_deref().unwrap_or("its files failed")
        );
    }
    g
}

/// The rollout's lock on a host: a directory made with `mkdir` (atomic),
/// holding `owner` (token, machine, pid, rollout, since, expiry by the
/// host's clock).
pub const HOST_LOCK: &str = ".dispatch-host.lock";

/// The owner line of a lock this rollout takes.
fn owner_line(h: &HostRun<'_>, token: &str, ttl: Duration) -> String {
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "token={token} machine={} pid={} rollout={} since=$(date +%s) expires=$(( $(date +%s) + {} ))",
        shell_quote(me.trim()),
        std::process::id(),
        shell_quote(h.rollout),
        ttl.as_secs().max(1)
    )
}

/// Take the host's lock: made, or taken over when expired (under a second
/// `mkdir` so that two takers cannot both win), else who holds it. Exit 0
/// and `locked`, or exit 3 and the holder's line.
fn lock_script(h: &HostRun<'_>, token: &str, ttl: Duration) -> String {
    let owner = owner_line(h, token, ttl);
    format!(
        "d=\"$HOME\"/{HOST_LOCK}; t=\"$d.takeover\"; \
         if mkdir \"$d\" 2>/dev/null; then echo \"{owner}\" > \"$d/owner\"; echo locked; exit 0; fi; \
         if mkdir \"$t\" 2>/dev/null; then \
           exp=$(sed -n 's/.*expires=\\([0-9]*\\).*/\\1/p' \"$d/owner\" 2>/dev/null); \
           if [ -n \"$exp\" ] && [ \"$exp\" -lt \"$(date +%s)\" ]; then \
             old=$(cat \"$d/owner\"); rm -rf \"$d\" && mkdir \"$d\" && echo \"{owner}\" > \"$d/owner\" && rmdir \"$t\" && \
             echo \"locked (took over an expired lock: $old)\" && exit 0; \
           fi; rmdir \"$t\"; \
         elif [ -n \"$(find \"$t\" -maxdepth 0 -mmin +1 2>/dev/null)\" ]; then rmdir \"$t\" 2>/dev/null; fi; \
         echo \"held: $(cat \"$d/owner\" 2>/dev/null)\"; exit 3"
    )
}

/// Print the lock's owner line (nothing: free); with `breaking`, remove it.
pub fn lock_read_script(breaking: bool) -> String {
    let d = format!("\"$HOME\"/{HOST_LOCK}");
    let mut s = format!("cat {d}/owner 2>/dev/null; ");
    if breaking {
        s += &format!("rm -rf {d} {d}.takeover; ");
    }
    s + "true"
}

/// Renew (push the expiry on) or release the lock, only if `token` holds it.
fn lock_own_script(token: &str, ttl: Option<Duration>) -> String {
    let d = format!("\"$HOME\"/{HOST_LOCK}");
    let mine = format!("grep -q '^token={token} ' {d}/owner 2>/dev/null");
    match ttl {
        Some(ttl) => format!(
            "{mine} && sed -i \"s/expires=[0-9]*/expires=$(( $(date +%s) + {} ))/\" {d}/owner",
            ttl.as_secs().max(1)
        ),
        None => format!("if {mine}; then rm -rf {d}; fi; true"),
    }
}

/// Holds the host's lock: renewed every third of its TTL by a thread of
/// its own (its own SSH session); released when dropped.
pub struct HostLock {
    token: String,
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    renewer: Option<std::thread::JoinHandle<()>>,
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for HostLock {
    fn drop(&mut self) {
        {
            let (m, c) = &*self.stop;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            c.notify_all();
        }
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if let Some(r) = self.release.take() {
            r();
        }
        log::debug!("host lock {} released", self.token);
    }
}

/// A command runner the lock's renewer can own (a session of its own).
pub type OwnedRemote = Box<dyn FnMut(&str, Duration) -> Result<String, String> + Send>;

/// Take the host's lock for this rollout, waiting up to `lock_wait` for
/// another holder; `renewer` and `releaser` run the renewals and the release.
pub fn lock_host(
    h: &HostRun<'_>,
    remote: Remote<'_>,
    mut renewer: OwnedRemote,
    mut releaser: OwnedRemote,
) -> Result<HostLock, String> {
    let r = h.route;
    let token = crate::transport::random_hex();
    let deadline = Instant::now() + r.lock_wait;
    let script = lock_script(h, &token, r.lock_ttl);
    loop {
        match remote(&format!("sh -c {}", shell_quote(&script)), r.hook_timeout) {
            Ok(out) => {
                if let Some(l) = out.lines().find(|l| l.starts_with("locked (took over")) {
                    log::warn!("{}: {l}", h.host);
                }
                break;
            }
            Err(e) if Instant::now() < deadline => {
                log::info!("{}: waiting for the host lock: {e}", h.host);
                std::thread::sleep(
                    Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())),
                );
            }
            Err(e) => {
                return Err(match e.split_once("held: ") {
                    Some((_, holder)) => format!(
                        "the host is locked by another rollout ({}); nothing was done (lock_wait = {}s)",
                        holder.trim(),
                        r.lock_wait.as_secs()
                    ),
                    None => format!("cannot take the host lock: {e}; nothing was done"),
                });
            }
        }
    }
    let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let (ttl, renew) = (r.lock_ttl, lock_own_script(&token, Some(r.lock_ttl)));
    let host = h.host.to_string();
    let s2 = std::sync::Arc::clone(&stop);
    let renewer = std::thread::Builder::new()
        .name("lock-renew".into())
        .spawn(move || {
            let (m, c) = &*s2;
            let mut stopped = m.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let (g, _) = c
                    .wait_timeout(stopped, ttl / 3)
                    .unwrap_or_else(|p| p.into_inner());
                stopped = g;
                if *stopped {
                    return;
                }
                if let Err(e) = renewer(&format!("sh -c {}", shell_quote(&renew)), ttl / 3) {
                    log::warn!("{host}: renewing the host lock: {e}");
                }
            }
        })
        .ok();
    let release = lock_own_script(&token, None);
    let host = h.host.to_string();
    let limit = r.hook_timeout;
    Ok(HostLock {
        token,
        stop,
        renewer,
        release: Some(Box::new(move || {
            if let Err(e) = releaser(&format!("sh -c {}", shell_quote(&release)), limit) {
                log::warn!("{host}: releasing the host lock: {e} (it expires by itself)");
            }
        })),
    })
}

/// dpkg's ordering of versions (`[epoch:]upstream[-revision]`; `~` sorts
/// before anything, even the end).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let ((ea, ua, ra), (eb, ub, rb)) = (version_parts(a), version_parts(b));
    ea.cmp(&eb)
        .then_with(|| version_part_cmp(ua, ub))
        .then_with(|| version_part_cmp(ra, rb))
}

fn version_parts(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()) => {
            (e.parse().unwrap_or(0), r)
        }
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((u, r)) => (epoch, u, r),
        None => (epoch, rest, ""),
    }
}

/// A character's weight in dpkg's comparison of the non-digit parts.
fn version_char(c: Option<char>) -> i32 {
    match c {
        Some('~') => -1,
        None => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

fn version_part_cmp(mut a: &str, mut b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering::Equal;
    let digit = |c: char| c.is_ascii_digit();
    while !a.is_empty() || !b.is_empty() {
        let (na, nb) = (
            a.find(digit).unwrap_or(a.len()),
            b.find(digit).unwrap_or(b.len()),
        );
        let (mut ia, mut ib) = (a[..na].chars(), b[..nb].chars());
        loop {
            let (x, y) = (ia.next(), ib.next());
            if x.is_none() && y.is_none() {
                break;
            }
            let o = version_char(x).cmp(&version_char(y));
            if o != Equal {
                return o;
            }
        }
        (a, b) = (&a[na..], &b[nb..]);
        let not_digit = |c: char| !c.is_ascii_digit();
        let (da, db) = (
            a.find(not_digit).unwrap_or(a.len()),
            b.find(not_digit).unwrap_or(b.len()),
        );
        let (xa, xb) = (
            a[..da].trim_start_matches('0'),
            b[..db].trim_start_matches('0'),
        );
        let o = xa.len().cmp(&xb.len()).then_with(|| xa.cmp(xb));
        if o != Equal {
            return o;
        }
        (a, b) = (&a[da..], &b[db..]);
    }
    Equal
}

/// The sha256 of one file, or of the files' names and sha256s, read from
/// their descriptors (positional reads: the lanes' offsets stay theirs).
pub fn content_sha256(files: &[(&str, &crate::local::LocalFile)]) -> Option<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let hash = |f: &crate::local::LocalFile| -> Option<String> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0u64;
        loop {
            let n = f.file.read_at(&mut buf, at).ok()?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    };
    if let [(_, f)] = files {
        return hash(f);
    }
    let mut lines: Vec<String> = files
        .iter()
        .map(|(n, f)| Some(format!("{} {n}\n", hash(f)?)))
        .collect::<Option<_>>()?;
    lines.sort();
    let all = Sha256::digest(lines.concat().as_bytes());
    Some(all.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the active release's mark says (`version=… sha256=…`).
pub fn active_mark_script(current: &str) -> String {
    format!(
        "cat \"$(readlink {})\"/.dispatch-release-ok 2>/dev/null; true",
        shell_path(current)
    )
}

/// The version rolled out is older than the active release's.
pub fn is_downgrade(h: &HostRun<'_>, mark: &str) -> bool {
    let active = mark
        .split_whitespace()
        .find_map(|w| w.strip_prefix("version="))
        .filter(|v| !v.is_empty());
    matches!((h.version, active), (Some(n), Some(a)) if version_cmp(n, a) == std::cmp::Ordering::Less)
}

/// What to do about the active release: None to go on, `Err` refused (a
/// downgrade), `Ok` already there (same version, same content).
pub fn against_active(
    h: &HostRun<'_>,
    mark: &str,
    allow_downgrade: bool,
) -> Option<Result<String, String>> {
    let field = |k: &str| {
        mark.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_string))
            .filter(|v| !v.is_empty())
    };
    let (new, active) = (h.version?, field("version=")?);
    match version_cmp(new, &active) {
        std::cmp::Ordering::Less if allow_downgrade => {
            log::warn!("{}: downgrade from {active} to {new} (--allow-downgrade)", h.host);
            None
        }
        std::cmp::Ordering::Less => Some(Err(format!(
            "downgrade refused: {new} is older than the active {active} (--allow-downgrade to do it)"
        ))),
        std::cmp::Ordering::Equal
            if h.sha256.is_some() && field("sha256=").as_deref() == h.sha256 =>
        {
            Some(Ok(format!(
                "{new} is already the active release, same content: nothing sent"
            )))
        }
        _ => None,
    }
}

/// A host's releases, as `current` and the marks say (absolute paths,
/// oldest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostReleases {
    pub active: Option<String>,
    pub good: Vec<String>,
    pub failed: Vec<String>,
}

impl HostReleases {
    /// The newest good release older than the active one.
    pub fn previous(&self) -> Option<&String> {
        let active = self.active.as_deref()?;
        self.good.iter().rev().find(|g| g.as_str() < active)
    }

    /// The good release named `name` (its base name, or its path).
    pub fn find(&self, name: &str) -> Option<&String> {
        self.good
            .iter()
            .find(|g| g.as_str() == name || g.rsplit('/').next() == Some(name))
    }
}

/// Lists the releases beside the one `current` points at.
pub fn releases_script(current: &str) -> String {
    format!(
        "cur={}; a=$(readlink \"$cur\" 2>/dev/null || true); echo \"active=$a\"; [ -n \"$a\" ] || exit 0; \
         p=$(dirname \"$a\"); for m in \"$p\"/*/.dispatch-release-ok; do [ -e \"$m\" ] && echo \"ok=${{m%/.dispatch-release-ok}}\"; done; \
         for m in \"$p\"/*/.dispatch-release-failed; do [ -e \"$m\" ] && echo \"failed=${{m%/.dispatch-release-failed}}\"; done; true",
        shell_path(current)
    )
}

/// What [`releases_script`] printed.
pub fn parse_releases(out: &str) -> HostReleases {
    let mut r = HostReleases::default();
    for l in out.lines() {
        if let Some(a) = l.strip_prefix("active=") {
            r.active = (!a.is_empty()).then(|| a.to_string());
        } else if let Some(g) = l.strip_prefix("ok=") {
            r.good.push(g.to_string());
        } else if let Some(f) = l.strip_prefix("failed=") {
            r.failed.push(f.to_string());
        }
    }
    r.good.sort();
    r.failed.sort();
    r
}

/// `~/x` as the shell should see it (`"$HOME"/'x'`), else quoted.
fn shell_path(p: &str) -> String {
    match p.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME\"/{}", shell_quote(rest)),
        None => shell_quote(p),
    }
}

/// Point `current` at `dir` (a new link renamed over the old one: never a
/// moment without it) and run `activate_command`; the release it pointed
/// at before ("" for none).
fn switch(h: &HostRun<'_>, dir: &str, remote: Remote<'_>) -> Result<String, String> {
    let r = h.route;
    let cur = shell_path(r.current.as_deref().unwrap_or_default());
    let script = format!(
        "cur={cur}; new={new}; prev=$(readlink \"$cur\" 2>/dev/null || true); \
         mkdir -p \"$(dirname \"$cur\")\" && ln -s \"$new\" \"$cur.dispatch-$$\" && mv -T \"$cur.dispatch-$$\" \"$cur\" && \
         printf 'prev=%s\\n' \"$prev\"",
        new = shell_quote(dir)
    );
    let out = remote(&format!("sh -c {}", shell_quote(&script)), r.hook_timeout)
        .map_err(|e| format!("current: switching to {dir} {e}"))?;
    let prev = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("prev="))
        .unwrap_or("")
        .trim()
        .to_string();
    if let Some(a) = &r.activate_command {
        h.remote("activate_command", a, r.hook_timeout, &mut *remote)?;
    }
    Ok(prev)
}

/// After the health gate of a switched host: mark the release good and
/// prune, or mark it failed and roll back to `prev` (then check again).
fn releases_after(
    h: &HostRun<'_>,
    dir: &str,
    prev: &str,
    health: Option<Result<(), String>>,
    g: &mut Gates,
    remote: Remote<'_>,
) -> Option<Result<(), String>> {
    let r = h.route;
    let good = g.after.is_none() && !matches!(health, Some(Err(_)));
    let mark = if good {
        ".dispatch-release-ok"
    } else {
        ".dispatch-release-failed"
    };
    let what = format!(
        "version={} sha256={}",
        h.version.unwrap_or(""),
        h.sha256.unwrap_or("")
    );
    let mut script = format!("echo {} > {}/{mark}", shell_quote(&what), shell_quote(dir));
    if good {
        if let Some(keep) = r.keep_releases {
            script += &format!("; {}", prune_script(dir, prev, keep));
        }
    }
    match remote(&format!("sh -c {}", shell_quote(&script)), r.hook_timeout) {
        Ok(out) => {
            for p in out.lines().filter_map(|l| l.strip_prefix("pruned=")) {
                g.releases.push((p.to_string(), "pruned"));
            }
        }
        Err(e) => log::warn!("{}: releases: {e}", h.host),
    }
    if good {
        g.releases.push((dir.to_string(), "active"));
        if !prev.is_empty() && prev != dir {
            g.releases.push((prev.to_string(), "previous"));
        }
    } else {
        g.releases.push((dir.to_string(), "failed"));
    }
    if good || prev.is_empty() || prev == dir {
        return health;
    }
    let why = match &health {
        Some(Err(e)) => e.clone(),
        _ => g.after.clone().unwrap_or_default(),
    };
    match switch(h, prev, &mut *remote) {
        Ok(_) => {
            log::warn!("{}: rolled back to {prev}: {why}", h.host);
            g.releases.push((prev.to_string(), "active"));
            // healthy again on the old release? (then it is undrained)
            match h.healthy(&mut *remote) {
                Some(Err(e)) => {
                    g.after = Some(format!(
                        "{why}; rolled back to {prev}, still not healthy: {e}"
                    ));
                    None
                }
                _ => {
                    g.after = Some(format!("{why}; rolled back to {prev}"));
                    g.rolled_back = true;
                    None
                }
            }
        }
        Err(e) => {
            g.after = Some(format!("{why}; rolling back to {prev} failed: {e}"));
            None
        }
    }
}

/// Remove successful releases beyond the newest `keep` (never `dir`, the
/// current one, nor `prev`, the one to roll back to) and failed ones but the
/// newest; dirs without a mark (in flight, or not dispatch's) are left.
fn prune_script(dir: &str, prev: &str, keep: u32) -> String {
    let parent = dir
        .rsplit_once('/')
        .map_or("/", |(p, _)| if p.is_empty() { "/" } else { p });
    format!(
        "cd {parent} && n=0 && for m in $(ls -1d */.dispatch-release-ok 2>/dev/null | sort -r); do \
           d=${{m%/.dispatch-release-ok}}; p=$(pwd)/$d; n=$((n+1)); \
           if [ $n -gt {keep} ] && [ \"$p\" != {dir} ] && [ \"$p\" != {prev} ]; then rm -rf -- \"$d\" && echo \"pruned=$p\"; fi; \
         done; k=0; for m in $(ls -1d */.dispatch-release-failed 2>/dev/null | sort -r); do \
           k=$((k+1)); [ $k -gt 1 ] && rm -rf -- \"${{m%/.dispatch-release-failed}}\" && echo \"pruned=$(pwd)/${{m%/.dispatch-release-failed}}\"; \
         done; true",
        parent = shell_quote(parent),
        dir = shell_quote(dir),
        prev = shell_quote(prev),
    )
}

/// `post_local`, if the host was drained (or there is no pre_local).
fn undrain(h: &HostRun<'_>, g: &mut Gates) {
    let Some(post) = &h.route.post_local else {
        g.left_drained = false;
        return;
    };
    match h.local("post_local", post, h.route.hook_timeout) {
        Ok(()) => g.left_drained = false,
        Err(e) => {
            g.after.get_or_insert(e);
            g.left_drained = true;
        }
    }
}

/// `sh -c cmd` with `env`, killed after `limit`: Ok on exit 0, else the
/// exit status and the last line it wrote to stderr (or stdout).
pub fn run_local(cmd: &str, env: &[(&str, String)], limit: Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("/bin/sh")
        .args(["-c", cmd])
        // its own process group: a timeout kills what it started too (and
        // so closes the pipes the readers wait on)
        .process_group(0)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start: {e}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            b
        })
    })
    .collect();
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() >= limit => {
                kill_group(&mut child);
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("could not wait for it: {e}")),
        }
    };
    let out: Vec<String> = readers
        .into_iter()
        .map(|t| {
            t.join()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        })
        .collect();
    let last = out
        .iter()
        .rev()
        .flat_map(|o| o.lines().rev())
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(300)
        .collect::<String>();
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!(
            "failed ({s}){}",
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        )),
        None => Err(format!("timed out after {}s", limit.as_secs_f64())),
    }
}

/// SIGKILL to the child's process group (it leads one), then reap it.
pub fn kill_group(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on a process group this process created
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn route(extra: &str) -> Route {
        let c = Config::parse(
            std::path::Path::new("t.ini"),
            &format!("[x]\nhost = a, b\nhook_timeout = 5s\nhealth_timeout = 2s\nhealth_interval = 10ms\n{extra}"),
        )
        .unwrap();
        c.routes[0].clone()
    }

    fn no_remote() -> impl FnMut(&str, Duration) -> Result<String, String> {
        |_: &str, _: Duration| Err("no remote in this test".to_string())
    }

    fn host_run<'a>(r: &'a Route, host: &'a str, rollout: &'a str) -> HostRun<'a> {
        HostRun {
            route: r,
            host,
            rollout,
            version: None,
            sha256: None,
            release: Default::default(),
        }
    }

    fn ok() -> Delivered {
        Delivered {
            ok: true,
            release: None,
        }
    }

    #[test]
    fn a_failed_drain_leaves_the_host_untouched() {
        let r = route("pre_local = exit 3\npost_local = true\n");
        let h = host_run(&r, "a", "t");
        let mut ran = false;
        let g = run_host(&h, &mut no_remote(), || {
            ran = true;
            ok()
        });
        assert!(!ran);
        assert!(g
            .before
            .unwrap()
            .starts_with("pre_local failed (exit status: 3)"));
        assert!(!g.left_drained);
    }

    #[test]
    fn an_unhealthy_host_fails_and_stays_drained() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("undrained");
        let r = route(&format!(
            "pre_local = true\npost_local = touch {}\nhealth_check = test {{host}} = b\n",
            mark.display()
        ));
        let a = host_run(&r, "a", "t");
        let g = run_host(&a, &mut no_remote(), ok);
        assert!(
            g.after
                .as_deref()
                .unwrap()
                .starts_with("health_check: not healthy within 2s"),
            "{g:?}"
        );
        assert!(g.left_drained);
        assert!(!mark.exists());
        let b = host_run(&r, "b", "t");
        assert_eq!(run_host(&b, &mut no_remote(), ok), Gates::default());
        assert!(mark.exists(), "b was not undrained");
    }

    #[test]
    fn health_needs_its_passes_in_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let n = dir.path().join("n");
        // passes on the 3rd try and after: 2 passes in a row on tries 3, 4
        let r = route(&format!(
            "health_passes = 2\nhealth_check = echo x >> {n}; [ $(wc -l < {n}) -ge 3 ]\n",
            n = n.display()
        ));
        let h = host_run(&r, "a", "t");
        assert_eq!(run_host(&h, &mut no_remote(), ok), Gates::default());
        assert_eq!(std::fs::read_to_string(&n).unwrap().lines().count(), 4);
    }

    #[test]
    fn hooks_get_quoted_placeholders_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let r = route(&format!(
            "pre_local = printf '%s|' {{host}} \"$DISPATCH_HOST\" \"$DISPATCH_ROUTE\" \"$DISPATCH_ROLLOUT\" > {}\n",
            out.display()
        ));
        let h = host_run(&r, "a;b c", "r-1");
        run_host(&h, &mut no_remote(), ok);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "a;b c|a;b c|x|r-1|");
    }

    #[test]
    fn a_hook_past_its_deadline_is_killed() {
        let started = Instant::now();
        let e = run_local("sleep 30", &[], Duration::from_millis(200)).unwrap_err();
        assert!(e.starts_with("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn versions_order_as_dpkg_does() {
        use std::cmp::Ordering::*;
        for (a, b, o) in [
            ("1.2", "1.10", Less),
            ("1.2.0", "1.2", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1:0.9", "2.0", Greater),
            ("2.0-1", "2.0-2", Less),
            ("1.2a", "1.2", Greater),
            ("1.02", "1.2", Equal),
            ("1.0", "1.0", Equal),
        ] {
            assert_eq!(version_cmp(a, b), o, "{a} vs {b}");
        }
    }
}
