//! Klaviyo's bad days, end to end: the real binary (`simulate` as the upstream, with
//! its faults, and `serve` in front of it with the default settings), a client sending
//! GETs at a steady rate, and the simulator's own counts of what reached it.
//!
//! The scenarios are the issue's, shortened where that keeps their shape (same rates,
//! same fault, fewer requests) so the suite stays fast. `measure_bad_days` (ignored;
//! `cargo test --test bad_days -- --ignored --nocapture`) runs them at full size, each
//! beside a direct run (the client straight to the simulator), and prints the table
//! that docs/benchmarks.md shows.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::sim::Stats;
use serde_json::Value;
use support::process::{self, Running};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");
/// The simulator's seed: its random 429s come in the same order in every run.
const SEED: u64 = 11;
const AUTH: &str = "Klaviyo-API-Key pk_bad_days_0123456789";
/// An L-tier read (75/s, 750/min): its own limits are far above the arrival rate.
const PATH: &str = "/api/lists";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A started binary and the URLs of its first `lines` stdout lines.
fn start(args: &[&str], lines: usize) -> (Running, Vec<String>) {
    // `BAD_DAYS_BIN` runs another build (a release one) for the measurements.
    let bin = std::env::var("BAD_DAYS_BIN").unwrap_or_else(|_| BIN.to_string());
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(match std::env::var("BAD_DAYS_LOG") {
            Ok(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap()),
            Err(_) => Stdio::null(),
        })
        .spawn()
        .expect("start klaviyo-proxy");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let running = Running(child);
    let urls = (0..lines)
        .map(|_| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("a stdout line");
            let url = line.trim().rsplit(' ').next().unwrap_or_default().to_string();
            assert!(url.starts_with("http"), "unexpected line {line:?}");
            url
        })
        .collect();
    (running, urls)
}

struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        let name = format!("klaviyo-proxy-bad-days-{}-{}.toml", std::process::id(), fastrand::u64(..));
        let path = std::env::temp_dir().join(name);
        // Account lookups would add upstream requests these scenarios count.
        let mut text = format!("{text}\n[accounts]\nresolve = false\n");
        // With `BAD_DAYS_LOG`, the proxy's log level (e.g. `klaviyo_proxy=debug`).
        if let Ok(level) = std::env::var("BAD_DAYS_LOG_LEVEL") {
            text.push_str(&format!("[log]\nlevel = {level:?}\n"));
        }
        // `BAD_DAYS_CONFIG` adds sections (e.g. `[breaker]` with another cool_down_max_ms).
        if let Ok(extra) = std::env::var("BAD_DAYS_CONFIG") {
            text.push_str(&format!("{extra}\n"));
        }
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The simulator (20 ms latency, like the mock) and, unless `direct`, the proxy
/// with its default settings in front of it.
struct Stack {
    sim_url: String,
    /// Where the client sends: the proxy, or the simulator itself for a direct run.
    target: String,
    admin: Option<String>,
    client: HttpClient,
    _proxy: Option<Running>,
    _sim: Running,
    _config: Option<TempFile>,
}

impl Stack {
    fn start(sim_flags: &[&str], direct: bool, config: Option<&str>) -> Stack {
        let seed = SEED.to_string();
        let mut args = vec!["simulate", "--listen", "127.0.0.1:0", "--seed", &seed, "--latency-ms", "20"];
        args.extend_from_slice(sim_flags);
        let (sim, urls) = start(&args, 1);
        let sim_url = urls[0].clone();
        // Always a config file: TempFile switches account lookups off (they add upstream requests).
        let config = Some(TempFile::new(config.unwrap_or("")));
        let (proxy, target, admin) = if direct {
            (None, sim_url.clone(), None)
        } else {
            let args = process::serve_args(&sim_url, config.as_ref().map(|f| f.0.to_str().unwrap()));
            let (proxy, urls) = start(&args, 2);
            (Some(proxy), urls[0].clone(), Some(urls[1].clone()))
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(http);
        Stack { sim_url, target, admin, client, _proxy: proxy, _sim: sim, _config: config }
    }

    async fn call(&self, method: Method, url: String, body: &str) -> (StatusCode, http::HeaderMap, Bytes) {
        self.try_call(method, url, body).await.expect("an HTTP answer")
    }

    /// One request; `Err` when the connection failed (a direct client meets the resets).
    async fn try_call(
        &self,
        method: Method,
        url: String,
        body: &str,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), hyper_util::client::legacy::Error> {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", AUTH)
            .header("revision", "2026-07-15")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(60), self.client.request(req))
            .await
            .expect("an answer within 60 s")?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok((parts.status, parts.headers, body))
    }

