//! `dispatch FILE…` end to end against real sshd hosts on loopback.
//!
//! Every scenario that delivers runs twice ([`crate::scenario!`]): with an
//! absolute `dest_dir` on hosts sharing the test user, and with the default
//! `dest_dir` (no key: `~/newcx/%Y%m%d_%H%M%S`) on hosts with users of their
//! own, at least 3 files per session per host.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::scenario;
use crate::servers::{self, Placement, SshServer, Workspace};

/// `n` hosts and a workspace whose remote dir is writable by the test user.
struct Setup {
    p: Placement,
    ws: Workspace,
    hosts: Vec<SshServer>,
    remote: PathBuf,
    known_hosts: PathBuf,
}

fn setup(p: Placement, n: usize) -> Setup {
    let ws = Workspace::new();
    let hosts: Vec<SshServer> = (0..n).map(|_| p.start(&servers::fresh_addr())).collect();
    let refs: Vec<&SshServer> = hosts.iter().collect();
    let known_hosts = ws.known_hosts(&refs);
    let remote = ws.remote_dir("remote");
    Setup {
        p,
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
            "[{section}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n{}connect_timeout = 3s\nretries = 0\n{extra}\n",
            host.addr,
            host.port,
            host.user().name,
            servers::keys().ed25519.display(),
            self.known_hosts.display(),
            self.dest_dir(&format!("{}/{{host}}/%Y%m%d_%H%M%S", self.remote.display())),
        )
    }

    /// `dest_dir = template` under the explicit placement, else nothing.
    fn dest_dir(&self, template: &str) -> String {
        self.p.dest_dir_line(template)
    }

    fn config(&self, text: &str) -> PathBuf {
        let state = self.ws.path().join("state");
        self.ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n\n{text}",
            state.display()
        ))
    }

    /// Where `host` keeps its dated dirs: `<remote>/<addr>`, or
    /// `<its user's home>/newcx` under the default dest_dir.
    fn root(&self, host: &SshServer) -> PathBuf {
        self.p.root(host, self.remote.join(&host.addr))
    }

    /// Files delivered to `host` (relative to its dated dir), as name → bytes.
    fn delivered(&self, host: &SshServer) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for dated in read_dir(&self.root(host)) {
            for f in read_dir(&dated) {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                out.push((name, fs::read(&f).unwrap()));
            }
        }
        out.sort();
        out
    }

    /// Three packages `<stem>-1…3` with contents `<stem> 1…3`.
    fn three(&self, stem: &str) -> Vec<PathBuf> {
        (1..=3)
            .map(|k| {
                self.ws
                    .file(&format!("{stem}-{k}"), format!("{stem} {k}").as_bytes())
            })
            .collect()
    }

    /// The three packages of [`three`](Self::three) are on `host`, intact.
    #[track_caller]
    fn assert_three(&self, host: &SshServer, stem: &str) {
        let got = self.delivered(host);
        for k in 1..=3 {
            assert_eq!(
                get(&got, &format!("{stem}-{k}")),
                format!("{stem} {k}").as_bytes()
            );
        }
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

/// `YYYYmmdd_HHMMSS`.
fn is_dated(d: &str) -> bool {
    d.len() == 15
        && d.as_bytes()[8] == b'_'
        && d.replace('_', "").bytes().all(|c| c.is_ascii_digit())
}

scenario! {
    /// Three packages per host in one run: all in one dated dir per host,
    /// each installed there, nothing on the other host.
    fn a_file_is_uploaded_to_the_dated_dir_on_both_hosts_and_installed(p: Placement) {
        let s = setup(p, 2);
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
        let content = |i: usize, k: u8| -> Vec<u8> {
            if i == 0 {
                format!("zero {k}").into_bytes()
            } else {
                vec![7 + k; 300_000]
            }
        };
        let mut files = Vec::new();
        for i in 0..2 {
            for k in 0..3u8 {
                files.push(s.ws.file(&format!("app{i}-1.{k}.tar.gz"), &content(i, k)));
            }
        }
        let r =
            s.ws.dispatch()
                .args(["-c", cfg_path.to_str().unwrap()])
                .args(&files)
                .run()
                .assert_code(0);
        assert!(r.stdout.contains("installed"), "{}", r.stdout);
        for (i, h) in s.hosts.iter().enumerate() {
            let got = s.delivered(h);
            let want: Vec<String> = (0..3)
                .flat_map(|k| {
                    let n = format!("app{i}-1.{k}.tar.gz");
                    [n.clone(), format!("{n}.installed")]
                })
                .collect();
            assert_eq!(names(&got), want, "host {i}");
            for k in 0..3u8 {
                let n = format!("app{i}-1.{k}.tar.gz");
                assert!(get(&got, &n) == content(i, k).as_slice(), "{n}");
                let marker = String::from_utf8_lossy(get(&got, &format!("{n}.installed"))).to_string();
                assert!(marker.contains(&format!("host={}", h.addr)), "{marker}");
            }
            // one dated directory, YYYYmmdd_HHMMSS, for the whole run
            let dated = read_dir(&s.root(h));
            assert_eq!(dated.len(), 1, "{dated:?}");
            let d = dated[0].file_name().unwrap().to_string_lossy().into_owned();
            assert!(is_dated(&d), "{d}");
        }
    }
}

scenario! {
    /// Hosts sharing one route: every host of `host = a, b` gets the packages.
    /// Under the default dest_dir the hosts have different logins, so the
    /// route names none and a netrc gives each host's.
    fn one_route_with_two_hosts_delivers_to_both(p: Placement) {
        let ws = Workspace::new();
        // both servers on the same port, different addresses
        let a = p.start(&servers::fresh_addr());
        let b = p.start_with(
            &servers::fresh_addr(),
            servers::SshOptions {
                port: Some(a.port),
                ..Default::default()
            },
        );
        let kh = ws.known_hosts(&[&a, &b]);
        let remote = ws.remote_dir("remote");
        let login = match p {
            Placement::Explicit => format!("login = {}\n", servers::test_user().name),
            Placement::Defaults => {
                let netrc: String = [&a, &b]
                    .iter()
                    .map(|h| {
                        format!(
                            "machine {} login {} password {}\n",
                            h.addr,
                            h.user().name,
                            h.user().password
                        )
                    })
                    .collect();
                ws.netrc(&netrc);
                String::new()
            }
        };
        let cfg = ws.write_config(&format!(
            "[dispatch]\nstate_dir = {state}\n[pkg]\nhost = {}, {}\nport = {}\n{login}identity_file = {}\nknown_hosts = {}\n{}install_command = touch {{name}}.done\n",
            a.addr,
            b.addr,
            a.port,
            servers::keys().ed25519.display(),
            kh.display(),
            p.dest_dir_line(format!("{}/{{host}}", remote.display())),
            state = ws.path().join("state").display(),
        ));
        let files: Vec<PathBuf> = (1..=3)
            .map(|k| ws.file(&format!("pkg-{k}.zip"), format!("payload {k}").as_bytes()))
            .collect();
        ws.send(&cfg, &files)
            .run()
            .assert_code(0);
        for h in [&a, &b] {
            let root = p.root(h, remote.join(&h.addr));
            for k in 1..=3 {
                let copies = servers::delivered_copies(&root, &format!("pkg-{k}.zip"));
                assert_eq!(copies.len(), 1, "{}: {copies:?}", h.addr);
                assert_eq!(fs::read(&copies[0]).unwrap(), format!("payload {k}").as_bytes());
                assert!(copies[0].with_file_name(format!("pkg-{k}.zip.done")).exists());
            }
        }
    }
}

scenario! {
    fn first_matching_section_wins_and_named_groups_fill_placeholders(p: Placement) {
        let s = setup(p, 1);
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
        let lines = servers::json_lines(&r.stdout);
        assert_eq!(
            lines[0]["section"],
            r"(?P<app>web|api)-(?P<version>[0-9.]+)\.tar\.gz$"
        );
        assert_eq!(lines[0]["groups"]["version"], "1.2");
        assert_eq!(lines[1]["section"], "web");
        assert!(lines[2]["route"].is_null());
        assert!(s.delivered(h).is_empty(), "route must send nothing");

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
        let got = s.delivered(h);
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
}

scenario! {
    fn a_file_that_matches_no_route_exits_3_and_sends_nothing(p: Placement) {
        let s = setup(p, 1);
        let cfg = s.config(&s.route("known", &s.hosts[0], ""));
        let files = s.three("unknown.tgz");
        let r =
            s.ws.send(&cfg, &files)
                .run()
                .assert_code(3);
        assert!(r.stderr.contains("no route"), "{}", r.stderr);
        assert!(s.delivered(&s.hosts[0]).is_empty());
    }
}

fn auth_route(s: &Setup, h: &SshServer, auth: &str) -> String {
    format!(
        "[pkg]\nhost = {}\nport = {}\nknown_hosts = {}\n{}connect_timeout = 3s\nretries = 0\ninstall_command = echo ok > {{name}}.ok\n{auth}\n",
        h.addr,
        h.port,
        s.known_hosts.display(),
        s.dest_dir(&format!("{}/{{host}}/d", s.remote.display())),
    )
}

scenario! {
    fn password_auth_works(p: Placement) {
        let s = setup(p, 1);
        let u = s.hosts[0].user();
        let cfg = s.config(&auth_route(
            &s,
            &s.hosts[0],
            &format!("login = {}\npassword = {}", u.name, u.password),
        ));
        let files = s.three("pkg-pw");
        let r =
            s.ws.dispatch()
                .args(["-c", cfg.to_str().unwrap(), "-vv"])
                .args(&files)
                .run()
                .assert_code(0);
        assert!(
            !r.stderr.contains(&u.password),
            "password leaked into the log: {}",
            r.stderr
        );
        s.assert_three(&s.hosts[0], "pkg-pw");
    }
}

scenario! {
    fn rsa_key_auth_works(p: Placement) {
        let s = setup(p, 1);
        let cfg = s.config(&auth_route(
            &s,
            &s.hosts[0],
            &format!(
                "login = {}\nidentity_file = {}",
                s.hosts[0].user().name,
                servers::keys().rsa.display()
            ),
        ));
        let files = s.three("pkg-rsa");
        s.ws.send(&cfg, &files)
            .run()
            .assert_code(0);
        s.assert_three(&s.hosts[0], "pkg-rsa");
    }
}

scenario! {
    fn agent_auth_works(p: Placement) {
        let s = setup(p, 1);
        let agent = servers::start_agent(&servers::keys().ed25519);
        let cfg = s.config(&auth_route(
            &s,
            &s.hosts[0],
            &format!("login = {}", s.hosts[0].user().name),
        ));
        let files = s.three("pkg-agent");
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .env("SSH_AUTH_SOCK", agent.sock.to_str().unwrap())
            .args(&files)
            .run()
            .assert_code(0);
        s.assert_three(&s.hosts[0], "pkg-agent");
    }
}

scenario! {
    fn netrc_supplies_login_and_password(p: Placement) {
        let s = setup(p, 1);
        let h = &s.hosts[0];
        let u = h.user();
        let netrc = s.ws.netrc(&format!(
            "machine {} login {} password {}\n",
            h.addr, u.name, u.password
        ));
        let cfg = s.config(&auth_route(&s, h, ""));
        let files = s.three("pkg-netrc");
        s.ws.dispatch()
            .args([
                "-c",
                cfg.to_str().unwrap(),
                "--netrc",
                netrc.to_str().unwrap(),
            ])
            .args(&files)
            .run()
            .assert_code(0);
        s.assert_three(h, "pkg-netrc");
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
                .args(&files)
                .run()
                .assert_code(1);
        assert!(r.stderr.contains("readable by others"), "{}", r.stderr);
    }
}

scenario! {
    fn unknown_host_key_is_refused_under_strict_with_a_fix_and_recorded_under_accept_new(
        p: Placement
    ) {
        let s = setup(p, 1);
        let h = &s.hosts[0];
        let empty_kh = s.ws.path().join("empty_known_hosts");
        let route = |policy: &str, kh: &Path| {
            format!(
                "[pkg]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nhost_key_check = {policy}\n{}retries = 0\ntransfer = scp\n",
                h.addr,
                h.port,
                h.user().name,
                servers::keys().ed25519.display(),
                kh.display(),
                s.dest_dir(&format!("{}/{{host}}/d", s.remote.display())),
            )
        };
        let files = s.three("pkg-hk");
        let cfg = s.config(&route("strict", &empty_kh));
        let r =
            s.ws.send(&cfg, &files)
                .run()
                .assert_code(1);
        assert!(r.stdout.contains("host key not known"), "{}", r.stdout);
        assert!(
            r.stdout.contains("ssh-keyscan -p"),
            "the message says how to fix it: {}",
            r.stdout
        );
        assert!(s.delivered(h).is_empty());

        let cfg = s.config(&route("accept-new", &empty_kh));
        s.ws.send(&cfg, &files)
            .run()
            .assert_code(0);
        s.assert_three(h, "pkg-hk");
        let recorded = fs::read_to_string(&empty_kh).unwrap();
        assert!(
            recorded.contains(&format!("[{}]:{} ssh-ed25519 ", h.addr, h.port)),
            "{recorded}"
        );
        // and now strict accepts it
        let cfg = s.config(&route("strict", &empty_kh));
        s.ws.send(&cfg, &files)
            .run()
            .assert_code(0);
    }
}

scenario! {
    /// The imposter gets nothing; a second, honest host of the same run gets
    /// its three packages.
    fn a_changed_host_key_is_refused_even_under_accept_new(p: Placement) {
        let s = setup(p, 2);
        let good = &s.hosts[0];
        // a server on the same address:port later presenting another key
        // (under the default dest_dir: another machine, with its own user)
        let addr = good.addr.clone();
        let port = good.port;
        let login = good.user().name.clone();
        let good_root = p.root(good, s.remote.join("x"));
        let mut hosts = s.hosts;
        hosts[0].kill();
        let imposter = p.start_with(
            &addr,
            servers::SshOptions {
                host_key: Some(servers::new_host_key()),
                port: Some(port),
                ..Default::default()
            },
        );
        let honest = &hosts[1];
        let s = Setup {
            hosts: Vec::new(),
            ..s
        };
        for policy in ["strict", "accept-new"] {
            let cfg = s.config(&format!(
                "[pkg-]\nhost = {addr}\nport = {port}\nlogin = {login}\nidentity_file = {}\nknown_hosts = {}\nhost_key_check = {policy}\nretries = 0\ntransfer = scp\n{}\n{}",
                servers::keys().ed25519.display(),
                s.known_hosts.display(),
                s.dest_dir(&format!("{}/x", s.remote.display())),
                s.route("ok-", honest, &format!("host_key_check = {policy}")),
            ));
            let mut files = s.three("pkg-changed");
            files.extend(s.three(&format!("ok-{policy}")));
            let r =
                s.ws.send(&cfg, &files)
                    .run()
                    .assert_code(1);
            assert!(
                r.stdout.contains("HOST KEY CHANGED"),
                "{policy}: {}",
                r.stdout
            );
            s.assert_three(honest, &format!("ok-{policy}"));
        }
        for root in [good_root, p.root(&imposter, s.remote.join("x"))] {
            assert!(!root.exists(), "{} got something", root.display());
        }
    }
}

scenario! {
    fn a_wrong_password_fails_clearly_and_the_other_host_is_still_done(p: Placement) {
        let s = setup(p, 2);
        let (good, bad) = (&s.hosts[0], &s.hosts[1]);
        let cfg = format!(
            "{}\n[pkg-]\nhost = {}\nport = {}\nlogin = {}\npassword = not-the-password\nknown_hosts = {}\n{}transfer = scp\nretries = 2\n",
            s.route("pkg-good", good, ""),
            bad.addr,
            bad.port,
            bad.user().name,
            s.known_hosts.display(),
            s.dest_dir(&format!("{}/{{host}}", s.remote.display())),
        );
        let cfg = s.config(&cfg);
        let mut files = s.three("pkg-good");
        files.extend(s.three("pkg-bad"));
        let started = Instant::now();
        let r =
            s.ws.send(&cfg, &files)
                .run()
                .assert_code(1);
        assert!(r.stdout.contains("rejected"), "{}", r.stdout);
        assert!(!r.stdout.contains("not-the-password") && !r.stderr.contains("not-the-password"));
        // auth rejection is not retried (retries = 2 would add ≥ 2 s of backoff)
        assert!(started.elapsed() < Duration::from_secs(20));
        s.assert_three(good, "pkg-good");
        assert!(!s.root(bad).exists(), "the host that refused the login got something");
    }
}

scenario! {
    fn a_closed_port_and_a_dropping_host_fail_within_connect_timeout_while_others_finish(
        p: Placement
    ) {
        let s = setup(p, 1);
        let good = &s.hosts[0];
        let dropping = servers::fresh_addr();
        let _blocked = servers::block(&dropping, &[2222]);
        let closed = servers::fresh_addr(); // nothing listens there
        // and a closed port on the good host's own address: a failure of
        // that address:port says nothing about the good port
        let closed_port = servers::free_port(&good.addr);
        let extra = |addr: &str, port: u16| {
            format!(
                "host = {addr}\nport = {port}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\nconnect_timeout = 2s\nretries = 0\ntransfer = scp\n{}",
                servers::test_user().name,
                servers::keys().ed25519.display(),
                s.known_hosts.display(),
                s.dest_dir(&format!("{}/x", s.remote.display())),
            )
        };
        let cfg = format!(
            "[closed-here-]\n{}\n{}[drop-]\n{}\n[closed-]\n{}\n",
            extra(&good.addr, closed_port),
            s.route("good-", good, ""),
            extra(&dropping, 2222),
            extra(&closed, 2222)
        );
        let cfg = s.config(&cfg);
        let mut files = s.three("good");
        files.push(s.ws.file("drop-1", b"2"));
        files.push(s.ws.file("closed-1", b"3"));
        files.push(s.ws.file("closed-here-1", b"4"));
        let started = Instant::now();
        let r =
            s.ws.send(&cfg, &files)
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
        assert!(r.stdout.contains("closed-here-1"), "{}", r.stdout);
        assert!(
            !r.stdout.contains("already failed"),
            "one address:port's failure stopped another's deliveries:\n{}",
            r.stdout
        );
        s.assert_three(good, "good");
    }
}

scenario! {
    fn install_failures_huge_output_and_timeouts_are_reported(p: Placement) {
        let s = setup(p, 1);
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
        let got = s.delivered(h);
        assert_eq!(get(&got, "fail-1"), b"f");
        assert_eq!(get(&got, "loud-1"), b"l");
        assert_eq!(get(&got, "slow-1"), b"s");
    }
}

scenario! {
    fn hostile_file_names_are_only_names(p: Placement) {
        let s = setup(p, 1);
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
        s.ws.send(&cfg, &files)
            .run()
            .assert_code(0);
        let got = s.delivered(h);
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
            !h.user().home.join("PWNED").exists(),
            "an injected command ran"
        );
        assert!(!got.iter().any(|(n, _)| n.ends_with(".part")));
    }
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
    assert!(
        v["dest_dir"].as_str().unwrap().starts_with("~/newcx/"),
        "{v}"
    );
    assert!(!r.stdout.contains("123456"), "password shown by route");
}

scenario! {
    /// One big package and two smaller ones, watched while they arrive.
    fn no_file_is_ever_visible_under_its_final_name_before_it_is_complete(p: Placement) {
        let s = setup(p, 1);
        let h = &s.hosts[0];
        let cfg = s.config(&s.route("big-", h, "verify = sha256"));
        let sizes: Vec<(String, usize)> = [64, 4, 4]
            .iter()
            .enumerate()
            .map(|(i, mb)| (format!("big-{}.bin", i + 1), mb * 1024 * 1024))
            .collect();
        let data = |size: usize| -> Vec<u8> { (0..size).map(|i| (i * 31 % 251) as u8).collect() };
        let files: Vec<PathBuf> = sizes.iter().map(|(n, size)| s.ws.file(n, &data(*size))).collect();
        let watch_dir = s.root(h);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let want = sizes.clone();
        let watcher = std::thread::spawn(move || {
            let mut partial_seen = 0u32;
            let mut part_seen = false;
            while !d2.load(std::sync::atomic::Ordering::SeqCst) {
                for dated in read_dir(&watch_dir) {
                    for p in read_dir(&dated) {
                        let name = p.file_name().unwrap().to_string_lossy().into_owned();
                        let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                        if want.iter().any(|(n, size)| *n == name && len != *size as u64) {
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
        s.ws.send(&cfg, &files)
            .run()
            .assert_code(0);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let (partial, _part_seen) = watcher.join().unwrap();
        assert_eq!(partial, 0, "final name seen with partial content");
        let got = s.delivered(h);
        assert_eq!(
            names(&got),
            ["big-1.bin", "big-2.bin", "big-3.bin"],
            "no .part left behind"
        );
        for (n, size) in &sizes {
            assert!(get(&got, n) == data(*size).as_slice(), "{n}");
        }
    }
}

scenario! {
    fn check_connect_logs_in_to_every_host_and_reports(p: Placement) {
        let s = setup(p, 2);
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
}

scenario! {
    fn dry_run_and_stdin_file_lists(p: Placement) {
        let s = setup(p, 1);
        let cfg = s.config(&s.route("pkg", &s.hosts[0], "install_command = touch {name}.done"));
        let a = s.three("pkg-a");
        let b = s.ws.file("pkg b\nwith newline", b"b");
        let r =
            s.ws.dispatch()
                .args(["-c", cfg.to_str().unwrap(), "--dry-run"])
                .args(&a)
                .run()
                .assert_code(0);
        assert!(r.stdout.contains("dry-run"), "{}", r.stdout);
        assert!(s.delivered(&s.hosts[0]).is_empty(), "dry run sent something");
        let mut list = Vec::new();
        for f in a.iter().chain([&b]) {
            list.extend_from_slice(f.as_os_str().as_encoded_bytes());
            list.push(0);
        }
        s.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "-0", "-"])
            .stdin(list)
            .run()
            .assert_code(0);
        s.assert_three(&s.hosts[0], "pkg-a");
        let got = s.delivered(&s.hosts[0]);
        assert_eq!(get(&got, "pkg b\nwith newline"), b"b");
        assert!(got.iter().any(|(n, _)| n == "pkg-a-3.done"), "{:?}", names(&got));
    }
}

scenario! {
    fn a_host_without_sftp_gets_the_same_verify_rename_and_install_through_a_shell(
        p: Placement
    ) {
        let ws = Workspace::new();
        let h = p.start_with(
            &servers::fresh_addr(),
            servers::SshOptions {
                extra_config: "Subsystem sftp /bin/false\n".into(),
                ..Default::default()
            },
        );
        let kh = ws.known_hosts(&[&h]);
        let remote = ws.remote_dir("remote");
        let cfg = ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n[pkg]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n{}install_command = sha256sum {{name}} > {{name}}.installed\n",
            ws.path().join("state").display(),
            h.addr,
            h.port,
            h.user().name,
            servers::keys().ed25519.display(),
            kh.display(),
            p.dest_dir_line(format!("{}/d", remote.display())),
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
        let root = p.root(&h, remote.join("d"));
        let mut dirs = Vec::new();
        for i in 0..3 {
            let copies = servers::delivered_copies(&root, &format!("pkg-{i}"));
            assert_eq!(copies.len(), 1, "pkg-{i}: {copies:?}");
            assert_eq!(fs::read(&copies[0]).unwrap(), format!("content {i}").as_bytes());
            let marker =
                fs::read_to_string(copies[0].with_file_name(format!("pkg-{i}.installed"))).unwrap();
            assert!(marker.contains(&format!("pkg-{i}")), "{marker}");
            dirs.push(copies[0].parent().unwrap().to_path_buf());
        }
        dirs.dedup();
        assert_eq!(dirs.len(), 1, "one directory for the run: {dirs:?}");
        assert!(!read_dir(&dirs[0])
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".part")));
    }
}

/// Every file below `root` (symlinks and hidden files too) by its path
/// relative to `root`: contents (a symlink's target) and permission bits.
fn remote_state(root: &Path) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                todo.push(path);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, (target.as_os_str().as_encoded_bytes().to_vec(), 0));
            } else {
                let mode = meta.permissions().mode() & 0o7777;
                out.insert(rel, (fs::read(&path).unwrap(), mode));
            }
        }
    }
    out
}

