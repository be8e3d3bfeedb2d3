//! Playback sessions: the operations on them ([`ops`]) and the thin gRPC adapter
//! ([`grpc`]). The record itself is [`crate::model::Session`], re-exported here.

pub mod grpc;
pub mod ops;

pub use crate::model::{
    ClientInfo, Device, DeviceType, EndReason, PlaybackState, Session, SessionState, Termination,
    holds_seat,
};
