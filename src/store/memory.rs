//! The in-memory store: the embedded default, so `usher serve` runs with nothing else
//! installed. It is a real store, not a mock: it passes the same conformance suite as
//! Redis, and any difference from the Redis store is a bug.
//!
//! All state sits behind one `std::sync::Mutex`, taken once per trait method: the same
//! atomicity as one Lua script on a Redis shard. A std mutex (not a Tokio one) because
//! no critical section awaits. Time comes from a [`Clock`] so tests can move it.
//!
//! It is for development, tests and single-instance trials: state lives in one process
//! and is gone when it stops. Its memory is bounded ([`MemoryLimits`]): past the session
//! cap the oldest ended sessions are forgotten first (before their retention ends), past
//! the user cap the longest-idle users; when live sessions alone fill the cap, a create
//! is refused with `StoreError::Full` rather than growing without bound.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use tokio::sync::broadcast;

use super::{
    Created, DEFAULT_MEMORY_MAX_SESSIONS, DEFAULT_MEMORY_MAX_USERS, DeviceAction, DeviceCall,
    ENDED_FEED_CAPACITY, EndedFeed, Event, EventKind, GENERATION_IDLE_TTL, HeartbeatEvents,
    NewSession, OverLimitPolicy, ProgressCursor, ProgressKey, ProgressWrite, RateLimit, RelayLag,
    Seats, Store, StoreError, StoreSettings, Swept, parse_event_id, partition_of,
};
use crate::deadline::Deadline;
use crate::ids::{ContentId, DeviceId, ProfileId, RequestId, SessionId, SessionName, UserId};
use crate::model::{
    ClientInfo, Device, DeviceType, EndReason, PlaybackState, Progress, Session, SessionState,
    Termination, holds_seat,
};

/// Where the memory store reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to, for deterministic expiry tests.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// How much the memory store may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Session records, live and ended. Past it the oldest ended are forgotten; live
    /// sessions alone at the cap refuse new ones.
    pub max_sessions: usize,
    /// Users with state (seats, or a generation counter kept while idle). Past it the
    /// longest-idle users are forgotten.
    pub max_users: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MEMORY_MAX_SESSIONS,
            max_users: DEFAULT_MEMORY_MAX_USERS,
        }
    }
}

/// A session and what the store keeps beside it, in fewer bytes than a [`Session`], as
/// the Redis record packs its fields: what never changes apart from what calls change,
/// the texts in one allocation, the rare operator's termination boxed. Reads build the
/// `Session`, as they cloned one before.
struct Record {
    /// Shared with the session's entries in its partition's log.
    fixed: Arc<Fixed>,
    live: Live,
    last_heartbeat_event_ms: u64,
    /// When the session last wrote its title's progress (its start until then).
    last_progress_ms: u64,
    /// The title's duration, once a device call gave it.
    duration_ms: Option<u64>,
}

/// What a session's create fixed.
struct Fixed {
    name: SessionName,
    profile: ProfileId,
    content: ContentId,
    device: DeviceId,
    kind: DeviceType,
    generation: u64,
    created_ms: u64,
    /// The device's name, then the client's address, user agent and region.
    texts: Box<str>,
    /// Where each of the first three of `texts` ends.
    ends: [u32; 3],
}

/// What calls change, by [`Session`]'s names.
struct Live {
    state: SessionState,
    playback_state: PlaybackState,
    end_reason: Option<EndReason>,
    /// What expiry at the current deadline would be called.
    deadline_reason: EndReason,
    position_ms: u64,
    last_heartbeat_ms: u64,
    deadline_ms: u64,
    ended_ms: Option<u64>,
    paused_ms: Option<u64>,
    termination: Option<Box<Termination>>,
}

impl Record {
    fn new(session: &Session) -> Self {
        let texts = [
            session.device.name.as_str(),
            &session.client.ip_address,
            &session.client.user_agent,
            &session.client.region,
        ];
        let mut ends = [0u32; 3];
        let mut end = 0;
        for (slot, text) in ends.iter_mut().zip(texts) {
            end += text.len();
            *slot = u32::try_from(end).unwrap_or(u32::MAX);
        }
        Record {
            fixed: Arc::new(Fixed {
                name: session.name.clone(),
                profile: session.profile.clone(),
                content: session.content.clone(),
                device: session.device.id.clone(),
                kind: session.device.kind,
                generation: session.generation,
                created_ms: session.created_ms,
                texts: texts.concat().into_boxed_str(),
                ends,
            }),
            live: Live {
                state: session.state,
                playback_state: session.playback_state,
                end_reason: session.end_reason,
                deadline_reason: EndReason::HeartbeatTimeout,
                position_ms: session.position_ms,
                last_heartbeat_ms: session.last_heartbeat_ms,
                deadline_ms: session.deadline_ms,
                ended_ms: session.ended_ms,
                paused_ms: session.paused_ms,
                termination: (session.termination != Termination::default())
                    .then(|| Box::new(session.termination.clone())),
            },
            last_heartbeat_event_ms: session.last_heartbeat_ms,
            last_progress_ms: session.created_ms,
            duration_ms: None,
        }
    }

    /// The session as the store's callers see it.
    fn session(&self) -> Session {
        let Fixed { texts, ends, .. } = &*self.fixed;
        let text = |from: usize, to: usize| texts.get(from..to).unwrap_or_default().to_owned();
        let [name, ip, agent] = ends.map(|end| end as usize);
        Session {
            name: self.fixed.name.clone(),
            profile: self.fixed.profile.clone(),
            content: self.fixed.content.clone(),
            device: Device {
                id: self.fixed.device.clone(),
                kind: self.fixed.kind,
                name: text(0, name),
            },
            client: ClientInfo {
                ip_address: text(name, ip),
                user_agent: text(ip, agent),
                region: text(agent, texts.len()),
            },
            state: self.live.state,
            position_ms: self.live.position_ms,
            playback_state: self.live.playback_state,
            generation: self.fixed.generation,
            created_ms: self.fixed.created_ms,
            last_heartbeat_ms: self.live.last_heartbeat_ms,
            deadline_ms: self.live.deadline_ms,
            ended_ms: self.live.ended_ms,
            end_reason: self.live.end_reason,
            termination: self
                .live
                .termination
                .as_deref()
                .cloned()
                .unwrap_or_default(),
            paused_ms: self.live.paused_ms,
        }
    }
}

