//! One conformance suite for every store: each case below runs against the memory store,
//! a single redis-server, and a 3-master Redis Cluster (see `stamp!` at the end). A store
//! that fails a case is wrong, whichever it is.
//!
//! Opted out, by category and with the reason: the seat-lost repair needs a seat to vanish
//! under a live session, which only a Redis failover does; it is in `redis_only.rs`.

use std::time::Duration;

use usher::deadline::Deadline;
use usher::ids::{ContentId, DeviceId, ProfileId, RequestId, SessionName, UserId};
use usher::session::{EndReason, PlaybackState, Session, SessionState, Termination};
use usher::store::{
    Beat, DeviceAction, DeviceCall, EventKind, HeartbeatEvents, NewSession, OverLimitPolicy,
    Preview, ProgressCursor, ProgressKey, ProgressWrite, RateLimit, StoreError, Swept,
    partition_of,
};

use crate::support::{BROWSER_USER_AGENT, Backend, Kind, fresh_user, new_session, test_settings};

use OverLimitPolicy::{RejectNew, StopOldest};

fn call(name: &SessionName, action: DeviceAction) -> DeviceCall {
    DeviceCall {
        name: name.clone(),
        generation: None,
        position_ms: None,
        duration_ms: None,
        profile: None,
        action,
    }
}

fn heartbeat(name: &SessionName) -> DeviceCall {
    call(
        name,
        DeviceAction::Heartbeat {
            playback_state: PlaybackState::Playing,
        },
    )
}

async fn open(kind: Kind) -> Backend {
    Backend::open(kind, test_settings()).await
}

/// Past the 1.5 s heartbeat timeout of `test_settings`.
const PAST_TIMEOUT: Duration = Duration::from_millis(1700);

pub async fn create_grants_a_seat_and_appends_started(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "tv", 2, RejectNew).await;
    let s = &created.session;
    assert_eq!(s.state, SessionState::Active);
    assert!(s.generation >= 1);
    assert!(created.replaced.is_empty() && !created.replayed);
    assert_eq!(s.deadline_ms, s.created_ms + 1500);
    assert_eq!(s.client.region, "US");
    let seats = b.store.seats(&user, Deadline::NONE).await.unwrap();
    assert_eq!(seats.holders, vec![s.clone()]);
    assert_eq!(b.session(&s.name).await.as_ref(), Some(s));
    assert_eq!(b.kinds_for(&s.name).await, [EventKind::Started]);
}

pub async fn the_limit_rejects_and_writes_nothing(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let first = b.create(&user, "a", 2, RejectNew).await;
    let second = b.create(&user, "b", 2, RejectNew).await;
    let events_before = b.events_of(&user).await.len();
    let dump_before = b.dump();
    let third = new_session(&user, "c", 2, RejectNew);
    let third_name = third.name.clone();
    match b.try_create(third).await {
        Err(StoreError::LimitReached { limit, holders }) => {
            assert_eq!(limit, 2);
            let names: Vec<_> = holders.iter().map(|h| h.name.clone()).collect();
            assert_eq!(
                names,
                [first.session.name, second.session.name],
                "oldest first"
            );
        }
        other => panic!("expected LimitReached, got {other:?}"),
    }
    assert_eq!(b.events_of(&user).await.len(), events_before);
    assert_eq!(b.dump(), dump_before, "a rejected create writes nothing");
    assert_eq!(b.session(&third_name).await, None);
    assert_eq!(b.holders(&user).await.len(), 2);
}

/// The create rate limit (GCRA): a burst, then one per interval, by the store's clock;
/// a refused create writes nothing; a replayed request is not a new create; a limit
/// refusal still counts as an attempt.
pub async fn creates_over_the_rate_are_refused_and_write_nothing(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let rate = RateLimit {
        interval: Duration::from_millis(700),
        burst: 2,
    };
    let limited = |device: &str, limit: u32| NewSession {
        rate: Some(rate),
        ..new_session(&user, device, limit, RejectNew)
    };
    let mut remembered = limited("a", 10);
    remembered.request_id = Some(usher::ids::RequestId::parse("r", "req-rate").unwrap());
    b.try_create(remembered.clone()).await.unwrap();
    b.try_create(limited("b", 10)).await.unwrap();
    let dump = b.dump();
    let events = b.events_of(&user).await.len();
    let retry_after = match b.try_create(limited("c", 10)).await {
        Err(StoreError::RateLimited { retry_after }) => retry_after,
        other => panic!("expected RateLimited, got {other:?}"),
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= rate.interval,
        "{retry_after:?}"
    );
    assert_eq!(b.dump(), dump, "a refused create writes nothing");
    assert_eq!(b.events_of(&user).await.len(), events);
    let mut retry = remembered.clone();
    retry.name.session = usher::ids::SessionId::generate();
    assert!(
        b.try_create(retry).await.unwrap().replayed,
        "a replay is not limited"
    );
    // Without a limit of its own, a create is never refused for the rate.
    b.try_create(new_session(&user, "d", 10, RejectNew))
        .await
        .unwrap();

    b.advance(retry_after + Duration::from_millis(20)).await;
    b.try_create(limited("c", 10)).await.unwrap();
    assert!(matches!(
        b.try_create(limited("e", 10)).await,
        Err(StoreError::RateLimited { .. })
    ));
    // A create refused by the seat limit took its cell too.
    b.advance(rate.interval + Duration::from_millis(20)).await;
    assert!(matches!(
        b.try_create(limited("f", 1)).await,
        Err(StoreError::LimitReached { .. })
    ));
    assert!(matches!(
        b.try_create(limited("g", 10)).await,
        Err(StoreError::RateLimited { .. })
    ));
}

pub async fn stop_oldest_evicts_the_least_recently_started(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let first = b.create(&user, "a", 2, StopOldest).await;
    b.advance(Duration::from_millis(5)).await;
    let second = b.create(&user, "b", 2, StopOldest).await;
    b.advance(Duration::from_millis(5)).await;
    let third = b.create(&user, "c", 2, StopOldest).await;
    assert_eq!(third.replaced, std::slice::from_ref(&first.session.name));
    let evicted = b.session(&first.session.name).await.unwrap();
    assert_eq!(evicted.state, SessionState::Evicted);
    assert_eq!(evicted.end_reason, Some(EndReason::StopOldest));
    let holders: Vec<_> = b.holders(&user).await.into_iter().map(|s| s.name).collect();
    assert_eq!(holders, [second.session.name, third.session.name.clone()]);
    assert_eq!(
        b.kinds_for(&first.session.name).await,
        [EventKind::Started, EventKind::Evicted]
    );
}

pub async fn the_same_device_replaces_its_own_session(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let first = b.create(&user, "tv", 1, RejectNew).await;
    let again = b.create(&user, "tv", 1, RejectNew).await;
    assert_eq!(again.replaced, std::slice::from_ref(&first.session.name));
    assert!(again.session.generation > first.session.generation);
    let old = b.session(&first.session.name).await.unwrap();
    assert_eq!(old.state, SessionState::Evicted);
    assert_eq!(old.end_reason, Some(EndReason::ReplacedBySameDevice));
    let holders = b.holders(&user).await;
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].name, again.session.name);
    // The old session's device calls now say it has ended.
    let refused = b.call(heartbeat(&first.session.name)).await;
    assert!(
        matches!(refused, Err(StoreError::SessionEnded(s)) if s.state == SessionState::Evicted)
    );
}

