//! What the request path shares: the reloadable config view ([`Live`]), the bucket
//! store, the upstream pool, the breaker, the retry budget, the spool and the metrics;
//! building it, reloading it, and the health probe. The path itself is composed in
//! [`crate::stack`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::account::{self, Resolver};
use crate::breaker::{Breaker, Phase};
use crate::checklist::Checklist;
use crate::config::{is_beta_revision, AuthMode, Config, ConfigError, Secret, StoreKind};
use crate::credential::{self, Credential};
use crate::error::ProxyError;
use crate::hardening::budget::ByteBudget;
use crate::hardening::host::{HostPolicy, HostRefusal};
use crate::hardening::random::{self, SecretBytes};
use crate::limiter::ramp::Ramps;
use crate::limiter::redis::{RedisStore, RedisStoreError};
use crate::limiter::{Account, Limiter, LocalStore, SharedStore};
use crate::metrics::{BreakerState, Metrics};
use crate::queue;
use crate::retry::{self, RetryBudget};
use crate::route::{Route, Router};
use crate::spool::{self, Spool};
use crate::upstream::{self, Upstream, UpstreamError};

mod coalesced;
mod deferred;

/// Request id header: passed through when the client sends one, generated otherwise,
/// and returned on every response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Everything the request path needs. The part a reload may change (config, routes,
/// credentials) sits behind one swappable pointer; the bucket store, the upstream pool
/// and the metrics live as long as the proxy, so queued requests survive a reload.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) live: RwLock<Arc<Live>>,
    /// The account hash key used when the config names none: random per start, kept
    /// across reloads so buckets keep their accounts.
    pub(crate) fallback_hash_key: SecretBytes,
    pub(crate) limiter: Limiter,
    pub(crate) upstream: Upstream,
    pub(crate) metrics: Arc<Metrics>,
    /// The upstream's circuit breaker and the retry budget: like the store, they
    /// outlive reloads (their settings are read at start).
    pub(crate) breaker: Breaker,
    pub(crate) budget: RetryBudget,
    /// Buckets ramping up after an upstream 429 (local store only).
    pub(crate) ramps: Ramps,
    /// A fixed instant for the retry budget's clock.
    pub(crate) started: Instant,
    /// Accepted writes waiting for delivery (`spool.path`; read at start).
    pub(crate) spool: Option<Spool>,
    /// Wakes the replayer when a write is spooled.
    pub(crate) spooled: tokio::sync::Notify,
    /// Ends when a shutdown's drain time runs out.
    pub(crate) drain: Arc<Drain>,
    /// The production checklist's counters, from live traffic.
    pub(crate) checklist: Checklist,
    /// The Klaviyo account behind each credential (outlives reloads).
    pub(crate) resolver: Resolver,
    /// Request bodies held in memory (`server.max_buffered_bytes`; read at start).
    pub(crate) bodies: Arc<ByteBudget>,
    /// Single events delivered as bulk jobs (`coalesce.events`; read at start).
    pub(crate) coalescer: Option<Arc<crate::coalesce::Coalescer>>,
}

/// The reloadable part: a request reads it once and keeps that view to the end.
#[derive(Debug)]
pub struct Live {
    pub(crate) config: Arc<Config>,
    pub(crate) router: Router,
    /// `Klaviyo-API-Key <key>`, marked sensitive, in inject mode.
    pub(crate) injected_auth: Option<HeaderValue>,
    /// `server.client_token`.
    pub(crate) client_token: Option<Secret>,
    /// The names clients may reach the proxy by.
    pub(crate) hosts: HostPolicy,
    /// The proxy's body budget (the same one across reloads).
    pub(crate) bodies: Arc<ByteBudget>,
}

impl Live {
    fn new(config: Config, fallback_hash_key: &SecretBytes, bodies: Arc<ByteBudget>) -> Result<Live, BuildError> {
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
            bodies,
            config: Arc::new(config),
        })
    }

    /// Routes a request head under this config: the revision picks stable or beta
    /// limits; the account is `resolved`, the one [`Proxy::resolve`] found for the
    /// credential that will go upstream, else the credential's own.
    pub(crate) fn route(&self, parts: &request::Parts, resolved: Option<Account>) -> Route {
        let revision = parts.headers.get(crate::header::REVISION).and_then(|v| v.to_str().ok());
        let beta = is_beta_revision(revision.unwrap_or(self.config.upstream.revision.as_str()));
        let (method, path, query) = (parts.method.as_str(), parts.uri.path(), parts.uri.query());
        match resolved {
            Some(account) => self.router.route_as(method, path, query, beta, account),
            None => {
                let credential = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
                self.router.route(method, path, query, beta, credential)
            }
        }
    }
}