    async fn stats(&self) -> Stats {
        let (status, _, body) = self.call(Method::GET, format!("{}/__sim/stats", self.sim_url), "").await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).unwrap()
    }

    async fn set_faults(&self, faults: Value) {
        let (status, _, body) =
            self.call(Method::POST, format!("{}/__sim/faults", self.sim_url), &faults.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }

    /// The proxy's `/metrics` text.
    async fn metrics(&self) -> String {
        let admin = self.admin.as_ref().expect("a proxy");
        let (_, _, body) = self.call(Method::GET, format!("{admin}/metrics"), "").await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// `n` GETs of [`PATH`], one every `every` from now whatever the answers (an open
    /// loop, as independent clients send), each answer timed.
    async fn open_loop(self: &Arc<Self>, n: usize, every: Duration) -> (Instant, Vec<Shot>) {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let stack = self.clone();
            let at = t0 + every * i as u32;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let started = Instant::now();
                let answer = stack.try_call(Method::GET, format!("{}{PATH}", stack.target), "").await;
                // A broken connection (only a direct client meets them) counts as 599.
                let (status, headers) = answer.map_or((CONNECTION_FAILED, http::HeaderMap::new()), |(s, h, _)| (s, h));
                let code = headers.get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap().to_string());
                Shot { started: started - t0, took: started.elapsed(), status, code }
            }));
        }
        let mut shots = Vec::new();
        for t in tasks {
            shots.push(t.await.unwrap());
        }
        (t0, shots)
    }
}

/// One client request: when it started (from the start of the run), how long it took,
/// and its answer.
#[derive(Debug, Clone)]
struct Shot {
    started: Duration,
    took: Duration,
    status: StatusCode,
    code: Option<String>,
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default()
}

/// The value of a Prometheus sample whose line starts with `prefix`, summed.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A Cloudflare challenge is answered at once with the proxy's own error: not repeated,
/// not an auth failure (it must not page anyone), its own outcome label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudflare_challenge_is_not_retried_nor_an_auth_failure() {
    let stack = Stack::start(&["--challenge-rate", "1"], false, None);
    let (status, headers, body) = stack.call(Method::GET, format!("{}{PATH}", stack.target), "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers.get("x-klaviyo-proxy-error").unwrap(), "proxy_upstream_challenged");
    assert!(headers.get("retry-after").is_none());
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["errors"][0]["code"], "proxy_upstream_challenged");
    assert_eq!(doc["errors"][0]["status"], 502);
    let stats = stack.stats().await;
    assert_eq!(stats.requests, 1, "a challenge is not repeated");
    let metrics = stack.metrics().await;
    assert_eq!(sample(&metrics, "klaviyo_proxy_upstream_auth_failures_total{"), 0.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "klaviyo_proxy_requests_total{operation=\"get_lists\",tier=\"L\",outcome=\"challenged\"}"),
        1.0,
        "{metrics}"
    );
    // The breaker does not take a challenge for an outage either.
    for _ in 0..5 {
        let (status, headers, _) = stack.call(Method::GET, format!("{}{PATH}", stack.target), "").await;
        assert_eq!(
            (status, headers.get("x-klaviyo-proxy-error").unwrap().to_str().unwrap()),
            (StatusCode::BAD_GATEWAY, "proxy_upstream_challenged")
        );
    }
    assert_eq!(stack.stats().await.requests, 6);
}

/// A 429 without `Retry-After`: the proxy waits what Klaviyo's body names ("Expected
/// available in 2 seconds.") instead of guessing with its backoff, so its one retry
/// lands after the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_without_retry_after_waits_what_its_body_names() {
    let stack = Stack::start(&[], false, None);
    stack.set_faults(serde_json::json!({"throttle_for_ms": 2000, "retry_after": ""})).await;
    let started = Instant::now();
    let (status, _, _) = stack.call(Method::GET, format!("{}{PATH}", stack.target), "").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let stats = stack.stats().await;
    assert_eq!((stats.requests, stats.throttled), (2, 1), "one 429, then one request after the named wait");
}

/// The status a client request gets in these figures when its connection broke.
const CONNECTION_FAILED: StatusCode = match StatusCode::from_u16(599) {
    Ok(s) => s,
    Err(_) => panic!("599 is a valid status"),
};

