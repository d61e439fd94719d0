//! Configuration: TOML read into serde structs whose field types check themselves
//! (non-zero limits, addresses, URLs), so every error carries the key path and line;
//! then environment overrides and the checks that span several keys.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize, Serializer};

use crate::catalog;

/// The annotated default config, embedded so `serve` works with no file.
pub const DEFAULT_TOML: &str = include_str!("../config/klaviyo-proxy.toml");

/// The current stable revision of Klaviyo's API (the catalog's spec version).
pub const DEFAULT_REVISION: &str = "2026-07-15";

/// A bad config: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a bad value or does not exist.
    #[error("{origin}{line}: `{key}`: {message}")]
    Invalid {
        /// File name (or "embedded default").
        origin: String,
        /// ` line N` when known.
        line: String,
        /// Key path, e.g. `limits.default.burst_per_second`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An environment variable has a bad value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// Variable name.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// Keys that are each fine but do not work together.
    #[error("config: {0}")]
    Conflict(String),
    /// The file (or a file it names) cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A value that must never be printed: logs, errors and `check-config` show it redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// The upstream base URL: `http` or `https`, a host, no path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpstreamUrl(Uri);

impl UpstreamUrl {
    /// The parsed URI (scheme and authority only).
    pub fn uri(&self) -> &Uri {
        &self.0
    }
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("`{s}` must start with http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("`{s}` has no host"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(format!("`{s}` must not have a path or query"));
        }
        Ok(UpstreamUrl(uri))
    }
}

impl From<UpstreamUrl> for String {
    fn from(u: UpstreamUrl) -> String {
        let s = u.0.to_string();
        s.trim_end_matches('/').to_string()
    }
}

/// A Klaviyo API revision, `YYYY-MM-DD` with an optional `.pre` (beta) suffix.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Revision(String);

impl Revision {
    /// Whether this revision opts into beta operations.
    pub fn is_beta(&self) -> bool {
        is_beta_revision(&self.0)
    }
    /// The revision string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether a `revision` header value asks for beta operations.
pub fn is_beta_revision(revision: &str) -> bool {
    revision.ends_with(".pre")
}

impl TryFrom<String> for Revision {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let date = s.strip_suffix(".pre").unwrap_or(&s);
        let ok = date.len() == 10
            && date.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
        if ok {
            Ok(Revision(s))
        } else {
            Err(format!("`{s}` is not a revision like 2026-07-15 or 2026-07-15.pre"))
        }
    }
}

impl From<Revision> for String {
    fn from(r: Revision) -> String {
        r.0
    }
}

/// Share of the account's quota this proxy may use, in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Share(f64);

impl Share {
    /// The fraction.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Share {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v > 0.0 && v <= 1.0 {
            Ok(Share(v))
        } else {
            Err(format!("{v} must be greater than 0 and at most 1"))
        }
    }
}

impl From<Share> for f64 {
    fn from(s: Share) -> f64 {
        s.0
    }
}

/// A name for an account in metrics and logs: 1 to 32 of `A-Z a-z 0-9 _ -`, so it
/// can never carry a key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountName(String);

impl AccountName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok && !s.starts_with("pk_") {
            Ok(AccountName(s))
        } else {
            Err("must be 1 to 32 letters, digits, `_` or `-` (and not a key)".into())
        }
    }
}

impl From<AccountName> for String {
    fn from(n: AccountName) -> String {
        n.0
    }
}

/// An `operationId` from the catalog.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct OperationName(String);

impl TryFrom<String> for OperationName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if catalog::by_id(&s).is_some() {
            Ok(OperationName(s))
        } else {
            Err(format!("`{s}` is not an operation in the catalog (see `klaviyo-proxy routes`)"))
        }
    }
}

impl From<OperationName> for String {
    fn from(o: OperationName) -> String {
        o.0
    }
}

