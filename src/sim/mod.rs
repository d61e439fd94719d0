//! A Klaviyo simulator for tests, benches, local development and load tests.
//!
//! It shares only the catalog with the proxy and counts the way Klaviyo does: fixed
//! 1 s / 60 s (and daily) windows per account and endpoint, each bucket at its own
//! random (seedable) phase. It answers like Klaviyo: `RateLimit-*` headers on
//! successes, `Retry-After` and the `throttled` JSON:API body when over, 401 without a
//! credential, 400 without `revision`. It also measures what a test needs to check the
//! proxy: per bucket, requests, 429s, the most requests seen in one of its fixed
//! windows and the most seen in any sliding interval of each window's length.

mod bulk;
pub mod faults;
mod tls;
pub mod webhooks;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::body::{full, ProxyBody};
use crate::catalog::{self, Operation};
use crate::config::is_beta_revision;
use crate::server::{self, ConnLimits, Gate};

pub use faults::{Faults, Outage};

/// How to run the simulator.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Seed for window phases; random when `None`.
    pub seed: Option<u64>,
    /// Serve HTTPS with a certificate generated at start.
    pub tls: bool,
    /// Added to every response.
    pub latency: Duration,
    /// With `tls`: each new connection's handshake starts this late, as a distant
    /// server's round trips delay it (a cold client pool pays it per connection).
    pub handshake_delay: Duration,
    /// Lift every limit (for measuring the proxy's overhead against a fast upstream).
    pub unlimited: bool,
    /// Faults in force from the start ([`Simulator::set_faults`] changes them).
    pub faults: Faults,
    /// Most buckets held (`None`: [`MAX_BUCKETS`]): a long load test with many keys
    /// must not grow the simulator without end. Idle buckets go first, then the least
    /// recently used.
    pub max_buckets: Option<usize>,
    /// Most event `unique_id`s remembered (`None`: [`MAX_EVENT_IDS`]); past it the
    /// oldest are forgotten (counted in [`EventStats::forgotten`]).
    pub max_event_ids: Option<usize>,
    /// Credentials (the token after the scheme: a `pk_` key or an OAuth access token)
    /// mapped to their accounts, ahead of the naming rule of [`account_alias`].
    pub credentials: HashMap<String, SimCredential>,
}

/// Who a credential belongs to, for [`SimOptions::credentials`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimCredential {
    /// The Klaviyo account id (`GET /api/accounts` answers it).
    pub account: String,
    /// For an OAuth access token, the app it was issued to: the app's quota in the
    /// account is its own. `None` for a private key.
    pub app: Option<String>,
    /// Whether the credential has the `accounts:read` scope (without it
    /// `GET /api/accounts` answers 403).
    pub accounts_read: bool,
}

impl SimCredential {
    /// Whose quota it spends, as the stats name it: `account`, or `account@app`.
    pub fn quota(&self) -> String {
        match &self.app {
            Some(app) => format!("{}@{app}", self.account),
            None => self.account.clone(),
        }
    }
}

/// A credential missing `accounts:read`, by the naming rule: its token contains this.
pub const NO_ACCOUNTS_READ: &str = "no-accounts-read";

/// The account behind an `Authorization` value by the simulator's naming rule (the
/// scheme in any case, spaces around it ignored): a private key `pk_<account>_<rest>`
/// belongs to `<account>`, an OAuth token `<app>_<account>_<rest>` to `<account>`
/// through `<app>` (`<rest>` holds no `_`); a token containing [`NO_ACCOUNTS_READ`]
/// lacks that scope. `None` when the value follows neither form.
pub fn credential_account(authorization: &str) -> Option<SimCredential> {
    let (scheme, token) = parse_authorization(authorization)?;
    let oauth = scheme.eq_ignore_ascii_case("bearer");
    let (head, _rest) = token.rsplit_once('_')?;
    let (first, account) = head.split_once('_')?;
    if account.is_empty() || (!oauth && first != "pk") {
        return None;
    }
    Some(SimCredential {
        account: account.to_string(),
        app: oauth.then(|| first.to_string()),
        accounts_read: !token.contains(NO_ACCOUNTS_READ),
    })
}

/// `(scheme, token)` of a well-formed `Klaviyo-API-Key` or `Bearer` value.
fn parse_authorization(authorization: &str) -> Option<(&str, &str)> {
    let (scheme, token) = authorization.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    let known = scheme.eq_ignore_ascii_case("klaviyo-api-key") || scheme.eq_ignore_ascii_case("bearer");
    (known && !token.is_empty() && !token.contains([' ', '\t'])).then_some((scheme, token))
}

/// A revoked key is one credential, not its whole account.
fn revoked_alias(authorization: &str) -> String {
    digest_alias(&canonical(authorization).unwrap_or_else(|| authorization.trim().to_string()))
}

