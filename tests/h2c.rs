//! HTTP/2 clients (h2c, prior knowledge): their `:authority` is the proxy's own
//! address, as `Host` is in HTTP/1, and must not be taken for a request to another host.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use klaviyo_proxy::sim::SimOptions;

#[tokio::test]
async fn h2c_requests_are_forwarded() {
    let sim = support::sim(SimOptions::default()).await;
    let proxy = support::proxy(support::config(&sim.url, "")).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("{}/api/accounts", proxy.url()))
        .header("authorization", format!("Klaviyo-API-Key {}", support::KEY_A))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sim.stats().requests, 1);
}
