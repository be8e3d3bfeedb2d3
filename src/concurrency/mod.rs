//! The user's seats, read-only: how many, who holds them, and whether a new session on a
//! device would be admitted now. The seat rules themselves run atomically in the store;
//! [`admission`] previews them from one consistent read.

pub mod grpc;

use std::sync::Arc;

use crate::entitlement::{Entitlement, EntitlementProvider, EntitlementQuery};
use crate::error::{Denial, Error, Violations};
use crate::ids::region;
use crate::ids::{ContentId, DeviceId, SessionName, UserId};
use crate::model::Session;
use crate::proto;
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
    /// The device's own session would be replaced.
    ReplacesDeviceSession(SessionName),
    /// The oldest sessions over the limit would be evicted, and the device's own session
    /// replaced if it has one: every session the create would end.
    EvictsOldest(Vec<SessionName>),
    LimitReached,
    Denied(Denial),
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

/// Previews the store's create rules (see `Store::create_session`) on a consistent read:
/// the device's own session does not count against the limit; over it, the policy
/// decides, and stop-oldest evicts as many of the oldest as it takes.
pub fn admission(
    holders: &[Session],
    device: &DeviceId,
    limit: u32,
    policy: OverLimitPolicy,
) -> Admission {
    let own = holders.iter().find(|s| &s.device.id == device);
    let others: Vec<&Session> = holders.iter().filter(|s| &s.device.id != device).collect();
    if others.len() as u64 >= u64::from(limit) {
        if policy == OverLimitPolicy::RejectNew || limit == 0 {
            return Admission::LimitReached;
        }
        let excess = others.len() + 1 - limit as usize;
        let mut ended: Vec<SessionName> = others[..excess].iter().map(|s| s.name.clone()).collect();
        ended.extend(own.map(|s| s.name.clone()));
        return Admission::EvictsOldest(ended);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SessionId, UserId};

    fn holder(device: &str, created_ms: u64) -> Session {
        let name = SessionName {
            user: UserId::parse("u", "u").unwrap(),
            session: SessionId::parse("s", &format!("s-{device}")).unwrap(),
        };
        Session::sample(name, DeviceId::parse("d", device).unwrap(), created_ms)
    }

    #[test]
    fn a_lowered_limit_under_stop_oldest_names_every_session_a_create_ends() {
        let holders = [
            holder("a", 1),
            holder("b", 2),
            holder("c", 3),
            holder("tv", 4),
        ];
        let tv = DeviceId::parse("d", "tv").unwrap();
        let preview = admission(&holders, &tv, 2, OverLimitPolicy::StopOldest);
        let ended: Vec<&str> = preview
            .replaced()
            .iter()
            .map(|n| n.session.as_str())
            .collect();
        assert_eq!(ended, ["s-a", "s-b", "s-tv"]);
        assert_eq!(
            admission(&holders, &tv, 2, OverLimitPolicy::RejectNew),
            Admission::LimitReached
        );
        let phone = DeviceId::parse("d", "phone").unwrap();
        assert_eq!(
            admission(&holders[..1], &phone, 2, OverLimitPolicy::RejectNew),
            Admission::FreeSeat
        );
    }
}