fn digest_alias(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whose quota a credential or a `company_id` spends, as the simulator's stats show it:
/// the account by the naming rule ([`credential_account`]; `account@app` for an OAuth
/// token), else a short hash of the value (each such key its own account).
pub fn account_alias(credential: &str) -> String {
    match credential_account(credential) {
        Some(c) => c.quota(),
        None => digest_alias(&canonical(credential).unwrap_or_else(|| credential.to_string())),
    }
}

/// A well-formed `Authorization` value with its scheme spelled as Klaviyo documents it.
fn canonical(authorization: &str) -> Option<String> {
    let (scheme, token) = parse_authorization(authorization)?;
    let scheme = if scheme.eq_ignore_ascii_case("bearer") { "Bearer" } else { "Klaviyo-API-Key" };
    Some(format!("{scheme} {token}"))
}

const WINDOW_NAMES: [&str; 3] = ["burst", "steady", "daily"];
const WINDOW_SECS: [u64; 3] = [1, 60, 86_400];

/// Buckets the simulator holds at most, by default.
pub const MAX_BUCKETS: usize = 50_000;

/// Event ids the simulator remembers at most, by default.
pub const MAX_EVENT_IDS: usize = 1_000_000;

#[derive(Debug)]
struct Window {
    limit: u32,
    length: Duration,
    phase: Duration,
    index: u64,
    count: u32,
    max_fixed: u32,
    recent: VecDeque<Instant>,
    max_sliding: u32,
}

impl Window {
    fn new(limit: u32, secs: u64, rng: &mut fastrand::Rng) -> Self {
        let length = Duration::from_secs(secs);
        Window {
            limit,
            length,
            phase: Duration::from_micros(rng.u64(..length.as_micros() as u64)),
            index: u64::MAX,
            count: 0,
            max_fixed: 0,
            recent: VecDeque::new(),
            max_sliding: 0,
        }
    }

    /// The fixed window containing `elapsed` and the time left in it.
    fn position(&self, elapsed: Duration) -> (u64, Duration) {
        let shifted = (elapsed + self.phase).as_micros() as u64;
        let len = self.length.as_micros() as u64;
        (shifted / len, Duration::from_micros(len - shifted % len))
    }

    fn count_in(&mut self, index: u64) -> u32 {
        if self.index != index {
            self.index = index;
            self.count = 0;
        }
        self.count
    }

    fn record(&mut self, now: Instant) {
        self.count += 1;
        self.max_fixed = self.max_fixed.max(self.count);
        // The sliding measure only matters for short windows; a daily one would hold
        // every request of the day.
        if self.length <= Duration::from_secs(60) {
            while self.recent.front().is_some_and(|&t| now.duration_since(t) >= self.length) {
                self.recent.pop_front();
            }
            self.recent.push_back(now);
            self.max_sliding = self.max_sliding.max(self.recent.len() as u32);
        }
    }
}

#[derive(Debug)]
struct Bucket {
    operation: &'static str,
    kind: String,
    windows: Vec<Window>,
    requests: u64,
    throttled: u64,
    /// The latest request counted (for eviction at the cap).
    last: Instant,
}

/// One bucket's counters in [`Stats`].
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BucketStats {
    /// Whose quota: the account ([`account_alias`]; `account@app` for OAuth tokens).
    pub account: String,
    /// The operation id.
    pub operation: String,
    /// `endpoint`, or the condition (`include=list`).
    pub bucket: String,
    /// Requests counted against the bucket.
    pub requests: u64,
    /// Requests answered 429.
    pub throttled: u64,
    /// Limit per window name.
    pub limits: HashMap<String, u32>,
    /// Most requests accepted in one fixed window, per window name.
    pub max_fixed: HashMap<String, u32>,
    /// Most requests accepted in any sliding interval of the window's length.
    pub max_sliding: HashMap<String, u32>,
}

/// What the simulator has seen (`GET /__sim/stats`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct Stats {
    /// Every request that reached the API routes.
    pub requests: u64,
    /// Every 429 sent.
    pub throttled: u64,
    /// Per bucket, sorted by account, operation and bucket.
    pub buckets: Vec<BucketStats>,
    /// API requests that arrived in a bucket before the end of a `Retry-After` the
    /// simulator had announced for it (not counting the first 50 ms after the 429
    /// reached the client, when they were already on the wire).
    #[serde(default)]
    pub early: u64,
    /// API requests that arrived inside a `Retry-After` the simulator had announced for
    /// their bucket, in-flight ones included (what a burst released all at once costs:
    /// the first draws the 429, the others are already on the wire).
    #[serde(default)]
    pub inside_retry_after: u64,
    /// Connections reset by a `reset` outage (each a request that reached the upstream
    /// and was turned away).
    #[serde(default)]
    pub reset_connections: u64,
    /// API requests answered with a fault's 5xx (an `unavailable` outage, `error_rate`).
    #[serde(default)]
    pub server_errors: u64,
}

/// Requests arriving this soon after a bucket's first 429 reached the client (the
/// simulator's latency after deciding it) were already on the wire. Generous: on a
/// loaded machine a request written before the client read the 429 can be parsed
/// here a few hundred milliseconds later, and `inside_retry_after` counts every one.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(300);

