//! `klaviyo-proxy preflight`: the production checklist's pre-flight as a command.
//! Config valid, Klaviyo's status page, TLS to the upstream, API auth with the
//! configured key and revision, rate-limit headroom, revision supported, and
//! optionally a scan of a source tree for hardcoded private keys. Every check is
//! pass, warn, skip or fail; any fail makes the command exit non-zero. Output never
//! contains a key: the scan shows only a masked prefix.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::Value;

use crate::checklist::rules::{self, RevisionState};
use crate::config::Config;
use crate::upstream::tls_config;

/// What the command was asked to check.
#[derive(Debug, Clone, Default)]
pub struct PreflightOptions {
    /// Config file; the embedded default when `None`.
    pub config: Option<PathBuf>,
    /// Upstream URL overriding the config.
    pub upstream: Option<String>,
    /// Status page URL overriding the config.
    pub status_url: Option<String>,
    /// Source tree to scan for hardcoded private keys.
    pub scan: Option<PathBuf>,
    /// A running proxy's admin URL: its checklist's traffic-derived items join the report.
    pub from_traffic: Option<String>,
}

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Works, but look at it.
    Warn,
    /// Not run (it needs something missing, such as a key).
    Skip,
    /// Not ready for production.
    Fail,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Skip => "SKIP",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Which check.
    pub name: &'static str,
    /// Its result.
    pub result: Verdict,
    /// What was found (never a key).
    pub detail: String,
}

/// Every check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether no check failed.
    pub passed: bool,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether no check failed.
    pub fn passed(&self) -> bool {
        self.passed
    }

    /// The result of the named check.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<18} {:<6} DETAIL", "CHECK", "RESULT");
        for c in &self.checks {
            let _ = writeln!(out, "{:<18} {:<6} {}", c.name, c.result.as_str(), c.detail);
        }
        let _ = writeln!(out, "\npreflight {}", if self.passed { "passed" } else { "FAILED" });
        out
    }
}

/// Check names, as they appear in the report.
pub mod names {
    /// The config loads and passes the serve checks.
    pub const CONFIG: &str = "config";
    /// Klaviyo's status page.
    pub const STATUS_PAGE: &str = "status page";
    /// A TLS handshake with the upstream.
    pub const TLS: &str = "tls";
    /// `GET /api/accounts` with the configured key.
    pub const AUTH: &str = "api auth";
    /// `RateLimit-Remaining` of a minimal request.
    pub const HEADROOM: &str = "rate-limit headroom";
    /// The configured revision.
    pub const REVISION: &str = "revision";
    /// Hardcoded private keys in a source tree.
    pub const SCAN: &str = "key scan";
    /// `--from-traffic`: the running proxy's checklist could not be read.
    pub const TRAFFIC: &str = "traffic";
    /// `--from-traffic`: the checklist's items, by item id.
    pub const TRAFFIC_ITEMS: &[(&str, &str)] = &[
        ("sdk", "traffic: sdk"),
        ("revision", "traffic: revision"),
        ("profile_writes", "traffic: profiles"),
        ("events", "traffic: events"),
        ("phone_numbers", "traffic: phones"),
        ("least_privilege", "traffic: scopes"),
        ("errors", "traffic: errors"),
    ];
}

