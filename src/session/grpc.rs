//! The gRPC adapter of `PlaybackSessionService`: decode, call [`Sessions`], encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::ops::{
    CreateSession, DeviceRequest, ListSessions, Sessions, TerminateSession, manifest_type,
};
use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::error::Violations;
use crate::ids::SessionName;
use crate::manifest::{Manifest, ManifestType};
use crate::proto;
use crate::proto::playback_session_service_server::PlaybackSessionService;

/// Serves `usher.v1.PlaybackSessionService`.
pub struct SessionGrpc {
    sessions: Arc<Sessions>,
}

impl SessionGrpc {
    pub fn new(sessions: Arc<Sessions>) -> Self {
        Self { sessions }
    }

    /// Decodes a device request and runs it as the caller the auth layer established.
    async fn device_call<T>(&self, request: Request<T>) -> Result<proto::Session, Status>
    where
        DeviceRequest: TryFrom<T, Error = crate::error::Error>,
    {
        let deadline = Deadline::of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let request = DeviceRequest::try_from(request.into_inner())?;
        let session = self
            .sessions
            .device_call(request, caller.as_ref(), deadline)
            .await?;
        Ok(session.to_proto())
    }
}

#[tonic::async_trait]
impl PlaybackSessionService for SessionGrpc {
    async fn create_session(
        &self,
        request: Request<proto::CreateSessionRequest>,
    ) -> Result<Response<proto::CreateSessionResponse>, Status> {
        let deadline = Deadline::of(&request);
        let request = CreateSession::try_from(request.into_inner())?;
        let started = self.sessions.create(request, deadline).await?;
        let created = started.created;
        Ok(Response::new(proto::CreateSessionResponse {
            session: Some(created.session.to_proto()),
            playback_token: started.token.token,
            heartbeat: Some(self.sessions.policy().heartbeat()),
            replaced_sessions: created.replaced.iter().map(ToString::to_string).collect(),
            playback_token_expire_time: Some(crate::proto::timestamp_seconds(
                started.token.claims.exp,
            )),
            manifest: started.manifest.as_ref().map(manifest_to_proto),
            resume_position: Some(crate::proto::duration_ms(started.resume_position_ms)),
        }))
    }

    async fn get_manifest(
        &self,
        request: Request<proto::GetManifestRequest>,
    ) -> Result<Response<proto::GetManifestResponse>, Status> {
        let deadline = Deadline::of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let request = request.into_inner();
        let mut v = Violations::default();
        let name = v.check(SessionName::parse("name", &request.name));
        let kind = v.check(manifest_type("manifest_type", request.manifest_type));
        v.finish()?;
        let (Some(name), Some(kind)) = (name, kind) else {
            return Err(crate::error::Error::Internal("violations not recorded".into()).into());
        };
        let manifest = self
            .sessions
            .manifest(&name, kind, caller.as_ref(), deadline)
            .await?;
        Ok(Response::new(proto::GetManifestResponse {
            manifest: Some(manifest_to_proto(&manifest)),
        }))
    }

    async fn get_session(
        &self,
        request: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::GetSessionResponse>, Status> {
        let deadline = Deadline::of(&request);
        let name = SessionName::parse("name", &request.into_inner().name)
            .map_err(|v| crate::error::Error::InvalidArgument(vec![v]))?;
        let session = self.sessions.get(&name, deadline).await?;
        Ok(Response::new(proto::GetSessionResponse {
            session: Some(session.to_proto()),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        let deadline = Deadline::of(&request);
        let request = ListSessions::try_from(request.into_inner())?;
        let page = self.sessions.list(request, deadline).await?;
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: page.sessions.iter().map(|s| s.to_proto()).collect(),
            next_page_token: page.next.map(|token| token.encode()).unwrap_or_default(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let session = self.device_call(request).await?;
        Ok(Response::new(proto::HeartbeatResponse {
            session: Some(session),
            heartbeat: Some(self.sessions.policy().heartbeat()),
        }))
    }

    async fn pause_session(
        &self,
        request: Request<proto::PauseSessionRequest>,
    ) -> Result<Response<proto::PauseSessionResponse>, Status> {
        let session = self.device_call(request).await?;
        Ok(Response::new(proto::PauseSessionResponse {
            session: Some(session),
        }))
    }

    async fn resume_session(
        &self,
        request: Request<proto::ResumeSessionRequest>,
    ) -> Result<Response<proto::ResumeSessionResponse>, Status> {
        let session = self.device_call(request).await?;
        Ok(Response::new(proto::ResumeSessionResponse {
            session: Some(session),
        }))
    }

    async fn stop_session(
        &self,
        request: Request<proto::StopSessionRequest>,
    ) -> Result<Response<proto::StopSessionResponse>, Status> {
        let session = self.device_call(request).await?;
        Ok(Response::new(proto::StopSessionResponse {
            session: Some(session),
        }))
    }

    async fn terminate_session(
        &self,
        request: Request<proto::TerminateSessionRequest>,
    ) -> Result<Response<proto::TerminateSessionResponse>, Status> {
        let deadline = Deadline::of(&request);
        let by = request
            .extensions()
            .get::<Caller>()
            .map_or("unknown", Caller::name)
            .to_owned();
        let request = TerminateSession::try_from(request.into_inner())?;
        let session = self.sessions.terminate(request, &by, deadline).await?;
        Ok(Response::new(proto::TerminateSessionResponse {
            session: Some(session.to_proto()),
        }))
    }
}

/// A signed manifest URL as the API gives it.
pub fn manifest_to_proto(manifest: &Manifest) -> proto::Manifest {
    proto::Manifest {
        url: manifest.url.clone(),
        r#type: match manifest.kind {
            ManifestType::Hls => proto::ManifestType::Hls,
            ManifestType::Dash => proto::ManifestType::Dash,
        } as i32,
        expire_time: Some(prost_types::Timestamp::from(manifest.expires)),
    }
}
