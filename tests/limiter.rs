//! End to end, the real binary in front of the real simulator: the limiter's promise on
//! what leaves the proxy. No quota is left idle while clients wait (even when many of
//! them give up), and a request waits only for the buckets it needs.

mod support;

use std::time::Duration;

use http::StatusCode;
use klaviyo_proxy::sim::Stats;
use support::{bucket, client, get, process, send, Reply, KEY_A};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

/// The simulator and the proxy as real processes; the proxy's config file, if any.
fn start_both(config: Option<&str>) -> (process::Running, String, process::Running, String) {
    let (sim, sim_url) = process::start(BIN, &["simulate", "--listen", "127.0.0.1:0", "--seed", "1"], &[]);
    let (proxy, proxy_url) = process::start(BIN, &process::serve_args(&sim_url, config), &[]);
    (sim, sim_url, proxy, proxy_url)
}

async fn stats(sim_url: &str) -> Stats {
    let reply = get(&client(), &format!("{sim_url}/__sim/stats"), KEY_A).await;
    serde_json::from_slice(&reply.body).expect("simulator stats")
}

/// How many requests a bucket's windows let go, back to back, in `span`: the greedy
/// schedule of the proxy's windows (guards included) under demand that never stops.
fn allowed(windows: &[(usize, Duration)], span: Duration) -> usize {
    let mut left: Vec<Duration> = Vec::new();
    let mut t = Duration::ZERO;
    loop {
        for &(limit, period) in windows {
            if left.len() >= limit {
                t = t.max(left[left.len() - limit] + period);
            }
        }
        if t >= span {
            return left.len();
        }
        left.push(t);
    }
}

/// The issue's starvation scenario: `get_accounts` (1/s, 15/min), clients arriving 2/s
/// and each giving up after 5 s (well inside `queue.max_wait_ms`). Over two steady
/// windows the simulator must receive at least 95% of what the windows allow: every
/// client that gives up hands its slot to those behind it. (Before the fix: 15 in
/// 150 s, where the windows allowed 37, and nothing at all for 90 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_giving_up_leave_no_quota_idle() {
    let (_sim, sim_url, _proxy, proxy_url) = start_both(None);
    let client = client();
    let url = format!("{proxy_url}/api/accounts");
    let (arrivals, patience) = (Duration::from_secs(121), Duration::from_secs(5));
    let started = Instant::now();
    let mut clients = Vec::new();
    let mut n = 0u32;
    while started.elapsed() < arrivals {
        let (client, url) = (client.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let reply = tokio::time::timeout(patience, get(&client, &url, KEY_A)).await.ok();
            reply.map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
        }));
        n += 1;
        tokio::time::sleep_until(started + Duration::from_millis(500) * n).await;
    }
    let (mut served, mut told) = (0, 0);
    for c in clients {
        match c.await.unwrap() {
            Some((StatusCode::OK, _)) => served += 1,
            // Arrivals whose slot is past `queue.max_wait_ms` are told at once when to
            // come back: the proxy's answer, not Klaviyo's.
            Some((StatusCode::TOO_MANY_REQUESTS, body)) if body.contains("proxy_queue_timeout") => told += 1,
            Some((status, body)) => panic!("a client got {status}: {body}"),
            None => {}
        }
    }
    assert!(told < n, "some clients waited");
    let windows = [(1, Duration::from_millis(1050)), (15, Duration::from_millis(60_250))];
    // Demand lasted from the first arrival until the last client gave up.
    let quota = allowed(&windows, arrivals + patience);
    let stats = stats(&sim_url).await;
    let received = bucket(&stats, "get_accounts", "endpoint").iter().map(|b| b.requests).sum::<u64>();
    assert_eq!(stats.throttled, 0);
    // A client may give up while its request is already on the wire: one whose slot
    // came within a round trip of its patience. How many depends on the machine's
    // load (2 seen quiet, 3 with three builds running), not on the limiter.
    // The figure for a report: `cargo test --test limiter -- --nocapture`.
    eprintln!("starvation: {received} received of the {quota} the windows allow ({served} served, {told} told)");
    assert!(served <= received && received <= served + 4, "{served} served, {received} received");
    assert!(received * 100 >= quota as u64 * 95, "the simulator received {received} of the {quota} the windows allow");
    assert!(received <= quota as u64 + 1, "{received} is more than the windows allow ({quota})");
}