/// Requests arrive at 5/s, as in the issue.
const EVERY: Duration = Duration::from_millis(200);

/// "Another consumer" spends the account's quota now and then: each request reaching
/// Klaviyo has a 10% chance to draw a 429 that holds the bucket for 2 s
/// (`Retry-After: 2`); `n` GETs at 5/s.
#[derive(Debug)]
struct ConsumerFigures {
    requests: usize,
    upstream: u64,
    inside_retry_after: u64,
    client_429s: usize,
    client_ok: usize,
    p50: Duration,
    p99: Duration,
}

async fn another_consumer(direct: bool, n: usize) -> ConsumerFigures {
    let flags = ["--throttle-rate", "0.1", "--retry-after", "2", "--throttle-holds"];
    let stack = Arc::new(Stack::start(&flags, direct, None));
    let (_, shots) = stack.open_loop(n, EVERY).await;
    let stats = stack.stats().await;
    ConsumerFigures {
        requests: n,
        upstream: stats.requests,
        inside_retry_after: stats.inside_retry_after,
        client_429s: shots.iter().filter(|s| s.status == StatusCode::TOO_MANY_REQUESTS).count(),
        client_ok: shots.iter().filter(|s| s.status.is_success()).count(),
        p50: percentile(shots.iter().map(|s| s.took).collect(), 0.5),
        p99: percentile(shots.iter().map(|s| s.took).collect(), 0.99),
    }
}

/// The best any proxy that keeps arrival order could do in [`another_consumer`] with
/// the simulator's seed: a zero round trip and one request at a time, each going the
/// instant the bucket is free, so none is ever sent inside a hold. The simulator draws
/// one number per request reaching it outside a hold (10%: a 429 and a 2 s hold), plus
/// two for the bucket's window phases after the first; the client p50 and p99.
fn ideal_consumer(n: usize) -> (Duration, Duration) {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut draws = 0u32;
    let mut throttled = || {
        let hit = rng.f64() < 0.1;
        draws += 1;
        if draws == 1 {
            // The window phases of the bucket the first request created.
            rng.u64(..);
            rng.u64(..);
        }
        hit
    };
    let mut free = Duration::ZERO;
    let took: Vec<Duration> = (0..n)
        .map(|i| {
            let arrived = EVERY * i as u32;
            let mut at = arrived.max(free);
            while throttled() {
                at += Duration::from_secs(2);
            }
            free = at;
            at - arrived
        })
        .collect();
    (percentile(took.clone(), 0.5), percentile(took, 0.99))
}

/// Klaviyo is down for 10 s (`unavailable`: every request answered 503; `reset`: every
/// connection reset), `before` and `after` it requests flow; GETs at 5/s throughout.
#[derive(Debug)]
struct OutageFigures {
    /// Requests that reached the simulator during the outage (503s answered, or
    /// connections reset).
    upstream_during: u64,
    /// Client requests that started after the outage ended and did not succeed.
    errors_after: usize,
    /// From the end of the outage to the first success answered after it.
    recovery: Duration,
    /// The proxy's fail-fast answers (`proxy_circuit_open` to requests arriving once
    /// the breaker was seen open): how many, p99.
    fail_fast: usize,
    fail_fast_p50: Duration,
    fail_fast_p99: Duration,
}

const OUTAGE: Duration = Duration::from_secs(10);

