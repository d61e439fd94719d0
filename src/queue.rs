//! Waiting for a token. A request books its slot on arrival ([`LocalStore::reserve`])
//! and is refused at once when that slot is past its deadline or the queue is full.
//! Otherwise it waits in its lane (the requests that need the same buckets): the head
//! sleeps until its slot, the others until the store wakes them; whenever the store
//! moves the slot (a pause later, a cancellation earlier) the waiter is woken and asks
//! again ([`LocalStore::turn`]), so it leaves at its current slot and no other. A
//! request whose client hangs up is dropped mid-wait, and the drop gives its slot back
//! to the requests behind it.
//!
//! With the shared (Redis) store the queue stays local: each replica keeps a FIFO line
//! per set of buckets whose head asks Redis for a token, sleeps for the wait Redis
//! predicts, and asks again; Redis itself holds no reservations. See [`wait`].

use std::time::Duration;

use tokio::time::Instant;

use crate::error::ProxyError;
use crate::limiter::local::Turn;
use crate::limiter::redis::{Decision, RedisStoreError};
use crate::limiter::shared::Ticket;
use crate::limiter::{Demand, Denied, Grant, Limiter, LocalStore, Place, SharedStore};

/// A request the limiter let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// How long it waited.
    pub waited: Duration,
    /// Its place in the local store's line, to keep should it meet a 429 (`None` with
    /// the shared store, whose requests simply ask again).
    pub place: Option<Place>,
}

