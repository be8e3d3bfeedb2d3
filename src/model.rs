//! The domain records: what a playback session is, as the store keeps it and the
//! operations see it. They sit below the store that persists them and below every
//! feature that uses them (sessions, tokens, concurrency).
//!
//! A session holds one of its user's seats while ACTIVE or PAUSED; every other state is
//! terminal and the seat is released in the same atomic step that ends it.

use std::time::Duration;

use crate::ids::{ContentId, DeviceId, ProfileId, SessionName, UserId};
use crate::proto::{self, duration_ms, timestamp_ms};

/// Declares a domain enum with its stored codes and its wire mapping, written once:
/// `Variant = code => proto::Variant`. The codes are the storage format (the Redis
/// records and the Lua prelude use them); the proto numbers are the wire's. The two are
/// mapped here, so a change of the contract never rewrites stored data.
macro_rules! domain_enum {
    ($(#[$doc:meta])* $name:ident: $wire:ty { $($(#[$vdoc:meta])* $variant:ident = $code:literal => $proto:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),*
        }

        impl $name {
            /// The stored code.
            pub fn code(self) -> u8 {
                match self {
                    $($name::$variant => $code),*
                }
            }

            /// The value of a stored code.
            pub fn from_code(code: u64) -> Option<Self> {
                match code {
                    $($code => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// The wire value.
            pub fn to_proto(self) -> $wire {
                match self {
                    $($name::$variant => <$wire>::$proto),*
                }
            }
        }
    };
}

domain_enum! {
    /// Where a session is in its life. ACTIVE and PAUSED hold a seat; the rest are
    /// terminal.
    SessionState: proto::SessionState {
        Active = 1 => Active,
        Paused = 2 => Paused,
        Stopped = 3 => Stopped,
        Terminated = 4 => Terminated,
        Expired = 5 => Expired,
        Evicted = 6 => Evicted,
    }
}

domain_enum! {
    /// What the player last reported doing.
    PlaybackState: proto::PlaybackState {
        /// Nothing reported yet.
        Unspecified = 0 => Unspecified,
        Playing = 1 => Playing,
        Buffering = 2 => Buffering,
        Seeking = 3 => Seeking,
        Paused = 4 => Paused,
    }
}

domain_enum! {
    /// The kind of device.
    DeviceType: proto::DeviceType {
        Tv = 1 => Tv,
        Mobile = 2 => Mobile,
        Tablet = 3 => Tablet,
        Web = 4 => Web,
        Console = 5 => Console,
        SetTopBox = 6 => SetTopBox,
        Desktop = 7 => Desktop,
    }
}

impl PlaybackState {
    /// The reported state of a request.
    pub fn from_proto(value: proto::PlaybackState) -> Self {
        match value {
            proto::PlaybackState::Unspecified => PlaybackState::Unspecified,
            proto::PlaybackState::Playing => PlaybackState::Playing,
            proto::PlaybackState::Buffering => PlaybackState::Buffering,
            proto::PlaybackState::Seeking => PlaybackState::Seeking,
            proto::PlaybackState::Paused => PlaybackState::Paused,
        }
    }
}

impl DeviceType {
    pub const ALL: [DeviceType; 7] = [
        DeviceType::Tv,
        DeviceType::Mobile,
        DeviceType::Tablet,
        DeviceType::Web,
        DeviceType::Console,
        DeviceType::SetTopBox,
        DeviceType::Desktop,
    ];

    /// The name entitlement services and policy files use: `tv`, `mobile`, `tablet`,
    /// `web`, `console`, `set_top_box`, `desktop`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Tv => "tv",
            DeviceType::Mobile => "mobile",
            DeviceType::Tablet => "tablet",
            DeviceType::Web => "web",
            DeviceType::Console => "console",
            DeviceType::SetTopBox => "set_top_box",
            DeviceType::Desktop => "desktop",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The device type of a request; `None` when it was left unspecified.
    pub fn from_proto(value: proto::DeviceType) -> Option<Self> {
        Some(match value {
            proto::DeviceType::Unspecified => return None,
            proto::DeviceType::Tv => DeviceType::Tv,
            proto::DeviceType::Mobile => DeviceType::Mobile,
            proto::DeviceType::Tablet => DeviceType::Tablet,
            proto::DeviceType::Web => DeviceType::Web,
            proto::DeviceType::Console => DeviceType::Console,
            proto::DeviceType::SetTopBox => DeviceType::SetTopBox,
            proto::DeviceType::Desktop => DeviceType::Desktop,
        })
    }
}

/// The device a session plays on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub kind: DeviceType,
    pub name: String,
}

/// Where a create came from, as told by the calling service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip_address: String,
    pub user_agent: String,
    pub region: String,
}

impl ClientInfo {
    /// The viewer's region, when the create gave one.
    pub fn region(&self) -> Option<&str> {
        (!self.region.is_empty()).then_some(self.region.as_str())
    }
}

/// Why a session ended. Stored by these names (`as_str`), never by the wire numbers,
/// so a proto change never rewrites stored data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// STOPPED: the device stopped playback.
    StoppedByDevice,
    /// TERMINATED: an operator or another service ended it.
    TerminatedByOperator,
    /// EXPIRED: no heartbeat within the heartbeat timeout.
    HeartbeatTimeout,
    /// EXPIRED: paused longer than the maximum pause.
    MaxPauseExceeded,
    /// EVICTED: the same device started again.
    ReplacedBySameDevice,
    /// EVICTED: the stop-oldest policy gave the seat to a newer session.
    StopOldest,
    /// EVICTED: the seat vanished from the store (a failover lost it).
    SeatLost,
}

