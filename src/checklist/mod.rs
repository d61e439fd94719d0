//! The production checklist, checked from live traffic: which SDK and version each
//! account's app uses, which `revision`, whether profile writes use the upsert,
//! whether events carry a `unique_id`, whether phone numbers are E.164, which key
//! scopes the traffic needs, and which errors reach the app — plus the proxy's own
//! health. Served as `GET /admin/checklist`, the status page at the admin listener's
//! `/` and `klaviyo-proxy checklist`.
//!
//! Cost on the request path: [`Checklist::observe`] reads the request head only (one
//! map lookup for the account, one short lock, three counter bumps); the body is read
//! only for the operations that carry events or profiles ([`body::BODY_OPERATIONS`]),
//! on a task of its own so no request waits for it — unless the operator opted into
//! `checks.phone_e164 = "reject"`, which must decide before the request goes.

pub mod admin;
pub mod body;
pub mod client;
pub mod rules;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::catalog::{self, Operation};
use crate::config::{AuthConfig, PhoneCheck};
use crate::error::ProxyError;
use crate::limiter::Account;
use crate::route::Route;
use rules::{ClientId, RevisionState};

/// Accounts tallied one by one; the rest share one line, so memory stays bounded.
pub const MAX_ACCOUNTS: usize = 256;
/// Distinct user agents (and revisions) kept per account; the rest are counted together.
const MAX_DISTINCT: usize = 32;
/// Minutes of per-minute error counts kept (the alerts look back at most this far).
const MINUTES: usize = 16;
/// Body checks running at once; beyond it a body is counted as unchecked, not queued.
const MAX_BODY_CHECKS: usize = 64;
/// Recent waits and errors kept for the status page.
const RECENT: usize = 50;
/// How long Klaviyo's status page answer is reused.
const STATUS_PAGE_TTL: Duration = Duration::from_secs(300);

/// A check's traffic light.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Light {
    /// Nothing to judge yet (no traffic, not configured, not reachable).
    Grey,
    /// As the checklist asks.
    Green,
    /// Works, but look at it.
    Amber,
    /// Fix it.
    Red,
}

impl Light {
    /// The word, for tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Light::Grey => "grey",
            Light::Green => "green",
            Light::Amber => "amber",
            Light::Red => "red",
        }
    }
}

/// One checklist item's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Stable id: `sdk`, `revision`, `profile_writes`, `events`, `phone_numbers`,
    /// `least_privilege`, `errors`; health: `breaker`, `spool`, `limiter`,
    /// `klaviyo_status`.
    pub id: String,
    /// Its title, as the checklist words it.
    pub title: String,
    /// The light.
    pub light: Light,
    /// One line for people.
    pub summary: String,
    /// The numbers behind it.
    #[serde(default)]
    pub details: Value,
}

/// One account's checklist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountReport {
    /// The account's configured name or keyed-hash alias (never a key).
    pub account: String,
    /// Requests seen since start.
    pub requests: u64,
    /// The worst light of its items.
    pub light: Light,
    /// Its items.
    pub items: Vec<Item>,
}

/// An alert rule of `config/alerts.yml`, evaluated on what this proxy saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    /// The rule's name.
    pub name: String,
    /// `P1` or `P2`.
    pub severity: String,
    /// `firing`, `pending` (condition met, not yet for the rule's `for`), `inactive`,
    /// or `unknown` (needs Prometheus).
    pub state: String,
    /// What it looked at.
    pub detail: String,
}

/// `GET /admin/checklist`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The worst light of every account and health item.
    pub light: Light,
    /// When this report was made (RFC 3339).
    pub generated_at: String,
    /// Seconds of traffic the report covers (since start).
    pub uptime_seconds: u64,
    /// Per account, busiest first.
    pub accounts: Vec<AccountReport>,
    /// The proxy's own health.
    pub health: Vec<Item>,
    /// The alert rules these items map to.
    pub alerts: Vec<AlertState>,
}

