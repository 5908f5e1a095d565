//! Releases per route × host and operators' actions (schema v4): what a
//! rollout made active, previous or failed on each host, and who broke a
//! lock or allowed a downgrade. The hosts' own marks stay the truth a
//! rollback reads (any dispatcher may have rolled out); this is the record.

use rusqlite::params;

use super::{now, Journal, JournalError};

/// v3 → v4.
pub(super) const SCHEMA_V4: &str = "
CREATE TABLE release (
    id       INTEGER PRIMARY KEY,
    route    TEXT    NOT NULL,
    host     TEXT    NOT NULL,
    dir      TEXT    NOT NULL,
    version  TEXT,
    sha256   TEXT,
    state    TEXT    NOT NULL,   -- active | previous | failed
    time     TEXT    NOT NULL,
    time_ms  INTEGER NOT NULL
);
CREATE INDEX release_by_route ON release (route, host, id);
CREATE TABLE admin_event (
    id      INTEGER PRIMARY KEY,
    time    TEXT NOT NULL,
    action  TEXT NOT NULL,       -- lock-break | downgrade | rollback
    host    TEXT,
    detail  TEXT
);
";

/// One release state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRecord {
    pub route: String,
    pub host: String,
    pub dir: String,
    pub version: Option<String>,
    pub sha256: Option<String>,
    pub state: String,
}

impl Journal {
    pub fn add_release(&self, r: &ReleaseRecord) -> Result<(), JournalError> {
        let (t, ms) = now();
        self.conn()
            .execute(
                "INSERT INTO release (route, host, dir, version, sha256, state, time, time_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![r.route, r.host, r.dir, r.version, r.sha256, r.state, t, ms],
            )
            .map(|_| ())
            .map_err(self.err("record a release"))
    }

    /// The newest state of each release dir of `route` on `host`, newest first.
    pub fn releases(&self, route: &str, host: &str) -> Result<Vec<ReleaseRecord>, JournalError> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT route, host, dir, version, sha256, state FROM release
                 WHERE id IN (SELECT MAX(id) FROM release WHERE route = ?1 AND host = ?2 GROUP BY dir)
                 ORDER BY id DESC",
            )
            .map_err(self.err("read releases"))?;
        let rows = st
            .query_map(params![route, host], |r| {
                Ok(ReleaseRecord {
                    route: r.get(0)?,
                    host: r.get(1)?,
                    dir: r.get(2)?,
                    version: r.get(3)?,
                    sha256: r.get(4)?,
                    state: r.get(5)?,
                })
            })
            .map_err(self.err("read releases"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("read releases"))
    }

    /// An operator's action (a lock broken, a downgrade allowed).
    pub fn admin_event(
        &self,
        action: &str,
        host: Option<&str>,
        detail: &str,
    ) -> Result<(), JournalError> {
        let (t, _) = now();
        self.conn()
            .execute(
                "INSERT INTO admin_event (time, action, host, detail) VALUES (?1, ?2, ?3, ?4)",
                params![t, action, host, detail],
            )
            .map(|_| ())
            .map_err(self.err("record an action"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_state_of_each_release_is_kept_per_route_and_host() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let rec = |d: &str, state: &str| ReleaseRecord {
            route: "app-".into(),
            host: "h".into(),
            dir: d.into(),
            version: Some("1".into()),
            sha256: None,
            state: state.into(),
        };
        j.add_release(&rec("/r/1", "active")).unwrap();
        j.add_release(&rec("/r/2", "active")).unwrap();
        j.add_release(&rec("/r/1", "previous")).unwrap();
        let got = j.releases("app-", "h").unwrap();
        assert_eq!(got, vec![rec("/r/1", "previous"), rec("/r/2", "active")]);
        assert!(j.releases("app-", "other").unwrap().is_empty());
        j.admin_event("lock-break", Some("h"), "was token=1")
            .unwrap();
    }
}