impl EndReason {
    pub const ALL: [EndReason; 7] = [
        EndReason::StoppedByDevice,
        EndReason::TerminatedByOperator,
        EndReason::HeartbeatTimeout,
        EndReason::MaxPauseExceeded,
        EndReason::ReplacedBySameDevice,
        EndReason::StopOldest,
        EndReason::SeatLost,
    ];

    /// The stored name (Redis records, events).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::StoppedByDevice => "stopped_by_device",
            EndReason::TerminatedByOperator => "terminated_by_operator",
            EndReason::HeartbeatTimeout => "heartbeat_timeout",
            EndReason::MaxPauseExceeded => "max_pause_exceeded",
            EndReason::ReplacedBySameDevice => "replaced_by_same_device",
            EndReason::StopOldest => "stop_oldest",
            EndReason::SeatLost => "seat_lost",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|reason| reason.as_str() == value)
    }

    pub fn to_proto(self) -> proto::EndReason {
        match self {
            EndReason::StoppedByDevice => proto::EndReason::StoppedByDevice,
            EndReason::TerminatedByOperator => proto::EndReason::TerminatedByOperator,
            EndReason::HeartbeatTimeout => proto::EndReason::HeartbeatTimeout,
            EndReason::MaxPauseExceeded => proto::EndReason::MaxPauseExceeded,
            EndReason::ReplacedBySameDevice => proto::EndReason::ReplacedBySameDevice,
            EndReason::StopOldest => proto::EndReason::StopOldest,
            EndReason::SeatLost => proto::EndReason::SeatLost,
        }
    }
}

/// An operator's termination: their words and who they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Termination {
    /// The operator's reason, verbatim (`Session.end_message`).
    pub message: String,
    /// The acting caller's name (`Session.ended_by`).
    pub by: String,
}

/// A playback session as the store keeps it. Times are milliseconds since the Unix epoch
/// on the store's clock (Redis `TIME`), never the caller's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub name: SessionName,
    pub profile: ProfileId,
    pub content: ContentId,
    pub device: Device,
    pub client: ClientInfo,
    pub state: SessionState,
    pub position_ms: u64,
    pub playback_state: PlaybackState,
    /// Fencing generation of the seat grant: per user, increasing with every grant.
    pub generation: u64,
    pub created_ms: u64,
    pub last_heartbeat_ms: u64,
    /// The heartbeat deadline; a live session past it is expired.
    pub deadline_ms: u64,
    pub ended_ms: Option<u64>,
    /// Why it ended; `None` while it holds a seat.
    pub end_reason: Option<EndReason>,
    /// For a termination: the operator's words and who they are.
    pub termination: Termination,
    /// When the current pause began; only meaningful while PAUSED.
    pub paused_ms: Option<u64>,
}

