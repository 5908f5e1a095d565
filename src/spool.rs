//! The spool: how a hook hands packages to the daemon. Both sides of the
//! protocol live here; [`hook`](crate::hook) writes through [`Writer`], the
//! [`daemon`](crate::daemon) reads with [`source_of`] and clears up with
//! [`consume`].
//!
//! The protocol:
//!
//! - each hook run (each revision of it) makes its own directory under
//!   `spool_dir`, `<stem>` (the hook uses `<vcs>-<rev>-<pid>-<nanos>`), or
//!   `<stem>-2`, `<stem>-3`… when that is taken;
//! - [`META_FILE`] (`.dispatch-meta.json`, one JSON object: [`Meta`]) is
//!   written there first, as `.dispatch-meta.json.tmp` renamed into place, so
//!   the daemon never sees a package without its revision;
//! - each package is written as `.NAME.tmp`, synced, and renamed to `NAME`
//!   (the daemon's default `ignore` skips both dot names); two packages with
//!   the same base name in one run go to two directories, so nothing is
//!   overwritten;
//! - a directory that got no package (only its metadata) is removed by the
//!   hook;
//! - the daemon journals a spooled package with the revision of the
//!   [`META_FILE`] beside it, deletes the package once it is done on every
//!   host (spooled files are copies, whatever `after` says), and then the
//!   directory once only its metadata is left.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::journal::Source;

/// The file beside spooled packages that names their revision.
pub const META_FILE: &str = ".dispatch-meta.json";

/// What [`META_FILE`] holds: the revision the packages beside it come from.
///
/// Fields in alphabetical order: that is the order the file has always had.
/// When read, a missing field or one that is not a string is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default, deserialize_with = "text_or_empty")]
    pub author: String,
    #[serde(default, deserialize_with = "text_or_empty")]
    pub repo: String,
    #[serde(default, deserialize_with = "text_or_empty")]
    pub rev: String,
    #[serde(default, deserialize_with = "text_or_empty")]
    pub vcs: String,
}

fn text_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(v.as_str().unwrap_or("").to_string())
}

impl Meta {
    /// The journal's source for the packages of this revision.
    pub fn source(&self) -> Source {
        Source::Hook {
            vcs: self.vcs.clone(),
            repo: self.repo.clone(),
            rev: self.rev.clone(),
            author: self.author.clone(),
        }
    }

    /// Any JSON is metadata (a file that is not JSON is not); a value that
    /// is not an object names nothing.
    fn parse(text: &str) -> Option<Meta> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if !v.is_object() {
            return Some(Meta::default());
        }
        Some(Meta::deserialize(&v).unwrap_or_default())
    }
}

/// A spool file or directory operation that failed.
#[derive(Debug)]
pub struct SpoolError {
    pub path: PathBuf,
    pub op: &'static str,
    pub err: io::Error,
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: cannot {}: {}",
            self.path.display(),
            self.op,
            self.err
        )
    }
}

impl std::error::Error for SpoolError {}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |err| SpoolError {
        path: path.to_path_buf(),
        op,
        err,
    }
}

// ---------------------------------------------------------------- reading

/// The revision of a spooled file (from the [`META_FILE`] beside it), if any.
pub fn source_of(path: &Path) -> Option<Source> {
    let meta = path.parent()?.join(META_FILE);
    let text = fs::read_to_string(meta).ok()?;
    Meta::parse(&text).map(|m| m.source())
}

/// A spooled file is done on every host: delete it, then its run's
/// directory once only the metadata is left (never `spool` itself).
pub fn consume(path: &Path, spool: Option<&Path>) {
    if let Err(e) = fs::remove_file(path) {
        log::warn!("{}: cannot delete after dispatch: {e}", path.display());
    }
    if let Some(dir) = path.parent() {
        if holds_only_meta(dir) && Some(dir) != spool {
            remove_meta_dir(dir);
        }
    }
}

fn holds_only_meta(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().all(|e| e.file_name() == META_FILE))
        .unwrap_or(false)
}

fn remove_meta_dir(dir: &Path) {
    let _ = fs::remove_file(dir.join(META_FILE));
    let _ = fs::remove_dir(dir);
}

