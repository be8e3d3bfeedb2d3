//! The gRPC adapter of `EventService`: decode, call [`EventOps`], encode.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{EventOps, WatchEvents};
use crate::proto;
use crate::proto::event_service_server::EventService;

/// Serves `usher.v1.EventService`.
pub struct EventGrpc {
    ops: Arc<EventOps>,
}

impl EventGrpc {
    pub fn new(ops: Arc<EventOps>) -> Self {
        Self { ops }
    }
}

type Batches = Pin<Box<dyn Stream<Item = Result<proto::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for EventGrpc {
    type WatchEventsStream = Batches;

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<Batches>, Status> {
        let partitions = self.ops.partitions();
        let request = WatchEvents::parse(request.into_inner(), partitions)?;
        let batches = self.ops.watch(request).await?;
        let stream = ReceiverStream::new(batches).map(|batch| batch.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let page = self.ops.list(request.into_inner()).await?;
        Ok(Response::new(proto::ListEventsResponse {
            events: page.events,
            next_page_token: page.next_page_token,
        }))
    }
}