/// (account alias, endpoint, condition index).
type BucketKey = (String, usize, Option<usize>);

#[derive(Debug)]
struct State {
    options: SimOptions,
    epoch: Instant,
    rng: Mutex<fastrand::Rng>,
    buckets: Mutex<HashMap<BucketKey, Bucket>>,
    totals: Mutex<(u64, u64)>,
    /// The status page's `indicator` (`none`, `minor`, `major`, `critical`).
    status_indicator: Mutex<String>,
    /// Credentials answered 401 (revoked keys), by [`revoked_alias`].
    revoked: Mutex<std::collections::HashSet<String>>,
    /// The faults in force and when they were set.
    faults: Mutex<(Faults, Instant)>,
    gate: watch::Sender<Gate>,
    /// Bumped by every change of faults, so a timed outage ends only its own.
    generation: std::sync::atomic::AtomicU64,
    /// Deliveries per event `unique_id` (Klaviyo deduplicates on it), and the ids in
    /// order of first arrival.
    events: Mutex<HashMap<String, u32>>,
    arrival: Mutex<std::collections::VecDeque<String>>,
    /// Ids dropped from `events` at the bound.
    forgotten: std::sync::atomic::AtomicU64,
    /// Per bucket, the end of the last `Retry-After` it announced, and how many
    /// requests came before that end.
    throttled_until: Mutex<HashMap<BucketKey, (Instant, Instant)>>,
    early: Mutex<u64>,
    inside: Mutex<u64>,
    /// Per bucket, the end of the hold a random 429 started (`throttle_holds`).
    holds: Mutex<HashMap<BucketKey, Instant>>,
    /// Connections a `reset` outage turned away.
    resets: Arc<std::sync::atomic::AtomicU64>,
    /// API requests answered with a fault's 5xx.
    server_errors: std::sync::atomic::AtomicU64,
}

/// The events the simulator accepted (`GET /__sim/events`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct EventStats {
    /// Distinct `unique_id`s accepted.
    pub unique: u64,
    /// Accepted deliveries, duplicates included.
    pub deliveries: u64,
    /// Deliveries of an id already seen (Klaviyo would drop them).
    pub duplicates: u64,
    /// Accepted events without a `unique_id`.
    pub without_id: u64,
    /// The ids, sorted.
    pub ids: Vec<String>,
    /// The ids in the order they first arrived.
    pub arrival: Vec<String>,
    /// Ids forgotten to stay within the simulator's bound (their repeats then count
    /// as new).
    #[serde(default)]
    pub forgotten: u64,
}

/// The status page path: Klaviyo's is a statuspage.io page, `api/v2/status.json`.
pub const STATUS_PATH: &str = "/__sim/status/api/v2/status.json";

