//! Delivery to the app: one worker takes the oldest stored webhook, posts it to
//! `forward_to` and removes it once the app answers 2xx. Failures back off
//! exponentially with jitter (`retry_base_ms` doubling up to `retry_cap_ms`);
//! 5xx, 408, 425, 429 and connection errors or timeouts are retried, any other 4xx
//! is the app refusing the webhook for good and makes it a dead letter at once, as
//! does running out of `max_attempts`. (The jitter draws between half and all of the
//! ceiling, so a retry never comes at once after a failure.)
//!
//! One at a time and oldest first keeps the app's view in Klaviyo's order and means
//! at most one delivery is in flight when the process dies: that one may reach the
//! app twice (before and after a restart), with the same delivery id.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::store::Delivery;
use super::{Gate, GateError, WebhooksConfig, DELIVERY_ID_HEADER, DUPLICATES_REMOVED_HEADER, VERIFIED_HEADER};

/// The pooled client that delivers to the app.
pub type Client = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the delivery client: rustls (webpki roots plus `forward_ca_file`) for an
/// `https` app, plain HTTP for a loopback one.
pub fn client(settings: &WebhooksConfig) -> Result<Client, GateError> {
    let tls =
        crate::upstream::tls_config(settings.forward_ca_file.as_deref()).map_err(|e| GateError::Tls(e.to_string()))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(settings.delivery_timeout_ms)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The metric reason (one of [`super::metrics::FAILURE_REASONS`]).
    pub reason: &'static str,
    /// The app refused it for good.
    pub permanent: bool,
    /// For logs, `/health` and the dead-letter list (never a body or header value).
    pub message: String,
}

/// Classifies the app's answer.
pub fn classify(status: u16) -> Result<(), Failure> {
    match status {
        200..=299 => Ok(()),
        408 | 425 | 429 => {
            Err(Failure { reason: "status_4xx", permanent: false, message: format!("the app answered {status}") })
        }
        400..=499 => Err(Failure {
            reason: "status_4xx",
            permanent: true,
            message: format!("the app refused the webhook ({status})"),
        }),
        _ => Err(Failure { reason: "status_5xx", permanent: false, message: format!("the app answered {status}") }),
    }
}

/// The backoff before attempt `attempt + 1`: between half and all of
/// `base · 2^(attempt-1)`, capped.
pub fn backoff(attempt: u32, base_ms: u64, cap_ms: u64) -> Duration {
    let ceiling = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(30)).min(cap_ms);
    Duration::from_millis(fastrand::u64(ceiling / 2..=ceiling.max(1)))
}

impl Gate {
    fn delivery_id(&self, d: &Delivery) -> String {
        format!("{:08x}-{}", self.store.instance(), d.id)
    }

    /// One attempt to hand `d` to the app.
    async fn send(&self, d: &Delivery, body: Vec<u8>) -> Result<(), Failure> {
        let mut req = Request::post(self.forward_to.clone()).body(Full::new(Bytes::from(body))).expect("valid request");
        let headers = req.headers_mut();
        for (name, value) in &d.headers {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                headers.append(name, value);
            }
        }
        headers.insert(VERIFIED_HEADER, HeaderValue::from_static("true"));
        headers.insert(DELIVERY_ID_HEADER, HeaderValue::from_str(&self.delivery_id(d)).expect("ascii id"));
        if d.duplicates_removed > 0 {
            headers.insert(DUPLICATES_REMOVED_HEADER, HeaderValue::from(d.duplicates_removed));
        }
        let timeout = Duration::from_millis(self.settings.delivery_timeout_ms);
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(Failure {
                reason: "timeout",
                permanent: false,
                message: format!("the app did not answer within {} ms", timeout.as_millis()),
            }),
            Ok(Err(e)) => {
                Err(Failure { reason: "connect", permanent: false, message: format!("the app cannot be reached: {e}") })
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                // Read the answer out so the connection goes back to the pool.
                let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
                classify(status)
            }
        }
    }

    /// The delivery worker; runs until aborted.
    pub async fn run_delivery(self: Arc<Self>) {
        let mut current: Option<(u64, u32)> = None;
        loop {
            let store = self.store.clone();
            let next = tokio::task::spawn_blocking(move || store.first_pending()).await;
            let (delivery, body) = match next {
                Ok(Ok(Some(next))) => next,
                Ok(Ok(None)) => {
                    // Idle: the gauges from the store itself, exact.
                    self.refresh_gauges();
                    // Woken by an accept or a requeue; the timeout is a safety net.
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "webhook store read failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => return,
            };
            let attempt = match current {
                Some((id, n)) if id == delivery.id => n + 1,
                _ => 1,
            };
            current = Some((delivery.id, attempt));
            let result = self.send(&delivery, body).await;
            let store = self.store.clone();
            let id = delivery.id;
            match result {
                Ok(()) => {
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.delivered(id)).await {
                        tracing::error!(error = %e, id, "webhook delivered but not removed from the store");
                    }
                    let lag = super::now_ms().saturating_sub(delivery.accepted_at_ms) as f64 / 1000.0;
                    self.webhook_metrics().delivered(delivery.kind, lag);
                    self.webhook_metrics().backlog.dec();
                    self.set_last_error(None);
                    tracing::debug!(id, attempt, "webhook delivered");
                }
                Err(failure) => {
                    self.webhook_metrics().delivery_failed(failure.reason);
                    self.set_last_error(Some(failure.message.clone()));
                    if failure.permanent || attempt >= self.settings.max_attempts {
                        tracing::warn!(id, attempt, error = %failure.message, "webhook delivery gave up: dead letter");
                        let reason = failure.message.clone();
                        let _ = tokio::task::spawn_blocking(move || store.dead_letter(id, attempt, &reason)).await;
                        self.refresh_gauges();
                    } else {
                        let wait = backoff(attempt, self.settings.retry_base_ms, self.settings.retry_cap_ms);
                        tracing::info!(id, attempt, wait_ms = wait.as_millis() as u64, error = %failure.message, "webhook delivery failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_apps_answers() {
        assert!(classify(200).is_ok() && classify(204).is_ok());
        for s in [500, 502, 503, 504, 408, 425, 429] {
            assert!(!classify(s).unwrap_err().permanent, "{s}");
        }
        for s in [400, 401, 403, 404, 410, 422] {
            assert!(classify(s).unwrap_err().permanent, "{s}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for _ in 0..100 {
            let first = backoff(1, 200, 5_000);
            assert!((100..=200).contains(&(first.as_millis() as u64)), "{first:?}");
            let third = backoff(3, 200, 5_000);
            assert!((400..=800).contains(&(third.as_millis() as u64)), "{third:?}");
            assert!(backoff(40, 200, 5_000) <= Duration::from_millis(5_000));
        }
    }
}
