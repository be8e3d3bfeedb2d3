//! Tower layers of the gRPC listener that concern the transport, not any one service:
//!
//! - [`ConnectionLayer`] marks a connection as served at its first request (ending its
//!   handshake deadline, see `crate::net`) and bounds `grpc.health.v1.Health/Watch`
//!   streams per connection and per instance: health stays unauthenticated for probes,
//!   and a watch is a stream that never ends by itself, so unbounded they would be a way
//!   to pin memory and tasks.
//! - [`StatusDetailsLayer`] gives the refusals tonic makes itself (unknown method,
//!   unsupported encoding, oversized message) an `ErrorInfo`, like every other refusal.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

use crate::error::Error;
use crate::net::ConnectionInfo;

const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// See the module docs.
#[derive(Clone)]
pub struct ConnectionLayer {
    watches: Arc<WatchLimits>,
}

struct WatchLimits {
    open: AtomicUsize,
    max: usize,
    max_per_connection: usize,
}

impl ConnectionLayer {
    pub fn new(max_health_watches: usize, max_health_watches_per_connection: usize) -> Self {
        Self {
            watches: Arc::new(WatchLimits {
                open: AtomicUsize::new(0),
                max: max_health_watches,
                max_per_connection: max_health_watches_per_connection,
            }),
        }
    }
}

impl<S> tower::Layer<S> for ConnectionLayer {
    type Service = ConnectionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectionService {
            inner,
            watches: self.watches.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConnectionService<S> {
    inner: S,
    watches: Arc<WatchLimits>,
}

/// One open watch, counted on its connection and on the instance until its response
/// body is dropped.
struct WatchSlot {
    watches: Arc<WatchLimits>,
    connection: Option<ConnectionInfo>,
}

impl WatchSlot {
    fn take(
        watches: &Arc<WatchLimits>,
        connection: Option<&ConnectionInfo>,
    ) -> Result<Self, Error> {
        if watches.open.fetch_add(1, Ordering::AcqRel) >= watches.max {
            watches.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::TooManyWatches("instance"));
        }
        if let Some(connection) = connection {
            let counter = connection.health_watches();
            if counter.fetch_add(1, Ordering::AcqRel) >= watches.max_per_connection {
                counter.fetch_sub(1, Ordering::AcqRel);
                watches.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Error::TooManyWatches("connection"));
            }
        }
        Ok(Self {
            watches: watches.clone(),
            connection: connection.cloned(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.watches.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(connection) = &self.connection {
            connection.health_watches().fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A response body that holds a watch slot for as long as it streams.
struct SlotBody {
    inner: Body,
    _slot: WatchSlot,
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> tower::Service<http::Request<B>> for ConnectionService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let connection = ConnectionInfo::of(request.extensions()).cloned();
        if let Some(connection) = &connection {
            connection.mark_served();
        }
        let slot = if request.uri().path() == HEALTH_WATCH {
            match WatchSlot::take(&self.watches, connection.as_ref()) {
                Ok(slot) => Some(slot),
                Err(error) => {
                    tracing::warn!(
                        peer = ?connection.as_ref().and_then(ConnectionInfo::remote_addr),
                        %error,
                        "health watch refused"
                    );
                    let response = Status::from(error).into_http();
                    return Box::pin(async move { Ok(response) });
                }
            }
        } else {
            None
        };
        // The clone is ready only if polled; take the polled one (tower's pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(match slot {
                None => response,
                Some(slot) => response.map(|body| {
                    Body::new(SlotBody {
                        inner: body,
                        _slot: slot,
                    })
                }),
            })
        })
    }
}

/// See the module docs.
#[derive(Clone, Copy, Default)]
pub struct StatusDetailsLayer;

impl<S> tower::Layer<S> for StatusDetailsLayer {
    type Service = StatusDetailsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusDetailsService { inner }
    }
}

#[derive(Clone)]
pub struct StatusDetailsService<S> {
    inner: S,
}

const DETAILS_HEADER: &str = "grpc-status-details-bin";

/// Rewrites a trailers-only error response that has no details into usher's form.
fn add_details<B>(response: &mut http::Response<B>) {
    let headers = response.headers_mut();
    if headers.contains_key(DETAILS_HEADER) {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() == tonic::Code::Ok {
        return;
    }
    let rewritten = crate::error::transport_status(&status);
    headers.remove("grpc-status");
    headers.remove("grpc-message");
    if let Err(error) = rewritten.add_header(headers) {
        tracing::warn!(%error, "status details not added");
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for StatusDetailsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            add_details(&mut response);
            Ok(response)
        })
    }
}
