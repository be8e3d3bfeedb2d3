//! The create rate limit through the server: RESOURCE_EXHAUSTED / RATE_LIMITED with a
//! `google.rpc.RetryInfo` over gRPC, 429 with `Retry-After` over REST, per user, and a
//! plan's own limit from the entitlement policy. The GCRA itself is in the conformance
//! suite (memory, Redis, Redis Cluster).

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tonic::Code;
use usher::entitlement::{PolicyFile, StaticPolicy};
use usher::store::memory::MemoryStore;
use usher::store::{OverLimitPolicy, RateLimit};

use crate::support::{
    TestServer, create_request, http_json, reason, serve_with, test_config, test_settings,
};

/// A server whose users may create 2 sessions at once, then one a minute, over `policy`.
async fn limited_server(policy: StaticPolicy) -> TestServer {
    let mut config = test_config(OverLimitPolicy::RejectNew);
    config.create_rate = RateLimit::parse("1/m", 2).unwrap();
    let store = Arc::new(MemoryStore::new(test_settings()));
    serve_with(&config, store, Arc::new(policy)).await
}

/// The delay of a status's `google.rpc.RetryInfo`.
fn retry_delay(status: &tonic::Status) -> Duration {
    let decoded = tonic_types::pb::Status::decode(status.details()).unwrap();
    let info = decoded
        .details
        .iter()
        .find(|d| d.type_url == "type.googleapis.com/google.rpc.RetryInfo")
        .expect("a RetryInfo");
    let delay = tonic_types::pb::RetryInfo::decode(info.value.as_slice())
        .unwrap()
        .retry_delay
        .unwrap();
    Duration::new(delay.seconds as u64, delay.nanos as u32)
}

#[tokio::test]
async fn creates_over_the_rate_are_refused_with_when_to_retry() {
    let mut server = limited_server(StaticPolicy::open(10).unwrap()).await;
    server.start("churner", "tv").await;
    server.start("churner", "phone").await;
    let refused = server
        .sessions
        .create_session(create_request("churner", "tablet"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
    let delay = retry_delay(&refused);
    assert!(
        delay > Duration::from_secs(55) && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    // Nothing was taken, and another user is not affected.
    let request = usher::proto::GetConcurrencyRequest {
        name: "users/churner/concurrency".into(),
    };
    let concurrency = server.concurrency.get_concurrency(request).await.unwrap();
    assert_eq!(concurrency.into_inner().concurrency.unwrap().in_use, 2);
    server.start("neighbour", "tv").await;

    // Over REST: 429, with Retry-After in whole seconds.
    let body = r#"{"profileId": "p", "contentId": "title-1",
        "device": {"id": "web", "type": "DEVICE_TYPE_WEB"}, "client": {"region": "DE"}}"#;
    let answer = http_json(
        server.running.addr,
        "POST",
        "/v1/users/churner/sessions",
        &[],
        body,
    )
    .await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert!(answer.body.contains("RATE_LIMITED"), "{}", answer.body);
    let seconds: u64 = answer.headers["retry-after"].parse().unwrap();
    assert!((56..=60).contains(&seconds), "{seconds}");
    server.running.shutdown().await.unwrap();
}

/// A plan may set its own limit, or none, over the server's.
#[tokio::test]
async fn a_plan_sets_its_own_rate() {
    let file: PolicyFile = toml::from_str(
        r#"
        [plans.unlimited]
        seat_limit = 10
        create_rate = "off"
        [plans.trial]
        seat_limit = 10
        create_rate = "1/h"
        create_burst = 1
        [users]
        vip = "unlimited"
        tester = "trial"
        "#,
    )
    .unwrap();
    let mut server = limited_server(StaticPolicy::from_file(file, None).unwrap()).await;
    for device in ["a", "b", "c", "d", "e"] {
        server.start("vip", device).await;
    }
    server.start("tester", "a").await;
    let refused = server
        .sessions
        .create_session(create_request("tester", "b"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "RATE_LIMITED");
    assert!(retry_delay(&refused) > Duration::from_secs(3500));
    server.running.shutdown().await.unwrap();
}

const CHATTY_KEY: &str = "chatty-service-key-0123456789abcdef0123";
const QUIET_KEY: &str = "quiet-service-key-0123456789abcdef012345";

/// A credential's request rate, per instance: past its burst a service is refused with
/// RATE_LIMITED and when to retry; another service is not affected.
#[tokio::test]
async fn a_service_over_its_request_rate_is_refused_and_others_are_not() {
    let text = format!(
        r#"
        [[service]]
        name = "chatty"
        key = "{CHATTY_KEY}"
        roles = ["support"]
        requests_per_second = 4
        burst = 3
        [[service]]
        name = "quiet"
        key = "{QUIET_KEY}"
        roles = ["support"]
        "#
    );
    let file: usher::auth::CredentialsFile = toml::from_str(&text).unwrap();
    let mut config = test_config(OverLimitPolicy::RejectNew);
    config.insecure_dev = false;
    let store = Arc::new(MemoryStore::new(test_settings()));
    let mut parts = crate::support::components(store, Arc::new(StaticPolicy::open(2).unwrap()));
    parts.credentials = usher::auth::Credentials::from_file(file).unwrap();
    let server = crate::support::serve_components(&config, parts).await;
    let ask = |key: &'static str| {
        let mut client = server.concurrency.clone();
        async move {
            let mut request = tonic::Request::new(usher::proto::GetConcurrencyRequest {
                name: "users/someone/concurrency".into(),
            });
            let bearer = format!("Bearer {key}").parse().unwrap();
            request.metadata_mut().insert("authorization", bearer);
            client.get_concurrency(request).await
        }
    };
    for _ in 0..3 {
        ask(CHATTY_KEY).await.unwrap();
    }
    let refused = ask(CHATTY_KEY).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
    let delay = retry_delay(&refused);
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(250),
        "{delay:?}"
    );
    for _ in 0..10 {
        ask(QUIET_KEY).await.unwrap();
    }
    tokio::time::sleep(delay).await;
    ask(CHATTY_KEY).await.unwrap();
    server.running.shutdown().await.unwrap();
}

#[test]
fn credential_rates_are_checked() {
    let file: usher::auth::CredentialsFile = toml::from_str(&format!(
        "[[service]]\nname = \"zero\"\nkey = \"{QUIET_KEY}\"\nroles = [\"support\"]\nrequests_per_second = 0"
    ))
    .unwrap();
    let refused = usher::auth::Credentials::from_file(file).unwrap_err();
    assert!(refused.to_string().contains("zero"), "{refused}");
}
