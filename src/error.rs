//! usher's one error type and its one mapping to gRPC: a status code, a stable
//! `ErrorInfo` reason, and typed details. The HTTP status of the REST shim is derived
//! from the gRPC code here too ([`http_status`]), so the two can never drift.
//!
//! Internal causes (store replies, connection errors) are logged where they are mapped
//! and never reach a client.

use prost::Message;
use tonic::{Code, Status};
use tonic_types::pb;

pub use crate::ids::FieldViolation;
use crate::proto;

/// The `ErrorInfo.domain` of every error usher returns.
pub const ERROR_DOMAIN: &str = "usher";

/// Why the entitlement refused playback. Each has a stable `ErrorInfo` reason; the
/// entitlement services answer with the same words (see `docs/entitlement-http.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The user's plan does not allow playback (no plan, zero seats), for a reason the
    /// entitlement did not name.
    Entitlement,
    /// The title is not available to this user.
    Content,
    /// The viewer's region is not allowed.
    Geo,
    /// The title is restricted to some regions and the request did not say where the
    /// viewer is.
    RegionRequired,
    /// The account has no active subscription.
    NoSubscription,
    /// The user's plan does not include this title.
    PlanExcludesContent,
    /// The profile may not watch this title (parental rules).
    ProfileRestricted,
    /// The account is suspended.
    AccountSuspended,
    /// The user's plan does not allow this kind of device.
    DeviceNotAllowed,
    /// The title's availability window has not opened yet.
    NotYetAvailable,
    /// The title's availability window has closed.
    Expired,
}

impl Denial {
    const ALL: [Denial; 11] = [
        Denial::Entitlement,
        Denial::Content,
        Denial::Geo,
        Denial::RegionRequired,
        Denial::NoSubscription,
        Denial::PlanExcludesContent,
        Denial::ProfileRestricted,
        Denial::AccountSuspended,
        Denial::DeviceNotAllowed,
        Denial::NotYetAvailable,
        Denial::Expired,
    ];

    /// The stable `ErrorInfo` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::Entitlement => "ENTITLEMENT_DENIED",
            Denial::Content => "CONTENT_UNAVAILABLE",
            Denial::Geo => "GEO_BLOCKED",
            Denial::RegionRequired => "REGION_REQUIRED",
            Denial::NoSubscription => "NO_SUBSCRIPTION",
            Denial::PlanExcludesContent => "PLAN_EXCLUDES_CONTENT",
            Denial::ProfileRestricted => "PROFILE_RESTRICTED",
            Denial::AccountSuspended => "ACCOUNT_SUSPENDED",
            Denial::DeviceNotAllowed => "DEVICE_NOT_ALLOWED",
            Denial::NotYetAvailable => "NOT_YET_AVAILABLE",
            Denial::Expired => "EXPIRED",
        }
    }

    /// Whether it refuses the user everything, not just this title, region or device.
    pub fn is_user_wide(self) -> bool {
        matches!(
            self,
            Denial::Entitlement | Denial::NoSubscription | Denial::AccountSuspended
        )
    }

    /// The denial a reason names, if it is one of usher's.
    pub fn from_reason(reason: &str) -> Option<Denial> {
        Self::ALL.into_iter().find(|d| d.reason() == reason)
    }
}

