//! The admin listener, on its own port (loopback by default): `/metrics` (Prometheus),
//! `/health` (the production checklist's shape, with a cached Klaviyo probe that goes
//! through the limiter), `/ready` and `/live` for orchestrators, and
//! `POST /admin/reload`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::body::{full, ProxyBody};
use crate::error::ProxyError;
use crate::hardening::host::HostPolicy;
use crate::hardening::{admin_guard, random};
use crate::limiter::StoreState;
use crate::metrics::BreakerState;
use crate::proxy::{Probe, Proxy};
use crate::reload::Reloader;

mod router;

use router::Router;

/// Longest a health probe waits for Klaviyo's answer once it has its token.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Content type of `/metrics` (the encoder writes OpenMetrics text).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A service's (or the whole proxy's) health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Working.
    Healthy,
    /// Working but limited: rate-limited, or the breaker is probing.
    Degraded,
    /// Not working.
    Down,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Down => "down",
        }
    }
}

/// `services.klaviyo` in the `/health` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceHealth {
    /// Klaviyo's health as the probe saw it.
    pub status: Status,
    /// The probe's upstream latency, when it got an answer.
    pub latency_ms: Option<u64>,
    /// The account the configured key belongs to (Klaviyo's public account id).
    pub account_id: Option<String>,
    /// Why it is not healthy (never a key).
    pub error: Option<String>,
}

/// The `/health` body: `{"status","services":{"klaviyo":{..}},"timestamp"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// The proxy's overall status.
    pub status: Status,
    /// Per dependency.
    pub services: Services,
    /// When this report was made (RFC 3339, UTC).
    pub timestamp: String,
}

/// The dependencies `/health` reports on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Services {
    /// Klaviyo's API.
    pub klaviyo: ServiceHealth,
    /// The shared-limits store, when `limiter.store = "redis"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limiter: Option<LimiterHealth>,
    /// The webhook gate's delivery backlog, when the gate runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<crate::webhooks::WebhookHealth>,
    /// The event coalescer, when `coalesce.events = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<CoalesceHealth>,
    /// The spool, when `spool.path` is set: `degraded` while it cannot store writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<crate::spool::SpoolHealth>,
}

/// The event coalescer in `/health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CoalesceHealth {
    /// `degraded` while the oldest undelivered event is older than `coalesce.max_lag_ms`
    /// or its store cannot be written (events are then refused).
    pub status: Status,
    /// Events accepted and not yet delivered.
    pub pending: u64,
    /// Age of the oldest of them, in seconds.
    pub oldest_age_s: u64,
    /// Why the store cannot be written (a full disk; never a key).
    pub error: Option<String>,
}

/// The shared-limits store in `/health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimiterHealth {
    /// `healthy` while Redis decides, `degraded` while counting locally.
    pub status: Status,
    /// `redis` or `degraded` (local fallback at quota ÷ replicas).
    pub store: &'static str,
}

/// Shared state of the admin endpoints.
#[derive(Debug)]
pub struct Admin {
    proxy: Arc<Proxy>,
    ready: Arc<AtomicBool>,
    reloader: Option<Reloader>,
    /// The last probe and when it was made; the lock also makes concurrent `/health`
    /// calls share one probe.
    probe: Mutex<Option<(Instant, ServiceHealth)>>,
    account_id: std::sync::Mutex<Option<String>>,
    routes: Arc<Router<Arc<Admin>>>,
    webhooks: Option<Arc<crate::webhooks::Gate>>,
}

impl Admin {
    /// Admin endpoints for `proxy`; `ready` is flipped by the app at start and drain.
    pub fn new(proxy: Arc<Proxy>, ready: Arc<AtomicBool>, reloader: Option<Reloader>) -> Self {
        Admin {
            proxy,
            ready,
            reloader,
            probe: Mutex::new(None),
            account_id: std::sync::Mutex::new(None),
            routes: Arc::new(routes()),
            webhooks: None,
        }
    }

    /// Serves the webhook gate's backlog in `/health` and its routes under `/admin/webhooks`.
    pub fn with_webhooks(mut self, gate: Option<Arc<crate::webhooks::Gate>>) -> Self {
        self.webhooks = gate;
        self
    }

