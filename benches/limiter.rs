//! Limiter decision cost: one reservation over a bucket of two windows (burst and
//! steady), with 1 bucket and with 100k buckets held: with unlimited windows (every
//! decision admits, and the logs keep every take of the run), and at realistic limits
//! and load.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use klaviyo_proxy::limiter::{Account, BucketId, BucketKey, Demand, LocalStore, WindowSpec, Windows};
use tokio::time::Instant;

fn demand(account: u128) -> Demand {
    // Limits high enough that every decision admits: the common, unqueued path.
    Demand {
        key: BucketKey { account: Account(account), bucket: BucketId::Endpoint(3) },
        windows: Windows::new(&[
            WindowSpec { limit: u32::MAX, period: 1_050_000 },
            WindowSpec { limit: u32::MAX, period: 60_250_000 },
        ]),
    }
}

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter_decision_two_windows");
    for keys in [1u128, 100_000] {
        let store = LocalStore::new();
        let demands: Vec<[Demand; 1]> = (1..=keys).map(|k| [demand(k)]).collect();
        let far = Instant::now() + Duration::from_secs(3600);
        for d in &demands {
            store.reserve(d, Instant::now(), far, 0).unwrap();
        }
        let mut i = 0usize;
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                i = (i + 1) % demands.len();
                black_box(store.reserve(&demands[i], Instant::now(), far, 0).unwrap());
            })
        });
    }
    group.finish();
}

/// The same decision at realistic limits (75/s, 700/min) and load: every bucket sees
/// one request a second (a synthetic clock advancing 10 µs per decision over 100k
/// buckets), so its logs hold what a busy account's would (about 60 takes a minute)
/// rather than every take of the run, as the unlimited case above keeps.
fn realistic(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter_decision_realistic");
    for keys in [1u128, 100_000] {
        let store = LocalStore::new();
        let demand = |account| Demand {
            key: BucketKey { account: Account(account), bucket: BucketId::Endpoint(3) },
            windows: Windows::new(&[
                WindowSpec { limit: 75, period: 1_050_000 },
                WindowSpec { limit: 700, period: 60_250_000 },
            ]),
        };
        let demands: Vec<[Demand; 1]> = (1..=keys).map(|k| [demand(k)]).collect();
        let start = Instant::now();
        let far = start + Duration::from_secs(365 * 86_400);
        // One request a second per bucket; one bucket alone gets ten a second (its
        // steady window allows 11.6).
        let step = Duration::from_micros(if keys == 1 { 100_000 } else { 10 });
        let mut now = start;
        for d in &demands {
            store.reserve(d, now, far, 0).unwrap();
            now += step;
        }
        let mut i = 0usize;
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                i = (i + 1) % demands.len();
                now += step;
                black_box(store.reserve(&demands[i], now, far, 0).unwrap());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, realistic);
criterion_main!(benches);
