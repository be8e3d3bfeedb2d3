//! Histories of one user's seat grants, recorded from outside through the public API, and
//! checked for linearizability against a sequential model of the seat semaphore by a
//! Wing & Gong search (every order that respects real time, memoized on the calls placed
//! and the model's state).
//!
//! The model: a user holds at most `limit` seats. A create on a device that holds one
//! replaces it; otherwise a create over the limit is refused (REJECT_NEW). A stop of a
//! held seat releases it; of anything else it is SESSION_ENDED. A heartbeat is answered
//! OK only while its session holds a seat, and refused (NOT_FOUND, SESSION_ENDED) only
//! when it does not. An expiry releases a seat; it may happen at any time from the
//! session's earliest deadline on (its last acknowledged create or heartbeat, plus the
//! heartbeat timeout), never before, so a seat released early is a violation too.
//!
//! A call that failed for any other reason (a timeout, UNAVAILABLE) is an unknown
//! outcome: it may or may not have taken effect, at any time after it began.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;

use crate::proto;
use crate::proto::playback_session_service_client::PlaybackSessionServiceClient;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Create {
        device: u8,
    },
    Stop {
        session: String,
    },
    Heartbeat {
        session: String,
    },
    /// The session's heartbeat deadline passed (synthesized: see [`History::finish`]).
    Expire {
        session: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ret {
    Created {
        session: String,
    },
    /// CONCURRENCY_LIMIT_REACHED.
    Limit,
    /// A stop or heartbeat that was answered OK.
    Ok,
    /// A stop or heartbeat refused: the session holds no seat.
    Ended,
    /// Failed for another reason: it may or may not have taken effect.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Op {
    pub call: Call,
    pub ret: Ret,
    /// Nanoseconds since the history began.
    pub start: u64,
    /// `u64::MAX` when the call may take effect any time after its start.
    pub end: u64,
}

impl Op {
    pub fn new(call: Call, ret: Ret, start: u64, end: u64) -> Self {
        Op {
            call,
            ret,
            start,
            end,
        }
    }

    /// Whether the call must be placed: it answered, so it took effect.
    fn required(&self) -> bool {
        self.ret != Ret::Unknown && !matches!(self.call, Call::Expire { .. })
    }
}

/// The seats held, as (session, device), sorted: the model's state.
type Seats = Vec<(String, u8)>;

/// The states `op` may lead to from `seats`, given what it answered (none: it could not
/// have answered that here). A call that need not be placed (an unknown outcome, an
/// expiry) is offered only where it changes the seats: leaving it out explains the rest
/// as well, and its end is open, so it holds no other call back; without this the search
/// would try every subset of such no-ops.
fn step(seats: &Seats, op: &Op, index: usize, limit: usize) -> Vec<Seats> {
    let held = |session: &str| seats.iter().any(|s| s.0 == session);
    let without =
        |session: &str| -> Seats { seats.iter().filter(|s| s.0 != session).cloned().collect() };
    match &op.call {
        Call::Create { device } => {
            let others: Seats = seats.iter().filter(|s| s.1 != *device).cloned().collect();
            let admits = others.len() < limit;
            let with = |session: String| {
                let mut next = others.clone();
                next.push((session, *device));
                next.sort();
                next
            };
            match &op.ret {
                Ret::Created { session } if admits => vec![with(session.clone())],
                Ret::Limit if !admits => vec![seats.clone()],
                Ret::Unknown if admits => vec![with(format!("unknown-{index}"))],
                _ => vec![],
            }
        }
        Call::Stop { session } => match (&op.ret, held(session)) {
            (Ret::Ok | Ret::Unknown, true) => vec![without(session)],
            (Ret::Ended, false) => vec![seats.clone()],
            _ => vec![],
        },
        Call::Heartbeat { session } => match (&op.ret, held(session)) {
            (Ret::Ok, true) | (Ret::Ended, false) => vec![seats.clone()],
            _ => vec![],
        },
        Call::Expire { session } if held(session) => vec![without(session)],
        Call::Expire { .. } => vec![],
    }
}

/// The calls placed so far, one bit each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Placed(Vec<u64>);

impl Placed {
    fn new(len: usize) -> Self {
        Placed(vec![0; len.div_ceil(64)])
    }

    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn with(&self, i: usize) -> Self {
        let mut next = self.clone();
        next.0[i / 64] |= 1 << (i % 64);
        next
    }
}

/// How many states a search may visit before it gives up undecided: bounds its memory
/// (a state is a few hundred bytes) on a history it cannot settle.
pub const MAX_STATES: usize = 2_000_000;

/// Whether some order of `history` that respects real time (a call that answered before
/// another was made comes first) is a run of the model. Unknown outcomes and expiries
/// may be left out (an expiry left out happened after the history ended). `None` when
/// the search visited `MAX_STATES` states without an answer.
pub fn check(history: &[Op], limit: usize) -> Checked {
    let mut search = Search {
        history,
        limit,
        seen: HashSet::new(),
    };
    let found = search.from(Placed::new(history.len()), Vec::new());
    let states = search.seen.len();
    let verdict = if found {
        Some(true)
    } else if states >= MAX_STATES {
        None
    } else {
        Some(false)
    };
    Checked { verdict, states }
}

/// What a search found, and how many states it visited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    pub verdict: Option<bool>,
    pub states: usize,
}

