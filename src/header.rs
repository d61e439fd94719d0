//! Header names the request path reads or writes on every request, parsed once: a
//! `&str` name is parsed, lower-case checked and hashed again on every lookup.

use http::{HeaderMap, HeaderName};

/// The API revision a request asks for (Klaviyo's versioning header).
pub const REVISION: HeaderName = HeaderName::from_static("revision");
/// Klaviyo's quota for the bucket that answered.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// Klaviyo's count of what is left of that quota.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// Seconds until Klaviyo's window resets.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
/// Hop-by-hop (RFC 9112 §9.6's obsolete `Keep-Alive`).
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Hop-by-hop (sent by old clients instead of `Connection`).
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Klaviyo's `RateLimit-*` headers of one answer, as integers (each `None` when absent
/// or not an integer; the first value of a name counts). Read in one pass over the
/// answer's headers: a lookup by name would hash each of the three long names again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// `RateLimit-Limit`: the quota of the bucket that answered.
    pub limit: Option<i64>,
    /// `RateLimit-Remaining`: what is left of it.
    pub remaining: Option<i64>,
    /// `RateLimit-Reset`: seconds until the window resets.
    pub reset: Option<i64>,
}

impl RateLimit {
    /// Reads the three headers of `headers`.
    pub fn read(headers: &HeaderMap) -> RateLimit {
        let mut rate = RateLimit::default();
        let mut seen = 0u8;
        for (name, value) in headers {
            let (bit, slot) = match name.as_str() {
                "ratelimit-limit" => (1, &mut rate.limit),
                "ratelimit-remaining" => (2, &mut rate.remaining),
                "ratelimit-reset" => (4, &mut rate.reset),
                _ => continue,
            };
            if seen & bit == 0 {
                seen |= bit;
                *slot = int(value.as_bytes());
            }
        }
        rate
    }
}

/// An integer header value, spaces around it allowed. On bytes: `str::trim` asks about
/// Unicode whitespace at both ends, and a header value can only hold ASCII spaces there.
pub(crate) fn int(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value.trim_ascii()).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn the_three_headers_are_read_in_one_pass_as_lookups_by_name_would() {
        let mut h = HeaderMap::new();
        h.append("content-type", "application/json".parse().unwrap());
        h.append("ratelimit-remaining", " 42 ".parse().unwrap());
        h.append("ratelimit-limit", "oops".parse().unwrap());
        h.append("ratelimit-limit", "700".parse().unwrap());
        h.append("ratelimit-remaining", "7".parse().unwrap());
        let rate = RateLimit::read(&h);
        let by_name = |n: HeaderName| h.get(n).and_then(|v| v.to_str().ok()?.trim().parse().ok());
        assert_eq!(rate, RateLimit { limit: None, remaining: Some(42), reset: None });
        assert_eq!(
            (rate.limit, rate.remaining, rate.reset),
            (by_name(RATELIMIT_LIMIT), by_name(RATELIMIT_REMAINING), by_name(RATELIMIT_RESET))
        );
        h.insert("ratelimit-reset", "-3".parse().unwrap());
        assert_eq!(RateLimit::read(&h).reset, Some(-3));
        h.insert("ratelimit-reset", "\t60 ".parse().unwrap());
        assert_eq!(RateLimit::read(&h).reset, Some(60));
        h.insert("ratelimit-reset", HeaderValue::from_bytes(b"6\xff0").unwrap());
        assert_eq!(RateLimit::read(&h).reset, None);
        assert_eq!(RateLimit::read(&HeaderMap::new()), RateLimit::default());
    }
}
