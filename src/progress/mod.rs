//! Watch progress, `users/{user}/profiles/{profile}/progress/{content}`: where each
//! profile stopped in each title (ADR 0009). The store keeps it, stamped with its own
//! clock; these are the operations of `ProgressService` and its gRPC adapter.

pub mod grpc;

use std::sync::Arc;

use crate::deadline::Deadline;
use crate::error::{Error, FieldViolation, Violations};
use crate::ids::{ContentId, DeviceId, ProfileId, UserId, position};
use crate::model::Progress;
use crate::proto;
use crate::store::{ProgressCursor, ProgressKey, ProgressWrite, Store};

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
        use base64::Engine;
        let plain = format!(
            "{PAGE_TOKEN_VERSION}/{user}/{profile}/{}/{}",
            self.cursor.updated_ms, self.cursor.content
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
    }

    fn decode(
        field: &str,
        value: &str,
        parent: Option<&(UserId, ProfileId)>,
    ) -> Result<Self, FieldViolation> {
        use base64::Engine;
        let malformed = || FieldViolation::new(field, "not a page token of ListProgress");
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(malformed)?;
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

/// The progress operations.
pub struct ProgressOps {
    store: Arc<dyn Store>,
}

impl ProgressOps {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub async fn get(&self, key: &ProgressKey, deadline: Deadline) -> Result<Progress, Error> {
        let resource = || {
            format!(
                "users/{}/profiles/{}/progress/{}",
                key.user, key.profile, key.content
            )
        };
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
        deadline: Deadline,
    ) -> Result<ProgressPage, Error> {
        let parent = || format!("users/{}/profiles/{}", request.user, request.profile);
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

    pub async fn update(
        &self,
        request: UpdateProgress,
        deadline: Deadline,
    ) -> Result<Progress, Error> {
        let write = request.0;
        let resource = format!(
            "users/{}/profiles/{}/progress/{}",
            write.key.user, write.key.profile, write.key.content
        );
        self.store
            .write_progress(write, deadline)
            .await
            .map_err(|e| e.into_error(|| resource))
    }

    pub async fn delete(&self, key: &ProgressKey, deadline: Deadline) -> Result<(), Error> {
        let resource = || {
            format!(
                "users/{}/profiles/{}/progress/{}",
                key.user, key.profile, key.content
            )
        };
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
