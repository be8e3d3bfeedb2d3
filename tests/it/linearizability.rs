//! The history of seat grants is linearizable: concurrent creates and stops of one user,
//! from several clients through three usher instances on one Redis, each recorded with
//! when it was called and when it answered (a call that failed for any other reason is
//! an unknown outcome: it may or may not have taken effect), checked against a
//! sequential model of the seat semaphore by a Wing & Gong search (every order that
//! respects real time, memoized on the set of calls placed and the model's state).
//!
//! The model: a user holds at most `LIMIT` seats; a create on a device that holds one
//! replaces it; otherwise a create over the limit is refused (REJECT_NEW); a stop of a
//! held seat releases it, and of anything else is SESSION_ENDED.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tonic::Code;
use usher::proto;
use usher::store::redis::RedisTarget;

use crate::race::{LIMIT, redis_instances};
use crate::support::{create_request, fresh_user, reason, redis, test_settings, unique_prefix};

#[derive(Clone, Debug)]
enum Call {
    Create { device: u8 },
    Stop { session: String },
}

#[derive(Clone, Debug, PartialEq)]
enum Ret {
    Created {
        session: String,
    },
    Limit,
    Stopped,
    Ended,
    /// Failed for another reason (a timeout, say): it may or may not have taken effect.
    Unknown,
}

#[derive(Clone, Debug)]
struct Op {
    call: Call,
    ret: Ret,
    /// Nanoseconds since the history began.
    start: u64,
    /// `u64::MAX` for an unknown outcome: it may take effect any time after its start.
    end: u64,
}

/// The seats held, as (session, device), sorted: the model's state.
type Seats = Vec<(String, u8)>;

/// The states `op` may lead to from `seats`, given what it answered (none: it could not
/// have answered that here).
fn step(seats: &Seats, op: &Op, index: usize, limit: usize) -> Vec<Seats> {
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
                Ret::Unknown if admits => vec![with(format!("unknown-{index}")), seats.clone()],
                Ret::Unknown => vec![seats.clone()],
                _ => vec![],
            }
        }
        Call::Stop { session } => {
            let held = seats.iter().any(|s| &s.0 == session);
            let without: Seats = seats.iter().filter(|s| &s.0 != session).cloned().collect();
            match (&op.ret, held) {
                (Ret::Stopped, true) => vec![without],
                (Ret::Ended, false) => vec![seats.clone()],
                (Ret::Unknown, true) => vec![without, seats.clone()],
                (Ret::Unknown, false) => vec![seats.clone()],
                _ => vec![],
            }
        }
    }
}

/// Whether some order of `history` that respects real time (a call that answered before
/// another was made comes first) is a run of the model. Unknown outcomes may be left out.
fn linearizable(history: &[Op], limit: usize) -> bool {
    assert!(
        history.len() <= 64,
        "the search keeps placed calls in a u64"
    );
    let required: u64 = history
        .iter()
        .enumerate()
        .filter(|(_, op)| op.ret != Ret::Unknown)
        .fold(0, |mask, (i, _)| mask | 1 << i);
    let mut seen = HashSet::new();
    search(history, limit, required, 0, Vec::new(), &mut seen)
}

fn search(
    history: &[Op],
    limit: usize,
    required: u64,
    placed: u64,
    seats: Seats,
    seen: &mut HashSet<(u64, Seats)>,
) -> bool {
    if placed & required == required {
        return true;
    }
    if !seen.insert((placed, seats.clone())) {
        return false;
    }
    // The earliest answer among the calls not placed yet: nothing that started after it
    // may come before that call.
    let earliest_end = (0..history.len())
        .filter(|i| placed & (1 << i) == 0)
        .map(|i| history[i].end)
        .min()
        .unwrap_or(u64::MAX);
    for (i, op) in history.iter().enumerate() {
        if placed & (1 << i) != 0 || op.start > earliest_end {
            continue;
        }
        for next in step(&seats, op, i, limit) {
            if search(history, limit, required, placed | 1 << i, next, seen) {
                return true;
            }
        }
    }
    false
}

fn op(call: Call, ret: Ret, start: u64, end: u64) -> Op {
    Op {
        call,
        ret,
        start,
        end,
    }
}

fn created(session: &str) -> Ret {
    Ret::Created {
        session: session.into(),
    }
}

