//! `dispatch watch` as a real process on a temp drop dir, against real sshd:
//! only complete files, nothing lost across SIGKILL, nothing sent twice.
//!
//! Every scenario runs twice ([`crate::scenario!`]): with an absolute
//! `dest_dir` on a host sharing the test user, and with the default
//! `dest_dir` on a host with a user of its own, at least 3 files per batch.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::scenario;
use crate::servers::{self, copies, installed, wait_installed, Placement, SshServer, Workspace};

/// A running `dispatch watch`, killed by pid on drop.
pub(crate) struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub(crate) fn start(ws: &Workspace, cfg: &Path, drop: &Path) -> Daemon {
        Daemon::start_with_nofile(ws, cfg, drop, None)
    }

    /// Started with its limit on open files (soft and hard) at `nofile`.
    fn start_with_nofile(ws: &Workspace, cfg: &Path, drop: &Path, nofile: Option<u64>) -> Daemon {
        let log = ws.path().join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let log = unique(log);
        let out = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dispatch"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit between fork and exec
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["-c", cfg.to_str().unwrap(), "-vv", "watch"])
            .arg(drop)
            .env("HOME", ws.path())
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let d = Daemon {
            child: Some(child),
            log,
        };
        servers::poll_until(Duration::from_secs(20), "daemon to start watching", || {
            d.log().contains("watching").then_some(())
        });
        d
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub(crate) fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait for exit (bounded) and return the exit code.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let c = self.child.as_mut().unwrap();
        let status = servers::poll_until(limit, "daemon to exit", || c.try_wait().unwrap());
        self.child = None;
        status.code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- daemon log -----\n{}\n-----", self.log());
        }
        self.kill9();
    }
}

fn unique(p: PathBuf) -> PathBuf {
    let mut n = 0;
    let mut q = p.clone();
    while q.exists() {
        n += 1;
        q = p.with_extension(format!("{n}.log"));
    }
    q
}

struct Setup {
    ws: Workspace,
    _sshd: SshServer,
    drop: PathBuf,
    /// Where the host keeps its dated dirs: `<ws>/remote`, or `<its user's
    /// home>/newcx` under the default dest_dir.
    root: PathBuf,
    cfg: PathBuf,
}

fn setup(p: Placement, extra_settings: &str) -> Setup {
    let ws = Workspace::new();
    let sshd = p.start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&sshd]);
    let remote = ws.remote_dir("remote");
    let drop = ws.path().join("drop");
    fs::create_dir_all(&drop).unwrap();
    let cfg = ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n{extra_settings}\n{}[.]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n{}connect_timeout = 3s\nretries = 1\nretry_delay = 500ms\ninstall_command = sha256sum {{name}} > {{name}}.installed\n",
        ws.path().join("state").display(),
        if extra_settings.contains("settle") { "" } else { "settle = 1s\nrescan = 5s\n" },
        sshd.addr,
        sshd.port,
        sshd.user().name,
        servers::keys().ed25519.display(),
        kh.display(),
        p.dest_dir_line(format!("{}/%Y%m%d_%H%M%S_%f", remote.display())),
    ));
    Setup {
        ws,
        root: p.root(&sshd, &remote),
        _sshd: sshd,
        drop,
        cfg,
    }
}

/// The dated dirs holding a copy of `name`.
fn copy_dirs(remote: &Path, name: &str) -> Vec<PathBuf> {
    servers::delivered_copies(remote, name)
        .into_iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(b);
    h.iter().map(|x| format!("{x:02x}")).collect()
}