impl Report {
    /// Every item, of every account and of the health section.
    pub fn items(&self) -> impl Iterator<Item = &Item> {
        self.accounts.iter().flat_map(|a| a.items.iter()).chain(self.health.iter())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Minute {
    minute: u64,
    auth: u32,
    upstream_429: u32,
    proxy_429: u32,
    server: u32,
    /// Of `server`, Klaviyo's own 5xx (the rest are the proxy's 502/503/504).
    upstream_5xx: u32,
    unreachable: u32,
}

/// Errors that reached the app, by kind.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Errors {
    /// Klaviyo's 401/403: key revoked or a scope missing.
    auth: u64,
    /// Klaviyo's 429s that reached the app (the proxy's pause ran past the deadline).
    upstream_429: u64,
    /// The proxy's own 429s (queue full or too long).
    proxy_429: u64,
    /// 5xx after the proxy's retries (Klaviyo's, or the proxy's 502/503/504).
    server: u64,
    /// Of them, Klaviyo unreachable or not answering in time (502/504).
    unreachable: u64,
}

#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    /// Raw `User-Agent` values (empty: none sent), parsed only for the report. Hashed
    /// with foldhash, not SipHash: these maps are counted into on every request, and a
    /// client choosing colliding values gains nothing from a map capped at
    /// [`MAX_DISTINCT`] entries.
    clients: foldhash::HashMap<Box<str>, u64>,
    other_clients: u64,
    /// Raw `revision` values (empty: none sent; the proxy added its own).
    revisions: foldhash::HashMap<Box<str>, u64>,
    other_revisions: u64,
    operations: foldhash::HashMap<&'static str, u64>,
    events: u64,
    events_without_unique_id: u64,
    phones: u64,
    bad_phones: u64,
    phones_refused: u64,
    bodies_unchecked: u64,
    scope_refused: HashMap<&'static str, u64>,
    errors: Errors,
    minutes: [Minute; MINUTES],
}

#[derive(Debug, Default)]
struct Tally(Mutex<Counts>);

