//! The device stream (`StreamingService.StreamHeartbeats`): one stream per playing
//! session, authenticated by its playback token, used both ways.
//!
//! - In: heartbeats (a reported PAUSED pauses, PLAYING resumes), pause, resume, stop.
//!   Store writes are coalesced to at most one per `min_write_interval` per stream: every
//!   heartbeat is acknowledged, the latest position and state are written when the
//!   interval allows.
//! - Out: an ack per heartbeat (the new deadline, the next interval with jitter), and,
//!   unasked, `stop` when the session ends anywhere, `token` before the current token
//!   expires, `reconnect` when this instance drains.
//!
//! "Stop now" has two paths. The fast one: every script that ends a session publishes it
//! on the store's notification feed ([`crate::store::Store::ended_sessions`]); one task
//! per instance ([`Streams::run_fanout`]) reads the feed and signals the stream that
//! holds the session, if this instance holds it. The guaranteed one: the next write of
//! the stream's heartbeat is refused by the store with the session's end, so a lost
//! notice delays a stop by at most one heartbeat interval. See ADR 0006.

pub mod device;
pub mod grpc;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::error::Error;
use crate::ids::SessionName;
use crate::manifest::{Manifest, ManifestPaths, ManifestType};
use crate::model::{EndReason, PlaybackRules, PlaybackState, Session, SessionState, holds_seat};
use crate::session::ops::{DeviceRequest, Rechecked, Sessions};
use crate::store::{DeviceAction, DeviceCall, EndedFeed, Store, StoreError};
use crate::token::{IssuedToken, PlaybackClaims, Tokens};

/// The limits and timings of device streams.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// What devices are told to keep to (jittered in each ack).
    pub heartbeat_interval: Duration,
    /// A session's heartbeat timeout: a stream silent this long is over.
    pub heartbeat_timeout: Duration,
    /// At most one store write per stream per this interval.
    pub min_write_interval: Duration,
    /// Streams open on this instance at once.
    pub max_streams: usize,
    /// Streams open on one connection at once.
    pub max_streams_per_connection: usize,
    /// A fresh token is pushed this long before the current one expires.
    pub token_push_before: Duration,
    /// Reconnect delays are spread over this window when the instance drains.
    pub reconnect_spread: Duration,
    /// How long each store call of a stream may take.
    pub call_timeout: Duration,
    /// The entitlement is asked again this often (with a fresh token); `None`: at each
    /// token push.
    pub entitlement_recheck: Option<Duration>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            min_write_interval: Duration::from_secs(1),
            max_streams: 100_000,
            max_streams_per_connection: 1_000,
            token_push_before: Duration::from_secs(120),
            reconnect_spread: Duration::from_secs(5),
            call_timeout: Duration::from_secs(5),
            entitlement_recheck: None,
        }
    }
}

/// What a device sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// A heartbeat; pause and resume arrive as heartbeats reporting PAUSED and PLAYING,
    /// which the store treats exactly as the explicit calls.
    Heartbeat {
        position_ms: Option<u64>,
        /// The title's duration; `None` keeps the last one the stream was given.
        duration_ms: Option<u64>,
        playback_state: PlaybackState,
        /// The manifest the token pushes should carry from now on; `None` keeps it.
        manifest_type: Option<ManifestType>,
    },
    Stop {
        position_ms: Option<u64>,
        duration_ms: Option<u64>,
    },
}

/// Why a stream is told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Terminated,
    Evicted,
    Replaced,
    Expired,
    EntitlementLost,
    Superseded,
    Stopped,
}

impl StopReason {
    /// The reason an ended session gives its stream.
    pub fn of(session: &Session) -> StopReason {
        match session.end_reason {
            Some(EndReason::StoppedByDevice) => StopReason::Stopped,
            Some(EndReason::TerminatedByOperator) => StopReason::Terminated,
            Some(EndReason::StopOldest) => StopReason::Evicted,
            Some(EndReason::ReplacedBySameDevice) => StopReason::Replaced,
            Some(EndReason::HeartbeatTimeout | EndReason::MaxPauseExceeded)
            | Some(EndReason::SeatLost)
            | None => StopReason::Expired,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Terminated => "terminated",
            StopReason::Evicted => "evicted",
            StopReason::Replaced => "replaced",
            StopReason::Expired => "expired",
            StopReason::EntitlementLost => "entitlement_lost",
            StopReason::Superseded => "superseded",
            StopReason::Stopped => "stopped",
        }
    }
}

