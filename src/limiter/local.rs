//! The in-process bucket store: a concurrent map of buckets, each behind its own lock.
//! Requests reserve their slot at arrival (the FIFO queue is the sequence of
//! reservations), so the admission time of a queued request is known at once.
//!
//! An upstream 429 pauses buckets ([`LocalStore::pause_and_requeue`]): nothing of the
//! bucket leaves before the pause ends. Queued requests hold a shared slot that the
//! pause moves: every waiter of a paused bucket is booked again, in its original order,
//! from the end of the pause on, and a waiter that wakes at its old slot finds the new
//! one and sleeps again ([`LocalStore::try_start`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::window::{earliest_all, Tick, WindowLog, WindowSpec};
use super::{ticks, Account, BucketId, BucketKey, Demand, Denied, Windows};

/// A queued reservation's slot, shared between its waiter and the buckets it holds,
/// so a pause can move it.
#[derive(Debug)]
struct Waiter {
    /// The current slot; moves only later, and only under the locks of every bucket
    /// in `demands`.
    tick: AtomicU64,
    demands: Vec<Demand>,
}

#[derive(Debug, Default)]
struct Bucket {
    logs: [WindowLog; 3],
    /// Reservations not yet started (queued requests), by arrival order.
    waiting: BTreeMap<u64, Arc<Waiter>>,
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

impl Bucket {
    fn take(&mut self, d: &Demand, t: Tick) {
        let windows = d.windows.as_slice();
        for log in &mut self.logs[..windows.len()] {
            log.record(t);
        }
        let longest = windows.iter().map(|w| w.period).max().unwrap_or(0);
        self.expires = self.expires.max(t.saturating_add(longest)).max(self.paused_until);
        self.windows = Some(d.windows);
    }

    fn give_back(&mut self, t: Tick) {
        for log in &mut self.logs {
            log.remove(t);
        }
    }
}

/// A reservation: the request may leave at `at`. Hand it back with
/// [`LocalStore::try_start`] when the request goes, or [`LocalStore::cancel`] if it never does.
#[derive(Debug, Clone)]
pub struct Grant {
    /// When the request may leave (as booked; a pause may move a queued grant later,
    /// see [`LocalStore::slot`]).
    pub at: Instant,
    tick: Tick,
    // One request's buckets all belong to one account: stored once, so a queued
    // request's grant stays small.
    account: Account,
    buckets: [Option<BucketId>; MAX_DEMANDS],
    waiter: Option<(u64, Arc<Waiter>)>,
}

/// Most buckets one request takes from: its endpoint's and up to two conditional
/// limits (`get_profile` with `include=lists,segments`).
pub const MAX_DEMANDS: usize = 3;

impl Grant {
    /// Whether the request has to wait for its slot.
    pub fn is_queued(&self) -> bool {
        self.waiter.is_some()
    }

    fn keys(&self) -> impl Iterator<Item = BucketKey> + '_ {
        self.buckets.iter().flatten().map(|&bucket| BucketKey { account: self.account, bucket })
    }

    fn key_list(&self) -> Vec<BucketKey> {
        self.keys().collect()
    }
}

