//! The Redis store's Lua scripts against a real `redis-server`: they decide like the
//! local window logic, pauses and corrections reach every replica.

mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use klaviyo_proxy::limiter::redis::{Decision, RedisStore};
use klaviyo_proxy::limiter::window::{earliest_all, WindowLog};
use klaviyo_proxy::limiter::{Account, BucketId, BucketKey, Demand, Tick, WindowSpec, Windows};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis_support::RedisServer;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn demand(account: u128, bucket: BucketId, specs: &[WindowSpec]) -> Demand {
    Demand { key: BucketKey { account: Account(account), bucket }, windows: Windows::new(specs) }
}

fn spec() -> impl Strategy<Value = WindowSpec> {
    (1u32..12, 1u64..2_000).prop_map(|(limit, period)| WindowSpec { limit, period })
}

/// Same arrivals, same decisions: the Lua script (run by Redis, on an explicit clock)
/// and `limiter::window` agree on every grant and every wait, for one or two buckets
/// of up to three windows, and on the predicted slot of a request behind others.
#[test]
fn lua_decides_like_the_local_window_logic() {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt.block_on(async { RedisStore::new(&server.url(), "prop", Duration::from_secs(5)).unwrap() });
    let accounts = AtomicU64::new(1);
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    let strategy = (
        proptest::collection::vec(spec(), 1..4),
        proptest::collection::vec(spec(), 1..3),
        proptest::collection::vec((0u64..400, 0u8..3, 0u32..8), 1..200),
    );
    runner
        .run(&strategy, |(specs_a, specs_b, arrivals)| {
            let account = u128::from(accounts.fetch_add(1, Ordering::Relaxed));
            let demands = [
                demand(account, BucketId::Endpoint(1), &specs_a),
                demand(account, BucketId::Condition(1, 0), &specs_b),
            ];
            let mut logs: [Vec<WindowLog>; 2] =
                [vec![WindowLog::default(); specs_a.len()], vec![WindowLog::default(); specs_b.len()]];
            let mut now: Tick = 10_000_000;
            rt.block_on(async {
                for (gap, which, ahead) in arrivals {
                    now += gap;
                    let wanted: &[usize] = match which {
                        0 => &[0],
                        1 => &[1],
                        _ => &[0, 1],
                    };
                    for &b in wanted {
                        for (log, s) in logs[b].iter_mut().zip(demands[b].windows.as_slice()) {
                            log.prune(now, s.period);
                        }
                    }
                    let asked: Vec<Demand> = wanted.iter().map(|&b| demands[b]).collect();
                    // A request behind `ahead` local ones: where would it go?
                    if ahead > 0 {
                        let mut sim = logs.clone();
                        let mut t = now;
                        for _ in 0..=ahead {
                            t = earliest_all(
                                t,
                                wanted
                                    .iter()
                                    .flat_map(|&b| sim[b].iter().zip(demands[b].windows.as_slice().iter().copied())),
                            );
                            for &b in wanted {
                                sim[b].iter_mut().for_each(|l| l.record(t));
                            }
                        }
                        let got = store.decide_at(&asked, ahead, Some(now)).await.unwrap();
                        prop_assert_eq!(
                            got,
                            Decision::Wait(Duration::from_micros(t - now)),
                            "prediction, ahead {}",
                            ahead
                        );
                    }
                    let t = earliest_all(
                        now,
                        wanted.iter().flat_map(|&b| logs[b].iter().zip(demands[b].windows.as_slice().iter().copied())),
                    );
                    let got = store.decide_at(&asked, 0, Some(now)).await.unwrap();
                    if t == now {
                        prop_assert_eq!(got, Decision::Granted, "at {}", now);
                        for &b in wanted {
                            logs[b].iter_mut().for_each(|l| l.record(now));
                        }
                    } else {
                        prop_assert_eq!(got, Decision::Wait(Duration::from_micros(t - now)), "at {}", now);
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

/// Two replicas (two stores on one Redis): one decision takes from every bucket or
/// from none, and the burst limit holds over both together.
#[test]
fn all_or_nothing_across_replicas() {
    let server = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let a = RedisStore::new(&server.url(), "aon", Duration::from_secs(1)).unwrap();
        let b = RedisStore::new(&server.url(), "aon", Duration::from_secs(1)).unwrap();
        let second = WindowSpec { limit: 3, period: 10_000_000 };
        let own = demand(9, BucketId::Endpoint(4), &[second]);
        let cond = demand(9, BucketId::Condition(4, 0), &[WindowSpec { limit: 1, period: 10_000_000 }]);
        assert_eq!(a.decide(&[own, cond], 0).await.unwrap(), Decision::Granted);
        // The conditional bucket is spent: refused, and the endpoint bucket untouched.
        assert!(matches!(b.decide(&[own, cond], 0).await.unwrap(), Decision::Wait(w) if w > Duration::from_secs(9)));
        assert_eq!(b.decide(&[own], 0).await.unwrap(), Decision::Granted);
        assert_eq!(a.decide(&[own], 0).await.unwrap(), Decision::Granted);
        assert!(matches!(b.decide(&[own], 0).await.unwrap(), Decision::Wait(_)));
    });
}

/// A pause set through one replica holds every replica, on Redis' clock.
#[test]
fn pause_reaches_every_replica() {
    let server = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let a = RedisStore::new(&server.url(), "pause", Duration::from_secs(1)).unwrap();
        let b = RedisStore::new(&server.url(), "pause", Duration::from_secs(1)).unwrap();
        let d = demand(5, BucketId::Endpoint(2), &[WindowSpec { limit: 100, period: 1_000_000 }]);
        a.pause(&[d.key], Duration::from_secs(3)).await.unwrap();
        // A shorter pause never shortens a longer one.
        a.pause(&[d.key], Duration::from_millis(10)).await.unwrap();
        match b.decide(&[d], 0).await.unwrap() {
            Decision::Wait(w) => assert!(w > Duration::from_millis(2_900) && w <= Duration::from_secs(3), "{w:?}"),
            other => panic!("expected a pause, got {other:?}"),
        }
        let at: Tick = 1_000_000_000;
        b.pause_at(&[d.key], Duration::from_millis(1), Some(at)).await.unwrap();
        // An explicit clock past every pause: the bucket is open again.
        assert_eq!(b.decide_at(&[d], 0, Some(u64::MAX / 4096)).await.unwrap(), Decision::Granted);
    });
}

/// `RateLimit-Remaining: 0` with a reset 400 ms away: no replica sends before then.
#[test]
fn correction_holds_until_the_reset() {
    let server = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let a = RedisStore::new(&server.url(), "corr", Duration::from_secs(1)).unwrap();
        let b = RedisStore::new(&server.url(), "corr", Duration::from_secs(1)).unwrap();
        let burst = WindowSpec { limit: 10, period: 1_050_000 };
        let steady = WindowSpec { limit: 150, period: 60_250_000 };
        let d = demand(6, BucketId::Endpoint(3), &[burst, steady]);
        assert_eq!(a.decide(&[d], 0).await.unwrap(), Decision::Granted);
        let added = a.correct(&d, 1, 0, Duration::from_millis(400)).await.unwrap();
        assert_eq!(added, 149);
        match b.decide(&[d], 0).await.unwrap() {
            Decision::Wait(w) => assert!(w > Duration::from_millis(300) && w <= Duration::from_millis(400), "{w:?}"),
            other => panic!("expected a wait, got {other:?}"),
        }
        // Remaining larger than what the store believes: nothing to correct.
        assert_eq!(a.correct(&d, 1, 149, Duration::from_secs(30)).await.unwrap(), 0);
    });
}

/// Keys carry the account hash tag and expire by themselves.
#[test]
fn keys_are_hash_tagged_and_expire() {
    let server = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let store = RedisStore::new(&server.url(), "exp", Duration::from_secs(1)).unwrap();
        let d = demand(0xabc, BucketId::Endpoint(7), &[WindowSpec { limit: 5, period: 1_000_000 }]);
        assert_eq!(store.decide(&[d], 0).await.unwrap(), Decision::Granted);
        let stem = store.bucket_key(&d.key);
        assert!(stem.starts_with("{exp:00000000000000000000000000000abc}:"), "{stem}");
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(format!("{stem}:w0")).query_async(&mut conn).await.unwrap();
        assert!(ttl > 0 && ttl <= 2_000, "ttl {ttl}");
    });
}

