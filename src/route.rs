//! From a request to what the limiter needs: the operation, the account (a keyed hash
//! of the credential, never the credential) and the buckets to take tokens from.

use std::time::Duration;

use ring::hmac;

use crate::catalog::{self, Operation};
use crate::config::{Limits, LimitsConfig};
use crate::credential::{self, Credential};
use crate::limiter::{ticks, Account, BucketId, BucketKey, Demand, WindowSpec, Windows};

/// The account of the [`Router::lookup_gate`] bucket (never a hash: those start at 2).
pub const LOOKUPS: Account = Account(1);

/// What a request is, for the limiter, the logs and the metrics.
#[derive(Debug, Clone)]
pub struct Route {
    /// The catalog operation, or `None` for a path the catalog does not know.
    pub operation: Option<&'static Operation>,
    /// Whose quota the request spends.
    pub account: Account,
    /// The buckets the request takes a token from (one, or two with a conditional limit).
    pub demands: Vec<Demand>,
}

impl Route {
    /// The operation id, or `unknown`: a bounded label, never a raw path.
    pub fn label(&self) -> &'static str {
        self.operation.map_or("unknown", |o| o.id)
    }

    /// The tier name, or `unknown`.
    pub fn tier(&self) -> &'static str {
        self.operation.map_or("unknown", |o| o.tier.as_str())
    }
}

/// Turns requests into routes under one config's limits.
#[derive(Debug)]
pub struct Router {
    endpoint_windows: Vec<Windows>,
    unknown: Windows,
    limits: LimitsConfig,
    hasher: hmac::Key,
    /// Tells this router's hashes from another's (a reload's) in [`Router::account`]'s
    /// per-thread memo.
    id: u64,
}

/// The windows of a bucket under a config: limits scaled by `share` (never below 1)
/// and periods lengthened by the guards.
fn windows(limits: &LimitsConfig, burst: u32, steady: u32, daily: Option<u32>) -> Windows {
    let scale = |n: u32| ((f64::from(n) * limits.share.get()).floor() as u32).max(1);
    let spec = |n: u32, secs: u64, guard_ms: u64| WindowSpec {
        limit: scale(n),
        period: ticks(Duration::from_secs(secs) + Duration::from_millis(guard_ms)),
    };
    let burst = spec(burst, 1, limits.burst_guard_ms);
    let steady = spec(steady, 60, limits.steady_guard_ms);
    match daily {
        Some(d) => Windows::new(&[burst, steady, spec(d, 86_400, limits.daily_guard_ms)]),
        None => Windows::new(&[burst, steady]),
    }
}

fn from_limits(cfg: &LimitsConfig, l: &Limits) -> Windows {
    windows(cfg, l.burst_per_second.get(), l.steady_per_minute.get(), l.daily_per_day.map(|d| d.get()))
}

impl Router {
    /// Builds the per-endpoint windows once; `hash_key` keys the account hash.
    pub fn new(limits: &LimitsConfig, hash_key: &[u8]) -> Self {
        let endpoints = catalog::OPERATIONS.iter().map(|o| o.endpoint).max().map_or(0, |m| m + 1);
        let mut endpoint_windows = vec![from_limits(limits, &limits.unknown); endpoints];
        // Stable rows come first in the catalog, so an endpoint's stable limits win.
        for op in catalog::OPERATIONS.iter().rev() {
            endpoint_windows[op.endpoint] = match limits.operations.iter().find(|(name, _)| name.as_str() == op.id) {
                Some((_, over)) => from_limits(limits, over),
                None => windows(limits, op.burst_per_second, op.steady_per_minute, op.daily_per_day),
            };
        }
        Router {
            endpoint_windows,
            unknown: from_limits(limits, &limits.unknown),
            limits: limits.clone(),
            hasher: hmac::Key::new(hmac::HMAC_SHA256, hash_key),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        }
    }

    /// A keyed hash naming an account; `kind` keeps keys and company ids apart.
    pub fn account(&self, kind: &str, secret: &[u8]) -> Account {
        thread_local! {
            static LAST: credential::Last<Account> = const { credential::Last::new() };
        }
        LAST.with(|last| {
            last.get_or(&[&self.id.to_le_bytes(), kind.as_bytes(), secret], || {
                let mut ctx = hmac::Context::with_key(&self.hasher);
                ctx.update(kind.as_bytes());
                ctx.update(&[0]);
                ctx.update(secret);
                let tag = ctx.sign();
                let mut first = [0u8; 16];
                first.copy_from_slice(&tag.as_ref()[..16]);
                // Zero and one are reserved (no credential; account lookups).
                Account(u128::from_be_bytes(first).max(2))
            })
        })
    }

    /// Routes a request. `credential` is the `Authorization` value that will go
    /// upstream, keyed by its own (normalised) hash: [`crate::account::Resolver`] names
    /// the account behind it instead, for [`Router::route_as`]. `/client/` operations
    /// are keyed by their `company_id`.
    pub fn route(&self, method: &str, path: &str, query: Option<&str>, beta: bool, credential: Option<&[u8]>) -> Route {
        let account = credential.map_or(Account::ANONYMOUS, |c| self.credential_account(&credential::parse(c)));
        self.route_as(method, path, query, beta, account)
    }

    /// The bucket account of a credential whose Klaviyo account is not known: its own.
    pub fn credential_account(&self, credential: &Credential) -> Account {
        self.account("auth", credential.as_bytes())
    }

