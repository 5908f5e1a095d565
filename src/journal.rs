//! The journal: a durable record of every package (one content of one path)
//! and of its state on every target host.
//!
//! Why: the daemon must know, after a restart or a crash, which files in the
//! drop directory were already delivered, which were interrupted half-way and
//! which arrived while it was down; an unchanged file must never be sent twice
//! and a file with new content under the same name is a new package. The
//! `history` command reads the same record.
//!
//! Storage: one SQLite file, `journal.sqlite` in `state_dir`, through
//! `rusqlite` with its bundled library. WAL mode, `synchronous=NORMAL` (a
//! power cut may lose the last transactions, never corrupts the file) and a
//! busy timeout, so several processes — the daemon, a manual run, a VCS hook —
//! can use the same `state_dir` at once; every write is one `BEGIN IMMEDIATE`
//! transaction, so writers queue on the busy timeout instead of failing with
//! `SQLITE_BUSY` half-way. The schema is versioned with `PRAGMA user_version`.
//!
//! Three tables: `package` (identity: path bytes, size, mtime, sha256, plus
//! route section and where it came from), `delivery` (current state per
//! package × host, upserted) and `event` (every state change, appended, with
//! its time and details). Paths are stored as their raw `OsStr` bytes (a
//! BLOB), so non-UTF-8 names round-trip; a lossy text copy is kept for display
//! and filtering only.
//!
//! Attempts: [`Detail::attempt`] is the attempt number *within one delivery
//! run* (as the job's retry loop counts it). The journal adds up runs: a run
//! starts when a host is (re)queued, or enters `Uploading` from a state other
//! than `Queued`/`Uploading`; the host's `attempts` is the attempts of earlier
//! runs plus the current run's. A run interrupted by a crash counts one.
//!
//! Runs (schema v2): every delivery run of a package × host is a row of its
//! own in `run`, with an id, its start and last change, its attempts, and
//! the transport, remote path, elapsed time, exit status and output tail it
//! ended with; each event names its run. The run is a journal-side notion —
//! the caller only reports states — decided by the rule above (and a state
//! recorded for a package × host with no run yet starts one). `history`
//! lists runs. A v1 journal is migrated when opened: its events are replayed
//! in order under the same rule, so the runs it held come back as they were.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

mod outbox;
mod releases;
pub use outbox::{Notification, NotifyTarget, OutboxCounts};
pub use releases::ReleaseRecord;

use chrono::{DateTime, Local, SecondsFormat};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use sha2::{Digest, Sha256};

/// File name of the database inside `state_dir`.
pub const JOURNAL_FILE: &str = "journal.sqlite";

/// Schema version written to `PRAGMA user_version`. 1: package, delivery,
/// event. 2: + run (one row per delivery run), `event.run`. 3: + the
/// notification outbox ([`outbox`]). 4: + releases per route × host and
/// operators' actions ([`releases`]).
const SCHEMA_VERSION: i64 = 4;

/// How long a writer waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA_V1: &str = "
CREATE TABLE package (
    id        INTEGER PRIMARY KEY,
    path      BLOB    NOT NULL,   -- OsStr bytes, lossless
    path_text TEXT    NOT NULL,   -- lossy UTF-8 copy, for display and filters
    name      TEXT    NOT NULL,   -- lossy base name
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    sha256    TEXT    NOT NULL,
    section   TEXT,
    source    TEXT    NOT NULL,   -- manual | watch | hook
    vcs       TEXT,
    repo      TEXT,
    rev       TEXT,
    author    TEXT,
    created   TEXT    NOT NULL,   -- RFC 3339, local time
    UNIQUE (path, size, mtime_ns, sha256)
);
CREATE INDEX package_by_hash ON package (path, sha256);

CREATE TABLE delivery (
    package         INTEGER NOT NULL REFERENCES package (id),
    host            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    run_base        INTEGER NOT NULL DEFAULT 0,   -- attempts of the runs before this one
    transport       TEXT,
    fallback_reason TEXT,
    remote_path     TEXT,
    exit_status     INTEGER,
    output_tail     TEXT,
    error           TEXT,
    elapsed_ms      INTEGER,
    updated         TEXT    NOT NULL,
    updated_ms      INTEGER NOT NULL,             -- for ordering across time-zone changes
    PRIMARY KEY (package, host)
) WITHOUT ROWID;
CREATE INDEX delivery_by_time ON delivery (updated_ms);
CREATE INDEX delivery_by_state ON delivery (state);

CREATE TABLE event (
    id              INTEGER PRIMARY KEY,
    package         INTEGER NOT NULL REFERENCES package (id),
    host            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    time            TEXT    NOT NULL,
    time_ms         INTEGER NOT NULL,
    attempt         INTEGER NOT NULL,
    transport       TEXT,
    fallback_reason TEXT,
    remote_path     TEXT,
    exit_status     INTEGER,
    output_tail     TEXT,
    error           TEXT,
    elapsed_ms      INTEGER
);
CREATE INDEX event_by_package ON event (package, host);
";

/// v1 → v2: one row per delivery run; every event names its run.
const SCHEMA_V2: &str = "
CREATE TABLE run (
    id              INTEGER PRIMARY KEY,
    package         INTEGER NOT NULL REFERENCES package (id),
    host            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    transport       TEXT,
    fallback_reason TEXT,
    remote_path     TEXT,
    exit_status     INTEGER,
    output_tail     TEXT,
    error           TEXT,
    elapsed_ms      INTEGER,
    started         TEXT    NOT NULL,
    started_ms      INTEGER NOT NULL,
    updated         TEXT    NOT NULL,
    updated_ms      INTEGER NOT NULL
);
CREATE INDEX run_by_package ON run (package, host, id);
CREATE INDEX run_by_time ON run (updated_ms);
ALTER TABLE event ADD COLUMN run INTEGER REFERENCES run (id);
";

// ---------------------------------------------------------------- types

/// State of one package on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Uploading,
    Uploaded,
    Installed,
    Failed,
    /// The file matched no route (recorded with whatever host the caller uses,
    /// typically the empty string).
    Unrouted,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Uploading,
        State::Uploaded,
        State::Installed,
        State::Failed,
        State::Unrouted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Uploading => "uploading",
            State::Uploaded => "uploaded",
            State::Installed => "installed",
            State::Failed => "failed",
            State::Unrouted => "unrouted",
        }
    }

    /// The inverse of [`State::as_str`].
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<State, UnknownState> {
        State::parse(s).ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// A state name the journal does not know (the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownState(pub String);

impl fmt::Display for UnknownState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown journal state {:?}", self.0)
    }
}

impl std::error::Error for UnknownState {}

/// What identifies a package: where it is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256: String,
}

/// How a package entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Manual,
    Watch,
    Hook {
        vcs: String,
        repo: String,
        rev: String,
        author: String,
    },
}

impl Source {
    /// Short label: `manual`, `watch`, `hook:svn`, `hook:git`.
    pub fn label(&self) -> String {
        match self {
            Source::Manual => "manual".into(),
            Source::Watch => "watch".into(),
            Source::Hook { vcs, .. } => format!("hook:{vcs}"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Source::Manual => "manual",
            Source::Watch => "watch",
            Source::Hook { .. } => "hook",
        }
    }
}

/// Details of a state change; everything optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detail {
    pub transport: Option<String>,
    pub fallback_reason: Option<String>,
    /// Attempt number within the current delivery run (0 = not counted).
    pub attempt: u32,
    pub remote_path: Option<String>,
    pub exit_status: Option<i32>,
    pub output_tail: Option<String>,
    pub error: Option<String>,
    pub elapsed_ms: Option<u64>,
}

/// One recorded package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub id: i64,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256: String,
    pub section: Option<String>,
    /// [`Source::label`] of the source that first recorded it.
    pub source: String,
    /// RFC 3339, local time.
    pub created: String,
    /// Hook packages: repository, revision and author.
    pub repo: Option<String>,
    pub rev: Option<String>,
    pub author: Option<String>,
}

/// Filter for [`Journal::history`].
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Base name or any substring of the path.
    pub file: Option<String>,
    /// Exact host name.
    pub host: Option<String>,
    pub failed_only: bool,
    /// Only this run.
    pub run: Option<i64>,
    /// Only runs changed at or after this time (milliseconds since the epoch).
    pub since_ms: Option<i64>,
    pub limit: Option<usize>,
}

/// One delivery run of a file to a host, as it ended (or stands).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryRow {
    /// The run's id (`history --run ID`).
    pub run: i64,
    /// When the run's state was last changed (RFC 3339, local time).
    pub time: String,
    /// When the run started.
    pub started: String,
    pub file: String,
    pub path: String,
    pub host: String,
    pub state: String,
    pub transport: Option<String>,
    /// Attempts within this run.
    pub attempts: u32,
    /// The file on the host (while uploading: its temporary name).
    pub remote_path: Option<String>,
    /// How long the run's work took, as the job measured it.
    pub elapsed_ms: Option<u64>,
    pub exit_status: Option<i32>,
    pub output_tail: Option<String>,
    pub error: Option<String>,
    pub fallback_reason: Option<String>,
    pub source: String,
    pub rev: Option<String>,
    pub sha256: String,
    pub size: u64,
}

/// One state change of a run (`history --run ID`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunEvent {
    pub time: String,
    pub state: String,
    pub attempt: u32,
    pub remote_path: Option<String>,
    pub error: Option<String>,
}

/// A journal operation failed. Display: `JOURNAL_PATH: OPERATION: cause`.
#[derive(Debug)]
pub struct JournalError {
    pub path: PathBuf,
    pub op: String,
    pub cause: JournalCause,
}

#[derive(Debug)]
pub enum JournalCause {
    Sqlite(rusqlite::Error),
    Io(io::Error),
    /// The file was written by a newer dispatch, or is not a journal (empty,
    /// not SQLite, no dispatch schema). The message says what to do.
    Schema(SchemaProblem),
    /// The file at the journal's path is no longer the one this handle has
    /// open: deleted, replaced or truncated while in use.
    Lost(Lost),
}

