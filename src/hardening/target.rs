//! The request target: only Klaviyo's API paths, checked after percent-decoding, so
//! that no spelling of `..` or `/` reaches Klaviyo with the proxy's key.

/// Why a path is refused (for logs; the client sees `proxy_unknown_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Not under `/api/` or `/client/`.
    Outside,
    /// A `.` or `..` segment, plain or percent-encoded.
    DotSegment,
    /// `//` inside the path.
    EmptySegment,
    /// `/` or `\` encoded inside a segment, a raw `\`, or a control character.
    EncodedSeparator,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

/// Checks a request path (without query) for forwarding. Accepted: `/api`, and paths
/// whose first segment is literally `api` or `client` followed by segments that,
/// decoded, are neither empty (a trailing `/` is fine: Klaviyo's paths end with one),
/// nor `.`/`..`, nor contain `/`, `\` or a control character.
pub fn check_path(path: &str) -> Result<(), PathRefusal> {
    if path == "/api" {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix("/api/").or_else(|| path.strip_prefix("/client/")) else {
        return Err(PathRefusal::Outside);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            if i == last {
                continue;
            }
            return Err(PathRefusal::EmptySegment);
        }
        let decoded = decode(segment)?;
        if decoded == b"." || decoded == b".." {
            return Err(PathRefusal::DotSegment);
        }
        if decoded.iter().any(|&b| b == b'/' || b == b'\\' || b.is_ascii_control()) {
            return Err(PathRefusal::EncodedSeparator);
        }
    }
    Ok(())
}

/// Percent-decodes one segment (once: `%252e` stays `%2e`, which Klaviyo reads as text).
fn decode(segment: &str) -> Result<Vec<u8>, PathRefusal> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathRefusal::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathRefusal::BadEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| PathRefusal::BadEscape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathRefusal::*;

    #[test]
    fn paths() {
        let cases: &[(&str, Result<(), PathRefusal>)] = &[
            ("/api", Ok(())),
            ("/api/", Ok(())),
            ("/api/accounts/", Ok(())),
            ("/api/profiles/01ABC", Ok(())),
            ("/client/events/", Ok(())),
            ("/api/profiles/a%40b.com/", Ok(())),
            ("/api/x%252e%252e/", Ok(())),
            ("/api/...", Ok(())),
            ("/", Err(Outside)),
            ("/apix/accounts", Err(Outside)),
            ("/%61pi/accounts", Err(Outside)),
            ("/admin/reload", Err(Outside)),
            ("*", Err(Outside)),
            ("/api/..", Err(DotSegment)),
            ("/api/../admin", Err(DotSegment)),
            ("/api/.", Err(DotSegment)),
            ("/api/./x", Err(DotSegment)),
            ("/api/%2e%2e/x", Err(DotSegment)),
            ("/api/%2E%2E", Err(DotSegment)),
            ("/api/.%2e/x", Err(DotSegment)),
            ("/api/%2e/x", Err(DotSegment)),
            ("/client/../api/accounts", Err(DotSegment)),
            ("/api//x", Err(EmptySegment)),
            ("/api/x//", Err(EmptySegment)),
            ("/api/a%2fb", Err(EncodedSeparator)),
            ("/api/a%2F..%2Fb", Err(EncodedSeparator)),
            ("/api/a%5cb", Err(EncodedSeparator)),
            ("/api/a\\b", Err(EncodedSeparator)),
            ("/api/a%00b", Err(EncodedSeparator)),
            ("/api/a%0d%0ab", Err(EncodedSeparator)),
            ("/api/%zz", Err(BadEscape)),
            ("/api/%2", Err(BadEscape)),
            ("/api/%", Err(BadEscape)),
            ("/api/%e2%82", Ok(())),
        ];
        for (path, want) in cases {
            assert_eq!(check_path(path), *want, "{path}");
        }
    }
}
