//! VCS hooks end to end: real `svnadmin` repositories committed to with the
//! real `svn` client over file://, real bare git repositories pushed to with
//! `git push`, the shipped wrapper scripts from `hooks/` installed as the
//! repositories' hooks, and real sshd targets.
//!
//! Without `spool_dir` the hook re-runs itself detached, so the tests poll
//! the target (or the journal) until the result shows; where counting
//! deliveries matters, `DISPATCH_ARGS=--now` in the hook's `dispatch.env`
//! makes the hook dispatch in the foreground.
//!
//! Every scenario that delivers runs twice ([`crate::scenario!`]): with an
//! absolute `dest_dir` on a host sharing the test user, and with the default
//! `dest_dir` on a host with a user of its own, at least 3 packages per
//! commit or push.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::scenario;
use crate::servers::{self, Placement, SshServer, Workspace};

const POLL: Duration = Duration::from_secs(60);

fn hook_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hooks")
        .join(name)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Run a VCS command; panic with its output unless it succeeds.
#[track_caller]
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A workspace with one target host and a route for `app-…` packages.
struct Setup {
    p: Placement,
    ws: Workspace,
    host: SshServer,
    remote: PathBuf,
}

impl Setup {
    fn new(p: Placement) -> Setup {
        let ws = Workspace::new();
        let host = p.start(&servers::fresh_addr());
        ws.known_hosts(&[&host]);
        let remote = ws.remote_dir("remote");
        Setup {
            p,
            ws,
            host,
            remote,
        }
    }

    /// The config: `[app-]` to the host; `extra_settings` go into [dispatch].
    fn config(&self, extra_settings: &str, extra_routes: &str) -> PathBuf {
        let text = format!(
            "[dispatch]\nstate_dir = {ws}/state\n{extra_settings}\n{app}{extra_routes}\n",
            ws = self.ws.path().display(),
            app = self.route("app-"),
        );
        self.ws.write_config(&text)
    }

    /// A route `[section]` to the host; every install appends to the
    /// host's [`installs_log`](Self::installs_log).
    fn route(&self, section: &str) -> String {
        format!(
            "[{section}]\nhost = {addr}\nport = {port}\nlogin = {user}\nidentity_file = {key}\n\
             known_hosts = {ws}/.ssh/known_hosts\n{dest_dir}\
             connect_timeout = 5s\nretries = 0\ntransfer = scp\n\
             install_command = sha256sum {{name}} > {{name}}.installed && sha256sum {{name}} >> {log}\n",
            ws = self.ws.path().display(),
            addr = self.host.addr,
            port = self.host.port,
            user = self.host.user().name,
            key = servers::keys().ed25519.display(),
            dest_dir = self
                .p
                .dest_dir_line(format!("{}/{{host}}", self.remote.display())),
            log = self.installs_log().display(),
        )
    }

    /// `<remote>/installs.log`, or `<host user's home>/installs.log` (where
    /// that user may write) under the default dest_dir.
    fn installs_log(&self) -> PathBuf {
        match self.p {
            Placement::Explicit => self.remote.join("installs.log"),
            Placement::Defaults => self.host.user().home.join("installs.log"),
        }
    }

    /// Every delivered copy of `name` on the host (one per dated dir under
    /// the default dest_dir).
    fn copies(&self, name: &str) -> Vec<PathBuf> {
        let root = self.p.root(&self.host, self.remote.join(&self.host.addr));
        servers::delivered_copies(&root, name)
    }

    /// Wait until `name` was installed on the host with exactly `content`.
    #[track_caller]
    fn wait_installed(&self, name: &str, content: &[u8]) {
        let want = sha256_hex(content);
        let marker = format!("{name}.installed");
        let installed =
            servers::poll_until(POLL, &format!("{name} installed on the target"), || {
                self.copies(&marker)
                    .into_iter()
                    .find(|m| fs::read_to_string(m).is_ok_and(|text| text.starts_with(&want)))
            });
        assert_eq!(
            fs::read(installed.with_file_name(name)).expect("read delivered file"),
            content,
            "{name}: delivered bytes"
        );
    }

