//! The connection to Klaviyo: a pooled hyper client over rustls (ring, webpki roots
//! plus an optional extra CA), HTTP/1.1 and HTTP/2 by ALPN, and the header rules.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls_pki_types::{pem::PemObject, CertificateDer};

use crate::config::UpstreamConfig;

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The extra CA file is unreadable or holds no certificate.
    #[error("upstream.ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

pub mod pool;

pub use pool::Lease;
use pool::{Pool, Sender, Taken};

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting, TLS or the exchange failed.
    #[error("upstream connection failed")]
    Connect(#[source] Failure),
    /// No response head within the request timeout.
    #[error("upstream timed out")]
    Timeout(Duration),
}

/// Why a request got no answer: a connection never made, or one that failed with the
/// request on it. It shows as its cause, so its own source is the cause's (a chain
/// names each cause once).
#[derive(Debug)]
pub struct Failure {
    never_sent: bool,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl Failure {
    /// Whether the request never left (no connection was made): safe to repeat.
    pub fn is_connect(&self) -> bool {
        self.never_sent
    }
}

impl UpstreamError {
    /// The error with every cause below it (`upstream connection failed: client error
    /// (Connect): dns error: ...`), for logs: an operator needs the root cause.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        text
    }
}

/// Request header with which a client shortens its maximum queue wait.
pub const MAX_WAIT_HEADER: HeaderName = HeaderName::from_static("x-proxy-max-wait-ms");

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    crate::hardening::hop::strip(headers);
}

/// The pooled client for the one configured upstream.
/// The pooled connections to the one configured upstream.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
    connector: HttpsConnector<HttpConnector>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: HeaderValue,
    request_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({}://{})", self.scheme, self.authority)
    }
}

/// The rustls client config: ring provider, webpki roots plus the extra CA file.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let err = |message: String| TlsSetupError::CaFile { path: path.display().to_string(), message };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate found".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Upstream {
    /// Builds the client for `config.url`.
    pub fn new(config: &UpstreamConfig) -> Result<Self, TlsSetupError> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let uri = config.url.uri();
        let scheme = uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTPS);
        let authority = uri.authority().cloned().expect("validated upstream URL has a host");
        let mut upstream = Upstream {
            pool: Arc::new(Pool::new(https.clone(), Uri::default(), Duration::ZERO, 0)),
            connector: https,
            host: HeaderValue::from_str(authority.as_str()).expect("an authority is a valid header value"),
            scheme,
            authority,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            pool_idle_timeout: Duration::from_millis(config.pool_idle_timeout_ms),
            pool_max_idle: config.pool_max_idle_per_host,
        };
        upstream.pool = upstream.new_pool();
        Ok(upstream)
    }

    fn new_pool(&self) -> Arc<Pool> {
        let base = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority are valid");
        Arc::new(Pool::new(self.connector.clone(), base, self.pool_idle_timeout, self.pool_max_idle))
    }

    /// The same upstream through a connection pool of its own. Each serving runtime
    /// takes one, so a request and its upstream connection's task share a thread.
    pub fn with_own_pool(&self) -> Upstream {
        Upstream { pool: self.new_pool(), ..self.clone() }
    }

    /// A connection held for a request before it queues for its token, so that the
    /// token is taken when the request can leave at once (see [`pool`]).
    pub async fn lease(&self) -> Option<Lease> {
        self.pool.lease().await
    }

    /// Whether an absolute-form request target names this upstream.
    pub fn is_upstream(&self, uri: &Uri) -> bool {
        uri.authority().is_none_or(|a| {
            a.host().eq_ignore_ascii_case(self.authority.host()) && a.port_u16() == self.authority.port_u16()
        })
    }

    /// Sends one request. `parts` are the client's (headers already cleaned); the
    /// target becomes the upstream's scheme and authority with the client's path and query.
    pub async fn send(&self, parts: &request::Parts, body: Bytes) -> Result<Response<Incoming>, UpstreamError> {
        self.send_on(None, parts, body).await
    }

    /// Sends on the leased connection when it is still usable, else on a pooled or new
    /// one. A connection the upstream closed just before the request was written is
    /// replaced once: the request never left.
    pub async fn send_on(
        &self,
        lease: Option<Lease>,
        parts: &request::Parts,
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let exchange = async {
            let mut held = match lease.map(Lease::take) {
                Some(Taken::Ready(sender, reused)) => Some((sender, reused)),
                Some(Taken::TurnedAway(source)) => return Err(Failure { never_sent: true, source }),
                Some(Taken::Dial) | None => None,
            };
            for attempt in 0..2 {
                let (sender, reused) = match held.take() {
                    Some(s) => s,
                    None => self.pool.sender().await.map_err(|source| Failure { never_sent: true, source })?,
                };
                match self.send_with(sender, parts, body.clone()).await {
                    // Closed by the upstream while idle: on a new connection it goes.
                    Err(e) if attempt == 0 && reused && e.is_canceled() => continue,
                    Err(e) => return Err(Failure { never_sent: e.is_canceled(), source: e.into() }),
                    Ok(resp) => return Ok(resp),
                }
            }
            unreachable!("the second attempt returns")
        };
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(UpstreamError::Connect(e)),
            Err(_) => Err(UpstreamError::Timeout(self.request_timeout)),
        }
    }

    async fn send_with(
        &self,
        sender: Sender,
        parts: &request::Parts,
        body: Bytes,
    ) -> hyper::Result<Response<Incoming>> {
        let path_and_query =
            parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = parts.headers.clone();
        match sender {
            Sender::H1(mut s) => {
                // HTTP/1.1: origin-form target, the authority in Host.
                *req.uri_mut() = Uri::from(path_and_query);
                req.headers_mut().insert(header::HOST, self.host.clone());
                let resp = s.send_request(req).await;
                self.pool.give_back(Sender::H1(s));
                resp
            }
            Sender::H2(mut s) => {
                *req.uri_mut() = Uri::builder()
                    .scheme(self.scheme.clone())
                    .authority(self.authority.clone())
                    .path_and_query(path_and_query)
                    .build()
                    .expect("scheme, authority and path are valid");
                s.send_request(req).await
            }
        }
    }
}

