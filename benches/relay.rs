//! The relay's rate: `cargo bench --bench relay`. On a redis-server and a
//! `nats-server -js` it starts itself (and a fresh database on the machine's PostgreSQL,
//! when one answers on 127.0.0.1:5432, dropped at the end), side by side in one run:
//!
//! - the ceiling: the same log drained with XREADGROUP + XACK alone (256 entries per
//!   read, 16 partitions at once, as the relay reads), events per second;
//! - the relay to NATS JetStream and to PostgreSQL, events per second from the first
//!   read until the sink's group has nothing behind, and the ratio to the ceiling;
//! - the relay's lag under a steady load of creates and stops: its largest and its
//!   median over the run, sampled every 100 ms.
//!
//! Everything shares this machine's cores. It reports numbers; it never fails on a
//! timing.

#[path = "../tests/it/support/redis.rs"]
#[expect(dead_code, reason = "shared with the tests; the bench uses part of it")]
mod redis;
#[expect(dead_code, reason = "shared by the benches; this one uses part of it")]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures::StreamExt;
use tokio::sync::watch;
use usher::deadline::Deadline;
use usher::relay::{RelaySettings, Sink};
use usher::store::{DeviceAction, DeviceCall, Store, StoreSettings};

const SESSIONS: usize = 20_000;
const PARTITIONS: u32 = 64;
const PREFIX: &str = "relaybench";

fn settings() -> StoreSettings {
    StoreSettings {
        partitions: PARTITIONS,
        ..StoreSettings::default()
    }
}

/// `sessions` sessions started and stopped, 64 at a time: two events each.
async fn fill(store: &Arc<dyn Store>, from: usize, sessions: usize) {
    futures::stream::iter(from..from + sessions)
        .for_each_concurrent(64, |i| {
            let store = store.clone();
            async move {
                let new = usher::bench::new_session(&format!("viewer-{i}"), 4).unwrap();
                let created = store.create_session(new, Deadline::NONE).await.unwrap();
                let stop = DeviceCall::new(created.session.name, None, DeviceAction::Stop);
                store.device_call(stop, Deadline::NONE).await.unwrap();
            }
        })
        .await;
}

