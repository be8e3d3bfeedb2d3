//! The device stream through the real server: acks, "stop now" from anywhere (another
//! instance, eviction, replacement, the sweeper, a lost notice), reconnects, token
//! pushes, coalescing, refusals, caps, draining, and `usher device`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use usher::config::Config;
use usher::deadline::Deadline;
use usher::entitlement::StaticPolicy;
use usher::proto;
use usher::proto::stream_heartbeats_request::Kind as In;
use usher::proto::stream_heartbeats_response::Kind as Out;
use usher::proto::streaming_service_client::StreamingServiceClient;
use usher::store::memory::MemoryStore;
use usher::store::redis::{RedisStore, RedisTarget};
use usher::store::{OverLimitPolicy, Store};
use usher::token::keys::KeyRing;
use usher::token::{TokenSettings, Tokens};

use crate::support::{
    TestServer, components, create_request, reason, redis, redis_options, serve_components,
    test_config, test_settings, unique_prefix,
};

/// Stream timings short enough for tests: heartbeat every 500 ms (the store's timeout
/// is 1.5 s), writes at most every 100 ms.
pub(crate) fn stream_config(policy: OverLimitPolicy) -> Config {
    let mut config = test_config(policy);
    config.heartbeat_interval = Duration::from_millis(500);
    config.streams.heartbeat_interval = Duration::from_millis(500);
    config.streams.heartbeat_timeout = test_settings().heartbeat_timeout;
    config.streams.min_write_interval = Duration::from_millis(100);
    config
}

async fn server_on(store: Arc<dyn Store>, config: &Config) -> TestServer {
    let entitlements = Arc::new(StaticPolicy::open(2).unwrap());
    serve_components(config, components(store, entitlements)).await
}

fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(test_settings()))
}

/// A device's open stream: what it sends, what it gets.
pub(crate) struct Device {
    pub(crate) sender: mpsc::Sender<proto::StreamHeartbeatsRequest>,
    answers: tonic::Streaming<proto::StreamHeartbeatsResponse>,
}

pub(crate) fn beat(seconds: i64, state: proto::PlaybackState) -> proto::StreamHeartbeatsRequest {
    proto::StreamHeartbeatsRequest {
        kind: Some(In::Heartbeat(proto::StreamHeartbeat {
            position: Some(prost_types::Duration { seconds, nanos: 0 }),
            playback_state: state as i32,
            ..Default::default()
        })),
    }
}

pub(crate) fn playing(seconds: i64) -> proto::StreamHeartbeatsRequest {
    beat(seconds, proto::PlaybackState::Playing)
}

/// Opens a stream on `server` with `token` (sending `first` at once, as devices do).
pub(crate) async fn try_open(
    server: &TestServer,
    token: &str,
    first: proto::StreamHeartbeatsRequest,
) -> Result<Device, tonic::Status> {
    let (sender, requests) = mpsc::channel(1024);
    sender.send(first).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    let answers = StreamingServiceClient::new(server.channel.clone())
        .stream_heartbeats(request)
        .await?
        .into_inner();
    Ok(Device { sender, answers })
}

pub(crate) async fn open(server: &TestServer, token: &str) -> Device {
    try_open(server, token, playing(1))
        .await
        .expect("stream opens")
}

/// A stream whose first heartbeat has been acked: it is registered.
async fn open_acked(server: &TestServer, token: &str) -> Device {
    let mut device = open(server, token).await;
    assert!(matches!(
        device.next(Duration::from_secs(2)).await,
        Out::Ack(_)
    ));
    device
}

/// A session's name and its partition under the test settings.
fn partition_of(name: &str) -> (usher::ids::SessionName, u32) {
    let session = usher::ids::SessionName::parse("n", name).unwrap();
    let partition = usher::store::partition_of(&session.user, test_settings().partitions);
    (session, partition)
}

impl Device {
    /// The next message, within `within`.
    pub(crate) async fn next(&mut self, within: Duration) -> Out {
        tokio::time::timeout(within, self.answers.message())
            .await
            .expect("a message in time")
            .expect("no stream error")
            .expect("the stream is open")
            .kind
            .expect("a kind")
    }

    /// Messages until a stop, which it returns with how long it took.
    pub(crate) async fn until_stop(&mut self, within: Duration) -> (proto::StopPlayback, Duration) {
        let started = Instant::now();
        loop {
            let left = within.saturating_sub(started.elapsed());
            if let Out::Stop(stop) = self.next(left).await {
                return (stop, started.elapsed());
            }
        }
    }

    /// Heartbeats every `every` until a stop arrives (within `within`).
    async fn beating_until_stop(
        &mut self,
        every: Duration,
        within: Duration,
    ) -> proto::StopPlayback {
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < within, "no stop within {within:?}");
            let _ = self.sender.send(playing(5)).await;
            let Ok(message) = tokio::time::timeout(every, self.answers.message()).await else {
                continue;
            };
            if let Some(Out::Stop(stop)) = message.unwrap().and_then(|m| m.kind) {
                return stop;
            }
        }
    }
}

