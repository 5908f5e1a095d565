//! `dispatch FILE…` end to end against real sshd hosts on loopback.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::servers::{self, SshServer, Workspace};

/// Two hosts and a workspace whose remote dir is writable by the test user.
struct Setup {
    ws: Workspace,
    hosts: Vec<SshServer>,
    remote: PathBuf,
    known_hosts: PathBuf,
}

fn setup(n: usize) -> Setup {
    let ws = Workspace::new();
    let hosts: Vec<SshServer> = (0..n)
        .map(|_| SshServer::start(&servers::fresh_addr()))
        .collect();
    let refs: Vec<&SshServer> = hosts.iter().collect();
    let known_hosts = ws.known_hosts(&refs);
    let remote = ws.remote_dir("remote");
    Setup {
        ws,
        hosts,
        remote,
        known_hosts,
    }
}

impl Setup {
    /// A route section sending to `host` with key auth.
    fn route(&self, section: &str, host: &SshServer, extra: &str) -> String {
        format!(
            "[{section}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/{{host}}/%Y%m%d_%H%M%S\nconnect_timeout = 3s\nretries = 0\n{extra}\n",
            host.addr,
            host.port,
            servers::test_user().name,
            servers::keys().ed25519.display(),
            self.known_hosts.display(),
            self.remote.display(),
        )
    }

    fn config(&self, text: &str) -> PathBuf {
        let state = self.ws.path().join("state");
        self.ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n\n{text}",
            state.display()
        ))
    }

    /// Files delivered to `host` (relative to its dated dir), as name → bytes.
    fn delivered(&self, host: &str) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let base = self.remote.join(host);
        for dated in read_dir(&base) {
            for f in read_dir(&dated) {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                out.push((name, fs::read(&f).unwrap()));
            }
        }
        out.sort();
        out
    }
}

