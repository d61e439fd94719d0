//! Serving on one current-thread runtime per core. Each serving thread accepts on its
//! own `SO_REUSEPORT` listener (the kernel spreads connections across them) and has
//! its own upstream pool, so a request, its client connection and its upstream
//! connection stay on one thread: no cross-thread wake-ups, no work stealing on the
//! hot path. What requests share (limiter, breaker, spool, metrics) is `Sync`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
#[cfg(unix)]
use tokio::net::TcpSocket;
use tokio::sync::watch;

use crate::proxy::Proxy;
use crate::server::{self, ConnLimits};
use crate::stack;

/// The serving threads for `server.threads` (0: one per core).
pub fn threads(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds `n` listeners to `addr`: the first for this runtime, the others to hand to
/// [`spawn`]. With more than one they share the port through `SO_REUSEPORT`; the
/// address is first bound once without it, so a port another process holds is still
/// refused (`EADDRINUSE`) rather than silently shared.
pub async fn bind(addr: SocketAddr, n: usize) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    if n <= 1 || cfg!(not(unix)) {
        return Ok((TcpListener::bind(addr).await?, Vec::new()));
    }
    let addr = if addr.port() == 0 { addr } else { std::net::TcpListener::bind(addr)?.local_addr()? };
    let first = reuse_port(addr)?;
    let addr = first.local_addr()?;
    let mut rest = Vec::with_capacity(n - 1);
    for _ in 1..n {
        rest.push(reuse_port(addr)?.into_std()?);
    }
    Ok((first, rest))
}

#[cfg(unix)]
fn reuse_port(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(not(unix))]
fn reuse_port(_: SocketAddr) -> std::io::Result<TcpListener> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Serves `proxy` on each listener in a thread of its own, until `stop` turns true;
/// then each stops accepting and lets its connections finish within `limits`.
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    proxy: &Arc<Proxy>,
    limits: ConnLimits,
    stop: watch::Receiver<bool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut handles = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (proxy, mut stop) = (proxy.clone(), stop.clone());
        let limits = limits.clone();
        let thread = std::thread::Builder::new().name(format!("serve-{}", i + 1)).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "a serving thread could not start its runtime"),
            };
            runtime.block_on(async move {
                let listener = match listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener)) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "a serving thread could not take its listener"),
                };
                let stack = stack::build(&proxy, proxy.upstream().with_own_pool());
                let service = hyper_util::service::TowerToHyperService::new(stack);
                server::serve(listener, None, limits, service, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            });
        });
        match thread {
            Ok(h) => handles.push(h),
            Err(e) => tracing::error!(error = %e, "a serving thread could not start"),
        }
    }
    handles
}

/// Waits for the serving threads to finish their drain.
pub async fn join(handles: Vec<std::thread::JoinHandle<()>>) {
    let _ = tokio::task::spawn_blocking(move || {
        for h in handles {
            let _ = h.join();
        }
    })
    .await;
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_share_one_port_and_a_taken_port_is_refused() {
        let (first, rest) = bind("127.0.0.1:0".parse().unwrap(), 3).await.unwrap();
        let addr = first.local_addr().unwrap();
        assert_eq!(rest.len(), 2);
        assert!(rest.iter().all(|l| l.local_addr().unwrap() == addr));
        // Another process (or a stale proxy) on the port is an error, not a silent share.
        assert!(bind(addr, 2).await.is_err());
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(bind(taken.local_addr().unwrap(), 2).await.is_err());
    }

    #[test]
    fn zero_threads_means_one_per_core() {
        assert!(threads(0) >= 1);
        assert_eq!(threads(3), 3);
    }
}
