//! File name → the route that matches, and the placeholders that fill its
//! templates: the dated remote directory and the shell-quoted install command.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Local};

use crate::config::{captures, Config, Route};

/// Placeholders every route has (named regex groups come on top).
pub const BUILTIN_PLACEHOLDERS: &[&str] = &["name", "file", "dir", "host", "section"];

/// A file matched to its route, for one batch (one timestamp).
#[derive(Debug, Clone)]
pub struct Routed<'c> {
    pub route: &'c Route,
    pub name: String,
    pub groups: BTreeMap<String, String>,
}

/// The base name of a path, as text (lossy for non-UTF-8 names).
pub fn base_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The first route (in file order) whose regex matches the base name.
pub fn route<'c>(config: &'c Config, path: &Path) -> Option<Routed<'c>> {
    let name = base_name(path);
    let route = config.route_for(&name)?;
    Some(Routed {
        route,
        groups: captures(route, &name),
        name,
    })
}

/// Quote a string for a POSIX shell: `'…'`, with `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
        && !s.starts_with('-')
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Is `cmd` one external command with plain arguments and redirections, so
/// running it cannot change the shell that runs it? (`tar xzf 'a b.tgz' -C
/// /opt`, `sha256sum x > x.installed`: yes. Lists, pipes, expansions,
/// assignments, builtins and keywords: no.) The script runner runs such
/// commands without a subshell of their own, which saves a fork per file.
pub fn is_simple_command(cmd: &str) -> bool {
    // dash's builtins and keywords, and bash's (where `sh` is bash)
    const SHELL_WORDS: &[&str] = &[
        "!",
        ".",
        ":",
        "[",
        "[[",
        "alias",
        "bg",
        "bind",
        "break",
        "builtin",
        "caller",
        "case",
        "cd",
        "chdir",
        "command",
        "compgen",
        "complete",
        "compopt",
        "continue",
        "coproc",
        "declare",
        "dirs",
        "disown",
        "do",
        "done",
        "echo",
        "elif",
        "else",
        "enable",
        "esac",
        "eval",
        "exec",
        "exit",
        "export",
        "false",
        "fc",
        "fg",
        "fi",
        "for",
        "function",
        "getopts",
        "hash",
        "help",
        "history",
        "if",
        "in",
        "jobs",
        "kill",
        "let",
        "local",
        "logout",
        "mapfile",
        "popd",
        "printf",
        "pushd",
        "pwd",
        "read",
        "readarray",
        "readonly",
        "return",
        "select",
        "set",
        "shift",
        "shopt",
        "source",
        "suspend",
        "test",
        "then",
        "time",
        "times",
        "trap",
        "true",
        "type",
        "typeset",
        "ulimit",
        "umask",
        "unalias",
        "unset",
        "until",
        "wait",
        "while",
    ];
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./,:+@%=^~-".contains(c);
    let b: Vec<char> = cmd.chars().collect();
    let mut i = 0;
    let mut words = 0;
    // one word at b[i..]: unquoted safe characters, '…', and "…" without
    // `$`, `` ` `` or `\`; returns its end and its unquoted text, if valid
    let word = |mut i: usize| -> Option<(usize, String, bool)> {
        let (start, mut quoted) = (i, false);
        while i < b.len() {
            match b[i] {
                '\'' => {
                    let end = b[i + 1..].iter().position(|&c| c == '\'')?;
                    i += end + 2;
                    quoted = true;
                }
                '"' => {
                    let end = b[i + 1..].iter().position(|&c| c == '"')?;
                    if b[i + 1..i + 1 + end].iter().any(|c| "$`\\".contains(*c)) {
                        return None;
                    }
                    i += end + 2;
                    quoted = true;
                }
                c if plain(c) => i += 1,
                ' ' | '\t' | '<' | '>' => break,
                _ => return None,
            }
        }
        (i > start).then(|| (i, b[start..i].iter().collect(), quoted))
    };
    while i < b.len() {
        match b[i] {
            ' ' | '\t' => i += 1,
            '<' | '>' => {
                // `>`, `>>`, `<`, `>&N`, each followed by its target
                if b.get(i + 1) == Some(&'&') {
                    if !b.get(i + 2).is_some_and(|c| c.is_ascii_digit()) {
                        return false;
                    }
                    i += 3;
                    continue;
                }
                i += if b[i] == '>' && b.get(i + 1) == Some(&'>') {
                    2
                } else {
                    1
                };
                while b.get(i).is_some_and(|c| *c == ' ' || *c == '\t') {
                    i += 1;
                }
                match word(i) {
                    Some((end, _, _)) => i = end,
                    None => return false,
                }
            }
            c if c.is_ascii_digit() && matches!(b.get(i + 1), Some('<' | '>')) => i += 1,
            _ => {
                let Some((end, text, quoted)) = word(i) else {
                    return false;
                };
                if words == 0
                    && (quoted
                        || text.contains('=')
                        || text.starts_with('-')
                        || SHELL_WORDS.contains(&text.as_str()))
                {
                    return false;
                }
                words += 1;
                i = end;
            }
        }
    }
    words > 0
}

