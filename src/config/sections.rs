//! One struct per table of the config file, each with the defaults the embedded file
//! spells out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::*;
use super::DEFAULT_REVISION;

/// What to do with a phone number that is not E.164 (`checks.phone_e164`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhoneCheck {
    /// Count it for the checklist; forward the request.
    #[default]
    Count,
    /// Answer 400 `proxy_phone_not_e164` before the request spends any quota.
    Reject,
}

/// `[checks]`
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// Phone numbers in profile and event bodies that are not E.164.
    pub phone_e164: PhoneCheck,
}

/// `[coalesce]`: single `create_event` calls delivered as `bulk_create_events` jobs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalesceConfig {
    /// Accept `POST /api/events` durably (202) and deliver them in bulk jobs.
    pub events: bool,
    /// The coalescer's file (redb); default: the spool's path with `.events` added.
    pub path: Option<PathBuf>,
    /// Longest an event waits for its job to fill.
    pub linger_ms: u64,
    /// Most undelivered events held; more are refused with 503 until some are delivered.
    pub max_pending: u64,
    /// `/health` degrades when the oldest undelivered event is older than this.
    pub max_lag_ms: u64,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig { events: false, path: None, linger_ms: 250, max_pending: 1_000_000, max_lag_ms: 60_000 }
    }
}

impl CoalesceConfig {
    /// The coalescer's file, when coalescing is on.
    pub fn store_path(&self, spool: &SpoolConfig) -> Option<PathBuf> {
        if !self.events {
            return None;
        }
        self.path.clone().or_else(|| {
            spool.path.as_ref().map(|p| {
                let mut s = p.clone().into_os_string();
                s.push(".events");
                PathBuf::from(s)
            })
        })
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address of `/metrics`, `/health`, `/ready`, `/live`, `/admin/reload`;
    /// loopback by default.
    pub listen: SocketAddr,
    /// How long a `/health` probe of Klaviyo is reused (its `GET /api/accounts` is XS tier).
    pub health_cache_ms: u64,
    /// Longest the probe waits for a token before `/health` reports rate-limited.
    pub health_max_wait_ms: u64,
    /// Token every admin route but `/live` and `/ready` needs (`Authorization: Bearer`);
    /// required when `listen` is off loopback.
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            health_cache_ms: 30_000,
            health_max_wait_ms: 2_000,
            token: None,
        }
    }
}

/// `[preflight]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreflightConfig {
    /// Klaviyo's status page, statuspage.io `api/v2/status.json` format.
    pub status_url: String,
}

impl Default for PreflightConfig {
    fn default() -> Self {
        PreflightConfig { status_url: "https://status.klaviyo.com/api/v2/status.json".into() }
    }
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address; loopback by default.
    pub listen: SocketAddr,
    /// Serving threads, each a current-thread runtime on its own `SO_REUSEPORT`
    /// listener; 0 means one per core.
    pub threads: usize,
    /// Token clients must present as `Proxy-Authorization: Bearer ...`.
    pub client_token: Option<Secret>,
    /// Allow a non-loopback listener without a client token.
    pub allow_unauthenticated_remote: bool,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// Time allowed to read a request's head and body.
    pub client_read_timeout_ms: u64,
    /// At SIGTERM/SIGINT, how long in-flight and queued requests may take to finish.
    pub drain_timeout_ms: u64,
    // Hardening (issue 13).
    /// Public names clients reach the proxy by, besides `localhost` and IP literals
    /// (a `Host` naming anything else is refused with 421).
    pub allowed_hosts: Vec<String>,
    /// Time a new connection has to send its first byte.
    pub first_byte_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed (HTTP/1 and 2).
    pub idle_timeout_ms: u64,
    /// HTTP/2 keep-alive ping interval; a peer silent for another interval is dropped.
    pub keep_alive_interval_ms: u64,
    /// Open connections per listener; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// All request bodies held in memory at once (buffered and queued); beyond it 503.
    pub max_buffered_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 0,
            client_token: None,
            allow_unauthenticated_remote: false,
            max_body_bytes: 5 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            client_read_timeout_ms: 30_000,
            drain_timeout_ms: 30_000,
            allowed_hosts: Vec::new(),
            first_byte_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            keep_alive_interval_ms: 30_000,
            max_connections: 4096,
            max_buffered_bytes: 128 * 1024 * 1024,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of Klaviyo (or the simulator).
    pub url: UpstreamUrl,
    /// `revision` header added when a request has none.
    pub revision: Revision,
    /// Extra PEM CA certificates trusted besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// TCP + TLS connect timeout.
    pub connect_timeout_ms: u64,
    /// Time from sending a request to its response head.
    pub request_timeout_ms: u64,
    /// Idle pooled connections close after this long.
    pub pool_idle_timeout_ms: u64,
    /// Idle pooled connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// The kill switch: `false` answers every request 503 `proxy_disabled` at once
    /// (`KLAVIYO_ENABLED=false` sets it).
    pub enabled: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: UpstreamUrl::try_from("https://a.klaviyo.com".to_string()).expect("valid default"),
            revision: Revision(DEFAULT_REVISION.to_string()),
            ca_file: None,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 60_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 64,
            enabled: true,
        }
    }
}