scenario! {
    fn a_slow_in_place_writer_is_uploaded_once_and_complete(p: Placement) {
        let s = setup(p, "");
        let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
        let data: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
        let path = s.drop.join("slow-1.bin");
        let mut f = fs::File::create(&path).unwrap();
        // 10 chunks over ~3 s, one open file; pauses longer than... no: shorter than settle
        let chunks: Vec<&[u8]> = data.chunks(data.len() / 10).collect();
        let started = Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            f.write_all(c).unwrap();
            f.flush().unwrap();
            // bounded wait for wall-clock pacing (the writer's speed is the subject here)
            let due = started + Duration::from_millis(300 * (i as u64 + 1));
            servers::poll_until(Duration::from_secs(5), "pacing", || {
                (Instant::now() >= due).then_some(())
            });
        }
        drop(f);
        // two more, written in place as the slow one ends: they settle with it
        for k in 2..=3 {
            fs::write(s.drop.join(format!("slow-{k}.bin")), format!("companion {k}")).unwrap();
        }
        wait_installed(&s.root, "slow-1.bin", 1, Duration::from_secs(30));
        for k in 2..=3 {
            let name = format!("slow-{k}.bin");
            wait_installed(&s.root, &name, 1, Duration::from_secs(30));
            assert_eq!(copies(&s.root, &name), vec![format!("companion {k}").into_bytes()]);
        }
        let got = copies(&s.root, "slow-1.bin");
        assert_eq!(got.len(), 1, "uploaded exactly once");
        assert!(got[0] == data, "complete");
        let marker = String::from_utf8(copies(&s.root, "slow-1.bin.installed").remove(0)).unwrap();
        assert!(
            marker.starts_with(&sha256_hex(&data)),
            "installed the complete file: {marker}"
        );
    }
}

scenario! {
    fn a_file_renamed_in_is_dispatched_without_waiting_for_settle_and_ignored_names_are_not_touched(p: Placement) {
        let s = setup(p, "settle = 30s\nrescan = 60s\n");
        let s_cfg = s.cfg.clone();
        let _d = Daemon::start(&s.ws, &s_cfg, &s.drop);
        // published the atomic way: written under an ignored name, then renamed
        let started = Instant::now();
        for k in 1..=3 {
            let tmp = s.drop.join(format!(".incoming-{k}.part"));
            fs::write(&tmp, format!("published {k}")).unwrap();
            fs::rename(&tmp, s.drop.join(format!("pub-{k}.tgz"))).unwrap();
        }
        for k in 1..=3 {
            wait_installed(&s.root, &format!("pub-{k}.tgz"), 1, Duration::from_secs(20));
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "settle is 30 s: {:?}",
            started.elapsed()
        );
        // written elsewhere, moved in
        let elsewhere = s.ws.path().join("elsewhere.tgz");
        fs::write(&elsewhere, b"moved").unwrap();
        fs::rename(&elsewhere, s.drop.join("moved-1.tgz")).unwrap();
        wait_installed(&s.root, "moved-1.tgz", 1, Duration::from_secs(20));
        for k in 1..=3 {
            assert!(copies(&s.root, &format!(".incoming-{k}.part")).is_empty());
            assert_eq!(
                copies(&s.root, &format!("pub-{k}.tgz")),
                vec![format!("published {k}").into_bytes()]
            );
        }
    }
}

scenario! {
    fn copies_new_directories_and_moved_in_directories_are_all_dispatched(p: Placement) {
        let s = setup(p, "recursive = yes");
        let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
        // cp into the dir
        let src = s.ws.file("copied-1.bin", &vec![3u8; 2_000_000]);
        assert!(Command::new("cp")
            .arg(&src)
            .arg(&s.drop)
            .status()
            .unwrap()
            .success());
        // a directory created with 50 files at once
        let d = s.drop.join("burst");
        fs::create_dir(&d).unwrap();
        for i in 0..50 {
            fs::write(d.join(format!("dir-{i}.pkg")), format!("file {i}")).unwrap();
        }
        // a directory prepared elsewhere and moved in
        let prepared = s.ws.path().join("prepared");
        fs::create_dir(&prepared).unwrap();
        fs::write(prepared.join("mv-a.pkg"), b"a").unwrap();
        fs::write(prepared.join("mv-b.pkg"), b"b").unwrap();
        fs::rename(&prepared, s.drop.join("prepared")).unwrap();
        wait_installed(&s.root, "copied-1.bin", 1, Duration::from_secs(30));
        for i in 0..50 {
            wait_installed(
                &s.root,
                &format!("dir-{i}.pkg"),
                1,
                Duration::from_secs(30),
            );
        }
        wait_installed(&s.root, "mv-a.pkg", 1, Duration::from_secs(30));
        wait_installed(&s.root, "mv-b.pkg", 1, Duration::from_secs(30));
        assert!(copies(&s.root, "copied-1.bin") == vec![vec![3u8; 2_000_000]]);
    }
}

