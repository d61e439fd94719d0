//! Waiting for a token. Each bucket's queue is the sequence of its reservations: a
//! request learns its slot on arrival, is refused at once when that slot is past its
//! deadline or the queue is full, and otherwise sleeps until the slot. A request whose
//! client hangs up is dropped mid-sleep, and the drop gives its tokens back.
//!
//! With the shared (Redis) store the queue stays local: each replica keeps a FIFO per
//! bucket whose head asks Redis for a token, sleeps for the wait Redis predicts, and
//! asks again; Redis itself holds no reservations. See [`wait`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ProxyError;
use crate::limiter::redis::{Decision, RedisStoreError};
use crate::limiter::shared::Gate;
use crate::limiter::{Demand, Denied, Grant, Limiter, LocalStore, SharedStore};

/// Waits until every demanded bucket grants a token, with whichever store the proxy
/// runs; returns how long it waited.
pub async fn wait(
    limiter: &Limiter,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> Result<Duration, ProxyError> {
    match limiter {
        Limiter::Local(store) => wait_for_slot(store, demands, deadline, max_depth, operation).await,
        Limiter::Shared(shared) => wait_shared(shared, demands, deadline, max_depth, operation).await,
    }
}

/// Counts a request in its gate's line for as long as it waits.
struct InLine<'a>(&'a Gate);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The shared store's queue: a local FIFO per bucket whose head retries Redis at the
/// predicted time. Any Redis failure sends the request (and the replica) to the local
/// fallback store; a request never fails only because Redis is down.
async fn wait_shared(
    shared: &SharedStore,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> Result<Duration, ProxyError> {
    let started = Instant::now();
    let Some(gate) = shared.gate(demands).filter(|_| !shared.is_degraded()) else {
        return wait_fallback(shared, demands, deadline, max_depth, operation, started).await;
    };
    match wait_in_line(shared, &gate, demands, deadline, max_depth, operation, started).await {
        Ok(waited) => Ok(waited),
        // Out of the line (and its head) first, so the fallback queue runs in parallel.
        Err(Failed::Redis(e)) => {
            if let Some(e) = e {
                shared.mark_down(&e);
            }
            drop(gate);
            wait_fallback(shared, demands, deadline, max_depth, operation, started).await
        }
        Err(Failed::Refused(e)) => Err(e),
    }
}

enum Failed {
    /// Redis failed this request (`Some`) or had failed another one (`None`).
    Redis(Option<RedisStoreError>),
    Refused(ProxyError),
}

/// Asks Redis, unless another request already found it down: the others in line then
/// go to the fallback at once instead of each waiting out a timeout.
async fn decide(shared: &SharedStore, demands: &[Demand], ahead: u32) -> Result<Decision, Failed> {
    if shared.is_degraded() {
        return Err(Failed::Redis(None));
    }
    shared.redis().decide(demands, ahead).await.map_err(|e| Failed::Redis(Some(e)))
}

async fn wait_in_line(
    shared: &SharedStore,
    gate: &Gate,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
    started: Instant,
) -> Result<Duration, Failed> {
    let ahead = gate.waiting.fetch_add(1, Ordering::AcqRel);
    let _in_line = InLine(gate);
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
    // Other replicas took slots this one predicted: still in line at the deadline.
    let Ok(_head) = tokio::time::timeout_at(deadline, gate.head.lock()).await else {
        return Err(timeout(predicted.saturating_sub(started.elapsed()).max(Duration::from_secs(1))));
    };
    loop {
        match decide(shared, demands, 0).await? {
            Decision::Granted => {
                shared.mirror(demands);
                return Ok(started.elapsed());
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

/// Redis is away: this replica's share of the quota, from the local store.
async fn wait_fallback(
    shared: &SharedStore,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
    started: Instant,
) -> Result<Duration, ProxyError> {
    let local = shared.fallback_demands(demands);
    wait_for_slot(shared.fallback(), &local, deadline, max_depth, operation).await?;
    shared.taken_locally(demands);
    Ok(started.elapsed())
}

/// Gives a reservation back if the waiting request is dropped before its slot.
struct CancelOnDrop<'a> {
    store: &'a LocalStore,
    grant: Option<Grant>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            self.store.cancel(&grant);
        }
    }
}

/// Waits until every demanded bucket grants a token; returns how long it waited.
pub async fn wait_for_slot(
    store: &LocalStore,
    demands: &[Demand],
    deadline: Instant,
    max_depth: u32,
    operation: &'static str,
) -> Result<Duration, ProxyError> {
    let now = Instant::now();
    let grant = store.reserve(demands, now, deadline, max_depth).map_err(|denied| match denied {
        Denied::QueueFull { wait } => ProxyError::QueueFull { operation, retry_after: wait },
        Denied::Deadline { wait } => ProxyError::QueueTimeout { operation, retry_after: wait },
    })?;
    if !grant.is_queued() {
        return Ok(Duration::ZERO);
    }
    let at = grant.at;
    let mut guard = CancelOnDrop { store, grant: Some(grant) };
    tokio::time::sleep_until(at).await;
    let grant = guard.grant.take().expect("grant held until the slot");
    store.start(&grant);
    Ok(now.elapsed())
}

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
        assert_eq!(wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap(), Duration::ZERO);
        let waited = wait_for_slot(&store, &d, deadline, 10, "op").await.unwrap();
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
}
