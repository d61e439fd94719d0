//! Hardening through the real binary in inject mode in front of the built-in simulator:
//! the attacks of issue 13, each as a request a local process or web page could make.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::process::Running;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");
const KEY: &str = "pk_SECRETinjectedkey0123456789abcdef";

/// The binary serving `config` with the injected key, with its proxy and admin addresses.
struct Served {
    _child: Running,
    proxy: String,
    admin: String,
    _dir: PathBuf,
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kp-harden-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn serve(name: &str, toml: &str) -> Served {
    let dir = tempdir(name);
    let config = dir.join("proxy.toml");
    std::fs::write(&config, format!("[auth]\nmode = \"inject\"\n{toml}")).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", "sim", "--config"])
        .arg(&config)
        .env("KLAVIYO_PRIVATE_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim().rsplit(' ').next().unwrap().trim_start_matches("http://").to_string()
    };
    let (proxy, admin) = (addr(), addr());
    Served { _child: Running(child), proxy, admin, _dir: dir }
}

/// A fully read answer.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn proxy_error(&self) -> Option<&str> {
        self.headers.get("x-klaviyo-proxy-error").map(|v| v.to_str().unwrap())
    }
}

/// Sends one request exactly as given (target and `Host` untouched, like `curl --path-as-is`).
async fn raw(addr: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(target);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req)).await.unwrap().unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, headers, body }
}

