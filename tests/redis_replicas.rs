//! Three proxies sharing one account's limits through a real `redis-server`, in front
//! of one simulator: together they stay under Klaviyo's limits, survive Redis going
//! away, and share pauses.

mod redis_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::config::{Config, RedisUrl, Secret, StoreKind};
use klaviyo_proxy::limiter::{BucketKey, Limiter, StoreState};
use klaviyo_proxy::route::Router;
use klaviyo_proxy::sim::{SimOptions, Simulator};
use klaviyo_proxy::App;
use redis_support::RedisServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

const HASH_KEY: &str = "replicas-share-this-hash-key";
const AUTH: &str = "Klaviyo-API-Key pk_replica_test";
/// `get_campaign`: tier M, 10/s and 150/min.
const PATH: &str = "/api/campaigns/c1";
/// `get_flow`: tier S, 3/s and 60/min: 1/s and 20/min per replica while degraded.
const OTHER_PATH: &str = "/api/flows/f1";

struct Replicas {
    sim: Simulator,
    addrs: Vec<SocketAddr>,
    apps: Vec<App>,
    stop: watch::Sender<bool>,
    client: Client<HttpConnector, Empty<Bytes>>,
    config: Config,
}

fn config(sim: &Simulator, redis: &RedisServer, replicas: Option<u32>, timeout_ms: u64) -> Config {
    let mut c = Config::default();
    c.upstream.url = sim.url.clone().try_into().unwrap();
    // These tests look at the credential's own buckets in Redis (see `bucket`);
    // account resolution across replicas is tested in tests/accounts.rs.
    c.accounts.resolve = false;
    c.auth.account_hash_key = Some(Secret::new(HASH_KEY));
    c.limiter.store = StoreKind::Redis;
    c.limiter.redis_url = Some(RedisUrl::try_from(redis.url()).unwrap());
    c.limiter.key_prefix = "replicas-test".into();
    c.limiter.replicas = replicas.and_then(std::num::NonZeroU32::new);
    c.limiter.timeout_ms = timeout_ms;
    c.log.level = "warn".into();
    // The guard absorbs the time between a decision and the request reaching Klaviyo;
    // tests share two busy cores with debug builds, so they give it more room.
    c.limits.burst_guard_ms = 150;
    c
}

