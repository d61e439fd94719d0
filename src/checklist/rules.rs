//! The checklist's rules as pure functions: who a `User-Agent` names, how old a
//! `revision` is under Klaviyo's versioning policy, whether a phone number is E.164,
//! and which key scopes a set of operations needs.

use serde::Serialize;

use crate::catalog::Operation;

/// The official SDKs' `User-Agent` product names (openapi-generator's
/// `klaviyo-api-<language>/<version>`): Python `klaviyo-api` sends
/// `klaviyo-api-python/25.0.0`, Node `klaviyo-api` sends `klaviyo-api-node/23.0.0`
/// (read from the installed packages by `tests/sdk/install.sh`). PHP and Ruby follow
/// the same generator's scheme.
pub const OFFICIAL_SDKS: &[&str] = &["klaviyo-api-python", "klaviyo-api-node", "klaviyo-api-php", "klaviyo-api-ruby"];

/// Longest client name or version kept: user agents are client-chosen text.
const MAX_TOKEN: usize = 48;

/// Who sent a request, as its `User-Agent` says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ClientId {
    /// One of Klaviyo's official SDKs.
    Sdk {
        /// The product name, e.g. `klaviyo-api-python`.
        name: &'static str,
        /// Its version, e.g. `25.0.0` (empty when the agent gave none).
        version: String,
    },
    /// Any other client, named by the first product of its agent (`curl/8.5.0`).
    Other {
        /// The product, e.g. `curl/8.5.0` or `python-requests/2.32.3`.
        name: String,
    },
    /// No `User-Agent` header at all.
    Unnamed,
}

impl ClientId {
    /// Whether this is an official SDK.
    pub fn is_sdk(&self) -> bool {
        matches!(self, ClientId::Sdk { .. })
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Sdk { name, version } if version.is_empty() => f.write_str(name),
            ClientId::Sdk { name, version } => write!(f, "{name} {version}"),
            ClientId::Other { name } => f.write_str(name),
            ClientId::Unnamed => f.write_str("(no user agent)"),
        }
    }
}

/// Keeps what can be shown of a client-chosen token: printable ASCII without spaces,
/// bounded, and never anything that looks like a private key.
pub fn clean(token: &str) -> String {
    if token.to_ascii_lowercase().contains("pk_") {
        return "(redacted)".into();
    }
    token.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '<' | '>')).take(MAX_TOKEN).collect()
}

/// Names the client of a `User-Agent` value. Accepted forms: product tokens
/// `name/version` separated by spaces, with comments in parentheses (RFC 9110
/// §10.1.5); an official SDK is recognised in any position and in any letter case
/// (`klaviyo-api-python/25.0.0`, `MyApp/2 klaviyo-api-node/23.0.0`); any other agent
/// is named by its first product.
pub fn parse_user_agent(value: Option<&str>) -> ClientId {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return ClientId::Unnamed;
    };
    let products = value.split_whitespace().filter(|t| !t.starts_with('(') && !t.ends_with(')'));
    for token in products.clone() {
        let (name, version) = token.split_once('/').unwrap_or((token, ""));
        if let Some(sdk) = OFFICIAL_SDKS.iter().find(|s| s.eq_ignore_ascii_case(name)) {
            return ClientId::Sdk { name: sdk, version: clean(version) };
        }
    }
    let first = products.clone().next().unwrap_or(value);
    ClientId::Other { name: clean(first) }
}

/// A civil date (proleptic Gregorian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    /// Year.
    pub year: i64,
    /// Month, 1 to 12.
    pub month: u32,
    /// Day, 1 to 31.
    pub day: u32,
}

impl Date {
    /// Parses `YYYY-MM-DD` (a revision without its `.pre`).
    pub fn parse(s: &str) -> Option<Date> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let year = s[0..4].parse().ok()?;
        let month = s[5..7].parse().ok().filter(|m| (1..=12).contains(m))?;
        let day = s[8..10].parse().ok().filter(|d| (1..=31).contains(d))?;
        Some(Date { year, month, day })
    }

    /// Days since 1970-01-01 (Howard Hinnant's days-from-civil); an impossible day
    /// such as February 29 of a common year counts as the next day's.
    pub fn days(self) -> i64 {
        let (m, d) = (i64::from(self.month), i64::from(self.day));
        let y = if m <= 2 { self.year - 1 } else { self.year };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The same day `n` years later.
    pub fn plus_years(self, n: i64) -> Date {
        Date { year: self.year + n, ..self }
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// Days since 1970-01-01 now.
pub fn today() -> i64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    (secs / 86_400) as i64
}

/// Where a revision stands under Klaviyo's API versioning and deprecation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RevisionState {
    /// In its first year: stable and supported.
    Stable,
    /// A beta revision (`.pre`): not for production.
    Beta,
    /// In its second year: still served, deprecated; plan an upgrade.
    Deprecated,
    /// Two years old or more: retired, Klaviyo no longer serves it as asked.
    Retired,
    /// Dated after today: Klaviyo refuses it.
    Future,
    /// Not `YYYY-MM-DD` (with an optional `.pre`).
    Invalid,
}

