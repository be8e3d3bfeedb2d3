//! Prometheus metrics, named in one place. The recorder is process-wide (the `metrics`
//! facade); `GET /metrics` renders it. No label takes a user, session or device id:
//! every label value comes from a fixed set (method names from the descriptor set, gRPC
//! codes, end reasons, store operations).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `usher_rpc_requests_total` | counter | `service`, `method`, `code`, `transport` (`grpc` or `http`) |
//! | `usher_rpc_duration_seconds` | histogram | `service`, `method`, `transport` |
//! | `usher_sessions_created_total` | counter | |
//! | `usher_sessions_denied_total` | counter | `reason` (the refusal's ErrorInfo reason) |
//! | `usher_sessions_ended_total` | counter | `reason` (stored end reason), for ends this instance caused |
//! | `usher_store_call_duration_seconds` | histogram | `operation` |
//! | `usher_store_errors_total` | counter | `operation`, `kind` |
//! | `usher_token_validations_total` | counter | `result` (`valid` or the refusal reason), `cache` (`hit` or `miss`) |
//! | `usher_sweeper_runs_total` | counter | |
//! | `usher_sweeper_expired_total` | counter | |
//! | `usher_streams_open` | gauge | |
//! | `usher_runtime_tasks` | gauge | | tokio tasks alive (read at each scrape) |
//! | `usher_connections_closed_total` | counter | `reason`: `over_limit`, `handshake_timeout`, `tls_failed`, `control_frame_flood` |
//! | `usher_seats_in_use` | gauge | | (every user's, from the store, about every 16 s)
//! | `usher_stop_propagation_seconds` | histogram | `path` (how the stop reached the stream) |
//! | `usher_relay_delivered_total` | counter | `group` (the sink's consumer group) |
//! | `usher_relay_failed_total` | counter | `group`: events of batches the sink refused |
//! | `usher_relay_lag_events` | gauge | `group`: events not acknowledged, all partitions |
//! | `usher_relay_lag_max_partition_events` | gauge | `group`: the same, the partition furthest behind |

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets, seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often recorded histogram samples are folded into their buckets when nobody
/// scrapes (the exporter keeps them until then).
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder, once; later calls (more servers in one process,
/// as in the tests) share it. With `listen`, the exporter also serves `GET /metrics` on
/// that address (`--metrics-listen`). `None` if another recorder was installed first or
/// the listener cannot be made. Call from inside the runtime.
pub fn install(listen: Option<std::net::SocketAddr>) -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            let recorder = match listen {
                Some(addr) => {
                    let (recorder, exporter) = builder.with_http_listener(addr).build().ok()?;
                    // This listener renders without `render`: the task gauge is kept
                    // fresh here.
                    tokio::spawn(async move {
                        loop {
                            runtime_tasks();
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    });
                    tokio::spawn(async move {
                        if let Err(error) = exporter.await {
                            tracing::error!(?error, "the metrics listener stopped");
                        }
                    });
                    recorder
                }
                None => {
                    let recorder = builder.build_recorder();
                    let upkeep = recorder.handle();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(UPKEEP).await;
                            upkeep.run_upkeep();
                        }
                    });
                    recorder
                }
            };
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

/// The runtime's alive tasks, as a gauge (a task leak shows as growth).
fn runtime_tasks() {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        metrics::gauge!("usher_runtime_tasks").set(runtime.metrics().num_alive_tasks() as f64);
    }
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    runtime_tasks();
    HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

pub fn rpc(
    service: &'static str,
    method: &'static str,
    code: tonic::Code,
    transport: &'static str,
    seconds: f64,
) {
    let code = code_name(code);
    metrics::counter!("usher_rpc_requests_total", "service" => service, "method" => method, "code" => code, "transport" => transport).increment(1);
    metrics::histogram!("usher_rpc_duration_seconds", "service" => service, "method" => method, "transport" => transport).record(seconds);
}

pub fn session_created() {
    metrics::counter!("usher_sessions_created_total").increment(1);
}

