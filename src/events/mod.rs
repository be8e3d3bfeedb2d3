//! The read side of the event log: `usher.v1.EventService`. Every state change appends
//! its event to the log of the user's partition in the same atomic step (the store);
//! `WatchEvents` follows every partition's log from a cursor, and `ListEvents` reads one
//! user's events newest first. The same [`Event`] goes to other systems as a CloudEvent
//! ([`cloud_event`]).

pub mod grpc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::error::{Error, FieldViolation, Violations};
use crate::ids::UserId;
use crate::proto;
use crate::store::{Event, EventKind, Store, parse_event_id, partition_of};

/// An event's stable id: `<partition>-<ms>-<seq>`, from its log entry.
pub fn event_id(partition: u32, event: &Event) -> String {
    format!("{partition}-{}", event.id)
}

/// The protobuf form of an event of `partition`.
pub fn to_proto(partition: u32, event: &Event) -> proto::Event {
    let terminated = event.kind == EventKind::Terminated;
    proto::Event {
        id: event_id(partition, event),
        r#type: event.kind.as_str().to_owned(),
        time: Some(proto::timestamp_ms(event.at_ms)),
        session: event.session.to_string(),
        user_id: event.session.user.to_string(),
        profile_id: event.profile.to_string(),
        device_id: event.device.to_string(),
        content_id: event.content.to_string(),
        generation: event.generation,
        position: Some(proto::duration_ms(event.position_ms)),
        end_reason: event
            .reason
            .map_or(proto::EndReason::Unspecified, |reason| reason.to_proto())
            as i32,
        actor: if terminated {
            event.termination.by.clone()
        } else {
            String::new()
        },
        operator_reason: if terminated {
            event.termination.message.clone()
        } else {
            String::new()
        },
    }
}

