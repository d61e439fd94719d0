//! `[webhooks]`: the gate's settings, read like the rest of the config (serde structs
//! with `deny_unknown_fields` whose field types check themselves), then resolved
//! (secrets from the environment or a file) and checked as a whole by
//! [`WebhooksConfig::resolve`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Secret};

/// Environment variable holding the current signing secret (the checklist's name).
pub const SECRET_ENV: &str = "KLAVIYO_WEBHOOK_SIGNING_SECRET";
/// Environment variable holding the previous signing secret while a rotation is under way.
pub const PREVIOUS_SECRET_ENV: &str = "KLAVIYO_WEBHOOK_SIGNING_SECRET_PREVIOUS";
/// Environment variable holding the flow-webhook token.
pub const FLOW_TOKEN_ENV: &str = "KLAVIYO_PROXY_FLOW_WEBHOOK_TOKEN";

/// Klaviyo retries a webhook for up to 24 hours: ids must be remembered at least that long.
const MIN_DEDUP_TTL_SECS: u64 = 24 * 3600;

/// Where the gate delivers: `https://…`, or `http://` to a loopback host only, so a
/// verified webhook never crosses a network in clear text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ForwardUrl(http::Uri);

impl ForwardUrl {
    /// The URL.
    pub fn uri(&self) -> &http::Uri {
        &self.0
    }
}

impl TryFrom<String> for ForwardUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        let host = uri.host().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match uri.scheme_str() {
            Some("https") => Ok(ForwardUrl(uri)),
            Some("http") if loopback => Ok(ForwardUrl(uri)),
            Some("http") => Err(format!("`{s}`: plain http only to a loopback host; use https://")),
            _ => Err(format!("`{s}` must start with https:// (or http:// to a loopback host)")),
        }
    }
}

impl From<ForwardUrl> for String {
    fn from(u: ForwardUrl) -> String {
        u.0.to_string()
    }
}

/// A JSON pointer (RFC 6901): empty, or starting with `/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct JsonPointer(String);

impl JsonPointer {
    /// The pointer, for `serde_json::Value::pointer`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JsonPointer {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.starts_with('/') {
            Ok(JsonPointer(s))
        } else {
            Err(format!("`{s}` is not a JSON pointer like /event/id"))
        }
    }
}

impl From<JsonPointer> for String {
    fn from(p: JsonPointer) -> String {
        p.0
    }
}

/// `[webhooks.flow]`: unsigned flow webhooks on a token-protected route.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// The operator's token, in the path (`/webhooks/flow/<token>`) or the
    /// `X-Webhook-Token` header; `KLAVIYO_PROXY_FLOW_WEBHOOK_TOKEN` wins. No token, no route.
    pub token: Option<Secret>,
    /// A JSON pointer to an id in the flow's payload (e.g. `/event_id`): repeats of an
    /// id are acknowledged and not delivered again. Unset: every request is delivered.
    pub dedup_pointer: Option<JsonPointer>,
}

/// `[webhooks]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Off by default.
    pub enabled: bool,
    /// The gate's own listener.
    pub listen: SocketAddr,
    /// The app's endpoint that verified webhooks are delivered to.
    pub forward_to: Option<ForwardUrl>,
    /// Extra PEM CA certificates trusted for an `https` `forward_to`.
    pub forward_ca_file: Option<PathBuf>,
    /// The durable store (redb): accepted webhooks, dead letters, seen ids.
    pub store_path: Option<PathBuf>,
    /// File with signing secrets, one per line (several during a rotation).
    /// `KLAVIYO_WEBHOOK_SIGNING_SECRET` (and `..._PREVIOUS`) are added to them.
    pub secret_file: Option<PathBuf>,
    /// Largest accepted difference between `Klaviyo-Timestamp` and now, either way.
    pub tolerance_ms: u64,
    /// PEM certificate chain to serve HTTPS with (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Allow a plain-HTTP listener off loopback (a TLS-terminating ingress in front).
    pub allow_plaintext_remote: bool,
    /// Largest webhook body accepted.
    pub max_body_bytes: usize,
    /// How long delivered ids are remembered for deduplication (at least 24 h).
    pub dedup_ttl_secs: u64,
    /// Most ids remembered; past it the oldest are forgotten first (and counted).
    pub dedup_max_ids: u64,
    /// Delivery attempts before a webhook becomes a dead letter.
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry; it doubles per retry (jitter: half to all of it).
    pub retry_base_ms: u64,
    /// Backoff ceiling never exceeded.
    pub retry_cap_ms: u64,
    /// Time allowed for the app to answer one delivery.
    pub delivery_timeout_ms: u64,
    /// Flow webhooks.
    pub flow: FlowConfig,
    /// The resolved signing secrets (never read from the file directly).
    #[serde(skip_deserializing)]
    pub secrets: Vec<Secret>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            forward_to: None,
            forward_ca_file: None,
            store_path: None,
            secret_file: None,
            tolerance_ms: 300_000,
            tls_cert: None,
            tls_key: None,
            allow_plaintext_remote: false,
            max_body_bytes: 10 * 1024 * 1024,
            dedup_ttl_secs: 25 * 3600,
            dedup_max_ids: 2_000_000,
            max_attempts: 30,
            retry_base_ms: 250,
            retry_cap_ms: 10_000,
            delivery_timeout_ms: 10_000,
            flow: FlowConfig::default(),
            secrets: Vec::new(),
        }
    }
}

