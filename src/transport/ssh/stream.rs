//! Streaming delivery over one SSH session: no round trip per file.
//!
//! A [`Pipeline`] drives two channels of a session at once, non-blocking,
//! from one thread: a raw SFTP channel ([`crate::transport::sftp_wire`])
//! and the session's script runner (see [`crate::script`]). Files are sent
//! back to back — each created under its temporary name, written, checked
//! (`fstat` size; sha256 through the runner when the route asks for it),
//! locked (the per-name install lock as a symlink) and renamed into place,
//! every request pipelined — and the replies are read as they come. An
//! install is a script on the runner, sent the moment its file is in place
//! (and journaled); its status comes back in order. So a batch costs about
//! one round trip more than its bytes, however many files it holds.
//!
//! Every file still gets what the plain path gives it: the temporary name
//! and rename, the size (or sha256) check, the install lock, the install's
//! deadline on the host (the runner's) and here ([`DRIVER_GRACE`] later), a
//! result per file. What goes wrong with one file is handed back
//! ([`Done::NotPlaced`]) for the plain path to do again; a connection that
//! fails fails the whole pipeline (`poll` returns the error).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use ssh2::{BlockDirections, Channel, ExtendedData};

use super::{hex, io_kind, ExecOutput, SshSession, Tail};
use crate::config::Verify;
use crate::script::{driver_command, frame_job, rc_marker, verify_script, DRIVER_GRACE};
use crate::transport::sftp_wire::{self, Replies, Reply, Requests};
use crate::transport::{ErrorKind, Op, Protocol, TransferError};

/// Bytes of file data read ahead into the SFTP channel's buffer.
const AHEAD: usize = 512 * 1024;
/// Data per SFTP write request (255 KiB, near sftp-server's 256 KiB
/// message limit, measured no faster).
const WRITE_SIZE: usize = 64 * 1024;
/// A progress report per this many bytes of one file.
const PROGRESS_STEP: u64 = 4 << 20;