async fn outage(mode: &str, direct: bool, before: Duration, after: Duration) -> OutageFigures {
    let stack = Arc::new(Stack::start(&[], direct, None));
    let n = ((before + OUTAGE + after).as_millis() / EVERY.as_millis()) as usize;
    let t0 = Instant::now();
    let load = {
        let stack = stack.clone();
        tokio::spawn(async move { stack.open_loop(n, EVERY).await })
    };
    tokio::time::sleep_until(t0 + before).await;
    let count = |s: &Stats| s.server_errors + s.reset_connections;
    let at_start = count(&stack.stats().await);
    // The simulator ends the outage by itself: a reset one cuts off its control
    // endpoint too (and may cut off this very answer). Taken before sending, the end
    // is at or before the simulator's own, so "after the end" errs on the strict side.
    let end = Instant::now() + OUTAGE;
    let faults = serde_json::json!({"outage": mode, "outage_ms": OUTAGE.as_millis() as u64}).to_string();
    let set = Request::post(format!("{}/__sim/faults", stack.sim_url)).body(Full::new(Bytes::from(faults))).unwrap();
    let _ = stack.client.request(set).await;
    let (t0, shots) = load.await.unwrap();
    let end = end.duration_since(t0);
    let upstream_during = count(&stack.stats().await) - at_start;
    let errors_after = shots.iter().filter(|s| s.started >= end && !s.status.is_success()).count();
    let recovery = shots
        .iter()
        .filter(|s| s.status.is_success() && s.started + s.took >= end)
        .map(|s| s.started + s.took - end)
        .min()
        .unwrap_or(Duration::MAX);
    // Fail-fast answers: requests that arrived while the breaker was known open (a
    // request already retrying when it opened is answered after its backoff).
    let open = |s: &&Shot| s.code.as_deref() == Some("proxy_circuit_open");
    let known_open = shots.iter().filter(open).map(|s| s.started + s.took).min().unwrap_or(Duration::MAX);
    let fast: Vec<Duration> = shots.iter().filter(open).filter(|s| s.started >= known_open).map(|s| s.took).collect();
    OutageFigures {
        upstream_during,
        errors_after,
        recovery,
        fail_fast: fast.len(),
        fail_fast_p50: percentile(fast.clone(), 0.5),
        fail_fast_p99: percentile(fast, 0.99),
    }
}

/// Both outages against the targets (≤ 10 upstream requests during the outage,
/// ≤ 2 client errors started after it, recovery ≤ 1 s, fail-fast ≤ 5 ms p99), as far
/// as probing with real requests can meet them at 5 requests/s: the breaker opens
/// after 3 failures (a retry may be in flight then: 3 or 4 requests) and probes 0.5 s
/// later, then 1 s after each failed probe's answer; the probe is the next request to
/// arrive, and on the 200 ms arrival grid that makes probes 1.2 s apart. So 10 s of
/// outage cost 3–4 + 8–9 requests (11–12 seen; at most 13), and the outage's end falls
/// anywhere in a 1.2 s gap: up to 6 requests arrive before the probe that closes the
/// breaker (0–4 seen). A longer interval trades the one target for the other (see
/// docs/benchmarks.md); the bounds below are what this schedule guarantees, with the
/// latencies generous for a loaded machine.
fn assert_outage_targets(mode: &str, f: &OutageFigures) {
    println!("FIGURES outage {mode}: {f:?}");
    assert!(f.upstream_during <= 13, "{mode}: {} upstream requests during the 10 s outage", f.upstream_during);
    assert!(f.errors_after <= 6, "{mode}: {} client errors started after the outage ended", f.errors_after);
    assert!(f.recovery <= Duration::from_secs(2), "{mode}: recovered {:?} after the end", f.recovery);
    assert!(f.fail_fast > 30, "{mode}: the breaker answered for Klaviyo while open: {f:?}");
    assert!(f.fail_fast_p99 <= Duration::from_millis(50), "{mode}: fail-fast p99 {:?}", f.fail_fast_p99);
}

/// While Klaviyo resets connections, one attempt is one connection: a failed connect
/// made for the request before it queued is not followed by a second connect for the
/// same attempt (before, up to two resets per attempt reached Klaviyo). Retries and the
/// breaker are off, so 20 requests must cost exactly 20 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_outage_costs_one_connection_per_attempt() {
    let config = "[retry]\nmax_attempts = 1\n[breaker]\nenabled = false\n";
    let stack = Stack::start(&[], false, Some(config));
    // A first request warms the pool, which the outage's resets then empty.
    let (status, _, _) = stack.call(Method::GET, format!("{}{PATH}", stack.target), "").await;
    assert_eq!(status, StatusCode::OK);
    let before = stack.stats().await.reset_connections;
    stack.set_faults(serde_json::json!({"outage": "reset", "outage_ms": 4000})).await;
    let started = Instant::now();
    for _ in 0..20 {
        let answer = stack.try_call(Method::GET, format!("{}{PATH}", stack.target), "").await;
        let (status, _, _) = answer.expect("the proxy answers");
        assert!(status.is_server_error(), "{status}");
    }
    assert!(started.elapsed() < Duration::from_millis(3500), "the 20 requests took {:?}", started.elapsed());
    // The control endpoint is cut off until the outage ends by itself.
    tokio::time::sleep_until(started + Duration::from_millis(4500)).await;
    let resets = stack.stats().await.reset_connections - before;
    assert_eq!(resets, 20, "connections reset for 20 single-attempt requests");
}

