//! The session operations, shared by the gRPC adapter and (through it) the REST shim:
//! requests are parsed into domain values here, entitlement is asked, and the store does
//! the atomic work.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{ClientInfo, Device, DeviceType, PlaybackState, Session, Termination};
use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::entitlement::{Entitlement, EntitlementProvider, EntitlementQuery, Grant};
use crate::error::{Denial, Error, FieldViolation, Violations};
use crate::ids::position;
use crate::ids::{
    ContentId, DeviceId, ProfileId, RequestId, SessionId, SessionName, UserId, region, text,
};
use crate::manifest::{Manifest, ManifestPaths, ManifestType, Origins, SignError};
use crate::model::PlaybackRules;
use crate::progress::ResumeRules;
use crate::proto;
use crate::store::{
    Beat, Created, DeviceAction, DeviceCall, NewSession, OverLimitPolicy, RateLimit, Store,
    StoreError,
};
use crate::token::ops::Recheck;
use crate::token::{IssuedToken, Tokens};

/// Longest free-text fields.
const MAX_NAME_LEN: usize = 128;
const MAX_USER_AGENT_LEN: usize = 512;
const MAX_REASON_LEN: usize = 256;
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 100;
fn known_enum<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, FieldViolation> {
    E::try_from(value).map_err(|_| FieldViolation::new(field, format!("unknown value {value}")))
}

/// The manifest type a request names; HLS when unspecified.
pub fn manifest_type(field: &str, value: i32) -> Result<ManifestType, FieldViolation> {
    Ok(match known_enum::<proto::ManifestType>(field, value)? {
        proto::ManifestType::Unspecified | proto::ManifestType::Hls => ManifestType::Hls,
        proto::ManifestType::Dash => ManifestType::Dash,
    })
}

fn optional_id<T>(
    field: &str,
    value: &str,
    parse: fn(&str, &str) -> Result<T, FieldViolation>,
) -> Result<Option<T>, FieldViolation> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(field, value).map(Some)
    }
}

/// A create request, parsed.
#[derive(Clone, Debug)]
pub struct CreateSession {
    pub user: UserId,
    pub profile: ProfileId,
    pub content: ContentId,
    pub device: Device,
    pub client: ClientInfo,
    pub request_id: Option<RequestId>,
    pub manifest_type: ManifestType,
}

impl TryFrom<proto::CreateSessionRequest> for CreateSession {
    type Error = Error;

    fn try_from(request: proto::CreateSessionRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let user = v.check(crate::ids::parse_user_name("parent", &request.parent));
        let profile = v.check(ProfileId::parse("profile_id", &request.profile_id));
        let content = v.check(ContentId::parse("content_id", &request.content_id));
        let request_id = v.check(optional_id(
            "request_id",
            &request.request_id,
            RequestId::parse,
        ));
        let device = match request.device {
            None => {
                v.add("device", "required");
                None
            }
            Some(device) => {
                let id = v.check(DeviceId::parse("device.id", &device.id));
                let kind = match v.check(known_enum::<proto::DeviceType>(
                    "device.type",
                    device.r#type,
                )) {
                    Some(kind) => DeviceType::from_proto(kind).or_else(|| {
                        v.add("device.type", "required");
                        None
                    }),
                    None => None,
                };
                let name = v.check(text("device.name", &device.name, MAX_NAME_LEN));
                match (id, kind, name) {
                    (Some(id), Some(kind), Some(name)) => Some(Device { id, kind, name }),
                    _ => None,
                }
            }
        };
        let client = request.client.unwrap_or_default();
        let ip_ok =
            client.ip_address.is_empty() || client.ip_address.parse::<std::net::IpAddr>().is_ok();
        if !ip_ok {
            v.add("client.ip_address", "must be an IPv4 or IPv6 address");
        }
        let user_agent = v.check(text(
            "client.user_agent",
            &client.user_agent,
            MAX_USER_AGENT_LEN,
        ));
        let region = v.check(region("client.region", &client.region));
        let kind = v.check(manifest_type("manifest_type", request.manifest_type));
        v.finish()?;
        match (
            user, profile, content, device, request_id, user_agent, region, kind,
        ) {
            (
                Some(user),
                Some(profile),
                Some(content),
                Some(device),
                Some(request_id),
                Some(user_agent),
                Some(region),
                Some(manifest_type),
            ) => Ok(Self {
                manifest_type,
                user,
                profile,
                content,
                device,
                client: ClientInfo {
                    ip_address: client.ip_address,
                    user_agent,
                    region,
                },
                request_id,
            }),
            _ => Err(Error::Internal("violations not recorded".into())),
        }
    }
}

