//! The store: where sessions, seats and the event log live. One trait, two
//! implementations that pass one conformance suite (`tests/it/conformance.rs`):
//!
//! - [`memory`]: the embedded default. One lock per logical operation, the same
//!   granularity as one Lua script.
//! - [`redis`]: the production store. Every state change is one Lua script, timed by
//!   Redis' own clock, with every key of a user under the user's partition hash tag.
//!
//! The store implements the seat rules themselves (limit, same-device replacement,
//! stop-oldest, expiry, fencing) because they must hold atomically; the typed request
//! logic (validation, entitlement, mapping) sits once above it in `session::ops`.

pub mod memory;
pub mod metered;
pub mod redis;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::deadline::Deadline;
use crate::error::Error;
use crate::ids::{ContentId, DeviceId, ProfileId, RequestId, SessionName, UserId};
use crate::model::{
    ClientInfo, Device, EndReason, PlaybackState, Progress, ResumeRules, Session, SessionState,
    Termination,
};

/// Partitions (hash tags) by default: several times the shards a large deployment may
/// grow to (30 million streams need about 40 to 60 on today's figures), so they spread
/// evenly over hundreds of shards. The sweeper's work follows the sessions, not this
/// count (see `server::tasks`).
pub const DEFAULT_PARTITIONS: u32 = 1024;

/// What happens to a create over the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimitPolicy {
    /// Refuse the new session with `CONCURRENCY_LIMIT_REACHED`.
    RejectNew,
    /// Evict the least recently started session to make room.
    StopOldest,
}

/// Which heartbeats append a `playback.heartbeat` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatEvents {
    Off,
    /// At most one per session per `heartbeat_event_interval`.
    Sampled,
    All,
}

/// Store behaviour fixed at start (from the typed config).
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// Number of partitions (hash tags); changing it needs a migration.
    pub partitions: u32,
    /// A live session that has not proved it is alive for this long expires.
    pub heartbeat_timeout: Duration,
    /// A paused session expires this long after its pause began, heartbeats or not.
    pub max_pause: Duration,
    /// How long ended sessions stay readable with `GetSession`.
    pub ended_retention: Duration,
    /// How long a `request_id` is remembered.
    pub request_id_ttl: Duration,
    pub heartbeat_events: HeartbeatEvents,
    pub heartbeat_event_interval: Duration,
    /// Approximate cap of each partition's event stream.
    pub event_stream_maxlen: u64,
    /// At most this many expired holders are evicted by one create (the sweeper takes
    /// the rest); keeps every script's work bounded.
    pub max_evictions_per_call: u32,
    /// A profile's watch progress is forgotten this long after its last write.
    pub progress_retention: Duration,
    /// A profile keeps the progress of at most this many titles; a write beyond drops
    /// the least recently written.
    pub progress_cap: u32,
    /// A session's heartbeats write its title's progress at most once per this (pauses
    /// and stops always write; see [`Store::device_call`]).
    pub progress_write_interval: Duration,
    /// When a write finishes a title (`ResumeRules::finishes`).
    pub resume: ResumeRules,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            heartbeat_timeout: Duration::from_secs(60),
            max_pause: Duration::from_secs(30 * 60),
            ended_retention: Duration::from_secs(24 * 3600),
            request_id_ttl: Duration::from_secs(24 * 3600),
            heartbeat_events: HeartbeatEvents::Sampled,
            heartbeat_event_interval: Duration::from_secs(300),
            event_stream_maxlen: 100_000,
            max_evictions_per_call: 64,
            progress_retention: Duration::from_secs(365 * 24 * 3600),
            progress_cap: 200,
            progress_write_interval: Duration::from_secs(60),
            resume: ResumeRules::default(),
        }
    }
}

/// Default cap of session records (live and ended) in the memory store.
pub const DEFAULT_MEMORY_MAX_SESSIONS: usize = 1_000_000;
/// Default cap of users in the memory store.
pub const DEFAULT_MEMORY_MAX_USERS: usize = 1_000_000;

/// A user's generation counter is forgotten after this long without a seat grant or a
/// live session (Redis: the counter key's TTL, passed to the scripts in ARGV; memory:
/// the same rule). Every token of an idle user expired long before.
pub const GENERATION_IDLE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Maps a user to its partition: FNV-1a of the user id modulo the partition count.
/// Stable across versions and machines; every key of a user carries it as hash tag.
pub fn partition_of(user: &UserId, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions)) as u32
}

