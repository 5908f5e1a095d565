//! The config and the command line are correct by default: templates through
//! which a file name could run code, values that crashed, a broken log
//! config, `check --connect` per route, and a summary that counts every input.

use std::fs;
use std::path::PathBuf;

use crate::servers::{self, SshServer, Workspace};

/// `dispatch -c CFG check` on a config that must be refused: exit 2, and
/// stderr names `CFG:line:` and says `what`.
#[track_caller]
fn refused(ws: &Workspace, cfg: &std::path::Path, line: usize, what: &str) -> String {
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check"])
        .run()
        .assert_code(2);
    let want = format!("{}:{line}: ", cfg.display());
    assert!(r.stderr.contains(&want), "want {want:?} in\n{r}");
    assert!(r.stderr.contains(what), "want {what:?} in\n{r}");
    r.stderr
}

#[test]
fn a_placeholder_inside_quotes_is_a_config_error_naming_the_key_and_the_fix() {
    let ws = Workspace::new();
    let f = ws.file("x-1", b"x");
    let cases: &[(&str, &str, &str)] = &[
        (
            "echo \"installing {name}\"",
            "install_command: {name} inside \"…\"",
            "install_command = echo \"installing \"{name}",
        ),
        (
            "echo 'installing {name}'",
            "install_command: {name} inside '…'",
            "install_command = echo 'installing '{name}",
        ),
        (
            "x=$(basename {file}) && echo $x",
            "install_command: {file} inside $(…)",
            "plain unquoted text",
        ),
        (
            "echo `basename {file}`",
            "install_command: {file} after a `…` command substitution",
            "plain unquoted text",
        ),
        (
            "cat <<EOF\n  {name}\n  EOF",
            "install_command: {name} after a << here-document",
            "plain unquoted text",
        ),
        (
            "eval tar xzf {name}",
            "install_command: {name} in a command that uses `eval`",
            "plain unquoted text",
        ),
    ];
    for (cmd, what, fix) in cases {
        let cfg = ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n[x]\nhost = 127.0.0.1\ninstall_command = {cmd}\n",
            ws.path().join("state").display()
        ));
        let err = refused(&ws, &cfg, 5, what);
        assert!(err.contains(fix), "{cmd:?}: want {fix:?} in\n{err}");
        // the same when dispatching: nothing is attempted
        let r = ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap()])
            .arg(&f)
            .run()
            .assert_code(2);
        assert!(r.stderr.contains(what), "{r}");
    }
}

#[test]
fn the_shipped_example_config_and_plain_placeholders_pass_check() {
    let ws = Workspace::new();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dispatch.example.ini");
    ws.dispatch()
        .args(["-c", example.to_str().unwrap(), "check"])
        .run()
        .assert_code(0);
    let cfg = ws.write_config(
        "[x]\nhost = h\ninstall_command = echo \"installing \"{name} && cd \"$(dirname x)\" && tar xzf {file} -C ${{HOME}}\n",
    );
    ws.dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check"])
        .run()
        .assert_code(0);
}

#[test]
fn config_values_that_crashed_are_errors_at_their_line() {
    let ws = Workspace::new();
    let cases: &[(&str, usize, &str)] = &[
        (
            "[x]\nhost = h\ninstall_timeout = 1e20\n",
            3,
            "install_timeout: `1e20` is too long (at most 168h (7 days))",
        ),
        (
            "[x]\nhost = h\nio_timeout = 1e19\n",
            3,
            "io_timeout: `1e19` is too long",
        ),
        (
            "[dispatch]\njobs = 100000000\n[x]\nhost = h\n",
            2,
            "jobs: `100000000` is not a whole number from 1 to 256",
        ),
        (
            "[dispatch]\nmax_sessions_per_host = 1000\n[x]\nhost = h\n",
            2,
            "max_sessions_per_host",
        ),
        ("[x]\nhost = h\nretries = 1000000\n", 3, "retries"),
        ("[x]\nhost = h\nretry_delay = 1e30\n", 3, "retry_delay"),
        (
            "[x]\nhost = h\ninstall_timeout = 0\n",
            3,
            "must be more than 0",
        ),
        ("[dispatch]\nrescan = 1e300\n[x]\nhost = h\n", 2, "rescan"),
    ];
    for (text, line, what) in cases {
        let cfg = ws.write_config(text);
        refused(&ws, &cfg, *line, what);
    }
    // -j on the command line has the same range as jobs
    let cfg = ws.write_config("[x]\nhost = h\n");
    for j in ["0", "100000000"] {
        let r = ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap(), "-j", j, "check"])
            .run()
            .assert_code(2);
        assert!(r.stderr.contains("--jobs"), "{r}");
    }
}

