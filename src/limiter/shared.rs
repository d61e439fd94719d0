//! The shared store: buckets in Redis for every replica, with a local fallback.
//!
//! While Redis answers, every decision is made there ([`RedisStore`]) and mirrored
//! into a local store whose limits are the quota ÷ replicas. When a Redis call fails
//! or is slower than `limiter.timeout_ms`, the replica is *degraded*: it decides with
//! that local store alone (so N replicas together still send at most the quota, give or
//! take the window in which Redis went away), warns once, and a heartbeat probes Redis
//! every second. When Redis answers again, the takes made locally meanwhile are
//! recorded in Redis first, then decisions go back to it. A request never fails only
//! because Redis is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::local::LocalStore;
use super::redis::{RedisStore, RedisStoreError};
use super::{BucketKey, Demand, WindowSpec, Windows};

/// How often each replica beats (and, while degraded, probes Redis).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A replica that has not beaten for this long no longer counts.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

/// One bucket's local queue for the shared store: only its head asks Redis for a
/// token, the others wait their turn in FIFO order (tokio's mutex is fair).
#[derive(Debug, Default)]
pub struct Gate {
    /// Held by the request at the head of this replica's queue.
    pub head: tokio::sync::Mutex<()>,
    /// Requests of this replica waiting for or holding `head`.
    pub waiting: AtomicU32,
}

/// Takes granted by the fallback store while degraded, to hand to Redis on its return.
#[derive(Debug)]
struct Degraded {
    demand: Demand,
    taken: Vec<Instant>,
}

/// Which store decides, as `/health` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// The local store: this replica counts alone (by configuration).
    Local,
    /// Redis decides for every replica.
    Redis,
    /// Redis is unreachable or slow: this replica counts locally at quota ÷ replicas.
    Degraded,
}

impl StoreState {
    /// `local`, `redis` or `degraded`: a bounded label.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Local => "local",
            StoreState::Redis => "redis",
            StoreState::Degraded => "degraded",
        }
    }
}

/// Redis for every replica, a local store at quota ÷ replicas when Redis is away.
#[derive(Debug)]
pub struct SharedStore {
    redis: RedisStore,
    fallback: LocalStore,
    configured_replicas: Option<u32>,
    learned_replicas: AtomicU32,
    degraded: AtomicBool,
    degradations: AtomicU64,
    /// Serialises the way back to Redis (one hand-over of local takes at a time).
    recovering: tokio::sync::Mutex<()>,
    gates: DashMap<BucketKey, Arc<Gate>>,
    taken_while_degraded: Mutex<HashMap<BucketKey, Degraded>>,
}

impl SharedStore {
    /// A shared store over `redis`; `replicas` is the configured replica count, if any.
    pub fn new(redis: RedisStore, replicas: Option<u32>) -> Self {
        SharedStore {
            redis,
            fallback: LocalStore::new(),
            configured_replicas: replicas,
            learned_replicas: AtomicU32::new(1),
            degraded: AtomicBool::new(false),
            degradations: AtomicU64::new(0),
            recovering: tokio::sync::Mutex::new(()),
            gates: DashMap::new(),
            taken_while_degraded: Mutex::new(HashMap::new()),
        }
    }

    /// The Redis side.
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The local store used while degraded (and mirrored while not).
    pub fn fallback(&self) -> &LocalStore {
        &self.fallback
    }

    /// `Redis`, or `Degraded` while Redis is away.
    pub fn state(&self) -> StoreState {
        if self.degraded.load(Ordering::Acquire) {
            StoreState::Degraded
        } else {
            StoreState::Redis
        }
    }

    /// Whether Redis is away and this replica counts locally.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// How many times this replica has lost Redis (a counter for the metrics).
    pub fn degradations(&self) -> u64 {
        self.degradations.load(Ordering::Relaxed)
    }

    /// The replicas the quota is split over while degraded: configured, else learned
    /// from heartbeats (1 until one was seen).
    pub fn replicas(&self) -> u32 {
        self.configured_replicas.unwrap_or_else(|| self.learned_replicas.load(Ordering::Relaxed)).max(1)
    }

    /// The demands at this replica's share of the quota: `limit / replicas` per
    /// window, or, when that is below one, one take per as many windows as it takes for
    /// the replicas' shares to add up to at most the limit.
    pub fn fallback_demands(&self, demands: &[Demand]) -> Vec<Demand> {
        let n = self.replicas();
        let share = |w: &WindowSpec| match w.limit / n {
            0 => WindowSpec { limit: 1, period: w.period.saturating_mul(u64::from(n.div_ceil(w.limit))) },
            limit => WindowSpec { limit, period: w.period },
        };
        demands
            .iter()
            .map(|d| {
                let specs: Vec<WindowSpec> = d.windows.as_slice().iter().map(share).collect();
                Demand { key: d.key, windows: Windows::new(&specs) }
            })
            .collect()
    }

    /// This replica's local queue for a request's buckets (keyed by its first bucket,
    /// the endpoint's own, so that requests with and without a conditional bucket share
    /// one line).
    pub fn gate(&self, demands: &[Demand]) -> Option<Arc<Gate>> {
        let key = demands.iter().map(|d| d.key).min()?;
        Some(self.gates.entry(key).or_default().clone())
    }

