//! Never an open relay: a request is forwarded only to the configured upstream, only on
//! Klaviyo's API paths (see [`crate::hardening::target`]), for a `Host` it answers to
//! ([`crate::hardening::host`]), and never as a tunnel.

use std::sync::Arc;

use http::Method;

use super::step::Check;
use super::Call;
use crate::error::ProxyError;
use crate::hardening;
use crate::proxy::{host_error, Proxy};

/// Refuses `CONNECT`, absolute-form targets naming another host, and paths outside
/// `/api/` and `/client/`.
#[derive(Debug, Clone)]
pub struct Target {
    proxy: Arc<Proxy>,
}

impl Target {
    /// The check against `proxy`'s upstream.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Target { proxy }
    }
}

impl<B> Check<Call<B>> for Target {
    type Out = Call<B>;

    fn check(&self, call: Call<B>) -> Result<Call<B>, ProxyError> {
        let parts = &call.parts;
        if parts.method == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // HTTP/2's :authority names the proxy itself (it is HTTP/1's Host), so only an
        // HTTP/1 absolute-form target can ask for another host.
        let http1 = parts.version < http::Version::HTTP_2;
        if http1 && !self.proxy.upstream().is_upstream(&parts.uri) {
            return Err(ProxyError::ForeignHost);
        }
        // Only names we answer to: a web page rebinding its DNS name sends its own.
        call.live.hosts.check(&parts.uri, &parts.headers, http1).map_err(host_error)?;
        // Checked after percent-decoding: no spelling of `..` or `/` gets through.
        hardening::target::check_path(parts.uri.path()).map_err(|_| ProxyError::UnknownPath)?;
        Ok(call)
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;
    use crate::stack::testing;

    fn verdict(req: Request<()>) -> Result<(), ProxyError> {
        let proxy = testing::proxy("[upstream]\nurl = \"https://a.klaviyo.com\"\n");
        Target::new(proxy.clone()).check(testing::call(&proxy, req)).map(drop)
    }

    #[test]
    fn only_the_upstream_and_api_paths() {
        assert!(verdict(Request::get("/api/accounts").body(()).unwrap()).is_ok());
        assert!(verdict(Request::get("/api").body(()).unwrap()).is_ok());
        assert!(verdict(Request::post("/client/events?company_id=X").body(()).unwrap()).is_ok());
        assert!(verdict(Request::get("https://a.klaviyo.com/api/accounts").body(()).unwrap()).is_ok());
        assert!(matches!(
            verdict(Request::get("http://evil.example/api/accounts").body(()).unwrap()),
            Err(ProxyError::ForeignHost)
        ));
        assert!(matches!(verdict(Request::get("/admin").body(()).unwrap()), Err(ProxyError::UnknownPath)));
        assert!(matches!(verdict(Request::get("/api/x/../y").body(()).unwrap()), Err(ProxyError::UnknownPath)));
        assert!(matches!(verdict(Request::connect("a.klaviyo.com:443").body(()).unwrap()), Err(ProxyError::Connect)));
    }

    #[test]
    fn http2_authority_is_the_proxy_itself() {
        let req = Request::get("http://localhost:8080/api/accounts").version(http::Version::HTTP_2).body(()).unwrap();
        assert!(verdict(req).is_ok());
    }
}
