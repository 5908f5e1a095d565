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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Local};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

use crate::config::{Config, Route, Transport, Verify};
use crate::credentials::{self, Netrc};
use crate::journal::{Detail, Journal, State};
use crate::route::{self, remote_join, shell_quote, Routed};
use crate::transport::ftp::{FtpSession, FtpTarget};
use crate::transport::ssh::{SshSession, SshTarget};
use crate::transport::{ErrorKind, TransferError};

/// A file to send, already routed.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: PathBuf,
    pub name: String,
    /// Index of the route in `config.routes`.
    pub route: usize,
    pub groups: BTreeMap<String, String>,
    /// Journal package id, if recorded.
    pub package: Option<i64>,
    /// Send to these hosts of the route only (a retry); `None` = all.
    pub only_hosts: Option<Vec<String>>,
}

impl Item {
    pub fn new(config: &Config, path: PathBuf) -> Option<Item> {
        let r = route::route(config, &path)?;
        let idx = config
            .routes
            .iter()
            .position(|x| std::ptr::eq(x, r.route))?;
        Some(Item {
            name: r.name,
            groups: r.groups,
            route: idx,
            path,
            package: None,
            only_hosts: None,
        })
    }

    fn routed<'c>(&self, config: &'c Config) -> Routed<'c> {
        Routed {
            route: &config.routes[self.route],
            name: self.name.clone(),
            groups: self.groups.clone(),
        }
    }
}

/// How one file × host ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub file: String,
    pub path: String,
    pub host: String,
    pub section: String,
    /// `installed`, `uploaded` (no install command), `failed`.
    pub state: String,
    pub ok: bool,
    pub transport: Option<String>,
    pub fallback_reason: Option<String>,
    pub remote_path: Option<String>,
    pub bytes: u64,
    pub attempts: u32,
    pub exit_status: Option<i32>,
    pub output_tail: Option<String>,
    pub error: Option<String>,
    pub elapsed_ms: u64,
    #[serde(skip)]
    pub package: Option<i64>,
}

/// Work for one connection: same host, port, login, transports.
struct Group {
    host: String,
    route: usize,
    rx: Receiver<Item>,
}

/// State shared by the lanes of one host: a host that failed for good is not
/// tried again in this batch; a transport that cannot be used is skipped.
#[derive(Default)]
struct HostState {
    dead: Option<String>,
    /// transport → why it is unusable (auth rejected, unreachable…)
    unusable: Vec<(Transport, TransferError)>,
}

pub struct Batch {
    pub config: Arc<Config>,
    pub netrc: Arc<Netrc>,
    pub journal: Option<Arc<Journal>>,
    pub when: DateTime<Local>,
    pub dry_run: bool,
}

impl Batch {
    /// Dispatch `items` to every host of their routes on `pool`; one
    /// [`Outcome`] per file × host is sent to `out` as it completes.
    pub fn run(&self, items: Vec<Item>, pool: &threadpool::ThreadPool, out: Sender<Outcome>) {
        // group by (route's connection parameters, host)
        struct Pending {
            host: String,
            route: usize,
            tx: Sender<Item>,
            rx: Receiver<Item>,
            count: usize,
        }
        let mut groups: Vec<Pending> = Vec::new();
        for item in items {
            let route = &self.config.routes[item.route];
            for host in &route.hosts {
                if item.only_hosts.as_ref().is_some_and(|o| !o.contains(host)) {
                    continue;
                }
                let pos = groups.iter().position(|g| {
                    &g.host == host && same_connection(&self.config.routes[g.route], route)
                });
                let pos = match pos {
                    Some(p) => p,
                    None => {
                        let (tx, rx) = crossbeam_channel::unbounded();
                        groups.push(Pending {
                            host: host.clone(),
                            route: item.route,
                            tx,
                            rx,
                            count: 0,
                        });
                        groups.len() - 1
                    }
                };
                if let (Some(j), Some(pkg)) = (&self.journal, item.package) {
                    journal_state(j, pkg, host, State::Queued, &Detail::default());
                }
                let g = &mut groups[pos];
                let _ = g.tx.send(item.clone());
                g.count += 1;
            }
        }
        let per_host = self.config.settings.max_sessions_per_host;
        let mut host_states: BTreeMap<String, Arc<Mutex<HostState>>> = BTreeMap::new();
        for Pending {
            host,
            route,
            tx,
            rx,
            count,
        } in groups
        {
            drop(tx);
            let hs = Arc::clone(host_states.entry(host.clone()).or_default());
            let group = Arc::new(Group { host, route, rx });
            for _ in 0..per_host.min(count) {
                let lane = Lane {
                    config: Arc::clone(&self.config),
                    netrc: Arc::clone(&self.netrc),
                    journal: self.journal.clone(),
                    when: self.when,
                    dry_run: self.dry_run,
                    group: Arc::clone(&group),
                    host_state: Arc::clone(&hs),
                    ssh: None,
                    ftp: None,
                };
                let out = out.clone();
                pool.execute(move || lane.drain(out));
            }
        }
    }
}

