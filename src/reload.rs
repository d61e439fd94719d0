//! Hot reload: read the config again (on SIGHUP or `POST /admin/reload`), and swap it
//! in only if it is valid; otherwise log why and keep the running one.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::proxy::Proxy;

/// Produces the config to reload: reads the file again and applies env and flags.
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Applies a new log filter (the binary's tracing reload handle).
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where a reload gets its config and how it changes the log level.
#[derive(Clone)]
pub struct Reloader {
    source: ConfigSource,
    log_level: Option<LogLevelHook>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// A reloader reading configs from `source`.
    pub fn new(source: ConfigSource) -> Self {
        Reloader { source, log_level: None }
    }

    /// Also applies `log.level` through `hook`.
    pub fn with_log_level(mut self, hook: LogLevelHook) -> Self {
        self.log_level = Some(hook);
        self
    }

    /// Reloads: the new config is loaded and checked as at start-up; when anything is
    /// wrong the proxy keeps its running config and the error is returned (and logged).
    pub fn reload(&self, proxy: &Proxy) -> Result<(), String> {
        let result = self.try_reload(proxy);
        proxy.metrics().config_reload(result.is_ok());
        match result {
            Ok(level) => {
                // Logged before the new level applies, so a quieter level still shows it.
                tracing::info!(log_level = %level, "config reloaded");
                match &self.log_level {
                    Some(hook) => hook(&level),
                    None => Ok(()),
                }
            }
            Err(error) => {
                tracing::error!(%error, "config reload rejected; keeping the running config");
                Err(error)
            }
        }
    }

    fn try_reload(&self, proxy: &Proxy) -> Result<String, String> {
        let new = (self.source)().map_err(|e| e.to_string())?;
        new.check_serve().map_err(|e| e.to_string())?;
        let level = new.log.level.clone();
        // Check the filter before swapping anything, so a bad level rejects the whole file.
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            return Err(format!("log.level `{level}`: {e}"));
        }
        proxy.reload(new).map_err(|e| e.to_string())?;
        Ok(level)
    }
}