impl Tally {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn bump(map: &mut foldhash::HashMap<Box<str>, u64>, other: &mut u64, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_DISTINCT {
        map.insert(key.into(), 1);
    } else {
        *other += 1;
    }
}

/// A wait or an error the status page lists.
#[derive(Debug, Clone, Serialize)]
pub struct Recent {
    /// When (RFC 3339).
    pub at: String,
    /// The account's name or alias.
    pub account: String,
    /// The operation.
    pub operation: &'static str,
    /// The status the app got.
    pub status: u16,
    /// The proxy's error code, when it answered itself.
    pub code: Option<&'static str>,
    /// Time spent waiting for a token.
    pub wait_ms: u64,
}

/// The checklist's counters, one per proxy.
#[derive(Debug)]
pub struct Checklist {
    started: Instant,
    accounts: DashMap<Account, Arc<Tally>>,
    /// Accounts beyond [`MAX_ACCOUNTS`] are tallied here together.
    overflow: Arc<Tally>,
    body_checks: Arc<AtomicUsize>,
    recent: Mutex<VecDeque<(Account, Recent)>>,
    status_page: Arc<Mutex<StatusPageCache>>,
}

#[derive(Debug, Default)]
struct StatusPageCache {
    at: Option<Instant>,
    refreshing: bool,
    result: Option<Result<(String, String), String>>,
}

impl Default for Checklist {
    fn default() -> Self {
        Self::new()
    }
}

/// A request as the checklist saw its head; [`Observation::finish`] records its answer.
#[derive(Debug, Clone)]
pub struct Observation {
    account: Account,
    tally: Arc<Tally>,
    operation: &'static str,
    body_checks: Arc<AtomicUsize>,
}

impl Checklist {
    /// Empty counters, starting now.
    pub fn new() -> Self {
        Checklist {
            started: Instant::now(),
            accounts: DashMap::new(),
            overflow: Arc::default(),
            body_checks: Arc::default(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            status_page: Arc::default(),
        }
    }

    fn tally(&self, account: Account) -> Arc<Tally> {
        if let Some(t) = self.accounts.get(&account) {
            return t.clone();
        }
        if self.accounts.len() >= MAX_ACCOUNTS {
            return self.overflow.clone();
        }
        self.accounts.entry(account).or_default().clone()
    }

    /// Counts a routed request from its head: client, revision, operation.
    pub fn observe(&self, route: &Route, headers: &HeaderMap) -> Observation {
        let text = |name: http::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
        let tally = self.tally(route.account);
        let operation = route.label();
        {
            let mut c = tally.lock();
            let c = &mut *c;
            c.requests += 1;
            bump(&mut c.clients, &mut c.other_clients, text(http::header::USER_AGENT));
            bump(&mut c.revisions, &mut c.other_revisions, text(crate::header::REVISION));
            *c.operations.entry(operation).or_default() += 1;
        }
        Observation { account: route.account, tally, operation, body_checks: self.body_checks.clone() }
    }

    /// Remembers a request that waited or failed, for the status page.
    fn remember(&self, account: Account, recent: Recent) {
        let mut list = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if list.len() == RECENT {
            list.pop_front();
        }
        list.push_back((account, recent));
    }
}

/// Refuses an operation outside `auth.allowed_scopes` (when set): 403
/// `proxy_scope_forbidden`. Operations the catalog does not know are refused too,
/// since their scopes cannot be checked.
pub fn check_scopes(auth: &AuthConfig, route: &Route) -> Result<(), ProxyError> {
    let Some(allowed) = &auth.allowed_scopes else { return Ok(()) };
    let missing = match route.operation {
        Some(op) => rules::missing_scopes(op, allowed),
        None => vec!["(an operation the catalog does not know)"],
    };
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProxyError::ScopeForbidden { operation: route.label(), missing: missing.join(", ") })
    }
}

impl Observation {
    /// Reads the body of an operation that carries events or profiles. Counting runs
    /// on its own task; with `checks.phone_e164 = "reject"` the phone numbers are
    /// checked here, and a number not in E.164 form is refused (400) before it spends
    /// any quota.
    pub fn inspect(&self, mode: PhoneCheck, body: &Bytes) -> Result<(), ProxyError> {
        if !body::carries_fields(self.operation) {
            return Ok(());
        }
        if mode == PhoneCheck::Reject {
            let found = body::inspect(body);
            self.count(&found);
            if let Some(pointer) = found.first_bad_phone {
                self.tally.lock().phones_refused += 1;
                return Err(ProxyError::PhoneNotE164 { pointer });
            }
            return Ok(());
        }
        let (Ok(runtime), true) = (tokio::runtime::Handle::try_current(), self.claim()) else {
            self.tally.lock().bodies_unchecked += 1;
            return Ok(());
        };
        let (this, body) = (self.clone(), body.clone());
        runtime.spawn(async move {
            this.count(&body::inspect(&body));
            this.body_checks.fetch_sub(1, Ordering::AcqRel);
        });
        Ok(())
    }

    /// Takes one of the [`MAX_BODY_CHECKS`] places, if one is free.
    fn claim(&self) -> bool {
        if self.body_checks.fetch_add(1, Ordering::AcqRel) < MAX_BODY_CHECKS {
            return true;
        }
        self.body_checks.fetch_sub(1, Ordering::AcqRel);
        false
    }

    fn count(&self, f: &body::Findings) {
        let mut c = self.tally.lock();
        c.events += f.events;
        c.events_without_unique_id += f.events_without_unique_id;
        c.phones += f.phones;
        c.bad_phones += f.bad_phones;
    }

