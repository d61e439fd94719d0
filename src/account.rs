//! Account resolution: the Klaviyo account behind a credential, so that buckets belong
//! to accounts (Klaviyo's unit of quota), not to credential strings.
//!
//! The first time the proxy sees a credential it asks `GET /api/accounts` (the account
//! document's `id`): once per credential, single-flight (concurrent first requests wait
//! for the one lookup), the answer cached (bounded, with a TTL), persisted beside the
//! limiter state and shared through Redis when the Redis store is on. Buckets are then
//! keyed by (account, credential kind): every private key of an account shares
//! `(account, private)`; OAuth tokens share `(account, auth.oauth_app)`, so a refreshed
//! token keeps its bucket. Operators may declare accounts by fingerprint instead.
//!
//! A first lookup cannot go through the account's own `get_accounts` bucket (the account
//! is what it asks for), so first lookups share one gate of one per second: two keys of
//! one account never look up in the same second of Klaviyo's `get_accounts` window. Once
//! the account is known the lookup is charged to the account's bucket too, and later
//! lookups (after the TTL) go through the account's bucket.
//!
//! When the lookup cannot tell (no `accounts:read` scope, 401, Klaviyo down or busy) the
//! credential keeps its own buckets as before, the reason is logged once per
//! credential and counted, and the lookup is tried again after `accounts.retry_ms`. A
//! known account whose refresh fails stays known until the next try.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Request;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::breaker::Breaker;
use crate::config::Config;
use crate::credential::{Credential, Fingerprint, Kind};
use crate::limiter::redis::RedisStore;
use crate::limiter::{Account, Limiter};
use crate::metrics::Metrics;
use crate::queue;
use crate::route::Router;
use crate::upstream::{self, Upstream};

/// Who a credential belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A Klaviyo account id (looked up) or a declared account.
    Account(String),
    /// Unknown: the credential keeps its own buckets.
    Own,
}

/// Why a lookup could not tell: a bounded label of [`crate::metrics::ACCOUNT_LOOKUPS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 403: the credential lacks the `accounts:read` scope.
    Forbidden,
    /// 401: Klaviyo does not know the credential.
    Unauthorized,
    /// 429 from Klaviyo.
    Throttled,
    /// Klaviyo failed, timed out or could not be reached; or the breaker or the kill
    /// switch kept the lookup from going.
    Unavailable,
    /// No `get_accounts` token within `accounts.lookup_max_wait_ms`.
    Busy,
    /// A 2xx whose body names no account.
    Invalid,
}

impl Failure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Forbidden => "forbidden",
            Failure::Unauthorized => "unauthorized",
            Failure::Throttled => "throttled",
            Failure::Unavailable => "unavailable",
            Failure::Busy => "busy",
            Failure::Invalid => "invalid",
        }
    }
}

/// How the resolver reaches Klaviyo (the proxy's limiter and upstream; a fake in tests).
pub trait Klaviyo {
    /// Waits for a `get_accounts` token: the account's own bucket when `known` names
    /// it, else the shared gate of first lookups.
    fn admit(&self, known: Option<&str>) -> impl Future<Output = Result<(), Failure>> + Send;
    /// `GET /api/accounts` with the credential: the account's id.
    fn fetch(&self) -> impl Future<Output = Result<String, Failure>> + Send;
    /// Counts a first lookup (made through the gate) against the account's own bucket.
    fn charge(&self, account: &str) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, Clone)]
enum Entry {
    /// Known until `expires` (ms since the Unix epoch: it is persisted).
    Known { account: String, expires: u64 },
    /// Not known; tried again at `retry_at`.
    Failed { retry_at: Instant },
}

/// One line of the persisted cache. Never a key: fingerprints are one-way.
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    fingerprint: Fingerprint,
    account: String,
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The account cache and its single-flight lookups. Lives as long as the proxy
/// (reloads keep it).
#[derive(Debug)]
pub struct Resolver {
    entries: Mutex<Cache>,
    flights: Mutex<HashMap<Fingerprint, Arc<tokio::sync::Mutex<()>>>>,
    /// `<limiter.state_path>.accounts`, when set.
    path: Option<PathBuf>,
    writing: Mutex<()>,
    redis: Option<RedisStore>,
    metrics: Arc<Metrics>,
}

