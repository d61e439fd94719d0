//! Single events become bulk jobs ([`crate::coalesce`]): with `coalesce.events` on, a
//! `create_event` that carries a credential is checked, stored durably and answered
//! `202` with an empty body — what Klaviyo answers — and never reaches the exchange.
//! Anything else passes through.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use tower::{Layer, Service};

use super::{Either, Routed};
use crate::body::ProxyBody;
use crate::coalesce::COALESCED;
use crate::error::{ProxyError, PROXY_ERROR_HEADER};
use crate::metrics::RequestOutcome;
use crate::proxy::Proxy;
use crate::spool::SPOOL_ID_HEADER;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct CoalesceLayer {
    proxy: Arc<Proxy>,
}

impl CoalesceLayer {
    /// The layer, storing into `proxy`'s coalescer (when it has one).
    pub fn new(proxy: Arc<Proxy>) -> Self {
        CoalesceLayer { proxy }
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce { proxy: self.proxy.clone(), inner }
    }
}

/// See [`CoalesceLayer`].
#[derive(Debug, Clone)]
pub struct Coalesce<S> {
    proxy: Arc<Proxy>,
    inner: S,
}

/// Whether the coalescer takes this request: `create_event` with a credential
/// (without one, Klaviyo's own 401 is the answer).
fn takes(routed: &Routed<Bytes>) -> bool {
    routed.route.operation.is_some_and(|o| o.id == "create_event")
        && routed.call.parts.headers.contains_key(header::AUTHORIZATION)
}

impl<S> Service<Routed<Bytes>> for Coalesce<S>
where
    S: Service<Routed<Bytes>, Response = Response<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed<Bytes>) -> Self::Future {
        let Some(coalescer) = self.proxy.coalescer().filter(|_| takes(&routed)).cloned() else {
            return Either::Inner { future: self.inner.call(routed) };
        };
        let future = Box::pin(async move {
            let id = coalescer.accept(&routed.call.parts.headers, &routed.call.body).await?;
            routed.call.record.update(|o| o.kind = RequestOutcome::Spooled);
            let mut resp = Response::new(crate::body::full(Bytes::new()));
            *resp.status_mut() = StatusCode::ACCEPTED;
            resp.headers_mut().insert(SPOOL_ID_HEADER, HeaderValue::from(id));
            resp.headers_mut().insert(PROXY_ERROR_HEADER, HeaderValue::from_static(COALESCED));
            Ok(resp)
        });
        Either::Own { future }
    }
}

#[cfg(test)]
mod tests {
    use http::Request;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::stack::testing;

    const EVENT: &str = r#"{"data":{"type":"event","attributes":{"properties":{},"metric":{"data":{"type":"metric","attributes":{"name":"M"}}},"profile":{"data":{"type":"profile","attributes":{"email":"a@example.com"}}}}}}"#;

    async fn answer(proxy: &Arc<Proxy>, req: Request<Bytes>) -> (StatusCode, bool) {
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        let inner = tower::service_fn(move |_: Routed<Bytes>| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, ProxyError>(Response::new(crate::body::full(Bytes::new()))) }
        });
        let routed = testing::routed(proxy, req);
        let status = match CoalesceLayer::new(proxy.clone()).layer(inner).oneshot(routed).await {
            Ok(resp) => resp.status(),
            Err(e) => e.status(),
        };
        (status, reached.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn event(body: &str, key: bool) -> Request<Bytes> {
        let mut req = Request::post("/api/events").header("revision", "2026-07-15");
        if key {
            req = req.header("authorization", "Klaviyo-API-Key pk_stage");
        }
        req.body(Bytes::from(body.to_string())).unwrap()
    }

    #[tokio::test]
    async fn takes_credentialed_events_only_and_only_when_on() {
        let dir = std::env::temp_dir().join(format!("kp-stage-coalesce-{}", fastrand::u64(..)));
        let on = testing::proxy(&format!(
            "[spool]\npath = \"{}\"\n[coalesce]\nevents = true\n",
            dir.join("spool.redb").display()
        ));
        assert_eq!(answer(&on, event(EVENT, true)).await, (StatusCode::ACCEPTED, false));
        assert_eq!(answer(&on, event("{}", true)).await, (StatusCode::BAD_REQUEST, false), "checked, refused");
        assert_eq!(answer(&on, event(EVENT, false)).await, (StatusCode::OK, true), "no key: Klaviyo's 401");
        let profile = Request::get("/api/profiles").header("authorization", "Klaviyo-API-Key pk_stage");
        assert_eq!(answer(&on, profile.body(Bytes::new()).unwrap()).await, (StatusCode::OK, true));
        let off = testing::proxy("");
        assert_eq!(answer(&off, event(EVENT, true)).await, (StatusCode::OK, true));
        let _ = std::fs::remove_dir_all(dir);
    }
}
