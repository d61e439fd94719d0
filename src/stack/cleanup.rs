//! Klaviyo's answer goes back to the client without the headers that belonged to the
//! proxy's own connection to Klaviyo (hop-by-hop, and any the `Connection` header names).

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::body::ProxyBody;
use crate::upstream;

/// Strips the response's hop-by-hop headers and boxes its (streamed) body; used as
/// `ServiceBuilder::map_response(cleanup::clean)`.
pub fn clean<B>(resp: Response<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    let (mut parts, body) = resp.into_parts();
    upstream::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use http_body_util::Full;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::error::ProxyError;

    #[tokio::test]
    async fn hop_by_hop_headers_stay_behind_and_the_body_streams_through() {
        let upstream = tower::service_fn(|()| async {
            let body = Full::new(Bytes::from_static(b"{\"data\":[]}")).map_err(|never| match never {});
            let mut resp = Response::new(body);
            *resp.status_mut() = StatusCode::CREATED;
            let h = resp.headers_mut();
            h.insert("connection", "x-upstream-hop".parse().unwrap());
            h.insert("x-upstream-hop", "1".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("ratelimit-remaining", "9".parse().unwrap());
            Ok::<_, ProxyError>(resp)
        });
        let resp = ServiceBuilder::new().map_response(clean).service(upstream).oneshot(()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let names: Vec<&str> = resp.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["ratelimit-remaining"]);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "{\"data\":[]}");
    }
}
