//! The gate's durable queue on redb: accepted webhooks waiting for delivery, dead
//! letters, and the ids already seen (for deduplication).
//!
//! Accepting is one write transaction, committed with fsync before the gate answers
//! `200`: the ids are checked and recorded and the webhook is queued together, so a
//! crash either keeps both or neither. Seen ids are kept `dedup_ttl` (≥ 24 h, Klaviyo's
//! retry horizon) and at most `dedup_max_ids`; every accept forgets a bounded number of
//! the oldest ones past either limit, so the table never grows without bound and no
//! accept does unbounded work.
//!
//! After an I/O error (a full disk) the file is reopened on a later call
//! ([`crate::durable`]); until a write succeeds again [`Store::write_error`] says why,
//! and `/health` shows the gate degraded.
//!
//! Like the spool (whose file this is not: its writers and its replay are Klaviyo's),
//! the store never returns header values or bodies in its listings.

// redb's own error type is large; it only passes between the transaction closures here.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::durable::{DbError, Durable, Opener};
use serde::{Deserialize, Serialize};

/// Webhooks waiting for delivery, by id (arrival order); the value is a [`Delivery`].
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// Webhooks the app refused for good, or that ran out of attempts.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// The body to deliver, by id (pending or dead).
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// Seen dedup keys and when they were first seen (ms since the epoch).
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
/// The same keys in the order they were seen, for forgetting the oldest first.
const SEEN_ORDER: TableDefinition<(u64, &str), ()> = TableDefinition::new("seen_order");
/// `next_id` and `instance` (a random number naming this store in delivery ids).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most old seen ids forgotten by one accept, so an accept's work stays bounded.
const PRUNE_PER_ACCEPT: usize = 512;

/// Most accepts gathered into one transaction.
const MAX_GROUP: usize = 256;

type Job = (Incoming, tokio::sync::oneshot::Sender<Result<(Accepted, Pruned), StoreError>>);

/// Sends accepts to the store's writer thread ([`Store::group_writer`]).
#[derive(Debug, Clone)]
pub struct GroupWriter {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl GroupWriter {
    /// Stores a webhook durably (see [`Store::accept`]), together with any others
    /// arriving at the same moment.
    pub async fn accept(&self, incoming: Incoming) -> Result<(Accepted, Pruned), StoreError> {
        let gone = || StoreError::Store {
            path: PathBuf::from("(webhook store)"),
            message: "the writer thread stopped".into(),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs.send((incoming, reply)).map_err(|_| gone())?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// Which route a webhook came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A signed system webhook.
    System,
    /// An unsigned flow webhook with the operator's token.
    Flow,
}

impl Kind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::System => "system",
            Kind::Flow => "flow",
        }
    }

    fn key_prefix(self) -> &'static str {
        match self {
            Kind::System => "s:",
            Kind::Flow => "f:",
        }
    }
}

/// One accepted webhook, as it will be delivered (the body is stored beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The store id (arrival order).
    pub id: u64,
    /// Which route it came in on.
    pub kind: Kind,
    /// The original request headers to pass on (hop-by-hop and the proxy's own removed).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The ids of the items delivered (for listing).
    pub ids: Vec<String>,
    /// Items left out because they had been seen before.
    pub duplicates_removed: usize,
    /// When it was accepted, ms since the Unix epoch.
    pub accepted_at_ms: u64,
    /// Delivery attempts made (counted when it became a dead letter).
    pub attempts: u32,
    /// Why it is a dead letter.
    pub last_error: Option<String>,
}

/// What an operator sees of a webhook in the store: no header value, no body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverySummary {
    /// The store id.
    pub id: u64,
    /// `system` or `flow`.
    pub kind: Kind,
    /// Ids of the items (the first 20).
    pub ids: Vec<String>,
    /// How many items it carries.
    pub items: usize,
    /// When it was accepted, ms since the epoch.
    pub accepted_at_ms: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Why it is a dead letter.
    pub last_error: Option<String>,
}

