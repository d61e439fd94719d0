//! The `KLAVIYO_PROXY_*` environment overrides and the private key for inject mode.

use super::*;

impl Config {
    /// Applies `KLAVIYO_PROXY_*` overrides for the common keys.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: TryFrom<String, Error = String>>(var: &str, v: String) -> Result<T, ConfigError> {
            T::try_from(v).map_err(|message| ConfigError::Env { var: var.into(), message })
        }
        fn from_str<T: std::str::FromStr>(var: &str, v: &str, what: &str) -> Result<T, ConfigError> {
            v.parse().map_err(|_| ConfigError::Env { var: var.into(), message: format!("`{v}` is not {what}") })
        }
        /// One of a few named values; the error lists them all.
        fn choice<T: Copy>(var: &str, v: &str, names: &[(&str, T)]) -> Result<T, ConfigError> {
            names.iter().find(|(name, _)| *name == v).map(|&(_, value)| value).ok_or_else(|| {
                let all: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
                ConfigError::Env { var: var.into(), message: format!("`{v}` is not {}", all.join(" or ")) }
            })
        }
        if let Some(v) = env("KLAVIYO_PROXY_LISTEN") {
            self.server.listen = from_str("KLAVIYO_PROXY_LISTEN", &v, "an address like 127.0.0.1:8080")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_UPSTREAM") {
            self.upstream.url = parse("KLAVIYO_PROXY_UPSTREAM", v)?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_REVISION") {
            self.upstream.revision = parse("KLAVIYO_PROXY_REVISION", v)?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_CA_FILE") {
            self.upstream.ca_file = Some(v.into());
        }
        if let Some(v) = env("KLAVIYO_PROXY_AUTH_MODE") {
            self.auth.mode = choice(
                "KLAVIYO_PROXY_AUTH_MODE",
                &v,
                &[("pass-through", AuthMode::PassThrough), ("inject", AuthMode::Inject)],
            )?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_CLIENT_TOKEN") {
            self.server.client_token = Some(Secret::new(v));
        }
        if let Some(v) = env("KLAVIYO_PROXY_LIMITS_ENABLED") {
            self.limits.enabled = from_str("KLAVIYO_PROXY_LIMITS_ENABLED", &v, "true or false")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_SHARE") {
            let f: f64 = from_str("KLAVIYO_PROXY_SHARE", &v, "a number")?;
            self.limits.share = Share::try_from(f)
                .map_err(|message| ConfigError::Env { var: "KLAVIYO_PROXY_SHARE".into(), message })?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_ADMIN_LISTEN") {
            self.admin.listen = from_str("KLAVIYO_PROXY_ADMIN_LISTEN", &v, "an address like 127.0.0.1:9090")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_SPOOL_PATH") {
            self.spool.path = Some(v.into());
        }
        if let Some(v) = env("KLAVIYO_ENABLED") {
            self.upstream.enabled = from_str("KLAVIYO_ENABLED", &v, "true or false")?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_LIMITER_STORE") {
            self.limiter.store =
                choice("KLAVIYO_PROXY_LIMITER_STORE", &v, &[("local", StoreKind::Local), ("redis", StoreKind::Redis)])?;
        }
        if let Some(v) = env("KLAVIYO_PROXY_REDIS_URL") {
            self.limiter.redis_url = Some(parse("KLAVIYO_PROXY_REDIS_URL", v)?);
        }
        if let Some(v) = env("KLAVIYO_PROXY_ACCOUNT_HASH_KEY") {
            self.auth.account_hash_key = Some(Secret::new(v));
        }
        if let Some(v) = env("KLAVIYO_PROXY_ALLOWED_HOSTS") {
            self.server.allowed_hosts =
                v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect();
        }
        if let Some(v) = env("KLAVIYO_PROXY_ADMIN_TOKEN") {
            self.admin.token = Some(Secret::new(v));
        }
        if let Some(v) = env("KLAVIYO_PROXY_LOG_LEVEL") {
            self.log.level = v;
        }
        if let Some(v) = env("KLAVIYO_PROXY_LOG_FORMAT") {
            self.log.format =
                choice("KLAVIYO_PROXY_LOG_FORMAT", &v, &[("human", LogFormat::Human), ("json", LogFormat::Json)])?;
        }
        Ok(())
    }

    /// Finds the private key for inject mode: `KLAVIYO_PRIVATE_KEY`, else `auth.key_file`.
    pub(super) fn resolve_key(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(key) = env("KLAVIYO_PRIVATE_KEY").filter(|k| !k.trim().is_empty()) {
            self.auth.private_key = Some(Secret::new(key.trim().to_string()));
        } else if let Some(path) = &self.auth.key_file {
            let key = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.clone(), source })?;
            self.auth.private_key = Some(Secret::new(key.trim().to_string()));
        }
        if self.auth.mode == AuthMode::Inject && self.auth.private_key.is_none() {
            return Err(ConfigError::Conflict(
                "auth.mode = \"inject\" needs a key: set KLAVIYO_PRIVATE_KEY or auth.key_file".into(),
            ));
        }
        Ok(())
    }
}
