//! End-to-end tests of the core: the proxy in front of the simulator, on loopback.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use klaviyo_proxy::sim::{account_alias, SimOptions};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_five_times_the_limit_all_succeed_without_429() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "")).await;
    let client = client();
    // get_campaigns is M tier: 10/s, 150/min. Fifty at once is five bursts.
    let url = format!("{}/api/campaigns?filter=equals(messages.channel,'email')", proxy.url());
    let replies = futures(50, |_| {
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url, KEY_A).await }
    })
    .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert!(r.header("ratelimit-remaining").is_some());
    }
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0);
    let b = &bucket(&stats, "get_campaigns", "endpoint")[0];
    assert_eq!(b.requests, 50);
    assert!(b.max_sliding["burst"] <= 10, "{b:?}");
}

/// Runs `n` futures concurrently and collects their outputs in order.
async fn futures<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_and_accounts_have_their_own_buckets() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "")).await;
    let client = client();
    // Ten each of two M-tier operations (10/s) for two accounts: forty requests, and none of
    // them should wait, because no bucket gets more than its burst of ten.
    let started = Instant::now();
    let replies = futures(40, |i| {
        let client = client.clone();
        let path = if i % 2 == 0 { "/api/campaigns" } else { "/api/metrics" };
        let url = format!("{}{path}?filter=x", proxy.url());
        let key = if (i / 2) % 2 == 0 { KEY_A } else { KEY_B };
        async move { get(&client, &url, key).await }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    // Shared buckets would need four bursts (over three seconds); separate ones, one.
    assert!(started.elapsed() < Duration::from_millis(2500), "took {:?}", started.elapsed());
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0);
    let alias = |k: &str| account_alias(&format!("Klaviyo-API-Key {k}"));
    for op in ["get_campaigns", "get_metrics"] {
        let buckets = bucket(&stats, op, "endpoint");
        assert_eq!(buckets.len(), 2, "{op}: {buckets:?}");
        for (b, key) in buckets.iter().zip([KEY_A, KEY_B]) {
            assert_eq!(b.requests, 10);
            assert!(b.account == alias(key) || b.account == alias(if key == KEY_A { KEY_B } else { KEY_A }));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_limit_takes_both_buckets() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "")).await;
    let client = client();
    let with = format!("{}/api/profiles/01ABC?include=lists", proxy.url());
    let without = format!("{}/api/profiles/01ABC", proxy.url());
    assert_eq!(get(&client, &with, KEY_A).await.status, StatusCode::OK);
    // The include=list bucket (1/s) is spent; the endpoint bucket (75/s) is not.
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let hurry = [("authorization", auth.as_str()), ("x-proxy-max-wait-ms", "100")];
    let refused = send(&client, Method::GET, &with, &hurry, "").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(send(&client, Method::GET, &without, &hurry, "").await.status, StatusCode::OK);
    // Waiting is allowed by default: three more go at the conditional bucket's pace.
    let started = Instant::now();
    for _ in 0..2 {
        assert_eq!(get(&client, &with, KEY_A).await.status, StatusCode::OK);
    }
    assert!(started.elapsed() >= Duration::from_millis(1000), "{:?}", started.elapsed());
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0);
    assert_eq!(bucket(&stats, "get_profile", "include=list")[0].requests, 3);
    assert_eq!(bucket(&stats, "get_profile", "endpoint")[0].requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_and_full_answer_at_once_with_truthful_retry_after() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "[queue]\nmax_depth = 2\n")).await;
    let client = client();
    let url = format!("{}/api/accounts", proxy.url());
    assert_eq!(get(&client, &url, KEY_A).await.status, StatusCode::OK);

    // get_accounts is 1/s: the next slot is about 1.05 s away.
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let started = Instant::now();
    let r = send(&client, Method::GET, &url, &[("authorization", &auth), ("x-proxy-max-wait-ms", "200")], "").await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("x-klaviyo-proxy-error"), Some("proxy_queue_timeout"));
    assert_eq!(r.header("retry-after"), Some("2"), "ceil(1.05 s)");
    let e = &r.json()["errors"][0];
    assert_eq!((e["status"].as_u64(), e["code"].as_str()), (Some(429), Some("proxy_queue_timeout")));

    // Two wait (the queue's depth), the third is refused at once.
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url, KEY_A).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let full = get(&client, &url, KEY_A).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(full.header("x-klaviyo-proxy-error"), Some("proxy_queue_full"));
    let retry: u64 = full.header("retry-after").unwrap().parse().unwrap();
    // Slots at ~1.05 s and ~2.1 s are taken; the next is ~3.15 s from the first request.
    assert!((2..=4).contains(&retry), "retry-after {retry}");
    for q in queued {
        assert_eq!(q.await.unwrap().status, StatusCode::OK);
    }
    // Honouring the Retry-After works.
    tokio::time::sleep(Duration::from_secs(retry).saturating_sub(started.elapsed())).await;
    let again = send(&client, Method::GET, &url, &[("authorization", &auth), ("x-proxy-max-wait-ms", "0")], "").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(sim.stats().throttled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_frees_its_place() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "[queue]\nmax_depth = 1\n")).await;
    let client = client();
    let url = format!("{}/api/accounts", proxy.url());
    assert_eq!(get(&client, &url, KEY_A).await.status, StatusCode::OK);
    // A raw client queues for the next slot, then hangs up.
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    let head =
        format!("GET /api/accounts HTTP/1.1\r\nhost: localhost\r\nauthorization: Klaviyo-API-Key {KEY_A}\r\n\r\n");
    raw.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It holds the only place in the queue.
    let full = get(&client, &url, KEY_A).await;
    assert_eq!(full.header("x-klaviyo-proxy-error"), Some("proxy_queue_full"));
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its place is free: with a depth of one, another request may queue.
    let r = get(&client, &url, KEY_A).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(sim.stats().requests, 2, "the hung-up request never went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_simulator_with_an_extra_ca() {
    let sim = sim(SimOptions { tls: true, ..SimOptions::default() }).await;
    let dir = std::env::temp_dir().join(format!("kp-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, sim.ca_pem.as_ref().unwrap()).unwrap();
    let mut with_ca = config(&sim.url, "");
    with_ca.upstream.ca_file = Some(ca.clone());
    let trusted = proxy(with_ca).await;
    // One attempt: a refused certificate is a connection failure, which the proxy
    // would otherwise retry until the breaker opens (503 proxy_circuit_open).
    let untrusted = proxy(config(&sim.url, "[retry]\nmax_attempts = 1\n")).await;
    let client = client();
    let ok = get(&client, &format!("{}/api/accounts", trusted.url()), KEY_A).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(ok.json()["data"][0]["type"], "account");
    let bad = get(&client, &format!("{}/api/accounts", untrusted.url()), KEY_B).await;
    assert_eq!(bad.status, StatusCode::BAD_GATEWAY);
    assert_eq!(bad.header("x-klaviyo-proxy-error"), Some("proxy_upstream_unreachable"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Klaviyo counts a request when it arrives. From a cold pool every request first
/// needs a TLS handshake (here 300 ms, as to a distant Klaviyo): a token taken before
/// it would be stamped 300 ms early, and the first burst would reach the upstream
/// bunched against the next one (two bursts inside one second). The proxy holds a
/// connection before it takes the token, so what arrives keeps the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_pools_handshakes_do_not_bunch_a_burst_at_the_upstream() {
    let sim = sim(SimOptions { tls: true, handshake_delay: Duration::from_millis(300), ..SimOptions::default() }).await;
    let dir = std::env::temp_dir().join(format!("kp-cold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, sim.ca_pem.as_ref().unwrap()).unwrap();
    let mut with_ca = config(&sim.url, "");
    with_ca.upstream.ca_file = Some(ca);
    let proxy = proxy(with_ca).await;
    let client = client();
    // get_campaigns: 10/s. Twelve at once: a burst on new connections, and two more.
    let url = format!("{}/api/campaigns", proxy.url());
    let replies = futures(12, |_| {
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url, KEY_A).await }
    })
    .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0);
    let b = &bucket(&stats, "get_campaigns", "endpoint")[0];
    assert_eq!(b.requests, 12);
    assert!(b.max_sliding["burst"] <= 10, "arrivals at the upstream: {b:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Writes a raw request and returns the status line and body.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_an_open_relay() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "")).await;
    let cases = [
        ("GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nhost: 169.254.169.254\r\nconnection: close\r\n\r\n", "403", "proxy_forbidden_host"),
        ("GET http://evil.example/api/accounts HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n", "403", "proxy_forbidden_host"),
        ("CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\n\r\n", "405", "proxy_connect_refused"),
        ("GET /admin HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n", "404", "proxy_unknown_path"),
        ("GET //evil.example/api/accounts HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n", "404", "proxy_unknown_path"),
    ];
    for (req, status, code) in cases {
        let reply = raw(proxy.addr, req).await;
        assert!(reply.starts_with(&format!("HTTP/1.1 {status}")), "{req:?} -> {reply}");
        assert!(reply.contains(code), "{req:?} -> {reply}");
        assert!(reply.to_lowercase().contains("x-klaviyo-proxy-error"), "{reply}");
    }
    // An absolute-form request for the upstream itself is fine.
    let own = format!("GET {}/api/accounts HTTP/1.1\r\nhost: localhost\r\nauthorization: Klaviyo-API-Key {KEY_A}\r\nconnection: close\r\n\r\n", sim.url);
    assert!(raw(proxy.addr, &own).await.starts_with("HTTP/1.1 200"));
    assert_eq!(sim.stats().requests, 1, "nothing else reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_bodies_and_auth_modes() {
    let sim = sim(SimOptions::default()).await;
    let pass = proxy(config(&sim.url, "")).await;
    let client = client();
    // No revision from the client: the proxy adds it (the simulator would answer 400).
    let event = r#"{"data":{"type":"event","attributes":{"properties":{},"metric":{"data":{"type":"metric","attributes":{"name":"Viewed"}}},"profile":{"data":{"type":"profile","attributes":{"email":"a@example.com"}}}}}}"#;
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let r = send(
        &client,
        Method::POST,
        &format!("{}/api/events", pass.url()),
        &[("authorization", &auth), ("content-type", "application/vnd.api+json")],
        event,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert!(r.header("x-request-id").is_some());
    // Pass-through without a key: Klaviyo's own 401 comes back.
    let r = send(&client, Method::GET, &format!("{}/api/accounts", pass.url()), &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("x-klaviyo-proxy-error"), None);
    // Bodies over the limit: 413 in the JSON:API shape, nothing sent upstream.
    let small = proxy(config(&sim.url, "[server]\nmax_body_bytes = 1000\n")).await;
    let before = sim.stats().requests;
    let r = send(
        &client,
        Method::POST,
        &format!("{}/api/events", small.url()),
        &[("authorization", &auth)],
        &"x".repeat(5000),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["errors"][0]["code"], "proxy_body_too_large");
    assert_eq!(sim.stats().requests, before);
    // Inject mode: the proxy's key goes upstream; client keys can be forbidden.
    let mut inject = config(&sim.url, "[auth]\nmode = \"inject\"\nallow_client_keys = false\n");
    inject.auth.private_key = Some(klaviyo_proxy::config::Secret::new(KEY_B));
    let inject = proxy(inject).await;
    let r = send(&client, Method::GET, &format!("{}/api/accounts", inject.url()), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let r =
        send(&client, Method::GET, &format!("{}/api/accounts", inject.url()), &[("authorization", &auth)], "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["errors"][0]["code"], "proxy_client_key_forbidden");
    let stats = sim.stats();
    let b = bucket(&stats, "get_accounts", "endpoint");
    assert!(b.iter().any(|b| b.account == account_alias(&format!("Klaviyo-API-Key {KEY_B}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_token_guards_remote_listeners() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "[server]\nclient_token = \"s3cret-token-0123456789\"\n")).await;
    let client = client();
    let url = format!("{}/api/accounts", proxy.url());
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let r = send(&client, Method::GET, &url, &[("authorization", &auth)], "").await;
    assert_eq!(r.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert!(!String::from_utf8_lossy(&r.body).contains("s3cret-token-0123456789"));
    let r = send(
        &client,
        Method::GET,
        &url,
        &[("authorization", &auth), ("proxy-authorization", "Bearer s3cret-token-0123456789")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_arrivals_never_exceed_a_window_at_the_simulator() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "")).await;
    let client = client();
    // Ninety requests at seeded random times over ~2.5 s, over an S-tier operation
    // (3/s), an M-tier one (10/s) and a conditional limit (1/s) on an L-tier one.
    let mut rng = fastrand::Rng::with_seed(42);
    let plan: Vec<(u64, &str)> = (0..90)
        .map(|i| {
            let path = match i % 6 {
                0 | 1 => "/api/flows",
                2..=4 => "/api/metrics",
                _ => "/api/profiles/01XYZ?include=lists",
            };
            (rng.u64(..2500), path)
        })
        .collect();
    let started = Instant::now();
    let replies = futures(plan.len(), |i| {
        let (client, (at, path)) = (client.clone(), plan[i]);
        let url = format!("{}{path}", proxy.url());
        async move {
            tokio::time::sleep_until(started + Duration::from_millis(at)).await;
            get(&client, &url, KEY_A).await
        }
    })
    .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "all wait their turn (30 s deadline): {:?}", r.body);
    }
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0);
    for b in &stats.buckets {
        for (window, max) in &b.max_sliding {
            assert!(max <= &b.limits[window], "{} {} {window}: {max} > {}", b.operation, b.bucket, b.limits[window]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steady_window_holds_end_to_end() {
    let sim = sim(SimOptions::default()).await;
    // A tight override so the steady window binds within one test: 5/s and 6/min
    // (get_campaigns allows 10/s and 150/min at Klaviyo).
    let overrides =
        "[limits.operations.get_campaigns]\nburst_per_second = 5\nsteady_per_minute = 6\n[queue]\nmax_wait_ms = 70000\n";
    let proxy = proxy(config(&sim.url, overrides)).await;
    let client = client();
    let url = format!("{}/api/campaigns?filter=x", proxy.url());
    let started = Instant::now();
    let done = futures(8, |_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = get(&client, &url, KEY_A).await;
            (r.status, started.elapsed())
        }
    })
    .await;
    let mut times: Vec<Duration> = done
        .iter()
        .map(|(s, t)| {
            assert_eq!(*s, StatusCode::OK);
            *t
        })
        .collect();
    times.sort();
    // Six go in the first burst windows; the seventh only a full minute after the first.
    assert!(times[5] < Duration::from_secs(5), "{times:?}");
    assert!(times[6] >= Duration::from_millis(60_250), "{times:?}");
    let stats = sim.stats();
    let b = &bucket(&stats, "get_campaigns", "endpoint")[0];
    assert!(b.max_sliding["steady"] <= 6 && b.max_sliding["burst"] <= 5, "{b:?}");
    assert_eq!(stats.throttled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_slow_clients_are_cut_off() {
    let sim = sim(SimOptions::default()).await;
    let proxy = proxy(config(&sim.url, "[server]\nmax_header_bytes = 16384\nclient_read_timeout_ms = 300\n")).await;
    let big = format!(
        "GET /api/accounts HTTP/1.1\r\nhost: localhost\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(40_000)
    );
    let reply = raw(proxy.addr, &big).await;
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 431"), "{reply}");
    // A client that never finishes its head is disconnected after the read timeout.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /api/accounts HTTP/1.1\r\nhost: localhost\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 5 s");
    // A body that is never finished gets 408 in the JSON:API shape.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /api/events HTTP/1.1\r\nhost: localhost\r\nauthorization: Klaviyo-API-Key {KEY_A}\r\ncontent-length: 100\r\n\r\n{{");
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await.unwrap().unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408") && reply.contains("proxy_client_timeout"), "{reply}");
    assert_eq!(sim.stats().requests, 0);
}

/// A request that waits in line leaves with what it came with, every header in order,
/// repeated ones and non-ASCII values included, just as a request that went at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_leaves_with_every_header_it_came_with() {
    let (upstream, seen) = recorder().await;
    let proxy = proxy(config(
        &format!("http://{upstream}"),
        "[limits.operations.get_campaigns]\nburst_per_second = 1\nsteady_per_minute = 60\n",
    ))
    .await;
    let client = client();
    let url = format!("{}/api/campaigns?filter=x", proxy.url());
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let long = "v".repeat(300);
    let headers: Vec<(&str, String)> = [
        ("authorization", auth.as_str()),
        ("x-trace", "first"),
        ("x-dup", "one"),
        ("accept", "application/vnd.api+json"),
        ("x-dup", "two"),
        ("x-dup", ""),
        ("x-name", "Zoë Ångström"),
        ("x-long", long.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect();
    let replies = futures(2, |_| {
        let (client, url, headers) = (client.clone(), url.clone(), headers.clone());
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(&client, Method::GET, &url, &headers, "").await
        }
    })
    .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    // The second waited for the next second's token: it was queued.
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(900), "{:?}", seen[1].at - seen[0].at);
    assert_eq!(seen[0].headers, seen[1].headers, "the queued request's headers differ from the one that went at once");
    let sent: Vec<(String, String)> =
        headers.iter().filter(|(k, _)| *k != "authorization").map(|(k, v)| (k.to_string(), v.clone())).collect();
    let forwarded: Vec<(String, String)> = seen[1]
        .headers
        .iter()
        .filter(|(k, _)| sent.iter().any(|(s, _)| s == k))
        .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).expect("sent as UTF-8")))
        .collect();
    let mut expected = sent.clone();
    // A header map keeps repeated names together, in the order they came.
    expected.sort_by_key(|(k, _)| sent.iter().position(|(s, _)| s == k));
    assert_eq!(forwarded, expected);
}
