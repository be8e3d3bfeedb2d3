//! Decoding script replies and stream entries into typed values. Anything that does not
//! decode is `StoreError::Corrupt`, never a panic.

use std::borrow::Cow;

use fred::types::Value;

use crate::ids::{ContentId, DeviceId, ProfileId, SessionId, SessionName, UserId};
use crate::model::{
    ClientInfo, Device, DeviceType, EndReason, PlaybackState, Progress, Session, SessionState,
    Termination,
};
use crate::store::{Beat, Event, EventKind, StoreError};

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// The first element of every script's reply (the prelude's header lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReplyCode {
    /// 0: done; the rest of the reply is the script's answer.
    Done,
    /// 1: the remembered answer to a repeated request id.
    Replayed,
    /// -1: no such session for this user.
    NotFound,
    /// -2: the session has ended; its record follows.
    SessionEnded,
    /// -3: over the limit; the limit and the holders' records follow.
    LimitReached,
    /// -4: the call names another seat generation.
    StaleGeneration,
    /// -5: the request id was used for a different request.
    RequestIdReused,
    /// -6: the script needs the records of the session ids that follow in its KEYS;
    /// it wrote nothing.
    RecordsNeeded,
    /// -7: a device call needs its session's profile (the id follows) to write its
    /// progress; it wrote nothing.
    ProfileNeeded,
    /// -8: over the create rate limit; the milliseconds until a create is admitted
    /// follow; nothing was written.
    RateLimited,
}

impl TryFrom<i64> for ReplyCode {
    type Error = StoreError;

    fn try_from(code: i64) -> Result<Self, StoreError> {
        Ok(match code {
            0 => ReplyCode::Done,
            1 => ReplyCode::Replayed,
            -1 => ReplyCode::NotFound,
            -2 => ReplyCode::SessionEnded,
            -3 => ReplyCode::LimitReached,
            -4 => ReplyCode::StaleGeneration,
            -5 => ReplyCode::RequestIdReused,
            -6 => ReplyCode::RecordsNeeded,
            -7 => ReplyCode::ProfileNeeded,
            -8 => ReplyCode::RateLimited,
            other => return Err(corrupt(format!("unknown script reply code {other}"))),
        })
    }
}

pub(super) fn int_at(reply: &[Value], index: usize) -> Result<i64, StoreError> {
    reply
        .get(index)
        .and_then(Value::as_i64)
        .ok_or_else(|| corrupt(format!("expected an integer at {index}")))
}

pub(super) fn text_at(reply: &[Value], index: usize) -> Result<String, StoreError> {
    str_at(reply, index).map(Cow::into_owned)
}

/// The text at `index`, borrowed from the reply where it holds it as text.
fn str_at(reply: &[Value], index: usize) -> Result<Cow<'_, str>, StoreError> {
    reply
        .get(index)
        .and_then(Value::as_str)
        .ok_or_else(|| corrupt(format!("expected text at {index}")))
}

/// A record's fields in the order a reply gives them: the session id, then the record as
/// stored (`record` in the prelude), whose `h` packs [`LIVE_FIELDS`].
pub(super) const RECORD_FIELDS: [&str; 18] = [
    "id", "h", "u", "g", "ct", "du", "d", "c", "p", "dt", "dn", "ip", "ua", "rg", "et", "er", "em",
    "eb",
];
/// What device calls change, packed in a record's `h` (`packed` in the prelude).
pub(super) const LIVE_FIELDS: [&str; 9] = ["st", "dl", "hb", "pos", "ps", "pt", "he", "dr", "pw"];

/// A session record at `index`: one text, its fields joined by `\x1f` ([`RECORD_FIELDS`];
/// fields left out at the end are empty). Its texts are read where the reply holds them:
/// only what the session keeps is copied.
pub(super) fn session_at(reply: &[Value], index: usize) -> Result<Session, StoreError> {
    let text = str_at(reply, index)?;
    let mut fields = Vec::with_capacity(RECORD_FIELDS.len() + LIVE_FIELDS.len());
    for (&name, value) in RECORD_FIELDS.iter().zip(text.split('\x1f')) {
        if name == "h" {
            let live = LIVE_FIELDS.iter().zip(value.split(','));
            fields.extend(live.map(|(&name, value)| (Cow::Borrowed(name), Cow::Borrowed(value))));
        } else {
            fields.push((Cow::Borrowed(name), Cow::Borrowed(value)));
        }
    }
    decode_session(&Fields(fields))
}

/// A progress entry at `index`: `{content, pos, dur, done, updated_ms, device}`
/// (`progress_entry` in the prelude), of `user`'s `profile`.
pub(super) fn progress_at(
    reply: &[Value],
    index: usize,
    user: &UserId,
    profile: &ProfileId,
) -> Result<Progress, StoreError> {
    let Some(Value::Array(entry)) = reply.get(index) else {
        return Err(corrupt(format!("expected a progress entry at {index}")));
    };
    let number = |i: usize, what: &str| -> Result<u64, StoreError> {
        text_at(entry, i)?
            .parse()
            .map_err(|_| corrupt(format!("progress {what} is not a number")))
    };
    let content = text_at(entry, 0)?;
    let device = text_at(entry, 5)?;
    Ok(Progress {
        user: user.clone(),
        profile: profile.clone(),
        content: ContentId::parse("content", &content)
            .map_err(|_| corrupt(format!("bad content id {content:?}")))?,
        position_ms: number(1, "position")?,
        duration_ms: match text_at(entry, 2)?.as_str() {
            "" => None,
            _ => Some(number(2, "duration")?),
        },
        completed: text_at(entry, 3)? == "1",
        updated_ms: number(4, "update time")?,
        device: DeviceId::parse("device", &device)
            .map_err(|_| corrupt(format!("bad device id {device:?}")))?,
    })
}

