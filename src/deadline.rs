//! The caller's deadline, carried to the store. A call's `grpc-timeout` (bounded by
//! `--request-timeout`) becomes a task-local deadline for the call's future; store calls
//! wait at most until shortly before it, so a store outage is answered with UNAVAILABLE
//! inside the caller's deadline instead of tonic's CANCELLED at it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// The longest time kept back from the deadline to answer in.
const MAX_MARGIN: Duration = Duration::from_millis(50);

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long a store call may wait: its own timeout, or less when the caller's deadline
/// is nearer (keeping a tenth of what remains, at most 50 ms, to answer in).
pub fn budget(store_timeout: Duration) -> Duration {
    let Ok(deadline) = DEADLINE.try_with(|deadline| *deadline) else {
        return store_timeout;
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let margin = (remaining / 10).min(MAX_MARGIN);
    store_timeout.min(remaining.saturating_sub(margin))
}

/// Runs `future` with `deadline` as the caller's deadline.
pub async fn scope<F: Future>(deadline: Instant, future: F) -> F::Output {
    DEADLINE.scope(deadline, future).await
}

/// Sets each call's deadline from its `grpc-timeout`, bounded by the server's request
/// timeout.
#[derive(Clone)]
pub struct DeadlineLayer {
    request_timeout: Duration,
}

impl DeadlineLayer {
    pub fn new(request_timeout: Duration) -> Self {
        Self { request_timeout }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone)]
pub struct DeadlineService<S> {
    inner: S,
    request_timeout: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for DeadlineService<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let asked = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        let timeout = asked.map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let deadline = Instant::now() + timeout;
        // The clone is ready only if polled; take the polled one (tower's pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(scope(deadline, async move { inner.call(request).await }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }

    #[tokio::test]
    async fn the_budget_keeps_a_margin_before_the_deadline() {
        let store_timeout = Duration::from_secs(1);
        assert_eq!(
            budget(store_timeout),
            store_timeout,
            "no deadline: the store's own"
        );
        let near = Instant::now() + Duration::from_millis(300);
        let inside = scope(near, async { budget(store_timeout) }).await;
        assert!(
            inside <= Duration::from_millis(270) && inside >= Duration::from_millis(200),
            "{inside:?}"
        );
        let far = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            scope(far, async { budget(store_timeout) }).await,
            store_timeout
        );
    }
}