/// What a file's data is read from (positionally: several hosts' uploads
/// share one descriptor).
pub trait Content: Send {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Content for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// Files opened ahead of the one whose data is being sent, so that their
/// `open` replies are back when their turn comes: up to this many, and
/// until they hold [`OPEN_AHEAD_BYTES`] (a round trip's worth of data on a
/// fast link: 100 ms at 40 MB/s).
const OPEN_AHEAD: usize = 64;
const OPEN_AHEAD_BYTES: u64 = 4 << 20;

/// One file to put in place.
pub struct PlaceJob {
    /// The caller's name for it, in every [`Done`].
    pub id: u64,
    pub file: Box<dyn Content>,
    pub size: u64,
    pub mode: u32,
    /// Absolute directory on the host.
    pub dir: String,
    pub tmp_name: String,
    pub name: String,
    /// The install lock to take before the rename: its path and the owner
    /// record its symlink points to.
    pub lock: Option<(String, String)>,
    pub verify: Verify,
    /// The deadline of a sha256 check on the host.
    pub verify_limit: Duration,
}

/// What became of a file or a script.
#[derive(Debug)]
pub enum Done {
    Progress {
        id: u64,
        bytes: u64,
        total: u64,
    },
    /// Verified, locked (if asked) and under its final name.
    Placed {
        id: u64,
        bytes: u64,
    },
    /// Not in place (nothing of it is left on the host, no lock held): do it
    /// again the plain way, which reports what is wrong.
    NotPlaced {
        id: u64,
        error: TransferError,
    },
    /// A script ran (see [`Pipeline::run`]).
    Ran {
        id: u64,
        out: ExecOutput,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its turn to be opened has not come (see [`OPEN_AHEAD`]).
    Queued,
    Opening,
    Sending,
    Closing,
    Verifying,
    Locking,
    Renaming,
}

struct Place {
    job: PlaceJob,
    stage: Stage,
    handle: Option<Vec<u8>>,
    created: bool,
    closed: bool,
    locked: bool,
    sent: u64,
    reported: u64,
    hasher: Option<Sha256>,
    outstanding: u32,
    size_seen: Option<u64>,
    error: Option<TransferError>,
}

#[derive(Debug, Clone, Copy)]
enum Req {
    Open(u64),
    Write(u64),
    Fstat(u64),
    Close(u64),
    Symlink(u64),
    Rename(u64, u32),
    /// Making way for a plain SFTP v3 rename (removing the old file).
    MakeWay(u64),
    /// Nobody waits for these: removals, mkdir.
    Loose,
}

/// A runner on its way: the channel asked for, then the driver started.
enum Opening {
    Channel(String),
    Exec(Channel, String),
}

/// libssh2's "would block".
fn would_block(e: &ssh2::Error) -> bool {
    e.code() == ssh2::ErrorCode::Session(-37)
}

/// A script on the runner: whose, and since when it is the one running.
struct RunJob {
    id: u64,
    /// The sha256 check of a file (its id), not a caller's script.
    check: bool,
    limit: Duration,
    since: Instant,
}

pub struct Pipeline<'s> {
    ssh: &'s mut SshSession,
    sftp: Channel,
    sftp_out: Vec<u8>,
    sftp_sent: usize,
    replies: Replies,
    reqs: Requests,
    posix_rename: bool,
    waiting: HashMap<u32, Req>,
    places: HashMap<u64, Place>,
    /// Files whose data is still to be written, in order.
    sending: VecDeque<u64>,
    runner: Option<(Channel, Vec<u8>)>,
    /// The runner being started, non-blocking, while files are already sent
    /// (its two round trips overlap theirs).
    opening: Option<Opening>,
    run_out: Vec<u8>,
    run_sent: usize,
    run_in: Vec<u8>,
    run_tail: Tail,
    jobs: VecDeque<RunJob>,
    done: Vec<Done>,
    made_dirs: HashSet<String>,
    last_io: Instant,
    /// Interrupted: no more data is sent, files not in place are given back.
    aborted: bool,
}

impl SshSession {
    /// Start a pipeline on this session (SFTP must work). Until it is
    /// finished, the session is in non-blocking mode and only the pipeline
    /// uses it.
    pub fn pipeline(&mut self) -> Result<Pipeline<'_>, TransferError> {
        self.watchdog.kick(self.target.io_timeout);
        let r = self.open_pipeline_channels();
        self.watchdog.disarm();
        let (sftp, posix_rename, runner) = r?;
        self.sess.set_blocking(false);
        let made_dirs = self.made_dirs.iter().cloned().collect();
        Ok(Pipeline {
            ssh: self,
            sftp,
            sftp_out: Vec::new(),
            sftp_sent: 0,
            replies: Replies::default(),
            reqs: Requests::default(),
            posix_rename,
            waiting: HashMap::new(),
            places: HashMap::new(),
            sending: VecDeque::new(),
            opening: runner
                .is_none()
                .then(|| Opening::Channel(crate::transport::random_hex())),
            runner,
            run_out: Vec::new(),
            run_sent: 0,
            run_in: Vec::new(),
            run_tail: Tail::new(16 * 1024),
            jobs: VecDeque::new(),
            done: Vec::new(),
            made_dirs,
            last_io: Instant::now(),
            aborted: false,
        })
    }

    /// The SFTP channel (after INIT/VERSION and, once per session, the
    /// home directory; blocking) and the session's runner if it has one.
    #[allow(clippy::type_complexity)]
    fn open_pipeline_channels(
        &mut self,
    ) -> Result<(Channel, bool, Option<(Channel, Vec<u8>)>), TransferError> {
        const SFTP: (Protocol, Op) = (Protocol::Sftp, Op::Sftp);
        let mut ch = self
            .sess
            .channel_session()
            .map_err(|e| self.fail(super::ssh_kind(&e), SFTP, "open sftp channel", e))?;
        ch.handle_extended_data(ExtendedData::Ignore)
            .and_then(|_| ch.subsystem("sftp"))
            .map_err(|e| self.fail(super::ssh_kind(&e), SFTP, "start sftp", e))?;
        let mut out = Vec::new();
        sftp_wire::init(&mut out);
        ch.write_all(&out)
            .map_err(|e| self.fail(io_kind(&e), SFTP, "sftp init", e))?;
        let mut replies = Replies::default();
        // no SFTP here (a subsystem that ends at once): not a broken session
        let unavailable = |s: &Self, what: String| {
            s.err(ErrorKind::Unavailable, Protocol::Sftp, Op::Sftp)
                .step(what)
        };
        let (version, ext) = loop {
            match replies.version() {
                Ok(Some(v)) => break v,
                Ok(None) => {}
                Err(e) => return Err(unavailable(self, e.0)),
            }
            self.read_blocking(&mut ch, &mut replies)?;
        };
        if version < 3 {
            return Err(unavailable(self, format!("sftp version {version}")));
        }
        let posix = ext.iter().any(|e| e == "posix-rename@openssh.com");
        if self.home.is_none() {
            let mut out = Vec::new();
            let id = Requests::default().realpath(&mut out, ".");
            ch.write_all(&out)
                .map_err(|e| self.fail(io_kind(&e), SFTP, "sftp realpath", e))?;
            let home = loop {
                match replies.next_reply() {
                    Ok(Some((rid, Reply::Name(h)))) if rid == id => break h,
                    Ok(Some(_)) | Err(_) => return Err(unavailable(self, "sftp realpath".into())),
                    Ok(None) => self.read_blocking(&mut ch, &mut replies)?,
                }
            };
            let home = String::from_utf8(home).unwrap_or_default();
            if !home.starts_with('/') || home.contains('\n') {
                return Err(unavailable(self, format!("home directory {home:?}")));
            }
            self.home = Some(home);
        }
        Ok((ch, posix, self.driver.take()))
    }
}

