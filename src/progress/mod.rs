//! Watch progress, `users/{user}/profiles/{profile}/progress/{content}`: where each
//! profile stopped in each title (ADR 0009). The store keeps it, stamped with its own
//! clock; these are the operations of `ProgressService` and its gRPC adapter.

pub mod grpc;

use std::sync::Arc;

use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::error::{Error, FieldViolation, Violations};
use crate::ids::{ContentId, DeviceId, ProfileId, SessionName, UserId, position};
pub use crate::model::ResumeRules;
use crate::model::{Progress, holds_seat};
use crate::proto;
use crate::store::{ProgressCursor, ProgressKey, ProgressWrite, Store};
use crate::token::PlaybackClaims;

const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 100;

/// `users/{user}/profiles/{profile}/progress/{content}`.
pub fn parse_name(field: &str, value: &str) -> Result<ProgressKey, FieldViolation> {
    let malformed = || {
        FieldViolation::new(
            field,
            "must be users/{user}/profiles/{profile}/progress/{content}",
        )
    };
    let Some(["users", user, "profiles", profile, "progress", content]) =
        crate::ids::split_exact(value, '/')
    else {
        return Err(malformed());
    };
    Ok(ProgressKey {
        user: UserId::parse(field, user)?,
        profile: ProfileId::parse(field, profile)?,
        content: ContentId::parse(field, content)?,
    })
}

/// `users/{user}/profiles/{profile}`.
pub fn parse_parent(field: &str, value: &str) -> Result<(UserId, ProfileId), FieldViolation> {
    let Some(["users", user, "profiles", profile]) = crate::ids::split_exact(value, '/') else {
        return Err(FieldViolation::new(
            field,
            "must be users/{user}/profiles/{profile}",
        ));
    };
    Ok((
        UserId::parse(field, user)?,
        ProfileId::parse(field, profile)?,
    ))
}

/// `users/{user}/profiles/{profile}/progress/{content}` of `key`.
pub fn key_name(key: &ProgressKey) -> String {
    format!(
        "users/{}/profiles/{}/progress/{}",
        key.user, key.profile, key.content
    )
}

/// The resource name of `progress`.
pub fn name_of(progress: &Progress) -> String {
    format!(
        "users/{}/profiles/{}/progress/{}",
        progress.user, progress.profile, progress.content
    )
}

/// Where a listing stopped: opaque to clients, bound to its profile.
struct PageToken {
    cursor: ProgressCursor,
}

const PAGE_TOKEN_VERSION: &str = "g1";

impl PageToken {
    fn encode(&self, user: &UserId, profile: &ProfileId) -> String {
        crate::ids::seal_page_token(&format!(
            "{PAGE_TOKEN_VERSION}/{user}/{profile}/{}/{}",
            self.cursor.updated_ms, self.cursor.content
        ))
    }

    fn decode(
        field: &str,
        value: &str,
        parent: Option<&(UserId, ProfileId)>,
    ) -> Result<Self, FieldViolation> {
        let malformed = || FieldViolation::new(field, "not a page token of ListProgress");
        let plain = crate::ids::open_page_token(value).ok_or_else(malformed)?;
        let Some([PAGE_TOKEN_VERSION, user, profile, updated_ms, content]) =
            crate::ids::split_exact(&plain, '/')
        else {
            return Err(malformed());
        };
        if let Some((want_user, want_profile)) = parent
            && (want_user.as_str() != user || want_profile.as_str() != profile)
        {
            return Err(FieldViolation::new(
                field,
                "belongs to another parent's listing",
            ));
        }
        Ok(PageToken {
            cursor: ProgressCursor {
                updated_ms: updated_ms.parse().map_err(|_| malformed())?,
                content: ContentId::parse(field, content).map_err(|_| malformed())?,
            },
        })
    }
}

/// A parsed `ListProgress`.
pub struct ListProgress {
    pub user: UserId,
    pub profile: ProfileId,
    pub page_size: usize,
    after: Option<ProgressCursor>,
    pub show_completed: bool,
}

impl TryFrom<proto::ListProgressRequest> for ListProgress {
    type Error = Error;

