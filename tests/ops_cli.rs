//! Operations through the real binary: JSON logs with request ids, no secret in any
//! output, and reload on SIGHUP.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

mod support;

use support::process::Served;

/// The binary serving with `config` in front of the simulator.
fn serve(config: &Path, envs: &[(&str, &str)]) -> Served {
    Served::start(BIN, &support::process::serve_args("sim", config.to_str()), envs)
}

/// One HTTP/1.1 request over std; returns the status and the raw response.
fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out)
}

fn header<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    let head = raw.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("klaviyo-proxy-ops-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const KEY: &str = "pk_SECRETinjectedkey0123456789abcdef";
const CLIENT_KEY: &str = "pk_SECRETclientkey9876543210fedcba";
const COMPANY: &str = "SECRETco42";
const TOKEN: &str = "tok_SECRETclienttoken_987";
const HASH_KEY: &str = "hash_SECRET_key_555";

#[test]
fn json_logs_request_ids_and_no_secret_anywhere() {
    let dir = tempdir("secrets");
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nmode = \"inject\"\naccount_hash_key = \"{HASH_KEY}\"\n[server]\nclient_token = \"{TOKEN}\"\n\
             [log]\nlevel = \"debug\"\nformat = \"json\"\n[accounts]\nresolve = false\n"
        ),
    )
    .unwrap();
    let served = serve(&config, &[("KLAVIYO_PRIVATE_KEY", KEY)]);
    let bearer = format!("Bearer {TOKEN}");
    let proxy_auth = ("proxy-authorization", bearer.as_str());
    let client_auth = format!("Klaviyo-API-Key {CLIENT_KEY}");
    let mut outputs: Vec<String> = Vec::new();

    // The client's request id comes back; the injected key does the rest.
    let (status, raw) =
        http("GET", &format!("{}/api/accounts", served.proxy), &[proxy_auth, ("x-request-id", "req-abc-123")], "");
    assert_eq!(status, 200, "{raw}");
    assert_eq!(header(&raw, "x-request-id"), Some("req-abc-123"));
    outputs.push(raw);
    // A client's own key; an id is generated.
    let (status, raw) =
        http("GET", &format!("{}/api/profiles", served.proxy), &[proxy_auth, ("authorization", &client_auth)], "");
    assert_eq!(status, 200, "{raw}");
    let generated = header(&raw, "x-request-id").unwrap().to_string();
    assert!(generated.len() == 32 && generated.chars().all(|c| c.is_ascii_hexdigit()), "{generated}");
    outputs.push(raw);
    // A client-side operation keyed by company_id.
    let body = r#"{"data":{"type":"subscription","attributes":{"profile":{"data":{"type":"profile","attributes":{"email":"a@example.com"}}}}}}"#;
    let (status, raw) = http(
        "POST",
        &format!("{}/client/subscriptions?company_id={COMPANY}", served.proxy),
        &[proxy_auth, ("content-type", "application/json")],
        body,
    );
    assert_eq!(status, 202, "{raw}");
    outputs.push(raw);
    // Errors the proxy makes itself: no token, wrong token, unknown path, no time to wait.
    for (path, headers, want) in [
        ("/api/accounts", vec![("authorization", client_auth.as_str())], 407),
        ("/api/accounts", vec![("proxy-authorization", "Bearer pk_SECRETclientkey9876543210fedcba")], 407),
        ("/nothing/here", vec![proxy_auth], 404),
        ("/api/accounts", vec![proxy_auth, ("x-proxy-max-wait-ms", "0")], 429),
    ] {
        let (status, raw) = http("GET", &format!("{}{path}", served.proxy), &headers, "");
        assert_eq!(status, want, "{raw}");
        assert!(header(&raw, "x-request-id").is_some());
        outputs.push(raw);
    }
    for path in ["/metrics", "/health", "/ready", "/live"] {
        let (status, raw) = http("GET", &format!("{}{path}", served.admin), &[], "");
        assert!(status == 200 || status == 503, "{path}: {raw}");
        outputs.push(raw);
    }
    let check = Command::new(BIN).args(["check-config"]).arg(&config).env("KLAVIYO_PRIVATE_KEY", KEY).output().unwrap();
    assert!(check.status.success());
    outputs.push(String::from_utf8_lossy(&check.stdout).into_owned());
    outputs.push(String::from_utf8_lossy(&check.stderr).into_owned());

    let logs = served.stop();
    assert!(!logs.is_empty());
    // Every line is JSON, and each request has its one info line with its id.
    let parsed: Vec<serde_json::Value> =
        logs.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let request_line = |id: &str| {
        parsed
            .iter()
            .find(|v| v["fields"]["message"] == "request" && v["fields"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no request line for {id}: {logs:?}"))
            .clone()
    };
    let line = request_line("req-abc-123");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["fields"]["operation"], "get_accounts");
    assert_eq!(line["fields"]["status"], 200);
    assert_eq!(line["fields"]["outcome"], "forwarded");
    assert!(line["fields"]["queue_wait_ms"].is_u64() && line["fields"]["upstream_ms"].is_u64());
    assert_eq!((line["fields"]["tier"].as_str(), line["fields"]["attempts"].as_u64()), (Some("XS"), Some(1)));
    assert_eq!(request_line(&generated)["fields"]["operation"], "get_profiles");
    outputs.extend(logs);

    for (i, text) in outputs.iter().enumerate() {
        for secret in [KEY, CLIENT_KEY, COMPANY, TOKEN, HASH_KEY, "SECRET"] {
            assert!(!text.contains(secret), "output #{i} contains {secret}:\n{text}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_reloads_and_a_bad_file_is_kept_out() {
    let dir = tempdir("sighup");
    let config = dir.join("proxy.toml");
    let text = |level: &str, wait: u64| {
        format!(
            "[log]\nlevel = \"{level}\"\nformat = \"json\"\n[queue]\nmax_wait_ms = {wait}\n[auth]\nmode = \"inject\"\n"
        )
    };
    std::fs::write(&config, text("info", 30000)).unwrap();
    let served = serve(&config, &[("KLAVIYO_PRIVATE_KEY", KEY)]);
    let get = |id: &str| {
        let (status, raw) = http("GET", &format!("{}/api/profiles", served.proxy), &[("x-request-id", id)], "");
        assert_eq!(status, 200, "{raw}");
    };
    get("before-reload");
    served.wait_for_log("before-reload");

    // Quieter logs by SIGHUP: the request line (info) is no longer written.
    std::fs::write(&config, text("warn", 20000)).unwrap();
    served.signal("-HUP");
    served.wait_for_log("config reloaded");
    get("after-reload");

    // A broken file is refused, logged, and the running config stays.
    std::fs::write(&config, "[queue]\nmax_wait_ms = \"soon\"\n").unwrap();
    served.signal("-HUP");
    let line = served.wait_for_log("config reload rejected");
    assert!(line.contains("queue.max_wait_ms"), "{line}");
    get("after-bad-reload");
    let (_, metrics) = http("GET", &format!("{}/metrics", served.admin), &[], "");
    assert!(metrics.contains("klaviyo_proxy_config_reloads_total{result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("klaviyo_proxy_config_reloads_total{result=\"rejected\"} 1"), "{metrics}");
    let logs = served.stop();
    assert!(!logs.iter().any(|l| l.contains("after-reload") || l.contains("after-bad-reload")), "{logs:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The simulator as its own process, stopped by its PID when dropped.
struct Sim(Child, String);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn simulate() -> Sim {
    let mut child = Command::new(BIN)
        .args(["simulate", "--listen", "127.0.0.1:0", "--seed", "5"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    Sim(child, url)
}

#[test]
fn preflight_command_exit_code_table_and_json() {
    let sim = simulate();
    let status_url = format!("{}{}", sim.1, klaviyo_proxy::sim::STATUS_PATH);
    let run = |extra: &[&str], key: &str| {
        let out = Command::new(BIN)
            .args(["preflight", "--upstream", &sim.1, "--status-url", &status_url])
            .args(extra)
            .env("KLAVIYO_PRIVATE_KEY", key)
            .env_remove("KLAVIYO_PROXY_UPSTREAM")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, table) = run(&[], KEY);
    assert_eq!(code, Some(0), "{table}");
    assert!(table.starts_with("CHECK") && table.contains("api auth") && table.contains("preflight passed"), "{table}");
    assert!(!table.contains(KEY));

    // A source tree with a hardcoded key: exit 1, and JSON names the file, not the key.
    let dir = tempdir("scan");
    std::fs::write(dir.join("settings.py"), format!("KLAVIYO = '{CLIENT_KEY}'\n")).unwrap();
    let (code, json) = run(&["--scan", dir.to_str().unwrap(), "--json"], KEY);
    assert_eq!(code, Some(1), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["passed"], false);
    let scan = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "key scan").unwrap();
    assert_eq!(scan["result"], "fail");
    assert!(scan["detail"].as_str().unwrap().contains("settings.py:1"));
    assert!(!json.contains(CLIENT_KEY) && !json.contains(KEY));
    let _ = std::fs::remove_dir_all(&dir);
}
