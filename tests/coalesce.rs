//! Event coalescing end to end, with the real binary and the simulator: single
//! `create_event` calls are answered 202 from durable storage and reach "Klaviyo" as
//! `bulk_create_events` jobs — all of them, once, with no 429 —, survive `kill -9`,
//! and one bad event among thousands costs only itself.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::sim::{SimOptions, Simulator};
use tokio::net::TcpListener;
use tokio::time::Instant;

const KEY: &str = "Klaviyo-API-Key pk_coalesce_test";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(HttpConnector::new())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kp-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn event(id: &str, currency: &str) -> String {
    format!(
        r#"{{"data":{{"type":"event","attributes":{{"unique_id":"{id}","value":1.5,"value_currency":"{currency}","properties":{{"sku":"A-1"}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Coalesce test"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"a@example.com"}}}}}}}}}}}}"#
    )
}

struct Binary {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, upstream: &str) -> PathBuf {
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nurl = \"{upstream}\"\n[spool]\npath = \"{}\"\n[coalesce]\nevents = true\nlinger_ms = 100\n[log]\nlevel = \"warn\"\n",
            dir.join("spool.redb").display()
        ),
    )
    .unwrap();
    config
}

/// Starts `serve` on free ports; reads the proxy's and the admin listener's addresses
/// from its first two lines.
fn start_binary(config: &Path) -> Binary {
    start_binary_in(Command::new(env!("CARGO_BIN_EXE_klaviyo-proxy")), config)
}

/// [`start_binary`] on a full disk of `blocks` × 512 bytes a file.
fn start_binary_limited(config: &Path, blocks: u32) -> Binary {
    start_binary_in(support::process::file_size_limited(env!("CARGO_BIN_EXE_klaviyo-proxy"), blocks), config)
}

fn start_binary_in(mut command: Command, config: &Path) -> Binary {
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env_remove("KLAVIYO_ENABLED")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the proxy binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut addrs = Vec::new();
    let mut line = String::new();
    while addrs.len() < 2 {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            panic!("the proxy exited before printing its addresses");
        }
        if let Some(a) = line.trim().rsplit("http://").next().and_then(|a| a.parse::<SocketAddr>().ok()) {
            addrs.push(a);
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in stdout.lines() {});
    Binary { child, addr: addrs[0], admin: addrs[1] }
}

/// Sends one event: `Some(status, spool id)`, or `None` when the proxy is gone.
async fn send_event(client: &HttpClient, proxy: SocketAddr, body: String) -> Option<(StatusCode, Option<u64>, Bytes)> {
    let req = Request::post(format!("http://{proxy}/api/events"))
        .header("authorization", KEY)
        .header("content-type", "application/vnd.api+json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let status = resp.status();
    let id = resp.headers().get("x-klaviyo-proxy-spool-id").and_then(|v| v.to_str().ok()?.parse().ok());
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, id, body))
}

