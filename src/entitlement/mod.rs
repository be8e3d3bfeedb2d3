//! Entitlement: may this user play this title here, and with how many seats?
//!
//! usher asks an [`EntitlementProvider`]. The embedded default is [`StaticPolicy`], a
//! policy from flags or a TOML file. Providers that call an identity or catalogue service
//! over the network fit the same trait: they are async and report their own outages as
//! `Error::EntitlementUnavailable`.

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

/// Decides entitlement. Implementations must answer within the request deadline.
#[async_trait]
pub trait EntitlementProvider: Send + Sync + 'static {
    async fn check(&self, query: EntitlementQuery<'_>) -> Result<Entitlement, Error>;
}
