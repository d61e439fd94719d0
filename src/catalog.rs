//! Klaviyo's endpoint catalog: every operation's rate limits, compiled in from
//! `data/endpoint-rate-limits.tsv`, and the matcher from (method, path) to an operation.

use std::sync::LazyLock;

/// Klaviyo's rate-limit tiers (burst per second / steady per minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// 1/s, 15/min.
    XS,
    /// 3/s, 60/min.
    S,
    /// 10/s, 150/min.
    M,
    /// 75/s, 750/min.
    L,
    /// 350/s, 3500/min.
    XL,
    /// Off-tier limits.
    Custom,
}

impl Tier {
    /// The tier's name as Klaviyo's guide spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::XS => "XS",
            Tier::S => "S",
            Tier::M => "M",
            Tier::L => "L",
            Tier::XL => "XL",
            Tier::Custom => "custom",
        }
    }
}

/// A stricter limit that applies, in addition to the operation's own, when a query
/// parameter asks for an expensive expansion (`include=list`, `additional-fields[...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Condition {
    /// Query parameter name, e.g. `additional-fields[profile]`.
    pub param: &'static str,
    /// The value that triggers the limit, e.g. `predictive_analytics`.
    pub value: &'static str,
    /// Burst limit per second.
    pub burst_per_second: u32,
    /// Steady limit per minute.
    pub steady_per_minute: u32,
}

impl Condition {
    /// Whether a query parameter `(name, value)` triggers this condition. Values are
    /// comma-separated lists; `include=lists` counts for `include=list`.
    pub fn matches(&self, name: &str, value: &str) -> bool {
        name == self.param
            && value
                .split(',')
                .map(str::trim)
                .any(|v| v == self.value || v.strip_suffix('s').is_some_and(|singular| singular == self.value))
    }
}

/// One operation of Klaviyo's API with its published limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    /// OpenAPI `operationId`, e.g. `get_profiles`.
    pub id: &'static str,
    /// HTTP method.
    pub method: &'static str,
    /// Path template, e.g. `/api/profiles/{id}`.
    pub path: &'static str,
    /// Whether the operation comes from the beta spec (needs a `.pre` revision).
    pub beta: bool,
    /// Index shared by every operation with this method and path: stable and beta
    /// versions of one endpoint count against one bucket.
    pub endpoint: usize,
    /// Klaviyo's tier for the operation.
    pub tier: Tier,
    /// Burst limit (1 s window).
    pub burst_per_second: u32,
    /// Steady limit (60 s window).
    pub steady_per_minute: u32,
    /// Daily cap, where Klaviyo has one.
    pub daily_per_day: Option<u32>,
    /// Conditional limits taken in addition to the operation's own bucket.
    pub conditions: &'static [Condition],
    /// The key scopes the operation needs (`x-klaviyo-scopes`), e.g. `profiles:read`;
    /// empty for the public-key `/client/` operations.
    pub scopes: &'static [&'static str],
}

impl Operation {
    /// Whether the operation authenticates with `company_id` (public key) instead of
    /// an `Authorization` header.
    pub fn is_client(&self) -> bool {
        self.path.starts_with("/client/")
    }
}

include!(concat!(env!("OUT_DIR"), "/operations.rs"));

/// Looks an operation up by its `operationId` (stable version first).
pub fn by_id(id: &str) -> Option<&'static Operation> {
    OPERATIONS.iter().find(|op| op.id == id && !op.beta).or_else(|| OPERATIONS.iter().find(|op| op.id == id))
}

