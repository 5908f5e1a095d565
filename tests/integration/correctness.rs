//! Regression tests for "Correct by default", end to end: the real
//! `dispatch` binary (by hand and as `dispatch watch`) against real sshd on
//! loopback. One test (or a few) per point of the issue:
//!
//! 1. the default dest dir, absolute `{file}`/`{dir}`, installs isolated
//!    from each other;
//! 2. temporary names that never collide (similar names, 255-byte names,
//!    two concurrent runs of the same name);
//! 3. a symlink in a drop dir (also one swapped in after the file was
//!    judged) is never read;
//! 4. non-UTF-8 names are refused, never sent under a lossy name;
//! 5. `install_timeout`, not `io_timeout`, bounds the install; a failed
//!    install is not uploaded again by the daemon;
//! 6. a daemon killed during the install installs the same upload on
//!    restart; Ctrl-C leaves nothing half-done;
//! 12. mode bits survive SCP.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::servers::{self, DispatchChild, RunResult, SshServer, Workspace};

/// `n` sshd hosts on one port (different loopback addresses), so one route
/// (`host = a, b`) reaches all of them, and a workspace trusting them.
struct Net {
    ws: Workspace,
    hosts: Vec<SshServer>,
    known_hosts: PathBuf,
}

fn net(n: usize) -> Net {
    let ws = Workspace::new();
    let hosts = servers::hosts_on_one_port(n, false);
    let refs: Vec<&SshServer> = hosts.iter().collect();
    let known_hosts = ws.known_hosts(&refs);
    Net {
        ws,
        hosts,
        known_hosts,
    }
}

impl Net {
    /// A route section to every host, key auth, no retries; `extra` adds
    /// keys (`dest_dir` too: without one the route has the default).
    fn route(&self, section: &str, extra: &str) -> String {
        let addrs: Vec<&str> = self.hosts.iter().map(|h| h.addr.as_str()).collect();
        format!(
            "[{section}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nconnect_timeout = 5s\nretries = 0\n{extra}\n",
            addrs.join(", "),
            self.hosts[0].port,
            servers::test_user().name,
            servers::keys().ed25519.display(),
            self.known_hosts.display(),
        )
    }

    /// `dispatch.ini` with a private state dir, `settings` in `[dispatch]`.
    fn config(&self, settings: &str, routes: &str) -> PathBuf {
        self.ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n{settings}\n\n{routes}",
            self.ws.path().join("state").display()
        ))
    }

    /// `dispatch -c CFG --json FILES…`, run to the end.
    fn dispatch(&self, cfg: &Path, files: &[PathBuf]) -> RunResult {
        self.ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .args(files)
            .run()
    }

    /// `dispatch -c CFG -vv watch DROP` in the background, once it watches.
    fn daemon(&self, cfg: &Path, drop: &Path) -> DispatchChild {
        let d = self
            .ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap(), "-vv", "watch"])
            .arg(drop)
            .spawn();
        d.wait_for_output("watching", Duration::from_secs(20));
        d
    }
}

/// One host; a config in which `section` sends to `remote/<dir>` and runs
/// `install`. Returns the net, that remote dir and the config.
fn one_host(dir: &str, settings: &str, section: &str, install: &str) -> (Net, PathBuf, PathBuf) {
    let n = net(1);
    let remote = n.ws.remote_dir(dir);
    let extra = format!(
        "dest_dir = {}\ninstall_command = {install}",
        remote.display()
    );
    let cfg = n.config(settings, &n.route(section, &extra));
    (n, remote, cfg)
}

/// A sparse package of `len` bytes: quick to make, slow enough to send.
fn sparse(n: &Net, name: &str, len: u64) -> PathBuf {
    let f = n.ws.file(name, b"");
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len)
        .unwrap();
    f
}

/// Every file below `dir` (not directories), sorted; nothing if it is gone.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => todo.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

fn base(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Temporary upload files below `dir`: the new `.dispatch-*.part` and the
/// old `.NAME.part` alike (so the old code is judged by the same rule).
fn temps(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            let n = base(p);
            n.starts_with('.') && n.ends_with(".part")
        })
        .collect()
}

/// The directories below `dir` that hold a file called `name`.
fn dirs_holding(dir: &Path, name: &str) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| base(p) == name)
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// `n` bytes of a pattern that depends on `seed` (no two seeds alike).
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let m = 251 - u32::from(seed % 50);
    (0..n as u32)
        .map(|i| ((i % m) as u8).wrapping_add(seed))
        .collect()
}

/// A file `dir/name` (name as raw bytes) with `content`, mode 0644.
fn write_raw(dir: &Path, name: &[u8], content: &[u8]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let p = dir.join(std::ffi::OsStr::from_bytes(name));
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// Drop `content` into `drop/name` atomically (written beside, renamed in).
fn drop_file(ws: &Workspace, drop: &Path, name: &str, content: &[u8]) {
    let stage = ws.path().join("stage");
    fs::create_dir_all(&stage).unwrap();
    let tmp = stage.join(name);
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, drop.join(name)).unwrap();
}

