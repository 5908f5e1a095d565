//! Rollouts on 4 real sshd hosts, each with a user of its own (logins from
//! ~/.netrc) and the default dest_dir, 3 packages per host: waves in order,
//! a failing health check or canary stopping the rest, `max_failures`, and
//! the local drain / undrain hooks around each host.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::servers::{self, json_lines, RunResult, SshServer, Workspace};

struct Fleet {
    ws: Workspace,
    hosts: Vec<SshServer>,
    known_hosts: PathBuf,
}

fn fleet(n: usize) -> Fleet {
    let ws = Workspace::new();
    let hosts = servers::hosts_on_one_port(n, true);
    let refs: Vec<&SshServer> = hosts.iter().collect();
    let known_hosts = ws.known_hosts(&refs);
    let netrc: String = hosts
        .iter()
        .map(|h| format!("machine {} login {}\n", h.addr, h.user().name))
        .collect();
    ws.netrc(&netrc);
    Fleet {
        ws,
        hosts,
        known_hosts,
    }
}

/// Every install records when it started and ended (ns), then its marker.
const TIMED_INSTALL: &str = "date +%s%N > {name}.start && sleep 0.3 && sha256sum {name} > {name}.installed && date +%s%N > {name}.end";

impl Fleet {
    fn config(&self, extra: &str) -> PathBuf {
        let addrs: Vec<&str> = self.hosts.iter().map(|h| h.addr.as_str()).collect();
        self.ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n\n[app-]\nhost = {}\nport = {}\nidentity_file = {}\nknown_hosts = {}\nconnect_timeout = 5s\nretries = 0\nhealth_interval = 100ms\nhealth_timeout = 3s\n{extra}\n",
            self.ws.path().join("state").display(),
            addrs.join(", "),
            self.hosts[0].port,
            servers::keys().ed25519.display(),
            self.known_hosts.display(),
        ))
    }

    fn files(&self) -> Vec<PathBuf> {
        (1..=3)
            .map(|i| {
                self.ws
                    .file(&format!("app-{i}.tgz"), format!("release {i}").as_bytes())
            })
            .collect()
    }

    fn run(&self, cfg: &Path) -> RunResult {
        self.ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .args(self.files())
            .run()
    }

    /// Where host `i` keeps its dated dirs (the default dest_dir).
    fn root(&self, i: usize) -> PathBuf {
        self.hosts[i].user().home.join("newcx")
    }

    fn installed(&self, i: usize) -> usize {
        (1..=3)
            .map(|k| servers::installed(&self.root(i), &format!("app-{k}.tgz")))
            .sum()
    }

    /// (earliest start, latest end) of host `i`'s installs, in ns.
    fn window(&self, i: usize) -> (u128, u128) {
        let read = |k: usize, what: &str| -> u128 {
            let c = servers::copies(&self.root(i), &format!("app-{k}.tgz.{what}"));
            String::from_utf8_lossy(&c[0]).trim().parse().unwrap()
        };
        let starts = (1..=3).map(|k| read(k, "start"));
        let ends = (1..=3).map(|k| read(k, "end"));
        (starts.min().unwrap(), ends.max().unwrap())
    }

    /// The results, by host index: the states of its 3 files.
    fn states(&self, r: &RunResult) -> Vec<Vec<String>> {
        let results: Vec<Value> = json_lines(&r.stdout)
            .into_iter()
            .filter(|v| v.get("state").is_some() && v.get("summary").is_none())
            .collect();
        self.hosts
            .iter()
            .map(|h| {
                let mut s: Vec<String> = results
                    .iter()
                    .filter(|v| v["host"] == h.addr.as_str())
                    .map(|v| v["state"].as_str().unwrap().to_string())
                    .collect();
                s.sort();
                s
            })
            .collect()
    }
}

