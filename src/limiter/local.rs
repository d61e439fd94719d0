//! The in-process bucket store. Its contract is about **departures**: a grant names the
//! instant (the *slot*) at which a request may leave; the store may move a waiting
//! request's slot later (an upstream 429 pauses its buckets) or earlier (a request ahead
//! gave up, or a take that held it went away) and wakes the waiter; a waiter leaves only
//! when its current slot has come ([`LocalStore::turn`]), so every departure is a take
//! the windows allowed when it was booked, and no window of actual departures holds more
//! than its limit.
//!
//! # Layout
//! One table keyed by account (the account is already a keyed hash, so it hashes by a
//! multiply): each entry holds that account's buckets (the first one inline, in the
//! entry itself) and its *lanes*, behind one lock.
//! A request of an account never needs another account's state.
//!
//! - A **bucket** holds one log of takes per window (departures and the slots of
//!   waiting requests), its pause and how many requests wait for it.
//! - A **lane** is the line of the waiting requests that need exactly the same buckets,
//!   in arrival order ([`Place`]), with one slot per waiter: the `i`-th waiter in the
//!   lane leaves at the `i`-th slot. A request waits only for the buckets it needs: a
//!   new arrival takes the earliest instant at which every window of every bucket it
//!   needs stays within its limit ([`WindowLog::admits`]), before other lanes' slots if
//!   they leave room, and never before an earlier waiter of its own lane (FIFO).
//! - When a waiter gives up, the waiters behind it in its lane move up one slot each
//!   and the lane's last slot is given back: O(1) for the lane, plus one search per
//!   other lane whose head may now go earlier. Only a lane's head sleeps on its slot;
//!   the others wait to be woken when they reach the head, so moving them costs nothing.
//!   A head is re-placed (earlier, never later) whenever a take it could be waiting for
//!   goes away, and when it becomes the head.
//!
//! # Pauses
//! An upstream 429 pauses buckets ([`LocalStore::pause_and_requeue`]): nothing of the
//! bucket leaves before the pause ends. Every waiter of a lane that needs a paused
//! bucket is booked again from the pause on, in arrival order (the request that met the
//! 429 keeps its original [`Place`], so it goes again first, across repeated pauses);
//! every head is woken to sleep to its new slot; a waiter whose new slot is past its
//! deadline is refused at once with the truthful wait.
//!
//! A ramp after a pause (one probe first, then 1, 2, 4, … per round trip) fits this
//! shape: it is a bucket state that keeps its lanes' heads from being placed until the
//! ramp releases `k` more (`Bucket::paused_until` becomes a small state enum; placing a
//! head consults it, and a release re-places the heads, each stamped at its actual
//! departure because a slot is only ever "now" when it is handed out).

use std::collections::VecDeque;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use smallvec::SmallVec;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::state::{self, Persist, SavedBucket, Snapshot};
use super::window::{Tick, WindowLog, WindowSpec};
use super::{ticks, Account, BucketId, BucketKey, Demand, Denied, Windows};

/// Most buckets one request takes from: its endpoint's and up to two conditional
/// limits (`get_profile` with `include=lists,segments`).
pub const MAX_DEMANDS: usize = 3;

/// How many candidate instants and window groups one placement may look at before it
/// settles for the instant after every existing take (always allowed): keeps a decision
/// bounded however many slots other lanes hold.
const SEARCH_BUDGET: u32 = 64;

/// Ticks are counted from two days before the store's start, so that takes restored
/// from a previous process (up to a daily window old) have a place on the clock.
const EPOCH_OFFSET: Tick = 2 * 86_400 * 1_000_000;

/// How far from the front of its lane a waiter whose slot has come may leave at once.
const DUE_SCAN: usize = 64;

/// Buckets held at most unless configured (`limiter.max_buckets`).
pub const DEFAULT_MAX_BUCKETS: usize = 100_000;

/// At the cap, the shortest time between two sweeps for room: a sweep walks every
/// bucket, so a flood of new keys must not run one per request.
const ROOM_SWEEP_EVERY: Tick = 100_000;

/// A request's place in its account's line: its arrival order, kept when a 429 puts it
/// back at the head ([`LocalStore::pause_and_requeue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place(u64);

const WAITING: u8 = 0;
const STARTED: u8 = 1;
const CANCELLED: u8 = 2;
const REFUSED: u8 = 3;

/// A waiting request as its lane holds it.
#[derive(Debug)]
struct Waiter {
    place: Place,
    deadline: Tick,
    /// `WAITING` until the store starts, cancels or refuses it (under the account lock).
    state: AtomicU8,
    /// The slot it was refused at (for its `Retry-After`).
    refused_at: AtomicU64,
    /// Woken when its slot moved earlier, it reached the head, or it was refused.
    wake: Notify,
}

/// The buckets of a lane, sorted.
type LaneKey = [Option<BucketId>; MAX_DEMANDS];

#[derive(Debug)]
struct Lane {
    key: LaneKey,
    /// In arrival order; a cancelled waiter stays until it reaches the front, so the
    /// front is always a live waiter.
    waiters: VecDeque<Arc<Waiter>>,
    /// One per live waiter, ascending: the `i`-th live waiter's slot.
    slots: VecDeque<Tick>,
}

/// In declaration order (`repr(C)`): what a decision reads first, then the logs of the
/// first windows; the table entry holds the first bucket right after the account, so a
/// decision reads a run of adjacent lines, not lines scattered over the entry.
#[derive(Debug)]
#[repr(C)]
struct Bucket {
    id: BucketId,
    /// Requests waiting in lanes that need this bucket.
    queued: u32,
    /// Nothing leaves before this tick (an upstream `Retry-After`).
    paused_until: Tick,
    /// After this tick the bucket holds nothing that matters and may be dropped.
    expires: Tick,
    /// The windows of the latest decision (set with [`Bucket::set_windows`]).
    windows: Windows,
    logs: Logs,
    /// Sent something since the latest snapshot was taken (see [`super::state`]).
    touched: bool,
}

/// A bucket's window logs, one per window: the first two in the bucket itself, a third
/// (a daily cap, which few operations have) boxed, so that the other buckets do not
/// carry its room in the table (about 130 bytes each, inline tail included).
#[derive(Debug, Default)]
struct Logs {
    inline: [WindowLog; 2],
    third: Option<Box<WindowLog>>,
}

impl Logs {
    /// Makes room for `n` windows' logs (a third one on first need).
    fn hold(&mut self, n: usize) {
        if n > 2 && self.third.is_none() {
            self.third = Some(Box::default());
        }
    }