/// The checker itself: it accepts what the model allows in some order and refuses a
/// history no order explains.
#[test]
fn the_checker_tells_linearizable_histories_from_others() {
    let create = |device| Call::Create { device };
    let stop = |session: &str| Call::Stop {
        session: session.into(),
    };
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
        op(stop("a"), Ret::Stopped, 3, 4),
    ];
    assert!(linearizable(&explained, 1));
    // A seat is not released twice.
    let too_early = [
        op(create(0), created("a"), 0, 1),
        op(stop("a"), Ret::Stopped, 2, 3),
        op(stop("a"), Ret::Stopped, 4, 5),
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

const CLIENTS: usize = 6;
const OPS_PER_CLIENT: usize = 8;
const DEVICES: u8 = 5;

/// One client's calls, alternating servers, against `user`: creates on random devices and
/// stops of sessions it was given.
async fn client(
    servers: Vec<
        proto::playback_session_service_client::PlaybackSessionServiceClient<
            tonic::transport::Channel,
        >,
    >,
    user: String,
    seed: u64,
    began: Instant,
) -> Vec<Op> {
    let mut random = seed | 1;
    let mut next = move || {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random
    };
    let mut mine: Vec<String> = Vec::new();
    let mut history = Vec::new();
    let since = |at: Instant| at.duration_since(began).as_nanos() as u64;
    for i in 0..OPS_PER_CLIENT {
        let mut sessions = servers[(seed as usize + i) % servers.len()].clone();
        let stop_one = !mine.is_empty() && next() % 3 == 0;
        let start = Instant::now();
        let (call, ret) = if stop_one {
            let session = mine.swap_remove((next() as usize) % mine.len());
            let mut request = tonic::Request::new(proto::StopSessionRequest {
                name: session.clone(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(2));
            let ret = match sessions.stop_session(request).await {
                Ok(_) => Ret::Stopped,
                Err(status) if reason(&status) == "SESSION_ENDED" => Ret::Ended,
                Err(_) => Ret::Unknown,
            };
            (Call::Stop { session }, ret)
        } else {
            let device = (next() % u64::from(DEVICES)) as u8;
            let mut request =
                tonic::Request::new(create_request(&user, &format!("device-{device}")));
            request.set_timeout(Duration::from_secs(2));
            let ret = match sessions.create_session(request).await {
                Ok(answer) => {
                    let session = answer.into_inner().session.unwrap().name;
                    mine.push(session.clone());
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
        history.push(Op {
            call,
            ret,
            start: since(start),
            end,
        });
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seat_grants_through_three_instances_on_one_redis_are_linearizable() {
    let server = redis::shared_redis();
    let prefix = unique_prefix();
    // No heartbeats: sessions must not expire while the history is made.
    let settings = usher::store::StoreSettings {
        heartbeat_timeout: Duration::from_secs(60),
        ..test_settings()
    };
    let target = RedisTarget::Single { url: server.url() };
    let instances = redis_instances(target, &prefix, 3, settings).await;
    let mut refused_total = 0;
    let clients: Vec<_> = instances
        .iter()
        .map(|(server, _)| server.sessions.clone())
        .collect();
    for round in 0..3u64 {
        let user = fresh_user().to_string();
        let began = Instant::now();
        let runs = (0..CLIENTS as u64).map(|c| {
            let seed = 0x9e37_79b9_7f4a_7c15 ^ (round * 131 + c + 1);
            tokio::spawn(client(clients.clone(), user.clone(), seed, began))
        });
        let history: Vec<Op> = futures::future::join_all(runs)
            .await
            .into_iter()
            .flat_map(|run| run.unwrap())
            .collect();
        let admitted = history
            .iter()
            .filter(|op| matches!(op.ret, Ret::Created { .. }))
            .count();
        let refused = history.iter().filter(|op| op.ret == Ret::Limit).count();
        println!(
            "round {round}: {} calls, {admitted} admitted, {refused} refused for the limit",
            history.len()
        );
        refused_total += refused;
        assert!(
            linearizable(&history, LIMIT as usize),
            "not linearizable: {history:#?}"
        );
    }
    assert!(refused_total > 0, "the histories never reached the limit");
    for (server, _) in instances {
        server.running.shutdown().await.unwrap();
    }
}
