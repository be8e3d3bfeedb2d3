//! What only a real Redis can show: outages and recovery, an emptied script cache, a seat
//! lost in a failover, and every key of a user in one Cluster slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use usher::deadline::Deadline;
use usher::ids::UserId;
use usher::proto;
use usher::session::{Session, SessionState};
use usher::store::redis::{RedisStore, RedisTarget};
use usher::store::{
    DeviceAction, DeviceCall, EventKind, OverLimitPolicy, Store, StoreError, partition_of,
};

use crate::e2e::create_request;
use crate::support::{
    BROWSER_USER_AGENT, TestServer, fresh_user, new_session, reason, redis, redis_options, serve,
    test_settings, unique_prefix,
};

async fn connect(target: RedisTarget, prefix: &str) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(redis_options(target, prefix), test_settings())
            .await
            .expect("connect"),
    )
}

/// The shared redis-server, a key prefix of this test's own, and a store on it.
async fn on_shared_redis() -> (&'static redis::RedisServer, String, Arc<dyn Store>) {
    let server = redis::shared_redis();
    let prefix = unique_prefix();
    let store = connect(RedisTarget::Single { url: server.url() }, &prefix).await;
    (server, prefix, store)
}

/// Retries `request` until the store answers again: UNAVAILABLE meanwhile, success
/// within 10 s. Returns the answer.
async fn recovers(
    usher: &mut TestServer,
    request: proto::CreateSessionRequest,
) -> proto::CreateSessionResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match usher.sessions.create_session(request.clone()).await {
            Ok(answer) => return answer.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "usher did not recover");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_with_unavailable_and_usher_recovers() {
    let mut server = redis::RedisServer::start();
    let store = connect(RedisTarget::Single { url: server.url() }, "outage").await;
    let mut usher = serve(store, 2, OverLimitPolicy::RejectNew).await;
    usher
        .sessions
        .create_session(create_request("ivy", "tv"))
        .await
        .unwrap();

    server.kill();
    let started = Instant::now();
    let mut request = tonic::Request::new(create_request("ivy", "phone"));
    request.set_timeout(Duration::from_secs(3));
    let status = usher.sessions.create_session(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "STORE_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // Redis comes back (empty, as after a restart without persistence).
    server.restart();
    recovers(&mut usher, create_request("ivy", "phone")).await;
    usher.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_fails_fast_with_unavailable_and_usher_recovers() {
    let server = redis::RedisServer::start();
    let store = connect(RedisTarget::Single { url: server.url() }, "hung").await;
    let mut usher = serve(store.clone(), 2, OverLimitPolicy::RejectNew).await;
    usher
        .sessions
        .create_session(create_request("jan", "tv"))
        .await
        .unwrap();

    // The create is sent into a frozen Redis: the script may run when it thaws, after
    // usher stopped waiting. It carries a request_id, as the README asks.
    let mut phone = create_request("jan", "phone");
    phone.request_id = "jan-phone-1".into();
    server.freeze();
    let started = Instant::now();
    let mut request = tonic::Request::new(phone.clone());
    request.set_timeout(Duration::from_secs(3));
    let status = usher.sessions.create_session(request).await.unwrap_err();
    let waited = started.elapsed();
    server.thaw();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The test store's timeout is 500 ms; well inside the caller's 3 s deadline.
    assert!(waited < Duration::from_millis(1500), "took {waited:?}");

    // A caller with a deadline shorter than the store timeout still hears UNAVAILABLE,
    // before its deadline, not CANCELLED or DEADLINE_EXCEEDED at it.
    server.freeze();
    let started = Instant::now();
    let mut request = tonic::Request::new(phone.clone());
    request.set_timeout(Duration::from_millis(300));
    let status = usher.sessions.create_session(request).await.unwrap_err();
    let waited = started.elapsed();
    server.thaw();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(waited < Duration::from_millis(300), "took {waited:?}");

    // Retried: one phone session, one started event, however many of the tries ran.
    let answer = recovers(&mut usher, phone.clone()).await;
    let again = usher
        .sessions
        .create_session(phone)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.session.unwrap().name,
        answer.session.as_ref().unwrap().name
    );
    let user = crate::support::user("jan");
    let holders = store.seats(&user, Deadline::NONE).await.unwrap().holders;
    let phones = holders
        .iter()
        .filter(|h| h.device.id.as_str() == "phone")
        .count();
    assert_eq!((holders.len(), phones), (2, 1));
    let partition = partition_of(&user, test_settings().partitions);
    let started_events = store
        .read_events(partition, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.session.user == user && e.kind == EventKind::Started)
        .count();
    assert_eq!(started_events, 2, "tv and phone, once each");
    usher.running.shutdown().await.unwrap();
}

/// A session of `user` on `device`, under a limit of `limit` seats (REJECT_NEW).
async fn start(store: &dyn Store, user: &UserId, device: &str, limit: u32) -> Session {
    store
        .create_session(
            new_session(user, device, limit, OverLimitPolicy::RejectNew),
            Deadline::NONE,
        )
        .await
        .unwrap()
        .session
}

/// A heartbeat of `session` at `position` (ms), playing, holding `generation`.
fn playing_beat(session: &Session, position: u64, generation: u64) -> DeviceCall {
    DeviceCall {
        name: session.name.clone(),
        generation: Some(generation),
        position_ms: Some(position),
        duration_ms: None,
        profile: None,
        action: DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        },
    }
}

