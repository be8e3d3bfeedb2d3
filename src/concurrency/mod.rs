//! The user's seats, read-only: how many, who holds them, and whether a new session on a
//! device would be admitted now. The seat rules themselves run atomically in the store;
//! [`admission`] previews them from one consistent read.

pub mod grpc;

use std::sync::Arc;

use crate::entitlement::{Entitlement, EntitlementProvider, EntitlementQuery};
use crate::error::{Denial, Error, Violations};
use crate::ids::{ContentId, DeviceId, SessionName, UserId};
use crate::proto;
use crate::session::Session;
use crate::session::ops::region;
use crate::store::{OverLimitPolicy, Store};

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
    ReplacesDeviceSession(SessionName),
    EvictsOldest(SessionName),
    LimitReached,
    Denied(Denial),
}

/// Previews the store's create rules (see `Store::create_session`) on a consistent read:
/// the device's own session does not count against the limit; over it, the policy decides.
pub fn admission(
    holders: &[Session],
    device: &DeviceId,
    limit: u32,
    policy: OverLimitPolicy,
) -> Admission {
    let own = holders.iter().find(|s| &s.device.id == device);
    let others: Vec<&Session> = holders.iter().filter(|s| &s.device.id != device).collect();
    if others.len() as u64 >= u64::from(limit) {
        return match (policy, others.first()) {
            (OverLimitPolicy::StopOldest, Some(oldest)) if limit > 0 => {
                Admission::EvictsOldest(oldest.name.clone())
            }
            _ => Admission::LimitReached,
        };
    }
    match own {
        Some(own) => Admission::ReplacesDeviceSession(own.name.clone()),
        None => Admission::FreeSeat,
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
    pub async fn get(&self, user: UserId) -> Result<Concurrency, Error> {
        let (concurrency, _) = self.read(user, None, None).await?;
        Ok(concurrency)
    }

    pub async fn check(&self, query: AvailabilityQuery) -> Result<(Admission, Concurrency), Error> {
        let (concurrency, denial) = self
            .read(query.user, query.content.as_ref(), query.region.as_deref())
            .await?;
        if let Some(denial) = denial {
            return Ok((Admission::Denied(denial), concurrency));
        }
        let admission = admission(
            &concurrency.holders,
            &query.device,
            concurrency.limit,
            self.policy,
        );
        Ok((admission, concurrency))
    }

    async fn read(
        &self,
        user: UserId,
        content: Option<&ContentId>,
        region: Option<&str>,
    ) -> Result<(Concurrency, Option<Denial>), Error> {
        let entitlement = self
            .entitlements
            .check(EntitlementQuery {
                user: &user,
                profile: None,
                content,
                region,
            })
            .await?;
        let (limit, denial) = match entitlement {
            Entitlement::Allowed { seat_limit } => (seat_limit, None),
            Entitlement::Denied(Denial::Entitlement) => (0, Some(Denial::Entitlement)),
            Entitlement::Denied(denial) => {
                // Denied for this title or region only: the user's seats still count.
                let seats = self
                    .entitlements
                    .check(EntitlementQuery {
                        user: &user,
                        profile: None,
                        content: None,
                        region: None,
                    })
                    .await?;
                match seats {
                    Entitlement::Allowed { seat_limit } => (seat_limit, Some(denial)),
                    Entitlement::Denied(_) => (0, Some(denial)),
                }
            }
        };
        let seats = self
            .store
            .seats(&user)
            .await
            .map_err(|e| e.into_error(|| crate::ids::concurrency_name(&user)))?;
        Ok((
            Concurrency {
                user,
                limit,
                holders: seats.holders,
                policy: self.policy,
            },
            denial,
        ))
    }
}
