//! One `create_event` body: checked against the shape Klaviyo validates synchronously
//! (the client no longer sees Klaviyo's 400 once the proxy answers 202), and turned
//! into one entry of a `bulk_create_events` job.
//!
//! The checks follow `create_event`'s schema (`EventCreateQueryV2`) and the limits its
//! reference states: `properties` an object of at most 300 properties, no string over
//! 100 KB, no array over 4,000 elements, at most 10 levels of nesting; a metric name
//! under 128 characters; `time` an RFC 3339 date-time after 2000 and at most a year
//! ahead; a profile identifier (`id`, `email`, `phone_number`, `external_id`,
//! `anonymous_id` or `_kx`). The body is read once with borrowed raw values, never
//! into a `serde_json::Value` tree.

use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Klaviyo's limits on one event.
pub const MAX_PROPERTIES: usize = 300;
/// Longest string anywhere in an event, bytes.
pub const MAX_STRING_BYTES: usize = 100 * 1024;
/// Longest array in `properties`.
pub const MAX_ARRAY_LEN: usize = 4000;
/// Deepest nesting in `properties`.
pub const MAX_DEPTH: usize = 10;
/// Metric names must be shorter than this.
pub const MAX_METRIC_NAME: usize = 128;
/// Longest `unique_id` the proxy accepts (Klaviyo states none; bounded here).
pub const MAX_UNIQUE_ID: usize = 256;

/// Why an event is refused before it is stored: Klaviyo's own 400, with a pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// JSON pointer into the request body, as Klaviyo gives it.
    pub pointer: String,
    /// What is wrong.
    pub detail: String,
}

impl Invalid {
    fn new(pointer: &str, detail: impl Into<String>) -> Invalid {
        Invalid { pointer: pointer.to_string(), detail: detail.into() }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail, self.pointer)
    }
}

#[derive(Deserialize)]
struct Doc<'a> {
    #[serde(borrow)]
    data: Option<Data<'a>>,
}

#[derive(Deserialize)]
struct Data<'a> {
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    attributes: Option<Attributes<'a>>,
}

#[derive(Deserialize)]
struct Attributes<'a> {
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    metric: Option<&'a RawValue>,
    #[serde(borrow)]
    profile: Option<&'a RawValue>,
    #[serde(borrow)]
    time: Option<&'a RawValue>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(borrow)]
    value_currency: Option<&'a RawValue>,
    #[serde(borrow)]
    unique_id: Option<&'a RawValue>,
    #[serde(borrow)]
    backfill: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Metric<'a> {
    #[serde(borrow)]
    data: Option<MetricData<'a>>,
}

#[derive(Deserialize)]
struct MetricData<'a> {
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    attributes: Option<MetricAttributes<'a>>,
}

#[derive(Deserialize)]
struct MetricAttributes<'a> {
    name: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Profile<'a> {
    #[serde(borrow)]
    data: Option<ProfileData<'a>>,
}

#[derive(Deserialize)]
struct ProfileData<'a> {
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    attributes: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct ProfileIds<'a> {
    #[serde(borrow)]
    email: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    phone_number: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    external_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    anonymous_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    _kx: Option<std::borrow::Cow<'a, str>>,
}

/// A checked event, ready to join a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The bulk job entry (`event-bulk-create` resource object), serialized.
    pub entry: String,
    /// The event's `unique_id` (the client's, or the one the proxy added).
    pub unique_id: String,
    /// Whether the proxy added the `unique_id`.
    pub id_added: bool,
    /// (profile identity, metric name): two events with these and the same
    /// `unique_id` must not share a job.
    pub identity: String,
}

