//! Buckets belong to Klaviyo accounts: the real binary in front of the simulator, which
//! counts per account (a key `pk_<account>_<rest>` belongs to `<account>`, an OAuth
//! token `<app>_<account>_<rest>` to `<account>` through `<app>`).

mod redis_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use klaviyo_proxy::sim::{SimOptions, Simulator, Stats};
use support::process::Served;
use support::{client, send, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");

/// `get_flow`: tier S, 3/s and 60/min.
const FLOW: &str = "/api/flows/f1";
const BURST: usize = 3;

/// The binary in front of `upstream` with `config`.
fn serve(upstream: &str, config: &Path, envs: &[(&str, &str)]) -> Served {
    Served::start(BIN, &support::process::serve_args(upstream, config.to_str()), envs)
}

async fn metrics(served: &Served) -> String {
    let r = send(&client(), http::Method::GET, &format!("{}/metrics", served.admin), &[], "").await;
    String::from_utf8(r.body.to_vec()).unwrap()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("klaviyo-proxy-accounts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config file in `dir`: JSON logs, long queue waits, plus `extra` TOML.
fn config_file(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    let text = format!(
        "[log]\nformat = \"json\"\nlevel = \"info\"\n[queue]\nmax_wait_ms = 60000\n\
         [limits]\n# Debug builds on busy shared cores: room between decision and arrival.\nburst_guard_ms = 150\n{extra}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn sim(options: SimOptions) -> Simulator {
    support::sim(options).await
}

/// `n` concurrent GETs of `path` with `authorization`.
async fn burst(proxy: &str, path: &str, authorization: &str, n: usize) -> Vec<Reply> {
    let client = client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url, auth) = (client.clone(), format!("{proxy}{path}"), authorization.to_string());
            tokio::spawn(async move { send(&client, http::Method::GET, &url, &[("authorization", &auth)], "").await })
        })
        .collect();
    let mut replies = vec![];
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    replies
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    let mut s: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// The simulator's counters of one account's bucket for `operation`.
fn sim_bucket<'a>(stats: &'a Stats, account: &str, operation: &str) -> &'a klaviyo_proxy::sim::BucketStats {
    stats
        .buckets
        .iter()
        .find(|b| b.account == account && b.operation == operation && b.bucket == "endpoint")
        .unwrap_or_else(|| panic!("no {account}/{operation} bucket in {stats:#?}"))
}

fn lookups(stats: &Stats, account: &str) -> u64 {
    stats.buckets.iter().filter(|b| b.account == account && b.operation == "get_accounts").map(|b| b.requests).sum()
}

/// A metric line's value, by its exact name and labels.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Two keys of one account, each bursting 5x the burst limit at once: they share the
/// account's buckets, so Klaviyo sees the account's limit and answers no 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_of_one_account_share_its_quota() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("two-keys");
    let served = serve(&sim.url, &config_file(&dir, ""), &[]);
    let (one, two) = ("Klaviyo-API-Key pk_Acme01_one", "klaviyo-api-key  pk_Acme01_two");
    let (a, b) = tokio::join!(burst(&served.proxy, FLOW, one, 5 * BURST), burst(&served.proxy, FLOW, two, 5 * BURST));
    assert_eq!((statuses(&a), statuses(&b)), (vec![200], vec![200]));
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0, "{stats:#?}");
    let flow = sim_bucket(&stats, "Acme01", "get_flow");
    assert_eq!(flow.requests, 10 * BURST as u64);
    assert!(flow.max_sliding["burst"] <= 3 && flow.max_sliding["steady"] <= 60, "{flow:?}");
    // One lookup per credential, both counted against the account's own get_accounts.
    assert_eq!(lookups(&stats, "Acme01"), 2, "{stats:#?}");
    // Metrics name the account by its Klaviyo id, never a key.
    let m = metrics(&served).await;
    assert!(m.contains("account=\"Acme01\""), "{m}");
    assert!(!m.contains("pk_Acme01"));
    let logs = served.logs();
    assert!(logs.iter().all(|l| !l.contains("pk_Acme01")));
    // So do the request logs.
    let named = logs.iter().filter(|l| l.contains("\"request\"") && l.contains("\"account\":\"Acme01\"")).count();
    assert_eq!(named, 10 * BURST, "{logs:#?}");
}

/// Two accounts bursting at once each get their own quota: together they finish in
/// about the time of one (a generous bound: serialised they would take twice as long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_proceed_in_parallel() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("two-accounts");
    let served = serve(&sim.url, &config_file(&dir, ""), &[]);
    let (acme, beta) = ("Klaviyo-API-Key pk_Acme01_one", "Klaviyo-API-Key pk_Beta02_one");
    // Resolve both first, so the timing below is the bursts' alone.
    burst(&served.proxy, FLOW, acme, 1).await;
    burst(&served.proxy, FLOW, beta, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    let n = 6 * BURST;
    let (a, b) = tokio::join!(burst(&served.proxy, FLOW, acme, n), burst(&served.proxy, FLOW, beta, n));
    let took = started.elapsed();
    assert_eq!((statuses(&a), statuses(&b)), (vec![200], vec![200]));
    // One account alone needs about 5 s for 18 requests at 3/s; two in series about 11 s.
    assert!(took < Duration::from_millis(9_000), "{took:?}");
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0, "{stats:#?}");
    for account in ["Acme01", "Beta02"] {
        let flow = sim_bucket(&stats, account, "get_flow");
        assert_eq!(flow.requests, n as u64 + 1);
        assert!(flow.max_sliding["burst"] <= 3, "{flow:?}");
    }
}

