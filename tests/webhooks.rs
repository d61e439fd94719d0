//! The webhook gate end to end, with the real binary: signed webhooks from the
//! simulator's sender, a test app on 127.0.0.1 that records what reaches it, and the
//! gate's store on disk across `kill -9`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::server::{self, ConnLimits, Gate};
use klaviyo_proxy::sim::webhooks::{send_webhooks, signed_headers, webhook_body, WebhookLoad, WebhookReport};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");
const SECRET: &str = "whsec-test-0123456789abcdef";
const WEBHOOK_ID: &str = "01SIMWEBHOOK0000000000000";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kp-wh-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One delivery as the app saw it.
#[derive(Debug, Clone)]
struct Seen {
    delivery_id: String,
    ids: Vec<String>,
    verified: bool,
    signature: bool,
    duplicates_removed: Option<String>,
    body: String,
}

/// The app behind the gate: records deliveries; can refuse connections (down) or
/// answer 400 to bodies containing `poison`.
struct App {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: watch::Sender<Gate>,
    refuse_poison: Arc<std::sync::atomic::AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl App {
    async fn start(initially: Gate) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let refuse_poison = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (gate, gate_rx) = watch::channel(initially);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (record, poison) = (seen.clone(), refuse_poison.clone());
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (record, poison) = (record.clone(), poison.clone());
            async move {
                let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
                let delivery_id = header("x-klaviyo-proxy-delivery-id").unwrap_or_default();
                let verified = header("x-klaviyo-proxy-verified").as_deref() == Some("true");
                let signature = header("klaviyo-signature").is_some();
                let duplicates_removed = header("x-klaviyo-proxy-duplicates-removed");
                let body = String::from_utf8(req.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
                if body.contains("poison") && poison.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"no")));
                    *resp.status_mut() = StatusCode::BAD_REQUEST;
                    return Ok::<_, Infallible>(resp);
                }
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let ids = match v["data"].as_array() {
                    Some(items) => items.iter().filter_map(|i| i["external_id"].as_str().map(str::to_string)).collect(),
                    None => v["event_id"].as_str().map(|s| vec![format!("flow:{s}")]).unwrap_or_default(),
                };
                record.lock().unwrap().push(Seen { delivery_id, ids, verified, signature, duplicates_removed, body });
                Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        });
        tokio::spawn(server::serve_gated(
            listener,
            None,
            ConnLimits::default(),
            service,
            async {
                let _ = stopped.await;
            },
            gate_rx,
            Default::default(),
        ));
        App { url, seen, gate, refuse_poison, stop: Some(stop) }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many times each event id reached the app.
    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for s in self.seen() {
            for id in s.ids {
                *counts.entry(id).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Waits (bounded) until every id in `ids` reached the app.
    async fn wait_for(&self, ids: &BTreeSet<String>, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let counts = self.counts();
            let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
            if missing == 0 {
                return;
            }
            assert!(Instant::now() < until, "{missing} of {} ids never reached the app", ids.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The real binary serving the gate; killed (by its PID) when dropped.
struct Proxy {
    child: Child,
    admin: String,
    gate: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_file(dir: &Path, forward_to: &str, extra: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[log]\nlevel = \"warn\"\n[webhooks]\nenabled = true\nlisten = \"127.0.0.1:0\"\nforward_to = \"{forward_to}\"\n\
             store_path = \"{}\"\nretry_base_ms = 100\nretry_cap_ms = 1000\n{extra}",
            dir.join("webhooks.redb").display()
        ),
    )
    .unwrap();
    path
}

fn start_proxy(config: &Path, envs: &[(&str, &str)]) -> Proxy {
    start_proxy_in(Command::new(BIN), config, envs)
}

/// [`start_proxy`] on a full disk of `blocks` × 512 bytes a file.
fn start_proxy_limited(config: &Path, blocks: u32) -> Proxy {
    start_proxy_in(support::process::file_size_limited(BIN, blocks), config, &[])
}

fn start_proxy_in(mut command: Command, config: &Path, envs: &[(&str, &str)]) -> Proxy {
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9"])
        .arg("--config")
        .arg(config)
        .env("KLAVIYO_WEBHOOK_SIGNING_SECRET", SECRET)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start klaviyo-proxy");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().rsplit(' ').next().unwrap().to_string()
    };
    let (_proxy, admin, gate) = (url(), url(), url());
    assert!(gate.starts_with("http"), "the gate prints its address: {gate:?}");
    Proxy { child, admin, gate }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(url: &str) -> (StatusCode, String) {
    let resp = client().get(url.parse().unwrap()).await.unwrap();
    let status = resp.status();
    (status, String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap())
}

async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (StatusCode, String) {
    let mut req = Request::post(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = client().request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.unwrap();
    let status = resp.status();
    (status, String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap())
}

/// A counter or gauge from `/metrics` (0 when absent).
async fn metric(admin: &str, series: &str) -> f64 {
    let (_, text) = get(&format!("{admin}/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn load(gate: &str, count: usize) -> WebhookLoad {
    WebhookLoad {
        to: format!("{gate}/webhooks/klaviyo"),
        secret: SECRET.into(),
        count,
        concurrency: 8,
        seed: fastrand::u64(..),
        webhook_id: WEBHOOK_ID.into(),
        ..WebhookLoad::default()
    }
}

fn print_latency(what: &str, report: &WebhookReport) {
    let l = &report.latency;
    eprintln!(
        "{what}: {} sent, ack latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.sent, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
    );
}

/// 1,000 webhooks, 10% redeliveries, 5% signed with a wrong secret: every valid id
/// reaches the app exactly once, every bad one is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_webhooks_with_duplicates_and_bad_signatures() {
    let app = App::start(Gate::Open).await;
    let dir = temp_dir("thousand");
    let proxy = start_proxy(&config_file(&dir, &app.url, ""), &[]);
    let report = send_webhooks(&WebhookLoad { duplicates: 0.10, bad_signatures: 0.05, ..load(&proxy.gate, 1000) })
        .await
        .unwrap();
    print_latency("1000 webhooks (8 in flight)", &report);
    assert_eq!((report.sent, report.errors, report.other_status), (1000, 0, 0), "{report:?}");
    assert_eq!((report.bad_sent, report.duplicates_sent), (50, 100));
    assert_eq!(report.rejected, 50, "every bad signature is refused");
    assert_eq!(report.accepted, 950);
    assert_eq!(report.valid_ids.len(), 850);
    app.wait_for(&report.valid_ids, Duration::from_secs(120)).await;
    // Delivery has caught up; give a straggler the chance to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = app.counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let delivered: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(delivered, report.valid_ids, "exactly the validly signed ids reach the app");
    assert!(report.bad_ids.iter().all(|id| !delivered.contains(id)));
    assert!(app.seen().iter().all(|s| s.verified && s.signature && s.duplicates_removed.is_none()));
    let m = |s: &'static str| metric(&proxy.admin, s);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"bad_signature\"}").await, 50.0);
    assert_eq!(m("klaviyo_proxy_webhook_received_total{kind=\"system\"}").await, 1000.0);
    assert_eq!(m("klaviyo_proxy_webhook_duplicates_total{kind=\"system\"}").await, 100.0);
    assert_eq!(m("klaviyo_proxy_webhook_delivered_total{kind=\"system\"}").await, 850.0);
    assert_eq!(m("klaviyo_proxy_webhook_backlog").await, 0.0);
    assert_eq!(m("klaviyo_proxy_webhook_ack_seconds_count").await, 950.0);
    // The checklist's Webhook Security item: the gate does the app's part, and the
    // refused signatures are what the P2 alert pages for.
    let (_, checklist) = get(&format!("{}/admin/checklist", proxy.admin)).await;
    let checklist: serde_json::Value = serde_json::from_str(&checklist).unwrap();
    let item = checklist["health"]
        .as_array()
        .and_then(|h| h.iter().find(|i| i["id"] == "webhooks"))
        .unwrap_or_else(|| panic!("no webhooks item: {checklist}"));
    assert_eq!(item["light"], "amber", "{item}");
    assert_eq!((item["details"]["received"].as_u64(), item["details"]["rejected"].as_u64()), (Some(1000), Some(50)));
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}

/// The app refuses connections for 10 s while webhooks arrive: they are all
/// acknowledged, `/health` shows the backlog, and they reach the app once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_down_for_ten_seconds_loses_nothing() {
    let app = App::start(Gate::Refuse).await;
    let dir = temp_dir("down");
    let proxy = start_proxy(&config_file(&dir, &app.url, ""), &[]);
    let down_since = Instant::now();
    let report = send_webhooks(&load(&proxy.gate, 200)).await.unwrap();
    print_latency("200 webhooks, app down", &report);
    assert_eq!(report.accepted, 200, "{report:?}");
    let (status, health) = get(&format!("{}/health", proxy.admin)).await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert!(health["services"]["webhooks"]["backlog"].as_u64().unwrap() > 0, "{health}");
    assert_eq!(health["services"]["webhooks"]["status"], "degraded", "{health}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_since.elapsed())).await;
    assert!(app.seen().is_empty());
    let connect = metric(&proxy.admin, "klaviyo_proxy_webhook_delivery_failures_total{reason=\"connect\"}").await;
    if connect == 0.0 {
        let (_, metrics) = get(&format!("{}/metrics", proxy.admin)).await;
        let failures: Vec<&str> = metrics.lines().filter(|l| l.contains("delivery_failures_total")).collect();
        let (_, health) = get(&format!("{}/health", proxy.admin)).await;
        panic!("no connect failure while the app was down: {failures:?}; health {health}");
    }
    app.gate.send(Gate::Open).unwrap();
    app.wait_for(&report.valid_ids, Duration::from_secs(60)).await;
    assert!(app.counts().values().all(|n| *n == 1), "each exactly once");
    assert_eq!(app.counts().len(), 200);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = get(&format!("{}/health", proxy.admin)).await;
        let health: serde_json::Value = serde_json::from_str(&health).unwrap();
        if health["services"]["webhooks"]["backlog"] == 0 && health["services"]["webhooks"]["status"] == "healthy" {
            break;
        }
        assert!(Instant::now() < until, "backlog never cleared: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}

/// `kill -9` of the proxy while webhooks stream in and are being delivered: after a
/// restart on the same store, every acknowledged webhook reaches the app; none is
/// delivered twice except, at most, the one delivery in flight at the kill (resent
/// with the same delivery id, so the app can tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_acknowledged() {
    let app = App::start(Gate::Open).await;
    let dir = temp_dir("kill");
    let config = config_file(&dir, &app.url, "");
    let mut proxy = start_proxy(&config, &[]);
    // Accepting is faster than delivering one at a time: a long stream, killed early.
    let stream = WebhookLoad { duplicates: 0.1, ..load(&proxy.gate, 3000) };
    let sender = tokio::spawn(async move { send_webhooks(&stream).await });
    let until = Instant::now() + Duration::from_secs(60);
    while app.seen().len() < 30 {
        assert!(Instant::now() < until, "deliveries never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.child.kill().unwrap(); // SIGKILL
    let _ = proxy.child.wait();
    let report = sender.await.unwrap().unwrap();
    eprintln!(
        "kill -9 after {} deliveries: {} acknowledged, {} unanswered",
        app.seen().len(),
        report.accepted,
        report.errors
    );
    assert!(report.errors > 0, "the kill came mid-stream: {} acknowledged, none unanswered", report.accepted);
    let before = app.seen().len();
    let restarted = start_proxy(&config, &[]);
    app.wait_for(&report.acked_ids, Duration::from_secs(120)).await;
    // Let the restarted worker finish what else it had (stored, not yet answered).
    let until = Instant::now() + Duration::from_secs(30);
    while metric(&restarted.admin, "klaviyo_proxy_webhook_backlog").await > 0.0 {
        assert!(Instant::now() < until, "the restarted gate never emptied its backlog");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = app.seen();
    let mut by_delivery: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &seen {
        *by_delivery.entry(s.delivery_id.as_str()).or_default() += 1;
    }
    let resent: Vec<_> = by_delivery.iter().filter(|(_, n)| **n > 1).collect();
    let counts = app.counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id.clone()).collect();
    eprintln!(
        "after restart: {} deliveries ({} before the kill), {} ids, {} resent deliveries {resent:?}",
        seen.len(),
        before,
        counts.len(),
        resent.len()
    );
    assert!(resent.len() <= 1 && resent.iter().all(|(_, n)| **n == 2), "{resent:?}");
    // An id seen twice came only in the one resent delivery.
    let resent_ids: BTreeSet<&String> = seen
        .iter()
        .filter(|s| resent.iter().any(|(d, _)| **d == s.delivery_id.as_str()))
        .flat_map(|s| s.ids.iter())
        .collect();
    assert!(twice.iter().all(|id| resent_ids.contains(id)), "ids twice outside the resent delivery: {twice:?}");
    assert!(report.acked_ids.iter().all(|id| counts.contains_key(id)));
    drop(restarted);
    let _ = std::fs::remove_dir_all(dir);
}

/// A batch with some items seen before goes to the app with only the new ones;
/// forged proxy headers, stale timestamps and mismatched webhook ids are refused;
/// flow webhooks need the token and are deduplicated by the configured pointer; an
/// app's permanent 4xx makes a dead letter an operator can list and requeue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batches_flow_webhooks_refusals_and_dead_letters() {
    let app = App::start(Gate::Open).await;
    let dir = temp_dir("partial");
    let token = "flow-token-0123456789abcdef";
    let proxy = start_proxy(
        &config_file(&dir, &app.url, "max_body_bytes = 4096\n[webhooks.flow]\ndedup_pointer = \"/event_id\"\n"),
        &[("KLAVIYO_PROXY_FLOW_WEBHOOK_TOKEN", token)],
    );
    let system = format!("{}/webhooks/klaviyo", proxy.gate);
    let send = |ids: &[&str]| {
        let body = webhook_body(&ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(), WEBHOOK_ID);
        let headers: Vec<(&str, String)> = signed_headers(&body, SECRET, WEBHOOK_ID);
        (body, headers)
    };
    let (body, headers) = send(&["p-a", "p-b"]);
    assert_eq!(post(&system, &headers, &body).await.0, StatusCode::OK);
    let (body, headers) = send(&["p-b", "p-c"]);
    let (status, answer) = post(&system, &headers, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.contains("\"duplicates\":1"), "{answer}");
    let (body, headers) = send(&["p-a", "p-c"]);
    let (status, answer) = post(&system, &headers, &body).await;
    assert_eq!((status, answer.contains("\"status\":\"duplicate\"")), (StatusCode::OK, true), "{answer}");
    // Refusals: each answered 401 and counted by its reason.
    let (body, mut forged) = send(&["p-forged"]);
    forged.retain(|(k, _)| *k != "klaviyo-signature");
    forged.push(("klaviyo-signature", "00".repeat(32)));
    forged.push(("x-klaviyo-proxy-verified", "true".into()));
    assert_eq!(post(&system, &forged, &body).await.0, StatusCode::UNAUTHORIZED);
    let (body, mut stale) = send(&["p-stale"]);
    let old = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(600));
    stale.retain(|(k, _)| !k.starts_with("klaviyo-"));
    stale.extend([
        ("klaviyo-webhook-id", WEBHOOK_ID.to_string()),
        ("klaviyo-signature", klaviyo_proxy::webhooks::signature::sign(SECRET.as_bytes(), body.as_bytes(), &old)),
        ("klaviyo-timestamp", old),
    ]);
    let (status, answer) = post(&system, &stale, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer.contains("proxy_webhook_rejected") && !answer.contains(SECRET), "{answer}");
    let other = webhook_body(&["p-other".to_string()], "another-webhook");
    let mut mismatched = signed_headers(&other, SECRET, "another-webhook");
    mismatched.retain(|(k, _)| *k != "klaviyo-webhook-id");
    mismatched.push(("klaviyo-webhook-id", WEBHOOK_ID.to_string()));
    assert_eq!(post(&system, &mismatched, &other).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(post(&system, &[], &body).await.0, StatusCode::UNAUTHORIZED);
    let (huge, headers) = send(&[&"x".repeat(5000)]);
    assert_eq!(post(&system, &headers, &huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    // Flow webhooks: token in the path or a header; repeats of /event_id acknowledged only.
    let flow = format!("{}/webhooks/flow", proxy.gate);
    assert_eq!(post(&format!("{flow}/{token}"), &[], r#"{"event_id":"f1"}"#).await.0, StatusCode::OK);
    assert_eq!(post(&format!("{flow}/{token}"), &[], r#"{"event_id":"f1"}"#).await.0, StatusCode::OK);
    assert_eq!(post(&flow, &[("x-webhook-token", token.into())], r#"{"event_id":"f2"}"#).await.0, StatusCode::OK);
    assert_eq!(
        post(&format!("{flow}/wrong-token-0123456789"), &[], r#"{"event_id":"f3"}"#).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(post(&flow, &[], r#"{"event_id":"f4"}"#).await.0, StatusCode::UNAUTHORIZED);
    // An app that refuses a webhook for good: a dead letter, listed, then requeued.
    assert_eq!(post(&format!("{flow}/{token}"), &[], r#"{"event_id":"poison"}"#).await.0, StatusCode::OK);
    let expected: BTreeSet<String> =
        ["p-a", "p-b", "p-c", "flow:f1", "flow:f2"].iter().map(|s| s.to_string()).collect();
    app.wait_for(&expected, Duration::from_secs(30)).await;
    let until = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let (_, dead) = get(&format!("{}/admin/webhooks/dead", proxy.admin)).await;
        let dead: serde_json::Value = serde_json::from_str(&dead).unwrap();
        if dead["dead"].as_array().is_some_and(|d| !d.is_empty()) {
            break dead;
        }
        assert!(Instant::now() < until, "no dead letter: {dead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!dead.to_string().contains(token) && dead.to_string().contains("400"), "{dead}");
    assert_eq!(metric(&proxy.admin, "klaviyo_proxy_webhook_dead_letters").await, 1.0);
    app.refuse_poison.store(false, std::sync::atomic::Ordering::SeqCst);
    let id = dead["dead"][0]["id"].as_u64().unwrap();
    let json = [("content-type", "application/json".to_string())];
    let (status, _) = post(&format!("{}/admin/webhooks/dead/{id}/requeue", proxy.admin), &json, "{}").await;
    assert_eq!(status, StatusCode::OK);
    app.wait_for(&["flow:poison".to_string()].into(), Duration::from_secs(30)).await;
    let seen = app.seen();
    assert!(app.counts().values().all(|n| *n == 1), "{:?}", app.counts());
    let partial = seen.iter().find(|s| s.ids == ["p-c"]).expect("the second batch, new item only");
    assert_eq!(partial.duplicates_removed.as_deref(), Some("1"));
    assert!(partial.verified && !partial.signature, "a rebuilt body goes without Klaviyo's signature");
    let whole = seen.iter().find(|s| s.ids == ["p-a", "p-b"]).unwrap();
    assert!(whole.signature && whole.duplicates_removed.is_none());
    assert!(seen.iter().all(|s| s.verified && !s.body.contains("p-forged") && !s.body.contains("p-stale")));
    let m = |s: &'static str| metric(&proxy.admin, s);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"bad_signature\"}").await, 1.0);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"stale_timestamp\"}").await, 1.0);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"webhook_id_mismatch\"}").await, 1.0);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"missing_header\"}").await, 1.0);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"bad_token\"}").await, 2.0);
    assert_eq!(m("klaviyo_proxy_webhook_rejected_total{reason=\"too_large\"}").await, 1.0);
    assert_eq!(m("klaviyo_proxy_webhook_duplicates_total{kind=\"flow\"}").await, 1.0);
    assert_eq!(m("klaviyo_proxy_webhook_duplicates_total{kind=\"system\"}").await, 3.0);
    assert_eq!(m("klaviyo_proxy_webhook_dead_letters").await, 0.0);
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}

/// Over HTTPS, driven by the `simulate webhooks` command; and a plain-HTTP gate off
/// loopback is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_gate_driven_by_the_simulate_command() {
    let app = App::start(Gate::Open).await;
    let dir = temp_dir("tls");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path, ca_path) = (dir.join("gate.crt"), dir.join("gate.key"), dir.join("ca.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let tls = format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", cert_path.display(), key_path.display());
    let proxy = start_proxy(&config_file(&dir, &app.url, &tls), &[]);
    assert!(proxy.gate.starts_with("https://"), "{}", proxy.gate);
    let out = tokio::task::spawn_blocking({
        let (to, ca) = (format!("{}/webhooks/klaviyo", proxy.gate), ca_path.display().to_string());
        move || {
            Command::new(BIN)
                .args(["simulate", "webhooks", "--to", &to, "--secret", SECRET, "--count", "40"])
                .args(["--duplicates", "0.25", "--bad-signatures", "0.1", "--items", "3", "--ca-file", &ca])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sent"], 40, "{report}");
    assert_eq!(report["rejected"], 4, "{report}");
    assert_eq!(report["accepted"], 36, "{report}");
    assert_eq!(report["duplicates_sent"], 10, "{report}");
    assert!(report["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    // 26 new webhooks of 3 events each reach the app, once each.
    let until = Instant::now() + Duration::from_secs(60);
    while app.counts().len() < 78 {
        assert!(Instant::now() < until, "only {} events arrived", app.counts().len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A "duplicate" the sender made of a webhook whose original was refused (bad
    // signature) is new to the gate: one more webhook (3 events) per refused one at most.
    let arrived = app.counts().len();
    assert!((78..=78 + 4 * 3).contains(&arrived), "{arrived} events arrived");
    assert!(app.counts().values().all(|n| *n == 1), "every event once");
    // Plain HTTP with no TLS off loopback: refused at start, naming the way out.
    let config = config_file(&dir, &app.url, "");
    let text = std::fs::read_to_string(&config).unwrap().replace("127.0.0.1:0", "0.0.0.0:0");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("KLAVIYO_WEBHOOK_SIGNING_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("allow_plaintext_remote") && !stderr.contains(SECRET), "{stderr}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends signed webhooks of 100 items each (about 25 kB) until the gate refuses three
/// in a row: the item ids acknowledged, every other answer checked to be the clear
/// refusal of a store that cannot be written (503, the proxy's, `Retry-After`).
async fn fill_gate(gate: &str, prefix: &str) -> Vec<String> {
    let batches = support::process::fill_until_refused(|n| async move {
        let ids: Vec<String> = (0..100).map(|k| format!("{prefix}-{n}-{k}")).collect();
        let body = webhook_body(&ids, WEBHOOK_ID);
        let mut req = Request::post(format!("{gate}/webhooks/klaviyo"));
        for (k, v) in signed_headers(&body, SECRET, WEBHOOK_ID) {
            req = req.header(k, v);
        }
        let resp = client().request(req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
        let (status, marker, retry) = (
            resp.status(),
            resp.headers().get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap().to_string()),
            resp.headers().contains_key("retry-after"),
        );
        let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        if status == StatusCode::OK {
            return Some(ids);
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{n}: {text}");
        assert_eq!(marker.as_deref(), Some("proxy_store_unavailable"), "{n}: {text}");
        assert!(retry, "{n}: Retry-After");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["errors"][0]["code"], "proxy_store_unavailable", "{json}");
        None
    })
    .await;
    batches.concat()
}

async fn health(admin: &str) -> serde_json::Value {
    serde_json::from_str(&get(&format!("{admin}/health")).await.1).unwrap()
}

/// Issue 13 item 4, the webhook gate's store on a full disk, with the real binary:
/// while the app is down, webhooks pile up in the store until its file can grow no
/// more; each one it cannot store gets a clear 503 (never a 200, so Klaviyo sends it
/// again) and `/health` shows the error. Once the app is back the store drains,
/// reopens and takes webhooks again; every item acknowledged reaches the app exactly
/// once, none refused does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_store_refuses_clearly_and_recovers() {
    let app = App::start(Gate::Refuse).await;
    let dir = temp_dir("disk");
    // 4096 blocks of 512 bytes: 2 MiB, room for redb's first 1.5 MiB and a few dozen
    // 25 kB webhooks.
    let proxy = start_proxy_limited(&config_file(&dir, &app.url, ""), 4096);
    let mut acked = fill_gate(&proxy.gate, "first").await;
    let h = health(&proxy.admin).await;
    let webhooks = &h["services"]["webhooks"];
    assert_eq!(webhooks["status"], "degraded", "{h}");
    assert!(webhooks["error"].as_str().unwrap_or_default().contains("File too large"), "{h}");
    assert!(app.seen().is_empty());

    // The app is back: the store drains, freeing its pages, and is reopened.
    app.gate.send(Gate::Open).unwrap();
    app.wait_for(&acked.iter().cloned().collect(), Duration::from_secs(60)).await;
    let mut again = None;
    for n in 0..100 {
        let id = format!("after-{n}");
        let body = webhook_body(std::slice::from_ref(&id), WEBHOOK_ID);
        let (status, text) =
            post(&format!("{}/webhooks/klaviyo", proxy.gate), &signed_headers(&body, SECRET, WEBHOOK_ID), &body).await;
        match status {
            StatusCode::OK => {
                again = Some(id);
                break;
            }
            StatusCode::SERVICE_UNAVAILABLE => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("{id}: {other} {text}"),
        }
    }
    acked.push(again.expect("the store takes webhooks again once there is room"));
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    app.wait_for(&want, Duration::from_secs(30)).await;
    let counts = app.counts();
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), want, "exactly the acknowledged items");
    assert!(counts.values().all(|n| *n == 1), "each exactly once");
    let until = Instant::now() + Duration::from_secs(30);
    let h = loop {
        let h = health(&proxy.admin).await;
        if h["services"]["webhooks"]["status"] == "healthy" || Instant::now() > until {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h["services"]["webhooks"]["status"], "healthy", "{h}");
    println!("FIGURES webhook full disk: {} items acknowledged, each delivered once", want.len());
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}