/// A restarted Redis without persistence, or a node new to a Cluster, lacks the
/// functions library until a call finds it missing and loads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_a_server_that_lost_the_functions() {
    let server = redis::RedisServer::start();
    let store = connect(RedisTarget::Single { url: server.url() }, "flush").await;
    let user = fresh_user();
    let created = start(store.as_ref(), &user, "tv", 1).await;
    assert_eq!(server.cli(&["function", "flush"]), "OK");
    let beat = DeviceCall {
        name: created.name.clone(),
        generation: Some(created.generation),
        position_ms: Some(10),
        duration_ms: None,
        profile: None,
        action: DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        },
    };
    store.device_call(beat, Deadline::NONE).await.unwrap();
    assert_eq!(server.cli(&["function", "flush"]), "OK");
    store.seats(&user, Deadline::NONE).await.unwrap();
    assert_eq!(server.cli(&["function", "flush"]), "OK");
    let second = start(store.as_ref(), &user, "phone", 2).await;
    assert_eq!(second.generation, created.generation + 1);
}

/// A seat whose record is gone (deleted by hand, as the upgrade from key layout 3 does)
/// holds nothing, whatever its value (layout 3 kept the deadline there): it does not
/// count against the limit, and the user's next create releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_without_its_record_is_released_at_the_next_create() {
    let (server, prefix, store) = on_shared_redis().await;
    let user = fresh_user();
    let partition = partition_of(&user, test_settings().partitions);
    let seats = format!("{prefix}:{{{partition}}}:u:{user}");
    let old = "01a24f59-3411-70bf-abda-71123e0341ac";
    assert_eq!(server.cli(&["hset", &seats, old, "99999999999999"]), "1");
    let read = store.seats(&user, Deadline::NONE).await.unwrap();
    assert!(read.holders.is_empty());
    let created = start(store.as_ref(), &user, "tv", 1).await;
    let fields = server.cli(&["hkeys", &seats]);
    assert!(!fields.contains(old), "{fields}");
    assert!(fields.contains(created.name.session.as_str()), "{fields}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_lost_in_a_failover_ends_its_session_at_the_next_heartbeat() {
    let (server, prefix, store) = on_shared_redis().await;
    let user = fresh_user();
    let created = store
        .create_session(
            new_session(&user, "tv", 1, OverLimitPolicy::RejectNew),
            Deadline::NONE,
        )
        .await
        .unwrap();
    // A failover that kept the session record but lost the seat grant.
    let partition = partition_of(&user, test_settings().partitions);
    let seats = format!("{prefix}:{{{partition}}}:u:{user}");
    assert_eq!(
        server.cli(&["hdel", &seats, created.session.name.session.as_str()]),
        "1"
    );
    let beat = DeviceCall {
        name: created.session.name.clone(),
        generation: None,
        position_ms: None,
        duration_ms: None,
        profile: None,
        action: DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        },
    };
    match store.device_call(beat, Deadline::NONE).await {
        Err(StoreError::SessionEnded(s)) => {
            assert_eq!(s.state, SessionState::Evicted);
            assert_eq!(s.end_reason, Some(usher::session::EndReason::SeatLost));
        }
        other => panic!("expected SessionEnded, got {other:?}"),
    }
    let kinds: Vec<_> = store
        .read_events(partition, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.session.user == user)
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Started, EventKind::Evicted]);
}

