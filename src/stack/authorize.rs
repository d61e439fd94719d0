//! The credential that goes upstream decides whose quota is spent: in inject mode the
//! proxy adds its own key, and refuses client keys unless `auth.allow_client_keys`.

use http::header;

use super::step::Check;
use super::Call;
use crate::error::ProxyError;
use crate::hardening::hop;

/// Adds the injected key (inject mode), or refuses a client's own key where forbidden.
#[derive(Debug, Clone, Copy)]
pub struct Authorize;

impl<B> Check<Call<B>> for Authorize {
    type Out = Call<B>;

    fn check(&self, mut call: Call<B>) -> Result<Call<B>, ProxyError> {
        // The client's hop-by-hop headers go before anything of ours is added, and its
        // `Connection` may not name what we add (it would strip the injected key).
        hop::strip_client(&mut call.parts.headers)
            .map_err(|p| ProxyError::BadRequest(format!("Connection may not name {}", p.0)))?;
        let Some(ours) = &call.live.injected_auth else { return Ok(call) };
        let headers = &mut call.parts.headers;
        if headers.contains_key(header::AUTHORIZATION) {
            if !call.live.config.auth.allow_client_keys {
                return Err(ProxyError::ClientKeyForbidden);
            }
        } else {
            headers.insert(header::AUTHORIZATION, ours.clone());
        }
        Ok(call)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, Request};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::stack::step::StepLayer;
    use crate::stack::testing;

    /// The `Authorization` the inner service sees.
    async fn sent(config: &str, client_key: Option<&str>) -> Result<Option<HeaderValue>, ProxyError> {
        let proxy = testing::proxy(config);
        let mut req = Request::get("/api/accounts");
        if let Some(k) = client_key {
            req = req.header("authorization", k);
        }
        let inner = tower::service_fn(|c: Call<()>| async move {
            Ok::<_, ProxyError>(c.parts.headers.get("authorization").cloned())
        });
        StepLayer::new(Authorize).layer(inner).oneshot(testing::call(&proxy, req.body(()).unwrap())).await
    }

    const INJECT: &str = "[auth]\nmode = \"inject\"\n";

    #[tokio::test]
    async fn connection_cannot_name_the_key() {
        let proxy = testing::proxy(INJECT);
        let req = Request::get("/api/accounts").header("connection", "authorization").body(()).unwrap();
        let inner = tower::service_fn(|_: Call<()>| async { Ok::<_, ProxyError>(()) });
        let got = StepLayer::new(Authorize).layer(inner).oneshot(testing::call(&proxy, req)).await;
        assert!(matches!(got, Err(ProxyError::BadRequest(_))));
    }

    #[tokio::test]
    async fn pass_through_leaves_the_clients_key() {
        assert_eq!(sent("", Some("Klaviyo-API-Key pk_client")).await.unwrap().unwrap(), "Klaviyo-API-Key pk_client");
        assert_eq!(sent("", None).await.unwrap(), None);
    }

    #[tokio::test]
    async fn inject_adds_ours_marked_sensitive_and_may_refuse_client_keys() {
        let ours = sent(INJECT, None).await.unwrap().unwrap();
        assert_eq!(ours, format!("Klaviyo-API-Key {}", testing::INJECTED_KEY).as_str());
        assert!(ours.is_sensitive());
        assert_eq!(sent(INJECT, Some("Klaviyo-API-Key pk_c")).await.unwrap().unwrap(), "Klaviyo-API-Key pk_c");
        let forbidden = format!("{INJECT}allow_client_keys = false\n");
        assert!(matches!(sent(&forbidden, Some("Klaviyo-API-Key pk_c")).await, Err(ProxyError::ClientKeyForbidden)));
    }
}