pub async fn a_repeated_request_id_returns_the_first_answer(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let mut create = new_session(&user, "tv", 1, RejectNew);
    create.request_id = Some(usher::ids::RequestId::parse("r", "req-1").unwrap());
    let first = b.try_create(create.clone()).await.unwrap();
    let mut retry = create.clone();
    retry.name.session = usher::ids::SessionId::generate();
    let second = b.try_create(retry).await.unwrap();
    assert!(second.replayed);
    assert_eq!(second.session.name, first.session.name);
    assert_eq!(b.holders(&user).await.len(), 1);
    assert_eq!(b.events_of(&user).await.len(), 1, "one started event only");
    let mut different = create.clone();
    different.name.session = usher::ids::SessionId::generate();
    different.device.id = usher::ids::DeviceId::parse("d", "phone").unwrap();
    assert!(matches!(
        b.try_create(different).await,
        Err(StoreError::RequestIdReused)
    ));
}

pub async fn a_replay_after_the_session_ended_returns_it_ended(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let mut create = new_session(&user, "tv", 1, RejectNew);
    create.request_id = Some(usher::ids::RequestId::parse("r", "req-2").unwrap());
    let first = b.try_create(create.clone()).await.unwrap();
    b.store
        .device_call(
            call(&first.session.name, DeviceAction::Stop),
            Deadline::NONE,
        )
        .await
        .unwrap();
    let mut retry = create;
    retry.name.session = usher::ids::SessionId::generate();
    let replay = b.try_create(retry).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.session.name, first.session.name);
    assert_eq!(replay.session.state, SessionState::Stopped);
    assert!(b.holders(&user).await.is_empty(), "no seat taken");
}

pub async fn a_limit_of_zero_admits_nobody_and_writes_nothing(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    for policy in [RejectNew, StopOldest] {
        match b.try_create(new_session(&user, "tv", 0, policy)).await {
            Err(StoreError::LimitReached { limit: 0, holders }) => assert!(holders.is_empty()),
            other => panic!("expected LimitReached, got {other:?}"),
        }
    }
    assert!(b.events_of(&user).await.is_empty());
    assert_eq!(b.dump(), Vec::new());
}

pub async fn a_create_expires_at_most_the_configured_number_of_holders(kind: Kind) {
    let mut settings = test_settings();
    settings.max_evictions_per_call = 1;
    let b = Backend::open(kind, settings).await;
    let user = fresh_user();
    for device in ["a", "b", "c"] {
        b.create(&user, device, 3, RejectNew).await;
    }
    b.advance(PAST_TIMEOUT).await;
    // Overdue holders do not count against the limit, evicted now or not.
    b.create(&user, "d", 1, RejectNew).await;
    let expired = b
        .events_of(&user)
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::Expired)
        .count();
    assert_eq!(
        expired, 1,
        "one eviction per create; the sweeper takes the rest"
    );
    assert_eq!(b.holders(&user).await.len(), 1);
}

pub async fn ended_sessions_are_forgotten_after_the_retention(kind: Kind) {
    let mut settings = test_settings();
    settings.ended_retention = Duration::from_millis(1000);
    let b = Backend::open(kind, settings).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    b.call(call(&name, DeviceAction::Stop)).await.unwrap();
    assert!(b.session(&name).await.is_some(), "kept a while");
    b.advance(Duration::from_millis(1300)).await;
    assert_eq!(b.session(&name).await, None);
    assert!(matches!(
        b.call(heartbeat(&name)).await,
        Err(StoreError::NotFound)
    ));
}

pub async fn an_expired_holder_never_blocks_a_create(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let stale = b.create(&user, "a", 1, RejectNew).await;
    b.advance(PAST_TIMEOUT).await;
    let fresh = b.create(&user, "b", 1, RejectNew).await;
    assert!(fresh.replaced.is_empty());
    let expired = b.session(&stale.session.name).await.unwrap();
    assert_eq!(expired.state, SessionState::Expired);
    assert_eq!(expired.end_reason, Some(EndReason::HeartbeatTimeout));
    let kinds: Vec<_> = b
        .events_of(&user)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [EventKind::Started, EventKind::Expired, EventKind::Started]
    );
}

pub async fn the_sweep_expires_overdue_sessions(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let partition = partition_of(&user, b.store.settings().partitions);
    let created = b.create(&user, "a", 2, RejectNew).await;
    // Sweep everything overdue in this partition (other tests' too), then check ours.
    b.advance(PAST_TIMEOUT).await;
    while b.store.sweep(partition, 1000).await.unwrap().expired > 0 {}
    let swept = b.session(&created.session.name).await.unwrap();
    assert_eq!(swept.state, SessionState::Expired);
    assert!(b.holders(&user).await.is_empty());
    assert_eq!(
        b.kinds_for(&created.session.name).await,
        [EventKind::Started, EventKind::Expired]
    );
    // A second sweep finds nothing more of ours and appends nothing.
    b.store.sweep(partition, 1000).await.unwrap();
    assert_eq!(b.kinds_for(&created.session.name).await.len(), 2);
}

pub async fn the_sweep_is_bounded(kind: Kind) {
    let mut settings = test_settings();
    settings.partitions = 1;
    let b = Backend::open(kind, settings).await;
    let users: Vec<_> = (0..3).map(|_| fresh_user()).collect();
    for user in &users {
        b.create(user, "a", 1, RejectNew).await;
    }
    b.advance(PAST_TIMEOUT).await;
    // The partition may hold other tests' sessions (shared Redis, new prefix per test: no).
    let first = b.store.sweep(0, 2).await.unwrap();
    assert_eq!(first.expired, 2);
    assert_eq!(first.next_due_ms, Some(0), "one is overdue still");
    assert_eq!(b.store.sweep(0, 2).await.unwrap().expired, 1);
    assert_eq!(
        b.store.sweep(0, 2).await.unwrap(),
        Swept {
            expired: 0,
            next_due_ms: None
        }
    );
}

/// A sweep tells how long until the partition's earliest deadline, so the sweeper need
/// not look at it before then; a partition with no session says it holds none.
pub async fn the_sweep_tells_when_the_partition_is_next_due(kind: Kind) {
    let mut settings = test_settings();
    settings.partitions = 1;
    let b = Backend::open(kind, settings).await;
    assert_eq!(
        b.store.sweep(0, 10).await.unwrap(),
        Swept {
            expired: 0,
            next_due_ms: None
        }
    );
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await.session;
    let swept = b.store.sweep(0, 10).await.unwrap();
    assert_eq!(swept.expired, 0);
    // The 1.5 s timeout of test_settings, less the time since the create.
    let due = swept.next_due_ms.expect("a deadline");
    assert!(due > 500 && due <= 1500, "{due}");
    b.advance(PAST_TIMEOUT).await;
    let swept = b.store.sweep(0, 10).await.unwrap();
    assert_eq!(
        swept,
        Swept {
            expired: 1,
            next_due_ms: None
        }
    );
    assert_eq!(
        b.session(&created.name).await.unwrap().state,
        SessionState::Expired
    );
}

pub async fn heartbeats_keep_the_seat(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    for _ in 0..3 {
        b.advance(Duration::from_millis(900)).await;
        let mut beat = heartbeat(&name);
        beat.position_ms = Some(42_000);
        let session = b.call(beat).await.unwrap();
        assert_eq!(session.state, SessionState::Active);
        assert_eq!(session.position_ms, 42_000);
        assert_eq!(session.playback_state, PlaybackState::Playing);
        assert_eq!(session.deadline_ms, session.last_heartbeat_ms + 1500);
    }
    assert_eq!(b.holders(&user).await.len(), 1);
    let kinds = b.kinds_for(&name).await;
    assert_eq!(
        kinds,
        [
            EventKind::Started,
            EventKind::Heartbeat,
            EventKind::Heartbeat,
            EventKind::Heartbeat
        ]
    );
}