/// The CloudEvents 1.0 structured-mode JSON of `event` (`specversion`, `id`, `source`,
/// `type`, `time`, `subject`, `datacontenttype`, `data`): what other systems receive.
/// `source` names the usher deployment; `subject` is the session.
pub fn cloud_event(source: &str, event: &proto::Event) -> serde_json::Value {
    let time = event
        .time
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let millis = |d: &Option<prost_types::Duration>| {
        d.as_ref()
            .map_or(0, |d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
    };
    let mut data = serde_json::json!({
        "session": event.session,
        "userId": event.user_id,
        "profileId": event.profile_id,
        "deviceId": event.device_id,
        "contentId": event.content_id,
        "generation": event.generation,
        "positionMs": millis(&event.position),
    });
    if let Ok(reason) = proto::EndReason::try_from(event.end_reason)
        && reason != proto::EndReason::Unspecified
    {
        data["endReason"] = reason.as_str_name().into();
    }
    if !event.actor.is_empty() {
        data["actor"] = event.actor.clone().into();
        data["operatorReason"] = event.operator_reason.clone().into();
    }
    serde_json::json!({
        "specversion": "1.0",
        "id": event.id,
        "source": source,
        "type": event.r#type,
        "time": time,
        "subject": event.session,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// Where a watcher is in every partition's log: the last entry it has seen in each
/// (`None`: nothing yet, from the log's start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    positions: Vec<Option<(u64, u64)>>,
}

const CURSOR_VERSION: u8 = 1;

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

impl Cursor {
    /// Opaque text: base64url of the version, the partition count, the smallest
    /// millisecond of the positions, then per partition 1 + its millisecond above that
    /// and its sequence, or, for a run of partitions with no position, 0 and the run's
    /// length; all varints: a few bytes per partition that has events.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let base = self
            .positions
            .iter()
            .flatten()
            .map(|p| p.0)
            .min()
            .unwrap_or(0);
        let mut out = vec![CURSOR_VERSION];
        put_varint(&mut out, self.positions.len() as u64);
        put_varint(&mut out, base);
        let mut i = 0;
        while i < self.positions.len() {
            match self.positions[i] {
                None => {
                    let run = self.positions[i..]
                        .iter()
                        .take_while(|p| p.is_none())
                        .count();
                    put_varint(&mut out, 0);
                    put_varint(&mut out, run as u64);
                    i += run;
                }
                Some((ms, seq)) => {
                    put_varint(&mut out, 1 + ms - base);
                    put_varint(&mut out, seq);
                    i += 1;
                }
            }
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    }

    /// A cursor `encode` made for a store of `partitions` partitions.
    pub fn decode(field: &str, value: &str, partitions: u32) -> Result<Cursor, FieldViolation> {
        use base64::Engine;
        let malformed = || FieldViolation::new(field, "not a cursor of WatchEvents");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| malformed())?;
        let mut rest = bytes.as_slice();
        let (&version, after) = rest.split_first().ok_or_else(malformed)?;
        rest = after;
        if version != CURSOR_VERSION {
            return Err(malformed());
        }
        let count = take_varint(&mut rest).ok_or_else(malformed)?;
        if count != u64::from(partitions) {
            return Err(FieldViolation::new(
                field,
                format!("a cursor of {count} partitions; this deployment has {partitions}"),
            ));
        }
        let base = take_varint(&mut rest).ok_or_else(malformed)?;
        let mut positions = Vec::with_capacity(partitions as usize);
        while positions.len() < partitions as usize {
            match take_varint(&mut rest).ok_or_else(malformed)? {
                0 => {
                    let run = take_varint(&mut rest).ok_or_else(malformed)?;
                    let left = partitions as usize - positions.len();
                    if run == 0 || run > left as u64 {
                        return Err(malformed());
                    }
                    positions.extend(std::iter::repeat_n(None, run as usize));
                }
                above => {
                    let ms = base.checked_add(above - 1).ok_or_else(malformed)?;
                    positions.push(Some((ms, take_varint(&mut rest).ok_or_else(malformed)?)));
                }
            }
        }
        if !rest.is_empty() {
            return Err(malformed());
        }
        Ok(Cursor { positions })
    }

    fn after(&self, partition: u32) -> Option<String> {
        self.positions[partition as usize].map(|(ms, seq)| format!("{ms}-{seq}"))
    }

    fn advance(&mut self, partition: u32, id: &str) -> Result<(), Error> {
        let position = parse_event_id(id).map_err(|e| Error::Internal(e.to_string()))?;
        self.positions[partition as usize] = Some(position);
        Ok(())
    }
}

/// A parsed `WatchEvents`.
pub struct WatchEvents {
    cursor: Option<Cursor>,
    types: Vec<EventKind>,
    user: Option<UserId>,
}

impl WatchEvents {
    pub fn parse(request: proto::WatchEventsRequest, partitions: u32) -> Result<Self, Error> {
        let mut v = Violations::default();
        let cursor = match request.cursor.as_str() {
            "" => None,
            text => v.check(Cursor::decode("cursor", text, partitions)),
        };
        let mut types = Vec::new();
        for (i, name) in request.types.iter().enumerate() {
            match EventKind::parse(name) {
                Some(kind) => types.push(kind),
                None => v.add(
                    format!("types[{i}]"),
                    "not an event type (playback.started, playback.stopped, ...)",
                ),
            }
        }
        let user = match request.user_id.as_str() {
            "" => None,
            id => v.check(UserId::parse("user_id", id)),
        };
        v.finish()?;
        Ok(WatchEvents {
            cursor,
            types,
            user,
        })
    }

    fn wants(&self, event: &Event) -> bool {
        (self.types.is_empty() || self.types.contains(&event.kind))
            && self.user.as_ref().is_none_or(|u| *u == event.session.user)
    }
}

/// How a watcher polls the logs: at least this often while events come, backing off to
/// `MAX_POLL` while none do.
const MIN_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(1);
/// A batch that only moves the cursor is sent at most this often.
const CURSOR_REFRESH: Duration = Duration::from_secs(5);
/// Entries read from one partition per poll.
const READ_BATCH: u32 = 256;
/// Events per message of `WatchEvents`.
const MAX_BATCH_EVENTS: usize = 500;
/// Partitions read at once.
const READ_CONCURRENCY: usize = 64;

const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 500;
/// `ListEvents` reads the user's partition log backwards this many entries at a time,
/// and at most `SCAN_BUDGET` entries per call.
const SCAN_CHUNK: u32 = 256;
const SCAN_BUDGET: usize = 4096;
const PAGE_TOKEN_VERSION: &str = "e1";

/// The event operations.
pub struct EventOps {
    store: Arc<dyn Store>,
    stopping: watch::Receiver<bool>,
}

/// A page of a user's events and where the next one starts.
pub struct EventPage {
    pub events: Vec<proto::Event>,
    pub next_page_token: String,
}

impl EventOps {
    /// `stopping` turns true when the server drains: watchers are then told to
    /// reconnect (elsewhere) with their cursor.
    pub fn new(store: Arc<dyn Store>, stopping: watch::Receiver<bool>) -> Self {
        Self { store, stopping }
    }

    pub fn partitions(&self) -> u32 {
        self.store.settings().partitions
    }

    /// `users/{user}`'s events, newest first, from `page_token`.
    pub async fn list(&self, request: proto::ListEventsRequest) -> Result<EventPage, Error> {
        let mut v = Violations::default();
        let user = v.check(match crate::ids::split_exact(&request.parent, '/') {
            Some(["users", user]) => UserId::parse("parent", user),
            _ => Err(FieldViolation::new("parent", "must be users/{user}")),
        });
        let page_size = v.check(crate::ids::page_size(
            "page_size",
            request.page_size,
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        ));
        let before = v.check(crate::ids::page_token(
            "page_token",
            &request.page_token,
            |field, token| {
                let malformed = || FieldViolation::new(field, "not a page token of ListEvents");
                let plain = crate::ids::open_page_token(token).ok_or_else(malformed)?;
                let Some([PAGE_TOKEN_VERSION, owner, id]) = crate::ids::split_exact(&plain, '/')
                else {
                    return Err(malformed());
                };
                if request.parent != format!("users/{owner}") {
                    return Err(FieldViolation::new(
                        field,
                        "belongs to another parent's listing",
                    ));
                }
                parse_event_id(id).map_err(|_| malformed())?;
                Ok(id.to_owned())
            },
        ));
        v.finish()?;
        let (Some(user), Some(page_size), Some(mut before)) = (user, page_size, before) else {
            return Err(Error::Internal("violations not recorded".into()));
        };
        let partition = partition_of(&user, self.partitions());
        let resource = || request.parent.clone();
        let mut events = Vec::new();
        let mut scanned = 0;
        let mut exhausted = false;
        'scan: while scanned < SCAN_BUDGET {
            let chunk = self
                .store
                .read_events_back(partition, before.as_deref(), SCAN_CHUNK)
                .await
                .map_err(|e| e.into_error(resource))?;
            scanned += chunk.len();
            let last_chunk = chunk.len() < SCAN_CHUNK as usize;
            let total = chunk.len();
            for (i, event) in chunk.into_iter().enumerate() {
                before = Some(event.id.clone());
                if event.session.user == user {
                    events.push(to_proto(partition, &event));
                    if events.len() == page_size {
                        exhausted = last_chunk && i + 1 == total;
                        break 'scan;
                    }
                }
            }
            if last_chunk {
                exhausted = true;
                break;
            }
        }
        let next_page_token = match (exhausted, before) {
            (false, Some(id)) => {
                crate::ids::seal_page_token(&format!("{PAGE_TOKEN_VERSION}/{user}/{id}"))
            }
            _ => String::new(),
        };
        Ok(EventPage {
            events,
            next_page_token,
        })
    }

    /// Follows the logs for `request` until the receiver is dropped or the server
    /// drains: batches of events with the cursor after them, in a channel.
    pub async fn watch(
        self: &Arc<Self>,
        request: WatchEvents,
    ) -> Result<mpsc::Receiver<Result<proto::WatchEventsResponse, Error>>, Error> {
        let cursor = match &request.cursor {
            Some(cursor) => cursor.clone(),
            None => self.now().await?,
        };
        let (sender, receiver) = mpsc::channel(16);
        let ops = Arc::clone(self);
        tokio::spawn(async move {
            let ended = ops.follow(request, cursor, &sender).await;
            if let Err(error) = ended {
                let _ = sender.send(Err(error)).await;
            }
        });
        Ok(receiver)
    }

    /// A cursor at the end of every partition's log.
    async fn now(&self) -> Result<Cursor, Error> {
        let partitions = self.partitions();
        let store = &self.store;
        let lasts: Vec<_> = futures::stream::iter(0..partitions)
            .map(|partition| async move {
                let last = store.read_events_back(partition, None, 1).await;
                (partition, last)
            })
            .buffered(READ_CONCURRENCY)
            .collect()
            .await;
        let mut cursor = Cursor {
            positions: vec![None; partitions as usize],
        };
        for (partition, last) in lasts {
            let last = last.map_err(|e| e.into_error(String::new))?;
            if let Some(event) = last.first() {
                cursor.advance(partition, &event.id)?;
            }
        }
        Ok(cursor)
    }

    async fn follow(
        &self,
        request: WatchEvents,
        mut cursor: Cursor,
        sender: &mpsc::Sender<Result<proto::WatchEventsResponse, Error>>,
    ) -> Result<(), Error> {
        let partitions: Vec<u32> = match &request.user {
            Some(user) => vec![partition_of(user, self.partitions())],
            None => (0..self.partitions()).collect(),
        };
        let mut stopping = self.stopping.clone();
        let mut poll = MIN_POLL;
        let mut sent_at = Instant::now();
        let mut unsent_move = false;
        loop {
            if *stopping.borrow() {
                return Err(Error::Unavailable(
                    "the server is shutting down: resume from your last cursor".into(),
                ));
            }
            let store = &self.store;
            let cursor_now = &cursor;
            let reads: Vec<_> = futures::stream::iter(partitions.iter().copied())
                .map(|partition| async move {
                    let after = cursor_now.after(partition);
                    let read = store
                        .read_events(partition, after.as_deref(), READ_BATCH)
                        .await;
                    (partition, read)
                })
                .buffered(READ_CONCURRENCY)
                .collect()
                .await;
            // Every entry read, in the order it is sent: by time across partitions, never
            // reordered within one (the key is the partition's running maximum time).
            let mut entries = Vec::new();
            for (partition, read) in reads {
                let read = read.map_err(|e| e.into_error(String::new))?;
                let mut at = 0;
                for event in read {
                    at = at.max(event.at_ms);
                    entries.push((at, partition, event));
                }
            }
            entries.sort_by_key(|(at, partition, _)| (*at, *partition));
            let moved = !entries.is_empty();
            // Batches of at most MAX_BATCH_EVENTS, each with the cursor just after its
            // last entry, so resuming from any batch's cursor repeats nothing.
            let mut batch = Vec::new();
            let mut sent_all = true;
            let total = entries.len();
            for (i, (_, partition, event)) in entries.into_iter().enumerate() {
                cursor.advance(partition, &event.id)?;
                if request.wants(&event) {
                    batch.push(to_proto(partition, &event));
                }
                sent_all = false;
                let last = i + 1 == total;
                let due = batch.len() == MAX_BATCH_EVENTS
                    || (last && (!batch.is_empty() || sent_at.elapsed() >= CURSOR_REFRESH));
                if due {
                    let message = proto::WatchEventsResponse {
                        events: std::mem::take(&mut batch),
                        cursor: cursor.encode(),
                    };
                    if sender.send(Ok(message)).await.is_err() {
                        return Ok(());
                    }
                    sent_at = Instant::now();
                    sent_all = true;
                }
            }
            if moved {
                unsent_move = !sent_all;
            }
            if !moved && unsent_move && sent_at.elapsed() >= CURSOR_REFRESH {
                let message = proto::WatchEventsResponse {
                    events: Vec::new(),
                    cursor: cursor.encode(),
                };
                if sender.send(Ok(message)).await.is_err() {
                    return Ok(());
                }
                sent_at = Instant::now();
                unsent_move = false;
            }
            poll = if moved {
                MIN_POLL
            } else {
                (poll * 2).min(MAX_POLL)
            };
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = sender.closed() => return Ok(()),
                changed = stopping.changed() => {
                    if changed.is_err() {
                        // The server is gone.
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ContentId, DeviceId, ProfileId, SessionId, SessionName};
    use crate::model::{EndReason, Termination};

    #[test]
    fn an_event_is_a_cloud_event_with_its_own_id() {
        let event = Event {
            id: "1796000000000-3".into(),
            kind: EventKind::Terminated,
            session: SessionName {
                user: UserId::parse("u", "ann").unwrap(),
                session: SessionId::parse("s", "s-1").unwrap(),
            },
            generation: 4,
            device: DeviceId::parse("d", "tv").unwrap(),
            content: ContentId::parse("c", "film").unwrap(),
            profile: ProfileId::parse("p", "main").unwrap(),
            position_ms: 61_500,
            at_ms: 1_796_000_000_000,
            reason: Some(EndReason::TerminatedByOperator),
            termination: Termination {
                message: "chargeback".into(),
                by: "support".into(),
            },
        };
        let wire = to_proto(17, &event);
        assert_eq!(wire.id, "17-1796000000000-3");
        let cloud = cloud_event("usher://eu-1", &wire);
        assert_eq!(cloud["specversion"], "1.0");
        assert_eq!(cloud["id"], "17-1796000000000-3");
        assert_eq!(cloud["source"], "usher://eu-1");
        assert_eq!(cloud["type"], "playback.terminated");
        assert_eq!(cloud["time"], "2026-11-30T00:53:20Z");
        assert_eq!(cloud["subject"], "users/ann/sessions/s-1");
        assert_eq!(cloud["data"]["positionMs"], 61_500);
        assert_eq!(cloud["data"]["generation"], 4);
        assert_eq!(
            cloud["data"]["endReason"],
            "END_REASON_TERMINATED_BY_OPERATOR"
        );
        assert_eq!(cloud["data"]["actor"], "support");
        assert_eq!(cloud["data"]["operatorReason"], "chargeback");
        let started = to_proto(
            17,
            &Event {
                kind: EventKind::Started,
                reason: None,
                termination: Termination::default(),
                ..event
            },
        );
        let cloud = cloud_event("usher://eu-1", &started);
        assert!(cloud["data"].get("endReason").is_none());
        assert!(cloud["data"].get("actor").is_none());
    }

    #[test]
    fn a_cursor_round_trips_and_refuses_what_is_not_one() {
        let cursor = Cursor {
            positions: vec![
                None,
                Some((1_796_000_000_000, 0)),
                Some((1_796_000_123_456, 7)),
                None,
            ],
        };
        let text = cursor.encode();
        assert!(text.len() < 30, "{text}");
        assert_eq!(Cursor::decode("cursor", &text, 4).unwrap(), cursor);
        let other = Cursor::decode("cursor", &text, 8).unwrap_err();
        assert!(other.description.contains("4 partitions"), "{other:?}");
        for bad in ["", "!!", "AQ", &text[..text.len() - 2]] {
            assert!(Cursor::decode("cursor", bad, 4).is_err(), "{bad}");
        }
        // Every partition of a default deployment, a few bytes each.
        let wide = Cursor {
            positions: (0..1024)
                .map(|i| Some((1_796_000_000_000 + i * 37, i % 3)))
                .collect(),
        };
        let text = wide.encode();
        assert!(text.len() < 5000, "{}", text.len());
        assert_eq!(Cursor::decode("c", &text, 1024).unwrap(), wide);
        let mut sparse = vec![None; 1024];
        sparse[787] = Some((1_796_000_000_000, 0));
        let sparse = Cursor { positions: sparse };
        let text = sparse.encode();
        assert!(text.len() < 30, "{text}");
        assert_eq!(Cursor::decode("c", &text, 1024).unwrap(), sparse);
    }
}
