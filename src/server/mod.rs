//! Assembles and runs the gRPC server: the services, health (per service, NOT_SERVING
//! while the store is unreachable or refuses writes, and while draining), reflection v1
//! and v1alpha, the transport limits (connections through `crate::net`, request layers in
//! `layers`), the background sweeper, SIGHUP reloads, and graceful shutdown.

mod layers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::layer::AuthLayer;
use crate::auth::{Authenticator, Credentials};
use crate::concurrency::ConcurrencyOps;
use crate::concurrency::grpc::ConcurrencyGrpc;
use crate::config::{Config, StoreConfig};
use crate::entitlement::{EntitlementProvider, StaticPolicy};
use crate::net::{ConnectionLimits, ConnectionStats};
use crate::proto::concurrency_service_server::ConcurrencyServiceServer;
use crate::proto::playback_session_service_server::PlaybackSessionServiceServer;
use crate::proto::token_service_server::TokenServiceServer;
use crate::session::grpc::SessionGrpc;
use crate::session::ops::{SessionPolicy, Sessions};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::token::Tokens;
use crate::token::grpc::TokenGrpc;
use crate::token::ops::TokenOps;

/// How many sessions one sweep of one partition expires at most.
const SWEEP_BATCH: u32 = 500;
/// How often the store is pinged for the health status.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("entitlements: {0}")]
    Entitlements(String),
    #[error("token keys: {0}")]
    Tokens(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("tls: {0}")]
    Tls(String),
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
}

/// Builds the configured store.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &config.store {
        StoreConfig::Memory => Arc::new(
            MemoryStore::new(config.store_settings.clone()).with_limits(config.memory_limits),
        ),
        StoreConfig::Redis(options) => {
            Arc::new(RedisStore::connect(options.clone(), config.store_settings.clone()).await?)
        }
    })
}

/// Builds the configured entitlement provider.
pub fn open_entitlements(config: &Config) -> Result<Arc<dyn EntitlementProvider>, StartError> {
    let policy = match &config.entitlements {
        Some(path) => StaticPolicy::load(path, config.default_seat_limit),
        None => StaticPolicy::open(config.default_seat_limit.unwrap_or(2)),
    };
    let policy = policy
        .map_err(StartError::Entitlements)?
        .with_missing_region(config.missing_region);
    Ok(Arc::new(policy))
}

/// What the services run on, built from the config (tests build their own).
pub struct Components {
    pub store: Arc<dyn Store>,
    pub entitlements: Arc<dyn EntitlementProvider>,
    pub tokens: Arc<Tokens>,
    pub credentials: Credentials,
}

/// Opens everything the config names: entitlements, token keys, credentials, the store.
pub async fn open_components(config: &Config) -> Result<Components, StartError> {
    let entitlements = open_entitlements(config)?;
    let tokens = Arc::new(Tokens::load(config.tokens.clone()).map_err(StartError::Tokens)?);
    let credentials = match &config.credentials {
        Some(path) => Credentials::load(path).map_err(StartError::Credentials)?,
        None => Credentials::default(),
    };
    let store = open_store(config).await?;
    Ok(Components {
        store,
        entitlements,
        tokens,
        credentials,
    })
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|e| StartError::Tls(format!("cannot read {}: {e}", path.display())))
}

fn tls_config(
    files: &crate::config::TlsFiles,
) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        // Optional: callers without a certificate may still use a bearer key.
        tls = tls
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(true);
    }
    Ok(tls)
}

/// Says loudly what the authentication settings allow.
fn announce_auth(config: &Config, credentials: &Credentials) {
    if config.insecure_dev {
        tracing::warn!(
            listen = %config.listen,
            "INSECURE DEVELOPMENT MODE: calls without credentials are allowed, internal calls \
             act as admin and device calls need no playback token; never use this in production"
        );
    } else if credentials.is_empty() {
        tracing::warn!(
            "no service credentials configured (--credentials): every internal call will be \
             refused with UNAUTHENTICATED; device calls still work with their playback token"
        );
    }
}

/// Reloads what can be reloaded on SIGHUP: the token key set (when it comes from a file)
/// and the service credentials (when `--credentials` names a file). A failed reload
/// keeps what is in force. SIGHUP never stops the process: the handler is installed
/// before the server listens, whatever the configuration, so the signal's default
/// action (terminate) never applies.
fn spawn_hangup_handler(
    tokens: Arc<Tokens>,
    authenticator: Arc<Authenticator>,
    credentials_file: Option<std::path::PathBuf>,
) -> Option<JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: keys reload on file changes only");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                if tokens.reloadable() {
                    match tokens.reload() {
                        Ok(()) => {}
                        Err(error) => tracing::error!(
                            %error,
                            "token keys not reloaded: the keys in force stay"
                        ),
                    }
                } else {
                    tracing::info!("token keys are ephemeral (no --token-keys): nothing to reload");
                }
                if let Some(path) = &credentials_file {
                    match Credentials::load(path) {
                        Ok(credentials) => {
                            authenticator.replace_credentials(credentials);
                            tracing::info!(file = %path.display(), "credentials reloaded");
                        }
                        Err(error) => tracing::error!(
                            %error,
                            "credentials not reloaded: the credentials in force stay"
                        ),
                    }
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = (tokens, authenticator, credentials_file);
        None
    }
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
}

