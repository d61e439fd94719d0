//! The request path's side of event coalescing ([`crate::coalesce`]): which requests
//! it takes, the `202` it answers, and the way its bulk jobs go upstream — through the
//! same limiter, breaker and retries as a client's request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{request, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::{BuildError, Outcome, Proxy};
use crate::body::ProxyBody;
use crate::coalesce::{self, Coalescer, Delivery, Group, Settings};
use crate::config::Config;
use crate::error::{ProxyError, PROXY_ERROR_HEADER};
use crate::metrics::{Metrics, RequestOutcome};
use crate::retry::Repeat;
use crate::route::Route;
use crate::spool::{Spool, SPOOL_ID_HEADER};
use crate::upstream;

/// Klaviyo's bulk endpoint.
const BULK_PATH: &str = "/api/event-bulk-create-jobs";
/// Largest answer body read back from a job (Klaviyo's errors are small).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The coalescer `coalesce.events` asks for.
pub(super) fn open(
    config: &Config,
    spool: Option<&Spool>,
    metrics: &Metrics,
) -> Result<Option<Arc<Coalescer>>, BuildError> {
    let (Some(path), Some(spool)) = (config.coalesce.store_path(&config.spool), spool) else { return Ok(None) };
    let settings = Settings {
        linger: Duration::from_millis(config.coalesce.linger_ms),
        max_pending: config.coalesce.max_pending,
        max_lag: Duration::from_millis(config.coalesce.max_lag_ms),
    };
    Ok(Some(Arc::new(Coalescer::open(&path, spool.clone(), settings, metrics.coalesce.clone())?)))
}

/// Whether this request is a single event the coalescer takes: `create_event` with a
/// credential (without one Klaviyo's own 401 is the answer).
pub(super) fn takes(route: &Route, parts: &request::Parts) -> bool {
    route.operation.is_some_and(|o| o.id == "create_event") && parts.headers.contains_key(header::AUTHORIZATION)
}

/// Stores the event and answers what Klaviyo answers a single event: `202`, empty.
pub(super) async fn accept(
    coalescer: &Coalescer,
    parts: &request::Parts,
    body: &Bytes,
    outcome: &mut Outcome,
) -> Result<Response<ProxyBody>, ProxyError> {
    let id = coalescer.accept(&parts.headers, body).await?;
    outcome.kind = RequestOutcome::Spooled;
    let mut resp = Response::new(crate::body::full(Bytes::new()));
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp.headers_mut().insert(SPOOL_ID_HEADER, HeaderValue::from(id));
    resp.headers_mut().insert(PROXY_ERROR_HEADER, HeaderValue::from_static(coalesce::COALESCED));
    Ok(resp)
}

impl Proxy {
    /// The coalescer, when `coalesce.events` is on.
    pub fn coalescer(&self) -> Option<&Arc<Coalescer>> {
        self.coalescer.as_ref()
    }
}

impl coalesce::Deliver for Proxy {
    async fn deliver(&self, group: &Group, body: Bytes) -> Result<Delivery, ProxyError> {
        // One view of the config per job, like a request.
        let live = self.live();
        if !live.config.upstream.enabled {
            return Err(ProxyError::Disabled);
        }
        if let Some(retry_after) = self.breaker_open(&live) {
            return Err(ProxyError::CircuitOpen { retry_after });
        }
        let mut req = Request::post(BULK_PATH).body(()).expect("static request");
        let headers = req.headers_mut();
        if let Ok(mut auth) = HeaderValue::from_bytes(&group.authorization) {
            auth.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, auth);
        }
        if let Ok(revision) = HeaderValue::from_str(&group.revision) {
            headers.insert("revision", revision);
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/vnd.api+json"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/vnd.api+json"));
        let (mut parts, ()) = req.into_parts();
        upstream::outbound_headers(&mut parts.headers, live.config.upstream.revision.as_str());
        let route = self.route(&live, &parts);
        let deadline = Instant::now() + Duration::from_millis(live.config.queue.max_wait_ms);
        let mut outcome = Outcome::default();
        // Every event of a job carries a unique_id: repeating the job is safe.
        let resp = self.exchange(&live, &parts, body, &route, deadline, Repeat::Safe, &mut outcome).await?;
        let status = resp.status();
        let body =
            Limited::new(resp.into_body(), MAX_ANSWER_BYTES).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok(Delivery { status, body })
    }
}