/// A create, fully validated and entitled.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// The name of the session to create (its id is chosen by the caller, so a lost
    /// reply can be retried with `request_id`).
    pub name: SessionName,
    pub profile: ProfileId,
    pub content: ContentId,
    pub device: Device,
    pub client: ClientInfo,
    pub request_id: Option<RequestId>,
    /// The user's seat limit, from the entitlement.
    pub limit: u32,
    pub policy: OverLimitPolicy,
    /// How fast the user may create sessions; `None`: no limit.
    pub rate: Option<RateLimit>,
}

/// A generic cell rate algorithm (GCRA) limit: `burst` creates at once, then one per
/// `interval`. The store keeps one theoretical arrival time per user, checked and moved
/// in the same atomic step as the create, by the store's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// The emission interval: a sustained rate of one per this.
    pub interval: Duration,
    /// At least 1.
    pub burst: u32,
}

impl RateLimit {
    /// How far ahead of now the arrival time may run: `interval × (burst − 1)`.
    pub fn tolerance(&self) -> Duration {
        self.interval * self.burst.saturating_sub(1)
    }

    /// A limit written `N/s`, `N/m` or `N/h` (at most 1000/s, so the interval is whole
    /// milliseconds), with `burst` (1 to 1,000); `off` for none.
    pub fn parse(rate: &str, burst: u32) -> Result<Option<RateLimit>, String> {
        if rate == "off" {
            return Ok(None);
        }
        let bad = || format!("{rate:?} is not N/s, N/m, N/h or off");
        let (count, per) = rate.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 || period / count < Duration::from_millis(1) {
            return Err(format!("{rate:?}: at least 1, and at most 1000/s"));
        }
        if !(1..=1000).contains(&burst) {
            return Err(format!("a burst of {burst}: must be 1 to 1000"));
        }
        Ok(Some(RateLimit {
            interval: period / count,
            burst,
        }))
    }

    /// The GCRA step at `now_ms` with the stored arrival time `tat_ms` (0 when none):
    /// the new arrival time to store, or how long until a create would be admitted.
    pub fn admit(&self, tat_ms: u64, now_ms: u64) -> Result<u64, Duration> {
        self.admit_in(tat_ms, now_ms, Duration::from_millis(1))
    }

    /// [`RateLimit::admit`] with times counted in `unit`s.
    pub fn admit_in(&self, tat: u64, now: u64, unit: Duration) -> Result<u64, Duration> {
        let units = |d: Duration| (d.as_nanos() / unit.as_nanos()) as u64;
        let tat = tat.max(now);
        let ahead = tat - now;
        let tolerance = units(self.tolerance());
        if ahead > tolerance {
            let late = (ahead - tolerance).saturating_mul(unit.as_nanos() as u64);
            return Err(Duration::from_nanos(late));
        }
        Ok(tat + units(self.interval))
    }
}

impl NewSession {
    /// What a repeated `request_id` must match to be the same request.
    pub fn fingerprint(&self) -> String {
        format!("{}|{}|{}", self.profile, self.content, self.device.id)
    }
}

/// A successful create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub session: Session,
    /// Sessions ended to make room: the device's previous session, or the oldest.
    pub replaced: Vec<SessionName>,
    /// True when this is the remembered answer to a repeated `request_id`.
    pub replayed: bool,
    /// The profile's progress in the title, read in the same step (where playback
    /// resumes), so a create costs the store one call.
    pub progress: Option<Progress>,
}

/// What a device does to its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    Heartbeat { playback_state: PlaybackState },
    Pause,
    Resume,
    Stop,
}

/// A device call on its session.
#[derive(Clone, Debug)]
pub struct DeviceCall {
    pub name: SessionName,
    /// The generation the device holds; `None` skips the fencing check.
    pub generation: Option<u64>,
    pub position_ms: Option<u64>,
    /// The title's duration, when the player reported it: with it a progress write
    /// can mark the title completed.
    pub duration_ms: Option<u64>,
    /// The session's profile, when the caller knows it (a playback token names it): it
    /// lets Redis write progress in the call's first round trip. A wrong one is not
    /// trusted (the record's own profile is); the call is only sent again.
    pub profile: Option<ProfileId>,
    pub action: DeviceAction,
}