fn check(name: &'static str, result: Verdict, detail: impl Into<String>) -> Check {
    Check { name, result, detail: detail.into() }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Fetched {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn fetch(
    client: &HttpClient,
    uri: Uri,
    headers: &[(header::HeaderName, HeaderValue)],
    timeout: Duration,
) -> Result<Fetched, String> {
    let mut req = Request::get(uri).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    for (name, value) in headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => return Err(format!("no answer within {}s", timeout.as_secs())),
        Ok(Err(e)) => return Err(error_chain(&e)),
        Ok(Ok(resp)) => resp,
    };
    let (parts, body) = resp.into_parts();
    let body = match tokio::time::timeout(timeout, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => return Err("the response body could not be read".into()),
    };
    Ok(Fetched { status: parts.status, headers: parts.headers, body })
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

/// Runs every check. `env` reads environment variables (the key may come from one).
pub async fn run(options: &PreflightOptions, env: &dyn Fn(&str) -> Option<String>) -> Report {
    let mut checks = Vec::new();
    let config = load_config(options, env);
    match &config {
        Ok(_) => checks.push(check(
            names::CONFIG,
            Verdict::Pass,
            options.config.as_ref().map_or("embedded default".into(), |p| format!("{} is valid", p.display())),
        )),
        Err(e) => checks.push(check(names::CONFIG, Verdict::Fail, e.clone())),
    }
    if let Ok(config) = &config {
        network_checks(config, &mut checks).await;
    } else {
        for name in [names::STATUS_PAGE, names::TLS, names::AUTH, names::HEADROOM, names::REVISION] {
            checks.push(check(name, Verdict::Skip, "the config is invalid"));
        }
    }
    if let Some(dir) = &options.scan {
        checks.push(scan_check(dir));
    }
    if let Some(admin) = &options.from_traffic {
        checks.extend(traffic_checks(admin).await);
    }
    let passed = checks.iter().all(|c| c.result != Verdict::Fail);
    Report { passed, checks }
}

fn load_config(options: &PreflightOptions, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
    let mut config = Config::load(options.config.as_deref(), env).map_err(|e| e.to_string())?;
    if let Some(url) = &options.upstream {
        config.upstream.url = url.clone().try_into().map_err(|e| format!("--upstream: {e}"))?;
    }
    if let Some(url) = &options.status_url {
        config.preflight.status_url = url.clone();
    }
    config.check_serve().map_err(|e| e.to_string())?;
    Ok(config)
}

fn check_timeout(config: &Config) -> Duration {
    Duration::from_millis(config.upstream.connect_timeout_ms.max(1000) * 2)
}

fn http_client(config: &Config) -> Result<HttpClient, crate::upstream::TlsSetupError> {
    let tls = tls_config(config.upstream.ca_file.as_deref())?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_millis(config.upstream.connect_timeout_ms)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

async fn network_checks(config: &Config, checks: &mut Vec<Check>) {
    let timeout = check_timeout(config);
    let client = match http_client(config) {
        Ok(client) => client,
        Err(e) => {
            checks.push(check(names::TLS, Verdict::Fail, e.to_string()));
            return;
        }
    };
    checks.push(status_page(&client, &config.preflight.status_url, timeout).await);
    checks.push(tls_check(config, timeout).await);

    let base: String = config.upstream.url.clone().into();
    let Some(key) = &config.auth.private_key else {
        let why = "no private key configured (set KLAVIYO_PRIVATE_KEY or auth.key_file)";
        checks.push(check(names::AUTH, Verdict::Skip, why));
        checks.push(check(names::HEADROOM, Verdict::Skip, why));
        checks.push(revision_check(config, None));
        return;
    };
    let mut auth = match HeaderValue::from_str(&format!("Klaviyo-API-Key {}", key.expose())) {
        Ok(v) => v,
        Err(_) => {
            checks.push(check(
                names::AUTH,
                Verdict::Fail,
                "the private key contains characters not allowed in a header",
            ));
            return;
        }
    };
    auth.set_sensitive(true);
    let headers = [
        (header::AUTHORIZATION, auth),
        (header::ACCEPT, HeaderValue::from_static("application/vnd.api+json")),
        (
            header::HeaderName::from_static("revision"),
            HeaderValue::from_str(config.upstream.revision.as_str()).expect("validated revision"),
        ),
    ];
    let uri = |path: &str| format!("{base}{path}").parse::<Uri>().expect("upstream URL plus a static path");
    let accounts = fetch(&client, uri("/api/accounts"), &headers, timeout).await;
    checks.push(auth_check(&accounts));
    let profiles = fetch(&client, uri("/api/profiles?page%5Bsize%5D=1"), &headers, timeout).await;
    checks.push(headroom_check(&profiles));
    checks.push(revision_check(config, accounts.as_ref().ok()));
}

/// Klaviyo's status page (statuspage.io `api/v2/status.json`): its
/// `(indicator, description)`, or why it could not be read.
async fn indicator(client: &HttpClient, url: &str, timeout: Duration) -> Result<(String, String), String> {
    let uri = url.parse::<Uri>().map_err(|_| format!("`{url}` is not a URL"))?;
    let fetched = fetch(client, uri, &[], timeout).await.map_err(|e| format!("{url}: {e}"))?;
    if !fetched.status.is_success() {
        return Err(format!("{url} answered {}", fetched.status.as_u16()));
    }
    let v: Value = serde_json::from_slice(&fetched.body).unwrap_or_default();
    match (v["status"]["indicator"].as_str(), v["status"]["description"].as_str()) {
        (Some(i @ ("none" | "minor" | "maintenance" | "major" | "critical")), d) => {
            Ok((i.to_string(), d.unwrap_or("no description").to_string()))
        }
        _ => Err(format!("{url} is not a statuspage api/v2/status.json")),
    }
}

/// Reads `preflight.status_url` as the `status page` check does (for the checklist).
pub async fn status_indicator(config: &Config) -> Result<(String, String), String> {
    let client = http_client(config).map_err(|e| e.to_string())?;
    indicator(&client, &config.preflight.status_url, check_timeout(config)).await
}

async fn status_page(client: &HttpClient, url: &str, timeout: Duration) -> Check {
    match indicator(client, url, timeout).await {
        Err(e) => check(names::STATUS_PAGE, Verdict::Fail, e),
        Ok((i, description)) => match i.as_str() {
            "none" => check(names::STATUS_PAGE, Verdict::Pass, description),
            "minor" | "maintenance" => check(names::STATUS_PAGE, Verdict::Warn, format!("{i}: {description}")),
            _ => check(names::STATUS_PAGE, Verdict::Fail, format!("{i}: {description}")),
        },
    }
}

async fn tls_check(config: &Config, timeout: Duration) -> Check {
    let uri = config.upstream.url.uri();
    if uri.scheme_str() != Some("https") {
        return check(names::TLS, Verdict::Warn, "the upstream is plain http (a simulator?): no TLS to check");
    }
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tls = match tls_config(config.upstream.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => return check(names::TLS, Verdict::Fail, e.to_string()),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = connector.connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        let (_, conn) = stream.get_ref();
        Ok::<_, String>(format!(
            "{host}:{port}: {:?}, certificate verified",
            conn.protocol_version().map_or("unknown".into(), |v| format!("{v:?}"))
        ))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(detail)) => check(names::TLS, Verdict::Pass, detail),
        Ok(Err(e)) => check(names::TLS, Verdict::Fail, format!("{host}:{port}: {e}")),
        Err(_) => {
            check(names::TLS, Verdict::Fail, format!("{host}:{port}: no handshake within {}s", timeout.as_secs()))
        }
    }
}

fn klaviyo_error(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    v["errors"][0]["detail"].as_str().or(v["errors"][0]["title"].as_str()).unwrap_or("").to_string()
}

fn auth_check(accounts: &Result<Fetched, String>) -> Check {
    let f = match accounts {
        Ok(f) => f,
        Err(e) => return check(names::AUTH, Verdict::Fail, format!("GET /api/accounts: {e}")),
    };
    match f.status.as_u16() {
        200 => {
            let v: Value = serde_json::from_slice(&f.body).unwrap_or_default();
            let id = v["data"][0]["id"].as_str().unwrap_or("?");
            let org = v["data"][0]["attributes"]["contact_information"]["organization_name"].as_str().unwrap_or("");
            check(names::AUTH, Verdict::Pass, format!("account {id} {org}").trim_end().to_string())
        }
        s @ (401 | 403) => check(
            names::AUTH,
            Verdict::Fail,
            format!("Klaviyo refused the configured key ({s}): {}", klaviyo_error(&f.body)),
        ),
        429 => {
            check(names::AUTH, Verdict::Warn, "GET /api/accounts was throttled (429): the key is spending its quota")
        }
        s => check(names::AUTH, Verdict::Fail, format!("GET /api/accounts answered {s}: {}", klaviyo_error(&f.body))),
    }
}

fn headroom_check(profiles: &Result<Fetched, String>) -> Check {
    let f = match profiles {
        Ok(f) => f,
        Err(e) => return check(names::HEADROOM, Verdict::Fail, format!("GET /api/profiles: {e}")),
    };
    let num = |name: &str| f.headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    match f.status.as_u16() {
        429 => check(
            names::HEADROOM,
            Verdict::Fail,
            format!(
                "throttled now (Retry-After {}s): something else spends this account's quota",
                num("retry-after").unwrap_or(0)
            ),
        ),
        200..=299 => match (num("ratelimit-remaining"), num("ratelimit-limit")) {
            (Some(remaining), Some(limit)) => {
                let detail = format!("{remaining} of {limit} left in the steady window (get_profiles)");
                if remaining == 0 {
                    check(names::HEADROOM, Verdict::Fail, detail)
                } else if remaining * 10 < limit {
                    check(names::HEADROOM, Verdict::Warn, detail)
                } else {
                    check(names::HEADROOM, Verdict::Pass, detail)
                }
            }
            _ => check(names::HEADROOM, Verdict::Warn, "no RateLimit-Remaining header in the answer"),
        },
        s => {
            check(names::HEADROOM, Verdict::Fail, format!("GET /api/profiles answered {s}: {}", klaviyo_error(&f.body)))
        }
    }
}

/// Judges a revision date against today under Klaviyo's versioning policy (see
/// [`rules::revision_age`]: stable a year, deprecated the next, retired after two).
fn judge_revision(revision: &str, today: i64) -> (Verdict, String) {
    let age = rules::revision_age(revision, today);
    let on = |d: Option<rules::Date>| d.map(|d| d.to_string()).unwrap_or_default();
    match age.state {
        RevisionState::Invalid => (Verdict::Fail, format!("{revision} is not a revision date")),
        RevisionState::Future => (Verdict::Fail, format!("{revision} is in the future")),
        RevisionState::Retired => {
            (Verdict::Fail, format!("{revision} was retired on {}: Klaviyo no longer serves it", on(age.retired_on)))
        }
        RevisionState::Beta => (Verdict::Warn, format!("{revision} is a beta revision: not for production")),
        RevisionState::Deprecated => {
            (Verdict::Warn, format!("{revision} is deprecated (retires {}): plan an upgrade", on(age.retired_on)))
        }
        RevisionState::Stable => (Verdict::Pass, format!("{revision} is supported")),
    }
}

fn revision_check(config: &Config, accounts: Option<&Fetched>) -> Check {
    let revision = config.upstream.revision.as_str();
    if let Some(f) = accounts {
        if f.status == StatusCode::BAD_REQUEST {
            return check(
                names::REVISION,
                Verdict::Fail,
                format!("Klaviyo refused revision {revision}: {}", klaviyo_error(&f.body)),
            );
        }
    }
    let (verdict, detail) = judge_revision(revision, rules::today());
    check(names::REVISION, verdict, detail)
}

/// The checklist of a running proxy as preflight checks: one per item, the worst
/// light over its accounts, each account's summary in the detail.
async fn traffic_checks(admin: &str) -> Vec<Check> {
    use crate::checklist::{client, Light};
    let report = match client::fetch(admin, Duration::from_secs(5)).await {
        Ok(r) => r,
        Err(e) => return vec![check(names::TRAFFIC, Verdict::Fail, e.to_string())],
    };
    if report.accounts.is_empty() {
        return vec![check(names::TRAFFIC, Verdict::Skip, format!("{admin}: no traffic seen yet"))];
    }
    names::TRAFFIC_ITEMS
        .iter()
        .map(|(id, name)| {
            let items: Vec<_> =
                report.accounts.iter().filter_map(|a| a.items.iter().find(|i| i.id == *id).map(|i| (a, i))).collect();
            let worst = items.iter().map(|(_, i)| i.light).max().unwrap_or(Light::Grey);
            let verdict = match worst {
                Light::Green => Verdict::Pass,
                Light::Amber => Verdict::Warn,
                Light::Red => Verdict::Fail,
                Light::Grey => Verdict::Skip,
            };
            let detail: Vec<String> =
                items.iter().map(|(a, i)| format!("account {}: {}", a.account, i.summary)).collect();
            check(name, verdict, detail.join("; "))
        })
        .collect()
}

/// Directories never worth scanning.
const SKIP_DIRS: &[&str] = &[".git", "target", "node_modules", ".venv", "venv", "__pycache__"];
/// Files larger than this are not source.
const MAX_SCAN_BYTES: u64 = 2 * 1024 * 1024;
/// Shortest run of key characters after `pk_` that counts as a key.
const MIN_KEY_CHARS: usize = 20;

/// A hardcoded key found by [`scan`]: where, and a masked prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// `pk_ab…` (never the key).
    pub masked: String,
}

/// Finds `pk_` followed by at least 20 letters and digits, not inside
/// a longer word, in one text; returns (line, masked key) pairs.
pub fn find_keys(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(at) = line[i..].find("pk_") {
            let start = i + at;
            let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let run = bytes[start + 3..].iter().take_while(|b| b.is_ascii_alphanumeric()).count();
            if boundary && run >= MIN_KEY_CHARS {
                found.push((n + 1, format!("{}… ({} chars)", &line[start..start + 5], run + 3)));
            }
            i = start + 3 + run;
        }
    }
    found
}

