//! One error type for everything the proxy answers itself, mapped in one place to a
//! status, a JSON:API body in Klaviyo's shape and a header that marks it as the
//! proxy's own. Error texts never include a key, an `Authorization` value or a
//! `company_id`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::{full, ProxyBody};

/// Response header on every answer the proxy makes itself; its value is the error code.
pub const PROXY_ERROR_HEADER: http::HeaderName = http::HeaderName::from_static("x-klaviyo-proxy-error");

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's request was refused.
    Client,
    /// The upstream could not be reached or did not answer in time.
    Upstream,
    /// The proxy itself.
    Internal,
}

/// Everything the proxy may answer on its own.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The bucket's queue is full.
    #[error("the queue for {operation} is full; retry in {}s", secs(*.retry_after))]
    QueueFull {
        /// Operation label.
        operation: &'static str,
        /// When a request arriving now could go.
        retry_after: Duration,
    },
    /// The request could not leave before its deadline.
    #[error("{operation} could not be sent within the allowed wait; it could go in {}s", secs(*.retry_after))]
    QueueTimeout {
        /// Operation label.
        operation: &'static str,
        /// The predicted wait.
        retry_after: Duration,
    },
    /// The body is larger than allowed.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client was too slow to send its request.
    #[error("request was not received within {}s", .0.as_secs())]
    ClientTimeout(Duration),
    /// The request body could not be read.
    #[error("request body could not be read")]
    BodyRead,
    /// A malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// Not a Klaviyo API path.
    #[error("the proxy forwards only /api/ and /client/ paths")]
    UnknownPath,
    /// An absolute-form request for a host other than the upstream.
    #[error("the proxy forwards only to its configured upstream")]
    ForeignHost,
    /// `CONNECT` tunnels are never opened.
    #[error("CONNECT is not supported: the proxy is not a tunnel")]
    Connect,
    /// The client did not present the proxy's client token.
    #[error("missing or wrong Proxy-Authorization")]
    ProxyAuthRequired,
    /// Inject mode forbids client-supplied keys.
    #[error("this proxy does not accept client-supplied API keys")]
    ClientKeyForbidden,
    /// The upstream could not be reached.
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    #[error("the upstream did not answer within {}s", .0.as_secs())]
    UpstreamTimeout(Duration),
    /// Klaviyo answered 429 and the pause it asked for ends after the request's deadline.
    #[error("Klaviyo throttled {operation}; it could go in {}s", secs(*.retry_after))]
    UpstreamThrottled {
        /// Operation label.
        operation: &'static str,
        /// When the request could go.
        retry_after: Duration,
    },
    /// The circuit breaker is open: Klaviyo is failing, requests fail fast.
    #[error("Klaviyo is failing; the proxy will try again in {}s", secs(*.retry_after))]
    CircuitOpen {
        /// The time until the breaker lets its next probe through.
        retry_after: Duration,
    },
    /// Cloudflare in front of Klaviyo answered with a challenge (`403` with
    /// `cf-mitigated: challenge`): the proxy's network address is challenged, the key
    /// was not refused, and repeating meets the same challenge.
    #[error("Cloudflare in front of Klaviyo challenged the request (cf-mitigated: challenge): this proxy's egress address is being challenged; the API key was not refused, and repeating will not help until the address is cleared")]
    UpstreamChallenged,
    /// The kill switch is on (`KLAVIYO_ENABLED=false`).
    #[error("forwarding to Klaviyo is switched off on this proxy")]
    Disabled,
    /// The proxy is shutting down and could not finish the request in time.
    #[error("the proxy is shutting down")]
    Draining,
    /// A bug or resource failure inside the proxy.
    #[error("internal proxy error")]
    Internal,
    /// The webhook gate refused a webhook (bad signature, timestamp, webhook id or token).
    #[error("webhook rejected: {0}")]
    WebhookRejected(&'static str),
    /// No webhook route at this method and path.
    #[error("the webhook gate takes POST /webhooks/klaviyo and /webhooks/flow")]
    WebhookRoute,
    // Hardening (issue 13): refusals of hostile or misdirected requests.
    /// The `Host` (or `:authority`) is not a name this proxy answers to.
    #[error("this proxy does not answer to that host name (see server.allowed_hosts)")]
    UnknownHost,
    /// `admin.token` is set and the request does not carry it.
    #[error("missing or wrong admin token (Authorization: Bearer)")]
    AdminAuthRequired,
    /// A write to the admin listener sent by another site.
    #[error("cross-site requests to the admin listener are refused")]
    CrossSite,
    /// A write to the admin listener without a JSON content type.
    #[error("admin writes need Content-Type: application/json")]
    UnsupportedMediaType,
    /// The bodies held in memory are at their budget (`server.max_buffered_bytes`).
    #[error("the proxy holds as many request bodies as it may; retry in {}s", secs(*.retry_after))]
    Overloaded {
        /// When to try again.
        retry_after: Duration,
    },
    /// Every bucket slot is taken by a busy bucket (`limiter.max_buckets`).
    #[error("the proxy tracks as many accounts as it may; retry in {}s", secs(*.retry_after))]
    TooManyBuckets {
        /// When to try again.
        retry_after: Duration,
    },
    /// A `create_event` body the coalescer refused before storing it: Klaviyo's own
    /// 400, answered by the proxy because Klaviyo will not see the event synchronously.
    #[error("{detail}")]
    InvalidEvent {
        /// Where in the body, as a JSON pointer.
        pointer: String,
        /// What is wrong.
        detail: String,
    },
    /// The coalescer holds `coalesce.max_pending` undelivered events.
    #[error("too many events wait for delivery; retry in {}s", secs(*.retry_after))]
    CoalesceFull {
        /// When to try again.
        retry_after: Duration,
    },
    // The checklist's opt-in checks (src/checklist).
    /// The operation needs a scope outside `auth.allowed_scopes`.
    #[error("{operation} needs {missing}, outside this proxy's auth.allowed_scopes")]
    ScopeForbidden {
        /// Operation label.
        operation: &'static str,
        /// The scopes it needs that are not allowed.
        missing: String,
    },
    /// A phone number not in E.164 form, with `checks.phone_e164 = "reject"`.
    #[error("Invalid phone number format (Example of a valid format: +12345678901)")]
    PhoneNotE164 {
        /// Where it is in the body (JSON pointer), never the number.
        pointer: String,
    },
    // The spool (src/spool.rs): a deferrable write it cannot store is refused, never
    // acknowledged.
    /// The spool holds `spool.max_bytes` or `spool.max_entries`.
    #[error("the spool is full and Klaviyo cannot take the write now; retry in {}s", secs(*.retry_after))]
    SpoolFull {
        /// When to try again.
        retry_after: Duration,
    },
    /// The spool file cannot be written (disk full, I/O error); the proxy reopens it.
    #[error("the spool cannot be written and Klaviyo cannot take the write now; retry in {}s", secs(*.retry_after))]
    SpoolUnavailable {
        /// When to try again.
        retry_after: Duration,
    },
    // The coalescer's and the webhook gate's stores (src/coalesce/store.rs,
    // src/webhooks/store.rs): what they cannot store is refused, never acknowledged.
    /// A store's file cannot be written (disk full, I/O error); the proxy reopens it.
    #[error("the {store} cannot be written; retry in {}s", secs(*.retry_after))]
    StoreUnavailable {
        /// Which store: `coalesce store`, `webhook store`.
        store: &'static str,
        /// When to try again.
        retry_after: Duration,
    },
}

