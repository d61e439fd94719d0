//! Test support: the simulator and the proxy on 127.0.0.1 port 0, in-process, and a
//! small HTTP client. Every server started here stops when its handle is dropped.
#![allow(dead_code)]

pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use klaviyo_proxy::config::{Config, UpstreamUrl};
use klaviyo_proxy::sim::{SimOptions, Simulator, Stats};
use klaviyo_proxy::App;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A test account's private key.
pub const KEY_A: &str = "pk_test_account_a_0123456789abcdef";
/// Another account's private key.
pub const KEY_B: &str = "pk_test_account_b_fedcba9876543210";

/// Starts a simulator with a fixed seed.
pub async fn sim(options: SimOptions) -> Simulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(listener, SimOptions { seed: Some(7), ..options }).unwrap()
}

/// A proxy running in this process.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The app (for inspecting its store).
    pub app: App,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A config pointing at `upstream`, built from TOML text on top of the defaults.
pub fn config(upstream: &str, extra: &str) -> Config {
    let mut config = Config::parse(extra, "test config").unwrap();
    config.upstream.url = UpstreamUrl::try_from(upstream.to_string()).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    // These tests count what reaches the upstream for other features; the one
    // `GET /api/accounts` per credential of account resolution is tested in
    // tests/accounts.rs.
    config.accounts.resolve = false;
    config
}

/// Starts a proxy with `config` on 127.0.0.1 port 0.
pub async fn proxy(config: Config) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = App::build(config).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    Proxy { addr, app, stop: Some(stop), task }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// A plain HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request through `client` and reads the whole answer (with a bound).
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp =
        tokio::time::timeout(Duration::from_secs(90), client.request(req)).await.expect("reply in time").unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, headers, body }
}

/// `GET` with a private key.
pub async fn get(client: &Client<HttpConnector, Full<Bytes>>, url: &str, key: &str) -> Reply {
    let auth = format!("Klaviyo-API-Key {key}");
    send(client, Method::GET, url, &[("authorization", &auth)], "").await
}

/// The simulator's counters for one operation (summed over accounts) by bucket kind.
pub fn bucket<'a>(stats: &'a Stats, operation: &str, kind: &str) -> Vec<&'a klaviyo_proxy::sim::BucketStats> {
    stats.buckets.iter().filter(|b| b.operation == operation && b.bucket == kind).collect()
}

/// What an upstream [`recorder`] saw of one request.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The request target's path.
    pub path: String,
    /// Every header in the order it came, repeated names included, values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When it reached the upstream.
    pub at: tokio::time::Instant,
}

impl Arrival {
    /// The values of every header called `name`, in order.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_slice()).collect()
    }
}

/// What a [`recorder`] has seen so far, in arrival order.
pub type Arrivals = std::sync::Arc<std::sync::Mutex<Vec<Arrival>>>;

/// An HTTP/1.1 upstream on 127.0.0.1 port 0 that records every request (see
/// [`Arrival`]) and answers 200 with an empty list. It serves until the runtime ends.
pub async fn recorder() -> (SocketAddr, Arrivals) {
    let seen = Arrivals::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let headers =
                            req.headers().iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
                        let path = req.uri().path().to_string();
                        record.lock().unwrap().push(Arrival { path, headers, at: tokio::time::Instant::now() });
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"{\"data\":[]}",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}