/// Where the cache is kept for a limiter state path.
pub fn cache_path(state_path: &Path) -> PathBuf {
    let mut p = state_path.as_os_str().to_owned();
    p.push(".accounts");
    PathBuf::from(p)
}

impl Resolver {
    /// A resolver persisting beside `state_path` (loading what an earlier run kept) and
    /// sharing through `redis`.
    pub fn new(state_path: Option<&Path>, redis: Option<RedisStore>, metrics: Arc<Metrics>) -> Self {
        let path = state_path.map(cache_path);
        let mut entries = Cache::default();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Vec<Persisted>>(&bytes) {
                    Ok(kept) => {
                        let now = now_ms();
                        for p in kept.into_iter().filter(|p| p.expires_ms > now) {
                            entries.insert(
                                p.fingerprint,
                                Entry::Known { account: p.account, expires: p.expires_ms },
                                usize::MAX,
                            );
                        }
                        tracing::info!(path = %path.display(), accounts = entries.len(), "account cache loaded");
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "account cache unreadable: starting empty")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "account cache unreadable: starting empty")
                }
            }
        }
        Resolver {
            entries: Mutex::new(entries),
            flights: Mutex::new(HashMap::new()),
            path,
            writing: Mutex::new(()),
            redis,
            metrics,
        }
    }

    /// The bucket account a request with `credential` spends, and its account named in
    /// the metrics: looked up (or waited for) when not known yet.
    pub async fn account_for(
        &self,
        router: &Router,
        config: &Config,
        credential: &Credential,
        klaviyo: &impl Klaviyo,
    ) -> Account {
        let identity = self.identity(config, credential, klaviyo).await;
        let (account, name) = bucket(router, config, credential, &identity);
        if let Some(name) = name {
            self.metrics.name_account(account, &name);
        }
        account
    }

    /// The account a credential was found to belong to, if known now (for `/health`).
    pub fn known(&self, config: &Config, credential: &Credential) -> Option<String> {
        let fp = credential.fingerprint();
        if let Some(name) = declared(config, credential, &fp) {
            return Some(name);
        }
        match lock(&self.entries).get(&fp) {
            Some(Entry::Known { account, .. }) => Some(account.clone()),
            _ => None,
        }
    }

    /// [`Resolver::account_for`] when it needs no lookup and no wait (the common case:
    /// the account is declared, cached, or not to be resolved), else `None`.
    pub fn account_now(&self, router: &Router, config: &Config, credential: &Credential) -> Option<Account> {
        let identity = self.identity_now(config, credential)?;
        let (account, name) = bucket(router, config, credential, &identity);
        if let Some(name) = name {
            self.metrics.name_account(account, &name);
        }
        Some(account)
    }

    /// Who `credential` belongs to, when known without a lookup.
    fn identity_now(&self, config: &Config, credential: &Credential) -> Option<Identity> {
        if credential.kind() == Kind::Malformed {
            return Some(Identity::Own);
        }
        let fp = credential.fingerprint();
        if let Some(name) = declared(config, credential, &fp) {
            return Some(Identity::Account(name));
        }
        if !config.accounts.resolve || !config.limits.enabled {
            return Some(Identity::Own);
        }
        self.settled(&fp)
    }

    /// Who `credential` belongs to, looking it up once if needed.
    pub async fn identity(&self, config: &Config, credential: &Credential, klaviyo: &impl Klaviyo) -> Identity {
        if let Some(known) = self.identity_now(config, credential) {
            return known;
        }
        let fp = credential.fingerprint();
        let flight = lock(&self.flights).entry(fp.clone()).or_default().clone();
        let _one_lookup = flight.lock().await;
        // The lookup this request waited for may have answered.
        if let Some(settled) = self.settled(&fp) {
            return settled;
        }
        let identity = self.look_up(config, credential, &fp, klaviyo).await;
        let mut flights = lock(&self.flights);
        if flights.get(&fp).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&fp);
        }
        identity
    }

    /// The cached answer, unless it is due for a lookup.
    fn settled(&self, fp: &Fingerprint) -> Option<Identity> {
        match lock(&self.entries).get(fp)? {
            Entry::Known { account, expires } if *expires > now_ms() => Some(Identity::Account(account.clone())),
            Entry::Failed { retry_at } if *retry_at > Instant::now() => Some(Identity::Own),
            _ => None,
        }
    }

    async fn look_up(&self, config: &Config, credential: &Credential, fp: &Fingerprint, k: &impl Klaviyo) -> Identity {
        let previous = match lock(&self.entries).get(fp) {
            Some(Entry::Known { account, .. }) => Some(account.clone()),
            _ => None,
        };
        let ttl = Duration::from_secs(config.accounts.cache_ttl_s);
        // Another replica may have resolved it, before or while this one waited its turn.
        for attempt in 0..2 {
            if attempt == 1 {
                if let Err(failure) = k.admit(previous.as_deref()).await {
                    return self.failed(config, credential, fp, previous, failure);
                }
            }
            if let Some((account, expires)) = self.shared(fp).await {
                self.metrics.account_lookup("shared");
                self.learn(fp, &account, expires, config);
                return Identity::Account(account);
            }
        }
        match k.fetch().await {
            Ok(account) => {
                if previous.is_none() {
                    k.charge(&account).await;
                }
                let expires = now_ms().saturating_add(ttl.as_millis() as u64);
                self.metrics.account_lookup("resolved");
                tracing::info!(
                    fingerprint = fp.short(),
                    kind = credential.kind().as_str(),
                    account = %account,
                    "credential resolved to its account"
                );
                self.learn(fp, &account, expires, config);
                self.share(fp, &account, expires, ttl).await;
                Identity::Account(account)
            }
            Err(failure) => self.failed(config, credential, fp, previous, failure),
        }
    }

    fn failed(
        &self,
        config: &Config,
        credential: &Credential,
        fp: &Fingerprint,
        previous: Option<String>,
        failure: Failure,
    ) -> Identity {
        self.metrics.account_lookup(failure.as_str());
        let retry = Duration::from_millis(config.accounts.retry_ms);
        let mut entries = lock(&self.entries);
        // A known account stays known until the next try.
        if let Some(account) = previous {
            let expires = now_ms().saturating_add(retry.as_millis() as u64);
            tracing::debug!(fingerprint = fp.short(), reason = failure.as_str(), "account refresh failed");
            entries.insert(fp.clone(), Entry::Known { account: account.clone(), expires }, cap(config));
            return Identity::Account(account);
        }
        let first = !matches!(entries.get(fp), Some(Entry::Failed { .. }));
        if first {
            tracing::warn!(
                fingerprint = fp.short(),
                kind = credential.kind().as_str(),
                reason = failure.as_str(),
                retry_in_ms = config.accounts.retry_ms,
                "cannot tell the account behind a credential: it keeps buckets of its own"
            );
        }
        entries.insert(fp.clone(), Entry::Failed { retry_at: Instant::now() + retry }, cap(config));
        self.count_unresolved(&entries);
        Identity::Own
    }

    fn learn(&self, fp: &Fingerprint, account: &str, expires: u64, config: &Config) {
        let kept = {
            let mut entries = lock(&self.entries);
            entries.insert(fp.clone(), Entry::Known { account: account.to_string(), expires }, cap(config));
            self.count_unresolved(&entries);
            self.path.is_some().then(|| persisted(&entries))
        };
        if let (Some(path), Some(kept)) = (&self.path, kept) {
            let _one_writer = lock(&self.writing);
            if let Err(e) = write_atomically(path, &kept) {
                tracing::warn!(path = %path.display(), error = %e, "cannot persist the account cache");
            }
        }
    }

    fn count_unresolved(&self, entries: &Cache) {
        let n = entries.failed();
        self.metrics.accounts_unresolved(n);
    }

    async fn shared(&self, fp: &Fingerprint) -> Option<(String, u64)> {
        let redis = self.redis.as_ref()?;
        match redis.shared_account(fp.as_str()).await {
            Ok(Some(text)) => {
                let (expires, account) = text.split_once(' ')?;
                Some((account.to_string(), expires.parse().ok()?))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read shared account resolutions");
                None
            }
        }
    }

    async fn share(&self, fp: &Fingerprint, account: &str, expires: u64, ttl: Duration) {
        let Some(redis) = &self.redis else { return };
        if let Err(e) = redis.share_account(fp.as_str(), &format!("{expires} {account}"), ttl).await {
            tracing::debug!(error = %e, "cannot share an account resolution");
        }
    }
}

