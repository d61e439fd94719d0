use std::sync::atomic::AtomicUsize;

use http::HeaderValue;
use serde_json::{json, Value};

use super::*;

/// A stand-in for Klaviyo's bulk endpoint: records every job, refuses jobs holding a
/// `poison` event (with or without a pointer), and fails the first `fail_first` calls.
#[derive(Default)]
struct Stub {
    jobs: Mutex<Vec<Vec<String>>>,
    pointers: bool,
    fail_first: AtomicUsize,
    /// Answers every job 503, as Klaviyo on a bad day.
    server_error: bool,
}

impl Deliver for Stub {
    async fn deliver(self: Arc<Self>, _group: &Group, body: Bytes) -> Result<Delivery, ProxyError> {
        if self.fail_first.load(Ordering::Acquire) > 0 {
            self.fail_first.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::UpstreamUnreachable);
        }
        let doc: Value = serde_json::from_slice(&body).expect("jobs are JSON");
        if self.server_error {
            lock(&self.jobs).push(Vec::new());
            return Ok(Delivery { status: StatusCode::SERVICE_UNAVAILABLE, body: Bytes::new() });
        }
        let entries = doc.pointer("/data/attributes/events-bulk-create/data").unwrap().as_array().unwrap().clone();
        let ids: Vec<String> = entries
            .iter()
            .map(|e| e.pointer("/attributes/events/data/0/attributes/unique_id").unwrap().as_str().unwrap().to_string())
            .collect();
        lock(&self.jobs).push(ids.clone());
        let poisoned: Vec<usize> =
            ids.iter().enumerate().filter(|(_, id)| id.starts_with("poison")).map(|(i, _)| i).collect();
        if poisoned.is_empty() {
            return Ok(Delivery { status: StatusCode::ACCEPTED, body: Bytes::new() });
        }
        let errors: Vec<Value> = poisoned
            .iter()
            .map(|i| {
                let pointer = if self.pointers {
                    json!(format!("/data/attributes/events-bulk-create/data/{i}/attributes/events/data/0/attributes/value_currency"))
                } else {
                    json!(null)
                };
                json!({"status": 400, "code": "invalid", "detail": "bad currency", "source": {"pointer": pointer}})
            })
            .collect();
        Ok(Delivery { status: StatusCode::BAD_REQUEST, body: Bytes::from(json!({"errors": errors}).to_string()) })
    }
}

fn event(email: &str, unique_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"data": {"type": "event", "attributes": {
        "properties": {"n": 1},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed"}}},
        "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
        "unique_id": unique_id}}}))
    .unwrap()
}

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Klaviyo-API-Key pk_test"));
    h.insert("revision", HeaderValue::from_static("2026-07-15"));
    h
}

struct Fixture {
    coalescer: Arc<Coalescer>,
    spool: Spool,
    dir: std::path::PathBuf,
}