// ---------------------------------------------------------------- writing

/// Create a directory that did not exist: `base/stem`, else `base/stem-2`…
pub fn create_unique_dir(base: &Path, stem: &str) -> Result<PathBuf, SpoolError> {
    for n in 1u32.. {
        let dir = if n == 1 {
            base.join(stem)
        } else {
            base.join(format!("{stem}-{n}"))
        };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => return Err(io_err(&dir, "create directory")(e)),
        }
    }
    unreachable!("the loop returns")
}

/// Directories of one run under `base` that hold each base name once: the
/// spool's layout, also used for the hook's foreground extraction.
pub struct RunDirs<'a> {
    base: &'a Path,
    stem: String,
    dirs: Vec<(PathBuf, HashSet<OsString>)>,
}

impl<'a> RunDirs<'a> {
    pub fn new(base: &'a Path, stem: String) -> RunDirs<'a> {
        RunDirs {
            base,
            stem,
            dirs: Vec::new(),
        }
    }

    /// A directory where `name` is still free; `init` is called on each new
    /// one (a failed `init` removes it again).
    pub fn dir_for<E: From<SpoolError>>(
        &mut self,
        name: &OsStr,
        init: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E> {
        if let Some((d, names)) = self.dirs.iter_mut().find(|(_, n)| !n.contains(name)) {
            names.insert(name.to_os_string());
            return Ok(d.clone());
        }
        let d = create_unique_dir(self.base, &self.stem)?;
        if let Err(e) = init(&d) {
            let _ = fs::remove_dir_all(&d);
            return Err(e);
        }
        self.dirs
            .push((d.clone(), HashSet::from([name.to_os_string()])));
        Ok(d)
    }

    fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(d, _)| d.as_path())
    }
}

/// One revision handed over to the daemon: its directories under the spool.
pub struct Writer<'a> {
    dirs: RunDirs<'a>,
    meta: Meta,
}

