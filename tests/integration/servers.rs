//! Real servers for the integration tests, on loopback, started by the tests
//! themselves: OpenSSH `sshd` and `vsftpd` as child processes, a test user,
//! client keys, an ssh-agent, nft rules that make a host time out, and a
//! per-test workspace that runs the real `dispatch` binary.
//!
//! No mocks: every "host" is a real server process listening on an address of
//! 127.0.0.0/8 (Linux routes the whole /8 to `lo`, so 127.0.0.2, 127.0.0.3, …
//! need no setup). Tests run as root, in parallel threads of one process.
//!
//! Rules the harness keeps, and that tests should keep too:
//! - Every wait is a bounded poll ([`poll_until`]), never a fixed sleep.
//! - Every process the harness starts is killed by its pid (with the
//!   processes it forked) when its guard drops; a guard dropped during a panic
//!   prints the server's log first.
//! - Ports come from a process-wide allocator outside the kernel's ephemeral
//!   range, checked free, so servers of parallel tests never collide.
//! - Tests that pick their own address use 127.0.0.2–127.0.0.9 and may share
//!   it with other tests (ports differ). A test that blocks an address with
//!   [`block`] takes a private one from [`fresh_addr`] (127.0.0.10 upward).
//! - Everything lives under one temp root per process
//!   (`$TMPDIR/dispatch-it-<pid>`), removed at exit together with the test
//!   user and the nft table; leftovers of a killed run are removed by the next.
//! - The test user's home is shared by all tests of the process: a test that
//!   uploads to `~/…` must use names no other test uses. Prefer
//!   [`Workspace::remote_dir`] as `dest_dir`, or a server with a user of its
//!   own ([`SshServer::start_own_user`]): a home nobody else writes.
//! - End-to-end scenarios run twice ([`scenario!`](crate::scenario) and
//!   [`Placement`]): with an absolute `dest_dir` on hosts sharing the test
//!   user, and with the default `dest_dir` (no key) on hosts with their own
//!   users, at least 3 files per session per host.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to show its banner.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for one run of the `dispatch` binary.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Prefix of the per-process temp root, the test user and the nft table.
const ROOT_PREFIX: &str = "dispatch-it-";
const USER_PREFIX: &str = "dsp-test-";
/// Prefix of the users of servers with their own login (`dsp-own-<pid>-<n>`).
const OWN_USER_PREFIX: &str = "dsp-own-";
const NFT_PREFIX: &str = "dispatch_it_";
/// Ports handed out by [`alloc_ports`]: below the ephemeral range 32768–60999.
const PORT_MIN: u16 = 20000;
const PORT_MAX: u16 = 32000;
/// Passive data ports per FTP server.
const PASV_PORTS: u16 = 8;

// ---------------------------------------------------------------------------
// Polling

/// Call `f` every 10 ms until it returns `Some`, for at most `timeout`;
/// panics with `what` if it never does. The only way tests wait.
#[track_caller]
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        thread::sleep(Duration::from_millis(10)); // poll step
    }
}

// ---------------------------------------------------------------------------
// The process-wide root, cleanup at exit and of stale runs

/// The temp root of this test process: `$TMPDIR/dispatch-it-<pid>`, mode 0755
/// (the test user must traverse it). Created on first use.
pub fn harness_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the integration tests start sshd/vsftpd and create a user: run them as root (bash scripts/test.sh)"
        );
        clean_stale_runs();
        let root = std::env::temp_dir().join(format!("{ROOT_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("create harness root");
        chmod(&root, 0o755);
        let _ = HARNESS_ROOT_FOR_EXIT.set(root.clone());
        // SAFETY: registering a plain extern "C" fn that never unwinds.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
        root
    })
}

/// A fresh, empty directory under the harness root (mode 0755).
fn unique_dir(kind: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = harness_root().join(format!("{kind}-{}", N.fetch_add(1, Ordering::Relaxed)));
    fs::create_dir_all(&dir).expect("create harness dir");
    chmod(&dir, 0o755);
    dir
}

/// Pids of children started by the harness and not yet reaped: killed at exit
/// if a guard was leaked (e.g. kept in a static).
fn live_pids() -> &'static Mutex<HashSet<u32>> {
    static PIDS: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    PIDS.get_or_init(|| Mutex::new(HashSet::new()))
}

fn register(pid: u32) {
    live_pids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pid);
}

fn unregister(pid: u32) {
    live_pids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid);
}

extern "C" fn cleanup_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let pids: Vec<u32> = live_pids()
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for pid in pids {
            kill_tree(pid);
        }
        let pid = std::process::id();
        let _ = quiet(Command::new(sbin("nft")).args([
            "delete",
            "table",
            "inet",
            &format!("{NFT_PREFIX}{pid}"),
        ]));
        if USER_CREATED.get().is_some() {
            let _ =
                quiet(Command::new(sbin("userdel")).args(["-f", &format!("{USER_PREFIX}{pid}")]));
        }
        let own: Vec<String> = own_users().lock().map(|v| v.clone()).unwrap_or_default();
        for user in own {
            let _ = quiet(Command::new(sbin("userdel")).args(["-f", &user]));
        }
        if let Some(root) = HARNESS_ROOT_FOR_EXIT.get() {
            if KEEP_ROOT.get().is_some() {
                eprintln!(
                    "----- harness root kept for inspection (a test failed): {} -----",
                    root.display()
                );
            } else {
                let _ = fs::remove_dir_all(root);
            }
        }
    });
}

static USER_CREATED: OnceLock<()> = OnceLock::new();

/// Names of the users made by [`own_user`], removed at exit.
fn own_users() -> &'static Mutex<Vec<String>> {
    static USERS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    USERS.get_or_init(|| Mutex::new(Vec::new()))
}
static HARNESS_ROOT_FOR_EXIT: OnceLock<PathBuf> = OnceLock::new();
/// Set when a guard dropped during a panic: the root is then kept at exit
/// (the next run removes it).
static KEEP_ROOT: OnceLock<()> = OnceLock::new();

/// Remove what killed runs left: their temp roots (and the processes started
/// from them), their test users and their nft tables. Only entries named with
/// the pid of a process that no longer exists are touched.
fn clean_stale_runs() {
    let dead = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
    };
    let tmp = std::env::temp_dir();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(ROOT_PREFIX) {
                if dead(pid) {
                    let dir = format!("{}/", e.path().display());
                    for p in pids_with_cmdline_containing(&dir) {
                        kill_tree(p);
                    }
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    if let Ok(passwd) = fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            let user = line.split(':').next().unwrap_or("");
            let own_pid = user
                .strip_prefix(OWN_USER_PREFIX)
                .and_then(|rest| rest.split_once('-'))
                .map(|(pid, _)| pid);
            if user.strip_prefix(USER_PREFIX).is_some_and(dead) || own_pid.is_some_and(dead) {
                let _ = quiet(Command::new(sbin("userdel")).args(["-f", user]));
            }
        }
    }
    if let Ok(out) = Command::new(sbin("nft")).args(["list", "tables"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(table) = line.strip_prefix("table inet ") {
                if table.strip_prefix(NFT_PREFIX).is_some_and(dead) {
                    let _ =
                        quiet(Command::new(sbin("nft")).args(["delete", "table", "inet", table]));
                }
            }
        }
    }
}

