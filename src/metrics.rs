//! Prometheus metrics: one [`Registry`] per app, metric names as constants, and only
//! bounded labels — operation id, tier, outcome, status and status class, window, and
//! an account only as the short keyed-hash alias ([`Account::alias`]). Never a raw
//! path, a key, an `Authorization` value or a `company_id`.
//!
//! Counters are named without `_total` here; the OpenMetrics encoder appends it, so
//! [`REQUESTS`] is scraped as `klaviyo_proxy_requests_total`.
//!
//! The retry, breaker and spool metrics are declared and registered here so the alert
//! rules (`config/alerts.yml`) can name them; the request path feeds them
//! ([`Metrics::retry`] and [`Metrics::retry_budget_exhausted`] from the retry loop,
//! [`Metrics::breaker_transition`] from the breaker's observer, the spool gauges after
//! every spool write and replay).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::catalog;
use crate::limiter::{Account, BucketId, BucketView, LocalStore, StoreState};

mod accounts;
mod hot;
pub use accounts::{MAX_ACCOUNT_SERIES, OTHER as OTHER_ACCOUNT};

/// Requests by operation, tier and outcome (counter).
pub const REQUESTS: &str = "klaviyo_proxy_requests";
/// Upstream responses by operation, tier, status code and status class (counter).
pub const UPSTREAM_RESPONSES: &str = "klaviyo_proxy_upstream_responses";
/// Upstream 401/403 responses by operation, account alias and status (counter).
pub const UPSTREAM_AUTH_FAILURES: &str = "klaviyo_proxy_upstream_auth_failures";
/// Time from sending a request upstream to its response head (histogram, seconds).
pub const UPSTREAM_LATENCY: &str = "klaviyo_proxy_upstream_latency_seconds";
/// Time a request waited in its bucket's queue before leaving (histogram, seconds).
pub const QUEUE_WAIT: &str = "klaviyo_proxy_queue_wait_seconds";
/// Requests waiting in a queue now, by operation and tier (gauge, read at scrape).
pub const QUEUE_DEPTH: &str = "klaviyo_proxy_queue_depth";
/// Tokens left now in each window of each active bucket (gauge, read at scrape).
pub const TOKENS_LEFT: &str = "klaviyo_proxy_tokens_left";
/// Share of each window of each active bucket in use now, 0 to 1 (gauge, read at
/// scrape; the dashboard's "window fill of the busiest buckets").
pub const WINDOW_FILL: &str = "klaviyo_proxy_window_fill_ratio";
/// Klaviyo's last reported `RateLimit-Remaining` per active bucket (gauge).
pub const UPSTREAM_RATELIMIT_REMAINING: &str = "klaviyo_proxy_upstream_ratelimit_remaining";
/// Retries by operation and reason (counter; fed by the retry stage).
pub const RETRIES: &str = "klaviyo_proxy_retries";
/// Retries not made because the retry budget was spent (counter; fed by the retry stage).
pub const RETRY_BUDGET_EXHAUSTED: &str = "klaviyo_proxy_retry_budget_exhausted";
/// Breaker state: 0 closed, 1 half-open, 2 open (gauge; fed by the breaker).
pub const BREAKER_STATE: &str = "klaviyo_proxy_breaker_state";
/// Breaker transitions by from/to state (counter; fed by the breaker).
pub const BREAKER_TRANSITIONS: &str = "klaviyo_proxy_breaker_transitions";
/// Requests held in the spool (gauge; fed by the spool).
pub const SPOOL_DEPTH: &str = "klaviyo_proxy_spool_depth";
/// Age of the oldest spooled request (gauge, seconds; fed by the spool).
pub const SPOOL_OLDEST_AGE: &str = "klaviyo_proxy_spool_oldest_age_seconds";
/// Requests in the dead-letter list (gauge; fed by the spool).
pub const SPOOL_DEAD_LETTERS: &str = "klaviyo_proxy_spool_dead_letters";
/// Health probes of Klaviyo by result (counter).
pub const HEALTH_PROBES: &str = "klaviyo_proxy_health_probes";
/// Config reloads by result: `ok` or `rejected` (counter).
pub const CONFIG_RELOADS: &str = "klaviyo_proxy_config_reloads";

