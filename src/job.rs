//! One unit of work is a file × host. A batch groups them by connection
//! (host, port, login), and each group is drained by up to
//! `max_sessions_per_host` *lanes* running on the worker pool: a lane holds
//! one SSH session and reuses it for every file it takes. Per file:
//!
//! upload to `.NAME.part` (SCP, else FTP) → verify → rename → install, each
//! step recorded in the journal and reported as one [`Outcome`].
//!
//! Transient failures (connect refused/timed out, stalls) are retried with
//! exponential backoff; "cannot use this transport" failures fall through to
//! the next transport at once; a host that has failed for good in this batch
//! is not tried again for the batch's other files.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Local};
use crossbeam_channel::{Receiver, Sender};

use crate::config::{Config, Route, Transport, Verify};
use crate::credentials::{self, Netrc};
use crate::event::{Bus, Event, EventKind, JournalSink, LogSink, Sink};
use crate::journal::{Journal, State};
use crate::lock::{self, Lock};
use crate::plan::{self, Delivery, Step};
use crate::rollout;
use crate::route::{self, remote_join, shell_quote, Routed};
use crate::script::{install_script, publish_script, verify_script, CANNOT_CD, VERIFY_FAILED};
use crate::transport::error::joined;
use crate::transport::ftp::{FtpSession, FtpTarget};
use crate::transport::ssh::{SshSession, SshTarget};
use crate::transport::{
    Cause, ErrorKind, Op, Protocol, Source, TransferError, Upload, Uploaded, Uploader,
};

mod stream;

pub use crate::event::{journaled_reason, Outcome};
pub use crate::plan::Item;

/// Temporary files that interrupted or broken attempts of `pkg` may have
/// left, by host: the journal names the temporary file while an upload is
/// in flight, and keeps the name if the attempt ended before the file was
/// in place (a crash, or a failure whose connection was gone).
pub fn stale_temps(j: &Journal, pkg: i64) -> BTreeMap<String, String> {
    j.remote_paths(pkg)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(h, _, p)| Some((h, p?)))
        .filter(|(_, p)| is_temp_path(p))
        .collect()
}

/// Verified uploads of `pkg` already in place, by host (host → dir), for
/// a route with an install command: installed there on restart.
pub fn placed_uploads(j: &Journal, pkg: i64) -> BTreeMap<String, String> {
    j.remote_paths(pkg)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, st, _)| *st == State::Uploaded)
        .filter_map(|(h, _, p)| {
            let p = p?;
            let (dir, _) = p.rsplit_once('/')?;
            dir.starts_with('/').then(|| (h, dir.to_string()))
        })
        .collect()
}

/// A name [`crate::transport::temp_name`] made.
fn is_temp_path(p: &str) -> bool {
    let base = p.rsplit('/').next().unwrap_or(p);
    base.starts_with(".dispatch-") && base.ends_with(".part")
}

/// Work for one connection: same host, port, login, transports.
struct Group {
    host: String,
    route: usize,
    rx: Receiver<Delivery>,
}

/// State shared by the lanes of one connection (host, port, login, …): one
/// that failed for good is not tried again in this batch; a transport that
/// cannot be used is skipped.
#[derive(Default)]
struct HostState {
    dead: Option<TransferError>,
    /// transport → why it is unusable (auth rejected, unreachable…)
    unusable: Vec<(Transport, TransferError)>,
}

#[derive(Clone)]
pub struct Batch {
    pub config: Arc<Config>,
    pub netrc: Arc<Netrc>,
    pub journal: Option<Arc<Journal>>,
    pub when: DateTime<Local>,
    pub dry_run: bool,
    /// Subscribers after the log and the journal (the console).
    pub sinks: Vec<Arc<dyn Sink>>,
    /// Roll out a version older than a host's active release.
    pub allow_downgrade: bool,
}

impl Batch {
    /// Dispatch `items` to every host of their routes on `pool`; one
    /// [`Outcome`] per file × host is sent to `out` as it completes.
    ///
    /// Routes with a rollout (a strategy other than parallel, hooks or a
    /// health check) go host by host, wave by wave, on a thread of their own
    /// ([`Rollout`]); the others start at once.
    pub fn run(&self, items: Vec<Item>, pool: &threadpool::ThreadPool, out: Sender<Outcome>) {
        let bus = Arc::new(self.bus());
        // a dry run connects to nothing: no lock, hook or gate either
        let (rolled, plain): (Vec<Item>, Vec<Item>) = items
            .into_iter()
            .partition(|i| !self.dry_run && self.config.routes[i.route].is_rollout());
        for c in plan::plan(&self.config, &plain).connections {
            queued(&bus, &c);
            self.start_lanes(c, &bus, pool, out.clone(), false);
        }
        let mut by_route: BTreeMap<usize, Vec<Item>> = BTreeMap::new();
        for i in rolled {
            by_route.entry(i.route).or_default().push(i);
        }
        for (route, items) in by_route {
            let conns = plan::plan(&self.config, &items).connections;
            for c in &conns {
                queued(&bus, c);
            }
            let r = Rollout {
                batch: self.clone(),
                route,
                bus: Arc::clone(&bus),
                pool: pool.clone(),
                out: out.clone(),
                release_of: BTreeMap::new(),
                ends: Mutex::new(Vec::new()),
                content: std::sync::OnceLock::new(),
            };
            let spawned = std::thread::Builder::new()
                .name("rollout".into())
                .spawn(move || {
                    r.run(conns);
                });
            if let Err(e) = spawned {
                log::error!("cannot start the rollout of route {route}: {e}");
            }
        }
    }

    /// The lanes of one connection, on `pool`; each outcome goes to `out`
    /// (dropped when the last lane ends).
    fn start_lanes(
        &self,
        c: plan::Connection,
        bus: &Arc<Bus>,
        pool: &threadpool::ThreadPool,
        out: Sender<Outcome>,
        hold_end: bool,
    ) {
        {
            let (tx, rx) = crossbeam_channel::unbounded();
            for d in c.deliveries {
                let _ = tx.send(d);
            }
            drop(tx);
            // per connection (host, port, login, …): a closed port or a
            // rejected login says nothing about another route to the host
            let hs: Arc<Mutex<HostState>> = Arc::default();
            let group = Arc::new(Group {
                host: c.host,
                route: c.route,
                rx,
            });
            for _ in 0..c.lanes {
                let lane = Lane {
                    config: Arc::clone(&self.config),
                    netrc: Arc::clone(&self.netrc),
                    bus: Arc::clone(bus),
                    when: self.when,
                    dry_run: self.dry_run,
                    group: Arc::clone(&group),
                    host_state: Arc::clone(&hs),
                    ssh: None,
                    ftp: None,
                    leftovers: Vec::new(),
                    steps: Vec::new(),
                    current: (None, String::new()),
                    stashed: None,
                    hold_end,
                };
                let out = out.clone();
                pool.execute(move || lane.drain(out));
            }
        }
    }
}