/// A user's seat-holding sessions and their deadlines. A handful at most (the seat
/// limit), so a vector: a hash map's table was most of a user's memory.
#[derive(Default)]
struct Holders(Vec<(SessionId, u64)>);

impl Holders {
    /// Records `session`'s deadline, adding it if it is new.
    fn set(&mut self, session: &SessionId, deadline_ms: u64) {
        match self.0.iter_mut().find(|(held, _)| held == session) {
            Some(entry) => entry.1 = deadline_ms,
            None => {
                // One more at a time: most users hold one seat, and a vector's first
                // growth would make room for four.
                self.0.reserve_exact(1);
                self.0.push((session.clone(), deadline_ms));
            }
        }
    }

    fn remove(&mut self, session: &SessionId) {
        self.0.retain(|(held, _)| held != session);
    }

    fn contains(&self, session: &SessionId) -> bool {
        self.0.iter().any(|(held, _)| held == session)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &(SessionId, u64)> {
        self.0.iter()
    }
}

#[derive(Default)]
struct UserSeats {
    /// Seat-holding sessions and their deadlines.
    seats: Holders,
    generation: u64,
    /// When the generation counter is forgotten (see `GENERATION_IDLE_TTL`).
    generation_expires_ms: u64,
    /// Whether the user has an entry in `State::idle_users` (at most one each).
    idle_queued: bool,
    /// The create rate limit's theoretical arrival time, ms (0: none yet).
    rate_tat_ms: u64,
}

struct RememberedRequest {
    session: SessionName,
    fingerprint: String,
    replaced: Vec<SessionName>,
    expires_ms: u64,
}

/// A profile's watch progress: one entry per title, and when it is all forgotten.
struct ProfileProgress {
    titles: HashMap<ContentId, Progress>,
    expires_ms: u64,
}

#[derive(Default)]
struct Partition {
    /// (deadline, session) of every seat holder, for the sweeper.
    deadlines: BTreeSet<(u64, SessionName)>,
    events: VecDeque<Logged>,
    last_event_ms: u64,
    last_event_seq: u64,
    /// The relay's consumer groups of this log, by name.
    groups: HashMap<String, Group>,
}

/// A consumer group of a partition's log, as Redis keeps one: the last entry it gave
/// out, and the entries given out and not acknowledged (by id: owner, when given).
#[derive(Default)]
struct Group {
    last_given: Option<(u64, u64)>,
    pending: std::collections::BTreeMap<(u64, u64), (String, u64)>,
}

/// An entry of a partition's log: an [`Event`] with its id as numbers, what its session
/// never changes shared with the session's record, and the rare operator's termination
/// boxed; a third of an `Event`'s bytes.
struct Logged {
    id: (u64, u64),
    kind: EventKind,
    reason: Option<EndReason>,
    session: Arc<Fixed>,
    position_ms: u64,
    at_ms: u64,
    termination: Option<Box<Termination>>,
}

impl Logged {
    fn event(&self) -> Event {
        Event {
            id: format!("{}-{}", self.id.0, self.id.1),
            kind: self.kind,
            session: self.session.name.clone(),
            generation: self.session.generation,
            device: self.session.device.clone(),
            content: self.session.content.clone(),
            profile: self.session.profile.clone(),
            position_ms: self.position_ms,
            at_ms: self.at_ms,
            reason: self.reason,
            termination: self.termination.as_deref().cloned().unwrap_or_default(),
        }
    }
}

/// The log's entries after `after` (all of them when `None`): the index of the first.
fn first_after(events: &VecDeque<Logged>, after: Option<(u64, u64)>) -> usize {
    match after {
        None => 0,
        Some(after) => events.partition_point(|e| e.id <= after),
    }
}

struct State {
    /// Boxed: after the table grows, up to half its slots are spare, and a spare slot
    /// costs a pointer rather than a record.
    sessions: HashMap<SessionName, Box<Record>>,
    /// Boxed, as the sessions are.
    users: HashMap<UserId, Box<UserSeats>>,
    requests: HashMap<(UserId, RequestId), RememberedRequest>,
    /// (expiry, key) of remembered requests in insertion order: one TTL for all, so
    /// the front always expires first.
    request_expiries: VecDeque<(u64, (UserId, RequestId))>,
    partitions: Vec<Partition>,
    /// (purge time, session) of ended sessions, for retention.
    purges: BTreeSet<(u64, SessionName)>,
    /// (time, user) at which a user whose last seat was released may be forgotten, in
    /// release order (one TTL for all, so the front is always due first). A user found
    /// busy again when its entry comes due is queued again with its new time.
    idle_users: VecDeque<(u64, UserId)>,
    /// Watch progress by (user, profile). A handful of titles each, capped.
    progress: HashMap<(UserId, ProfileId), ProfileProgress>,
}

/// See the module docs.
pub struct MemoryStore {
    settings: StoreSettings,
    limits: MemoryLimits,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// The notification feed: an in-process broadcast, sent to after the lock is
    /// released, as Redis publishes after the script's writes.
    ended: broadcast::Sender<SessionName>,
}

impl MemoryStore {
    pub fn new(settings: StoreSettings) -> Self {
        Self::with_clock(settings, Arc::new(SystemClock))
    }

