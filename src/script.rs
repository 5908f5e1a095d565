//! Remote scripts and the runner that executes them: what runs on a host,
//! and how. One remote process per session (the runner) reads framed
//! scripts from the channel and runs each in a fresh subshell, bounded by
//! its deadline on the host, printing a status line with a per-session
//! nonce after it; [`crate::transport::ssh::SshSession::run_script`] speaks
//! to it. The scripts themselves — install, verify, publish — and their exit
//! statuses are here too, all placeholders and paths shell-quoted.

use std::time::Duration;

use crate::config::{Route, Verify};
use crate::template::shell_quote;

/// Exit statuses of the remote publish script (no-SFTP hosts).
pub const CANNOT_CD: i32 = 231;
pub const VERIFY_FAILED: i32 = 230;
pub const CANNOT_RENAME: i32 = 232;

/// The session's script runner: reads framed scripts from stdin (see
/// [`frame_job`]) and runs each, printing a status line after it. One remote
/// process per session instead of one login shell per file.
///
/// With bash on the host ([`BASH_DRIVER`]) a persistent `sh` ([`EXECUTOR`],
/// as `dispatch-bounded`) reads the scripts and runs each in a subshell of
/// its own, while bash only keeps the deadline: per file one `sh` fork, no
/// `timeout`, no shell exec. The executor itself never runs a script's code,
/// so every script starts from the same state (cwd, variables, umask, traps,
/// options, environment): nothing one install does is seen by the next.
/// Without bash a plain `sh` loop ([`SH_DRIVER`]) runs each script with
/// `sh -c` under coreutils `timeout`. The runners are passed as quoted
/// arguments, so the login shell only ever sees a plain `exec sh -c ARG
/// NAME ARG ARG ARG ARG`.
///
/// Each status line carries `nonce` (random per runner, see [`rc_marker`]),
/// so an install printing something that looks like one cannot end its
/// script early.
pub fn driver_command(nonce: &str) -> String {
    format!(
        "exec sh -c {} dispatch-sh {} {} {} {}",
        shell_quote(
            r#"if command -v bash >/dev/null 2>&1; then exec bash --norc -c "$1" dispatch-driver "$4" "$3"; fi; exec sh -c "$2" dispatch-driver "$4""#
        ),
        shell_quote(BASH_DRIVER),
        shell_quote(SH_DRIVER),
        shell_quote(EXECUTOR),
        shell_quote(nonce),
    )
}

/// One script as the runners read it: a line with the deadline in seconds,
/// each line of the script prefixed with `>`, then `.`. No line of a script,
/// a quoted file name with newlines included, can end it early.
pub fn frame_job(secs: u64, script: &str) -> Vec<u8> {
    let mut job = Vec::with_capacity(script.len() + 32);
    job.extend_from_slice(format!("{}\n", secs.max(1)).as_bytes());
    for line in script.split('\n') {
        job.push(b'>');
        job.extend_from_slice(line.as_bytes());
        job.push(b'\n');
    }
    job.extend_from_slice(b".\n");
    job
}

/// What the runner prints before a script's status: `\n@@dispatch:NONCE:rc:`.
pub fn rc_marker(nonce: &str) -> Vec<u8> {
    format!("\n@@dispatch:{nonce}:rc:").into_bytes()
}

