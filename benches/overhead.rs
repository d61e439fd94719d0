//! The load bench, one command for all three parts: `cargo bench --bench overhead`.
//! The real binaries run as separate processes (simulator, proxy) and the load comes
//! from this process, direct to the simulator versus through the proxy in one run:
//!
//! (a) limits lifted (simulator `--unlimited`, proxy `limits.enabled = false`):
//!     throughput and p50/p99 at fixed concurrency, as a ratio;
//! (b) real limits under saturation: a batch of `get_accounts` (1/s, 15/m) sent at
//!     once by clients that honour `Retry-After` as the SDKs do; upstream 429s, how
//!     full the simulator's windows got, and wall time against the ideal schedule;
//! (c) the proxy process's RSS with 50k requests queued (h2c: 500 connections of 100
//!     streams, since the file-descriptor limit here is 20k).
//!
//! Env: `BENCH_PARTS` (default `abc`), `BENCH_SECS`, `BENCH_CONCURRENCY` (a),
//! `BENCH_BATCH` (b, default 30), `BENCH_QUEUED` (c, default 50000), `BENCH_BIN` (another
//! build of the binary to run instead of this one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

#[path = "../tests/support/process.rs"]
mod process;

/// The binary to run: this build's, or `BENCH_BIN` (another build, to compare two
/// side by side in one run).
fn start(args: &[&str], envs: &[(&str, &str)]) -> (process::Running, String) {
    let bin = std::env::var("BENCH_BIN").unwrap_or_else(|_| BIN.to_string());
    process::start(&bin, args, envs)
}