/// Pings the store and reports SERVING only while it answers.
fn spawn_health_probe(
    store: Arc<dyn Store>,
    health: HealthReporter,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let status = match store.ping().await {
                Ok(()) => ServingStatus::Serving,
                Err(error) => {
                    tracing::warn!(%error, "store ping failed");
                    ServingStatus::NotServing
                }
            };
            if last != Some(status) {
                set_all(&health, status).await;
                last = Some(status);
            }
            tokio::select! {
                _ = tokio::time::sleep(HEALTH_PROBE_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

/// Expires overdue sessions of every partition, so their seats and events do not wait for
/// the user's next create. A partition that fails is logged and the others are swept all
/// the same; a partition with more than a batch overdue is swept again within the tick,
/// which ends at the next tick's time at the latest.
fn spawn_sweeper(
    store: Arc<dyn Store>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let partitions = store.settings().partitions;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let budget = tokio::time::Instant::now() + every;
            for partition in 0..partitions {
                sweep_partition(store.as_ref(), partition, budget).await;
            }
        }
    })
}

/// Sweeps one partition until it has nothing overdue, fails, or the budget is spent.
async fn sweep_partition(store: &dyn Store, partition: u32, budget: tokio::time::Instant) {
    loop {
        match store.sweep(partition, SWEEP_BATCH).await {
            Ok(0) => return,
            Ok(expired) => {
                tracing::info!(partition, expired, "expired sessions swept");
                if expired < SWEEP_BATCH || tokio::time::Instant::now() >= budget {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(partition, %error, "sweep failed");
                return;
            }
        }
    }
}

/// Starts serving on `listener`; returns once the server accepts calls.
pub async fn start(
    config: &Config,
    components: Components,
    listener: TcpListener,
) -> Result<RunningServer, StartError> {
    let Components {
        store,
        entitlements,
        tokens,
        credentials,
    } = components;
    announce_auth(config, &credentials);
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let limits = config.limits.clone();
    let sessions = Arc::new(Sessions::new(
        store.clone(),
        entitlements.clone(),
        tokens.clone(),
        SessionPolicy {
            over_limit: config.over_limit_policy,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.store_settings.heartbeat_timeout,
        },
    ));
    let concurrency = Arc::new(ConcurrencyOps::new(
        store.clone(),
        entitlements,
        config.over_limit_policy,
    ));
    let token_ops = Arc::new(TokenOps::new(tokens.clone(), store.clone()));
    let authenticator = Arc::new(Authenticator::new(
        credentials,
        tokens.clone(),
        config.insecure_dev,
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
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
    let session_service = PlaybackSessionServiceServer::new(SessionGrpc::new(sessions))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);
    let concurrency_service = ConcurrencyServiceServer::new(ConcurrencyGrpc::new(concurrency))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);
    let token_service = TokenServiceServer::new(TokenGrpc::new(token_ops))
        .max_decoding_message_size(size)
        .max_encoding_message_size(size);

    let (shutdown, stop) = watch::channel(false);
    let probe = spawn_health_probe(store.clone(), health.clone(), stop.clone());
    let sweeper = spawn_sweeper(store, config.sweep_interval, stop.clone());
    let reloader = tokens.spawn_reloader();
    let hangup = spawn_hangup_handler(
        tokens.clone(),
        authenticator.clone(),
        config.credentials.clone(),
    );

    let mut drained = stop.clone();
    let drain_health = health.clone();
    let drain = async move {
        let _ = drained.wait_for(|stopping| *stopping).await;
        // The probe must be gone before NOT_SERVING is set, or it could overwrite it.
        probe.abort();
        let _ = probe.await;
        sweeper.abort();
        for task in [reloader, hangup].into_iter().flatten() {
            task.abort();
        }
        set_all(&drain_health, ServingStatus::NotServing).await;
        tracing::info!(delay = ?limits.drain_delay, "draining: reporting NOT_SERVING");
        tokio::time::sleep(limits.drain_delay).await;
        tracing::info!("closing the listener");
    };

    let mut builder = Server::builder();
    if let Some(files) = &config.tls {
        builder = builder.tls_config(tls_config(files)?)?;
    }
    let router = builder
        // Every log line inside a call names the call.
        .trace_fn(|request| tracing::info_span!("call", method = %request.uri().path()))
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .layer(layers::StatusDetailsLayer)
        .layer(layers::ConnectionLayer::new(
            limits.max_health_watches,
            limits.max_health_watches_per_connection,
        ))
        .layer(crate::deadline::DeadlineLayer::new(limits.request_timeout))
        .layer(AuthLayer::new(authenticator))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(session_service)
        .add_service(concurrency_service)
        .add_service(token_service);
    let connections = Arc::new(ConnectionStats::default());
    let incoming = crate::net::accept(
        listener,
        ConnectionLimits {
            max_connections: limits.max_connections,
            handshake_timeout: limits.handshake_timeout,
        },
        connections.clone(),
    );
    let shutdown_timeout = limits.shutdown_timeout;
    let task = tokio::spawn(async move {
        let serving = router.serve_with_incoming_shutdown(incoming, drain);
        tokio::pin!(serving);
        // Calls in flight get shutdown_timeout after the drain; then the server stops.
        let mut stopping = stop;
        tokio::select! {
            result = &mut serving => return result,
            _ = stopping.wait_for(|stopping| *stopping) => {}
        }
        match tokio::time::timeout(limits.drain_delay + shutdown_timeout, &mut serving).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("calls still in flight at the shutdown timeout: stopping anyway");
                Ok(())
            }
        }
    });
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

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
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
