//! The checklist end to end: its opt-in refusals through the real request path
//! (scopes, phone numbers), and the status page in a real headless Chromium checked
//! against `/admin/checklist`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use klaviyo_proxy::sim::SimOptions;
use serde_json::Value;
use support::{client, process, send, KEY_A};

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

async fn checklist_of(app: &klaviyo_proxy::App) -> Value {
    let resp = app.admin().handle(Request::get("/admin/checklist").body(()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

fn item<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["accounts"][0]["items"].as_array().unwrap().iter().find(|i| i["id"] == id).unwrap()
}

/// `auth.allowed_scopes` refuses an operation it does not grant with 403
/// `proxy_scope_forbidden` (nothing reaches Klaviyo) and forwards the rest;
/// `checks.phone_e164 = "reject"` answers a bad number 400 in Klaviyo's error shape,
/// pointing at it without quoting it, before it spends quota. Both show on the checklist.
#[tokio::test]
async fn opt_in_checks_refuse_before_klaviyo() {
    let sim = support::sim(SimOptions::default()).await;
    let config =
        support::config(&sim.url, "[auth]\nallowed_scopes = [\"profiles:write\"]\n[checks]\nphone_e164 = \"reject\"\n");
    let proxy = support::proxy(config).await;
    let c = client();
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let h = [("authorization", auth.as_str()), ("content-type", "application/vnd.api+json")];
    let url = |p: &str| format!("{}{p}", proxy.url());

    let r = send(&c, Method::GET, &url("/api/profiles"), &h, "").await;
    assert_eq!(r.status, StatusCode::OK, "profiles:write grants profiles:read");
    let event = r#"{"data":{"type":"event","attributes":{"properties":{},"metric":{"data":{"type":"metric","attributes":{"name":"x"}}},"profile":{"data":{"type":"profile","attributes":{"email":"a@b.c"}}}}}}"#;
    let r = send(&c, Method::POST, &url("/api/events"), &h, event).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.header("x-klaviyo-proxy-error"), Some("proxy_scope_forbidden"));
    let e = &r.json()["errors"][0];
    assert_eq!((&e["status"], &e["code"]), (&403.into(), &"proxy_scope_forbidden".into()));
    assert!(e["detail"].as_str().unwrap().contains("events:write"), "{e}");

    let bad = r#"{"data":{"type":"profile","attributes":{"email":"a@b.c","phone_number":"415 555 2671"}}}"#;
    let r = send(&c, Method::POST, &url("/api/profiles"), &h, bad).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let e = &r.json()["errors"][0];
    assert_eq!(e["code"], "proxy_phone_not_e164");
    assert_eq!(e["source"]["pointer"], "/data/attributes/phone_number");
    assert!(!r.json().to_string().contains("555"), "the number is never echoed");
    let good = r#"{"data":{"type":"profile","attributes":{"email":"a@b.c","phone_number":"+14155552671"}}}"#;
    let r = send(&c, Method::POST, &url("/api/profiles"), &h, good).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    // Klaviyo saw the profile read and the good write, never the refused two.
    let stats = sim.stats();
    let reached = |op: &str| support::bucket(&stats, op, "endpoint").iter().map(|b| b.requests).sum::<u64>();
    assert_eq!((reached("get_profiles"), reached("create_event"), reached("create_profile")), (1, 0, 1));

    let report = checklist_of(&proxy.app).await;
    let scopes = item(&report, "least_privilege");
    assert_eq!(scopes["light"], "red", "{scopes}");
    assert_eq!(scopes["details"]["refused"], 1);
    let phones = item(&report, "phone_numbers");
    assert_eq!((&phones["light"], &phones["details"]["refused"]), (&"red".into(), &1.into()), "{phones}");
    let errors = item(&report, "errors");
    assert_eq!(errors["light"], "green", "the proxy's own refusals are not Klaviyo's 401/403: {errors}");
}

/// Where Chromium is, or why the test cannot run. Under CI the browser is required.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let ok = Command::new(name).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        ok.is_ok_and(|s| s.success()).then(|| PathBuf::from(name))
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required in CI (Debian packages chromium and chromium-driver)"
        );
        eprintln!("chromium not found: the status page test did not run");
    }
    found
}

