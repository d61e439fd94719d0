//! Only what Klaviyo should see leaves the proxy: hop-by-hop and proxy-only headers
//! and `Host` are dropped, `revision` is added when the client sent none.

use super::step::Check;
use super::Routed;
use crate::error::ProxyError;
use crate::upstream;

/// Prepares the request head for the upstream; it never refuses.
#[derive(Debug, Clone, Copy)]
pub struct Outbound;

impl<B> Check<Routed<B>> for Outbound {
    type Out = Routed<B>;

    fn check(&self, mut routed: Routed<B>) -> Result<Routed<B>, ProxyError> {
        let call = &mut routed.call;
        upstream::outbound_headers(&mut call.parts.headers, call.live.config.upstream.revision.as_str());
        Ok(routed)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Request};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::stack::step::StepLayer;
    use crate::stack::testing;

    #[tokio::test]
    async fn the_inner_service_sees_only_upstream_headers() {
        let proxy = testing::proxy("[upstream]\nrevision = \"2026-07-15\"\n");
        let req = Request::get("/api/accounts")
            .header("host", "localhost:8080")
            .header("proxy-authorization", "Bearer t")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header(upstream::MAX_WAIT_HEADER, "10")
            .header("accept", "application/json")
            .body(())
            .unwrap();
        let inner = tower::service_fn(|r: Routed<()>| async move { Ok::<HeaderMap, ProxyError>(r.call.parts.headers) });
        let headers = StepLayer::new(Outbound).layer(inner).oneshot(testing::routed(&proxy, req)).await.unwrap();
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "revision"]);
        assert_eq!(headers["revision"], "2026-07-15");
    }
}