/// Account lookups (`GET /api/accounts` for a new credential) by result: `resolved`,
/// `shared` (another replica's answer, through Redis), or why it could not tell:
/// `forbidden`, `unauthorized`, `throttled`, `unavailable`, `busy`, `invalid` (counter).
pub const ACCOUNT_LOOKUPS: &str = "klaviyo_proxy_account_lookups";
/// Credentials whose account is unknown now, on buckets of their own (gauge).
pub const ACCOUNTS_UNRESOLVED: &str = "klaviyo_proxy_accounts_unresolved";

/// Active buckets held by the limiter (gauge, read at scrape).
pub const ACTIVE_BUCKETS: &str = "klaviyo_proxy_active_buckets";
/// Where limits are decided: 0 local, 1 Redis, 2 degraded (Redis unreachable, local
/// fallback at quota ÷ replicas) (gauge, read at scrape).
pub const LIMITER_STATE: &str = "klaviyo_proxy_limiter_state";

/// Most buckets given their own [`TOKENS_LEFT`] / [`UPSTREAM_RATELIMIT_REMAINING`]
/// series, so a proxy serving many accounts keeps a bounded scrape.
pub const MAX_BUCKET_SERIES: usize = 256;

/// How long a reported `RateLimit-Remaining` counts as current.
const REPORTED_TTL: Duration = Duration::from_secs(60);

/// What became of a request, the `outcome` label of [`REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// Sent upstream without waiting (whatever the upstream answered).
    Forwarded,
    /// Sent upstream after waiting in its bucket's queue.
    Queued,
    /// Answered by the proxy itself: queue full or too long, bad request, auth.
    Rejected,
    /// Accepted into the spool (202) for later replay.
    Spooled,
    /// The upstream could not be reached or did not answer, or the proxy failed.
    Failed,
    /// Cloudflare in front of Klaviyo challenged the request (`cf-mitigated:
    /// challenge`): neither a key failure nor an outage.
    Challenged,
}

impl RequestOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Forwarded => "forwarded",
            RequestOutcome::Queued => "queued",
            RequestOutcome::Rejected => "rejected",
            RequestOutcome::Spooled => "spooled",
            RequestOutcome::Failed => "failed",
            RequestOutcome::Challenged => "challenged",
        }
    }
}

/// Breaker states as [`BREAKER_STATE`] encodes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed = 0,
    /// A few requests probe.
    HalfOpen = 1,
    /// Requests fail fast.
    Open = 2,
}