    fn try_from(request: proto::ListProgressRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        let parent = v.check(parse_parent("parent", &request.parent));
        let page_size = v.check(crate::ids::page_size(
            "page_size",
            request.page_size,
            DEFAULT_PAGE_SIZE,
            MAX_PAGE_SIZE,
        ));
        let after = v.check(crate::ids::page_token(
            "page_token",
            &request.page_token,
            |field, token| PageToken::decode(field, token, parent.as_ref()).map(|t| t.cursor),
        ));
        v.finish()?;
        match (parent, page_size, after) {
            (Some((user, profile)), Some(page_size), Some(after)) => Ok(ListProgress {
                user,
                profile,
                page_size,
                after,
                show_completed: request.show_completed,
            }),
            _ => Err(Error::Internal("violations not recorded".into())),
        }
    }
}

/// A parsed `UpdateProgress`.
pub struct UpdateProgress(ProgressWrite);

impl TryFrom<proto::UpdateProgressRequest> for UpdateProgress {
    type Error = Error;

    fn try_from(request: proto::UpdateProgressRequest) -> Result<Self, Error> {
        let Some(progress) = request.progress else {
            return Err(Error::invalid("progress", "required"));
        };
        let mut v = Violations::default();
        let key = v.check(parse_name("progress.name", &progress.name));
        let at = match v.check(position("progress.position", progress.position.as_ref())) {
            Some(None) => {
                v.add("progress.position", "required");
                None
            }
            other => other.flatten(),
        };
        let duration = v.check(position("progress.duration", progress.duration.as_ref()));
        let device = v.check(DeviceId::parse("progress.device_id", &progress.device_id));
        v.finish()?;
        match (key, at, duration, device) {
            (Some(key), Some(position_ms), Some(duration_ms), Some(device)) => {
                Ok(UpdateProgress(ProgressWrite {
                    key,
                    position_ms,
                    duration_ms,
                    completed: progress.completed,
                    device,
                }))
            }
            _ => Err(Error::Internal("violations not recorded".into())),
        }
    }
}

/// A page of progress and where the next one starts.
pub struct ProgressPage {
    pub entries: Vec<Progress>,
    pub next_page_token: String,
}

/// What `caller` may reach: a service (its role let the call through) any profile; a
/// device, with its playback token, its own user's profile only (anything else is
/// NOT_FOUND, so other profiles cannot be probed). The device's claims, when it is one.
fn reachable<'a>(
    caller: Option<&'a Caller>,
    user: &UserId,
    profile: &ProfileId,
    resource: impl FnOnce() -> String,
) -> Result<Option<&'a PlaybackClaims>, Error> {
    match caller {
        Some(Caller::Device { claims, .. }) => {
            if claims.sub == user.as_str() && claims.pid == profile.as_str() {
                Ok(Some(claims))
            } else {
                Err(Error::NotFound {
                    resource: resource(),
                })
            }
        }
        Some(Caller::Service(_)) | Some(Caller::Development) => Ok(None),
        Some(Caller::Public) | None => Err(Error::Unauthenticated),
    }
}

/// The progress operations.
pub struct ProgressOps {
    store: Arc<dyn Store>,
    rules: ResumeRules,
}

impl ProgressOps {
    pub fn new(store: Arc<dyn Store>, rules: ResumeRules) -> Self {
        Self { store, rules }
    }