    fn iter(&self) -> impl Iterator<Item = &WindowLog> {
        self.inline.iter().chain(self.third.as_deref())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut WindowLog> {
        self.inline.iter_mut().chain(self.third.as_deref_mut())
    }
}

impl Bucket {
    fn new(id: BucketId, windows: Windows) -> Self {
        let mut b =
            Bucket { id, windows, logs: Logs::default(), paused_until: 0, expires: 0, queued: 0, touched: false };
        b.set_windows(windows);
        b
    }

    /// Every window has its log: zipped with the windows, the logs never fall short.
    fn set_windows(&mut self, windows: Windows) {
        self.windows = windows;
        self.logs.hold(windows.as_slice().len());
    }

    /// Fills every window to its limit at `at`: nothing more goes until they pass.
    fn fill(&mut self, at: Tick) {
        let windows = self.windows;
        for (log, spec) in self.logs.iter_mut().zip(windows.as_slice()) {
            let missing = u64::from(spec.limit).saturating_sub(log.in_use(at, *spec));
            log.insert(at, missing);
            self.expires = self.expires.max(at.saturating_add(spec.period));
        }
    }
}

/// An account's buckets, in the order they were made. The first is held in the
/// table's own entry: most accounts use one, and a decision then reads the bucket where
/// the lookup found the account, without a further cache miss on a separate
/// allocation. (A `SmallVec` did that too, but keeps its length after the inline
/// bucket, on a line of the entry a decision otherwise need not wait for.)
#[derive(Debug, Default)]
#[repr(C)]
struct Buckets {
    /// Ahead of the inline bucket: a search for a bucket reads it.
    rest: Vec<Bucket>,
    /// `None` only when there is no bucket at all.
    first: Option<Bucket>,
}

impl Buckets {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Adds a bucket, growing the list by one: most accounts hold one or two buckets,
    /// and a list that doubled would hold room for four (a few hundred bytes each).
    fn push(&mut self, bucket: Bucket) {
        if self.first.is_none() {
            self.first = Some(bucket);
        } else {
            self.rest.reserve_exact(1);
            self.rest.push(bucket);
        }
    }

