//! `POST /api/event-bulk-create-jobs` the way Klaviyo answers it: at most 1,000 events
//! and 5 MB per job; one invalid event refuses the whole job with `400`, one error per
//! invalid event, each with a `source.pointer` into the job; otherwise `202`.
//!
//! The simulator checks on its own terms (it shares nothing with the proxy's
//! coalescer but the catalog), and it refuses one thing the proxy's shape checks pass:
//! a `value_currency` that is not an ISO 4217 code of three capital letters, as
//! Klaviyo does.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::{full, ProxyBody};

/// Most events in one job.
pub const MAX_EVENTS: usize = 1000;
/// Largest job body.
pub const MAX_BYTES: usize = 5 * 1024 * 1024;

/// Why a job was refused.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    errors: Vec<(String, String)>,
}

impl Refusal {
    fn one(status: StatusCode, pointer: &str, detail: &str) -> Refusal {
        Refusal { status, errors: vec![(pointer.to_string(), detail.to_string())] }
    }

    /// Klaviyo's error document.
    pub fn into_response(self) -> Response<ProxyBody> {
        let errors: Vec<Value> = self
            .errors
            .iter()
            .map(|(pointer, detail)| {
                json!({"id": format!("{:032x}", fastrand::u128(..)), "status": self.status.as_u16(), "code": "invalid",
                       "title": "Invalid input.", "detail": detail, "source": {"pointer": pointer}, "links": {}, "meta": {}})
            })
            .collect();
        let mut resp = Response::new(full(Bytes::from(json!({"errors": errors}).to_string())));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/vnd.api+json"));
        resp
    }
}

/// Checks a job; `Ok` holds the `unique_id` of every event (empty for none).
pub fn check(body: &[u8]) -> Result<Vec<String>, Refusal> {
    if body.len() > MAX_BYTES {
        return Err(Refusal::one(StatusCode::PAYLOAD_TOO_LARGE, "/", "The maximum allowed payload size is 5MB."));
    }
    let doc: Value = serde_json::from_slice(body)
        .map_err(|_| Refusal::one(StatusCode::BAD_REQUEST, "/", "The body is not valid JSON."))?;
    if doc.pointer("/data/type").and_then(Value::as_str) != Some("event-bulk-create-job") {
        return Err(Refusal::one(StatusCode::BAD_REQUEST, "/data/type", "Expected event-bulk-create-job."));
    }
    const ENTRIES: &str = "/data/attributes/events-bulk-create/data";
    let Some(entries) = doc.pointer(ENTRIES).and_then(Value::as_array) else {
        return Err(Refusal::one(StatusCode::BAD_REQUEST, ENTRIES, "This field is required."));
    };
    let events: usize = entries
        .iter()
        .map(|e| e.pointer("/attributes/events/data").and_then(Value::as_array).map_or(0, Vec::len))
        .sum();
    if events > MAX_EVENTS {
        return Err(Refusal::one(StatusCode::BAD_REQUEST, ENTRIES, "Accepts up to 1,000 events per request."));
    }
    let mut ids = Vec::with_capacity(events);
    let mut errors = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = |rest: &str| format!("{ENTRIES}/{i}{rest}");
        if entry["type"] != "event-bulk-create" {
            errors.push((at("/type"), "Expected event-bulk-create.".into()));
            continue;
        }
        let profile = &entry["attributes"]["profile"]["data"];
        let attrs = &profile["attributes"];
        let identified = profile["id"].as_str().is_some_and(|s| !s.is_empty())
            || ["email", "phone_number", "external_id", "anonymous_id", "_kx"]
                .iter()
                .any(|k| attrs[*k].as_str().is_some_and(|s| !s.is_empty()));
        if profile["type"] != "profile" || !identified {
            errors.push((at("/attributes/profile/data"), "A profile identifier is required.".into()));
            continue;
        }
        let Some(list) = entry.pointer("/attributes/events/data").and_then(Value::as_array) else {
            errors.push((at("/attributes/events/data"), "This field is required.".into()));
            continue;
        };
        for (j, event) in list.iter().enumerate() {
            let ev = |rest: &str| at(&format!("/attributes/events/data/{j}/attributes{rest}"));
            let a = &event["attributes"];
            if event["type"] != "event" {
                errors.push((at(&format!("/attributes/events/data/{j}/type")), "Expected event.".into()));
            } else if !a["properties"].is_object() {
                errors.push((ev("/properties"), "This field must be an object.".into()));
            } else if a.pointer("/metric/data/attributes/name").and_then(Value::as_str).is_none_or(str::is_empty) {
                errors.push((ev("/metric/data/attributes/name"), "A metric name is required.".into()));
            } else if let Some(c) = a.get("value_currency").filter(|c| !c.is_null()) {
                let iso = c.as_str().is_some_and(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()));
                if !iso {
                    errors.push((ev("/value_currency"), "Must be an ISO 4217 currency code.".into()));
                }
            }
            ids.push(a["unique_id"].as_str().unwrap_or_default().to_string());
        }
    }
    if errors.is_empty() {
        Ok(ids)
    } else {
        Err(Refusal { status: StatusCode::BAD_REQUEST, errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uid: &str, currency: &str) -> Value {
        json!({"type": "event-bulk-create", "attributes": {
            "profile": {"data": {"type": "profile", "attributes": {"email": "a@example.com"}}},
            "events": {"data": [{"type": "event", "attributes": {
                "properties": {}, "metric": {"data": {"type": "metric", "attributes": {"name": "M"}}},
                "value_currency": currency, "unique_id": uid}}]}}})
    }

    fn job(entries: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({"data": {"type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": entries}}}}))
        .unwrap()
    }

    #[test]
    fn a_good_job_lists_its_ids() {
        assert_eq!(check(&job(vec![entry("a", "USD"), entry("b", "EUR")])).unwrap(), ["a", "b"]);
    }

    #[test]
    fn a_bad_event_refuses_the_job_and_is_pointed_at() {
        let err = check(&job(vec![entry("a", "USD"), entry("b", "dollars"), entry("c", "USD")])).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.errors.len(), 1);
        assert_eq!(
            err.errors[0].0,
            "/data/attributes/events-bulk-create/data/1/attributes/events/data/0/attributes/value_currency"
        );
    }

    #[test]
    fn caps() {
        let many = (0..=MAX_EVENTS).map(|i| entry(&i.to_string(), "USD")).collect();
        assert_eq!(check(&job(many)).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(check(&vec![b' '; MAX_BYTES + 1]).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
