//! Durable accept-and-forward: spooled writes survive an outage and `kill -9`, are
//! delivered exactly once by their `unique_id`, and Klaviyo's permanent refusals go to
//! the dead-letter table.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::config::{Config, UpstreamUrl};
use klaviyo_proxy::sim::{Faults, Outage, SimOptions, Simulator};
use klaviyo_proxy::spool::{self, Spool, SPOOL_ID_HEADER};
use klaviyo_proxy::App;
use tokio::net::TcpListener;
use tokio::time::Instant;

#[path = "support/process.rs"]
mod process;

const KEY: &str = "Klaviyo-API-Key pk_spool_test";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kp-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn event(id: &str) -> String {
    format!(
        r#"{{"data":{{"type":"event","attributes":{{"unique_id":"{id}","properties":{{}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Spool test"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"a@example.com"}}}}}}}}}}}}"#
    )
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends one event; returns the status and the spool id, or `None` if the proxy did
/// not answer (it was killed).
async fn send_event(client: &HttpClient, proxy: SocketAddr, path: &str, id: &str) -> Option<(StatusCode, Option<u64>)> {
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{proxy}{path}"))
        .header("authorization", KEY)
        .header("content-type", "application/vnd.api+json")
        .body(Full::new(Bytes::from(event(id))))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let status = resp.status();
    let spool_id = resp.headers().get(SPOOL_ID_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
    resp.into_body().collect().await.ok()?;
    Some((status, spool_id))
}

async fn start_in_process(sim: &Simulator, spool_path: &Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, App) {
    let mut config = Config::default();
    config.upstream.url = UpstreamUrl::try_from(sim.url.clone()).unwrap();
    config.spool.path = Some(spool_path.into());
    config.breaker.cool_down_ms = 500;
    // Account lookups would add upstream requests these tests count.
    config.accounts.resolve = false;
    let app = App::build(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    (addr, stop, app)
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

/// During an outage deferrable writes are accepted (202 + spool id) and, once
/// Klaviyo is back, delivered in order exactly once; a permanent 4xx is dead-lettered
/// and can be requeued or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_spools_then_replays_in_order_once() {
    let sim = Simulator::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        SimOptions { faults: Faults { outage: Outage::Unavailable, ..Faults::default() }, ..SimOptions::default() },
    )
    .unwrap();
    let dir = temp_dir("spool-replay");
    let (proxy, _stop, app) = start_in_process(&sim, &dir.join("spool.redb")).await;
    let client = client();
    let mut ids = Vec::new();
    for n in 0..50 {
        let (status, spool_id) = send_event(&client, proxy, "/api/events", &format!("ev-{n}")).await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "event {n}");
        ids.push(spool_id.expect("a spool id"));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "spool ids in arrival order");
    // A client event without company_id: Klaviyo will refuse it for good (400).
    let (status, bad) = send_event(&client, proxy, "/client/events", "bad-1").await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let spool = app.proxy().spool().unwrap().clone();
    assert_eq!(spool.pending_len().unwrap(), 51);
    assert_eq!(app.proxy().metrics().spool_depth.get(), 51);
    sim.set_faults(Faults::default()).unwrap();
    assert!(wait_until(Duration::from_secs(20), || spool.pending_len().unwrap() == 0).await, "replayed");
    let events = sim.events();
    let want: BTreeSet<String> = (0..50).map(|n| format!("ev-{n}")).collect();
    assert_eq!(events.ids.iter().cloned().collect::<BTreeSet<_>>(), want);
    assert_eq!(events.duplicates, 0);
    let order: Vec<String> = (0..50).map(|n| format!("ev-{n}")).collect();
    assert_eq!(events.arrival, order, "replayed in the order accepted");
    let dead = spool.list_dead(10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((app.proxy().metrics().spool_depth.get(), app.proxy().metrics().spool_dead_letters.get()), (0, 1));
    assert_eq!(Some(dead[0].id), bad);
    assert_eq!(dead[0].last_error.as_deref(), Some("upstream answered 400"));
    // Through the admin listener's handler: list, requeue (it fails again), drop.
    let admin = app.admin();
    let call = |method: &str, path: String| {
        let admin = admin.clone();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .unwrap();
        async move {
            let resp = admin.handle(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
        }
    };
    let (status, listed) = call("GET", "/admin/spool/dead".into()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["dead"][0]["id"], dead[0].id);
    assert!(!listed.to_string().contains("pk_spool_test"), "no credentials in listings");
    let (status, _) = call("POST", format!("/admin/spool/dead/{}/requeue", dead[0].id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(wait_until(Duration::from_secs(10), || spool.list_dead(10).unwrap().len() == 1).await, "refused again");
    let (status, _) = call("DELETE", format!("/admin/spool/dead/{}", dead[0].id)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, summary) = call("GET", "/admin/spool".into()).await;
    assert_eq!((status, summary["pending"].as_u64(), summary["dead"].as_u64()), (StatusCode::OK, Some(0), Some(0)));
    assert_eq!(app.proxy().metrics().spool_dead_letters.get(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Spool write latency with fsync (the figure the issue asks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_write_latency_with_fsync() {
    let dir = temp_dir("spool-latency");
    let spool = Spool::open(&dir.join("spool.redb")).unwrap();
    let mut took = Vec::new();
    for n in 0..300 {
        let entry = spool::Entry {
            id: 0,
            operation: "create_event".into(),
            method: "POST".into(),
            path_and_query: "/api/events".into(),
            headers: vec![("authorization".into(), KEY.as_bytes().to_vec())],
            body: event(&format!("lat-{n}")).into_bytes(),
            unique_id: Some(format!("lat-{n}")),
            accepted_at_ms: 0,
            last_error: None,
        };
        let started = Instant::now();
        spool.append_async(entry).await.unwrap();
        took.push(started.elapsed());
    }
    took.sort();
    let p = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!("FIGURES spool append with fsync: p50 {:?} p99 {:?} max {:?}", p(0.5), p(0.99), took[took.len() - 1]);
    assert_eq!(spool.pending_len().unwrap(), 300);
    std::fs::remove_dir_all(dir).unwrap();
}

struct Binary {
    child: Child,
    addr: SocketAddr,
}

fn start_binary(config: &Path) -> Binary {
    // Both listeners on free ports: tests run in parallel, and the admin listener's
    // default port would let only one of them start.
    let mut child = Command::new(env!("CARGO_BIN_EXE_klaviyo-proxy"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env_remove("KLAVIYO_ENABLED")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the proxy binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().parse().expect("the proxy prints its address");
    // Keep draining stdout so the child never writes to a closed pipe.
    std::thread::spawn(move || for _ in stdout.lines() {});
    Binary { child, addr }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Events sent during an outage are acknowledged from the spool; the real binary is
/// killed with SIGKILL mid-stream and started again; when the outage ends every
/// acknowledged event reaches Klaviyo exactly once. Then SIGTERM drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_outage_loses_and_duplicates_nothing() {
    let sim = Arc::new(
        Simulator::start(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            SimOptions { faults: Faults { outage: Outage::Unavailable, ..Faults::default() }, ..SimOptions::default() },
        )
        .unwrap(),
    );
    let dir = temp_dir("spool-kill");
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nurl = \"{}\"\n[spool]\npath = \"{}\"\n[breaker]\ncool_down_ms = 500\n[server]\ndrain_timeout_ms = 2000\n[log]\nlevel = \"warn\"\n",
            sim.url,
            dir.join("spool.redb").display()
        ),
    )
    .unwrap();
    let client = client();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut proxy = start_binary(&config);
    // 8 senders; the proxy is killed while they send.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let addr = proxy.addr;
    let mut senders = Vec::new();
    for s in 0..8 {
        let (client, sent) = (client.clone(), sent.clone());
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0.. {
                let id = format!("k-{s}-{n}");
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match send_event(&client, addr, "/api/events", &id).await {
                    Some((status, _)) if status.is_success() => acked.push(id),
                    Some(_) => {}
                    None => return acked,
                }
            }
            acked
        }));
    }
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 400 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.child.kill().unwrap(); // SIGKILL
    proxy.child.wait().unwrap();
    for s in senders {
        acked.extend(tokio::time::timeout(Duration::from_secs(10), s).await.unwrap().unwrap());
    }
    assert!(acked.len() >= 300, "{} acknowledged", acked.len());
    assert_eq!(sim.events().deliveries, 0, "nothing delivered during the outage");
    // Started again on the same spool; the outage ends.
    let mut proxy = start_binary(&config);
    sim.set_faults(Faults::default()).unwrap();
    let delivered = {
        let sim = sim.clone();
        let acked = acked.clone();
        wait_until(Duration::from_secs(60), move || {
            let ids: BTreeSet<String> = sim.events().ids.into_iter().collect();
            acked.is_subset(&ids)
        })
        .await
    };
    let events = sim.events();
    println!(
        "FIGURES kill -9: {} acknowledged, {} delivered, {} duplicate deliveries, {} unacknowledged but spooled",
        acked.len(),
        events.unique,
        events.duplicates,
        events.unique.saturating_sub(acked.len() as u64)
    );
    assert!(delivered, "every acknowledged event is delivered");
    assert_eq!(events.duplicates, 0, "no event delivered twice");
    // Two live requests on a 1/s bucket (the second queued for 1 s), then SIGTERM:
    // both are answered within the 2 s drain and the process exits 0.
    let mut live = Vec::new();
    for _ in 0..2 {
        let (client, addr) = (client.clone(), proxy.addr);
        live.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("http://{addr}/api/accounts"))
                .header("authorization", KEY)
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.request(req).await.map(|r| r.status()).ok()
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = Command::new("kill").args(["-TERM", &proxy.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    for l in live {
        assert_eq!(l.await.unwrap(), Some(StatusCode::OK), "queued request served during the drain");
    }
    let exit = tokio::task::spawn_blocking(move || {
        let s = proxy.child.wait().unwrap();
        drop(proxy);
        s
    })
    .await
    .unwrap();
    assert!(exit.success(), "{exit:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The kill switch refuses live requests at once but still accepts deferrable writes
/// into the spool, and nothing is sent upstream while it is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_spools_deferrable_writes() {
    let sim = Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap();
    let dir = temp_dir("spool-killswitch");
    let mut config = Config::default();
    config.upstream.url = UpstreamUrl::try_from(sim.url.clone()).unwrap();
    config.spool.path = Some(dir.join("spool.redb"));
    config.upstream.enabled = false;
    let app = App::build(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let client = client();
    let (status, id) = send_event(&client, addr, "/api/events", "ks-1").await.unwrap();
    assert_eq!((status, id.is_some()), (StatusCode::ACCEPTED, true));
    let req = Request::builder()
        .uri(format!("http://{addr}/api/lists"))
        .header("authorization", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-klaviyo-proxy-error"], "proxy_disabled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.stats().requests, 0);
    assert_eq!(app.proxy().spool().unwrap().pending_len().unwrap(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

/// At shutdown, deferrable writes still queued when the drain time runs out are
/// spooled (202) rather than refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_spools_queued_deferrable_writes() {
    let sim = Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap();
    let dir = temp_dir("spool-drain");
    let mut config = Config::default();
    config.upstream.url = UpstreamUrl::try_from(sim.url.clone()).unwrap();
    config.spool.path = Some(dir.join("spool.redb"));
    config.server.drain_timeout_ms = 1000;
    config.accounts.resolve = false;
    // One profile upsert per second through the proxy, so they queue.
    config.limits = Config::parse(
        "[limits.operations.create_or_update_profile]\nburst_per_second = 1\nsteady_per_minute = 60\n",
        "t",
    )
    .unwrap()
    .limits;
    let app = App::build(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let client = client();
    let mut tasks = Vec::new();
    for n in 0..4 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"data":{{"type":"profile","attributes":{{"email":"d{n}@example.com"}}}}}}"#);
            let req = Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/api/profile-import"))
                .header("authorization", KEY)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            (resp.status(), resp.headers().contains_key(SPOOL_ID_HEADER))
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    served.await.unwrap();
    // Slots at 0 and 1 s are served within the 1 s drain; those at 2 and 3 s are spooled.
    let forwarded = answers.iter().filter(|(s, spooled)| s.is_success() && !spooled).count();
    let spooled = answers.iter().filter(|(s, spooled)| *s == StatusCode::ACCEPTED && *spooled).count();
    assert_eq!((forwarded, spooled), (2, 2), "{answers:?}");
    assert_eq!(app.proxy().spool().unwrap().pending_len().unwrap(), 2);
    assert_eq!(sim.stats().requests, 2);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A spooled `create_event` as the proxy would have stored it, with this key.
fn spooled_event(key: &str, unique_id: &str) -> spool::Entry {
    spool::Entry {
        id: 0,
        operation: "create_event".into(),
        method: "POST".into(),
        path_and_query: "/api/events".into(),
        headers: vec![
            ("authorization".into(), key.as_bytes().to_vec()),
            ("content-type".into(), b"application/vnd.api+json".to_vec()),
            ("revision".into(), klaviyo_proxy::config::DEFAULT_REVISION.as_bytes().to_vec()),
        ],
        body: event(unique_id).into_bytes(),
        unique_id: Some(unique_id.into()),
        accepted_at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64,
        last_error: None,
    }
}

/// An upstream that fails every request made with `failing` (503) and accepts the
/// others (202), counting both: one account's outage, the other's good day.
async fn split_upstream(failing: &'static str) -> (String, Arc<[std::sync::atomic::AtomicU32; 2]>) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counts: Arc<[AtomicU32; 2]> = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let seen = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let bad = req.headers().get("authorization").is_some_and(|v| v.as_bytes() == failing.as_bytes());
                    seen[usize::from(!bad)].fetch_add(1, Ordering::SeqCst);
                    let status = if bad { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::ACCEPTED };
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (url, counts)
}

/// One account's writes failing (5xx) do not hold up another account's: the other's
/// are delivered while the failing ones wait, and the failing ones go to the dead
/// letters after `spool.max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_account_does_not_block_another() {
    use std::sync::atomic::Ordering;
    const BAD: &str = "Klaviyo-API-Key pk_failing_account";
    let (url, counts) = split_upstream(BAD).await;
    let dir = temp_dir("spool-lanes");
    let path = dir.join("spool.redb");
    {
        let spool = Spool::open(&path).unwrap();
        for n in 0..3 {
            spool.append(spooled_event(BAD, &format!("bad-{n}"))).unwrap();
        }
        for n in 0..5 {
            spool.append(spooled_event(KEY, &format!("good-{n}"))).unwrap();
        }
    }
    let mut config = Config::parse(
        "[breaker]\nenabled = false\n[retry]\nbase_ms = 20\ncap_ms = 200\n[spool]\nmax_attempts = 4\n[accounts]\nresolve = false\n",
        "t",
    )
    .unwrap();
    config.upstream.url = UpstreamUrl::try_from(url).unwrap();
    config.spool.path = Some(path);
    let app = App::build(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let spool = app.proxy().spool().unwrap().clone();
    assert!(wait_until(Duration::from_secs(20), || counts[1].load(Ordering::SeqCst) >= 5).await, "good delivered");
    assert!(
        wait_until(Duration::from_secs(20), || spool.dead_len().unwrap() == 3 && spool.pending_len().unwrap() == 0)
            .await,
        "the failing account's writes given up: {:?}",
        spool.stats()
    );
    let dead = spool.list_dead(10).unwrap();
    assert!(
        dead.iter().all(|d| d.attempts == 4 && d.last_error.as_deref().unwrap().starts_with("gave up")),
        "{dead:?}"
    );
    // Each failing write was tried exactly max_attempts times, in order.
    assert_eq!(counts[0].load(Ordering::SeqCst), 12);
    assert_eq!(counts[1].load(Ordering::SeqCst), 5);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Issue 13 item 4 with the breaker on: one account meeting 5xx on every call (its
/// spooled writes, and its app's reads, which keep coming) never holds another
/// account's replay. Another account's writes spooled meanwhile are replayed promptly
/// while the failing account's keep failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_failures_do_not_hold_another_accounts_replay() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const FLAKY: &str = "Klaviyo-API-Key pk_flaky_0123456789";
    const STEADY: &str = "Klaviyo-API-Key pk_steady_0123456789";
    const STEADY_WRITES: usize = 20;
    let sim = Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap();
    sim.set_faults(Faults { failing_accounts: vec!["flaky".into()], ..Faults::default() }).unwrap();
    let dir = temp_dir("spool-breaker-accounts");
    let path = dir.join("spool.redb");
    {
        let spool = Spool::open(&path).unwrap();
        for n in 0..3 {
            spool.append(spooled_event(FLAKY, &format!("flaky-{n}"))).unwrap();
        }
    }
    let (proxy, _stop, app) = start_in_process(&sim, &path).await;
    // The failing account's app keeps reading: 5xx, retried, then the breaker's 503s.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, client) = (stop.clone(), client());
            tokio::spawn(async move {
                let mut answers = 0u32;
                while !stop.load(Ordering::Relaxed) && answers < 100_000 {
                    let req = Request::get(format!("http://{proxy}/api/profiles"))
                        .header("authorization", FLAKY)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    if let Ok(resp) = client.request(req).await {
                        assert!(!resp.status().is_success(), "{}", resp.status());
                        let _ = resp.into_body().collect().await;
                    }
                    answers += 1;
                }
            })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || app.proxy().breaker().phase() != klaviyo_proxy::breaker::Phase::Closed)
            .await,
        "the failing account's 5xx open the breaker"
    );
    // Another account's writes, spooled (say, during an earlier outage) while the
    // failing account's trouble goes on.
    let spool = app.proxy().spool().unwrap().clone();
    for n in 0..STEADY_WRITES {
        spool.append(spooled_event(STEADY, &format!("steady-{n}"))).unwrap();
    }
    app.proxy().spool_changed();
    let errors_before = sim.stats().server_errors;
    let steady = |sim: &Simulator| sim.events().ids.iter().filter(|id| id.starts_with("steady-")).count();
    let replayed = wait_until(Duration::from_secs(15), || steady(&sim) == STEADY_WRITES).await;
    // The failing account is still probed, and still failing.
    let errors_after = wait_until(Duration::from_secs(10), || sim.stats().server_errors > errors_before).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let events = sim.events();
    assert!(replayed, "{} of {STEADY_WRITES} writes of the healthy account replayed", steady(&sim));
    assert_eq!(events.duplicates, 0);
    assert!(events.ids.iter().all(|id| !id.starts_with("flaky-")), "{:?}", events.ids);
    assert!(errors_after, "the failing account kept meeting 5xx");
    std::fs::remove_dir_all(dir).unwrap();
}

/// An entry that cannot be read goes to the dead letters at once, and the writes
/// behind it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_entry_does_not_block_replay() {
    let sim = Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap();
    let dir = temp_dir("spool-unreadable");
    let path = dir.join("spool.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        let pending: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("pending");
        tx.open_table(pending).unwrap().insert(1, &b"\x09not an entry"[..]).unwrap();
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        tx.open_table(meta).unwrap().insert("next_id", 2).unwrap();
        tx.commit().unwrap();
    }
    {
        let spool = Spool::open(&path).unwrap();
        spool.append(spooled_event(KEY, "after-garbage")).unwrap();
    }
    let (_proxy, _stop, app) = start_in_process(&sim, &path).await;
    let spool = app.proxy().spool().unwrap().clone();
    assert!(wait_until(Duration::from_secs(20), || spool.pending_len().unwrap() == 0).await, "{:?}", spool.stats());
    assert_eq!(sim.events().ids, vec!["after-garbage".to_string()]);
    let dead = spool.list_dead(10).unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].last_error.as_deref().unwrap().contains("unreadable"), "{dead:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

// A full disk under the spool, with the real binary.
// A full disk under the spool, with the real binary: writes the spool cannot store
// are refused with a clear 503 (never acknowledged), `/health` says `degraded`, and
// once there is room again the spool is reopened and takes writes without a restart.
//
// The full disk is a file-size limit (`ulimit -f`, with SIGXFSZ ignored so a write
// past it fails with EFBIG like a write to a full disk fails with ENOSPC): no mount
// privileges needed. The limit cannot be lifted from outside, so room comes back the
// way it does in production when Klaviyo returns: the spool drains and redb reuses
// the freed pages inside the file. What this proves: redb's "refuses everything
// after an I/O error" state is left by reopening, in the running process, and no
// write is acknowledged that did not reach the file. What it does not: ENOSPC from a
// real filesystem (the same `io::Error` path in redb, a different errno).

/// A `create_event` of about 30 kB.
fn big_event(id: &str) -> String {
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

async fn send_big_event(client: &HttpClient, proxy: &str, id: &str) -> Answer {
    let req = Request::post(format!("{proxy}/api/events"))
        .header("authorization", "Klaviyo-API-Key pk_disk_test")
        .header("content-type", "application/vnd.api+json")
        .body(Full::new(Bytes::from(big_event(id))))
        .unwrap();
    let resp = client.request(req).await.expect("the proxy answers");
    let status = resp.status();
    let code = resp.headers().get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap().to_string());
    let retry_after = resp.headers().contains_key("retry-after");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Answer { status, code, retry_after, body }
}

async fn admin_call(client: &HttpClient, method: &str, url: String) -> serde_json::Value {
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
    process::fill_until_refused(|n| async move {
        let id = format!("{prefix}-{n}");
        let answer = send_big_event(client, proxy, &id).await;
        if answer.status == StatusCode::ACCEPTED {
            assert_eq!(answer.code.as_deref(), Some("proxy_spooled"));
            return Some(id);
        }
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{id}: {}", answer.body);
        assert_eq!(answer.code.as_deref(), Some("proxy_spool_unavailable"), "{id}: {}", answer.body);
        assert!(answer.retry_after, "{id}: Retry-After");
        let error = &answer.body["errors"][0];
        assert_eq!(
            (error["code"].as_str(), error["meta"]["origin"].as_str()),
            (Some("proxy_spool_unavailable"), Some("klaviyo-proxy"))
        );
        None
    })
    .await
}

/// Flips the kill switch in the config file and reloads it.
async fn set_enabled(client: &HttpClient, admin_url: &str, config: &std::path::Path, base: &str, enabled: bool) {
    std::fs::write(config, format!("{base}[upstream]\nenabled = {enabled}\n")).unwrap();
    let answer = admin_call(client, "POST", format!("{admin_url}/admin/reload")).await;
    assert_eq!(answer["status"], "reloaded", "{answer}");
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
    let health = admin_call(&client, "GET", format!("{admin_url}/health")).await;
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
    // The simulator counts an event before the proxy hears its answer and deletes it.
    let mut health = serde_json::Value::Null;
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        health = admin_call(&client, "GET", format!("{admin_url}/health")).await;
        if health["services"]["spool"]["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
