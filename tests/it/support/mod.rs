//! What the tests share: stores to run against, a real server on port 0 with its clients,
//! and decoding of error details.

pub mod nats;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use usher::auth::Credentials;
use usher::config::Config;
use usher::deadline::Deadline;
use usher::entitlement::{EntitlementProvider, StaticPolicy};
use usher::ids::{ContentId, DeviceId, ProfileId, SessionId, SessionName, UserId};
use usher::proto;
use usher::proto::concurrency_service_client::ConcurrencyServiceClient;
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;
use usher::server::{Components, RunningServer};
use usher::session::{ClientInfo, Device, DeviceType, Session};
use usher::store::memory::{ManualClock, MemoryStore};
use usher::store::redis::{RedisOptions, RedisStore, RedisTarget};
use usher::store::{
    DeviceCall, Event, EventKind, NewSession, OverLimitPolicy, Store, StoreError, StoreSettings,
};
use usher::token::keys::KeyRing;
use usher::token::{TokenSettings, Tokens};

/// The stores every conformance case runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Redis,
    Cluster,
}

/// A new Ed25519 token key set written to `dir/keys.json`, for `--token-keys`.
pub fn key_set_file(dir: &std::path::Path) -> std::path::PathBuf {
    let keys = dir.join("keys.json");
    usher::token::keys::KeySet::generate(usher::token::keys::KeyAlgorithm::Eddsa)
        .unwrap()
        .write(&keys)
        .unwrap();
    keys
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A store under test, with a way to move its time and to look at its keys.
pub struct Backend {
    pub kind: Kind,
    pub store: Arc<dyn Store>,
    clock: Option<Arc<ManualClock>>,
    pub prefix: String,
}

/// Short timings so Redis tests can wait for real; the memory store's clock is moved.
pub fn test_settings() -> StoreSettings {
    StoreSettings {
        partitions: 4,
        heartbeat_timeout: Duration::from_millis(1500),
        max_pause: Duration::from_millis(800),
        heartbeat_events: usher::store::HeartbeatEvents::All,
        ..StoreSettings::default()
    }
}

pub fn redis_options(target: RedisTarget, prefix: &str) -> RedisOptions {
    RedisOptions {
        target,
        key_prefix: prefix.to_owned(),
        timeout: Duration::from_millis(500),
        allow_eviction: false,
        resubscribe_interval: usher::store::redis::RESUBSCRIBE_INTERVAL,
    }
}

/// A store of `kind` for one test, on real time: the memory store, or a key prefix of
/// its own on the shared redis-server or cluster.
pub async fn store_of(kind: Kind, settings: StoreSettings) -> Arc<dyn Store> {
    let target = match kind {
        Kind::Memory => return Arc::new(MemoryStore::new(settings)),
        Kind::Redis => RedisTarget::Single {
            url: redis::shared_redis().url(),
        },
        Kind::Cluster => RedisTarget::Cluster {
            nodes: redis::shared_cluster().node_list(),
        },
    };
    Arc::new(
        RedisStore::connect(redis_options(target, &unique_prefix()), settings)
            .await
            .expect("connect to the test redis"),
    )
}

impl Backend {
    pub async fn open(kind: Kind, settings: StoreSettings) -> Backend {
        let prefix = unique_prefix();
        let (store, clock): (Arc<dyn Store>, _) = match kind {
            Kind::Memory => {
                let clock = Arc::new(ManualClock::new(1_800_000_000_000));
                (
                    Arc::new(MemoryStore::with_clock(settings, clock.clone())),
                    Some(clock),
                )
            }
            Kind::Redis => {
                let target = RedisTarget::Single {
                    url: redis::shared_redis().url(),
                };
                let store = RedisStore::connect(redis_options(target, &prefix), settings)
                    .await
                    .expect("connect to the test redis");
                (Arc::new(store), None)
            }
            Kind::Cluster => {
                let target = RedisTarget::Cluster {
                    nodes: redis::shared_cluster().node_list(),
                };
                let store = RedisStore::connect(redis_options(target, &prefix), settings)
                    .await
                    .expect("connect to the test cluster");
                (Arc::new(store), None)
            }
        };
        Backend {
            kind,
            store,
            clock,
            prefix,
        }
    }

    /// Moves time forward: the manual clock for memory, a real wait for Redis.
    pub async fn advance(&self, by: Duration) {
        match &self.clock {
            Some(clock) => clock.advance(by),
            None => tokio::time::sleep(by).await,
        }
    }

    /// The Redis ports this backend's keys live on (none for memory).
    pub fn ports(&self) -> Vec<u16> {
        match self.kind {
            Kind::Memory => Vec::new(),
            Kind::Redis => vec![redis::shared_redis().port],
            Kind::Cluster => redis::shared_cluster()
                .nodes
                .iter()
                .map(|n| n.port)
                .collect(),
        }
    }

    /// Every Redis key this backend wrote, with its contents (empty for memory, whose
    /// tests compare sessions and events instead).
    pub fn dump(&self) -> Vec<(String, String)> {
        redis::dump_with_prefix(&self.ports(), &format!("{}:", self.prefix))
    }

    /// A create that must succeed (see [`new_session`]).
    pub async fn create(
        &self,
        user: &UserId,
        device: &str,
        limit: u32,
        policy: OverLimitPolicy,
    ) -> usher::store::Created {
        self.store
            .create_session(new_session(user, device, limit, policy), Deadline::NONE)
            .await
            .expect("the create succeeds")
    }

    /// A create as given, with no caller deadline.
    pub async fn try_create(&self, new: NewSession) -> Result<usher::store::Created, StoreError> {
        self.store.create_session(new, Deadline::NONE).await
    }

    /// A device call, with no caller deadline.
    pub async fn call(&self, call: DeviceCall) -> Result<Session, StoreError> {
        self.store.device_call(call, Deadline::NONE).await
    }

    /// The session as the store shows it now (`None` once its record is gone).
    pub async fn session(&self, name: &SessionName) -> Option<Session> {
        self.store
            .get_session(name, Deadline::NONE)
            .await
            .expect("the read succeeds")
    }

    /// The user's live holders, oldest first.
    pub async fn holders(&self, user: &UserId) -> Vec<Session> {
        self.store
            .seats(user, Deadline::NONE)
            .await
            .expect("the read succeeds")
            .holders
    }

    /// Every event of the user's partition, oldest first.
    pub async fn events_of(&self, user: &UserId) -> Vec<Event> {
        let partition = usher::store::partition_of(user, self.store.settings().partitions);
        self.store
            .read_events(partition, None, 10_000)
            .await
            .expect("read events")
    }

    /// The kinds of the events about `session`, oldest first.
    pub async fn kinds_for(&self, session: &SessionName) -> Vec<EventKind> {
        self.events_of(&session.user)
            .await
            .into_iter()
            .filter(|e| &e.session == session)
            .map(|e| e.kind)
            .collect()
    }
}

pub fn user(id: &str) -> UserId {
    UserId::parse("user", id).unwrap()
}

/// A user id no other test uses, so events and seats of one test are its own.
pub fn fresh_user() -> UserId {
    user(&format!("u{}", unique_prefix()))
}

/// A desktop browser's user agent: 111 bytes, as real ones are.
pub const BROWSER_USER_AGENT: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
     (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// A create for `user` on `device`, with limit and policy.
pub fn new_session(user: &UserId, device: &str, limit: u32, policy: OverLimitPolicy) -> NewSession {
    NewSession {
        name: SessionName {
            user: user.clone(),
            session: SessionId::generate(),
        },
        profile: ProfileId::parse("p", "profile-1").unwrap(),
        content: ContentId::parse("c", "title-1").unwrap(),
        device: Device {
            id: DeviceId::parse("d", device).unwrap(),
            kind: DeviceType::Tv,
            name: format!("{device} name"),
        },
        client: ClientInfo {
            ip_address: "192.0.2.1".into(),
            user_agent: "test-agent/1".into(),
            region: "US".into(),
        },
        request_id: None,
        limit,
        policy,
        rate: None,
    }
}

/// A real usher server on port 0, and clients connected to it.
pub struct TestServer {
    pub running: RunningServer,
    pub sessions: PlaybackSessionServiceClient<Channel>,
    pub concurrency: ConcurrencyServiceClient<Channel>,
    pub channel: Channel,
}

/// A CreateSession request of `user` on `device` (a TV in Germany).
pub fn create_request(user: &str, device: &str) -> proto::CreateSessionRequest {
    proto::CreateSessionRequest {
        parent: format!("users/{user}"),
        profile_id: "profile-1".into(),
        content_id: "title-1".into(),
        device: Some(proto::Device {
            id: device.into(),
            r#type: proto::DeviceType::Tv as i32,
            name: format!("{device} in the living room"),
        }),
        client: Some(proto::ClientInfo {
            ip_address: "2001:db8::1".into(),
            user_agent: "player/2.1".into(),
            region: "DE".into(),
        }),
        request_id: String::new(),
        manifest_type: 0,
    }
}

impl TestServer {
    /// A create that must succeed: the new session.
    pub async fn start(&mut self, user: &str, device: &str) -> proto::Session {
        self.sessions
            .create_session(create_request(user, device))
            .await
            .expect("the create succeeds")
            .into_inner()
            .session
            .unwrap()
    }

    /// GetSession.
    pub async fn get(&mut self, name: &str) -> Result<proto::Session, tonic::Status> {
        let request = proto::GetSessionRequest { name: name.into() };
        let answer = self.sessions.get_session(request).await?;
        Ok(answer.into_inner().session.unwrap())
    }

    /// PauseSession with the name alone (no position, no generation check).
    pub async fn pause(&mut self, name: &str) -> Result<proto::Session, tonic::Status> {
        let request = proto::PauseSessionRequest {
            name: name.into(),
            ..Default::default()
        };
        let answer = self.sessions.pause_session(request).await?;
        Ok(answer.into_inner().session.unwrap())
    }

    /// ResumeSession with the name alone.
    pub async fn resume(&mut self, name: &str) -> Result<proto::Session, tonic::Status> {
        let request = proto::ResumeSessionRequest {
            name: name.into(),
            ..Default::default()
        };
        let answer = self.sessions.resume_session(request).await?;
        Ok(answer.into_inner().session.unwrap())
    }

    /// StopSession with the name alone.
    pub async fn stop(&mut self, name: &str) -> Result<proto::Session, tonic::Status> {
        let request = proto::StopSessionRequest {
            name: name.into(),
            ..Default::default()
        };
        let answer = self.sessions.stop_session(request).await?;
        Ok(answer.into_inner().session.unwrap())
    }
}

/// The config tests serve with: no drain delay, a given over-limit policy, and
/// `--insecure-dev` (the security tests turn it off).
pub fn test_config(policy: OverLimitPolicy) -> Config {
    let mut config = Config::defaults();
    config.insecure_dev = true;
    config.over_limit_policy = policy;
    config.limits.drain_delay = Duration::ZERO;
    config.limits.shutdown_timeout = Duration::from_secs(2);
    config.sweep_interval = Duration::from_millis(100);
    // Tests create many sessions per user at once; the rate limit's own tests set it.
    config.create_rate = None;
    config
}

/// Components with an ephemeral token key and no service credentials.
pub fn components(store: Arc<dyn Store>, entitlements: Arc<dyn EntitlementProvider>) -> Components {
    Components {
        store,
        entitlements,
        tokens: Arc::new(Tokens::new(
            TokenSettings::default(),
            KeyRing::ephemeral().unwrap(),
        )),
        credentials: Credentials::default(),
        manifests: None,
    }
}

pub async fn serve_with(
    config: &Config,
    store: Arc<dyn Store>,
    entitlements: Arc<dyn EntitlementProvider>,
) -> TestServer {
    serve_components(config, components(store, entitlements)).await
}

pub async fn serve_components(config: &Config, components: Components) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = usher::server::start(config, components, listener)
        .await
        .expect("server starts");
    let channel = Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to the test server");
    TestServer {
        running,
        sessions: PlaybackSessionServiceClient::new(channel.clone()),
        concurrency: ConcurrencyServiceClient::new(channel.clone()),
        channel,
    }
}

/// A server over `store` where everyone has `seat_limit` seats.
pub async fn serve(store: Arc<dyn Store>, seat_limit: u32, policy: OverLimitPolicy) -> TestServer {
    serve_with(
        &test_config(policy),
        store,
        Arc::new(StaticPolicy::open(seat_limit).unwrap()),
    )
    .await
}

/// The detail of type `type_name` in a status, decoded; each one when there are several.
fn details<M: Message + Default>(status: &tonic::Status, type_name: &str) -> Vec<M> {
    let decoded = tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status");
    decoded
        .details
        .iter()
        .filter(|d| d.type_url == format!("type.googleapis.com/{type_name}"))
        .map(|d| M::decode(d.value.as_slice()).expect("a decodable detail"))
        .collect()
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &tonic::Status) -> String {
    details::<tonic_types::pb::ErrorInfo>(status, "google.rpc.ErrorInfo")
        .pop()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The `ErrorInfo.metadata` of a status.
pub fn error_metadata(status: &tonic::Status) -> std::collections::HashMap<String, String> {
    details::<tonic_types::pb::ErrorInfo>(status, "google.rpc.ErrorInfo")
        .pop()
        .map(|info| info.metadata)
        .unwrap_or_default()
}

/// The fields named by a status' `BadRequest`.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    details::<tonic_types::pb::BadRequest>(status, "google.rpc.BadRequest")
        .into_iter()
        .flat_map(|bad| bad.field_violations)
        .map(|v| v.field)
        .collect()
}

/// The typed holder list of a CONCURRENCY_LIMIT_REACHED status.
pub fn limit_detail(status: &tonic::Status) -> usher::proto::ConcurrencyLimitDetail {
    details(status, "usher.v1.ConcurrencyLimitDetail")
        .pop()
        .expect("a ConcurrencyLimitDetail")
}

/// A plain HTTP/1.1 answer: status, headers (names lower case), body.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// One HTTP/1.1 request to `addr` (no gRPC content type), the answer read to its end.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpAnswer {
    http_json(addr, method, path, headers, "").await
}

/// An HTTP/1.1 request with a JSON `body` (none when empty).
pub async fn http_json(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    }
}
