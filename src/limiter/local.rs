//! The in-process bucket store: a concurrent map of buckets, each behind its own lock.
//! Requests reserve their slot at arrival (the FIFO queue is the sequence of
//! reservations), so the admission time of a queued request is known at once.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::window::{earliest_all, Tick, WindowLog, WindowSpec};
use super::{ticks, BucketKey, Demand, Denied, Windows};

#[derive(Debug, Default)]
struct Bucket {
    logs: [WindowLog; 3],
    /// Reservations not yet started (queued requests).
    queued: u32,
    /// Nothing leaves before this tick (an upstream `Retry-After`).
    paused_until: Tick,
    /// After this tick the bucket holds nothing that matters and may be dropped.
    expires: Tick,
    /// Set by the sweeper under the lock; a holder of a stale handle looks again.
    removed: bool,
    /// The windows of the latest decision, for [`LocalStore::snapshot`].
    windows: Option<Windows>,
}

/// One bucket as the metrics see it.
#[derive(Debug, Clone)]
pub struct BucketView {
    /// The bucket.
    pub key: BucketKey,
    /// Requests waiting in its queue.
    pub queued: u32,
    /// Per window (burst, steady, daily): its spec and the takes inside it now.
    pub windows: Vec<(WindowSpec, u64)>,
}

/// A reservation: the request may leave at `at`. Hand it back with
/// [`LocalStore::start`] when the request goes, or [`LocalStore::cancel`] if it never does.
#[derive(Debug, Clone)]
pub struct Grant {
    /// When the request may leave.
    pub at: Instant,
    tick: Tick,
    keys: [Option<BucketKey>; MAX_DEMANDS],
    queued: bool,
}

/// Most buckets one request takes from: its endpoint's and up to two conditional
/// limits (`get_profile` with `include=lists,segments`).
pub const MAX_DEMANDS: usize = 3;

impl Grant {
    /// Whether the request has to wait for its slot.
    pub fn is_queued(&self) -> bool {
        self.queued
    }
}

/// The local (single-process) bucket store.
#[derive(Debug)]
pub struct LocalStore {
    epoch: Instant,
    buckets: DashMap<BucketKey, Arc<Mutex<Bucket>>>,
}