fn read_dir(p: &Path) -> Vec<PathBuf> {
    match fs::read_dir(p) {
        Ok(rd) => {
            let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

fn names(v: &[(String, Vec<u8>)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}

fn get<'a>(v: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &v.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} not delivered; have {:?}", names(v)))
        .1
}

#[test]
fn a_file_is_uploaded_to_the_dated_dir_on_both_hosts_and_installed() {
    let s = setup(2);
    let mut cfg = String::new();
    for (i, h) in s.hosts.iter().enumerate() {
        // two sections would shadow each other (first match wins), so give
        // each host its own route name pattern; the shared case is below
        cfg += &s.route(
            &format!("app{i}-"),
            h,
            "install_command = sha256sum {name} > {name}.installed && echo host=$DISPATCH_TEST_HOST >> {name}.installed",
        );
    }
    let cfg_path = s.config(&cfg);
    let a = s.ws.file("app0-1.0.tar.gz", b"zero");
    let b = s.ws.file("app1-2.0.tar.gz", &vec![7u8; 300_000]);
    let r =
        s.ws.dispatch()
            .args(["-c", cfg_path.to_str().unwrap()])
            .arg(&a)
            .arg(&b)
            .run()
            .assert_code(0);
    assert!(r.stdout.contains("installed"), "{}", r.stdout);
    let h0 = s.delivered(&s.hosts[0].addr);
    assert_eq!(names(&h0), ["app0-1.0.tar.gz", "app0-1.0.tar.gz.installed"]);
    assert_eq!(get(&h0, "app0-1.0.tar.gz"), b"zero");
    let marker = String::from_utf8_lossy(get(&h0, "app0-1.0.tar.gz.installed")).to_string();
    assert!(
        marker.contains(&format!("host={}", s.hosts[0].addr)),
        "{marker}"
    );
    let h1 = s.delivered(&s.hosts[1].addr);
    assert_eq!(get(&h1, "app1-2.0.tar.gz"), vec![7u8; 300_000].as_slice());
    // dated directory: YYYYmmdd_HHMMSS
    let dated = read_dir(&s.remote.join(&s.hosts[0].addr));
    let d = dated[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        d.len() == 15
            && d.as_bytes()[8] == b'_'
            && d.replace('_', "").bytes().all(|c| c.is_ascii_digit()),
        "{d}"
    );
}

/// Hosts sharing one route: every host of `host = a, b` gets the package.
#[test]
fn one_route_with_two_hosts_delivers_to_both() {
    let ws = Workspace::new();
    // both servers on the same port, different addresses
    let a = SshServer::start(&servers::fresh_addr());
    let b = SshServer::start_with(
        &servers::fresh_addr(),
        servers::SshOptions {
            port: Some(a.port),
            ..Default::default()
        },
    );
    let kh = ws.known_hosts(&[&a, &b]);
    let remote = ws.remote_dir("remote");
    let cfg = ws.write_config(&format!(
        "[dispatch]\nstate_dir = {state}\n[pkg]\nhost = {}, {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/{{host}}\ninstall_command = touch {{name}}.done\n",
        a.addr,
        b.addr,
        a.port,
        servers::test_user().name,
        servers::keys().ed25519.display(),
        kh.display(),
        remote.display(),
        state = ws.path().join("state").display(),
    ));
    let f = ws.file("pkg-1.zip", b"payload");
    ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&f)
        .run()
        .assert_code(0);
    for h in [&a, &b] {
        let d = remote.join(&h.addr);
        assert_eq!(fs::read(d.join("pkg-1.zip")).unwrap(), b"payload");
        assert!(d.join("pkg-1.zip.done").exists());
    }
}

#[test]
fn first_matching_section_wins_and_named_groups_fill_placeholders() {
    let s = setup(1);
    let h = &s.hosts[0];
    let cfg = format!(
        "[DEFAULT]\ninstall_command = echo default > {{name}}.how\n\n{}{}{}",
        s.route(
            r"(?P<app>web|api)-(?P<version>[0-9.]+)\.tar\.gz$",
            h,
            "install_command = echo {app} {version} {section} > {name}.how"
        ),
        s.route("web", h, "install_command = echo second > {name}.how"),
        s.route("other", h, ""),
    );
    let cfg = s.config(&cfg);
    let c = cfg.to_str().unwrap();
    // `route` explains without sending
    let r =
        s.ws.dispatch()
            .args([
                "-c",
                c,
                "--json",
                "route",
                "web-1.2.tar.gz",
                "webby.zip",
                "nothing",
            ])
            .run();
    assert_eq!(r.status, Some(3), "unrouted file → exit 3: {r:?}");
    let lines = servers::results(&r.stdout);
    assert_eq!(
        lines[0]["section"],
        r"(?P<app>web|api)-(?P<version>[0-9.]+)\.tar\.gz$"
    );
    assert_eq!(lines[0]["groups"]["version"], "1.2");
    assert_eq!(lines[1]["section"], "web");
    assert!(lines[2]["route"].is_null());
    assert!(s.delivered(&h.addr).is_empty(), "route must send nothing");

    let f1 = s.ws.file("web-1.2.tar.gz", b"1");
    let f2 = s.ws.file("webby.zip", b"2");
    let f3 = s.ws.file("other.bin", b"3");
    s.ws.dispatch()
        .args(["-c", c])
        .arg(&f1)
        .arg(&f2)
        .arg(&f3)
        .run()
        .assert_code(0);
    let got = s.delivered(&h.addr);
    let how = |n: &str| {
        String::from_utf8_lossy(get(&got, &format!("{n}.how")))
            .trim()
            .to_string()
    };
    let first_section = r"(?P<app>web|api)-(?P<version>[0-9.]+)\.tar\.gz$";
    assert_eq!(how("web-1.2.tar.gz"), format!("web 1.2 {first_section}"));
    assert_eq!(how("webby.zip"), "second");
    assert_eq!(
        how("other.bin"),
        "default",
        "[DEFAULT] install_command inherited"
    );
}

#[test]
fn a_file_that_matches_no_route_exits_3_and_sends_nothing() {
    let s = setup(1);
    let cfg = s.config(&s.route("known", &s.hosts[0], ""));
    let f = s.ws.file("unknown.tgz", b"x");
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .arg(&f)
            .run()
            .assert_code(3);
    assert!(r.stderr.contains("no route"), "{}", r.stderr);
    assert!(s.delivered(&s.hosts[0].addr).is_empty());
}

fn auth_route(s: &Setup, h: &SshServer, auth: &str) -> String {
    format!(
        "[pkg]\nhost = {}\nport = {}\nknown_hosts = {}\ndest_dir = {}/{{host}}/d\nconnect_timeout = 3s\nretries = 0\ninstall_command = echo ok > {{name}}.ok\n{auth}\n",
        h.addr,
        h.port,
        s.known_hosts.display(),
        s.remote.display()
    )
}

#[test]
fn password_auth_works() {
    let s = setup(1);
    let u = servers::test_user();
    let cfg = s.config(&auth_route(
        &s,
        &s.hosts[0],
        &format!("login = {}\npassword = {}", u.name, u.password),
    ));
    let f = s.ws.file("pkg-pw", b"pw");
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "-vv"])
            .arg(&f)
            .run()
            .assert_code(0);
    assert!(
        !r.stderr.contains(&u.password),
        "password leaked into the log: {}",
        r.stderr
    );
    assert_eq!(get(&s.delivered(&s.hosts[0].addr), "pkg-pw"), b"pw");
}

