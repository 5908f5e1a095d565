//! What a foreground run shows while it works (`--progress`): not on a
//! terminal, plain lines on stderr — connecting, retries, a step that has
//! been quiet for 5 s — and nothing of it with `--json` or
//! `--progress none`. Real sshd for the host that works; a silent listener
//! (accepts, never speaks) and a closed port for the ones that do not.

use std::time::Duration;

use crate::scenario;
#[allow(unused_imports)]
use crate::servers::Placement;
use crate::servers::{self, Workspace};

/// A config: `extra` sections (hosts that do not work) before the `[ok-]`
/// route to the real host `h`, which installs into a dated dir.
fn config_with(
    ws: &Workspace,
    p: Placement,
    h: &servers::SshServer,
    extra: &str,
) -> std::path::PathBuf {
    let kh = ws.known_hosts(&[h]);
    let remote = ws.remote_dir("remote");
    ws.write_config(&format!(
        "[dispatch]\nstate_dir = {}\n{extra}[ok-]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {}\nknown_hosts = {}\n{}install_command = sha256sum {{name}} > {{name}}.installed\n",
        ws.path().join("state").display(),
        h.addr,
        h.port,
        h.user().name,
        servers::keys().ed25519.display(),
        kh.display(),
        p.dest_dir_line(format!("{}/%Y%m%d_%H%M%S", remote.display())),
    ))
}

/// `ok-1` … `ok-3`, for the real host.
fn three_ok(ws: &Workspace) -> Vec<std::path::PathBuf> {
    (1..=3)
        .map(|i| ws.file(&format!("ok-{i}"), format!("ok {i}").as_bytes()))
        .collect()
}

scenario! {
    fn without_a_terminal_progress_is_plain_lines_telling_every_wait(p: Placement) {
        let ws = Workspace::new();
        let h = p.start(&servers::fresh_addr());
        let silent_addr = servers::fresh_addr();
        let (_silent, silent_port) = servers::silent_server(&silent_addr);
        let closed_addr = servers::fresh_addr();
        let closed_port = servers::free_port(&closed_addr);
        let remote = ws.remote_dir("remote");
        let key = servers::keys().ed25519.display().to_string();
        let cfg = config_with(&ws, p, &h, &format!(
            "[dead-]\nhost = {silent_addr}\nport = {silent_port}\nlogin = nobody\nidentity_file = {key}\ntransfer = scp\nconnect_timeout = 1s\nio_timeout = 7s\nretries = 0\n\
             [refused-]\nhost = {closed_addr}\nport = {closed_port}\nlogin = nobody\nidentity_file = {key}\ntransfer = scp\nconnect_timeout = 1s\nretries = 1\nretry_delay = 1s\n",
        ));
        let mut files = three_ok(&ws);
        files.push(ws.file("dead-1", b"d"));
        files.push(ws.file("refused-1", b"r"));
        let r = ws
            .send(&cfg, &files)
            .timeout(Duration::from_secs(60))
            .run()
            .assert_code(1);
        let err = &r.stderr;
        assert!(!err.contains('\r'), "a carriage return without a terminal: {err:?}");
        for want in [
            format!("dispatch: dead-1: {silent_addr}: connecting by scp"),
            format!("dispatch: refused-1: {closed_addr}: attempt 1 failed: "),
            "; retrying in 1.0 s".to_string(),
        ] {
            assert!(err.contains(&want), "no {want:?} in:\n{err}");
        }
        // the silent host's wait is told once it has been quiet for 5 s (the
        // ticker looks once a second: under load the line may say 6 s)
        let still = format!("dispatch: dead-1: {silent_addr}: still connecting (");
        let secs: u64 = err
            .split(&still)
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {still:?}… in:\n{err}"));
        assert!(secs >= 5, "told after {secs} s:\n{err}");
        // told once, by the progress lines, not again as a log record
        assert_eq!(err.matches("retrying in").count(), 1, "{err}");
        for i in 1..=3 {
            assert!(r.stdout.contains(&format!("ok-{i}: {}: installed", h.addr)), "{}", r.stdout);
        }
        assert!(r.stdout.contains("dead-1") && r.stdout.contains("FAILED"), "{}", r.stdout);
        let root = p.root(&h, &remote);
        for i in 1..=3 {
            assert_eq!(servers::installed(&root, &format!("ok-{i}")), 1);
        }
        // with --json (and with --progress none) only the results
        for quiet in [&["--json"][..], &["--progress", "none"][..]] {
            let r = ws.send(&cfg, &files[3..]).args(quiet).run().assert_code(1);
            assert!(!r.stderr.contains("connecting by"), "{quiet:?}: {}", r.stderr);
            assert!(!r.stderr.contains("still connecting"), "{quiet:?}: {}", r.stderr);
        }
    }
}

