//! A property test of hostile requests against the in-process proxy in inject mode:
//! whatever a client sends (methods, encoded and dot-segment paths, absolute-form
//! targets, `Host` values, `Connection` lists, duplicated and oversized headers,
//! bodies), the proxy does not panic, forwards nothing outside `/api/` and `/client/`
//! after normalisation, forwards nothing without the injected key, and every answer of
//! its own is a JSON:API error marked `X-Klaviyo-Proxy-Error`.

mod support;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use klaviyo_proxy::config::{AuthMode, Secret};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "pk_injected_0123456789abcdef0123";

struct Harness {
    runtime: tokio::runtime::Runtime,
    proxy: SocketAddr,
    upstream: SocketAddr,
    seen: support::Arrivals,
    _proxy: support::Proxy,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (proxy, upstream, seen) = runtime.block_on(async {
            let (upstream, seen) = support::recorder().await;
            let mut config = support::config(
                &format!("http://{upstream}"),
                "[limits]\nenabled = false\n[auth]\nallow_client_keys = false\n[breaker]\nenabled = false\n",
            );
            config.auth.mode = AuthMode::Inject;
            config.auth.private_key = Some(Secret::new(KEY));
            (support::proxy(config).await, upstream, seen)
        });
        Harness { runtime, proxy: proxy.addr, upstream, seen, _proxy: proxy }
    })
}

/// An oracle independent of the proxy's code: RFC 3986 dot-segment removal after
/// percent-decoding must leave the path unchanged and under `/api` or `/client/`.
fn is_forwardable(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let Some(segments) = rest.split('/').map(percent_decode).collect::<Option<Vec<String>>>() else { return false };
    let last = segments.len() - 1;
    let clean = segments
        .iter()
        .enumerate()
        .all(|(i, s)| !(s == "." || s == ".." || (s.is_empty() && i != last) || s.contains(['/', '\\', '\0'])));
    clean && (segments[0] == "api" || (segments[0] == "client" && segments.len() > 1))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// One raw exchange: the bytes as given, then everything until the proxy closes.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await;
    out
}

struct Parsed {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn parse(raw: &[u8]) -> Option<Parsed> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Parsed { status, headers, body: raw[end + 4..].to_vec() })
}

fn target() -> impl Strategy<Value = String> {
    let prefix = prop::sample::select(vec![
        "/api/",
        "/client/",
        "/",
        "/admin/",
        "//api/",
        "/api",
        "*",
        "UPSTREAM/api/",
        "http://evil.example/api/",
        "/%61pi/",
    ]);
    let segment = prop::sample::select(vec![
        "accounts",
        "events",
        "profiles",
        "..",
        ".",
        "%2e%2e",
        "%2E",
        ".%2e",
        "",
        "%2f",
        "%2F..",
        "%5c",
        "%00",
        "a%20b",
        "%zz",
        "x;y",
        "%252e%252e",
        "admin",
        "%",
        "01ABC",
    ]);
    let query = prop::sample::select(vec!["", "?company_id=ABC", "?a=..%2f", "?/../../"]);
    (prefix, prop::collection::vec(segment, 0..5), query).prop_map(|(p, segs, q)| format!("{p}{}{q}", segs.join("/")))
}

#[derive(Debug, Clone)]
struct Hostile {
    method: &'static str,
    target: String,
    host: Vec<&'static str>,
    connection: Vec<&'static str>,
    extra: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let method = prop::sample::select(vec![
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "CONNECT", "TRACE", "FOO",
    ]);
    let host = prop::collection::vec(
        prop::sample::select(vec![
            "PROXY",
            "localhost",
            "127.0.0.1",
            "evil.example:8080",
            "evil.example",
            "[::1]:1",
            "localhost.evil.example",
            "",
            "a@localhost",
            "UPSTREAM",
        ]),
        0..3,
    );
    let connection = prop::collection::vec(
        prop::sample::select(vec![
            "keep-alive",
            "authorization",
            "Authorization",
            "revision",
            "host",
            "x-hop",
            "te",
            "upgrade",
            "x-request-id",
            "keep-alive, authorization",
            "x-hop, x-other",
        ]),
        0..3,
    );
    let extra = prop::collection::vec(
        prop_oneof![
            Just(("authorization", "Klaviyo-API-Key pk_client_key_999".to_string())),
            Just(("authorization", String::new())),
            Just(("x-hop", "1".to_string())),
            Just(("revision", "2024-10-15".to_string())),
            Just(("x-dup", "1".to_string())),
            Just(("x-dup", "2".to_string())),
            Just(("te", "trailers".to_string())),
            Just(("upgrade", "h2c".to_string())),
            Just(("x-big", "a".repeat(70_000))),
            Just(("x-request-id", "r".repeat(300))),
            Just(("x-proxy-max-wait-ms", "-1".to_string())),
            Just(("proxy-authorization", "Bearer nope".to_string())),
        ],
        0..4,
    );
    let body = prop::collection::vec(any::<u8>(), 0..512);
    (method, target(), host, connection, extra, body).prop_map(|(method, target, host, connection, extra, body)| {
        Hostile { method, target, host, connection, extra, body }
    })
}