/// Scans a source tree for hardcoded private keys.
pub fn scan(dir: &Path) -> std::io::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let Ok(kind) = entry.file_type() else { continue };
            let path = entry.path();
            if kind.is_dir() {
                if !SKIP_DIRS.iter().any(|s| entry.file_name() == *s) {
                    stack.push(path);
                }
            } else if kind.is_file() && entry.metadata().is_ok_and(|m| m.len() <= MAX_SCAN_BYTES) {
                let Ok(bytes) = std::fs::read(&path) else { continue };
                for (line, masked) in find_keys(&String::from_utf8_lossy(&bytes)) {
                    findings.push(Finding { path: path.clone(), line, masked });
                }
            }
        }
    }
    findings.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
    Ok(findings)
}

fn scan_check(dir: &Path) -> Check {
    match scan(dir) {
        Err(e) => check(names::SCAN, Verdict::Fail, format!("{}: {e}", dir.display())),
        Ok(found) if found.is_empty() => {
            check(names::SCAN, Verdict::Pass, format!("no private key in {}", dir.display()))
        }
        Ok(found) => {
            let list: Vec<String> =
                found.iter().map(|f| format!("{}:{} {}", f.path.display(), f.line, f.masked)).collect();
            check(
                names::SCAN,
                Verdict::Fail,
                format!(
                    "{} hardcoded private key(s): {} — move them to KLAVIYO_PRIVATE_KEY or a key file",
                    found.len(),
                    list.join(", ")
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_not_lookalikes() {
        let key = "pk_0123456789abcdef0123456789abcdef01";
        let text = format!("a = 1\nKEY = \"{key}\"\npk_id = 3\nmypk_0123456789abcdef0123456789 = 1\nx={key};y={key}\n");
        let found = find_keys(&text);
        assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), [2, 5, 5]);
        assert_eq!(found[0].1, "pk_01… (37 chars)");
        assert!(found.iter().all(|f| !f.1.contains(&key[5..])));
    }

    #[test]
    fn judges_revisions() {
        let today = rules::Date::parse("2026-11-27").unwrap().days();
        assert_eq!(judge_revision("2026-07-15", today).0, Verdict::Pass);
        assert_eq!(judge_revision("2026-07-15.pre", today).0, Verdict::Warn);
        assert_eq!(judge_revision("2025-07-15", today).0, Verdict::Warn);
        assert_eq!(judge_revision("2023-07-15", today).0, Verdict::Fail);
        assert_eq!(judge_revision("2027-01-15", today).0, Verdict::Fail);
        assert_eq!(judge_revision("2024-10-15", today).0, Verdict::Fail);
    }
}
