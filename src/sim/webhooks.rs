//! The simulator's webhook sender: signed system webhooks as Klaviyo sends them
//! (`Klaviyo-Webhook-Id`, `Klaviyo-Timestamp` as an IMF-fixdate, `Klaviyo-Signature`
//! over body and timestamp), with a share of redeliveries (the same body under a fresh
//! `Klaviyo-Timestamp` and signature, as Klaviyo's retries are) and a share signed with a wrong
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
    /// A redelivery of the new webhook at this position of the plan.
    Duplicate {
        of: usize,
    },
    Bad,
}

/// The order of new, duplicate and bad webhooks: exact counts, shuffled by the seed,
/// a new one first, and each duplicate naming a new one before it. The plan fixes
/// what a redelivery repeats, so the workers, racing for shots, cannot change it.
fn plan(load: &WebhookLoad) -> Vec<Shot> {
    let bad = ((load.count as f64 * load.bad_signatures.clamp(0.0, 1.0)).round() as usize).min(load.count);
    // At least one original when anything is validly signed.
    let dup = ((load.count as f64 * load.duplicates.clamp(0.0, 1.0)).round() as usize)
        .min((load.count - bad).saturating_sub(1));
    let mut shots: Vec<Shot> =
        std::iter::repeat_n(Shot::Bad, bad).chain(std::iter::repeat_n(Shot::Duplicate { of: 0 }, dup)).collect();
    shots.resize(load.count, Shot::New);
    let mut rng = fastrand::Rng::with_seed(load.seed);
    rng.shuffle(&mut shots);
    if let Some(first_new) = shots.iter().position(|s| *s == Shot::New) {
        shots.swap(0, first_new);
    }
    let mut originals = Vec::new();
    for (n, shot) in shots.iter_mut().enumerate() {
        match shot {
            Shot::New => originals.push(n),
            Shot::Duplicate { of } => *of = originals[rng.usize(..originals.len())],
            Shot::Bad => {}
        }
    }
    shots
}

/// A webhook body with `ids` as its events, timestamped now.
pub fn webhook_body(ids: &[String], webhook_id: &str) -> String {
    webhook_body_at(ids, webhook_id, SystemTime::now())
}

/// A webhook body with `ids` as its events, timestamped `at`: the same arguments give
/// the same body, as a redelivery repeats it.
fn webhook_body_at(ids: &[String], webhook_id: &str, at: SystemTime) -> String {
    let now = crate::admin::rfc3339(at);
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
    // Every body carries the run's start: a redelivery is built again, byte for byte.
    let started = SystemTime::now();
    let report = Arc::new(Mutex::new(WebhookReport::default()));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(load.count)));
    let mut workers = Vec::new();
    for _ in 0..load.concurrency.max(1) {
        let (client, uri, shots, next, report, latencies, load) =
            (client.clone(), uri.clone(), shots.clone(), next.clone(), report.clone(), latencies.clone(), load.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(shot) = shots.get(n).copied() else { return };
                let (of, secret) = match shot {
                    Shot::New => (n, load.secret.clone()),
                    Shot::Duplicate { of } => (of, load.secret.clone()),
                    Shot::Bad => (n, format!("{}-wrong", load.secret)),
                };
                let body_ids: Vec<String> =
                    (0..load.items.max(1)).map(|j| format!("sim-{}-{of}-{j}", load.seed)).collect();
                let body = webhook_body_at(&body_ids, &load.webhook_id, started);
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
                    Shot::Duplicate { .. } => r.duplicates_sent += 1,
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
        let count = |f: fn(&Shot) -> bool| p.iter().filter(|x| f(x)).count();
        let counts =
            (count(|s| *s == Shot::New), count(|s| matches!(s, Shot::Duplicate { .. })), count(|s| *s == Shot::Bad));
        assert_eq!(counts, (850, 100, 50));
        assert_eq!(p[0], Shot::New);
        for (n, shot) in p.iter().enumerate() {
            if let Shot::Duplicate { of } = *shot {
                assert!(of < n && p[of] == Shot::New, "{n} repeats {of}");
            }
        }
        let all_dup = plan(&WebhookLoad { count: 10, duplicates: 1.0, ..WebhookLoad::default() });
        assert_eq!(all_dup[0], Shot::New, "a redelivery needs an original");
        assert_eq!(plan(&load), p, "the seed fixes the plan");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&(1..=100).map(f64::from).collect::<Vec<_>>(), 0.99), 99.0);
    }

    /// Redeliveries repeat webhooks sent before them, whichever worker gets to its
    /// shot first: the report's unique ids are exactly the new webhooks' ids.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_redelivery_repeats_an_earlier_webhook() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = format!("http://{}/webhooks/klaviyo", listener.local_addr().unwrap());
        let ok = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::server::serve(listener, None, Default::default(), ok, async {
            let _ = stopped.await;
        }));
        for seed in 0..40 {
            let load = WebhookLoad {
                to: to.clone(),
                secret: "s".into(),
                count: 64,
                duplicates: 0.5,
                concurrency: 32,
                seed,
                ..WebhookLoad::default()
            };
            let report = send_webhooks(&load).await.unwrap();
            assert_eq!((report.accepted, report.duplicates_sent), (64, 32), "seed {seed}: {report:?}");
            assert_eq!(report.valid_ids.len(), 32, "seed {seed}: a redelivery made up a new webhook");
        }
        let _ = stop.send(());
        server.await.unwrap();
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