pub async fn a_heartbeat_after_the_deadline_is_refused_and_expires(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    b.advance(PAST_TIMEOUT).await;
    match b.call(heartbeat(&created.session.name)).await {
        Err(StoreError::SessionEnded(s)) => assert_eq!(s.state, SessionState::Expired),
        other => panic!("expected SessionEnded, got {other:?}"),
    }
    // Refused again, without a second event.
    assert!(b.call(heartbeat(&created.session.name)).await.is_err());
    assert_eq!(
        b.kinds_for(&created.session.name).await,
        [EventKind::Started, EventKind::Expired]
    );
    assert!(b.holders(&user).await.is_empty());
}

pub async fn pause_keeps_the_seat_up_to_the_maximum_pause(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    let paused = b.call(call(&name, DeviceAction::Pause)).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    assert!(paused.paused_ms.is_some());
    // The maximum pause (0.8 s) caps the deadline even though heartbeats continue (a
    // paused player reports PAUSED; one reporting PLAYING would resume).
    assert_eq!(paused.deadline_ms, paused.paused_ms.unwrap() + 800);
    let still_paused = || {
        call(
            &name,
            DeviceAction::Heartbeat {
                playback_state: PlaybackState::Paused,
            },
        )
    };
    b.advance(Duration::from_millis(400)).await;
    b.call(still_paused()).await.unwrap();
    assert_eq!(b.holders(&user).await.len(), 1);
    b.advance(Duration::from_millis(600)).await;
    match b.call(still_paused()).await {
        Err(StoreError::SessionEnded(s)) => {
            assert_eq!(s.state, SessionState::Expired);
            assert_eq!(s.end_reason, Some(EndReason::MaxPauseExceeded));
        }
        other => panic!("expected SessionEnded, got {other:?}"),
    }
}

pub async fn pause_and_resume_append_one_event_each(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    b.call(call(&name, DeviceAction::Pause)).await.unwrap();
    // Pausing a paused session changes nothing and appends nothing.
    let again = b.call(call(&name, DeviceAction::Pause)).await.unwrap();
    assert_eq!(again.state, SessionState::Paused);
    let resumed = b.call(call(&name, DeviceAction::Resume)).await.unwrap();
    assert_eq!(resumed.state, SessionState::Active);
    assert_eq!(resumed.paused_ms, None);
    b.call(call(&name, DeviceAction::Resume)).await.unwrap();
    assert_eq!(
        b.kinds_for(&name).await,
        [EventKind::Started, EventKind::Paused, EventKind::Resumed]
    );
}

/// A heartbeat that reports PAUSED pauses the session and one that reports PLAYING
/// resumes it, with the same events as the explicit calls; repeating either changes
/// nothing more.
pub async fn a_reported_playback_state_pauses_and_resumes(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let name = b.create(&user, "a", 1, RejectNew).await.session.name;
    let beat = |state| {
        call(
            &name,
            DeviceAction::Heartbeat {
                playback_state: state,
            },
        )
    };
    let paused = b.call(beat(PlaybackState::Paused)).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    assert!(paused.paused_ms.is_some());
    let still = b.call(beat(PlaybackState::Paused)).await.unwrap();
    assert_eq!(
        (still.state, still.paused_ms),
        (paused.state, paused.paused_ms)
    );
    let buffering = b.call(beat(PlaybackState::Buffering)).await.unwrap();
    assert_eq!(
        buffering.state,
        SessionState::Paused,
        "only PLAYING resumes"
    );
    let resumed = b.call(beat(PlaybackState::Playing)).await.unwrap();
    assert_eq!(
        (resumed.state, resumed.paused_ms),
        (SessionState::Active, None)
    );
    let kinds: Vec<_> = b
        .kinds_for(&name)
        .await
        .into_iter()
        .filter(|k| *k != EventKind::Heartbeat)
        .collect();
    assert_eq!(
        kinds,
        [EventKind::Started, EventKind::Paused, EventKind::Resumed]
    );
}

/// A brief device call is the same call answered with what it changed: after each,
/// the session reads back as the brief answer says, through a pause, a resume, a plain
/// heartbeat and a stop; and it is refused as the full call is.
pub async fn a_brief_device_call_answers_what_the_full_one_changed(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await.session;
    let name = created.name.clone();
    let brief = |action, position_ms| {
        let store = b.store.clone();
        let call = DeviceCall {
            name: name.clone(),
            generation: Some(created.generation),
            position_ms,
            duration_ms: None,
            profile: None,
            action,
        };
        async move { store.device_call_brief(call, Deadline::NONE).await }
    };
    let beat = |state| DeviceAction::Heartbeat {
        playback_state: state,
    };
    for (action, position) in [
        (beat(PlaybackState::Paused), Some(61_500)),
        (beat(PlaybackState::Buffering), None),
        (beat(PlaybackState::Playing), Some(62_000)),
        (DeviceAction::Pause, Some(63_000)),
        (DeviceAction::Resume, None),
        (beat(PlaybackState::Playing), Some(64_250)),
    ] {
        let answer = brief(action, position).await.unwrap();
        let stored = b.session(&name).await.unwrap();
        assert_eq!(answer, Beat::of(&stored), "{action:?}");
        let mut updated = created.clone();
        answer.apply_to(&mut updated);
        assert_eq!(Beat::of(&updated), answer);
    }
    let stopped = brief(DeviceAction::Stop, Some(65_000)).await.unwrap();
    assert_eq!(stopped.state, SessionState::Stopped);
    assert_eq!(stopped.position_ms, 65_000);
    assert!(matches!(
        brief(beat(PlaybackState::Playing), None).await,
        Err(StoreError::SessionEnded(_))
    ));
    // The user's next session is a later generation: the first one's is stale for it.
    let stale = DeviceCall {
        generation: Some(created.generation),
        ..heartbeat(&b.create(&user, "b", 1, RejectNew).await.session.name)
    };
    assert!(matches!(
        b.store.device_call_brief(stale, Deadline::NONE).await,
        Err(StoreError::StaleGeneration)
    ));
}

pub async fn stop_releases_the_seat_at_once(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    let mut stop = call(&name, DeviceAction::Stop);
    stop.position_ms = Some(3_600_000);
    let stopped = b.call(stop).await.unwrap();
    assert_eq!(stopped.state, SessionState::Stopped);
    assert_eq!(stopped.position_ms, 3_600_000);
    assert!(stopped.ended_ms.is_some());
    assert!(b.holders(&user).await.is_empty());
    b.create(&user, "b", 1, RejectNew).await;
    let stop_event = b
        .events_of(&user)
        .await
        .into_iter()
        .find(|e| e.kind == EventKind::Stopped)
        .unwrap();
    assert_eq!(stop_event.position_ms, 3_600_000);
    assert_eq!(stop_event.session, name);
    assert!(matches!(
        b.call(call(&name, DeviceAction::Stop)).await,
        Err(StoreError::SessionEnded(_))
    ));
}