/// Why a file is not a journal this dispatch can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaProblem {
    /// No journal, but its write-ahead log `wal` is still there: the journal
    /// was deleted.
    WalLeft { wal: PathBuf, shm: PathBuf },
    /// An existing file that is not a usable journal; the advice names `path`.
    Unusable { path: PathBuf, why: Unusable },
    /// An SQLite database with tables but no dispatch schema version.
    Foreign,
    /// An SQLite database without the dispatch schema.
    NoSchema,
    /// Written by a newer dispatch.
    Newer(i64),
    /// A schema version this dispatch never wrote.
    Unknown(i64),
}

/// What is wrong with an existing file at the journal's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    NotAFile,
    Empty,
    NotADatabase,
}

/// How the journal file went away under its handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    Deleted,
    Replaced,
    Truncated,
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaProblem::WalLeft { wal, shm } => write!(
                f,
                "the journal is missing but its write-ahead log {} is still \
                 there: the journal was deleted. Restore it from a backup; or, \
                 to start a new journal (every file in the drop directories is \
                 then sent again), move {} and {} aside",
                wal.display(),
                wal.display(),
                shm.display()
            ),
            SchemaProblem::Unusable { path, why } => write!(
                f,
                "{}; this is not a usable dispatch journal. Restore it from a backup; or move it \
                 aside (mv {p} {p}.bad) and start again to begin a new journal — every file in the \
                 drop directories is then sent again",
                match why {
                    Unusable::NotAFile => "not a regular file",
                    Unusable::Empty => "the file is empty (0 bytes: truncated?)",
                    Unusable::NotADatabase => "not an SQLite database",
                },
                p = path.display()
            ),
            SchemaProblem::Foreign => f.write_str(
                "database has tables but no dispatch schema version; not a dispatch journal?",
            ),
            SchemaProblem::NoSchema => f.write_str(
                "an SQLite database without the dispatch schema (emptied?); not a dispatch \
                 journal",
            ),
            SchemaProblem::Newer(v) => write!(
                f,
                "schema version {v} is newer than this dispatch understands ({SCHEMA_VERSION})"
            ),
            SchemaProblem::Unknown(v) => write!(f, "unknown schema version {v}"),
        }
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lost::Deleted => "deleted while in use",
            Lost::Replaced => "replaced by another file while in use",
            Lost::Truncated => "truncated to 0 bytes while in use",
        })
    }
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "journal {}: {}: ", self.path.display(), self.op)?;
        match &self.cause {
            JournalCause::Sqlite(e) => write!(f, "{e}"),
            JournalCause::Io(e) => write!(f, "{e}"),
            JournalCause::Schema(p) => write!(f, "{p}"),
            JournalCause::Lost(l) => write!(f, "{l}"),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            JournalCause::Sqlite(e) => Some(e),
            JournalCause::Io(e) => Some(e),
            JournalCause::Schema(_) | JournalCause::Lost(_) => None,
        }
    }
}

// ---------------------------------------------------------------- identity

/// Modification time of `meta` in nanoseconds since the epoch — the one
/// definition the watcher and the journal share.
pub fn mtime_ns(meta: &Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Stat `path` only: an identity without a content hash (`sha256` empty).
/// Used for files given by hand, where hashing first would cost a second
/// read of every byte before the upload starts.
pub fn stat_identity(path: &Path) -> io::Result<FileIdentity> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file", path.display()),
        ));
    }
    Ok(FileIdentity {
        path: path.to_path_buf(),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        sha256: String::new(),
    })
}

/// Stat `path` and hash its content (streaming, 64 KiB buffer). If the file
/// changes while it is being read, it is read again (three tries), so size,
/// mtime and hash always describe the same content.
pub fn file_identity(path: &Path) -> io::Result<FileIdentity> {
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..3 {
        let mut file = File::open(path)?;
        let before = file.metadata()?;
        if !before.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file", path.display()),
            ));
        }
        let mut hasher = Sha256::new();
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let after = file.metadata()?;
        if after.len() == before.len() && mtime_ns(&after) == mtime_ns(&before) {
            return Ok(FileIdentity {
                path: path.to_path_buf(),
                size: after.len(),
                mtime_ns: mtime_ns(&after),
                sha256: hex(&hasher.finalize()),
            });
        }
    }
    Err(io::Error::other(format!(
        "{}: kept changing while being hashed",
        path.display()
    )))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

// ---------------------------------------------------------------- journal

/// The journal of one `state_dir`. Cheap to share (`Arc<Journal>`): one
/// connection behind a mutex; other processes use their own.
pub struct Journal {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// (device, inode) of the file when it was opened: a file at `path` with
    /// another identity is not the journal this handle writes to.
    ident: (u64, u64),
    /// (device, inode) of its `-wal` when it was opened (the daemon's
    /// connection keeps it for as long as it runs).
    wal_ident: Option<(u64, u64)>,
    /// (package, host) whose last [`Journal::set_state`] failed, with why:
    /// that state is not on record (see [`Journal::take_unrecorded`]).
    unrecorded: Mutex<HashMap<(i64, String), String>>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

fn now() -> (String, i64) {
    let t: DateTime<Local> = Local::now();
    (
        t.to_rfc3339_opts(SecondsFormat::Millis, false),
        t.timestamp_millis(),
    )
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

fn base_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .into_owned()
}

const PACKAGE_COLUMNS: &str =
    "id, path, size, mtime_ns, sha256, section, source, vcs, created, repo, rev, author";

fn package_from_row(r: &Row<'_>) -> rusqlite::Result<Package> {
    let kind: String = r.get(6)?;
    let vcs: Option<String> = r.get(7)?;
    let source = match (kind.as_str(), vcs) {
        ("hook", Some(v)) => format!("hook:{v}"),
        (k, _) => k.to_string(),
    };
    Ok(Package {
        id: r.get(0)?,
        path: path_from_bytes(r.get(1)?),
        size: to_u64(r.get(2)?),
        mtime_ns: r.get(3)?,
        sha256: r.get(4)?,
        section: r.get(5)?,
        source,
        created: r.get(8)?,
        repo: r.get(9)?,
        rev: r.get(10)?,
        author: r.get(11)?,
    })
}

/// A failed step of [`Journal::open`]: the operation and its cause.
type OpenFailure = (&'static str, JournalCause);

/// The journal file at `path` is a whole journal, or there is none and a new
/// one was created; refused: an empty file, something not a regular file,
/// and a missing journal whose write-ahead log `wal` is still there.
fn ensure_whole_journal(path: &Path, wal: &Path) -> Result<(), OpenFailure> {
    // The -wal first, then the file: a -wal only appears once its journal
    // exists, so "no journal" seen after "a -wal" means it was deleted.
    let wal_left = fs::symlink_metadata(wal).is_ok();
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if wal_left {
                return Err((
                    "open",
                    JournalCause::Schema(SchemaProblem::WalLeft {
                        wal: wal.to_path_buf(),
                        shm: sidecar(path, "-shm"),
                    }),
                ));
            }
            create_fresh(path).map_err(|c| ("create", c))
        }
        Err(e) => Err(("open", JournalCause::Io(e))),
        Ok(m) if !m.is_file() => Err(("open", refuse(path, Unusable::NotAFile))),
        Ok(m) if m.len() == 0 => Err(("open", refuse(path, Unusable::Empty))),
        Ok(_) => Ok(()),
    }
}