fn results_ok(r: &RunResult) -> Vec<serde_json::Value> {
    let res = servers::results(&r.stdout);
    for v in &res {
        assert_eq!(v["ok"], true, "{v}\n{r}");
    }
    res
}

// ---------------------------------------------------------------------------
// 1. default dest dir, absolute placeholders, isolated installs

#[test]
fn the_default_dest_dir_takes_twenty_packages_to_two_hosts_with_absolute_paths_and_isolated_installs(
) {
    let n = net(2);
    // each install records what it was given and where it runs, then does
    // everything a shell can keep for the next script
    let install = "install_command = printf '%s|%s|%s|%s|%s\\n' {file} {dir} \"$(pwd)\" \"${LEAK-unset}\" \"$(umask)\" > {file}.$DISPATCH_TEST_HOST.env && cat {file} > {file}.copy && test -f {file} && cd / && export LEAK=1 && umask 077 && set -e";
    // between them, installs of a second route (same connection, so the same
    // session) that also leave a trap behind — `trap` cannot share a
    // template with a placeholder (it evaluates its argument)
    let poison = "install_command = cd / && export LEAK=1 && umask 077 && set -e && trap 'echo x' EXIT && f() { :; }";
    // one lane per host: every install of a host runs after the one before
    // it on the same session
    let cfg = n.config(
        "max_sessions_per_host = 1",
        &format!(
            "{}{}",
            n.route("^corr1-dflt-", install),
            n.route("^corr1-trap-", poison)
        ),
    );
    let names: Vec<String> = (0..20).map(|i| format!("corr1-dflt-{i:02}.pkg")).collect();
    let contents: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("package {i} of the default dest dir test\n").into_bytes())
        .collect();
    let mut files: Vec<PathBuf> = Vec::new();
    for (i, (name, c)) in names.iter().zip(&contents).enumerate() {
        files.push(n.ws.file(name, c));
        files.push(n.ws.file(&format!("corr1-trap-{i:02}.pkg"), b"poison"));
    }
    let r = n.dispatch(&cfg, &files).assert_code(0);
    let res = results_ok(&r);
    assert_eq!(res.len(), 80, "40 packages × 2 hosts\n{r}");
    let res: Vec<serde_json::Value> = res
        .into_iter()
        .filter(|v| {
            v["file"]
                .as_str()
                .unwrap_or_default()
                .starts_with("corr1-dflt-")
        })
        .collect();
    for v in &res {
        assert_eq!(v["state"], "installed", "{v}");
    }
    // ~ is the login's home: the dated dir is below it, under newcx/
    let home = &servers::test_user().home;
    let dirs = dirs_holding(&home.join("newcx"), &names[0]);
    assert_eq!(dirs.len(), 1, "one dated dir under ~/newcx: {dirs:?}\n{r}");
    let dir = &dirs[0];
    let dated = base(dir);
    assert!(
        dated.len() == 15 && dated.as_bytes()[8] == b'_',
        "%Y%m%d_%H%M%S: {dated}"
    );
    let dir_s = dir.to_str().unwrap();
    let mut umasks = Vec::new();
    for (name, c) in names.iter().zip(&contents) {
        let file = dir.join(name);
        let file_s = file.to_str().unwrap();
        assert_eq!(&fs::read(&file).unwrap(), c, "{name}");
        assert_eq!(
            &fs::read(dir.join(format!("{name}.copy"))).unwrap(),
            c,
            "{name}: cat {{file}} > {{file}}.copy"
        );
        for h in &n.hosts {
            let v = servers::one(
                &res.iter()
                    .filter(|v| v["host"] == h.addr.as_str())
                    .cloned()
                    .collect::<Vec<_>>(),
                name,
            )
            .clone();
            assert_eq!(v["remote_path"], file_s, "reported path is absolute: {v}");
            let env_file = dir.join(format!("{name}.{}.env", h.addr));
            let env = fs::read_to_string(&env_file)
                .unwrap_or_else(|e| panic!("{}: {e}\n{r}", env_file.display()));
            let f: Vec<&str> = env.trim_end().split('|').collect();
            assert_eq!(f.len(), 5, "{env}");
            assert_eq!(f[0], file_s, "{{file}} is absolute ({name} on {})", h.addr);
            assert_eq!(f[1], dir_s, "{{dir}} is absolute ({name} on {})", h.addr);
            assert_eq!(
                f[2], dir_s,
                "cwd is the dest dir, whatever the install before did ({name} on {})",
                h.addr
            );
            assert_eq!(
                f[3], "unset",
                "an exported variable leaked into the next install ({name} on {})",
                h.addr
            );
            assert_ne!(
                f[4], "0077",
                "the umask leaked into the next install ({name} on {})",
                h.addr
            );
            umasks.push(f[4].to_string());
        }
    }
    umasks.dedup();
    assert_eq!(
        umasks.len(),
        1,
        "every install has the same umask: {umasks:?}"
    );
    assert!(temps(dir).is_empty(), "{:?}", temps(dir));
}

// ---------------------------------------------------------------------------
// 2. temporary names