scenario! {
    /// The fused path (no SFTP: verify, lock and rename in one script) and
    /// the step-by-step one (SFTP stat, lock, rename), the same files sent
    /// to a host of each kind: the same files, bytes and modes on both
    /// hosts (the dated dir aside), nothing else left there, and the same
    /// result for every file — a hostile name, a 0600 file, a
    /// sha256-verified route and an install that fails included.
    fn the_fused_and_the_step_by_step_execution_leave_the_same_state_and_results(
        p: Placement
    ) {
        let ws = Workspace::new();
        let steps = p.start(&servers::fresh_addr());
        let streamed = p.start(&servers::fresh_addr());
        let fused = p.start_with(
            &servers::fresh_addr(),
            servers::SshOptions {
                extra_config: "Subsystem sftp /bin/false\n".into(),
                ..Default::default()
            },
        );
        let kh = ws.known_hosts(&[&steps, &streamed, &fused]);
        let remote = ws.remote_dir("remote");
        let secret = ws.file("pkg-secret", b"only for me");
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let files = vec![
            ws.file("pkg-0", b"content 0"),
            secret,
            ws.file("a b;$(rm -rf ~)'.tar.gz", b"hostile"),
            ws.file("sha-1", b"checked by hash"),
            ws.file("fail-2", b"install fails"),
        ];
        let root_of = |h: &SshServer| p.root(h, remote.join(&h.addr));
        // the dated dir, the first component below the root, is the run's own
        let undated = |rel: &str| match rel.split_once('/') {
            Some((_, rest)) => format!("DATED/{rest}"),
            None => rel.to_string(),
        };
        let run_to = |h: &SshServer, name: &str| {
            let mut dest = p.dest_dir_line(format!("{}/{{host}}/%Y%m%d_%H%M%S", remote.display()));
            if name == "steps" {
                dest.push_str("stream = no\n");
            }
            let mut cfg = format!(
                "[dispatch]\nstate_dir = {}\n",
                ws.path().join(format!("state-{name}")).display()
            );
            for (section, extra) in [
                ("fail-", "install_command = echo failing {name}; exit 3\n"),
                ("sha-", "verify = sha256\ninstall_command = sha256sum {name} > {name}.installed\n"),
                (".", "install_command = sha256sum {name} > {name}.installed\n"),
            ] {
                cfg.push_str(&format!(
                    "[{section}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n{dest}{extra}",
                    h.addr,
                    h.port,
                    h.user().name,
                    servers::keys().ed25519.display(),
                    kh.display(),
                ));
            }
            let cfg = ws.write_config(&cfg);
            let r = ws.send(&cfg, &files).args(["--json", "-vv"]).run().assert_code(1);
            let root = root_of(h).to_string_lossy().into_owned();
            let results: Vec<serde_json::Value> = servers::json_lines(&r.stdout)
                .into_iter()
                .filter(|v| v["host"].is_string())
                .map(|mut v| {
                    let rp = v["remote_path"].as_str().unwrap_or_default();
                    let rel = rp.strip_prefix(&format!("{root}/")).unwrap_or(rp);
                    v["remote_path"] = undated(rel).into();
                    let err = v["error"].as_str().unwrap_or_default().replace(&h.addr, "HOST");
                    v["error"] = err.into();
                    for k in ["host", "elapsed_ms"] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                })
                .collect();
            let state: std::collections::BTreeMap<_, _> = remote_state(&root_of(h))
                .into_iter()
                .map(|(k, v)| (undated(&k), v))
                .collect();
            let streamed = servers::json_events(&r.stdout)
                .iter()
                .filter(|v| v["event"] == "uploaded" && v["streamed"] == true)
                .count();
            (r.stderr, results, state, streamed)
        };
        let (_, step_res, step_state, n) = run_to(&steps, "steps");
        assert_eq!(n, 0, "stream = no still streamed");
        let (_, stream_res, stream_state, n) = run_to(&streamed, "streamed");
        assert_eq!(n, files.len(), "the pipeline was not taken");
        let (fused_log, fused_res, fused_state, n) = run_to(&fused, "fused");
        assert_eq!(n, 0, "streamed without SFTP");
        assert!(fused_log.contains("no SFTP"), "the fused path was not taken: {fused_log}");
        assert_eq!(step_res.len(), files.len(), "{step_res:?}");
        for f in &files {
            let name = f.file_name().unwrap().to_str().unwrap();
            let of = |res: &[serde_json::Value]| res.iter().find(|v| v["file"] == name).cloned();
            assert_eq!(of(&step_res), of(&fused_res), "{name}");
            assert_eq!(of(&step_res), of(&stream_res), "{name}");
        }
        let failed: Vec<_> = step_res.iter().filter(|v| v["ok"] == false).collect();
        assert_eq!(failed.len(), 1, "{step_res:?}");
        assert_eq!(failed[0]["exit_status"], 3, "{step_res:?}");
        assert_eq!(step_state, fused_state);
        assert_eq!(step_state, stream_state);
        // 5 files, 4 markers, nothing else: no temporary file, no lock
        assert_eq!(step_state.len(), 9, "{:?}", step_state.keys().collect::<Vec<_>>());
        assert_eq!(
            step_state.get("DATED/pkg-secret"),
            Some(&(b"only for me".to_vec(), 0o600))
        );
    }
}

