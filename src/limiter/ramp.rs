//! The end of an upstream 429 pause, probed then ramped (TCP's slow start, per bucket).
//!
//! A pause ([`super::LocalStore::pause_and_requeue`]) keeps every request of a bucket
//! from leaving before the `Retry-After` has passed; on its own it then lets them all
//! go at once, and when the 429 came from another consumer spending the quota, the
//! first of them draws the next 429 while all the others are already on the wire. So a
//! throttled bucket *ramps*: the request that met the 429 goes first, alone (the probe);
//! each success lets more go — 1, 2, 4, … in flight, doubling each time a whole window
//! of them succeeded (one round trip) — until the window reaches the bucket's burst
//! limit and the ramp ends. A 429 during the ramp pauses the bucket again and restarts
//! the ramp at one.
//!
//! A 429 catches every request of the bucket already in flight. When 429s keep coming
//! (another consumer spending the quota as fast as it frees), the window is kept to
//! `1 + successes between 429s / 8`, so those caught stay about an eighth of what gets
//! through; a run without 429s raises the ceiling again, and a ramp that met no 429 for
//! [`RAMP_MEMORY`] is forgotten. Waiters pass in the order they first came to the gate,
//! so a request caught in flight goes again before those that came after it.
//!
//! The ramp is a gate in front of the limiter, so it never holds a request past the
//! slot its windows booked (every departure stays a take the windows allowed when it
//! was booked): a request passes the gate first and reserves its slot after. Requests
//! already waiting for a slot when a 429 turns their bucket to ramping give their slot
//! back and go through the gate ([`wait`]).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::{BucketKey, Demand, Grant, LocalStore, Place};
use crate::error::ProxyError;
use crate::queue::{self, Admitted};

/// The largest window of a ramp: past it the bucket's own limits pace it.
pub const MAX_WINDOW: u32 = 64;

/// A ramp that met no 429 for this long ends: its bucket starts afresh.
pub const RAMP_MEMORY: Duration = Duration::from_secs(60);

/// The throttled buckets and their ramps.
#[derive(Debug, Default)]
pub struct Ramps {
    /// Looked up by every limited request: foldhash, not SipHash (the keys are keyed
    /// hashes of credentials and our own bucket ids, nothing a client can aim).
    ramps: DashMap<BucketKey, Arc<Ramp>, foldhash::fast::RandomState>,
}

#[derive(Debug, Default)]
struct Ramp {
    state: Mutex<State>,
    /// Told when the bucket starts ramping, so requests waiting for a slot booked
    /// before the 429 come back through the gate.
    throttled: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// `None`: not ramping, requests pass.
    window: Option<u32>,
    /// The largest window, then the ramp ends.
    cap: u32,
    /// Passes out now (sent, or waiting for their slot).
    out: u32,
    /// Successes since the window last grew.
    acked: u32,
    /// Successes since the ramp last (re)started.
    run: u32,
    /// The successes between this ramp's 429s, smoothed (halfway to each new run):
    /// `None` until a 429 came during a ramp.
    between: Option<u32>,
    /// When a 429 last (re)started the ramp.
    since: Option<Instant>,
    /// Bumped whenever the ramp restarts: passes of an older ramp count for nothing.
    generation: u64,
    /// Requests waiting to pass, oldest arrival first.
    waiting: VecDeque<(Instant, oneshot::Sender<u64>)>,
}

/// Leave to send one request of a bucket; tell it how the request went
/// ([`Pass::succeeded`], [`Pass::throttled`]). Dropped, it gives its place back.
#[derive(Debug)]
pub struct Pass {
    ramp: Option<(Arc<Ramp>, u64)>,
}

/// What the gate says to a request of a bucket.
#[derive(Debug)]
pub enum Gate {
    /// Not ramping: go and wait for your slot, but come back if the bucket starts
    /// ramping meanwhile (the future completes then).
    Open(Pass, RampWatch),
    /// Ramping, and there is room in the window.
    Pass(Pass, RampWatch),
    /// Ramping and the window is full: wait for a pass.
    Wait(Waiting),
}

/// Tells when the bucket (re)starts ramping.
#[derive(Debug)]
pub struct RampWatch(Arc<Ramp>);

