//! The webhook gate: the inbound side. Klaviyo's system webhooks (signed) and flow
//! webhooks (unsigned, behind the operator's token) arrive on the gate's own listener
//! (HTTPS with `tls_cert`/`tls_key`); each is verified ([`signature`]), deduplicated
//! by `data[].external_id` and stored durably ([`store`], fsync before the `200`),
//! then delivered to the app at `forward_to` by one background worker ([`deliver`])
//! with retries and backoff, and dead letters after `max_attempts`.
//!
//! ```text
//! Klaviyo ─► listener ─► verify (signature, timestamp, webhook id | flow token)
//!                          └─► store.accept (dedup + queue, one fsynced commit) ─► 200
//!            deliver worker ◄─┘ oldest first ─► app (2xx: done; 5xx/429/io: backoff;
//!                                                     other 4xx or max attempts: dead)
//! ```
//!
//! A batch with some items already seen is delivered with **only the new items**: the
//! app then never sees an event twice and needs no dedup of its own. The body is
//! rebuilt (each item byte for byte, the top-level keys in sorted order), so the
//! original `Klaviyo-Signature` no longer matches it: it is removed, and the delivery
//! says `X-Klaviyo-Proxy-Duplicates-Removed: N`. A batch whose items are all new goes
//! out byte for byte with Klaviyo's own headers. Every delivery carries
//! `X-Klaviyo-Proxy-Verified: true` and `X-Klaviyo-Proxy-Delivery-Id` (stable across
//! retries and restarts): a crash between the app's `2xx` and the store's commit
//! sends that one webhook again, with the same delivery id.

pub mod config;
pub mod deliver;
pub mod listener;
pub mod metrics;
pub mod signature;
pub mod store;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use config::WebhooksConfig;
pub use metrics::WebhookMetrics;

use crate::metrics::Metrics;
use store::{DedupLimits, Store, StoreError};

/// Header added to every delivery: the gate verified it.
pub const VERIFIED_HEADER: &str = "x-klaviyo-proxy-verified";
/// Header naming a delivery; the same on every retry, also after a restart.
pub const DELIVERY_ID_HEADER: &str = "x-klaviyo-proxy-delivery-id";
/// Header on a batch delivered without its already-seen items: how many were removed.
pub const DUPLICATES_REMOVED_HEADER: &str = "x-klaviyo-proxy-duplicates-removed";
/// Header carrying the flow-webhook token (or put it in the path).
pub const FLOW_TOKEN_HEADER: &str = "x-webhook-token";
/// Time a sender has for a request's head, and again for its body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The system-webhook route.
pub const SYSTEM_PATH: &str = "/webhooks/klaviyo";
/// The flow-webhook route (`/webhooks/flow` with the header, or `/webhooks/flow/<token>`).
pub const FLOW_PATH: &str = "/webhooks/flow";

/// Why the gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The store file cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The TLS certificate, key or CA file cannot be used.
    #[error("webhooks TLS: {0}")]
    Tls(String),
    /// The settings were not resolved and checked ([`WebhooksConfig::resolve`]).
    #[error("webhooks: {0}")]
    Unchecked(&'static str),
    /// The listener cannot be bound.
    #[error("webhooks.listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How the delivery worker fares, for `/health`.
#[derive(Debug, Clone, Default)]
struct DeliveryState {
    /// The last attempt failed: why (never a body or a header value).
    last_error: Option<String>,
}

/// The gate's part of `/health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookHealth {
    /// `healthy`; `degraded` while deliveries fail or dead letters wait.
    pub status: crate::admin::Status,
    /// Webhooks acknowledged and not yet delivered.
    pub backlog: u64,
    /// Dead letters waiting for an operator.
    pub dead_letters: u64,
    /// Age of the oldest undelivered webhook.
    pub oldest_pending_age_ms: Option<u64>,
    /// Why the last delivery attempt failed.
    pub error: Option<String>,
}

/// The running gate. Built by [`crate::App::build`] when `webhooks.enabled`.
pub struct Gate {
    settings: WebhooksConfig,
    secrets: Vec<Vec<u8>>,
    store: Store,
    /// Accepts go through one writer thread that commits concurrent ones together.
    writer: store::GroupWriter,
    metrics: Arc<Metrics>,
    listener: Mutex<Option<std::net::TcpListener>>,
    addr: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    client: deliver::Client,
    forward_to: http::Uri,
    wake: tokio::sync::Notify,
    state: Mutex<DeliveryState>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({}, {:?})", self.addr, self.store)
    }
}