/// Key layout 4 (ADR 0002): a record is one string, so a browser's 111-byte user agent
/// keeps it small (as a hash, one value over 64 bytes left Redis' listpack encoding and
/// doubled a session's memory). The user hash stays a listpack, and a heartbeat leaves it
/// as it was: a seat is a name, the deadline is the record's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_user_agent_keeps_a_session_small() {
    let (server, prefix, store) = on_shared_redis().await;
    let user = fresh_user();
    let mut new = new_session(&user, "tv", 1, OverLimitPolicy::RejectNew);
    new.client.user_agent = BROWSER_USER_AGENT.into();
    let created = store
        .create_session(new, Deadline::NONE)
        .await
        .unwrap()
        .session;
    let partition = partition_of(&user, test_settings().partitions);
    let record = format!("{prefix}:{{{partition}}}:s:{}", created.name.session);
    let seats = format!("{prefix}:{{{partition}}}:u:{user}");
    assert_eq!(server.cli(&["type", &record]), "string");
    let bytes: u64 = server.cli(&["memory", "usage", &record]).parse().unwrap();
    assert!(bytes <= 400, "the record takes {bytes} bytes");
    assert_eq!(server.cli(&["object", "encoding", &seats]), "listpack");
    let user_hash = server.cli(&["hgetall", &seats]);
    let beat = DeviceCall {
        name: created.name.clone(),
        generation: Some(created.generation),
        position_ms: Some(30_000),
        duration_ms: None,
        profile: None,
        action: DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        },
    };
    let beaten = store.device_call(beat, Deadline::NONE).await.unwrap();
    assert_eq!(beaten.position_ms, 30_000);
    assert_eq!(beaten.client.user_agent, BROWSER_USER_AGENT);
    assert_eq!(server.cli(&["hgetall", &seats]), user_hash);
}

/// A key's remaining time to live in ms, as Redis reports it (-1: none, -2: no key).
fn pttl(server: &redis::RedisServer, key: &str) -> i64 {
    server.cli(&["pttl", key]).parse().unwrap()
}

/// Stops `session` as its device would.
async fn stop(store: &dyn Store, session: &Session) {
    let call = DeviceCall {
        action: DeviceAction::Stop,
        ..playing_beat(session, 1_000, session.generation)
    };
    store.device_call(call, Deadline::NONE).await.unwrap();
}

/// Key layout 5: nothing live has a TTL (the sweep index ends every live session, so a
/// TTL would only cost memory and a heartbeat its refresh). A record gets the retention
/// as its session ends; a user hash gets its idle TTL as its last seat goes, and loses
/// it at the next grant. A create refused under the rate limit never gives a seated
/// user's hash the rate cell's short TTL, which would drop its seats with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_live_has_a_ttl_and_what_ends_gets_one() {
    let (server, prefix, store) = on_shared_redis().await;
    let user = fresh_user();
    let partition = partition_of(&user, test_settings().partitions);
    let key = |kind: &str, id: &str| format!("{prefix}:{{{partition}}}:{kind}:{id}");
    let user_hash = key("u", user.as_str());
    let tv = start(store.as_ref(), &user, "tv", 2).await;
    let phone = start(store.as_ref(), &user, "phone", 2).await;
    let tv_record = key("s", tv.name.session.as_str());
    assert_eq!(pttl(server, &tv_record), -1, "a live record");
    assert_eq!(pttl(server, &user_hash), -1, "a seated user's hash");

    store
        .device_call(playing_beat(&tv, 5_000, tv.generation), Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(pttl(server, &tv_record), -1, "a record after a heartbeat");

    // Over the rate and over the limit, with a seat held: the rate cell is written, and
    // the hash keeps no TTL.
    let mut limited = new_session(&user, "tablet", 2, OverLimitPolicy::RejectNew);
    limited.rate = Some(usher::store::RateLimit {
        interval: Duration::from_millis(200),
        burst: 1,
    });
    match store.create_session(limited, Deadline::NONE).await {
        Err(StoreError::LimitReached { limit: 2, .. }) => {}
        other => panic!("expected LimitReached, got {other:?}"),
    }
    assert!(
        server
            .cli(&["hget", &user_hash, "r"])
            .parse::<u64>()
            .is_ok()
    );
    assert_eq!(
        pttl(server, &user_hash),
        -1,
        "a refused create on a seated user"
    );

    let retention = test_settings().ended_retention.as_millis() as i64;
    stop(store.as_ref(), &tv).await;
    let kept = pttl(server, &tv_record);
    assert!(kept > retention - 60_000 && kept <= retention, "{kept}");
    assert_eq!(pttl(server, &user_hash), -1, "the phone still holds a seat");

    stop(store.as_ref(), &phone).await;
    let idle = usher::store::GENERATION_IDLE_TTL.as_millis() as i64;
    let left = pttl(server, &user_hash);
    assert!(left > idle - 60_000 && left <= idle, "{left}");
    let counter = server.cli(&["hget", &user_hash, "g"]);

    let again = start(store.as_ref(), &user, "tv", 2).await;
    assert_eq!(pttl(server, &user_hash), -1, "seated again");
    assert_eq!(again.generation, counter.parse::<u64>().unwrap() + 1);
}