impl DeviceCall {
    /// A call with no position, duration or profile.
    pub fn new(name: SessionName, generation: Option<u64>, action: DeviceAction) -> Self {
        Self {
            name,
            generation,
            position_ms: None,
            duration_ms: None,
            profile: None,
            action,
        }
    }
}

/// What a device call changed on a live session, without the parts that never change:
/// all a device's stream needs to acknowledge a heartbeat (see
/// [`Store::device_call_brief`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub state: SessionState,
    pub deadline_ms: u64,
    pub position_ms: u64,
    pub playback_state: PlaybackState,
    pub last_heartbeat_ms: u64,
    pub paused_ms: Option<u64>,
}

impl Beat {
    /// The changing part of `session`.
    pub fn of(session: &Session) -> Beat {
        Beat {
            state: session.state,
            deadline_ms: session.deadline_ms,
            position_ms: session.position_ms,
            playback_state: session.playback_state,
            last_heartbeat_ms: session.last_heartbeat_ms,
            paused_ms: session.paused_ms,
        }
    }

    /// `session` as the call left it.
    pub fn apply_to(&self, session: &mut Session) {
        session.state = self.state;
        session.deadline_ms = self.deadline_ms;
        session.position_ms = self.position_ms;
        session.playback_state = self.playback_state;
        session.last_heartbeat_ms = self.last_heartbeat_ms;
        session.paused_ms = self.paused_ms;
    }
}

/// What one sweep of a partition did (see [`Store::sweep`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    pub expired: u32,
    /// Milliseconds from the sweep (the store's clock) to the earliest deadline still in
    /// the partition: 0 when sessions are overdue still (the batch was full); `None` when
    /// the partition holds none.
    pub next_due_ms: Option<u64>,
}

/// What a create would do now (see [`Store::preview_create`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preview {
    FreeSeat,
    /// The device's own session would be replaced.
    ReplacesDeviceSession(SessionName),
    /// The oldest sessions over the limit would be evicted, and the device's own session
    /// replaced if it has one: every session the create would end, in that order.
    EvictsOldest(Vec<SessionName>),
    LimitReached,
}

/// The create rules (steps 3 and 4 of `Store::create_session`) applied to live holders,
/// oldest first: the device's own session does not count against the limit; over it,
/// the policy decides, and stop-oldest evicts as many of the oldest as it takes.
pub fn preview(
    holders: &[Session],
    device: &DeviceId,
    limit: u32,
    policy: OverLimitPolicy,
) -> Preview {
    let own = holders.iter().find(|s| &s.device.id == device);
    let others: Vec<&Session> = holders.iter().filter(|s| &s.device.id != device).collect();
    if others.len() as u64 >= u64::from(limit) {
        if policy == OverLimitPolicy::RejectNew || limit == 0 {
            return Preview::LimitReached;
        }
        let excess = others.len() + 1 - limit as usize;
        let mut ended: Vec<SessionName> = others[..excess].iter().map(|s| s.name.clone()).collect();
        ended.extend(own.map(|s| s.name.clone()));
        return Preview::EvictsOldest(ended);
    }
    match own {
        Some(own) => Preview::ReplacesDeviceSession(own.name.clone()),
        None => Preview::FreeSeat,
    }
}

/// How far a relay's consumer group is behind in one partition's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayLag {
    /// Given out and not acknowledged yet.
    pub pending: u64,
    /// In the log and not given out yet.
    pub unread: u64,
}

impl RelayLag {
    /// Entries not acknowledged: what trimming the log would lose.
    pub fn behind(&self) -> u64 {
        self.pending + self.unread
    }
}

/// The seats of a user as one consistent read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seats {
    /// The store's clock at the read.
    pub now_ms: u64,
    /// Live holders (seat-holding, deadline not passed), oldest started first.
    pub holders: Vec<Session>,
}