/// Waits until every demanded bucket grants a token, with whichever store the proxy
/// runs.
pub async fn wait(
    limiter: &Limiter,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> Result<Admitted, ProxyError> {
    match limiter {
        Limiter::Local(store) => wait_for_slot(store, demands, deadline, max_depth, operation).await,
        // Boxed: the Redis path's state is large, and the local path (the default) should
        // not carry its size in every queued request.
        Limiter::Shared(shared) => Box::pin(wait_shared(shared, None, demands, deadline, max_depth, operation))
            .await
            .map(|waited| Admitted { waited, place: None }),
    }
}

/// A request's place after an upstream 429: it goes again before the requests that
/// queued behind it.
#[derive(Debug)]
pub enum Requeued {
    /// A booked slot in the local store.
    Local(Grant),
    /// A booked slot in the Redis store's fallback (Redis is away).
    Fallback(Grant),
    /// In front of this replica's line for Redis.
    Shared(Ticket),
}

impl Requeued {
    /// Gives the place back without going (a replay that only wanted the pause).
    pub fn give_back(self, limiter: &Limiter) {
        match self {
            Requeued::Local(grant) | Requeued::Fallback(grant) => limiter.local().cancel(&grant),
            Requeued::Shared(place) => drop(place),
        }
    }
}

/// Waits again after an upstream 429, from the place the pause kept; returns how long
/// it waited.
pub async fn wait_requeued(
    limiter: &Limiter,
    requeued: Requeued,
    demands: &[Demand],
    deadline: Instant,
    operation: &'static str,
) -> Result<Duration, ProxyError> {
    let started = Instant::now();
    match (limiter, requeued) {
        (Limiter::Shared(shared), Requeued::Shared(place)) => {
            Box::pin(wait_shared(shared, Some(place), demands, deadline, u32::MAX, operation)).await
        }
        (Limiter::Shared(shared), Requeued::Fallback(grant)) => {
            wait_for_grant(shared.fallback(), grant, deadline, operation).await?;
            Box::pin(left_fallback(shared, demands)).await;
            Ok(started.elapsed())
        }
        (limiter, Requeued::Local(grant) | Requeued::Fallback(grant)) => {
            wait_for_grant(limiter.local(), grant, deadline, operation).await?;
            Ok(started.elapsed())
        }
        (Limiter::Local(store), Requeued::Shared(_)) => {
            wait_for_slot(store, demands, deadline, u32::MAX, operation).await.map(|a| a.waited)
        }
    }
}

/// Pauses the request's buckets until `until` for every replica (through Redis) and
/// in this replica's fallback, at the fallback's own windows, and keeps the request's
/// place in front: first in its Redis line, or first after the pause in the fallback
/// while Redis is away. `Err` when the pause ends after `deadline`, with the wait.
pub async fn pause_shared(
    shared: &SharedStore,
    demands: &[Demand],
    until: Instant,
    now: Instant,
    deadline: Instant,
) -> Result<Requeued, Denied> {
    let keys: Vec<_> = demands.iter().map(|d| d.key).collect();
    // While degraded the call would only wait out a timeout on the request's path.
    if !shared.is_degraded() {
        if let Err(e) = shared.redis().pause(&keys, until.saturating_duration_since(Instant::now())).await {
            shared.mark_down(&e);
            tracing::warn!(error = %e, "could not share an upstream pause through Redis");
        }
    }
    let degraded = shared.is_degraded();
    let local = shared.fallback_demands(demands);
    let head = local.as_ref().and_then(|local| {
        let fallback = shared.fallback();
        fallback.pause_and_requeue(local, None, until, now, if degraded { deadline } else { until }).ok()
    });
    if until > deadline {
        if let Some(head) = head {
            shared.fallback().cancel(&head);
        }
        return Err(Denied::Deadline { wait: until.saturating_duration_since(now) });
    }
    match head {
        Some(head) if degraded => Ok(Requeued::Fallback(head)),
        head => {
            if let Some(head) = head {
                shared.fallback().cancel(&head);
            }
            let line = shared.line(demands).expect("a limited request needs a bucket")?;
            Ok(Requeued::Shared(line.join_front()))
        }
    }
}

enum Failed {
    /// Redis failed this request (`Some`) or had failed another one (`None`).
    Redis(Option<RedisStoreError>),
    Refused(ProxyError),
}

/// The shared store's queue: a local line per set of buckets whose first place asks
/// Redis at the predicted time, or the fallback while Redis is away. A request moves
/// from one to the other when Redis goes away or comes back; it never fails only
/// because Redis is down.
async fn wait_shared(
    shared: &SharedStore,
    mut place: Option<Ticket>,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> Result<Duration, ProxyError> {
    let started = Instant::now();
    loop {
        if shared.is_degraded() {
            // Out of the line (and its head) first, so the fallback queue runs in parallel.
            drop(place.take());
            match wait_fallback(shared, demands, deadline, max_depth, operation).await {
                Ok(()) => return Ok(started.elapsed()),
                Err(Failed::Refused(e)) => return Err(e),
                Err(Failed::Redis(_)) => continue,
            }
        }
        let (place, ahead) = match place.take() {
            Some(place) => (place, 0),
            None => match shared.line(demands).expect("a limited request needs a bucket") {
                Ok(line) => line.join(),
                Err(denied) => return Err(denied_error(denied, operation)),
            },
        };
        match wait_in_line(shared, &place, ahead, demands, deadline, max_depth, operation, started).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(Failed::Redis(e)) => {
                if let Some(e) = e {
                    shared.mark_down(&e);
                }
            }
            Err(Failed::Refused(e)) => return Err(e),
        }
    }
}

/// Asks Redis, unless another request already found it down: the others in line then
/// go to the fallback at once instead of each waiting out a timeout.
async fn decide(shared: &SharedStore, demands: &[Demand], ahead: u32) -> Result<Decision, Failed> {
    if shared.is_degraded() {
        return Err(Failed::Redis(None));
    }
    shared.redis().decide(demands, ahead).await.map_err(|e| Failed::Redis(Some(e)))
}

#[allow(clippy::too_many_arguments)]
async fn wait_in_line(
    shared: &SharedStore,
    place: &Ticket,
    ahead: u32,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
    started: Instant,
) -> Result<(), Failed> {
    let timeout = |wait| Failed::Refused(ProxyError::QueueTimeout { operation, retry_after: wait });
    let mut predicted = Duration::ZERO;
    if ahead > 0 {
        // Behind others of this replica: refuse at once if this one could not go in time.
        match decide(shared, demands, ahead).await? {
            Decision::Wait(wait) if ahead >= max_depth => {
                return Err(Failed::Refused(ProxyError::QueueFull { operation, retry_after: wait }))
            }
            Decision::Wait(wait) if started + wait > deadline => return Err(timeout(wait)),
            Decision::Wait(wait) => predicted = wait,
            Decision::Granted => {}
        }
    }
    let mut late = 0;
    loop {
        // Other replicas took slots this one predicted: still in line at the deadline.
        if tokio::time::timeout_at(deadline, place.first()).await.is_err() {
            return Err(timeout(predicted.saturating_sub(started.elapsed()).max(Duration::from_secs(1))));
        }
        let asked = Instant::now();
        match decide(shared, demands, 0).await? {
            Decision::Granted => {
                shared.mirror(demands);
                let took = asked.elapsed();
                if took <= shared.late_after() {
                    return Ok(());
                }
                // Stamped in Redis up to `took` before it could leave: too close to a
                // grant another replica may get a window later. The token stays taken.
                // A second late grant in a row goes: Redis is then steadily slower than
                // the guard, and discarding every grant would only burn the quota.
                late += 1;
                if late >= 2 {
                    tracing::debug!(?took, "late redis grant kept: redis is slower than the window guard");
                    return Ok(());
                }
                tracing::debug!(?took, "late redis grant discarded");
            }
            Decision::Wait(wait) => {
                let at = Instant::now() + wait;
                if at > deadline {
                    return Err(timeout(wait));
                }
                tokio::time::sleep_until(at).await;
            }
        }
    }
}

/// Redis is away: this replica's share of the quota, from the local store, until the
/// slot comes (`Ok`) or Redis decides again first (`Err(Failed::Redis)`). A replica
/// whose share of a window is nothing waits for Redis.
async fn wait_fallback(
    shared: &SharedStore,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> Result<(), Failed> {
    let recovered = shared.recovered();
    tokio::pin!(recovered);
    recovered.as_mut().enable();
    if !shared.is_degraded() {
        return Err(Failed::Redis(None));
    }
    let Some(local) = shared.fallback_demands(demands) else {
        return tokio::select! {
            () = recovered => Err(Failed::Redis(None)),
            () = tokio::time::sleep_until(deadline) => Err(Failed::Refused(ProxyError::QueueTimeout {
                operation,
                retry_after: crate::limiter::shared::HEARTBEAT_EVERY,
            })),
        };
    };
    tokio::select! {
        biased;
        slot = wait_for_slot(shared.fallback(), &local, deadline, max_depth, operation) => {
            slot.map_err(Failed::Refused)?;
            Box::pin(left_fallback(shared, demands)).await;
            Ok(())
        }
        // Dropping the fallback's wait gives its reservation back.
        () = recovered => Err(Failed::Redis(None)),
    }
}

/// A request leaves on a fallback grant: Redis counts it, at once if it is back.
async fn left_fallback(shared: &SharedStore, demands: &[Demand]) {
    shared.taken_locally(demands);
    if !shared.is_degraded() {
        let keys: Vec<_> = demands.iter().map(|d| d.key).collect();
        if let Err(e) = shared.hand_over(Some(&keys)).await {
            shared.mark_down(&e);
        }
    }
}

/// Gives a reservation back if the waiting request is dropped before its slot.
struct CancelOnDrop<'a> {
    store: &'a LocalStore,
    grant: Option<Grant>,
}

impl CancelOnDrop<'_> {
    /// The grant went (or the store refused it): nothing to give back.
    fn disarm(&mut self) {
        self.grant = None;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            self.store.cancel(&grant);
        }
    }
}