pub fn session_denied(reason: &'static str) {
    metrics::counter!("usher_sessions_denied_total", "reason" => reason).increment(1);
}

pub fn sessions_ended(reason: &'static str, count: u64) {
    metrics::counter!("usher_sessions_ended_total", "reason" => reason).increment(count);
}

pub fn store_call(operation: &'static str, seconds: f64, error: Option<&'static str>) {
    metrics::histogram!("usher_store_call_duration_seconds", "operation" => operation)
        .record(seconds);
    if let Some(kind) = error {
        metrics::counter!("usher_store_errors_total", "operation" => operation, "kind" => kind)
            .increment(1);
    }
}

pub fn token_validation(result: &'static str, cache_hit: bool) {
    let cache = if cache_hit { "hit" } else { "miss" };
    metrics::counter!("usher_token_validations_total", "result" => result, "cache" => cache)
        .increment(1);
}

pub fn sweep(expired: u64) {
    metrics::counter!("usher_sweeper_runs_total").increment(1);
    metrics::counter!("usher_sweeper_expired_total").increment(expired);
}

pub fn seats_in_use(count: u64) {
    metrics::gauge!("usher_seats_in_use").set(count as f64);
}

/// A connection the accept loop closed (or refused) for `reason`.
pub fn connection_closed(reason: &'static str) {
    metrics::counter!("usher_connections_closed_total", "reason" => reason).increment(1);
}

pub fn streams_open(delta: f64) {
    metrics::gauge!("usher_streams_open").increment(delta);
}

pub fn relay_delivered(group: &str, count: usize) {
    metrics::counter!("usher_relay_delivered_total", "group" => group.to_owned())
        .increment(count as u64);
}

pub fn relay_lag(group: &str, total: u64, worst_partition: u64) {
    metrics::gauge!("usher_relay_lag_events", "group" => group.to_owned()).set(total as f64);
    metrics::gauge!("usher_relay_lag_max_partition_events", "group" => group.to_owned())
        .set(worst_partition as f64);
}

pub fn relay_failed(group: &str, count: usize) {
    metrics::counter!("usher_relay_failed_total", "group" => group.to_owned())
        .increment(count as u64);
}

/// Where an entitlement service's answer came from: `hit`, `miss`, `stale`, or
/// `unavailable`.
pub fn entitlement_answer(service: &'static str, source: &'static str) {
    metrics::counter!("usher_entitlement_answers_total", "service" => service, "source" => source)
        .increment(1);
}

/// One HTTP attempt at an entitlement service: `ok`, `error`, or `refused` by its open
/// circuit breaker.
pub fn entitlement_upstream(service: &'static str, outcome: &'static str) {
    metrics::counter!("usher_entitlement_upstream_calls_total", "service" => service, "outcome" => outcome)
        .increment(1);
}

pub fn entitlement_latency(service: &'static str, seconds: f64) {
    metrics::histogram!("usher_entitlement_upstream_duration_seconds", "service" => service)
        .record(seconds);
}

/// 0 closed, 1 open, 2 half-open.
pub fn entitlement_breaker(service: &'static str, position: u8) {
    metrics::gauge!("usher_entitlement_breaker_state", "service" => service).set(position as f64);
}

/// A live session's entitlement checked again: `kept`, `lost`, or `unknown` (the
/// provider could not answer; the session is kept).
pub fn entitlement_recheck(outcome: &'static str) {
    metrics::counter!("usher_entitlement_rechecks_total", "outcome" => outcome).increment(1);
}

/// A service's request refused for its credential's rate limit.
pub fn service_rate_limited(service: &str) {
    metrics::counter!("usher_service_rate_limited_total", "service" => service.to_owned())
        .increment(1);
}

pub fn stop_propagation(path: &'static str, seconds: f64) {
    metrics::histogram!("usher_stop_propagation_seconds", "path" => path).record(seconds);
}

/// A gRPC code's name, as Prometheus label values usually are.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
