//! Counts and times every call (gRPC, and REST through the shim) by service, method,
//! gRPC code and transport. The code is read where gRPC puts it: the response headers of
//! a trailers-only answer, else the trailers (UNKNOWN when they hold none). A call whose
//! answer is dropped before its trailers (the caller reset it, or closed a stream) counts
//! as CANCELLED. Paths that name no method of the descriptor sets count as `unknown`, so
//! a caller cannot grow the label set.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

/// Marks a request the REST shim made (its transport label is `http`).
#[derive(Clone, Copy, Debug)]
pub struct ViaRest;

type Labels = (&'static str, &'static str);

/// The method names the labels may take, by gRPC path.
fn known_methods() -> HashMap<String, Labels> {
    let mut names = HashMap::new();
    let sets: [&[u8]; 4] = [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    for set in sets {
        let Ok(pool) = prost_reflect::DescriptorPool::decode(set) else {
            continue;
        };
        for service in pool.services() {
            for method in service.methods() {
                // A bounded set, leaked once per process: labels are `&'static str`.
                let service_name: &'static str = Box::leak(service.full_name().into());
                let method_name: &'static str = Box::leak(method.name().into());
                names.insert(
                    format!("/{service_name}/{method_name}"),
                    (service_name, method_name),
                );
            }
        }
    }
    names
}

/// See the module docs.
#[derive(Clone)]
pub struct MeteredLayer {
    methods: Arc<HashMap<String, Labels>>,
}

impl MeteredLayer {
    pub fn new() -> Self {
        static METHODS: std::sync::OnceLock<Arc<HashMap<String, Labels>>> =
            std::sync::OnceLock::new();
        Self {
            methods: METHODS.get_or_init(|| Arc::new(known_methods())).clone(),
        }
    }
}

impl<S> tower::Layer<S> for MeteredLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            methods: self.methods.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    methods: Arc<HashMap<String, Labels>>,
}

/// What one call records when its code is known.
struct Call {
    labels: Labels,
    transport: &'static str,
    started: Instant,
    /// The call's span when spans are exported: held until the code is known, so the
    /// span of a streaming call lasts as long as the stream.
    span: tracing::Span,
}

impl Call {
    fn record(&self, code: tonic::Code) {
        crate::telemetry::end_call(&self.span, code);
        let (service, method) = self.labels;
        crate::observe::rpc(
            service,
            method,
            code,
            self.transport,
            self.started.elapsed().as_secs_f64(),
        );
    }
}

fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(code))
}

/// A response body that records its call when the trailers go by (or when it is dropped
/// without them).
struct MeteredBody {
    inner: Body,
    call: Option<Call>,
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(call) = this.call.take()
        {
            call.record(grpc_code(trailers).unwrap_or(tonic::Code::Unknown));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    /// Dropped before its trailers: the caller went away (a reset or a closed stream).
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.record(tonic::Code::Cancelled);
        }
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let labels = self
            .methods
            .get(request.uri().path())
            .copied()
            .unwrap_or(("unknown", "unknown"));
        let transport = if request.extensions().get::<ViaRest>().is_some() {
            "http"
        } else {
            "grpc"
        };
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            // Polled within the call's span (tonic's trace_fn): named here, and held
            // until the code is known.
            let call = Call {
                labels,
                transport,
                started,
                span: crate::telemetry::name_call(labels.0, labels.1, transport),
            };
            let response = answer.await?;
            if let Some(code) = grpc_code(response.headers()) {
                call.record(code);
                return Ok(response);
            }
            Ok(response.map(|inner| {
                Body::new(MeteredBody {
                    inner,
                    call: Some(call),
                })
            }))
        })
    }
}