    fn last_mut(&mut self) -> Option<&mut Bucket> {
        match self.rest.last_mut() {
            Some(b) => Some(b),
            None => self.first.as_mut(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Bucket> {
        self.first.iter().chain(&self.rest)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Bucket> {
        self.first.iter_mut().chain(&mut self.rest)
    }

    fn retain(&mut self, mut keep: impl FnMut(&Bucket) -> bool) {
        self.rest.retain(&mut keep);
        if self.first.as_ref().is_some_and(|b| !keep(b)) {
            self.first = (!self.rest.is_empty()).then(|| self.rest.remove(0));
        }
    }
}

impl std::ops::Index<usize> for Buckets {
    type Output = Bucket;

    fn index(&self, i: usize) -> &Bucket {
        match i {
            0 => self.first.as_ref().expect("a bucket at 0"),
            _ => &self.rest[i - 1],
        }
    }
}

impl std::ops::IndexMut<usize> for Buckets {
    fn index_mut(&mut self, i: usize) -> &mut Bucket {
        match i {
            0 => self.first.as_mut().expect("a bucket at 0"),
            _ => &mut self.rest[i - 1],
        }
    }
}

/// One account's buckets and lanes; in declaration order (`repr(C)`), the fields every
/// decision reads or writes first, next to the account key the lookup compares.
#[derive(Debug, Default)]
#[repr(C)]
struct Holder {
    next_place: u64,
    lanes: Vec<Lane>,
    buckets: Buckets,
    /// Buckets that count as full from this tick on, once a request names their
    /// windows: a previous process used them after its last snapshot and then died.
    full: Vec<(BucketId, Tick)>,
}

/// Bucket indexes into [`Holder::buckets`], as many as `.1`.
type Indexes = ([usize; MAX_DEMANDS], usize);

impl Holder {
    fn add(&mut self, bucket: Bucket) {
        self.buckets.push(bucket);
    }

    fn index(&self, id: BucketId) -> Option<usize> {
        match &self.buckets.first {
            Some(b) if b.id == id => Some(0),
            _ => self.buckets.rest.iter().position(|b| b.id == id).map(|i| i + 1),
        }
    }

    /// The buckets of sorted, deduplicated demands (created if missing), tidied at `now`;
    /// `None` when a bucket is missing and `room` has none (`strict`).
    fn buckets_for(&mut self, demands: &[Demand], now: Tick, room: &Room, strict: bool) -> Option<Indexes> {
        let mut idx = [0; MAX_DEMANDS];
        for (slot, d) in idx.iter_mut().zip(demands) {
            let i = match self.index(d.key.bucket) {
                Some(i) => i,
                // A bucket made for an earlier demand of this request stays, idle: the
                // next sweep for room takes it.
                None if !room.claim(strict) => return None,
                None => {
                    self.add(Bucket::new(d.key.bucket, d.windows));
                    if let Some(k) = self.full.iter().position(|(id, _)| *id == d.key.bucket) {
                        let (_, from) = self.full.swap_remove(k);
                        self.buckets.last_mut().expect("just pushed").fill(from);
                    }
                    self.buckets.len() - 1
                }
            };
            let b = &mut self.buckets[i];
            if b.windows != d.windows {
                b.set_windows(d.windows);
            }
            for (log, spec) in b.logs.iter_mut().zip(d.windows.as_slice()) {
                log.tidy(now, spec.period);
            }
            *slot = i;
        }
        Some((idx, demands.len()))
    }

    fn lane_indexes(&self, key: &LaneKey) -> Indexes {
        let mut idx = [0; MAX_DEMANDS];
        let mut n = 0;
        // A lane's buckets stay while it has waiters; a grant handed back late may find
        // one swept, and then has nothing to give back there.
        for i in key.iter().flatten().filter_map(|id| self.index(*id)) {
            idx[n] = i;
            n += 1;
        }
        (idx, n)
    }

    fn lane(&self, key: &LaneKey) -> Option<usize> {
        self.lanes.iter().position(|l| l.key == *key)
    }

    /// The earliest tick at or after `from` and every pause at which one take fits in
    /// every window of the buckets `idx`.
    fn earliest(&self, idx: &[usize], from: Tick) -> Tick {
        let mut t = idx.iter().map(|&i| self.buckets[i].paused_until).fold(from, Tick::max);
        let mut budget = SEARCH_BUDGET;
        loop {
            let start = t;
            for &i in idx {
                let b = &self.buckets[i];
                for (log, spec) in b.logs.iter().zip(b.windows.as_slice()) {
                    t = t.max(log.earliest_insert(t, *spec, &mut budget));
                }
            }
            if t == start {
                return t;
            }
        }
    }

    fn take(&mut self, idx: &[usize], t: Tick) {
        for &i in idx {
            let b = &mut self.buckets[i];
            let windows = b.windows;
            for log in b.logs.iter_mut().take(windows.as_slice().len()) {
                log.insert(t, 1);
            }
            let longest = windows.as_slice().iter().map(|w| w.period).max().unwrap_or(0);
            b.expires = b.expires.max(t.saturating_add(longest)).max(b.paused_until);
        }
    }

    fn give_back(&mut self, idx: &[usize], t: Tick) {
        for &i in idx {
            for log in self.buckets[i].logs.iter_mut() {
                log.remove(t);
            }
        }
    }

    fn count_queued(&mut self, idx: &[usize], up: bool) {
        for &i in idx {
            let q = &mut self.buckets[i].queued;
            *q = if up { *q + 1 } else { q.saturating_sub(1) };
        }
    }

    fn new_place(&mut self) -> Place {
        self.next_place += 1;
        Place(self.next_place)
    }

    /// Drops cancelled waiters from the front of a lane, so its front is live.
    fn pop_dead(&mut self, l: usize) {
        let lane = &mut self.lanes[l];
        while lane.waiters.front().is_some_and(|w| w.state.load(Ordering::Acquire) != WAITING) {
            lane.waiters.pop_front();
        }
    }

    /// Moves every lane's head to the earliest instant it may leave, if that is earlier
    /// than its slot, and wakes the heads that moved. A head moving frees a take that
    /// another head may wait for, hence the rounds (heads only ever move earlier).
    fn settle(&mut self, now: Tick) {
        for _ in 0..4 {
            let mut moved = false;
            for l in 0..self.lanes.len() {
                moved |= self.settle_head(l, now);
            }
            if !moved {
                return;
            }
        }
    }

    /// Re-places one lane's head; returns whether it moved (and then wakes it).
    fn settle_head(&mut self, l: usize, now: Tick) -> bool {
        let Some(&slot) = self.lanes[l].slots.front() else { return false };
        if slot <= now {
            return false;
        }
        let (idx, n) = self.lane_indexes(&self.lanes[l].key);
        let idx = &idx[..n];
        self.give_back(idx, slot);
        let t = self.earliest(idx, now).min(slot);
        self.take(idx, t);
        if t == slot {
            return false;
        }
        let lane = &mut self.lanes[l];
        lane.slots[0] = t;
        if let Some(w) = lane.waiters.front() {
            w.wake.notify_one();
        }
        true
    }

    /// Wakes the lane's head, and every waiter near the front whose slot has come.
    fn wake_due(&self, l: usize, now: Tick) {
        let lane = &self.lanes[l];
        let live = lane.waiters.iter().take(DUE_SCAN).filter(|x| x.state.load(Ordering::Acquire) == WAITING);
        for (rank, w) in live.enumerate() {
            if rank > 0 && lane.slots.get(rank).is_none_or(|&t| t > now) {
                break;
            }
            w.wake.notify_one();
        }
    }

    /// The slot of a live waiter: its rank among the live waiters of its lane.
    fn slot_of(&self, l: usize, w: &Arc<Waiter>) -> Option<Tick> {
        let lane = &self.lanes[l];
        let rank = lane
            .waiters
            .iter()
            .filter(|x| x.state.load(Ordering::Acquire) == WAITING)
            .position(|x| Arc::ptr_eq(x, w))?;
        lane.slots.get(rank).copied()
    }

    /// Takes a live waiter out of its lane (`state` says why): the waiters behind it
    /// move up one slot, the lane's last slot is given back, and a new head is woken.
    fn leave(&mut self, l: usize, w: &Arc<Waiter>, state: u8, now: Tick) {
        w.state.store(state, Ordering::Release);
        let (idx, n) = self.lane_indexes(&self.lanes[l].key);
        let was_head = self.lanes[l].waiters.front().is_some_and(|f| Arc::ptr_eq(f, w));
        if let Some(last) = self.lanes[l].slots.pop_back() {
            self.give_back(&idx[..n], last);
        }
        self.count_queued(&idx[..n], false);
        self.pop_dead(l);
        if was_head {
            if let Some(next) = self.lanes[l].waiters.front() {
                next.wake.notify_one();
            }
        }
        self.settle(now);
        self.drop_empty_lanes();
    }

    fn drop_empty_lanes(&mut self) {
        self.lanes.retain(|l| !l.waiters.is_empty());
    }
}

/// How many buckets the store holds and may hold: buckets are created for whatever
/// credential or `company_id` a client sends, so their number is capped. At the cap,
/// idle buckets (nothing inside a window, no waiter, no pause) make room; when none is
/// idle, a request that needs a new bucket is refused ([`Denied::TooManyBuckets`]).
#[derive(Debug)]
struct Room {
    max: AtomicUsize,
    held: AtomicUsize,
    /// No bucket becomes idle before this tick (as of the latest sweep for room): until
    /// then a request that needs a new bucket at the cap is refused without a sweep.
    idle_from: AtomicU64,
}

impl Room {
    /// Counts one more bucket if there is room (`strict`), or whatever the cap (a bucket
    /// that follows a request already let through).
    fn claim(&self, strict: bool) -> bool {
        if !strict {
            self.held.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let max = self.max.load(Ordering::Relaxed);
        self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
    }
}

/// Hashes an [`Account`] (already a keyed hash of the credential) with one multiply.
#[derive(Debug, Default, Clone, Copy)]
pub struct AccountHasher(u64);

impl Hasher for AccountHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u128(&mut self, v: u128) {
        let x = ((v as u64) ^ ((v >> 64) as u64) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }

    /// What follows an account in a key (an endpoint's index): one more mix.
    fn write_usize(&mut self, v: usize) {
        let x = (v as u64 ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
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

/// A reservation: the request may leave at `at` (its slot when booked). A queued one
/// waits with [`LocalStore::turn`] until its current slot; hand it back with
/// [`LocalStore::cancel`] if it never goes.
#[derive(Debug, Clone)]
pub struct Grant {
    /// When the request may leave, as booked (the store may move a queued grant's slot:
    /// see [`LocalStore::slot`]).
    pub at: Instant,
    tick: Tick,
    // One request's buckets all belong to one account: stored once, so a queued
    // request's grant stays small.
    account: Account,
    lane: LaneKey,
    place: Place,
    waiter: Option<Arc<Waiter>>,
}

impl Grant {
    /// Whether the request has to wait for its slot.
    pub fn is_queued(&self) -> bool {
        self.waiter.is_some()
    }

    /// The request's place in its account's line (give it back to
    /// [`LocalStore::pause_and_requeue`] when the request meets a 429).
    pub fn place(&self) -> Place {
        self.place
    }

    /// Completes when the store moved this grant's slot, made it the head of its lane,
    /// or refused it; then ask [`LocalStore::turn`] again. Never completes for a grant
    /// that was not queued.
    pub async fn woken(&self) {
        match &self.waiter {
            Some(w) => w.wake.notified().await,
            None => std::future::pending().await,
        }
    }
}

/// What a queued request does next ([`LocalStore::turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Leave now: the request is out of the queue and its take stays where it was booked.
    Go,
    /// At the head of its lane: sleep until this slot or until [`Grant::woken`].
    At(Instant),
    /// Behind earlier requests of its lane: wait for [`Grant::woken`] (or the deadline).
    Behind,
    /// A pause moved its slot past its deadline: it holds nothing now; it could go in
    /// this long.
    Refused(Duration),
}

/// The shard's lock is the account's: a decision takes one lock, and accounts of other
/// shards decide in parallel.
type Table = DashMap<Account, Holder, BuildHasherDefault<AccountHasher>>;

/// The local (single-process) bucket store.
#[derive(Debug)]
pub struct LocalStore {
    epoch: Instant,
    accounts: Table,
    /// Snapshot and journals, with `limiter.state_path`.
    persist: Option<Persist>,
    room: Room,
}

impl Default for LocalStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Demands sorted by bucket and deduplicated (a fixed lock-free order for lanes), in
/// `buf` unless they already are: most requests need one bucket, and a decision then
/// copies nothing (the demands are a few hundred bytes).
fn sorted<'a>(demands: &'a [Demand], buf: &'a mut SmallVec<[Demand; MAX_DEMANDS]>) -> (&'a [Demand], LaneKey) {
    assert!(
        !demands.is_empty()
            && demands.len() <= MAX_DEMANDS
            && demands.iter().all(|d| d.key.account == demands[0].key.account),
        "a request takes from one to {MAX_DEMANDS} buckets, all of one account"
    );
    let mut key = [None; MAX_DEMANDS];
    let demands = match demands {
        [_] => demands,
        _ => {
            for d in demands {
                if !buf.iter().any(|e| e.key == d.key) {
                    buf.push(*d);
                }
            }
            buf.sort_unstable_by_key(|d| d.key.bucket);
            &buf[..]
        }
    };
    for (k, d) in key.iter_mut().zip(demands) {
        *k = Some(d.key.bucket);
    }
    (demands, key)
}

impl LocalStore {
    /// An empty store whose clock starts now.
    pub fn new() -> Self {
        let room = Room {
            max: AtomicUsize::new(DEFAULT_MAX_BUCKETS),
            held: AtomicUsize::new(0),
            idle_from: AtomicU64::new(0),
        };
        LocalStore { epoch: Instant::now(), accounts: Table::default(), persist: None, room }
    }

    fn tick(&self, at: Instant) -> Tick {
        ticks(at.saturating_duration_since(self.epoch)) + EPOCH_OFFSET
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.epoch + Duration::from_micros(tick.saturating_sub(EPOCH_OFFSET))
    }

    /// A store that keeps its state in `path` across restarts ([`super::state`]): what
    /// the previous process left is restored first, and after an unclean stop the
    /// buckets it used since its last snapshot count as full until their windows pass.
    pub fn open(path: &Path) -> io::Result<LocalStore> {
        let (persist, snapshot, touched) = Persist::open(path)?;
        let mut store = LocalStore::new();
        let now_t = store.tick(Instant::now());
        let clean = snapshot.as_ref().is_some_and(|s| s.clean);
        if let Some(snapshot) = snapshot {
            store.restore(snapshot, now_t);
        }
        if !clean {
            for (account, id) in touched {
                store.with_account(account, |h| match h.index(id) {
                    Some(i) => h.buckets[i].fill(now_t),
                    None if !h.full.iter().any(|(x, _)| *x == id) => h.full.push((id, now_t)),
                    None => {}
                });
            }
        }
        store.persist = Some(persist);
        Ok(store)
    }

    fn restore(&self, snapshot: Snapshot, now_t: Tick) {
        let elapsed = state::unix_us().saturating_sub(snapshot.written_us);
        for saved in snapshot.buckets {
            let (Ok(account), Some(id)) = (u128::from_str_radix(&saved.account, 16), state::load_id(saved.bucket))
            else {
                continue;
            };
            let specs: Vec<WindowSpec> =
                saved.windows.iter().map(|&(limit, period)| WindowSpec { limit, period }).collect();
            if specs.is_empty() || specs.len() > 3 || specs.iter().any(|s| s.limit == 0) {
                continue;
            }
            let mut b = Bucket::new(id, Windows::new(&specs));
            for ((log, spec), takes) in b.logs.iter_mut().zip(&specs).zip(&saved.takes) {
                for &(age, n) in takes.iter().rev() {
                    let age = age.saturating_add(elapsed);
                    if age < spec.period && age <= now_t {
                        log.insert(now_t - age, n);
                        b.expires = b.expires.max(now_t - age + spec.period);
                    }
                }
            }
            let left = saved.paused_for_us.saturating_sub(elapsed);
            b.paused_until = now_t + left;
            b.expires = b.expires.max(b.paused_until);
            self.with_account(Account(account), |h| {
                if h.index(id).is_none() && self.room.claim(false) {
                    h.add(b);
                }
            });
        }
    }

    /// Writes a snapshot of the takes that still matter (with `limiter.state_path`;
    /// nothing otherwise): `clean` at shutdown, once nothing else will leave.
    pub fn save(&self, clean: bool) -> io::Result<()> {
        let Some(p) = &self.persist else { return Ok(()) };
        p.rotate()?;
        let now_t = self.tick(Instant::now());
        let mut buckets = Vec::new();
        for mut entry in self.accounts.iter_mut() {
            let account = *entry.key();
            for b in entry.value_mut().buckets.iter_mut() {
                b.touched = false;
                let specs = b.windows.as_slice();
                let takes: Vec<Vec<(u64, u64)>> =
                    b.logs.iter().zip(specs).map(|(log, spec)| log.recent(now_t, *spec)).collect();
                let paused_for_us = b.paused_until.saturating_sub(now_t);
                if takes.iter().all(Vec::is_empty) && paused_for_us == 0 {
                    continue;
                }
                buckets.push(SavedBucket {
                    account: format!("{:032x}", account.0),
                    bucket: state::save_id(b.id),
                    windows: specs.iter().map(|s| (s.limit, s.period)).collect(),
                    takes,
                    paused_for_us,
                });
            }
        }
        p.write(&Snapshot { clean, written_us: state::unix_us(), buckets })
    }

    /// Whether this store keeps its state across restarts.
    pub fn persists(&self) -> bool {
        self.persist.is_some()
    }

    /// Journals the buckets `idx` the first time each sends something after the
    /// latest snapshot was taken.
    fn touch(&self, account: Account, h: &mut Holder, idx: &[usize]) {
        let Some(p) = &self.persist else { return };
        for &i in idx {
            let b = &mut h.buckets[i];
            if !b.touched {
                b.touched = true;
                p.journal(account, b.id);
            }
        }
    }

    /// Runs `f` on the account's state, created if missing: a lookup first, so the
    /// common case does not build an entry.
    fn with_account<T>(&self, account: Account, f: impl FnOnce(&mut Holder) -> T) -> T {
        if let Some(mut h) = self.accounts.get_mut(&account) {
            return f(&mut h);
        }
        let mut h = self.accounts.entry(account).or_default();
        f(&mut h)
    }

    fn existing<T>(&self, account: Account, f: impl FnOnce(&mut Holder) -> T) -> Option<T> {
        let mut h = self.accounts.get_mut(&account)?;
        Some(f(&mut h))
    }

    /// Books one take in every window of every demanded bucket at the earliest instant
    /// at which all of them stay within their limits (after the earlier waiters with
    /// the same buckets), or nothing if that instant is past `deadline` or a bucket
    /// already queues `max_depth` requests.
    pub fn reserve(
        &self,
        demands: &[Demand],
        now: Instant,
        deadline: Instant,
        max_depth: u32,
    ) -> Result<Grant, Denied> {
        let mut buf = SmallVec::new();
        let (demands, key) = sorted(demands, &mut buf);
        let account = demands[0].key.account;
        let now_t = self.tick(now);
        let mut tried = false;
        loop {
            let booked = self.book(demands, key, now_t, deadline, max_depth);
            match booked {
                Some(booked) => return booked,
                None if !tried && self.make_room(now_t) => tried = true,
                None => {
                    // Nothing kept for a refused account.
                    self.accounts.remove_if(&account, |_, h| h.buckets.is_empty() && h.lanes.is_empty());
                    let wait = self.room.idle_from.load(Ordering::Relaxed).saturating_sub(now_t);
                    return Err(Denied::TooManyBuckets {
                        wait: Duration::from_micros(wait).max(Duration::from_secs(1)),
                    });
                }
            }
        }
    }

    /// [`LocalStore::reserve`] of sorted demands; `None` when a bucket is missing and
    /// the store holds as many as it may.
    fn book(
        &self,
        demands: &[Demand],
        key: LaneKey,
        now_t: Tick,
        deadline: Instant,
        max_depth: u32,
    ) -> Option<Result<Grant, Denied>> {
        let account = demands[0].key.account;
        self.with_account(account, |h| {
            let (idx, n) = h.buckets_for(demands, now_t, &self.room, true)?;
            let idx = &idx[..n];
            let lane = h.lane(&key);
            let after = lane.and_then(|l| h.lanes[l].slots.back().copied()).unwrap_or(0);
            let t = h.earliest(idx, now_t.max(after));
            let queued = t > now_t;
            if queued {
                let wait = Duration::from_micros(t - now_t);
                if idx.iter().any(|&i| h.buckets[i].queued >= max_depth) {
                    return Some(Err(Denied::QueueFull { wait }));
                }
                if self.instant(t) > deadline {
                    return Some(Err(Denied::Deadline { wait }));
                }
            }
            h.take(idx, t);
            if !queued {
                self.touch(account, h, idx);
            }
            let place = h.new_place();
            let waiter = queued.then(|| {
                let w = Arc::new(Waiter {
                    place,
                    deadline: self.tick(deadline),
                    state: AtomicU8::new(WAITING),
                    refused_at: AtomicU64::new(0),
                    wake: Notify::new(),
                });
                let l = lane.unwrap_or_else(|| {
                    h.lanes.push(Lane { key, waiters: VecDeque::new(), slots: VecDeque::new() });
                    h.lanes.len() - 1
                });
                h.lanes[l].waiters.push_back(w.clone());
                h.lanes[l].slots.push_back(t);
                h.count_queued(idx, true);
                w
            });
            Some(Ok(Grant { at: self.instant(t), tick: t, account, lane: key, place, waiter }))
        })
    }

    /// At the cap: drops the idle buckets (at most once per [`ROOM_SWEEP_EVERY`], and
    /// not before one can have become idle). Returns whether there is room now.
    fn make_room(&self, now_t: Tick) -> bool {
        let from = self.room.idle_from.load(Ordering::Relaxed);
        if now_t < from
            || self
                .room
                .idle_from
                .compare_exchange(from, now_t + ROOM_SWEEP_EVERY, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let next = self.sweep_at(now_t);
        self.room.idle_from.store(next.max(now_t + ROOM_SWEEP_EVERY), Ordering::Relaxed);
        self.room.held.load(Ordering::Relaxed) < self.room.max.load(Ordering::Relaxed)
    }

    /// Sets the most buckets held (`limiter.max_buckets`).
    pub fn set_max_buckets(&self, max: usize) {
        self.room.max.store(max, Ordering::Relaxed);
    }

    /// The most buckets held (`limiter.max_buckets`).
    pub fn max_buckets(&self) -> usize {
        self.room.max.load(Ordering::Relaxed)
    }

    /// Records one take at `now` (or after the latest take) in every window of every
    /// demanded bucket, whatever the windows allow: a take another authority granted
    /// (the shared store mirrors its Redis grants here, so that if Redis goes away this
    /// store already counts what this replica sent).
    pub fn record(&self, demands: &[Demand], now: Instant) {
        let mut buf = SmallVec::new();
        let (demands, _) = sorted(demands, &mut buf);
        let now_t = self.tick(now);
        let record = |h: &mut Holder| {
            // At the cap with nothing idle the take is not mirrored: the authority that
            // granted it (Redis) still counts it.
            let (idx, n) = h.buckets_for(demands, now_t, &self.room, true)?;
            for &i in &idx[..n] {
                let b = &mut h.buckets[i];
                let windows = b.windows;
                for log in b.logs.iter_mut().take(windows.as_slice().len()) {
                    log.record(now_t.max(log.last().unwrap_or(0)));
                }
                let longest = windows.as_slice().iter().map(|w| w.period).max().unwrap_or(0);
                b.expires = b.expires.max(now_t.saturating_add(longest));
            }
            self.touch(demands[0].key.account, h, &idx[..n]);
            Some(())
        };
        if self.with_account(demands[0].key.account, record).is_none() && self.make_room(now_t) {
            self.with_account(demands[0].key.account, record);
        }
    }

    /// The grant's current slot, while it waits (`None` once it left, gave up or was
    /// refused). Walks its lane: for tests and diagnostics, not the request path.
    pub fn slot(&self, grant: &Grant) -> Option<Instant> {
        let w = grant.waiter.as_ref()?;
        self.existing(grant.account, |h| {
            let l = h.lane(&grant.lane)?;
            h.slot_of(l, w)
        })
        .flatten()
        .map(|t| self.instant(t))
    }

    /// What a queued request does next at `now`: leave (its slot has come and it heads
    /// its lane), sleep to its slot, wait behind its lane, or give up (refused). A
    /// request past its deadline that has not reached its slot is refused here.
    pub fn turn(&self, grant: &Grant, now: Instant) -> Turn {
        let Some(w) = &grant.waiter else { return Turn::Go };
        let now_t = self.tick(now);
        let refused = |t: Tick| Turn::Refused(Duration::from_micros(t.saturating_sub(now_t)));
        let turn = self.existing(grant.account, |h| {
            match w.state.load(Ordering::Acquire) {
                WAITING => {}
                STARTED => return Turn::Go,
                _ => return refused(w.refused_at.load(Ordering::Acquire)),
            }
            let l = h.lane(&grant.lane).expect("a waiting request's lane");
            // Any waiter whose slot has come goes, not only the front: a burst of
            // slots at one instant leaves together instead of one wake-up at a time.
            let lane = &mut h.lanes[l];
            let found = lane
                .waiters
                .iter()
                .take(DUE_SCAN)
                .enumerate()
                .filter(|(_, x)| x.state.load(Ordering::Acquire) == WAITING)
                .enumerate()
                .find(|(_, (_, x))| Arc::ptr_eq(x, w))
                .map(|(rank, (i, _))| (rank, i));
            if let Some((rank, i)) = found {
                let slot = lane.slots[rank];
                if slot > now_t {
                    return if rank == 0 { Turn::At(self.instant(slot)) } else { Turn::Behind };
                }
                w.state.store(STARTED, Ordering::Release);
                lane.waiters.remove(i);
                lane.slots.remove(rank);
                let (idx, n) = h.lane_indexes(&grant.lane);
                h.count_queued(&idx[..n], false);
                self.touch(grant.account, h, &idx[..n]);
                h.pop_dead(l);
                h.wake_due(l, now_t);
                // A new head moving up frees the take it held, which another lane's
                // head may be waiting for.
                if rank == 0 && h.settle_head(l, now_t) {
                    h.settle(now_t);
                }
                h.drop_empty_lanes();
                return Turn::Go;
            }
            if now_t >= w.deadline {
                let slot = h.slot_of(l, w).unwrap_or(now_t);
                w.refused_at.store(slot, Ordering::Release);
                h.leave(l, w, REFUSED, now_t);
                return refused(slot);
            }
            Turn::Behind
        });
        turn.unwrap_or(Turn::Go)
    }

    /// Gives a reservation's tokens back (the request never left). A queued one leaves
    /// its lane: the requests behind it move up and the heads that can go earlier are
    /// woken.
    pub fn cancel(&self, grant: &Grant) {
        let now_t = self.tick(Instant::now());
        self.existing(grant.account, |h| match &grant.waiter {
            None => {
                let (idx, n) = h.lane_indexes(&grant.lane);
                h.give_back(&idx[..n], grant.tick);
                h.settle(now_t);
            }
            Some(w) => {
                if w.state.load(Ordering::Acquire) != WAITING {
                    return;
                }
                let l = h.lane(&grant.lane).expect("a waiting request's lane");
                h.leave(l, w, CANCELLED, now_t);
            }
        });
    }

    /// Pauses every demanded bucket until `until` (an upstream 429's `Retry-After`) and
    /// books the request that met the 429 again. Every waiter of a lane that needs a
    /// paused bucket is booked again from the pause on, in arrival order, the requeued
    /// request at its original `place` (`None`: a new one, behind everyone); a waiter
    /// whose new slot is past its deadline is refused (and woken to say so). No request
    /// of a paused bucket leaves before `until`. Returns the requeued request's grant,
    /// or how long it would wait if that is past `deadline` (it then holds no token).
    pub fn pause_and_requeue(
        &self,
        demands: &[Demand],
        place: Option<Place>,
        until: Instant,
        now: Instant,
        deadline: Instant,
    ) -> Result<Grant, Denied> {
        let mut buf = SmallVec::new();
        let (demands, key) = sorted(demands, &mut buf);
        let account = demands[0].key.account;
        let (now_t, until_t, deadline_t) = (self.tick(now), self.tick(until), self.tick(deadline));
        self.with_account(account, |h| {
            // The request already had its buckets: a pause keeps them whatever the cap.
            let (idx, n) = h.buckets_for(demands, now_t, &self.room, false).expect("not strict");
            for &i in &idx[..n] {
                let b = &mut h.buckets[i];
                b.paused_until = b.paused_until.max(until_t);
                b.expires = b.expires.max(b.paused_until);
            }
            if h.lane(&key).is_none() {
                h.lanes.push(Lane { key, waiters: VecDeque::new(), slots: VecDeque::new() });
            }
            let paused = |k: &LaneKey| k.iter().flatten().any(|id| key.contains(&Some(*id)));
            // Everyone waiting for a paused bucket leaves the line, then all are booked
            // again in arrival order.
            let mut line: Vec<(Place, usize, Option<Arc<Waiter>>)> = Vec::new();
            for l in 0..h.lanes.len() {
                if !paused(&h.lanes[l].key) {
                    continue;
                }
                let (li, ln) = h.lane_indexes(&h.lanes[l].key);
                let lane = &mut h.lanes[l];
                let slots = std::mem::take(&mut lane.slots);
                let waiters = std::mem::take(&mut lane.waiters);
                for s in slots {
                    h.give_back(&li[..ln], s);
                }
                line.extend(
                    waiters
                        .into_iter()
                        .filter(|w| w.state.load(Ordering::Acquire) == WAITING)
                        .map(|w| (w.place, l, Some(w))),
                );
            }
            let head_lane = h.lane(&key).expect("just made");
            let place = place.unwrap_or_else(|| h.new_place());
            line.push((place, head_lane, None));
            line.sort_by_key(|(p, _, _)| *p);
            let mut head = Err(Denied::Deadline { wait: Duration::ZERO });
            for (place, l, w) in line {
                let (li, ln) = h.lane_indexes(&h.lanes[l].key);
                let li = &li[..ln];
                let after = h.lanes[l].slots.back().copied().unwrap_or(0);
                let t = h.earliest(li, now_t.max(after));
                let w = match w {
                    Some(w) if t > w.deadline => {
                        w.refused_at.store(t, Ordering::Release);
                        w.state.store(REFUSED, Ordering::Release);
                        h.count_queued(li, false);
                        w.wake.notify_one();
                        continue;
                    }
                    Some(w) => w,
                    None if t > deadline_t => {
                        head = Err(Denied::Deadline { wait: Duration::from_micros(t.saturating_sub(now_t)) });
                        continue;
                    }
                    None => {
                        let queued = t > now_t;
                        let w = queued.then(|| {
                            h.count_queued(li, true);
                            Arc::new(Waiter {
                                place,
                                deadline: deadline_t,
                                state: AtomicU8::new(WAITING),
                                refused_at: AtomicU64::new(0),
                                wake: Notify::new(),
                            })
                        });
                        head = Ok(Grant { at: self.instant(t), tick: t, account, lane: key, place, waiter: w.clone() });
                        match w {
                            Some(w) => w,
                            None => {
                                h.take(li, t);
                                self.touch(account, h, li);
                                continue;
                            }
                        }
                    }
                };
                h.take(li, t);
                h.lanes[l].slots.push_back(t);
                h.lanes[l].waiters.push_back(w);
            }
            for lane in &h.lanes {
                if let Some(w) = lane.waiters.front() {
                    w.wake.notify_one();
                }
            }
            h.settle(now_t);
            h.drop_empty_lanes();
            head
        })
    }

    /// Lowers the proxy's view of a bucket's steady window to what the upstream reports
    /// (`RateLimit-Remaining`): when it has fewer tokens left than the proxy believes,
    /// another consumer spends the quota, and the difference is booked as phantom takes.
    /// With `RateLimit-Reset` they leave the window when Klaviyo's window resets;
    /// without it, a whole window from now. Returns how many were added. Requests
    /// already booked keep their slots.
    pub fn observe_remaining(&self, demand: &Demand, remaining: u32, reset: Option<Duration>, now: Instant) -> u32 {
        let Some(&steady) = demand.windows.as_slice().get(1) else { return 0 };
        let now_t = self.tick(now);
        self.with_account(demand.key.account, |h| {
            let (idx, _) = h.buckets_for(std::slice::from_ref(demand), now_t, &self.room, false).expect("not strict");
            let b = &mut h.buckets[idx[0]];
            let log = &mut b.logs.inline[1];
            let believed = u64::from(steady.limit).saturating_sub(log.in_use(now_t, steady));
            let phantoms = believed.saturating_sub(u64::from(remaining));
            // `RateLimit-Reset` is whole seconds, rounded down: Klaviyo's window may
            // reset up to a second later, and the proxy's own window adds its guard.
            let guard = steady.period.saturating_sub(60_000_000);
            let reset = reset
                .map_or(steady.period, |r| ticks(r).saturating_add(1_000_000 + guard).clamp(1_000_000, steady.period));
            // Inside the window as `in_use` counts it, so the next answer finds them.
            let at = (now_t + reset).saturating_sub(steady.period).max(now_t.saturating_sub(steady.period) + 1);
            log.insert(at, phantoms);
            b.expires = b.expires.max(at.saturating_add(steady.period));
            phantoms as u32
        })
    }

    fn bucket<T>(&self, key: &BucketKey, f: impl FnOnce(&Bucket) -> T) -> Option<T> {
        self.existing(key.account, |h| h.index(key.bucket).map(|i| f(&h.buckets[i]))).flatten()
    }

    /// When the bucket's pause ends, if it is paused at `now`.
    pub fn paused_until(&self, key: &BucketKey, now: Instant) -> Option<Instant> {
        let t = self.bucket(key, |b| b.paused_until)?;
        (t > self.tick(now)).then(|| self.instant(t))
    }

    /// Requests waiting in a bucket's queue.
    pub fn queued(&self, key: &BucketKey) -> u32 {
        self.bucket(key, |b| b.queued).unwrap_or(0)
    }

    /// Every bucket held, with its queue and the tokens in use at `now`.
    pub fn snapshot(&self, now: Instant) -> Vec<BucketView> {
        let now_t = self.tick(now);
        let mut out = Vec::new();
        for entry in self.accounts.iter() {
            let account = *entry.key();
            let h = entry.value();
            out.extend(h.buckets.iter().map(|b| {
                BucketView {
                    key: BucketKey { account, bucket: b.id },
                    queued: b.queued,
                    windows: b
                        .windows
                        .as_slice()
                        .iter()
                        .zip(b.logs.iter())
                        .map(|(spec, log)| (*spec, log.in_use(now_t, *spec)))
                        .collect(),
                }
            }));
        }
        out
    }

    /// The account's takes and lanes, for a failing test to show.
    #[cfg(test)]
    pub(crate) fn dump(&self, account: Account) -> String {
        self.existing(account, |h| {
            let mut out = String::new();
            for b in h.buckets.iter() {
                for (log, spec) in b.logs.iter().zip(b.windows.as_slice()) {
                    let mut takes = Vec::new();
                    for r in log.debug_runs() {
                        takes.push(r);
                    }
                    out += &format!("{:?} {}/{}: {:?}\n", b.id, spec.limit, spec.period / 1000, takes);
                }
                out += &format!("{:?} paused until {} queued {}\n", b.id, b.paused_until / 1000, b.queued);
            }
            for l in &h.lanes {
                let places: Vec<(u64, u8)> =
                    l.waiters.iter().map(|w| (w.place.0, w.state.load(Ordering::Acquire))).collect();
                out += &format!(
                    "lane {:?}: {:?} slots {:?}\n",
                    l.key,
                    places,
                    l.slots.iter().map(|t| t / 1000).collect::<Vec<_>>()
                );
            }
            out
        })
        .unwrap_or_default()
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.room.held.load(Ordering::Relaxed)
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Drops buckets whose takes are all older than their longest window and that
    /// queue nothing, and accounts left without buckets, so memory follows the active
    /// accounts.
    pub fn sweep(&self, now: Instant) {
        self.sweep_at(self.tick(now));
    }

    /// [`LocalStore::sweep`]; returns the tick at which the first bucket kept may
    /// become idle (a bucket with waiters: a second from now, to look again).
    fn sweep_at(&self, now_t: Tick) -> Tick {
        let mut next = Tick::MAX;
        let mut dropped = 0;
        self.accounts.retain(|_, h| {
            let before = h.buckets.len();
            h.buckets.retain(|b| {
                let idle_at = if b.queued > 0 { now_t + 1_000_000 } else { b.expires.max(b.paused_until) };
                let keep = idle_at > now_t;
                if keep {
                    next = next.min(idle_at);
                }
                keep
            });
            dropped += before - h.buckets.len();
            !h.buckets.is_empty() || !h.lanes.is_empty()
        });
        self.room.held.fetch_sub(dropped, Ordering::Relaxed);
        next
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

    /// `create_flow`'s shape: a burst, a steady and a daily window, only the daily one
    /// tight; and a bucket made with two windows that a later config gives a third.
    #[tokio::test(start_paused = true)]
    async fn a_third_window_binds_too() {
        let windows = |daily: Option<u32>| {
            let mut specs =
                vec![WindowSpec { limit: 10, period: 1_000_000 }, WindowSpec { limit: 100, period: 60_000_000 }];
            specs.extend(daily.map(|limit| WindowSpec { limit, period: 86_400_000_000 }));
            Windows::new(&specs)
        };
        let key = |n| BucketKey { account: Account(n), bucket: BucketId::Endpoint(2) };
        let store = LocalStore::new();
        let now = Instant::now();
        let far = now + Duration::from_secs(2 * 86_400);
        let day = now + Duration::from_secs(86_400);
        let capped = Demand { key: key(9), windows: windows(Some(2)) };
        let at = |d: Demand| store.reserve(&[d], now, far, 10).unwrap().at;
        assert_eq!([at(capped), at(capped), at(capped)], [now, now, day]);
        let plain = Demand { key: key(10), windows: windows(None) };
        assert_eq!(at(plain), now);
        let reloaded = Demand { windows: windows(Some(2)), ..plain };
        assert_eq!([at(reloaded), at(reloaded), at(reloaded)], [now, now, day]);
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
    async fn the_bucket_cap_evicts_idle_buckets_and_refuses_when_all_are_busy() {
        let store = LocalStore::new();
        store.set_max_buckets(2);
        let d = |account| [demand(account, BucketId::Endpoint(0), 1, 1000)];
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        store.reserve(&d(1), now, far, 10).unwrap();
        // Account 2's second request waits: its bucket is busy however long ago it was made.
        store.reserve(&d(2), now, far, 10).unwrap();
        let queued = store.reserve(&d(2), now, far, 10).unwrap();
        assert!(queued.is_queued());
        let err = store.reserve(&d(3), now, far, 10).unwrap_err();
        assert_eq!(err, Denied::TooManyBuckets { wait: Duration::from_secs(1) });
        assert_eq!(store.accounts.len(), 2, "nothing kept for the refused account");
        // Account 1's take has left its window: its bucket is idle and makes room.
        let later = now + Duration::from_millis(1500);
        assert_eq!(store.reserve(&d(3), later, far, 10).unwrap().at, later);
        assert_eq!(store.len(), 2);
        assert_eq!(store.queued(&d(2)[0].key), 1, "the bucket with a waiter stays");
        assert!(store.bucket(&d(1)[0].key, |_| ()).is_none(), "the idle one went");
        // Full again and busy: refused, with a sweep at most every ROOM_SWEEP_EVERY.
        assert!(matches!(store.reserve(&d(4), later, far, 10), Err(Denied::TooManyBuckets { .. })));
        // Requests of held buckets still go.
        assert!(store.reserve(&d(3), later, far, 10).unwrap().is_queued());
    }

    #[tokio::test(start_paused = true)]
    async fn pause_requeues_head_first_and_moves_every_waiter() {
        let store = LocalStore::new();
        let d = [demand(1, BucketId::Endpoint(0), 2, 1000)];
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let a = store.reserve(&d, now, far, 10).unwrap();
        let _b = store.reserve(&d, now, far, 10).unwrap();
        let queued: Vec<Grant> = (0..3).map(|_| store.reserve(&d, now, far, 10).unwrap()).collect();
        assert_eq!(queued[0].at, now + Duration::from_secs(1));
        let until = now + Duration::from_secs(5);
        let head = store.pause_and_requeue(&d, Some(a.place()), until, now, far).unwrap();
        assert_eq!(store.slot(&head), Some(until));
        let slots: Vec<Option<Instant>> = queued.iter().map(|g| store.slot(g)).collect();
        let second = until + Duration::from_secs(1);
        assert_eq!(slots, [Some(until), Some(second), Some(second)]);
        assert_eq!(store.queued(&d[0].key), 4);
        // Only the head of the line sleeps to its slot; the others wait their turn.
        let later = now + Duration::from_secs(1);
        assert_eq!(store.turn(&head, later), Turn::At(until));
        assert_eq!(store.turn(&queued[0], later), Turn::Behind);
        assert_eq!(store.turn(&head, until), Turn::Go);
        assert_eq!(store.turn(&queued[0], until), Turn::Go);
        assert_eq!(store.slot(&queued[0]), None, "left");
        // New arrivals queue behind everyone, after the pause.
        let late = store.reserve(&d, later, far, 10).unwrap();
        assert_eq!(late.at, until + Duration::from_secs(2));
        // A requeue whose slot is past its deadline is refused and books nothing.
        let refused = store.pause_and_requeue(&d, None, until, now, now + Duration::from_secs(1)).unwrap_err();
        assert!(matches!(refused, Denied::Deadline { wait } if wait >= Duration::from_secs(5)));
        assert_eq!(store.paused_until(&d[0].key, now), Some(until));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_refuses_waiters_it_moves_past_their_deadline() {
        let store = LocalStore::new();
        let d = [demand(1, BucketId::Endpoint(0), 1, 1000)];
        let now = Instant::now();
        let a = store.reserve(&d, now, now, 10).unwrap();
        let short = store.reserve(&d, now, now + Duration::from_secs(2), 10).unwrap();
        let long = store.reserve(&d, now, now + Duration::from_secs(60), 10).unwrap();
        store
            .pause_and_requeue(&d, Some(a.place()), now + Duration::from_secs(10), now, now + Duration::from_secs(60))
            .unwrap();
        // Told at once, with the truthful wait (its slot would have been 11 s).
        assert_eq!(store.turn(&short, now), Turn::Refused(Duration::from_secs(11)));
        assert_eq!(store.slot(&long), Some(now + Duration::from_secs(11)), "moved up into the refused one's slot");
        assert_eq!(store.queued(&d[0].key), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancellation_moves_the_line_up_in_its_lane_only() {
        let store = LocalStore::new();
        let own = demand(1, BucketId::Endpoint(0), 1, 1000);
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        let grants: Vec<Grant> = (0..4).map(|_| store.reserve(&[own], now, far, 10).unwrap()).collect();
        let at = |s: u64| Some(now + Duration::from_secs(s));
        store.cancel(&grants[1]);
        assert_eq!(grants.iter().map(|g| store.slot(g)).collect::<Vec<_>>(), [None, None, at(1), at(2)]);
        // The head gives up: the next one becomes the head and is woken.
        store.cancel(&grants[2]);
        assert_eq!(store.slot(&grants[3]), at(1));
        assert_eq!(store.turn(&grants[3], now), Turn::At(now + Duration::from_secs(1)));
        assert_eq!(store.queued(&own.key), 1);
        assert_eq!(store.reserve(&[own], now, far, 10).unwrap().at, now + Duration::from_secs(2));
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
        // Reset is whole seconds, rounded down: they stay a second longer (no guard here).
        assert_eq!(store.reserve(&[d], now, far, 100).unwrap().at, now + Duration::from_secs(11));
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
                        grants.push(store.pause_and_requeue(&d, None, until, now, far).unwrap());
                        pauses.push((now, until));
                    } else {
                        grants.push(store.reserve(&d, now, far, u32::MAX).unwrap());
                    }
                }
                let mut slots: Vec<Instant> = grants.iter().map(|g| store.slot(g).unwrap_or(g.at)).collect();
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