pub async fn terminate_ends_a_session_with_the_reason(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    let termination = Termination {
        message: "stop_oldest".into(),
        by: "support-tool".into(),
    };
    let ended = b
        .store
        .terminate(&name, &termination, Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(ended.state, SessionState::Terminated);
    // An operator's words that look like a system reason stay the operator's.
    assert_eq!(ended.end_reason, Some(EndReason::TerminatedByOperator));
    assert_eq!(ended.termination, termination);
    assert_eq!(b.session(&name).await, Some(ended.clone()));
    assert!(b.holders(&user).await.is_empty());
    assert!(matches!(
        b.store.terminate(&name, &termination, Deadline::NONE).await,
        Err(StoreError::SessionEnded(_))
    ));
    assert!(matches!(
        b.call(call(&name, DeviceAction::Resume)).await,
        Err(StoreError::SessionEnded(_))
    ));
    let events = b.events_of(&user).await;
    let terminated = events
        .iter()
        .find(|e| e.kind == EventKind::Terminated)
        .unwrap();
    assert_eq!(terminated.reason, Some(EndReason::TerminatedByOperator));
    assert_eq!(terminated.termination, termination);
    assert_eq!(events.len(), 2);
}

/// Free text of every shape (commas, quotes, `=`, other scripts, a browser's user agent,
/// none at all) comes back from every call as it went in, and so does an operator's
/// message, through heartbeats, a pause and the end.
pub async fn a_record_keeps_every_text_as_given(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let mut new = new_session(&user, "3c:22:fb:01:02:03", 1, RejectNew);
    new.device.name = "Wohnzimmer, 2. Stock = \"TV\" \u{1f4fa} \u{fc}".into();
    new.client.user_agent = BROWSER_USER_AGENT.into();
    new.client.ip_address = "2001:db8::1".into();
    new.client.region = String::new();
    let as_given = |s: &Session| {
        assert_eq!(
            (&s.name, &s.profile, &s.content, &s.device, &s.client),
            (
                &new.name,
                &new.profile,
                &new.content,
                &new.device,
                &new.client
            )
        );
    };
    let created = b
        .store
        .create_session(new.clone(), Deadline::NONE)
        .await
        .unwrap()
        .session;
    as_given(&created);
    let name = created.name.clone();
    let mut beat = heartbeat(&name);
    beat.position_ms = Some(61_000);
    beat.duration_ms = Some(5_400_000);
    as_given(&b.call(beat).await.unwrap());
    as_given(&b.call(heartbeat(&name)).await.unwrap());
    let paused = b.call(call(&name, DeviceAction::Pause)).await.unwrap();
    as_given(&paused);
    assert_eq!(
        (paused.state, paused.position_ms),
        (SessionState::Paused, 61_000)
    );
    as_given(&b.session(&name).await.unwrap());
    as_given(&b.holders(&user).await[0]);
    let termination = Termination {
        message: "fraud, case #12 = \"closed\" \u{2713}".into(),
        by: "support-tool".into(),
    };
    let ended = b
        .store
        .terminate(&name, &termination, Deadline::NONE)
        .await
        .unwrap();
    as_given(&ended);
    assert_eq!(ended.termination, termination);
    assert_eq!(ended.position_ms, 61_000);
    assert_eq!(b.session(&name).await, Some(ended));
}

pub async fn a_stale_generation_is_refused(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let mut stale = heartbeat(&created.session.name);
    stale.generation = Some(created.session.generation + 1);
    assert!(matches!(
        b.call(stale).await,
        Err(StoreError::StaleGeneration)
    ));
    let mut current = heartbeat(&created.session.name);
    current.generation = Some(created.session.generation);
    b.call(current).await.unwrap();
}

pub async fn unknown_and_foreign_sessions_are_not_found(kind: Kind) {
    let b = open(kind).await;
    let owner = fresh_user();
    let created = b.create(&owner, "a", 1, RejectNew).await;
    let foreign = SessionName {
        user: fresh_user(),
        session: created.session.name.session.clone(),
    };
    assert!(matches!(
        b.call(heartbeat(&foreign)).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        b.store
            .terminate(&foreign, &Termination::default(), Deadline::NONE)
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(b.session(&foreign).await, None);
    let unknown = SessionName {
        user: owner.clone(),
        session: usher::ids::SessionId::generate(),
    };
    assert!(matches!(
        b.call(heartbeat(&unknown)).await,
        Err(StoreError::NotFound)
    ));
}

pub async fn reading_seats_changes_nothing(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    b.create(&user, "a", 1, RejectNew).await;
    b.advance(PAST_TIMEOUT).await;
    let seats = b.store.seats(&user, Deadline::NONE).await.unwrap();
    assert!(seats.holders.is_empty(), "an overdue holder is not live");
    assert_eq!(
        b.events_of(&user).await.len(),
        1,
        "no expired event from a read"
    );
}

pub async fn sampled_heartbeat_events_are_rate_limited(kind: Kind) {
    let mut settings = test_settings();
    settings.heartbeat_events = HeartbeatEvents::Sampled;
    settings.heartbeat_event_interval = Duration::from_millis(1000);
    let b = Backend::open(kind, settings).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    let name = created.session.name;
    b.call(heartbeat(&name)).await.unwrap();
    b.call(heartbeat(&name)).await.unwrap();
    assert_eq!(b.kinds_for(&name).await, [EventKind::Started]);
    b.advance(Duration::from_millis(1100)).await;
    b.call(heartbeat(&name)).await.unwrap();
    b.call(heartbeat(&name)).await.unwrap();
    assert_eq!(
        b.kinds_for(&name).await,
        [EventKind::Started, EventKind::Heartbeat]
    );
}

pub async fn events_carry_the_session_and_read_after_a_cursor(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "a", 1, RejectNew).await;
    b.store
        .device_call(
            call(&created.session.name, DeviceAction::Pause),
            Deadline::NONE,
        )
        .await
        .unwrap();
    let events = b.events_of(&user).await;
    let started = &events[0];
    assert_eq!(started.kind, EventKind::Started);
    assert_eq!(started.session, created.session.name);
    assert_eq!(started.generation, created.session.generation);
    assert_eq!(started.device.as_str(), "a");
    assert_eq!(started.content.as_str(), "title-1");
    assert_eq!(started.profile.as_str(), "profile-1");
    assert_eq!(started.at_ms, created.session.created_ms);
    let partition = partition_of(&user, b.store.settings().partitions);
    let after = b
        .store
        .read_events(partition, Some(&started.id), 100)
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].kind, EventKind::Paused);
    let first = b.store.read_events(partition, None, 1).await.unwrap();
    assert_eq!(first.len(), 1, "count bounds the answer");
    for bad in ["12", "x-1", "1-y", ""] {
        let read = b.store.read_events(partition, Some(bad), 10).await;
        assert!(
            matches!(read, Err(StoreError::Corrupt(_))),
            "cursor {bad:?}"
        );
    }
}

pub async fn every_state_change_appends_exactly_one_event(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let a = b.create(&user, "a", 1, StopOldest).await;
    let a = a.session.name;
    b.call(call(&a, DeviceAction::Pause)).await.unwrap();
    b.call(call(&a, DeviceAction::Resume)).await.unwrap();
    b.call(heartbeat(&a)).await.unwrap();
    let c = b.create(&user, "c", 1, StopOldest).await;
    let c = c.session.name;
    b.call(call(&c, DeviceAction::Stop)).await.unwrap();
    let kinds: Vec<_> = b
        .events_of(&user)
        .await
        .into_iter()
        .map(|e| (e.session, e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            (a.clone(), EventKind::Started),
            (a.clone(), EventKind::Paused),
            (a.clone(), EventKind::Resumed),
            (a.clone(), EventKind::Heartbeat),
            (a.clone(), EventKind::Evicted),
            (c.clone(), EventKind::Started),
            (c.clone(), EventKind::Stopped),
        ]
    );
}

pub async fn concurrent_creates_never_exceed_the_limit(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let creates = (0..60).map(|i| {
        let store = b.store.clone();
        let create = new_session(&user, &format!("d{i}"), 3, RejectNew);
        tokio::spawn(async move { store.create_session(create, Deadline::NONE).await })
    });
    let results = futures::future::join_all(creates).await;
    let admitted = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Ok(Err(StoreError::LimitReached { .. }))))
        .count();
    assert_eq!((admitted, refused), (3, 57));
    assert_eq!(b.holders(&user).await.len(), 3);
}