impl Fixture {
    fn cleanup(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(linger_ms: u64) -> Fixture {
    let dir = std::env::temp_dir().join(format!("kp-coalescer-{}", fastrand::u64(..)));
    let spool = Spool::open(&dir.join("spool.redb")).unwrap();
    let settings =
        Settings { linger: Duration::from_millis(linger_ms), max_pending: 100_000, max_lag: Duration::from_secs(60) };
    let coalescer = Arc::new(
        Coalescer::open(&dir.join("events.redb"), spool.clone(), settings, CoalesceMetrics::detached()).unwrap(),
    );
    Fixture { coalescer, spool, dir }
}

/// Accepts these events concurrently (so they share commits, as under load).
async fn accept_all(c: &Arc<Coalescer>, ids: impl IntoIterator<Item = String>) {
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let c = c.clone();
            tokio::spawn(async move { c.accept(&headers(), &event("a@example.com", &id)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Accepts events `e0`, `e1`, … one after the other.
async fn accept_in_turn(c: &Coalescer, n: usize) {
    for i in 0..n {
        c.accept(&headers(), &event("a@example.com", &format!("e{i}"))).await.unwrap();
    }
}

/// Waits (bounded) until every accepted event is delivered or dead-lettered.
async fn settled(c: &Coalescer) {
    for _ in 0..1000 {
        if c.pending() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} events still pending", c.pending());
}

#[tokio::test]
async fn jobs_hold_at_most_1000_events_in_order_and_every_event_once() {
    let f = fixture(50);
    let stub = Arc::new(Stub::default());
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    accept_all(&f.coalescer, (0..2500).map(|i| format!("e{i:05}"))).await;
    settled(&f.coalescer).await;
    batcher.abort();
    let jobs = lock(&stub.jobs).clone();
    assert!(
        jobs.iter().all(|j| !j.is_empty() && j.len() <= MAX_EVENTS),
        "{:?}",
        jobs.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let mut all: Vec<String> = jobs.concat();
    assert_eq!(all.len(), 2500);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 2500, "an event went twice");
    assert_eq!(f.coalescer.metrics.count("delivered"), 2500);
    f.cleanup();
}

#[tokio::test]
async fn equal_unique_ids_of_one_profile_and_metric_never_share_a_job() {
    let f = fixture(20);
    for _ in 0..3 {
        f.coalescer.accept(&headers(), &event("a@example.com", "same")).await.unwrap();
    }
    // Another profile may share the id in the same job.
    f.coalescer.accept(&headers(), &event("b@example.com", "same")).await.unwrap();
    let stub = Arc::new(Stub::default());
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    settled(&f.coalescer).await;
    batcher.abort();
    let jobs = lock(&stub.jobs).clone();
    assert_eq!(jobs.iter().map(Vec::len).sum::<usize>(), 4);
    assert_eq!(jobs.len(), 3, "three equal events need three jobs: {jobs:?}");
    f.cleanup();
}

#[tokio::test]
async fn a_poison_event_named_by_pointer_goes_to_the_dead_letters_alone() {
    let f = fixture(20);
    accept_all(&f.coalescer, (0..300).map(|i| if i == 137 { "poison-137".to_string() } else { format!("ok-{i}") }))
        .await;
    let stub = Arc::new(Stub { pointers: true, ..Stub::default() });
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    settled(&f.coalescer).await;
    batcher.abort();
    assert_eq!(f.coalescer.metrics.count("delivered"), 299);
    assert_eq!(f.coalescer.metrics.count("dead_lettered"), 1);
    assert_eq!(f.coalescer.metrics.splits.get(), 0);
    let dead = f.spool.list_dead(10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].unique_id.as_deref(), Some("poison-137"));
    assert_eq!(dead[0].operation, "create_event");
    assert!(dead[0].last_error.as_deref().unwrap().contains("bad currency"));
    f.cleanup();
}

#[tokio::test]
async fn without_a_pointer_the_job_is_halved_down_to_the_bad_event() {
    let f = fixture(20);
    accept_all(&f.coalescer, (0..1000).map(|i| if i == 601 { "poison-601".to_string() } else { format!("ok-{i}") }))
        .await;
    let stub = Arc::new(Stub::default());
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    settled(&f.coalescer).await;
    batcher.abort();
    assert_eq!(f.coalescer.metrics.count("delivered"), 999);
    assert_eq!(f.coalescer.metrics.count("dead_lettered"), 1);
    let splits = f.coalescer.metrics.splits.get();
    assert!((1..=10).contains(&splits), "log2(1000) splits at most, got {splits}");
    f.cleanup();
}

#[tokio::test]
async fn undelivered_jobs_wait_and_go_again() {
    let f = fixture(20);
    accept_in_turn(&f.coalescer, 10).await;
    let stub = Arc::new(Stub { fail_first: AtomicUsize::new(3), ..Stub::default() });
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    settled(&f.coalescer).await;
    batcher.abort();
    assert_eq!(lock(&stub.jobs).concat().len(), 10);
    assert_eq!(f.coalescer.metrics.count("delivered"), 10);
    f.cleanup();
}

#[tokio::test]
async fn a_job_that_keeps_failing_goes_to_the_dead_letters_by_the_spools_rules() {
    let f = fixture(20);
    f.spool.set_limits(spool::SpoolLimits { max_attempts: 3, ..spool::SpoolLimits::default() });
    accept_in_turn(&f.coalescer, 5).await;
    let stub = Arc::new(Stub { server_error: true, ..Stub::default() });
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    settled(&f.coalescer).await;
    batcher.abort();
    assert_eq!(lock(&stub.jobs).len(), 3, "max_attempts tries, then no more");
    assert_eq!(f.coalescer.metrics.count("dead_lettered"), 5);
    let dead = f.spool.list_dead(10).unwrap();
    assert_eq!(dead.len(), 5);
    assert!(dead.iter().all(|d| d.last_error.as_deref().is_some_and(|e| e.contains("503"))), "{dead:?}");
    f.cleanup();
}

#[tokio::test]
async fn failures_that_are_not_the_jobs_fault_do_not_count_as_attempts() {
    let f = fixture(20);
    f.spool.set_limits(spool::SpoolLimits { max_attempts: 2, ..spool::SpoolLimits::default() });
    accept_in_turn(&f.coalescer, 5).await;
    // Klaviyo unreachable four times (as while the breaker is open), then back.
    let stub = Arc::new(Stub { fail_first: AtomicUsize::new(4), ..Stub::default() });
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    settled(&f.coalescer).await;
    batcher.abort();
    assert_eq!(f.coalescer.metrics.count("delivered"), 5);
    assert_eq!(f.coalescer.metrics.count("dead_lettered"), 0);
    f.cleanup();
}

#[tokio::test]
async fn an_event_the_dead_letters_cannot_take_backs_off_and_is_kept() {
    let dir = std::env::temp_dir().join(format!("kp-coalescer-{}", fastrand::u64(..)));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opener = crate::durable::testing::flaky_opener(fail.clone());
    let spool =
        Spool::with_opener(&dir.join("spool.redb"), spool::SpoolLimits::default(), opener, Duration::ZERO).unwrap();
    let settings =
        Settings { linger: Duration::from_millis(20), max_pending: 100_000, max_lag: Duration::from_secs(60) };
    let coalescer = Arc::new(
        Coalescer::open(&dir.join("events.redb"), spool.clone(), settings, CoalesceMetrics::detached()).unwrap(),
    );
    let f = Fixture { coalescer, spool, dir };
    // The dead letters' disk is full.
    fail.store(true, Ordering::SeqCst);
    accept_all(&f.coalescer, ["ok-1".to_string(), "poison-2".to_string()]).await;
    let stub = Arc::new(Stub { pointers: true, ..Stub::default() });
    let batcher = tokio::spawn(f.coalescer.clone().run(stub.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!batcher.is_finished(), "the batcher stopped");
    assert_eq!(f.coalescer.pending(), 1, "the poison event is kept while the spool is full");
    let jobs = lock(&stub.jobs).len();
    assert!(jobs <= 6, "a kept event backs off between jobs: {jobs} jobs in 1.5 s");
    fail.store(false, Ordering::SeqCst);
    settled(&f.coalescer).await;
    batcher.abort();
    assert_eq!(f.spool.list_dead(10).unwrap().len(), 1);
    f.cleanup();
}

#[tokio::test]
async fn invalid_events_are_refused_and_nothing_is_stored() {
    let f = fixture(20);
    let err = f.coalescer.accept(&headers(), br#"{"data":{"type":"event","attributes":{}}}"#).await.unwrap_err();
    assert!(matches!(err, ProxyError::InvalidEvent { ref pointer, .. } if pointer == "/data/attributes/properties"));
    assert_eq!(f.coalescer.pending(), 0);
    f.cleanup();
}

#[tokio::test]
async fn an_idempotency_key_seen_before_answers_the_same_id_and_stores_nothing() {
    let f = fixture(20);
    let mut h = headers();
    h.insert(IDEMPOTENCY_HEADER, HeaderValue::from_static("retry-1"));
    let first = f.coalescer.accept(&h, &event("a@example.com", "x")).await.unwrap();
    let again = f.coalescer.accept(&h, &event("a@example.com", "y")).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(f.coalescer.pending(), 1);
    // Another credential's equal key is another request.
    h.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Klaviyo-API-Key pk_other"));
    assert_ne!(f.coalescer.accept(&h, &event("a@example.com", "z")).await.unwrap(), first);
    f.cleanup();
}

#[tokio::test]
async fn a_restart_delivers_what_was_accepted_before_it() {
    let f = fixture(20);
    accept_in_turn(&f.coalescer, 5).await;
    let path = f.dir.join("events.redb");
    let Fixture { coalescer, spool, dir } = f;
    drop(coalescer);
    // The old writer thread lets go of the file once its last sender is gone.
    let mut reopened = None;
    for _ in 0..500 {
        let settings =
            Settings { linger: Duration::from_millis(20), max_pending: 10, max_lag: Duration::from_secs(60) };
        if let Ok(c) = Coalescer::open(&path, spool.clone(), settings, CoalesceMetrics::detached()) {
            reopened = Some(Arc::new(c));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let coalescer = reopened.expect("reopens");
    assert_eq!(coalescer.pending(), 5);
    let stub = Arc::new(Stub::default());
    let batcher = tokio::spawn(coalescer.clone().run(stub.clone()));
    settled(&coalescer).await;
    batcher.abort();
    assert_eq!(lock(&stub.jobs).concat().len(), 5);
    let _ = std::fs::remove_dir_all(dir);
}
