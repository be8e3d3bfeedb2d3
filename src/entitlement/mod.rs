//! Entitlement: may this user play this title here, and with how many seats?
//!
//! usher asks an [`EntitlementProvider`]. The embedded default is [`StaticPolicy`], a
//! policy from flags or a TOML file. Providers that call an identity or catalogue service
//! over the network fit the same trait: they are async and report their own outages as
//! [`EntitlementError`], which callers see as `UNAVAILABLE` / `ENTITLEMENT_UNAVAILABLE`.

mod static_policy;

use async_trait::async_trait;

pub use self::static_policy::{PolicyError, PolicyFile, StaticPolicy};
use crate::error::{Denial, Error};
use crate::ids::{ContentId, ProfileId, UserId};

/// The most seats one user can have; keeps every seat script's work bounded.
pub const MAX_SEAT_LIMIT: u32 = 100;

/// What a request for a region-restricted title that gives no region gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingRegion {
    /// Refused with `REGION_REQUIRED` (fail closed).
    #[default]
    Refuse,
    /// Allowed, as if the viewer were in an allowed region (fail open).
    Allow,
}

/// What is being asked. `content` and `region` are absent when the caller only asks about
/// seats.
#[derive(Clone, Copy, Debug)]
pub struct EntitlementQuery<'a> {
    pub user: &'a UserId,
    pub profile: Option<&'a ProfileId>,
    pub content: Option<&'a ContentId>,
    /// ISO 3166-1 alpha-2, upper case.
    pub region: Option<&'a str>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entitlement {
    Allowed {
        /// How many sessions may hold seats at once, at most [`MAX_SEAT_LIMIT`].
        seat_limit: u32,
    },
    Denied(Denial),
}

/// A provider could not answer. A refusal is an answer (`Entitlement::Denied`), never
/// this.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntitlementError {
    /// The services that decide were unreachable, too slow, or answered nonsense.
    #[error("entitlement unavailable: {0}")]
    Unavailable(String),
}

impl From<EntitlementError> for Error {
    fn from(error: EntitlementError) -> Error {
        match error {
            EntitlementError::Unavailable(cause) => Error::EntitlementUnavailable(cause),
        }
    }
}

/// Decides entitlement. Implementations must answer within the request deadline.
#[async_trait]
pub trait EntitlementProvider: Send + Sync + 'static {
    async fn check(&self, query: EntitlementQuery<'_>) -> Result<Entitlement, EntitlementError>;
}
