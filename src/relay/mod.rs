//! The relay: every event of every partition's log delivered to other systems, at least
//! once. Each sink has a consumer group on every partition's log (the store's
//! [`Store::relay_events`]): the relay takes a batch, hands it to the sink, and
//! acknowledges it only once the sink confirmed it. A batch that a relay took and never
//! acknowledged (it crashed, the sink refused) is taken over by any relay of the same
//! sink once it has been pending `claim_after`, so several usher instances share the
//! work and a crash redelivers instead of losing. Sinks drop what they already have by
//! the event's stable id (JetStream: `Nats-Msg-Id`).

pub mod nats;
pub mod postgres;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::to_proto;
use crate::proto;
use crate::store::{RelayLag, Store, StoreError};

/// A sink refused or could not take a batch: it is delivered again later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where events go.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The sink's consumer group: one per kind of sink, shared by every relay of it.
    fn group(&self) -> &str;

    /// Delivers `events` (of one partition, in log order): `Ok` only once the sink holds
    /// all of them. Delivering one again must not duplicate it at the sink.
    async fn deliver(&self, events: &[proto::Event]) -> Result<(), SinkError>;
}

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// This relay's consumer name: unique per process, so a restarted relay is a new
    /// consumer and the old one's pending batches are taken over.
    pub consumer: String,
    /// Events per batch (one partition's).
    pub batch: u32,
    /// A batch pending this long is taken over by whichever relay reads next.
    pub claim_after: Duration,
    /// Between passes over the partitions while events come.
    pub busy_poll: Duration,
    /// Between passes while none do.
    pub idle_poll: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            consumer: format!(
                "relay-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            batch: 256,
            claim_after: Duration::from_secs(30),
            busy_poll: Duration::from_millis(100),
            idle_poll: Duration::from_secs(1),
        }
    }
}

/// The sink a `--relay` URL names: `nats://...` or `postgres://...`.
pub async fn connect_sink(url: &str, source: &str) -> Result<Arc<dyn Sink>, SinkError> {
    if url.starts_with("nats://") {
        Ok(Arc::new(nats::NatsSink::connect(url, source).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresSink::connect(url).await?))
    } else {
        Err(SinkError(format!(
            "{}: not a sink usher relays to (nats:// or postgres://)",
            redacted(url)
        )))
    }
}

/// `url` without the password it may carry, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            let user = rest[..at - scheme.len() - 3]
                .split(':')
                .next()
                .unwrap_or_default();
            format!("{scheme}://{user}:***@{}", &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Partitions read at once by one relay.
const CONCURRENCY: usize = 16;

/// How often a relay measures its group's lag in every partition.
pub const LAG_INTERVAL: Duration = Duration::from_secs(10);

/// Where `group` stands in every partition's log: what is not acknowledged, by
/// partition.
pub async fn lags(store: &dyn Store, group: &str) -> Result<Vec<RelayLag>, StoreError> {
    futures::stream::iter(0..store.settings().partitions)
        .map(|partition| store.relay_lag(partition, group))
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// The sum of what `group` has not acknowledged, and the partition furthest behind with
/// its count.
pub async fn lag(store: &dyn Store, group: &str) -> Result<(u64, u32, u64), StoreError> {
    let lags = lags(store, group).await?;
    let total = lags.iter().map(RelayLag::behind).sum();
    let (partition, behind) = lags
        .iter()
        .enumerate()
        .map(|(partition, lag)| (partition as u32, lag.behind()))
        .max_by_key(|(_, behind)| *behind)
        .unwrap_or((0, 0));
    Ok((total, partition, behind))
}

/// Measures the lag into the metrics, and warns while a partition is more than half
/// the log's cap behind: past the cap, entries are trimmed whether delivered or not.
async fn watch_lag(store: &dyn Store, group: &str) {
    match lag(store, group).await {
        Ok((total, partition, behind)) => {
            crate::observe::relay_lag(group, total, behind);
            let cap = store.settings().event_stream_maxlen;
            if behind > cap / 2 {
                tracing::warn!(
                    group,
                    partition,
                    behind,
                    cap,
                    "relay falling behind: a partition's log keeps about --event-stream-maxlen \
                     entries, and what is trimmed before it is delivered is lost"
                );
            }
        }
        Err(error) => tracing::warn!(%error, group, "relay: measuring the lag failed"),
    }
}

/// Runs a relay of `sink` until `stop` turns true.
pub fn spawn(
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    settings: RelaySettings,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let partitions = store.settings().partitions;
        tracing::info!(group = sink.group(), consumer = %settings.consumer, "relay started");
        let mut measured: Option<tokio::time::Instant> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            if measured.is_none_or(|at| at.elapsed() >= LAG_INTERVAL) {
                watch_lag(&*store, sink.group()).await;
                measured = Some(tokio::time::Instant::now());
            }
            let pass = futures::stream::iter(0..partitions)
                .map(|partition| relay_partition(&*store, &*sink, &settings, partition))
                .buffer_unordered(CONCURRENCY)
                .fold(
                    Pass::default(),
                    |pass, outcome| async move { pass.add(outcome) },
                )
                .await;
            // One line per pass, however many partitions failed the same way.
            if let Some(error) = &pass.first_error {
                tracing::warn!(
                    group = sink.group(),
                    failed_partitions = pass.failed,
                    %error,
                    "relay: batches not delivered (they will be again)"
                );
            }
            let delivered = pass.delivered;
            let pause = if delivered > 0 {
                settings.busy_poll
            } else {
                settings.idle_poll
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// What one pass over the partitions did.
#[derive(Default)]
struct Pass {
    delivered: usize,
    failed: usize,
    first_error: Option<String>,
}

impl Pass {
    fn add(mut self, outcome: Result<usize, String>) -> Pass {
        match outcome {
            Ok(delivered) => self.delivered += delivered,
            Err(error) => {
                self.failed += 1;
                self.first_error.get_or_insert(error);
            }
        }
        self
    }
}

/// One batch of one partition, delivered and acknowledged: how many events, or why not.
async fn relay_partition(
    store: &dyn Store,
    sink: &dyn Sink,
    settings: &RelaySettings,
    partition: u32,
) -> Result<usize, String> {
    let group = sink.group();
    let events = store
        .relay_events(
            partition,
            group,
            &settings.consumer,
            settings.batch,
            settings.claim_after,
        )
        .await
        .map_err(|error| format!("reading partition {partition}'s log: {error}"))?;
    if events.is_empty() {
        return Ok(0);
    }
    let batch: Vec<proto::Event> = events.iter().map(|e| to_proto(partition, e)).collect();
    if let Err(error) = sink.deliver(&batch).await {
        // Not acknowledged: taken over and delivered again after `claim_after`.
        crate::observe::relay_failed(group, batch.len());
        return Err(format!(
            "the sink refused partition {partition}'s batch: {error}"
        ));
    }
    let ids: Vec<String> = events.into_iter().map(|e| e.id).collect();
    crate::observe::relay_delivered(group, ids.len());
    // Delivered but not acknowledged: delivered again later, dropped by the sink.
    store
        .ack_events(partition, group, &ids)
        .await
        .map_err(|error| format!("acknowledging partition {partition}'s batch: {error}"))?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_are_left_out_of_logged_urls() {
        assert_eq!(
            redacted("postgres://usher:s3cret@db:5432/usher"),
            "postgres://usher:***@db:5432/usher"
        );
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
