//! Configuration: TOML read into serde structs whose field types check themselves
//! (non-zero limits, addresses, URLs), so every error carries the key path and line;
//! then environment overrides and the checks that span several keys.
//!
//! - [`values`]: the value types that check themselves (URLs, revisions, secrets).
//! - [`sections`]: one struct per table (`[server]`, `[limits]`, …) with its defaults.
//! - `env`: the `KLAVIYO_PROXY_*` overrides and the key for inject mode.
//! - `checks`: the checks that span several keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod checks;
mod env;
pub mod sections;
pub mod values;

pub use sections::*;
pub use values::*;

/// The annotated default config, embedded so `serve` works with no file.
pub const DEFAULT_TOML: &str = include_str!("../../config/klaviyo-proxy.toml");

/// The current stable revision of Klaviyo's API (the catalog's spec version).
pub const DEFAULT_REVISION: &str = "2026-07-15";

/// A bad config: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a bad value or does not exist.
    #[error("{origin}{line}: `{key}`: {message}")]
    Invalid {
        /// File name (or "embedded default").
        origin: String,
        /// ` line N` when known.
        line: String,
        /// Key path, e.g. `limits.default.burst_per_second`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An environment variable has a bad value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// Variable name.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// Keys that are each fine but do not work together.
    #[error("config: {0}")]
    Conflict(String),
    /// The file (or a file it names) cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The client-facing listener.
    pub server: ServerConfig,
    /// Where requests go.
    pub upstream: UpstreamConfig,
    /// Credentials.
    pub auth: AuthConfig,
    /// Rate limits.
    pub limits: LimitsConfig,
    /// Waiting for a token.
    pub queue: QueueConfig,
    /// Repeating failed requests.
    pub retry: RetryConfig,
    /// The upstream circuit breaker.
    pub breaker: BreakerConfig,
    /// Durable accept-and-forward of deferrable writes.
    pub spool: SpoolConfig,
    /// Logging.
    pub log: LogConfig,
    /// The admin listener: metrics, health, readiness, reload.
    pub admin: AdminConfig,
    /// The `preflight` command.
    pub preflight: PreflightConfig,
    /// Where buckets live: this process, or Redis shared by every replica.
    pub limiter: LimiterConfig,
    /// Which Klaviyo account each credential belongs to.
    pub accounts: AccountsConfig,
    /// The inbound webhook gate (off by default).
    pub webhooks: crate::webhooks::WebhooksConfig,
    /// Coalescing single events into bulk jobs.
    pub coalesce: CoalesceConfig,
    /// The checklist's opt-in checks on request bodies.
    pub checks: ChecksConfig,
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

impl Config {
    /// Parses a config text. `origin` names it in errors.
    pub fn parse(src: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(src);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Invalid {
                origin: origin.to_string(),
                line: inner.span().map(|s| format!(" line {}", line_of(src, s.start))).unwrap_or_default(),
                key: if key == "." { "(top level)".into() } else { key },
                message: inner.message().to_string(),
            }
        })
    }

    /// Reads a config file, or the embedded default when `path` is `None`, then
    /// applies environment overrides and checks the result.
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Io { path: p.into(), source })?;
                Config::parse(&text, &p.display().to_string())?
            }
            None => Config::parse(DEFAULT_TOML, "embedded default")?,
        };
        config.apply_env(env)?;
        config.resolve_key(env)?;
        config.check_resilience()?;
        config.check_limiter()?;
        config.webhooks.resolve(env)?;
        config.check_hardening()?;
        config.check_coalesce()?;
        Ok(config)
    }

    /// The config as TOML with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    /// Duration helpers.
    pub fn client_read_timeout(&self) -> Duration {
        Duration::from_millis(self.server.client_read_timeout_ms)
    }
}

#[cfg(test)]
mod tests;
