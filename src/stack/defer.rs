//! The answers that come before the exchange, and the one after it: the kill switch
//! (`upstream.enabled = false`) answers at once; an open breaker fails fast instead of
//! queueing for nothing; and a deferrable write (`spool.deferrable`, safe to repeat,
//! with a spool) that cannot be delivered now is written to the spool and accepted
//! with a 202.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use tower::{Layer, Service};

use super::{Either, Routed};
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::proxy::{Live, Proxy};
use crate::retry::Repeat;
use crate::route::Route;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct DeferLayer {
    proxy: Arc<Proxy>,
}

impl DeferLayer {
    /// The layer, spooling to `proxy`'s spool.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        DeferLayer { proxy }
    }
}

impl<S> Layer<S> for DeferLayer {
    type Service = Defer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Defer { proxy: self.proxy.clone(), inner }
    }
}

/// See [`DeferLayer`].
#[derive(Debug, Clone)]
pub struct Defer<S> {
    proxy: Arc<Proxy>,
    inner: S,
}

impl<S> Service<Routed<Bytes>> for Defer<S>
where
    S: Service<Routed<Bytes>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<Bytes>) -> Self::Future {
        // Borrowed, and cloned only by the branches whose future keeps them: the
        // proxy's and the config's counts are written by every serving thread.
        let proxy = &self.proxy;
        let live = &routed.call.live;
        // Only where a later delivery cannot make the write happen twice.
        let deferrable = proxy.spool().is_some() && is_deferrable(live, &routed.route) && routed.repeat == Repeat::Safe;
        // The kill switch (rollback option): answer at once, touch nothing upstream.
        if !live.config.upstream.enabled {
            let spool = deferrable && live.config.spool.when_disabled;
            let proxy = proxy.clone();
            return Either::Own {
                future: Box::pin(async move { accept_or(&proxy, spool, &routed, ProxyError::Disabled).await }),
            };
        }
        // While Klaviyo is failing, fail fast instead of queueing for nothing.
        let account = routed.route.demands.first().map(|d| d.key.account);
        if let Some(retry_after) = proxy.breaker_open_for(live, account) {
            let proxy = proxy.clone();
            return Either::Own {
                future: Box::pin(async move {
                    accept_or(&proxy, deferrable, &routed, ProxyError::CircuitOpen { retry_after }).await
                }),
            };
        }
        // A request the spool would not take goes as the exchange's future alone: the
        // spool's state (a copy of the call, the spool write) would otherwise sit in
        // every queued request (1.5 kB each).
        if !deferrable {
            return Either::Inner { future: self.inner.call(routed) };
        }
        // The exchange owns the call; keep what the spool needs if it fails.
        let kept = keep(&routed);
        let proxy = proxy.clone();
        let answer = self.inner.call(routed);
        Either::Own {
            future: Box::pin(async move {
                let result = answer.await;
                let undelivered = match &result {
                    Ok(resp) => resp.status().is_server_error(),
                    Err(e) => may_defer(e),
                };
                if !undelivered {
                    return result;
                }
                drop(result);
                // Boxed apart: the spool write's state would otherwise sit in every
                // queued deferrable write's box, unused until Klaviyo fails it.
                Box::pin(proxy.defer(&kept)).await
            }),
        }
    }
}

/// The spool's answer when `spool` (202, or 503 when it cannot store the write),
/// `error` otherwise.
async fn accept_or(
    proxy: &Proxy,
    spool: bool,
    routed: &Routed<Bytes>,
    error: ProxyError,
) -> Result<Response<ProxyBody>, ProxyError> {
    if spool {
        return proxy.defer(routed).await;
    }
    Err(error)
}

/// A copy of a call for the spool (the body is shared, not copied).
fn keep(routed: &Routed<Bytes>) -> Routed<Bytes> {
    let call = &routed.call;
    Routed {
        call: super::Call {
            parts: call.parts.clone(),
            body: call.body.clone(),
            live: call.live.clone(),
            record: call.record.clone(),
            resolved: call.resolved,
        },
        route: routed.route.clone(),
        deadline: routed.deadline,
        repeat: routed.repeat,
        unique_id: routed.unique_id.clone(),
        // The checklist has seen the body by now (the defer stage is below it).
        observed: None,
    }
}

fn is_deferrable(live: &Live, route: &Route) -> bool {
    live.config.spool.deferrable.iter().any(|o| o.as_str() == route.label())
}

