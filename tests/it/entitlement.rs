//! Entitlement over HTTP: usher against an identity and a content service started by
//! the tests on loopback (axum on hyper, the HTTP stack of usher's own client). Each
//! service counts its calls, so cache hits, coalescing and the circuit breaker are
//! asserted by what reached it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use usher::deadline::Deadline;
use usher::entitlement::{DegradedMode, HttpEntitlements, HttpSettings, StaticPolicy};
use usher::proto;
use usher::proto::token_service_client::TokenServiceClient;
use usher::store::memory::MemoryStore;
use usher::store::{OverLimitPolicy, Store};

use crate::streaming::{open, playing, stop_reason, stream_config};
use crate::support::{
    TestServer, components, create_request, reason, serve_components, test_config, test_settings,
    user,
};

/// How the fake services answer, for every call until changed.
#[derive(Clone, Default)]
struct Behaviour {
    delay: Duration,
    /// Answer this HTTP status with a text body instead.
    status: Option<u16>,
    /// Answer 200 with a body that is not JSON.
    garbage: bool,
    cache_control: Option<&'static str>,
}

#[derive(Default)]
struct Services {
    identity_calls: AtomicUsize,
    content_calls: AtomicUsize,
    behaviour: Mutex<Behaviour>,
    /// User -> the identity service's answer; others are allowed 2 seats.
    identity: Mutex<HashMap<String, Value>>,
    /// `content@REGION`, or `content` for every region -> the content service's answer;
    /// others are available.
    content: Mutex<HashMap<String, Value>>,
    /// The query strings the identity service was asked.
    identity_queries: Mutex<Vec<HashMap<String, String>>>,
}

impl Services {
    async fn respond(&self, answer: Value) -> Response {
        let behaviour = self.behaviour.lock().unwrap().clone();
        tokio::time::sleep(behaviour.delay).await;
        if let Some(status) = behaviour.status {
            return (StatusCode::from_u16(status).unwrap(), "down").into_response();
        }
        if behaviour.garbage {
            return "<html>an error page</html>".into_response();
        }
        let mut response = Json(answer).into_response();
        if let Some(value) = behaviour.cache_control {
            let value = header::HeaderValue::from_static(value);
            response.headers_mut().insert(header::CACHE_CONTROL, value);
        }
        response
    }

