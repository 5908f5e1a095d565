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

use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Local, SecondsFormat};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use sha2::{Digest, Sha256};

/// File name of the database inside `state_dir`.
pub const JOURNAL_FILE: &str = "journal.sqlite";

/// Schema version written to `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

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
    type Err = String;
    fn from_str(s: &str) -> Result<State, String> {
        State::parse(s).ok_or_else(|| format!("unknown journal state {s:?}"))
    }
}

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
    pub limit: Option<usize>,
}

/// One file × host, in its latest state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryRow {
    /// When the state was last changed (RFC 3339, local time).
    pub time: String,
    pub file: String,
    pub path: String,
    pub host: String,
    pub state: String,
    pub transport: Option<String>,
    pub attempts: u32,
    pub exit_status: Option<i32>,
    pub error: Option<String>,
    pub fallback_reason: Option<String>,
    pub source: String,
    pub rev: Option<String>,
    pub sha256: String,
    pub size: u64,
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
    /// The file was written by a newer dispatch, or is not a journal.
    Schema(String),
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "journal {}: {}: ", self.path.display(), self.op)?;
        match &self.cause {
            JournalCause::Sqlite(e) => write!(f, "{e}"),
            JournalCause::Io(e) => write!(f, "{e}"),
            JournalCause::Schema(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            JournalCause::Sqlite(e) => Some(e),
            JournalCause::Io(e) => Some(e),
            JournalCause::Schema(_) => None,
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

impl Journal {
    /// Open (creating if needed) `state_dir/journal.sqlite`. `state_dir` is
    /// created with mode 0700, the database file with 0600 (install output
    /// may be sensitive).
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(JOURNAL_FILE);
        let io_err = |op: &str, e: io::Error| JournalError {
            path: path.clone(),
            op: op.to_string(),
            cause: JournalCause::Io(e),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| io_err("create state directory", e))?;
        // Create the file ourselves so it gets 0600; SQLite gives the -wal and
        // -shm files the same mode.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("create", e))?;
        let sql_err = |op: &str, e: rusqlite::Error| JournalError {
            path: path.clone(),
            op: op.to_string(),
            cause: JournalCause::Sqlite(e),
        };
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
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
        migrate(&mut conn).map_err(|cause| JournalError {
            path: path.clone(),
            op: "prepare schema".into(),
            cause,
        })?;
        Ok(Journal {
            conn: Mutex::new(conn),
            path,
        })
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
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let prev: Option<(String, i64, i64)> = tx.prepare_cached("SELECT state, attempts, run_base FROM delivery WHERE package = ?1 AND host = ?2")?.query_row(
                    params![pkg, host],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let (prev_state, attempts, run_base) = match &prev {
                Some((s, a, b)) => (State::parse(s), *a, *b),
                None => (None, 0, 0),
            };
            let this_run = i64::from(detail.attempt);
            let new_run = match state {
                State::Queued => true,
                State::Uploading => {
                    !matches!(prev_state, Some(State::Queued) | Some(State::Uploading))
                }
                _ => false,
            };
            let run_base = if new_run { attempts } else { run_base };
            let attempts = match state {
                State::Queued => attempts,
                State::Uploading => run_base + this_run.max(1),
                _ => attempts.max(run_base + this_run),
            };
            let (time, time_ms) = now();
            let elapsed = detail.elapsed_ms.map(to_i64);
            // A new run forgets the previous run's outcome; later states of a
            // run keep what earlier ones said unless they say otherwise.
            let sql = if new_run {
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
                     updated_ms = excluded.updated_ms"
            } else {
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
                     updated = excluded.updated, updated_ms = excluded.updated_ms"
            };
            tx.prepare_cached(sql)?.execute(params![
                pkg,
                host,
                state.as_str(),
                attempts,
                run_base,
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
            tx.prepare_cached(
                "INSERT INTO event (package, host, state, time, time_ms, attempt, transport,
                     fallback_reason, remote_path, exit_status, output_tail, error, elapsed_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
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
                elapsed,
            ])?;
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

    /// One row per file × host in its latest state, newest first.
    pub fn history(&self, f: &HistoryFilter) -> Result<Vec<HistoryRow>, JournalError> {
        let conn = self.conn();
        let limit: i64 = f
            .limit
            .map(|l| i64::try_from(l).unwrap_or(i64::MAX))
            .unwrap_or(-1);
        let run = || -> rusqlite::Result<Vec<HistoryRow>> {
            let mut st = conn.prepare_cached(
                "SELECT d.updated, p.name, p.path_text, d.host, d.state, d.transport, d.attempts,
                        d.exit_status, d.error, d.fallback_reason, p.source, p.vcs, p.rev,
                        p.sha256, p.size
                 FROM delivery d JOIN package p ON p.id = d.package
                 WHERE (?1 IS NULL OR instr(p.path_text, ?1) > 0)
                   AND (?2 IS NULL OR d.host = ?2)
                   AND (?3 = 0 OR d.state = 'failed')
                 ORDER BY d.updated_ms DESC, p.id DESC, d.host
                 LIMIT ?4",
            )?;
            let rows = st.query_map(params![f.file, f.host, f.failed_only, limit], |r| {
                let kind: String = r.get(10)?;
                let vcs: Option<String> = r.get(11)?;
                let attempts: i64 = r.get(6)?;
                Ok(HistoryRow {
                    time: r.get(0)?,
                    file: r.get(1)?,
                    path: r.get(2)?,
                    host: r.get(3)?,
                    state: r.get(4)?,
                    transport: r.get(5)?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    exit_status: r.get(7)?,
                    error: r.get(8)?,
                    fallback_reason: r.get(9)?,
                    source: match vcs {
                        Some(v) if kind == "hook" => format!("hook:{v}"),
                        _ => kind,
                    },
                    rev: r.get(12)?,
                    sha256: r.get(13)?,
                    size: to_u64(r.get(14)?),
                })
            })?;
            rows.collect()
        };
        run().map_err(self.err("read history"))
    }
}

/// Create or check the schema, inside one immediate transaction so that two
/// processes opening a fresh journal at once do not both create it.
fn migrate(conn: &mut Connection) -> Result<(), JournalCause> {
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
                return Err(JournalCause::Schema(
                    "database has tables but no dispatch schema version; not a dispatch journal?"
                        .into(),
                ));
            }
            tx.execute_batch(SCHEMA_V1).map_err(JournalCause::Sqlite)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(JournalCause::Sqlite)?;
        }
        SCHEMA_VERSION => {}
        v if v > SCHEMA_VERSION => {
            return Err(JournalCause::Schema(format!(
                "schema version {v} is newer than this dispatch understands ({SCHEMA_VERSION})"
            )))
        }
        v => return Err(JournalCause::Schema(format!("unknown schema version {v}"))),
    }
    tx.commit().map_err(JournalCause::Sqlite)
}

// ---------------------------------------------------------------- display

/// An aligned table for humans: time, file, host, state, transport, tries,
/// exit status, source, and the error (or why a fallback was used).
pub fn format_history(rows: &[HistoryRow]) -> String {
    if rows.is_empty() {
        return "no entries\n".into();
    }
    let header = [
        "TIME", "FILE", "HOST", "STATE", "VIA", "TRIES", "EXIT", "SOURCE", "DETAIL",
    ];
    let mut table: Vec<[String; 9]> = Vec::with_capacity(rows.len() + 1);
    table.push(header.map(String::from));
    for r in rows {
        let time = DateTime::parse_from_rfc3339(&r.time)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|_| r.time.clone());
        let source = match &r.rev {
            Some(rev) => format!("{}@{}", r.source, truncate(rev, 12)),
            None => r.source.clone(),
        };
        let detail = match (&r.error, &r.fallback_reason) {
            (Some(e), _) => one_line(e),
            (None, Some(f)) => format!("fallback: {}", one_line(f)),
            (None, None) => String::new(),
        };
        table.push([
            time,
            r.file.clone(),
            if r.host.is_empty() {
                "-".into()
            } else {
                r.host.clone()
            },
            r.state.clone(),
            r.transport.clone().unwrap_or_else(|| "-".into()),
            r.attempts.to_string(),
            r.exit_status.map_or_else(|| "-".into(), |s| s.to_string()),
            source,
            truncate(&detail, 160),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
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
        // one row per host, the error of the first run forgotten, transport kept
        let rows = j.history(&HistoryFilter::default()).unwrap();
        assert_eq!(rows.len(), 2);
        let h1 = rows.iter().find(|r| r.host == "h1").unwrap();
        assert_eq!(h1.state, "installed");
        assert_eq!(h1.error, None);
        assert_eq!(h1.transport.as_deref(), Some("ftp"));
        assert_eq!(
            h1.fallback_reason.as_deref(),
            Some("ssh: connection refused")
        );
        assert_eq!(h1.exit_status, Some(0));
        assert_eq!(h1.attempts, 5);
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
        assert!(lines[0].starts_with("TIME"));
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
}