impl Default for LocalStore {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(b: &Mutex<Bucket>) -> MutexGuard<'_, Bucket> {
    b.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalStore {
    /// An empty store whose clock starts now.
    pub fn new() -> Self {
        LocalStore { epoch: Instant::now(), buckets: DashMap::new() }
    }

    fn tick(&self, at: Instant) -> Tick {
        ticks(at.saturating_duration_since(self.epoch))
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.epoch + Duration::from_micros(tick)
    }

    /// Reserves one token in every window of every demanded bucket at the earliest
    /// moment all of them allow, or none if that moment is past `deadline` or a bucket
    /// already queues `max_depth` requests.
    pub fn reserve(
        &self,
        demands: &[Demand],
        now: Instant,
        deadline: Instant,
        max_depth: u32,
    ) -> Result<Grant, Denied> {
        let mut demands: Vec<&Demand> = demands.iter().collect();
        // A fixed lock order keeps two multi-bucket requests from deadlocking.
        demands.sort_by_key(|d| d.key);
        demands.dedup_by_key(|d| d.key);
        loop {
            let handles: Vec<Arc<Mutex<Bucket>>> =
                demands.iter().map(|d| self.buckets.entry(d.key).or_default().clone()).collect();
            let mut guards: Vec<MutexGuard<'_, Bucket>> = handles.iter().map(|h| lock(h)).collect();
            if guards.iter().any(|g| g.removed) {
                continue;
            }
            return self.decide(&demands, &mut guards, now, deadline, max_depth);
        }
    }

    fn decide(
        &self,
        demands: &[&Demand],
        buckets: &mut [MutexGuard<'_, Bucket>],
        now: Instant,
        deadline: Instant,
        max_depth: u32,
    ) -> Result<Grant, Denied> {
        let now_t = self.tick(now);
        for (d, b) in demands.iter().zip(buckets.iter_mut()) {
            for (log, spec) in b.logs.iter_mut().zip(d.windows.as_slice()) {
                log.prune(now_t, spec.period);
            }
        }
        let pauses = buckets.iter().map(|b| b.paused_until).max().unwrap_or(0);
        let t = earliest_all(
            now_t.max(pauses),
            demands
                .iter()
                .zip(buckets.iter())
                .flat_map(|(d, b)| b.logs.iter().zip(d.windows.as_slice().iter().copied())),
        );
        let queued = t > now_t;
        if queued {
            let wait = Duration::from_micros(t - now_t);
            if buckets.iter().any(|b| b.queued >= max_depth) {
                return Err(Denied::QueueFull { wait });
            }
            if self.instant(t) > deadline {
                return Err(Denied::Deadline { wait });
            }
        }
        for (d, b) in demands.iter().zip(buckets.iter_mut()) {
            let windows = d.windows.as_slice();
            for log in &mut b.logs[..windows.len()] {
                log.record(t);
            }
            let longest = windows.iter().map(|w| w.period).max().unwrap_or(0);
            b.expires = b.expires.max(t.saturating_add(longest));
            b.queued += u32::from(queued);
            b.windows = Some(d.windows);
        }
        let mut keys = [None; MAX_DEMANDS];
        for (slot, d) in keys.iter_mut().zip(demands) {
            *slot = Some(d.key);
        }
        Ok(Grant { at: self.instant(t), tick: t, keys, queued })
    }

    /// Records one take at `now` (or after the latest take) in every window of every
    /// demanded bucket, whatever the windows allow: a take another authority granted
    /// (the shared store mirrors its Redis grants here, so that if Redis goes away this
    /// store already counts what this replica sent).
    pub fn record(&self, demands: &[Demand], now: Instant) {
        let now_t = self.tick(now);
        for d in demands {
            loop {
                let handle = self.buckets.entry(d.key).or_default().clone();
                let mut b = lock(&handle);
                if b.removed {
                    continue;
                }
                let windows = d.windows.as_slice();
                for (log, spec) in b.logs.iter_mut().zip(windows) {
                    log.prune(now_t, spec.period);
                    log.record(now_t.max(log.last().unwrap_or(0)));
                }
                let longest = windows.iter().map(|w| w.period).max().unwrap_or(0);
                b.expires = b.expires.max(now_t.saturating_add(longest));
                break;
            }
        }
    }

    fn each_bucket(&self, keys: &[Option<BucketKey>], mut f: impl FnMut(&mut Bucket)) {
        for key in keys.iter().flatten() {
            let handle = self.buckets.get(key).map(|h| h.clone());
            if let Some(handle) = handle {
                f(&mut lock(&handle));
            }
        }
    }

    /// Marks a queued reservation as started: it leaves the queue, keeps its tokens.
    pub fn start(&self, grant: &Grant) {
        if grant.queued {
            self.each_bucket(&grant.keys, |b| b.queued = b.queued.saturating_sub(1));
        }
    }

    /// Gives a reservation's tokens back (the request never left).
    pub fn cancel(&self, grant: &Grant) {
        self.each_bucket(&grant.keys, |b| {
            for log in &mut b.logs {
                log.remove(grant.tick);
            }
            if grant.queued {
                b.queued = b.queued.saturating_sub(1);
            }
        });
    }

    /// Requests waiting in a bucket's queue.
    pub fn queued(&self, key: &BucketKey) -> u32 {
        let handle = self.buckets.get(key).map(|h| h.clone());
        handle.map_or(0, |h| lock(&h).queued)
    }

    /// Every bucket held, with its queue and the tokens in use at `now`.
    pub fn snapshot(&self, now: Instant) -> Vec<BucketView> {
        let now_t = self.tick(now);
        let handles: Vec<(BucketKey, Arc<Mutex<Bucket>>)> =
            self.buckets.iter().map(|e| (*e.key(), e.value().clone())).collect();
        handles
            .into_iter()
            .filter_map(|(key, handle)| {
                let b = lock(&handle);
                let windows = b.windows?;
                let windows = windows
                    .as_slice()
                    .iter()
                    .zip(&b.logs)
                    .map(|(spec, log)| (*spec, log.in_use(now_t, *spec)))
                    .collect();
                Some(BucketView { key, queued: b.queued, windows })
            })
            .collect()
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Drops buckets whose takes are all older than their longest window and that
    /// queue nothing, so memory follows the active accounts.
    pub fn sweep(&self, now: Instant) {
        let now_t = self.tick(now);
        self.buckets.retain(|_, handle| {
            let mut b = lock(handle);
            let idle = b.expires <= now_t && b.queued == 0 && b.paused_until <= now_t;
            b.removed = idle;
            !idle
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Account, BucketId, WindowSpec, Windows};
    use super::*;

    fn demand(account: u128, bucket: BucketId, limit: u32, period_ms: u64) -> Demand {
        Demand {
            key: BucketKey { account: Account(account), bucket },
            windows: Windows::new(&[WindowSpec { limit, period: period_ms * 1000 }]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn queues_until_tokens_return() {
        let store = LocalStore::new();
        let d = [demand(1, BucketId::Endpoint(0), 2, 1000)];
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let a = store.reserve(&d, now, far, 10).unwrap();
        let b = store.reserve(&d, now, far, 10).unwrap();
        let c = store.reserve(&d, now, far, 10).unwrap();
        assert_eq!((a.at, b.at), (now, now));
        assert!(!a.is_queued());
        assert_eq!(c.at, now + Duration::from_secs(1));
        assert!(c.is_queued());
        assert_eq!(store.queued(&d[0].key), 1);
        // A deadline before the predicted slot is refused with the predicted wait.
        let err = store.reserve(&d, now, now + Duration::from_millis(500), 10).unwrap_err();
        assert_eq!(err, Denied::Deadline { wait: Duration::from_secs(1) });
        let err = store.reserve(&d, now, far, 1).unwrap_err();
        assert_eq!(err, Denied::QueueFull { wait: Duration::from_secs(1) });
        store.cancel(&c);
        assert_eq!(store.queued(&d[0].key), 0);
        let c2 = store.reserve(&d, now, far, 10).unwrap();
        assert_eq!(c2.at, now + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn all_or_nothing_across_buckets() {
        let store = LocalStore::new();
        let own = demand(1, BucketId::Endpoint(3), 5, 1000);
        let cond = demand(1, BucketId::Condition(3, 0), 1, 1000);
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        store.reserve(&[own, cond], now, far, 10).unwrap();
        // The conditional bucket is spent: refused without touching the endpoint bucket.
        assert!(store.reserve(&[own, cond], now, now, 10).is_err());
        for _ in 0..4 {
            assert_eq!(store.reserve(&[own], now, now, 10).unwrap().at, now);
        }
        assert!(store.reserve(&[own], now, now, 10).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn accounts_and_endpoints_are_separate() {
        let store = LocalStore::new();
        let now = Instant::now();
        for d in [
            demand(1, BucketId::Endpoint(0), 1, 1000),
            demand(2, BucketId::Endpoint(0), 1, 1000),
            demand(1, BucketId::Endpoint(1), 1, 1000),
        ] {
            assert_eq!(store.reserve(&[d], now, now, 0).unwrap().at, now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_drops_idle_buckets_only() {
        let store = LocalStore::new();
        let d = [demand(1, BucketId::Endpoint(0), 1, 1000)];
        let now = Instant::now();
        store.reserve(&d, now, now, 0).unwrap();
        store.sweep(now + Duration::from_millis(500));
        assert_eq!(store.len(), 1);
        store.sweep(now + Duration::from_secs(2));
        assert_eq!(store.len(), 0);
    }
}