    /// The gate's dead-letter routes under `/admin/webhooks` (see [`crate::webhooks::store::admin`]).
    async fn webhooks(&self, method: Method, path: String) -> Response<ProxyBody> {
        let Some(gate) = self.webhooks.clone() else {
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "the webhook gate is off (webhooks.enabled)"}),
            );
        };
        // redb reads and fsyncs block: off the async threads.
        match tokio::task::spawn_blocking(move || gate.admin(&method, &path)).await {
            Ok(Some((status, body))) => json(status, &body),
            Ok(None) => json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "not found"})),
            Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({"error": "webhook task failed"})),
        }
    }

    /// Whether the app has started and is not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The spool's dead-letter routes under `/admin/spool` (see [`crate::spool::admin`]).
    async fn spool(&self, method: Method, path: String) -> Response<ProxyBody> {
        let Some(spool) = self.proxy.spool().cloned() else {
            return json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "no spool configured (spool.path)"}));
        };
        // redb reads and fsyncs block: off the async threads.
        let answer = tokio::task::spawn_blocking(move || crate::spool::admin(&spool, &method, &path)).await;
        self.proxy.spool_changed();
        match answer {
            Ok(Some((status, body))) => json(status, &body),
            Ok(None) => json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "not found"})),
            Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({"error": "spool task failed"})),
        }
    }

    /// Serves one admin request (no endpoint reads a body).
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Result<Response<ProxyBody>, Infallible> {
        // Rebinding pages, cross-site posts and (with admin.token) anyone without it.
        let config = self.proxy.config();
        let token = config.admin.token.as_ref().map(|t| t.expose().as_bytes());
        let hosts = HostPolicy::new(&config.server.allowed_hosts);
        if let Err(refusal) = admin_guard::check(&hosts, token, req.method(), req.uri(), req.headers()) {
            return Ok(refusal.error().into_response(&random::hex128()));
        }
        let (parts, _body) = req.into_parts();
        let routes = self.routes.clone();
        Ok(routes.answer(self, parts).await)
    }

    /// The health report: the cached (or a fresh) Klaviyo probe, overlaid with the
    /// breaker's state, which is always current.
    pub async fn health(&self) -> HealthReport {
        let config = self.proxy.config();
        let ttl = Duration::from_millis(config.admin.health_cache_ms);
        let mut klaviyo = {
            let mut cached = self.probe.lock().await;
            match &*cached {
                Some((at, health)) if at.elapsed() < ttl => health.clone(),
                _ => {
                    let health = self.probe_now(Duration::from_millis(config.admin.health_max_wait_ms)).await;
                    self.proxy.metrics().health_probe(health.status.as_str());
                    *cached = Some((Instant::now(), health.clone()));
                    health
                }
            }
        };
        match self.proxy.metrics().breaker_state() {
            s if s == BreakerState::Open as i64 => {
                klaviyo.status = Status::Down;
                klaviyo.error = Some("circuit breaker open: requests fail fast".into());
            }
            s if s == BreakerState::HalfOpen as i64 && klaviyo.status == Status::Healthy => {
                klaviyo.status = Status::Degraded;
                klaviyo.error = Some("circuit breaker half-open: probing Klaviyo".into());
            }
            _ => {}
        }
        // Limits shared through Redis that fell back to local counting still hold
        // traffic under quota ÷ replicas: degraded, not down.
        let limiter = match self.proxy.limiter().state() {
            StoreState::Local => None,
            state => Some(LimiterHealth {
                status: if state == StoreState::Degraded { Status::Degraded } else { Status::Healthy },
                store: state.as_str(),
            }),
        };
        // Accepted events not reaching Klaviyo in time: degraded, nothing is lost yet.
        let coalesce = self.proxy.coalescer().map(|c| {
            let (lagging, age) = c.lag();
            let error = c.write_error();
            CoalesceHealth {
                status: if lagging || error.is_some() { Status::Degraded } else { Status::Healthy },
                pending: c.pending(),
                oldest_age_s: age.as_secs(),
                error,
            }
        });
        // A spool that cannot store writes (disk full, at its bounds): degraded, since
        // deferrable writes Klaviyo cannot take now are refused.
        let spool = self.proxy.spool().map(crate::spool::Spool::health);
        let mut status = klaviyo.status;
        let degraded = |s: Option<Status>| s == Some(Status::Degraded);
        if (degraded(limiter.as_ref().map(|l| l.status))
            || degraded(coalesce.as_ref().map(|c| c.status))
            || degraded(spool.as_ref().map(|s| s.status)))
            && status == Status::Healthy
        {
            status = Status::Degraded;
        }
        let webhooks = match self.webhooks.clone() {
            Some(gate) => tokio::task::spawn_blocking(move || gate.health()).await.ok(),
            None => None,
        };
        if webhooks.as_ref().is_some_and(|w| w.status == Status::Degraded) && status == Status::Healthy {
            status = Status::Degraded;
        }
        HealthReport {
            status,
            services: Services { klaviyo, limiter, coalesce, webhooks, spool },
            timestamp: rfc3339(SystemTime::now()),
        }
    }

    async fn probe_now(&self, max_wait: Duration) -> ServiceHealth {
        let authenticated = self.proxy.has_injected_key();
        let known_id = || {
            let probed = self.account_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            probed.or_else(|| self.proxy.injected_account())
        };
        // A health check must answer quickly even when Klaviyo hangs.
        let probe = match tokio::time::timeout(max_wait + PROBE_TIMEOUT, self.proxy.probe(max_wait)).await {
            Err(_) => {
                return ServiceHealth {
                    status: Status::Down,
                    latency_ms: None,
                    account_id: known_id(),
                    error: Some(format!("Klaviyo did not answer within {}s", PROBE_TIMEOUT.as_secs())),
                }
            }
            Ok(r) => r,
        };
        let probe = match probe {
            Ok(probe) => probe,
            Err(e @ (ProxyError::QueueFull { .. } | ProxyError::QueueTimeout { .. })) => {
                return ServiceHealth {
                    status: Status::Degraded,
                    latency_ms: None,
                    account_id: known_id(),
                    error: Some(format!("rate-limited: {e}")),
                }
            }
            Err(e) => {
                return ServiceHealth {
                    status: Status::Down,
                    latency_ms: None,
                    account_id: known_id(),
                    error: Some(e.to_string()),
                }
            }
        };
        let Probe { status, body, latency, retry_after } = probe;
        let latency_ms = Some(latency.as_millis() as u64);
        let (status, error) = match status.as_u16() {
            200..=299 => {
                let id = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["data"][0]["id"].as_str().map(str::to_owned));
                if id.is_some() {
                    *self.account_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = id;
                }
                (Status::Healthy, None)
            }
            // In pass-through mode the proxy holds no key: a 401 proves Klaviyo answers.
            401 if !authenticated => {
                (Status::Healthy, Some("no private key configured: checked reachability only".to_string()))
            }
            429 => {
                (Status::Degraded, Some(format!("rate-limited by Klaviyo: retry after {}s", retry_after.unwrap_or(1))))
            }
            s @ (401 | 403) => (Status::Down, Some(format!("Klaviyo refused the configured key ({s})"))),
            s @ 500..=599 => (Status::Down, Some(format!("Klaviyo answered {s}"))),
            s => (Status::Degraded, Some(format!("Klaviyo answered {s}"))),
        };
        ServiceHealth { status, latency_ms, account_id: known_id(), error }
    }
}

