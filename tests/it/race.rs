//! The seat limit under a race: several usher instances sharing one store, 200 concurrent
//! creates for one user with limit 3, each on its own device. Exactly three are admitted,
//! every other caller is told CONCURRENCY_LIMIT_REACHED, and the seat set holds three.

use std::sync::Arc;

use tonic::Code;
use usher::deadline::Deadline;
use usher::store::memory::MemoryStore;
use usher::store::redis::{RedisStore, RedisTarget};
use usher::store::{EventKind, OverLimitPolicy, Store, partition_of};

use crate::e2e::create_request;
use crate::support::{
    TestServer, fresh_user, reason, redis, redis_options, serve, test_settings, unique_prefix,
};

const CREATES: usize = 200;
pub(crate) const LIMIT: u32 = 3;

/// Fires the creates across `servers` at once; returns (admitted, limit-refused).
async fn race(servers: &[TestServer], user: &str) -> (usize, usize) {
    let calls = (0..CREATES).map(|i| {
        let mut client = servers[i % servers.len()].sessions.clone();
        let request = create_request(user, &format!("device-{i}"));
        tokio::spawn(async move { client.create_session(request).await })
    });
    let results = futures::future::join_all(calls).await;
    let mut admitted = 0;
    let mut refused = 0;
    for result in results {
        match result.expect("task") {
            Ok(_) => admitted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "CONCURRENCY_LIMIT_REACHED");
                refused += 1;
            }
        }
    }
    (admitted, refused)
}

pub(crate) async fn redis_instances(
    target: RedisTarget,
    prefix: &str,
    count: usize,
    settings: usher::store::StoreSettings,
) -> Vec<(TestServer, Arc<dyn Store>)> {
    let mut servers = Vec::new();
    for _ in 0..count {
        let store: Arc<dyn Store> = Arc::new(
            RedisStore::connect(redis_options(target.clone(), prefix), settings.clone())
                .await
                .unwrap(),
        );
        let server = serve(store.clone(), LIMIT, OverLimitPolicy::RejectNew).await;
        servers.push((server, store));
    }
    servers
}

async fn race_on_redis(target: RedisTarget, ports: Vec<u16>) {
    let prefix = unique_prefix();
    let instances = redis_instances(target, &prefix, 4, test_settings()).await;
    let user = fresh_user();
    let (servers, stores): (Vec<_>, Vec<_>) = instances.into_iter().unzip();
    let (admitted, refused) = race(&servers, user.as_str()).await;
    assert_eq!(
        (admitted, refused),
        (LIMIT as usize, CREATES - LIMIT as usize)
    );

    // The seats themselves, read straight from Redis: the user hash's fields but its
    // generation counter.
    let partition = partition_of(&user, test_settings().partitions);
    let user_key = format!("{prefix}:{{{partition}}}:u:{user}");
    let fields = redis::redis_cli(ports[0], &["hkeys", &user_key]);
    let seats = fields.lines().filter(|field| *field != "g").count();
    assert_eq!(seats, LIMIT as usize, "{user_key}: {fields}");
    let started = stores[0]
        .read_events(partition, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.session.user == user && e.kind == EventKind::Started)
        .count();
    assert_eq!(
        started, LIMIT as usize,
        "one started event per admitted session"
    );
    for server in servers {
        server.running.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_one_redis_admit_exactly_the_limit() {
    let server = redis::shared_redis();
    race_on_redis(RedisTarget::Single { url: server.url() }, vec![server.port]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_redis_cluster_admit_exactly_the_limit() {
    let cluster = redis::shared_cluster();
    let ports = cluster.nodes.iter().map(|n| n.port).collect();
    race_on_redis(
        RedisTarget::Cluster {
            nodes: cluster.node_list(),
        },
        ports,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_on_the_memory_store_admits_exactly_the_limit() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let server = serve(store.clone(), LIMIT, OverLimitPolicy::RejectNew).await;
    let user = fresh_user();
    let (admitted, refused) = race(std::slice::from_ref(&server), user.as_str()).await;
    assert_eq!(
        (admitted, refused),
        (LIMIT as usize, CREATES - LIMIT as usize)
    );
    assert_eq!(
        store
            .seats(&user, Deadline::NONE)
            .await
            .unwrap()
            .holders
            .len(),
        LIMIT as usize
    );
    server.running.shutdown().await.unwrap();
}
