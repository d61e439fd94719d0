//! The request path, top to bottom: refuse what is not ours to forward, authorize,
//! route, buffer the body, wait for a token, forward, stream the answer back.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::breaker::{self, Breaker, Phase};
use crate::config::{is_beta_revision, AuthMode, Config, ConfigError, Secret, StoreKind};
use crate::error::{Origin, ProxyError};
use crate::hardening::host::{HostPolicy, HostRefusal};
use crate::hardening::random::{self, SecretBytes};
use crate::hardening::{budget, budget::ByteBudget, hop, target, token};
use crate::limiter::redis::{RedisStore, RedisStoreError};
use crate::limiter::{Account, BucketKey, Demand, Denied, Grant, Limiter, LocalStore, SharedStore};
use crate::metrics::{BreakerState, Metrics, RequestOutcome};
use crate::queue;
use crate::retry::{self, Backoff, Repeat, RetryBudget};
use crate::route::{Route, Router};
use crate::spool::{self, Spool};
use crate::upstream::{self, Upstream, UpstreamError, MAX_WAIT_HEADER};

mod deferred;

/// Request id header: passed through when the client sends one, generated otherwise,
/// and returned on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Everything the request path needs. The part a reload may change (config, routes,
/// credentials) sits behind one swappable pointer; the bucket store, the upstream pool
/// and the metrics live as long as the proxy, so queued requests survive a reload.
#[derive(Debug)]
pub struct Proxy {
    live: RwLock<Arc<Live>>,
    /// The account hash key used when the config names none: random per start, kept
    /// across reloads so buckets keep their accounts.
    fallback_hash_key: SecretBytes,
    limiter: Limiter,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    /// The upstream's circuit breaker and the retry budget: like the store, they
    /// outlive reloads (their settings are read at start).
    breaker: Breaker,
    budget: RetryBudget,
    /// A fixed instant for the retry budget's clock.
    started: Instant,
    /// Accepted writes waiting for delivery (`spool.path`; read at start).
    spool: Option<Spool>,
    /// Wakes the replayer when a write is spooled.
    spooled: tokio::sync::Notify,
    /// When a shutdown's drain time runs out.
    drain: tokio::sync::watch::Sender<Option<Instant>>,
    /// Request bodies held in memory (`server.max_buffered_bytes`; read at start).
    bodies: Arc<ByteBudget>,
}

/// The reloadable part: a request reads it once and keeps that view to the end.
#[derive(Debug)]
struct Live {
    config: Arc<Config>,
    router: Router,
    /// `Klaviyo-API-Key <key>`, marked sensitive, in inject mode.
    injected_auth: Option<HeaderValue>,
    client_token: Option<Secret>,
    /// The names clients may reach the proxy by.
    hosts: HostPolicy,
}

impl Live {
    fn new(config: Config, fallback_hash_key: &SecretBytes) -> Result<Live, BuildError> {
        let hash_key = match &config.auth.account_hash_key {
            Some(k) => k.expose().as_bytes(),
            None => fallback_hash_key.expose(),
        };
        let injected_auth = match (&config.auth.mode, &config.auth.private_key) {
            (AuthMode::Inject, Some(key)) => {
                Some(sensitive(format!("Klaviyo-API-Key {}", key.expose()), "the private key")?)
            }
            _ => None,
        };
        Ok(Live {
            router: Router::new(&config.limits, hash_key),
            injected_auth,
            client_token: config.server.client_token.clone(),
            hosts: HostPolicy::new(&config.server.allowed_hosts),
            config: Arc::new(config),
        })
    }

    /// Configured account names, for metrics: the injected key's account.
    fn account_names(&self) -> HashMap<Account, String> {
        let mut names = HashMap::new();
        if let (Some(auth), Some(name)) = (&self.injected_auth, &self.config.auth.account_name) {
            names.insert(self.router.account("auth", auth.as_bytes()), name.as_str().to_string());
        }
        names
    }
}

/// Why a reload was refused (the running config stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config cannot be used.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A key changed that only a restart can apply.
    #[error("{0} cannot change without a restart")]
    NeedsRestart(&'static str),
}