/// Waits until every demanded bucket grants a token in the local store. The slot is
/// booked when this is called.
pub fn wait_for_slot<'a>(
    store: &'a LocalStore,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> SlotWait<impl std::future::Future<Output = Result<(), ProxyError>> + Send + 'a> {
    let now = Instant::now();
    let grant = match store.reserve(demands, now, deadline, max_depth) {
        Ok(grant) => grant,
        Err(denied) => return SlotWait::Done { answer: Some(Err(denied_error(denied, operation))) },
    };
    let place = Some(grant.place());
    if !grant.is_queued() {
        return SlotWait::Done { answer: Some(Ok(Admitted { waited: Duration::ZERO, place })) };
    }
    SlotWait::Waiting { wait: wait_for_grant(store, grant, deadline, operation), since: now, place }
}

pin_project_lite::pin_project! {
    /// [`wait_for_slot`]'s future: every queued request holds one, so it is a plain
    /// enum holding the wait once (an `async fn` kept the grant and the wait twice).
    #[project = SlotWaitProj]
    #[allow(missing_docs)]
    pub enum SlotWait<F> {
        Done { answer: Option<Result<Admitted, ProxyError>> },
        Waiting { #[pin] wait: F, since: Instant, place: Option<Place> },
    }
}

impl<F: std::future::Future<Output = Result<(), ProxyError>>> std::future::Future for SlotWait<F> {
    type Output = Result<Admitted, ProxyError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match self.project() {
            SlotWaitProj::Done { answer } => std::task::Poll::Ready(answer.take().expect("polled after completion")),
            SlotWaitProj::Waiting { wait, since, place } => {
                wait.poll(cx).map(|r| r.map(|()| Admitted { waited: since.elapsed(), place: *place }))
            }
        }
    }
}

