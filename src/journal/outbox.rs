//! The notification outbox (schema v3): a notification is written here
//! before anything tries to send it, so a crash or a receiver that is down
//! loses none; the notifier ([`crate::notify`]) takes the due ones, and every
//! attempt is a row of `notification_attempt`.

use rusqlite::{params, OptionalExtension};

use super::{now, Journal, JournalError};

/// v2 → v3.
pub(super) const SCHEMA_V3: &str = "
CREATE TABLE notification (
    id          INTEGER PRIMARY KEY,
    created     TEXT    NOT NULL,
    target      TEXT    NOT NULL,   -- command | url
    event       TEXT    NOT NULL,   -- parked, installed, unrouted, reload_failed, …
    payload     TEXT    NOT NULL,   -- the JSON sent
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_ms     INTEGER NOT NULL,   -- due from (Unix ms)
    state       TEXT    NOT NULL DEFAULT 'pending',  -- pending | sent | abandoned
    last_error  TEXT,
    done        TEXT
);
CREATE INDEX notification_due ON notification (state, next_ms);
CREATE TABLE notification_attempt (
    id           INTEGER PRIMARY KEY,
    notification INTEGER NOT NULL REFERENCES notification (id),
    time         TEXT    NOT NULL,
    ok           INTEGER NOT NULL,
    error        TEXT
);
";

/// Where a notification goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyTarget {
    /// `notify_command`: the JSON on its stdin.
    Command,
    /// `notify_url`: POSTed.
    Url,
}

impl NotifyTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyTarget::Command => "command",
            NotifyTarget::Url => "url",
        }
    }

    fn parse(s: &str) -> NotifyTarget {
        if s == "command" {
            NotifyTarget::Command
        } else {
            NotifyTarget::Url
        }
    }
}

/// A notification waiting to be sent.
#[derive(Debug, Clone)]
pub struct Notification {
    pub id: i64,
    pub target: NotifyTarget,
    pub event: String,
    pub payload: String,
    pub attempts: u32,
}

/// Counts for the status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: u64,
    pub sent: u64,
    pub abandoned: u64,
}

impl Journal {
    /// Put a notification in the outbox, due now; its id.
    pub fn add_notification(
        &self,
        target: NotifyTarget,
        event: &str,
        payload: &str,
    ) -> Result<i64, JournalError> {
        let (t, ms) = now();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO notification (created, target, event, payload, next_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![t, target.as_str(), event, payload, ms],
        )
        .map_err(self.err("add a notification"))?;
        Ok(conn.last_insert_rowid())
    }

    /// Up to `limit` pending notifications due by now, oldest first.
    pub fn due_notifications(&self, limit: usize) -> Result<Vec<Notification>, JournalError> {
        let (_, ms) = now();
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT id, target, event, payload, attempts FROM notification
                 WHERE state = 'pending' AND next_ms <= ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(self.err("read the outbox"))?;
        let rows = st
            .query_map(params![ms, limit as i64], |r| {
                Ok(Notification {
                    id: r.get(0)?,
                    target: NotifyTarget::parse(&r.get::<_, String>(1)?),
                    event: r.get(2)?,
                    payload: r.get(3)?,
                    attempts: r.get::<_, i64>(4)?.max(0) as u32,
                })
            })
            .map_err(self.err("read the outbox"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("read the outbox"))
    }

    /// When the next pending notification is due (Unix ms), if any.
    pub fn next_notification_due(&self) -> Result<Option<i64>, JournalError> {
        self.conn()
            .query_row(
                "SELECT MIN(next_ms) FROM notification WHERE state = 'pending'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err("read the outbox"))
    }

    /// Record an attempt: sent (`error` None), or failed and due again in
    /// `retry_in_ms` (None: given up).
    pub fn notification_attempt(
        &self,
        id: i64,
        error: Option<&str>,
        retry_in_ms: Option<i64>,
    ) -> Result<(), JournalError> {
        let (t, ms) = now();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(self.err("record a notification attempt"))?;
        tx.execute(
            "INSERT INTO notification_attempt (notification, time, ok, error) VALUES (?1, ?2, ?3, ?4)",
            params![id, t, error.is_none(), error],
        )
        .map_err(self.err("record a notification attempt"))?;
        let (state, next, done) = match (error, retry_in_ms) {
            (None, _) => ("sent", ms, Some(t.clone())),
            (Some(_), Some(d)) => ("pending", ms + d, None),
            (Some(_), None) => ("abandoned", ms, Some(t.clone())),
        };
        tx.execute(
            "UPDATE notification SET attempts = attempts + 1, state = ?2, next_ms = ?3,
                    last_error = COALESCE(?4, last_error), done = ?5 WHERE id = ?1",
            params![id, state, next, error, done],
        )
        .map_err(self.err("record a notification attempt"))?;
        tx.commit()
            .map_err(self.err("record a notification attempt"))
    }

    /// How many notifications are pending, sent, abandoned.
    pub fn outbox_counts(&self) -> Result<OutboxCounts, JournalError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT state, count(*) FROM notification GROUP BY state")
            .map_err(self.err("read the outbox"))?;
        let mut c = OutboxCounts::default();
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err("read the outbox"))?;
        for row in rows {
            let (state, n) = row.map_err(self.err("read the outbox"))?;
            let n = n.max(0) as u64;
            match state.as_str() {
                "pending" => c.pending = n,
                "sent" => c.sent = n,
                _ => c.abandoned += n,
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_is_due_until_sent_and_every_attempt_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = j
            .add_notification(NotifyTarget::Url, "parked", "{\"x\":1}")
            .unwrap();
        let due = j.due_notifications(10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].id, due[0].target), (id, NotifyTarget::Url));
        j.notification_attempt(id, Some("connection refused"), Some(60_000))
            .unwrap();
        assert!(j.due_notifications(10).unwrap().is_empty(), "not due yet");
        assert!(j.next_notification_due().unwrap().is_some());
        j.notification_attempt(id, None, None).unwrap();
        assert_eq!(
            j.outbox_counts().unwrap(),
            OutboxCounts {
                pending: 0,
                sent: 1,
                abandoned: 0
            }
        );
        let attempts: i64 = j
            .conn()
            .query_row(
                "SELECT count(*) FROM notification_attempt WHERE notification = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(attempts, 2);
        assert_eq!(j.next_notification_due().unwrap(), None);
    }
}
