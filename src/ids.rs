//! Identifiers and resource names, and the field parsers every request shares (free
//! text, regions), each naming its field in a [`FieldViolation`]. A request's strings
//! become these types at the edge (parse, don't validate), so the rest of usher never
//! sees an unchecked id. This is the bottom layer: it imports nothing of usher.
//!
//! Ids are 1 to 128 characters of `[A-Za-z0-9._:-]`, and not `.` or `..` ([`ID_RULE`],
//! stated identically in the proto comments and the README). That fits the ids real
//! platforms issue: UUIDs, numeric ids, MAC addresses (`3c:22:fb:01:02:03`) and
//! vendor-prefixed ids (`roku:1234`). Nothing in it can alter a URL path (no `/`, `?`,
//! `#`, `%`, no dot segments) or a Redis key: ids never contain `/`, `{` or `}`, and the
//! Redis keys put an id last (or join two ids with `/`), so a `:` inside one cannot be
//! confused with the key's own separators.

use std::fmt;

/// One bad field of a request: the protobuf field path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// The id rule, as error messages state it.
pub const ID_RULE: &str = "1 to 128 characters of letters, digits and . _ : - (not . or ..)";

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn check_id(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "required"));
    }
    if value.len() > MAX_ID_LEN || !value.chars().all(is_id_char) || value == "." || value == ".." {
        return Err(FieldViolation::new(field, format!("must be {ID_RULE}")));
    }
    Ok(())
}

