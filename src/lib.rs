//! klaviyo-proxy: a local HTTP proxy that keeps Klaviyo API traffic under every
//! endpoint's rate limits, queueing instead of failing.
//!
//! [`App::build`] makes a proxy from a [`config::Config`]; [`App::serve`] runs it on a
//! listener. The request path is composed in [`stack`] over the shared state in
//! [`proxy`]; the simulator in [`sim`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod account;
pub mod admin;
pub mod body;
pub mod breaker;
pub mod catalog;
pub mod checklist;
pub mod coalesce;
pub mod config;
pub mod credential;
pub mod error;
pub mod hardening;
pub mod header;
pub mod limiter;
pub mod metrics;
pub mod preflight;
pub mod proxy;
pub mod queue;
pub mod reload;
pub mod retry;
pub mod route;
pub mod server;
pub mod sim;
pub mod spool;
pub mod stack;
pub mod upstream;
pub mod webhooks;
pub mod workers;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use admin::Admin;
use config::Config;
use proxy::{BuildError, Proxy};
use reload::Reloader;
use server::ConnLimits;

/// Time between the proxy answering what is left at shutdown and cutting connections.
const DRAIN_MARGIN: Duration = Duration::from_millis(500);

/// How often idle buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Connection limits of both listeners from `[server]`.
fn conn_limits(config: &Config) -> ConnLimits {
    let s = &config.server;
    ConnLimits {
        max_header_bytes: s.max_header_bytes,
        header_read_timeout: config.client_read_timeout(),
        drain_timeout: Duration::from_millis(s.drain_timeout_ms),
        first_byte_timeout: Duration::from_millis(s.first_byte_timeout_ms),
        idle_timeout: Duration::from_millis(s.idle_timeout_ms),
        keep_alive_interval: Duration::from_millis(s.keep_alive_interval_ms),
        max_connections: s.max_connections,
        cap: None,
        handshake_delay: Duration::ZERO,
    }
}

/// A proxy ready to serve.
#[derive(Debug, Clone)]
pub struct App {
    proxy: Arc<Proxy>,
    ready: Arc<AtomicBool>,
    reloader: Option<Reloader>,
    /// The inbound webhook gate, when `webhooks.enabled`.
    webhooks: Option<Arc<webhooks::Gate>>,
}

impl App {
    /// Builds the proxy from a checked config.
    pub fn build(config: Config) -> Result<App, BuildError> {
        let webhooks_config = config.webhooks.clone();
        let proxy = Arc::new(Proxy::new(config)?);
        let webhooks = if webhooks_config.enabled {
            Some(webhooks::Gate::new(&webhooks_config, proxy.metrics().clone())?)
        } else {
            None
        };
        Ok(App { proxy, ready: Arc::new(AtomicBool::new(false)), reloader: None, webhooks })
    }

    /// Lets `POST /admin/reload` (and [`App::reload`]) read a new config from `reloader`.
    pub fn with_reloader(mut self, reloader: Reloader) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// Reloads the config (SIGHUP); an invalid one is refused and the running one kept.
    pub fn reload(&self) -> Result<(), String> {
        match &self.reloader {
            Some(r) => r.reload(&self.proxy),
            None => Err("this proxy was started without a config source".into()),
        }
    }

    /// The admin endpoints of this app (for tests and for serving them elsewhere).
    pub fn admin(&self) -> Arc<Admin> {
        Arc::new(
            Admin::new(self.proxy.clone(), self.ready.clone(), self.reloader.clone())
                .with_webhooks(self.webhooks.clone()),
        )
    }

    /// The webhook gate, when enabled (its address, store and health).
    pub fn webhooks(&self) -> Option<&Arc<webhooks::Gate>> {
        self.webhooks.as_ref()
    }