scenario! {
    fn five_hundred_files_in_a_burst_are_all_delivered_and_installed(p: Placement) {
        let s = setup(p, "");
        let _d = Daemon::start(&s.ws, &s.cfg, &s.drop);
        let stage = s.ws.path().join("stage");
        fs::create_dir(&stage).unwrap();
        for i in 0..500 {
            fs::write(stage.join(format!("burst-{i}.pkg")), format!("burst {i}")).unwrap();
        }
        for i in 0..500 {
            fs::rename(
                stage.join(format!("burst-{i}.pkg")),
                s.drop.join(format!("burst-{i}.pkg")),
            )
            .unwrap();
        }
        servers::poll_until(Duration::from_secs(90), "500 installs", || {
            let n = (0..500)
                .filter(|i| installed(&s.root, &format!("burst-{i}.pkg")) > 0)
                .count();
            (n == 500).then_some(())
        });
        for i in 0..500 {
            let c = copies(&s.root, &format!("burst-{i}.pkg"));
            assert_eq!(
                c,
                vec![format!("burst {i}").into_bytes()],
                "burst-{i}.pkg sent once, intact"
            );
        }
    }
}

scenario! {
    /// A package keeps its descriptor open from judging to its last host:
    /// with more files in the drop dir than the daemon may have open (here
    /// a limit of 300 descriptors and 450 files), the rest wait their turn
    /// instead of failing with "Too many open files".
    fn more_files_than_open_descriptors_are_all_delivered_in_turn(p: Placement) {
        let s = setup(p, "");
        for i in 0..450 {
            fs::write(s.drop.join(format!("many-{i}.pkg")), format!("many {i}")).unwrap();
        }
        let d = Daemon::start_with_nofile(&s.ws, &s.cfg, &s.drop, Some(300));
        servers::poll_until(Duration::from_secs(120), "450 installs", || {
            let n = (0..450)
                .filter(|i| installed(&s.root, &format!("many-{i}.pkg")) > 0)
                .count();
            (n == 450).then_some(())
        });
        for i in 0..450 {
            let c = copies(&s.root, &format!("many-{i}.pkg"));
            assert_eq!(c, vec![format!("many {i}").into_bytes()], "many-{i}.pkg once, intact");
        }
        let log = d.log();
        assert!(log.contains("further files wait their turn"), "{log}");
        assert!(!log.contains("Too many open files"), "{log}");
    }
}

scenario! {
    fn sigkill_mid_batch_then_restart_delivers_everything_once_complete(p: Placement) {
        let s = setup(p, "");
        let mut d = Daemon::start(&s.ws, &s.cfg, &s.drop);
        let stage = s.ws.path().join("stage");
        fs::create_dir(&stage).unwrap();
        let n = 40;
        for i in 0..n {
            fs::write(
                stage.join(format!("crash-{i}.pkg")),
                vec![i as u8; 3_000_000],
            )
            .unwrap();
        }
        for i in 0..n {
            fs::rename(
                stage.join(format!("crash-{i}.pkg")),
                s.drop.join(format!("crash-{i}.pkg")),
            )
            .unwrap();
        }
        // kill it while the batch is under way
        servers::poll_until(Duration::from_secs(30), "first installs", || {
            (0..n)
                .any(|i| installed(&s.root, &format!("crash-{i}.pkg")) > 0)
                .then_some(())
        });
        d.kill9();
        let done_before = (0..n)
            .filter(|i| installed(&s.root, &format!("crash-{i}.pkg")) > 0)
            .count();
        assert!(
            done_before < n,
            "the kill came too late to test anything ({done_before}/{n})"
        );
        // files dropped while the daemon is down are picked up too
        fs::write(s.drop.join("while-down.pkg"), b"arrived while down").unwrap();
        let _d2 = Daemon::start(&s.ws, &s.cfg, &s.drop);
        servers::poll_until(
            Duration::from_secs(90),
            "all installs after restart",
            || {
                let k = (0..n)
                    .filter(|i| installed(&s.root, &format!("crash-{i}.pkg")) > 0)
                    .count();
                (k == n && installed(&s.root, "while-down.pkg") > 0).then_some(())
            },
        );
        for i in 0..n {
            for c in copies(&s.root, &format!("crash-{i}.pkg")) {
                assert_eq!(
                    c,
                    vec![i as u8; 3_000_000],
                    "crash-{i}.pkg: a partial file under its final name"
                );
            }
        }
        // nothing finished before the kill was sent again
        let twice = (0..n)
            .filter(|i| copies(&s.root, &format!("crash-{i}.pkg")).len() > 1)
            .count();
        assert!(
            twice <= 8,
            "{twice} files re-sent; only those in flight at the kill may be"
        );
    }
}

