//! Operations, in-process against the simulator: exact metrics after scripted traffic,
//! health transitions, readiness through a drain, hot reload, preflight, alert rules.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use klaviyo_proxy::config::Config;
use klaviyo_proxy::metrics::BreakerState;
use klaviyo_proxy::preflight::{self, names, PreflightOptions, Verdict};
use klaviyo_proxy::reload::Reloader;
use klaviyo_proxy::sim::{SimOptions, Simulator};
use klaviyo_proxy::App;
use support::{client, send, sim, Reply, KEY_A};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A proxy with its admin listener, stopped when dropped.
struct Ops {
    url: String,
    admin: String,
    app: App,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Ops {
    async fn start(app: App) -> Ops {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (url, admin_url) =
            (format!("http://{}", listener.local_addr().unwrap()), format!("http://{}", admin.local_addr().unwrap()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.clone().serve_with_admin(listener, Some(admin), async {
            let _ = stopped.await;
        }));
        Ops { url, admin: admin_url, app, stop: Some(stop), task: Some(task) }
    }

    async fn admin_get(&self, path: &str) -> Reply {
        send(&client(), Method::GET, &format!("{}{path}", self.admin), &[], "").await
    }

    async fn metrics(&self) -> String {
        let reply = self.admin_get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK);
        String::from_utf8(reply.body.to_vec()).unwrap()
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A config for `sim` in inject mode with `KEY_A`, plus `extra` TOML.
fn inject_config(sim: &Simulator, extra: &str) -> Config {
    let mut config = support::config(&sim.url, extra);
    config.auth.mode = klaviyo_proxy::config::AuthMode::Inject;
    config.auth.private_key = Some(klaviyo_proxy::config::Secret::new(KEY_A));
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// The value of the sample whose line starts with `prefix` (name and labels), if any.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits (bounded) until `operation`'s queue holds `n` requests.
async fn wait_for_depth(ops: &Ops, operation: &str, n: f64) {
    let prefix = format!("klaviyo_proxy_queue_depth{{operation=\"{operation}\"");
    for _ in 0..200 {
        if sample(&ops.metrics().await, &prefix) == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{operation}'s queue never held {n}");
}

fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

#[tokio::test]
async fn metrics_count_scripted_traffic_exactly() {
    let sim = sim(SimOptions::default()).await;
    let revoked = "pk_revoked_key_0123456789abcdefghij";
    sim.revoke(&format!("Klaviyo-API-Key {revoked}"));
    let config = inject_config(
        &sim,
        "[auth]\naccount_name = \"main\"\n[limits.operations.get_profiles]\nburst_per_second = 2\nsteady_per_minute = 100\n",
    );
    let ops = Ops::start(App::build(config).unwrap()).await;
    let c = client();
    let profiles = format!("{}/api/profiles", ops.url);
    // Three at once against a burst of two: two go now, one waits for a token.
    let three: Vec<_> = (0..3)
        .map(|_| {
            let (c, url) = (c.clone(), profiles.clone());
            tokio::spawn(async move { send(&c, Method::GET, &url, &[], "").await })
        })
        .collect();
    wait_for_depth(&ops, "get_profiles", 1.0).await;
    // Meanwhile the burst window is full: a request that may not wait is refused.
    let refused = send(&c, Method::GET, &profiles, &[("x-proxy-max-wait-ms", "0")], "").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    for r in three {
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    // Not an API path: refused before routing.
    let unknown = send(&c, Method::GET, &format!("{}/nothing", ops.url), &[], "").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    // A revoked client key: forwarded, and Klaviyo's 401 is counted.
    let auth = format!("Klaviyo-API-Key {revoked}");
    let denied = send(&c, Method::GET, &format!("{}/api/accounts", ops.url), &[("authorization", &auth)], "").await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);

    let m = ops.metrics().await;
    for line in [
        r#"klaviyo_proxy_requests_total{operation="get_profiles",tier="L",outcome="forwarded"} 2"#,
        r#"klaviyo_proxy_requests_total{operation="get_profiles",tier="L",outcome="queued"} 1"#,
        r#"klaviyo_proxy_requests_total{operation="get_profiles",tier="L",outcome="rejected"} 1"#,
        r#"klaviyo_proxy_requests_total{operation="unknown",tier="unknown",outcome="rejected"} 1"#,
        r#"klaviyo_proxy_requests_total{operation="get_accounts",tier="XS",outcome="forwarded"} 1"#,
        r#"klaviyo_proxy_upstream_responses_total{operation="get_profiles",tier="L",status="200",class="2xx"} 3"#,
        r#"klaviyo_proxy_upstream_responses_total{operation="get_accounts",tier="XS",status="401",class="4xx"} 1"#,
        r#"klaviyo_proxy_upstream_latency_seconds_count{operation="get_profiles",tier="L"} 3"#,
        r#"klaviyo_proxy_queue_wait_seconds_count{operation="get_profiles",tier="L"} 3"#,
        r#"klaviyo_proxy_queue_depth{operation="get_profiles",tier="L"} 0"#,
    ] {
        assert!(has_line(&m, line), "missing {line}\n{m}");
    }
    // One request waited about a second; the others not at all.
    assert_eq!(sample(&m, r#"klaviyo_proxy_queue_wait_seconds_bucket{le="0.5",operation="get_profiles""#), Some(2.0));
    assert_eq!(sample(&m, r#"klaviyo_proxy_queue_wait_seconds_bucket{le="2.5",operation="get_profiles""#), Some(3.0));
    // The 401 names the account only by its alias.
    let auth_line =
        m.lines().find(|l| l.starts_with("klaviyo_proxy_upstream_auth_failures_total{")).expect("401 counted");
    assert!(auth_line.ends_with(" 1") && auth_line.contains("status=\"401\""), "{auth_line}");
    let alias = auth_line.split("account=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(alias.len() == 8 && alias.chars().all(|c| c.is_ascii_hexdigit()), "{alias}");
    // Tokens: three of the steady window's 100 are spent; Klaviyo's own count is shown.
    // The injected key's account appears by its configured name.
    assert!(
        has_line(
            &m,
            r#"klaviyo_proxy_tokens_left{account="main",operation="get_profiles",bucket="endpoint",window="steady"} 97"#
        ),
        "{m}"
    );
    assert!(
        sample(&m, r#"klaviyo_proxy_upstream_ratelimit_remaining{account="main",operation="get_profiles"}"#).is_some(),
        "{m}"
    );
    assert!(!m.contains(KEY_A) && !m.contains(revoked) && !m.contains("/api/"), "{m}");
}

#[tokio::test]
async fn health_goes_healthy_degraded_down_healthy() {
    let sim1 = sim(SimOptions::default()).await;
    let sim_addr = sim1.addr;
    let config = inject_config(&sim1, "[admin]\nhealth_cache_ms = 0\nhealth_max_wait_ms = 1500\n");
    let ops = Ops::start(App::build(config).unwrap()).await;
    let mut probes = 0;
    let mut health = |ops: &Ops| {
        probes += 1;
        let admin = ops.admin.clone();
        async move {
            let r = send(&client(), Method::GET, &format!("{admin}/health"), &[], "").await;
            let v = r.json();
            (r.status, v)
        }
    };
    let (status, v) = health(&ops).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["services"]["klaviyo"]["status"], "healthy");
    // The simulator names KEY_A's account `test_account_a` (`pk_<account>_<rest>`).
    assert_eq!(v["services"]["klaviyo"]["accountId"], "test_account_a");
    assert!(v["services"]["klaviyo"]["latencyMs"].is_u64());
    assert!(v["services"]["klaviyo"]["error"].is_null());
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));

    // Another client of the same account spends Klaviyo's burst window just before
    // the probe: Klaviyo answers 429 and health degrades. (Klaviyo's window may turn
    // over between the two; a few tries make that harmless.)
    let c = client();
    let mut degraded = None;
    for _ in 0..4 {
        // Past the proxy's own burst window, so the probe leaves at once.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let auth = format!("Klaviyo-API-Key {KEY_A}");
        let headers = [("authorization", auth.as_str()), ("revision", "2026-07-15")];
        let direct = send(&c, Method::GET, &format!("{}/api/accounts", sim1.url), &headers, "").await;
        let (status, v) = health(&ops).await;
        eprintln!("direct {} then probe {v}", direct.status);
        if v["status"] == "degraded" {
            degraded = Some((status, v));
            break;
        }
    }
    let (status, v) = degraded.expect("a probe saw Klaviyo's 429");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["services"]["klaviyo"]["error"].as_str().unwrap().contains("rate-limited"), "{v}");
    assert_eq!(v["services"]["klaviyo"]["accountId"], "test_account_a");

    // Outage: Klaviyo is gone.
    sim1.stop().await;
    let (status, v) = health(&ops).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["status"], "down", "{v}");
    assert!(v["services"]["klaviyo"]["error"].is_string());

    // Klaviyo is back on the same address.
    let listener = TcpListener::bind(sim_addr).await.unwrap();
    let _sim2 = Simulator::start(listener, SimOptions { seed: Some(3), ..SimOptions::default() }).unwrap();
    let mut back = false;
    for _ in 0..3 {
        let (status, v) = health(&ops).await;
        if status == StatusCode::OK && v["status"] == "healthy" {
            back = true;
            break;
        }
    }
    assert!(back, "health never recovered");

    // Every probe went through the limiter: the XS bucket shows their cost.
    let m = ops.metrics().await;
    let left = m
        .lines()
        .find(|l| {
            l.starts_with("klaviyo_proxy_tokens_left{")
                && l.contains(r#"operation="get_accounts",bucket="endpoint",window="steady"}"#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .expect("get_accounts bucket is active");
    assert_eq!(left, 15 - probes, "{m}");
    let counted: f64 = m
        .lines()
        .filter(|l| l.starts_with("klaviyo_proxy_health_probes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted as i64, probes);
}

#[tokio::test]
async fn health_is_cached() {
    let sim = sim(SimOptions::default()).await;
    let ops = Ops::start(App::build(inject_config(&sim, "")).unwrap()).await;
    for _ in 0..3 {
        assert_eq!(ops.admin_get("/health").await.status, StatusCode::OK);
    }
    // Three reports, one probe: the XS endpoint is not spent by monitoring.
    assert_eq!(sim.stats().requests, 1);
    let m = ops.metrics().await;
    assert!(has_line(&m, r#"klaviyo_proxy_health_probes_total{result="healthy"} 1"#), "{m}");
    // The breaker's state is always current, cached probe or not.
    let metrics = ops.app.proxy().metrics();
    metrics.breaker_transition(BreakerState::Closed, BreakerState::HalfOpen);
    let r = ops.admin_get("/health").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("degraded")));
    metrics.breaker_transition(BreakerState::HalfOpen, BreakerState::Open);
    let r = ops.admin_get("/health").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("down")));
    metrics.breaker_transition(BreakerState::Open, BreakerState::Closed);
    assert_eq!(ops.admin_get("/health").await.status, StatusCode::OK);
    assert_eq!(sim.stats().requests, 1);
}

#[tokio::test]
async fn keyless_probe_pages_nobody_and_the_kill_switch_silences_it() {
    let sim = sim(SimOptions::default()).await;
    // Pass-through mode: the proxy has no key, so the probe's 401 only proves Klaviyo
    // answers; it must not count as an auth failure (the P1 alert would fire).
    let mut config = Config::parse("", "test").unwrap();
    config.upstream.url = klaviyo_proxy::config::UpstreamUrl::try_from(sim.url.clone()).unwrap();
    let ops = Ops::start(App::build(config.clone()).unwrap()).await;
    let r = ops.admin_get("/health").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::OK, Some("healthy")));
    let m = ops.metrics().await;
    assert!(!m.contains("klaviyo_proxy_upstream_auth_failures_total{"), "{m}");
    assert_eq!(sim.stats().requests, 1);
    // Kill switch on: nothing goes to Klaviyo, not even the health probe.
    config.upstream.enabled = false;
    let off = Ops::start(App::build(config).unwrap()).await;
    let r = off.admin_get("/health").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("down")));
    assert!(
        r.json()["services"]["klaviyo"]["error"].as_str().unwrap_or_default().contains("switched off"),
        "{:?}",
        r.json()
    );
    assert_eq!(sim.stats().requests, 1);
}

#[tokio::test]
async fn ready_until_drain_and_live() {
    let sim = sim(SimOptions::default()).await;
    let mut ops = Ops::start(App::build(inject_config(&sim, "")).unwrap()).await;
    assert_eq!(ops.admin_get("/live").await.status, StatusCode::OK);
    let r = ops.admin_get("/ready").await;
    assert_eq!((r.status, r.json()["ready"].as_bool()), (StatusCode::OK, Some(true)));
    // A request that waits about two seconds keeps the drain going.
    let c = client();
    let url = format!("{}/api/accounts", ops.url);
    for _ in 0..2 {
        assert_eq!(send(&c, Method::GET, &url, &[], "").await.status, StatusCode::OK);
    }
    let slow = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move { send(&c, Method::GET, &url, &[], "").await }
    });
    wait_for_depth(&ops, "get_accounts", 1.0).await;
    let _ = ops.stop.take().unwrap().send(());
    let mut r = ops.admin_get("/ready").await;
    for _ in 0..100 {
        if r.status != StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        r = ops.admin_get("/ready").await;
    }
    assert_eq!((r.status, r.json()["ready"].as_bool()), (StatusCode::SERVICE_UNAVAILABLE, Some(false)));
    assert!(!slow.is_finished(), "the drain outlasts the readiness flip");
    assert_eq!(ops.admin_get("/live").await.status, StatusCode::OK);
    // The waiting request still completes.
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
}

#[tokio::test]
async fn not_ready_before_serving() {
    let sim = sim(SimOptions::default()).await;
    let app = App::build(inject_config(&sim, "")).unwrap();
    // Before start-up completes the app is not ready.
    let admin = app.admin();
    assert!(!admin.is_ready());
    let reply = admin.clone().handle(http::Request::get("/ready").body(()).unwrap()).await.unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn reload_keeps_queued_requests_and_rejects_a_bad_file() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("reload");
    let file = dir.join("proxy.toml");
    let key_file = dir.join("key");
    write(&key_file, KEY_A);
    let base = format!(
        "[upstream]\nurl = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[auth]\nmode = \"inject\"\nkey_file = \"{}\"\n[accounts]\nresolve = false\n",
        sim.url,
        key_file.display()
    );
    let limits =
        |burst: u32| format!("[limits.operations.get_profiles]\nburst_per_second = {burst}\nsteady_per_minute = 100\n");
    write(&file, &format!("{base}{}", limits(1)));
    let no_env = |_: &str| None;
    let config = Config::load(Some(&file), &no_env).unwrap();
    let source_file = file.clone();
    let reloader = Reloader::new(Arc::new(move || Config::load(Some(&source_file), &no_env)));
    let ops = Ops::start(App::build(config).unwrap().with_reloader(reloader)).await;
    let c = client();
    let url = format!("{}/api/profiles", ops.url);
    // One goes now, two queue for ~1 s and ~2 s under a burst of one.
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { send(&c, Method::GET, &url, &[], "").await })
        })
        .collect();
    wait_for_depth(&ops, "get_profiles", 2.0).await;

