//! The exchange with Klaviyo, one service because its parts cooperate too tightly to
//! be layers: wait for a token in every bucket (a requeued request keeps its place),
//! ask the breaker, send; on a 429 pause the bucket and requeue the request at its
//! head; on a 5xx, timeout or connection error back off and go again while repeating
//! is safe, the retry budget allows and the deadline is not passed. A shutdown's
//! drain cuts it short.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::Service;

use super::{BoxFuture, Routed};
use crate::breaker;
use crate::error::ProxyError;
use crate::limiter::{BucketKey, Demand, Denied, Grant, Limiter, Place};
use crate::metrics::RequestOutcome;
use crate::proxy::{header_int, upstream_error, Live, Proxy};
use crate::queue;
use crate::retry::{self, Backoff, Repeat};
use crate::route::Route;
use crate::upstream::UpstreamError;

/// The innermost service: sends the routed request to Klaviyo.
#[derive(Debug, Clone)]
pub struct Exchange {
    proxy: Arc<Proxy>,
}

impl Exchange {
    /// The exchange through `proxy`'s limiter, breaker and upstream.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Exchange { proxy }
    }
}

impl Service<Routed<Bytes>> for Exchange {
    type Response = Response<Incoming>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Incoming>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        // Waiting happens per request, in its bucket's queue, never here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed<Bytes>) -> Self::Future {
        let proxy = self.proxy.clone();
        Box::pin(async move {
            tokio::select! {
                result = proxy.exchange(&routed) => result,
                () = proxy.drain_ends() => Err(ProxyError::Draining),
            }
        })
    }
}