/// [`check`], where undecided counts as not shown linearizable.
pub fn linearizable(history: &[Op], limit: usize) -> bool {
    check(history, limit).verdict == Some(true)
}

struct Search<'a> {
    history: &'a [Op],
    limit: usize,
    seen: HashSet<(Placed, Seats)>,
}

impl Search<'_> {
    fn from(&mut self, placed: Placed, seats: Seats) -> bool {
        let open = || (0..self.history.len()).filter(|i| !placed.has(*i));
        if open().all(|i| !self.history[i].required()) {
            return true;
        }
        if self.seen.len() >= MAX_STATES || !self.seen.insert((placed.clone(), seats.clone())) {
            return false;
        }
        // The earliest answer among the calls not placed yet: nothing that started after
        // it may come before that call.
        let earliest_end = open()
            .map(|i| self.history[i].end)
            .min()
            .unwrap_or(u64::MAX);
        let candidates: Vec<usize> = open()
            .filter(|i| self.history[*i].start <= earliest_end)
            .collect();
        for i in candidates {
            for next in step(&seats, &self.history[i], i, self.limit) {
                if self.from(placed.with(i), next) {
                    return true;
                }
            }
        }
        false
    }
}

/// One user's history, as it is recorded.
#[derive(Debug, Default)]
pub struct History {
    pub ops: Vec<Op>,
}

/// Slack for the expiry bound: the deadline is set on Redis' clock, the calls are timed
/// on this machine's.
const CLOCK_SLACK: Duration = Duration::from_millis(100);

impl History {
    /// Adds an expiry for every created session, from its earliest possible deadline:
    /// the latest start among its acknowledged create and heartbeats, plus `timeout`.
    pub fn finish(&mut self, timeout: Duration) {
        let mut last_proof: Vec<(String, u64)> = Vec::new();
        for op in &self.ops {
            let session = match (&op.call, &op.ret) {
                (Call::Create { .. }, Ret::Created { session }) => session,
                (Call::Heartbeat { session }, Ret::Ok) => session,
                _ => continue,
            };
            match last_proof.iter_mut().find(|(s, _)| s == session) {
                Some(entry) => entry.1 = entry.1.max(op.start),
                None => last_proof.push((session.clone(), op.start)),
            }
        }
        let after = (timeout.saturating_sub(CLOCK_SLACK)).as_nanos() as u64;
        for (session, proof) in last_proof {
            self.ops.push(Op::new(
                Call::Expire { session },
                Ret::Unknown,
                proof.saturating_add(after),
                u64::MAX,
            ));
        }
    }

