//! Assembling the application, once: the store, the entitlement provider, the token
//! keys and the credentials opened from the config, and the operations every transport
//! serves. Transports (gRPC today; the device stream and the HTTP shim next) are thin
//! adapters over [`App`]'s operations.

use std::sync::Arc;

use super::StartError;
use crate::auth::{Authenticator, Credentials};
use crate::concurrency::ConcurrencyOps;
use crate::config::{Config, StoreConfig};
use crate::entitlement::{EntitlementProvider, HttpEntitlements, StaticPolicy};
use crate::manifest::Origins;
use crate::progress::ProgressOps;
use crate::session::ops::{SessionPolicy, Sessions};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::streaming::Streams;
use crate::token::Tokens;
use crate::token::ops::TokenOps;

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
    let policy = policy?.with_missing_region(config.missing_region);
    Ok(match &config.entitlement_http {
        Some(settings) => Arc::new(
            HttpEntitlements::new(policy, settings.clone()).map_err(StartError::EntitlementHttp)?,
        ),
        None => Arc::new(policy),
    })
}

/// What the services run on, built from the config (tests build their own).
pub struct Components {
    pub store: Arc<dyn Store>,
    pub entitlements: Arc<dyn EntitlementProvider>,
    pub tokens: Arc<Tokens>,
    pub credentials: Credentials,
    /// The manifest origins, when usher signs manifest URLs.
    pub manifests: Option<Arc<Origins>>,
}

/// Opens everything the config names: entitlements, token keys, credentials, the store.
pub async fn open_components(config: &Config) -> Result<Components, StartError> {
    let entitlements = open_entitlements(config)?;
    let tokens = Arc::new(Tokens::load(config.tokens.clone())?);
    let credentials = match &config.credentials {
        Some(path) => Credentials::load(path)?,
        None => Credentials::default(),
    };
    let manifests = match &config.manifest_origins {
        Some(path) => Some(Arc::new(Origins::from_file(path, config.manifest_url_ttl)?)),
        None => None,
    };
    let store = open_store(config).await?;
    Ok(Components {
        manifests,
        store,
        entitlements,
        tokens,
        credentials,
    })
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

/// The assembled application: the operations and what they run on.
pub struct App {
    pub store: Arc<dyn Store>,
    pub tokens: Arc<Tokens>,
    pub authenticator: Arc<Authenticator>,
    pub sessions: Arc<Sessions>,
    pub concurrency: Arc<ConcurrencyOps>,
    pub token_ops: Arc<TokenOps>,
    pub streams: Arc<Streams>,
    pub progress: Arc<ProgressOps>,
}

impl App {
    /// Builds the operations over `components`, as `config` says.
    pub fn assemble(config: &Config, components: Components) -> App {
        let Components {
            store,
            entitlements,
            tokens,
            credentials,
            manifests,
        } = components;
        announce_auth(config, &credentials);
        // Every store call the operations make is timed (crate::observe).
        let store: Arc<dyn Store> = Arc::new(crate::store::metered::Metered(store));
        let sessions = Arc::new(
            Sessions::new(
                store.clone(),
                entitlements.clone(),
                tokens.clone(),
                SessionPolicy {
                    over_limit: config.over_limit_policy,
                    heartbeat_interval: config.heartbeat_interval,
                    heartbeat_timeout: config.store_settings.heartbeat_timeout,
                    resume: config.resume,
                    create_rate: config.create_rate,
                },
            )
            .with_manifests(manifests),
        );
        let concurrency = Arc::new(ConcurrencyOps::new(
            store.clone(),
            entitlements.clone(),
            config.over_limit_policy,
        ));
        let streams = Arc::new(Streams::new(
            sessions.clone(),
            store.clone(),
            tokens.clone(),
            config.streams.clone(),
        ));
        let token_ops =
            Arc::new(TokenOps::new(tokens.clone(), store.clone()).with_recheck(sessions.clone()));
        let progress = Arc::new(ProgressOps::new(store.clone(), config.resume));
        let authenticator = Arc::new(Authenticator::new(
            credentials,
            tokens.clone(),
            config.insecure_dev,
        ));
        App {
            store,
            tokens,
            authenticator,
            sessions,
            concurrency,
            token_ops,
            streams,
            progress,
        }
    }
}
