//! Bad input: INVALID_ARGUMENT naming the offending fields, and nothing stored: no key in
//! Redis, no event, no seat.

use std::sync::Arc;

use tonic::Code;
use usher::deadline::Deadline;
use usher::proto;
use usher::store::redis::{RedisStore, RedisTarget};
use usher::store::{OverLimitPolicy, Store};

use crate::e2e::create_request;
use crate::support::{
    TestServer, bad_fields, reason, redis, redis_options, serve, test_settings, unique_prefix,
};

fn duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

/// Every malformed create, with the fields it must name.
fn bad_creates() -> Vec<(proto::CreateSessionRequest, Vec<&'static str>)> {
    let valid = || create_request("victim", "tv");
    let mut cases = Vec::new();
    let mut r = valid();
    r.parent = "users/victim/extra".into();
    cases.push((r, vec!["parent"]));
    let mut r = valid();
    r.parent = "accounts/victim".into();
    cases.push((r, vec!["parent"]));
    let mut r = valid();
    r.parent = "users/vic{tim}".into();
    cases.push((r, vec!["parent"]));
    let mut r = valid();
    r.profile_id = String::new();
    r.content_id = "x".repeat(129);
    cases.push((r, vec!["profile_id", "content_id"]));
    let mut r = valid();
    r.device = None;
    cases.push((r, vec!["device"]));
    let mut r = valid();
    r.device.as_mut().unwrap().r#type = 0;
    r.device.as_mut().unwrap().id = "tv 1".into();
    cases.push((r, vec!["device.id", "device.type"]));
    let mut r = valid();
    r.device.as_mut().unwrap().r#type = 99;
    cases.push((r, vec!["device.type"]));
    let mut r = valid();
    r.device.as_mut().unwrap().name = "n".repeat(129);
    cases.push((r, vec!["device.name"]));
    let mut r = valid();
    r.client.as_mut().unwrap().ip_address = "999.1.1.1".into();
    r.client.as_mut().unwrap().region = "germany".into();
    r.client.as_mut().unwrap().user_agent = "bad\u{0}agent".into();
    cases.push((
        r,
        vec!["client.ip_address", "client.user_agent", "client.region"],
    ));
    let mut r = valid();
    r.request_id = "id with spaces".into();
    cases.push((r, vec!["request_id"]));
    cases
}

async fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, fields: &[&str]) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_ARGUMENT");
    assert_eq!(bad_fields(&status), fields, "{status:?}");
}

/// Bad creates and bad calls that name no session: nothing may be written at all.
async fn refuse_bad_creates_and_reads(server: &mut TestServer) {
    for (request, fields) in bad_creates() {
        assert_invalid(server.sessions.create_session(request).await, &fields).await;
    }
    assert_invalid(
        server
            .sessions
            .list_sessions(proto::ListSessionsRequest {
                parent: "users/".into(),
                page_size: -1,
                page_token: "a/b".into(),
            })
            .await,
        &["parent", "page_size", "page_token"],
    )
    .await;
    assert_invalid(
        server
            .concurrency
            .get_concurrency(proto::GetConcurrencyRequest {
                name: "users/victim".into(),
            })
            .await,
        &["name"],
    )
    .await;
    assert_invalid(
        server
            .concurrency
            .check_availability(proto::CheckAvailabilityRequest {
                name: "users/victim/concurrency".into(),
                device_id: String::new(),
                content_id: "ok".into(),
                region: "usa".into(),
            })
            .await,
        &["device_id", "region"],
    )
    .await;
}

/// Bad device calls and a bad terminate on the live session `name`: every bad field named
/// in one answer, and the session left as it was (the callers check that).
async fn refuse_bad_calls_on(server: &mut TestServer, name: &str) {
    let name = name.to_owned();
    assert_invalid(
        server
            .sessions
            .heartbeat(proto::HeartbeatRequest {
                name: name.clone(),
                position: duration(-1, 0),
                playback_state: 42,
                generation: 0,
                duration: duration(-60, 0),
            })
            .await,
        &["position", "duration", "playback_state"],
    )
    .await;
    assert_invalid(
        server
            .sessions
            .heartbeat(proto::HeartbeatRequest {
                name: "sessions/s1".into(),
                position: duration(-1, 0),
                ..Default::default()
            })
            .await,
        &["name", "position"],
    )
    .await;
    assert_invalid(
        server
            .sessions
            .stop_session(proto::StopSessionRequest {
                name: name.clone(),
                position: duration(0, -5),
                generation: 0,
                duration: duration(8 * 24 * 3600, 0),
            })
            .await,
        &["position", "duration"],
    )
    .await;
    assert_invalid(
        server
            .sessions
            .pause_session(proto::PauseSessionRequest {
                name: name.clone(),
                position: duration(8 * 24 * 3600, 0),
                ..Default::default()
            })
            .await,
        &["position"],
    )
    .await;
    assert_invalid(
        server
            .sessions
            .resume_session(proto::ResumeSessionRequest {
                name: name.clone(),
                position: duration(1, 2_000_000_000),
                ..Default::default()
            })
            .await,
        &["position"],
    )
    .await;
    assert_invalid(
        server
            .sessions
            .terminate_session(proto::TerminateSessionRequest {
                name: name.clone(),
                reason: " ".into(),
            })
            .await,
        &["reason"],
    )
    .await;
}

async fn start_victim(server: &mut TestServer) -> proto::Session {
    server.start("victim", "tv").await
}

#[tokio::test]
async fn bad_input_on_the_memory_store_stores_nothing() {
    let store: Arc<dyn Store> = Arc::new(usher::store::memory::MemoryStore::new(test_settings()));
    let mut server = serve(store.clone(), 2, OverLimitPolicy::RejectNew).await;
    let events = async |store: &Arc<dyn Store>| {
        let mut all = Vec::new();
        for partition in 0..store.settings().partitions {
            all.extend(store.read_events(partition, None, 100).await.unwrap());
        }
        all
    };
    refuse_bad_creates_and_reads(&mut server).await;
    assert!(events(&store).await.is_empty());
    let victim = crate::support::user("victim");
    assert!(
        store
            .seats(&victim, Deadline::NONE)
            .await
            .unwrap()
            .holders
            .is_empty()
    );

    let session = start_victim(&mut server).await;
    let events_before = events(&store).await;
    refuse_bad_calls_on(&mut server, &session.name).await;
    assert_eq!(
        server.get(&session.name).await.unwrap(),
        session,
        "the session is unchanged"
    );
    assert_eq!(events(&store).await, events_before, "no event");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_on_redis_writes_nothing() {
    let redis_server = redis::shared_redis();
    let prefix = unique_prefix();
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(
            redis_options(
                RedisTarget::Single {
                    url: redis_server.url(),
                },
                &prefix,
            ),
            test_settings(),
        )
        .await
        .unwrap(),
    );
    let mut server = serve(store, 2, OverLimitPolicy::RejectNew).await;
    let dump = || redis::dump_with_prefix(&[redis_server.port], &format!("{prefix}:"));
    refuse_bad_creates_and_reads(&mut server).await;
    assert_eq!(dump(), Vec::new(), "no key at all");

    // A good request does write: the checks can fail.
    let session = start_victim(&mut server).await;
    let before = dump();
    assert!(!before.is_empty());
    refuse_bad_calls_on(&mut server, &session.name).await;
    assert_eq!(dump(), before, "every key as it was");
    assert_eq!(server.get(&session.name).await.unwrap(), session);
    server.running.shutdown().await.unwrap();
}