impl OperationName {
    /// The operation id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The client-facing listener.
    pub server: ServerConfig,
    /// Where requests go.
    pub upstream: UpstreamConfig,
    /// Credentials.
    pub auth: AuthConfig,
    /// Rate limits.
    pub limits: LimitsConfig,
    /// Waiting for a token.
    pub queue: QueueConfig,
    /// Repeating failed requests.
    pub retry: RetryConfig,
    /// The upstream circuit breaker.
    pub breaker: BreakerConfig,
    /// Durable accept-and-forward of deferrable writes.
    pub spool: SpoolConfig,
    /// Logging.
    pub log: LogConfig,
    /// The admin listener: metrics, health, readiness, reload.
    pub admin: AdminConfig,
    /// The `preflight` command.
    pub preflight: PreflightConfig,
    /// Where buckets live: this process, or Redis shared by every replica.
    pub limiter: LimiterConfig,
    /// Which Klaviyo account each credential belongs to.
    pub accounts: AccountsConfig,
    /// The inbound webhook gate (off by default).
    pub webhooks: crate::webhooks::WebhooksConfig,
    /// Coalescing single events into bulk jobs.
    pub coalesce: CoalesceConfig,
    /// The checklist's opt-in checks on request bodies.
    pub checks: ChecksConfig,
}

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

/// A key scope from the catalog (`x-klaviyo-scopes`), e.g. `profiles:read`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

impl TryFrom<String> for Scope {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if catalog::OPERATIONS.iter().any(|o| o.scopes.contains(&s.as_str())) {
            Ok(Scope(s))
        } else {
            Err(format!("`{s}` is not a scope any operation in the catalog needs (like profiles:read)"))
        }
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0
    }
}