#[test]
fn a_config_file_that_is_not_utf8_is_an_error_at_its_line() {
    let ws = Workspace::new();
    let cfg = ws.path().join("latin1.ini");
    fs::write(&cfg, b"[x]\nhost = h\nlogin = j\xf6rg\n").unwrap();
    refused(&ws, &cfg, 3, "not valid UTF-8");
}

#[test]
fn a_missing_identity_file_is_a_config_error() {
    let ws = Workspace::new();
    let cfg = ws.write_config("[x]\nhost = h\nidentity_file = ~/.ssh/no_such_key\n");
    let err = refused(&ws, &cfg, 3, "identity_file");
    assert!(err.contains("no_such_key does not exist"), "{err}");
}

#[test]
fn a_broken_log_config_is_a_config_error_naming_the_file() {
    let ws = Workspace::new();
    let missing = ws.path().join("no-such-logger.yaml");
    let bad = ws.path().join("bad-logger.yaml");
    fs::write(&bad, "appenders: [\n").unwrap();
    let cfg = ws.write_config("[x]\nhost = h\n");
    for log in [&missing, &bad] {
        let r = ws
            .dispatch()
            .args(["-c", cfg.to_str().unwrap(), "--log-config"])
            .arg(log)
            .arg("check")
            .run()
            .assert_code(2);
        assert!(
            r.stderr.contains(&log.display().to_string()) && r.stderr.contains("log config"),
            "{r}"
        );
        assert!(!r.stdout.contains("OK"), "checked without its log: {r}");
    }
    // the same from log_config in [dispatch]
    let cfg = ws.write_config(&format!(
        "[dispatch]\nlog_config = {}\n[x]\nhost = h\n",
        bad.display()
    ));
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check"])
        .run()
        .assert_code(2);
    assert!(
        r.stderr.contains(&bad.display().to_string())
            && r.stderr.contains(&cfg.display().to_string()),
        "{r}"
    );
}

#[test]
fn config_problems_are_capped_and_their_control_characters_escaped() {
    let ws = Workspace::new();
    let mut text = String::from("[x]\nhost = h\n");
    for i in 0..30 {
        text.push_str(&format!("typo{i} = 1\n"));
    }
    text.push_str("log\u{1b}[2Jin = x\n");
    let cfg = ws.write_config(&text);
    let err = refused(&ws, &cfg, 3, "unknown key");
    assert_eq!(err.lines().count(), 21, "{err}");
    assert!(err.contains("… and 11 more problems"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "raw escape on the terminal: {err:?}"
    );
    let cfg = ws.write_config("[x]\nhost = h\nlog\u{1b}[2Jin = x\n");
    let err = refused(&ws, &cfg, 3, "log\\u{1b}[2Jin");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn check_connect_checks_each_routes_own_credentials() {
    let ws = Workspace::new();
    let srv = SshServer::start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&srv]);
    let u = servers::test_user();
    // three routes to the same login@host:port: right password, wrong
    // password, key
    let route = |section: &str, auth: &str| {
        format!(
            "[{section}]\nhost = {}\nport = {}\nlogin = {}\nknown_hosts = {}\nconnect_timeout = 3s\nretries = 0\n{auth}\n",
            srv.addr,
            srv.port,
            u.name,
            kh.display()
        )
    };
    let cfg = ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n{}{}{}",
        ws.path().join("state").display(),
        route("right-", &format!("password = {}", u.password)),
        route("wrong-", "password = not-the-password"),
        route(
            "key-",
            &format!("identity_file = {}", servers::keys().ed25519.display())
        ),
    ));
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "check", "--connect"])
        .run()
        .assert_code(1);
    let lines: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(lines.len(), 3, "one line per route × host:\n{r}");
    let line = |section: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("[{section}]")))
            .copied()
            .unwrap_or_else(|| panic!("no line for [{section}]:\n{r}"))
    };
    assert!(line("right-").contains(": ok ("), "{r}");
    assert!(line("key-").contains(": ok ("), "{r}");
    assert!(line("wrong-").contains(": FAILED: "), "{r}");
    assert!(
        !r.output().contains("not-the-password"),
        "password shown: {r}"
    );
}

