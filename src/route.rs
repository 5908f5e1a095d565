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
