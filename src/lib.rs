//! klaviyo-proxy: a local HTTP proxy that keeps Klaviyo API traffic under every
//! endpoint's rate limits, queueing instead of failing.
//!
//! [`App::build`] makes a proxy from a [`config::Config`]; [`App::serve`] runs it on a
//! listener. The request path is in [`proxy`]; the simulator in [`sim`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod body;
pub mod catalog;
pub mod config;
pub mod error;
pub mod limiter;
pub mod proxy;
pub mod queue;
pub mod route;
pub mod server;
pub mod sim;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use config::Config;
use proxy::{BuildError, Proxy};
use server::ConnLimits;

/// How often idle buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// A proxy ready to serve.
#[derive(Debug, Clone)]
pub struct App {
    proxy: Arc<Proxy>,
}

impl App {
    /// Builds the proxy from a checked config.
    pub fn build(config: Config) -> Result<App, BuildError> {
        Ok(App { proxy: Arc::new(Proxy::new(config)?) })
    }

    /// The request path (for tests and benches).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves clients on `listener` until `shutdown` completes, then drains.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let config = self.proxy.config();
        let limits = ConnLimits {
            max_header_bytes: config.server.max_header_bytes,
            header_read_timeout: config.client_read_timeout(),
            drain_timeout: Duration::from_secs(30),
        };
        let sweeper = {
            let proxy = self.proxy.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                loop {
                    every.tick().await;
                    proxy.limiter().sweep(tokio::time::Instant::now());
                }
            })
        };
        // The shared store's heartbeat: replica count, and the way back from degraded.
        let background = {
            let proxy = self.proxy.clone();
            tokio::spawn(async move { proxy.limiter().run_background().await })
        };
        let proxy = self.proxy.clone();
        let service = hyper::service::service_fn(move |req| proxy.clone().handle(req));
        server::serve(listener, None, limits, service, shutdown).await;
        sweeper.abort();
        background.abort();
    }
}