impl AsRef<str> for Scope {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Scope {
    /// The scope.
    pub fn as_str(&self) -> &str {
        &self.0
    }
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

/// A `redis://` or `rediss://` URL. It may hold a password, so it prints redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RedisUrl(Secret);

impl RedisUrl {
    /// The URL, for the one place that connects.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        // Never echo the value: it may carry a password.
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            Ok(RedisUrl(Secret(s)))
        } else {
            Err("must start with redis:// or rediss:// (TLS)".into())
        }
    }
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

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

impl Config {
    /// Parses a config text. `origin` names it in errors.
    pub fn parse(src: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(src);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Invalid {
                origin: origin.to_string(),
                line: inner.span().map(|s| format!(" line {}", line_of(src, s.start))).unwrap_or_default(),
                key: if key == "." { "(top level)".into() } else { key },
                message: inner.message().to_string(),
            }
        })
    }

    /// Reads a config file, or the embedded default when `path` is `None`, then
    /// applies environment overrides and checks the result.
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Io { path: p.into(), source })?;
                Config::parse(&text, &p.display().to_string())?
            }
            None => Config::parse(DEFAULT_TOML, "embedded default")?,
        };
        config.apply_env(env)?;
        config.resolve_key(env)?;
        config.check_resilience()?;
        config.check_limiter()?;
        config.webhooks.resolve(env)?;
        config.check_hardening()?;
        config.check_coalesce()?;
        Ok(config)
    }

    /// Applies `KLAVIYO_PROXY_*` overrides for the common keys.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: TryFrom<String, Error = String>>(var: &str, v: String) -> Result<T, ConfigError> {
            T::try_from(v).map_err(|message| ConfigError::Env { var: var.into(), message })
        }
        fn from_str<T: std::str::FromStr>(var: &str, v: &str, what: &str) -> Result<T, ConfigError> {
            v.parse().map_err(|_| ConfigError::Env { var: var.into(), message: format!("`{v}` is not {what}") })
        }
        if let Some(v) = env("KLAVIYO_PROXY_LISTEN") {
            self.server.listen = from_str("KLAVIYO_PROXY_LISTEN", &v, "an address like 127.0.0.1:8080")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_UPSTREAM") {
            self.upstream.url = parse("KLAVIYO_PROXY_UPSTREAM", v)?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_REVISION") {
            self.upstream.revision = parse("KLAVIYO_PROXY_REVISION", v)?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_CA_FILE") {
            self.upstream.ca_file = Some(v.into());
        }
        if let Some(v) = env("KLAVIYO_PROXY_AUTH_MODE") {
            self.auth.mode = match v.as_str() {
                "pass-through" => AuthMode::PassThrough,
                "inject" => AuthMode::Inject,
                _ => {
                    return Err(ConfigError::Env {
                        var: "KLAVIYO_PROXY_AUTH_MODE".into(),
                        message: format!("`{v}` is not pass-through or inject"),
                    })
                }
            };
        }
        if let Some(v) = env("KLAVIYO_PROXY_CLIENT_TOKEN") {
            self.server.client_token = Some(Secret(v));
        }
        if let Some(v) = env("KLAVIYO_PROXY_LIMITS_ENABLED") {
            self.limits.enabled = from_str("KLAVIYO_PROXY_LIMITS_ENABLED", &v, "true or false")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_SHARE") {
            let f: f64 = from_str("KLAVIYO_PROXY_SHARE", &v, "a number")?;
            self.limits.share = Share::try_from(f)
                .map_err(|message| ConfigError::Env { var: "KLAVIYO_PROXY_SHARE".into(), message })?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_ADMIN_LISTEN") {
            self.admin.listen = from_str("KLAVIYO_PROXY_ADMIN_LISTEN", &v, "an address like 127.0.0.1:9090")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_SPOOL_PATH") {
            self.spool.path = Some(v.into());
        }
        if let Some(v) = env("KLAVIYO_ENABLED") {
            self.upstream.enabled = from_str("KLAVIYO_ENABLED", &v, "true or false")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_LIMITER_STORE") {
            self.limiter.store = match v.as_str() {
                "local" => StoreKind::Local,
                "redis" => StoreKind::Redis,
                _ => {
                    return Err(ConfigError::Env {
                        var: "KLAVIYO_PROXY_LIMITER_STORE".into(),
                        message: format!("`{v}` is not local or redis"),
                    })
                }
            };
        }
        if let Some(v) = env("KLAVIYO_PROXY_REDIS_URL") {
            self.limiter.redis_url = Some(
                RedisUrl::try_from(v)
                    .map_err(|message| ConfigError::Env { var: "KLAVIYO_PROXY_REDIS_URL".into(), message })?,
            );
        }
        if let Some(v) = env("KLAVIYO_PROXY_ACCOUNT_HASH_KEY") {
            self.auth.account_hash_key = Some(Secret(v));
        }
        if let Some(v) = env("KLAVIYO_PROXY_ALLOWED_HOSTS") {
            self.server.allowed_hosts =
                v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect();
        }
        if let Some(v) = env("KLAVIYO_PROXY_ADMIN_TOKEN") {
            self.admin.token = Some(Secret(v));
        }
        if let Some(v) = env("KLAVIYO_PROXY_LOG_LEVEL") {
            self.log.level = v;
        }
        if let Some(v) = env("KLAVIYO_PROXY_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "human" => LogFormat::Human,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        var: "KLAVIYO_PROXY_LOG_FORMAT".into(),
                        message: format!("`{v}` is not human or json"),
                    })
                }
            };
        }
        Ok(())
    }

    /// Checks that a Redis store has what it needs: a URL, and an account hash key
    /// so that every replica names an account's buckets alike.
    pub fn check_limiter(&self) -> Result<(), ConfigError> {
        if self.limiter.state_path.is_some() && self.auth.account_hash_key.is_none() {
            // Buckets are named by a keyed hash of the credential: a random key per
            // process would name them differently after the restart.
            return Err(ConfigError::Conflict(
                "limiter.state_path needs auth.account_hash_key (or KLAVIYO_PROXY_ACCOUNT_HASH_KEY), \
                 so that a restarted proxy names an account's buckets as before"
                    .into(),
            ));
        }
        if self.limiter.store != StoreKind::Redis {
            return Ok(());
        }
        if self.limiter.redis_url.is_none() {
            return Err(ConfigError::Conflict(
                "limiter.store = \"redis\" needs limiter.redis_url (or KLAVIYO_PROXY_REDIS_URL)".into(),
            ));
        }
        if self.auth.account_hash_key.is_none() {
            return Err(ConfigError::Conflict(
                "limiter.store = \"redis\" needs auth.account_hash_key (or KLAVIYO_PROXY_ACCOUNT_HASH_KEY), \
                 the same on every replica, so that replicas name an account's buckets alike"
                    .into(),
            ));
        }
        if self.limiter.key_prefix.is_empty() || self.limiter.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::Conflict("limiter.key_prefix must be non-empty, without { or }".into()));
        }
        if self.limiter.timeout_ms == 0 {
            return Err(ConfigError::Conflict("limiter.timeout_ms must be > 0".into()));
        }
        Ok(())
    }

    /// Coalescing needs the spool (its dead letters) and a linger that lets jobs fill.
    pub fn check_coalesce(&self) -> Result<(), ConfigError> {
        let c = &self.coalesce;
        if !c.events {
            return Ok(());
        }
        if self.spool.path.is_none() {
            return Err(ConfigError::Conflict(
                "coalesce.events = true needs spool.path (or KLAVIYO_PROXY_SPOOL_PATH): refused events go to its dead letters"
                    .into(),
            ));
        }
        if c.linger_ms == 0 || c.linger_ms > 60_000 {
            return Err(ConfigError::Conflict("coalesce.linger_ms must be between 1 and 60000".into()));
        }
        if c.max_pending == 0 {
            return Err(ConfigError::Conflict("coalesce.max_pending must be > 0".into()));
        }
        Ok(())
    }

    /// Finds the private key for inject mode: `KLAVIYO_PRIVATE_KEY`, else `auth.key_file`.
    fn resolve_key(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(key) = env("KLAVIYO_PRIVATE_KEY").filter(|k| !k.trim().is_empty()) {
            self.auth.private_key = Some(Secret(key.trim().to_string()));
        } else if let Some(path) = &self.auth.key_file {
            let key = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.clone(), source })?;
            self.auth.private_key = Some(Secret(key.trim().to_string()));
        }
        if self.auth.mode == AuthMode::Inject && self.auth.private_key.is_none() {
            return Err(ConfigError::Conflict(
                "auth.mode = \"inject\" needs a key: set KLAVIYO_PRIVATE_KEY or auth.key_file".into(),
            ));
        }
        Ok(())
    }

    /// Checks the retry and breaker values that serde's types cannot.
    pub fn check_resilience(&self) -> Result<(), ConfigError> {
        let r = &self.retry;
        let problem = if r.base_ms == 0 {
            Some("retry.base_ms must be > 0 (retries would not back off)".to_string())
        } else if r.cap_ms < r.base_ms {
            Some(format!("retry.cap_ms ({}) must be at least retry.base_ms ({})", r.cap_ms, r.base_ms))
        } else if !(r.budget_ratio.is_finite() && r.budget_ratio >= 0.0) {
            Some(format!("retry.budget_ratio ({}) must be a number >= 0", r.budget_ratio))
        } else if r.budget_window_ms < 1000 {
            Some("retry.budget_window_ms must be at least 1000".to_string())
        } else if self.breaker.window_ms < 100 {
            Some("breaker.window_ms must be at least 100".to_string())
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(ConfigError::Conflict(p)))
    }

    /// Checks the hardening keys: tokens long enough to resist guessing, timeouts and
    /// caps that let the proxy work.
    pub fn check_hardening(&self) -> Result<(), ConfigError> {
        let min = crate::hardening::token::MIN_TOKEN_LEN;
        for (key, token) in [("server.client_token", &self.server.client_token), ("admin.token", &self.admin.token)] {
            if token.as_ref().is_some_and(|t| t.expose().trim().len() < min) {
                return Err(ConfigError::Conflict(format!("{key} must be at least {min} characters")));
            }
        }
        let s = &self.server;
        let problem = if s.first_byte_timeout_ms == 0 || s.idle_timeout_ms == 0 || s.keep_alive_interval_ms == 0 {
            Some("server.first_byte_timeout_ms, idle_timeout_ms and keep_alive_interval_ms must be > 0")
        } else if s.max_connections == 0 {
            Some("server.max_connections must be > 0")
        } else if s.max_buffered_bytes < s.max_body_bytes {
            Some("server.max_buffered_bytes must be at least server.max_body_bytes")
        } else if s.allowed_hosts.iter().any(|h| h.is_empty() || h.contains([':', '/', ' ', '@'])) {
            Some("server.allowed_hosts entries are host names without port, like \"proxy.internal\"")
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(ConfigError::Conflict(p.into())))
    }

    /// Checks that apply only when serving: a listener off loopback needs a client
    /// token unless explicitly opted out; the admin listener off loopback needs its token.
    pub fn check_serve(&self) -> Result<(), ConfigError> {
        self.webhooks.check_serve()?;
        self.check_hardening()?;
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(ConfigError::Conflict(format!(
                "admin.listen = \"{}\" is not a loopback address: set admin.token (or KLAVIYO_PROXY_ADMIN_TOKEN) \
                 so admin requests must send `Authorization: Bearer <token>`",
                self.admin.listen
            )));
        }
        let ip = self.server.listen.ip();
        if !ip.is_loopback() && self.server.client_token.is_none() && !self.server.allow_unauthenticated_remote {
            return Err(ConfigError::Conflict(format!(
                "server.listen = \"{}\" is not a loopback address: set server.client_token (or \
                 KLAVIYO_PROXY_CLIENT_TOKEN) so clients must send `Proxy-Authorization: Bearer <token>`, \
                 or set server.allow_unauthenticated_remote = true if the network is trusted",
                self.server.listen
            )));
        }
        Ok(())
    }

    /// The config as TOML with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    /// Duration helpers.
    pub fn client_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.client_read_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn shipped_file_equals_embedded_defaults() {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/klaviyo-proxy.toml")).unwrap();
        assert_eq!(shipped, DEFAULT_TOML);
        assert_eq!(Config::parse(&shipped, "file").unwrap(), Config::default());
        assert_eq!(Config::parse("", "empty").unwrap(), Config::default());
    }

    fn err(src: &str) -> String {
        Config::parse(src, "test.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_key_and_line() {
        let cases = [
            ("[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n", "line 3", "server"),
            (
                "[limits.unknown]\nburst_per_second = 0\nsteady_per_minute = 5\n",
                "line 2",
                "limits.unknown.burst_per_second",
            ),
            (
                "[limits.unknown]\nburst_per_second = 1\nsteady_per_minute = -5\n",
                "line 3",
                "limits.unknown.steady_per_minute",
            ),
            ("\n[upstream]\nurl = \"ftp://x\"\n", "line 3", "upstream.url"),
            ("[upstream]\nurl = \"https://a.klaviyo.com/api\"\n", "line 2", "upstream.url"),
            ("[server]\nlisten = \"localhost\"\n", "line 2", "server.listen"),
            (
                "[limits.operations.no_such_op]\nburst_per_second = 1\nsteady_per_minute = 1\n",
                "line 1",
                "limits.operations",
            ),
            ("[limits]\nshare = 1.5\n", "line 2", "limits.share"),
            ("[upstream]\nrevision = \"yesterday\"\n", "line 2", "upstream.revision"),
            ("[auth]\naccount_name = \"a b\"\n", "line 2", "auth.account_name"),
            ("[auth]\naccount_name = \"pk_abc\"\n", "line 2", "auth.account_name"),
            ("[auth]\nallowed_scopes = [\"profiles:read\", \"profile:red\"]\n", "line 2", "auth.allowed_scopes"),
            ("[checks]\nphone_e164 = \"drop\"\n", "line 2", "checks.phone_e164"),
        ];
        for (src, line, key) in cases {
            let e = err(src);
            assert!(e.contains(line) && e.contains(key), "{src:?} gave {e}");
        }
    }

    #[test]
    fn overrides_and_env() {
        let c = Config::parse(
            "[limits]\nshare = 0.8\n[limits.operations.get_profiles]\nburst_per_second = 5\nsteady_per_minute = 50\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.limits.operations.len(), 1);
        let mut c = Config::default();
        let env = |k: &str| match k {
            "KLAVIYO_PROXY_LISTEN" => Some("127.0.0.1:9999".to_string()),
            "KLAVIYO_PROXY_UPSTREAM" => Some("http://127.0.0.1:1234".to_string()),
            _ => None,
        };
        c.apply_env(&env).unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(c.upstream.url.uri().port_u16(), Some(1234));
        let bad = |k: &str| (k == "KLAVIYO_PROXY_LISTEN").then(|| "nope".to_string());
        assert!(c.apply_env(&bad).unwrap_err().to_string().contains("KLAVIYO_PROXY_LISTEN"));
    }

    #[test]
    fn resilience_values_are_checked() {
        Config::default().check_resilience().unwrap();
        let cases = [
            ("[retry]\nbase_ms = 0\n", "retry.base_ms"),
            ("[retry]\nbase_ms = 500\ncap_ms = 100\n", "retry.cap_ms"),
            ("[retry]\nbudget_ratio = -1.0\n", "retry.budget_ratio"),
            ("[breaker]\nwindow_ms = 1\n", "breaker.window_ms"),
        ];
        // The former name of consecutive_failures still reads.
        let old = Config::parse("[breaker]\nconsecutive_connect_failures = 7\n", "t").unwrap();
        assert_eq!(old.breaker.consecutive_failures.get(), 7);
        for (src, key) in cases {
            let e = Config::parse(src, "t").unwrap().check_resilience().unwrap_err().to_string();
            assert!(e.contains(key), "{src:?}: {e}");
        }
        assert!(err("[breaker]\nfailure_ratio = 0.0\n").contains("breaker.failure_ratio"));
        assert!(err("[retry]\nmax_attempts = 0\n").contains("retry.max_attempts"));
        assert!(err("[retry.operations]\nget_profiles = \"sometimes\"\n").contains("retry.operations"));
        assert!(err("[spool]\ndeferrable = [\"no_such_op\"]\n").contains("spool.deferrable"));
        let mut c = Config::default();
        c.apply_env(&|k| match k {
            "KLAVIYO_ENABLED" => Some("false".into()),
            "KLAVIYO_PROXY_SPOOL_PATH" => Some("/tmp/s.redb".into()),
            _ => None,
        })
        .unwrap();
        assert!(!c.upstream.enabled);
        assert_eq!(c.spool.path.as_deref(), Some(Path::new("/tmp/s.redb")));
        assert!(c.apply_env(&|k| (k == "KLAVIYO_ENABLED").then(|| "nope".into())).is_err());
    }

    #[test]
    fn state_path_needs_a_hash_key() {
        let c = Config::parse("[limiter]\nstate_path = \"/var/lib/kp/state.json\"\n", "t").unwrap();
        let e = c.check_limiter().unwrap_err().to_string();
        assert!(e.contains("limiter.state_path") && e.contains("auth.account_hash_key"), "{e}");
        let c = Config::parse("[auth]\naccount_hash_key = \"k\"\n[limiter]\nstate_path = \"/x\"\n", "t").unwrap();
        assert_eq!(c.limiter.state_path.as_deref(), Some(Path::new("/x")));
        assert!(c.check_limiter().is_ok());
    }

    #[test]
    fn redis_store_needs_url_and_hash_key() {
        let c = Config::parse("[limiter]\nstore = \"redis\"\n", "t").unwrap();
        assert!(c.check_limiter().unwrap_err().to_string().contains("limiter.redis_url"));
        let c = Config::parse(
            "[limiter]\nstore = \"redis\"\nredis_url = \"rediss://:hunter2@redis.internal:6380/2\"\n",
            "t",
        )
        .unwrap();
        let e = c.check_limiter().unwrap_err().to_string();
        assert!(e.contains("auth.account_hash_key"), "{e}");
        let mut c = c;
        c.auth.account_hash_key = Some(Secret::new("shared"));
        c.check_limiter().unwrap();
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        let e = err("[limiter]\nredis_url = \"http://:hunter2@x\"\n");
        assert!(e.contains("line 2") && e.contains("limiter.redis_url") && !e.contains("hunter2"), "{e}");
        let e = err("[limiter]\nstore = \"memcached\"\n");
        assert!(e.contains("limiter.store"), "{e}");
    }

    #[test]
    fn remote_bind_needs_token_and_inject_needs_key() {
        let mut c = Config::default();
        c.server.listen = "0.0.0.0:8080".parse().unwrap();
        assert!(c.check_serve().unwrap_err().to_string().contains("client_token"));
        c.server.client_token = Some(Secret::new("t"));
        let e = c.check_serve().unwrap_err().to_string();
        assert!(e.contains("server.client_token must be at least 16"), "{e}");
        c.server.client_token = Some(Secret::new("0123456789abcdef"));
        c.check_serve().unwrap();
        // The admin listener off loopback needs its own token.
        c.admin.listen = "0.0.0.0:9090".parse().unwrap();
        assert!(c.check_serve().unwrap_err().to_string().contains("admin.token"));
        c.admin.token = Some(Secret::new(""));
        assert!(c.check_serve().unwrap_err().to_string().contains("admin.token must be at least"));
        c.admin.token = Some(Secret::new("admin-0123456789abcdef"));
        c.check_serve().unwrap();
        let mut c = Config::default();
        c.auth.mode = AuthMode::Inject;
        assert!(c.resolve_key(&no_env).is_err());
        let key = |k: &str| (k == "KLAVIYO_PRIVATE_KEY").then(|| "pk_secret_123".to_string());
        c.resolve_key(&key).unwrap();
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("pk_secret_123") && printed.contains("[redacted]"), "{printed}");
    }
}
