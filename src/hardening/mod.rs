//! What keeps a local process, a web page, a malformed request or a flood from
//! misusing the proxy or its key. Each concern is a small module of pure functions
//! (table-tested next to the code) that the server, the request path and the admin
//! listener call.

pub mod admin_guard;
pub mod budget;
pub mod conn;
pub mod hop;
pub mod host;
pub mod random;
pub mod target;
pub mod token;

#[cfg(test)]
mod tests {
    use crate::config::{AuthMode, Config, Secret};

    /// `Debug` of the app (and so of the proxy and its live config) prints no secret.
    #[test]
    fn debug_prints_no_secret() {
        let mut config = Config::default();
        config.auth.mode = AuthMode::Inject;
        config.auth.private_key = Some(Secret::new("pk_SECRETkey_0123456789"));
        config.server.client_token = Some(Secret::new("SECRETclienttoken_0123"));
        config.admin.token = Some(Secret::new("SECRETadmintoken_0123"));
        let app = crate::App::build(config).unwrap();
        let printed = format!("{app:?}");
        assert!(printed.len() > 100, "{printed}");
        for secret in ["SECRET", "pk_", "Klaviyo-API-Key"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        // The generated account-hash key is not printed either (as bytes or otherwise).
        assert!(printed.contains("fallback_hash_key: [redacted]"), "{printed}");
    }
}
