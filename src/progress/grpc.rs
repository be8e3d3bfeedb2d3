//! The gRPC adapter of `ProgressService`: decode, call [`ProgressOps`], encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{ListProgress, ProgressOps, UpdateProgress, name_of, parse_name};
use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::error::Error;
use crate::model::Progress;
use crate::proto;
use crate::proto::progress_service_server::ProgressService;

/// Serves `usher.v1.ProgressService`.
pub struct ProgressGrpc {
    ops: Arc<ProgressOps>,
}

impl ProgressGrpc {
    pub fn new(ops: Arc<ProgressOps>) -> Self {
        Self { ops }
    }
}

fn to_proto(progress: &Progress) -> proto::Progress {
    proto::Progress {
        name: name_of(progress),
        position: Some(crate::proto::duration_ms(progress.position_ms)),
        duration: progress.duration_ms.map(crate::proto::duration_ms),
        completed: progress.completed,
        device_id: progress.device.to_string(),
        update_time: Some(crate::proto::timestamp_ms(progress.updated_ms)),
    }
}

#[tonic::async_trait]
impl ProgressService for ProgressGrpc {
    async fn get_progress(
        &self,
        request: Request<proto::GetProgressRequest>,
    ) -> Result<Response<proto::GetProgressResponse>, Status> {
        let deadline = Deadline::of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let key = parse_name("name", &request.into_inner().name)
            .map_err(|v| Error::InvalidArgument(vec![v]))?;
        let progress = self.ops.get(&key, caller.as_ref(), deadline).await?;
        Ok(Response::new(proto::GetProgressResponse {
            progress: Some(to_proto(&progress)),
        }))
    }

    async fn list_progress(
        &self,
        request: Request<proto::ListProgressRequest>,
    ) -> Result<Response<proto::ListProgressResponse>, Status> {
        let deadline = Deadline::of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let request = ListProgress::try_from(request.into_inner())?;
        let page = self.ops.list(request, caller.as_ref(), deadline).await?;
        Ok(Response::new(proto::ListProgressResponse {
            progress: page.entries.iter().map(to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_progress(
        &self,
        request: Request<proto::UpdateProgressRequest>,
    ) -> Result<Response<proto::UpdateProgressResponse>, Status> {
        let deadline = Deadline::of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let request = UpdateProgress::try_from(request.into_inner())?;
        let progress = self.ops.update(request, caller.as_ref(), deadline).await?;
        Ok(Response::new(proto::UpdateProgressResponse {
            progress: Some(to_proto(&progress)),
        }))
    }

    async fn delete_progress(
        &self,
        request: Request<proto::DeleteProgressRequest>,
    ) -> Result<Response<proto::DeleteProgressResponse>, Status> {
        let deadline = Deadline::of(&request);
        let caller = request.extensions().get::<Caller>().cloned();
        let key = parse_name("name", &request.into_inner().name)
            .map_err(|v| Error::InvalidArgument(vec![v]))?;
        self.ops.delete(&key, caller.as_ref(), deadline).await?;
        Ok(Response::new(proto::DeleteProgressResponse {}))
    }
}