#[test]
fn rsa_key_auth_works() {
    let s = setup(1);
    let u = servers::test_user();
    let cfg = s.config(&auth_route(
        &s,
        &s.hosts[0],
        &format!(
            "login = {}\nidentity_file = {}",
            u.name,
            servers::keys().rsa.display()
        ),
    ));
    let f = s.ws.file("pkg-rsa", b"rsa");
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&f)
        .run()
        .assert_code(0);
    assert_eq!(get(&s.delivered(&s.hosts[0].addr), "pkg-rsa"), b"rsa");
}

#[test]
fn agent_auth_works() {
    let s = setup(1);
    let agent = servers::start_agent(&servers::keys().ed25519);
    let cfg = s.config(&auth_route(
        &s,
        &s.hosts[0],
        &format!("login = {}", servers::test_user().name),
    ));
    let f = s.ws.file("pkg-agent", b"agent");
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .env("SSH_AUTH_SOCK", agent.sock.to_str().unwrap())
        .arg(&f)
        .run()
        .assert_code(0);
    assert_eq!(get(&s.delivered(&s.hosts[0].addr), "pkg-agent"), b"agent");
}

#[test]
fn netrc_supplies_login_and_password() {
    let s = setup(1);
    let u = servers::test_user();
    let h = &s.hosts[0];
    let netrc = s.ws.netrc(&format!(
        "machine {} login {} password {}\n",
        h.addr, u.name, u.password
    ));
    let cfg = s.config(&auth_route(&s, h, ""));
    let f = s.ws.file("pkg-netrc", b"netrc");
    s.ws.dispatch()
        .args([
            "-c",
            cfg.to_str().unwrap(),
            "--netrc",
            netrc.to_str().unwrap(),
        ])
        .arg(&f)
        .run()
        .assert_code(0);
    assert_eq!(get(&s.delivered(&h.addr), "pkg-netrc"), b"netrc");
    // a netrc readable by others is refused for its passwords (like ftp(1))
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&netrc, fs::Permissions::from_mode(0o644)).unwrap();
    let r =
        s.ws.dispatch()
            .args([
                "-c",
                cfg.to_str().unwrap(),
                "--netrc",
                netrc.to_str().unwrap(),
            ])
            .arg(&f)
            .run()
            .assert_code(1);
    assert!(r.stderr.contains("readable by others"), "{}", r.stderr);
}

