//! The local package file, opened once. Everything dispatch does with a
//! package — judging it, hashing it, sending it to every host — goes through
//! one open descriptor, so the file cannot be swapped after it was judged (a
//! symlink to `/etc/shadow` renamed over a dropped file is never read).
//!
//! Files from a drop directory are opened without following any symlink on
//! the way below the drop directory (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`; `O_NOFOLLOW` on the last component where the kernel
//! has no `openat2`). Files named by hand follow symlinks, as `cp` and `scp`
//! do: the operator chose them. Either way the descriptor must be a regular
//! file. Reads are positional (`pread`), so several hosts' uploads share one
//! descriptor without sharing a cursor.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::journal::{self, FileIdentity};

/// How to open a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Named by hand: symlinks are followed.
    Symlinks,
    /// From a drop directory `root`: no symlink anywhere below it.
    NoSymlinksBelow,
}

/// An opened regular file and what its descriptor said at open time.
#[derive(Debug)]
pub struct LocalFile {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub mtime_ns: i64,
    /// Permission bits (`0o644`…), kept on the hosts.
    pub mode: u32,
}

impl LocalFile {
    /// Open `path` (below `root` when `follow` is [`Follow::NoSymlinksBelow`])
    /// and check on the descriptor that it is a regular file.
    pub fn open(path: &Path, follow: Follow, root: Option<&Path>) -> io::Result<LocalFile> {
        let file = match (follow, root) {
            (Follow::Symlinks, _) => open_plain(path, 0)?,
            (Follow::NoSymlinksBelow, Some(root)) => match path.strip_prefix(root) {
                Ok(rel) if !rel.as_os_str().is_empty() => open_beneath(root, rel)?,
                _ => open_plain(path, libc::O_NOFOLLOW)?,
            },
            (Follow::NoSymlinksBelow, None) => open_plain(path, libc::O_NOFOLLOW)?,
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(LocalFile {
            path: path.to_path_buf(),
            size: meta.len(),
            mtime_ns: journal::mtime_ns(&meta),
            mode: meta.mode() & 0o7777,
            file,
        })
    }

    /// The identity the journal keeps: size and mtime from the descriptor,
    /// and (if `hash`) the sha256 of its content, read from the descriptor.
    /// If the content changes while it is hashed, it is hashed again (three
    /// tries), so size, mtime and hash describe the same bytes.
    pub fn identity(&mut self, hash: bool) -> io::Result<FileIdentity> {
        if !hash {
            return Ok(self.id(String::new()));
        }
        for _ in 0..3 {
            let before = self.file.metadata()?;
            let sha = self.sha256(before.len())?;
            let after = self.file.metadata()?;
            if after.len() == before.len()
                && journal::mtime_ns(&after) == journal::mtime_ns(&before)
            {
                self.size = after.len();
                self.mtime_ns = journal::mtime_ns(&after);
                return Ok(self.id(sha));
            }
        }
        Err(io::Error::other("kept changing while being hashed"))
    }

    fn id(&self, sha256: String) -> FileIdentity {
        FileIdentity {
            path: self.path.clone(),
            size: self.size,
            mtime_ns: self.mtime_ns,
            sha256,
        }
    }

    fn sha256(&self, len: u64) -> io::Result<String> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < len {
            match self.file.read_at(&mut buf, off) {
                Ok(0) => break,
                Ok(n) => {
                    let take = usize::try_from((len - off).min(n as u64)).unwrap_or(n);
                    h.update(&buf[..take]);
                    off += take as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(crate::transport::ssh::hex(&h.finalize()))
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `open(2)` read-only, non-blocking (a FIFO dropped in must not hang the
/// daemon), close-on-exec, plus `extra` flags.
fn open_plain(path: &Path, extra: i32) -> io::Result<File> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated string; the returned descriptor
    // is owned by the File.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | extra,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ELOOP) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link (not followed in a drop directory)",
            ));
        }
        return Err(e);
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `openat2(root, rel)` refusing every symlink and any escape from `root`.
fn open_beneath(root: &Path, rel: &Path) -> io::Result<File> {
    let dir = open_plain(root, libc::O_DIRECTORY)?;
    let c = cstr(rel)?;
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    use std::os::fd::AsRawFd;
    // SAFETY: valid descriptor, NUL-terminated path and a properly sized
    // open_how, as openat2(2) requires.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) => open_plain(&root.join(rel), libc::O_NOFOLLOW),
            Some(libc::ELOOP) | Some(libc::EXDEV) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a symbolic link is on its path (not followed in a drop directory)",
            )),
            _ => Err(e),
        };
    }
    let fd =
        i32::try_from(fd).map_err(|_| io::Error::other("openat2 returned a bad descriptor"))?;
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_in_a_drop_dir_is_refused_and_by_hand_it_is_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("secret");
        std::fs::write(&target, b"s3cret").unwrap();
        let drop = d.path().join("drop");
        std::fs::create_dir(&drop).unwrap();
        let link = drop.join("app.tgz");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = LocalFile::open(&link, Follow::NoSymlinksBelow, Some(&drop)).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // a symlinked directory below the root is refused too
        let sub = drop.join("sub");
        std::os::unix::fs::symlink(d.path(), &sub).unwrap();
        let e =
            LocalFile::open(&sub.join("secret"), Follow::NoSymlinksBelow, Some(&drop)).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let f = LocalFile::open(&link, Follow::Symlinks, None).unwrap();
        assert_eq!(f.size, 6);
    }

    #[test]
    fn the_descriptor_keeps_the_judged_file_after_a_swap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("app.tgz");
        std::fs::write(&p, b"harmless").unwrap();
        let mut f = LocalFile::open(&p, Follow::NoSymlinksBelow, Some(d.path())).unwrap();
        // swapped after it was judged: the descriptor still reads the judged bytes
        let other = d.path().join("other");
        std::fs::write(&other, b"something else entirely").unwrap();
        std::fs::rename(&other, &p).unwrap();
        let id = f.identity(true).unwrap();
        assert_eq!(id.size, 8);
        let mut buf = vec![0u8; 8];
        f.file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"harmless");
        assert_eq!(
            id.sha256,
            crate::transport::ssh::hex(&Sha256::digest(b"harmless"))
        );
    }

    #[test]
    fn a_fifo_or_directory_is_not_a_regular_file_and_does_not_block() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = LocalFile::open(&fifo, Follow::NoSymlinksBelow, Some(d.path())).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = LocalFile::open(d.path(), Follow::Symlinks, None).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
