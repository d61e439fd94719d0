//! Many events, one bulk job. With `[coalesce] events = true`, a `POST /api/events` is
//! checked ([`event::parse`]), stored durably ([`store::Store`], fsync before the
//! answer) and answered `202` with an empty body — what Klaviyo itself answers — then
//! delivered in `bulk_create_events` jobs of up to 1,000 events, grouped by credential
//! and revision. `create_event` allows 3,500 a minute per account; the bulk endpoint
//! allows 150 jobs of 1,000: up to 40× more events on the same account.
//!
//! Jobs go through the same limiter (the bulk endpoint's own bucket), breaker and
//! retries as client requests ([`Deliver`]), and a job that keeps failing dead-letters its
//! events by the spool's replay rules (`max_attempts`, `max_age`). A job Klaviyo refuses
//! with 400 loses only its bad events: those its error pointers name go to the spool's
//! dead letters, the rest are sent again; without a usable pointer the job is split in
//! halves, down to single events.

pub mod event;
pub mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::metrics::CoalesceMetrics;
use crate::spool::{self, Spool};
pub use store::{Appended, Group, Record, Store, StoreError};

/// Most events in one job (Klaviyo's limit).
pub const MAX_EVENTS: usize = 1000;
/// Largest job body the proxy builds: under Klaviyo's 5 MB with room to spare.
pub const MAX_JOB_BYTES: usize = 4_500_000;
/// Request header naming a client's retry of one event.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Response header marking a coalesced event's answer.
pub const COALESCED: &str = "proxy_coalesced";

/// Jobs in flight per lane: one while the lane fills, a second only for a full job.
const MAX_IN_FLIGHT: usize = 2;
/// JSON around a job's entries.
const JOB_PREFIX: &str = r#"{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":["#;
const JOB_SUFFIX: &str = "]}}}}";

/// The coalescer's settings (checked config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest an event waits for its job to fill.
    pub linger: Duration,
    /// Most undelivered events held; beyond it events are refused (503).
    pub max_pending: u64,
    /// `/health` degrades when the oldest undelivered event is older than this.
    pub max_lag: Duration,
}

/// What Klaviyo answered a job.
#[derive(Debug)]
pub struct Delivery {
    /// The status.
    pub status: StatusCode,
    /// The body (Klaviyo's errors on a 400).
    pub body: Bytes,
}

/// Sends a job upstream through the proxy's own limiter, breaker and retries.
pub trait Deliver: Send + Sync + 'static {
    /// Sends one `POST /api/event-bulk-create-jobs` with this credential and revision.
    fn deliver(
        self: Arc<Self>,
        group: &Group,
        body: Bytes,
    ) -> impl Future<Output = Result<Delivery, ProxyError>> + Send;
}

/// The coalescer: the accepting side (called by the request path) and the batcher
/// ([`Coalescer::run`]).
pub struct Coalescer {
    store: Store,
    spool: Spool,
    settings: Settings,
    metrics: CoalesceMetrics,
    to_batcher: mpsc::UnboundedSender<Record>,
    from_accept: Mutex<Option<mpsc::UnboundedReceiver<Record>>>,
    /// Undelivered events found in the file at start, for the batcher.
    recovered: Mutex<Vec<Record>>,
    pending: AtomicU64,
    /// Arrival times (ms since the epoch) of undelivered events, for the lag.
    oldest: Mutex<std::collections::BTreeMap<u64, u64>>,
    draining: AtomicBool,
    drain: Notify,
    /// Delivered events whose removal from the file failed (a full disk): removed with
    /// the next removal or within a second, so their room comes back without a restart.
    unremoved: Mutex<Vec<u64>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").field("store", &self.store).field("pending", &self.pending).finish_non_exhaustive()
    }
}