/// A 10 s outage answering 503, shortened to 2 s before and 3 s after (75 GETs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_503_outage_costs_klaviyo_little_and_ends_at_once() {
    let f = outage("unavailable", false, Duration::from_secs(2), Duration::from_secs(3)).await;
    assert_outage_targets("unavailable", &f);
}

/// A 10 s outage resetting every connection, shortened the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_reset_outage_costs_klaviyo_little_and_ends_at_once() {
    let f = outage("reset", false, Duration::from_secs(2), Duration::from_secs(3)).await;
    assert_outage_targets("reset", &f);
}

/// Another consumer's 429s, shortened to 75 GETs (15 s): no 429 reaches a client, and
/// after a 429 the bucket sends one probe, then ramps with a window kept small while
/// 429s keep coming, instead of letting its whole queue go at once.
///
/// The target of ≤ 25 requests inside an announced Retry-After is for 150 GETs;
/// for 75 the bound is half of it (4–6 seen; 194 before the ramp, 28–29 with the ramp
/// alone). The target p50 of 2.5 s cannot be met by any proxy that keeps arrival order:
/// each request reaching Klaviyo outside a hold draws a 2 s hold at 10%, so serving
/// the 150 costs about 17 holds (21 with this seed), 34–42 s of holds for 30 s of
/// arrivals; the queue grows all run (see docs/benchmarks.md for the ideal schedule).
/// The p50 bound is generous; the ramp's cost over an unlimited window is about 0.8 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_consumers_429s_end_without_a_stampede() {
    let f = another_consumer(false, 75).await;
    println!("FIGURES another consumer: {f:?}");
    assert_eq!(f.client_429s, 0, "{f:?}");
    assert_eq!(f.client_ok, f.requests, "{f:?}");
    assert!(f.inside_retry_after <= 12, "{f:?}");
    assert!(f.upstream <= f.requests as u64 * 3 / 2, "{f:?}");
    assert!(f.p50 <= Duration::from_secs(15), "{f:?}");
}

/// The three scenarios at the size, each beside a direct run; prints the table
/// of docs/benchmarks.md. Ignored: it takes about three minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_bad_days() {
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    // `BAD_DAYS_ONLY=consumer` (or `unavailable`, `reset`, `proxied`) runs a part.
    let only = std::env::var("BAD_DAYS_ONLY").unwrap_or_default();
    let runs = |part: &str| {
        let parts: Vec<&str> = only.split(',').filter(|p| !p.is_empty()).collect();
        let direct = [true, false].into_iter().filter(|d| !(parts.contains(&"proxied") && *d));
        let wanted = parts.iter().all(|p| *p == "proxied") || parts.contains(&part);
        direct.filter(move |_| wanted).collect::<Vec<bool>>()
    };
    println!(
        "| scenario | run | upstream requests | inside an announced Retry-After | client 429s | client p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|");
    if !runs("consumer").is_empty() {
        let (p50, p99) = ideal_consumer(150);
        println!(
            "| another consumer's 429s, 150 GETs at 5/s | ideal (arrival order, zero round trip) | — | 0 | 0 | {} / {} |",
            secs(p50),
            secs(p99)
        );
    }
    for direct in runs("consumer") {
        let f = another_consumer(direct, 150).await;
        println!(
            "| another consumer's 429s, 150 GETs at 5/s | {} | {} | {} | {} | {} / {} |",
            if direct { "direct" } else { "proxied" },
            f.upstream,
            f.inside_retry_after,
            f.client_429s,
            secs(f.p50),
            secs(f.p99)
        );
    }
    println!();
    println!("| scenario | run | upstream requests during the outage | client errors started after it | recovery | fail-fast answers, p50 / p99 |");
    println!("|---|---|---|---|---|---|");
    for mode in ["unavailable", "reset"] {
        for direct in runs(mode) {
            let f = outage(mode, direct, Duration::from_secs(5), Duration::from_secs(15)).await;
            println!(
                "| 10 s outage ({mode}), 150 GETs at 5/s | {} | {} | {} | {} | {}, {} / {} |",
                if direct { "direct" } else { "proxied" },
                f.upstream_during,
                f.errors_after,
                secs(f.recovery),
                f.fail_fast,
                ms(f.fail_fast_p50),
                ms(f.fail_fast_p99)
            );
        }
    }
}
