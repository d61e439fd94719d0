//! The shared store's queue against a real `redis-server`, through `queue::wait` as the
//! proxy calls it: lines per set of buckets, the head after a 429, late grants, the
//! way back from the fallback.

mod redis_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use klaviyo_proxy::limiter::redis::RedisStore;
use klaviyo_proxy::limiter::{
    Account, BucketId, BucketKey, Demand, Limiter, SharedStore, StoreState, WindowSpec, Windows,
};
use klaviyo_proxy::queue;
use redis_support::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn demand(bucket: BucketId, specs: &[WindowSpec]) -> Demand {
    Demand { key: BucketKey { account: Account(42), bucket }, windows: Windows::new(specs) }
}

fn spec(limit: u32, period_ms: u64) -> WindowSpec {
    WindowSpec { limit, period: period_ms * 1000 }
}

fn limiter(url: &str, prefix: &str, timeout: Duration, guard: Duration) -> Arc<Limiter> {
    let redis = RedisStore::new(url, prefix, timeout).unwrap();
    Arc::new(Limiter::Shared(Box::new(SharedStore::new(redis, Some(1), guard))))
}

fn shared(l: &Limiter) -> &SharedStore {
    match l {
        Limiter::Shared(s) => s,
        Limiter::Local(_) => unreachable!(),
    }
}

const GUARD: Duration = Duration::from_millis(50);