fn same_connection(a: &Route, b: &Route) -> bool {
    a.port == b.port
        && a.ftp_port == b.ftp_port
        && a.login == b.login
        && a.password == b.password
        && a.identity_file == b.identity_file
        && a.transfer == b.transfer
        && a.host_key_check == b.host_key_check
        && a.known_hosts == b.known_hosts
        && a.ftps == b.ftps
}

fn journal_state(j: &Journal, pkg: i64, host: &str, state: State, d: &Detail) {
    if let Err(e) = j.set_state(pkg, host, state, d) {
        log::warn!("journal: cannot record {state} for {host}: {e}");
    }
}

struct Lane {
    config: Arc<Config>,
    netrc: Arc<Netrc>,
    journal: Option<Arc<Journal>>,
    when: DateTime<Local>,
    dry_run: bool,
    group: Arc<Group>,
    host_state: Arc<Mutex<HostState>>,
    ssh: Option<SshSession>,
    ftp: Option<FtpSession>,
}

/// What a successful upload left behind.
struct Uploaded {
    transport: Transport,
    bytes: u64,
    /// Installed (or finalised) in the same remote call.
    done: Option<InstallResult>,
}

struct InstallResult {
    status: i32,
    signal: Option<String>,
    output: String,
}

impl Lane {
    fn drain(mut self, out: Sender<Outcome>) {
        while let Ok(item) = self.group.rx.try_recv() {
            let o = self.deliver(&item);
            let _ = out.send(o);
        }
        if let Some(f) = self.ftp.take() {
            f.quit();
        }
    }

    fn route(&self) -> &Route {
        &self.config.routes[self.group.route]
    }

    fn record(&self, item: &Item, state: State, d: &Detail) {
        if let (Some(j), Some(pkg)) = (&self.journal, item.package) {
            journal_state(j, pkg, &self.group.host, state, d);
        }
    }