/// How requests are authenticated upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// The client's `Authorization` header goes upstream unchanged.
    #[default]
    PassThrough,
    /// The proxy adds its own key to requests that carry none.
    Inject,
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `pass-through` or `inject`.
    pub mode: AuthMode,
    /// File holding the private key (inject mode); `KLAVIYO_PRIVATE_KEY` wins over it.
    pub key_file: Option<PathBuf>,
    /// In inject mode, whether clients may still send their own key.
    pub allow_client_keys: bool,
    /// Secret for the keyed hash that names accounts in bucket keys. Random per start
    /// when unset; replicas sharing limits must share it.
    pub account_hash_key: Option<Secret>,
    /// The injected key's account (its Klaviyo id or a name): its buckets and its name
    /// in metrics and logs, with no lookup. Unset, the account is looked up at start.
    pub account_name: Option<AccountName>,
    /// When set, only operations whose catalog scopes these grant are forwarded; the
    /// rest get 403 `proxy_scope_forbidden` (`X:write` grants `X:read`).
    pub allowed_scopes: Option<Vec<Scope>>,
    /// The OAuth app whose access tokens clients send as `Bearer ...`: an app's quota
    /// in an account is its own, so its buckets are (account, this app).
    pub oauth_app: AccountName,
    /// The resolved private key (never read from the file's `[auth]` table directly).
    #[serde(skip_deserializing)]
    pub private_key: Option<Secret>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::PassThrough,
            key_file: None,
            allow_client_keys: true,
            account_hash_key: None,
            account_name: None,
            allowed_scopes: None,
            oauth_app: AccountName("default".into()),
            private_key: None,
        }
    }
}

/// Limits of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per 1 s window.
    pub burst_per_second: NonZeroU32,
    /// Requests per 60 s window.
    pub steady_per_minute: NonZeroU32,
    /// Requests per day, if capped.
    #[serde(default)]
    pub daily_per_day: Option<NonZeroU32>,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Off only to measure the proxy's own overhead: requests then go unlimited.
    pub enabled: bool,
    /// Scale every limit by this share of the account's quota.
    pub share: Share,
    /// Added to the 1 s window to absorb network jitter.
    pub burst_guard_ms: u64,
    /// Added to the 60 s window.
    pub steady_guard_ms: u64,
    /// Added to the daily window.
    pub daily_guard_ms: u64,
    /// The bucket for `/api` paths the catalog does not know.
    pub unknown: Limits,
    /// Per-operation overrides, by `operationId`.
    pub operations: BTreeMap<OperationName, Limits>,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero constant")
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            enabled: true,
            share: Share(1.0),
            burst_guard_ms: 50,
            steady_guard_ms: 250,
            daily_guard_ms: 60_000,
            unknown: Limits { burst_per_second: nz(1), steady_per_minute: nz(15), daily_per_day: None },
            operations: BTreeMap::new(),
        }
    }
}

/// `[queue]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Most requests waiting per bucket.
    pub max_depth: u32,
    /// Longest a request waits for its slot (`X-Proxy-Max-Wait-Ms` may shorten it).
    pub max_wait_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { max_depth: 1000, max_wait_ms: 30_000 }
    }
}

