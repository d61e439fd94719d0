//! Whether a request may be sent again. Events get a `unique_id` (when the client sent
//! none and `retry.add_unique_id` allows), so Klaviyo deduplicates a repeat or a
//! replay; the repeat rule follows from the method, the operation, the id and
//! `retry.operations`.

use bytes::Bytes;

use super::step::Check;
use super::Routed;
use crate::error::ProxyError;
use crate::proxy::Live;
use crate::retry::{self, Repeat};
use crate::route::Route;

/// Sets the repeat rule and the event's `unique_id`; it never refuses.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency;

impl Check<Routed<Bytes>> for Idempotency {
    type Out = Routed<Bytes>;

    fn check(&self, mut routed: Routed<Bytes>) -> Result<Routed<Bytes>, ProxyError> {
        let call = &mut routed.call;
        let body = std::mem::take(&mut call.body);
        (call.body, routed.unique_id) = with_unique_id(&call.live, &routed.route, body);
        routed.repeat = repeat_rule(&call.live, &call.parts.method, &routed.route, routed.unique_id.is_some());
        Ok(routed)
    }
}

fn with_unique_id(live: &Live, route: &Route, body: Bytes) -> (Bytes, Option<String>) {
    if !route.operation.is_some_and(retry::is_event_create) {
        return (body, None);
    }
    match retry::ensure_unique_id(&body) {
        // Not adding ids, only an id the client sent (body unchanged) counts.
        Some((with_id, id)) if live.config.retry.add_unique_id || with_id == body => (with_id, Some(id)),
        _ => (body, None),
    }
}

fn repeat_rule(live: &Live, method: &http::Method, route: &Route, has_unique_id: bool) -> Repeat {
    let over = live.config.retry.operations.iter().find(|(k, _)| k.as_str() == route.label()).map(|(_, v)| *v);
    retry::repeat_rule(method, route.operation, has_unique_id, over)
}

#[cfg(test)]
mod tests {
    use http::Request;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::stack::step::StepLayer;
    use crate::stack::testing;

    async fn prepared(config: &str, req: Request<Bytes>) -> Routed<Bytes> {
        let proxy = testing::proxy(config);
        let inner = tower::service_fn(|r: Routed<Bytes>| async move { Ok::<_, ProxyError>(r) });
        StepLayer::new(Idempotency).layer(inner).oneshot(testing::routed(&proxy, req)).await.unwrap()
    }

    const EVENT: &str = r#"{"data":{"type":"event","attributes":{"properties":{}}}}"#;

    #[tokio::test]
    async fn events_get_an_id_and_become_safe_to_repeat() {
        let r = prepared("", Request::post("/api/events").body(Bytes::from_static(EVENT.as_bytes())).unwrap()).await;
        let id = r.unique_id.clone().expect("an id was added");
        assert!(std::str::from_utf8(&r.call.body).unwrap().contains(&id));
        assert_eq!(r.repeat, Repeat::Safe);
    }

    #[tokio::test]
    async fn without_adding_ids_an_event_stays_unsafe_to_repeat() {
        let config = "[retry]\nadd_unique_id = false\n";
        let r =
            prepared(config, Request::post("/api/events").body(Bytes::from_static(EVENT.as_bytes())).unwrap()).await;
        assert_eq!((r.unique_id, r.call.body.as_ref(), r.repeat), (None, EVENT.as_bytes(), Repeat::OnlyIfUnsent));
    }

    #[tokio::test]
    async fn reads_are_safe_and_other_bodies_untouched() {
        let r = prepared("", Request::get("/api/accounts").body(Bytes::new()).unwrap()).await;
        assert_eq!((r.unique_id, r.repeat), (None, Repeat::Safe));
        let r = prepared("", Request::post("/api/lists").body(Bytes::from_static(b"{}")).unwrap()).await;
        assert_eq!((r.call.body.as_ref(), r.repeat), (b"{}".as_ref(), Repeat::OnlyIfUnsent));
    }
}
