//! The `Host` a request names (HTTP/1's `Host`, HTTP/2's `:authority`): a web page
//! that rebinds its DNS name to the proxy's address sends its own name, so only
//! names the proxy knows are served. IP literals are served too: a page cannot make
//! a browser send one for a name it controls.

use http::{header, HeaderMap, Uri};

/// The names a listener answers to: `localhost` and the configured public names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    names: Vec<String>,
}

/// Why a request's host is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRefusal {
    /// Not a name this listener answers to.
    Unknown,
    /// More than one `Host`, or one that is not text.
    Malformed,
}

impl HostPolicy {
    /// A policy answering to `localhost`, IP literals and `allowed` (names without port,
    /// compared case-insensitively).
    pub fn new<S: AsRef<str>>(allowed: &[S]) -> Self {
        HostPolicy { names: allowed.iter().map(|n| n.as_ref().trim_end_matches('.').to_ascii_lowercase()).collect() }
    }

    /// Whether `authority` (`host[:port]`) names this listener.
    pub fn allows(&self, authority: &str) -> bool {
        let Some(host) = host_of(authority) else { return false };
        // Compared without a lower-cased copy: this runs for every request.
        let host = host.trim_end_matches('.');
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<std::net::IpAddr>().is_ok()
            || self.names.iter().any(|n| n.eq_ignore_ascii_case(host))
    }

    /// Checks a request: the target's authority when it has one (HTTP/2, or an HTTP/1
    /// absolute-form target, which the caller checks against the upstream instead when
    /// `skip_absolute`), else the `Host` header. No host at all is allowed: browsers
    /// always send one.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap, skip_absolute: bool) -> Result<(), HostRefusal> {
        if let Some(authority) = uri.authority() {
            return match skip_absolute || self.allows(authority.as_str()) {
                true => Ok(()),
                false => Err(HostRefusal::Unknown),
            };
        }
        let mut hosts = headers.get_all(header::HOST).iter();
        let (Some(host), None) = (hosts.next(), hosts.next()) else {
            return match headers.contains_key(header::HOST) {
                true => Err(HostRefusal::Malformed),
                false => Ok(()),
            };
        };
        match host.to_str() {
            Ok(h) if self.allows(h) => Ok(()),
            Ok(_) => Err(HostRefusal::Unknown),
            Err(_) => Err(HostRefusal::Malformed),
        }
    }
}

/// The host part of `host[:port]` or `[v6][:port]`; `None` when malformed.
fn host_of(authority: &str) -> Option<&str> {
    if authority.contains('@') {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(is_port)).then_some(v6);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if is_port(port) && !host.contains(':') => Some(host).filter(|h| !h.is_empty()),
        Some(_) => None,
        None => Some(authority).filter(|h| !h.is_empty()),
    }
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hosts() {
        let policy = HostPolicy::new(&["Proxy.Internal", "klaviyo-proxy."]);
        let cases = [
            ("localhost", true),
            ("localhost:8080", true),
            ("LOCALHOST.:8080", true),
            ("127.0.0.1:8080", true),
            ("10.1.2.3", true),
            ("[::1]:8080", true),
            ("[::1]", true),
            ("[::FFFF:7F00:1]:8080", true),
            ("PROXY.INTERNAL", true),
            ("proxy.internal:443", true),
            ("klaviyo-proxy", true),
            ("evil.example:8080", false),
            ("evil.example", false),
            ("localhost.evil.example", false),
            ("proxy.internal.evil.example", false),
            ("127.0.0.1.evil.example", false),
            ("user@localhost", false),
            ("localhost:80:80", false),
            ("localhost:", false),
            ("localhost:port", false),
            ("[::1", false),
            ("[::1]x", false),
            ("", false),
            (":8080", false),
        ];
        for (host, want) in cases {
            assert_eq!(policy.allows(host), want, "{host}");
        }
    }

    #[test]
    fn requests() {
        let policy = HostPolicy::default();
        let mut h = HeaderMap::new();
        let origin: Uri = "/api/accounts".parse().unwrap();
        assert_eq!(policy.check(&origin, &h, false), Ok(()));
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert_eq!(policy.check(&origin, &h, false), Err(HostRefusal::Unknown));
        h.insert(header::HOST, HeaderValue::from_static("localhost:1"));
        assert_eq!(policy.check(&origin, &h, false), Ok(()));
        h.append(header::HOST, HeaderValue::from_static("localhost:2"));
        assert_eq!(policy.check(&origin, &h, false), Err(HostRefusal::Malformed));
        let h2: Uri = "http://evil.example/api/accounts".parse().unwrap();
        assert_eq!(policy.check(&h2, &HeaderMap::new(), false), Err(HostRefusal::Unknown));
        assert_eq!(policy.check(&h2, &HeaderMap::new(), true), Ok(()));
        let h2: Uri = "http://127.0.0.1:8080/api/accounts".parse().unwrap();
        assert_eq!(policy.check(&h2, &HeaderMap::new(), false), Ok(()));
    }
}