fn pids_with_cmdline_containing(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// Small helpers

/// `/usr/sbin/NAME` if it exists, else `NAME` (found on PATH).
fn sbin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn chown_to_test_user(path: &Path) {
    let u = test_user();
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
        .unwrap_or_else(|e| panic!("chown {} {}: {e}", u.name, path.display()));
}

/// Run a command to completion; panic with its output if it fails.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command, output discarded; the status if it ran.
fn quiet(cmd: &mut Command) -> Option<ExitStatus> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
}

fn write_file(path: &Path, content: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(content)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    chmod(path, mode);
}

/// Parent pid of every process, from /proc/*/stat.
fn parent_map() -> HashMap<u32, Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return children;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …" — comm may hold spaces and parentheses
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok())
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    children
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started (or one of its descendants).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Kill `pid` and every process it forked (sshd sessions, install commands,
/// vsftpd session processes). Stops the tree first so nothing forks away, then
/// SIGKILLs all of it. The caller reaps `pid` if it is its child.
fn kill_tree(pid: u32) {
    let mut all = vec![pid];
    let mut seen: HashSet<u32> = all.iter().copied().collect();
    signal(pid, libc::SIGSTOP);
    loop {
        let map = parent_map();
        let mut new = Vec::new();
        for p in &all {
            for c in map.get(p).into_iter().flatten() {
                if seen.insert(*c) {
                    new.push(*c);
                }
            }
        }
        if new.is_empty() {
            break;
        }
        for c in &new {
            signal(*c, libc::SIGSTOP);
        }
        all.extend(new);
    }
    for p in all.iter().rev() {
        signal(*p, libc::SIGKILL);
    }
}

/// Kill the tree of `child` and reap it.
fn kill_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        kill_tree(child.id());
    }
    let _ = child.wait();
    unregister(child.id());
}

// ---------------------------------------------------------------------------
// Addresses and ports

/// A loopback address no other test of this process gets: 127.0.0.10,
/// 127.0.0.11, … 127.0.0.254, then 127.0.1.1 … (the FTPS certificate covers
/// 127.0.0.0/24 and 127.0.1.0/24). For tests that [`block`] an address.
pub fn fresh_addr() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (b, c) = if n < 245 {
        (0, 10 + n)
    } else {
        (1 + (n - 245) / 254, 1 + (n - 245) % 254)
    };
    assert!(b < 2, "fresh_addr: out of addresses");
    format!("127.0.{b}.{c}")
}

/// `n` consecutive TCP ports free on `addr`, from a range no parallel test of
/// this process is handed again (20000–32000, starting at an offset derived
/// from the pid so that concurrent test processes rarely meet).
pub fn alloc_ports(addr: &str, n: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORT_MAX - PORT_MIN);
    let offset = (std::process::id() * 389) % span;
    for _ in 0..2000 {
        let k = NEXT.fetch_add(u32::from(n), Ordering::Relaxed);
        let base = PORT_MIN as u32 + (offset + k) % span;
        if base + u32::from(n) > u32::from(PORT_MAX) {
            continue;
        }
        let base = base as u16;
        if (base..base + n).all(|p| TcpListener::bind((addr, p)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} free consecutive ports on {addr} in {PORT_MIN}-{PORT_MAX}");
}

/// One free port on `addr` (see [`alloc_ports`]).
pub fn free_port(addr: &str) -> u16 {
    alloc_ports(addr, 1)
}

/// Connect to `addr:port` and read until `want` is seen at the start of what
/// the server says (`None` → connecting is enough).
fn banner_answers(addr: &str, port: u16, want: Option<&str>) -> bool {
    let Some(sa) = (addr, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_millis(300)) else {
        return false;
    };
    let Some(want) = want else { return true };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while buf.len() < want.len() {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    buf.starts_with(want.as_bytes())
}

// ---------------------------------------------------------------------------
// Test user and keys

/// The system user the servers log in: `dsp-test-<pid>`, shell /bin/bash, a
/// password (for SSH password auth and vsftpd's PAM), home under the harness
/// root. Created once per process; removed at exit.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub password: String,
    pub home: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

pub fn test_user() -> &'static TestUser {
    static USER: OnceLock<TestUser> = OnceLock::new();
    USER.get_or_init(|| {
        let pid = std::process::id();
        create_user(
            &format!("{USER_PREFIX}{pid}"),
            &format!("pw-{pid}-Tst"),
            || {
                let _ = USER_CREATED.set(());
            },
        )
    })
}

/// A new user of its own (`dsp-own-<pid>-<n>`): shell /bin/bash, a password,
/// home `<harness root>/home/<name>` (mode 0755, owned by it), the client
/// keys `ed25519` and `rsa` authorized, like [`test_user`]. For a server that
/// stands for a separate machine ([`SshOptions::own_user`]). Removed at exit.
pub fn own_user() -> TestUser {
    static N: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("{OWN_USER_PREFIX}{pid}-{n}");
    let keys = keys();
    let user = create_user(&name, &format!("pw-{pid}-{n}-Own"), || {
        own_users()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
    });
    write_file(
        &keys.authorized_keys_dir.join(&user.name),
        authorized_key_lines(&keys.ed25519, &keys.rsa).as_bytes(),
        0o644,
    );
    user
}

/// Create (or take over) the system user `name` with `password`; `created`
/// runs once it exists, to register it for removal at exit.
fn create_user(name: &str, password: &str, created: impl FnOnce()) -> TestUser {
    let root = harness_root();
    let home = root.join("home").join(name);
    fs::create_dir_all(&home).expect("create test user home");
    chmod(&root.join("home"), 0o755);
    // useradd/usermod take /etc/passwd.lock; another process may hold it for a moment
    poll_until(
        Duration::from_secs(20),
        &format!("useradd/usermod of {name}"),
        || {
            let exists = quiet(Command::new("id").arg("-u").arg(name)).is_some_and(|s| s.success());
            let status = if exists {
                quiet(Command::new(sbin("usermod")).args(["-d"]).arg(&home).args([
                    "-s",
                    "/bin/bash",
                    name,
                ]))
            } else {
                quiet(
                    Command::new(sbin("useradd"))
                        .args(["-M", "-U", "-d"])
                        .arg(&home)
                        .args(["-s", "/bin/bash", name]),
                )
            };
            status.is_some_and(|s| s.success()).then_some(())
        },
    );
    created();
    poll_until(
        Duration::from_secs(20),
        &format!("chpasswd of {name}"),
        || {
            let mut child = Command::new(sbin("chpasswd"))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run chpasswd");
            let _ = child
                .stdin
                .take()
                .expect("chpasswd stdin")
                .write_all(format!("{name}:{password}\n").as_bytes());
            child.wait().ok().filter(|s| s.success())
        },
    );
    let uid: u32 = run_ok(Command::new("id").arg("-u").arg(name))
        .trim()
        .parse()
        .expect("uid");
    let gid: u32 = run_ok(Command::new("id").arg("-g").arg(name))
        .trim()
        .parse()
        .expect("gid");
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown home");
    chmod(&home, 0o755);
    TestUser {
        name: name.to_string(),
        password: password.to_string(),
        home,
        uid,
        gid,
    }
}

/// The authorized_keys lines of the client keys `ed25519` and `rsa`.
fn authorized_key_lines(ed25519: &Path, rsa: &Path) -> String {
    [ed25519, rsa]
        .iter()
        .map(|k| fs::read_to_string(k.with_extension("pub")).expect("read public key"))
        .collect()
}

/// Client keys (no passphrase). `ed25519` and `rsa` (PEM format) are in the
/// test user's (and root's) authorized_keys; `unauthorized` is in nobody's.
#[derive(Debug)]
pub struct Keys {
    pub dir: PathBuf,
    pub ed25519: PathBuf,
    pub rsa: PathBuf,
    pub unauthorized: PathBuf,
    /// The directory sshd's `AuthorizedKeysFile DIR/%u` points into.
    pub authorized_keys_dir: PathBuf,
    /// The host key every server uses unless given another.
    pub host_ed25519: PathBuf,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let user = test_user();
        let dir = harness_root().join("keys");
        fs::create_dir_all(&dir).expect("create keys dir");
        chmod(&dir, 0o755);
        let gen = |file: &str, args: &[&str]| {
            let path = dir.join(file);
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-N", "", "-C", &format!("dispatch-test-{file}")])
                    .args(args)
                    .arg("-f")
                    .arg(&path),
            );
            path
        };
        let ed25519 = gen("client_ed25519", &["-t", "ed25519"]);
        let rsa = gen("client_rsa", &["-t", "rsa", "-b", "2048", "-m", "PEM"]);
        let unauthorized = gen("unauthorized_ed25519", &["-t", "ed25519"]);
        let host_ed25519 = gen("ssh_host_ed25519_key", &["-t", "ed25519"]);
        let authorized_keys_dir = harness_root().join("authorized_keys");
        let lines = authorized_key_lines(&ed25519, &rsa);
        write_file(
            &authorized_keys_dir.join(&user.name),
            lines.as_bytes(),
            0o644,
        );
        write_file(&authorized_keys_dir.join("root"), lines.as_bytes(), 0o644);
        chmod(&authorized_keys_dir, 0o755);
        Keys {
            dir,
            ed25519,
            rsa,
            unauthorized,
            authorized_keys_dir,
            host_ed25519,
        }
    })
}

