//! Operating `dispatch` like a Unix tool: what the package ships, `--json`
//! for every input, `check --json`/`-q`, `history` per delivery run, and the
//! script runner's own stderr kept out of an install's output.

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers::{self, SshServer, Workspace};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The records of a `--json` run, its events (`{"event": …}`) left out.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .filter(|v: &serde_json::Value| v.get("event").is_none())
        .collect()
}

/// A config with one route to `host` (not contacted with --dry-run).
fn config(ws: &Workspace, route: &str) -> PathBuf {
    ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n\n{route}",
        ws.path().join("state").display()
    ))
}

#[test]
fn the_packaged_unit_is_the_contrib_unit_with_the_packaged_binary_path() {
    let contrib = fs::read_to_string(repo().join("contrib/dispatch.service")).unwrap();
    let packaged = fs::read_to_string(repo().join("contrib/debian/dispatch.service")).unwrap();
    let body = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.replace("/usr/local/bin/dispatch", "/usr/bin/dispatch"))
            .collect()
    };
    assert_eq!(body(&contrib), body(&packaged));
    assert!(
        packaged.contains("ExecStart=/usr/bin/dispatch "),
        "{packaged}"
    );
    // the package's metadata ships it, and the docs the CI runs
    let cargo = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    for asset in [
        "contrib/debian/dispatch.service",
        "dispatch.example.ini",
        "logger.yaml",
        "target/release/dispatch",
    ] {
        assert!(
            cargo.contains(&format!("[\"{asset}\"")),
            "{asset} not shipped"
        );
    }
    // maintainer scripts: nothing enabled or started on install, and no
    // systemctl call that could fail without systemd
    let postinst = fs::read_to_string(repo().join("contrib/debian/postinst")).unwrap();
    let code: String = postinst
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!code.contains("enable"), "{postinst}");
    assert!(!code.contains("start"), "{postinst}");
    for script in ["postinst", "prerm", "postrm"] {
        let text = fs::read_to_string(repo().join("contrib/debian").join(script)).unwrap();
        let calls = text
            .lines()
            .filter(|l| l.trim_start().starts_with("systemctl "));
        for l in calls {
            assert!(l.contains("|| true"), "{script}: {l}");
        }
    }
}

#[test]
fn the_man_pages_and_completions_come_from_the_binary() {
    let ws = Workspace::new();
    let dir = ws.path().join("man");
    ws.dispatch()
        .args(["man", dir.to_str().unwrap()])
        .run()
        .assert_success();
    let page = fs::read_to_string(dir.join("dispatch.1")).unwrap();
    assert!(page.contains(".TH dispatch 1"), "{page}");
    assert!(page.contains("\\-\\-json"), "{page}");
    assert!(dir.join("dispatch-history.1").exists());
    assert!(!dir.join("dispatch-help.1").exists(), "no page for `help`");
    let bash = ws.dispatch().args(["completions", "bash"]).run();
    assert!(bash.stdout.contains("complete -F"), "{bash}");
    assert!(bash.stdout.contains("--since"), "{bash}");
    let r = ws.dispatch().args(["completions", "nosuchshell"]).run();
    assert_eq!(r.status, Some(2), "{r}");
}

