//! Durable accept-and-forward. When Klaviyo is failing (breaker open) or a deferrable
//! write cannot go before its deadline, the request is written to a redb file — the
//! commit is fsynced before the client hears `202` with the spool id — and replayed in
//! order once Klaviyo is healthy. Writes that Klaviyo refuses for good (a 4xx other
//! than 429) move to a dead-letter table an operator can list, requeue and drop.
//!
//! The file holds the requests as they will go upstream, `Authorization` included (in
//! pass-through mode it is the only way to replay them): it is created mode 0600, and
//! the listing functions never return header values.

// redb's own error type is large; it only passes between the transaction closures here.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// Writes waiting for replay, by spool id (arrival order).
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// Writes Klaviyo refused for good.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// `next_id`: ids are never reused, so a client's spool id names one write forever.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Response header carrying the spool id of an accepted write.
pub const SPOOL_ID_HEADER: &str = "x-klaviyo-proxy-spool-id";

/// One spooled request, as it will go upstream. Its `Debug` shows no header value,
/// query or body: they hold keys and `company_id`s.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The spool id (set by [`Spool::append`]).
    pub id: u64,
    /// Operation id, for listing and logs.
    pub operation: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path_and_query: String,
    /// Headers to send (hop-by-hop already removed).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body (with the `unique_id` the proxy added).
    pub body: Vec<u8>,
    /// The event's `unique_id`, when it has one.
    pub unique_id: Option<String>,
    /// When it was accepted, in ms since the Unix epoch.
    pub accepted_at_ms: u64,
    /// Why it is in the dead-letter table.
    pub last_error: Option<String>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path_and_query.split('?').next().unwrap_or_default();
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("operation", &self.operation)
            .field("method", &self.method)
            .field("path", &path)
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("body_bytes", &self.body.len())
            .field("unique_id", &self.unique_id)
            .field("accepted_at_ms", &self.accepted_at_ms)
            .field("last_error", &self.last_error)
            .finish()
    }
}

/// What an operator sees of an entry: never a header value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySummary {
    /// The spool id.
    pub id: u64,
    /// Operation id.
    pub operation: String,
    /// HTTP method.
    pub method: String,
    /// The path (the query is left out: it may hold a `company_id`).
    pub path: String,
    /// The event's `unique_id`.
    pub unique_id: Option<String>,
    /// When it was accepted, ms since the Unix epoch.
    pub accepted_at_ms: u64,
    /// Why Klaviyo refused it.
    pub last_error: Option<String>,
}

impl From<&Entry> for EntrySummary {
    fn from(e: &Entry) -> Self {
        EntrySummary {
            id: e.id,
            operation: e.operation.clone(),
            method: e.method.clone(),
            path: e.path_and_query.split('?').next().unwrap_or_default().to_string(),
            unique_id: e.unique_id.clone(),
            accepted_at_ms: e.accepted_at_ms,
            last_error: e.last_error.clone(),
        }
    }
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file could not be opened or written.
    #[error("spool {path}: {message}")]
    Store {
        /// The spool file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// No entry with this id.
    #[error("no spooled entry {0}")]
    NotFound(u64),
}

/// The durable spool. Cheap to clone; every call blocks on disk, so async callers run
/// it on a blocking thread ([`Spool::append_async`]).
#[derive(Clone)]
pub struct Spool {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spool({})", self.path.display())
    }
}