impl SshSession {
    /// Read more of the SFTP channel's replies (blocking).
    fn read_blocking(&self, ch: &mut Channel, replies: &mut Replies) -> Result<(), TransferError> {
        let mut buf = [0u8; 4096];
        match ch.read(&mut buf) {
            Ok(0) => Err(self
                .err(ErrorKind::Unavailable, Protocol::Sftp, Op::Sftp)
                .step("the sftp subsystem ended")),
            Ok(n) => {
                replies.feed(&buf[..n]);
                Ok(())
            }
            Err(e) => Err(self.fail(io_kind(&e), (Protocol::Sftp, Op::Sftp), "sftp", e)),
        }
    }
}

impl Pipeline<'_> {
    /// The login's home directory, absolute.
    pub fn home(&self) -> String {
        self.ssh.home.clone().unwrap_or_default()
    }

    fn req(&mut self, r: Req, id: u32) {
        self.waiting.insert(id, r);
    }

    /// `mkdir -p` of the absolute `dir`, pipelined (each level; the ones
    /// that exist fail, which nobody waits for).
    pub fn mkdir_p(&mut self, dir: &str) {
        if !self.made_dirs.insert(dir.to_string()) {
            return;
        }
        let mut path = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            path.push('/');
            path.push_str(part);
            let id = self.reqs.mkdir(&mut self.sftp_out, &path);
            self.req(Req::Loose, id);
        }
    }

    /// Remove a remote file; nobody waits for it (a missing one is fine).
    pub fn remove(&mut self, path: &str) {
        let id = self.reqs.remove(&mut self.sftp_out, path);
        self.req(Req::Loose, id);
    }

    /// Put a file in place (see [`Done::Placed`]).
    pub fn place(&mut self, job: PlaceJob) {
        let id = job.id;
        let hasher = (job.verify == Verify::Sha256).then(Sha256::new);
        let p = Place {
            job,
            stage: Stage::Queued,
            handle: None,
            created: false,
            closed: false,
            locked: false,
            sent: 0,
            reported: 0,
            hasher,
            outstanding: 0,
            size_seen: None,
            error: None,
        };
        self.places.insert(id, p);
        self.sending.push_back(id);
    }

    /// Run `script` on the runner, bounded by `limit` on the host; its
    /// [`Done::Ran`] comes in the order of the calls.
    pub fn run(&mut self, id: u64, script: &str, limit: Duration) {
        self.push_job(id, false, script, limit);
    }

    fn push_job(&mut self, id: u64, check: bool, script: &str, limit: Duration) {
        self.run_out.extend(frame_job(limit.as_secs(), script));
        let job = RunJob {
            id,
            check,
            limit,
            since: Instant::now(),
        };
        self.jobs.push_back(job);
    }

    /// Nothing sent is waiting for an answer.
    pub fn idle(&self) -> bool {
        self.waiting.is_empty() && self.jobs.is_empty() && self.places.is_empty()
    }

    fn sftp_err(&self, kind: ErrorKind, op: Op, what: String, path: &str) -> TransferError {
        self.ssh
            .err(kind, Protocol::Sftp, op)
            .step(what)
            .path(path)
            .host_only()
    }
}