/// `n` proxies on `redis`; `timeout_ms` is their Redis timeout (debug builds on busy
/// shared cores need more than the default 100 ms unless a test wants Redis "slow").
async fn start(redis: &RedisServer, n: usize, replicas: Option<u32>, timeout_ms: u64) -> Replicas {
    let sim = Simulator::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), SimOptions::default()).unwrap();
    let config = config(&sim, redis, replicas, timeout_ms);
    let (stop, stopped) = watch::channel(false);
    let (mut addrs, mut apps) = (vec![], vec![]);
    for _ in 0..n {
        let app = App::build(config.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let mut stopped = stopped.clone();
        tokio::spawn(app.clone().serve(listener, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        apps.push(app);
    }
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
    Replicas { sim, addrs, apps, stop, client, config }
}

impl Replicas {
    /// Sends one GET through replica `i`; returns the status and whether the proxy
    /// (not Klaviyo) answered.
    async fn get(&self, i: usize, path: &str, max_wait: Duration) -> (StatusCode, bool) {
        let req = Request::get(format!("http://{}{path}", self.addrs[i]))
            .header("authorization", AUTH)
            .header("x-proxy-max-wait-ms", max_wait.as_millis().to_string())
            .body(Empty::new())
            .unwrap();
        let resp = self.client.request(req).await.expect("the proxy always answers");
        let own = resp.headers().contains_key("x-klaviyo-proxy-error");

        let status = resp.status();
        let _ = resp.into_body().collect().await;
        (status, own)
    }

    fn shared(&self, i: usize) -> &klaviyo_proxy::limiter::SharedStore {
        match self.apps[i].proxy().limiter() {
            Limiter::Shared(s) => s,
            Limiter::Local(_) => panic!("replica {i} runs the local store"),
        }
    }

    fn states(&self) -> Vec<StoreState> {
        self.apps.iter().map(|a| a.proxy().limiter().state()).collect()
    }

    fn bucket(&self, path: &str) -> BucketKey {
        let router = Router::new(&self.config.limits, HASH_KEY.as_bytes());
        router.route("GET", path, None, false, Some(AUTH.as_bytes())).demands[0].key
    }

    fn sim_bucket(&self, operation: &str) -> (u64, u64, u32, u32) {
        let stats = self.sim.stats();
        let b = stats.buckets.iter().find(|b| b.operation == operation).expect("the simulator saw the operation");
        (b.requests, b.throttled, b.max_sliding["burst"], b.max_sliding["steady"])
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.sim.stop().await;
    }
}

/// Waits (bounded) until every replica has learned from heartbeats that there are `n`.
async fn until_replicas(r: &Replicas, n: u32) {
    let end = Instant::now() + Duration::from_secs(10);
    while (0..r.apps.len()).any(|i| r.shared(i).replicas() != n) {
        assert!(Instant::now() < end, "replica count not learned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until every replica is in `state`.
async fn until_state(r: &Replicas, state: StoreState, within: Duration) {
    let end = Instant::now() + within;
    while r.states().iter().any(|s| *s != state) {
        assert!(Instant::now() < end, "replicas did not reach {state:?}: {:?}", r.states());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 200 requests at once, spread over three replicas, for a 10/s 150/min bucket: 20
/// times its burst limit. The simulator sends no 429; the three together use the
/// whole steady quota at the burst rate; what cannot fit in the client's wait is
/// refused by the proxy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_over_three_replicas_never_draws_a_429() {
    let redis = RedisServer::start();
    let r = start(&redis, 3, None, 1_000).await;
    until_replicas(&r, 3).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let shared = std::sync::Arc::new(r);
    for i in 0..200usize {
        let r = shared.clone();
        tasks.spawn(async move {
            let (status, own) = r.get(i % 3, PATH, Duration::from_secs(30)).await;
            (i % 3, status, own, started.elapsed())
        });
    }
    let mut forwarded = [0u32; 3];
    let mut refused = 0;
    let mut last_forwarded = Duration::ZERO;
    while let Some(res) = tasks.join_next().await {
        let (replica, status, own, at) = res.unwrap();
        match (status, own) {
            (StatusCode::OK, false) => {
                forwarded[replica] += 1;
                last_forwarded = last_forwarded.max(at);
            }
            (StatusCode::TOO_MANY_REQUESTS, true) => refused += 1,
            other => panic!(
                "unexpected answer {other:?}; states {:?}, degradations {:?}",
                shared.states(),
                (0..3).map(|i| shared.shared(i).degradations()).collect::<Vec<_>>()
            ),
        }
    }
    let r = std::sync::Arc::into_inner(shared).unwrap();
    let (requests, throttled, burst, steady) = r.sim_bucket("get_campaign");
    assert_eq!(throttled, 0, "the simulator sent 429s");
    assert!(burst <= 10 && steady <= 150, "sliding maxima {burst}/s {steady}/min");
    let total: u32 = forwarded.iter().sum();
    eprintln!("burst: forwarded {forwarded:?} refused {refused}, last at {last_forwarded:?}, sliding max {burst}/s {steady}/min");
    assert_eq!(u64::from(total), requests);
    // Saturation: at least 95% of the steady quota, at the burst rate (150 at 10/s).
    assert!(total >= 143, "only {total} of 150 used ({forwarded:?})");
    // 15 bursts of 10, 1.15 s apart (window and guard): the last goes at about 16.1 s.
    assert!(last_forwarded < Duration::from_secs(19), "quota used too slowly: {last_forwarded:?}");
    assert!(forwarded.iter().all(|&f| f > 0), "a replica starved: {forwarded:?}");
    assert_eq!(refused, 200 - total);
    assert!(r.states().iter().all(|s| *s == StoreState::Redis));
    assert!((0..3).all(|i| r.shared(i).degradations() == 0));
    r.stop().await;
}

/// Redis is killed mid-run: every request is still answered, each replica keeps to
/// its share (quota ÷ 3, learned from heartbeats), and once Redis is back the replicas
/// hand it what they sent meanwhile and decide with it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_then_restarted() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let r = start(&redis, 3, None, 1_000).await;
    // Heartbeats teach each replica that there are three.
    until_replicas(&r, 3).await;
    for i in 0..3 {
        assert_eq!(r.get(i, PATH, Duration::from_secs(5)).await, (StatusCode::OK, false));
    }
    assert!(r.states().iter().all(|s| *s == StoreState::Redis));

    redis.stop();
    // 12 requests per replica at once, allowed to wait 2.5 s: at its share of 1 per
    // 1.05 s, each replica sends at most 3 (at 0, 1.05 and 2.1 s) and refuses the rest.
    let shared = std::sync::Arc::new(r);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..36usize {
        let r = shared.clone();
        tasks.spawn(async move { (i % 3, r.get(i % 3, OTHER_PATH, Duration::from_millis(2_500)).await) });
    }
    let mut forwarded = [0u32; 3];
    while let Some(res) = tasks.join_next().await {
        match res.unwrap() {
            (i, (StatusCode::OK, false)) => forwarded[i] += 1,
            (_, (StatusCode::TOO_MANY_REQUESTS, true)) => {}
            other => panic!("a request failed while Redis was down: {other:?}"),
        }
    }
    let r = std::sync::Arc::into_inner(shared).unwrap();
    assert!(r.states().iter().all(|s| *s == StoreState::Degraded), "{:?}", r.states());
    // /health says so while the fallback counts.
    let admin = klaviyo_proxy::admin::Admin::new(
        r.apps[0].proxy().clone(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        None,
    );
    let health = admin.health().await;
    assert_eq!(health.status, klaviyo_proxy::admin::Status::Degraded, "{health:?}");
    assert_eq!(health.services.limiter.as_ref().map(|l| l.store), Some("degraded"));
    eprintln!("degraded: forwarded per replica {forwarded:?}");
    assert!(forwarded.iter().all(|&f| (2..=3).contains(&f)), "per replica {forwarded:?}");
    let (_, throttled, burst, _) = r.sim_bucket("get_flow");
    assert_eq!(throttled, 0);
    assert!(burst <= 3, "{burst} in one second");

    // Redis comes back (empty): the replicas return to it within a few heartbeats and
    // record there what they sent locally, so the steady window still counts it.
    let redis = RedisServer::start_on(port);
    until_state(&r, StoreState::Redis, Duration::from_secs(10)).await;
    assert_eq!(admin.health().await.services.limiter.map(|l| l.store), Some("redis"));
    let stem = r.shared(0).redis().bucket_key(&r.bucket(OTHER_PATH));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let steady: u32 = redis::cmd("ZCARD").arg(format!("{stem}:w1")).query_async(&mut conn).await.unwrap();
    assert_eq!(steady, forwarded.iter().sum::<u32>(), "local takes handed to Redis");
    assert_eq!(r.get(1, OTHER_PATH, Duration::from_secs(5)).await.0, StatusCode::OK);
    let steady: u32 = redis::cmd("ZCARD").arg(format!("{stem}:w1")).query_async(&mut conn).await.unwrap();
    assert_eq!(steady, forwarded.iter().sum::<u32>() + 1, "Redis decides again");
    r.stop().await;
}

/// A pause one replica learns (an upstream `Retry-After`) holds the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_seen_by_one_replica_pauses_the_others() {
    let redis = RedisServer::start();
    let r = start(&redis, 3, Some(3), 1_000).await;
    let key = r.bucket(PATH);
    r.apps[0].proxy().limiter().pause(&[key], Instant::now() + Duration::from_secs(2)).await.unwrap();
    let started = Instant::now();
    let (b, c) = tokio::join!(r.get(1, PATH, Duration::from_secs(10)), r.get(2, PATH, Duration::from_secs(10)));
    assert_eq!((b, c), ((StatusCode::OK, false), (StatusCode::OK, false)));
    assert!(started.elapsed() >= Duration::from_millis(1_900), "went after {:?}", started.elapsed());
    // A client that cannot wait that long is refused at once, with the pause as its wait.
    r.apps[0].proxy().limiter().pause(&[key], Instant::now() + Duration::from_secs(5)).await.unwrap();
    let refused_at = Instant::now();
    assert_eq!(r.get(2, PATH, Duration::from_secs(1)).await, (StatusCode::TOO_MANY_REQUESTS, true));
    assert!(refused_at.elapsed() < Duration::from_millis(500));
    r.stop().await;
}

/// Redis stalls (`CLIENT PAUSE`): a call slower than `limiter.timeout_ms` counts as
/// Redis down, the request goes on at once from the local store, and the replica
/// returns to Redis when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_counts_as_down() {
    let redis = RedisServer::start();
    let r = start(&redis, 1, Some(1), 100).await;
    assert_eq!(r.get(0, PATH, Duration::from_secs(5)).await, (StatusCode::OK, false));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1_500).arg("ALL").query_async(&mut conn).await.unwrap();
    let started = Instant::now();
    assert_eq!(r.get(0, PATH, Duration::from_secs(5)).await, (StatusCode::OK, false));
    assert!(started.elapsed() < Duration::from_millis(600), "waited {:?} for a stalled Redis", started.elapsed());
    assert_eq!(r.states(), [StoreState::Degraded]);
    assert_eq!(r.shared(0).degradations(), 1);
    until_state(&r, StoreState::Redis, Duration::from_secs(10)).await;
    assert_eq!(r.get(0, PATH, Duration::from_secs(5)).await, (StatusCode::OK, false));
    assert_eq!(r.shared(0).degradations(), 1, "one warning per transition");
    r.stop().await;
}

/// Item 3 end to end: 15 `GET /api/profiles/{id}?include=lists` at once queue on the
/// condition's 1/s; a plain `GET /api/profiles/{id}` 0.1 s later goes at once, since the
/// endpoint's own bucket (75/s) has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_profile_read_does_not_wait_behind_include_lists() {
    let redis = RedisServer::start();
    let r = std::sync::Arc::new(start(&redis, 1, Some(1), 1_000).await);
    let mut conditional = tokio::task::JoinSet::new();
    for i in 0..15 {
        let r = r.clone();
        conditional.spawn(async move {
            r.get(0, &format!("/api/profiles/p{i}?include=lists"), Duration::from_secs(30)).await
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    assert_eq!(r.get(0, "/api/profiles/p1", Duration::from_secs(3)).await, (StatusCode::OK, false));
    assert!(started.elapsed() < Duration::from_secs(1), "the plain read waited {:?}", started.elapsed());
    conditional.abort_all();
    while conditional.join_next().await.is_some() {}
    let (_, throttled, _, _) = r.sim_bucket("get_profile");
    assert_eq!(throttled, 0);
    std::sync::Arc::into_inner(r).unwrap().stop().await;
}