    pub fn with_clock(settings: StoreSettings, clock: Arc<dyn Clock>) -> Self {
        let partitions = (0..settings.partitions)
            .map(|_| Partition::default())
            .collect();
        Self {
            settings,
            limits: MemoryLimits::default(),
            ended: broadcast::channel(ENDED_FEED_CAPACITY).0,
            clock,
            state: Mutex::new(State {
                sessions: HashMap::new(),
                users: HashMap::new(),
                requests: HashMap::new(),
                request_expiries: VecDeque::new(),
                partitions,
                purges: BTreeSet::new(),
                idle_users: VecDeque::new(),
                progress: HashMap::new(),
            }),
        }
    }

    /// The same store with other memory bounds.
    pub fn with_limits(mut self, limits: MemoryLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs one logical operation under the lock, with the clock read once inside it.
    fn with_state<T>(&self, operation: impl FnOnce(&mut Op<'_>) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = self.clock.now_ms();
        let mut op = Op {
            state: &mut state,
            settings: &self.settings,
            limits: self.limits,
            now,
            ended: Vec::new(),
        };
        op.purge_retained();
        let result = operation(&mut op);
        let ended = std::mem::take(&mut op.ended);
        drop(state);
        for name in ended {
            // No subscriber is not an error: nobody is waiting for this session.
            let _ = self.ended.send(name);
        }
        result
    }
}

/// One operation in progress: the locked state and the time it runs at.
struct Op<'a> {
    state: &'a mut State,
    settings: &'a StoreSettings,
    limits: MemoryLimits,
    now: u64,
    /// Sessions this operation ended, announced once it is done.
    ended: Vec<SessionName>,
}

impl Op<'_> {
    /// A profile's progress, unless its retention has passed (then it is forgotten).
    fn profile_progress(&mut self, user: &UserId, profile: &ProfileId) -> Option<&ProfileProgress> {
        let key = (user.clone(), profile.clone());
        if self
            .state
            .progress
            .get(&key)
            .is_some_and(|entry| entry.expires_ms <= self.now)
        {
            self.state.progress.remove(&key);
        }
        self.state.progress.get(&key)
    }

    /// The new session's profile's progress in its title.
    fn title_progress(&mut self, new: &NewSession) -> Option<Progress> {
        self.profile_progress(&new.name.user, &new.profile)
            .and_then(|profile| profile.titles.get(&new.content))
            .cloned()
    }

    fn write_progress(&mut self, write: ProgressWrite) -> Result<Progress, StoreError> {
        let ProgressWrite {
            key,
            position_ms,
            duration_ms,
            completed,
            device,
        } = write;
        self.profile_progress(&key.user, &key.profile);
        let profile = (key.user.clone(), key.profile.clone());
        if !self.state.progress.contains_key(&profile)
            && self.state.progress.len() >= self.limits.max_users
        {
            return Err(StoreError::Full(format!(
                "{} profiles with watch progress (--memory-max-users)",
                self.state.progress.len()
            )));
        }
        let entry = self
            .state
            .progress
            .entry(profile)
            .or_insert_with(|| ProfileProgress {
                titles: HashMap::new(),
                expires_ms: 0,
            });
        entry.expires_ms = self.now + self.settings.progress_retention.as_millis() as u64;
        let progress = Progress {
            user: key.user,
            profile: key.profile,
            content: key.content.clone(),
            position_ms,
            duration_ms,
            completed,
            device,
            updated_ms: self.now,
        };
        entry.titles.insert(key.content, progress.clone());
        // Over the cap, the least recently written go (ties: the smallest title id).
        while entry.titles.len() > self.settings.progress_cap as usize {
            let oldest = entry
                .titles
                .values()
                .min_by(|a, b| (a.updated_ms, &a.content).cmp(&(b.updated_ms, &b.content)))
                .map(|p| p.content.clone());
            match oldest {
                Some(content) => entry.titles.remove(&content),
                None => break,
            };
        }
        Ok(progress)
    }

    fn partition(&self, user: &UserId) -> usize {
        partition_of(user, self.settings.partitions) as usize
    }

    fn purge_retained(&mut self) {
        while let Some((at, name)) = self.state.purges.first().cloned() {
            if at > self.now {
                break;
            }
            self.state.purges.pop_first();
            self.state.sessions.remove(&name);
        }
        // Users with no seat and a forgotten generation go too, as Redis' keys do.
        while let Some((at, _)) = self.state.idle_users.front() {
            if *at > self.now {
                break;
            }
            self.forget_idle_user(false);
        }
        while let Some((at, _)) = self.state.request_expiries.front() {
            if *at > self.now {
                break;
            }
            let Some((_, key)) = self.state.request_expiries.pop_front() else {
                break;
            };
            if self
                .state
                .requests
                .get(&key)
                .is_some_and(|r| r.expires_ms <= self.now)
            {
                self.state.requests.remove(&key);
            }
        }
    }

    /// Takes the front of the idle queue: forgets the user if it is idle and its
    /// generation is forgotten (or `early`, to make room), queues it again with its
    /// new time if it is not.
    fn forget_idle_user(&mut self, early: bool) {
        let Some((_, user)) = self.state.idle_users.pop_front() else {
            return;
        };
        let Some(seats) = self.state.users.get_mut(&user) else {
            return;
        };
        seats.idle_queued = false;
        if !seats.seats.is_empty() {
            // Busy again: queued anew when its last seat is released.
            return;
        }
        if early || seats.generation_expires_ms <= self.now {
            self.state.users.remove(&user);
            return;
        }
        seats.idle_queued = true;
        let at = seats.generation_expires_ms;
        self.state.idle_users.push_back((at, user));
    }