    pub async fn get(
        &self,
        key: &ProgressKey,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<Progress, Error> {
        let resource = || key_name(key);
        reachable(caller, &key.user, &key.profile, resource)?;
        self.store
            .get_progress(key, deadline)
            .await
            .map_err(|e| e.into_error(resource))?
            .ok_or_else(|| Error::NotFound {
                resource: resource(),
            })
    }

    /// A page: entries are read one store page at a time, and finished titles left out
    /// unless asked, so a page may hold fewer than its size; its token still says where
    /// the next one starts.
    pub async fn list(
        &self,
        request: ListProgress,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<ProgressPage, Error> {
        let parent = || format!("users/{}/profiles/{}", request.user, request.profile);
        reachable(caller, &request.user, &request.profile, parent)?;
        let read = self
            .store
            .list_progress(
                &request.user,
                &request.profile,
                request.after.as_ref(),
                request.page_size + 1,
                deadline,
            )
            .await
            .map_err(|e| e.into_error(parent))?;
        let more = read.len() > request.page_size;
        let seen = &read[..read.len().min(request.page_size)];
        let next_page_token = match (more, seen.last()) {
            (true, Some(last)) => PageToken {
                cursor: ProgressCursor {
                    updated_ms: last.updated_ms,
                    content: last.content.clone(),
                },
            }
            .encode(&request.user, &request.profile),
            _ => String::new(),
        };
        let entries = seen
            .iter()
            .filter(|p| request.show_completed || !p.completed)
            .cloned()
            .collect();
        Ok(ProgressPage {
            entries,
            next_page_token,
        })
    }

    /// Writes progress; a position past the finish (`ResumeRules::finishes`) marks the
    /// title completed. A device writes only its session's title, as its device, and
    /// only while the session is live with the token's generation: a write from an
    /// ended session is refused (SESSION_ENDED), as its other device calls are.
    pub async fn update(
        &self,
        request: UpdateProgress,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<Progress, Error> {
        let mut write = request.0;
        let resource = key_name(&write.key);
        let not_found = || Error::NotFound {
            resource: resource.clone(),
        };
        if let Some(claims) = reachable(caller, &write.key.user, &write.key.profile, || {
            resource.clone()
        })? {
            if claims.cid != write.key.content.as_str() {
                return Err(not_found());
            }
            // The claim is the session's name, of the same user (checked above).
            let session = SessionName::parse("sid", &claims.sid).map_err(|_| not_found())?;
            let live = self
                .store
                .get_session(&session, deadline)
                .await
                .map_err(|e| e.into_error(|| session.to_string()))?
                .ok_or_else(not_found)?;
            if live.generation != claims.r#gen {
                return Err(not_found());
            }
            if !holds_seat(live.state) {
                return Err(Error::SessionEnded {
                    state: Some(live.state.to_proto()),
                });
            }
            write.device = live.device.id;
        }
        if let Some(duration) = write.duration_ms {
            write.completed |= self.rules.finishes(write.position_ms, duration);
        }
        self.store
            .write_progress(write, deadline)
            .await
            .map_err(|e| e.into_error(|| resource))
    }

    pub async fn delete(
        &self,
        key: &ProgressKey,
        caller: Option<&Caller>,
        deadline: Deadline,
    ) -> Result<(), Error> {
        let resource = || key_name(key);
        reachable(caller, &key.user, &key.profile, resource)?;
        let removed = self
            .store
            .delete_progress(key, deadline)
            .await
            .map_err(|e| e.into_error(resource))?;
        if removed {
            Ok(())
        } else {
            Err(Error::NotFound {
                resource: resource(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn progress(position_s: u64, duration_s: Option<u64>, completed: bool) -> Progress {
        Progress {
            user: UserId::parse("user", "u").unwrap(),
            profile: ProfileId::parse("profile", "p").unwrap(),
            content: ContentId::parse("content", "c").unwrap(),
            position_ms: position_s * 1000,
            duration_ms: duration_s.map(|d| d * 1000),
            completed,
            device: DeviceId::parse("device", "tv").unwrap(),
            updated_ms: 0,
        }
    }

    #[test]
    fn resume_rules() {
        let rules = ResumeRules::default();
        let at = |p: Progress| rules.resume_at(Some(&p)) / 1000;
        assert_eq!(rules.resume_at(None), 0, "nothing watched");
        assert_eq!(at(progress(1200, Some(6000), false)), 1200, "midway");
        assert_eq!(at(progress(290, Some(6000), false)), 0, "under 5 %");
        assert_eq!(at(progress(300, Some(6000), false)), 300, "at 5 %");
        assert_eq!(at(progress(5400, Some(6000), false)), 0, "at 90 %");
        assert_eq!(at(progress(5399, Some(6000), false)), 5399, "under 90 %");
        assert_eq!(at(progress(250, Some(299), false)), 0, "a short title");
        assert_eq!(at(progress(1200, Some(6000), true)), 0, "finished");
        assert_eq!(at(progress(1200, None, false)), 1200, "duration unknown");
        // The credits: the last 60 s of a title whose 99 % is further on.
        let credits = ResumeRules {
            complete_fraction: 0.99,
            credits: Duration::from_secs(60),
            ..rules
        };
        assert!(credits.finishes(5_940_000, 6_000_000));
        assert!(!credits.finishes(5_939_000, 6_000_000));
    }
}