    fn behave(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn answer_identity(&self, user: &str, answer: Value) {
        self.identity
            .lock()
            .unwrap()
            .insert(user.to_owned(), answer);
    }

    fn answer_content(&self, key: &str, answer: Value) {
        self.content.lock().unwrap().insert(key.to_owned(), answer);
    }

    fn calls(&self) -> (usize, usize) {
        (
            self.identity_calls.load(Ordering::SeqCst),
            self.content_calls.load(Ordering::SeqCst),
        )
    }
}

async fn identity(
    State(services): State<Arc<Services>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    services.identity_calls.fetch_add(1, Ordering::SeqCst);
    let answer = services
        .identity
        .lock()
        .unwrap()
        .get(query.get("user").map_or("", String::as_str))
        .cloned()
        .unwrap_or(json!({"allowed": true, "seat_limit": 2}));
    services.identity_queries.lock().unwrap().push(query);
    services.respond(answer).await
}

async fn content(
    State(services): State<Arc<Services>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    services.content_calls.fetch_add(1, Ordering::SeqCst);
    let title = query.get("content").cloned().unwrap_or_default();
    let region = query.get("region").cloned().unwrap_or_default();
    let answer = {
        let answers = services.content.lock().unwrap();
        answers
            .get(&format!("{title}@{region}"))
            .or_else(|| answers.get(&title))
            .cloned()
            .unwrap_or(json!({"available": true}))
    };
    services.respond(answer).await
}

/// The two services on one loopback port, under `/identity` and `/content`.
struct Platform {
    services: Arc<Services>,
    addr: SocketAddr,
    shutdown: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Platform {
    async fn start() -> Platform {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut platform = Platform {
            services: Arc::default(),
            addr: listener.local_addr().unwrap(),
            shutdown: None,
        };
        platform.serve(listener);
        platform
    }

    fn serve(&mut self, listener: TcpListener) {
        let app = axum::Router::new()
            .route("/identity/entitlements", axum::routing::get(identity))
            .route("/content/availability", axum::routing::get(content))
            .with_state(self.services.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        self.shutdown = Some((stop, task));
    }

    /// Closes the port: connections are refused until [`Platform::restart`].
    async fn stop(&mut self) {
        if let Some((stop, task)) = self.shutdown.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Serves again on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn settings(&self) -> HttpSettings {
        HttpSettings {
            identity_url: Some(format!("http://{}/identity", self.addr).parse().unwrap()),
            content_url: Some(format!("http://{}/content/", self.addr).parse().unwrap()),
            ..HttpSettings::default()
        }
    }
}

/// usher on the memory store, over the HTTP provider with `settings`.
async fn usher_over(settings: HttpSettings) -> (TestServer, Arc<dyn Store>) {
    usher_with(&test_config(OverLimitPolicy::RejectNew), settings).await
}

async fn usher_with(
    config: &usher::config::Config,
    settings: HttpSettings,
) -> (TestServer, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let provider = HttpEntitlements::new(StaticPolicy::open(2).unwrap(), settings).unwrap();
    let server = serve_components(config, components(store.clone(), Arc::new(provider))).await;
    (server, store)
}

/// A create of `user` on a TV called `device`, with `content`.
fn create_of(user: &str, device: &str, content: &str) -> proto::CreateSessionRequest {
    proto::CreateSessionRequest {
        content_id: content.into(),
        ..create_request(user, device)
    }
}

/// The playback token of a new TV session of `user`.
async fn token_of(server: &mut TestServer, user: &str) -> String {
    let created = server.sessions.create_session(create_request(user, "tv"));
    created.await.unwrap().into_inner().playback_token
}

async fn seats_held(store: &Arc<dyn Store>, id: &str) -> usize {
    let seats = store.seats(&user(id), Deadline::NONE).await.unwrap();
    seats.holders.len()
}

/// The JSON claims of a compact JWT (not verified: ValidateToken does that).
fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn each_denial_reason_of_the_services_refuses_the_create_and_takes_no_seat() {
    let platform = Platform::start().await;
    let services = &platform.services;
    for (id, reason) in [
        ("nosub", "NO_SUBSCRIPTION"),
        ("planless", "PLAN_EXCLUDES_CONTENT"),
        ("kid", "PROFILE_RESTRICTED"),
        ("suspended", "ACCOUNT_SUSPENDED"),
    ] {
        services.answer_identity(id, json!({"allowed": false, "reason": reason}));
    }
    services.answer_identity("strange", json!({"allowed": false, "reason": "NEW_REASON"}));
    services.answer_content(
        "geo@DE",
        json!({"available": false, "reason": "GEO_BLOCKED"}),
    );
    services.answer_content(
        "soon",
        json!({"available": false, "reason": "NOT_YET_AVAILABLE"}),
    );
    services.answer_content("old", json!({"available": false, "reason": "EXPIRED"}));
    let (mut server, store) = usher_over(platform.settings()).await;

    let cases = [
        ("nosub", "title-1", "NO_SUBSCRIPTION"),
        ("planless", "title-1", "PLAN_EXCLUDES_CONTENT"),
        ("kid", "title-1", "PROFILE_RESTRICTED"),
        ("suspended", "title-1", "ACCOUNT_SUSPENDED"),
        ("strange", "title-1", "ENTITLEMENT_DENIED"),
        ("viewer", "geo", "GEO_BLOCKED"),
        ("viewer", "soon", "NOT_YET_AVAILABLE"),
        ("viewer", "old", "EXPIRED"),
    ];
    for (id, title, expected) in cases {
        let refused = server
            .sessions
            .create_session(create_of(id, "tv", title))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{id} {title}");
        assert_eq!(reason(&refused), expected, "{id} {title}");
        assert_eq!(seats_held(&store, id).await, 0, "{id} holds no seat");
    }
    // Geo-blocked in Germany only: the same title plays from France.
    let mut in_france = create_of("viewer", "tv", "geo");
    in_france.client.as_mut().unwrap().region = "FR".into();
    server.sessions.create_session(in_france).await.unwrap();

    // What the identity service was asked: the user, profile, title and device type.
    let asked = services.identity_queries.lock().unwrap()[0].clone();
    assert_eq!(asked["user"], "nosub");
    assert_eq!(asked["profile"], "profile-1");
    assert_eq!(asked["content"], "title-1");
    assert_eq!(asked["device_type"], "tv");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_identity_service_sets_the_seat_limit() {
    let platform = Platform::start().await;
    platform
        .services
        .answer_identity("single", json!({"allowed": true, "seat_limit": 1}));
    let (mut server, _) = usher_over(platform.settings()).await;
    server.start("single", "tv").await;
    let refused = server
        .sessions
        .create_session(create_request("single", "phone"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "CONCURRENCY_LIMIT_REACHED");
    server.running.shutdown().await.unwrap();
}

/// A plan's device rules: a device type it excludes is DEVICE_NOT_ALLOWED; an allowed
/// one gets a token carrying the resolution, the DRM and the region, which ValidateToken
/// reads back.
#[tokio::test]
async fn device_rules_refuse_excluded_devices_and_reach_the_token() {
    let platform = Platform::start().await;
    platform.services.answer_identity(
        "mobile-plan",
        json!({
            "allowed": true, "seat_limit": 2, "plan": "mobile",
            "devices": {
                "allowed_types": ["mobile", "tablet"],
                "max_resolution": {"mobile": 720, "default": 480},
                "drm": {"systems": ["widevine", "fairplay"], "min_security_level": "L3"}
            }
        }),
    );
    let (mut server, store) = usher_over(platform.settings()).await;
    let refused = server
        .sessions
        .create_session(create_request("mobile-plan", "tv"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(reason(&refused), "DEVICE_NOT_ALLOWED");
    assert_eq!(seats_held(&store, "mobile-plan").await, 0);

    let mut on_phone = create_request("mobile-plan", "phone");
    on_phone.device.as_mut().unwrap().r#type = proto::DeviceType::Mobile as i32;
    let created = server
        .sessions
        .create_session(on_phone)
        .await
        .unwrap()
        .into_inner();
    let claims = jwt_claims(&created.playback_token);
    assert_eq!(claims["res"], 720);
    assert_eq!(
        claims["drm"],
        json!({"sys": ["widevine", "fairplay"], "lvl": "L3"})
    );
    assert_eq!(claims["reg"], "DE");
    let plain = token_of(&mut server, "no-rules").await;
    assert!(jwt_claims(&plain).get("res").is_none());
    println!(
        "playback token with res, drm and reg: {} bytes; with reg only: {} bytes",
        created.playback_token.len(),
        plain.len()
    );
    let validated = TokenServiceClient::new(server.channel.clone())
        .validate_token(proto::ValidateTokenRequest {
            token: created.playback_token,
            check_session: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(validated.valid);
    let claims = validated.claims.unwrap();
    assert_eq!(claims.max_resolution, 720);
    assert_eq!(claims.drm_systems, ["widevine", "fairplay"]);
    assert_eq!(claims.drm_security_level, "L3");
    assert_eq!(claims.region, "DE");

    // A tablet falls back to the plan's default resolution.
    let mut on_tablet = create_request("mobile-plan", "tablet");
    on_tablet.device.as_mut().unwrap().r#type = proto::DeviceType::Tablet as i32;
    let created = server.sessions.create_session(on_tablet).await.unwrap();
    assert_eq!(jwt_claims(&created.into_inner().playback_token)["res"], 480);
    server.running.shutdown().await.unwrap();
}

/// A service slower than the caller's deadline: UNAVAILABLE inside the deadline, not
/// DEADLINE_EXCEEDED at it; and without a deadline, the per-attempt timeout bounds it.
#[tokio::test]
async fn a_slow_service_is_unavailable_inside_the_deadline() {
    let platform = Platform::start().await;
    platform.services.behave(Behaviour {
        delay: Duration::from_secs(5),
        ..Behaviour::default()
    });
    let (mut server, store) = usher_over(HttpSettings {
        timeout: Duration::from_secs(30),
        ..platform.settings()
    })
    .await;
    let mut request = tonic::Request::new(create_request("patient", "tv"));
    request.set_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let refused = server.sessions.create_session(request).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    assert!(waited < Duration::from_millis(400), "{waited:?}");
    assert_eq!(seats_held(&store, "patient").await, 0);
    server.running.shutdown().await.unwrap();

    let (mut server, _) = usher_over(HttpSettings {
        timeout: Duration::from_millis(200),
        ..platform.settings()
    })
    .await;
    let started = Instant::now();
    let refused = server
        .sessions
        .create_session(create_request("patient", "tv"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    // One attempt: a timeout is not retried.
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(380), "{waited:?}");
    server.running.shutdown().await.unwrap();
}

/// Down: each create fails until the breaker opens after N; then calls fail fast without
/// reaching the service, even once it is back; after the cool-down one probe closes it.
#[tokio::test]
async fn a_down_service_opens_the_breaker_which_closes_when_it_returns() {
    let mut platform = Platform::start().await;
    let (mut server, _) = usher_over(HttpSettings {
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(700),
        ..platform.settings()
    })
    .await;
    platform.stop().await;
    for i in 0..3 {
        let refused = server
            .sessions
            .create_session(create_request(&format!("down-{i}"), "tv"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    }
    // Open: the service is back, but nothing reaches it, and the answer is immediate.
    platform.restart().await;
    let started = Instant::now();
    let refused = server
        .sessions
        .create_session(create_request("down-4", "tv"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(
        platform.services.calls(),
        (0, 0),
        "the open breaker calls no one"
    );
    // After the cool-down, one probe per service goes through and closes the breakers.
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.start("down-5", "tv").await;
    assert_eq!(platform.services.calls(), (1, 1));
    // Closed again: the next user is asked for (the title's answer is cached).
    server.start("down-6", "tv").await;
    assert_eq!(platform.services.calls(), (2, 1));
    server.running.shutdown().await.unwrap();
}

/// Answers a service must not give: not JSON, the wrong shape, an error status, a seat
/// limit out of range. Each is UNAVAILABLE and nothing is stored.
#[tokio::test]
async fn garbage_from_a_service_is_a_clear_error_and_stores_nothing() {
    let platform = Platform::start().await;
    let (mut server, store) = usher_over(HttpSettings {
        breaker_failures: 0,
        ..platform.settings()
    })
    .await;
    let services = &platform.services;
    let garbage = Behaviour {
        garbage: true,
        ..Behaviour::default()
    };
    let teapot = Behaviour {
        status: Some(418),
        ..Behaviour::default()
    };
    services.answer_identity("shape", json!({"allowed": "yes"}));
    services.answer_identity("huge", json!({"allowed": true, "seat_limit": 1000}));
    services.answer_identity("limitless", json!({"allowed": true}));
    for (id, behaviour) in [
        ("not-json", garbage),
        ("error-status", teapot),
        ("shape", Behaviour::default()),
        ("huge", Behaviour::default()),
        ("limitless", Behaviour::default()),
    ] {
        services.behave(behaviour);
        let refused = server
            .sessions
            .create_session(create_request(id, "tv"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{id}");
        assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE", "{id}");
        assert_eq!(seats_held(&store, id).await, 0, "{id}");
    }
    server.running.shutdown().await.unwrap();
}

/// Answers are cached for their TTL (the default's or the service's max-age), refusals
/// too; a cache hit calls no one.
#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let platform = Platform::start().await;
    let services = &platform.services;
    services.answer_identity(
        "refused",
        json!({"allowed": false, "reason": "NO_SUBSCRIPTION"}),
    );
    let (mut server, _) = usher_over(HttpSettings {
        positive_ttl: Duration::from_millis(500),
        negative_ttl: Duration::from_millis(500),
        ..platform.settings()
    })
    .await;
    server.start("cached", "tv").await;
    server.start("cached", "tv").await;
    assert_eq!(services.calls(), (1, 1), "the second create is a hit");
    for _ in 0..2 {
        let refused = server
            .sessions
            .create_session(create_request("refused", "tv"))
            .await
            .unwrap_err();
        assert_eq!(reason(&refused), "NO_SUBSCRIPTION");
    }
    assert_eq!(services.calls().0, 2, "the refusal is cached too");
    tokio::time::sleep(Duration::from_millis(600)).await;
    server.start("cached", "tv").await;
    assert_eq!(
        services.calls(),
        (3, 2),
        "past its TTL the answer is asked again"
    );

    // The service's max-age wins over the default.
    services.behave(Behaviour {
        cache_control: Some("max-age=0"),
        ..Behaviour::default()
    });
    for _ in 0..2 {
        let create = create_of("uncached", "tv", "title-2");
        server.sessions.create_session(create).await.unwrap();
    }
    assert_eq!(services.calls(), (5, 4));
    server.running.shutdown().await.unwrap();
}

/// 100 concurrent creates of one user while the services are asked: one call each.
#[tokio::test]
async fn concurrent_misses_become_one_upstream_call() {
    let platform = Platform::start().await;
    platform
        .services
        .answer_identity("crowd", json!({"allowed": true, "seat_limit": 100}));
    platform.services.behave(Behaviour {
        delay: Duration::from_millis(150),
        ..Behaviour::default()
    });
    let (server, _) = usher_over(platform.settings()).await;
    let creates = (0..100).map(|i| {
        let mut sessions = server.sessions.clone();
        async move {
            sessions
                .create_session(create_request("crowd", &format!("device-{i}")))
                .await
        }
    });
    let answers = futures::future::join_all(creates).await;
    let refused = answers.iter().filter(|a| a.is_err()).count();
    assert_eq!(refused, 0, "{:?}", answers.iter().find(|a| a.is_err()));
    assert_eq!(platform.services.calls(), (1, 1));
    server.running.shutdown().await.unwrap();
}

/// serve-stale: while a service is down, its last answer is served up to the maximum
/// staleness; fail-closed refuses.
#[tokio::test]
async fn serve_stale_serves_the_last_answer_while_the_service_is_down() {
    let mut platform = Platform::start().await;
    // Every answer is stale at once, so only serve-stale can use it.
    platform.services.behave(Behaviour {
        cache_control: Some("max-age=0"),
        ..Behaviour::default()
    });
    let stale = HttpSettings {
        degraded: DegradedMode::ServeStale,
        max_stale: Duration::from_millis(1500),
        ..platform.settings()
    };
    let (mut lenient, _) = usher_over(stale).await;
    let (mut strict, _) = usher_over(platform.settings()).await;
    lenient.start("regular", "tv").await;
    strict.start("regular", "tv").await;
    platform.stop().await;

    lenient.start("regular", "tv").await;
    let refused = strict
        .sessions
        .create_session(create_request("regular", "tv"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    // Never seen: nothing to serve.
    let refused = lenient
        .sessions
        .create_session(create_request("newcomer", "tv"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    // Older than the maximum staleness: not served.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let refused = lenient
        .sessions
        .create_session(create_request("regular", "tv"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    lenient.running.shutdown().await.unwrap();
    strict.running.shutdown().await.unwrap();
}

/// The entitlement is asked again every second on a stream: a user who lost it is
/// stopped with ENTITLEMENT_LOST, the session terminated.
#[tokio::test]
async fn entitlement_lost_mid_playback_stops_the_stream() {
    let platform = Platform::start().await;
    let mut config = stream_config(OverLimitPolicy::RejectNew);
    config.streams.entitlement_recheck = Some(Duration::from_secs(1));
    let (mut server, _) = usher_with(
        &config,
        HttpSettings {
            positive_ttl: Duration::from_millis(200),
            ..platform.settings()
        },
    )
    .await;
    let created = server
        .sessions
        .create_session(create_request("leaver", "tv"))
        .await
        .unwrap()
        .into_inner();
    let name = created.session.unwrap().name;
    let mut device = open(&server, &created.playback_token).await;
    let beats = device.sender.clone();
    let beating = tokio::spawn(async move {
        while beats.send(playing(7)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // A re-check that finds the user still entitled pushes a token.
    loop {
        match device.next(Duration::from_secs(3)).await {
            proto::stream_heartbeats_response::Kind::Token(_) => break,
            proto::stream_heartbeats_response::Kind::Stop(stop) => panic!("{stop:?}"),
            _ => {}
        }
    }
    platform.services.answer_identity(
        "leaver",
        json!({"allowed": false, "reason": "ACCOUNT_SUSPENDED"}),
    );
    let (stop, waited) = device.until_stop(Duration::from_secs(4)).await;
    assert_eq!(stop_reason(&stop), proto::StopReason::EntitlementLost);
    assert!(
        stop.message.contains("ACCOUNT_SUSPENDED"),
        "{}",
        stop.message
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let ended = server.get(&name).await.unwrap();
    assert_eq!(ended.state, proto::SessionState::Terminated as i32);
    beating.abort();
    server.running.shutdown().await.unwrap();
}

/// RefreshToken asks again: kept rules when the service is down (the session goes on),
/// a refusal that ends the session when the entitlement is gone.
#[tokio::test]
async fn a_refresh_rechecks_the_entitlement() {
    let platform = Platform::start().await;
    let services = &platform.services;
    services.answer_identity(
        "refresher",
        json!({"allowed": true, "seat_limit": 2, "devices": {"max_resolution": {"tv": 2160}}}),
    );
    let (mut server, _) = usher_over(HttpSettings {
        positive_ttl: Duration::ZERO,
        breaker_failures: 0,
        ..platform.settings()
    })
    .await;
    let created = server
        .sessions
        .create_session(create_request("refresher", "tv"))
        .await
        .unwrap()
        .into_inner();
    let name = created.session.unwrap().name;
    let mut tokens = TokenServiceClient::new(server.channel.clone());
    let refresh = |token: String| proto::RefreshTokenRequest { token };

    services.behave(Behaviour {
        status: Some(503),
        ..Behaviour::default()
    });
    let calls = services.calls().0;
    let kept = tokens
        .refresh_token(refresh(created.playback_token))
        .await
        .expect("a service outage does not end the session")
        .into_inner();
    assert!(services.calls().0 > calls, "the refresh asked the service");
    assert_eq!(
        jwt_claims(&kept.playback_token)["res"],
        2160,
        "the rules are kept"
    );

    services.behave(Behaviour::default());
    services.answer_identity(
        "refresher",
        json!({"allowed": false, "reason": "NO_SUBSCRIPTION"}),
    );
    let refused = tokens
        .refresh_token(refresh(kept.playback_token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(reason(&refused), "NO_SUBSCRIPTION");
    let ended = server.get(&name).await.unwrap();
    assert_eq!(ended.state, proto::SessionState::Terminated as i32);
    assert_eq!(ended.ended_by, "usher");
    server.running.shutdown().await.unwrap();
}

/// The static policy comes first: what it refuses never reaches the services.
#[tokio::test]
async fn the_static_policy_refuses_before_the_services_are_asked() {
    let platform = Platform::start().await;
    let file: usher::entitlement::PolicyFile =
        toml::from_str("[content]\ndeny = [\"withdrawn\"]").unwrap();
    let policy = StaticPolicy::from_file(file, None).unwrap();
    let provider = HttpEntitlements::new(policy, platform.settings()).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let config = test_config(OverLimitPolicy::RejectNew);
    let mut server = serve_components(&config, components(store, Arc::new(provider))).await;
    let refused = server
        .sessions
        .create_session(create_of("viewer", "tv", "withdrawn"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "CONTENT_UNAVAILABLE");
    assert_eq!(platform.services.calls(), (0, 0));
    server.start("viewer", "tv").await;
    assert_eq!(platform.services.calls(), (1, 1));
    server.running.shutdown().await.unwrap();
}

/// The Python packages of the contract check (schemathesis brings them; `.ci/run`
/// installs it).
fn python_openapi_available() -> bool {
    crate::python::python_has(
        "yaml, openapi_spec_validator, openapi_schema_validator",
        "pyyaml openapi-spec-validator openapi-schema-validator",
    )
}

/// The real binary, configured by its flags, against an identity and content service
/// written in Python from docs/entitlement-http.md, which checks the OpenAPI document and
/// validates each of its answers against it: allowed with device rules in the token,
/// each kind of refusal, and the service gone (a new question is UNAVAILABLE, a cached
/// answer still serves).
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_asks_a_python_service_written_from_the_contract() {
    use std::io::BufRead;
    if !python_openapi_available() {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let mut service = std::process::Command::new("python3")
        .arg(format!("{root}/tests/python/entitlement_service.py"))
        .args([
            "--spec",
            &format!("{root}/docs/entitlement-http.openapi.yaml"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(service.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("the service did not start: {line:?}"))
        .trim()
        .to_owned();
    let identity = format!("http://127.0.0.1:{port}/identity");
    let content = format!("http://127.0.0.1:{port}/content");
    let usher = crate::grpcurl::Usher::start(&[
        "--entitlement-identity-url",
        &identity,
        "--entitlement-content-url",
        &content,
    ]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", usher.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut sessions =
        proto::playback_session_service_client::PlaybackSessionServiceClient::new(channel);

    let created = sessions
        .create_session(create_request("alice", "tv"))
        .await
        .unwrap()
        .into_inner();
    let claims = jwt_claims(&created.playback_token);
    assert_eq!(claims["res"], 2160);
    assert_eq!(
        claims["drm"],
        json!({"sys": ["widevine", "playready"], "lvl": "L1"})
    );
    assert_eq!(claims["reg"], "DE");
    for (request, expected) in [
        (create_request("bob", "tv"), "NO_SUBSCRIPTION"),
        (create_request("mo", "tv"), "DEVICE_NOT_ALLOWED"),
        (create_of("alice", "tv", "geo-film"), "GEO_BLOCKED"),
    ] {
        let refused = sessions.create_session(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert_eq!(reason(&refused), expected);
    }

    service.kill().unwrap();
    service.wait().unwrap();
    let refused = sessions
        .create_session(create_request("carol", "tv"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    // Alice's answers were cached for the service's max-age: she still starts.
    sessions
        .create_session(create_request("alice", "phone"))
        .await
        .unwrap();
    assert!(usher.terminate().success());
}

/// The content service may say where a title's manifests are: CreateSession and
/// GetManifest sign that path on the title's origin instead of its template; a path that
/// could leave the origin is an answer usher cannot use.
#[tokio::test]
async fn the_content_service_places_the_manifest() {
    use usher::manifest::edge::EdgeTokenSigner;
    use usher::manifest::{Origin, Origins};
    let platform = Platform::start().await;
    let services = &platform.services;
    services.answer_content(
        "final",
        json!({"available": true, "manifest": {"hls": "/events/2026/final/master.m3u8"}}),
    );
    services.answer_content(
        "escape",
        json!({"available": true, "manifest": {"hls": "/../secrets/master.m3u8"}}),
    );
    let origins = Origins::new(
        vec![Origin {
            name: "edge".into(),
            content_prefix: String::new(),
            hls_path: "/{content}/master.m3u8".into(),
            dash_path: "/{content}/manifest.mpd".into(),
            signer: Box::new(EdgeTokenSigner::new("https://cdn.test".into(), vec![7; 32])),
        }],
        Duration::from_secs(300),
    );
    let provider = HttpEntitlements::new(StaticPolicy::open(2).unwrap(), platform.settings());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let mut parts = components(store, Arc::new(provider.unwrap()));
    parts.manifests = Some(Arc::new(origins));
    let mut server = serve_components(&test_config(OverLimitPolicy::RejectNew), parts).await;

    let placed = server
        .sessions
        .create_session(create_of("viewer", "tv", "final"))
        .await
        .unwrap()
        .into_inner();
    let url = placed.manifest.unwrap().url;
    assert!(
        url.starts_with("https://cdn.test/events/2026/final/master.m3u8?"),
        "{url}"
    );
    let again = server
        .sessions
        .get_manifest(proto::GetManifestRequest {
            name: placed.session.unwrap().name,
            manifest_type: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let url = again.manifest.unwrap().url;
    assert!(
        url.starts_with("https://cdn.test/events/2026/final/"),
        "{url}"
    );

    let templated = server
        .sessions
        .create_session(create_of("viewer", "phone", "title-1"))
        .await
        .unwrap()
        .into_inner();
    let url = templated.manifest.unwrap().url;
    assert!(
        url.starts_with("https://cdn.test/title-1/master.m3u8?"),
        "{url}"
    );

    let refused = server
        .sessions
        .create_session(create_of("viewer", "tablet", "escape"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "ENTITLEMENT_UNAVAILABLE");
    server.running.shutdown().await.unwrap();
}