/// The client's answer when the limiter will not queue a request.
pub fn denied_error(denied: Denied, operation: &'static str) -> ProxyError {
    match denied {
        Denied::QueueFull { wait } => ProxyError::QueueFull { operation, retry_after: wait },
        Denied::Deadline { wait } => ProxyError::QueueTimeout { operation, retry_after: wait },
        Denied::TooManyBuckets { wait } => ProxyError::TooManyBuckets { retry_after: wait },
    }
}

/// Waits for a grant's slot, following it wherever the store moves it; gives the grant
/// back if the request is dropped, and answers with the truthful wait if a pause moved
/// the slot past `deadline`.
pub fn wait_for_grant<'a>(
    store: &'a LocalStore,
    grant: Grant,
    deadline: Instant,
    operation: &'static str,
) -> impl std::future::Future<Output = Result<(), ProxyError>> + Send + 'a {
    // Not an `async fn`: it would keep its argument beside the guard, two grants in
    // every queued request.
    let queued = grant.is_queued();
    let mut guard = CancelOnDrop { store, grant: Some(grant) };
    async move {
        if !queued {
            guard.disarm();
            return Ok(());
        }
        loop {
            let grant = guard.grant.as_ref().expect("grant held until the slot");
            let until = match store.turn(grant, Instant::now()) {
                Turn::Go => break,
                Turn::At(slot) => slot,
                // The store refuses a waiter still behind at its deadline.
                Turn::Behind => deadline,
                Turn::Refused(retry_after) => {
                    guard.disarm();
                    return Err(ProxyError::QueueTimeout { operation, retry_after });
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = grant.woken() => {}
            }
        }
        guard.disarm();
        Ok(())
    }
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Account, BucketId, BucketKey, WindowSpec, Windows};

    fn demand() -> [Demand; 1] {
        [Demand {
            key: BucketKey { account: Account(7), bucket: BucketId::Endpoint(1) },
            windows: Windows::new(&[WindowSpec { limit: 1, period: 1_000_000 }]),
        }]
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_its_slot_in_order() {
        let store = LocalStore::new();
        let d = demand();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap().waited, Duration::ZERO);
        let waited = wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap().waited;
        assert_eq!(waited, Duration::from_secs(1));
        let err = wait_for_slot(&store, &d, Instant::now(), 10, "op").await.unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
        assert_eq!(err.code(), "proxy_queue_timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_waiter_frees_its_place() {
        let store = LocalStore::new();
        let d = demand();
        let deadline = Instant::now() + Duration::from_secs(10);
        wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap();
        let start = Instant::now();
        // The waiter is dropped half-way through its wait (the client hung up).
        let dropped =
            tokio::time::timeout(Duration::from_millis(500), wait_for_slot(&store, &d, deadline, 10, "op")).await;
        assert!(dropped.is_err());
        assert_eq!(store.queued(&d[0].key), 0);
        // The next request takes the slot the dropped one had reserved.
        wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    /// An upstream 429 at 0.5 s pauses the bucket until 3 s: no request of the bucket
    /// starts before 3 s, the one that met the 429 goes first, the queue keeps its
    /// order, and no window ever holds more than its limit.
    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_queued_request_and_keeps_order() {
        let store = std::sync::Arc::new(LocalStore::new());
        let d = demand();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(60);
        let starts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        // The first request leaves at once and meets the 429.
        let first = wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap();
        let mut tasks = Vec::new();
        for n in 1..=4u32 {
            let (store, starts, d) = (store.clone(), starts.clone(), d);
            tasks.push(tokio::spawn(async move {
                wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap();
                starts.lock().unwrap().push((n, Instant::now()));
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        let until = t0 + Duration::from_secs(3);
        let head = store.pause_and_requeue(&d, first.place, until, Instant::now(), deadline).unwrap();
        let head_task = {
            let (store, starts) = (store.clone(), starts.clone());
            tokio::spawn(async move {
                wait_for_grant(&store, head, deadline, "op").await.unwrap();
                starts.lock().unwrap().push((0, Instant::now()));
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        head_task.await.unwrap();
        let starts = starts.lock().unwrap().clone();
        let order: Vec<u32> = starts.iter().map(|(n, _)| *n).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        let secs: Vec<u64> = starts.iter().map(|(_, at)| at.duration_since(t0).as_secs()).collect();
        assert_eq!(secs, [3, 4, 5, 6, 7], "one per second, none before the pause ends");
    }

    #[tokio::test(start_paused = true)]
    async fn moved_past_deadline_is_refused_truthfully() {
        let store = LocalStore::new();
        let d = demand();
        let t0 = Instant::now();
        let first = wait_for_slot(&store, &d, t0 + Duration::from_secs(60), 10, "op").await.unwrap();
        let short = t0 + Duration::from_secs(2);
        let waiter = wait_for_slot(&store, &d, short, 10, "op");
        tokio::pin!(waiter);
        assert!(futures_poll(&mut waiter).await.is_none());
        let far = t0 + Duration::from_secs(60);
        store.pause_and_requeue(&d, first.place, t0 + Duration::from_secs(10), t0, far).unwrap();
        let err = waiter.await.unwrap_err();
        assert_eq!(err.code(), "proxy_queue_timeout");
        // Told at once, with its new slot (11 s: after the requeued head at 10 s).
        assert_eq!(Instant::now(), t0);
        assert_eq!(err.retry_after(), Some(Duration::from_secs(11)));
        assert_eq!(store.queued(&d[0].key), 1, "only the requeued head is left");
    }

    /// Polls a future once.
    async fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = f => Some(out),
            () = std::future::ready(()) => None,
        }
    }
}

#[cfg(test)]
mod departures {
    //! The scenarios, driven through the real store and queue.
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::limiter::{Account, BucketId, BucketKey, WindowSpec, Windows};

    type Log = Arc<Mutex<Vec<(&'static str, Duration)>>>;

    thread_local! {
        /// Each request's place in line, by name, to requeue it after a 429 (per test:
        /// each runs on its own thread).
        static PLACES: std::cell::RefCell<Vec<(&'static str, Place)>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn place_of(name: &str) -> Option<Place> {
        PLACES.with_borrow(|p| p.iter().rev().find(|(n, _)| *n == name).map(|(_, p)| *p))
    }

    fn bucket(id: BucketId, specs: &[(u32, u64)]) -> Demand {
        let specs: Vec<WindowSpec> = specs.iter().map(|&(limit, ms)| WindowSpec { limit, period: ms * 1000 }).collect();
        Demand { key: BucketKey { account: Account(9), bucket: id }, windows: Windows::new(&specs) }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Starts a request now; it records when it leaves, or gives up after `patience`.
    fn request(
        store: &Arc<LocalStore>,
        demands: &[Demand],
        name: &'static str,
        patience: Option<Duration>,
        t0: Instant,
        log: &Log,
    ) -> tokio::task::JoinHandle<()> {
        let (store, demands, log) = (store.clone(), demands.to_vec(), log.clone());
        let deadline = Instant::now() + Duration::from_secs(600);
        tokio::spawn(async move {
            let wait = wait_for_slot(&store, &demands, deadline, 1000, "op");
            let left = match patience {
                Some(p) => tokio::time::timeout(p, wait).await.ok(),
                None => Some(wait.await),
            };
            if let Some(Ok(admitted)) = left {
                log.lock().unwrap().push((name, t0.elapsed()));
                PLACES.with_borrow_mut(|p| p.push((name, admitted.place.unwrap())));
            }
        })
    }

    /// A 429 for a request that left: its bucket pauses and it waits again at the head.
    fn requeue(
        store: &Arc<LocalStore>,
        demands: &[Demand],
        name: &'static str,
        retry: Duration,
        t0: Instant,
        log: &Log,
    ) {
        let now = Instant::now();
        let far = now + Duration::from_secs(600);
        let first = name.split(' ').next().unwrap();
        let grant = store.pause_and_requeue(demands, place_of(first), now + retry, now, far).unwrap();
        let (store, log) = (store.clone(), log.clone());
        tokio::spawn(async move {
            wait_for_grant(&store, grant, far, "op").await.unwrap();
            log.lock().unwrap().push((name, t0.elapsed()));
        });
    }

    async fn at(t0: Instant, when: Duration) {
        tokio::time::sleep_until(t0 + when).await;
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }

    fn left(log: &Log) -> Vec<(&'static str, Duration)> {
        let mut l = log.lock().unwrap().clone();
        l.sort_by_key(|(_, t)| *t);
        l
    }

    /// Item 1: with 1 per 1.05 s, B and C give up, A meets a 429 with Retry-After 1:
    /// everyone leaves at their current slot, never at an old one.
    #[tokio::test(start_paused = true)]
    async fn waiters_leave_at_their_current_slot_after_cancels_and_a_pause() {
        let store = Arc::new(LocalStore::new());
        let d = [bucket(BucketId::Endpoint(1), &[(1, 1050)])];
        let (t0, log): (Instant, Log) = (Instant::now(), Log::default());
        request(&store, &d, "A", None, t0, &log);
        at(t0, ms(0)).await;
        for (name, patience) in [("B", Some(ms(100))), ("C", Some(ms(100))), ("D", None), ("E", None)] {
            request(&store, &d, name, patience, t0, &log);
            at(t0, ms(0)).await;
        }
        at(t0, ms(300)).await;
        requeue(&store, &d, "A again", ms(1000), t0, &log);
        at(t0, ms(3200)).await;
        request(&store, &d, "F", None, t0, &log);
        at(t0, ms(10_000)).await;
        let left = left(&log);
        assert_eq!(left, [("A", ms(0)), ("A again", ms(1300)), ("D", ms(2350)), ("E", ms(3400)), ("F", ms(4450))]);
    }

    /// Item 2 (the starvation scenario in small): a cancelled slot goes to the request
    /// behind it, and a new arrival books right after.
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_slot_is_reused() {
        let store = Arc::new(LocalStore::new());
        let d = [bucket(BucketId::Endpoint(1), &[(1, 1000)])];
        let (t0, log): (Instant, Log) = (Instant::now(), Log::default());
        for (name, patience) in [("A", None), ("B", Some(ms(500))), ("C", None)] {
            request(&store, &d, name, patience, t0, &log);
            at(t0, ms(0)).await;
        }
        at(t0, ms(600)).await;
        request(&store, &d, "D", None, t0, &log);
        at(t0, ms(10_000)).await;
        assert_eq!(left(&log), [("A", ms(0)), ("C", ms(1000)), ("D", ms(2000))]);
    }

    /// Item 3: 15 `include=lists` requests take the condition's 1/s; a plain request of
    /// the same endpoint, arriving at 0.1 s, leaves at once.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_only_for_its_own_buckets() {
        let store = Arc::new(LocalStore::new());
        let endpoint = bucket(BucketId::Endpoint(4), &[(10, 1050), (150, 60_250)]);
        let lists = bucket(BucketId::Condition(4, 0), &[(1, 1050), (15, 60_250)]);
        let (t0, log): (Instant, Log) = (Instant::now(), Log::default());
        for _ in 0..15 {
            request(&store, &[endpoint, lists], "lists", None, t0, &log);
        }
        at(t0, ms(100)).await;
        request(&store, &[endpoint], "plain", None, t0, &log);
        at(t0, ms(100_000)).await;
        let left = left(&log);
        assert_eq!(left.iter().find(|(n, _)| *n == "plain").map(|(_, t)| *t), Some(ms(100)));
        let lists: Vec<Duration> = left.iter().filter(|(n, _)| *n == "lists").map(|(_, t)| *t).collect();
        assert_eq!(lists, (0..15).map(|i| ms(1050 * i)).collect::<Vec<_>>());
    }

    /// Item 7: two requests meet 429s one after the other; both go again before the
    /// requests that were queued behind them, in their original order.
    #[tokio::test(start_paused = true)]
    async fn requeued_heads_keep_their_places() {
        let store = Arc::new(LocalStore::new());
        let d = [bucket(BucketId::Endpoint(1), &[(2, 1000)])];
        let (t0, log): (Instant, Log) = (Instant::now(), Log::default());
        for name in ["A", "B", "C", "D"] {
            request(&store, &d, name, None, t0, &log);
            at(t0, ms(0)).await;
        }
        at(t0, ms(300)).await;
        requeue(&store, &d, "A again", ms(1000), t0, &log);
        at(t0, ms(350)).await;
        requeue(&store, &d, "B again", ms(1000), t0, &log);
        at(t0, ms(10_000)).await;
        assert_eq!(
            left(&log),
            [
                ("A", ms(0)),
                ("B", ms(0)),
                ("A again", ms(1350)),
                ("B again", ms(1350)),
                ("C", ms(2350)),
                ("D", ms(2350))
            ]
        );
    }
}
