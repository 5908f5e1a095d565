//! The plan: routed packages × hosts become, per connection (host, port,
//! login, transports…), the ordered deliveries and, for each, its steps as
//! data. The plan does no I/O; [`crate::job`] executes it. A rollout's waves
//! are data too ([`crate::config::Strategy::waves`]); its gates and hooks are
//! [`crate::rollout`]'s, run around the executor's lanes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, Route};
use crate::local::LocalFile;
use crate::route::{self, Routed, Unroutable};
use crate::transport::{ErrorKind, Op, TransferError};

/// A file to send, already routed.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: PathBuf,
    pub name: String,
    /// Index of the route in `config.routes`.
    pub route: usize,
    pub groups: BTreeMap<String, String>,
    /// Journal package id, if recorded.
    pub package: Option<i64>,
    /// Send to these hosts of the route only (a retry); `None` = all.
    pub only_hosts: Option<Vec<String>>,
    /// The package, opened once (see [`crate::local`]): every host's upload
    /// reads this descriptor.
    pub file: Option<Arc<LocalFile>>,
    /// Hosts where a verified upload of this package is already in place
    /// (host → absolute remote dir): only the install runs there.
    pub resume: BTreeMap<String, String>,
    /// Temporary files earlier, interrupted attempts left (host → path):
    /// removed before the next upload.
    pub stale_temps: BTreeMap<String, String>,
}

impl Item {
    /// Route `path` (the file is not opened yet: the caller opens it into `file`).
    pub fn new(config: &Config, path: PathBuf) -> Result<Item, Unroutable> {
        let r = route::route(config, &path)?;
        let idx = config
            .routes
            .iter()
            .position(|x| std::ptr::eq(x, r.route))
            .ok_or(Unroutable::NoRoute)?;
        Ok(Item {
            name: r.name,
            groups: r.groups,
            route: idx,
            path,
            package: None,
            only_hosts: None,
            file: None,
            resume: BTreeMap::new(),
            stale_temps: BTreeMap::new(),
        })
    }

    pub fn routed<'c>(&self, config: &'c Config) -> Routed<'c> {
        Routed {
            route: &config.routes[self.route],
            name: self.name.clone(),
            groups: self.groups.clone(),
        }
    }

    pub fn local(&self) -> Result<Arc<LocalFile>, TransferError> {
        self.file.clone().ok_or_else(|| {
            TransferError::new(
                ErrorKind::Local,
                Op::ReadLocal,
                format!("{}: the file was not opened", self.path.display()),
            )
        })
    }
}

/// One step of a file × host delivery, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `mkdir -p` the absolute dest dir (`~` resolved on the host).
    PrepareDir,
    /// Stream the file to a fresh temporary name (by the first transport
    /// that can be used).
    Upload,
    /// Check the temporary file holds this upload's bytes (size or sha256).
    Verify,
    /// Take the per-name install lock (see [`crate::lock`]).
    Lock,
    /// Rename the temporary file to the final name.
    Publish,
    /// A crashed run's verified upload: check it is still there, whole.
    CheckInPlace,
    /// Run the install command.
    Install,
    /// Remove the install lock.
    Unlock,
}

impl Step {
    /// Steps that put the file in place: retried together (and, where the
    /// host allows, fused into fewer round trips) by the executor.
    pub fn places(self) -> bool {
        matches!(
            self,
            Step::PrepareDir | Step::Upload | Step::Verify | Step::Lock | Step::Publish
        )
    }
}

/// One file to one host.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub item: Item,
    pub steps: Vec<Step>,
}

impl Delivery {
    pub fn has(&self, step: Step) -> bool {
        self.steps.contains(&step)
    }
}

/// Everything going over one connection.
#[derive(Debug, Clone)]
pub struct Connection {
    pub host: String,
    /// Index in `config.routes` of the route whose connection settings
    /// (port, login, key, transports…) are used.
    pub route: usize,
    pub deliveries: Vec<Delivery>,
    /// Sessions to open at most (`max_sessions_per_host`, at most one per
    /// delivery).
    pub lanes: usize,
}

/// The whole batch.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub connections: Vec<Connection>,
}