/// What usher sends.
#[derive(Clone, Debug)]
pub enum Outbound {
    Ack {
        deadline_ms: u64,
        next_interval: Duration,
        state: SessionState,
        coalesced: bool,
    },
    /// Boxed, as is the token: a stream's outgoing queue holds a block of these, so
    /// the enum stays small.
    Stop(Box<Stopped>),
    Token(Box<TokenPush>),
    Reconnect(Duration),
}

/// A fresh token and, when usher signs manifest URLs, a fresh manifest URL.
#[derive(Clone, Debug)]
pub struct TokenPush {
    pub issued: IssuedToken,
    pub manifest: Option<Manifest>,
}

/// Why and how a stream's session is over.
#[derive(Clone, Debug)]
pub struct Stopped {
    pub reason: StopReason,
    /// The operator's words, if an operator ended it.
    pub message: String,
    /// The final state; `None` when superseded (the session goes on elsewhere).
    pub state: Option<SessionState>,
    pub session: SessionName,
}

/// A signal to one stream from outside it.
#[derive(Debug)]
enum Signal {
    /// The feed says the session ended; `noticed` is when this instance heard it.
    Ended { noticed: Instant },
    /// A newer stream for the same session took over.
    Superseded,
    /// This instance is draining.
    Reconnect(Duration),
}

struct Entry {
    id: u64,
    signals: mpsc::Sender<Signal>,
}

/// Counts a stream against a limit while it is open.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Counted> {
        let taken = counter.fetch_add(1, Ordering::AcqRel);
        if taken >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Counted(counter.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open stream's place in the registry, given back when the stream ends.
pub struct Opened {
    streams: Arc<Streams>,
    id: u64,
    claims: Arc<PlaybackClaims>,
    session: Session,
    signals: mpsc::Receiver<Signal>,
    _instance: Counted,
    _connection: Option<Counted>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        crate::observe::streams_open(-1.0);
        let mut registry = self.streams.lock();
        if registry
            .get(&self.session.name)
            .is_some_and(|e| e.id == self.id)
        {
            registry.remove(&self.session.name);
        }
    }
}

/// The device streams of this instance.
pub struct Streams {
    sessions: Arc<Sessions>,
    store: Arc<dyn Store>,
    tokens: Arc<Tokens>,
    settings: StreamSettings,
    registry: Mutex<HashMap<SessionName, Entry>>,
    next_id: AtomicU64,
    open: Arc<AtomicUsize>,
    draining: std::sync::atomic::AtomicBool,
    jitter: Jitter,
}

/// Jitter: a small xorshift generator shared by the streams of an instance, seeded from
/// the OS once. Not for secrets; it only spreads devices' heartbeats and reconnects.
struct Jitter(AtomicU64);

