//! A lane's streaming path: its deliveries go through one
//! [`Pipeline`] of its SSH session — sent back to back, each installed as
//! soon as it is in place and journaled — instead of one round trip chain
//! per file. Each file gets the same events, journal records, checks, lock
//! and result as on the plain path ([`Lane::deliver`]); whatever the
//! pipeline cannot do for a file (a resumed upload, a failed step, a lost
//! connection before the file was in place) is left to the plain path,
//! which retries, falls back and reports it as always.

use std::collections::HashMap;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::Outcome;
use super::{InstallResult, Lane, Placed};
use crate::config::Transport;
use crate::event::EventKind;
use crate::lock::{self, Lock};
use crate::plan::{Delivery, Step};
use crate::route::{self, remote_join};
use crate::script::install_script;
use crate::transport::ssh::stream::{Content, Done, Pipeline, PlaceJob};
use crate::transport::TransferError;

/// Files of one lane in flight at once (admitted, not yet installed): enough
/// to keep a link of 100 ms busy with small files, whose every step waits
/// its round trip. Only [`crate::transport::ssh::stream`]'s few files ahead
/// are open on the host; the rest are a name and a reference here.
const WINDOW: usize = 512;

/// Files from this size on go the plain way (SCP): their round trips are
/// nothing next to their bytes, and the SCP sink writes a big file faster
/// than sftp-server does here (1 GiB: 586 vs 496 MB/s, `BENCHMARKS.md`).
const STREAM_BELOW: u64 = 32 << 20;

/// A package's content, for the pipeline.
struct Shared(std::sync::Arc<crate::local::LocalFile>);

impl Content for Shared {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0.file, buf, offset)
    }
}

/// A delivery in the pipeline.
struct Flight {
    d: Delivery,
    o: Outcome,
    started: Instant,
    dir: String,
    tmp: String,
    lock: Option<Lock>,
    /// In place, its install running.
    placed: Option<Placed>,
}

/// What one streaming run of a lane holds.
struct Run<'a> {
    out: &'a Sender<Outcome>,
    flights: HashMap<u64, Flight>,
    /// Deliveries for the plain path.
    left: Vec<Delivery>,
    /// Locks held too long to be removed unread: released the plain way.
    late: Vec<Lock>,
    seq: u64,
}

impl Lane {
    /// Stream this lane's deliveries while it can; returns the ones left
    /// for the plain path. Nothing is streamed in a dry run, when the route
    /// says `stream = no` or does not start with SSH, or when the host has
    /// no SFTP.
    pub(super) fn stream(&mut self, out: &Sender<Outcome>) -> Vec<Delivery> {
        let route = self.route();
        if self.dry_run || !route.stream || route.transfer.first() != Some(&Transport::Scp) {
            return Vec::new();
        }
        let Ok(first) = self.group.rx.try_recv() else {
            return Vec::new();
        };
        self.current = (first.item.package, first.item.name.clone());
        if let Err(e) = self.ssh() {
            // kept for the plain path's first attempt: a dead host is not
            // tried twice for it
            self.stashed = Some(e);
            return vec![first];
        }
        let Some(mut ssh) = self.ssh.take() else {
            return vec![first];
        };
        let mut run = Run {
            out,
            flights: HashMap::new(),
            left: Vec::new(),
            late: Vec::new(),
            seq: 0,
        };
        match ssh.pipeline() {
            Ok(mut pipe) => {
                let home = pipe.home();
                self.pump(&mut pipe, &mut run, first, &home);
                pipe.finish();
            }
            Err(e) => {
                log::debug!("{}: cannot stream ({e}); the plain way", self.group.host);
                run.left.push(first);
            }
        }
        self.ssh = Some(ssh);
        for l in std::mem::take(&mut run.late) {
            lock::release(self.ssh.as_mut(), &l);
        }
        run.left
    }

    fn pump(&mut self, pipe: &mut Pipeline<'_>, run: &mut Run<'_>, first: Delivery, home: &str) {
        let mut next = Some(first);
        loop {
            while run.flights.len() < WINDOW {
                let Some(d) = next.take().or_else(|| self.group.rx.try_recv().ok()) else {
                    break;
                };
                run.seq += 1;
                match self.admit(pipe, d, home, run.seq) {
                    Ok(f) => {
                        run.flights.insert(run.seq, f);
                    }
                    Err(d) => run.left.push(*d),
                }
            }
            if run.flights.is_empty() {
                return;
            }
            match pipe.poll() {
                Ok(done) => {
                    for x in done {
                        self.landed(pipe, run, x);
                    }
                }
                Err(e) => {
                    self.broken(run, &e);
                    return;
                }
            }
        }
    }