/// The steps of `item` on `host`.
pub fn steps(route: &Route, resumed: bool) -> Vec<Step> {
    let installs = route.install_command.is_some();
    let mut s = if resumed {
        vec![Step::CheckInPlace]
    } else {
        vec![Step::PrepareDir, Step::Upload, Step::Verify]
    };
    if installs {
        s.push(Step::Lock);
    }
    if !resumed {
        s.push(Step::Publish);
    }
    if installs {
        s.extend([Step::Install, Step::Unlock]);
    }
    s
}

/// Group `items` × their routes' hosts by connection, in input order.
pub fn plan(config: &Config, items: &[Item]) -> Plan {
    let mut p = Plan::default();
    for item in items {
        let route = &config.routes[item.route];
        for host in &route.hosts {
            if item.only_hosts.as_ref().is_some_and(|o| !o.contains(host)) {
                continue;
            }
            let pos = p
                .connections
                .iter()
                .position(|c| &c.host == host && same_connection(&config.routes[c.route], route));
            let pos = pos.unwrap_or_else(|| {
                p.connections.push(Connection {
                    host: host.clone(),
                    route: item.route,
                    deliveries: Vec::new(),
                    lanes: 0,
                });
                p.connections.len() - 1
            });
            let resumed = item.resume.contains_key(host);
            p.connections[pos].deliveries.push(Delivery {
                item: item.clone(),
                steps: steps(route, resumed),
            });
        }
    }
    let per_host = config.settings.max_sessions_per_host;
    for c in &mut p.connections {
        c.lanes = per_host.min(c.deliveries.len());
    }
    p
}

/// Two routes whose files can share a session to a host.
fn same_connection(a: &Route, b: &Route) -> bool {
    a.port == b.port
        && a.ftp_port == b.ftp_port
        && a.login == b.login
        && a.password == b.password
        && a.identity_file == b.identity_file
        && a.transfer == b.transfer
        && a.host_key_check == b.host_key_check
        && a.known_hosts == b.known_hosts
        && a.ftps == b.ftps
        && a.ftp_cleartext == b.ftp_cleartext
        && a.ftp_ca_file == b.ftp_ca_file
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn cfg(t: &str) -> Config {
        Config::parse(Path::new("t.ini"), t).unwrap()
    }

    fn item(c: &Config, name: &str) -> Item {
        Item::new(c, PathBuf::from(name)).unwrap()
    }

    #[test]
    fn files_are_grouped_per_connection_in_input_order_with_their_steps() {
        let c = cfg("[dispatch]\nmax_sessions_per_host = 2\n\n[a-]\nhost = h1, h2\ninstall_command = true\n\n[b-]\nhost = h1\n\n[c-]\nhost = h1\nport = 2222\n");
        let items = [
            item(&c, "a-1"),
            item(&c, "b-1"),
            item(&c, "a-2"),
            item(&c, "c-1"),
        ];
        let p = plan(&c, &items);
        let names = |i: usize| -> Vec<String> {
            p.connections[i]
                .deliveries
                .iter()
                .map(|d| d.item.name.clone())
                .collect()
        };
        assert_eq!(p.connections.len(), 3, "{p:?}");
        assert_eq!(p.connections[0].host, "h1");
        assert_eq!(
            names(0),
            ["a-1", "b-1", "a-2"],
            "routes sharing a connection share it"
        );
        assert_eq!(p.connections[0].lanes, 2);
        assert_eq!(
            (p.connections[1].host.as_str(), names(1)),
            ("h2", vec!["a-1".into(), "a-2".into()])
        );
        assert_eq!(names(2), ["c-1"], "another port is another connection");
        assert_eq!(p.connections[2].lanes, 1);
        use Step::*;
        assert_eq!(
            p.connections[0].deliveries[0].steps,
            [PrepareDir, Upload, Verify, Lock, Publish, Install, Unlock]
        );
        assert_eq!(
            p.connections[0].deliveries[1].steps,
            [PrepareDir, Upload, Verify, Publish]
        );
    }

    #[test]
    fn a_resumed_delivery_only_checks_locks_and_installs() {
        let c = cfg("[a-]\nhost = h1, h2\ninstall_command = true\n");
        let mut it = item(&c, "a-1");
        it.resume.insert("h2".into(), "/x".into());
        it.only_hosts = Some(vec!["h2".into()]);
        let p = plan(&c, &[it]);
        assert_eq!(p.connections.len(), 1);
        use Step::*;
        assert_eq!(
            p.connections[0].deliveries[0].steps,
            [CheckInPlace, Lock, Install, Unlock]
        );
    }
}
