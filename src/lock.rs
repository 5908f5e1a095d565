//! The per-name install lock on a target host: while one dispatch publishes
//! a file and runs its install, no other dispatch (another lane, another
//! `dispatch` run, another machine) renames a file of the same name into
//! the same directory. Without it, two senders of one name could each report
//! "installed" while one of them installed the other's bytes.
//!
//! The lock is `.dispatch-lock-<hash of the name>` in the dest dir, made
//! only if nothing is there — over SFTP a symlink whose target is the owner
//! record (one round trip; a file created `O_CREAT|O_EXCL` where the server
//! refuses symlinks), `set -C` on hosts without SFTP — and naming its owner:
//! `dispatch TOKEN pid PID on HOST since TIME`. It is removed once the
//! install has run, without reading it back when it was held for less than
//! [`wait_limit`] (nobody breaks it sooner). A lock is broken when its holder
//! is known to be gone: a process of this dispatching machine that no longer
//! runs, or a lock this process lost with its connection; otherwise when it
//! has been held unchanged for [`wait_limit`] — by then the holder's install
//! was killed at its `install_timeout` on the host.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Route;
use crate::route::{remote_join, shell_quote};
use crate::transport::ssh::SshSession;
use crate::transport::{ErrorKind, Op, Protocol, TransferError};

/// A lock taken on a host.
#[derive(Debug, Clone)]
pub struct Lock {
    pub path: String,
    owner: String,
    /// When it was taken, and how long nobody else breaks it (see
    /// [`wait_limit`]): released within that, it is certainly still ours.
    taken: Instant,
    safe_for: Duration,
}

impl Lock {
    fn new(path: String, owner: String, route: &Route) -> Lock {
        Lock {
            path,
            owner,
            taken: Instant::now(),
            safe_for: wait_limit(route),
        }
    }
}

/// Locks this process could not remove (their connection was lost): any of
/// its lanes may break them at once.
static LOST: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// `.dispatch-lock-<hash of the name>`: short, whatever the package's name.
pub fn lock_name(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(name.as_bytes());
    format!(".dispatch-lock-{}", crate::transport::ssh::hex(&h[..8]))
}

/// How long a lock held by someone else is waited for before it is taken as
/// left behind by a dispatcher that died.
pub fn wait_limit(route: &Route) -> Duration {
    route.install_timeout + route.io_timeout + Duration::from_secs(30)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// A fresh owner record: this process's random token and a counter (every
/// acquisition is distinct), its pid and host, the time.
fn new_owner() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let token = TOKEN.get_or_init(crate::transport::random_hex);
    format!(
        "dispatch {token}-{} pid {} on {} since {}\n",
        N.fetch_add(1, Ordering::Relaxed),
        std::process::id(),
        hostname(),
        chrono::Local::now().to_rfc3339()
    )
}