async fn get_json(client: &HttpClient, url: String) -> serde_json::Value {
    let resp = client.request(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap_or_default()
}

async fn metrics(client: &HttpClient, admin: SocketAddr) -> String {
    let resp = client.request(Request::get(format!("http://{admin}/metrics")).body(Full::new(Bytes::new())).unwrap());
    String::from_utf8(resp.await.unwrap().into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
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

async fn simulator() -> Arc<Simulator> {
    Arc::new(Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap())
}

/// A simulator, a temporary directory and the binary with coalescing on in front of
/// them, and a client.
struct Started {
    sim: Arc<Simulator>,
    dir: PathBuf,
    proxy: Binary,
    client: HttpClient,
}

async fn started(name: &str) -> Started {
    let sim = simulator().await;
    let dir = temp_dir(name);
    let proxy = start_binary(&write_config(&dir, &sim.url));
    Started { sim, dir, proxy, client: client() }
}

/// Whether "Klaviyo" received at least `n` distinct events within `limit`.
async fn delivered_within(sim: &Arc<Simulator>, limit: Duration, n: u64) -> bool {
    let sim = sim.clone();
    wait_until(limit, move || sim.events().unique >= n).await
}

/// Sends `ids` from `senders` concurrent clients; returns the ids answered 202.
async fn send_all(client: &HttpClient, addr: SocketAddr, ids: Vec<String>, senders: usize) -> Vec<String> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (client, ids, next) = (client.clone(), ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { return acked };
                match send_event(&client, addr, event(id, "USD")).await {
                    Some((StatusCode::ACCEPTED, Some(_), _)) => acked.push(id.clone()),
                    Some((status, _, body)) => panic!("event {id}: {status} {body:?}"),
                    None => return acked,
                }
            }
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked
}

/// 20,000 single events as fast as 32 clients can send them: every one answered 202,
/// delivered exactly once, in bulk jobs, with no 429 from "Klaviyo".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_arrive_once_in_bulk_jobs_without_a_429() {
    let Started { sim, dir, proxy, client } = started("coalesce-throughput").await;
    let ids: Vec<String> = (0..20_000).map(|i| format!("t-{i:05}")).collect();
    let started = Instant::now();
    let acked = send_all(&client, proxy.addr, ids.clone(), 32).await;
    let accepted_in = started.elapsed();
    assert_eq!(acked.len(), ids.len(), "every event acknowledged");
    let delivered = {
        let sim = sim.clone();
        wait_until(Duration::from_secs(120), move || sim.events().unique == 20_000).await
    };
    let took = started.elapsed();
    let events = sim.events();
    let stats = sim.stats();
    let text = metrics(&client, proxy.admin).await;
    let jobs = metric(&text, "klaviyo_proxy_coalesce_batch_size_count");
    println!(
        "FIGURES coalesce: 20000 events accepted in {:.1}s, delivered in {:.1}s ({:.0} events/min), {} jobs, {} upstream requests, {} upstream 429s",
        accepted_in.as_secs_f64(),
        took.as_secs_f64(),
        20_000.0 / took.as_secs_f64() * 60.0,
        jobs,
        stats.requests,
        stats.throttled
    );
    assert!(delivered, "delivered {} of 20000", events.unique);
    assert_eq!(events.duplicates, 0, "no event delivered twice");
    assert_eq!(stats.throttled, 0, "no 429 from Klaviyo");
    // Jobs, not single events, went upstream: at most one job per 1,000 events plus
    // the partial jobs a linger sends.
    assert!(stats.requests < 2_000, "{} upstream requests for 20000 events", stats.requests);
    let _ = std::fs::remove_dir_all(dir);
}

/// Events acknowledged before a `kill -9` are delivered after the restart; Klaviyo
/// sees every one of them (repeats of a job delivered just before the kill carry the
/// same `unique_id`s, which Klaviyo drops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_event() {
    let sim = simulator().await;
    let dir = temp_dir("coalesce-kill");
    let config = write_config(&dir, &sim.url);
    let mut proxy = start_binary(&config);
    let client = client();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for s in 0..8 {
        let (client, sent, addr) = (client.clone(), sent.clone(), proxy.addr);
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..5_000 {
                let id = format!("k-{s}-{n}");
                sent.fetch_add(1, Ordering::Relaxed);
                match send_event(&client, addr, event(&id, "USD")).await {
                    Some((StatusCode::ACCEPTED, _, _)) => acked.push(id),
                    Some(_) => {}
                    None => return acked,
                }
            }
            acked
        }));
    }
    let until = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::Relaxed) < 3_000 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.child.kill().unwrap(); // SIGKILL
    proxy.child.wait().unwrap();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    for s in senders {
        acked.extend(tokio::time::timeout(Duration::from_secs(10), s).await.unwrap().unwrap());
    }
    assert!(acked.len() >= 1_000, "{} acknowledged before the kill", acked.len());
    let _proxy = start_binary(&config);
    let delivered = {
        let (sim, acked) = (sim.clone(), acked.clone());
        wait_until(Duration::from_secs(60), move || acked.is_subset(&sim.events().ids.into_iter().collect())).await
    };
    let events = sim.events();
    println!(
        "FIGURES coalesce kill -9: {} acknowledged, {} distinct delivered, {} repeated deliveries",
        acked.len(),
        events.unique,
        events.duplicates
    );
    assert!(delivered, "every acknowledged event is delivered after the restart");
    // At most the job in flight at the kill goes twice (same unique_ids).
    assert!(events.duplicates <= 1_000, "{} repeats", events.duplicates);
    let _ = std::fs::remove_dir_all(dir);
}