/// The bash runner (`$1` = the status marker's nonce, `$2` = [`EXECUTOR`]).
/// The executor is a coprocess in a process group of its own (`set -m`)
/// reading the channel (fd 5, bash's stdin) and writing the scripts' output
/// to it (fd 4); it tells bash the deadline when a script starts and its
/// status when it ends, on the coprocess pipe. bash waits for the status
/// with `read -t` (a wait with a deadline, no `sleep` process). At the
/// deadline the executor's group (it and the script's processes) gets TERM,
/// 10 s later KILL, the status is 124, as with coreutils `timeout`, and a
/// new executor reads on where the old one stopped (`read` takes a line
/// byte by byte, never more), so scripts sent back to back survive a kill.
/// fd 3 is a pipe to itself, to sleep on; fd 7 the executor's stdin, for
/// "status printed, go on" (SIGPIPE ignored: the executor may be gone).
///
/// Job control is on only while the coprocess is forked (that is what gives
/// it its own group): left on, bash reports every job that ends on its
/// stderr (`[1]+ Done coproc EX …`, `Terminated`), which the channel
/// carries into an install's output. And bash closes a coprocess's pipe
/// and unsets `EX` as soon as it has reaped it — at the end of the input
/// that can be before the last `read` (`read: 63: invalid file
/// descriptor`) — so the pipe is read through a copy of its own on fd 6
/// (/dev/null, i.e. end of input, if the executor was already gone).
pub const BASH_DRIVER: &str = r#"exec 4>&1 5<&0 3<> <(:) </dev/null; m=$1; e=$2; trap '' PIPE
up() {
  exec 6<&- 7>&-; set -m
  coproc EX { exec sh -c "$e" dispatch-bounded 3>&-; }
  set +m; g=$EX_PID; exec 6<&"${EX[0]:-0}"
  if [ -n "${EX[1]:-}" ]; then exec 7>&"${EX[1]}"; else exec 7>/dev/null; fi
}
up
while IFS= read -r -u 6 t; do
  ok=
  if IFS= read -r -t "$t" -u 6 rc; then ok=1
  elif [ $? -gt 128 ]; then
    rc=124; kill -TERM -- "-$g" 2>/dev/null
    n=0; while kill -0 -- "-$g" 2>/dev/null && [ $n -lt 100 ]; do read -r -t 0.1 -u 3 _; n=$((n + 1)); done
    kill -KILL -- "-$g" 2>/dev/null; wait "$g" 2>/dev/null; up
  else
    wait "$g" 2>/dev/null; rc=$?; kill -KILL -- "-$g" 2>/dev/null; up
  fi
  printf '\n@@dispatch:%s:rc:%s\n' "$m" "$rc"
  [ -z "$ok" ] || echo >&7
done"#;

