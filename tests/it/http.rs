//! Plain HTTP on the gRPC listener: health, readiness, the JWKS, and JSON refusals, with
//! gRPC still answered on the same port.

use std::time::Duration;

use serde_json::Value;
use usher::proto;
use usher::store::OverLimitPolicy;

use crate::support::{http, serve};

fn memory_store() -> std::sync::Arc<dyn usher::store::Store> {
    std::sync::Arc::new(usher::store::memory::MemoryStore::new(
        crate::support::test_settings(),
    ))
}

#[tokio::test]
async fn plain_http_routes_answer_beside_grpc() {
    let server = serve(memory_store(), 2, OverLimitPolicy::RejectNew).await;
    let addr = server.running.addr;

    let health = http(addr, "GET", "/healthz", &[]).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let mut ready = http(addr, "GET", "/readyz", &[]).await;
    for _ in 0..50 {
        if ready.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        ready = http(addr, "GET", "/readyz", &[]).await;
    }
    assert_eq!(ready.status, 200, "{}", ready.body);

    // The JWKS over HTTP is GetJwks over gRPC, cacheable, with an ETag.
    let jwks = http(addr, "GET", "/.well-known/jwks.json", &[]).await;
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.headers["content-type"], "application/json");
    assert_eq!(jwks.headers["cache-control"], "public, max-age=60");
    let served: Value = serde_json::from_str(&jwks.body).unwrap();
    let over_grpc = proto::token_service_client::TokenServiceClient::new(server.channel.clone())
        .get_jwks(proto::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        served["keys"].as_array().unwrap().len(),
        over_grpc.keys.len()
    );
    for (json, key) in served["keys"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&over_grpc.keys)
    {
        assert_eq!(json["kid"], key.kid.as_str());
        assert_eq!(json["x"], key.x.as_str());
        assert_eq!(json["use"], "sig");
    }
    let etag = jwks.headers["etag"].clone();
    let unchanged = http(
        addr,
        "GET",
        "/.well-known/jwks.json",
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!((unchanged.status, unchanged.body.as_str()), (304, ""));
    let other = http(
        addr,
        "GET",
        "/.well-known/jwks.json",
        &[("if-none-match", "\"x\"")],
    )
    .await;
    assert_eq!(other.status, 200);

    // Refusals are google.rpc.Status JSON with an ErrorInfo.
    let missing = http(addr, "GET", "/nowhere", &[]).await;
    assert_eq!(missing.status, 404);
    let status: Value = serde_json::from_str(&missing.body).unwrap();
    assert_eq!(status["code"], 5);
    assert_eq!(
        status["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );
    assert_eq!(status["details"][0]["reason"], "NOT_FOUND");
    let wrong_method = http(addr, "POST", "/healthz", &[]).await;
    assert_eq!(wrong_method.status, 405);
    let status: Value = serde_json::from_str(&wrong_method.body).unwrap();
    assert_eq!(status["code"], 12);

    // gRPC on the same port is untouched, and an unknown gRPC method is still grpc-status 12.
    let mut sessions = server.sessions.clone();
    sessions
        .create_session(crate::support::create_request("hank", "tv"))
        .await
        .unwrap();
    let unknown = crate::hardening::raw_call(
        server.channel.clone(),
        "/usher.v1.PlaybackSessionService/NoSuchMethod",
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    server.running.shutdown().await.unwrap();
}

/// While the server drains, /readyz says 503 (and gRPC health NOT_SERVING), so load
/// balancers stop sending before the listener closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_while_draining() {
    let mut config = crate::support::test_config(OverLimitPolicy::RejectNew);
    config.limits.drain_delay = Duration::from_millis(800);
    let server = crate::support::serve_with(
        &config,
        memory_store(),
        std::sync::Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    )
    .await;
    let addr = server.running.addr;
    let stopping = tokio::spawn(server.running.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = http(addr, "GET", "/readyz", &[]).await;
    assert_eq!((ready.status, ready.body.as_str()), (503, "draining\n"));
    assert_eq!(http(addr, "GET", "/healthz", &[]).await.status, 200);
    stopping.await.unwrap().unwrap();
}