/// One event Klaviyo refuses (a currency that is no ISO 4217 code: past the proxy's
/// shape checks) among 2,999 good ones: 2,999 delivered, 1 dead letter carrying
/// Klaviyo's error, no job split more than log2(1000) times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_event_costs_only_itself() {
    let Started { sim, dir, proxy, client } = started("coalesce-poison").await;
    let (status, _, _) = send_event(&client, proxy.addr, event("poison", "dollars")).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "the proxy's shape checks pass it");
    let ids: Vec<String> = (0..2_999).map(|i| format!("p-{i:04}")).collect();
    assert_eq!(send_all(&client, proxy.addr, ids, 16).await.len(), 2_999);
    let delivered = delivered_within(&sim, Duration::from_secs(60), 2_999).await;
    assert!(delivered, "delivered {}", sim.events().unique);
    assert_eq!(sim.events().unique, 2_999);
    let dead_listed = {
        let (client, admin) = (client.clone(), proxy.admin);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let dead = get_json(&client, format!("http://{admin}/admin/spool/dead")).await;
            if dead.to_string().contains("poison") || Instant::now() > until {
                break dead;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let text = dead_listed.to_string();
    assert!(text.contains("poison") && text.contains("ISO 4217"), "dead letter with Klaviyo's error: {text}");
    assert!(!text.contains("pk_coalesce_test"), "no key in listings");
    let events = sim.events();
    assert!(!events.ids.iter().any(|id| id == "poison"));
    assert_eq!(events.duplicates, 0);
    let m = metrics(&client, proxy.admin).await;
    assert_eq!(metric(&m, "klaviyo_proxy_coalesce_events_total{state=\"dead_lettered\"}"), 1.0);
    assert!(metric(&m, "klaviyo_proxy_coalesce_batch_splits_total") <= 10.0);
    let _ = std::fs::remove_dir_all(dir);
}

/// A Klaviyo outage only makes jobs wait: events accepted while the bulk endpoint
/// answers 503 are all delivered, once each, when it is back, and none is dead-lettered
/// (a job refused by an outage counts like a spooled write's replay, and the breaker
/// keeps most jobs from being tried at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_only_makes_jobs_wait() {
    let Started { sim, dir, proxy, client } = started("coalesce-outage").await;
    let outage = serde_json::from_value(serde_json::json!({"outage": "unavailable", "outage_ms": 4000})).unwrap();
    sim.set_faults(outage).unwrap();
    let ids: Vec<String> = (0..500).map(|i| format!("o-{i:03}")).collect();
    let acked = send_all(&client, proxy.addr, ids, 8).await;
    assert_eq!(acked.len(), 500, "every event is answered 202 during the outage");
    let delivered = delivered_within(&sim, Duration::from_secs(60), 500).await;
    let events = sim.events();
    assert!(delivered, "delivered {} of 500 after the outage", events.unique);
    assert_eq!(events.unique, 500);
    assert_eq!(events.duplicates, 0);
    let m = metrics(&client, proxy.admin).await;
    assert_eq!(metric(&m, "klaviyo_proxy_coalesce_events_total{state=\"dead_lettered\"}"), 0.0);
    assert_eq!(metric(&m, "klaviyo_proxy_coalesce_events_total{state=\"delivered\"}"), 500.0);
    let met_the_outage = m.lines().any(|l| {
        l.starts_with("klaviyo_proxy_upstream_responses_total{")
            && l.contains("bulk_create_events")
            && l.contains("status=\"503\"")
    });
    assert!(met_the_outage, "a job met the outage:\n{m}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The proxy's own jobs and a client's own `bulk_create_events` calls of one account
/// share that account's bulk bucket (10/s): a client sending 12 jobs at once while
/// thousands of coalesced events go out draws no 429 from "Klaviyo". (Before, the
/// proxy's jobs were routed under the unresolved credential, a bucket of their own, and
/// both together went past the account's limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_jobs_share_the_accounts_bulk_bucket_with_the_clients_jobs() {
    let Started { sim, dir, proxy, client } = started("coalesce-shared-bucket").await;
    // Resolve the credential's account first, as any client's first request does.
    let (status, _, _) = send_event(&client, proxy.addr, event("warm-up", "USD")).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let own_jobs: Vec<_> = (0..12)
        .map(|i| {
            let (client, addr) = (client.clone(), proxy.addr);
            tokio::spawn(async move {
                let entry = format!(
                    r#"{{"type":"event-bulk-create","attributes":{{"profile":{{"data":{{"type":"profile","attributes":{{"email":"b@example.com"}}}}}},"events":{{"data":[{{"type":"event","attributes":{{"properties":{{"n":1}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Own job"}}}}}},"unique_id":"own-{i}"}}}}]}}}}}}"#
                );
                let body = format!(
                    r#"{{"data":{{"type":"event-bulk-create-job","attributes":{{"events-bulk-create":{{"data":[{entry}]}}}}}}}}"#
                );
                let req = Request::post(format!("http://{addr}/api/event-bulk-create-jobs"))
                    .header("authorization", KEY)
                    .header("content-type", "application/vnd.api+json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                resp.status()
            })
        })
        .collect();
    let ids: Vec<String> = (0..6_000).map(|i| format!("s-{i:04}")).collect();
    assert_eq!(send_all(&client, proxy.addr, ids, 32).await.len(), 6_000);
    for job in own_jobs {
        assert_eq!(job.await.unwrap(), StatusCode::ACCEPTED, "the client's own job");
    }
    let delivered = delivered_within(&sim, Duration::from_secs(60), 6_001 + 12).await;
    let events = sim.events();
    assert!(delivered, "delivered {}", events.unique);
    assert_eq!(sim.stats().throttled, 0, "the account's bulk limit was passed");
    let _ = std::fs::remove_dir_all(dir);
}

/// An event the proxy can tell is invalid gets Klaviyo's 400 shape at once, marked as
/// the proxy's, with a pointer; nothing is stored. An `Idempotency-Key` repeated by a
/// retrying client answers the first event's id and sends nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_refused_and_retries_are_idempotent() {
    let Started { sim, dir, proxy, client } = started("coalesce-invalid").await;
    let bad = r#"{"data":{"type":"event","attributes":{"properties":{},"metric":{"data":{"type":"metric","attributes":{"name":"M"}}},"profile":{"data":{"type":"profile","attributes":{"first_name":"No identifier"}}}}}}"#;
    let (status, id, body) = send_event(&client, proxy.addr, bad.to_string()).await.unwrap();
    assert_eq!((status, id), (StatusCode::BAD_REQUEST, None));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "proxy_invalid_event");
    assert_eq!(v["errors"][0]["source"]["pointer"], "/data/attributes/profile/data");
    assert_eq!(v["errors"][0]["meta"]["origin"], "klaviyo-proxy");

    let once = |n: u32| {
        let client = client.clone();
        let addr = proxy.addr;
        async move {
            let req = Request::post(format!("http://{addr}/api/events"))
                .header("authorization", KEY)
                .header("idempotency-key", "order-77-attempt")
                .body(Full::new(Bytes::from(event(&format!("fresh-id-{n}"), "USD"))))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            (resp.status(), resp.headers()["x-klaviyo-proxy-spool-id"].to_str().unwrap().to_string())
        }
    };
    let (first, second) = (once(1).await, once(2).await);
    assert_eq!(first.0, StatusCode::ACCEPTED);
    assert_eq!(first, second, "a repeated Idempotency-Key answers the first event's id");
    let delivered = {
        let sim = sim.clone();
        wait_until(Duration::from_secs(10), move || sim.events().unique >= 1).await
    };
    assert!(delivered);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.events().ids, ["fresh-id-1"], "one event for two attempts");
    let _ = std::fs::remove_dir_all(dir);
}

