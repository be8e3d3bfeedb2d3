//! The relay to NATS JetStream, against a `nats-server -js` the test starts: after mixed
//! traffic, every event of the store's logs is in JetStream exactly once, although one
//! relay hung after publishing a batch and was killed before acknowledging it, and the
//! NATS server was killed and started again meanwhile. On memory, Redis and the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use usher::deadline::Deadline;
use usher::proto;
use usher::relay::nats::{NatsSink, STREAM};
use usher::relay::postgres::PostgresSink;
use usher::relay::{RelaySettings, Sink, SinkError};
use usher::store::memory::MemoryStore;
use usher::store::redis::{RedisStore, RedisTarget};
use usher::store::{DeviceAction, DeviceCall, OverLimitPolicy, Store, StoreSettings};

use crate::support::nats::NatsServer;
use crate::support::{
    Kind, new_session, redis, redis_options, store_of, test_settings, unique_prefix, user,
};

/// A sink that delivers `good` batches, then delivers the next one and hangs before
/// confirming it: a relay that dies mid-batch.
struct HangsMidBatch {
    inner: Arc<dyn Sink>,
    good: AtomicUsize,
}

#[async_trait]
impl Sink for HangsMidBatch {
    fn group(&self) -> &str {
        self.inner.group()
    }

    async fn deliver(&self, events: &[proto::Event]) -> Result<(), SinkError> {
        self.inner.deliver(events).await?;
        if self.good.fetch_sub(1, Ordering::SeqCst) == 0 {
            futures::future::pending::<()>().await;
        }
        Ok(())
    }
}

fn settings(consumer: &str) -> RelaySettings {
    RelaySettings {
        consumer: consumer.into(),
        batch: 8,
        claim_after: Duration::from_millis(700),
        busy_poll: Duration::from_millis(20),
        idle_poll: Duration::from_millis(50),
    }
}

/// Sessions of `users` users that make every kind of event but expiry (see `linger`):
/// started, a heartbeat, paused (every fourth past the finish of its title, so
/// completed too), resumed, and then terminated, stopped, or evicted by the same
/// device's next session (which is stopped).
async fn traffic(store: &Arc<dyn Store>, tag: &str, users: usize) {
    for i in 0..users {
        let owner = user(&format!("relay-{tag}-{i}"));
        let start = || async {
            store
                .create_session(
                    new_session(&owner, "tv", 3, OverLimitPolicy::RejectNew),
                    Deadline::NONE,
                )
                .await
                .unwrap()
                .session
                .name
        };
        let name = start().await;
        let call = |action, position_ms: Option<u64>, duration_ms: Option<u64>| DeviceCall {
            position_ms,
            duration_ms,
            ..DeviceCall::new(name.clone(), None, action)
        };
        let playing = DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        };
        let finish = (i % 4 == 1).then_some(5_500_000);
        for call in [
            call(playing, Some(60_000), None),
            call(DeviceAction::Pause, finish, Some(6_000_000)),
            call(DeviceAction::Resume, None, None),
        ] {
            store.device_call(call, Deadline::NONE).await.unwrap();
        }
        match i % 3 {
            0 => {
                let termination = usher::session::Termination {
                    message: "test".into(),
                    by: "relay-test".into(),
                };
                store
                    .terminate(&name, &termination, Deadline::NONE)
                    .await
                    .unwrap();
            }
            1 => {
                let stop = DeviceCall::new(name, None, DeviceAction::Stop);
                store.device_call(stop, Deadline::NONE).await.unwrap();
            }
            _ => {
                let next = start().await;
                let stop = DeviceCall::new(next, None, DeviceAction::Stop);
                store.device_call(stop, Deadline::NONE).await.unwrap();
            }
        }
    }
}

/// A session left to expire: `expire` ends it once its deadline has passed.
async fn linger(store: &Arc<dyn Store>, tag: &str) -> Instant {
    let owner = user(&format!("relay-{tag}-lingering"));
    store
        .create_session(
            new_session(&owner, "tv", 3, OverLimitPolicy::RejectNew),
            Deadline::NONE,
        )
        .await
        .unwrap();
    Instant::now()
}

