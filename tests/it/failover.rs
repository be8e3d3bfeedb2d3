//! Redis failover. Redis replicates asynchronously, so a failover may lose writes it has
//! already acknowledged; DESIGN.md promises that usher follows the new primary by itself
//! and that, after such a loss, the seat limit is whole again within one heartbeat
//! interval (every heartbeat checks its seat). These tests fail a primary over while
//! devices beat, count the acknowledged seats that were lost, and time both promises.
//!
//! - Sentinel: a primary, a replica whose link runs through a [`Relay`] the test can hold,
//!   one Sentinel; usher is given only the Sentinel. Seats created while the link is held
//!   are acknowledged and never replicated: the crash of the primary loses exactly them.
//! - Cluster: three primaries with a replica each; `CLUSTER FAILOVER` on the replica of
//!   the primary that holds a partition, then a crash (SIGKILL) of another primary, while
//!   creates keep coming.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use usher::proto;
use usher::store::redis::{RedisStore, RedisTarget};
use usher::store::{OverLimitPolicy, Store, StoreSettings, partition_of};

use crate::support::redis::{RedisServer, Relay, redis_cli};
use crate::support::{
    TestServer, create_request, reason, redis_options, serve, test_settings, unique_prefix, user,
};

/// How often the test's devices beat: the interval within which the limit must be whole.
const INTERVAL: Duration = Duration::from_secs(1);
/// Time for a heartbeat in flight when the interval ends, on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(750);

/// Nothing expires during the outage: a lost seat is lost to the failover alone.
fn settings() -> StoreSettings {
    StoreSettings {
        heartbeat_timeout: Duration::from_secs(60),
        max_pause: Duration::from_secs(60),
        ..test_settings()
    }
}

/// Polls `done` every 50 ms for up to `within`.
fn wait_until(within: Duration, what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A replication offset from `INFO replication`.
fn offset(server: &RedisServer, field: &str) -> u64 {
    server
        .cli(&["info", "replication"])
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} on port {}", server.port))
}

/// A device that holds a session and heartbeats every [`INTERVAL`] until it is refused.
struct Device {
    user: String,
    session: String,
    /// Milliseconds from the test's epoch: the last heartbeat answered OK, and the first
    /// one refused (0: never).
    last_ok: AtomicU64,
    refused: AtomicU64,
    refusal: std::sync::Mutex<Option<(Code, String)>>,
}

