//! The whole pipeline under faults: SSH unusable → FTP fallback, retries,
//! hard deadlines, a server killed mid-upload — against real sshd and vsftpd.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::servers::{self, one, results, FtpOptions, FtpServer, SshOptions, SshServer, Workspace};

/// Generous slack for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(6);

fn state(ws: &Workspace) -> String {
    format!(
        "[dispatch]\nstate_dir = {}\n",
        ws.path().join("state").display()
    )
}

/// Files (recursively) under `dir` whose name ends with `.part`.
fn parts(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(parts(&p));
            } else if p.to_string_lossy().ends_with(".part") {
                out.push(p);
            }
        }
    }
    out
}

fn random_bytes(n: usize) -> Vec<u8> {
    // xorshift: incompressible enough, and reproducible
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn sshd_down_and_ftp_up_delivers_by_ftp_and_records_why() {
    let ws = Workspace::new();
    let addr = servers::fresh_addr();
    let ftp = FtpServer::start(&addr);
    let closed = servers::free_port(&addr); // no sshd there
    let remote = ws.remote_dir("remote");
    let u = servers::test_user();
    let data = random_bytes(3_000_000);
    let cfg = ws.write_config(&format!(
        "{}[pkg-]\nhost = {addr}\nport = {closed}\nftp_port = {}\nftp_cleartext = yes\nlogin = {}\npassword = {}\ndest_dir = {}/a/b/c\nconnect_timeout = 2s\nretries = 0\n\n[inst-]\nhost = {addr}\nport = {closed}\nftp_port = {}\nftp_cleartext = yes\nlogin = {}\npassword = {}\ndest_dir = {}/i\nconnect_timeout = 2s\nretries = 0\ninstall_command = touch {{name}}.done\n",
        state(&ws),
        ftp.port,
        u.name,
        u.password,
        remote.display(),
        ftp.port,
        u.name,
        u.password,
        remote.display(),
    ));
    let f = ws.file("pkg-1.bin", &data);
    let g = ws.file("inst-1.bin", b"needs ssh to install");
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--json", "-vvv"])
        .arg(&f)
        .arg(&g)
        .run()
        .assert_code(1);
    assert!(
        r.stderr.contains("FTP"),
        "trace logging was on: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains(&u.password) && !r.stdout.contains(&u.password),
        "password in the log"
    );
    let res = results(&r.stdout);
    let p = one(&res, "pkg-1.bin");
    assert_eq!(p["ok"], true, "{p}");
    assert_eq!(p["transport"], "ftp");
    let why = p["fallback_reason"].as_str().unwrap_or_default();
    assert!(why.contains("scp") && why.contains("refused"), "{why}");
    assert_eq!(
        fs::read(remote.join("a/b/c/pkg-1.bin")).unwrap(),
        data,
        "binary, byte-identical"
    );
    // uploaded by FTP, but nothing can run the install command
    let i = one(&res, "inst-1.bin");
    assert_eq!(i["ok"], false);
    assert_eq!(i["transport"], "ftp");
    assert!(
        i["error"]
            .as_str()
            .unwrap()
            .contains("SSH is not available"),
        "{i}"
    );
    assert_eq!(
        fs::read(remote.join("i/inst-1.bin")).unwrap(),
        b"needs ssh to install"
    );
    assert!(!remote.join("i/inst-1.bin.done").exists());
    // and the journal has it
    let h = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "history", "--json"])
        .run()
        .assert_code(0);
    let rows = results(&h.stdout);
    let row = rows.iter().find(|v| v["file"] == "pkg-1.bin").unwrap();
    assert_eq!(row["transport"], "ftp");
    assert!(
        row["fallback_reason"].as_str().unwrap().contains("refused"),
        "{row}"
    );
    // plain FTP (allowed by ftp_cleartext = yes) is marked in the result and the journal
    assert_eq!(p["cleartext"], true, "{p}");
    assert!(
        row["fallback_reason"]
            .as_str()
            .unwrap()
            .contains("sent in cleartext"),
        "{row}"
    );
}

