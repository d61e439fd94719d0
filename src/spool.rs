//! Durable accept-and-forward. When Klaviyo is failing (breaker open) or a deferrable
//! write cannot go before its deadline, the request is written to a redb file — the
//! commit is fsynced before the client hears `202` with the spool id — and replayed
//! once Klaviyo is healthy. Writes that Klaviyo refuses for good (a 4xx other than
//! 429), that keep failing, or that cannot be read move to a dead-letter table an
//! operator can list, requeue and drop; dead letters expire after `dead_letter_ttl_s`.
//!
//! The file holds the requests as they will go upstream, `Authorization` included (in
//! pass-through mode it is the only way to replay them): it is created mode 0600, and
//! the listing functions never return header values.
//!
//! Bounded: a write that would take the spool past `max_bytes` or `max_entries`
//! (pending and dead together) is refused ([`SpoolError::Full`]), so nothing is
//! acknowledged that is not on disk. Each request is a small head (method, path,
//! headers, attempts) in `pending` or `dead` and its body, as raw bytes, in `bodies`:
//! listing and replay scheduling read heads only. Heads written by earlier versions (a
//! JSON document with the body as an array of numbers) are read as they are.
//!
//! After an I/O error (a full disk) redb refuses every later call until the database
//! is reopened: the spool reopens it on the next call (at most once a second, through
//! [`crate::durable`]) and reports itself degraded until a write succeeds again
//! ([`Spool::health`]).

// redb's own error type is large; it only passes between the transaction closures here.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::config::SpoolConfig;
use crate::durable::{DbError, Durable, Opener};

/// Requests waiting for replay, by spool id (arrival order): their heads.
const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// Requests given up on: their heads.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// The bodies of pending and dead requests, raw, by spool id.
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// `next_id`: ids are never reused, so a client's spool id names one write forever.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The first byte of a head in the current format (a legacy head starts with `{`).
const HEAD_V2: u8 = 2;

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
    /// Failed replays so far.
    pub attempts: u32,
    /// Why Klaviyo refused it.
    pub last_error: Option<String>,
}

/// An entry's head as stored: everything but the body, plus the replay bookkeeping.
#[derive(Clone)]
struct Head {
    entry: Entry,
    attempts: u32,
    /// When it went to the dead letters (ms since the epoch).
    dead_at_ms: Option<u64>,
}

impl Head {
    fn summary(&self) -> EntrySummary {
        let e = &self.entry;
        EntrySummary {
            id: e.id,
            operation: e.operation.clone(),
            method: e.method.clone(),
            path: e.path_and_query.split('?').next().unwrap_or_default().to_string(),
            unique_id: e.unique_id.clone(),
            accepted_at_ms: e.accepted_at_ms,
            attempts: self.attempts,
            last_error: e.last_error.clone(),
        }
    }