/// One value from the fleet's journal.
fn journal(f: &Fleet, sql: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .arg(f.ws.path().join("state/journal.sqlite"))
        .arg(sql)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn all(state: &str) -> Vec<String> {
    vec![state.to_string(); 3]
}

/// serial, health check failing on host 3: hosts 1-2 installed one after
/// the other, host 3 failed (installed, not healthy), host 4 skipped, exit 1.
#[test]
fn serial_stops_at_the_first_unhealthy_host_and_skips_the_rest() {
    let f = fleet(4);
    let bad = &f.hosts[2].addr;
    let cfg = f.config(&format!(
        "strategy = serial\ninstall_command = {TIMED_INSTALL}\nhealth_check = test {{host}} != {bad}\n"
    ));
    // what will run, told before anything does
    let plan =
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "route", "app-1.tgz"])
            .run()
            .assert_code(0);
    assert!(
        plan.stdout.contains("rollout: serial in 4 wave(s)"),
        "{plan}"
    );
    assert!(
        plan.stdout
            .contains("per host 2. health_check: test {host} != "),
        "{plan}"
    );
    // a dry run says the same, and touches nothing (no lock, no hook)
    let dry =
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--dry-run"])
            .args(f.files())
            .run()
            .assert_code(0);
    assert!(
        dry.stdout.contains("[app-] rollout: serial in 4 wave(s)"),
        "{dry}"
    );
    assert!(f
        .hosts
        .iter()
        .all(|h| !h.user().home.join(".dispatch-host.lock").exists()));
    assert_eq!((0..4).map(|i| f.installed(i)).sum::<usize>(), 0);
    let r = f.run(&cfg).assert_code(1);
    let st = f.states(&r);
    assert_eq!(st[0], all("installed"), "{r}");
    assert_eq!(st[1], all("installed"), "{r}");
    assert_eq!(st[2], all("failed"), "{r}");
    assert_eq!(st[3], all("skipped"), "{r}");
    assert_eq!(
        (
            f.installed(0),
            f.installed(1),
            f.installed(2),
            f.installed(3)
        ),
        (3, 3, 3, 0)
    );
    assert!(
        f.window(0).1 < f.window(1).0,
        "host 2 started before host 1 ended"
    );
    assert!(
        f.window(1).1 < f.window(2).0,
        "host 3 started before host 2 ended"
    );
    assert!(
        r.stdout.contains("but health_check: not healthy within 3s"),
        "{r}"
    );
    assert!(
        r.stdout
            .contains("not started: the rollout stopped after 1 failed host(s)"),
        "{r}"
    );
}

/// canary:1,100% whose canary fails: nothing else is touched.
#[test]
fn a_failing_canary_stops_the_rollout() {
    let f = fleet(4);
    let canary = &f.hosts[0].addr;
    let cfg = f.config(&format!(
        "strategy = canary:1,100%\ninstall_command = [ {{host}} != {canary} ] && sha256sum {{name}} > {{name}}.installed\n"
    ));
    // the install fails on the canary ({host} is the canary's address)
    let r = f.run(&cfg).assert_code(1);
    let st = f.states(&r);
    assert_eq!(st[0], all("failed"), "{r}");
    for (i, s) in st.iter().enumerate().skip(1) {
        assert_eq!(*s, all("skipped"), "host {}: {r}", i + 1);
        assert_eq!(f.installed(i), 0);
    }
}

/// batch:50% runs two waves of two hosts; the second starts after the
/// first ended; max_failures = 1 lets it go on past one failed host.
#[test]
fn batches_run_in_waves_and_max_failures_lets_one_failure_pass() {
    let f = fleet(4);
    let cfg = f.config(&format!(
        "strategy = batch:50%\ninstall_command = {TIMED_INSTALL}\n"
    ));
    let r = f.run(&cfg).assert_code(0);
    assert!(f.states(&r).iter().all(|s| *s == all("installed")), "{r}");
    let w: Vec<(u128, u128)> = (0..4).map(|i| f.window(i)).collect();
    let first_end = w[0].1.max(w[1].1);
    let second_start = w[2].0.min(w[3].0);
    assert!(first_end < second_start, "waves overlap: {w:?}");
    // the two hosts of a wave run at once
    assert!(
        w[0].0 < w[1].1 && w[1].0 < w[0].1,
        "wave 1 was not parallel: {w:?}"
    );
    // and the journal's times say the same: wave 2's uploads start after
    // wave 1's last install was recorded
    let time = |i: usize, what: &str, state: &str| -> i64 {
        journal(
            &f,
            &format!(
                "SELECT {what}(time_ms) FROM event WHERE host = '{}' AND state = '{state}'",
                f.hosts[i].addr
            ),
        )
        .parse()
        .unwrap()
    };
    let wave1_end = time(0, "max", "installed").max(time(1, "max", "installed"));
    let wave2_start = time(2, "min", "uploading").min(time(3, "min", "uploading"));
    assert!(
        wave1_end <= wave2_start,
        "journal: wave 1 ended {wave1_end}, wave 2 started {wave2_start}"
    );

    let g = fleet(4);
    let bad = &g.hosts[1].addr;
    let cfg = g.config(&format!(
        "strategy = serial\nmax_failures = 1\ninstall_command = [ {{host}} != {bad} ] && sha256sum {{name}} > {{name}}.installed\n"
    ));
    let r = g.run(&cfg).assert_code(1);
    let st = g.states(&r);
    assert_eq!(st[1], all("failed"), "{r}");
    for i in [0, 2, 3] {
        assert_eq!(st[i], all("installed"), "host {}: {r}", i + 1);
    }
}

