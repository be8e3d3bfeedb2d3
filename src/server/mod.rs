//! Runs usher: the application assembled once (`app`), the background tasks (`tasks`:
//! the store probe, the sweeper, SIGHUP), and the transports over the same operations
//! (`grpc`, with its request `layers`; connections come through `crate::net`), until a
//! signal drains and stops them.

mod app;
mod grpc;
mod http;
mod layers;
mod metered;
mod rest;
mod tasks;

pub use app::{App, Components, open_components, open_entitlements, open_store};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::net::{ConnectionLimits, ConnectionStats};
use crate::store::StoreError;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("entitlements: {0}")]
    Entitlements(#[from] crate::entitlement::PolicyError),
    #[error("entitlements over HTTP: {0}")]
    EntitlementHttp(String),
    #[error("token keys: {0}")]
    Tokens(#[from] crate::token::keys::KeyError),
    #[error("credentials: {0}")]
    Credentials(#[from] crate::auth::CredentialsError),
    #[error("--manifest-origins: {0}")]
    Manifests(#[from] crate::manifest::OriginError),
    #[error("tls: cannot read {}: {source}", path.display())]
    Tls {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    TlsConfig(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task stopped: {0}")]
    Stopped(String),
    #[error("--metrics-listen {0}: cannot serve metrics there (address in use?)")]
    Metrics(SocketAddr),
    #[error("--relay: {0}")]
    Relay(#[from] crate::relay::SinkError),
}

/// A server running in the background.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The accept loop's counters.
    pub connections: Arc<ConnectionStats>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// Drains and stops the server, and waits until it has.
    pub async fn shutdown(self) -> Result<(), StartError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(result) => result.map_err(StartError::Transport),
            Err(join) => Err(StartError::Stopped(join.to_string())),
        }
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|source| StartError::Tls {
        path: path.to_owned(),
        source,
    })
}

/// Starts serving on `listener`; returns once the server accepts calls.
pub async fn start(
    config: &Config,
    components: Components,
    listener: TcpListener,
) -> Result<RunningServer, StartError> {
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    // The first server of a process installs the recorder (and the metrics listener).
    if crate::observe::install(config.metrics_listen).is_none()
        && let Some(addr) = config.metrics_listen
    {
        return Err(StartError::Metrics(addr));
    }
    let app = App::assemble(config, components);
    let (shutdown, stop) = watch::channel(false);
    let (readiness, probe) = tasks::spawn_store_probe(app.store.clone(), stop.clone());
    let sweeper = tasks::spawn_sweeper(app.store.clone(), config.sweep_interval, stop.clone());
    let hangup = tasks::spawn_hangup_handler(
        app.tokens.clone(),
        app.authenticator.clone(),
        config.credentials.clone(),
    );
    let feed = app.store.ended_sessions().await?;
    let fanout = tokio::spawn(app.streams.clone().run_fanout(feed));
    let mut background: Vec<_> = [
        Some(probe),
        Some(sweeper),
        Some(fanout),
        app.tokens.spawn_reloader(),
        hangup,
    ]
    .into_iter()
    .flatten()
    .collect();
    for url in &config.relay.sinks {
        let sink = crate::relay::connect_sink(url, &config.relay.source).await?;
        let settings = crate::relay::RelaySettings {
            claim_after: config.relay.claim_after,
            ..crate::relay::RelaySettings::default()
        };
        tracing::info!(sink = %crate::relay::redacted(url), "relaying events");
        background.push(crate::relay::spawn(
            app.store.clone(),
            sink,
            settings,
            stop.clone(),
        ));
    }
    let connections = Arc::new(ConnectionStats::default());
    let tls = match &config.tls {
        Some(files) => {
            let client_ca = files.client_ca.as_deref().map(read).transpose()?;
            let acceptor = crate::net::tls_acceptor(
                &read(&files.cert)?,
                &read(&files.key)?,
                client_ca.as_deref(),
            )
            .map_err(StartError::TlsConfig)?;
            Some(acceptor)
        }
        None => None,
    };
    let incoming = crate::net::accept(
        listener,
        ConnectionLimits {
            max_connections: config.limits.max_connections,
            handshake_timeout: config.limits.handshake_timeout,
            control_frames: config.limits.http2_control_frames,
            tls,
        },
        connections.clone(),
    );
    let task = grpc::serve(config, &app, incoming, readiness, stop, background)?;
    tracing::info!(%addr, tls = config.tls.is_some(), "usher listening");
    Ok(RunningServer {
        addr,
        connections,
        shutdown,
        task,
    })
}

/// Runs `usher serve` until `signal` resolves, then drains and stops.
pub async fn serve(config: Config, signal: impl Future<Output = ()>) -> Result<(), StartError> {
    let components = open_components(&config).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let mut running = start(&config, components, listener).await?;
    // The server should only stop when told to; if it stops by itself, say why.
    tokio::select! {
        () = signal => {}
        ended = &mut running.task => {
            return Err(match ended {
                Ok(Ok(())) => StartError::Stopped("the server stopped by itself".into()),
                Ok(Err(error)) => StartError::Transport(error),
                Err(join) => StartError::Stopped(join.to_string()),
            });
        }
    }
    tracing::info!("shutdown signal received");
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when it is first polled: call it before listening, so a SIGTERM that arrives while
/// the server starts (a supervisor stopping it at once) drains instead of killing.
/// `usher relay`: the relays of `config.relay.sinks` alone, no server, until `signal`.
/// With `status`, prints where each sink's group stands instead (one JSON line each)
/// and returns.
pub async fn relay(
    config: Config,
    status: bool,
    signal: impl Future<Output = ()>,
) -> Result<(), StartError> {
    if config.relay.sinks.is_empty() {
        return Err(StartError::Relay(crate::relay::SinkError(
            "name at least one sink (nats://... or postgres://...)".into(),
        )));
    }
    let store = app::open_store(&config).await?;
    let mut sinks = Vec::new();
    for url in &config.relay.sinks {
        sinks.push(crate::relay::connect_sink(url, &config.relay.source).await?);
    }
    if status {
        for sink in &sinks {
            let lags = crate::relay::lags(&*store, sink.group()).await?;
            let behind: serde_json::Map<String, serde_json::Value> = lags
                .iter()
                .enumerate()
                .filter(|(_, lag)| lag.behind() > 0)
                .map(|(partition, lag)| {
                    (
                        partition.to_string(),
                        serde_json::json!({"pending": lag.pending, "unread": lag.unread}),
                    )
                })
                .collect();
            let total: u64 = lags.iter().map(|lag| lag.behind()).sum();
            let worst = lags.iter().map(|lag| lag.behind()).max().unwrap_or(0);
            println!(
                "{}",
                serde_json::json!({
                    "group": sink.group(),
                    "behind": total,
                    "worst_partition_behind": worst,
                    "log_cap": store.settings().event_stream_maxlen,
                    "partitions_behind": behind,
                })
            );
        }
        return Ok(());
    }
    let (stop, stopped) = watch::channel(false);
    let relays: Vec<_> = sinks
        .into_iter()
        .map(|sink| {
            let settings = crate::relay::RelaySettings {
                claim_after: config.relay.claim_after,
                ..crate::relay::RelaySettings::default()
            };
            crate::relay::spawn(store.clone(), sink, settings, stopped.clone())
        })
        .collect();
    tracing::info!(sinks = relays.len(), "usher relay running");
    signal.await;
    let _ = stop.send(true);
    for relay in relays {
        let _ = relay.await;
    }
    tracing::info!("usher relay stopped");
    Ok(())
}

pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Asks `args.addr` for its health; returns the status name (`SERVING`, `NOT_SERVING`…).
pub async fn check_health(args: &crate::config::HealthArgs) -> Result<String, String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", args.addr))
        .map_err(|e| e.to_string())?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if let Some(ca) = &args.tls_ca {
        let ca = read(ca).map_err(|e| e.to_string())?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(args.tls_domain.clone());
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|status| format!("{}: {}", status.code(), status.message()))?;
    Ok(response.into_inner().status().as_str_name().to_owned())
}
