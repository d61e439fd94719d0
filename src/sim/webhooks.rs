//! The simulator's webhook sender: signed system webhooks as Klaviyo sends them
//! (`Klaviyo-Webhook-Id`, `Klaviyo-Timestamp` as an IMF-fixdate, `Klaviyo-Signature`
//! over body and timestamp), with a share of redeliveries (the same body, freshly
//! timestamped and signed, as Klaviyo's retries are) and a share signed with a wrong
//! secret. `klaviyo-proxy simulate webhooks` runs it; tests call [`send_webhooks`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use super::SimError;
use crate::webhooks::signature::sign;

/// What to send (also the flags of `klaviyo-proxy simulate webhooks`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookLoad {
    /// The gate's system-webhook URL, e.g. http://127.0.0.1:8082/webhooks/klaviyo.
    #[arg(long)]
    pub to: String,
    /// The signing secret the gate knows.
    #[arg(long, env = "KLAVIYO_WEBHOOK_SIGNING_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Webhooks to send.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Share that are redeliveries of an earlier webhook, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Share signed with a wrong secret, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub bad_signatures: f64,
    /// Events per webhook (`data[]` items).
    #[arg(long, default_value_t = 1)]
    pub items: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Extra CA certificate (PEM) to trust for an https gate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Seed for which webhooks are duplicates or bad, and for the event ids.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `Klaviyo-Webhook-Id` and `meta.klaviyo_webhook_id`.
    #[arg(long, default_value = DEFAULT_WEBHOOK_ID)]
    pub webhook_id: String,
}

/// The webhook id the sender uses unless told otherwise.
pub const DEFAULT_WEBHOOK_ID: &str = "01SIMWEBHOOK0000000000000";

impl Default for WebhookLoad {
    fn default() -> Self {
        WebhookLoad {
            to: "http://127.0.0.1:8082/webhooks/klaviyo".into(),
            secret: String::new(),
            count: 100,
            duplicates: 0.0,
            bad_signatures: 0.0,
            items: 1,
            concurrency: 8,
            ca_file: None,
            seed: 1,
            webhook_id: DEFAULT_WEBHOOK_ID.into(),
        }
    }
}

/// Acknowledgement latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// What happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WebhookReport {
    /// Requests sent (a connection error counts too).
    pub sent: usize,
    /// Answered 2xx.
    pub accepted: usize,
    /// Redeliveries among the sent.
    pub duplicates_sent: usize,
    /// Sent with a bad signature.
    pub bad_sent: usize,
    /// Answered 401.
    pub rejected: usize,
    /// Answered something else.
    pub other_status: usize,
    /// No answer (connection refused or reset).
    pub errors: usize,
    /// Acknowledgement latency of the answered requests.
    pub latency: Latency,
    /// Event ids of the validly signed webhooks (each once).
    #[serde(skip)]
    pub valid_ids: BTreeSet<String>,
    /// Event ids of validly signed webhooks that were acknowledged 2xx.
    #[serde(skip)]
    pub acked_ids: BTreeSet<String>,
    /// Event ids that went only in badly signed webhooks.
    #[serde(skip)]
    pub bad_ids: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shot {
    New,
    Duplicate,
    Bad,
}

/// The order of new, duplicate and bad webhooks: exact counts, shuffled by the seed,
/// a new one first so every duplicate has an original before it.
fn plan(load: &WebhookLoad) -> Vec<Shot> {
    let bad = (load.count as f64 * load.bad_signatures.clamp(0.0, 1.0)).round() as usize;
    let dup =
        ((load.count as f64 * load.duplicates.clamp(0.0, 1.0)).round() as usize).min(load.count - bad.min(load.count));
    let mut shots: Vec<Shot> =
        std::iter::repeat_n(Shot::Bad, bad.min(load.count)).chain(std::iter::repeat_n(Shot::Duplicate, dup)).collect();
    shots.resize(load.count, Shot::New);
    let mut rng = fastrand::Rng::with_seed(load.seed);
    rng.shuffle(&mut shots);
    if let Some(first_new) = shots.iter().position(|s| *s == Shot::New) {
        shots.swap(0, first_new);
    }
    shots
}

/// A webhook body with `ids` as its events.
pub fn webhook_body(ids: &[String], webhook_id: &str) -> String {
    let now = crate::admin::rfc3339(SystemTime::now());
    let data: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "external_id": id,
                "topic": "event:klaviyo.email_delivered",
                "payload": {"data": {"type": "event", "id": id, "attributes": {"datetime": now, "event_properties": {}}}},
            })
        })
        .collect();
    serde_json::json!({
        "data": data,
        "meta": {"klaviyo_account_id": "SIM123", "timestamp": now, "klaviyo_webhook_id": webhook_id},
    })
    .to_string()
}

