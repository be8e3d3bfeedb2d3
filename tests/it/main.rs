//! usher's integration tests: one binary, every test against real servers on loopback.

mod bad_input;
mod bench;
mod conformance;
mod e2e;
mod entitlement;
mod events;
mod failover;
mod grpcurl;
mod h2_abuse;
mod hardening;
mod http;
mod linearizability;
mod manifest;
mod otlp;
mod progress;
mod python;
mod race;
mod rate;
mod redis_only;
mod relay;
mod security;
mod skew;
mod soak;
mod storm;
mod streaming;
mod support;