#[test]
fn json_gives_an_object_for_every_input_then_a_summary() {
    use std::os::unix::ffi::OsStrExt;
    let ws = Workspace::new();
    let cfg = config(&ws, "[app-]\nhost = 127.0.0.1\n");
    let routed = ws.file("app-1.tgz", b"1");
    let unrouted = ws.file("other-1.tgz", b"2");
    let missing = ws.path().join("pkgs/app-missing.tgz");
    let a_dir = ws.path().join("pkgs/app-dir.tgz");
    fs::create_dir_all(&a_dir).unwrap();
    let bad_name = ws
        .path()
        .join("pkgs")
        .join(std::ffi::OsStr::from_bytes(b"app-\xff.tgz"));
    fs::write(&bad_name, b"3").unwrap();
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--dry-run", "--json"])
        .args([&routed, &unrouted, &missing, &a_dir, &bad_name])
        .run();
    assert_eq!(r.status, Some(1), "{r}");
    assert_eq!(r.stderr.trim(), "", "--json: nothing but JSON: {r}");
    let v = json_lines(&r.stdout);
    assert_eq!(v.len(), 6, "{r}");
    let state_of = |file: &str| -> Vec<String> {
        v.iter()
            .filter(|o| o["file"] == file)
            .map(|o| o["state"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(state_of("app-1.tgz"), ["dry-run"]);
    assert_eq!(state_of("other-1.tgz"), ["unrouted"]);
    assert_eq!(state_of("app-missing.tgz"), ["missing"]);
    assert_eq!(state_of("app-dir.tgz"), ["unreadable"]);
    assert_eq!(state_of("app-\u{fffd}.tgz"), ["refused"]);
    for o in &v[..5] {
        assert!(o["path"].is_string() && o["ok"].is_boolean(), "{o}");
        if o["state"] != "dry-run" {
            assert_eq!(o["ok"], false, "{o}");
            assert!(o["error"].as_str().is_some_and(|e| !e.is_empty()), "{o}");
        }
    }
    let s = &v[5]["summary"];
    assert_eq!(s["inputs"], 5, "{s}");
    assert_eq!(s["results"], 1, "{s}");
    assert_eq!(s["unrouted"], 1, "{s}");
    assert_eq!(s["missing"], 1, "{s}");
    assert_eq!(s["unreadable"], 1, "{s}");
    assert_eq!(s["refused"], 1, "{s}");
    assert_eq!(s["exit_code"], 1, "{s}");
    // only unrouted: exit 3, and the summary says so
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "--json"])
        .arg(&unrouted)
        .run();
    assert_eq!(r.status, Some(3), "{r}");
    let v = json_lines(&r.stdout);
    assert_eq!(v.len(), 2, "{r}");
    assert_eq!(v[1]["summary"]["exit_code"], 3);
}

#[test]
fn check_speaks_json_and_is_quiet_with_q() {
    let ws = Workspace::new();
    let cfg = config(&ws, "[app-]\nhost = 127.0.0.1, 127.0.0.2\n");
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check", "--json"])
        .run()
        .assert_success();
    let v = json_lines(&r.stdout);
    assert_eq!(v.len(), 2, "{r}");
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[0]["routes"], 1);
    assert_eq!(v[0]["route_hosts"], 2);
    assert_eq!(v[1]["summary"]["exit_code"], 0);
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check", "-q"])
        .run()
        .assert_success();
    assert_eq!(r.stdout, "", "{r}");
    // a broken config: its problems as JSON, exit 2
    let bad = ws.write_config("[app-]\nhost = h\nbogus_key = 1\n[x(]\nhost = h\n");
    let r = ws
        .dispatch()
        .args(["-c", bad.to_str().unwrap(), "check", "--json"])
        .run();
    assert_eq!(r.status, Some(2), "{r}");
    let v = json_lines(&r.stdout);
    assert_eq!(v[0]["ok"], false, "{r}");
    let problems = v[0]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{r}");
    assert_eq!(problems[0]["line"], 3, "{r}");
    assert_eq!(v[1]["summary"]["exit_code"], 2);
    // a login that fails is an object with its error, and exit 1
    let addr = servers::fresh_addr();
    let (_silent, port) = servers::silent_server(&addr);
    let cfg = config(
        &ws,
        &format!("[app-]\nhost = {addr}\nport = {port}\nconnect_timeout = 1s\nio_timeout = 1s\n"),
    );
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check", "--connect", "--json"])
        .run();
    assert_eq!(r.status, Some(1), "{r}");
    let v = json_lines(&r.stdout);
    assert_eq!(v.len(), 3, "{r}");
    assert_eq!(v[1]["ok"], false, "{r}");
    assert_eq!(v[1]["port"], port, "{r}");
    assert!(v[1]["error"].is_string(), "{r}");
    assert_eq!(v[2]["summary"]["failed"], 1, "{r}");
}

#[test]
fn history_shows_one_row_per_run_with_where_how_long_and_the_output() {
    let ws = Workspace::new();
    let host = SshServer::start(&servers::fresh_addr());
    let known = ws.known_hosts(&[&host]);
    let remote = ws.remote_dir("remote");
    let cfg = config(
        &ws,
        &format!(
            "[app-]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n\
             dest_dir = {}/%Y%m%d_%H%M%S\nretries = 0\ninstall_command = echo installing {{name}}; echo second line\n",
            host.addr,
            host.port,
            servers::test_user().name,
            servers::keys().ed25519.display(),
            known.display(),
            remote.display(),
        ),
    );
    let f = ws.file("app-1.tgz", b"payload");
    let c = cfg.to_str().unwrap();
    for _ in 0..2 {
        ws.dispatch().args(["-c", c]).arg(&f).run().assert_success();
    }
    let r = ws
        .dispatch()
        .args(["-c", c, "history", "--json"])
        .run()
        .assert_success();
    let rows = json_lines(&r.stdout);
    assert_eq!(
        rows.len(),
        2,
        "two runs of an unchanged file are two rows: {r}"
    );
    assert_ne!(rows[0]["run"], rows[1]["run"]);
    for row in &rows {
        assert_eq!(row["state"], "installed", "{row}");
        assert_eq!(row["attempts"], 1, "{row}");
        assert_eq!(row["exit_status"], 0, "{row}");
        let remote_path = row["remote_path"].as_str().unwrap();
        assert!(
            remote_path.starts_with(remote.to_str().unwrap())
                && remote_path.ends_with("/app-1.tgz"),
            "{row}"
        );
        assert!(row["elapsed_ms"].as_u64().is_some(), "{row}");
        let tail = row["output_tail"].as_str().unwrap();
        assert!(tail.contains("installing app-1.tgz\nsecond line"), "{row}");
    }
    // the table: a RUN column, the remote path
    let t = ws
        .dispatch()
        .args(["-c", c, "history"])
        .run()
        .assert_success();
    assert!(t.stdout.starts_with("RUN"), "{t}");
    assert!(t.stdout.contains("/app-1.tgz"), "{t}");
    // one run in full
    let id = rows[1]["run"].as_i64().unwrap().to_string();
    let one = ws
        .dispatch()
        .args(["-c", c, "history", "--run", &id])
        .run()
        .assert_success();
    assert!(one.stdout.contains("    | installing app-1.tgz"), "{one}");
    assert!(one.stdout.contains("uploaded"), "{one}");
    let one = ws
        .dispatch()
        .args(["-c", c, "history", "--json", "--run", &id])
        .run()
        .assert_success();
    let v = json_lines(&one.stdout);
    assert_eq!(v.len(), 1);
    let states: Vec<&str> = v[0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["queued", "uploading", "uploaded", "installed"],
        "{one}"
    );
    let none = ws
        .dispatch()
        .args(["-c", c, "history", "--run", "999999"])
        .run();
    assert_eq!(none.status, Some(1), "{none}");
    assert!(none.stderr.contains("run 999999: no such run"), "{none}");
    // --since
    let recent = ws
        .dispatch()
        .args(["-c", c, "history", "--json", "--since", "1h"])
        .run();
    assert_eq!(json_lines(&recent.stdout).len(), 2, "{recent}");
    let future = ws
        .dispatch()
        .args(["-c", c, "history", "--json", "--since", "2999-01-01"])
        .run()
        .assert_success();
    assert_eq!(future.stdout, "", "{future}");
    let bad = ws
        .dispatch()
        .args(["-c", c, "history", "--since", "soon"])
        .run();
    assert_eq!(bad.status, Some(2), "{bad}");
}