fn declared(config: &Config, credential: &Credential, fp: &Fingerprint) -> Option<String> {
    if let Some(name) = config.accounts.declared.get(fp) {
        return Some(name.as_str().to_string());
    }
    let injected = config.auth.private_key.as_ref()?;
    let name = config.auth.account_name.as_ref()?;
    let ours = crate::credential::parse(format!("Klaviyo-API-Key {}", injected.expose()).as_bytes());
    (ours == *credential).then(|| name.as_str().to_string())
}

fn cap(config: &Config) -> usize {
    config.accounts.cache_entries.get() as usize
}

/// The cache of answers, bounded. Full, a new entry makes room in O(log n): the
/// entries that expired go (each once), then a failed one (the one to retry soonest),
/// else the answer expiring soonest. A flood of bogus keys costs no scan of the cache.
#[derive(Debug, Default)]
struct Cache {
    /// Each entry with its sequence number (ties in the orders below). Looked up by
    /// every limited request: foldhash, not SipHash (a fingerprint is a keyed hash,
    /// nothing a client can aim at a collision).
    map: foldhash::HashMap<Fingerprint, (Entry, u64)>,
    /// Known entries by expiry.
    known: BTreeMap<(u64, u64), Fingerprint>,
    /// Failed entries by retry time.
    failed: BTreeMap<(Instant, u64), Fingerprint>,
    seq: u64,
    /// Entries removed to make room, for the test of an insert's cost.
    work: u64,
}

