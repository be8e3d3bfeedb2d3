//! The device stream's numbers: `cargo bench --bench streams [stops|heartbeats|held]`.
//! Each beside its reference, measured in the same run; nothing here fails on a timing.
//!
//! 1. Stop propagation across two instances on one Redis (a redis-server started here):
//!    TerminateSession on B until the `stop` reaches the stream on A, over STOPS stops,
//!    beside the TerminateSession round trip alone.
//! 2. Streams held by one instance: the `usher` binary (memory store) holds STREAMS idle
//!    streams over CONNECTIONS connections, heartbeating at their interval; its RSS per
//!    stream, beside the 16 KiB goal.
//! 3. Heartbeats per second through streams (every one written: the minimum write
//!    interval is 0) beside the raw heartbeat-script rate of the same Redis.

#[path = "../tests/it/support/redis.rs"]
#[expect(dead_code, reason = "shared with the tests; the bench uses part of it")]
mod redis;
#[expect(dead_code, reason = "shared by the benches; this one uses part of it")]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use usher::config::Config;
use usher::deadline::Deadline;
use usher::entitlement::StaticPolicy;
use usher::ids::SessionName;
use usher::proto;
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;
use usher::proto::stream_heartbeats_request::Kind as In;
use usher::proto::stream_heartbeats_response::Kind as Out;
use usher::proto::streaming_service_client::StreamingServiceClient;
use usher::server::{Components, RunningServer};
use usher::store::{DeviceAction, DeviceCall, Store, StoreSettings};
use usher::token::keys::KeyRing;
use usher::token::{TokenSettings, Tokens};

/// The usher binary's allocator (src/main.rs), so the in-process parts measure what it
/// runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STOPS: usize = 1_000;
const STREAMS: usize = 20_000;
const CONNECTIONS: usize = 200;
const BEATING_STREAMS: usize = 256;
const RUN: Duration = Duration::from_secs(3);

fn heartbeat(seconds: i64) -> proto::StreamHeartbeatsRequest {
    proto::StreamHeartbeatsRequest {
        kind: Some(In::Heartbeat(proto::StreamHeartbeat {
            position: Some(prost_types::Duration { seconds, nanos: 0 }),
            playback_state: proto::PlaybackState::Playing as i32,
            ..Default::default()
        })),
    }
}

async fn redis_store(server: &redis::RedisServer, prefix: &str) -> Arc<dyn Store> {
    support::redis_store(server.url(), prefix, StoreSettings::default()).await
}

fn config() -> Config {
    let mut config = Config::defaults();
    config.insecure_dev = true;
    config.limits.drain_delay = Duration::ZERO;
    config
}

async fn serve(config: &Config, store: Arc<dyn Store>, tokens: Arc<Tokens>) -> RunningServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let components = Components {
        store,
        entitlements: Arc::new(StaticPolicy::open(4).unwrap()),
        tokens,
        credentials: Default::default(),
        manifests: None,
    };
    usher::server::start(config, components, listener)
        .await
        .unwrap()
}

async fn channel(addr: impl std::fmt::Display) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A stream opened with `token`: its sender and answers.
async fn open(
    channel: &Channel,
    token: &str,
) -> (
    mpsc::Sender<proto::StreamHeartbeatsRequest>,
    tonic::Streaming<proto::StreamHeartbeatsResponse>,
) {
    let (sender, requests) = mpsc::channel(8);
    sender.send(heartbeat(1)).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    let answers = StreamingServiceClient::new(channel.clone())
        .stream_heartbeats(request)
        .await
        .unwrap()
        .into_inner();
    (sender, answers)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3
    )
}

