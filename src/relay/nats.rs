//! The NATS JetStream sink: each event a CloudEvent (structured JSON) on subject
//! `usher.events.<type>` of a stream the sink creates if it is missing, with the event
//! id as `Nats-Msg-Id`, so JetStream drops a redelivery within its duplicate window.
//! A batch is confirmed once JetStream acknowledged every message of it.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{Sink, SinkError};
use crate::events::cloud_event;
use crate::proto;

/// The stream usher's events go to, and its subjects.
pub const STREAM: &str = "USHER_EVENTS";
pub const SUBJECTS: &str = "usher.events.>";
/// JetStream drops a message whose `Nats-Msg-Id` it saw within this window: it must
/// outlast the relay's `claim_after`, after which a batch is delivered again.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

pub struct NatsSink {
    jetstream: jetstream::Context,
    /// The CloudEvents `source`.
    source: String,
    stream: OnceCell<()>,
}

impl NatsSink {
    /// A sink on the NATS server at `url` (`nats://host:port`). The connection is made,
    /// and made again, in the background: a server that is down delays delivery only.
    pub async fn connect(url: &str, source: &str) -> Result<NatsSink, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
            .map_err(|e| SinkError(format!("NATS at {url}: {e}")))?;
        let mut jetstream = jetstream::new(client);
        jetstream.set_timeout(Duration::from_secs(5));
        Ok(NatsSink {
            jetstream,
            source: source.to_owned(),
            stream: OnceCell::new(),
        })
    }

    /// Makes the stream if it is missing (once per process, on first delivery).
    async fn stream(&self) -> Result<(), SinkError> {
        self.stream
            .get_or_try_init(|| async {
                self.jetstream
                    .get_or_create_stream(stream::Config {
                        name: STREAM.to_owned(),
                        subjects: vec![SUBJECTS.to_owned()],
                        duplicate_window: DUPLICATE_WINDOW,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| SinkError(format!("JetStream stream {STREAM}: {e}")))
            })
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn group(&self) -> &str {
        "relay-nats"
    }

    async fn deliver(&self, events: &[proto::Event]) -> Result<(), SinkError> {
        self.stream().await?;
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
            headers.insert("Content-Type", "application/cloudevents+json");
            let payload = serde_json::to_vec(&cloud_event(&self.source, event))
                .map_err(|e| SinkError(e.to_string()))?;
            let ack = self
                .jetstream
                .publish_with_headers(
                    format!("usher.events.{}", event.r#type),
                    headers,
                    payload.into(),
                )
                .await
                .map_err(|e| SinkError(format!("publishing {}: {e}", event.id)))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .map_err(|e| SinkError(format!("JetStream did not confirm: {e}")))?;
        }
        Ok(())
    }
}