    /// Start `d` in the pipeline as file `id`, or give it back.
    fn admit(
        &mut self,
        pipe: &mut Pipeline<'_>,
        d: Delivery,
        home: &str,
        id: u64,
    ) -> Result<Flight, Box<Delivery>> {
        let host = self.group.host.clone();
        let item = &d.item;
        let dead = self
            .host_state
            .lock()
            .ok()
            .is_some_and(|h| h.dead.is_some());
        let resumed = d.has(Step::CheckInPlace) || item.resume.contains_key(&host);
        if crate::interrupt::requested() || dead || resumed {
            return Err(Box::new(d));
        }
        let config = std::sync::Arc::clone(&self.config);
        let routed = item.routed(&config);
        let route = routed.route;
        let (Ok(rel), Ok(file)) = (route::dest_dir(&routed, &host, &self.when), item.local())
        else {
            return Err(Box::new(d));
        };
        if file.size >= STREAM_BELOW {
            return Err(Box::new(d));
        }
        let dir = route::absolute_dir(&rel, home);
        let tmp_name = crate::transport::temp_name();
        let tmp = remote_join(&dir, &tmp_name);
        let mut o = Outcome::start(item, &host, route);
        o.attempts = 1;
        // journaled first, as on the plain path: a crash leaves nothing
        // that the next attempt does not remove
        let uploading = EventKind::Uploading {
            attempt: 1,
            temp_path: tmp.clone(),
        };
        self.emit(item, uploading);
        for old in std::mem::take(&mut self.leftovers) {
            pipe.remove(&old);
        }
        if let Some(old) = item.stale_temps.get(&host) {
            log::debug!("{}: removing {old} left by an earlier attempt", item.name);
            pipe.remove(old);
        }
        let lock = d
            .has(Step::Lock)
            .then(|| lock::unmade(route, &dir, &item.name));
        pipe.mkdir_p(&dir);
        pipe.place(PlaceJob {
            id,
            size: file.size,
            mode: file.mode,
            file: Box::new(Shared(file)),
            dir: dir.clone(),
            tmp_name,
            name: item.name.clone(),
            lock: lock
                .as_ref()
                .map(|l| (l.path.clone(), l.owner().to_string())),
            verify: route.verify,
            verify_limit: route.io_timeout,
        });
        Ok(Flight {
            d,
            o,
            started: Instant::now(),
            dir,
            tmp,
            lock,
            placed: None,
        })
    }

    fn landed(&mut self, pipe: &mut Pipeline<'_>, run: &mut Run<'_>, done: Done) {
        match done {
            Done::Progress { id, bytes, total } => {
                if let Some(f) = run.flights.get(&id) {
                    self.emit(&f.d.item, EventKind::Progress { bytes, total });
                }
            }
            Done::Placed { id, bytes } => self.placed(pipe, run, id, bytes),
            Done::NotPlaced { id, error } => {
                if let Some(f) = run.flights.remove(&id) {
                    log::debug!(
                        "{}: {}: not streamed ({error}); the plain way",
                        f.d.item.name,
                        self.group.host
                    );
                    run.left.push(f.d);
                }
            }
            Done::Ran { id, out } => {
                let Some(mut f) = run.flights.remove(&id) else {
                    return;
                };
                if let Some(l) = f.placed.as_mut().and_then(|p| p.lock.take()) {
                    release_later(pipe, run, l);
                }
                let res = Ok(InstallResult {
                    status: out.status,
                    signal: out.signal,
                    output: out.output,
                });
                self.end(run, f, res);
            }
        }
    }

    /// File `id` is in place: journal it, then install it (or end it).
    fn placed(&mut self, pipe: &mut Pipeline<'_>, run: &mut Run<'_>, id: u64, bytes: u64) {
        let Some(mut f) = run.flights.remove(&id) else {
            return;
        };
        let placed = Placed {
            transport: Transport::Scp,
            bytes,
            dir: f.dir.clone(),
            lock: f.lock.take(),
            cleartext: false,
            streamed: true,
        };
        let item = &f.d.item;
        self.emit(item, EventKind::Verifying);
        let uploaded = super::uploaded_event(&placed, &item.name, &f.o, false);
        self.step(item, &mut f.o, uploaded);
        let config = std::sync::Arc::clone(&self.config);
        let routed = item.routed(&config);
        let cmd = route::install_command(&routed, &self.group.host, &placed.dir);
        let Some(cmd) = cmd.filter(|_| f.d.has(Step::Install)) else {
            if let Some(l) = placed.lock {
                release_later(pipe, run, l);
            }
            f.o.state = "uploaded".into();
            f.o.ok = true;
            let o = self.finish(item, f.o, f.started);
            let _ = run.out.send(o);
            return;
        };
        self.emit(item, EventKind::Installing);
        let script = install_script(&placed.dir, &cmd);
        pipe.run(id, &script, routed.route.install_timeout);
        f.placed = Some(placed);
        run.flights.insert(id, f);
    }

    /// The install's result is the delivery's.
    fn end(&mut self, run: &mut Run<'_>, mut f: Flight, res: Result<InstallResult, TransferError>) {
        let item = &f.d.item;
        let route = &self.config.routes[item.route];
        if let Err(e) = self.judge_install(item, route, res, &mut f.o) {
            f.o.error = Some(e);
        }
        let o = self.finish(item, f.o, f.started);
        let _ = run.out.send(o);
    }

    /// The connection failed: an install in flight failed with it (the
    /// file is in place; a retry installs it there); the files not yet in
    /// place go the plain way, which reconnects.
    fn broken(&mut self, run: &mut Run<'_>, e: &TransferError) {
        log::debug!("{}: streaming stopped: {e}", self.group.host);
        let flights: Vec<Flight> = run.flights.drain().map(|(_, f)| f).collect();
        for mut f in flights {
            if let Some(l) = f.lock.take() {
                lock::lost(&l);
            }
            match f.placed.as_mut() {
                Some(p) => {
                    if let Some(l) = p.lock.take() {
                        lock::lost(&l);
                    }
                    self.end(run, f, Err(e.clone()));
                }
                None => {
                    self.leftovers.push(f.tmp);
                    run.left.push(f.d);
                }
            }
        }
    }
}

/// Remove a lock through the pipeline if it is surely still ours, else
/// after the pipeline (reading it back first).
fn release_later(pipe: &mut Pipeline<'_>, run: &mut Run<'_>, l: Lock) {
    if l.surely_ours() {
        pipe.remove(&l.path);
    } else {
        run.late.push(l);
    }
}