/// What a health probe of Klaviyo got.
#[derive(Debug)]
pub struct Probe {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's body.
    pub body: Bytes,
    /// Time from sending to the response head.
    pub latency: Duration,
    /// The upstream's `Retry-After` on a 429, in seconds.
    pub retry_after: Option<u64>,
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
    /// The limiter settings do not work together.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Redis URL cannot be used.
    #[error(transparent)]
    Redis(#[from] RedisStoreError),
    /// `limiter.redis_ca_file` cannot be read.
    #[error("cannot read limiter.redis_ca_file {path}: {source}")]
    RedisCa {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The bucket store `limiter.store` asks for.
fn limiter(config: &Config) -> Result<Limiter, BuildError> {
    let cfg = &config.limiter;
    config.check_limiter()?;
    match (cfg.store, &cfg.redis_url) {
        (StoreKind::Redis, Some(url)) => {
            let timeout = Duration::from_millis(cfg.timeout_ms);
            let ca = match &cfg.redis_ca_file {
                Some(path) => {
                    Some(std::fs::read(path).map_err(|source| BuildError::RedisCa { path: path.clone(), source })?)
                }
                None => None,
            };
            let redis = if cfg.redis_cluster {
                RedisStore::cluster(url.expose(), &cfg.key_prefix, timeout, ca)?
            } else {
                RedisStore::with_ca(url.expose(), &cfg.key_prefix, timeout, ca)?
            };
            Ok(Limiter::Shared(Box::new(SharedStore::new(redis, cfg.replicas.map(|r| r.get())))))
        }
        _ => Ok(Limiter::Local(LocalStore::new())),
    }
}

fn sensitive(value: String, what: &'static str) -> Result<HeaderValue, BuildError> {
    let mut v = HeaderValue::from_str(&value).map_err(|_| BuildError::BadSecret(what))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Proxy {
    /// Builds the proxy: routes, buckets and the pooled upstream client.
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let fallback_hash_key = SecretBytes::new(random::bytes::<32>().to_vec());
        let upstream = Upstream::new(&config.upstream)?;
        let limiter = limiter(&config)?;
        let metrics = Arc::new(Metrics::new());
        let observer = metrics.clone();
        let breaker = Breaker::new(config.breaker.settings())
            .observed(move |from, to| observer.breaker_transition(breaker_state(from), breaker_state(to)));
        let budget = RetryBudget::new(
            config.retry.budget_ratio,
            config.retry.budget_floor_per_second,
            Duration::from_millis(config.retry.budget_window_ms),
        );
        let spool = config.spool.path.as_deref().map(Spool::open).transpose()?;
        let bodies = ByteBudget::new(config.server.max_buffered_bytes);
        let live = Live::new(config, &fallback_hash_key)?;
        metrics.set_account_names(live.account_names());
        let proxy = Proxy {
            live: RwLock::new(Arc::new(live)),
            fallback_hash_key,
            limiter,
            upstream,
            metrics,
            breaker,
            budget,
            started: Instant::now(),
            spool,
            spooled: tokio::sync::Notify::new(),
            drain: tokio::sync::watch::Sender::new(None),
            bodies,
        };
        proxy.refresh_spool_gauges();
        Ok(proxy)
    }

    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The local bucket store: the only one, or the Redis store's fallback (for tests).
    pub fn store(&self) -> &LocalStore {
        self.limiter.local()
    }

    /// The limiter: its state (`local`, `redis`, `degraded`) is for `/health` and metrics.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The config this proxy runs with now.
    pub fn config(&self) -> Arc<Config> {
        self.live().config.clone()
    }

    /// Whether the proxy adds its own key (inject mode).
    pub fn has_injected_key(&self) -> bool {
        self.live().injected_auth.is_some()
    }

    /// This proxy's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The upstream circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The spool, when configured.
    pub fn spool(&self) -> Option<&Spool> {
        self.spool.as_ref()
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

    /// Swaps in a new config: limits, keys and tokens apply to requests arriving from
    /// now on. Requests already queued keep their reservations (the store is not
    /// touched). Keys that shape the listeners or the upstream connection need a
    /// restart; a config changing them is refused whole.
    pub fn reload(&self, new: Config) -> Result<(), ReloadError> {
        let old = self.config();
        let mut upstream = new.upstream.clone();
        upstream.revision = old.upstream.revision.clone();
        // The kill switch flips on a reload: rolling back must not need a restart.
        upstream.enabled = old.upstream.enabled;
        if upstream != old.upstream {
            return Err(ReloadError::NeedsRestart("upstream (other than revision and enabled)"));
        }
        if new.server.listen != old.server.listen {
            return Err(ReloadError::NeedsRestart("server.listen"));
        }
        if new.admin.listen != old.admin.listen {
            return Err(ReloadError::NeedsRestart("admin.listen"));
        }
        if new.log.format != old.log.format {
            return Err(ReloadError::NeedsRestart("log.format"));
        }
        if new.spool.path != old.spool.path {
            return Err(ReloadError::NeedsRestart("spool.path"));
        }
        if new.breaker != old.breaker {
            return Err(ReloadError::NeedsRestart("breaker"));
        }
        if new.limiter != old.limiter {
            return Err(ReloadError::NeedsRestart("limiter"));
        }
        if new.limiter.store == StoreKind::Redis && new.auth.account_hash_key != old.auth.account_hash_key {
            // Replicas must hash accounts alike; one replica changing alone splits buckets.
            return Err(ReloadError::NeedsRestart("auth.account_hash_key (with the redis store)"));
        }
        let live = Arc::new(Live::new(new, &self.fallback_hash_key)?);
        self.metrics.set_account_names(live.account_names());
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = live;
        Ok(())
    }

    /// Probes Klaviyo with `GET /api/accounts` the way a client request would go:
    /// with the injected key (if any), through the limiter, waiting at most `max_wait`.
    pub async fn probe(&self, max_wait: Duration) -> Result<Probe, ProxyError> {
        let live = self.live();
        // The kill switch means nothing goes to Klaviyo, health probes included.
        if !live.config.upstream.enabled {
            return Err(ProxyError::Disabled);
        }
        let mut req = Request::get("/api/accounts").body(()).expect("static request");
        if let Some(auth) = &live.injected_auth {
            req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
        }
        let (mut parts, ()) = req.into_parts();
        let route = self.route(&live, &parts);
        upstream::outbound_headers(&mut parts.headers, live.config.upstream.revision.as_str());
        if live.config.limits.enabled {
            let deadline = Instant::now() + max_wait;
            queue::wait(&self.limiter, &route.demands, deadline, live.config.queue.max_depth, route.label()).await?;
        }
        let sent = Instant::now();
        let resp = self.upstream.send(&parts, Bytes::new()).await.map_err(upstream_error)?;
        let latency = sent.elapsed();
        let status = resp.status();
        // Without a key (pass-through mode) the probe's 401 is expected, not an auth
        // failure worth paging anyone for: only a credentialed probe counts upstream.
        if live.injected_auth.is_some() {
            let remaining = header_int(resp.headers(), "ratelimit-remaining");
            self.metrics.upstream_response(&route, status.as_u16(), latency, remaining);
        }
        let retry_after = header_int(resp.headers(), "retry-after").and_then(|v| u64::try_from(v).ok());
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok(Probe { status, body, latency, retry_after })
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
            .unwrap_or_else(random::hex128);
        let method = req.method().clone();
        let mut outcome = Outcome::default();
        let mut resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(err) => {
                outcome.error = Some(err.code());
                outcome.kind = match err.origin() {
                    Origin::Client => RequestOutcome::Rejected,
                    Origin::Upstream | Origin::Internal => RequestOutcome::Failed,
                };
                err.into_response(&request_id)
            }
        };
        self.metrics.request(outcome.operation, outcome.tier, outcome.kind);
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        tracing::info!(
            request_id = %request_id,
            %method,
            operation = outcome.operation,
            tier = outcome.tier,
            status = resp.status().as_u16(),
            outcome = outcome.error.unwrap_or(outcome.kind.as_str()),
            queue_wait_ms = outcome.waited.as_millis() as u64,
            attempts = outcome.attempts,
            upstream_ms = outcome.upstream.map(|d| d.as_millis() as u64),
            total_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        Ok(resp)
    }

    async fn forward(&self, req: Request<Incoming>, outcome: &mut Outcome) -> Result<Response<ProxyBody>, ProxyError> {
        // One view of the config for the whole request, even if a reload lands meanwhile.
        let live = self.live();
        // Never an open relay: only our upstream, only Klaviyo's API paths, only names
        // we answer to (a rebinding web page sends its own).
        self.check_target(&live, &req)?;
        // Off loopback, clients prove they may use the proxy.
        check_client_token(&live, req.headers())?;
        let (mut parts, body) = req.into_parts();
        // The client's hop-by-hop headers go before anything of ours is added.
        hop::strip_client(&mut parts.headers)
            .map_err(|p| ProxyError::BadRequest(format!("Connection may not name {}", p.0)))?;
        // The credential that goes upstream decides whose quota is spent.
        authorize(&live, &mut parts.headers)?;
        let route = self.route(&live, &parts);
        (outcome.operation, outcome.tier) = (route.label(), route.tier());
        let deadline = deadline(&live, &parts.headers);
        // Buffered so the client's upload time never holds a token, and bounded.
        let (body, _held) = self.read_body(&live, &parts.headers, body).await?;
        upstream::outbound_headers(&mut parts.headers, live.config.upstream.revision.as_str());
        // Events get a unique_id, so Klaviyo deduplicates any repeat or replay.
        let (body, unique_id) = with_unique_id(&live, &route, body);
        let repeat = repeat_rule(&live, &parts.method, &route, unique_id.is_some());
        // Writes that may be accepted now and delivered later: with a spool, and only
        // where a later delivery cannot make them happen twice.
        let deferrable = self.spool.is_some() && is_deferrable(&live, &route) && repeat == Repeat::Safe;
        // The kill switch (rollback option): answer at once, touch nothing upstream.
        if !live.config.upstream.enabled {
            if deferrable && live.config.spool.when_disabled {
                if let Some(accepted) = self.defer(&parts, &body, &route, unique_id, outcome).await {
                    return Ok(accepted);
                }
            }
            return Err(ProxyError::Disabled);
        }
        // While Klaviyo is failing, fail fast instead of queueing for nothing.
        if let Some(retry_after) = self.breaker_open(&live) {
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
            result = self.exchange(&live, &parts, body.clone(), &route, deadline, repeat, outcome) => result,
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

    /// Sends a request until it gets an answer worth returning: waits for its token,
    /// asks the breaker, sends; on a 429 pauses the bucket and requeues the request at
    /// its head; on a 5xx, timeout or connection error backs off and goes again while
    /// repeating is safe, the budget allows and the deadline is not passed.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        live: &Live,
        parts: &request::Parts,
        body: Bytes,
        route: &Route,
        deadline: Instant,
        repeat: Repeat,
        outcome: &mut Outcome,
    ) -> Result<Response<Incoming>, ProxyError> {
        let config = &live.config;
        let label = route.label();
        let limited = config.limits.enabled;
        let backoff = Backoff {
            base: Duration::from_millis(config.retry.base_ms),
            cap: Duration::from_millis(config.retry.cap_ms),
        };
        let mut requeued: Option<Grant> = None;
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
                    queue::wait(&self.limiter, &route.demands, deadline, depth, label).await?
                }
                None => Duration::ZERO,
            };
            if limited {
                self.metrics.queue_wait(outcome.operation, outcome.tier, waited);
            }
            outcome.waited += waited;
            if !outcome.waited.is_zero() {
                outcome.kind = RequestOutcome::Queued;
            }
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
            outcome.attempts += 1;
            let result = self.upstream.send(parts, body.clone()).await;
            let latency = sent.elapsed();
            outcome.upstream = Some(latency);
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
                    match Box::pin(self.pause(&route.demands, now + wait, now, deadline)).await {
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

    fn record(&self, permit: Option<breaker::Permit<'_>>, outcome: breaker::Outcome) {
        if let Some(permit) = permit {
            self.breaker.record(permit, outcome, Instant::now());
        }
    }

    fn breaker_open(&self, live: &Live) -> Option<Duration> {
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
    async fn pause(
        &self,
        demands: &[Demand],
        until: Instant,
        now: Instant,
        deadline: Instant,
    ) -> Result<Option<Grant>, Denied> {
        match &self.limiter {
            Limiter::Local(store) => store.pause_and_requeue(demands, until, now, deadline).map(Some),
            Limiter::Shared(_) => {
                let keys: Vec<BucketKey> = demands.iter().map(|d| d.key).collect();
                if let Err(e) = self.limiter.pause(&keys, until).await {
                    tracing::warn!(error = %e, "could not share an upstream pause through Redis");
                }
                let fallback = self.limiter.local();
                if let Ok(head) = fallback.pause_and_requeue(demands, until, now, until) {
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
    async fn feedback(&self, live: &Live, route: &Route, resp: &Response<Incoming>, now: Instant) {
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

    fn check_target(&self, live: &Live, req: &Request<Incoming>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // HTTP/2's :authority names the proxy itself (it is HTTP/1's Host), so only an
        // HTTP/1 absolute-form target can ask for another host.
        let http1 = req.version() < http::Version::HTTP_2;
        if http1 && !self.upstream.is_upstream(req.uri()) {
            return Err(ProxyError::ForeignHost);
        }
        live.hosts.check(req.uri(), req.headers(), http1).map_err(host_error)?;
        target::check_path(req.uri().path()).map_err(|_| ProxyError::UnknownPath)
    }

    /// Buffers the body within `server.max_body_bytes` and the shared byte budget; the
    /// reservation lives as long as the request.
    async fn read_body(
        &self,
        live: &Live,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<(Bytes, budget::Reservation), ProxyError> {
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        let (limit, timeout) = (live.config.server.max_body_bytes, live.config.client_read_timeout());
        budget::read_body(body, declared, limit, timeout, &self.bodies).await
    }

    /// Bytes of request bodies held now (for tests and metrics).
    pub fn buffered_bytes(&self) -> usize {
        self.bodies.used()
    }

    fn route(&self, live: &Live, parts: &request::Parts) -> Route {
        let revision = parts.headers.get("revision").and_then(|v| v.to_str().ok());
        let beta = is_beta_revision(revision.unwrap_or(live.config.upstream.revision.as_str()));
        let credential = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        live.router.route(parts.method.as_str(), parts.uri.path(), parts.uri.query(), beta, credential)
    }
}

fn breaker_state(phase: Phase) -> BreakerState {
    match phase {
        Phase::Closed => BreakerState::Closed,
        Phase::HalfOpen => BreakerState::HalfOpen,
        Phase::Open => BreakerState::Open,
    }
}

fn with_unique_id(live: &Live, route: &Route, body: Bytes) -> (Bytes, Option<String>) {
    if !route.operation.is_some_and(retry::is_event_create) {
        return (body, None);
    }
    match retry::ensure_unique_id(&body) {
        // Not adding ids, only an id the client sent (body unchanged) counts.
        Some((with_id, id)) if live.config.retry.add_unique_id || with_id == body => (with_id, Some(id)),
        _ => (body, None),
    }
}

fn repeat_rule(live: &Live, method: &Method, route: &Route, has_unique_id: bool) -> Repeat {
    let over = live.config.retry.operations.iter().find(|(k, _)| k.as_str() == route.label()).map(|(_, v)| *v);
    retry::repeat_rule(method, route.operation, has_unique_id, over)
}

fn is_deferrable(live: &Live, route: &Route) -> bool {
    live.config.spool.deferrable.iter().any(|o| o.as_str() == route.label())
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

fn upstream_error(e: UpstreamError) -> ProxyError {
    match e {
        UpstreamError::Connect(_) => ProxyError::UpstreamUnreachable,
        UpstreamError::Timeout(d) => ProxyError::UpstreamTimeout(d),
    }
}

/// An integer header such as `RateLimit-Remaining` or `Retry-After` (seconds form).
fn header_int(headers: &HeaderMap, name: &str) -> Option<i64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn check_client_token(live: &Live, headers: &HeaderMap) -> Result<(), ProxyError> {
    match &live.client_token {
        None => Ok(()),
        Some(token) if token::bearer_matches(headers.get(header::PROXY_AUTHORIZATION), token.expose().as_bytes()) => {
            Ok(())
        }
        Some(_) => Err(ProxyError::ProxyAuthRequired),
    }
}

/// The answer to a `Host` the proxy does not serve.
pub fn host_error(refusal: HostRefusal) -> ProxyError {
    match refusal {
        HostRefusal::Unknown => ProxyError::UnknownHost,
        HostRefusal::Malformed => ProxyError::BadRequest("malformed or repeated Host header".into()),
    }
}

fn authorize(live: &Live, headers: &mut HeaderMap) -> Result<(), ProxyError> {
    let Some(ours) = &live.injected_auth else { return Ok(()) };
    if headers.contains_key(header::AUTHORIZATION) {
        if !live.config.auth.allow_client_keys {
            return Err(ProxyError::ClientKeyForbidden);
        }
    } else {
        headers.insert(header::AUTHORIZATION, ours.clone());
    }
    Ok(())
}

fn deadline(live: &Live, headers: &HeaderMap) -> Instant {
    let configured = live.config.queue.max_wait_ms;
    let asked = headers.get(MAX_WAIT_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    Instant::now() + Duration::from_millis(asked.map_or(configured, |a| a.min(configured)))
}

/// What happened to a request, for its log line.
#[derive(Debug)]
struct Outcome {
    operation: &'static str,
    tier: &'static str,
    kind: RequestOutcome,
    /// Times the request was sent upstream (retries add to it).
    attempts: u32,
    error: Option<&'static str>,
    waited: Duration,
    upstream: Option<Duration>,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            operation: "unknown",
            tier: "unknown",
            kind: RequestOutcome::Forwarded,
            attempts: 0,
            error: None,
            waited: Duration::ZERO,
            upstream: None,
        }
    }
}