#[test]
fn names_that_differ_only_by_a_newline_and_an_underscore_both_arrive_whole() {
    let n = net(1);
    let remote = n.ws.remote_dir("cd");
    let cfg = n.config(
        "",
        &n.route(
            r"c[_\n]d\.bin$",
            &format!(
                "dest_dir = {}\ninstall_command = cat {{file}} > {{file}}.copy",
                remote.display()
            ),
        ),
    );
    // same size, different bytes: a shared temp name would mix them
    let a = pattern(8 << 20, 1);
    let b = pattern(8 << 20, 2);
    let fa = n.ws.file("c\nd.bin", &a);
    let fb = n.ws.file("c_d.bin", &b);
    let r = n.dispatch(&cfg, &[fa, fb]).assert_code(0);
    let res = results_ok(&r);
    assert_eq!(res.len(), 2, "{r}");
    for (name, want) in [("c\nd.bin", &a), ("c_d.bin", &b)] {
        let got = fs::read(remote.join(name)).unwrap_or_else(|e| panic!("{name:?}: {e}\n{r}"));
        assert!(got == *want, "{name:?}: not its own content\n{r}");
        let copy = fs::read(remote.join(format!("{name}.copy"))).unwrap();
        assert!(copy == *want, "{name:?}: the install saw other bytes\n{r}");
    }
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
}

#[test]
fn a_255_byte_file_name_uploads_and_installs() {
    let n = net(1);
    let remote = n.ws.remote_dir("long");
    let cfg = n.config(
        "",
        &n.route(
            "^lllll",
            &format!(
                "dest_dir = {}\ninstall_command = sha256sum {{name}} >> installs.log",
                remote.display()
            ),
        ),
    );
    let name = format!("{}.bin", "l".repeat(251));
    assert_eq!(name.len(), 255);
    let content = pattern(100_000, 3);
    let f = n.ws.file(&name, &content);
    let r = n.dispatch(&cfg, &[f]).assert_code(0);
    let res = results_ok(&r);
    assert_eq!(res[0]["state"], "installed", "{r}");
    assert!(fs::read(remote.join(&name)).unwrap() == content);
    let log = fs::read_to_string(remote.join("installs.log")).unwrap();
    assert_eq!(log, format!("{}  {name}\n", sha256_hex(&content)));
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
}

#[test]
fn two_concurrent_runs_of_one_name_to_one_dir_each_report_the_truth() {
    // two operators, two workspaces, one host and one fixed dest dir
    let n = net(1);
    let other = Workspace::new();
    let other_kh = other.known_hosts(&[&n.hosts[0]]);
    let remote = n.ws.remote_dir("same");
    let name = "same-name.bin";
    let contents = [pattern(40 << 20, 4), pattern(40 << 20, 5)];
    let hashes = [sha256_hex(&contents[0]), sha256_hex(&contents[1])];
    let mut runs = Vec::new();
    for (i, ws) in [&n.ws, &other].into_iter().enumerate() {
        let kh = if i == 0 { &n.known_hosts } else { &other_kh };
        // each run's install logs the hash of what it installed, in a log of its own
        let cfg = ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n\n[^same-name]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nretries = 0\ndest_dir = {}\ninstall_command = sha256sum {{name}} >> run-{i}.log\n",
            ws.path().join("state").display(),
            n.hosts[0].addr,
            n.hosts[0].port,
            servers::test_user().name,
            servers::keys().ed25519.display(),
            kh.display(),
            remote.display(),
        ));
        let f = ws.file(name, &contents[i]);
        runs.push((cfg, f, ws));
    }
    let children: Vec<DispatchChild> = runs
        .iter()
        .map(|(cfg, f, ws)| {
            ws.dispatch()
                .args(["-c", cfg.to_str().unwrap(), "--json"])
                .arg(f)
                .spawn()
        })
        .collect();
    let done: Vec<RunResult> = children
        .into_iter()
        .map(|c| c.wait(Duration::from_secs(120)))
        .collect();
    let final_bytes = fs::read(remote.join(name)).unwrap();
    assert!(
        final_bytes == contents[0] || final_bytes == contents[1],
        "the host holds neither input exactly ({} bytes, sha256 {})",
        final_bytes.len(),
        sha256_hex(&final_bytes)
    );
    for (i, r) in done.iter().enumerate() {
        let res = servers::results(&r.stdout);
        assert_eq!(res.len(), 1, "{r}");
        assert_eq!(res[0]["ok"], true, "run {i} failed\n{r}");
        assert_eq!(r.status, Some(0), "{r}");
        // it said it installed: what its install saw must be its own bytes
        let log = fs::read_to_string(remote.join(format!("run-{i}.log"))).unwrap_or_default();
        let seen: Vec<&str> = log
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        assert_eq!(
            seen,
            [hashes[i].as_str()],
            "run {i} reported installed but its install saw other bytes (its own: {}, the other's: {})\n{r}",
            hashes[i],
            hashes[1 - i]
        );
    }
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
}

