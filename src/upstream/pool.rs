//! The upstream connections of one runtime: made with hyper's connection API, so that
//! a request can hold its connection *before* it takes a token. Klaviyo counts a
//! request when it arrives; a token taken before a TCP and TLS handshake would be
//! stamped a handshake too early, and a cold pool's first burst would then arrive
//! bunched against the next one (a window over its limit at Klaviyo, with every slot
//! correct in the log). A [`Lease`] taken before queueing removes that gap.
//!
//! HTTP/2 (by ALPN) shares one connection among all requests. An HTTP/1 connection
//! goes back to the list when its response head arrives, and is taken again only
//! once that response has been read to the end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A way to send one request: an HTTP/1 connection of its own, or a handle on the
/// shared HTTP/2 connection.
#[derive(Debug)]
pub enum Sender {
    /// An HTTP/1.1 connection, one request at a time.
    H1(http1::SendRequest<Full<Bytes>>),
    /// A stream on an HTTP/2 connection.
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Ready for another request: an idle connection that is still open.
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    /// Not closed (a new HTTP/1 connection is not `ready` until its task first runs,
    /// but takes its first request).
    fn open(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        }
    }
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// The pool of one runtime (shared by the clones of its [`super::Upstream`]).
#[derive(Debug)]
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector dials.
    base: Uri,
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, when the upstream speaks it (shared, never idle-listed).
    h2: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
    idle_timeout: Duration,
    max_idle: usize,
    /// Leases held by queued requests: at most `max_idle`, so a long queue does not
    /// hold a connection per request.
    leased: AtomicUsize,
}

impl Pool {
    /// An empty pool dialling `base` through `connector`.
    pub fn new(connector: HttpsConnector<HttpConnector>, base: Uri, idle_timeout: Duration, max_idle: usize) -> Self {
        Pool {
            connector,
            base,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            idle_timeout,
            max_idle,
            leased: AtomicUsize::new(0),
        }
    }

    /// A connection ready for one request: the HTTP/2 one, an idle HTTP/1 one, or a
    /// new one; and whether it served requests before (the upstream may have closed
    /// it meanwhile, which a new connection cannot have met).
    pub async fn sender(self: &Arc<Self>) -> Result<(Sender, bool), BoxError> {
        if let Some(s) = self.take_idle() {
            return Ok((s, true));
        }
        // Boxed: a TCP+TLS+HTTP handshake is a future of kilobytes, which would
        // otherwise sit in (and be copied with) every request's state, pooled or not.
        Ok((Box::pin(self.connect()).await?, false))
    }

    fn take_idle(&self) -> Option<Sender> {
        if let Some(h2) = lock(&self.h2).as_ref().filter(|s| s.is_ready()) {
            return Some(Sender::H2(h2.clone()));
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        // Newest first. One still reading its last response stays for later; closed
        // and expired ones go.
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &idle[i];
            if !entry.sender.open() || now.duration_since(entry.since) >= self.idle_timeout {
                idle.swap_remove(i);
            } else if entry.sender.usable() {
                return Some(idle.swap_remove(i).sender);
            }
        }
        None
    }

    async fn connect(self: &Arc<Self>) -> Result<Sender, BoxError> {
        let io = self.connector.clone().oneshot(self.base.clone()).await?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) =
                http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).handshake(io).await?;
            tokio::spawn(conn);
            *lock(&self.h2) = Some(sender.clone());
            return Ok(Sender::H2(sender));
        }
        let (sender, conn) = http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }

    /// Puts a sender back. An HTTP/1 connection is usually still reading its
    /// response then: it waits in the list, and is taken once it is ready again (read
    /// to the end) rather than watched by a task of its own, which cost a spawn and a
    /// wake-up per request.
    pub fn give_back(self: &Arc<Self>, sender: Sender) {
        match sender {
            Sender::H2(_) => {}
            Sender::H1(s) if s.is_closed() => {}
            h1 => self.park(h1),
        }
    }

    fn park(&self, sender: Sender) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// A connection held for a request that is about to queue, if fewer than the
    /// pool's idle bound are held already. Dropped unused, it goes back to the pool.
    pub async fn lease(self: &Arc<Self>) -> Option<Lease> {
        if self.leased.fetch_add(1, Ordering::AcqRel) >= self.max_idle.max(1) {
            self.leased.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let guard = LeaseCount(self.clone());
        // A failed connect is kept in the lease: the request that made it must not dial
        // again for the same attempt (during an outage that would be two connections
        // turned away per attempt).
        let (sender, reused, failed) = match self.sender().await {
            Ok((sender, reused)) => (Some(sender), reused, None),
            Err(e) => (None, false, Some(e)),
        };
        Some(Lease { sender, reused, failed, since: Instant::now(), _count: guard })
    }
}

struct LeaseCount(Arc<Pool>);

impl Drop for LeaseCount {
    fn drop(&mut self) {
        self.0.leased.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection held by one request (see the module docs).
pub struct Lease {
    sender: Option<Sender>,
    reused: bool,
    /// Why connecting failed, when it did.
    failed: Option<BoxError>,
    /// When the connection was handed over.
    since: Instant,
    _count: LeaseCount,
}

impl Lease {
    /// The connection if it is still usable, else whether to dial again. A
    /// connection the upstream closed while the request queued is replaced (an idle
    /// one, or a new one that sent nothing for longer than the upstream waits for a
    /// first request); a new one closed, or a connect that failed, within
    /// [`TURNED_AWAY`] is the upstream turning connections away (an outage), and is
    /// not dialled again.
    pub fn take(mut self) -> Taken {
        let reused = self.reused;
        // Read only off the common path (a usable connection): one clock read fewer.
        let recent = || self.since.elapsed() < TURNED_AWAY;
        match (self.sender.take(), self.failed.take()) {
            (Some(s), _) if s.open() && (!reused || s.usable()) => Taken::Ready(s, reused),
            (None, Some(e)) if recent() => Taken::TurnedAway(e),
            (Some(_), _) if !reused && recent() => {
                Taken::TurnedAway("the upstream closed a new connection before the request was sent".into())
            }
            _ => Taken::Dial,
        }
    }
}

/// What a [`Lease`] holds when its request is about to go.
pub enum Taken {
    /// A usable connection, and whether it served before.
    Ready(Sender, bool),
    /// None: dial (or take an idle one) now.
    Dial,
    /// The upstream turned the lease's connection away moments ago: this attempt fails
    /// with it, without dialling again.
    TurnedAway(BoxError),
}

/// A new connection closed sooner than this was turned away, not timed out.
const TURNED_AWAY: Duration = Duration::from_secs(1);

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self._count.0.give_back(sender);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