/// An OAuth access token refreshed in the middle of a burst keeps the bucket of
/// (account, app): Klaviyo sees the app's limit and answers no 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_refreshed_mid_burst_keeps_the_bucket() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("oauth");
    let served = serve(&sim.url, &config_file(&dir, "[auth]\noauth_app = \"oat\"\n"), &[]);
    let old = "Bearer oat_Acme01_token1";
    let new = "Bearer oat_Acme01_token2";
    let proxy = served.proxy.clone();
    let first = tokio::spawn(async move { burst(&proxy, FLOW, old, 4 * BURST).await });
    // The refresh lands while the first token's requests are still queued.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = burst(&served.proxy, FLOW, new, 4 * BURST).await;
    let first = first.await.unwrap();
    assert_eq!((statuses(&first), statuses(&second)), (vec![200], vec![200]));
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0, "{stats:#?}");
    let flow = sim_bucket(&stats, "Acme01@oat", "get_flow");
    assert_eq!(flow.requests, 8 * BURST as u64);
    assert!(flow.max_sliding["burst"] <= 3, "{flow:?}");
    assert_eq!(lookups(&stats, "Acme01@oat"), 2, "one lookup per token");
    let m = metrics(&served).await;
    assert!(m.contains("account=\"Acme01:oat\""), "{m}");
}

/// A key without `accounts:read`: its requests still go (on its own bucket, as
/// before), the proxy logs why once and counts it, and tries again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_without_accounts_read_falls_back_and_is_reported() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("no-scope");
    let served = serve(&sim.url, &config_file(&dir, "[accounts]\nretry_ms = 2000\n"), &[]);
    let key = "Klaviyo-API-Key pk_Acme01_no-accounts-read";
    for _ in 0..3 {
        assert_eq!(statuses(&burst(&served.proxy, FLOW, key, 2).await), vec![200]);
    }
    let stats = sim.stats();
    assert_eq!(lookups(&stats, "Acme01"), 1, "not retried before retry_ms");
    let m = metrics(&served).await;
    assert_eq!(metric(&m, "klaviyo_proxy_account_lookups_total{result=\"forbidden\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "klaviyo_proxy_accounts_unresolved"), Some(1.0), "{m}");
    // Later, the lookup is tried again (and still cannot tell): logged only once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(statuses(&burst(&served.proxy, FLOW, key, 1).await), vec![200]);
    assert_eq!(lookups(&sim.stats(), "Acme01"), 2);
    let m = metrics(&served).await;
    assert_eq!(metric(&m, "klaviyo_proxy_account_lookups_total{result=\"forbidden\"}"), Some(2.0), "{m}");
    let logs = served.logs();
    let warned: Vec<&String> = logs.iter().filter(|l| l.contains("cannot tell the account")).collect();
    assert_eq!(warned.len(), 1, "{logs:#?}");
    assert!(warned[0].contains("\"reason\":\"forbidden\"") && !warned[0].contains("pk_Acme01"), "{}", warned[0]);
}

/// Many first requests of one credential at once: one lookup, all wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_cause_one_lookup() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("single-flight");
    let served = serve(&sim.url, &config_file(&dir, ""), &[]);
    let replies = burst(&served.proxy, "/api/campaigns/c1", "Klaviyo-API-Key pk_Acme01_one", 20).await;
    assert_eq!(statuses(&replies), vec![200]);
    let stats = sim.stats();
    assert_eq!(lookups(&stats, "Acme01"), 1, "{stats:#?}");
    assert_eq!(stats.throttled, 0);
    let m = metrics(&served).await;
    assert_eq!(metric(&m, "klaviyo_proxy_account_lookups_total{result=\"resolved\"}"), Some(1.0), "{m}");
}

/// The cache is kept beside the limiter state: after a restart (even a kill) the
/// proxy knows the account without asking again, and the file holds no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_look_up_again() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("restart");
    let state = dir.join("limiter.state");
    // Limiter state names accounts by the keyed hash, so it needs a fixed hash key.
    let config = config_file(
        &dir,
        &format!(
            "[auth]\naccount_hash_key = \"restart-test\"\n[limiter]\nstate_path = {:?}\n",
            state.to_str().unwrap()
        ),
    );
    let key = "Klaviyo-API-Key pk_Acme01_persisted";
    {
        let served = serve(&sim.url, &config, &[]);
        assert_eq!(statuses(&burst(&served.proxy, FLOW, key, 2).await), vec![200]);
    } // killed by its PID
    assert_eq!(lookups(&sim.stats(), "Acme01"), 1);
    let kept = std::fs::read_to_string(dir.join("limiter.state.accounts")).unwrap();
    assert!(kept.contains("Acme01") && !kept.contains("pk_Acme01"), "{kept}");
    let served = serve(&sim.url, &config, &[]);
    // Another endpoint: after the kill, the limiter counts the buckets used since its
    // last snapshot as full until their windows pass (create_flow's is a day).
    assert_eq!(statuses(&burst(&served.proxy, "/api/campaigns/c1", key, 2).await), vec![200]);
    assert_eq!(lookups(&sim.stats(), "Acme01"), 1, "the restarted proxy looked up again");
    let m = metrics(&served).await;
    assert!(m.contains("account=\"Acme01\""), "{m}");
}