/// The executor under the bash runner: reads a script (see [`frame_job`])
/// from the channel (fd 5), reports its deadline to bash, runs it in a
/// subshell with stdin from /dev/null and its output on the channel (fd 4)
/// and reports its exit status (`$0` in a script is `dispatch-bounded`).
/// Then it waits for bash to say it printed the status line (a line on its
/// stdin) before it reads the next script: a client that sends scripts back
/// to back ([`crate::transport::ssh::stream`]) never sees the next script's
/// output before this one's status. The executor's own variables are unset
/// in the subshell before the script runs. A script cut short (end of
/// input) never runs.
pub const EXECUTOR: &str = r#"nl='
'
while IFS= read -r t <&5; do
  s=
  while IFS= read -r l <&5; do case $l in '>'*) s=$s${l#?}$nl ;; *) break ;; esac; done
  [ "$l" = . ] || exit 0
  echo "$t"
  ( unset nl t l; eval "$s" ) </dev/null >&4 2>&1 4>&- 5<&-
  echo "$?"; read -r _ || exit 0
done"#;

/// The fallback runner (no bash; `$1` = the nonce): one `sh -c` per script,
/// stdin from /dev/null, the deadline enforced by coreutils `timeout`
/// (TERM, KILL 10 s later, status 124) when the host has it.
pub const SH_DRIVER: &str = r#"nl='
'
while IFS= read -r t; do
  s=
  while IFS= read -r l; do case $l in '>'*) s=$s${l#?}$nl ;; *) break ;; esac; done
  [ "$l" = . ] || exit 0
  if command -v timeout >/dev/null 2>&1; then timeout -k 10 "$t" sh -c "$s" </dev/null 2>&1
  else sh -c "$s" </dev/null 2>&1; fi
  printf '\n@@dispatch:%s:rc:%s\n' "$1" "$?"
done"#;

/// How much longer than a script's remote deadline the client waits: the
/// runner's TERM-then-KILL takes up to 10 s.
pub const DRIVER_GRACE: Duration = Duration::from_secs(15);

/// The install as a script of its own: `cd` to the absolute dest dir, then
/// the command, `eval`ed, so a syntax error in it is the install's failure.
/// The runner runs every script in a fresh subshell, stdin from /dev/null,
/// stderr merged, bounded by `install_timeout` (see `SshSession::run_script`).
///
/// When the command is one program with its arguments and redirections
/// (see [`one_program`]) and that program is there to run, the subshell
/// `exec`s it instead of forking once more: one process per install fewer,
/// the same output, status and files (tested against [`plain_install_script`]).
pub fn install_script(dir: &str, cmd: &str) -> String {
    let Some(program) = one_program(cmd) else {
        return plain_install_script(dir, cmd);
    };
    let q = shell_quote(program);
    let runnable = if program.contains('/') {
        format!("[ -f {q} ] && [ -x {q} ]")
    } else {
        format!("command -v {q} >/dev/null")
    };
    format!(
        "cd -- {} || exit {CANNOT_CD}; if {runnable}; then eval {}; fi; eval {}",
        shell_quote(dir),
        shell_quote(&format!("exec {cmd}")),
        shell_quote(cmd)
    )
}

/// The install script without the `exec` shortcut.
pub fn plain_install_script(dir: &str, cmd: &str) -> String {
    format!(
        "cd -- {} || exit {CANNOT_CD}; eval {}",
        shell_quote(dir),
        shell_quote(cmd)
    )
}

/// Shell words that are builtins or keywords of `sh`: `exec` would run
/// another program of that name, or fail.
const SHELL_WORDS: &[&str] = &[
    "!", ".", ":", "[", "alias", "bg", "break", "case", "cd", "chdir", "command", "continue", "do",
    "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "false", "fc", "fg",
    "fi", "for", "function", "getopts", "hash", "if", "in", "jobs", "kill", "local", "printf",
    "pwd", "read", "readonly", "return", "select", "set", "shift", "test", "then", "time", "times",
    "trap", "true", "type", "ulimit", "umask", "unalias", "unset", "until", "wait", "while",
];

/// The program `cmd` runs when it is exactly one simple command — a program
/// (a plain word, not a shell builtin or keyword, no variable assignment
/// before it) with arguments and redirections — as far as a conservative
/// reading can tell: no operator (`;` `&` `|` `(` `)`), no braces, no
/// comment, no backslash or backquote, no newline, no `$(` or `${` inside
/// double quotes. Anything else gets `None` and is run the plain way.
pub fn one_program(cmd: &str) -> Option<&str> {
    let cmd = cmd.trim_start_matches([' ', '\t']);
    let program = cmd.split([' ', '\t']).next()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./+-".contains(c);
    if program.is_empty()
        || program.starts_with(['-', '+'])
        || !program.chars().all(plain)
        || SHELL_WORDS.contains(&program)
    {
        return None;
    }
    let b = cmd.as_bytes();
    let (mut i, mut quote) = (0, None);
    while i < b.len() {
        let c = b[i];
        match (quote, c) {
            (_, b'\n' | b'`') => return None,
            (Some(b'\''), b'\'') | (Some(b'"'), b'"') => quote = None,
            (Some(b'"'), b'\\') => i += 1,
            (Some(b'"'), b'$') if matches!(b.get(i + 1), Some(b'(' | b'{')) => return None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(c),
            (None, b'&') if i > 0 && matches!(b[i - 1], b'>' | b'<') => {}
            (None, b';' | b'&' | b'|' | b'(' | b')' | b'{' | b'}' | b'#' | b'\\') => return None,
            (None, _) => {}
        }
        i += 1;
    }
    quote.is_none().then_some(program)
}

/// Verify `dir/tmp_name` by size or sha256 (exit [`VERIFY_FAILED`] with a
/// message).
pub fn verify_script(
    verify: Verify,
    dir: &str,
    tmp_name: &str,
    size: u64,
    sha: Option<&str>,
) -> String {
    let tmp = shell_quote(tmp_name);
    let vf = VERIFY_FAILED;
    let mut s = format!("cd -- {} || exit {CANNOT_CD}; ", shell_quote(dir));
    match verify {
        Verify::None => {}
        Verify::Size => s.push_str(&format!(
            "s=$(wc -c < {tmp}) || exit {vf}; [ \"$s\" -eq {size} ] || {{ echo \"size on host: $s bytes, sent: {size}\"; exit {vf}; }}; "
        )),
        Verify::Sha256 => {
            let want = shell_quote(sha.unwrap_or_default());
            s.push_str(&format!(
                "h=$(sha256sum < {tmp}) || exit {vf}; h=${{h%% *}}; [ \"$h\" = {want} ] || {{ echo \"sha256 on host: $h, sent: \"{want}; exit {vf}; }}; "
            ));
        }
    }
    s
}

/// No SFTP: verify, take the lock (`lock`: its script), rename — one
/// script, one round trip.
pub fn publish_script(
    route: &Route,
    dir: &str,
    tmp_name: &str,
    name: &str,
    size: u64,
    sha: Option<&str>,
    lock: Option<&str>,
) -> String {
    let mut s = verify_script(route.verify, dir, tmp_name, size, sha);
    if let Some(take) = lock {
        s.push_str(take);
    }
    s.push_str(&format!(
        "mv -f -- {} {} || exit {CANNOT_RENAME}",
        shell_quote(tmp_name),
        shell_quote(name)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Instant;

    /// Feed `(deadline, script)` jobs to a script runner started by `sh -c
    /// runner`, as the SSH session does, and split what it prints into
    /// `(output, status)` per job.
    fn run_runner(runner: &str, jobs: &[(u64, String)], back_to_back: bool) -> Vec<(String, i32)> {
        use std::io::{Read, Write};
        use std::process::{Command, Stdio};
        let marker = crate::script::rc_marker("n0nce");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(runner)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        let mut res = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        // as a pipeline does: every script at once, the statuses read after
        let writer = back_to_back.then(|| {
            let all: Vec<u8> = jobs
                .iter()
                .flat_map(|(secs, script)| crate::script::frame_job(*secs, script))
                .collect();
            let mut stdin = stdin.take().unwrap();
            std::thread::spawn(move || stdin.write_all(&all).unwrap())
        });
        // else as the plain path does: the next script only after the last status
        for (secs, script) in jobs {
            if let Some(stdin) = stdin.as_mut() {
                stdin
                    .write_all(&crate::script::frame_job(*secs, script))
                    .unwrap();
            }
            loop {
                let found = pending
                    .windows(marker.len())
                    .position(|w| w == marker.as_slice());
                if let Some(p) = found {
                    let rest = &pending[p + marker.len()..];
                    if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                        let rc = String::from_utf8_lossy(&rest[..nl]).parse().unwrap();
                        let out = String::from_utf8_lossy(&pending[..p]).into_owned();
                        res.push((out, rc));
                        pending.drain(..p + marker.len() + nl + 1);
                        break;
                    }
                }
                let mut buf = [0u8; 4096];
                let n = stdout.read(&mut buf).unwrap();
                assert!(n > 0, "runner ended early: {res:?}");
                pending.extend_from_slice(&buf[..n]);
            }
        }
        if let Some(w) = writer {
            w.join().unwrap();
        }
        drop(stdin);
        stdout.read_to_end(&mut pending).unwrap();
        assert!(child.wait().unwrap().success());
        assert!(pending.is_empty(), "{pending:?}");
        res
    }

    /// Both script runners: statuses, `exit`, stdin kept from the next job,
    /// the install deadline (124, and the install's process is gone), a file
    /// name that looks like the runner's framing, and a clean state for
    /// every script whatever the one before it did.
    fn check_runner(runner: &str, back_to_back: bool) {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // the pid of the process that outlives the deadline unless killed
        let slow = format!("sh -c 'echo $$ > {}; exec sleep 30'", pidfile.display());
        // a quoted name whose lines look like the runner's framing
        let tricky = "x\n.\n>echo injected\n@@dispatch:rc:0";
        let inst = |cmd: &str| install_script("/", cmd);
        let started = Instant::now();
        let res = run_runner(
            runner,
            &[
                (5, "echo hi; exit 3".into()),
                (5, "cd /nonexistent/dir || exit 231; echo no".into()),
                (5, inst("echo inst; exit 5")),
                (1, inst(&slow)),
                (5, inst("cat; echo stdin-was-empty")),
                (5, inst("trap 'echo bye' EXIT; exit 4")),
                (5, "echo after".into()),
                (5, format!("printf '%s|' {}", shell_quote(tricky))),
                // an install that changes everything a shell can keep ...
                (
                    5,
                    inst("cd /; export LEAK=1; LEFT=1; umask 077; set -e; trap 'echo trapped' EXIT; alias ls=false; f() { :; }"),
                ),
                // ... and the next one sees none of it
                (
                    5,
                    install_script(
                        dir.path().to_str().unwrap(),
                        "echo \"$(pwd)|${LEAK-}|${LEFT-}|$(umask)|$-\"; command -v f || echo no-f; false; echo went-on",
                    ),
                ),
            ],
            back_to_back,
        );
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(res.len(), 10, "{res:?}");
        assert_eq!((res[0].0.trim(), res[0].1), ("hi", 3));
        assert_eq!(res[1].1, 231);
        assert!(!res[1].0.lines().any(|l| l == "no"), "{res:?}");
        assert_eq!((res[2].0.trim(), res[2].1), ("inst", 5));
        assert_eq!(res[3].1, 124, "{res:?}");
        assert_eq!((res[4].0.trim(), res[4].1), ("stdin-was-empty", 0));
        assert_eq!(
            (res[5].0.trim(), res[5].1),
            ("bye", 4),
            "an install's own EXIT trap"
        );
        assert_eq!((res[6].0.trim(), res[6].1), ("after", 0));
        assert_eq!(
            (res[7].0.as_str(), res[7].1),
            (format!("{tricky}|").as_str(), 0)
        );
        assert_eq!((res[8].0.trim(), res[8].1), ("trapped", 0), "{res:?}");
        let own_umask = {
            let o = std::process::Command::new("sh")
                .args(["-c", "umask"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        let lines: Vec<&str> = res[9].0.lines().collect();
        let real_dir = dir.path().canonicalize().unwrap();
        assert_eq!(lines.len(), 3, "{res:?}");
        let first: Vec<&str> = lines[0].split('|').collect();
        assert_eq!(first[0], real_dir.to_str().unwrap(), "cwd: {res:?}");
        assert_eq!(first[1], "", "exported variable leaked: {res:?}");
        assert_eq!(first[2], "", "shell variable leaked: {res:?}");
        assert_eq!(first[3], own_umask, "umask leaked: {res:?}");
        assert!(!first[4].contains('e'), "set -e leaked: {res:?}");
        assert_eq!(lines[1], "no-f", "function leaked: {res:?}");
        assert_eq!(lines[2], "went-on", "{res:?}");
        assert_eq!(res[9].1, 0, "{res:?}");
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let proc_dir = format!("/proc/{}", pid.trim());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&proc_dir).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20)); // poll step
        }
        assert!(
            !std::path::Path::new(&proc_dir).exists(),
            "install outlived its deadline"
        );
    }

    #[test]
    fn bash_script_runner_bounds_installs_without_extra_processes() {
        // bash is installed here, so the session's command picks this runner
        let runner = crate::script::driver_command("n0nce");
        check_runner(&runner, false);
        check_runner(&runner, true);
    }

    /// Scripts sent back to back, each printing at once: every output
    /// belongs to its own script (the next one never starts before this
    /// one's status line is out), with both runners.
    #[test]
    fn scripts_sent_back_to_back_keep_their_own_output() {
        let bash = crate::script::driver_command("n0nce");
        let sh = format!(
            "exec sh -c {} dispatch-driver n0nce",
            shell_quote(crate::script::SH_DRIVER)
        );
        let jobs: Vec<(u64, String)> = (0..300)
            .map(|i| {
                (
                    5,
                    install_script("/", &format!("echo out-{i}; exit {}", i % 7)),
                )
            })
            .collect();
        for runner in [bash, sh] {
            let res = run_runner(&runner, &jobs, true);
            assert_eq!(res.len(), jobs.len());
            for (i, (out, rc)) in res.iter().enumerate() {
                assert_eq!(
                    (out.trim(), *rc),
                    (format!("out-{i}").as_str(), (i % 7) as i32)
                );
            }
        }
    }

    #[test]
    fn sh_script_runner_bounds_installs_with_timeout() {
        let runner = format!(
            "exec sh -c {} dispatch-driver n0nce",
            shell_quote(crate::script::SH_DRIVER)
        );
        check_runner(&runner, false);
        check_runner(&runner, true);
    }

    #[test]
    fn only_one_plain_program_is_run_by_exec() {
        for (cmd, want) in [
            ("sha256sum 'a b' > 'a b'.installed", Some("sha256sum")),
            ("/opt/x/install.sh 'f;$(x)' 2>&1", Some("/opt/x/install.sh")),
            ("tar xzf 'x.tgz' -C \"$HOME\" >&2", Some("tar")),
            ("sudo dpkg -i 'p.deb'", Some("sudo")),
            ("a; b", None),
            ("a && b", None),
            ("a | b", None),
            ("a &", None),
            ("(a)", None),
            ("{ a; }", None),
            ("a $(b)", None),
            ("a \"$(b)\"", None),
            ("a \"${x:-\"}\"", None),
            ("a `b`", None),
            ("a # c", None),
            ("a\nb", None),
            ("a \\; b", None),
            ("a 'unclosed", None),
            ("X=1 env", None),
            ("echo 'a\\nb'", None),
            ("cd /", None),
            ("exec a", None),
            ("-x a", None),
            ("'quoted' a", None),
            ("a 'x;y' \"p q\" >> log", Some("a")),
        ] {
            assert_eq!(one_program(cmd), want, "{cmd:?}");
        }
    }

    /// The `exec` shortcut against the plain install, through both runners:
    /// the same output, status and files for every kind of command —
    /// found or not, executable or not, a failing redirection, stdin, a
    /// deadline, a builtin, a hostile argument.
    #[test]
    fn an_install_run_by_exec_is_the_same_as_the_plain_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        use std::os::unix::fs::PermissionsExt;
        let setup = || {
            std::fs::write(d.join("pkg 1;$(x)"), "payload").unwrap();
            std::fs::write(d.join("not-exec"), "#!/bin/sh\necho hi\n").unwrap();
            std::fs::write(d.join("run.sh"), "#!/bin/sh\necho run \"$@\"; exit 3\n").unwrap();
            std::fs::set_permissions(d.join("run.sh"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        };
        let cmds = [
            "sha256sum 'pkg 1;$(x)' > 'pkg 1;$(x)'.A",
            "cat 'pkg 1;$(x)' >> A.copy",
            "./run.sh 'pkg 1;$(x)' a",
            "./not-exec x",
            "./missing x",
            "nosuchprogram x",
            "sha256sum 'pkg 1;$(x)' > /nonexistent/dir/f",
            "cat",
            "ls -- missing-file",
            "sh -c 'echo $0; exit 7' inner",
            "sleep 30",
            "echo 'a\\tb'",
        ];
        let sh_runner = format!(
            "exec sh -c {} dispatch-driver n0nce",
            shell_quote(crate::script::SH_DRIVER)
        );
        for runner in [crate::script::driver_command("n0nce"), sh_runner] {
            let here = d.to_str().unwrap();
            let run = |script: fn(&str, &str) -> String| {
                let jobs: Vec<(u64, String)> = cmds
                    .iter()
                    .map(|c| (if c.starts_with("sleep") { 1 } else { 5 }, script(here, c)))
                    .collect();
                let res = run_runner(&runner, &jobs, false);
                let files = std::fs::read_dir(d)
                    .unwrap()
                    .map(|e| {
                        let e = e.unwrap();
                        let body = std::fs::read(e.path()).unwrap();
                        std::fs::remove_file(e.path()).ok();
                        (e.file_name(), body)
                    })
                    .collect::<std::collections::BTreeMap<_, _>>();
                (res, files)
            };
            setup();
            let fast = run(install_script);
            setup();
            let plain = run(plain_install_script);
            assert_eq!(fast.0, plain.0, "{runner}");
            assert_eq!(fast.1, plain.1, "{runner}");
            // and the shortcut was taken where it can be, the results differ
            assert_eq!(fast.0[0].1, 0);
            assert_eq!(fast.0[2], ("run pkg 1;$(x) a\n".to_string(), 3));
            assert_eq!(fast.0[10].1, 124);
            assert!(fast.1.contains_key(std::ffi::OsStr::new("pkg 1;$(x).A")));
            assert!(install_script(here, cmds[0]).contains("exec sha256sum"));
        }
    }

    #[test]
    fn a_script_cut_short_by_the_end_of_input_never_runs() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ran");
        let script = format!("touch {}", shell_quote(flag.to_str().unwrap()));
        let mut job = crate::script::frame_job(5, &script);
        job.truncate(job.len() - 2); // without its end line
        let sh_runner = format!(
            "exec sh -c {} dispatch-driver n0nce",
            shell_quote(crate::script::SH_DRIVER)
        );
        for runner in [crate::script::driver_command("n0nce"), sh_runner] {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(&runner)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&job).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            assert!(out.stdout.is_empty(), "{out:?}");
            assert!(!flag.exists(), "{runner}");
        }
    }

    #[test]
    fn publish_script_quotes_everything() {
        let c = Config::parse(std::path::Path::new("t"), "[x]\nhost=h\n").unwrap();
        let s = publish_script(
            &c.routes[0],
            "/d i r",
            ".dispatch-1.part",
            "a'b;$(x)",
            5,
            None,
            Some("LOCK-TAKEN; "),
        );
        assert!(s.starts_with("cd -- '/d i r' || exit 231; "), "{s}");
        assert!(
            s.contains("mv -f -- .dispatch-1.part 'a'\\''b;$(x)'"),
            "{s}"
        );
        assert!(s.contains("; LOCK-TAKEN; mv -f"), "{s}");
    }
}