    /// Bytes on disk: a version byte, three numbers, then length-prefixed fields (the
    /// body is not here: it is in `bodies`).
    fn encode(&self) -> Vec<u8> {
        let e = &self.entry;
        let mut out = Vec::with_capacity(
            64 + e.path_and_query.len() + e.headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>(),
        );
        out.push(HEAD_V2);
        out.extend_from_slice(&e.accepted_at_ms.to_le_bytes());
        out.extend_from_slice(&self.dead_at_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        let mut field = |b: Option<&[u8]>| match b {
            Some(b) => {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        };
        field(Some(e.operation.as_bytes()));
        field(Some(e.method.as_bytes()));
        field(Some(e.path_and_query.as_bytes()));
        field(e.unique_id.as_deref().map(str::as_bytes));
        field(e.last_error.as_deref().map(str::as_bytes));
        field(Some(&(e.headers.len() as u32).to_le_bytes()));
        for (name, value) in &e.headers {
            field(Some(name.as_bytes()));
            field(Some(value));
        }
        out
    }

    /// A head in either format; a legacy one carries its body (returned beside it).
    fn decode(id: u64, bytes: &[u8]) -> Result<(Head, Option<Vec<u8>>), String> {
        match bytes.first() {
            Some(&HEAD_V2) => {
                Head::decode_v2(id, &bytes[1..]).map(|h| (h, None)).ok_or_else(|| "truncated head".into())
            }
            Some(b'{') => {
                // Written before bodies were raw: a JSON `Entry`, body and all.
                let mut entry: Entry = serde_json::from_slice(bytes).map_err(|e| format!("legacy entry: {e}"))?;
                entry.id = id;
                let body = std::mem::take(&mut entry.body);
                Ok((Head { entry, attempts: 0, dead_at_ms: None }, Some(body)))
            }
            Some(v) => Err(format!("unknown entry format {v}")),
            None => Err("empty entry".into()),
        }
    }

    fn decode_v2(id: u64, mut rest: &[u8]) -> Option<Head> {
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
            rest = tail;
            Some(head)
        };
        let accepted_at_ms = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let dead_at_ms = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let attempts = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let mut field = || -> Option<Option<Vec<u8>>> {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?);
            if len == u32::MAX {
                return Some(None);
            }
            Some(Some(take(len as usize)?.to_vec()))
        };
        let text = |b: Vec<u8>| String::from_utf8(b).ok();
        let operation = text(field()??)?;
        let method = text(field()??)?;
        let path_and_query = text(field()??)?;
        let unique_id = field()?.map(text).map_or(Some(None), |t| t.map(Some))?;
        let last_error = field()?.map(text).map_or(Some(None), |t| t.map(Some))?;
        let count = u32::from_le_bytes(field()??.try_into().ok()?);
        let mut headers = Vec::with_capacity(count.min(256) as usize);
        for _ in 0..count {
            headers.push((text(field()??)?, field()??));
        }
        let entry = Entry {
            id,
            operation,
            method,
            path_and_query,
            headers,
            body: Vec::new(),
            unique_id,
            accepted_at_ms,
            last_error,
        };
        Some(Head { entry, attempts, dead_at_ms: (dead_at_ms != 0).then_some(dead_at_ms) })
    }
}

/// A pending request as the replayer sees it first: its head without the body, or why
/// it cannot be read.
#[derive(Debug)]
pub struct Queued {
    /// The spool id.
    pub id: u64,
    /// Its lane ([`Spool::lane`]).
    pub lane: u64,
    /// The request without its body ([`Spool::body`] has it), or why it is unreadable.
    pub entry: Result<Entry, String>,
}

/// What [`Spool::next_pending`] found.
#[derive(Debug)]
pub enum Next {
    /// This one can go now.
    Ready(Queued),
    /// Pending writes, none of them ready.
    Waiting,
    /// Nothing pending.
    Empty,
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file could not be opened or read, or an entry is malformed.
    #[error("spool {path}: {message}")]
    Store {
        /// The spool file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file cannot be written (an I/O error: disk full); it is reopened on a later call.
    #[error("spool {path} cannot be written: {message}")]
    Unavailable {
        /// The spool file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The write would take the spool past a bound.
    #[error("the spool is full ({0})")]
    Full(&'static str),
    /// No entry with this id.
    #[error("no spooled entry {0}")]
    NotFound(u64),
}

/// The spool's bounds and give-up rules (`[spool]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Most bytes held, pending and dead (heads and bodies as stored).
    pub max_bytes: u64,
    /// Most entries held, pending and dead.
    pub max_entries: u64,
    /// How long a dead letter is kept.
    pub dead_letter_ttl: Duration,
    /// Failed replays after which a pending write goes to the dead letters.
    pub max_attempts: u32,
    /// Age after which a pending write whose replay fails goes to the dead letters.
    pub max_age: Duration,
}

impl SpoolLimits {
    /// Whether a deferred write (or a coalesced event) whose replay failed `attempts`
    /// times, and that was accepted `age` ago, goes to the dead letters.
    pub fn gives_up(&self, attempts: u32, age: Duration) -> bool {
        attempts >= self.max_attempts || age >= self.max_age
    }

    /// The limits `[spool]` sets.
    pub fn from_config(c: &SpoolConfig) -> Self {
        SpoolLimits {
            max_bytes: c.max_bytes.get(),
            max_entries: c.max_entries.get(),
            dead_letter_ttl: Duration::from_secs(c.dead_letter_ttl_s.get()),
            max_attempts: c.max_attempts.get(),
            max_age: Duration::from_secs(c.max_age_s.get()),
        }
    }
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits::from_config(&SpoolConfig::default())
    }
}

/// What the spool holds, kept in memory beside the file so gauges and health never
/// read it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SpoolStats {
    /// Pending entries.
    pub pending: u64,
    /// Dead letters.
    pub dead: u64,
    /// Bytes held (heads and bodies).
    pub bytes: u64,
    /// When the oldest pending entry was accepted (ms since the epoch).
    pub oldest_pending_ms: Option<u64>,
}