/// Is the holder certainly gone? A lock this process lost, or one held by a
/// process of this machine that no longer exists.
fn holder_is_gone(holder: &str) -> bool {
    if LOST
        .lock()
        .is_ok_and(|l| l.iter().any(|o| o.trim() == holder.trim()))
    {
        return true;
    }
    let mut words = holder.split_whitespace();
    let (Some("dispatch"), Some(_), Some("pid"), Some(pid), Some("on"), Some(host)) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if host != hostname() || pid == std::process::id() as i32 || pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Take the lock for `name` in `dir`, waiting while another dispatch holds it.
pub fn take(
    ssh: &mut SshSession,
    route: &Route,
    dir: &str,
    name: &str,
) -> Result<Lock, TransferError> {
    let path = remote_join(dir, &lock_name(name));
    let owner = new_owner();
    if !ssh.has_sftp()? {
        let script = shell_take(&path, &owner, wait_limit(route));
        let out = ssh.run_script(&script, wait_limit(route) + route.io_timeout, None)?;
        if !out.success() {
            return Err(ssh
                .target()
                .err(ErrorKind::Remote, Protocol::Ssh, Op::Lock)
                .step(format!("cannot take the install lock {path}"))
                .cause(out.output.trim())
                .path(path)
                .bare());
        }
        return Ok(Lock::new(path, owner, route));
    }
    let mut seen: Option<(String, Instant)> = None;
    let mut pause = Duration::from_millis(20);
    loop {
        // a symlink to the owner record: taken in one round trip
        if ssh.sftp_symlink_excl(&path, owner.trim())? {
            return Ok(Lock::new(path, owner, route));
        }
        let Some(holder) = ssh.sftp_lock_holder(&path)? else {
            continue; // released meanwhile
        };
        let since = match &seen {
            Some((h, t)) if *h == holder => *t,
            _ => {
                log::info!(
                    "{name}: {}: waiting for another dispatch to finish installing it ({})",
                    ssh.target().host,
                    holder.trim()
                );
                seen = Some((holder.clone(), Instant::now()));
                Instant::now()
            }
        };
        if holder_is_gone(&holder) || since.elapsed() > wait_limit(route) {
            log::warn!(
                "{name}: {}: breaking the install lock {path} held by {} (its holder is gone)",
                ssh.target().host,
                holder.trim()
            );
            ssh.sftp_unlink(&path)?;
            continue;
        }
        if crate::interrupt::requested() {
            return Err(ssh
                .target()
                .err(ErrorKind::Interrupted, Protocol::Ssh, Op::Lock)
                .step("interrupted while waiting for the install lock")
                .path(path)
                .bare());
        }
        std::thread::sleep(pause); // lock poll step
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Remove the lock; if the session is gone, remember it as lost (this
/// process's lanes break it at once; others after [`wait_limit`]).
pub fn release(ssh: Option<&mut SshSession>, lock: &Lock) {
    let r = match ssh.filter(|s| s.is_alive()) {
        None => Err(TransferError::new(
            ErrorKind::Connect,
            Op::Lock,
            "connection lost",
        )),
        Some(ssh) => {
            if ssh.has_sftp().unwrap_or(false) && lock.taken.elapsed() < lock.safe_for {
                // nobody breaks a lock held for less than wait_limit: ours
                ssh.sftp_unlink(&lock.path)
            } else if ssh.has_sftp().unwrap_or(false) {
                // only our own: a lock broken as stale and taken by another
                // dispatch is not removed by its old holder
                match ssh.sftp_lock_holder(&lock.path) {
                    Ok(Some(holder)) if holder.trim() != lock.owner.trim() => {
                        log::warn!(
                            "the install lock {} was taken over by {} while this install ran",
                            lock.path,
                            holder.trim()
                        );
                        Ok(())
                    }
                    Ok(_) => ssh.sftp_unlink(&lock.path),
                    Err(e) => Err(e),
                }
            } else {
                let io = ssh.target().io_timeout;
                let cmd = format!("rm -f -- {}", shell_quote(&lock.path));
                ssh.run_script(&cmd, io, None).map(|_| ())
            }
        }
    };
    if let Err(e) = r {
        log::warn!("cannot remove the install lock {}: {e}", lock.path);
        if let Ok(mut l) = LOST.lock() {
            l.push(lock.owner.clone());
        }
    }
}

/// A lock whose connection was lost (whether or not it was made): this
/// process's lanes may break it at once.
pub fn lost(lock: &Lock) {
    if let Ok(mut l) = LOST.lock() {
        l.push(lock.owner.clone());
    }
}

/// Shell: take `lock` with `set -C` (create-exclusive), waiting up to `wait`
/// for its holder, then breaking it (hosts without SFTP).
pub fn shell_take(lock: &str, owner: &str, wait: Duration) -> String {
    let l = shell_quote(lock);
    let owner = shell_quote(owner.trim());
    let w = wait.as_secs().max(1);
    format!(
        "n=0; until ( set -C; printf '%s\\n' {owner} > {l} ) 2>/dev/null; do \
         n=$((n + 1)); if [ \"$n\" -gt {w} ]; then echo \"breaking a stale install lock: $(cat {l} 2>/dev/null)\"; rm -f -- {l}; n=0; fi; \
         sleep 1; done; "
    )
}

/// The shell fragment and the lock it takes, for the no-SFTP publish script.
/// A lock for a pipelined publish ([`crate::transport::ssh::stream`]): its
/// path and the owner record its symlink is to point to. Counted as held
/// from now (earlier than the symlink is made: on the safe side).
pub fn unmade(route: &Route, dir: &str, name: &str) -> Lock {
    let path = remote_join(dir, &lock_name(name));
    Lock::new(path, new_owner(), route)
}

impl Lock {
    /// The symlink's target: the owner record.
    pub fn owner(&self) -> &str {
        self.owner.trim()
    }

    /// Held for less than [`wait_limit`]: nobody else may have broken it,
    /// so it can be removed without reading it back.
    pub fn surely_ours(&self) -> bool {
        self.taken.elapsed() < self.safe_for
    }
}

pub fn shell_lock(route: &Route, dir: &str, name: &str) -> (String, Lock) {
    let path = remote_join(dir, &lock_name(name));
    let owner = new_owner();
    let script = shell_take(&path, &owner, wait_limit(route));
    (script, Lock::new(path, owner, route))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_short_and_distinct() {
        let l = lock_name(&"n".repeat(255));
        assert!(l.len() < 40 && l.is_ascii(), "{l}");
        assert_ne!(lock_name("c\nd.bin"), lock_name("c_d.bin"));
    }

    #[test]
    fn a_holder_is_gone_only_when_it_is_known_to_be() {
        let me = new_owner();
        assert_ne!(me, new_owner(), "every acquisition is distinct");
        assert!(!holder_is_gone(&me), "this process is alive");
        // a process of this machine that has exited
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let mut child = child;
        child.wait().unwrap();
        let dead = format!("dispatch x-0 pid {pid} on {} since now", hostname());
        assert!(holder_is_gone(&dead));
        // another machine's: not known, so not gone
        let other = format!("dispatch x-0 pid {pid} on elsewhere.example since now");
        assert!(!holder_is_gone(&other));
        assert!(!holder_is_gone("garbage"));
        LOST.lock().unwrap().push(other.clone());
        assert!(holder_is_gone(&other), "a lock this process lost");
    }

    #[test]
    fn the_shell_lock_is_exclusive_and_a_stale_one_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(".dispatch-lock-x");
        let l = lock.to_str().unwrap();
        let run = |script: String| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .output()
                .unwrap()
        };
        let take = |w: u64| shell_take(l, &new_owner(), Duration::from_secs(w));
        let out = run(format!("{}echo got", take(5)));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "got");
        assert!(lock.exists());
        // held: a second taker waits, then breaks it after its wait
        let started = Instant::now();
        let out = run(format!("{}echo second", take(1)));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("breaking a stale install lock: dispatch "),
            "{text}"
        );
        assert!(text.trim_end().ends_with("second"), "{text}");
        assert!(started.elapsed() >= Duration::from_secs(1));
    }
}
