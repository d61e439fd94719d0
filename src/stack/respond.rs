//! Every request gets an answer, an id, a count and one log line. A refusal from any
//! stage below becomes the JSON:API error the proxy answers itself; the request id is
//! the client's (`x-request-id`, up to 128 visible characters) or a fresh one.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::HeaderValue;
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{BoxFuture, Call, Here};
use crate::body::ProxyBody;
use crate::error::{Origin, ProxyError};
use crate::metrics::RequestOutcome;
use crate::proxy::{Proxy, REQUEST_ID_HEADER};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RespondLayer {
    proxy: Arc<Proxy>,
}

impl RespondLayer {
    /// The layer, counting in `proxy`'s metrics and reading its current config.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        RespondLayer { proxy }
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Respond { proxy: Here::new(self.proxy.clone()), inner }
    }
}

/// See [`RespondLayer`].
#[derive(Debug, Clone)]
pub struct Respond<S> {
    proxy: Here,
    inner: S,
}

impl<S, B> Service<Request<B>> for Respond<S>
where
    S: Service<Call<B>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The stages below are always ready; one that is not still gets its turn.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let started = Instant::now();
        // The client's id (visible ASCII, bounded) or a fresh one: a header value either
        // way, so answering with it costs no parsing and no allocation.
        let request_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .filter(|v| v.len() <= 128 && v.to_str().is_ok())
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_bytes(&crate::hardening::random::hex128_bytes())
                    .expect("hex digits are visible ASCII")
            });
        let method = req.method().clone();
        let (parts, body) = req.into_parts();
        let call = Call::new(parts, body, self.proxy.live());
        let record = call.record.clone();
        // Called here, not in the future: the stages below need no clone of their own.
        let answer = self.inner.call(call);
        let finish = Finish { proxy: self.proxy.clone(), request_id, method, record, started };
        Box::pin(Responding { answer, finish: Some(finish) })
    }
}

pin_project_lite::pin_project! {
    /// [`Respond`]'s future: the stages' answer, then [`Finish`]. Not an `async` block,
    /// which kept the stages' future twice (captured, and moved into its `.await`) in
    /// every queued request.
    struct Responding<F> {
        #[pin]
        answer: F,
        finish: Option<Finish>,
    }
}

impl<F: Future<Output = Result<Response<ProxyBody>, ProxyError>>> Future for Responding<F> {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.answer.poll(cx));
        Poll::Ready(Ok(this.finish.take().expect("polled after completion").answer(result)))
    }
}

/// What the answer needs besides the stages' result: the id, the log line's fields.
struct Finish {
    proxy: Here,
    request_id: HeaderValue,
    method: http::Method,
    record: super::Record,
    started: Instant,
}

impl Finish {
    /// The client's answer: the stages' response or the proxy's error, counted, logged
    /// and marked with the request id.
    fn answer(self, result: Result<Response<ProxyBody>, ProxyError>) -> Response<ProxyBody> {
        let Finish { proxy, request_id, method, record, started } = self;
        let mut outcome = record.get();
        let mut resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                outcome.error = Some(err.code());
                outcome.kind = match (&err, err.origin()) {
                    (ProxyError::UpstreamChallenged, _) => RequestOutcome::Challenged,
                    (_, Origin::Client) => RequestOutcome::Rejected,
                    (_, Origin::Upstream | Origin::Internal) => RequestOutcome::Failed,
                };
                err.into_response(id_str(&request_id))
            }
        };
        proxy.metrics().request(outcome.operation, outcome.tier, outcome.kind);
        tracing::info!(
            request_id = id_str(&request_id),
            %method,
            operation = outcome.operation,
            tier = outcome.tier,
            account = %proxy.metrics().account_name(outcome.account),
            status = resp.status().as_u16(),
            outcome = outcome.error.unwrap_or(outcome.kind.as_str()),
            queue_wait_ms = outcome.waited.as_millis() as u64,
            attempts = outcome.attempts,
            upstream_ms = outcome.upstream.map(|d| d.as_millis() as u64),
            total_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        resp.headers_mut().insert(REQUEST_ID_HEADER, request_id);
        resp
    }
}

/// A request id as text: checked to be visible ASCII when it was taken.
fn id_str(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::error::PROXY_ERROR_HEADER;
    use crate::stack::testing;

    fn ok(
        record_as: &'static str,
    ) -> impl Service<Call<()>, Response = Response<ProxyBody>, Error = ProxyError, Future: Send> + Clone + Send + 'static
    {
        tower::service_fn(move |call: Call<()>| async move {
            call.record.update(|o| (o.operation, o.tier) = (record_as, "XS"));
            Ok(Response::new(crate::body::full("fine")))
        })
    }

    #[tokio::test]
    async fn answers_get_the_clients_request_id_and_are_counted() {
        let proxy = testing::proxy("");
        let svc = RespondLayer::new(proxy.clone()).layer(ok("get_accounts"));
        let req = Request::get("/api/accounts").header(REQUEST_ID_HEADER, "abc-123").body(()).unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.headers()[REQUEST_ID_HEADER], "abc-123");
        let resp = svc.oneshot(Request::get("/api/accounts").body(()).unwrap()).await.unwrap();
        let fresh = resp.headers()[REQUEST_ID_HEADER].to_str().unwrap().to_string();
        assert_eq!(fresh.len(), 32);
        assert!(fresh.bytes().all(|b| b.is_ascii_hexdigit()));
        let text = proxy.metrics().encode(proxy.store());
        let line = text.lines().find(|l| l.contains("operation=\"get_accounts\"") && l.contains("forwarded"));
        assert!(line.is_some_and(|l| l.ends_with(" 2")), "{text}");
    }

    /// Every queued request holds respond's box: the stages' future must be in it
    /// once (an `async` block held it twice, captured and moved into its `.await`),
    /// beside the few fields of the log line.
    #[test]
    fn respond_holds_the_stages_future_once() {
        let proxy = testing::proxy("");
        let mut stages = tower::service_fn(|call: Call<()>| async move {
            let pad = [7u8; 512];
            tokio::task::yield_now().await;
            call.record.update(|o| o.attempts = u32::from(std::hint::black_box(pad)[0]));
            Ok::<_, ProxyError>(Response::new(crate::body::full("fine")))
        });
        let req = || Request::get("/api/accounts").body(()).unwrap();
        let stages_size = std::mem::size_of_val(&stages.call(testing::call(&proxy, req())));
        assert!(stages_size >= 512);
        let answer = RespondLayer::new(proxy.clone()).layer(stages).call(req());
        let size = std::mem::size_of_val(answer.as_ref().get_ref());
        assert!(size <= stages_size + 128, "respond's future is {size} bytes around {stages_size}");
    }

    #[tokio::test]
    async fn a_refusal_below_becomes_the_proxys_json_api_error() {
        let proxy = testing::proxy("");
        let refuse = tower::service_fn(|_: Call<()>| async { Err::<Response<ProxyBody>, _>(ProxyError::UnknownPath) });
        let long_id = "x".repeat(129);
        let req = Request::get("/nope").header(REQUEST_ID_HEADER, long_id.as_str()).body(()).unwrap();
        let resp = RespondLayer::new(proxy.clone()).layer(refuse).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(resp.headers().contains_key(PROXY_ERROR_HEADER));
        assert_ne!(resp.headers()[REQUEST_ID_HEADER], long_id.as_str(), "an over-long id is replaced");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["errors"][0]["status"], 404);
        let text = proxy.metrics().encode(proxy.store());
        assert!(text.lines().any(|l| l.contains("operation=\"unknown\"") && l.contains("rejected")), "{text}");
    }
}