#[test]
fn two_hosts_sharing_one_dest_dir_never_install_the_same_name_at_once() {
    // two hosts that see one file system (an NFS home): the per-name lock
    // must keep one host's upload from replacing the file under the
    // other's install, also when both are lanes of one dispatch
    let n = net(2);
    let remote = n.ws.remote_dir("shared");
    let cfg = n.config(
        "",
        &n.route(
            "^shared-",
            &format!(
                "dest_dir = {}\ninstall_command = echo start $DISPATCH_TEST_HOST >> installs.log; sleep 1; test -f {{file}} || echo missing $DISPATCH_TEST_HOST >> installs.log; echo end $DISPATCH_TEST_HOST >> installs.log",
                remote.display()
            ),
        ),
    );
    let content = pattern(4 << 20, 7);
    let f = n.ws.file("shared-1.pkg", &content);
    let r = n.dispatch(&cfg, &[f]);
    let log = fs::read_to_string(remote.join("installs.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "two installs, one after the other:\n{log}\n{r}"
    );
    for pair in lines.chunks(2) {
        let host = pair[0].strip_prefix("start ").unwrap_or("?");
        assert_eq!(
            pair,
            [format!("start {host}"), format!("end {host}")],
            "the installs overlapped or the file vanished under one:\n{log}\n{r}"
        );
    }
    assert_eq!(r.status, Some(0), "{r}");
    results_ok(&r);
    assert!(fs::read(remote.join("shared-1.pkg")).unwrap() == content);
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
}

// ---------------------------------------------------------------------------
// 3. symlinks in a drop dir

#[test]
fn a_symlink_in_the_drop_dir_even_one_swapped_in_after_judging_is_never_read() {
    let n = net(1);
    let remote = n.ws.remote_dir("drop3");
    let drop = n.ws.path().join("drop");
    fs::create_dir_all(&drop).unwrap();
    let flag = n.ws.path().join("gate-open");
    let secret_token = format!("TOP-SECRET-{}-{}", std::process::id(), line!());
    let secret = n.ws.path().join("secret.txt");
    fs::write(&secret, secret_token.repeat(100)).unwrap();
    // one worker: a package waits behind the gate's install, judged and
    // queued; then it is swapped for a symlink before it is sent
    let install = format!(
        "install_command = case {{name}} in corr3-gate*) touch {{name}}.waiting; while [ ! -e {} ]; do sleep 0.1; done ;; esac; sha256sum {{name}} > {{name}}.installed",
        flag.display()
    );
    let cfg = n.config(
        "jobs = 1\nsettle = 500ms\nrescan = 5s",
        &n.route(
            "^corr3-",
            &format!(
                "dest_dir = {}/%Y%m%d_%H%M%S_%f\n{install}",
                remote.display()
            ),
        ),
    );
    let d = n.daemon(&cfg, &drop);
    // a symlink dropped as it is
    let stage = n.ws.path().join("stage");
    fs::create_dir_all(&stage).unwrap();
    std::os::unix::fs::symlink(&secret, stage.join("l1")).unwrap();
    fs::rename(stage.join("l1"), drop.join("corr3-direct.bin")).unwrap();
    // the gate: its install holds the only worker
    drop_file(&n.ws, &drop, "corr3-gate.bin", b"gate");
    servers::poll_until(Duration::from_secs(20), "gate install running", || {
        (!dirs_holding(&remote, "corr3-gate.bin.waiting").is_empty()).then_some(())
    });
    // a regular file, judged and queued behind the gate ...
    let swap_content = b"the regular bytes that were judged".to_vec();
    drop_file(&n.ws, &drop, "corr3-swap.bin", &swap_content);
    servers::poll_until(Duration::from_secs(20), "swap file queued", || {
        (d.stderr().matches("batch of").count() >= 2).then_some(())
    });
    // ... then swapped for a symlink to the secret
    std::os::unix::fs::symlink(&secret, stage.join("l2")).unwrap();
    fs::rename(stage.join("l2"), drop.join("corr3-swap.bin")).unwrap();
    let plain = b"plain regular content".to_vec();
    drop_file(&n.ws, &drop, "corr3-plain.bin", &plain);
    servers::poll_until(Duration::from_secs(20), "plain file queued", || {
        (d.stderr().matches("batch of").count() >= 3).then_some(())
    });
    fs::write(&flag, b"").unwrap();
    // one worker, first in first out: the plain file goes after the swapped one
    servers::poll_until(Duration::from_secs(30), "plain file installed", || {
        (!dirs_holding(&remote, "corr3-plain.bin.installed").is_empty()).then_some(())
    });
    for p in walk(&remote) {
        let b = fs::read(&p).unwrap_or_default();
        assert!(
            !b.windows(secret_token.len())
                .any(|w| w == secret_token.as_bytes()),
            "the secret behind a symlink was uploaded: {}\n{}",
            p.display(),
            d.stderr()
        );
    }
    let plain_dirs = dirs_holding(&remote, "corr3-plain.bin");
    assert_eq!(plain_dirs.len(), 1);
    assert!(fs::read(plain_dirs[0].join("corr3-plain.bin")).unwrap() == plain);
    for dir in dirs_holding(&remote, "corr3-swap.bin") {
        assert!(
            fs::read(dir.join("corr3-swap.bin")).unwrap() == swap_content,
            "the swapped file arrived with other bytes than were judged"
        );
    }
    assert!(dirs_holding(&remote, "corr3-direct.bin").is_empty());
}

// ---------------------------------------------------------------------------
// 4. non-UTF-8 names

#[test]
fn non_utf8_names_are_refused_by_name_and_nothing_arrives_under_a_lossy_name() {
    let n = net(1);
    let remote = n.ws.remote_dir("nonutf8");
    let cfg = n.config(
        "",
        &n.route(
            r".*-x\.bin$",
            &format!(
                "dest_dir = {}\ninstall_command = touch {{file}}.done",
                remote.display()
            ),
        ),
    );
    let pkgs = n.ws.path().join("pkgs");
    let a = write_raw(&pkgs, b"\xff\xfe-x.bin", b"first");
    let b = write_raw(&pkgs, b"\xfe\xff-x.bin", b"second");
    let r = n.dispatch(&cfg, &[a, b]).assert_code(1);
    for escaped in [r"\xff\xfe-x.bin", r"\xfe\xff-x.bin"] {
        // with --json the message is the refused input's record
        let line = r
            .stderr
            .lines()
            .chain(r.stdout.lines())
            .find(|l| l.contains(&escaped.replace('\\', "\\\\")) || l.contains(escaped))
            .unwrap_or_else(|| panic!("no message naming {escaped}\n{r}"));
        assert!(line.contains("UTF-8"), "{line}");
    }
    assert!(
        servers::results(&r.stdout).is_empty(),
        "nothing was attempted\n{r}"
    );
    assert!(walk(&remote).is_empty(), "{:?}\n{r}", walk(&remote));
}

// ---------------------------------------------------------------------------
// 5. install_timeout, not io_timeout; failed installs are not re-uploaded

#[test]
fn a_quiet_install_longer_than_io_timeout_but_within_install_timeout_succeeds() {
    let n = net(1);
    let remote = n.ws.remote_dir("quiet");
    let cfg = n.config(
        "",
        &n.route(
            "^quiet-",
            &format!(
                "dest_dir = {}\nio_timeout = 2s\ninstall_timeout = 20s\ninstall_command = sleep 5; echo done > {{file}}.ok",
                remote.display()
            ),
        ),
    );
    let f = n.ws.file("quiet-1.pkg", b"quiet");
    let r = n.dispatch(&cfg, &[f]).assert_code(0);
    let res = results_ok(&r);
    assert_eq!(res[0]["state"], "installed", "{r}");
    assert_eq!(
        fs::read_to_string(remote.join("quiet-1.pkg.ok")).unwrap(),
        "done\n"
    );
}

#[test]
fn an_install_that_ignores_term_is_killed_at_install_timeout_and_reported() {
    let n = net(1);
    let remote = n.ws.remote_dir("stubborn");
    let cfg = n.config(
        "",
        &n.route(
            "^stubborn-",
            &format!(
                "dest_dir = {}\ninstall_timeout = 2s\ninstall_command = trap '' TERM; sleep 60",
                remote.display()
            ),
        ),
    );
    let f = n.ws.file("stubborn-1.pkg", b"stubborn");
    let started = Instant::now();
    let r = n.dispatch(&cfg, &[f]).assert_code(1);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(35), "took {took:?}\n{r}");
    let res = servers::results(&r.stdout);
    assert_eq!(res.len(), 1, "{r}");
    assert_eq!(res[0]["ok"], false, "{r}");
    let err = res[0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("did not finish within install_timeout"),
        "{err}\n{r}"
    );
}