/// Everything that can go wrong in a call, typed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// The request body is not a well-formed message of the method's request type.
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    #[error("{resource} not found")]
    NotFound { resource: String },
    /// Over the seat limit, with every holder (the detail lists the first that fit).
    #[error("concurrency limit of {limit} reached")]
    ConcurrencyLimitReached {
        limit: u32,
        holders: Vec<proto::SeatHolder>,
    },
    /// Over a rate limit: a user's creates, or a service's requests.
    #[error("rate limited; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: std::time::Duration },
    #[error("playback not allowed")]
    Denied(Denial),
    /// The session is over; its final state when its record is still kept.
    #[error("session has ended")]
    SessionEnded { state: Option<proto::SessionState> },
    #[error("token expired")]
    TokenExpired,
    /// The cause is for the log, never for the client.
    #[error("token invalid: {0}")]
    TokenInvalid(&'static str),
    #[error("missing or invalid credentials")]
    Unauthenticated,
    #[error("the caller may not call this method")]
    PermissionDenied,
    #[error(
        "this method is called by a device with its playback token (authorization: Bearer <playback token>); a service credential may not act for a device"
    )]
    PlaybackTokenRequired,
    #[error("stale seat generation")]
    StaleGeneration,
    #[error("request_id was already used for a different request")]
    RequestIdReused,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("the embedded store is full: {0}")]
    StoreFull(String),
    #[error("too many health watch streams on this {0}: close one, or poll with Check")]
    TooManyWatches(&'static str),
    #[error("too many device streams on this {scope} (at most {limit}): try again later")]
    TooManyStreams { limit: usize, scope: &'static str },
    #[error("entitlement provider unavailable: {0}")]
    EntitlementUnavailable(String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("cancelled by the client")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
    /// No signed manifest URL can be given for the title: usher has no origins, or none
    /// serves it.
    #[error("no manifest URL: {0}")]
    ManifestUnavailable(String),
}

impl Error {
    /// One bad field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC code, and the stable `ErrorInfo` reason.
    pub fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Error::MalformedRequest(_) => (Code::InvalidArgument, "MALFORMED_REQUEST"),
            Error::NotFound { .. } => (Code::NotFound, "NOT_FOUND"),
            Error::ConcurrencyLimitReached { .. } => {
                (Code::ResourceExhausted, "CONCURRENCY_LIMIT_REACHED")
            }
            Error::Denied(Denial::RegionRequired) => {
                (Code::InvalidArgument, Denial::RegionRequired.reason())
            }
            Error::Denied(denial) => (Code::PermissionDenied, denial.reason()),
            Error::RateLimited { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
            Error::SessionEnded { .. } => (Code::FailedPrecondition, "SESSION_ENDED"),
            Error::TokenExpired => (Code::Unauthenticated, "TOKEN_EXPIRED"),
            Error::TokenInvalid(_) => (Code::Unauthenticated, "TOKEN_INVALID"),
            Error::Unauthenticated => (Code::Unauthenticated, "UNAUTHENTICATED"),
            Error::PermissionDenied => (Code::PermissionDenied, "PERMISSION_DENIED"),
            Error::PlaybackTokenRequired => (Code::PermissionDenied, "PLAYBACK_TOKEN_REQUIRED"),
            Error::StaleGeneration => (Code::FailedPrecondition, "STALE_GENERATION"),
            Error::RequestIdReused => (Code::AlreadyExists, "REQUEST_ID_REUSED"),
            Error::Unavailable(_) => (Code::Unavailable, "STORE_UNAVAILABLE"),
            Error::StoreFull(_) => (Code::ResourceExhausted, "STORE_FULL"),
            Error::TooManyWatches(_) => (Code::ResourceExhausted, "TOO_MANY_WATCHES"),
            Error::TooManyStreams { .. } => (Code::ResourceExhausted, "TOO_MANY_STREAMS"),
            Error::EntitlementUnavailable(_) => (Code::Unavailable, "ENTITLEMENT_UNAVAILABLE"),
            Error::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            Error::Cancelled => (Code::Cancelled, "CANCELLED"),
            Error::Internal(_) => (Code::Internal, "INTERNAL"),
            Error::ManifestUnavailable(_) => (Code::FailedPrecondition, "MANIFEST_UNAVAILABLE"),
        }
    }

    /// What the client is told. Internal causes stay out of it.
    fn client_message(&self) -> String {
        match self {
            Error::InvalidArgument(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                format!("invalid request: {}", fields.join(", "))
            }
            Error::Unavailable(_) => "store unavailable, retry with backoff".to_owned(),
            Error::StoreFull(_) => {
                "the embedded store holds as many live sessions as it may".to_owned()
            }
            Error::MalformedRequest(_) => {
                "malformed request: the body is not a valid message of the method's request type"
                    .to_owned()
            }
            Error::Denied(Denial::RegionRequired) => {
                "this title is restricted to some regions: the request must give the viewer's region"
                    .to_owned()
            }
            Error::EntitlementUnavailable(_) => {
                "entitlement provider unavailable, retry with backoff".to_owned()
            }
            Error::Internal(_) => "internal error".to_owned(),
            Error::TokenInvalid(_) => "token invalid".to_owned(),
            other => other.to_string(),
        }
    }
}

fn any<M: Message>(type_name: &str, message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let (code, reason) = error.code_and_reason();
        match &error {
            Error::Unavailable(cause) | Error::EntitlementUnavailable(cause) => {
                tracing::warn!(reason, cause = %cause, "dependency unavailable");
            }
            Error::Internal(cause) => tracing::error!(cause = %cause, "internal error"),
            Error::MalformedRequest(cause) => tracing::debug!(cause = %cause, "malformed request"),
            Error::StoreFull(cause) => tracing::warn!(cause = %cause, "embedded store full"),
            _ => {}
        }
        let mut metadata = std::collections::HashMap::new();
        let mut details = Vec::new();
        match &error {
            Error::InvalidArgument(violations) => {
                let bad_request = pb::BadRequest {
                    field_violations: violations
                        .iter()
                        .map(|v| pb::bad_request::FieldViolation {
                            field: v.field.clone(),
                            description: v.description.clone(),
                            ..Default::default()
                        })
                        .collect(),
                };
                details.push(any("google.rpc.BadRequest", &bad_request));
            }
            Error::ConcurrencyLimitReached { limit, holders } => {
                metadata.insert("limit".to_owned(), limit.to_string());
                metadata.insert("holder_count".to_owned(), holders.len().to_string());
                details.push(any(
                    "usher.v1.ConcurrencyLimitDetail",
                    &limit_detail(*limit, holders),
                ));
            }
            Error::SessionEnded { state: Some(state) } => {
                metadata.insert("state".to_owned(), state.as_str_name().to_owned());
            }
            Error::SessionEnded { state: None } => {}
            Error::NotFound { resource } => {
                metadata.insert("resource".to_owned(), resource.clone());
            }
            Error::TooManyStreams { limit, scope } => {
                metadata.insert("limit".to_owned(), limit.to_string());
                metadata.insert("scope".to_owned(), (*scope).to_owned());
            }
            Error::RateLimited { retry_after } => {
                let retry_info = pb::RetryInfo {
                    retry_delay: Some(prost_types::Duration {
                        seconds: retry_after.as_secs() as i64,
                        nanos: retry_after.subsec_nanos() as i32,
                    }),
                };
                details.push(any("google.rpc.RetryInfo", &retry_info));
            }
            Error::Denied(_)
            | Error::MalformedRequest(_)
            | Error::TokenExpired
            | Error::TokenInvalid(_)
            | Error::Unauthenticated
            | Error::PermissionDenied
            | Error::PlaybackTokenRequired
            | Error::StoreFull(_)
            | Error::TooManyWatches(_)
            | Error::StaleGeneration
            | Error::RequestIdReused
            | Error::Unavailable(_)
            | Error::EntitlementUnavailable(_)
            | Error::DeadlineExceeded
            | Error::Cancelled
            | Error::Internal(_)
            | Error::ManifestUnavailable(_) => {}
        }
        let error_info = pb::ErrorInfo {
            reason: reason.to_owned(),
            domain: ERROR_DOMAIN.to_owned(),
            metadata,
        };
        details.insert(0, any("google.rpc.ErrorInfo", &error_info));
        let message = error.client_message();
        let status = pb::Status {
            code: code as i32,
            message: message.clone(),
            details,
        };
        Status::with_details(code, message, status.encode_to_vec().into())
    }
}