/// A new ed25519 host key (private key path; `.pub` beside it), for tests of
/// a changed host key: `SshServer::start_with(addr, SshOptions { host_key: Some(new_host_key()), .. })`.
pub fn new_host_key() -> PathBuf {
    let path = unique_dir("hostkey").join("ssh_host_ed25519_key");
    run_ok(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-N",
                "",
                "-t",
                "ed25519",
                "-C",
                "dispatch-test-new-host-key",
                "-f",
            ])
            .arg(&path),
    );
    path
}

/// The `.pub` file of a private key, created with `ssh-keygen -y` if missing.
fn public_key_of(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_os_string();
    name.push(".pub");
    let public = PathBuf::from(name);
    if !public.exists() {
        let text = run_ok(Command::new("ssh-keygen").arg("-y").arg("-f").arg(private));
        write_file(&public, text.as_bytes(), 0o644);
    }
    public
}

// ---------------------------------------------------------------------------
// sshd

/// How an [`SshServer`] is set up. `SshOptions::default()` = the shared host
/// key, password auth on, nothing extra.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// Host private key to use; default: one ed25519 key shared by all servers.
    pub host_key: Option<PathBuf>,
    /// `PasswordAuthentication yes|no`; default true.
    pub password_auth: bool,
    /// sshd_config lines. Plain options win over the harness's (they are put
    /// first: sshd keeps the first value); lines from the first `Match` on go
    /// at the end.
    pub extra_config: String,
    /// Listen on this port instead of a free one (e.g. to share one port
    /// across addresses, or to take over a killed server's address).
    pub port: Option<u16>,
    /// Give the server a login user of its own ([`own_user`]: own name,
    /// home and password, the same client keys), as if it were a separate
    /// machine; only that user may log in (`AllowUsers`). Default false: the
    /// shared [`test_user`] (and root).
    pub own_user: bool,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            host_key: None,
            password_auth: true,
            extra_config: String::new(),
            port: None,
            own_user: false,
        }
    }
}

/// A real OpenSSH `sshd -D -e` on `addr:port`, killed (with its sessions) on drop.
#[derive(Debug)]
pub struct SshServer {
    pub addr: String,
    pub port: u16,
    pub host_key: PathBuf,
    pub host_key_pub: PathBuf,
    pub config: PathBuf,
    pub log_path: PathBuf,
    /// `Some` for a server with a login user of its own.
    own_user: Option<TestUser>,
    child: Option<Child>,
}

impl SshServer {
    pub fn start(addr: &str) -> SshServer {
        SshServer::start_with(addr, SshOptions::default())
    }

    /// A server standing for a separate machine: a login user of its own
    /// (see [`SshOptions::own_user`]), else like [`start`](Self::start).
    pub fn start_own_user(addr: &str) -> SshServer {
        SshServer::start_with(
            addr,
            SshOptions {
                own_user: true,
                ..Default::default()
            },
        )
    }

    /// The user to log in as on this server (name, password, home): its own
    /// user, or the shared [`test_user`].
    pub fn user(&self) -> &TestUser {
        self.own_user.as_ref().unwrap_or_else(|| test_user())
    }