async fn stop_propagation(server: &redis::RedisServer) {
    let tokens = Arc::new(Tokens::new(
        TokenSettings::default(),
        KeyRing::ephemeral().unwrap(),
    ));
    let config = config();
    let a = serve(&config, redis_store(server, "stops").await, tokens.clone()).await;
    let b = serve(&config, redis_store(server, "stops").await, tokens).await;
    let a_channel = channel(a.addr).await;
    let mut a_sessions = PlaybackSessionServiceClient::new(a_channel.clone());
    let mut b_sessions = PlaybackSessionServiceClient::new(channel(b.addr).await);
    let (mut stops, mut round_trips) = (Vec::new(), Vec::new());
    for i in 0..STOPS {
        let created = a_sessions
            .create_session(support::create_request(&format!("stop-{i}"), "tv"))
            .await
            .unwrap()
            .into_inner();
        let (_sender, mut answers) = open(&a_channel, &created.playback_token).await;
        answers.message().await.unwrap(); // the first ack: the stream is registered
        let started = Instant::now();
        b_sessions
            .terminate_session(proto::TerminateSessionRequest {
                name: created.session.unwrap().name,
                reason: "bench".into(),
            })
            .await
            .unwrap();
        round_trips.push(started.elapsed());
        loop {
            let message = answers.message().await.unwrap().unwrap();
            if let Some(Out::Stop(_)) = message.kind {
                break;
            }
        }
        stops.push(started.elapsed());
    }
    println!("1. stop propagation, two instances on one Redis, {STOPS} stops");
    println!(
        "   TerminateSession on B to stop on A's stream: {}",
        summary(stops)
    );
    println!(
        "   TerminateSession round trip alone:          {}",
        summary(round_trips)
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Resident memory of `pid`, KiB (0 when /proc does not tell).
fn rss_kib(pid: u32) -> u64 {
    usher::bench::resident_bytes(pid).unwrap_or(0) / 1024
}

async fn streams_held() {
    let port = redis::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["serve", "--insecure-dev", "--listen", &addr])
        .args(["--heartbeat-interval", "20s", "--heartbeat-timeout", "60s"])
        .args([
            "--memory-max-sessions",
            "100000",
            "--memory-max-users",
            "100000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the usher binary");
    let pid = child.id();
    let started = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "usher did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(channel(&addr).await);
    }
    // The sessions first, so the RSS difference is the streams'.
    let mut tokens = Vec::with_capacity(STREAMS);
    let mut creating = tokio::task::JoinSet::new();
    for (chunk, channel) in channels.iter().enumerate() {
        let mut sessions = PlaybackSessionServiceClient::new(channel.clone());
        creating.spawn(async move {
            let mut tokens = Vec::new();
            for i in (chunk..STREAMS).step_by(CONNECTIONS) {
                let created = sessions
                    .create_session(support::create_request(&format!("held-{i}"), "tv"))
                    .await
                    .unwrap()
                    .into_inner();
                tokens.push(created.playback_token);
            }
            tokens
        });
    }
    while let Some(chunk) = creating.join_next().await {
        tokens.extend(chunk.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(STREAMS);
    for (i, token) in tokens.iter().enumerate() {
        held.push(open(&channels[i % CONNECTIONS], token).await);
    }
    // Every stream has its first ack; then a heartbeat interval of idling.
    for (_, answers) in &mut held {
        answers.message().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let per_stream = (after.saturating_sub(before)) as f64 / STREAMS as f64;
    println!("2. streams held by one usher process (memory store), {CONNECTIONS} connections");
    println!(
        "   {STREAMS} open streams: RSS {before} KiB before, {after} KiB after: {per_stream:.1} KiB per stream (goal: at most 16 KiB)"
    );
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

async fn heartbeat_rates(server: &redis::RedisServer) {
    // Raw: the heartbeat script through the store, BEATING_STREAMS in flight.
    let store = redis_store(server, "rates").await;
    let mut names = Vec::new();
    let sessions_client_store = store.clone();
    for i in 0..BEATING_STREAMS {
        let mut new = usher::store::NewSession {
            name: SessionName {
                user: usher::ids::UserId::parse("u", &format!("raw-{i}")).unwrap(),
                session: usher::ids::SessionId::generate(),
            },
            profile: usher::ids::ProfileId::parse("p", "main").unwrap(),
            content: usher::ids::ContentId::parse("c", "t").unwrap(),
            device: usher::session::Device {
                id: usher::ids::DeviceId::parse("d", "tv").unwrap(),
                kind: usher::session::DeviceType::Tv,
                name: String::new(),
            },
            client: Default::default(),
            request_id: None,
            limit: 4,
            policy: usher::store::OverLimitPolicy::RejectNew,
            rate: None,
        };
        new.client.region = "US".into();
        let created = sessions_client_store
            .create_session(new, Deadline::NONE)
            .await
            .unwrap();
        names.push(created.session.name);
    }
    let redis_pid = server.pid().expect("redis-server pid");
    let own_pid = std::process::id();
    let cpu = || {
        (
            support::cpu_seconds(redis_pid),
            support::cpu_seconds(own_pid),
        )
    };
    let raw_cpu = cpu();
    let until = Instant::now() + RUN;
    let mut tasks = tokio::task::JoinSet::new();
    for name in names {
        let store = store.clone();
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < until {
                let playing = DeviceAction::Heartbeat {
                    playback_state: usher::session::PlaybackState::Playing,
                };
                let call = DeviceCall {
                    position_ms: Some(done),
                    ..DeviceCall::new(name.clone(), None, playing)
                };
                store.device_call(call, Deadline::NONE).await.unwrap();
                done += 1;
            }
            done
        });
    }
    let mut raw = 0;
    while let Some(done) = tasks.join_next().await {
        raw += done.unwrap();
    }
    let raw_rate = raw as f64 / RUN.as_secs_f64();
    let raw_cpu = (cpu().0 - raw_cpu.0, cpu().1 - raw_cpu.1);

    // Through streams: every heartbeat written (no coalescing), one in flight per stream.
    let mut config = config();
    config.streams.min_write_interval = Duration::ZERO;
    let tokens = Arc::new(Tokens::new(
        TokenSettings::default(),
        KeyRing::ephemeral().unwrap(),
    ));
    let usher = serve(&config, redis_store(server, "rates").await, tokens).await;
    let usher_channel = channel(usher.addr).await;
    let mut sessions = PlaybackSessionServiceClient::new(usher_channel.clone());
    let mut streams = Vec::new();
    for i in 0..BEATING_STREAMS {
        let created = sessions
            .create_session(support::create_request(&format!("streamed-{i}"), "tv"))
            .await
            .unwrap()
            .into_inner();
        let (sender, mut answers) = open(&usher_channel, &created.playback_token).await;
        answers.message().await.unwrap();
        streams.push((sender, answers));
    }
    let streamed_cpu = cpu();
    let until = Instant::now() + RUN;
    let mut tasks = tokio::task::JoinSet::new();
    for (sender, mut answers) in streams {
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < until {
                sender.send(heartbeat(done as i64)).await.unwrap();
                let message = answers.message().await.unwrap().unwrap();
                if let Some(Out::Ack(ack)) = message.kind {
                    assert!(!ack.coalesced);
                    done += 1;
                }
            }
            done
        });
    }
    let mut streamed = 0;
    while let Some(done) = tasks.join_next().await {
        streamed += done.unwrap();
    }
    let streamed_rate = streamed as f64 / RUN.as_secs_f64();
    let streamed_cpu = (cpu().0 - streamed_cpu.0, cpu().1 - streamed_cpu.1);
    let per_beat = |cpu: f64, count: u64| cpu * 1e6 / count.max(1) as f64;
    println!("3. heartbeats per second, {BEATING_STREAMS} in flight, one Redis");
    println!(
        "   through streams {streamed_rate:>8.0}/s   raw heartbeat script {raw_rate:>8.0}/s   ratio {:.2}x (goal: at least 0.8x)",
        streamed_rate / raw_rate
    );
    println!(
        "   CPU per heartbeat: redis-server {:.1} us streamed vs {:.1} us raw; this process (usher and its clients) {:.1} us streamed vs {:.1} us raw (the store client alone)",
        per_beat(streamed_cpu.0, streamed),
        per_beat(raw_cpu.0, raw),
        per_beat(streamed_cpu.1, streamed),
        per_beat(raw_cpu.1, raw)
    );
    usher.shutdown().await.unwrap();
}

/// Runs the parts named on the command line (`stops`, `heartbeats`, `held`), or all.
async fn run() {
    let server = redis::RedisServer::start();
    if support::wanted("stops") {
        stop_propagation(&server).await;
        println!();
    }
    if support::wanted("heartbeats") {
        heartbeat_rates(&server).await;
        println!();
    }
    if support::wanted("held") {
        streams_held().await;
    }
}

fn main() {
    support::block_on(run());
}