/// True for the states that hold a seat.
pub fn holds_seat(state: SessionState) -> bool {
    matches!(state, SessionState::Active | SessionState::Paused)
}

impl Session {
    /// A live session on a TV `device`, started at `created_ms`, whose deadline never
    /// passes: the one sample the unit tests and the benchmarks build on.
    pub fn sample(name: SessionName, device: DeviceId, created_ms: u64) -> Session {
        Session {
            name,
            profile: ProfileId::parse("profile", "main")
                .unwrap_or_else(|_| unreachable!("a valid id")),
            content: ContentId::parse("content", "title")
                .unwrap_or_else(|_| unreachable!("a valid id")),
            device: Device {
                id: device,
                kind: DeviceType::Tv,
                name: "TV".into(),
            },
            client: ClientInfo::default(),
            state: SessionState::Active,
            position_ms: 0,
            playback_state: PlaybackState::Playing,
            generation: 1,
            created_ms,
            last_heartbeat_ms: created_ms,
            deadline_ms: u64::MAX,
            ended_ms: None,
            end_reason: None,
            termination: Termination::default(),
            paused_ms: None,
        }
    }

    /// Holds a seat and has not missed its deadline at `now_ms`.
    pub fn is_live_at(&self, now_ms: u64) -> bool {
        holds_seat(self.state) && self.deadline_ms > now_ms
    }

    pub fn to_proto(&self) -> proto::Session {
        proto::Session {
            name: self.name.to_string(),
            profile_id: self.profile.to_string(),
            content_id: self.content.to_string(),
            device: Some(self.device.to_proto()),
            client: Some(proto::ClientInfo {
                ip_address: self.client.ip_address.clone(),
                user_agent: self.client.user_agent.clone(),
                region: self.client.region.clone(),
            }),
            state: self.state.to_proto() as i32,
            position: Some(duration_ms(self.position_ms)),
            playback_state: self.playback_state.to_proto() as i32,
            generation: self.generation,
            create_time: Some(timestamp_ms(self.created_ms)),
            last_heartbeat_time: Some(timestamp_ms(self.last_heartbeat_ms)),
            expire_time: holds_seat(self.state).then(|| timestamp_ms(self.deadline_ms)),
            end_time: self.ended_ms.map(timestamp_ms),
            end_reason: self
                .end_reason
                .map_or(proto::EndReason::Unspecified, EndReason::to_proto)
                as i32,
            end_message: self.termination.message.clone(),
            ended_by: self.termination.by.clone(),
            // The contract: unset unless PAUSED, whatever the store kept.
            pause_time: self
                .paused_ms
                .filter(|_| self.state == SessionState::Paused)
                .map(timestamp_ms),
        }
    }

    pub fn to_seat_holder(&self) -> proto::SeatHolder {
        proto::SeatHolder {
            session: self.name.to_string(),
            device: Some(self.device.to_proto()),
            content_id: self.content.to_string(),
            profile_id: self.profile.to_string(),
            state: self.state.to_proto() as i32,
            create_time: Some(timestamp_ms(self.created_ms)),
            last_heartbeat_time: Some(timestamp_ms(self.last_heartbeat_ms)),
        }
    }
}

impl Device {
    pub fn to_proto(&self) -> proto::Device {
        proto::Device {
            id: self.id.to_string(),
            r#type: self.kind.to_proto() as i32,
            name: self.name.clone(),
        }
    }
}