    /// Records what the app got: the status, the proxy's error code when it answered
    /// itself, and the wait for a token.
    pub fn finish(self, checklist: &Checklist, status: u16, code: Option<&'static str>, waited: Duration) {
        let minute = Instant::now().saturating_duration_since(checklist.started).as_secs() / 60;
        let ours = |c: &str| code == Some(c);
        let notable = {
            let mut c = self.tally.lock();
            let slot = &mut c.minutes[(minute as usize) % MINUTES];
            if slot.minute != minute {
                *slot = Minute { minute, ..Minute::default() };
            }
            let mut m = *slot;
            let mut e = c.errors;
            let mut notable = !waited.is_zero();
            match status {
                401 | 403 if code.is_none() => (e.auth, m.auth, notable) = (e.auth + 1, m.auth + 1, true),
                429 if code.is_none() || ours("proxy_upstream_throttled") => {
                    (e.upstream_429, m.upstream_429, notable) = (e.upstream_429 + 1, m.upstream_429 + 1, true)
                }
                429 => (e.proxy_429, m.proxy_429, notable) = (e.proxy_429 + 1, m.proxy_429 + 1, true),
                500..=599 => {
                    (e.server, m.server, notable) = (e.server + 1, m.server + 1, true);
                    if code.is_none() {
                        m.upstream_5xx += 1;
                    }
                    if ours("proxy_upstream_unreachable") || ours("proxy_upstream_timeout") {
                        (e.unreachable, m.unreachable) = (e.unreachable + 1, m.unreachable + 1);
                    }
                }
                _ => {}
            }
            if let Some(op) = code.filter(|c| *c == "proxy_scope_forbidden").map(|_| self.operation) {
                *c.scope_refused.entry(op).or_default() += 1;
            }
            c.errors = e;
            c.minutes[(minute as usize) % MINUTES] = m;
            notable
        };
        if notable {
            let recent = Recent {
                at: crate::admin::rfc3339(std::time::SystemTime::now()),
                account: String::new(),
                operation: self.operation,
                status,
                code,
                wait_ms: waited.as_millis() as u64,
            };
            checklist.remember(self.account, recent);
        }
    }
}

/// What the report needs from the rest of the proxy.
pub struct Context<'a> {
    /// Names an account (configured name or hash alias).
    pub label: &'a dyn Fn(Account) -> String,
    /// The revision the proxy adds to requests that carry none.
    pub default_revision: &'a str,
    /// `auth.allowed_scopes`, when set.
    pub allowed_scopes: Option<&'a [crate::config::Scope]>,
    /// Whether the proxy adds a `unique_id` to events that lack one.
    pub adds_unique_id: bool,
    /// Whether phone numbers not in E.164 are refused.
    pub rejects_phones: bool,
    /// Today, in days since 1970-01-01 (for revision ages).
    pub today: i64,
    /// The proxy's health items.
    pub health: Vec<Item>,
    /// Breaker state (0 closed, 1 half-open, 2 open) and spool (depth, dead letters).
    pub breaker_state: i64,
    /// Spool depth and dead letters, when a spool is configured.
    pub spool: Option<(i64, i64)>,
}

fn item(id: &str, title: &str, light: Light, summary: String, details: Value) -> Item {
    Item { id: id.into(), title: title.into(), light, summary, details }
}

fn percent(part: u64, whole: u64) -> String {
    format!("{}%", (part * 100 + whole / 2).checked_div(whole).unwrap_or(0))
}