struct Result {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

async fn load(url: &str, concurrency: usize, secs: u64) -> Result {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, stop, url) = (client.clone(), stop.clone(), url.to_string());
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0usize);
                while !stop.load(Ordering::Relaxed) {
                    let req = http::Request::get(&url)
                        .header("authorization", "Klaviyo-API-Key pk_bench")
                        .header("revision", "2026-07-15")
                        .body(Empty::new())
                        .unwrap();
                    let t = Instant::now();
                    match client.request(req).await {
                        Ok(resp) if resp.status().is_success() => {
                            let _ = resp.into_body().collect().await;
                            lat.push(t.elapsed());
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut errors) = (Vec::new(), 0);
    for w in workers {
        let (lat, e) = w.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    Result { rps: all.len() as f64 / elapsed.as_secs_f64(), p50: pct(0.50), p99: pct(0.99), errors }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let parts: String = env_or("BENCH_PARTS", "abc".to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("machine: {cores} cores, {}", cpu_model());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    if parts.contains('a') {
        overhead(&rt);
    }
    if parts.contains('b') {
        rt.block_on(saturation(env_or("BENCH_BATCH", 30)));
    }
    if parts.contains('c') {
        rt.block_on(queued_rss(env_or("BENCH_QUEUED", 50_000)));
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

/// (a) Overhead with limits lifted.
fn overhead(rt: &tokio::runtime::Runtime) {
    let secs: u64 = env_or("BENCH_SECS", 10);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 32);
    let (_sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0", "--unlimited"], &[]);
    let (_proxy, proxy_url) = start(
        &process::serve_args(&sim_url, None),
        &[("KLAVIYO_PROXY_LIMITS_ENABLED", "false"), ("KLAVIYO_PROXY_LOG_LEVEL", "warn")],
    );
    let path = "/api/profiles?page%5Bsize%5D=20";
    let direct = rt.block_on(load(&format!("{sim_url}{path}"), concurrency, secs));
    let proxied = rt.block_on(load(&format!("{proxy_url}{path}"), concurrency, secs));
    println!("(a) overhead, limits lifted: {concurrency} concurrent clients, {secs} s each, GET {path}");
    for (name, r) in [("direct ", &direct), ("proxied", &proxied)] {
        println!(
            "  {name}: {:>9.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}",
            r.rps,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.errors
        );
    }
    println!(
        "  ratio proxied/direct: throughput {:.2}, p50 {:.2}, p99 {:.2}",
        proxied.rps / direct.rps,
        proxied.p50.as_secs_f64() / direct.p50.as_secs_f64(),
        proxied.p99.as_secs_f64() / direct.p99.as_secs_f64()
    );
}

/// A config file for the proxy, in the temp dir (left for inspection; tiny).
fn config_file(name: &str, toml: &str) -> String {
    let path = std::env::temp_dir().join(format!("klaviyo-proxy-bench-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, toml).unwrap();
    path.to_string_lossy().into_owned()
}

async fn get_json(url: &str) -> serde_json::Value {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// The earliest schedule a client that knew every limit could keep without ever being
/// refused, whatever the windows' phase: request i goes `burst` requests after the one
/// a second earlier and `steady` after the one a minute earlier.
fn ideal_wall(n: usize, burst: usize, steady: usize) -> Duration {
    let mut t = vec![0.0f64; n];
    for i in 0..n {
        let mut at = 0.0f64;
        if i >= burst {
            at = at.max(t[i - burst] + 1.0);
        }
        if i >= steady {
            at = at.max(t[i - steady] + 60.0);
        }
        t[i] = at;
    }
    Duration::from_secs_f64(t.last().copied().unwrap_or(0.0))
}

struct Batch {
    wall: Duration,
    refused: u64,
    failed: u64,
}

/// `n` clients each send one GET at once and, on 429, wait `Retry-After` seconds and
/// try again (as the official SDKs do), until it succeeds or 10 minutes pass.
async fn batch(url: &str, key: &str, n: usize) -> Batch {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url, auth) = (client.clone(), url.to_string(), format!("Klaviyo-API-Key {key}"));
            tokio::spawn(async move {
                let mut refused = 0u64;
                while started.elapsed() < Duration::from_secs(600) {
                    let req = http::Request::get(&url)
                        .header("authorization", &auth)
                        .header("revision", "2026-07-15")
                        .body(Empty::new())
                        .unwrap();
                    let Ok(resp) = client.request(req).await else { return (refused, false) };
                    let status = resp.status();
                    let retry_after =
                        resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    let _ = resp.into_body().collect().await;
                    if status.is_success() {
                        return (refused, true);
                    }
                    if status != http::StatusCode::TOO_MANY_REQUESTS {
                        return (refused, false);
                    }
                    refused += 1;
                    tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
                }
                (refused, false)
            })
        })
        .collect();
    let (mut refused, mut failed) = (0, 0);
    for t in tasks {
        let (r, ok) = t.await.unwrap();
        refused += r;
        failed += u64::from(!ok);
    }
    Batch { wall: started.elapsed(), refused, failed }
}

/// (b) Real limits under saturation, direct and proxied at the same time (two
/// accounts, so their buckets are independent).
async fn saturation(n: usize) {
    let (_sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0"], &[]);
    // A batch job accepts waiting minutes rather than failing: the queue may hold a
    // request for up to 10 minutes.
    let config = config_file("saturation", "[queue]\nmax_wait_ms = 600000\n");
    let (_proxy, proxy_url) =
        start(&process::serve_args(&sim_url, Some(&config)), &[("KLAVIYO_PROXY_LOG_LEVEL", "warn")]);
    let (direct_key, proxied_key) = ("pk_bench_direct", "pk_bench_proxied");
    let path = "/api/accounts";
    let (direct_url, proxied_url) = (format!("{sim_url}{path}"), format!("{proxy_url}{path}"));
    let (direct, proxied) = tokio::join!(batch(&direct_url, direct_key, n), batch(&proxied_url, proxied_key, n));
    let stats = get_json(&format!("{sim_url}/__sim/stats")).await;
    let bucket = |key: &str| {
        let alias = klaviyo_proxy::sim::account_alias(&format!("Klaviyo-API-Key {key}"));
        stats["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["account"] == alias.as_str() && b["operation"] == "get_accounts")
            .cloned()
            .unwrap_or_default()
    };
    let ideal = ideal_wall(n, 1, 15);
    println!("(b) saturation: {n} x GET {path} (get_accounts, 1/s burst, 15/min steady) sent at once; clients retry after Retry-After");
    println!("    ideal wall time (no window ever over its limit, phase unknown): {:.1} s", ideal.as_secs_f64());
    for (name, r, key) in [("direct ", &direct, direct_key), ("proxied", &proxied, proxied_key)] {
        let b = bucket(key);
        println!(
            "  {name}: wall {:>6.1} s ({:.3}x ideal)  429s to clients {:>4}  failed {}  upstream: requests {} 429s {}  fullest fixed window: burst {}/1 steady {}/15  fullest sliding minute {}/15",
            r.wall.as_secs_f64(),
            r.wall.as_secs_f64() / ideal.as_secs_f64(),
            r.refused,
            r.failed,
            b["requests"],
            b["throttled"],
            b["max_fixed"]["burst"],
            b["max_fixed"]["steady"],
            b["max_sliding"]["steady"],
        );
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (c) RSS of the proxy process with `n` requests queued in one bucket.
async fn queued_rss(n: usize) {
    const PER_CONN: usize = 100;
    let (_sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0"], &[]);
    let config = config_file("queued", &format!("[queue]\nmax_depth = {}\nmax_wait_ms = 604800000\n", n + 1000));
    let (proxy, proxy_url) =
        start(&process::serve_args(&sim_url, Some(&config)), &[("KLAVIYO_PROXY_LOG_LEVEL", "error")]);
    let pid = proxy.0.id();
    let addr = proxy_url.strip_prefix("http://").unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_kb(pid);
    let started = Instant::now();
    let mut conns = Vec::new();
    let mut streams = Vec::with_capacity(n);
    for c in 0..n.div_ceil(PER_CONN) {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        conns.push(tokio::spawn(conn));
        for _ in 0..PER_CONN.min(n - c * PER_CONN) {
            let mut sender = sender.clone();
            let req = http::Request::get(format!("http://{addr}/api/accounts"))
                .header("authorization", "Klaviyo-API-Key pk_bench_queued")
                .header("revision", "2026-07-15")
                .body(Empty::<Bytes>::new())
                .unwrap();
            streams.push(tokio::spawn(async move { sender.send_request(req).await.map(|r| r.status()) }));
        }
    }
    // Wait until the proxy's memory settles: every request is in and waiting.
    let (mut last, mut peak, mut steady_for) = (0u64, 0u64, 0);
    // At least 10 s, then 3 s without a 1% change.
    while (steady_for < 6 || started.elapsed() < Duration::from_secs(10))
        && started.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kb(pid);
        peak = peak.max(now);
        steady_for = if now.abs_diff(last) * 100 <= last { steady_for + 1 } else { 0 };
        last = now;
    }
    let finished = streams.iter().filter(|s| s.is_finished()).count();
    // Answers this early were either let through at once or refused; show one.
    if let Some(s) = streams.iter_mut().find(|s| s.is_finished()) {
        println!("    first early answer: {:?}", (&mut *s).await);
    }
    let stats = get_json(&format!("{sim_url}/__sim/stats")).await;
    println!(
        "(c) {n} requests queued (GET /api/accounts, one bucket; h2c, {} connections x {PER_CONN} streams), settled after {:.1} s",
        conns.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "    proxy RSS: idle {:.1} MB, queued {:.1} MB (peak {:.1} MB): {:.0} bytes per queued request; answered so far {finished}, sent upstream {}",
        idle as f64 / 1024.0,
        last as f64 / 1024.0,
        peak as f64 / 1024.0,
        (last.saturating_sub(idle) * 1024) as f64 / n as f64,
        stats["requests"]
    );
    for s in streams {
        s.abort();
    }
    for c in conns {
        c.abort();
    }
}
