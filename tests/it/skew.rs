//! Clock skew. Two `usher serve` processes on one Redis, one run under libfaketime five
//! minutes ahead and one five minutes behind (wall clock; the monotonic clock is left
//! alone, as NTP leaves it). Seat grants, heartbeats and expiry take their time from
//! Redis, so the race, the expiry and a token's own checks come out as with true clocks.
//! A token carries its issuer's clock in `iat`, `nbf` and `exp`: an instance behind
//! accepts a token of one ahead only within `--token-leeway`, which is what the README
//! says skew tokens tolerate.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tonic::Code;
use tonic::transport::Channel;
use usher::proto;
use usher::proto::concurrency_service_client::ConcurrencyServiceClient;
use usher::proto::playback_session_service_client::PlaybackSessionServiceClient;
use usher::proto::token_service_client::TokenServiceClient;

use crate::grpcurl::Usher;
use crate::support::redis::RedisServer;
use crate::support::{create_request, reason, unique_prefix};

const LIMIT: usize = 3;
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// libfaketime's preload library, from Debian's `faketime` package.
fn libfaketime() -> Option<String> {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists())
        .map(|lib| lib.display().to_string());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is required under CI (apt-get install faketime)"
        );
        eprintln!("skipped: libfaketime not found (apt-get install faketime)");
    }
    found
}

struct Instance {
    usher: Usher,
    sessions: PlaybackSessionServiceClient<Channel>,
    concurrency: ConcurrencyServiceClient<Channel>,
    tokens: TokenServiceClient<Channel>,
}