/// A status the transport made (tonic answers an unknown method, an unsupported
/// encoding or an oversized message itself, without details) in usher's form: an
/// `ErrorInfo` with a stable reason, like every other refusal. An oversized message
/// becomes `RESOURCE_EXHAUSTED` / `MESSAGE_TOO_LARGE`, as the gRPC spec has it (tonic says
/// `OUT_OF_RANGE`).
pub fn transport_status(status: &Status) -> Status {
    let (code, reason) = match status.code() {
        Code::OutOfRange => (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
        Code::Unimplemented => (Code::Unimplemented, "UNIMPLEMENTED"),
        Code::Cancelled => (Code::Cancelled, "CANCELLED"),
        Code::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        Code::InvalidArgument => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        Code::ResourceExhausted => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
        Code::Unavailable => (Code::Unavailable, "UNAVAILABLE"),
        Code::Unauthenticated => (Code::Unauthenticated, "UNAUTHENTICATED"),
        Code::PermissionDenied => (Code::PermissionDenied, "PERMISSION_DENIED"),
        Code::NotFound => (Code::NotFound, "NOT_FOUND"),
        Code::AlreadyExists => (Code::AlreadyExists, "ALREADY_EXISTS"),
        Code::FailedPrecondition => (Code::FailedPrecondition, "FAILED_PRECONDITION"),
        Code::Aborted => (Code::Aborted, "ABORTED"),
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => (Code::Internal, "INTERNAL"),
    };
    let message = status.message().to_owned();
    let error_info = pb::ErrorInfo {
        reason: reason.to_owned(),
        domain: ERROR_DOMAIN.to_owned(),
        metadata: Default::default(),
    };
    let details = pb::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![any("google.rpc.ErrorInfo", &error_info)],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// At most this many holders are listed in a `ConcurrencyLimitDetail`: as many as a
/// player can offer to stop.
pub const MAX_DETAIL_HOLDERS: usize = 10;
/// And at most this many bytes of them, encoded: with the rest of the status, base64 in
/// the `grpc-status-details-bin` trailer, the error stays well under 8 KiB at every
/// limit and id length (standard clients refuse trailers past 8 or 16 KiB and then show
/// a transport error instead of the reason).
pub const DETAIL_HOLDERS_BUDGET: usize = 4096;

/// The limit detail: the oldest holders that fit the bounds, and how many there are.
fn limit_detail(limit: u32, holders: &[proto::SeatHolder]) -> proto::ConcurrencyLimitDetail {
    let mut listed = Vec::new();
    let mut bytes = 0;
    for holder in holders.iter().take(MAX_DETAIL_HOLDERS) {
        bytes += holder.encoded_len() + 3;
        if bytes > DETAIL_HOLDERS_BUDGET {
            break;
        }
        listed.push(holder.clone());
    }
    proto::ConcurrencyLimitDetail {
        limit: i32::try_from(limit).unwrap_or(i32::MAX),
        holders: listed,
        holder_count: i32::try_from(holders.len()).unwrap_or(i32::MAX),
    }
}

/// The HTTP status for a gRPC code, as grpc-gateway maps them.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::Unknown => 500,
        Code::InvalidArgument => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists => 409,
        Code::PermissionDenied => 403,
        Code::ResourceExhausted => 429,
        Code::FailedPrecondition => 400,
        Code::Aborted => 409,
        Code::OutOfRange => 400,
        Code::Unimplemented => 501,
        Code::Internal => 500,
        Code::Unavailable => 503,
        Code::DataLoss => 500,
        Code::Unauthenticated => 401,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_every_field() {
        let status = Status::from(Error::InvalidArgument(vec![
            FieldViolation::new("parent", "required"),
            FieldViolation::new("device.id", "required"),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let decoded = pb::Status::decode(status.details()).unwrap();
        assert_eq!(
            decoded.details[0].type_url,
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        let bad = pb::BadRequest::decode(decoded.details[1].value.as_slice()).unwrap();
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["parent", "device.id"]);
    }

    #[test]
    fn internal_causes_stay_out_of_the_message() {
        let status = Status::from(Error::Unavailable("connection refused 10.0.0.7".into()));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("10.0.0.7"));
    }

    #[test]
    fn http_status_follows_grpc_gateway() {
        // grpc-gateway's runtime.HTTPStatusFromCode, code by code.
        let table = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, status) in table {
            assert_eq!(http_status(code), status, "{code:?}");
        }
        // Every code is in the table.
        for number in 0..=16 {
            assert!(
                table.iter().any(|(code, _)| *code as i32 == number),
                "{number}"
            );
        }
    }

    /// Every refusal the transport makes ends with an ErrorInfo, and an oversized
    /// message is RESOURCE_EXHAUSTED as the gRPC spec has it.
    #[test]
    fn transport_statuses_get_error_info() {
        let status = transport_status(&Status::out_of_range("decoded message length too large"));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let decoded = pb::Status::decode(status.details()).unwrap();
        let info = pb::ErrorInfo::decode(decoded.details[0].value.as_slice()).unwrap();
        assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
        for number in 1..=16 {
            let status = transport_status(&Status::new(Code::from(number), "x"));
            assert_ne!(status.code(), Code::Ok);
            assert!(!status.details().is_empty(), "{number}");
        }
    }
}

/// Collects every bad field of a request, so one answer names them all.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records why it is bad.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        result.map_err(|violation| self.0.push(violation)).ok()
    }

    /// Records a bad field.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// `InvalidArgument` naming every bad field, if there was one.
    pub fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}
