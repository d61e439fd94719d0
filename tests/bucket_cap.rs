//! Issue 13 item 2 through the real binary: a flood of requests, each with a credential
//! of its own, against the simulator. The buckets, the account cache and the metric
//! series they create stay bounded; requests that would need a bucket beyond
//! `limiter.max_buckets` (none idle) get a 503 of the proxy's own; accounts already
//! held keep being served.

mod redis_support;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};
use klaviyo_proxy::sim::SimOptions;
use support::process::{self, Running};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

/// Requests, each with a key never seen before. Issue 13 asks for 200,000; a debug
/// build on the 2-core development machine, loaded by three other builds (load 10),
/// served about 120 a second, so the flood is what fits in about 30 s there: the
/// bounds below are what must not grow with it.
const FLOOD: usize = 4_000;
/// `limiter.max_buckets` for the test: well below the flood, so the cap is reached.
const CAP: usize = 1_500;
/// `accounts.cache_entries` for the test: each bogus key fails its lookup (or is
/// turned away from the lookup gate) and is remembered as failed, up to this many.
const CACHE: usize = 1_000;
/// Concurrent keep-alive connections.
const CONNECTIONS: usize = 64;
/// Resident memory the proxy may grow by over the second half of the flood, once the
/// cap is reached: what is held must not grow with the keys sent.
const LATE_GROWTH_MB: f64 = 8.0;
/// Resident memory of the whole proxy (a debug build) at the end of the flood.
const RSS_MB: f64 = 100.0;
/// Samples `/metrics` may show at the end (177 when written: the flood's accounts all
/// show as `other`).
const MAX_SAMPLES: usize = 500;

fn rss_mb(child: &Running) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_keys_stays_bounded() {
    let sim = Arc::new(support::sim(SimOptions::default()).await);
    let dir = std::env::temp_dir().join(format!("kp-bucket-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    // Account resolution stays on, as by default; a first lookup that cannot have the
    // one-per-second gate at once goes on without waiting (by default a new key waits
    // up to 10 s for it, which would make this flood take hours).
    std::fs::write(
        &config,
        format!("[limiter]\nmax_buckets = {CAP}\n[accounts]\nlookup_max_wait_ms = 0\ncache_entries = {CACHE}\n"),
    )
    .unwrap();
    let (child, urls) =
        process::start_urls(BIN, &process::serve_args(&sim.url, Some(config.to_str().unwrap())), &[], 2);
    let (proxy, admin) = (urls[0].clone(), urls[1].clone());
    let client = support::client();
    let lists = format!("{proxy}/api/lists");
    assert_eq!(support::get(&client, &lists, support::KEY_A).await.status, StatusCode::OK);

    let next = Arc::new(AtomicUsize::new(0));
    let run = |upto: usize| {
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (client, lists, next, sim) = (client.clone(), lists.clone(), next.clone(), sim.clone());
                tokio::spawn(async move {
                    let mut seen: BTreeMap<(u16, String), usize> = BTreeMap::new();
                    loop {
                        let Ok(i) =
                            next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| (i < upto).then_some(i + 1))
                        else {
                            return seen;
                        };
                        let auth = format!("Klaviyo-API-Key pk_bogus_{i:08}_0123456789abcdef");
                        // Half of them revoked: Klaviyo answers 401 (counted as auth failures).
                        if i % 2 == 0 {
                            sim.revoke(&auth);
                        }
                        let r = support::send(&client, Method::GET, &lists, &[("authorization", &auth)], "").await;
                        if r.status == StatusCode::SERVICE_UNAVAILABLE {
                            assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
                            assert_eq!(r.json()["errors"][0]["code"], "proxy_too_many_buckets");
                        }
                        let why = r.header("x-klaviyo-proxy-error").unwrap_or("").to_string();
                        *seen.entry((r.status.as_u16(), why)).or_default() += 1;
                    }
                })
            })
            .collect();
        async move {
            let mut seen: BTreeMap<(u16, String), usize> = BTreeMap::new();
            for t in tasks {
                for (k, n) in t.await.unwrap() {
                    *seen.entry(k).or_default() += n;
                }
            }
            seen
        }
    };
    let started = std::time::Instant::now();
    let mut seen = run(FLOOD / 2).await;
    let half = rss_mb(&child);
    for (k, n) in run(FLOOD).await {
        *seen.entry(k).or_default() += n;
    }
    let end = rss_mb(&child);
    let took = started.elapsed();
    let metrics = support::send(&client, Method::GET, &format!("{admin}/metrics"), &[], "").await;
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    let samples = metrics.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    let buckets = sample(&metrics, "klaviyo_proxy_active_buckets").unwrap();
    eprintln!(
        "{FLOOD} keys in {took:?}: {seen:?}; RSS {half:.1} MB at half, {end:.1} MB at the end; \
         {buckets} buckets, {samples} samples in /metrics"
    );

    assert_eq!(seen.values().sum::<usize>(), FLOOD);
    let refused = seen.get(&(503, "proxy_too_many_buckets".to_string())).copied().unwrap_or(0);
    let forwarded =
        seen.get(&(200, String::new())).copied().unwrap_or(0) + seen.get(&(401, String::new())).copied().unwrap_or(0);
    assert_eq!(refused + forwarded, FLOOD, "only upstream answers and the cap's 503: {seen:?}");
    assert!(refused > 0, "the cap was reached: {seen:?}");
    assert!(buckets <= CAP as f64, "{buckets} buckets held over the cap of {CAP}");
    assert!(end - half <= LATE_GROWTH_MB, "RSS grew {:.1} MB over the second half", end - half);
    assert!(end <= RSS_MB, "RSS {end:.1} MB");
    assert!(samples <= MAX_SAMPLES, "{samples} samples in /metrics");
    let unresolved = sample(&metrics, "klaviyo_proxy_accounts_unresolved").unwrap();
    assert!(unresolved <= CACHE as f64, "{unresolved} failed lookups remembered over {CACHE}");
    // An account held before the flood is served as before.
    assert_eq!(support::get(&client, &lists, support::KEY_A).await.status, StatusCode::OK);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 13 item 2 in Redis mode, through the real binary against a real
