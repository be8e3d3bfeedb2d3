//! A reconnect storm: 5,000 device streams on one instance (on a redis-server of the
//! test's own) are cut at once, and every device reconnects after a random delay within
//! the spread usher tells devices (`--reconnect-spread`, 10 s here). No seat is lost, no second
//! session appears, the p99 of a reconnect (open to first ack) is reported, and Redis'
//! SLOWLOG holds nothing slower than 50 ms; what took over 10 ms is reported (see below).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use usher::deadline::Deadline;
use usher::entitlement::StaticPolicy;
use usher::proto;
use usher::proto::stream_heartbeats_response::Kind as Out;
use usher::proto::streaming_service_client::StreamingServiceClient;
use usher::store::redis::{RedisOptions, RedisStore, RedisTarget};
use usher::store::{OverLimitPolicy, Store};
use usher::token::keys::{KeyAlgorithm, KeyRing, KeySet};
use usher::token::{TokenSettings, Tokens};

use crate::streaming::{playing, stream_config};
use crate::support::{
    components, new_session, redis, redis_options, serve_components, test_settings, unique_prefix,
    user,
};

const STREAMS: usize = 5_000;
/// Client connections, each under `--max-streams-per-connection` (1,000).
const CONNECTIONS: usize = 10;

async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A device's stream: what keeps it open, and how long its first ack took.
struct Open {
    _sender: mpsc::Sender<proto::StreamHeartbeatsRequest>,
    _answers: tonic::Streaming<proto::StreamHeartbeatsResponse>,
    took: Duration,
}

