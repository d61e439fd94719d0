//! The shared store: buckets in Redis for every replica, with a local fallback.
//!
//! While Redis answers, every decision is made there ([`RedisStore`]) and mirrored
//! into a local store that holds this replica's share of the quota. When a Redis call
//! fails or is slower than `limiter.timeout_ms`, the replica is *degraded*: it decides
//! with that local store alone, warns once, and a heartbeat probes Redis every second.
//! The shares of all replicas add up to the quota in every window: `limit / replicas`
//! each, and the remainder to the lowest ranks (replicas ranked by id, learned from the
//! heartbeats), so a limit below the replica count goes whole to as many replicas and
//! the others queue until Redis returns. When Redis answers again, the takes made
//! locally are handed to Redis (the newest `limit` of each window, in one call per
//! bucket), then decisions go back to it, and requests still queued in the fallback
//! move to Redis. A request never fails only because Redis is down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::local::{LocalStore, MAX_DEMANDS};
use super::redis::{RedisStore, RedisStoreError};
use super::{ticks, Account, BucketId, BucketKey, Demand, Denied, WindowSpec, Windows};

/// How often each replica beats (and, while degraded, probes Redis).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// At most one pass for idle lines this often, while the lines fill the cap; also the
/// `Retry-After` of a request refused for want of one.
pub const LINE_PASS_EVERY: Duration = Duration::from_secs(1);

/// A replica that has not beaten for this long no longer counts.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tickets of requeued requests lie below this, those of new arrivals above.
const BACK: u64 = 1 << 62;

/// This replica's line for one set of buckets (the buckets a request needs, exactly):
/// only its first place asks Redis for a token, the others wait their turn. A request
/// waits only behind requests that need the same buckets; one that met an upstream
/// 429 goes back in front of every new arrival.
///
/// A line leaves its store's map when its last place leaves (an empty line holds no
/// state: Redis does), so the map holds the busy lines and [`SharedStore::line`] can
/// refuse a new one at the cap without a scan.
#[derive(Debug)]
pub struct Line {
    state: Mutex<LineState>,
    key: LineKey,
    home: Weak<Lines>,
}

type Lines = DashMap<LineKey, Arc<Line>>;

#[derive(Debug, Default)]
struct LineState {
    places: BTreeMap<u64, Arc<Notify>>,
    joined: u64,
    requeued: u64,
}

/// A request's ticket (its place) in a [`Line`]; dropping it leaves the line (and
/// lets the next go).
#[derive(Debug)]
pub struct Ticket {
    line: Arc<Line>,
    number: u64,
    wake: Arc<Notify>,
}

impl Line {
    fn new(key: LineKey, home: &Arc<Lines>) -> Self {
        Line { state: Mutex::default(), key, home: Arc::downgrade(home) }
    }

    /// Joins at the back; returns the place and how many are ahead of it.
    pub fn join(self: &Arc<Self>) -> (Ticket, u32) {
        let mut s = lock(&self.state);
        s.joined += 1;
        let ticket = BACK + s.joined;
        let ahead = s.places.len() as u32;
        (self.insert(&mut s, ticket), ahead)
    }

    /// Joins in front of every request that has not met a 429 (behind those that did).
    pub fn join_front(self: &Arc<Self>) -> Ticket {
        let mut s = lock(&self.state);
        s.requeued += 1;
        let ticket = s.requeued;
        self.insert(&mut s, ticket)
    }

    fn insert(self: &Arc<Self>, s: &mut LineState, ticket: u64) -> Ticket {
        let wake = Arc::new(Notify::new());
        s.places.insert(ticket, wake.clone());
        Ticket { line: self.clone(), number: ticket, wake }
    }

    /// Places in the line.
    pub fn len(&self) -> usize {
        lock(&self.state).places.len()
    }

