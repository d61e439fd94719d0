//! Limiter decision cost: one reservation over a bucket of two windows (burst and
//! steady), with 1 bucket and with 100k buckets held.

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

criterion_group!(benches, decisions);
criterion_main!(benches);