/// A revision judged against a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevisionAge {
    /// Its state.
    pub state: RevisionState,
    /// Days since its release (negative for a future one).
    pub age_days: i64,
    /// When it is (or was) deprecated: one year after its release.
    pub deprecated_on: Option<Date>,
    /// When it is (or was) retired: two years after its release.
    pub retired_on: Option<Date>,
}

/// Judges a `revision` on the day `today` (days since 1970-01-01). Klaviyo's policy:
/// a revision is stable for one year from its date, deprecated in its second year and
/// retired after two (so `2024-10-15` was retired on 2026-10-15). A `.pre` revision is
/// beta while its date is in the policy's two years, and retired after.
pub fn revision_age(revision: &str, today: i64) -> RevisionAge {
    let (date, beta) = match revision.strip_suffix(".pre") {
        Some(d) => (d, true),
        None => (revision, false),
    };
    let Some(date) = Date::parse(date) else {
        return RevisionAge { state: RevisionState::Invalid, age_days: 0, deprecated_on: None, retired_on: None };
    };
    let (deprecated_on, retired_on) = (date.plus_years(1), date.plus_years(2));
    let state = if today < date.days() {
        RevisionState::Future
    } else if today >= retired_on.days() {
        RevisionState::Retired
    } else if beta {
        RevisionState::Beta
    } else if today >= deprecated_on.days() {
        RevisionState::Deprecated
    } else {
        RevisionState::Stable
    };
    RevisionAge {
        state,
        age_days: today - date.days(),
        deprecated_on: Some(deprecated_on),
        retired_on: Some(retired_on),
    }
}

/// Whether a phone number is in E.164 form: `+`, a country code not starting with 0,
/// 7 to 15 digits in all, nothing else (no spaces, dashes or parentheses).
pub fn is_e164(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else { return false };
    (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0')
}

/// The scope an operation's scope implies it too: Klaviyo's "Full" access to an API
/// (`profiles:write`) includes its "Read-only" access (`profiles:read`).
fn implied_read(scope: &str) -> Option<String> {
    scope.strip_suffix(":write").map(|api| format!("{api}:read"))
}

/// The least set of key scopes that lets every operation in `ops` run: the union of
/// their catalog scopes (`x-klaviyo-scopes`), sorted, with `X:read` left out where
/// `X:write` (Klaviyo's "Full" access) is in it.
pub fn scope_union<'a>(ops: impl IntoIterator<Item = &'a Operation>) -> Vec<&'static str> {
    let mut all: Vec<&'static str> = ops.into_iter().flat_map(|o| o.scopes.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    let implied: Vec<String> = all.iter().filter_map(|s| implied_read(s)).collect();
    all.retain(|s| !implied.iter().any(|i| i == s));
    all
}