scenario! {
    fn unchanged_content_is_not_resent_and_new_content_is(p: Placement) {
        let s = setup(p, "");
        let path = s.drop.join("same-1.pkg");
        fs::write(&path, b"version one").unwrap();
        for k in 2..=3 {
            fs::write(s.drop.join(format!("same-{k}.pkg")), format!("companion {k}")).unwrap();
        }
        let mut d = Daemon::start(&s.ws, &s.cfg, &s.drop);
        for k in 1..=3 {
            wait_installed(&s.root, &format!("same-{k}.pkg"), 1, Duration::from_secs(30));
        }
        // touched, same content: not re-sent, even across a restart
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::now()).unwrap();
        drop(f);
        d.signal(libc::SIGTERM);
        assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0));
        let d2 = Daemon::start(&s.ws, &s.cfg, &s.drop);
        servers::poll_until(
            Duration::from_secs(30),
            "touched file judged unchanged",
            || d2.log().contains("content unchanged").then_some(()),
        );
        // new content under the same name: a new package, in a new dated dir
        // (the default one has seconds: wait until the first one's second is over)
        let first_dir = fs::metadata(copy_dirs(&s.root, "same-1.pkg").remove(0)).unwrap();
        let first_second = first_dir
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        servers::poll_until(Duration::from_secs(3), "the next second", || {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            (now.ok()?.as_secs() > first_second).then_some(())
        });
        fs::write(s.ws.path().join("v2"), b"version two").unwrap();
        fs::rename(s.ws.path().join("v2"), &path).unwrap();
        wait_installed(&s.root, "same-1.pkg", 2, Duration::from_secs(30));
        let mut got = copies(&s.root, "same-1.pkg");
        got.sort();
        assert_eq!(got, vec![b"version one".to_vec(), b"version two".to_vec()]);
        for k in 2..=3 {
            assert_eq!(
                copies(&s.root, &format!("same-{k}.pkg")).len(),
                1,
                "same-{k}.pkg unchanged, sent once"
            );
        }
    }
}

scenario! {
    fn sighup_with_a_broken_config_keeps_the_old_one_and_sigterm_lets_the_upload_finish(p: Placement) {
        let s = setup(p, "");
        let mut d = Daemon::start(&s.ws, &s.cfg, &s.drop);
        let good = fs::read_to_string(&s.cfg).unwrap();
        fs::write(&s.cfg, format!("{good}\n[broken(\nhost = x\n")).unwrap();
        d.signal(libc::SIGHUP);
        servers::poll_until(Duration::from_secs(20), "reload error logged", || {
            d.log().contains("keeping the old config").then_some(())
        });
        // still works with the old config
        for k in 1..=3 {
            let x = s.ws.path().join(format!("x{k}"));
            fs::write(&x, format!("after hup {k}")).unwrap();
            fs::rename(&x, s.drop.join(format!("hup-{k}.pkg"))).unwrap();
        }
        for k in 1..=3 {
            wait_installed(&s.root, &format!("hup-{k}.pkg"), 1, Duration::from_secs(30));
        }
        // SIGTERM during a big upload: it completes, exit 0
        let big = vec![7u8; 300 * 1024 * 1024];
        fs::write(s.ws.path().join("big"), &big).unwrap();
        fs::rename(s.ws.path().join("big"), s.drop.join("big-1.bin")).unwrap();
        servers::poll_until(Duration::from_secs(30), "upload under way", || {
            fs::read_dir(&s.root).ok()?.flatten().find_map(|e| {
                let temps = fs::read_dir(e.path()).ok()?.flatten().any(|f| {
                    let n = f.file_name().to_string_lossy().into_owned();
                    n.starts_with(".dispatch-") && n.ends_with(".part")
                });
                temps.then_some(())
            })
        });
        d.signal(libc::SIGTERM);
        assert_eq!(
            d.wait_exit(Duration::from_secs(120)),
            Some(0),
            "{}",
            d.log()
        );
        assert_eq!(
            installed(&s.root, "big-1.bin"),
            1,
            "in-flight upload finished: {}",
            d.log()
        );
        assert!(copies(&s.root, "big-1.bin")[0] == big);
    }
}