    /// The request path (for tests and benches).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves clients on `listener` until `shutdown` completes, then drains.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.serve_with_admin(listener, None, shutdown).await
    }

    /// Serves clients on `listener` and the admin endpoints on `admin` until `shutdown`
    /// completes. `/ready` is true from here until the drain starts; the admin listener
    /// keeps answering through the drain.
    pub async fn serve_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) {
        self.serve_threads(listener, Vec::new(), admin, shutdown).await
    }

    /// [`App::serve_with_admin`] on `listener` here and on each of `others` in a
    /// serving thread of its own (see [`workers`]); all stop and drain together.
    pub async fn serve_threads(
        self,
        listener: TcpListener,
        others: Vec<std::net::TcpListener>,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) {
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = admin.map(|admin_listener| {
            let admin = self.admin();
            let service = hyper::service::service_fn(move |req| admin.clone().handle(req));
            let limits = ConnLimits { drain_timeout: Duration::from_secs(1), ..conn_limits(&self.proxy.config()) };
            tokio::spawn(server::serve(admin_listener, None, limits, service, async {
                let _ = admin_stopped.await;
            }))
        });
        // The gate answers Klaviyo on its own listener until the proxy has drained.
        let (gate_stop, gate_stopped) = tokio::sync::oneshot::channel::<()>();
        let gate_task = self.webhooks.clone().map(|gate| {
            tokio::spawn(gate.serve(async {
                let _ = gate_stopped.await;
            }))
        });
        let ready = self.ready.clone();
        ready.store(true, Ordering::SeqCst);
        let shutdown = async move {
            shutdown.await;
            // Orchestrators stop sending new work while open requests drain.
            ready.store(false, Ordering::SeqCst);
        };
        let config = self.proxy.config();
        let drain = Duration::from_millis(config.server.drain_timeout_ms);
        // The proxy answers what is left a little before the connections are cut.
        let limits = ConnLimits { drain_timeout: drain + DRAIN_MARGIN, ..conn_limits(&config) };
        // Every serving thread counts against one cap: clients see one listener.
        let limits = ConnLimits { cap: Some(hardening::conn::ConnCap::new(limits.max_connections)), ..limits };
        // Spooled writes go out in the background once Klaviyo is healthy.
        let replayer = tokio::spawn(self.proxy.clone().replay());
        // Inject mode: learn the one key's account now, not on the first request.
        let resolving = {
            let proxy = self.proxy.clone();
            tokio::spawn(async move { proxy.resolve_injected().await })
        };
        // Coalesced events go out as bulk jobs.
        let batcher = self.proxy.coalescer().map(|c| tokio::spawn(c.clone().run(self.proxy.clone())));
        // At shutdown: stop accepting, finish what is in flight and queued until the
        // drain time is up, then spool deferrable writes and answer the rest 503.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let threads = workers::spawn(others, &self.proxy, limits.clone(), stopped);
        let shutdown = {
            let proxy = self.proxy.clone();
            async move {
                shutdown.await;
                tracing::info!(drain_ms = drain.as_millis() as u64, "draining");
                proxy.begin_drain(tokio::time::Instant::now() + drain);
                if let Some(c) = proxy.coalescer() {
                    c.begin_drain();
                }
                stop.send_replace(true);
            }
        };
        let sweeper = {
            let proxy = self.proxy.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                loop {
                    every.tick().await;
                    proxy.limiter().sweep(tokio::time::Instant::now());
                    proxy.ramps.sweep();
                }
            })
        };
        // The shared store's heartbeat: replica count, and the way back from degraded.
        let background = {
            let proxy = self.proxy.clone();
            tokio::spawn(async move { proxy.limiter().run_background().await })
        };
        let service =
            hyper_util::service::TowerToHyperService::new(stack::build(&self.proxy, self.proxy.upstream().clone()));
        server::serve(listener, None, limits, service, shutdown).await;
        workers::join(threads).await;
        sweeper.abort();
        replayer.abort();
        resolving.abort();
        if let Some(batcher) = batcher {
            // Jobs not sent stay in the coalescer's file for the next start.
            batcher.abort();
        }
        let _ = admin_stop.send(());
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        let _ = gate_stop.send(());
        if let Some(task) = gate_task {
            let _ = task.await;
        }
        background.abort();
        // Drained: nothing else leaves, so the snapshot can say so.
        self.proxy.limiter().save_at_shutdown();
    }
}
