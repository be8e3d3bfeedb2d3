//! Playback sessions: the domain record, the operations on it ([`ops`]) and the thin
//! gRPC adapter ([`grpc`]).
//!
//! A session holds one of its user's seats while ACTIVE or PAUSED; every other state is
//! terminal and the seat is released in the same atomic step that ends it.

pub mod grpc;
pub mod ops;

use std::time::Duration;

use crate::ids::{ContentId, DeviceId, ProfileId, SessionName};
use crate::proto;

pub use crate::proto::{DeviceType, PlaybackState, SessionState};

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
    pub end_reason: String,
    pub paused_ms: Option<u64>,
}

/// True for the states that hold a seat.
pub fn holds_seat(state: SessionState) -> bool {
    matches!(state, SessionState::Active | SessionState::Paused)
}

impl Session {
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
            state: self.state as i32,
            position: Some(duration_ms(self.position_ms)),
            playback_state: self.playback_state as i32,
            generation: self.generation,
            create_time: Some(timestamp_ms(self.created_ms)),
            last_heartbeat_time: Some(timestamp_ms(self.last_heartbeat_ms)),
            expire_time: holds_seat(self.state).then(|| timestamp_ms(self.deadline_ms)),
            end_time: self.ended_ms.map(timestamp_ms),
            end_reason: self.end_reason.clone(),
            pause_time: self.paused_ms.map(timestamp_ms),
        }
    }

    pub fn to_seat_holder(&self) -> proto::SeatHolder {
        proto::SeatHolder {
            session: self.name.to_string(),
            device: Some(self.device.to_proto()),
            content_id: self.content.to_string(),
            profile_id: self.profile.to_string(),
            state: self.state as i32,
            create_time: Some(timestamp_ms(self.created_ms)),
            last_heartbeat_time: Some(timestamp_ms(self.last_heartbeat_ms)),
        }
    }
}

impl Device {
    pub fn to_proto(&self) -> proto::Device {
        proto::Device {
            id: self.id.to_string(),
            r#type: self.kind as i32,
            name: self.name.clone(),
        }
    }
}

/// A protobuf timestamp from epoch milliseconds.
pub fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp from epoch seconds (JWT time claims).
pub fn timestamp_seconds(seconds: u64) -> prost_types::Timestamp {
    timestamp_ms(seconds * 1000)
}

/// A protobuf duration from milliseconds.
pub fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration from a std one, at millisecond precision.
pub fn duration(d: Duration) -> prost_types::Duration {
    duration_ms(d.as_millis() as u64)
}