impl Checklist {
    /// The checklist now: per account (busiest first), health and alerts.
    pub fn report(&self, ctx: &Context<'_>) -> Report {
        let now_minute = Instant::now().saturating_duration_since(self.started).as_secs() / 60;
        let mut tallies: Vec<(String, Arc<Tally>)> =
            self.accounts.iter().map(|e| ((ctx.label)(*e.key()), e.value().clone())).collect();
        if self.overflow.lock().requests > 0 {
            tallies.push(("(other accounts)".into(), self.overflow.clone()));
        }
        let mut accounts: Vec<AccountReport> =
            tallies.iter().map(|(name, t)| account_report(name, &t.lock(), ctx, now_minute)).collect();
        accounts.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.account.cmp(&b.account)));
        let mut sums = [Minute::default(); MINUTES];
        for (_, t) in &tallies {
            let c = t.lock();
            for m in c.minutes.iter().filter(|m| now_minute.saturating_sub(m.minute) < MINUTES as u64) {
                let s = &mut sums[(now_minute - m.minute) as usize];
                s.auth += m.auth;
                s.upstream_429 += m.upstream_429;
                s.server += m.server;
                s.upstream_5xx += m.upstream_5xx;
                s.unreachable += m.unreachable;
            }
        }
        let alerts = alerts(&sums, ctx);
        let light = accounts.iter().map(|a| a.light).chain(ctx.health.iter().map(|h| h.light)).max();
        Report {
            light: light.unwrap_or(Light::Grey),
            generated_at: crate::admin::rfc3339(std::time::SystemTime::now()),
            uptime_seconds: self.started.elapsed().as_secs(),
            accounts,
            health: ctx.health.clone(),
            alerts,
        }
    }

    /// The recent waits and errors, newest first, accounts named by `label`.
    pub fn recent(&self, label: &dyn Fn(Account) -> String) -> Vec<Recent> {
        let list = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        list.iter().rev().map(|(a, r)| Recent { account: label(*a), ..r.clone() }).collect()
    }

    /// Klaviyo's status page item, from a cached answer; a stale or missing one is
    /// refreshed in the background (`fetch` gets `(indicator, description)`), so the
    /// report never waits for the network.
    pub fn status_page_item<F>(&self, url: &str, fetch: F) -> Item
    where
        F: std::future::Future<Output = Result<(String, String), String>> + Send + 'static,
    {
        let title = "Klaviyo status page";
        let cached = {
            let mut cache = self.status_page.lock().unwrap_or_else(PoisonError::into_inner);
            let stale = cache.at.is_none_or(|at| at.elapsed() >= STATUS_PAGE_TTL);
            if stale && !cache.refreshing {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    cache.refreshing = true;
                    let shared = self.status_page.clone();
                    runtime.spawn(async move {
                        let result = fetch.await;
                        let mut cache = shared.lock().unwrap_or_else(PoisonError::into_inner);
                        *cache = StatusPageCache { at: Some(Instant::now()), refreshing: false, result: Some(result) };
                    });
                }
            }
            cache.result.clone()
        };
        match cached {
            None => item("klaviyo_status", title, Light::Grey, format!("checking {url}"), json!({"url": url})),
            Some(Err(e)) => {
                item("klaviyo_status", title, Light::Grey, format!("not reachable: {e}"), json!({"url": url}))
            }
            Some(Ok((indicator, description))) => {
                let light = match indicator.as_str() {
                    "none" => Light::Green,
                    "minor" | "maintenance" => Light::Amber,
                    _ => Light::Red,
                };
                let details = json!({"url": url, "indicator": indicator});
                item("klaviyo_status", title, light, description, details)
            }
        }
    }
}

fn account_report(name: &str, c: &Counts, ctx: &Context<'_>, now_minute: u64) -> AccountReport {
    let items = vec![
        sdk_item(c),
        revision_item(c, ctx),
        profile_writes_item(c),
        events_item(c, ctx),
        phone_item(c, ctx),
        scope_item(c, ctx),
        errors_item(c, now_minute),
    ];
    let light = items.iter().map(|i| i.light).max().unwrap_or(Light::Grey);
    AccountReport { account: name.to_string(), requests: c.requests, light, items }
}