/// Each host is drained before it is touched and undrained once healthy,
/// one after the other; a host whose drain fails is left untouched.
#[test]
fn hosts_are_drained_and_undrained_around_their_installs() {
    let f = fleet(4);
    let lb = f.ws.path().join("lb.log");
    let refuse = &f.hosts[3].addr;
    let cfg = f.config(&format!(
        "strategy = serial\nmax_failures = 1\ninstall_command = sha256sum {{name}} > {{name}}.installed\n\
         pre_local = [ {{host}} != {refuse} ] && echo \"drain $DISPATCH_HOST\" >> {lb}\n\
         post_local = echo undrain {{host}} \"$DISPATCH_ROUTE\" >> {lb}\n\
         health_check = test -n {{host}}\n",
        lb = lb.display()
    ));
    let r = f.run(&cfg).assert_code(1);
    let log = fs::read_to_string(&lb).unwrap();
    let want: String = f.hosts[..3]
        .iter()
        .map(|h| format!("drain {a}\nundrain {a} app-\n", a = h.addr))
        .collect();
    assert_eq!(log, want, "{r}");
    let st = f.states(&r);
    assert_eq!(st[3], all("failed"), "{r}");
    assert!(r.stdout.contains("pre_local failed"), "{r}");
    assert_eq!(f.installed(3), 0, "a host whose drain failed was touched");
    assert_eq!((0..3).map(|i| f.installed(i)).sum::<usize>(), 9);
}