/// Every delivery of `c` is queued.
fn queued(bus: &Bus, c: &plan::Connection) {
    for d in &c.deliveries {
        bus.emit(&Event {
            package: d.item.package,
            file: d.item.name.clone(),
            host: c.host.clone(),
            kind: EventKind::Queued,
        });
    }
}

/// One route's rollout: its hosts in waves ([`crate::config::Strategy::waves`]),
/// each host through its gates ([`rollout::run_host`]); once more hosts
/// failed than `max_failures` allows, no new host starts and the rest are
/// reported `skipped`.
struct Rollout {
    batch: Batch,
    route: usize,
    bus: Arc<Bus>,
    pool: threadpool::ThreadPool,
    out: Sender<Outcome>,
    /// A rollback: no files, each host's `current` pointed at this release.
    release_of: BTreeMap<String, String>,
    /// How each host ended: (host, why it failed).
    ends: Mutex<Vec<(String, Option<String>)>>,
    /// The batch's content hash, for the releases' marks.
    content: std::sync::OnceLock<Option<String>>,
}

/// The end of one host of a rollback: its release before, and why it failed.
#[derive(Debug, Clone)]
pub struct HostEnd {
    pub host: String,
    pub error: Option<String>,
}

impl Batch {
    /// Each host's releases of `route` (its `current` and the marks).
    pub fn releases(
        &self,
        route: usize,
        hosts: &[String],
    ) -> Vec<(String, Result<rollout::HostReleases, String>)> {
        let r = &self.config.routes[route];
        let Some(cur) = &r.current else {
            return Vec::new();
        };
        let script = format!("sh -c {}", shell_quote(&rollout::releases_script(cur)));
        std::thread::scope(|s| {
            let asks: Vec<_> = hosts
                .iter()
                .map(|h| {
                    let script = &script;
                    s.spawn(move || {
                        let t = ssh_target_of(r, h, &self.netrc);
                        let out = remote_command(&mut None, &t, script, r.hook_timeout);
                        (h.clone(), out.map(|o| rollout::parse_releases(&o)))
                    })
                })
                .collect();
            asks.into_iter()
                .map(|a| {
                    a.join()
                        .unwrap_or_else(|_| (String::new(), Err("internal error".into())))
                })
                .collect()
        })
    }

    /// The holder of `host`'s rollout lock (None: free); with `breaking`,
    /// the lock is removed too.
    pub fn host_lock(
        &self,
        route: usize,
        host: &str,
        breaking: bool,
    ) -> Result<Option<String>, String> {
        let r = &self.config.routes[route];
        let t = ssh_target_of(r, host, &self.netrc);
        let script = rollout::lock_read_script(breaking);
        let out = remote_command(
            &mut None,
            &t,
            &format!("sh -c {}", shell_quote(&script)),
            r.hook_timeout,
        )?;
        let holder = out
            .lines()
            .find(|l| l.starts_with("token="))
            .map(str::to_string);
        Ok(holder)
    }

    /// Point each host's `current` at `to[host]`, host by host as the
    /// route's rollout goes (waves, locks, hooks, activate, health).
    pub fn rollback(
        &self,
        route: usize,
        to: BTreeMap<String, String>,
        pool: &threadpool::ThreadPool,
    ) -> Vec<HostEnd> {
        let (out, _rx) = crossbeam_channel::unbounded();
        let conns = to
            .keys()
            .map(|h| plan::Connection {
                host: h.clone(),
                route,
                deliveries: Vec::new(),
                lanes: 1,
            })
            .collect();
        let r = Rollout {
            batch: self.clone(),
            route,
            bus: Arc::new(self.bus()),
            pool: pool.clone(),
            out,
            release_of: to,
            ends: Mutex::new(Vec::new()),
            content: std::sync::OnceLock::new(),
        };
        r.run(conns)
    }
}

impl Rollout {
    fn run(self, mut conns: Vec<plan::Connection>) -> Vec<HostEnd> {
        let config = Arc::clone(&self.batch.config);
        let route = &config.routes[self.route];
        let order = |h: &str| {
            route
                .hosts
                .iter()
                .position(|x| x == h)
                .unwrap_or(usize::MAX)
        };
        conns.sort_by_key(|c| order(&c.host));
        let waves = route.strategy.waves(&conns);
        let allowed = route.failures_allowed();
        let id = format!(
            "{}-{}-{}",
            self.batch.when.format("%Y%m%dT%H%M%S"),
            std::process::id(),
            self.route
        );
        let (mut failed, n) = (0, waves.len());
        for (i, wave) in waves.into_iter().enumerate() {
            if failed > allowed {
                wave.iter().for_each(|c| self.skip(c, failed, allowed));
                continue;
            }
            let hosts: Vec<&str> = wave.iter().map(|c| c.host.as_str()).collect();
            log::info!(
                "{}: rollout {id}: wave {} of {n}: {}",
                route.section,
                i + 1,
                hosts.join(", ")
            );
            failed += std::thread::scope(|s| {
                let running: Vec<_> = wave
                    .into_iter()
                    .map(|c| s.spawn(|| self.host(c, &id)))
                    .collect();
                // a host whose thread died counts as failed
                running
                    .into_iter()
                    .map(|h| h.join().unwrap_or(true))
                    .filter(|f| *f)
                    .count()
            });
        }
        if failed > allowed {
            log::error!(
                "{}: rollout {id} stopped: {failed} host(s) failed, max_failures allows {allowed}",
                route.section
            );
        }
        let ends = self.ends.lock().map(|e| e.clone()).unwrap_or_default();
        ends.into_iter()
            .map(|(host, error)| HostEnd { host, error })
            .collect()
    }

    /// The batch's content, once: the sha256 of its one file (of the files'
    /// names and sha256s when several), read from the descriptors.
    fn content_sha256(&self, items: &[Item]) -> Option<String> {
        self.content
            .get_or_init(|| {
                let files: Vec<(&str, &crate::local::LocalFile)> = items
                    .iter()
                    .filter_map(|i| Some((i.name.as_str(), i.file.as_deref()?)))
                    .collect();
                (files.len() == items.len() && !files.is_empty())
                    .then(|| rollout::content_sha256(&files))
                    .flatten()
            })
            .clone()
    }

