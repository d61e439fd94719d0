//! The body is read whole before the request queues: the client's upload time never
//! holds a token, a retry or a replay can send it again, and it is bounded in size
//! (`server.max_body_bytes`), in time (`server.client_read_timeout_ms`) and, with every
//! other body held, by `server.max_buffered_bytes` ([`crate::hardening::budget`]).

use std::task::{Context, Poll};

use bytes::Bytes;
use http::header;
use hyper::body::Body;
use tower::{Layer, Service};

use super::{Either, Routed};
use crate::error::ProxyError;
use crate::hardening::budget;

/// Buffers the body of every request.
#[derive(Debug, Clone, Copy)]
pub struct BufferLayer;

impl<S> Layer<S> for BufferLayer {
    type Service = Buffer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Buffer { inner }
    }
}

/// See [`BufferLayer`].
#[derive(Debug, Clone)]
pub struct Buffer<S> {
    inner: S,
}

impl<S, B> Service<Routed<B>> for Buffer<S>
where
    S: Service<Routed<Bytes>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<S::Future, Result<S::Response, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<B>) -> Self::Future {
        // Most reads have no body at all: nothing to wait for, hold or time out.
        if routed.call.body.is_end_stream() {
            let (routed, _) = routed.swap_body(Bytes::new());
            return Either::Inner { future: self.inner.call(routed) };
        }
        // The clone is ready too: every stage below is always ready.
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        let future = Box::pin(async move {
            let (routed, body) = routed.swap_body(Bytes::new());
            let live = &routed.call.live;
            let bodies = live.bodies.clone();
            let limit = live.config.server.max_body_bytes;
            let timeout = live.config.client_read_timeout();
            let headers = &routed.call.parts.headers;
            let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
            // Counted against the shared budget until the request is answered.
            let (body, _held) = budget::read_body(body, declared, limit, timeout, &bodies).await?;
            let (routed, _) = routed.swap_body(body);
            inner.call(routed).await
            // `_held` lives to here: queued bodies count too.
        });
        Either::Own { future }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Request;
    use http_body_util::Full;
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing;

    fn echo() -> impl Service<Routed<Bytes>, Response = Bytes, Error = ProxyError, Future: Send> + Clone + Send + 'static
    {
        tower::service_fn(|r: Routed<Bytes>| async move { Ok::<_, ProxyError>(r.call.body) })
    }

    #[tokio::test]
    async fn the_inner_service_gets_the_whole_body() {
        let proxy = testing::proxy("");
        let req = Request::post("/api/events").body(Full::new(Bytes::from_static(b"{\"data\":1}"))).unwrap();
        let got = BufferLayer.layer(echo()).oneshot(testing::routed(&proxy, req)).await.unwrap();
        assert_eq!(got, "{\"data\":1}");
    }

    #[tokio::test]
    async fn a_request_without_a_body_goes_on_at_once_with_an_empty_one() {
        let proxy = testing::proxy("");
        let req = Request::get("/api/accounts").body(http_body_util::Empty::<Bytes>::new()).unwrap();
        let got = BufferLayer.layer(echo()).call(testing::routed(&proxy, req));
        assert!(matches!(got, Either::Inner { .. }), "no box, no wait");
        assert_eq!(got.await.unwrap(), "");
    }

    #[tokio::test]
    async fn too_large_is_refused() {
        let proxy = testing::proxy("[server]\nmax_body_bytes = 4\n");
        let req = Request::post("/api/events").body(Full::new(Bytes::from_static(b"12345"))).unwrap();
        let got = BufferLayer.layer(echo()).oneshot(testing::routed(&proxy, req)).await;
        assert!(matches!(got, Err(ProxyError::BodyTooLarge { limit: 4 })));
    }

    /// A body whose client never sends a byte.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stalls_is_cut_off() {
        let proxy = testing::proxy("[server]\nclient_read_timeout_ms = 1500\n");
        let req = Request::post("/api/events").body(Stalled).unwrap();
        let got = BufferLayer.layer(echo()).oneshot(testing::routed(&proxy, req)).await;
        assert!(matches!(got, Err(ProxyError::ClientTimeout(d)) if d == Duration::from_millis(1500)));
    }
}