    /// Whether nobody waits in the line.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    fn is_first(&self) -> bool {
        lock(&self.line.state).places.keys().next() == Some(&self.number)
    }

    /// Waits until this place is the first of its line.
    pub async fn first(&self) {
        // A wake-up sent between the check and the wait is kept by the Notify's permit.
        while !self.is_first() {
            self.wake.notified().await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = lock(&self.line.state);
        let was_first = s.places.keys().next() == Some(&self.number);
        s.places.remove(&self.number);
        if was_first {
            if let Some(next) = s.places.values().next() {
                next.notify_one();
            }
        }
        let empty = s.places.is_empty();
        drop(s);
        if let (true, Some(lines)) = (empty, self.line.home.upgrade()) {
            // Under the map's lock no one can take the line meanwhile; one who holds it
            // already (a count above the map's and this ticket's) joins it, so it stays.
            lines.remove_if(&self.line.key, |_, line| Arc::strong_count(line) <= 2 && line.is_empty());
        }
    }
}

/// A line is named by the exact set of buckets its requests need.
type LineKey = (Account, [Option<BucketId>; MAX_DEMANDS]);

fn line_key(demands: &[Demand]) -> Option<LineKey> {
    let account = demands.first()?.key.account;
    let mut ids: Vec<BucketId> = demands.iter().map(|d| d.key.bucket).collect();
    ids.sort();
    ids.dedup();
    let mut key = [None; MAX_DEMANDS];
    for (slot, id) in key.iter_mut().zip(ids) {
        *slot = Some(id);
    }
    Some((account, key))
}

/// Takes this replica's fallback granted that Redis has not counted yet: the newest
/// ones only (as many as the bucket's largest limit), since older ones cannot change a
/// decision that the newer ones do not already force.
#[derive(Debug)]
struct Unsent {
    demand: Demand,
    /// (when, a number naming the take), oldest first.
    taken: VecDeque<(Instant, u64)>,
}

impl Unsent {
    fn keep(&self) -> usize {
        self.demand.windows.as_slice().iter().map(|w| w.limit as usize).max().unwrap_or(0)
    }

    fn trim(&mut self) {
        let keep = self.keep();
        while self.taken.len() > keep {
            self.taken.pop_front();
        }
    }

    /// Per window, the takes still inside it and among its newest `limit`.
    fn to_send(&self, now: Instant, replica: &str) -> Vec<Vec<(Duration, String)>> {
        self.demand
            .windows
            .as_slice()
            .iter()
            .map(|w| {
                self.taken
                    .iter()
                    .rev()
                    .map(|(at, n)| (now.saturating_duration_since(*at), *n))
                    .take_while(|(age, _)| ticks(*age) < w.period)
                    .take(w.limit as usize)
                    .map(|(age, n)| (age, format!("{replica}:{n}h")))
                    .collect()
            })
            .collect()
    }
}

/// Which store decides, as `/health` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// The local store: this replica counts alone (by configuration).
    Local,
    /// Redis decides for every replica.
    Redis,
    /// Redis is unreachable or slow: this replica counts locally, at its share.
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

/// Redis for every replica, a local store at this replica's share when Redis is away.
#[derive(Debug)]
pub struct SharedStore {
    redis: RedisStore,
    fallback: LocalStore,
    configured_replicas: Option<u32>,
    learned_replicas: AtomicU32,
    /// This replica's rank among the live replicas' ids (`u32::MAX`: not known yet).
    rank: AtomicU32,
    degraded: AtomicBool,
    degradations: AtomicU64,
    /// Woken when Redis decides again, for the requests queued in the fallback.
    recovered: Notify,
    /// Serialises hand-overs of local takes.
    handing_over: tokio::sync::Mutex<()>,
    lines: Arc<Lines>,
    /// No pass for idle lines before this (see [`SharedStore::line`]).
    next_line_pass: Mutex<Option<Instant>>,
    unsent: Mutex<HashMap<BucketKey, Unsent>>,
    takes: AtomicU64,
    late_after: Duration,
}

