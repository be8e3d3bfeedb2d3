//! `--otlp-endpoint`: the real binary exports its spans to an OTLP/gRPC trace receiver
//! this test starts itself (the `opentelemetry-proto` service definition, served by
//! tonic). A call's server span continues the caller's W3C trace, is named after its
//! method, carries its gRPC code, and has the store operations as children; probes make
//! no spans; and what is still queued at SIGTERM is exported before the process exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_stream::wrappers::TcpListenerStream;
use usher::proto;
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;

use crate::grpcurl::Usher;
use crate::support::{create_request, http_json};

/// One exported span, with the service name of its resource.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    attributes: HashMap<String, Any>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: Vec<KeyValue>) -> HashMap<String, Any> {
    list.into_iter()
        .filter_map(|kv| Some((kv.key, kv.value?.value?)))
        .collect()
}

/// The OTLP trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = attributes(
                resource_spans
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            let service = match resource.get("service.name") {
                Some(Any::StringValue(name)) => name.clone(),
                _ => String::new(),
            };
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push(Received {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(span.attributes),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a free loopback port: its `http://` address.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// The spans of `trace_id` once there are at least `count` of them (10 s at most).
    async fn trace(&self, trace_id: &str, count: usize) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let spans: Vec<Received> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            if spans.len() >= count {
                return spans;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{} span(s) of trace {trace_id}, expected {count}: {spans:#?}",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn all(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

/// The server span of a trace (the one the caller's parent id points at).
fn server_span<'a>(spans: &'a [Received], parent: &str) -> &'a Received {
    spans
        .iter()
        .find(|s| s.parent_span_id == parent)
        .unwrap_or_else(|| panic!("no span is a child of the caller's {parent}: {spans:#?}"))
}

fn traceparent(trace_id: &str, parent: &str) -> String {
    format!("00-{trace_id}-{parent}-01")
}

const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Waits for /readyz, so the first spans are not racing the store's first probe.
async fn ready(addr: std::net::SocketAddr) {
    let started = Instant::now();
    while http_json(addr, "GET", "/readyz", &[], "").await.status != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A usher exporting to `receiver` (started here) every `delay_ms`, once it is ready.
async fn exporting_to(receiver: &Receiver, delay_ms: &str) -> (Usher, std::net::SocketAddr) {
    let endpoint = receiver.start().await;
    let usher = Usher::start_with_env(
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", delay_ms)],
    );
    let addr: std::net::SocketAddr = usher.addr.parse().unwrap();
    ready(addr).await;
    (usher, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_in_the_callers_trace() {
    let receiver = Receiver::default();
    let (usher, addr) = exporting_to(&receiver, "100").await;

    // gRPC, in the caller's trace.
    let grpc_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut sessions = PlaybackSessionServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut create = tonic::Request::new(create_request("otlp-user", "tv-1"));
    create.metadata_mut().insert(
        "traceparent",
        traceparent(grpc_trace, CALLER_SPAN).parse().unwrap(),
    );
    let session = sessions
        .create_session(create)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let spans = receiver.trace(grpc_trace, 2).await;
    let call = server_span(&spans, CALLER_SPAN);
    assert_eq!(call.service, "usher");
    assert_eq!(call.name, "usher.v1.PlaybackSessionService/CreateSession");
    assert_eq!(call.kind, SpanKind::Server as i32);
    assert_eq!(
        call.attributes["rpc.system"],
        Any::StringValue("grpc".into())
    );
    assert_eq!(
        call.attributes["usher.transport"],
        Any::StringValue("grpc".into())
    );
    assert_eq!(call.attributes["rpc.grpc.status_code"], Any::IntValue(0));
    let store: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == call.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        store.contains(&"store.create_session"),
        "the store's work is a child of the call: {spans:#?}"
    );

    // REST through the shim: the same span, named after the method it reached.
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let answer = http_json(
        addr,
        "GET",
        &format!("/v1/{}", session.name),
        &[("traceparent", &traceparent(rest_trace, CALLER_SPAN))],
        "",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let spans = receiver.trace(rest_trace, 2).await;
    let call = server_span(&spans, CALLER_SPAN);
    assert_eq!(call.name, "usher.v1.PlaybackSessionService/GetSession");
    assert_eq!(
        call.attributes["usher.transport"],
        Any::StringValue("http".into())
    );
    assert!(spans.iter().any(|s| s.name == "store.get_session"));

    // A refusal carries its code; a caller without a traceparent starts its own trace.
    let missing = "b7ad6b7169203331b7ad6b7169203331";
    let mut get = tonic::Request::new(proto::GetSessionRequest {
        name: "users/otlp-user/sessions/no-such-session".into(),
    });
    get.metadata_mut().insert(
        "traceparent",
        traceparent(missing, CALLER_SPAN).parse().unwrap(),
    );
    let refused = sessions.get_session(get).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let spans = receiver.trace(missing, 1).await;
    assert_eq!(
        server_span(&spans, CALLER_SPAN).attributes["rpc.grpc.status_code"],
        Any::IntValue(tonic::Code::NotFound as i64)
    );
    let roots_before = receiver
        .all()
        .iter()
        .filter(|s| s.name.ends_with("/GetJwks"))
        .count();
    proto::token_service_client::TokenServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .get_jwks(proto::GetJwksRequest {})
        .await
        .unwrap();
    let started = Instant::now();
    let jwks = loop {
        let found: Vec<Received> = receiver
            .all()
            .into_iter()
            .filter(|s| s.name.ends_with("/GetJwks"))
            .collect();
        if found.len() > roots_before {
            break found.last().cloned().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no GetJwks span"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(jwks.parent_span_id.is_empty(), "{jwks:#?}");
    assert!(![grpc_trace, rest_trace, missing].contains(&jwks.trace_id.as_str()));

    // Probes and scrapes make no spans.
    for path in ["/healthz", "/readyz", "/metrics"] {
        http_json(addr, "GET", path, &[], "").await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let names: Vec<String> = receiver.all().into_iter().map(|s| s.name).collect();
    assert!(
        names
            .iter()
            .all(|n| n.contains('/') || n.starts_with("store.")),
        "{names:?}"
    );
    assert!(
        tokio::task::spawn_blocking(move || usher.terminate().success())
            .await
            .unwrap()
    );
}

/// With a batch delay far longer than the test, the spans of a call arrive only because
/// SIGTERM exports what is queued before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_queued_at_sigterm_are_exported_before_exit() {
    let receiver = Receiver::default();
    let (usher, addr) = exporting_to(&receiver, "600000").await;
    let trace = "5a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let answer = http_json(
        addr,
        "POST",
        "/v1/users/flush-user/sessions",
        &[("traceparent", &traceparent(trace, CALLER_SPAN))],
        r#"{"profileId":"p","contentId":"c","device":{"id":"d","type":"DEVICE_TYPE_TV"},
            "client":{"region":"DE"}}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        receiver.all().is_empty(),
        "nothing is sent before the delay"
    );
    assert!(
        tokio::task::spawn_blocking(move || usher.terminate().success())
            .await
            .unwrap()
    );
    let spans = receiver.trace(trace, 2).await;
    assert_eq!(
        server_span(&spans, CALLER_SPAN).name,
        "usher.v1.PlaybackSessionService/CreateSession"
    );
}

/// A malformed endpoint is refused at start, naming the flag.
#[test]
fn a_malformed_otlp_endpoint_is_refused_at_start() {
    for bad in ["127.0.0.1:4317", "https://collector:4317", "http://"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_usher"))
            .args(["serve", "--insecure-dev", "--listen", "127.0.0.1:0"])
            .args(["--otlp-endpoint", bad])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--otlp-endpoint"), "{bad}: {stderr}");
    }
}

/// A collector that accepts connections and never answers costs the calls nothing: spans
/// wait in the exporter's bounded queue, and SIGTERM still ends the process promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_collector_does_not_slow_the_calls() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let usher = Usher::start_with_env(
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "10")],
    );
    let addr: std::net::SocketAddr = usher.addr.parse().unwrap();
    ready(addr).await;
    let mut sessions = PlaybackSessionServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let started = Instant::now();
    for i in 0..200 {
        let mut get = tonic::Request::new(proto::GetSessionRequest {
            name: format!("users/silent/sessions/s{i}"),
        });
        get.metadata_mut().insert(
            "traceparent",
            traceparent("6e0c63257de34c926f9efcd03927272e", CALLER_SPAN)
                .parse()
                .unwrap(),
        );
        let refused = sessions.get_session(get).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "200 calls took {:?}",
        started.elapsed()
    );
    let stopping = Instant::now();
    assert!(
        tokio::task::spawn_blocking(move || usher.terminate().success())
            .await
            .unwrap()
    );
    assert!(stopping.elapsed() < Duration::from_secs(10));
    drop(silent);
}