enum Segment {
    Literal(&'static str),
    Param,
}

struct Template {
    segments: Vec<Segment>,
    literals: usize,
    op: &'static Operation,
}

/// The index key: method, segment count, and the resource (the second segment, as in
/// `/api/profiles/...`) when it is a literal; `""` files templates whose resource is a
/// parameter. A request looks at two short lists, not at every template of its method.
type IndexKey = (&'static str, usize, &'static str);

/// Templates by [`IndexKey`], built once from [`OPERATIONS`]. Hashed with foldhash:
/// every request looks up twice, and a map that never grows has no collisions for a
/// client to aim at.
static INDEX: LazyLock<foldhash::HashMap<IndexKey, Vec<Template>>> = LazyLock::new(|| {
    let mut index: foldhash::HashMap<IndexKey, Vec<Template>> = foldhash::HashMap::default();
    for op in OPERATIONS {
        let segments: Vec<Segment> =
            split(op.path).map(|s| if s.starts_with('{') { Segment::Param } else { Segment::Literal(s) }).collect();
        let literals = segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        let resource = match segments.get(1) {
            Some(Segment::Literal(l)) => *l,
            _ => "",
        };
        index.entry((op.method, segments.len(), resource)).or_default().push(Template { segments, literals, op });
    }
    index
});

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Finds the operation for a request. `path` is the URI path without the query; a
/// trailing slash (older revisions) is ignored; ids may have any shape. Beta operations
/// are considered only when `beta` is set (revision ending in `.pre`), and then win over
/// the stable version of the same endpoint. Literal segments win over parameters, so
/// `/api/profiles/bulk` never matches `/api/profiles/{id}` when both exist.
pub fn find(method: &str, path: &str, beta: bool) -> Option<&'static Operation> {
    // Split rather than collect: no allocation on the request path.
    let mut count = 0;
    let mut resource = "";
    for (i, s) in split(path).enumerate() {
        if i == 1 {
            resource = s;
        }
        count = i + 1;
    }
    let named = INDEX.get(&(method, count, resource)).map(Vec::as_slice).unwrap_or_default();
    let any = INDEX.get(&(method, count, "")).map(Vec::as_slice).unwrap_or_default();
    named
        .iter()
        .chain(any)
        .filter(|t| beta || !t.op.beta)
        .filter(|t| {
            t.segments.iter().zip(split(path)).all(|(t, s)| match t {
                Segment::Literal(l) => *l == s,
                Segment::Param => true,
            })
        })
        .max_by_key(|t| (t.literals, t.op.beta == beta))
        .map(|t| t.op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_every_row() {
        assert_eq!(OPERATIONS.len(), 493);
        assert_eq!(OPERATIONS.iter().filter(|o| o.beta).count(), 148);
        let with_conditions: usize = OPERATIONS.iter().filter(|o| !o.beta).map(|o| o.conditions.len()).sum();
        assert_eq!(with_conditions, 7, "six operations, get_profile has two");
    }

    #[test]
    fn matches_templates() {
        let cases: &[(&str, &str, bool, Option<&str>)] = &[
            ("GET", "/api/accounts", false, Some("get_accounts")),
            ("GET", "/api/accounts/", false, Some("get_accounts")),
            ("GET", "/api/profiles/01GDDKASAP8TKDDA2GRZDSVP4H", false, Some("get_profile")),
            ("GET", "/api/profiles/01GDDKASAP8TKDDA2GRZDSVP4H/", false, Some("get_profile")),
            ("GET", "/api/profiles/abc%20def", false, Some("get_profile")),
            ("POST", "/api/events", false, Some("create_event")),
            ("POST", "/client/events", false, Some("create_client_event")),
            ("GET", "/api/lists/Xy12/profiles", false, Some("get_profiles_for_list")),
            ("DELETE", "/api/accounts", false, None),
            ("GET", "/api/nope", false, None),
            ("GET", "/", false, None),
        ];
        for (method, path, beta, want) in cases {
            assert_eq!(find(method, path, *beta).map(|o| o.id), *want, "{method} {path}");
        }
    }

    /// The index by resource finds every operation of the catalog by its own template.
    #[test]
    fn every_operation_is_found_by_its_template() {
        for op in OPERATIONS {
            let concrete: String =
                op.path.split('/').map(|s| if s.starts_with('{') { "x1" } else { s }).collect::<Vec<_>>().join("/");
            let found = find(op.method, &concrete, op.beta).unwrap_or_else(|| panic!("{} {concrete}", op.method));
            assert_eq!(found.endpoint, op.endpoint, "{} {concrete}: found {}", op.method, found.id);
        }
    }

    #[test]
    fn beta_needs_pre_revision() {
        let beta_only = OPERATIONS
            .iter()
            .find(|o| o.beta && !OPERATIONS.iter().any(|s| !s.beta && s.endpoint == o.endpoint))
            .expect("a beta-only operation");
        let concrete = beta_only.path.replace("{id}", "x1").replace("{", "").replace("}", "");
        assert!(find(beta_only.method, &concrete, false).is_none());
        assert_eq!(find(beta_only.method, &concrete, true).map(|o| o.id), Some(beta_only.id));
        // An endpoint in both specs resolves to the beta row only with a `.pre` revision.
        let stable = find("GET", "/api/campaigns", false).unwrap();
        assert!(!stable.beta);
        if let Some(beta) = find("GET", "/api/campaigns", true) {
            assert_eq!(beta.endpoint, stable.endpoint);
        }
    }

    #[test]
    fn conditions_match_comma_lists() {
        let op = find("GET", "/api/profiles/1", false).unwrap();
        let list = op.conditions.iter().find(|c| c.value == "list").unwrap();
        assert!(list.matches("include", "lists"));
        assert!(list.matches("include", "segments,lists"));
        assert!(list.matches("include", "list"));
        assert!(!list.matches("include", "segments"));
        assert!(!list.matches("fields", "lists"));
    }

    #[test]
    fn scopes_are_copied() {
        assert_eq!(by_id("get_accounts").unwrap().scopes, ["accounts:read"]);
        assert_eq!(by_id("create_event").unwrap().scopes, ["events:write"]);
        let multi = OPERATIONS.iter().find(|o| o.scopes.len() > 1).expect("an operation needing two scopes");
        assert!(multi.scopes.iter().all(|s| s.contains(':') && !s.contains(',')), "{:?}", multi.scopes);
        let unscoped = OPERATIONS.iter().filter(|o| o.scopes.is_empty()).count();
        assert_eq!(unscoped, 7, "only some /client/ operations declare no scope");
        assert!(OPERATIONS.iter().filter(|o| o.scopes.is_empty()).all(|o| o.is_client()));
    }

    #[test]
    fn limits_are_copied() {
        let op = by_id("get_accounts").unwrap();
        assert_eq!((op.burst_per_second, op.steady_per_minute, op.tier), (1, 15, Tier::XS));
        let op = by_id("create_segment").unwrap();
        assert_eq!(op.daily_per_day, Some(100));
    }
}
