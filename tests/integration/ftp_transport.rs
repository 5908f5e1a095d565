//! The FTP transport (`dispatch::transport::ftp`) called directly, against a
//! real vsftpd on loopback: plain, explicit and implicit FTPS, `mkdir -p`,
//! refusals, and the deadlines (blocked host, stalled transfer, silent server).
//! TLS by default (`ftps = auto`): plain FTP only with `cleartext` allowed.
//! Temporary names chosen by the caller, positional reads, permission bits.

use std::fs;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dispatch::config::{Ftps, Secret};
use dispatch::transport::ftp::{temp_name, FtpSession, FtpTarget, FtpUpload};
use dispatch::transport::{ErrorKind, TransferError};

use crate::servers::{self, FtpOptions, FtpServer, Workspace};

/// Timing slack for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

/// Connection settings for the test user on `addr:port`.
struct Login {
    host: String,
    port: u16,
    password: Secret,
    ftps: Ftps,
    ca_file: Option<PathBuf>,
    passive: bool,
    rename: bool,
    cleartext: bool,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl Login {
    fn to(host: &str, port: u16) -> Login {
        Login {
            host: host.to_string(),
            port,
            password: Secret::new(servers::test_user().password.clone()),
            ftps: Ftps::Auto,
            ca_file: None,
            passive: true,
            rename: true,
            cleartext: false,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }

    fn server(ftp: &FtpServer) -> Login {
        Login::to(&ftp.addr, ftp.port)
    }

    /// `ftp_cleartext = yes`: a server without TLS may be used.
    fn plain(mut self) -> Login {
        self.cleartext = true;
        self
    }

    fn tls(mut self, ftps: Ftps, ca: &Path) -> Login {
        self.ftps = ftps;
        self.ca_file = Some(ca.to_path_buf());
        self
    }

    fn target(&self) -> FtpTarget<'_> {
        FtpTarget {
            host: &self.host,
            port: self.port,
            login: &servers::test_user().name,
            password: Some(&self.password),
            account: None,
            ftps: self.ftps,
            ca_file: self.ca_file.as_deref(),
            passive: self.passive,
            rename: self.rename,
            cleartext: self.cleartext,
            connect_timeout: self.connect_timeout,
            io_timeout: self.io_timeout,
        }
    }

    fn connect(&self) -> Result<FtpSession, TransferError> {
        FtpSession::connect(&self.target())
    }

    fn session(&self, ftp: &FtpServer) -> FtpSession {
        self.connect()
            .unwrap_or_else(|e| panic!("connect: {e}\n{}", ftp.log()))
    }
}

/// `n` pseudo-random bytes (xorshift; every byte value occurs, LF and CR included).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Upload `local` the way the caller in job.rs does: open it, measure it,
/// take its mode, pass `tmp` as the temporary name.
fn send_as(
    s: &mut FtpSession,
    local: &Path,
    dir: &str,
    tmp: &str,
    name: &str,
) -> Result<FtpUpload, TransferError> {
    let f = fs::File::open(local).expect("open the local file");
    let m = f.metadata().expect("stat the local file");
    let src = dispatch::transport::Source {
        file: &f,
        size: m.len(),
        mode: m.permissions().mode() & 0o7777,
    };
    // progress is reported in order, and the last report is the whole file
    let mut seen: Vec<u64> = Vec::new();
    let r = s.upload(src, dir, tmp, name, &mut |n| seen.push(n));
    if let Ok(u) = &r {
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        if u.bytes > 0 {
            assert_eq!(seen.last(), Some(&u.bytes), "{seen:?}");
        }
    }
    r
}

/// [`send_as`] with a fresh temporary name.
fn send(
    s: &mut FtpSession,
    local: &Path,
    dir: &str,
    name: &str,
) -> Result<FtpUpload, TransferError> {
    send_as(s, local, dir, &temp_name(), name)
}

fn upload_ok(
    s: &mut FtpSession,
    ftp: &FtpServer,
    local: &Path,
    dir: &str,
    name: &str,
) -> FtpUpload {
    send(s, local, dir, name)
        .unwrap_or_else(|e| panic!("upload {name} to {dir}: {e}\n{}", ftp.log()))
}

/// Names in `dir` (empty if it does not exist).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A root-owned directory the test user can read but not write.
fn read_only_dir(ws: &Workspace, name: &str) -> PathBuf {
    let p = ws.path().join(name);
    fs::create_dir_all(&p).expect("mkdir read-only dir");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

#[test]
fn uploads_a_20_mb_random_file_byte_identical_into_nested_new_directories() {
    let ws = Workspace::new();
    let ftp = FtpServer::start("127.0.0.2");
    let remote = ws.remote_dir("ftp-big");
    let data = random_bytes(20_000_000, 7);
    let local = ws.file("big-1.0.tar.gz", &data);
    let dir = format!("{}/a/b/c", remote.display());

    let mut s = Login::server(&ftp).plain().session(&ftp);
    let up = upload_ok(&mut s, &ftp, &local, &dir, "big-1.0.tar.gz");
    s.quit();

    assert_eq!(up.bytes, 20_000_000);
    assert_eq!(up.remote_path, format!("{dir}/big-1.0.tar.gz"));
    let got = fs::read(remote.join("a/b/c/big-1.0.tar.gz")).expect("uploaded file");
    assert!(
        got == data,
        "content differs (size {} vs {})",
        got.len(),
        data.len()
    );
    assert_eq!(listing(&remote.join("a/b/c")), vec!["big-1.0.tar.gz"]);
    assert!(ftp.log().contains("TYPE I"), "{}", ftp.log());
}

#[test]
fn a_home_relative_dir_is_created_below_the_login_directory_and_reused() {
    let ws = Workspace::new();
    let ftp = FtpServer::start("127.0.0.3");
    let home = &servers::test_user().home;
    let unique = format!("ftp-rel-{}", std::process::id());
    let one = ws.file("one.zip", b"first\n");
    let two = ws.file("two.zip", b"second\r\n");

    let mut s = Login::server(&ftp).plain().session(&ftp);
    let a = upload_ok(
        &mut s,
        &ftp,
        &one,
        &format!("~/{unique}/20261122_101500"),
        "one.zip",
    );
    // same dir again, then a sibling below an existing parent, then the same name again
    upload_ok(
        &mut s,
        &ftp,
        &two,
        &format!("~/{unique}/20261122_101500"),
        "two.zip",
    );
    upload_ok(&mut s, &ftp, &two, &format!("{unique}/other"), "two.zip");
    upload_ok(&mut s, &ftp, &one, &format!("{unique}/other"), "two.zip");
    s.quit();

    let base = home.join(&unique);
    assert_eq!(
        a.remote_path,
        format!("{}/20261122_101500/one.zip", base.display())
    );
    assert_eq!(
        fs::read(base.join("20261122_101500/one.zip")).unwrap(),
        b"first\n"
    );
    assert_eq!(
        fs::read(base.join("20261122_101500/two.zip")).unwrap(),
        b"second\r\n"
    );
    assert_eq!(
        fs::read(base.join("other/two.zip")).unwrap(),
        b"first\n",
        "overwritten"
    );
    assert_eq!(listing(&base.join("other")), vec!["two.zip"]);
    let _ = fs::remove_dir_all(&base);
}

#[test]
fn uploads_over_explicit_ftps_with_vsftpd_default_session_reuse() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        "127.0.0.4",
        FtpOptions {
            tls: true,
            ssl_reuse: true,
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("ftps-explicit");
    let data = random_bytes(3_000_000, 11);
    let local = ws.file("tls.bin", &data);
    let dir = remote.display().to_string();

    let mut s = Login::server(&ftp)
        .tls(Ftps::Explicit, &ftp.ca_cert)
        .session(&ftp);
    upload_ok(&mut s, &ftp, &local, &dir, "tls.bin");
    // a second data connection in the same session must resume the TLS session too
    upload_ok(&mut s, &ftp, &local, &dir, "tls2.bin");
    s.quit();

    assert!(fs::read(remote.join("tls.bin")).unwrap() == data);
    assert!(fs::read(remote.join("tls2.bin")).unwrap() == data);
    let log = ftp.log();
    assert!(log.contains("AUTH TLS") && log.contains("PROT P"), "{log}");
}

#[test]
fn uploads_over_implicit_ftps() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            implicit_tls: true,
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("ftps-implicit");
    let data = random_bytes(1_000_000, 13);
    let local = ws.file("implicit.bin", &data);

    let mut s = Login::server(&ftp)
        .tls(Ftps::Implicit, &ftp.ca_cert)
        .session(&ftp);
    upload_ok(
        &mut s,
        &ftp,
        &local,
        &format!("{}/x", remote.display()),
        "implicit.bin",
    );
    upload_ok(
        &mut s,
        &ftp,
        &local,
        &format!("{}/x", remote.display()),
        "again.bin",
    );
    s.quit();

    assert!(fs::read(remote.join("x/implicit.bin")).unwrap() == data);
    assert!(fs::read(remote.join("x/again.bin")).unwrap() == data);
    assert!(ftp.log().contains("PROT P"), "{}", ftp.log());
}

#[test]
fn a_certificate_from_an_untrusted_ca_is_a_clear_tls_error() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        "127.0.0.5",
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    // some other self-signed certificate, trusted instead of the server's
    let other = ws.path().join("other.crt");
    let key = ws.path().join("other.key");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=other",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&other)
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t0 = Instant::now();
    let e = Login::server(&ftp)
        .tls(Ftps::Explicit, &other)
        .connect()
        .err()
        .expect("connect must fail with the wrong CA");
    eprintln!("connect must fail with the wrong CA: {e:?}");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(
        e.to_string().contains("certificate not trusted") && e.to_string().contains("ftp_ca_file"),
        "{e}"
    );
    assert!(t0.elapsed() < SLACK, "took {:?}", t0.elapsed());
}