impl RampWatch {
    /// Completes at the next 429 that (re)starts the bucket's ramp.
    pub fn throttled(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.throttled.notified()
    }
}

/// A request waiting for a pass.
#[derive(Debug)]
pub struct Waiting {
    ramp: Arc<Ramp>,
    rx: Option<oneshot::Receiver<u64>>,
}

impl Waiting {
    /// The pass, when a success or a finished request makes room, and the watch on
    /// the bucket's ramp.
    pub async fn pass(mut self) -> (Pass, RampWatch) {
        let rx = self.rx.as_mut().expect("received once");
        let pass = match rx.await {
            Ok(generation) => Pass { ramp: Some((self.ramp.clone(), generation)) },
            // The ramp ended: the bucket is open again.
            Err(_) => Pass { ramp: None },
        };
        self.rx = None;
        (pass, RampWatch(self.ramp.clone()))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Handed a pass but gone before taking it: the pass goes to the next one.
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(generation) = rx.try_recv() {
                drop(Pass { ramp: Some((self.ramp.clone(), generation)) });
            }
        }
    }
}

fn lock(ramp: &Ramp) -> MutexGuard<'_, State> {
    ramp.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A 429 catches every request of its bucket in flight (they reach Klaviyo inside the
/// hold it announces): a window of `w` loses up to `w - 1`. Once 429s come during a
/// ramp, the window is kept to `1 + successes between 429s / SHARE`, so those caught
/// stay about an eighth of what gets through; a run without 429s raises it again.
const SHARE: u32 = 8;

impl State {
    /// The largest window the successes between 429s allow (the cap when 429s are rare).
    fn ceiling(&self) -> u32 {
        match self.between {
            None => self.cap,
            Some(between) => (1 + between.max(self.run) / SHARE).min(self.cap),
        }
    }

    /// Ends the ramp: the gate opens to everyone, and the next 429 starts afresh.
    fn end(&mut self) {
        self.window = None;
        self.between = None;
        self.since = None;
    }

    /// Hands passes to waiters while the window has room; ends the ramp (opening the
    /// gate to everyone) once the window reached its cap and nobody waits, so the end
    /// of a ramp never lets a queue go at once.
    fn release(&mut self) {
        let Some(window) = self.window else { return };
        while self.out < window {
            let Some((_, next)) = self.waiting.pop_front() else { break };
            if next.send(self.generation).is_ok() {
                self.out += 1;
            }
        }
        if window >= self.cap && self.waiting.is_empty() {
            self.end();
        }
    }

    /// Forgets a ramp that met no 429 for [`RAMP_MEMORY`] and holds nobody back.
    fn expire(&mut self, now: Instant) {
        self.waiting.retain(|(_, tx)| !tx.is_closed());
        let quiet = self.since.is_some_and(|since| now.saturating_duration_since(since) >= RAMP_MEMORY);
        if quiet && self.waiting.is_empty() && self.window.is_some_and(|w| self.out < w) {
            self.end();
        }
    }
}

impl Ramps {
    /// No bucket ramping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the gate of `key` for a request that first came to it at `arrived` (kept
    /// across 429s): waiters pass oldest first.
    pub fn enter(&self, key: BucketKey, arrived: Instant) -> Gate {
        // A lookup first: every request of a bucket comes here, and `entry` takes the
        // shard's write lock.
        let ramp = match self.ramps.get(&key) {
            Some(ramp) => ramp.clone(),
            None => self.ramps.entry(key).or_default().clone(),
        };
        let mut s = lock(&ramp);
        // Nothing to expire in a bucket that is not ramping (one clock read fewer).
        if s.window.is_some() || !s.waiting.is_empty() {
            s.expire(Instant::now());
        }
        match s.window {
            None => {
                drop(s);
                Gate::Open(Pass { ramp: None }, RampWatch(ramp))
            }
            Some(window) if s.out < window && s.waiting.is_empty() => {
                s.out += 1;
                let generation = s.generation;
                drop(s);
                Gate::Pass(Pass { ramp: Some((ramp.clone(), generation)) }, RampWatch(ramp))
            }
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                let at = s.waiting.partition_point(|(a, _)| *a <= arrived);
                s.waiting.insert(at, (arrived, tx));
                drop(s);
                Gate::Wait(Waiting { ramp, rx: Some(rx) })
            }
        }
    }

    /// Whether the bucket is ramping now.
    pub fn is_ramping(&self, key: &BucketKey) -> bool {
        self.ramps.get(key).is_some_and(|r| lock(&r).window.is_some())
    }

    /// Drops the state of buckets that are neither ramping nor watched.
    pub fn sweep(&self) {
        self.ramps.retain(|_, r| Arc::strong_count(r) > 1 || lock(r).window.is_some());
    }
}

