//! Plain HTTP on the gRPC listener: a request whose `content-type` is not
//! `application/grpc*` is answered here, before the gRPC layers.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /metrics`: the Prometheus text format (see `crate::observe`).
//! - `GET /openapi.json`: the OpenAPI 3 document of the REST routes, from the protos.
//! - `GET /readyz`: 200 while the store answers and the server is not draining, 503
//!   otherwise; it follows the same readiness as the gRPC health service.
//! - `GET /.well-known/jwks.json`: the key set of `TokenService.GetJwks` (the route in
//!   `token.proto`), with `Cache-Control` and an `ETag` that changes when keys rotate; a
//!   matching `If-None-Match` is 304.
//! - A path of a `google.api.http` rule: the REST shim (`rest.rs`), through the gRPC
//!   stack below this layer.
//! - Anything else: 404 (405 for another method on a known path) with a
//!   `google.rpc.Status` JSON body, as grpc-gateway answers.
//!
//! CORS: a request from an origin named by `--cors-origin` gets
//! `Access-Control-Allow-Origin` for it, and its preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered 204 with the methods and headers usher
//! reads. Other origins get no CORS headers, so browsers refuse them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use prost_reflect::DescriptorPool;
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
    /// The REST shim's rules and the types it converts.
    pub rest: Arc<Rest>,
    /// Origins whose browser pages may call (CORS); empty: none.
    pub cors_origins: Arc<Vec<String>>,
    /// Whether `/metrics` is served here (not when `--metrics-listen` moves it).
    pub serve_metrics: bool,
}

/// The REST shim's tables, built once from the descriptor sets.
pub struct Rest {
    pool: DescriptorPool,
    routes: Vec<super::rest::Route>,
    /// The OpenAPI document of the routes, rendered once.
    openapi: String,
    /// Largest request body, bytes (413 past it).
    max_body: usize,
}

impl Rest {
    pub fn new(max_body: usize) -> Self {
        let mut pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        // google.rpc.Status and its details, to render refusals.
        pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .expect("tonic-types' descriptor set decodes");
        let routes = super::rest::routes(&pool);
        let openapi = super::rest::openapi(&pool, &routes).to_string();
        Self {
            pool,
            routes,
            openapi,
            max_body,
        }
    }
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

/// The fixed routes; `None` for any other path.
fn route(
    state: &HttpState,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Option<Response<Body>> {
    let known = [
        "/healthz",
        "/readyz",
        "/.well-known/jwks.json",
        "/metrics",
        "/openapi.json",
    ];
    if !known.contains(&path) || (path == "/metrics" && !state.serve_metrics) {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(status_body(
            StatusCode::METHOD_NOT_ALLOWED,
            tonic::Code::Unimplemented,
            "METHOD_NOT_ALLOWED",
            &format!("{path} answers GET only"),
        ));
    }
    Some(match path {
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/openapi.json" => respond(
            StatusCode::OK,
            "application/json",
            state.rest.openapi.clone(),
        ),
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::observe::render(),
        ),
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
        _ => unreachable!("a known path"),
    })
}

/// A REST request through the gRPC stack `inner`, answered as JSON.
async fn transcode<S>(rest: Arc<Rest>, mut inner: S, request: http::Request<Body>) -> Response<Body>
where
    S: tower::Service<http::Request<Body>, Response = Response<Body>>,
{
    use super::rest::{find, grpc_body, grpc_headers, grpc_outcome, json_answer, status_json};
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let (route, bound) = match find(&rest.routes, &parts.method, path) {
        Ok(found) => found,
        Err(true) => {
            return status_body(
                StatusCode::METHOD_NOT_ALLOWED,
                tonic::Code::Unimplemented,
                "METHOD_NOT_ALLOWED",
                &format!("{path} does not answer {}", parts.method),
            );
        }
        Err(false) => {
            return status_body(
                StatusCode::NOT_FOUND,
                tonic::Code::NotFound,
                "NOT_FOUND",
                &format!("no route for {} {path}", parts.method),
            );
        }
    };
    let body = match Limited::new(body, rest.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return status_body(
                StatusCode::PAYLOAD_TOO_LARGE,
                tonic::Code::ResourceExhausted,
                "MESSAGE_TOO_LARGE",
                &format!("the body is larger than {} bytes", rest.max_body),
            );
        }
    };
    let framed = match grpc_body(route, bound, parts.uri.query(), &body) {
        Ok(framed) => framed,
        Err(refused) => {
            return status_body(
                refused.status,
                refused.code,
                "INVALID_ARGUMENT",
                &refused.message,
            );
        }
    };
    let events = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/event-stream"));
    let mut call = http::Request::new(Body::new(Full::new(framed)));
    *call.method_mut() = Method::POST;
    *call.uri_mut() = route.grpc_path.parse().expect("a method path");
    *call.version_mut() = http::Version::HTTP_2;
    *call.headers_mut() = grpc_headers(&parts.headers);
    *call.extensions_mut() = parts.extensions;
    call.extensions_mut().insert(super::metered::ViaRest);
    let internal = |message: String| {
        status_body(
            StatusCode::INTERNAL_SERVER_ERROR,
            tonic::Code::Internal,
            "INTERNAL",
            &message,
        )
    };
    let Ok(answer) = inner.call(call).await else {
        return internal("the gRPC stack failed".into());
    };
    let (head, body) = answer.into_parts();
    if route.streaming {
        // A refusal before the first message comes as headers alone.
        if let Some((code, message, details)) = grpc_outcome(&head.headers)
            && code != 0
        {
            let code = tonic::Code::from_i32(code);
            let status = StatusCode::from_u16(crate::error::http_status(code))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return respond(
                status,
                "application/json",
                status_json(&rest.pool, code as i32, &message, details.as_deref()),
            );
        }
        return streamed(rest.clone(), route.clone(), body, events);
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return internal(status.message().to_owned()),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let outcome = grpc_outcome(&trailers).or_else(|| grpc_outcome(&head.headers));
    let Some((code, message, details)) = outcome else {
        return internal("the answer has no grpc-status".into());
    };
    if code == 0 {
        return match json_answer(route, collected.to_bytes()) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(error) => internal(error),
        };
    }
    let code = tonic::Code::from_i32(code);
    let status = StatusCode::from_u16(crate::error::http_status(code))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = respond(
        status,
        "application/json",
        status_json(&rest.pool, code as i32, &message, details.as_deref()),
    );
    if let Some(seconds) = details.as_deref().and_then(retry_after_seconds) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The whole seconds (rounded up) of a `google.rpc.RetryInfo` among a status's details:
/// the REST answer's `Retry-After`.
fn retry_after_seconds(details: &[u8]) -> Option<u64> {
    use prost::Message;
    let status = tonic_types::pb::Status::decode(details).ok()?;
    let info = status
        .details
        .iter()
        .find(|d| d.type_url == "type.googleapis.com/google.rpc.RetryInfo")?;
    let delay = tonic_types::pb::RetryInfo::decode(info.value.as_slice())
        .ok()?
        .retry_delay?;
    let seconds = delay.seconds.max(0) as u64;
    Some(seconds + u64::from(delay.nanos > 0))
}

/// A server-streaming answer as it comes: each message one line of JSON,
/// `{"result": <message>}`, and a failure after the first message a last line
/// `{"error": <google.rpc.Status>}`, as grpc-gateway streams; or the same documents as
/// server-sent events (`data:`, and `event: error` for the failure).
fn streamed(
    rest: Arc<Rest>,
    route: super::rest::Route,
    body: Body,
    events: bool,
) -> Response<Body> {
    use super::rest::{grpc_outcome, json_answer, status_json};
    use bytes::{Buf, BytesMut};
    use http_body::Frame;
    let line = move |kind: &str, json: String| -> Bytes {
        let document = format!("{{\"{kind}\":{json}}}");
        Bytes::from(match (events, kind) {
            (true, "error") => format!("event: error\ndata: {document}\n\n"),
            (true, _) => format!("data: {document}\n\n"),
            (false, _) => format!("{document}\n"),
        })
    };
    struct State {
        body: Body,
        buffer: BytesMut,
        done: bool,
    }
    let state = State {
        body,
        buffer: BytesMut::new(),
        done: false,
    };
    let lines = futures::stream::unfold(state, move |mut state| {
        let (rest, route) = (rest.clone(), route.clone());
        async move {
            if state.done {
                return None;
            }
            let failed = |state: State, message: &str| {
                let json = status_json(&rest.pool, tonic::Code::Internal as i32, message, None);
                Some((
                    Ok::<_, std::convert::Infallible>(Frame::data(line("error", json))),
                    State {
                        done: true,
                        ..state
                    },
                ))
            };
            loop {
                if state.buffer.len() >= 5 {
                    let length = u32::from_be_bytes([
                        state.buffer[1],
                        state.buffer[2],
                        state.buffer[3],
                        state.buffer[4],
                    ]) as usize;
                    if state.buffer.len() >= 5 + length {
                        let framed = state.buffer.split_to(5 + length).freeze();
                        return match json_answer(&route, framed) {
                            Ok(json) => Some((Ok(Frame::data(line("result", json))), state)),
                            Err(error) => failed(state, &error),
                        };
                    }
                }
                match state.body.frame().await {
                    None => return None,
                    Some(Err(status)) => return failed(state, status.message()),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(mut data) => {
                            let chunk = data.copy_to_bytes(data.remaining());
                            state.buffer.extend_from_slice(&chunk);
                        }
                        Err(frame) => {
                            let trailers = frame.into_trailers().unwrap_or_default();
                            return match grpc_outcome(&trailers) {
                                Some((code, message, details)) if code != 0 => {
                                    let json =
                                        status_json(&rest.pool, code, &message, details.as_deref());
                                    Some((
                                        Ok(Frame::data(line("error", json))),
                                        State {
                                            done: true,
                                            ..state
                                        },
                                    ))
                                }
                                _ => None,
                            };
                        }
                    },
                }
            }
        }
    });
    let content_type = if events {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let mut response = Response::new(Body::new(http_body_util::StreamBody::new(lines)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<S> tower::Service<http::Request<Body>> for HttpService<S>
where
    S: tower::Service<http::Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if is_grpc(&request) {
            return Box::pin(self.inner.call(request));
        }
        let origin = allowed_origin(&self.state.cors_origins, request.headers());
        if request.method() == Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let mut response = respond(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
            if let Some(origin) = origin {
                preflight(response.headers_mut(), origin);
            }
            return Box::pin(futures::future::ready(Ok(response)));
        }
        let answer = self.answer(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some(origin) = origin {
                let headers = response.headers_mut();
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                headers.append(header::VARY, HeaderValue::from_static("origin"));
            }
            Ok(response)
        })
    }
}