    /// Makes room for one more session record (and remembered request): forgets the
    /// oldest ended sessions past the cap. `Full` when live sessions alone fill it.
    fn make_room_for_session(&mut self) -> Result<(), StoreError> {
        let max = self.limits.max_sessions;
        while self.state.sessions.len() >= max {
            let Some((_, name)) = self.state.purges.pop_first() else {
                return Err(StoreError::Full(format!(
                    "{} live sessions, the most the embedded store holds (--memory-max-sessions)",
                    self.state.sessions.len()
                )));
            };
            self.state.sessions.remove(&name);
        }
        while self.state.requests.len() >= max {
            let Some((_, key)) = self.state.request_expiries.pop_front() else {
                break;
            };
            self.state.requests.remove(&key);
        }
        Ok(())
    }

    /// Makes room for one more user: forgets the longest-idle users past the cap.
    /// `Full` when users holding seats alone fill it.
    fn make_room_for_user(&mut self, user: &UserId) -> Result<(), StoreError> {
        if self.state.users.contains_key(user) {
            return Ok(());
        }
        let max = self.limits.max_users;
        while self.state.users.len() >= max {
            if self.state.idle_users.is_empty() {
                return Err(StoreError::Full(format!(
                    "{} users hold seats, the most the embedded store holds (--memory-max-users)",
                    self.state.users.len()
                )));
            }
            self.forget_idle_user(true);
        }
        Ok(())
    }

    /// The create rate limit's GCRA step. The user is kept at least as long as its cell
    /// matters, as Redis keeps its hash: an entry made here, with no seat, is queued to
    /// be forgotten after that.
    fn take_rate_cell(&mut self, user: &UserId, rate: RateLimit) -> Result<(), StoreError> {
        let tat = self.state.users.get(user).map_or(0, |u| u.rate_tat_ms);
        let next = rate
            .admit(tat, self.now)
            .map_err(|retry_after| StoreError::RateLimited { retry_after })?;
        let entry = self.state.users.entry(user.clone()).or_default();
        entry.rate_tat_ms = next;
        entry.generation_expires_ms = entry.generation_expires_ms.max(next + 1000);
        if entry.seats.is_empty() && !entry.idle_queued {
            entry.idle_queued = true;
            let at = entry.generation_expires_ms;
            self.state.idle_users.push_back((at, user.clone()));
        }
        Ok(())
    }

    /// Appends the session's `kind` event, at `position_ms`, to its partition's log.
    fn append(&mut self, kind: EventKind, name: &SessionName, position_ms: u64) {
        let maxlen = self.settings.event_stream_maxlen as usize;
        let now = self.now;
        let partition = self.partition(&name.user);
        let Some(record) = self.state.sessions.get(name) else {
            return;
        };
        let log = &mut self.state.partitions[partition];
        if now > log.last_event_ms {
            log.last_event_ms = now;
            log.last_event_seq = 0;
        } else {
            log.last_event_seq += 1;
        }
        log.events.push_back(Logged {
            id: (log.last_event_ms, log.last_event_seq),
            kind,
            reason: record.live.end_reason,
            session: record.fixed.clone(),
            position_ms,
            at_ms: now,
            termination: record.live.termination.clone(),
        });
        while log.events.len() > maxlen {
            log.events.pop_front();
        }
    }

    /// Ends a seat-holding session: releases its seat and device, appends its event.
    fn end_session(&mut self, name: &SessionName, state: SessionState, reason: EndReason) {
        let now = self.now;
        let retention = self.settings.ended_retention.as_millis() as u64;
        let partition = self.partition(&name.user);
        let Some(record) = self.state.sessions.get_mut(name) else {
            return;
        };
        let old_deadline = record.live.deadline_ms;
        record.live.state = state;
        record.live.ended_ms = Some(now);
        record.live.end_reason = Some(reason);
        let position_ms = record.live.position_ms;
        if let Some(user) = self.state.users.get_mut(&name.user) {
            user.seats.remove(&name.session);
            if user.seats.is_empty() && !user.idle_queued {
                user.idle_queued = true;
                self.state
                    .idle_users
                    .push_back((user.generation_expires_ms, name.user.clone()));
            }
        }
        self.state.partitions[partition]
            .deadlines
            .remove(&(old_deadline, name.clone()));
        self.state.purges.insert((now + retention, name.clone()));
        self.append(EventKind::for_end(state), name, position_ms);
        self.ended.push(name.clone());
    }

    /// Moves a live session's deadline: heartbeat timeout from now, capped by the
    /// maximum pause while paused.
    fn extend_deadline(&mut self, name: &SessionName) {
        let partition = self.partition(&name.user);
        let timeout = self.settings.heartbeat_timeout.as_millis() as u64;
        let max_pause = self.settings.max_pause.as_millis() as u64;
        let now = self.now;
        let Some(record) = self.state.sessions.get_mut(name) else {
            return;
        };
        let old = record.live.deadline_ms;
        let (deadline, reason) = deadline_after(&record.live, now, timeout, max_pause);
        record.live.deadline_ms = deadline;
        record.live.deadline_reason = reason;
        let deadlines = &mut self.state.partitions[partition].deadlines;
        deadlines.remove(&(old, name.clone()));
        deadlines.insert((deadline, name.clone()));
        if let Some(user) = self.state.users.get_mut(&name.user) {
            user.seats.set(&name.session, deadline);
            user.generation_expires_ms = now + GENERATION_IDLE_TTL.as_millis() as u64;
        }
    }

    /// Expires the user's holders whose deadline has passed, at most `max`.
    fn expire_overdue(&mut self, user: &UserId, max: u32) {
        let Some(seats) = self.state.users.get(user) else {
            return;
        };
        let mut overdue: Vec<(u64, SessionId)> = seats
            .seats
            .iter()
            .filter(|(_, deadline)| *deadline <= self.now)
            .map(|(id, deadline)| (*deadline, id.clone()))
            .collect();
        overdue.sort();
        for (_, session) in overdue.into_iter().take(max as usize) {
            self.expire(&SessionName {
                user: user.clone(),
                session,
            });
        }
    }