/// One answer everywhere: reading a session past its deadline ends it then (with its one
/// `expired` event), as a device call would, instead of showing it ACTIVE until the
/// sweeper comes.
pub async fn reading_a_session_past_its_deadline_shows_it_expired(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let created = b.create(&user, "tv", 2, RejectNew).await;
    let name = created.session.name;
    let live = b.session(&name).await.unwrap();
    assert_eq!(live.state, SessionState::Active, "not yet");
    b.advance(PAST_TIMEOUT).await;
    let read = b.session(&name).await.unwrap();
    assert_eq!(read.state, SessionState::Expired);
    assert_eq!(read.end_reason, Some(EndReason::HeartbeatTimeout));
    assert!(read.ended_ms.is_some());
    let again = b.session(&name).await.unwrap();
    assert_eq!(again, read, "a second read gives the same answer");
    assert_eq!(
        b.kinds_for(&name).await,
        [EventKind::Started, EventKind::Expired],
        "exactly one expired event"
    );
    assert!(b.holders(&user).await.is_empty());
    // A session of another user is not found, and a missing one is none.
    let foreign = SessionName {
        user: fresh_user(),
        session: name.session.clone(),
    };
    assert_eq!(b.session(&foreign).await, None);
}

/// Ids may hold `:` (MAC addresses, `vendor:id`): keys of different users and requests
/// must still never meet. Under the first key layout, user `a` with request `x:seats`
/// and user `a:req:x` shared a key.
pub async fn ids_with_colons_never_share_state(kind: Kind) {
    let b = open(kind).await;
    let partitions = b.store.settings().partitions;
    // Two users in one partition (one hash tag), or their keys could not meet anyway.
    let (plain, tricky) = std::iter::repeat_with(fresh_user)
        .map(|base| {
            let tricky = usher::ids::UserId::parse("u", &format!("{base}:req:x")).unwrap();
            (base, tricky)
        })
        .find(|(a, b)| partition_of(a, partitions) == partition_of(b, partitions))
        .unwrap();
    let mut first = new_session(&plain, "3c:22:fb:01:02:03", 1, RejectNew);
    first.request_id = Some(usher::ids::RequestId::parse("r", "x:seats").unwrap());
    let first = b.try_create(first).await.unwrap();
    let second = b.create(&tricky, "roku:1234", 1, RejectNew).await;
    assert!(!second.replayed, "another user's create is not a replay");
    let plain_seats = b.holders(&plain).await;
    let tricky_seats = b.holders(&tricky).await;
    assert_eq!(plain_seats, vec![first.session.clone()]);
    assert_eq!(tricky_seats, vec![second.session.clone()]);
    assert_eq!(first.session.device.id.as_str(), "3c:22:fb:01:02:03");
    // Each user is at its limit of one on its own.
    for user in [&plain, &tricky] {
        assert!(matches!(
            b.try_create(new_session(user, "phone", 1, RejectNew)).await,
            Err(StoreError::LimitReached { .. })
        ));
    }
}

/// Every way a session ends reaches the notification feed ("stop now" for the device's
/// stream on whichever instance holds it), once per session, after the change.
/// Seats in use across all users: live sessions count, stopped ones not, and one past
/// its deadline until the sweep expires it.
pub async fn seats_in_use_counts_every_users_held_seats(kind: Kind) {
    let b = open(kind).await;
    let count = || async { b.store.seats_in_use().await.unwrap() };
    assert_eq!(count().await, 0);
    let (ann, bob) = (fresh_user(), fresh_user());
    let first = b.create(&ann, "tv", 2, RejectNew).await;
    b.create(&ann, "phone", 2, RejectNew).await;
    b.create(&bob, "tv", 2, RejectNew).await;
    assert_eq!(count().await, 3);
    b.call(call(&first.session.name, DeviceAction::Stop))
        .await
        .unwrap();
    assert_eq!(count().await, 2);
    b.advance(Duration::from_millis(1600)).await;
    assert_eq!(count().await, 2, "overdue, not yet swept");
    for partition in 0..b.store.settings().partitions {
        b.store.sweep(partition, 100).await.unwrap();
    }
    assert_eq!(count().await, 0);
}

