//! Connection limits: a cap on open connections per listener, and closing connections
//! that carry no request for a while (HTTP/1 keep-alive, HTTP/2, or a socket that
//! only sent the h2c preface), so idle sockets cannot use up the file descriptors the
//! upstream needs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often the "connection limit reached" line may repeat.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The open connections of one listener, at most `max`.
#[derive(Debug, Clone)]
pub struct ConnCap {
    open: Arc<Semaphore>,
    max: usize,
    /// When the limit was last logged, and how many connections were refused since.
    warned: Arc<Mutex<(Option<Instant>, u64)>>,
}

/// An open connection's place under the cap, given back when dropped.
#[derive(Debug)]
pub struct ConnSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl ConnCap {
    /// A cap of `max` connections (at least 1).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        ConnCap { open: Arc::new(Semaphore::new(max)), max, warned: Arc::new(Mutex::new((None, 0))) }
    }

    /// A slot for a new connection, or `None` (and a rate-limited warning naming the
    /// setting) when `max` are open.
    pub fn admit(&self, listener: &str) -> Option<ConnSlot> {
        if let Ok(permit) = self.open.clone().try_acquire_owned() {
            return Some(ConnSlot(permit));
        }
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        warned.1 += 1;
        let now = Instant::now();
        if warned.0.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            tracing::warn!(
                listener,
                max_connections = self.max,
                refused = warned.1,
                "connection limit reached (server.max_connections): new connections are closed until open ones end"
            );
            *warned = (Some(now), 0);
        }
        None
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.open.available_permits()
    }

    /// Waits until every connection has ended.
    pub async fn all_closed(&self) {
        let _ = self.open.acquire_many(self.max as u32).await;
    }
}

/// One connection's requests: how many are in flight and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    /// A connection that just opened.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity { in_flight: AtomicUsize::new(0), last: Mutex::new(Instant::now()) })
    }

    /// When the connection becomes idle for `idle` if nothing happens, or `None` while a
    /// request is in flight.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(*self.last.lock().unwrap_or_else(PoisonError::into_inner) + idle)
    }
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A service that records its connection's [`Activity`].
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    /// Wraps the service of one connection.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<S: hyper::service::Service<R>, R> hyper::service::Service<R> for Tracked<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        TrackedFuture { _in_flight: InFlight::new(&self.activity), inner: self.inner.call(req) }
    }
}

pin_project_lite::pin_project! {
    /// A request's future, counted in flight until it completes or is dropped.
    #[derive(Debug)]
    pub struct TrackedFuture<F> {
        _in_flight: InFlight,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// Drives one connection to its end. It is shut down gracefully (in-flight requests
/// finish; HTTP/2 gets a GOAWAY) when `stop` completes or when no request has been in
/// flight for `idle`.
pub async fn drive<C: GracefulConnection>(
    conn: C,
    activity: Arc<Activity>,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> Result<(), C::Error> {
    tokio::pin!(conn, stop);
    let check = tokio::time::sleep(idle);
    tokio::pin!(check);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            () = &mut stop, if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut check, if !stopping => {
                let now = Instant::now();
                match activity.idle_at(idle) {
                    Some(at) if at <= now => {
                        tracing::debug!(idle_ms = idle.as_millis() as u64, "closing an idle connection");
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Some(at) => check.as_mut().reset(at),
                    None => check.as_mut().reset(now + idle),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cap_refuses_past_max_and_frees_on_drop() {
        let cap = ConnCap::new(2);
        let a = cap.admit("t").unwrap();
        let _b = cap.admit("t").unwrap();
        assert!(cap.admit("t").is_none());
        assert_eq!(cap.open(), 2);
        drop(a);
        assert!(cap.admit("t").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_in_flight() {
        let activity = Activity::new();
        let idle = Duration::from_secs(5);
        let opened = Instant::now();
        assert_eq!(activity.idle_at(idle), Some(opened + idle));
        let req = InFlight::new(&activity);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(activity.idle_at(idle), None, "a long queued request keeps its connection");
        drop(req);
        assert_eq!(activity.idle_at(idle), Some(Instant::now() + idle));
    }
}
