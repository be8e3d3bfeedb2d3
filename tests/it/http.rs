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

/// A server as `config` says, over a memory store, everyone with two seats.
async fn serve_config(config: &usher::config::Config) -> crate::support::TestServer {
    crate::support::serve_with(
        config,
        memory_store(),
        std::sync::Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    )
    .await
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
    let server = serve_config(&config).await;
    let addr = server.running.addr;
    let stopping = tokio::spawn(server.running.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = http(addr, "GET", "/readyz", &[]).await;
    assert_eq!((ready.status, ready.body.as_str()), (503, "draining\n"));
    assert_eq!(http(addr, "GET", "/healthz", &[]).await.status, 200);
    stopping.await.unwrap().unwrap();
}

fn json(answer: &crate::support::HttpAnswer) -> Value {
    serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.body))
}

const CREATE: &str = r#"{"profileId": "main", "content_id": "big-buck-bunny",
  "device": {"id": "tv", "type": "DEVICE_TYPE_TV"}, "client": {"region": "US"}}"#;

/// The session lifecycle over HTTP/JSON from the google.api.http rules: every
/// annotated method answers, in canonical JSON, through the same authentication and
/// validation as gRPC; refusals are google.rpc.Status with their details.
#[tokio::test]
async fn the_rest_shim_serves_every_annotated_method() {
    use crate::support::http_json;
    let server = serve(memory_store(), 1, OverLimitPolicy::RejectNew).await;
    let addr = server.running.addr;

    let created = http_json(addr, "POST", "/v1/users/roku%3A1/sessions", &[], CREATE).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let created = json(&created);
    let name = created["session"]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("users/roku:1/sessions/"), "{name}");
    assert_eq!(created["session"]["generation"], "1", "uint64 as a string");
    assert!(
        created["session"]["createTime"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(created["heartbeat"]["interval"], "20s");
    let token = created["playbackToken"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];

    let got = json(&http(addr, "GET", &format!("/v1/{name}"), &[]).await);
    assert_eq!(got["session"]["state"], "SESSION_STATE_ACTIVE");
    let beat = http_json(
        addr,
        "POST",
        &format!("/v1/{name}:heartbeat"),
        &auth,
        r#"{"position": "61.5s", "playbackState": "PLAYBACK_STATE_PLAYING"}"#,
    )
    .await;
    assert_eq!(json(&beat)["session"]["position"], "61.500s");
    for (verb, state) in [
        ("pause", "SESSION_STATE_PAUSED"),
        ("resume", "SESSION_STATE_ACTIVE"),
    ] {
        let answer = http_json(addr, "POST", &format!("/v1/{name}:{verb}"), &auth, "{}").await;
        assert_eq!(json(&answer)["session"]["state"], state, "{verb}");
    }
    let listed = json(&http(addr, "GET", "/v1/users/roku:1/sessions?pageSize=10", &[]).await);
    assert_eq!(listed["sessions"][0]["name"], name.as_str());
    let seats = json(&http(addr, "GET", "/v1/users/roku:1/concurrency", &[]).await);
    assert_eq!(seats["concurrency"]["inUse"], 1);
    let check = http_json(
        addr,
        "POST",
        "/v1/users/roku:1/concurrency:checkAvailability",
        &[],
        r#"{"deviceId": "phone"}"#,
    )
    .await;
    assert_eq!(json(&check)["admitted"], false);
    // The same method through its additional binding: a GET with the query string.
    let by_get = http(
        addr,
        "GET",
        "/v1/users/roku:1/concurrency:checkAvailability?deviceId=phone&region=DE",
        &[],
    )
    .await;
    assert_eq!(by_get.status, 200, "{}", by_get.body);
    assert_eq!(json(&by_get), json(&check));
    let unknown = http(
        addr,
        "GET",
        "/v1/users/roku:1/concurrency:checkAvailability?deviceId=phone&seats=3",
        &[],
    )
    .await;
    assert_eq!(unknown.status, 400);
    assert!(
        json(&unknown)["message"]
            .as_str()
            .unwrap()
            .contains("seats")
    );
    let validated = http_json(
        addr,
        "POST",
        "/v1/tokens:validate",
        &[],
        &format!(r#"{{"token": "{token}", "checkSession": true}}"#),
    )
    .await;
    assert_eq!(json(&validated)["valid"], true);
    let refreshed = http_json(
        addr,
        "POST",
        "/v1/tokens:refresh",
        &[],
        &format!(r#"{{"token": "{token}"}}"#),
    )
    .await;
    assert!(json(&refreshed)["playbackToken"].as_str().is_some());

    // Over the limit: 429 with the holders in the details.
    let phone = CREATE.replace("\"tv\"", "\"phone\"");
    let refused = http_json(addr, "POST", "/v1/users/roku:1/sessions", &[], &phone).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    let status = json(&refused);
    assert_eq!(status["code"], 8);
    let details = status["details"].as_array().unwrap();
    assert!(
        details
            .iter()
            .any(|d| d["reason"] == "CONCURRENCY_LIMIT_REACHED")
    );
    assert!(details.iter().any(|d| d["@type"]
        == "type.googleapis.com/usher.v1.ConcurrencyLimitDetail"
        && d["holders"][0]["device"]["id"] == "tv"));

    // Another session's token on a device call: 404, as over gRPC.
    let other = http_json(addr, "POST", "/v1/users/zed/sessions", &[], CREATE).await;
    let other_name = json(&other)["session"]["name"].as_str().unwrap().to_owned();
    let crossed = http_json(addr, "POST", &format!("/v1/{other_name}:stop"), &auth, "{}").await;
    assert_eq!(crossed.status, 404, "{}", crossed.body);

    // Bad input: 400 naming the problem; unknown routes and methods.
    for (body, expected) in [
        ("{bad", "malformed JSON"),
        (r#"{"nope": 1}"#, "nope"),
        (r#"{"device": {"id": 5}}"#, "invalid request"),
    ] {
        let answer = http_json(addr, "POST", "/v1/users/a/sessions", &[], body).await;
        assert_eq!(answer.status, 400, "{body}");
        assert!(
            json(&answer)["message"]
                .as_str()
                .unwrap()
                .contains(expected),
            "{}",
            answer.body
        );
    }
    let missing_type = http_json(
        addr,
        "POST",
        "/v1/users/a/sessions",
        &[],
        r#"{"profileId": "p", "contentId": "c", "device": {"id": "tv"}}"#,
    )
    .await;
    assert_eq!(missing_type.status, 400);
    let status = json(&missing_type);
    assert!(
        status["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest"
                    && d["fieldViolations"][0]["field"] == "device.type"
            )
    );
    assert_eq!(
        http(addr, "DELETE", &format!("/v1/{name}"), &[])
            .await
            .status,
        405
    );
    assert_eq!(
        http(addr, "GET", "/v1/users/a/b/c/d", &[]).await.status,
        404
    );

    let stopped = http_json(addr, "POST", &format!("/v1/{name}:stop"), &auth, "{}").await;
    assert_eq!(json(&stopped)["session"]["state"], "SESSION_STATE_STOPPED");
    let terminated = http_json(
        addr,
        "POST",
        &format!("/v1/{other_name}:terminate"),
        &[],
        r#"{"reason": "support"}"#,
    )
    .await;
    assert_eq!(json(&terminated)["session"]["endMessage"], "support");
    server.running.shutdown().await.unwrap();
}

/// CORS for the origins `--cors-origin` names, and none for others; a body over the
/// message size limit is 413.
#[tokio::test]
async fn browsers_of_allowed_origins_may_call_and_bodies_are_bounded() {
    use crate::support::http_json;
    let mut config = crate::support::test_config(OverLimitPolicy::RejectNew);
    config.cors_origins = vec!["https://player.example.com".into()];
    config.limits.max_message_size = 4096;
    let server = serve_config(&config).await;
    let addr = server.running.addr;
    let preflight = [
        ("origin", "https://player.example.com"),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization, content-type",
        ),
    ];
    let answer = http(addr, "OPTIONS", "/v1/users/ann/sessions", &preflight).await;
    assert_eq!(answer.status, 204);
    assert_eq!(
        answer.headers["access-control-allow-origin"],
        "https://player.example.com"
    );
    assert!(answer.headers["access-control-allow-headers"].contains("authorization"));
    let elsewhere = [
        ("origin", "https://evil.example.com"),
        ("access-control-request-method", "POST"),
    ];
    let answer = http(addr, "OPTIONS", "/v1/users/ann/sessions", &elsewhere).await;
    assert!(!answer.headers.contains_key("access-control-allow-origin"));
    let created = http_json(
        addr,
        "POST",
        "/v1/users/ann/sessions",
        &[("origin", "https://player.example.com")],
        CREATE,
    )
    .await;
    assert_eq!(created.status, 200);
    assert_eq!(
        created.headers["access-control-allow-origin"],
        "https://player.example.com"
    );
    let huge = format!(r#"{{"profileId": "{}"}}"#, "x".repeat(8192));
    let too_large = http_json(addr, "POST", "/v1/users/ann/sessions", &[], &huge).await;
    assert_eq!(too_large.status, 413, "{}", too_large.body);
    assert!(too_large.body.contains("MESSAGE_TOO_LARGE"));
    server.running.shutdown().await.unwrap();
}

/// gRPC and HTTP/JSON on one port under concurrent load of both: every call answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_share_one_port_under_load() {
    let mut server = serve(memory_store(), 2, OverLimitPolicy::RejectNew).await;
    let addr = server.running.addr;
    let session = server.start("lena", "tv").await;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..16 {
        let mut sessions = server.sessions.clone();
        let name = session.name.clone();
        tasks.spawn(async move {
            for _ in 0..25 {
                if task % 2 == 0 {
                    let got = sessions
                        .get_session(proto::GetSessionRequest { name: name.clone() })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(got.session.unwrap().name, name);
                } else {
                    let got = http(addr, "GET", &format!("/v1/{name}"), &[]).await;
                    assert_eq!(got.status, 200, "{}", got.body);
                    assert!(got.body.contains(&name));
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    server.running.shutdown().await.unwrap();
}
