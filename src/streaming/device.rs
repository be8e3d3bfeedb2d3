//! `usher device`: a device's side of the stream, for support engineers and tests. It
//! opens a stream with a playback token, heartbeats at the interval usher acks with,
//! follows `token` (the newest token is used to reconnect) and `reconnect` (waits the
//! delay, opens a new stream), and prints every message usher sends as one JSON line.
//! It exits 0 after `stop`, 1 when the stream fails.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

use crate::proto;
use crate::proto::stream_heartbeats_request::Kind as In;
use crate::proto::stream_heartbeats_response::Kind as Out;
use crate::proto::streaming_service_client::StreamingServiceClient;

/// What `usher device` is told to do.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub token: String,
    /// The position to start at.
    pub position: Duration,
    /// Heartbeat at this interval instead of the one usher acks with.
    pub interval: Option<Duration>,
    /// Send `stop` after this long.
    pub stop_after: Option<Duration>,
    /// Report PAUSED in the heartbeats.
    pub paused: bool,
    /// The title's duration, reported with the heartbeats and the stop.
    pub duration: Option<Duration>,
    /// For https: the CA (PEM) and the name the server's certificate is for.
    pub tls: Option<(Vec<u8>, String)>,
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(t.to_string()))
}

fn millis(d: &Option<prost_types::Duration>) -> Value {
    d.as_ref().map_or(Value::Null, |d| {
        json!(d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
    })
}

/// One pushed message as a JSON line.
pub fn describe(message: &proto::StreamHeartbeatsResponse) -> Value {
    match &message.kind {
        Some(Out::Ack(ack)) => json!({"ack": {
            "expire_time": timestamp(&ack.expire_time),
            "next_interval_ms": millis(&ack.next_interval),
            "server_time": timestamp(&ack.server_time),
            "state": proto::SessionState::try_from(ack.state)
                .map_or("?", |s| s.as_str_name()),
            "coalesced": ack.coalesced,
        }}),
        Some(Out::Stop(stop)) => json!({"stop": {
            "reason": proto::StopReason::try_from(stop.reason).map_or("?", |r| r.as_str_name()),
            "message": stop.message,
            "state": proto::SessionState::try_from(stop.state).map_or("?", |s| s.as_str_name()),
            "session": stop.session,
        }}),
        Some(Out::Token(token)) => json!({"token": {
            "expire_time": timestamp(&token.expire_time),
            "playback_token": token.playback_token,
            "manifest": token.manifest.as_ref().map_or(Value::Null, |m| json!({
                "url": m.url,
                "type": proto::ManifestType::try_from(m.r#type).map_or("?", |t| t.as_str_name()),
                "expire_time": timestamp(&m.expire_time),
            })),
        }}),
        Some(Out::Reconnect(reconnect)) => json!({"reconnect": {
            "delay_ms": millis(&reconnect.delay),
        }}),
        None => json!({}),
    }
}

/// How one stream ended.
enum Ended {
    Stopped,
    Reconnect(Duration),
}

fn heartbeat(position: Duration, options: &DeviceOptions) -> proto::StreamHeartbeatsRequest {
    let state = if options.paused {
        proto::PlaybackState::Paused
    } else {
        proto::PlaybackState::Playing
    };
    proto::StreamHeartbeatsRequest {
        kind: Some(In::Heartbeat(proto::StreamHeartbeat {
            position: Some(crate::proto::duration(position)),
            playback_state: state as i32,
            duration: options.duration.map(crate::proto::duration),
            device_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            ..Default::default()
        })),
    }
}

async fn channel(options: &DeviceOptions) -> Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(options.url.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3));
    if let Some((ca, domain)) = &options.tls {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(domain.clone());
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", options.url))
}

/// One stream, until it stops, is told to reconnect, or fails.
async fn one_stream(
    options: &DeviceOptions,
    token: &mut String,
    started: Instant,
    print: &mut impl FnMut(Value),
) -> Result<Ended, String> {
    let mut client = StreamingServiceClient::new(channel(options).await?);
    let (sender, requests) = mpsc::channel(4);
    let position = |at: Instant| options.position + at.duration_since(started);
    sender
        .send(heartbeat(position(Instant::now()), options))
        .await
        .map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    let bearer = MetadataValue::try_from(format!("Bearer {token}")).map_err(|e| e.to_string())?;
    request.metadata_mut().insert("authorization", bearer);
    let mut responses = client
        .stream_heartbeats(request)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut stop_at = options.stop_after.map(|after| started + after);
    let mut next_beat: Option<tokio::time::Instant> = None;
    loop {
        let beat_at =
            next_beat.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let stop_deadline = stop_at.map(tokio::time::Instant::from_std);
        tokio::select! {
            message = responses.message() => {
                let message = message.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
                let Some(message) = message else {
                    return Err("the stream closed without stop".into());
                };
                print(describe(&message));
                match message.kind {
                    Some(Out::Ack(ack)) => {
                        let interval = options.interval.unwrap_or_else(|| {
                            ack.next_interval
                                .and_then(|d| Duration::try_from(d).ok())
                                .unwrap_or(Duration::from_secs(10))
                        });
                        next_beat = Some(tokio::time::Instant::now() + interval);
                    }
                    Some(Out::Token(fresh)) => *token = fresh.playback_token,
                    Some(Out::Stop(_)) => return Ok(Ended::Stopped),
                    Some(Out::Reconnect(reconnect)) => {
                        let delay = reconnect
                            .delay
                            .and_then(|d| Duration::try_from(d).ok())
                            .unwrap_or_default();
                        return Ok(Ended::Reconnect(delay));
                    }
                    None => {}
                }
            }
            () = tokio::time::sleep_until(beat_at), if next_beat.is_some() => {
                next_beat = None;
                let _ = sender.send(heartbeat(position(Instant::now()), options)).await;
            }
            () = tokio::time::sleep_until(stop_deadline.unwrap_or(beat_at)), if stop_deadline.is_some() => {
                let stop = proto::StreamHeartbeatsRequest {
                    kind: Some(In::Stop(proto::StreamStop {
                        position: Some(crate::proto::duration(position(Instant::now()))),
                        duration: options.duration.map(crate::proto::duration),
                    })),
                };
                let _ = sender.send(stop).await;
                stop_at = None;
            }
        }
    }
}

/// Runs the device until usher stops it. `print` gets each message usher sends.
pub async fn run(options: DeviceOptions, mut print: impl FnMut(Value)) -> Result<(), String> {
    let started = Instant::now();
    let mut token = options.token.clone();
    loop {
        match one_stream(&options, &mut token, started, &mut print).await? {
            Ended::Stopped => return Ok(()),
            Ended::Reconnect(delay) => {
                tokio::time::sleep(delay).await;
                // The instance that sent `reconnect` may be gone: try for a while.
                let mut tries = 0;
                loop {
                    match channel(&options).await {
                        Ok(_) => break,
                        Err(error) if tries >= 20 => return Err(error),
                        Err(_) => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_push_is_printed_with_its_manifest() {
        let push = proto::StreamHeartbeatsResponse {
            kind: Some(Out::Token(proto::TokenRefresh {
                playback_token: "t".into(),
                expire_time: None,
                manifest: Some(proto::Manifest {
                    url: "https://cdn.example.com/t/manifest.mpd?token=x".into(),
                    r#type: proto::ManifestType::Dash as i32,
                    expire_time: None,
                }),
            })),
        };
        let line = describe(&push);
        assert_eq!(
            line["token"]["manifest"]["url"],
            "https://cdn.example.com/t/manifest.mpd?token=x"
        );
        assert_eq!(line["token"]["manifest"]["type"], "MANIFEST_TYPE_DASH");
        let without = proto::StreamHeartbeatsResponse {
            kind: Some(Out::Token(proto::TokenRefresh::default())),
        };
        assert_eq!(describe(&without)["token"]["manifest"], Value::Null);
    }
}