/// Checks a `create_event` body and builds its bulk entry; `new_id` supplies a
/// `unique_id` when the event has none.
pub fn parse(body: &[u8], new_id: impl FnOnce() -> String) -> Result<Event, Invalid> {
    let doc: Doc<'_> =
        serde_json::from_slice(body).map_err(|e| Invalid::new("/", format!("The body is not valid JSON: {e}.")))?;
    let data = doc.data.ok_or_else(|| Invalid::new("/data", "`data` is required."))?;
    if data.kind != Some("event") {
        return Err(Invalid::new("/data/type", "`type` must be `event`."));
    }
    let a = data.attributes.ok_or_else(|| Invalid::new("/data/attributes", "`attributes` is required."))?;

    let properties =
        a.properties.ok_or_else(|| Invalid::new("/data/attributes/properties", "`properties` is required."))?;
    check_properties(properties)?;

    let metric_raw = a.metric.ok_or_else(|| Invalid::new("/data/attributes/metric", "`metric` is required."))?;
    let metric: Metric<'_> = serde_json::from_str(metric_raw.get())
        .map_err(|_| Invalid::new("/data/attributes/metric", "`metric` must be an object."))?;
    let md = metric.data.ok_or_else(|| Invalid::new("/data/attributes/metric/data", "`data` is required."))?;
    if md.kind != Some("metric") {
        return Err(Invalid::new("/data/attributes/metric/data/type", "`type` must be `metric`."));
    }
    let name =
        md.attributes.and_then(|m| m.name).filter(|n| !n.trim().is_empty()).ok_or_else(|| {
            Invalid::new("/data/attributes/metric/data/attributes/name", "A metric `name` is required.")
        })?;
    if name.chars().count() >= MAX_METRIC_NAME {
        return Err(Invalid::new(
            "/data/attributes/metric/data/attributes/name",
            format!("The metric name must be less than {MAX_METRIC_NAME} characters."),
        ));
    }
    check_strings(metric_raw, "/data/attributes/metric")?;

    let profile_raw = a.profile.ok_or_else(|| Invalid::new("/data/attributes/profile", "`profile` is required."))?;
    let profile: Profile<'_> = serde_json::from_str(profile_raw.get())
        .map_err(|_| Invalid::new("/data/attributes/profile", "`profile` must be an object."))?;
    let pd = profile.data.ok_or_else(|| Invalid::new("/data/attributes/profile/data", "`data` is required."))?;
    if pd.kind != Some("profile") {
        return Err(Invalid::new("/data/attributes/profile/data/type", "`type` must be `profile`."));
    }
    let ids: ProfileIds<'_> = match pd.attributes {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
            Invalid::new(
                "/data/attributes/profile/data/attributes",
                "`attributes` must be an object of profile fields.",
            )
        })?,
        None => ProfileIds::default(),
    };
    let identity_parts = [
        pd.id.as_deref(),
        ids.email.as_deref(),
        ids.phone_number.as_deref(),
        ids.external_id.as_deref(),
        ids.anonymous_id.as_deref(),
        ids._kx.as_deref(),
    ];
    if identity_parts.iter().all(|p| p.is_none_or(|s| s.trim().is_empty())) {
        return Err(Invalid::new(
            "/data/attributes/profile/data",
            "The profile needs at least one identifier: id, email, phone_number, external_id or anonymous_id.",
        ));
    }
    check_strings(profile_raw, "/data/attributes/profile")?;

    if let Some(t) = a.time.filter(|t| t.get() != "null") {
        let s: &str = serde_json::from_str(t.get())
            .map_err(|_| Invalid::new("/data/attributes/time", "`time` must be a date-time string."))?;
        check_time(s)?;
    }
    if let Some(v) = a.value.filter(|v| v.get() != "null") {
        serde_json::from_str::<f64>(v.get())
            .map_err(|_| Invalid::new("/data/attributes/value", "`value` must be a number."))?;
    }
    if let Some(c) = a.value_currency.filter(|c| c.get() != "null") {
        serde_json::from_str::<&str>(c.get())
            .map_err(|_| Invalid::new("/data/attributes/value_currency", "`value_currency` must be a string."))?;
    }
    if let Some(b) = a.backfill.filter(|b| b.get() != "null") {
        serde_json::from_str::<bool>(b.get())
            .map_err(|_| Invalid::new("/data/attributes/backfill", "`backfill` must be a boolean."))?;
    }
    let (unique_id, id_added) = match a.unique_id.filter(|u| u.get() != "null") {
        Some(u) => {
            let id: String = serde_json::from_str(u.get())
                .map_err(|_| Invalid::new("/data/attributes/unique_id", "`unique_id` must be a string."))?;
            if id.is_empty() || id.len() > MAX_UNIQUE_ID {
                return Err(Invalid::new(
                    "/data/attributes/unique_id",
                    format!("`unique_id` must be 1 to {MAX_UNIQUE_ID} bytes."),
                ));
            }
            (id, false)
        }
        None => (new_id(), true),
    };

    // The bulk entry: the event's profile as the entry's profile, the rest as its one event.
    let mut event = String::with_capacity(body.len() + 64);
    event.push_str(r#"{"type":"event","attributes":{"properties":"#);
    event.push_str(properties.get());
    event.push_str(r#","metric":"#);
    event.push_str(metric_raw.get());
    for (key, raw) in [("time", a.time), ("value", a.value), ("value_currency", a.value_currency)] {
        if let Some(raw) = raw.filter(|r| r.get() != "null") {
            event.push_str(",\"");
            event.push_str(key);
            event.push_str("\":");
            event.push_str(raw.get());
        }
    }
    event.push_str(r#","unique_id":"#);
    event.push_str(&serde_json::to_string(&unique_id).expect("a string serializes"));
    event.push_str("}}");
    let mut entry = String::with_capacity(event.len() + profile_raw.get().len() + 96);
    entry.push_str(r#"{"type":"event-bulk-create","attributes":{"profile":"#);
    entry.push_str(&bulk_profile(&pd, profile_raw));
    if let Some(b) = a.backfill.filter(|b| b.get() != "null") {
        entry.push_str(r#","backfill":"#);
        entry.push_str(b.get());
    }
    entry.push_str(r#","events":{"data":["#);
    entry.push_str(&event);
    entry.push_str("]}}}");

    let mut identity = String::new();
    for p in identity_parts.iter().flatten() {
        identity.push_str(p);
        identity.push('\u{1f}');
    }
    identity.push_str(&name);
    Ok(Event { entry, unique_id, id_added, identity })
}

/// The bulk job's profile needs `attributes` (the single event's may omit them when it
/// names the profile by `id`).
fn bulk_profile(pd: &ProfileData<'_>, raw: &RawValue) -> String {
    if pd.attributes.is_some() {
        return raw.get().to_string();
    }
    let id = pd.id.as_deref().unwrap_or_default();
    format!(
        r#"{{"data":{{"type":"profile","id":{},"attributes":{{}}}}}}"#,
        serde_json::to_string(id).expect("a string serializes")
    )
}

fn check_properties(raw: &RawValue) -> Result<(), Invalid> {
    const P: &str = "/data/attributes/properties";
    if !raw.get().trim_start().starts_with('{') {
        return Err(Invalid::new(P, "`properties` must be an object."));
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut walk = Walk::default();
    Shape { walk: &mut walk, depth: 0 }
        .deserialize(&mut de)
        .map_err(|_| Invalid::new(P, "`properties` could not be read."))?;
    if walk.top_keys > MAX_PROPERTIES {
        return Err(Invalid::new(P, format!("`properties` must not exceed {MAX_PROPERTIES} event properties.")));
    }
    walk.verdict(P)
}

fn check_strings(raw: &RawValue, pointer: &str) -> Result<(), Invalid> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut walk = Walk::default();
    Shape { walk: &mut walk, depth: 0 }.deserialize(&mut de).map_err(|_| Invalid::new(pointer, "unreadable"))?;
    walk.verdict(pointer)
}

/// What a walk over a JSON value found: the largest string, array and depth.
#[derive(Default)]
struct Walk {
    top_keys: usize,
    longest_string: usize,
    longest_array: usize,
    depth: usize,
}

impl Walk {
    fn verdict(&self, pointer: &str) -> Result<(), Invalid> {
        if self.longest_string > MAX_STRING_BYTES {
            Err(Invalid::new(pointer, "A single string cannot be larger than 100 KB."))
        } else if self.longest_array > MAX_ARRAY_LEN {
            Err(Invalid::new(pointer, format!("Each array must not exceed {MAX_ARRAY_LEN} elements.")))
        } else if self.depth > MAX_DEPTH {
            Err(Invalid::new(pointer, format!("The value cannot contain more than {MAX_DEPTH} nested levels.")))
        } else {
            Ok(())
        }
    }
}

/// Walks a JSON value without keeping it (serde_json's own recursion limit bounds the
/// stack).
struct Shape<'w> {
    walk: &'w mut Walk,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Shape<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Shape<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.walk.longest_string = self.walk.longest_string.max(v.len());
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        self.walk.depth = self.walk.depth.max(depth);
        let mut n = 0usize;
        while seq.next_element_seed(Shape { walk: self.walk, depth })?.is_some() {
            n += 1;
        }
        self.walk.longest_array = self.walk.longest_array.max(n);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        self.walk.depth = self.walk.depth.max(depth);
        let mut n = 0usize;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            self.walk.longest_string = self.walk.longest_string.max(key.len());
            map.next_value_seed(Shape { walk: self.walk, depth })?;
            n += 1;
        }
        if self.depth == 0 {
            self.walk.top_keys = n;
        }
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`, or a bare date-time Klaviyo also takes;
/// after 2000 and at most a year (366 days) ahead of now.
fn check_time(s: &str) -> Result<(), Invalid> {
    const P: &str = "/data/attributes/time";
    let bad = || Invalid::new(P, "`time` must be an ISO 8601 date-time, e.g. 2026-01-01T00:00:00Z.");
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u32>().ok()).ok_or_else(bad);
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &frac[digits..];
    }
    match rest {
        "" | "Z" | "z" => {}
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && tz.as_bytes()[3] == b':' => {
            num_ok(&tz[1..3]).ok_or_else(bad)?;
            num_ok(&tz[4..6]).ok_or_else(bad)?;
        }
        _ => return Err(bad()),
    }
    if year < 2000 {
        return Err(Invalid::new(P, "The time must be after the year 2000."));
    }
    let now_year = 1970
        + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 31_556_952)
            as u32;
    // A year ahead at most; by calendar year, which errs towards accepting.
    if year > now_year + 1 {
        return Err(Invalid::new(P, "The time can only be up to 1 year in the future."));
    }
    Ok(())
}

fn num_ok(s: &str) -> Option<u32> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn ev(attributes: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"data": {"type": "event", "attributes": attributes}})).unwrap()
    }

    fn good() -> Value {
        json!({
            "properties": {"Brand": "Kids Book", "Categories": ["Fiction"]},
            "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Product"}}},
            "profile": {"data": {"type": "profile", "attributes": {"email": "a@example.com"}}},
            "time": "2026-01-02T03:04:05+00:00",
            "value": 9.99,
            "value_currency": "USD",
        })
    }

    fn with(mut v: Value, pointer: &str, new: Value) -> Value {
        *v.pointer_mut(pointer).expect("pointer exists") = new;
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        v.as_object_mut().unwrap().remove(key);
        v
    }

    #[test]
    fn a_good_event_becomes_a_bulk_entry() {
        let e = parse(&ev(good()), || "added".into()).unwrap();
        assert_eq!(e.unique_id, "added");
        assert!(e.id_added);
        let entry: Value = serde_json::from_str(&e.entry).unwrap();
        assert_eq!(entry["type"], "event-bulk-create");
        assert_eq!(entry["attributes"]["profile"]["data"]["attributes"]["email"], "a@example.com");
        let event = &entry["attributes"]["events"]["data"][0];
        assert_eq!(event["type"], "event");
        assert_eq!(event["attributes"]["metric"]["data"]["attributes"]["name"], "Viewed Product");
        assert_eq!(event["attributes"]["properties"]["Brand"], "Kids Book");
        assert_eq!(event["attributes"]["value"], 9.99);
        assert_eq!(event["attributes"]["unique_id"], "added");
        assert!(event["attributes"].get("profile").is_none());
    }

    #[test]
    fn the_clients_unique_id_is_kept() {
        let body = ev(with(good(), "/value", json!(1))
            .as_object()
            .cloned()
            .map(|mut m| {
                m.insert("unique_id".into(), json!("order-1"));
                Value::Object(m)
            })
            .unwrap());
        let e = parse(&body, || unreachable!("the client's id is used")).unwrap();
        assert_eq!((e.unique_id.as_str(), e.id_added), ("order-1", false));
    }

    #[test]
    fn a_profile_named_by_id_gets_empty_attributes() {
        let v = with(good(), "/profile", json!({"data": {"type": "profile", "id": "01ABC"}}));
        let e = parse(&ev(v), || "u".into()).unwrap();
        let entry: Value = serde_json::from_str(&e.entry).unwrap();
        assert_eq!(entry["attributes"]["profile"]["data"], json!({"type": "profile", "id": "01ABC", "attributes": {}}));
    }

    #[test]
    fn refusals_point_where_klaviyo_would() {
        let big = "x".repeat(MAX_STRING_BYTES + 1);
        let many: serde_json::Map<String, Value> = (0..=MAX_PROPERTIES).map(|i| (format!("p{i}"), json!(i))).collect();
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!({"a": deep});
        }
        let cases: Vec<(Value, &str)> = vec![
            (without(good(), "properties"), "/data/attributes/properties"),
            (with(good(), "/properties", json!([1])), "/data/attributes/properties"),
            (with(good(), "/properties", Value::Object(many)), "/data/attributes/properties"),
            (with(good(), "/properties", json!({"s": big})), "/data/attributes/properties"),
            (with(good(), "/properties", json!({"a": vec![0; MAX_ARRAY_LEN + 1]})), "/data/attributes/properties"),
            (with(good(), "/properties", deep), "/data/attributes/properties"),
            (without(good(), "metric"), "/data/attributes/metric"),
            (with(good(), "/metric/data/type", json!("event")), "/data/attributes/metric/data/type"),
            (with(good(), "/metric/data/attributes/name", json!("")), "/data/attributes/metric/data/attributes/name"),
            (
                with(good(), "/metric/data/attributes/name", json!("n".repeat(MAX_METRIC_NAME))),
                "/data/attributes/metric/data/attributes/name",
            ),
            (without(good(), "profile"), "/data/attributes/profile"),
            (with(good(), "/profile/data/attributes", json!({"first_name": "No Id"})), "/data/attributes/profile/data"),
            (with(good(), "/time", json!("yesterday")), "/data/attributes/time"),
            (with(good(), "/time", json!("1999-12-31T23:59:59Z")), "/data/attributes/time"),
            (with(good(), "/time", json!("2999-01-01T00:00:00Z")), "/data/attributes/time"),
            (with(good(), "/time", json!("2026-13-01T00:00:00Z")), "/data/attributes/time"),
            (with(good(), "/value", json!("9.99")), "/data/attributes/value"),
            (with(good(), "/value_currency", json!(840)), "/data/attributes/value_currency"),
        ];
        for (attributes, pointer) in cases {
            let err = parse(&ev(attributes.clone()), || "u".into())
                .expect_err(&attributes.to_string()[..80.min(attributes.to_string().len())]);
            assert_eq!(err.pointer, pointer, "{err}");
        }
        let not_event = serde_json::to_vec(&json!({"data": {"type": "profile", "attributes": good()}})).unwrap();
        assert_eq!(parse(&not_event, || "u".into()).unwrap_err().pointer, "/data/type");
        assert_eq!(parse(b"[1,2", || "u".into()).unwrap_err().pointer, "/");
        let empty_id = ev(with(good(), "/value", json!(1))
            .as_object()
            .cloned()
            .map(|mut m| {
                m.insert("unique_id".into(), json!(""));
                Value::Object(m)
            })
            .unwrap());
        assert_eq!(parse(&empty_id, || "u".into()).unwrap_err().pointer, "/data/attributes/unique_id");
    }

    #[test]
    fn time_forms() {
        for ok in
            ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123+02:00", "2026-01-02T03:04:05", "2026-01-02 03:04:05"]
        {
            assert!(check_time(ok).is_ok(), "{ok}");
        }
        for bad in ["2026-01-02", "2026-01-02T03:04", "2026-01-02T03:04:05.+00:00", "2026-01-02T03:04:05 UTC"] {
            assert!(check_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identity_separates_profiles_and_metrics() {
        let a = parse(&ev(good()), || "u".into()).unwrap();
        let b =
            parse(&ev(with(good(), "/profile/data/attributes/email", json!("b@example.com"))), || "u".into()).unwrap();
        let c = parse(&ev(with(good(), "/metric/data/attributes/name", json!("Placed Order"))), || "u".into()).unwrap();
        assert_ne!(a.identity, b.identity);
        assert_ne!(a.identity, c.identity);
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(&a.entry).is_ok());
    }
}
