//! The least a proxy built on hyper can cost: a reference variant for
//! `benches/overhead-wrk.sh`, not part of klaviyo-proxy. Each client connection gets
//! its own upstream connection (no pool, no routing, no limits, no metrics); one
//! current-thread runtime per thread on a `SO_REUSEPORT` listener, as the proxy's.
//! What klaviyo-proxy costs above this is its own work; what this costs above nginx
//! is hyper's and tokio's.
//!
//!   cargo build --release --bench hyper_floor
//!   target/release/deps/hyper_floor-* LISTEN UPSTREAM [THREADS]

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn relay(client: tokio::net::TcpStream, upstream: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let conn = tokio::net::TcpStream::connect(upstream).await?;
    conn.set_nodelay(true)?;
    let (send, driver) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(conn)).await?;
    tokio::task::spawn_local(driver);
    let send = Rc::new(tokio::sync::Mutex::new(send));
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let send = send.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let mut send = send.lock().await;
            send.ready().await?;
            let resp = send.send_request(http::Request::from_parts(parts, Full::new(body))).await?;
            drop(send);
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(http::Response::from_parts(parts, Full::new(body)))
        }
    });
    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service).await?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: hyper_floor LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN is host:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM is host:port");
    let threads: usize = args.get(3).map_or(2, |t| t.parse().expect("THREADS is a number"));
    let threads: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                tokio::task::LocalSet::new().block_on(&runtime, async move {
                    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                    socket.set_reuseport(true).expect("SO_REUSEPORT");
                    socket.bind(listen).expect("bind");
                    let listener = socket.listen(1024).expect("listen");
                    loop {
                        let Ok((client, _)) = listener.accept().await else { continue };
                        let _ = client.set_nodelay(true);
                        tokio::task::spawn_local(async move {
                            let _ = relay(client, upstream).await;
                        });
                    }
                });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