#[test]
fn implicit_ftps_with_an_untrusted_certificate_is_a_clear_tls_error() {
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            implicit_tls: true,
            ..Default::default()
        },
    );
    // no ca_file: the system roots do not know the self-signed certificate
    let mut login = Login::server(&ftp);
    login.ftps = Ftps::Implicit;
    let e = login.connect().err().expect("connect must fail");
    eprintln!("connect must fail: {e:?}");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(e.to_string().contains("certificate not trusted"), "{e}");
}

#[test]
fn explicit_ftps_against_a_server_without_tls_says_so() {
    let ftp = FtpServer::start("127.0.0.6");
    let e = Login::server(&ftp)
        .tls(Ftps::Explicit, &ftp.ca_cert)
        .connect()
        .err()
        .expect("AUTH TLS must be refused");
    eprintln!("AUTH TLS must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("AUTH TLS"), "{e}");
}

#[test]
fn a_wrong_password_is_an_auth_error_that_does_not_show_the_password() {
    let ftp = FtpServer::start("127.0.0.7");
    let mut login = Login::server(&ftp).plain();
    login.password = Secret::new("not-the-Password-42");
    let e = login.connect().err().expect("login must fail");
    eprintln!("login must fail: {e:?}");
    assert_eq!(e.kind, ErrorKind::Auth, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(e.to_string().contains("530"), "{e}");
    assert!(!e.to_string().contains("not-the-Password-42"), "{e}");
}

#[test]
fn a_directory_the_user_cannot_write_refuses_stor_and_leaves_nothing() {
    let ws = Workspace::new();
    let ftp = FtpServer::start("127.0.0.8");
    let ro = read_only_dir(&ws, "ro-stor");
    let local = ws.file("denied.tgz", b"data");

    let mut s = Login::server(&ftp).plain().session(&ftp);
    let e = send(&mut s, &local, &ro.display().to_string(), "denied.tgz")
        .expect_err("STOR must be refused");
    eprintln!("STOR must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Remote, "{e}");
    assert!(
        e.to_string().contains("STOR")
            && e.to_string()
                .contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(listing(&ro).is_empty(), "{:?}", listing(&ro));

    // MKD refused below it; the session is still usable afterwards
    let e = send(
        &mut s,
        &local,
        &format!("{}/sub", ro.display()),
        "denied.tgz",
    )
    .expect_err("MKD must be refused");
    eprintln!("MKD must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Remote, "{e}");
    assert!(e.to_string().contains("MKD"), "{e}");
    let ok = ws.remote_dir("after-refusal");
    upload_ok(
        &mut s,
        &ftp,
        &local,
        &ok.display().to_string(),
        "denied.tgz",
    );
    assert_eq!(fs::read(ok.join("denied.tgz")).unwrap(), b"data");
}

#[test]
fn a_server_that_refuses_rename_fails_with_a_hint_and_works_with_rename_off() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        "127.0.0.9",
        FtpOptions {
            extra_config: "cmds_denied=RNFR,RNTO".into(),
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("no-rename");
    let data = random_bytes(100_000, 17);
    let local = ws.file("app-2.war", &data);
    let dir = remote.display().to_string();

    let mut s = Login::server(&ftp).plain().session(&ftp);
    let e = send(&mut s, &local, &dir, "app-2.war").expect_err("rename must be refused");
    eprintln!("rename must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Remote, "{e}");
    assert!(
        e.to_string().contains("RNFR") && e.to_string().contains("ftp_rename = no"),
        "{e}"
    );
    assert!(
        listing(&remote).is_empty(),
        "temp file left: {:?}",
        listing(&remote)
    );
    s.quit();

    let mut login = Login::server(&ftp).plain();
    login.rename = false;
    let mut s = login.session(&ftp);
    let up = upload_ok(&mut s, &ftp, &local, &dir, "app-2.war");
    s.quit();
    assert_eq!(up.bytes, 100_000);
    assert!(fs::read(remote.join("app-2.war")).unwrap() == data);
    assert_eq!(listing(&remote), vec!["app-2.war"]);
}

#[test]
fn active_mode_uploads_work() {
    let ws = Workspace::new();
    let ftp = FtpServer::start("127.0.0.2");
    let remote = ws.remote_dir("active");
    let data = random_bytes(2_000_000, 19);
    let local = ws.file("active.bin", &data);
    let mut login = Login::server(&ftp).plain();
    login.passive = false;
    let mut s = login.session(&ftp);
    upload_ok(
        &mut s,
        &ftp,
        &local,
        &remote.display().to_string(),
        "active.bin",
    );
    s.quit();
    assert!(fs::read(remote.join("active.bin")).unwrap() == data);
    assert!(ftp.log().contains("PORT"), "{}", ftp.log());
}

#[test]
fn a_blocked_host_fails_to_connect_within_connect_timeout() {
    let addr = servers::fresh_addr();
    let port = servers::free_port(&addr);
    let _blocked = servers::block(&addr, &[port]);
    let mut login = Login::to(&addr, port);
    login.connect_timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let e = login.connect().err().expect("connect must fail");
    eprintln!("connect must fail: {e:?}");
    let took = t0.elapsed();
    eprintln!("blocked host: failed after {took:?}");
    assert!(
        matches!(e.kind, ErrorKind::Timeout | ErrorKind::Connect),
        "{e}"
    );
    assert!(e.kind.is_transient(), "{e}");
    assert!(e.to_string().contains(&format!("{addr}:{port}")), "{e}");
    assert!(took < Duration::from_secs(1) + SLACK, "took {took:?}");
}

#[test]
fn a_silent_server_times_out_waiting_for_the_greeting() {
    let addr = servers::fresh_addr();
    let (_listener, port) = servers::silent_server(&addr);
    let mut login = Login::to(&addr, port);
    login.connect_timeout = Duration::from_secs(1);
    login.io_timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let e = login.connect().err().expect("connect must fail");
    eprintln!("connect must fail: {e:?}");
    let took = t0.elapsed();
    eprintln!("silent server: failed after {took:?}");
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert!(
        e.to_string().contains(&format!("{addr}:{port}")) && e.to_string().contains("greeting"),
        "{e}"
    );
    assert!(took < Duration::from_secs(3) + SLACK, "took {took:?}");
}

#[test]
fn a_transfer_that_stalls_fails_within_io_timeout_and_kills_the_session() {
    let ws = Workspace::new();
    let addr = servers::fresh_addr();
    // throttled so that the upload is still running when the host is blocked
    let ftp = FtpServer::start_with(
        &addr,
        FtpOptions {
            extra_config: "local_max_rate=4000000".into(),
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("stall");
    let local = ws.path().join("pkgs-stall.bin");
    // sparse: 200 MB that cost no disk and no time to write
    fs::File::create(&local)
        .and_then(|f| f.set_len(200_000_000))
        .expect("sparse file");
    let io_timeout = Duration::from_secs(2);
    let mut login = Login::server(&ftp).plain();
    login.io_timeout = io_timeout;
    let mut s = login.session(&ftp);

    let tmp = temp_name();
    let part = remote.join(&tmp);
    let dir = remote.display().to_string();
    let worker = std::thread::spawn(move || {
        let r = send_as(&mut s, &local, &dir, &tmp, "stall.bin");
        (r, Instant::now(), s)
    });
    servers::poll_until(Duration::from_secs(20), "upload under way", || {
        fs::metadata(&part)
            .ok()
            .filter(|m| m.len() > 1_000_000)
            .map(|_| ())
    });
    let blocked = servers::block(&addr, &[]);
    let stalled_at = Instant::now();
    let (r, ended_at, mut s) = worker.join().expect("upload thread");
    let took = ended_at - stalled_at;
    drop(blocked);
    eprintln!("stall: upload failed {took:?} after the host was blocked");

    let e = r.expect_err("a stalled upload must fail");

    eprintln!("a stalled upload must fail: {e:?}");
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}:{}", ftp.addr, ftp.port))
            && e.to_string().contains("STOR"),
        "{e}"
    );
    assert!(
        took < io_timeout + SLACK,
        "failed {took:?} after the stall (io_timeout {io_timeout:?})"
    );
    assert!(
        !remote.join("stall.bin").exists(),
        "a partial file got the final name"
    );

    // the session is dead: the next call fails at once
    let t0 = Instant::now();
    let e = send(
        &mut s,
        &ws.file("small", b"x"),
        &remote.display().to_string(),
        "small",
    )
    .expect_err("a dead session must refuse");
    eprintln!("a dead session must refuse: {e:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(e.kind, ErrorKind::Connect, "{e}");
    assert!(!s.is_alive());
    s.quit();
}

#[test]
fn a_local_file_that_shrinks_during_upload_is_a_local_error_and_leaves_nothing() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        "127.0.0.3",
        FtpOptions {
            extra_config: "local_max_rate=4000000".into(),
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("shrink");
    let local = ws.file("shrink.bin", &random_bytes(40_000_000, 23));
    let mut s = Login::server(&ftp).plain().session(&ftp);
    let tmp = temp_name();
    let part = remote.join(&tmp);
    let (dir, path) = (remote.display().to_string(), local.clone());
    let worker = std::thread::spawn(move || {
        let r = send_as(&mut s, &path, &dir, &tmp, "shrink.bin");
        (r, s)
    });
    servers::poll_until(Duration::from_secs(20), "upload under way", || {
        fs::metadata(&part)
            .ok()
            .filter(|m| m.len() > 1_000_000)
            .map(|_| ())
    });
    fs::OpenOptions::new()
        .write(true)
        .open(&local)
        .and_then(|f| f.set_len(0))
        .expect("truncate the local file");
    let (r, mut s) = worker.join().expect("upload thread");
    let e = r.expect_err("a shrinking file must fail");
    eprintln!("shrinking file: {e:?}");
    assert_eq!(e.kind, ErrorKind::Local, "{e}");
    assert!(e.to_string().contains("shrank"), "{e}");
    assert!(listing(&remote).is_empty(), "left: {:?}", listing(&remote));

    // the session goes on; an empty file is a file too
    let empty = ws.file("empty.txt", b"");
    let up = upload_ok(
        &mut s,
        &ftp,
        &empty,
        &remote.display().to_string(),
        "empty.txt",
    );
    s.quit();
    assert_eq!(up.bytes, 0);
    assert_eq!(listing(&remote), vec!["empty.txt"]);
}

#[test]
fn active_mode_works_over_explicit_ftps() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        "127.0.0.4",
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("active-tls");
    let data = random_bytes(1_500_000, 29);
    let local = ws.file("active-tls.bin", &data);
    let mut login = Login::server(&ftp).tls(Ftps::Explicit, &ftp.ca_cert);
    login.passive = false;
    let mut s = login.session(&ftp);
    upload_ok(
        &mut s,
        &ftp,
        &local,
        &remote.display().to_string(),
        "active-tls.bin",
    );
    s.quit();
    assert!(fs::read(remote.join("active-tls.bin")).unwrap() == data);
    let log = ftp.log();
    assert!(log.contains("PORT") && log.contains("PROT P"), "{log}");
}

// ------------------------------------------------- TLS by default (ftps = auto)

/// The commands the client sent, as vsftpd logged them.
fn logged_commands(ftp: &FtpServer) -> Vec<String> {
    ftp.log()
        .lines()
        .filter_map(|l| l.split("FTP command: ").nth(1))
        .map(str::to_string)
        .collect()
}

#[test]
fn by_default_the_upload_goes_over_tls_when_the_server_offers_it() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("auto-tls");
    let data = random_bytes(2_000_000, 31);
    let local = ws.file("auto.bin", &data);
    let dir = remote.display().to_string();

    // the defaults (ftps = auto, no cleartext), with the server's CA trusted
    let mut login = Login::server(&ftp);
    login.ca_file = Some(ftp.ca_cert.clone());
    let mut s = login.session(&ftp);
    assert!(!s.is_cleartext());
    let up = upload_ok(&mut s, &ftp, &local, &dir, "auto.bin");
    let again = upload_ok(&mut s, &ftp, &local, &dir, "again.bin");
    s.quit();

    assert!(!up.cleartext && !again.cleartext, "{up:?}");
    assert!(fs::read(remote.join("auto.bin")).unwrap() == data);
    assert!(fs::read(remote.join("again.bin")).unwrap() == data);
    // AUTH before USER: the password went over TLS; the data too (PROT P)
    let cmds = logged_commands(&ftp);
    let pos = |c: &str| cmds.iter().position(|l| l.contains(c));
    let (auth, user, prot) = (pos("\"AUTH TLS\""), pos("\"USER "), pos("\"PROT P\""));
    assert!(
        auth.is_some() && prot.is_some() && user.is_some() && auth < user,
        "{cmds:#?}"
    );
    let log = ftp.log();
    assert!(
        log.contains("234 Proceed with negotiation.") && log.contains("200 PROT now Private."),
        "{log}"
    );
}

#[test]
fn by_default_a_server_without_tls_is_refused_before_the_password_is_sent() {
    let ws = Workspace::new();
    let ftp = FtpServer::start(&servers::fresh_addr());
    let e = Login::server(&ftp)
        .connect()
        .err()
        .expect("plain FTP must be refused by default");
    eprintln!("plain FTP must be refused by default: {e:?}");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(
        e.to_string().contains("does not offer TLS")
            && e.to_string().contains("set ftp_cleartext = yes"),
        "{e}"
    );
    let cmds = logged_commands(&ftp);
    assert!(
        cmds.iter().any(|c| c.contains("AUTH TLS")),
        "AUTH TLS was tried: {cmds:#?}"
    );
    assert!(
        !cmds
            .iter()
            .any(|c| c.contains("USER") || c.contains("PASS")),
        "no login without TLS: {cmds:#?}"
    );

    // allowed with ftp_cleartext = yes, and the result says so
    let remote = ws.remote_dir("cleartext");
    let local = ws.file("clear.txt", b"in the clear\n");
    let mut s = Login::server(&ftp).plain().session(&ftp);
    assert!(s.is_cleartext());
    let up = upload_ok(
        &mut s,
        &ftp,
        &local,
        &remote.display().to_string(),
        "clear.txt",
    );
    s.quit();
    assert!(up.cleartext, "{up:?}");
    assert_eq!(
        fs::read(remote.join("clear.txt")).unwrap(),
        b"in the clear\n"
    );
}

#[test]
fn ftps_off_is_refused_without_ftp_cleartext_and_plain_with_it() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    let mut login = Login::server(&ftp);
    login.ftps = Ftps::Off;
    let e = login
        .connect()
        .err()
        .expect("ftps = off needs ftp_cleartext");
    eprintln!("ftps = off needs ftp_cleartext: {e:?}");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string().contains(&ftp.addr) && e.to_string().contains("set ftp_cleartext = yes"),
        "{e}"
    );

    let remote = ws.remote_dir("off-plain");
    let local = ws.file("off.txt", b"plain on purpose");
    let mut s = login.plain().session(&ftp);
    let up = upload_ok(
        &mut s,
        &ftp,
        &local,
        &remote.display().to_string(),
        "off.txt",
    );
    s.quit();
    assert!(up.cleartext);
    assert!(
        !logged_commands(&ftp).iter().any(|c| c.contains("AUTH")),
        "{}",
        ftp.log()
    );
}

#[test]
fn an_untrusted_certificate_is_an_error_with_the_ca_hint_never_a_fall_back_to_plain() {
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    // cleartext allowed, but the server offers TLS: a bad certificate must not
    // turn into a plain login; the system roots do not know this certificate
    let e = Login::server(&ftp)
        .plain()
        .connect()
        .err()
        .expect("an untrusted certificate must fail");
    eprintln!("an untrusted certificate must fail: {e:?}");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(
        e.to_string().contains("certificate not trusted")
            && e.to_string().contains("ftp_ca_file = /path/ca.pem"),
        "{e}"
    );
    let cmds = logged_commands(&ftp);
    assert!(
        !cmds
            .iter()
            .any(|c| c.contains("USER") || c.contains("PASS")),
        "{cmds:#?}"
    );
}

// ------------------------------------------------- temporary names, modes

#[test]
fn a_255_byte_file_name_uploads() {
    let ws = Workspace::new();
    let ftp = FtpServer::start(&servers::fresh_addr());
    let remote = ws.remote_dir("long-name");
    let name = format!("{}.tar.gz", "n".repeat(255 - 7));
    assert_eq!(name.len(), 255);
    let data = random_bytes(300_000, 37);
    let local = ws.file(&name, &data);
    let mut s = Login::server(&ftp).plain().session(&ftp);
    let up = upload_ok(&mut s, &ftp, &local, &remote.display().to_string(), &name);
    s.quit();
    assert_eq!(up.bytes, 300_000);
    assert!(fs::read(remote.join(&name)).unwrap() == data);
    assert_eq!(listing(&remote), vec![name]);
}

#[test]
fn two_concurrent_uploads_of_one_name_each_end_whole() {
    let ws = Workspace::new();
    // throttled per session, so that the two transfers overlap
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            extra_config: "local_max_rate=3000000".into(),
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("same-name");
    let a = random_bytes(3_000_000, 41);
    let b = random_bytes(3_000_000, 43);
    let la = ws.path().join("a").join("same.bin");
    let lb = ws.path().join("b").join("same.bin");
    for (p, d) in [(&la, &a), (&lb, &b)] {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, d).unwrap();
    }
    let dir = remote.display().to_string();
    let login = Login::server(&ftp).plain();
    let barrier = std::sync::Barrier::new(2);
    let run = |local: &PathBuf| {
        let mut s = login.session(&ftp);
        barrier.wait();
        let r = send(&mut s, local, &dir, "same.bin");
        s.quit();
        r
    };
    let (ra, rb) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| run(&la));
        let tb = sc.spawn(|| run(&lb));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let ra = ra.unwrap_or_else(|e| panic!("upload a: {e}\n{}", ftp.log()));
    let rb = rb.unwrap_or_else(|e| panic!("upload b: {e}\n{}", ftp.log()));
    // they did overlap (else this test proves nothing)
    assert!(
        ra.elapsed > Duration::from_millis(500) && rb.elapsed > Duration::from_millis(500),
        "{ra:?} {rb:?}"
    );
    let got = fs::read(remote.join("same.bin")).unwrap();
    assert!(got == a || got == b, "the final file mixes the two uploads");
    assert_eq!(listing(&remote), vec!["same.bin"], "temporary files left");
}

#[test]
fn one_open_file_uploads_whole_to_two_hosts_at_once_whatever_its_cursor() {
    let ws = Workspace::new();
    let opts = || FtpOptions {
        extra_config: "local_max_rate=3000000".into(),
        ..Default::default()
    };
    let f1 = FtpServer::start_with(&servers::fresh_addr(), opts());
    let f2 = FtpServer::start_with(&servers::fresh_addr(), opts());
    let r1 = ws.remote_dir("shared-1");
    let r2 = ws.remote_dir("shared-2");
    let data = random_bytes(3_000_000, 47);
    let local = ws.file("shared.bin", &data);
    let mut file = fs::File::open(&local).unwrap();
    file.seek(SeekFrom::Start(12345)).unwrap();
    let size = data.len() as u64;
    let barrier = std::sync::Barrier::new(2);
    let (file, barrier) = (&file, &barrier);
    let results: Vec<_> = std::thread::scope(|sc| {
        [(&f1, &r1), (&f2, &r2)]
            .map(|(ftp, remote)| {
                sc.spawn(move || {
                    let mut s = Login::server(ftp).plain().session(ftp);
                    barrier.wait();
                    let dir = remote.display().to_string();
                    let src = dispatch::transport::Source {
                        file,
                        size,
                        mode: 0o644,
                    };
                    let r = s.upload(src, &dir, &temp_name(), "shared.bin", &mut |_| {});
                    s.quit();
                    r.unwrap_or_else(|e| panic!("upload: {e}\n{}", ftp.log()))
                })
            })
            .map(|t| t.join().unwrap())
            .into_iter()
            .collect()
    });
    assert_eq!(results.len(), 2);
    assert!(fs::read(r1.join("shared.bin")).unwrap() == data, "host 1");
    assert!(fs::read(r2.join("shared.bin")).unwrap() == data, "host 2");
}

#[test]
fn the_local_permission_bits_arrive_on_the_uploaded_file() {
    let ws = Workspace::new();
    let ftp = FtpServer::start(&servers::fresh_addr());
    let remote = ws.remote_dir("modes");
    let dir = remote.display().to_string();
    let secret = ws.file("secret.key", b"private");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let tool = ws.file("tool.sh", b"#!/bin/sh\n");
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o751)).unwrap();
    let mut s = Login::server(&ftp).plain().session(&ftp);
    upload_ok(&mut s, &ftp, &secret, &dir, "secret.key");
    upload_ok(&mut s, &ftp, &tool, &dir, "tool.sh");
    // without rename, straight to the final name: the mode is set too
    s.quit();
    let mut login = Login::server(&ftp).plain();
    login.rename = false;
    let mut s = login.session(&ftp);
    upload_ok(&mut s, &ftp, &secret, &dir, "direct.key");
    s.quit();
    let mode = |n: &str| fs::metadata(remote.join(n)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("secret.key"), 0o600, "{}", ftp.log());
    assert_eq!(mode("tool.sh"), 0o751);
    assert_eq!(mode("direct.key"), 0o600);
}

#[test]
fn a_server_that_refuses_site_chmod_still_takes_the_file() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        &servers::fresh_addr(),
        FtpOptions {
            extra_config: "chmod_enable=NO".into(),
            ..Default::default()
        },
    );
    let remote = ws.remote_dir("no-chmod");
    let local = ws.file("x.key", b"x");
    fs::set_permissions(&local, fs::Permissions::from_mode(0o600)).unwrap();
    let mut s = Login::server(&ftp).plain().session(&ftp);
    upload_ok(&mut s, &ftp, &local, &remote.display().to_string(), "x.key");
    // the session is still usable after the refusal
    upload_ok(&mut s, &ftp, &local, &remote.display().to_string(), "y.key");
    s.quit();
    assert_eq!(fs::read(remote.join("x.key")).unwrap(), b"x");
    assert_eq!(listing(&remote), vec!["x.key", "y.key"]);
    assert!(ftp.log().contains("SITE CHMOD"), "{}", ftp.log());
}