/// Starts a session on `server`: its name and token.
pub(crate) async fn start(server: &mut TestServer, user: &str, device: &str) -> (String, String) {
    let created = server
        .sessions
        .create_session(create_request(user, device))
        .await
        .expect("create")
        .into_inner();
    (created.session.unwrap().name, created.playback_token)
}

pub(crate) fn stop_reason(stop: &proto::StopPlayback) -> proto::StopReason {
    proto::StopReason::try_from(stop.reason).unwrap()
}

#[tokio::test]
async fn acks_carry_the_deadline_and_a_jittered_interval() {
    let mut server = server_on(memory_store(), &stream_config(OverLimitPolicy::RejectNew)).await;
    let (_, token) = start(&mut server, "ada", "tv").await;
    let mut device = open(&server, &token).await;
    let mut intervals = Vec::new();
    for i in 0..6 {
        let Out::Ack(ack) = device.next(Duration::from_secs(2)).await else {
            panic!("expected an ack");
        };
        assert!(ack.expire_time.is_some() && ack.server_time.is_some());
        assert_eq!(ack.state, proto::SessionState::Active as i32);
        let interval = Duration::try_from(ack.next_interval.unwrap()).unwrap();
        assert!(
            interval <= Duration::from_millis(500) && interval >= Duration::from_millis(400),
            "{interval:?}"
        );
        intervals.push(interval);
        tokio::time::sleep(Duration::from_millis(120)).await;
        device.sender.send(playing(10 + i)).await.unwrap();
    }
    intervals.dedup();
    assert!(intervals.len() > 1, "jittered: {intervals:?}");
    server.running.shutdown().await.unwrap();
}

