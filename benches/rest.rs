//! One unary call over gRPC and over the REST shim, side by side in one run:
//! `cargo bench --bench rest`. GetSession through the same in-process server (memory
//! store) and the same HTTP/2 client stack (a tonic `Channel`): gRPC with the generated
//! client, REST as `GET /v1/{name}` answered in JSON. It reports numbers; it never fails
//! on a timing.

#[path = "support/mod.rs"]
#[expect(dead_code, reason = "shared by the benches; this one uses part of it")]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tower::ServiceExt;
use usher::entitlement::StaticPolicy;
use usher::proto;
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;

/// The usher binary's allocator (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IN_FLIGHT: usize = 64;
const RUN: Duration = Duration::from_secs(3);

/// Calls per second of `call`, IN_FLIGHT at a time, for RUN.
async fn rate<F, Fut>(call: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let until = Instant::now() + RUN;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let call = call.clone();
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < until {
                call().await;
                done += 1;
            }
            done
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.unwrap();
    }
    total as f64 / RUN.as_secs_f64()
}

async fn run() {
    let (server, channel) = support::serve_memory(Arc::new(StaticPolicy::open(4).unwrap())).await;
    let mut sessions = PlaybackSessionServiceClient::new(channel.clone());
    let created = sessions
        .create_session(support::create_request("bench", "tv"))
        .await
        .unwrap()
        .into_inner();
    let name = created.session.unwrap().name;

    let grpc_name = name.clone();
    let grpc = rate(move || {
        let mut sessions = sessions.clone();
        let name = grpc_name.clone();
        async move {
            sessions
                .get_session(proto::GetSessionRequest { name })
                .await
                .unwrap();
        }
    })
    .await;

    let uri: http::Uri = format!("http://{}/v1/{name}", server.addr).parse().unwrap();
    let rest = rate(move || {
        let channel = channel.clone();
        let uri = uri.clone();
        async move {
            let request = http::Request::get(uri)
                .body(tonic::body::Body::empty())
                .unwrap();
            let answer = channel.oneshot(request).await.unwrap();
            assert_eq!(answer.status(), 200);
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            assert!(body.starts_with(b"{\"session\""));
        }
    })
    .await;
    println!(
        "GetSession, {IN_FLIGHT} in flight, {}s each, one HTTP/2 connection",
        RUN.as_secs()
    );
    println!(
        "  gRPC {grpc:>9.0}/s   REST (JSON) {rest:>9.0}/s   REST/gRPC {:.2}x",
        rest / grpc
    );
    server.shutdown().await.unwrap();
}

fn main() {
    support::block_on(run());
}