#[test]
fn unknown_host_key_is_refused_under_strict_with_a_fix_and_recorded_under_accept_new() {
    let s = setup(1);
    let h = &s.hosts[0];
    let empty_kh = s.ws.path().join("empty_known_hosts");
    let route = |policy: &str, kh: &Path| {
        format!(
            "[pkg]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nhost_key_check = {policy}\ndest_dir = {}/{{host}}/d\nretries = 0\ntransfer = scp\n",
            h.addr,
            h.port,
            servers::test_user().name,
            servers::keys().ed25519.display(),
            kh.display(),
            s.remote.display()
        )
    };
    let f = s.ws.file("pkg-hk", b"hk");
    let cfg = s.config(&route("strict", &empty_kh));
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .arg(&f)
            .run()
            .assert_code(1);
    assert!(r.stdout.contains("host key not known"), "{}", r.stdout);
    assert!(
        r.stdout.contains("ssh-keyscan -p"),
        "the message says how to fix it: {}",
        r.stdout
    );
    assert!(s.delivered(&h.addr).is_empty());

    let cfg = s.config(&route("accept-new", &empty_kh));
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&f)
        .run()
        .assert_code(0);
    let recorded = fs::read_to_string(&empty_kh).unwrap();
    assert!(
        recorded.contains(&format!("[{}]:{} ssh-ed25519 ", h.addr, h.port)),
        "{recorded}"
    );
    // and now strict accepts it
    let cfg = s.config(&route("strict", &empty_kh));
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&f)
        .run()
        .assert_code(0);
}

#[test]
fn a_changed_host_key_is_refused_even_under_accept_new() {
    let s = setup(1);
    let good = &s.hosts[0];
    // a server on the same address:port later presenting another key
    let kh = s.ws.known_hosts(&[good]);
    let addr = good.addr.clone();
    let port = good.port;
    let mut hosts = s.hosts;
    hosts[0].kill();
    let _imposter = SshServer::start_with(
        &addr,
        servers::SshOptions {
            host_key: Some(servers::new_host_key()),
            port: Some(port),
            ..Default::default()
        },
    );
    for policy in ["strict", "accept-new"] {
        let cfg = s.ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n[pkg]\nhost = {addr}\nport = {port}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nhost_key_check = {policy}\nretries = 0\ntransfer = scp\ndest_dir = {}/x\n",
            s.ws.path().join("state").display(),
            servers::test_user().name,
            servers::keys().ed25519.display(),
            kh.display(),
            s.remote.display(),
        ));
        let f = s.ws.file("pkg-changed", b"x");
        let r =
            s.ws.dispatch()
                .args(["-c", cfg.to_str().unwrap()])
                .arg(&f)
                .run()
                .assert_code(1);
        assert!(
            r.stdout.contains("HOST KEY CHANGED"),
            "{policy}: {}",
            r.stdout
        );
    }
    assert!(!s.remote.join("x").exists());
}

#[test]
fn a_wrong_password_fails_clearly_and_the_other_host_is_still_done() {
    let s = setup(2);
    let u = servers::test_user();
    let (good, bad) = (&s.hosts[0], &s.hosts[1]);
    let cfg = format!(
        "{}\n[pkg]\nhost = {}\nport = {}\nlogin = {}\npassword = not-the-password\nknown_hosts = {}\ndest_dir = {}/{{host}}\ntransfer = scp\nretries = 2\n",
        s.route("pkg", good, ""),
        bad.addr,
        bad.port,
        u.name,
        s.known_hosts.display(),
        s.remote.display()
    );
    // two sections with the same name are an error: use different patterns
    let cfg = cfg
        .replacen("[pkg]", "[pkg-good]", 1)
        .replacen("[pkg]", "[pkg-]", 1);
    let cfg = s.config(&cfg);
    let ok = s.ws.file("pkg-good-1", b"g");
    let ko = s.ws.file("pkg-bad-1", b"b");
    let started = Instant::now();
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .arg(&ok)
            .arg(&ko)
            .run()
            .assert_code(1);
    assert!(r.stdout.contains("rejected"), "{}", r.stdout);
    assert!(!r.stdout.contains("not-the-password") && !r.stderr.contains("not-the-password"));
    // auth rejection is not retried (retries = 2 would add ≥ 2 s of backoff)
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(get(&s.delivered(&good.addr), "pkg-good-1"), b"g");
}