    /// Versions: a host whose active release is newer is refused (unless
    /// `--allow-downgrade`), one already on this version and content is
    /// left as it is. Some(failed) when the host is done with.
    fn against_active(
        &self,
        run: &rollout::HostRun<'_>,
        remote: rollout::Remote<'_>,
        items: &[Item],
    ) -> Option<bool> {
        let cur = run.route.current.as_deref()?;
        run.version?;
        let script = format!("sh -c {}", shell_quote(&rollout::active_mark_script(cur)));
        let mark = remote(&script, run.route.hook_timeout).unwrap_or_default();
        if self.batch.allow_downgrade && rollout::is_downgrade(run, &mark) {
            if let Some(j) = &self.batch.journal {
                let what = format!("{} on {}: {}", run.route.section, run.host, mark.trim());
                let _ = j.admin_event("downgrade", Some(run.host), &what);
            }
        }
        let verdict = rollout::against_active(run, &mark, self.batch.allow_downgrade)?;
        let section = &run.route.section;
        match verdict {
            Err(why) => {
                for it in items {
                    self.finish(Outcome::failed(it, run.host, section, &why));
                }
                self.end(run.host, Some(why));
                Some(true)
            }
            Ok(note) => {
                for it in items {
                    let mut o = Outcome::failed(it, run.host, section, "");
                    o.state = "installed".into();
                    o.ok = true;
                    o.output_tail = Some(note.clone());
                    self.finish(o);
                }
                self.end(run.host, None);
                Some(false)
            }
        }
    }

    fn end(&self, host: &str, error: Option<String>) {
        if let Ok(mut e) = self.ends.lock() {
            e.push((host.to_string(), error));
        }
    }

    /// One host through its gates; true when it failed.
    fn host(&self, c: plan::Connection, id: &str) -> bool {
        let config = Arc::clone(&self.batch.config);
        let route = &config.routes[self.route];
        let host = c.host.clone();
        let items: Vec<Item> = c.deliveries.iter().map(|d| d.item.clone()).collect();
        let version = items.iter().find_map(|i| i.groups.get("version").cloned());
        let sha256 = self.content_sha256(&items);
        let run = rollout::HostRun {
            route,
            host: &host,
            rollout: id,
            version: version.as_deref(),
            sha256: sha256.as_deref(),
            release: Default::default(),
        };
        let target = ssh_target_of(route, &host, &self.batch.netrc);
        let mut session: Option<SshSession> = None;
        let mut remote = |cmd: &str, limit: std::time::Duration| {
            remote_command(&mut session, &target, cmd, limit)
        };
        let owned = |t: &SshTarget| -> rollout::OwnedRemote {
            let (t, mut session) = (t.clone(), None);
            Box::new(move |cmd: &str, limit| remote_command(&mut session, &t, cmd, limit))
        };
        let lock = match rollout::lock_host(&run, &mut remote, owned(&target), owned(&target)) {
            Ok(l) => l,
            Err(why) => {
                for it in &items {
                    self.finish(Outcome::failed(it, &host, &route.section, &why));
                }
                self.end(&host, Some(why));
                return true;
            }
        };
        self.host_event(
            &host,
            EventKind::HostLock {
                owner: Some(format!("rollout {id} (pid {})", std::process::id())),
            },
        );
        let fixed = self.release_of.get(&host).cloned();
        if fixed.is_none() {
            if let Some(done) = self.against_active(&run, &mut remote, &items) {
                drop(lock);
                self.host_event(&host, EventKind::HostLock { owner: None });
                return done;
            }
        }
        let mut outcomes = Vec::new();
        let gates = rollout::run_host(&run, &mut remote, || {
            if let Some(release) = fixed {
                return rollout::Delivered {
                    ok: true,
                    release: Some(release),
                };
            }
            let (tx, rx) = crossbeam_channel::unbounded();
            self.batch.start_lanes(c, &self.bus, &self.pool, tx, true);
            outcomes = rx.iter().collect();
            let ok = outcomes.len() == items.len() && outcomes.iter().all(|o: &Outcome| o.ok);
            // the release: the one dir this host's files went to
            let mut dirs: Vec<&String> = outcomes
                .iter()
                .filter_map(|o| o.uploaded_to.as_ref())
                .collect();
            dirs.dedup();
            rollout::Delivered {
                ok,
                release: (dirs.len() == 1).then(|| dirs[0].clone()),
            }
        });
        drop(lock);
        self.host_event(&host, EventKind::HostLock { owner: None });
        self.journal_releases(&run, &gates);
        self.report(&host, &route.section, &items, &gates, outcomes)
    }

    /// An event about the host (no file).
    fn host_event(&self, host: &str, kind: EventKind) {
        self.bus.emit(&Event {
            package: None,
            file: String::new(),
            host: host.to_string(),
            kind,
        });
    }

    /// The releases whose state changed: on the bus, into the journal.
    fn journal_releases(&self, run: &rollout::HostRun<'_>, gates: &rollout::Gates) {
        for (dir, state) in &gates.releases {
            self.host_event(
                run.host,
                EventKind::Release {
                    dir: dir.clone(),
                    state: state.to_string(),
                },
            );
        }
        let Some(j) = &self.batch.journal else {
            return;
        };
        for (dir, state) in &gates.releases {
            let rec = crate::journal::ReleaseRecord {
                route: run.route.section.clone(),
                host: run.host.to_string(),
                dir: dir.clone(),
                version: run.version.map(str::to_string),
                sha256: run.sha256.map(str::to_string),
                state: state.to_string(),
            };
            if let Err(e) = j.add_release(&rec) {
                log::warn!("{}: journal: {e}", run.host);
            }
        }
    }

    /// A host's results once its gates are done; true when it failed.
    fn report(
        &self,
        host: &str,
        section: &str,
        items: &[Item],
        gates: &rollout::Gates,
        outcomes: Vec<Outcome>,
    ) -> bool {
        self.end(host, gates.before.clone().or(gates.after.clone()));
        if let Some(why) = &gates.before {
            for it in items {
                self.finish(Outcome::failed(it, host, section, why));
            }
            return true;
        }
        let mut failed = outcomes.len() < items.len() || gates.after.is_some();
        for mut o in outcomes {
            failed |= !o.ok;
            if let (Some(why), true) = (&gates.after, o.ok) {
                o.ok = false;
                o.error = Some(format!("{} was done, but {why}", o.state));
                o.state = "failed".into();
            }
            // the lanes held the end back: told now, once
            self.finish(o);
        }
        failed
    }

