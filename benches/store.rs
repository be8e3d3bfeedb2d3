//! The store's numbers for DESIGN.md's scale sum: `cargo bench --bench store`.
//!
//! - R: heartbeat scripts per second on one Redis shard (a redis-server started here, on a
//!   free loopback port), beside the memory store's rate in the same run; and the same
//!   per second of redis-server CPU time, what one shard does with a core of its own;
//! - creates (create-and-acquire scripts) per second, the same way: for a user's first
//!   session, and beside the user's sessions on two other devices (limit 2, the oldest
//!   stopped), where the Redis script asks for their records and runs a second time;
//! - B: Redis memory per active session (used_memory before and after 10,000 sessions,
//!   with their keys, sweep entries and started events);
//! - M: the memory store's live heap per active session (this process' allocations,
//!   counted, before and after 20,000 sessions), and of it the started events' share
//!   (the same beside a store whose event logs keep one entry each).
//!
//! usher, its clients and redis-server share this machine's cores, so R is a lower bound
//! of what a shard does on its own core. It reports numbers; it never fails on a timing.

#[path = "../tests/it/support/redis.rs"]
#[expect(dead_code, reason = "shared with the tests; the bench uses part of it")]
mod redis;
#[expect(dead_code, reason = "shared by the benches; this one uses part of it")]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use usher::deadline::Deadline;
use usher::ids::DeviceId;
use usher::session::PlaybackState;
use usher::store::memory::MemoryStore;
use usher::store::{
    DeviceAction, DeviceCall, HeartbeatEvents, NewSession, OverLimitPolicy, Store, StoreSettings,
};

/// The system allocator, counting the bytes live: what the memory store holds, apart
/// from any allocator's slack.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const IN_FLIGHT: usize = 64;
const MEMORY_SESSIONS: usize = 20_000;
const RUN: Duration = Duration::from_secs(3);
const SESSIONS: usize = 10_000;

fn settings() -> StoreSettings {
    StoreSettings {
        heartbeat_events: HeartbeatEvents::Sampled,
        ..StoreSettings::default()
    }
}

fn create(user: usize) -> NewSession {
    usher::bench::new_session(&format!("user-{user}"), 4).unwrap()
}

/// Operations per second of `operation` run by IN_FLIGHT tasks for RUN.
async fn rate<F, Fut>(operation: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let deadline = Instant::now() + RUN;
    let started = Instant::now();
    let tasks = (0..IN_FLIGHT).map(|task| {
        let operation = operation.clone();
        tokio::spawn(async move {
            let mut done = 0usize;
            while Instant::now() < deadline {
                operation(task * 1_000_000 + done).await;
                done += 1;
            }
            done
        })
    });
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// The rates of one store.
struct Rates {
    heartbeats: f64,
    first_creates: f64,
    crowded_creates: f64,
    heartbeats_per_cpu_second: f64,
}

/// The rates of `store`; `pid` is its redis-server's.
async fn rates(store: Arc<dyn Store>, pid: Option<u32>) -> Rates {
    let mut names = Vec::new();
    for user in 0..IN_FLIGHT * 4 {
        names.push(
            store
                .create_session(create(user), Deadline::NONE)
                .await
                .unwrap()
                .session
                .name,
        );
    }
    let names = Arc::new(names);
    let heartbeat_store = store.clone();
    let cpu_before = pid.map(support::cpu_seconds);
    let wall = Instant::now();
    let heartbeats = rate(move |i| {
        let store = heartbeat_store.clone();
        let names = names.clone();
        async move {
            let playing = DeviceAction::Heartbeat {
                playback_state: PlaybackState::Playing,
            };
            let call = DeviceCall {
                position_ms: Some(i as u64),
                ..DeviceCall::new(names[i % names.len()].clone(), None, playing)
            };
            store.device_call(call, Deadline::NONE).await.unwrap();
        }
    })
    .await;
    let per_cpu_second = match (pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let used = support::cpu_seconds(pid) - before;
            heartbeats * wall.elapsed().as_secs_f64() / used.max(0.01)
        }
        _ => f64::NAN,
    };
    let first_store = store.clone();
    let first_creates = rate(move |i| {
        let store = first_store.clone();
        async move {
            // A fresh user each time: every create takes a free seat.
            store
                .create_session(create(10_000_000 + i), Deadline::NONE)
                .await
                .unwrap();
        }
    })
    .await;
    let crowded_creates = rate(move |i| {
        let store = store.clone();
        async move {
            // 256 users, each already on two devices: every create stops the oldest.
            let mut new = create(20_000_000 + i % 256);
            new.device.id = DeviceId::parse("d", &format!("device-{i}")).unwrap();
            new.limit = 2;
            new.policy = OverLimitPolicy::StopOldest;
            store.create_session(new, Deadline::NONE).await.unwrap();
        }
    })
    .await;
    Rates {
        heartbeats,
        first_creates,
        crowded_creates,
        heartbeats_per_cpu_second: per_cpu_second,
    }
}