scenario! {
    fn a_host_without_bash_gets_the_sh_runner_and_its_installs_are_still_bounded(p: Placement) {
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
        let plain = p.start(&servers::fresh_addr());
        let nobash = p.start_with(
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
                "[{prefix}]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n{}",
                h.addr,
                h.port,
                h.user().name,
                servers::keys().ed25519.display(),
                kh.display(),
                p.dest_dir_line(format!("{}/{prefix}", remote.display())),
            ));
            // which shell ran the install: `sh` under the sh runner's
            // `timeout … sh -c`, `dispatch-bounded` under the bash runner
            cfg.push_str(
                "install_command = if [ {name} = b-slow ]; then sleep 30; fi; echo \"$0\" > {name}.shell\ninstall_timeout = 2s\n",
            );
        }
        let cfg = ws.write_config(&cfg);
        let names = ["a-1", "a-2", "a-3", "b-1", "b-2", "b-slow"];
        let files: Vec<PathBuf> = names.iter().map(|n| ws.file(n, n.as_bytes())).collect();
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
        let copy = |prefix: &str, h: &SshServer, name: &str| -> PathBuf {
            let copies = servers::delivered_copies(&p.root(h, remote.join(prefix)), name);
            assert_eq!(copies.len(), 1, "{name}: {copies:?}; {}", r.stdout);
            copies[0].clone()
        };
        for (prefix, h, want) in [("a-", &plain, "dispatch-bounded"), ("b-", &nobash, "sh")] {
            for name in names.iter().filter(|n| n.starts_with(prefix) && **n != "b-slow") {
                assert_eq!(fs::read(copy(prefix, h, name)).unwrap(), name.as_bytes());
                let shell = fs::read_to_string(copy(prefix, h, &format!("{name}.shell"))).unwrap();
                assert_eq!(shell.trim(), want, "{name}");
            }
        }
        let res = servers::results(&r.stdout);
        let slow = servers::one(&res, "b-slow");
        assert_eq!(slow["ok"], false);
        assert!(
            slow["error"].as_str().unwrap().contains("install_timeout"),
            "{slow:?}"
        );
    }
}