/// Run the session's script runner through `shell` (a command that runs its
/// last argument with stderr merged into stdout, as the SSH channel does),
/// feed it `jobs`, close its input, and return everything it printed.
fn runner_session(shell: &[String], jobs: &[(u64, &str)]) -> String {
    let cmd = dispatch::script::driver_command("n0nce");
    let mut child = Command::new(&shell[0])
        .args(&shell[1..])
        .arg(format!("{cmd} 2>&1"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (secs, script) in jobs {
        stdin
            .write_all(&dispatch::script::frame_job(*secs, script))
            .unwrap();
    }
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {out}{err}");
    out + &err
}

/// What a session may print: the scripts' own lines and the status lines.
fn noise(out: &str, allowed: &[&str]) -> Vec<String> {
    out.lines()
        .filter(|l| !l.is_empty() && !l.starts_with("@@dispatch:n0nce:rc:") && !allowed.contains(l))
        .map(String::from)
        .collect()
}

// An executor that ends (end of input, or killed with its install) used to
// make bash report the job (`[1]+ Done coproc EX …`) and read a pipe it had
// already closed (`read: 63: invalid file descriptor`), on the stderr the
// channel merges into the output; it happened in about one session in ten.
#[test]
fn the_script_runner_prints_nothing_of_its_own_when_an_executor_ends() {
    let jobs = [(5, "echo hi"), (5, "kill -TERM 0"), (5, "echo after")];
    let sh = vec!["sh".to_string(), "-c".to_string()];
    let mut threads = Vec::new();
    for _ in 0..4 {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || {
            let mut found = Vec::new();
            for _ in 0..50 {
                let out = runner_session(&sh, &jobs);
                assert_eq!(out.matches("@@dispatch:n0nce:rc:").count(), 3, "{out}");
                found.extend(noise(&out, &["hi", "after"]));
            }
            found
        }));
    }
    let found: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(found.is_empty(), "the runner's own messages: {found:?}");
}

#[test]
fn over_ssh_the_runner_adds_nothing_to_the_output_an_install_gets() {
    let ws = Workspace::new();
    let host = SshServer::start(&servers::fresh_addr());
    let known = ws.known_hosts(&[&host]);
    let ssh: Vec<String> = [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        &format!("UserKnownHostsFile={}", known.display()),
        "-i",
        servers::keys().ed25519.to_str().unwrap(),
        "-p",
        &host.port.to_string(),
        &format!("{}@{}", servers::test_user().name, host.addr),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..4 {
        let ssh = ssh.clone();
        threads.push(std::thread::spawn(move || {
            let mut found = Vec::new();
            for _ in 0..10 {
                let jobs = [
                    (5, "echo hi"),
                    (1, "sleep 30"),
                    (5, "kill -TERM 0"),
                    (5, "echo after"),
                ];
                let out = runner_session(&ssh, &jobs);
                assert_eq!(out.matches("@@dispatch:n0nce:rc:").count(), 4, "{out}");
                assert!(out.contains("@@dispatch:n0nce:rc:124"), "{out}");
                found.extend(noise(&out, &["hi", "after"]));
                assert!(started.elapsed() < Duration::from_secs(180));
            }
            found
        }));
    }
    let found: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(found.is_empty(), "the runner's own messages: {found:?}");
}