    /// The end of a delivery: on the bus (journal, console…), then to the caller.
    fn finish(&self, o: Outcome) {
        self.bus.emit(&Event {
            package: o.package,
            file: o.file.clone(),
            host: o.host.clone(),
            kind: EventKind::Finished(Box::new(o.clone())),
        });
        let _ = self.out.send(o);
    }

    fn skip(&self, c: &plan::Connection, failed: usize, allowed: usize) {
        let route = &self.batch.config.routes[self.route];
        let why = format!(
            "not started: the rollout stopped after {failed} failed host(s) (max_failures allows {allowed})"
        );
        self.end(&c.host, Some(why.clone()));
        for d in &c.deliveries {
            let mut o = Outcome::failed(&d.item, &c.host, &route.section, &why);
            o.state = "skipped".into();
            self.finish(o);
        }
    }
}

/// Run `cmd` on the host over `session` (opened, or opened again, as needed).
fn remote_command(
    session: &mut Option<SshSession>,
    target: &SshTarget,
    cmd: &str,
    limit: std::time::Duration,
) -> Result<String, String> {
    if !session.as_ref().is_some_and(SshSession::is_alive) {
        *session = Some(SshSession::connect(target).map_err(|e| e.to_string())?);
    }
    let Some(s) = session.as_mut() else {
        return Err("no SSH session".into());
    };
    let out = s.exec(cmd, limit).map_err(|e| e.to_string())?;
    if out.success() {
        return Ok(out.output);
    }
    let last = out
        .output
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(match &out.signal {
        Some(sig) => format!("killed by {sig}: {last}"),
        None => format!("failed (exit status: {}): {last}", out.status),
    })
}

/// The SSH target for `host` of `route`.
fn ssh_target_of(route: &Route, host: &str, netrc: &Netrc) -> SshTarget {
    let creds = credentials::resolve(route, host, netrc);
    SshTarget {
        host: host.to_string(),
        port: route.port,
        login: creds.login,
        password: creds.password,
        identity_file: route.identity_file.clone(),
        host_key_check: route.host_key_check,
        known_hosts: route.known_hosts.clone(),
        connect_timeout: route.connect_timeout,
        io_timeout: route.io_timeout,
    }
}

impl Batch {
    /// The batch's subscribers: the log, the journal, then [`Batch::sinks`].
    fn bus(&self) -> Bus {
        let mut bus = Bus::new().with(Arc::new(LogSink));
        if let Some(j) = &self.journal {
            bus = bus.with(Arc::new(JournalSink(Arc::clone(j))));
        }
        self.sinks.iter().fold(bus, |b, s| b.with(Arc::clone(s)))
    }

    /// Tell the subscribers of an end no lane reported (its worker died).
    pub fn announce(&self, o: &Outcome) {
        self.bus().emit(&Event {
            package: o.package,
            file: o.file.clone(),
            host: o.host.clone(),
            kind: EventKind::Finished(Box::new(o.clone())),
        });
    }
}

struct Lane {
    config: Arc<Config>,
    netrc: Arc<Netrc>,
    bus: Arc<Bus>,
    when: DateTime<Local>,
    dry_run: bool,
    group: Arc<Group>,
    host_state: Arc<Mutex<HostState>>,
    ssh: Option<SshSession>,
    ftp: Option<FtpSession>,
    /// Temporary files a broken connection kept this lane from removing:
    /// removed as soon as it has a session again.
    leftovers: Vec<String>,
    /// The plan's steps of the delivery in hand, and its package and name.
    steps: Vec<Step>,
    current: (Option<i64>, String),
    /// The connect error of a streaming start, for the plain path's first
    /// attempt (a dead host is not tried twice for it).
    stashed: Option<TransferError>,
    /// A rollout's host: its gates may still fail it, so the end of each
    /// delivery is told by the rollout, not by the lane.
    hold_end: bool,
}

/// A verified upload, under its final name on the host.
struct Placed {
    transport: Transport,
    bytes: u64,
    /// The remote directory, absolute (relative to the FTP login directory
    /// only after an FTP upload to a host whose SSH is unusable).
    dir: String,
    /// The per-name install lock this upload holds on the host (see
    /// [`crate::lock`]), released once the install has run.
    lock: Option<Lock>,
    /// The FTP session was not encrypted.
    cleartext: bool,
    /// Put in place by the lane's pipeline ([`stream`]).
    streamed: bool,
}

/// Where one attempt puts the file, decided before it is sent.
struct Target {
    /// The directory the transport sends to: absolute for SCP, as the
    /// route says for FTP.
    upload_dir: String,
    /// The directory the file ends up in, as the install sees it.
    dir: String,
    tmp_name: String,
    /// The install lock, taken before the upload (FTP, where SSH works).
    lock: Option<Lock>,
    /// Take the install lock when publishing (SCP, an install follows).
    lock_at_publish: bool,
}

impl Target {
    /// The temporary file on the host.
    fn tmp(&self) -> String {
        remote_join(&self.dir, &self.tmp_name)
    }
}

/// How sending failed: before anything was sent (no session), or in the
/// upload.
enum Failed {
    Before(TransferError),
    Upload(TransferError),
}

struct InstallResult {
    status: i32,
    signal: Option<String>,
    output: String,
}