/// The spool in `/health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpoolHealth {
    /// `degraded` while writes fail or the spool is full (deferrable writes are then
    /// refused with 503), `healthy` otherwise.
    pub status: crate::admin::Status,
    /// Pending entries.
    pub pending: u64,
    /// Dead letters.
    pub dead: u64,
    /// Bytes held, and the bound.
    pub bytes: u64,
    /// `spool.max_bytes`.
    pub max_bytes: u64,
    /// Entries held (pending and dead) may reach `spool.max_entries`.
    pub max_entries: u64,
    /// Why writes fail (never a key).
    pub error: Option<String>,
}

struct Inner {
    path: PathBuf,
    /// Names lanes; this process's own, never stored.
    hasher: std::hash::RandomState,
    db: Durable,
    state: Mutex<State>,
    limits: Mutex<SpoolLimits>,
}

#[derive(Default)]
struct State {
    stats: SpoolStats,
    /// The pending entries by lane, for replay to find each lane's oldest without
    /// reading the heads of lanes that wait.
    lanes: LaneIndex,
    /// A write was refused for a bound since the last removal.
    full: bool,
    /// Entries and bytes of writes under way, counted against the bounds (and kept
    /// apart from `stats`, which a reopen recounts from the file).
    reserved: (u64, u64),
}