    fn expire(&mut self, name: &SessionName) {
        let Some(record) = self.state.sessions.get(name) else {
            if let Some(user) = self.state.users.get_mut(&name.user) {
                user.seats.remove(&name.session);
            }
            return;
        };
        let reason = record.live.deadline_reason;
        self.end_session(name, SessionState::Expired, reason);
    }

    /// Live holders of `user`, oldest started first.
    fn live_holders(&self, user: &UserId) -> Vec<Session> {
        let Some(seats) = self.state.users.get(user) else {
            return Vec::new();
        };
        let mut holders: Vec<Session> = seats
            .seats
            .iter()
            .filter_map(|(id, _)| {
                let name = SessionName {
                    user: user.clone(),
                    session: id.clone(),
                };
                self.state.sessions.get(&name).map(|r| r.session())
            })
            .filter(|s| s.is_live_at(self.now))
            .collect();
        sort_oldest_first(&mut holders);
        holders
    }

    fn create(&mut self, new: NewSession) -> Result<Created, StoreError> {
        let user = new.name.user.clone();
        let remembered = new
            .request_id
            .as_ref()
            .and_then(|request_id| self.state.requests.get(&(user.clone(), request_id.clone())));
        if let Some(remembered) = remembered {
            if remembered.fingerprint != new.fingerprint() {
                return Err(StoreError::RequestIdReused);
            }
            if let Some(record) = self.state.sessions.get(&remembered.session) {
                let (session, replaced) = (record.session(), remembered.replaced.clone());
                return Ok(Created {
                    session,
                    replaced,
                    replayed: true,
                    progress: self.title_progress(&new),
                });
            }
        }
        // Room first, so a full store refuses before anything is written.
        self.make_room_for_session()?;
        self.make_room_for_user(&user)?;
        if let Some(rate) = new.rate {
            self.take_rate_cell(&user, rate)?;
        }
        self.expire_overdue(&user, self.settings.max_evictions_per_call);

        let holders = self.live_holders(&user);
        let own_device = holders
            .iter()
            .find(|s| s.device.id == new.device.id)
            .map(|s| s.name.clone());
        let mut others: Vec<Session> = holders
            .into_iter()
            .filter(|s| Some(&s.name) != own_device.as_ref())
            .collect();
        let mut replaced = Vec::new();
        if others.len() as u64 >= u64::from(new.limit) {
            if new.policy == OverLimitPolicy::RejectNew || new.limit == 0 {
                let mut holders = others;
                holders.extend(
                    own_device
                        .and_then(|n| self.state.sessions.get(&n))
                        .map(|r| r.session()),
                );
                sort_oldest_first(&mut holders);
                return Err(StoreError::LimitReached {
                    limit: new.limit,
                    holders,
                });
            }
            let excess = others.len() + 1 - new.limit as usize;
            for oldest in others.drain(..excess) {
                self.end_session(&oldest.name, SessionState::Evicted, EndReason::StopOldest);
                replaced.push(oldest.name);
            }
        }
        if let Some(own) = own_device {
            self.end_session(&own, SessionState::Evicted, EndReason::ReplacedBySameDevice);
            replaced.push(own);
        }

        let seats = self.state.users.entry(user.clone()).or_default();
        if seats.generation_expires_ms <= self.now {
            seats.generation = 0;
        }
        seats.generation += 1;
        seats.generation_expires_ms = self.now + GENERATION_IDLE_TTL.as_millis() as u64;
        let generation = seats.generation;
        let timeout = self.settings.heartbeat_timeout.as_millis() as u64;
        let session = Session {
            name: new.name.clone(),
            profile: new.profile.clone(),
            content: new.content.clone(),
            device: new.device.clone(),
            client: new.client.clone(),
            state: SessionState::Active,
            position_ms: 0,
            playback_state: PlaybackState::Unspecified,
            generation,
            created_ms: self.now,
            last_heartbeat_ms: self.now,
            deadline_ms: self.now + timeout,
            ended_ms: None,
            end_reason: None,
            termination: Termination::default(),
            paused_ms: None,
        };
        seats.seats.set(&new.name.session, session.deadline_ms);
        let partition = self.partition(&user);
        self.state.partitions[partition]
            .deadlines
            .insert((session.deadline_ms, new.name.clone()));
        self.state
            .sessions
            .insert(new.name.clone(), Box::new(Record::new(&session)));
        self.append(EventKind::Started, &new.name, 0);
        if let Some(request_id) = new.request_id.clone() {
            let expires_ms = self.now + self.settings.request_id_ttl.as_millis() as u64;
            let key = (user, request_id);
            self.state
                .request_expiries
                .push_back((expires_ms, key.clone()));
            self.state.requests.insert(
                key,
                RememberedRequest {
                    session: new.name.clone(),
                    fingerprint: new.fingerprint(),
                    replaced: replaced.clone(),
                    expires_ms,
                },
            );
        }
        Ok(Created {
            session,
            replaced,
            replayed: false,
            progress: self.title_progress(&new),
        })
    }

    /// The checks every device call and terminate share: the session exists, holds
    /// its seat, is not past its deadline, and still owns its seat.
    fn live_session(&mut self, name: &SessionName) -> Result<Session, StoreError> {
        let Some(record) = self.state.sessions.get(name) else {
            return Err(StoreError::NotFound);
        };
        let session = record.session();
        if !holds_seat(session.state) {
            return Err(StoreError::SessionEnded(Box::new(session)));
        }
        if session.deadline_ms <= self.now {
            self.expire(name);
            return Err(self.ended(name));
        }
        let holds = self
            .state
            .users
            .get(&name.user)
            .is_some_and(|u| u.seats.contains(&name.session));
        if !holds {
            self.end_session(name, SessionState::Evicted, EndReason::SeatLost);
            return Err(self.ended(name));
        }
        Ok(session)
    }

