//! `dispatch hook svn|git`: a VCS revision → the packages it added or
//! modified → the daemon's spool, or dispatched in the foreground.
//!
//! What a revision contributes:
//!
//! - **svn** (`post-commit REPOS REV`): `svnlook changed` lines whose first
//!   status column is `A`, `U` or `R` (so `UU` too), not `D`, not the
//!   property-only `_U`, and not directories (paths ending with `/`). A
//!   directory copied as a whole (`svn cp`) is listed as the directory alone,
//!   so a branch copy dispatches nothing. `svnlook` runs with
//!   `LC_ALL=C.UTF-8`: an svn hook has an empty environment, and in the C
//!   locale svnlook escapes non-ASCII paths (`gro{U+00DF}e`).
//! - **git post-receive** (stdin `old new ref` lines, several per push): a new
//!   ref takes the commits new to the repository (`rev-list NEW --not` the old
//!   values of this push and every other ref), an updated ref `OLD..NEW`, a
//!   deleted ref nothing. The paths added or modified by those commits
//!   (`diff-tree -r -z --raw --no-renames --root`, regular files only; merge
//!   commits contribute through the commits they merge) are taken with their
//!   content at `NEW`; a path gone at `NEW` is skipped, and the same content
//!   at the same path reached through two refs is taken once.
//! - **git post-commit** (`--commit`): the files of `HEAD`.
//!
//! Files are routed by base name; a file no route matches is skipped (debug
//! log). The committed content is extracted (`svnlook cat`, `git cat-file
//! blob`) straight into a file — never the working copy.
//!
//! Where the files go:
//!
//! - `spool_dir` set and no `--now`: handed to the daemon through the
//!   [`spool`](crate::spool): each run makes its own directory
//!   `spool_dir/<vcs>-<rev>-<pid>-<nanos>/`, writes `.dispatch-meta.json`
//!   there first (the daemon journals the revision and author from it), then
//!   each package as `.NAME.tmp` renamed to `NAME`. Two packages with the same
//!   base name in one run go to two directories, so nothing is overwritten.
//! - `--now`: extracted under `state_dir/hook-tmp/`, dispatched in the
//!   foreground (journal source: the revision), exit code as for
//!   `dispatch FILE…`.
//! - neither: the command re-runs itself with `--now`, detached (new session,
//!   no terminal, stdio closed) and returns 0 at once, so a target that is
//!   down never holds up a commit; results go to the journal and the log.
//!   The re-run gets the post-receive lines on its stdin, and for `--commit`
//!   the commit id in `DISPATCH_HOOK_COMMIT` (so a quick second commit does
//!   not change what is sent).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;

use crate::app::{self as cli, Global};
use crate::config::Config;
use crate::error::{code, Error, HookError, HookInput};
use crate::journal::Source;
use crate::spool::{self, SpoolError};

/// `dispatch hook …`: the two kinds of hook.
#[derive(Subcommand, Debug)]
pub enum HookCmd {
    /// svn post-commit: `dispatch hook svn REPOS REV`
    Svn {
        repos: PathBuf,
        rev: String,
        /// Dispatch in the foreground instead of handing over to the daemon's spool
        #[arg(long)]
        now: bool,
    },
    /// git post-receive (reads `old new ref` lines on stdin) or, with --commit, post-commit (HEAD)
    Git {
        /// Repository (default: $GIT_DIR or the current directory)
        #[arg(long)]
        repo: Option<PathBuf>,
        /// post-commit mode: take the files of HEAD
        #[arg(long)]
        commit: bool,
        /// Dispatch in the foreground instead of handing over to the daemon's spool
        #[arg(long)]
        now: bool,
    },
}

/// Environment variable that pins the commit of `hook git --commit`.
pub const COMMIT_ENV: &str = "DISPATCH_HOOK_COMMIT";

