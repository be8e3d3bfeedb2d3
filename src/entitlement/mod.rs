//! Entitlement: may this user play this title here, on this device, with how many
//! seats, and under which playback rules?
//!
//! usher asks an [`EntitlementProvider`]. The embedded default is [`StaticPolicy`], a
//! policy from flags or a TOML file. [`HttpEntitlements`] asks the platform's identity
//! and content services over HTTP (the static policy first), with a cache, retries and a
//! circuit breaker per service. Providers report their own outages as
//! [`EntitlementError`], which callers see as `UNAVAILABLE` / `ENTITLEMENT_UNAVAILABLE`.

mod breaker;
mod cache;
mod http;
mod static_policy;

use std::collections::HashMap;

use async_trait::async_trait;
use serde::Deserialize;

pub use self::http::{DegradedMode, HttpEntitlements, HttpSettings, service_url};
pub use self::static_policy::{PolicyError, PolicyFile, StaticPolicy};
use crate::deadline::Deadline;
use crate::error::{Denial, Error};
use crate::ids::{ContentId, ProfileId, UserId};
use crate::manifest::ManifestPaths;
use crate::model::{DeviceType, DrmRule, PlaybackRules};
use crate::store::RateLimit;

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

/// What is being asked. `content`, `region` and `device` are absent when the caller only
/// asks about seats.
#[derive(Clone, Copy, Debug)]
pub struct EntitlementQuery<'a> {
    pub user: &'a UserId,
    pub profile: Option<&'a ProfileId>,
    pub content: Option<&'a ContentId>,
    /// ISO 3166-1 alpha-2, upper case.
    pub region: Option<&'a str>,
    pub device: Option<DeviceType>,
    /// When the caller must have its answer; a provider answers before it.
    pub deadline: Deadline,
}

impl<'a> EntitlementQuery<'a> {
    /// A seats-only question: no title, region or device.
    pub fn seats(user: &'a UserId, deadline: Deadline) -> Self {
        Self {
            user,
            profile: None,
            content: None,
            region: None,
            device: None,
            deadline,
        }
    }
}

/// What an allowed user gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// How many sessions may hold seats at once, at most [`MAX_SEAT_LIMIT`].
    pub seat_limit: u32,
    /// What the session's tokens carry for the edge and the license server.
    pub rules: PlaybackRules,
    /// Where the title's manifests are on its origin, when the content service said.
    pub manifest: Option<ManifestPaths>,
    /// The user's plan's own create rate limit (`Some(None)`: none); `None`: the
    /// server's (`--create-rate`).
    pub create_rate: Option<Option<RateLimit>>,
}

impl Grant {
    pub fn seats(seat_limit: u32) -> Self {
        Self {
            seat_limit,
            ..Self::default()
        }
    }
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entitlement {
    Allowed(Grant),
    Denied(Denial),
}

/// A plan's rules for devices, as a policy file or the identity service writes them.
/// Unknown fields are ignored, so a service may answer more than usher reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct DeviceRules {
    /// The device types the plan allows (`tv`, `mobile`, `tablet`, `web`, `console`,
    /// `set_top_box`, `desktop`); empty or absent: every type.
    #[serde(default)]
    pub allowed_types: Vec<String>,
    /// The highest resolution in lines per device type; the key `default` for the rest.
    #[serde(default)]
    pub max_resolution: HashMap<String, u32>,
    /// The DRM the license server must require.
    #[serde(default)]
    pub drm: Option<DrmRules>,
}

/// The DRM part of [`DeviceRules`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct DrmRules {
    #[serde(default)]
    pub systems: Vec<crate::model::DrmSystem>,
    #[serde(default)]
    pub min_security_level: Option<crate::model::SecurityLevel>,
}

impl DeviceRules {
    /// The first name that is not a device type (or `default`, for resolutions), with
    /// where it is.
    pub fn unknown_name(&self) -> Option<(&'static str, &str)> {
        let known = |name: &str| DeviceType::from_name(name).is_some();
        if let Some(name) = self.allowed_types.iter().find(|n| !known(n)) {
            return Some(("allowed_types", name));
        }
        self.max_resolution
            .keys()
            .find(|n| !known(n) && n.as_str() != "default")
            .map(|name| ("max_resolution", name.as_str()))
    }

    /// The rules for `device`: `DEVICE_NOT_ALLOWED` when the plan excludes its type.
    /// A seats-only question (no device) gets no rules.
    pub fn apply(&self, device: Option<DeviceType>) -> Result<PlaybackRules, Denial> {
        let Some(device) = device else {
            return Ok(PlaybackRules::default());
        };
        let allowed =
            self.allowed_types.is_empty() || self.allowed_types.iter().any(|n| n == device.name());
        if !allowed {
            return Err(Denial::DeviceNotAllowed);
        }
        let max_resolution = self
            .max_resolution
            .get(device.name())
            .or_else(|| self.max_resolution.get("default"))
            .copied();
        let drm = self.drm.as_ref().map(|drm| DrmRule {
            systems: drm.systems.clone(),
            level: drm.min_security_level,
        });
        Ok(PlaybackRules {
            max_resolution,
            drm,
        })
    }
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