    /// The gate every first account lookup passes (its account is what it asks for,
    /// so it cannot use the account's own bucket yet): one `get_accounts` per second in
    /// all, so two keys of one account never look up in one of Klaviyo's windows.
    pub fn lookup_gate(&self) -> Demand {
        let endpoint = catalog::by_id("get_accounts").map_or(0, |o| o.endpoint);
        Demand {
            key: BucketKey {
                account: LOOKUPS,
                bucket: BucketId::Endpoint(u16::try_from(endpoint).expect("fewer than 65536 endpoints")),
            },
            windows: windows(&self.limits, 1, 60, None),
        }
    }

    /// Routes a request whose credential spends `account`'s quota; `/client/`
    /// operations are keyed by their `company_id` whatever `account` says.
    pub fn route_as(&self, method: &str, path: &str, query: Option<&str>, beta: bool, account: Account) -> Route {
        let operation = catalog::find(method, path, beta);
        let params = || form_urlencoded::parse(query.unwrap_or("").as_bytes());
        let account = if path.starts_with("/client/") {
            params()
                .find(|(k, _)| k == "company_id")
                .map_or(Account::ANONYMOUS, |(_, v)| self.account("company", v.as_bytes()))
        } else {
            account
        };
        let Some(op) = operation else {
            return Route {
                operation: None,
                account,
                demands: vec![Demand { key: BucketKey { account, bucket: BucketId::Unknown }, windows: self.unknown }],
            };
        };
        let endpoint = u16::try_from(op.endpoint).expect("fewer than 65536 endpoints");
        let mut demands = vec![Demand {
            key: BucketKey { account, bucket: BucketId::Endpoint(endpoint) },
            windows: self.endpoint_windows[op.endpoint],
        }];
        for (n, cond) in op.conditions.iter().enumerate() {
            if params().any(|(k, v)| cond.matches(&k, &v)) {
                demands.push(Demand {
                    key: BucketKey { account, bucket: BucketId::Condition(endpoint, n as u8) },
                    windows: windows(&self.limits, cond.burst_per_second, cond.steady_per_minute, None),
                });
            }
        }
        Route { operation: Some(op), account, demands }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(src: &str) -> Router {
        Router::new(&Config::parse(src, "t").unwrap().limits, b"k")
    }

    #[test]
    fn accounts_are_keyed_hashes() {
        let r = router("");
        let a = r.route("GET", "/api/accounts", None, false, Some(b"Klaviyo-API-Key pk_a"));
        let b = r.route("GET", "/api/accounts", None, false, Some(b"Klaviyo-API-Key pk_b"));
        assert_ne!(a.account, b.account);
        assert_ne!(a.account, Account::ANONYMOUS);
        assert!(!format!("{a:?}").contains("pk_a"));
        let other_key = Router::new(&Config::default().limits, b"other");
        assert_ne!(
            other_key.route("GET", "/api/accounts", None, false, Some(b"Klaviyo-API-Key pk_a")).account,
            a.account
        );
        // Each thread remembers its last hash: the same key under the same router
        // still names the same account, after another router's hash of it.
        assert_eq!(r.route("GET", "/api/accounts", None, false, Some(b"Klaviyo-API-Key pk_a")).account, a.account);
        let c = r.route("POST", "/client/events", Some("company_id=ABC123"), false, None);
        let d = r.route("POST", "/client/events", Some("company_id=XYZ"), false, Some(b"x"));
        assert_ne!(c.account, d.account);
        assert_eq!(c.label(), "create_client_event");
    }

    #[test]
    fn spellings_of_a_credential_share_buckets() {
        let r = router("");
        let route = |auth: &str| r.route("GET", "/api/profiles", None, false, Some(auth.as_bytes())).account;
        let canonical = route("Klaviyo-API-Key pk_a");
        assert_eq!(route("klaviyo-api-key  pk_a"), canonical);
        assert_eq!(route(" KLAVIYO-API-KEY\tpk_a "), canonical);
        assert_ne!(route("Bearer pk_a"), canonical);
        // Malformed values get one bucket per normalised value, not one per spelling.
        assert_eq!(route("Basic  abc"), route(" basic abc"));
        assert_ne!(route("Basic abc"), route("Basic abd"));
    }

    #[test]
    fn conditional_limits_add_a_bucket() {
        let r = router("");
        let plain = r.route("GET", "/api/profiles/1", None, false, Some(b"k"));
        assert_eq!(plain.demands.len(), 1);
        let both = r.route("GET", "/api/profiles/1", Some("include=lists,segments"), false, Some(b"k"));
        assert_eq!(both.demands.len(), 3);
        let enc = r.route(
            "GET",
            "/api/profiles",
            Some("additional-fields%5Bprofile%5D=predictive_analytics"),
            false,
            Some(b"k"),
        );
        assert_eq!(enc.demands.len(), 2);
        assert_eq!(enc.demands[1].windows.as_slice()[0].limit, 10);
    }

    #[test]
    fn share_overrides_and_unknown() {
        let r = router("[limits]\nshare = 0.5\nburst_guard_ms = 0\n[limits.operations.get_accounts]\nburst_per_second = 4\nsteady_per_minute = 40\n");
        let w = r.route("GET", "/api/accounts", None, false, None).demands[0].windows;
        assert_eq!(w.as_slice()[0], WindowSpec { limit: 2, period: 1_000_000 });
        assert_eq!(w.as_slice()[1].limit, 20);
        let u = r.route("GET", "/api/brand-new-thing", None, false, None);
        assert_eq!(u.label(), "unknown");
        assert_eq!(u.demands[0].key.bucket, BucketId::Unknown);
        let daily = r.route("POST", "/api/segments", None, false, None).demands[0].windows;
        assert_eq!(daily.as_slice().len(), 3);
        assert_eq!(daily.as_slice()[2].limit, 50);
    }
}