    fn ssh_target(&self, route: &Route) -> SshTarget {
        let creds = credentials::resolve(route, &self.group.host, &self.netrc);
        SshTarget {
            host: self.group.host.clone(),
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
        if self.ssh.as_ref().is_some_and(|s| !s.is_alive()) {
            self.ssh = None;
        }
        if self.ssh.is_none() {
            let t = self.ssh_target(self.route());
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
            None => Err(TransferError::new(ErrorKind::Connect, "no session")),
        }
    }

    fn deliver(&mut self, item: &Item) -> Outcome {
        let started = Instant::now();
        let host = self.group.host.clone();
        let config = Arc::clone(&self.config);
        let routed = item.routed(&config);
        let route = routed.route;
        let mut o = Outcome {
            file: item.name.clone(),
            path: item.path.display().to_string(),
            host: host.clone(),
            section: route.section.clone(),
            state: "failed".into(),
            ok: false,
            transport: None,
            fallback_reason: None,
            remote_path: None,
            bytes: 0,
            attempts: 0,
            exit_status: None,
            output_tail: None,
            error: None,
            elapsed_ms: 0,
            package: item.package,
        };
        let finish = |mut o: Outcome, lane: &Lane| {
            o.elapsed_ms = started.elapsed().as_millis() as u64;
            let d = Detail {
                transport: o.transport.clone(),
                fallback_reason: o.fallback_reason.clone(),
                attempt: o.attempts,
                remote_path: o.remote_path.clone(),
                exit_status: o.exit_status,
                output_tail: o.output_tail.clone(),
                error: o.error.clone(),
                elapsed_ms: Some(o.elapsed_ms),
            };
            let st = match o.state.as_str() {
                "installed" => State::Installed,
                "uploaded" => State::Uploaded,
                _ => State::Failed,
            };
            lane.record(item, st, &d);
            o
        };
        let dir = match route::dest_dir(&routed, &host, &self.when) {
            Ok(d) => d,
            Err(e) => {
                o.error = Some(e.0);
                return finish(o, self);
            }
        };
        let remote = remote_join(&dir, &item.name);
        o.remote_path = Some(remote.clone());
        if self.dry_run {
            o.state = "dry-run".into();
            o.ok = true;
            o.elapsed_ms = started.elapsed().as_millis() as u64;
            return o;
        }
        if let Some(reason) = self.host_state.lock().ok().and_then(|h| h.dead.clone()) {
            o.error = Some(format!(
                "{reason} (host already failed in this batch; not tried again)"
            ));
            return finish(o, self);
        }
        let install = route::install_command(&routed, &host, &dir);
        self.record(item, State::Uploading, &Detail::default());

        // ---- upload, with retries around the transport chain
        let mut delay = route.retry_delay;
        let mut attempt = 0;
        let uploaded = loop {
            attempt += 1;
            o.attempts = attempt;
            match self.upload_chain(item, route, &dir, install.as_deref(), &mut o) {
                Ok(u) => break Ok(u),
                Err(e) if e.kind.is_transient() && attempt <= route.retries => {
                    log::warn!(
                        "{}: {host}: attempt {attempt} failed: {e}; retrying in {:.1}s",
                        item.name,
                        delay.as_secs_f64()
                    );
                    std::thread::sleep(delay); // retry backoff
                    delay = (delay * 2).min(Duration::from_secs(300));
                }
                Err(e) => break Err(e),
            }
        };
        let up = match uploaded {
            Ok(u) => u,
            Err(e) => {
                if matches!(
                    e.kind,
                    ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Auth | ErrorKind::HostKey
                ) && !matches!(e.kind, ErrorKind::Verify)
                {
                    if let Ok(mut hs) = self.host_state.lock() {
                        hs.dead.get_or_insert_with(|| e.msg.clone());
                    }
                }
                log::error!("{}: {host}: failed: {e}", item.name);
                o.error = Some(e.msg);
                return finish(o, self);
            }
        };
        o.transport = Some(up.transport.to_string());
        o.bytes = up.bytes;
        log::info!(
            "{}: {host}: uploaded {} bytes by {} in {:.2}s",
            item.name,
            up.bytes,
            up.transport,
            started.elapsed().as_secs_f64()
        );
        self.record(
            item,
            State::Uploaded,
            &Detail {
                transport: o.transport.clone(),
                fallback_reason: o.fallback_reason.clone(),
                attempt,
                remote_path: o.remote_path.clone(),
                ..Detail::default()
            },
        );

        // ---- install
        let Some(cmd) = install else {
            o.state = "uploaded".into();
            o.ok = true;
            return finish(o, self);
        };
        let res = match up.done {
            Some(r) => Ok(r),
            None => self.install_separately(route, &dir, &cmd, &o),
        };
        match res {
            Ok(r) => {
                o.exit_status = Some(r.status);
                o.output_tail = (!r.output.is_empty()).then(|| r.output.clone());
                if r.status == 0 && r.signal.is_none() {
                    o.state = "installed".into();
                    o.ok = true;
                    log::info!(
                        "{}: {host}: installed in {:.2}s",
                        item.name,
                        started.elapsed().as_secs_f64()
                    );
                } else {
                    let why = match (&r.signal, r.status) {
                        (Some(s), _) => format!("killed by signal {s}"),
                        (None, 124) => format!(
                            "did not finish within install_timeout ({:.0}s) and was killed",
                            route.install_timeout.as_secs_f64()
                        ),
                        (None, n) => format!("exit status {n}"),
                    };
                    let msg = format!("install command failed: {why}");
                    log::error!("{}: {host}: {msg}; last output:\n{}", item.name, r.output);
                    o.error = Some(msg);
                }
            }
            Err(e) => {
                log::error!("{}: {host}: install failed: {e}", item.name);
                o.error = Some(format!("install failed: {e}"));
            }
        }
        finish(o, self)
    }

    /// Try each transport in order; fall through on "cannot use this
    /// transport" failures, recording why.
    fn upload_chain(
        &mut self,
        item: &Item,
        route: &Route,
        dir: &str,
        install: Option<&str>,
        o: &mut Outcome,
    ) -> Result<Uploaded, TransferError> {
        let mut errors: Vec<(Transport, TransferError)> = Vec::new();
        for (i, t) in route.transfer.iter().enumerate() {
            let last = i + 1 == route.transfer.len();
            let r = match t {
                Transport::Scp => self.upload_scp(item, route, dir, install),
                Transport::Ftp => self.upload_ftp(item, route, dir),
            };
            match r {
                Ok(u) => {
                    if !errors.is_empty() {
                        let why = errors
                            .iter()
                            .map(|(t, e)| format!("{t}: {e}"))
                            .collect::<Vec<_>>()
                            .join("; ");
                        o.fallback_reason = Some(why);
                    }
                    return Ok(u);
                }
                Err(e) if e.kind.allows_fallback() && !last => {
                    log::warn!(
                        "{}: {}: {t} cannot be used ({e}); falling back to {}",
                        item.name,
                        self.group.host,
                        route.transfer[i + 1]
                    );
                    errors.push((*t, e));
                }
                Err(e) => {
                    if errors.is_empty() {
                        return Err(e);
                    }
                    errors.push((*t, e.clone()));
                    let msg = errors
                        .iter()
                        .map(|(t, e)| format!("{t}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ");
                    // transient only if every transport failed transiently
                    let kind = if errors.iter().all(|(_, e)| e.kind.is_transient()) {
                        e.kind
                    } else if errors.iter().any(|(_, e)| e.kind == ErrorKind::Auth) {
                        ErrorKind::Auth
                    } else {
                        e.kind
                    };
                    return Err(TransferError::new(
                        kind,
                        format!("all transports failed: {msg}"),
                    ));
                }
            }
        }
        Err(TransferError::new(
            ErrorKind::Unavailable,
            "no transport configured",
        ))
    }

    fn upload_scp(
        &mut self,
        item: &Item,
        route: &Route,
        dir: &str,
        install: Option<&str>,
    ) -> Result<Uploaded, TransferError> {
        let tmp_name = temp_name(&item.name);
        let tmp = remote_join(dir, &tmp_name);
        let want_sha = route.verify == Verify::Sha256;
        let ssh = self.ssh()?;
        ssh.mkdir_p(dir)?;
        let (bytes, sha) = match ssh.scp_upload(&item.path, dir, &tmp_name, want_sha) {
            Ok(x) => x,
            Err(e) => {
                let e = if ssh.is_alive() && e.kind != ErrorKind::Local {
                    ssh.diagnose_scp(dir).unwrap_or(e)
                } else {
                    e
                };
                if ssh.is_alive() {
                    let _ = ssh.exec(&format!("rm -f -- {}", shell_quote(&tmp)), route.io_timeout);
                }
                if e.kind == ErrorKind::Unavailable {
                    self.mark_unusable(Transport::Scp, &e);
                }
                return Err(e);
            }
        };
        // size check and rename over SFTP (no remote process), then the
        // install through the session's script runner
        if route.verify != Verify::Sha256 {
            let size = (route.verify == Verify::Size).then_some(bytes);
            match ssh.sftp_finalize(dir, &tmp_name, &item.name, size) {
                Ok(true) => {
                    let done = match install {
                        None => None,
                        Some(cmd) => {
                            let script = install_script(dir, cmd);
                            let out = ssh
                                .run_script(&script, route.install_timeout, None)
                                .map_err(|e| {
                                    TransferError::new(
                                        ErrorKind::Remote,
                                        format!("after upload: {e}"),
                                    )
                                })?;
                            Some(InstallResult {
                                status: out.status,
                                signal: out.signal,
                                output: out.output,
                            })
                        }
                    };
                    return Ok(Uploaded {
                        transport: Transport::Scp,
                        bytes,
                        done,
                    });
                }
                Ok(false) => {}
                Err(e) => {
                    if ssh.is_alive() {
                        let _ =
                            ssh.exec(&format!("rm -f -- {}", shell_quote(&tmp)), route.io_timeout);
                    }
                    return Err(e);
                }
            }
        }
        // verify the temp file, rename it into place and install, in one call
        let script = finalize_script(route, dir, &item.name, bytes, sha.as_deref(), install);
        let limit = route.io_timeout
            + if install.is_some() {
                route.install_timeout
            } else {
                Duration::ZERO
            };
        let out = ssh.run_script(&script, limit, Some(FINALIZED));
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                // the connection broke during verify/install: the upload may or
                // may not have been renamed; never re-upload for an install failure
                return Err(TransferError::new(
                    if install.is_some() {
                        ErrorKind::Remote
                    } else {
                        e.kind
                    },
                    format!("after upload: {e}"),
                ));
            }
        };
        if !out.marked {
            let _ = ssh.exec(&format!("rm -f -- {}", shell_quote(&tmp)), route.io_timeout);
            let kind = if out.status == VERIFY_FAILED {
                ErrorKind::Verify
            } else {
                ErrorKind::Remote
            };
            return Err(TransferError::new(
                kind,
                format!(
                    "ssh {}: {} (status {}): {}",
                    ssh.target().host,
                    if kind == ErrorKind::Verify {
                        "verification failed"
                    } else {
                        "cannot rename into place"
                    },
                    out.status,
                    out.output.trim()
                ),
            ));
        }
        let after = out.output.clone();
        Ok(Uploaded {
            transport: Transport::Scp,
            bytes,
            done: install.map(|_| InstallResult {
                status: out.status,
                signal: out.signal.clone(),
                output: after,
            }),
        })
    }

