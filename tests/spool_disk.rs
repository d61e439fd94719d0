//! A full disk under the spool, with the real binary: writes the spool cannot store
//! are refused with a clear 503 (never acknowledged), `/health` says `degraded`, and
//! once there is room again the spool is reopened and takes writes without a restart.
//!
//! The full disk is a file-size limit (`ulimit -f`, with SIGXFSZ ignored so a write
//! past it fails with EFBIG like a write to a full disk fails with ENOSPC): no mount
//! privileges needed. The limit cannot be lifted from outside, so room comes back the
//! way it does in production when Klaviyo returns: the spool drains and redb reuses
//! the freed pages inside the file. What this proves: redb's "refuses everything
//! after an I/O error" state is left by reopening, in the running process, and no
//! write is acknowledged that did not reach the file. What it does not: ENOSPC from a
//! real filesystem (the same `io::Error` path in redb, a different errno).

#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::sim::{SimOptions, Simulator};
use tokio::net::TcpListener;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A `create_event` of about 30 kB.
fn event(id: &str) -> String {
    let pad = "x".repeat(30_000);
    format!(
        r#"{{"data":{{"type":"event","attributes":{{"unique_id":"{id}","properties":{{"pad":"{pad}"}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Disk test"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"a@example.com"}}}}}}}}}}}}"#
    )
}

struct Answer {
    status: StatusCode,
    code: Option<String>,
    retry_after: bool,
    body: serde_json::Value,
}

async fn send_event(client: &HttpClient, proxy: &str, id: &str) -> Answer {
    let req = Request::post(format!("{proxy}/api/events"))
        .header("authorization", "Klaviyo-API-Key pk_disk_test")
        .header("content-type", "application/vnd.api+json")
        .body(Full::new(Bytes::from(event(id))))
        .unwrap();
    let resp = client.request(req).await.expect("the proxy answers");
    let status = resp.status();
    let code = resp.headers().get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap().to_string());
    let retry_after = resp.headers().contains_key("retry-after");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Answer { status, code, retry_after, body }
}

async fn admin(client: &HttpClient, method: &str, url: String) -> serde_json::Value {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("the admin listener answers");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// Sends events (`prefix-n`) until the spool refuses three in a row; returns the ids
/// acknowledged, checking that every other answer is the spool's clear refusal.
async fn fill(client: &HttpClient, proxy: &str, prefix: &str) -> Vec<String> {
    let (mut acked, mut refused_in_a_row, mut refused) = (Vec::new(), 0, 0);
    for n in 0..300 {
        let id = format!("{prefix}-{n}");
        let answer = send_event(client, proxy, &id).await;
        if answer.status == StatusCode::ACCEPTED {
            assert_eq!(answer.code.as_deref(), Some("proxy_spooled"));
            acked.push(id);
            refused_in_a_row = 0;
            continue;
        }
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{id}: {}", answer.body);
        assert_eq!(answer.code.as_deref(), Some("proxy_spool_unavailable"), "{id}: {}", answer.body);
        assert!(answer.retry_after, "{id}: Retry-After");
        let error = &answer.body["errors"][0];
        assert_eq!(
            (error["code"].as_str(), error["meta"]["origin"].as_str()),
            (Some("proxy_spool_unavailable"), Some("klaviyo-proxy"))
        );
        refused += 1;
        refused_in_a_row += 1;
        if refused_in_a_row == 3 {
            break;
        }
    }
    assert!(!acked.is_empty() && refused >= 3, "{} acknowledged, {refused} refused", acked.len());
    acked
}

/// Flips the kill switch in the config file and reloads it.
async fn set_enabled(client: &HttpClient, admin_url: &str, config: &std::path::Path, base: &str, enabled: bool) {
    std::fs::write(config, format!("{base}[upstream]\nenabled = {enabled}\n")).unwrap();
    let answer = admin(client, "POST", format!("{admin_url}/admin/reload")).await;
    assert_eq!(answer["status"], "reloaded", "{answer}");
}

async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_clearly_and_recovers_without_a_restart() {
    let sim = Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("kp-spool-disk-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    let base = format!(
        "[spool]\npath = \"{}\"\n[accounts]\nresolve = false\n[log]\nlevel = \"error\"\n",
        dir.join("spool.redb").display()
    );
    // With the kill switch on, every event goes to the spool.
    std::fs::write(&config, format!("{base}[upstream]\nenabled = false\n")).unwrap();
    let config_arg = config.display().to_string();
    let mut args = vec!["-c", "trap '' XFSZ; ulimit -f 4096; exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_klaviyo-proxy")];
    args.extend(process::serve_args(&sim.url, Some(&config_arg)));
    // 4096 blocks of 512 bytes: 2 MiB, room for redb's first 1.5 MiB and a few dozen events.
    let (_proxy, urls) = process::start_urls("sh", &args, &[], 2);
    let (proxy, admin_url) = (&urls[0], &urls[1]);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    // The disk fills: clear refusals, and /health says so.
    let mut acked = fill(&client, proxy, "first").await;
    let health = admin(&client, "GET", format!("{admin_url}/health")).await;
    let spool = &health["services"]["spool"];
    assert_eq!(spool["status"], "degraded", "{health}");
    assert_eq!(spool["pending"].as_u64(), Some(acked.len() as u64), "{health}");
    assert!(spool["error"].as_str().unwrap_or_default().contains("File too large"), "{health}");
    assert_eq!(sim.events().deliveries, 0);

    // Klaviyo is back: the spool drains (reopened first), freeing its pages.
    set_enabled(&client, admin_url, &config, &base, true).await;
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    let delivered =
        wait_until(Duration::from_secs(30), || sim.events().ids.iter().cloned().collect::<BTreeSet<_>>() == want).await;
    assert!(delivered, "every acknowledged event delivered: {} of {}", sim.events().unique, want.len());
    let health = admin(&client, "GET", format!("{admin_url}/health")).await;
    assert_eq!(health["services"]["spool"]["status"], "healthy", "{health}");
    assert_eq!(health["services"]["spool"]["pending"], 0, "{health}");

    // The same process takes spooled writes again, up to the same full disk.
    set_enabled(&client, admin_url, &config, &base, false).await;
    acked.extend(fill(&client, proxy, "second").await);
    set_enabled(&client, admin_url, &config, &base, true).await;
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    let delivered =
        wait_until(Duration::from_secs(30), || sim.events().ids.iter().cloned().collect::<BTreeSet<_>>() == want).await;
    // Exactly the acknowledged events: none refused was stored, none stored was lost.
    let events = sim.events();
    assert!(delivered, "{} delivered, {} acknowledged", events.unique, want.len());
    assert_eq!(events.duplicates, 0);
    println!(
        "FIGURES full disk: {} acknowledged over two fills, {} delivered, 0 refused delivered",
        want.len(),
        events.unique
    );
    std::fs::remove_dir_all(dir).unwrap();
}