#[test]
fn a_missing_input_is_a_failed_input_in_the_summary_and_each_error_is_printed_once() {
    let ws = Workspace::new();
    let srv = SshServer::start(&servers::fresh_addr());
    let kh = ws.known_hosts(&[&srv]);
    let remote = ws.remote_dir("remote");
    let cfg = ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n[pkg]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\ndest_dir = {}/d\nconnect_timeout = 3s\nretries = 0\n",
        ws.path().join("state").display(),
        srv.addr,
        srv.port,
        servers::test_user().name,
        servers::keys().ed25519.display(),
        kh.display(),
        remote.display()
    ));
    let good = ws.file("pkg-good", b"good");
    let missing = ws.path().join("pkgs").join("pkg-missing");
    let unrouted = ws.file("other-1", b"o");
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap()])
        .arg(&good)
        .arg(&missing)
        .arg(&unrouted)
        .run()
        .assert_code(1);
    assert!(
        r.stderr
            .contains("1 file × host + 1 input not readable: 1 ok, 1 failed, 1 unrouted"),
        "{r}"
    );
    assert_eq!(r.stderr.matches("cannot read").count(), 1, "{r}");
    assert_eq!(r.stderr.matches("no route matches").count(), 1, "{r}");
    assert!(remote.join("d/pkg-good").is_file(), "{r}");
    // -v shows the log as well
    let r = ws
        .dispatch()
        .args(["-c", cfg.to_str().unwrap(), "-v"])
        .arg(&missing)
        .run()
        .assert_code(1);
    assert!(r.stderr.matches("cannot read").count() >= 1, "{r}");
}

#[test]
fn a_mistyped_command_is_a_usage_error_with_the_command_meant_but_a_real_file_is_a_file() {
    let ws = Workspace::new();
    let cfg = ws.write_config("[x-]\nhost = 127.0.0.1\n");
    for (typed, meant) in [
        ("chek", "check"),
        ("histroy", "history"),
        ("Watch", "watch"),
    ] {
        let r = ws.send(&cfg, &[typed]).run().assert_code(2);
        let want =
            format!("`{typed}` is neither a file nor a command (did you mean `dispatch {meant}`?)");
        assert!(r.stderr.contains(&want), "{typed}: {r}");
    }
    // far from every command: a missing file, as before
    let r = ws.send(&cfg, &["zzzzzz"]).run().assert_code(1);
    assert!(r.stderr.contains("cannot read"), "{r}");
    // a file of that name exists: it is a file (here: one no route matches)
    let dir = ws.path().join("cwd");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("chek"), b"x").unwrap();
    let r = ws
        .send(&cfg, &["chek"])
        .current_dir(&dir)
        .run()
        .assert_code(3);
    assert!(r.stderr.contains("no route matches"), "{r}");
}

#[test]
fn every_command_help_shows_examples_and_exit_codes() {
    let ws = Workspace::new();
    for cmd in [
        &[][..],
        &["watch"][..],
        &["route"][..],
        &["check"][..],
        &["history"][..],
        &["status"][..],
        &["releases"][..],
        &["rollback"][..],
        &["lock", "status"][..],
    ] {
        let r = ws.dispatch().args(cmd).arg("--help").run().assert_code(0);
        for part in ["Exit codes:", "  2  "] {
            assert!(
                r.stdout.contains(part),
                "{cmd:?} --help has no {part:?}:\n{}",
                r.stdout
            );
        }
        if !cmd.is_empty() {
            assert!(
                r.stdout.contains("Examples:\n  dispatch "),
                "{cmd:?}:\n{}",
                r.stdout
            );
        }
    }
}

/// A subcommand's help lists the options it uses, not every global one;
/// `dispatch --help` still lists them all, and the hidden ones still parse.
#[test]
fn subcommand_help_shows_only_the_options_that_apply() {
    let ws = Workspace::new();
    let top = ws.dispatch().arg("--help").run().assert_code(0);
    for opt in ["--dry-run", "--progress", "--jobs", "--netrc", "--json"] {
        assert!(
            top.stdout.contains(opt),
            "dispatch --help lacks {opt}:\n{top}"
        );
    }
    for (cmd, shown, hidden) in [
        (
            "history",
            &["--config", "--json", "--failed", "--since"][..],
            &["--dry-run", "--progress", "--jobs", "--netrc"][..],
        ),
        (
            "status",
            &["--config", "--json"][..],
            &["--dry-run", "--progress", "--jobs"][..],
        ),
        (
            "route",
            &["--config", "--json"][..],
            &["--dry-run", "--progress", "--netrc"][..],
        ),
        (
            "watch",
            &["--config", "--dry-run", "--jobs"][..],
            &["--progress", "--json"][..],
        ),
    ] {
        for flag in ["--help", "-h"] {
            // after the global -c, as an operator types it
            let r = ws
                .dispatch()
                .args(["-c", "x.ini", cmd, flag])
                .run()
                .assert_code(0);
            for o in shown {
                assert!(r.stdout.contains(o), "{cmd} {flag} lacks {o}:\n{r}");
            }
            for o in hidden {
                assert!(!r.stdout.contains(o), "{cmd} {flag} shows {o}:\n{r}");
            }
            assert!(!r.stdout.contains("\x1b["), "colours into a pipe:\n{r}");
        }
    }
    // hidden, still accepted
    let cfg = ws.write_config("[x]\nhost = h\n");
    ws.dispatch()
        .args([
            "-c",
            cfg.to_str().unwrap(),
            "route",
            "--progress",
            "none",
            "x",
        ])
        .run()
        .assert_code(0);
}