    /// Notes a failed or slow Redis call: from now on, decide locally. Warns once per
    /// transition.
    pub fn mark_down(&self, error: &RedisStoreError) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.degradations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %error,
                replicas = self.replicas(),
                "redis unreachable: counting locally at quota / replicas until it answers"
            );
        }
    }

    /// Mirrors a Redis grant into the fallback store.
    pub fn mirror(&self, demands: &[Demand]) {
        self.fallback.record(&self.fallback_demands(demands), Instant::now());
    }

    /// Notes a take the fallback store granted while degraded.
    pub fn taken_locally(&self, demands: &[Demand]) {
        let now = Instant::now();
        let mut taken = self.taken_while_degraded.lock().unwrap_or_else(PoisonError::into_inner);
        for d in demands {
            taken.entry(d.key).or_insert_with(|| Degraded { demand: *d, taken: Vec::new() }).taken.push(now);
        }
    }

    /// One heartbeat: learns the replica count, and while degraded hands the local
    /// takes to Redis and goes back to it. Returns the state after the beat.
    pub async fn beat(&self) -> StoreState {
        match self.redis.heartbeat(HEARTBEAT_TTL).await {
            Ok(n) => {
                self.learned_replicas.store(n.max(1), Ordering::Relaxed);
                if self.degraded.load(Ordering::Acquire) {
                    self.recover().await;
                }
            }
            Err(e) => self.mark_down(&e),
        }
        self.state()
    }

    /// Records in Redis what this replica took locally, then decides with Redis again.
    async fn recover(&self) {
        let _one = self.recovering.lock().await;
        if !self.degraded.load(Ordering::Acquire) {
            return;
        }
        let pending = std::mem::take(&mut *self.taken_while_degraded.lock().unwrap_or_else(PoisonError::into_inner));
        let now = Instant::now();
        let pending: Vec<Degraded> = pending.into_values().collect();
        for (i, entry) in pending.iter().enumerate() {
            for w in 0..entry.demand.windows.as_slice().len() {
                let ages: Vec<Duration> = entry.taken.iter().map(|t| now.saturating_duration_since(*t)).collect();
                if let Err(e) = self.redis.record(&entry.demand, w, &ages).await {
                    // Keep what was not handed over yet for the next beat.
                    let mut taken = self.taken_while_degraded.lock().unwrap_or_else(PoisonError::into_inner);
                    taken.extend(pending.into_iter().skip(i).map(|d| (d.demand.key, d)));
                    tracing::debug!(error = %e, "redis answered a heartbeat but not the hand-over");
                    return;
                }
            }
        }
        // Fresh windows in the fallback store: the mirror rebuilds them from here on.
        self.degraded.store(false, Ordering::Release);
        tracing::info!(replicas = self.replicas(), "redis answers again: shared limits restored");
    }

    /// Drops idle gates and local buckets, and degraded-time takes older than a day.
    pub fn sweep(&self, now: Instant) {
        self.fallback.sweep(now);
        self.gates.retain(|_, g| Arc::strong_count(g) > 1 || g.waiting.load(Ordering::Acquire) > 0);
        let day = Duration::from_secs(86_400 + 120);
        let mut taken = self.taken_while_degraded.lock().unwrap_or_else(PoisonError::into_inner);
        taken.retain(|_, t| {
            t.taken.retain(|at| now.saturating_duration_since(*at) < day);
            !t.taken.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Account, BucketId};
    use super::*;

    fn store(replicas: Option<u32>) -> SharedStore {
        // Never connected: these tests only look at the local side.
        let redis = RedisStore::new("redis://127.0.0.1:1/0", "t", Duration::from_millis(10)).unwrap();
        SharedStore::new(redis, replicas)
    }

    #[tokio::test]
    async fn fallback_is_quota_over_replicas() {
        let s = store(Some(3));
        let d = Demand {
            key: BucketKey { account: Account(1), bucket: BucketId::Endpoint(0) },
            windows: Windows::new(&[
                WindowSpec { limit: 10, period: 1_050_000 },
                WindowSpec { limit: 150, period: 60_250_000 },
                WindowSpec { limit: 2, period: 86_460_000_000 },
            ]),
        };
        let local = s.fallback_demands(&[d]);
        let specs: Vec<(u32, u64)> = local[0].windows.as_slice().iter().map(|w| (w.limit, w.period)).collect();
        // 2 a day over 3 replicas: one every two days each, never 3 a day together.
        assert_eq!(specs, [(3, 1_050_000), (50, 60_250_000), (1, 2 * 86_460_000_000)]);
        assert_eq!(store(None).replicas(), 1);
    }

    #[tokio::test]
    async fn one_warning_per_transition() {
        let s = store(Some(2));
        assert_eq!(s.state(), StoreState::Redis);
        for _ in 0..3 {
            s.mark_down(&RedisStoreError::Timeout(Duration::from_millis(10)));
        }
        assert_eq!(s.state(), StoreState::Degraded);
        assert_eq!(s.degradations(), 1);
        // Redis still away: the heartbeat keeps the replica degraded.
        assert_eq!(s.beat().await, StoreState::Degraded);
        assert_eq!(s.degradations(), 1);
    }
}
