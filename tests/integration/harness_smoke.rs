//! Proof that the test harness works, with the stock clients (OpenSSH `ssh`,
//! `curl`), before any test trusts it to judge `dispatch`.

use std::fs;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::servers::*;

/// OpenSSH client, batch mode, only the given identity, the given known_hosts.
fn ssh(
    server: &SshServer,
    known_hosts: &Path,
    identity: Option<&Path>,
    agent: Option<&Agent>,
    remote: &str,
) -> Output {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
    .args([
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
    ])
    .arg("-p")
    .arg(server.port.to_string());
    match identity {
        Some(key) => {
            cmd.args(["-o", "IdentitiesOnly=yes", "-i"]).arg(key);
        }
        None => {
            cmd.args(["-o", "IdentityFile=/dev/null"]);
        }
    }
    cmd.env_remove("SSH_AUTH_SOCK");
    if let Some(agent) = agent {
        cmd.env("SSH_AUTH_SOCK", &agent.sock);
    }
    cmd.arg(format!("{}@{}", test_user().name, server.addr))
        .arg(remote)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20", "--ftp-pasv"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl")
}

#[test]
fn two_ssh_servers_answer_openssh_key_auth_and_say_which_host_they_are() {
    let ws = Workspace::new();
    let a = SshServer::start("127.0.0.2");
    let b = SshServer::start("127.0.0.3");
    let kh = ws.known_hosts(&[&a, &b]);
    for (server, key) in [(&a, &keys().ed25519), (&b, &keys().rsa)] {
        let out = ssh(
            server,
            &kh,
            Some(key),
            None,
            "echo $DISPATCH_TEST_HOST; id -un",
        );
        assert!(
            out.status.success(),
            "ssh to {}:{} failed: {}\n{}",
            server.addr,
            server.port,
            text(&out.stderr),
            server.log()
        );
        assert_eq!(
            text(&out.stdout),
            format!("{}\n{}\n", server.addr, test_user().name)
        );
    }
    assert!(a
        .known_hosts_line()
        .starts_with(&format!("[127.0.0.2]:{} ssh-ed25519 AAAA", a.port)));
    assert!(a.pid() > 0 && a.pid() != b.pid());
}

#[test]
fn a_key_not_in_authorized_keys_is_refused() {
    let ws = Workspace::new();
    let server = SshServer::start("127.0.0.2");
    let kh = ws.known_hosts(&[&server]);
    let out = ssh(&server, &kh, Some(&keys().unauthorized), None, "true");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_agent_holding_the_key_logs_in_without_an_identity_file() {
    let ws = Workspace::new();
    let server = SshServer::start("127.0.0.3");
    let kh = ws.known_hosts(&[&server]);
    let agent = start_agent(&keys().ed25519);
    let out = ssh(&server, &kh, None, Some(&agent), "echo via-agent");
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        server.log()
    );
    assert_eq!(text(&out.stdout), "via-agent\n");
}

#[test]
fn a_server_with_a_new_host_key_is_refused_by_the_old_known_hosts() {
    let ws = Workspace::new();
    let addr = fresh_addr();
    let old = SshServer::start(&addr);
    let kh = ws.known_hosts(&[&old]);
    let changed = SshServer::start_with(
        &addr,
        SshOptions {
            host_key: Some(new_host_key()),
            ..Default::default()
        },
    );
    // same address, the old server's line rewritten for the new port
    let line = old
        .known_hosts_line()
        .replace(&format!(":{} ", old.port), &format!(":{} ", changed.port));
    fs::write(&kh, format!("{line}\n")).expect("write known_hosts");
    let out = ssh(&changed, &kh, Some(&keys().ed25519), None, "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_killed_ssh_server_refuses_connections_and_comes_back_on_restart() {
    let mut server = SshServer::start(&fresh_addr());
    let sa: SocketAddr = format!("{}:{}", server.addr, server.port)
        .parse()
        .expect("addr");
    server.kill();
    assert_eq!(server.pid(), 0);
    let err = TcpStream::connect_timeout(&sa, Duration::from_secs(1))
        .expect_err("connect to a killed server");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    server.restart();
    TcpStream::connect_timeout(&sa, Duration::from_secs(1)).expect("connect after restart");
}

#[test]
fn ftp_server_accepts_the_test_user_plain_and_over_explicit_tls() {
    let ws = Workspace::new();
    let ftp = FtpServer::start_with(
        "127.0.0.2",
        FtpOptions {
            tls: true,
            ..Default::default()
        },
    );
    let user = test_user();
    let creds = format!("{}:{}", user.name, user.password);
    let dir = ws.remote_dir("ftp-in");
    fs::write(dir.join("listed.txt"), b"x").expect("write");
    let url = format!(
        "ftp://{}:{}/%2F{}/",
        ftp.addr,
        ftp.port,
        dir.display().to_string().trim_start_matches('/')
    );

    let plain = curl(&["-u", &creds, &url, "-l"]);
    assert!(
        plain.status.success(),
        "curl plain: {}\n{}",
        text(&plain.stderr),
        ftp.log()
    );
    assert_eq!(text(&plain.stdout).trim(), "listed.txt");

    let ca = ftp.ca_cert.display().to_string();
    let tls = curl(&["--ssl-reqd", "--cacert", &ca, "-u", &creds, &url, "-l"]);
    assert!(
        tls.status.success(),
        "curl --ssl-reqd: {}\n{}",
        text(&tls.stderr),
        ftp.log()
    );
    assert_eq!(text(&tls.stdout).trim(), "listed.txt");

    // an upload lands owned by the test user, mode 0644 (local_umask=022)
    let pkg = ws.file("up load.bin", b"payload");
    let up = curl(&[
        "--ssl-reqd",
        "--cacert",
        &ca,
        "-u",
        &creds,
        "-T",
        &pkg.display().to_string(),
        &url,
    ]);
    assert!(
        up.status.success(),
        "curl -T: {}\n{}",
        text(&up.stderr),
        ftp.log()
    );
    let meta = fs::metadata(dir.join("up load.bin")).expect("uploaded file");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o644));
    assert!(ftp.log().contains("PROT P"), "{}", ftp.log());
}

