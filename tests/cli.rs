//! The real binary: simulator and proxy as separate processes, and the config commands.

use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

#[path = "support/process.rs"]
mod process;

fn start(args: &[&str], envs: &[(&str, &str)]) -> (process::Running, String) {
    process::start(BIN, args, envs)
}

fn curl_like(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    // A blocking one-shot HTTP/1.1 GET over std, so this test needs no runtime.
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out)
}

#[test]
fn real_binaries_proxy_to_the_simulator() {
    let (_sim, sim_url) = start(&["simulate", "--listen", "127.0.0.1:0", "--seed", "1"], &[]);
    let key = "pk_cli_test_key_0123456789";
    let (_proxy, proxy_url) = start(
        &process::serve_args(&sim_url, None),
        &[("KLAVIYO_PROXY_AUTH_MODE", "inject"), ("KLAVIYO_PRIVATE_KEY", key)],
    );
    // No key and no revision from the client: the proxy injects both.
    let (status, body) = curl_like(&format!("{proxy_url}/api/accounts"), &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"account\""));
    let (status, stats) = curl_like(&format!("{sim_url}/__sim/stats"), &[]);
    assert_eq!(status, 200);
    assert!(stats.contains("get_accounts") && !stats.contains(key));
}

#[test]
fn load_test_mode_runs_the_simulator_in_process() {
    let (_proxy, proxy_url) = start(&process::serve_args("sim", None), &[]);
    let (status, body) = curl_like(&format!("{proxy_url}/api/accounts"), &[("authorization", "Klaviyo-API-Key pk_x")]);
    assert_eq!(status, 200, "{body}");
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_config_names_key_and_line() {
    let dir = std::env::temp_dir().join(format!("kp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("unknown.toml", "[queue]\nmax_depth = 5\nmax_wiat_ms = 10\n", "line 3", "queue"),
        (
            "zero.toml",
            "[limits.unknown]\nburst_per_second = 0\nsteady_per_minute = 1\n",
            "line 2",
            "limits.unknown.burst_per_second",
        ),
        (
            "negative.toml",
            "[limits.operations.get_profiles]\nburst_per_second = -1\nsteady_per_minute = 1\n",
            "line 2",
            "burst_per_second",
        ),
        ("url.toml", "[upstream]\nurl = \"not a url\"\n", "line 2", "upstream.url"),
        ("addr.toml", "\n\n[server]\nlisten = \"127.0.0.1\"\n", "line 4", "server.listen"),
        ("remote.toml", "[server]\nlisten = \"0.0.0.0:8080\"\n", "server.client_token", "server.listen"),
    ];
    for (name, text, line, key) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let (ok, _, err) = run(&["check-config", path.to_str().unwrap()]);
        assert!(!ok, "{name} accepted");
        assert!(err.contains(line) && err.contains(key), "{name}: {err}");
    }
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[auth]\naccount_hash_key = \"hash-secret-xyz\"\n[server]\nclient_token = \"tok-secret-xyz-0123456789\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("[redacted]") && !out.contains("secret-xyz"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn routes_lists_the_catalog() {
    let (ok, out, _) = run(&["routes"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1 + 493);
    let line = out.lines().find(|l| l.starts_with("get_profile ")).unwrap();
    assert!(line.contains("include=list:1/s,15/m"), "{line}");
}

#[test]
fn refuses_a_remote_bind_without_a_token() {
    let (ok, _, err) = run(&["serve", "--listen", "0.0.0.0:0"]);
    assert!(!ok);
    assert!(err.contains("client_token"), "{err}");
}
