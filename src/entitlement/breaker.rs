//! A circuit breaker per entitlement service: after `failures` consecutive failures it
//! opens and calls fail at once for the cool-down; then one call goes through as a probe
//! (half-open) while the others still fail fast; the probe's success closes it, its
//! failure opens it again for another cool-down.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// What the breaker lets a call do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Call the service.
    Call,
    /// Call the service as the half-open probe.
    Probe,
    /// Do not call: the breaker is open.
    Refused,
}

/// The breaker's state as the metrics gauge shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    /// `failures` of 0 never opens.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a call go to the service now?
    pub fn permit(&self) -> Permit {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => Permit::Call,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                Permit::Probe
            }
            State::Open { .. } | State::HalfOpen => Permit::Refused,
        }
    }

    /// The outcome of a permitted call.
    pub fn record(&self, permit: Permit, success: bool) {
        let mut state = self.state();
        *state = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            // A probe that failed opens the breaker again.
            (State::HalfOpen, false) if permit == Permit::Probe => self.open(),
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if self.failures > 0 && failures >= self.failures {
                    self.open()
                } else {
                    State::Closed { failures }
                }
            }
            // A call let through before the breaker opened: the state stands.
            (other, false) => other,
        };
    }

    fn open(&self) -> State {
        State::Open {
            until: Instant::now() + self.cooldown,
        }
    }

    pub fn position(&self) -> Position {
        match *self.state() {
            State::Closed { .. } => Position::Closed,
            State::Open { .. } => Position::Open,
            State::HalfOpen => Position::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_n_failures_then_probes_once() {
        let breaker = Breaker::new(3, Duration::from_secs(5));
        for _ in 0..2 {
            assert_eq!(breaker.permit(), Permit::Call);
            breaker.record(Permit::Call, false);
        }
        assert_eq!(breaker.position(), Position::Closed);
        // A success in between starts the count again.
        breaker.record(Permit::Call, true);
        for _ in 0..3 {
            breaker.record(Permit::Call, false);
        }
        assert_eq!(breaker.position(), Position::Open);
        assert_eq!(breaker.permit(), Permit::Refused);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(breaker.permit(), Permit::Probe);
        assert_eq!(breaker.permit(), Permit::Refused, "one probe at a time");
        breaker.record(Permit::Probe, false);
        assert_eq!(
            breaker.position(),
            Position::Open,
            "a failed probe opens it again"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(breaker.permit(), Permit::Probe);
        breaker.record(Permit::Probe, true);
        assert_eq!(breaker.position(), Position::Closed);
        assert_eq!(breaker.permit(), Permit::Call);
    }

    #[test]
    fn zero_never_opens() {
        let breaker = Breaker::new(0, Duration::from_secs(5));
        for _ in 0..100 {
            breaker.record(Permit::Call, false);
        }
        assert_eq!(breaker.permit(), Permit::Call);
    }
}