impl Cache {
    fn get(&self, fp: &Fingerprint) -> Option<&Entry> {
        self.map.get(fp).map(|(e, _)| e)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Failed entries (credentials on buckets of their own), in O(1).
    fn failed(&self) -> usize {
        self.failed.len()
    }

    fn known(&self) -> impl Iterator<Item = (&Fingerprint, &str, u64)> {
        self.map.iter().filter_map(|(fp, (e, _))| match e {
            Entry::Known { account, expires } => Some((fp, account.as_str(), *expires)),
            Entry::Failed { .. } => None,
        })
    }

    fn unorder(&mut self, entry: &Entry, seq: u64) {
        match entry {
            Entry::Known { expires, .. } => self.known.remove(&(*expires, seq)),
            Entry::Failed { retry_at } => self.failed.remove(&(*retry_at, seq)),
        };
    }

    fn remove(&mut self, fp: &Fingerprint) {
        if let Some((entry, seq)) = self.map.remove(fp) {
            self.unorder(&entry, seq);
            self.work += 1;
        }
    }

    /// Inserts, making room first: expired entries go, then a failed one, then the
    /// answer expiring soonest.
    fn insert(&mut self, fp: Fingerprint, entry: Entry, cap: usize) {
        if self.map.len() >= cap && !self.map.contains_key(&fp) {
            let (now, now_ms) = (Instant::now(), now_ms());
            while let Some(((_, _), old)) = self.known.first_key_value().filter(|((at, _), _)| *at <= now_ms) {
                let old = old.clone();
                self.remove(&old);
            }
            while let Some(((_, _), old)) = self.failed.first_key_value().filter(|((at, _), _)| *at <= now) {
                let old = old.clone();
                self.remove(&old);
            }
            while self.map.len() >= cap {
                let failed = self.failed.first_key_value().map(|(_, fp)| fp);
                let Some(old) = failed.or_else(|| self.known.first_key_value().map(|(_, fp)| fp)).cloned() else {
                    break;
                };
                self.remove(&old);
            }
        }
        self.seq += 1;
        let seq = self.seq;
        match &entry {
            Entry::Known { expires, .. } => self.known.insert((*expires, seq), fp.clone()),
            Entry::Failed { retry_at } => self.failed.insert((*retry_at, seq), fp.clone()),
        };
        if let Some((old, old_seq)) = self.map.insert(fp, (entry, seq)) {
            self.unorder(&old, old_seq);
        }
    }
}

fn persisted(entries: &Cache) -> Vec<u8> {
    let kept: Vec<Persisted> = entries
        .known()
        .map(|(fp, account, expires)| Persisted {
            fingerprint: fp.clone(),
            account: account.to_string(),
            expires_ms: expires,
        })
        .collect();
    serde_json::to_vec(&kept).unwrap_or_default()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The bucket account of an identity, and the account's name for metrics:
/// `(account, private)`, `(account, auth.oauth_app)`, or the credential's own.
pub fn bucket<'a>(
    router: &Router,
    config: &Config,
    credential: &Credential,
    identity: &'a Identity,
) -> (Account, Option<Cow<'a, str>>) {
    match (identity, credential.kind()) {
        // Borrowed: every request of a known account comes here.
        (Identity::Account(id), Kind::Private) => {
            (router.account("account/private", id.as_bytes()), Some(Cow::Borrowed(id.as_str())))
        }
        (Identity::Account(id), Kind::OAuth) => {
            let app = config.auth.oauth_app.as_str();
            (router.account(&format!("account/oauth/{app}"), id.as_bytes()), Some(Cow::Owned(format!("{id}:{app}"))))
        }
        _ => (router.credential_account(credential), None),
    }
}

/// `GET /api/accounts` carrying `authorization`, as it goes upstream.
pub fn accounts_request(authorization: Option<&HeaderValue>, revision: &str) -> http::request::Parts {
    let mut req = Request::get("/api/accounts").body(()).expect("static request");
    if let Some(auth) = authorization {
        req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
    }
    let (mut parts, ()) = req.into_parts();
    upstream::outbound_headers(&mut parts.headers, revision);
    parts
}

/// The account id in a `GET /api/accounts` body.
pub fn account_id(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v["data"][0]["id"].as_str().filter(|id| !id.is_empty()).map(str::to_owned)
}

/// The proxy's way to Klaviyo for one credential's lookup.
#[derive(Debug)]
pub struct Lookup<'a> {
    /// The bucket store.
    pub limiter: &'a Limiter,
    /// The pooled client.
    pub upstream: &'a Upstream,
    /// The breaker: no lookup while it is open.
    pub breaker: &'a Breaker,
    /// The routes of the running config.
    pub router: &'a Router,
    /// The running config.
    pub config: &'a Config,
    /// The credential, normalised.
    pub credential: &'a Credential,
}