/// Sweeps every partition once the lingering session's deadline has passed.
async fn expire(store: &Arc<dyn Store>, since: Instant) {
    let timeout = store.settings().heartbeat_timeout + Duration::from_millis(300);
    tokio::time::sleep(timeout.saturating_sub(since.elapsed())).await;
    for partition in 0..store.settings().partitions {
        store.sweep(partition, 100).await.unwrap();
    }
}

/// Every kind of event is among `events` (types by id).
fn every_kind(events: &BTreeMap<String, String>) {
    for kind in usher::store::EventKind::ALL {
        assert!(
            events.values().any(|k| k == kind.as_str()),
            "no {kind} in the run"
        );
    }
}

/// Every event id of the store's logs, with its type.
async fn logged(store: &Arc<dyn Store>) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for partition in 0..store.settings().partitions {
        for event in store.read_events(partition, None, 100_000).await.unwrap() {
            all.insert(
                usher::events::event_id(partition, &event),
                event.kind.as_str().to_owned(),
            );
        }
    }
    all
}

/// Every message of the JetStream stream: its `Nats-Msg-Id` and subject, in order.
async fn in_jetstream(url: &str) -> Vec<(String, String)> {
    let client = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let Ok(mut stream) = jetstream.get_stream(STREAM).await else {
        return Vec::new();
    };
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let id = match message.headers.get(async_nats::header::NATS_MESSAGE_ID) {
            Some(id) => id.to_string(),
            None => panic!("no Nats-Msg-Id: {:?}", message.headers),
        };
        let cloud: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(cloud["id"], id.as_str());
        assert_eq!(cloud["specversion"], "1.0");
        assert_eq!(
            message.subject.as_str(),
            format!("usher.events.{}", cloud["type"].as_str().unwrap())
        );
        messages.push((id, cloud["type"].as_str().unwrap().to_owned()));
    }
    messages
}