/// A running simulator.
#[derive(Debug)]
pub struct Simulator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its base URL (`http://` or `https://127.0.0.1:port`).
    pub url: String,
    /// The CA certificate (PEM) that signed its TLS certificate, when TLS is on.
    pub ca_pem: Option<String>,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Starts serving on `listener`.
    pub fn start(listener: TcpListener, options: SimOptions) -> Result<Simulator, SimError> {
        let addr = listener.local_addr().map_err(SimError::Io)?;
        let (acceptor, ca_pem) = if options.tls {
            let (acceptor, ca) = tls::acceptor()?;
            (Some(acceptor), Some(ca))
        } else {
            (None, None)
        };
        let scheme = if options.tls { "https" } else { "http" };
        let seed = options.seed.unwrap_or_else(|| fastrand::u64(..));
        options.faults.check().map_err(SimError::Faults)?;
        let (gate, gate_rx) = watch::channel(options.faults.outage.gate());
        let state = Arc::new(State {
            faults: Mutex::new((options.faults.clone(), Instant::now())),
            options,
            epoch: Instant::now(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            buckets: Mutex::new(HashMap::new()),
            totals: Mutex::new((0, 0)),
            status_indicator: Mutex::new("none".into()),
            revoked: Mutex::new(Default::default()),
            gate,
            generation: std::sync::atomic::AtomicU64::new(0),
            events: Mutex::new(HashMap::new()),
            arrival: Mutex::new(Default::default()),
            forgotten: Default::default(),
            throttled_until: Mutex::new(HashMap::new()),
            early: Mutex::new(0),
            inside: Mutex::new(0),
            holds: Mutex::new(HashMap::new()),
            resets: Arc::default(),
            server_errors: Default::default(),
        });
        // Through set_faults, so a timed outage given at start also ends by itself.
        state.set_faults(state.options.faults.clone()).map_err(SimError::Faults)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let svc_state = state.clone();
        let service = hyper::service::service_fn(move |req| handle(svc_state.clone(), req));
        let limits = ConnLimits {
            drain_timeout: Duration::from_secs(1),
            handshake_delay: state.options.handshake_delay,
            ..ConnLimits::default()
        };
        let stopped = async {
            let _ = stopped.await;
        };
        let resets = state.resets.clone();
        let task = tokio::spawn(server::serve_gated(listener, acceptor, limits, service, stopped, gate_rx, resets));
        Ok(Simulator {
            addr,
            url: format!("{scheme}://127.0.0.1:{}", addr.port()),
            ca_pem,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// What it has seen so far.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// The status page URL (statuspage `api/v2/status.json` format).
    pub fn status_url(&self) -> String {
        format!("{}{STATUS_PATH}", self.url)
    }

    /// Sets the status page's indicator: `none`, `minor`, `major` or `critical`.
    pub fn set_status(&self, indicator: &str) {
        *lock(&self.state.status_indicator) = indicator.to_string();
    }

    /// From now on, answers 401 to this `Authorization` value (a revoked key).
    pub fn revoke(&self, authorization: &str) {
        lock(&self.state.revoked).insert(revoked_alias(authorization));
    }

    /// Replaces the faults in force (what `POST /__sim/faults` does).
    pub fn set_faults(&self, faults: Faults) -> Result<(), SimError> {
        self.state.set_faults(faults).map_err(SimError::Faults)
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        lock(&self.state.faults).0.clone()
    }

    /// The events accepted so far.
    pub fn events(&self) -> EventStats {
        self.state.events()
    }

    /// Requests that arrived in a bucket before the end of a `Retry-After` the
    /// simulator had announced for it.
    pub fn early_requests(&self) -> u64 {
        *lock(&self.state.early)
    }

    /// Stops serving and waits for open connections to close.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Socket trouble.
    #[error("simulator socket: {0}")]
    Io(std::io::Error),
    /// Certificate generation or TLS setup failed.
    #[error("simulator TLS: {0}")]
    Tls(String),
    /// A fault setting is out of range.
    #[error("simulator faults: {0}")]
    Faults(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn set_faults(self: &Arc<Self>, faults: Faults) -> Result<(), String> {
        faults.check()?;
        let gate = faults.outage.gate();
        let ends =
            (faults.outage != Outage::None && faults.outage_ms > 0).then(|| Duration::from_millis(faults.outage_ms));
        let generation = {
            let mut current = lock(&self.faults);
            *current = (faults, Instant::now());
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
        };
        self.gate.send_replace(gate);
        // A timed outage ends by itself: a reset or refused listener cannot be told to.
        if let Some(after) = ends {
            let state = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let mut current = lock(&state.faults);
                if state.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
                    current.0.outage = Outage::None;
                    state.gate.send_replace(Gate::Open);
                }
            });
        }
        Ok(())
    }

    /// Who a well-formed credential belongs to: the table, then the naming rule, else
    /// an account of its own.
    fn credential(&self, authorization: &str) -> SimCredential {
        let token = parse_authorization(authorization).map_or("", |(_, t)| t);
        if let Some(c) = self.options.credentials.get(token) {
            return c.clone();
        }
        credential_account(authorization).unwrap_or_else(|| SimCredential {
            account: account_alias(authorization),
            app: None,
            accounts_read: true,
        })
    }

    fn events(&self) -> EventStats {
        let events = lock(&self.events);
        let mut ids: Vec<String> = events.keys().filter(|k| !k.is_empty()).cloned().collect();
        ids.sort();
        let deliveries: u64 = events.iter().filter(|(k, _)| !k.is_empty()).map(|(_, n)| u64::from(*n)).sum();
        EventStats {
            unique: ids.len() as u64,
            deliveries,
            duplicates: deliveries - ids.len() as u64,
            without_id: events.get("").map_or(0, |n| u64::from(*n)),
            ids,
            arrival: lock(&self.arrival).iter().cloned().collect(),
            forgotten: self.forgotten.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Counts a request that comes before its bucket's announced `Retry-After` end,
    /// except in the first [`IN_FLIGHT_GRACE`] after the first 429 reached the client
    /// (the latency later): requests already on the wire then were sent before the
    /// client could know.
    fn note_arrival(&self, keys: &[BucketKey], now: Instant) {
        let grace = IN_FLIGHT_GRACE + self.options.latency;
        let until = lock(&self.throttled_until);
        let early = keys.iter().any(|k| until.get(k).is_some_and(|(from, end)| now > *from + grace && now < *end));
        if early {
            *lock(&self.early) += 1;
        }
        if keys.iter().any(|k| until.get(k).is_some_and(|(from, end)| now > *from && now < *end)) {
            *lock(&self.inside) += 1;
        }
    }

    fn note_retry_after(&self, keys: &[BucketKey], now: Instant, retry_after: Option<&str>) {
        let Some(secs) = retry_after.and_then(|v| v.trim().parse::<u64>().ok()) else { return };
        // Any fault value is allowed, `u64::MAX` included: a year stands for "forever".
        let end = now + Duration::from_secs(secs.min(365 * 86_400));
        let mut until = lock(&self.throttled_until);
        for k in keys {
            match until.get_mut(k) {
                Some((_, e)) if *e > now => *e = (*e).max(end),
                _ => {
                    until.insert(k.clone(), (now, end));
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        let (requests, throttled) = *lock(&self.totals);
        let mut buckets: Vec<BucketStats> = lock(&self.buckets)
            .iter()
            .map(|((account, _, _), b)| {
                let per = |f: &dyn Fn(&Window) -> u32| {
                    b.windows.iter().zip(WINDOW_NAMES).map(|(w, n)| (n.to_string(), f(w))).collect()
                };
                BucketStats {
                    account: account.clone(),
                    operation: b.operation.to_string(),
                    bucket: b.kind.clone(),
                    requests: b.requests,
                    throttled: b.throttled,
                    limits: per(&|w| w.limit),
                    max_fixed: per(&|w| w.max_fixed),
                    max_sliding: per(&|w| w.max_sliding),
                }
            })
            .collect();
        buckets.sort_by(|a, b| (&a.account, &a.operation, &a.bucket).cmp(&(&b.account, &b.operation, &b.bucket)));
        let (early, inside_retry_after) = (*lock(&self.early), *lock(&self.inside));
        let reset_connections = self.resets.load(std::sync::atomic::Ordering::Relaxed);
        let server_errors = self.server_errors.load(std::sync::atomic::Ordering::Relaxed);
        Stats { requests, throttled, buckets, early, inside_retry_after, reset_connections, server_errors }
    }

    /// Counts a request against its buckets; returns the wait when one is full,
    /// otherwise the steady window's (limit, remaining, reset).
    fn admit(&self, account: &str, op: &'static Operation, conditions: &[usize]) -> Result<(u32, u32, u64), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.epoch);
        let mut buckets = lock(&self.buckets);
        let mut keys = vec![(account.to_string(), op.endpoint, None)];
        keys.extend(conditions.iter().map(|&c| (account.to_string(), op.endpoint, Some(c))));
        let new = keys.iter().filter(|k| !buckets.contains_key(*k)).count();
        self.evict(&mut buckets, new, now);
        for key in &keys {
            if !buckets.contains_key(key) {
                let mut rng = lock(&self.rng);
                let (kind, limits) = match key.2 {
                    None => ("endpoint".to_string(), (op.burst_per_second, op.steady_per_minute, op.daily_per_day)),
                    Some(c) => {
                        let cond = &op.conditions[c];
                        (
                            format!("{}={}", cond.param, cond.value),
                            (cond.burst_per_second, cond.steady_per_minute, None),
                        )
                    }
                };
                let mut windows = vec![
                    Window::new(limits.0, WINDOW_SECS[0], &mut rng),
                    Window::new(limits.1, WINDOW_SECS[1], &mut rng),
                ];
                if let Some(d) = limits.2 {
                    windows.push(Window::new(d, WINDOW_SECS[2], &mut rng));
                }
                buckets.insert(
                    key.clone(),
                    Bucket { operation: op.id, kind, windows, requests: 0, throttled: 0, last: now },
                );
            }
        }
        let mut wait = Duration::ZERO;
        for key in &keys {
            let b = buckets.get_mut(key).expect("inserted above");
            b.requests += 1;
            b.last = now;
            for w in &mut b.windows {
                let (index, left) = w.position(elapsed);
                if !self.options.unlimited && w.count_in(index) >= w.limit {
                    wait = wait.max(left);
                }
            }
        }
        if !wait.is_zero() {
            for key in &keys {
                buckets.get_mut(key).expect("present").throttled += 1;
            }
            return Err(wait);
        }
        for key in &keys {
            let b = buckets.get_mut(key).expect("present");
            for w in &mut b.windows {
                let (index, _) = w.position(elapsed);
                w.count_in(index);
                w.record(now);
            }
        }
        let steady = &buckets[&keys[0]].windows[1];
        let (_, left) = steady.position(elapsed);
        Ok((steady.limit, steady.limit.saturating_sub(steady.count), left.as_secs().max(1)))
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/vnd.api+json"));
    resp
}

/// A JSON:API error in Klaviyo's shape.
fn klaviyo_error(status: StatusCode, code: &str, title: &str, detail: &str) -> Response<ProxyBody> {
    json_response(
        status,
        &json!({"errors": [{
            "id": format!("{:032x}", fastrand::u128(..)),
            "status": status.as_u16(),
            "code": code,
            "title": title,
            "detail": detail,
            "source": {"pointer": "/data/"},
            "links": {},
            "meta": {},
        }]}),
    )
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let control = req.uri().path().starts_with("/__sim/");
    let resp = respond(&state, req).await;
    // The work is done before the delay, so a response slower than the client's
    // timeout still changed the state: the client cannot know whether it did.
    let delay = if control { Duration::ZERO } else { state.options.latency + state.fault_delay() };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(resp)
}

impl State {
    fn fault_delay(&self) -> Duration {
        let faults = lock(&self.faults).0.clone();
        faults.delay(&mut lock(&self.rng))
    }

    fn verdict(&self, account: &str) -> faults::Verdict {
        let (faults, set_at) = lock(&self.faults).clone();
        faults.verdict(account, set_at.elapsed(), &mut lock(&self.rng))
    }

    fn record_event(&self, body: &[u8]) {
        let id = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["data"]["attributes"]["unique_id"].as_str().map(str::to_string))
            .unwrap_or_default();
        self.note_event(id);
    }

    fn note_event(&self, id: String) {
        let mut events = lock(&self.events);
        let seen = events.entry(id.clone()).or_insert(0);
        *seen += 1;
        if *seen == 1 && !id.is_empty() {
            let mut arrival = lock(&self.arrival);
            arrival.push_back(id);
            let cap = self.options.max_event_ids.unwrap_or(MAX_EVENT_IDS).max(1);
            // Past the bound, the oldest tenth goes at once (amortised, not per event).
            if arrival.len() > cap {
                let n = (arrival.len() - cap + cap / 10).min(arrival.len());
                for old in arrival.drain(..n) {
                    events.remove(&old);
                }
                self.forgotten.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Makes room for `new` more buckets: first those whose every window has passed
    /// since their last request (they hold nothing), then the least recently used.
    fn evict(&self, buckets: &mut HashMap<BucketKey, Bucket>, new: usize, now: Instant) {
        let cap = self.options.max_buckets.unwrap_or(MAX_BUCKETS).max(new);
        if buckets.len() + new <= cap {
            return;
        }
        let longest = |b: &Bucket| Duration::from_secs(WINDOW_SECS[b.windows.len() - 1]);
        buckets.retain(|_, b| now.duration_since(b.last) < longest(b));
        if buckets.len() + new > cap {
            // Amortised: a tenth of the cap at once, oldest first.
            let mut by_age: Vec<(Instant, BucketKey)> = buckets.iter().map(|(k, b)| (b.last, k.clone())).collect();
            by_age.sort_unstable_by_key(|(last, _)| *last);
            let n = buckets.len() + new - cap + cap / 10;
            for (_, key) in by_age.into_iter().take(n) {
                buckets.remove(&key);
            }
        }
        let mut until = lock(&self.throttled_until);
        until.retain(|k, _| buckets.contains_key(k));
        lock(&self.holds).retain(|k, _| buckets.contains_key(k));
    }
}

async fn control(state: &Arc<State>, method: &Method, path: &str, body: &[u8]) -> Response<ProxyBody> {
    match (method.as_str(), path) {
        ("GET", "/__sim/stats") => {
            json_response(StatusCode::OK, &serde_json::to_value(state.stats()).unwrap_or_default())
        }
        ("GET", "/__sim/events") => {
            json_response(StatusCode::OK, &serde_json::to_value(state.events()).unwrap_or_default())
        }
        ("GET", "/__sim/faults") => {
            json_response(StatusCode::OK, &serde_json::to_value(&lock(&state.faults).0).unwrap_or_default())
        }
        ("POST" | "PUT", "/__sim/faults") => match serde_json::from_slice::<Faults>(body) {
            Ok(faults) => match state.set_faults(faults.clone()) {
                Ok(()) => json_response(StatusCode::OK, &serde_json::to_value(faults).unwrap_or_default()),
                Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({"error": e})),
            },
            Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
        },
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "no such control endpoint"})),
    }
}

async fn respond(state: &Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    if path == STATUS_PATH {
        let indicator = lock(&state.status_indicator).clone();
        let description = match indicator.as_str() {
            "none" => "All Systems Operational",
            "minor" => "Minor Service Outage",
            "major" => "Partial System Outage",
            _ => "Major Service Outage",
        };
        return json_response(
            StatusCode::OK,
            &json!({"page": {"id": "sim", "name": "Klaviyo (simulated)", "url": state_url(&parts)},
                    "status": {"indicator": indicator, "description": description}}),
        );
    }
    if path.starts_with("/__sim/") {
        return control(state, &parts.method, &path, &body).await;
    }
    if !(path.starts_with("/api/") || path.starts_with("/client/")) {
        return klaviyo_error(StatusCode::NOT_FOUND, "not_found", "Not found.", "No such path.");
    }
    {
        let mut totals = lock(&state.totals);
        totals.0 += 1;
    }
    // Down is down: an outage answers before any check of the request.
    if lock(&state.faults).0.outage == faults::Outage::Unavailable {
        state.server_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return klaviyo_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "error",
            "A server error occurred.",
            "Simulated outage.",
        );
    }
    let Some(revision) = parts.headers.get("revision").and_then(|v| v.to_str().ok()) else {
        return klaviyo_error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "Invalid input.",
            "Missing required header `revision`.",
        );
    };
    let Some(op) = catalog::find(parts.method.as_str(), &path, is_beta_revision(revision)) else {
        return klaviyo_error(StatusCode::NOT_FOUND, "not_found", "Not found.", "No such endpoint.");
    };
    let params: Vec<(String, String)> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let mut who = None;
    let account = if op.is_client() {
        match params.iter().find(|(k, _)| k == "company_id") {
            Some((_, id)) if !id.is_empty() => account_alias(id),
            _ => return klaviyo_error(StatusCode::BAD_REQUEST, "invalid", "Invalid input.", "Missing `company_id`."),
        }
    } else {
        match parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            Some(a) if lock(&state.revoked).contains(&revoked_alias(a)) => {
                return klaviyo_error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_failed",
                    "Incorrect authentication credentials.",
                    "Incorrect authentication credentials.",
                )
            }
            Some(a) if parse_authorization(a).is_some() => {
                let c = state.credential(a);
                let quota = c.quota();
                who = Some(c);
                quota
            }
            _ => {
                return klaviyo_error(
                    StatusCode::UNAUTHORIZED,
                    "not_authenticated",
                    "Authentication credentials were not provided.",
                    "Missing or invalid private key.",
                )
            }
        }
    };
    let conditions: Vec<usize> = op
        .conditions
        .iter()
        .enumerate()
        .filter(|(_, c)| params.iter().any(|(k, v)| c.matches(k, v)))
        .map(|(i, _)| i)
        .collect();
    let mut keys: Vec<BucketKey> = vec![(account.clone(), op.endpoint, None)];
    keys.extend(conditions.iter().map(|&c| (account.clone(), op.endpoint, Some(c))));
    let now = Instant::now();
    state.note_arrival(&keys, now);
    if let Some(left) = state.held(&keys, now) {
        let secs = left.as_micros().div_ceil(1_000_000) as u64;
        return state.throttle(&keys, now, Some(secs.to_string()), secs);
    }
    match state.verdict(&account) {
        faults::Verdict::Pass => {}
        faults::Verdict::Error(status) => {
            state.server_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return klaviyo_error(status, "error", "A server error occurred.", "Simulated server error.");
        }
        faults::Verdict::Throttle(retry_after, secs) => {
            state.hold(&keys, now, secs);
            return state.throttle(&keys, now, retry_after, secs);
        }
        faults::Verdict::Challenge => return challenge(),
    }
    match state.admit(&account, op, &conditions) {
        Err(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            state.throttle(&keys, now, Some(secs.to_string()), secs)
        }
        Ok((limit, remaining, reset)) => {
            if op.id == "create_event" || op.id == "create_client_event" {
                state.record_event(&body);
            }
            if op.id == "bulk_create_events" {
                match bulk::check(&body) {
                    Ok(ids) => ids.into_iter().for_each(|id| state.note_event(id)),
                    Err(refusal) => return refusal.into_response(),
                }
            }
            let mut resp = match &who {
                Some(c) if op.id == "get_accounts" && !c.accounts_read => klaviyo_error(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    "You do not have permission to perform this action.",
                    "This API key is missing required scopes: accounts:read.",
                ),
                Some(c) if op.id == "get_accounts" => account_document(&c.account, &path),
                _ => success(op, &parts.method, &path, &body),
            };
            let h = resp.headers_mut();
            h.insert("ratelimit-limit", HeaderValue::from(limit));
            h.insert("ratelimit-remaining", HeaderValue::from(remaining));
            h.insert("ratelimit-reset", HeaderValue::from(reset));
            resp
        }
    }
}

impl State {
    /// The time left in a hold on any of the buckets, when `throttle_holds` is on.
    fn held(&self, keys: &[BucketKey], now: Instant) -> Option<Duration> {
        if !lock(&self.faults).0.throttle_holds {
            return None;
        }
        let holds = lock(&self.holds);
        keys.iter().filter_map(|k| holds.get(k)).filter(|end| **end > now).map(|end| *end - now).max()
    }

    /// Starts a hold of `secs` on the buckets, when `throttle_holds` is on.
    fn hold(&self, keys: &[BucketKey], now: Instant, secs: u64) {
        if !lock(&self.faults).0.throttle_holds || secs == 0 {
            return;
        }
        let mut holds = lock(&self.holds);
        for k in keys {
            holds.insert(k.clone(), now + Duration::from_secs(secs));
        }
    }

    /// A 429 like Klaviyo's: `Retry-After` (when given) and a detail naming the wait.
    fn throttle(
        &self,
        keys: &[BucketKey],
        now: Instant,
        retry_after: Option<String>,
        secs: u64,
    ) -> Response<ProxyBody> {
        lock(&self.totals).1 += 1;
        self.note_retry_after(keys, now, retry_after.as_deref());
        let mut resp = klaviyo_error(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "Request was throttled.",
            &format!("Request was throttled. Expected available in {secs} second{}.", if secs == 1 { "" } else { "s" }),
        );
        if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Cloudflare's managed challenge: an HTML page, `403`, `cf-mitigated: challenge`.
fn challenge() -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from_static(
        b"<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>Enable JavaScript and cookies to continue</body></html>",
    )));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=UTF-8"));
    h.insert("cf-mitigated", HeaderValue::from_static("challenge"));
    h.insert("server", HeaderValue::from_static("cloudflare"));
    resp
}