/// Prepares the client's headers for the upstream: drops hop-by-hop and proxy-only
/// headers and `Host` (set from the upstream URL), fixes `Content-Length` to the
/// buffered body, adds `revision` when missing.
pub fn outbound_headers(headers: &mut HeaderMap, revision: &str) {
    strip_hop_by_hop(headers);
    // One pass over the names first: a removal by name hashes and probes the map, and
    // most requests carry `Host` and none of the others.
    let (mut host, mut length, mut max_wait) = (false, false, false);
    for name in headers.keys() {
        match name.as_str() {
            "host" => host = true,
            "content-length" => length = true,
            "x-proxy-max-wait-ms" => max_wait = true,
            _ => {}
        }
    }
    if host {
        headers.remove(header::HOST);
    }
    if length {
        headers.remove(header::CONTENT_LENGTH);
    }
    if max_wait {
        headers.remove(MAX_WAIT_HEADER);
    }
    if !headers.contains_key(crate::header::REVISION) {
        headers.insert(crate::header::REVISION, HeaderValue::from_str(revision).expect("validated revision"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let root = std::io::Error::other("dns error");
        let e = UpstreamError::Connect(Failure { never_sent: true, source: Box::new(Outer(root)) });
        assert_eq!(e.chain(), "upstream connection failed: client error (Connect): dns error");
    }

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Bearer t"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        h.insert("host", HeaderValue::from_static("localhost:8080"));
        h.insert(MAX_WAIT_HEADER, HeaderValue::from_static("10"));
        h.insert("content-length", HeaderValue::from_static("3"));
        outbound_headers(&mut h, "2026-07-15");
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "revision"]);
        let mut h = HeaderMap::new();
        h.insert("revision", HeaderValue::from_static("2025-01-15"));
        outbound_headers(&mut h, "2026-07-15");
        assert_eq!(h["revision"], "2025-01-15");
    }
}
