//! The proxy's side of event coalescing ([`crate::coalesce`]): opening the coalescer,
//! and sending its bulk jobs upstream through the same exchange — limiter, breaker,
//! retries — as a client's request. The request path's stage is
//! [`crate::stack::coalesce`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Request;
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;
use tower::ServiceExt;

use super::{BuildError, Proxy};
use crate::coalesce::{self, Coalescer, Delivery, Group, Settings};
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::retry::Repeat;
use crate::spool::Spool;
use crate::stack::{exchange::Exchange, Call, Routed};
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

impl Proxy {
    /// The coalescer, when `coalesce.events` is on.
    pub fn coalescer(&self) -> Option<&Arc<Coalescer>> {
        self.coalescer.as_ref()
    }
}

impl coalesce::Deliver for Proxy {
    async fn deliver(self: Arc<Self>, group: &Group, body: Bytes) -> Result<Delivery, ProxyError> {
        // One view of the config per job, like a request.
        let live = self.live();
        if !live.config.upstream.enabled {
            return Err(ProxyError::Disabled);
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
        // Under the account the credential resolves to, as the client's own requests
        // are: the bulk endpoint's bucket is the account's, shared with any
        // bulk_create_events call of its own.
        let resolved = self.resolve(&live, &mut parts).await;
        let route = live.route(&parts, resolved);
        let account = route.demands.first().map(|d| d.key.account);
        if let Some(retry_after) = self.breaker_open_for(&live, account) {
            return Err(ProxyError::CircuitOpen { retry_after });
        }
        let deadline = Instant::now() + Duration::from_millis(live.config.queue.max_wait_ms);
        let routed = Routed {
            call: Call { resolved, ..Call::new(parts, body, live) },
            route,
            deadline,
            // Every event of a job carries a unique_id: repeating the job is safe.
            repeat: Repeat::Safe,
            unique_id: None,
            observed: None,
        };
        let resp = Exchange::new(self.clone(), self.upstream.clone()).oneshot(routed).await?;
        let status = resp.status();
        let body =
            Limited::new(resp.into_body(), MAX_ANSWER_BYTES).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Ok(Delivery { status, body })
    }
}