impl Spool {
    /// Opens (or creates) the spool file.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        let err = |e: &dyn std::fmt::Display| SpoolError::Store { path: path.into(), message: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        // Created 0600 in the same call that creates it: no moment when another local
        // user could open it (it holds keys). An older file keeps its data, loses
        // wider permissions.
        let mut open = std::fs::OpenOptions::new();
        open.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            open.mode(0o600);
            let file = open.open(path).map_err(|e| err(&e))?;
            if file.metadata().map_err(|e| err(&e))?.permissions().mode() & 0o077 != 0 {
                file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| err(&e))?;
            }
        }
        #[cfg(not(unix))]
        open.open(path).map_err(|e| err(&e))?;
        let db = Database::create(path).map_err(|e| err(&e))?;
        let spool = Spool { db: Arc::new(db), path: path.into() };
        // Create the tables, so readers find them.
        spool.write(|tx| {
            tx.open_table(PENDING)?;
            tx.open_table(DEAD)?;
            tx.open_table(META)?;
            Ok(())
        })?;
        Ok(spool)
    }

    fn err(&self, e: impl std::fmt::Display) -> SpoolError {
        SpoolError::Store { path: self.path.clone(), message: e.to_string() }
    }

    /// Runs `f` in one write transaction and commits it durably (fsync).
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        f(&tx).map_err(|e| self.err(e))
    }

    /// Stores a write durably and returns its spool id. The disk has it when this returns.
    pub fn append(&self, mut entry: Entry) -> Result<u64, SpoolError> {
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let id = meta.get("next_id")?.map_or(1, |v| v.value());
            meta.insert("next_id", id + 1)?;
            entry.id = id;
            let bytes = serde_json::to_vec(&entry).expect("entries serialize");
            tx.open_table(PENDING)?.insert(id, bytes.as_slice())?;
            Ok(id)
        })
    }

    /// [`Spool::append`] on a blocking thread.
    pub async fn append_async(&self, entry: Entry) -> Result<u64, SpoolError> {
        let spool = self.clone();
        tokio::task::spawn_blocking(move || spool.append(entry))
            .await
            .unwrap_or_else(|e| Err(SpoolError::Store { path: self.path.clone(), message: e.to_string() }))
    }

    fn decode(&self, bytes: &[u8]) -> Result<Entry, SpoolError> {
        serde_json::from_slice(bytes).map_err(|e| self.err(e))
    }

    /// The oldest pending write.
    pub fn first_pending(&self) -> Result<Option<Entry>, SpoolError> {
        let raw = self.read(|tx| {
            let table = tx.open_table(PENDING)?;
            let first = table.first()?.map(|(_, v)| v.value().to_vec());
            Ok(first)
        })?;
        raw.map(|b| self.decode(&b)).transpose()
    }

    /// Number of pending writes.
    pub fn pending_len(&self) -> Result<u64, SpoolError> {
        self.read(|tx| Ok(tx.open_table(PENDING)?.len()?))
    }

    /// Number of dead letters.
    pub fn dead_len(&self) -> Result<u64, SpoolError> {
        self.read(|tx| Ok(tx.open_table(DEAD)?.len()?))
    }

    /// Removes a write that was delivered.
    pub fn delivered(&self, id: u64) -> Result<(), SpoolError> {
        self.write(|tx| {
            tx.open_table(PENDING)?.remove(id)?;
            Ok(())
        })
    }

    /// Moves a pending write Klaviyo refused for good to the dead-letter table.
    pub fn dead_letter(&self, id: u64, reason: &str) -> Result<(), SpoolError> {
        let found = self.write(|tx| {
            let Some(bytes) = tx.open_table(PENDING)?.remove(id)?.map(|v| v.value().to_vec()) else {
                return Ok(false);
            };
            let mut entry: Entry = serde_json::from_slice(&bytes).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            entry.last_error = Some(reason.to_string());
            let bytes = serde_json::to_vec(&entry).expect("entries serialize");
            tx.open_table(DEAD)?.insert(id, bytes.as_slice())?;
            Ok(true)
        })?;
        if found {
            Ok(())
        } else {
            Err(SpoolError::NotFound(id))
        }
    }

    /// The pending writes, oldest first (no header values).
    pub fn list_pending(&self, limit: usize) -> Result<Vec<EntrySummary>, SpoolError> {
        self.list(PENDING, limit)
    }

    /// The dead letters, oldest first (no header values).
    pub fn list_dead(&self, limit: usize) -> Result<Vec<EntrySummary>, SpoolError> {
        self.list(DEAD, limit)
    }

    fn list(&self, table: TableDefinition<u64, &[u8]>, limit: usize) -> Result<Vec<EntrySummary>, SpoolError> {
        let raw: Vec<Vec<u8>> = self.read(|tx| {
            let t = tx.open_table(table)?;
            let mut out = Vec::new();
            for row in t.iter()?.take(limit) {
                out.push(row?.1.value().to_vec());
            }
            Ok(out)
        })?;
        raw.iter().map(|b| self.decode(b).map(|e| EntrySummary::from(&e))).collect()
    }

    /// Puts a dead letter back in the queue, in its original place (by id).
    pub fn requeue(&self, id: u64) -> Result<(), SpoolError> {
        let found = self.write(|tx| {
            let Some(bytes) = tx.open_table(DEAD)?.remove(id)?.map(|v| v.value().to_vec()) else {
                return Ok(false);
            };
            tx.open_table(PENDING)?.insert(id, bytes.as_slice())?;
            Ok(true)
        })?;
        found.then_some(()).ok_or(SpoolError::NotFound(id))
    }

    /// Deletes a dead letter for good.
    pub fn drop_dead(&self, id: u64) -> Result<(), SpoolError> {
        let found = self.write(|tx| Ok(tx.open_table(DEAD)?.remove(id)?.is_some()))?;
        found.then_some(()).ok_or(SpoolError::NotFound(id))
    }
}

