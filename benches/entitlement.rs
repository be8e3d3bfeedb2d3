//! CreateSession over the HTTP entitlement provider, warm-cached, against the static
//! policy, side by side in one run: `cargo bench --bench entitlement`. Two in-process
//! servers on the memory store; the HTTP one asks an identity and a content service this
//! bench starts on loopback (axum), which count the calls that reach them. Users come
//! from a pool that is asked once before measuring, so the cache is warm. It reports
//! throughput, p99 and upstream calls per thousand creates; it never fails on a timing.

#[path = "support/mod.rs"]
#[expect(dead_code, reason = "shared by the benches; this one uses part of it")]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use usher::entitlement::{HttpEntitlements, HttpSettings, StaticPolicy};
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;

/// The usher binary's allocator (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IN_FLIGHT: usize = 32;
const RUN: Duration = Duration::from_secs(3);
const USERS: usize = 1000;

#[derive(Default)]
struct Calls(AtomicUsize);

async fn identity(State(calls): State<Arc<Calls>>) -> axum::Json<serde_json::Value> {
    calls.0.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({"allowed": true, "seat_limit": 4,
        "devices": {"max_resolution": {"default": 1080}}}))
}

async fn content(
    State(calls): State<Arc<Calls>>,
    Query(_): Query<HashMap<String, String>>,
) -> axum::Json<serde_json::Value> {
    calls.0.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({"available": true}))
}

/// The identity and content services on one port; their shared call counter.
async fn platform() -> (String, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let app = axum::Router::new()
        .route("/entitlements", axum::routing::get(identity))
        .route("/availability", axum::routing::get(content))
        .with_state(calls.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

struct Measured {
    rate: f64,
    p99: Duration,
    creates: usize,
    failed: usize,
}

/// Creates of pool users, IN_FLIGHT at a time, for RUN.
async fn creates(channel: &Channel) -> Measured {
    let until = Instant::now() + RUN;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..IN_FLIGHT {
        let mut sessions = PlaybackSessionServiceClient::new(channel.clone());
        tasks.spawn(async move {
            let (mut latencies, mut failed) = (Vec::new(), 0);
            let mut i = worker;
            while Instant::now() < until {
                let user = format!("viewer-{}", i % USERS);
                let started = Instant::now();
                let request = support::create_request(&user, &format!("tv-{worker}"));
                if sessions.create_session(request).await.is_err() {
                    failed += 1;
                }
                latencies.push(started.elapsed());
                i += IN_FLIGHT;
            }
            (latencies, failed)
        });
    }
    let (mut latencies, mut failed) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (mine, not) = done.unwrap();
        latencies.extend(mine);
        failed += not;
    }
    latencies.sort();
    Measured {
        rate: latencies.len() as f64 / RUN.as_secs_f64(),
        p99: latencies[latencies.len() * 99 / 100],
        creates: latencies.len(),
        failed,
    }
}

async fn run() {
    let (url, calls) = platform().await;
    let settings = HttpSettings {
        identity_url: Some(url.parse().unwrap()),
        content_url: Some(url.parse().unwrap()),
        ..HttpSettings::default()
    };
    let http = HttpEntitlements::new(StaticPolicy::open(4).unwrap(), settings).unwrap();
    let (static_server, static_channel) =
        support::serve_memory(Arc::new(StaticPolicy::open(4).unwrap())).await;
    let (http_server, http_channel) = support::serve_memory(Arc::new(http)).await;
    // Warm: every pool user asked once, on every worker's device type (all TVs).
    let warm = creates(&http_channel).await;
    println!(
        "warm-up: {} creates, {} upstream calls",
        warm.creates,
        calls.0.load(Ordering::Relaxed)
    );

    println!(
        "CreateSession, {IN_FLIGHT} in flight, {}s each, {USERS} users, memory store",
        RUN.as_secs()
    );
    for round in 1..=2 {
        let fixed = creates(&static_channel).await;
        let before = calls.0.load(Ordering::Relaxed);
        let cached = creates(&http_channel).await;
        let upstream = calls.0.load(Ordering::Relaxed) - before;
        println!(
            "  round {round}: static {:>7.0}/s p99 {:>6.2} ms | HTTP cached {:>7.0}/s p99 {:>6.2} ms | \
             HTTP/static {:.2}x | upstream calls per 1000 creates {:.2} | failed {}+{}",
            fixed.rate,
            fixed.p99.as_secs_f64() * 1e3,
            cached.rate,
            cached.p99.as_secs_f64() * 1e3,
            cached.rate / fixed.rate,
            upstream as f64 * 1000.0 / cached.creates as f64,
            fixed.failed,
            cached.failed,
        );
    }
    static_server.shutdown().await.unwrap();
    http_server.shutdown().await.unwrap();
}

fn main() {
    support::block_on(run());
}