/// Why the coalescer could not take an event; the request path answers with it.
pub type Refusal = ProxyError;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Coalescer {
    /// Opens the store at `path`; dead letters go to `spool`.
    pub fn open(
        path: &std::path::Path,
        spool: Spool,
        settings: Settings,
        metrics: CoalesceMetrics,
    ) -> Result<Coalescer, StoreError> {
        let (store, recovered) = Store::open(path)?;
        let (to_batcher, from_accept) = mpsc::unbounded_channel();
        let oldest = recovered.iter().map(|r| (r.id, r.accepted_at_ms)).collect();
        let c = Coalescer {
            store,
            spool,
            settings,
            metrics,
            to_batcher,
            from_accept: Mutex::new(Some(from_accept)),
            pending: AtomicU64::new(recovered.len() as u64),
            recovered: Mutex::new(recovered),
            oldest: Mutex::new(oldest),
            draining: AtomicBool::new(false),
            drain: Notify::new(),
            unremoved: Mutex::new(Vec::new()),
        };
        c.refresh_gauges();
        Ok(c)
    }

    /// Checks, stores and queues one `create_event` body; `Ok` is the id to answer
    /// `202` with. Nothing is stored when the event is refused.
    pub async fn accept(&self, headers: &HeaderMap, body: &[u8]) -> Result<u64, Refusal> {
        let event = event::parse(body, crate::retry::new_unique_id)
            .map_err(|e| ProxyError::InvalidEvent { pointer: e.pointer, detail: e.detail })?;
        if event.entry.len() + JOB_PREFIX.len() + JOB_SUFFIX.len() > MAX_JOB_BYTES {
            return Err(ProxyError::InvalidEvent {
                pointer: "/data".into(),
                detail: format!("The event is larger than a bulk job can carry ({MAX_JOB_BYTES} bytes)."),
            });
        }
        let authorization = headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
        let revision = headers.get("revision").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        if self.pending.load(Ordering::Acquire) >= self.settings.max_pending {
            self.metrics.event("refused");
            return Err(ProxyError::CoalesceFull { retry_after: self.settings.linger.max(Duration::from_secs(1)) });
        }
        let idempotency = match headers.get(IDEMPOTENCY_HEADER) {
            Some(key) if key.len() > MAX_IDEMPOTENCY_KEY || key.is_empty() => {
                return Err(ProxyError::BadRequest(format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes")))
            }
            // Keyed by the credential too: two tenants' keys never collide.
            Some(key) => Some(idempotency_key(&authorization, key.as_bytes())),
            None => None,
        };
        let record = Record {
            id: 0,
            group: Group { authorization, revision },
            unique_id: event.unique_id,
            identity: event.identity,
            entry: event.entry,
            accepted_at_ms: now_ms(),
        };
        let accepted_at = record.accepted_at_ms;
        let kept = record.clone();
        match self.store.append(record, idempotency).await {
            Ok(Appended::New(id)) => {
                self.pending.fetch_add(1, Ordering::AcqRel);
                lock(&self.oldest).insert(id, accepted_at);
                self.metrics.event("accepted");
                let _ = self.to_batcher.send(Record { id, ..kept });
                self.refresh_gauges();
                Ok(id)
            }
            Ok(Appended::Repeat(id)) => {
                self.metrics.event("repeated");
                Ok(id)
            }
            Err(e) => {
                tracing::error!(error = %e, "coalesced event could not be stored");
                Err(match e {
                    // A full disk: the file is reopened within a second.
                    StoreError::Io { .. } => ProxyError::StoreUnavailable {
                        store: "coalesce store",
                        retry_after: crate::durable::REOPEN_EVERY,
                    },
                    StoreError::Closed => ProxyError::Internal,
                })
            }
        }
    }

    /// Whether delivery lags more than `coalesce.max_lag_ms`, and the oldest age.
    pub fn lag(&self) -> (bool, Duration) {
        let age = self.oldest_age();
        (age > self.settings.max_lag, age)
    }

    /// Why the store cannot be written now (a full disk), if it cannot.
    pub fn write_error(&self) -> Option<String> {
        self.store.write_error()
    }

    /// Undelivered events.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    fn oldest_age(&self) -> Duration {
        // Ids grow with arrival, so the smallest id left is the oldest event.
        let oldest = lock(&self.oldest).first_key_value().map(|(_, at)| *at);
        oldest.map_or(Duration::ZERO, |at| Duration::from_millis(now_ms().saturating_sub(at)))
    }

    fn refresh_gauges(&self) {
        self.metrics.pending.set(i64::try_from(self.pending()).unwrap_or(i64::MAX));
        self.metrics.oldest_age_seconds.set(self.oldest_age().as_secs() as i64);
    }

    /// Sends every lane's events now, without waiting for jobs to fill (shutdown).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.notify_one();
    }

    /// The batcher: fills a job per lane and sends it when it holds 1,000 events, would
    /// pass ~4.5 MB, has waited `linger`, or at shutdown. Runs until dropped.
    pub async fn run<D: Deliver>(self: Arc<Self>, deliver: Arc<D>) {
        let Some(mut incoming) = lock(&self.from_accept).take() else { return };
        let started = Instant::now();
        let mut lanes: HashMap<Group, Lane> = HashMap::new();
        for record in std::mem::take(&mut *lock(&self.recovered)) {
            lanes.entry(record.group.clone()).or_default().push(record, started);
        }
        let mut jobs: JoinSet<(Group, JobOutcome)> = JoinSet::new();
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            let now = Instant::now();
            let draining = self.draining.load(Ordering::Acquire);
            let mut wake: Option<Instant> = None;
            for (group, lane) in lanes.iter_mut() {
                while let Some(when) = lane.ready_at(self.settings.linger, draining) {
                    if when > now {
                        wake = Some(wake.map_or(when, |w| w.min(when)));
                        break;
                    }
                    let batch = lane.take_batch();
                    if batch.is_empty() {
                        break;
                    }
                    lane.in_flight += 1;
                    self.metrics.batch_size.observe(batch.len() as f64);
                    self.metrics.events("batched", batch.len() as u64);
                    let (deliver, group, metrics) = (deliver.clone(), group.clone(), self.metrics.clone());
                    jobs.spawn(async move {
                        let outcome = send_job(&deliver, &group, batch, &metrics).await;
                        (group, outcome)
                    });
                }
            }
            lanes.retain(|_, lane| !lane.records.is_empty() || lane.in_flight > 0);
            let sleep = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(record) = incoming.recv() => {
                    lanes.entry(record.group.clone()).or_default().push(record, Instant::now());
                    // Take whatever else arrived, so a burst fills one job, not many.
                    while let Ok(record) = incoming.try_recv() {
                        lanes.entry(record.group.clone()).or_default().push(record, Instant::now());
                    }
                }
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    if let Ok((group, outcome)) = done {
                        self.settle(&mut lanes, group, outcome).await;
                    }
                }
                () = sleep => {}
                () = self.drain.notified() => {}
                _ = gauges.tick() => {
                    self.refresh_gauges();
                    self.remove_delivered(Vec::new()).await;
                }
            }
        }
    }

    /// Removes delivered (or dead-lettered) events from the file, with those whose
    /// removal failed before; what fails again is kept for the next try.
    async fn remove_delivered(&self, mut ids: Vec<u64>) {
        ids.append(&mut lock(&self.unremoved));
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.store.remove(ids.clone()).await {
            // Until removed they hold room in the file, and a restart sends them again
            // (their unique_ids make Klaviyo drop the repeats).
            tracing::error!(error = %e, events = ids.len(), "delivered events could not be removed from the coalesce store yet");
            lock(&self.unremoved).append(&mut ids);
        }
    }

    /// Applies what a job came back with: forget the delivered, dead-letter the
    /// refused, put the rest back at the front of its lane and back off.
    async fn settle(&self, lanes: &mut HashMap<Group, Lane>, group: Group, mut outcome: JobOutcome) {
        if let Some(reason) = outcome.failed.take() {
            self.give_up_failing(lanes.entry(group.clone()).or_default(), &mut outcome, &reason);
        }
        let mut done: Vec<u64> = outcome.delivered.clone();
        let mut dead_lettered = 0;
        for (record, reason) in std::mem::take(&mut outcome.dead) {
            if self.dead_letter(&record, &reason).await {
                done.push(record.id);
                dead_lettered += 1;
            } else {
                // Not in the dead letters: it stays undelivered, and goes again after a
                // backoff, like a failed job.
                outcome.retry.push(record);
            }
        }
        if let Some(lane) = lanes.get_mut(&group) {
            for id in &done {
                lane.attempts.remove(id);
            }
        }
        self.metrics.events("delivered", outcome.delivered.len() as u64);
        self.metrics.events("dead_lettered", dead_lettered);
        self.remove_delivered(done.clone()).await;
        {
            let mut oldest = lock(&self.oldest);
            for id in &done {
                oldest.remove(id);
            }
        }
        self.pending.fetch_sub(done.len() as u64, Ordering::AcqRel);
        let lane = lanes.entry(group).or_default();
        lane.in_flight = lane.in_flight.saturating_sub(1);
        if outcome.retry.is_empty() {
            lane.failures = 0;
        } else {
            lane.failures += 1;
            let backoff = Duration::from_millis(100u64 << lane.failures.min(6)).min(Duration::from_secs(5));
            lane.retry_at = Some(Instant::now() + backoff);
            let now = Instant::now();
            for record in outcome.retry.into_iter().rev() {
                lane.put_back(record, now);
            }
        }
        self.refresh_gauges();
    }

    /// Moves a refused event to the spool's dead letters as the single `create_event`
    /// it was, so the existing admin routes list and requeue it.
    /// Events whose jobs failed the spool's `max_attempts` times, or that are older than
    /// its `max_age`, leave the retries for the dead letters — the rule the spool's
    /// replay applies to every other deferred write.
    fn give_up_failing(&self, lane: &mut Lane, outcome: &mut JobOutcome, reason: &str) {
        let limits = self.spool.limits();
        let now = now_ms();
        let mut keep = Vec::with_capacity(outcome.retry.len());
        for record in outcome.retry.drain(..) {
            let attempts = lane.attempts.entry(record.id).or_default();
            *attempts += 1;
            let age = Duration::from_millis(now.saturating_sub(record.accepted_at_ms));
            if limits.gives_up(*attempts, age) {
                let why = if age >= limits.max_age {
                    format!("older than {} s and failing: {reason}", limits.max_age.as_secs())
                } else {
                    format!("{attempts} failed attempts: {reason}")
                };
                lane.attempts.remove(&record.id);
                outcome.dead.push((record, why));
            } else {
                keep.push(record);
            }
        }
        outcome.retry = keep;
    }

    async fn dead_letter(&self, record: &Record, reason: &str) -> bool {
        let Some(body) = single_event_body(&record.entry) else {
            tracing::error!(id = record.id, "a coalesced event could not be turned back into create_event");
            return false;
        };
        let mut headers = vec![
            ("content-type".to_string(), b"application/vnd.api+json".to_vec()),
            ("revision".to_string(), record.group.revision.as_bytes().to_vec()),
        ];
        if !record.group.authorization.is_empty() {
            headers.push(("authorization".to_string(), record.group.authorization.clone()));
        }
        let entry = spool::Entry {
            id: 0,
            operation: "create_event".into(),
            method: "POST".into(),
            path_and_query: "/api/events".into(),
            headers,
            body,
            unique_id: Some(record.unique_id.clone()),
            accepted_at_ms: record.accepted_at_ms,
            last_error: None,
        };
        let spool = self.spool.clone();
        let reason = reason.to_string();
        let stored = tokio::task::spawn_blocking(move || spool.append_dead(entry, &reason).map(drop)).await;
        match stored {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a refused coalesced event could not be dead-lettered");
                false
            }
            Err(_) => false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn idempotency_key(authorization: &[u8], key: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(authorization);
    ctx.update(&[0]);
    ctx.update(key);
    ctx.finish().as_ref().to_vec()
}

/// One lane: the undelivered events of one (credential, revision), in order.
#[derive(Default)]
struct Lane {
    records: VecDeque<Record>,
    /// Entry bytes in `records`.
    bytes: usize,
    /// When the oldest event of the lane arrived.
    since: Option<Instant>,
    in_flight: usize,
    failures: u32,
    retry_at: Option<Instant>,
    /// Failed attempts of events still waiting (in memory: a restart starts them over,
    /// the age bound still holds).
    attempts: HashMap<u64, u32>,
}

impl Lane {
    fn push(&mut self, record: Record, now: Instant) {
        self.bytes += record.entry.len() + 1;
        self.since.get_or_insert(now);
        self.records.push_back(record);
    }

    /// Returns an event to the head of the lane, to go first in the next job.
    fn put_back(&mut self, record: Record, now: Instant) {
        self.bytes += record.entry.len() + 1;
        self.since = Some(self.since.map_or(now, |s| s.min(now)));
        self.records.push_front(record);
    }

    fn full(&self) -> bool {
        self.records.len() >= MAX_EVENTS || self.bytes + JOB_PREFIX.len() + JOB_SUFFIX.len() >= MAX_JOB_BYTES
    }

    /// When the lane may send its next job: at once when a job is full; after
    /// `linger` otherwise, and only while no job of the lane is in flight (so a lane
    /// fills while its job waits for a token); after a failure's backoff.
    fn ready_at(&self, linger: Duration, draining: bool) -> Option<Instant> {
        let since = self.since?;
        if self.records.is_empty() {
            return None;
        }
        let base = if self.full() {
            (self.in_flight < MAX_IN_FLIGHT).then_some(since)?
        } else if self.in_flight == 0 {
            if draining {
                since
            } else {
                since + linger
            }
        } else {
            return None;
        };
        Some(self.retry_at.map_or(base, |r| r.max(base)))
    }

    /// Takes the next job: events in order up to 1,000 and ~4.5 MB, leaving for later
    /// any event whose (profile, metric, unique_id) is already in this job.
    fn take_batch(&mut self) -> Vec<Record> {
        let mut batch = Vec::new();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut bytes = JOB_PREFIX.len() + JOB_SUFFIX.len();
        let mut kept = VecDeque::new();
        while let Some(record) = self.records.pop_front() {
            if batch.len() >= MAX_EVENTS || bytes + record.entry.len() + 1 > MAX_JOB_BYTES {
                self.records.push_front(record);
                break;
            }
            if !seen.insert((record.identity.clone(), record.unique_id.clone())) {
                kept.push_back(record);
                continue;
            }
            bytes += record.entry.len() + 1;
            self.bytes -= record.entry.len() + 1;
            batch.push(record);
        }
        while let Some(record) = kept.pop_back() {
            self.records.push_front(record);
        }
        if batch.is_empty() && !self.records.is_empty() && bytes + self.records[0].entry.len() + 1 > MAX_JOB_BYTES {
            // An event too large for any job cannot happen (events are capped below
            // it), but never spin on one.
            let record = self.records.pop_front().expect("non-empty");
            self.bytes -= record.entry.len() + 1;
            batch.push(record);
        }
        self.since = (!self.records.is_empty()).then(|| self.since.unwrap_or_else(Instant::now));
        if self.records.is_empty() {
            self.since = None;
        }
        self.retry_at = None;
        batch
    }
}

/// What became of one job's events.
#[derive(Debug, Default)]
struct JobOutcome {
    delivered: Vec<u64>,
    dead: Vec<(Record, String)>,
    retry: Vec<Record>,
    /// Why the attempt failed, when it counts against the spool's `max_attempts`.
    failed: Option<String>,
}

/// The job body for these events.
pub fn job_body(records: &[Record]) -> Bytes {
    let mut out = String::with_capacity(
        JOB_PREFIX.len() + JOB_SUFFIX.len() + records.iter().map(|r| r.entry.len() + 1).sum::<usize>(),
    );
    out.push_str(JOB_PREFIX);
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&r.entry);
    }
    out.push_str(JOB_SUFFIX);
    Bytes::from(out)
}

