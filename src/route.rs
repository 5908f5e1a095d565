//! File name → the route that matches (first match, [`Config::route_for`]),
//! and the placeholders that fill its templates: the dated remote directory
//! and the shell-quoted install command ([`crate::template`] expands them).

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Local};

use crate::config::{Config, Route};
// moved to `template`; re-exported so the public API of `route` is unchanged
pub use crate::template::{expand, shell_quote, BUILTIN_PLACEHOLDERS};

/// A file matched to its route, for one batch (one timestamp).
#[derive(Debug, Clone)]
pub struct Routed<'c> {
    pub route: &'c Route,
    pub name: String,
    pub groups: BTreeMap<String, String>,
}

/// The base name of a path, as text (lossy for non-UTF-8 names: for
/// messages only; [`route`] refuses such names).
pub fn base_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Why a file cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unroutable {
    /// No section's regex matches the name.
    NoRoute,
    /// The name cannot be sent as it is (not UTF-8): refused rather than
    /// mapped lossily, which could turn two names into one on the host.
    BadName(String),
}

impl std::fmt::Display for Unroutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unroutable::NoRoute => f.write_str("no route matches"),
            Unroutable::BadName(why) => f.write_str(why),
        }
    }
}

/// The first route (in file order) whose regex matches the base name.
pub fn route<'c>(config: &'c Config, path: &Path) -> Result<Routed<'c>, Unroutable> {
    let Some(raw) = path.file_name() else {
        return Err(Unroutable::BadName("has no file name".into()));
    };
    let Some(name) = raw.to_str() else {
        return Err(Unroutable::BadName(format!(
            "file name {} is not valid UTF-8; it cannot be sent unchanged, so it is refused (rename the file)",
            raw.as_encoded_bytes().escape_ascii()
        )));
    };
    let route = config.route_for(name).ok_or(Unroutable::NoRoute)?;
    Ok(Routed {
        route,
        groups: captures(route, name),
        name: name.to_string(),
    })
}

impl Config {
    /// The first route (in file order) whose regex matches the base name.
    pub fn route_for(&self, base_name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.regex.is_match(base_name))
    }
}

/// Named regex captures of a match, for placeholders.
pub fn captures(route: &Route, base_name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(c) = route.regex.captures(base_name) {
        for name in route.regex.capture_names().flatten() {
            if let Some(m) = c.name(name) {
                out.insert(name.to_string(), m.as_str().to_string());
            }
        }
    }
    out
}

/// `dir` as [`dest_dir`] returns it, shown to a person: a path relative to
/// the login's home is written `~/…` (the host resolves it when it is used).
pub fn home_relative(dir: &str) -> String {
    match dir {
        d if d.starts_with('/') => d.to_string(),
        "." | "" => "~".to_string(),
        d => format!("~/{d}"),
    }
}

/// `dir` (as [`dest_dir`] returns it: relative to the login's home unless
/// absolute) made absolute with the host's `home`.
pub fn absolute_dir(dir: &str, home: &str) -> String {
    if dir.starts_with('/') {
        return dir.to_string();
    }
    let home = home.trim_end_matches('/');
    match dir {
        "." | "" => {
            if home.is_empty() {
                "/".into()
            } else {
                home.to_string()
            }
        }
        d => format!("{home}/{d}"),
    }
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
    fn match_is_anchored_at_start_only_and_first_wins() {
        let c = cfg("[ibps]\nhost=a\n[ibps-1]\nhost=b\n[.*\\.zip$]\nhost=c\n");
        assert_eq!(c.route_for("ibps-1.2.tar.gz").unwrap().hosts, ["a"]);
        assert_eq!(c.route_for("x.zip").unwrap().hosts, ["c"]);
        assert!(c.route_for("x-ibps.tar").is_none());
        let c = cfg("[[ibps]]\nhost=a\n");
        assert!(c.route_for("ibps-1.2.tar.gz").is_some());
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
}