fn sdk_item(c: &Counts) -> Item {
    let mut clients: HashMap<ClientId, u64> = HashMap::new();
    for (ua, n) in &c.clients {
        *clients.entry(rules::parse_user_agent(Some(ua))).or_default() += n;
    }
    let mut clients: Vec<(ClientId, u64)> = clients.into_iter().collect();
    clients.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.to_string().cmp(&b.0.to_string())));
    let from_sdk: u64 = clients.iter().filter(|(id, _)| id.is_sdk()).map(|(_, n)| n).sum();
    let sdks: Vec<String> = clients.iter().filter(|(id, _)| id.is_sdk()).map(|(id, _)| id.to_string()).collect();
    let others: Vec<String> = clients.iter().filter(|(id, _)| !id.is_sdk()).map(|(id, _)| id.to_string()).collect();
    let light = match (c.requests, from_sdk == c.requests) {
        (0, _) => Light::Grey,
        (_, true) => Light::Green,
        _ => Light::Amber,
    };
    let mut summary = format!("{} of {} requests from official SDKs", percent(from_sdk, c.requests), c.requests);
    if !sdks.is_empty() {
        summary += &format!(": {}", sdks.join(", "));
    }
    if !others.is_empty() {
        summary += &format!("; other clients: {}", others.join(", "));
    }
    let details = json!({
        "sdk_requests": from_sdk,
        "requests": c.requests,
        "clients": clients.iter().map(|(id, n)| json!({"client": id, "name": id.to_string(), "requests": n})).collect::<Vec<_>>(),
        "other_agents": c.other_clients,
    });
    item("sdk", "SDK", light, summary, details)
}

fn revision_item(c: &Counts, ctx: &Context<'_>) -> Item {
    let mut seen: Vec<(&str, u64)> = c.revisions.iter().map(|(r, n)| (&**r, *n)).collect();
    seen.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut light = if c.requests == 0 { Light::Grey } else { Light::Green };
    let mut parts = Vec::new();
    let mut list = Vec::new();
    for (raw, n) in seen {
        let (revision, added) = if raw.is_empty() { (ctx.default_revision, true) } else { (raw, false) };
        let age = rules::revision_age(revision, ctx.today);
        let l = match age.state {
            RevisionState::Stable => Light::Green,
            RevisionState::Beta | RevisionState::Deprecated => Light::Amber,
            RevisionState::Retired | RevisionState::Future | RevisionState::Invalid => Light::Red,
        };
        light = light.max(l);
        let state = serde_json::to_value(age.state).unwrap_or_default();
        let state = state.as_str().unwrap_or("");
        let shown = rules::clean(revision);
        let note = match (age.state, age.retired_on, age.deprecated_on) {
            (RevisionState::Retired, Some(r), _) => format!("retired since {r}"),
            (RevisionState::Deprecated, Some(r), _) => format!("deprecated, retires {r}"),
            (RevisionState::Stable, _, Some(d)) => format!("stable until {d}"),
            _ => state.to_string(),
        };
        parts.push(format!("{shown}{} ×{n} ({note})", if added { " (added by the proxy)" } else { "" }));
        list.push(json!({
            "revision": shown, "requests": n, "state": state, "added_by_proxy": added, "age_days": age.age_days,
            "deprecated_on": age.deprecated_on.map(|d| d.to_string()), "retired_on": age.retired_on.map(|d| d.to_string()),
        }));
    }
    let summary = if parts.is_empty() { "no requests yet".into() } else { parts.join(", ") };
    item("revision", "Revision", light, summary, json!({"revisions": list, "other_revisions": c.other_revisions}))
}

fn op_count(c: &Counts, id: &str) -> u64 {
    c.operations.get(id).copied().unwrap_or(0)
}

fn profile_writes_item(c: &Counts) -> Item {
    let creates = op_count(c, "create_profile");
    let upserts = op_count(c, "create_or_update_profile");
    let (light, summary) = match (creates, upserts) {
        (0, 0) => (Light::Grey, "no profile writes yet".to_string()),
        (0, u) => (Light::Green, format!("{u} create_or_update_profile, no create_profile")),
        (n, u) => (
            Light::Amber,
            format!(
                "{n} create_profile calls (use create_or_update_profile: it never fails on a duplicate); {u} upserts"
            ),
        ),
    };
    let details = json!({"create_profile": creates, "create_or_update_profile": upserts,
        "update_profile": op_count(c, "update_profile")});
    item("profile_writes", "Profile writes", light, summary, details)
}