/// `[retry]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all for a 5xx, timeout or connection error, the first included.
    pub max_attempts: NonZeroU32,
    /// Backoff ceiling of the first retry; it doubles per retry (full jitter).
    pub base_ms: u64,
    /// Backoff ceiling never exceeded.
    pub cap_ms: u64,
    /// Retries allowed per first attempt over the budget window.
    pub budget_ratio: f64,
    /// Retries allowed per second regardless of traffic.
    pub budget_floor_per_second: u32,
    /// The budget's rolling window.
    pub budget_window_ms: u64,
    /// An upstream `Retry-After` longer than this is cut to it.
    pub retry_after_cap_ms: u64,
    /// Add a `unique_id` to created events that lack one, so repeats are deduplicated.
    pub add_unique_id: bool,
    /// Per operation: `always` (safe to repeat) or `never` (only when never sent).
    pub operations: BTreeMap<OperationName, crate::retry::RetryOverride>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: nz(6),
            base_ms: 100,
            cap_ms: 5_000,
            budget_ratio: 0.3,
            budget_floor_per_second: 1,
            budget_window_ms: 10_000,
            retry_after_cap_ms: 120_000,
            add_unique_id: true,
            operations: BTreeMap::new(),
        }
    }
}

/// `[breaker]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Off: every request is tried, however the upstream fares.
    pub enabled: bool,
    /// Rolling window for the failure ratio.
    pub window_ms: u64,
    /// Requests in the window before the ratio counts.
    pub min_requests: u32,
    /// Failure ratio (5xx, timeouts, connection errors) that opens the breaker.
    pub failure_ratio: Share,
    /// Failures of any kind in a row (5xx, timeouts, resets, refused connections) that
    /// open it at once. `consecutive_connect_failures` is its former name.
    #[serde(alias = "consecutive_connect_failures")]
    pub consecutive_failures: NonZeroU32,
    /// Time open before the first probe; it doubles after every failed probe.
    pub cool_down_ms: u64,
    /// The longest time between probes (never less than `cool_down_ms`).
    pub cool_down_max_ms: u64,
    /// Probes let through at once while half-open; this many successes close it.
    pub probes: NonZeroU32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            window_ms: 10_000,
            min_requests: 20,
            failure_ratio: Share(0.5),
            consecutive_failures: nz(3),
            cool_down_ms: 500,
            cool_down_max_ms: 1_000,
            probes: nz(1),
        }
    }
}

impl BreakerConfig {
    /// The breaker's settings.
    pub fn settings(&self) -> crate::breaker::BreakerSettings {
        crate::breaker::BreakerSettings {
            window: Duration::from_millis(self.window_ms),
            min_requests: self.min_requests,
            failure_ratio: self.failure_ratio.get(),
            consecutive_failures: self.consecutive_failures.get(),
            probe_interval: Duration::from_millis(self.cool_down_ms),
            probe_interval_max: Duration::from_millis(self.cool_down_max_ms),
            probes: self.probes.get(),
        }
    }
}

/// `[spool]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The spool file (redb); no file, no spool (`KLAVIYO_PROXY_SPOOL_PATH` sets it).
    pub path: Option<PathBuf>,
    /// Operations that may be accepted now (202) and delivered later.
    pub deferrable: Vec<OperationName>,
    /// Spool deferrable writes while the kill switch is on, instead of refusing them.
    pub when_disabled: bool,
    // Bounds and give-up rules (issue 13 item 4).
    /// Most bytes of requests the spool holds, pending and dead (headers and bodies).
    pub max_bytes: NonZeroU64,
    /// Most requests the spool holds, pending and dead.
    pub max_entries: NonZeroU64,
    /// Dead letters older than this are deleted (seconds).
    pub dead_letter_ttl_s: NonZeroU64,
    /// A pending write whose replay failed this many times goes to the dead letters.
    pub max_attempts: NonZeroU32,
    /// A pending write older than this whose replay fails goes to the dead letters (seconds).
    pub max_age_s: NonZeroU64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        let ops = [
            "create_event",
            "create_client_event",
            "create_or_update_profile",
            "create_client_profile",
            "create_client_subscription",
            "bulk_subscribe_profiles",
            "bulk_import_profiles",
        ];
        SpoolConfig {
            path: None,
            deferrable: ops.iter().map(|o| OperationName(o.to_string())).collect(),
            when_disabled: true,
            max_bytes: NonZeroU64::new(1 << 30).expect("non-zero"),
            max_entries: NonZeroU64::new(100_000).expect("non-zero"),
            dead_letter_ttl_s: NonZeroU64::new(7 * 86_400).expect("non-zero"),
            max_attempts: nz(20),
            max_age_s: NonZeroU64::new(3 * 86_400).expect("non-zero"),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `klaviyo_proxy=debug`.
    pub level: String,
    /// `human` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Human }
    }
}