/// Whole seconds, rounded up, at least 1: `Retry-After` must be an integer for the SDKs.
pub fn secs(d: Duration) -> u64 {
    d.as_micros().div_ceil(1_000_000).max(1) as u64
}

impl ProxyError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            QueueFull { .. } | QueueTimeout { .. } | UpstreamThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            CircuitOpen { .. } | Disabled | Draining | CoalesceFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            InvalidEvent { .. } => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyRead | BadRequest(_) => StatusCode::BAD_REQUEST,
            UnknownPath => StatusCode::NOT_FOUND,
            ForeignHost | ClientKeyForbidden => StatusCode::FORBIDDEN,
            Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            UpstreamUnreachable | UpstreamChallenged => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ScopeForbidden { .. } => StatusCode::FORBIDDEN,
            PhoneNotE164 { .. } => StatusCode::BAD_REQUEST,
            WebhookRejected(_) => StatusCode::UNAUTHORIZED,
            WebhookRoute => StatusCode::NOT_FOUND,
            UnknownHost => StatusCode::MISDIRECTED_REQUEST,
            AdminAuthRequired => StatusCode::UNAUTHORIZED,
            CrossSite => StatusCode::FORBIDDEN,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Overloaded { .. } | TooManyBuckets { .. } => StatusCode::SERVICE_UNAVAILABLE,
            SpoolFull { .. } | SpoolUnavailable { .. } | StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The JSON:API `code`, also the value of [`PROXY_ERROR_HEADER`].
    pub fn code(&self) -> &'static str {
        use ProxyError::*;
        match self {
            QueueFull { .. } => "proxy_queue_full",
            QueueTimeout { .. } => "proxy_queue_timeout",
            UpstreamThrottled { .. } => "proxy_upstream_throttled",
            CircuitOpen { .. } => "proxy_circuit_open",
            Disabled => "proxy_disabled",
            Draining => "proxy_draining",
            BodyTooLarge { .. } => "proxy_body_too_large",
            ClientTimeout(_) => "proxy_client_timeout",
            BodyRead => "proxy_body_unreadable",
            BadRequest(_) => "proxy_bad_request",
            UnknownPath => "proxy_unknown_path",
            ForeignHost => "proxy_forbidden_host",
            Connect => "proxy_connect_refused",
            ProxyAuthRequired => "proxy_auth_required",
            ClientKeyForbidden => "proxy_client_key_forbidden",
            UpstreamUnreachable => "proxy_upstream_unreachable",
            UpstreamChallenged => "proxy_upstream_challenged",
            UpstreamTimeout(_) => "proxy_upstream_timeout",
            Internal => "proxy_internal_error",
            WebhookRejected(_) => "proxy_webhook_rejected",
            WebhookRoute => "proxy_webhook_route",
            UnknownHost => "proxy_unknown_host",
            AdminAuthRequired => "proxy_admin_auth_required",
            CrossSite => "proxy_cross_site",
            UnsupportedMediaType => "proxy_unsupported_media_type",
            Overloaded { .. } => "proxy_overloaded",
            TooManyBuckets { .. } => "proxy_too_many_buckets",
            InvalidEvent { .. } => "proxy_invalid_event",
            CoalesceFull { .. } => "proxy_coalesce_full",
            ScopeForbidden { .. } => "proxy_scope_forbidden",
            PhoneNotE164 { .. } => "proxy_phone_not_e164",
            SpoolFull { .. } => "proxy_spool_full",
            SpoolUnavailable { .. } => "proxy_spool_unavailable",
            StoreUnavailable { .. } => "proxy_store_unavailable",
        }
    }

    /// A short title, like Klaviyo's.
    pub fn title(&self) -> &'static str {
        use ProxyError::*;
        match self {
            QueueFull { .. } | QueueTimeout { .. } | UpstreamThrottled { .. } => {
                "Request was throttled by klaviyo-proxy."
            }
            CircuitOpen { .. } => "Klaviyo is unavailable.",
            Disabled => "Forwarding is switched off.",
            Draining => "The proxy is shutting down.",
            BodyTooLarge { .. } => "Request body too large.",
            ClientTimeout(_) => "Request timed out.",
            BodyRead | BadRequest(_) => "Invalid request.",
            UnknownPath => "Not found.",
            ForeignHost | Connect => "Forbidden upstream.",
            ProxyAuthRequired => "Proxy authentication required.",
            ClientKeyForbidden => "Client API keys are not allowed.",
            UpstreamUnreachable | UpstreamTimeout(_) => "Klaviyo is unavailable.",
            UpstreamChallenged => "Klaviyo's edge challenged the request.",
            Internal => "Internal proxy error.",
            WebhookRejected(_) => "Webhook rejected.",
            WebhookRoute => "Not found.",
            UnknownHost => "Misdirected request.",
            AdminAuthRequired => "Admin authentication required.",
            CrossSite => "Cross-site request refused.",
            UnsupportedMediaType => "Unsupported media type.",
            Overloaded { .. } | TooManyBuckets { .. } => "The proxy is at capacity.",
            InvalidEvent { .. } => "Invalid input.",
            CoalesceFull { .. } => "Too many events waiting for delivery.",
            ScopeForbidden { .. } => "Scope not allowed on this proxy.",
            PhoneNotE164 { .. } => "Invalid input.",
            SpoolFull { .. } | SpoolUnavailable { .. } => "The proxy cannot store the write.",
            StoreUnavailable { .. } => "The proxy cannot store the request.",
        }
    }

    /// Where the failure came from.
    pub fn origin(&self) -> Origin {
        use ProxyError::*;
        match self {
            UpstreamUnreachable
            | UpstreamTimeout(_)
            | UpstreamThrottled { .. }
            | CircuitOpen { .. }
            | UpstreamChallenged => Origin::Upstream,
            Internal | SpoolUnavailable { .. } | StoreUnavailable { .. } => Origin::Internal,
            _ => Origin::Client,
        }
    }

    /// Where in the request body the problem is (JSON pointer), if it is there.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            ProxyError::PhoneNotE164 { pointer } | ProxyError::InvalidEvent { pointer, .. } => Some(pointer),
            _ => None,
        }
    }

    /// The wait to advertise in `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::QueueFull { retry_after, .. }
            | ProxyError::QueueTimeout { retry_after, .. }
            | ProxyError::UpstreamThrottled { retry_after, .. }
            | ProxyError::CircuitOpen { retry_after }
            | ProxyError::Overloaded { retry_after }
            | ProxyError::TooManyBuckets { retry_after }
            | ProxyError::CoalesceFull { retry_after }
            | ProxyError::SpoolFull { retry_after }
            | ProxyError::SpoolUnavailable { retry_after }
            | ProxyError::StoreUnavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The response: status, JSON:API body, proxy marker and, where it applies, an
    /// integer `Retry-After`.
    pub fn into_response(self, request_id: &str) -> Response<ProxyBody> {
        let status = self.status();
        let body = json!({
            "errors": [{
                "id": request_id,
                "status": status.as_u16(),
                "code": self.code(),
                "title": self.title(),
                "detail": self.to_string(),
                "source": {"pointer": self.pointer()},
                "meta": {"origin": "klaviyo-proxy"},
            }]
        });
        let mut resp = Response::new(full(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/vnd.api+json"));
        h.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.code()));
        if let Some(wait) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs(wait)));
        }
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn maps_to_json_api() {
        let cases = [
            (
                ProxyError::QueueFull { operation: "get_accounts", retry_after: Duration::from_millis(1200) },
                429,
                Some("2"),
            ),
            (
                ProxyError::QueueTimeout { operation: "get_accounts", retry_after: Duration::from_millis(10) },
                429,
                Some("1"),
            ),
            (ProxyError::BodyTooLarge { limit: 5 }, 413, None),
            (ProxyError::ForeignHost, 403, None),
            (ProxyError::Connect, 405, None),
            (ProxyError::UpstreamUnreachable, 502, None),
            (ProxyError::UpstreamChallenged, 502, None),
            (ProxyError::CircuitOpen { retry_after: Duration::from_millis(2500) }, 503, Some("3")),
            (
                ProxyError::UpstreamThrottled { operation: "get_accounts", retry_after: Duration::from_secs(9) },
                429,
                Some("9"),
            ),
            (ProxyError::Disabled, 503, None),
            (ProxyError::Draining, 503, None),
            (ProxyError::UnknownHost, 421, None),
            (ProxyError::AdminAuthRequired, 401, None),
            (ProxyError::CrossSite, 403, None),
            (ProxyError::UnsupportedMediaType, 415, None),
            (ProxyError::Overloaded { retry_after: Duration::from_secs(1) }, 503, Some("1")),
            (ProxyError::TooManyBuckets { retry_after: Duration::from_secs(1) }, 503, Some("1")),
            (
                ProxyError::InvalidEvent { pointer: "/data/type".into(), detail: "`type` must be `event`.".into() },
                400,
                None,
            ),
            (ProxyError::CoalesceFull { retry_after: Duration::from_secs(1) }, 503, Some("1")),
            (ProxyError::ScopeForbidden { operation: "create_event", missing: "events:write".into() }, 403, None),
            (ProxyError::PhoneNotE164 { pointer: "/data/attributes/phone_number".into() }, 400, None),
            (ProxyError::SpoolFull { retry_after: Duration::from_secs(30) }, 503, Some("30")),
            (ProxyError::SpoolUnavailable { retry_after: Duration::from_secs(5) }, 503, Some("5")),
            (
                ProxyError::StoreUnavailable { store: "coalesce store", retry_after: Duration::from_secs(1) },
                503,
                Some("1"),
            ),
        ];
        for (err, status, retry) in cases {
            let code = err.code();
            let resp = err.into_response("rid");
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[PROXY_ERROR_HEADER], code);
            assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), retry);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let e = &v["errors"][0];
            assert_eq!(e["status"], status);
            assert_eq!(e["code"], code);
            assert_eq!(e["id"], "rid");
            assert_eq!(e["meta"]["origin"], "klaviyo-proxy");
            assert!(e["title"].is_string() && e["detail"].is_string());
            if code == "proxy_phone_not_e164" {
                assert_eq!(e["source"]["pointer"], "/data/attributes/phone_number");
            }
            if code == "proxy_scope_forbidden" {
                assert!(e["detail"].as_str().unwrap().contains("events:write"), "{e}");
            }
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_secs(3)), 3);
        assert_eq!(secs(Duration::from_millis(3001)), 4);
    }
}