/// The kinds of event in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Started,
    Paused,
    Resumed,
    Heartbeat,
    Stopped,
    /// A progress write finished the title (`ResumeRules::finishes`).
    Completed,
    Terminated,
    Expired,
    Evicted,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::Started,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::Heartbeat,
        EventKind::Stopped,
        EventKind::Completed,
        EventKind::Terminated,
        EventKind::Expired,
        EventKind::Evicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "playback.started",
            EventKind::Paused => "playback.paused",
            EventKind::Resumed => "playback.resumed",
            EventKind::Heartbeat => "playback.heartbeat",
            EventKind::Stopped => "playback.stopped",
            EventKind::Completed => "playback.completed",
            EventKind::Terminated => "playback.terminated",
            EventKind::Expired => "playback.expired",
            EventKind::Evicted => "playback.evicted",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == value)
    }

    /// The event that ending a session in `state` appends.
    pub fn for_end(state: SessionState) -> Self {
        match state {
            SessionState::Stopped => EventKind::Stopped,
            SessionState::Terminated => EventKind::Terminated,
            SessionState::Evicted => EventKind::Evicted,
            SessionState::Expired | SessionState::Active | SessionState::Paused => {
                EventKind::Expired
            }
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a partition's event log, written in the same atomic step as the change
/// it reports. Consumers dedupe on (session, generation, kind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the partition's log (`<ms>-<seq>`, a Redis stream id).
    pub id: String,
    pub kind: EventKind,
    pub session: SessionName,
    pub generation: u64,
    pub device: DeviceId,
    pub content: ContentId,
    pub profile: ProfileId,
    pub position_ms: u64,
    pub at_ms: u64,
    /// For the events of ended sessions: why.
    pub reason: Option<EndReason>,
    /// For `playback.terminated`: the operator's words and who they are.
    pub termination: Termination,
}

/// How many notices a subscriber may fall behind before it misses some (it is told how
/// many it missed; the next device call on a missed session finds it over anyway).
pub const ENDED_FEED_CAPACITY: usize = 4096;

/// The notices of sessions that ended (stopped, terminated, evicted, expired), from the
/// store's notification feed: on Redis the partitions' shard channels that the ending
/// scripts publish to, in memory an in-process broadcast. It is the fast path of "stop
/// now"; the guaranteed one is the next device call, which finds the session over.
pub struct EndedFeed(tokio::sync::broadcast::Receiver<SessionName>);

impl EndedFeed {
    pub fn new(receiver: tokio::sync::broadcast::Receiver<SessionName>) -> Self {
        Self(receiver)
    }

    /// The next ended session; `None` once the store is gone. Notices missed by a
    /// subscriber too slow to keep up are skipped (and logged).
    pub async fn next(&mut self) -> Option<SessionName> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.0.recv().await {
                Ok(name) => return Some(name),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "ended-session notices missed: subscriber too slow");
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// Parses an event id, `<ms>-<seq>`, the only cursor form both stores accept.
pub fn parse_event_id(id: &str) -> Result<(u64, u64), StoreError> {
    let bad = || StoreError::Corrupt(format!("bad event id {id:?}: expected <ms>-<seq>"));
    let (ms, seq) = id.split_once('-').ok_or_else(bad)?;
    Ok((
        ms.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
}

/// One title's progress of one profile.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProgressKey {
    pub user: UserId,
    pub profile: ProfileId,
    pub content: ContentId,
}

/// A progress write; the store stamps it with its clock.
#[derive(Clone, Debug)]
pub struct ProgressWrite {
    pub key: ProgressKey,
    pub position_ms: u64,
    pub duration_ms: Option<u64>,
    pub completed: bool,
    pub device: DeviceId,
}

/// Where a page of a profile's progress list ended: its last entry's write time and
/// title. Lists run from the most recent write, titles of one instant in descending
/// order of their ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressCursor {
    pub updated_ms: u64,
    pub content: ContentId,
}

impl ProgressCursor {
    /// Whether `progress` comes after this cursor in list order.
    pub fn precedes(&self, progress: &Progress) -> bool {
        (progress.updated_ms, &progress.content) < (self.updated_ms, &self.content)
    }
}

/// Failures of the store, typed. Rejections carry what the caller needs to explain them.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session not found")]
    NotFound,
    #[error("session has ended")]
    SessionEnded(Box<Session>),
    #[error("stale generation")]
    StaleGeneration,
    #[error("concurrency limit reached")]
    LimitReached { limit: u32, holders: Vec<Session> },
    /// The user created sessions faster than its rate limit; a create would be admitted
    /// after `retry_after`. Nothing was written.
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("request_id reused for a different request")]
    RequestIdReused,
    #[error("store unreachable: {0}")]
    Unavailable(String),
    /// The store is reachable but unfit to run on (checked at start): it would break an
    /// invariant. The message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// The embedded store holds as many live sessions as it may.
    #[error("store full: {0}")]
    Full(String),
    #[error("store answered something unexpected: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Maps to the service error, naming the resource for `NotFound`.
    pub fn into_error(self, resource: impl FnOnce() -> String) -> Error {
        match self {
            StoreError::NotFound => Error::NotFound {
                resource: resource(),
            },
            StoreError::SessionEnded(session) => Error::SessionEnded {
                state: Some(session.state.to_proto()),
            },
            StoreError::StaleGeneration => Error::StaleGeneration,
            StoreError::LimitReached { limit, holders } => Error::ConcurrencyLimitReached {
                limit,
                holders: holders.iter().map(Session::to_seat_holder).collect(),
            },
            StoreError::RequestIdReused => Error::RequestIdReused,
            StoreError::RateLimited { retry_after } => Error::RateLimited { retry_after },
            StoreError::Unavailable(cause) => Error::Unavailable(cause),
            StoreError::Full(cause) => Error::StoreFull(cause),
            StoreError::Corrupt(cause) | StoreError::Refused(cause) => Error::Internal(cause),
        }
    }
}

