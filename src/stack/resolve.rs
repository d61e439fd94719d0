//! Whose quota a request spends: the Klaviyo account behind its credential (looked up
//! once per credential and cached, see [`crate::account`]), for the route stage.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{Call, Either};
use crate::proxy::Proxy;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ResolveLayer {
    proxy: Arc<Proxy>,
}

impl ResolveLayer {
    /// The layer, resolving with `proxy`'s account cache.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        ResolveLayer { proxy }
    }
}

impl<S> Layer<S> for ResolveLayer {
    type Service = Resolve<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Resolve { proxy: self.proxy.clone(), inner }
    }
}

/// See [`ResolveLayer`].
#[derive(Debug, Clone)]
pub struct Resolve<S> {
    proxy: Arc<Proxy>,
    inner: S,
}

impl<S, B> Service<Call<B>> for Resolve<S>
where
    S: Service<Call<B>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call<B>) -> Self::Future {
        // Declared, cached or not resolved at all: no lookup to wait for.
        if self.proxy.resolve_now(&call.live, &mut call.parts) {
            return Either::Inner { future: self.inner.call(call) };
        }
        let proxy = self.proxy.clone();
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Either::Own {
            future: Box::pin(async move {
                let live = call.live.clone();
                // Boxed apart: the lookup (an upstream request) is kilobytes that would
                // stay allocated, unused, for as long as the request then queues.
                Box::pin(proxy.resolve(&live, &mut call.parts)).await;
                inner.call(call).await
            }),
        }
    }
}
