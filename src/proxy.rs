//! The request path, top to bottom: refuse what is not ours to forward, authorize,
//! route, buffer the body, wait for a token, forward, stream the answer back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::config::{is_beta_revision, AuthMode, Config};
use crate::error::ProxyError;
use crate::limiter::LocalStore;
use crate::queue;
use crate::route::{Route, Router};
use crate::upstream::{self, Upstream, UpstreamError, MAX_WAIT_HEADER};

/// Request id header: passed through when the client sends one, generated otherwise,
/// and returned on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Everything the request path needs, built once from a config.
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    router: Router,
    store: LocalStore,
    upstream: Upstream,
    /// `Klaviyo-API-Key <key>`, marked sensitive, in inject mode.
    injected_auth: Option<HeaderValue>,
    client_token: Option<HeaderValue>,
}

/// Why a proxy could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The TLS client could not be set up.
    #[error(transparent)]
    Tls(#[from] upstream::TlsSetupError),
    /// A key or token cannot be sent as a header.
    #[error("{0} contains characters not allowed in an HTTP header")]
    BadSecret(&'static str),
}

fn sensitive(value: String, what: &'static str) -> Result<HeaderValue, BuildError> {
    let mut v = HeaderValue::from_str(&value).map_err(|_| BuildError::BadSecret(what))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Proxy {
    /// Builds the proxy: routes, buckets and the pooled upstream client.
    pub fn new(config: Config) -> Result<Self, BuildError> {
        let hash_key = match &config.auth.account_hash_key {
            Some(k) => k.expose().as_bytes().to_vec(),
            None => (0..32).map(|_| fastrand::u8(..)).collect(),
        };
        let injected_auth = match (&config.auth.mode, &config.auth.private_key) {
            (AuthMode::Inject, Some(key)) => {
                Some(sensitive(format!("Klaviyo-API-Key {}", key.expose()), "the private key")?)
            }
            _ => None,
        };
        let client_token = match &config.server.client_token {
            Some(t) => Some(sensitive(format!("Bearer {}", t.expose()), "server.client_token")?),
            None => None,
        };
        Ok(Proxy {
            router: Router::new(&config.limits, &hash_key),
            store: LocalStore::new(),
            upstream: Upstream::new(&config.upstream)?,
            injected_auth,
            client_token,
            config,
        })
    }

    /// The bucket store (for the sweeper and tests).
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The config this proxy runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves one client request; never fails at the HTTP level.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let request_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .filter(|v| v.len() <= 128)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..)));
        let method = req.method().clone();
        let mut outcome = Outcome::default();
        let mut resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(err) => {
                outcome.error = Some(err.code());
                err.into_response(&request_id)
            }
        };
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        tracing::info!(
            request_id = %request_id,
            %method,
            operation = outcome.operation,
            status = resp.status().as_u16(),
            outcome = outcome.error.unwrap_or("forwarded"),
            queue_wait_ms = outcome.waited.as_millis() as u64,
            upstream_ms = outcome.upstream.map(|d| d.as_millis() as u64),
            total_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        Ok(resp)
    }

    async fn forward(&self, req: Request<Incoming>, outcome: &mut Outcome) -> Result<Response<ProxyBody>, ProxyError> {
        // Never an open relay: only our upstream, only Klaviyo's API paths.
        self.check_target(&req)?;
        // Off loopback, clients prove they may use the proxy.
        self.check_client_token(req.headers())?;
        let (mut parts, body) = req.into_parts();
        // The credential that goes upstream decides whose quota is spent.
        self.authorize(&mut parts.headers)?;
        let route = self.route(&parts);
        outcome.operation = route.label();
        let deadline = self.deadline(&parts.headers);
        // Buffered so the client's upload time never holds a token, and bounded.
        let body = self.read_body(body).await?;
        upstream::outbound_headers(&mut parts.headers, self.config.upstream.revision.as_str());
        // The limiter: wait for a token in every bucket, or be refused at once.
        if self.config.limits.enabled {
            let depth = self.config.queue.max_depth;
            outcome.waited = queue::wait_for_slot(&self.store, &route.demands, deadline, depth, route.label()).await?;
        }
        let sent = Instant::now();
        let resp = self.upstream.send(&parts, body).await.map_err(|e| {
            tracing::warn!(operation = route.label(), error = %e, "upstream request failed");
            match e {
                UpstreamError::Connect(_) => ProxyError::UpstreamUnreachable,
                UpstreamError::Timeout(d) => ProxyError::UpstreamTimeout(d),
            }
        })?;
        outcome.upstream = Some(sent.elapsed());
        let (mut parts, body) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }

    fn check_target(&self, req: &Request<Incoming>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // HTTP/2's :authority names the proxy itself (it is HTTP/1's Host), so only an
        // HTTP/1 absolute-form target can ask for another host.
        if req.version() < http::Version::HTTP_2 && !self.upstream.is_upstream(req.uri()) {
            return Err(ProxyError::ForeignHost);
        }
        let path = req.uri().path();
        if !(path.starts_with("/api/") || path == "/api" || path.starts_with("/client/")) || path.contains("/../") {
            return Err(ProxyError::UnknownPath);
        }
        Ok(())
    }

    fn check_client_token(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match &self.client_token {
            None => Ok(()),
            Some(token) => {
                let given = headers.get(header::PROXY_AUTHORIZATION).map(HeaderValue::as_bytes).unwrap_or_default();
                if constant_time_eq(given, token.as_bytes()) {
                    Ok(())
                } else {
                    Err(ProxyError::ProxyAuthRequired)
                }
            }
        }
    }

    fn authorize(&self, headers: &mut HeaderMap) -> Result<(), ProxyError> {
        let Some(ours) = &self.injected_auth else { return Ok(()) };
        if headers.contains_key(header::AUTHORIZATION) {
            if !self.config.auth.allow_client_keys {
                return Err(ProxyError::ClientKeyForbidden);
            }
        } else {
            headers.insert(header::AUTHORIZATION, ours.clone());
        }
        Ok(())
    }

    fn route(&self, parts: &request::Parts) -> Route {
        let revision = parts.headers.get("revision").and_then(|v| v.to_str().ok());
        let beta = is_beta_revision(revision.unwrap_or(self.config.upstream.revision.as_str()));
        let credential = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        self.router.route(parts.method.as_str(), parts.uri.path(), parts.uri.query(), beta, credential)
    }

    fn deadline(&self, headers: &HeaderMap) -> Instant {
        let configured = self.config.queue.max_wait_ms;
        let asked =
            headers.get(MAX_WAIT_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        Instant::now() + Duration::from_millis(asked.map_or(configured, |a| a.min(configured)))
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, ProxyError> {
        let limit = self.config.server.max_body_bytes;
        let timeout = self.config.client_read_timeout();
        match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
            Err(_) => Err(ProxyError::ClientTimeout(timeout)),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
            Ok(Err(_)) => Err(ProxyError::BodyRead),
        }
    }
}

/// What happened to a request, for its log line.
#[derive(Debug, Default)]
struct Outcome {
    operation: &'static str,
    error: Option<&'static str>,
    waited: Duration,
    upstream: Option<Duration>,
}

/// Compares secrets without leaking their common prefix length through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
