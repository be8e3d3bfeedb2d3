//! EventService through the real server, on memory, Redis and the cluster: WatchEvents
//! from now and from a cursor after a disconnect (nothing missed, nothing twice), its
//! filters, ListEvents newest first in pages, over gRPC and REST; bad input named.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use usher::deadline::Deadline;
use usher::proto;
use usher::proto::event_service_client::EventServiceClient;
use usher::store::memory::MemoryStore;
use usher::store::{DeviceAction, DeviceCall, OverLimitPolicy, Store, StoreSettings};

use crate::support::{
    Kind, TestServer, bad_fields, fresh_user, http, reason, serve, store_of, test_settings,
};

type Client = EventServiceClient<tonic::transport::Channel>;
type Batches = tonic::Streaming<proto::WatchEventsResponse>;

async fn watch(client: &mut Client, request: proto::WatchEventsRequest) -> Batches {
    client.watch_events(request).await.unwrap().into_inner()
}

/// Batches until `count` events have come: the events and the last cursor.
async fn take(batches: &mut Batches, count: usize) -> (Vec<proto::Event>, String) {
    let mut events = Vec::new();
    let mut cursor = String::new();
    while events.len() < count {
        let batch = tokio::time::timeout(Duration::from_secs(10), batches.message())
            .await
            .expect("a batch in time")
            .expect("no stream error")
            .expect("the stream is open");
        events.extend(batch.events);
        cursor = batch.cursor;
    }
    assert_eq!(events.len(), count, "no more than asked: {events:?}");
    (events, cursor)
}

/// Nothing more within `within` (an empty batch that only moves the cursor is fine).
async fn quiet(batches: &mut Batches, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, batches.message()).await {
            Err(_) => return,
            Ok(batch) => {
                let batch = batch.unwrap().unwrap();
                assert!(batch.events.is_empty(), "unexpected {:?}", batch.events);
            }
        }
    }
}