impl From<SpoolError> for HookError {
    fn from(e: SpoolError) -> HookError {
        HookError::Io {
            path: e.path,
            op: e.op,
            err: e.err,
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> HookError + 'a {
    move |err| HookError::Io {
        path: path.to_path_buf(),
        op,
        err,
    }
}

/// Where a file's committed content comes from.
#[derive(Debug, Clone)]
enum Blob {
    Svn {
        repos: PathBuf,
        rev: String,
        path: String,
    },
    Git {
        git_dir: PathBuf,
        id: String,
    },
}

/// One file of a revision.
#[derive(Debug, Clone)]
struct Change {
    /// Repository path, for messages.
    path: String,
    /// Base name as the file system spells it.
    name_os: OsString,
    /// Base name as text (what routes match).
    name: String,
    blob: Blob,
}

/// A revision and the files it brings.
#[derive(Debug, Clone)]
struct Revision {
    vcs: &'static str,
    repo: String,
    rev: String,
    author: String,
    files: Vec<Change>,
}

impl Revision {
    /// What the spool's metadata file says about this revision.
    fn meta(&self) -> spool::Meta {
        spool::Meta {
            author: self.author.clone(),
            repo: self.repo.clone(),
            rev: self.rev.clone(),
            vcs: self.vcs.to_string(),
        }
    }

    /// The journal's source: the same as a spooled copy gets from its metadata.
    fn source(&self) -> Source {
        self.meta().source()
    }

    /// The revision as people write it: `r12`, `3f2a9c1d0e4b`.
    fn label(&self) -> String {
        match self.vcs {
            "svn" => format!("r{}", self.rev),
            _ => self.rev.chars().take(12).collect(),
        }
    }
}

/// `dispatch hook …`: see the module docs.
pub fn run(g: &Global, h: HookCmd) -> Result<u8, Error> {
    let config = g.load_config()?;
    let now = match &h {
        HookCmd::Svn { now, .. } | HookCmd::Git { now, .. } => *now,
    };
    // post-receive input is read once, here, whoever ends up using it
    let receive_input = match &h {
        HookCmd::Git { commit: false, .. } => {
            let mut buf = Vec::new();
            io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .map_err(|e| HookError::Input(HookInput::Stdin(e)))?;
            Some(buf)
        }
        _ => None,
    };
    let revisions = match &h {
        HookCmd::Svn { repos, rev, .. } => vec![svn_revision(repos, rev)?],
        HookCmd::Git { repo, .. } => {
            let git_dir = git_dir(repo.as_deref())?;
            match &receive_input {
                Some(input) => git_receive(&git_dir, input)?,
                None => {
                    let pinned = std::env::var(COMMIT_ENV).ok().filter(|s| !s.is_empty());
                    vec![git_commit(&git_dir, pinned.as_deref())?]
                }
            }
        }
    };
    let revisions = routed_only(&config, revisions);
    let count: usize = revisions.iter().map(|r| r.files.len()).sum();
    if count == 0 {
        log::debug!("hook: no routed files in this revision; nothing to do");
        return Ok(code::OK);
    }
    match (&config.settings.spool_dir, now || g.dry_run) {
        (Some(spool), false) => Ok(spool_revisions(g.quiet, spool, &revisions)),
        (None, false) => {
            let pin = match &h {
                HookCmd::Git { commit: true, .. } => Some(revisions[0].rev.clone()),
                _ => None,
            };
            detach(receive_input, pin)?;
            for r in &revisions {
                log::info!(
                    "{} {}: {} by {}: {} file(s) dispatched in the background",
                    r.vcs,
                    r.repo,
                    r.label(),
                    r.author,
                    r.files.len()
                );
            }
            Ok(code::OK)
        }
        (_, true) => foreground(g, config, &revisions),
    }
}

/// Keep the files some route matches; log the others at debug level.
fn routed_only(config: &Config, revisions: Vec<Revision>) -> Vec<Revision> {
    revisions
        .into_iter()
        .map(|mut r| {
            r.files.retain(|f| {
                let keep = config.route_for(&f.name).is_some();
                if !keep {
                    log::debug!("{}: {} {}: no route matches; skipped", f.path, r.vcs, r.rev);
                }
                keep
            });
            r
        })
        .filter(|r| !r.files.is_empty())
        .collect()
}

// ---------------------------------------------------------------- commands

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn status_text(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => format!("killed ({status})"),
    }
}

/// Run a command, return its stdout; a non-zero exit is an error with stderr.
fn output(cmd: &mut Command) -> Result<Vec<u8>, HookError> {
    let what = describe(cmd);
    log::debug!("hook: running {what}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|err| HookError::Spawn {
            cmd: what.clone(),
            err,
        })?;
    if !out.status.success() {
        return Err(HookError::Command {
            cmd: what,
            status: status_text(out.status),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// Run a command with its stdout going straight into `dest`.
fn output_to_file(cmd: &mut Command, dest: &Path) -> Result<(), HookError> {
    let what = describe(cmd);
    let file = File::create(dest).map_err(io_err(dest, "create"))?;
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::piped())
        .output()
        .map_err(|err| HookError::Spawn {
            cmd: what.clone(),
            err,
        })?;
    if !out.status.success() {
        return Err(HookError::Command {
            cmd: what,
            status: status_text(out.status),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

fn base_name_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

// ---------------------------------------------------------------- svn

fn svnlook() -> Command {
    let mut c = Command::new("svnlook");
    // svn hooks run with an empty environment; in the C locale svnlook escapes
    // non-ASCII paths and cannot take them as arguments
    c.env("LC_ALL", "C.UTF-8");
    c
}

fn svn_revision(repos: &Path, rev: &str) -> Result<Revision, HookError> {
    if rev.is_empty() || !rev.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HookError::Input(HookInput::SvnRevision(rev.to_string())));
    }
    let repos = fs::canonicalize(repos).map_err(io_err(repos, "open repository"))?;
    let changed = output(svnlook().arg("changed").arg("-r").arg(rev).arg(&repos))?;
    let author = output(svnlook().arg("author").arg("-r").arg(rev).arg(&repos))?;
    let author = String::from_utf8_lossy(&author).trim().to_string();
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for path in svn_changed_files(&changed) {
        if !seen.insert(path.clone()) {
            continue;
        }
        let name_os = OsStr::from_bytes(base_name_of(path.as_bytes())).to_os_string();
        files.push(Change {
            name: name_os.to_string_lossy().into_owned(),
            name_os,
            blob: Blob::Svn {
                repos: repos.clone(),
                rev: rev.to_string(),
                path: path.clone(),
            },
            path,
        });
    }
    Ok(Revision {
        vcs: "svn",
        repo: repos.display().to_string(),
        rev: rev.to_string(),
        author,
        files,
    })
}

/// The added/modified/replaced files in `svnlook changed` output.
fn svn_changed_files(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let mut files = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        // four status columns, then the repository path
        let (Some(status), Some(path)) = (line.get(..4), line.get(4..)) else {
            continue;
        };
        if !matches!(status.as_bytes()[0], b'A' | b'U' | b'R') {
            continue;
        }
        if path.is_empty() || path.ends_with('/') {
            continue;
        }
        files.push(path.to_string());
    }
    files
}

// ---------------------------------------------------------------- git

/// Variables git sets for hooks that would override `--git-dir`/`-C`.
const GIT_REPO_ENV: [&str; 5] = [
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_PREFIX",
    "GIT_COMMON_DIR",
];

fn git(git_dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("--git-dir").arg(git_dir);
    for v in GIT_REPO_ENV {
        c.env_remove(v);
    }
    c
}

/// The repository's git directory: `--repo`, else `$GIT_DIR` (as git sets it
/// for hooks), else the current directory.
fn git_dir(repo: Option<&Path>) -> Result<PathBuf, HookError> {
    if repo.is_none() {
        if let Some(d) = std::env::var_os("GIT_DIR").filter(|d| !d.is_empty()) {
            let d = PathBuf::from(d);
            return fs::canonicalize(&d).map_err(io_err(&d, "open repository"));
        }
    }
    let dir = repo.unwrap_or(Path::new("."));
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args(["rev-parse", "--absolute-git-dir"]);
    for v in GIT_REPO_ENV {
        c.env_remove(v);
    }
    let out = output(&mut c)?;
    let text = out.strip_suffix(b"\n").unwrap_or(&out);
    Ok(PathBuf::from(OsStr::from_bytes(text)))
}

/// How the journal names a git repository: the work tree, or the bare repo.
fn git_repo_name(git_dir: &Path) -> String {
    match (git_dir.file_name(), git_dir.parent()) {
        (Some(n), Some(p)) if n == ".git" => p.display().to_string(),
        _ => git_dir.display().to_string(),
    }
}

fn git_author(git_dir: &Path, rev: &str) -> Result<String, HookError> {
    let out = output(git(git_dir).args(["log", "-1", "--format=%an", rev, "--"]))?;
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

fn is_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

/// One post-receive line.
#[derive(Debug, Clone, PartialEq)]
struct RefUpdate {
    old: String,
    new: String,
    name: String,
}

fn parse_receive(input: &[u8]) -> Result<Vec<RefUpdate>, HookError> {
    let text = String::from_utf8_lossy(input);
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [old, new, name] if is_sha(old) && is_sha(new) => v.push(RefUpdate {
                old: old.to_string(),
                new: new.to_string(),
                name: name.to_string(),
            }),
            _ => {
                return Err(HookError::Input(HookInput::ReceiveLine {
                    line: i + 1,
                    text: line.to_string(),
                }))
            }
        }
    }
    Ok(v)
}

/// Paths a commit added or modified (regular files), as raw bytes.
fn commit_paths(git_dir: &Path, commit: &str) -> Result<Vec<Vec<u8>>, HookError> {
    let out = output(git(git_dir).args([
        "diff-tree",
        "-r",
        "-z",
        "--raw",
        "--no-renames",
        "--no-commit-id",
        "--root",
        commit,
    ]))?;
    Ok(parse_diff_tree(&out))
}

/// `diff-tree -z --raw` records: `:SRCMODE DSTMODE SRC DST STATUS\0PATH\0`.
fn parse_diff_tree(out: &[u8]) -> Vec<Vec<u8>> {
    let mut paths = Vec::new();
    let mut fields = out.split(|b| *b == 0);
    while let Some(meta) = fields.next() {
        if meta.first() != Some(&b':') {
            continue;
        }
        let Some(path) = fields.next() else { break };
        let meta = String::from_utf8_lossy(&meta[1..]);
        let parts: Vec<&str> = meta.split(' ').collect();
        let (Some(dst_mode), Some(status)) = (parts.get(1), parts.get(4)) else {
            continue;
        };
        let added_or_modified = status.starts_with('A') || status.starts_with('M');
        let regular = *dst_mode == "100644" || *dst_mode == "100755";
        if added_or_modified && regular && !path.is_empty() {
            paths.push(path.to_vec());
        }
    }
    paths
}

/// The regular files of a tree, path → blob id.
fn tree_blobs(
    git_dir: &Path,
    rev: &str,
) -> Result<std::collections::HashMap<Vec<u8>, String>, HookError> {
    let out = output(git(git_dir).args(["ls-tree", "-r", "-z", "--full-tree", rev]))?;
    let mut m = std::collections::HashMap::new();
    for rec in out.split(|b| *b == 0) {
        // MODE SP TYPE SP ID TAB PATH
        let Some(tab) = rec.iter().position(|b| *b == b'\t') else {
            continue;
        };
        let meta = String::from_utf8_lossy(&rec[..tab]);
        let parts: Vec<&str> = meta.split(' ').collect();
        if let [mode, "blob", id] = parts.as_slice() {
            if *mode == "100644" || *mode == "100755" {
                m.insert(rec[tab + 1..].to_vec(), id.to_string());
            }
        }
    }
    Ok(m)
}

fn git_change(git_dir: &Path, path: &[u8], id: String) -> Change {
    let name_os = OsStr::from_bytes(base_name_of(path)).to_os_string();
    Change {
        path: String::from_utf8_lossy(path).into_owned(),
        name: name_os.to_string_lossy().into_owned(),
        name_os,
        blob: Blob::Git {
            git_dir: git_dir.to_path_buf(),
            id,
        },
    }
}

/// post-receive: one revision per updated or created ref that brought files.
fn git_receive(git_dir: &Path, input: &[u8]) -> Result<Vec<Revision>, HookError> {
    let updates = parse_receive(input)?;
    let repo = git_repo_name(git_dir);
    // what the repository held before this push: every other ref, and the
    // old values of the refs this push changed
    let olds: Vec<&str> = updates
        .iter()
        .filter(|u| !is_zero(&u.old))
        .map(|u| u.old.as_str())
        .collect();
    let mut seen: HashSet<(Vec<u8>, String)> = HashSet::new();
    let mut revisions = Vec::new();
    for u in &updates {
        if is_zero(&u.new) {
            log::debug!("{}: {repo}: deleted; nothing to dispatch", u.name);
            continue;
        }
        let mut cmd = git(git_dir);
        cmd.args(["rev-list", "--reverse"]);
        if is_zero(&u.old) {
            cmd.arg(&u.new).arg("--not").args(&olds);
            for other in &updates {
                cmd.arg(format!("--exclude={}", other.name));
            }
            // not --all: it includes HEAD, which may be this very ref
            cmd.arg("--glob=refs/*");
        } else {
            cmd.arg(format!("{}..{}", u.old, u.new));
        }
        cmd.arg("--");
        let commits = output(&mut cmd)?;
        let commits: Vec<String> = String::from_utf8_lossy(&commits)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        log::debug!("{}: {repo}: {} new commit(s)", u.name, commits.len());
        let mut paths: Vec<Vec<u8>> = Vec::new();
        let mut in_ref = HashSet::new();
        for c in &commits {
            for p in commit_paths(git_dir, c)? {
                if in_ref.insert(p.clone()) {
                    paths.push(p);
                }
            }
        }
        if paths.is_empty() {
            continue;
        }
        let tree = tree_blobs(git_dir, &u.new)?;
        let mut files = Vec::new();
        for p in paths {
            let Some(id) = tree.get(&p) else {
                log::debug!(
                    "{}: {repo}: {}: gone at {}; skipped",
                    String::from_utf8_lossy(&p),
                    u.name,
                    &u.new[..12]
                );
                continue;
            };
            if !seen.insert((p.clone(), id.clone())) {
                continue;
            }
            files.push(git_change(git_dir, &p, id.clone()));
        }
        if files.is_empty() {
            continue;
        }
        revisions.push(Revision {
            vcs: "git",
            repo: repo.clone(),
            rev: u.new.clone(),
            author: git_author(git_dir, &u.new)?,
            files,
        });
    }
    Ok(revisions)
}

/// post-commit: the files of one commit (HEAD unless pinned).
fn git_commit(git_dir: &Path, pinned: Option<&str>) -> Result<Revision, HookError> {
    let rev = pinned.unwrap_or("HEAD");
    let sha = output(git(git_dir).args([
        "rev-parse",
        "--verify",
        "--quiet",
        &format!("{rev}^{{commit}}"),
    ]))
    .map_err(|e| match e {
        HookError::Command { cmd, .. } => HookError::Command {
            cmd,
            status: format!("{rev}: no such commit"),
            stderr: String::new(),
        },
        other => other,
    })?;
    let sha = String::from_utf8_lossy(&sha).trim().to_string();
    let paths = commit_paths(git_dir, &sha)?;
    let tree = if paths.is_empty() {
        Default::default()
    } else {
        tree_blobs(git_dir, &sha)?
    };
    let files = paths
        .iter()
        .filter_map(|p| tree.get(p).map(|id| git_change(git_dir, p, id.clone())))
        .collect();
    Ok(Revision {
        vcs: "git",
        repo: git_repo_name(git_dir),
        author: git_author(git_dir, &sha)?,
        rev: sha,
        files,
    })
}

// ---------------------------------------------------------------- extraction

/// Write a file's committed content to `dest`.
fn extract(blob: &Blob, dest: &Path) -> Result<(), HookError> {
    match blob {
        Blob::Svn { repos, rev, path } => output_to_file(
            svnlook().arg("cat").arg("-r").arg(rev).arg(repos).arg(path),
            dest,
        ),
        Blob::Git { git_dir, id } => {
            output_to_file(git(git_dir).args(["cat-file", "blob", id]), dest)
        }
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// The directory stem of one revision's files: `<vcs>-<rev>-<pid>-<nanos>`.
fn run_stem(r: &Revision) -> String {
    format!("{}-{}-{}", r.vcs, r.label(), unique_suffix())
}

/// Hand the files to the daemon through the spool; returns the exit code.
fn spool_revisions(quiet: bool, spool: &Path, revisions: &[Revision]) -> u8 {
    if let Err(e) = fs::create_dir_all(spool) {
        log::error!("{}: cannot create spool dir: {e}", spool.display());
        eprintln!(
            "dispatch: {}: cannot create spool dir: {e}",
            spool.display()
        );
        return code::FAILED;
    }
    let mut failed = 0;
    for r in revisions {
        let mut writer = spool::Writer::new(spool, run_stem(r), r.meta());
        for f in &r.files {
            let res = writer.publish(&f.name_os, |tmp: &Path| extract(&f.blob, tmp));
            match res {
                Ok(dest) => handed_over(quiet, r, f, &dest),
                Err(e) => {
                    failed += 1;
                    log::error!(
                        "{}: {} {} ({}): not handed over: {e}",
                        f.path,
                        r.vcs,
                        r.label(),
                        r.repo
                    );
                    eprintln!("dispatch: {}: not handed over: {e}", f.path);
                }
            }
        }
        writer.finish();
    }
    if failed > 0 {
        code::FAILED
    } else {
        code::OK
    }
}

fn handed_over(quiet: bool, r: &Revision, f: &Change, dest: &Path) {
    log::info!(
        "{}: {} {} by {} ({}): handed over to {}",
        f.name,
        r.vcs,
        r.label(),
        r.author,
        r.repo,
        dest.display()
    );
    if !quiet {
        println!(
            "{}: handed over to dispatch ({})",
            f.name.escape_debug(),
            dest.display()
        );
    }
}

/// Removes the foreground extraction directory, whatever happens.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("{}: cannot remove: {e}", self.0.display());
            }
        }
    }
}

/// `--now`: extract under `state_dir/hook-tmp/`, dispatch, report.
fn foreground(g: &Global, config: Config, revisions: &[Revision]) -> Result<u8, Error> {
    let netrc = g.load_netrc()?;
    let journal = if g.dry_run {
        None
    } else {
        cli::open_journal(&config)
    };
    let root = config.settings.state_dir.join("hook-tmp");
    fs::create_dir_all(&root).map_err(io_err(&root, "create directory"))?;
    let top = TempDir(
        spool::create_unique_dir(&root, &run_stem(&revisions[0])).map_err(HookError::from)?,
    );
    let mut items = Vec::new();
    let mut failed = 0usize;
    for (sub, r) in (1u32..).zip(revisions) {
        let paths = extract_revision(&top.0, sub, r, &mut failed);
        let p = cli::prepare(&config, journal.as_deref(), paths, &r.source());
        for f in &p.unrouted {
            log::debug!("{}: no route matches; skipped", f.display());
        }
        for u in &p.unreadable {
            failed += 1;
            let (f, e) = (u.path.display(), &u.why);
            log::error!("{f}: cannot read: {e}");
            eprintln!("dispatch: {f}: cannot read: {e}");
        }
        items.extend(p.items);
    }
    let none = crate::progress::Mode::None;
    let outcomes = cli::run_batch(g, Arc::new(config), Arc::new(netrc), journal, items, none);
    let bad = outcomes.iter().filter(|o| !o.ok).count();
    if !g.json && !g.quiet && !outcomes.is_empty() {
        eprintln!(
            "dispatch: {} file × host: {} ok, {bad} failed",
            outcomes.len(),
            outcomes.len() - bad
        );
    }
    drop(top);
    Ok(if bad > 0 || failed > 0 {
        code::FAILED
    } else {
        code::OK
    })
}

/// Extract the files of revision number `sub` under `top/<sub>…/`; returns
/// their paths, counting those that could not be extracted in `failed`.
fn extract_revision(top: &Path, sub: u32, r: &Revision, failed: &mut usize) -> Vec<PathBuf> {
    let mut dirs = spool::RunDirs::new(top, sub.to_string());
    let mut paths = Vec::new();
    for f in &r.files {
        let res = dirs
            .dir_for(&f.name_os, |_: &Path| Ok::<(), HookError>(()))
            .and_then(|d| {
                let dest = d.join(&f.name_os);
                extract(&f.blob, &dest).map(|_| dest)
            });
        match res {
            Ok(p) => {
                log::info!(
                    "{}: {} {} by {} ({}): dispatching now",
                    f.name,
                    r.vcs,
                    r.label(),
                    r.author,
                    r.repo
                );
                paths.push(p);
            }
            Err(e) => {
                *failed += 1;
                log::error!(
                    "{}: {} {} ({}): cannot extract: {e}",
                    f.path,
                    r.vcs,
                    r.label(),
                    r.repo
                );
                eprintln!("dispatch: {}: cannot extract: {e}", f.path);
            }
        }
    }
    paths
}

// ---------------------------------------------------------------- detaching

/// Run this same command again with `--now`, in its own session with stdio
/// closed, and do not wait for it.
fn detach(stdin: Option<Vec<u8>>, pin: Option<String>) -> Result<(), HookError> {
    let exe = std::env::current_exe().map_err(|err| HookError::Spawn {
        cmd: "dispatch (re-run with --now)".into(),
        err,
    })?;
    // the same arguments, plus --now (before a `--`, if there is one)
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.insert(at, OsString::from("--now"));
    let mut cmd = Command::new(&exe);
    cmd.args(&args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(sha) = pin {
        cmd.env(COMMIT_ENV, sha);
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let what = describe(&cmd);
    let mut child = cmd.spawn().map_err(|err| HookError::Spawn {
        cmd: what.clone(),
        err,
    })?;
    log::debug!("hook: started {what} (pid {})", child.id());
    if let (Some(bytes), Some(mut w)) = (stdin, child.stdin.take()) {
        // the child reads all of it first thing; a pipe holds 64 KiB meanwhile
        w.write_all(&bytes)
            .map_err(|err| HookError::Spawn { cmd: what, err })?;
    }
    // not waited for: the child outlives us and is reaped by init
    drop(child);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svnlook_changed_keeps_added_updated_replaced_files_only() {
        let out = "A   drop/\nA   drop/a b.tgz\nU   drop/c.tgz\n_U  drop/p.tgz\nUU  drop/both.tgz\nD   drop/gone.tgz\nR   drop/r.tgz\nA   drop/größe.tgz\nA + drop/copied.tgz\n";
        assert_eq!(
            svn_changed_files(out.as_bytes()),
            vec![
                "drop/a b.tgz",
                "drop/c.tgz",
                "drop/both.tgz",
                "drop/r.tgz",
                "drop/größe.tgz",
                "drop/copied.tgz"
            ]
        );
    }

    #[test]
    fn diff_tree_records_give_added_and_modified_regular_files() {
        let z = "0000000000000000000000000000000000000000";
        let a = "1111111111111111111111111111111111111111";
        let mut out = Vec::new();
        for (meta, path) in [
            (format!(":000000 100644 {z} {a} A"), "drop/new file.tgz"),
            (format!(":100644 100755 {a} {a} M"), "drop/exec.tgz"),
            (format!(":100644 000000 {a} {z} D"), "drop/gone.tgz"),
            (format!(":000000 120000 {z} {a} A"), "drop/link.tgz"),
            (format!(":000000 160000 {z} {a} A"), "sub"),
            (format!(":100644 100644 {a} {a} M"), "line\nbreak.tgz"),
        ] {
            out.extend_from_slice(meta.as_bytes());
            out.push(0);
            out.extend_from_slice(path.as_bytes());
            out.push(0);
        }
        let got: Vec<String> = parse_diff_tree(&out)
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        assert_eq!(
            got,
            vec!["drop/new file.tgz", "drop/exec.tgz", "line\nbreak.tgz"]
        );
    }

    #[test]
    fn post_receive_lines_are_parsed_and_bad_ones_refused() {
        let z = "0".repeat(40);
        let a = "a".repeat(40);
        let input = format!("{z} {a} refs/heads/main\n\n{a} {z} refs/heads/old\n");
        let u = parse_receive(input.as_bytes()).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].name, "refs/heads/main");
        assert!(is_zero(&u[0].old) && is_zero(&u[1].new));
        assert!(parse_receive(b"nonsense\n").is_err());
    }

    #[test]
    fn base_name_is_the_last_path_component() {
        assert_eq!(base_name_of(b"a/b/c.tgz"), b"c.tgz");
        assert_eq!(base_name_of(b"c.tgz"), b"c.tgz");
    }
}