scenario! {
    fn on_a_terminal_progress_is_bars_that_leave_the_results_readable(p: Placement) {
        let ws = Workspace::new();
        let h = p.start(&servers::fresh_addr());
        let kh = ws.known_hosts(&[&h]);
        let key = servers::keys().ed25519.display().to_string();
        let remote = ws.remote_dir("remote");
        let cfg = ws.write_config(&format!(
            "[dispatch]\nstate_dir = {}\n[big-]\nhost = {}\nport = {}\nlogin = {}\nidentity_file = {key}\nknown_hosts = {}\n{}install_command = sha256sum {{name}} > {{name}}.installed\n",
            ws.path().join("state").display(),
            h.addr,
            h.port,
            h.user().name,
            kh.display(),
            p.dest_dir_line(format!("{}/%Y%m%d_%H%M%S", remote.display())),
        ));
        let big = vec![7u8; 48 << 20];
        let files: Vec<_> = (1..=3)
            .map(|i| ws.file(&format!("big-{i}"), &big))
            .collect();
        let r = ws.send(&cfg, &files).on_a_terminal().run().assert_code(0);
        let screen = &r.stdout;
        assert!(screen.contains("overall"), "no overall bar: {screen:?}");
        assert!(screen.contains("\x1b["), "not drawn: {screen:?}");
        assert!(!screen.contains("connecting by"), "lines instead of bars: {screen:?}");
        let root = p.root(&h, &remote);
        for i in 1..=3 {
            assert!(screen.contains(&format!("big-{i}: {}: installed", h.addr)), "{screen:?}");
            assert_eq!(servers::installed(&root, &format!("big-{i}")), 1);
        }
    }
}

scenario! {
    /// `--json`: every step of every file × host as an `{"event": …}` line
    /// as it happens, in order, before that file × host's result object.
    fn json_gives_each_step_as_an_event_before_the_result(p: Placement) {
        let ws = Workspace::new();
        let h = p.start(&servers::fresh_addr());
        let closed_addr = servers::fresh_addr();
        let closed_port = servers::free_port(&closed_addr);
        let key = servers::keys().ed25519.display().to_string();
        let cfg = config_with(&ws, p, &h, &format!(
            "[refused-]\nhost = {closed_addr}\nport = {closed_port}\nlogin = nobody\nidentity_file = {key}\ntransfer = scp\nconnect_timeout = 1s\nretries = 1\nretry_delay = 200ms\n",
        ));
        let mut files = three_ok(&ws);
        files.push(ws.file("refused-1", b"r"));
        let r = ws.send(&cfg, &files).arg("--json").run().assert_code(1);
        let lines: Vec<serde_json::Value> = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        // where each event and result of `file` stands in the output
        let at = |file: &str, event: &str| {
            lines
                .iter()
                .position(|v| v["file"] == file && v["event"] == event)
                .unwrap_or_else(|| panic!("no {event} event for {file}:\n{}", r.stdout))
        };
        let result_at = |file: &str| {
            lines
                .iter()
                .position(|v| v["file"] == file && v.get("event").is_none() && v["state"].is_string())
                .unwrap_or_else(|| panic!("no result for {file}:\n{}", r.stdout))
        };
        for i in 1..=3 {
            let f = format!("ok-{i}");
            let order = [
                at(&f, "queued"),
                at(&f, "uploading"),
                at(&f, "verifying"),
                at(&f, "uploaded"),
                at(&f, "installing"),
                result_at(&f),
            ];
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{f}: {order:?}\n{}", r.stdout);
            let up = &lines[at(&f, "uploaded")];
            assert_eq!(up["host"], h.addr.as_str());
            assert_eq!(up["bytes"], 4);
            assert_eq!(up["transport"], "scp");
            assert!(up["at"].as_str().is_some_and(|t| t.contains('T')), "{up}");
        }
        let retry = &lines[at("refused-1", "retrying")];
        assert_eq!((retry["attempt"].as_u64(), retry["delay_ms"].as_u64()), (Some(1), Some(200)));
        assert!(retry["error"].as_str().is_some_and(|e| e.contains("refused")), "{retry}");
        assert!(at("refused-1", "retrying") < result_at("refused-1"));
        // no event reads as a result: the records are what they were
        assert_eq!(servers::results(&r.stdout).len(), 4, "{}", r.stdout);
        assert!(lines.iter().all(|v| v.get("event").is_none() || v.get("ok").is_none()));
        assert!(lines.last().unwrap().get("summary").is_some(), "{}", r.stdout);
    }
}
