//! `dispatch watch` as a real process on a temp drop dir, against real sshd:
//! only complete files, nothing lost across SIGKILL, nothing sent twice.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers::{self, SshServer, Workspace};

/// A running `dispatch watch`, killed by pid on drop.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(ws: &Workspace, cfg: &Path, drop: &Path) -> Daemon {
        let log = ws.path().join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let log = unique(log);
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dispatch"))
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

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: i32) {
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
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
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
    remote: PathBuf,
    cfg: PathBuf,
}

fn setup(extra_settings: &str) -> Setup {
    let ws = Workspace::new();
    let sshd = SshServer::start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&sshd]);
    let remote = ws.remote_dir("remote");
    let drop = ws.path().join("drop");
    fs::create_dir_all(&drop).unwrap();
    let cfg = ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n{extra_settings}\n{}[.]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/%Y%m%d_%H%M%S_%f\nconnect_timeout = 3s\nretries = 1\nretry_delay = 500ms\ninstall_command = sha256sum {{name}} > {{name}}.installed\n",
        ws.path().join("state").display(),
        if extra_settings.contains("settle") { "" } else { "settle = 1s\nrescan = 5s\n" },
        sshd.addr,
        sshd.port,
        servers::test_user().name,
        servers::keys().ed25519.display(),
        kh.display(),
        remote.display(),
    ));
    Setup {
        ws,
        _sshd: sshd,
        drop,
        remote,
        cfg,
    }
}

/// Every delivered copy of `name` (one per dated dir): its content.
fn copies(remote: &Path, name: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(remote) {
        for e in rd.flatten() {
            let p = e.path().join(name);
            if p.exists() {
                if let Ok(b) = fs::read(&p) {
                    out.push(b);
                }
            }
        }
    }
    out
}

/// Install markers written completely (sha256sum's line ends with "\n").
fn installed(remote: &Path, name: &str) -> usize {
    copies(remote, &format!("{name}.installed"))
        .iter()
        .filter(|m| m.ends_with(b"\n"))
        .count()
}

fn wait_installed(remote: &Path, name: &str, n: usize, limit: Duration) {
    servers::poll_until(limit, &format!("{name} installed {n}×"), || {
        (installed(remote, name) >= n).then_some(())
    });
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(b);
    h.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_slow_in_place_writer_is_uploaded_once_and_complete() {
    let s = setup("");
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
    wait_installed(&s.remote, "slow-1.bin", 1, Duration::from_secs(30));
    let got = copies(&s.remote, "slow-1.bin");
    assert_eq!(got.len(), 1, "uploaded exactly once");
    assert!(got[0] == data, "complete");
    let marker = String::from_utf8(copies(&s.remote, "slow-1.bin.installed").remove(0)).unwrap();
    assert!(
        marker.starts_with(&sha256_hex(&data)),
        "installed the complete file: {marker}"
    );
}

#[test]
fn a_file_renamed_in_is_dispatched_without_waiting_for_settle_and_ignored_names_are_not_touched() {
    let s = setup("settle = 30s\nrescan = 60s\n");
    let s_cfg = s.cfg.clone();
    let _d = Daemon::start(&s.ws, &s_cfg, &s.drop);
    // published the atomic way: written under an ignored name, then renamed
    let tmp = s.drop.join(".incoming.part");
    fs::write(&tmp, b"published").unwrap();
    let started = Instant::now();
    fs::rename(&tmp, s.drop.join("pub-1.tgz")).unwrap();
    wait_installed(&s.remote, "pub-1.tgz", 1, Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "settle is 30 s: {:?}",
        started.elapsed()
    );
    // written elsewhere, moved in
    let elsewhere = s.ws.path().join("elsewhere.tgz");
    fs::write(&elsewhere, b"moved").unwrap();
    fs::rename(&elsewhere, s.drop.join("moved-1.tgz")).unwrap();
    wait_installed(&s.remote, "moved-1.tgz", 1, Duration::from_secs(20));
    assert!(copies(&s.remote, ".incoming.part").is_empty());
    assert!(copies(&s.remote, "pub-1.tgz") == vec![b"published".to_vec()]);
}

#[test]
fn copies_new_directories_and_moved_in_directories_are_all_dispatched() {
    let s = setup("recursive = yes");
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
    wait_installed(&s.remote, "copied-1.bin", 1, Duration::from_secs(30));
    for i in 0..50 {
        wait_installed(
            &s.remote,
            &format!("dir-{i}.pkg"),
            1,
            Duration::from_secs(30),
        );
    }
    wait_installed(&s.remote, "mv-a.pkg", 1, Duration::from_secs(30));
    wait_installed(&s.remote, "mv-b.pkg", 1, Duration::from_secs(30));
    assert!(copies(&s.remote, "copied-1.bin") == vec![vec![3u8; 2_000_000]]);
}

#[test]
fn five_hundred_files_in_a_burst_are_all_delivered_and_installed() {
    let s = setup("");
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
            .filter(|i| installed(&s.remote, &format!("burst-{i}.pkg")) > 0)
            .count();
        (n == 500).then_some(())
    });
    for i in 0..500 {
        let c = copies(&s.remote, &format!("burst-{i}.pkg"));
        assert_eq!(
            c,
            vec![format!("burst {i}").into_bytes()],
            "burst-{i}.pkg sent once, intact"
        );
    }
}

