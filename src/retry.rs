//! When and how to repeat a request: `Retry-After` parsing, exponential backoff with
//! full jitter, a retry budget that keeps an outage from multiplying traffic, and the
//! rules for which requests are safe to repeat.
//!
//! Everything here is pure or takes the time as an argument, so it is table-tested and
//! tested under paused tokio time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Method;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::catalog::Operation;

/// The wait a response's `Retry-After` header asks for (see [`parse_retry_after`]),
/// or `None` when it is missing or unusable.
pub fn retry_after_of(headers: &http::HeaderMap, cap: Duration) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now(), cap)
}

/// Parses an upstream `Retry-After` value into a wait, capped at `cap`.
///
/// Accepted forms (RFC 9110 §10.2.3):
/// - delay-seconds: `"30"` → 30 s; surrounding spaces are ignored;
/// - an HTTP-date (`"Sun, 06 Nov 1994 08:49:37 GMT"`, and the obsolete RFC 850 and
///   asctime forms) → the time from `now` until then.
///
/// Returns `None` — the caller falls back to its backoff — for a zero wait (an
/// immediate retry always meets another 429), a negative number, a date not in the
/// future, and anything unparsable. An enormous value (more digits than a `u64`, or
/// any wait past `cap`) becomes `cap`.
pub fn parse_retry_after(value: &str, now: SystemTime, cap: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: seconds. Too many digits for a u64 is still "a very long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).ok()?
    };
    if wait.is_zero() {
        return None;
    }
    Some(wait.min(cap))
}

/// The wait Klaviyo names in a 429's JSON:API body, for a 429 without a usable
/// `Retry-After`: the first `errors[].detail` saying `"... Expected available in N
/// seconds."` (or `"1 second"`), capped at `cap`.
///
/// Accepted: whole or decimal seconds (`"2"`, `"1.5"` → rounded up to whole
/// milliseconds), any case of the phrase, anywhere in the detail. `None` — the caller
/// falls back to its backoff — for a body that is not JSON:API, a detail without the
/// phrase, a zero or unparsable number.
pub fn retry_after_from_body(body: &[u8], cap: Duration) -> Option<Duration> {
    const PHRASE: &str = "expected available in ";
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    doc.get("errors")?.as_array()?.iter().find_map(|e| {
        let detail = e.get("detail")?.as_str()?.to_ascii_lowercase();
        let rest = &detail[detail.find(PHRASE)? + PHRASE.len()..];
        let number: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let unit = rest[number.len()..].trim_start();
        if !unit.starts_with("second") {
            return None;
        }
        let secs: f64 = number.trim_end_matches('.').parse().ok()?;
        if !(secs.is_finite() && secs > 0.0) {
            return None;
        }
        let millis = (secs * 1000.0).ceil();
        Some(Duration::from_millis(if millis >= u64::MAX as f64 { u64::MAX } else { millis as u64 }).min(cap))
    })
}

/// Whether an upstream answer is a Cloudflare challenge (`403` with `cf-mitigated:
/// challenge`, met from some cloud egress addresses) rather than Klaviyo refusing the
/// key: repeating it gets the same challenge, and it says nothing about the key.
pub fn is_challenge(status: http::StatusCode, headers: &http::HeaderMap) -> bool {
    const CF_MITIGATED: http::HeaderName = http::HeaderName::from_static("cf-mitigated");
    status == http::StatusCode::FORBIDDEN
        && headers
            .get_all(CF_MITIGATED)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("challenge"))))
}