/// Whether a deferrable write that failed this way may be accepted for later: it did
/// not reach Klaviyo, or Klaviyo failed it (deferrable writes are safe to repeat).
fn may_defer(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::CircuitOpen { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::UpstreamThrottled { .. }
            | ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::Draining
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::metrics::RequestOutcome;
    use crate::spool::SPOOL_ID_HEADER;
    use crate::stack::idempotency::Idempotency;
    use crate::stack::step::Check;
    use crate::stack::testing;

    const EVENT: &str = r#"{"data":{"type":"event","attributes":{"properties":{}}}}"#;

    struct Fixture {
        proxy: Arc<Proxy>,
        calls: Arc<AtomicU32>,
        _dir: TempDir,
    }

    /// A spool file in a directory removed at the end of the test.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(extra: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("kp-defer-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spool.redb");
        let config =
            format!("[spool]\npath = {:?}\ndeferrable = [\"create_event\"]\n{extra}", path.display().to_string());
        Fixture { proxy: testing::proxy(&config), calls: Arc::new(AtomicU32::new(0)), _dir: TempDir(dir) }
    }

    /// Sends an event through the layer over an upstream answering `status` (or failing).
    async fn send(f: &Fixture, answer: Result<StatusCode, ProxyError>) -> Result<Response<ProxyBody>, ProxyError> {
        let calls = f.calls.clone();
        let answer = Arc::new(std::sync::Mutex::new(Some(answer)));
        let inner = tower::service_fn(move |_: Routed<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let answer = answer.lock().unwrap().take().expect("called once");
            async move {
                answer.map(|s| {
                    let mut r = Response::new(crate::body::full(Bytes::new()));
                    *r.status_mut() = s;
                    r
                })
            }
        });
        let req = Request::post("/api/events").body(Bytes::from_static(EVENT.as_bytes())).unwrap();
        let routed = Idempotency.check(testing::routed(&f.proxy, req)).unwrap();
        DeferLayer::new(f.proxy.clone()).layer(inner).oneshot(routed).await
    }

    #[tokio::test]
    async fn delivered_writes_pass_through_untouched() {
        let f = fixture("");
        let resp = send(&f, Ok(StatusCode::ACCEPTED)).await.unwrap();
        assert_eq!((resp.status(), resp.headers().get(SPOOL_ID_HEADER)), (StatusCode::ACCEPTED, None));
        assert_eq!(f.proxy.spool().unwrap().pending_len().unwrap(), 0);
    }

    #[tokio::test]
    async fn an_undeliverable_write_is_spooled_and_accepted() {
        let f = fixture("");
        let resp = send(&f, Err(ProxyError::UpstreamUnreachable)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(resp.headers().contains_key(SPOOL_ID_HEADER));
        let resp = send(&f, Ok(StatusCode::BAD_GATEWAY)).await.unwrap();
        assert!(resp.headers().contains_key(SPOOL_ID_HEADER));
        assert_eq!(f.proxy.spool().unwrap().pending_len().unwrap(), 2);
        // A client error is Klaviyo's final word: not spooled.
        assert!(matches!(send(&f, Err(ProxyError::BodyRead)).await, Err(ProxyError::BodyRead)));
        assert_eq!(f.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_instead_of_acknowledging() {
        let f = fixture("max_entries = 1\n");
        assert!(send(&f, Err(ProxyError::UpstreamUnreachable)).await.unwrap().headers().contains_key(SPOOL_ID_HEADER));
        for answer in [Err(ProxyError::UpstreamUnreachable), Ok(StatusCode::BAD_GATEWAY)] {
            let err = send(&f, answer).await.unwrap_err();
            assert!(matches!(err, ProxyError::SpoolFull { .. }), "{err:?}");
            let resp = err.into_response("rid");
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(resp.headers().contains_key("retry-after"));
        }
        // Under the kill switch too.
        let f = fixture("max_entries = 1\n[upstream]\nenabled = false\n");
        send(&f, Ok(StatusCode::OK)).await.unwrap();
        assert!(matches!(send(&f, Ok(StatusCode::OK)).await, Err(ProxyError::SpoolFull { .. })));
        assert_eq!(f.proxy.spool().unwrap().pending_len().unwrap(), 1);
    }

    #[tokio::test]
    async fn the_kill_switch_answers_without_calling_the_exchange() {
        let f = fixture("when_disabled = false\n[upstream]\nenabled = false\n");
        assert!(matches!(send(&f, Ok(StatusCode::OK)).await, Err(ProxyError::Disabled)));
        let f = fixture("[upstream]\nenabled = false\n");
        let resp = send(&f, Ok(StatusCode::OK)).await.unwrap();
        assert!(resp.headers().contains_key(SPOOL_ID_HEADER));
        assert_eq!(f.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_outcome_says_spooled() {
        let f = fixture("");
        let calls = f.calls.clone();
        let inner = tower::service_fn(move |_: Routed<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<Response<ProxyBody>, _>(ProxyError::UpstreamUnreachable) }
        });
        let req = Request::post("/api/events").body(Bytes::from_static(EVENT.as_bytes())).unwrap();
        let routed = Idempotency.check(testing::routed(&f.proxy, req)).unwrap();
        let record = routed.call.record.clone();
        DeferLayer::new(f.proxy.clone()).layer(inner).oneshot(routed).await.unwrap();
        assert_eq!(record.get().kind, RequestOutcome::Spooled);
    }

    /// Every queued request holds its stages' futures: one the spool would not take
    /// carries no spool state (a copy of the call and the spool write, 1.5 kB), only the
    /// exchange's future.
    #[tokio::test]
    async fn a_request_the_spool_would_not_take_carries_no_spool_state() {
        let f = fixture("");
        let inner = tower::service_fn(|_: Routed<Bytes>| async {
            Ok::<_, ProxyError>(Response::new(crate::body::full(Bytes::new())))
        });
        let mut svc = DeferLayer::new(f.proxy.clone()).layer(inner);
        let read = testing::routed(&f.proxy, Request::get("/api/accounts").body(Bytes::new()).unwrap());
        assert!(matches!(svc.call(read), Either::Inner { .. }));
        let req = Request::post("/api/events").body(Bytes::from_static(EVENT.as_bytes())).unwrap();
        let event = Idempotency.check(testing::routed(&f.proxy, req)).unwrap();
        assert!(matches!(svc.call(event), Either::Own { .. }), "a deferrable write keeps what the spool needs");
    }
}