    fn upload_ftp(
        &mut self,
        item: &Item,
        route: &Route,
        dir: &str,
    ) -> Result<Uploaded, TransferError> {
        if let Some(e) = self.unusable(Transport::Ftp) {
            return Err(e);
        }
        if item.name.contains(['\n', '\r']) {
            return Err(TransferError::new(
                ErrorKind::Unavailable,
                "ftp: a file name with a newline cannot be sent over FTP",
            ));
        }
        let host = self.group.host.clone();
        let creds = credentials::resolve(route, &host, &self.netrc);
        if self.ftp.is_none() {
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
                connect_timeout: route.connect_timeout,
                io_timeout: route.io_timeout,
            };
            match FtpSession::connect(&t) {
                Ok(s) => self.ftp = Some(s),
                Err(e) => {
                    if e.kind == ErrorKind::Auth {
                        self.mark_unusable(Transport::Ftp, &e);
                    }
                    return Err(e);
                }
            }
        }
        let Some(ftp) = self.ftp.as_mut() else {
            return Err(TransferError::new(ErrorKind::Connect, "ftp: no session"));
        };
        match ftp.upload(&item.path, dir, &item.name) {
            Ok(u) => Ok(Uploaded {
                transport: Transport::Ftp,
                bytes: u.bytes,
                done: None,
            }),
            Err(e) => {
                // a broken session is not reused
                if let Some(s) = self.ftp.take() {
                    if !matches!(e.kind, ErrorKind::Connect | ErrorKind::Timeout) {
                        self.ftp = Some(s);
                    }
                }
                Err(e)
            }
        }
    }

    /// Install after an FTP upload: needs SSH.
    fn install_separately(
        &mut self,
        route: &Route,
        dir: &str,
        cmd: &str,
        o: &Outcome,
    ) -> Result<InstallResult, TransferError> {
        let reason = o.fallback_reason.clone();
        let ssh = self.ssh().map_err(|e| {
            let why = reason.unwrap_or_else(|| e.msg.clone());
            TransferError::new(
                e.kind,
                format!(
                    "uploaded by FTP, but SSH is not available to run the install command ({why})"
                ),
            )
        })?;
        let script = install_script(dir, cmd);
        let out = ssh.run_script(&script, route.install_timeout, None)?;
        Ok(InstallResult {
            status: out.status,
            signal: out.signal,
            output: out.output,
        })
    }
}

