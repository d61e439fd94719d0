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
    assert_eq!(out["account_id"], "sdk_test_calls", "{out}"); // the simulator: pk_<account>_<rest>
    assert_eq!(out["profile_email"], "sdk@example.com", "{out}");
    assert_eq!(out["profiles"], 1, "{out}");
    assert_eq!(out["first_profile_email"], "sim@example.com", "{out}");
    assert!(out["profile_id"].as_str().is_some_and(|id| !id.is_empty()), "{out}");
    // get_accounts twice: the proxy's account lookup for the new key, then the SDK's call.
    assert_eq!(stack.counted("get_accounts", "endpoint"), (2, 0), "get_accounts: lookup and call, unthrottled");
    for op in ["create_event", "get_profiles", "create_or_update_profile"] {
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
    // The breaker off: three timeouts in a row would open it (issue 11), and the 503 it
    // then answers is the second half of this test.
    let config =
        TempFile::new("[upstream]\nrequest_timeout_ms = 200\n[retry]\nmax_attempts = 1\n[breaker]\nenabled = false\n");
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

/// One HTTP/1.1 exchange over a plain socket (a client that is no SDK); returns the
/// status and the body.
fn raw(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += &format!("content-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The official Python and Node SDKs and a raw client through the real proxy: the
/// checklist names each account's client (SDK and version, or the raw agent), judges
/// its revision, profile writes, events, phone numbers and scopes, and
/// `klaviyo-proxy checklist` prints it and exits 1 for the raw client's red items.
#[test]
fn checklist_names_the_sdks_and_a_raw_client() {
    use klaviyo_proxy::config::Config;
    use klaviyo_proxy::route::Router;
    const HASH_KEY: &str = "checklist-sdk-test";
    let (py_key, node_key, raw_key) =
        ("pk_sdk_test_checklist_py_0123456789", "pk_sdk_test_checklist_node_0123456789", "pk_raw_checklist_0123456789");
    let (_sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0", "--seed", "5"]);
    // Accounts named by their credential's hash alias, as this test computes them.
    let config = TempFile::new(&format!("[auth]\naccount_hash_key = \"{HASH_KEY}\"\n[accounts]\nresolve = false\n"));
    let args = process::serve_args(&sim_url, config.0.to_str());
    let (_proxy, urls) = process::start_urls(BIN, &args, &[("KLAVIYO_PROXY_LOG_LEVEL", "warn")], 2);
    let (proxy_url, admin_url) = (&urls[0], &urls[1]);
    // The aliases the proxy shows for each key (a keyed hash, the same HASH_KEY).
    let router = Router::new(&Config::default().limits, HASH_KEY.as_bytes());
    let alias = |key: &str| router.account("auth", format!("Klaviyo-API-Key {key}").as_bytes()).alias();

    Sdk::Python.run("calls", proxy_url, py_key, None);
    Sdk::Node.run("calls", proxy_url, node_key, None);
    let auth = format!("Klaviyo-API-Key {raw_key}");
    let head = [
        ("authorization", auth.as_str()),
        ("user-agent", "shop-backend/3.1"),
        ("revision", "2024-10-15"),
        ("content-type", "application/vnd.api+json"),
    ];
    let profile =
        r#"{"data":{"type":"profile","attributes":{"email":"raw@example.com","phone_number":"(415) 555-2671"}}}"#;
    let (status, body) = raw("POST", &format!("{proxy_url}/api/profiles"), &head, profile);
    assert_eq!(status, 201, "{body}");
    let event = r#"{"data":{"type":"event","attributes":{"properties":{},"metric":{"data":{"type":"metric","attributes":{"name":"Raw"}}},"profile":{"data":{"type":"profile","attributes":{"email":"raw@example.com"}}}}}}"#;
    let (status, body) = raw("POST", &format!("{proxy_url}/api/events"), &head[..2], event);
    assert_eq!(status, 202, "{body}");

    // Body checks run beside the requests: wait (boundedly) until the raw event is counted.
    let report = (0..50)
        .map(|_| {
            let (status, body) = raw("GET", &format!("{admin_url}/admin/checklist"), &[], "");
            assert_eq!(status, 200, "{body}");
            let report: Value = serde_json::from_str(&body).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            report
        })
        .find(|r| r.to_string().contains("without a unique_id"))
        .expect("the raw client's event is counted");
    let account = |key: &str| {
        let name = alias(key);
        report["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == name.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no account {name} in {report:#}"))
    };
    let item = |account: &Value, id: &str| {
        account["items"].as_array().unwrap().iter().find(|i| i["id"] == id).cloned().unwrap()
    };
    for (key, sdk, version) in [(py_key, "klaviyo-api-python", "25.0.0"), (node_key, "klaviyo-api-node", "23.0.0")] {
        let a = account(key);
        let client = item(&a, "sdk");
        assert_eq!(client["light"], "green", "{client}");
        let clients = client["details"]["clients"].as_array().unwrap();
        assert_eq!(clients.len(), 1, "{client}");
        assert_eq!(clients[0]["client"], serde_json::json!({"kind": "sdk", "name": sdk, "version": version}));
        assert_eq!(clients[0]["requests"], a["requests"]);
        assert_eq!(a["requests"], 4, "get_accounts, create_event, get_profiles, create_or_update_profile: {a}");
        assert_eq!(item(&a, "profile_writes")["light"], "green", "{a}");
        let events = item(&a, "events");
        assert_eq!((&events["light"], &events["details"]["events"]), (&"green".into(), &1.into()), "{events}");
        assert_eq!(item(&a, "revision")["light"], "green", "{a}");
        assert_eq!(
            item(&a, "least_privilege")["details"]["scopes"],
            serde_json::json!(["accounts:read", "events:write", "profiles:write"])
        );
        assert_eq!(item(&a, "errors")["light"], "green", "{a}");
    }
    let a = account(raw_key);
    let client = item(&a, "sdk");
    assert_eq!(client["light"], "amber", "{client}");
    assert_eq!(client["details"]["clients"][0]["name"], "shop-backend/3.1", "{client}");
    assert_eq!(client["details"]["sdk_requests"], 0);
    let revision = item(&a, "revision");
    assert_eq!(revision["light"], "red", "{revision}");
    assert!(revision["summary"].as_str().unwrap().contains("2024-10-15 ×1 (retired since 2026-10-15)"), "{revision}");
    assert_eq!(item(&a, "profile_writes")["details"]["create_profile"], 1);
    assert_eq!(item(&a, "profile_writes")["light"], "amber");
    assert_eq!(item(&a, "events")["details"]["without_unique_id"], 1);
    let phones = item(&a, "phone_numbers");
    assert_eq!((&phones["light"], &phones["details"]["not_e164"]), (&"red".into(), &1.into()), "{phones}");
    assert!(!report.to_string().contains("555-2671") && !report.to_string().contains("pk_"));

    // The command: a table naming all three, exit 1 for the red items.
    let out = Command::new(BIN).args(["checklist", "--admin", admin_url]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    for name in ["klaviyo-api-python 25.0.0", "klaviyo-api-node 23.0.0", "shop-backend/3.1", "retired since 2026-10-15"]
    {
        assert!(table.contains(name), "{name} missing from\n{table}");
    }
    println!("{table}");
    let out = Command::new(BIN).args(["checklist", "--admin", admin_url, "--json"]).output().unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["light"], "red");
    // Nothing listening: exit 2.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(BIN).args(["checklist", "--admin", &format!("http://127.0.0.1:{port}")]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));

    // preflight --from-traffic adds the traffic-derived items to its report.
    let out = Command::new(BIN)
        .args(["preflight", "--upstream", &sim_url, "--from-traffic", admin_url, "--json"])
        .env_remove("KLAVIYO_PRIVATE_KEY")
        .output()
        .unwrap();
    let preflight: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = |name: &str| {
        preflight["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {preflight:#}"))
    };
    assert_eq!(check("traffic: revision")["result"], "fail");
    assert_eq!(check("traffic: sdk")["result"], "warn");
    assert!(check("traffic: sdk")["detail"].as_str().unwrap().contains("klaviyo-api-node 23.0.0"));
    assert_eq!(check("traffic: errors")["result"], "pass");
    assert_eq!(out.status.code(), Some(1));
}
