//! usher: the playback control plane of a video streaming platform. It decides whether a
//! user may start a title on a device now, holds one of the account's concurrency seats
//! while the device proves it is alive, and records every change as an event in the same
//! atomic step.
//!
//! # Layout
//!
//! Organised by feature; each feature owns its operations and a thin gRPC adapter that
//! only decodes, calls and encodes.
//!
//! - [`session`]: the session operations (create, heartbeat, pause, resume, stop,
//!   terminate, list) and `PlaybackSessionService`.
//! - [`concurrency`]: the user's seats, read-only, and `ConcurrencyService`.
//! - [`progress`]: watch progress per profile and title, and `ProgressService`.
//! - [`events`]: the event log read back: `EventService` (`WatchEvents` from a cursor
//!   over every partition, `ListEvents` for a user) and the CloudEvents form.
//! - [`entitlement`]: may this user play this, and with how many seats (provider trait and
//!   the embedded static policy).
//! - [`token`]: playback tokens: key sets and rotation, issue and verify (with a cache of
//!   verified tokens), and `TokenService`.
//! - [`manifest`]: manifest URLs signed per origin (S3 presigned GETs, HMAC edge
//!   tokens), short-lived.
//! - [`relay`]: every event delivered to other systems at least once (NATS JetStream),
//!   through a consumer group per sink on every partition's log.
//! - [`streaming`]: the device stream, `StreamingService`: heartbeats in, acks, "stop
//!   now", tokens and reconnects out; the fan-out of the store's ended-session feed; and
//!   `usher device`, a small client of it.
//!
//! Cross-cutting:
//!
//! - [`model`]: the domain records (a session, its device, why it ended), below the
//!   store that persists them and the features that use them.
//! - [`store`]: the `Store` trait and its two implementations, memory (the embedded
//!   default) and Redis (Lua scripts, Cluster-ready keys). One conformance suite holds
//!   both (`tests/it/conformance.rs`).
//! - [`auth`]: who is calling: the tower layer that authenticates every call (service
//!   keys, client certificates, playback tokens) and the roles. What a call may then do
//!   is the operations' business.
//! - [`error`]: the one error type and its one mapping to gRPC status and HTTP.
//! - [`ids`]: identifiers, resource names and shared field parsers, parsed at the edge.
//! - [`proto`]: the generated `usher.v1` code, its descriptor set, and the time
//!   conversions; [`codec`]: the protobuf codec (undecodable bodies are the caller's).
//! - [`deadline`]: the caller's deadline, a value the transports hand to the operations
//!   and the operations to every store call.
//! - [`observe`]: the Prometheus metrics, named in one place.
//! - [`net`]: the accept loop: TCP_NODELAY, the connection cap, the handshake deadline.
//! - [`config`]: the one entry point for configuration (clap, `USHER_*`); [`files`]: the
//!   TOML files operators write, read in one place.
//! - [`server`]: assembles services, health, reflection, limits, the sweeper, signals.
//! - [`bench`]: `usher bench`, the hot paths measured against their ceiling in one run.
//! - [`soak`]: `usher soak`, a long bounded churn that shows nothing accumulates, and the
//!   linearizability check of recorded seat histories.
//!
//! # Layers
//!
//! Imports point one way, down, and the graph of `crate::` imports between these modules
//! has no cycle (`../shared/hooks/module_cycles.py src` checks it):
//!
//! ```text
//! server, config, bench, soak
//!   streaming, relay              (the device stream; the relay of the event log)
//!   session, concurrency, progress, events (operations and their gRPC adapters)
//!     auth, entitlement           (who calls; may they play)
//!       token, manifest           (issue, verify, TokenService; signed manifest URLs)
//!         store                   (the Store trait, memory, Redis)
//!           model, codec          (the domain records; the protobuf codec)
//!             error, deadline, net, files, observe
//!               ids, proto        (the bottom: they import no feature)
//! ```

pub mod auth;
pub mod bench;
pub mod codec;
pub mod concurrency;
pub mod config;
pub mod deadline;
pub mod entitlement;
pub mod error;
pub mod events;
pub mod files;
pub mod ids;
pub mod manifest;
pub mod model;
pub mod net;
pub mod observe;
pub mod progress;
pub mod proto;
pub mod relay;
pub mod server;
pub mod session;
pub mod soak;
pub mod store;
pub mod streaming;
pub mod telemetry;
pub mod token;