impl Device {
    fn beat(self: &Arc<Self>, server: &TestServer, epoch: Instant) -> tokio::task::JoinHandle<()> {
        let device = self.clone();
        let mut sessions = server.sessions.clone();
        tokio::spawn(async move {
            loop {
                let mut request = tonic::Request::new(proto::HeartbeatRequest {
                    name: device.session.clone(),
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(2));
                let now = || epoch.elapsed().as_millis() as u64;
                match sessions.heartbeat(request).await {
                    Ok(_) => device.last_ok.store(now(), Ordering::Relaxed),
                    // The store unreachable (the failover itself): try again next beat.
                    Err(status) if status.code() == Code::Unavailable => {}
                    Err(status) => {
                        device.refused.store(now(), Ordering::Relaxed);
                        *device.refusal.lock().unwrap() = Some((status.code(), reason(&status)));
                        return;
                    }
                }
                tokio::time::sleep(INTERVAL).await;
            }
        })
    }
}

/// Creates one session (limit 1) for each of `users`, all acknowledged.
async fn seat_all(server: &mut TestServer, users: &[String]) -> Vec<Arc<Device>> {
    let mut devices = Vec::new();
    for user in users {
        let session = server.start(user, "tv").await;
        devices.push(Arc::new(Device {
            user: user.clone(),
            session: session.name,
            last_ok: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refusal: std::sync::Mutex::new(None),
        }));
    }
    devices
}

/// Creates for fresh users of `partition` every 50 ms until one succeeds: when usher
/// writes to the shard that holds it again.
async fn first_success(server: &mut TestServer, tag: &str, partition: u32) -> Instant {
    let partitions = settings().partitions;
    let probes = (0..)
        .map(|i| format!("{tag}-probe-{i}"))
        .filter(|name| partition_of(&user(name), partitions) == partition);
    for probe in probes.take(1_200) {
        let mut request = tonic::Request::new(create_request(&probe, "tv"));
        request.set_timeout(Duration::from_secs(1));
        if server.sessions.create_session(request).await.is_ok() {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("usher never wrote again after the failover (60 s)");
}

/// What became of seated devices after a failover: each one's session either survived
/// (it still beats and a second device of its user is refused) or was lost (its
/// heartbeat is refused within one interval of usher writing again, and a second device
/// takes the seat). Returns (kept, lost, the slowest refusal after `back`).
async fn judge(
    server: &mut TestServer,
    devices: &[Arc<Device>],
    epoch: Instant,
    back: Instant,
) -> (Vec<String>, Vec<String>, Duration) {
    // Every device has had a full interval (and a heartbeat in flight its time) to learn.
    tokio::time::sleep(INTERVAL + SLACK).await;
    let back_ms = back.duration_since(epoch).as_millis() as u64;
    let (mut kept, mut lost, mut slowest) = (Vec::new(), Vec::new(), Duration::ZERO);
    for device in devices {
        let refused = device.refused.load(Ordering::Relaxed);
        let second = server
            .sessions
            .create_session(create_request(&device.user, "phone"))
            .await;
        if refused == 0 {
            // Still playing: the seat is its, so a second device must be refused.
            let status = second.expect_err("a kept seat admits no second device");
            assert_eq!(reason(&status), "CONCURRENCY_LIMIT_REACHED", "{status:?}");
            assert!(
                device.last_ok.load(Ordering::Relaxed) > back_ms,
                "{}: beats again after the failover",
                device.session
            );
            kept.push(device.session.clone());
        } else {
            let refusal = device.refusal.lock().unwrap().clone().unwrap();
            assert_eq!(refusal.0, Code::NotFound, "{}: {refusal:?}", device.session);
            second.expect("the lost seat is free for another device");
            slowest = slowest.max(Duration::from_millis(refused.saturating_sub(back_ms)));
            lost.push(device.session.clone());
        }
    }
    (kept, lost, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_only_unreplicated_seats_and_the_limit_is_whole_within_a_heartbeat()
{
    let mut primary = RedisServer::start();
    let relay = Relay::to(primary.port);
    let replica = RedisServer::replica_of(relay.port);
    wait_until(Duration::from_secs(10), "the replica syncs", || {
        replica
            .cli(&["info", "replication"])
            .contains("master_link_status:up")
    });
    let sentinel = RedisServer::sentinel("seats", primary.port, Duration::from_millis(1000));
    wait_until(
        Duration::from_secs(15),
        "the sentinel finds the replica",
        || {
            sentinel
                .cli(&["sentinel", "replicas", "seats"])
                .contains(&replica.port.to_string())
        },
    );

    let url = format!(
        "redis-sentinel://127.0.0.1:{}?sentinelServiceName=seats",
        sentinel.port
    );
    let prefix = unique_prefix();
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(
            redis_options(RedisTarget::Sentinel { url }, &prefix),
            settings(),
        )
        .await
        .unwrap(),
    );
    let mut server = serve(store, 1, OverLimitPolicy::RejectNew).await;
    let epoch = Instant::now();

    // 40 seats the replica has (WAIT says so), then 40 it never gets.
    let replicated: Vec<String> = (0..40).map(|i| format!("kept-{prefix}-{i}")).collect();
    let unreplicated: Vec<String> = (0..40).map(|i| format!("lost-{prefix}-{i}")).collect();
    let mut devices = seat_all(&mut server, &replicated).await;
    wait_until(Duration::from_secs(5), "the replica catches up", || {
        offset(&replica, "slave_repl_offset") >= offset(&primary, "master_repl_offset")
    });
    relay.hold();
    devices.extend(seat_all(&mut server, &unreplicated).await);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        offset(&replica, "slave_repl_offset") < offset(&primary, "master_repl_offset"),
        "the link is held"
    );
    let beating: Vec<_> = devices.iter().map(|d| d.beat(&server, epoch)).collect();
    tokio::time::sleep(INTERVAL).await;

    // The primary crashes; the Sentinel promotes the replica; nobody restarts usher.
    let crashed = Instant::now();
    primary.kill();
    relay.cut();
    let back = first_success(&mut server, &prefix, 0).await;
    let master = sentinel.cli(&["sentinel", "get-master-addr-by-name", "seats"]);
    assert!(
        master.ends_with(&replica.port.to_string()),
        "the replica is the primary now: {master}"
    );
    let (kept, lost, slowest) = judge(&mut server, &devices, epoch, back).await;
    println!(
        "sentinel failover: {} seats acknowledged, {} of them after replication was held; \
         {} kept, {} lost; usher wrote again {:?} after the crash; the last lost device \
         was refused {slowest:?} after that",
        devices.len(),
        unreplicated.len(),
        kept.len(),
        lost.len(),
        back - crashed,
    );
    let lost_users: Vec<&str> = lost
        .iter()
        .map(|name| name.split('/').nth(1).unwrap())
        .collect();
    assert!(
        lost_users.iter().all(|u| u.starts_with("lost-")),
        "a replicated seat was lost: {lost_users:?}"
    );
    assert_eq!(kept.len(), replicated.len());
    assert_eq!(lost.len(), unreplicated.len());
    assert!(slowest <= INTERVAL + SLACK, "{slowest:?}");
    for task in beating {
        task.abort();
    }
    server.running.shutdown().await.unwrap();
}

/// Creates for fresh users, one after another, each acknowledged one remembered.
struct Churn {
    task: tokio::task::JoinHandle<Vec<String>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Churn {
    fn start(server: &TestServer, tag: &str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut sessions = server.sessions.clone();
        let (tag, stopping) = (tag.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let mut request = tonic::Request::new(create_request(&format!("{tag}-{i}"), "tv"));
                request.set_timeout(Duration::from_secs(1));
                if let Ok(answer) = sessions.create_session(request).await {
                    acknowledged.push(answer.into_inner().session.unwrap().name);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acknowledged
        });
        Self { task, stop }
    }

    /// (creates acknowledged, of them no longer there).
    async fn stop_and_count(self, server: &mut TestServer) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let acknowledged = self.task.await.unwrap();
        let mut lost = 0;
        for name in &acknowledged {
            match server.get(name).await {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => lost += 1,
                Err(status) => panic!("{name}: {status:?}"),
            }
        }
        (acknowledged.len(), lost)
    }
}

/// The primary of a cluster that holds the slot of `key`, and its replica.
fn owners(ports: &[u16], key: &str) -> (u16, u16) {
    let slot = redis_cli(ports[0], &["cluster", "keyslot", key]);
    let slot: u16 = slot.trim().parse().unwrap();
    let nodes = redis_cli(ports[0], &["cluster", "nodes"]);
    let mut primary = None;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields[2].contains("master") {
            continue;
        }
        let covers = fields[8..].iter().any(|range| {
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            match (low.parse::<u16>(), high.parse::<u16>()) {
                (Ok(low), Ok(high)) => (low..=high).contains(&slot),
                _ => false,
            }
        });
        if covers {
            primary = Some((fields[0].to_owned(), port_of(fields[1])));
        }
    }
    let (id, primary) = primary.expect("a primary for the slot");
    let replica = nodes
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields[3] == id)
        .map(|fields| port_of(fields[1]))
        .expect("a replica of the primary");
    (primary, replica)
}

/// `127.0.0.1:port@bus` -> port.
fn port_of(address: &str) -> u16 {
    address
        .split('@')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failovers_are_followed_and_the_limit_is_whole_within_a_heartbeat() {
    let mut cluster = crate::support::redis::RedisCluster::start_with_replicas();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let prefix = unique_prefix();
    let target = RedisTarget::Cluster {
        nodes: cluster.node_list(),
    };
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(redis_options(target, &prefix), settings())
            .await
            .unwrap(),
    );
    let mut server = serve(store, 1, OverLimitPolicy::RejectNew).await;
    let epoch = Instant::now();
    let partitions = settings().partitions;
    let partition = |name: &str| partition_of(&user(name), partitions);

    for (round, how) in ["graceful", "crash"].into_iter().enumerate() {
        let users: Vec<String> = (0..48).map(|i| format!("{how}-{prefix}-{i}")).collect();
        let devices = seat_all(&mut server, &users).await;
        let beating: Vec<_> = devices.iter().map(|d| d.beat(&server, epoch)).collect();
        // Creates keep coming while the primary of the first user's partition moves.
        let churn = Churn::start(&server, &format!("churn-{how}-{prefix}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let moved = partition(&users[0]);
        let (primary, replica) = owners(&ports, &format!("{prefix}:{{{moved}}}:u"));
        let started = Instant::now();
        match how {
            "graceful" => assert_eq!(redis_cli(replica, &["cluster", "failover"]), "OK"),
            _ => cluster
                .nodes
                .iter_mut()
                .find(|node| node.port == primary)
                .unwrap()
                .kill(),
        }
        wait_until(Duration::from_secs(20), "the replica is a primary", || {
            redis_cli(replica, &["role"]).starts_with("master")
        });
        let back = first_success(&mut server, &format!("{prefix}-{round}"), moved).await;
        let (kept, lost, slowest) = judge(&mut server, &devices, epoch, back).await;
        let (acknowledged, churn_lost) = churn.stop_and_count(&mut server).await;
        println!(
            "cluster {how} failover of 127.0.0.1:{primary}: {} seats acknowledged before \
             it, {} kept, {} lost; {acknowledged} creates acknowledged around it, \
             {churn_lost} of them lost; usher wrote again {:?} after it began; the last \
             lost device was refused {slowest:?} after that",
            devices.len(),
            kept.len(),
            lost.len(),
            back - started,
        );
        assert!(slowest <= INTERVAL + SLACK, "{slowest:?}");
        if how == "graceful" {
            // CLUSTER FAILOVER waits for the replica to catch up: nothing is lost.
            assert!(lost.is_empty(), "{lost:?}");
            assert_eq!(churn_lost, 0);
        }
        for task in beating {
            task.abort();
        }
    }
    server.running.shutdown().await.unwrap();
}
