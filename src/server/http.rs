//! Plain HTTP on the gRPC listener: a request whose `content-type` is not
//! `application/grpc*` is answered here, before the gRPC layers.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 while the store answers and the server is not draining, 503
//!   otherwise; it follows the same readiness as the gRPC health service.
//! - `GET /.well-known/jwks.json`: the key set of `TokenService.GetJwks` (the route in
//!   `token.proto`), with `Cache-Control` and an `ETag` that changes when keys rotate; a
//!   matching `If-None-Match` is 304.
//! - Anything else: 404 (405 for another method on a known path) with a
//!   `google.rpc.Status` JSON body, as grpc-gateway answers.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::body::Body;

use crate::token::Tokens;

/// What the HTTP routes read.
#[derive(Clone)]
pub struct HttpState {
    pub tokens: Arc<Tokens>,
    /// The store's readiness (`None` until the first probe).
    pub readiness: watch::Receiver<Option<bool>>,
    /// Turns true when the server starts draining.
    pub stopping: watch::Receiver<bool>,
}

/// See the module docs.
#[derive(Clone)]
pub struct HttpLayer {
    state: HttpState,
}

impl HttpLayer {
    pub fn new(state: HttpState) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for HttpLayer {
    type Service = HttpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HttpService<S> {
    inner: S,
    state: HttpState,
}

fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A `google.rpc.Status` JSON body with an `ErrorInfo`, as every refusal carries.
fn status_body(
    status: StatusCode,
    code: tonic::Code,
    reason: &str,
    message: &str,
) -> Response<Body> {
    let body = json!({
        "code": code as i32,
        "message": message,
        "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": crate::error::ERROR_DOMAIN,
            "metadata": {},
        }],
    });
    respond(status, "application/json", body.to_string())
}

/// The JWK Set, canonical proto3 JSON of `GetJwksResponse` (RFC 7517's shape).
fn jwks(tokens: &Tokens) -> String {
    let keys: Vec<_> = tokens
        .public_keys()
        .into_iter()
        .map(|key| {
            json!({
                "kty": "OKP", "crv": "Ed25519", "x": key.x, "kid": key.kid,
                "alg": "EdDSA", "use": "sig",
            })
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn route(
    state: &HttpState,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Response<Body> {
    let known = ["/healthz", "/readyz", "/.well-known/jwks.json"];
    if known.contains(&path) && method != Method::GET && method != Method::HEAD {
        return status_body(
            StatusCode::METHOD_NOT_ALLOWED,
            tonic::Code::Unimplemented,
            "METHOD_NOT_ALLOWED",
            &format!("{path} answers GET only"),
        );
    }
    match path {
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => {
            let draining = *state.stopping.borrow();
            let store_ready = *state.readiness.borrow() == Some(true);
            if store_ready && !draining {
                respond(StatusCode::OK, "text/plain; charset=utf-8", "ready\n")
            } else {
                let why = if draining {
                    "draining\n"
                } else {
                    "store unavailable\n"
                };
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    why,
                )
            }
        }
        "/.well-known/jwks.json" => {
            let body = jwks(&state.tokens);
            let digest = Sha256::digest(body.as_bytes());
            let etag = format!("\"{}\"", hex(&digest[..16]));
            let unchanged = headers
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
            let mut response = if unchanged {
                respond(StatusCode::NOT_MODIFIED, "application/json", Bytes::new())
            } else {
                respond(StatusCode::OK, "application/json", body)
            };
            let headers = response.headers_mut();
            // Edges may cache the set for a minute: a rotated-in key verifies tokens only
            // once it is active, and retired keys stay in the set while their tokens live.
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            );
            if let Ok(etag) = HeaderValue::from_str(&etag) {
                headers.insert(header::ETAG, etag);
            }
            response
        }
        _ => status_body(
            StatusCode::NOT_FOUND,
            tonic::Code::NotFound,
            "NOT_FOUND",
            &format!("no route for {method} {path}"),
        ),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<S, B> tower::Service<http::Request<B>> for HttpService<S>
where
    S: tower::Service<http::Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<Response<Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if is_grpc(&request) {
            return futures::future::Either::Left(self.inner.call(request));
        }
        let response = route(
            &self.state,
            request.method(),
            request.uri().path(),
            request.headers(),
        );
        futures::future::Either::Right(futures::future::ready(Ok(response)))
    }
}
