//! The official SDKs as real clients: Python `klaviyo-api` and Node `klaviyo-api`
//! (installed by `tests/sdk/install.sh` into `target/sdk/`) call real SDK methods
//! through the real proxy binary against the real simulator binary. The scripts they
//! run are in `tests/sdk/`; each prints one JSON object that these tests check, and
//! the simulator's `/__sim/stats` says what reached "Klaviyo".

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use klaviyo_proxy::sim::account_alias;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[path = "support/process.rs"]
mod process;

use process::Running;

/// Starts the binary (logs at warn) and returns it with the URL from its first line.
fn start(args: &[&str]) -> (Running, String) {
    process::start(BIN, args, &[("KLAVIYO_PROXY_LOG_LEVEL", "warn")])
}

/// A simulator and a proxy in front of it; `config` is extra TOML for the proxy.
struct Stack {
    sim_url: String,
    proxy_url: String,
    _proxy: Running,
    _sim: Running,
    _config: Option<TempFile>,
}

fn stack(config: Option<&str>) -> Stack {
    let (sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0", "--seed", "11"]);
    let config = config.map(TempFile::new);
    let (proxy, proxy_url) = start(&process::serve_args(&sim_url, config.as_ref().map(|f| f.0.to_str().unwrap())));
    Stack { sim_url, proxy_url, _proxy: proxy, _sim: sim, _config: config }
}

impl Stack {
    /// The simulator's counters.
    fn stats(&self) -> Value {
        let addr = self.sim_url.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /__sim/stats HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap_or_else(|e| panic!("stats not JSON ({e}): {body}"))
    }

    /// (requests, 429s) the simulator counted for one operation's bucket, over accounts.
    fn counted(&self, operation: &str, bucket: &str) -> (u64, u64) {
        let stats = self.stats();
        stats["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["operation"] == operation && b["bucket"] == bucket)
            .fold((0, 0), |(r, t), b| (r + b["requests"].as_u64().unwrap(), t + b["throttled"].as_u64().unwrap()))
    }
}

/// A config file removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("klaviyo-proxy-sdk-{}-{}.toml", std::process::id(), fastrand::u64(..)));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Installs both SDKs once per test binary (the script caches in target/sdk/).
fn install() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        let status = Command::new("bash")
            .arg(Path::new(ROOT).join("tests/sdk/install.sh"))
            .stdin(Stdio::null())
            .status()
            .expect("run tests/sdk/install.sh (needs bash, python3 with venv, node and npm)");
        assert!(status.success(), "tests/sdk/install.sh failed: python3 (venv), node and npm are needed");
        *done = true;
    }
}

#[derive(Clone, Copy, Debug)]
enum Sdk {
    Python,
    Node,
}

impl Sdk {
    /// Runs the SDK's script in `mode` and returns the JSON it printed.
    fn run(self, mode: &str, url: &str, key: &str, n: Option<usize>) -> Value {
        install();
        let sdk = Path::new(ROOT).join("target/sdk");
        let mut cmd = match self {
            Sdk::Python => {
                let mut c = Command::new(sdk.join("venv/bin/python"));
                c.arg(Path::new(ROOT).join("tests/sdk/python_client.py"));
                c
            }
            Sdk::Node => {
                let mut c = Command::new("node");
                c.arg(Path::new(ROOT).join("tests/sdk/node_client.js")).env("NODE_PATH", sdk.join("node/node_modules"));
                c
            }
        };
        cmd.args([mode, url, key]);
        if let Some(n) = n {
            cmd.arg(n.to_string());
        }
        let out = cmd.stdin(Stdio::null()).output().expect("run the SDK script");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{self:?} {mode} failed: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{self:?} {mode} printed no JSON ({e}): {stdout}"))
    }
}