/// Open the existing journal file at `path`: WAL mode, pragmas, statement cache.
fn connect(path: &Path) -> Result<Connection, OpenFailure> {
    let sql_err = |op, e: rusqlite::Error| (op, sqlite_cause(path, e));
    // no SQLITE_OPEN_CREATE: a file deleted since the check is not
    // silently recreated empty
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sql_err("open", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sql_err("set busy timeout", e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| sql_err("switch to WAL mode", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!(
            "{}: journal: WAL mode refused (mode is {mode}); concurrent use will be slower",
            path.display()
        );
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
        .map_err(|e| sql_err("set pragmas", e))?;
    // every statement run per file stays prepared
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// A delivery's attempt counters after recording a state (see the module
/// docs for how attempts are counted).
struct Counts {
    /// This state starts a new run (forgets the previous run's outcome).
    new_run: bool,
    attempts: i64,
    run_base: i64,
}

impl Counts {
    fn next(
        tx: &Connection,
        pkg: i64,
        host: &str,
        state: State,
        attempt: u32,
    ) -> rusqlite::Result<Counts> {
        let prev: Option<(String, i64, i64)> = tx
            .prepare_cached(
                "SELECT state, attempts, run_base FROM delivery WHERE package = ?1 AND host = ?2",
            )?
            .query_row(params![pkg, host], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let (prev_state, attempts, run_base) = match &prev {
            Some((s, a, b)) => (State::parse(s), *a, *b),
            None => (None, 0, 0),
        };
        let this_run = i64::from(attempt);
        let new_run = starts_run(prev_state, state);
        let run_base = if new_run { attempts } else { run_base };
        let attempts = match state {
            State::Queued => attempts,
            State::Uploading => run_base + this_run.max(1),
            _ => attempts.max(run_base + this_run),
        };
        Ok(Counts {
            new_run,
            attempts,
            run_base,
        })
    }
}

/// The delivery row of a state that starts a run: the previous run's
/// outcome is forgotten.
const UPSERT_NEW_RUN: &str =
    "INSERT INTO delivery (package, host, state, attempts, run_base, transport,
                     fallback_reason, remote_path, exit_status, output_tail, error, elapsed_ms,
                     updated, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (package, host) DO UPDATE SET
                     state = excluded.state, attempts = excluded.attempts,
                     run_base = excluded.run_base, transport = excluded.transport,
                     fallback_reason = excluded.fallback_reason,
                     remote_path = excluded.remote_path, exit_status = excluded.exit_status,
                     output_tail = excluded.output_tail, error = excluded.error,
                     elapsed_ms = excluded.elapsed_ms, updated = excluded.updated,
                     updated_ms = excluded.updated_ms";

/// The delivery row of a later state of a run: it keeps what earlier ones
/// said unless it says otherwise.
const UPSERT_SAME_RUN: &str =
    "INSERT INTO delivery (package, host, state, attempts, run_base, transport,
                     fallback_reason, remote_path, exit_status, output_tail, error, elapsed_ms,
                     updated, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (package, host) DO UPDATE SET
                     state = excluded.state, attempts = excluded.attempts,
                     run_base = excluded.run_base,
                     transport = coalesce(excluded.transport, transport),
                     fallback_reason = coalesce(excluded.fallback_reason, fallback_reason),
                     remote_path = coalesce(excluded.remote_path, remote_path),
                     exit_status = excluded.exit_status, output_tail = excluded.output_tail,
                     error = excluded.error,
                     elapsed_ms = coalesce(excluded.elapsed_ms, elapsed_ms),
                     updated = excluded.updated, updated_ms = excluded.updated_ms";

fn upsert_delivery(
    tx: &Connection,
    (pkg, host, state): (i64, &str, State),
    detail: &Detail,
    c: &Counts,
    (time, time_ms): (&str, i64),
) -> rusqlite::Result<()> {
    let sql = if c.new_run {
        UPSERT_NEW_RUN
    } else {
        UPSERT_SAME_RUN
    };
    tx.prepare_cached(sql)?.execute(params![
        pkg,
        host,
        state.as_str(),
        c.attempts,
        c.run_base,
        detail.transport,
        detail.fallback_reason,
        detail.remote_path,
        detail.exit_status,
        detail.output_tail,
        detail.error,
        detail.elapsed_ms.map(to_i64),
        time,
        time_ms,
    ])?;
    Ok(())
}

fn insert_event(
    tx: &Connection,
    (pkg, host, state): (i64, &str, State),
    detail: &Detail,
    run: i64,
    (time, time_ms): (&str, i64),
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO event (package, host, state, time, time_ms, attempt, transport,
             fallback_reason, remote_path, exit_status, output_tail, error, elapsed_ms,
             run)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        pkg,
        host,
        state.as_str(),
        time,
        time_ms,
        detail.attempt,
        detail.transport,
        detail.fallback_reason,
        detail.remote_path,
        detail.exit_status,
        detail.output_tail,
        detail.error,
        detail.elapsed_ms.map(to_i64),
        run,
    ])?;
    Ok(())
}

impl Journal {
    /// Open `state_dir/journal.sqlite`, creating it (and `state_dir`) if it
    /// does not exist. `state_dir` is created with mode 0700, the database
    /// file with 0600 (install output may be sensitive).
    ///
    /// A new journal is built under a temporary name and linked into place
    /// with its schema complete, so a journal file that exists is always a
    /// whole journal. Hence an existing file that is empty (truncated), not an
    /// SQLite database, or without the dispatch schema is refused — starting
    /// afresh over it would send every file in the drop directories again —
    /// and so is a missing `journal.sqlite` whose `journal.sqlite-wal` is
    /// still there (the journal was deleted; its last transactions are in the
    /// WAL, which SQLite would otherwise replay onto a new file).
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(JOURNAL_FILE);
        let fail = |op: &str, cause: JournalCause| JournalError {
            path: path.clone(),
            op: op.to_string(),
            cause,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| fail("create state directory", JournalCause::Io(e)))?;
        let wal = sidecar(&path, "-wal");
        ensure_whole_journal(&path, &wal).map_err(|(op, c)| fail(op, c))?;
        let mut conn = connect(&path).map_err(|(op, c)| fail(op, c))?;
        migrate(&mut conn, false).map_err(|cause| {
            let cause = match cause {
                JournalCause::Sqlite(e) => sqlite_cause(&path, e),
                c => c,
            };
            fail("prepare schema", cause)
        })?;
        let meta = fs::metadata(&path).map_err(|e| fail("open", JournalCause::Io(e)))?;
        let wal_ident = fs::metadata(&wal).ok().map(|m| (m.dev(), m.ino()));
        Ok(Journal {
            conn: Mutex::new(conn),
            path,
            ident: (meta.dev(), meta.ino()),
            wal_ident,
            unrecorded: Mutex::new(HashMap::new()),
        })
    }

    /// Is the file at the journal's path still the one this handle writes
    /// to? An error if it was deleted, replaced by another file or truncated
    /// to nothing since it was opened: the daemon must stop, not go on
    /// writing to a journal nobody will read. One `stat`, cheap enough to be
    /// called before every write and on every tick.
    pub fn check_file(&self) -> Result<(), JournalError> {
        let lost = |how| {
            Err(JournalError {
                path: self.path.clone(),
                op: "check".into(),
                cause: JournalCause::Lost(how),
            })
        };
        match fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => lost(Lost::Deleted),
            Err(e) => Err(JournalError {
                path: self.path.clone(),
                op: "check".into(),
                cause: JournalCause::Io(e),
            }),
            Ok(m) if (m.dev(), m.ino()) != self.ident => lost(Lost::Replaced),
            Ok(m) if m.len() == 0 => lost(Lost::Truncated),
            Ok(_) => Ok(()),
        }
    }

    /// After [`Journal::check_file`] failed: save what this handle still
    /// sees, so that the record is not lost with the file, and take this
    /// handle's `-wal`/`-shm` away from the path (SQLite would replay that
    /// WAL onto whatever file is at the path next; a connection to a file
    /// that was moved or deleted leaves its WAL behind when it closes). The
    /// copy is written back to the journal's path if nothing is there (a
    /// restart then goes on where this one stopped), else beside it as
    /// `journal.sqlite.saved-<time>`. Returns where it went. No further
    /// writes go through this handle ([`Journal::check_file`] refuses them).
    pub fn save_copy(&self) -> Result<PathBuf, JournalError> {
        let stamp = Local::now().format("%Y%m%dT%H%M%S%.3f");
        let saved = sidecar(&self.path, &format!(".saved-{stamp}"));
        let fail = |op: &str, cause: JournalCause| JournalError {
            path: self.path.clone(),
            op: op.to_string(),
            cause,
        };
        // VACUUM INTO wants a missing or empty file; create it 0600 first
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&saved)
            .map_err(|e| fail("save a copy", JournalCause::Io(e)))?;
        let conn = self.conn();
        if let Err(e) = conn.execute("VACUUM INTO ?1", params![saved.to_string_lossy()]) {
            let _ = fs::remove_file(&saved);
            return Err(fail("save a copy", JournalCause::Sqlite(e)));
        }
        let wal = sidecar(&self.path, "-wal");
        let ours = fs::metadata(&wal).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.wal_ident {
            let _ = fs::remove_file(&wal);
            let _ = fs::remove_file(sidecar(&self.path, "-shm"));
        }
        if fs::symlink_metadata(&self.path).is_err()
            && fs::symlink_metadata(&wal).is_err()
            && fs::hard_link(&saved, &self.path).is_ok()
        {
            let _ = fs::remove_file(&saved);
            return Ok(self.path.clone());
        }
        Ok(saved)
    }

    /// Why the last state recorded for `pkg` on `host` could not be written,
    /// if it could not; forgets it. A job whose outcome is not on record is
    /// not done: the daemon redoes it when it next sees the file.
    pub fn take_unrecorded(&self, pkg: i64, host: &str) -> Option<String> {
        self.unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(pkg, host.to_string()))
    }

    /// The id of the last recorded event (0 for none): the status server
    /// numbers its events after it.
    pub fn last_event_id(&self) -> u64 {
        self.conn()
            .query_row("SELECT COALESCE(MAX(id), 0) FROM event", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_or(0, |n| n.max(0) as u64)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (every
        // write is one transaction, rolled back on drop).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, op: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> JournalError + '_ {
        let op = op.into();
        move |e| JournalError {
            path: self.path.clone(),
            op,
            cause: JournalCause::Sqlite(e),
        }
    }

    /// A package = one content of one path. The same (path, size, mtime_ns,
    /// sha256) gives the existing id (whatever source first recorded it); new
    /// content under the same path gives a new id.
    pub fn add_package(
        &self,
        id: &FileIdentity,
        section: Option<&str>,
        source: &Source,
    ) -> Result<i64, JournalError> {
        let op = format!("{}: add package", id.path.display());
        self.check_file()?;
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<i64> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<i64> = tx
                .prepare_cached(
                    "SELECT id FROM package
                     WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND sha256 = ?4",
                )?
                .query_row(
                    params![
                        path_bytes(&id.path),
                        to_i64(id.size),
                        id.mtime_ns,
                        id.sha256
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(pkg) = existing {
                tx.commit()?;
                return Ok(pkg);
            }
            let (vcs, repo, rev, author) = match source {
                Source::Hook {
                    vcs,
                    repo,
                    rev,
                    author,
                } => (Some(vcs), Some(repo), Some(rev), Some(author)),
                _ => (None, None, None, None),
            };
            let (created, _) = now();
            tx.prepare_cached(
                "INSERT INTO package (path, path_text, name, size, mtime_ns, sha256, section,
                                      source, vcs, repo, rev, author, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                path_bytes(&id.path),
                id.path.to_string_lossy(),
                base_name(&id.path),
                to_i64(id.size),
                id.mtime_ns,
                id.sha256,
                section,
                source.kind(),
                vcs,
                repo,
                rev,
                author,
                created,
            ])?;
            let pkg = tx.last_insert_rowid();
            tx.commit()?;
            Ok(pkg)
        };
        run(&mut conn).map_err(self.err(op))
    }

    /// Cheap identity check without hashing: the newest package recorded for
    /// this path with this size and mtime.
    pub fn lookup(
        &self,
        path: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<Option<Package>, JournalError> {
        let sql = format!(
            "SELECT {PACKAGE_COLUMNS} FROM package
             WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 ORDER BY id DESC LIMIT 1"
        );
        // cached statement: the daemon's start-up asks this once per file
        self.conn()
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_row(
                    params![path_bytes(path), to_i64(size), mtime_ns],
                    package_from_row,
                )
                .optional()
            })
            .map_err(|e| self.err(format!("{}: look up", path.display()))(e))
    }

    /// The newest package recorded for this path with this content, whatever
    /// its size/mtime said then — e.g. after a `touch` that changed the mtime
    /// but not the content.
    pub fn lookup_by_hash(
        &self,
        path: &Path,
        sha256: &str,
    ) -> Result<Option<Package>, JournalError> {
        let sql = format!(
            "SELECT {PACKAGE_COLUMNS} FROM package
             WHERE path = ?1 AND sha256 = ?2 ORDER BY id DESC LIMIT 1"
        );
        self.conn()
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_row(params![path_bytes(path), sha256], package_from_row)
                    .optional()
            })
            .map_err(|e| self.err(format!("{}: look up by hash", path.display()))(e))
    }

    /// The package with this id.
    pub fn package(&self, pkg: i64) -> Result<Option<Package>, JournalError> {
        let sql = format!("SELECT {PACKAGE_COLUMNS} FROM package WHERE id = ?1");
        self.conn()
            .query_row(&sql, params![pkg], package_from_row)
            .optional()
            .map_err(self.err(format!("package {pkg}: read")))
    }

    /// Record `state` for `pkg` on `host`: upsert the current state and append
    /// an event row with the time and `detail`. See the module docs for how
    /// attempts are counted.
    pub fn set_state(
        &self,
        pkg: i64,
        host: &str,
        state: State,
        detail: &Detail,
    ) -> Result<(), JournalError> {
        let op = format!("package {pkg}: {host}: record {state}");
        let result = self
            .check_file()
            .and_then(|()| self.write_state(pkg, host, state, detail, op));
        let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(()) => {
                unrecorded.remove(&(pkg, host.to_string()));
            }
            Err(e) => {
                unrecorded.insert((pkg, host.to_string()), e.to_string());
            }
        }
        result
    }

    fn write_state(
        &self,
        pkg: i64,
        host: &str,
        state: State,
        detail: &Detail,
        op: String,
    ) -> Result<(), JournalError> {
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let c = Counts::next(&tx, pkg, host, state, detail.attempt)?;
            let time = now();
            let key = (pkg, host, state);
            upsert_delivery(&tx, key, detail, &c, (&time.0, time.1))?;
            let run = record_run(&tx, pkg, host, state, detail, c.new_run, (&time.0, time.1))?;
            insert_event(&tx, key, detail, run, (&time.0, time.1))?;
            tx.commit()
        };
        run(&mut conn).map_err(self.err(op))
    }

    /// Current state and attempts of `pkg` on every host recorded, by host name.
    pub fn host_states(&self, pkg: i64) -> Result<Vec<(String, State, u32)>, JournalError> {
        let conn = self.conn();
        let run = || -> rusqlite::Result<Vec<(String, State, u32)>> {
            let mut st = conn.prepare_cached(
                "SELECT host, state, attempts FROM delivery WHERE package = ?1 ORDER BY host",
            )?;
            let rows = st.query_map(params![pkg], |r| {
                let s: String = r.get(1)?;
                let a: i64 = r.get(2)?;
                Ok((r.get::<_, String>(0)?, s, a))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (host, s, a) = row?;
                // An unknown state (a newer writer) reads as Failed: retried, never lost.
                let state = State::parse(&s).unwrap_or(State::Failed);
                out.push((host, state, u32::try_from(a).unwrap_or(u32::MAX)));
            }
            Ok(out)
        };
        run().map_err(|e| self.err(format!("package {pkg}: read host states"))(e))
    }

    /// State and remote path of `pkg` on every host recorded, by host name:
    /// where an upload in flight left its temporary file (`uploading`), or
    /// where a verified upload is (`uploaded`).
    pub fn remote_paths(
        &self,
        pkg: i64,
    ) -> Result<Vec<(String, State, Option<String>)>, JournalError> {
        let conn = self.conn();
        let run = || -> rusqlite::Result<Vec<(String, String, Option<String>)>> {
            let mut st = conn.prepare_cached(
                "SELECT host, state, remote_path FROM delivery WHERE package = ?1 ORDER BY host",
            )?;
            let rows = st.query_map(params![pkg], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        };
        let rows = run().map_err(|e| self.err(format!("package {pkg}: read remote paths"))(e))?;
        Ok(rows
            .into_iter()
            .map(|(h, s, p)| (h, State::parse(&s).unwrap_or(State::Failed), p))
            .collect())
    }

    /// Done = every one of `hosts` is in `done_state` (`Installed` when the
    /// route has an install command, `Uploaded` when it has none; with
    /// `Uploaded`, `Installed` counts too). No hosts = done.
    pub fn is_done(
        &self,
        pkg: i64,
        hosts: &[String],
        done_state: State,
    ) -> Result<bool, JournalError> {
        let states = self.host_states(pkg)?;
        Ok(hosts.iter().all(|h| {
            states.iter().any(|(host, st, _)| {
                host == h
                    && (*st == done_state
                        || (done_state == State::Uploaded && *st == State::Installed))
            })
        }))
    }

    /// Packages with some host not done (queued, uploading, uploaded or
    /// failed), oldest first — for crash recovery on start. The caller checks
    /// that the file still has that identity (it may have been replaced or
    /// removed since) and which state counts as done for its route.
    pub fn unfinished(&self) -> Result<Vec<Package>, JournalError> {
        let conn = self.conn();
        let run = || -> rusqlite::Result<Vec<Package>> {
            let sql = format!(
                "SELECT {PACKAGE_COLUMNS} FROM package WHERE id IN (
                     SELECT package FROM delivery
                     WHERE state IN ('queued', 'uploading', 'uploaded', 'failed'))
                 ORDER BY id"
            );
            let mut st = conn.prepare(&sql)?;
            let rows = st.query_map([], package_from_row)?;
            rows.collect()
        };
        run().map_err(self.err("list unfinished packages"))
    }

    /// One row per delivery run (a file × host from queued to its end),
    /// newest first.
    pub fn history(&self, f: &HistoryFilter) -> Result<Vec<HistoryRow>, JournalError> {
        let conn = self.conn();
        let limit: i64 = f
            .limit
            .map(|l| i64::try_from(l).unwrap_or(i64::MAX))
            .unwrap_or(-1);
        let run = || -> rusqlite::Result<Vec<HistoryRow>> {
            let mut st = conn.prepare_cached(
                "SELECT r.id, r.updated, r.started, p.name, p.path_text, r.host, r.state,
                        r.transport, r.attempts, r.remote_path, r.elapsed_ms, r.exit_status,
                        r.output_tail, r.error, r.fallback_reason, p.source, p.vcs, p.rev,
                        p.sha256, p.size
                 FROM run r JOIN package p ON p.id = r.package
                 WHERE (?1 IS NULL OR instr(p.path_text, ?1) > 0)
                   AND (?2 IS NULL OR r.host = ?2)
                   AND (?3 = 0 OR r.state = 'failed')
                   AND (?4 IS NULL OR r.id = ?4)
                   AND (?5 IS NULL OR r.updated_ms >= ?5)
                 ORDER BY r.updated_ms DESC, r.id DESC
                 LIMIT ?6",
            )?;
            let args = params![f.file, f.host, f.failed_only, f.run, f.since_ms, limit];
            let rows = st.query_map(args, |r| {
                let kind: String = r.get(15)?;
                let vcs: Option<String> = r.get(16)?;
                let attempts: i64 = r.get(8)?;
                let elapsed: Option<i64> = r.get(10)?;
                Ok(HistoryRow {
                    run: r.get(0)?,
                    time: r.get(1)?,
                    started: r.get(2)?,
                    file: r.get(3)?,
                    path: r.get(4)?,
                    host: r.get(5)?,
                    state: r.get(6)?,
                    transport: r.get(7)?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    remote_path: r.get(9)?,
                    elapsed_ms: elapsed.map(to_u64),
                    exit_status: r.get(11)?,
                    output_tail: r.get(12)?,
                    error: r.get(13)?,
                    fallback_reason: r.get(14)?,
                    source: match vcs {
                        Some(v) if kind == "hook" => format!("hook:{v}"),
                        _ => kind,
                    },
                    rev: r.get(17)?,
                    sha256: r.get(18)?,
                    size: to_u64(r.get(19)?),
                })
            })?;
            rows.collect()
        };
        run().map_err(self.err("read history"))
    }

    /// The state changes of one run, oldest first.
    pub fn run_events(&self, run: i64) -> Result<Vec<RunEvent>, JournalError> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<Vec<RunEvent>> {
            let mut st = conn.prepare_cached(
                "SELECT time, state, attempt, remote_path, error FROM event
                 WHERE run = ?1 ORDER BY id",
            )?;
            let rows = st.query_map(params![run], |r| {
                let attempt: i64 = r.get(2)?;
                Ok(RunEvent {
                    time: r.get(0)?,
                    state: r.get(1)?,
                    attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                    remote_path: r.get(3)?,
                    error: r.get(4)?,
                })
            })?;
            rows.collect()
        };
        read().map_err(self.err(format!("run {run}: read events")))
    }
}

