//! The journal cannot vanish silently, and a relative drop directory is
//! watched by its events: `dispatch watch` as a real process against sshd.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::servers::{
    self, copies, installed, wait_installed, DispatchChild, SshServer, Workspace,
};

struct Setup {
    ws: Workspace,
    _sshd: SshServer,
    drop: PathBuf,
    remote: PathBuf,
    state: PathBuf,
}

/// A workspace with `drop/`, a remote dir and `dispatch.ini` (one route for
/// everything, installing with `sha256sum` plus `extra_install`).
fn setup(settings: &str, state: &Path, extra_install: &str) -> Setup {
    let ws = Workspace::new();
    let sshd = SshServer::start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&sshd]);
    let remote = ws.remote_dir("remote");
    let drop = ws.path().join("drop");
    fs::create_dir_all(&drop).unwrap();
    let state = ws.path().join(state);
    ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n{settings}\n[.]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/%Y%m%d_%H%M%S_%f\nconnect_timeout = 3s\nretries = 1\nretry_delay = 500ms\ninstall_command = sha256sum {{name}} > {{name}}.installed{extra_install}\n",
        state.display(),
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
        state,
    }
}

/// `dispatch -vv watch ARGS…` in the workspace (its cwd), once it watches.
fn watch(s: &Setup, args: &[&str]) -> DispatchChild {
    let d = s.ws.dispatch().args(["-vv", "watch"]).args(args).spawn();
    d.wait_for_output("watching", Duration::from_secs(20));
    d
}

/// Publish `name` the atomic way: written elsewhere, renamed in.
fn publish(s: &Setup, name: &str, content: &[u8]) {
    let tmp = s.ws.path().join(format!("stage-{name}"));
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, s.drop.join(name)).unwrap();
}

#[test]
fn a_journal_truncated_to_nothing_is_refused_at_start_with_its_path_and_what_to_do() {
    let s = setup("settle = 1s\nrescan = 5s", Path::new("state"), "");
    fs::create_dir_all(&s.state).unwrap();
    let journal = s.state.join("journal.sqlite");
    fs::write(&journal, b"").unwrap();
    fs::write(s.drop.join("old-1.pkg"), b"sent long ago").unwrap();
    let r =
        s.ws.dispatch()
            .args(["watch", "drop"])
            .timeout(Duration::from_secs(20))
            .run()
            .assert_code(1);
    let err = r.stderr.clone();
    assert!(err.contains(&journal.display().to_string()), "{r}");
    assert!(err.contains("empty"), "{r}");
    assert!(err.contains("move it aside"), "{r}");
    assert_eq!(fs::metadata(&journal).unwrap().len(), 0, "left as it was");
    assert_eq!(installed(&s.remote, "old-1.pkg"), 0, "nothing sent");
    // a brand-new state dir still gets a fresh journal
    fs::remove_dir_all(&s.state).unwrap();
    let d = watch(&s, &["drop"]);
    wait_installed(&s.remote, "old-1.pkg", 1, Duration::from_secs(30));
    assert!(journal.exists());
    drop(d);
}

#[test]
fn a_journal_deleted_under_the_running_daemon_stops_it_and_nothing_is_sent_twice() {
    let s = setup("settle = 1s\nrescan = 1h", Path::new("state"), "");
    let d = watch(&s, &["drop"]);
    publish(&s, "first-1.pkg", b"first");
    wait_installed(&s.remote, "first-1.pkg", 1, Duration::from_secs(30));
    let journal = s.state.join("journal.sqlite");
    fs::remove_file(&journal).unwrap();
    let r = d.wait(Duration::from_secs(20)).assert_code(1);
    let err = r.stderr.clone();
    assert!(err.contains(&journal.display().to_string()), "{r}");
    assert!(err.contains("deleted while in use"), "{r}");
    assert!(err.contains("ERROR"), "an error line is logged: {r}");
    assert!(err.contains("written back"), "{r}");
    // the record is back: a restart does not send the first file again
    publish(&s, "second-1.pkg", b"second");
    let d = watch(&s, &["drop"]);
    wait_installed(&s.remote, "second-1.pkg", 1, Duration::from_secs(30));
    assert_eq!(installed(&s.remote, "first-1.pkg"), 1, "{}", d.stderr());
    drop(d);
}