/// Free text: at most `max` characters, no control characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<String, FieldViolation> {
    if value.chars().count() > max {
        return Err(FieldViolation::new(
            field,
            format!("at most {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value.to_owned())
}

/// An ISO 3166-1 alpha-2 region in either case, upper-cased; or empty.
pub fn region(field: &str, value: &str) -> Result<String, FieldViolation> {
    if value.is_empty() || (value.len() == 2 && value.bytes().all(|b| b.is_ascii_alphabetic())) {
        Ok(value.to_ascii_uppercase())
    } else {
        Err(FieldViolation::new(
            field,
            "must be an ISO 3166-1 alpha-2 code (two letters, either case)",
        ))
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Shared text: a clone (a record's key, an index entry, an event) is a
        /// reference count, not another copy.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Parses `value`, naming `field` in the error.
            pub fn parse(field: &str, value: &str) -> Result<Self, FieldViolation> {
                check_id(field, value)?;
                Ok(Self(value.into()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A user (an account): the unit that owns concurrency seats.
    UserId
);
id_type!(
    /// A playback session of a user.
    SessionId
);
id_type!(
    /// A device, chosen by the client and stable across its sessions.
    DeviceId
);
id_type!(
    /// A viewer profile within an account.
    ProfileId
);
id_type!(
    /// A title.
    ContentId
);
id_type!(
    /// A caller's idempotency key for `CreateSession`.
    RequestId
);

/// Crockford's base32 alphabet, lower case: digits and letters but `i l o u`.
pub(crate) const BASE32: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

impl SessionId {
    /// A new session id: a UUIDv7 (a millisecond timestamp and 74 random bits) written
    /// as 26 characters of Crockford's base32, so ids sort by creation time as text, and
    /// each of the keys and index entries that name a session (ADR 0002) carries 10
    /// bytes fewer than the hyphenated form.
    pub fn generate() -> Self {
        let mut bits = uuid::Uuid::now_v7().as_u128();
        let mut text = [0u8; 26];
        for digit in text.iter_mut().rev() {
            *digit = BASE32[(bits & 31) as usize];
            bits >>= 5;
        }
        Self(String::from_utf8_lossy(&text).into())
    }
}

/// `value` cut at every `separator` into exactly `N` parts, or `None`.
pub fn split_exact<const N: usize>(value: &str, separator: char) -> Option<[&str; N]> {
    let mut parts = value.split(separator);
    let mut out = [""; N];
    for slot in &mut out {
        *slot = parts.next()?;
    }
    parts.next().is_none().then_some(out)
}

/// `users/{user}`.
pub fn parse_user_name(field: &str, value: &str) -> Result<UserId, FieldViolation> {
    let malformed = || FieldViolation::new(field, "must be users/{user}");
    let user = value.strip_prefix("users/").ok_or_else(malformed)?;
    if user.contains('/') {
        return Err(malformed());
    }
    UserId::parse(field, user)
}

/// `users/{user}/concurrency`.
pub fn parse_concurrency_name(field: &str, value: &str) -> Result<UserId, FieldViolation> {
    let malformed = || FieldViolation::new(field, "must be users/{user}/concurrency");
    let user = value
        .strip_prefix("users/")
        .and_then(|rest| rest.strip_suffix("/concurrency"))
        .ok_or_else(malformed)?;
    if user.contains('/') {
        return Err(malformed());
    }
    UserId::parse(field, user)
}

/// The name of the user's seats resource.
pub fn concurrency_name(user: &UserId) -> String {
    format!("users/{user}/concurrency")
}

/// `users/{user}/sessions/{session}`: the user is part of the name so every call finds
/// the user's partition without a lookup.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionName {
    pub user: UserId,
    pub session: SessionId,
}

impl SessionName {
    /// Parses `users/{user}/sessions/{session}`, naming `field` in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldViolation> {
        let malformed = || FieldViolation::new(field, "must be users/{user}/sessions/{session}");
        let Some(["users", user, "sessions", session]) = split_exact(value, '/') else {
            return Err(malformed());
        };
        Ok(Self {
            user: UserId::parse(field, user)?,
            session: SessionId::parse(field, session)?,
        })
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "users/{}/sessions/{}", self.user, self.session)
    }
}

impl SessionName {
    /// Whether `name` is this session's resource name, without building it.
    pub fn is(&self, name: &str) -> bool {
        name.strip_prefix("users/")
            .and_then(|rest| rest.strip_prefix(self.user.as_str()))
            .and_then(|rest| rest.strip_prefix("/sessions/"))
            .is_some_and(|rest| rest == self.session.as_str())
    }
}

/// Longest position accepted: a week of playback.
const MAX_POSITION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A title's duration as a player reports it: a position's bounds, and 0 (a live
/// stream, or a player that does not know yet) the same as unset.
pub fn title_duration(
    field: &str,
    value: Option<&prost_types::Duration>,
) -> Result<Option<u64>, FieldViolation> {
    Ok(position(field, value)?.filter(|ms| *ms > 0))
}

/// A playback position: not negative, at most a week, in milliseconds.
pub fn position(
    field: &str,
    value: Option<&prost_types::Duration>,
) -> Result<Option<u64>, FieldViolation> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.seconds < 0 || value.nanos < 0 {
        return Err(FieldViolation::new(field, "must not be negative"));
    }
    if value.nanos >= 1_000_000_000 {
        return Err(FieldViolation::new(field, "nanos must be below 1e9"));
    }
    let d = std::time::Duration::new(value.seconds as u64, value.nanos as u32);
    if d > MAX_POSITION {
        return Err(FieldViolation::new(field, "must be at most 168h"));
    }
    Ok(Some(d.as_millis() as u64))
}

/// A listing's `page_size`: 0 means `default`, more than `max` means `max`, and a
/// negative size is refused.
pub fn page_size(
    field: &str,
    value: i32,
    default: usize,
    max: usize,
) -> Result<usize, FieldViolation> {
    match value {
        0 => Ok(default),
        n if n < 0 => Err(FieldViolation::new(field, "must not be negative")),
        n => Ok((n as usize).min(max)),
    }
}

/// A page token as clients see it: base64url (no padding) of its plain text.
pub fn seal_page_token(plain: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
}

/// The plain text of a page token `seal_page_token` made, or `None`.
pub fn open_page_token(value: &str) -> Option<String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// A listing's `page_token`: none when empty, else what `decode` makes of it.
pub fn page_token<T>(
    field: &str,
    value: &str,
    decode: impl FnOnce(&str, &str) -> Result<T, FieldViolation>,
) -> Result<Option<T>, FieldViolation> {
    if value.is_empty() {
        Ok(None)
    } else {
        decode(field, value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_title_duration_of_zero_is_unknown_and_a_negative_one_is_refused() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(title_duration("duration", d(0, 0).as_ref()), Ok(None));
        assert_eq!(title_duration("duration", None), Ok(None));
        assert_eq!(
            title_duration("duration", d(5400, 500_000_000).as_ref()),
            Ok(Some(5_400_500))
        );
        let refused = title_duration("duration", d(-1, 0).as_ref()).unwrap_err();
        assert_eq!(refused.field, "duration");
    }

    #[test]
    fn generated_session_ids_are_short_valid_unique_and_sort_by_creation_time() {
        let first = SessionId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later: Vec<SessionId> = (0..1000).map(|_| SessionId::generate()).collect();
        assert_eq!(first.as_str().len(), 26);
        assert!(SessionId::parse("f", first.as_str()).is_ok());
        assert!(
            later
                .iter()
                .all(|id| id > &first && id.as_str().len() == 26)
        );
        let distinct: std::collections::HashSet<_> = later.iter().collect();
        assert_eq!(distinct.len(), later.len());
        // The leading digits are the UUIDv7's timestamp: 48 bits from the 3rd bit on.
        let uuid = uuid::Uuid::now_v7().as_u128();
        let millis = (uuid >> 80) as u64;
        let decoded = first.as_str().bytes().fold(0u128, |n, c| {
            n << 5 | BASE32.iter().position(|&d| d == c).unwrap() as u128
        });
        let first_millis = (decoded >> 80) as u64;
        assert!(millis >= first_millis && millis - first_millis < 60_000);
    }

    #[test]
    fn session_names_round_trip() {
        let name = SessionName::parse("name", "users/u-1/sessions/s.2").unwrap();
        assert_eq!(name.user.as_str(), "u-1");
        assert_eq!(name.session.as_str(), "s.2");
        assert_eq!(name.to_string(), "users/u-1/sessions/s.2");
        assert!(name.is("users/u-1/sessions/s.2"));
        for other in [
            "users/u-1/sessions/s.22",
            "users/u-1/sessions/s",
            "users/u-12/sessions/s.2",
            "users/u-1/session/s.2",
            "users/u-1sessions/s.2",
            "",
        ] {
            assert!(!name.is(other), "{other}");
        }
    }

    #[test]
    fn malformed_names_name_the_field() {
        for bad in [
            "",
            "users/u",
            "users//sessions/s",
            "users/u/sessions/",
            "users/u/sessions/s/x",
            "user/u/sessions/s",
            "users/u~x/sessions/s",
            "users/../sessions/s",
            "users/u/sessions/.",
            "users/u/sessions/s s",
        ] {
            let violation = SessionName::parse("name", bad).unwrap_err();
            assert_eq!(violation.field, "name", "{bad}");
        }
    }

    /// Ids that real platforms issue, and ids that could alter a key or a path.
    #[test]
    fn real_world_ids_are_accepted_and_dangerous_ones_refused() {
        let accepted = [
            "0f8fad5b-d9cb-469f-a165-70867728950e", // UUID
            "018c2a4e-7b3f-7c1a-9d2e-3f4a5b6c7d8e", // UUIDv7
            "123456789012",                         // numeric account id
            "3c:22:fb:01:02:03",                    // MAC address
            "3C-22-FB-01-02-03",                    // MAC address, Windows style
            "roku:1234",                            // vendor-prefixed
            "amzn1.account.AEXAMPLE123",            // Amazon-style dotted id
            "tv:1",
            "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
            "user_42.profile-main",
            "...",
            "a",
        ];
        for id in accepted {
            assert!(DeviceId::parse("device.id", id).is_ok(), "{id} refused");
            assert!(UserId::parse("parent", id).is_ok(), "{id} refused");
        }
        let refused = [
            "", ".", "..", "a/b", "a b", "a{b}", "{17}", "a%2Fb", "a?b", "a#b", "a~b", "a*b",
            "a\\b", "a\nb", "ä", "a@b", "a+b", "a,b", "a|b",
        ];
        for id in refused {
            let violation = DeviceId::parse("device.id", id).unwrap_err();
            assert_eq!(violation.field, "device.id");
            if !id.is_empty() {
                assert!(
                    violation.description.contains(ID_RULE),
                    "{id}: {violation:?}"
                );
            }
        }
        assert!(DeviceId::parse("d", &"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn ids_reject_delimiters_and_oversize() {
        assert!(UserId::parse("f", "a/b").is_err());
        assert!(UserId::parse("f", "a/b").is_err());
        assert!(UserId::parse("f", &"a".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(UserId::parse("f", &"a".repeat(MAX_ID_LEN)).is_ok());
        assert_eq!(parse_user_name("p", "users/x").unwrap().as_str(), "x");
        assert!(parse_user_name("p", "users/x/y").is_err());
        assert_eq!(
            parse_concurrency_name("n", "users/x/concurrency")
                .unwrap()
                .as_str(),
            "x"
        );
        assert!(parse_concurrency_name("n", "users/x/y/concurrency").is_err());
    }
}
