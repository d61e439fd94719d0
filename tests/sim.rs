//! The simulator answers the way Klaviyo does.

mod support;

use http::{Method, StatusCode};
use klaviyo_proxy::sim::SimOptions;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_like_klaviyo() {
    let sim = sim(SimOptions::default()).await;
    let client = client();
    let url = format!("{}/api/accounts", sim.url);
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    let rev = ("revision", "2026-07-15");

    let r = send(&client, Method::GET, &url, &[("authorization", &auth)], "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "no revision");
    let r = send(&client, Method::GET, &url, &[rev], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["errors"][0]["code"], "not_authenticated");

    let ok = send(&client, Method::GET, &url, &[rev, ("authorization", &auth)], "").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.header("ratelimit-limit"), Some("15"));
    assert_eq!(ok.header("ratelimit-remaining"), Some("14"));
    let reset: u64 = ok.header("ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset));
    assert_eq!(ok.json()["data"][0]["type"], "account");

    // get_accounts is 1/s in fixed windows: an immediate second request is throttled
    // (unless the window happened to turn in between, so allow one more try).
    let mut throttled = None;
    for _ in 0..3 {
        let r = send(&client, Method::GET, &url, &[rev, ("authorization", &auth)], "").await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            throttled = Some(r);
            break;
        }
    }
    let r = throttled.expect("a 429 within three immediate requests");
    assert_eq!(r.header("retry-after"), Some("1"));
    let e = &r.json()["errors"][0];
    assert_eq!((e["status"].as_u64(), e["code"].as_str()), (Some(429), Some("throttled")));
    assert!(e["detail"].as_str().unwrap().contains("Expected available in 1 second"));

    let event =
        send(&client, Method::POST, &format!("{}/api/events", sim.url), &[rev, ("authorization", &auth)], "{}").await;
    assert_eq!(event.status, StatusCode::ACCEPTED);
    let client_event =
        send(&client, Method::POST, &format!("{}/client/events?company_id=AbC123", sim.url), &[rev], "{}").await;
    assert_eq!(client_event.status, StatusCode::ACCEPTED);
    let no_company = send(&client, Method::POST, &format!("{}/client/events", sim.url), &[rev], "{}").await;
    assert_eq!(no_company.status, StatusCode::BAD_REQUEST);

    let stats = sim.stats();
    let b = &bucket(&stats, "get_accounts", "endpoint")[0];
    assert!(b.throttled >= 1 && b.max_fixed["burst"] == 1, "{b:?}");
    assert!(stats.throttled >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_caps_and_unlimited_mode() {
    let sim = sim(SimOptions::default()).await;
    let client = client();
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    // create_segment: 1/s, 15/min, 100/day — the stats show all three windows.
    let url = format!("{}/api/segments", sim.url);
    let r = send(&client, Method::POST, &url, &[("revision", "2026-07-15"), ("authorization", &auth)], "{}").await;
    assert_eq!(r.status, StatusCode::CREATED);
    let stats = sim.stats();
    assert_eq!(bucket(&stats, "create_segment", "endpoint")[0].limits["daily"], 100);

    let free = support::sim(SimOptions { unlimited: true, ..SimOptions::default() }).await;
    for _ in 0..5 {
        let r = send(
            &client,
            Method::GET,
            &format!("{}/api/accounts", free.url),
            &[("revision", "2026-07-15"), ("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
}

/// The simulator counts per account: two keys of one account share its windows,
/// `GET /api/accounts` names the account, and a key without `accounts:read` gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_per_account() {
    use klaviyo_proxy::sim::SimCredential;
    let mut credentials = std::collections::HashMap::new();
    credentials.insert(
        "tabled-token".to_string(),
        SimCredential { account: "Tbl001".into(), app: Some("app".into()), accounts_read: true },
    );
    let sim = sim(SimOptions { credentials, ..SimOptions::default() }).await;
    let client = client();
    let rev = ("revision", "2026-07-15");
    let accounts = format!("{}/api/accounts", sim.url);
    let ask = |auth: String| {
        let (client, url) = (client.clone(), accounts.clone());
        async move { send(&client, Method::GET, &url, &[rev, ("authorization", &auth)], "").await }
    };
    let first = ask("Klaviyo-API-Key pk_Acme01_one".into()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["data"][0]["id"], "Acme01");
    assert_eq!(first.json()["data"][0]["attributes"]["public_api_key"], "Acme01");
    // get_accounts is 1/s: the account's second key, at once, is throttled.
    let second = ask("Klaviyo-API-Key pk_Acme01_two".into()).await;
    let third = ask("Klaviyo-API-Key pk_Acme01_three".into()).await;
    assert!(
        [second.status, third.status].contains(&StatusCode::TOO_MANY_REQUESTS),
        "{:?} {:?}",
        second.status,
        third.status
    );
    let denied = ask("Klaviyo-API-Key pk_Other2_no-accounts-read".into()).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.json()["errors"][0]["code"], "permission_denied");
    let tabled = ask("Bearer tabled-token".into()).await;
    assert_eq!(tabled.json()["data"][0]["id"], "Tbl001");
    let stats = sim.stats();
    let accounts: Vec<&str> = stats.buckets.iter().map(|b| b.account.as_str()).collect();
    assert_eq!(accounts, ["Acme01", "Other2", "Tbl001@app"]);
    assert_eq!(stats.buckets[0].requests, 3);
    assert_eq!(stats.buckets[0].max_fixed["burst"], 1);
}

/// Issue 13 item 7: a long load test with many keys and events does not grow the
/// simulator without end. With small bounds, 300 accounts leave at most 50 buckets, and
/// 300 distinct event ids leave at most 50 remembered (the rest counted as forgotten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_bounded_however_many_keys_and_events() {
    let sim = sim(SimOptions { max_buckets: Some(50), max_event_ids: Some(50), ..SimOptions::default() }).await;
    let client = client();
    for i in 0..300 {
        let auth = format!("Klaviyo-API-Key pk_Bogus{i}_key");
        let r = send(
            &client,
            Method::GET,
            &format!("{}/api/campaigns", sim.url),
            &[("revision", "2026-07-15"), ("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let stats = sim.stats();
    assert!(stats.buckets.len() <= 50, "{} buckets held", stats.buckets.len());
    assert_eq!(stats.requests, 300, "every request counted in the totals");
    let auth = format!("Klaviyo-API-Key {KEY_A}");
    for i in 0..300 {
        let event = format!(
            r#"{{"data":{{"type":"event","attributes":{{"unique_id":"ev-{i}","properties":{{}},"metric":{{"data":{{"type":"metric","attributes":{{"name":"Viewed"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"a@example.com"}}}}}}}}}}}}"#
        );
        let r = send(
            &client,
            Method::POST,
            &format!("{}/api/events", sim.url),
            &[("revision", "2026-07-15"), ("authorization", &auth), ("content-type", "application/vnd.api+json")],
            &event,
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    }
    let events = sim.events();
    assert!(events.unique <= 50 && events.arrival.len() as u64 == events.unique, "{} ids remembered", events.unique);
    assert_eq!(events.unique + events.forgotten, 300);
    assert_eq!(events.arrival.last().map(String::as_str), Some("ev-299"), "the newest are kept");
}