/// Now in ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl Gate {
    /// Opens the store, loads the TLS files and binds the listener (so its address is
    /// known before serving). `settings` must have been resolved by the config.
    pub fn new(settings: &WebhooksConfig, metrics: Arc<Metrics>) -> Result<Arc<Gate>, GateError> {
        let store_path =
            settings.store_path.as_deref().ok_or(GateError::Unchecked("webhooks.store_path is not set"))?;
        let forward_to =
            settings.forward_to.as_ref().ok_or(GateError::Unchecked("webhooks.forward_to is not set"))?.uri().clone();
        let limits = DedupLimits { ttl_ms: settings.dedup_ttl_secs * 1000, max_ids: settings.dedup_max_ids };
        let store = Store::open(store_path, limits)?;
        let tls = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Some(listener::tls_acceptor(cert, key)?),
            _ => None,
        };
        let client = deliver::client(settings)?;
        let listener = std::net::TcpListener::bind(settings.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| GateError::Bind { addr: settings.listen, source })?;
        let addr = listener.local_addr().map_err(|source| GateError::Bind { addr: settings.listen, source })?;
        let gate = Gate {
            secrets: settings.secrets.iter().map(|s| s.expose().as_bytes().to_vec()).collect(),
            settings: settings.clone(),
            writer: store.group_writer(),
            store,
            metrics,
            listener: Mutex::new(Some(listener)),
            addr,
            tls,
            client,
            forward_to,
            wake: tokio::sync::Notify::new(),
            state: Mutex::new(DeliveryState::default()),
        };
        gate.refresh_gauges();
        Ok(Arc::new(gate))
    }

    /// Where the gate listens.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `https` when the gate serves TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The store (for tests and the admin routes).
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn webhook_metrics(&self) -> &WebhookMetrics {
        &self.metrics.webhooks
    }

    /// Sets the backlog and dead-letter gauges from the store.
    pub fn refresh_gauges(&self) {
        let m = self.webhook_metrics();
        if let Ok(n) = self.store.pending_len() {
            m.backlog.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Ok(n) = self.store.dead_len() {
            m.dead_letters.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn set_last_error(&self, error: Option<String>) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).last_error = error;
    }

    /// Serves the gate and runs the delivery worker until `shutdown` completes.
    pub async fn serve(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let Some(std_listener) = self.listener.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            tracing::error!("the webhook gate is already serving");
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "the webhook listener cannot be used");
                return;
            }
        };
        let worker = tokio::spawn(self.clone().run_delivery());
        let gate = self.clone();
        let service = hyper::service::service_fn(move |req| gate.clone().handle(req));
        let limits = crate::server::ConnLimits {
            header_read_timeout: BODY_READ_TIMEOUT,
            drain_timeout: Duration::from_secs(5),
            ..crate::server::ConnLimits::default()
        };
        tracing::info!(addr = %self.addr, tls = self.tls.is_some(), "webhook gate listening");
        crate::server::serve(listener, self.tls.clone(), limits, service, shutdown).await;
        worker.abort();
    }

    /// The gate's part of `/health`.
    pub fn health(&self) -> WebhookHealth {
        let backlog = self.store.pending_len().unwrap_or(0);
        let dead_letters = self.store.dead_len().unwrap_or(0);
        let oldest_pending_age_ms = self.store.oldest_pending_ms().ok().flatten().map(|at| now_ms().saturating_sub(at));
        // A store that cannot be written refuses webhooks: that comes first.
        let mut error = self.store.write_error();
        if error.is_none() {
            error = self.state.lock().unwrap_or_else(PoisonError::into_inner).last_error.clone();
        }
        if error.is_none() && dead_letters > 0 {
            error = Some(format!("{dead_letters} dead letters: see GET /admin/webhooks/dead"));
        }
        let status = if error.is_some() { crate::admin::Status::Degraded } else { crate::admin::Status::Healthy };
        WebhookHealth { status, backlog, dead_letters, oldest_pending_age_ms, error }
    }

    /// The dead-letter admin routes (see [`store::admin`]); wakes the worker after a change.
    pub fn admin(&self, method: &http::Method, path: &str) -> Option<(http::StatusCode, serde_json::Value)> {
        let answer = store::admin(&self.store, method, path);
        if method != http::Method::GET {
            self.refresh_gauges();
            self.wake.notify_one();
        }
        answer
    }
}