#[test]
fn sigkill_mid_batch_then_restart_delivers_everything_once_complete() {
    let s = setup("");
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
            .any(|i| installed(&s.remote, &format!("crash-{i}.pkg")) > 0)
            .then_some(())
    });
    d.kill9();
    let done_before = (0..n)
        .filter(|i| installed(&s.remote, &format!("crash-{i}.pkg")) > 0)
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
                .filter(|i| installed(&s.remote, &format!("crash-{i}.pkg")) > 0)
                .count();
            (k == n && installed(&s.remote, "while-down.pkg") > 0).then_some(())
        },
    );
    for i in 0..n {
        for c in copies(&s.remote, &format!("crash-{i}.pkg")) {
            assert_eq!(
                c,
                vec![i as u8; 3_000_000],
                "crash-{i}.pkg: a partial file under its final name"
            );
        }
    }
    // nothing finished before the kill was sent again
    let twice = (0..n)
        .filter(|i| copies(&s.remote, &format!("crash-{i}.pkg")).len() > 1)
        .count();
    assert!(
        twice <= 8,
        "{twice} files re-sent; only those in flight at the kill may be"
    );
}

#[test]
fn unchanged_content_is_not_resent_and_new_content_is() {
    let s = setup("");
    let path = s.drop.join("same-1.pkg");
    fs::write(&path, b"version one").unwrap();
    let mut d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    wait_installed(&s.remote, "same-1.pkg", 1, Duration::from_secs(30));
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
    // new content under the same name: a new package
    fs::write(s.ws.path().join("v2"), b"version two").unwrap();
    fs::rename(s.ws.path().join("v2"), &path).unwrap();
    wait_installed(&s.remote, "same-1.pkg", 2, Duration::from_secs(30));
    let mut got = copies(&s.remote, "same-1.pkg");
    got.sort();
    assert_eq!(got, vec![b"version one".to_vec(), b"version two".to_vec()]);
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_and_sigterm_lets_the_upload_finish() {
    let s = setup("");
    let mut d = Daemon::start(&s.ws, &s.cfg, &s.drop);
    let good = fs::read_to_string(&s.cfg).unwrap();
    fs::write(&s.cfg, format!("{good}\n[broken(\nhost = x\n")).unwrap();
    d.signal(libc::SIGHUP);
    servers::poll_until(Duration::from_secs(20), "reload error logged", || {
        d.log().contains("keeping the old config").then_some(())
    });
    // still works with the old config
    fs::write(s.ws.path().join("x"), b"after hup").unwrap();
    fs::rename(s.ws.path().join("x"), s.drop.join("hup-1.pkg")).unwrap();
    wait_installed(&s.remote, "hup-1.pkg", 1, Duration::from_secs(30));
    // SIGTERM during a big upload: it completes, exit 0
    let big = vec![7u8; 300 * 1024 * 1024];
    fs::write(s.ws.path().join("big"), &big).unwrap();
    fs::rename(s.ws.path().join("big"), s.drop.join("big-1.bin")).unwrap();
    servers::poll_until(Duration::from_secs(30), "upload under way", || {
        fs::read_dir(&s.remote).ok()?.flatten().find_map(|e| {
            let p = e.path().join(".big-1.bin.part");
            p.exists().then_some(())
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
        installed(&s.remote, "big-1.bin"),
        1,
        "in-flight upload finished: {}",
        d.log()
    );
    assert!(copies(&s.remote, "big-1.bin")[0] == big);
}