/// Layout 4 gave live records and seated users' hashes TTLs; an instance started on it
/// takes them off, partition by partition, records layout 5 and serves: the live
/// session goes on, the ended one keeps its retention, an idle user its idle TTL.
/// Another layout is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_4_deployment_is_upgraded_in_place_at_start() {
    let (server, prefix, store) = on_shared_redis().await;
    let playing = fresh_user();
    let gone = fresh_user();
    let live = start(store.as_ref(), &playing, "tv", 1).await;
    let ended = start(store.as_ref(), &gone, "tv", 1).await;
    stop(store.as_ref(), &ended).await;
    let key = |user: &UserId, kind: &str, id: &str| {
        let partition = partition_of(user, test_settings().partitions);
        format!("{prefix}:{{{partition}}}:{kind}:{id}")
    };
    let live_record = key(&playing, "s", live.name.session.as_str());
    let live_user = key(&playing, "u", playing.as_str());
    let ended_record = key(&gone, "s", ended.name.session.as_str());
    let idle_user = key(&gone, "u", gone.as_str());
    // What layout 4 left: TTLs on the live session's keys.
    for key in [&live_record, &live_user] {
        assert_eq!(server.cli(&["pexpire", key, "7200000"]), "1");
    }
    let meta = format!("{prefix}:meta");
    server.cli(&["hset", &meta, "layout", "4"]);

    let upgraded = connect(RedisTarget::Single { url: server.url() }, &prefix).await;
    assert_eq!(server.cli(&["hget", &meta, "layout"]), "5");
    assert_eq!(pttl(server, &live_record), -1);
    assert_eq!(pttl(server, &live_user), -1);
    assert!(pttl(server, &ended_record) > 0);
    assert!(pttl(server, &idle_user) > 0);
    let beaten = upgraded
        .device_call(playing_beat(&live, 9_000, live.generation), Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(beaten.position_ms, 9_000);

    server.cli(&["hset", &meta, "layout", "3"]);
    let refused = RedisStore::connect(
        redis_options(RedisTarget::Single { url: server.url() }, &prefix),
        test_settings(),
    )
    .await
    .err()
    .expect("layout 3 is refused");
    assert!(refused.to_string().contains("layout 3"), "{refused}");
}

/// A command's calls and its failed and rejected calls, from `INFO commandstats`.
fn command_stats(server: &redis::RedisServer, command: &str) -> (u64, u64) {
    let stats = server.cli(&["info", "commandstats"]);
    let Some(line) = stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
    else {
        return (0, 0);
    };
    let (mut calls, mut refused) = (0, 0);
    for pair in line.split(',') {
        match pair.split_once('=') {
            Some(("calls", n)) => calls = n.trim().parse().unwrap(),
            Some(("failed_calls" | "rejected_calls", n)) => {
                refused += n.trim().parse::<u64>().unwrap()
            }
            _ => {}
        }
    }
    (calls, refused)
}