fn state_url(parts: &http::request::Parts) -> String {
    parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map_or_else(String::new, |h| format!("http://{h}"))
}

/// `GET /api/accounts`: the one account the credential belongs to.
fn account_document(id: &str, path: &str) -> Response<ProxyBody> {
    let self_link = format!("https://a.klaviyo.com{path}");
    json_response(
        StatusCode::OK,
        &json!({"data": [{"type": "account", "id": id, "attributes": {
                "test_account": true,
                "contact_information": {"organization_name": "Simulated Account", "default_sender_name": "Simulator",
                    "default_sender_email": "sim@example.com", "website_url": "https://example.com",
                    "street_address": {"address1": "1 Test Way", "address2": null, "city": "Boston",
                        "region": "MA", "country": "US", "zip": "02108"}},
                "industry": "Software", "timezone": "UTC", "preferred_currency": "USD", "public_api_key": id,
                "locale": "en-US"},
                "links": {"self": self_link}}], "links": {"self": self_link, "next": null, "prev": null}}),
    )
}

/// A plausible JSON:API answer for a successful request.
fn success(op: &Operation, method: &Method, path: &str, body: &[u8]) -> Response<ProxyBody> {
    let resource = op.path.split('/').nth(2).unwrap_or("resource");
    // Most resource types are the path's first segment in the singular; the upsert
    // endpoints answer with the resource they write (the SDKs check the type).
    let kind = match op.id {
        "create_or_update_profile" => "profile".to_string(),
        _ => resource.strip_suffix('s').unwrap_or(resource).to_string(),
    };
    let id_in_path =
        op.path.ends_with("{id}").then(|| path.trim_end_matches('/').rsplit('/').next().unwrap_or_default());
    let self_link = format!("https://a.klaviyo.com{path}");
    if op.id == "get_accounts" {
        return account_document("SimAcct1", path);
    }
    if op.id == "get_profiles" {
        let profile_link = "https://a.klaviyo.com/api/profiles/01SIMPROFILE0000000000000/";
        return json_response(
            StatusCode::OK,
            &json!({"data": [{"type": "profile", "id": "01SIMPROFILE0000000000000", "attributes": {
                "email": "sim@example.com", "first_name": "Sim", "last_name": "Ulated",
                "created": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:00:00+00:00",
                "properties": {}}, "links": {"self": profile_link}}],
                "links": {"self": self_link, "next": null, "prev": null}}),
        );
    }
    if op.id == "create_event" || op.id == "bulk_create_events" || op.path.starts_with("/client/") {
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::ACCEPTED;
        return resp;
    }
    let attributes =
        serde_json::from_slice::<Value>(body).ok().and_then(|v| v["data"]["attributes"].as_object().cloned());
    match *method {
        Method::GET => match id_in_path {
            Some(id) => json_response(
                StatusCode::OK,
                &json!({"data": {"type": kind, "id": id, "attributes": {}, "links": {"self": self_link}}, "links": {"self": self_link}}),
            ),
            None => json_response(
                StatusCode::OK,
                &json!({"data": [], "links": {"self": self_link, "next": null, "prev": null}}),
            ),
        },
        Method::DELETE => {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        _ => {
            let id = id_in_path.map_or_else(|| format!("{:026X}", fastrand::u128(..) >> 24), str::to_string);
            let status = if *method == Method::POST { StatusCode::CREATED } else { StatusCode::OK };
            json_response(
                status,
                &json!({"data": {"type": kind, "id": id, "attributes": attributes.unwrap_or_default(), "links": {"self": self_link}}}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_name_their_accounts() {
        let private =
            |account: &str, read: bool| Some(SimCredential { account: account.into(), app: None, accounts_read: read });
        for (auth, expected) in [
            ("Klaviyo-API-Key pk_acme_1", private("acme", true)),
            (" klaviyo-api-key  pk_acme_2 ", private("acme", true)),
            ("Klaviyo-API-Key pk_test_account_a_0123", private("test_account_a", true)),
            ("Klaviyo-API-Key pk_acme_no-accounts-read", private("acme", false)),
            (
                "Bearer oat_acme_tok1",
                Some(SimCredential { account: "acme".into(), app: Some("oat".into()), accounts_read: true }),
            ),
            ("Klaviyo-API-Key pk_solo", None),
            ("Klaviyo-API-Key xx_acme_1", None),
            ("Basic pk_acme_1", None),
            ("pk_acme_1", None),
        ] {
            assert_eq!(credential_account(auth), expected, "{auth}");
        }
        assert_eq!(account_alias("Klaviyo-API-Key pk_acme_1"), "acme");
        assert_eq!(account_alias("Bearer oat_acme_tok1"), "acme@oat");
        assert_eq!(account_alias("klaviyo-api-key pk_solo"), account_alias("Klaviyo-API-Key pk_solo"));
        assert_ne!(account_alias("Klaviyo-API-Key pk_solo"), account_alias("Klaviyo-API-Key pk_other"));
    }
}
