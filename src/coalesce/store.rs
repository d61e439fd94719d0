//! The coalescer's durable queue: every accepted event is in a redb file, fsynced,
//! before its client hears `202`, and leaves the file only once Klaviyo accepted the
//! job that carried it (or it went to the spool's dead letters).
//!
//! One writer thread owns every write transaction and commits whatever has arrived
//! meanwhile in one transaction: many events share one fsync (group commit), which is
//! what lets a single account accept thousands of events a second on one disk.
//!
//! After an I/O error (a full disk) the file is reopened on a later write
//! ([`crate::durable`]); until a write succeeds again [`Store::write_error`] says why,
//! and `/health` shows the coalescer degraded.

// redb's own error type is large; it only passes between the transaction closures here.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};

use crate::durable::{DbError, Durable, Opener};
use tokio::sync::oneshot;

/// Accepted events by id (arrival order).
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// `Idempotency-Key` (with the credential's hash) → (event id, accepted at ms).
const IDEMPOTENCY: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("idempotency");
/// `next_id`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How long an `Idempotency-Key` is remembered: Klaviyo's own retry horizon for
/// webhooks, and longer than any SDK retries a request.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Most operations one commit carries.
const GROUP_COMMIT_MAX: usize = 1024;

/// Where a batch goes: the credential and revision it is sent with.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Group {
    /// The `Authorization` value (sensitive: never printed).
    pub authorization: Vec<u8>,
    /// The `revision` header.
    pub revision: String,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("authorization", &"<redacted>").field("revision", &self.revision).finish()
    }
}

/// One accepted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The id (set by the store; also the client's `x-klaviyo-proxy-spool-id`).
    pub id: u64,
    /// Where it goes.
    pub group: Group,
    /// Its `unique_id`.
    pub unique_id: String,
    /// Profile and metric, for keeping equal ids out of one job.
    pub identity: String,
    /// The bulk job entry.
    pub entry: String,
    /// When it was accepted, ms since the Unix epoch.
    pub accepted_at_ms: u64,
}

