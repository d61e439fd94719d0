//! Delivered events per minute for one account, with and without coalescing, in one
//! run: `cargo bench --bench coalesce_load`. The simulator and the proxy run as the
//! real binaries; clients send single `create_event` calls as fast as they can.
//!
//! (a) `coalesce.events = true`: `BENCH_EVENTS` (default 20,000) events; the time
//!     until the simulator has every one gives the rate.
//! (b) the default proxy: clients send for `BENCH_SECS` (default 60) seconds; the
//!     events the simulator has at the end give the rate (create_event: 3,500/min).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

#[path = "../tests/support/process.rs"]
mod process;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn event(id: &str) -> String {
    format!(
        r#"{{"data":{{"type":"event","attributes":{{"unique_id":"{id}","properties":{{"sku":"A-1"}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Load"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"a@example.com"}}}}}}}}}}}}"#
    )
}

async fn delivered(client: &HttpClient, sim: &str) -> u64 {
    let req = http::Request::get(format!("{sim}/__sim/events")).body(Full::new(Bytes::new())).unwrap();
    let Ok(resp) = client.request(req).await else { return 0 };
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["unique"].as_u64()).unwrap_or(0)
}

/// Sends events with `key` from 64 clients until `stop` or `limit` events are sent.
async fn send(
    client: &HttpClient,
    proxy: &str,
    key: &'static str,
    prefix: &'static str,
    limit: usize,
    stop: Arc<AtomicBool>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (client, next, stop, url) = (client.clone(), next.clone(), stop.clone(), format!("{proxy}/api/events"));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        return;
                    }
                    let req = http::Request::post(&url)
                        .header("authorization", key)
                        .header("content-type", "application/vnd.api+json")
                        .header("x-proxy-max-wait-ms", "2000")
                        .body(Full::new(Bytes::from(event(&format!("{prefix}-{i}")))))
                        .unwrap();
                    if let Ok(resp) = client.request(req).await {
                        let _ = resp.into_body().collect().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http();
    let dir = std::env::temp_dir().join(format!("kp-coalesce-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let (_sim_a, sim_a) = process::start(BIN, &["simulate", "--listen", "127.0.0.1:0"], &[]);
    let config = dir.join("coalesce.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = \"{}\"\n[coalesce]\nevents = true\n[log]\nlevel = \"warn\"\n",
            dir.join("spool.redb").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let (_proxy_a, proxy_a) = process::start(BIN, &process::serve_args(&sim_a, Some(&config)), &[]);
    let started = Instant::now();
    send(&client, &proxy_a, "Klaviyo-API-Key pk_loadA_bench", "a", events, Arc::new(AtomicBool::new(false))).await;
    let accepted = started.elapsed();
    while delivered(&client, &sim_a).await < events as u64 && started.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    let got_a = delivered(&client, &sim_a).await;
    let rate_a = got_a as f64 / took.as_secs_f64() * 60.0;

    let (_sim_b, sim_b) = process::start(BIN, &["simulate", "--listen", "127.0.0.1:0"], &[]);
    let (_proxy_b, proxy_b) = process::start(BIN, &process::serve_args(&sim_b, None), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(
            async move { send(&client, &proxy_b, "Klaviyo-API-Key pk_loadB_bench", "b", usize::MAX, stop).await },
        )
    };
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let got_b = delivered(&client, &sim_b).await;
    let _ = sender.await;
    let rate_b = got_b as f64 / secs as f64 * 60.0;

    println!("coalesce_load: one account, 64 clients sending single create_event calls");
    println!(
        "  coalescing:    {got_a} events delivered in {:.1} s (accepted in {:.1} s): {rate_a:.0} events/min",
        took.as_secs_f64(),
        accepted.as_secs_f64()
    );
    println!("  no coalescing: {got_b} events delivered in {secs} s: {rate_b:.0} events/min");
    println!("  ratio: {:.1}x", rate_a / rate_b.max(1.0));
    let _ = std::fs::remove_dir_all(dir);
}
