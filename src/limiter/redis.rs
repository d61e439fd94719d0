//! The Redis side of the shared store: buckets that every replica counts against.
//!
//! Each decision is one atomic Lua script ([`DECIDE`]) that takes one token from every
//! window of every bucket a request needs, or none, and otherwise returns how long to
//! wait. It keeps the local store's invariant across all replicas: **no interval of
//! length `period` holds more than `limit` takes of a bucket**. A window is a sorted
//! set of take times (µs, Redis server time, so replicas with skewed clocks agree);
//! takes older than the window are dropped on every decision and each key expires by
//! itself one window after its last take.
//!
//! Keys are `{prefix:account}:b:<bucket>:w<i>` (windows) and `...:p` (pause): the hash
//! tag puts all of an account's keys, and so all of one decision's keys, on one Redis
//! Cluster slot. `<bucket>` names the endpoint by its first `operationId` (not by its
//! index in the catalog), so replicas of different versions still agree during a
//! rolling upgrade.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Script};
use tokio::sync::OnceCell;

use super::window::Tick;
use super::{ticks, BucketId, BucketKey, Demand};
use crate::catalog;

/// Lua prelude shared by the scripts: `clock(override)` is Redis's own `TIME` in µs
/// (so replicas with skewed clocks agree), or the override when a test sets one.
macro_rules! lua_clock {
    () => {
        r#"
local function clock(override)
  if override ~= 0 then return override end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"#
    };
}

/// One decision. KEYS: per demand, its pause key then one key per window. ARGV: how
/// many local requests are ahead (0 = take now if possible), a clock override (0 =
/// Redis `TIME`), the demand count, then per demand its window count followed by
/// `limit, period` per window. Returns `{1, 0}` when the tokens were taken, else
/// `{0, wait_us}`: for `ahead > 0`, when the request behind `ahead` others could go
/// (nothing is taken then).
pub const DECIDE: &str = concat!(
    lua_clock!(),
    r#"
local function fmt(n) return string.format('%d', n) end
local ahead = tonumber(ARGV[1])
local now = clock(tonumber(ARGV[2]))
local at = now
local wins = {}
local a, k = 4, 1
for d = 1, tonumber(ARGV[3]) do
  local paused = tonumber(redis.call('GET', KEYS[k]) or '0')
  if paused > at then at = paused end
  k = k + 1
  local nw = tonumber(ARGV[a])
  for w = 1, nw do
    local limit, period = tonumber(ARGV[a + 2 * w - 1]), tonumber(ARGV[a + 2 * w])
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', fmt(now - period))
    wins[#wins + 1] = { key = KEYS[k], limit = limit, period = period, n = redis.call('ZCARD', KEYS[k]) }
    k = k + 1
  end
  a = a + 1 + 2 * nw
end
if ahead == 0 then
  -- The limit-th most recent take must lie a whole period before the new one.
  for _, w in ipairs(wins) do
    if w.n >= w.limit then
      local r = redis.call('ZRANGE', w.key, -w.limit, -w.limit, 'WITHSCORES')
      local t = tonumber(r[2]) + w.period
      if t > at then at = t end
    end
  end
  if at > now then return { 0, at - now } end
  for _, w in ipairs(wins) do
    redis.call('ZADD', w.key, fmt(now), fmt(now) .. ':' .. w.n)
    redis.call('PEXPIRE', w.key, fmt(math.ceil(w.period / 1000) + 1000))
  end
  return { 1, 0 }
end
-- A prediction: the slots of the requests ahead and of this one, as if no other
-- replica took anything meanwhile. The j-th next take is measured against take
-- n + j - limit: an existing one (fetched, at most ahead + 1 per window) or an
-- earlier predicted one.
for _, w in ipairs(wins) do
  w.ex = {}
  local lo, hi = math.max(1, w.n - w.limit + 1), math.min(w.n, w.n - w.limit + ahead + 1)
  if lo <= hi then
    local r = redis.call('ZRANGE', w.key, lo - 1, hi - 1, 'WITHSCORES')
    for i = 2, #r, 2 do w.ex[lo + i / 2 - 1] = tonumber(r[i]) end
  end
end
local t = at
local fut = {}
for j = 1, ahead + 1 do
  for _, w in ipairs(wins) do
    local q = w.n + j - w.limit
    if q >= 1 then
      local s
      if q <= w.n then s = w.ex[q] else s = fut[q - w.n] end
      s = s + w.period
      if s > t then t = s end
    end
  end
  fut[j] = t
end
return { 0, t - now }
"#
);

/// A pause (an upstream `Retry-After`): nothing leaves the buckets before `now + delay`.
/// KEYS: pause keys. ARGV: delay (µs), clock override (0 = `TIME`). Pauses only grow.
pub const PAUSE: &str = concat!(
    lua_clock!(),
    r#"
local now = clock(tonumber(ARGV[2]))
local delay = tonumber(ARGV[1])
local untl = now + delay
for _, key in ipairs(KEYS) do
  local cur = tonumber(redis.call('GET', key) or '0')
  if untl > cur then
    redis.call('SET', key, string.format('%d', untl), 'PX', string.format('%d', math.ceil(delay / 1000) + 1000))
  end
end
return 1
"#
);

/// Takes recorded without a decision: the takes this replica's fallback made while
/// Redis was away, handed over when it returns. KEYS: the window keys of one bucket.
/// ARGV: a clock override, then per window its period (µs), a count `k` and `k` pairs
/// of (age in µs before now, member). Members name takes uniquely and stably, so a
/// hand-over sent twice (a reply lost to a timeout) counts each take once. Returns the
/// number of takes added.
pub const RECORD: &str = concat!(
    lua_clock!(),
    r#"
local now = clock(tonumber(ARGV[1]))
local a = 2
local added = 0
for w = 1, #KEYS do
  local period, k = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local any = false
  for i = 1, k do
    local age = tonumber(ARGV[a])
    if age < period then
      added = added + redis.call('ZADD', KEYS[w], string.format('%d', now - age), ARGV[a + 1])
      any = true
    end
    a = a + 2
  end
  if any then
    redis.call('PEXPIRE', KEYS[w], string.format('%d', math.ceil(period / 1000) + 1000))
  end
end
return added
"#
);

/// A `RateLimit-Remaining` correction: Klaviyo says only `remaining` of `limit` are
/// left in a window that resets in `reset`; phantom takes make the window hold at least
/// `limit - remaining`, dated so they return when Klaviyo's window resets. `KEYS[1]`: the
/// window key. ARGV: limit, period, remaining, reset (µs), clock override.
pub const CORRECT: &str = concat!(
    lua_clock!(),
    r#"
local now = clock(tonumber(ARGV[5]))
local limit, period, remaining, reset = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - period))
local n = redis.call('ZCARD', KEYS[1])
local missing = limit - remaining - n
if missing <= 0 then return 0 end
local tick = now + math.min(reset, period) - period
if tick <= now - period then tick = now - period + 1 end
local s = string.format('%d', tick)
for i = 1, missing do
  redis.call('ZADD', KEYS[1], s, s .. ':' .. (n + i) .. 'c')