    pub fn start_with(addr: &str, opts: SshOptions) -> SshServer {
        let keys = keys();
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        chmod(Path::new("/run/sshd"), 0o755);
        let dir = unique_dir("sshd");
        let host_key = opts
            .host_key
            .clone()
            .unwrap_or_else(|| keys.host_ed25519.clone());
        let host_key_pub = public_key_of(&host_key);
        let (before, matches) = split_at_match(&opts.extra_config);
        let own_user = opts.own_user.then(own_user);
        let allow = own_user
            .as_ref()
            .map(|u| format!("AllowUsers {}\n", u.name))
            .unwrap_or_default();
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = opts.port.unwrap_or_else(|| free_port(addr));
            let config = dir.join("sshd_config");
            let mut cfg = String::new();
            if !before.trim().is_empty() {
                let _ = writeln!(
                    cfg,
                    "# extra_config (first value wins in sshd_config)\n{before}"
                );
            }
            let _ = write!(
                cfg,
                "Port {port}
ListenAddress {addr}
HostKey {host_key}
PidFile {pidfile}
AuthorizedKeysFile {ak}/%u
StrictModes no
UsePAM no
PasswordAuthentication {pw}
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UseDNS no
PrintMotd no
MaxStartups 200:30:400
MaxSessions 100
LogLevel VERBOSE
SetEnv DISPATCH_TEST_HOST={addr}
{allow}{sftp}",
                host_key = host_key.display(),
                pidfile = dir.join("sshd.pid").display(),
                ak = keys.authorized_keys_dir.display(),
                pw = if opts.password_auth { "yes" } else { "no" },
                // sshd refuses a second Subsystem line: extra_config may bring its own
                sftp = if opts.extra_config.contains("Subsystem") {
                    ""
                } else {
                    "Subsystem sftp /usr/lib/openssh/sftp-server\n"
                },
            );
            if !matches.is_empty() {
                let _ = writeln!(cfg, "{matches}");
            }
            write_file(&config, cfg.as_bytes(), 0o644);
            let log_path = dir.join("sshd.log");
            let mut server = SshServer {
                addr: addr.to_string(),
                port,
                host_key: host_key.clone(),
                host_key_pub: host_key_pub.clone(),
                config,
                log_path,
                own_user: None,
                child: None,
            };
            match server.spawn() {
                Ok(()) => {
                    server.own_user = own_user;
                    return server;
                }
                Err(e) if e.contains("Address already in use") => last_err = e,
                Err(e) => panic!("sshd on {addr}:{port} did not start:\n{e}"),
            }
        }
        panic!("sshd on {addr} did not start (ports taken):\n{last_err}");
    }

    /// Start the process and poll for the banner. Err(log) if it exited.
    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::File::create(&self.log_path).expect("create sshd log");
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn /usr/sbin/sshd (apt-get install openssh-server)");
        register(child.id());
        self.child = Some(child);
        wait_for_banner(
            self.child.as_mut().expect("child"),
            &self.addr,
            self.port,
            Some("SSH-"),
            &self.log_path,
        )
    }

    /// `[addr]:port ssh-ed25519 AAAA…` for a known_hosts file.
    pub fn known_hosts_line(&self) -> String {
        let public = fs::read_to_string(&self.host_key_pub).expect("read host key .pub");
        let mut fields = public.split_whitespace();
        let kind = fields.next().unwrap_or("");
        let key = fields.next().unwrap_or("");
        format!("[{}]:{} {kind} {key}", self.addr, self.port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Pid of the listening sshd (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Stop now: SIGKILL the listener and every session it forked.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// Start again on the same address, port and config (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("sshd on {}:{} did not restart:\n{e}", self.addr, self.port);
        }
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- sshd {}:{} log ({}) -----\n{}-----",
                self.addr,
                self.port,
                self.log_path.display(),
                self.log()
            );
        }
        self.kill();
    }
}

/// Split sshd_config text at its first `Match` line.
fn split_at_match(text: &str) -> (String, String) {
    let mut before = String::new();
    let mut after = String::new();
    let mut in_match = false;
    for line in text.lines() {
        if line.trim_start().to_ascii_lowercase().starts_with("match ") {
            in_match = true;
        }
        let target = if in_match { &mut after } else { &mut before };
        target.push_str(line);
        target.push('\n');
    }
    (before, after)
}

