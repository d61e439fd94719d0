//! The body type of every response the proxy returns: streamed from the upstream or
//! made by the proxy.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// A boxed response body.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}