/// The end of a shutdown's drain, for the requests it cuts short: a flag and one wake-up
/// for all, so that each request holds one registration and no timer of its own (a
/// watch and a timer were 176 bytes in every queued request). The wake-ups are sharded
/// by serving thread: every request registers on its first poll and leaves when
/// dropped, and one lock for all threads would be taken twice per request by each.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    over: AtomicBool,
    ends: [tokio::sync::Notify; DRAIN_SHARDS],
}

const DRAIN_SHARDS: usize = 8;

impl Drain {
    fn end(&self) {
        self.over.store(true, Ordering::Release);
        for ends in &self.ends {
            ends.notify_waiters();
        }
    }

    async fn ended(&self) {
        thread_local! {
            static SHARD: usize = {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % DRAIN_SHARDS
            };
        }
        // A `Notified` sees every `notify_waiters` from its creation on, polled or not:
        // made before the flag is read, it cannot miss an end that the read missed.
        let ends = self.ends[SHARD.with(|s| *s)].notified();
        if self.over.load(Ordering::Acquire) {
            return;
        }
        ends.await;
    }
}

/// The credential's account is not known yet: it takes a lookup ([`Proxy::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NeedsLookup;

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
    /// The webhook gate cannot start.
    #[error(transparent)]
    Webhooks(#[from] crate::webhooks::GateError),
    /// The limiter settings do not work together.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Redis URL cannot be used.
    #[error(transparent)]
    Redis(#[from] RedisStoreError),
    /// `limiter.state_path` cannot be read or its journals created.
    #[error("cannot open limiter.state_path {path}: {source}")]
    LimiterState {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The coalescer's file cannot be opened.
    #[error(transparent)]
    Coalesce(#[from] crate::coalesce::StoreError),
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
            let l = &config.limits;
            let guard = Duration::from_millis(l.burst_guard_ms.min(l.steady_guard_ms).min(l.daily_guard_ms));
            Ok(Limiter::Shared(Box::new(SharedStore::new(redis, cfg.replicas.map(|r| r.get()), guard))))
        }
        _ => Ok(Limiter::Local(match &cfg.state_path {
            Some(path) => {
                LocalStore::open(path).map_err(|source| BuildError::LimiterState { path: path.clone(), source })?
            }
            None => LocalStore::new(),
        })),
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
        limiter.local().set_max_buckets(config.limiter.max_buckets.get() as usize);
        let metrics = Arc::new(Metrics::new());
        let observer = metrics.clone();
        let breaker = Breaker::new(config.breaker.settings())
            .observed(move |from, to| observer.breaker_transition(breaker_state(from), breaker_state(to)));
        let budget = RetryBudget::new(
            config.retry.budget_ratio,
            config.retry.budget_floor_per_second,
            Duration::from_millis(config.retry.budget_window_ms),
        );
        let limits = spool::SpoolLimits::from_config(&config.spool);
        let spool = config.spool.path.as_deref().map(|p| Spool::open_with(p, limits)).transpose()?;
        let redis = match &limiter {
            Limiter::Shared(s) => Some(s.redis().clone()),
            Limiter::Local(_) => None,
        };
        let resolver = Resolver::new(config.limiter.state_path.as_deref(), redis, metrics.clone());
        let coalescer = coalesced::open(&config, spool.as_ref(), &metrics)?;
        let bodies = ByteBudget::new(config.server.max_buffered_bytes);
        let live = Live::new(config, &fallback_hash_key, bodies.clone())?;
        let proxy = Proxy {
            live: RwLock::new(Arc::new(live)),
            fallback_hash_key,
            limiter,
            upstream,
            metrics,
            breaker,
            budget,
            ramps: Ramps::new(),
            started: Instant::now(),
            spool,
            spooled: tokio::sync::Notify::new(),
            drain: Arc::default(),
            checklist: Checklist::new(),
            resolver,
            bodies,
            coalescer,
        };
        proxy.refresh_spool_gauges();
        Ok(proxy)
    }

    pub(crate) fn live(&self) -> Arc<Live> {
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

    /// The checklist's counters.
    pub fn checklist(&self) -> &Checklist {
        &self.checklist
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
    /// when deferrable, 503 otherwise). Called on a runtime: its timer ends the drain.
    pub fn begin_drain(&self, until: Instant) {
        let drain = self.drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            drain.end();
        });
    }

    /// Completes when a shutdown's drain time has run out.
    pub(crate) async fn drain_ends(&self) {
        self.drain.ended().await;
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
        // The gate's listener, store and secrets are set at start.
        if new.webhooks != old.webhooks {
            return Err(ReloadError::NeedsRestart("webhooks"));
        }
        if new.limiter.store == StoreKind::Redis && new.auth.account_hash_key != old.auth.account_hash_key {
            // Replicas must hash accounts alike; one replica changing alone splits buckets.
            return Err(ReloadError::NeedsRestart("auth.account_hash_key (with the redis store)"));
        }
        let live = Arc::new(Live::new(new, &self.fallback_hash_key, self.bodies.clone())?);
        if let Some(spool) = &self.spool {
            spool.set_limits(spool::SpoolLimits::from_config(&live.config.spool));
        }
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
        let mut parts = account::accounts_request(live.injected_auth.as_ref(), live.config.upstream.revision.as_str());
        let resolved = self.resolve(&live, &mut parts).await;
        let route = live.route(&parts, resolved);
        if live.config.limits.enabled {
            let deadline = Instant::now() + max_wait;
            queue::wait(&self.limiter, &route.demands, deadline, live.config.queue.max_depth, route.label()).await?;
        }
        let sent = Instant::now();
        let resp = self.upstream.send(&parts, Bytes::new()).await.map_err(upstream_error)?;
        let latency = sent.elapsed();
        let status = resp.status();
        if retry::is_challenge(status, resp.headers()) {
            self.metrics.upstream_challenge(&route, latency);
            return Err(ProxyError::UpstreamChallenged);
        }
        // Without a key (pass-through mode) the probe's 401 is expected, not an auth
        // failure worth paging anyone for: only a credentialed probe counts upstream.
        if live.injected_auth.is_some() {
            let remaining = header_int(resp.headers(), crate::header::RATELIMIT_REMAINING);
            self.metrics.upstream_response(&route, status.as_u16(), latency, remaining);
        }
        let retry_after = header_int(resp.headers(), header::RETRY_AFTER).and_then(|v| u64::try_from(v).ok());
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok(Probe { status, body, latency, retry_after })
    }

    /// The upstream client.
    /// Bytes of request bodies held now (for tests and metrics).
    pub fn buffered_bytes(&self) -> usize {
        self.bodies.used()
    }

    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Learns the account behind the request's credential (looked up once per
    /// credential) for [`Live::route`]; a well-formed credential goes upstream in its
    /// canonical spelling. `/client/` requests spend their `company_id`'s quota.
    /// `None`: nothing to resolve (no key, or a public-key `/client/` call).
    pub(crate) async fn resolve(&self, live: &Live, parts: &mut request::Parts) -> Option<Account> {
        let credential = Self::credential_to_resolve(parts)?;
        let lookup = self.lookup(live, &credential);
        Some(self.resolver.account_for(&live.router, &live.config, &credential, &lookup).await)
    }

    /// [`Proxy::resolve`] when it can finish without waiting (no lookup needed);
    /// [`NeedsLookup`] when the caller must await `resolve`.
    pub(crate) fn resolve_now(&self, live: &Live, parts: &mut request::Parts) -> Result<Option<Account>, NeedsLookup> {
        let Some(credential) = Self::credential_to_resolve(parts) else { return Ok(None) };
        self.resolver.account_now(&live.router, &live.config, &credential).map(Some).ok_or(NeedsLookup)
    }

    /// The request's credential, normalised in its header, unless it has none to
    /// resolve (no key, or a public-key `/client/` call).
    fn credential_to_resolve(parts: &mut request::Parts) -> Option<Credential> {
        if parts.uri.path().starts_with("/client/") {
            return None;
        }
        let value = parts.headers.get(header::AUTHORIZATION)?;
        let credential = credential::parse(value.as_bytes());
        if credential.kind() != credential::Kind::Malformed && credential.as_bytes() != value.as_bytes() {
            if let Ok(v) = sensitive(String::from_utf8_lossy(credential.as_bytes()).into_owned(), "") {
                parts.headers.insert(header::AUTHORIZATION, v);
            }
        }
        Some(credential)
    }

    fn lookup<'a>(&'a self, live: &'a Live, credential: &'a Credential) -> account::Lookup<'a> {
        let (limiter, upstream, breaker) = (&self.limiter, &self.upstream, &self.breaker);
        account::Lookup { limiter, upstream, breaker, router: &live.router, config: &live.config, credential }
    }

    /// Learns the injected key's account (inject mode, at start) unless configured.
    pub async fn resolve_injected(&self) {
        let live = self.live();
        if let Some(auth) = &live.injected_auth {
            let credential = credential::parse(auth.as_bytes());
            let lookup = self.lookup(&live, &credential);
            self.resolver.account_for(&live.router, &live.config, &credential, &lookup).await;
        }
    }

    /// The injected key's account id (or configured name), once known.
    pub fn injected_account(&self) -> Option<String> {
        let live = self.live();
        let credential = credential::parse(live.injected_auth.as_ref()?.as_bytes());
        self.resolver.known(&live.config, &credential)
    }
}