/// Every `resubscribe_interval` the stop-channel subscriber subscribes to every
/// partition's channel again (what makes it follow a slot that moved to another shard),
/// and sends nothing that Redis refuses: fred's own `resubscribe_all` sent an empty
/// SUBSCRIBE first, refused, and never got to the shard channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_channels_are_subscribed_to_again_on_schedule() {
    let server = redis::RedisServer::start();
    let mut options = redis_options(RedisTarget::Single { url: server.url() }, &unique_prefix());
    options.resubscribe_interval = Duration::from_millis(300);
    let store = RedisStore::connect(options, test_settings()).await.unwrap();
    let _feed = store.ended_sessions().await.unwrap();
    let partitions = u64::from(test_settings().partitions);
    let (first, _) = command_stats(&server, "ssubscribe");
    assert!(first >= partitions, "{first} SSUBSCRIBE at start");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (later, refused) = command_stats(&server, "ssubscribe");
    assert!(
        later >= first + partitions,
        "{first} SSUBSCRIBE at start, {later} a second later"
    );
    assert_eq!(refused, 0);
    for command in ["subscribe", "psubscribe"] {
        assert_eq!(command_stats(&server, command), (0, 0), "{command}");
    }
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_user_lives_in_one_cluster_slot() {
    let cluster = redis::shared_cluster();
    let prefix = unique_prefix();
    let store = connect(
        RedisTarget::Cluster {
            nodes: cluster.node_list(),
        },
        &prefix,
    )
    .await;
    let user = fresh_user();
    let mut create = new_session(&user, "tv", 2, OverLimitPolicy::RejectNew);
    create.request_id = Some(usher::ids::RequestId::parse("r", "r-1").unwrap());
    store.create_session(create, Deadline::NONE).await.unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let keys = redis::keys_with_prefix(&ports, &format!("{prefix}:"));
    // The user hash, the record, the remembered request, the sweep index, the events.
    let kinds: std::collections::BTreeSet<&str> = keys
        .iter()
        .filter_map(|key| key.split("}:").nth(1))
        .map(|rest| rest.split(':').next().unwrap_or(rest))
        .collect();
    assert_eq!(
        kinds,
        ["deadlines", "events", "req", "s", "u"].into(),
        "{keys:?}"
    );
    let slots: std::collections::BTreeSet<String> = keys
        .iter()
        .map(|key| redis::redis_cli(ports[0], &["cluster", "keyslot", key]))
        .collect();
    assert_eq!(slots.len(), 1, "{keys:?} span {slots:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_while_redis_is_down() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let mut server = redis::RedisServer::start();
    let store = connect(RedisTarget::Single { url: server.url() }, "health").await;
    let usher = serve(store, 2, OverLimitPolicy::RejectNew).await;
    health_becomes(&usher, ServingStatus::Serving).await;
    server.kill();
    health_becomes(&usher, ServingStatus::NotServing).await;
    server.restart();
    health_becomes(&usher, ServingStatus::Serving).await;
    usher.running.shutdown().await.unwrap();
}

/// Health of `usher`, gRPC and `/readyz`, polled until both say `wanted` (8 s at most).
async fn health_becomes(
    usher: &TestServer,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(usher.channel.clone());
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        // /readyz on the same port agrees with gRPC health.
        let ready = crate::support::http(usher.running.addr, "GET", "/readyz", &[]).await;
        let agrees = (ready.status == 200) == (wanted == ServingStatus::Serving);
        if status == wanted as i32 && agrees {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health never became {wanted:?} (/readyz {})",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis that answers PING but refuses writes (out of memory under `noeviction`) is an
/// outage: UNAVAILABLE / STORE_UNAVAILABLE, health NOT_SERVING, nothing half-written, and
/// usher recovers by itself when memory is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_is_unavailable_and_not_ready() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let server = redis::RedisServer::start();
    let prefix = unique_prefix();
    let store = connect(RedisTarget::Single { url: server.url() }, &prefix).await;
    let mut usher = serve(store.clone(), 2, OverLimitPolicy::RejectNew).await;
    health_becomes(&usher, ServingStatus::Serving).await;
    server.cli(&["config", "set", "maxmemory", "1"]);
    let before = redis::dump_with_prefix(&[server.port], &format!("{prefix}:"));
    let status = usher
        .sessions
        .create_session(create_request("olive", "tv"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "STORE_UNAVAILABLE");
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    health_becomes(&usher, ServingStatus::NotServing).await;
    assert_eq!(
        redis::dump_with_prefix(&[server.port], &format!("{prefix}:")),
        before,
        "nothing written"
    );
    server.cli(&["config", "set", "maxmemory", "0"]);
    health_becomes(&usher, ServingStatus::Serving).await;
    recovers(&mut usher, create_request("olive", "tv")).await;
    usher.running.shutdown().await.unwrap();
}

/// A Redis busy with a script that runs too long answers BUSY: UNAVAILABLE, fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_redis_is_unavailable() {
    let server = redis::RedisServer::start();
    let store = connect(RedisTarget::Single { url: server.url() }, "busy").await;
    let mut usher = serve(store, 2, OverLimitPolicy::RejectNew).await;
    server.cli(&["config", "set", "busy-reply-threshold", "50"]);
    let port = server.port.to_string();
    let mut runaway = std::process::Command::new("redis-cli")
        .args(["-p", &port, "eval", "while true do end", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = usher
        .sessions
        .create_session(create_request("busy", "tv"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "STORE_UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_secs(2), "fast");
    server.cli(&["script", "kill"]);
    let _ = runaway.wait();
    recovers(&mut usher, create_request("busy", "tv")).await;
    usher.running.shutdown().await.unwrap();
}

/// A Redis that may evict keys could evict a seat set and let a user past the limit:
/// usher refuses to start on it, unless told to accept the risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_is_refused_at_start() {
    let server = redis::RedisServer::start();
    for policy in ["allkeys-lru", "volatile-ttl", "allkeys-random"] {
        server.cli(&["config", "set", "maxmemory-policy", policy]);
        let target = RedisTarget::Single { url: server.url() };
        let refused = RedisStore::connect(redis_options(target.clone(), "evict"), test_settings())
            .await
            .err()
            .expect("refused");
        let message = refused.to_string();
        assert!(matches!(refused, StoreError::Refused(_)), "{refused:?}");
        assert!(
            message.contains(policy) && message.contains("noeviction"),
            "{message}"
        );
        assert!(message.contains("--redis-allow-eviction"), "{message}");
        let mut options = redis_options(target, "evict");
        options.allow_eviction = true;
        RedisStore::connect(options, test_settings())
            .await
            .expect("runs when the risk is accepted");
    }
    server.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
    connect(RedisTarget::Single { url: server.url() }, "evict").await;
}

/// Every primary of a Cluster is asked, not only the one a command happens to reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_one_evicting_primary_is_refused() {
    let cluster = redis::RedisCluster::start();
    let last = cluster.nodes.last().unwrap().port;
    redis::redis_cli(last, &["config", "set", "maxmemory-policy", "allkeys-lru"]);
    let target = RedisTarget::Cluster {
        nodes: cluster.node_list(),
    };
    let refused = RedisStore::connect(redis_options(target, "evict"), test_settings())
        .await
        .err()
        .expect("refused");
    assert!(refused.to_string().contains(&last.to_string()), "{refused}");
}

/// A Cluster node named as one Redis (`redis://`) is refused at start: usher would send
/// it heartbeats of several partitions in one script call, which a Cluster refuses
/// (CROSSSLOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_named_as_one_redis_is_refused() {
    let node = redis::RedisServer::start_with(&|| {
        ["--cluster-enabled", "yes", "--cluster-port"]
            .map(String::from)
            .into_iter()
            .chain([redis::free_port().to_string()])
            .collect()
    });
    let refused = RedisStore::connect(
        redis_options(RedisTarget::Single { url: node.url() }, "node"),
        test_settings(),
    )
    .await
    .err()
    .expect("refused");
    assert!(matches!(refused, StoreError::Refused(_)), "{refused:?}");
    assert!(
        refused.to_string().contains("redis-cluster://"),
        "{refused}"
    );
}

/// Instances with different partition counts on one Redis would split users' seats: the
/// first records its count, and another count refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partition_count_refuses_to_start() {
    let server = redis::shared_redis();
    let prefix = unique_prefix();
    let target = || RedisTarget::Single { url: server.url() };
    let settings = |partitions| usher::store::StoreSettings {
        partitions,
        ..test_settings()
    };
    RedisStore::connect(redis_options(target(), &prefix), settings(16))
        .await
        .expect("the first instance records 16");
    RedisStore::connect(redis_options(target(), &prefix), settings(16))
        .await
        .expect("the same count starts");
    let refused = RedisStore::connect(redis_options(target(), &prefix), settings(32))
        .await
        .err()
        .expect("another count is refused");
    assert!(matches!(refused, StoreError::Refused(_)), "{refused:?}");
    let message = refused.to_string();
    assert!(
        message.contains("--partitions 16") && message.contains("32"),
        "{message}"
    );
    assert_eq!(
        redis::redis_cli(server.port, &["hget", &format!("{prefix}:meta"), "layout"]),
        usher::store::redis::LAYOUT_VERSION.to_string()
    );
    // Another prefix is another deployment.
    RedisStore::connect(redis_options(target(), &unique_prefix()), settings(32))
        .await
        .expect("a fresh prefix starts with any count");
}

/// The quoted arguments of one MONITOR line, after its `[db source]` part.
fn monitor_args(line: &str) -> Option<(bool, Vec<String>)> {
    let (source, rest) = line.split_once("] ")?;
    let from_lua = source.ends_with(" lua");
    let mut args = Vec::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => arg.extend(chars.next()),
                '"' => break,
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    Some((from_lua, args))
}

/// Every key a script touches, as Redis itself reports it (MONITOR shows the commands a
/// script runs after the EVALSHA that runs it), is one the script was given in KEYS:
/// through creates that evict and replace, a replayed request id, every device call, a
/// termination and every read. The sweep is the one script allowed otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_touch_only_the_keys_they_are_given() {
    use std::io::BufRead;

    let server = redis::RedisServer::start();
    let store = connect(RedisTarget::Single { url: server.url() }, "honest").await;
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli monitor");
    let mut lines = std::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "OK");

    let user = fresh_user();
    let stop_oldest = |device| new_session(&user, device, 2, OverLimitPolicy::StopOldest);
    let tv = store
        .create_session(stop_oldest("tv"), Deadline::NONE)
        .await
        .unwrap();
    let mut phone = stop_oldest("phone");
    phone.request_id = Some(usher::ids::RequestId::parse("r", "r-1").unwrap());
    let phone = store
        .create_session(phone.clone(), Deadline::NONE)
        .await
        .map(|_| phone)
        .unwrap();
    store
        .create_session(phone.clone(), Deadline::NONE)
        .await
        .unwrap(); // replayed
    store
        .create_session(stop_oldest("tablet"), Deadline::NONE)
        .await
        .unwrap(); // evicts tv
    let tablet = store
        .create_session(stop_oldest("tablet"), Deadline::NONE)
        .await
        .unwrap(); // replaces
    let reject = new_session(&user, "laptop", 2, OverLimitPolicy::RejectNew);
    assert!(store.create_session(reject, Deadline::NONE).await.is_err());
    for action in [
        DeviceAction::Heartbeat {
            playback_state: usher::session::PlaybackState::Playing,
        },
        DeviceAction::Pause,
        DeviceAction::Resume,
        DeviceAction::Stop,
    ] {
        let call = DeviceCall {
            name: tablet.session.name.clone(),
            generation: None,
            position_ms: Some(5),
            duration_ms: None,
            profile: None,
            action,
        };
        store.device_call(call, Deadline::NONE).await.unwrap();
    }
    let termination = usher::session::Termination {
        message: "fraud".into(),
        by: "ops".into(),
    };
    store
        .terminate(&phone.name, &termination, Deadline::NONE)
        .await
        .unwrap();
    store
        .get_session(&tv.session.name, Deadline::NONE)
        .await
        .unwrap();
    store.seats(&user, Deadline::NONE).await.unwrap();
    let device = usher::ids::DeviceId::parse("d", "tv").unwrap();
    store
        .preview_create(
            &user,
            &device,
            2,
            OverLimitPolicy::RejectNew,
            Deadline::NONE,
        )
        .await
        .unwrap();
    // A marker after the scenario: everything before it has been shown.
    server.cli(&["echo", "end-of-scenario"]);

    let shown: Vec<(bool, Vec<String>)> = lines
        .map_while(Result::ok)
        .filter_map(|line| monitor_args(&line))
        .take_while(|(_, args)| !args[0].eq_ignore_ascii_case("echo"))
        .collect();
    monitor.kill().ok();
    monitor.wait().ok();

    let (mut given, mut scripts, mut touched) = (Vec::new(), 0, 0);
    for (from_lua, args) in shown {
        let command = args[0].to_ascii_uppercase();
        if !from_lua {
            if command == "FCALL" {
                let count: usize = args[2].parse().unwrap();
                given = args[3..3 + count].to_vec();
                scripts += 1;
            }
            continue;
        }
        // The commands usher's scripts run: TIME has no key, SPUBLISH names a channel.
        if command == "TIME" || command == "SPUBLISH" {
            continue;
        }
        touched += 1;
        assert!(
            given.contains(&args[1]),
            "{command} {} is not in the script's KEYS {given:?}",
            args[1]
        );
    }
    assert!(
        scripts >= 14 && touched > 50,
        "{scripts} scripts, {touched} keys"
    );
}

