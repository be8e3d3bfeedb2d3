//! ProgressService through the real server: written, read, listed as the "continue
//! watching" row, deleted; over gRPC and REST; bad input refused naming the field.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use usher::proto;
use usher::proto::progress_service_client::ProgressServiceClient;
use usher::proto::stream_heartbeats_request::Kind as In;
use usher::proto::stream_heartbeats_response::Kind as Out;
use usher::proto::streaming_service_client::StreamingServiceClient;
use usher::store::memory::MemoryStore;
use usher::store::{EventKind, OverLimitPolicy, Store};

use crate::e2e::create_request;
use crate::support::{Kind, bad_fields, http_json, reason, serve, store_of, test_settings};

fn entry(content: &str, seconds: i64, completed: bool) -> proto::UpdateProgressRequest {
    proto::UpdateProgressRequest {
        progress: Some(proto::Progress {
            name: format!("users/mia/profiles/main/progress/{content}"),
            position: Some(prost_types::Duration { seconds, nanos: 0 }),
            duration: Some(prost_types::Duration {
                seconds: 5_400,
                nanos: 0,
            }),
            completed,
            device_id: "living-room-tv".into(),
            update_time: None,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_written_listed_and_removed() {
    let server = serve(
        Arc::new(MemoryStore::new(test_settings())),
        2,
        OverLimitPolicy::RejectNew,
    )
    .await;
    let mut progress = ProgressServiceClient::new(server.channel.clone());
    let before = std::time::SystemTime::now();
    let written = progress
        .update_progress(entry("title-1", 61, false))
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert_eq!(written.position.unwrap().seconds, 61);
    // usher's clock, to the millisecond.
    let stamped = std::time::SystemTime::try_from(written.update_time.unwrap()).unwrap();
    let after = std::time::SystemTime::now();
    assert!(stamped + std::time::Duration::from_millis(1) >= before && stamped <= after);
    progress
        .update_progress(entry("title-2", 5_300, true))
        .await
        .unwrap();
    progress
        .update_progress(entry("title-3", 10, false))
        .await
        .unwrap();

    let got = progress
        .get_progress(proto::GetProgressRequest {
            name: "users/mia/profiles/main/progress/title-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert_eq!(got.device_id, "living-room-tv");

    // The row: most recent first, the finished title left out unless asked.
    let list =
        |show_completed: bool, page_size: i32, page_token: String| proto::ListProgressRequest {
            parent: "users/mia/profiles/main".into(),
            page_size,
            page_token,
            show_completed,
        };
    let names = |page: &proto::ListProgressResponse| -> Vec<String> {
        page.progress
            .iter()
            .map(|p| p.name.rsplit('/').next().unwrap().to_owned())
            .collect()
    };
    let row = progress
        .list_progress(list(false, 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&row), ["title-3", "title-1"]);
    assert!(row.next_page_token.is_empty());
    let all = progress
        .list_progress(list(true, 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&all), ["title-3", "title-2", "title-1"]);
    // One at a time, by page token.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = progress
            .list_progress(list(true, 1, token))
            .await
            .unwrap()
            .into_inner();
        paged.extend(names(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, ["title-3", "title-2", "title-1"]);

    progress
        .delete_progress(proto::DeleteProgressRequest {
            name: "users/mia/profiles/main/progress/title-3".into(),
        })
        .await
        .unwrap();
    let gone = progress
        .get_progress(proto::GetProgressRequest {
            name: "users/mia/profiles/main/progress/title-3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let again = progress
        .delete_progress(proto::DeleteProgressRequest {
            name: "users/mia/profiles/main/progress/title-3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // The same over REST.
    let addr = server.running.addr;
    let patched = http_json(
        addr,
        "PATCH",
        "/v1/users/mia/profiles/kids/progress/cartoon-7",
        &[],
        r#"{"position": "30s", "deviceId": "tablet"}"#,
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let row = http_json(addr, "GET", "/v1/users/mia/profiles/kids/progress", &[], "").await;
    assert_eq!(row.status, 200, "{}", row.body);
    let body: serde_json::Value = serde_json::from_str(&row.body).unwrap();
    assert_eq!(
        body["progress"][0]["name"],
        "users/mia/profiles/kids/progress/cartoon-7"
    );
    assert_eq!(body["progress"][0]["position"], "30s");
    let deleted = http_json(
        addr,
        "DELETE",
        "/v1/users/mia/profiles/kids/progress/cartoon-7",
        &[],
        "",
    )
    .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_progress_requests_name_the_field_and_write_nothing() {
    let server = serve(
        Arc::new(MemoryStore::new(test_settings())),
        2,
        OverLimitPolicy::RejectNew,
    )
    .await;
    let mut progress = ProgressServiceClient::new(server.channel.clone());
    let cases: Vec<(proto::UpdateProgressRequest, &str)> = vec![
        (proto::UpdateProgressRequest { progress: None }, "progress"),
        (
            {
                let mut r = entry("title-1", 1, false);
                r.progress.as_mut().unwrap().name = "users/mia/progress/title-1".into();
                r
            },
            "progress.name",
        ),
        (
            {
                let mut r = entry("title-1", 1, false);
                r.progress.as_mut().unwrap().position = None;
                r
            },
            "progress.position",
        ),
        (
            {
                let mut r = entry("title-1", 1, false);
                r.progress.as_mut().unwrap().position = Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                });
                r
            },
            "progress.position",
        ),
        (
            {
                let mut r = entry("title-1", 1, false);
                r.progress.as_mut().unwrap().device_id = "no spaces".into();
                r
            },
            "progress.device_id",
        ),
    ];
    for (request, field) in cases {
        let refused = progress.update_progress(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        assert_eq!(bad_fields(&refused), [field]);
    }
    let nothing = progress
        .list_progress(proto::ListProgressRequest {
            parent: "users/mia/profiles/main".into(),
            show_completed: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(nothing.progress.is_empty(), "nothing was written");

    // A page token of another profile's row.
    progress
        .update_progress(entry("a", 1, false))
        .await
        .unwrap();
    progress
        .update_progress(entry("b", 1, false))
        .await
        .unwrap();
    let first = progress
        .list_progress(proto::ListProgressRequest {
            parent: "users/mia/profiles/main".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let crossed = progress
        .list_progress(proto::ListProgressRequest {
            parent: "users/mia/profiles/kids".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(crossed.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&crossed), ["page_token"]);
    let negative = progress
        .list_progress(proto::ListProgressRequest {
            parent: "users/mia/profiles/main".into(),
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&negative), ["page_size"]);
    assert_eq!(reason(&negative), "INVALID_ARGUMENT");
    server.running.shutdown().await.unwrap();
}

/// CreateSession answers where the profile stopped in the title, under the resume rules;
/// a position past 90 % marks the title finished, and it starts from the beginning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_resumes_where_the_profile_stopped() {
    let mut server = serve(
        Arc::new(MemoryStore::new(test_settings())),
        2,
        OverLimitPolicy::RejectNew,
    )
    .await;
    let mut progress = ProgressServiceClient::new(server.channel.clone());
    let at = |seconds: i64| proto::UpdateProgressRequest {
        progress: Some(proto::Progress {
            // create_request's profile and title.
            name: "users/noor/profiles/profile-1/progress/title-1".into(),
            position: Some(prost_types::Duration { seconds, nanos: 0 }),
            duration: Some(prost_types::Duration {
                seconds: 6_000,
                nanos: 0,
            }),
            completed: false,
            device_id: "phone".into(),
            update_time: None,
        }),
    };
    let resume = |created: proto::CreateSessionResponse| created.resume_position.unwrap().seconds;

    let first = server
        .sessions
        .create_session(create_request("noor", "tv"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resume(first), 0, "nothing watched yet");

    progress.update_progress(at(1_200)).await.unwrap();
    let second = server
        .sessions
        .create_session(create_request("noor", "tablet"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resume(second), 1_200);

    // 5,500 s of 6,000: past 90 %, so finished.
    let finished = progress
        .update_progress(at(5_500))
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert!(finished.completed);
    let third = server
        .sessions
        .create_session(create_request("noor", "tv"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resume(third), 0, "a finished title starts over");
    server.running.shutdown().await.unwrap();
}

/// The resume flow through the real server: a device streams, heartbeats and stops at a
/// position; a new session on another device starts there. A service (no playback token:
/// usher must find the session's profile itself) pauses and stops the next session
/// unary, past the finish: the title is completed, with its event, and starts over.
/// GetProgress that must find the entry.
async fn read(
    progress: &mut ProgressServiceClient<tonic::transport::Channel>,
    name: &str,
) -> proto::Progress {
    let request = proto::GetProgressRequest { name: name.into() };
    let answer = progress.get_progress(request).await.unwrap().into_inner();
    answer.progress.expect("an entry")
}

async fn resume_flow(store: Arc<dyn Store>) {
    let mut server = serve(store.clone(), 2, OverLimitPolicy::RejectNew).await;
    let user = crate::support::fresh_user();
    let created = server
        .sessions
        .create_session(create_request(user.as_str(), "tv"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.resume_position.unwrap().seconds, 0);
    let seconds = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let (sender, requests) = mpsc::channel(8);
    let message = |kind| proto::StreamHeartbeatsRequest { kind: Some(kind) };
    sender
        .send(message(In::Heartbeat(proto::StreamHeartbeat {
            position: seconds(100),
            duration: seconds(6_000),
            playback_state: proto::PlaybackState::Playing as i32,
            ..Default::default()
        })))
        .await
        .unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", created.playback_token)
            .parse()
            .unwrap(),
    );
    let mut answers = StreamingServiceClient::new(server.channel.clone())
        .stream_heartbeats(request)
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .kind
            .unwrap()
    };
    assert!(matches!(next().await, Out::Ack(_)));
    sender
        .send(message(In::Stop(proto::StreamStop {
            position: seconds(1_234),
            duration: None,
        })))
        .await
        .unwrap();
    loop {
        if let Out::Stop(_) = next().await {
            break;
        }
    }
    let name = format!("users/{user}/profiles/profile-1/progress/title-1");
    let mut progress = ProgressServiceClient::new(server.channel.clone());
    let stopped = read(&mut progress, &name).await;
    assert_eq!(stopped.position.unwrap().seconds, 1_234);
    assert_eq!(
        stopped.duration.unwrap().seconds,
        6_000,
        "the stream's duration"
    );
    assert_eq!(stopped.device_id, "tv");

    // Another device resumes there.
    let phone = server
        .sessions
        .create_session(create_request(user.as_str(), "phone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phone.resume_position.unwrap().seconds, 1_234);
    let session = phone.session.unwrap().name;
    server
        .sessions
        .pause_session(proto::PauseSessionRequest {
            name: session.clone(),
            position: seconds(2_000),
            ..Default::default()
        })
        .await
        .unwrap();
    let paused = read(&mut progress, &name).await;
    assert_eq!(paused.position.unwrap().seconds, 2_000);
    assert_eq!(paused.device_id, "phone");
    server
        .sessions
        .stop_session(proto::StopSessionRequest {
            name: session.clone(),
            position: seconds(5_500),
            duration: seconds(6_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(read(&mut progress, &name).await.completed);
    let partition = usher::store::partition_of(&user, test_settings().partitions);
    let events = store.read_events(partition, None, 10_000).await.unwrap();
    let completed: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Completed && e.session.user == user)
        .collect();
    assert_eq!(completed.len(), 1, "{events:?}");
    assert_eq!(completed[0].session.to_string(), session);
    assert_eq!(completed[0].position_ms, 5_500_000);
    let again = server
        .sessions
        .create_session(create_request(user.as_str(), "tv"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.resume_position.unwrap().seconds,
        0,
        "finished: from the start"
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resume_flow_in_memory() {
    resume_flow(store_of(Kind::Memory, test_settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resume_flow_on_redis() {
    resume_flow(store_of(Kind::Redis, test_settings()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resume_flow_on_a_cluster() {
    resume_flow(store_of(Kind::Cluster, test_settings()).await).await;
}