/// A device call, parsed.
#[derive(Clone, Debug)]
pub struct DeviceRequest(pub DeviceCall);

/// Parses the fields every device call has; `action` is the call's own part, already
/// parsed, so its violations are named together with the others.
fn device_request(
    name: &str,
    position_value: Option<&prost_types::Duration>,
    duration_value: Option<&prost_types::Duration>,
    generation: u64,
    action: Result<DeviceAction, FieldViolation>,
) -> Result<DeviceRequest, Error> {
    let mut v = Violations::default();
    let name = v.check(SessionName::parse("name", name));
    let position_ms = v.check(position("position", position_value));
    let duration_ms = v.check(crate::ids::title_duration("duration", duration_value));
    let action = v.check(action);
    v.finish()?;
    let (Some(name), Some(position_ms), Some(duration_ms), Some(action)) =
        (name, position_ms, duration_ms, action)
    else {
        return Err(Error::Internal("violations not recorded".into()));
    };
    Ok(DeviceRequest(DeviceCall {
        position_ms,
        duration_ms,
        ..DeviceCall::new(name, (generation != 0).then_some(generation), action)
    }))
}

impl TryFrom<proto::HeartbeatRequest> for DeviceRequest {
    type Error = Error;

    fn try_from(request: proto::HeartbeatRequest) -> Result<Self, Error> {
        let action = known_enum::<proto::PlaybackState>("playback_state", request.playback_state)
            .map(|reported| DeviceAction::Heartbeat {
                playback_state: PlaybackState::from_proto(reported),
            });
        device_request(
            &request.name,
            request.position.as_ref(),
            request.duration.as_ref(),
            request.generation,
            action,
        )
    }
}

/// Pause, resume and stop carry the same fields: name, position, generation.
macro_rules! device_request_from {
    ($($request:ident => $action:ident),* $(,)?) => {
        $(
            impl TryFrom<proto::$request> for DeviceRequest {
                type Error = Error;

                fn try_from(request: proto::$request) -> Result<Self, Error> {
                    device_request(
                        &request.name,
                        request.position.as_ref(),
                        request.duration.as_ref(),
                        request.generation,
                        Ok(DeviceAction::$action),
                    )
                }
            }
        )*
    };
}

device_request_from! {
    PauseSessionRequest => Pause,
    ResumeSessionRequest => Resume,
    StopSessionRequest => Stop,
}

/// A terminate request, parsed.
#[derive(Clone, Debug)]
pub struct TerminateSession {
    pub name: SessionName,
    pub reason: String,
}

impl TryFrom<proto::TerminateSessionRequest> for TerminateSession {
    type Error = Error;

    fn try_from(request: proto::TerminateSessionRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let name = v.check(SessionName::parse("name", &request.name));
        if request.reason.trim().is_empty() {
            v.add("reason", "required");
        }
        let reason = v.check(text("reason", &request.reason, MAX_REASON_LEN));
        v.finish()?;
        match (name, reason) {
            (Some(name), Some(reason)) => Ok(Self { name, reason }),
            _ => Err(Error::Internal("violations not recorded".into())),
        }
    }
}

/// Where a page of `ListSessions` ends: the position of its last session in the
/// listing's stable order (create time, then id), and the listing it belongs to. A
/// session that ends between pages leaves the position meaningful, so no live session
/// after it is skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub user: UserId,
    pub created_ms: u64,
    pub session: SessionId,
}

const PAGE_TOKEN_VERSION: &str = "p1";

impl PageToken {
    /// Opaque to clients: base64url of the version, the listing's user and the position.
    pub fn encode(&self) -> String {
        crate::ids::seal_page_token(&format!(
            "{PAGE_TOKEN_VERSION}/{}/{}/{}",
            self.user, self.created_ms, self.session
        ))
    }