#[test]
fn a_journal_replaced_under_the_running_daemon_stops_it_and_its_record_is_saved() {
    let s = setup("settle = 1s\nrescan = 1h", Path::new("state"), "");
    let d = watch(&s, &["drop"]);
    publish(&s, "kept-1.pkg", b"kept");
    wait_installed(&s.remote, "kept-1.pkg", 1, Duration::from_secs(30));
    let journal = s.state.join("journal.sqlite");
    fs::write(s.state.join("other"), b"").unwrap();
    fs::rename(s.state.join("other"), &journal).unwrap();
    let r = d.wait(Duration::from_secs(20)).assert_code(1);
    assert!(r.stderr.contains("replaced by another file"), "{r}");
    let saved: Vec<PathBuf> = fs::read_dir(&s.state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("journal.sqlite.saved-"))
        .collect();
    assert_eq!(saved.len(), 1, "{r}");
    assert!(r.stderr.contains(&saved[0].display().to_string()), "{r}");
    // the replacement (empty) is refused; the saved copy, moved back, is used
    s.ws.dispatch()
        .args(["watch", "drop"])
        .timeout(Duration::from_secs(20))
        .run()
        .assert_code(1);
    fs::rename(&saved[0], &journal).unwrap();
    let d = watch(&s, &["drop"]);
    d.wait_for_output("watch: start-up scan", Duration::from_secs(20));
    publish(&s, "after-1.pkg", b"after");
    wait_installed(&s.remote, "after-1.pkg", 1, Duration::from_secs(30));
    assert_eq!(installed(&s.remote, "kept-1.pkg"), 1, "{}", d.stderr());
    drop(d);
}

/// A small tmpfs at `<ws>/small`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system of `dir` (as root) until it is full.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    p
}

#[test]
fn a_journal_write_that_fails_on_a_full_disk_leaves_the_file_to_be_redone() {
    let s = setup("settle = 1s\nrescan = 1h", Path::new("small/state"), "");
    let small = Tmpfs::mount(s.ws.path().join("small"), "2m");
    let d = watch(&s, &["drop"]);
    let filler = fill(&small.0);
    publish(&s, "full-1.pkg", b"while the disk was full");
    d.wait_for_output(
        "add package: database or disk is full",
        Duration::from_secs(20),
    );
    assert_eq!(installed(&s.remote, "full-1.pkg"), 0);
    // room again; SIGHUP rescans: the file is not forgotten
    fs::remove_file(&filler).unwrap();
    d.signal(libc::SIGHUP);
    wait_installed(&s.remote, "full-1.pkg", 1, Duration::from_secs(30));
    // the marker is on the host a moment before the journal records it
    let hist = servers::poll_until(
        Duration::from_secs(20),
        "the install in the history",
        || {
            let h =
                s.ws.dispatch()
                    .args(["history", "--json"])
                    .run()
                    .assert_success();
            h.stdout.contains("\"installed\"").then_some(h)
        },
    );
    assert!(hist.stdout.contains("full-1.pkg"), "{hist}");
    assert!(hist.stdout.contains("installed"), "{hist}");
    drop(d);
}