/// Where the buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process only: each replica counts alone.
    #[default]
    Local,
    /// In Redis (or Valkey), shared by every replica.
    Redis,
}

/// `[limiter]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimiterConfig {
    /// `local` (default) or `redis`.
    pub store: StoreKind,
    /// `redis://[:password@]host:port/db` or `rediss://...` for TLS.
    pub redis_url: Option<RedisUrl>,
    /// PEM CA certificates to trust for `rediss://` instead of the webpki roots.
    pub redis_ca_file: Option<PathBuf>,
    /// `redis_url` is a node of a Redis Cluster (keys are hash-tagged per account).
    pub redis_cluster: bool,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// A Redis call slower than this counts as Redis being down.
    pub timeout_ms: u64,
    /// Replicas sharing the quota, for the fallback share (quota ÷ replicas) while
    /// Redis is down. Learned from the replicas' heartbeats in Redis when unset.
    pub replicas: Option<NonZeroU32>,
    /// With the local store: where the takes that still matter are kept across restarts
    /// (snapshotted every second and at shutdown; journals of buckets touched since the
    /// last snapshot sit next to it). Unset: a restart starts with empty buckets. The
    /// account cache is kept beside it (`<state_path>.accounts`).
    pub state_path: Option<PathBuf>,
    /// Most buckets held by the local store (and the Redis store's fallback): buckets
    /// are made for whatever credential or `company_id` a client sends. At the cap idle
    /// buckets make room; with none idle, a request needing a new bucket gets 503.
    pub max_buckets: NonZeroU32,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            store: StoreKind::Local,
            redis_url: None,
            redis_ca_file: None,
            redis_cluster: false,
            key_prefix: "klaviyo-proxy".into(),
            timeout_ms: 100,
            replicas: None,
            state_path: None,
            max_buckets: NonZeroU32::new(crate::limiter::DEFAULT_MAX_BUCKETS as u32).expect("non-zero"),
        }
    }
}

/// `[accounts]`: learning the Klaviyo account behind each credential, so that every
/// key of an account shares the account's buckets (see [`crate::account`]).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// Look accounts up with `GET /api/accounts`, once per credential. Off, every
    /// credential not declared below keeps buckets of its own.
    pub resolve: bool,
    /// Most credentials remembered (answers and failed lookups); must be > 0.
    pub cache_entries: NonZeroU32,
    /// How long an answer is trusted before it is looked up again (seconds).
    pub cache_ttl_s: u64,
    /// After a lookup that could not tell (no `accounts:read` scope, 401, Klaviyo
    /// down), the credential keeps its own buckets this long before the next try.
    pub retry_ms: u64,
    /// Longest a lookup waits for its `get_accounts` token; then the request goes on
    /// its credential's own buckets and the lookup is tried again later.
    pub lookup_max_wait_ms: u64,
    /// Accounts the operator declares, with no lookup: a credential's fingerprint
    /// (`klaviyo-proxy fingerprint` prints it from the key on stdin) to its account's
    /// Klaviyo id (shares buckets with looked-up keys of that account) or a name.
    pub declared: BTreeMap<crate::credential::Fingerprint, AccountName>,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            resolve: true,
            cache_entries: NonZeroU32::new(10_000).expect("non-zero"),
            cache_ttl_s: 86_400,
            retry_ms: 300_000,
            lookup_max_wait_ms: 10_000,
            declared: BTreeMap::new(),
        }
    }
}
