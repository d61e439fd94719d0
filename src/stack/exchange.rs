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
use http::{request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::Service;

use super::{BoxFuture, Here, Record, Routed};
use crate::breaker;
use crate::error::ProxyError;
use crate::header::RateLimit;
use crate::limiter::ramp::{self, Pass};
use crate::limiter::{BucketId, Demand, Denied, Grant, Limiter, Place};
use crate::metrics::RequestOutcome;
use crate::proxy::{throttle_wait, upstream_error, Live, Proxy};
use crate::queue;
use crate::retry::{self, Backoff, Repeat};
use crate::route::Route;
use crate::upstream::{Upstream, UpstreamError};

/// The innermost service: sends the routed request to Klaviyo.
#[derive(Debug, Clone)]
pub struct Exchange {
    proxy: Here,
    /// Shared by the clones of the stack on one runtime (an `Upstream` clone is many).
    upstream: Arc<Upstream>,
}

impl Exchange {
    /// The exchange through `proxy`'s limiter and breaker and the `upstream` pool
    /// (one per runtime, so a request and its upstream connection share a thread).
    pub fn new(proxy: Arc<Proxy>, upstream: Upstream) -> Self {
        Exchange { proxy: Here::new(proxy), upstream: Arc::new(upstream) }
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
        let (proxy, upstream) = (self.proxy.clone(), self.upstream.clone());
        let sending = Sending::from(routed);
        Box::pin(async move {
            tokio::select! {
                result = proxy.exchange(&sending, &upstream) => result,
                () = proxy.drain_ends() => Err(ProxyError::Draining),
            }
        })
    }
}

/// What the exchange keeps of a routed request: every queued request holds it, so not
/// what the stages before were done with (the account they resolved, the checklist's
/// view, the event's id: 104 bytes).
#[derive(Debug)]
pub(crate) struct Sending {
    pub parts: request::Parts,
    pub body: Bytes,
    pub live: Arc<Live>,
    pub record: Record,
    pub route: Route,
    pub deadline: Instant,
    pub repeat: Repeat,
}

impl From<Routed<Bytes>> for Sending {
    fn from(routed: Routed<Bytes>) -> Self {
        let Routed { call, route, deadline, repeat, .. } = routed;
        Sending { parts: call.parts, body: call.body, live: call.live, record: call.record, route, deadline, repeat }
    }
}

/// What a request carries from one attempt to the next.
struct Tries {
    /// A request that met a 429: its place, and its pass if it is the ramp's probe
    /// (boxed: rare, and the Redis store's place is large).
    requeued: Option<Box<(queue::Requeued, Option<Pass>)>>,
    /// The request's place in line, kept when a 429 requeues it.
    place: Option<Place>,
    retries: u32,
    rng: fastrand::Rng,
}

impl Proxy {
    /// Sends a request until it gets an answer worth returning: waits for its token,
    /// asks the breaker, sends; on a 429 pauses the bucket and requeues the request at
    /// its head; on a 5xx, timeout or connection error backs off and goes again while
    /// repeating is safe, the budget allows and the deadline is not passed.
    ///
    /// A queued request spends its life in this future's wait, so only the wait's state
    /// is inline; one attempt's (the send, a 429's pause, the feedback, a backoff) is
    /// boxed apart and allocated only while the request is in flight.
    #[allow(clippy::manual_async_fn, reason = "an `async fn` keeps its arguments twice in its state")]
    fn exchange<'a>(
        &'a self,
        sending: &'a Sending,
        upstream: &'a Upstream,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, ProxyError>> + Send + 'a {
        async move {
            // Read through `sending` at each use rather than kept in locals: every queued
            // request holds this state, and locals live across the waits.
            let limited = sending.live.config.limits.enabled;
            let mut tries = Tries { requeued: None, place: None, retries: 0, rng: fastrand::Rng::new() };
            // Its turn at a ramp's gate, kept when a 429 sends it through the gate again.
            let arrived = Instant::now();
            self.budget.deposit(arrived, self.started);
            loop {
                // The limiter: a token in every bucket; a requeued request keeps its place.
                // After a 429 the local store's bucket ramps: a probe first, then 1, 2, 4, ….
                let config = &sending.live.config;
                let depth = config.queue.max_depth;
                // A connection in hand before the token: a token taken before a handshake
                // would be stamped a handshake before the request reaches Klaviyo (see
                // `upstream::pool`). Only while the breaker is closed: open, it answers at
                // once; half-open, only its probe may reach Klaviyo.
                let closed = !config.breaker.enabled || self.breaker.phase() == breaker::Phase::Closed;
                // Boxed: held through the wait, it would be 72 bytes of every queued
                // request's state; boxed, they fit a smaller allocation (see the size
                // test below).
                let lease = match limited && closed {
                    true => upstream.lease().await.map(Box::new),
                    false => None,
                };
                let (waited, pass) = match &self.limiter {
                    Limiter::Local(store) if limited => {
                        let (admitted, pass) = ramp::wait(
                            store,
                            &self.ramps,
                            arrived,
                            &sending.route.demands,
                            self.local_requeued(tries.requeued.take()),
                            sending.deadline,
                            depth,
                            sending.route.label(),
                        )
                        .await?;
                        tries.place = admitted.place.or(tries.place);
                        (admitted.waited, Some(pass))
                    }
                    _ if tries.requeued.is_some() => {
                        let (kept, _) = *tries.requeued.take().expect("requeued");
                        // Boxed: only a request that met a 429 comes here, and the wait
                        // for the shared store is the largest of the exchange's states.
                        (
                            Box::pin(queue::wait_requeued(
                                &self.limiter,
                                kept,
                                &sending.route.demands,
                                sending.deadline,
                                sending.route.label(),
                            ))
                            .await?,
                            None,
                        )
                    }
                    _ if limited => {
                        let admitted = queue::wait(
                            &self.limiter,
                            &sending.route.demands,
                            sending.deadline,
                            depth,
                            sending.route.label(),
                        )
                        .await?;
                        tries.place = admitted.place;
                        (admitted.waited, None)
                    }
                    _ => (Duration::ZERO, None),
                };
                if limited {
                    self.metrics.queue_wait(sending.route.label(), sending.route.tier(), waited);
                }
                sending.record.update(|o| {
                    o.waited += waited;
                    if !o.waited.is_zero() {
                        o.kind = RequestOutcome::Queued;
                    }
                });
                if let Some(answer) = Box::pin(self.attempt(sending, upstream, lease, pass, &mut tries)).await {
                    return answer;
                }
            }
        }
    }

    /// One attempt of a request that has its token: the breaker, the send, and what
    /// its answer means. `None`: go again (requeued after a 429, or after a backoff).
    async fn attempt(
        &self,
        sending: &Sending,
        upstream: &Upstream,
        lease: Option<Box<crate::upstream::Lease>>,
        mut pass: Option<Pass>,
        tries: &mut Tries,
    ) -> Option<Result<Response<Incoming>, ProxyError>> {
        let Sending { parts, body, live, record, route, deadline, repeat } = sending;
        let (deadline, repeat, live) = (*deadline, *repeat, &**live);
        let config = &live.config;
        let label = route.label();
        // The breaker may hold one account only (see `breaker`).
        let account = route.demands.first().map(|d| d.key.account);
        let limited = config.limits.enabled;
        let backoff = Backoff {
            base: Duration::from_millis(config.retry.base_ms),
            cap: Duration::from_millis(config.retry.cap_ms),
        };
        // The breaker decides last: it may have opened while the request queued.
        // Its decision and the send are one instant (one clock read fewer).
        let sent = Instant::now();
        let permit = match config.breaker.enabled {
            true => match self.breaker.admit_for(sent, account) {
                Ok(permit) => Some(permit),
                Err(retry_after) => return Some(Err(ProxyError::CircuitOpen { retry_after })),
            },
            false => None,
        };
        record.update(|o| o.attempts += 1);
        let result = upstream.send_on(lease.map(|l| *l), parts, body.clone()).await;
        let now = Instant::now();
        let latency = now.saturating_duration_since(sent);
        record.update(|o| o.upstream = Some(latency));
        let challenged = result.as_ref().is_ok_and(|r| retry::is_challenge(r.status(), r.headers()));
        let rate = result.as_ref().ok().filter(|_| !challenged).map(|resp| RateLimit::read(resp.headers()));
        if let (Ok(resp), Some(rate)) = (&result, rate) {
            // Operators see Klaviyo's answers and its own count of what is left.
            self.metrics.upstream_response(route, resp.status().as_u16(), latency, rate.remaining);
        }
        let (verdict, failure, reason) = match result {
            // Cloudflare challenges the proxy's address: not Klaviyo failing, not the
            // key, and the same request would meet the same challenge.
            Ok(_) if challenged => {
                self.metrics.upstream_challenge(route, latency);
                self.record(permit, breaker::Outcome::Success, account);
                return Some(Err(ProxyError::UpstreamChallenged));
            }
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                self.record(permit, breaker::Outcome::Success, account);
                // Klaviyo's quota is spent (by us or another consumer): the whole
                // bucket waits for Retry-After, this request at the head of its queue.
                if !limited {
                    return Some(Ok(resp));
                }
                let cap = Duration::from_millis(config.retry.retry_after_cap_ms);
                let wait = throttle_wait(resp, cap)
                    .await
                    .unwrap_or_else(|| backoff.delay(tries.retries, &mut tries.rng).max(Duration::from_secs(1)));
                tracing::debug!(operation = label, ?wait, "upstream 429: bucket paused");
                // The bucket ramps again from one probe: this request, unless another
                // 429 already made one.
                let ramp_cap = route.demands.first().map_or(1, |d| d.windows.as_slice()[0].limit);
                let probe = match (pass.take(), route.demands.first()) {
                    (Some(p), Some(d)) => p.throttled(&self.ramps, d.key, ramp_cap),
                    _ => None,
                };
                return match self.pause(&route.demands, tries.place, now + wait, now, deadline).await {
                    Ok(grant) => {
                        self.metrics.retry(label, "throttled");
                        tries.requeued = grant.map(|g| Box::new((g, probe)));
                        None
                    }
                    Err(denied) => {
                        Some(Err(ProxyError::UpstreamThrottled { operation: label, retry_after: denied.wait() }))
                    }
                };
            }
            Ok(resp) if resp.status().is_server_error() => {
                self.record(permit, breaker::Outcome::Failure, account);
                (Ok(resp), repeat == Repeat::Safe, "server_error")
            }
            Ok(resp) => {
                self.record(permit, breaker::Outcome::Success, account);
                if let Some(pass) = pass.take() {
                    pass.succeeded();
                }
                self.feedback(live, route, rate.unwrap_or_default(), now).await;
                return Some(Ok(resp));
            }
            Err(e) => {
                tracing::warn!(operation = label, error = %e.chain(), "upstream request failed");
                // A connection that was never made carried nothing: safe to repeat.
                let never_sent = matches!(&e, UpstreamError::Connect(c) if c.is_connect());
                let (kind, reason) = match e {
                    UpstreamError::Connect(_) => (breaker::Outcome::ConnectFailure, "connect"),
                    UpstreamError::Timeout(_) => (breaker::Outcome::Failure, "timeout"),
                };
                self.record(permit, kind, account);
                (Err(upstream_error(e)), repeat == Repeat::Safe || never_sent, reason)
            }
        };
        // Backoff: only a safe repeat, within attempts, budget and deadline, and not
        // once this failure opened the breaker (a failed probe's answer goes back
        // now, not as a fail-fast after sleeping).
        let delay = backoff.delay(tries.retries, &mut tries.rng);
        let may = failure
            && tries.retries + 1 < config.retry.max_attempts.get()
            && Instant::now() + delay < deadline
            && self.breaker_open_for(live, account).is_none();
        if !may {
            // A failure that opened the breaker (a failed probe, or the streak's
            // last) answers as the breaker does: 503 with its Retry-After, which
            // the SDKs retry, not a 502 they raise.
            if let (Err(ProxyError::UpstreamUnreachable | ProxyError::UpstreamTimeout(_)), Some(retry_after)) =
                (&verdict, self.breaker_open_for(live, account))
            {
                return Some(Err(ProxyError::CircuitOpen { retry_after }));
            }
            return Some(verdict);
        }
        if !self.budget.withdraw(Instant::now(), self.started) {
            self.metrics.retry_budget_exhausted(label);
            return Some(verdict);
        }
        tries.retries += 1;
        self.metrics.retry(label, reason);
        tracing::debug!(operation = label, retry = tries.retries, ?delay, "retrying after upstream failure");
        drop(verdict);
        tokio::time::sleep(delay).await;
        // The breaker may have opened during the backoff.
        if let Some(retry_after) = self.breaker_open_for(live, account) {
            return Some(Err(ProxyError::CircuitOpen { retry_after }));
        }
        None
    }

    /// A requeued request's grant in the local store, for [`ramp::wait`]; a place of
    /// another store (the limiter changed on a reload) is given back.
    fn local_requeued(&self, requeued: Option<Box<(queue::Requeued, Option<Pass>)>>) -> Option<(Grant, Option<Pass>)> {
        match *requeued? {
            (queue::Requeued::Local(grant), pass) => Some((grant, pass)),
            (other, _) => {
                other.give_back(&self.limiter);
                None
            }
        }
    }

    pub(crate) fn record(
        &self,
        permit: Option<breaker::Permit<'_>>,
        outcome: breaker::Outcome,
        account: Option<crate::limiter::Account>,
    ) {
        if let Some(permit) = permit {
            self.breaker.record_for(permit, outcome, Instant::now(), account);
        }
    }

    /// When the breaker turns a request of `account` away (`None` when the breaker is
    /// off, closed, or holds another account only).
    pub(crate) fn breaker_open_for(&self, live: &Live, account: Option<crate::limiter::Account>) -> Option<Duration> {
        if live.config.breaker.enabled {
            self.breaker.open_for_account(Instant::now(), account)
        } else {
            None
        }
    }

    /// Pauses the request's buckets until `until` (an upstream 429) and keeps the
    /// request's place at the head of its queue (the local store's, or with Redis, its
    /// line on this replica, every replica pausing). `Err` when the pause ends after
    /// `deadline`, with the wait.
    pub(crate) async fn pause(
        &self,
        demands: &[Demand],
        place: Option<Place>,
        until: Instant,
        now: Instant,
        deadline: Instant,
    ) -> Result<Option<queue::Requeued>, Denied> {
        match &self.limiter {
            Limiter::Local(store) => {
                store.pause_and_requeue(demands, place, until, now, deadline).map(|g| Some(queue::Requeued::Local(g)))
            }
            Limiter::Shared(shared) => queue::pause_shared(shared, demands, until, now, deadline).await.map(Some),
        }
    }

    /// Klaviyo's `RateLimit-Remaining` lowers the proxy's view of the bucket when
    /// another consumer spends the same quota.
    pub(crate) async fn feedback(&self, live: &Live, route: &Route, rate: RateLimit, now: Instant) {
        if !live.config.limits.enabled {
            return;
        }
        let remaining = rate.remaining.and_then(|r| u32::try_from(r).ok());
        let reset = rate.reset.and_then(|r| u64::try_from(r).ok()).map(Duration::from_secs);
        let limit = rate.limit.and_then(|l| u32::try_from(l).ok());
        let (Some(remaining), Some(demand)) = (remaining, described(route, limit)) else {
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

/// The bucket a response's `RateLimit-*` headers describe: `RateLimit-Limit` names its
/// steady limit, the endpoint's or one of its conditional limits' (an `include=…`
/// request is counted in both). Headers describing neither (or a bucket this request
/// did not take from) fill nothing: another bucket's count never lands in the
/// endpoint's. Without `RateLimit-Limit`, the endpoint's.
fn described(route: &Route, limit: Option<u32>) -> Option<&Demand> {
    let endpoint = route.demands.first()?;
    let (Some(limit), Some(op)) = (limit, route.operation) else { return Some(endpoint) };
    if limit == op.steady_per_minute {
        return Some(endpoint);
    }
    route.demands.iter().find(|d| match d.key.bucket {
        BucketId::Condition(_, c) => op.conditions.get(usize::from(c)).is_some_and(|c| c.steady_per_minute == limit),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::route::Router;

    #[test]
    fn ratelimit_headers_fill_the_bucket_they_describe() {
        let router = Router::new(&LimitsConfig::default(), b"k");
        // get_profiles: 750/min; with additional-fields[profile]=predictive_analytics
        // also the condition's 150/min.
        let query = "additional-fields%5Bprofile%5D=predictive_analytics";
        let route = router.route("GET", "/api/profiles", Some(query), false, Some(b"Klaviyo-API-Key pk_x"));
        assert_eq!(route.demands.len(), 2, "{route:?}");
        let bucket = |limit| described(&route, limit).map(|d| d.key.bucket);
        assert_eq!(bucket(None), Some(route.demands[0].key.bucket));
        assert_eq!(bucket(Some(750)), Some(route.demands[0].key.bucket));
        assert!(matches!(bucket(Some(150)), Some(BucketId::Condition(_, 0))));
        assert_eq!(bucket(Some(60)), None, "another bucket's headers fill nothing");
        let plain = router.route("GET", "/api/profiles", None, false, Some(b"Klaviyo-API-Key pk_x"));
        assert_eq!(described(&plain, Some(150)), None);
    }

    /// Every queued request holds this future in a box: a connection's handshake
    /// inline in it made it 7.8 kB (debug build), and an attempt's state (the send, a
    /// 429's pause, the feedback) kept beside the wait made it 2.3 kB. The handshake
    /// and the attempt are boxed apart, and the exchange and the ramp's gate are
    /// `async` blocks rather than `async fn`s (which kept every argument twice): 864
    /// bytes, from 1,008. This keeps it that way.
    #[tokio::test]
    async fn the_exchange_future_stays_small() {
        let proxy = crate::stack::testing::proxy("");
        let routed =
            crate::stack::testing::routed(&proxy, http::Request::get("/api/accounts").body(Bytes::new()).unwrap());
        let upstream = proxy.upstream().with_own_pool();
        let size = std::mem::size_of_val(&proxy.exchange(&Sending::from(routed), &upstream));
        assert!(size <= 880, "the exchange future is {size} bytes");
    }

    /// The box a queued request's exchange lives in: what it keeps of the request, the
    /// exchange and the drain's watch. mimalloc's size classes here are 1,280 and
    /// 1,536 bytes: it was 1,456, a 1,536-byte block per queued request.
    #[tokio::test]
    async fn the_exchange_box_fits_a_smaller_size_class() {
        let proxy = crate::stack::testing::proxy("");
        let routed =
            crate::stack::testing::routed(&proxy, http::Request::get("/api/accounts").body(Bytes::new()).unwrap());
        let mut exchange = Exchange::new(proxy.clone(), proxy.upstream().with_own_pool());
        let boxed = exchange.call(routed);
        let size = std::mem::size_of_val(&*boxed);
        assert!(size <= 1280, "the exchange's box is {size} bytes");
    }
}
