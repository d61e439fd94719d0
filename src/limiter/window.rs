//! The pure sliding-window logic behind every bucket.
//!
//! Klaviyo counts requests in fixed windows whose phase the proxy cannot see, so the
//! proxy keeps a stronger invariant: **no interval of length `period` holds more than
//! `limit` takes**. Equivalently, a token taken at `t` comes back only at `t + period`.
//! A [`WindowLog`] records the takes as runs of `(tick, cumulative count)`, so a burst
//! of takes at one tick costs one entry and finding the `limit`-th most recent take is a
//! binary search.

use std::collections::VecDeque;

/// Time in microseconds since the limiter's epoch.
pub type Tick = u64;

/// The least time [`WindowLog::tidy`] lets a take stay after it left its window: a
/// bucket that sees about a request a second then reads its burst window's oldest run
/// every few decisions instead of at each one.
pub const TIDY_AFTER: Tick = 2_000_000;

/// One window of a bucket: at most `limit` takes in any interval of `period` ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    /// Most takes allowed in any interval of `period`.
    pub limit: u32,
    /// The window length, guard included, in ticks (µs).
    pub period: Tick,
}

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    tick: Tick,
    /// Takes recorded up to and including this run, counted from the log's start.
    end: u64,
}

/// How many of the newest runs a log holds inline. A decision that appends then writes
/// into the log's own lines, which it reads anyway, instead of into a separate buffer
/// (a cache miss that depends on reading the log first, and that the shard's unlock
/// waits for); a longer log spills them to the buffer four at a time. Four is what a
/// burst window holds at about a request a second with [`TIDY_AFTER`]'s margin, so such
/// a log never touches its buffer at all.
const TAIL: usize = 4;

/// The takes of one window, oldest first. Takes may lie in the future (reservations of
/// queued requests); new takes are never earlier than the latest one (FIFO).
///
/// In declaration order (`repr(C)`): the counts and the tail, which every decision
/// reads, ahead of the spilled runs' header, which most do not.
#[derive(Debug, Clone, Default)]
#[repr(C)]
pub struct WindowLog {
    /// Cumulative count through the newest run (`base` when empty), and the newest
    /// run's tick: a decision that appends reads neither from the runs.
    end: u64,
    last: Tick,
    /// No take leaves the window before this tick: pruning earlier need not look at the
    /// oldest run. Never later than the oldest take's exit under the period last pruned
    /// with.
    prune_at: Tick,
    /// Cumulative count before the first run (takes already pruned).
    base: u64,
    /// The newest runs, `tail[lo..hi]`; every run of `spilled` is older. `lo > 0` only
    /// while `spilled` is empty (pruning takes from `spilled` first).
    lo: u8,
    hi: u8,
    tail: [Run; TAIL],
    /// The older runs, oldest first.
    spilled: VecDeque<Run>,
}

impl WindowLog {
    fn tail(&self) -> &[Run] {
        &self.tail[usize::from(self.lo)..usize::from(self.hi)]
    }

    /// How many runs the log holds.
    fn runs_len(&self) -> usize {
        self.spilled.len() + usize::from(self.hi - self.lo)
    }

    /// The `i`-th run, oldest first.
    fn run(&self, i: usize) -> Run {
        match i.checked_sub(self.spilled.len()) {
            None => self.spilled[i],
            Some(j) => self.tail()[j],
        }
    }

    /// The index of the first run for which `pred` (true, then false along the log) is
    /// false. Asks the tail first: most questions are about the newest takes, and then
    /// the spilled runs are not read.
    fn partition_point(&self, pred: impl Fn(&Run) -> bool) -> usize {
        let tail = self.tail();
        match tail.first() {
            Some(first) if pred(first) => self.spilled.len() + tail.partition_point(&pred),
            _ => self.spilled.partition_point(&pred),
        }
    }

    /// Cumulative count before the `i`-th run.
    fn end_before(&self, i: usize) -> u64 {
        if i == 0 {
            self.base
        } else {
            self.run(i - 1).end
        }
    }

    fn back(&self) -> Option<Run> {
        self.tail().last().or(self.spilled.back()).copied()
    }

    fn back_mut(&mut self) -> Option<&mut Run> {
        if self.hi > self.lo {
            Some(&mut self.tail[usize::from(self.hi) - 1])
        } else {
            self.spilled.back_mut()
        }
    }