#[test]
fn a_closed_port_and_a_dropping_host_fail_within_connect_timeout_while_others_finish() {
    let s = setup(1);
    let good = &s.hosts[0];
    let dropping = servers::fresh_addr();
    let _blocked = servers::block(&dropping, &[2222]);
    let closed = servers::fresh_addr(); // nothing listens there
    let user = servers::test_user();
    let extra = |addr: &str, port: u16| {
        format!(
            "host = {addr}\nport = {port}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nconnect_timeout = 2s\nretries = 0\ntransfer = scp\ndest_dir = {}/x\n",
            user.name,
            servers::keys().ed25519.display(),
            s.known_hosts.display(),
            s.remote.display()
        )
    };
    let cfg = format!(
        "{}[drop-]\n{}\n[closed-]\n{}\n",
        s.route("good-", good, ""),
        extra(&dropping, 2222),
        extra(&closed, 2222)
    );
    let cfg = s.config(&cfg);
    let files = [
        s.ws.file("good-1", b"1"),
        s.ws.file("drop-1", b"2"),
        s.ws.file("closed-1", b"3"),
    ];
    let started = Instant::now();
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .args(&files)
            .run()
            .assert_code(1);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "connect_timeout 2s, took {took:?}"
    );
    assert!(
        r.stdout.contains("drop-1") && r.stdout.contains("timed out"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("closed-1") && r.stdout.contains("FAILED"),
        "{}",
        r.stdout
    );
    assert_eq!(get(&s.delivered(&good.addr), "good-1"), b"1");
}

#[test]
fn install_failures_huge_output_and_timeouts_are_reported() {
    let s = setup(1);
    let h = &s.hosts[0];
    let cfg = format!(
        "{}{}{}",
        s.route("fail-", h, "install_command = echo about to fail; exit 7"),
        s.route("loud-", h, "install_command = head -c 8000000 /dev/zero | tr '\\0' x >&2; echo; echo last-line-of-loud >&2"),
        s.route("slow-", h, "install_command = sleep 30\ninstall_timeout = 2s"),
    );
    let cfg = s.config(&cfg);
    let files = [
        s.ws.file("fail-1", b"f"),
        s.ws.file("loud-1", b"l"),
        s.ws.file("slow-1", b"s"),
    ];
    let started = Instant::now();
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .args(&files)
            .run()
            .assert_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    let res = servers::results(&r.stdout);
    let by = |f: &str| servers::one(&res, f);
    assert_eq!(by("fail-1")["exit_status"], 7);
    assert_eq!(by("fail-1")["ok"], false);
    assert!(by("fail-1")["output_tail"]
        .as_str()
        .unwrap()
        .contains("about to fail"));
    assert_eq!(by("loud-1")["ok"], true, "8 MB on stderr must not deadlock");
    assert_eq!(by("slow-1")["ok"], false);
    assert!(
        by("slow-1")["error"]
            .as_str()
            .unwrap()
            .contains("install_timeout"),
        "{:?}",
        by("slow-1")
    );
    // a failed install is not a failed upload: the files are there
    let got = s.delivered(&h.addr);
    assert_eq!(get(&got, "fail-1"), b"f");
    assert_eq!(get(&got, "slow-1"), b"s");
}