/// Does `state`, following `prev` on the same package × host, begin a new
/// delivery run? A (re)queue does, and so does an upload that follows
/// anything but a queue or another upload attempt (see the module docs).
fn starts_run(prev: Option<State>, state: State) -> bool {
    match state {
        State::Queued => true,
        State::Uploading => !matches!(prev, Some(State::Queued) | Some(State::Uploading)),
        _ => false,
    }
}

/// Record `state` on the run of `pkg` × `host` it belongs to — a new one if
/// `new_run` or if there is none yet — and return that run's id. Later
/// states of a run keep what earlier ones said (transport, remote path,
/// elapsed) unless they say otherwise; the exit status, output tail and
/// error are the latest state's.
fn record_run(
    tx: &Connection,
    pkg: i64,
    host: &str,
    state: State,
    detail: &Detail,
    new_run: bool,
    (time, time_ms): (&str, i64),
) -> rusqlite::Result<i64> {
    let current: Option<i64> = if new_run {
        None
    } else {
        tx.prepare_cached(
            "SELECT id FROM run WHERE package = ?1 AND host = ?2 ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![pkg, host], |r| r.get(0))
        .optional()?
    };
    let attempt = match state {
        State::Queued => 0,
        State::Uploading => i64::from(detail.attempt.max(1)),
        _ => i64::from(detail.attempt),
    };
    let elapsed = detail.elapsed_ms.map(to_i64);
    match current {
        Some(id) => {
            tx.prepare_cached(
                "UPDATE run SET state = ?2, attempts = max(attempts, ?3),
                     transport = coalesce(?4, transport),
                     fallback_reason = coalesce(?5, fallback_reason),
                     remote_path = coalesce(?6, remote_path), exit_status = ?7,
                     output_tail = ?8, error = ?9, elapsed_ms = coalesce(?10, elapsed_ms),
                     updated = ?11, updated_ms = ?12
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                state.as_str(),
                attempt,
                detail.transport,
                detail.fallback_reason,
                detail.remote_path,
                detail.exit_status,
                detail.output_tail,
                detail.error,
                elapsed,
                time,
                time_ms,
            ])?;
            Ok(id)
        }
        None => {
            tx.prepare_cached(
                "INSERT INTO run (package, host, state, attempts, transport, fallback_reason,
                     remote_path, exit_status, output_tail, error, elapsed_ms, started,
                     started_ms, updated, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?12, ?13)",
            )?
            .execute(params![
                pkg,
                host,
                state.as_str(),
                attempt,
                detail.transport,
                detail.fallback_reason,
                detail.remote_path,
                detail.exit_status,
                detail.output_tail,
                detail.error,
                elapsed,
                time,
                time_ms,
            ])?;
            Ok(tx.last_insert_rowid())
        }
    }
}

