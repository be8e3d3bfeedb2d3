//! End to end through the real gRPC server on port 0 with the generated clients: the
//! session life cycle, seats, the limit's typed details, health and reflection.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use usher::deadline::Deadline;
use usher::proto;
use usher::store::memory::{ManualClock, MemoryStore};
use usher::store::{OverLimitPolicy, Store};

use crate::support::{TestServer, limit_detail, reason, serve, test_settings};

pub use crate::support::create_request;

async fn memory_server(limit: u32, policy: OverLimitPolicy) -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::with_clock(test_settings(), clock.clone()));
    (serve(store, limit, policy).await, clock)
}

fn session_of(response: proto::CreateSessionResponse) -> proto::Session {
    response.session.expect("a session")
}

#[tokio::test]
async fn a_session_lives_from_create_to_stop() {
    let (mut server, _clock) = memory_server(2, OverLimitPolicy::RejectNew).await;
    let created = server
        .sessions
        .create_session(create_request("alice", "tv"))
        .await
        .unwrap()
        .into_inner();
    let heartbeat = created.heartbeat.expect("heartbeat policy");
    assert_eq!(heartbeat.interval.unwrap().seconds, 20);
    let session = session_of(created);
    assert_eq!(session.state, proto::SessionState::Active as i32);
    assert!(session.name.starts_with("users/alice/sessions/"));
    assert_eq!(session.client.as_ref().unwrap().region, "DE");

    let beat = server
        .sessions
        .heartbeat(proto::HeartbeatRequest {
            name: session.name.clone(),
            position: Some(prost_types::Duration {
                seconds: 95,
                nanos: 0,
            }),
            playback_state: proto::PlaybackState::Playing as i32,
            generation: session.generation,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.session.unwrap().position.unwrap().seconds, 95);

    let paused = server.pause(&session.name).await.unwrap();
    assert_eq!(paused.state, proto::SessionState::Paused as i32);
    let resumed = server.resume(&session.name).await.unwrap();
    assert_eq!(resumed.state, proto::SessionState::Active as i32);

    let listed = server
        .sessions
        .list_sessions(proto::ListSessionsRequest {
            parent: "users/alice".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);

    let stopped = server
        .sessions
        .stop_session(proto::StopSessionRequest {
            name: session.name.clone(),
            position: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(stopped.state, proto::SessionState::Stopped as i32);
    assert!(stopped.end_time.is_some());
    assert!(stopped.expire_time.is_none());

    // Ended sessions stay readable; device calls on them are refused.
    let got = server.get(&session.name).await.unwrap();
    assert_eq!(got.state, proto::SessionState::Stopped as i32);
    let refused = server
        .sessions
        .heartbeat(proto::HeartbeatRequest {
            name: session.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "SESSION_ENDED");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn over_the_limit_the_player_learns_who_holds_the_seats() {
    let (mut server, _clock) = memory_server(2, OverLimitPolicy::RejectNew).await;
    for device in ["tv", "phone"] {
        server
            .sessions
            .create_session(create_request("bob", device))
            .await
            .unwrap();
    }
    let refused = server
        .sessions
        .create_session(create_request("bob", "tablet"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "CONCURRENCY_LIMIT_REACHED");
    let detail = limit_detail(&refused);
    assert_eq!(detail.limit, 2);
    let devices: Vec<_> = detail
        .holders
        .iter()
        .map(|h| h.device.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(
        devices,
        ["tv in the living room", "phone in the living room"]
    );
    assert!(
        detail
            .holders
            .iter()
            .all(|h| h.create_time.is_some() && h.content_id == "title-1")
    );

    let availability = server
        .concurrency
        .check_availability(proto::CheckAvailabilityRequest {
            name: "users/bob/concurrency".into(),
            device_id: "tablet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!availability.admitted);
    assert_eq!(
        availability.admission,
        proto::Admission::LimitReached as i32
    );
    let same_device = server
        .concurrency
        .check_availability(proto::CheckAvailabilityRequest {
            name: "users/bob/concurrency".into(),
            device_id: "tv".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(same_device.admitted);
    assert_eq!(
        same_device.admission,
        proto::Admission::ReplacesDeviceSession as i32
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn stop_oldest_makes_room_and_says_which_session_it_replaced() {
    let (mut server, clock) = memory_server(1, OverLimitPolicy::StopOldest).await;
    let first = session_of(
        server
            .sessions
            .create_session(create_request("carol", "tv"))
            .await
            .unwrap()
            .into_inner(),
    );
    clock.advance(Duration::from_millis(10));
    let preview = server
        .concurrency
        .check_availability(proto::CheckAvailabilityRequest {
            name: "users/carol/concurrency".into(),
            device_id: "phone".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.admission, proto::Admission::EvictsOldest as i32);
    assert_eq!(preview.replaced_sessions, std::slice::from_ref(&first.name));
    let second = server
        .sessions
        .create_session(create_request("carol", "phone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.replaced_sessions, std::slice::from_ref(&first.name));
    let concurrency = server
        .concurrency
        .get_concurrency(proto::GetConcurrencyRequest {
            name: "users/carol/concurrency".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .concurrency
        .unwrap();
    assert_eq!((concurrency.limit, concurrency.in_use), (1, 1));
    assert_eq!(
        concurrency.policy,
        proto::OverLimitPolicy::StopOldest as i32
    );
    assert_eq!(concurrency.holders[0].session, second.session.unwrap().name);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_sweeper_releases_seats_of_silent_devices() {
    // Real time here: the sweeper runs every 100 ms in test_config.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let mut server = serve(store.clone(), 1, OverLimitPolicy::RejectNew).await;
    let session = session_of(
        server
            .sessions
            .create_session(create_request("dave", "tv"))
            .await
            .unwrap()
            .into_inner(),
    );
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let got = server.get(&session.name).await.unwrap();
    assert_eq!(
        got.state,
        proto::SessionState::Expired as i32,
        "swept without a create"
    );
    assert_eq!(got.end_reason, proto::EndReason::HeartbeatTimeout as i32);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn terminate_and_list_pagination() {
    let (mut server, clock) = memory_server(5, OverLimitPolicy::RejectNew).await;
    let mut names = Vec::new();
    for device in ["a", "b", "c"] {
        names.push(
            session_of(
                server
                    .sessions
                    .create_session(create_request("erin", device))
                    .await
                    .unwrap()
                    .into_inner(),
            )
            .name,
        );
        clock.advance(Duration::from_millis(1));
    }
    let page1 = server
        .sessions
        .list_sessions(proto::ListSessionsRequest {
            parent: "users/erin".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page1
            .sessions
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>(),
        names[..2]
    );
    let page2 = server
        .sessions
        .list_sessions(proto::ListSessionsRequest {
            parent: "users/erin".into(),
            page_size: 2,
            page_token: page1.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page2
            .sessions
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>(),
        names[2..]
    );
    assert!(page2.next_page_token.is_empty());

    let ended = server
        .sessions
        .terminate_session(proto::TerminateSessionRequest {
            name: names[0].clone(),
            reason: "support: account sharing".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(ended.state, proto::SessionState::Terminated as i32);
    assert_eq!(
        ended.end_reason,
        proto::EndReason::TerminatedByOperator as i32
    );
    assert_eq!(ended.end_message, "support: account sharing");
    assert_eq!(ended.ended_by, "development");
    let missing = server
        .sessions
        .get_session(proto::GetSessionRequest {
            name: "users/erin/sessions/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn entitlement_denials_carry_stable_reasons() {
    let policy: usher::entitlement::PolicyFile = toml::from_str(
        r#"
        [plans.suspended]
        seat_limit = 0
        [users]
        frank = "suspended"
        [content]
        deny = ["withdrawn"]
        [regions]
        deny = ["DE"]
        "#,
    )
    .unwrap();
    let entitlements =
        Arc::new(usher::entitlement::StaticPolicy::from_file(policy, Some(2)).unwrap());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let mut server = crate::support::serve_with(
        &crate::support::test_config(OverLimitPolicy::RejectNew),
        store,
        entitlements,
    )
    .await;
    let denied = server
        .sessions
        .create_session(create_request("frank", "tv"))
        .await
        .unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "ENTITLEMENT_DENIED")
    );
    // create_request's region is DE.
    let geo = server
        .sessions
        .create_session(create_request("grace", "tv"))
        .await
        .unwrap_err();
    assert_eq!(reason(&geo), "GEO_BLOCKED");
    let mut withdrawn = create_request("grace", "tv");
    withdrawn.content_id = "withdrawn".into();
    withdrawn.client = None;
    let content = server.sessions.create_session(withdrawn).await.unwrap_err();
    assert_eq!(reason(&content), "CONTENT_UNAVAILABLE");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_reports_each_service_and_not_serving_while_draining() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let (server, _clock) = memory_server(2, OverLimitPolicy::RejectNew).await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in [
        "",
        "usher.v1.PlaybackSessionService",
        "usher.v1.ConcurrencyService",
    ] {
        let mut status = ServingStatus::Unknown as i32;
        for _ in 0..50 {
            status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    // Drain with a delay: health turns NOT_SERVING before the listener closes.
    let mut config = crate::support::test_config(OverLimitPolicy::RejectNew);
    config.limits.drain_delay = Duration::from_millis(600);
    let draining = crate::support::serve_with(
        &config,
        Arc::new(MemoryStore::new(test_settings())),
        Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    )
    .await;
    let mut health = HealthClient::new(draining.channel.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(draining.running.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = health
        .check(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    stopping.await.unwrap().unwrap();
    server.running.shutdown().await.unwrap();
}

/// A store whose sweep of partition 0 always fails, as when a Redis Cluster shard is down.
struct BrokenPartitionZero(Arc<dyn Store>);

#[async_trait::async_trait]
impl Store for BrokenPartitionZero {
    async fn create_session(
        &self,
        new: usher::store::NewSession,
        deadline: Deadline,
    ) -> Result<usher::store::Created, usher::store::StoreError> {
        self.0.create_session(new, deadline).await
    }
    async fn get_session(
        &self,
        name: &usher::ids::SessionName,
        deadline: Deadline,
    ) -> Result<Option<usher::session::Session>, usher::store::StoreError> {
        self.0.get_session(name, deadline).await
    }
    async fn seats(
        &self,
        user: &usher::ids::UserId,
        deadline: Deadline,
    ) -> Result<usher::store::Seats, usher::store::StoreError> {
        self.0.seats(user, deadline).await
    }
    async fn device_call(
        &self,
        call: usher::store::DeviceCall,
        deadline: Deadline,
    ) -> Result<usher::session::Session, usher::store::StoreError> {
        self.0.device_call(call, deadline).await
    }
    async fn terminate(
        &self,
        name: &usher::ids::SessionName,
        termination: &usher::session::Termination,
        deadline: Deadline,
    ) -> Result<usher::session::Session, usher::store::StoreError> {
        self.0.terminate(name, termination, deadline).await
    }
    async fn sweep(
        &self,
        partition: u32,
        max: u32,
    ) -> Result<usher::store::Swept, usher::store::StoreError> {
        if partition == 0 {
            return Err(usher::store::StoreError::Unavailable("shard down".into()));
        }
        self.0.sweep(partition, max).await
    }
    async fn read_events(
        &self,
        partition: u32,
        after: Option<&str>,
        count: u32,
    ) -> Result<Vec<usher::store::Event>, usher::store::StoreError> {
        self.0.read_events(partition, after, count).await
    }
    async fn read_events_back(
        &self,
        partition: u32,
        before: Option<&str>,
        count: u32,
    ) -> Result<Vec<usher::store::Event>, usher::store::StoreError> {
        self.0.read_events_back(partition, before, count).await
    }
    async fn relay_events(
        &self,
        partition: u32,
        group: &str,
        consumer: &str,
        count: u32,
        claim_after: std::time::Duration,
    ) -> Result<Vec<usher::store::Event>, usher::store::StoreError> {
        self.0
            .relay_events(partition, group, consumer, count, claim_after)
            .await
    }
    async fn relay_lag(
        &self,
        partition: u32,
        group: &str,
    ) -> Result<usher::store::RelayLag, usher::store::StoreError> {
        self.0.relay_lag(partition, group).await
    }
    async fn ack_events(
        &self,
        partition: u32,
        group: &str,
        ids: &[String],
    ) -> Result<u64, usher::store::StoreError> {
        self.0.ack_events(partition, group, ids).await
    }
    async fn ended_sessions(&self) -> Result<usher::store::EndedFeed, usher::store::StoreError> {
        self.0.ended_sessions().await
    }
    async fn write_progress(
        &self,
        write: usher::store::ProgressWrite,
        deadline: Deadline,
    ) -> Result<usher::model::Progress, usher::store::StoreError> {
        self.0.write_progress(write, deadline).await
    }
    async fn get_progress(
        &self,
        key: &usher::store::ProgressKey,
        deadline: Deadline,
    ) -> Result<Option<usher::model::Progress>, usher::store::StoreError> {
        self.0.get_progress(key, deadline).await
    }
    async fn list_progress(
        &self,
        user: &usher::ids::UserId,
        profile: &usher::ids::ProfileId,
        after: Option<&usher::store::ProgressCursor>,
        limit: usize,
        deadline: Deadline,
    ) -> Result<Vec<usher::model::Progress>, usher::store::StoreError> {
        self.0
            .list_progress(user, profile, after, limit, deadline)
            .await
    }
    async fn delete_progress(
        &self,
        key: &usher::store::ProgressKey,
        deadline: Deadline,
    ) -> Result<bool, usher::store::StoreError> {
        self.0.delete_progress(key, deadline).await
    }
    async fn seats_in_use(&self) -> Result<u64, usher::store::StoreError> {
        self.0.seats_in_use().await
    }
    async fn ping(&self) -> Result<(), usher::store::StoreError> {
        self.0.ping().await
    }
    fn settings(&self) -> &usher::store::StoreSettings {
        self.0.settings()
    }
}

#[tokio::test]
async fn one_failing_partition_does_not_stop_the_sweep_of_the_others() {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let store: Arc<dyn Store> = Arc::new(BrokenPartitionZero(inner));
    let mut server = serve(store, 1, OverLimitPolicy::RejectNew).await;
    // A user of a later partition than the broken one.
    let user = (0..)
        .map(|i| format!("sweep-{i}"))
        .find(|u| usher::store::partition_of(&crate::support::user(u), 4) == 3)
        .unwrap();
    let session = session_of(
        server
            .sessions
            .create_session(create_request(&user, "tv"))
            .await
            .unwrap()
            .into_inner(),
    );
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let got = server.get(&session.name).await.unwrap();
    assert_eq!(got.state, proto::SessionState::Expired as i32);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retry_of_a_create_whose_session_ended_says_so() {
    let (mut server, _clock) = memory_server(2, OverLimitPolicy::RejectNew).await;
    let mut request = create_request("nina", "tv");
    request.request_id = "retry-1".into();
    let first = session_of(
        server
            .sessions
            .create_session(request.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    let again = server
        .sessions
        .create_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.session.unwrap().name,
        first.name,
        "a live session: the first answer"
    );
    server.stop(&first.name).await.unwrap();
    let status = server.sessions.create_session(request).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "SESSION_ENDED")
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn messages_over_the_size_limit_are_refused() {
    let mut config = crate::support::test_config(OverLimitPolicy::RejectNew);
    config.limits.max_message_size = 1024;
    let mut server = crate::support::serve_with(
        &config,
        Arc::new(MemoryStore::new(test_settings())),
        Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    )
    .await;
    let mut big = create_request("olga", "tv");
    big.client.as_mut().unwrap().user_agent = "x".repeat(4096);
    let status = server.sessions.create_session(big).await.unwrap_err();
    // RESOURCE_EXHAUSTED as the gRPC spec has it (tonic says OUT_OF_RANGE), with an
    // ErrorInfo like every other refusal.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(crate::support::reason(&status), "MESSAGE_TOO_LARGE");
    // Under the limit, the same call goes through.
    server
        .sessions
        .create_session(create_request("olga", "tv"))
        .await
        .unwrap();
    server.running.shutdown().await.unwrap();
}