fn events_item(c: &Counts, ctx: &Context<'_>) -> Item {
    let missing = c.events_without_unique_id;
    let (light, summary) = match (c.events, missing) {
        (0, _) => (Light::Grey, "no events checked yet".to_string()),
        (n, 0) => (Light::Green, format!("all {n} events carry a unique_id")),
        (n, m) => (
            Light::Amber,
            format!(
                "{} of {n} events without a unique_id{}",
                percent(m, n),
                if ctx.adds_unique_id { " (the proxy adds one)" } else { " (retries may duplicate them)" }
            ),
        ),
    };
    let details = json!({"events": c.events, "without_unique_id": missing, "unchecked_bodies": c.bodies_unchecked,
        "proxy_adds_unique_id": ctx.adds_unique_id});
    item("events", "Events", light, summary, details)
}

fn phone_item(c: &Counts, ctx: &Context<'_>) -> Item {
    let (light, summary) = match (c.phones, c.bad_phones) {
        (0, _) => (Light::Grey, "no phone numbers seen yet".to_string()),
        (n, 0) => (Light::Green, format!("all {n} phone numbers are E.164")),
        (n, b) => (
            Light::Red,
            format!(
                "{b} of {n} phone numbers not E.164 (like +14155552671){}",
                if ctx.rejects_phones {
                    format!("; {} requests refused", c.phones_refused)
                } else {
                    "; set checks.phone_e164 = \"reject\" to refuse them".into()
                }
            ),
        ),
    };
    let details = json!({"phone_numbers": c.phones, "not_e164": c.bad_phones, "refused": c.phones_refused,
        "mode": if ctx.rejects_phones { "reject" } else { "count" }});
    item("phone_numbers", "Phone numbers", light, summary, details)
}

fn scope_item(c: &Counts, ctx: &Context<'_>) -> Item {
    let used: Vec<&'static Operation> = c.operations.keys().filter_map(|id| catalog::by_id(id)).collect();
    let needed = rules::scope_union(used.iter().copied());
    let refused: u64 = c.scope_refused.values().sum();
    let list = needed.join(", ");
    let (light, summary) = match (c.requests, ctx.allowed_scopes, refused) {
        (0, _, _) => (Light::Grey, "no requests yet".to_string()),
        (_, Some(_), r) if r > 0 => {
            let mut ops: Vec<&str> = c.scope_refused.keys().copied().collect();
            ops.sort_unstable();
            (
                Light::Red,
                format!("{r} requests refused outside auth.allowed_scopes ({}); needed: {list}", ops.join(", ")),
            )
        }
        (_, Some(_), _) => (Light::Green, format!("within auth.allowed_scopes; traffic needs {list}")),
        (_, None, _) => (
            Light::Amber,
            format!("give this app a key with only: {list} (and set auth.allowed_scopes to hold it there)"),
        ),
    };
    let mut operations: Vec<(&str, u64)> = c.operations.iter().map(|(k, v)| (*k, *v)).collect();
    operations.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let details = json!({
        "scopes": needed,
        "allowed_scopes": ctx.allowed_scopes,
        "refused": refused,
        "operations": operations.iter().map(|(op, n)| json!({"operation": op, "requests": n})).collect::<Vec<_>>(),
    });
    item("least_privilege", "Least privilege", light, summary, details)
}