/// Two instances over one store: a TerminateSession on B reaches the stream held by A
/// in under a second, for every one of `count` sessions. Returns the delays.
async fn terminate_on_b_reaches_a(store_a: Arc<dyn Store>, store_b: Arc<dyn Store>, count: usize) {
    let config = stream_config(OverLimitPolicy::RejectNew);
    let mut a = server_on(store_a, &config).await;
    let mut b = server_on(store_b, &config).await;
    let mut delays = Vec::new();
    for i in 0..count {
        let user = format!("u{}-{i}", unique_prefix());
        let (name, token) = start(&mut a, &user, "tv").await;
        let mut device = open(&a, &token).await;
        assert!(matches!(
            device.next(Duration::from_secs(2)).await,
            Out::Ack(_)
        ));
        let started = Instant::now();
        b.sessions
            .terminate_session(proto::TerminateSessionRequest {
                name: name.clone(),
                reason: "account sharing".into(),
            })
            .await
            .unwrap();
        let (stop, _) = device.until_stop(Duration::from_secs(1)).await;
        delays.push(started.elapsed());
        assert_eq!(stop_reason(&stop), proto::StopReason::Terminated);
        assert_eq!(stop.message, "account sharing");
        assert_eq!(stop.state, proto::SessionState::Terminated as i32);
        assert_eq!(stop.session, name);
    }
    delays.sort();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    eprintln!(
        "stop across instances, {count} stops: p50 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        delays.last().unwrap()
    );
    assert!(*delays.last().unwrap() < Duration::from_secs(1));
    a.running.shutdown().await.unwrap();
    b.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_on_another_instance_stops_the_stream_in_memory() {
    let store = memory_store();
    terminate_on_b_reaches_a(store.clone(), store, 20).await;
}

async fn redis_pair(target: impl Fn() -> RedisTarget) -> (Arc<dyn Store>, Arc<dyn Store>) {
    let prefix = unique_prefix();
    let connect = |target| {
        let prefix = prefix.clone();
        async move {
            Arc::new(
                RedisStore::connect(redis_options(target, &prefix), test_settings())
                    .await
                    .unwrap(),
            ) as Arc<dyn Store>
        }
    };
    (connect(target()).await, connect(target()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_on_another_instance_stops_the_stream_on_redis() {
    let url = redis::shared_redis().url();
    let (a, b) = redis_pair(|| RedisTarget::Single { url: url.clone() }).await;
    terminate_on_b_reaches_a(a, b, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_on_another_instance_stops_the_stream_on_a_cluster() {
    let nodes = redis::shared_cluster().node_list();
    let (a, b) = redis_pair(|| RedisTarget::Cluster {
        nodes: nodes.clone(),
    })
    .await;
    terminate_on_b_reaches_a(a, b, 20).await;
}

#[tokio::test]
async fn eviction_and_replacement_reach_the_streams_they_end() {
    let config = stream_config(OverLimitPolicy::StopOldest);
    let mut server = server_on(memory_store(), &config).await;
    let (_, tv_token) = start(&mut server, "eve", "tv").await;
    let mut tv = open(&server, &tv_token).await;
    let (_, phone_token) = start(&mut server, "eve", "phone").await;
    let mut phone = open(&server, &phone_token).await;
    // A third device: stop-oldest evicts the TV.
    start(&mut server, "eve", "tablet").await;
    let (stop, _) = tv.until_stop(Duration::from_secs(1)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Evicted);
    assert_eq!(stop.state, proto::SessionState::Evicted as i32);
    // The phone starts again: its old session is replaced.
    start(&mut server, "eve", "phone").await;
    let (stop, _) = phone.until_stop(Duration::from_secs(1)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Replaced);
    server.running.shutdown().await.unwrap();
}

/// A stream that stopped sending is stopped once its deadline passes: by the sweeper's
/// notice (here the stream's own silence check waits 10 s), or by that silence check
/// (here the sweeper does not run).
async fn a_silent_stream_is_stopped(config: Config) {
    let mut server = server_on(memory_store(), &config).await;
    let (name, token) = start(&mut server, "sid", "tv").await;
    let mut device = open(&server, &token).await;
    // Nothing more is sent: the deadline is 1.5 s away.
    let (stop, waited) = device.until_stop(Duration::from_secs(4)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Expired);
    assert_eq!(stop.state, proto::SessionState::Expired as i32);
    assert!(waited >= Duration::from_millis(1300), "{waited:?}");
    assert_eq!(
        server.get(&name).await.unwrap().state,
        proto::SessionState::Expired as i32
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_stops_a_stream_that_went_silent() {
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.heartbeat_timeout = Duration::from_secs(10);
    a_silent_stream_is_stopped(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_closed_at_its_deadline_without_the_sweeper() {
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.sweep_interval = Duration::from_secs(3600);
    a_silent_stream_is_stopped(config).await;
}

/// A stream server (REJECT_NEW) on a Redis store under `prefix` on `redis`, and the store.
async fn on_own_redis(redis: &redis::RedisServer, prefix: &str) -> (Arc<dyn Store>, TestServer) {
    let target = RedisTarget::Single { url: redis.url() };
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(redis_options(target, prefix), test_settings())
            .await
            .unwrap(),
    );
    let server = server_on(store.clone(), &stream_config(OverLimitPolicy::RejectNew)).await;
    (store, server)
}

/// The guaranteed path: a session that ends with no notice (a failover lost its seat)
/// is stopped at the next heartbeat; and with the subscriber's connection killed, a
/// termination still reaches the stream within a heartbeat interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_notice_the_next_heartbeat_stops_the_stream() {
    let server_redis = redis::RedisServer::start();
    let prefix = unique_prefix();
    let (store, mut server) = on_own_redis(&server_redis, &prefix).await;

    let (name, token) = start(&mut server, "gus", "tv").await;
    let mut device = open_acked(&server, &token).await;
    let (session, partition) = partition_of(&name);
    let seats = format!("{prefix}:{{{partition}}}:u:{}", session.user);
    assert_eq!(
        server_redis.cli(&["hdel", &seats, session.session.as_str()]),
        "1"
    );
    let stop = device
        .beating_until_stop(Duration::from_millis(150), Duration::from_secs(2))
        .await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Expired);
    assert_eq!(stop.state, proto::SessionState::Evicted as i32);

    let (name, token) = start(&mut server, "gus", "phone").await;
    let mut device = open_acked(&server, &token).await;
    let killed = server_redis.cli(&["client", "kill", "type", "pubsub"]);
    assert_ne!(killed, "0", "the subscriber's connection was there to kill");
    let termination = usher::session::Termination {
        message: "ops".into(),
        by: "test".into(),
    };
    store
        .terminate(
            &usher::ids::SessionName::parse("n", &name).unwrap(),
            &termination,
            Deadline::NONE,
        )
        .await
        .unwrap();
    let stop = device
        .beating_until_stop(Duration::from_millis(500), Duration::from_secs(2))
        .await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Terminated);
    server.running.shutdown().await.unwrap();
}

/// The fast path survives a reconnection: with the subscriber's connection killed, usher
/// subscribes to the stop channels again, and a termination reaches a stream that sends
/// nothing meanwhile through the notice alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnection_the_notice_still_stops_the_stream() {
    let server_redis = redis::RedisServer::start();
    let prefix = unique_prefix();
    let (store, mut server) = on_own_redis(&server_redis, &prefix).await;
    let (name, token) = start(&mut server, "ida", "tv").await;
    let mut device = open_acked(&server, &token).await;
    let (session, partition) = partition_of(&name);
    let channel = format!("{prefix}:{{{partition}}}:stop");
    let subscribed = || {
        server_redis
            .cli(&["pubsub", "shardnumsub", &channel])
            .ends_with("\n1")
    };
    assert!(subscribed());
    let killed = server_redis.cli(&["client", "kill", "type", "pubsub"]);
    assert_ne!(killed, "0", "the subscriber's connection was there to kill");
    let started = Instant::now();
    while !subscribed() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{channel} was not subscribed to again"
        );
        // Beats meanwhile, so the session outlives the wait.
        let _ = device.sender.send(playing(5)).await;
        assert!(matches!(
            device.next(Duration::from_secs(2)).await,
            Out::Ack(_)
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = device.sender.send(playing(5)).await;
    assert!(matches!(
        device.next(Duration::from_secs(2)).await,
        Out::Ack(_)
    ));
    let termination = usher::session::Termination {
        message: "ops".into(),
        by: "test".into(),
    };
    store
        .terminate(&session, &termination, Deadline::NONE)
        .await
        .unwrap();
    // Within a fraction of the 500 ms heartbeat interval, with no heartbeat sent.
    let (stop, took) = device.until_stop(Duration::from_millis(400)).await;
    assert_eq!(
        stop_reason(&stop),
        proto::StopReason::Terminated,
        "{took:?}"
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_comes_back_to_the_same_session_or_frees_the_seat() {
    let mut server = server_on(memory_store(), &stream_config(OverLimitPolicy::RejectNew)).await;
    let (name, token) = start(&mut server, "hal", "tv").await;
    let before = server.get(&name).await.unwrap();
    let device = open(&server, &token).await;
    drop(device);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Within the deadline: the same session, seat and generation go on.
    let mut again = open(&server, &token).await;
    let Out::Ack(ack) = again.next(Duration::from_secs(2)).await else {
        panic!("expected an ack");
    };
    assert_eq!(ack.state, proto::SessionState::Active as i32);
    let after = server.get(&name).await.unwrap();
    assert_eq!(
        (after.generation, after.state),
        (before.generation, proto::SessionState::Active as i32)
    );
    let seats = server
        .concurrency
        .get_concurrency(proto::GetConcurrencyRequest {
            name: "users/hal/concurrency".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seats.concurrency.unwrap().in_use, 1);
    // Dropped for good: the seat is freed after the deadline.
    drop(again);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        server.get(&name).await.unwrap().state,
        proto::SessionState::Expired as i32
    );
    server.start("hal", "phone").await;
    server.start("hal", "tablet").await;
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_fresh_token_arrives_before_expiry_and_the_old_one_keeps_working() {
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.token_push_before = Duration::from_secs(2);
    let tokens = Arc::new(Tokens::new(
        TokenSettings {
            ttl: Duration::from_secs(3),
            ..TokenSettings::default()
        },
        KeyRing::ephemeral().unwrap(),
    ));
    let mut parts = components(memory_store(), Arc::new(StaticPolicy::open(2).unwrap()));
    parts.tokens = tokens;
    let mut server = serve_components(&config, parts).await;
    let (_, token) = start(&mut server, "ivy", "tv").await;
    let mut device = open(&server, &token).await;
    let started = Instant::now();
    let fresh = loop {
        if let Out::Token(fresh) = device.next(Duration::from_secs(3)).await {
            break fresh;
        }
        device.sender.send(playing(3)).await.unwrap();
    };
    let pushed_after = started.elapsed();
    assert!(pushed_after < Duration::from_secs(2), "{pushed_after:?}");
    assert_ne!(fresh.playback_token, token);
    assert!(fresh.manifest.is_none(), "this usher signs no manifests");
    let mut tokens_client =
        proto::token_service_client::TokenServiceClient::new(server.channel.clone());
    for t in [&token, &fresh.playback_token] {
        let answer = tokens_client
            .validate_token(proto::ValidateTokenRequest {
                token: t.clone(),
                check_session: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.valid, "{}", answer.reason);
    }
    // The fresh token opens a stream too (it supersedes this one).
    let _second = open(&server, &fresh.playback_token).await;
    let (stop, _) = device.until_stop(Duration::from_secs(2)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Superseded);
    assert_eq!(stop.state, 0, "the session goes on");
    server.running.shutdown().await.unwrap();
}

/// With manifest URLs signed for 2 s, the stream pushes a token with a fresh URL of the
/// manifest the device asked for a fifth of that lifetime before the last one expires,
/// again and again, although the token itself is far from expiring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_pushes_a_fresh_manifest_before_the_last_expires() {
    use usher::manifest::edge::EdgeTokenSigner;
    use usher::manifest::{Origin, Origins};
    let config = stream_config(OverLimitPolicy::RejectNew);
    let mut parts = components(memory_store(), Arc::new(StaticPolicy::open(2).unwrap()));
    parts.manifests = Some(Arc::new(Origins::new(
        vec![Origin {
            name: "cdn".into(),
            content_prefix: String::new(),
            hls_path: "/{content}/master.m3u8".into(),
            dash_path: "/{content}/manifest.mpd".into(),
            signer: Box::new(EdgeTokenSigner::new(
                "https://cdn.example.com".into(),
                vec![5; 32],
            )),
        }],
        Duration::from_secs(2),
    )));
    let mut server = serve_components(&config, parts).await;
    let (_, token) = start(&mut server, "ivo", "tv").await;
    let mut dash = playing(1);
    if let Some(In::Heartbeat(beat)) = dash.kind.as_mut() {
        beat.manifest_type = proto::ManifestType::Dash as i32;
    }
    let mut device = try_open(&server, &token, dash).await.unwrap();
    let opened = Instant::now();
    let mut pushes = Vec::new();
    while pushes.len() < 2 {
        if let Out::Token(push) = device.next(Duration::from_secs(3)).await {
            pushes.push((opened.elapsed(), push));
        } else {
            device.sender.send(playing(2)).await.unwrap();
        }
    }
    for (at, push) in &pushes {
        let manifest = push.manifest.as_ref().expect("a manifest with the token");
        assert_eq!(manifest.r#type, proto::ManifestType::Dash as i32);
        assert!(
            manifest
                .url
                .starts_with("https://cdn.example.com/title-1/manifest.mpd?token="),
            "{}",
            manifest.url
        );
        assert!(*at < Duration::from_secs(4), "{at:?}");
    }
    // The first about 1.6 s after the stream opened, the next about 1.6 s later.
    let (first, second) = (pushes[0].0, pushes[1].0);
    assert!(first >= Duration::from_millis(1_200), "{first:?}");
    assert!(second - first >= Duration::from_millis(1_200), "{second:?}");
    server.running.shutdown().await.unwrap();
}

/// 1,000 heartbeats in a second on one stream: every one acked, a handful written (each
/// write appends a heartbeat event: the test store records all of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_is_coalesced() {
    let store = memory_store();
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.min_write_interval = Duration::from_secs(1);
    let mut server = server_on(store.clone(), &config).await;
    let (name, token) = start(&mut server, "joy", "tv").await;
    let mut device = open(&server, &token).await;
    let flood_start = Instant::now();
    for i in 0..1000 {
        device.sender.send(playing(i)).await.unwrap();
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(90)).await;
        }
    }
    let mut acks = 0;
    while acks < 1001 {
        if let Out::Ack(_) = device.next(Duration::from_secs(3)).await {
            acks += 1;
        }
    }
    let flood = flood_start.elapsed();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (session, partition) = partition_of(&name);
    let writes = store
        .read_events(partition, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.session == session && e.kind == usher::store::EventKind::Heartbeat)
        .count();
    assert!(
        (1..=4).contains(&writes),
        "{writes} writes for 1001 heartbeats in {flood:?}"
    );
    // The last position was written by the flush.
    assert_eq!(
        server.get(&name).await.unwrap().position.unwrap().seconds,
        999
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn streams_are_refused_like_the_unary_device_calls() {
    let tokens = Arc::new(Tokens::new(
        TokenSettings::default(),
        KeyRing::ephemeral().unwrap(),
    ));
    let store = memory_store();
    let mut parts = components(store.clone(), Arc::new(StaticPolicy::open(2).unwrap()));
    parts.tokens = tokens.clone();
    let mut server = serve_components(&stream_config(OverLimitPolicy::RejectNew), parts).await;
    let refused = |status: tonic::Status| (status.code(), reason(&status));

    // No token, even in --insecure-dev: the token names the session.
    let mut client = StreamingServiceClient::new(server.channel.clone());
    let (sender, requests) = mpsc::channel(1);
    sender.send(playing(1)).await.unwrap();
    let status = client
        .stream_heartbeats(ReceiverStream::new(requests))
        .await
        .unwrap_err();
    assert_eq!(
        refused(status),
        (Code::Unauthenticated, "UNAUTHENTICATED".into())
    );

    // An ended session's token.
    let (name, token) = start(&mut server, "kim", "tv").await;
    server.stop(&name).await.unwrap();
    let status = try_open(&server, &token, playing(1)).await.err().unwrap();
    assert_eq!(
        refused(status),
        (Code::FailedPrecondition, "SESSION_ENDED".into())
    );

    // A token of an older seat generation of a live session: NOT_FOUND.
    let (name, _) = start(&mut server, "kim", "phone").await;
    let session = usher::ids::SessionName::parse("n", &name).unwrap();
    let mut older = store
        .get_session(&session, Deadline::NONE)
        .await
        .unwrap()
        .unwrap();
    older.generation -= 1;
    let forged = tokens.issue(&older, &Default::default()).unwrap().token;
    let status = try_open(&server, &forged, playing(1)).await.err().unwrap();
    assert_eq!(refused(status), (Code::NotFound, "NOT_FOUND".into()));

    // Another session's id under the token's own user.
    let mut other = older.clone();
    other.generation += 1;
    other.name.session = usher::ids::SessionId::generate();
    let forged = tokens.issue(&other, &Default::default()).unwrap().token;
    let status = try_open(&server, &forged, playing(1)).await.err().unwrap();
    assert_eq!(refused(status), (Code::NotFound, "NOT_FOUND".into()));

    // An oversized message ends the stream with RESOURCE_EXHAUSTED.
    let (_, token) = start(&mut server, "lou", "phone").await;
    let huge = proto::StreamHeartbeatsRequest {
        kind: Some(In::Heartbeat(proto::StreamHeartbeat {
            resolution: "x".repeat(2 * 1024 * 1024),
            ..Default::default()
        })),
    };
    let mut device = try_open(&server, &token, huge).await.unwrap();
    let status = device.answers.message().await.unwrap_err();
    assert_eq!(
        refused(status),
        (Code::ResourceExhausted, "MESSAGE_TOO_LARGE".into())
    );

    // A malformed message ends the stream with INVALID_ARGUMENT naming the field.
    let (_, token) = start(&mut server, "lou", "tv").await;
    let empty = proto::StreamHeartbeatsRequest { kind: None };
    let mut device = try_open(&server, &token, empty).await.unwrap();
    let status = device.answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(crate::support::bad_fields(&status), ["kind"]);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn streams_per_connection_are_capped() {
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.max_streams_per_connection = 2;
    let mut server = server_on(memory_store(), &config).await;
    let mut devices = Vec::new();
    for device in ["a", "b"] {
        let (_, token) = start(&mut server, "max", device).await;
        devices.push(open(&server, &token).await);
    }
    let (_, token) = start(&mut server, "mia", "c").await;
    let status = try_open(&server, &token, playing(1)).await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "TOO_MANY_STREAMS");
    // One closes: there is room again.
    drop(devices.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    open(&server, &token).await;
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn streams_per_instance_are_capped() {
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.max_streams = 1;
    let mut server = server_on(memory_store(), &config).await;
    let (_, first) = start(&mut server, "nia", "a").await;
    let _held = open(&server, &first).await;
    let (_, second) = start(&mut server, "nia", "b").await;
    let status = try_open(&server, &second, playing(1)).await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "TOO_MANY_STREAMS");
    assert_eq!(
        crate::support::error_metadata(&status)
            .get("scope")
            .map(String::as_str),
        Some("instance")
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn stop_on_the_stream_releases_the_seat_and_paused_pauses() {
    let mut server = server_on(memory_store(), &stream_config(OverLimitPolicy::RejectNew)).await;
    let (name, token) = start(&mut server, "ned", "tv").await;
    let mut device = open_acked(&server, &token).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    device
        .sender
        .send(beat(30, proto::PlaybackState::Paused))
        .await
        .unwrap();
    let Out::Ack(ack) = device.next(Duration::from_secs(2)).await else {
        panic!("expected an ack");
    };
    assert_eq!(ack.state, proto::SessionState::Paused as i32);
    // The unary heartbeat reporting PLAYING resumes it.
    let resumed = server
        .sessions
        .heartbeat(proto::HeartbeatRequest {
            name: name.clone(),
            playback_state: proto::PlaybackState::Playing as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(resumed.state, proto::SessionState::Active as i32);
    let stop = proto::StreamHeartbeatsRequest {
        kind: Some(In::Stop(proto::StreamStop {
            position: Some(prost_types::Duration {
                seconds: 42,
                nanos: 0,
            }),
            duration: None,
        })),
    };
    device.sender.send(stop).await.unwrap();
    let (stop, _) = device.until_stop(Duration::from_secs(2)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Stopped);
    assert_eq!(stop.state, proto::SessionState::Stopped as i32);
    let read = server.get(&name).await.unwrap();
    assert_eq!(read.position.unwrap().seconds, 42);
    // The seats are free at once.
    server.start("ned", "phone").await;
    server.start("ned", "tablet").await;
    assert!(device.answers.message().await.unwrap().is_none(), "closed");
    server.running.shutdown().await.unwrap();
}

/// SIGTERM's drain: NOT_SERVING, `reconnect` to every stream; the device reconnects to
/// another instance with its token and the session, seat and generation go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_sends_reconnect_and_the_session_survives() {
    let store = memory_store();
    let config = stream_config(OverLimitPolicy::RejectNew);
    // Two instances of one deployment: one store, one key set.
    let entitlements = Arc::new(StaticPolicy::open(2).unwrap());
    let a_parts = components(store.clone(), entitlements.clone());
    let mut b_parts = components(store.clone(), entitlements);
    b_parts.tokens = a_parts.tokens.clone();
    let mut a = serve_components(&config, a_parts).await;
    let b = serve_components(&config, b_parts).await;
    let (name, token) = start(&mut a, "oli", "tv").await;
    let before = a.get(&name).await.unwrap();
    let mut device = open(&a, &token).await;
    assert!(matches!(
        device.next(Duration::from_secs(2)).await,
        Out::Ack(_)
    ));
    let stopping = tokio::spawn(a.running.shutdown());
    let Out::Reconnect(reconnect) = device.next(Duration::from_secs(2)).await else {
        panic!("expected reconnect");
    };
    let delay = Duration::try_from(reconnect.delay.unwrap()).unwrap();
    assert!(delay <= config.streams.reconnect_spread, "{delay:?}");
    stopping.await.unwrap().unwrap();
    let mut again = open(&b, &token).await;
    let Out::Ack(ack) = again.next(Duration::from_secs(2)).await else {
        panic!("expected an ack");
    };
    assert_eq!(ack.state, proto::SessionState::Active as i32);
    let mut b = b;
    let after = b.get(&name).await.unwrap();
    assert_eq!(after.generation, before.generation);
    let seats = store
        .seats(
            &usher::ids::SessionName::parse("n", &name).unwrap().user,
            Deadline::NONE,
        )
        .await
        .unwrap();
    assert_eq!(seats.holders.len(), 1, "no second session");
    b.running.shutdown().await.unwrap();
}

/// `usher device`, the binary, against a real server: it heartbeats, prints the acks,
/// and exits 0 after the stop an operator's termination sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usher_device_prints_what_usher_sends_until_stop() {
    let mut server = server_on(memory_store(), &stream_config(OverLimitPolicy::RejectNew)).await;
    let (name, token) = start(&mut server, "pat", "tv").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_usher"))
        .args([
            "device",
            "--addr",
            &server.running.addr.to_string(),
            "--token",
            &token,
            "--interval",
            "200ms",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    server
        .sessions
        .terminate_session(proto::TerminateSessionRequest {
            name,
            reason: "support".into(),
        })
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("usher device exits after stop")
        .unwrap();
    assert!(status.success());
    let mut out = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().filter(|l| l.get("ack").is_some()).count() >= 2,
        "{out}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["stop"]["reason"], "STOP_REASON_TERMINATED", "{out}");
    assert_eq!(last["stop"]["message"], "support");
    server.running.shutdown().await.unwrap();
}

/// An entitlement that can be withdrawn while the user plays, or become unreachable.
struct Withdrawable(std::sync::atomic::AtomicU8);

const ALLOWED: u8 = 0;
const WITHDRAWN: u8 = 1;
const UNREACHABLE: u8 = 2;

#[async_trait::async_trait]
impl usher::entitlement::EntitlementProvider for Withdrawable {
    async fn check(
        &self,
        _: usher::entitlement::EntitlementQuery<'_>,
    ) -> Result<usher::entitlement::Entitlement, usher::entitlement::EntitlementError> {
        use usher::entitlement::Entitlement;
        match self.0.load(std::sync::atomic::Ordering::SeqCst) {
            ALLOWED => Ok(Entitlement::Allowed(usher::entitlement::Grant::seats(2))),
            WITHDRAWN => Ok(Entitlement::Denied(usher::error::Denial::Content)),
            _ => Err(usher::entitlement::EntitlementError::Unavailable(
                "down".into(),
            )),
        }
    }
}

/// A server whose tokens live 3 s and are pushed 2 s before expiry, over `entitlement`.
async fn short_token_server(entitlement: Arc<Withdrawable>) -> TestServer {
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.token_push_before = Duration::from_secs(2);
    let mut parts = components(memory_store(), entitlement);
    parts.tokens = Arc::new(Tokens::new(
        TokenSettings {
            ttl: Duration::from_secs(3),
            ..TokenSettings::default()
        },
        KeyRing::ephemeral().unwrap(),
    ));
    serve_components(&config, parts).await
}

/// When the next token is due and the entitlement is gone, the session ends and the
/// stream is told ENTITLEMENT_LOST instead of getting a token; when the provider cannot
/// answer, the admitted session goes on and the token is pushed.
#[tokio::test]
async fn a_withdrawn_entitlement_stops_the_stream_when_a_token_is_due() {
    let entitlement = Arc::new(Withdrawable(std::sync::atomic::AtomicU8::new(ALLOWED)));
    let mut server = short_token_server(entitlement.clone()).await;
    let (name, token) = start(&mut server, "qua", "tv").await;
    let mut device = open(&server, &token).await;
    // The device keeps beating, so only the entitlement can end the session.
    let beats = device.sender.clone();
    let beating = tokio::spawn(async move {
        while beats.send(playing(7)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    entitlement
        .0
        .store(UNREACHABLE, std::sync::atomic::Ordering::SeqCst);
    loop {
        match device.next(Duration::from_secs(3)).await {
            Out::Token(_) => break,
            Out::Stop(stop) => panic!("stopped while the provider was down: {stop:?}"),
            _ => {}
        }
    }

    entitlement
        .0
        .store(WITHDRAWN, std::sync::atomic::Ordering::SeqCst);
    let (stop, waited) = device.until_stop(Duration::from_secs(3)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::EntitlementLost);
    assert_eq!(stop.state, proto::SessionState::Terminated as i32);
    assert!(
        stop.message.contains("CONTENT_UNAVAILABLE"),
        "{}",
        stop.message
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let ended = server.get(&name).await.unwrap();
    assert_eq!(ended.state, proto::SessionState::Terminated as i32);
    assert_eq!(ended.ended_by, "usher");
    beating.abort();
    server.running.shutdown().await.unwrap();
}

/// The master that serves `slot`: its port and node id.
fn owner_of(cluster: &redis::RedisCluster, slot: u16) -> (u16, String) {
    let nodes = redis::redis_cli(cluster.nodes[0].port, &["cluster", "nodes"]);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let serves = fields.iter().skip(8).any(|range| {
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            match (from.parse::<u16>(), to.parse::<u16>()) {
                (Ok(from), Ok(to)) => (from..=to).contains(&slot),
                _ => false,
            }
        });
        if serves {
            let port = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            return (port, fields[0].to_owned());
        }
    }
    panic!("no master serves slot {slot}: {nodes}");
}

/// Moves `slot`, with its keys, from its master to another one.
fn migrate(cluster: &redis::RedisCluster, slot: u16) -> u16 {
    let (from, from_id) = owner_of(cluster, slot);
    let to = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .find(|p| *p != from)
        .unwrap();
    let to_id = redis::redis_cli(to, &["cluster", "myid"]);
    let slot = slot.to_string();
    let cli = |port: u16, args: &[&str]| {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert_eq!(
        cli(to, &["cluster", "setslot", &slot, "importing", &from_id]),
        "OK"
    );
    assert_eq!(
        cli(from, &["cluster", "setslot", &slot, "migrating", &to_id]),
        "OK"
    );
    loop {
        let keys = cli(from, &["cluster", "getkeysinslot", &slot, "100"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let mut args = vec!["migrate", "127.0.0.1"];
        let to_port = to.to_string();
        args.extend([to_port.as_str(), "", "0", "5000", "KEYS"]);
        args.extend(keys);
        assert_eq!(cli(from, &args), "OK");
    }
    for node in &cluster.nodes {
        assert_eq!(
            cli(node.port, &["cluster", "setslot", &slot, "node", &to_id]),
            "OK"
        );
    }
    to
}

/// A slot that migrates to another master ends its shard channel's subscription; the
/// stop-channel subscriber follows it, and a termination after the move still reaches
/// the stream, with no heartbeat to carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_channel_follows_a_migrated_slot() {
    let cluster = redis::RedisCluster::start();
    let prefix = unique_prefix();
    let store = |interval| {
        let mut options = redis_options(
            RedisTarget::Cluster {
                nodes: cluster.node_list(),
            },
            &prefix,
        );
        options.resubscribe_interval = interval;
        // The device sends nothing after its first heartbeat: a deadline well beyond the
        // migration keeps the session live until the termination.
        let mut settings = test_settings();
        settings.heartbeat_timeout = Duration::from_secs(30);
        async move { Arc::new(RedisStore::connect(options, settings).await.unwrap()) as Arc<dyn Store> }
    };
    let a = store(Duration::from_millis(300)).await;
    let b = store(usher::store::redis::RESUBSCRIBE_INTERVAL).await;
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.heartbeat_timeout = Duration::from_secs(30);
    let mut server = server_on(a, &config).await;
    let (name, token) = start(&mut server, "ray", "tv").await;
    let mut device = open_acked(&server, &token).await;

    let (session, partition) = partition_of(&name);
    let channel = format!("{prefix}:{{{partition}}}:stop");
    let slot: u16 = redis::redis_cli(cluster.nodes[0].port, &["cluster", "keyslot", &channel])
        .parse()
        .unwrap();
    let to = migrate(&cluster, slot);
    // The new owner gets the subscription back within a few resubscribe intervals.
    let started = Instant::now();
    loop {
        let counts = redis::redis_cli(to, &["pubsub", "shardnumsub", &channel]);
        if counts.lines().nth(1).is_some_and(|n| n.trim() != "0") {
            break;
        }
        let everywhere: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| redis::redis_cli(n.port, &["pubsub", "shardnumsub", &channel]))
            .collect();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no subscriber on the new owner {to}: {counts}; all: {everywhere:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let termination = usher::session::Termination {
        message: "moved".into(),
        by: "test".into(),
    };
    // B's client may need a moment to learn the new owner (UNAVAILABLE meanwhile).
    let started = Instant::now();
    while let Err(error) = b.terminate(&session, &termination, Deadline::NONE).await {
        assert!(
            matches!(error, usher::store::StoreError::Unavailable(_)),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{error:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stop, _) = device.until_stop(Duration::from_secs(1)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::Terminated);
    server.running.shutdown().await.unwrap();
}

/// Right after a slot moves to another master, a store whose routing still names the
/// old one reads, heartbeats and pauses without an error: those scripts follow the
/// redirect (their second run would change nothing). Before, the first call per moved
/// slot failed UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_heartbeats_follow_a_moved_slot_at_once() {
    let cluster = redis::RedisCluster::start();
    let prefix = unique_prefix();
    let options = redis_options(
        RedisTarget::Cluster {
            nodes: cluster.node_list(),
        },
        &prefix,
    );
    let mut settings = test_settings();
    settings.heartbeat_timeout = Duration::from_secs(30);
    let store = RedisStore::connect(options, settings).await.unwrap();
    let mut new = crate::support::new_session(
        &crate::support::fresh_user(),
        "tv",
        2,
        OverLimitPolicy::RejectNew,
    );
    new.client.region = "DE".into();
    let name = store
        .create_session(new, Deadline::NONE)
        .await
        .unwrap()
        .session
        .name;
    let record = format!(
        "{prefix}:{{{}}}:s:{}",
        usher::store::partition_of(&name.user, test_settings().partitions),
        name.session
    );
    let slot: u16 = redis::redis_cli(cluster.nodes[0].port, &["cluster", "keyslot", &record])
        .parse()
        .unwrap();
    migrate(&cluster, slot);
    let session = store.get_session(&name, Deadline::NONE).await.unwrap();
    assert_eq!(session.map(|s| s.name), Some(name.clone()));
    let heartbeat = usher::store::DeviceCall {
        name: name.clone(),
        generation: None,
        position_ms: Some(1_000),
        duration_ms: None,
        profile: None,
        action: usher::store::DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        },
    };
    let beat = store
        .device_call_brief(heartbeat, Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(beat.position_ms, 1_000);
}