impl Pipeline<'_> {
    /// Move bytes until something is done (or nothing is waiting); the
    /// error of a failed connection ends the pipeline.
    pub fn poll(&mut self) -> Result<Vec<Done>, TransferError> {
        loop {
            self.refill();
            let mut moved = self.write_out()?;
            moved |= self.read_in()?;
            let now = Instant::now();
            if moved {
                self.last_io = now;
            }
            if !self.done.is_empty() {
                return Ok(std::mem::take(&mut self.done));
            }
            if self.idle() {
                return Ok(Vec::new());
            }
            if moved {
                continue;
            }
            if crate::interrupt::requested() && !self.aborted {
                self.abort_places();
                continue;
            }
            let wait = self.deadline_check(now)?;
            self.wait_socket(wait);
        }
    }

    /// How long to wait for the socket; an error once a deadline passed.
    fn deadline_check(&mut self, now: Instant) -> Result<Duration, TransferError> {
        let io = self.ssh.target.io_timeout;
        let mut wait = Duration::from_millis(250);
        if !self.waiting.is_empty() || self.sftp_sent < self.sftp_out.len() {
            let stalled = now.duration_since(self.last_io);
            if stalled >= io {
                let what = format!("no progress for {:.0?}", io);
                return Err(self.fail_all(ErrorKind::Timeout, Protocol::Sftp, what));
            }
            wait = wait.min(io - stalled);
        }
        if let Some(j) = self.jobs.front() {
            let due = j.since + j.limit + DRIVER_GRACE;
            if now >= due {
                let what = format!("no status from the script runner within {:.0?}", j.limit);
                return Err(self.fail_all(ErrorKind::Timeout, Protocol::Ssh, what));
            }
            wait = wait.min(due - now);
        }
        Ok(wait)
    }

    fn fail_all(&self, kind: ErrorKind, protocol: Protocol, what: String) -> TransferError {
        self.ssh
            .fail(kind, (protocol, Op::Upload), what, "deadline passed")
    }

    fn wait_socket(&self, wait: Duration) {
        let events = match self.ssh.sess.block_directions() {
            BlockDirections::Outbound => libc::POLLOUT,
            BlockDirections::Both => libc::POLLIN | libc::POLLOUT,
            _ => libc::POLLIN,
        };
        let mut fd = libc::pollfd {
            fd: self.ssh.sess.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis())
            .unwrap_or(1000)
            .max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut fd, 1, ms);
        }
    }

    /// Open the files next in line to be sent (see [`OPEN_AHEAD`]).
    fn open_ahead(&mut self) {
        let mut ahead = 0u64;
        let next: Vec<u64> = self.sending.iter().take(OPEN_AHEAD).copied().collect();
        for id in next {
            if ahead >= OPEN_AHEAD_BYTES {
                return;
            }
            let Some(p) = self.places.get_mut(&id) else {
                continue;
            };
            ahead += p.job.size - p.sent;
            if p.stage != Stage::Queued || p.error.is_some() {
                continue;
            }
            p.stage = Stage::Opening;
            p.outstanding += 1;
            let tmp = crate::route::remote_join(&p.job.dir, &p.job.tmp_name);
            let rid = self.reqs.create(&mut self.sftp_out, &tmp, p.job.mode);
            self.req(Req::Open(id), rid);
        }
    }

    /// Read the next file's data into the SFTP buffer, up to [`AHEAD`].
    fn refill(&mut self) {
        while self.sftp_out.len() - self.sftp_sent < AHEAD {
            self.open_ahead();
            let Some(&id) = self.sending.front() else {
                return;
            };
            let Some(p) = self.places.get(&id).filter(|p| p.error.is_none()) else {
                self.sending.pop_front();
                continue;
            };
            let Some(handle) = p.handle.clone() else {
                return; // its OPEN is not answered yet
            };
            let more = p.sent < p.job.size;
            if more && !self.write_chunk(id, &handle) {
                continue;
            }
            if self.places.get(&id).is_some_and(|p| p.sent >= p.job.size) {
                self.sending.pop_front();
                self.end_of_data(id, &handle);
            }
        }
    }

    /// One write request of file `id`; `false` when it failed locally.
    fn write_chunk(&mut self, id: u64, handle: &[u8]) -> bool {
        let Some(p) = self.places.get_mut(&id) else {
            return false;
        };
        let want = usize::try_from((p.job.size - p.sent).min(WRITE_SIZE as u64)).unwrap_or(0);
        let (file, hasher, offset) = (&p.job.file, &mut p.hasher, p.sent);
        let r = self
            .reqs
            .write_with(&mut self.sftp_out, handle, offset, want, |buf| {
                file.read_exact_at(buf, offset)?;
                if let Some(h) = hasher.as_mut() {
                    h.update(&*buf);
                }
                Ok(())
            });
        let rid = match r {
            Ok(rid) => rid,
            Err(e) => {
                let msg = format!("reading local file: {e}");
                p.error = Some(
                    self.ssh
                        .err(ErrorKind::Local, Protocol::Sftp, Op::ReadLocal)
                        .step(msg)
                        .bare(),
                );
                self.sending.pop_front();
                self.settle(id);
                return false;
            }
        };
        p.sent += want as u64;
        p.outstanding += 1;
        if p.sent - p.reported >= PROGRESS_STEP || p.sent == p.job.size {
            p.reported = p.sent;
            self.done.push(Done::Progress {
                id,
                bytes: p.sent,
                total: p.job.size,
            });
        }
        self.req(Req::Write(id), rid);
        true
    }

    fn end_of_data(&mut self, id: u64, handle: &[u8]) {
        let verify = self.places.get(&id).map(|p| p.job.verify);
        if verify.is_some_and(|v| v != Verify::None) {
            let rid = self.reqs.fstat(&mut self.sftp_out, handle);
            self.req(Req::Fstat(id), rid);
            self.bump(id);
        }
        let rid = self.reqs.close(&mut self.sftp_out, handle);
        self.req(Req::Close(id), rid);
        self.bump(id);
        if let Some(p) = self.places.get_mut(&id) {
            p.stage = Stage::Closing;
            if p.job.size == 0 {
                self.done.push(Done::Progress {
                    id,
                    bytes: 0,
                    total: 0,
                });
            }
        }
    }

    fn bump(&mut self, id: u64) {
        if let Some(p) = self.places.get_mut(&id) {
            p.outstanding += 1;
        }
    }

    /// One step further in starting the runner (`true`: it moved).
    fn advance_runner(&mut self) -> Result<bool, TransferError> {
        let step = match self.opening.take() {
            None => return Ok(false),
            Some(Opening::Channel(nonce)) => match self.ssh.sess.channel_session() {
                Ok(mut ch) => match ch.handle_extended_data(ExtendedData::Merge) {
                    Ok(()) => Ok((Opening::Exec(ch, nonce), true)),
                    Err(e) => Err(("runner setup", e)),
                },
                Err(e) if would_block(&e) => Ok((Opening::Channel(nonce), false)),
                Err(e) => Err(("open runner", e)),
            },
            Some(Opening::Exec(mut ch, nonce)) => match ch.exec(&driver_command(&nonce)) {
                Ok(()) => {
                    self.runner = Some((ch, rc_marker(&nonce)));
                    return Ok(true);
                }
                Err(e) if would_block(&e) => Ok((Opening::Exec(ch, nonce), false)),
                Err(e) => Err(("start runner", e)),
            },
        };
        match step {
            Ok((o, moved)) => {
                self.opening = Some(o);
                Ok(moved)
            }
            Err((what, e)) => Err(self.ssh.fail(super::ssh_kind(&e), super::SCRIPT, what, e)),
        }
    }

    /// Write what is buffered for both channels, as far as the windows let.
    fn write_out(&mut self) -> Result<bool, TransferError> {
        let mut moved = self.advance_runner()?;
        let (n, r) = write_some(&mut self.sftp, &self.sftp_out[self.sftp_sent..]);
        self.sftp_sent += n;
        moved |= n > 0;
        if let Err(e) = r {
            return Err(self
                .ssh
                .fail(io_kind(&e), (Protocol::Sftp, Op::Upload), "sftp write", e));
        }
        compact(&mut self.sftp_out, &mut self.sftp_sent);
        if let Some((ch, _)) = self.runner.as_mut() {
            let (n, r) = write_some(ch, &self.run_out[self.run_sent..]);
            self.run_sent += n;
            moved |= n > 0;
            if let Err(e) = r {
                return Err(self
                    .ssh
                    .fail(io_kind(&e), super::SCRIPT, "sending script", e));
            }
            compact(&mut self.run_out, &mut self.run_sent);
        }
        Ok(moved)
    }

    fn read_in(&mut self) -> Result<bool, TransferError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut moved = false;
        loop {
            match self.sftp.read(&mut buf) {
                Ok(0) => {
                    let what = "the sftp server closed the channel";
                    return Err(self.fail_closed(Protocol::Sftp, what));
                }
                Ok(n) => {
                    moved = true;
                    self.replies.feed(&buf[..n]);
                    self.take_replies()?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let op = (Protocol::Sftp, Op::Upload);
                    return Err(self.ssh.fail(io_kind(&e), op, "sftp read", e));
                }
            }
        }
        while let Some((ch, _)) = self.runner.as_mut() {
            match ch.read(&mut buf) {
                Ok(0) => return Err(self.fail_closed(Protocol::Ssh, "the script runner ended")),
                Ok(n) => {
                    moved = true;
                    self.run_in.extend_from_slice(&buf[..n]);
                    self.take_statuses();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(self.ssh.fail(io_kind(&e), super::SCRIPT, "runner read", e)),
            }
        }
        Ok(moved)
    }

    fn fail_closed(&self, protocol: Protocol, what: &'static str) -> TransferError {
        self.ssh.fail(
            ErrorKind::Connect,
            (protocol, Op::Upload),
            what,
            "end of channel",
        )
    }
}