    fn ended(&self, name: &SessionName) -> StoreError {
        match self.state.sessions.get(name) {
            Some(record) => StoreError::SessionEnded(Box::new(record.session())),
            None => StoreError::NotFound,
        }
    }

    fn device_call(&mut self, call: DeviceCall) -> Result<Session, StoreError> {
        let name = &call.name;
        let session = self.live_session(name)?;
        if call.generation.is_some_and(|g| g != session.generation) {
            return Err(StoreError::StaleGeneration);
        }
        self.progress_of_call(&call, &session);
        let now = self.now;
        let interval = self.settings.heartbeat_event_interval.as_millis() as u64;
        let mode = self.settings.heartbeat_events;
        let record = self
            .state
            .sessions
            .get_mut(name)
            .ok_or(StoreError::NotFound)?;
        record.live.last_heartbeat_ms = now;
        if let Some(position) = call.position_ms {
            record.live.position_ms = position;
        }
        let event = match call.action {
            DeviceAction::Heartbeat { playback_state } => {
                if playback_state != PlaybackState::Unspecified {
                    record.live.playback_state = playback_state;
                }
                // A reported PAUSED pauses and PLAYING resumes, as the explicit calls do.
                let state = session.state;
                if playback_state == PlaybackState::Paused && state == SessionState::Active {
                    record.live.state = SessionState::Paused;
                    record.live.paused_ms = Some(now);
                    Some(EventKind::Paused)
                } else if playback_state == PlaybackState::Playing && state == SessionState::Paused
                {
                    record.live.state = SessionState::Active;
                    record.live.paused_ms = None;
                    Some(EventKind::Resumed)
                } else {
                    sampled_heartbeat(record, mode, now, interval)
                }
            }
            DeviceAction::Pause if session.state == SessionState::Active => {
                record.live.state = SessionState::Paused;
                record.live.paused_ms = Some(now);
                record.live.playback_state = PlaybackState::Paused;
                Some(EventKind::Paused)
            }
            DeviceAction::Resume if session.state == SessionState::Paused => {
                record.live.state = SessionState::Active;
                record.live.paused_ms = None;
                record.live.playback_state = PlaybackState::Playing;
                Some(EventKind::Resumed)
            }
            DeviceAction::Pause | DeviceAction::Resume => None,
            DeviceAction::Stop => {
                self.end_session(name, SessionState::Stopped, EndReason::StoppedByDevice);
                return Ok(self.state.sessions[name].session());
            }
        };
        self.extend_deadline(name);
        let session = self.state.sessions[name].session();
        if let Some(kind) = event {
            self.append(kind, name, session.position_ms);
        }
        Ok(session)
    }

    /// The progress write of a device call on the live `session`, when one is due
    /// (see `Store::device_call`), with its `playback.completed` event.
    fn progress_of_call(&mut self, call: &DeviceCall, session: &Session) {
        let position_ms = call.position_ms.unwrap_or(session.position_ms);
        let pauses = session.state == SessionState::Active
            && matches!(
                call.action,
                DeviceAction::Pause
                    | DeviceAction::Heartbeat {
                        playback_state: PlaybackState::Paused
                    }
            );
        let interval = self.settings.progress_write_interval.as_millis() as u64;
        let Some(record) = self.state.sessions.get_mut(&call.name) else {
            return;
        };
        if call.duration_ms.is_some() {
            record.duration_ms = call.duration_ms;
        }
        let session_duration = record.duration_ms;
        let due = call.action == DeviceAction::Stop
            || pauses
            || (call.position_ms.is_some()
                && self.now.saturating_sub(record.last_progress_ms) >= interval);
        if position_ms == 0 || !due {
            return;
        }
        record.last_progress_ms = self.now;
        let key = ProgressKey {
            user: session.name.user.clone(),
            profile: session.profile.clone(),
            content: session.content.clone(),
        };
        let before = self
            .profile_progress(&key.user, &key.profile)
            .and_then(|profile| profile.titles.get(&key.content))
            .map(|entry| (entry.duration_ms, entry.completed));
        let duration_ms = session_duration.or(before.and_then(|(duration, _)| duration));
        let completed = duration_ms
            .is_some_and(|duration| self.settings.resume.finishes(position_ms, duration));
        let write = ProgressWrite {
            key,
            position_ms,
            duration_ms,
            completed,
            device: session.device.id.clone(),
        };
        if let Err(error) = self.write_progress(write) {
            // The seat matters more than the bookmark: the call goes on without it.
            tracing::warn!(%error, session = %session.name, "progress not written");
            return;
        }
        if completed && !before.is_some_and(|(_, done)| done) {
            self.append(EventKind::Completed, &session.name, position_ms);
        }
    }

    fn terminate(
        &mut self,
        name: &SessionName,
        termination: &Termination,
    ) -> Result<Session, StoreError> {
        self.live_session(name)?;
        if let Some(record) = self.state.sessions.get_mut(name) {
            record.live.termination = Some(Box::new(termination.clone()));
        }
        self.end_session(
            name,
            SessionState::Terminated,
            EndReason::TerminatedByOperator,
        );
        Ok(self.state.sessions[name].session())
    }

