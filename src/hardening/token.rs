//! Bearer tokens (`server.client_token`, `admin.token`): the scheme compared without
//! case (RFC 9110 §11.1), the token in constant time, its length included.

use http::HeaderValue;
use ring::digest::{digest, SHA256};

/// The shortest token accepted in the config: shorter ones can be guessed online.
pub const MIN_TOKEN_LEN: usize = 16;

/// Whether `given` (an `Authorization` or `Proxy-Authorization` value) is
/// `Bearer <token>`. Both sides are hashed first, so the comparison takes the same time
/// whatever the lengths and the common prefix.
pub fn bearer_matches(given: Option<&HeaderValue>, token: &[u8]) -> bool {
    let given = given.map(HeaderValue::as_bytes).unwrap_or_default();
    let presented = match given.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => given[7..].trim_ascii(),
        _ => b"\0not a bearer token".as_slice(),
    };
    let (a, b) = (digest(&SHA256, presented), digest(&SHA256, token));
    let diff = a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    diff == 0 && !given.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        let token = b"0123456789abcdef";
        let cases: &[(Option<&str>, bool)] = &[
            (Some("Bearer 0123456789abcdef"), true),
            (Some("bearer 0123456789abcdef"), true),
            (Some("BEARER   0123456789abcdef "), true),
            (Some("Bearer 0123456789abcdeF"), false),
            (Some("Bearer 0123456789abcde"), false),
            (Some("Bearer 0123456789abcdef0"), false),
            (Some("Basic 0123456789abcdef"), false),
            (Some("Bearer0123456789abcdef"), false),
            (Some("0123456789abcdef"), false),
            (Some("Bearer "), false),
            (Some(""), false),
            (None, false),
        ];
        for (given, want) in cases {
            let v = given.map(|g| HeaderValue::from_str(g).unwrap());
            assert_eq!(bearer_matches(v.as_ref(), token), *want, "{given:?}");
        }
    }
}
