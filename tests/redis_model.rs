//! Model-based departure tests of the shared store, driven through `queue::wait` as
//! the proxy calls it: random arrivals on several replicas, one- and two-bucket
//! demands, clients that hang up, upstream 429s with random `Retry-After` (the request
//! requeued at its head). Each records the instants requests actually leave and
//! checks that no interval of a window holds more than its limit, across replicas.

mod redis_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use klaviyo_proxy::limiter::redis::{RedisStore, RedisStoreError};
use klaviyo_proxy::limiter::{Account, BucketId, BucketKey, Demand, Limiter, SharedStore, WindowSpec, Windows};
use klaviyo_proxy::queue;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis_support::RedisServer;
use tokio::time::Instant;

/// One request: after `gap` ms, on `replica`, needing the endpoint bucket (`both`:
/// and the conditional one); its client hangs up after `cancel` ms; it meets a 429
/// with this `Retry-After` (ms) the first time it leaves.
#[derive(Debug, Clone)]
struct Arrival {
    gap: u64,
    replica: usize,
    both: bool,
    cancel: Option<u64>,
    retry_after: Option<u64>,
}

fn arrivals(n: usize, max_gap: u64, pauses: f64) -> impl Strategy<Value = Vec<Arrival>> {
    proptest::collection::vec(
        (
            0..max_gap,
            0usize..3,
            any::<bool>(),
            proptest::option::weighted(0.15, 1u64..3_000),
            proptest::option::weighted(pauses, 50u64..1_500),
        )
            .prop_map(|(gap, replica, both, cancel, retry_after)| Arrival {
                gap,
                replica,
                both,
                cancel,
                retry_after,
            }),
        1..n,
    )
}

fn demands(account: u128, own: WindowSpec, cond: WindowSpec) -> [Demand; 2] {
    let key = |bucket| BucketKey { account: Account(account), bucket };
    [
        Demand { key: key(BucketId::Endpoint(1)), windows: Windows::new(&[own]) },
        Demand { key: key(BucketId::Condition(1, 0)), windows: Windows::new(&[cond]) },
    ]
}

fn shared(l: &Limiter) -> &SharedStore {
    match l {
        Limiter::Shared(s) => s,
        Limiter::Local(_) => unreachable!(),
    }
}

/// Departures: (needed the conditional bucket too, when).
type Log = Arc<Mutex<Vec<(bool, Instant)>>>;

