//! The history of seat grants is linearizable: concurrent creates, heartbeats, stops and
//! abandoned sessions (which expire) of one user, from several clients through three
//! usher instances on one Redis, recorded with when each call was made and answered, and
//! checked by `usher::soak::history` (a Wing & Gong search against the seat semaphore;
//! its own tests show it refuses what the model forbids, early expiries included).
//! `usher soak` records and checks longer histories the same way.

use std::time::Duration;

use usher::soak::history::{self, Recording};
use usher::store::redis::RedisTarget;

use crate::race::{LIMIT, redis_instances};
use crate::support::{fresh_user, redis, test_settings, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seat_grants_heartbeats_and_expiries_through_three_instances_are_linearizable() {
    let server = redis::shared_redis();
    let prefix = unique_prefix();
    // Short deadlines, so abandoned sessions expire while the history is made.
    let settings = usher::store::StoreSettings {
        heartbeat_timeout: Duration::from_millis(1_500),
        ..test_settings()
    };
    let timeout = settings.heartbeat_timeout;
    let target = RedisTarget::Single { url: server.url() };
    let instances = redis_instances(target, &prefix, 3, settings).await;
    let clients: Vec<_> = instances
        .iter()
        .map(|(server, _)| server.sessions.clone())
        .collect();
    let plan = Recording {
        calls: 12,
        devices: 5,
        pause: Duration::from_millis(400),
        timeout: Duration::from_secs(2),
        credential: None,
    };
    let (mut refused_total, mut expiries_total) = (0, 0);
    for round in 0..3u64 {
        let user = fresh_user().to_string();
        let recorded = history::record(&clients, &user, 5, round, plan.clone(), timeout).await;
        let (admitted, refused, expiries) = recorded.counts();
        let checked = history::check(&recorded.ops, LIMIT as usize);
        println!(
            "round {round}: {} calls, {admitted} admitted, {refused} refused for the limit, \
             {expiries} expiries possible within it; {} states searched",
            recorded.ops.len(),
            checked.states
        );
        refused_total += refused;
        expiries_total += expiries;
        assert_eq!(
            checked.verdict,
            Some(true),
            "not shown linearizable: {:#?}",
            recorded.ops
        );
    }
    assert!(refused_total > 0, "the histories never reached the limit");
    assert!(
        expiries_total > 0,
        "no session could expire within the histories"
    );
    for (server, _) in instances {
        server.running.shutdown().await.unwrap();
    }
}
