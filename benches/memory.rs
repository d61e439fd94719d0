//! Resident memory of the limiter's state: 100k active buckets, and 50k requests
//! queued (each a waiting task holding its reservation). Prints RSS growth in MB.
//! Run: `cargo bench --bench memory`.

use std::time::Duration;

use klaviyo_proxy::limiter::{Account, BucketId, BucketKey, Demand, LocalStore, WindowSpec, Windows};
use klaviyo_proxy::queue::wait_for_slot;
use tokio::time::Instant;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    kb / 1024.0
}

fn demand(account: u128, limit: u32) -> [Demand; 1] {
    [Demand {
        key: BucketKey { account: Account(account), bucket: BucketId::Endpoint(1) },
        windows: Windows::new(&[
            WindowSpec { limit, period: 1_050_000 },
            WindowSpec { limit: limit * 15, period: 60_250_000 },
        ]),
    }]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and `cargo bench -- --list` only check it runs.
    }
    let base = rss_mb();
    let store = LocalStore::new();
    let far = Instant::now() + Duration::from_secs(86_400);
    for account in 1..=100_000u128 {
        // Three takes each, as an active M-tier bucket might hold.
        for _ in 0..3 {
            store.reserve(&demand(account, 10), Instant::now(), far, 0).unwrap();
        }
    }
    let buckets = rss_mb();
    println!("100k active buckets: {:.1} MB RSS growth (target <= 100 MB)", buckets - base);

    let store = std::sync::Arc::new(LocalStore::new());
    let one = demand(u128::MAX, 10);
    let mut waiting = Vec::with_capacity(50_000);
    for _ in 0..50_000 {
        let (store, d) = (store.clone(), one);
        waiting.push(tokio::spawn(async move { wait_for_slot(&store, &d, far, u32::MAX, "bench").await }));
    }
    tokio::task::yield_now().await;
    while store.queued(&one[0].key) < 50_000 - 10 {
        tokio::task::yield_now().await;
    }
    let queued = rss_mb();
    println!("50k queued requests: {:.1} MB RSS growth (target <= 150 MB)", queued - buckets);
    for w in waiting {
        w.abort();
    }
}
