//! Off loopback, clients prove they may use the proxy: `server.client_token`, sent as
//! `Proxy-Authorization: Bearer <token>`.

use http::header;

use super::step::Check;
use super::Call;
use crate::error::ProxyError;
use crate::hardening::token::bearer_matches;

/// Refuses a request without the configured client token (none configured: all pass).
#[derive(Debug, Clone, Copy)]
pub struct ClientToken;

impl<B> Check<Call<B>> for ClientToken {
    type Out = Call<B>;

    fn check(&self, call: Call<B>) -> Result<Call<B>, ProxyError> {
        let Some(token) = &call.live.client_token else { return Ok(call) };
        let given = call.parts.headers.get(header::PROXY_AUTHORIZATION);
        if bearer_matches(given, token.expose().as_bytes()) {
            Ok(call)
        } else {
            Err(ProxyError::ProxyAuthRequired)
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Request;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::stack::step::StepLayer;
    use crate::stack::testing;

    async fn status(config: &str, token: Option<&str>) -> Result<(), ProxyError> {
        let proxy = testing::proxy(config);
        let mut req = Request::get("/api/accounts");
        if let Some(t) = token {
            req = req.header("proxy-authorization", t);
        }
        let inner = tower::service_fn(|_: Call<()>| async { Ok::<_, ProxyError>(()) });
        StepLayer::new(ClientToken).layer(inner).oneshot(testing::call(&proxy, req.body(()).unwrap())).await
    }

    #[tokio::test]
    async fn the_token_is_required_only_when_configured() {
        let with = "[server]\nclient_token = \"s3cret-token-value\"\n";
        assert!(status("", None).await.is_ok());
        assert!(status(with, Some("Bearer s3cret-token-value")).await.is_ok());
        assert!(matches!(status(with, None).await, Err(ProxyError::ProxyAuthRequired)));
        assert!(matches!(status(with, Some("Bearer s3cret-token-valuX")).await, Err(ProxyError::ProxyAuthRequired)));
        assert!(matches!(status(with, Some("s3cret-token-value")).await, Err(ProxyError::ProxyAuthRequired)));
        // The scheme is case-insensitive (RFC 9110 §11.1).
        assert!(status(with, Some("bearer s3cret-token-value")).await.is_ok());
    }
}
