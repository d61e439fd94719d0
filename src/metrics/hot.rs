//! Handles on the series every request touches, resolved once per thread and
//! operation. A `Family::get_or_create` takes the family's lock and hashes the whole
//! label set (SipHash over each string) on every call; the serving threads would do
//! that three or four times per request and contend on the lock. A handle shares the
//! series' atomics, so counting through it is the same series `/metrics` encodes.
//!
//! Only families whose series are never removed use it (a removed series would keep
//! counting in a handle nobody encodes).

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The number of [`super::RequestOutcome`] variants.
const OUTCOMES: usize = 6;

/// More than any config's operations times a few `Metrics` (tests make many): past
/// it the cache starts over rather than grow.
const MAX_ENTRIES: usize = 4096;

/// One `(operation, tier)`'s handles, each made on first use (so no series appears
/// in `/metrics` before it has counted something).
#[derive(Default)]
pub(super) struct Handles {
    /// `klaviyo_proxy_requests_total`, by outcome.
    pub requests: [OnceCell<Counter>; OUTCOMES],
    /// `klaviyo_proxy_upstream_latency_seconds`.
    pub latency: OnceCell<Histogram>,
    /// `klaviyo_proxy_queue_wait_seconds`.
    pub queue_wait: OnceCell<Histogram>,
    /// `klaviyo_proxy_upstream_responses_total`, by status (few per operation).
    responses: RefCell<Vec<(u16, Counter)>>,
}

impl Handles {
    /// The response counter for `status`, made by `make` the first time.
    pub fn response(&self, status: u16, make: impl FnOnce() -> Counter) -> Counter {
        let mut responses = self.responses.borrow_mut();
        if let Some((_, c)) = responses.iter().find(|(s, _)| *s == status) {
            return c.clone();
        }
        let c = make();
        responses.push((status, c.clone()));
        c
    }
}

/// Which `Metrics`, operation and tier: labels are `&'static str`, so their addresses
/// are enough (two copies of one text only make two entries for one series).
type Key = (u64, usize, usize, usize);

thread_local! {
    // foldhash, not SipHash: the keys are our own ids and addresses (no client picks
    // them), and this is looked up on every request.
    static HANDLES: RefCell<foldhash::HashMap<Key, Rc<Handles>>> = RefCell::new(HashMap::default());
}

/// A fresh id for a `Metrics`.
pub(super) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `f` with this thread's handles for `(metrics, operation, tier)`.
pub(super) fn with<R>(metrics: u64, operation: &'static str, tier: &'static str, f: impl FnOnce(&Handles) -> R) -> R {
    let key = (metrics, operation.as_ptr() as usize, operation.len(), tier.as_ptr() as usize);
    let handles = HANDLES.with_borrow_mut(|map| {
        if !map.contains_key(&key) && map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.entry(key).or_default().clone()
    });
    f(&handles)
}

#[cfg(test)]
mod tests {
    use super::super::{Metrics, RequestOutcome};

    fn line<'a>(text: &'a str, needles: &[&str]) -> Option<&'a str> {
        text.lines().find(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
    }

    #[test]
    fn handles_count_in_the_encoded_series_of_their_own_metrics() {
        let (a, b) = (Metrics::default(), Metrics::default());
        for _ in 0..3 {
            a.request("get_accounts", "XS", RequestOutcome::Forwarded);
        }
        a.request("get_accounts", "XS", RequestOutcome::Rejected);
        b.request("get_accounts", "XS", RequestOutcome::Forwarded);
        let store = crate::limiter::LocalStore::new();
        let text = a.encode(&store);
        let forwarded = line(&text, &["requests_total", "get_accounts", "forwarded"]);
        assert!(forwarded.is_some_and(|l| l.ends_with(" 3")), "{text}");
        assert!(line(&text, &["requests_total", "get_accounts", "rejected"]).is_some_and(|l| l.ends_with(" 1")));
        assert!(line(&text, &["requests_total", "queued"]).is_none(), "no series before it counts: {text}");
        let text = b.encode(&store);
        assert!(line(&text, &["requests_total", "get_accounts", "forwarded"]).is_some_and(|l| l.ends_with(" 1")));
    }

    #[test]
    fn the_outcome_count_matches_the_enum() {
        assert_eq!(RequestOutcome::Challenged as usize + 1, super::OUTCOMES);
    }
}
