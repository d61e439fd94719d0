//! The value types that check themselves as serde reads them, so that a bad value is
//! an error naming its key and line. Some fields are `pub(super)`: the defaults in
//! [`super::sections`] build known-good values without a check.

use std::fmt;

use http::Uri;
use serde::{Deserialize, Serialize, Serializer};

use crate::catalog;

/// A value that must never be printed: logs, errors and `check-config` show it redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// The upstream base URL: `http` or `https`, a host, no path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpstreamUrl(Uri);

impl UpstreamUrl {
    /// The parsed URI (scheme and authority only).
    pub fn uri(&self) -> &Uri {
        &self.0
    }
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("`{s}` must start with http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("`{s}` has no host"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(format!("`{s}` must not have a path or query"));
        }
        Ok(UpstreamUrl(uri))
    }
}

impl From<UpstreamUrl> for String {
    fn from(u: UpstreamUrl) -> String {
        let s = u.0.to_string();
        s.trim_end_matches('/').to_string()
    }
}

/// A Klaviyo API revision, `YYYY-MM-DD` with an optional `.pre` (beta) suffix.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Revision(pub(super) String);

impl Revision {
    /// Whether this revision opts into beta operations.
    pub fn is_beta(&self) -> bool {
        is_beta_revision(&self.0)
    }
    /// The revision string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether a `revision` header value asks for beta operations.
pub fn is_beta_revision(revision: &str) -> bool {
    revision.ends_with(".pre")
}

impl TryFrom<String> for Revision {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let date = s.strip_suffix(".pre").unwrap_or(&s);
        let ok = date.len() == 10
            && date.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
        if ok {
            Ok(Revision(s))
        } else {
            Err(format!("`{s}` is not a revision like 2026-07-15 or 2026-07-15.pre"))
        }
    }
}

impl From<Revision> for String {
    fn from(r: Revision) -> String {
        r.0
    }
}

/// Share of the account's quota this proxy may use, in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Share(pub(super) f64);

impl Share {
    /// The fraction.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Share {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v > 0.0 && v <= 1.0 {
            Ok(Share(v))
        } else {
            Err(format!("{v} must be greater than 0 and at most 1"))
        }
    }
}

impl From<Share> for f64 {
    fn from(s: Share) -> f64 {
        s.0
    }
}

/// A name for an account in metrics and logs: 1 to 32 of `A-Z a-z 0-9 _ -`, so it
/// can never carry a key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountName(pub(super) String);

impl AccountName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok && !s.starts_with("pk_") {
            Ok(AccountName(s))
        } else {
            Err("must be 1 to 32 letters, digits, `_` or `-` (and not a key)".into())
        }
    }
}

impl From<AccountName> for String {
    fn from(n: AccountName) -> String {
        n.0
    }
}

/// An `operationId` from the catalog.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct OperationName(pub(super) String);

impl TryFrom<String> for OperationName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if catalog::by_id(&s).is_some() {
            Ok(OperationName(s))
        } else {
            Err(format!("`{s}` is not an operation in the catalog (see `klaviyo-proxy routes`)"))
        }
    }
}

impl From<OperationName> for String {
    fn from(o: OperationName) -> String {
        o.0
    }
}

impl OperationName {
    /// The operation id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key scope from the catalog (`x-klaviyo-scopes`), e.g. `profiles:read`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

impl TryFrom<String> for Scope {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if catalog::OPERATIONS.iter().any(|o| o.scopes.contains(&s.as_str())) {
            Ok(Scope(s))
        } else {
            Err(format!("`{s}` is not a scope any operation in the catalog needs (like profiles:read)"))
        }
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0
    }
}

impl AsRef<str> for Scope {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Scope {
    /// The scope.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A `redis://` or `rediss://` URL. It may hold a password, so it prints redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RedisUrl(Secret);

impl RedisUrl {
    /// The URL, for the one place that connects.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        // Never echo the value: it may carry a password.
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            Ok(RedisUrl(Secret::new(s)))
        } else {
            Err("must start with redis:// or rediss:// (TLS)".into())
        }
    }
}