fn render(h: &Hostile, proxy: SocketAddr, upstream: SocketAddr) -> Vec<u8> {
    let fill = |s: &str| s.replace("UPSTREAM", &format!("http://{upstream}")).replace("PROXY", &proxy.to_string());
    let mut out = format!("{} {} HTTP/1.1\r\n", h.method, fill(&h.target).replace("http://http://", "http://"));
    for host in &h.host {
        out.push_str(&format!("host: {}\r\n", fill(host).trim_start_matches("http://")));
    }
    for c in &h.connection {
        out.push_str(&format!("connection: {c}\r\n"));
    }
    for (k, v) in &h.extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\nconnection: close\r\n\r\n", h.body.len()));
    let mut raw = out.into_bytes();
    raw.extend_from_slice(&h.body);
    raw
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_requests(h in hostile()) {
        let harness = harness();
        let before = harness.seen.lock().unwrap().len();
        let raw = render(&h, harness.proxy, harness.upstream);
        let answer = harness.runtime.block_on(exchange(harness.proxy, &raw));
        let seen: Vec<support::Arrival> = harness.seen.lock().unwrap()[before..].to_vec();
        for s in &seen {
            prop_assert!(is_forwardable(&s.path), "forwarded {:?} for {h:?}", s.path);
            let expected = format!("Klaviyo-API-Key {KEY}").into_bytes();
            prop_assert_eq!(s.all("authorization"), vec![expected.as_slice()], "key for {:?}", h);
            for hop in ["connection", "te", "upgrade", "proxy-authorization", "keep-alive"] {
                prop_assert!(s.all(hop).is_empty(), "{hop} forwarded for {h:?}");
            }
            // A header the client's Connection names is hop-by-hop too.
            if h.connection.iter().any(|c| c.contains("x-hop")) {
                prop_assert!(s.all("x-hop").is_empty(), "x-hop forwarded for {h:?}");
            }
        }
        if seen.is_empty() {
            // Nothing went upstream: the answer is the proxy's own (or hyper refusing to
            // parse the request at all, with an empty body before the proxy saw it).
            let parsed = parse(&answer);
            prop_assert!(parsed.is_some(), "no answer for {h:?}: {:?}", String::from_utf8_lossy(&answer));
            let p = parsed.unwrap();
            let marker = p.headers.iter().find(|(k, _)| k == "x-klaviyo-proxy-error").map(|(_, v)| v.clone());
            match marker {
                Some(_) if h.method == "HEAD" => prop_assert!(p.status >= 400),
                Some(code) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.body)
                        .map_err(|e| TestCaseError::fail(format!("not JSON ({e}) for {h:?}")))?;
                    prop_assert_eq!(v["errors"][0]["code"].as_str(), Some(code.as_str()));
                    prop_assert_eq!(v["errors"][0]["status"].as_u64(), Some(u64::from(p.status)));
                    prop_assert!(p.status >= 400);
                }
                None => prop_assert!(
                    matches!(p.status, 400 | 431 | 501 | 505) && p.body.is_empty(),
                    "unmarked answer {} for {h:?}", p.status
                ),
            }
        }
    }
}

/// The oracle itself, and the proxy serving a plain request.
#[test]
fn oracle_and_survival() {
    for (path, ok) in [
        ("/api/accounts/", true),
        ("/api", true),
        ("/client/events/", true),
        ("/api/../admin", false),
        ("/api/%2e%2e/x", false),
        ("/api//x", false),
        ("/api/a%2fb", false),
        ("/apix", false),
    ] {
        assert_eq!(is_forwardable(path), ok, "{path}");
    }
    let h = harness();
    let raw = "GET /api/accounts/ HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    let answer = h.runtime.block_on(exchange(h.proxy, raw.as_bytes()));
    assert_eq!(parse(&answer).unwrap().status, 200, "{}", String::from_utf8_lossy(&answer));
}