#[test]
fn ftp_server_with_implicit_tls_speaks_tls_from_the_first_byte() {
    let ftp = FtpServer::start_with(
        &fresh_addr(),
        FtpOptions {
            implicit_tls: true,
            ..Default::default()
        },
    );
    let user = test_user();
    let creds = format!("{}:{}", user.name, user.password);
    let url = format!("ftps://{}:{}/", ftp.addr, ftp.port);
    let out = curl(&[
        "--cacert",
        &ftp.ca_cert.display().to_string(),
        "-u",
        &creds,
        &url,
        "-l",
    ]);
    assert!(
        out.status.success(),
        "curl ftps://: {}\n{}",
        text(&out.stderr),
        ftp.log()
    );
}

#[test]
fn a_wrong_ftp_password_is_refused_with_530() {
    let ftp = FtpServer::start("127.0.0.3");
    let creds = format!("{}:wrong", test_user().name);
    let out = curl(&[
        "-u",
        &creds,
        &format!("ftp://{}:{}/", ftp.addr, ftp.port),
        "-l",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("530"), "{}", text(&out.stderr));
}

#[test]
fn a_blocked_address_times_out_until_the_guard_is_dropped() {
    let server = SshServer::start(&fresh_addr());
    let sa: SocketAddr = format!("{}:{}", server.addr, server.port)
        .parse()
        .expect("addr");
    let guard = block(&server.addr, &[server.port]);
    let err =
        TcpStream::connect_timeout(&sa, Duration::from_secs(1)).expect_err("connect while blocked");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    drop(guard);
    // unblocked, a loopback connect is immediate; the longer timeout only absorbs scheduling stalls
    TcpStream::connect_timeout(&sa, Duration::from_secs(5)).expect("connect after unblock");
}

#[test]
fn a_silent_server_accepts_the_connection_but_never_speaks() {
    let (_listener, port) = silent_server("127.0.0.4");
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.4:{port}").parse().expect("addr"),
        Duration::from_secs(1),
    )
    .expect("handshake completes");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let err = loop {
        match s.read(&mut buf) {
            // a stop/continue of the test process interrupts reads that have a timeout
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => break other.expect_err("no banner"),
        }
    };
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
}

#[test]
fn workspace_runs_the_dispatch_binary_with_home_in_the_workspace() {
    let ws = Workspace::new();
    let weird = ws.file("a 'q\"uoted'\nname é.tar.gz", b"data");
    assert_eq!(fs::read(&weird).expect("read"), b"data");
    let cfg = ws.write_config("[dispatch]\n");
    assert_eq!(fs::metadata(&cfg).expect("config").mode() & 0o777, 0o600);
    let remote = ws.remote_dir("dest");
    assert_eq!(
        fs::metadata(&remote).expect("remote").uid(),
        test_user().uid
    );
    let r = ws.dispatch().arg("--version").run().assert_code(0);
    assert!(r.stdout.contains("dispatch"), "{r}");
    assert!(r.elapsed < Duration::from_secs(120));
}

#[test]
fn poll_until_returns_the_first_some() {
    let mut n = 0;
    let got = poll_until(Duration::from_secs(5), "n reaches 3", || {
        n += 1;
        (n >= 3).then_some(n)
    });
    assert_eq!(got, 3);
}

#[test]
#[should_panic(expected = "waiting for: never")]
fn poll_until_panics_with_what_it_waited_for() {
    poll_until(Duration::from_millis(50), "never", || None::<()>);
}