#[test]
fn the_daemon_does_not_upload_again_after_a_failed_install() {
    let n = net(1);
    let remote = n.ws.remote_dir("failinst");
    let drop = n.ws.path().join("drop");
    fs::create_dir_all(&drop).unwrap();
    let cfg = n.config(
        "settle = 500ms\nrescan = 5s",
        &n.route(
            "^corr5-",
            &format!(
                "dest_dir = {}/%Y%m%d_%H%M%S_%f\ninstall_command = echo failing on purpose; exit 3",
                remote.display()
            ),
        ),
    );
    let d = n.daemon(&cfg, &drop);
    drop_file(&n.ws, &drop, "corr5-fail.pkg", b"fails to install");
    // parked at once (new) or a second copy (retried)
    servers::poll_until(Duration::from_secs(20), "the install failed", || {
        (d.stderr().contains("parked") || dirs_holding(&remote, "corr5-fail.pkg").len() > 1)
            .then_some(())
    });
    // past the first retry's backoff (2 s): still one copy
    let until = Instant::now() + Duration::from_secs(3);
    servers::poll_until(Duration::from_secs(10), "the retry backoff", || {
        let copies = dirs_holding(&remote, "corr5-fail.pkg").len();
        assert!(
            copies <= 1,
            "a failed install was uploaded again ({copies} dated dirs)\n{}",
            d.stderr()
        );
        (Instant::now() >= until).then_some(())
    });
    assert_eq!(dirs_holding(&remote, "corr5-fail.pkg").len(), 1);
    let log = d.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("corr5-fail.pkg") && l.contains("parked"))
        .unwrap_or_else(|| panic!("no 'parked' line\n{log}"));
    assert!(line.contains("not retried"), "{line}");
    assert!(line.contains("exit status 3"), "{line}");
}

