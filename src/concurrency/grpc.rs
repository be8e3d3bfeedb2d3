//! The gRPC adapter of `ConcurrencyService`: decode, call [`ConcurrencyOps`], encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Admission, AvailabilityQuery, ConcurrencyOps};
use crate::deadline::Deadline;
use crate::error::Error;
use crate::proto;
use crate::proto::concurrency_service_server::ConcurrencyService;

/// Serves `usher.v1.ConcurrencyService`.
pub struct ConcurrencyGrpc {
    ops: Arc<ConcurrencyOps>,
}

impl ConcurrencyGrpc {
    pub fn new(ops: Arc<ConcurrencyOps>) -> Self {
        Self { ops }
    }
}

#[tonic::async_trait]
impl ConcurrencyService for ConcurrencyGrpc {
    async fn get_concurrency(
        &self,
        request: Request<proto::GetConcurrencyRequest>,
    ) -> Result<Response<proto::GetConcurrencyResponse>, Status> {
        let deadline = Deadline::of(&request);
        let user = crate::ids::parse_concurrency_name("name", &request.into_inner().name)
            .map_err(|v| Error::InvalidArgument(vec![v]))?;
        let concurrency = self.ops.get(user, deadline).await?;
        Ok(Response::new(proto::GetConcurrencyResponse {
            concurrency: Some(concurrency.to_proto()),
        }))
    }

    async fn check_availability(
        &self,
        request: Request<proto::CheckAvailabilityRequest>,
    ) -> Result<Response<proto::CheckAvailabilityResponse>, Status> {
        let deadline = Deadline::of(&request);
        let query = AvailabilityQuery::try_from(request.into_inner())?;
        let (admission, concurrency) = self.ops.check(query, deadline).await?;
        let (admitted, kind, denial) = match &admission {
            Admission::FreeSeat => (true, proto::Admission::FreeSeat, None),
            Admission::ReplacesDeviceSession(_) => {
                (true, proto::Admission::ReplacesDeviceSession, None)
            }
            Admission::EvictsOldest(_) => (true, proto::Admission::EvictsOldest, None),
            Admission::LimitReached => (false, proto::Admission::LimitReached, None),
            Admission::Denied(denial) => (false, proto::Admission::Denied, Some(denial.reason())),
        };
        Ok(Response::new(proto::CheckAvailabilityResponse {
            admitted,
            admission: kind as i32,
            replaced_sessions: admission
                .replaced()
                .iter()
                .map(ToString::to_string)
                .collect(),
            concurrency: Some(concurrency.to_proto()),
            denial_reason: denial.unwrap_or_default().to_owned(),
        }))
    }
}