    /// Appends a run newer than every other.
    fn push_back(&mut self, run: Run) {
        if usize::from(self.hi) == TAIL {
            let lo = usize::from(self.lo);
            if lo > 0 {
                self.tail.copy_within(lo.., 0);
                self.hi = (TAIL - lo) as u8;
            } else {
                self.spilled.reserve(TAIL);
                for run in self.tail {
                    self.spilled.push_back(run);
                }
                self.hi = 0;
            }
            self.lo = 0;
        }
        self.tail[usize::from(self.hi)] = run;
        self.hi += 1;
    }

    /// Puts a run at index `idx` (a take placed before later ones, which is rare): in
    /// the tail if it falls there and there is room, in the spilled runs otherwise
    /// (with the tail moved there first, so that order holds).
    fn insert_run(&mut self, idx: usize, run: Run) {
        let spilled = self.spilled.len();
        if idx >= spilled && usize::from(self.hi) < TAIL {
            let at = usize::from(self.lo) + idx - spilled;
            let hi = usize::from(self.hi);
            self.tail.copy_within(at..hi, at + 1);
            self.tail[at] = run;
            self.hi += 1;
            return;
        }
        self.spilled.extend(&self.tail[usize::from(self.lo)..usize::from(self.hi)]);
        (self.lo, self.hi) = (0, 0);
        self.spilled.insert(idx, run);
    }

    /// Removes the run at index `idx`.
    fn remove_run(&mut self, idx: usize) {
        let spilled = self.spilled.len();
        if idx < spilled {
            self.spilled.remove(idx);
            return;
        }
        let at = usize::from(self.lo) + idx - spilled;
        self.tail.copy_within(at + 1..usize::from(self.hi), at);
        self.hi -= 1;
        if self.lo == self.hi {
            (self.lo, self.hi) = (0, 0);
        }
    }

    /// Applies `f` to every run from index `idx` on.
    fn for_each_from(&mut self, idx: usize, mut f: impl FnMut(&mut Run)) {
        let spilled = self.spilled.len();
        if idx < spilled {
            self.spilled.range_mut(idx..).for_each(&mut f);
        }
        let from = usize::from(self.lo) + idx.saturating_sub(spilled);
        self.tail[from..usize::from(self.hi)].iter_mut().for_each(f);
    }

    /// Drops takes that can no longer affect a decision at `now` or later.
    pub fn prune(&mut self, now: Tick, period: Tick) {
        if now < self.prune_at {
            return;
        }
        // The spilled runs, then the tail's: a decision may drop a few dozen runs, each
        // without asking which part holds the oldest.
        while let Some(run) = self.spilled.front() {
            let exit = run.tick.saturating_add(period);
            if exit > now {
                self.prune_at = exit;
                return;
            }
            self.base = run.end;
            self.spilled.pop_front();
        }
        while self.lo < self.hi {
            let run = self.tail[usize::from(self.lo)];
            let exit = run.tick.saturating_add(period);
            if exit > now {
                self.prune_at = exit;
                return;
            }
            self.base = run.end;
            self.lo += 1;
        }
        (self.lo, self.hi) = (0, 0);
        self.prune_at = 0;
    }

    /// [`WindowLog::prune`] only once the oldest take left an eighth of a period (and at
    /// least [`TIDY_AFTER`]) ago: no answer depends on pruning (every query bounds the
    /// takes it counts by tick), only the log's size does, so a decision need not read
    /// the oldest run (a cache miss of its own) each time one take leaves. Holds the
    /// takes of `period` and that margin: an eighth more for long windows; a short
    /// (burst) window's log stays well under its steady window's.
    pub fn tidy(&mut self, now: Tick, period: Tick) {
        if now >= self.prune_at.saturating_add((period / 8).max(TIDY_AFTER)) {
            self.prune(now, period);
        }
    }

    /// Number of takes recorded (after pruning: those still inside a window).
    pub fn len(&self) -> u64 {
        self.end - self.base
    }

    /// Whether no take is recorded.
    pub fn is_empty(&self) -> bool {
        self.lo == self.hi && self.spilled.is_empty()
    }

    /// The latest take, if any.
    pub fn last(&self) -> Option<Tick> {
        (!self.is_empty()).then_some(self.last)
    }