/// The store. Every method is one atomic step: it sees and leaves a consistent state,
/// and the events it appends are written together with the change they report.
///
/// Errors common to every method: `Unavailable` when the store cannot be reached within
/// its timeout (nothing was changed, or the whole step was), `Corrupt` when it answers
/// something that does not decode.
///
/// The calls that serve a request take the caller's [`Deadline`]: a store that waits
/// (Redis) answers `Unavailable` shortly before it rather than after it. The background
/// calls (sweep, events, the feed, ping) are bounded by the store's own timeout.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Atomically, in this order:
    /// 1. a `request_id` seen within its TTL returns the first answer (`replayed`): the
    ///    session as it is now, live or ended; or `RequestIdReused` if the request
    ///    differs. (The session's record outlives the request id: the config requires
    ///    `ended_retention >= request_id_ttl`.)
    /// 2. holders past their deadline are expired (`playback.expired` each, at most
    ///    `max_evictions_per_call`);
    /// 3. over the limit, not counting the device's own session: `LimitReached` with the
    ///    holders (nothing else changes) under `RejectNew`; under `StopOldest` the oldest
    ///    started sessions are evicted (`playback.evicted`);
    /// 4. the device's own live session is evicted (`playback.evicted`);
    /// 5. the seat is granted with the user's next generation, and `playback.started`
    ///    appended.
    ///
    /// The memory store may answer `Full` (before step 1 writes anything) when live
    /// sessions alone fill its bounds.
    ///
    /// The deadline is `heartbeat_timeout` from now. The record of an ended session
    /// expires after `ended_retention`.
    async fn create_session(
        &self,
        new: NewSession,
        deadline: Deadline,
    ) -> Result<Created, StoreError>;

    /// A session, live or ended (until `ended_retention` passes). A seat-holding session
    /// whose deadline has passed is expired by this call (`playback.expired`), and one
    /// whose seat was lost is evicted (`seat_lost`), exactly as a device call would: so
    /// every read agrees that it is over. Otherwise it writes nothing.
    async fn get_session(
        &self,
        name: &SessionName,
        deadline: Deadline,
    ) -> Result<Option<Session>, StoreError>;

    /// What `create_session` would do now for a new session of `user` on `device`, from
    /// one consistent read, writing nothing: holders past their deadline count as free
    /// (a create would expire them), then [`preview`]'s rules. The conformance suite
    /// holds it to what a create then does, on every store.
    async fn preview_create(
        &self,
        user: &UserId,
        device: &DeviceId,
        limit: u32,
        policy: OverLimitPolicy,
        deadline: Deadline,
    ) -> Result<(Seats, Preview), StoreError> {
        let seats = self.seats(user, deadline).await?;
        let previewed = preview(&seats.holders, device, limit, policy);
        Ok((seats, previewed))
    }

    /// The user's live holders and the store's clock, as one read. Holders past their
    /// deadline are left out but not evicted: reading changes nothing.
    async fn seats(&self, user: &UserId, deadline: Deadline) -> Result<Seats, StoreError>;

    /// A device's heartbeat, pause, resume or stop, atomically. Every device call proves
    /// liveness and moves the deadline to `heartbeat_timeout` from now (for a paused
    /// session, no later than `max_pause` after the pause began).
    ///
    /// Errors: `NotFound` (no such session for this user); `StaleGeneration`;
    /// `SessionEnded` when it has ended, including when its deadline has passed (it is
    /// expired now, with its event) or its seat was lost (it is evicted now, reason
    /// `seat_lost`). Pausing a paused session and resuming an active one change no
    /// state and append no event.
    ///
    /// In the same step the call writes its title's progress for the session's profile
    /// (as `write_progress` does, as the session's device) when the session's position
    /// is not 0 and the call is a stop, a pause (explicit, or a heartbeat reporting
    /// PAUSED that pauses the session), or reports a position when
    /// `progress_write_interval` has passed since the session's last progress write (or
    /// its start). The duration is the last one the session's calls gave, or else the
    /// one the entry has. When it is known and `settings.resume.finishes` the position,
    /// the entry is completed, and if it was not, `playback.completed` is appended before
    /// the call's own event. A refused call writes no progress.
    async fn device_call(
        &self,
        call: DeviceCall,
        deadline: Deadline,
    ) -> Result<Session, StoreError>;

    /// [`Store::device_call`], answered with what the call changed instead of the whole
    /// session: the same call, the same effects and errors. A store may send less back
    /// for it (Redis: a heartbeat's script replies seven values instead of the record).
    async fn device_call_brief(
        &self,
        call: DeviceCall,
        deadline: Deadline,
    ) -> Result<Beat, StoreError> {
        self.device_call(call, deadline)
            .await
            .map(|session| Beat::of(&session))
    }

    /// An operator ends a live session (`playback.terminated`, end reason
    /// `TerminatedByOperator`, with the operator's words and name). Errors: `NotFound`,
    /// `SessionEnded`.
    async fn terminate(
        &self,
        name: &SessionName,
        termination: &Termination,
        deadline: Deadline,
    ) -> Result<Session, StoreError>;

    /// Expires up to `max` sessions of `partition` whose deadline has passed: how many
    /// it expired, and how long until the partition's earliest deadline left.
    async fn sweep(&self, partition: u32, max: u32) -> Result<Swept, StoreError>;

    /// Up to `count` events of `partition` after `after` (from the start when `None`).
    async fn read_events(
        &self,
        partition: u32,
        after: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// Up to `count` events of `partition` before `before` (from the newest when `None`),
    /// newest first: the log read backwards.
    async fn read_events_back(
        &self,
        partition: u32,
        before: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// The relay's read of `partition`'s log: up to `count` events for `consumer` of
    /// `group` (one group per sink; made at the log's start on first use). First the
    /// events the group gave out and that were not acknowledged within `claim_after`
    /// (their consumer died, or their delivery failed: they now belong to `consumer`),
    /// then events the group has not given out yet, in log order. Each stays pending in
    /// the group until [`Store::ack_events`]. Several consumers of a group share the log:
    /// each event is given to one, and again only once it has been pending that long.
    async fn relay_events(
        &self,
        partition: u32,
        group: &str,
        consumer: &str,
        count: u32,
        claim_after: Duration,
    ) -> Result<Vec<Event>, StoreError>;

    /// How far `group` is behind in `partition`'s log (a group never read from is the
    /// whole log behind).
    async fn relay_lag(&self, partition: u32, group: &str) -> Result<RelayLag, StoreError>;

    /// Acknowledges events of `partition` for `group`: they are not given out again.
    /// How many of them were pending.
    async fn ack_events(
        &self,
        partition: u32,
        group: &str,
        ids: &[String],
    ) -> Result<u64, StoreError>;

    /// Subscribes to the notices of sessions that end from now on, in every partition
    /// (see [`EndedFeed`]). Every change that ends a session (stop, terminate, eviction,
    /// expiry by a create, a read, a device call or the sweep) sends its notice after the
    /// change is made. Errors: `Unavailable` when the subscription cannot be made.
    async fn ended_sessions(&self) -> Result<EndedFeed, StoreError>;

    /// Writes a title's progress for a profile, stamped with the store's clock (the
    /// latest write wins), keeping the profile's entries for `progress_retention` from
    /// now and at most `progress_cap` of them (the least recently written go).
    async fn write_progress(
        &self,
        write: ProgressWrite,
        deadline: Deadline,
    ) -> Result<Progress, StoreError>;

    /// A title's progress for a profile, if it has any.
    async fn get_progress(
        &self,
        key: &ProgressKey,
        deadline: Deadline,
    ) -> Result<Option<Progress>, StoreError>;

    /// Up to `limit` of a profile's progress entries after `after`, most recently
    /// written first (see [`ProgressCursor`] for the order).
    async fn list_progress(
        &self,
        user: &UserId,
        profile: &ProfileId,
        after: Option<&ProgressCursor>,
        limit: usize,
        deadline: Deadline,
    ) -> Result<Vec<Progress>, StoreError>;

    /// Forgets a title's progress for a profile: whether there was any.
    async fn delete_progress(
        &self,
        key: &ProgressKey,
        deadline: Deadline,
    ) -> Result<bool, StoreError>;

    /// How many sessions hold a seat, across all users: the entries of the partitions'
    /// sweep indexes (a session past its deadline counts until it is expired). For the
    /// seats-in-use gauge; it reads every partition.
    async fn seats_in_use(&self) -> Result<u64, StoreError>;

    /// Round trip to the store, for health and readiness: succeeds only while the
    /// store accepts writes (a Redis that answers PING but refuses writes, out of memory
    /// for example, is `Unavailable`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The settings the store was built with.
    fn settings(&self) -> &StoreSettings;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SessionId;

    fn holder(device: &str, created_ms: u64) -> Session {
        let name = SessionName {
            user: UserId::parse("u", "u").unwrap(),
            session: SessionId::parse("s", &format!("s-{device}")).unwrap(),
        };
        Session::sample(name, DeviceId::parse("d", device).unwrap(), created_ms)
    }

    #[test]
    fn a_lowered_limit_under_stop_oldest_names_every_session_a_create_ends() {
        let holders = [
            holder("a", 1),
            holder("b", 2),
            holder("c", 3),
            holder("tv", 4),
        ];
        let tv = DeviceId::parse("d", "tv").unwrap();
        let previewed = preview(&holders, &tv, 2, OverLimitPolicy::StopOldest);
        let Preview::EvictsOldest(ended) = previewed else {
            panic!("evicts the oldest: {previewed:?}")
        };
        let ended: Vec<&str> = ended.iter().map(|n| n.session.as_str()).collect();
        assert_eq!(ended, ["s-a", "s-b", "s-tv"]);
        assert_eq!(
            preview(&holders, &tv, 2, OverLimitPolicy::RejectNew),
            Preview::LimitReached
        );
        let phone = DeviceId::parse("d", "phone").unwrap();
        assert_eq!(
            preview(&holders[..1], &phone, 2, OverLimitPolicy::RejectNew),
            Preview::FreeSeat
        );
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn gcra_admits_a_burst_then_one_per_interval() {
        let rate = RateLimit {
            interval: Duration::from_secs(2),
            burst: 3,
        };
        let mut tat = 0;
        for _ in 0..3 {
            tat = rate.admit(tat, 10_000).unwrap();
        }
        assert_eq!(rate.admit(tat, 10_000), Err(Duration::from_secs(2)));
        assert_eq!(rate.admit(tat, 11_500), Err(Duration::from_millis(500)));
        let tat = rate.admit(tat, 12_000).unwrap();
        assert_eq!(rate.admit(tat, 12_000), Err(Duration::from_secs(2)));
        // Long idle: the full burst again, never more.
        let mut tat = tat;
        for _ in 0..3 {
            tat = rate.admit(tat, 100_000).unwrap();
        }
        assert!(rate.admit(tat, 100_000).is_err());
    }

    #[test]
    fn rates_are_parsed_or_named() {
        let rate = RateLimit::parse("30/m", 10).unwrap().unwrap();
        assert_eq!(rate.interval, Duration::from_secs(2));
        assert_eq!(rate.tolerance(), Duration::from_secs(18));
        assert_eq!(RateLimit::parse("off", 10).unwrap(), None);
        assert_eq!(
            RateLimit::parse("5/s", 1).unwrap().unwrap().interval,
            Duration::from_millis(200)
        );
        for bad in ["30", "30/d", "0/m", "x/m", "-1/s"] {
            assert!(
                RateLimit::parse(bad, 10).unwrap_err().contains(bad),
                "{bad}"
            );
        }
        assert!(RateLimit::parse("1/s", 0).is_err());
    }
}