impl Lane {
    /// Stream what can be streamed ([`Lane::stream`]), then deliver the
    /// rest one by one, the plain way.
    fn drain(mut self, out: Sender<Outcome>) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stream(&out)));
        let left = r.unwrap_or_else(|_| {
            log::error!("internal error: a streaming lane died (see the log)");
            self.ssh = None;
            Vec::new()
        });
        for d in left {
            self.deliver_one(d, &out);
        }
        while let Ok(d) = self.group.rx.try_recv() {
            self.deliver_one(d, &out);
        }
        if let Some(f) = self.ftp.take() {
            f.quit();
        }
    }

    fn deliver_one(&mut self, Delivery { item, steps }: Delivery, out: &Sender<Outcome>) {
        let started = Instant::now();
        self.steps = steps;
        self.current = (item.package, item.name.clone());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.deliver(&item)));
        let o = r.unwrap_or_else(|_| {
            // the lane's sessions may be in any state: start afresh
            self.ssh = None;
            self.ftp = None;
            let mut o = Outcome::start(&item, &self.group.host, self.route());
            o.error = Some("internal error: the worker died (see the log)".into());
            self.finish(&item, o, started)
        });
        let _ = out.send(o);
    }

    fn route(&self) -> &Route {
        &self.config.routes[self.group.route]
    }

    /// Does the plan have this step for the delivery in hand?
    fn planned(&self, step: Step) -> bool {
        self.steps.contains(&step)
    }

    /// Tell the bus (the journal, the log, …) what happened to `item` here.
    fn emit(&self, item: &Item, kind: EventKind) {
        self.bus.emit(&Event {
            package: item.package,
            file: item.name.clone(),
            host: self.group.host.clone(),
            kind,
        });
    }

    /// A progress callback for `item` that emits [`EventKind::Progress`].
    fn progress(&self, item: &Item, total: u64) -> impl FnMut(u64) {
        let bus = Arc::clone(&self.bus);
        let (package, file, host) = (item.package, item.name.clone(), self.group.host.clone());
        move |bytes| {
            bus.emit(&Event {
                package,
                file: file.clone(),
                host: host.clone(),
                kind: EventKind::Progress { bytes, total },
            })
        }
    }

    /// Fold `kind` into the outcome, then emit it.
    fn step(&self, item: &Item, o: &mut Outcome, kind: EventKind) {
        o.apply(&kind);
        self.emit(item, kind);
    }

    fn ssh_target(&self, route: &Route) -> SshTarget {
        ssh_target_of(route, &self.group.host, &self.netrc)
    }

    fn unusable(&self, t: Transport) -> Option<TransferError> {
        let hs = self.host_state.lock().ok()?;
        hs.unusable
            .iter()
            .find(|(x, _)| *x == t)
            .map(|(_, e)| e.clone())
    }

    fn mark_unusable(&self, t: Transport, e: &TransferError) {
        if let Ok(mut hs) = self.host_state.lock() {
            if !hs.unusable.iter().any(|(x, _)| *x == t) {
                hs.unusable.push((t, e.clone()));
            }
        }
    }

    fn ssh(&mut self) -> Result<&mut SshSession, TransferError> {
        if let Some(e) = self.unusable(Transport::Scp) {
            return Err(e);
        }
        if let Some(e) = self.stashed.take() {
            return Err(e);
        }
        if self.ssh.as_ref().is_some_and(|s| !s.is_alive()) {
            self.ssh = None;
        }
        if self.ssh.is_none() {
            let t = self.ssh_target(self.route());
            self.bus.emit(&Event {
                package: self.current.0,
                file: self.current.1.clone(),
                host: self.group.host.clone(),
                kind: EventKind::Connecting {
                    transport: Transport::Scp,
                },
            });
            match SshSession::connect(&t) {
                Ok(s) => self.ssh = Some(s),
                Err(e) => {
                    // auth and host-key failures will not change for the batch
                    if matches!(e.kind, ErrorKind::Auth | ErrorKind::HostKey) {
                        self.mark_unusable(Transport::Scp, &e);
                    }
                    return Err(e);
                }
            }
        }
        match self.ssh.as_mut() {
            Some(s) => Ok(s),
            None => Err(TransferError::detail(
                ErrorKind::Connect,
                Op::Session,
                Some(Protocol::Ssh),
                &self.group.host,
                "no session",
            )),
        }
    }

    /// Upload, verify, publish and install one file on this lane's host.
    fn deliver(&mut self, item: &Item) -> Outcome {
        let started = Instant::now();
        let config = Arc::clone(&self.config);
        let routed = item.routed(&config);
        let mut o = Outcome::start(item, &self.group.host, routed.route);
        if let Err(e) = self.deliver_steps(item, &routed, &mut o) {
            o.error = Some(e);
        }
        self.finish(item, o, started)
    }

    fn deliver_steps(
        &mut self,
        item: &Item,
        routed: &Routed<'_>,
        o: &mut Outcome,
    ) -> Result<(), String> {
        let host = self.group.host.clone();
        let route = routed.route;
        if crate::interrupt::requested() {
            o.interrupted = true;
            return Err("interrupted before it started".into());
        }
        let rel = route::dest_dir(routed, &host, &self.when).map_err(|e| e.0)?;
        if self.dry_run {
            o.remote_path = Some(remote_join(&route::home_relative(&rel), &item.name));
            o.state = "dry-run".into();
            o.ok = true;
            return Ok(());
        }
        if let Some(reason) = self.host_state.lock().ok().and_then(|h| h.dead.clone()) {
            return Err(format!(
                "{reason} (host already failed in this batch; not tried again)"
            ));
        }
        let resumed = item
            .resume
            .get(&host)
            .filter(|_| self.planned(Step::CheckInPlace));
        let placed = match resumed {
            Some(dir) => self
                .find_placed(item, route, dir)
                .map_err(|e| e.to_string())?,
            None => self.upload_with_retries(item, route, &rel, o)?,
        };
        // journaled now, before the install: a crash during the install
        // installs this file where it is on restart, never uploads it again
        let uploaded = uploaded_event(&placed, &item.name, o, resumed.is_some());
        self.step(item, o, uploaded);
        let cmd = route::install_command(routed, &host, &placed.dir);
        let Some(cmd) = cmd.filter(|_| self.planned(Step::Install)) else {
            o.state = "uploaded".into();
            o.ok = true;
            return Ok(());
        };
        self.emit(item, EventKind::Installing);
        let res = self.install(route, &placed, &cmd, o);
        self.release(&placed);
        self.judge_install(item, route, res, o)
    }

    /// Fill in the elapsed time and emit the end.
    fn finish(&self, item: &Item, mut o: Outcome, started: Instant) -> Outcome {
        o.elapsed_ms = started.elapsed().as_millis() as u64;
        if !self.hold_end {
            self.emit(item, EventKind::Finished(Box::new(o.clone())));
        }
        o
    }

    fn upload_with_retries(
        &mut self,
        item: &Item,
        route: &Route,
        rel: &str,
        o: &mut Outcome,
    ) -> Result<Placed, String> {
        let host = self.group.host.clone();
        let backoff = crate::retry::Backoff::new(route.retry_delay);
        let mut attempt = 0;
        loop {
            attempt += 1;
            o.attempts = attempt;
            let e = match self.upload_chain(item, route, rel, o) {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            if e.kind == ErrorKind::Interrupted || crate::interrupt::requested() {
                o.interrupted = true;
                return Err(format!("interrupted: {e}"));
            }
            if e.kind.is_transient() && attempt <= route.retries {
                let delay = backoff.delay(attempt);
                let retrying = EventKind::Retrying {
                    attempt,
                    delay,
                    error: e.to_string(),
                };
                self.emit(item, retrying);
                crate::interrupt::sleep(delay); // retry backoff
                continue;
            }
            if matches!(
                e.kind,
                ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Auth | ErrorKind::HostKey
            ) {
                if let Ok(mut hs) = self.host_state.lock() {
                    hs.dead.get_or_insert_with(|| e.clone());
                }
            }
            o.retry = e.kind.is_transient();
            log::error!("{}: {host}: failed: {e}", item.name);
            return Err(e.to_string());
        }
    }

    /// Try each transport in order; fall through on "cannot use this
    /// transport" failures, recording why.
    fn upload_chain(
        &mut self,
        item: &Item,
        route: &Route,
        rel: &str,
        o: &mut Outcome,
    ) -> Result<Placed, TransferError> {
        let host = self.group.host.clone();
        let mut errors: Vec<(Transport, TransferError)> = Vec::new();
        for (i, t) in route.transfer.iter().enumerate() {
            let last = i + 1 == route.transfer.len();
            match self.place(*t, item, route, rel, o.attempts) {
                Ok(u) => {
                    if !errors.is_empty() {
                        o.fallback_reason = Some(joined(&errors));
                    }
                    return Ok(u);
                }
                Err(e) if e.kind.allows_fallback() && !last => {
                    let falling = EventKind::FallingBack {
                        from: *t,
                        to: route.transfer[i + 1],
                        reason: e.to_string(),
                    };
                    self.emit(item, falling);
                    errors.push((*t, e));
                }
                Err(e) if errors.is_empty() => return Err(e),
                Err(e) => {
                    errors.push((*t, e.clone()));
                    // transient only if every transport failed transiently
                    let kind = if errors.iter().all(|(_, e)| e.kind.is_transient()) {
                        e.kind
                    } else if errors.iter().any(|(_, e)| e.kind == ErrorKind::Auth) {
                        ErrorKind::Auth
                    } else {
                        e.kind
                    };
                    return Err(TransferError::detail(
                        kind,
                        Op::Transfer,
                        None,
                        &host,
                        "all transports failed",
                    )
                    .cause(Cause::Transports(errors)));
                }
            }
        }
        Err(TransferError::detail(
            ErrorKind::Unavailable,
            Op::Transfer,
            None,
            &host,
            "no transport configured",
        ))
    }

    /// Put the file in place by transport `t`: prepare (the directory, the
    /// journaled temporary name, the install lock), send it through the
    /// session's [`Uploader`], then verify and publish over SSH what the
    /// transport did not publish itself.
    fn place(
        &mut self,
        t: Transport,
        item: &Item,
        route: &Route,
        rel: &str,
        attempt: u32,
    ) -> Result<Placed, TransferError> {
        let mut at = self.prepare(t, item, route, rel, attempt)?;
        let (via, up) = match self.send(t, item, route, &at) {
            Ok(x) => x,
            Err(failed) => return Err(self.undo(t, &at, failed)),
        };
        let lock = if up.published {
            at.lock.take()
        } else {
            self.emit(item, EventKind::Verifying);
            let ssh = self.ssh()?;
            let sha = up.sha256.as_deref();
            match publish(ssh, route, &at, &item.name, up.bytes, sha) {
                Ok(lock) => lock,
                Err(e) => {
                    let tmp = at.tmp();
                    if !remove_remote(ssh, &tmp) {
                        self.leftovers.push(tmp);
                    }
                    return Err(e);
                }
            }
        };
        Ok(Placed {
            transport: via,
            bytes: up.bytes,
            dir: at.dir,
            lock,
            cleartext: up.cleartext,
            streamed: false,
        })
    }

    /// Where transport `t` puts the file. SCP: the absolute dest dir
    /// (created), the temporary name journaled, earlier temporary files
    /// removed. FTP: the dir as the route says; where SSH works, the
    /// absolute dir is made and the install lock taken before the upload.
    fn prepare(
        &mut self,
        t: Transport,
        item: &Item,
        route: &Route,
        rel: &str,
        attempt: u32,
    ) -> Result<Target, TransferError> {
        let tmp_name = crate::transport::temp_name();
        if t == Transport::Ftp {
            return self.prepare_ftp(item, route, rel, tmp_name);
        }
        let lock = self.planned(Step::Lock);
        item.local()?;
        let ssh = self.ssh()?;
        let dir = route::absolute_dir(rel, &ssh.home()?);
        ssh.mkdir_p(&dir)?;
        let at = Target {
            upload_dir: dir.clone(),
            dir,
            tmp_name,
            lock: None,
            lock_at_publish: lock,
        };
        // the temporary name is journaled first, so a crash leaves nothing
        // that the next attempt does not remove
        let uploading = EventKind::Uploading {
            attempt,
            temp_path: at.tmp(),
        };
        self.emit(item, uploading);
        self.remove_stale_temp(item);
        Ok(at)
    }

    fn prepare_ftp(
        &mut self,
        item: &Item,
        route: &Route,
        rel: &str,
        tmp_name: String,
    ) -> Result<Target, TransferError> {
        if let Some(e) = self.unusable(Transport::Ftp) {
            return Err(e);
        }
        if item.name.contains(['\n', '\r']) {
            let why = "a file name with a newline cannot be sent over FTP";
            let e = TransferError::detail(
                ErrorKind::Unavailable,
                Op::Upload,
                Some(Protocol::Ftp),
                &self.group.host,
                why,
            );
            return Err(e.protocol_only());
        }
        // the install needs SSH; where it works, it gives the absolute dir
        // and takes the install lock before the file is published
        let mut dir = rel.to_string();
        let mut lock = None;
        if self.planned(Step::Lock) {
            if let Ok(ssh) = self.ssh() {
                if let Ok(home) = ssh.home() {
                    dir = route::absolute_dir(rel, &home);
                    ssh.mkdir_p(&dir)?;
                    lock = Some(lock::take(ssh, route, &dir, &item.name)?);
                }
            }
        }
        Ok(Target {
            upload_dir: rel.to_string(),
            dir,
            tmp_name,
            lock,
            lock_at_publish: false,
        })
    }

    /// Send the file through transport `t`'s session (connected first).
    fn send(
        &mut self,
        t: Transport,
        item: &Item,
        route: &Route,
        at: &Target,
    ) -> Result<(Transport, Uploaded), Failed> {
        self.connect(t, item, route).map_err(Failed::Before)?;
        let file = item.local().map_err(Failed::Before)?;
        let mut progress = self.progress(item, file.size);
        let job = Upload {
            src: Source {
                file: &file.file,
                size: file.size,
                mode: file.mode,
            },
            dir: &at.upload_dir,
            tmp_name: &at.tmp_name,
            name: &item.name,
            want_sha: route.verify == Verify::Sha256,
        };
        let up = self.uploader(t).map_err(Failed::Before)?;
        let via = up.transport();
        let sent = up.upload(job, &mut progress);
        sent.map(|u| (via, u)).map_err(Failed::Upload)
    }

    /// A session for transport `t`: SSH (re)connected if it is not alive,
    /// FTP connected if there is none.
    fn connect(&mut self, t: Transport, item: &Item, route: &Route) -> Result<(), TransferError> {
        match t {
            Transport::Scp => self.ssh().map(|_| ()),
            Transport::Ftp if self.ftp.is_none() => self.ftp_connect(item, route),
            Transport::Ftp => Ok(()),
        }
    }

    fn uploader(&mut self, t: Transport) -> Result<&mut dyn Uploader, TransferError> {
        let host = &self.group.host;
        let (session, protocol): (Option<&mut dyn Uploader>, _) = match t {
            Transport::Scp => (self.ssh.as_mut().map(|s| s as _), Protocol::Ssh),
            Transport::Ftp => (self.ftp.as_mut().map(|s| s as _), Protocol::Ftp),
        };
        session.ok_or_else(|| {
            let e = TransferError::detail(
                ErrorKind::Connect,
                Op::Session,
                Some(protocol),
                host,
                "no session",
            );
            if t == Transport::Ftp {
                e.protocol_only()
            } else {
                e
            }
        })
    }

    /// After a failed upload: SCP asks the host why (its errors are
    /// generic) and removes the temporary file; a broken FTP session is not
    /// reused, and the install lock FTP took is released.
    fn undo(&mut self, t: Transport, at: &Target, failed: Failed) -> TransferError {
        let e = match failed {
            Failed::Before(e) => {
                if t == Transport::Ftp {
                    self.release_early(at);
                }
                return e;
            }
            Failed::Upload(e) => e,
        };
        if t == Transport::Ftp {
            if matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout) {
                self.ftp = None;
            }
            self.release_early(at);
            return e;
        }
        let Some(ssh) = self.ssh.as_mut() else {
            return e;
        };
        let e = if ssh.is_alive() && e.kind != ErrorKind::Local {
            ssh.diagnose_scp(&at.upload_dir).unwrap_or(e)
        } else {
            e
        };
        let tmp = at.tmp();
        if !remove_remote(ssh, &tmp) {
            self.leftovers.push(tmp);
        }
        if e.kind == ErrorKind::Unavailable {
            self.mark_unusable(Transport::Scp, &e);
        }
        e
    }

    /// The install lock taken before an upload that failed.
    fn release_early(&mut self, at: &Target) {
        if let Some(l) = &at.lock {
            lock::release(self.ssh.as_mut(), l);
        }
    }

    /// Temporary files earlier attempts left on this host — a crashed run's
    /// (their names are in the journal) and this lane's whose connection
    /// broke — removed before this attempt.
    fn remove_stale_temp(&mut self, item: &Item) {
        for old in std::mem::take(&mut self.leftovers) {
            if let Ok(ssh) = self.ssh() {
                remove_remote(ssh, &old);
            }
        }
        let Some(tmp) = item.stale_temps.get(&self.group.host) else {
            return;
        };
        if let Ok(ssh) = self.ssh() {
            log::debug!("{}: removing {tmp} left by an earlier attempt", item.name);
            remove_remote(ssh, tmp);
        }
    }

    fn ftp_connect(&mut self, item: &Item, route: &Route) -> Result<(), TransferError> {
        let host = self.group.host.clone();
        let creds = credentials::resolve(route, &host, &self.netrc);
        let t = FtpTarget {
            host: &host,
            port: route.ftp_port,
            login: &creds.login,
            password: creds.password.as_ref(),
            account: creds.account.as_deref(),
            ftps: route.ftps,
            ca_file: route.ftp_ca_file.as_deref(),
            passive: route.ftp_passive,
            rename: route.ftp_rename,
            cleartext: route.ftp_cleartext,
            connect_timeout: route.connect_timeout,
            io_timeout: route.io_timeout,
        };
        self.emit(
            item,
            EventKind::Connecting {
                transport: Transport::Ftp,
            },
        );
        match FtpSession::connect(&t) {
            Ok(s) => {
                self.ftp = Some(s);
                Ok(())
            }
            Err(e) => {
                // a rejected login or a refused cleartext session will
                // not change for the batch
                if matches!(e.kind, ErrorKind::Auth | ErrorKind::Unavailable) {
                    self.mark_unusable(Transport::Ftp, &e);
                }
                Err(e)
            }
        }
    }

    /// A file a crashed run uploaded and published: check it is there,
    /// whole, and install it where it is.
    fn find_placed(
        &mut self,
        item: &Item,
        route: &Route,
        dir: &str,
    ) -> Result<Placed, TransferError> {
        let lock = self.planned(Step::Lock);
        let file = item.local()?;
        let fin = remote_join(dir, &item.name);
        let ssh = self.ssh()?;
        let size = if ssh.has_sftp()? {
            ssh.sftp_size(&fin)?
        } else {
            None
        };
        if ssh.has_sftp().unwrap_or(false) && size != Some(file.size) {
            let why = format!(
                "resuming: {fin} is not on the host as uploaded (size {size:?}, expected {}); it is sent again on the next attempt",
                file.size
            );
            let host = &ssh.target().host;
            let e = TransferError::detail(
                ErrorKind::Verify,
                Op::Verify,
                Some(Protocol::Sftp),
                host,
                why,
            );
            return Err(e.path(fin));
        }
        let lock = if lock {
            Some(lock::take(ssh, route, dir, &item.name)?)
        } else {
            None
        };
        Ok(Placed {
            transport: Transport::Scp,
            bytes: file.size,
            dir: dir.to_string(),
            lock,
            cleartext: false,
            streamed: false,
        })
    }

    fn install(
        &mut self,
        route: &Route,
        placed: &Placed,
        cmd: &str,
        o: &Outcome,
    ) -> Result<InstallResult, TransferError> {
        let reason = o.fallback_reason.clone();
        let ftp = placed.transport == Transport::Ftp;
        let host = self.group.host.clone();
        let ssh = self.ssh().map_err(|e| {
            if !ftp {
                return e;
            }
            let why = reason.unwrap_or_else(|| e.to_string());
            let msg = format!(
                "uploaded by FTP, but SSH is not available to run the install command ({why})"
            );
            TransferError::detail(e.kind, Op::Install, Some(Protocol::Ssh), &host, msg)
        })?;
        let out = ssh.run_script(
            &install_script(&placed.dir, cmd),
            route.install_timeout,
            None,
        )?;
        Ok(InstallResult {
            status: out.status,
            signal: out.signal,
            output: out.output,
        })
    }

    fn release(&mut self, placed: &Placed) {
        if let Some(l) = &placed.lock {
            lock::release(self.ssh.as_mut(), l);
        }
    }

    fn judge_install(
        &self,
        item: &Item,
        route: &Route,
        res: Result<InstallResult, TransferError>,
        o: &mut Outcome,
    ) -> Result<(), String> {
        let host = &self.group.host;
        let r = match res {
            Ok(r) => r,
            Err(e) => {
                // the file is in place; a retry installs it there
                o.retry = matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout);
                log::error!("{}: {host}: install failed: {e}", item.name);
                return Err(format!("install failed: {e}"));
            }
        };
        o.exit_status = Some(r.status);
        o.output_tail = (!r.output.is_empty()).then(|| r.output.clone());
        if r.status == 0 && r.signal.is_none() {
            o.state = "installed".into();
            o.ok = true;
            return Ok(());
        }
        let why = match (&r.signal, r.status) {
            (Some(s), _) => format!("killed by signal {s}"),
            (None, 124) => format!(
                "did not finish within install_timeout ({:.0}s) and was killed",
                route.install_timeout.as_secs_f64()
            ),
            (None, CANNOT_CD) => format!("cannot enter {}", o.uploaded_to.as_deref().unwrap_or("")),
            (None, n) => format!("exit status {n}"),
        };
        let msg = format!("install command failed: {why}");
        log::error!("{}: {host}: {msg}; last output:\n{}", item.name, r.output);
        Err(msg)
    }
}