impl<'a> Writer<'a> {
    /// Directories named `stem`… under `spool` (created when a file needs
    /// one), each with `meta` written first.
    pub fn new(spool: &'a Path, stem: String, meta: Meta) -> Writer<'a> {
        Writer {
            dirs: RunDirs::new(spool, stem),
            meta,
        }
    }

    /// Hand over the file `name`: `fill` writes its content to the path it
    /// is given (`.NAME.tmp`), which is then synced and renamed to `NAME`.
    /// Returns the final path; on failure the temporary file is removed.
    pub fn publish<E: From<SpoolError>>(
        &mut self,
        name: &OsStr,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, E> {
        let meta = &self.meta;
        let dir = self
            .dirs
            .dir_for(name, |d: &Path| write_meta(d, meta).map_err(E::from))?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let dest = dir.join(name);
        let res = fill(&tmp).and_then(|_| {
            File::open(&tmp)
                .and_then(|h| h.sync_all())
                .map_err(io_err(&tmp, "sync"))?;
            fs::rename(&tmp, &dest).map_err(|e| E::from(io_err(&dest, "rename into place")(e)))
        });
        match res {
            Ok(()) => Ok(dest),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Done with this revision: a directory that got no package holds only
    /// metadata; remove it.
    pub fn finish(self) {
        for d in self.dirs.dirs() {
            if holds_only_meta(d) {
                remove_meta_dir(d);
            }
        }
    }
}

/// [`META_FILE`] in `dir`, as a temporary file renamed into place.
fn write_meta(dir: &Path, meta: &Meta) -> Result<(), SpoolError> {
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let dest = dir.join(META_FILE);
    let text = serde_json::to_string(meta).map_err(|e| io_err(&tmp, "write")(e.into()))?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp, "write"))?;
    fs::rename(&tmp, &dest).map_err(io_err(&dest, "rename into place"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            author: "ann".into(),
            repo: "/srv/svn/r".into(),
            rev: "12".into(),
            vcs: "svn".into(),
        }
    }

    #[test]
    fn unique_dirs_get_a_suffix_when_taken() {
        let t = tempfile::tempdir().unwrap();
        let a = create_unique_dir(t.path(), "svn-r1-1-2").unwrap();
        let b = create_unique_dir(t.path(), "svn-r1-1-2").unwrap();
        assert_ne!(a, b);
        assert!(b.to_string_lossy().ends_with("-2"));
    }

    #[test]
    fn the_meta_file_is_one_json_object_with_sorted_keys() {
        let t = tempfile::tempdir().unwrap();
        write_meta(t.path(), &meta()).unwrap();
        let text = fs::read_to_string(t.path().join(META_FILE)).unwrap();
        assert_eq!(
            text,
            "{\"author\":\"ann\",\"repo\":\"/srv/svn/r\",\"rev\":\"12\",\"vcs\":\"svn\"}\n"
        );
        assert!(!t.path().join(format!("{META_FILE}.tmp")).exists());
    }

    #[test]
    fn a_written_package_reads_back_with_its_revision() {
        let t = tempfile::tempdir().unwrap();
        let mut w = Writer::new(t.path(), "svn-r12-1-2".into(), meta());
        let p = w
            .publish(OsStr::new("a.tgz"), |tmp: &Path| {
                assert!(tmp.file_name().unwrap() == ".a.tgz.tmp");
                fs::write(tmp, b"x").map_err(io_err(tmp, "write"))
            })
            .unwrap();
        w.finish();
        assert_eq!(fs::read(&p).unwrap(), b"x");
        assert_eq!(source_of(&p), Some(meta().source()));
    }

    #[test]
    fn two_files_of_one_name_go_to_two_directories() {
        let t = tempfile::tempdir().unwrap();
        let mut w = Writer::new(t.path(), "git-x".into(), meta());
        let fill = |tmp: &Path| fs::write(tmp, b"x").map_err(io_err(tmp, "write"));
        let a = w.publish(OsStr::new("a.tgz"), fill).unwrap();
        let b = w.publish(OsStr::new("a.tgz"), fill).unwrap();
        w.finish();
        assert_ne!(a.parent(), b.parent());
        assert!(a.parent().unwrap().join(META_FILE).exists());
        assert!(b.parent().unwrap().join(META_FILE).exists());
    }

    #[test]
    fn a_directory_whose_only_file_failed_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let mut w = Writer::new(t.path(), "git-x".into(), meta());
        let r = w.publish(OsStr::new("a.tgz"), |tmp: &Path| {
            fs::write(tmp, b"x").map_err(io_err(tmp, "write"))?;
            Err(io_err(tmp, "extract")(io::Error::other("boom")))
        });
        assert!(r.is_err());
        w.finish();
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
    }

    #[test]
    fn meta_fields_that_are_missing_or_not_text_read_as_empty() {
        let m = Meta::parse(r#"{"vcs":"git","rev":7,"extra":1}"#).unwrap();
        assert_eq!(
            m,
            Meta {
                vcs: "git".into(),
                ..Meta::default()
            }
        );
        assert_eq!(Meta::parse("[1]"), Some(Meta::default()));
        assert_eq!(Meta::parse("not json"), None);
    }

    #[test]
    fn consuming_the_last_package_removes_its_directory_but_not_the_spool() {
        let t = tempfile::tempdir().unwrap();
        let mut w = Writer::new(t.path(), "git-x".into(), meta());
        let fill = |tmp: &Path| fs::write(tmp, b"x").map_err(io_err(tmp, "write"));
        let a = w.publish(OsStr::new("a.tgz"), fill).unwrap();
        let b = w.publish(OsStr::new("b.tgz"), fill).unwrap();
        w.finish();
        consume(&a, Some(t.path()));
        assert!(a.parent().unwrap().exists());
        consume(&b, Some(t.path()));
        assert!(!b.parent().unwrap().exists());
        assert!(t.path().exists());
        // a package directly in the spool: the spool stays
        fs::write(t.path().join(META_FILE), b"{}").unwrap();
        fs::write(t.path().join("c.tgz"), b"x").unwrap();
        consume(&t.path().join("c.tgz"), Some(t.path()));
        assert!(t.path().join(META_FILE).exists());
    }
}