/// The scopes of `op` that `allowed` does not grant (empty: the operation may run).
pub fn missing_scopes<S: AsRef<str>>(op: &Operation, allowed: &[S]) -> Vec<&'static str> {
    op.scopes
        .iter()
        .copied()
        .filter(|need| {
            !allowed.iter().map(AsRef::as_ref).any(|a| a == *need || implied_read(a).as_deref() == Some(*need))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::by_id;

    #[test]
    fn names_sdks_and_other_clients() {
        let sdk = |name: &'static str, version: &str| ClientId::Sdk { name, version: version.into() };
        let other = |name: &str| ClientId::Other { name: name.into() };
        let cases: &[(Option<&str>, ClientId)] = &[
            // The installed SDKs' own strings.
            (Some("klaviyo-api-python/25.0.0"), sdk("klaviyo-api-python", "25.0.0")),
            (Some("klaviyo-api-node/23.0.0"), sdk("klaviyo-api-node", "23.0.0")),
            // Wrapped by an app, in another case, or without a version.
            (Some("MyShop/1.2 klaviyo-api-node/23.0.0"), sdk("klaviyo-api-node", "23.0.0")),
            (Some("Klaviyo-API-Python/24.1.0 (linux)"), sdk("klaviyo-api-python", "24.1.0")),
            (Some("klaviyo-api-php/13.0.0"), sdk("klaviyo-api-php", "13.0.0")),
            (Some("klaviyo-api-node"), sdk("klaviyo-api-node", "")),
            // Not an SDK: named by the first product.
            (Some("curl/8.5.0"), other("curl/8.5.0")),
            (Some("python-requests/2.32.3"), other("python-requests/2.32.3")),
            (Some("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"), other("Mozilla/5.0")),
            (Some("klaviyo-api-pythonic/1.0"), other("klaviyo-api-pythonic/1.0")),
            (Some("OpenAPI-Generator/1.0.0/python"), other("OpenAPI-Generator/1.0.0/python")),
            (Some("app/1 pk_0123456789abcdef0123"), other("app/1")),
            (Some("pk_0123456789abcdef0123/1"), other("(redacted)")),
            (Some("   "), ClientId::Unnamed),
            (None, ClientId::Unnamed),
        ];
        for (ua, want) in cases {
            assert_eq!(&parse_user_agent(*ua), want, "{ua:?}");
        }
        let long = format!("{}/1", "x".repeat(500));
        assert!(parse_user_agent(Some(&long)).to_string().len() <= MAX_TOKEN);
        assert_eq!(sdk("klaviyo-api-python", "25.0.0").to_string(), "klaviyo-api-python 25.0.0");
    }

    #[test]
    fn dates_count_days() {
        assert_eq!(Date::parse("1970-01-01").unwrap().days(), 0);
        assert_eq!(Date::parse("2000-03-01").unwrap().days(), 11_017);
        assert_eq!(Date::parse("2024-02-29").unwrap().plus_years(1).days(), Date::parse("2025-03-01").unwrap().days());
        for bad in ["2024-13-01", "2024-1-01", "20241001", "2024-10-15x", "abcd-ef-gh"] {
            assert_eq!(Date::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn judges_revision_age_by_the_policy() {
        let day = |s: &str| Date::parse(s).unwrap().days();
        let today = day("2026-12-01");
        let cases = [
            ("2026-07-15", RevisionState::Stable),
            ("2026-10-15", RevisionState::Stable),
            ("2025-12-02", RevisionState::Stable),
            ("2025-12-01", RevisionState::Deprecated),
            ("2025-07-15", RevisionState::Deprecated),
            ("2024-12-02", RevisionState::Deprecated),
            // The production checklist's own revision: retired since 2026-10-15.
            ("2024-10-15", RevisionState::Retired),
            ("2024-12-01", RevisionState::Retired),
            ("2023-02-22", RevisionState::Retired),
            ("2026-07-15.pre", RevisionState::Beta),
            ("2024-10-15.pre", RevisionState::Retired),
            ("2027-01-15", RevisionState::Future),
            ("latest", RevisionState::Invalid),
            ("2026-07-15.beta", RevisionState::Invalid),
        ];
        for (revision, want) in cases {
            assert_eq!(revision_age(revision, today).state, want, "{revision}");
        }
        let old = revision_age("2024-10-15", today);
        assert_eq!(old.retired_on.unwrap().to_string(), "2026-10-15");
        assert_eq!(old.deprecated_on.unwrap().to_string(), "2025-10-15");
        assert_eq!(old.age_days, today - day("2024-10-15"));
    }

    #[test]
    fn e164_numbers() {
        for good in ["+14155552671", "+442071838750", "+8613800138000", "+1234567", "+123456789012345"] {
            assert!(is_e164(good), "{good}");
        }
        for bad in [
            "14155552671",
            "+1 415 555 2671",
            "+1-415-555-2671",
            "(415) 555-2671",
            "+01234567890",
            "+123456",
            "+1234567890123456",
            "+1415555267a",
            "",
            "+",
            "++14155552671",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    #[test]
    fn scope_union_comes_from_the_catalog() {
        let ops = |ids: &[&str]| ids.iter().map(|id| by_id(id).unwrap()).collect::<Vec<_>>();
        assert_eq!(scope_union(ops(&["get_accounts", "get_accounts"])), ["accounts:read"]);
        // Writing profiles covers reading them; events and accounts stay apart.
        assert_eq!(
            scope_union(ops(&["get_accounts", "create_event", "get_profiles", "create_or_update_profile"])),
            ["accounts:read", "events:write", "profiles:write"]
        );
        // An operation needing two scopes brings both.
        let two = by_id("get_tags_for_campaign").unwrap();
        assert_eq!(two.scopes, ["campaigns:read", "tags:read"]);
        assert_eq!(scope_union([two]), ["campaigns:read", "tags:read"]);
        // A write of one API next to a read of another keeps both.
        assert_eq!(scope_union(ops(&["update_image_for_campaign_message"])), ["campaigns:write", "images:read"]);
        // /client/ operations with no declared scope add nothing.
        assert!(scope_union(ops(&["get_client_reviews"])).is_empty());
        assert!(scope_union(std::iter::empty()).is_empty());
    }

    #[test]
    fn missing_scopes_honour_full_access() {
        let allowed = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let get_profiles = by_id("get_profiles").unwrap();
        let create_event = by_id("create_event").unwrap();
        assert!(missing_scopes(get_profiles, &allowed(&["profiles:read"])).is_empty());
        assert!(missing_scopes(get_profiles, &allowed(&["profiles:write"])).is_empty());
        assert_eq!(missing_scopes(create_event, &allowed(&["profiles:write", "events:read"])), ["events:write"]);
        let two = by_id("get_tags_for_campaign").unwrap();
        assert_eq!(missing_scopes(two, &allowed(&["campaigns:write"])), ["tags:read"]);
    }
}
