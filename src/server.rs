//! Accepting connections: HTTP/1.1 and h2c (or TLS) by hyper-util's auto builder, with
//! limits on request heads and read time, idle and connection-count limits
//! ([`crate::hardening::conn`]), and a graceful stop.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::hardening::conn::{self, Activity, ConnCap, Tracked};

/// Whether a gated server takes connections (the simulator's outage faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gate {
    /// Serve normally.
    #[default]
    Open,
    /// Reset every connection: open ones are dropped, new ones get a TCP RST at once.
    Reset,
    /// Close the listening socket, so connecting is refused; open connections are
    /// dropped. The same address is bound again when the gate opens.
    Refuse,
}

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Time to receive a request head.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// Time a new connection has to send its first byte (before TLS or the protocol).
    pub first_byte_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// HTTP/2 keep-alive ping interval (and how long an answer may take).
    pub keep_alive_interval: Duration,
    /// Open connections at most; more are closed at once (with a warning).
    pub max_connections: usize,
    /// One cap shared by several listeners (the serving threads' `SO_REUSEPORT`
    /// listeners are one listener to clients); `None`: a cap of this listener's own.
    pub cap: Option<ConnCap>,
    /// Waited before a TLS handshake starts: the simulator's stand-in for the round
    /// trips a real handshake with a distant Klaviyo takes (zero for the proxy).
    pub handshake_delay: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            first_byte_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            keep_alive_interval: Duration::from_secs(30),
            max_connections: 4096,
            cap: None,
            handshake_delay: Duration::ZERO,
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then lets open
/// connections finish for up to the drain timeout.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A gate whose sender is gone never changes: the gate's waits are then pending
    // futures that cost nothing, where a live sender would have every connection take
    // the watch's lock (shared by all serving threads) at each of its wake-ups.
    let (open, gate) = watch::channel(Gate::Open);
    drop(open);
    serve_gated(listener, tls, limits, service, shutdown, gate, Default::default()).await;
}

/// Waits until the gate leaves `Open` (or its sender is gone, which never closes it).
async fn gate_closes(mut gate: watch::Receiver<Gate>) {
    if gate.wait_for(|g| *g != Gate::Open).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits for the gate to change; a gate whose sender is gone never changes again.
async fn gate_changed(gate: &mut watch::Receiver<Gate>) {
    if gate.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Binds `addr` without listening, to keep the port while the gate refuses.
fn hold(addr: std::net::SocketAddr) -> Option<TcpSocket> {
    let bind = |reuse: bool| -> std::io::Result<TcpSocket> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
        socket.set_reuseaddr(reuse)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    // Without SO_REUSEADDR no other socket can bind the port. When the closed
    // listener's connections linger in TIME_WAIT, only a bind with it succeeds: that
    // still keeps the port from automatic port choice and outgoing connections.
    bind(false).or_else(|_| bind(true)).ok()
}

/// Listens on `addr` again: on the held socket when there is one.
async fn reopen(held: Option<TcpSocket>, addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    match held {
        Some(socket) => socket.listen(1024),
        None => TcpListener::bind(addr).await,
    }
}

/// [`serve`] with a [`Gate`] that can reset or refuse connections at run time;
/// `resets` counts the connections reset (the attempts an outage turned away).
pub async fn serve_gated<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    service: S,
    shutdown: impl Future<Output = ()>,
    mut gate: watch::Receiver<Gate>,
    resets: std::sync::Arc<std::sync::atomic::AtomicU64>,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(limits.keep_alive_interval)
        .keep_alive_timeout(limits.keep_alive_interval);
    // Open connections, capped; at shutdown each is told to stop and the drain waits
    // until all have ended.
    let cap = limits.cap.clone().unwrap_or_else(|| ConnCap::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    let addr = listener.local_addr().ok();
    let mut listener = Some(listener);
    // While the gate refuses: the port, bound but not listening (connecting is refused,
    // and no other socket can take the address before the gate opens again).
    let mut held: Option<TcpSocket> = None;
    loop {
        let current = *gate.borrow_and_update();
        match (current, &listener, addr) {
            (Gate::Refuse, Some(_), _) => {
                listener = None;
                held = addr.and_then(hold);
            }
            (Gate::Open | Gate::Reset, None, Some(addr)) => match reopen(held.take(), addr).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "rebinding the listener failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ => {}
        }
        let Some(bound) = &listener else {
            tokio::select! {
                () = gate_changed(&mut gate) => continue,
                () = &mut shutdown => break,
            }
        };
        let (stream, _peer) = tokio::select! {
            () = gate_changed(&mut gate) => continue,
            accepted = bound.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if current == Gate::Reset {
            resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let Some(slot) = cap.admit(&addr.map(|a| a.to_string()).unwrap_or_default()) else { continue };
        let _ = stream.set_nodelay(true);
        let closes = gate_closes(gate.clone());
        let activity = Activity::new();
        let service = Tracked::new(service.clone(), activity.clone());
        let builder = builder.clone();
        let mut stopping = stopping.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stop = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            let idle = limits.idle_timeout;
            let serve = async move {
                // A socket that never speaks holds a descriptor for nothing.
                match tokio::time::timeout(limits.first_byte_timeout, stream.peek(&mut [0u8; 1])).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Ok(()),
                }
                match tls {
                    Some(acceptor) => {
                        tokio::time::sleep(limits.handshake_delay).await;
                        match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                                conn::drive(conn, activity, idle, stop).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => Ok(()),
                        }
                    }
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        conn::drive(conn, activity, idle, stop).await
                    }
                }
            };
            // An outage drops open connections mid-request, as a crashed upstream would.
            let result = tokio::select! {
                result = serve => result,
                () = closes => return,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    if tokio::time::timeout(limits.drain_timeout, cap.all_closed()).await.is_err() {
        tracing::warn!("drain timeout passed with connections still open");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While the gate refuses, connecting is refused and the port stays this server's:
    /// no other socket can take it, so the same address opens again and nothing else
    /// answers there meanwhile.
    #[tokio::test]
    async fn a_refusing_gate_holds_its_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, gate_rx) = watch::channel(Gate::Refuse);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_gated(
            listener,
            None,
            ConnLimits::default(),
            hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            }),
            async {
                let _ = stopped.await;
            },
            gate_rx,
            Default::default(),
        ));
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(tokio::time::Instant::now() < until, "the refusing gate still accepts");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(std::net::TcpListener::bind(addr).is_err(), "another socket took the refused port");
        gate.send(Gate::Open).unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(tokio::time::Instant::now() < until, "the gate never opened again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        server.await.unwrap();
    }
}
