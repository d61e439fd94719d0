//! The gate's HTTP side: routes, verification, dedup keys and the acknowledgement.
//! Every refusal is answered at once (401 for a bad signature or token), logged with
//! its reason only (never a secret, a header value or the body) and counted.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming as Body;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::Instant;

use super::signature::{self, Rejection};
use super::store::{Accepted, Incoming, Kind};
use super::{Gate, GateError, FLOW_PATH, FLOW_TOKEN_HEADER, SYSTEM_PATH};
use crate::body::{full, ProxyBody};
use crate::error::ProxyError;

/// Loads the PEM certificate chain and key into a TLS acceptor (ring, h2 and HTTP/1.1).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, GateError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what: &Path, e: &dyn std::fmt::Display| GateError::Tls(format!("{}: {e}", what.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, &e))?;
    if certs.is_empty() {
        return Err(err(cert, &"no PEM certificate found"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| GateError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| GateError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Compares two byte strings in time that depends only on their lengths.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request headers kept for delivery: hop-by-hop, `Host`, `Content-Length`, the
/// flow token and anything claiming to be the proxy's own (`x-klaviyo-proxy-*`, so a
/// sender cannot forge `X-Klaviyo-Proxy-Verified`) are dropped.
fn kept_headers(headers: &HeaderMap, drop_signature: bool) -> Vec<(String, Vec<u8>)> {
    let mut headers = headers.clone();
    crate::upstream::strip_hop_by_hop(&mut headers);
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !(n == "host"
                || n == "content-length"
                || n == FLOW_TOKEN_HEADER
                || n.starts_with("x-klaviyo-proxy-")
                || (drop_signature && n == "klaviyo-signature"))
        })
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

/// A system webhook's body, split for dedup: the items kept raw (delivered byte for
/// byte) and the other top-level members.
struct Envelope {
    top: BTreeMap<String, Box<RawValue>>,
    items: Vec<Box<RawValue>>,
    webhook_id: Option<String>,
}

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Envelope {
    fn parse(body: &[u8]) -> Option<Envelope> {
        let top: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(body).ok()?;
        let items: Vec<Box<RawValue>> = serde_json::from_str(top.get("data")?.get()).ok()?;
        let webhook_id = top
            .get("meta")
            .and_then(|m| serde_json::from_str::<Value>(m.get()).ok())
            .and_then(|m| m.get("klaviyo_webhook_id").and_then(id_text));
        Some(Envelope { top, items, webhook_id })
    }

    fn item_ids(&self) -> Vec<Option<String>> {
        #[derive(serde::Deserialize)]
        struct Item {
            external_id: Option<Value>,
        }
        self.items
            .iter()
            .map(|raw| {
                serde_json::from_str::<Item>(raw.get()).ok().and_then(|i| i.external_id).and_then(|v| id_text(&v))
            })
            .collect()
    }

    /// The body with only the items marked new.
    fn with_items(&self, fresh: &[bool]) -> Vec<u8> {
        let kept: Vec<&RawValue> = self.items.iter().zip(fresh).filter(|(_, f)| **f).map(|(i, _)| &**i).collect();
        let mut top: BTreeMap<&str, &RawValue> = self.top.iter().map(|(k, v)| (k.as_str(), &**v)).collect();
        let data = serde_json::value::to_raw_value(&kept).expect("raw items serialize");
        top.insert("data", &data);
        serde_json::to_vec(&top).expect("a map of raw values serializes")
    }
}

fn refusal(error: ProxyError) -> Response<ProxyBody> {
    error.into_response(&format!("wh-{:016x}", fastrand::u64(..)))
}

fn accepted(body: Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl Gate {
    /// Serves one request on the gate's listener.
    pub async fn handle(self: Arc<Self>, req: Request<Body>) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let kind = if path == SYSTEM_PATH && !self.secrets.is_empty() {
            Kind::System
        } else if (path == FLOW_PATH || path.starts_with("/webhooks/flow/")) && self.settings.flow.token.is_some() {
            Kind::Flow
        } else {
            return Ok(refusal(ProxyError::WebhookRoute));
        };
        if req.method() != Method::POST {
            return Ok(refusal(ProxyError::WebhookRoute));
        }
        self.webhook_metrics().received(kind);
        let resp = match self.clone().receive(kind, req).await {
            Ok(resp) => {
                self.webhook_metrics().acknowledged(started.elapsed().as_secs_f64());
                resp
            }
            Err(reason) => {
                self.webhook_metrics().rejected(reason);
                tracing::warn!(kind = kind.as_str(), reason = reason.as_str(), "webhook rejected");
                refusal(match reason {
                    Rejection::TooLarge => ProxyError::BodyTooLarge { limit: self.settings.max_body_bytes },
                    Rejection::BadBody => ProxyError::BadRequest("the body is not a webhook (JSON with data[])".into()),
                    reason => ProxyError::WebhookRejected(reason.as_str()),
                })
            }
        };
        Ok(resp)
    }

    async fn receive(self: Arc<Self>, kind: Kind, req: Request<Body>) -> Result<Response<ProxyBody>, Rejection> {
        let (parts, body) = req.into_parts();
        if kind == Kind::Flow {
            // Before reading the body: a caller without the token gets nothing read.
            let token = self.settings.flow.token.as_ref().expect("flow route only with a token");
            let given = parts
                .uri
                .path()
                .strip_prefix("/webhooks/flow/")
                .map(str::as_bytes)
                .or_else(|| parts.headers.get(FLOW_TOKEN_HEADER).map(HeaderValue::as_bytes))
                .unwrap_or_default();
            if !same_token(given, token.expose().as_bytes()) {
                return Err(Rejection::BadToken);
            }
        }
        let limit = self.settings.max_body_bytes;
        let read = tokio::time::timeout(super::BODY_READ_TIMEOUT, http_body_util::Limited::new(body, limit).collect());
        let body = match read.await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(Rejection::TooLarge)
            }
            Ok(Err(_)) => return Err(Rejection::BadBody),
            // A sender that trickles its body holds a connection for nothing.
            Err(_) => return Err(Rejection::BadBody),
        };
        let (item_ids, envelope) = match kind {
            Kind::System => {
                let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
                let (Some(sig), Some(ts), Some(webhook_id)) =
                    (header("klaviyo-signature"), header("klaviyo-timestamp"), header("klaviyo-webhook-id"))
                else {
                    return Err(Rejection::MissingHeader);
                };
                let tolerance = Duration::from_millis(self.settings.tolerance_ms);
                signature::verify(&self.secrets, &body, ts, sig, SystemTime::now(), tolerance)?;
                let envelope = Envelope::parse(&body).ok_or(Rejection::BadBody)?;
                if envelope.webhook_id.as_deref() != Some(webhook_id) {
                    return Err(Rejection::WebhookIdMismatch);
                }
                (envelope.item_ids(), Some(envelope))
            }
            Kind::Flow => {
                let id = self.settings.flow.dedup_pointer.as_ref().and_then(|p| {
                    serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.pointer(p.as_str()).and_then(id_text))
                });
                (vec![id], None)
            }
        };
        let incoming = Incoming {
            kind,
            headers: kept_headers(&parts.headers, false),
            partial_headers: kept_headers(&parts.headers, true),
            item_ids,
            body_for: Box::new(move |fresh| envelope.as_ref().map(|e| e.with_items(fresh)).unwrap_or_default()),
            body,
            now_ms: super::now_ms(),
        };
        let (accepted_as, pruned) = match self.writer.accept(incoming).await {
            Ok(r) => r,
            Err(e) => {
                // Not stored: Klaviyo must send it again, so no 200.
                tracing::error!(error = %e, "webhook store write failed");
                // A full disk: the file is reopened within a second.
                let retry_after = crate::durable::REOPEN_EVERY;
                return Ok(refusal(ProxyError::StoreUnavailable { store: "webhook store", retry_after }));
            }
        };
        self.webhook_metrics().evicted(pruned.early);
        if pruned.early > 0 {
            tracing::warn!(forgotten = pruned.early, "webhook dedup table full: ids forgotten before the dedup TTL");
        }
        let body = match accepted_as {
            Accepted::Queued { id, duplicates } => {
                self.webhook_metrics().duplicates(kind, duplicates);
                self.webhook_metrics().backlog.inc();
                self.wake.notify_one();
                serde_json::json!({"status": "accepted", "id": id, "duplicates": duplicates})
            }
            Accepted::Duplicate { duplicates } => {
                self.webhook_metrics().duplicates(kind, duplicates);
                tracing::debug!(kind = kind.as_str(), duplicates, "webhook already seen: acknowledged, not delivered");
                serde_json::json!({"status": "duplicate", "duplicates": duplicates})
            }
        };
        Ok(accepted(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_batches_keep_items_byte_for_byte() {
        let body = br#"{"meta":{"klaviyo_webhook_id":"w"},"data":[{"external_id":"a","payload":{"n":1.50}},{"external_id":7,"x":[]},{"topic":"t"}]}"#;
        let e = Envelope::parse(body).unwrap();
        assert_eq!(e.webhook_id.as_deref(), Some("w"));
        assert_eq!(e.item_ids(), [Some("a".to_string()), Some("7".to_string()), None]);
        let out = String::from_utf8(e.with_items(&[true, false, true])).unwrap();
        assert_eq!(
            out,
            r#"{"data":[{"external_id":"a","payload":{"n":1.50}},{"topic":"t"}],"meta":{"klaviyo_webhook_id":"w"}}"#
        );
        assert!(Envelope::parse(b"{\"meta\":{}}").is_none());
        assert!(Envelope::parse(b"not json").is_none());
    }

    #[test]
    fn headers_kept_for_delivery() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "gate"),
            ("content-length", "10"),
            ("content-type", "application/json"),
            ("klaviyo-signature", "abc"),
            ("x-klaviyo-proxy-verified", "true"),
            ("x-webhook-token", "tok"),
            ("connection", "close"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        let names = |drop| kept_headers(&h, drop).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(false), ["content-type", "klaviyo-signature"]);
        assert_eq!(names(true), ["content-type"]);
        assert!(same_token(b"abc", b"abc") && !same_token(b"abc", b"abd") && !same_token(b"ab", b"abc"));
    }
}
