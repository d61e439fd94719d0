//! The production checklist's view of each request (src/checklist): the head is
//! counted once routed (client, revision, operation), `auth.allowed_scopes` refuses
//! what it does not grant, and the answer the app gets is recorded on the way out.
//! [`InspectBody`] reads the buffered body of the operations that carry events or
//! profiles, off the request unless `checks.phone_e164 = "reject"`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use tower::{Layer, Service};

use super::step::{Check, StepFuture};
use super::{Here, Record, Routed};
use crate::body::ProxyBody;
use crate::checklist::{self, Observation};
use crate::error::ProxyError;
use crate::proxy::Proxy;

/// Counts routed requests and their answers in `proxy`'s checklist.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    proxy: Arc<Proxy>,
}

impl ObserveLayer {
    /// The layer for `proxy`'s checklist.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        ObserveLayer { proxy }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { proxy: Here::new(self.proxy.clone()), inner }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    proxy: Here,
    inner: S,
}

impl<S, B> Service<Routed<B>> for Observe<S>
where
    S: Service<Routed<B>, Response = Response<ProxyBody>, Error = ProxyError> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut routed: Routed<B>) -> Self::Future {
        let proxy = self.proxy.clone();
        let seen = proxy.checklist().observe(&routed.route, &routed.call.parts.headers);
        // The body stage below shows it the body.
        routed.observed = Some(seen.clone());
        let record = routed.call.record.clone();
        let answer = match checklist::check_scopes(&routed.call.live.config.auth, &routed.route) {
            Ok(()) => StepFuture::Inner { future: self.inner.call(routed) },
            Err(e) => StepFuture::Refused { error: Some(e) },
        };
        Observed { answer, seen: Some(seen), proxy, record }
    }
}

pin_project_lite::pin_project! {
    /// [`Observe`]'s future: the inner one inline, not boxed (every queued request
    /// holds one; a box of its own was 600 bytes more each), and the answer recorded
    /// on the way out.
    pub struct Observed<F> {
        #[pin]
        answer: StepFuture<F>,
        seen: Option<Observation>,
        proxy: Here,
        record: Record,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.answer.poll(cx));
        // What the app gets: this response, or the error the respond stage turns into one.
        let (status, code) = match &result {
            Ok(resp) => (resp.status().as_u16(), None),
            Err(e) => (e.status().as_u16(), Some(e.code())),
        };
        if let Some(seen) = this.seen.take() {
            seen.finish(this.proxy.checklist(), status, code, this.record.get().waited);
        }
        Poll::Ready(result)
    }
}

/// Reads the buffered body for the checklist (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct InspectBody;

impl Check<Routed<Bytes>> for InspectBody {
    type Out = Routed<Bytes>;

    fn check(&self, mut routed: Routed<Bytes>) -> Result<Routed<Bytes>, ProxyError> {
        // Taken: nothing below needs it, and a queued request should not hold it.
        if let Some(seen) = routed.observed.take() {
            seen.inspect(routed.call.live.config.checks.phone_e164, &routed.call.body)?;
        }
        Ok(routed)
    }
}

#[cfg(test)]
mod tests {
    use http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing;

    fn report(proxy: &Proxy) -> serde_json::Value {
        serde_json::to_value(crate::checklist::admin::report(proxy)).unwrap()
    }

    #[tokio::test]
    async fn counts_the_head_and_the_answer_and_refuses_outside_the_scopes() {
        let proxy = testing::proxy("[auth]\nallowed_scopes = [\"accounts:read\"]\n");
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_: Routed<()>| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, ProxyError>(Response::new(crate::body::full("ok"))) }
        });
        let svc = ObserveLayer::new(proxy.clone()).layer(inner);
        let req = |path: &str| {
            let req = Request::get(path).header("authorization", "Klaviyo-API-Key pk_x").header("user-agent", "curl/8");
            testing::routed(&proxy, req.body(()).unwrap())
        };
        assert_eq!(svc.clone().oneshot(req("/api/accounts")).await.unwrap().status(), 200);
        let refused = svc.oneshot(req("/api/profiles")).await.unwrap_err();
        assert_eq!(refused.code(), "proxy_scope_forbidden");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "a refused call goes no further");
        let r = report(&proxy);
        let account = &r["accounts"][0];
        assert_eq!(account["requests"], 2);
        let scopes = account["items"].as_array().unwrap().iter().find(|i| i["id"] == "least_privilege").unwrap();
        assert_eq!((&scopes["light"], &scopes["details"]["refused"]), (&"red".into(), &1.into()), "{scopes}");
        assert!(r.to_string().contains("curl/8"));
    }

    #[tokio::test]
    async fn reject_mode_refuses_a_bad_phone_number_before_the_exchange() {
        let proxy = testing::proxy("[checks]\nphone_e164 = \"reject\"\n");
        let body = r#"{"data":{"type":"profile","attributes":{"phone_number":"555 0100"}}}"#;
        let req = Request::post("/api/profiles").header("authorization", "k").body(()).unwrap();
        let mut routed = testing::routed(&proxy, req);
        routed.observed = Some(proxy.checklist().observe(&routed.route, &routed.call.parts.headers));
        let (routed, ()) = routed.swap_body(Bytes::from(body));
        let e = InspectBody.check(routed).unwrap_err();
        assert_eq!((e.code(), e.pointer()), ("proxy_phone_not_e164", Some("/data/attributes/phone_number")));
    }
}