fn kinds(events: &[proto::Event]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|e| (e.r#type.as_str(), e.device_id.as_str()))
        .collect()
}

async fn watch_and_list(store: Arc<dyn Store>) {
    let mut server: TestServer = serve(store.clone(), 5, OverLimitPolicy::RejectNew).await;
    let mut client = EventServiceClient::new(server.channel.clone());
    let user = fresh_user();
    let early = server.start(user.as_str(), "early").await;

    // From now: the create before the watch is not sent.
    let mut batches = watch(&mut client, proto::WatchEventsRequest::default()).await;
    let tv = server.start(user.as_str(), "tv").await;
    server.pause(&tv.name).await.unwrap();
    server.stop(&tv.name).await.unwrap();
    let (first, cursor) = take(&mut batches, 3).await;
    assert_eq!(
        kinds(&first),
        [
            ("playback.started", "tv"),
            ("playback.paused", "tv"),
            ("playback.stopped", "tv")
        ]
    );
    assert_eq!(first[0].session, tv.name);
    assert_eq!(
        first[2].end_reason,
        proto::EndReason::StoppedByDevice as i32
    );
    drop(batches);

    // Disconnected meanwhile: resumed from the cursor, exactly what came after it.
    let phone = server.start(user.as_str(), "phone").await;
    server.stop(&early.name).await.unwrap();
    let mut batches = watch(
        &mut client,
        proto::WatchEventsRequest {
            cursor: cursor.clone(),
            ..Default::default()
        },
    )
    .await;
    let (second, _) = take(&mut batches, 2).await;
    assert_eq!(
        kinds(&second),
        [("playback.started", "phone"), ("playback.stopped", "early")]
    );
    quiet(&mut batches, Duration::from_millis(1500)).await;
    drop(batches);

    // What was sent is the log itself, ids and all.
    let partition = usher::store::partition_of(&user, test_settings().partitions);
    let log = store.read_events(partition, None, 1000).await.unwrap();
    let sent: Vec<String> = first.iter().chain(&second).map(|e| e.id.clone()).collect();
    let logged: Vec<String> = log[1..]
        .iter()
        .map(|e| usher::events::event_id(partition, e))
        .collect();
    assert_eq!(sent, logged);

    // Filtered by type and user.
    let other = fresh_user();
    let mut batches = watch(
        &mut client,
        proto::WatchEventsRequest {
            types: vec!["playback.stopped".into()],
            user_id: other.to_string(),
            ..Default::default()
        },
    )
    .await;
    let theirs = server.start(other.as_str(), "tv").await;
    server.start(user.as_str(), "tablet").await;
    server.stop(&theirs.name).await.unwrap();
    server.stop(&phone.name).await.unwrap();
    let (filtered, _) = take(&mut batches, 1).await;
    assert_eq!(filtered[0].session, theirs.name);
    assert_eq!(filtered[0].r#type, "playback.stopped");
    quiet(&mut batches, Duration::from_millis(800)).await;
    drop(batches);

    // ListEvents: newest first, in pages, over gRPC and REST.
    let parent = format!("users/{user}");
    let mut pages = Vec::new();
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_events(proto::ListEventsRequest {
                parent: parent.clone(),
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.events.len());
        paged.extend(page.events);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let all = client
        .list_events(proto::ListEventsRequest {
            parent: parent.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.next_page_token.is_empty());
    assert_eq!(
        kinds(&all.events),
        [
            ("playback.stopped", "phone"),
            ("playback.started", "tablet"),
            ("playback.stopped", "early"),
            ("playback.started", "phone"),
            ("playback.stopped", "tv"),
            ("playback.paused", "tv"),
            ("playback.started", "tv"),
            ("playback.started", "early"),
        ]
    );
    assert_eq!(paged, all.events, "the pages together are the whole list");
    assert_eq!(pages, [3, 3, 2]);
    let rest = http(
        server.running.addr,
        "GET",
        &format!("/v1/{parent}/events?pageSize=2"),
        &[],
    )
    .await;
    assert_eq!(rest.status, 200, "{}", rest.body);
    let body: serde_json::Value = serde_json::from_str(&rest.body).unwrap();
    assert_eq!(body["events"][0]["type"], "playback.stopped");
    assert_eq!(body["events"][1]["deviceId"], "tablet");
    assert!(
        body["nextPageToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    server.running.shutdown().await.unwrap();
}

/// The test settings with sessions that outlive the test's pauses.
fn settings() -> StoreSettings {
    StoreSettings {
        heartbeat_timeout: Duration::from_secs(60),
        ..test_settings()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_watched_and_listed_in_memory() {
    watch_and_list(store_of(Kind::Memory, settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_watched_and_listed_on_redis() {
    watch_and_list(store_of(Kind::Redis, settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_watched_and_listed_on_a_cluster() {
    watch_and_list(store_of(Kind::Cluster, settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_requests_name_the_field() {
    let server = serve(
        Arc::new(MemoryStore::new(test_settings())),
        5,
        OverLimitPolicy::RejectNew,
    )
    .await;
    let mut client = EventServiceClient::new(server.channel.clone());
    let refused = client
        .watch_events(proto::WatchEventsRequest {
            cursor: "not a cursor".into(),
            types: vec!["playback.started".into(), "playback.exploded".into()],
            user_id: "a/b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(reason(&refused), "INVALID_ARGUMENT");
    assert_eq!(bad_fields(&refused), ["cursor", "types[1]", "user_id"]);
    let refused = client
        .list_events(proto::ListEventsRequest {
            parent: "users".into(),
            page_size: -1,
            page_token: "%%".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&refused), ["parent", "page_size", "page_token"]);
    // A token of one user's listing is not another's.
    let mut server = server;
    for device in ["a", "b", "c"] {
        server.start("ines", device).await;
    }
    let page = client
        .list_events(proto::ListEventsRequest {
            parent: "users/ines".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let foreign = client
        .list_events(proto::ListEventsRequest {
            parent: "users/jon".into(),
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&foreign), ["page_token"]);
    server.running.shutdown().await.unwrap();
}

/// A backlog larger than one message comes in several, each with the cursor just after
/// it: resuming from the first message's cursor repeats nothing and misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_comes_in_batches_each_resumable() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(settings()));
    let mut server = serve(store.clone(), 5, OverLimitPolicy::RejectNew).await;
    let mut client = EventServiceClient::new(server.channel.clone());
    // A cursor from before the backlog: the watch sees it whole at its first read.
    let mut batches = watch(&mut client, proto::WatchEventsRequest::default()).await;
    server.start("backlog-mark", "tv").await;
    let (_, cursor) = take(&mut batches, 1).await;
    drop(batches);
    // 400 sessions of 40 users, started and stopped: 800 events over the partitions.
    for i in 0..400 {
        let user = usher::ids::UserId::parse("u", &format!("backlog-{}", i % 40)).unwrap();
        let new = crate::support::new_session(&user, "tv", 5, OverLimitPolicy::RejectNew);
        let created = store.create_session(new, Deadline::NONE).await.unwrap();
        let stop = DeviceCall::new(created.session.name, None, DeviceAction::Stop);
        store.device_call(stop, Deadline::NONE).await.unwrap();
    }
    let mut batches = watch(
        &mut client,
        proto::WatchEventsRequest {
            cursor,
            ..Default::default()
        },
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), batches.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.events.len(), 500, "one full message first");
    drop(batches);
    let mut resumed = watch(
        &mut client,
        proto::WatchEventsRequest {
            cursor: first.cursor,
            ..Default::default()
        },
    )
    .await;
    let (rest, _) = take(&mut resumed, 300).await;
    quiet(&mut resumed, Duration::from_millis(500)).await;
    let mut ids: Vec<String> = first
        .events
        .iter()
        .chain(&rest)
        .map(|e| e.id.clone())
        .collect();
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "no event twice");
    assert_eq!(count, 800);
    server.running.shutdown().await.unwrap();
}

/// `curl` on `path` for `seconds`, its output: what a REST client of the stream reads.
fn curl_for(
    addr: std::net::SocketAddr,
    path: &str,
    accept: &str,
    seconds: u32,
) -> std::process::Child {
    std::process::Command::new("curl")
        .args(["-sN", "--max-time", &seconds.to_string()])
        .args(["-H", &format!("accept: {accept}")])
        .arg(format!("http://{addr}{path}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs")
}

/// WatchEvents over HTTP: one JSON batch per line, or server-sent events; a bad request
/// is refused before the stream starts, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_watched_over_http_as_lines_or_server_sent_events() {
    let mut server = serve(
        Arc::new(MemoryStore::new(settings())),
        5,
        OverLimitPolicy::RejectNew,
    )
    .await;
    let addr = server.running.addr;
    let lines = curl_for(addr, "/v1/events:watch?types=playback.started", "*/*", 3);
    // A repeated field's parameter comes once per value.
    let events = curl_for(
        addr,
        "/v1/events:watch?types=playback.started&types=playback.stopped&userId=kai",
        "text/event-stream",
        3,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let session = server.start("kai", "tv").await;
    server.stop(&session.name).await.unwrap();
    let lines = String::from_utf8(lines.wait_with_output().unwrap().stdout).unwrap();
    let batches: Vec<serde_json::Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON document per line"))
        .collect();
    let sent: Vec<&serde_json::Value> = batches
        .iter()
        .flat_map(|b| b["result"]["events"].as_array().expect(&lines))
        .collect();
    assert_eq!(sent.len(), 1, "{lines}");
    assert_eq!(sent[0]["type"], "playback.started");
    assert_eq!(sent[0]["session"], session.name.as_str());
    assert!(
        batches[0]["result"]["cursor"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );

    let events = String::from_utf8(events.wait_with_output().unwrap().stdout).unwrap();
    let types: Vec<String> = events
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .flat_map(|data| {
            let batch: serde_json::Value = serde_json::from_str(data).unwrap();
            batch["result"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["type"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(types, ["playback.started", "playback.stopped"], "{events}");

    let refused = http(addr, "GET", "/v1/events:watch?types=playback.nope", &[]).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("types[0]"), "{}", refused.body);
    server.running.shutdown().await.unwrap();
}