#[test]
fn ssh_login_rejected_falls_back_to_ftp_and_both_rejecting_is_one_clear_error() {
    let ws = Workspace::new();
    let addr = servers::fresh_addr();
    let sshd = SshServer::start_with(
        &addr,
        SshOptions {
            password_auth: false,
            ..Default::default()
        },
    );
    let ftp = FtpServer::start(&addr);
    let kh = ws.known_hosts(&[&sshd]);
    let remote = ws.remote_dir("remote");
    let u = servers::test_user();
    let route = |section: &str, password: &str| {
        format!(
            "[{section}]\nhost = {addr}\nport = {}\nftp_port = {}\nftp_cleartext = yes\nlogin = {}\npassword = {password}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/{section}\nretries = 2\nretry_delay = 1s\n",
            sshd.port,
            ftp.port,
            u.name,
            servers::keys().unauthorized.display(),
            kh.display(),
            remote.display(),
        )
    };
    let cfg = ws.write_config(&format!(
        "{}{}{}",
        state(&ws),
        route("good-", &u.password),
        route("bad-", "wrong-password")
    ));
    let good = ws.file("good-1", b"by ftp");
    let bad = ws.file("bad-1", b"nowhere");
    let started = Instant::now();
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--json"])
        .arg(&good)
        .arg(&bad)
        .run()
        .assert_code(1);
    // rejections are not retried: no backoff (retries = 2, retry_delay = 1s would add ≥ 3 s)
    assert!(
        started.elapsed() < Duration::from_secs(3) + SLACK,
        "{:?}",
        started.elapsed()
    );
    let res = results(&r.stdout);
    let g = one(&res, "good-1");
    assert_eq!(
        (g["ok"].clone(), g["transport"].clone()),
        (true.into(), "ftp".into()),
        "{g}"
    );
    assert!(
        g["fallback_reason"].as_str().unwrap().contains("rejected"),
        "{g}"
    );
    assert_eq!(fs::read(remote.join("good-/good-1")).unwrap(), b"by ftp");
    let b = one(&res, "bad-1");
    assert_eq!(b["ok"], false);
    let e = b["error"].as_str().unwrap();
    assert!(
        e.contains("scp:") && e.contains("ftp:"),
        "one combined error: {e}"
    );
    assert!(!r.stdout.contains("wrong-password") && !r.stderr.contains("wrong-password"));
    assert_eq!(b["attempts"], 1, "auth rejection is not retried: {b}");
}

#[test]
fn a_host_that_stops_answering_mid_upload_fails_at_its_deadline_and_the_others_finish() {
    let ws = Workspace::new();
    let a = SshServer::start(&servers::fresh_addr());
    let b = SshServer::start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&a, &b]);
    let remote = ws.remote_dir("remote");
    let u = servers::test_user();
    let route = |section: &str, h: &SshServer| {
        format!(
            "[{section}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/{{host}}\ntransfer = scp\nconnect_timeout = 2s\nio_timeout = 2s\nretries = 1\nretry_delay = 500ms\n",
            h.addr,
            h.port,
            u.name,
            servers::keys().ed25519.display(),
            kh.display(),
            remote.display(),
        )
    };
    let cfg = ws.write_config(&format!(
        "{}{}{}",
        state(&ws),
        route("big-", &a),
        route("small-", &b)
    ));
    let big = ws.file("big-1", &vec![b'x'; 400 * 1024 * 1024]);
    let small = ws.file("small-1", b"small");
    let a_dir = remote.join(&a.addr);
    let a_addr = a.addr.clone();
    let a_port = a.port;
    // block host a as soon as its upload is under way
    let blocker = std::thread::spawn(move || {
        servers::poll_until(Duration::from_secs(60), "upload to start", || {
            parts(&a_dir)
                .into_iter()
                .find(|p| fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        });
        (Instant::now(), servers::block(&a_addr, &[a_port]))
    });
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--json"])
        .arg(&big)
        .arg(&small)
        .run()
        .assert_code(1);
    let done = Instant::now();
    let (blocked_at, _guard) = blocker.join().unwrap();
    // stall detected after io_timeout (2 s), one retry whose connect times out (2 s), backoff 0.5 s
    let took = done - blocked_at;
    assert!(
        took < Duration::from_millis(4500) + SLACK,
        "deadline not held: {took:?}"
    );
    let res = results(&r.stdout);
    let big_r = one(&res, "big-1");
    assert_eq!(big_r["ok"], false);
    assert_eq!(big_r["attempts"], 2, "retried once: {big_r}");
    assert!(
        big_r["error"].as_str().unwrap().contains("timed out"),
        "{big_r}"
    );
    assert_eq!(one(&res, "small-1")["ok"], true);
    assert_eq!(
        fs::read(remote.join(&b.addr).join("small-1")).unwrap(),
        b"small"
    );
    assert!(
        !remote.join(&a.addr).join("big-1").exists(),
        "no partial file under the final name"
    );
}