impl Jitter {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::getrandom(&mut seed);
        Self(AtomicU64::new(u64::from_le_bytes(seed) | 1))
    }

    fn next(&self) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        x
    }

    /// A random duration in `[0, max)`.
    fn below(&self, max: Duration) -> Duration {
        let max = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % max)
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Streams {
    pub fn new(
        sessions: Arc<Sessions>,
        store: Arc<dyn Store>,
        tokens: Arc<Tokens>,
        settings: StreamSettings,
    ) -> Self {
        Self {
            sessions,
            store,
            tokens,
            settings,
            registry: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: Arc::new(AtomicUsize::new(0)),
            draining: std::sync::atomic::AtomicBool::new(false),
            jitter: Jitter::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionName, Entry>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The next ack's interval: the heartbeat interval, up to a fifth less at random.
    fn next_interval(&self) -> Duration {
        let interval = self.settings.heartbeat_interval;
        interval - self.jitter.below(interval / 5)
    }

    /// Opens a stream for the caller's session: the caller must be a device with its
    /// playback token, within the limits, and the session live with the token's
    /// generation (refused like the unary device calls). A stream already open for the
    /// session is told it is superseded.
    pub async fn open(
        self: &Arc<Self>,
        caller: Option<&Caller>,
        connection_streams: Option<&Arc<AtomicUsize>>,
    ) -> Result<Opened, Error> {
        let claims = match caller {
            Some(Caller::Device { claims }) => claims.clone(),
            Some(Caller::Service(_)) => return Err(Error::PlaybackTokenRequired),
            _ => return Err(Error::Unauthenticated),
        };
        if self.draining.load(Ordering::Acquire) {
            return Err(Error::Unavailable(
                "this instance is draining: reconnect elsewhere".into(),
            ));
        }
        let instance =
            Counted::take(&self.open, self.settings.max_streams).ok_or(Error::TooManyStreams {
                limit: self.settings.max_streams,
                scope: "instance",
            })?;
        let connection = match connection_streams {
            Some(counter) => Some(
                Counted::take(counter, self.settings.max_streams_per_connection).ok_or(
                    Error::TooManyStreams {
                        limit: self.settings.max_streams_per_connection,
                        scope: "connection",
                    },
                )?,
            ),
            None => None,
        };
        let name = SessionName::parse("sid", &claims.sid)
            .map_err(|_| Error::from(crate::token::TokenError::Invalid("malformed sid")))?;
        let session = self
            .store
            .get_session(&name, Deadline::after(self.settings.call_timeout))
            .await
            .map_err(|e| e.into_error(|| name.to_string()))?;
        let session = match session {
            Some(s) if s.generation != claims.r#gen => {
                return Err(Error::NotFound {
                    resource: name.to_string(),
                });
            }
            Some(s) if holds_seat(s.state) => s,
            Some(s) => {
                return Err(Error::SessionEnded {
                    state: Some(s.state.to_proto()),
                });
            }
            None => {
                return Err(Error::NotFound {
                    resource: name.to_string(),
                });
            }
        };
        let (sender, signals) = mpsc::channel(4);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = self.lock().insert(
            name.clone(),
            Entry {
                id,
                signals: sender,
            },
        );
        if let Some(previous) = previous {
            let _ = previous.signals.try_send(Signal::Superseded);
        }
        crate::observe::streams_open(1.0);
        Ok(Opened {
            streams: self.clone(),
            id,
            claims,
            session,
            signals,
            _instance: instance,
            _connection: connection,
        })
    }

    /// Reads `feed`, the store's ended sessions, and signals the streams this instance
    /// holds, until the feed ends. One task per instance, subscribed before the server
    /// accepts its first call, so no stream can open before its stop could reach it.
    pub async fn run_fanout(self: Arc<Self>, mut feed: EndedFeed) {
        while let Some(name) = feed.next().await {
            let noticed = Instant::now();
            if let Some(entry) = self.lock().get(&name) {
                let _ = entry.signals.try_send(Signal::Ended { noticed });
            }
        }
    }

    /// Tells every open stream to reconnect elsewhere, each after its own delay.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        let registry = self.lock();
        tracing::info!(
            streams = registry.len(),
            "telling device streams to reconnect"
        );
        for entry in registry.values() {
            let delay = self.jitter.below(self.settings.reconnect_spread);
            let _ = entry.signals.try_send(Signal::Reconnect(delay));
        }
    }

    /// Waits until no stream is open, or `timeout` passes. Returns the streams left.
    pub async fn closed(&self, timeout: Duration) -> usize {
        let until = Instant::now() + timeout;
        while self.open_count() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.open_count()
    }

    /// Runs an opened stream: reads `inbound`, sends on `out`, until the session ends,
    /// the device goes away, or the instance drains. Returns the error that ends the
    /// stream, if one does.
    pub async fn run<S>(
        self: Arc<Self>,
        mut opened: Opened,
        inbound: S,
        out: mpsc::Sender<Outbound>,
    ) -> Result<(), Error>
    where
        S: Stream<Item = Result<Inbound, Error>> + Send + Unpin,
    {
        let mut run = Run {
            streams: &self,
            name: opened.session.name.clone(),
            claims: opened.claims.clone(),
            session: opened.session.clone(),
            out,
            last_write: None,
            pending: None,
            duration_ms: None,
            heard: Instant::now(),
            token_due: Instant::now(),
            rules: opened.claims.rules(),
            manifest_paths: None,
            manifest_type: ManifestType::Hls,
            // The device's URL from CreateSession expires about a URL lifetime from now.
            manifest_expires: self.sessions.manifest_ttl().map(|ttl| Instant::now() + ttl),
        };
        run.learn_token(opened.claims.exp);
        let mut inbound = inbound;
        // Three timers, armed once and moved only when their instant changes: a timer
        // registered per message would cost every heartbeat a trip to the timer wheel.
        let timeout = self.settings.heartbeat_timeout;
        let idle = sleep_until(run.heard + timeout);
        let flush = sleep_until(run.heard + FAR);
        let mut token_at = run.token_due();
        let token = sleep_until(token_at);
        tokio::pin!(idle, flush, token);
        let mut flush_armed = false;
        loop {
            if run.pending.is_some() != flush_armed {
                flush_armed = run.pending.is_some();
                let at = match (flush_armed, run.last_write) {
                    (true, Some(written)) => written + self.settings.min_write_interval,
                    _ => Instant::now() + FAR,
                };
                flush.as_mut().reset(at);
            }
            if run.token_due() != token_at {
                token_at = run.token_due();
                token.as_mut().reset(token_at);
            }
            tokio::select! {
                biased;
                signal = opened.signals.recv() => match signal {
                    Some(Signal::Ended { noticed }) => {
                        if run.ended_by_notice(noticed).await? {
                            return Ok(());
                        }
                    }
                    Some(Signal::Superseded) => {
                        run.stop(StopReason::Superseded, None, "superseded").await;
                        return Ok(());
                    }
                    Some(Signal::Reconnect(delay)) => {
                        let _ = run.out.send(Outbound::Reconnect(delay)).await;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                message = inbound.next() => match message {
                    // The device went away: the seat waits until the deadline.
                    None => return Ok(()),
                    Some(Err(error)) => return Err(error),
                    Some(Ok(message)) => {
                        run.heard = Instant::now();
                        if run.receive(message).await? {
                            return Ok(());
                        }
                    }
                },
                () = &mut flush, if flush_armed => {
                    if run.flush().await? {
                        return Ok(());
                    }
                }
                () = &mut idle => {
                    // Heard from since it was armed: move it, lazily.
                    if run.heard + timeout > Instant::now() {
                        idle.as_mut().reset(run.heard + timeout);
                    } else if run.idle().await? {
                        return Ok(());
                    } else {
                        idle.as_mut().reset(run.heard + timeout);
                    }
                }
                () = &mut token => {
                    if run.push_token().await? {
                        return Ok(());
                    }
                    token_at = run.token_due();
                    token.as_mut().reset(token_at);
                }
            }
        }
    }
}

/// An instant no timer of a stream reaches: a year.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A heartbeat waiting for the write interval.
struct Pending {
    position_ms: Option<u64>,
    playback_state: PlaybackState,
}

/// One stream's state while it runs. Methods that return `true` ended the stream.
struct Run<'a> {
    streams: &'a Streams,
    name: SessionName,
    claims: Arc<PlaybackClaims>,
    session: Session,
    out: mpsc::Sender<Outbound>,
    last_write: Option<Instant>,
    pending: Option<Pending>,
    /// The title's duration, as the device last gave it.
    duration_ms: Option<u64>,
    /// When the device last sent anything.
    heard: Instant,
    /// When the next token is due.
    token_due: Instant,
    /// The playback rules the newest token carries.
    rules: PlaybackRules,
    /// Where the title's manifests are, as the content service last said.
    manifest_paths: Option<ManifestPaths>,
    /// The manifest the token pushes carry.
    manifest_type: ManifestType,
    /// When the device's newest manifest URL expires, when usher signs them.
    manifest_expires: Option<Instant>,
}

impl Run<'_> {
    fn settings(&self) -> &StreamSettings {
        &self.streams.settings
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.settings().call_timeout)
    }

    /// When the next token is due: `token_push_before` ahead of the newest one's expiry
    /// (computed when that token is learnt, so it does not drift between calls).
    fn token_due(&self) -> Instant {
        self.token_due
    }

    /// Learns the newest token's expiry: the next push is `token_push_before` ahead of
    /// it, or sooner, ahead of the newest manifest URL's expiry by a fifth of its
    /// lifetime (at most `token_push_before`).
    fn learn_token(&mut self, exp: u64) {
        let before = self.settings().token_push_before;
        let left = Duration::from_secs(exp).saturating_sub(unix_now());
        self.token_due = Instant::now() + left.saturating_sub(before);
        // A re-check more often than tokens are due comes with a token of its own.
        if let Some(every) = self.settings().entitlement_recheck {
            self.token_due = self.token_due.min(Instant::now() + every);
        }
        if let (Some(expires), Some(ttl)) =
            (self.manifest_expires, self.streams.sessions.manifest_ttl())
        {
            let lead = (ttl / 5).min(before);
            self.token_due = self.token_due.min(expires - lead);
        }
    }

    async fn send(&self, message: Outbound) {
        let _ = self.out.send(message).await;
    }

    /// Tells the device its session is over here, and logs it: the session, the reason,
    /// the path the news came by, and how long it took from the session's end.
    async fn stop(&self, reason: StopReason, ended: Option<&Session>, path: &'static str) {
        let since_end_ms = ended
            .and_then(|s| s.ended_ms)
            .map(|ms| unix_now().as_millis().saturating_sub(u128::from(ms)));
        if let Some(ms) = since_end_ms {
            crate::observe::stop_propagation(path, ms as f64 / 1000.0);
        }
        tracing::info!(
            session = %self.name,
            reason = reason.as_str(),
            path,
            since_end_ms,
            "stop sent to the device"
        );
        self.send(Outbound::Stop(Box::new(Stopped {
            reason,
            message: ended
                .map(|s| s.termination.message.clone())
                .unwrap_or_default(),
            state: ended.map(|s| s.state),
            session: self.name.clone(),
        })))
        .await;
    }

    /// Sends the stop of an ended session.
    async fn stop_ended(&self, ended: &Session, path: &'static str) {
        self.stop(StopReason::of(ended), Some(ended), path).await;
    }

    /// The session as the store has it now (a read ends it if it is overdue).
    async fn read(&self) -> Result<Option<Session>, Error> {
        self.streams
            .store
            .get_session(&self.name, self.deadline())
            .await
            .map_err(|e| e.into_error(|| self.name.to_string()))
    }

    /// The feed says the session ended: read it and tell the device.
    async fn ended_by_notice(&mut self, noticed: Instant) -> Result<bool, Error> {
        let read = self.read().await?;
        match read {
            Some(ended) if !holds_seat(ended.state) => {
                tracing::debug!(waited = ?noticed.elapsed(), "read the ended session");
                self.stop_ended(&ended, "notice").await;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => {
                self.stop(StopReason::Expired, None, "notice").await;
                Ok(true)
            }
        }
    }

    /// A device call with the token's generation; an ended session is told why.
    async fn call(
        &mut self,
        action: DeviceAction,
        position_ms: Option<u64>,
    ) -> Result<bool, Error> {
        let call = DeviceCall {
            position_ms,
            duration_ms: self.duration_ms,
            ..DeviceCall::new(self.name.clone(), Some(self.claims.r#gen), action)
        };
        self.last_write = Some(Instant::now());
        let caller = Caller::Device {
            claims: self.claims.clone(),
        };
        let sessions = &self.streams.sessions;
        let answer = if matches!(action, DeviceAction::Heartbeat { .. }) {
            // A heartbeat changes a few fields: the store need not send the record back.
            sessions
                .device_call_brief(DeviceRequest(call), Some(&caller), self.deadline())
                .await
                .map(|beat| beat.apply_to(&mut self.session))
        } else {
            sessions
                .device_call(DeviceRequest(call), Some(&caller), self.deadline())
                .await
                .map(|session| self.session = session)
        };
        match answer {
            Ok(()) => Ok(false),
            Err(Error::SessionEnded { .. }) => {
                // The guaranteed path: the store refused the write because it is over.
                let ended = self.read().await.ok().flatten();
                match ended {
                    Some(ended) => self.stop_ended(&ended, "heartbeat").await,
                    None => self.stop(StopReason::Expired, None, "heartbeat").await,
                }
                Ok(true)
            }
            Err(error) => Err(error),
        }
    }

    fn ack(&self, coalesced: bool) -> Outbound {
        Outbound::Ack {
            deadline_ms: self.session.deadline_ms,
            next_interval: self.streams.next_interval(),
            state: self.session.state,
            coalesced,
        }
    }

    async fn receive(&mut self, message: Inbound) -> Result<bool, Error> {
        match message {
            Inbound::Stop {
                position_ms,
                duration_ms,
            } => {
                self.duration_ms = duration_ms.or(self.duration_ms);
                if self.call(DeviceAction::Stop, position_ms).await? {
                    return Ok(true);
                }
                let stopped = self.session.clone();
                self.stop_ended(&stopped, "device").await;
                Ok(true)
            }
            Inbound::Heartbeat {
                position_ms,
                duration_ms,
                playback_state,
                manifest_type,
            } => {
                self.duration_ms = duration_ms.or(self.duration_ms);
                if let Some(kind) = manifest_type {
                    self.manifest_type = kind;
                }
                let interval = self.settings().min_write_interval;
                if self.last_write.is_some_and(|t| t.elapsed() < interval) {
                    let pending = self.pending.get_or_insert(Pending {
                        position_ms: None,
                        playback_state: PlaybackState::Unspecified,
                    });
                    if position_ms.is_some() {
                        pending.position_ms = position_ms;
                    }
                    if playback_state != PlaybackState::Unspecified {
                        pending.playback_state = playback_state;
                    }
                    self.send(self.ack(true)).await;
                    return Ok(false);
                }
                self.pending = None;
                let action = DeviceAction::Heartbeat { playback_state };
                if self.call(action, position_ms).await? {
                    return Ok(true);
                }
                self.send(self.ack(false)).await;
                Ok(false)
            }
        }
    }

    /// Writes the coalesced heartbeat.
    async fn flush(&mut self) -> Result<bool, Error> {
        let Some(pending) = self.pending.take() else {
            return Ok(false);
        };
        let action = DeviceAction::Heartbeat {
            playback_state: pending.playback_state,
        };
        self.call(action, pending.position_ms).await
    }

    /// Nothing heard for a heartbeat timeout: the session is over, or nearly.
    async fn idle(&mut self) -> Result<bool, Error> {
        let read = self.read().await?;
        match read {
            Some(session) if holds_seat(session.state) => {
                // The store's clock has not passed the deadline yet; look again soon.
                self.heard =
                    Instant::now() - self.settings().heartbeat_timeout + Duration::from_millis(250);
                Ok(false)
            }
            Some(ended) => {
                self.stop_ended(&ended, "silence").await;
                Ok(true)
            }
            None => {
                self.stop(StopReason::Expired, None, "silence").await;
                Ok(true)
            }
        }
    }

    /// Pushes a fresh token, unless the entitlement was withdrawn: then the session is
    /// ended and the device told so.
    async fn push_token(&mut self) -> Result<bool, Error> {
        let deadline = self.deadline();
        match self
            .streams
            .sessions
            .recheck_entitlement(&self.session, deadline)
            .await
        {
            Rechecked::Kept(grant) => {
                self.rules = grant.rules;
                self.manifest_paths = grant.manifest;
            }
            // A provider that cannot answer does not stop an admitted session: the token
            // is pushed with the rules it had, and the next one asks again.
            Rechecked::Unknown => {}
            Rechecked::Lost(denial) => return self.entitlement_lost(denial).await,
        }
        let issued = self.streams.tokens.issue(&self.session, &self.rules)?;
        let manifest = match self.streams.sessions.manifest_ttl() {
            None => None,
            Some(_) => match self.streams.sessions.sign_manifest(
                &self.session,
                self.manifest_type,
                self.manifest_paths.as_ref(),
            ) {
                Ok(manifest) => {
                    let lifetime = manifest
                        .expires
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    self.manifest_expires = Some(Instant::now() + lifetime);
                    Some(manifest)
                }
                // The token still goes: the device keeps playing what it has.
                Err(error) => {
                    tracing::warn!(session = %self.name, %error, "no manifest URL to push");
                    None
                }
            },
        };
        self.learn_token(issued.claims.exp);
        self.send(Outbound::Token(Box::new(TokenPush { issued, manifest })))
            .await;
        Ok(false)
    }

    /// The entitlement was withdrawn: the session ends (an operator's termination by
    /// usher, with the denial in its message) and the device is told.
    async fn entitlement_lost(&mut self, denial: crate::error::Denial) -> Result<bool, Error> {
        let ended = self
            .streams
            .sessions
            .end_for_entitlement(&self.name, denial, self.deadline())
            .await;
        let ended = match ended {
            Ok(ended) => ended,
            Err(StoreError::SessionEnded(ended)) => {
                self.stop_ended(&ended, "token").await;
                return Ok(true);
            }
            Err(error) => return Err(error.into_error(|| self.name.to_string())),
        };
        self.stop(StopReason::EntitlementLost, Some(&ended), "token")
            .await;
        Ok(true)
    }
}
