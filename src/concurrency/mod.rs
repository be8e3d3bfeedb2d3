//! The user's seats, read-only: how many, who holds them, and whether a new session on a
//! device would be admitted now. The seat rules run atomically in the store, and the
//! store previews them too (`Store::preview_create`), under the conformance suite.

pub mod grpc;

use std::sync::Arc;

use crate::deadline::Deadline;
use crate::entitlement::{Entitlement, EntitlementProvider, EntitlementQuery};
use crate::error::{Denial, Error, Violations};
use crate::ids::region;
use crate::ids::{ContentId, DeviceId, SessionName, UserId};
use crate::model::Session;
use crate::proto;
use crate::store::{OverLimitPolicy, Preview, Store};

/// A user's seats.
#[derive(Clone, Debug)]
pub struct Concurrency {
    pub user: UserId,
    pub limit: u32,
    pub holders: Vec<Session>,
    pub policy: OverLimitPolicy,
}

impl Concurrency {
    pub fn to_proto(&self) -> proto::Concurrency {
        proto::Concurrency {
            name: crate::ids::concurrency_name(&self.user),
            limit: self.limit as i32,
            in_use: self.holders.len() as i32,
            holders: self.holders.iter().map(Session::to_seat_holder).collect(),
            policy: match self.policy {
                OverLimitPolicy::RejectNew => proto::OverLimitPolicy::RejectNew,
                OverLimitPolicy::StopOldest => proto::OverLimitPolicy::StopOldest,
            } as i32,
        }
    }
}

/// An availability question, parsed.
#[derive(Clone, Debug)]
pub struct AvailabilityQuery {
    pub user: UserId,
    pub device: DeviceId,
    pub content: Option<ContentId>,
    pub region: Option<String>,
}

impl TryFrom<proto::CheckAvailabilityRequest> for AvailabilityQuery {
    type Error = Error;

    fn try_from(request: proto::CheckAvailabilityRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let user = v.check(crate::ids::parse_concurrency_name("name", &request.name));
        let device = v.check(DeviceId::parse("device_id", &request.device_id));
        let content = if request.content_id.is_empty() {
            Some(None)
        } else {
            v.check(ContentId::parse("content_id", &request.content_id))
                .map(Some)
        };
        let region = v.check(region("region", &request.region));
        v.finish()?;
        match (user, device, content, region) {
            (Some(user), Some(device), Some(content), Some(region)) => Ok(Self {
                user,
                device,
                content,
                region: (!region.is_empty()).then_some(region),
            }),
            _ => Err(Error::Internal("violations not recorded".into())),
        }
    }
}

/// What a create would do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    FreeSeat,
    /// The device's own session would be replaced.
    ReplacesDeviceSession(SessionName),
    /// The oldest sessions over the limit would be evicted, and the device's own session
    /// replaced if it has one: every session the create would end.
    EvictsOldest(Vec<SessionName>),
    LimitReached,
    Denied(Denial),
}

impl From<Preview> for Admission {
    fn from(preview: Preview) -> Self {
        match preview {
            Preview::FreeSeat => Admission::FreeSeat,
            Preview::ReplacesDeviceSession(own) => Admission::ReplacesDeviceSession(own),
            Preview::EvictsOldest(sessions) => Admission::EvictsOldest(sessions),
            Preview::LimitReached => Admission::LimitReached,
        }
    }
}

impl Admission {
    /// The sessions a create would end.
    pub fn replaced(&self) -> Vec<&SessionName> {
        match self {
            Admission::ReplacesDeviceSession(own) => vec![own],
            Admission::EvictsOldest(sessions) => sessions.iter().collect(),
            Admission::FreeSeat | Admission::LimitReached | Admission::Denied(_) => Vec::new(),
        }
    }
}

/// The concurrency operations.
pub struct ConcurrencyOps {
    store: Arc<dyn Store>,
    entitlements: Arc<dyn EntitlementProvider>,
    policy: OverLimitPolicy,
}

impl ConcurrencyOps {
    pub fn new(
        store: Arc<dyn Store>,
        entitlements: Arc<dyn EntitlementProvider>,
        policy: OverLimitPolicy,
    ) -> Self {
        Self {
            store,
            entitlements,
            policy,
        }
    }

    /// The user's seats; a user the entitlement denies has a limit of 0.
    pub async fn get(&self, user: UserId, deadline: Deadline) -> Result<Concurrency, Error> {
        let (limit, _) = self.limit(&user, None, None, deadline).await?;
        let seats = self
            .store
            .seats(&user, deadline)
            .await
            .map_err(|e| e.into_error(|| crate::ids::concurrency_name(&user)))?;
        Ok(Concurrency {
            user,
            limit,
            holders: seats.holders,
            policy: self.policy,
        })
    }

    pub async fn check(
        &self,
        query: AvailabilityQuery,
        deadline: Deadline,
    ) -> Result<(Admission, Concurrency), Error> {
        let (limit, denial) = self
            .limit(
                &query.user,
                query.content.as_ref(),
                query.region.as_deref(),
                deadline,
            )
            .await?;
        let (seats, preview) = self
            .store
            .preview_create(&query.user, &query.device, limit, self.policy, deadline)
            .await
            .map_err(|e| e.into_error(|| crate::ids::concurrency_name(&query.user)))?;
        let concurrency = Concurrency {
            user: query.user,
            limit,
            holders: seats.holders,
            policy: self.policy,
        };
        let admission = match denial {
            Some(denial) => Admission::Denied(denial),
            None => preview.into(),
        };
        Ok((admission, concurrency))
    }

    /// The user's seat limit, and the entitlement's denial of this title or region if
    /// any (a user denied outright has a limit of 0).
    async fn limit(
        &self,
        user: &UserId,
        content: Option<&ContentId>,
        region: Option<&str>,
        deadline: Deadline,
    ) -> Result<(u32, Option<Denial>), Error> {
        let entitlement = self
            .entitlements
            .check(EntitlementQuery {
                content,
                region,
                ..EntitlementQuery::seats(user, deadline)
            })
            .await?;
        let (limit, denial) = match entitlement {
            Entitlement::Allowed(grant) => (grant.seat_limit, None),
            Entitlement::Denied(denial) if denial.is_user_wide() => (0, Some(denial)),
            Entitlement::Denied(denial) => {
                // Denied for this title or region only: the user's seats still count.
                let seats = self
                    .entitlements
                    .check(EntitlementQuery::seats(user, deadline))
                    .await?;
                match seats {
                    Entitlement::Allowed(grant) => (grant.seat_limit, Some(denial)),
                    Entitlement::Denied(_) => (0, Some(denial)),
                }
            }
        };
        Ok((limit, denial))
    }
}
