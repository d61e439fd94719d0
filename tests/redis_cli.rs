//! The real binary with the Redis store, configured from the environment: two
//! `klaviyo-proxy serve` processes share one account's bucket through `redis-server`.

mod redis_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use redis_support::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

fn proxy(redis: &RedisServer, hash_key: Option<&str>) -> Command {
    proxy_to(redis, hash_key, "sim")
}

fn proxy_to(redis: &RedisServer, hash_key: Option<&str>, upstream: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", upstream])
        .env("KLAVIYO_PROXY_LIMITER_STORE", "redis")
        .env("KLAVIYO_PROXY_REDIS_URL", redis.url())
        .env("KLAVIYO_PROXY_LOG_LEVEL", "warn")
        .env_remove("KLAVIYO_PROXY_ACCOUNT_HASH_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(k) = hash_key {
        cmd.env("KLAVIYO_PROXY_ACCOUNT_HASH_KEY", k);
    }
    cmd
}

/// A running proxy process, killed by its PID when dropped.
struct Running(Child, String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(redis: &RedisServer) -> Running {
    spawn(proxy(redis, Some("cli-shared-hash-key")))
}

fn spawn(mut cmd: Command) -> Running {
    let mut child = cmd.stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("klaviyo-proxy listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    Running(child, addr)
}

#[test]
fn redis_needs_a_shared_hash_key() {
    let redis = RedisServer::start();
    let out = proxy(&redis, None).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.account_hash_key"), "{err}");
}

#[test]
fn two_processes_share_one_bucket() {
    let redis = RedisServer::start();
    let (a, b) = (start(&redis), start(&redis));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let get = |addr: &str, max_wait_ms: u64| {
            Request::get(format!("{addr}/api/accounts"))
                .header("authorization", "Klaviyo-API-Key pk_cli_test")
                .header("x-proxy-max-wait-ms", max_wait_ms.to_string())
                .body(Empty::new())
                .unwrap()
        };
        // get_accounts allows one request per second: the first process takes it (after
        // the key's account lookup, itself a get_accounts, has had its second)...
        assert_eq!(client.request(get(&a.1, 3_000)).await.unwrap().status(), StatusCode::OK);
        // ...so the second, asked to wait at most 200 ms, is refused by the proxy.
        let resp = client.request(get(&b.1, 200)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().contains_key("x-klaviyo-proxy-error"));
        // Allowed to wait, it goes once the token comes back.
        let started = tokio::time::Instant::now();
        assert_eq!(client.request(get(&b.1, 5_000)).await.unwrap().status(), StatusCode::OK);
        assert!(started.elapsed() > Duration::from_millis(500));
    });
}

/// Redis down from the very start: the proxy starts and serves from its local store.
#[test]
fn starts_and_serves_without_redis() {
    let mut redis = RedisServer::start();
    redis.stop();
    let p = start(&redis);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let req = Request::get(format!("{}/api/accounts", p.1))
            .header("authorization", "Klaviyo-API-Key pk_cli_test")
            .body(Empty::new())
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), StatusCode::OK);
    });
}

/// Item 8: a process that used a whole steady window is killed (`kill -9`); a fresh
/// one on the same Redis finds the window still full and sends nothing more of it
/// until it has passed. (The local store would start empty and send a second window.)
#[test]
fn a_restarted_process_does_not_send_a_second_steady_window() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = klaviyo_proxy::sim::Simulator::start(listener, Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("kp-redis-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("proxy.toml");
        // get_campaign at 10/s and 20/min: a whole steady window in about a second.
        // Resolution off: a credential's buckets move to its account's once resolved,
        // which is not what this test counts.
        std::fs::write(
            &config,
            "[limits.operations.get_campaign]\nburst_per_second = 10\nsteady_per_minute = 20\n[accounts]\nresolve = false\n",
        )
        .unwrap();
        let process = || {
            let mut cmd = proxy_to(&redis, Some("cli-shared-hash-key"), &sim.url);
            cmd.arg("--config").arg(&config);
            spawn(cmd)
        };
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let send = |addr: String, n: usize, max_wait_ms: u64| {
            let client = client.clone();
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..n {
                    let req = Request::get(format!("{addr}/api/campaigns/c{i}"))
                        .header("authorization", "Klaviyo-API-Key pk_cli_test")
                        .header("x-proxy-max-wait-ms", max_wait_ms.to_string())
                        .body(Empty::new())
                        .unwrap();
                    let client = client.clone();
                    tasks.spawn(async move {
                        let resp = client.request(req).await.unwrap();
                        (resp.status(), resp.headers().contains_key("x-klaviyo-proxy-error"))
                    });
                }
                let mut answers = Vec::new();
                while let Some(a) = tasks.join_next().await {
                    answers.push(a.unwrap());
                }
                answers
            }
        };
        let first = process();
        let answers = send(first.1.clone(), 20, 10_000).await;
        let sent = answers.iter().filter(|a| **a == (StatusCode::OK, false)).count() as u64;
        // A grant slower than the guard (the first on a cold connection may be) is
        // discarded with its token: the proxy refuses what no longer fits.
        assert!(sent >= 18, "{answers:?}");
        assert!(answers.iter().all(|a| *a == (StatusCode::OK, false) || *a == (StatusCode::TOO_MANY_REQUESTS, true)));
        // kill -9: nothing of the first process' state survives but what Redis holds.
        drop(first);
        let second = process();
        let answers = send(second.1.clone(), 10, 3_000).await;
        let second_sent = answers.iter().filter(|a| **a == (StatusCode::OK, false)).count() as u64;
        assert!(answers.iter().all(|a| *a == (StatusCode::OK, false) || *a == (StatusCode::TOO_MANY_REQUESTS, true)));
        // Whatever the first process left unused of the window (a discarded grant) the
        // second may use; nothing more.
        assert!(second_sent <= 20 - sent, "first sent {sent}, second {answers:?}");
        let stats = sim.stats();
        let bucket = stats.buckets.iter().find(|b| b.operation == "get_campaign").unwrap();
        assert_eq!(
            (bucket.requests, bucket.throttled),
            (sent + second_sent, 0),
            "one steady window across both processes"
        );
        drop(second);
        sim.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
