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
use crate::spool::{self, Spool, SpoolError};

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

    /// Replays spooled writes in order, one at a time, through the same limiter and
    /// breaker, taking only tokens no live request waits for. Runs until dropped.
    pub async fn replay(self: Arc<Self>) {
        let Some(spool) = self.spool.clone() else { return };
        let mut rng = fastrand::Rng::new();
        let mut failures = 0u32;
        loop {
            let pause = match self.replay_one(&spool).await {
                Replay::Delivered => {
                    failures = 0;
                    continue;
                }
                Replay::Idle => {
                    // Woken by the next spooled write, or look again in a while.
                    let _ = tokio::time::timeout(Duration::from_millis(500), self.spooled.notified()).await;
                    continue;
                }
                Replay::Wait(d) => d,
                Replay::Failed => {
                    failures += 1;
                    let retry = &self.live().config.retry;
                    let backoff = Backoff {
                        base: Duration::from_millis(retry.base_ms),
                        cap: Duration::from_millis(retry.cap_ms),
                    };
                    backoff.delay(failures.min(10), &mut rng).max(Duration::from_millis(50))
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn replay_one(&self, spool: &Spool) -> Replay {
        // One view of the config per replay, like a request.
        let live = self.live();
        let config = &live.config;
        if !config.upstream.enabled {
            return Replay::Wait(Duration::from_secs(1));
        }
        let reader = spool.clone();
        let entry = match tokio::task::spawn_blocking(move || reader.first_pending()).await {
            Ok(Ok(Some(entry))) => entry,
            Ok(Ok(None)) => return Replay::Idle,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "spool read failed");
                return Replay::Wait(Duration::from_secs(1));
            }
            Err(_) => return Replay::Wait(Duration::from_secs(1)),
        };
        let Some(mut parts) = entry_parts(&entry) else {
            let _ = spool.dead_letter(entry.id, "unreadable spooled request");
            return Replay::Delivered;
        };
        self.resolve(&live, &mut parts).await;
        let route = live.route(&parts);
        let now = Instant::now();
        if let Some(wait) = self.breaker_open(&live) {
            return Replay::Wait(wait.min(Duration::from_secs(1)));
        }
        let permit = if config.breaker.enabled {
            match self.breaker.admit(now) {
                Ok(p) => Some(p),
                Err(wait) => return Replay::Wait(wait.min(Duration::from_secs(1))),
            }
        } else {
            None
        };
        // Below live traffic: only when no live request queues in its buckets here, and
        // only a token free right now (a probe permit dropped unused is given back).
        if config.limits.enabled {
            if route.demands.iter().any(|d| self.store().queued(&d.key) > 0) {
                return Replay::Wait(Duration::from_millis(50));
            }
            if let Err(e) = queue::wait(&self.limiter, &route.demands, now, 0, route.label()).await {
                let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                return Replay::Wait(wait.clamp(Duration::from_millis(10), Duration::from_secs(1)));
            }
        }
        let result = self.upstream.send(&parts, Bytes::from(entry.body.clone())).await;
        let now = Instant::now();
        let finish = |outcome| self.record(permit, outcome);
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
                Replay::Wait(wait)
            }
            // A Cloudflare challenge is about this address, not the write: keep it for later.
            Ok(resp) if retry::is_challenge(resp.status(), resp.headers()) => {
                finish(breaker::Outcome::Success);
                Replay::Failed
            }
            Ok(resp) if resp.status().is_server_error() => {
                finish(breaker::Outcome::Failure);
                Replay::Failed
            }
            Ok(resp) => {
                finish(breaker::Outcome::Success);
                self.feedback(&live, &route, &resp, now).await;
                let status = resp.status();
                let id = entry.id;
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
                Replay::Delivered
            }
            Err(e) => {
                finish(match e {
                    UpstreamError::Connect(_) => breaker::Outcome::ConnectFailure,
                    UpstreamError::Timeout(_) => breaker::Outcome::Failure,
                });
                Replay::Failed
            }
        }
    }
}

/// How one replay attempt went.
enum Replay {
    /// Delivered (or dead-lettered): go on with the next.
    Delivered,
    /// Nothing to replay.
    Idle,
    /// Try again after this long.
    Wait(Duration),
    /// The upstream failed: back off.
    Failed,
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