impl Pass {
    /// Whether the pass still counts: for a bucket that is not ramping, or in the ramp
    /// that handed it out. `watch` is on the bucket's ramp (the table's own: held, it
    /// is never swept, so no lookup is needed).
    fn is_current(&self, watch: &RampWatch) -> bool {
        match &self.ramp {
            None => lock(&watch.0).window.is_none(),
            Some((ramp, generation)) => lock(ramp).generation == *generation,
        }
    }

    /// The request met a 429 on `key`: the bucket (re)starts ramping at one, and this
    /// request is its probe (it keeps its pass and goes first when the pause ends) —
    /// unless another request already is, when `None` says to go through the gate
    /// again. `cap` is the window at which the ramp ends (the bucket's burst limit).
    pub fn throttled(mut self, ramps: &Ramps, key: BucketKey, cap: u32) -> Option<Pass> {
        let ramp = ramps.ramps.entry(key).or_default().clone();
        let mut s = lock(&ramp);
        let mine = self.ramp.as_ref().is_some_and(|(r, g)| Arc::ptr_eq(r, &ramp) && *g == s.generation);
        if !mine && s.window == Some(1) && s.acked == 0 && s.out > 0 {
            // Already restarted by another 429, whose request is the probe.
            drop(s);
            return None;
        }
        // Its place is taken over by the new ramp's count, not given back.
        self.ramp = None;
        if s.window.is_some() {
            // A 429 during a ramp: the successes since the last one say how often they come.
            s.between = Some(s.between.map_or(s.run, |b| (b + s.run) / 2));
        }
        s.generation += 1;
        s.window = Some(1);
        s.cap = cap.clamp(2, MAX_WINDOW);
        s.acked = 0;
        s.run = 0;
        s.since = Some(Instant::now());
        s.out = 1;
        let generation = s.generation;
        drop(s);
        tracing::debug!("upstream 429: the bucket ramps again from one probe");
        ramp.throttled.notify_waiters();
        Some(Pass { ramp: Some((ramp, generation)) })
    }

    /// The request succeeded: the window grows when all of it has.
    pub fn succeeded(mut self) {
        let Some((ramp, generation)) = self.ramp.take() else { return };
        let mut s = lock(&ramp);
        if s.generation != generation {
            return;
        }
        s.out = s.out.saturating_sub(1);
        if let Some(window) = s.window {
            s.acked += 1;
            s.run = s.run.saturating_add(1);
            if s.acked >= window {
                s.acked = 0;
                s.window = Some(window.saturating_mul(2).min(s.ceiling()).max(window));
            }
        }
        s.release();
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        // Finished without a verdict (an error, a hang-up): the place goes to the next.
        if let Some((ramp, generation)) = self.ramp.take() {
            let mut s = lock(&ramp);
            if s.generation == generation {
                s.out = s.out.saturating_sub(1);
                s.release();
            }
        }
    }
}

/// Waits for a slot in the local store through the bucket's ramp gate; returns the
/// time waited, the request's place in line and its pass. `requeued` is the grant and
/// pass of a request that met a 429 (a probe goes with its grant; a request that is not
/// the probe gives its grant back and passes the gate like the others).
///
/// Every queued request holds this future: the probe's wait and the gate's are two
/// futures, so that neither carries the other's state (nor the requeued grant).
#[allow(clippy::too_many_arguments)]
pub fn wait<'a>(
    store: &'a LocalStore,
    ramps: &'a Ramps,
    arrived: Instant,
    demands: &'a [Demand],
    requeued: Option<(Grant, Option<Pass>)>,
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> impl Future<Output = Result<(Admitted, Pass), ProxyError>> + Send + 'a {
    let probe = match requeued {
        Some((grant, Some(pass))) => Some((grant, pass)),
        Some((grant, None)) => {
            store.cancel(&grant);
            None
        }
        None => None,
    };
    match probe {
        Some((grant, pass)) => {
            let started = Instant::now();
            let place = Some(grant.place());
            let wait = queue::wait_for_grant(store, grant, deadline, operation);
            Waits::Probe { wait, pass: Some(pass), started, place }
        }
        None => Waits::Gate { wait: through_the_gate(store, ramps, arrived, demands, deadline, max_depth, operation) },
    }
}

