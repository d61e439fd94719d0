//! The checks that span several keys (or that serde's types cannot make).

use super::*;

impl Config {
    /// Checks that a Redis store has what it needs: a URL, and an account hash key
    /// so that every replica names an account's buckets alike.
    pub fn check_limiter(&self) -> Result<(), ConfigError> {
        if self.limiter.state_path.is_some() && self.auth.account_hash_key.is_none() {
            // Buckets are named by a keyed hash of the credential: a random key per
            // process would name them differently after the restart.
            return Err(ConfigError::Conflict(
                "limiter.state_path needs auth.account_hash_key (or KLAVIYO_PROXY_ACCOUNT_HASH_KEY), \
                 so that a restarted proxy names an account's buckets as before"
                    .into(),
            ));
        }
        if self.limiter.store != StoreKind::Redis {
            return Ok(());
        }
        if self.limiter.redis_url.is_none() {
            return Err(ConfigError::Conflict(
                "limiter.store = \"redis\" needs limiter.redis_url (or KLAVIYO_PROXY_REDIS_URL)".into(),
            ));
        }
        if self.auth.account_hash_key.is_none() {
            return Err(ConfigError::Conflict(
                "limiter.store = \"redis\" needs auth.account_hash_key (or KLAVIYO_PROXY_ACCOUNT_HASH_KEY), \
                 the same on every replica, so that replicas name an account's buckets alike"
                    .into(),
            ));
        }
        if self.limiter.key_prefix.is_empty() || self.limiter.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::Conflict("limiter.key_prefix must be non-empty, without { or }".into()));
        }
        if self.limiter.timeout_ms == 0 {
            return Err(ConfigError::Conflict("limiter.timeout_ms must be > 0".into()));
        }
        Ok(())
    }

    /// Coalescing needs the spool (its dead letters) and a linger that lets jobs fill.
    pub fn check_coalesce(&self) -> Result<(), ConfigError> {
        let c = &self.coalesce;
        if !c.events {
            return Ok(());
        }
        if self.spool.path.is_none() {
            return Err(ConfigError::Conflict(
                "coalesce.events = true needs spool.path (or KLAVIYO_PROXY_SPOOL_PATH): refused events go to its dead letters"
                    .into(),
            ));
        }
        if c.linger_ms == 0 || c.linger_ms > 60_000 {
            return Err(ConfigError::Conflict("coalesce.linger_ms must be between 1 and 60000".into()));
        }
        if c.max_pending == 0 {
            return Err(ConfigError::Conflict("coalesce.max_pending must be > 0".into()));
        }
        Ok(())
    }

    /// Checks the retry and breaker values that serde's types cannot.
    pub fn check_resilience(&self) -> Result<(), ConfigError> {
        let r = &self.retry;
        let problem = if r.base_ms == 0 {
            Some("retry.base_ms must be > 0 (retries would not back off)".to_string())
        } else if r.cap_ms < r.base_ms {
            Some(format!("retry.cap_ms ({}) must be at least retry.base_ms ({})", r.cap_ms, r.base_ms))
        } else if !(r.budget_ratio.is_finite() && r.budget_ratio >= 0.0) {
            Some(format!("retry.budget_ratio ({}) must be a number >= 0", r.budget_ratio))
        } else if r.budget_window_ms < 1000 {
            Some("retry.budget_window_ms must be at least 1000".to_string())
        } else if self.breaker.window_ms < 100 {
            Some("breaker.window_ms must be at least 100".to_string())
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(ConfigError::Conflict(p)))
    }

    /// Checks the hardening keys: tokens long enough to resist guessing, timeouts and
    /// caps that let the proxy work.
    pub fn check_hardening(&self) -> Result<(), ConfigError> {
        let min = crate::hardening::token::MIN_TOKEN_LEN;
        for (key, token) in [("server.client_token", &self.server.client_token), ("admin.token", &self.admin.token)] {
            if token.as_ref().is_some_and(|t| t.expose().trim().len() < min) {
                return Err(ConfigError::Conflict(format!("{key} must be at least {min} characters")));
            }
        }
        let s = &self.server;
        let problem = if s.first_byte_timeout_ms == 0 || s.idle_timeout_ms == 0 || s.keep_alive_interval_ms == 0 {
            Some("server.first_byte_timeout_ms, idle_timeout_ms and keep_alive_interval_ms must be > 0")
        } else if s.max_connections == 0 {
            Some("server.max_connections must be > 0")
        } else if s.max_buffered_bytes < s.max_body_bytes {
            Some("server.max_buffered_bytes must be at least server.max_body_bytes")
        } else if s.allowed_hosts.iter().any(|h| h.is_empty() || h.contains([':', '/', ' ', '@'])) {
            Some("server.allowed_hosts entries are host names without port, like \"proxy.internal\"")
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(ConfigError::Conflict(p.into())))
    }

    /// Checks that apply only when serving: a listener off loopback needs a client
    /// token unless explicitly opted out; the admin listener off loopback needs its token.
    pub fn check_serve(&self) -> Result<(), ConfigError> {
        self.webhooks.check_serve()?;
        self.check_hardening()?;
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(ConfigError::Conflict(format!(
                "admin.listen = \"{}\" is not a loopback address: set admin.token (or KLAVIYO_PROXY_ADMIN_TOKEN) \
                 so admin requests must send `Authorization: Bearer <token>`",
                self.admin.listen
            )));
        }
        let ip = self.server.listen.ip();
        if !ip.is_loopback() && self.server.client_token.is_none() && !self.server.allow_unauthenticated_remote {
            return Err(ConfigError::Conflict(format!(
                "server.listen = \"{}\" is not a loopback address: set server.client_token (or \
                 KLAVIYO_PROXY_CLIENT_TOKEN) so clients must send `Proxy-Authorization: Bearer <token>`, \
                 or set server.allow_unauthenticated_remote = true if the network is trusted",
                self.server.listen
            )));
        }
        Ok(())
    }
}
