//! Decision latency and throughput of the Redis store on loopback, beside the local
//! store, in one run. Starts its own `redis-server` (it must be installed).
//!
//! `cargo bench --bench redis_limiter` prints, per store: p50 / p99 / max latency of
//! one decision made alone, and decisions per second with 64 requests in flight; for
//! Redis also the prediction a request queued behind 20 others asks for.

#[path = "../tests/redis_support/mod.rs"]
mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use klaviyo_proxy::limiter::redis::RedisStore;
use klaviyo_proxy::limiter::{Account, BucketId, BucketKey, Demand, LocalStore, WindowSpec, Windows};
use tokio::time::Instant;

const ACCOUNTS: u128 = 5_000;
const SAMPLES: usize = 20_000;
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);
const IN_FLIGHT: usize = 64;

/// An L-tier endpoint (75/s, 750/min with guards) of one of many accounts.
fn demand(i: u64) -> [Demand; 1] {
    let windows =
        Windows::new(&[WindowSpec { limit: 75, period: 1_050_000 }, WindowSpec { limit: 750, period: 60_250_000 }]);
    [Demand {
        key: BucketKey { account: Account(u128::from(i) % ACCOUNTS + 1), bucket: BucketId::Endpoint(3) },
        windows,
    }]
}

fn report(name: &str, mut lat: Vec<Duration>, per_sec: f64) {
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{name:<28} p50 {:>8.1} µs   p99 {:>8.1} µs   max {:>8.1} µs   {:>9.0} decisions/s",
        q(0.50).as_secs_f64() * 1e6,
        q(0.99).as_secs_f64() * 1e6,
        lat[lat.len() - 1].as_secs_f64() * 1e6,
        per_sec
    );
}

async fn redis_bench(store: &RedisStore, name: &str, demands: fn(u64) -> [Demand; 1], ahead: u32) {
    for i in 0..1_000 {
        store.decide(&demands(i), ahead).await.unwrap();
    }
    let mut lat = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES as u64 {
        let t = Instant::now();
        store.decide(&demands(i), ahead).await.unwrap();
        lat.push(t.elapsed());
    }
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + THROUGHPUT_FOR;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..IN_FLIGHT as u64 {
        let (store, done) = (store.clone(), done.clone());
        tasks.spawn(async move {
            let mut i = w * 1_000_000;
            while Instant::now() < end {
                store.decide(&demands(i), ahead).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    report(name, lat, done.load(Ordering::Relaxed) as f64 / THROUGHPUT_FOR.as_secs_f64());
}

fn local_bench(name: &str) {
    let store = Arc::new(LocalStore::new());
    let far = Instant::now() + Duration::from_secs(3_600);
    let mut lat = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES as u64 {
        let t = Instant::now();
        let _ = store.reserve(&demand(i), t, far, 1_000).map(|g| store.turn(&g, Instant::now()));
        lat.push(t.elapsed());
    }
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + THROUGHPUT_FOR;
    let threads: Vec<_> = (0..2u64)
        .map(|w| {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = w * 1_000_000;
                while Instant::now() < end {
                    let now = Instant::now();
                    let _ = store.reserve(&demand(i), now, far, 1_000).map(|g| store.turn(&g, Instant::now()));
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    report(name, lat, done.load(Ordering::Relaxed) as f64 / THROUGHPUT_FOR.as_secs_f64());
}

/// One hot account: its steady window holds 750 takes, most decisions are waits.
fn hot(_: u64) -> [Demand; 1] {
    demand(0)
}

fn main() {
    let server = redis_support::RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("decision latency (one at a time) and throughput ({IN_FLIGHT} in flight), 2 windows per decision");
    local_bench("local (dashmap)");
    rt.block_on(async {
        let store = RedisStore::new(&server.url(), "bench", Duration::from_secs(1)).unwrap();
        redis_bench(&store, "redis, 5000 accounts", demand, 0).await;
        redis_bench(&store, "redis, one saturated bucket", hot, 0).await;
        redis_bench(&store, "redis, prediction, 20 ahead", hot, 20).await;
    });
}