pub async fn ending_a_session_notifies_subscribers(kind: Kind) {
    let b = open(kind).await;
    let mut feed = b.store.ended_sessions().await.unwrap();
    let user = fresh_user();
    let next = async |feed: &mut usher::store::EndedFeed| {
        tokio::time::timeout(std::time::Duration::from_secs(5), feed.next())
            .await
            .expect("a notice within 5 s")
            .expect("the feed is open")
    };
    let create = |device: &str, limit| {
        b.store.create_session(
            new_session(&user, device, limit, StopOldest),
            Deadline::NONE,
        )
    };
    // Stopped by the device.
    let stopped = create("a", 3).await.unwrap().session.name;
    b.call(call(&stopped, DeviceAction::Stop)).await.unwrap();
    assert_eq!(next(&mut feed).await, stopped);
    // Terminated by an operator.
    let terminated = create("b", 3).await.unwrap().session.name;
    b.store
        .terminate(&terminated, &Termination::default(), Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(next(&mut feed).await, terminated);
    // Evicted: the same device starts again.
    let replaced = create("c", 3).await.unwrap().session.name;
    let replacing = create("c", 3).await.unwrap();
    assert_eq!(replacing.replaced, vec![replaced.clone()]);
    assert_eq!(next(&mut feed).await, replaced);
    // Evicted under stop-oldest: "c" is the oldest holder when a limit of one is met.
    create("d", 1).await.unwrap();
    assert_eq!(next(&mut feed).await, replacing.session.name);
    // Expired, found by the sweep.
    b.advance(PAST_TIMEOUT).await;
    let partition = partition_of(&user, b.store.settings().partitions);
    let mut expired = 0;
    for _ in 0..50 {
        expired = b.store.sweep(partition, 100).await.unwrap().expired;
        if expired > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(expired, 1, "the sweep expires the last holder");
    let notice = next(&mut feed).await;
    assert_eq!(notice.user, user);
    // A subscriber that comes later sees only what ends after it came.
    let mut late = b.store.ended_sessions().await.unwrap();
    let last = create("e", 3).await.unwrap().session.name;
    b.call(call(&last, DeviceAction::Stop)).await.unwrap();
    assert_eq!(next(&mut late).await, last);
    assert_eq!(next(&mut feed).await, last);
}

/// CheckAvailability's preview is held to the store's own create rules: each preview
/// says what the create right after it does, and a preview writes nothing.
pub async fn the_preview_is_what_a_create_then_does(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let device = |id: &str| usher::ids::DeviceId::parse("d", id).unwrap();
    let preview = async |id: &str, limit, policy| {
        let events = b.events_of(&user).await;
        let dump = b.dump();
        let (_, previewed) = b
            .store
            .preview_create(&user, &device(id), limit, policy, Deadline::NONE)
            .await
            .unwrap();
        assert_eq!(
            b.events_of(&user).await,
            events,
            "a preview appends nothing"
        );
        assert_eq!(b.dump(), dump, "a preview writes nothing");
        previewed
    };
    assert_eq!(preview("tv", 2, RejectNew).await, Preview::FreeSeat);
    let tv = b.create(&user, "tv", 2, RejectNew).await;
    assert!(tv.replaced.is_empty());
    assert_eq!(
        preview("tv", 2, RejectNew).await,
        Preview::ReplacesDeviceSession(tv.session.name.clone())
    );
    let first = tv.session.name;
    let tv = b.create(&user, "tv", 2, RejectNew).await;
    assert_eq!(tv.replaced, vec![first]);
    assert_eq!(preview("phone", 2, RejectNew).await, Preview::FreeSeat);
    b.create(&user, "phone", 2, RejectNew).await;
    assert_eq!(preview("box", 2, RejectNew).await, Preview::LimitReached);
    assert!(matches!(
        b.try_create(new_session(&user, "box", 2, RejectNew)).await,
        Err(StoreError::LimitReached { .. })
    ));
    let Preview::EvictsOldest(ended) = preview("box", 2, StopOldest).await else {
        panic!("stop-oldest evicts")
    };
    assert_eq!(ended, vec![tv.session.name.clone()]);
    let boxed = b.create(&user, "box", 2, StopOldest).await;
    assert_eq!(boxed.replaced, ended);
    // Holders past their deadline count as free, as the create expires them.
    b.advance(PAST_TIMEOUT).await;
    assert_eq!(preview("stick", 1, RejectNew).await, Preview::FreeSeat);
    let stick = b.create(&user, "stick", 1, RejectNew).await;
    assert!(stick.replaced.is_empty());
}

fn progress_key(user: &UserId, profile: &str, content: &str) -> ProgressKey {
    ProgressKey {
        user: user.clone(),
        profile: ProfileId::parse("profile", profile).unwrap(),
        content: ContentId::parse("content", content).unwrap(),
    }
}

fn progress_write(key: &ProgressKey, position_ms: u64, device: &str) -> ProgressWrite {
    ProgressWrite {
        key: key.clone(),
        position_ms,
        duration_ms: Some(5_400_000),
        completed: false,
        device: DeviceId::parse("device", device).unwrap(),
    }
}

/// A create reads the profile's progress in the title in the same step (where playback
/// resumes): none before a write, the write after it, nothing for another title or
/// profile, and a repeated request id answers with the progress as it is now.
pub async fn a_create_reads_the_profiles_progress_in_its_title(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let create = async |new: NewSession| b.store.create_session(new, Deadline::NONE).await.unwrap();
    let first = create(new_session(&user, "tv", 10, RejectNew)).await;
    assert_eq!(first.progress, None);
    let key = progress_key(&user, "profile-1", "title-1");
    let written = b
        .store
        .write_progress(progress_write(&key, 61_500, "tv"), Deadline::NONE)
        .await
        .unwrap();
    let second = create(new_session(&user, "phone", 10, RejectNew)).await;
    assert_eq!(second.progress, Some(written.clone()));
    let mut other_title = new_session(&user, "tablet", 10, RejectNew);
    other_title.content = ContentId::parse("c", "title-2").unwrap();
    assert_eq!(create(other_title).await.progress, None);
    let mut other_profile = new_session(&user, "web", 10, RejectNew);
    other_profile.profile = ProfileId::parse("p", "profile-2").unwrap();
    assert_eq!(create(other_profile).await.progress, None);

    let mut with_id = new_session(&user, "console", 10, RejectNew);
    with_id.request_id = Some(RequestId::parse("r", "req-1").unwrap());
    assert_eq!(create(with_id.clone()).await.progress, Some(written));
    b.advance(Duration::from_millis(5)).await;
    let moved = b
        .store
        .write_progress(progress_write(&key, 90_000, "console"), Deadline::NONE)
        .await
        .unwrap();
    let again = create(with_id).await;
    assert!(again.replayed);
    assert_eq!(again.progress, Some(moved));
}

pub async fn progress_is_written_read_and_deleted(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let key = progress_key(&user, "main", "title-1");
    assert_eq!(
        b.store.get_progress(&key, Deadline::NONE).await.unwrap(),
        None
    );
    let first = b
        .store
        .write_progress(progress_write(&key, 61_500, "tv"), Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(
        (first.position_ms, first.duration_ms, first.completed),
        (61_500, Some(5_400_000), false)
    );
    assert_eq!(first.device.as_str(), "tv");
    assert_eq!(
        b.store.get_progress(&key, Deadline::NONE).await.unwrap(),
        Some(first.clone())
    );
    // Another device writes later: its write is the one kept, stamped by the store.
    b.advance(Duration::from_millis(5)).await;
    let mut write = progress_write(&key, 90_000, "phone");
    write.duration_ms = None;
    write.completed = true;
    let second = b.store.write_progress(write, Deadline::NONE).await.unwrap();
    assert!(second.updated_ms > first.updated_ms);
    assert_eq!(
        (second.position_ms, second.duration_ms, second.completed),
        (90_000, None, true)
    );
    assert_eq!(
        b.store.get_progress(&key, Deadline::NONE).await.unwrap(),
        Some(second)
    );
    assert!(b.store.delete_progress(&key, Deadline::NONE).await.unwrap());
    assert!(!b.store.delete_progress(&key, Deadline::NONE).await.unwrap());
    assert_eq!(
        b.store.get_progress(&key, Deadline::NONE).await.unwrap(),
        None
    );
    let profile = ProfileId::parse("profile", "main").unwrap();
    assert!(
        b.store
            .list_progress(&user, &profile, None, 10, Deadline::NONE)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn progress_lists_most_recent_first_in_pages(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let profile = ProfileId::parse("profile", "main").unwrap();
    let mut written = Vec::new();
    for (i, title) in ["c", "a", "e", "b", "d"].iter().enumerate() {
        if i == 3 {
            b.advance(Duration::from_millis(5)).await;
        }
        let key = progress_key(&user, "main", title);
        written.push(
            b.store
                .write_progress(progress_write(&key, i as u64, "tv"), Deadline::NONE)
                .await
                .unwrap(),
        );
    }
    // Most recent first; titles written in the same millisecond, highest id first.
    let mut expected = written.clone();
    expected.sort_by(|a, b| (b.updated_ms, &b.content).cmp(&(a.updated_ms, &a.content)));
    let all = b
        .store
        .list_progress(&user, &profile, None, 10, Deadline::NONE)
        .await
        .unwrap();
    assert_eq!(all, expected);
    let mut paged = Vec::new();
    let mut cursor: Option<ProgressCursor> = None;
    loop {
        let page = b
            .store
            .list_progress(&user, &profile, cursor.as_ref(), 2, Deadline::NONE)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        cursor = Some(ProgressCursor {
            updated_ms: last.updated_ms,
            content: last.content.clone(),
        });
        paged.extend(page);
    }
    assert_eq!(paged, expected);
    // Another profile of the user, and a user whose id extends this one's, share nothing.
    let other_profile = ProfileId::parse("profile", "kids").unwrap();
    assert!(
        b.store
            .list_progress(&user, &other_profile, None, 10, Deadline::NONE)
            .await
            .unwrap()
            .is_empty()
    );
    let other_user = UserId::parse("user", &format!("{user}:x")).unwrap();
    assert!(
        b.store
            .list_progress(&other_user, &profile, None, 10, Deadline::NONE)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn progress_keeps_the_most_recent_titles_up_to_the_cap(kind: Kind) {
    let mut settings = test_settings();
    settings.progress_cap = 3;
    let b = Backend::open(kind, settings).await;
    let user = fresh_user();
    for (i, title) in ["t1", "t2", "t3", "t4", "t5"].iter().enumerate() {
        b.advance(Duration::from_millis(3)).await;
        let key = progress_key(&user, "main", title);
        b.store
            .write_progress(progress_write(&key, i as u64, "tv"), Deadline::NONE)
            .await
            .unwrap();
    }
    let profile = ProfileId::parse("profile", "main").unwrap();
    let kept: Vec<String> = b
        .store
        .list_progress(&user, &profile, None, 10, Deadline::NONE)
        .await
        .unwrap()
        .iter()
        .map(|p| p.content.to_string())
        .collect();
    assert_eq!(kept, ["t5", "t4", "t3"]);
    for gone in ["t1", "t2"] {
        let key = progress_key(&user, "main", gone);
        assert_eq!(
            b.store.get_progress(&key, Deadline::NONE).await.unwrap(),
            None
        );
    }
}

pub async fn progress_is_forgotten_after_its_retention(kind: Kind) {
    let mut settings = test_settings();
    settings.progress_retention = Duration::from_millis(300);
    let b = Backend::open(kind, settings).await;
    let user = fresh_user();
    let key = progress_key(&user, "main", "title-1");
    b.store
        .write_progress(progress_write(&key, 1, "tv"), Deadline::NONE)
        .await
        .unwrap();
    b.advance(Duration::from_millis(150)).await;
    // A write keeps the whole profile another retention.
    let other = progress_key(&user, "main", "title-2");
    b.store
        .write_progress(progress_write(&other, 2, "tv"), Deadline::NONE)
        .await
        .unwrap();
    b.advance(Duration::from_millis(200)).await;
    assert!(
        b.store
            .get_progress(&key, Deadline::NONE)
            .await
            .unwrap()
            .is_some()
    );
    b.advance(Duration::from_millis(200)).await;
    assert_eq!(
        b.store.get_progress(&key, Deadline::NONE).await.unwrap(),
        None
    );
    assert_eq!(
        b.store.get_progress(&other, Deadline::NONE).await.unwrap(),
        None
    );
}

pub async fn the_event_log_reads_backwards_newest_first(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let name = b.create(&user, "a", 1, RejectNew).await.session.name;
    for action in [
        DeviceAction::Pause,
        DeviceAction::Resume,
        DeviceAction::Stop,
    ] {
        b.call(call(&name, action)).await.unwrap();
    }
    let forwards = b.events_of(&user).await;
    assert_eq!(forwards.len(), 4);
    let partition = partition_of(&user, b.store.settings().partitions);
    let newest = b.store.read_events_back(partition, None, 2).await.unwrap();
    let older = b
        .store
        .read_events_back(partition, Some(&newest[1].id), 10)
        .await
        .unwrap();
    let backwards: Vec<_> = newest.into_iter().chain(older).collect();
    let mut expected = forwards;
    expected.reverse();
    assert_eq!(backwards, expected);
    assert!(matches!(
        b.store.read_events_back(partition, Some("nope"), 1).await,
        Err(StoreError::Corrupt(_))
    ));
}

pub async fn relay_groups_give_each_event_once_until_it_is_acknowledged(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let name = b.create(&user, "a", 1, RejectNew).await.session.name;
    for action in [DeviceAction::Pause, DeviceAction::Stop] {
        b.call(call(&name, action)).await.unwrap();
    }
    let log: Vec<String> = b.events_of(&user).await.into_iter().map(|e| e.id).collect();
    assert_eq!(log.len(), 3);
    let partition = partition_of(&user, b.store.settings().partitions);
    let wait = Duration::from_millis(1000);
    let ids = |events: Vec<usher::store::Event>| -> Vec<String> {
        events.into_iter().map(|e| e.id).collect()
    };
    let relay = |consumer: &'static str, count: u32| {
        let store = b.store.clone();
        async move {
            store
                .relay_events(partition, "sink", consumer, count, wait)
                .await
                .unwrap()
        }
    };
    let lag = || {
        let store = b.store.clone();
        async move {
            let lag = store.relay_lag(partition, "sink").await.unwrap();
            (lag.pending, lag.unread)
        }
    };
    assert_eq!(lag().await, (0, 3), "never read: the whole log");
    // Two consumers share the log: each event is given to one.
    let to_a = ids(relay("a", 2).await);
    assert_eq!(lag().await, (2, 1));
    assert_eq!(to_a, log[..2]);
    let to_b = ids(relay("b", 10).await);
    assert_eq!(to_b, log[2..]);
    assert!(relay("b", 10).await.is_empty(), "nothing given twice");
    assert_eq!(lag().await, (3, 0));
    assert_eq!(
        b.store
            .ack_events(partition, "sink", &to_a[..1])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        b.store
            .ack_events(partition, "sink", &to_a[..1])
            .await
            .unwrap(),
        0,
        "acknowledged once"
    );
    // Unacknowledged past the wait: given again, to whoever asks.
    b.advance(Duration::from_millis(1100)).await;
    let again = ids(relay("b", 10).await);
    assert_eq!(again, [log[1].clone(), log[2].clone()]);
    assert!(relay("a", 10).await.is_empty(), "now b's, and fresh");
    assert_eq!(
        b.store.ack_events(partition, "sink", &again).await.unwrap(),
        2
    );
    assert_eq!(lag().await, (0, 0));
    b.advance(Duration::from_millis(1100)).await;
    assert!(relay("a", 10).await.is_empty(), "acknowledged: never again");
    // Another group reads the whole log for itself.
    let other = b
        .store
        .relay_events(partition, "other-sink", "a", 10, wait)
        .await
        .unwrap();
    assert_eq!(ids(other), log);
    assert!(matches!(
        b.store
            .ack_events(partition, "sink", &["nope".to_owned()])
            .await,
        Err(StoreError::Corrupt(_))
    ));
}

/// A device call of `name` at `position_ms`, reporting `duration_ms` if given.
fn at(
    name: &SessionName,
    action: DeviceAction,
    position_ms: u64,
    duration_ms: Option<u64>,
) -> DeviceCall {
    DeviceCall {
        position_ms: Some(position_ms),
        duration_ms,
        ..call(name, action)
    }
}

const PLAYING: DeviceAction = DeviceAction::Heartbeat {
    playback_state: PlaybackState::Playing,
};

/// The session's title's progress for its profile (`new_session`'s: profile-1,
/// title-1): its position, or `None`.
async fn progress_of(b: &Backend, user: &UserId) -> Option<usher::model::Progress> {
    let key = progress_key(user, "profile-1", "title-1");
    b.store.get_progress(&key, Deadline::NONE).await.unwrap()
}

pub async fn device_calls_write_progress_at_most_once_per_interval(kind: Kind) {
    let mut settings = test_settings();
    settings.progress_write_interval = Duration::from_millis(1000);
    let b = Backend::open(kind, settings).await;
    let user = fresh_user();
    let created = b.create(&user, "tv", 1, RejectNew).await;
    let name = &created.session.name;
    // Within the interval from the start: kept on the session only.
    b.call(at(name, PLAYING, 10_000, Some(6_000_000)))
        .await
        .unwrap();
    assert_eq!(progress_of(&b, &user).await, None);
    b.advance(Duration::from_millis(1100)).await;
    // A heartbeat without a position writes nothing, even when the interval is up.
    b.call(heartbeat(name)).await.unwrap();
    assert_eq!(progress_of(&b, &user).await, None);
    let written = b.call(at(name, PLAYING, 20_000, None)).await.unwrap();
    let progress = progress_of(&b, &user)
        .await
        .expect("written after the interval");
    assert_eq!(progress.position_ms, 20_000);
    assert_eq!(
        progress.duration_ms,
        Some(6_000_000),
        "the duration an earlier call gave"
    );
    assert!(!progress.completed);
    assert_eq!(progress.device.as_str(), "tv");
    assert!(progress.updated_ms >= written.last_heartbeat_ms);
    b.call(at(name, PLAYING, 25_000, None)).await.unwrap();
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 20_000);
    // A refused call writes nothing.
    let stale = DeviceCall {
        generation: Some(created.session.generation + 1),
        ..at(name, DeviceAction::Pause, 99_000, None)
    };
    assert!(matches!(
        b.call(stale).await,
        Err(StoreError::StaleGeneration)
    ));
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 20_000);
    // A pause always writes.
    b.call(at(name, DeviceAction::Pause, 30_000, None))
        .await
        .unwrap();
    let paused = progress_of(&b, &user).await.unwrap();
    assert_eq!(
        (paused.position_ms, paused.duration_ms),
        (30_000, Some(6_000_000))
    );
    b.call(at(name, DeviceAction::Resume, 31_000, None))
        .await
        .unwrap();
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 30_000);
    // A stop always writes: the last position the session had.
    b.call(call(name, DeviceAction::Stop)).await.unwrap();
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 31_000);
    // An ended session's call is refused and writes nothing.
    assert!(matches!(
        b.call(at(name, DeviceAction::Stop, 50_000, None)).await,
        Err(StoreError::SessionEnded(_))
    ));
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 31_000);
}

pub async fn a_reported_pause_writes_progress_and_an_unplayed_session_none(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let name = b.create(&user, "tv", 1, RejectNew).await.session.name;
    // Never given a position: a stop leaves the profile's progress alone.
    b.call(call(&name, DeviceAction::Pause)).await.unwrap();
    b.call(call(&name, DeviceAction::Stop)).await.unwrap();
    assert_eq!(progress_of(&b, &user).await, None);
    let name = b.create(&user, "tv", 1, RejectNew).await.session.name;
    let paused = DeviceAction::Heartbeat {
        playback_state: PlaybackState::Paused,
    };
    b.call(at(&name, paused, 7_000, None)).await.unwrap();
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 7_000);
}