/// Releases on 2 hosts, serial: each run's dated dir becomes `current`
/// (activate_command runs after the switch), `keep_releases = 2` leaves the
/// current and the previous release, and a release that is not healthy is
/// rolled back to the previous one on that host (activated again), which
/// fails the host and stops the rollout.
#[test]
fn releases_switch_current_keep_two_and_roll_back_an_unhealthy_one() {
    let f = fleet(2);
    let cfg = f.config(
        "strategy = serial\n\
         dest_dir = ~/app/releases/%Y%m%d_%H%M%S_%f\n\
         current = ~/app/current\n\
         keep_releases = 2\n\
         install_command = cp {name} VERSION\n\
         activate_command = readlink ~/app/current >> ~/activations\n\
         health_remote = ! grep -q bad ~/app/current/VERSION\n",
    );
    let home = |i: usize| f.hosts[i].user().home.clone();
    let current = |i: usize| fs::read_link(home(i).join("app/current")).unwrap();
    let releases = |i: usize| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(home(i).join("app/releases"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let send = |version: &str| -> RunResult {
        let file = f.ws.file("app-1.tgz", version.as_bytes());
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .arg(file)
            .run()
    };
    let mut seen = Vec::new();
    for v in ["v1", "v2", "v3"] {
        let r = send(v).assert_code(0);
        for i in 0..2 {
            assert_eq!(
                fs::read_to_string(current(i).join("VERSION")).unwrap(),
                v,
                "{r}"
            );
        }
        seen.push(current(0));
    }
    for i in 0..2 {
        // v1 pruned: current (v3) and previous (v2) kept
        let kept = releases(i);
        assert_eq!(kept.len(), 2, "host {i}: {kept:?}");
        assert_eq!(kept[1], current(i));
        let acts = fs::read_to_string(home(i).join("activations")).unwrap();
        assert_eq!(acts.lines().count(), 3, "host {i}: {acts}");
    }
    assert!(!releases(0).contains(&seen[0]), "v1 kept");
    let good = current(0);
    let r = send("bad v4").assert_code(1);
    assert_eq!(current(0), good, "host 1 not rolled back: {r}");
    assert_eq!(fs::read_to_string(good.join("VERSION")).unwrap(), "v3");
    assert!(r.stdout.contains("rolled back to"), "{r}");
    let st = f.states(&r);
    assert_eq!(st[0], vec!["failed".to_string()], "{r}");
    assert_eq!(st[1], vec!["skipped".to_string()], "{r}");
    // the failed release is kept (the newest failed one), marked
    assert!(releases(0)
        .iter()
        .any(|d| d.join(".dispatch-release-failed").exists()));
    // activated for v4, and again for the rollback
    let acts = fs::read_to_string(home(0).join("activations")).unwrap();
    assert_eq!(acts.lines().count(), 5, "{acts}");
    assert_eq!(acts.lines().last().unwrap(), good.to_str().unwrap());

    // the journal's record: v1 active, then previous, …, v4 failed, v3 active again
    let states = journal(
        &f,
        &format!(
            "SELECT state FROM release WHERE host = '{}' ORDER BY id",
            f.hosts[0].addr
        ),
    );
    assert_eq!(
        states.lines().collect::<Vec<_>>(),
        ["active", "active", "previous", "pruned", "active", "previous", "failed", "active"],
        "{states}"
    );
    // by hand: every host back to the release before the active one (v2)
    let cmd = |args: &[&str]| {
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .args(args)
            .run()
    };
    let listed = cmd(&["releases", "app-", "--json"]).assert_code(0);
    let hosts: Vec<Value> = listed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(hosts.len(), 2, "{listed}");
    assert_eq!(hosts[0]["active"], good.to_str().unwrap(), "{listed}");
    let v2 = hosts[0]["previous"].as_str().unwrap().to_string();
    assert_eq!(
        fs::read_to_string(Path::new(&v2).join("VERSION")).unwrap(),
        "v2"
    );
    let back = cmd(&["rollback", "app-"]).assert_code(0);
    let name = Path::new(&v2)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    for i in 0..2 {
        assert_eq!(
            fs::read_to_string(current(i).join("VERSION")).unwrap(),
            "v2",
            "{back}"
        );
        assert!(
            back.stdout
                .contains(&format!("{}: rolled back to {name}", f.hosts[i].addr)),
            "{back}"
        );
        let acts = fs::read_to_string(home(i).join("activations")).unwrap();
        assert_eq!(
            acts.lines().last().unwrap(),
            current(i).to_str().unwrap(),
            "host {i}"
        );
    }
    // a release that is not on every host: refused before any host is touched
    let r = cmd(&["rollback", "app-", "--to", "19990101_000000_0"]).assert_code(2);
    assert!(
        r.stderr
            .contains("no good release 19990101_000000_0; no host was touched"),
        "{r}"
    );
    assert_eq!(
        fs::read_to_string(current(0).join("VERSION")).unwrap(),
        "v2"
    );
}

/// Backends (`python3 -m http.server` as each host's user, serving
/// `~/app`) started by the rollout itself; killed by pid at the end.
struct Backends(Vec<PathBuf>);

impl Drop for Backends {
    fn drop(&mut self) {
        for pid_file in &self.0 {
            if let Ok(pid) = fs::read_to_string(pid_file)
                .unwrap_or_default()
                .trim()
                .parse::<i32>()
            {
                // SAFETY: kill(2) on the backend this test's rollout started
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// A real nginx on loopback, stopped by pid on drop.
struct Nginx {
    conf: PathBuf,
    prefix: PathBuf,
    addr: String,
}

impl Nginx {
    fn start(ws: &Workspace, backends: &[&str], port: u16) -> Nginx {
        let prefix = ws.path().join("nginx");
        fs::create_dir_all(prefix.join("logs")).unwrap();
        let addr = format!(
            "{}:{}",
            servers::fresh_addr(),
            servers::free_port("127.0.0.1")
        );
        let upstream: String = backends
            .iter()
            .map(|b| format!("server {b}:{port};\n"))
            .collect();
        fs::write(prefix.join("upstream.conf"), upstream).unwrap();
        let conf = prefix.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\nevents {{}}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n\
                 fastcgi_temp_path {p}/tmp;\n  uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n\
                 upstream app {{ include {p}/upstream.conf; }}\n\
                 server {{ listen {addr}; location / {{ proxy_pass http://app; proxy_next_upstream off; }} }}\n}}\n",
                p = prefix.display()
            ),
        )
        .unwrap();
        fs::create_dir_all(prefix.join("tmp")).unwrap();
        let st = std::process::Command::new("nginx")
            .args(["-c", conf.to_str().unwrap(), "-p", prefix.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "nginx did not start: {}",
            fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default()
        );
        let n = Nginx { conf, prefix, addr };
        servers::poll_until(Duration::from_secs(10), "nginx to listen", || {
            std::net::TcpStream::connect(&n.addr).ok().map(|_| ())
        });
        n
    }

    /// The drain / undrain command: mark the host `down` in the upstream
    /// (or not), reload, and return once the old workers are gone.
    fn lb_script(&self, ws: &Workspace, port: u16) -> PathBuf {
        let p = ws.path().join("lb");
        let up = self.prefix.join("upstream.conf");
        let ngx = format!(
            "nginx -c {} -p {}",
            self.conf.display(),
            self.prefix.display()
        );
        fs::write(
            &p,
            format!(
                "#!/bin/sh\nset -e\nhost=$2\n\
                 if [ \"$1\" = drain ]; then sed -i \"s/^server $host:{port};/server $host:{port} down;/\" {up}; \
                 else sed -i \"s/^server $host:{port} down;/server $host:{port};/\" {up}; fi\n\
                 master=$(cat {pid})\nold=$(pgrep -P \"$master\" | tr '\\n' ' ')\n{ngx} -s reload\n\
                 for i in $(seq 200); do\n  alive=0\n  for w in $old; do kill -0 \"$w\" 2>/dev/null && alive=1; done\n\
                   [ $alive = 0 ] && exit 0\n  sleep 0.05\ndone\necho \"old nginx workers still running\" >&2\nexit 1\n",
                up = up.display(),
                pid = self.prefix.join("nginx.pid").display(),
            ),
        )
        .unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut fs::metadata(&p).unwrap().permissions(),
            0o755,
        );
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(self.prefix.join("nginx.pid"))
            .unwrap_or_default()
            .trim()
            .parse::<i32>()
        {
            // SAFETY: kill(2) on the nginx master this test started
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}

/// GET / through nginx: (HTTP status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, "connect failed".into());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: app\r\n\r\n").as_bytes());
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_string();
    (code, body)
}

/// The rolling runbook end to end: a real nginx in front of two hosts
/// whose backends serve the version of their `current` release; each host
/// drained at nginx, its release switched and its backend restarted,
/// health-checked, undrained — while a client requests through nginx the
/// whole time: no failed request, and the version served goes from v1 to v2.
#[test]
fn a_rolling_update_behind_nginx_fails_no_request() {
    let f = fleet(2);
    let port = servers::free_port(&f.hosts[0].addr);
    let pids: Vec<PathBuf> = (0..2)
        .map(|i| f.hosts[i].user().home.join("backend.pid"))
        .collect();
    let _backends = Backends(pids);
    let addrs: Vec<&str> = f.hosts.iter().map(|h| h.addr.as_str()).collect();
    let nginx = Nginx::start(&f.ws, &addrs, port);
    let lb = nginx.lb_script(&f.ws, port);
    let restart = format!(
        "{{ pid=$(cat ~/backend.pid 2>/dev/null) && kill $pid 2>/dev/null && for i in $(seq 200); do kill -0 $pid 2>/dev/null || break; sleep 0.05; done; true; }}; \
         setsid python3 -m http.server {port} --bind \"$DISPATCH_HOST\" --directory ~/app > /dev/null 2>&1 < /dev/null & echo $! > ~/backend.pid"
    );
    let cfg = f.config(&format!(
        "strategy = serial\n\
         dest_dir = ~/app/releases/%Y%m%d_%H%M%S_%f\n\
         current = ~/app/current\n\
         install_command = cp {{name}} VERSION\n\
         activate_command = {restart}\n\
         pre_local = {lb} drain {{host}}\n\
         post_local = {lb} undrain {{host}}\n\
         health_check = curl -fsS --max-time 1 http://{{host}}:{port}/current/VERSION\n\
         health_passes = 2\n",
        lb = lb.display(),
        restart = restart.replace('{', "{{").replace('}', "}}"),
    ));
    let send = |version: &str| {
        let file = f.ws.file("app-1.tgz", version.as_bytes());
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .arg(file)
            .run()
            .assert_code(0)
    };
    send("v1");
    servers::poll_until(Duration::from_secs(10), "v1 through nginx", || {
        (get(&nginx.addr, "/current/VERSION") == (200, "v1".into())).then_some(())
    });
    // a client through nginx, all along the rollout of v2
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (addr, stop) = (nginx.addr.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                seen.push(get(&addr, "/current/VERSION"));
            }
            seen
        })
    };
    let r = send("v2");
    servers::poll_until(Duration::from_secs(10), "v2 from both hosts", || {
        (0..4)
            .all(|_| get(&nginx.addr, "/current/VERSION") == (200, "v2".into()))
            .then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = client.join().unwrap();
    let failed: Vec<&(u16, String)> = seen.iter().filter(|(c, _)| *c != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\n{r}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(seen.len() > 20, "too few requests to tell: {}", seen.len());
    eprintln!(
        "{} requests through nginx during the rollout, none failed",
        seen.len()
    );
    let first_v2 = seen
        .iter()
        .position(|(_, b)| b == "v2")
        .expect("v2 never served");
    assert!(seen[..first_v2].iter().all(|(_, b)| b == "v1"), "{seen:?}");
    assert_eq!(seen.last().unwrap().1, "v2");
    // both upstreams undrained again
    let up = fs::read_to_string(nginx.prefix.join("upstream.conf")).unwrap();
    assert!(!up.contains("down"), "{up}");
}

/// Two dispatch processes rolling out to the same two hosts at once: the
/// host lock makes them take turns on each host — no install of one
/// overlaps an install of the other.
#[test]
fn two_dispatchers_aimed_at_the_same_hosts_take_turns() {
    let f = fleet(2);
    let cfg = f.config(&format!(
        "strategy = serial\nlock_wait = 60s\ninstall_command = {TIMED_INSTALL}\n"
    ));
    let run = |tag: &str| {
        let files: Vec<PathBuf> = (1..=3)
            .map(|i| {
                f.ws.file(&format!("app-{tag}{i}.tgz"), format!("{tag}{i}").as_bytes())
            })
            .collect();
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .args(files)
            .spawn()
    };
    let (a, b) = (run("a"), run("b"));
    let (ra, rb) = (
        a.wait(Duration::from_secs(120)),
        b.wait(Duration::from_secs(120)),
    );
    ra.assert_code(0);
    rb.assert_code(0);
    let window = |i: usize, tag: &str| -> (u128, u128) {
        let read = |k: usize, what: &str| -> u128 {
            let c = servers::copies(&f.root(i), &format!("app-{tag}{k}.tgz.{what}"));
            String::from_utf8_lossy(&c[0]).trim().parse().unwrap()
        };
        (
            (1..=3).map(|k| read(k, "start")).min().unwrap(),
            (1..=3).map(|k| read(k, "end")).max().unwrap(),
        )
    };
    for i in 0..2 {
        let (wa, wb) = (window(i, "a"), window(i, "b"));
        assert!(
            wa.1 < wb.0 || wb.1 < wa.0,
            "host {i}: installs overlap: {wa:?} {wb:?}"
        );
        assert!(
            !f.hosts[i].user().home.join(".dispatch-host.lock").exists(),
            "lock left"
        );
    }
}

/// A live lock of another dispatcher is refused at once, naming it; an
/// expired one is taken over (and released after).
#[test]
fn a_live_host_lock_is_refused_with_its_holder_and_an_expired_one_taken_over() {
    let f = fleet(2);
    let cfg =
        f.config("strategy = serial\ninstall_command = sha256sum {name} > {name}.installed\n");
    let user = f.hosts[0].user();
    let lock = user.home.join(".dispatch-host.lock");
    let plant = |expires: u64| {
        fs::create_dir_all(&lock).unwrap();
        fs::write(
            lock.join("owner"),
            format!(
                "token=0123 machine=elsewhere pid=4242 rollout=r-other since=1 expires={expires}\n"
            ),
        )
        .unwrap();
        for p in [&lock, &lock.join("owner")] {
            std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid)).unwrap();
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    plant(now + 3600);
    let r = f.run(&cfg).assert_code(1);
    assert!(
        r.stdout
            .contains("locked by another rollout (token=0123 machine=elsewhere pid=4242"),
        "{r}"
    );
    let st = f.states(&r);
    assert_eq!(st[0], all("failed"), "{r}");
    assert_eq!(st[1], all("skipped"), "{r}");
    assert_eq!(f.installed(0), 0, "a locked host was touched");
    assert!(
        fs::read_to_string(lock.join("owner"))
            .unwrap()
            .contains("token=0123"),
        "the live lock was broken"
    );
    // who holds it, from the command line; broken by hand
    let cmd = |args: &[&str]| {
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .args(args)
            .run()
    };
    let st = cmd(&["lock", "status", "app-"]).assert_code(0);
    assert!(
        st.stdout.contains(&format!(
            "{}: held: token=0123 machine=elsewhere",
            f.hosts[0].addr
        )),
        "{st}"
    );
    assert!(
        st.stdout.contains(&format!("{}: free", f.hosts[1].addr)),
        "{st}"
    );
    let br = cmd(&["lock", "break", &f.hosts[0].addr]).assert_code(0);
    assert!(br.stdout.contains("broken (was token=0123"), "{br}");
    assert_eq!(
        journal(&f, "SELECT action || ' ' || host FROM admin_event"),
        format!("lock-break {}", f.hosts[0].addr)
    );
    assert!(!lock.exists());

    plant(now - 60);
    let r = f.run(&cfg).assert_code(0);
    assert!(
        r.stderr.contains("took over an expired lock: token=0123"),
        "{r}"
    );
    assert_eq!(f.installed(0), 3);
    assert!(!lock.exists(), "the lock taken over was not released");
}

/// Versions (the route's `(?P<version>…)`) against each host's active
/// release: the same version and content is left as it is, an older one is
/// refused, and rolled out with `--allow-downgrade`.
#[test]
fn an_older_version_is_refused_unless_allowed_and_the_same_one_is_not_sent_again() {
    let f = fleet(1);
    let addrs = &f.hosts[0].addr;
    let cfg = f.ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n\n[app-(?P<version>[0-9.]+)\\.tgz$]\nhost = {addrs}\nport = {}\nidentity_file = {}\nknown_hosts = {}\n\
         dest_dir = ~/app/releases/%Y%m%d_%H%M%S_%f\ncurrent = ~/app/current\ninstall_command = cp {{name}} VERSION\n",
        f.ws.path().join("state").display(),
        f.hosts[0].port,
        servers::keys().ed25519.display(),
        f.known_hosts.display(),
    ));
    let home = f.hosts[0].user().home.clone();
    let active = || fs::read_to_string(home.join("app/current/VERSION")).unwrap();
    let count = || fs::read_dir(home.join("app/releases")).unwrap().count();
    let send = |name: &str, body: &str, extra: &[&str]| {
        let file = f.ws.file(name, body.as_bytes());
        f.ws.dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--json"])
            .args(extra)
            .arg(file)
            .run()
    };
    send("app-1.10.tgz", "1.10", &[]).assert_code(0);
    assert_eq!((active(), count()), ("1.10".to_string(), 1));
    let same = send("app-1.10.tgz", "1.10", &[]).assert_code(0);
    assert!(
        same.stdout
            .contains("already the active release, same content"),
        "{same}"
    );
    assert_eq!(count(), 1, "sent again: {same}");
    let old = send("app-1.9.tgz", "1.9", &[]).assert_code(1);
    assert!(
        old.stdout
            .contains("downgrade refused: 1.9 is older than the active 1.10"),
        "{old}"
    );
    assert_eq!((active(), count()), ("1.10".to_string(), 1));
    send("app-1.9.tgz", "1.9", &["--allow-downgrade"]).assert_code(0);
    assert_eq!(
        journal(
            &f,
            "SELECT count(*) FROM admin_event WHERE action = 'downgrade'"
        ),
        "1"
    );
    assert_eq!((active(), count()), ("1.9".to_string(), 2));
}