impl From<&Delivery> for DeliverySummary {
    fn from(d: &Delivery) -> Self {
        DeliverySummary {
            id: d.id,
            kind: d.kind,
            ids: d.ids.iter().take(20).cloned().collect(),
            items: d.ids.len(),
            accepted_at_ms: d.accepted_at_ms,
            attempts: d.attempts,
            last_error: d.last_error.clone(),
        }
    }
}

/// Makes the body to deliver from the items marked new.
pub type BodyFor = Box<dyn Fn(&[bool]) -> Vec<u8> + Send>;

/// A webhook to store: its items' dedup ids (`None`: an item that cannot be
/// deduplicated, always delivered) and how to make the body from the new items.
pub struct Incoming {
    /// The route.
    pub kind: Kind,
    /// Headers to pass on with the original body.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Headers to pass on with a body rebuilt from the new items only (without the
    /// signature, which no longer matches).
    pub partial_headers: Vec<(String, Vec<u8>)>,
    /// One entry per item.
    pub item_ids: Vec<Option<String>>,
    /// Given which items are new, the body to deliver (called only when some are new
    /// and some are not).
    pub body_for: BodyFor,
    /// The original body, delivered when every item is new.
    pub body: bytes::Bytes,
    /// Now, ms since the epoch.
    pub now_ms: u64,
}

/// What became of an accepted webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Queued for delivery under this id; `duplicates` items were left out.
    Queued {
        /// The store id.
        id: u64,
        /// Items left out as seen before.
        duplicates: usize,
    },
    /// Every item had been seen: acknowledged, nothing to deliver.
    Duplicate {
        /// Items in it.
        duplicates: usize,
    },
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or written.
    #[error("webhook store {path}: {message}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// No such webhook.
    #[error("no webhook {0} in the store")]
    NotFound(u64),
}

/// Dedup limits.
#[derive(Debug, Clone, Copy)]
pub struct DedupLimits {
    /// How long a seen id is kept, in ms.
    pub ttl_ms: u64,
    /// Most ids kept.
    pub max_ids: u64,
}

/// The durable store. Cheap to clone; every call blocks on disk.
#[derive(Clone)]
pub struct Store {
    db: Arc<Durable>,
    path: PathBuf,
    limits: DedupLimits,
    instance: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookStore({})", self.path.display())
    }
}

/// Counts from one accept, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Ids forgotten before their time because the table was full.
    pub early: u64,
}

impl Store {
    /// Opens (or creates) the store file, mode 0600 (it holds webhook bodies).
    pub fn open(path: &Path, limits: DedupLimits) -> Result<Store, StoreError> {
        Store::open_with(path, limits, crate::durable::file_opener(), crate::durable::REOPEN_EVERY)
    }

    /// Why writes fail now (a full disk), if they do; never a key.
    pub fn write_error(&self) -> Option<String> {
        self.db.write_error()
    }

