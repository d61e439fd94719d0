//! Limiter decision cost: one reservation over a bucket of two windows (burst and
//! steady), with 1 bucket and with 100k buckets held: with unlimited windows (every
//! decision admits, and the logs keep every take of the run), and at realistic limits
//! and load.
//!
//! Accounts are keyed as the proxy keys them (a 128-bit keyed hash of the credential,
//! here a fixed pseudo-random stand-in), and the 100k buckets are visited in a scattered
//! order, not the order they were made in (which would let the allocator's layout and
//! the prefetcher hide the cache misses a real mix of accounts pays).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use klaviyo_proxy::limiter::{Account, BucketId, BucketKey, Demand, LocalStore, WindowSpec, Windows};
use tokio::time::Instant;

/// A stand-in for the HMAC of the `n`-th credential: uniform over 128 bits.
fn account(n: u128) -> Account {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let n = n as u64;
    Account(u128::from(mix(n)) << 64 | u128::from(mix(n ^ 0x9E37_79B9_7F4A_7C15)))
}

/// The next bucket to decide for: a stride coprime with `len` visits each once per
/// round, far from the previous one.
fn next(i: usize, len: usize) -> usize {
    const STRIDE: usize = 61_813; // prime, about 0.62 of 100k
    (i + STRIDE) % len
}

fn demand(account_n: u128) -> Demand {
    // Limits high enough that every decision admits: the common, unqueued path.
    Demand {
        key: BucketKey { account: account(account_n), bucket: BucketId::Endpoint(3) },
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
        let far = Instant::now() + Duration::from_secs(3600);
        for k in 1..=keys {
            store.reserve(&[demand(k)], Instant::now(), far, 0).unwrap();
        }
        // Each request computes its demand (its account's HMAC, its endpoint's windows)
        // as it arrives: built here too, not read from a table of 100k (a cache miss
        // that is the benchmark's, not the store's).
        let (len, mut i) = (keys as usize, 0usize);
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                i = next(i, len);
                let d = [demand(i as u128 + 1)];
                black_box(store.reserve(&d, Instant::now(), far, 0).unwrap());
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
        let demand = |n| Demand {
            key: BucketKey { account: account(n), bucket: BucketId::Endpoint(3) },
            windows: Windows::new(&[
                WindowSpec { limit: 75, period: 1_050_000 },
                WindowSpec { limit: 700, period: 60_250_000 },
            ]),
        };
        let start = Instant::now();
        let far = start + Duration::from_secs(365 * 86_400);
        // One request a second per bucket; one bucket alone gets ten a second (its
        // steady window allows 11.6).
        let step = Duration::from_micros(if keys == 1 { 100_000 } else { 10 });
        let mut now = start;
        for k in 1..=keys {
            store.reserve(&[demand(k)], now, far, 0).unwrap();
            now += step;
        }
        let (len, mut i) = (keys as usize, 0usize);
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                i = next(i, len);
                now += step;
                black_box(store.reserve(&[demand(i as u128 + 1)], now, far, 0).unwrap());
            })
        });
    }
    group.finish();
}

/// The floor under the 100k case on this machine: one read of memory, i.e. a line of a
/// table the size of 100k buckets' state (512 bytes each), visited in an order nothing
/// can predict (each read names the next, in a random cycle). A decision that finds its
/// bucket outside the cache pays at least this once, whatever the layout.
fn one_miss(c: &mut Criterion) {
    const KEYS: usize = 100_000;
    let mut order: Vec<usize> = (0..KEYS).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..KEYS).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut table = vec![[0usize; 64]; KEYS];
    for w in 0..KEYS {
        table[order[w]][0] = order[(w + 1) % KEYS];
    }
    let mut at = order[0];
    c.bench_function("reference_one_memory_read/100000_keys", |b| {
        b.iter(|| {
            at = black_box(table[at][0]);
        })
    });
}

criterion_group!(benches, decisions, realistic, one_miss);
criterion_main!(benches);