/// The durable spool. Cheap to clone; every call blocks on disk, so async callers run
/// it on a blocking thread ([`Spool::append_async`]).
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spool({})", self.inner.path.display())
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Spool {
    /// Opens (or creates) the spool file with the default limits.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(path, SpoolLimits::default())
    }

    /// Opens (or creates) the spool file.
    pub fn open_with(path: &Path, limits: SpoolLimits) -> Result<Spool, SpoolError> {
        Spool::with_opener(path, limits, crate::durable::file_opener(), crate::durable::REOPEN_EVERY)
    }

    pub(crate) fn with_opener(
        path: &Path,
        limits: SpoolLimits,
        opener: Opener,
        reopen_every: Duration,
    ) -> Result<Spool, SpoolError> {
        let db = Durable::open("spool", path, opener, reopen_every)
            .map_err(|message| SpoolError::Store { path: path.into(), message })?;
        let spool = Spool {
            inner: Arc::new(Inner {
                path: path.into(),
                hasher: std::hash::RandomState::new(),
                db,
                state: Mutex::new(State::default()),
                limits: Mutex::new(limits),
            }),
        };
        spool.with_db(true, |db| spool.install(db))?;
        Ok(spool)
    }

    /// Readies a (re)opened database: creates the tables and counts what it holds.
    fn install(&self, db: &Database) -> Result<(), redb::Error> {
        let stats = prepare(db)?;
        let lanes = self.index(db)?;
        let mut state = self.state();
        state.stats = stats;
        state.lanes = lanes;
        Ok(())
    }

    /// The lane of an entry: one credential (and `company_id`), whose writes replay
    /// in order. Never [`UNREADABLE`].
    pub fn lane(&self, entry: &Entry) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.inner.hasher.build_hasher();
        for (name, value) in &entry.headers {
            if name.eq_ignore_ascii_case("authorization") {
                value.hash(&mut h);
            }
        }
        let query = entry.path_and_query.split_once('?').map_or("", |(_, q)| q);
        query.split('&').find(|kv| kv.starts_with("company_id=")).hash(&mut h);
        h.finish() | 1
    }

    fn lane_of(&self, id: u64, raw: &[u8]) -> u64 {
        Head::decode(id, raw).map_or(UNREADABLE, |(h, _)| self.lane(&h.entry))
    }

    /// The lane index of a database's pending entries (heads read once, at open).
    fn index(&self, db: &Database) -> Result<LaneIndex, redb::Error> {
        let tx = db.begin_read()?;
        let mut index = LaneIndex::default();
        for row in tx.open_table(PENDING)?.iter()? {
            let (id, value) = row?;
            index.insert(id.value(), self.lane_of(id.value(), value.value()));
        }
        Ok(index)
    }

    /// Applies new limits (a reload).
    pub fn set_limits(&self, limits: SpoolLimits) {
        *self.inner.limits.lock().unwrap_or_else(PoisonError::into_inner) = limits;
    }

    /// The current limits.
    pub fn limits(&self) -> SpoolLimits {
        self.inner.limits.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn store_err(&self, e: impl std::fmt::Display) -> SpoolError {
        SpoolError::Store { path: self.inner.path.clone(), message: e.to_string() }
    }

    /// Runs `f` on the database (reopened first if it failed before).
    fn with_db<T>(&self, write: bool, f: impl FnOnce(&Database) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        self.inner.db.with_db(write, &|db| self.install(db), f).map_err(|e| match e {
            DbError::Unavailable(message) => SpoolError::Unavailable { path: self.inner.path.clone(), message },
            DbError::Other(message) => self.store_err(message),
        })
    }

    /// Runs `f` in one write transaction and commits it durably (fsync).
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        self.with_db(true, |db| {
            let tx = db.begin_write()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        self.with_db(false, |db| f(&db.begin_read()?))
    }

    /// Stores a write durably and returns its spool id. The disk has it when this
    /// returns; [`SpoolError::Full`] when it would take the spool past a bound.
    pub fn append(&self, entry: Entry) -> Result<u64, SpoolError> {
        self.store(entry, None)
    }

    /// Stores a write straight into the dead letters (the coalescer's refused events,
    /// already acknowledged to their clients: not refused for a bound).
    pub fn append_dead(&self, entry: Entry, reason: &str) -> Result<u64, SpoolError> {
        self.store(entry, Some(reason))
    }

    fn store(&self, mut entry: Entry, dead: Option<&str>) -> Result<u64, SpoolError> {
        let body = std::mem::take(&mut entry.body);
        entry.last_error = dead.map(str::to_string).or(entry.last_error);
        let head = Head { entry, attempts: 0, dead_at_ms: dead.map(|_| now_ms()) };
        let bytes = head.encode();
        let size = (bytes.len() + body.len()) as u64;
        // Reserve the room first, so concurrent writers cannot both pass the bound.
        {
            let limits = self.limits();
            let mut state = self.state();
            let (s, reserved) = (&state.stats, state.reserved);
            if dead.is_none() {
                let over = if s.pending + s.dead + reserved.0 >= limits.max_entries {
                    Some("spool.max_entries")
                } else if s.bytes + reserved.1 + size > limits.max_bytes {
                    Some("spool.max_bytes")
                } else {
                    None
                };
                if let Some(bound) = over {
                    state.full = true;
                    return Err(SpoolError::Full(bound));
                }
            }
            state.reserved.0 += 1;
            state.reserved.1 += size;
        }
        let result = self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let id = meta.get("next_id")?.map_or(1, |v| v.value());
            meta.insert("next_id", id + 1)?;
            tx.open_table(if dead.is_some() { DEAD } else { PENDING })?.insert(id, bytes.as_slice())?;
            tx.open_table(BODIES)?.insert(id, body.as_slice())?;
            Ok(id)
        });
        let mut state = self.state();
        state.reserved.0 -= 1;
        state.reserved.1 -= size;
        match result {
            Ok(id) => {
                let s = &mut state.stats;
                s.bytes += size;
                if dead.is_some() {
                    s.dead += 1;
                } else {
                    s.pending += 1;
                    s.oldest_pending_ms.get_or_insert(head.entry.accepted_at_ms);
                    let lane = self.lane(&head.entry);
                    state.lanes.insert(id, lane);
                }
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }

    /// [`Spool::append`] on a blocking thread.
    pub async fn append_async(&self, entry: Entry) -> Result<u64, SpoolError> {
        let spool = self.clone();
        tokio::task::spawn_blocking(move || spool.append(entry)).await.unwrap_or_else(|e| Err(self.store_err(e)))
    }

    /// The oldest pending write, body included.
    pub fn first_pending(&self) -> Result<Option<Entry>, SpoolError> {
        let Some(first) = self.pending_heads(1)?.pop() else { return Ok(None) };
        let mut entry = first.entry.map_err(|e| self.store_err(e))?;
        entry.body = self.body(entry.id)?.ok_or_else(|| self.store_err(format!("entry {} has no body", entry.id)))?;
        Ok(Some(entry))
    }

    /// Up to `limit` pending writes, oldest first, without their bodies.
    pub fn pending_heads(&self, limit: usize) -> Result<Vec<Queued>, SpoolError> {
        self.read(|tx| {
            let table = tx.open_table(PENDING)?;
            let mut out = Vec::new();
            for row in table.iter()?.take(limit) {
                let (id, value) = row?;
                let id = id.value();
                let (lane, entry) =
                    (self.lane_of(id, value.value()), Head::decode(id, value.value()).map(|(h, _)| h.entry));
                out.push(Queued { id, lane, entry });
            }
            Ok(out)
        })
    }

    /// The oldest pending write whose lane is not in `held` (or that cannot be read:
    /// it must be moved out of the way). The lane index finds it without reading any
    /// other head; no body is read.
    pub fn next_pending(&self, held: &std::collections::HashSet<u64>) -> Result<Next, SpoolError> {
        let (first, any) = {
            let state = self.state();
            (state.lanes.first_free(held), !state.lanes.is_empty())
        };
        let Some((id, lane)) = first else { return Ok(if any { Next::Waiting } else { Next::Empty }) };
        let raw = self.read(|tx| Ok(tx.open_table(PENDING)?.get(id)?.map(|v| v.value().to_vec())))?;
        // Gone meanwhile (an operator's change): look again.
        let Some(raw) = raw else { return Ok(Next::Waiting) };
        let entry = Head::decode(id, &raw).map(|(h, _)| h.entry);
        Ok(Next::Ready(Queued { id, lane, entry }))
    }

    /// The body of a pending or dead entry.
    pub fn body(&self, id: u64) -> Result<Option<Vec<u8>>, SpoolError> {
        self.read(|tx| {
            if let Some(body) = tx.open_table(BODIES)?.get(id)? {
                return Ok(Some(body.value().to_vec()));
            }
            // A legacy entry carries its body in its head.
            for table in [PENDING, DEAD] {
                if let Some(v) = tx.open_table(table)?.get(id)? {
                    return Ok(Head::decode(id, v.value()).ok().and_then(|(_, body)| body));
                }
            }
            Ok(None)
        })
    }

    /// What the spool holds (from memory: no disk read).
    pub fn stats(&self) -> SpoolStats {
        self.state().stats.clone()
    }

    /// Number of pending writes.
    pub fn pending_len(&self) -> Result<u64, SpoolError> {
        Ok(self.stats().pending)
    }

    /// Number of dead letters.
    pub fn dead_len(&self) -> Result<u64, SpoolError> {
        Ok(self.stats().dead)
    }

    /// The spool's state for `/health` (from memory: no disk read).
    pub fn health(&self) -> SpoolHealth {
        let limits = self.limits();
        let state = self.state();
        let s = &state.stats;
        let error = self.inner.db.write_error().or_else(|| {
            state.full.then(|| {
                format!("full: {} entries, {} bytes; deferrable writes are refused", s.pending + s.dead, s.bytes)
            })
        });
        SpoolHealth {
            status: if error.is_some() { crate::admin::Status::Degraded } else { crate::admin::Status::Healthy },
            pending: s.pending,
            dead: s.dead,
            bytes: s.bytes,
            max_bytes: limits.max_bytes,
            max_entries: limits.max_entries,
            error,
        }
    }

    /// Applies what a transaction removed or moved (in the same lock as the counters).
    fn account(&self, change: Change) {
        let mut state = self.state();
        let s = &mut state.stats;
        s.pending = s.pending.saturating_sub(change.pending_removed);
        s.dead = (s.dead + change.dead_added).saturating_sub(change.dead_removed);
        s.pending += change.pending_added;
        s.bytes = (s.bytes + change.bytes_added).saturating_sub(change.bytes_removed);
        if let Some(oldest) = change.oldest_pending {
            s.oldest_pending_ms = oldest;
        }
        // Only entries leaving the spool make room (a move to the dead letters does not).
        if change.pending_removed + change.dead_removed > change.pending_added + change.dead_added {
            state.full = false;
        }
    }

    /// Removes a write that was delivered.
    pub fn delivered(&self, id: u64) -> Result<(), SpoolError> {
        let change = self.write(|tx| {
            let mut change = Change::default();
            let mut pending = tx.open_table(PENDING)?;
            if let Some(v) = pending.remove(id)? {
                change.pending_removed = 1;
                change.bytes_removed += v.value().len() as u64;
            }
            if let Some(v) = tx.open_table(BODIES)?.remove(id)? {
                change.bytes_removed += v.value().len() as u64;
            }
            change.oldest_pending = Some(oldest(&pending)?);
            Ok(change)
        })?;
        self.state().lanes.remove(id);
        self.account(change);
        Ok(())
    }

    /// Moves a pending write to the dead-letter table, with the reason. An entry whose
    /// head cannot be read moves too, under a head that says so (its bytes kept as
    /// its body, for the operator).
    pub fn dead_letter(&self, id: u64, reason: &str) -> Result<(), SpoolError> {
        let change = self.write(|tx| {
            let mut pending = tx.open_table(PENDING)?;
            let Some(raw) = pending.remove(id)?.map(|v| v.value().to_vec()) else {
                return Ok(None);
            };
            let mut bodies = tx.open_table(BODIES)?;
            let body_before = bodies.get(id)?.map_or(0, |b| b.value().len() as u64);
            let head = match Head::decode(id, &raw) {
                Ok((mut head, legacy_body)) => {
                    if let Some(body) = legacy_body {
                        bodies.insert(id, body.as_slice())?;
                    }
                    head.entry.last_error = Some(reason.to_string());
                    head
                }
                Err(why) => {
                    if bodies.get(id)?.is_none() {
                        bodies.insert(id, raw.as_slice())?;
                    }
                    unreadable(id, &format!("{reason} ({why})"))
                }
            };
            let head = Head { dead_at_ms: Some(now_ms()), ..head };
            let bytes = head.encode();
            tx.open_table(DEAD)?.insert(id, bytes.as_slice())?;
            let body_len = bodies.get(id)?.map_or(0, |b| b.value().len() as u64);
            let old_total = raw.len() as u64 + body_before;
            Ok(Some((old_total, bytes.len() as u64 + body_len, oldest(&pending)?)))
        })?;
        // A legacy head held its body; now the body is stored on its own.
        let Some((old_total, new_total, oldest)) = change else { return Err(SpoolError::NotFound(id)) };
        self.state().lanes.remove(id);
        let mut change =
            Change { pending_removed: 1, dead_added: 1, oldest_pending: Some(oldest), ..Change::default() };
        if new_total >= old_total {
            change.bytes_added = new_total - old_total;
        } else {
            change.bytes_removed = old_total - new_total;
        }
        self.account(change);
        Ok(())
    }

    /// Counts a failed replay of a pending write: it goes to the dead letters when it
    /// reached `max_attempts` failures, or is older than `max_age`. Returns whether it did.
    pub fn failed_attempt(&self, id: u64, reason: &str) -> Result<bool, SpoolError> {
        let limits = self.limits();
        let outcome = self.write(|tx| {
            let mut pending = tx.open_table(PENDING)?;
            let Some(raw) = pending.get(id)?.map(|v| v.value().to_vec()) else { return Ok(None) };
            let Ok((mut head, legacy_body)) = Head::decode(id, &raw) else { return Ok(Some((true, 0, 0))) };
            head.attempts += 1;
            let age = Duration::from_millis(now_ms().saturating_sub(head.entry.accepted_at_ms));
            let give_up = limits.gives_up(head.attempts, age);
            let bytes = head.encode();
            pending.insert(id, bytes.as_slice())?;
            // A legacy entry is rewritten in the current format, its body stored apart.
            let body_len = match legacy_body {
                Some(body) => {
                    tx.open_table(BODIES)?.insert(id, body.as_slice())?;
                    body.len() as u64
                }
                None => 0,
            };
            Ok(Some((give_up, raw.len() as u64, bytes.len() as u64 + body_len)))
        })?;
        let Some((give_up, old, new)) = outcome else { return Err(SpoolError::NotFound(id)) };
        if old > 0 {
            self.account(Change {
                bytes_added: new.saturating_sub(old),
                bytes_removed: old.saturating_sub(new),
                ..Change::default()
            });
        }
        if give_up {
            self.dead_letter(id, &format!("gave up: {reason}"))?;
        }
        Ok(give_up)
    }

    /// The pending writes, oldest first (no header values, no bodies read).
    pub fn list_pending(&self, limit: usize) -> Result<Vec<EntrySummary>, SpoolError> {
        self.list(PENDING, limit)
    }

    /// The dead letters, oldest first (no header values, no bodies read).
    pub fn list_dead(&self, limit: usize) -> Result<Vec<EntrySummary>, SpoolError> {
        self.list(DEAD, limit)
    }

    fn list(&self, table: TableDefinition<u64, &[u8]>, limit: usize) -> Result<Vec<EntrySummary>, SpoolError> {
        self.read(|tx| {
            let t = tx.open_table(table)?;
            let mut out = Vec::new();
            for row in t.iter()?.take(limit) {
                let (id, value) = row?;
                let id = id.value();
                let head = Head::decode(id, value.value()).map_or_else(|why| unreadable(id, &why), |(h, _)| h);
                out.push(head.summary());
            }
            Ok(out)
        })
    }

    /// Puts a dead letter back in the queue, in its original place (by id), with its
    /// attempts reset.
    pub fn requeue(&self, id: u64) -> Result<(), SpoolError> {
        let change = self.write(|tx| {
            let Some(raw) = tx.open_table(DEAD)?.remove(id)?.map(|v| v.value().to_vec()) else {
                return Ok(None);
            };
            let bytes = match Head::decode(id, &raw) {
                Ok((head, None)) => Head { attempts: 0, dead_at_ms: None, ..head }.encode(),
                _ => raw.clone(),
            };
            let mut pending = tx.open_table(PENDING)?;
            pending.insert(id, bytes.as_slice())?;
            Ok(Some((raw.len() as u64, bytes.len() as u64, oldest(&pending)?, self.lane_of(id, &bytes))))
        })?;
        let Some((old, new, oldest, lane)) = change else { return Err(SpoolError::NotFound(id)) };
        self.state().lanes.insert(id, lane);
        self.account(Change {
            pending_added: 1,
            dead_removed: 1,
            bytes_added: new.saturating_sub(old),
            bytes_removed: old.saturating_sub(new),
            oldest_pending: Some(oldest),
            ..Change::default()
        });
        // A requeue frees nothing: the bound still holds.
        Ok(())
    }

    /// Deletes a dead letter for good.
    pub fn drop_dead(&self, id: u64) -> Result<(), SpoolError> {
        let removed = self.write(|tx| remove_dead(tx, id))?;
        let Some(bytes) = removed else { return Err(SpoolError::NotFound(id)) };
        self.account(Change { dead_removed: 1, bytes_removed: bytes, ..Change::default() });
        Ok(())
    }

    /// Deletes the dead letters older than `dead_letter_ttl` at `now_ms` (at most
    /// `max` in one transaction); returns how many.
    pub fn expire_dead(&self, now_ms: u64, max: usize) -> Result<u64, SpoolError> {
        let ttl = self.limits().dead_letter_ttl.as_millis() as u64;
        let (count, bytes) = self.write(|tx| {
            let expired: Vec<u64> = {
                let dead = tx.open_table(DEAD)?;
                let mut out = Vec::new();
                for row in dead.iter()? {
                    let (id, value) = row?;
                    let id = id.value();
                    let died = match Head::decode(id, value.value()) {
                        Ok((h, _)) => h.dead_at_ms.unwrap_or(h.entry.accepted_at_ms),
                        Err(_) => 0,
                    };
                    if died.saturating_add(ttl) <= now_ms {
                        out.push(id);
                        if out.len() >= max {
                            break;
                        }
                    }
                }
                out
            };
            let mut bytes = 0;
            for &id in &expired {
                bytes += remove_dead(tx, id)?.unwrap_or(0);
            }
            Ok((expired.len() as u64, bytes))
        })?;
        if count > 0 {
            self.account(Change { dead_removed: count, bytes_removed: bytes, ..Change::default() });
        }
        Ok(count)
    }
}

/// What one transaction changed in [`SpoolStats`].
#[derive(Default)]
struct Change {
    pending_added: u64,
    pending_removed: u64,
    dead_added: u64,
    dead_removed: u64,
    bytes_added: u64,
    bytes_removed: u64,
    /// The new oldest pending entry, when the transaction looked.
    oldest_pending: Option<Option<u64>>,
}

/// The lane of entries that cannot be read: never held, so they are set aside at once.
pub const UNREADABLE: u64 = 0;

/// Pending ids by lane, both ways.
#[derive(Default)]
struct LaneIndex {
    by_lane: std::collections::BTreeSet<(u64, u64)>,
    by_id: std::collections::HashMap<u64, u64>,
}

impl LaneIndex {
    fn insert(&mut self, id: u64, lane: u64) {
        if let Some(old) = self.by_id.insert(id, lane) {
            self.by_lane.remove(&(old, id));
        }
        self.by_lane.insert((lane, id));
    }

    fn remove(&mut self, id: u64) {
        if let Some(lane) = self.by_id.remove(&id) {
            self.by_lane.remove(&(lane, id));
        }
    }

    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The oldest entry of a lane not in `held`: one step per lane, jumping from each
    /// lane's first entry to the next lane.
    fn first_free(&self, held: &std::collections::HashSet<u64>) -> Option<(u64, u64)> {
        let mut best: Option<(u64, u64)> = None;
        let mut next = self.by_lane.first().copied();
        while let Some((lane, id)) = next {
            if !held.contains(&lane) && best.is_none_or(|(b, _)| id < b) {
                best = Some((id, lane));
            }
            next = lane.checked_add(1).and_then(|l| self.by_lane.range((l, 0)..).next().copied());
        }
        best
    }
}

/// A dead head standing for an entry that cannot be read.
fn unreadable(id: u64, why: &str) -> Head {
    let entry = Entry {
        id,
        operation: "unknown".into(),
        method: "unknown".into(),
        path_and_query: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
        unique_id: None,
        accepted_at_ms: 0,
        last_error: Some(format!("unreadable spooled request: {why}")),
    };
    Head { entry, attempts: 0, dead_at_ms: None }
}

/// Removes a dead letter and its body; the bytes it held.
fn remove_dead(tx: &redb::WriteTransaction, id: u64) -> Result<Option<u64>, redb::Error> {
    let Some(head) = tx.open_table(DEAD)?.remove(id)?.map(|v| v.value().len() as u64) else { return Ok(None) };
    let body = tx.open_table(BODIES)?.remove(id)?.map_or(0, |v| v.value().len() as u64);
    Ok(Some(head + body))
}

/// When the first pending entry was accepted: a v2 head has it in its first bytes (no
/// decoding); a legacy one is parsed.
fn oldest(pending: &impl ReadableTable<u64, &'static [u8]>) -> Result<Option<u64>, redb::Error> {
    let Some((id, v)) = pending.first()? else { return Ok(None) };
    let bytes = v.value();
    Ok(match bytes.first() {
        Some(&HEAD_V2) => bytes.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes),
        _ => Head::decode(id.value(), bytes).ok().map(|(h, _)| h.entry.accepted_at_ms),
    })
}

