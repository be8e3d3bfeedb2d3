//! The caller's deadline, carried to the store. A call's `grpc-timeout` (bounded by
//! `--request-timeout`) becomes the call's [`Deadline`], put in the request's extensions
//! by [`DeadlineLayer`]; the transports hand it to the operations, which pass it to every
//! store call. A store call waits at most until shortly before it, so a store outage is
//! answered with UNAVAILABLE inside the caller's deadline instead of tonic's CANCELLED at
//! it. A stream gives each of its messages a deadline of its own.

use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// The longest time kept back from the deadline to answer in.
const MAX_MARGIN: Duration = Duration::from_millis(50);

/// When a call must be answered by, if the caller said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// No caller deadline: the store's own timeout bounds the call.
    pub const NONE: Deadline = Deadline(None);

    pub fn at(instant: Instant) -> Self {
        Self(Some(instant))
    }

    pub fn after(timeout: Duration) -> Self {
        Self::at(Instant::now() + timeout)
    }

    /// The deadline [`DeadlineLayer`] gave a request; `NONE` without the layer.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Deadline>()
            .copied()
            .unwrap_or_default()
    }

    /// How long a store call may wait: its own timeout, or less when this deadline is
    /// nearer (keeping a tenth of what remains, at most 50 ms, to answer in).
    pub fn budget(self, store_timeout: Duration) -> Duration {
        let Some(deadline) = self.0 else {
            return store_timeout;
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let margin = (remaining / 10).min(MAX_MARGIN);
        store_timeout.min(remaining.saturating_sub(margin))
    }
}

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
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let asked = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        let timeout = asked.map_or(self.request_timeout, |t| t.min(self.request_timeout));
        request.extensions_mut().insert(Deadline::after(timeout));
        self.inner.call(request)
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
            Deadline::NONE.budget(store_timeout),
            store_timeout,
            "no deadline: the store's own"
        );
        let near = Deadline::after(Duration::from_millis(300)).budget(store_timeout);
        assert!(
            near <= Duration::from_millis(270) && near >= Duration::from_millis(200),
            "{near:?}"
        );
        let far = Deadline::after(Duration::from_secs(10));
        assert_eq!(far.budget(store_timeout), store_timeout);
        let passed = Deadline::at(Instant::now() - Duration::from_millis(1));
        assert_eq!(passed.budget(store_timeout), Duration::ZERO);
    }
}