async fn start(flags: &[&str], lib: &str, offset: &str) -> Instance {
    let usher = Usher::start_with_env(
        flags,
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let channel = Channel::from_shared(format!("http://{}", usher.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Instance {
        usher,
        sessions: PlaybackSessionServiceClient::new(channel.clone()),
        concurrency: ConcurrencyServiceClient::new(channel.clone()),
        tokens: TokenServiceClient::new(channel),
    }
}

/// Seconds since the epoch on this (true) clock.
fn true_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token's `iat`, read from its payload (no verification: the instances do that).
fn issued_at(token: &str) -> i64 {
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&json).unwrap();
    claims["iat"].as_i64().unwrap()
}

async fn in_use(instance: &mut Instance, user: &str) -> i32 {
    let request = proto::GetConcurrencyRequest {
        name: format!("users/{user}/concurrency"),
    };
    let answer = instance.concurrency.get_concurrency(request).await.unwrap();
    answer.into_inner().concurrency.unwrap().in_use
}

async fn heartbeat(instance: &mut Instance, session: &str) -> Result<(), tonic::Status> {
    let request = proto::HeartbeatRequest {
        name: session.into(),
        ..Default::default()
    };
    instance.sessions.heartbeat(request).await.map(|_| ())
}

async fn validate(instance: &mut Instance, token: &str) -> proto::ValidateTokenResponse {
    let request = proto::ValidateTokenRequest {
        token: token.into(),
        check_session: false,
    };
    instance
        .tokens
        .validate_token(request)
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_five_minutes_ahead_and_behind_agree_on_seats_expiry_and_tokens() {
    let Some(lib) = libfaketime() else { return };
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = crate::support::key_set_file(dir.path());
    let prefix = unique_prefix();
    let timeout = format!("{}s", HEARTBEAT_TIMEOUT.as_secs());
    let flags = [
        "--store",
        &redis.url(),
        "--redis-key-prefix",
        &prefix,
        "--token-keys",
        keys.to_str().unwrap(),
        "--default-seat-limit",
        "3",
        "--create-rate",
        "off",
        "--heartbeat-interval",
        "1s",
        "--heartbeat-timeout",
        &timeout,
    ];
    let mut ahead = start(&flags, &lib, "+5m").await;
    let mut behind = start(&flags, &lib, "-5m").await;

    // The clocks really are skewed: each instance stamps its tokens with its own time.
    let token_of = async |instance: &mut Instance, user: &str| {
        let answer = instance
            .sessions
            .create_session(create_request(user, "probe"))
            .await
            .unwrap()
            .into_inner();
        (answer.session.unwrap().name, answer.playback_token)
    };
    let (_, ahead_token) = token_of(&mut ahead, "clock-ahead").await;
    let (_, behind_token) = token_of(&mut behind, "clock-behind").await;
    let ahead_skew = issued_at(&ahead_token) - true_now();
    let behind_skew = issued_at(&behind_token) - true_now();
    println!("token iat minus the true time: ahead {ahead_skew} s, behind {behind_skew} s");
    assert!((295..=305).contains(&ahead_skew), "{ahead_skew}");
    assert!((-305..=-295).contains(&behind_skew), "{behind_skew}");

    // The race: 60 creates for one user at once, half through each instance.
    let calls = (0..60).map(|i| {
        let mut client = if i % 2 == 0 {
            ahead.sessions.clone()
        } else {
            behind.sessions.clone()
        };
        tokio::spawn(async move {
            client
                .create_session(create_request("racer", &format!("device-{i}")))
                .await
        })
    });
    let mut admitted = 0;
    for result in futures::future::join_all(calls).await {
        match result.unwrap() {
            Ok(_) => admitted += 1,
            Err(status) => assert_eq!(reason(&status), "CONCURRENCY_LIMIT_REACHED"),
        }
    }
    assert_eq!(admitted, LIMIT);
    assert_eq!(in_use(&mut ahead, "racer").await, LIMIT as i32);
    assert_eq!(in_use(&mut behind, "racer").await, LIMIT as i32);

    // Expiry: a session made by the instance ahead, beaten by the one behind, then left.
    // An instance that judged by its own clock would expire it at once (ahead) or five
    // minutes late (behind); both see it live, then ended HEARTBEAT_TIMEOUT after its
    // last heartbeat.
    let session = ahead
        .sessions
        .create_session(create_request("leaver", "tv"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .name;
    tokio::time::sleep(Duration::from_secs(1)).await;
    heartbeat(&mut behind, &session).await.unwrap();
    heartbeat(&mut ahead, &session).await.unwrap();
    let last_beat = Instant::now();
    tokio::time::sleep(HEARTBEAT_TIMEOUT - Duration::from_millis(1_500)).await;
    assert_eq!(in_use(&mut ahead, "leaver").await, 1, "expired early");
    assert_eq!(in_use(&mut behind, "leaver").await, 1, "expired early");
    let deadline = last_beat + HEARTBEAT_TIMEOUT + Duration::from_secs(3);
    loop {
        let (a, b) = (
            in_use(&mut ahead, "leaver").await,
            in_use(&mut behind, "leaver").await,
        );
        if a == 0 && b == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not expired: {a}, {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("expired {:?} after the last heartbeat", last_beat.elapsed());
    let refused = heartbeat(&mut behind, &session).await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok);

    // Tokens: each instance accepts its own; the one behind refuses a token from the one
    // ahead (issued ten minutes in its future, past the 10 s leeway); the one ahead
    // accepts a token from the one behind (five of its fifteen minutes left).
    assert!(validate(&mut ahead, &ahead_token).await.valid);
    assert!(validate(&mut behind, &behind_token).await.valid);
    let refused = validate(&mut behind, &ahead_token).await;
    assert!(!refused.valid);
    assert_eq!(refused.reason, "TOKEN_INVALID", "{refused:?}");
    let accepted = validate(&mut ahead, &behind_token).await;
    assert!(accepted.valid, "{accepted:?}");
    let expires = accepted.claims.unwrap().expire_time.unwrap().seconds;
    assert!(
        (expires - true_now() - 600).abs() <= 5,
        "a token from 5 minutes behind has 10 true minutes left"
    );

    for instance in [ahead, behind] {
        assert!(instance.usher.terminate().success());
    }
}