async fn every_event_once(store: Arc<dyn Store>) {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let url = nats.url();
    let (stop, stopped) = watch::channel(false);
    // A relay that publishes two batches, then hangs on its third, unconfirmed.
    let hanging = HangsMidBatch {
        inner: Arc::new(NatsSink::connect(&url, "usher-test").await.unwrap()),
        good: AtomicUsize::new(2),
    };
    let first = usher::relay::spawn(
        store.clone(),
        Arc::new(hanging),
        settings("a"),
        stopped.clone(),
    );
    let lingering = linger(&store, "one").await;
    traffic(&store, "one", 12).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.abort();

    // NATS goes down while more traffic comes, and a second relay starts.
    nats.kill();
    traffic(&store, "two", 6).await;
    // Two relays take over and share the work from now on.
    let mut relays = Vec::new();
    let mut shares = Vec::new();
    for consumer in ["b", "c"] {
        let sink = Arc::new(Counted {
            inner: Arc::new(NatsSink::connect(&url, "usher-test").await.unwrap()),
            delivered: AtomicUsize::new(0),
        });
        shares.push(sink.clone());
        relays.push(usher::relay::spawn(
            store.clone(),
            sink,
            settings(consumer),
            stopped.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();
    traffic(&store, "three", 20).await;
    expire(&store, lingering).await;

    let expected = logged(&store).await;
    every_kind(&expected);
    let started = Instant::now();
    let delivered = loop {
        let delivered = in_jetstream(&url).await;
        if delivered.len() >= expected.len() || started.elapsed() > Duration::from_secs(30) {
            break delivered;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A moment more: anything duplicated late would show.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let delivered = if delivered.len() == expected.len() {
        in_jetstream(&url).await
    } else {
        delivered
    };
    let ids: BTreeSet<&String> = delivered.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), delivered.len(), "an event twice in JetStream");
    let delivered: BTreeMap<String, String> = delivered.into_iter().collect();
    assert_eq!(delivered, expected, "every event, once");
    let shares: Vec<usize> = shares
        .iter()
        .map(|s| s.delivered.load(Ordering::SeqCst))
        .collect();
    assert!(
        shares.iter().all(|n| *n > 0),
        "both relays take part: {shares:?}"
    );
    stop.send(true).unwrap();
    for relay in relays {
        relay.await.unwrap();
    }
}

/// A sink that counts what it delivered.
struct Counted {
    inner: Arc<dyn Sink>,
    delivered: AtomicUsize,
}

#[async_trait]
impl Sink for Counted {
    fn group(&self) -> &str {
        self.inner.group()
    }

    async fn deliver(&self, events: &[proto::Event]) -> Result<(), SinkError> {
        self.inner.deliver(events).await?;
        self.delivered.fetch_add(events.len(), Ordering::SeqCst);
        Ok(())
    }
}

/// Sessions live 2 s without a heartbeat: the lingering one expires during the run.
fn store_settings() -> StoreSettings {
    StoreSettings {
        heartbeat_timeout: Duration::from_secs(2),
        ..test_settings()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_every_event_once_in_memory() {
    every_event_once(store_of(Kind::Memory, store_settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_every_event_once_on_redis() {
    every_event_once(store_of(Kind::Redis, store_settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_every_event_once_on_a_cluster() {
    every_event_once(store_of(Kind::Cluster, store_settings()).await).await;
}

/// `--relay nats://...`: the server relays what its calls write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_relays_with_the_relay_flag() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let mut config = crate::support::test_config(OverLimitPolicy::RejectNew);
    config.relay.sinks = vec![nats.url()];
    config.relay.source = "usher://test".into();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(store_settings()));
    let components = crate::support::components(
        store,
        Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    );
    let mut server = crate::support::serve_components(&config, components).await;
    let session = server.start("lena", "tv").await;
    server.stop(&session.name).await.unwrap();
    let started = Instant::now();
    let delivered = loop {
        let delivered = in_jetstream(&nats.url()).await;
        if delivered.len() >= 2 || started.elapsed() > Duration::from_secs(10) {
            break delivered;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let types: Vec<&str> = delivered.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(types, ["playback.started", "playback.stopped"]);
    server.running.shutdown().await.unwrap();
}

/// A database of its own for one test on the machine's PostgreSQL (127.0.0.1:5432,
/// trust), dropped when the test ends, whatever happens.
struct Database {
    name: String,
}

const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

impl Database {
    /// `None` when no PostgreSQL answers (outside CI; under CI that fails the test).
    async fn create() -> Option<Database> {
        let Ok((client, connection)) =
            tokio_postgres::connect(&format!("{POSTGRES}/postgres"), tokio_postgres::NoTls).await
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL on 127.0.0.1:5432 is required under CI"
            );
            eprintln!("skipped: no PostgreSQL on 127.0.0.1:5432");
            return None;
        };
        tokio::spawn(connection);
        let name = format!("usher_test_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(Database { name })
    }

    fn url(&self) -> String {
        format!("{POSTGRES}/{}", self.name)
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own thread and runtime: Drop cannot wait on the test's.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&format!("{POSTGRES}/postgres"), tokio_postgres::NoTls)
                        .await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The PostgreSQL sink: every event once in `playback_events`, one row per session with
/// its start, end, reason and actor, and the latest position per title, although a relay
/// hung mid-batch (its batch committed, never acknowledged) and another took over; and
/// the migrations apply once, whoever starts first.
async fn history_in_postgres(store: Arc<dyn Store>) {
    let Some(database) = Database::create().await else {
        return;
    };
    let (stop, stopped) = watch::channel(false);
    let sink: Arc<dyn Sink> = Arc::new(PostgresSink::connect(&database.url()).await.unwrap());
    // A second instance starting on the same database applies nothing again.
    PostgresSink::connect(&database.url()).await.unwrap();
    let hanging = HangsMidBatch {
        inner: sink.clone(),
        good: AtomicUsize::new(2),
    };
    let first = usher::relay::spawn(
        store.clone(),
        Arc::new(hanging),
        settings("a"),
        stopped.clone(),
    );
    let lingering = linger(&store, "pg").await;
    traffic(&store, "pg", 12).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.abort();
    let second = usher::relay::spawn(store.clone(), sink, settings("b"), stopped);
    expire(&store, lingering).await;

    let expected = logged(&store).await;
    every_kind(&expected);
    let client = database.client().await;
    let started = Instant::now();
    loop {
        let count: i64 = client
            .query_one("SELECT count(*) FROM playback_events", &[])
            .await
            .unwrap()
            .get(0);
        if count as usize >= expected.len() || started.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = client
        .query("SELECT id, type FROM playback_events", &[])
        .await
        .unwrap();
    let stored: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, expected, "every event, once");
    let sessions = client
        .query(
            "SELECT session, started IS NOT NULL, ended IS NOT NULL, end_reason, actor,
                    operator_reason, final_position_ms
             FROM playback_sessions ORDER BY session",
            &[],
        )
        .await
        .unwrap();
    // 12 sessions, 4 replacements (evicting the first), and the lingering one.
    assert_eq!(sessions.len(), 17);
    let mut reasons = BTreeMap::new();
    for row in &sessions {
        assert!(
            row.get::<_, bool>(1) && row.get::<_, bool>(2),
            "started and ended"
        );
        let reason: String = row.get::<_, Option<String>>(3).expect("an end reason");
        if reason == "END_REASON_TERMINATED_BY_OPERATOR" {
            assert_eq!(row.get::<_, Option<&str>>(4), Some("relay-test"));
            assert_eq!(row.get::<_, Option<&str>>(5), Some("test"));
        } else {
            assert_eq!(row.get::<_, Option<&str>>(4), None);
        }
        *reasons.entry(reason).or_insert(0) += 1;
    }
    let reasons: Vec<(&str, i32)> = reasons.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    assert_eq!(
        reasons,
        [
            ("END_REASON_HEARTBEAT_TIMEOUT", 1),
            ("END_REASON_REPLACED_BY_SAME_DEVICE", 4),
            ("END_REASON_STOPPED_BY_DEVICE", 8),
            ("END_REASON_TERMINATED_BY_OPERATOR", 4),
        ]
    );
    // The latest position per title of each user who played one.
    let progress: i64 = client
        .query_one("SELECT count(*) FROM watch_progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(progress, 12);
    let versions: i64 = client
        .query_one("SELECT count(*) FROM usher_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 1);
    stop.send(true).unwrap();
    second.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_the_session_history_in_postgres_on_redis() {
    history_in_postgres(store_of(Kind::Redis, store_settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_the_session_history_in_postgres_on_a_cluster() {
    history_in_postgres(store_of(Kind::Cluster, store_settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_the_session_history_in_postgres_in_memory() {
    history_in_postgres(store_of(Kind::Memory, store_settings()).await).await;
}

/// `usher relay` as a process of its own: `--status` shows the backlog, the relay
/// delivers it, `--status` then shows nothing behind, and SIGTERM stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usher_relay_runs_as_its_own_process() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let redis_url = redis::shared_redis().url();
    let prefix = unique_prefix();
    let options = redis_options(
        RedisTarget::Single {
            url: redis_url.clone(),
        },
        &prefix,
    );
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(options, store_settings())
            .await
            .unwrap(),
    );
    traffic(&store, "process", 3).await;
    let expected = logged(&store).await;
    let usher = |extra: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_usher"));
        command
            .args([
                "relay",
                "--store",
                &redis_url,
                "--redis-key-prefix",
                &prefix,
            ])
            .args(["--partitions", "4", "--relay", &nats.url(), "--log", "warn"])
            .args(extra);
        command
    };
    let status = |expected_behind: usize| {
        let output = usher(&["--status"]).output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(line["group"], "relay-nats");
        assert_eq!(line["behind"], expected_behind, "{line}");
        let by_partition: u64 = line["partitions_behind"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p["pending"].as_u64().unwrap() + p["unread"].as_u64().unwrap())
            .sum();
        assert_eq!(by_partition as usize, expected_behind, "{line}");
    };
    status(expected.len());
    let mut relay = usher(&[]).spawn().unwrap();
    let started = Instant::now();
    while in_jetstream(&nats.url()).await.len() < expected.len() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not relayed in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    status(0);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    let exited = relay.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
    let delivered: BTreeMap<String, String> = in_jetstream(&nats.url()).await.into_iter().collect();
    assert_eq!(delivered, expected);
}

/// A sink that is down at start does not keep usher from serving: the relay delivers
/// once it answers (here it never does), and calls are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_at_start_does_not_stop_the_server() {
    let port = crate::support::redis::free_port();
    let mut config = crate::support::test_config(OverLimitPolicy::RejectNew);
    config.relay.sinks = vec![
        format!("postgres://postgres@127.0.0.1:{port}/nowhere"),
        format!("nats://127.0.0.1:{port}"),
    ];
    let components = crate::support::components(
        store_of(Kind::Memory, store_settings()).await,
        Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    );
    let started = Instant::now();
    let mut server = crate::support::serve_components(&config, components).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let session = server.start("mo", "tv").await;
    server.stop(&session.name).await.unwrap();
    server.running.shutdown().await.unwrap();
}