/// Poll `addr:port` until it answers with `want` (or accepts, if `None`);
/// Err(log) if the child exits first; panics after [`START_TIMEOUT`].
fn wait_for_banner(
    child: &mut Child,
    addr: &str,
    port: u16,
    want: Option<&str>,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            unregister(child.id());
            return Err(format!(
                "exited with {status}; log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            ));
        }
        if banner_answers(addr, port, want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            kill_child(child);
            panic!(
                "{addr}:{port} did not answer {want:?} within {START_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20)); // poll step
    }
}

// ---------------------------------------------------------------------------
// Placements: every end-to-end scenario with an absolute and the default dest_dir

/// Where a scenario's deliveries go. [`scenario!`](crate::scenario) runs a
/// scenario once with each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The scenario's own absolute `dest_dir`, on hosts sharing [`test_user`].
    Explicit,
    /// No `dest_dir` key, i.e. the default `~/newcx/%Y%m%d_%H%M%S`, on hosts
    /// with users of their own (each like a separate machine): files land in
    /// `<host user's home>/newcx/<dated dir>/`.
    Defaults,
}

impl Placement {
    /// A server for this placement (own user under `Defaults`).
    pub fn start(self, addr: &str) -> SshServer {
        self.start_with(addr, SshOptions::default())
    }

    pub fn start_with(self, addr: &str, opts: SshOptions) -> SshServer {
        let own_user = opts.own_user || self == Placement::Defaults;
        SshServer::start_with(addr, SshOptions { own_user, ..opts })
    }

    /// The route line `dest_dir = TEMPLATE` (newline included), or nothing
    /// under `Defaults`.
    pub fn dest_dir_line(self, template: impl std::fmt::Display) -> String {
        match self {
            Placement::Explicit => format!("dest_dir = {template}\n"),
            Placement::Defaults => String::new(),
        }
    }

    /// Where `host` keeps what a route sends it: `explicit` (the directory
    /// the explicit `dest_dir` names, without its dated part), or
    /// `<host user's home>/newcx` under `Defaults`.
    pub fn root(self, host: &SshServer, explicit: impl AsRef<Path>) -> PathBuf {
        match self {
            Placement::Explicit => explicit.as_ref().to_path_buf(),
            Placement::Defaults => host.user().home.join("newcx"),
        }
    }
}

/// Every delivered copy of `name` below `root`: `root/name` and
/// `root/<dir>/name` (one per dated dir), sorted.
pub fn delivered_copies(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let direct = root.join(name);
    if direct.is_file() {
        out.push(direct);
    }
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path().join(name);
            if e.path().is_dir() && p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The contents of `name` in each directory right below `remote` (one per
/// dated dir it was delivered to).
pub fn copies(remote: &Path, name: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(remote) {
        for e in rd.flatten() {
            if let Ok(b) = fs::read(e.path().join(name)) {
                out.push(b);
            }
        }
    }
    out
}

/// Install markers `name.installed` written completely (sha256sum's line
/// ends with "\n"), in the directories right below `remote`.
pub fn installed(remote: &Path, name: &str) -> usize {
    copies(remote, &format!("{name}.installed"))
        .iter()
        .filter(|m| m.ends_with(b"\n"))
        .count()
}

/// Wait (bounded poll) until `name` was installed `n` times below `remote`.
pub fn wait_installed(remote: &Path, name: &str, n: usize, limit: Duration) {
    poll_until(limit, &format!("{name} installed {n}×"), || {
        (installed(remote, name) >= n).then_some(())
    });
}

/// An end-to-end scenario `fn NAME(p: Placement) { … }`, defined as a module
/// `NAME` holding two tests: `with_an_absolute_dest_dir_and_the_shared_user`
/// ([`Placement::Explicit`]) and
/// `with_the_default_dest_dir_on_hosts_with_their_own_users`
/// ([`Placement::Defaults`]). The body sees the enclosing module's items.
#[macro_export]
macro_rules! scenario {
    ($(#[$attr:meta])* fn $name:ident($p:ident: Placement) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::servers::Placement;

            fn run($p: Placement) $body

            #[test]
            fn with_an_absolute_dest_dir_and_the_shared_user() {
                run(Placement::Explicit)
            }

            #[test]
            fn with_the_default_dest_dir_on_hosts_with_their_own_users() {
                run(Placement::Defaults)
            }
        }
    };
}

// ---------------------------------------------------------------------------
// vsftpd

/// How an [`FtpServer`] is set up. Default: plain FTP only, `ssl_reuse` true
/// (vsftpd's default, matters once `tls` is on), explicit (not implicit) TLS.
#[derive(Debug, Clone)]
pub struct FtpOptions {
    /// `ssl_enable=YES` with TLS optional: plain and `AUTH TLS` both work.
    pub tls: bool,
    /// `require_ssl_reuse` (vsftpd's default YES): the data channel must
    /// resume the control channel's TLS session.
    pub ssl_reuse: bool,
    /// `implicit_ssl=YES`: TLS from the first byte (implies `tls`).
    pub implicit_tls: bool,
    /// vsftpd.conf lines appended last (a later value wins).
    pub extra_config: String,
}

impl Default for FtpOptions {
    fn default() -> Self {
        FtpOptions {
            tls: false,
            ssl_reuse: true,
            implicit_tls: false,
            extra_config: String::new(),
        }
    }
}

/// The FTPS certificate (self-signed, CA:FALSE, IP SANs for 127.0.0.0/24 and
/// 127.0.1.0/24): `(cert, key)`. Trust `cert` itself as the root.
pub fn ftp_cert() -> &'static (PathBuf, PathBuf) {
    static CERT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    CERT.get_or_init(|| {
        let dir = harness_root().join("ftp-cert");
        fs::create_dir_all(&dir).expect("mkdir ftp-cert");
        chmod(&dir, 0o755);
        let cert = dir.join("ftp.crt");
        let key = dir.join("ftp.key");
        let mut san = String::from("subjectAltName=DNS:localhost");
        for b in 0..2 {
            for c in 1..=254 {
                let _ = write!(san, ",IP:127.0.{b}.{c}");
            }
        }
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .args(["-addext", &san])
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .args(["-addext", "extendedKeyUsage=serverAuth"]),
        );
        chmod(&key, 0o600);
        chmod(&cert, 0o644);
        (cert, key)
    })
}

/// A real `vsftpd` in the foreground on `addr:port`, passive ports
/// `pasv_min..=pasv_max` on the same address; killed on drop.
#[derive(Debug)]
pub struct FtpServer {
    pub addr: String,
    pub port: u16,
    pub pasv_min: u16,
    pub pasv_max: u16,
    /// The server certificate, to trust as a root (FTPS only).
    pub ca_cert: PathBuf,
    pub config: PathBuf,
    /// vsftpd's protocol/transfer log (`log_ftp_protocol=YES`).
    pub log_path: PathBuf,
    /// What vsftpd wrote to fd 0/1/2 (startup errors: "500 OOPS: …").
    pub out_path: PathBuf,
    implicit_tls: bool,
    child: Option<Child>,
}

impl FtpServer {
    pub fn start(addr: &str) -> FtpServer {
        FtpServer::start_with(addr, FtpOptions::default())
    }

    pub fn start_with(addr: &str, opts: FtpOptions) -> FtpServer {
        let _ = test_user();
        let (cert, key) = ftp_cert();
        fs::create_dir_all("/var/run/vsftpd/empty").expect("mkdir /var/run/vsftpd/empty");
        let dir = unique_dir("vsftpd");
        let tls = opts.tls || opts.implicit_tls;
        let yes = |b: bool| if b { "YES" } else { "NO" };
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port(addr);
            let pasv_min = alloc_ports(addr, PASV_PORTS);
            let pasv_max = pasv_min + PASV_PORTS - 1;
            let config = dir.join("vsftpd.conf");
            let log_path = dir.join("vsftpd.log");
            let out_path = dir.join("vsftpd.out");
            let mut cfg = format!(
                "listen=YES
listen_ipv6=NO
listen_address={addr}
listen_port={port}
background=NO
anonymous_enable=NO
local_enable=YES
write_enable=YES
local_umask=022
pasv_enable=YES
pasv_min_port={pasv_min}
pasv_max_port={pasv_max}
pasv_address={addr}
connect_from_port_20=NO
secure_chroot_dir=/var/run/vsftpd/empty
pam_service_name=vsftpd
seccomp_sandbox=NO
xferlog_enable=YES
vsftpd_log_file={log}
log_ftp_protocol=YES
ssl_enable={tls}
",
                log = log_path.display(),
                tls = yes(tls),
            );
            if tls {
                let _ = write!(
                    cfg,
                    "rsa_cert_file={}
rsa_private_key_file={}
allow_anon_ssl=NO
force_local_logins_ssl=NO
force_local_data_ssl=NO
require_ssl_reuse={}
implicit_ssl={}
ssl_ciphers=HIGH
",
                    cert.display(),
                    key.display(),
                    yes(opts.ssl_reuse),
                    yes(opts.implicit_tls),
                );
            }
            if !opts.extra_config.trim().is_empty() {
                let _ = writeln!(cfg, "{}", opts.extra_config);
            }
            // vsftpd insists on a root-owned config (we are root)
            write_file(&config, cfg.as_bytes(), 0o600);
            let mut server = FtpServer {
                addr: addr.to_string(),
                port,
                pasv_min,
                pasv_max,
                ca_cert: cert.clone(),
                config,
                log_path,
                out_path,
                implicit_tls: opts.implicit_tls,
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) if e.contains("Address already in use") || e.contains("could not bind") => {
                    last_err = e
                }
                Err(e) => panic!("vsftpd on {addr}:{port} did not start:\n{e}"),
            }
        }
        panic!("vsftpd on {addr} did not start (ports taken):\n{last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        // vsftpd writes startup errors to fd 0: give it the .out file read-write there
        let out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.out_path)
            .expect("create vsftpd.out");
        let child = Command::new(sbin("vsftpd"))
            .arg(&self.config)
            .stdin(out.try_clone().expect("dup"))
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn vsftpd (apt-get install vsftpd)");
        register(child.id());
        self.child = Some(child);
        let want = if self.implicit_tls { None } else { Some("220") };
        let res = wait_for_banner(
            self.child.as_mut().expect("child"),
            &self.addr,
            self.port,
            want,
            &self.out_path,
        );
        res.map_err(|e| format!("{e}\nvsftpd.log:\n{}", self.log()))
    }

    /// The protocol log plus anything vsftpd printed.
    pub fn log(&self) -> String {
        let out = fs::read_to_string(&self.out_path).unwrap_or_default();
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        if out.is_empty() {
            log
        } else {
            format!("{out}\n{log}")
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Stop now: SIGKILL vsftpd and its session processes.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// Start again with the same ports and config.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!(
                "vsftpd on {}:{} did not restart:\n{e}",
                self.addr, self.port
            );
        }
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- vsftpd {}:{} log ({}) -----\n{}-----",
                self.addr,
                self.port,
                self.log_path.display(),
                self.log()
            );
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Failure injection