    /// (admitted, refused for the limit, expiries that may have happened in it).
    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |f: &dyn Fn(&Op) -> bool| self.ops.iter().filter(|op| f(op)).count();
        let last = self
            .ops
            .iter()
            .filter(|op| op.end != u64::MAX)
            .map(|op| op.end)
            .max()
            .unwrap_or(0);
        (
            count(&|op| matches!(op.ret, Ret::Created { .. })),
            count(&|op| op.ret == Ret::Limit),
            count(&|op| matches!(op.call, Call::Expire { .. }) && op.start < last),
        )
    }
}

/// How one recording client behaves.
#[derive(Clone, Debug)]
pub struct Recording {
    /// Calls each client makes.
    pub calls: usize,
    /// Devices the user's creates choose from.
    pub devices: u8,
    /// A random pause of up to this between a client's calls.
    pub pause: Duration,
    /// Each call's deadline.
    pub timeout: Duration,
    /// A service key (`Bearer`) for a server that requires credentials.
    pub credential: Option<std::sync::Arc<str>>,
}

impl Recording {
    /// `message` as a call of this recording: its deadline, and `token` (a device call
    /// carries its session's playback token) or else the service credential.
    fn request<T>(&self, message: T, token: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(bearer) = token.or(self.credential.as_deref())
            && let Ok(value) = format!("Bearer {bearer}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

/// xorshift64: choices repeatable from a seed (the recordings', the soak's devices').
pub(crate) struct Random(pub(crate) u64);

impl Random {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.below(span + 1))
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.below(10_000) as f64 / 10_000.0 < p
    }
}

/// One client's calls against `user`, taking turns over `servers`: creates on random
/// devices; heartbeats, stops and abandonments (no more heartbeats: it will expire) of
/// the sessions it created. Returns its calls, timed from `began`.
pub async fn record_client(
    servers: Vec<PlaybackSessionServiceClient<Channel>>,
    user: String,
    seed: u64,
    plan: Recording,
    began: Instant,
) -> Vec<Op> {
    let mut random = Random(seed | 1);
    // The sessions it created, with their playback tokens.
    let mut mine: Vec<(String, String)> = Vec::new();
    let mut history = Vec::new();
    let since = |at: Instant| at.duration_since(began).as_nanos() as u64;
    for i in 0..plan.calls {
        let mut sessions = servers[(seed as usize + i) % servers.len()].clone();
        let choice = random.below(10);
        let start = Instant::now();
        let (call, ret) = if !mine.is_empty() && choice < 5 {
            let pick = random.below(mine.len() as u64) as usize;
            if choice == 0 {
                // Abandoned: never heard of again, so it can only expire.
                mine.swap_remove(pick);
                continue;
            }
            if choice < 3 {
                let (session, token) = mine.swap_remove(pick);
                let request = plan.request(
                    proto::StopSessionRequest {
                        name: session.clone(),
                        ..Default::default()
                    },
                    Some(&token),
                );
                let ret = match sessions.stop_session(request).await {
                    Ok(_) => Ret::Ok,
                    Err(status) if refused(&status) => Ret::Ended,
                    Err(_) => Ret::Unknown,
                };
                (Call::Stop { session }, ret)
            } else {
                let (session, token) = mine[pick].clone();
                let request = plan.request(
                    proto::HeartbeatRequest {
                        name: session.clone(),
                        ..Default::default()
                    },
                    Some(&token),
                );
                let ret = match sessions.heartbeat(request).await {
                    Ok(_) => Ret::Ok,
                    Err(status) if refused(&status) => {
                        mine.retain(|(s, _)| s != &session);
                        Ret::Ended
                    }
                    Err(_) => Ret::Unknown,
                };
                (Call::Heartbeat { session }, ret)
            }
        } else {
            let device = random.below(u64::from(plan.devices)) as u8;
            let request = crate::bench::create_request(&user, &format!("device-{device}"));
            let request = plan.request(request, None);
            let ret = match sessions.create_session(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    let session = answer.session.unwrap_or_default().name;
                    mine.push((session.clone(), answer.playback_token));
                    Ret::Created { session }
                }
                Err(status) if status.code() == Code::ResourceExhausted => Ret::Limit,
                Err(_) => Ret::Unknown,
            };
            (Call::Create { device }, ret)
        };
        let end = match ret {
            Ret::Unknown => u64::MAX,
            _ => since(Instant::now()),
        };
        history.push(Op::new(call, ret, since(start), end));
        let pause = random.below(plan.pause.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(pause)).await;
    }
    history
}