fn conflict(message: impl Into<String>) -> ConfigError {
    ConfigError::Conflict(message.into())
}

impl WebhooksConfig {
    /// Reads the secrets and the flow token from the environment and `secret_file`,
    /// then checks the section as a whole. Does nothing when the gate is off.
    pub fn resolve(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let mut secrets = Vec::new();
        if let Some(path) = &self.secret_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.clone(), source })?;
            secrets.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
        }
        for var in [SECRET_ENV, PREVIOUS_SECRET_ENV] {
            if let Some(v) = env(var).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
                secrets.push(v);
            }
        }
        // Klaviyo asks for at least 16 characters; a shorter one is a mistake (a path, a
        // placeholder), and a guessable secret would let anyone sign.
        if secrets.iter().any(|s| s.len() < 16) {
            return Err(conflict(format!(
                "webhooks: a signing secret (from {SECRET_ENV}, {PREVIOUS_SECRET_ENV} or webhooks.secret_file) \
                 is shorter than 16 characters"
            )));
        }
        secrets.dedup();
        self.secrets = secrets.into_iter().map(Secret::new).collect();
        if let Some(token) = env(FLOW_TOKEN_ENV).filter(|t| !t.trim().is_empty()) {
            self.flow.token = Some(Secret::new(token.trim()));
        }
        if self.flow.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return Err(conflict("webhooks.flow.token must be at least 16 characters"));
        }
        if self.flow.token.as_ref().is_some_and(|t| !t.expose().bytes().all(|b| b.is_ascii_graphic() && b != b'/')) {
            return Err(conflict("webhooks.flow.token must be printable ASCII without `/` (it may go in a path)"));
        }
        if self.secrets.is_empty() && self.flow.token.is_none() {
            return Err(conflict(format!(
                "webhooks.enabled = true needs a signing secret ({SECRET_ENV} or webhooks.secret_file) \
                 or a flow token (webhooks.flow.token or {FLOW_TOKEN_ENV})"
            )));
        }
        if self.forward_to.is_none() {
            return Err(conflict("webhooks.enabled = true needs webhooks.forward_to (the app's endpoint)"));
        }
        if self.store_path.is_none() {
            return Err(conflict("webhooks.enabled = true needs webhooks.store_path (the durable store file)"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(conflict("webhooks.tls_cert and webhooks.tls_key go together"));
        }
        if self.dedup_ttl_secs < MIN_DEDUP_TTL_SECS {
            return Err(conflict(format!(
                "webhooks.dedup_ttl_secs must be at least {MIN_DEDUP_TTL_SECS} (Klaviyo retries for 24 hours)"
            )));
        }
        if self.dedup_max_ids == 0 || self.max_attempts == 0 || self.retry_base_ms == 0 || self.tolerance_ms == 0 {
            return Err(conflict("webhooks.dedup_max_ids, max_attempts, retry_base_ms and tolerance_ms must be > 0"));
        }
        if self.retry_cap_ms < self.retry_base_ms {
            return Err(conflict("webhooks.retry_cap_ms must be at least webhooks.retry_base_ms"));
        }
        Ok(())
    }

    /// The serve-time check: a listener off loopback must serve TLS, unless plain
    /// HTTP is explicitly allowed (for a TLS-terminating ingress in front).
    pub fn check_serve(&self) -> Result<(), ConfigError> {
        if self.enabled && !self.listen.ip().is_loopback() && self.tls_cert.is_none() && !self.allow_plaintext_remote {
            return Err(conflict(format!(
                "webhooks.listen = \"{}\" is not a loopback address: set webhooks.tls_cert and webhooks.tls_key \
                 to serve HTTPS, or webhooks.allow_plaintext_remote = true if a TLS-terminating ingress is in front",
                self.listen
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn enabled(extra: &str) -> Config {
        let src = format!(
            "[webhooks]\nenabled = true\nforward_to = \"http://127.0.0.1:3000/hook\"\nstore_path = \"/tmp/w.redb\"\n{extra}"
        );
        Config::parse(&src, "t").unwrap()
    }

    #[test]
    fn off_by_default_and_needs_its_pieces_when_on() {
        let mut c = Config::default();
        assert!(!c.webhooks.enabled);
        c.webhooks.resolve(&|_| None).unwrap();
        let e = enabled("").webhooks.resolve(&|_| None).unwrap_err().to_string();
        assert!(e.contains(SECRET_ENV), "{e}");
        let env = |k: &str| (k == SECRET_ENV).then(|| "short".to_string());
        assert!(enabled("").webhooks.resolve(&env).unwrap_err().to_string().contains("16"));
        let mut w = enabled("").webhooks;
        let env = |k: &str| match k {
            SECRET_ENV => Some("new-secret-0123456789".to_string()),
            PREVIOUS_SECRET_ENV => Some("old-secret-0123456789".to_string()),
            _ => None,
        };
        w.resolve(&env).unwrap();
        assert_eq!(w.secrets.len(), 2);
        let printed = toml::to_string(&w).unwrap();
        assert!(!printed.contains("new-secret") && !format!("{w:?}").contains("old-secret"), "{printed}");
        let mut w = Config::parse("[webhooks]\nenabled = true\n", "t").unwrap().webhooks;
        assert!(w.resolve(&env).unwrap_err().to_string().contains("webhooks.forward_to"));
        let mut w = enabled("dedup_ttl_secs = 3600\n").webhooks;
        assert!(w.resolve(&env).unwrap_err().to_string().contains("webhooks.dedup_ttl_secs"));
        let mut w = enabled("tls_cert = \"/c.pem\"\n").webhooks;
        assert!(w.resolve(&env).unwrap_err().to_string().contains("tls_key"));
    }

    #[test]
    fn secrets_from_a_file_one_per_line() {
        let path = std::env::temp_dir().join(format!("kp-wh-secrets-{}", fastrand::u64(..)));
        std::fs::write(&path, "first-secret-0123456789\n\n  second-secret-0123456789  \n").unwrap();
        let mut w = enabled(&format!("secret_file = \"{}\"\n", path.display())).webhooks;
        w.resolve(&|_| None).unwrap();
        let got: Vec<&str> = w.secrets.iter().map(Secret::expose).collect();
        assert_eq!(got, ["first-secret-0123456789", "second-secret-0123456789"]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn keys_are_checked_where_they_are() {
        let cases = [
            ("[webhooks]\nforward_to = \"http://app.internal/hook\"\n", "webhooks.forward_to"),
            ("[webhooks]\nforward_to = \"ftp://127.0.0.1/x\"\n", "webhooks.forward_to"),
            ("[webhooks]\nlisten = \"nowhere\"\n", "webhooks.listen"),
            ("[webhooks.flow]\ndedup_pointer = \"event_id\"\n", "webhooks.flow.dedup_pointer"),
            ("[webhooks]\nbogus = 1\n", "webhooks"),
        ];
        for (src, key) in cases {
            let e = Config::parse(src, "t.toml").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("line"), "{src:?}: {e}");
        }
        Config::parse("[webhooks]\nforward_to = \"https://app.internal/hook\"\n", "t").unwrap();
        Config::parse("[webhooks]\nforward_to = \"http://[::1]:3000/hook\"\n", "t").unwrap();
    }

    #[test]
    fn off_loopback_needs_tls_or_an_explicit_opt_out() {
        let mut w = enabled("listen = \"0.0.0.0:8443\"\n").webhooks;
        w.resolve(&|k| (k == SECRET_ENV).then(|| "a-secret-0123456789".into())).unwrap();
        assert!(w.check_serve().unwrap_err().to_string().contains("allow_plaintext_remote"));
        w.allow_plaintext_remote = true;
        w.check_serve().unwrap();
        w.allow_plaintext_remote = false;
        w.tls_cert = Some("/c.pem".into());
        w.tls_key = Some("/k.pem".into());
        w.check_serve().unwrap();
    }
}
