//! The request path as one tower stack. [`build`] composes it, top to bottom as a
//! request goes; each stage is a module named after its concern. Everything before the
//! exchange is a layer; the exchange (queue ⇄ limiter ⇄ breaker ⇄ upstream, retries,
//! pauses) is one service, since its parts cooperate too tightly to be separate.
//!
//! What the stages learn about a request travels with it in a small typed context:
//! [`Call`] (the request, the config view it keeps to the end, its log record) and,
//! once routed, [`Routed`] (the route, the deadline and the repeat rule).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{request, Request, Response};
use tower::{Service, ServiceBuilder};

use crate::body::ProxyBody;
use crate::checklist::Observation;
use crate::limiter::Account;
use crate::metrics::RequestOutcome;
use crate::proxy::{Live, Proxy};
use crate::retry::Repeat;
use crate::route::Route;
use crate::upstream::Upstream;

pub mod authorize;
pub mod body;
pub mod cleanup;
pub mod client_token;
pub mod coalesce;
pub mod defer;
pub mod exchange;
pub mod idempotency;
pub mod observe;
pub mod outbound;
pub mod resolve;
pub mod respond;
pub mod route;
pub mod step;
pub mod target;

/// The whole request path for `proxy`, as a service hyper can serve (through
/// `hyper_util::service::TowerToHyperService`), sending through `upstream` (the pool of
/// the runtime that serves it). It never fails at the HTTP level.
pub fn build<B>(
    proxy: &Arc<Proxy>,
    upstream: Upstream,
) -> impl Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible, Future = impl Future + Send>
       + Clone
       + Send
       + Sync
       + 'static
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    ServiceBuilder::new()
        // Every request gets an answer, an id, a count and one log line; a refusal
        // anywhere below becomes a JSON:API error marked as the proxy's own.
        .layer(respond::RespondLayer::new(proxy.clone()))
        // Never an open relay: only our upstream, only Klaviyo's API paths, no tunnels.
        .layer(step::StepLayer::new(target::Target::new(proxy.clone())))
        // Off loopback, clients prove they may use the proxy before anything else.
        .layer(step::StepLayer::new(client_token::ClientToken))
        // The credential that goes upstream decides whose quota is spent: inject ours.
        .layer(step::StepLayer::new(authorize::Authorize))
        // Buckets belong to Klaviyo accounts: learn the one behind the credential (once).
        .layer(resolve::ResolveLayer::new(proxy.clone()))
        // Operation, account and buckets, and how long the client is willing to wait.
        .layer(step::StepLayer::new(route::RouteStep))
        // The production checklist counts what traffic shows; opt-in scopes refuse.
        .layer(observe::ObserveLayer::new(proxy.clone()))
        // Buffered so the client's upload time never holds a token, and bounded.
        .layer(body::BufferLayer)
        // Events without a unique_id, phone numbers not E.164 (off the request).
        .layer(step::StepLayer::new(observe::InspectBody))
        // Only what Klaviyo should see leaves: no hop-by-hop or proxy-only headers.
        .layer(step::StepLayer::new(outbound::Outbound))
        // Single events become bulk jobs: stored durably, answered 202 as Klaviyo does.
        .layer(coalesce::CoalesceLayer::new(proxy.clone()))
        // Events get a unique_id, so Klaviyo deduplicates any repeat or replay.
        .layer(step::StepLayer::new(idempotency::Idempotency))
        // Kill switch, breaker fail-fast, and deferrable writes accepted for later.
        .layer(defer::DeferLayer::new(proxy.clone()))
        // The client gets Klaviyo's answer without its hop-by-hop headers.
        .map_response(cleanup::clean::<hyper::body::Incoming>)
        // Token, breaker, upstream; again after a 429 pause or a safe retry.
        .service(exchange::Exchange::new(proxy.clone(), upstream))
}

/// The proxy behind a handle of one runtime's own. Each serving thread builds its
/// stack once, so the stages' per-request clones of this touch a count only that
/// thread writes; a clone of the `Arc<Proxy>` itself writes a count every serving
/// thread shares, whose cache line then moves between cores at every request.
#[derive(Debug, Clone)]
#[allow(clippy::redundant_allocation, reason = "the outer count is the point: one per runtime")]
pub struct Here(Arc<Arc<Proxy>>);

impl Here {
    /// A handle on `proxy` for the stack being built.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Here(Arc::new(proxy))
    }
}

impl std::ops::Deref for Here {
    type Target = Proxy;

    fn deref(&self) -> &Proxy {
        &self.0
    }
}

/// A boxed future, for the stages that wait.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project_lite::pin_project! {
    /// A stage's future when it usually just passes the call on: the inner service's
    /// future as it is (no box, no copy into one), or the stage's own boxed work.
    #[project = EitherProj]
    #[allow(missing_docs)]
    pub enum Either<F, T> {
        Inner { #[pin] future: F },
        Own { future: BoxFuture<T> },
    }
}

