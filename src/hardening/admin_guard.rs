//! The admin listener's door: any web page the operator visits can send "simple"
//! cross-site requests (a form post, `text/plain`) to loopback, so writes must carry a
//! JSON content type (which needs a CORS preflight the admin never grants) and must not
//! come from another site; with `admin.token` every route but the probes needs it.

use http::{header, HeaderMap, Method, Uri};

use super::host::{HostPolicy, HostRefusal};
use super::token::bearer_matches;
use crate::error::ProxyError;

/// Why an admin request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// The `Host` is not one this listener answers to.
    Host(HostRefusal),
    /// `admin.token` is set and the request does not carry it.
    Token,
    /// `Origin` or `Sec-Fetch-Site` says another site sent it.
    CrossSite,
    /// A POST without a JSON content type.
    MediaType,
}

impl AdminRefusal {
    /// The JSON:API error the admin listener answers with.
    pub fn error(self) -> ProxyError {
        match self {
            AdminRefusal::Host(h) => crate::proxy::host_error(h),
            AdminRefusal::Token => ProxyError::AdminAuthRequired,
            AdminRefusal::CrossSite => ProxyError::CrossSite,
            AdminRefusal::MediaType => ProxyError::UnsupportedMediaType,
        }
    }
}

/// Routes that answer without the token: orchestrators' probes, which tell nothing.
const OPEN_PATHS: &[&str] = &["/live", "/ready"];

/// Checks one admin request against the host policy and the optional token.
pub fn check(
    hosts: &HostPolicy,
    token: Option<&[u8]>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), AdminRefusal> {
    hosts.check(uri, headers, false).map_err(AdminRefusal::Host)?;
    if let Some(token) = token {
        if !OPEN_PATHS.contains(&uri.path()) && !bearer_matches(headers.get(header::AUTHORIZATION), token) {
            return Err(AdminRefusal::Token);
        }
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if is_cross_site(headers) {
        return Err(AdminRefusal::CrossSite);
    }
    if *method == Method::POST && !is_json(headers) {
        return Err(AdminRefusal::MediaType);
    }
    Ok(())
}

/// `Sec-Fetch-Site` other than `same-origin`/`none` (typed by the user), or an
/// `Origin` that is not this very host: browsers send one or both on every
/// cross-origin write; curl and scripts send neither.
fn is_cross_site(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).map(|v: &http::HeaderValue| v.to_str().unwrap_or("\u{0}"));
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return true;
        }
    }
    let Some(origin) = text(header::ORIGIN) else { return false };
    let host = text(header::HOST).unwrap_or_default();
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    !authority.is_some_and(|a| !host.is_empty() && a.eq_ignore_ascii_case(host))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use AdminRefusal::*;

    fn run(
        method: Method,
        path: &str,
        token: Option<&[u8]>,
        pairs: &[(&'static str, &'static str)],
    ) -> Result<(), AdminRefusal> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        check(&HostPolicy::default(), token, &method, &path.parse().unwrap(), &h)
    }

    #[test]
    fn writes_need_json_and_same_site() {
        let json = ("content-type", "application/json; charset=utf-8");
        type Case<'a> = (Method, &'a [(&'static str, &'static str)], Result<(), AdminRefusal>);
        let cases: &[Case] = &[
            (Method::POST, &[json], Ok(())),
            (Method::POST, &[("content-type", "Application/JSON")], Ok(())),
            (Method::POST, &[], Err(MediaType)),
            (Method::POST, &[("content-type", "text/plain")], Err(MediaType)),
            (Method::POST, &[("content-type", "application/x-www-form-urlencoded")], Err(MediaType)),
            (Method::POST, &[("content-type", "application/jsonx")], Err(MediaType)),
            (Method::POST, &[json, ("origin", "http://evil.example")], Err(CrossSite)),
            (Method::POST, &[json, ("origin", "null")], Err(CrossSite)),
            (Method::POST, &[json, ("origin", "http://127.0.0.1:9090")], Ok(())),
            (Method::POST, &[json, ("origin", "http://127.0.0.1:3000")], Err(CrossSite)),
            (Method::POST, &[json, ("sec-fetch-site", "cross-site")], Err(CrossSite)),
            (Method::POST, &[json, ("sec-fetch-site", "same-site")], Err(CrossSite)),
            (Method::POST, &[json, ("sec-fetch-site", "same-origin")], Ok(())),
            (Method::POST, &[json, ("sec-fetch-site", "none")], Ok(())),
            (Method::DELETE, &[("origin", "http://evil.example")], Err(CrossSite)),
            (Method::DELETE, &[], Ok(())),
            (Method::GET, &[("origin", "http://evil.example")], Ok(())),
            (Method::POST, &[json, ("host", "evil.example")], Err(Host(HostRefusal::Unknown))),
        ];
        for (method, headers, want) in cases {
            assert_eq!(run(method.clone(), "/admin/reload", None, headers), *want, "{method} {headers:?}");
        }
    }

    #[test]
    fn token_guards_all_but_probes() {
        let t = Some(b"0123456789abcdef".as_slice());
        assert_eq!(run(Method::GET, "/metrics", t, &[]), Err(Token));
        assert_eq!(run(Method::GET, "/metrics", t, &[("authorization", "Bearer 0123456789abcdef")]), Ok(()));
        assert_eq!(run(Method::GET, "/health", t, &[("authorization", "Bearer nope")]), Err(Token));
        assert_eq!(run(Method::GET, "/live", t, &[]), Ok(()));
        assert_eq!(run(Method::GET, "/ready", t, &[]), Ok(()));
        assert_eq!(run(Method::GET, "/metrics", None, &[]), Ok(()));
    }
}