/// Runs headless Chromium on `url` with a fresh profile and the flags that keep it
/// off the network; `what` is `--dump-dom` or `--screenshot=PATH`. Returns stdout.
fn headless(browser: &Path, url: &str, what: &str) -> String {
    let profile =
        std::env::temp_dir().join(format!("klaviyo-proxy-chromium-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&profile).unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1200,1700",
            // Virtual time runs the page's first refresh and render, then stops.
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(what)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    // Bounded: a browser that hangs is killed (by its PID) and the test fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(status.is_some_and(|s| s.success()), "chromium {what} failed or hung: {status:?}");
    out
}

/// The value of attribute `name` in an element's opening tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(unescape(&tag[start..start + tag[start..].find('"')?]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The text of the first `<td class="CLASS">` in `row`.
fn cell(row: &str, class: &str) -> String {
    let open = format!("<td class=\"{class}\">");
    let start = row.find(&open).map(|i| i + open.len()).unwrap_or_else(|| panic!("no {class} cell in {row}"));
    unescape(&row[start..start + row[start..].find("</td>").unwrap()])
}

/// The status page in a real browser: the binary serves it offline (no CDN), its
/// script fetches `/admin/checklist` and draws every item; the rendered lights and
/// summaries equal the JSON's, and a screenshot is saved under target/.
#[test]
fn status_page_renders_the_checklist_in_chromium() {
    let Some(browser) = chromium() else { return };
    let (_sim, sim_url) = process::start(BIN, &["simulate", "--listen", "127.0.0.1:0", "--seed", "3"], &[]);
    let args = process::serve_args(&sim_url, None);
    let (_proxy, urls) = process::start_urls(BIN, &args, &[("KLAVIYO_PROXY_LOG_LEVEL", "warn")], 2);
    let (proxy_url, admin_url) = (urls[0].clone(), urls[1].clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let json = rt.block_on(async {
        let c = client();
        let sdk = format!("Klaviyo-API-Key {KEY_A}");
        let py = [("authorization", sdk.as_str()), ("user-agent", "klaviyo-api-python/25.0.0")];
        for _ in 0..3 {
            send(&c, Method::GET, &format!("{proxy_url}/api/profiles"), &py, "").await;
        }
        let raw = [
            ("authorization", "Klaviyo-API-Key pk_status_page_raw_0123456789"),
            ("user-agent", "legacy-cron/0.9 <b>bold</b>"),
            ("revision", "2024-10-15"),
            ("content-type", "application/json"),
        ];
        let body = r#"{"data":{"type":"profile","attributes":{"email":"p@example.com","phone_number":"0415 555"}}}"#;
        let r = send(&c, Method::POST, &format!("{proxy_url}/api/profiles"), &raw, body).await;
        assert_eq!(r.status, StatusCode::CREATED);
        // Background body checks land within moments; wait for them (bounded).
        for _ in 0..50 {
            let r = send(&c, Method::GET, &format!("{admin_url}/admin/checklist"), &[], "").await;
            if r.json().to_string().contains("not E.164") {
                return r.json();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the phone number was never counted");
    });

    let dom = headless(&browser, &format!("{admin_url}/"), "--dump-dom");
    assert!(dom.contains("data-loaded="), "the script never rendered a report:\n{dom}");
    assert!(!dom.contains("<b>bold</b>"), "client text must not become markup");
    let rows: Vec<&str> = dom.split("<tr class=\"item\"").skip(1).map(|r| &r[..r.find("</tr>").unwrap()]).collect();
    let mut compared = 0;
    for account in json["accounts"].as_array().unwrap() {
        let name = account["account"].as_str().unwrap();
        for item in account["items"].as_array().unwrap() {
            let id = item["id"].as_str().unwrap();
            let row = rows
                .iter()
                .find(|r| {
                    attr(r, "data-item").as_deref() == Some(id) && attr(r, "data-account").as_deref() == Some(name)
                })
                .unwrap_or_else(|| panic!("no row for {name}/{id} in the page"));
            assert_eq!(attr(row, "data-light").as_deref(), item["light"].as_str(), "{name}/{id}");
            assert_eq!(cell(row, "summary"), item["summary"].as_str().unwrap(), "{name}/{id}");
            assert_eq!(cell(row, "title"), item["title"].as_str().unwrap());
            compared += 1;
        }
    }
    assert_eq!(compared, 14, "two accounts of seven items");
    for id in ["breaker", "limiter", "spool"] {
        let want = json["health"].as_array().unwrap().iter().find(|h| h["id"] == id).unwrap();
        let row = rows.iter().find(|r| attr(r, "data-item").as_deref() == Some(id)).unwrap();
        assert_eq!(attr(row, "data-light").as_deref(), want["light"].as_str(), "{id}");
    }
    assert!(dom.contains("data-light=\"red\""), "the retired revision and the bad phone are red");
    assert!(dom.contains("legacy-cron/0.9"), "the raw client is named");
    assert!(dom.contains("get_profiles"), "the busiest buckets are listed");

    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/checklist-status-page.png");
    let _ = std::fs::remove_file(&shot);
    headless(&browser, &format!("{admin_url}/"), &format!("--screenshot={}", shot.display()));
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    println!("screenshot: {}", shot.display());
}

/// The Grafana dashboard imports anywhere: a Prometheus datasource variable that every
/// query uses, unique panel ids, and the checklist's thresholds drawn where the alert
/// rules put them (5 s p95 latency, 5 429s and 10 5xx per minute).
#[test]
fn grafana_dashboard_is_importable_and_draws_the_thresholds() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/klaviyo-proxy.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["name"] == "datasource").expect("a datasource variable");
    assert_eq!((&ds["type"], &ds["query"]), (&"datasource".into(), &"prometheus".into()));
    let panels = dash["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut thresholds = Vec::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            assert!(t["expr"].as_str().unwrap().contains("klaviyo_proxy_"), "{}", p["title"]);
        }
        let steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"].as_array().unwrap();
        if p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "dashed" {
            thresholds.push((p["title"].as_str().unwrap().to_string(), steps[1]["value"].as_f64().unwrap()));
        }
    }
    let drawn = |word: &str| thresholds.iter().find(|(t, _)| t.contains(word)).map(|(_, v)| *v);
    assert_eq!(drawn("latency p95"), Some(5.0), "{thresholds:?}");
    assert_eq!(drawn("429s per minute"), Some(5.0), "{thresholds:?}");
    assert_eq!(drawn("5xx per minute"), Some(10.0), "{thresholds:?}");
    let text = serde_json::to_string(&dash).unwrap();
    for wanted in
        ["klaviyo_proxy_queue_wait_seconds_bucket", "klaviyo_proxy_window_fill_ratio", "klaviyo_proxy_breaker_state"]
    {
        assert!(text.contains(wanted), "{wanted}");
    }
}
