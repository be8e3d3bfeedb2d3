//! The gRPC transport (and, on the same listener, the plain HTTP routes of `http.rs`):
//! the four services over the [`App`]'s operations, health
//! (per service, following the store's readiness, NOT_SERVING while draining),
//! reflection v1 and v1alpha, the transport limits and request layers, and TLS.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::app::App;
use super::{StartError, layers};
use crate::auth::layer::AuthLayer;
use crate::concurrency::grpc::ConcurrencyGrpc;
use crate::config::Config;
use crate::events::EventOps;
use crate::events::grpc::EventGrpc;
use crate::net::Incoming;
use crate::progress::grpc::ProgressGrpc;
use crate::proto::concurrency_service_server::ConcurrencyServiceServer;
use crate::proto::event_service_server::EventServiceServer;
use crate::proto::playback_session_service_server::PlaybackSessionServiceServer;
use crate::proto::progress_service_server::ProgressServiceServer;
use crate::proto::streaming_service_server::StreamingServiceServer;
use crate::proto::token_service_server::TokenServiceServer;
use crate::session::grpc::SessionGrpc;
use crate::streaming::grpc::StreamingGrpc;
use crate::token::grpc::TokenGrpc;

/// Sets the health of the server and of each service.
async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <PlaybackSessionServiceServer<SessionGrpc> as NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <ConcurrencyServiceServer<ConcurrencyGrpc> as NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <TokenServiceServer<TokenGrpc> as NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <StreamingServiceServer<StreamingGrpc> as NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <ProgressServiceServer<ProgressGrpc> as NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <EventServiceServer<EventGrpc> as NamedService>::NAME,
            status,
        )
        .await;
}

/// Follows the store's readiness into gRPC health until stopped.
fn spawn_health_follower(
    health: HealthReporter,
    mut readiness: watch::Receiver<Option<bool>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ready = *readiness.borrow_and_update();
            if let Some(ready) = ready {
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                set_all(&health, status).await;
            }
            if readiness.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Serves gRPC on `incoming` until `stop` turns true: then NOT_SERVING for the drain
/// delay, the listener closes, and calls in flight get the shutdown timeout. The
/// `background` tasks are stopped when the drain begins.
pub(super) fn serve(
    config: &Config,
    app: &App,
    incoming: Incoming,
    readiness: watch::Receiver<Option<bool>>,
    stop: watch::Receiver<bool>,
    background: Vec<JoinHandle<()>>,
) -> Result<JoinHandle<Result<(), tonic::transport::Error>>, StartError> {
    let limits = config.limits.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    let plain_http = super::http::HttpLayer::new(super::http::HttpState {
        tokens: app.tokens.clone(),
        readiness: readiness.clone(),
        stopping: stop.clone(),
        rest: Arc::new(super::http::Rest::new(limits.max_message_size)),
        cors_origins: Arc::new(config.cors_origins.clone()),
        serve_metrics: config.metrics_listen.is_none(),
    });
    let follower = spawn_health_follower(health.clone(), readiness);
    // Both reflection versions: grpcurl 1.8.6 speaks only v1alpha. The google.rpc
    // descriptors let grpcurl render ErrorInfo and BadRequest details.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let size = limits.max_message_size;
    let session_service = PlaybackSessionServiceServer::new(SessionGrpc::new(app.sessions.clone()))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);
    let concurrency_service =
        ConcurrencyServiceServer::new(ConcurrencyGrpc::new(app.concurrency.clone()))
            .max_decoding_message_size(size)
            .max_encoding_message_size(size);
    let token_service = TokenServiceServer::new(TokenGrpc::new(app.token_ops.clone()))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);
    let progress_service = ProgressServiceServer::new(ProgressGrpc::new(app.progress.clone()))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);
    let streaming_service = StreamingServiceServer::new(StreamingGrpc::new(app.streams.clone()))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);
    let events = Arc::new(EventOps::new(app.store.clone(), stop.clone()));
    let event_service = EventServiceServer::new(EventGrpc::new(events))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);

    let mut drained = stop.clone();
    let drain_health = health.clone();
    let drain_delay = limits.drain_delay;
    let streams = app.streams.clone();
    let drain = async move {
        let _ = drained.wait_for(|stopping| *stopping).await;
        // The follower must be gone before NOT_SERVING is set, or it could overwrite it.
        follower.abort();
        let _ = follower.await;
        for task in background {
            task.abort();
        }
        set_all(&drain_health, ServingStatus::NotServing).await;
        tracing::info!(delay = ?drain_delay, "draining: reporting NOT_SERVING");
        // Devices reconnect elsewhere; their sessions and seats go on there.
        streams.drain();
        tokio::time::sleep(drain_delay).await;
        tracing::info!("closing the listener");
    };

    // TLS, when configured, is terminated by the accept loop (crate::net).
    let router = Server::builder()
        // HTTP/1.1 too, for the plain HTTP routes (curl, load balancers' probes).
        .accept_http1(true)
        // Every log line inside a call names the call (and the caller's W3C trace).
        .trace_fn(crate::telemetry::call_span)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .http2_max_pending_accept_reset_streams(Some(limits.http2_max_pending_resets))
        .http2_max_local_error_reset_streams(Some(limits.http2_max_error_resets))
        .http2_max_header_list_size(limits.http2_max_header_list_size)
        .layer(layers::StatusDetailsLayer)
        .layer(layers::ConnectionLayer::new(
            limits.max_health_watches,
            limits.max_health_watches_per_connection,
        ))
        // Inside the connection layer (an HTTP request ends the handshake deadline too),
        // outside deadlines and authentication (its routes are public).
        .layer(plain_http)
        // Inside the HTTP layer: gRPC calls and the REST shim's calls are both counted.
        .layer(super::metered::MeteredLayer::new())
        .layer(crate::deadline::DeadlineLayer::new(limits.request_timeout))
        .layer(AuthLayer::new(Arc::clone(&app.authenticator)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(session_service)
        .add_service(concurrency_service)
        .add_service(token_service)
        .add_service(streaming_service)
        .add_service(progress_service)
        .add_service(event_service);
    let shutdown_timeout = limits.shutdown_timeout;
    Ok(tokio::spawn(async move {
        let serving = router.serve_with_incoming_shutdown(incoming, drain);
        tokio::pin!(serving);
        // Calls in flight get shutdown_timeout after the drain; then the server stops.
        let mut stopping = stop;
        tokio::select! {
            result = &mut serving => return result,
            _ = stopping.wait_for(|stopping| *stopping) => {}
        }
        match tokio::time::timeout(drain_delay + shutdown_timeout, &mut serving).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("calls still in flight at the shutdown timeout: stopping anyway");
                Ok(())
            }
        }
    }))
}