/// The local (single-process) bucket store.
#[derive(Debug)]
pub struct LocalStore {
    epoch: Instant,
    buckets: DashMap<BucketKey, Arc<Mutex<Bucket>>>,
    /// Arrival order of queued reservations.
    seq: AtomicU64,
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
        LocalStore { epoch: Instant::now(), buckets: DashMap::new(), seq: AtomicU64::new(0) }
    }

    fn tick(&self, at: Instant) -> Tick {
        ticks(at.saturating_duration_since(self.epoch))
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.epoch + Duration::from_micros(tick)
    }

    /// Locks the buckets of `keys` (sorted, deduplicated) in that order, creating the
    /// missing ones; looks again if the sweeper removed one meanwhile.
    fn with_locked<T>(&self, keys: &[BucketKey], f: impl FnOnce(&mut [MutexGuard<'_, Bucket>]) -> T) -> T {
        loop {
            let handles: Vec<Arc<Mutex<Bucket>>> =
                keys.iter().map(|k| self.buckets.entry(*k).or_default().clone()).collect();
            let mut guards: Vec<MutexGuard<'_, Bucket>> = handles.iter().map(|h| lock(h)).collect();
            if guards.iter().any(|g| g.removed) {
                continue;
            }
            return f(&mut guards);
        }
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
        assert!(
            demands.len() <= MAX_DEMANDS && demands.iter().all(|d| d.key.account == demands[0].key.account),
            "a request takes from at most {MAX_DEMANDS} buckets, all of one account"
        );
        let mut demands: Vec<Demand> = demands.to_vec();
        // A fixed lock order keeps two multi-bucket requests from deadlocking.
        demands.sort_by_key(|d| d.key);
        demands.dedup_by_key(|d| d.key);
        let keys: Vec<BucketKey> = demands.iter().map(|d| d.key).collect();
        self.with_locked(&keys, |guards| {
            let now_t = self.tick(now);
            let idx: Vec<usize> = (0..guards.len()).collect();
            let t = self.earliest(&demands, guards, &idx, now_t);
            let queued = t > now_t;
            if queued {
                let wait = Duration::from_micros(t - now_t);
                if guards.iter().any(|b| b.waiting.len() >= max_depth as usize) {
                    return Err(Denied::QueueFull { wait });
                }
                if self.instant(t) > deadline {
                    return Err(Denied::Deadline { wait });
                }
            }
            Ok(self.book(&demands, guards, &idx, t, queued))
        })
    }

    /// The earliest tick at or after `now_t` (and every pause) at which the demands,
    /// whose buckets are `guards[idx[i]]`, all have a token.
    fn earliest(&self, demands: &[Demand], guards: &mut [MutexGuard<'_, Bucket>], idx: &[usize], now_t: Tick) -> Tick {
        for (d, &i) in demands.iter().zip(idx) {
            for (log, spec) in guards[i].logs.iter_mut().zip(d.windows.as_slice()) {
                log.prune(now_t, spec.period);
            }
        }
        let pauses = idx.iter().map(|&i| guards[i].paused_until).max().unwrap_or(0);
        let guards: &[MutexGuard<'_, Bucket>] = guards;
        earliest_all(
            now_t.max(pauses),
            demands.iter().zip(idx).flat_map(|(d, &i)| guards[i].logs.iter().zip(d.windows.as_slice().iter().copied())),
        )
    }

    fn book(
        &self,
        demands: &[Demand],
        guards: &mut [MutexGuard<'_, Bucket>],
        idx: &[usize],
        t: Tick,
        queued: bool,
    ) -> Grant {
        let waiter = queued.then(|| {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            (seq, Arc::new(Waiter { tick: AtomicU64::new(t), demands: demands.to_vec() }))
        });
        for (d, &i) in demands.iter().zip(idx) {
            guards[i].take(d, t);
            if let Some((seq, w)) = &waiter {
                guards[i].waiting.insert(*seq, w.clone());
            }
        }
        let mut buckets = [None; MAX_DEMANDS];
        for (slot, d) in buckets.iter_mut().zip(demands) {
            *slot = Some(d.key.bucket);
        }
        Grant { at: self.instant(t), tick: t, account: demands[0].key.account, buckets, waiter }
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

    fn each_bucket(&self, keys: impl Iterator<Item = BucketKey>, mut f: impl FnMut(&mut Bucket)) {
        for key in keys {
            let handle = self.buckets.get(&key).map(|h| h.clone());
            if let Some(handle) = handle {
                f(&mut lock(&handle));
            }
        }
    }

    /// The grant's current slot (later than [`Grant::at`] when a pause moved it).
    pub fn slot(&self, grant: &Grant) -> Instant {
        match &grant.waiter {
            Some((_, w)) => self.instant(w.tick.load(Ordering::Acquire)),
            None => grant.at,
        }
    }

    /// Starts a reservation whose slot has come: it leaves the queue and keeps its
    /// tokens. `Err(slot)` when a pause has moved the slot past `now`: wait until then
    /// and try again.
    pub fn try_start(&self, grant: &Grant, now: Instant) -> Result<(), Instant> {
        let Some((seq, waiter)) = &grant.waiter else { return Ok(()) };
        let now_t = self.tick(now);
        self.with_locked(&grant.key_list(), |guards| {
            let t = waiter.tick.load(Ordering::Acquire);
            if t > now_t {
                return Err(self.instant(t));
            }
            for g in guards.iter_mut() {
                g.waiting.remove(seq);
            }
            Ok(())
        })
    }

    /// Marks a queued reservation as started without checking its slot.
    pub fn start(&self, grant: &Grant) {
        if let Some((seq, _)) = &grant.waiter {
            self.each_bucket(grant.keys(), |b| {
                b.waiting.remove(seq);
            });
        }
    }

    /// Gives a reservation's tokens back (the request never left).
    pub fn cancel(&self, grant: &Grant) {
        match &grant.waiter {
            None => self.each_bucket(grant.keys(), |b| b.give_back(grant.tick)),
            Some((seq, waiter)) => self.with_locked(&grant.key_list(), |guards| {
                let t = waiter.tick.load(Ordering::Acquire);
                for g in guards.iter_mut() {
                    // Only a grant still waiting holds tokens here; a started one has left.
                    if g.waiting.remove(seq).is_some() {
                        g.give_back(t);
                    }
                }
            }),
        }
    }

    /// Pauses every demanded bucket until `until` (an upstream 429's `Retry-After`) and
    /// books the request that met the 429 again at the head of the queue: first after
    /// the pause, before every request already queued in those buckets, which are
    /// booked again behind it in their original order. No request of a paused bucket
    /// leaves before `until`. Returns the requeued request's grant, or how long it would
    /// wait if that is past `deadline` (it then holds no token).
    pub fn pause_and_requeue(
        &self,
        demands: &[Demand],
        until: Instant,
        now: Instant,
        deadline: Instant,
    ) -> Result<Grant, Denied> {
        let mut demands: Vec<Demand> = demands.to_vec();
        demands.sort_by_key(|d| d.key);
        demands.dedup_by_key(|d| d.key);
        let paused: BTreeSet<BucketKey> = demands.iter().map(|d| d.key).collect();
        let until_t = self.tick(until);
        let now_t = self.tick(now);
        // The waiters of the paused buckets may hold other buckets too: lock them all,
        // in key order, and look again if the set grew meanwhile.
        let mut keys = paused.clone();
        loop {
            let key_list: Vec<BucketKey> = keys.iter().copied().collect();
            let outcome = self.with_locked(&key_list, |guards| {
                let pos = |k: &BucketKey| key_list.binary_search(k).expect("locked key");
                let mut moved: BTreeMap<u64, Arc<Waiter>> = BTreeMap::new();
                for k in &paused {
                    moved.extend(guards[pos(k)].waiting.iter().map(|(s, w)| (*s, w.clone())));
                }
                let needed: BTreeSet<BucketKey> = moved
                    .values()
                    .flat_map(|w| w.demands.iter().map(|d| d.key))
                    .chain(paused.iter().copied())
                    .collect();
                if !needed.is_subset(&keys) {
                    return Err(needed);
                }
                for k in &paused {
                    let b = &mut guards[pos(k)];
                    b.paused_until = b.paused_until.max(until_t);
                }
                // Take the queued requests out, then book the requeued one first and
                // the others behind it in arrival order.
                for w in moved.values() {
                    let t = w.tick.load(Ordering::Acquire);
                    for d in &w.demands {
                        guards[pos(&d.key)].give_back(t);
                    }
                }
                let idx: Vec<usize> = demands.iter().map(|d| pos(&d.key)).collect();
                let t = self.earliest(&demands, guards, &idx, now_t);
                let head = if self.instant(t) > deadline {
                    Err(Denied::Deadline { wait: Duration::from_micros(t.saturating_sub(now_t)) })
                } else {
                    Ok(self.book(&demands, guards, &idx, t, t > now_t))
                };
                for w in moved.values() {
                    let idx: Vec<usize> = w.demands.iter().map(|d| pos(&d.key)).collect();
                    let t = self.earliest(&w.demands, guards, &idx, now_t);
                    for (d, &i) in w.demands.iter().zip(&idx) {
                        guards[i].take(d, t);
                    }
                    w.tick.store(t, Ordering::Release);
                }
                Ok(head)
            });
            match outcome {
                Ok(head) => return head,
                Err(needed) => keys = needed,
            }
        }
    }

    /// Lowers the proxy's view of a bucket's steady window to what the upstream reports
    /// (`RateLimit-Remaining`): when it has fewer tokens left than the proxy believes,
    /// another consumer spends the quota, and the difference is booked as phantom takes.
    /// With `RateLimit-Reset` they leave the window when Klaviyo's window resets;
    /// without it, a whole window from now. Returns how many were added.
    pub fn observe_remaining(&self, demand: &Demand, remaining: u32, reset: Option<Duration>, now: Instant) -> u32 {
        let Some(&steady) = demand.windows.as_slice().get(1) else { return 0 };
        let now_t = self.tick(now);
        self.with_locked(&[demand.key], |guards| {
            let b = &mut guards[0];
            let log = &mut b.logs[1];
            log.prune(now_t, steady.period);
            let believed = u64::from(steady.limit).saturating_sub(log.in_use(now_t, steady));
            let phantoms = believed.saturating_sub(u64::from(remaining));
            let reset = reset.map_or(steady.period, |r| ticks(r).clamp(1_000_000, steady.period));
            // Inside the window as `in_use` counts it, so the next answer finds them.
            let at = (now_t + reset).saturating_sub(steady.period).max(now_t.saturating_sub(steady.period) + 1);
            log.insert(at, phantoms);
            b.expires = b.expires.max(at.saturating_add(steady.period));
            phantoms as u32
        })
    }

    /// When the bucket's pause ends, if it is paused at `now`.
    pub fn paused_until(&self, key: &BucketKey, now: Instant) -> Option<Instant> {
        let handle = self.buckets.get(key).map(|h| h.clone())?;
        let t = lock(&handle).paused_until;
        (t > self.tick(now)).then(|| self.instant(t))
    }

    /// Requests waiting in a bucket's queue.
    pub fn queued(&self, key: &BucketKey) -> u32 {
        let handle = self.buckets.get(key).map(|h| h.clone());
        handle.map_or(0, |h| lock(&h).waiting.len() as u32)
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
                Some(BucketView { key, queued: b.waiting.len() as u32, windows })
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
            let idle = b.expires <= now_t && b.waiting.is_empty() && b.paused_until <= now_t;
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

    #[tokio::test(start_paused = true)]
    async fn pause_requeues_head_first_and_moves_every_waiter() {
        let store = LocalStore::new();
        let d = [demand(1, BucketId::Endpoint(0), 2, 1000)];
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let _a = store.reserve(&d, now, far, 10).unwrap();
        let _b = store.reserve(&d, now, far, 10).unwrap();
        let queued: Vec<Grant> = (0..3).map(|_| store.reserve(&d, now, far, 10).unwrap()).collect();
        assert_eq!(queued[0].at, now + Duration::from_secs(1));
        let until = now + Duration::from_secs(5);
        let head = store.pause_and_requeue(&d, until, now, far).unwrap();
        assert_eq!(store.slot(&head), until);
        let slots: Vec<Instant> = queued.iter().map(|g| store.slot(g)).collect();
        assert_eq!(slots, [until, until + Duration::from_secs(1), until + Duration::from_secs(1)]);
        assert_eq!(store.queued(&d[0].key), 4);
        // A waiter that wakes at its old slot is told to wait for the new one.
        let later = now + Duration::from_secs(1);
        assert_eq!(store.try_start(&queued[0], later), Err(until));
        assert_eq!(store.try_start(&queued[0], until), Ok(()));
        // New arrivals queue behind everyone, after the pause.
        let late = store.reserve(&d, later, far, 10).unwrap();
        assert_eq!(late.at, until + Duration::from_secs(2));
        // A requeue whose slot is past its deadline is refused and books nothing.
        let refused = store.pause_and_requeue(&d, until, now, now + Duration::from_secs(1)).unwrap_err();
        assert!(matches!(refused, Denied::Deadline { wait } if wait >= Duration::from_secs(5)));
        assert_eq!(store.paused_until(&d[0].key, now), Some(until));
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_below_belief_adds_phantom_takes() {
        let store = LocalStore::new();
        let d = Demand {
            key: BucketKey { account: Account(1), bucket: BucketId::Endpoint(0) },
            windows: Windows::new(&[
                WindowSpec { limit: 10, period: 1_000_000 },
                WindowSpec { limit: 20, period: 60_000_000 },
            ]),
        };
        let now = Instant::now() + Duration::from_secs(100);
        store.reserve(&[d], now, now, 10).unwrap();
        // The proxy believes 19 are left; Klaviyo says 5: 14 phantoms, leaving when
        // Klaviyo's window resets in 10 s.
        let reset = Some(Duration::from_secs(10));
        assert_eq!(store.observe_remaining(&d, 5, reset, now), 14);
        assert_eq!(store.observe_remaining(&d, 5, reset, now), 0, "already in line with Klaviyo");
        assert_eq!(store.observe_remaining(&d, 50, reset, now), 0, "never raised");
        let far = now + Duration::from_secs(120);
        for _ in 0..5 {
            assert!(store.reserve(&[d], now, far, 100).unwrap().at < now + Duration::from_secs(2));
        }
        // The steady window is full until Klaviyo's resets and the phantoms leave.
        assert_eq!(store.reserve(&[d], now, far, 100).unwrap().at, now + Duration::from_secs(10));
        // Without a reset, the phantoms stay a whole window.
        let store = LocalStore::new();
        store.reserve(&[d], now, now, 10).unwrap();
        assert_eq!(store.observe_remaining(&d, 0, None, now), 19);
        assert_eq!(store.reserve(&[d], now, far, 100).unwrap().at, now + Duration::from_secs(60));
    }

    proptest::proptest! {
        /// Whatever mix of arrivals and upstream 429s: no window ever holds more than
        /// its limit, and no reservation is left inside a pause (between the 429 and
        /// its Retry-After), however it was booked.
        #[test]
        fn pauses_keep_windows_and_hold_everything(
            ops in proptest::collection::vec((0u64..1500, proptest::bool::weighted(0.2), 1u64..4000), 1..80)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let store = LocalStore::new();
                let specs = [WindowSpec { limit: 2, period: 1_000_000 }, WindowSpec { limit: 5, period: 4_000_000 }];
                let d = [Demand {
                    key: BucketKey { account: Account(1), bucket: BucketId::Endpoint(0) },
                    windows: Windows::new(&specs),
                }];
                let t0 = Instant::now();
                let far = t0 + Duration::from_secs(1_000_000);
                let mut now = t0;
                let mut grants = Vec::new();
                let mut pauses = Vec::new();
                for (dt, pause, len) in ops {
                    now += Duration::from_millis(dt);
                    if pause {
                        let until = now + Duration::from_millis(len);
                        grants.push(store.pause_and_requeue(&d, until, now, far).unwrap());
                        pauses.push((now, until));
                    } else {
                        grants.push(store.reserve(&d, now, far, u32::MAX).unwrap());
                    }
                }
                let mut slots: Vec<Instant> = grants.iter().map(|g| store.slot(g)).collect();
                for (at, until) in &pauses {
                    for s in &slots {
                        proptest::prop_assert!(!(at < s && s < until), "a slot inside a pause");
                    }
                }
                slots.sort();
                for spec in specs {
                    let n = spec.limit as usize;
                    for w in slots.windows(n + 1) {
                        proptest::prop_assert!(w[n].duration_since(w[0]) >= Duration::from_micros(spec.period));
                    }
                }
                Ok(())
            })?;
        }
    }
}
