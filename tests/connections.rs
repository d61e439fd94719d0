//! Connection limits through the real binary: idle sockets (silent, a bare h2c preface,
//! an HTTP/1 keep-alive after one request) are closed after the timeouts while normal
//! requests keep being served, and the connection cap closes the excess with a log line.

mod support;

use std::time::{Duration, Instant};

use support::process::{self, Served};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_klaviyo-proxy");
const H2C_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many idle connections the first test holds open at once (the issue asks for
/// 5,000; the test process and the proxy each need one descriptor per connection).
const IDLE: usize = 5_000;

fn serve(name: &str, toml: &str) -> Served {
    let dir = std::env::temp_dir().join(format!("kp-conn-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("proxy.toml");
    // Account lookups are not what these tests are about.
    std::fs::write(&config, format!("{toml}\n[accounts]\nresolve = false\n")).unwrap();
    let mut served = Served::start(BIN, &process::serve_args("sim", config.to_str()), &[]);
    served.proxy = served.proxy.trim_start_matches("http://").to_string();
    served
}

/// One request on a fresh connection, the way a normal client sends it.
async fn get_accounts(addr: &str) -> Option<u16> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // An account of its own each time (the simulator reads `pk_<account>_…`): its 1/s
    // for get_accounts is per account.
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /api/accounts HTTP/1.1\r\nhost: localhost\r\nauthorization: Klaviyo-API-Key pk_conn{n}_test\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.ok()?.ok()?;
    String::from_utf8_lossy(&out).split(' ').nth(1)?.parse().ok()
}

/// Waits (bounded) for the server to close `s`: EOF or a reset.
async fn closed_within(mut s: TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_while_requests_are_served() {
    let s = serve(
        "idle",
        "[server]\nfirst_byte_timeout_ms = 1500\nidle_timeout_ms = 3000\nmax_connections = 6000\n[limits]\nenabled = false\n",
    );
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut c = TcpStream::connect(&s.proxy).await.expect("connect (raise ulimit -n?)");
        match i % 3 {
            // Says nothing at all.
            0 => {}
            // Only the h2c preface, then silence: HTTP/2 held open without a stream.
            1 => c.write_all(H2C_PREFACE).await.unwrap(),
            // One request, then an idle HTTP/1 keep-alive.
            _ => {
                // Another account than the normal requests': the simulator's get_accounts
                // quota (1/s) is the normal requests' alone.
                let req = "GET /api/accounts HTTP/1.1\r\nhost: localhost\r\nauthorization: Klaviyo-API-Key pk_idle_0123456789\r\n\r\n";
                c.write_all(req.as_bytes()).await.unwrap();
            }
        }
        idle.push(c);
    }
    let held = opened.elapsed();
    // Meanwhile, normal requests are served.
    for _ in 0..20 {
        assert_eq!(get_accounts(&s.proxy).await, Some(200));
    }
    let bound = Duration::from_secs(60);
    let closed: Vec<bool> = futures_join(idle.into_iter().map(|c| closed_within(c, bound))).await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} of {IDLE} idle connections still open {bound:?} after opening them (took {held:?})");
    // And afterwards too.
    assert_eq!(get_accounts(&s.proxy).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_closes_the_excess_with_a_log_line() {
    let s = serve("cap", "[server]\nmax_connections = 50\n[limits]\nenabled = false\n");
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(TcpStream::connect(&s.proxy).await.unwrap());
    }
    // Let the proxy accept all fifty before the excess arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut excess = Vec::new();
    for _ in 0..10 {
        excess.push(TcpStream::connect(&s.proxy).await.unwrap());
    }
    for c in excess {
        assert!(closed_within(c, Duration::from_secs(10)).await, "a connection over the cap stayed open");
    }
    let line = s.wait_for_log("connection limit reached");
    assert!(line.contains("max_connections") && line.contains("50"), "{line}");
    // Once they go, new connections are served again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get_accounts(&s.proxy).await, Some(200));
}

/// Runs futures concurrently on this runtime and collects their outputs in order.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
