//! Accept now, deliver later: writing a deferrable request to the spool, and the
//! replayer that sends spooled writes once Klaviyo is healthy, in order, through the
//! same limiter and breaker, below live traffic.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{request, Request, Response};
use tokio::time::Instant;

use super::Proxy;
use crate::body::ProxyBody;
use crate::breaker;
use crate::error::ProxyError;
use crate::metrics::RequestOutcome;
use crate::queue;
use crate::retry;
use crate::retry::Backoff;
use crate::spool::{self, Next, Spool, SpoolError};

/// `Retry-After` when the spool is full: replay frees room at Klaviyo's pace.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(30);
/// `Retry-After` when the spool file cannot be written: it is reopened within a second.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);
use crate::stack::Routed;
use crate::upstream::UpstreamError;

impl Proxy {
    /// Writes the request to the spool (synced to disk) and answers 202 with its id;
    /// when the spool cannot take it (full, or its file cannot be written), the 503 to
    /// answer instead: a write is never acknowledged that is not on disk.
    pub(crate) async fn defer(&self, routed: &Routed<Bytes>) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(spool) = self.spool.as_ref() else { return Err(ProxyError::Internal) };
        let Routed { call, route, unique_id, .. } = routed;
        let (parts, body) = (&call.parts, &call.body);
        let entry = spool::Entry {
            id: 0,
            operation: route.label().to_string(),
            method: parts.method.to_string(),
            path_and_query: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
            headers: parts.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
            body: body.to_vec(),
            unique_id: unique_id.clone(),
            accepted_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            last_error: None,
        };
        let id = match spool.append_async(entry).await {
            Ok(id) => id,
            Err(e @ SpoolError::Full(_)) => {
                tracing::warn!(operation = route.label(), error = %e, "spool full: deferrable write refused");
                return Err(ProxyError::SpoolFull { retry_after: FULL_RETRY_AFTER });
            }
            Err(e) => {
                tracing::error!(operation = route.label(), error = %e, "spool write failed: deferrable write refused");
                self.refresh_spool_gauges();
                return Err(ProxyError::SpoolUnavailable { retry_after: UNAVAILABLE_RETRY_AFTER });
            }
        };
        self.spooled.notify_one();
        self.refresh_spool_gauges();
        call.record.update(|o| o.kind = RequestOutcome::Spooled);
        let mut resp = Response::new(crate::body::full(Bytes::new()));
        *resp.status_mut() = http::StatusCode::ACCEPTED;
        resp.headers_mut().insert(spool::SPOOL_ID_HEADER, HeaderValue::from(id));
        resp.headers_mut().insert(crate::error::PROXY_ERROR_HEADER, HeaderValue::from_static("proxy_spooled"));
        Ok(resp)
    }

    /// Replays spooled writes one at a time, through the same limiter and breaker,
    /// taking only tokens no live request waits for; each lane (credential and
    /// `company_id`) in order, a lane that must wait never holding up another. Deletes
    /// expired dead letters once a minute. Runs until dropped.
    pub async fn replay(self: Arc<Self>) {
        let Some(spool) = self.spool.clone() else { return };
        let mut lanes = Lanes::new();
        let mut failures = 0u32;
        let mut next_expiry = Instant::now();
        loop {
            if Instant::now() >= next_expiry {
                next_expiry = Instant::now() + EXPIRE_EVERY;
                self.expire_dead_letters(&spool).await;
            }
            let pause = match self.replay_one(&spool, &mut lanes).await {
                Replay::Progress => {
                    failures = 0;
                    continue;
                }
                Replay::Idle => Duration::from_millis(500),
                // Every lane waits: a new write (of another lane, perhaps) wakes it too.
                Replay::Lanes(d) => d,
                Replay::Wait(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                Replay::Failed => {
                    failures += 1;
                    let delay = lanes.backoff(&self.live().config.retry, failures);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let _ = tokio::time::timeout(pause, self.spooled.notified()).await;
        }
    }

    async fn expire_dead_letters(&self, spool: &Spool) {
        let reader = spool.clone();
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        match tokio::task::spawn_blocking(move || reader.expire_dead(now_ms, EXPIRE_MAX)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(expired = n, "expired dead letters deleted (spool.dead_letter_ttl_s)");
                self.refresh_spool_gauges();
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "spool: expiring dead letters failed"),
            Err(_) => {}
        }
    }

    async fn replay_one(&self, spool: &Spool, lanes: &mut Lanes) -> Replay {
        // One view of the config per replay, like a request.
        let live = self.live();
        let config = &live.config;
        if !config.upstream.enabled {
            return Replay::Wait(Duration::from_secs(1));
        }
        // Open for everyone: nothing goes. Open for one account: its lane is held below.
        if let Some(wait) = config.breaker.enabled.then(|| self.breaker.open_for_everyone(Instant::now())).flatten() {
            return Replay::Wait(wait.min(Duration::from_secs(1)));
        }
        let now = Instant::now();
        let held = lanes.held(now);
        let reader = spool.clone();
        let found = tokio::task::spawn_blocking(move || reader.next_pending(&held)).await;
        let queued = match found {
            Ok(Ok(Next::Ready(queued))) => queued,
            Ok(Ok(Next::Empty)) => return Replay::Idle,
            Ok(Ok(Next::Waiting)) => return Replay::Lanes(lanes.next_free(now)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spool read failed");
                return Replay::Wait(Duration::from_secs(1));
            }
            Err(_) => return Replay::Wait(Duration::from_secs(1)),
        };
        let (id, this) = (queued.id, queued.lane);
        let entry = match queued.entry {
            Ok(entry) => entry,
            Err(why) => return self.set_aside(spool, id, format!("unreadable spooled request: {why}")).await,
        };
        let reader = spool.clone();
        let body = match tokio::task::spawn_blocking(move || reader.body(id)).await {
            Ok(Ok(Some(body))) => body,
            Ok(Ok(None)) => return self.set_aside(spool, id, "unreadable spooled request: no body".into()).await,
            _ => return Replay::Wait(Duration::from_secs(1)),
        };
        let Some(mut parts) = entry_parts(&entry) else {
            return self.set_aside(spool, id, "unreadable spooled request: bad method, path or header".into()).await;
        };
        let resolved = self.resolve(&live, &mut parts).await;
        let route = live.route(&parts, resolved);
        let account = route.demands.first().map(|d| d.key.account);
        let now = Instant::now();
        let permit = if config.breaker.enabled {
            match self.breaker.admit_for(now, account) {
                Ok(p) => Some(p),
                // Held for this account (or every probe taken): this lane waits, others go.
                Err(wait) => {
                    lanes.hold(this, now + wait.clamp(Duration::from_millis(10), Duration::from_secs(1)));
                    return Replay::Progress;
                }
            }
        } else {
            None
        };
        // Below live traffic: only when no live request queues in its buckets here, and
        // only a token free right now (a probe permit dropped unused is given back).
        // Either wait holds this lane only.
        if config.limits.enabled {
            if route.demands.iter().any(|d| self.store().queued(&d.key) > 0) {
                lanes.hold(this, now + Duration::from_millis(50));
                return Replay::Progress;
            }
            if let Err(e) = queue::wait(&self.limiter, &route.demands, now, 0, route.label()).await {
                let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                lanes.hold(this, now + wait.clamp(Duration::from_millis(10), Duration::from_secs(1)));
                return Replay::Progress;
            }
        }
        let result = self.upstream.send(&parts, Bytes::from(body)).await;
        let now = Instant::now();
        let finish = |outcome| self.record(permit, outcome, account);
        match result {
            Ok(resp) if resp.status() == http::StatusCode::TOO_MANY_REQUESTS => {
                finish(breaker::Outcome::Success);
                let cap = Duration::from_millis(config.retry.retry_after_cap_ms);
                let wait = super::throttle_wait(resp, cap).await.unwrap_or(Duration::from_secs(1));
                if config.limits.enabled {
                    // Pause the bucket for live traffic too; the replay goes again later.
                    if let Ok(Some(head)) = self.pause(&route.demands, None, now + wait, now, now + wait).await {
                        head.give_back(&self.limiter);
                    }
                }
                lanes.hold(this, now + wait);
                Replay::Progress
            }
            // A Cloudflare challenge is about this address, not the write: keep it for later.
            Ok(resp) if retry::is_challenge(resp.status(), resp.headers()) => {
                finish(breaker::Outcome::Success);
                Replay::Failed
            }
            Ok(resp) if resp.status().is_server_error() => {
                finish(breaker::Outcome::Failure);
                let reason = format!("upstream answered {}", resp.status().as_u16());
                self.attempt_failed(spool, lanes, this, id, reason, config).await
            }
            Ok(resp) => {
                finish(breaker::Outcome::Success);
                self.feedback(&live, &route, crate::header::RateLimit::read(resp.headers()), now).await;
                lanes.clear(this);
                let status = resp.status();
                let spool = spool.clone();
                let done = tokio::task::spawn_blocking(move || {
                    if status.is_client_error() {
                        spool.dead_letter(id, &format!("upstream answered {}", status.as_u16()))
                    } else {
                        spool.delivered(id)
                    }
                })
                .await;
                self.refresh_spool_gauges();
                if !matches!(done, Ok(Ok(()))) {
                    tracing::error!(spool_id = id, "spool update after replay failed");
                    return Replay::Wait(Duration::from_secs(1));
                }
                tracing::debug!(
                    spool_id = id,
                    operation = route.label(),
                    status = status.as_u16(),
                    "spooled write replayed"
                );
                Replay::Progress
            }
            // Not reaching Klaviyo is no fault of the write: every lane backs off.
            Err(UpstreamError::Connect(_)) => {
                finish(breaker::Outcome::ConnectFailure);
                Replay::Failed
            }
            Err(UpstreamError::Timeout(_)) => {
                finish(breaker::Outcome::Failure);
                self.attempt_failed(spool, lanes, this, id, "upstream did not answer in time".into(), config).await
            }
        }
    }

    /// Counts a failed replay (the write goes to the dead letters past
    /// `spool.max_attempts` or `max_age_s`) and holds its lane for a backoff.
    async fn attempt_failed(
        &self,
        spool: &Spool,
        lanes: &mut Lanes,
        this: u64,
        id: u64,
        reason: String,
        config: &crate::config::Config,
    ) -> Replay {
        lanes.fail(this, &config.retry);
        let writer = spool.clone();
        let why = reason.clone();
        match tokio::task::spawn_blocking(move || writer.failed_attempt(id, &why)).await {
            Ok(Ok(true)) => {
                tracing::warn!(spool_id = id, reason = %reason, "spooled write given up: moved to the dead letters");
                self.refresh_spool_gauges();
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!(spool_id = id, error = %e, "spool update after a failed replay failed"),
            Err(_) => {}
        }
        Replay::Progress
    }

    /// Moves an entry that cannot be replayed at all to the dead letters.
    async fn set_aside(&self, spool: &Spool, id: u64, reason: String) -> Replay {
        tracing::error!(spool_id = id, reason = %reason, "spooled write cannot be replayed: moved to the dead letters");
        let writer = spool.clone();
        let moved = tokio::task::spawn_blocking(move || writer.dead_letter(id, &reason)).await;
        self.refresh_spool_gauges();
        if matches!(moved, Ok(Ok(()))) {
            Replay::Progress
        } else {
            Replay::Wait(Duration::from_secs(1))
        }
    }
}

/// How often expired dead letters are deleted, and most deleted at once.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
const EXPIRE_MAX: usize = 10_000;

/// How one replay attempt went.
enum Replay {
    /// Something was done (delivered, dead-lettered, or a lane held): go on.
    Progress,
    /// Nothing to replay.
    Idle,
    /// Pending writes, but every lane holds for at least this long.
    Lanes(Duration),
    /// Nothing may go (kill switch, breaker): try again after this long.
    Wait(Duration),
    /// The upstream could not be reached: every lane backs off.
    Failed,
}

/// Lanes that must wait: until when, and after how many failures in a row.
/// (A lane is one credential and `company_id`, [`Spool::lane`].)
struct Lanes {
    waiting: std::collections::HashMap<u64, (Instant, u32)>,
    rng: fastrand::Rng,
}

impl Lanes {
    fn new() -> Self {
        Lanes { waiting: Default::default(), rng: fastrand::Rng::new() }
    }

    /// The lanes held at `now`. A lane free again forgets its failures a minute later,
    /// so the map holds only lanes with recent trouble.
    fn held(&mut self, now: Instant) -> std::collections::HashSet<u64> {
        self.waiting.retain(|_, (until, failures)| {
            *until > now || (*failures > 0 && now.duration_since(*until) < Duration::from_secs(60))
        });
        self.waiting.iter().filter(|(_, (until, _))| *until > now).map(|(lane, _)| *lane).collect()
    }

    /// How long until the first held lane may go (at least 10 ms, at most 1 s).
    fn next_free(&self, now: Instant) -> Duration {
        let first = self.waiting.values().map(|(until, _)| until.saturating_duration_since(now)).min();
        first.unwrap_or(Duration::from_secs(1)).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn hold(&mut self, lane: u64, until: Instant) {
        let failures = self.waiting.get(&lane).map_or(0, |(_, f)| *f);
        self.waiting.insert(lane, (until, failures));
    }

    /// A failed replay: the lane backs off, longer after each failure in a row.
    fn fail(&mut self, lane: u64, retry: &crate::config::RetryConfig) {
        let failures = self.waiting.get(&lane).map_or(0, |(_, f)| *f) + 1;
        let delay = self.backoff(retry, failures);
        self.waiting.insert(lane, (Instant::now() + delay, failures));
    }

    fn clear(&mut self, lane: u64) {
        self.waiting.remove(&lane);
    }

    fn backoff(&mut self, retry: &crate::config::RetryConfig, failures: u32) -> Duration {
        let backoff = Backoff { base: Duration::from_millis(retry.base_ms), cap: Duration::from_millis(retry.cap_ms) };
        backoff.delay(failures.min(10), &mut self.rng).max(Duration::from_millis(50))
    }
}

/// The request head of a spooled entry.
fn entry_parts(entry: &spool::Entry) -> Option<request::Parts> {
    let (mut parts, ()) =
        Request::builder().method(entry.method.as_str()).uri(entry.path_and_query.as_str()).body(()).ok()?.into_parts();
    for (name, value) in &entry.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        let mut value = HeaderValue::from_bytes(value).ok()?;
        value.set_sensitive(name == header::AUTHORIZATION);
        parts.headers.append(name, value);
    }
    Some(parts)
}

impl Proxy {
    /// After an operator changed the spool (requeue, drop): refresh its gauges and
    /// wake the replayer.
    pub fn spool_changed(&self) {
        self.refresh_spool_gauges();
        self.spooled.notify_one();
    }

    /// Sets the spool gauges: depth, dead letters, age of the oldest pending write
    /// (from the spool's counters in memory: nothing is read from disk).
    pub(super) fn refresh_spool_gauges(&self) {
        let Some(spool) = &self.spool else { return };
        let m = &self.metrics;
        let stats = spool.stats();
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.spool_depth.set(gauge(stats.pending));
        m.spool_dead_letters.set(gauge(stats.dead));
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let age = stats.oldest_pending_ms.map_or(0, |at| now_ms.saturating_sub(at) / 1000);
        m.spool_oldest_age_seconds.set(gauge(age));
    }
}