// ---------------------------------------------------------------------------
// 6. the crash window and Ctrl-C

#[test]
fn a_daemon_killed_during_the_install_installs_the_same_upload_on_restart() {
    let n = net(1);
    let remote = n.ws.remote_dir("crash");
    let drop = n.ws.path().join("drop");
    fs::create_dir_all(&drop).unwrap();
    let flag = n.ws.path().join("may-finish");
    // the install lock the killed daemon leaves is broken after
    // install_timeout + io_timeout + 30 s: keep both short
    let cfg = n.config(
        "settle = 500ms\nrescan = 5s",
        &n.route(
            "^corr6-",
            &format!(
                "dest_dir = {}/%Y%m%d_%H%M%S_%f\nio_timeout = 2s\ninstall_timeout = 3s\ninstall_command = touch {{name}}.started; while [ ! -e {} ]; do sleep 0.1; done; sha256sum {{name}} >> {{name}}.installed",
                remote.display(),
                flag.display()
            ),
        ),
    );
    let content = pattern(1 << 20, 6);
    let d = n.daemon(&cfg, &drop);
    drop_file(&n.ws, &drop, "corr6-crash.pkg", &content);
    servers::poll_until(Duration::from_secs(20), "install started", || {
        (!dirs_holding(&remote, "corr6-crash.pkg.started").is_empty()).then_some(())
    });
    let first = d.kill();
    let d2 = n.daemon(&cfg, &drop);
    fs::write(&flag, b"").unwrap();
    let installed = "corr6-crash.pkg: ".to_string();
    servers::poll_until(
        Duration::from_secs(60),
        "installed after the restart",
        || {
            let done = d2
                .stderr()
                .lines()
                .any(|l| l.contains(&installed) && l.contains(": installed"));
            // or uploaded a second time (judged below)
            (done || dirs_holding(&remote, "corr6-crash.pkg").len() > 1).then_some(())
        },
    );
    let dirs = dirs_holding(&remote, "corr6-crash.pkg");
    assert_eq!(
        dirs.len(),
        1,
        "uploaded again after the restart: {dirs:?}\n--- first run ---\n{}\n--- second run ---\n{}",
        first.stderr,
        d2.stderr()
    );
    assert!(fs::read(dirs[0].join("corr6-crash.pkg")).unwrap() == content);
    let marker = fs::read_to_string(dirs[0].join("corr6-crash.pkg.installed")).unwrap();
    assert!(marker.starts_with(&sha256_hex(&content)), "{marker}");
    assert!(
        d2.stderr()
            .contains("resuming: installing the upload already in"),
        "{}",
        d2.stderr()
    );
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
}

#[test]
fn ctrl_c_during_a_big_upload_exits_130_and_leaves_nothing_half_done() {
    let (n, remote, cfg) = one_host("ctrlc", "", "^big-", "touch {file}.done");
    let f = sparse(&n, "big-ctrlc.bin", 300 << 20);
    let r = ctrl_c_once_under_way(&n, &remote, &cfg, &[f]);
    assert!(!remote.join("big-ctrlc.bin.done").exists(), "{r}");
    let rows = history(&n, &cfg);
    assert!(!rows.is_empty(), "the run is in the journal");
    for row in &rows {
        assert_ne!(row["state"], "uploading", "{row}");
        assert_ne!(row["state"], "installed", "{row}");
    }
}

/// `dispatch --json FILES…`, SIGINT once a temporary file is on the host:
/// it must exit 130 and leave no temporary file.
fn ctrl_c_once_under_way(n: &Net, remote: &Path, cfg: &Path, files: &[PathBuf]) -> RunResult {
    let child =
        n.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .args(files)
            .spawn();
    servers::poll_until(Duration::from_secs(30), "upload under way", || {
        (!temps(remote).is_empty()).then_some(())
    });
    child.signal(libc::SIGINT);
    let r = child.wait(Duration::from_secs(60));
    assert_eq!(r.status, Some(130), "{r}");
    assert!(temps(remote).is_empty(), "{:?}\n{r}", temps(remote));
    r
}

/// The journal's results (`dispatch history`).
fn history(n: &Net, cfg: &Path) -> Vec<serde_json::Value> {
    let h =
        n.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json", "history"])
            .run()
            .assert_code(0);
    servers::results(&h.stdout)
}