    /// How many times each package was installed, by `sha256sum` lines.
    fn installs(&self) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let text = fs::read_to_string(self.installs_log()).unwrap_or_default();
        for line in text.lines() {
            if let Some((sum, name)) = line.split_once("  ") {
                m.entry(name.to_string()).or_default().push(sum.to_string());
            }
        }
        m
    }

    /// `dispatch history --json [--failed]` rows.
    fn history(&self, failed: bool) -> Vec<serde_json::Value> {
        let mut cmd = self.ws.dispatch().args(["history", "--json"]);
        if failed {
            cmd = cmd.arg("--failed");
        }
        let r = cmd.run().assert_success();
        r.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("history line {l:?}: {e}")))
            .collect()
    }
}

/// Write `dispatch.env` beside an installed hook.
fn hook_env(hooks_dir: &Path, config: &Path, extra: &str) {
    let text = format!(
        "DISPATCH_BIN={}\nDISPATCH_CONFIG={}\nDISPATCH_HOOK_LOG={}\n{extra}\n",
        env!("CARGO_BIN_EXE_dispatch"),
        config.display(),
        hooks_dir.join("dispatch-hook.log").display()
    );
    fs::write(hooks_dir.join("dispatch.env"), text).expect("write dispatch.env");
}

fn install_hook(script: &str, dest: &Path) {
    fs::copy(hook_script(script), dest).expect("copy hook");
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).expect("chmod hook");
}

// ------------------------------------------------------------------- svn

/// An svn repository with the post-commit hook, and a checkout of it.
struct Svn {
    repos: PathBuf,
    wc: PathBuf,
}

impl Svn {
    fn new(ws: &Workspace, config: &Path, env_extra: &str) -> Svn {
        let repos = ws.path().join("svnrepo");
        let wc = ws.path().join("svnwc");
        run_ok(Command::new("svnadmin").arg("create").arg(&repos));
        install_hook("svn-post-commit", &repos.join("hooks/post-commit"));
        hook_env(&repos.join("hooks"), config, env_extra);
        let url = format!("file://{}", repos.display());
        run_ok(svn().args(["checkout", "-q", &url]).arg(&wc));
        Svn { repos, wc }
    }

    fn write(&self, rel: &str, content: &[u8]) {
        let p = self.wc.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir in wc");
        fs::write(&p, content).expect("write in wc");
    }