#[test]
fn an_install_whose_result_cannot_be_recorded_is_not_counted_done_and_is_redone() {
    // the install itself fills the state dir's file system (once), so the
    // journal cannot record "installed"
    let s = setup(
        "settle = 1s\nrescan = 1h\nafter = delete",
        Path::new("small/state"),
        "",
    );
    let small = Tmpfs::mount(s.ws.path().join("small"), "2m");
    let fill_dir = s.ws.path().join("small/fill");
    fs::create_dir_all(&fill_dir).unwrap();
    Command::new("chmod")
        .arg("1777")
        .arg(&fill_dir)
        .status()
        .unwrap();
    let cfg = s.ws.path().join("dispatch.ini");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        ".installed\n",
        &format!(
            ".installed; echo run >> {{name}}.runs; if [ ! -e {f}/once ]; then touch {f}/once; dd if=/dev/zero of={f}/filler bs=64k 2>/dev/null; fi; true\n",
            f = fill_dir.display()
        ),
    );
    fs::write(&cfg, text).unwrap();
    let d = watch(&s, &["drop"]);
    publish(&s, "unrecorded-1.pkg", b"installed but not recorded");
    wait_installed(&s.remote, "unrecorded-1.pkg", 1, Duration::from_secs(30));
    d.wait_for_output(
        "record installed: database or disk is full",
        Duration::from_secs(20),
    );
    // not done: `after = delete` must not have removed it
    assert!(s.drop.join("unrecorded-1.pkg").exists(), "{}", d.stderr());
    fs::remove_file(fill_dir.join("filler")).unwrap();
    d.signal(libc::SIGHUP);
    // redone: installed again where it is ("uploaded" was recorded before
    // the install), not uploaded a second time
    servers::poll_until(Duration::from_secs(30), "second install", || {
        let runs = copies(&s.remote, "unrecorded-1.pkg.runs");
        (runs.len() == 1 && runs[0] == b"run\nrun\n").then_some(())
    });
    assert_eq!(
        copies(&s.remote, "unrecorded-1.pkg").len(),
        1,
        "uploaded once"
    );
    servers::poll_until(
        Duration::from_secs(20),
        "file deleted once recorded",
        || (!s.drop.join("unrecorded-1.pkg").exists()).then_some(()),
    );
    let hist =
        s.ws.dispatch()
            .args(["history", "--json"])
            .run()
            .assert_success();
    assert!(hist.stdout.contains("\"installed\""), "{hist}");
    drop(d);
    drop(small);
}

#[test]
fn a_relative_drop_dir_is_watched_by_its_events_and_a_slow_writer_is_sent_whole() {
    let s = setup("settle = 1s\nrescan = 1h", Path::new("state"), "");
    // cwd = the workspace; `drop` and `./drop/` name the drop dir relatively
    let _d = watch(&s, &["./drop/"]);
    let started = Instant::now();
    publish(&s, "rel-1.pkg", b"renamed in");
    wait_installed(&s.remote, "rel-1.pkg", 1, Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // written in place, slowly: only the complete file is sent
    let data: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let path = s.drop.join("slow-rel-1.bin");
    let mut f = fs::File::create(&path).unwrap();
    let t0 = Instant::now();
    for (i, c) in data.chunks(data.len() / 8).enumerate() {
        f.write_all(c).unwrap();
        f.flush().unwrap();
        let due = t0 + Duration::from_millis(400 * (i as u64 + 1));
        servers::poll_until(Duration::from_secs(5), "pacing", || {
            (Instant::now() >= due).then_some(())
        });
    }
    drop(f);
    wait_installed(&s.remote, "slow-rel-1.bin", 1, Duration::from_secs(30));
    let got = copies(&s.remote, "slow-rel-1.bin");
    assert_eq!(got.len(), 1, "sent once");
    assert!(got[0] == data, "sent complete");
}

#[test]
fn a_relative_watch_key_in_the_config_is_watched_by_its_events() {
    let s = setup(
        "settle = 30s\nrescan = 1h\nwatch = drop",
        Path::new("state"),
        "",
    );
    let _d = watch(&s, &[]);
    let started = Instant::now();
    publish(&s, "cfg-rel-1.pkg", b"renamed in");
    wait_installed(&s.remote, "cfg-rel-1.pkg", 1, Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}