/// The admin endpoints.
fn routes() -> Router<Arc<Admin>> {
    // The checklist, as JSON and as the status page.
    let checklist: crate::admin::router::Handler<Arc<Admin>> =
        |admin, parts| Box::pin(async move { crate::checklist::admin::respond(&admin.proxy, parts.uri.path()) });
    let router = crate::checklist::admin::PATHS.iter().fold(Router::default(), |r, path| r.get(path, checklist));
    router
        .get("/metrics", |admin, _| Box::pin(async move { admin.metrics() }))
        .get("/health", |admin, _| Box::pin(async move { admin.health_answer().await }))
        .get("/ready", |admin, _| Box::pin(async move { admin.ready_answer() }))
        .get("/live", |_, _| Box::pin(async { json(StatusCode::OK, &serde_json::json!({ "live": true })) }))
        .post("/admin/reload", |admin, _| Box::pin(async move { admin.reload() }))
        .any_under("/admin/spool", |admin, parts| {
            Box::pin(async move {
                admin.spool(parts.method, parts.uri.path().trim_start_matches("/admin").to_string()).await
            })
        })
        .any_under("/admin/webhooks", |admin, parts| {
            Box::pin(async move {
                admin.webhooks(parts.method, parts.uri.path().trim_start_matches("/admin").to_string()).await
            })
        })
}

impl Admin {
    /// `GET /metrics`: the limiter's state is sampled when scraped.
    fn metrics(&self) -> Response<ProxyBody> {
        self.proxy.metrics().limiter_state(self.proxy.limiter().state());
        let text = self.proxy.metrics().encode(self.proxy.store());
        response(StatusCode::OK, METRICS_CONTENT_TYPE, text)
    }

    /// `GET /health`: 200 only when healthy.
    async fn health_answer(&self) -> Response<ProxyBody> {
        let report = self.health().await;
        let status = if report.status == Status::Healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json(status, &serde_json::to_value(&report).unwrap_or_default())
    }

    /// `GET /ready`.
    fn ready_answer(&self) -> Response<ProxyBody> {
        let ready = self.is_ready();
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json(status, &serde_json::json!({ "ready": ready }))
    }

    /// `POST /admin/reload`.
    fn reload(&self) -> Response<ProxyBody> {
        match &self.reloader {
            None => json(
                StatusCode::NOT_IMPLEMENTED,
                &serde_json::json!({"status": "rejected", "error": "this proxy was started without a config source"}),
            ),
            Some(reloader) => match reloader.reload(&self.proxy) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({"status": "reloaded"})),
                Err(error) => json(StatusCode::BAD_REQUEST, &serde_json::json!({"status": "rejected", "error": error})),
            },
        }
    }
}

pub(crate) fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(crate) fn json(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    response(status, "application/json", body.to_string())
}

/// Formats a time as RFC 3339 in UTC with millisecond precision.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_709_210_096_789)), "2024-02-29T12:34:56.789Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)), "2026-12-31T23:59:59.000Z");
    }
}