#[test]
fn sshd_killed_mid_upload_is_retried_and_the_file_arrives_intact() {
    let ws = Workspace::new();
    let mut sshd = SshServer::start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&sshd]);
    let remote = ws.remote_dir("remote");
    let u = servers::test_user();
    let cfg = ws.write_config(&format!(
        "{}[big-]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/d\ntransfer = scp\nverify = sha256\nconnect_timeout = 2s\nio_timeout = 5s\nretries = 4\nretry_delay = 500ms\n",
        state(&ws),
        sshd.addr,
        sshd.port,
        u.name,
        servers::keys().ed25519.display(),
        kh.display(),
        remote.display(),
    ));
    let data = random_bytes(200 * 1024 * 1024);
    let big = ws.file("big-1.bin", &data);
    let dir = remote.join("d");
    let run = {
        let cmd = ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .arg(&big);
        std::thread::spawn(move || cmd.run())
    };
    servers::poll_until(Duration::from_secs(60), "upload to start", || {
        parts(&dir).into_iter().find(|p| {
            fs::metadata(p)
                .map(|m| m.len() > 1_000_000)
                .unwrap_or(false)
        })
    });
    sshd.kill(); // the listener and every session it forked
    sshd.restart();
    let r = run.join().unwrap().assert_code(0);
    let res = results(&r.stdout);
    let v = one(&res, "big-1.bin");
    assert!(v["attempts"].as_u64().unwrap() >= 2, "{v}");
    assert!(
        fs::read(dir.join("big-1.bin")).unwrap() == data,
        "byte-identical"
    );
    assert!(
        parts(&remote).is_empty(),
        "no .part left behind: {:?}",
        parts(&remote)
    );
}

#[test]
fn a_server_that_accepts_and_never_speaks_fails_at_the_handshake_deadline() {
    let ws = Workspace::new();
    let addr = servers::fresh_addr();
    let (_listener, port) = servers::silent_server(&addr);
    let cfg = ws.write_config(&format!(
        "{}[x]\nhost = {addr}\nport = {port}\nlogin = nobody\ntransfer = scp\nconnect_timeout = 1s\nio_timeout = 2s\nretries = 0\nhost_key_check = strict\n",
        state(&ws)
    ));
    let f = ws.file("x-1", b"x");
    let started = Instant::now();
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&f)
        .run()
        .assert_code(1);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3) + SLACK, "{took:?}");
    assert!(r.stdout.contains("handshake"), "{}", r.stdout);
}

#[test]
fn the_ftp_fallback_uses_tls_by_default_and_refuses_a_server_without_it() {
    let ws = Workspace::new();
    let (a, b) = (servers::fresh_addr(), servers::fresh_addr());
    let tls = FtpServer::start_with(
        &a,
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    let plain = FtpServer::start(&b);
    let remote = ws.remote_dir("remote");
    let u = servers::test_user();
    // no sshd on either host; no ftps key: the default
    let route = |section: &str, ftp: &FtpServer, extra: &str| {
        format!(
            "[{section}]\nhost = {}\nport = {}\nftp_port = {}\nlogin = {}\npassword = {}\ndest_dir = {}/{section}\nconnect_timeout = 2s\nretries = 0\n{extra}",
            ftp.addr,
            servers::free_port(&ftp.addr),
            ftp.port,
            u.name,
            u.password,
            remote.display(),
        )
    };
    let ca = format!("ftp_ca_file = {}\n", tls.ca_cert.display());
    let cfg = ws.write_config(&format!(
        "{}{}{}",
        state(&ws),
        route("tls-", &tls, &ca),
        route("plain-", &plain, "")
    ));
    let f = ws.file("tls-1.bin", &random_bytes(500_000));
    let g = ws.file("plain-1.bin", b"must not travel in the clear");
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--json"])
        .arg(&f)
        .arg(&g)
        .run()
        .assert_code(1);
    let res = results(&r.stdout);
    let t = one(&res, "tls-1.bin");
    assert_eq!(
        (t["ok"].clone(), t["transport"].clone()),
        (true.into(), "ftp".into()),
        "{t}\n{}",
        tls.log()
    );
    assert_eq!(
        fs::read(remote.join("tls-/tls-1.bin")).unwrap(),
        random_bytes(500_000)
    );
    let log = tls.log();
    assert!(
        log.contains("\"AUTH TLS\"") && log.contains("\"PROT P\""),
        "{log}"
    );

    let p = one(&res, "plain-1.bin");
    assert_eq!(p["ok"], false, "{p}");
    let e = p["error"].as_str().unwrap_or_default();
    assert!(
        e.contains(&format!("{}:{}", plain.addr, plain.port)) && e.contains("ftp_cleartext = yes"),
        "{e}"
    );
    assert!(!remote.join("plain-/plain-1.bin").exists());
    assert!(
        !plain.log().contains("\"USER "),
        "no login without TLS: {}",
        plain.log()
    );
}