fn errors_item(c: &Counts, now_minute: u64) -> Item {
    let e = c.errors;
    let mut recent = Minute::default();
    for m in c.minutes.iter().filter(|m| now_minute.saturating_sub(m.minute) < MINUTES as u64) {
        recent.auth += m.auth;
        recent.upstream_429 += m.upstream_429;
        recent.proxy_429 += m.proxy_429;
        recent.server += m.server;
    }
    let light = if c.requests == 0 {
        Light::Grey
    } else if recent.auth > 0 {
        Light::Red
    } else if e.auth + e.upstream_429 + e.proxy_429 + e.server > 0 {
        Light::Amber
    } else {
        Light::Green
    };
    let summary = if light == Light::Green {
        "no 401/403, 429 or 5xx reached the app".to_string()
    } else {
        format!(
            "since start: {} 401/403, {} 429 (Klaviyo {}, proxy {}), {} 5xx after retries; last {MINUTES} min: {} 401/403",
            e.auth,
            e.upstream_429 + e.proxy_429,
            e.upstream_429,
            e.proxy_429,
            e.server,
            recent.auth
        )
    };
    let details = json!({
        "since_start": e,
        "recent_minutes": MINUTES,
        "recent": {"auth": recent.auth, "upstream_429": recent.upstream_429, "proxy_429": recent.proxy_429,
            "server": recent.server},
    });
    item("errors", "Errors reaching the app", light, summary, details)
}

/// The alert rules of `config/alerts.yml`: (name, severity, per-minute threshold,
/// minutes the condition must hold). Latency, breaker and spool rules are judged
/// from the proxy's state in [`alerts`].
const ALERT_RULES: &[(&str, &str, u32, usize)] = &[
    ("KlaviyoAuthFailure", "P1", 0, 0),
    ("KlaviyoUpstream5xx", "P1", 10, 2),
    ("KlaviyoUpstreamUnreachable", "P1", 10, 2),
    ("KlaviyoUpstream429", "P2", 5, 5),
];

fn alerts(sums: &[Minute; MINUTES], ctx: &Context<'_>) -> Vec<AlertState> {
    let mut out = Vec::new();
    for &(name, severity, threshold, hold) in ALERT_RULES {
        let count = |m: &Minute| match name {
            "KlaviyoAuthFailure" => m.auth,
            "KlaviyoUpstream5xx" => m.upstream_5xx,
            "KlaviyoUpstreamUnreachable" => m.unreachable,
            _ => m.upstream_429,
        };
        let (state, detail) = if name == "KlaviyoAuthFailure" {
            let n: u32 = sums[..5].iter().map(count).sum();
            (if n > 0 { "firing" } else { "inactive" }, format!("{n} 401/403 in the last 5 minutes"))
        } else {
            let now = count(&sums[0]);
            let held = sums[..=hold].iter().all(|m| count(m) > threshold);
            let state = match (now > threshold, held) {
                (_, true) => "firing",
                (true, false) => "pending",
                _ => "inactive",
            };
            (state, format!("{now} this minute (threshold {threshold}/min for {hold} min)"))
        };
        out.push(AlertState { name: name.into(), severity: severity.into(), state: state.into(), detail });
    }
    let state = |on: bool, how: &str| if on { how.to_string() } else { "inactive".to_string() };
    out.push(AlertState {
        name: "KlaviyoUpstreamLatencyP95".into(),
        severity: "P2".into(),
        state: "unknown".into(),
        detail: "a p95 over 5 minutes: see the dashboard (klaviyo_proxy_upstream_latency_seconds)".into(),
    });
    out.push(AlertState {
        name: "KlaviyoBreakerOpen".into(),
        severity: "P1".into(),
        state: state(ctx.breaker_state == 2, "firing"),
        detail: format!("breaker state {}", ["closed", "half-open", "open"][ctx.breaker_state.clamp(0, 2) as usize]),
    });
    let (depth, dead) = ctx.spool.unwrap_or((0, 0));
    out.push(AlertState {
        name: "KlaviyoSpoolGrowing".into(),
        severity: "P2".into(),
        state: state(depth > 0, "pending"),
        detail: format!("{depth} spooled requests"),
    });
    out.push(AlertState {
        name: "KlaviyoDeadLetters".into(),
        severity: "P2".into(),
        state: state(dead > 0, "firing"),
        detail: format!("{dead} dead letters"),
    });
    out
}

#[cfg(test)]
mod tests;