/// Exponential backoff with full jitter: attempt `n` (0-based) waits a uniformly random
/// time in `[0, min(cap, base * 2^n)]` (the AWS "full jitter" scheme, which spreads
/// retries of many clients best).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub base: Duration,
    /// No wait is longer.
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling for retry `attempt` (0 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A jittered wait for retry `attempt`, drawn from `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rng.u64(0..=micros))
    }
}

/// Limits retries to a share of recent requests, plus a floor per second, over a
/// rolling window (like Finagle's and tower's retry budgets): during an outage the
/// upstream sees at most `(1 + ratio)` times the client traffic, not `max_attempts` times.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_second: u32,
    window: Duration,
    slots: Mutex<VecDeque<Slot>>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    second: u64,
    requests: u64,
    retries: u64,
}

/// Length of one slot of the budget's rolling window.
const SLOT: Duration = Duration::from_secs(1);

impl RetryBudget {
    /// A budget allowing `ratio` retries per first attempt, and `floor_per_second`
    /// retries per second regardless, counted over `window`.
    pub fn new(ratio: f64, floor_per_second: u32, window: Duration) -> Self {
        RetryBudget { ratio, floor_per_second, window: window.max(SLOT), slots: Mutex::new(VecDeque::new()) }
    }

    fn with_slot<T>(&self, now: Instant, epoch: Instant, f: impl FnOnce(&mut VecDeque<Slot>, &mut Slot) -> T) -> T {
        let second = now.saturating_duration_since(epoch).as_secs();
        let span = self.window.as_secs().max(1);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        while slots.front().is_some_and(|s| s.second + span <= second) {
            slots.pop_front();
        }
        if slots.back().is_none_or(|s| s.second != second) {
            slots.push_back(Slot { second, requests: 0, retries: 0 });
        }
        let mut current = slots.pop_back().expect("pushed above");
        let out = f(&mut slots, &mut current);
        slots.push_back(current);
        out
    }

    /// Counts a first attempt. `epoch` is any fixed instant shared by all calls.
    pub fn deposit(&self, now: Instant, epoch: Instant) {
        self.with_slot(now, epoch, |_, s| s.requests += 1);
    }

    /// Takes one retry from the budget if it has room; `false` means do not retry.
    pub fn withdraw(&self, now: Instant, epoch: Instant) -> bool {
        let ratio = self.ratio;
        let floor = f64::from(self.floor_per_second) * self.window.as_secs_f64();
        self.with_slot(now, epoch, |older, current| {
            let (requests, retries) = older
                .iter()
                .chain(std::iter::once(&*current))
                .fold((0u64, 0u64), |(q, r), s| (q + s.requests, r + s.retries));
            let allowed = floor + ratio * requests as f64;
            if (retries as f64) < allowed {
                current.retries += 1;
                true
            } else {
                false
            }
        })
    }
}

/// Operations that create-or-update (upsert) by an identity Klaviyo derives from the
/// body, so sending one twice leaves the same state: safe to repeat.
pub const UPSERTS: &[&str] = &[
    "create_or_update_profile",
    "create_push_token",
    "create_client_profile",
    "create_client_push_token",
    "unregister_client_push_token",
    "create_client_subscription",
    "bulk_subscribe_profiles",
    "bulk_unsubscribe_profiles",
    "bulk_suppress_profiles",
    "bulk_unsuppress_profiles",
    "bulk_import_profiles",
];

/// Operations whose body carries a `unique_id` Klaviyo deduplicates on.
pub const EVENT_CREATES: &[&str] = &["create_event", "create_client_event"];

/// Whether an operation is one of Klaviyo's upserts.
pub fn is_upsert(op: &Operation) -> bool {
    UPSERTS.contains(&op.id)
}

/// Whether an operation creates one event (and so may carry a `unique_id`).
pub fn is_event_create(op: &Operation) -> bool {
    EVENT_CREATES.contains(&op.id)
}

/// How a request may be repeated after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// Repeating cannot change the result: retry after any failure.
    Safe,
    /// Retry only when the request certainly never reached the upstream.
    OnlyIfUnsent,
}

/// A per-operation override of [`repeat_rule`], from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOverride {
    /// Treat as safe to repeat.
    Always,
    /// Retry only when the request was never sent.
    Never,
}

/// Decides whether a request is safe to repeat: idempotent methods, Klaviyo's upserts,
/// and event creations carrying a `unique_id`; everything else only when unsent.
pub fn repeat_rule(
    method: &Method,
    op: Option<&Operation>,
    has_unique_id: bool,
    over: Option<RetryOverride>,
) -> Repeat {
    match over {
        Some(RetryOverride::Always) => return Repeat::Safe,
        Some(RetryOverride::Never) => return Repeat::OnlyIfUnsent,
        None => {}
    }
    let idempotent_method =
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE);
    let safe_op = op.is_some_and(|op| is_upsert(op) || (is_event_create(op) && has_unique_id));
    if idempotent_method || safe_op {
        Repeat::Safe
    } else {
        Repeat::OnlyIfUnsent
    }
}

/// A fresh `unique_id` (128 random bits, hex).
pub fn new_unique_id() -> String {
    format!("kp-{}", crate::hardening::random::hex128())
}

/// Reads an event body's `data.attributes.unique_id`, adding a fresh one when the body
/// is a JSON:API event without it. Returns the body to send and the id, or `None` when
/// the body is not an event object (it is then sent unchanged).
pub fn ensure_unique_id(body: &Bytes) -> Option<(Bytes, String)> {
    // Only the three objects on the way to `unique_id` are split into their members; every
    // other value stays a borrowed slice of the body (checked, never built as a tree: a
    // 5 MB array of zeros would cost ~100 MB as `serde_json::Value`s).
    type Members<'a> = BTreeMap<String, &'a RawValue>;
    let mut doc: Members = serde_json::from_slice(body).ok()?;
    let mut data: Members = serde_json::from_str(doc.get("data")?.get()).ok()?;
    let mut attributes: Members = serde_json::from_str(data.get("attributes")?.get()).ok()?;
    let given = attributes.get("unique_id").and_then(|v| serde_json::from_str::<String>(v.get()).ok());
    if let Some(id) = given.filter(|s| !s.is_empty()) {
        return Some((body.clone(), id));
    }
    let id = new_unique_id();
    let id_raw = serde_json::value::to_raw_value(&id).ok()?;
    attributes.insert("unique_id".into(), &id_raw);
    let attributes_raw = serde_json::value::to_raw_value(&attributes).ok()?;
    data.insert("attributes".into(), &attributes_raw);
    let data_raw = serde_json::value::to_raw_value(&data).ok()?;
    doc.insert("data".into(), &data_raw);
    Some((Bytes::from(serde_json::to_vec(&doc).ok()?), id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;
    use serde_json::Value;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let cap = Duration::from_secs(120);
        let cases: &[(&str, Option<u64>)] = &[
            ("30", Some(30)),
            (" 7 ", Some(7)),
            ("1", Some(1)),
            ("0", None),
            ("-5", None),
            ("+5", None),
            ("3.5", None),
            ("", None),
            ("soon", None),
            ("99999999999999999999999999", Some(120)),
            ("86400", Some(120)),
            ("Sun, 06 Nov 1994 08:50:07 GMT", Some(30)),
            ("Sunday, 06-Nov-94 08:50:07 GMT", Some(30)),
            ("Sun Nov  6 08:50:07 1994", Some(30)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:00:00 GMT", None),
            ("Sat, 06 Nov 2094 08:49:37 GMT", Some(120)),
            ("Sun, 32 Nov 1994 08:49:37 GMT", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_retry_after(value, now, cap), want.map(Duration::from_secs), "{value:?}");
        }
    }

    #[test]
    fn wait_named_in_a_throttled_body() {
        let cap = Duration::from_secs(60);
        let body = |detail: &str| {
            serde_json::json!({"errors": [{"id": "x", "status": 429, "code": "throttled",
                "title": "Request was throttled.", "detail": detail}]})
            .to_string()
        };
        let cases: &[(&str, Option<u64>)] = &[
            ("Request was throttled. Expected available in 7 seconds.", Some(7_000)),
            ("Request was throttled. Expected available in 1 second.", Some(1_000)),
            ("expected AVAILABLE in 2 seconds", Some(2_000)),
            ("Expected available in 1.5 seconds.", Some(1_500)),
            ("Expected available in 0.0004 seconds.", Some(1)),
            ("Expected available in 3600 seconds.", Some(60_000)),
            ("Expected available in 99999999999999999999999 seconds.", Some(60_000)),
            ("Expected available in 0 seconds.", None),
            ("Expected available in soon seconds.", None),
            ("Expected available in 5 minutes.", None),
            ("Expected available in . seconds.", None),
            ("Request was throttled.", None),
            ("", None),
        ];
        for (detail, want) in cases {
            let got = retry_after_from_body(body(detail).as_bytes(), cap);
            assert_eq!(got, want.map(Duration::from_millis), "{detail:?}");
        }
        // The first error that names a wait; not JSON:API, or no detail: nothing.
        let two = r#"{"errors":[{"detail":"Throttled."},{"detail":"Expected available in 4 seconds."}]}"#;
        assert_eq!(retry_after_from_body(two.as_bytes(), cap), Some(Duration::from_secs(4)));
        for other in [&b"<html>Expected available in 4 seconds.</html>"[..], b"{}", br#"{"errors":[{}]}"#, b""] {
            assert_eq!(retry_after_from_body(other, cap), None, "{:?}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn cloudflare_challenges_are_told_apart_from_key_refusals() {
        use http::{HeaderMap, HeaderValue, StatusCode};
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("cf-mitigated", HeaderValue::from_static(v));
            h
        };
        let cases: &[(StatusCode, HeaderMap, bool)] = &[
            (StatusCode::FORBIDDEN, with("challenge"), true),
            (StatusCode::FORBIDDEN, with("Challenge"), true),
            (StatusCode::FORBIDDEN, with("block, challenge"), true),
            (StatusCode::FORBIDDEN, HeaderMap::new(), false),
            (StatusCode::FORBIDDEN, with("block"), false),
            (StatusCode::UNAUTHORIZED, with("challenge"), false),
            (StatusCode::OK, with("challenge"), false),
        ];
        for (status, headers, want) in cases {
            assert_eq!(is_challenge(*status, headers), *want, "{status} {headers:?}");
        }
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(2) };
        let ceilings: Vec<u64> = (0..8).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(2));
        let mut rng = fastrand::Rng::with_seed(7);
        let draws: Vec<Duration> = (0..2000).map(|_| b.delay(3, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_millis(800)));
        // Full jitter: the draws cover the whole range, not a band near the ceiling.
        assert!(draws.iter().any(|d| *d < Duration::from_millis(80)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(720)));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_keeps_retries_under_a_share_with_a_floor() {
        let epoch = Instant::now();
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        // No traffic: the floor alone allows 10 retries per 10 s window.
        let floor: usize = (0..50).filter(|_| budget.withdraw(epoch, epoch)).count();
        assert_eq!(floor, 10);
        // 1000 requests over the next 10 s allow 20% more.
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut allowed = 0;
        for s in 0..10 {
            let now = Instant::now() + Duration::from_secs(s);
            for _ in 0..100 {
                budget.deposit(now, epoch);
                allowed += usize::from(budget.withdraw(now, epoch));
            }
        }
        assert!((200..=210).contains(&allowed), "{allowed}");
        // Old traffic leaves the window, and with it the allowance.
        let later = Instant::now() + Duration::from_secs(40);
        let after: usize = (0..50).filter(|_| budget.withdraw(later, epoch)).count();
        assert_eq!(after, 10);
    }

    #[test]
    fn what_is_safe_to_repeat() {
        type Case = (Method, Option<&'static str>, bool, Option<RetryOverride>, Repeat);
        let cases: &[Case] = &[
            (Method::GET, Some("get_profiles"), false, None, Repeat::Safe),
            (Method::DELETE, Some("delete_list"), false, None, Repeat::Safe),
            (Method::PATCH, Some("update_profile"), false, None, Repeat::OnlyIfUnsent),
            (Method::POST, Some("create_campaign"), false, None, Repeat::OnlyIfUnsent),
            (Method::POST, Some("create_or_update_profile"), false, None, Repeat::Safe),
            (Method::POST, Some("create_event"), false, None, Repeat::OnlyIfUnsent),
            (Method::POST, Some("create_event"), true, None, Repeat::Safe),
            (Method::POST, Some("create_client_event"), true, None, Repeat::Safe),
            (Method::POST, Some("create_campaign"), false, Some(RetryOverride::Always), Repeat::Safe),
            (Method::GET, Some("get_profiles"), false, Some(RetryOverride::Never), Repeat::OnlyIfUnsent),
            (Method::POST, None, true, None, Repeat::OnlyIfUnsent),
        ];
        for (method, id, uid, over, want) in cases {
            let operation = id.and_then(catalog::by_id);
            assert!(id.is_none() || operation.is_some(), "{id:?} is in the catalog");
            assert_eq!(repeat_rule(method, operation, *uid, *over), *want, "{method} {id:?} {uid}");
        }
        for id in UPSERTS.iter().chain(EVENT_CREATES) {
            assert!(catalog::by_id(id).is_some(), "{id} is in the catalog");
        }
    }

    #[test]
    fn events_get_a_unique_id_once() {
        let body = Bytes::from_static(br#"{"data":{"type":"event","attributes":{"properties":{"a":1}}}}"#);
        let (with, id) = ensure_unique_id(&body).unwrap();
        let v: Value = serde_json::from_slice(&with).unwrap();
        assert_eq!(v["data"]["attributes"]["unique_id"], id.as_str());
        assert_eq!(v["data"]["attributes"]["properties"]["a"], 1);
        // A body that already has one is sent byte for byte.
        let (again, same) = ensure_unique_id(&with).unwrap();
        assert_eq!((again, same), (with, id));
        assert!(ensure_unique_id(&Bytes::from_static(b"not json")).is_none());
        assert!(ensure_unique_id(&Bytes::from_static(br#"{"data":[]}"#)).is_none());
        assert!(ensure_unique_id(&Bytes::from_static(br#"{"data":{"attributes":[1]}}"#)).is_none());
        assert!(ensure_unique_id(&Bytes::from_static(br#"{"data":{"attributes":{"a":[1,}}}"#)).is_none());
        // A non-string or empty id is replaced; other members are kept byte for byte.
        let body = Bytes::from_static(
            br#"{"data":{"type":"event","attributes":{"unique_id":7,"p":{"x":[1.50,"\u00e9"]}}},"z":1}"#,
        );
        let (with, id) = ensure_unique_id(&body).unwrap();
        let text = std::str::from_utf8(&with).unwrap();
        assert!(
            text.contains(r#""p":{"x":[1.50,"\u00e9"]}"#) && text.contains(&format!(r#""unique_id":"{id}""#)),
            "{text}"
        );
        let v: Value = serde_json::from_slice(&with).unwrap();
        assert_eq!((v["z"].as_i64(), v["data"]["type"].as_str()), (Some(1), Some("event")));
    }
}