#[test]
fn hostile_file_names_are_only_names() {
    let s = setup(1);
    let h = &s.hosts[0];
    // would-be injections create PWNED in the install's working directory
    let evil = [
        "a b;$(touch PWNED)'.tar.gz",
        "q\"uo`touch PWNED`te.tar.gz",
        "-rf.tar.gz",
        "new\nline.tar.gz",
        "ünïcødé ✓.tar.gz",
        "semi;touch PWNED;.tar.gz",
        "$(touch PWNED)",
    ]
    .map(String::from);
    let cfg = s.config(&s.route(
        ".",
        h,
        "install_command = cp -- {name} {name}.copy && printf '%s' {file} > {name}.path",
    ));
    let files: Vec<PathBuf> = evil.iter().map(|n| s.ws.file(n, n.as_bytes())).collect();
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .args(&files)
        .run()
        .assert_code(0);
    let got = s.delivered(&h.addr);
    for n in &evil {
        assert_eq!(get(&got, n), n.as_bytes(), "{n:?}");
        assert_eq!(get(&got, &format!("{n}.copy")), n.as_bytes(), "{n:?}");
        let path = String::from_utf8_lossy(get(&got, &format!("{n}.path"))).to_string();
        assert!(path.ends_with(n.as_str()), "{path:?}");
    }
    assert!(
        !got.iter().any(|(n, _)| n == "PWNED"),
        "an injected command ran"
    );
    assert!(
        !servers::test_user().home.join("PWNED").exists(),
        "an injected command ran"
    );
    assert!(!got.iter().any(|(n, _)| n.ends_with(".part")));
}

#[test]
fn malformed_configs_exit_2_naming_file_and_line() {
    let ws = Workspace::new();
    let f = ws.file("x-1", b"x");
    let cases: &[(&str, usize, &str)] = &[
        ("[x]\nhost = h\n[x(]\nhost = h\n", 3, "regular expression"),
        ("[x]\nlogin = u\n", 1, "host: missing"),
        ("[x]\nhost = h\nport = 70000\n", 3, "port"),
        ("[x]\nhost = h\nhots = h\n", 3, "did you mean `host`"),
        ("[x]\nhost = h\n\n[x]\nhost = i\n", 4, "duplicate section"),
        ("[x]\nhost = h\nhost = i\n", 3, "duplicate key"),
        ("[x]\nhost = h\nconnect_timeout = soon\n", 3, "duration"),
        (
            "[x]\nhost = h\njust some words\n",
            3,
            "expected `key = value`",
        ),
        ("host = h\n[x]\nhost = h\n", 1, "before any [section]"),
        ("[x\nhost = h\n", 1, "must end with ']'"),
        (
            "[x]\nhost = h\ninstall_command = run {nope}\n",
            3,
            "unknown placeholder",
        ),
        ("[x]\nhost = h\nverify = md5\n", 3, "verify"),
        ("[dispatch]\njobs = 0\n[x]\nhost = h\n", 2, "jobs"),
        (
            "[x]\nhost = h\nhost_key_check = maybe\n",
            3,
            "host_key_check",
        ),
    ];
    for (text, line, what) in cases {
        let cfg = ws.write_config(text);
        let r = ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .arg(&f)
            .run()
            .assert_code(2);
        let want = format!("{}:{line}: ", cfg.display());
        assert!(
            r.stderr.contains(&want),
            "{text:?}: want {want:?} in {}",
            r.stderr
        );
        assert!(
            r.stderr.contains(what),
            "{text:?}: want {what:?} in {}",
            r.stderr
        );
        // `check` reports the same, also with exit 2
        ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "check"])
            .run()
            .assert_code(2);
    }
    // all problems at once
    let cfg = ws.write_config("[a(]\nhost = h\n[b]\nport = x\n");
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check"])
        .run()
        .assert_code(2);
    assert!(
        r.stderr.contains(":1: ") && r.stderr.contains(":3: ") && r.stderr.contains(":4: "),
        "{}",
        r.stderr
    );
}

#[test]
fn the_legacy_config_loads_unchanged() {
    let ws = Workspace::new();
    let cfg = ws.write_config(
        "[ibps]\nhost = 10.8.6.10\nlogin = ibpsusr\npassword = 123456\ninstall_command = touch /tmp/installed\n\n[cnaps2]\nhost = 10.8.6.10\nlogin = cnaps2\npassword = 123456\n",
    );
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check"])
        .run()
        .assert_code(0);
    assert!(r.stdout.contains("2 routes"), "{}", r.stdout);
    let r = ws
        .dispatch()
        .args([
            "-c",
            cfg.to_str().unwrap(),
            "--json",
            "route",
            "ibps-1.2.tar.gz",
        ])
        .run()
        .assert_code(0);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["section"], "ibps");
    assert_eq!(v["login"], "ibpsusr");
    assert!(v["dest_dir"].as_str().unwrap().starts_with("newcx/"), "{v}");
    assert!(!r.stdout.contains("123456"), "password shown by route");
}

