//! The checklist's routes on the admin listener: the status page (`/`, `/status.js`,
//! `/status.css`: plain files compiled in, no CDN, no build step), `GET
//! /admin/checklist` (the report as JSON) and `GET /admin/status` (busiest buckets,
//! recent waits and errors, for the page).

use http::StatusCode;
use serde_json::json;
use tokio::time::Instant;

use super::{item, Context, Item, Light, Report};
use crate::admin::{json, response};
use crate::body::ProxyBody;
use crate::limiter::{BucketId, StoreState};
use crate::metrics::endpoint_label;
use crate::proxy::Proxy;

const INDEX_HTML: &str = include_str!("page/index.html");
const STATUS_JS: &str = include_str!("page/status.js");
const STATUS_CSS: &str = include_str!("page/status.css");

/// Buckets the status page lists.
const BUSIEST: usize = 10;

/// The checklist's admin routes (all `GET`).
pub const PATHS: &[&str] = &["/", "/status.js", "/status.css", "/admin/checklist", "/admin/status"];

/// Answers one of [`PATHS`].
pub fn respond(proxy: &Proxy, path: &str) -> http::Response<ProxyBody> {
    match path {
        "/" => response(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        "/status.js" => response(StatusCode::OK, "text/javascript; charset=utf-8", STATUS_JS),
        "/status.css" => response(StatusCode::OK, "text/css; charset=utf-8", STATUS_CSS),
        "/admin/checklist" => json(StatusCode::OK, &serde_json::to_value(report(proxy)).unwrap_or_default()),
        _ => json(StatusCode::OK, &status(proxy)),
    }
}

/// The checklist of `proxy` now.
pub fn report(proxy: &Proxy) -> Report {
    let config = proxy.config();
    let metrics = proxy.metrics();
    let label = |a| metrics.account_label(a);
    let spool = proxy.spool().map(|_| (metrics.spool_depth.get(), metrics.spool_dead_letters.get()));
    let status_page = {
        let config = config.clone();
        let url = config.preflight.status_url.clone();
        proxy.checklist().status_page_item(&url, async move { crate::preflight::status_indicator(&config).await })
    };
    let health = vec![
        breaker_item(metrics.breaker_state()),
        spool_item(spool, metrics.spool_oldest_age_seconds.get()),
        limiter_item(proxy.limiter().state()),
        webhooks_item(&config.webhooks, &WebhookCounts::of(&metrics.webhooks)),
        status_page,
    ];
    let ctx = Context {
        label: &label,
        default_revision: config.upstream.revision.as_str(),
        allowed_scopes: config.auth.allowed_scopes.as_deref(),
        adds_unique_id: config.retry.add_unique_id,
        rejects_phones: config.checks.phone_e164 == crate::config::PhoneCheck::Reject,
        today: super::rules::today(),
        health,
        breaker_state: metrics.breaker_state(),
        spool,
    };
    proxy.checklist().report(&ctx)
}

fn breaker_item(state: i64) -> Item {
    let (light, summary) = match state {
        0 => (Light::Green, "closed: requests flow"),
        1 => (Light::Amber, "half-open: a few requests probe Klaviyo"),
        _ => (Light::Red, "open: requests fail fast (deferrable writes are spooled)"),
    };
    item("breaker", "Circuit breaker", light, summary.into(), json!({"state": state}))
}

fn spool_item(spool: Option<(i64, i64)>, oldest_age: i64) -> Item {
    let title = "Spool";
    match spool {
        None => item("spool", title, Light::Grey, "no spool configured (spool.path)".into(), json!({})),
        Some((depth, dead)) => {
            let light = if dead > 0 {
                Light::Red
            } else if depth > 0 {
                Light::Amber
            } else {
                Light::Green
            };
            let summary = format!("{depth} waiting (oldest {oldest_age} s), {dead} dead letters");
            let details = json!({"depth": depth, "oldest_age_seconds": oldest_age, "dead_letters": dead});
            item("spool", title, light, summary, details)
        }
    }
}

fn limiter_item(state: StoreState) -> Item {
    let (light, summary) = match state {
        StoreState::Local => (Light::Green, "local: limits counted in this process"),
        StoreState::Redis => (Light::Green, "redis: limits shared by every replica"),
        StoreState::Degraded => {
            (Light::Amber, "degraded: Redis unreachable, each replica spends its rank's share locally")
        }
    };
    item("limiter", "Limiter store", light, summary.into(), json!({"store": state.as_str()}))
}

/// What the webhook gate has seen, for its checklist item.
#[derive(Debug, Default, Clone, Copy)]
struct WebhookCounts {
    received: u64,
    rejected: u64,
    backlog: i64,
    dead_letters: i64,
}

impl WebhookCounts {
    fn of(m: &crate::webhooks::WebhookMetrics) -> Self {
        WebhookCounts {
            received: m.received_total(),
            rejected: m.rejected_total(),
            backlog: m.backlog.get(),
            dead_letters: m.dead_letters.get(),
        }
    }
}

/// The checklist's "Webhook Security" section (HTTPS only, signatures verified,
/// deduplicated by event id, answered within 30 s) and its P2 alert "Webhook Signature
/// Invalid": what the gate does for the app, and what it has refused.
fn webhooks_item(config: &crate::webhooks::WebhooksConfig, c: &WebhookCounts) -> Item {
    let title = "Webhook security";
    if !config.enabled {
        let summary = "gate off (webhooks.enabled): the app must verify signatures, deduplicate by event id \
                       and answer within 30 s itself";
        return item("webhooks", title, Light::Grey, summary.into(), json!({"enabled": false}));
    }
    let https = if config.tls_cert.is_some() {
        "served over HTTPS"
    } else if config.listen.ip().is_loopback() {
        "plain HTTP on loopback: HTTPS must end in front of it"
    } else {
        "plain HTTP behind a TLS-terminating ingress (webhooks.allow_plaintext_remote)"
    };
    let hours = config.dedup_ttl_secs / 3600;
    let (light, summary) = if config.secrets.is_empty() {
        (Light::Red, "no signing secret: every system webhook is refused".to_string())
    } else if c.dead_letters > 0 {
        (Light::Red, format!("{} dead letters: the app refused them (GET /admin/webhooks/dead)", c.dead_letters))
    } else if c.rejected > 0 {
        (
            Light::Amber,
            format!(
                "{} of {} refused (bad signature, stale timestamp…): the P2 alert Webhook Signature Invalid",
                c.rejected, c.received
            ),
        )
    } else {
        (
            Light::Green,
            format!(
                "signatures verified ({} secret(s)), ids deduplicated for {hours} h, acknowledged at once; {https}",
                config.secrets.len()
            ),
        )
    };
    let details = json!({
        "enabled": true, "https": https, "secrets": config.secrets.len(), "dedup_hours": hours,
        "received": c.received, "rejected": c.rejected, "backlog": c.backlog, "dead_letters": c.dead_letters,
    });
    item("webhooks", title, light, summary, details)
}

/// `GET /admin/status`: the busiest buckets (their windows' fill and queue depth),
/// recent waits and errors, breaker and spool.
pub fn status(proxy: &Proxy) -> serde_json::Value {
    let metrics = proxy.metrics();
    let mut views = proxy.store().snapshot(Instant::now());
    let fill = |windows: &[(crate::limiter::WindowSpec, u64)]| {
        windows.iter().map(|(spec, used)| *used as f64 / f64::from(spec.limit.max(1))).fold(0.0, f64::max)
    };
    views.sort_by(|a, b| (fill(&b.windows), b.queued).partial_cmp(&(fill(&a.windows), a.queued)).unwrap());
    let buckets: Vec<_> = views
        .iter()
        .take(BUSIEST)
        .map(|v| {
            let (operation, kind) = match v.key.bucket {
                BucketId::Endpoint(e) => (endpoint_label(usize::from(e)), "endpoint"),
                BucketId::Condition(e, _) => (endpoint_label(usize::from(e)), "condition"),
                BucketId::Unknown => ("unknown", "endpoint"),
            };
            let windows: Vec<_> = ["burst", "steady", "daily"]
                .iter()
                .zip(&v.windows)
                .map(|(name, (spec, used))| json!({"window": name, "used": used, "limit": spec.limit}))
                .collect();
            json!({"account": metrics.account_label(v.key.account), "operation": operation, "bucket": kind,
                "queued": v.queued, "fill": fill(&v.windows), "windows": windows})
        })
        .collect();
    let label = |a| metrics.account_label(a);
    json!({
        "generated_at": crate::admin::rfc3339(std::time::SystemTime::now()),
        "active_buckets": views.len(),
        "buckets": buckets,
        "recent": proxy.checklist().recent(&label),
        "breaker_state": metrics.breaker_state(),
        "spool": proxy.spool().map(|_| json!({"depth": metrics.spool_depth.get(),
            "oldest_age_seconds": metrics.spool_oldest_age_seconds.get(),
            "dead_letters": metrics.spool_dead_letters.get()})),
        "limiter": proxy.limiter().state().as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::webhooks::WebhooksConfig;

    #[test]
    fn the_webhook_item_names_what_the_app_must_do_and_what_was_refused() {
        let off = webhooks_item(&WebhooksConfig::default(), &WebhookCounts::default());
        assert_eq!((off.id.as_str(), off.light), ("webhooks", Light::Grey));
        assert!(off.summary.contains("the app must verify signatures"), "{}", off.summary);
        let mut on = WebhooksConfig { enabled: true, ..WebhooksConfig::default() };
        assert_eq!(webhooks_item(&on, &WebhookCounts::default()).light, Light::Red, "no secret");
        on.secrets = vec![Secret::new("whsec")];
        let green = webhooks_item(&on, &WebhookCounts { received: 10, ..WebhookCounts::default() });
        assert_eq!(green.light, Light::Green);
        assert!(green.summary.contains("loopback"), "{}", green.summary);
        let refused = webhooks_item(&on, &WebhookCounts { received: 10, rejected: 1, ..WebhookCounts::default() });
        assert_eq!(refused.light, Light::Amber);
        assert!(refused.summary.contains("Webhook Signature Invalid"), "{}", refused.summary);
        let dead = webhooks_item(&on, &WebhookCounts { dead_letters: 2, ..WebhookCounts::default() });
        assert_eq!(dead.light, Light::Red);
        assert!(!format!("{dead:?}").contains("whsec"), "no secret in the item");
    }
}