    /// Takes recorded at ticks after `now` (reservations of queued requests).
    pub fn pending_after(&self, now: Tick) -> u64 {
        self.end - self.end_before(self.partition_point(|r| r.tick <= now))
    }

    /// The earliest tick, no earlier than `now` nor the latest take, at which one more
    /// take keeps every interval of `spec.period` at or under `spec.limit`.
    pub fn earliest(&self, now: Tick, spec: WindowSpec) -> Tick {
        if self.is_empty() {
            return now;
        }
        let mut t = now.max(self.last);
        let limit = u64::from(spec.limit);
        if self.len() >= limit {
            // The limit-th most recent take must be a whole period before the new one.
            let target = self.end - limit + 1;
            let idx = self.partition_point(|r| r.end < target);
            t = t.max(self.run(idx).tick.saturating_add(spec.period));
        }
        t
    }

    /// Takes recorded at ticks before `t`, counted from the log's start (a position).
    fn position_before(&self, t: Tick) -> u64 {
        self.end_before(self.partition_point(|r| r.tick < t))
    }

    /// Whether one more take at `t`, wherever it falls among the recorded takes (before
    /// reservations of other requests, too), keeps every interval of `spec.period` at or
    /// under `spec.limit`. If not, `Err` names a tick before which no take fits.
    ///
    /// A take at `t` breaks the limit exactly when `limit` recorded takes within a
    /// period of each other all lie in `(t - period, t + period)`: then one interval of
    /// `period` holds them and `t`. `budget` bounds the groups looked at; when it runs
    /// out, the answer is `Err(Tick::MAX)`: no (the caller appends after the latest take).
    pub fn admits(&self, t: Tick, spec: WindowSpec, budget: &mut u32) -> Result<(), Tick> {
        let n = u64::from(spec.limit);
        let lo = match t.checked_sub(spec.period) {
            Some(from) => self.position_before(from + 1),
            None => self.base,
        };
        let hi = self.position_before(t.saturating_add(spec.period));
        if hi - lo < n {
            return Ok(());
        }
        // Groups of `n` consecutive takes starting in one run are tightest at its first
        // position: look at one group per run.
        let mut p = lo + 1;
        while p + n - 1 <= hi {
            if *budget == 0 {
                return Err(Tick::MAX);
            }
            *budget -= 1;
            let first = self.run(self.partition_point(|r| r.end < p));
            let start = first.tick;
            let end = self.run(self.partition_point(|r| r.end < p + n - 1)).tick;
            if end - start < spec.period {
                return Err(start + spec.period);
            }
            p = first.end + 1;
        }
        Ok(())
    }

    /// The earliest tick at or after `from` at which one more take fits anywhere among
    /// the recorded ones ([`WindowLog::admits`]), or, once `budget` is spent, after the
    /// latest take ([`WindowLog::earliest`]).
    pub fn earliest_insert(&self, from: Tick, spec: WindowSpec, budget: &mut u32) -> Tick {
        let append = self.earliest(from, spec);
        let mut t = from;
        while t < append && *budget > 0 {
            *budget -= 1;
            match self.admits(t, spec, budget) {
                Ok(()) => return t,
                Err(next) => t = next,
            }
        }
        append
    }

    /// The runs as (ms, count), for a failing test to show.
    #[cfg(test)]
    pub(crate) fn debug_runs(&self) -> Vec<(u64, u64)> {
        (0..self.runs_len())
            .map(|i| {
                let r = self.run(i);
                (r.tick / 1000, r.end - self.end_before(i))
            })
            .collect()
    }

    /// The newest takes inside the window at `now` (none booked after it), at most
    /// `limit`: what a restarted process needs, as `(age, count)`, newest first.
    pub fn recent(&self, now: Tick, spec: WindowSpec) -> Vec<(Tick, u64)> {
        let mut out = Vec::new();
        let mut left = u64::from(spec.limit);
        let hi = self.partition_point(|r| r.tick <= now);
        for i in (0..hi).rev() {
            let run = self.run(i);
            if left == 0 || run.tick.saturating_add(spec.period) <= now {
                break;
            }
            let n = (run.end - self.end_before(i)).min(left);
            left -= n;
            out.push((now - run.tick, n));
        }
        out
    }

