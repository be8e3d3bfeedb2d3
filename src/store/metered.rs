//! A store that times every call by operation and counts the store's own failures
//! (unreachable, full, corrupt), around any [`Store`]. The answers a store gives about
//! sessions (not found, ended, over the limit) are not failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Beat, Created, DeviceCall, EndedFeed, Event, NewSession, OverLimitPolicy, Preview,
    ProgressCursor, ProgressKey, ProgressWrite, RelayLag, Seats, Store, StoreError, StoreSettings,
    Swept,
};
use crate::deadline::Deadline;
use crate::ids::{DeviceId, ProfileId, SessionName, UserId};
use crate::model::{Progress, Session, Termination};

/// See the module docs.
pub struct Metered(pub Arc<dyn Store>);

/// Records one call of `operation` that started at `started`, and marks its span when
/// the store failed.
fn record<T>(
    operation: &'static str,
    started: Instant,
    result: &Result<T, StoreError>,
    span: &tracing::Span,
) {
    let failure = match result {
        Err(StoreError::Unavailable(_)) => Some("unavailable"),
        Err(StoreError::Full(_)) => Some("full"),
        Err(StoreError::Corrupt(_)) => Some("corrupt"),
        Err(StoreError::Refused(_)) => Some("refused"),
        _ => None,
    };
    crate::observe::store_call(operation, started.elapsed().as_secs_f64(), failure);
    if failure.is_some() {
        span.record("otel.status_code", "error");
    }
}

/// Runs `call`, recording it as `operation`. Within a call, when spans are exported
/// (`--otlp-endpoint`), it runs in a child span of the call's; background work (the
/// sweeper, the store probe) makes no traces of its own.
macro_rules! metered {
    ($operation:literal, $call:expr) => {{
        let span = if crate::telemetry::exporting() && !tracing::Span::current().is_none() {
            tracing::debug_span!(
                "store",
                otel.name = concat!("store.", $operation),
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        let result = tracing::Instrument::instrument($call, span.clone()).await;
        record($operation, started, &result, &span);
        result
    }};
}

#[async_trait]
impl Store for Metered {
    async fn create_session(
        &self,
        new: NewSession,
        deadline: Deadline,
    ) -> Result<Created, StoreError> {
        metered!("create_session", self.0.create_session(new, deadline))
    }

    async fn get_session(
        &self,
        name: &SessionName,
        deadline: Deadline,
    ) -> Result<Option<Session>, StoreError> {
        metered!("get_session", self.0.get_session(name, deadline))
    }

    async fn preview_create(
        &self,
        user: &UserId,
        device: &DeviceId,
        limit: u32,
        policy: OverLimitPolicy,
        deadline: Deadline,
    ) -> Result<(Seats, Preview), StoreError> {
        metered!(
            "preview_create",
            self.0.preview_create(user, device, limit, policy, deadline)
        )
    }

    async fn seats(&self, user: &UserId, deadline: Deadline) -> Result<Seats, StoreError> {
        metered!("seats", self.0.seats(user, deadline))
    }

    async fn device_call(
        &self,
        call: DeviceCall,
        deadline: Deadline,
    ) -> Result<Session, StoreError> {
        metered!("device_call", self.0.device_call(call, deadline))
    }

    async fn device_call_brief(
        &self,
        call: DeviceCall,
        deadline: Deadline,
    ) -> Result<Beat, StoreError> {
        metered!("device_call", self.0.device_call_brief(call, deadline))
    }

    async fn terminate(
        &self,
        name: &SessionName,
        termination: &Termination,
        deadline: Deadline,
    ) -> Result<Session, StoreError> {
        metered!("terminate", self.0.terminate(name, termination, deadline))
    }

    async fn write_progress(
        &self,
        write: ProgressWrite,
        deadline: Deadline,
    ) -> Result<Progress, StoreError> {
        metered!("write_progress", self.0.write_progress(write, deadline))
    }

    async fn get_progress(
        &self,
        key: &ProgressKey,
        deadline: Deadline,
    ) -> Result<Option<Progress>, StoreError> {
        metered!("get_progress", self.0.get_progress(key, deadline))
    }

    async fn list_progress(
        &self,
        user: &UserId,
        profile: &ProfileId,
        after: Option<&ProgressCursor>,
        limit: usize,
        deadline: Deadline,
    ) -> Result<Vec<Progress>, StoreError> {
        metered!(
            "list_progress",
            self.0.list_progress(user, profile, after, limit, deadline)
        )
    }

    async fn delete_progress(
        &self,
        key: &ProgressKey,
        deadline: Deadline,
    ) -> Result<bool, StoreError> {
        metered!("delete_progress", self.0.delete_progress(key, deadline))
    }

    async fn sweep(&self, partition: u32, max: u32) -> Result<Swept, StoreError> {
        metered!("sweep", self.0.sweep(partition, max))
    }

    async fn read_events(
        &self,
        partition: u32,
        after: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError> {
        metered!("read_events", self.0.read_events(partition, after, count))
    }

    async fn read_events_back(
        &self,
        partition: u32,
        before: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError> {
        metered!(
            "read_events_back",
            self.0.read_events_back(partition, before, count)
        )
    }

    async fn relay_events(
        &self,
        partition: u32,
        group: &str,
        consumer: &str,
        count: u32,
        claim_after: Duration,
    ) -> Result<Vec<Event>, StoreError> {
        metered!(
            "relay_events",
            self.0
                .relay_events(partition, group, consumer, count, claim_after)
        )
    }

    async fn relay_lag(&self, partition: u32, group: &str) -> Result<RelayLag, StoreError> {
        metered!("relay_lag", self.0.relay_lag(partition, group))
    }

    async fn ack_events(
        &self,
        partition: u32,
        group: &str,
        ids: &[String],
    ) -> Result<u64, StoreError> {
        metered!("ack_events", self.0.ack_events(partition, group, ids))
    }

    async fn ended_sessions(&self) -> Result<EndedFeed, StoreError> {
        self.0.ended_sessions().await
    }

    async fn seats_in_use(&self) -> Result<u64, StoreError> {
        metered!("seats_in_use", self.0.seats_in_use())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        metered!("ping", self.0.ping())
    }

    fn settings(&self) -> &StoreSettings {
        self.0.settings()
    }
}