/// On a Redis that is not a Cluster, heartbeats of sessions of different partitions that
/// arrive together share script calls too (a few lanes take every partition): far fewer
/// FCALLs than partitions, each heartbeat answered as if alone and its event in its own
/// partition's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_redis_heartbeats_of_every_partition_share_a_script_call() {
    const PARTITIONS: u32 = 32;
    let server = redis::RedisServer::start();
    let settings = usher::store::StoreSettings {
        partitions: PARTITIONS,
        ..test_settings()
    };
    let store = Arc::new(
        RedisStore::connect(
            redis_options(RedisTarget::Single { url: server.url() }, "across"),
            settings,
        )
        .await
        .unwrap(),
    );
    // One session in each partition.
    let mut sessions: Vec<Option<Session>> = vec![None; PARTITIONS as usize];
    while sessions.iter().any(Option::is_none) {
        let user = fresh_user();
        let slot = &mut sessions[partition_of(&user, PARTITIONS) as usize];
        if slot.is_none() {
            *slot = Some(start(store.as_ref(), &user, "tv", 1).await);
        }
    }
    let sessions: Vec<Session> = sessions.into_iter().flatten().collect();
    assert_eq!(server.cli(&["config", "resetstat"]), "OK");
    let beats = sessions.iter().enumerate().map(|(i, session)| {
        let store = store.clone();
        // The last one holds a generation its session never had.
        let stale = i == sessions.len() - 1;
        let generation = session.generation + if stale { 7 } else { 0 };
        let call = playing_beat(session, 1_000 + i as u64, generation);
        tokio::spawn(async move { store.device_call_brief(call, Deadline::NONE).await })
    });
    let answers = futures::future::join_all(beats).await;
    let (fcalls, refused) = command_stats(&server, "fcall");
    assert_eq!(refused, 0);
    assert!(
        (1..PARTITIONS as u64 / 2).contains(&fcalls),
        "{fcalls} script calls for heartbeats of {PARTITIONS} partitions"
    );
    for (i, (answer, session)) in answers.into_iter().zip(&sessions).enumerate() {
        let partition = partition_of(&session.name.user, PARTITIONS);
        let events = server.cli(&[
            "xrange",
            &format!("across:{{{partition}}}:events"),
            "-",
            "+",
        ]);
        let heartbeat = events.contains("playback.heartbeat");
        if i == sessions.len() - 1 {
            assert!(
                matches!(answer.unwrap(), Err(StoreError::StaleGeneration)),
                "the stale one is refused"
            );
            assert!(!heartbeat, "{events}");
            continue;
        }
        assert_eq!(answer.unwrap().unwrap().position_ms, 1_000 + i as u64);
        let read = store
            .get_session(&session.name, Deadline::NONE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.position_ms, 1_000 + i as u64);
        assert!(
            heartbeat && events.contains(session.name.session.as_str()),
            "{events}"
        );
    }

    // Unary heartbeats (answered with their sessions) share calls the same way.
    assert_eq!(server.cli(&["config", "resetstat"]), "OK");
    let live = &sessions[..sessions.len() - 1];
    let beats = live.iter().enumerate().map(|(i, session)| {
        let store = store.clone();
        let call = playing_beat(session, 5_000 + i as u64, session.generation);
        tokio::spawn(async move { store.device_call(call, Deadline::NONE).await })
    });
    let answers = futures::future::join_all(beats).await;
    let (fcalls, _) = command_stats(&server, "fcall");
    assert!(
        (1..PARTITIONS as u64 / 2).contains(&fcalls),
        "{fcalls} script calls for unary heartbeats of {} partitions",
        live.len()
    );
    for (i, (answer, session)) in answers.into_iter().zip(live).enumerate() {
        let beaten = answer.unwrap().unwrap();
        assert_eq!(beaten.name, session.name);
        assert_eq!(beaten.position_ms, 5_000 + i as u64);
        assert_eq!(
            (beaten.device, beaten.generation),
            (session.device.clone(), session.generation)
        );
    }
}