/// How far a profile got in a title: `users/{user}/profiles/{profile}/progress/{content}`.
/// It outlives sessions; the store stamps every write with its own clock, so the latest
/// write wins whatever the devices' clocks say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub user: UserId,
    pub profile: ProfileId,
    pub content: ContentId,
    pub position_ms: u64,
    /// The title's length, when the player reported it.
    pub duration_ms: Option<u64>,
    pub completed: bool,
    /// The device that wrote it last.
    pub device: DeviceId,
    /// When the store last wrote it (its clock).
    pub updated_ms: u64,
}

/// When a title resumes where it stopped, and when it counts as finished.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResumeRules {
    /// Stopped before this fraction of the duration: start from the beginning.
    pub min_fraction: f64,
    /// Past this fraction of the duration the title is finished.
    pub complete_fraction: f64,
    /// Within this much of the end (the credits) it is finished too.
    pub credits: Duration,
    /// Titles shorter than this always start from the beginning.
    pub min_duration: Duration,
}

impl Default for ResumeRules {
    fn default() -> Self {
        Self {
            min_fraction: 0.05,
            complete_fraction: 0.90,
            credits: Duration::ZERO,
            min_duration: Duration::from_secs(300),
        }
    }
}

impl ResumeRules {
    /// Whether stopping at `position_ms` of `duration_ms` finishes the title.
    pub fn finishes(&self, position_ms: u64, duration_ms: u64) -> bool {
        position_ms as f64 >= self.complete_fraction * duration_ms as f64
            || duration_ms.saturating_sub(position_ms) <= self.credits.as_millis() as u64
    }

    /// Where playback of a title starts, from the profile's progress in it: where it
    /// stopped, or 0 (from the beginning) when there is none, the title was finished, it
    /// is short, or it had hardly begun. Without a known duration, where it stopped.
    pub fn resume_at(&self, progress: Option<&Progress>) -> u64 {
        let Some(progress) = progress else {
            return 0;
        };
        if progress.completed {
            return 0;
        }
        match progress.duration_ms {
            Some(duration) if duration < self.min_duration.as_millis() as u64 => 0,
            Some(duration)
                if (progress.position_ms as f64) < self.min_fraction * duration as f64 =>
            {
                0
            }
            Some(duration) if self.finishes(progress.position_ms, duration) => 0,
            _ => progress.position_ms,
        }
    }
}

/// A DRM system a license server may issue keys for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrmSystem {
    Widevine,
    Playready,
    Fairplay,
}

impl DrmSystem {
    pub fn name(self) -> &'static str {
        match self {
            DrmSystem::Widevine => "widevine",
            DrmSystem::Playready => "playready",
            DrmSystem::Fairplay => "fairplay",
        }
    }
}

impl SecurityLevel {
    pub fn name(self) -> &'static str {
        match self {
            SecurityLevel::L1 => "L1",
            SecurityLevel::L2 => "L2",
            SecurityLevel::L3 => "L3",
        }
    }
}

/// The minimum robustness of the device's DRM, in Widevine's terms (PlayReady SL3000
/// and hardware FairPlay count as `L1`, PlayReady SL2000 as `L3`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum SecurityLevel {
    /// Keys and decoding in a hardware trusted execution environment.
    L1,
    /// Keys in a trusted execution environment, decoding outside.
    L2,
    /// Software only.
    L3,
}

/// What the license server must enforce.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrmRule {
    /// The systems allowed; empty: any.
    #[serde(rename = "sys", default, skip_serializing_if = "Vec::is_empty")]
    pub systems: Vec<DrmSystem>,
    /// The minimum security level, when there is one.
    #[serde(rename = "lvl", default, skip_serializing_if = "Option::is_none")]
    pub level: Option<SecurityLevel>,
}

/// What an entitlement allows a session on its device: carried into every playback
/// token for the edge and the license server to enforce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlaybackRules {
    /// The highest resolution allowed, in lines (720, 1080, 2160); `None`: no limit.
    pub max_resolution: Option<u32>,
    /// The DRM the license server must require; `None`: no requirement.
    pub drm: Option<DrmRule>,
}