/// Three replicas sharing limits through Redis share resolutions too: a credential
/// another replica resolved is not looked up again, and first requests arriving at
/// all three at once cost one lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_resolution() {
    let redis = redis_support::RedisServer::start();
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("replicas");
    let extra = format!(
        "[auth]\naccount_hash_key = \"replicas-share-it\"\n\
         [limiter]\nstore = \"redis\"\nredis_url = \"{}\"\ntimeout_ms = 1000\n",
        redis.url()
    );
    let config = config_file(&dir, &extra);
    let replicas: Vec<Served> = (0..3).map(|_| serve(&sim.url, &config, &[])).collect();
    let one = "Klaviyo-API-Key pk_Acme01_one";
    assert_eq!(statuses(&burst(&replicas[0].proxy, FLOW, one, 1).await), vec![200]);
    for r in &replicas[1..] {
        assert_eq!(statuses(&burst(&r.proxy, FLOW, one, 1).await), vec![200]);
    }
    assert_eq!(lookups(&sim.stats(), "Acme01"), 1, "{:#?}", sim.stats());
    let two = "Klaviyo-API-Key pk_Beta02_two";
    let (a, b, c) = tokio::join!(
        burst(&replicas[0].proxy, FLOW, two, 2),
        burst(&replicas[1].proxy, FLOW, two, 2),
        burst(&replicas[2].proxy, FLOW, two, 2)
    );
    assert_eq!((statuses(&a), statuses(&b), statuses(&c)), (vec![200], vec![200], vec![200]));
    let stats = sim.stats();
    assert_eq!(lookups(&stats, "Beta02"), 1, "{stats:#?}");
    assert_eq!(stats.throttled, 0, "{stats:#?}");
    let mut shared = 0.0;
    for r in &replicas {
        shared += metric(&metrics(r).await, "klaviyo_proxy_account_lookups_total{result=\"shared\"}").unwrap_or(0.0);
    }
    assert_eq!(shared, 4.0);
}

/// Inject mode learns its key's account once at start; `/health` shows the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_mode_resolves_once_at_start() {
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("inject");
    let config = config_file(&dir, "[auth]\nmode = \"inject\"\n[admin]\nhealth_max_wait_ms = 5000\n");
    let served = serve(&sim.url, &config, &[("KLAVIYO_PRIVATE_KEY", "pk_Inj001_key")]);
    let until = Instant::now() + Duration::from_secs(10);
    while lookups(&sim.stats(), "Inj001") == 0 {
        assert!(Instant::now() < until, "no lookup at start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = send(&client(), http::Method::GET, &format!("{}/health", served.admin), &[], "").await;
    assert_eq!(health.json()["services"]["klaviyo"]["accountId"], "Inj001", "{:?}", health.json());
    // The health probe went through the account's bucket after the lookup: no 429.
    assert_eq!(health.status, StatusCode::OK, "{:?}", health.json());
    let r = send(&client(), http::Method::GET, &format!("{}{FLOW}", served.proxy), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0, "{stats:#?}");
    // One lookup, plus the health probe's own GET /api/accounts.
    assert_eq!(lookups(&stats, "Inj001"), 2);
}

/// Operators declare accounts by fingerprint (`klaviyo-proxy fingerprint` reads the
/// key on stdin), with no key in the file: no lookup, the declared name in metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_accounts_need_no_lookup() {
    use std::io::Write;
    let key = "pk_Acme01_declared";
    let mut child = Command::new(BIN)
        .arg("fingerprint")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{key}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fingerprint = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(fingerprint.starts_with("fp1_") && !fingerprint.contains(key), "{fingerprint}");
    let sim = sim(SimOptions::default()).await;
    let dir = tempdir("declared");
    let config = config_file(&dir, &format!("[accounts.declared]\n{fingerprint} = \"shop-eu\"\n"));
    assert!(!std::fs::read_to_string(&config).unwrap().contains(key));
    let served = serve(&sim.url, &config, &[]);
    let auth = format!("Klaviyo-API-Key {key}");
    assert_eq!(statuses(&burst(&served.proxy, FLOW, &auth, 2).await), vec![200]);
    assert_eq!(lookups(&sim.stats(), "Acme01"), 0);
    let m = metrics(&served).await;
    assert!(m.contains("account=\"shop-eu\""), "{m}");
}