struct NftState {
    table_made: bool,
    rules: usize,
}

fn nft_state() -> &'static Mutex<NftState> {
    static S: OnceLock<Mutex<NftState>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(NftState {
            table_made: false,
            rules: 0,
        })
    })
}

fn nft_table() -> String {
    format!("{NFT_PREFIX}{}", std::process::id())
}

/// While alive, TCP packets to `addr` on `ports` (all TCP ports if empty) are
/// dropped: connects time out, established connections stall. Dropping the
/// guard removes exactly its rule.
#[derive(Debug)]
pub struct Blocked {
    pub addr: String,
    pub ports: Vec<u16>,
    handle: u64,
}

pub fn block(addr: &str, ports: &[u16]) -> Blocked {
    let _ = harness_root(); // registers the exit cleanup that deletes the table
    let table = nft_table();
    let mut st = nft_state().lock().unwrap_or_else(|e| e.into_inner());
    if !st.table_made {
        run_ok(Command::new(sbin("nft")).args(["add", "table", "inet", &table]));
        run_ok(Command::new(sbin("nft")).args([
            "add",
            "chain",
            "inet",
            &table,
            "input",
            "{ type filter hook input priority -10; policy accept; }",
        ]));
        st.table_made = true;
    }
    let mut rule = vec!["ip".to_string(), "daddr".to_string(), addr.to_string()];
    if ports.is_empty() {
        rule.extend(["meta", "l4proto", "tcp"].map(String::from));
    } else {
        let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        rule.extend([
            "tcp".to_string(),
            "dport".to_string(),
            format!("{{ {} }}", list.join(", ")),
        ]);
    }
    rule.push("drop".to_string());
    let out = run_ok(
        Command::new(sbin("nft"))
            .args(["--echo", "--handle", "add", "rule", "inet", &table, "input"])
            .args(&rule),
    );
    let handle = out
        .lines()
        .find_map(|l| {
            l.rsplit_once("# handle ")
                .and_then(|(_, h)| h.trim().parse::<u64>().ok())
        })
        .unwrap_or_else(|| panic!("no rule handle in nft output: {out}"));
    st.rules += 1;
    Blocked {
        addr: addr.to_string(),
        ports: ports.to_vec(),
        handle,
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let table = nft_table();
        let mut st = nft_state().lock().unwrap_or_else(|e| e.into_inner());
        let handle = self.handle.to_string();
        let delete = ["delete", "rule", "inet", &table, "input", "handle", &handle];
        // a failed delete would leave the address blocked for the rest of the run: retry, then say so
        let deleted = (0..5)
            .any(|_| quiet(Command::new(sbin("nft")).args(delete)).is_some_and(|s| s.success()));
        if !deleted {
            eprintln!(
                "servers: could not remove nft rule {handle} (block of {} {:?}) from table inet {table}",
                self.addr, self.ports
            );
        }
        st.rules = st.rules.saturating_sub(1);
        if st.rules == 0 && st.table_made {
            let _ = quiet(Command::new(sbin("nft")).args(["delete", "table", "inet", &table]));
            st.table_made = false;
        }
    }
}