/// Runs the arrivals against `replicas` and returns when each request left.
async fn drive(replicas: &[Arc<Limiter>], d: [Demand; 2], arrivals: &[Arrival], far: Instant) -> Vec<(bool, Instant)> {
    let log: Log = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for a in arrivals {
        tokio::time::sleep(Duration::from_millis(a.gap)).await;
        let (l, log, a) = (replicas[a.replica % replicas.len()].clone(), log.clone(), a.clone());
        let asked: Vec<Demand> = if a.both { d.to_vec() } else { vec![d[0]] };
        tasks.spawn(async move {
            let work = async {
                if queue::wait(&l, &asked, far, u32::MAX, "op").await.is_err() {
                    return;
                }
                log.lock().unwrap().push((a.both, Instant::now()));
                let Some(ms) = a.retry_after else { return };
                let now = Instant::now();
                let until = now + Duration::from_millis(ms);
                let Ok(place) = queue::pause_shared(shared(&l), &asked, until, now, far).await else { return };
                if queue::wait_requeued(&l, place, &asked, far, "op").await.is_ok() {
                    log.lock().unwrap().push((a.both, Instant::now()));
                }
            };
            match a.cancel {
                Some(ms) => drop(tokio::time::timeout(Duration::from_millis(ms), work).await),
                None => work.await,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let log = log.lock().unwrap().clone();
    log
}

/// No interval shorter than `window` holds more than `limit` of `departures`.
fn check(departures: &[Instant], limit: u32, window: Duration, what: &str) -> Result<(), TestCaseError> {
    let mut sorted = departures.to_vec();
    sorted.sort();
    let n = limit as usize;
    for w in sorted.windows(n + 1) {
        let span = w[n] - w[0];
        prop_assert!(span >= window, "{what}: {} departures within {span:?} (limit {limit} per {window:?})", n + 1);
    }
    Ok(())
}

fn check_all(log: &[(bool, Instant)], own: (u32, Duration), cond: (u32, Duration)) -> Result<(), TestCaseError> {
    let all: Vec<Instant> = log.iter().map(|(_, t)| *t).collect();
    let conditional: Vec<Instant> = log.iter().filter(|(both, _)| *both).map(|(_, t)| *t).collect();
    check(&all, own.0, own.1, "endpoint bucket")?;
    check(&conditional, cond.0, cond.1, "conditional bucket")
}

/// Three replicas whose Redis is away, each deciding alone at its share (learned rank
/// among three): together they never put more than a window's limit into one window,
/// for limits below, at and above the replica count.
#[test]
fn three_replicas_in_fallback_keep_every_window() {
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    let strategy = ((1u32..8, 200u64..2_000), (1u32..4, 200u64..3_000), arrivals(60, 400, 0.1));
    runner
        .run(&strategy, |((own_limit, own_ms), (cond_limit, cond_ms), arrivals)| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let own = WindowSpec { limit: own_limit, period: own_ms * 1_000 };
                let cond = WindowSpec { limit: cond_limit, period: cond_ms * 1_000 };
                let stores: Vec<SharedStore> = (0..3)
                    .map(|_| {
                        // Never reached: the replicas are degraded from the start.
                        let redis = RedisStore::new("redis://127.0.0.1:1/0", "m", Duration::from_millis(10)).unwrap();
                        SharedStore::new(redis, Some(3), Duration::from_millis(50))
                    })
                    .collect();
                let ids: Vec<String> = stores.iter().map(|s| s.redis().id().to_string()).collect();
                let replicas: Vec<Arc<Limiter>> = stores
                    .into_iter()
                    .map(|s| {
                        s.learn_replicas(&ids);
                        s.mark_down(&RedisStoreError::Timeout(Duration::from_millis(10)));
                        Arc::new(Limiter::Shared(Box::new(s)))
                    })
                    .collect();
                let far = Instant::now() + Duration::from_secs(600);
                let log = drive(&replicas, demands(1, own, cond), &arrivals, far).await;
                check_all(
                    &log,
                    (own_limit, Duration::from_millis(own_ms)),
                    (cond_limit, Duration::from_millis(cond_ms)),
                )
            })
        })
        .unwrap();
}

/// Two replicas on a real `redis-server` (few cases, real time): departures keep
/// every window of Klaviyo's length (the window without its guard, since a grant
/// leaves up to a round trip after Redis stamped it and later grants are discarded).
#[test]
fn replicas_on_redis_keep_every_window() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let guard = Duration::from_millis(100);
    let replicas: Vec<Arc<Limiter>> = rt.block_on(async {
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let redis = RedisStore::new(&server.url(), "model", Duration::from_secs(2)).unwrap();
            let s = SharedStore::new(redis, Some(2), guard);
            s.beat().await;
            replicas.push(Arc::new(Limiter::Shared(Box::new(s))));
        }
        for r in &replicas {
            shared(r).beat().await;
        }
        replicas
    });
    let accounts = std::sync::atomic::AtomicU64::new(1);
    let mut runner = TestRunner::new(Config { cases: 4, max_shrink_iters: 0, ..Config::default() });
    let strategy = ((2u32..5, 300u64..500), (2u32..4, 300u64..500), arrivals(20, 120, 0.1));
    runner
        .run(&strategy, |((own_limit, own_ms), (cond_limit, cond_ms), arrivals)| {
            let account = u128::from(accounts.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            rt.block_on(async {
                let own = WindowSpec { limit: own_limit, period: (own_ms * 1_000) + guard.as_micros() as u64 };
                let cond = WindowSpec { limit: cond_limit, period: (cond_ms * 1_000) + guard.as_micros() as u64 };
                let far = Instant::now() + Duration::from_secs(60);
                let log = drive(&replicas, demands(account, own, cond), &arrivals, far).await;
                prop_assert!(replicas.iter().all(|r| !r.is_degraded()), "a replica lost Redis");
                check_all(
                    &log,
                    (own_limit, Duration::from_millis(own_ms)),
                    (cond_limit, Duration::from_millis(cond_ms)),
                )
            })
        })
        .unwrap();
}