/// Item 3: 15 `include=lists` requests (endpoint bucket with room, condition bucket 1
/// per 1.05 s) queue; a plain request for the endpoint alone arriving 0.1 s later
/// does not wait behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_does_not_wait_behind_conditional_ones() {
    let server = RedisServer::start();
    let l = limiter(&server.url(), "hol", Duration::from_secs(2), GUARD);
    let own = demand(BucketId::Endpoint(5), &[spec(60, 1_050)]);
    let cond = demand(BucketId::Condition(5, 0), &[spec(1, 1_050)]);
    let mut conditional = tokio::task::JoinSet::new();
    for _ in 0..15 {
        let l = l.clone();
        conditional.spawn(async move {
            queue::wait(&l, &[own, cond], Instant::now() + Duration::from_secs(30), 1_000, "get_profile").await
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let plain = queue::wait(&l, &[own], Instant::now() + Duration::from_secs(3), 1_000, "get_profile").await;
    assert!(plain.is_ok(), "the plain request waited behind the conditional ones: {plain:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "plain request waited {:?}", started.elapsed());
    // Two conditional requests at most have gone (at 0 and 1.05 s); the rest still wait.
    let done = std::iter::from_fn(|| conditional.try_join_next()).count();
    assert!(done <= 2, "{done} conditional requests went");
}

/// Item 7: A leaves and meets a 429; B and C queued behind it. After the pause A goes
/// first, then B and C in their order, and nothing leaves before the pause ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_that_met_a_429_goes_again_first() {
    let server = RedisServer::start();
    let l = limiter(&server.url(), "head", Duration::from_secs(2), GUARD);
    let d = demand(BucketId::Endpoint(2), &[spec(1, 500)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    queue::wait(&l, &[d], deadline, 100, "op").await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for name in ["B", "C"] {
        let (l, order) = (l.clone(), order.clone());
        tasks.spawn(async move {
            queue::wait(&l, &[d], deadline, 100, "op").await.unwrap();
            order.lock().unwrap().push((name, Instant::now()));
        });
        // B joins the line before C.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A's 429 comes back 0.2 s after it left: paused for 1 s.
    let now = Instant::now();
    let until = now + Duration::from_secs(1);
    let place = queue::pause_shared(shared(&l), &[d], until, now, deadline).await.unwrap();
    queue::wait_requeued(&l, place, &[d], deadline, "op").await.unwrap();
    order.lock().unwrap().push(("A", Instant::now()));
    while tasks.join_next().await.is_some() {}
    let order = order.lock().unwrap().clone();
    let names: Vec<&str> = order.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["A", "B", "C"], "{order:?}");
    // Redis' clock and ours differ by the round trip: a few ms of slack.
    assert!(order.iter().all(|(_, at)| *at + Duration::from_millis(20) >= until), "one left during the pause");
}

/// How long to hold back each of the next replies (ms), in order.
type Delay = Arc<Mutex<std::collections::VecDeque<u64>>>;

/// A TCP relay to Redis that holds replies back as `delay` says: a round trip that is
/// slow after Redis stamped the grant.
async fn slow_relay(redis_port: u16, delay: Delay) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(("127.0.0.1", redis_port)).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            let delay = delay.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let ms = delay.lock().unwrap().pop_front().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A replica whose Redis replies go through a [`slow_relay`].
async fn relayed(server: &RedisServer, prefix: &str) -> (Arc<Limiter>, Delay) {
    relayed_with(server, prefix, Duration::from_secs(3)).await
}

async fn relayed_with(server: &RedisServer, prefix: &str, timeout: Duration) -> (Arc<Limiter>, Delay) {
    let delay = Delay::default();
    let relay = slow_relay(server.port, delay.clone()).await;
    (limiter(&format!("redis://127.0.0.1:{relay}/0"), prefix, timeout, GUARD), delay)
}

/// Item 6: replica X's grant comes back 400 ms after Redis stamped it (the guard is
/// 50 ms). Sent anyway, it would leave 0.65 s before replica Y's grant of the next
/// window, closer than the 1 s window allows. The late grant is discarded (its token
/// stays taken) and X asks again: the two leave a window apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_grant_is_discarded_and_asked_again() {
    let server = RedisServer::start();
    let (x, delay) = relayed(&server, "late").await;
    let y = limiter(&server.url(), "late", Duration::from_secs(3), GUARD);
    // 1 per second with a 50 ms guard.
    let d = demand(BucketId::Endpoint(9), &[spec(1, 1_050)]);
    let warm = demand(BucketId::Endpoint(10), &[spec(100, 1_050)]);
    let far = Instant::now() + Duration::from_secs(20);
    for l in [&x, &y] {
        queue::wait(l, &[warm], far, 100, "warm").await.unwrap();
    }
    *delay.lock().unwrap() = [400].into();
    let x_task = tokio::spawn(async move {
        queue::wait(&x, &[d], far, 100, "op").await.unwrap();
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    queue::wait(&y, &[d], far, 100, "op").await.unwrap();
    let y_left = Instant::now();
    let x_left = x_task.await.unwrap();
    let gap = if x_left > y_left { x_left - y_left } else { y_left - x_left };
    assert!(gap >= Duration::from_secs(1), "X and Y left {gap:?} apart");
}

/// Item 6: a grant late twice in a row goes (Redis is steadily slower than the
/// guard; discarding every grant would burn the quota), and Redis still decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_late_twice_goes() {
    let server = RedisServer::start();
    let (x, delay) = relayed(&server, "late2").await;
    let d = demand(BucketId::Endpoint(9), &[spec(10, 1_050)]);
    let far = Instant::now() + Duration::from_secs(20);
    queue::wait(&x, &[d], far, 100, "warm").await.unwrap();
    *delay.lock().unwrap() = [200, 200].into();
    queue::wait(&x, &[d], far, 100, "op").await.unwrap();
    assert_eq!(x.state(), StoreState::Redis);
    assert_eq!(shared(&x).degradations(), 0);
}

/// Item 5: requests still queued in the fallback when Redis returns are counted in
/// Redis, as are those that left the fallback before: Redis' steady window holds
/// every request that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_queue_is_counted_in_redis_after_recovery() {
    let mut server = RedisServer::start();
    let port = server.port;
    let l = limiter(&server.url(), "back", Duration::from_millis(500), GUARD);
    assert_eq!(shared(&l).beat().await, StoreState::Redis);
    let d = demand(BucketId::Endpoint(3), &[spec(1, 2_000), spec(100, 60_000)]);
    server.stop();
    let far = Instant::now() + Duration::from_secs(20);
    // The first finds Redis down and leaves from the fallback; three queue there.
    queue::wait(&l, &[d], far, 100, "op").await.unwrap();
    assert_eq!(l.state(), StoreState::Degraded);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let l = l.clone();
        tasks.spawn(async move { queue::wait(&l, &[d], far, 100, "op").await });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = RedisServer::start_on(port);
    let until = Instant::now() + Duration::from_secs(10);
    while shared(&l).beat().await != StoreState::Redis {
        assert!(Instant::now() < until, "not back on Redis within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let stem = shared(&l).redis().bucket_key(&d.key);
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let steady: u32 = redis::cmd("ZCARD").arg(format!("{stem}:w1")).query_async(&mut conn).await.unwrap();
    assert_eq!(steady, 4, "every request that left is counted in Redis");
    assert_eq!(shared(&l).unsent(), 0);
}

/// Item 5: a hand-over that fails keeps its takes, merged with takes made while it
/// ran (not overwritten by them), and the takes kept are bounded by the bucket's
/// largest limit, however long the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hand_over_keeps_every_take_and_stays_bounded() {
    // Accepts connections and never answers: every call times out.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = mute.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = mute.accept().await {
            held.push(conn);
        }
    });
    let l = limiter(&format!("redis://127.0.0.1:{port}/0"), "mute", Duration::from_millis(300), GUARD);
    let s = shared(&l);
    let d = demand(BucketId::Endpoint(4), &[spec(5, 1_000), spec(20, 60_000)]);
    for _ in 0..3 {
        s.taken_locally(&[d]);
    }
    let (failed, ()) = tokio::join!(s.hand_over(None), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.taken_locally(&[d]);
        s.taken_locally(&[d]);
    });
    assert!(failed.is_err());
    assert_eq!(s.unsent(), 5, "takes made during the failed hand-over were lost or overwrote older ones");
    for _ in 0..10_000 {
        s.taken_locally(&[d]);
    }
    assert_eq!(s.unsent(), 20, "only the newest `limit` takes of the longest window matter");
}

