//! Structured logs: pretty for people, JSON for machines; the W3C trace context a caller
//! sends, carried into the span of its call so every log line of the call names the
//! caller's trace; and, with `--otlp-endpoint`, those spans exported over OTLP/gRPC: one
//! server span per call (named `service/Method`, parented on the caller's `traceparent`),
//! and a child span per store operation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Whether spans are exported: the call and store spans carry their OpenTelemetry
/// fields only then, so the log lines of a server without `--otlp-endpoint` stay short.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (`--otlp-endpoint`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// What the spans of usher are exported with; spans reach the exporter only from the
/// `usher` crate (calls, store operations, and the log lines inside them).
const EXPORTED: &str = "usher=debug";

/// How long one export may take before its batch is dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The installed subscriber's exporter, if any: [`Telemetry::shutdown`] exports the
/// spans still queued.
#[must_use = "shut it down after serving, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still queued (within the export timeout) and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch processor's thread blocks on its last export, which runs on this
        // runtime: wait for it from a blocking thread, not from a worker.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "the last spans could not be exported");
        }
    }
}

/// Installs the global subscriber. `filter` is tracing's EnvFilter syntax and applies to
/// the log lines; `otlp` is the OTLP/gRPC collector spans are exported to. Call it
/// within the Tokio runtime that serves: the exporter sends from it.
pub fn init(format: LogFormat, filter: &str, otlp: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("--log {filter:?}: {e}"))?;
    let logs = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed(),
    }
    .with_filter(filter);
    let (spans, provider) = match otlp {
        None => (None, None),
        Some(endpoint) => {
            let provider = tracer_provider(endpoint)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("usher"))
                .with_filter(EnvFilter::new(EXPORTED));
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|e| e.to_string())?;
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// A tracer provider that batches spans to the OTLP/gRPC collector at `endpoint`. The
/// batch size, queue and delay follow the standard `OTEL_BSP_*` variables; the service
/// is `usher` unless `OTEL_SERVICE_NAME` says otherwise.
fn tracer_provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("usher");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            runtime: tokio::runtime::Handle::try_current()
                .map_err(|_| "--otlp-endpoint: not within a Tokio runtime".to_owned())?,
        })
        .with_resource(resource.build())
        .build())
}

/// An exporter whose exports run on the server's Tokio runtime. The SDK's batch
/// processor exports from a thread of its own, where tonic's channel (which needs a
/// Tokio reactor) cannot run; this hands each export to the runtime and waits for it.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let export = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            export
                .await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called once, when the provider is built, before any export shares `inner`.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Reads the W3C trace context from request headers.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The trace id of a W3C `traceparent` header (`00-<trace id>-<parent id>-<flags>`), if
/// the header is well formed and the id is not all zeros.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

/// The span of one call: its path, and the caller's trace id when it sent one. When
/// spans are exported it is an OpenTelemetry server span whose parent is the caller's
/// `traceparent`; [`name_call`] names it once the method is known. Probes and scrapes
/// (`/healthz`, `/readyz`, `/metrics`), every few seconds from every prober, get none.
pub fn call_span<B>(request: &http::Request<B>) -> tracing::Span {
    if matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "call",
        method = %request.uri().path(),
        trace_id = tracing::field::Empty,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        rpc.system = tracing::field::Empty,
        rpc.service = tracing::field::Empty,
        rpc.method = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        usher.transport = tracing::field::Empty,
    );
    if let Some(id) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id)
    {
        span.record("trace_id", id);
    }
    if exporting() {
        use opentelemetry::propagation::TextMapPropagator as _;
        let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&Headers(request.headers()));
        // A caller without a valid traceparent starts a trace of its own.
        let _ = span.set_parent(parent);
        span.record("otel.kind", "server");
        span.record("otel.name", request.method().as_str());
    }
    span
}

/// Names the current call's span after its method (`usher.v1.TokenService/GetJwks`)
/// and transport (`grpc`, or `http` through the REST shim), when spans are exported:
/// the span, to end with [`end_call`] (none when spans are not exported).
pub fn name_call(service: &str, method: &str, transport: &str) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::Span::current();
    // The OpenTelemetry span has started (it is entered): rename it directly.
    span.context()
        .span()
        .update_name(format!("{service}/{method}"));
    span.record("rpc.system", "grpc");
    span.record("rpc.service", service);
    span.record("rpc.method", method);
    span.record("usher.transport", transport);
    span
}

/// Records the gRPC code that ended the call of `span`. The codes that say the server
/// failed (as OpenTelemetry's gRPC conventions list them) mark the span as an error.
pub fn end_call(span: &tracing::Span, code: tonic::Code) {
    if !exporting() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    use tonic::Code::*;
    if matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    ) {
        span.record("otel.status_code", "error");
    }
}

#[cfg(test)]
mod tests {
    use super::trace_id;

    #[test]
    fn traceparents_are_read_strictly() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(good), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }
}
