//! Memory admission through the real binary, in front of a simulator in its own process
//! (so the proxy's peak RSS is the proxy's alone): 50 parallel 5 MB event bodies stay
//! within `server.max_buffered_bytes`; what does not fit gets 503 `proxy_overloaded`
//! with `Retry-After`. The kill switch is on, so every admitted body is buffered,
//! given its `unique_id` and answered `proxy_disabled`: what is measured is the
//! proxy's admission, not the upstream.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::process::Running;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");
const PARALLEL: usize = 50;
const MIB: usize = 1024 * 1024;

fn start(args: &[&str], config: Option<&str>) -> (Running, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let dir = std::env::temp_dir().join(format!("kp-admission-{}", std::process::id()));
    if let Some(toml) = config {
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.toml", toml.len()));
        std::fs::write(&file, toml).unwrap();
        cmd.arg("--config").arg(file);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (Running(child), line.trim().rsplit(' ').next().unwrap().to_string())
}

/// Peak resident set of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// A create_event body just under 5 MB (one long string: a debug build scans an array
/// of millions of numbers too slowly for 50 of them in a test).
fn big_event() -> Bytes {
    let filler = "a".repeat(5 * MIB - 300);
    Bytes::from(format!(
        r#"{{"data":{{"type":"event","attributes":{{"properties":{{"z":"{filler}"}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Big"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"a@example.com"}}}}}}}}}}}}"#
    ))
}

/// Sends the bodies in parallel; returns (admitted, refused overloaded, other) and the peak RSS.
async fn run(sim: &str, budget: usize) -> ((usize, usize, Vec<u16>), usize) {
    // The kill switch answers right after the body is buffered (and its unique_id added):
    // the proxy's own memory is measured, not a debug-built simulator parsing 250 MB.
    let config = format!(
        "[server]\nmax_buffered_bytes = {budget}\nclient_read_timeout_ms = 300000\n[upstream]\nenabled = false\n"
    );
    let (proxy, url) = start(&support::process::serve_args(sim, None), Some(&config));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = big_event();
    assert!(body.len() <= 5 * MIB, "{}", body.len());
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|i| {
            let (client, body, url) = (client.clone(), body.clone(), url.clone());
            tokio::spawn(async move {
                let req = Request::post(format!("{url}/api/events/"))
                    .header("authorization", format!("Klaviyo-API-Key pk_admission_{i:04}_0123456789"))
                    .header("content-type", "application/vnd.api+json")
                    .header("revision", "2026-07-15")
                    .body(Full::new(body))
                    .unwrap();
                let resp = tokio::time::timeout(Duration::from_secs(120), client.request(req)).await.unwrap().unwrap();
                let status = resp.status().as_u16();
                let marker = resp.headers().get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap().to_string());
                let retry = resp.headers().get("retry-after").is_some();
                let _ = resp.into_body().collect().await;
                (status, marker, retry)
            })
        })
        .collect();
    let (mut ok, mut overloaded, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            (503, Some(m), false) if m == "proxy_disabled" => ok += 1,
            (503, Some(m), true) if m == "proxy_overloaded" => overloaded += 1,
            (s, _, _) => other.push(s),
        }
    }
    let rss = peak_rss(proxy.0.id());
    ((ok, overloaded, other), rss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_large_bodies_stay_within_the_byte_budget() {
    let (_sim, sim) = start(&["simulate", "--listen", "127.0.0.1:0"], None);
    let budget = 32 * MIB;
    let ((ok, overloaded, other), bounded) = run(&sim, budget).await;
    let ((ok_all, refused_all, other_all), unbounded) = run(&sim, 1024 * MIB).await;
    eprintln!(
        "peak RSS with a {} MiB budget: {} MiB ({ok} accepted, {overloaded} refused); without (1 GiB): {} MiB ({ok_all} accepted); ratio {:.2}",
        budget / MIB,
        bounded / MIB,
        unbounded / MIB,
        unbounded as f64 / bounded as f64
    );
    assert!(other.is_empty() && other_all.is_empty(), "{other:?} {other_all:?}");
    assert!(ok >= 1 && overloaded >= 1 && ok + overloaded == PARALLEL, "{ok} {overloaded}");
    assert_eq!((ok_all, refused_all), (PARALLEL, 0));
    // The budget, a copy of a body or two in flight per admitted request (the added
    // unique_id), and the process's baseline.
    assert!(bounded < budget * 3 + 64 * MIB, "peak RSS {} MiB with a {} MiB budget", bounded / MIB, budget / MIB);
}
