//! Header names the request path reads or writes on every request, parsed once: a
//! `&str` name is parsed, lower-case checked and hashed again on every lookup.

use http::HeaderName;

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