    /// Decodes a token and checks it belongs to `user`'s listing (when the request's
    /// parent is itself valid).
    pub fn decode(field: &str, value: &str, user: Option<&UserId>) -> Result<Self, FieldViolation> {
        let malformed = || FieldViolation::new(field, "not a page token of ListSessions");
        let plain = crate::ids::open_page_token(value).ok_or_else(malformed)?;
        let Some([PAGE_TOKEN_VERSION, owner, created_ms, session]) =
            crate::ids::split_exact(&plain, '/')
        else {
            return Err(malformed());
        };
        let token = PageToken {
            user: UserId::parse(field, owner).map_err(|_| malformed())?,
            created_ms: created_ms.parse().map_err(|_| malformed())?,
            session: SessionId::parse(field, session).map_err(|_| malformed())?,
        };
        if user.is_some_and(|user| &token.user != user) {
            return Err(FieldViolation::new(
                field,
                "belongs to another listing: pass it with the parent it came from",
            ));
        }
        Ok(token)
    }

    /// Whether `session` comes after this position.
    fn precedes(&self, session: &Session) -> bool {
        (self.created_ms, self.session.as_str())
            < (session.created_ms, session.name.session.as_str())
    }
}

/// A list request, parsed.
#[derive(Clone, Debug)]
pub struct ListSessions {
    pub user: UserId,
    pub page_size: usize,
    /// List after this position.
    pub after: Option<PageToken>,
}

impl TryFrom<proto::ListSessionsRequest> for ListSessions {
    type Error = Error;

    fn try_from(request: proto::ListSessionsRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let user = v.check(crate::ids::parse_user_name("parent", &request.parent));
        let page_size = v.check(crate::ids::page_size(
            "page_size",
            request.page_size,
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        ));
        let after = v.check(crate::ids::page_token(
            "page_token",
            &request.page_token,
            |field, token| PageToken::decode(field, token, user.as_ref()),
        ));
        v.finish()?;
        let (Some(user), Some(after), Some(page_size)) = (user, after, page_size) else {
            return Err(Error::Internal("violations not recorded".into()));
        };
        Ok(Self {
            user,
            page_size,
            after,
        })
    }
}

/// How sessions are paced and what happens over the limit.
#[derive(Clone, Debug)]
pub struct SessionPolicy {
    pub over_limit: OverLimitPolicy,
    /// What devices are told to keep to.
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Where a new session of a title starts, from the profile's progress in it.
    pub resume: ResumeRules,
    /// How fast a user may create sessions, unless its plan says otherwise.
    pub create_rate: Option<RateLimit>,
}

impl SessionPolicy {
    pub fn heartbeat(&self) -> proto::HeartbeatPolicy {
        proto::HeartbeatPolicy {
            interval: Some(crate::proto::duration(self.heartbeat_interval)),
            timeout: Some(crate::proto::duration(self.heartbeat_timeout)),
        }
    }
}