/// Marker printed once the file is verified and renamed; what follows is the
/// install command's output.
const FINALIZED: &str = "@@dispatch:finalized@@";
const VERIFY_FAILED: i32 = 230;

/// `.NAME.part`, with control characters replaced (the temp name travels in
/// the SCP protocol header, which is line-based).
pub fn temp_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect();
    format!(".{clean}.part")
}

/// The install command as the last step of a script: `eval`ed, so a syntax
/// error in it is the install's failure, not the script's. Scripts run with
/// `sh` semantics, stdin from /dev/null, stderr merged, bounded by
/// `install_timeout` on the host (see `SshSession::run_script`).
fn install_step(cmd: &str) -> String {
    format!("eval {}", shell_quote(cmd))
}

/// `cd` to the upload's directory and install; tagged to run without a
/// subshell when the install is one plain external command.
fn install_script(dir: &str, cmd: &str) -> String {
    let tag = if crate::route::is_simple_command(cmd) {
        crate::transport::ssh::IN_PLACE
    } else {
        ""
    };
    format!(
        "{tag}cd -- {} || exit 231; {}",
        shell_quote(dir),
        install_step(cmd)
    )
}

/// Verify the temp file, rename it into place, print the marker, then run the
/// install command — one round trip per file. Run by `sh` (through the
/// session's script runner) so the remote login shell does not matter.
fn finalize_script(
    route: &Route,
    dir: &str,
    name: &str,
    size: u64,
    sha: Option<&str>,
    install: Option<&str>,
) -> String {
    let d = shell_quote(dir);
    let tmp = shell_quote(&temp_name(name));
    let fin = shell_quote(name);
    let vf = VERIFY_FAILED;
    let mut s = format!("cd -- {d} || exit 231; ");
    match route.verify {
        Verify::None => {}
        Verify::Size => s.push_str(&format!(
            "s=$(wc -c < {tmp}) || exit {vf}; [ \"$s\" -eq {size} ] || {{ echo \"size on host: $s bytes, sent: {size}\"; exit {vf}; }}; "
        )),
        Verify::Sha256 => {
            let want = sha.unwrap_or_default();
            s.push_str(&format!(
                "h=$(sha256sum < {tmp}) || exit {vf}; h=${{h%% *}}; [ \"$h\" = {want} ] || {{ echo \"sha256 on host: $h, sent: {want}\"; exit {vf}; }}; "
            ));
        }
    }
    s.push_str(&format!(
        "mv -f -- {tmp} {fin} || exit 232; echo {FINALIZED}; "
    ));
    if let Some(cmd) = install {
        s.push_str(&install_step(cmd));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `(deadline, script)` jobs to a script runner started by `sh -c
    /// runner`, as the SSH session does, and split what it prints into
    /// `(output, status)` per job.
    fn run_runner(runner: &str, jobs: &[(u64, String)]) -> Vec<(String, i32)> {
        use std::io::{Read, Write};
        use std::process::{Command, Stdio};
        let marker = crate::transport::ssh::rc_marker("n0nce");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(runner)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut res = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        // as the session does: the next script only after the last status
        for (secs, script) in jobs {
            stdin
                .write_all(&crate::transport::ssh::frame_job(*secs, script))
                .unwrap();
            loop {
                let found = pending
                    .windows(marker.len())
                    .position(|w| w == marker.as_slice());
                if let Some(p) = found {
                    let rest = &pending[p + marker.len()..];
                    if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                        let rc = String::from_utf8_lossy(&rest[..nl]).parse().unwrap();
                        let out = String::from_utf8_lossy(&pending[..p]).into_owned();
                        res.push((out, rc));
                        pending.drain(..p + marker.len() + nl + 1);
                        break;
                    }
                }
                let mut buf = [0u8; 4096];
                let n = stdout.read(&mut buf).unwrap();
                assert!(n > 0, "runner ended early: {res:?}");
                pending.extend_from_slice(&buf[..n]);
            }
        }
        drop(stdin);
        stdout.read_to_end(&mut pending).unwrap();
        assert!(child.wait().unwrap().success());
        assert!(pending.is_empty(), "{pending:?}");
        res
    }

    /// Both script runners: statuses, `exit`, stdin kept from the next job,
    /// the install deadline (124, and the install's process is gone), and a
    /// file name that looks like the runner's framing.
    fn check_runner(runner: &str) {
        use crate::transport::ssh::IN_PLACE;
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // the pid of the process that outlives the deadline unless killed
        let slow = format!("sh -c 'echo $$ > {}; exec sleep 30'", pidfile.display());
        // a quoted name whose lines look like the runner's framing
        let tricky = "x\n.\n>echo injected\n@@dispatch:rc:0";
        let started = Instant::now();
        let res = run_runner(
            runner,
            &[
                (5, "echo hi; exit 3".into()),
                (5, "cd /nonexistent/dir || exit 231; echo no".into()),
                (5, install_step("echo inst; exit 5")),
                (1, install_step(&slow)),
                (5, install_step("cat; echo stdin-was-empty")),
                (5, install_step("trap 'echo bye' EXIT; exit 4")),
                (5, "echo after".into()),
                (5, format!("printf '%s|' {}", shell_quote(tricky))),
                // scripts run in the runner's own shell: a failing `cd`
                // ends it, the next script still runs; the deadline holds
                (
                    5,
                    format!("{IN_PLACE}cd /nonexistent/dir || exit 231; echo no"),
                ),
                (
                    5,
                    format!(
                        "{IN_PLACE}cd /tmp || exit 231; eval 'sh -c \"echo in-place; exit 6\"'"
                    ),
                ),
                (1, format!("{IN_PLACE}sleep 30")),
                (5, format!("{IN_PLACE}cd / || exit 231; eval pwd")),
            ],
        );
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(res.len(), 12, "{res:?}");
        assert_eq!((res[0].0.trim(), res[0].1), ("hi", 3));
        assert_eq!(res[1].1, 231);
        assert!(!res[1].0.lines().any(|l| l == "no"), "{res:?}");
        assert_eq!((res[2].0.trim(), res[2].1), ("inst", 5));
        assert_eq!(res[3].1, 124, "{res:?}");
        assert_eq!((res[4].0.trim(), res[4].1), ("stdin-was-empty", 0));
        assert_eq!(
            (res[5].0.trim(), res[5].1),
            ("bye", 4),
            "an install's own EXIT trap"
        );
        assert_eq!((res[6].0.trim(), res[6].1), ("after", 0));
        assert_eq!(
            (res[7].0.as_str(), res[7].1),
            (format!("{tricky}|").as_str(), 0)
        );
        assert_eq!(res[8].1, 231, "{res:?}");
        assert!(!res[8].0.lines().any(|l| l == "no"), "{res:?}");
        assert_eq!((res[9].0.trim(), res[9].1), ("in-place", 6));
        assert_eq!(res[10].1, 124, "{res:?}");
        assert_eq!((res[11].0.trim(), res[11].1), ("/", 0));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let proc_dir = format!("/proc/{}", pid.trim());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&proc_dir).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20)); // poll step
        }
        assert!(
            !std::path::Path::new(&proc_dir).exists(),
            "install outlived its deadline"
        );
    }

    #[test]
    fn bash_script_runner_bounds_installs_without_extra_processes() {
        // bash is installed here, so the session's command picks this runner
        let runner = crate::transport::ssh::driver_command("n0nce");
        check_runner(&runner);
        // in-place scripts share the executor (no fork each), others do not
        let ppid = "sh -c 'echo $PPID'; true";
        let inp = format!("{}{ppid}", crate::transport::ssh::IN_PLACE);
        let res = run_runner(
            &runner,
            &[
                (5, inp.clone()),
                (5, inp),
                (5, ppid.into()),
                (5, ppid.into()),
            ],
        );
        let p: Vec<&str> = res.iter().map(|(o, _)| o.trim()).collect();
        assert_eq!(p[0], p[1], "{res:?}");
        assert_ne!(p[2], p[3], "{res:?}");
        assert_ne!(p[0], p[2], "{res:?}");
    }

    #[test]
    fn sh_script_runner_bounds_installs_with_timeout() {
        let runner = format!(
            "exec sh -c {} dispatch-driver n0nce",
            shell_quote(crate::transport::ssh::SH_DRIVER)
        );
        check_runner(&runner);
    }

    #[test]
    fn a_script_cut_short_by_the_end_of_input_never_runs() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ran");
        let script = format!("touch {}", shell_quote(flag.to_str().unwrap()));
        let mut job = crate::transport::ssh::frame_job(5, &script);
        job.truncate(job.len() - 2); // without its end line
        let sh_runner = format!(
            "exec sh -c {} dispatch-driver n0nce",
            shell_quote(crate::transport::ssh::SH_DRIVER)
        );
        for runner in [crate::transport::ssh::driver_command("n0nce"), sh_runner] {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(&runner)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&job).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            assert!(out.stdout.is_empty(), "{out:?}");
            assert!(!flag.exists(), "{runner}");
        }
    }

    #[test]
    fn temp_name_is_hidden_and_single_line() {
        assert_eq!(temp_name("a.tgz"), ".a.tgz.part");
        assert_eq!(temp_name("a\nb"), ".a_b.part");
    }

    #[test]
    fn finalize_script_quotes_everything() {
        let c = Config::parse(std::path::Path::new("t"), "[x]\nhost=h\n").unwrap();
        let s = finalize_script(
            &c.routes[0],
            "d i r",
            "a'b;$(x)",
            5,
            None,
            Some("echo {name}"),
        );
        assert!(s.starts_with("cd -- 'd i r' || exit 231; "), "{s}");
        assert!(
            s.contains("mv -f -- '.a'\\''b;$(x).part' 'a'\\''b;$(x)'"),
            "{s}"
        );
    }
}