/// A `create_event` of about 30 kB.
fn big_event(id: &str) -> String {
    event(id, "USD").replace(r#""sku":"A-1""#, &format!(r#""sku":"A-1","pad":"{}""#, "x".repeat(30_000)))
}

/// Sends big events `prefix-n` until the store refuses three in a row: the ids
/// acknowledged, every other answer checked to be the clear refusal of a store that
/// cannot be written (503, JSON:API, the proxy's, `Retry-After`).
async fn fill_store(client: &HttpClient, proxy: SocketAddr, prefix: &str) -> Vec<String> {
    support::process::fill_until_refused(|n| async move {
        let id = format!("{prefix}-{n}");
        let req = Request::post(format!("http://{proxy}/api/events"))
            .header("authorization", KEY)
            .header("content-type", "application/vnd.api+json")
            .body(Full::new(Bytes::from(big_event(&id))))
            .unwrap();
        let resp = client.request(req).await.expect("the proxy answers");
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if status == StatusCode::ACCEPTED {
            return Some(id);
        }
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{id}: {json}");
        let marker = headers.get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap());
        assert_eq!(marker, Some("proxy_store_unavailable"), "{id}: {json}");
        assert!(headers.get("retry-after").is_some(), "{id}: Retry-After");
        assert_eq!(json["errors"][0]["code"], "proxy_store_unavailable", "{json}");
        assert_eq!(json["errors"][0]["meta"]["origin"], "klaviyo-proxy", "{json}");
        None
    })
    .await
}