/// The file is in place under `name`.
fn uploaded_event(placed: &Placed, name: &str, o: &Outcome, resumed: bool) -> EventKind {
    EventKind::Uploaded {
        transport: placed.transport,
        bytes: placed.bytes,
        remote_path: remote_join(&placed.dir, name),
        attempt: o.attempts,
        fallback_reason: o.fallback_reason.clone(),
        cleartext: placed.cleartext,
        resumed,
        streamed: placed.streamed,
    }
}

/// Best effort: remove a remote file (a temporary one) over SFTP, else a
/// shell. `false`: the session is broken, it could not be tried.
fn remove_remote(ssh: &mut SshSession, path: &str) -> bool {
    if !ssh.is_alive() {
        return false;
    }
    let r = if ssh.has_sftp().unwrap_or(false) {
        ssh.sftp_unlink(path)
    } else {
        let io = ssh.target().io_timeout;
        ssh.exec(&format!("rm -f -- {}", shell_quote(path)), io)
            .map(|_| ())
    };
    if let Err(e) = r {
        log::debug!("cannot remove {path}: {e}");
    }
    ssh.is_alive()
}

/// Verify the temporary file, take the install lock (when an install
/// follows) and rename it into place — over SFTP (no remote process) where
/// the host has it, else in one script. Returns the lock taken.
fn publish(
    ssh: &mut SshSession,
    route: &Route,
    at: &Target,
    name: &str,
    bytes: u64,
    sha: Option<&str>,
) -> Result<Option<Lock>, TransferError> {
    let (dir, tmp_name, lock) = (at.dir.as_str(), at.tmp_name.as_str(), at.lock_at_publish);
    let tmp = remote_join(dir, tmp_name);
    let fin = remote_join(dir, name);
    // these messages name the host without its port
    let failed = |ssh: &SshSession, kind, op| ssh.target().err(kind, Protocol::Ssh, op).host_only();
    if !ssh.has_sftp()? {
        let lock = lock.then(|| lock::shell_lock(route, dir, name));
        let take = lock.as_ref().map(|(script, _)| script.as_str());
        let script = publish_script(route, dir, tmp_name, name, bytes, sha, take);
        let out = ssh.run_script(&script, route.io_timeout + lock::wait_limit(route), None)?;
        return match out.status {
            0 => Ok(lock.map(|(_, l)| l)),
            VERIFY_FAILED => Err(failed(ssh, ErrorKind::Verify, Op::Verify)
                .step("verification failed")
                .cause(out.output.trim())
                .path(tmp)),
            n => Err(failed(ssh, ErrorKind::Remote, Op::Rename)
                .step(format!("cannot rename {tmp} into place (status {n})"))
                .cause(out.output.trim())
                .path(fin)),
        };
    }
    match route.verify {
        Verify::None => {}
        Verify::Size => {
            let on_host = ssh.sftp_size(&tmp)?;
            if on_host != Some(bytes) {
                let on_host = on_host
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "no".into());
                return Err(failed(ssh, ErrorKind::Verify, Op::Verify)
                    .step("verification failed")
                    .cause(format!(
                        "{tmp} has {on_host} bytes on the host, sent {bytes}"
                    ))
                    .path(tmp));
            }
        }
        Verify::Sha256 => {
            let script = verify_script(route.verify, dir, tmp_name, bytes, sha);
            let out = ssh.run_script(&script, route.io_timeout, None)?;
            if !out.success() {
                return Err(failed(ssh, ErrorKind::Verify, Op::Verify)
                    .step("verification failed")
                    .cause(out.output.trim())
                    .path(tmp));
            }
        }
    }
    let lock = if lock {
        Some(lock::take(ssh, route, dir, name)?)
    } else {
        None
    };
    if let Err(e) = ssh.sftp_rename_over(&tmp, &fin) {
        if let Some(l) = &lock {
            lock::release(Some(ssh), l);
        }
        return Err(e);
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_and_lock_names_are_short_unique_and_plain() {
        let a = crate::transport::temp_name();
        let b = crate::transport::temp_name();
        assert_ne!(a, b);
        assert!(
            a.starts_with(".dispatch-") && a.ends_with(".part") && a.len() < 40,
            "{a}"
        );
        assert!(is_temp_path(&format!("/h/x/{a}")));
        assert!(!is_temp_path("/h/x/.app.tgz.part"));
    }
}