fn used_memory(server: &redis::RedisServer) -> u64 {
    server
        .cli(&["info", "memory"])
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

async fn redis_store(server: &redis::RedisServer, prefix: &str) -> Arc<dyn Store> {
    support::redis_store(server.url(), prefix, settings()).await
}

async fn run() {
    let server = redis::RedisServer::start();
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new(settings()));
    let memory = rates(memory, None).await;
    let redis = rates(redis_store(&server, "rate").await, server.pid()).await;
    println!(
        "store operations per second, {IN_FLIGHT} in flight, {}s each",
        RUN.as_secs()
    );
    println!("{:<22} {:>12} {:>12} {:>8}", "", "memory", "redis", "ratio");
    for (what, memory, redis) in [
        ("heartbeat", memory.heartbeats, redis.heartbeats),
        (
            "create, first session",
            memory.first_creates,
            redis.first_creates,
        ),
        (
            "create, 2 devices on",
            memory.crowded_creates,
            redis.crowded_creates,
        ),
    ] {
        println!(
            "{what:<22} {memory:>12.0} {redis:>12.0} {:>7.1}x",
            memory / redis
        );
    }
    let (redis_heartbeats, per_redis_cpu_second) =
        (redis.heartbeats, redis.heartbeats_per_cpu_second);
    println!(
        "heartbeat scripts per second of redis-server CPU (a shard with its own core): {per_redis_cpu_second:.0}"
    );

    // B: a fresh server, so nothing else is in its memory.
    let fresh = redis::RedisServer::start();
    let store = redis_store(&fresh, "usher").await;
    let before = used_memory(&fresh);
    for user in 0..SESSIONS {
        store
            .create_session(create(user), Deadline::NONE)
            .await
            .unwrap();
    }
    let after = used_memory(&fresh);
    let per_session = (after - before) as f64 / SESSIONS as f64;
    println!();
    println!(
        "redis memory per active session (keys, sweep entry, started event): {per_session:.0} bytes"
    );

    println!();
    println!("DESIGN.md's sum with these numbers (30 million streams, one heartbeat per 30 s):");
    println!(
        "  1e6 heartbeat scripts/s / R = {:.0} shards at R = {redis_heartbeats:.0}/s (measured here), \
         {:.0} shards at R = {per_redis_cpu_second:.0}/s (per redis CPU second)",
        1e6 / redis_heartbeats,
        1e6 / per_redis_cpu_second
    );
    println!(
        "  3e7 sessions x B = {:.1} GB at B = {per_session:.0} bytes",
        3e7 * per_session / 1e9
    );
}

/// M: the memory store's live heap per session, with every partition's event log and
/// beside logs of one entry each (so the difference is the started events').
async fn memory_store_heap() {
    let heap_per_session = async |settings: StoreSettings| {
        let store = MemoryStore::new(settings);
        let before = LIVE.load(Ordering::Relaxed);
        for user in 0..MEMORY_SESSIONS {
            store
                .create_session(create(user), Deadline::NONE)
                .await
                .unwrap();
        }
        let per_session = (LIVE.load(Ordering::Relaxed) - before) as f64 / MEMORY_SESSIONS as f64;
        drop(store);
        per_session
    };
    let with_events = heap_per_session(settings()).await;
    let without_events = heap_per_session(StoreSettings {
        event_stream_maxlen: 1,
        ..settings()
    })
    .await;
    println!(
        "memory store live heap per active session: {with_events:.0} bytes; without its \
         started event {without_events:.0} bytes"
    );
}

/// Runs the parts named on the command line (`rates`, `memory`), or all.
async fn run_named() {
    if support::wanted("rates") {
        run().await;
        println!();
    }
    if support::wanted("memory") {
        memory_store_heap().await;
    }
}

fn main() {
    support::block_on(run_named());
}
