//! One budget for every request body the proxy holds in memory, buffered or queued:
//! without it, 1000 queued requests per bucket times any number of buckets times
//! 5 MB each has no ceiling. Over the budget a request is refused at once (503 with
//! `Retry-After`) instead of growing the process until the OOM killer ends it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::error::ProxyError;

/// What a client is told to wait when the budget is spent: bodies leave with their
/// requests within seconds.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Bytes of bodies held now, at most `limit`.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes held for one request, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ByteBudget { limit, used: AtomicUsize::new(0) })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// An empty reservation.
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }
}

impl Reservation {
    /// Grows the reservation to `total` bytes; `false` (and unchanged) when that would
    /// pass the limit.
    pub fn grow_to(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes).filter(|m| *m > 0) else { return true };
        let limit = self.budget.limit;
        let grown = self.budget.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
            used.checked_add(more).filter(|after| *after <= limit)
        });
        if grown.is_ok() {
            self.bytes = total;
        }
        grown.is_ok()
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Reads a whole body of at most `limit` bytes within `timeout`, reserving its bytes in
/// `budget` as they arrive (all of a declared `Content-Length` up front, so a request
/// that cannot fit is refused before it is read).
pub async fn read_body<B>(
    body: B,
    declared: Option<u64>,
    limit: usize,
    timeout: Duration,
    budget: &Arc<ByteBudget>,
) -> Result<(Bytes, Reservation), ProxyError>
where
    B: Body<Data = Bytes>,
{
    let mut reservation = budget.reserve();
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    // Over the budget the body is still read (and dropped): a client gets the 503
    // rather than a broken pipe while it is still sending.
    let mut admitted = declared.is_none_or(|n| reservation.grow_to(n as usize));
    let read = async {
        let mut body = std::pin::pin!(body);
        // Sized to the declared length (already reserved), so growing never doubles it.
        let mut buf = BytesMut::with_capacity(reservation.bytes());
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| ProxyError::BodyRead)?.into_data() else { continue };
            total += data.len();
            if total > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            admitted = admitted && reservation.grow_to(total);
            if admitted {
                buf.extend_from_slice(&data);
            } else {
                buf = BytesMut::new();
            }
        }
        match admitted {
            true => Ok(buf.freeze()),
            false => Err(ProxyError::Overloaded { retry_after: RETRY_AFTER }),
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ProxyError::ClientTimeout(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(bytes)) => Ok((bytes, reservation)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn reservations_add_up_and_give_back() {
        let budget = ByteBudget::new(100);
        let mut a = budget.reserve();
        assert!(a.grow_to(60));
        let mut b = budget.reserve();
        assert!(!b.grow_to(41));
        assert!(b.grow_to(40));
        assert_eq!(budget.used(), 100);
        assert!(a.grow_to(10), "shrinking is a no-op");
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn read_within_budget() {
        let budget = ByteBudget::new(10);
        let t = Duration::from_secs(5);
        let (bytes, held) = read_body(Full::new(Bytes::from_static(b"12345")), Some(5), 100, t, &budget).await.unwrap();
        assert_eq!((&bytes[..], budget.used()), (&b"12345"[..], 5));
        let second = read_body(Full::new(Bytes::from_static(b"123456")), Some(6), 100, t, &budget).await;
        assert!(matches!(second, Err(ProxyError::Overloaded { .. })));
        // Without a declared length, the budget is taken as bytes arrive.
        let streamed = Chunks((0..6).map(|_| Bytes::from_static(b"x")).collect());
        assert!(matches!(read_body(streamed, None, 100, t, &budget).await, Err(ProxyError::Overloaded { .. })));
        assert_eq!(budget.used(), 5, "a refused read gives its bytes back");
        let big = read_body(Full::new(Bytes::from_static(b"12345")), Some(5), 4, t, &budget).await;
        assert!(matches!(big, Err(ProxyError::BodyTooLarge { limit: 4 })));
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    /// A body that arrives in chunks, with no length declared.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }
}