/// Sends a job; on a 400 drops what the error pointers name and resends the rest, or
/// halves the job when no pointer helps, down to single events.
async fn send_job<D: Deliver>(
    deliver: &Arc<D>,
    group: &Group,
    batch: Vec<Record>,
    metrics: &CoalesceMetrics,
) -> JobOutcome {
    let mut outcome = JobOutcome::default();
    let mut work = vec![batch];
    while let Some(part) = work.pop() {
        let result = deliver.clone().deliver(group, job_body(&part)).await;
        match result {
            Ok(d) if d.status.is_success() => outcome.delivered.extend(part.iter().map(|r| r.id)),
            Ok(d) if d.status == StatusCode::BAD_REQUEST || d.status == StatusCode::PAYLOAD_TOO_LARGE => {
                let named = refused_entries(&d.body, part.len());
                if !named.is_empty() {
                    let mut rest = Vec::with_capacity(part.len());
                    for (i, record) in part.into_iter().enumerate() {
                        match named.get(&i) {
                            Some(detail) => outcome.dead.push((record, format!("Klaviyo refused the event: {detail}"))),
                            None => rest.push(record),
                        }
                    }
                    if !rest.is_empty() {
                        work.push(rest);
                    }
                } else if part.len() == 1 {
                    let detail = first_detail(&d.body).unwrap_or_else(|| format!("status {}", d.status.as_u16()));
                    let record = part.into_iter().next().expect("one");
                    outcome.dead.push((record, format!("Klaviyo refused the event: {detail}")));
                } else {
                    metrics.splits.inc();
                    let mut first = part;
                    let second = first.split_off(first.len() / 2);
                    work.push(second);
                    work.push(first);
                }
            }
            Ok(d)
                if d.status.is_client_error()
                    && d.status != StatusCode::REQUEST_TIMEOUT
                    && d.status != StatusCode::TOO_MANY_REQUESTS =>
            {
                // 401/403/404: the job as a whole cannot go with this credential.
                let detail = first_detail(&d.body).unwrap_or_default();
                let reason = format!("Klaviyo answered {}: {detail}", d.status.as_u16());
                outcome.dead.extend(part.into_iter().map(|r| (r, reason.clone())));
            }
            Ok(_) | Err(_) => {
                // Klaviyo failing, the breaker open, a deadline out of reach: later.
                if let Err(e) = &result {
                    tracing::debug!(error = %e, events = part.len(), "bulk job not delivered now; will retry");
                }
                // As the spool's replay counts them: only a 5xx or a timeout is a failed
                // attempt; a 429, an open breaker or an unreachable Klaviyo is no fault
                // of the job's.
                outcome.failed = match &result {
                    Ok(d) if d.status.is_server_error() => Some(format!("upstream answered {}", d.status.as_u16())),
                    Err(ProxyError::UpstreamTimeout(_)) => Some("upstream did not answer in time".into()),
                    _ => None,
                };
                outcome.retry.extend(part);
                for rest in work.drain(..).rev() {
                    outcome.retry.extend(rest);
                }
            }
        }
    }
    outcome
}