/// `rediss://` to a TLS-only `redis-server` whose certificate a private CA signed.
#[test]
fn rediss_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("kp-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_file, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let server = RedisServer::start_tls(cert_file.to_str().unwrap(), key_file.to_str().unwrap());
    let url = format!("rediss://127.0.0.1:{}/1", server.port);
    let rt = runtime();
    rt.block_on(async {
        let d = demand(1, BucketId::Endpoint(1), &[WindowSpec { limit: 1, period: 1_000_000 }]);
        let store = RedisStore::with_ca(&url, "tls", Duration::from_secs(2), Some(ca.pem().into_bytes())).unwrap();
        assert_eq!(store.decide(&[d], 0).await.unwrap(), Decision::Granted);
        assert!(matches!(store.decide(&[d], 0).await.unwrap(), Decision::Wait(_)));
        // Without the CA (webpki roots only) the certificate is refused.
        let untrusted = RedisStore::new(&url, "tls", Duration::from_secs(2)).unwrap();
        assert!(untrusted.decide(&[d], 0).await.is_err());
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A password and a database number in the URL are honoured.
#[test]
fn password_and_database_from_the_url() {
    let server = RedisServer::start_with_password("s3cret-pw");
    let rt = runtime();
    rt.block_on(async {
        let d = demand(2, BucketId::Endpoint(1), &[WindowSpec { limit: 5, period: 1_000_000 }]);
        let url = format!("redis://:s3cret-pw@127.0.0.1:{}/3", server.port);
        let store = RedisStore::new(&url, "auth", Duration::from_secs(1)).unwrap();
        assert_eq!(store.decide(&[d], 0).await.unwrap(), Decision::Granted);
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let wrong =
            RedisStore::new(&format!("redis://127.0.0.1:{}/3", server.port), "auth", Duration::from_secs(1)).unwrap();
        let err = wrong.decide(&[d], 0).await.unwrap_err().to_string();
        assert!(!err.contains("s3cret-pw"), "{err}");
    });
}

/// On a Redis Cluster of three primaries, one decision's keys (two buckets, several
/// windows) share the account's hash tag, so the script runs on one slot; accounts
/// spread over the nodes.
#[test]
fn redis_cluster_runs_each_decision_on_one_slot() {
    let cluster = redis_support::RedisCluster::start(3);
    let rt = runtime();
    rt.block_on(async {
        let store = RedisStore::cluster(&cluster.url(), "cl", Duration::from_secs(2), None).unwrap();
        let burst = WindowSpec { limit: 2, period: 10_000_000 };
        let steady = WindowSpec { limit: 3, period: 60_000_000 };
        for account in 1..=30u128 {
            let own = demand(account, BucketId::Endpoint(1), &[burst, steady]);
            let cond = demand(account, BucketId::Condition(1, 0), &[burst]);
            assert_eq!(store.decide(&[own, cond], 0).await.unwrap(), Decision::Granted);
            assert_eq!(store.decide(&[own, cond], 0).await.unwrap(), Decision::Granted);
            assert!(matches!(store.decide(&[own], 0).await.unwrap(), Decision::Wait(_)));
            assert!(matches!(store.decide(&[own], 3).await.unwrap(), Decision::Wait(_)));
        }
        store
            .pause(&[BucketKey { account: Account(1), bucket: BucketId::Endpoint(1) }], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(store.heartbeat(Duration::from_secs(5)).await.unwrap(), [store.id().to_string()]);
        // The accounts' keys are spread over more than one node.
        let mut used = 0;
        for node in &cluster.nodes {
            let client = redis::Client::open(node.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let n: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
            used += u32::from(n > 0);
        }
        assert!(used > 1, "all keys on one node");
    });
}

/// A flood of distinct bogus keys through the Redis store: this replica's per-key
/// state (lines, unsent local takes, the fallback's buckets) stays within
/// `limiter.max_buckets`, and every key left in Redis carries a TTL (it goes by itself
/// one window after its last take).
#[test]
fn per_key_state_is_capped_and_every_redis_key_expires() {
    use klaviyo_proxy::limiter::SharedStore;
    const CAP: usize = 50;
    let server = RedisServer::start();
    let rt = runtime();
    rt.block_on(async {
        let redis = RedisStore::new(&server.url(), "cap", Duration::from_secs(5)).unwrap();
        let shared = SharedStore::new(redis, Some(1), Duration::from_millis(50));
        shared.fallback().set_max_buckets(CAP);
        // A short window and a daily one, like a daily-capped operation.
        let specs = [WindowSpec { limit: 3, period: 1_000_000 }, WindowSpec { limit: 100, period: 86_400_000_000 }];
        for n in 0..10 * CAP as u128 {
            let d = [demand(1_000_000 + n, BucketId::Endpoint(1), &specs)];
            let (ticket, _) = shared.line(&d).unwrap().unwrap().join();
            assert_eq!(shared.redis().decide(&d, 0).await.unwrap(), Decision::Granted);
            shared.mirror(&d);
            drop(ticket);
            shared.redis().pause(&[d[0].key], Duration::from_millis(1)).await.unwrap();
            // As if Redis had been away for this one: a take to hand over later.
            shared.taken_locally(&d);
            let (lines, unsent) = shared.per_key_state();
            assert!(lines <= CAP && unsent <= CAP, "after {n}: {lines} lines, {unsent} unsent buckets");
        }
        assert!(shared.fallback().len() <= CAP);
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
        assert!(keys.len() >= 10 * CAP, "{} keys", keys.len());
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
            assert!(ttl > 0 || ttl == -2, "{key} has no TTL ({ttl})");
        }
    });
}