    fn open_with(
        path: &Path,
        limits: DedupLimits,
        opener: Opener,
        reopen_every: std::time::Duration,
    ) -> Result<Store, StoreError> {
        let db = Durable::open("webhook store", path, opener, reopen_every)
            .map_err(|message| StoreError::Store { path: path.into(), message })?;
        let mut store = Store { db: Arc::new(db), path: path.into(), limits, instance: 0 };
        store.db.with_db(true, &tables, tables).map_err(|e| store.db_err(e))?;
        store.instance = store.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let instance = meta.get("instance")?.map(|v| v.value());
            let instance = match instance {
                Some(i) => i,
                None => {
                    let i = fastrand::u64(1..u64::from(u32::MAX));
                    meta.insert("instance", i)?;
                    i
                }
            };
            Ok(instance)
        })?;
        Ok(store)
    }

    /// A number naming this store file, so delivery ids stay unique if the file is
    /// replaced.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Store { path: self.path.clone(), message: e.to_string() }
    }

    fn db_err(&self, e: DbError) -> StoreError {
        match e {
            DbError::Unavailable(m) | DbError::Other(m) => self.err(m),
        }
    }

    /// Runs `f` in one write transaction and commits it durably (fsync).
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, StoreError> {
        self.db.write(&tables, f).map_err(|e| self.db_err(e))
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, StoreError> {
        self.db.read(&tables, f).map_err(|e| self.db_err(e))
    }

    /// Deduplicates and queues a webhook in one durable transaction: when this
    /// returns, the disk has it.
    pub fn accept(&self, incoming: Incoming) -> Result<(Accepted, Pruned), StoreError> {
        Ok(self.accept_batch(vec![incoming])?.remove(0))
    }

    /// [`Store::accept`] for several webhooks in one transaction and one fsync, in
    /// order (a later one sees the earlier ones' ids); all or none are stored.
    pub fn accept_batch(&self, batch: Vec<Incoming>) -> Result<Vec<(Accepted, Pruned)>, StoreError> {
        let limits = self.limits;
        self.write(|tx| batch.into_iter().map(|incoming| accept_in(tx, incoming, limits)).collect())
    }

    /// A writer thread that gathers the accepts waiting at the same moment into one
    /// transaction: one fsync serves them all, so concurrent webhooks do not queue
    /// behind each other's disk flushes.
    pub fn group_writer(&self) -> GroupWriter {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let store = self.clone();
        std::thread::Builder::new()
            .name("webhook-store".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    let (incoming, replies): (Vec<Incoming>, Vec<_>) = jobs.into_iter().unzip();
                    match store.accept_batch(incoming) {
                        Ok(results) => {
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(Ok(result));
                            }
                        }
                        Err(e) => {
                            let message = e.to_string();
                            for reply in replies {
                                let _ = reply.send(Err(StoreError::Store {
                                    path: store.path.clone(),
                                    message: message.clone(),
                                }));
                            }
                        }
                    }
                }
            })
            .expect("the webhook store thread starts");
        GroupWriter { jobs: tx }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Delivery, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.err(e))
    }

    /// The oldest pending webhook and its body.
    pub fn first_pending(&self) -> Result<Option<(Delivery, Vec<u8>)>, StoreError> {
        let raw = self.read(|tx| {
            let Some((id, meta)) = tx.open_table(PENDING)?.first()?.map(|(k, v)| (k.value(), v.value().to_vec()))
            else {
                return Ok(None);
            };
            let body = tx.open_table(BODIES)?.get(id)?.map(|v| v.value().to_vec()).unwrap_or_default();
            Ok(Some((meta, body)))
        })?;
        raw.map(|(meta, body)| Ok((self.decode(&meta)?, body))).transpose()
    }

    /// Pending webhooks now.
    pub fn pending_len(&self) -> Result<u64, StoreError> {
        self.read(|tx| Ok(tx.open_table(PENDING)?.len()?))
    }

    /// Dead letters now.
    pub fn dead_len(&self) -> Result<u64, StoreError> {
        self.read(|tx| Ok(tx.open_table(DEAD)?.len()?))
    }

    /// Seen ids held now.
    pub fn seen_len(&self) -> Result<u64, StoreError> {
        self.read(|tx| Ok(tx.open_table(SEEN)?.len()?))
    }

    /// When the oldest pending webhook was accepted (ms since the epoch).
    pub fn oldest_pending_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.first_pending_meta()?.map(|d| d.accepted_at_ms))
    }

    fn first_pending_meta(&self) -> Result<Option<Delivery>, StoreError> {
        let raw = self.read(|tx| Ok(tx.open_table(PENDING)?.first()?.map(|(_, v)| v.value().to_vec())))?;
        raw.map(|b| self.decode(&b)).transpose()
    }

    /// Removes a webhook the app took.
    pub fn delivered(&self, id: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(PENDING)?.remove(id)?;
            tx.open_table(BODIES)?.remove(id)?;
            Ok(())
        })
    }

    /// Moves a pending webhook to the dead letters.
    pub fn dead_letter(&self, id: u64, attempts: u32, reason: &str) -> Result<(), StoreError> {
        let found = self.write(|tx| {
            let Some(bytes) = tx.open_table(PENDING)?.remove(id)?.map(|v| v.value().to_vec()) else {
                return Ok(false);
            };
            let mut d: Delivery = serde_json::from_slice(&bytes).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            d.attempts = attempts;
            d.last_error = Some(reason.to_string());
            let bytes = serde_json::to_vec(&d).expect("deliveries serialize");
            tx.open_table(DEAD)?.insert(id, bytes.as_slice())?;
            Ok(true)
        })?;
        found.then_some(()).ok_or(StoreError::NotFound(id))
    }

    /// Pending webhooks, oldest first (no header values, no bodies).
    pub fn list_pending(&self, limit: usize) -> Result<Vec<DeliverySummary>, StoreError> {
        self.list(PENDING, limit)
    }

    /// Dead letters, oldest first (no header values, no bodies).
    pub fn list_dead(&self, limit: usize) -> Result<Vec<DeliverySummary>, StoreError> {
        self.list(DEAD, limit)
    }

    fn list(&self, table: TableDefinition<u64, &[u8]>, limit: usize) -> Result<Vec<DeliverySummary>, StoreError> {
        let raw: Vec<Vec<u8>> = self.read(|tx| {
            let t = tx.open_table(table)?;
            let mut out = Vec::new();
            for row in t.iter()?.take(limit) {
                out.push(row?.1.value().to_vec());
            }
            Ok(out)
        })?;
        raw.iter().map(|b| self.decode(b).map(|d| DeliverySummary::from(&d))).collect()
    }

    /// Puts a dead letter back in the queue, in its original place (by id).
    pub fn requeue(&self, id: u64) -> Result<(), StoreError> {
        let found = self.write(|tx| {
            let Some(bytes) = tx.open_table(DEAD)?.remove(id)?.map(|v| v.value().to_vec()) else {
                return Ok(false);
            };
            let mut d: Delivery = serde_json::from_slice(&bytes).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            d.attempts = 0;
            d.last_error = None;
            let bytes = serde_json::to_vec(&d).expect("deliveries serialize");
            tx.open_table(PENDING)?.insert(id, bytes.as_slice())?;
            Ok(true)
        })?;
        found.then_some(()).ok_or(StoreError::NotFound(id))
    }

    /// Deletes a dead letter for good.
    pub fn drop_dead(&self, id: u64) -> Result<(), StoreError> {
        let found = self.write(|tx| {
            let found = tx.open_table(DEAD)?.remove(id)?.is_some();
            if found {
                tx.open_table(BODIES)?.remove(id)?;
            }
            Ok(found)
        })?;
        found.then_some(()).ok_or(StoreError::NotFound(id))
    }
}