pub async fn finishing_a_title_completes_it_with_one_event(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let name = b.create(&user, "tv", 1, RejectNew).await.session.name;
    let duration = Some(6_000_000);
    // 90 % of the duration is the finish (the default rules).
    b.call(at(&name, DeviceAction::Pause, 5_399_000, duration))
        .await
        .unwrap();
    assert!(!progress_of(&b, &user).await.unwrap().completed);
    b.call(at(&name, DeviceAction::Resume, 5_400_000, None))
        .await
        .unwrap();
    b.call(at(&name, DeviceAction::Pause, 5_400_000, None))
        .await
        .unwrap();
    let finished = progress_of(&b, &user).await.unwrap();
    assert!(finished.completed, "{finished:?}");
    b.call(at(&name, DeviceAction::Stop, 5_900_000, None))
        .await
        .unwrap();
    assert!(progress_of(&b, &user).await.unwrap().completed);
    let kinds = b.kinds_for(&name).await;
    assert_eq!(
        kinds,
        [
            EventKind::Started,
            EventKind::Paused,
            EventKind::Resumed,
            EventKind::Completed,
            EventKind::Paused,
            EventKind::Stopped,
        ]
    );
    let completed = b
        .events_of(&user)
        .await
        .into_iter()
        .find(|e| e.kind == EventKind::Completed)
        .unwrap();
    assert_eq!(completed.position_ms, 5_400_000);
    assert_eq!(completed.profile.as_str(), "profile-1");
    assert_eq!(completed.content.as_str(), "title-1");
    // Watching again from the start: the latest write wins, no longer completed.
    let again = b.create(&user, "phone", 1, RejectNew).await.session.name;
    b.call(at(&again, DeviceAction::Stop, 60_000, None))
        .await
        .unwrap();
    let rewatched = progress_of(&b, &user).await.unwrap();
    assert_eq!(rewatched.position_ms, 60_000);
    assert_eq!(rewatched.device.as_str(), "phone");
    assert!(!rewatched.completed);
}