/// A listener on `addr` that completes TCP handshakes (kernel backlog) but
/// never accepts or says a word: an SSH/FTP client waiting for a banner must
/// time out. Keep the listener alive as long as needed.
pub fn silent_server(addr: &str) -> (TcpListener, u16) {
    let listener = TcpListener::bind((addr, 0)).unwrap_or_else(|e| panic!("bind {addr}:0: {e}"));
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

// ---------------------------------------------------------------------------
// ssh-agent

/// An `ssh-agent -D` on its own socket, holding one key; killed on drop.
/// Give it to dispatch with `.env("SSH_AUTH_SOCK", &agent.sock)`.
#[derive(Debug)]
pub struct Agent {
    pub sock: PathBuf,
    child: Child,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub fn start_agent(key: &Path) -> Agent {
    let sock = unique_dir("agent").join("agent.sock");
    let child = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssh-agent");
    register(child.id());
    let agent = Agent { sock, child };
    // the socket file appears at bind(), before listen(): wait until it accepts
    poll_until(
        Duration::from_secs(10),
        "ssh-agent socket accepting",
        || {
            std::os::unix::net::UnixStream::connect(&agent.sock)
                .ok()
                .map(drop)
        },
    );
    run_ok(
        Command::new("ssh-add")
            .arg("-q")
            .arg(key)
            .env("SSH_AUTH_SOCK", &agent.sock),
    );
    agent
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Workspace and the dispatch binary

/// A per-test directory (removed on drop, kept and printed if the test
/// panicked). It is `HOME` and the working directory of the `dispatch` runs.
#[derive(Debug)]
pub struct Workspace {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace::new()
    }
}

impl Workspace {
    pub fn new() -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("ws-")
            .tempdir_in(harness_root())
            .expect("create workspace");
        let path = dir.path().to_path_buf();
        chmod(&path, 0o755);
        Workspace {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<ws>/dispatch.ini`, mode 0600 (found by default: it is in the cwd).
    pub fn write_config(&self, text: &str) -> PathBuf {
        let p = self.path.join("dispatch.ini");
        write_file(&p, text.as_bytes(), 0o600);
        p
    }

    /// A local package `<ws>/pkgs/<name>` (any name without `/`: spaces,
    /// quotes, newlines, non-ASCII are fine), mode 0644.
    pub fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        assert!(
            !name.contains('/') && !name.is_empty(),
            "package name {name:?} must be a base name"
        );
        let p = self.path.join("pkgs").join(name);
        write_file(&p, content, 0o644);
        chmod(&self.path.join("pkgs"), 0o755);
        p
    }

    /// `<ws>/.ssh/known_hosts` (the default `~/.ssh/known_hosts` of the runs)
    /// trusting these servers; replaces the file.
    pub fn known_hosts(&self, servers: &[&SshServer]) -> PathBuf {
        let dir = self.path.join(".ssh");
        fs::create_dir_all(&dir).expect("mkdir .ssh");
        chmod(&dir, 0o700);
        let p = dir.join("known_hosts");
        let text: String = servers
            .iter()
            .map(|s| format!("{}\n", s.known_hosts_line()))
            .collect();
        write_file(&p, text.as_bytes(), 0o644);
        p
    }

    /// `<ws>/.netrc` (the default `~/.netrc` of the runs), mode 0600.
    pub fn netrc(&self, text: &str) -> PathBuf {
        let p = self.path.join(".netrc");
        write_file(&p, text.as_bytes(), 0o600);
        p
    }

    /// A directory `<ws>/remote/<name>` owned by the test user, mode 0755: a
    /// `dest_dir` (or parent of one) the servers' user can write.
    pub fn remote_dir(&self, name: &str) -> PathBuf {
        let parent = self.path.join("remote");
        fs::create_dir_all(&parent).expect("mkdir remote");
        chmod(&parent, 0o755);
        let p = parent.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        chmod(&p, 0o755);
        chown_to_test_user(&p);
        p
    }

    /// The real `dispatch` binary, with `HOME` and cwd = this workspace,
    /// `SSH_AUTH_SOCK` and `XDG_*` removed.
    pub fn dispatch(&self) -> DispatchCmd {
        DispatchCmd::new(&self.path)
    }

    /// `dispatch -c CFG FILES…`, the plain sending run.
    pub fn send<S: AsRef<OsStr>>(&self, cfg: &Path, files: &[S]) -> DispatchCmd {
        self.dispatch().arg("-c").arg(cfg).args(files)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let _ = KEEP_ROOT.set(());
                let kept = dir.keep();
                eprintln!("----- workspace kept: {} -----", kept.display());
            }
        }
    }
}

/// A run of the `dispatch` binary being built (by value: chain the calls).
#[derive(Debug, Clone)]
#[must_use]
pub struct DispatchCmd {
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    cwd: PathBuf,
    /// Run on a pseudo-terminal (util-linux `script`): its stdout and
    /// stderr both arrive, as the terminal got them, in `stdout`.
    pty: bool,
}

/// How a run ended. `status` is `None` if it was killed by a signal.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The command line, for messages.
    pub command: String,
}

impl DispatchCmd {
    fn new(home: &Path) -> DispatchCmd {
        let mut envs: Vec<(OsString, Option<OsString>)> = vec![(
            OsString::from("HOME"),
            Some(home.as_os_str().to_os_string()),
        )];
        for k in [
            "SSH_AUTH_SOCK",
            "XDG_CONFIG_HOME",
            "XDG_STATE_HOME",
            "XDG_DATA_HOME",
            "XDG_CACHE_HOME",
        ] {
            envs.push((OsString::from(k), None));
        }
        DispatchCmd {
            args: Vec::new(),
            envs,
            stdin: None,
            timeout: RUN_TIMEOUT,
            cwd: home.to_path_buf(),
            pty: false,
        }
    }

    /// Run it on a terminal (see [`DispatchCmd::pty`]).
    pub fn on_a_terminal(mut self) -> Self {
        self.pty = true;
        self
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((k.as_ref().to_os_string(), Some(v.as_ref().to_os_string())));
        self
    }

    pub fn env_remove(mut self, k: impl AsRef<OsStr>) -> Self {
        self.envs.push((k.as_ref().to_os_string(), None));
        self
    }

    /// Bytes fed to stdin (default: stdin is /dev/null).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Kill the run and panic after this long (default 120 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = dir.as_ref().to_path_buf();
        self
    }

    fn describe(&self) -> String {
        let mut s = String::from("dispatch");
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty()
                || a.contains(|c: char| c.is_whitespace() || "'\"\\$;&|<>*?()[]{}`~#".contains(c))
            {
                let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
            } else {
                let _ = write!(s, " {a}");
            }
        }
        s
    }

    fn command(&self) -> Command {
        let bin = env!("CARGO_BIN_EXE_dispatch");
        let mut cmd = if self.pty {
            let quote = |a: &OsStr| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''"));
            let mut line = quote(OsStr::new(bin));
            for a in &self.args {
                line.push(' ');
                line.push_str(&quote(a));
            }
            let mut c = Command::new("script");
            c.args(["-q", "-e", "-c"]).arg(line).arg("/dev/null");
            c
        } else {
            let mut c = Command::new(bin);
            c.args(&self.args);
            c
        };
        cmd.current_dir(&self.cwd);
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd
    }

    /// Run to completion (bounded by the timeout: on expiry the process is
    /// killed and the test panics with what it printed so far).
    #[track_caller]
    pub fn run(self) -> RunResult {
        let described = self.describe();
        let start = Instant::now();
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {described}: {e}"));
        register(child.id());
        if let (Some(bytes), Some(mut sin)) = (self.stdin.clone(), child.stdin.take()) {
            thread::spawn(move || {
                let _ = sin.write_all(&bytes);
            });
        }
        let collect = |r: Option<Box<dyn Read + Send>>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = collect(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = collect(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let deadline = start + self.timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for dispatch") {
                break Some(st);
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                break None;
            }
            thread::sleep(Duration::from_millis(10)); // poll step
        };
        unregister(child.id());
        let elapsed = start.elapsed();
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        let Some(status) = status else {
            panic!(
                "{described}: still running after {:?}, killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                self.timeout
            );
        };
        RunResult {
            status: status.code(),
            stdout,
            stderr,
            elapsed,
            command: described,
        }
    }

    /// Start in the background (for `dispatch watch`): output goes to files
    /// readable while it runs; killed on drop.
    pub fn spawn(self) -> DispatchChild {
        let described = self.describe();
        let dir = unique_dir("run");
        let out_path = dir.join("stdout");
        let err_path = dir.join("stderr");
        let mut child = self
            .command()
            .stdout(fs::File::create(&out_path).expect("create stdout file"))
            .stderr(fs::File::create(&err_path).expect("create stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {described}: {e}"));
        register(child.id());
        if let (Some(bytes), Some(mut sin)) = (self.stdin.clone(), child.stdin.take()) {
            thread::spawn(move || {
                let _ = sin.write_all(&bytes);
            });
        }
        DispatchChild {
            child: Some(child),
            out_path,
            err_path,
            start: Instant::now(),
            command: described,
        }
    }
}

impl RunResult {
    /// Panic, showing the command, status, stdout and stderr, unless the exit
    /// code is `code`.
    #[track_caller]
    pub fn assert_code(self, code: i32) -> Self {
        if self.status != Some(code) {
            panic!("expected exit code {code}, got {:?}\n{self}", self.status);
        }
        self
    }

    #[track_caller]
    pub fn assert_success(self) -> Self {
        self.assert_code(0)
    }

    /// stdout and stderr together (for searching either).
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.command, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// A `dispatch` running in the background.
#[derive(Debug)]
pub struct DispatchChild {
    child: Option<Child>,
    out_path: PathBuf,
    err_path: PathBuf,
    start: Instant,
    pub command: String,
}

impl DispatchChild {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Send a signal (`libc::SIGHUP`, `libc::SIGTERM`, …).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            signal(c.id(), sig);
        }
    }

    /// What it printed so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    /// Poll until stdout or stderr contains `needle`; panics (with the output)
    /// after `timeout`.
    #[track_caller]
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: no {needle:?} in its output after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.command,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10)); // poll step
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait for it to exit; kill it and panic after `timeout`.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> RunResult {
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for dispatch") {
                break Some(st);
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                break None;
            }
            thread::sleep(Duration::from_millis(10)); // poll step
        };
        unregister(child.id());
        let Some(status) = status else {
            panic!(
                "{}: did not exit within {timeout:?}, killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.command,
                self.stdout(),
                self.stderr()
            );
        };
        RunResult {
            status: status.code(),
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.start.elapsed(),
            command: self.command.clone(),
        }
    }

    /// SIGKILL it (and what it started) now; what it printed.
    pub fn kill(mut self) -> RunResult {
        let mut child = self.child.take().expect("child");
        kill_child(&mut child);
        let status = child.wait().ok().and_then(|s| s.code());
        RunResult {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.start.elapsed(),
            command: self.command.clone(),
        }
    }
}