/// Schema v1 → v2: add the `run` table and rebuild the runs from the
/// events, replayed in the order they were written under the rule the
/// journal uses now ([`starts_run`]). Read in slices, so a large journal
/// does not have to fit in memory.
fn upgrade_v1_to_v2(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute_batch(SCHEMA_V2)?;
    type Ev = (i64, i64, String, String, String, i64, Detail);
    let mut last: HashMap<(i64, String), State> = HashMap::new();
    let mut after = 0i64;
    loop {
        let slice: Vec<Ev> = {
            let mut st = tx.prepare(
                "SELECT id, package, host, state, time, time_ms, attempt, transport,
                        fallback_reason, remote_path, exit_status, output_tail, error, elapsed_ms
                 FROM event WHERE id > ?1 ORDER BY id LIMIT 5000",
            )?;
            let rows = st.query_map(params![after], |r| {
                let attempt: i64 = r.get(6)?;
                let elapsed: Option<i64> = r.get(13)?;
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    Detail {
                        transport: r.get(7)?,
                        fallback_reason: r.get(8)?,
                        attempt: u32::try_from(attempt).unwrap_or(0),
                        remote_path: r.get(9)?,
                        exit_status: r.get(10)?,
                        output_tail: r.get(11)?,
                        error: r.get(12)?,
                        elapsed_ms: elapsed.map(to_u64),
                    },
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(end) = slice.last().map(|e| e.0) else {
            break;
        };
        for (id, pkg, host, state, time, time_ms, detail) in slice {
            // an unknown state (a newer writer's) reads as failed, as elsewhere
            let st = State::parse(&state).unwrap_or(State::Failed);
            let key = (pkg, host);
            let new_run = starts_run(last.get(&key).copied(), st);
            let run = record_run(tx, pkg, &key.1, st, &detail, new_run, (&time, time_ms))?;
            // the run keeps the state as written
            tx.prepare_cached("UPDATE run SET state = ?2 WHERE id = ?1")?
                .execute(params![run, state])?;
            tx.prepare_cached("UPDATE event SET run = ?2 WHERE id = ?1")?
                .execute(params![id, run])?;
            last.insert(key, st);
        }
        after = end;
    }
    Ok(())
}

/// Create or check the schema, inside one immediate transaction so that two
/// processes opening a fresh journal at once do not both create it.
/// `fresh`: the file was just created (by [`create_fresh`]); an existing
/// file without a schema version is not a journal.
fn migrate(conn: &mut Connection, fresh: bool) -> Result<(), JournalCause> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(JournalCause::Sqlite)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(JournalCause::Sqlite)?;
    match version {
        0 => {
            let tables: i64 = tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                    [],
                    |r| r.get(0),
                )
                .map_err(JournalCause::Sqlite)?;
            if tables > 0 {
                return Err(JournalCause::Schema(SchemaProblem::Foreign));
            }
            if !fresh {
                return Err(JournalCause::Schema(SchemaProblem::NoSchema));
            }
            // a new journal is built as an old one is upgraded: one schema
            tx.execute_batch(SCHEMA_V1).map_err(JournalCause::Sqlite)?;
            upgrade_v1_to_v2(&tx).map_err(JournalCause::Sqlite)?;
            tx.execute_batch(outbox::SCHEMA_V3)
                .map_err(JournalCause::Sqlite)?;
            tx.execute_batch(releases::SCHEMA_V4)
                .map_err(JournalCause::Sqlite)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(JournalCause::Sqlite)?;
        }
        1..=3 => {
            if version == 1 {
                upgrade_v1_to_v2(&tx).map_err(JournalCause::Sqlite)?;
            }
            if version <= 2 {
                tx.execute_batch(outbox::SCHEMA_V3)
                    .map_err(JournalCause::Sqlite)?;
            }
            tx.execute_batch(releases::SCHEMA_V4)
                .map_err(JournalCause::Sqlite)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(JournalCause::Sqlite)?;
            log::info!("journal: schema upgraded from version {version} to {SCHEMA_VERSION} (runs, notification outbox, releases)");
        }
        SCHEMA_VERSION => {}
        v if v > SCHEMA_VERSION => return Err(JournalCause::Schema(SchemaProblem::Newer(v))),
        v => return Err(JournalCause::Schema(SchemaProblem::Unknown(v))),
    }
    tx.commit().map_err(JournalCause::Sqlite)
}

/// `journal.sqlite` + `suffix` (`-wal`, `-shm`, `.saved-…`).
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The cause for an existing file that is not a usable journal, with what to do.
fn refuse(path: &Path, why: Unusable) -> JournalCause {
    JournalCause::Schema(SchemaProblem::Unusable {
        path: path.to_path_buf(),
        why,
    })
}

/// SQLite's "not a database" gets the same advice as any other unusable file.
fn sqlite_cause(path: &Path, e: rusqlite::Error) -> JournalCause {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => refuse(path, Unusable::NotADatabase),
        _ => JournalCause::Sqlite(e),
    }
}