    fn sweep(&mut self, partition: u32, max: u32) -> Swept {
        let now = self.now;
        let overdue: Vec<(u64, SessionName)> = self.state.partitions[partition as usize]
            .deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .take(max as usize)
            .cloned()
            .collect();
        let mut expired = 0;
        for (deadline, name) in overdue {
            let live = self
                .state
                .sessions
                .get(&name)
                .is_some_and(|r| holds_seat(r.live.state));
            if live {
                self.expire(&name);
                expired += 1;
            } else {
                self.state.partitions[partition as usize]
                    .deadlines
                    .remove(&(deadline, name));
            }
        }
        Swept {
            expired,
            next_due_ms: self.state.partitions[partition as usize]
                .deadlines
                .first()
                .map(|(deadline, _)| deadline.saturating_sub(now)),
        }
    }
}

/// The deadline of a live session heartbeating at `now`, and what missing it means.
fn deadline_after(
    session: &Live,
    now: u64,
    timeout_ms: u64,
    max_pause_ms: u64,
) -> (u64, EndReason) {
    let heartbeat = now + timeout_ms;
    match session.paused_ms {
        Some(paused) if session.state == SessionState::Paused => {
            let pause_end = paused + max_pause_ms;
            if pause_end < heartbeat {
                (pause_end, EndReason::MaxPauseExceeded)
            } else {
                (heartbeat, EndReason::HeartbeatTimeout)
            }
        }
        _ => (heartbeat, EndReason::HeartbeatTimeout),
    }
}

fn sort_oldest_first(sessions: &mut [Session]) {
    sessions.sort_by(|a, b| {
        (a.created_ms, a.name.session.as_str()).cmp(&(b.created_ms, b.name.session.as_str()))
    });
}

/// The heartbeat event of a plain heartbeat, if the mode says one is due now.
fn sampled_heartbeat(
    record: &mut Record,
    mode: HeartbeatEvents,
    now: u64,
    interval: u64,
) -> Option<EventKind> {
    let due = match mode {
        HeartbeatEvents::Off => false,
        HeartbeatEvents::All => true,
        HeartbeatEvents::Sampled => now.saturating_sub(record.last_heartbeat_event_ms) >= interval,
    };
    if due {
        record.last_heartbeat_event_ms = now;
    }
    due.then_some(EventKind::Heartbeat)
}

// The memory store answers at once, under one short lock: the caller's deadline has
// nothing to bound.
#[async_trait]
impl Store for MemoryStore {
    async fn create_session(&self, new: NewSession, _: Deadline) -> Result<Created, StoreError> {
        self.with_state(|op| op.create(new))
    }

    async fn get_session(
        &self,
        name: &SessionName,
        _: Deadline,
    ) -> Result<Option<Session>, StoreError> {
        Ok(self.with_state(|op| {
            // One answer everywhere: a session past its deadline (or without its seat)
            // ends now, as a device call on it would end it.
            let _ = op.live_session(name);
            op.state.sessions.get(name).map(|r| r.session())
        }))
    }

    async fn seats(&self, user: &UserId, _: Deadline) -> Result<Seats, StoreError> {
        Ok(self.with_state(|op| Seats {
            now_ms: op.now,
            holders: op.live_holders(user),
        }))
    }

    async fn device_call(&self, call: DeviceCall, _: Deadline) -> Result<Session, StoreError> {
        self.with_state(|op| op.device_call(call))
    }

    async fn terminate(
        &self,
        name: &SessionName,
        termination: &Termination,
        _: Deadline,
    ) -> Result<Session, StoreError> {
        self.with_state(|op| op.terminate(name, termination))
    }

    async fn sweep(&self, partition: u32, max: u32) -> Result<Swept, StoreError> {
        if partition >= self.settings.partitions {
            return Ok(Swept {
                expired: 0,
                next_due_ms: None,
            });
        }
        Ok(self.with_state(|op| op.sweep(partition, max)))
    }

    async fn read_events(
        &self,
        partition: u32,
        after: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let after = after.map(parse_event_id).transpose()?;
        Ok(self.with_state(|op| {
            let Some(log) = op.state.partitions.get(partition as usize) else {
                return Vec::new();
            };
            log.events
                .iter()
                .skip(first_after(&log.events, after))
                .take(count as usize)
                .map(Logged::event)
                .collect()
        }))
    }

    async fn read_events_back(
        &self,
        partition: u32,
        before: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let before = before.map(parse_event_id).transpose()?;
        Ok(self.with_state(|op| {
            let Some(log) = op.state.partitions.get(partition as usize) else {
                return Vec::new();
            };
            let end = match before {
                None => log.events.len(),
                Some(before) => log.events.partition_point(|e| e.id < before),
            };
            log.events
                .range(..end)
                .rev()
                .take(count as usize)
                .map(Logged::event)
                .collect()
        }))
    }

    async fn relay_events(
        &self,
        partition: u32,
        group: &str,
        consumer: &str,
        count: u32,
        claim_after: Duration,
    ) -> Result<Vec<Event>, StoreError> {
        let claim_after = claim_after.as_millis() as u64;
        Ok(self.with_state(|op| {
            let now = op.now;
            let Some(Partition { events, groups, .. }) =
                op.state.partitions.get_mut(partition as usize)
            else {
                return Vec::new();
            };
            let group = groups.entry(group.to_owned()).or_default();
            let mut given = Vec::new();
            let mut gone = Vec::new();
            for (id, (owner, at)) in group.pending.iter_mut() {
                if given.len() >= count as usize {
                    break;
                }
                if now.saturating_sub(*at) < claim_after {
                    continue;
                }
                let index = first_after(events, Some(*id)).checked_sub(1);
                match index.and_then(|i| events.get(i)).filter(|e| e.id == *id) {
                    Some(event) => {
                        *owner = consumer.to_owned();
                        *at = now;
                        given.push(event.event());
                    }
                    // Trimmed from the log since: not an event any more.
                    None => gone.push(*id),
                }
            }
            for id in gone {
                group.pending.remove(&id);
            }
            let start = first_after(events, group.last_given);
            let wanted = (count as usize).saturating_sub(given.len());
            for event in events.iter().skip(start).take(wanted) {
                group.pending.insert(event.id, (consumer.to_owned(), now));
                group.last_given = Some(event.id);
                given.push(event.event());
            }
            given
        }))
    }