impl SharedStore {
    /// A shared store over `redis`; `replicas` is the configured replica count, if any;
    /// `guard` the shortest window guard: a grant whose round trip took longer is
    /// discarded (see [`SharedStore::late_after`]).
    pub fn new(redis: RedisStore, replicas: Option<u32>, guard: Duration) -> Self {
        SharedStore {
            redis,
            fallback: LocalStore::new(),
            configured_replicas: replicas,
            learned_replicas: AtomicU32::new(1),
            rank: AtomicU32::new(u32::MAX),
            degraded: AtomicBool::new(false),
            degradations: AtomicU64::new(0),
            recovered: Notify::new(),
            handing_over: tokio::sync::Mutex::new(()),
            lines: Arc::default(),
            next_line_pass: Mutex::new(None),
            unsent: Mutex::new(HashMap::new()),
            takes: AtomicU64::new(0),
            late_after: guard,
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

    /// A Redis grant stamped at Redis' clock reaches Klaviyo up to its round trip
    /// later; the window's guard absorbs that only when the round trip is shorter.
    /// A grant that took longer is discarded (its token stays taken) and asked again.
    pub fn late_after(&self) -> Duration {
        self.late_after
    }

    /// The replicas the quota is split over while degraded: configured, else learned
    /// from heartbeats (1 until one was seen).
    pub fn replicas(&self) -> u32 {
        self.configured_replicas.unwrap_or_else(|| self.learned_replicas.load(Ordering::Relaxed)).max(1)
    }

    /// This replica's rank among `replicas()`: its place among the live replicas' ids
    /// in order; the last (smallest share) until a heartbeat told it.
    pub fn rank(&self) -> u32 {
        let n = self.replicas();
        match self.rank.load(Ordering::Relaxed) {
            u32::MAX => n - 1,
            r => r % n,
        }
    }

    /// Learns the live replicas from a heartbeat's answer: their number and this
    /// replica's rank among their ids.
    pub fn learn_replicas(&self, ids: &[String]) {
        let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        self.learned_replicas.store((ids.len() as u32).max(1), Ordering::Relaxed);
        let rank = ids.iter().position(|id| *id == self.redis.id()).map_or(u32::MAX, |r| r as u32);
        self.rank.store(rank, Ordering::Relaxed);
    }

    /// The demands at this replica's share of the quota, or `None` when some window's
    /// share is nothing: each replica gets `limit / replicas` and the first
    /// `limit % replicas` ranks one more, so the shares of all replicas add up to the
    /// limit in every window.
    pub fn fallback_demands(&self, demands: &[Demand]) -> Option<Vec<Demand>> {
        let (n, rank) = (self.replicas(), self.rank());
        let share = |w: &WindowSpec| {
            let limit = w.limit / n + u32::from(rank < w.limit % n);
            (limit > 0).then_some(WindowSpec { limit, period: w.period })
        };
        demands
            .iter()
            .map(|d| {
                let specs: Option<Vec<WindowSpec>> = d.windows.as_slice().iter().map(share).collect();
                Some(Demand { key: d.key, windows: Windows::new(&specs?) })
            })
            .collect()
    }

    /// This replica's line for exactly the buckets of `demands` (`None` without any).
    ///
    /// Lines are per-key state, capped by `limiter.max_buckets` like the local store's
    /// buckets. A line leaves the map with its last request, so at the cap every line
    /// is busy (but for one a request had taken and then left without joining, which a
    /// pass at most once a [`LINE_PASS_EVERY`] drops): the request that needs a new one
    /// is refused with [`Denied::TooManyBuckets`], as by the local store.
    pub fn line(&self, demands: &[Demand]) -> Option<Result<Arc<Line>, Denied>> {
        let key = line_key(demands)?;
        if let Some(line) = self.lines.get(&key).map(|l| l.clone()) {
            return Some(Ok(line));
        }
        let cap = self.fallback.max_buckets().max(1);
        if self.lines.len() >= cap {
            let now = Instant::now();
            let mut next = lock(&self.next_line_pass);
            if next.is_none_or(|at| at <= now) {
                *next = Some(now + LINE_PASS_EVERY);
                self.lines.retain(|_, line| Arc::strong_count(line) > 1 || !line.is_empty());
            }
            if self.lines.len() >= cap {
                return Some(Err(Denied::TooManyBuckets { wait: LINE_PASS_EVERY }));
            }
        }
        let lines = &self.lines;
        Some(Ok(lines.entry(key).or_insert_with(|| Arc::new(Line::new(key, lines))).clone()))
    }

    /// Notes a failed or slow Redis call: from now on, decide locally. Warns once per
    /// transition.
    pub fn mark_down(&self, error: &RedisStoreError) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.degradations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %error,
                replicas = self.replicas(),
                rank = self.rank(),
                "redis unreachable: counting locally at this replica's share until it answers"
            );
        }
    }

    /// A future that completes when Redis decides again; enable it before looking at
    /// [`SharedStore::is_degraded`] so that no recovery is missed.
    pub fn recovered(&self) -> tokio::sync::futures::Notified<'_> {
        self.recovered.notified()
    }

    /// Mirrors a Redis grant into the fallback store.
    pub fn mirror(&self, demands: &[Demand]) {
        if let Some(local) = self.fallback_demands(demands) {
            self.fallback.record(&local, Instant::now());
        }
    }

    /// Notes a take the fallback store granted, for Redis to count when it answers.
    pub fn taken_locally(&self, demands: &[Demand]) {
        let now = Instant::now();
        let mut unsent = lock(&self.unsent);
        let cap = self.fallback.max_buckets().max(1);
        for d in demands {
            if unsent.len() >= cap && !unsent.contains_key(&d.key) {
                // At the cap, a bucket's unsent takes go unsent: Redis counts fewer of
                // this replica's degraded takes, never more, and memory stays bounded.
                let victim = unsent.keys().next().copied();
                if let Some(victim) = victim {
                    unsent.remove(&victim);
                }
            }
            let n = self.takes.fetch_add(1, Ordering::Relaxed);
            let entry = unsent.entry(d.key).or_insert_with(|| Unsent { demand: *d, taken: VecDeque::new() });
            entry.demand = *d;
            entry.taken.push_back((now, n));
            entry.trim();
        }
    }

    /// Local takes not handed to Redis yet (bounded by each bucket's largest limit).
    pub fn unsent(&self) -> usize {
        lock(&self.unsent).values().map(|u| u.taken.len()).sum()
    }

    /// Hands the local takes of `only` (or of every bucket) to Redis, one call per
    /// bucket; what could not be sent stays for the next try, merged with takes that
    /// arrived meanwhile.
    pub async fn hand_over(&self, only: Option<&[BucketKey]>) -> Result<(), RedisStoreError> {
        let _one = self.handing_over.lock().await;
        let keys: Vec<BucketKey> = match only {
            Some(keys) => keys.to_vec(),
            None => lock(&self.unsent).keys().copied().collect(),
        };
        for key in keys {
            let Some(entry) = lock(&self.unsent).remove(&key) else { continue };
            let windows = entry.to_send(Instant::now(), self.redis.id());
            if let Err(e) = self.redis.record(&entry.demand, &windows).await {
                let mut unsent = lock(&self.unsent);
                match unsent.get_mut(&key) {
                    Some(newer) => {
                        for take in entry.taken.into_iter().rev() {
                            newer.taken.push_front(take);
                        }
                        newer.trim();
                    }
                    None => {
                        unsent.insert(key, entry);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// One heartbeat: learns the replicas, and hands the local takes to Redis and goes
    /// back to it if degraded. Returns the state after the beat.
    pub async fn beat(&self) -> StoreState {
        match self.redis.heartbeat(HEARTBEAT_TTL).await {
            Ok(ids) => {
                self.learn_replicas(&ids);
                if self.is_degraded() || !lock(&self.unsent).is_empty() {
                    self.recover().await;
                }
            }
            Err(e) => self.mark_down(&e),
        }
        self.state()
    }

    /// Records in Redis what this replica took locally, then decides with Redis again.
    async fn recover(&self) {
        if let Err(e) = self.hand_over(None).await {
            tracing::debug!(error = %e, "redis answered a heartbeat but not the hand-over");
            return;
        }
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!(replicas = self.replicas(), "redis answers again: shared limits restored");
            // Requests queued in the fallback go on through Redis.
            self.recovered.notify_waiters();
        }
        // Takes that left the fallback while the first hand-over ran.
        if let Err(e) = self.hand_over(None).await {
            self.mark_down(&e);
        }
    }

    /// Lines and buckets with unsent takes held now.
    pub fn per_key_state(&self) -> (usize, usize) {
        (self.lines.len(), lock(&self.unsent).len())
    }

    /// Drops idle lines and local buckets, and unsent takes no window holds any more.
    pub fn sweep(&self, now: Instant) {
        self.fallback.sweep(now);
        self.lines.retain(|_, line| Arc::strong_count(line) > 1 || !line.is_empty());
        lock(&self.unsent).retain(|_, u| {
            let longest = u.demand.windows.as_slice().iter().map(|w| w.period).max().unwrap_or(0);
            u.taken.retain(|(at, _)| ticks(now.saturating_duration_since(*at)) < longest);
            !u.taken.is_empty()
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
        SharedStore::new(redis, replicas, Duration::from_millis(50))
    }

    fn specs(d: Option<Vec<Demand>>) -> Option<Vec<(u32, u64)>> {
        Some(d?[0].windows.as_slice().iter().map(|w| (w.limit, w.period)).collect())
    }

    /// The shares of three replicas add up to each window's limit: 10/s gives 4, 3, 3;
    /// 2/day gives one a day to the first two ranks and nothing to the third (which
    /// waits for Redis), so the three never send 3 in a day together.
    #[tokio::test]
    async fn fallback_shares_add_up_to_the_quota() {
        let d = Demand {
            key: BucketKey { account: Account(1), bucket: BucketId::Endpoint(0) },
            windows: Windows::new(&[
                WindowSpec { limit: 10, period: 1_050_000 },
                WindowSpec { limit: 150, period: 60_250_000 },
                WindowSpec { limit: 2, period: 86_460_000_000 },
            ]),
        };
        let replicas: Vec<SharedStore> = (0..3).map(|_| store(Some(3))).collect();
        let ids: Vec<String> = replicas.iter().map(|s| s.redis().id().to_string()).collect();
        let mut got: Vec<Option<Vec<(u32, u64)>>> = replicas
            .iter()
            .map(|s| {
                s.learn_replicas(&ids);
                specs(s.fallback_demands(&[d]))
            })
            .collect();
        got.sort_by_key(|s| std::cmp::Reverse(s.clone()));
        assert_eq!(
            got,
            [
                Some(vec![(4, 1_050_000), (50, 60_250_000), (1, 86_460_000_000)]),
                Some(vec![(3, 1_050_000), (50, 60_250_000), (1, 86_460_000_000)]),
                None,
            ]
        );
        let ranks: std::collections::BTreeSet<u32> = replicas.iter().map(|s| s.rank()).collect();
        assert_eq!(ranks, (0..3).collect());
        // Before any heartbeat: the smallest share; alone: the whole quota.
        assert_eq!(specs(store(Some(3)).fallback_demands(&[d])), None);
        assert_eq!(specs(store(None).fallback_demands(&[d])).unwrap()[0], (10, 1_050_000));
        assert_eq!(store(None).replicas(), 1);
    }

    /// A line goes with its last request; at `limiter.max_buckets` lines, all busy, a
    /// new one is refused with the local store's refusal, and one going idle makes room.
    #[tokio::test]
    async fn lines_go_with_their_last_request_and_are_capped() {
        let s = store(Some(1));
        s.fallback().set_max_buckets(2);
        let d = |n: u128| {
            [Demand {
                key: BucketKey { account: Account(n), bucket: BucketId::Endpoint(0) },
                windows: Windows::new(&[WindowSpec { limit: 1, period: 1_000_000 }]),
            }]
        };
        let (first, _) = s.line(&d(1)).unwrap().unwrap().join();
        let (behind, ahead) = s.line(&d(1)).unwrap().unwrap().join();
        assert_eq!(ahead, 1);
        drop(first);
        assert_eq!(s.per_key_state().0, 1, "a line with a request left stays");
        drop(behind);
        assert_eq!(s.per_key_state().0, 0, "an empty line goes");
        let busy: Vec<_> = (1..=2).map(|n| s.line(&d(n)).unwrap().unwrap().join().0).collect();
        assert_eq!(s.line(&d(3)).unwrap().unwrap_err(), Denied::TooManyBuckets { wait: LINE_PASS_EVERY });
        // A line already held takes more requests.
        assert!(s.line(&d(1)).unwrap().is_ok());
        drop(busy);
        assert!(s.line(&d(3)).unwrap().is_ok());
        assert!(s.line(&[]).is_none());
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