end
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(period / 1000) + 1000))
return missing
"#
);

/// A replica's heartbeat: `KEYS[1]` the replica set, ARGV: replica id, ttl (µs).
/// Returns the ids of the replicas that beat within the ttl.
pub const HEARTBEAT: &str = concat!(
    lua_clock!(),
    r#"
local now = clock(0)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - ttl))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(ttl / 1000) * 2))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#
);

/// What Redis decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The tokens were taken: the request may go now.
    Granted,
    /// Nothing was taken; the request could go after this wait.
    Wait(Duration),
}

/// Why Redis could not decide.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// Connection, protocol or script error. (The URL, which may hold a password, is
    /// never part of the message.)
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within `limiter.timeout_ms`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// How the store reaches Redis.
#[derive(Clone)]
enum Conn {
    /// One server (or a proxy in front of several); reconnects by itself.
    Single(ConnectionManager),
    /// Redis Cluster: routes each script to the slot of its keys' hash tag.
    Cluster(Arc<(ClusterClient, OnceCell<ClusterConnection>)>),
}

/// Buckets in Redis, shared by every replica using the same prefix.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    timeout: Duration,
    id: String,
    decide: Script,
    pause: Script,
    record: Script,
    correct: Script,
    heartbeat: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.prefix).field("timeout", &self.timeout).finish()
    }
}