/// The same through the pipeline: eight files just small enough to be
/// streamed, Ctrl-C while the first is being sent. Whatever was in place
/// before the signal may have been installed (and says so); nothing else
/// is left on the host, and the journal has no upload in flight.
#[test]
fn ctrl_c_while_streaming_exits_130_and_leaves_nothing_half_done() {
    let (n, remote, cfg) = one_host(
        "ctrlc-stream",
        "max_sessions_per_host = 1",
        "^big-",
        "touch {file}.done",
    );
    let files: Vec<PathBuf> = (0..8)
        .map(|i| sparse(&n, &format!("big-{i}.bin"), 31 << 20))
        .collect();
    let r = ctrl_c_once_under_way(&n, &remote, &cfg, &files);
    // all eight were admitted into the pipeline at once (the plain path
    // starts one upload at a time)
    let started = servers::json_events(&r.stdout)
        .iter()
        .filter(|v| v["event"] == "uploading")
        .count();
    assert_eq!(started, 8, "{r}");
    let rows = servers::results(&r.stdout);
    let mut stopped = 0;
    for row in &rows {
        let name = row["file"].as_str().unwrap();
        let done = remote.join(format!("{name}.done")).exists();
        if row["state"] == "installed" {
            assert!(done, "{row}");
            assert_eq!(fs::metadata(remote.join(name)).unwrap().len(), 31 << 20);
        } else {
            assert!(!done, "{row}");
            stopped += 1;
        }
    }
    assert!(stopped >= 1, "nothing was stopped by Ctrl-C\n{r}");
    for row in history(&n, &cfg) {
        assert_ne!(row["state"], "uploading", "{row}");
    }
}

// ---------------------------------------------------------------------------
// 12. mode bits

#[test]
fn mode_bits_0600_and_0751_survive_scp() {
    let n = net(1);
    let remote = n.ws.remote_dir("modes");
    let cfg = n.config(
        "",
        &n.route("^mode-", &format!("dest_dir = {}", remote.display())),
    );
    let mut files = Vec::new();
    for (name, mode) in [("mode-0600.bin", 0o600), ("mode-0751.bin", 0o751)] {
        let f = n.ws.file(name, name.as_bytes());
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
        files.push((f, name, mode));
    }
    let paths: Vec<PathBuf> = files.iter().map(|(f, _, _)| f.clone()).collect();
    let r = n.dispatch(&cfg, &paths).assert_code(0);
    results_ok(&r);
    for (_, name, mode) in files {
        let m = fs::metadata(remote.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(m, mode, "{name}: {m:o} on the host, {mode:o} sent\n{r}");
    }
}

/// Locks left on the host by a dispatcher of this machine that died — as a
/// symlink to its owner record (what dispatch makes over SFTP) or as a file
/// holding it (`set -C`, older versions) — are broken at once, not after
/// `wait_limit`; the lock this run takes is a symlink and is gone afterwards.
#[test]
fn install_locks_left_by_a_dead_dispatcher_are_broken_at_once_in_either_form() {
    use sha2::{Digest, Sha256};
    let n = net(1);
    let remote = n.ws.remote_dir("locks");
    let lock_of = |name: &str| {
        let h = Sha256::digest(name.as_bytes());
        let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
        remote.join(format!(".dispatch-lock-{hex}"))
    };
    // a process of this machine that is gone
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let owner = format!("dispatch dead-0 pid {pid} on {} since then", host.trim());
    std::os::unix::fs::symlink(&owner, lock_of("lock-1")).unwrap();
    fs::write(lock_of("lock-2"), format!("{owner}\n")).unwrap();
    // the install sees its own lock (and only its own: the other lanes' come
    // and go meanwhile): a symlink naming this run
    let cfg = n.config(
        "",
        &n.route(
            "lock-",
            &format!(
                "dest_dir = {}\ninstall_timeout = 60s\ninstall_command = printf %s {{name}} | sha256sum | cut -c1-16 | sed s/^/.dispatch-lock-/ | xargs readlink > {{name}}.lock",
                remote.display()
            ),
        ),
    );
    let files: Vec<PathBuf> = (1..=3)
        .map(|i| n.ws.file(&format!("lock-{i}"), format!("l{i}").as_bytes()))
        .collect();
    let started = Instant::now();
    let r = n.dispatch(&cfg, &files).assert_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited for the dead holders: {r}"
    );
    for i in 1..=3 {
        let name = format!("lock-{i}");
        assert_eq!(
            fs::read(remote.join(&name)).unwrap(),
            format!("l{i}").as_bytes()
        );
        let seen = fs::read_to_string(remote.join(format!("{name}.lock"))).unwrap();
        assert!(
            seen.starts_with("dispatch ") && !seen.contains("dead-0"),
            "{name}: {seen:?}"
        );
        assert!(
            fs::symlink_metadata(lock_of(&name)).is_err(),
            "{name}: lock left"
        );
    }
}

// ---------------------------------------------------------------------------
// Streaming (issue "Fast on a real network"): what the pipeline cannot do
// for a file goes the plain way; the rest still streams.

/// Every process below `pid` (children, their children, …), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // the fields after "(comm)": state, ppid, …
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
            parent_of.push((p, ppid));
        }
    }
    let mut out: Vec<u32> = Vec::new();
    let mut todo = vec![pid];
    while let Some(q) = todo.pop() {
        for &(p, pp) in &parent_of {
            if pp == q && !out.contains(&p) {
                out.push(p);
                todo.push(p);
            }
        }
    }
    out
}