/// The dead-letter admin routes, for the admin listener to mount:
/// `GET /spool` (counts and pending), `GET /spool/dead`, `POST /spool/dead/{id}/requeue`,
/// `DELETE /spool/dead/{id}`. Returns the status and a JSON body, or `None` for a path
/// that is not the spool's.
pub fn admin(spool: &Spool, method: &http::Method, path: &str) -> Option<(http::StatusCode, serde_json::Value)> {
    use http::{Method, StatusCode};
    use serde_json::json;
    let rest = path.strip_prefix("/spool")?;
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (method, parts.as_slice()) {
        (&Method::GET, []) => spool.list_pending(100).and_then(|pending| {
            Ok(json!({"pending": spool.pending_len()?, "dead": spool.dead_len()?, "oldest_pending": pending}))
        }),
        (&Method::GET, ["dead"]) => spool.list_dead(1000).map(|dead| json!({"dead": dead})),
        (&Method::POST, ["dead", id, "requeue"]) => match id.parse() {
            Ok(id) => spool.requeue(id).map(|()| json!({"requeued": id})),
            Err(_) => return Some((StatusCode::BAD_REQUEST, json!({"error": "bad id"}))),
        },
        (&Method::DELETE, ["dead", id]) => match id.parse() {
            Ok(id) => spool.drop_dead(id).map(|()| json!({"dropped": id})),
            Err(_) => return Some((StatusCode::BAD_REQUEST, json!({"error": "bad id"}))),
        },
        _ => return Some((StatusCode::NOT_FOUND, json!({"error": "no such spool route"}))),
    };
    Some(match result {
        Ok(body) => (StatusCode::OK, body),
        Err(SpoolError::NotFound(id)) => (StatusCode::NOT_FOUND, json!({"error": format!("no entry {id}")})),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string()})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> Entry {
        Entry {
            id: 0,
            operation: "create_event".into(),
            method: "POST".into(),
            path_and_query: "/client/events?company_id=SECRETCO".into(),
            headers: vec![("authorization".into(), b"Klaviyo-API-Key pk_secret".to_vec())],
            body: vec![b'{', n, b'}'],
            unique_id: Some(format!("u{n}")),
            accepted_at_ms: 1,
            last_error: None,
        }
    }

    #[test]
    fn append_replay_order_dead_letters_and_reopen() {
        let dir = std::env::temp_dir().join(format!("kp-spool-{}", fastrand::u64(..)));
        let path = dir.join("spool.redb");
        let spool = Spool::open(&path).unwrap();
        let ids: Vec<u64> = (0..3).map(|n| spool.append(entry(n)).unwrap()).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(spool.first_pending().unwrap().unwrap().body, b"{\0}");
        spool.delivered(1).unwrap();
        spool.dead_letter(2, "400 invalid").unwrap();
        assert_eq!(spool.first_pending().unwrap().unwrap().id, 3);
        drop(spool);
        // Reopened (as after a crash): the same state, and ids are not reused.
        let spool = Spool::open(&path).unwrap();
        assert_eq!(spool.pending_len().unwrap(), 1);
        assert_eq!(spool.append(entry(9)).unwrap(), 4);
        let dead = spool.list_dead(10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].last_error.as_deref(), Some("400 invalid"));
        let shown = serde_json::to_string(&admin(&spool, &http::Method::GET, "/spool/dead").unwrap().1).unwrap();
        assert!(!shown.contains("pk_secret") && !shown.contains("SECRETCO"), "{shown}");
        // Requeued, it goes back in its original place: before 3 and 4.
        let (status, _) = admin(&spool, &http::Method::POST, "/spool/dead/2/requeue").unwrap();
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(spool.first_pending().unwrap().unwrap().id, 2);
        spool.dead_letter(2, "again").unwrap();
        assert_eq!(admin(&spool, &http::Method::DELETE, "/spool/dead/2").unwrap().0, http::StatusCode::OK);
        assert_eq!(admin(&spool, &http::Method::DELETE, "/spool/dead/2").unwrap().0, http::StatusCode::NOT_FOUND);
        assert!(admin(&spool, &http::Method::GET, "/health").is_none());
        assert_eq!(spool.list_dead(10).unwrap().len(), 0);
        drop(spool);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn file_is_private_and_debug_shows_no_secret() {
        let dir = std::env::temp_dir().join(format!("kp-spool-perm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("spool.redb");
        let spool = Spool::open(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        spool.append(entry(1)).unwrap();
        let printed = format!("{:?} {spool:?}", spool.first_pending().unwrap().unwrap());
        for secret in ["pk_secret", "SECRETCO", "Klaviyo-API-Key"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("authorization") && printed.contains("body_bytes: 3"), "{printed}");
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