/// Build a new journal under a temporary name, schema and all, then link it
/// to `path` (never over an existing file: if another process made one
/// meanwhile, that one is used).
fn create_fresh(path: &Path) -> Result<(), JournalCause> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = sidecar(path, &format!(".new-{}-{nanos}", std::process::id()));
    let built = (|| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(JournalCause::Io)?;
        // rollback-journal mode for the build: nothing but this one file
        let mut conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(JournalCause::Sqlite)?;
        migrate(&mut conn, true)?;
        conn.close().map_err(|(_, e)| JournalCause::Sqlite(e))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            // a file system without hard links
            Err(_) if fs::symlink_metadata(path).is_err() => {
                fs::rename(&tmp, path).map_err(JournalCause::Io)
            }
            Err(e) => Err(JournalCause::Io(e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_file(sidecar(&tmp, "-journal"));
    built
}

// ---------------------------------------------------------------- display

/// An aligned table for humans, one line per run: run id, time, file, host,
/// state, transport, tries, exit status, elapsed, source, and the error (or
/// where the file went, and why a fallback was used). Under a failed run,
/// the last lines of its output, as `    | line`. Control characters in
/// names, errors and output are shown escaped.
pub fn format_history(rows: &[HistoryRow]) -> String {
    if rows.is_empty() {
        return "no entries\n".into();
    }
    let header = [
        "RUN", "TIME", "FILE", "HOST", "STATE", "VIA", "TRIES", "EXIT", "ELAPSED", "SOURCE",
        "DETAIL",
    ];
    let mut table: Vec<([String; 11], Vec<String>)> = Vec::with_capacity(rows.len() + 1);
    table.push((header.map(String::from), Vec::new()));
    for r in rows {
        let time = short_time(&r.time);
        let source = match &r.rev {
            Some(rev) => format!("{}@{}", r.source, truncate(rev, 12)),
            None => r.source.clone(),
        };
        let fallback = r
            .fallback_reason
            .as_ref()
            .map(|f| format!("fallback: {}", one_line(f)));
        let detail = match (&r.error, &r.remote_path, fallback) {
            (Some(e), _, _) => one_line(e),
            (None, Some(p), Some(f)) => format!("{} ({f})", one_line(p)),
            (None, Some(p), None) => one_line(p),
            (None, None, Some(f)) => f,
            (None, None, None) => String::new(),
        };
        let tail = if r.state == "failed" {
            tail_lines(r.output_tail.as_deref(), 3)
        } else {
            Vec::new()
        };
        table.push((
            [
                r.run.to_string(),
                time,
                escape(&r.file),
                if r.host.is_empty() {
                    "-".into()
                } else {
                    r.host.clone()
                },
                r.state.clone(),
                r.transport.clone().unwrap_or_else(|| "-".into()),
                r.attempts.to_string(),
                r.exit_status.map_or_else(|| "-".into(), |s| s.to_string()),
                r.elapsed_ms
                    .map_or_else(|| "-".into(), |ms| format!("{:.2}s", ms as f64 / 1000.0)),
                source,
                truncate(&detail, 160),
            ],
            tail,
        ));
    }
    let mut widths = [0usize; 11];
    for (row, _) in &table {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (row, tail) in &table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        for l in tail {
            out.push_str("    | ");
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// One run in full (`history --run ID`): every field, the state changes,
/// and the whole output tail.
pub fn format_run(r: &HistoryRow, events: &[RunEvent]) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: &str| {
        if !v.is_empty() {
            out.push_str(&format!("{k:<10} {}\n", escape(v)));
        }
    };
    field("run", &r.run.to_string());
    field("file", &r.file);
    field("path", &r.path);
    field("host", &r.host);
    field("state", &r.state);
    field("started", &short_time(&r.started));
    field("changed", &short_time(&r.time));
    field("via", r.transport.as_deref().unwrap_or(""));
    field("tries", &r.attempts.to_string());
    field("remote", r.remote_path.as_deref().unwrap_or(""));
    field(
        "elapsed",
        &r.elapsed_ms
            .map(|ms| format!("{:.2}s", ms as f64 / 1000.0))
            .unwrap_or_default(),
    );
    field(
        "exit",
        &r.exit_status.map(|s| s.to_string()).unwrap_or_default(),
    );
    field("error", r.error.as_deref().unwrap_or(""));
    field("fallback", r.fallback_reason.as_deref().unwrap_or(""));
    let source = match &r.rev {
        Some(rev) => format!("{} {rev}", r.source),
        None => r.source.clone(),
    };
    field("source", &source);
    field("sha256", &r.sha256);
    field("size", &r.size.to_string());
    out.push_str("events\n");
    for e in events {
        let what = e
            .error
            .as_deref()
            .or(e.remote_path.as_deref())
            .unwrap_or("");
        let attempt = if e.attempt > 0 {
            format!(" (attempt {})", e.attempt)
        } else {
            String::new()
        };
        out.push_str(
            format!(
                "    {}  {}{attempt}  {}",
                short_time(&e.time),
                e.state,
                escape(what)
            )
            .trim_end(),
        );
        out.push('\n');
    }
    let tail = tail_lines(r.output_tail.as_deref(), usize::MAX);
    if !tail.is_empty() {
        out.push_str("output\n");
        for l in tail {
            out.push_str("    | ");
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// `2026-01-02 10:11:12` from an RFC 3339 time (as is if it is not one).
fn short_time(t: &str) -> String {
    DateTime::parse_from_rfc3339(t)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// The last `n` non-empty lines of an output tail, control characters escaped.
fn tail_lines(tail: Option<&str>, n: usize) -> Vec<String> {
    let lines: Vec<&str> = tail
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|l| escape(l)).collect()
}

/// Control characters escaped: one terminal line.
fn escape(s: &str) -> String {
    crate::config::escape_control(s)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

// ---------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::io::Write;
    use std::sync::Arc;

    fn path_from_os(bytes: &[u8]) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(bytes))
    }

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(content).unwrap();
        p
    }

    fn ident(path: &Path, size: u64, mtime_ns: i64, sha: &str) -> FileIdentity {
        FileIdentity {
            path: path.to_path_buf(),
            size,
            mtime_ns,
            sha256: sha.to_string(),
        }
    }

    #[test]
    fn state_names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string().parse::<State>(), Ok(s));
        }
        assert_eq!(State::parse("bogus"), None);
    }

    #[test]
    fn file_identity_hashes_content_and_reads_stat() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.tar.gz", b"abc");
        let id = file_identity(&p).unwrap();
        assert_eq!(id.size, 3);
        assert_eq!(
            id.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.mtime_ns, mtime_ns(&fs::metadata(&p).unwrap()));
        // bigger than the buffer
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let q = write(dir.path(), "big", &big);
        assert_eq!(
            file_identity(&q).unwrap().sha256,
            hex(&Sha256::digest(&big))
        );
        assert!(file_identity(dir.path()).is_err());
        assert!(file_identity(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn open_creates_private_state_dir_and_reopens() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b/state");
        let j = Journal::open(&state).unwrap();
        assert_eq!(j.path(), state.join(JOURNAL_FILE));
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let fmode = fs::metadata(j.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(fmode, 0o600);
        let pkg = j
            .add_package(&ident(Path::new("/d/x"), 1, 2, "h"), None, &Source::Manual)
            .unwrap();
        drop(j);
        let j = Journal::open(&state).unwrap();
        assert_eq!(j.package(pkg).unwrap().unwrap().path, Path::new("/d/x"));
    }

    #[test]
    fn newer_schema_is_refused_with_path_and_operation() {
        let dir = tempfile::tempdir().unwrap();
        drop(Journal::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(JOURNAL_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("journal.sqlite"), "{e}");
        assert!(e.contains("prepare schema"), "{e}");
        assert!(e.contains("99"), "{e}");
    }

    #[test]
    fn add_package_is_idempotent_and_new_content_gets_a_new_id() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let p = Path::new("/drop/app-1.0.tar.gz");
        let a = j
            .add_package(&ident(p, 10, 1_000, "aa"), Some("^app"), &Source::Watch)
            .unwrap();
        let a2 = j
            .add_package(&ident(p, 10, 1_000, "aa"), Some("^app"), &Source::Manual)
            .unwrap();
        assert_eq!(a, a2);
        let b = j
            .add_package(&ident(p, 11, 2_000, "bb"), Some("^app"), &Source::Watch)
            .unwrap();
        assert_ne!(a, b);
        // same content, touched: lookup by size+mtime misses, by hash finds
        assert!(j.lookup(p, 10, 5_000).unwrap().is_none());
        let found = j.lookup(p, 10, 1_000).unwrap().unwrap();
        assert_eq!(found.id, a);
        assert_eq!(found.source, "watch");
        assert_eq!(found.section.as_deref(), Some("^app"));
        assert_eq!(j.lookup_by_hash(p, "aa").unwrap().unwrap().id, a);
        assert_eq!(j.lookup_by_hash(p, "bb").unwrap().unwrap().id, b);
        assert!(j
            .lookup_by_hash(Path::new("/other"), "aa")
            .unwrap()
            .is_none());
        // a hook records its revision
        let h = j
            .add_package(
                &ident(Path::new("/spool/x.zip"), 1, 1, "cc"),
                None,
                &Source::Hook {
                    vcs: "svn".into(),
                    repo: "/srv/repo".into(),
                    rev: "42".into(),
                    author: "ann".into(),
                },
            )
            .unwrap();
        let hp = j.package(h).unwrap().unwrap();
        assert_eq!(hp.source, "hook:svn");
        assert_eq!(hp.rev.as_deref(), Some("42"));
        assert_eq!(hp.author.as_deref(), Some("ann"));
        assert!(DateTime::parse_from_rfc3339(&hp.created).is_ok());
    }

    #[test]
    fn set_state_upserts_and_counts_attempts_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let pkg = j
            .add_package(&ident(Path::new("/d/a"), 1, 1, "x"), None, &Source::Manual)
            .unwrap();
        let d0 = Detail::default();
        j.set_state(pkg, "h1", State::Queued, &d0).unwrap();
        j.set_state(pkg, "h2", State::Queued, &d0).unwrap();
        j.set_state(pkg, "h1", State::Uploading, &d0).unwrap();
        assert_eq!(
            j.host_states(pkg).unwrap(),
            vec![
                ("h1".to_string(), State::Uploading, 1),
                ("h2".to_string(), State::Queued, 0)
            ]
        );
        // three tries in this run, then failed
        let failed = Detail {
            attempt: 3,
            error: Some("connection refused".into()),
            transport: Some("scp".into()),
            ..Detail::default()
        };
        j.set_state(pkg, "h1", State::Failed, &failed).unwrap();
        assert_eq!(
            j.host_states(pkg).unwrap()[0],
            ("h1".into(), State::Failed, 3)
        );
        // a second run: requeued, two tries, uploaded, installed
        j.set_state(pkg, "h1", State::Queued, &d0).unwrap();
        j.set_state(pkg, "h1", State::Uploading, &d0).unwrap();
        assert_eq!(j.host_states(pkg).unwrap()[0].2, 4);
        let up = Detail {
            attempt: 2,
            transport: Some("ftp".into()),
            fallback_reason: Some("ssh: connection refused".into()),
            remote_path: Some("/r/a".into()),
            ..Detail::default()
        };
        j.set_state(pkg, "h1", State::Uploaded, &up).unwrap();
        let inst = Detail {
            attempt: 2,
            exit_status: Some(0),
            elapsed_ms: Some(1200),
            ..Detail::default()
        };
        j.set_state(pkg, "h1", State::Installed, &inst).unwrap();
        assert_eq!(
            j.host_states(pkg).unwrap()[0],
            ("h1".into(), State::Installed, 5)
        );
        // one row per run, newest first: the second run of h1 keeps what its
        // upload said (transport, remote path) and knows nothing of the
        // first run's error; the first run stays as it ended
        let rows = j.history(&HistoryFilter::default()).unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        let h1 = &rows[0];
        assert_eq!((h1.host.as_str(), h1.state.as_str()), ("h1", "installed"));
        assert_eq!(h1.error, None);
        assert_eq!(h1.transport.as_deref(), Some("ftp"));
        assert_eq!(h1.remote_path.as_deref(), Some("/r/a"));
        assert_eq!(h1.elapsed_ms, Some(1200));
        assert_eq!(
            h1.fallback_reason.as_deref(),
            Some("ssh: connection refused")
        );
        assert_eq!(h1.exit_status, Some(0));
        assert_eq!(h1.attempts, 2, "attempts of this run only");
        let first = rows.iter().find(|r| r.state == "failed").unwrap();
        assert_eq!(first.host, "h1");
        assert_eq!(first.attempts, 3);
        assert_eq!(first.error.as_deref(), Some("connection refused"));
        assert!(first.run < h1.run);
        assert_eq!(rows.iter().filter(|r| r.host == "h2").count(), 1);
        // a run's events, in order
        let ev = j.run_events(h1.run).unwrap();
        let states: Vec<&str> = ev.iter().map(|e| e.state.as_str()).collect();
        assert_eq!(states, ["queued", "uploading", "uploaded", "installed"]);
        let only = j
            .history(&HistoryFilter {
                run: Some(first.run),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].state, "failed");
        // every change was appended as an event
        let events: i64 = j
            .conn()
            .query_row(
                "SELECT count(*) FROM event WHERE package = ?1",
                [pkg],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(events, 8);
    }

    #[test]
    fn is_done_needs_every_host_in_the_done_state() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let pkg = j
            .add_package(&ident(Path::new("/d/a"), 1, 1, "x"), None, &Source::Manual)
            .unwrap();
        let hosts = vec!["h1".to_string(), "h2".to_string()];
        let d = Detail::default();
        assert!(!j.is_done(pkg, &hosts, State::Installed).unwrap());
        j.set_state(pkg, "h1", State::Installed, &d).unwrap();
        j.set_state(pkg, "h2", State::Uploaded, &d).unwrap();
        assert!(!j.is_done(pkg, &hosts, State::Installed).unwrap());
        assert!(j.is_done(pkg, &hosts, State::Uploaded).unwrap());
        j.set_state(pkg, "h2", State::Installed, &d).unwrap();
        assert!(j.is_done(pkg, &hosts, State::Installed).unwrap());
        assert!(!j
            .is_done(pkg, &["h3".to_string()], State::Installed)
            .unwrap());
        assert!(j.is_done(pkg, &[], State::Installed).unwrap());
    }

    #[test]
    fn unfinished_lists_work_left_behind_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c);
        {
            let j = Journal::open(dir.path()).unwrap();
            let d = Detail::default();
            a = j
                .add_package(&ident(Path::new("/d/a"), 1, 1, "a"), None, &Source::Watch)
                .unwrap();
            b = j
                .add_package(&ident(Path::new("/d/b"), 1, 1, "b"), None, &Source::Watch)
                .unwrap();
            c = j
                .add_package(&ident(Path::new("/d/c"), 1, 1, "c"), None, &Source::Watch)
                .unwrap();
            j.set_state(a, "h1", State::Installed, &d).unwrap();
            j.set_state(a, "h2", State::Installed, &d).unwrap();
            j.set_state(b, "h1", State::Installed, &d).unwrap();
            j.set_state(b, "h2", State::Uploading, &d).unwrap(); // crash here
            j.set_state(c, "", State::Unrouted, &d).unwrap();
            // the process dies: no clean close
            std::mem::forget(j);
        }
        let j = Journal::open(dir.path()).unwrap();
        let u = j.unfinished().unwrap();
        assert_eq!(u.iter().map(|p| p.id).collect::<Vec<_>>(), vec![b]);
        assert_eq!(u[0].path, Path::new("/d/b"));
        // the restart redoes it
        let d = Detail::default();
        j.set_state(b, "h2", State::Queued, &d).unwrap();
        j.set_state(b, "h2", State::Uploading, &d).unwrap();
        j.set_state(b, "h2", State::Installed, &Detail { attempt: 1, ..d })
            .unwrap();
        assert!(j.unfinished().unwrap().is_empty());
        assert_eq!(
            j.host_states(b).unwrap()[1],
            ("h2".into(), State::Installed, 2)
        );
        let _ = (a, c);
    }

    #[test]
    fn history_filters_by_file_host_and_failure_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let d = Detail::default();
        let a = j
            .add_package(
                &ident(Path::new("/drop/app-1.tar.gz"), 5, 1, "a"),
                None,
                &Source::Watch,
            )
            .unwrap();
        let b = j
            .add_package(
                &ident(Path::new("/drop/sub/db-2.zip"), 7, 1, "b"),
                None,
                &Source::Manual,
            )
            .unwrap();
        j.set_state(a, "web1", State::Installed, &d).unwrap();
        j.set_state(
            a,
            "web2",
            State::Failed,
            &Detail {
                error: Some("exit 3".into()),
                ..d.clone()
            },
        )
        .unwrap();
        j.set_state(b, "web1", State::Installed, &d).unwrap();

        let all = j.history(&HistoryFilter::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(
            (all[0].file.as_str(), all[0].host.as_str()),
            ("db-2.zip", "web1")
        );
        assert_eq!(all[0].path, "/drop/sub/db-2.zip");
        assert_eq!(all[0].source, "manual");
        assert_eq!(all[0].size, 7);

        let by_file = |s: &str| HistoryFilter {
            file: Some(s.into()),
            ..Default::default()
        };
        assert_eq!(j.history(&by_file("app-1.tar.gz")).unwrap().len(), 2);
        assert_eq!(j.history(&by_file("sub/")).unwrap().len(), 1);
        assert_eq!(j.history(&by_file("nothing")).unwrap().len(), 0);
        let by_host = HistoryFilter {
            host: Some("web1".into()),
            ..Default::default()
        };
        assert_eq!(j.history(&by_host).unwrap().len(), 2);
        let failed = HistoryFilter {
            failed_only: true,
            ..Default::default()
        };
        let f = j.history(&failed).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].error.as_deref(), Some("exit 3"));
        let limited = HistoryFilter {
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(j.history(&limited).unwrap().len(), 1);

        let table = format_history(&all);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("RUN"));
        let col = lines[0].find("HOST").unwrap();
        assert!(
            lines.iter().skip(1).all(|l| l[col..].starts_with("web")),
            "{table}"
        );
        assert!(table.contains("exit 3"));
        assert_eq!(format_history(&[]), "no entries\n");
        let json = serde_json::to_string(&all[0]).unwrap();
        assert!(json.contains("\"file\":\"db-2.zip\""), "{json}");
    }

    /// A schema v1 journal as the v1 writer left it: one package, host h1
    /// with two runs (failed after 2 tries, then installed), host h2 left
    /// uploading by a crash.
    fn v1_journal(dir: &Path) -> PathBuf {
        let path = dir.join(JOURNAL_FILE);
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO package (id, path, path_text, name, size, mtime_ns, sha256, source, created)
             VALUES (7, ?1, '/drop/app-1.tgz', 'app-1.tgz', 10, 5, 'abc', 'watch', '2025-01-01T10:00:00.000+00:00')",
            [b"/drop/app-1.tgz".as_slice()],
        )
        .unwrap();
        // host, state, attempt, remote path, error, exit status
        type V1Event<'a> = (
            &'a str,
            &'a str,
            i64,
            Option<&'a str>,
            Option<&'a str>,
            Option<i32>,
        );
        let events: &[V1Event] = &[
            ("h1", "queued", 0, None, None, None),
            ("h2", "queued", 0, None, None, None),
            ("h1", "uploading", 1, None, None, None),
            (
                "h2",
                "uploading",
                1,
                Some("/r/.dispatch-1.part"),
                None,
                None,
            ),
            ("h1", "uploading", 2, None, None, None),
            ("h1", "failed", 2, None, Some("connection refused"), None),
            ("h1", "queued", 0, None, None, None),
            (
                "h1",
                "uploading",
                1,
                Some("/r/.dispatch-2.part"),
                None,
                None,
            ),
            ("h1", "uploaded", 1, Some("/r/app-1.tgz"), None, None),
            ("h1", "installed", 1, None, None, Some(0)),
        ];
        for (i, (host, state, attempt, remote, error, exit)) in events.iter().enumerate() {
            let ms = 1_735_725_600_000 + i as i64 * 1000;
            c.execute(
                "INSERT INTO event (package, host, state, time, time_ms, attempt, transport,
                     remote_path, exit_status, output_tail, error, elapsed_ms)
                 VALUES (7, ?1, ?2, ?3, ?4, ?5, 'scp', ?6, ?7, ?8, ?9, ?10)",
                params![
                    host,
                    state,
                    format!("2025-01-01T10:00:{i:02}.000+00:00"),
                    ms,
                    attempt,
                    remote,
                    exit,
                    exit.map(|_| "done\n"),
                    error,
                    exit.map(|_| 900i64),
                ],
            )
            .unwrap();
        }
        for (host, state, attempts, updated) in
            [("h1", "installed", 3, 9i64), ("h2", "uploading", 1, 3)]
        {
            c.execute(
                "INSERT INTO delivery (package, host, state, attempts, run_base, updated, updated_ms)
                 VALUES (7, ?1, ?2, ?3, 0, '2025-01-01T10:00:00.000+00:00', ?4)",
                params![host, state, attempts, 1_735_725_600_000 + updated * 1000],
            )
            .unwrap();
        }
        drop(c);
        path
    }

    #[test]
    fn a_v1_journal_is_migrated_with_its_runs_replayed_from_the_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = v1_journal(dir.path());
        let j = Journal::open(dir.path()).unwrap();
        let version: i64 = j
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let rows = j.history(&HistoryFilter::default()).unwrap();
        let got: Vec<(&str, &str, u32)> = rows
            .iter()
            .map(|r| (r.host.as_str(), r.state.as_str(), r.attempts))
            .collect();
        assert_eq!(
            got,
            [
                ("h1", "installed", 1),
                ("h1", "failed", 2),
                ("h2", "uploading", 1)
            ],
            "{rows:?}"
        );
        let done = &rows[0];
        assert_eq!(done.remote_path.as_deref(), Some("/r/app-1.tgz"));
        assert_eq!(done.exit_status, Some(0));
        assert_eq!(done.output_tail.as_deref(), Some("done\n"));
        assert_eq!(done.elapsed_ms, Some(900));
        assert_eq!(done.started, "2025-01-01T10:00:06.000+00:00");
        assert_eq!(rows[1].error.as_deref(), Some("connection refused"));
        // every event names its run; the old delivery rows still work
        let orphans: i64 = j
            .conn()
            .query_row("SELECT count(*) FROM event WHERE run IS NULL", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(orphans, 0);
        assert_eq!(j.run_events(done.run).unwrap().len(), 4);
        assert_eq!(j.unfinished().unwrap().len(), 1, "h2 is still to do");
        assert!(j.is_done(7, &["h1".into()], State::Installed).unwrap());
        // the next delivery continues where v1 left off: h2's run goes on
        j.set_state(
            7,
            "h2",
            State::Installed,
            &Detail {
                attempt: 1,
                ..Detail::default()
            },
        )
        .unwrap();
        let h2 = j
            .history(&HistoryFilter {
                host: Some("h2".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(h2.len(), 1);
        assert_eq!(h2[0].state, "installed");
        assert_eq!(h2[0].remote_path.as_deref(), Some("/r/.dispatch-1.part"));
        drop(j);
        // opened again: nothing to migrate, nothing doubled
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.history(&HistoryFilter::default()).unwrap().len(), 3);
        assert!(path.exists());
    }

    #[test]
    fn history_since_keeps_only_runs_changed_after_the_time() {
        let dir = tempfile::tempdir().unwrap();
        v1_journal(dir.path());
        let j = Journal::open(dir.path()).unwrap();
        // h2 changed at +3 s, h1's first run at +5 s, its second at +9 s
        let at = |s: i64| HistoryFilter {
            since_ms: Some(1_735_725_600_000 + s * 1000),
            ..Default::default()
        };
        assert_eq!(j.history(&at(0)).unwrap().len(), 3);
        assert_eq!(j.history(&at(4)).unwrap().len(), 2);
        let late = j.history(&at(6)).unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].state, "installed");
        assert!(j.history(&at(10)).unwrap().is_empty());
    }

    #[test]
    fn non_utf8_paths_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let p = path_from_os(b"/drop/caf\xe9-\xff.tar.gz");
        assert!(p.to_str().is_none());
        let pkg = j
            .add_package(&ident(&p, 3, 9, "h"), None, &Source::Watch)
            .unwrap();
        let back = j.lookup(&p, 3, 9).unwrap().unwrap();
        assert_eq!(back.id, pkg);
        assert_eq!(back.path, p);
        // a different non-UTF-8 name with the same lossy text is another path
        let q = path_from_os(b"/drop/caf\xe8-\xff.tar.gz");
        assert!(j.lookup(&q, 3, 9).unwrap().is_none());
        j.set_state(pkg, "h", State::Installed, &Detail::default())
            .unwrap();
        let rows = j.history(&HistoryFilter::default()).unwrap();
        assert_eq!(rows[0].file, "caf\u{fffd}-\u{fffd}.tar.gz");
        // and a real file with such a name can be identified
        let real = dir.path().join(OsStr::from_bytes(b"x\xff.bin"));
        fs::write(&real, b"1").unwrap();
        assert_eq!(file_identity(&real).unwrap().path, real);
    }

    #[test]
    fn two_handles_on_one_dir_work_concurrently_from_two_threads() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Journal::open(dir.path()).unwrap());
        let b = Arc::new(Journal::open(dir.path()).unwrap());
        let shared = a
            .add_package(
                &ident(Path::new("/d/shared"), 1, 1, "s"),
                None,
                &Source::Manual,
            )
            .unwrap();
        let mut threads = Vec::new();
        for (t, j) in [(0, a.clone()), (1, b.clone())] {
            threads.push(std::thread::spawn(move || {
                for i in 0..100 {
                    let p = PathBuf::from(format!("/d/t{t}-{i}"));
                    let pkg = j
                        .add_package(&ident(&p, i, 1, "h"), None, &Source::Watch)
                        .unwrap();
                    // same package from both threads: one id
                    let same = j
                        .add_package(
                            &ident(Path::new("/d/both"), 1, 1, "b"),
                            None,
                            &Source::Watch,
                        )
                        .unwrap();
                    j.set_state(pkg, "h", State::Uploading, &Detail::default())
                        .unwrap();
                    j.set_state(pkg, "h", State::Installed, &Detail::default())
                        .unwrap();
                    j.set_state(
                        shared,
                        &format!("h{t}"),
                        State::Uploading,
                        &Detail::default(),
                    )
                    .unwrap();
                    let _ = j.history(&HistoryFilter {
                        limit: Some(5),
                        ..Default::default()
                    });
                    assert!(same > 0);
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let rows = a.history(&HistoryFilter::default()).unwrap();
        assert_eq!(rows.iter().filter(|r| r.state == "installed").count(), 200);
        let both = b.lookup(Path::new("/d/both"), 1, 1).unwrap().unwrap();
        let n: i64 = b
            .conn()
            .query_row(
                "SELECT count(*) FROM package WHERE path = ?1",
                [b"/d/both".as_slice()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "package {both:?} recorded twice");
        assert_eq!(a.unfinished().unwrap().len(), 1); // `shared` is left uploading
    }

    #[test]
    fn an_existing_journal_that_is_empty_or_not_a_journal_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        // truncated to 0 bytes
        fs::write(&path, b"").unwrap();
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("empty"), "{e}");
        assert!(e.contains("move it aside"), "{e}");
        assert_eq!(fs::metadata(&path).unwrap().len(), 0, "left as it was");
        // not SQLite at all
        fs::write(&path, vec![b'x'; 8192]).unwrap();
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not an SQLite database"), "{e}");
        assert!(e.contains("move it aside"), "{e}");
        // an SQLite database without the schema
        fs::remove_file(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA page_size=4096; VACUUM;")
            .unwrap();
        drop(c);
        assert!(fs::metadata(&path).unwrap().len() > 0);
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("without the dispatch schema"), "{e}");
    }

    #[test]
    fn a_new_journal_appears_whole_and_a_deleted_one_with_its_wal_left_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
            .collect();
        assert_eq!(names, vec![JOURNAL_FILE.to_string()], "no temporary left");
        j.add_package(&ident(Path::new("/d/x"), 1, 2, "h"), None, &Source::Manual)
            .unwrap();
        // deleted under a handle: its -wal is still there
        fs::remove_file(j.path()).unwrap();
        assert!(sidecar(j.path(), "-wal").exists());
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("journal.sqlite-wal"), "{e}");
        assert!(e.contains("deleted"), "{e}");
        drop(j);
    }

    #[test]
    fn check_file_notices_a_deleted_replaced_or_truncated_journal() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let pkg = j
            .add_package(&ident(Path::new("/d/x"), 1, 2, "h"), None, &Source::Manual)
            .unwrap();
        j.check_file().unwrap();
        // replaced (same content, another file)
        let other = dir.path().join("other");
        fs::copy(j.path(), &other).unwrap();
        fs::rename(&other, j.path()).unwrap();
        let e = j.check_file().unwrap_err();
        assert!(matches!(e.cause, JournalCause::Lost(_)), "{e}");
        assert!(e.to_string().contains("replaced"), "{e}");
        // writes are refused, and the failed state is remembered
        assert!(j
            .set_state(pkg, "h", State::Installed, &Detail::default())
            .is_err());
        assert!(j.take_unrecorded(pkg, "h").is_some());
        assert!(j.take_unrecorded(pkg, "h").is_none(), "taken once");
        assert!(j
            .add_package(&ident(Path::new("/d/y"), 1, 2, "h"), None, &Source::Manual)
            .is_err());
        drop(j);

        let j = Journal::open(dir.path()).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(j.path())
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(j
            .check_file()
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        drop(j);
    }

    #[test]
    fn a_journal_deleted_in_use_is_written_back_by_save_copy() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let pkg = j
            .add_package(&ident(Path::new("/d/x"), 1, 2, "h"), None, &Source::Manual)
            .unwrap();
        j.set_state(pkg, "h", State::Installed, &Detail::default())
            .unwrap();
        assert!(j.take_unrecorded(pkg, "h").is_none());
        fs::remove_file(j.path()).unwrap();
        assert!(j.check_file().unwrap_err().to_string().contains("deleted"));
        let to = j.save_copy().unwrap();
        assert_eq!(to, j.path());
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.is_done(pkg, &["h".into()], State::Installed).unwrap());
        // replaced: the copy goes beside it
        fs::copy(j.path(), dir.path().join("o")).unwrap();
        fs::rename(dir.path().join("o"), j.path()).unwrap();
        let to = j.save_copy().unwrap();
        assert_ne!(to, j.path());
        assert!(
            to.to_string_lossy().contains("journal.sqlite.saved-"),
            "{to:?}"
        );
        assert!(fs::metadata(&to).unwrap().len() > 0);
    }

    #[test]
    fn a_failed_state_write_is_remembered_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let pkg = j
            .add_package(&ident(Path::new("/d/x"), 1, 2, "h"), None, &Source::Manual)
            .unwrap();
        // the package row is gone: the foreign key makes the write fail
        j.conn()
            .execute_batch("PRAGMA foreign_keys=OFF; DELETE FROM package; PRAGMA foreign_keys=ON;")
            .unwrap();
        assert!(j
            .set_state(pkg, "h", State::Installed, &Detail::default())
            .is_err());
        let why = j.take_unrecorded(pkg, "h").unwrap();
        assert!(why.contains("record installed"), "{why}");
        // a write that goes through clears it
        j.conn().execute_batch("PRAGMA foreign_keys=OFF;").unwrap();
        j.set_state(pkg, "h", State::Installed, &Detail::default())
            .unwrap();
        assert!(j.take_unrecorded(pkg, "h").is_none());
    }
}