fn breaker_state(phase: Phase) -> BreakerState {
    match phase {
        Phase::Closed => BreakerState::Closed,
        Phase::HalfOpen => BreakerState::HalfOpen,
        Phase::Open => BreakerState::Open,
    }
}

/// The answer to a `Host` the proxy does not serve.
pub fn host_error(refusal: HostRefusal) -> ProxyError {
    match refusal {
        HostRefusal::Unknown => ProxyError::UnknownHost,
        HostRefusal::Malformed => ProxyError::BadRequest("malformed or repeated Host header".into()),
    }
}

pub(crate) fn upstream_error(e: UpstreamError) -> ProxyError {
    match e {
        UpstreamError::Connect(_) => ProxyError::UpstreamUnreachable,
        UpstreamError::Timeout(d) => ProxyError::UpstreamTimeout(d),
    }
}

/// The wait an upstream 429 asks for: `Retry-After`, else the wait its body names
/// (read up to a few KiB, briefly: Klaviyo's 429 bodies are small and already sent).
pub(crate) async fn throttle_wait(resp: Response<Incoming>, cap: Duration) -> Option<Duration> {
    if let Some(wait) = retry::retry_after_of(resp.headers(), cap) {
        return Some(wait);
    }
    let read = Limited::new(resp.into_body(), 16 * 1024).collect();
    let body = tokio::time::timeout(Duration::from_secs(1), read).await.ok()?.ok()?.to_bytes();
    retry::retry_after_from_body(&body, cap)
}

/// An integer header such as `RateLimit-Remaining` or `Retry-After` (seconds form).
pub(crate) fn header_int(headers: &HeaderMap, name: HeaderName) -> Option<i64> {
    crate::header::int(headers.get(name)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::Drain;
    use std::sync::Arc;

    /// Waiters on every serving thread (each its own shard) are woken by the end, and a
    /// request that starts after it is cut short at once.
    #[test]
    fn the_drain_end_wakes_every_thread_and_cuts_later_requests_at_once() {
        let drain = Arc::new(Drain::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..super::DRAIN_SHARDS + 1)
            .map(|_| {
                let (drain, tx) = (drain.clone(), tx.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async {
                        let ended = drain.ended();
                        tx.send(()).unwrap();
                        tokio::time::timeout(std::time::Duration::from_secs(5), ended).await.is_ok()
                    })
                })
            })
            .collect();
        for _ in &threads {
            rx.recv().unwrap();
        }
        drain.end();
        for t in threads {
            assert!(t.join().unwrap(), "a waiter was not woken by the end");
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let later = rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), drain.ended()).await });
        later.expect("cut short at once");
    }
}