    // A new limit and a new key arrive while two requests wait.
    let key_b = "pk_rotated_key_b_0123456789abcdef";
    write(&key_file, key_b);
    write(&file, &format!("{base}{}[queue]\nmax_wait_ms = 20000\n", limits(5)));
    let r = send(&c, Method::POST, &format!("{}/admin/reload", ops.admin), &[("content-type", "application/json")], "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let config = ops.app.proxy().config();
    assert_eq!(config.queue.max_wait_ms, 20_000);
    assert_eq!(config.limits.operations.values().next().unwrap().burst_per_second.get(), 5);
    for w in waiting {
        assert_eq!(w.await.unwrap().status, StatusCode::OK, "a queued request was dropped by the reload");
    }
    // Requests from now on carry the rotated key.
    assert_eq!(send(&c, Method::GET, &url, &[], "").await.status, StatusCode::OK);
    let per_account = |key: &str| {
        let alias = klaviyo_proxy::sim::account_alias(&format!("Klaviyo-API-Key {key}"));
        sim.stats().buckets.iter().filter(|b| b.account == alias).map(|b| b.requests).sum::<u64>()
    };
    assert_eq!((per_account(KEY_A), per_account(key_b)), (3, 1));

    // A bad file is refused, and the running config stays.
    write(&file, &format!("{base}[limits]\nshare = 7\n"));
    let r = send(&c, Method::POST, &format!("{}/admin/reload", ops.admin), &[("content-type", "application/json")], "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("limits.share"), "{:?}", r.json());
    // A change only a restart can make is refused too.
    write(&file, &base.replace(&sim.url, "http://127.0.0.1:1"));
    let r = send(&c, Method::POST, &format!("{}/admin/reload", ops.admin), &[("content-type", "application/json")], "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].as_str().unwrap().contains("restart"));
    assert_eq!(ops.app.proxy().config().queue.max_wait_ms, 20_000);
    assert_eq!(send(&c, Method::GET, &url, &[], "").await.status, StatusCode::OK);
    let m = ops.metrics().await;
    assert!(has_line(&m, r#"klaviyo_proxy_config_reloads_total{result="ok"} 1"#), "{m}");
    assert!(has_line(&m, r#"klaviyo_proxy_config_reloads_total{result="rejected"} 2"#), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("klaviyo-proxy-ops-{name}-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn preflight_env(key: &'static str) -> impl Fn(&str) -> Option<String> {
    move |k: &str| (k == "KLAVIYO_PRIVATE_KEY").then(|| key.to_string())
}

#[tokio::test]
async fn preflight_passes_and_fails_for_the_right_reasons() {
    let sim = sim(SimOptions::default()).await;
    let clean = tempdir("clean");
    write(&clean.join("app.py"), "import os\nKEY = os.environ['KLAVIYO_PRIVATE_KEY']\npk_id = 1\n");
    let options = PreflightOptions {
        config: None,
        upstream: Some(sim.url.clone()),
        status_url: Some(sim.status_url()),
        scan: Some(clean.clone()),
        ..PreflightOptions::default()
    };
    let report = preflight::run(&options, &preflight_env(KEY_A)).await;
    assert!(report.passed(), "{}", report.table());
    // (The revision check depends on today's date; its rules are unit-tested.)
    for name in [names::CONFIG, names::STATUS_PAGE, names::AUTH, names::HEADROOM, names::SCAN] {
        assert_eq!(report.get(name).unwrap().result, Verdict::Pass, "{}", report.table());
    }
    assert!(report.get(names::AUTH).unwrap().detail.contains("test_account_a"));
    assert!(report.get(names::HEADROOM).unwrap().detail.contains("left"));
    assert_eq!(report.get(names::TLS).unwrap().result, Verdict::Warn, "plain http upstream");

    // A revoked key fails auth with Klaviyo's 401.
    let bad = "pk_bad_key_0123456789abcdefghijkl";
    sim.revoke(&format!("Klaviyo-API-Key {bad}"));
    let report = preflight::run(&options, &preflight_env(bad)).await;
    assert!(!report.passed());
    let auth = report.get(names::AUTH).unwrap();
    assert_eq!(auth.result, Verdict::Fail);
    assert!(auth.detail.contains("401"), "{}", auth.detail);
    assert!(!report.table().contains(bad) && !serde_json::to_string(&report).unwrap().contains(bad));

    // Klaviyo's status page reports an outage.
    sim.set_status("major");
    let report = preflight::run(&options, &preflight_env(KEY_A)).await;
    assert!(!report.passed());
    assert_eq!(report.get(names::STATUS_PAGE).unwrap().result, Verdict::Fail);
    // (Klaviyo's burst window for the key may still be spent by the last run: 429, a warning.)
    assert_ne!(report.get(names::AUTH).unwrap().result, Verdict::Fail);
    sim.set_status("none");

    // A hardcoded key in the source tree.
    let leaky = tempdir("leaky");
    std::fs::create_dir_all(leaky.join("src")).unwrap();
    let hardcoded = "pk_0123456789abcdef0123456789abcdef01";
    write(&leaky.join("src/client.js"), &format!("const a = 1;\nconst key = \"{hardcoded}\";\n"));
    std::fs::create_dir_all(leaky.join("node_modules")).unwrap();
    write(&leaky.join("node_modules/x.js"), &format!("k = \"{hardcoded}\"\n"));
    let report =
        preflight::run(&PreflightOptions { scan: Some(leaky.clone()), ..options.clone() }, &preflight_env(KEY_A)).await;
    assert!(!report.passed());
    let scan = report.get(names::SCAN).unwrap();
    assert_eq!(scan.result, Verdict::Fail);
    assert!(scan.detail.contains("client.js:2") && scan.detail.starts_with("1 "), "{}", scan.detail);
    assert!(!scan.detail.contains(hardcoded));

    // TLS to an HTTPS upstream signed by the simulator's CA.
    let tls_sim = support::sim(SimOptions { tls: true, ..SimOptions::default() }).await;
    let ca = clean.join("ca.pem");
    write(&ca, tls_sim.ca_pem.as_deref().unwrap());
    let ca_path = ca.display().to_string();
    let env = move |k: &str| match k {
        "KLAVIYO_PRIVATE_KEY" => Some(KEY_A.to_string()),
        "KLAVIYO_PROXY_CA_FILE" => Some(ca_path.clone()),
        _ => None,
    };
    let tls_options = PreflightOptions { upstream: Some(tls_sim.url.clone()), ..options.clone() };
    let report = preflight::run(&tls_options, &env).await;
    assert!(report.passed(), "{}", report.table());
    assert_eq!(report.get(names::TLS).unwrap().result, Verdict::Pass, "{}", report.table());
    // Without the CA, the certificate is not trusted.
    let report = preflight::run(&tls_options, &preflight_env(KEY_A)).await;
    assert_eq!(report.get(names::TLS).unwrap().result, Verdict::Fail, "{}", report.table());
    let _ = std::fs::remove_dir_all(&clean);
    let _ = std::fs::remove_dir_all(&leaky);
}

/// Every metric the alert rules (`config/alerts.yml`) and the Grafana dashboard
/// (`deploy/grafana/klaviyo-proxy.json`) name is served by `/metrics`.
#[tokio::test]
async fn every_metric_in_the_alert_rules_and_the_dashboard_is_served() {
    let mut named: Vec<(&str, String)> = Vec::new();
    for file in ["config/alerts.yml", "deploy/grafana/klaviyo-proxy.json"] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut rest = text.as_str();
        let before = named.len();
        while let Some(at) = rest.find("klaviyo_proxy_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            named.push((file, tail[..end].to_string()));
            rest = &tail[end..];
        }
        assert!(named.len() - before >= 6, "{file}: {named:?}");
    }
    named.sort();
    named.dedup();
    // Traffic that makes every labelled family appear: a success and a 401.
    let sim = sim(SimOptions::default()).await;
    sim.revoke(&format!("Klaviyo-API-Key {KEY_A}"));
    let ops = Ops::start(App::build(inject_config(&sim, "")).unwrap()).await;
    let c = client();
    let r = send(&c, Method::GET, &format!("{}/api/accounts", ops.url), &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(
        &c,
        Method::GET,
        &format!("{}/api/profiles", ops.url),
        &[("authorization", "Klaviyo-API-Key pk_other_account_key_0123456789")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let m = ops.metrics().await;
    for (file, name) in &named {
        assert!(
            m.lines()
                .any(|l| !l.starts_with('#')
                    && (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))),
            "{file} names {name}, which /metrics does not serve:\n{m}"
        );
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/alerts.yml");
    match std::process::Command::new("promtool").args(["check", "rules", path]).output() {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        // CI installs promtool (Debian package `prometheus`); elsewhere it is optional.
        Err(e) if std::env::var_os("CI").is_none() => eprintln!("promtool not run: {e}"),
        Err(e) => panic!("promtool is required in CI: {e}"),
    }
}

/// A stand-in for Klaviyo in an outage: every request gets 503.
async fn failing_upstream() -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        let mut resp = http::Response::new(klaviyo_proxy::body::full("{\"errors\":[]}"));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, std::convert::Infallible>(resp)
    });
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(klaviyo_proxy::server::serve(listener, None, Default::default(), service, async {
        let _ = stopped.await;
    }));
    (url, stop)
}

#[tokio::test]
async fn upstream_5xx_is_counted_and_health_is_down() {
    let (url, _stop) = failing_upstream().await;
    // One attempt per request: this test counts what Klaviyo answered, not retries.
    let mut config = support::config(&url, "[admin]\nhealth_cache_ms = 0\n[retry]\nmax_attempts = 1\n");
    config.auth.mode = klaviyo_proxy::config::AuthMode::Inject;
    config.auth.private_key = Some(klaviyo_proxy::config::Secret::new(KEY_A));
    let ops = Ops::start(App::build(config).unwrap()).await;
    let c = client();
    for _ in 0..3 {
        let r = send(&c, Method::GET, &format!("{}/api/profiles", ops.url), &[], "").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let r = ops.admin_get("/health").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let v = r.json();
    assert_eq!(
        (v["status"].as_str(), v["services"]["klaviyo"]["error"].as_str()),
        (Some("down"), Some("Klaviyo answered 503"))
    );
    let m = ops.metrics().await;
    for line in [
        r#"klaviyo_proxy_upstream_responses_total{operation="get_profiles",tier="L",status="503",class="5xx"} 3"#,
        r#"klaviyo_proxy_upstream_responses_total{operation="get_accounts",tier="XS",status="503",class="5xx"} 1"#,
        r#"klaviyo_proxy_requests_total{operation="get_profiles",tier="L",outcome="forwarded"} 3"#,
        r#"klaviyo_proxy_health_probes_total{result="down"} 1"#,
    ] {
        assert!(has_line(&m, line), "missing {line}\n{m}");
    }
}