/// Creates the tables of a (re)opened file.
fn tables(db: &Database) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    for table in [PENDING, DEAD, BODIES] {
        tx.open_table(table)?;
    }
    tx.open_table(SEEN)?;
    tx.open_table(SEEN_ORDER)?;
    tx.open_table(META)?;
    tx.commit()?;
    Ok(())
}

/// One webhook's dedup and queueing inside a write transaction.
fn accept_in(
    tx: &redb::WriteTransaction,
    incoming: Incoming,
    limits: DedupLimits,
) -> Result<(Accepted, Pruned), redb::Error> {
    let mut seen = tx.open_table(SEEN)?;
    let mut order = tx.open_table(SEEN_ORDER)?;
    let pruned = prune(&mut seen, &mut order, incoming.now_ms, limits)?;
    let mut fresh = Vec::with_capacity(incoming.item_ids.len());
    for id in &incoming.item_ids {
        let Some(id) = id else {
            fresh.push(true);
            continue;
        };
        let key = format!("{}{id}", incoming.kind.key_prefix());
        if seen.get(key.as_str())?.is_some() {
            fresh.push(false);
        } else {
            seen.insert(key.as_str(), incoming.now_ms)?;
            order.insert((incoming.now_ms, key.as_str()), ())?;
            fresh.push(true);
        }
    }
    let duplicates = fresh.iter().filter(|f| !**f).count();
    if !fresh.is_empty() && duplicates == fresh.len() {
        return Ok((Accepted::Duplicate { duplicates }, pruned));
    }
    let mut meta = tx.open_table(META)?;
    let id = meta.get("next_id")?.map_or(1, |v| v.value());
    meta.insert("next_id", id + 1)?;
    let (body, headers) = if duplicates == 0 {
        (incoming.body.to_vec(), incoming.headers)
    } else {
        ((incoming.body_for)(&fresh), incoming.partial_headers)
    };
    let ids = incoming.item_ids.iter().zip(&fresh).filter(|(_, new)| **new).filter_map(|(id, _)| id.clone()).collect();
    let delivery = Delivery {
        id,
        kind: incoming.kind,
        headers,
        ids,
        duplicates_removed: duplicates,
        accepted_at_ms: incoming.now_ms,
        attempts: 0,
        last_error: None,
    };
    let bytes = serde_json::to_vec(&delivery).expect("deliveries serialize");
    tx.open_table(PENDING)?.insert(id, bytes.as_slice())?;
    tx.open_table(BODIES)?.insert(id, body.as_slice())?;
    Ok((Accepted::Queued { id, duplicates }, pruned))
}