impl Drop for DispatchChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if thread::panicking() {
                eprintln!(
                    "----- {} (pid {}) -----\n--- stdout ---\n{}\n--- stderr ---\n{}\n-----",
                    self.command,
                    c.id(),
                    self.stdout(),
                    self.stderr()
                );
            }
            kill_child(&mut c);
        }
    }
}

/// The `--json` file × host results of a dispatch run (not the records of
/// inputs that were never sent, nor the summary).
pub fn results(stdout: &str) -> Vec<serde_json::Value> {
    json_lines(stdout)
        .into_iter()
        .filter(|v| v.get("host").is_some_and(|h| !h.is_null()))
        .collect()
}

/// Every record of a `--json` run, one per line: the file × host results,
/// the records of inputs that were not sent (`host: null`) and the closing
/// `{"summary": …}` — the events between them left out (see [`json_events`]).
pub fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    all_json(stdout)
        .into_iter()
        .filter(|v| v.get("event").is_none())
        .collect()
}

/// The `{"event": …}` objects of a `--json` run, in order.
pub fn json_events(stdout: &str) -> Vec<serde_json::Value> {
    all_json(stdout)
        .into_iter()
        .filter(|v| v.get("event").is_some())
        .collect()
}

fn all_json(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The result for `file` among `res`.
pub fn one<'a>(res: &'a [serde_json::Value], file: &str) -> &'a serde_json::Value {
    res.iter()
        .find(|v| v["file"] == file)
        .unwrap_or_else(|| panic!("no result for {file}: {res:?}"))
}

// ---------------------------------------------------------------------------
// Proof of the own-user servers, with the stock `ssh` client

/// `n` sshd hosts on fresh loopback addresses sharing one port (a route
/// has one `port`); `own_user`: each with a user of its own.
pub fn hosts_on_one_port(n: usize, own_user: bool) -> Vec<SshServer> {
    let first = SshServer::start_with(
        &fresh_addr(),
        SshOptions {
            own_user,
            ..Default::default()
        },
    );
    let port = first.port;
    let mut hosts = vec![first];
    for _ in 1..n {
        hosts.push(SshServer::start_with(
            &fresh_addr(),
            SshOptions {
                port: Some(port),
                own_user,
                ..Default::default()
            },
        ));
    }
    hosts
}

/// A `dispatch watch` setup: one sshd host with a user of its own (the
/// default dest_dir), a drop dir, and a config whose `[dispatch]` has a
/// private state dir, short settle, one attempt and `settings`, and one
/// route `[section]` to the host with `install`.
pub struct OneHostDaemon {
    pub ws: Workspace,
    pub sshd: SshServer,
    pub drop: PathBuf,
    /// `<host user's home>/newcx`.
    pub root: PathBuf,
    pub cfg: PathBuf,
}

impl OneHostDaemon {
    pub fn new(section: &str, install: &str, settings: &str) -> OneHostDaemon {
        let ws = Workspace::new();
        let sshd = SshServer::start_own_user(&fresh_addr());
        let kh = ws.known_hosts(&[&sshd]);
        let drop = ws.path().join("drop");
        fs::create_dir_all(&drop).unwrap();
        let cfg = ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\nsettle = 500ms\nrescan = 5s\nmax_attempts = 1\n{settings}\n\n\
             [{section}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nconnect_timeout = 3s\ninstall_command = {install}\n",
            ws.path().join("state").display(),
            sshd.addr,
            sshd.port,
            sshd.user().name,
            keys().ed25519.display(),
            kh.display(),
        ));
        OneHostDaemon {
            root: sshd.user().home.join("newcx"),
            ws,
            sshd,
            drop,
            cfg,
        }
    }
}

#[cfg(test)]
mod own_user_proof {
    use super::*;

    /// `ssh -l USER` with the ed25519 client key; (success, stdout).
    fn ssh_as(server: &SshServer, ws: &Workspace, user: &str, remote: &str) -> (bool, String) {
        let kh = ws.known_hosts(&[server]);
        let out = Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-i"])
            .arg(&keys().ed25519)
            .args([
                "-p",
                &server.port.to_string(),
                "-l",
                user,
                &server.addr,
                remote,
            ])
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn servers_with_their_own_users_log_in_to_separate_homes_and_refuse_the_shared_user() {
        let ws = Workspace::new();
        let a = SshServer::start_own_user(&fresh_addr());
        let b = SshServer::start_own_user(&fresh_addr());
        let plain = SshServer::start(&fresh_addr());
        assert_ne!(a.user().name, b.user().name);
        assert_ne!(a.user().home, b.user().home);
        assert_eq!(plain.user().name, test_user().name);
        for s in [&a, &b] {
            let (ok, out) = ssh_as(s, &ws, &s.user().name, "id -un; echo $HOME");
            assert!(ok, "{}", s.log());
            assert_eq!(
                out,
                format!("{}\n{}\n", s.user().name, s.user().home.display())
            );
            let (ok, _) = ssh_as(s, &ws, &test_user().name, "true");
            assert!(!ok, "the shared test user logged in to an own-user server");
        }
        let (ok, _) = ssh_as(&plain, &ws, &test_user().name, "true");
        assert!(ok, "{}", plain.log());
        assert!(own_users()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&a.user().name));
    }
}