/// `curl -H 'Host: evil.example:8080' 127.0.0.1:8080/api/accounts`: a page rebinding its
/// name to loopback must not read the account with the injected key.
#[tokio::test]
async fn host_rebinding_is_refused() {
    let s = serve("host", "");
    let ok = raw(&s.proxy, "GET", "/api/accounts", &[], "").await;
    assert_eq!(ok.status, StatusCode::OK);
    let ok = raw(&s.proxy, "GET", "/api/accounts", &[("host", "localhost:8080")], "").await;
    assert_eq!(ok.status, StatusCode::OK);
    let evil = raw(&s.proxy, "GET", "/api/accounts", &[("host", "evil.example:8080")], "").await;
    assert_eq!(evil.status, StatusCode::MISDIRECTED_REQUEST, "{:?}", evil.body);
    assert_eq!(evil.proxy_error(), Some("proxy_unknown_host"));
    assert!(!String::from_utf8_lossy(&evil.body).contains("\"data\""));
    // The admin listener checks it too: a rebinding page must not read /health or /metrics.
    let evil = raw(&s.admin, "GET", "/metrics", &[("host", "evil.example:9090")], "").await;
    assert_eq!(evil.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(evil.proxy_error(), Some("proxy_unknown_host"));
    assert_eq!(raw(&s.admin, "GET", "/metrics", &[], "").await.status, StatusCode::OK);
}

/// Configured public names are accepted.
#[tokio::test]
async fn allowed_hosts_are_accepted() {
    let s = serve("allowed", "[server]\nallowed_hosts = [\"proxy.internal\"]\n");
    let ok = raw(&s.proxy, "GET", "/api/accounts", &[("host", "proxy.internal:8080")], "").await;
    assert_eq!(ok.status, StatusCode::OK);
    let evil = raw(&s.proxy, "GET", "/api/accounts", &[("host", "proxy.internal.evil.example")], "").await;
    assert_eq!(evil.status, StatusCode::MISDIRECTED_REQUEST);
}

/// `curl -X POST -H 'Origin: http://evil.example' -H 'Content-Type: text/plain'
/// 127.0.0.1:9090/admin/reload`: a "simple" cross-site request must not reach the admin.
#[tokio::test]
async fn cross_site_admin_post_is_refused() {
    let s = serve("csrf", "");
    let post = |headers: &'static [(&'static str, &'static str)]| raw(&s.admin, "POST", "/admin/reload", headers, "");
    let r = post(&[("origin", "http://evil.example"), ("content-type", "text/plain")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    assert_eq!(r.proxy_error(), Some("proxy_cross_site"));
    // Not JSON: a form or text/plain post is what a web page can send without a preflight.
    let r = post(&[("content-type", "text/plain")]).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.proxy_error(), Some("proxy_unsupported_media_type"));
    let r = post(&[("sec-fetch-site", "cross-site"), ("content-type", "application/json")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // The operator's own curl still works.
    let r = post(&[("content-type", "application/json")]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

/// An `admin.token` guards the admin listener (probes excepted).
#[tokio::test]
async fn admin_token_guards_the_admin_listener() {
    let s = serve("admintoken", "[admin]\ntoken = \"admin-SECRET-token-0123456789\"\n");
    let r = raw(&s.admin, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.proxy_error(), Some("proxy_admin_auth_required"));
    let r = raw(&s.admin, "GET", "/metrics", &[("authorization", "Bearer wrong-token-0123456789abc")], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = raw(&s.admin, "GET", "/metrics", &[("authorization", "bearer admin-SECRET-token-0123456789")], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(raw(&s.admin, "GET", "/live", &[], "").await.status, StatusCode::OK);
    let r = raw(
        &s.admin,
        "POST",
        "/admin/reload",
        &[("authorization", "Bearer admin-SECRET-token-0123456789"), ("content-type", "application/json")],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// `curl -H 'Connection: authorization' 127.0.0.1:8080/api/accounts`: the injected key
/// must reach Klaviyo (no 401, no auth failure counted against the account).
#[tokio::test]
async fn connection_cannot_strip_the_injected_key() {
    let s = serve("hop", "");
    for connection in ["authorization", "keep-alive, Authorization", "revision"] {
        let r = raw(&s.proxy, "GET", "/api/accounts", &[("connection", connection)], "").await;
        assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{connection}: {:?}", r.body);
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{connection}");
        assert_eq!(r.proxy_error(), Some("proxy_bad_request"));
    }
    // A client's own hop-by-hop header still goes no further.
    let r = raw(&s.proxy, "GET", "/api/accounts", &[("connection", "x-hop"), ("x-hop", "1")], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let metrics = raw(&s.admin, "GET", "/metrics", &[], "").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(!text.lines().any(|l| l.starts_with("klaviyo_proxy_upstream_auth_failures_total{")), "{text}");
}

/// `curl --path-as-is 127.0.0.1:8080/api/..` and its cousins are never forwarded.
#[tokio::test]
async fn dot_segments_and_encoded_paths_are_refused() {
    let s = serve("path", "");
    for target in [
        "/api/..",
        "/api/./accounts",
        "/api/%2e%2e/x",
        "/api/%2E%2e/x",
        "/api/.%2e/x",
        "/api//accounts",
        "/api/accounts%2f..%2f",
        "/api/accounts%5c",
        "/api/a\\b",
        "/client/../api/accounts",
        "/api/%zz",
    ] {
        let r = raw(&s.proxy, "GET", target, &[], "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{target}");
        assert_eq!(r.proxy_error(), Some("proxy_unknown_path"), "{target}");
    }
    assert_eq!(raw(&s.proxy, "GET", "/api/accounts/", &[], "").await.status, StatusCode::OK);
}

/// `simulate --retry-after 18446744073709551615` (any fault value) answers and goes on
/// answering instead of panicking.
#[tokio::test]
async fn simulator_survives_extreme_fault_values() {
    use klaviyo_proxy::sim::{Faults, SimOptions};
    let faults = Faults { throttle_rate: 1.0, retry_after: Some(u64::MAX.to_string()), ..Faults::default() };
    let sim = support::sim(SimOptions { faults, ..SimOptions::default() }).await;
    let addr = sim.url.trim_start_matches("http://").to_string();
    for _ in 0..2 {
        let r = raw(
            &addr,
            "GET",
            "/api/accounts",
            &[("authorization", "Klaviyo-API-Key pk_x"), ("revision", "2026-07-15")],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers["retry-after"], u64::MAX.to_string().as_str());
    }
    assert_eq!(sim.stats().throttled, 2);
}