/// Item 5: a request that leaves the fallback while the hand-over is on its way (the
/// replica still degraded) is handed over too, not lost when the replica goes back to
/// Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_made_during_the_hand_over_is_not_lost() {
    let server = RedisServer::start();
    let (x, delay) = relayed(&server, "during").await;
    let s = shared(&x);
    assert_eq!(s.beat().await, StoreState::Redis);
    let d = demand(BucketId::Endpoint(6), &[spec(10, 60_000)]);
    s.mark_down(&klaviyo_proxy::limiter::redis::RedisStoreError::Timeout(Duration::from_millis(1)));
    let far = Instant::now() + Duration::from_secs(20);
    queue::wait(&x, &[d], far, 100, "op").await.unwrap();
    // The heartbeat's reply and the hand-over's are each held back 500 ms.
    *delay.lock().unwrap() = [500, 500].into();
    let (state, ()) = tokio::join!(s.beat(), async {
        tokio::time::sleep(Duration::from_millis(750)).await;
        assert_eq!(x.state(), StoreState::Degraded, "the hand-over is still on its way");
        queue::wait(&x, &[d], far, 100, "op").await.unwrap();
    });
    assert_eq!(state, StoreState::Redis);
    let stem = s.redis().bucket_key(&d.key);
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let taken: u32 = redis::cmd("ZCARD").arg(format!("{stem}:w0")).query_async(&mut conn).await.unwrap();
    assert_eq!(taken, 2, "both fallback takes are counted in Redis");
    assert_eq!(s.unsent(), 0);
}

/// Item 5: a hand-over whose reply is lost to the timeout (Redis recorded it) is sent
/// again at the next beat and counts each take once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_sent_twice_counts_once() {
    let server = RedisServer::start();
    let (x, delay) = relayed_with(&server, "twice", Duration::from_millis(300)).await;
    let s = shared(&x);
    let d = demand(BucketId::Endpoint(7), &[spec(10, 60_000)]);
    let far = Instant::now() + Duration::from_secs(20);
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:w0", s.redis().bucket_key(&d.key));
    let zcard = || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move { redis::cmd("ZCARD").arg(key).query_async::<u32>(&mut conn).await.unwrap() }
    };
    let outage = || async {
        s.mark_down(&klaviyo_proxy::limiter::redis::RedisStoreError::Timeout(Duration::from_millis(1)));
        queue::wait(&x, &[d], far, 100, "op").await.unwrap();
    };
    // A first outage and hand-over, so that Redis knows the scripts: the reply held
    // back below is then the hand-over's own.
    outage().await;
    assert_eq!(s.beat().await, StoreState::Redis);
    assert_eq!(zcard().await, 1);
    outage().await;
    // The heartbeat answers; the hand-over's answer comes after the timeout.
    *delay.lock().unwrap() = [0, 600].into();
    assert_eq!(s.beat().await, StoreState::Degraded);
    assert_eq!(s.unsent(), 1);
    assert_eq!(zcard().await, 2, "the hand-over reached Redis");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.beat().await, StoreState::Redis);
    assert_eq!(zcard().await, 2, "the take handed over twice is counted once");
}