/// The issue's head-of-line scenario: fifteen `GET /api/profiles/{id}?include=lists`
/// at once wait for the condition's 1/s; a plain `GET /api/profiles/{id}` arriving 0.1 s
/// later needs only the endpoint's bucket, which has room, and is served within one
/// burst window, long before the conditional queue drains (before the fix: after all
/// fifteen, at 14.7 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_pass_a_queue_of_conditional_ones() {
    let (_sim, sim_url, _proxy, proxy_url) = start_both(None);
    let client = client();
    let started = Instant::now();
    let lists: Vec<_> = (0..15)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{proxy_url}/api/profiles/01XYZ?include=lists"));
            tokio::spawn(async move {
                let r = get(&client, &url, KEY_A).await;
                (r.status, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let plain = get(&client, &format!("{proxy_url}/api/profiles/01XYZ"), KEY_A).await;
    let plain_done = started.elapsed();
    assert_eq!(plain.status, StatusCode::OK);
    let mut before_plain = 0;
    for l in lists {
        let (status, done) = l.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        before_plain += usize::from(done < plain_done);
    }
    eprintln!("head of line: the plain request was served after {plain_done:?}, {before_plain} conditional before it");
    // A generous bound for a loaded machine; the count below is the real check.
    assert!(plain_done < Duration::from_secs(5), "the plain request waited {plain_done:?}");
    assert!(before_plain <= 3, "{before_plain} conditional requests were served before the plain one");
    let stats = stats(&sim_url).await;
    assert_eq!(stats.throttled, 0);
    for b in &stats.buckets {
        for (window, max) in &b.max_sliding {
            assert!(max <= &b.limits[window], "{} {} {window}: {max} > {}", b.operation, b.bucket, b.limits[window]);
        }
    }
}

/// Restarts with `limiter.state_path` must not let a window exceed its limit: not a
/// second steady window (`get_accounts`, here 1/s and 6/min) and not a second day's
/// cap (`create_flow`, here 3/day), as the simulator counts, whether the proxy was
/// killed (`kill -9`, the last requests after its last snapshot) or stopped cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_the_windows() {
    let dir = std::env::temp_dir().join(format!("kp-limiter-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    let state = dir.join("limiter-state.json");
    let toml = format!(
        "[auth]\naccount_hash_key = \"restart-test-hash-key\"\n[limiter]\nstate_path = \"{}\"\n\
         [limits.operations.get_accounts]\nburst_per_second = 1\nsteady_per_minute = 6\n\
         [limits.operations.create_flow]\nburst_per_second = 1\nsteady_per_minute = 15\ndaily_per_day = 3\n",
        state.display()
    );
    // Account lookups would spend get_accounts tokens this test counts.
    std::fs::write(&config, format!("{toml}[accounts]\nresolve = false\n")).unwrap();
    let config = config.to_str().unwrap().to_string();
    let (_sim, sim_url) = process::start(BIN, &["simulate", "--listen", "127.0.0.1:0", "--seed", "1"], &[]);
    let client = client();
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let call = |url: String, post: bool, wait: &'static str| {
        let (client, auth) = (client.clone(), auth.clone());
        async move {
            let headers = [("authorization", auth.as_str()), ("x-proxy-max-wait-ms", wait)];
            match post {
                true => {
                    send(&client, http::Method::POST, &format!("{url}/api/flows"), &headers, r#"{"data":{}}"#).await
                }
                false => send(&client, http::Method::GET, &format!("{url}/api/accounts"), &headers, "").await,
            }
        }
    };
    let (proxy, url) = process::start(BIN, &process::serve_args(&sim_url, Some(&config)), &[]);
    // The steady window is spent, then a snapshot is surely written...
    let replies: Vec<_> = (0..6).map(|_| tokio::spawn(call(url.clone(), false, "20000"))).collect();
    for r in replies {
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...and the daily cap right before the kill, after the last snapshot.
    for _ in 0..3 {
        let r = call(url.clone(), true, "20000").await;
        assert!(r.status.is_success(), "{}: {:?}", r.status, r.body);
    }
    drop(proxy); // SIGKILL
    let refused = |r: &Reply| {
        r.status == StatusCode::TOO_MANY_REQUESTS && String::from_utf8_lossy(&r.body).contains("proxy_queue_timeout")
    };
    for generation in ["after kill -9", "after a clean stop"] {
        let (mut proxy, url) = process::start(BIN, &process::serve_args(&sim_url, Some(&config)), &[]);
        let r = call(url.clone(), false, "2500").await;
        assert!(refused(&r), "{generation}: get_accounts {} {:?}", r.status, r.body);
        let r = call(url.clone(), true, "2500").await;
        assert!(refused(&r), "{generation}: create_flow {} {:?}", r.status, r.body);
        // A clean stop: SIGTERM, and the process drains and exits by itself.
        let pid = proxy.0.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while proxy.0.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "no clean exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let stats = stats(&sim_url).await;
    let count = |op| bucket(&stats, op, "endpoint").iter().map(|b| b.requests).sum::<u64>();
    assert_eq!((count("get_accounts"), count("create_flow")), (6, 3), "what reached the simulator");
    std::fs::remove_dir_all(&dir).unwrap();
}