/// Write as much of `data` as the channel takes now: the bytes written and
/// the error that stopped it (none for a full window).
fn write_some(ch: &mut Channel, data: &[u8]) -> (usize, std::io::Result<()>) {
    let mut n = 0;
    while n < data.len() {
        match ch.write(&data[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return (n, Err(e)),
        }
    }
    (n, Ok(()))
}

/// Drop what was sent from the front of a buffer, now and then.
fn compact(buf: &mut Vec<u8>, sent: &mut usize) {
    if *sent == buf.len() {
        buf.clear();
        *sent = 0;
    } else if *sent > 1 << 20 {
        buf.drain(..*sent);
        *sent = 0;
    }
}

impl Pipeline<'_> {
    fn take_replies(&mut self) -> Result<(), TransferError> {
        loop {
            let next = match self.replies.next_reply() {
                Ok(Some(x)) => x,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let op = (Protocol::Sftp, Op::Upload);
                    return Err(self.ssh.fail(ErrorKind::Connect, op, "sftp", e.0));
                }
            };
            let (rid, reply) = next;
            match self.waiting.remove(&rid) {
                Some(Req::Loose) | None => {}
                Some(req) => self.on_reply(req, reply),
            }
        }
    }

    fn on_reply(&mut self, req: Req, reply: Reply) {
        let (id, failed) = match (req, &reply) {
            (Req::Open(id), Reply::Handle(h)) => {
                if let Some(p) = self.places.get_mut(&id) {
                    p.handle = Some(h.clone());
                    p.created = true;
                    p.stage = Stage::Sending;
                }
                (id, None)
            }
            (Req::Fstat(id), Reply::Attrs { size }) => {
                if let Some(p) = self.places.get_mut(&id) {
                    p.size_seen = *size;
                }
                (id, None)
            }
            (Req::Close(id), Reply::Status { code, .. }) if *code == sftp_wire::OK => {
                if let Some(p) = self.places.get_mut(&id) {
                    p.closed = true;
                }
                (id, None)
            }
            (Req::Write(id) | Req::MakeWay(id), Reply::Status { .. }) => {
                let bad = matches!(reply, Reply::Status { code, .. } if code != sftp_wire::OK);
                let failed = (bad && matches!(req, Req::Write(_))).then_some((Op::Upload, "write"));
                (id, failed)
            }
            (Req::Symlink(id), Reply::Status { code, .. }) if *code == sftp_wire::OK => {
                if let Some(p) = self.places.get_mut(&id) {
                    p.locked = true;
                }
                self.rename(id, 0);
                (id, None)
            }
            (Req::Rename(id, tries), Reply::Status { code, .. }) if *code != sftp_wire::OK => {
                if self.posix_rename || tries >= 4 {
                    (id, Some((Op::Rename, "rename")))
                } else {
                    self.make_way(id, tries + 1);
                    (id, None)
                }
            }
            (Req::Rename(id, _), Reply::Status { .. }) => {
                if let Some(p) = self.places.remove(&id) {
                    let bytes = p.sent;
                    self.done.push(Done::Placed { id, bytes });
                }
                return;
            }
            (Req::Open(id), _) => (id, Some((Op::Upload, "create"))),
            (Req::Fstat(id), _) => (id, Some((Op::Verify, "fstat"))),
            (Req::Close(id), _) => (id, Some((Op::Upload, "close"))),
            (Req::Symlink(id), _) => (id, Some((Op::Lock, "install lock"))),
            (Req::Write(id) | Req::MakeWay(id), _) => (id, Some((Op::Upload, "write"))),
            (Req::Rename(id, _), _) => (id, Some((Op::Rename, "rename"))),
            (Req::Loose, _) => return,
        };
        if let Some((op, what)) = failed {
            self.fail_place(id, op, what, &reply);
        }
        if let Some(p) = self.places.get_mut(&id) {
            p.outstanding = p.outstanding.saturating_sub(1);
        }
        self.settle(id);
    }

    fn fail_place(&mut self, id: u64, op: Op, what: &str, reply: &Reply) {
        let Some(p) = self.places.get(&id) else {
            return;
        };
        if p.error.is_some() {
            return;
        }
        let why = match reply {
            Reply::Status { code, message } => {
                format!("{} ({message})", sftp_wire::status_name(*code))
            }
            other => format!("unexpected reply {other:?}"),
        };
        let tmp = crate::route::remote_join(&p.job.dir, &p.job.tmp_name);
        let kind = if op == Op::Verify {
            ErrorKind::Verify
        } else {
            ErrorKind::Remote
        };
        let e = self.sftp_err(kind, op, format!("sftp {what}: {why}"), &tmp);
        if let Some(p) = self.places.get_mut(&id) {
            p.error = Some(e);
        }
    }

    /// After a reply of file `id`: the next step once nothing of it is in
    /// flight, or the clean-up of a failed one.
    fn settle(&mut self, id: u64) {
        let Some(p) = self.places.get(&id) else {
            return;
        };
        if p.outstanding > 0 {
            return;
        }
        if p.error.is_some() {
            self.give_back(id);
            return;
        }
        if p.stage == Stage::Closing && p.closed {
            self.after_close(id);
        }
    }

    fn after_close(&mut self, id: u64) {
        let Some(p) = self.places.get(&id) else {
            return;
        };
        if p.job.verify == Verify::Size && p.size_seen != Some(p.job.size) {
            let seen = p.size_seen.map_or("no".into(), |s| s.to_string());
            let tmp = crate::route::remote_join(&p.job.dir, &p.job.tmp_name);
            let what = format!("{tmp} has {seen} bytes on the host, sent {}", p.job.size);
            let e = self.sftp_err(ErrorKind::Verify, Op::Verify, what, &tmp);
            if let Some(p) = self.places.get_mut(&id) {
                p.error = Some(e);
            }
            self.give_back(id);
            return;
        }
        let Some(p) = self.places.get_mut(&id) else {
            return;
        };
        match p.job.verify {
            Verify::Sha256 => {
                p.stage = Stage::Verifying;
                let sha = p.hasher.take().map(|h| hex(&h.finalize()));
                let script = verify_script(
                    Verify::Sha256,
                    &p.job.dir,
                    &p.job.tmp_name,
                    p.job.size,
                    sha.as_deref(),
                );
                let limit = p.job.verify_limit;
                self.push_job(id, true, &script, limit);
            }
            _ => self.lock(id),
        }
    }

    fn lock(&mut self, id: u64) {
        let Some(p) = self.places.get_mut(&id) else {
            return;
        };
        let Some((path, owner)) = p.job.lock.clone() else {
            self.rename(id, 0);
            return;
        };
        p.stage = Stage::Locking;
        p.outstanding += 1;
        let rid = self.reqs.symlink(&mut self.sftp_out, &owner, &path);
        self.req(Req::Symlink(id), rid);
    }

    fn rename(&mut self, id: u64, tries: u32) {
        let Some(p) = self.places.get_mut(&id) else {
            return;
        };
        p.stage = Stage::Renaming;
        p.outstanding += 1;
        let tmp = crate::route::remote_join(&p.job.dir, &p.job.tmp_name);
        let fin = crate::route::remote_join(&p.job.dir, &p.job.name);
        let rid = self
            .reqs
            .rename(&mut self.sftp_out, &tmp, &fin, self.posix_rename);
        self.req(Req::Rename(id, tries), rid);
    }

    /// SFTP v3 cannot rename over a file: remove the old one, rename again.
    fn make_way(&mut self, id: u64, tries: u32) {
        let Some(p) = self.places.get_mut(&id) else {
            return;
        };
        let fin = crate::route::remote_join(&p.job.dir, &p.job.name);
        p.outstanding += 1;
        let rid = self.reqs.remove(&mut self.sftp_out, &fin);
        self.req(Req::MakeWay(id), rid);
        self.rename(id, tries);
    }

    /// Ctrl-C: every file not yet in place is given back (its temporary
    /// file removed once its requests are answered); scripts already sent
    /// run to their end.
    fn abort_places(&mut self) {
        self.aborted = true;
        self.sending.clear();
        let ids: Vec<u64> = self.places.keys().copied().collect();
        for id in ids {
            let e = self
                .ssh
                .err(ErrorKind::Interrupted, Protocol::Sftp, Op::Upload)
                .step("upload interrupted");
            if let Some(p) = self.places.get_mut(&id) {
                p.error.get_or_insert(e);
            }
            self.settle(id);
        }
    }

    /// A file that failed: remove what it left, release its lock, hand it
    /// back.
    fn give_back(&mut self, id: u64) {
        let Some(p) = self.places.remove(&id) else {
            return;
        };
        if let Some(h) = p.handle.as_ref().filter(|_| !p.closed) {
            let rid = self.reqs.close(&mut self.sftp_out, h);
            self.req(Req::Loose, rid);
        }
        if p.created {
            self.remove(&crate::route::remote_join(&p.job.dir, &p.job.tmp_name));
        }
        if let Some((path, _)) = p.job.lock.as_ref().filter(|_| p.locked) {
            self.remove(path);
        }
        self.sending.retain(|x| *x != id);
        let error = p.error.unwrap_or_else(|| {
            self.ssh
                .err(ErrorKind::Remote, Protocol::Sftp, Op::Upload)
                .step("failed")
        });
        self.done.push(Done::NotPlaced { id, error });
    }
}

