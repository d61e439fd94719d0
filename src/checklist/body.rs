//! Body checks: events without a `unique_id` and phone numbers not in E.164, read
//! from the JSON:API bodies of the operations that carry them. Values are counted and
//! located (a JSON pointer), never kept or logged.

use serde_json::Value;

use super::rules::is_e164;

/// Operations whose bodies carry events or profiles (and so phone numbers).
pub const BODY_OPERATIONS: &[&str] = &[
    "create_event",
    "create_client_event",
    "bulk_create_events",
    "bulk_create_client_events",
    "create_profile",
    "create_or_update_profile",
    "update_profile",
    "create_client_profile",
    "bulk_import_profiles",
    "bulk_subscribe_profiles",
    "bulk_unsubscribe_profiles",
    "create_client_subscription",
];

/// Whether an operation's body is worth reading.
pub fn carries_fields(operation: &str) -> bool {
    BODY_OPERATIONS.contains(&operation)
}

/// What one body showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Event resources (`"type": "event"` with a `metric`).
    pub events: u64,
    /// Of them, the ones without a `unique_id`.
    pub events_without_unique_id: u64,
    /// `phone_number` values seen.
    pub phones: u64,
    /// Of them, the ones not in E.164 form.
    pub bad_phones: u64,
    /// Where the first bad phone number is (JSON pointer), for the reject answer.
    pub first_bad_phone: Option<String>,
    /// The body was not JSON.
    pub unreadable: bool,
}

/// Reads a request body. Every object is looked at, so a phone number is found in a
/// profile, an event's profile, a subscription or a bulk job alike.
pub fn inspect(body: &[u8]) -> Findings {
    let mut findings = Findings::default();
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => walk(&v, &mut String::new(), &mut findings),
        Err(_) => findings.unreadable = !body.is_empty(),
    }
    findings
}

fn walk(v: &Value, pointer: &mut String, f: &mut Findings) {
    match v {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("event") {
                if let Some(attributes) = map.get("attributes").filter(|a| a.get("metric").is_some()) {
                    f.events += 1;
                    let has_id = match attributes.get("unique_id") {
                        Some(Value::String(s)) => !s.is_empty(),
                        Some(Value::Number(_)) => true,
                        _ => false,
                    };
                    if !has_id {
                        f.events_without_unique_id += 1;
                    }
                }
            }
            for (key, value) in map {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                if key == "phone_number" {
                    check_phone(value, pointer, f);
                } else {
                    walk(value, pointer, f);
                }
                pointer.truncate(len);
            }
        }
        Value::Array(items) => {
            for (n, item) in items.iter().enumerate() {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&n.to_string());
                walk(item, pointer, f);
                pointer.truncate(len);
            }
        }
        _ => {}
    }
}

fn check_phone(value: &Value, pointer: &str, f: &mut Findings) {
    let ok = match value {
        // An absent or cleared number is not a bad one.
        Value::Null => return,
        Value::String(s) if s.is_empty() => return,
        Value::String(s) => is_e164(s),
        _ => false,
    };
    f.phones += 1;
    if !ok {
        f.bad_phones += 1;
        f.first_bad_phone.get_or_insert_with(|| pointer.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_events_without_unique_id_and_bad_phones() {
        let event = |unique_id: &str, phone: &str| {
            format!(
                r#"{{"type":"event","attributes":{{"metric":{{"data":{{"type":"metric","attributes":{{"name":"Placed"}}}}}},
                "profile":{{"data":{{"type":"profile","attributes":{{"phone_number":{phone}}}}}}},
                "properties":{{}}{unique_id}}}}}"#
            )
        };
        let body = format!(r#"{{"data":{}}}"#, event(r#","unique_id":"o-1""#, r#""+14155552671""#));
        let f = inspect(body.as_bytes());
        assert_eq!((f.events, f.events_without_unique_id, f.phones, f.bad_phones), (1, 0, 1, 0));

        let body = format!(r#"{{"data":{}}}"#, event("", r#""(415) 555-2671""#));
        let f = inspect(body.as_bytes());
        assert_eq!((f.events, f.events_without_unique_id, f.phones, f.bad_phones), (1, 1, 1, 1));
        assert_eq!(f.first_bad_phone.as_deref(), Some("/data/attributes/profile/data/attributes/phone_number"));

        // A bulk job: events inside events-bulk-create, a null id counts as none.
        let bulk = format!(
            r#"{{"data":{{"type":"event-bulk-create-job","attributes":{{"events-bulk-create":{{"data":[
            {{"type":"event-bulk-create","attributes":{{"profile":{{"data":{{"type":"profile","attributes":{{"phone_number":"+442071838750"}}}}}},
            "events":{{"data":[{},{}]}}}}}}]}}}}}}}}"#,
            event(r#","unique_id":null"#, "null"),
            event(r#","unique_id":"x""#, r#""""#)
        );
        let f = inspect(bulk.as_bytes());
        assert_eq!((f.events, f.events_without_unique_id, f.phones, f.bad_phones), (2, 1, 1, 0), "{bulk}");
    }

    #[test]
    fn profiles_and_subscriptions() {
        let f = inspect(br#"{"data":{"type":"profile","attributes":{"email":"a@b.c","phone_number":"4155552671"}}}"#);
        assert_eq!((f.events, f.phones, f.bad_phones), (0, 1, 1));
        assert_eq!(f.first_bad_phone.as_deref(), Some("/data/attributes/phone_number"));
        let subscribe = br#"{"data":{"type":"profile-subscription-bulk-create-job","attributes":{"profiles":{"data":[
            {"type":"profile","attributes":{"phone_number":"+14155552671"}},
            {"type":"profile","attributes":{"phone_number":14155552671}}]}}}}"#;
        let f = inspect(subscribe);
        assert_eq!((f.phones, f.bad_phones), (2, 1));
        assert_eq!(f.first_bad_phone.as_deref(), Some("/data/attributes/profiles/data/1/attributes/phone_number"));
        assert!(inspect(b"not json").unreadable);
        assert_eq!(inspect(b""), Findings::default());
        assert!(carries_fields("create_profile") && !carries_fields("get_profiles"));
    }
}
