//! The gate's metrics, registered in the app's one registry (see [`crate::metrics`]).
//! Labels are bounded: the route kind and a fixed reason word.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::signature::Rejection;
use super::store::Kind;

/// Webhooks received (valid or not) by kind (counter).
pub const RECEIVED: &str = "klaviyo_proxy_webhook_received";
/// Webhooks refused by reason (counter). The P2 alert "Webhook Signature Invalid".
pub const REJECTED: &str = "klaviyo_proxy_webhook_rejected";
/// Items acknowledged but not delivered again, seen before (counter).
pub const DUPLICATES: &str = "klaviyo_proxy_webhook_duplicates";
/// Webhooks the app took (2xx) (counter).
pub const DELIVERED: &str = "klaviyo_proxy_webhook_delivered";
/// Failed delivery attempts by reason (counter).
pub const DELIVERY_FAILURES: &str = "klaviyo_proxy_webhook_delivery_failures";
/// Time from acknowledging a webhook to the app taking it (histogram, seconds).
pub const DELIVERY_LAG: &str = "klaviyo_proxy_webhook_delivery_lag_seconds";
/// Time from a webhook's arrival to its acknowledgement (histogram, seconds).
pub const ACK_LATENCY: &str = "klaviyo_proxy_webhook_ack_seconds";
/// Webhooks waiting for delivery (gauge).
pub const BACKLOG: &str = "klaviyo_proxy_webhook_backlog";
/// Webhooks in the dead-letter list (gauge).
pub const DEAD_LETTERS: &str = "klaviyo_proxy_webhook_dead_letters";
/// Seen ids forgotten before the dedup TTL because the table was full (counter).
pub const DEDUP_EVICTED: &str = "klaviyo_proxy_webhook_dedup_evicted";

/// Why a delivery attempt failed, the `reason` label of [`DELIVERY_FAILURES`].
pub const FAILURE_REASONS: [&str; 4] = ["connect", "timeout", "status_5xx", "status_4xx"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The gate's metrics.
#[derive(Debug)]
pub struct WebhookMetrics {
    received: Family<KindLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    duplicates: Family<KindLabel, Counter>,
    delivered: Family<KindLabel, Counter>,
    failures: Family<ReasonLabel, Counter>,
    lag: Histogram,
    ack: Histogram,
    /// Webhooks waiting for delivery.
    pub backlog: Gauge,
    /// Dead letters.
    pub dead_letters: Gauge,
    evicted: Counter,
}

impl WebhookMetrics {
    /// Registers every gate metric in `registry`; each labelled series starts at zero,
    /// so the alert rules find them before the first webhook.
    pub fn register(registry: &mut Registry) -> Self {
        let m = WebhookMetrics {
            received: Family::default(),
            rejected: Family::default(),
            duplicates: Family::default(),
            delivered: Family::default(),
            failures: Family::default(),
            lag: Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0]),
            ack: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0]),
            backlog: Gauge::default(),
            dead_letters: Gauge::default(),
            evicted: Counter::default(),
        };
        registry.register(RECEIVED, "Webhooks received, by kind", m.received.clone());
        registry.register(REJECTED, "Webhooks refused (401 or 4xx), by reason", m.rejected.clone());
        registry.register(
            DUPLICATES,
            "Webhook items seen before: acknowledged, not delivered again",
            m.duplicates.clone(),
        );
        registry.register(DELIVERED, "Webhooks the app took (2xx), by kind", m.delivered.clone());
        registry.register(DELIVERY_FAILURES, "Failed webhook delivery attempts, by reason", m.failures.clone());
        registry.register(DELIVERY_LAG, "Time from acknowledging a webhook to the app taking it", m.lag.clone());
        registry.register(ACK_LATENCY, "Time from a webhook's arrival to its acknowledgement", m.ack.clone());
        registry.register(BACKLOG, "Webhooks waiting for delivery to the app", m.backlog.clone());
        registry.register(DEAD_LETTERS, "Webhooks in the dead-letter list", m.dead_letters.clone());
        registry.register(
            DEDUP_EVICTED,
            "Seen webhook ids forgotten early because the table was full",
            m.evicted.clone(),
        );
        for kind in [Kind::System, Kind::Flow] {
            let label = KindLabel { kind: kind.as_str() };
            drop(m.received.get_or_create(&label));
            drop(m.duplicates.get_or_create(&label));
            drop(m.delivered.get_or_create(&label));
        }
        for reason in Rejection::ALL {
            drop(m.rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }));
        }
        for reason in FAILURE_REASONS {
            drop(m.failures.get_or_create(&ReasonLabel { reason }));
        }
        m
    }

    /// Counts a webhook received on `kind`'s route.
    pub fn received(&self, kind: Kind) {
        self.received.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
    }

    /// Webhooks refused so far, every reason together (for the checklist).
    pub fn rejected_total(&self) -> u64 {
        Rejection::ALL.iter().map(|r| self.rejected.get_or_create(&ReasonLabel { reason: r.as_str() }).get()).sum()
    }

    /// Webhooks received so far, both kinds together (for the checklist).
    pub fn received_total(&self) -> u64 {
        [Kind::System, Kind::Flow]
            .iter()
            .map(|k| self.received.get_or_create(&KindLabel { kind: k.as_str() }).get())
            .sum()
    }

    /// Counts a refused webhook.
    pub fn rejected(&self, reason: Rejection) {
        self.rejected.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc();
    }

    /// Counts items seen before.
    pub fn duplicates(&self, kind: Kind, items: usize) {
        self.duplicates.get_or_create(&KindLabel { kind: kind.as_str() }).inc_by(items as u64);
    }

    /// Counts a delivery the app took, `lag_secs` after it was acknowledged.
    pub fn delivered(&self, kind: Kind, lag_secs: f64) {
        self.delivered.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
        self.lag.observe(lag_secs);
    }

    /// Counts a failed attempt (`reason` from [`FAILURE_REASONS`]).
    pub fn delivery_failed(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records an acknowledgement's latency.
    pub fn acknowledged(&self, secs: f64) {
        self.ack.observe(secs);
    }

    /// Counts ids forgotten before their TTL.
    pub fn evicted(&self, n: u64) {
        if n > 0 {
            self.evicted.inc_by(n);
        }
    }
}