pub async fn progress_goes_to_the_sessions_profile_whatever_the_call_says(kind: Kind) {
    let b = open(kind).await;
    let user = fresh_user();
    let name = b.create(&user, "tv", 1, RejectNew).await.session.name;
    let wrong = DeviceCall {
        profile: Some(ProfileId::parse("p", "someone-else").unwrap()),
        ..at(&name, DeviceAction::Pause, 42_000, None)
    };
    b.call(wrong).await.unwrap();
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 42_000);
    let other = progress_key(&user, "someone-else", "title-1");
    assert_eq!(
        b.store.get_progress(&other, Deadline::NONE).await.unwrap(),
        None
    );
    let right = DeviceCall {
        profile: Some(ProfileId::parse("p", "profile-1").unwrap()),
        ..at(&name, DeviceAction::Stop, 43_000, None)
    };
    b.call(right).await.unwrap();
    assert_eq!(progress_of(&b, &user).await.unwrap().position_ms, 43_000);
}

/// Stamps one `#[tokio::test]` per case for a backend.
macro_rules! stamp {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case($kind).await;
            }
        )*
    };
}

macro_rules! conformance_suite {
    ($($module:ident => $kind:expr),* $(,)?) => {
        $(
            mod $module {
                stamp!($kind;
                    create_grants_a_seat_and_appends_started,
                    the_limit_rejects_and_writes_nothing,
                    creates_over_the_rate_are_refused_and_write_nothing,
                    stop_oldest_evicts_the_least_recently_started,
                    the_same_device_replaces_its_own_session,
                    a_repeated_request_id_returns_the_first_answer,
                    a_replay_after_the_session_ended_returns_it_ended,
                    a_limit_of_zero_admits_nobody_and_writes_nothing,
                    a_create_expires_at_most_the_configured_number_of_holders,
                    ended_sessions_are_forgotten_after_the_retention,
                    an_expired_holder_never_blocks_a_create,
                    the_sweep_expires_overdue_sessions,
                    the_sweep_is_bounded,
                    the_sweep_tells_when_the_partition_is_next_due,
                    heartbeats_keep_the_seat,
                    a_heartbeat_after_the_deadline_is_refused_and_expires,
                    pause_keeps_the_seat_up_to_the_maximum_pause,
                    pause_and_resume_append_one_event_each,
                    a_reported_playback_state_pauses_and_resumes,
                    a_brief_device_call_answers_what_the_full_one_changed,
                    stop_releases_the_seat_at_once,
                    terminate_ends_a_session_with_the_reason,
                    a_stale_generation_is_refused,
                    unknown_and_foreign_sessions_are_not_found,
                    reading_seats_changes_nothing,
                    sampled_heartbeat_events_are_rate_limited,
                    events_carry_the_session_and_read_after_a_cursor,
                    every_state_change_appends_exactly_one_event,
                    concurrent_creates_never_exceed_the_limit,
                    reading_a_session_past_its_deadline_shows_it_expired,
                    ids_with_colons_never_share_state,
                    ending_a_session_notifies_subscribers,
                    the_preview_is_what_a_create_then_does,
                    seats_in_use_counts_every_users_held_seats,
                    a_create_reads_the_profiles_progress_in_its_title,
                    a_record_keeps_every_text_as_given,
                    progress_is_written_read_and_deleted,
                    progress_lists_most_recent_first_in_pages,
                    progress_keeps_the_most_recent_titles_up_to_the_cap,
                    progress_is_forgotten_after_its_retention,
                    device_calls_write_progress_at_most_once_per_interval,
                    the_event_log_reads_backwards_newest_first,
                    relay_groups_give_each_event_once_until_it_is_acknowledged,
                    a_reported_pause_writes_progress_and_an_unplayed_session_none,
                    finishing_a_title_completes_it_with_one_event,
                    progress_goes_to_the_sessions_profile_whatever_the_call_says,
                );
            }
        )*
    };
}

conformance_suite! {
    memory => crate::support::Kind::Memory,
    redis => crate::support::Kind::Redis,
    redis_cluster => crate::support::Kind::Cluster,
}
