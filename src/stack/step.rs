//! The shape of every stage that decides at once: look at the call, change it or
//! refuse it, then pass it on. [`Check`] is the decision; [`StepLayer`] makes it a
//! tower layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::error::ProxyError;

/// A decision taken before the call goes on: the call (possibly changed or turned
/// into the next stage's type), or the error the client gets.
pub trait Check<In> {
    /// What the next stage receives.
    type Out;
    /// Decides.
    fn check(&self, call: In) -> Result<Self::Out, ProxyError>;
}

/// A [`Check`] as a layer.
#[derive(Debug, Clone)]
pub struct StepLayer<C> {
    check: C,
}

impl<C> StepLayer<C> {
    /// The layer for `check`.
    pub fn new(check: C) -> Self {
        StepLayer { check }
    }
}

impl<C: Clone, S> Layer<S> for StepLayer<C> {
    type Service = Step<C, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Step { check: self.check.clone(), inner }
    }
}

/// A [`Check`] in front of `inner`.
#[derive(Debug, Clone)]
pub struct Step<C, S> {
    check: C,
    inner: S,
}

impl<C, S, In> Service<In> for Step<C, S>
where
    C: Check<In>,
    S: Service<C::Out, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = StepFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: In) -> Self::Future {
        match self.check.check(call) {
            Ok(next) => StepFuture::Inner { future: self.inner.call(next) },
            Err(error) => StepFuture::Refused { error: Some(error) },
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future (passed on), or the refusal (refused here).
    #[project = StepProj]
    #[allow(missing_docs)]
    pub enum StepFuture<F> {
        Inner { #[pin] future: F },
        Refused { error: Option<ProxyError> },
    }
}

impl<F, T> Future for StepFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StepProj::Inner { future } => future.poll(cx),
            StepProj::Refused { error } => Poll::Ready(Err(error.take().expect("polled after completion"))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tower::ServiceExt;

    #[derive(Clone)]
    struct Even;

    impl Check<u32> for Even {
        type Out = u32;
        fn check(&self, n: u32) -> Result<u32, ProxyError> {
            if n % 2 == 0 {
                Ok(n / 2)
            } else {
                Err(ProxyError::UnknownPath)
            }
        }
    }

    #[tokio::test]
    async fn passes_the_changed_call_on_or_refuses_without_calling_inner() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |n: u32| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, ProxyError>(n + 100) }
        });
        let svc = StepLayer::new(Even).layer(inner);
        assert_eq!(svc.clone().oneshot(4).await.unwrap(), 102);
        assert!(matches!(svc.oneshot(3).await, Err(ProxyError::UnknownPath)));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