/// The headers Klaviyo sends with `body`, signed with `secret` now.
pub fn signed_headers(body: &str, secret: &str, webhook_id: &str) -> Vec<(&'static str, String)> {
    let timestamp = httpdate::fmt_http_date(SystemTime::now());
    let signature = sign(secret.as_bytes(), body.as_bytes(), &timestamp);
    vec![
        ("content-type", "application/json".to_string()),
        ("klaviyo-webhook-id", webhook_id.to_string()),
        ("klaviyo-timestamp", timestamp),
        ("klaviyo-signature", signature),
    ]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Sends the load and reports what the gate answered.
pub async fn send_webhooks(load: &WebhookLoad) -> Result<WebhookReport, SimError> {
    let tls = crate::upstream::tls_config(load.ca_file.as_deref()).map_err(|e| SimError::Tls(e.to_string()))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let uri: http::Uri = load.to.parse().map_err(|e| SimError::Faults(format!("--to {}: {e}", load.to)))?;
    let shots = Arc::new(plan(load));
    let next = Arc::new(AtomicUsize::new(0));
    // Bodies of the new webhooks sent so far, for redeliveries.
    let originals: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let report = Arc::new(Mutex::new(WebhookReport::default()));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(load.count)));
    let mut workers = Vec::new();
    for _ in 0..load.concurrency.max(1) {
        let (client, uri, shots, next, originals, report, latencies, load) = (
            client.clone(),
            uri.clone(),
            shots.clone(),
            next.clone(),
            originals.clone(),
            report.clone(),
            latencies.clone(),
            load.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(load.seed ^ next.load(Ordering::Relaxed) as u64);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(shot) = shots.get(n).copied() else { return };
                let ids: Vec<String> = (0..load.items.max(1)).map(|j| format!("sim-{}-{n}-{j}", load.seed)).collect();
                let (body, secret) = match shot {
                    Shot::New => {
                        let body = webhook_body(&ids, &load.webhook_id);
                        originals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(body.clone());
                        (body, load.secret.clone())
                    }
                    Shot::Duplicate => {
                        let originals = originals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let body = match originals.len() {
                            0 => webhook_body(&ids, &load.webhook_id),
                            len => originals[rng.usize(..len)].clone(),
                        };
                        (body, load.secret.clone())
                    }
                    Shot::Bad => (webhook_body(&ids, &load.webhook_id), format!("{}-wrong", load.secret)),
                };
                let body_ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["data"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|item| item["external_id"].as_str().map(str::to_string))
                    .collect();
                let mut req = Request::post(uri.clone());
                for (name, value) in signed_headers(&body, &secret, &load.webhook_id) {
                    req = req.header(name, value);
                }
                let req = req.body(Full::new(Bytes::from(body))).expect("valid request");
                let started = std::time::Instant::now();
                let answer = tokio::time::timeout(Duration::from_secs(60), async {
                    let resp = client.request(req).await.ok()?;
                    let status = resp.status();
                    let _ = resp.into_body().collect().await;
                    Some(status)
                })
                .await
                .ok()
                .flatten();
                let elapsed = started.elapsed().as_secs_f64() * 1000.0;
                let mut r = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                r.sent += 1;
                match shot {
                    Shot::Duplicate => r.duplicates_sent += 1,
                    Shot::Bad => r.bad_sent += 1,
                    Shot::New => {}
                }
                if shot == Shot::Bad {
                    r.bad_ids.extend(body_ids.iter().cloned());
                } else {
                    r.valid_ids.extend(body_ids.iter().cloned());
                }
                match answer {
                    None => r.errors += 1,
                    Some(status) => {
                        latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(elapsed);
                        if status.is_success() {
                            r.accepted += 1;
                            if shot != Shot::Bad {
                                r.acked_ids.extend(body_ids);
                            }
                        } else if status == http::StatusCode::UNAUTHORIZED {
                            r.rejected += 1;
                        } else {
                            r.other_status += 1;
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut report = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut lat = latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    lat.sort_by(f64::total_cmp);
    report.latency = Latency {
        p50_ms: percentile(&lat, 0.50),
        p90_ms: percentile(&lat, 0.90),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_has_exact_shares_and_an_original_first() {
        let load = WebhookLoad { count: 1000, duplicates: 0.1, bad_signatures: 0.05, ..WebhookLoad::default() };
        let p = plan(&load);
        let count = |s| p.iter().filter(|x| **x == s).count();
        assert_eq!((count(Shot::New), count(Shot::Duplicate), count(Shot::Bad)), (850, 100, 50));
        assert_eq!(p[0], Shot::New);
        assert_eq!(plan(&load), p, "the seed fixes the plan");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&(1..=100).map(f64::from).collect::<Vec<_>>(), 0.99), 99.0);
    }

    #[test]
    fn bodies_are_signed_as_the_gate_checks() {
        let body = webhook_body(&["a".into()], "w1");
        let headers = signed_headers(&body, "a-secret-0123456789", "w1");
        let get = |n: &str| headers.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()).unwrap();
        let verified = crate::webhooks::signature::verify(
            &["a-secret-0123456789"],
            body.as_bytes(),
            &get("klaviyo-timestamp"),
            &get("klaviyo-signature"),
            SystemTime::now(),
            Duration::from_secs(300),
        );
        assert_eq!(verified, Ok(()));
    }
}
