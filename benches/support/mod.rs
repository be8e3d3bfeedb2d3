//! What the benchmarks share beyond the tests' Redis helpers.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use usher::config::Config;
use usher::entitlement::EntitlementProvider;
use usher::server::{Components, RunningServer};
use usher::store::memory::MemoryStore;
use usher::store::redis::{RedisOptions, RedisStore, RedisTarget};
use usher::store::{Store, StoreSettings};
use usher::token::keys::KeyRing;
use usher::token::{TokenSettings, Tokens};

/// Runs a benchmark's `run` on a multi-threaded runtime (nothing for `--list`, which
/// `cargo test --benches` asks: there are no tests).
pub fn block_on(run: impl std::future::Future<Output = ()>) {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run);
}

/// Whether the command line asks for `part`: `cargo bench --bench NAME -- part ...`
/// runs the parts named, and all of them when none is.
pub fn wanted(part: &str) -> bool {
    let mut named = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .peekable();
    named.peek().is_none() || named.any(|n| n == part)
}

/// A Redis store on `url` under `prefix`.
pub async fn redis_store(url: String, prefix: &str, settings: StoreSettings) -> Arc<dyn Store> {
    let options = RedisOptions {
        target: RedisTarget::Single { url },
        key_prefix: prefix.to_owned(),
        timeout: Duration::from_secs(2),
        allow_eviction: false,
        resubscribe_interval: usher::store::redis::RESUBSCRIBE_INTERVAL,
    };
    Arc::new(RedisStore::connect(options, settings).await.unwrap())
}

/// CPU seconds a process has used (user + system), from /proc; 0 when it does not tell.
pub fn cpu_seconds(pid: u32) -> f64 {
    usher::bench::cpu_seconds(pid).unwrap_or(0.0)
}

/// A CreateSession request of `user` on `device` (a TV in the US).
pub fn create_request(user: &str, device: &str) -> usher::proto::CreateSessionRequest {
    usher::bench::create_request(user, device)
}

/// A development-mode server on loopback over the memory store, with an ephemeral key
/// and `entitlements`, and a channel to it.
pub async fn serve_memory(entitlements: Arc<dyn EntitlementProvider>) -> (RunningServer, Channel) {
    let mut config = Config::defaults();
    config.insecure_dev = true;
    config.limits.drain_delay = Duration::ZERO;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let components = Components {
        store: Arc::new(MemoryStore::new(StoreSettings::default())),
        entitlements,
        tokens: Arc::new(Tokens::new(
            TokenSettings::default(),
            KeyRing::ephemeral().unwrap(),
        )),
        credentials: Default::default(),
        manifests: None,
    };
    let server = usher::server::start(&config, components, listener)
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, channel)
}