/// Opens a stream on `channel` with `token` and waits for its first ack, as a device
/// does: an UNAVAILABLE answer (an overloaded instance) is tried again after a jittered
/// backoff (up to 100 ms, doubling to at most 3.2 s) for up to 90 s. `took` counts from
/// the first try.
async fn open(channel: Channel, token: String, seed: u64) -> (Open, u32) {
    let started = Instant::now();
    let mut retries = 0;
    loop {
        match try_open(channel.clone(), &token).await {
            Ok((sender, answers)) => {
                let open = Open {
                    _sender: sender,
                    _answers: answers,
                    took: started.elapsed(),
                };
                return (open, retries);
            }
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && started.elapsed() < Duration::from_secs(90) =>
            {
                let ceiling = 100u64 << retries.min(5);
                let wait = ((seed ^ u64::from(retries)).wrapping_mul(6364136223846793005) >> 33)
                    % ceiling
                    + 1;
                retries += 1;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(status) => panic!("the stream does not open: {status:?}"),
        }
    }
}

type Opened = (
    mpsc::Sender<proto::StreamHeartbeatsRequest>,
    tonic::Streaming<proto::StreamHeartbeatsResponse>,
);

/// One try: the stream, once acked.
async fn try_open(channel: Channel, token: &str) -> Result<Opened, tonic::Status> {
    let (sender, requests) = mpsc::channel(4);
    sender.send(playing(1)).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    let bearer = MetadataValue::try_from(format!("Bearer {token}")).unwrap();
    request.metadata_mut().insert("authorization", bearer);
    let mut answers = StreamingServiceClient::new(channel)
        .stream_heartbeats(request)
        .await?
        .into_inner();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), answers.message())
            .await
            .expect("an answer in time")?
            .expect("the stream is open");
        match message.kind {
            Some(Out::Ack(_)) => return Ok((sender, answers)),
            Some(Out::Stop(stop)) => panic!("stopped: {stop:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_loses_no_seat_and_makes_no_second_session() {
    let redis = redis::RedisServer::start();
    // Everything over 10 ms is logged and reported; the test fails over 50 ms: run alone
    // the storm stays under 10 ms, but beside the rest of the suite on two cores Redis is
    // preempted inside a script now and then (a 64-call heartbeat batch was logged at
    // 14.6 ms once).
    redis.cli(&["config", "set", "slowlog-log-slower-than", "10000"]);
    redis.cli(&["config", "set", "slowlog-max-len", "1024"]);
    let prefix = unique_prefix();
    // Long enough a timeout that only a lost seat, not the test's pace, could end one.
    let settings = usher::store::StoreSettings {
        heartbeat_timeout: Duration::from_secs(300),
        ..test_settings()
    };
    let target = RedisTarget::Single { url: redis.url() };
    // The production store timeout (1 s), not the tests' shorter one.
    let options = RedisOptions {
        timeout: Duration::from_secs(1),
        ..redis_options(target, &prefix)
    };
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(options, settings).await.unwrap());
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.heartbeat_timeout = Duration::from_secs(300);
    // The spread an instance of 5,000 devices tells them: 500 reconnects a second, which
    // the test build absorbs while the rest of the suite runs beside it.
    config.streams.reconnect_spread = Duration::from_secs(10);
    let spread = config.streams.reconnect_spread;
    let mut parts = components(store.clone(), Arc::new(StaticPolicy::open(2).unwrap()));
    // HS256: an unoptimised (test) build verifies an Ed25519 signature in milliseconds,
    // which would measure the test build's curve arithmetic, not the storm.
    let keys = KeySet::generate(KeyAlgorithm::Hs256).unwrap();
    let ring = KeyRing::from_set(&keys, Duration::from_secs(60)).unwrap();
    parts.tokens = Arc::new(Tokens::new(TokenSettings::default(), ring));
    let tokens = parts.tokens.clone();
    let server = serve_components(&config, parts).await;

    // The sessions straight through the store; their tokens from the server's key.
    let phase = Instant::now();
    let mut sessions = Vec::with_capacity(STREAMS);
    for chunk in (0..STREAMS).collect::<Vec<_>>().chunks(250) {
        let creates = chunk.iter().map(|i| {
            let new = new_session(
                &user(&format!("storm-{i}")),
                "tv",
                2,
                OverLimitPolicy::RejectNew,
            );
            store.create_session(new, Deadline::NONE)
        });
        for created in futures::future::join_all(creates).await {
            let session = created.unwrap().session;
            let token = tokens.issue(&session, &Default::default()).unwrap().token;
            sessions.push((session, token));
        }
    }
    redis.cli(&["slowlog", "reset"]);
    println!("{STREAMS} sessions created in {:?}", phase.elapsed());
    let phase = Instant::now();

    let channels: Vec<Channel> =
        futures::future::join_all((0..CONNECTIONS).map(|_| connect(server.running.addr))).await;
    // Opened 250 at a time: the storm is the reconnect, not this.
    let mut first = Vec::with_capacity(STREAMS);
    for (n, chunk) in sessions.chunks(250).enumerate() {
        let opens = chunk.iter().enumerate().map(|(i, (_, token))| {
            let channel = channels[(n * 250 + i) % CONNECTIONS].clone();
            tokio::spawn(open(channel, token.clone(), i as u64))
        });
        for opened in futures::future::join_all(opens).await {
            first.push(opened.unwrap().0);
        }
    }

    println!("{STREAMS} streams opened in {:?}", phase.elapsed());
    // The cut: every stream and connection gone at once.
    drop(first);
    drop(channels);
    let channels: Vec<Channel> =
        futures::future::join_all((0..CONNECTIONS).map(|_| connect(server.running.addr))).await;
    let storm_started = Instant::now();
    let reconnects = sessions.iter().enumerate().map(|(i, (_, token))| {
        let channel = channels[i % CONNECTIONS].clone();
        let token = token.clone();
        let delay = spread.mul_f64((i * 7919 % STREAMS) as f64 / STREAMS as f64);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            open(channel, token, i as u64).await
        })
    });
    let (again, retries): (Vec<Open>, Vec<u32>) = futures::future::join_all(reconnects)
        .await
        .into_iter()
        .map(Result::unwrap)
        .unzip();
    let retried = retries.iter().filter(|r| **r > 0).count();
    let storm = storm_started.elapsed();
    let mut took: Vec<Duration> = again.iter().map(|o| o.took).collect();
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    println!(
        "{STREAMS} streams cut and reconnected over {spread:?}: all back in {storm:?}, \
         reconnect p50 {:?}, p99 {p99:?}, max {:?}; {retried} devices retried after \
         UNAVAILABLE ({} tries)",
        took[took.len() / 2],
        took[took.len() - 1],
        retries.iter().sum::<u32>()
    );

    // Every seat held by its own session, none lost, none doubled.
    for (session, _) in &sessions {
        let seats = store
            .seats(&session.name.user, Deadline::NONE)
            .await
            .unwrap();
        assert_eq!(seats.holders.len(), 1, "{}", session.name);
        let holder = &seats.holders[0];
        assert_eq!(holder.name, session.name);
        assert_eq!(holder.generation, session.generation);
    }
    // [id, time, microseconds, [command, args...], client, name] per entry.
    let output = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--json",
            "slowlog",
            "get",
            "1024",
        ])
        .output()
        .expect("redis-cli");
    let slow: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    let durations: Vec<u64> = slow.iter().filter_map(|e| e[2].as_u64()).collect();
    println!(
        "SLOWLOG: {} commands over 10 ms, the slowest {} µs",
        durations.len(),
        durations.iter().max().unwrap_or(&0)
    );
    assert!(
        durations.iter().all(|&us| us <= 50_000),
        "Redis commands over 50 ms: {slow:?}"
    );
    drop(again);
    server.running.shutdown().await.unwrap();
}
