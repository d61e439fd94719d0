//! Hop-by-hop headers (RFC 9110 §7.6.1): they belong to one connection and never
//! cross the proxy. The client's are removed before the proxy adds anything of its
//! own, and a client's `Connection` may not name the headers the proxy adds or
//! relies on: that would strip the injected key (a 401 counted against the account
//! and a "key revoked" page) or the pinned revision.

use http::header::{self, HeaderMap, HeaderName};

/// Headers that are always hop-by-hop.
const HOP_BY_HOP: [HeaderName; 9] = [
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

/// The names a `Connection` header lists (lower-cased by `HeaderName`).
fn connection_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip(headers: &mut HeaderMap) {
    // One pass over the names first, noting which of the nine are there: most requests
    // and responses have none, and a removal by name hashes and probes the map (an
    // HTTP/1 upstream's `Connection: keep-alive` would otherwise cost ten removals).
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Only a `Connection` header names others (it is the first of the nine).
    if present & 1 != 0 {
        for name in connection_names(headers) {
            headers.remove(name);
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
    if let Some(p) = connection_names(headers).iter().find_map(|n| PROTECTED.iter().find(|p| *p == n)) {
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
}
