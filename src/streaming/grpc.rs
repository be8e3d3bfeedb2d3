//! The gRPC adapter of `StreamingService`: decode each message, run the stream over
//! [`Streams`], encode what it sends.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Inbound, Outbound, StopReason, Streams};
use crate::auth::Caller;
use crate::error::{Error, transport_status};
use crate::ids::FieldViolation;
use crate::model::PlaybackState;
use crate::net::ConnectionInfo;
use crate::proto;
use crate::proto::stream_heartbeats_request::Kind as In;
use crate::proto::stream_heartbeats_response::Kind as Out;
use crate::proto::streaming_service_server::StreamingService;

/// Serves `usher.v1.StreamingService`.
pub struct StreamingGrpc {
    streams: Arc<Streams>,
}

impl StreamingGrpc {
    pub fn new(streams: Arc<Streams>) -> Self {
        Self { streams }
    }
}

fn position(field: &str, value: Option<prost_types::Duration>) -> Result<Option<u64>, Error> {
    crate::ids::position(field, value.as_ref()).map_err(|v| Error::InvalidArgument(vec![v]))
}

fn duration(field: &str, value: Option<prost_types::Duration>) -> Result<Option<u64>, Error> {
    crate::ids::title_duration(field, value.as_ref()).map_err(|v| Error::InvalidArgument(vec![v]))
}

/// One message of the device, in the domain's terms.
fn inbound(message: proto::StreamHeartbeatsRequest) -> Result<Inbound, Error> {
    Ok(match message.kind {
        Some(In::Heartbeat(beat)) => {
            let playback_state = proto::PlaybackState::try_from(beat.playback_state)
                .map(PlaybackState::from_proto)
                .map_err(|_| {
                    Error::InvalidArgument(vec![FieldViolation::new(
                        "heartbeat.playback_state",
                        "not a PlaybackState value",
                    )])
                })?;
            tracing::trace!(
                bitrate = beat.bitrate,
                resolution = %beat.resolution,
                network = %beat.network,
                "stream heartbeat"
            );
            let manifest_type = match proto::ManifestType::try_from(beat.manifest_type) {
                Ok(proto::ManifestType::Unspecified) => None,
                Ok(_) => Some(
                    crate::session::ops::manifest_type(
                        "heartbeat.manifest_type",
                        beat.manifest_type,
                    )
                    .map_err(|v| Error::InvalidArgument(vec![v]))?,
                ),
                Err(_) => {
                    return Err(Error::InvalidArgument(vec![FieldViolation::new(
                        "heartbeat.manifest_type",
                        "not a ManifestType value",
                    )]));
                }
            };
            Inbound::Heartbeat {
                position_ms: position("heartbeat.position", beat.position)?,
                duration_ms: duration("heartbeat.duration", beat.duration)?,
                playback_state,
                manifest_type,
            }
        }
        Some(In::Pause(pause)) => Inbound::Heartbeat {
            position_ms: position("pause.position", pause.position)?,
            duration_ms: duration("pause.duration", pause.duration)?,
            playback_state: PlaybackState::Paused,
            manifest_type: None,
        },
        Some(In::Resume(resume)) => Inbound::Heartbeat {
            position_ms: position("resume.position", resume.position)?,
            duration_ms: duration("resume.duration", resume.duration)?,
            playback_state: PlaybackState::Playing,
            manifest_type: None,
        },
        Some(In::Stop(stop)) => Inbound::Stop {
            position_ms: position("stop.position", stop.position)?,
            duration_ms: duration("stop.duration", stop.duration)?,
        },
        None => {
            return Err(Error::InvalidArgument(vec![FieldViolation::new(
                "kind",
                "one of heartbeat, pause, resume or stop is required",
            )]));
        }
    })
}

fn stop_reason(reason: StopReason) -> proto::StopReason {
    match reason {
        StopReason::Terminated => proto::StopReason::Terminated,
        StopReason::Evicted => proto::StopReason::Evicted,
        StopReason::Replaced => proto::StopReason::Replaced,
        StopReason::Expired => proto::StopReason::Expired,
        StopReason::EntitlementLost => proto::StopReason::EntitlementLost,
        StopReason::Superseded => proto::StopReason::Superseded,
        StopReason::Stopped => proto::StopReason::Stopped,
    }
}

/// One message to the device, on the wire.
fn outbound(message: Outbound) -> proto::StreamHeartbeatsResponse {
    let kind = match message {
        Outbound::Ack {
            deadline_ms,
            next_interval,
            state,
            coalesced,
        } => Out::Ack(proto::HeartbeatAck {
            expire_time: Some(crate::proto::timestamp_ms(deadline_ms)),
            next_interval: Some(crate::proto::duration(next_interval)),
            server_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            state: state.to_proto() as i32,
            coalesced,
        }),
        Outbound::Stop(stopped) => Out::Stop(proto::StopPlayback {
            reason: stop_reason(stopped.reason) as i32,
            message: stopped.message,
            state: stopped.state.map_or(0, |s| s.to_proto() as i32),
            session: stopped.session.to_string(),
        }),
        Outbound::Token(push) => Out::Token(proto::TokenRefresh {
            expire_time: Some(crate::proto::timestamp_seconds(push.issued.claims.exp)),
            playback_token: push.issued.token,
            manifest: push
                .manifest
                .as_ref()
                .map(crate::session::grpc::manifest_to_proto),
        }),
        Outbound::Reconnect(delay) => Out::Reconnect(proto::Reconnect {
            delay: Some(crate::proto::duration(delay)),
        }),
    };
    proto::StreamHeartbeatsResponse { kind: Some(kind) }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::StreamHeartbeatsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl StreamingService for StreamingGrpc {
    type StreamHeartbeatsStream = ResponseStream;

    async fn stream_heartbeats(
        &self,
        request: Request<Streaming<proto::StreamHeartbeatsRequest>>,
    ) -> Result<Response<Self::StreamHeartbeatsStream>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let per_connection = ConnectionInfo::of(request.extensions())
            .map(|connection| connection.device_streams().clone());
        let opened = self
            .streams
            .open(caller.as_ref(), per_connection.as_ref())
            .await?;
        // The first transport error (an undecodable or oversized message, a reset) ends
        // the device's side; it is answered after the stream's own messages.
        let broken = Arc::new(std::sync::Mutex::new(None::<Status>));
        let seen = broken.clone();
        let messages =
            tokio_stream::StreamExt::map_while(
                request.into_inner(),
                move |message| match message {
                    Ok(message) => Some(inbound(message)),
                    Err(status) => {
                        *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                        None
                    }
                },
            )
            .boxed();
        let (out, outgoing) = mpsc::channel(16);
        let (error, failed) = tokio::sync::oneshot::channel();
        let streams = self.streams.clone();
        tokio::spawn(async move {
            let ended = streams.run(opened, messages, out).await;
            let transport = broken.lock().unwrap_or_else(|e| e.into_inner()).take();
            let status = match (ended, transport) {
                (Err(error), _) => Status::from(error),
                (Ok(()), Some(status)) if status.code() != tonic::Code::Cancelled => {
                    transport_status(&status)
                }
                (Ok(()), _) => return,
            };
            let _ = error.send(status);
        });
        // The stream's own messages, then the error that ended it, if any.
        let answers = ReceiverStream::new(outgoing)
            .map(|message| Ok(outbound(message)))
            .chain(
                futures::stream::once(failed)
                    .filter_map(|ended| async move { ended.ok().map(Err) }),
            );
        Ok(Response::new(Box::pin(answers)))
    }
}
