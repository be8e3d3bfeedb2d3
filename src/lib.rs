//! usher: the playback control plane of a video streaming platform. It decides whether a
//! user may start a title on a device now, holds one of the account's concurrency seats
//! while the device proves it is alive, and records every change as an event in the same
//! atomic step.
//!
//! # Layout
//!
//! Organised by feature; each feature owns its domain types, its operations and a thin
//! gRPC adapter that only decodes, calls and encodes.
//!
//! - [`session`]: playback sessions: the record, the operations (create, heartbeat,
//!   pause, resume, stop, terminate) and `PlaybackSessionService`.
//! - [`concurrency`]: the user's seats, read-only, and `ConcurrencyService`.
//! - [`entitlement`]: may this user play this, and with how many seats (provider trait and
//!   the embedded static policy).
//! - [`token`]: playback tokens: key sets and rotation, issue and verify (with a cache of
//!   verified tokens), and `TokenService`.
//!
//! Cross-cutting:
//!
//! - [`store`]: the `Store` trait and its two implementations, memory (the embedded
//!   default) and Redis (Lua scripts, Cluster-ready keys). One conformance suite holds
//!   both (`tests/it/conformance.rs`).
//! - [`auth`]: who may call what: the tower layer that authenticates every call (service
//!   keys, client certificates, playback tokens) and the roles.
//! - [`error`]: the one error type and its one mapping to gRPC status and HTTP.
//! - [`ids`]: identifiers and resource names, parsed at the edge.
//! - [`deadline`]: the caller's deadline, carried to store calls.
//! - [`config`]: the one entry point for configuration (clap, `USHER_*`).
//! - [`server`]: assembles services, health, reflection, limits, the sweeper, shutdown.
//! - [`proto`]: the generated `usher.v1` code and descriptor set.

pub mod auth;
pub mod codec;
pub mod concurrency;
pub mod config;
pub mod deadline;
pub mod entitlement;
pub mod error;
pub mod ids;
pub mod net;
pub mod proto;
pub mod server;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod token;