impl Record {
    /// Bytes on disk: a version byte, then length-prefixed fields.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            32 + self.group.authorization.len()
                + self.group.revision.len()
                + self.unique_id.len()
                + self.identity.len()
                + self.entry.len(),
        );
        out.push(1u8);
        out.extend_from_slice(&self.accepted_at_ms.to_le_bytes());
        for field in [
            self.group.authorization.as_slice(),
            self.group.revision.as_bytes(),
            self.unique_id.as_bytes(),
            self.identity.as_bytes(),
            self.entry.as_bytes(),
        ] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    fn decode(id: u64, bytes: &[u8]) -> Option<Record> {
        let (&version, mut rest) = bytes.split_first()?;
        if version != 1 {
            return None;
        }
        let accepted_at_ms = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        rest = &rest[8..];
        let mut fields: [&[u8]; 5] = [&[]; 5];
        for f in &mut fields {
            let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            *f = rest.get(4..4 + len)?;
            rest = &rest[4 + len..];
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
        Some(Record {
            id,
            group: Group { authorization: fields[0].to_vec(), revision: text(fields[1])? },
            unique_id: text(fields[2])?,
            identity: text(fields[3])?,
            entry: text(fields[4])?,
            accepted_at_ms,
        })
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or written.
    #[error("coalesce store {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The writer thread is gone (the proxy is stopping).
    #[error("coalesce store is closed")]
    Closed,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this id.
    New(u64),
    /// The `Idempotency-Key` was seen already, for this id: nothing stored.
    Repeat(u64),
}

enum Op {
    Append { record: Record, idempotency: Option<Vec<u8>>, reply: oneshot::Sender<Result<Appended, StoreError>> },
    Remove { ids: Vec<u64>, reply: oneshot::Sender<Result<(), StoreError>> },
}

/// The durable queue. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    ops: mpsc::Sender<Op>,
    path: PathBuf,
    db: Arc<Durable>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "coalesce::Store({})", self.path.display())
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens (or creates, mode 0600) the file and returns the store with the events
    /// still undelivered, oldest first.
    pub fn open(path: &Path) -> Result<(Store, Vec<Record>), StoreError> {
        Store::open_with(path, crate::durable::file_opener(), crate::durable::REOPEN_EVERY)
    }

    /// Why writes fail now (a full disk), if they do; never a key.
    pub fn write_error(&self) -> Option<String> {
        self.db.write_error()
    }

    fn open_with(path: &Path, opener: Opener, reopen_every: Duration) -> Result<(Store, Vec<Record>), StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Io { path: path.into(), message: e.to_string() };
        let db = Arc::new(Durable::open("coalesce store", path, opener, reopen_every).map_err(|e| err(&e))?);
        let cutoff = now_ms().saturating_sub(IDEMPOTENCY_TTL.as_millis() as u64);
        let pending = db
            .write(&tables, |tx| {
                tx.open_table(IDEMPOTENCY)?.retain(|_, (_, at)| at >= cutoff)?;
                let mut pending = Vec::new();
                for row in tx.open_table(EVENTS)?.iter()? {
                    let (k, v) = row?;
                    match Record::decode(k.value(), v.value()) {
                        Some(r) => pending.push(r),
                        None => tracing::error!(id = k.value(), "undecodable coalesced event left in the store"),
                    }
                }
                Ok(pending)
            })
            .map_err(|e| err(&db_message(e)))?;
        let (ops, rx) = mpsc::channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("coalesce-store".into())
            .spawn(move || writer(&writer_db, rx))
            .map_err(|e| err(&e))?;
        Ok((Store { ops, path: path.into(), db }, pending))
    }

    /// Stores an event durably; with an idempotency key seen before, stores nothing and
    /// names the earlier event.
    pub async fn append(&self, record: Record, idempotency: Option<Vec<u8>>) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.ops.send(Op::Append { record, idempotency, reply }).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Forgets delivered (or dead-lettered) events.
    pub async fn remove(&self, ids: Vec<u64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.ops.send(Op::Remove { ids, reply }).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// The writer: takes every operation waiting, applies them in one transaction, commits
/// (one fsync), then answers them all.
fn writer(db: &Durable, ops: mpsc::Receiver<Op>) {
    let err = |e: &dyn std::fmt::Display| StoreError::Io { path: db.path().into(), message: e.to_string() };
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        match db.write(&tables, |tx| commit(tx, &mut batch)) {
            Ok(outcomes) => {
                for (op, outcome) in batch.into_iter().zip(outcomes) {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Ok(outcome));
                        }
                        Op::Remove { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                let message = db_message(e);
                tracing::error!(error = %message, "coalesce store write failed");
                for op in batch {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(err(&message)));
                        }
                        Op::Remove { reply, .. } => {
                            let _ = reply.send(Err(err(&message)));
                        }
                    }
                }
            }
        }
    }
}

fn db_message(e: DbError) -> String {
    match e {
        DbError::Unavailable(m) | DbError::Other(m) => m,
    }
}

/// Creates the tables of a (re)opened file.
fn tables(db: &Database) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    tx.open_table(EVENTS)?;
    tx.open_table(META)?;
    tx.open_table(IDEMPOTENCY)?;
    tx.commit()?;
    Ok(())
}