    /// Records a take at `tick`, which must not be earlier than the latest take.
    pub fn record(&mut self, tick: Tick) {
        self.end += 1;
        if !self.is_empty() && self.last == tick {
            let end = self.end;
            if let Some(run) = self.back_mut() {
                run.end = end;
            }
            return;
        }
        debug_assert!(self.is_empty() || self.last < tick, "takes are recorded in order");
        self.push_back(Run { tick, end: self.end });
        self.last = tick;
    }

    /// Records `n` takes at any `tick`, even before later ones: takes that are not the
    /// proxy's (another consumer's, learned from `RateLimit-Remaining`), placed so they
    /// leave the window when Klaviyo's does. Adding takes only makes later decisions
    /// wait longer, so the invariant holds for the proxy's own takes.
    pub fn insert(&mut self, tick: Tick, n: u64) {
        if n == 0 {
            return;
        }
        self.end += n;
        if self.is_empty() || self.last < tick {
            self.push_back(Run { tick, end: self.end });
            self.last = tick;
            return;
        }
        if self.last == tick {
            let end = self.end;
            if let Some(run) = self.back_mut() {
                run.end = end;
            }
            return;
        }
        let idx = self.partition_point(|r| r.tick < tick);
        if idx == 0 {
            self.prune_at = 0;
        }
        let before = self.end_before(idx);
        if idx == self.runs_len() || self.run(idx).tick != tick {
            self.insert_run(idx, Run { tick, end: before });
        }
        self.for_each_from(idx, |run| run.end += n);
    }

    /// Removes one take at `tick` (a cancelled reservation). Removing only lowers
    /// counts, so the invariant holds for every remaining take. Returns whether a take
    /// was found.
    pub fn remove(&mut self, tick: Tick) -> bool {
        let idx = self.partition_point(|r| r.tick < tick);
        if idx == self.runs_len() || self.run(idx).tick != tick {
            return false;
        }
        let prev = self.end_before(idx);
        self.for_each_from(idx, |run| run.end -= 1);
        self.end -= 1;
        if self.run(idx).end == prev {
            self.remove_run(idx);
            if idx == 0 {
                self.prune_at = 0;
            }
            if let Some(back) = self.back() {
                self.last = back.tick;
            }
        }
        true
    }

    /// Counts this window's takes in `(now - spec.period, now]`: the tokens in use.
    pub fn in_use(&self, now: Tick, spec: WindowSpec) -> u64 {
        // Before a whole period has passed since the epoch, every take is in use
        // (including one at tick 0, which `tick <= now - period` would wrongly drop).
        let lo = match now.checked_sub(spec.period) {
            Some(from) => self.partition_point(|r| r.tick <= from),
            None => 0,
        };
        let hi = self.partition_point(|r| r.tick <= now);
        self.end_before(hi) - self.end_before(lo)
    }
}

