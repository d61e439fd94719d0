//! Hop-by-hop headers (RFC 9110 §7.6.1): they belong to one connection and never
//! cross the proxy. The client's are removed before the proxy adds anything of its
//! own, and a client's `Connection` may not name the headers the proxy adds or
//! relies on: that would strip the injected key (a 401 counted against the account
//! and a "key revoked" page) or the pinned revision.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

/// Headers that are always hop-by-hop. A static, not a const: a const array is built
/// (and dropped) again wherever it is used, here once per header of every message.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    crate::header::KEEP_ALIVE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    crate::header::PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What a client's `Connection` may never name.
const PROTECTED: &[&str] = &["authorization", "revision", "host", "x-request-id", "x-proxy-max-wait-ms"];

/// The options `Connection` values list, trimmed. Compared as text rather than parsed
/// into `HeaderName`s: the usual `keep-alive` would otherwise be copied into a new name
/// for every HTTP/1 answer, only to name a header that goes anyway.
fn tokens<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> impl Iterator<Item = &'a str> {
    values.filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty())
}

/// The index in [`HOP_BY_HOP`] of a name (in any case) that is one of the nine: by its
/// length first, so that at most one name is compared. It runs for every header of
/// every request and answer, and for each `Connection` token.
fn hop_index(name: &str) -> Option<usize> {
    let first = name.as_bytes().first().map(u8::to_ascii_lowercase);
    let i = match (name.len(), first) {
        (2, _) => 5,
        (7, Some(b't')) => 6,
        (7, _) => 8,
        (10, Some(b'c')) => 0,
        (10, _) => 1,
        (16, _) => 4,
        (17, _) => 7,
        (18, _) => 2,
        (19, _) => 3,
        _ => return None,
    };
    name.eq_ignore_ascii_case(HOP_BY_HOP[i].as_str()).then_some(i)
}

/// Whether a `Connection` token names one of the nine, which go whether named or not.
fn is_hop(token: &str) -> bool {
    hop_index(token).is_some()
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip(headers: &mut HeaderMap) {
    // One pass over the names first, noting which of the nine are there: most requests
    // and responses have none, and a removal by name hashes and probes the map (an
    // HTTP/1 upstream's `Connection: keep-alive` would otherwise cost ten removals).
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_index(name.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Only a `Connection` header names others (it is the first of the nine). Its values
    // are held apart (a count on their bytes) while the headers they name go.
    // The usual `Connection: keep-alive` names nothing more to remove.
    let names_more = |headers: &HeaderMap| tokens(headers.get_all(header::CONNECTION).iter()).any(|t| !is_hop(t));
    if present & 1 != 0 && names_more(headers) {
        let values: SmallVec<[HeaderValue; 1]> = headers.get_all(header::CONNECTION).iter().cloned().collect();
        for token in tokens(values.iter()).filter(|t| !is_hop(t)) {
            // Removal by text matches names case-insensitively; a token that is no
            // header name removes nothing.
            headers.remove(token);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// A client's `Connection` named a header the proxy must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedHeader(pub &'static str);

/// Strips a client request's hop-by-hop headers, refusing a `Connection` that names a
/// protected header (no sane client asks for its own credential to be dropped).
pub fn strip_client(headers: &mut HeaderMap) -> Result<(), ProtectedHeader> {
    if !headers.contains_key(header::CONNECTION) {
        strip(headers);
        return Ok(());
    }
    let protected = tokens(headers.get_all(header::CONNECTION).iter())
        .find_map(|t| PROTECTED.iter().copied().find(|p| t.eq_ignore_ascii_case(p)));
    if let Some(p) = protected {
        return Err(ProtectedHeader(p));
    }
    strip(headers);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn client_connection_lists() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<&'a [&'a str], &'a str>);
        let cases: &[Case] = &[
            (&[("connection", "keep-alive"), ("accept", "x")], Ok(&["accept"])),
            (&[("connection", "x-hop, close"), ("x-hop", "1"), ("accept", "x")], Ok(&["accept"])),
            // Named in any case, spaced any way; even `close` names a header.
            (&[("connection", " X-Hop ,,CLOSE"), ("x-hop", "1"), ("close", "1"), ("accept", "x")], Ok(&["accept"])),
            (&[("connection", "authorization")], Err("authorization")),
            (&[("connection", "keep-alive"), ("connection", " Authorization ")], Err("authorization")),
            (&[("connection", "REVISION"), ("revision", "2024-01-01")], Err("revision")),
            (&[("connection", "host")], Err("host")),
            (&[("connection", "x-request-id")], Err("x-request-id")),
            (&[("te", "trailers"), ("proxy-authorization", "Bearer t"), ("upgrade", "h2c")], Ok(&[])),
            (&[("connection", "not a header name, x-a"), ("x-a", "1")], Ok(&[])),
            // An HTTP/1 answer's usual set: each of the nine goes, named or not.
            (
                &[("connection", "keep-alive"), ("keep-alive", "timeout=5"), ("trailer", "x"), ("x-keep", "1")],
                Ok(&["x-keep"]),
            ),
            (&[("transfer-encoding", "chunked"), ("x-keep", "1"), ("proxy-connection", "close")], Ok(&["x-keep"])),
        ];
        for (given, want) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in *given {
                h.append(*k, HeaderValue::from_str(v).unwrap());
            }
            let got = strip_client(&mut h).map_err(|p| p.0);
            match want {
                Ok(left) => {
                    assert!(got.is_ok(), "{given:?}");
                    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
                    assert_eq!(&names, left, "{given:?}");
                }
                Err(name) => assert_eq!(got, Err(*name), "{given:?}"),
            }
        }
        let mut h = headers(&[("connection", "authorization"), ("authorization", "x")]);
        strip(&mut h);
        assert!(h.is_empty(), "responses: everything named goes");
    }

    #[test]
    fn the_index_by_text_agrees_with_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(name.as_str()), Some(i), "{name}");
            assert!(is_hop(name.as_str()) && is_hop(&name.as_str().to_ascii_uppercase()), "{name}");
        }
        for other in ["", "t", "tE-", "trailex", "connectioN2", "keep-alivf", "close", "x-hop"] {
            assert!(!is_hop(other), "{other}");
        }
        for other in [header::HOST, header::CONTENT_LENGTH, HeaderName::from_static("connections")] {
            assert_eq!(hop_index(other.as_str()), None, "{other}");
        }
    }
}