/// Issue 13 item 4, the coalescer's store on a full disk, with the real binary: while
/// Klaviyo fails, events pile up in the store until its file can grow no more; each
/// event it cannot store gets a clear 503 (never a 202) and `/health` shows the error.
/// Once Klaviyo is back the store drains, reopens and takes events again; every event
/// acknowledged is delivered exactly once, none refused is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_store_refuses_clearly_and_recovers() {
    use klaviyo_proxy::sim::{Faults, Outage};
    let sim = simulator().await;
    let dir = temp_dir("coalesce-disk");
    // 4096 blocks of 512 bytes: 2 MiB a file, room for redb's first 1.5 MiB and a few
    // dozen 30 kB events.
    let proxy = start_binary_limited(&write_config(&dir, &sim.url), 4096);
    let client = client();
    let health = || get_json(&client, format!("http://{}/health", proxy.admin));
    sim.set_faults(Faults { outage: Outage::Unavailable, ..Faults::default() }).unwrap();

    let mut acked = fill_store(&client, proxy.addr, "first").await;
    let h = health().await;
    let coalesce = &h["services"]["coalesce"];
    assert_eq!(coalesce["status"], "degraded", "{h}");
    assert!(coalesce["error"].as_str().unwrap_or_default().contains("File too large"), "{h}");
    assert_eq!(sim.events().unique, 0);

    // Klaviyo is back: the store drains, freeing its pages, and is reopened.
    sim.set_faults(Faults::default()).unwrap();
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    let delivered = {
        let (sim, want) = (sim.clone(), want.clone());
        wait_until(Duration::from_secs(60), move || want.is_subset(&sim.events().ids.into_iter().collect())).await
    };
    assert!(delivered, "every acknowledged event delivered: {} of {}", sim.events().unique, want.len());
    // New events are acknowledged again (the store reopens at most once a second).
    let mut again = None;
    for n in 0..100 {
        let id = format!("after-{n}");
        match send_event(&client, proxy.addr, big_event(&id)).await {
            Some((StatusCode::ACCEPTED, Some(_), _)) => {
                again = Some(id);
                break;
            }
            Some((StatusCode::SERVICE_UNAVAILABLE, _, _)) => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("{id}: {other:?}"),
        }
    }
    let Some(again) = again else { panic!("the store takes events again once there is room: {}", health().await) };
    acked.push(again);
    let until = Instant::now() + Duration::from_secs(30);
    let h = loop {
        let h = health().await;
        if h["services"]["coalesce"]["status"] == "healthy" || Instant::now() > until {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h["services"]["coalesce"]["status"], "healthy", "{h}");
    assert!(h["services"]["coalesce"].get("error").is_none_or(|e| e.is_null()), "{h}");
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    let delivered = {
        let (sim, want) = (sim.clone(), want.clone());
        wait_until(Duration::from_secs(30), move || sim.events().ids.into_iter().collect::<BTreeSet<_>>() == want).await
    };
    let events = sim.events();
    assert!(delivered, "exactly the acknowledged events: {} delivered, {} acknowledged", events.unique, want.len());
    assert_eq!(events.duplicates, 0, "none delivered twice");
    println!("FIGURES coalesce full disk: {} acknowledged, {} delivered once", want.len(), events.unique);
    let _ = std::fs::remove_dir_all(dir);
}