impl Lookup<'_> {
    fn demands(&self, account: &str) -> Vec<crate::limiter::Demand> {
        let identity = Identity::Account(account.to_string());
        let (bucket, _) = bucket(self.router, self.config, self.credential, &identity);
        self.router.route_as("GET", "/api/accounts", None, false, bucket).demands
    }
}

impl Klaviyo for Lookup<'_> {
    async fn admit(&self, known: Option<&str>) -> Result<(), Failure> {
        let demands = match known {
            Some(account) => self.demands(account),
            None => vec![self.router.lookup_gate()],
        };
        let deadline = Instant::now() + Duration::from_millis(self.config.accounts.lookup_max_wait_ms);
        let depth = self.config.queue.max_depth;
        queue::wait(self.limiter, &demands, deadline, depth, "get_accounts").await.map(drop).map_err(|_| Failure::Busy)
    }

    async fn fetch(&self) -> Result<String, Failure> {
        if !self.config.upstream.enabled
            || (self.config.breaker.enabled && self.breaker.open_for(Instant::now()).is_some())
        {
            return Err(Failure::Unavailable);
        }
        let mut auth = HeaderValue::from_bytes(self.credential.as_bytes()).map_err(|_| Failure::Invalid)?;
        auth.set_sensitive(true);
        let parts = accounts_request(Some(&auth), self.config.upstream.revision.as_str());
        let resp = self.upstream.send(&parts, Bytes::new()).await.map_err(|_| Failure::Unavailable)?;
        // A Cloudflare challenge never looked at the key: it says nothing of its scopes.
        if crate::retry::is_challenge(resp.status(), resp.headers()) {
            return Err(Failure::Unavailable);
        }
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
        match status {
            200..=299 => account_id(&body).ok_or(Failure::Invalid),
            401 => Err(Failure::Unauthorized),
            403 => Err(Failure::Forbidden),
            429 => Err(Failure::Throttled),
            _ => Err(Failure::Unavailable),
        }
    }

    async fn charge(&self, account: &str) {
        if !self.config.limits.enabled {
            return;
        }
        let demands = self.demands(account);
        match self.limiter {
            Limiter::Local(store) => store.record(&demands, Instant::now()),
            Limiter::Shared(shared) => {
                shared.mirror(&demands);
                for demand in &demands {
                    // One take, now, in every window of the bucket at once.
                    let member = crate::retry::new_unique_id();
                    let windows: Vec<Vec<(Duration, String)>> =
                        demand.windows.as_slice().iter().map(|_| vec![(Duration::ZERO, member.clone())]).collect();
                    if let Err(e) = shared.redis().record(demand, &windows).await {
                        tracing::debug!(error = %e, "cannot charge a lookup to the account's bucket");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A Klaviyo that answers `answer` after `delay`, counting its calls.
    struct Fake {
        answer: Mutex<Result<String, Failure>>,
        delay: Duration,
        admits: AtomicU32,
        fetches: AtomicU32,
        charges: AtomicU32,
        known: Mutex<Vec<Option<String>>>,
    }

    impl Fake {
        fn new(answer: Result<&str, Failure>) -> Fake {
            Fake {
                answer: Mutex::new(answer.map(str::to_string)),
                delay: Duration::from_millis(200),
                admits: AtomicU32::new(0),
                fetches: AtomicU32::new(0),
                charges: AtomicU32::new(0),
                known: Mutex::new(vec![]),
            }
        }
    }

    impl Klaviyo for Fake {
        async fn admit(&self, known: Option<&str>) -> Result<(), Failure> {
            self.admits.fetch_add(1, Ordering::SeqCst);
            lock(&self.known).push(known.map(str::to_string));
            Ok(())
        }
        async fn fetch(&self) -> Result<String, Failure> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            lock(&self.answer).clone()
        }
        async fn charge(&self, _: &str) {
            self.charges.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn config(extra: &str) -> Config {
        Config::parse(extra, "t").unwrap()
    }

    fn resolver() -> Resolver {
        Resolver::new(None, None, Arc::new(Metrics::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_share_one_lookup() {
        let r = Arc::new(resolver());
        let fake = Arc::new(Fake::new(Ok("Acme01")));
        let config = Arc::new(config(""));
        let cred = crate::credential::parse(b"Klaviyo-API-Key pk_one");
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (r, fake, config, cred) = (r.clone(), fake.clone(), config.clone(), cred.clone());
                tokio::spawn(async move { r.identity(&config, &cred, &*fake).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Identity::Account("Acme01".into()));
        }
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(fake.charges.load(Ordering::SeqCst), 1);
        // Another spelling of the same key is the same credential.
        let again = crate::credential::parse(b"klaviyo-api-key   pk_one");
        assert_eq!(r.identity(&config, &again, &*fake).await, Identity::Account("Acme01".into()));
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
        assert!(lock(&r.flights).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_own_buckets_and_retry_later() {
        let r = resolver();
        let fake = Fake::new(Err(Failure::Forbidden));
        let config = config("[accounts]\nretry_ms = 60000\n");
        let cred = crate::credential::parse(b"Klaviyo-API-Key pk_noscope");
        assert_eq!(r.identity(&config, &cred, &fake).await, Identity::Own);
        assert_eq!(r.identity(&config, &cred, &fake).await, Identity::Own);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1, "not retried before retry_ms");
        tokio::time::advance(Duration::from_secs(61)).await;
        *lock(&fake.answer) = Ok("Acme01".into());
        assert_eq!(r.identity(&config, &cred, &fake).await, Identity::Account("Acme01".into()));
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
        let text = r.metrics.encode(&crate::limiter::LocalStore::new());
        assert!(text.contains("klaviyo_proxy_account_lookups_total{result=\"forbidden\"} 1"), "{text}");
        assert!(text.contains("klaviyo_proxy_account_lookups_total{result=\"resolved\"} 1"), "{text}");
        assert!(text.contains("klaviyo_proxy_accounts_unresolved 0"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_declared_and_disabled_need_no_lookup() {
        let r = resolver();
        let fake = Fake::new(Ok("Acme01"));
        let declared = crate::credential::parse(b"Bearer tok_declared");
        let config = config(&format!("[accounts.declared]\n{} = \"shop-eu\"\n", declared.fingerprint()));
        assert_eq!(r.identity(&config, &declared, &fake).await, Identity::Account("shop-eu".into()));
        let malformed = crate::credential::parse(b"Basic abc");
        assert_eq!(r.identity(&config, &malformed, &fake).await, Identity::Own);
        let off = self::config("[accounts]\nresolve = false\n");
        let plain = crate::credential::parse(b"Klaviyo-API-Key pk_x");
        assert_eq!(r.identity(&off, &plain, &fake).await, Identity::Own);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded() {
        let r = resolver();
        let fake = Fake::new(Ok("Acme01"));
        let config = config("[accounts]\ncache_entries = 3\n");
        for n in 0..10 {
            let cred = crate::credential::parse(format!("Klaviyo-API-Key pk_{n}").as_bytes());
            r.identity(&config, &cred, &fake).await;
        }
        assert_eq!(lock(&r.entries).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_bogus_key_costs_bounded_work_in_a_full_cache() {
        let r = resolver();
        let fake = Fake::new(Err(Failure::Unauthorized));
        let config = config("[accounts]\ncache_entries = 2000\nretry_ms = 600000\n");
        let bogus = |n: u32| crate::credential::parse(format!("Klaviyo-API-Key pk_bogus_{n}").as_bytes());
        for n in 0..2000 {
            r.identity(&config, &bogus(n), &fake).await;
        }
        let before = lock(&r.entries).work;
        for n in 2000..6000 {
            assert_eq!(r.identity(&config, &bogus(n), &fake).await, Identity::Own);
        }
        let per_key = (lock(&r.entries).work - before) / 4000;
        // O(cache_entries) per key was ~3000 entries visited (the full map scanned
        // twice); now one entry is removed for each added.
        assert!(per_key <= 2, "{per_key} entries visited per new key");
        assert_eq!(lock(&r.entries).len(), 2000);
        assert_eq!(lock(&r.entries).failed(), 2000);
    }

    #[test]
    fn buckets_are_per_account_and_kind() {
        let config = config("[auth]\noauth_app = \"myapp\"\n");
        let router = Router::new(&config.limits, b"k");
        let acme = Identity::Account("Acme01".into());
        let key = |s: &str| crate::credential::parse(s.as_bytes());
        let (one, name) = bucket(&router, &config, &key("Klaviyo-API-Key pk_1"), &acme);
        assert_eq!(name.as_deref(), Some("Acme01"));
        assert_eq!(bucket(&router, &config, &key("Klaviyo-API-Key pk_2"), &acme).0, one);
        let (oauth, name) = bucket(&router, &config, &key("Bearer t1"), &acme);
        assert_eq!(name.as_deref(), Some("Acme01:myapp"));
        assert_ne!(oauth, one);
        assert_eq!(bucket(&router, &config, &key("Bearer t2"), &acme).0, oauth);
        let own = bucket(&router, &config, &key("Klaviyo-API-Key pk_1"), &Identity::Own).0;
        assert_ne!(own, one);
        assert_eq!(own, router.route("GET", "/api/flows", None, false, Some(b"Klaviyo-API-Key pk_1")).account);
    }

    #[test]
    fn persisted_answers_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("kp-accounts-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("limiter.state");
        let config = config("");
        let fp = crate::credential::parse(b"Klaviyo-API-Key pk_persisted_1").fingerprint();
        let r = Resolver::new(Some(&state), None, Arc::new(Metrics::new()));
        r.learn(&fp, "Acme01", now_ms() + 60_000, &config);
        let text = std::fs::read_to_string(cache_path(&state)).unwrap();
        assert!(text.contains("Acme01") && !text.contains("pk_persisted"), "{text}");
        let again = Resolver::new(Some(&state), None, Arc::new(Metrics::new()));
        assert_eq!(again.settled(&fp), Some(Identity::Account("Acme01".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