/// The session holds no seat: it ended, expired or was replaced (SESSION_ENDED), or is
/// gone (NOT_FOUND).
fn refused(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::NotFound | Code::FailedPrecondition)
}

/// Records `clients` clients' calls for `user` at once and adds the expiries.
pub async fn record(
    servers: &[PlaybackSessionServiceClient<Channel>],
    user: &str,
    clients: usize,
    seed: u64,
    plan: Recording,
    heartbeat_timeout: Duration,
) -> History {
    let began = Instant::now();
    let runs = (0..clients as u64).map(|c| {
        let seed = 0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(131).wrapping_add(c + 1);
        tokio::spawn(record_client(
            servers.to_vec(),
            user.to_owned(),
            seed,
            plan.clone(),
            began,
        ))
    });
    let mut history = History::default();
    for run in futures::future::join_all(runs).await {
        history.ops.extend(run.unwrap_or_default());
    }
    history.finish(heartbeat_timeout);
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(session: &str) -> Ret {
        Ret::Created {
            session: session.into(),
        }
    }

    fn create(device: u8) -> Call {
        Call::Create { device }
    }

    fn stop(session: &str) -> Call {
        Call::Stop {
            session: session.into(),
        }
    }

    fn beat(session: &str) -> Call {
        Call::Heartbeat {
            session: session.into(),
        }
    }

    /// The checker accepts what the model allows in some order and refuses a history no
    /// order explains.
    #[test]
    fn the_checker_tells_linearizable_histories_from_others() {
        let op = Op::new;
        // Limit 1: two creates that overlap, one admitted, one refused.
        let raced = [
            op(create(0), created("a"), 0, 10),
            op(create(1), Ret::Limit, 1, 9),
        ];
        assert!(linearizable(&raced, 1));
        // Two admitted one after the other with no stop between: the limit was broken.
        let broken = [
            op(create(0), created("a"), 0, 1),
            op(create(1), created("b"), 2, 3),
        ];
        assert!(!linearizable(&broken, 1));
        // ...unless a stop overlapping the second explains it.
        let explained = [
            op(create(0), created("a"), 0, 1),
            op(create(1), created("b"), 2, 5),
            op(stop("a"), Ret::Ok, 3, 4),
        ];
        assert!(linearizable(&explained, 1));
        // A seat is not released twice.
        let too_early = [
            op(create(0), created("a"), 0, 1),
            op(stop("a"), Ret::Ok, 2, 3),
            op(stop("a"), Ret::Ok, 4, 5),
        ];
        assert!(!linearizable(&too_early, 1));
        // An unknown create may have taken the seat: a later refusal is explained by it.
        let unknown = [
            op(create(0), Ret::Unknown, 0, u64::MAX),
            op(create(1), Ret::Limit, 5, 6),
        ];
        assert!(linearizable(&unknown, 1));
        // The same device replaces its own seat even at the limit.
        let replaced = [
            op(create(0), created("a"), 0, 1),
            op(create(0), created("b"), 2, 3),
            op(stop("a"), Ret::Ended, 4, 5),
        ];
        assert!(linearizable(&replaced, 1));
    }

    #[test]
    fn heartbeats_and_expiries_are_checked_against_the_seats() {
        let op = Op::new;
        let second = 1_000_000_000;
        let timeout = Duration::from_secs(3);
        let finished = |ops: Vec<Op>| {
            let mut history = History { ops };
            history.finish(timeout);
            history.ops
        };
        // A heartbeat refused while its seat is held, with nothing to explain it.
        let refused = finished(vec![
            op(create(0), created("a"), 0, 1),
            op(beat("a"), Ret::Ended, second, second + 1),
        ]);
        assert!(!linearizable(&refused, 1));
        // ...explained once its deadline has passed: it expired.
        let expired = finished(vec![
            op(create(0), created("a"), 0, 1),
            op(beat("a"), Ret::Ended, 4 * second, 4 * second + 1),
        ]);
        assert!(linearizable(&expired, 1));
        // A heartbeat answered OK after the seat was released.
        let after_stop = finished(vec![
            op(create(0), created("a"), 0, 1),
            op(stop("a"), Ret::Ok, 2, 3),
            op(beat("a"), Ret::Ok, 4, 5),
        ]);
        assert!(!linearizable(&after_stop, 1));
        // A second device admitted at the limit, before the first could have expired
        // (its heartbeat at 2 s moved the deadline to 5 s): a seat released early.
        let early = finished(vec![
            op(create(0), created("a"), 0, 1),
            op(beat("a"), Ret::Ok, 2 * second, 2 * second + 1),
            op(create(1), created("b"), 4 * second, 4 * second + 1),
        ]);
        assert!(!linearizable(&early, 1));
        // ...and after it could have: the expiry explains the seat.
        let late = finished(vec![
            op(create(0), created("a"), 0, 1),
            op(beat("a"), Ret::Ok, 2 * second, 2 * second + 1),
            op(create(1), created("b"), 6 * second, 6 * second + 1),
        ]);
        assert!(linearizable(&late, 1));
        let (admitted, limited, expiries) = History { ops: late }.counts();
        assert_eq!((admitted, limited, expiries), (2, 0, 1));
    }

    /// Calls that need not be placed and change nothing (the expiry of a stopped session,
    /// a heartbeat with no answer) are not tried: a search that must exhaust a long
    /// history full of them stays small instead of trying every subset of them.
    #[test]
    fn calls_that_change_nothing_do_not_multiply_the_search() {
        let mut ops = Vec::new();
        for i in 0..100u64 {
            let session = format!("s{i}");
            let t = i * 10;
            ops.push(Op::new(create(0), created(&session), t, t + 1));
            ops.push(Op::new(stop(&session), Ret::Ok, t + 2, t + 3));
            ops.push(Op::new(beat(&session), Ret::Unknown, t + 4, u64::MAX));
            let expire = Call::Expire { session };
            ops.push(Op::new(expire, Ret::Unknown, t + 5, u64::MAX));
        }
        // Two seats held at once under a limit of 1: no order explains it.
        ops.push(Op::new(create(1), created("x"), 2_000, 2_001));
        ops.push(Op::new(create(2), created("y"), 2_010, 2_011));
        let checked = check(&ops, 1);
        assert_eq!(checked.verdict, Some(false));
        assert!(checked.states < 10_000, "{} states", checked.states);
    }

    /// Histories longer than 64 calls (the soak's) are searched as well.
    #[test]
    fn long_histories_are_checked() {
        let mut ops = Vec::new();
        for i in 0..200u64 {
            let session = format!("s{i}");
            let t = i * 10;
            ops.push(Op::new(create(0), created(&session), t, t + 1));
            ops.push(Op::new(beat(&session), Ret::Ok, t + 2, t + 3));
        }
        assert!(linearizable(&ops, 1));
        // The last heartbeat of the first session, answered OK after it was replaced.
        ops.push(Op::new(beat("s0"), Ret::Ok, 5_000, 5_001));
        assert!(!linearizable(&ops, 1));
    }
}