/// The future of an answer.
pub type Answer<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

/// The request's `Origin`, if CORS allows it.
fn allowed_origin(allowed: &[String], headers: &http::HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed.iter().any(|o| o == text).then(|| origin.clone())
}

/// The answer to an allowed origin's preflight.
fn preflight(headers: &mut http::HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, grpc-timeout, x-request-id"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

impl<S> HttpService<S>
where
    S: tower::Service<http::Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    /// A non-gRPC request's answer: a fixed route, or the REST shim.
    fn answer(&mut self, request: http::Request<Body>) -> Answer<S::Error> {
        let fixed = route(
            &self.state,
            request.method(),
            request.uri().path(),
            request.headers(),
        );
        if let Some(response) = fixed {
            return Box::pin(futures::future::ready(Ok(response)));
        }
        // The clone is ready only once polled; take the polled one (tower's pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let rest = self.state.rest.clone();
        Box::pin(async move { Ok(transcode(rest, inner, request).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    /// Every gRPC code a method can answer reaches the REST caller as grpc-gateway's HTTP
    /// status, with the `google.rpc.Status` body and its details. The table is written
    /// out here, not derived from `crate::error::http_status`, so it checks that too.
    #[tokio::test]
    async fn every_grpc_code_is_answered_with_its_http_status_and_status_body() {
        use tonic::Code as C;
        let table = [
            (C::Cancelled, 499),
            (C::Unknown, 500),
            (C::InvalidArgument, 400),
            (C::DeadlineExceeded, 504),
            (C::NotFound, 404),
            (C::AlreadyExists, 409),
            (C::PermissionDenied, 403),
            (C::ResourceExhausted, 429),
            (C::FailedPrecondition, 400),
            (C::Aborted, 409),
            (C::OutOfRange, 400),
            (C::Unimplemented, 501),
            (C::Internal, 500),
            (C::Unavailable, 503),
            (C::DataLoss, 500),
            (C::Unauthenticated, 401),
        ];
        let rest = Arc::new(Rest::new(4096));
        for (code, http_status) in table {
            let refusal = tonic::Status::with_error_details(
                code,
                format!("refused: {code:?}"),
                ErrorDetails::with_error_info("SOME_REASON", "usher.video", []),
            );
            let inner = tower::service_fn(move |_: http::Request<Body>| {
                futures::future::ready(Ok::<_, std::convert::Infallible>(
                    refusal.clone().into_http::<Body>(),
                ))
            });
            let request = http::Request::get("/v1/users/alice/sessions/s-1")
                .body(Body::empty())
                .unwrap();
            let answer = transcode(rest.clone(), inner, request).await;
            assert_eq!(answer.status().as_u16(), http_status, "{code:?}");
            assert_eq!(answer.headers()[header::CONTENT_TYPE], "application/json");
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(status["code"], code as i32, "{code:?}");
            assert_eq!(status["message"], format!("refused: {code:?}"));
            assert_eq!(
                status["details"][0]["@type"],
                "type.googleapis.com/google.rpc.ErrorInfo"
            );
            assert_eq!(status["details"][0]["reason"], "SOME_REASON", "{status}");
        }
        // OK is the method's answer itself.
        let ok = tower::service_fn(|_: http::Request<Body>| {
            futures::future::ready(Ok::<_, std::convert::Infallible>(ok_answer()))
        });
        let request = http::Request::get("/v1/users/alice/sessions/s-1")
            .body(Body::empty())
            .unwrap();
        let answer = transcode(rest, ok, request).await;
        assert_eq!(answer.status(), StatusCode::OK);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let session: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(session["session"]["name"], "users/alice/sessions/s-1");
    }

    /// A gRPC answer with one `GetSessionResponse` message and grpc-status 0.
    fn ok_answer() -> Response<Body> {
        use prost::Message as _;
        let message = crate::proto::GetSessionResponse {
            session: Some(crate::proto::Session {
                name: "users/alice/sessions/s-1".into(),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        let mut framed = vec![0];
        framed.extend((message.len() as u32).to_be_bytes());
        framed.extend(message);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = http_body_util::StreamBody::new(futures::stream::iter([
            Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from(framed))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        Response::new(Body::new(body))
    }
}