#[test]
fn no_file_is_ever_visible_under_its_final_name_before_it_is_complete() {
    let s = setup(1);
    let h = &s.hosts[0];
    let cfg = s.config(&s.route("big-", h, "verify = sha256"));
    let size = 64 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let f = s.ws.file("big-1.bin", &data);
    let watch_dir = s.remote.join(&h.addr);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let watcher = std::thread::spawn(move || {
        let mut partial_seen = 0u32;
        let mut part_seen = false;
        while !d2.load(std::sync::atomic::Ordering::SeqCst) {
            for dated in read_dir(&watch_dir) {
                for p in read_dir(&dated) {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    if name == "big-1.bin" && len != size as u64 {
                        partial_seen += 1;
                    }
                    if name.ends_with(".part") {
                        part_seen = true;
                    }
                }
            }
        }
        (partial_seen, part_seen)
    });
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&f)
        .run()
        .assert_code(0);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (partial, _part_seen) = watcher.join().unwrap();
    assert_eq!(partial, 0, "final name seen with partial content");
    let got = s.delivered(&h.addr);
    assert_eq!(names(&got), ["big-1.bin"], "no .part left behind");
    assert!(get(&got, "big-1.bin") == data.as_slice());
}

#[test]
fn check_connect_logs_in_to_every_host_and_reports() {
    let s = setup(2);
    let cfg = format!(
        "{}{}[dead]\nhost = {}\nport = 2222\nconnect_timeout = 1s\nlogin = x\nknown_hosts = {}\n",
        s.route("a", &s.hosts[0], ""),
        s.route("b", &s.hosts[1], ""),
        servers::fresh_addr(),
        s.known_hosts.display()
    );
    let cfg = s.config(&cfg);
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "check", "--connect"])
            .run()
            .assert_code(1);
    assert_eq!(r.stdout.matches(": ok (").count(), 2, "{}", r.stdout);
    assert!(
        r.stdout.contains("[dead]") && r.stdout.contains("FAILED"),
        "{}",
        r.stdout
    );
}

#[test]
fn dry_run_and_stdin_file_lists() {
    let s = setup(1);
    let cfg = s.config(&s.route("pkg", &s.hosts[0], "install_command = touch {name}.done"));
    let a = s.ws.file("pkg-a", b"a");
    let b = s.ws.file("pkg b\nwith newline", b"b");
    let r =
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--dry-run"])
            .arg(&a)
            .run()
            .assert_code(0);
    assert!(r.stdout.contains("dry-run"), "{}", r.stdout);
    assert!(
        s.delivered(&s.hosts[0].addr).is_empty(),
        "dry run sent something"
    );
    let mut list = Vec::new();
    list.extend_from_slice(a.as_os_str().as_encoded_bytes());
    list.push(0);
    list.extend_from_slice(b.as_os_str().as_encoded_bytes());
    list.push(0);
    s.ws.dispatch()
        .args(["-c", cfg.to_str().unwrap(), "-0", "-"])
        .stdin(list)
        .run()
        .assert_code(0);
    let got = s.delivered(&s.hosts[0].addr);
    assert_eq!(get(&got, "pkg-a"), b"a");
    assert_eq!(get(&got, "pkg b\nwith newline"), b"b");
}