/// Binds a device call to the caller's playback token: the token must name this session,
/// and the call runs with the token's generation. Any mismatch is NOT_FOUND, exactly like
/// a session that does not exist, so ids cannot be probed. Returns whether a token bound
/// the call.
fn bind_device(caller: Option<&Caller>, call: &mut DeviceCall) -> Result<bool, Error> {
    let not_found = || Error::NotFound {
        resource: call.name.to_string(),
    };
    match caller {
        Some(Caller::Device { claims, .. }) => {
            if !call.name.is(&claims.sid) {
                return Err(not_found());
            }
            if call.generation.is_some_and(|g| g != claims.r#gen) {
                return Err(not_found());
            }
            call.generation = Some(claims.r#gen);
            call.profile = ProfileId::parse("pid", &claims.pid).ok();
            Ok(true)
        }
        // A service the layer let through acts for devices (its role names the method);
        // the request's own generation, if any, fences it.
        Some(Caller::Development) | Some(Caller::Service(_)) => Ok(false),
        Some(Caller::Public) | None => Err(Error::Unauthenticated),
    }
}

/// No origin serves `content`.
fn unserved(content: impl std::fmt::Display) -> Error {
    Error::ManifestUnavailable(format!("no origin serves content {content}"))
}

/// The session operations.
pub struct Sessions {
    store: Arc<dyn Store>,
    entitlements: Arc<dyn EntitlementProvider>,
    tokens: Arc<Tokens>,
    policy: SessionPolicy,
    /// The manifest origins, when usher signs manifest URLs.
    manifests: Option<Arc<Origins>>,
}

/// A started (or replayed) session, the device's token for it and, when usher signs
/// manifest URLs, its title's manifest.
pub struct Started {
    pub created: Created,
    pub token: IssuedToken,
    pub manifest: Option<Manifest>,
    /// Where playback starts: the profile's progress in the title under the resume
    /// rules; 0 for the beginning.
    pub resume_position_ms: u64,
}

/// A page of sessions.
pub struct SessionPage {
    pub sessions: Vec<Session>,
    pub next: Option<PageToken>,
}

impl Sessions {
    pub fn new(
        store: Arc<dyn Store>,
        entitlements: Arc<dyn EntitlementProvider>,
        tokens: Arc<Tokens>,
        policy: SessionPolicy,
    ) -> Self {
        Self {
            store,
            entitlements,
            tokens,
            policy,
            manifests: None,
        }
    }

    /// Signs manifest URLs with `manifests` (none: CreateSession returns no manifest and
    /// GetManifest answers MANIFEST_UNAVAILABLE).
    pub fn with_manifests(mut self, manifests: Option<Arc<Origins>>) -> Self {
        self.manifests = manifests;
        self
    }

    /// The manifest origins, or why there are none.
    fn origins(&self) -> Result<&Origins, Error> {
        self.manifests
            .as_deref()
            .ok_or_else(|| Error::ManifestUnavailable("this usher signs no manifest URLs".into()))
    }

    /// Whether an origin serves `content`: checked before a create takes a seat.
    fn check_served(&self, content: &ContentId) -> Result<(), Error> {
        match self.origins()?.origin_of(content) {
            Some(_) => Ok(()),
            None => Err(unserved(content)),
        }
    }

    /// How long a manifest URL lives, when usher signs them.
    pub fn manifest_ttl(&self) -> Option<Duration> {
        self.manifests.as_ref().map(|origins| origins.ttl())
    }

    /// A fresh signed URL of `session`'s manifest, at `paths` when the content service
    /// gave them.
    pub fn sign_manifest(
        &self,
        session: &Session,
        kind: ManifestType,
        paths: Option<&ManifestPaths>,
    ) -> Result<Manifest, Error> {
        let now = SystemTime::now();
        self.origins()?
            .manifest(&session.name, &session.content, kind, paths, now)
            .map_err(|e| match e {
                SignError::NoOrigin(content) => unserved(content),
                SignError::Signing(cause) => Error::Internal(format!("manifest URL: {cause}")),
            })
    }

    /// A fresh manifest URL of a live session, for its device (its playback token) or a
    /// service acting for it. Never for an ended session.
    pub async fn manifest(
        &self,
        name: &SessionName,
        kind: ManifestType,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<Manifest, Error> {
        match caller {
            Some(Caller::Device { claims, .. }) if !name.is(&claims.sid) => {
                return Err(Error::NotFound {
                    resource: name.to_string(),
                });
            }
            Some(Caller::Public) | None => return Err(Error::Unauthenticated),
            _ => {}
        }
        let session = self.get(name, deadline).await?;
        if !super::holds_seat(session.state) {
            return Err(Error::SessionEnded {
                state: Some(session.state.to_proto()),
            });
        }
        if let Some(Caller::Device { claims, .. }) = caller
            && claims.r#gen != session.generation
        {
            return Err(Error::NotFound {
                resource: name.to_string(),
            });
        }
        self.origins()?;
        // Where the manifest is may come from the content service: asked again, like a
        // refresh (a lost entitlement ends the session; no answer signs the template).
        let paths = self.recheck_or_end(&session, deadline).await?;
        let paths = paths.and_then(|grant| grant.manifest);
        self.sign_manifest(&session, kind, paths.as_ref())
    }

    pub fn policy(&self) -> &SessionPolicy {
        &self.policy
    }

    pub async fn create(
        &self,
        request: CreateSession,
        deadline: Deadline,
    ) -> Result<Started, Error> {
        let region = request.client.region();
        let entitlement = self
            .entitlements
            .check(EntitlementQuery {
                user: &request.user,
                profile: Some(&request.profile),
                content: Some(&request.content),
                region,
                device: Some(request.device.kind),
                deadline,
            })
            .await?;
        let grant = match entitlement {
            Entitlement::Allowed(grant) => grant,
            Entitlement::Denied(denial) => {
                crate::observe::session_denied(denial.reason());
                return Err(Error::Denied(denial));
            }
        };
        // A title no origin serves fails before it takes a seat.
        if self.manifests.is_some() {
            self.check_served(&request.content)?;
        }
        let manifest_type = request.manifest_type;
        let name = SessionName {
            user: request.user,
            session: SessionId::generate(),
        };
        let resource = name.to_string();
        let created = self
            .store
            .create_session(
                NewSession {
                    name,
                    profile: request.profile,
                    content: request.content,
                    device: request.device,
                    client: request.client,
                    request_id: request.request_id,
                    limit: grant.seat_limit,
                    policy: self.policy.over_limit,
                    rate: grant.create_rate.unwrap_or(self.policy.create_rate),
                },
                deadline,
            )
            .await
            .map_err(|e| e.into_error(|| resource));
        let created = match created {
            Ok(created) => created,
            Err(error) => {
                if let Error::ConcurrencyLimitReached { .. } | Error::RateLimited { .. } = error {
                    crate::observe::session_denied(error.code_and_reason().1);
                }
                return Err(error);
            }
        };
        if !created.replayed {
            crate::observe::session_created();
            crate::observe::sessions_ended("evicted_by_create", created.replaced.len() as u64);
            tracing::info!(
                session = %created.session.name,
                generation = created.session.generation,
                replaced = created.replaced.len(),
                "session started"
            );
        }
        // A retry whose session has ended since (the device never got the answer, so it
        // never heartbeated): its first answer is gone. Say so instead of minting a token
        // for a dead session; the caller starts again with a new request_id.
        if created.replayed && !super::holds_seat(created.session.state) {
            return Err(Error::SessionEnded {
                state: Some(created.session.state.to_proto()),
            });
        }
        // The profile's progress in the title, read by the create itself (one store call).
        let resume_position_ms = self.policy.resume.resume_at(created.progress.as_ref());
        let token = self.tokens.issue(&created.session, &grant.rules)?;
        let manifest = match self.manifests {
            Some(_) => Some(self.sign_manifest(
                &created.session,
                manifest_type,
                grant.manifest.as_ref(),
            )?),
            None => None,
        };
        Ok(Started {
            created,
            token,
            manifest,
            resume_position_ms,
        })
    }

    /// Asks the entitlement again for a live session, as at its start.
    pub async fn recheck_entitlement(&self, session: &Session, deadline: Deadline) -> Rechecked {
        let answer = self
            .entitlements
            .check(EntitlementQuery {
                user: &session.name.user,
                profile: Some(&session.profile),
                content: Some(&session.content),
                region: session.client.region(),
                device: Some(session.device.kind),
                deadline,
            })
            .await;
        let rechecked = match answer {
            Ok(Entitlement::Allowed(grant)) => Rechecked::Kept(grant),
            Ok(Entitlement::Denied(denial)) => Rechecked::Lost(denial),
            Err(error) => {
                tracing::warn!(session = %session.name, %error, "entitlement unknown at a re-check: the session is kept");
                Rechecked::Unknown
            }
        };
        crate::observe::entitlement_recheck(rechecked.outcome());
        rechecked
    }

    /// Ends a session whose entitlement was withdrawn: an operator's termination by
    /// usher, its message naming the denial.
    pub async fn end_for_entitlement(
        &self,
        name: &SessionName,
        denial: Denial,
        deadline: Deadline,
    ) -> Result<Session, StoreError> {
        let termination = Termination {
            message: format!("the entitlement was withdrawn: {}", denial.reason()),
            by: "usher".to_owned(),
        };
        let ended = self.store.terminate(name, &termination, deadline).await?;
        tracing::info!(session = %name, reason = denial.reason(), "session ended: entitlement lost");
        crate::observe::sessions_ended("entitlement_lost", 1);
        Ok(ended)
    }

    pub async fn get(&self, name: &SessionName, deadline: Deadline) -> Result<Session, Error> {
        self.store
            .get_session(name, deadline)
            .await
            .map_err(|e| e.into_error(|| name.to_string()))?
            .ok_or_else(|| Error::NotFound {
                resource: name.to_string(),
            })
    }

    pub async fn list(
        &self,
        request: ListSessions,
        deadline: Deadline,
    ) -> Result<SessionPage, Error> {
        let seats = self
            .store
            .seats(&request.user, deadline)
            .await
            .map_err(|e| e.into_error(|| request.user.to_string()))?;
        // Holders come oldest first, by (create time, id): the order the token keeps.
        let mut sessions: Vec<Session> = seats
            .holders
            .into_iter()
            .filter(|s| request.after.as_ref().is_none_or(|after| after.precedes(s)))
            .take(request.page_size + 1)
            .collect();
        let next = if sessions.len() > request.page_size {
            sessions.truncate(request.page_size);
            sessions.last().map(|last| PageToken {
                user: request.user.clone(),
                created_ms: last.created_ms,
                session: last.name.session.clone(),
            })
        } else {
            None
        };
        Ok(SessionPage { sessions, next })
    }

    /// A device call, bound to the caller's playback token (see `bind_device`).
    pub async fn device_call(
        &self,
        request: DeviceRequest,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<Session, Error> {
        let (call, bound) = Self::bound_call(request, caller)?;
        let (name, action) = (call.name.clone(), call.action);
        let answer = self.store.device_call(call, deadline).await;
        Self::answered(answer, &name, action, bound)
    }

    /// [`Sessions::device_call`], answered with what the call changed (a device's stream
    /// needs no more, and the store may send less).
    pub async fn device_call_brief(
        &self,
        request: DeviceRequest,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<Beat, Error> {
        let (call, bound) = Self::bound_call(request, caller)?;
        let (name, action) = (call.name.clone(), call.action);
        let answer = self.store.device_call_brief(call, deadline).await;
        Self::answered(answer, &name, action, bound)
    }

    /// The call as the caller may make it, and whether a playback token bound it.
    fn bound_call(
        request: DeviceRequest,
        caller: Option<&Caller>,
    ) -> Result<(DeviceCall, bool), Error> {
        let mut call = request.0;
        let bound = bind_device(caller, &mut call)?;
        Ok((call, bound))
    }

    /// The store's answer to a device call, its errors as the caller sees them.
    fn answered<T>(
        answer: Result<T, StoreError>,
        name: &SessionName,
        action: DeviceAction,
        bound: bool,
    ) -> Result<T, Error> {
        let answer = answer.map_err(|e| match e {
            // A token of another generation is refused like a session that does not
            // exist, so the generation cannot be probed.
            StoreError::StaleGeneration if bound => Error::NotFound {
                resource: name.to_string(),
            },
            other => other.into_error(|| name.to_string()),
        })?;
        if action == DeviceAction::Stop {
            crate::observe::sessions_ended(crate::model::EndReason::StoppedByDevice.as_str(), 1);
        }
        Ok(answer)
    }

    /// An operator ends a session; `by` is the acting caller's name.
    pub async fn terminate(
        &self,
        request: TerminateSession,
        by: &str,
        deadline: Deadline,
    ) -> Result<Session, Error> {
        let termination = Termination {
            message: request.reason,
            by: by.to_owned(),
        };
        let session = self
            .store
            .terminate(&request.name, &termination, deadline)
            .await
            .map_err(|e| e.into_error(|| request.name.to_string()))?;
        tracing::info!(
            session = %request.name,
            by = %termination.by,
            reason = %termination.message,
            "session terminated"
        );
        crate::observe::sessions_ended(crate::model::EndReason::TerminatedByOperator.as_str(), 1);
        Ok(session)
    }
}

/// What a re-check of a live session's entitlement found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rechecked {
    /// Still entitled, under this grant's rules.
    Kept(Grant),
    /// The provider could not answer: the session is kept with the rules it had.
    Unknown,
    /// The entitlement was withdrawn.
    Lost(Denial),
}

impl Rechecked {
    fn outcome(&self) -> &'static str {
        match self {
            Rechecked::Kept(_) => "kept",
            Rechecked::Unknown => "unknown",
            Rechecked::Lost(_) => "lost",
        }
    }
}

impl Sessions {
    /// A re-check for a call that goes on only while the entitlement holds: the grant
    /// (`None` when the provider could not answer); a withdrawn entitlement ends the
    /// session and refuses the call with the denial.
    async fn recheck_or_end(
        &self,
        session: &Session,
        deadline: Deadline,
    ) -> Result<Option<Grant>, Error> {
        match self.recheck_entitlement(session, deadline).await {
            Rechecked::Kept(grant) => Ok(Some(grant)),
            Rechecked::Unknown => Ok(None),
            Rechecked::Lost(denial) => {
                match self
                    .end_for_entitlement(&session.name, denial, deadline)
                    .await
                {
                    Ok(_) | Err(StoreError::SessionEnded(_)) => Err(Error::Denied(denial)),
                    Err(error) => Err(error.into_error(|| session.name.to_string())),
                }
            }
        }
    }
}

/// A refresh asks the entitlement again; a withdrawn one ends the session and refuses
/// the refresh with the denial.
#[async_trait::async_trait]
impl Recheck for Sessions {
    async fn recheck(
        &self,
        session: &Session,
        deadline: Deadline,
    ) -> Result<Option<PlaybackRules>, Error> {
        let grant = self.recheck_or_end(session, deadline).await?;
        Ok(grant.map(|grant| grant.rules))
    }
}
