//! Whose quota a request spends: the Klaviyo account behind its credential (looked up
//! once per credential and cached, see [`crate::account`]), for the route stage.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{BoxFuture, Call};
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
    type Future = Resolving<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call<B>) -> Self::Future {
        // Declared, cached or not resolved at all: no lookup to wait for.
        if let Ok(resolved) = self.proxy.resolve_now(&call.live, &mut call.parts) {
            call.resolved = resolved;
            return Resolving::Inner { future: self.inner.call(call) };
        }
        let proxy = self.proxy.clone();
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        // Boxed apart, and the box gives the call back: the lookup (an upstream
        // request) is kilobytes that would otherwise stay allocated, unused, for as long
        // as the request then queues, and so would a box around the stages below.
        let lookup = Box::pin(async move {
            let live = call.live.clone();
            call.resolved = proxy.resolve(&live, &mut call.parts).await;
            call
        });
        Resolving::Lookup { lookup, inner: Some(inner) }
    }
}

pin_project_lite::pin_project! {
    /// [`Resolve`]'s future: the lookup, then the stages below (inline, no box).
    #[project = ResolvingProj]
    #[allow(missing_docs)]
    pub enum Resolving<S: Service<Call<B>>, B> {
        Lookup { lookup: BoxFuture<Call<B>>, inner: Option<S> },
        Inner { #[pin] future: S::Future },
    }
}

impl<S: Service<Call<B>>, B> Future for Resolving<S, B> {
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let future = match self.as_mut().project() {
                ResolvingProj::Inner { future } => return future.poll(cx),
                ResolvingProj::Lookup { lookup, inner } => {
                    let call = std::task::ready!(lookup.as_mut().poll(cx));
                    inner.take().expect("polled after completion").call(call)
                }
            };
            self.set(Resolving::Inner { future });
        }
    }
}