impl BreakerState {
    fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: &'static str,
    tier: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    tier: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    operation: &'static str,
    tier: &'static str,
    status: u16,
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    operation: &'static str,
    account: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    account: String,
    operation: &'static str,
    bucket: &'static str,
    window: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportedLabels {
    account: String,
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    operation: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type HistogramFamily = Family<OpLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
}

fn wait_histogram() -> Histogram {
    Histogram::new([0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
}

/// Every metric of one app and the registry that encodes them.
pub struct Metrics {
    /// Tells this instance's handles apart in the per-thread cache ([`hot`]).
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_responses: Family<ResponseLabels, Counter>,
    auth_failures: Family<AuthLabels, Counter>,
    upstream_latency: HistogramFamily,
    queue_wait: HistogramFamily,
    queue_depth: Family<OpLabels, Gauge>,
    active_buckets: Gauge,
    limiter_state: Gauge,
    tokens_left: Family<TokenLabels, Gauge>,
    window_fill: Family<TokenLabels, Gauge<f64, AtomicU64>>,
    reported_remaining: Family<ReportedLabels, Gauge>,
    retries: Family<RetryLabels, Counter>,
    retry_budget_exhausted: Family<OperationLabel, Counter>,
    breaker_state: Gauge,
    breaker_transitions: Family<TransitionLabels, Counter>,
    /// Requests held in the spool (set by the spool).
    pub spool_depth: Gauge,
    /// Age in seconds of the oldest spooled request (set by the spool).
    pub spool_oldest_age_seconds: Gauge,
    /// Requests in the dead-letter list (set by the spool).
    pub spool_dead_letters: Gauge,
    health_probes: Family<ResultLabel, Counter>,
    config_reloads: Family<ResultLabel, Counter>,
    /// The event coalescer's metrics.
    pub coalesce: CoalesceMetrics,
    /// Klaviyo's last `RateLimit-Remaining` per (account, endpoint), with when it came.
    reported: Mutex<accounts::Reported>,
    /// Account names and which accounts have series of their own (the top ones by
    /// traffic; the rest are `other`).
    accounts: RwLock<accounts::AccountSeries>,
    /// The auth-failure label sets issued, to remove an account's when it stops being shown.
    auth_series: Mutex<std::collections::HashSet<AuthLabels>>,
    account_lookups: Family<ResultLabel, Counter>,
    accounts_unresolved: Gauge,
    /// One scrape at a time: a scrape clears and refills the limiter gauges.
    scrape: Mutex<()>,
    /// The webhook gate's metrics (registered whether or not the gate runs).
    pub webhooks: crate::webhooks::WebhookMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The operation that names an endpoint's bucket in labels (its first catalog row).
pub(crate) fn endpoint_label(endpoint: usize) -> &'static str {
    catalog::OPERATIONS.iter().find(|o| o.endpoint == endpoint).map_or("unknown", |o| o.id)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Metrics {
    /// A fresh registry with every metric registered (at zero).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        registry.register(REQUESTS, "Client requests by operation, tier and outcome", requests.clone());
        let upstream_responses = Family::default();
        registry.register(
            UPSTREAM_RESPONSES,
            "Upstream responses by operation, tier, status and status class",
            upstream_responses.clone(),
        );
        let auth_failures = Family::default();
        registry.register(
            UPSTREAM_AUTH_FAILURES,
            "Upstream 401 and 403 responses by operation and account alias",
            auth_failures.clone(),
        );
        let upstream_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            UPSTREAM_LATENCY,
            "Time from sending a request upstream to its response head",
            upstream_latency.clone(),
        );
        let queue_wait: HistogramFamily = Family::new_with_constructor(wait_histogram);
        registry.register(QUEUE_WAIT, "Time requests waited for their slot", queue_wait.clone());
        let queue_depth = Family::default();
        registry.register(QUEUE_DEPTH, "Requests waiting for their slot now", queue_depth.clone());
        let active_buckets = Gauge::default();
        registry.register(ACTIVE_BUCKETS, "Buckets the limiter holds now", active_buckets.clone());
        let limiter_state = Gauge::default();
        registry.register(
            LIMITER_STATE,
            "Where limits are decided: 0 local, 1 redis, 2 degraded (local fallback)",
            limiter_state.clone(),
        );
        let tokens_left = Family::default();
        registry.register(TOKENS_LEFT, "Tokens left now per window of each active bucket", tokens_left.clone());
        let window_fill = Family::default();
        registry.register(WINDOW_FILL, "Share of each window of each active bucket in use now", window_fill.clone());
        let reported_remaining = Family::default();
        registry.register(
            UPSTREAM_RATELIMIT_REMAINING,
            "Klaviyo's last RateLimit-Remaining per active bucket (steady window)",
            reported_remaining.clone(),
        );
        let retries = Family::default();
        registry.register(RETRIES, "Upstream retries by operation and reason", retries.clone());
        let retry_budget_exhausted = Family::default();
        registry.register(
            RETRY_BUDGET_EXHAUSTED,
            "Retries not made because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let breaker_state = Gauge::default();
        registry.register(BREAKER_STATE, "Circuit breaker state: 0 closed, 1 half-open, 2 open", breaker_state.clone());
        let breaker_transitions = Family::default();
        registry.register(BREAKER_TRANSITIONS, "Circuit breaker transitions", breaker_transitions.clone());
        let spool_depth = Gauge::default();
        registry.register(SPOOL_DEPTH, "Requests held in the spool", spool_depth.clone());
        let spool_oldest_age_seconds = Gauge::default();
        registry.register(SPOOL_OLDEST_AGE, "Age of the oldest spooled request", spool_oldest_age_seconds.clone());
        let spool_dead_letters = Gauge::default();
        registry.register(SPOOL_DEAD_LETTERS, "Requests in the dead-letter list", spool_dead_letters.clone());
        let health_probes = Family::default();
        registry.register(HEALTH_PROBES, "Klaviyo health probes by result", health_probes.clone());
        let config_reloads = Family::default();
        registry.register(CONFIG_RELOADS, "Config reloads by result", config_reloads.clone());
        let account_lookups = Family::default();
        registry.register(ACCOUNT_LOOKUPS, "Account lookups for new credentials by result", account_lookups.clone());
        let accounts_unresolved = Gauge::default();
        registry.register(
            ACCOUNTS_UNRESOLVED,
            "Credentials whose account is unknown, on buckets of their own",
            accounts_unresolved.clone(),
        );
        let webhooks = crate::webhooks::WebhookMetrics::register(&mut registry);
        let coalesce = CoalesceMetrics::register(&mut registry);
        Metrics {
            id: hot::next_id(),
            registry,
            requests,
            upstream_responses,
            auth_failures,
            upstream_latency,
            queue_wait,
            queue_depth,
            active_buckets,
            limiter_state,
            tokens_left,
            window_fill,
            reported_remaining,
            retries,
            retry_budget_exhausted,
            breaker_state,
            breaker_transitions,
            spool_depth,
            spool_oldest_age_seconds,
            spool_dead_letters,
            health_probes,
            config_reloads,
            coalesce,
            reported: Mutex::new(accounts::Reported::default()),
            accounts: RwLock::new(accounts::AccountSeries::default()),
            auth_series: Mutex::new(Default::default()),
            account_lookups,
            accounts_unresolved,
            scrape: Mutex::new(()),
            webhooks,
        }
    }

    /// Sets the configured account names (at start and on reload).
    pub fn set_account_names(&self, names: HashMap<Account, String>) {
        self.accounts.write().unwrap_or_else(PoisonError::into_inner).set_configured(names);
    }

    /// Names a bucket account by the Klaviyo account it was resolved to.
    pub fn name_account(&self, account: Account, name: &str) {
        if !self.accounts.read().unwrap_or_else(PoisonError::into_inner).knows(account, name) {
            self.accounts.write().unwrap_or_else(PoisonError::into_inner).learn(account, name.to_owned());
        }
    }

    /// An account as a label, bounded: for the top [`MAX_ACCOUNT_SERIES`] accounts by
    /// upstream traffic their configured name, Klaviyo id, or else hash alias; for
    /// every other account [`OTHER_ACCOUNT`]. Every per-account series uses it.
    pub fn account_label(&self, account: Account) -> String {
        self.accounts.read().unwrap_or_else(PoisonError::into_inner).label(account)
    }

    /// An account's name for logs (unbounded, unlike [`Metrics::account_label`]): its
    /// configured name, Klaviyo id, or hash alias.
    pub fn account_name(&self, account: Account) -> String {
        self.accounts.read().unwrap_or_else(PoisonError::into_inner).name(account)
    }

    /// Counts an account lookup by its result (see [`ACCOUNT_LOOKUPS`]).
    pub fn account_lookup(&self, result: &'static str) {
        self.account_lookups.get_or_create(&ResultLabel { result }).inc();
    }

    /// Sets how many credentials are on buckets of their own for want of an account.
    pub fn accounts_unresolved(&self, n: usize) {
        self.accounts_unresolved.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a finished client request.
    pub fn request(&self, operation: &'static str, tier: &'static str, outcome: RequestOutcome) {
        self.hot(operation, tier, |h| {
            h.requests[outcome as usize]
                .get_or_init(|| {
                    self.requests.get_or_create(&RequestLabels { operation, tier, outcome: outcome.as_str() }).clone()
                })
                .inc();
        });
    }

    /// Records a request's wait for its slot.
    pub fn queue_wait(&self, operation: &'static str, tier: &'static str, waited: Duration) {
        self.hot(operation, tier, |h| {
            h.queue_wait
                .get_or_init(|| self.queue_wait.get_or_create(&OpLabels { operation, tier }).clone())
                .observe(secs(waited));
        });
    }

    /// Runs `f` with this thread's handles on the series of `(operation, tier)`.
    fn hot<R>(&self, operation: &'static str, tier: &'static str, f: impl FnOnce(&hot::Handles) -> R) -> R {
        hot::with(self.id, operation, tier, f)
    }

    /// Records an upstream response: status, latency, auth failures and Klaviyo's
    /// reported `RateLimit-Remaining` for the request's endpoint bucket.
    pub fn upstream_response(
        &self,
        route: &crate::route::Route,
        status: u16,
        latency: Duration,
        remaining: Option<i64>,
    ) {
        let (operation, tier) = (route.label(), route.tier());
        self.upstream_answer(operation, tier, status, latency);
        self.accounts.write().unwrap_or_else(PoisonError::into_inner).note(route.account);
        if status == 401 || status == 403 {
            let labels = AuthLabels { operation, account: self.account_label(route.account), status };
            self.auth_failures.get_or_create(&labels).inc();
            self.auth_series.lock().unwrap_or_else(PoisonError::into_inner).insert(labels);
        }
        if let (Some(remaining), Some(op)) = (remaining, route.operation) {
            let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            reported.insert((route.account, op.endpoint), remaining, Instant::now());
        }
    }

    /// Records a Cloudflare challenge (`403 cf-mitigated: challenge`) as an upstream
    /// response, but not as an auth failure: the key was never looked at.
    pub fn upstream_challenge(&self, route: &crate::route::Route, latency: Duration) {
        self.upstream_answer(route.label(), route.tier(), 403, latency);
    }

    fn upstream_answer(&self, operation: &'static str, tier: &'static str, status: u16, latency: Duration) {
        self.hot(operation, tier, |h| {
            h.response(status, || {
                self.upstream_responses
                    .get_or_create(&ResponseLabels { operation, tier, status, class: status_class(status) })
                    .clone()
            })
            .inc();
            h.latency
                .get_or_init(|| self.upstream_latency.get_or_create(&OpLabels { operation, tier }).clone())
                .observe(secs(latency));
        });
    }

    /// Counts a retry (fed by the retry stage); `reason` is a fixed word such as
    /// `throttled`, `server_error`, `timeout` or `connect`.
    pub fn retry(&self, operation: &'static str, reason: &'static str) {
        self.retries.get_or_create(&RetryLabels { operation, reason }).inc();
    }

    /// Counts a retry refused by the budget (fed by the retry stage).
    pub fn retry_budget_exhausted(&self, operation: &'static str) {
        self.retry_budget_exhausted.get_or_create(&OperationLabel { operation }).inc();
    }

    /// Records a breaker transition and its new state (fed by the breaker).
    pub fn breaker_transition(&self, from: BreakerState, to: BreakerState) {
        self.breaker_transitions.get_or_create(&TransitionLabels { from: from.as_str(), to: to.as_str() }).inc();
        self.breaker_state.set(to as i64);
    }

    /// The breaker state as last reported ([`BreakerState`] as a number).
    pub fn breaker_state(&self) -> i64 {
        self.breaker_state.get()
    }

    /// Counts a health probe by its result (`healthy`, `degraded`, `down`).
    pub fn health_probe(&self, result: &'static str) {
        self.health_probes.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a config reload (`ok` or `rejected`).
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads.get_or_create(&ResultLabel { result: if ok { "ok" } else { "rejected" } }).inc();
    }

    /// Refreshes the gauges read from the limiter, then encodes every metric in the
    /// OpenMetrics text format.
    pub fn encode(&self, store: &LocalStore) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(store);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String never fails");
        out
    }

    /// Records where limits are decided now (read at scrape, before [`Metrics::encode`]).
    pub fn limiter_state(&self, state: StoreState) {
        self.limiter_state.set(match state {
            StoreState::Local => 0,
            StoreState::Redis => 1,
            StoreState::Degraded => 2,
        });
    }

    /// The gauges that describe the limiter now: queue depth, tokens left and the
    /// upstream's reported remaining, for active buckets only.
    fn refresh(&self, store: &LocalStore) {
        let now = Instant::now();
        let dropped = self.accounts.write().unwrap_or_else(PoisonError::into_inner).rerank();
        if !dropped.is_empty() {
            self.auth_series.lock().unwrap_or_else(PoisonError::into_inner).retain(|labels| {
                let keep = !dropped.contains(&labels.account);
                if !keep {
                    self.auth_failures.remove(labels);
                }
                keep
            });
        }
        let mut tokens: HashMap<TokenLabels, (i64, f64)> = HashMap::new();
        self.queue_depth.clear();
        self.tokens_left.clear();
        self.window_fill.clear();
        self.reported_remaining.clear();
        let mut depth: HashMap<OpLabels, i64> = HashMap::new();
        let mut views = store.snapshot(now);
        self.active_buckets.set(i64::try_from(views.len()).unwrap_or(i64::MAX));
        // Per-bucket series are bounded: the most constrained buckets (least share of a
        // window left) are the ones worth seeing.
        let share_left = |v: &BucketView| {
            v.windows
                .iter()
                .map(|(spec, used)| 1.0 - (*used as f64 / f64::from(spec.limit.max(1))))
                .fold(f64::INFINITY, f64::min)
        };
        if views.len() > MAX_BUCKET_SERIES {
            views.sort_by(|a, b| share_left(a).total_cmp(&share_left(b)));
        }
        for (n, view) in views.into_iter().enumerate() {
            let (operation, tier, bucket) = match view.key.bucket {
                BucketId::Endpoint(e) => {
                    let op = endpoint_label(usize::from(e));
                    (op, catalog::by_id(op).map_or("unknown", |o| o.tier.as_str()), "endpoint")
                }
                BucketId::Condition(e, _) => (endpoint_label(usize::from(e)), "condition", "condition"),
                BucketId::Unknown => ("unknown", "unknown", "endpoint"),
            };
            // A request with a conditional limit waits in two queues; count it once.
            if bucket == "endpoint" {
                *depth.entry(OpLabels { operation, tier }).or_default() += i64::from(view.queued);
            }
            if n >= MAX_BUCKET_SERIES {
                continue;
            }
            let account = self.account_label(view.key.account);
            for (window, (spec, in_use)) in ["burst", "steady", "daily"].into_iter().zip(view.windows) {
                let left = i64::try_from(u64::from(spec.limit).saturating_sub(in_use)).unwrap_or(i64::MAX);
                let fill = in_use as f64 / f64::from(spec.limit.max(1));
                // Buckets of `other` accounts share a series: the least left (the
                // fullest window) shows.
                let labels = TokenLabels { account: account.clone(), operation, bucket, window };
                let slot = tokens.entry(labels).or_insert((left, fill));
                *slot = (slot.0.min(left), slot.1.max(fill));
            }
        }
        for (labels, (left, fill)) in tokens {
            self.window_fill.get_or_create(&labels).set(fill);
            self.tokens_left.get_or_create(&labels).set(left);
        }
        for (labels, n) in depth {
            self.queue_depth.get_or_create(&labels).set(n);
        }
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        reported.keep(|at| now.duration_since(at) < REPORTED_TTL);
        let mut lowest: Vec<_> = reported.iter().collect();
        lowest.sort_unstable();
        let mut seen = std::collections::HashSet::new();
        for (remaining, (account, endpoint)) in lowest.into_iter().take(MAX_BUCKET_SERIES) {
            let labels = ReportedLabels { account: self.account_label(account), operation: endpoint_label(endpoint) };
            // Sorted lowest first: an `other` series shows its account with the least left.
            if seen.insert(labels.clone()) {
                self.reported_remaining.get_or_create(&labels).set(remaining);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::route::Router;

    #[tokio::test(start_paused = true)]
    async fn reported_remaining_stays_bounded_without_scrapes() {
        let metrics = Metrics::new();
        let router = Router::new(&Config::default().limits, b"k");
        for n in 0..2 * accounts::MAX_REPORTED as u32 {
            let key = format!("Klaviyo-API-Key pk_bogus_{n}");
            let r = router.route("GET", "/api/profiles", None, false, Some(key.as_bytes()));
            metrics.upstream_response(&r, 401, Duration::from_millis(5), Some(9));
        }
        let held = metrics.reported.lock().unwrap().len();
        assert!(held <= accounts::MAX_REPORTED, "{held} reports held");
        // The newest reports are the ones kept: a live account still shows.
        let live = router.route("GET", "/api/profiles", None, false, Some(b"Klaviyo-API-Key pk_live"));
        metrics.upstream_response(&live, 200, Duration::from_millis(5), Some(3));
        let text = metrics.encode(&LocalStore::new());
        let shown = "operation=\"get_profiles\"} 3";
        assert!(text.lines().any(|l| l.starts_with(UPSTREAM_RATELIMIT_REMAINING) && l.ends_with(shown)), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn encodes_counters_gauges_and_active_buckets() {
        let metrics = Metrics::new();
        let store = LocalStore::new();
        let router = Router::new(&Config::default().limits, b"k");
        let route = router.route("GET", "/api/accounts", None, false, Some(b"Klaviyo-API-Key pk_secret"));
        // Off the store's epoch tick, where a window's start saturates at zero.
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        store.reserve(&route.demands, now, now, 10).unwrap();
        metrics.request(route.label(), route.tier(), RequestOutcome::Forwarded);
        metrics.upstream_response(&route, 401, Duration::from_millis(20), Some(14));
        let text = metrics.encode(&store);
        let alias = route.account.alias();
        for line in [
            "klaviyo_proxy_requests_total{operation=\"get_accounts\",tier=\"XS\",outcome=\"forwarded\"} 1".to_string(),
            "klaviyo_proxy_upstream_responses_total{operation=\"get_accounts\",tier=\"XS\",status=\"401\",class=\"4xx\"} 1"
                .to_string(),
            format!(
                "klaviyo_proxy_upstream_auth_failures_total{{operation=\"get_accounts\",account=\"{alias}\",status=\"401\"}} 1"
            ),
            format!(
                "klaviyo_proxy_tokens_left{{account=\"{alias}\",operation=\"get_accounts\",bucket=\"endpoint\",window=\"burst\"}} 0"
            ),
            format!(
                "klaviyo_proxy_tokens_left{{account=\"{alias}\",operation=\"get_accounts\",bucket=\"endpoint\",window=\"steady\"}} 14"
            ),
            format!("klaviyo_proxy_upstream_ratelimit_remaining{{account=\"{alias}\",operation=\"get_accounts\"}} 14"),
            format!(
                "klaviyo_proxy_window_fill_ratio{{account=\"{alias}\",operation=\"get_accounts\",bucket=\"endpoint\",window=\"burst\"}} 1.0"
            ),
            "klaviyo_proxy_breaker_state 0".to_string(),
            "klaviyo_proxy_spool_dead_letters 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("pk_secret"));
        // Reported numbers older than a window are no longer "active".
        tokio::time::advance(REPORTED_TTL).await;
        assert!(!metrics.encode(&store).contains("klaviyo_proxy_upstream_ratelimit_remaining{"));
        // Many accounts: the series stay bounded, the most constrained bucket shown.
        let hot = router.route("GET", "/api/profiles", None, false, Some(b"Klaviyo-API-Key pk_hot"));
        for n in 0..400u32 {
            let key = format!("Klaviyo-API-Key pk_{n}");
            let r = router.route("GET", "/api/profiles", None, false, Some(key.as_bytes()));
            store.reserve(&r.demands, Instant::now(), Instant::now(), 10).unwrap();
            metrics.upstream_response(&r, 401, Duration::from_millis(5), None);
        }
        for _ in 0..75 {
            store.reserve(&hot.demands, Instant::now(), Instant::now(), 10).unwrap();
            metrics.upstream_response(&hot, 200, Duration::from_millis(5), None);
        }
        let text = metrics.encode(&store);
        assert!(text.contains("klaviyo_proxy_active_buckets 402"), "{text}");
        // Per-account series are bounded: the top accounts by traffic, then `other`.
        let accounts = |prefix: &str| {
            let set: std::collections::HashSet<String> = text
                .lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.split("account=\"").nth(1)?.split('"').next().map(str::to_string))
                .collect();
            set
        };
        let shown = accounts("klaviyo_proxy_tokens_left{");
        assert!(shown.len() <= MAX_ACCOUNT_SERIES + 1 && shown.contains(OTHER_ACCOUNT), "{shown:?}");
        let failing = accounts("klaviyo_proxy_upstream_auth_failures_total{");
        assert!(failing.len() <= MAX_ACCOUNT_SERIES + 1 && failing.contains(OTHER_ACCOUNT), "{failing:?}");
        assert!(text.contains(&format!(
            "klaviyo_proxy_tokens_left{{account=\"{}\",operation=\"get_profiles\",bucket=\"endpoint\",window=\"burst\"}} 0",
            hot.account.alias()
        )));
        // `other` shows the least left among its buckets (each took one of 75).
        assert!(text.contains(
            "klaviyo_proxy_tokens_left{account=\"other\",operation=\"get_profiles\",bucket=\"endpoint\",window=\"burst\"} 74"
        ));
        // An account that falls out of the top loses its auth-failure series.
        for _ in 0..8 {
            for _ in 0..10 {
                metrics.upstream_response(&hot, 200, Duration::from_millis(5), None);
            }
            metrics.encode(&store);
        }
        let failing = accounts("klaviyo_proxy_upstream_auth_failures_total{");
        assert!(failing.len() <= MAX_ACCOUNT_SERIES + 1, "{failing:?}");
        metrics.breaker_transition(BreakerState::Closed, BreakerState::Open);
        let text = metrics.encode(&store);
        assert!(text.contains("klaviyo_proxy_breaker_state 2"));
        assert!(text.contains("klaviyo_proxy_breaker_transitions_total{from=\"closed\",to=\"open\"} 1"));
    }

    /// Scrape cost with many active buckets; run with
    /// `cargo test --release --lib scrape_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn scrape_cost() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let metrics = Metrics::new();
            let store = LocalStore::new();
            let router = Router::new(&Config::default().limits, b"k");
            tokio::time::sleep(Duration::from_millis(2)).await;
            for n in 0..100_000u32 {
                let key = format!("Klaviyo-API-Key pk_{n}");
                let r = router.route("GET", "/api/profiles", None, false, Some(key.as_bytes()));
                store.reserve(&r.demands, Instant::now(), Instant::now(), 10).unwrap();
                metrics.upstream_response(&r, 200, Duration::from_millis(5), Some(749));
            }
            for _ in 0..2 {
                let started = std::time::Instant::now();
                let text = metrics.encode(&store);
                eprintln!("scrape of 100000 buckets: {:?}, {} bytes", started.elapsed(), text.len());
            }
            let route = router.route("GET", "/api/profiles", None, false, Some(b"Klaviyo-API-Key pk_x"));
            let started = std::time::Instant::now();
            for _ in 0..1_000_000 {
                metrics.request(route.label(), route.tier(), RequestOutcome::Forwarded);
                metrics.queue_wait(route.label(), route.tier(), Duration::ZERO);
                metrics.upstream_response(&route, 200, Duration::from_millis(5), Some(700));
            }
            eprintln!("per-request metrics: {:?}", started.elapsed() / 1_000_000);
        });
    }
}

/// Coalesced events by state: accepted, repeated (an `Idempotency-Key` seen before),
/// refused (coalescer full), batched, delivered, dead_lettered (counter).
pub const COALESCE_EVENTS: &str = "klaviyo_proxy_coalesce_events";
/// Events per bulk job sent (histogram).
pub const COALESCE_BATCH_SIZE: &str = "klaviyo_proxy_coalesce_batch_size";
/// Jobs split in halves after a 400 without a usable pointer (counter).
pub const COALESCE_SPLITS: &str = "klaviyo_proxy_coalesce_batch_splits";
/// Coalesced events not yet delivered (gauge).
pub const COALESCE_PENDING: &str = "klaviyo_proxy_coalesce_pending_events";
/// Age of the oldest undelivered coalesced event (gauge).
pub const COALESCE_OLDEST_AGE: &str = "klaviyo_proxy_coalesce_oldest_age_seconds";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The event coalescer's metrics (registered with the app's others).
#[derive(Debug, Clone)]
pub struct CoalesceMetrics {
    events: Family<StateLabel, Counter>,
    /// Events per job.
    pub batch_size: Histogram,
    /// Jobs halved.
    pub splits: Counter,
    /// Undelivered events.
    pub pending: Gauge,
    /// Oldest undelivered event's age, seconds.
    pub oldest_age_seconds: Gauge,
}

impl CoalesceMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = CoalesceMetrics {
            events: Family::default(),
            batch_size: Histogram::new([1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 750.0, 900.0, 1000.0]),
            splits: Counter::default(),
            pending: Gauge::default(),
            oldest_age_seconds: Gauge::default(),
        };
        registry.register(COALESCE_EVENTS, "Coalesced create_event calls by state", m.events.clone());
        registry.register(COALESCE_BATCH_SIZE, "Events per bulk_create_events job", m.batch_size.clone());
        registry.register(COALESCE_SPLITS, "Bulk jobs split after a 400 without a usable pointer", m.splits.clone());
        registry.register(COALESCE_PENDING, "Coalesced events not yet delivered", m.pending.clone());
        registry.register(
            COALESCE_OLDEST_AGE,
            "Age of the oldest undelivered coalesced event",
            m.oldest_age_seconds.clone(),
        );
        m
    }

    /// A detached set, for tests and benches.
    pub fn detached() -> Self {
        Self::register(&mut Registry::default())
    }

    /// Counts one event in `state`.
    pub fn event(&self, state: &'static str) {
        self.events.get_or_create(&StateLabel { state }).inc();
    }

    /// Counts `n` events in `state`.
    pub fn events(&self, state: &'static str, n: u64) {
        if n > 0 {
            self.events.get_or_create(&StateLabel { state }).inc_by(n);
        }
    }

    /// Events counted in `state` so far.
    pub fn count(&self, state: &'static str) -> u64 {
        self.events.get_or_create(&StateLabel { state }).get()
    }
}