/// `redis-server`: with `limiter.max_buckets` lines all busy (each holds a request
/// waiting for its account's next steady slot), a new account is refused with the
/// proxy's 503, as with the local store; accounts that are not waiting are not held,
/// so once a waiting client hangs up a new account is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mode_refuses_a_new_key_when_every_line_is_busy() {
    const LINES: usize = 4;
    let redis = redis_support::RedisServer::start();
    let sim = support::sim(SimOptions::default()).await;
    let dir = std::env::temp_dir().join(format!("kp-bucket-cap-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    // One request a minute per account: the second of an account waits about 60 s in
    // its line (well within its deadline), holding the line busy.
    std::fs::write(
        &config,
        format!(
            "[auth]\naccount_hash_key = \"bucket-cap-redis\"\n[limiter]\nstore = \"redis\"\nredis_url = \"{}\"\ntimeout_ms = 2000\nmax_buckets = {LINES}\n\
             [limits.operations.get_campaign]\nburst_per_second = 1\nsteady_per_minute = 1\n\
             [queue]\nmax_wait_ms = 90000\n[accounts]\nresolve = false\n",
            redis.url()
        ),
    )
    .unwrap();
    let served = process::Served::start(BIN, &process::serve_args(&sim.url, Some(config.to_str().unwrap())), &[]);
    let client = support::client();
    let campaign = format!("{}/api/campaigns/c1", served.proxy);
    let key = |n: usize| format!("Klaviyo-API-Key pk_line_{n:04}_0123456789abcdef");
    let ask = |n: usize| {
        let (client, campaign, auth) = (client.clone(), campaign.clone(), key(n));
        async move { support::send(&client, Method::GET, &campaign, &[("authorization", &auth)], "").await }
    };
    let addr = served.proxy.trim_start_matches("http://").to_string();
    // A raw client queues for account n's next slot, a minute away.
    let join_line = |n: usize| {
        let (addr, auth) = (addr.clone(), key(n));
        async move {
            let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!(
                "GET /api/campaigns/c2 HTTP/1.1\r\nhost: localhost\r\nauthorization: {auth}\r\nx-proxy-max-wait-ms: 90000\r\n\r\n"
            );
            raw.write_all(head.as_bytes()).await.unwrap();
            raw
        }
    };
    let mut waiting = Vec::new();
    for n in 0..LINES {
        let first = ask(n).await;
        assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
        waiting.push(join_line(n).await);
    }
    // Once the waiting requests are in their lines, a new account is refused. Each
    // try uses an account never seen: one that is served leaves no busy line.
    let mut next = LINES;
    let mut refused = None;
    for _ in 0..100 {
        // A waiting request that needed its line while a try held the last free one was
        // refused (rightly): it queues again.
        for (n, raw) in waiting.iter_mut().enumerate() {
            let mut buf = [0u8; 4096];
            match raw.try_read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(read) => {
                    let answer = String::from_utf8_lossy(&buf[..read]).to_string();
                    assert!(answer.contains("proxy_too_many_buckets"), "{answer}");
                    *raw = join_line(n).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        next += 1;
        let r = ask(next).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let refused = refused.expect("a new account was never refused with every line busy");
    assert_eq!(refused.header("x-klaviyo-proxy-error"), Some("proxy_too_many_buckets"));
    assert!(refused.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    assert_eq!(refused.json()["errors"][0]["code"], "proxy_too_many_buckets");
    assert_eq!(refused.header("content-type"), Some("application/vnd.api+json"));
    // A waiting client hangs up: its line is idle and makes room for a new account
    // (once the proxy has seen the hang-up and the next pass for idle lines, at most a
    // second apart, has run; bounded generously for a loaded machine).
    drop(waiting.remove(0));
    let (mut served_after, mut tries, mut waiters_refused) = (false, 0, 0);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < until {
        // A waiting request refused meanwhile (see above) leaves its line too.
        for raw in &mut waiting {
            let mut buf = [0u8; 4096];
            if let Ok(read) = raw.try_read(&mut buf) {
                waiters_refused += usize::from(read > 0);
            }
        }
        next += 1;
        tries += 1;
        let r = ask(next).await;
        if r.status == StatusCode::OK {
            served_after = true;
            break;
        }
        assert_eq!(r.header("x-klaviyo-proxy-error"), Some("proxy_too_many_buckets"), "{:?}", r.body);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        served_after,
        "no new account was served after a line went idle ({tries} tries in 30 s, {waiters_refused} waiting requests answered meanwhile)"
    );
    assert_eq!(sim.stats().throttled, 0);
    drop(waiting);
    drop(served);
    sim.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