/// The earliest tick at which one take from every window of every bucket is allowed:
/// the all-or-nothing decision over a request's buckets.
pub fn earliest_all<'a>(now: Tick, windows: impl IntoIterator<Item = (&'a WindowLog, WindowSpec)>) -> Tick {
    windows.into_iter().fold(now, |t, (log, spec)| t.max(log.earliest(now, spec)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Checks the invariant directly on a sorted list of take ticks.
    fn assert_invariant(takes: &[Tick], spec: WindowSpec) -> Result<(), TestCaseError> {
        let n = spec.limit as usize;
        for j in 0..takes.len().saturating_sub(n) {
            prop_assert!(
                takes[j + n] - takes[j] >= spec.period,
                "{} takes within {} ticks: {:?} (spec {:?})",
                n + 1,
                takes[j + n] - takes[j],
                &takes[j..=j + n],
                spec
            );
        }
        Ok(())
    }

    fn spec() -> impl Strategy<Value = WindowSpec> {
        (1u32..12, 1u64..2_000).prop_map(|(limit, period)| WindowSpec { limit, period })
    }

    /// A bucket of one to three windows and the history of its takes.
    #[derive(Debug, Clone, Default)]
    struct Bucket {
        specs: Vec<WindowSpec>,
        logs: Vec<WindowLog>,
        takes: Vec<Tick>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Requests arrive at arbitrary times and each needs one or both of two
        /// buckets (a conditional limit on top of an endpoint's own). Whatever the
        /// pattern, no bucket's window ever holds more than its limit, no request goes
        /// before it arrives, and no request waits longer than a binding constraint
        /// forces (the limiter is work-conserving, which is what keeps saturation
        /// throughput at the limit).
        #[test]
        fn no_interval_exceeds_limit(
            specs_a in proptest::collection::vec(spec(), 1..4),
            specs_b in proptest::collection::vec(spec(), 1..3),
            arrivals in proptest::collection::vec((0u64..400, 0u8..3), 1..300),
        ) {
            let mut buckets = [
                Bucket { logs: vec![WindowLog::default(); specs_a.len()], specs: specs_a, takes: vec![] },
                Bucket { logs: vec![WindowLog::default(); specs_b.len()], specs: specs_b, takes: vec![] },
            ];
            let mut now = 0;
            for (gap, which) in arrivals {
                now += gap;
                let wanted: &[usize] = match which { 0 => &[0], 1 => &[1], _ => &[0, 1] };
                for &b in wanted {
                    let bucket = &mut buckets[b];
                    for (log, spec) in bucket.logs.iter_mut().zip(&bucket.specs) {
                        log.prune(now, spec.period);
                    }
                }
                let t = earliest_all(now, wanted.iter().flat_map(|&b| {
                    buckets[b].logs.iter().zip(buckets[b].specs.iter().copied())
                }));
                prop_assert!(t >= now);
                // Work-conserving: t is forced by arrival, FIFO order, or a full window.
                let forced = t == now || wanted.iter().any(|&b| {
                    let bucket = &buckets[b];
                    bucket.takes.last() == Some(&t) || bucket.specs.iter().any(|s| {
                        let n = s.limit as usize;
                        bucket.takes.len() >= n && bucket.takes[bucket.takes.len() - n] + s.period == t
                    })
                });
                prop_assert!(forced, "needless wait until {t} at {now}");
                for &b in wanted {
                    let bucket = &mut buckets[b];
                    bucket.logs.iter_mut().for_each(|l| l.record(t));
                    bucket.takes.push(t);
                }
            }
            for bucket in &buckets {
                for spec in &bucket.specs {
                    assert_invariant(&bucket.takes, *spec)?;
                }
            }
        }

        /// Cancelling reservations (clients that hang up) never breaks the invariant.
        #[test]
        fn cancellation_keeps_invariant(
            spec in spec(),
            ops in proptest::collection::vec((0u64..50, any::<bool>()), 1..200),
        ) {
            let mut log = WindowLog::default();
            let mut takes: Vec<Tick> = vec![];
            let mut now = 0;
            for (gap, cancel) in ops {
                now += gap;
                log.prune(now, spec.period);
                if cancel {
                    if let Some(pos) = takes.iter().rposition(|&t| t > now) {
                        prop_assert!(log.remove(takes[pos]));
                        takes.remove(pos);
                    }
                    continue;
                }
                let t = log.earliest(now, spec);
                log.record(t);
                takes.push(t);
                prop_assert_eq!(log.in_use(t, spec).min(u64::from(spec.limit)), log.in_use(t, spec));
            }
            assert_invariant(&takes, spec)?;
        }
    }

    /// Whether one more take at `t` keeps every interval of `spec.period` within the
    /// limit, checked the slow way: every run of `limit + 1` takes spans a period.
    fn fits(takes: &[Tick], t: Tick, spec: WindowSpec) -> bool {
        let mut all = takes.to_vec();
        all.push(t);
        all.sort_unstable();
        let n = spec.limit as usize;
        all.windows(n + 1).all(|w| w[n] - w[0] >= spec.period)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A take fits anywhere among booked takes (before other requests' slots too)
        /// exactly where the slow check says so, and the search finds the first such
        /// instant.
        #[test]
        fn insertion_finds_the_first_instant_that_fits(
            spec in spec(),
            ops in proptest::collection::vec((0u64..3_000, 0u64..300), 1..40),
            from in 0u64..4_000,
        ) {
            // Build a valid log of takes at scattered instants (as lanes of different
            // buckets leave them), each placed where it fits.
            let mut log = WindowLog::default();
            let mut takes = Vec::new();
            for (at, _) in &ops {
                let mut budget = u32::MAX;
                let t = log.earliest_insert(*at, spec, &mut budget);
                prop_assert!(fits(&takes, t, spec), "placed where it does not fit: {t} in {takes:?}");
                // Whether a take fits changes only where another leaves a period behind.
                let candidates = takes.iter().map(|a| a + spec.period).chain([*at]).filter(|u| (*at..t).contains(u));
                for u in candidates {
                    prop_assert!(!fits(&takes, u, spec), "{u} fits before {t} in {takes:?}");
                }
                log.insert(t, 1);
                takes.push(t);
            }
            for (_, dt) in &ops {
                let t = from + dt;
                let mut budget = u32::MAX;
                prop_assert_eq!(log.admits(t, spec, &mut budget).is_ok(), fits(&takes, t, spec), "at {}", t);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A log tidied lazily answers every question exactly as one pruned at every
        /// step: the takes it keeps past their window change no decision.
        #[test]
        fn tidying_late_changes_no_answer(
            // Periods and gaps around TIDY_AFTER, so the lazy log prunes now and then.
            spec in (1u32..12, 1u64..4_000_000).prop_map(|(limit, period)| WindowSpec { limit, period }),
            ops in proptest::collection::vec((0u64..1_500_000, 0u8..4), 1..200),
        ) {
            let (mut exact, mut lazy) = (WindowLog::default(), WindowLog::default());
            let mut now = 0;
            for (gap, op) in ops {
                now += gap;
                exact.prune(now, spec.period);
                lazy.tidy(now, spec.period);
                let t = exact.earliest(now, spec);
                prop_assert_eq!(t, lazy.earliest(now, spec));
                prop_assert_eq!(exact.in_use(now, spec), lazy.in_use(now, spec));
                prop_assert_eq!(exact.pending_after(now), lazy.pending_after(now));
                prop_assert_eq!(exact.recent(now, spec), lazy.recent(now, spec));
                let (mut b1, mut b2) = (u32::MAX, u32::MAX);
                prop_assert_eq!(exact.earliest_insert(now, spec, &mut b1), lazy.earliest_insert(now, spec, &mut b2));
                match op {
                    0 if exact.last().is_some_and(|l| l > now) => {
                        let last = exact.last().unwrap_or(0);
                        prop_assert_eq!(exact.remove(last), lazy.remove(last));
                    }
                    1 => {
                        exact.insert(now, 2);
                        lazy.insert(now, 2);
                    }
                    _ => {
                        exact.record(t);
                        lazy.record(t);
                    }
                }
            }
            prop_assert!(lazy.len() >= exact.len());
        }
    }

    /// The takes of one window as a plain sorted list: what every [`WindowLog`] answer
    /// means, computed the slow way.
    #[derive(Debug, Default)]
    struct Model {
        takes: Vec<Tick>,
    }

    impl Model {
        fn add(&mut self, t: Tick, n: u64) {
            let at = self.takes.partition_point(|&x| x <= t);
            for _ in 0..n {
                self.takes.insert(at, t);
            }
        }

        fn remove(&mut self, t: Tick) -> bool {
            let found = self.takes.iter().position(|&x| x == t);
            found.inspect(|&i| {
                self.takes.remove(i);
            });
            found.is_some()
        }

        fn in_use(&self, now: Tick, spec: WindowSpec) -> u64 {
            let inside = |x: Tick| x <= now && now.checked_sub(spec.period).is_none_or(|from| x > from);
            self.takes.iter().filter(|&&x| inside(x)).count() as u64
        }

        fn pending_after(&self, now: Tick) -> u64 {
            self.takes.iter().filter(|&&x| x > now).count() as u64
        }

        fn earliest(&self, now: Tick, spec: WindowSpec) -> Tick {
            let Some(&last) = self.takes.last() else { return now };
            let n = spec.limit as usize;
            let mut t = now.max(last);
            if self.takes.len() >= n {
                t = t.max(self.takes[self.takes.len() - n] + spec.period);
            }
            t
        }

        /// Whether no `limit + 1` consecutive takes that hold one more at `t` lie
        /// within less than a period.
        fn admits(&self, t: Tick, spec: WindowSpec) -> bool {
            let n = spec.limit as usize;
            let mut all = self.takes.clone();
            let k = all.partition_point(|&x| x < t);
            all.insert(k, t);
            (k.saturating_sub(n)..=k).filter(|&j| j + n < all.len()).all(|j| all[j + n] - all[j] >= spec.period)
        }

        /// The first instant from `from` on that admits a take, before the append
        /// instant: whether a take fits changes only where a take leaves a period
        /// behind.
        fn earliest_insert(&self, from: Tick, spec: WindowSpec) -> Tick {
            let append = self.earliest(from, spec);
            std::iter::once(from)
                .chain(self.takes.iter().map(|&x| x + spec.period))
                .filter(|&u| u >= from && u < append && self.admits(u, spec))
                .min()
                .unwrap_or(append)
        }

        fn recent(&self, now: Tick, spec: WindowSpec) -> Vec<(Tick, u64)> {
            let mut out: Vec<(Tick, u64)> = Vec::new();
            let newest = self.takes.iter().rev().filter(|&&x| x <= now && x + spec.period > now);
            for &x in newest.take(spec.limit as usize) {
                match out.last_mut() {
                    Some((age, n)) if *age == now - x => *n += 1,
                    _ => out.push((now - x, 1)),
                }
            }
            out
        }
    }

    /// The log's runs are in order, counted right, and its inline copies of the newest
    /// run agree with it.
    fn check_runs(log: &WindowLog) -> Result<(), TestCaseError> {
        prop_assert!(log.lo <= log.hi && usize::from(log.hi) <= TAIL);
        prop_assert!(log.lo == 0 || log.spilled.is_empty());
        let runs: Vec<Run> = (0..log.runs_len()).map(|i| log.run(i)).collect();
        let mut prev = log.base;
        for (i, r) in runs.iter().enumerate() {
            prop_assert!(r.end > prev, "an empty run at {i}: {runs:?}");
            prop_assert!(i == 0 || runs[i - 1].tick < r.tick, "runs out of order: {runs:?}");
            prev = r.end;
        }
        prop_assert_eq!(prev, log.end);
        if let Some(r) = runs.last() {
            prop_assert_eq!(r.tick, log.last);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The log (its inline tail, the spilled runs, and the moves between them)
        /// answers every question as a plain sorted list of takes does, under any mix of
        /// appends, insertions, removals, pruning and tidying. Questions are asked at or
        /// after the latest pruning, as the store asks them.
        #[test]
        fn log_matches_a_sorted_list(
            limit in 1u32..12,
            period in 1u64..2_000,
            // At the larger scale periods and gaps reach past TIDY_AFTER, so tidying prunes.
            scale in prop_oneof![Just(1u64), Just(2_000u64)],
            ops in proptest::collection::vec((0u8..10, any::<u64>(), any::<u64>()), 1..300),
        ) {
            let spec = WindowSpec { limit, period: period * scale };
            let p = spec.period;
            let (mut log, mut model) = (WindowLog::default(), Model::default());
            let mut now: Tick = 0;
            for (op, a, b) in ops {
                let later = now + a % (2 * p + 1);
                match op {
                    0 => now += a % (p / 2 + 1),
                    1 => {
                        // In order, at the latest take (a merge) or after it.
                        let t = now.max(model.takes.last().copied().unwrap_or(0)) + [0, 1, b % (p + 1)][(a % 3) as usize];
                        log.record(t);
                        model.add(t, 1);
                    }
                    2 => {
                        // Anywhere from a period ago to two periods ahead.
                        let t = now.saturating_sub(p) + a % (3 * p + 1);
                        let n = b % 4;
                        log.insert(t, n);
                        model.add(t, n);
                    }
                    3 => {
                        // A take still inside its window (pruning keeps those), or an
                        // instant there that may hold none.
                        let inside: Vec<Tick> = model.takes.iter().copied().filter(|&x| x + p > now).collect();
                        let t = match inside.len() {
                            0 => now.saturating_sub(p) + 1 + a % (3 * p),
                            len if b % 3 > 0 => inside[(a % len as u64) as usize],
                            _ => now.saturating_sub(p) + 1 + a % (3 * p),
                        };
                        prop_assert_eq!(log.remove(t), model.remove(t), "remove {}", t);
                    }
                    4 => {
                        log.prune(now, p);
                        model.takes.retain(|&x| x.saturating_add(p) > now);
                        prop_assert_eq!(log.len(), model.takes.len() as u64);
                    }
                    5 => {
                        log.tidy(now, p);
                        let inside = model.takes.iter().filter(|&&x| x.saturating_add(p) > now).count() as u64;
                        prop_assert!(inside <= log.len() && log.len() <= model.takes.len() as u64);
                    }
                    6 => {
                        let mut budget = u32::MAX;
                        prop_assert_eq!(log.admits(later, spec, &mut budget).is_ok(), model.admits(later, spec), "admits {}", later);
                    }
                    7 => prop_assert_eq!(log.earliest(later, spec), model.earliest(later, spec), "earliest {}", later),
                    8 => {
                        let mut budget = u32::MAX;
                        prop_assert_eq!(log.earliest_insert(later, spec, &mut budget), model.earliest_insert(later, spec), "earliest_insert {}", later);
                    }
                    _ => {
                        prop_assert_eq!(log.in_use(later, spec), model.in_use(later, spec), "in_use {}", later);
                        prop_assert_eq!(log.pending_after(later), model.pending_after(later), "pending_after {}", later);
                        prop_assert_eq!(log.recent(later, spec), model.recent(later, spec), "recent {}", later);
                    }
                }
                check_runs(&log)?;
                let last = model.takes.last().copied();
                if model.takes.iter().any(|&x| x + p > now) {
                    prop_assert_eq!(log.last(), last);
                } else {
                    prop_assert!(log.last().is_none() || log.last() == last);
                }
            }
        }
    }

    #[test]
    fn saturation_sustains_the_steady_limit() {
        // 75/s and 750/min with guards: a request every 10 ms for ten minutes.
        let burst = WindowSpec { limit: 75, period: 1_050_000 };
        let steady = WindowSpec { limit: 750, period: 60_250_000 };
        let mut logs = [WindowLog::default(), WindowLog::default()];
        let horizon = 600_000_000;
        let (mut now, mut admitted) = (0, 0u64);
        while now < horizon {
            logs[0].prune(now, burst.period);
            logs[1].prune(now, steady.period);
            let t = earliest_all(now, [(&logs[0], burst), (&logs[1], steady)]);
            if t == now {
                logs.iter_mut().for_each(|l| l.record(t));
                admitted += 1;
            }
            now += 10_000;
        }
        let ideal = 750 * 10;
        assert!(admitted * 100 >= ideal * 99, "admitted {admitted} of {ideal}");
        assert!(admitted <= ideal);
    }

    #[test]
    fn runs_merge_and_remove() {
        let spec = WindowSpec { limit: 3, period: 100 };
        let mut log = WindowLog::default();
        for _ in 0..3 {
            let t = log.earliest(5, spec);
            assert_eq!(t, 5);
            log.record(t);
        }
        assert_eq!(log.runs_len(), 1);
        assert_eq!(log.earliest(5, spec), 105);
        log.record(105);
        assert_eq!(log.pending_after(5), 1);
        assert_eq!(log.in_use(5, spec), 3, "takes at the epoch count too");
        assert!(log.remove(105));
        assert!(!log.remove(105));
        assert_eq!(log.earliest(5, spec), 105);
        assert!(log.remove(5));
        assert_eq!(log.earliest(5, spec), 5);
        log.prune(105, spec.period);
        assert!(log.is_empty());
    }

    #[test]
    fn insert_places_takes_in_order() {
        let spec = WindowSpec { limit: 3, period: 100 };
        let mut log = WindowLog::default();
        log.record(50);
        log.record(80);
        log.insert(10, 2);
        log.insert(80, 1);
        log.insert(200, 1);
        assert_eq!(log.len(), 6);
        assert_eq!(log.in_use(100, spec), 5);
        assert_eq!(log.in_use(60, spec), 3);
        // The 3rd most recent take is at 80 (allows 180), but takes stay in order: 200.
        assert_eq!(log.earliest(150, spec), 200);
        let mut past = WindowLog::default();
        past.record(90);
        past.insert(20, 2);
        // Three takes by 90; the 3rd most recent is at 20: the next may go at 120.
        assert_eq!(past.earliest(95, spec), 120);
        log.prune(120, 100);
        assert_eq!(log.len(), 4, "the two takes at 10 have left the window");
    }
}
