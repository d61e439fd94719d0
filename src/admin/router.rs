//! The admin listener's routes: a table of method and path to handler. A known path
//! asked with another method gets 405, anything else 404.

use std::future::Future;
use std::pin::Pin;

use http::{request, Method, Response, StatusCode};

use crate::body::ProxyBody;

/// A handler's answer.
pub type Answer = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// A handler: the state `S` and the request head (no admin endpoint reads a body).
pub type Handler<S> = fn(S, request::Parts) -> Answer;

/// Which paths a route serves.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// This path only.
    Exact(&'static str),
    /// This path and everything below it (`/x` and `/x/...`).
    Under(&'static str),
}

impl Path {
    fn matches(self, path: &str) -> bool {
        match self {
            Path::Exact(p) => path == p,
            Path::Under(p) => path.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

/// The route table.
pub struct Router<S> {
    routes: Vec<(Option<Method>, Path, Handler<S>)>,
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.routes.iter().map(|(m, p, _)| (m, p))).finish()
    }
}

impl<S> Default for Router<S> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

impl<S> Router<S> {
    /// `GET path`.
    pub fn get(self, path: &'static str, handler: Handler<S>) -> Self {
        self.route(Some(Method::GET), Path::Exact(path), handler)
    }

    /// `POST path`.
    pub fn post(self, path: &'static str, handler: Handler<S>) -> Self {
        self.route(Some(Method::POST), Path::Exact(path), handler)
    }

    /// Any method on `path` and below it; the handler answers methods it does not serve.
    pub fn any_under(self, path: &'static str, handler: Handler<S>) -> Self {
        self.route(None, Path::Under(path), handler)
    }

    fn route(mut self, method: Option<Method>, path: Path, handler: Handler<S>) -> Self {
        self.routes.push((method, path, handler));
        self
    }

    /// The handler for the request, or the 405 or 404 answer.
    pub fn answer(&self, state: S, parts: request::Parts) -> Answer {
        let path = parts.uri.path();
        let mut known_path = false;
        for (method, p, handler) in &self.routes {
            if !p.matches(path) {
                continue;
            }
            known_path = true;
            if method.as_ref().is_none_or(|m| *m == parts.method) {
                return handler(state, parts);
            }
        }
        let answer = if known_path {
            super::json(StatusCode::METHOD_NOT_ALLOWED, &serde_json::json!({"error": "method not allowed"}))
        } else {
            super::json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "not found"}))
        };
        Box::pin(std::future::ready(answer))
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn named(name: &'static str) -> Answer {
        Box::pin(std::future::ready(super::super::json(StatusCode::OK, &serde_json::json!({ "route": name }))))
    }

    fn router() -> Router<()> {
        Router::default()
            .get("/a", |(), _| named("get a"))
            .post("/a", |(), _| named("post a"))
            .post("/b", |(), _| named("post b"))
            .any_under("/tree", |(), p| named(if p.method == Method::DELETE { "delete under" } else { "under" }))
    }

    async fn ask(method: Method, path: &str) -> (StatusCode, String) {
        let (parts, ()) = Request::builder().method(method).uri(path).body(()).unwrap().into_parts();
        let resp = router().answer((), parts).await;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn method_and_path_pick_the_handler() {
        assert!(ask(Method::GET, "/a").await.1.contains("get a"));
        assert!(ask(Method::POST, "/a").await.1.contains("post a"));
        assert_eq!(ask(Method::GET, "/b").await.0, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(ask(Method::GET, "/c").await.0, StatusCode::NOT_FOUND);
        assert_eq!(ask(Method::GET, "/a/").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_tree_takes_its_root_and_below_but_not_lookalikes() {
        assert!(ask(Method::GET, "/tree").await.1.contains("under"));
        assert!(ask(Method::DELETE, "/tree/x/1").await.1.contains("delete under"));
        assert_eq!(ask(Method::GET, "/treehouse").await.0, StatusCode::NOT_FOUND);
    }
}