/// The name of each endpoint in keys: the `operationId` of its first operation.
fn endpoint_name(endpoint: u16) -> &'static str {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let count = catalog::OPERATIONS.iter().map(|o| o.endpoint + 1).max().unwrap_or(0);
        let mut names = vec![""; count];
        for op in catalog::OPERATIONS.iter().rev() {
            names[op.endpoint] = op.id;
        }
        names
    });
    names.get(usize::from(endpoint)).copied().unwrap_or("?")
}

fn certs(pem: Vec<u8>) -> redis::TlsCertificates {
    redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }
}

fn bucket_part(bucket: BucketId) -> String {
    match bucket {
        BucketId::Endpoint(e) => endpoint_name(e).to_string(),
        BucketId::Condition(e, c) => format!("{}.c{c}", endpoint_name(e)),
        BucketId::Unknown => "unknown".into(),
    }
}

impl RedisStore {
    /// A store on `url` (`redis://` or `rediss://`). Connects lazily, so a proxy
    /// starts even while Redis is down; `timeout` bounds every call.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, RedisStoreError> {
        Self::with_ca(url, prefix, timeout, None)
    }

    /// [`RedisStore::new`] trusting only the CA certificates in `ca_pem` for
    /// `rediss://` (a private CA) instead of the webpki roots.
    pub fn with_ca(
        url: &str,
        prefix: &str,
        timeout: Duration,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, RedisStoreError> {
        let client = match ca_pem {
            Some(pem) => Client::build_with_tls(url, certs(pem))?,
            None => Client::open(url)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?);
        Ok(Self::build(conn, prefix, timeout))
    }

    /// A store on a Redis Cluster, found through `url` (any node). Connects on first
    /// use, and again after a failed attempt.
    pub fn cluster(
        url: &str,
        prefix: &str,
        timeout: Duration,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, RedisStoreError> {
        let mut builder = ClusterClient::builder(vec![url]).connection_timeout(timeout).response_timeout(timeout);
        if let Some(pem) = ca_pem {
            builder = builder.certs(certs(pem));
        }
        let conn = Conn::Cluster(Arc::new((builder.build()?, OnceCell::new())));
        Ok(Self::build(conn, prefix, timeout))
    }

    fn build(conn: Conn, prefix: &str, timeout: Duration) -> Self {
        RedisStore {
            conn,
            prefix: prefix.to_string(),
            timeout,
            id: format!("{:016x}", fastrand::u64(..)),
            decide: Script::new(DECIDE),
            pause: Script::new(PAUSE),
            record: Script::new(RECORD),
            correct: Script::new(CORRECT),
            heartbeat: Script::new(HEARTBEAT),
        }
    }

    /// The key stem of a bucket: `{prefix:account}:b:<bucket>`.
    pub fn bucket_key(&self, key: &BucketKey) -> String {
        format!("{{{}:{:032x}}}:b:{}", self.prefix, key.account.0, bucket_part(key.bucket))
    }

    async fn run<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T, RedisStoreError> {
        let call = async {
            match &self.conn {
                Conn::Single(manager) => inv.invoke_async(&mut manager.clone()).await,
                Conn::Cluster(cluster) => {
                    let (client, cell) = &**cluster;
                    let conn = cell.get_or_try_init(|| client.get_async_connection()).await?;
                    inv.invoke_async(&mut conn.clone()).await
                }
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisStoreError::Timeout(self.timeout)),
        }
    }

    /// Takes a token from every window of every demanded bucket now, or none and
    /// returns the wait. With `ahead > 0` it only predicts when a request behind
    /// `ahead` local ones could go, and takes nothing.
    pub async fn decide(&self, demands: &[Demand], ahead: u32) -> Result<Decision, RedisStoreError> {
        self.decide_at(demands, ahead, None).await
    }

    /// [`RedisStore::decide`] on an explicit clock (µs) instead of Redis `TIME`: for
    /// tests that compare the script with the local window logic.
    pub async fn decide_at(
        &self,
        demands: &[Demand],
        ahead: u32,
        now: Option<Tick>,
    ) -> Result<Decision, RedisStoreError> {
        let mut demands: Vec<&Demand> = demands.iter().collect();
        // Duplicate keys would take twice from one bucket.
        demands.sort_by_key(|d| d.key);
        demands.dedup_by_key(|d| d.key);
        let mut inv = self.decide.prepare_invoke();
        inv.arg(ahead).arg(now.unwrap_or(0)).arg(demands.len());
        for d in &demands {
            let stem = self.bucket_key(&d.key);
            inv.key(format!("{stem}:p"));
            let windows = d.windows.as_slice();
            inv.arg(windows.len());
            for (i, w) in windows.iter().enumerate() {
                inv.key(format!("{stem}:w{i}"));
                inv.arg(w.limit).arg(w.period);
            }
        }
        let (granted, wait): (u8, u64) = self.run(inv).await?;
        Ok(if granted == 1 { Decision::Granted } else { Decision::Wait(Duration::from_micros(wait)) })
    }

    /// Pauses buckets for every replica: nothing leaves them for `delay` (Redis time).
    pub async fn pause(&self, keys: &[BucketKey], delay: Duration) -> Result<(), RedisStoreError> {
        self.pause_at(keys, delay, None).await
    }

    /// [`RedisStore::pause`] on an explicit clock (µs), for tests.
    pub async fn pause_at(
        &self,
        keys: &[BucketKey],
        delay: Duration,
        now: Option<Tick>,
    ) -> Result<(), RedisStoreError> {
        let mut inv = self.pause.prepare_invoke();
        for key in keys {
            inv.key(format!("{}:p", self.bucket_key(key)));
        }
        inv.arg(ticks(delay)).arg(now.unwrap_or(0));
        self.run::<i64>(inv).await.map(drop)
    }

    /// Records takes this replica made elsewhere (its fallback store, while Redis was
    /// away) in every window of a bucket at once: per window, `(age, member)` pairs,
    /// each take `age` before Redis' now, named by a member unique to the take.
    pub async fn record(&self, demand: &Demand, windows: &[Vec<(Duration, String)>]) -> Result<u64, RedisStoreError> {
        if windows.iter().all(Vec::is_empty) {
            return Ok(0);
        }
        let stem = self.bucket_key(&demand.key);
        let mut inv = self.record.prepare_invoke();
        inv.arg(0);
        for ((i, spec), takes) in demand.windows.as_slice().iter().enumerate().zip(windows) {
            inv.key(format!("{stem}:w{i}")).arg(spec.period).arg(takes.len());
            for (age, member) in takes {
                inv.arg(ticks(*age)).arg(member);
            }
        }
        self.run(inv).await
    }

    /// Applies a `RateLimit-Remaining` correction to window `window` of a bucket (the
    /// steady window is index 1): afterwards it holds at least `limit - remaining`
    /// takes, dated to return `reset` from now. Returns the phantom takes added.
    pub async fn correct(
        &self,
        demand: &Demand,
        window: usize,
        remaining: u32,
        reset: Duration,
    ) -> Result<u64, RedisStoreError> {
        let Some(spec) = demand.windows.as_slice().get(window) else { return Ok(0) };
        let mut inv = self.correct.prepare_invoke();
        inv.key(format!("{}:w{window}", self.bucket_key(&demand.key)))
            .arg(spec.limit)
            .arg(spec.period)
            .arg(remaining)
            .arg(ticks(reset))
            .arg(0);
        self.run(inv).await
    }

    /// The account resolution another replica shared for a credential fingerprint
    /// (`{prefix:acct:<fingerprint>}`; see [`crate::account`]): its stored text.
    pub async fn shared_account(&self, fingerprint: &str) -> Result<Option<String>, RedisStoreError> {
        let script = Script::new("return redis.call('GET', KEYS[1])");
        let mut inv = script.prepare_invoke();
        inv.key(format!("{{{}:acct:{fingerprint}}}", self.prefix));
        self.run(inv).await
    }

    /// Shares an account resolution with every replica for `ttl`.
    pub async fn share_account(&self, fingerprint: &str, value: &str, ttl: Duration) -> Result<(), RedisStoreError> {
        let script = Script::new("redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1");
        let mut inv = script.prepare_invoke();
        inv.key(format!("{{{}:acct:{fingerprint}}}", self.prefix)).arg(value).arg(ttl.as_millis().max(1) as u64);
        self.run::<i64>(inv).await.map(drop)
    }

    /// This replica's id (random per process), as its heartbeat names it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Marks this replica alive for `ttl` and returns the ids of the replicas that are.
    pub async fn heartbeat(&self, ttl: Duration) -> Result<Vec<String>, RedisStoreError> {
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key(format!("{{{}}}:replicas", self.prefix)).arg(&self.id).arg(ticks(ttl));
        self.run(inv).await
    }
}