/// A brief heartbeat's answer at `index`: `st, dl, pos, ps, hb, pt` (`device_call` in
/// the prelude).
pub(super) fn beat_at(reply: &[Value], index: usize) -> Result<Beat, StoreError> {
    let number = |offset: usize, what: &str| -> Result<u64, StoreError> {
        str_at(reply, index + offset)?
            .parse()
            .map_err(|_| corrupt(format!("{what} is not a number")))
    };
    let paused = str_at(reply, index + 5)?;
    Ok(Beat {
        state: stored(number(0, "state")?, SessionState::from_code, "state")?,
        deadline_ms: number(1, "deadline")?,
        position_ms: number(2, "position")?,
        playback_state: stored(
            number(3, "playback state")?,
            PlaybackState::from_code,
            "playback state",
        )?,
        last_heartbeat_ms: number(4, "last heartbeat")?,
        paused_ms: match paused.as_ref() {
            "" => None,
            text => Some(
                text.parse()
                    .map_err(|_| corrupt("pause time is not a number"))?,
            ),
        },
    })
}

/// A record's or an event's fields by name: a score of them, so a list read in order
/// (no map to build, no hashing).
struct Fields<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, value)| value.as_ref())
    }

    fn text(&self, field: &str) -> Result<&str, StoreError> {
        self.get(field)
            .ok_or_else(|| corrupt(format!("record without {field}")))
    }

    fn number(&self, field: &str) -> Result<u64, StoreError> {
        self.text(field)?
            .parse()
            .map_err(|_| corrupt(format!("record field {field} is not a number")))
    }

    fn optional_number(&self, field: &str) -> Result<Option<u64>, StoreError> {
        match self.get(field) {
            None | Some("") => Ok(None),
            Some(_) => self.number(field).map(Some),
        }
    }

    fn id<T>(
        &self,
        field: &str,
        parse: fn(&str, &str) -> Result<T, crate::error::FieldViolation>,
    ) -> Result<T, StoreError> {
        parse(field, self.text(field)?).map_err(|_| corrupt(format!("record field {field}")))
    }

    fn owned(&self, field: &str) -> String {
        self.get(field).unwrap_or_default().to_owned()
    }

    /// An end reason by its stored name; absent or empty is none.
    fn end_reason(&self, field: &str) -> Result<Option<EndReason>, StoreError> {
        match self.get(field) {
            None | Some("") => Ok(None),
            Some(name) => EndReason::parse(name)
                .map(Some)
                .ok_or_else(|| corrupt(format!("unknown end reason {name:?}"))),
        }
    }

    fn termination(&self, message: &str, by: &str) -> Termination {
        Termination {
            message: self.owned(message),
            by: self.owned(by),
        }
    }
}

/// A domain enum from its stored code.
fn stored<E>(value: u64, from_code: fn(u64) -> Option<E>, what: &str) -> Result<E, StoreError> {
    from_code(value).ok_or_else(|| corrupt(format!("unknown {what} {value}")))
}

fn decode_session(f: &Fields<'_>) -> Result<Session, StoreError> {
    Ok(Session {
        name: SessionName {
            user: f.id("u", UserId::parse)?,
            session: f.id("id", SessionId::parse)?,
        },
        profile: f.id("p", ProfileId::parse)?,
        content: f.id("c", ContentId::parse)?,
        device: Device {
            id: f.id("d", DeviceId::parse)?,
            kind: stored(f.number("dt")?, DeviceType::from_code, "device type")?,
            name: f.owned("dn"),
        },
        client: ClientInfo {
            ip_address: f.owned("ip"),
            user_agent: f.owned("ua"),
            region: f.owned("rg"),
        },
        state: stored(f.number("st")?, SessionState::from_code, "state")?,
        position_ms: f.number("pos")?,
        playback_state: stored(f.number("ps")?, PlaybackState::from_code, "playback state")?,
        generation: f.number("g")?,
        created_ms: f.number("ct")?,
        last_heartbeat_ms: f.number("hb")?,
        deadline_ms: f.number("dl")?,
        ended_ms: f.optional_number("et")?,
        end_reason: f.end_reason("er")?,
        termination: f.termination("em", "eb"),
        paused_ms: f.optional_number("pt")?,
    })
}

pub(super) fn decode_event(id: String, fields: Vec<(String, String)>) -> Result<Event, StoreError> {
    let f = Fields(
        fields
            .into_iter()
            .map(|(name, value)| (Cow::Owned(name), Cow::Owned(value)))
            .collect(),
    );
    Ok(Event {
        kind: EventKind::parse(f.text("type")?)
            .ok_or_else(|| corrupt(format!("unknown event type in {id}")))?,
        session: SessionName {
            user: f.id("user", UserId::parse)?,
            session: f.id("session", SessionId::parse)?,
        },
        generation: f.number("gen")?,
        device: f.id("device", DeviceId::parse)?,
        content: f.id("content", ContentId::parse)?,
        profile: f.id("profile", ProfileId::parse)?,
        position_ms: f.number("pos_ms")?,
        at_ms: f.number("at_ms")?,
        reason: f.end_reason("reason")?,
        termination: f.termination("message", "by"),
        id,
    })
}