impl Proxy {
    /// Sends a request until it gets an answer worth returning: waits for its token,
    /// asks the breaker, sends; on a 429 pauses the bucket and requeues the request at
    /// its head; on a 5xx, timeout or connection error backs off and goes again while
    /// repeating is safe, the budget allows and the deadline is not passed.
    async fn exchange(&self, routed: &Routed<Bytes>) -> Result<Response<Incoming>, ProxyError> {
        let Routed { call, route, deadline, repeat, .. } = routed;
        let (deadline, repeat) = (*deadline, *repeat);
        let (live, parts, body, record) = (&*call.live, &call.parts, &call.body, &call.record);
        let config = &live.config;
        let label = route.label();
        let limited = config.limits.enabled;
        let backoff = Backoff {
            base: Duration::from_millis(config.retry.base_ms),
            cap: Duration::from_millis(config.retry.cap_ms),
        };
        let mut requeued: Option<Grant> = None;
        // The request's place in line, kept when a 429 requeues it.
        let mut place: Option<Place> = None;
        let mut retries = 0u32;
        let mut rng = fastrand::Rng::new();
        self.budget.deposit(Instant::now(), self.started);
        loop {
            // The limiter: a token in every bucket; a requeued request keeps its place.
            let waited = match requeued.take() {
                Some(grant) => {
                    let queued = Instant::now();
                    queue::wait_for_grant(self.limiter.local(), grant, deadline, label).await?;
                    queued.elapsed()
                }
                None if limited => {
                    let depth = config.queue.max_depth;
                    let admitted = queue::wait(&self.limiter, &route.demands, deadline, depth, label).await?;
                    place = admitted.place;
                    admitted.waited
                }
                None => Duration::ZERO,
            };
            if limited {
                self.metrics.queue_wait(label, route.tier(), waited);
            }
            record.update(|o| {
                o.waited += waited;
                if !o.waited.is_zero() {
                    o.kind = RequestOutcome::Queued;
                }
            });
            // The breaker decides last: it may have opened while the request queued.
            let permit = match config.breaker.enabled {
                true => Some(
                    self.breaker
                        .admit(Instant::now())
                        .map_err(|retry_after| ProxyError::CircuitOpen { retry_after })?,
                ),
                false => None,
            };
            let sent = Instant::now();
            record.update(|o| o.attempts += 1);
            let result = self.upstream.send(parts, body.clone()).await;
            let latency = sent.elapsed();
            record.update(|o| o.upstream = Some(latency));
            let now = Instant::now();
            if let Ok(resp) = &result {
                // Operators see Klaviyo's answers and its own count of what is left.
                let remaining = header_int(resp.headers(), "ratelimit-remaining");
                self.metrics.upstream_response(route, resp.status().as_u16(), latency, remaining);
            }
            let (verdict, failure, reason) = match result {
                Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                    self.record(permit, breaker::Outcome::Success);
                    // Klaviyo's quota is spent (by us or another consumer): the whole
                    // bucket waits for Retry-After, this request at the head of its queue.
                    let cap = Duration::from_millis(config.retry.retry_after_cap_ms);
                    let wait = retry::retry_after_of(resp.headers(), cap)
                        .unwrap_or_else(|| backoff.delay(retries, &mut rng).max(Duration::from_secs(1)));
                    tracing::debug!(operation = label, ?wait, "upstream 429: bucket paused");
                    if !limited {
                        return Ok(resp);
                    }
                    // Boxed, like the feedback below: their Redis calls are large futures that would
                    // otherwise sit in every queued request's state.
                    match Box::pin(self.pause(&route.demands, place, now + wait, now, deadline)).await {
                        Ok(grant) => {
                            self.metrics.retry(label, "throttled");
                            requeued = grant;
                            continue;
                        }
                        Err(denied) => {
                            let (Denied::Deadline { wait: retry_after } | Denied::QueueFull { wait: retry_after }) =
                                denied;
                            return Err(ProxyError::UpstreamThrottled { operation: label, retry_after });
                        }
                    }
                }
                Ok(resp) if resp.status().is_server_error() => {
                    self.record(permit, breaker::Outcome::Failure);
                    (Ok(resp), repeat == Repeat::Safe, "server_error")
                }
                Ok(resp) => {
                    self.record(permit, breaker::Outcome::Success);
                    Box::pin(self.feedback(live, route, &resp, now)).await;
                    return Ok(resp);
                }
                Err(e) => {
                    tracing::warn!(operation = label, error = %e.chain(), "upstream request failed");
                    // A connection that was never made carried nothing: safe to repeat.
                    let never_sent = matches!(&e, UpstreamError::Connect(c) if c.is_connect());
                    let (kind, reason) = match e {
                        UpstreamError::Connect(_) => (breaker::Outcome::ConnectFailure, "connect"),
                        UpstreamError::Timeout(_) => (breaker::Outcome::Failure, "timeout"),
                    };
                    self.record(permit, kind);
                    (Err(upstream_error(e)), repeat == Repeat::Safe || never_sent, reason)
                }
            };
            // Backoff: only a safe repeat, within attempts, budget and deadline.
            let delay = backoff.delay(retries, &mut rng);
            let may = failure && retries + 1 < config.retry.max_attempts.get() && Instant::now() + delay < deadline;
            if !may {
                return verdict;
            }
            if !self.budget.withdraw(Instant::now(), self.started) {
                self.metrics.retry_budget_exhausted(label);
                return verdict;
            }
            retries += 1;
            self.metrics.retry(label, reason);
            tracing::debug!(operation = label, retry = retries, ?delay, "retrying after upstream failure");
            drop(verdict);
            tokio::time::sleep(delay).await;
            // The breaker may have opened during the backoff.
            if let Some(retry_after) = self.breaker_open(live) {
                return Err(ProxyError::CircuitOpen { retry_after });
            }
        }
    }

    pub(crate) fn record(&self, permit: Option<breaker::Permit<'_>>, outcome: breaker::Outcome) {
        if let Some(permit) = permit {
            self.breaker.record(permit, outcome, Instant::now());
        }
    }

    pub(crate) fn breaker_open(&self, live: &Live) -> Option<Duration> {
        if live.config.breaker.enabled {
            self.breaker.open_for(Instant::now())
        } else {
            None
        }
    }

    /// Pauses the request's buckets until `until` (an upstream 429). The local store
    /// requeues the request at the head of its bucket's queue and returns its grant;
    /// with Redis every replica pauses (and the local fallback too, should Redis go
    /// away meanwhile) and the request simply asks again. `Err` when the pause ends
    /// after `deadline`, with the wait.
    pub(crate) async fn pause(
        &self,
        demands: &[Demand],
        place: Option<Place>,
        until: Instant,
        now: Instant,
        deadline: Instant,
    ) -> Result<Option<Grant>, Denied> {
        match &self.limiter {
            Limiter::Local(store) => store.pause_and_requeue(demands, place, until, now, deadline).map(Some),
            Limiter::Shared(_) => {
                let keys: Vec<BucketKey> = demands.iter().map(|d| d.key).collect();
                if let Err(e) = self.limiter.pause(&keys, until).await {
                    tracing::warn!(error = %e, "could not share an upstream pause through Redis");
                }
                let fallback = self.limiter.local();
                if let Ok(head) = fallback.pause_and_requeue(demands, None, until, now, until) {
                    fallback.cancel(&head);
                }
                if until > deadline {
                    Err(Denied::Deadline { wait: until.saturating_duration_since(now) })
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Klaviyo's `RateLimit-Remaining` lowers the proxy's view of the bucket when
    /// another consumer spends the same quota.
    pub(crate) async fn feedback(&self, live: &Live, route: &Route, resp: &Response<Incoming>, now: Instant) {
        let remaining = header_int(resp.headers(), "ratelimit-remaining").and_then(|r| u32::try_from(r).ok());
        let reset =
            header_int(resp.headers(), "ratelimit-reset").and_then(|r| u64::try_from(r).ok()).map(Duration::from_secs);
        let (Some(remaining), Some(demand), true) = (remaining, route.demands.first(), live.config.limits.enabled)
        else {
            return;
        };
        let phantoms = match &self.limiter {
            Limiter::Local(store) => u64::from(store.observe_remaining(demand, remaining, reset, now)),
            Limiter::Shared(_) => {
                let reset = reset.unwrap_or(Duration::from_secs(60));
                self.limiter.correct(demand, remaining, reset).await.unwrap_or(0)
            }
        };
        if phantoms > 0 {
            tracing::debug!(
                operation = route.label(),
                phantoms,
                remaining,
                "upstream reports less quota than expected"
            );
        }
    }
}