/// Heartbeats of sessions of one partition that arrive while another of the partition's
/// calls is in flight go to Redis together: fewer FCALLs than heartbeats, each answered
/// as if alone (a refused one refused, the others done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_one_partition_that_arrive_together_share_a_script_call() {
    const SESSIONS: usize = 32;
    let server = redis::RedisServer::start();
    let store = Arc::new(
        RedisStore::connect(
            redis_options(RedisTarget::Single { url: server.url() }, "lanes"),
            test_settings(),
        )
        .await
        .unwrap(),
    );
    let partitions = test_settings().partitions;
    let first = fresh_user();
    let partition = partition_of(&first, partitions);
    let mut names = Vec::new();
    while names.len() < SESSIONS {
        let user = fresh_user();
        if partition_of(&user, partitions) == partition {
            names.push(start(store.as_ref(), &user, "tv", 1).await);
        }
    }
    assert_eq!(server.cli(&["config", "resetstat"]), "OK");
    let beats = names.iter().enumerate().map(|(i, session)| {
        let store = store.clone();
        // The last one holds a generation its session never had.
        let generation = if i == SESSIONS - 1 {
            session.generation + 7
        } else {
            session.generation
        };
        let call = playing_beat(session, 1_000 + i as u64, generation);
        tokio::spawn(async move { store.device_call_brief(call, Deadline::NONE).await })
    });
    let answers = futures::future::join_all(beats).await;
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        if i == SESSIONS - 1 {
            assert!(
                matches!(answer, Err(StoreError::StaleGeneration)),
                "{answer:?}"
            );
        } else {
            let beat = answer.unwrap();
            assert_eq!(beat.position_ms, 1_000 + i as u64);
            assert_eq!(beat.state, SessionState::Active);
        }
    }
    let stats = server.cli(&["info", "commandstats"]);
    let fcalls: usize = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_fcall:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or_else(|| panic!("no FCALL in {stats}"));
    assert!(
        (1..SESSIONS / 2).contains(&fcalls),
        "{fcalls} script calls for {SESSIONS} heartbeats"
    );
    // What each wrote is there: the records answer with their new positions.
    let read = store
        .get_session(&names[3].name, Deadline::NONE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.position_ms, 1_003);

    // Sent together on purpose: one partition only.
    let other = loop {
        let user = fresh_user();
        if partition_of(&user, partitions) != partition {
            break start(store.as_ref(), &user, "tv", 1).await;
        }
    };
    let mixed = [
        playing_beat(&names[0], 5, names[0].generation),
        playing_beat(&other, 5, other.generation),
    ];
    assert!(matches!(
        store.beat_together(&mixed, Deadline::NONE).await,
        Err(StoreError::Refused(_))
    ));
}