    async fn relay_lag(&self, partition: u32, group: &str) -> Result<RelayLag, StoreError> {
        Ok(self.with_state(|op| {
            let Some(log) = op.state.partitions.get(partition as usize) else {
                return RelayLag::default();
            };
            let (last_given, pending) = log
                .groups
                .get(group)
                .map_or((None, 0), |g| (g.last_given, g.pending.len() as u64));
            RelayLag {
                pending,
                unread: (log.events.len() - first_after(&log.events, last_given)) as u64,
            }
        }))
    }

    async fn ack_events(
        &self,
        partition: u32,
        group: &str,
        ids: &[String],
    ) -> Result<u64, StoreError> {
        let ids = ids
            .iter()
            .map(|id| parse_event_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.with_state(|op| {
            let Some(group) = op
                .state
                .partitions
                .get_mut(partition as usize)
                .and_then(|log| log.groups.get_mut(group))
            else {
                return 0;
            };
            ids.iter()
                .filter(|id| group.pending.remove(id).is_some())
                .count() as u64
        }))
    }

    async fn ended_sessions(&self) -> Result<EndedFeed, StoreError> {
        Ok(EndedFeed::new(self.ended.subscribe()))
    }

    async fn write_progress(
        &self,
        write: ProgressWrite,
        _: Deadline,
    ) -> Result<Progress, StoreError> {
        self.with_state(|op| op.write_progress(write))
    }

    async fn get_progress(
        &self,
        key: &ProgressKey,
        _: Deadline,
    ) -> Result<Option<Progress>, StoreError> {
        Ok(self.with_state(|op| {
            op.profile_progress(&key.user, &key.profile)
                .and_then(|profile| profile.titles.get(&key.content).cloned())
        }))
    }

    async fn list_progress(
        &self,
        user: &UserId,
        profile: &ProfileId,
        after: Option<&ProgressCursor>,
        limit: usize,
        _: Deadline,
    ) -> Result<Vec<Progress>, StoreError> {
        Ok(self.with_state(|op| {
            let Some(profile) = op.profile_progress(user, profile) else {
                return Vec::new();
            };
            let mut titles: Vec<&Progress> = profile
                .titles
                .values()
                .filter(|p| after.is_none_or(|after| after.precedes(p)))
                .collect();
            titles.sort_by(|a, b| (b.updated_ms, &b.content).cmp(&(a.updated_ms, &a.content)));
            titles.into_iter().take(limit).cloned().collect()
        }))
    }

    async fn delete_progress(&self, key: &ProgressKey, _: Deadline) -> Result<bool, StoreError> {
        Ok(self.with_state(|op| {
            let profile = (key.user.clone(), key.profile.clone());
            let Some(entry) = op.state.progress.get_mut(&profile) else {
                return false;
            };
            let removed = entry.titles.remove(&key.content).is_some();
            if entry.titles.is_empty() {
                op.state.progress.remove(&profile);
            }
            removed
        }))
    }

    async fn seats_in_use(&self) -> Result<u64, StoreError> {
        Ok(self.with_state(|op| {
            op.state
                .partitions
                .iter()
                .map(|p| p.deadlines.len() as u64)
                .sum()
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn settings(&self) -> &StoreSettings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ContentId, DeviceId, ProfileId};
    use crate::model::{ClientInfo, Device, DeviceType};

    /// What keeps the store near a kilobyte a session (`cargo bench --bench store --
    /// memory`): a field that grows the record or a log entry past these shows here.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_record_and_a_log_entry_stay_small() {
        assert!(size_of::<Record>() <= 120, "{}", size_of::<Record>());
        assert!(size_of::<Fixed>() <= 128, "{}", size_of::<Fixed>());
        assert!(size_of::<Logged>() <= 56, "{}", size_of::<Logged>());
        assert!(size_of::<UserSeats>() <= 56, "{}", size_of::<UserSeats>());
    }

    fn create(user: &UserId) -> NewSession {
        NewSession {
            name: SessionName {
                user: user.clone(),
                session: SessionId::generate(),
            },
            profile: ProfileId::parse("p", "p").unwrap(),
            content: ContentId::parse("c", "c").unwrap(),
            device: Device {
                id: DeviceId::parse("d", "tv").unwrap(),
                kind: DeviceType::Tv,
                name: String::new(),
            },
            client: ClientInfo::default(),
            request_id: None,
            limit: 1,
            policy: OverLimitPolicy::RejectNew,
            rate: None,
        }
    }

    /// An idle user's generation counter is forgotten after `GENERATION_IDLE_TTL`, as
    /// its Redis key expires: the generation starts again. Until then it is kept.
    #[tokio::test]
    async fn idle_users_are_forgotten_like_their_redis_keys() {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = MemoryStore::with_clock(StoreSettings::default(), clock.clone());
        let user = UserId::parse("u", "idle").unwrap();
        let stop = |created: Created| DeviceCall {
            name: created.session.name,
            generation: None,
            position_ms: None,
            duration_ms: None,
            profile: None,
            action: DeviceAction::Stop,
        };
        let first = store
            .create_session(create(&user), Deadline::NONE)
            .await
            .unwrap();
        assert_eq!(first.session.generation, 1);
        store
            .device_call(stop(first), Deadline::NONE)
            .await
            .unwrap();
        clock.advance(Duration::from_secs(29 * 24 * 3600));
        let second = store
            .create_session(create(&user), Deadline::NONE)
            .await
            .unwrap();
        assert_eq!(second.session.generation, 2, "remembered for 30 days");
        store
            .device_call(stop(second), Deadline::NONE)
            .await
            .unwrap();
        clock.advance(Duration::from_secs(31 * 24 * 3600));
        let again = store
            .create_session(create(&user), Deadline::NONE)
            .await
            .unwrap();
        assert_eq!(again.session.generation, 1, "forgotten after 30 idle days");
    }
}