pin_project_lite::pin_project! {
    /// [`wait`]'s future: the probe's, or the gate's.
    #[project = WaitsProj]
    enum Waits<P, G> {
        Probe { #[pin] wait: P, pass: Option<Pass>, started: Instant, place: Option<Place> },
        Gate { #[pin] wait: G },
    }
}

impl<P, G> Future for Waits<P, G>
where
    P: Future<Output = Result<(), ProxyError>>,
    G: Future<Output = Result<(Admitted, Pass), ProxyError>>,
{
    type Output = G::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<G::Output> {
        match self.project() {
            WaitsProj::Probe { wait, pass, started, place } => wait.poll(cx).map(|r| {
                r.map(|()| {
                    let admitted = Admitted { waited: started.elapsed(), place: *place };
                    (admitted, pass.take().expect("polled after completion"))
                })
            }),
            WaitsProj::Gate { wait } => wait.poll(cx),
        }
    }
}

/// Waits at the gate of the request's first bucket, then for a slot (see [`wait`]).
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` keeps its arguments twice in its state (as the argument and as the body's copy), in every queued request"
)]
fn through_the_gate<'a>(
    store: &'a LocalStore,
    ramps: &'a Ramps,
    arrived: Instant,
    demands: &'a [Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> impl Future<Output = Result<(Admitted, Pass), ProxyError>> + Send + 'a {
    async move {
        let started = Instant::now();
        let admitted = |place| Admitted { waited: started.elapsed(), place };
        // Borrowed, not copied: a queued request holds this state.
        let Some(key) = demands.first().map(|d| &d.key) else {
            let place = queue::wait_for_slot(store, demands, deadline, max_depth, operation).await?.place;
            return Ok((admitted(place), Pass { ramp: None }));
        };
        // Whether the request was held anywhere; one that went at once waited zero.
        let mut held = false;
        loop {
            let (pass, watch) = match ramps.enter(*key, arrived) {
                Gate::Open(pass, watch) | Gate::Pass(pass, watch) => (pass, watch),
                Gate::Wait(waiting) => match tokio::time::timeout_at(deadline, {
                    held = true;
                    waiting.pass()
                })
                .await
                {
                    Ok(passed) => passed,
                    Err(_) => {
                        return Err(ProxyError::QueueTimeout { operation, retry_after: Duration::from_secs(1) });
                    }
                },
            };
            // Made before looking again, so a 429 from now on is seen: `notify_waiters`
            // reaches a `Notified` from its creation on, polled or not. It registers (a
            // lock, and another to leave) only when polled, i.e. when the slot is not
            // there at once.
            let mut throttled = std::pin::pin!(watch.throttled());
            if !pass.is_current(&watch) {
                continue;
            }
            // Polled by hand rather than with `select!`, whose state was a few hundred
            // bytes more in every queued request.
            let mut slot = std::pin::pin!(queue::wait_for_slot(store, demands, deadline, max_depth, operation));
            let waited = std::future::poll_fn(|cx| match slot.as_mut().poll(cx) {
                Poll::Ready(waited) => Poll::Ready(Some(waited)),
                Poll::Pending => throttled.as_mut().poll(cx).map(|()| None),
            })
            .await;
            match waited {
                Some(waited) => {
                    let waited = waited?;
                    if !held && waited.waited.is_zero() {
                        return Ok((Admitted { waited: Duration::ZERO, place: waited.place }, pass));
                    }
                    return Ok((admitted(waited.place), pass));
                }
                // A 429 (re)started the ramp while this request waited for a slot booked
                // before it: the slot is given back (dropping the wait cancels it), and the
                // request passes the new ramp's gate.
                None => held = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Account, BucketId};

    fn key() -> BucketKey {
        BucketKey { account: Account(1), bucket: BucketId::Endpoint(0) }
    }

    fn pass(gate: Gate) -> Option<Pass> {
        match gate {
            Gate::Open(p, _) | Gate::Pass(p, _) => Some(p),
            Gate::Wait(_) => None,
        }
    }

    /// The passes handed to `waiting` so far (taken out of it).
    fn granted(waiting: &mut Vec<Waiting>) -> Vec<Pass> {
        let mut got = Vec::new();
        waiting.retain_mut(|w| match w.rx.as_mut().expect("not taken").try_recv() {
            Ok(generation) => {
                w.rx = None;
                got.push(Pass { ramp: Some((w.ramp.clone(), generation)) });
                false
            }
            Err(_) => true,
        });
        got
    }

    fn wait_all(ramps: &Ramps, n: usize) -> Vec<Waiting> {
        (0..n)
            .map(|_| match ramps.enter(key(), Instant::now()) {
                Gate::Wait(w) => w,
                other => panic!("passed while the window was full: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_probe_then_two_then_four_until_the_cap() {
        let ramps = Ramps::new();
        // Not ramping: everyone passes.
        assert!(matches!(ramps.enter(key(), Instant::now()), Gate::Open(..)));
        let first = pass(ramps.enter(key(), Instant::now())).unwrap();
        let probe = first.throttled(&ramps, key(), 8).expect("the first 429 makes a probe");
        assert!(ramps.is_ramping(&key()));
        // While the probe is out, nobody else passes.
        let mut waiting = wait_all(&ramps, 40);
        assert!(granted(&mut waiting).is_empty());
        probe.succeeded();
        // One round trip at a time: the window doubles when all of it succeeded.
        let mut rounds = vec![1];
        loop {
            let round = granted(&mut waiting);
            if !ramps.is_ramping(&key()) {
                break;
            }
            rounds.push(round.len());
            for p in round {
                p.succeeded();
            }
        }
        // 1, 2, 4, then 8 at a time (the cap) until the 40 waiters are through; then
        // the ramp ends and the gate is open.
        assert_eq!(rounds, [1, 2, 4, 8, 8, 8, 8]);
        assert!(waiting.is_empty());
        assert!(matches!(ramps.enter(key(), Instant::now()), Gate::Open(..)));
    }

    #[test]
    fn a_429_during_the_ramp_restarts_it_with_one_probe() {
        let ramps = Ramps::new();
        let probe = pass(ramps.enter(key(), Instant::now())).unwrap().throttled(&ramps, key(), 64).unwrap();
        let mut waiting = wait_all(&ramps, 3);
        probe.succeeded();
        // Window 2: two waiters got passes; both meet a 429.
        let mut got = granted(&mut waiting);
        assert_eq!(got.len(), 2);
        let (second, first) = (got.pop().unwrap(), got.pop().unwrap());
        let probe = first.throttled(&ramps, key(), 64).expect("it becomes the new probe");
        assert!(second.throttled(&ramps, key(), 64).is_none(), "not a second probe");
        // The third waiter's ramp is gone: it comes back through the gate, and waits.
        assert!(matches!(ramps.enter(key(), Instant::now()), Gate::Wait(_)), "one probe at a time again");
        // A probe that fails otherwise (a 5xx, a hang-up) lets the next one probe.
        let mut next = wait_all(&ramps, 1);
        drop(probe);
        assert!(granted(&mut next).len() + granted(&mut waiting).len() >= 1);
    }

    /// The gate's watch is made before the request books its slot and polled only if
    /// the slot is not there at once: a 429 in between must still be seen, and the
    /// pass the gate handed out must no longer count.
    #[tokio::test]
    async fn a_429_before_the_watch_is_polled_is_seen() {
        let ramps = Ramps::new();
        let Gate::Open(open, watch) = ramps.enter(key(), Instant::now()) else { panic!("not ramping") };
        let throttled = watch.throttled();
        assert!(open.is_current(&watch));
        // Another request meets a 429 before this one's watch is polled.
        let other = pass(ramps.enter(key(), Instant::now())).unwrap();
        let probe = other.throttled(&ramps, key(), 8).expect("a probe");
        assert!(!open.is_current(&watch), "the bucket ramps now: an open pass no longer counts");
        let seen = tokio::time::timeout(Duration::from_millis(100), throttled).await;
        assert!(seen.is_ok(), "the 429 reached a watch made before it, though never polled before");
        // The probe's own pass counts, through the same ramp's watch.
        assert!(probe.is_current(&watch));
    }

    fn wait_at(ramps: &Ramps, arrived: Instant) -> Waiting {
        match ramps.enter(key(), arrived) {
            Gate::Wait(w) => w,
            other => panic!("passed while the window was full: {other:?}"),
        }
    }

    /// A request that met a 429 while in flight (not the probe) goes back through the
    /// gate: ahead of the requests that arrived after it, not behind them.
    #[test]
    fn a_request_sent_back_through_the_gate_keeps_its_turn() {
        let ramps = Ramps::new();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let first = pass(ramps.enter(key(), at(0))).unwrap();
        let second = pass(ramps.enter(key(), at(10))).unwrap();
        let probe = first.throttled(&ramps, key(), 64).unwrap();
        let mut later = vec![wait_at(&ramps, at(20)), wait_at(&ramps, at(30))];
        assert!(second.throttled(&ramps, key(), 64).is_none());
        let mut again = vec![wait_at(&ramps, at(10))];
        // The probe succeeds: a window of two, for the two oldest.
        probe.succeeded();
        let (went, with) = (granted(&mut again), granted(&mut later));
        assert_eq!(went.len(), 1, "the request of 10 ms goes");
        assert_eq!(with.len(), 1, "with the one of 20 ms");
        assert_eq!(later.len(), 1, "the one of 30 ms waits");
    }

    /// Drives a ramp through `cycles` 429s, each after `run` successes (the probe's
    /// included), the window kept full; returns how many other requests were in flight
    /// when each 429 came (a 429 catches them all: they reach Klaviyo inside its hold).
    fn cycles(ramps: &Ramps, cycles: usize, run: usize, cap: u32) -> Vec<usize> {
        let t0 = Instant::now();
        let mut probe = pass(ramps.enter(key(), t0)).unwrap().throttled(ramps, key(), cap);
        let mut waiting: Vec<Waiting> = (0..cycles * run * 2).map(|_| wait_at(ramps, t0)).collect();
        let mut caught = Vec::new();
        for _ in 0..cycles {
            probe.take().expect("the probe of the last 429").succeeded();
            let mut out: Vec<Pass> = Vec::new();
            for n in 2..=run + 1 {
                out.extend(granted(&mut waiting));
                let p = out.remove(0);
                if n <= run {
                    p.succeeded();
                    continue;
                }
                caught.push(out.len());
                probe = Some(p.throttled(ramps, key(), cap).expect("a new probe"));
                for other in out.drain(..) {
                    assert!(other.throttled(ramps, key(), cap).is_none());
                    waiting.insert(0, wait_at(ramps, t0));
                }
            }
        }
        caught
    }

    /// Another consumer spends the quota: a 429 every 6 successes. The first ramp knows
    /// nothing and doubles; after that the window stays at 1 + 6 / 8 = 1, so no 429
    /// catches another request in flight.
    #[test]
    fn when_429s_come_often_the_window_stays_small() {
        let ramps = Ramps::new();
        let caught = cycles(&ramps, 8, 6, 64);
        assert!(caught[0] > 0, "{caught:?}");
        assert!(caught[1..].iter().all(|&n| n == 0), "{caught:?}");
        // Every 24 successes: a window of up to 1 + 24 / 8 = 4, three others caught.
        let ramps = Ramps::new();
        let caught = cycles(&ramps, 8, 24, 64);
        assert!(caught[2..].iter().all(|&n| n <= 3), "{caught:?}");
    }

    /// Once 429s stop, the window grows back to the cap and the ramp ends.
    #[test]
    fn without_429s_the_window_grows_back_and_the_ramp_ends() {
        let ramps = Ramps::new();
        cycles(&ramps, 4, 6, 8);
        // The last probe is out: successes one window at a time until the gate opens.
        let t0 = Instant::now();
        let mut out: Vec<Pass> = pass(ramps.enter(key(), t0)).into_iter().collect();
        let mut waiting: Vec<Waiting> = (0..200).map(|_| wait_at(&ramps, t0)).collect();
        let mut rounds = Vec::new();
        while ramps.is_ramping(&key()) {
            out.extend(granted(&mut waiting));
            rounds.push(out.len());
            out.pop().expect("a pass out").succeeded();
            assert!(rounds.len() < 200, "the ramp never ended: {rounds:?}");
        }
        assert!(rounds.iter().max() <= Some(&8), "{rounds:?}");
        assert!(matches!(ramps.enter(key(), t0), Gate::Open(..)));
    }

    /// A bucket that met no 429 for a minute starts afresh: the gate opens.
    #[tokio::test(start_paused = true)]
    async fn a_ramp_is_forgotten_after_a_quiet_minute() {
        let ramps = Ramps::new();
        cycles(&ramps, 4, 6, 64);
        // Still one request at a time.
        assert!(matches!(ramps.enter(key(), Instant::now()), Gate::Pass(..)));
        assert!(ramps.is_ramping(&key()));
        tokio::time::advance(RAMP_MEMORY + Duration::from_secs(1)).await;
        assert!(matches!(ramps.enter(key(), Instant::now()), Gate::Open(..)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_hands_its_turn_on() {
        let ramps = Ramps::new();
        let probe = pass(ramps.enter(key(), Instant::now())).unwrap().throttled(&ramps, key(), 64).unwrap();
        let mut waiting = wait_all(&ramps, 2);
        let second = waiting.pop().unwrap();
        // The first waiter's client hangs up.
        drop(waiting);
        probe.succeeded();
        let got = tokio::time::timeout(Duration::from_millis(10), second.pass()).await;
        assert!(got.unwrap().0.ramp.is_some(), "the turn went on to the next waiter");
    }

    /// The gate in front of the store: after a 429, requests queued for a slot booked
    /// before it give the slot back and pass the ramp; none leaves before the probe.
    #[tokio::test(start_paused = true)]
    async fn waiters_booked_before_a_429_go_back_through_the_gate() {
        use crate::limiter::{WindowSpec, Windows};
        let store = Arc::new(LocalStore::new());
        let ramps = Arc::new(Ramps::new());
        let d = [Demand { key: key(), windows: Windows::new(&[WindowSpec { limit: 1, period: 1_000_000 }]) }];
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(60);
        // The first request leaves at once; four queue for slots at 1, 2, 3, 4 s.
        let (first_in, first) = wait(&store, &ramps, t0, &d, None, deadline, 100, "op").await.unwrap();
        let left = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in 1..=4u32 {
            let (store, ramps, left) = (store.clone(), ramps.clone(), left.clone());
            tasks.push(tokio::spawn(async move {
                let (_, pass) = wait(&store, &ramps, t0, &d, None, deadline, 100, "op").await.unwrap();
                left.lock().unwrap().push((n, Instant::now().duration_since(t0)));
                // Each answers 20 ms later.
                tokio::time::sleep(Duration::from_millis(20)).await;
                pass.succeeded();
            }));
            tokio::task::yield_now().await;
        }
        // At 0.5 s the first meets a 429 with Retry-After: 5 s.
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        let grant = store.pause_and_requeue(&d, first_in.place, now + Duration::from_secs(5), now, deadline).unwrap();
        let probe = first.throttled(&ramps, key(), 64).unwrap();
        let (_, probe) = wait(&store, &ramps, t0, &d, Some((grant, Some(probe))), deadline, 100, "op").await.unwrap();
        let probe_left = Instant::now().duration_since(t0);
        assert_eq!(probe_left, Duration::from_millis(5500));
        assert!(left.lock().unwrap().is_empty(), "nothing before the probe");
        tokio::time::sleep(Duration::from_millis(20)).await;
        probe.succeeded();
        for t in tasks {
            t.await.unwrap();
        }
        let left = left.lock().unwrap().clone();
        // Behind the probe, the bucket's own limit (1/s) paces them, in order.
        let order: Vec<u32> = left.iter().map(|(n, _)| *n).collect();
        assert_eq!(order, [1, 2, 3, 4]);
        assert!(left.iter().all(|(_, at)| *at >= Duration::from_millis(5520)), "{left:?}");
    }
}
