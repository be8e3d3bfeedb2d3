//! What independent clients and an attacker found when they drove usher from outside,
//! each through the real server on port 0: health watch streams, bodies that do not
//! decode, page tokens, pause times, regions, the size of the limit detail, the bounds
//! of the embedded store, and the latency of one call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use usher::deadline::Deadline;
use usher::proto;
use usher::store::memory::{MemoryLimits, MemoryStore};
use usher::store::{OverLimitPolicy, Store, StoreError};

use crate::e2e::create_request;
use crate::support::{
    TestServer, bad_fields, error_metadata, limit_detail, new_session, reason, serve, serve_with,
    test_config, test_settings, user,
};

/// A server on the memory store whose sessions outlive the test (a minute of timeout).
async fn memory(limit: u32) -> TestServer {
    let settings = usher::store::StoreSettings {
        heartbeat_timeout: Duration::from_secs(60),
        ..test_settings()
    };
    serve(
        Arc::new(MemoryStore::new(settings)),
        limit,
        OverLimitPolicy::RejectNew,
    )
    .await
}

/// A health watch is a stream that never ends by itself: bounded per connection and per
/// instance, with a RESOURCE_EXHAUSTED that says why, and a slot freed when a watch ends.
#[tokio::test]
async fn health_watch_streams_are_bounded() {
    let mut config = test_config(OverLimitPolicy::RejectNew);
    config.limits.max_health_watches = 3;
    config.limits.max_health_watches_per_connection = 2;
    let server = serve_with(
        &config,
        Arc::new(MemoryStore::new(test_settings())),
        Arc::new(usher::entitlement::StaticPolicy::open(2).unwrap()),
    )
    .await;
    let watch = |channel: tonic::transport::Channel| async move {
        HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
    };
    let first = watch(server.channel.clone()).await.unwrap();
    let second = watch(server.channel.clone()).await.unwrap();
    let refused = watch(server.channel.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(reason(&refused), "TOO_MANY_WATCHES");
    assert!(refused.message().contains("connection"), "{refused:?}");
    // Another connection has its own two, but the instance has three in all.
    let other = connect(&server).await;
    let third = watch(other.clone()).await.unwrap();
    let refused = watch(other.clone()).await.unwrap_err();
    assert_eq!(reason(&refused), "TOO_MANY_WATCHES");
    assert!(refused.message().contains("instance"), "{refused:?}");
    // Ending a watch frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let fourth = loop {
        match watch(server.channel.clone()).await {
            Ok(stream) => break stream,
            Err(status) => {
                assert_eq!(reason(&status), "TOO_MANY_WATCHES");
                assert!(Instant::now() < deadline, "the slot was never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Check, the probe's call, is never limited.
    for _ in 0..10 {
        HealthClient::new(other.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
    }
    drop((second, third, fourth));
    server.running.shutdown().await.unwrap();
}

async fn connect(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", server.running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends raw bytes as the request message, so the server decodes what we choose.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

pub(crate) async fn raw_call(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Nothing a caller sends is answered with INTERNAL: a body that does not decode is
/// INVALID_ARGUMENT / MALFORMED_REQUEST, and the refusals tonic makes itself carry an
/// ErrorInfo like every other.
#[tokio::test]
async fn undecodable_bodies_and_unknown_methods_get_error_info() {
    let server = memory(2).await;
    const CREATE: &str = "/usher.v1.PlaybackSessionService/CreateSession";
    let bodies: [(&str, Vec<u8>); 4] = [
        ("invalid UTF-8 in parent", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("a truncated field", vec![0x0a, 0x05, b'u', b's']),
        ("a wrong wire type", vec![0x0d, 0x01, 0x02, 0x03, 0x04]),
        ("a truncated varint", vec![0x20, 0xff]),
    ];
    for (what, body) in bodies {
        let status = raw_call(server.channel.clone(), CREATE, body)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(reason(&status), "MALFORMED_REQUEST", "{what}");
    }
    // The control: a well-formed body of the same shape is decoded (and then refused
    // for what it says, naming the fields).
    let status = raw_call(server.channel.clone(), CREATE, vec![0x0a, 0x01, b'x'])
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_ARGUMENT");
    assert!(bad_fields(&status).contains(&"parent".to_owned()));
    let status = raw_call(
        server.channel.clone(),
        "/usher.v1.PlaybackSessionService/NoSuchMethod",
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(reason(&status), "UNIMPLEMENTED");
    server.running.shutdown().await.unwrap();
}

/// Page tokens are opaque, bound to their listing, and resume by position: a session
/// that ends between two pages never hides one that is still live.
#[tokio::test]
async fn pages_resume_by_position_and_are_bound_to_their_parent() {
    let mut server = memory(10).await;
    let mut names = Vec::new();
    for device in ["a", "b", "c", "d", "e"] {
        let created = server
            .sessions
            .create_session(create_request("pia", device))
            .await
            .unwrap()
            .into_inner();
        names.push(created.session.unwrap().name);
        // Distinct create times make the order plain to read (ties order by id).
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let list = |page_token: String, parent: &str| proto::ListSessionsRequest {
        parent: format!("users/{parent}"),
        page_size: 2,
        page_token,
    };
    let first = server
        .sessions
        .list_sessions(list(String::new(), "pia"))
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<_> = first.sessions.iter().map(|s| s.name.clone()).collect();
    assert_eq!(listed, names[..2]);
    assert!(!first.next_page_token.contains("sessions"), "opaque");
    // The last session of the page ends before the next page is asked for.
    server
        .sessions
        .stop_session(proto::StopSessionRequest {
            name: names[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let second = server
        .sessions
        .list_sessions(list(first.next_page_token.clone(), "pia"))
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<_> = second.sessions.iter().map(|s| s.name.clone()).collect();
    assert_eq!(listed, names[2..4], "nothing live was skipped");
    let third = server
        .sessions
        .list_sessions(list(second.next_page_token, "pia"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.sessions.len(), 1);
    assert_eq!(third.sessions[0].name, names[4]);
    assert!(third.next_page_token.is_empty());
    // Another user's listing, or a made-up token, is INVALID_ARGUMENT naming page_token.
    for (token, parent) in [
        (first.next_page_token.as_str(), "quentin"),
        ("bm90IGEgdG9rZW4", "pia"),
        ("%%%", "pia"),
        (names[2].rsplit('/').next().unwrap(), "pia"),
    ] {
        let status = server
            .sessions
            .list_sessions(list(token.to_owned(), parent))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{token}");
        assert_eq!(bad_fields(&status), ["page_token"], "{token}");
    }
    server.running.shutdown().await.unwrap();
}

/// `pause_time` is set only while PAUSED, as the contract says.
#[tokio::test]
async fn pause_time_is_unset_unless_paused() {
    let mut server = memory(2).await;
    let session = server.start("rosa", "tv").await;
    let paused = server.pause(&session.name).await.unwrap();
    assert!(paused.pause_time.is_some());
    let stopped = server.stop(&session.name).await.unwrap();
    assert_eq!(stopped.state, proto::SessionState::Stopped as i32);
    assert_eq!(stopped.pause_time, None, "ended while paused");
    assert_eq!(stopped.end_reason, proto::EndReason::StoppedByDevice as i32);
    let read = server.get(&session.name).await.unwrap();
    assert_eq!(read.pause_time, None);
    server.running.shutdown().await.unwrap();
}

/// Regions are taken in either case and kept upper case; a region-restricted title with
/// no region is refused (fail closed) with REGION_REQUIRED, and stores nothing.
#[tokio::test]
async fn regions_are_normalized_and_required_for_restricted_titles() {
    let policy: usher::entitlement::PolicyFile = toml::from_str(
        r#"
        [content]
        regions = { "us-only" = ["US"] }
        "#,
    )
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let mut server = serve_with(
        &test_config(OverLimitPolicy::RejectNew),
        store.clone(),
        Arc::new(usher::entitlement::StaticPolicy::from_file(policy, Some(2)).unwrap()),
    )
    .await;
    let mut lower = create_request("sara", "tv");
    lower.client.as_mut().unwrap().region = "de".into();
    let created = server
        .sessions
        .create_session(lower)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.session.unwrap().client.unwrap().region, "DE");
    let mut unknown = create_request("sara", "phone");
    unknown.content_id = "us-only".into();
    unknown.client.as_mut().unwrap().region = String::new();
    let status = server
        .sessions
        .create_session(unknown.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "REGION_REQUIRED");
    assert_eq!(
        store
            .seats(&user("sara"), Deadline::NONE)
            .await
            .unwrap()
            .holders
            .len(),
        1
    );
    unknown.client.as_mut().unwrap().region = "us".into();
    server.sessions.create_session(unknown).await.unwrap();
    server.running.shutdown().await.unwrap();
}

/// At the largest limit, with the longest ids and names, a refusal over the limit stays
/// well under the 8 KiB that standard gRPC clients allow for trailers: a bounded holder
/// list and the total count.
#[tokio::test]
async fn the_limit_detail_stays_small_at_the_largest_limit() {
    let limit = usher::entitlement::MAX_SEAT_LIMIT;
    let mut server = memory(limit).await;
    let long = |prefix: &str, n: usize| {
        format!("{prefix}{}", "x".repeat(128 - prefix.len()))[..n].to_owned()
    };
    let user_id = long("u", 128);
    let create = |device: String| {
        let mut request = create_request(&user_id, &device);
        request.profile_id = long("p", 128);
        request.content_id = long("c", 128);
        let device = request.device.as_mut().unwrap();
        device.name = "𝄞".repeat(128);
        request
    };
    for i in 0..limit {
        server
            .sessions
            .create_session(create(long(&format!("d{i}-"), 128)))
            .await
            .unwrap();
    }
    let status = server
        .sessions
        .create_session(create(long("last-", 128)))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "CONCURRENCY_LIMIT_REACHED");
    let detail = limit_detail(&status);
    assert_eq!(detail.holder_count, limit as i32);
    assert_eq!(detail.limit, limit as i32);
    assert!(!detail.holders.is_empty() && detail.holders.len() <= 10);
    assert_eq!(
        error_metadata(&status)
            .get("holder_count")
            .map(String::as_str),
        Some("100")
    );
    // The trailer as it travels: the details base64 (unpadded, as gRPC sends them),
    // the message, the status code and their names.
    let details_b64 = status.details().len().div_ceil(3) * 4;
    let trailer = details_b64
        + "grpc-status-details-bin".len()
        + status.message().len()
        + "grpc-message".len()
        + 16;
    assert!(trailer < 7 * 1024, "trailer of {trailer} bytes");
    server.running.shutdown().await.unwrap();
}

/// A create on the embedded `store` with no caller deadline, over the reject-new policy.
async fn create(
    store: &MemoryStore,
    user: &usher::ids::UserId,
    device: &str,
    limit: u32,
) -> Result<usher::store::Created, StoreError> {
    let new = new_session(user, device, limit, OverLimitPolicy::RejectNew);
    store.create_session(new, Deadline::NONE).await
}

/// The embedded store is bounded: past its session cap the oldest ended sessions are
/// forgotten first; when live sessions alone fill it, a create is refused (STORE_FULL)
/// and writes nothing. Past its user cap the longest idle users go first.
#[tokio::test]
async fn the_embedded_store_is_bounded() {
    let store = MemoryStore::new(test_settings()).with_limits(MemoryLimits {
        max_sessions: 3,
        max_users: 2,
    });
    let ann = user("ann");
    let first = create(&store, &ann, "a", 5).await.unwrap().session;
    let stop =
        usher::store::DeviceCall::new(first.name.clone(), None, usher::store::DeviceAction::Stop);
    store.device_call(stop, Deadline::NONE).await.unwrap();
    for device in ["b", "c"] {
        create(&store, &ann, device, 5).await.unwrap();
    }
    // Three records: one ended, two live. The next create forgets the ended one.
    assert!(
        store
            .get_session(&first.name, Deadline::NONE)
            .await
            .unwrap()
            .is_some()
    );
    create(&store, &ann, "d", 5).await.unwrap();
    assert!(
        store
            .get_session(&first.name, Deadline::NONE)
            .await
            .unwrap()
            .is_none(),
        "forgotten"
    );
    // Three live sessions fill it: the fourth is refused and nothing changes.
    let partition = usher::store::partition_of(&ann, test_settings().partitions);
    let events_before = store.read_events(partition, None, 1000).await.unwrap();
    let refused = create(&store, &ann, "e", 5).await;
    assert!(matches!(refused, Err(StoreError::Full(_))), "{refused:?}");
    assert_eq!(
        store.read_events(partition, None, 1000).await.unwrap(),
        events_before
    );
    assert_eq!(
        store
            .seats(&ann, Deadline::NONE)
            .await
            .unwrap()
            .holders
            .len(),
        3
    );
    let status = tonic::Status::from(StoreError::Full("x".into()).into_error(String::new));
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "STORE_FULL");

    // Users: ann holds seats; bob comes and goes; carl takes bob's place.
    let users = MemoryStore::new(test_settings()).with_limits(MemoryLimits {
        max_sessions: 100,
        max_users: 2,
    });
    create(&users, &ann, "a", 2).await.unwrap();
    let bob = create(&users, &user("bob"), "a", 2).await.unwrap().session;
    let carl = new_session(&user("carl"), "a", 2, OverLimitPolicy::RejectNew);
    assert!(matches!(
        users.create_session(carl.clone(), Deadline::NONE).await,
        Err(StoreError::Full(_))
    ));
    let stop = usher::store::DeviceCall::new(bob.name, None, usher::store::DeviceAction::Stop);
    users.device_call(stop, Deadline::NONE).await.unwrap();
    users.create_session(carl, Deadline::NONE).await.unwrap();
    assert_eq!(
        users
            .seats(&ann, Deadline::NONE)
            .await
            .unwrap()
            .holders
            .len(),
        1
    );
}

/// One unary call on loopback takes a millisecond or two. Without TCP_NODELAY on the
/// accepted socket a response written in two parts waits for the client's delayed ACK,
/// about 40 ms each time; this fails if that comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_on_loopback_does_not_wait_for_delayed_acks() {
    let mut server = memory(100).await;
    let mut times = Vec::new();
    for i in 0..21 {
        let started = Instant::now();
        server
            .sessions
            .create_session(create_request("tess", &format!("d{i}")))
            .await
            .unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median < Duration::from_millis(25),
        "median create {median:?}"
    );
    server.running.shutdown().await.unwrap();
}
