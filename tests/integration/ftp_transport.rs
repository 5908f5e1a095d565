//! The FTP transport (`dispatch::transport::ftp`) called directly, against a
//! real vsftpd on loopback: plain, explicit and implicit FTPS, `mkdir -p`,
//! refusals, and the deadlines (blocked host, stalled transfer, silent server).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dispatch::config::{Ftps, Secret};
use dispatch::transport::ftp::{FtpSession, FtpTarget, FtpUpload};
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
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl Login {
    fn to(host: &str, port: u16) -> Login {
        Login {
            host: host.to_string(),
            port,
            password: Secret::new(servers::test_user().password.clone()),
            ftps: Ftps::Off,
            ca_file: None,
            passive: true,
            rename: true,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }

    fn server(ftp: &FtpServer) -> Login {
        Login::to(&ftp.addr, ftp.port)
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

fn upload_ok(
    s: &mut FtpSession,
    ftp: &FtpServer,
    local: &Path,
    dir: &str,
    name: &str,
) -> FtpUpload {
    s.upload(local, dir, name)
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

    let mut s = Login::server(&ftp).session(&ftp);
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

    let mut s = Login::server(&ftp).session(&ftp);
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
    assert!(e.msg.contains(&format!("{}:{}", ftp.addr, ftp.port)), "{e}");
    assert!(
        e.msg.contains("certificate not trusted") && e.msg.contains("ftp_ca_file"),
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
    assert!(e.msg.contains(&format!("{}:{}", ftp.addr, ftp.port)), "{e}");
    assert!(e.msg.contains("certificate not trusted"), "{e}");
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
    assert!(e.msg.contains("AUTH TLS"), "{e}");
}

#[test]
fn a_wrong_password_is_an_auth_error_that_does_not_show_the_password() {
    let ftp = FtpServer::start("127.0.0.7");
    let mut login = Login::server(&ftp);
    login.password = Secret::new("not-the-Password-42");
    let e = login.connect().err().expect("login must fail");
    eprintln!("login must fail: {e:?}");
    assert_eq!(e.kind, ErrorKind::Auth, "{e}");
    assert!(e.msg.contains(&format!("{}:{}", ftp.addr, ftp.port)), "{e}");
    assert!(e.msg.contains("530"), "{e}");
    assert!(!e.msg.contains("not-the-Password-42"), "{e}");
}

#[test]
fn a_directory_the_user_cannot_write_refuses_stor_and_leaves_nothing() {
    let ws = Workspace::new();
    let ftp = FtpServer::start("127.0.0.8");
    let ro = read_only_dir(&ws, "ro-stor");
    let local = ws.file("denied.tgz", b"data");

    let mut s = Login::server(&ftp).session(&ftp);
    let e = s
        .upload(&local, &ro.display().to_string(), "denied.tgz")
        .expect_err("STOR must be refused");
    eprintln!("STOR must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Remote, "{e}");
    assert!(
        e.msg.contains("STOR") && e.msg.contains(&format!("{}:{}", ftp.addr, ftp.port)),
        "{e}"
    );
    assert!(listing(&ro).is_empty(), "{:?}", listing(&ro));

    // MKD refused below it; the session is still usable afterwards
    let e = s
        .upload(&local, &format!("{}/sub", ro.display()), "denied.tgz")
        .expect_err("MKD must be refused");
    eprintln!("MKD must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Remote, "{e}");
    assert!(e.msg.contains("MKD"), "{e}");
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

    let mut s = Login::server(&ftp).session(&ftp);
    let e = s
        .upload(&local, &dir, "app-2.war")
        .expect_err("rename must be refused");
    eprintln!("rename must be refused: {e:?}");
    assert_eq!(e.kind, ErrorKind::Remote, "{e}");
    assert!(
        e.msg.contains("RNFR") && e.msg.contains("ftp_rename = no"),
        "{e}"
    );
    assert!(
        listing(&remote).is_empty(),
        "temp file left: {:?}",
        listing(&remote)
    );
    s.quit();

    let mut login = Login::server(&ftp);
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
    let mut login = Login::server(&ftp);
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
    assert!(e.msg.contains(&format!("{addr}:{port}")), "{e}");
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
        e.msg.contains(&format!("{addr}:{port}")) && e.msg.contains("greeting"),
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
    let mut login = Login::server(&ftp);
    login.io_timeout = io_timeout;
    let mut s = login.session(&ftp);

    let part = remote.join(".stall.bin.part");
    let dir = remote.display().to_string();
    let worker = std::thread::spawn(move || {
        let r = s.upload(&local, &dir, "stall.bin");
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
        e.msg.contains(&format!("{}:{}", ftp.addr, ftp.port)) && e.msg.contains("STOR"),
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
    let e = s
        .upload(
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
    let mut s = Login::server(&ftp).session(&ftp);
    let part = remote.join(".shrink.bin.part");
    let (dir, path) = (remote.display().to_string(), local.clone());
    let worker = std::thread::spawn(move || {
        let r = s.upload(&path, &dir, "shrink.bin");
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
    assert!(e.msg.contains("shrank"), "{e}");
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