impl Pipeline<'_> {
    /// The runner's status lines, in the order of the jobs.
    fn take_statuses(&mut self) {
        loop {
            let Some((_, marker)) = self.runner.as_ref() else {
                return;
            };
            let Some(pos) = find(&self.run_in, marker) else {
                // keep a little, in case a marker is split across reads
                if self.run_in.len() > 64 * 1024 {
                    let keep = self.run_in.len() - 256;
                    self.run_tail.push(&self.run_in[..keep]);
                    self.run_in.drain(..keep);
                }
                return;
            };
            let start = pos + marker.len();
            let Some(nl) = self.run_in[start..].iter().position(|b| *b == b'\n') else {
                return;
            };
            let status: i32 = String::from_utf8_lossy(&self.run_in[start..start + nl])
                .trim()
                .parse()
                .unwrap_or(-1);
            self.run_tail.push(&self.run_in[..pos]);
            self.run_in.drain(..start + nl + 1);
            let tail = std::mem::replace(&mut self.run_tail, Tail::new(16 * 1024));
            let out = ExecOutput {
                status,
                // a shell reports death by signal N as 128+N
                signal: (129..160)
                    .contains(&status)
                    .then(|| format!("{}", status - 128)),
                output: tail.lines(20),
                marked: false,
            };
            let Some(job) = self.jobs.pop_front() else {
                return;
            };
            if let Some(next) = self.jobs.front_mut() {
                next.since = Instant::now();
            }
            if job.check {
                self.checked(job.id, out);
            } else {
                self.done.push(Done::Ran { id: job.id, out });
            }
        }
    }

    /// The sha256 check of file `id` ended.
    fn checked(&mut self, id: u64, out: ExecOutput) {
        if out.success() {
            self.lock(id);
            return;
        }
        if let Some(p) = self.places.get_mut(&id) {
            let tmp = crate::route::remote_join(&p.job.dir, &p.job.tmp_name);
            let e = self
                .ssh
                .err(ErrorKind::Verify, Protocol::Ssh, Op::Verify)
                .step("verification failed")
                .cause(out.output.trim().to_string())
                .path(tmp)
                .host_only();
            p.error = Some(e);
        }
        self.give_back(id);
    }

    /// Wait for what is still in flight (removals), then give the session
    /// back in blocking mode, its runner kept for the plain path.
    pub fn finish(mut self) {
        let until = Instant::now() + self.ssh.target.io_timeout;
        while !self.idle() && Instant::now() < until {
            if self.poll().is_err() {
                break;
            }
        }
        self.ssh.sess.set_blocking(true);
        if !self.idle() || !self.ssh.is_alive() {
            return;
        }
        let _ = self.sftp.send_eof();
        let _ = self.sftp.close();
        if let Some(r) = self.runner.take() {
            self.ssh.driver = Some(r);
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        self.ssh.sess.set_blocking(true);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