/// Forgets up to [`PRUNE_PER_ACCEPT`] of the oldest seen ids that are past the TTL
/// or over the cap.
fn prune(
    seen: &mut redb::Table<&str, u64>,
    order: &mut redb::Table<(u64, &str), ()>,
    now_ms: u64,
    limits: DedupLimits,
) -> Result<Pruned, redb::Error> {
    let cutoff = now_ms.saturating_sub(limits.ttl_ms);
    let mut len = seen.len()?;
    let mut pruned = Pruned::default();
    for _ in 0..PRUNE_PER_ACCEPT {
        let Some((at, key)) = order.first()?.map(|(k, _)| {
            let (at, key) = k.value();
            (at, key.to_string())
        }) else {
            break;
        };
        let expired = at < cutoff;
        // Room for one more batch's worth keeps the cap a cap.
        let over = len >= limits.max_ids;
        if !expired && !over {
            break;
        }
        if !expired {
            pruned.early += 1;
        }
        order.remove((at, key.as_str()))?;
        seen.remove(key.as_str())?;
        len = len.saturating_sub(1);
    }
    Ok(pruned)
}

/// The store's admin routes, for the admin listener to mount under `/admin`:
/// `GET /webhooks` (counts and oldest pending), `GET /webhooks/dead`,
/// `POST /webhooks/dead/{id}/requeue`, `DELETE /webhooks/dead/{id}`. Returns the
/// status and a JSON body, or `None` for a path that is not the gate's.
pub fn admin(store: &Store, method: &http::Method, path: &str) -> Option<(http::StatusCode, serde_json::Value)> {
    use http::{Method, StatusCode};
    use serde_json::json;
    let rest = path.strip_prefix("/webhooks")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let id_of = |id: &str| id.parse::<u64>().map_err(|_| (StatusCode::BAD_REQUEST, json!({"error": "bad id"})));
    let result = match (method, parts.as_slice()) {
        (&Method::GET, []) => store.list_pending(100).and_then(|pending| {
            Ok(json!({
                "pending": store.pending_len()?,
                "dead": store.dead_len()?,
                "seen_ids": store.seen_len()?,
                "oldest_pending": pending,
            }))
        }),
        (&Method::GET, ["dead"]) => store.list_dead(1000).map(|dead| json!({"dead": dead})),
        (&Method::POST, ["dead", id, "requeue"]) => match id_of(id) {
            Ok(id) => store.requeue(id).map(|()| json!({"requeued": id})),
            Err(e) => return Some(e),
        },
        (&Method::DELETE, ["dead", id]) => match id_of(id) {
            Ok(id) => store.drop_dead(id).map(|()| json!({"dropped": id})),
            Err(e) => return Some(e),
        },
        _ => return Some((StatusCode::NOT_FOUND, json!({"error": "no such webhook route"}))),
    };
    Some(match result {
        Ok(body) => (StatusCode::OK, body),
        Err(StoreError::NotFound(id)) => (StatusCode::NOT_FOUND, json!({"error": format!("no webhook {id}")})),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string()})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kp-wh-{name}-{}", fastrand::u64(..))).join("w.redb")
    }

    fn limits() -> DedupLimits {
        DedupLimits { ttl_ms: 25 * HOUR_MS, max_ids: 1000 }
    }

    fn accept(store: &Store, ids: &[&str], now_ms: u64) -> Accepted {
        store.accept(incoming(ids, now_ms)).unwrap().0
    }

    fn incoming(ids: &[&str], now_ms: u64) -> Incoming {
        let body = ids.join(",");
        let owned: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let body_for = move |fresh: &[bool]| {
            owned
                .iter()
                .zip(fresh)
                .filter(|(_, f)| **f)
                .map(|(i, _)| i.as_str())
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes()
        };
        Incoming {
            kind: Kind::System,
            headers: vec![("klaviyo-signature".into(), b"sig-secret".to_vec())],
            partial_headers: vec![],
            item_ids: ids.iter().map(|i| Some(i.to_string())).collect(),
            body_for: Box::new(body_for),
            body: body.into(),
            now_ms,
        }
    }

    #[test]
    fn an_io_error_is_recovered_by_reopening() {
        let path = temp("io");
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener = crate::durable::testing::flaky_opener(fail.clone());
        let store = Store::open_with(&path, limits(), opener, std::time::Duration::ZERO).unwrap();
        assert_eq!(accept(&store, &["a"], 1), Accepted::Queued { id: 1, duplicates: 0 });
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..2 {
            assert!(store.accept(incoming(&["b"], 2)).is_err());
        }
        let error = store.write_error().expect("writes fail");
        assert!(error.contains("no space"), "{error}");
        // Space again: the next accept reopens the file; "b" was refused, so it is new.
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(accept(&store, &["b"], 3), Accepted::Queued { id: 2, duplicates: 0 });
        assert_eq!(store.write_error(), None);
        assert_eq!(store.pending_len().unwrap(), 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn dedups_whole_and_partial_batches_and_survives_reopen() {
        let path = temp("dedup");
        let store = Store::open(&path, limits()).unwrap();
        assert_eq!(accept(&store, &["a", "b"], 1), Accepted::Queued { id: 1, duplicates: 0 });
        assert_eq!(accept(&store, &["a", "b"], 2), Accepted::Duplicate { duplicates: 2 });
        // Some seen: only the new items are delivered.
        assert_eq!(accept(&store, &["b", "c", "c"], 3), Accepted::Queued { id: 2, duplicates: 2 });
        let (first, body) = store.first_pending().unwrap().unwrap();
        assert_eq!((first.id, body.as_slice()), (1, b"a,b".as_slice()));
        store.delivered(1).unwrap();
        let (second, body) = store.first_pending().unwrap().unwrap();
        assert_eq!(
            (second.ids.clone(), body.as_slice(), second.duplicates_removed),
            (vec!["c".into()], b"c".as_slice(), 2)
        );
        assert!(second.headers.is_empty(), "a rebuilt body goes without the signature");
        let instance = store.instance();
        drop(store);
        // Reopened (as after a crash): ids remembered, ids of webhooks not reused.
        let store = Store::open(&path, limits()).unwrap();
        assert_eq!(store.instance(), instance);
        assert_eq!(accept(&store, &["a"], 4), Accepted::Duplicate { duplicates: 1 });
        assert_eq!(accept(&store, &["d"], 5), Accepted::Queued { id: 3, duplicates: 0 });
        // Flow and system ids live apart.
        let flow = Incoming {
            kind: Kind::Flow,
            headers: vec![],
            partial_headers: vec![],
            item_ids: vec![Some("a".into())],
            body_for: Box::new(|_| Vec::new()),
            body: bytes::Bytes::from_static(b"{}"),
            now_ms: 6,
        };
        assert!(matches!(store.accept(flow).unwrap().0, Accepted::Queued { .. }));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn seen_ids_expire_after_the_ttl_and_stay_bounded() {
        let path = temp("ttl");
        let store = Store::open(&path, DedupLimits { ttl_ms: 25 * HOUR_MS, max_ids: 100 }).unwrap();
        accept(&store, &["old"], 0);
        // Within 24 h: still a duplicate.
        assert_eq!(accept(&store, &["old"], 24 * HOUR_MS), Accepted::Duplicate { duplicates: 1 });
        // Past the TTL, the next accept forgets it.
        accept(&store, &["tick"], 25 * HOUR_MS + 1);
        assert!(matches!(accept(&store, &["old"], 25 * HOUR_MS + 2), Accepted::Queued { .. }));
        // Over the cap, the oldest go first and are counted.
        let now = 26 * HOUR_MS;
        for n in 0..300 {
            accept(&store, &[&format!("id{n}")], now + n);
        }
        assert!(store.seen_len().unwrap() <= 100, "{}", store.seen_len().unwrap());
        assert_eq!(accept(&store, &["id299"], now + 400), Accepted::Duplicate { duplicates: 1 });
        assert!(matches!(accept(&store, &["id0"], now + 401), Accepted::Queued { .. }));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn dead_letters_list_requeue_and_drop_without_secrets() {
        let path = temp("dead");
        let store = Store::open(&path, limits()).unwrap();
        accept(&store, &["x"], 1);
        accept(&store, &["y"], 2);
        store.dead_letter(1, 3, "app answered 400").unwrap();
        assert_eq!(store.first_pending().unwrap().unwrap().0.id, 2);
        let (status, body) = admin(&store, &http::Method::GET, "/webhooks/dead").unwrap();
        assert_eq!(status, http::StatusCode::OK);
        let text = body.to_string();
        assert!(text.contains("app answered 400") && !text.contains("sig-secret"), "{text}");
        assert_eq!(body["dead"][0]["attempts"], 3);
        let (_, counts) = admin(&store, &http::Method::GET, "/webhooks").unwrap();
        assert_eq!((counts["pending"].as_u64(), counts["dead"].as_u64()), (Some(1), Some(1)));
        assert_eq!(admin(&store, &http::Method::POST, "/webhooks/dead/1/requeue").unwrap().0, http::StatusCode::OK);
        // Back in its original place, ahead of 2.
        assert_eq!(store.first_pending().unwrap().unwrap().0.id, 1);
        store.dead_letter(1, 1, "again").unwrap();
        assert_eq!(admin(&store, &http::Method::DELETE, "/webhooks/dead/1").unwrap().0, http::StatusCode::OK);
        assert_eq!(admin(&store, &http::Method::DELETE, "/webhooks/dead/1").unwrap().0, http::StatusCode::NOT_FOUND);
        assert_eq!(
            admin(&store, &http::Method::POST, "/webhooks/dead/x/requeue").unwrap().0,
            http::StatusCode::BAD_REQUEST
        );
        assert!(admin(&store, &http::Method::GET, "/spool").is_none());
        assert!(admin(&store, &http::Method::GET, "/webhooksfoo").is_none());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