/// The log drained by a fresh group with XREADGROUP + XACK alone: events per second.
async fn ceiling(url: &str) -> f64 {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let key = |partition: u32| format!("{PREFIX}:{{{partition}}}:events");
    for partition in 0..PARTITIONS {
        let _: Value = client
            .xgroup_create(key(partition), "ceiling", "0", true)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let read: usize = futures::stream::iter(0..PARTITIONS)
        .map(|partition| {
            let client = client.clone();
            async move {
                let mut total = 0;
                loop {
                    let answer: Value = client
                        .xreadgroup("ceiling", "c", Some(256), None, false, key(partition), ">")
                        .await
                        .unwrap();
                    let ids = entry_ids(answer);
                    if ids.is_empty() {
                        return total;
                    }
                    total += ids.len();
                    let _: Value = client.xack(key(partition), "ceiling", ids).await.unwrap();
                }
            }
        })
        .buffer_unordered(16)
        .fold(0, |sum, n| async move { sum + n })
        .await;
    read as f64 / started.elapsed().as_secs_f64()
}

/// The entry ids of an XREADGROUP answer (RESP2 or RESP3).
fn entry_ids(answer: Value) -> Vec<String> {
    let streams = match answer {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(map) => map.inner().into_values().collect(),
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .flat_map(|entries| match entries {
            Value::Array(entries) => entries,
            _ => Vec::new(),
        })
        .filter_map(|entry| match entry {
            Value::Array(pair) => pair.first().and_then(Value::as_string),
            _ => None,
        })
        .collect()
}

/// A relay of `sink` until its group has nothing behind: events per second.
async fn drain(store: &Arc<dyn Store>, sink: Arc<dyn Sink>, total: usize) -> f64 {
    let group = sink.group().to_owned();
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let relay = usher::relay::spawn(store.clone(), sink, relay_settings(), stopped);
    loop {
        let (behind, _, _) = usher::relay::lag(&**store, &group).await.unwrap();
        if behind == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    relay.await.unwrap();
    rate
}

fn relay_settings() -> RelaySettings {
    RelaySettings {
        busy_poll: Duration::from_millis(1),
        ..RelaySettings::default()
    }
}

/// `nats-server -js` on a free port, with its store in `dir`.
fn nats(dir: &std::path::Path) -> (Child, u16) {
    let port = redis::free_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server on PATH (Debian: nats-server)");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "nats-server");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// A fresh database on the machine's PostgreSQL, or `None`.
async fn database() -> Option<(tokio_postgres::Client, String)> {
    let (client, connection) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
        tokio_postgres::NoTls,
    )
    .await
    .ok()?;
    tokio::spawn(connection);
    let name = format!("usher_bench_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .ok()?;
    Some((client, name))
}

async fn run() {
    let server = redis::RedisServer::start();
    let store = support::redis_store(server.url(), PREFIX, settings()).await;
    fill(&store, 0, SESSIONS).await;
    let total = SESSIONS * 2;
    let ceiling = ceiling(&server.url()).await;

    let nats_dir = tempfile::tempdir().unwrap();
    let (mut nats_server, port) = nats(nats_dir.path());
    let nats_url = format!("nats://127.0.0.1:{port}");
    let sink = usher::relay::nats::NatsSink::connect(&nats_url, "usher-bench")
        .await
        .unwrap();
    let to_nats = drain(&store, Arc::new(sink), total).await;

    let postgres = database().await;
    let to_postgres = match &postgres {
        Some((_, name)) => {
            let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
            let sink = usher::relay::postgres::PostgresSink::connect(&url)
                .await
                .unwrap();
            Some(drain(&store, Arc::new(sink), total).await)
        }
        None => None,
    };

    // Lag under a steady load: 1,000 sessions a second (2,000 events) for 8 s.
    let sink = usher::relay::nats::NatsSink::connect(&nats_url, "usher-bench")
        .await
        .unwrap();
    let (stop, stopped) = watch::channel(false);
    let relay = usher::relay::spawn(
        store.clone(),
        Arc::new(sink),
        RelaySettings::default(),
        stopped,
    );
    let load_store = store.clone();
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for second_tenth in 0..80 {
            tick.tick().await;
            fill(&load_store, SESSIONS + second_tenth * 100, 100).await;
        }
    });
    let mut samples = Vec::new();
    while !load.is_finished() {
        let (behind, _, _) = usher::relay::lag(&*store, "relay-nats").await.unwrap();
        samples.push(behind);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    relay.await.unwrap();
    samples.sort_unstable();
    let median = samples.get(samples.len() / 2).copied().unwrap_or(0);
    let largest = samples.last().copied().unwrap_or(0);

    println!("relay, {total} events over {PARTITIONS} partitions, one run");
    println!("{:<48} {:>12} {:>8}", "", "events/s", "ratio");
    println!(
        "{:<48} {:>12.0} {:>8}",
        "XREADGROUP + XACK alone (the ceiling)", ceiling, "1.00"
    );
    println!(
        "{:<48} {:>12.0} {:>8.2}",
        "relay to NATS JetStream",
        to_nats,
        to_nats / ceiling
    );
    match to_postgres {
        Some(rate) => println!(
            "{:<48} {:>12.0} {:>8.2}",
            "relay to PostgreSQL",
            rate,
            rate / ceiling
        ),
        None => println!("relay to PostgreSQL: skipped, no PostgreSQL on 127.0.0.1:5432"),
    }
    println!(
        "lag under 2,000 events/s for 8 s (relay to NATS): median {median}, largest {largest} events"
    );

    let _ = nats_server.kill();
    let _ = nats_server.wait();
    if let Some((client, name)) = postgres {
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

fn main() {
    support::block_on(run());
}
