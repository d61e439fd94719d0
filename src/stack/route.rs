//! What a request is for the limiter: operation, account and buckets (from method,
//! path, query, revision and the credential that will go upstream), and how long the
//! client is willing to wait for its turn.

use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use super::step::Check;
use super::{Call, Routed};
use crate::error::ProxyError;
use crate::proxy::Live;
use crate::retry::Repeat;
use crate::upstream::MAX_WAIT_HEADER;

/// Routes the call and sets its deadline; it never refuses.
#[derive(Debug, Clone, Copy)]
pub struct RouteStep;

impl<B> Check<Call<B>> for RouteStep {
    type Out = Routed<B>;

    fn check(&self, call: Call<B>) -> Result<Routed<B>, ProxyError> {
        let route = call.live.route(&call.parts, call.resolved);
        call.record.update(|o| (o.operation, o.tier, o.account) = (route.label(), route.tier(), route.account));
        let deadline = deadline(&call.live, &call.parts.headers);
        // Conservative until the idempotency stage has seen the body.
        Ok(Routed { call, route, deadline, repeat: Repeat::OnlyIfUnsent, unique_id: None, observed: None })
    }
}

/// `queue.max_wait_ms` from now, or sooner when the client asks (`x-proxy-max-wait-ms`).
fn deadline(live: &Live, headers: &HeaderMap) -> Instant {
    let configured = live.config.queue.max_wait_ms;
    let asked = headers.get(MAX_WAIT_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    Instant::now() + Duration::from_millis(asked.map_or(configured, |a| a.min(configured)))
}

#[cfg(test)]
mod tests {
    use http::Request;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::limiter::BucketId;
    use crate::stack::step::StepLayer;
    use crate::stack::testing;

    async fn routed(config: &str, req: Request<()>) -> (Routed<()>, crate::stack::Outcome) {
        let proxy = testing::proxy(config);
        let call = testing::call(&proxy, req);
        let record = call.record.clone();
        let inner = tower::service_fn(|r: Routed<()>| async move { Ok::<_, ProxyError>(r) });
        let r = StepLayer::new(RouteStep).layer(inner).oneshot(call).await.unwrap();
        (r, record.get())
    }

    #[tokio::test(start_paused = true)]
    async fn names_the_operation_for_the_log_and_takes_the_endpoint_bucket() {
        let req = Request::get("/api/profiles/1?include=lists").header("authorization", "k").body(()).unwrap();
        let (r, outcome) = routed("", req).await;
        assert_eq!((r.route.label(), outcome.operation, outcome.tier), ("get_profile", "get_profile", r.route.tier()));
        assert_eq!(r.route.demands.len(), 2, "the include=lists condition adds a bucket");
        assert_eq!(r.repeat, Repeat::OnlyIfUnsent);
        let (u, outcome) = routed("", Request::get("/api/brand-new").body(()).unwrap()).await;
        assert_eq!((u.route.demands[0].key.bucket, outcome.operation), (BucketId::Unknown, "unknown"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_client_may_shorten_the_wait_but_not_lengthen_it() {
        let config = "[queue]\nmax_wait_ms = 5000\n";
        let start = Instant::now();
        let (r, _) = routed(config, Request::get("/api/accounts").body(()).unwrap()).await;
        assert_eq!(r.deadline - start, Duration::from_millis(5000));
        let short = Request::get("/api/accounts").header(MAX_WAIT_HEADER, "250").body(()).unwrap();
        assert_eq!(routed(config, short).await.0.deadline - start, Duration::from_millis(250));
        let long = Request::get("/api/accounts").header(MAX_WAIT_HEADER, "99999").body(()).unwrap();
        assert_eq!(routed(config, long).await.0.deadline - start, Duration::from_millis(5000));
    }
}