    /// `svn add` everything new, commit; returns the time the commit took.
    fn commit(&self, msg: &str) -> Duration {
        run_ok(
            svn()
                .current_dir(&self.wc)
                .args(["add", "-q", "--force", "."]),
        );
        let started = Instant::now();
        let out =
            run_ok(
                svn()
                    .current_dir(&self.wc)
                    .args(["commit", "-m", msg, "--username", "alice"]),
            );
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains("post-commit hook failed"),
            "svn commit: {text}"
        );
        took
    }

    fn youngest(&self) -> String {
        let out = run_ok(Command::new("svnlook").arg("youngest").arg(&self.repos));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn svn() -> Command {
    let mut c = Command::new("svn");
    c.env("LC_ALL", "C.UTF-8")
        .args(["--non-interactive", "--no-auth-cache"]);
    c
}

// ------------------------------------------------------------------- git

/// A bare repository with the post-receive hook, and a clone of it.
struct Git {
    bare: PathBuf,
    wc: PathBuf,
    home: PathBuf,
}

impl Git {
    fn new(ws: &Workspace, config: &Path, env_extra: &str) -> Git {
        let bare = ws.path().join("origin.git");
        let wc = ws.path().join("gitwc");
        let home = ws.path().join("githome");
        fs::create_dir_all(&home).expect("mkdir git home");
        let g = Git { bare, wc, home };
        run_ok(
            g.git(ws.path())
                .args(["init", "-q", "--bare", "-b", "main"])
                .arg(&g.bare),
        );
        run_ok(
            g.git(&g.bare)
                .args(["config", "receive.advertisePushOptions", "true"]),
        );
        install_hook("git-post-receive", &g.bare.join("hooks/post-receive"));
        hook_env(&g.bare.join("hooks"), config, env_extra);
        run_ok(
            g.git(ws.path())
                .args(["init", "-q", "-b", "main"])
                .arg(&g.wc),
        );
        run_ok(g.git(&g.wc).args(["remote", "add", "origin"]).arg(&g.bare));
        g
    }

    fn git(&self, dir: &Path) -> Command {
        let mut c = Command::new("git");
        c.current_dir(dir)
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "Bob Builder")
            .env("GIT_AUTHOR_EMAIL", "bob@example.com")
            .env("GIT_COMMITTER_NAME", "Bob Builder")
            .env("GIT_COMMITTER_EMAIL", "bob@example.com")
            .env_remove("GIT_DIR")
            .env_remove("DISPATCH_SKIP");
        c
    }

    fn write(&self, rel: &str, content: &[u8]) {
        let p = self.wc.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir in wc");
        fs::write(&p, content).expect("write in wc");
    }

    fn commit(&self, msg: &str) -> String {
        run_ok(self.git(&self.wc).args(["add", "-A"]));
        run_ok(self.git(&self.wc).args(["commit", "-q", "-m", msg]));
        self.head()
    }

    fn head(&self) -> String {
        let out = run_ok(self.git(&self.wc).args(["rev-parse", "HEAD"]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `git push` with these arguments; returns how long it took and its stderr.
    fn push(&self, args: &[&str]) -> (Duration, String) {
        let started = Instant::now();
        let out = run_ok(self.git(&self.wc).arg("push").args(args));
        (
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The spool's run directories, each with its files (metadata included).
fn spool_dirs(spool: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut v: Vec<(PathBuf, Vec<String>)> = fs::read_dir(spool)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| {
                    let mut names: Vec<String> = fs::read_dir(e.path())
                        .expect("read run dir")
                        .flatten()
                        .map(|f| f.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    (e.path(), names)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn meta(dir: &Path) -> serde_json::Value {
    let text =
        fs::read_to_string(dir.join(".dispatch-meta.json")).expect("read .dispatch-meta.json");
    serde_json::from_str(&text).expect("parse .dispatch-meta.json")
}

// ------------------------------------------------------------------- tests

scenario! {
    fn svn_commit_installs_its_packages_with_the_committed_bytes_and_skips_unrouted_files(p: Placement) {
        let s = Setup::new(p);
        let config = s.config("", "");
        let svn = Svn::new(&s.ws, &config, "");
        svn.write("drop/app-1.0.tgz", b"app one\n");
        svn.write("drop/app-2.0.tgz", b"app two\n");
        svn.write("drop/app-3.0.tgz", b"app three\n");
        svn.write("drop/README.txt", b"not a package\n");
        svn.commit("three packages and a readme");

        s.wait_installed("app-1.0.tgz", b"app one\n");
        s.wait_installed("app-2.0.tgz", b"app two\n");
        s.wait_installed("app-3.0.tgz", b"app three\n");
        assert!(
            s.copies("README.txt").is_empty(),
            "an unrouted file was sent"
        );

        let rows = s.history(false);
        let hook_rows: Vec<_> = rows
            .iter()
            .filter(|r| r["source"] == "hook:svn" && r["rev"] == "1")
            .collect();
        assert_eq!(hook_rows.len(), 3, "journal rows: {rows:#?}");

        // the working copy changes, uncommitted; the revision is what is sent
        svn.write("drop/app-1.0.tgz", b"edited but not committed\n");
        for marker in s.copies("app-1.0.tgz.installed") {
            fs::remove_file(marker).expect("rm marker");
        }
        s.ws.dispatch()
            .args(["hook", "svn", "--now"])
            .arg(&svn.repos)
            .arg("1")
            .run()
            .assert_success();
        s.wait_installed("app-1.0.tgz", b"app one\n");
    }
}

scenario! {
    fn git_push_of_a_new_branch_sends_each_added_or_modified_package_once_with_its_final_content(p: Placement) {
        let s = Setup::new(p);
        let config = s.config("", "");
        // --now: the push returns once dispatching is done, so counts are final
        let git = Git::new(&s.ws, &config, "DISPATCH_ARGS=--now");
        // three packages a push: `old` (deleted on the branch), two kept
        let kept = ["app-kept-1.tgz", "app-kept-2.tgz"];
        git.write("drop/app-old.tgz", b"old package\n");
        for k in kept {
            git.write(&format!("drop/{k}"), format!("{k}\n").as_bytes());
        }
        git.write("notes.txt", b"unrouted\n");
        git.commit("first");
        git.push(&["-q", "origin", "main"]);
        s.wait_installed("app-old.tgz", b"old package\n");
        for k in kept {
            s.wait_installed(k, format!("{k}\n").as_bytes());
        }

        let new = ["app-new.tgz", "app-new-2.tgz", "app-new-3.tgz"];
        let content = |n: &str, state: &str| format!("{n}: new package, {state}\n");
        run_ok(git.git(&git.wc).args(["checkout", "-q", "-b", "feature"]));
        for n in new {
            git.write(&format!("drop/{n}"), content(n, "first cut").as_bytes());
        }
        git.commit("add app-new");
        for n in new {
            git.write(&format!("drop/{n}"), content(n, "final").as_bytes());
        }
        fs::remove_file(git.wc.join("drop/app-old.tgz")).expect("rm app-old");
        let tip = git.commit("update app-new, delete app-old");
        git.push(&["-q", "origin", "feature"]);

        for n in new {
            s.wait_installed(n, content(n, "final").as_bytes());
        }
        let installs = s.installs();
        for n in new {
            assert_eq!(
                installs.get(n),
                Some(&vec![sha256_hex(content(n, "final").as_bytes())]),
                "{n}: installed once, final content: {installs:#?}"
            );
        }
        for n in kept.iter().chain(&["app-old.tgz"]) {
            assert_eq!(
                installs.get(*n).map(Vec::len),
                Some(1),
                "{n}: only its first push: {installs:#?}"
            );
        }
        assert_eq!(installs.len(), 6, "{installs:#?}");
        let rows = s.history(false);
        assert!(
            rows.iter().any(|r| r["file"] == "app-new.tgz"
                && r["source"] == "hook:git"
                && r["rev"] == tip.as_str()),
            "journal names the pushed revision: {rows:#?}"
        );

        // an update of the branch, and deleting a branch, send only what changed
        for n in new {
            git.write(&format!("drop/{n}"), content(n, "fixed").as_bytes());
        }
        git.commit("fix app-new");
        git.push(&["-q", "origin", "feature"]);
        git.push(&["-q", "origin", ":feature"]);
        for n in new {
            s.wait_installed(n, content(n, "fixed").as_bytes());
        }
        let installs = s.installs();
        for n in new {
            assert_eq!(installs[n].len(), 2, "{installs:#?}");
        }
        assert_eq!(installs["app-old.tgz"].len(), 1, "{installs:#?}");
        for k in kept {
            assert_eq!(installs[k].len(), 1, "{installs:#?}");
        }
    }
}

scenario! {
    fn paths_with_spaces_and_non_ascii_reach_the_target_from_svn_and_git(p: Placement) {
        let s = Setup::new(p);
        let config = s.config("", "");
        let svn = Svn::new(&s.ws, &config, "DISPATCH_ARGS=--now");
        svn.write("my drop/app- build 7.tgz", b"svn spaced\n");
        svn.write("dépôt/app-größe-ü.tgz", b"svn non-ascii\n");
        svn.write("drop/app-'single' $HOME.tgz", b"svn quotes and dollar\n");
        svn.commit("odd names");
        s.wait_installed("app- build 7.tgz", b"svn spaced\n");
        s.wait_installed("app-größe-ü.tgz", b"svn non-ascii\n");
        s.wait_installed("app-'single' $HOME.tgz", b"svn quotes and dollar\n");

        let git = Git::new(&s.ws, &config, "DISPATCH_ARGS=--now");
        git.write("two words/app-git release.tgz", b"git spaced\n");
        git.write("ördner/app-ñandú \"q\".tgz", b"git non-ascii and quotes\n");
        git.write("tab\tdir/app-tab\there.tgz", b"git tab\n");
        git.commit("odd names");
        git.push(&["-q", "origin", "main"]);
        s.wait_installed("app-git release.tgz", b"git spaced\n");
        s.wait_installed("app-ñandú \"q\".tgz", b"git non-ascii and quotes\n");
        s.wait_installed("app-tab\there.tgz", b"git tab\n");
    }
}

scenario! {
    fn a_down_target_holds_up_neither_commit_nor_push_and_its_failure_is_in_history(p: Placement) {
        let s = Setup::new(p);
        // `app-` goes to a closed port; `hang-` to a host that never answers
        let closed = servers::free_port(&s.host.addr);
        let (_silent, silent_port) = servers::silent_server(&s.host.addr);
        let hang_route = format!(
            "[hang-]\nhost = {addr}\nport = {silent_port}\nlogin = {user}\nidentity_file = {key}\n\
             known_hosts = {ws}/.ssh/known_hosts\n{dest_dir}transfer = scp\nretries = 0\n\
             connect_timeout = 6s\nio_timeout = 6s\n",
            addr = s.host.addr,
            user = s.host.user().name,
            key = servers::keys().ed25519.display(),
            ws = s.ws.path().display(),
            dest_dir = p.dest_dir_line("/tmp"),
        );
        // `ok-` goes to the host that works: the others still get through
        let config = s.config("", &format!("{hang_route}{}", s.route("ok-")));
        // the first `port =` is `[app-]`'s
        let text = fs::read_to_string(&config).expect("read config").replacen(
            &format!("port = {}\n", s.host.port),
            &format!("port = {closed}\n"),
            1,
        );
        fs::write(&config, text).expect("write config");

        let svn = Svn::new(&s.ws, &config, "");
        svn.write("drop/app-down.tgz", b"nobody home\n");
        svn.write("drop/hang-slow.tgz", b"never answered\n");
        for k in 1..=3 {
            svn.write(&format!("drop/ok-svn-{k}.tgz"), format!("svn ok {k}\n").as_bytes());
        }
        let took = svn.commit("to a down host");
        assert!(took < Duration::from_secs(4), "svn commit took {took:?}");

        let git = Git::new(&s.ws, &config, "");
        git.write("drop/app-git-down.tgz", b"nobody home either\n");
        for k in 1..=3 {
            git.write(&format!("drop/ok-git-{k}.tgz"), format!("git ok {k}\n").as_bytes());
        }
        git.commit("to a down host");
        let (took, _) = git.push(&["-q", "origin", "main"]);
        assert!(took < Duration::from_secs(4), "git push took {took:?}");
        for (vcs, k) in ["svn", "git"].iter().flat_map(|v| (1..=3).map(move |k| (v, k))) {
            s.wait_installed(
                &format!("ok-{vcs}-{k}.tgz"),
                format!("{vcs} ok {k}\n").as_bytes(),
            );
        }

        let rev = svn.youngest();
        servers::poll_until(
            POLL,
            "the three failures in `dispatch history --failed`",
            || {
                let rows = s.history(true);
                let has = |file: &str, source: &str| {
                    rows.iter()
                        .any(|r| r["file"] == file && r["source"] == source && r["state"] == "failed")
                };
                (has("app-down.tgz", "hook:svn")
                    && has("hang-slow.tgz", "hook:svn")
                    && has("app-git-down.tgz", "hook:git"))
                .then_some(())
            },
        );
        let rows = s.history(true);
        assert!(
            rows.iter()
                .any(|r| r["file"] == "app-down.tgz" && r["rev"] == rev.as_str()),
            "{rows:#?}"
        );
    }
}

#[test]
fn with_a_spool_dir_each_hook_run_leaves_its_packages_and_metadata_in_a_directory_of_its_own() {
    let s = Setup::new(Placement::Explicit);
    let spool = s.ws.path().join("spool");
    let config = s.config(&format!("spool_dir = {}", spool.display()), "");
    let svn = Svn::new(&s.ws, &config, "");
    svn.write("drop/app-1.0.tgz", b"first\n");
    svn.write("drop/other.txt", b"unrouted\n");
    let took = svn.commit("one");
    assert!(took < Duration::from_secs(4), "svn commit took {took:?}");
    svn.write("drop/app-1.0.tgz", b"second\n");
    svn.commit("same name again");

    let dirs = spool_dirs(&spool);
    assert_eq!(dirs.len(), 2, "one directory per commit: {dirs:#?}");
    for ((dir, names), (rev, content)) in dirs.iter().zip([("1", "first\n"), ("2", "second\n")]) {
        assert_eq!(
            names,
            &[".dispatch-meta.json", "app-1.0.tgz"],
            "{}",
            dir.display()
        );
        let m = meta(dir);
        assert_eq!(m["vcs"], "svn");
        assert_eq!(m["rev"], rev);
        assert_eq!(m["author"], "alice");
        assert_eq!(
            m["repo"],
            fs::canonicalize(&svn.repos)
                .expect("canonical")
                .display()
                .to_string()
        );
        assert_eq!(
            fs::read(dir.join("app-1.0.tgz")).expect("read spooled"),
            content.as_bytes()
        );
    }
    // nothing was sent: the daemon's job
    assert!(s.copies("app-1.0.tgz").is_empty());

    // git: a push leaves the same kind of directory; two files with one base name
    // in one push do not overwrite each other
    for d in &dirs {
        fs::remove_dir_all(&d.0).expect("clear spool");
    }
    let git = Git::new(&s.ws, &config, "");
    git.write("a/app-same.tgz", b"from a\n");
    git.write("b/app-same.tgz", b"from b\n");
    let tip = git.commit("two of a name");
    git.push(&["-q", "origin", "main"]);
    let dirs = spool_dirs(&spool);
    assert_eq!(dirs.len(), 2, "{dirs:#?}");
    let mut contents = Vec::new();
    for (dir, names) in &dirs {
        assert_eq!(names, &[".dispatch-meta.json", "app-same.tgz"]);
        let m = meta(dir);
        assert_eq!(m["vcs"], "git");
        assert_eq!(m["rev"], tip.as_str());
        assert_eq!(m["author"], "Bob Builder");
        contents.push(fs::read_to_string(dir.join("app-same.tgz")).expect("read spooled"));
    }
    contents.sort();
    assert_eq!(contents, ["from a\n", "from b\n"]);
}

#[test]
fn git_post_commit_spools_the_committed_content_not_the_working_tree_and_can_be_skipped() {
    let s = Setup::new(Placement::Explicit);
    let spool = s.ws.path().join("spool");
    let config = s.config(&format!("spool_dir = {}", spool.display()), "");
    let git = Git::new(&s.ws, &config, "");
    let hooks = git.wc.join(".git/hooks");
    install_hook("git-post-commit", &hooks.join("post-commit"));
    hook_env(&hooks, &config, "");

    // staged: "committed"; in the working tree: "dirty"
    git.write("app-pc.tgz", b"committed\n");
    run_ok(git.git(&git.wc).args(["add", "app-pc.tgz"]));
    git.write("app-pc.tgz", b"dirty, not committed\n");
    run_ok(git.git(&git.wc).args(["commit", "-q", "-m", "post-commit"]));
    let tip = git.head();
    let dirs = spool_dirs(&spool);
    assert_eq!(dirs.len(), 1, "{dirs:#?}");
    assert_eq!(meta(&dirs[0].0)["rev"], tip.as_str());
    assert_eq!(
        fs::read(dirs[0].0.join("app-pc.tgz")).expect("read spooled"),
        b"committed\n"
    );

    // DISPATCH_SKIP=1 for one commit: nothing spooled
    run_ok(
        git.git(&git.wc)
            .env("DISPATCH_SKIP", "1")
            .args(["commit", "-q", "-a", "-m", "skipped"]),
    );
    assert_eq!(spool_dirs(&spool).len(), 1);
}

#[test]
fn hook_refuses_a_bad_revision_but_the_wrapper_still_lets_the_commit_through() {
    let s = Setup::new(Placement::Explicit);
    let config = s.config("", "");
    let svn = Svn::new(&s.ws, &config, "");
    let r =
        s.ws.dispatch()
            .args(["hook", "svn"])
            .arg(&svn.repos)
            .arg("abc")
            .run()
            .assert_code(2);
    assert!(r.stderr.contains("not an svn revision"), "{r}");
    let r =
        s.ws.dispatch()
            .args(["hook", "svn", "--now"])
            .arg(&svn.repos)
            .arg("99")
            .run()
            .assert_code(1);
    assert!(r.stderr.contains("No such revision"), "{r}");

    // a broken dispatch binary: the commit succeeds, the log says why
    hook_env(
        &svn.repos.join("hooks"),
        &config,
        "DISPATCH_BIN=/nonexistent/dispatch",
    );
    svn.write("drop/app-x.tgz", b"x\n");
    svn.commit("with a broken hook");
    let log = fs::read_to_string(svn.repos.join("hooks/dispatch-hook.log")).expect("hook log");
    assert!(log.contains("/nonexistent/dispatch: not found"), "{log}");
}

scenario! {
    fn a_running_daemon_installs_what_the_svn_and_git_hooks_spool_and_journals_their_revisions(p: Placement) {
        let s = Setup::new(p);
        let spool = s.ws.path().join("spool");
        let config = s.config(
            &format!("spool_dir = {}\nsettle = 200ms", spool.display()),
            "",
        );
        let mut daemon = s.ws.dispatch().args(["watch", "-v"]).spawn();

        let svn = Svn::new(&s.ws, &config, "");
        let content = |vcs: &str, k: u32| format!("via the spool, from {vcs}, {k}\n");
        for k in 1..=3 {
            svn.write(&format!("drop/app-daemon-svn-{k}.tgz"), content("svn", k).as_bytes());
        }
        svn.commit("for the daemon");
        let git = Git::new(&s.ws, &config, "");
        for k in 1..=3 {
            git.write(&format!("drop/app-daemon-git-{k}.tgz"), content("git", k).as_bytes());
        }
        let tip = git.commit("for the daemon");
        git.push(&["-q", "origin", "main"]);

        for vcs in ["svn", "git"] {
            for k in 1..=3 {
                s.wait_installed(&format!("app-daemon-{vcs}-{k}.tgz"), content(vcs, k).as_bytes());
            }
        }
        servers::poll_until(POLL, "the journal names both revisions", || {
            let rows = s.history(false);
            let has = |file: &str, source: &str, rev: &str| {
                rows.iter().any(|r| {
                    r["file"] == file
                        && r["source"] == source
                        && r["rev"] == rev
                        && r["state"] == "installed"
                })
            };
            (1..=3)
                .all(|k| {
                    has(&format!("app-daemon-svn-{k}.tgz"), "hook:svn", "1")
                        && has(&format!("app-daemon-git-{k}.tgz"), "hook:git", tip.as_str())
                })
            .then_some(())
        });
        // the daemon removes each run's directory once its packages are done
        servers::poll_until(POLL, "the spool emptied by the daemon", || {
            spool_dirs(&spool).is_empty().then_some(())
        });
        assert!(daemon.is_running(), "daemon died:\n{}", daemon.stderr());
        daemon.signal(libc::SIGTERM);
        let r = daemon.wait(Duration::from_secs(30));
        assert_eq!(r.status, Some(0), "{r}");
    }
}
