//! The request path, top to bottom: refuse what is not ours to forward, authorize,
//! route, buffer the body, wait for a token, forward, stream the answer back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::breaker::{self, Breaker};
use crate::config::{is_beta_revision, AuthMode, Config};
use crate::error::ProxyError;
use crate::limiter::{Denied, Grant, LocalStore};
use crate::queue;
use crate::retry::{self, Backoff, Repeat, RetryBudget};
use crate::route::{Route, Router};
use crate::spool::{self, Spool};

mod deferred;
use crate::upstream::{self, Upstream, UpstreamError, MAX_WAIT_HEADER};

/// Request id header: passed through when the client sends one, generated otherwise,
/// and returned on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Everything the request path needs, built once from a config.
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    router: Router,
    store: LocalStore,
    upstream: Upstream,
    /// `Klaviyo-API-Key <key>`, marked sensitive, in inject mode.
    injected_auth: Option<HeaderValue>,
    client_token: Option<HeaderValue>,
    breaker: Breaker,
    budget: RetryBudget,
    backoff: Backoff,
    /// A fixed instant for the retry budget's clock.
    started: Instant,
    spool: Option<Spool>,
    /// Wakes the replayer when a write is spooled.
    spooled: tokio::sync::Notify,
    /// When a shutdown's drain time runs out.
    drain: tokio::sync::watch::Sender<Option<Instant>>,
}