/// The `uploaded` events of a `--json` run that say `streamed`.
fn streamed_uploads(stdout: &str) -> usize {
    servers::json_events(stdout)
        .iter()
        .filter(|v| v["event"] == "uploaded" && v["streamed"] == true)
        .count()
}

#[test]
fn a_file_the_pipeline_cannot_place_goes_the_plain_way_and_the_rest_still_stream() {
    // one host: two of this harness's hosts share one home (one test user),
    // so their install locks of one name in one dated dir would meet
    let n = net(1);
    let remote = n.ws.remote_dir("nodir");
    // a regular file where the bad route's directory should be
    fs::write(remote.join("blocker"), b"not a directory").unwrap();
    let install = "install_command = sha256sum {name} > {name}.installed";
    let routes = format!(
        "{}{}",
        n.route(
            "^bad-",
            &format!("dest_dir = {}/blocker/sub\n{install}", remote.display())
        ),
        // the default dest dir, as the legacy config gets it
        n.route("^ok-", install),
    );
    let cfg = n.config("", &routes);
    let mut files: Vec<PathBuf> = (0..6)
        .map(|i| {
            n.ws.file(&format!("ok-{i}.tgz"), format!("ok {i}").as_bytes())
        })
        .collect();
    files.insert(3, n.ws.file("bad-1.tgz", b"nowhere to go"));
    let r = n.dispatch(&cfg, &files).assert_code(1);
    let rows = servers::results(&r.stdout);
    assert_eq!(rows.len(), 7, "{r}");
    for row in &rows {
        let name = row["file"].as_str().unwrap();
        if name.starts_with("bad-") {
            assert_eq!(row["ok"], false, "{row}");
            let err = row["error"].as_str().unwrap_or_default();
            assert!(err.contains("cannot create directory"), "{row}");
            continue;
        }
        assert_eq!(row["state"], "installed", "{row}");
        let path = PathBuf::from(row["remote_path"].as_str().unwrap());
        let want = format!("ok {}", &name[3..4]);
        assert_eq!(fs::read(&path).unwrap(), want.as_bytes(), "{row}");
        let marker = fs::read_to_string(path.with_file_name(format!("{name}.installed"))).unwrap();
        assert!(marker.contains(name), "{marker}");
        let dir = path.parent().unwrap();
        assert!(temps(dir).is_empty(), "{:?}", temps(dir));
        assert!(
            walk(dir)
                .iter()
                .all(|p| !base(p).starts_with(".dispatch-lock-")),
            "a lock was left in {}",
            dir.display()
        );
    }
    assert_eq!(streamed_uploads(&r.stdout), 6, "{r}");
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
}

#[test]
fn a_connection_lost_mid_stream_redoes_the_files_not_yet_in_place_the_plain_way() {
    let (n, remote, cfg) = one_host(
        "lost",
        "max_sessions_per_host = 1",
        "^",
        "echo once >> {name}.count",
    );
    // just below what goes the plain way (32 MiB), slow enough to send that
    // the connection is cut during it, the small files queued behind it in
    // the same pipeline
    let big = sparse(&n, "a-big.bin", 31 << 20);
    let mut files = vec![big];
    for i in 0..4 {
        files.push(n.ws.file(&format!("b-small-{i}"), format!("small {i}").as_bytes()));
    }
    let child =
        n.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .args(&files)
            .spawn();
    let listener = n.hosts[0].pid();
    servers::poll_until(Duration::from_secs(30), "the big upload under way", || {
        let t = temps(&remote);
        t.iter()
            .any(|p| {
                fs::metadata(p)
                    .map(|m| m.len() > (512 << 10))
                    .unwrap_or(false)
            })
            .then_some(())
    });
    // cut the session: kill every process serving it (the listener's
    // descendants: privsep monitor, session child, sftp-server, runner), not
    // the listener, so the plain path can reconnect
    let serving = descendants(listener);
    assert!(!serving.is_empty(), "no session process to kill");
    for pid in serving {
        // SAFETY: SIGKILL to a process of this test's own sshd.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let r = child.wait(Duration::from_secs(120));
    assert_eq!(r.status, Some(0), "{r}");
    let rows = servers::results(&r.stdout);
    assert_eq!(rows.len(), 5, "{r}");
    for row in &rows {
        assert_eq!(row["state"], "installed", "{row}");
        let name = row["file"].as_str().unwrap();
        let count = fs::read_to_string(remote.join(format!("{name}.count"))).unwrap();
        assert_eq!(count, "once\n", "{name} installed more than once");
    }
    assert_eq!(
        fs::metadata(remote.join("a-big.bin")).unwrap().len(),
        31 << 20
    );
    for i in 0..4 {
        let got = fs::read(remote.join(format!("b-small-{i}"))).unwrap();
        assert_eq!(got, format!("small {i}").as_bytes());
    }
    assert!(temps(&remote).is_empty(), "{:?}", temps(&remote));
    // the first attempt streamed; what it had not placed was redone plainly
    let events = servers::json_events(&r.stdout);
    let plain = events
        .iter()
        .filter(|v| v["event"] == "uploaded" && v["streamed"] == false)
        .count();
    assert!(plain >= 1, "nothing was redone the plain way\n{r}");
}