/// Creates the tables and counts what they hold (lengths only: no entry is decoded
/// but the oldest pending one).
fn prepare(db: &Database) -> Result<SpoolStats, redb::Error> {
    let tx = db.begin_write()?;
    for t in [PENDING, DEAD, BODIES] {
        tx.open_table(t)?;
    }
    tx.open_table(META)?;
    tx.commit()?;
    let tx = db.begin_read()?;
    let mut stats = SpoolStats::default();
    for t in [PENDING, DEAD, BODIES] {
        let table = tx.open_table(t)?;
        for row in table.iter()? {
            stats.bytes += row?.1.value().len() as u64;
        }
    }
    let pending = tx.open_table(PENDING)?;
    stats.pending = pending.len()?;
    stats.dead = tx.open_table(DEAD)?.len()?;
    stats.oldest_pending_ms = oldest(&pending)?;
    Ok(stats)
}

/// The dead-letter admin routes, for the admin listener to mount:
/// `GET /spool` (counts, bytes, state and the oldest pending), `GET /spool/dead`,
/// `POST /spool/dead/{id}/requeue`, `DELETE /spool/dead/{id}`. Returns the status and a
/// JSON body, or `None` for a path that is not the spool's. Listing reads heads only.
pub fn admin(spool: &Spool, method: &http::Method, path: &str) -> Option<(http::StatusCode, serde_json::Value)> {
    use http::{Method, StatusCode};
    use serde_json::json;
    let rest = path.strip_prefix("/spool")?;
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (method, parts.as_slice()) {
        (&Method::GET, []) => {
            // The counts come from memory: shown even while the file cannot be read.
            let (pending, unreadable) = match spool.list_pending(100) {
                Ok(pending) => (pending, None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            let health = spool.health();
            Ok(json!({"pending": health.pending, "dead": health.dead, "bytes": health.bytes,
                "max_bytes": health.max_bytes, "max_entries": health.max_entries,
                "status": health.status, "error": health.error.or(unreadable), "oldest_pending": pending}))
        }
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
        Err(e @ SpoolError::Unavailable { .. }) => (StatusCode::SERVICE_UNAVAILABLE, json!({"error": e.to_string()})),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string()})),
    })
}

#[cfg(test)]
mod tests;