/// Why a proxy could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The TLS client could not be set up.
    #[error(transparent)]
    Tls(#[from] upstream::TlsSetupError),
    /// A key or token cannot be sent as a header.
    #[error("{0} contains characters not allowed in an HTTP header")]
    BadSecret(&'static str),
    /// The spool file cannot be opened.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

fn sensitive(value: String, what: &'static str) -> Result<HeaderValue, BuildError> {
    let mut v = HeaderValue::from_str(&value).map_err(|_| BuildError::BadSecret(what))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Proxy {
    /// Builds the proxy: routes, buckets and the pooled upstream client.
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let hash_key = match &config.auth.account_hash_key {
            Some(k) => k.expose().as_bytes().to_vec(),
            None => (0..32).map(|_| fastrand::u8(..)).collect(),
        };
        let injected_auth = match (&config.auth.mode, &config.auth.private_key) {
            (AuthMode::Inject, Some(key)) => {
                Some(sensitive(format!("Klaviyo-API-Key {}", key.expose()), "the private key")?)
            }
            _ => None,
        };
        let client_token = match &config.server.client_token {
            Some(t) => Some(sensitive(format!("Bearer {}", t.expose()), "server.client_token")?),
            None => None,
        };
        Ok(Proxy {
            router: Router::new(&config.limits, &hash_key),
            store: LocalStore::new(),
            upstream: Upstream::new(&config.upstream)?,
            injected_auth,
            client_token,
            breaker: Breaker::new(config.breaker.settings()),
            budget: RetryBudget::new(
                config.retry.budget_ratio,
                config.retry.budget_floor_per_second,
                Duration::from_millis(config.retry.budget_window_ms),
            ),
            backoff: Backoff {
                base: Duration::from_millis(config.retry.base_ms),
                cap: Duration::from_millis(config.retry.cap_ms),
            },
            started: Instant::now(),
            spool: config.spool.path.as_deref().map(Spool::open).transpose()?,
            spooled: tokio::sync::Notify::new(),
            drain: tokio::sync::watch::Sender::new(None),
            config,
        })
    }

    /// The bucket store (for the sweeper and tests).
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The config this proxy runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The upstream circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Serves one client request; never fails at the HTTP level.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let request_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .filter(|v| v.len() <= 128)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..)));
        let method = req.method().clone();
        let mut outcome = Outcome::default();
        let mut resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(err) => {
                outcome.error = Some(err.code());
                err.into_response(&request_id)
            }
        };
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        tracing::info!(
            request_id = %request_id,
            %method,
            operation = outcome.operation,
            status = resp.status().as_u16(),
            outcome = outcome.error.unwrap_or("forwarded"),
            queue_wait_ms = outcome.waited.as_millis() as u64,
            upstream_ms = outcome.upstream.map(|d| d.as_millis() as u64),
            attempts = outcome.attempts,
            total_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        Ok(resp)
    }

    async fn forward(&self, req: Request<Incoming>, outcome: &mut Outcome) -> Result<Response<ProxyBody>, ProxyError> {
        // Never an open relay: only our upstream, only Klaviyo's API paths.
        self.check_target(&req)?;
        // Off loopback, clients prove they may use the proxy.
        self.check_client_token(req.headers())?;
        let (mut parts, body) = req.into_parts();
        // The credential that goes upstream decides whose quota is spent.
        self.authorize(&mut parts.headers)?;
        let route = self.route(&parts);
        outcome.operation = route.label();
        let deadline = self.deadline(&parts.headers);
        // Buffered so the client's upload time never holds a token, and bounded.
        let body = self.read_body(body).await?;
        upstream::outbound_headers(&mut parts.headers, self.config.upstream.revision.as_str());
        // Events get a unique_id, so Klaviyo deduplicates any repeat or replay.
        let (body, unique_id) = self.with_unique_id(&route, body);
        let repeat = self.repeat_rule(&parts.method, &route, unique_id.is_some());
        // Writes that may be accepted now and delivered later: with a spool, and only
        // where a later delivery cannot make them happen twice.
        let deferrable = self.spool.is_some() && self.is_deferrable(&route) && repeat == Repeat::Safe;
        // The kill switch (rollback option): answer at once, touch nothing upstream.
        if !self.config.upstream.enabled {
            if deferrable && self.config.spool.when_disabled {
                if let Some(accepted) = self.defer(&parts, &body, &route, unique_id, outcome).await {
                    return Ok(accepted);
                }
            }
            return Err(ProxyError::Disabled);
        }
        // While Klaviyo is failing, fail fast instead of queueing for nothing.
        if let Some(retry_after) = self.breaker_open() {
            if deferrable {
                if let Some(accepted) = self.defer(&parts, &body, &route, unique_id, outcome).await {
                    return Ok(accepted);
                }
            }
            return Err(ProxyError::CircuitOpen { retry_after });
        }
        // Limiter, breaker, upstream, and again while a repeat is safe and in time;
        // cut short when a shutdown's drain time runs out.
        let result = tokio::select! {
            result = self.exchange(&parts, body.clone(), &route, deadline, repeat, outcome) => result,
            () = self.drain_ends() => Err(ProxyError::Draining),
        };
        // A deferrable write that cannot be delivered now is accepted for later.
        let undelivered = match &result {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => may_defer(e),
        };
        if deferrable && undelivered {
            if let Some(accepted) = self.defer(&parts, &body, &route, unique_id, outcome).await {
                return Ok(accepted);
            }
        }
        let resp = result?;
        let (mut parts, body) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }

    fn is_deferrable(&self, route: &Route) -> bool {
        self.config.spool.deferrable.iter().any(|o| o.as_str() == route.label())
    }

    /// Starts the drain: requests still unanswered at `until` are cut short (spooled
    /// when deferrable, 503 otherwise).
    pub fn begin_drain(&self, until: Instant) {
        self.drain.send_replace(Some(until));
    }

    async fn drain_ends(&self) {
        let mut rx = self.drain.subscribe();
        let Ok(until) = rx.wait_for(Option::is_some).await.map(|v| v.expect("some")) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(until).await;
    }

    /// The spool, when configured.
    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
    }

    /// Sends a request until it gets an answer worth returning: waits for its token,
    /// asks the breaker, sends; on a 429 pauses the bucket and requeues the request at
    /// its head; on a 5xx, timeout or connection error backs off and goes again while
    /// repeating is safe, the budget allows and the deadline is not passed.
    async fn exchange(
        &self,
        parts: &request::Parts,
        body: Bytes,
        route: &Route,
        deadline: Instant,
        repeat: Repeat,
        outcome: &mut Outcome,
    ) -> Result<Response<Incoming>, ProxyError> {
        let label = route.label();
        let limited = self.config.limits.enabled;
        let mut requeued: Option<Grant> = None;
        let mut retries = 0u32;
        let mut rng = fastrand::Rng::new();
        self.budget.deposit(Instant::now(), self.started);
        loop {
            // The limiter: a token in every bucket; a requeued request keeps its place.
            let queued = Instant::now();
            match requeued.take() {
                Some(grant) => queue::wait_for_grant(&self.store, grant, deadline, label).await?,
                None if limited => {
                    let depth = self.config.queue.max_depth;
                    queue::wait_for_slot(&self.store, &route.demands, deadline, depth, label).await?;
                }
                None => {}
            }
            outcome.waited += queued.elapsed();
            // The breaker decides last: it may have opened while the request queued.
            let permit = match self.config.breaker.enabled {
                true => Some(
                    self.breaker
                        .admit(Instant::now())
                        .map_err(|retry_after| ProxyError::CircuitOpen { retry_after })?,
                ),
                false => None,
            };
            let sent = Instant::now();
            outcome.attempts += 1;
            let result = self.upstream.send(parts, body.clone()).await;
            outcome.upstream = Some(sent.elapsed());
            let now = Instant::now();
            let (verdict, failure) = match result {
                Ok(resp) if resp.status() == http::StatusCode::TOO_MANY_REQUESTS => {
                    self.record(permit, breaker::Outcome::Success);
                    // Klaviyo's quota is spent (by us or another consumer): the whole
                    // bucket waits for Retry-After, this request at the head of its queue.
                    let wait = resp
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| {
                            let cap = Duration::from_millis(self.config.retry.retry_after_cap_ms);
                            retry::parse_retry_after(v, std::time::SystemTime::now(), cap)
                        })
                        .unwrap_or_else(|| self.backoff.delay(retries, &mut rng).max(Duration::from_secs(1)));
                    tracing::debug!(operation = label, ?wait, "upstream 429: bucket paused");
                    if !limited {
                        return Ok(resp);
                    }
                    match self.store.pause_and_requeue(&route.demands, now + wait, now, deadline) {
                        Ok(grant) => {
                            requeued = Some(grant);
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
                    (Ok(resp), repeat == Repeat::Safe)
                }
                Ok(resp) => {
                    self.record(permit, breaker::Outcome::Success);
                    self.feedback(route, &resp, now);
                    return Ok(resp);
                }
                Err(e) => {
                    tracing::warn!(operation = label, error = %e, "upstream request failed");
                    // A connection that was never made carried nothing: safe to repeat.
                    let never_sent = matches!(&e, UpstreamError::Connect(c) if c.is_connect());
                    let kind = match e {
                        UpstreamError::Connect(_) => breaker::Outcome::ConnectFailure,
                        UpstreamError::Timeout(_) => breaker::Outcome::Failure,
                    };
                    self.record(permit, kind);
                    let err = match e {
                        UpstreamError::Connect(_) => ProxyError::UpstreamUnreachable,
                        UpstreamError::Timeout(d) => ProxyError::UpstreamTimeout(d),
                    };
                    (Err(err), repeat == Repeat::Safe || never_sent)
                }
            };
            // Backoff: only a safe repeat, within attempts, budget and deadline.
            let delay = self.backoff.delay(retries, &mut rng);
            let may = failure
                && retries + 1 < self.config.retry.max_attempts.get()
                && Instant::now() + delay < deadline
                && self.budget.withdraw(Instant::now(), self.started);
            if !may {
                return verdict;
            }
            retries += 1;
            tracing::debug!(operation = label, retry = retries, ?delay, "retrying after upstream failure");
            drop(verdict);
            tokio::time::sleep(delay).await;
            // The breaker may have opened during the backoff.
            if let Some(retry_after) = self.breaker_open() {
                return Err(ProxyError::CircuitOpen { retry_after });
            }
        }
    }

    fn record(&self, permit: Option<breaker::Permit<'_>>, outcome: breaker::Outcome) {
        if let Some(permit) = permit {
            self.breaker.record(permit, outcome, Instant::now());
        }
    }

    fn breaker_open(&self) -> Option<Duration> {
        if self.config.breaker.enabled {
            self.breaker.open_for(Instant::now())
        } else {
            None
        }
    }

    /// Klaviyo's `RateLimit-Remaining` lowers the proxy's view of the bucket when
    /// another consumer spends the same quota.
    fn feedback(&self, route: &Route, resp: &Response<Incoming>, now: Instant) {
        let number = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let remaining = number("ratelimit-remaining").and_then(|r| u32::try_from(r).ok());
        let reset = number("ratelimit-reset").map(Duration::from_secs);
        if let (Some(remaining), Some(demand), true) = (remaining, route.demands.first(), self.config.limits.enabled) {
            let phantoms = self.store.observe_remaining(demand, remaining, reset, now);
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

    fn with_unique_id(&self, route: &Route, body: Bytes) -> (Bytes, Option<String>) {
        if !route.operation.is_some_and(retry::is_event_create) {
            return (body, None);
        }
        match retry::ensure_unique_id(&body) {
            // Not adding ids, only an id the client sent (body unchanged) counts.
            Some((with_id, id)) if self.config.retry.add_unique_id || with_id == body => (with_id, Some(id)),
            _ => (body, None),
        }
    }

    fn repeat_rule(&self, method: &http::Method, route: &Route, has_unique_id: bool) -> Repeat {
        let over = self.config.retry.operations.iter().find(|(k, _)| k.as_str() == route.label()).map(|(_, v)| *v);
        retry::repeat_rule(method, route.operation, has_unique_id, over)
    }

    fn check_target(&self, req: &Request<Incoming>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        if !self.upstream.is_upstream(req.uri()) {
            return Err(ProxyError::ForeignHost);
        }
        let path = req.uri().path();
        if !(path.starts_with("/api/") || path == "/api" || path.starts_with("/client/")) || path.contains("/../") {
            return Err(ProxyError::UnknownPath);
        }
        Ok(())
    }

    fn check_client_token(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match &self.client_token {
            None => Ok(()),
            Some(token) => {
                let given = headers.get(header::PROXY_AUTHORIZATION).map(HeaderValue::as_bytes).unwrap_or_default();
                if constant_time_eq(given, token.as_bytes()) {
                    Ok(())
                } else {
                    Err(ProxyError::ProxyAuthRequired)
                }
            }
        }
    }

    fn authorize(&self, headers: &mut HeaderMap) -> Result<(), ProxyError> {
        let Some(ours) = &self.injected_auth else { return Ok(()) };
        if headers.contains_key(header::AUTHORIZATION) {
            if !self.config.auth.allow_client_keys {
                return Err(ProxyError::ClientKeyForbidden);
            }
        } else {
            headers.insert(header::AUTHORIZATION, ours.clone());
        }
        Ok(())
    }

    fn route(&self, parts: &request::Parts) -> Route {
        let revision = parts.headers.get("revision").and_then(|v| v.to_str().ok());
        let beta = is_beta_revision(revision.unwrap_or(self.config.upstream.revision.as_str()));
        let credential = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        self.router.route(parts.method.as_str(), parts.uri.path(), parts.uri.query(), beta, credential)
    }

    fn deadline(&self, headers: &HeaderMap) -> Instant {
        let configured = self.config.queue.max_wait_ms;
        let asked =
            headers.get(MAX_WAIT_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        Instant::now() + Duration::from_millis(asked.map_or(configured, |a| a.min(configured)))
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, ProxyError> {
        let limit = self.config.server.max_body_bytes;
        let timeout = self.config.client_read_timeout();
        match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
            Err(_) => Err(ProxyError::ClientTimeout(timeout)),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
            Ok(Err(_)) => Err(ProxyError::BodyRead),
        }
    }
}

/// Whether a deferrable write that failed this way may be accepted for later: it did
/// not reach Klaviyo, or Klaviyo failed it (deferrable writes are safe to repeat).
fn may_defer(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::CircuitOpen { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::UpstreamThrottled { .. }
            | ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::Draining
    )
}

/// What happened to a request, for its log line.
#[derive(Debug, Default)]
struct Outcome {
    operation: &'static str,
    error: Option<&'static str>,
    waited: Duration,
    upstream: Option<Duration>,
    attempts: u32,
}

/// Compares secrets without leaking their common prefix length through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