/// One transaction for the whole batch. A failure fails every operation in it (none is
/// acknowledged as stored).
fn commit(tx: &redb::WriteTransaction, batch: &mut [Op]) -> Result<Vec<Appended>, redb::Error> {
    let mut out = Vec::with_capacity(batch.len());
    {
        let mut events = tx.open_table(EVENTS)?;
        let mut meta = tx.open_table(META)?;
        let mut idem = tx.open_table(IDEMPOTENCY)?;
        let mut next = meta.get("next_id")?.map_or(1, |v| v.value());
        let now = now_ms();
        for op in batch.iter_mut() {
            match op {
                Op::Append { record, idempotency, .. } => {
                    if let Some(key) = idempotency.as_deref() {
                        if let Some(seen) = idem.get(key)? {
                            let (id, at) = seen.value();
                            if now.saturating_sub(at) < IDEMPOTENCY_TTL.as_millis() as u64 {
                                out.push(Appended::Repeat(id));
                                continue;
                            }
                        }
                    }
                    record.id = next;
                    next += 1;
                    events.insert(record.id, record.encode().as_slice())?;
                    if let Some(key) = idempotency.as_deref() {
                        idem.insert(key, (record.id, now))?;
                    }
                    out.push(Appended::New(record.id));
                }
                Op::Remove { ids, .. } => {
                    for id in ids.iter() {
                        events.remove(*id)?;
                    }
                    out.push(Appended::New(0));
                }
            }
        }
        meta.insert("next_id", next)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> Record {
        Record {
            id: 0,
            group: Group { authorization: b"Klaviyo-API-Key pk_x".to_vec(), revision: "2026-07-15".into() },
            unique_id: uid.into(),
            identity: "a@example.com\u{1f}Viewed".into(),
            entry: r#"{"type":"event-bulk-create"}"#.into(),
            accepted_at_ms: 42,
        }
    }

    /// Opens the file again; the writer thread of the store before may still hold it
    /// briefly.
    fn reopen(path: &Path) -> (Store, Vec<Record>) {
        for _ in 0..500 {
            match Store::open(path) {
                Ok(r) => return r,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        panic!("{} does not reopen", path.display());
    }

    #[test]
    fn records_round_trip() {
        let mut r = record("u1");
        r.id = 7;
        assert_eq!(Record::decode(7, &r.encode()), Some(r));
        assert_eq!(Record::decode(1, &[2, 0, 0]), None);
        assert_eq!(Record::decode(1, &[1, 0]), None);
    }

    #[tokio::test]
    async fn an_io_error_is_recovered_by_reopening() {
        let dir = std::env::temp_dir().join(format!("kp-coalesce-io-{}", fastrand::u64(..)));
        let path = dir.join("events.redb");
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener = crate::durable::testing::flaky_opener(fail.clone());
        let (store, _) = Store::open_with(&path, opener, Duration::ZERO).unwrap();
        assert_eq!(store.append(record("a"), None).await.unwrap(), Appended::New(1));
        assert_eq!(store.write_error(), None);
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        for uid in ["b", "c"] {
            let refused = store.append(record(uid), Some(uid.as_bytes().to_vec())).await;
            assert!(matches!(refused, Err(StoreError::Io { .. })), "{refused:?}");
        }
        let error = store.write_error().expect("writes fail");
        assert!(error.contains("no space"), "{error}");
        // Space again: the next write reopens the file; nothing refused was stored,
        // and a refused idempotency key is free.
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(store.append(record("b"), Some(b"b".to_vec())).await.unwrap(), Appended::New(2));
        assert_eq!(store.write_error(), None);
        store.remove(vec![1]).await.unwrap();
        drop(store);
        let (_store, pending) = reopen(&path);
        assert_eq!(pending.iter().map(|r| (r.id, r.unique_id.as_str())).collect::<Vec<_>>(), [(2, "b")]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn debug_hides_the_credential() {
        assert!(!format!("{:?}", record("u")).contains("pk_x"));
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_idempotency_keys_repeat() {
        let dir = std::env::temp_dir().join(format!("kp-coalesce-{}", fastrand::u64(..)));
        let path = dir.join("events.redb");
        {
            let (store, pending) = Store::open(&path).unwrap();
            assert!(pending.is_empty());
            let a = store.append(record("a"), Some(b"k1".to_vec())).await.unwrap();
            let b = store.append(record("b"), None).await.unwrap();
            let again = store.append(record("a2"), Some(b"k1".to_vec())).await.unwrap();
            let (Appended::New(a), Appended::New(b)) = (a, b) else { panic!("both new") };
            assert_eq!(again, Appended::Repeat(a));
            assert!(b > a);
            store.remove(vec![a]).await.unwrap();
        }
        let (_store, pending) = reopen(&path);
        assert_eq!(pending.iter().map(|r| r.unique_id.as_str()).collect::<Vec<_>>(), ["b"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