impl<F: Future<Output = T>, T> Future for Either<F, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match self.project() {
            EitherProj::Inner { future } => future.poll(cx),
            EitherProj::Own { future } => future.as_mut().poll(cx),
        }
    }
}

/// A request on its way down the stack, before routing.
#[derive(Debug)]
pub struct Call<B> {
    /// The request head.
    pub parts: request::Parts,
    /// The request body: streaming until the buffer stage, `Bytes` after it.
    pub body: B,
    /// One view of the config for the whole request, even if a reload lands meanwhile.
    pub live: Arc<Live>,
    /// What happened, for the log line and the request metric.
    pub record: Record,
    /// The account the credential that goes upstream belongs to, once the resolve
    /// stage knows it (`None`: the credential keeps its own buckets).
    pub resolved: Option<Account>,
}

impl<B> Call<B> {
    /// A call for a request head and body under `live`, nothing learnt yet.
    pub fn new(parts: request::Parts, body: B, live: Arc<Live>) -> Self {
        Call { parts, body, live, record: Record::default(), resolved: None }
    }

    /// The same call with `body` in place of its own, which comes back beside it.
    pub fn swap_body<C>(self, body: C) -> (Call<C>, B) {
        let Call { parts, body: old, live, record, resolved } = self;
        (Call { parts, body, live, record, resolved }, old)
    }
}

/// A routed request: what the limiter, the spool and the retries need to know.
#[derive(Debug)]
pub struct Routed<B> {
    /// The request.
    pub call: Call<B>,
    /// Operation, account and buckets.
    pub route: Route,
    /// When the client stops waiting for its turn.
    pub deadline: tokio::time::Instant,
    /// Whether sending the request again is safe (refined once the body is known).
    pub repeat: Repeat,
    /// The event's `unique_id`, when it has one.
    pub unique_id: Option<String>,
    /// The checklist's view of the request head, until the body stage has shown it the
    /// body (then `None`).
    pub observed: Option<Observation>,
}

impl<B> Routed<B> {
    /// The same request with `body` in place of its own, which comes back beside it.
    pub fn swap_body<C>(self, body: C) -> (Routed<C>, B) {
        let Routed { call, route, deadline, repeat, unique_id, observed } = self;
        let (call, old) = call.swap_body(body);
        (Routed { call, route, deadline, repeat, unique_id, observed }, old)
    }
}

/// What happened to a request, for its log line and the request metric.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The operation id, `unknown` until routed.
    pub operation: &'static str,
    /// The tier, `unknown` until routed.
    pub tier: &'static str,
    /// Whose quota, once routed (the log names it by Klaviyo id, name or alias).
    pub account: crate::limiter::Account,
    /// How the request ended.
    pub kind: RequestOutcome,
    /// Times the request was sent upstream (retries add to it).
    pub attempts: u32,
    /// The proxy's error code, when it answered itself.
    pub error: Option<&'static str>,
    /// Time spent queued for tokens.
    pub waited: Duration,
    /// The last upstream attempt's latency.
    pub upstream: Option<Duration>,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            operation: "unknown",
            tier: "unknown",
            account: crate::limiter::Account::ANONYMOUS,
            kind: RequestOutcome::Forwarded,
            attempts: 0,
            error: None,
            waited: Duration::ZERO,
            upstream: None,
        }
    }
}

/// A request's [`Outcome`], written by the stages that learn something and read once
/// by the outermost stage when it logs; shared because the stages below own the call.
#[derive(Debug, Clone, Default)]
pub struct Record(Arc<Mutex<Outcome>>);

impl Record {
    /// Changes the outcome.
    pub fn update<R>(&self, f: impl FnOnce(&mut Outcome) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The outcome so far.
    pub fn get(&self) -> Outcome {
        self.update(|o| o.clone())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A proxy and calls for the stages' unit tests.

    use super::*;
    use crate::config::Config;

    /// The private key an inject-mode test config gets.
    pub const INJECTED_KEY: &str = "pk_injected_0123456789";

    /// A proxy built from a config text (no listener, nothing contacted).
    pub fn proxy(config: &str) -> Arc<Proxy> {
        let mut config = Config::parse(config, "test").expect("test config");
        if config.auth.mode == crate::config::AuthMode::Inject {
            config.auth.private_key = Some(crate::config::Secret::new(INJECTED_KEY));
        }
        Arc::new(Proxy::new(config).expect("test proxy"))
    }

    /// A call for `req` under `proxy`'s config.
    pub fn call<B>(proxy: &Proxy, req: Request<B>) -> Call<B> {
        let (parts, body) = req.into_parts();
        Call::new(parts, body, proxy.live())
    }

    /// A routed call for `req` under `proxy`'s config.
    pub fn routed<B>(proxy: &Proxy, req: Request<B>) -> Routed<B> {
        use super::step::Check;
        route::RouteStep.check(call(proxy, req)).expect("routes")
    }
}