/// The entries of a job Klaviyo's 400 names, by index, with its detail: pointers of
/// the form `/data/attributes/events-bulk-create/data/<i>/...`.
pub fn refused_entries(body: &[u8], len: usize) -> HashMap<usize, String> {
    let mut named = HashMap::new();
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else { return named };
    let Some(errors) = doc.get("errors").and_then(|e| e.as_array()) else { return named };
    for e in errors {
        let pointer = e.pointer("/source/pointer").and_then(|p| p.as_str()).unwrap_or_default();
        let index = pointer
            .strip_prefix("/data/attributes/events-bulk-create/data/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < len);
        if let Some(i) = index {
            let detail = e.get("detail").and_then(|d| d.as_str()).unwrap_or("invalid event").to_string();
            named.entry(i).or_insert(detail);
        }
    }
    named
}

fn first_detail(body: &[u8]) -> Option<String> {
    let doc = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    doc.pointer("/errors/0/detail").and_then(|d| d.as_str()).map(str::to_string)
}

/// The single `create_event` body a bulk entry came from (for dead letters).
fn single_event_body(entry: &str) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_str(entry).ok()?;
    let profile = v.pointer("/attributes/profile")?.clone();
    let mut attributes = v.pointer("/attributes/events/data/0/attributes")?.as_object()?.clone();
    attributes.insert("profile".into(), profile);
    if let Some(b) = v.pointer("/attributes/backfill") {
        attributes.insert("backfill".into(), b.clone());
    }
    serde_json::to_vec(&serde_json::json!({"data": {"type": "event", "attributes": attributes}})).ok()
}

#[cfg(test)]
mod tests;
