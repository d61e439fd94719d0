//! Whole-proxy overhead with limits lifted: the real binaries (simulator with
//! `--unlimited`, proxy with `limits.enabled = false`) as separate processes, and a
//! fixed-concurrency load from this process; direct to the simulator versus through
//! the proxy, in one run. Run: `cargo bench --bench overhead` (env `BENCH_SECS`,
//! `BENCH_CONCURRENCY` to change the defaults).

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

fn start(args: &[&str], envs: &[(&str, &str)]) -> (process::Running, String) {
    process::start(BIN, args, envs)
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

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let (_sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0", "--unlimited"], &[]);
    let (_proxy, proxy_url) = start(
        &["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", &sim_url],
        &[("KLAVIYO_PROXY_LIMITS_ENABLED", "false"), ("KLAVIYO_PROXY_LOG_LEVEL", "warn")],
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let path = "/api/profiles?page%5Bsize%5D=20";
    let direct = rt.block_on(load(&format!("{sim_url}{path}"), concurrency, secs));
    let proxied = rt.block_on(load(&format!("{proxy_url}{path}"), concurrency, secs));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("overhead, limits lifted: {concurrency} concurrent clients, {secs} s each, {cores} cores, GET {path}");
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