/// Get accounts, create an event, get profiles, create or update a profile: all
/// succeed through the proxy and reach the simulator unthrottled. Then a burst beyond
/// get_profiles' predictive-analytics burst limit (10/s): sent straight to the
/// simulator the SDK's HTTP layer meets 429s; through the proxy it meets none.
fn calls_and_burst(sdk: Sdk) {
    let stack = stack(None);
    let key = "pk_sdk_test_calls_0123456789";
    let out = sdk.run("calls", &stack.proxy_url, key, None);
    assert_eq!(out["account_id"], "SimAcct1", "{out}");
    assert_eq!(out["profile_email"], "sdk@example.com", "{out}");
    assert_eq!(out["profiles"], 1, "{out}");
    assert_eq!(out["first_profile_email"], "sim@example.com", "{out}");
    assert!(out["profile_id"].as_str().is_some_and(|id| !id.is_empty()), "{out}");
    for op in ["get_accounts", "create_event", "get_profiles", "create_or_update_profile"] {
        assert_eq!(stack.counted(op, "endpoint"), (1, 0), "{op} should reach the simulator once, unthrottled");
    }

    let burst = 25;
    let condition = "additional-fields[profile]=predictive_analytics";
    let direct = sdk.run("burst", &stack.sim_url, "pk_sdk_test_direct_0123456789", Some(burst));
    assert!(direct["wire_429s"].as_u64().unwrap() > 0, "the burst should exceed the limit when sent direct: {direct}");
    let (_, direct_429s) = stack.counted("get_profiles", condition);
    assert!(direct_429s > 0);

    let proxied = sdk.run("burst", &stack.proxy_url, "pk_sdk_test_burst_0123456789", Some(burst));
    assert_eq!(proxied["ok"], burst, "{proxied}");
    assert_eq!(proxied["wire_429s"], 0, "the SDK met a 429 through the proxy: {proxied}");
    assert_eq!(proxied["wire"], burst, "one HTTP exchange per call: {proxied}");
    let stats = stack.stats();
    let proxied_bucket = stats["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["operation"] == "get_profiles" && b["bucket"] == condition && b["throttled"] == 0)
        .unwrap_or_else(|| panic!("no unthrottled predictive_analytics bucket: {stats}"));
    assert_eq!(proxied_bucket["requests"], burst);
    assert!(proxied_bucket["max_sliding"]["burst"].as_u64().unwrap() <= 10, "{proxied_bucket}");
}

/// The proxy's own 429 (queue timeout: integer Retry-After, JSON:API body) reaches
/// the SDK exactly as Klaviyo's does: with retries off it raises the same error shape;
/// with its retry on, it waits Retry-After and every call succeeds. The simulator's
/// own 429 is run through the same script for comparison.
fn retries_on_429(sdk: Sdk) {
    const PROXIED_KEY: &str = "pk_sdk_test_proxy429_0123456789";
    let stack = stack(Some("[queue]\nmax_wait_ms = 500\n"));
    let n = 4;

    let klaviyo = sdk.run("throttled", &stack.sim_url, "pk_sdk_test_sim429_0123456789", Some(n));
    let proxy = sdk.run("throttled", &stack.proxy_url, PROXIED_KEY, Some(n));
    for (who, out, code) in [("simulator", &klaviyo, "throttled"), ("proxy", &proxy, "proxy_queue_timeout")] {
        let raised = out["raised"].as_array().unwrap();
        assert!(!raised.is_empty(), "{who}: a burst of {n} get_accounts (1/s) should be refused: {out}");
        for e in raised {
            assert_eq!(e["status"], 429, "{who}: {e}");
            assert_eq!(e["error_status"], 429, "{who}: {e}");
            assert_eq!(e["error_code"], code, "{who}: {e}");
            assert!(e["retry_after"].as_u64().is_some_and(|s| s >= 1), "{who}: integer Retry-After: {e}");
        }
        assert_eq!(out["statuses"], serde_json::json!(vec![200; n]), "{who}: the SDK's retry should end well: {out}");
    }
    // The proxy's 429s came from the proxy, marked as such, and the SDK retried them.
    let seen = proxy["seen"].as_array().unwrap();
    let ours: Vec<_> = seen.iter().filter(|s| s["status"] == 429).collect();
    assert!(!ours.is_empty(), "the retried burst should meet the proxy's 429 at least once: {proxy}");
    assert!(ours.iter().all(|s| s["proxy_error"] == "proxy_queue_timeout"), "{proxy}");
    // Every 429 the proxied account saw was the proxy's: the simulator throttled none.
    let alias = account_alias(&format!("Klaviyo-API-Key {PROXIED_KEY}"));
    let stats = stack.stats();
    let bucket = stats["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["operation"] == "get_accounts" && b["account"] == alias.as_str())
        .unwrap_or_else(|| panic!("no get_accounts bucket for the proxied key: {stats}"));
    assert_eq!(bucket["throttled"], 0, "{bucket}");
}

/// The proxy's other answers of its own, as the SDKs treat them: 504 (no response head
/// from Klaviyo in time) and 503 (circuit breaker open) are in both SDKs' retry codes,
/// so each call is tried again; both carry the JSON:API body the SDKs parse.
fn upstream_failures(sdk: Sdk) {
    // A simulator slower than the proxy's upstream timeout.
    let (_slow_sim, slow_url) = start(&["simulate", "--listen", "127.0.0.1:0", "--latency-ms", "2000"]);
    // One attempt per client request: the proxy's own retries (which would spend the
    // XS bucket) are tested elsewhere; here the SDK meets the proxy's 504 itself.
    let config = TempFile::new("[upstream]\nrequest_timeout_ms = 200\n[retry]\nmax_attempts = 1\n");
    let (_proxy, proxy_url) = start(&process::serve_args(&slow_url, config.0.to_str()));
    let out = sdk.run("failing", &proxy_url, "pk_sdk_test_timeout_0123456789", None);
    assert_eq!(out["raised"]["status"], 504, "{out}");
    assert_eq!(out["raised"]["error_code"], "proxy_upstream_timeout", "{out}");
    let seen = out["seen"].as_array().unwrap();
    assert_eq!(seen.len(), 3, "the SDK should try a 504 three times: {out}");
    assert!(seen.iter().all(|s| s["status"] == 504 && s["proxy_error"] == "proxy_upstream_timeout"), "{out}");

    // Nothing listens on the upstream's port: the proxy's breaker opens after a few
    // refused connections and answers 503 proxy_circuit_open with the cool-down left as
    // an integer Retry-After, which both SDKs retry as they retry Klaviyo's own 503.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = TempFile::new("[breaker]\ncool_down_ms = 1500\n");
    let (_proxy, proxy_url) = start(&process::serve_args(&format!("http://127.0.0.1:{port}"), config.0.to_str()));
    // Open the breaker first (the proxy's own retries may otherwise end one request on
    // a 502 before it opens), with plain requests on another account and operation.
    let addr = proxy_url.strip_prefix("http://").unwrap().to_string();
    let opened = (0..40).any(|_| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let req = "GET /api/campaigns HTTP/1.1\r\nhost: localhost\r\nauthorization: Klaviyo-API-Key pk_opener\r\n\
                   connection: close\r\n\r\n";
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("proxy_circuit_open")
    });
    assert!(opened, "the breaker should open after refused connections");
    let out = sdk.run("failing", &proxy_url, "pk_sdk_test_unreachable_0123456789", None);
    let seen = out["seen"].as_array().unwrap();
    let open = seen.iter().filter(|s| s["status"] == 503 && s["proxy_error"] == "proxy_circuit_open").count();
    assert!(open >= 3, "the SDK should retry the breaker's 503: {out}");
    // Every answer is the proxy's own with an integer Retry-After. (The breaker's
    // half-open probes spend get_accounts' 15/min too, so the call may end on the
    // proxy's 429 once that bucket is spent: the SDK raises it the same way.)
    for s in seen {
        assert!(s["proxy_error"].as_str().is_some_and(|c| c.starts_with("proxy_")), "{out}");
        let retry_after = s["retry_after"].as_str().and_then(|v| v.parse::<u64>().ok());
        assert!(retry_after.is_some_and(|r| r >= 1), "integer Retry-After: {out}");
    }
    assert!([503, 429].contains(&out["raised"]["status"].as_u64().unwrap_or(0)), "{out}");
}

#[test]
fn python_sdk_retries_the_proxys_504_and_503() {
    upstream_failures(Sdk::Python);
}

#[test]
fn node_sdk_retries_the_proxys_504_and_503() {
    upstream_failures(Sdk::Node);
}

#[test]
fn python_sdk_calls_and_bursts_through_the_proxy() {
    calls_and_burst(Sdk::Python);
}

#[test]
fn node_sdk_calls_and_bursts_through_the_proxy() {
    calls_and_burst(Sdk::Node);
}

#[test]
fn python_sdk_retries_the_proxys_429_like_klaviyos() {
    retries_on_429(Sdk::Python);
}

#[test]
fn node_sdk_retries_the_proxys_429_like_klaviyos() {
    retries_on_429(Sdk::Node);
}