#[test]
fn a_host_without_sftp_gets_the_same_verify_rename_and_install_through_a_shell() {
    let ws = Workspace::new();
    let h = SshServer::start_with(
        &servers::fresh_addr(),
        servers::SshOptions {
            extra_config: "Subsystem sftp /bin/false\n".into(),
            ..Default::default()
        },
    );
    let kh = ws.known_hosts(&[&h]);
    let remote = ws.remote_dir("remote");
    let cfg = ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n[pkg]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/d\ninstall_command = sha256sum {{name}} > {{name}}.installed\n",
        ws.path().join("state").display(),
        h.addr,
        h.port,
        servers::test_user().name,
        servers::keys().ed25519.display(),
        kh.display(),
        remote.display(),
    ));
    let files: Vec<PathBuf> = (0..3)
        .map(|i| ws.file(&format!("pkg-{i}"), format!("content {i}").as_bytes()))
        .collect();
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "-vv"])
        .args(&files)
        .run()
        .assert_code(0);
    assert!(
        r.stderr.contains("no SFTP"),
        "the shell path was not taken: {}",
        r.stderr
    );
    for i in 0..3 {
        let d = remote.join("d");
        assert_eq!(
            fs::read(d.join(format!("pkg-{i}"))).unwrap(),
            format!("content {i}").as_bytes()
        );
        let marker = fs::read_to_string(d.join(format!("pkg-{i}.installed"))).unwrap();
        assert!(marker.contains(&format!("pkg-{i}")), "{marker}");
    }
    assert!(!read_dir(&remote.join("d"))
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".part")));
}

#[test]
fn a_host_without_bash_gets_the_sh_runner_and_its_installs_are_still_bounded() {
    let ws = Workspace::new();
    // the session's PATH holds only what the fallback needs: no bash
    let bin = ws.path().join("nobash-bin");
    fs::create_dir_all(&bin).unwrap();
    for tool in [
        "sh",
        "timeout",
        "scp",
        "mkdir",
        "mv",
        "rm",
        "cat",
        "wc",
        "sha256sum",
        "sleep",
    ] {
        let target = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        std::os::unix::fs::symlink(target, bin.join(tool)).unwrap();
    }
    let plain = SshServer::start(&servers::fresh_addr());
    let nobash = SshServer::start_with(
        &servers::fresh_addr(),
        servers::SshOptions {
            extra_config: format!("SetEnv PATH={}\n", bin.display()),
            ..Default::default()
        },
    );
    let kh = ws.known_hosts(&[&plain, &nobash]);
    let remote = ws.remote_dir("remote");
    let mut cfg = format!(
        "[dispatch]\nstate_dir = {}\n",
        ws.path().join("state").display()
    );
    for (prefix, h) in [("a-", &plain), ("b-", &nobash)] {
        cfg.push_str(&format!(
            "[{prefix}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/{prefix}\n",
            h.addr,
            h.port,
            servers::test_user().name,
            servers::keys().ed25519.display(),
            kh.display(),
            remote.display(),
        ));
        // which shell ran the install: `sh` under the sh runner's
        // `timeout … sh -c`, `dispatch-bounded` under the bash runner
        cfg.push_str(
            "install_command = if [ {name} = b-slow ]; then sleep 30; fi; echo \"$0\" > {name}.shell\ninstall_timeout = 2s\n",
        );
    }
    let cfg = ws.write_config(&cfg);
    let files = [
        ws.file("a-1", b"a"),
        ws.file("b-1", b"b"),
        ws.file("b-slow", b"s"),
    ];
    let started = Instant::now();
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--json"])
        .args(&files)
        .run()
        .assert_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    let shell = |dir: &str, name: &str| {
        fs::read_to_string(remote.join(dir).join(format!("{name}.shell")))
            .unwrap_or_else(|e| panic!("{dir}/{name}.shell: {e}; {}", r.stdout))
    };
    assert_eq!(shell("a-", "a-1").trim(), "dispatch-bounded");
    assert_eq!(shell("b-", "b-1").trim(), "sh");
    assert_eq!(fs::read(remote.join("b-").join("b-1")).unwrap(), b"b");
    let res = servers::results(&r.stdout);
    let slow = servers::one(&res, "b-slow");
    assert_eq!(slow["ok"], false);
    assert!(
        slow["error"].as_str().unwrap().contains("install_timeout"),
        "{slow:?}"
    );
}