/// Replace `{placeholders}`; each value goes through `quote`. `{{`/`}}` are literal braces.
pub fn expand(
    template: &str,
    vars: &BTreeMap<String, String>,
    quote: impl Fn(&str) -> String,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        let after = &rest[i + 1..];
        if after.as_bytes().first() == Some(&c) {
            out.push(c as char);
            rest = &after[1..];
            continue;
        }
        if c == b'{' {
            if let Some(end) = after.find('}') {
                if let Some(v) = vars.get(&after[..end]) {
                    out.push_str(&quote(v));
                    rest = &after[end + 1..];
                    continue;
                }
            }
        }
        out.push(c as char);
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Why a remote path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafePath(pub String);

/// Check a value that will become part of a remote path: no `/`, no `..`, no
/// control characters.
fn safe_component(what: &str, v: &str) -> Result<(), UnsafePath> {
    if v.contains('/')
        || v == ".."
        || v == "."
        || v.chars().any(|c| c == '\0' || c == '\n' || c == '\r')
    {
        return Err(UnsafePath(format!(
            "{what} {v:?} cannot be used in a remote path (contains '/', '..', newline or NUL)"
        )));
    }
    Ok(())
}

/// The remote directory for a file on a host: strftime codes at `when`, then
/// placeholders. Returned without a leading `~/` (paths are relative to the
/// login's home unless absolute).
pub fn dest_dir(
    routed: &Routed<'_>,
    host: &str,
    when: &DateTime<Local>,
) -> Result<String, UnsafePath> {
    let mut vars = routed.groups.clone();
    for (k, v) in &vars {
        safe_component(&format!("placeholder {{{k}}} ="), v)?;
    }
    // the file name itself never becomes part of the directory; it is quoted
    // wherever it is used, so only what cannot be a file name is refused
    if routed.name.is_empty()
        || routed.name == "."
        || routed.name == ".."
        || routed.name.contains(['/', '\0'])
    {
        return Err(UnsafePath(format!("{:?} is not a file name", routed.name)));
    }
    vars.insert("name".into(), routed.name.clone());
    vars.insert("host".into(), host.to_string());
    vars.insert("section".into(), routed.route.section.clone());
    // strftime first, on the template only, so a '%' in a file name stays a '%'
    let dated = when.format(&routed.route.dest_dir).to_string();
    let dir = expand(&dated, &vars, |v| v.to_string());
    if dir.split('/').any(|c| c == "..") || dir.chars().any(|c| c == '\0' || c == '\n') {
        return Err(UnsafePath(format!(
            "remote directory {dir:?} contains '..', newline or NUL"
        )));
    }
    let dir = if dir == "~" {
        ".".to_string()
    } else if let Some(r) = dir.strip_prefix("~/") {
        r.trim_start_matches('/').to_string()
    } else {
        dir
    };
    let dir = dir.trim_end_matches('/');
    Ok(if dir.is_empty() {
        "/".to_string()
    } else {
        dir.to_string()
    })
}

/// The install command with every placeholder shell-quoted.
pub fn install_command(routed: &Routed<'_>, host: &str, dir: &str) -> Option<String> {
    let t = routed.route.install_command.as_ref()?;
    let mut vars = routed.groups.clone();
    vars.insert("name".into(), routed.name.clone());
    vars.insert("host".into(), host.to_string());
    vars.insert("section".into(), routed.route.section.clone());
    vars.insert("dir".into(), dir.to_string());
    vars.insert("file".into(), remote_join(dir, &routed.name));
    Some(expand(t, &vars, shell_quote))
}

/// `dir/name`, with `.` and `/` handled.
pub fn remote_join(dir: &str, name: &str) -> String {
    match dir {
        "." | "" => name.to_string(),
        "/" => format!("/{name}"),
        d => format!("{d}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_commands_are_told_apart_from_anything_that_could_change_the_shell() {
        for cmd in [
            "sha256sum pkg.tgz > pkg.tgz.installed",
            "tar xzf 'a b;$(rm -rf ~).tgz' -C /opt/app",
            "dpkg -i x.deb 2>&1",
            "/opt/bin/install --force \"x y\" >>log 2> err <in",
        ] {
            assert!(is_simple_command(cmd), "{cmd}");
        }
        for cmd in [
            "",
            "   ",
            "a; b",
            "a && b",
            "a | b",
            "a &",
            "(a)",
            "{ a; }",
            "exit 3",
            "exec foo",
            "cd /tmp",
            "set -e",
            "trap x EXIT",
            "read x",
            "umask 0",
            ". ./env",
            "source ./env",
            "declare -x A=1",
            "X=1 foo",
            "'foo' bar",
            "foo $HOME",
            "foo \"$HOME\"",
            "foo `id`",
            "foo \\x",
            "foo 'unclosed",
            "foo <<EOF",
            "foo >&",
            "foo >",
            "foo *.tgz",
            "if true",
            "foo\nbar",
            "foo # comment",
            "a'\\''b",
        ] {
            assert!(!is_simple_command(cmd), "{cmd:?}");
        }
        // every quoted name keeps a command simple, unless it holds a quote
        let vars = BTreeMap::from([("name".to_string(), "a b;$(x)`y`\"z\"".to_string())]);
        let cmd = expand("sha256sum {name} > {name}.installed", &vars, shell_quote);
        assert!(is_simple_command(&cmd), "{cmd}");
    }
    use crate::config::Config;
    use chrono::TimeZone;

    fn cfg(t: &str) -> Config {
        Config::parse(Path::new("t.ini"), t).unwrap()
    }

    #[test]
    fn quoting_survives_hostile_names() {
        assert_eq!(shell_quote("plain-1.2.tar.gz"), "plain-1.2.tar.gz");
        assert_eq!(
            shell_quote("a b;$(rm -rf ~)'.tar.gz"),
            "'a b;$(rm -rf ~)'\\''.tar.gz'"
        );
        assert_eq!(shell_quote("-rf"), "'-rf'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn named_groups_become_quoted_placeholders() {
        let c = cfg("[(?P<app>web|api)-(?P<version>[0-9.]+)\\.tar\\.gz$]\nhost=h\ndest_dir = /srv/{app}/%Y\ninstall_command = install {app} {version} {file}\n");
        let r = route(&c, Path::new("/x/web-1.2.tar.gz")).unwrap();
        let when = Local.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let dir = dest_dir(&r, "h", &when).unwrap();
        assert_eq!(dir, "/srv/web/2026");
        assert_eq!(
            install_command(&r, "h", &dir).unwrap(),
            "install web 1.2 /srv/web/2026/web-1.2.tar.gz"
        );
    }

    #[test]
    fn default_dest_dir_is_dated_under_home() {
        let c = cfg("[a]\nhost=h\ninstall_command = tar xf {name}\n");
        let r = route(&c, Path::new("a b;$(x)'.tgz")).unwrap();
        let when = Local.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(dest_dir(&r, "h", &when).unwrap(), "newcx/20260102_030405");
        assert_eq!(
            install_command(&r, "h", "d").unwrap(),
            "tar xf 'a b;$(x)'\\''.tgz'"
        );
    }

    #[test]
    fn unsafe_placeholder_values_are_refused() {
        let c = cfg("[(?P<v>.*)]\nhost=h\ndest_dir = /srv/{v}\n");
        let when = Local.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let r = Routed {
            route: &c.routes[0],
            name: "..".into(),
            groups: [("v".to_string(), "..".to_string())].into(),
        };
        assert!(dest_dir(&r, "h", &when).is_err());
        // a newline in a file name is fine (it is quoted), but not in a directory
        let r = route(&c, Path::new("ok\nname")).unwrap();
        assert_eq!(dest_dir(&r, "h", &when).unwrap(), "/srv/ok");
        let c = cfg("[(?s)(?P<v>.*)]\nhost=h\ndest_dir = /srv/{v}\n");
        let r = route(&c, Path::new("ok\nname")).unwrap();
        assert!(dest_dir(&r, "h", &when).is_err());
    }

    #[test]
    fn literal_braces_and_percent_in_names() {
        let vars: BTreeMap<String, String> = [("name".to_string(), "50%.zip".to_string())].into();
        assert_eq!(
            expand("{{x}} {name} {other}", &vars, shell_quote),
            "{x} 50%.zip {other}"
        );
    }
}
