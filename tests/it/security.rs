//! Security, through the real server: forged and mis-scoped playback tokens, callers
//! without credentials or without the role, key rotation, and mutual TLS. Every case here
//! would pass a request that must be refused if its protection were missing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;
use usher::auth::{Credentials, CredentialsFile};
use usher::entitlement::StaticPolicy;
use usher::proto;
use usher::proto::event_service_client::EventServiceClient;
use usher::proto::token_service_client::TokenServiceClient;
use usher::server::Components;
use usher::store::memory::MemoryStore;
use usher::store::{OverLimitPolicy, Store};
use usher::token::keys::{KeyAlgorithm, KeySet, StoredKey};
use usher::token::{TokenSettings, Tokens};

use crate::e2e::create_request;
use crate::support::{
    TestServer, error_metadata, reason, serve_components, test_config, test_settings,
};

const PLAYBACK_KEY: &str = "playback-api-key-0123456789abcdef0123";
const SUPPORT_KEY: &str = "support-key-0123456789abcdef0123456789";
const EDGE_KEY: &str = "edge-key-0123456789abcdef0123456789abcd";
const ADMIN_KEY: &str = "admin-key-0123456789abcdef0123456789abc";
const PROXY_KEY: &str = "device-proxy-key-0123456789abcdef012345";
const EVENTS_KEY: &str = "events-key-0123456789abcdef0123456789ab";

fn credentials() -> Credentials {
    let text = format!(
        r#"
        [[service]]
        name = "playback-api"
        key = "{PLAYBACK_KEY}"
        roles = ["playback-api"]
        [[service]]
        name = "support"
        key = "{SUPPORT_KEY}"
        roles = ["support"]
        [[service]]
        name = "edge"
        key = "{EDGE_KEY}"
        roles = ["edge"]
        [[service]]
        name = "admin"
        key = "{ADMIN_KEY}"
        roles = ["admin"]
        [[service]]
        name = "heartbeat-gateway"
        key = "{PROXY_KEY}"
        roles = ["device-proxy"]
        [[service]]
        name = "analytics"
        key = "{EVENTS_KEY}"
        roles = ["events"]
        [[client_certificate]]
        subject = "edge.usher.test"
        roles = ["edge"]
        "#
    );
    let file: CredentialsFile = toml::from_str(&text).unwrap();
    Credentials::from_file(file).unwrap()
}

/// A secured server (no dev mode) with its key set in a temp directory.
struct Secured {
    server: TestServer,
    tokens: TokenServiceClient<tonic::transport::Channel>,
    keys: PathBuf,
    _dir: tempfile::TempDir,
}

fn token_settings(keys: &std::path::Path) -> TokenSettings {
    TokenSettings {
        keys: Some(keys.to_path_buf()),
        reload_interval: Duration::from_millis(100),
        refresh_grace: Duration::from_secs(120),
        leeway: Duration::from_secs(5),
        ..TokenSettings::default()
    }
}

async fn secured(algorithm: KeyAlgorithm) -> Secured {
    let mut config = test_config(OverLimitPolicy::RejectNew);
    config.insecure_dev = false;
    secured_with(algorithm, config).await
}

async fn secured_with(algorithm: KeyAlgorithm, config: usher::config::Config) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    KeySet::generate(algorithm).unwrap().write(&keys).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new(test_settings()));
    let components = Components {
        store,
        entitlements: Arc::new(StaticPolicy::open(1).unwrap()),
        tokens: Arc::new(Tokens::load(token_settings(&keys)).unwrap()),
        credentials: credentials(),
        manifests: None,
    };
    let server = serve_components(&config, components).await;
    let tokens = TokenServiceClient::new(server.channel.clone());
    Secured {
        server,
        tokens,
        keys,
        _dir: dir,
    }
}

fn with_bearer<T>(message: T, bearer: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {bearer}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Secured {
    /// Creates a session as the playback API; returns the session and its token.
    async fn start(&mut self, user: &str, device: &str) -> (proto::Session, String) {
        let created = self
            .server
            .sessions
            .create_session(with_bearer(create_request(user, device), PLAYBACK_KEY))
            .await
            .unwrap()
            .into_inner();
        (created.session.unwrap(), created.playback_token)
    }

    async fn heartbeat(
        &mut self,
        name: &str,
        token: &str,
    ) -> Result<proto::Session, tonic::Status> {
        let request = proto::HeartbeatRequest {
            name: name.to_owned(),
            ..Default::default()
        };
        self.server
            .sessions
            .heartbeat(with_bearer(request, token))
            .await
            .map(|r| r.into_inner().session.unwrap())
    }

    async fn validate(&mut self, token: &str, check_session: bool) -> proto::ValidateTokenResponse {
        let request = proto::ValidateTokenRequest {
            token: token.to_owned(),
            check_session,
        };
        self.tokens
            .validate_token(with_bearer(request, EDGE_KEY))
            .await
            .unwrap()
            .into_inner()
    }

    async fn refresh(
        &mut self,
        token: &str,
        bearer: &str,
    ) -> Result<proto::RefreshTokenResponse, tonic::Status> {
        let request = proto::RefreshTokenRequest {
            token: token.to_owned(),
        };
        self.tokens
            .refresh_token(with_bearer(request, bearer))
            .await
            .map(|r| r.into_inner())
    }

    fn active_key(&self) -> StoredKey {
        let set = KeySet::read(&self.keys).unwrap();
        set.keys
            .into_iter()
            .find(|k| k.usher_status == usher::token::keys::KeyStatus::Active)
            .unwrap()
    }

    /// Signs arbitrary header fields and claims with the server's own active key: only
    /// the thing under test is wrong.
    fn sign(&self, header: Header, claims: &Value) -> String {
        let key = self.active_key();
        let encoding = match header.alg {
            Algorithm::EdDSA => {
                let seed: [u8; 32] = B64.decode(key.d.unwrap()).unwrap().try_into().unwrap();
                let der = ed25519_dalek::SigningKey::from_bytes(&seed)
                    .to_pkcs8_der()
                    .unwrap();
                EncodingKey::from_ed_der(der.as_bytes())
            }
            Algorithm::HS256 => EncodingKey::from_secret(&B64.decode(key.k.unwrap()).unwrap()),
            other => panic!("not a test algorithm: {other:?}"),
        };
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }

    fn header(&self) -> Header {
        let key = self.active_key();
        let alg = if key.alg == "HS256" {
            Algorithm::HS256
        } else {
            Algorithm::EdDSA
        };
        let mut header = Header::new(alg);
        header.typ = Some("playback+jwt".into());
        header.kid = Some(key.kid);
        header
    }
}

/// The claims the server would issue for `session`, as JSON to be bent.
fn claims_for(session: &proto::Session) -> Value {
    let now = now();
    json!({
        "iss": "usher", "aud": "usher-playback",
        "sub": session.name.split('/').nth(1).unwrap(),
        "sid": session.name, "did": session.device.as_ref().unwrap().id,
        "cid": session.content_id, "pid": session.profile_id, "gen": session.generation,
        "iat": now, "nbf": now, "exp": now + 600, "jti": "forged",
    })
}

fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

/// A forged token must be refused by ValidateToken and by a device call alike.
async fn assert_refused(s: &mut Secured, token: &str, name: &str, expected: &str, what: &str) {
    let answer = s.validate(token, false).await;
    assert!(!answer.valid, "{what}: accepted");
    assert_eq!(answer.reason, expected, "{what}");
    let status = s.heartbeat(name, token).await.expect_err(what);
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
}

#[tokio::test]
async fn forged_and_malformed_tokens_are_refused() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (session, token) = s.start("alice", "tv").await;
    let name = session.name.clone();
    // The genuine token works: the refusals below are about what was changed.
    assert!(s.validate(&token, true).await.valid);
    s.heartbeat(&name, &token).await.unwrap();
    let honest = claims_for(&session);
    assert!(
        s.validate(&s.sign(s.header(), &honest), false).await.valid,
        "the forger signs right"
    );

    let kid = s.active_key().kid;
    let none = unsigned(
        &json!({"alg": "none", "typ": "playback+jwt", "kid": kid}),
        &honest,
    );
    assert_refused(&mut s, &none, &name, "TOKEN_INVALID", "alg none").await;

    // HS256 keyed with the Ed25519 public key (algorithm confusion).
    let public = B64.decode(s.active_key().x.unwrap()).unwrap();
    let mut confused = Header::new(Algorithm::HS256);
    confused.typ = Some("playback+jwt".into());
    confused.kid = Some(kid.clone());
    let forged =
        jsonwebtoken::encode(&confused, &honest, &EncodingKey::from_secret(&public)).unwrap();
    assert_refused(
        &mut s,
        &forged,
        &name,
        "TOKEN_INVALID",
        "HS256 with the public key",
    )
    .await;
    let x_text = s.active_key().x.unwrap();
    let forged = jsonwebtoken::encode(
        &confused,
        &honest,
        &EncodingKey::from_secret(x_text.as_bytes()),
    )
    .unwrap();
    assert_refused(
        &mut s,
        &forged,
        &name,
        "TOKEN_INVALID",
        "HS256 with the public key text",
    )
    .await;

    for bad_kid in [
        "unknown",
        "../../../../etc/passwd",
        "' OR '1'='1",
        &"k".repeat(1000),
        "",
    ] {
        let mut header = s.header();
        header.kid = Some(bad_kid.to_owned());
        let forged = s.sign(header, &honest);
        assert_refused(&mut s, &forged, &name, "TOKEN_INVALID", "bad kid").await;
    }
    // Over 4 KiB: refused before any parsing (a bad field for ValidateToken).
    let mut header = s.header();
    header.kid = Some("k".repeat(5000));
    let oversized = s.sign(header, &honest);
    let status = s
        .tokens
        .validate_token(with_bearer(
            proto::ValidateTokenRequest {
                token: oversized.clone(),
                check_session: false,
            },
            EDGE_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        s.heartbeat(&name, &oversized).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut header = s.header();
    header.kid = None;
    let forged = s.sign(header, &honest);
    assert_refused(&mut s, &forged, &name, "TOKEN_INVALID", "no kid").await;

    for (field, value) in [
        ("aud", json!("someone-else")),
        ("iss", json!("mallory")),
        ("aud", json!(["usher-playback", "x"])),
    ] {
        let mut claims = honest.clone();
        claims[field] = value;
        let forged = s.sign(s.header(), &claims);
        assert_refused(&mut s, &forged, &name, "TOKEN_INVALID", field).await;
    }
    for typ in [Some("JWT".to_owned()), None] {
        let mut header = s.header();
        header.typ = typ;
        let forged = s.sign(header, &honest);
        assert_refused(&mut s, &forged, &name, "TOKEN_INVALID", "typ").await;
    }

    let t = now();
    let mut expired = honest.clone();
    expired["exp"] = json!(t - 60);
    expired["iat"] = json!(t - 700);
    expired["nbf"] = json!(t - 700);
    let forged = s.sign(s.header(), &expired);
    assert_refused(&mut s, &forged, &name, "TOKEN_EXPIRED", "expired").await;
    let mut early = honest.clone();
    early["nbf"] = json!(t + 300);
    let forged = s.sign(s.header(), &early);
    assert_refused(&mut s, &forged, &name, "TOKEN_INVALID", "not yet valid").await;
    for field in ["exp", "nbf", "iat"] {
        let mut stringly = honest.clone();
        stringly[field] = json!(stringly[field].to_string());
        let forged = s.sign(s.header(), &stringly);
        assert_refused(&mut s, &forged, &name, "TOKEN_INVALID", "string time claim").await;
        let mut missing = honest.clone();
        missing.as_object_mut().unwrap().remove(field);
        let forged = s.sign(s.header(), &missing);
        assert_refused(
            &mut s,
            &forged,
            &name,
            "TOKEN_INVALID",
            "missing time claim",
        )
        .await;
    }

    // A valid token with one payload byte changed.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
    claims["gen"] = json!(999);
    parts[1] = B64.encode(claims.to_string());
    let tampered = parts.join(".");
    assert_refused(
        &mut s,
        &tampered,
        &name,
        "TOKEN_INVALID",
        "tampered payload",
    )
    .await;
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_token_authorizes_only_its_own_session() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (a, token_a) = s.start("bob", "tv").await;
    let (b, token_b) = {
        // bob has one seat: b is another user's session.
        s.start("carol", "tv").await
    };
    // Session B with A's token, another user: NOT_FOUND, like a session that does not exist.
    let status = s.heartbeat(&b.name, &token_a).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // The same user's other session: also NOT_FOUND.
    let same_user_b = a.name.replace(
        a.name.rsplit('/').next().unwrap(),
        "01234567-0000-7000-8000-000000000000",
    );
    assert_eq!(
        s.heartbeat(&same_user_b, &token_a)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // And a session id that exists, under the token's user but another session's id.
    let crossed = format!("users/bob/sessions/{}", b.name.rsplit('/').next().unwrap());
    assert_eq!(
        s.heartbeat(&crossed, &token_a).await.unwrap_err().code(),
        Code::NotFound
    );
    // Each token works on its own session.
    s.heartbeat(&a.name, &token_a).await.unwrap();
    s.heartbeat(&b.name, &token_b).await.unwrap();
    // No token at all.
    let bare = proto::HeartbeatRequest {
        name: a.name.clone(),
        ..Default::default()
    };
    let status = s.server.sessions.heartbeat(bare).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // A service key is not a playback token: the service is told so, rather than told
    // its credential is bad (which tells a device to start over).
    let status = s.heartbeat(&a.name, PLAYBACK_KEY).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PLAYBACK_TOKEN_REQUIRED");
    s.server.running.shutdown().await.unwrap();
}

/// GetManifest is a device method: the session's own token (or a role naming it); a
/// token of another session finds nothing, a service key is told it needs a token.
#[tokio::test]
async fn a_manifest_is_only_for_its_own_sessions_token() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (a, token_a) = s.start("dora", "tv").await;
    let (b, _) = s.start("emil", "tv").await;
    let manifest = |name: &str, token: Option<&str>| {
        let request = proto::GetManifestRequest {
            name: name.to_owned(),
            manifest_type: 0,
        };
        let request = match token {
            Some(token) => with_bearer(request, token),
            None => tonic::Request::new(request),
        };
        let mut client = s.server.sessions.clone();
        async move { client.get_manifest(request).await.unwrap_err() }
    };
    let other = manifest(&b.name, Some(&token_a)).await;
    assert_eq!(other.code(), Code::NotFound, "{other:?}");
    let bare = manifest(&a.name, None).await;
    assert_eq!(bare.code(), Code::Unauthenticated, "{bare:?}");
    let service = manifest(&a.name, Some(PLAYBACK_KEY)).await;
    assert_eq!(reason(&service), "PLAYBACK_TOKEN_REQUIRED", "{service:?}");
    // Its own token passes; this usher signs no manifests.
    let own = manifest(&a.name, Some(&token_a)).await;
    assert_eq!(reason(&own), "MANIFEST_UNAVAILABLE", "{own:?}");
    s.server.running.shutdown().await.unwrap();
}

/// A player reaches watch progress with its playback token: its own user's profile, and
/// writes only for its session's title while the session is live; services by role.
#[tokio::test]
async fn a_playback_token_reaches_only_its_own_profiles_progress() {
    use usher::proto::progress_service_client::ProgressServiceClient;
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (session, token) = s.start("finn", "tv").await;
    let mut progress = ProgressServiceClient::new(s.server.channel.clone());
    // create_request's profile and title.
    let write = |name: &str, bearer: &str| {
        with_bearer(
            proto::UpdateProgressRequest {
                progress: Some(proto::Progress {
                    name: name.to_owned(),
                    position: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    device_id: "claimed-by-request".into(),
                    ..Default::default()
                }),
            },
            bearer,
        )
    };
    const OWN: &str = "users/finn/profiles/profile-1/progress/title-1";
    let written = progress
        .update_progress(write(OWN, &token))
        .await
        .unwrap()
        .into_inner()
        .progress
        .unwrap();
    assert_eq!(
        written.device_id, "tv",
        "the session's device, not the request's"
    );
    let read = |name: &str, bearer: &str| {
        with_bearer(
            proto::GetProgressRequest {
                name: name.to_owned(),
            },
            bearer,
        )
    };
    progress.get_progress(read(OWN, &token)).await.unwrap();
    let row = with_bearer(
        proto::ListProgressRequest {
            parent: "users/finn/profiles/profile-1".into(),
            ..Default::default()
        },
        &token,
    );
    assert_eq!(
        progress
            .list_progress(row)
            .await
            .unwrap()
            .into_inner()
            .progress
            .len(),
        1
    );
    // Another profile, another user, another title: as if there were none.
    for name in [
        "users/finn/profiles/kids/progress/title-1",
        "users/gwen/profiles/profile-1/progress/title-1",
        "users/finn/profiles/profile-1/progress/title-2",
    ] {
        let refused = progress
            .update_progress(write(name, &token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::NotFound, "{name}: {refused:?}");
    }
    let other = progress
        .get_progress(read(
            "users/gwen/profiles/profile-1/progress/title-1",
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    // No credential; a role that may read but not write; one that may write.
    let bare = progress
        .get_progress(proto::GetProgressRequest { name: OWN.into() })
        .await
        .unwrap_err();
    assert_eq!(bare.code(), Code::Unauthenticated);
    let support = progress
        .update_progress(write(OWN, SUPPORT_KEY))
        .await
        .unwrap_err();
    assert_eq!(support.code(), Code::PermissionDenied);
    progress.get_progress(read(OWN, SUPPORT_KEY)).await.unwrap();
    progress
        .update_progress(write(OWN, PLAYBACK_KEY))
        .await
        .unwrap();
    // Once the session is over, its token writes nothing more.
    let stop = with_bearer(
        proto::StopSessionRequest {
            name: session.name.clone(),
            ..Default::default()
        },
        &token,
    );
    s.server.sessions.stop_session(stop).await.unwrap();
    let ended = progress
        .update_progress(write(OWN, &token))
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert_eq!(reason(&ended), "SESSION_ENDED");
    s.server.running.shutdown().await.unwrap();
}

/// WatchEvents needs the `events` role (or admin); support may list a user's events;
/// the playback API may do neither. A terminate shows who did it and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_need_their_role() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let mut events = EventServiceClient::new(s.server.channel.clone());
    let watch = |key: &str| with_bearer(proto::WatchEventsRequest::default(), key);
    let list = |key: &str| {
        with_bearer(
            proto::ListEventsRequest {
                parent: "users/hana".into(),
                ..Default::default()
            },
            key,
        )
    };
    for key in [PLAYBACK_KEY, SUPPORT_KEY] {
        let refused = events.watch_events(watch(key)).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{key}");
    }
    let bare = events
        .watch_events(proto::WatchEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(bare.code(), Code::Unauthenticated);
    let refused = events.list_events(list(PLAYBACK_KEY)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    events.watch_events(watch(EVENTS_KEY)).await.unwrap();
    events.watch_events(watch(ADMIN_KEY)).await.unwrap();

    let (session, _) = s.start("hana", "tv").await;
    let terminate = with_bearer(
        proto::TerminateSessionRequest {
            name: session.name.clone(),
            reason: "chargeback".into(),
        },
        SUPPORT_KEY,
    );
    s.server
        .sessions
        .terminate_session(terminate)
        .await
        .unwrap();
    let listed = events
        .list_events(list(SUPPORT_KEY))
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<&str> = listed.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(kinds, ["playback.terminated", "playback.started"]);
    assert_eq!(listed[0].actor, "support");
    assert_eq!(listed[0].operator_reason, "chargeback");
    assert_eq!(
        listed[0].end_reason,
        proto::EndReason::TerminatedByOperator as i32
    );
    assert_eq!(listed[1].actor, "");
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn tokens_of_ended_sessions_and_older_generations_are_dead() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (old, old_token) = s.start("dave", "tv").await;
    // The same device starts again: the old session is evicted, a newer generation holds
    // the seat.
    let (new, new_token) = s.start("dave", "tv").await;
    assert!(new.generation > old.generation);
    let status = s.heartbeat(&old.name, &old_token).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "SESSION_ENDED")
    );
    let status = s.heartbeat(&new.name, &old_token).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "an older generation's token on the new session"
    );
    for call in ["pause", "resume", "stop"] {
        let status = match call {
            "pause" => s
                .server
                .sessions
                .pause_session(with_bearer(
                    proto::PauseSessionRequest {
                        name: old.name.clone(),
                        ..Default::default()
                    },
                    &old_token,
                ))
                .await
                .map(|_| ()),
            "resume" => s
                .server
                .sessions
                .resume_session(with_bearer(
                    proto::ResumeSessionRequest {
                        name: old.name.clone(),
                        ..Default::default()
                    },
                    &old_token,
                ))
                .await
                .map(|_| ()),
            _ => s
                .server
                .sessions
                .stop_session(with_bearer(
                    proto::StopSessionRequest {
                        name: old.name.clone(),
                        ..Default::default()
                    },
                    &old_token,
                ))
                .await
                .map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{call}");
    }
    let status = s.refresh(&old_token, PLAYBACK_KEY).await.unwrap_err();
    assert_eq!(reason(&status), "SESSION_ENDED");
    assert_eq!(s.validate(&old_token, true).await.reason, "SESSION_ENDED");

    // Stopped, and terminated by support: dead too.
    s.server
        .sessions
        .stop_session(with_bearer(
            proto::StopSessionRequest {
                name: new.name.clone(),
                ..Default::default()
            },
            &new_token,
        ))
        .await
        .unwrap();
    assert_eq!(
        s.heartbeat(&new.name, &new_token).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(s.validate(&new_token, true).await.reason, "SESSION_ENDED");
    // Without check_session only the token itself is judged: still well signed.
    assert!(s.validate(&new_token, false).await.valid);
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn refresh_gives_a_new_token_for_a_live_session_only() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (session, token) = s.start("erin", "tv").await;
    let refreshed = s.refresh(&token, PLAYBACK_KEY).await.unwrap();
    assert_ne!(refreshed.playback_token, token);
    s.heartbeat(&session.name, &refreshed.playback_token)
        .await
        .unwrap();
    // Concurrent refreshes of one token are harmless: each answer is a working token.
    let refreshes = (0..8).map(|_| {
        let mut client = s.tokens.clone();
        let token = token.clone();
        tokio::spawn(async move {
            client
                .refresh_token(with_bearer(
                    proto::RefreshTokenRequest { token },
                    PLAYBACK_KEY,
                ))
                .await
                .map(|r| r.into_inner().playback_token)
        })
    });
    for result in futures::future::join_all(refreshes).await {
        let fresh = result.unwrap().unwrap();
        assert!(s.validate(&fresh, true).await.valid);
    }
    // A device refreshes its own token with that token as its credential, not another's.
    s.refresh(&token, &token).await.unwrap();
    let status = s
        .refresh(&refreshed.playback_token, &token)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Expired, within the refresh grace: refreshable; beyond it: TOKEN_EXPIRED.
    let t = now();
    let mut claims = claims_for(&session);
    claims["exp"] = json!(t - 30);
    claims["iat"] = json!(t - 930);
    claims["nbf"] = json!(t - 930);
    let lately = s.sign(s.header(), &claims);
    assert_eq!(s.validate(&lately, false).await.reason, "TOKEN_EXPIRED");
    s.refresh(&lately, PLAYBACK_KEY).await.unwrap();
    claims["exp"] = json!(t - 600);
    let long_ago = s.sign(s.header(), &claims);
    let status = s.refresh(&long_ago, PLAYBACK_KEY).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unauthenticated, "TOKEN_EXPIRED")
    );
    let status = s.refresh("not.a.token", PLAYBACK_KEY).await.unwrap_err();
    assert_eq!(reason(&status), "TOKEN_INVALID");
    // A device refreshing with its own token as bearer hears the same reasons.
    let status = s.refresh(&long_ago, &long_ago).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unauthenticated, "TOKEN_EXPIRED")
    );
    s.refresh(&lately, &lately).await.unwrap();
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_session_past_its_deadline_is_over_before_the_sweeper_says_so() {
    let mut config = test_config(OverLimitPolicy::RejectNew);
    config.insecure_dev = false;
    config.sweep_interval = Duration::from_secs(3600);
    let mut s = secured_with(KeyAlgorithm::Eddsa, config).await;
    let (_, token) = s.start("mia", "tv").await;
    assert!(s.validate(&token, true).await.valid);
    // test_settings: 1.5 s heartbeat timeout, and no sweep for an hour.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(s.validate(&token, true).await.reason, "SESSION_ENDED");
    let status = s.refresh(&token, PLAYBACK_KEY).await.unwrap_err();
    assert_eq!(reason(&status), "SESSION_ENDED");
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn callers_need_credentials_and_the_role() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let status = s
        .server
        .sessions
        .create_session(create_request("frank", "tv"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unauthenticated, "UNAUTHENTICATED")
    );
    assert!(
        status.metadata().get("x-request-id").is_some(),
        "a request id to find the cause in the log"
    );
    assert!(
        !status.message().contains("credential")
            || status.message() == "missing or invalid credentials"
    );
    let status = s
        .server
        .sessions
        .create_session(with_bearer(
            create_request("frank", "tv"),
            "wrong-key-0123456789abcdef0123456789",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // edge may only validate; support may terminate but not create.
    for key in [EDGE_KEY, SUPPORT_KEY] {
        let status = s
            .server
            .sessions
            .create_session(with_bearer(create_request("frank", "tv"), key))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::PermissionDenied, "PERMISSION_DENIED")
        );
    }
    let (session, token) = s.start("frank", "tv").await;
    // A playback token cannot call internal methods.
    let status = s
        .server
        .sessions
        .get_session(with_bearer(
            proto::GetSessionRequest {
                name: session.name.clone(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = s
        .server
        .concurrency
        .get_concurrency(with_bearer(
            proto::GetConcurrencyRequest {
                name: "users/frank/concurrency".into(),
            },
            EDGE_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    s.server
        .sessions
        .terminate_session(with_bearer(
            proto::TerminateSessionRequest {
                name: session.name,
                reason: "support".into(),
            },
            SUPPORT_KEY,
        ))
        .await
        .unwrap();
    // Health stays open for load balancers.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.server.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_jwks_verifies_tokens_offline() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (_session, token) = s.start("grace", "tv").await;
    let jwks = s
        .tokens
        .get_jwks(with_bearer(proto::GetJwksRequest {}, EDGE_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwks.keys.len(), 1);
    let jwk = &jwks.keys[0];
    assert_eq!(
        (
            jwk.kty.as_str(),
            jwk.crv.as_str(),
            jwk.alg.as_str(),
            jwk.r#use.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    // An edge verifies with nothing but the JWKS.
    let key = jsonwebtoken::DecodingKey::from_ed_components(&jwk.x).unwrap();
    let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["usher-playback"]);
    validation.set_issuer(&["usher"]);
    let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
    assert_eq!(data.header.kid.as_deref(), Some(jwk.kid.as_str()));
    assert_eq!(data.header.typ.as_deref(), Some("playback+jwt"));
    for claim in [
        "iss", "aud", "sub", "sid", "did", "cid", "pid", "gen", "iat", "nbf", "exp", "jti",
    ] {
        assert!(data.claims.get(claim).is_some(), "claim {claim}");
    }
    assert_eq!(
        data.claims["exp"].as_u64().unwrap() - data.claims["iat"].as_u64().unwrap(),
        900,
        "15 minutes"
    );
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn hs256_deployments_sign_with_the_shared_secret() {
    let mut s = secured(KeyAlgorithm::Hs256).await;
    let (session, token) = s.start("heidi", "tv").await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    assert!(s.validate(&token, true).await.valid);
    s.heartbeat(&session.name, &token).await.unwrap();
    // The secret is never published.
    let jwks = s
        .tokens
        .get_jwks(with_bearer(proto::GetJwksRequest {}, EDGE_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(jwks.keys.is_empty());
    // An EdDSA-claiming token under the HS256 kid is refused.
    let mut header = s.header();
    header.alg = Algorithm::EdDSA;
    let forged = unsigned(
        &json!({"alg": "EdDSA", "typ": "playback+jwt", "kid": header.kid}),
        &claims_for(&session),
    );
    assert_eq!(
        s.validate(&format!("{forged}AAAA"), false).await.reason,
        "TOKEN_INVALID"
    );
    s.server.running.shutdown().await.unwrap();
}

/// Waits until the server's JWKS has `count` keys (the reloader polls every 100 ms).
async fn wait_for_keys(s: &mut Secured, count: usize) -> proto::GetJwksResponse {
    for _ in 0..100 {
        let jwks = s
            .tokens
            .get_jwks(with_bearer(proto::GetJwksRequest {}, EDGE_KEY))
            .await
            .unwrap()
            .into_inner();
        if jwks.keys.len() == count {
            return jwks;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server never had {count} keys");
}

#[tokio::test]
async fn keys_rotate_without_a_restart() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (_, old_token) = s.start("ivan", "tv").await;
    let old_kid = jsonwebtoken::decode_header(&old_token)
        .unwrap()
        .kid
        .unwrap();
    assert!(s.validate(&old_token, false).await.valid, "cached now");

    let mut set = KeySet::read(&s.keys).unwrap();
    set.rotate(KeyAlgorithm::Eddsa, Duration::from_secs(3600))
        .unwrap();
    set.write(&s.keys).unwrap();
    wait_for_keys(&mut s, 2).await;
    // During the overlap both verify; new tokens carry the new kid.
    let (_, new_token) = s.start("judy", "tv").await;
    let new_kid = jsonwebtoken::decode_header(&new_token)
        .unwrap()
        .kid
        .unwrap();
    assert_ne!(new_kid, old_kid);
    assert!(s.validate(&old_token, false).await.valid);
    assert!(s.validate(&new_token, false).await.valid);

    // The old key is removed: its tokens fail at once, cached or not.
    set.keys.retain(|k| k.kid != old_kid);
    set.write(&s.keys).unwrap();
    wait_for_keys(&mut s, 1).await;
    assert_eq!(s.validate(&old_token, false).await.reason, "TOKEN_INVALID");
    assert!(s.validate(&new_token, false).await.valid);

    // A broken file is not loaded: the keys in force stay.
    std::fs::write(&s.keys, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(s.validate(&new_token, false).await.valid);
    s.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_identifies_callers_by_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (edge_cert, edge_key) = leaf("edge.usher.test");
    let (stranger_cert, stranger_key) = leaf("stranger.usher.test");

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut config = test_config(OverLimitPolicy::RejectNew);
    config.insecure_dev = false;
    config.tls = Some(usher::config::TlsFiles {
        cert: write("server.pem", &server_cert),
        key: write("server.key", &server_key),
        client_ca: Some(write("ca.pem", &ca_cert.pem())),
    });
    let keys = crate::support::key_set_file(dir.path());
    let components = Components {
        store: Arc::new(MemoryStore::new(test_settings())),
        entitlements: Arc::new(StaticPolicy::open(2).unwrap()),
        tokens: Arc::new(Tokens::load(token_settings(&keys)).unwrap()),
        credentials: credentials(),
        manifests: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = usher::server::start(&config, components, listener)
        .await
        .unwrap();
    let url = format!("https://localhost:{}", running.addr.port());
    let connect = |identity: Option<(String, String)>| {
        let url = url.clone();
        let ca = ca_cert.pem();
        async move {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost");
            if let Some((cert, key)) = identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap()
        }
    };
    let validate = proto::ValidateTokenRequest {
        token: "x.y.z".into(),
        check_session: false,
    };

    // The edge certificate maps to the edge role: it may validate, not create.
    let edge = connect(Some((edge_cert, edge_key))).await;
    let mut tokens = TokenServiceClient::new(edge.clone());
    let answer = tokens
        .validate_token(validate.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.reason, "TOKEN_INVALID");
    let mut sessions =
        proto::playback_session_service_client::PlaybackSessionServiceClient::new(edge);
    let status = sessions
        .create_session(create_request("kim", "tv"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // A certificate from the CA whose subject is not configured: unauthenticated.
    let stranger = connect(Some((stranger_cert, stranger_key))).await;
    let status = TokenServiceClient::new(stranger)
        .validate_token(validate.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // No certificate: TLS still works with a bearer key, and nothing without one.
    let anonymous = connect(None).await;
    let mut tokens = TokenServiceClient::new(anonymous);
    assert_eq!(
        tokens
            .validate_token(validate.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    tokens
        .validate_token(with_bearer(validate.clone(), EDGE_KEY))
        .await
        .unwrap();

    // `usher health` (the container's health check) speaks TLS with the CA.
    let ca_file = dir.path().join("ca.pem");
    let health = tokio::process::Command::new(env!("CARGO_BIN_EXE_usher"))
        .args([
            "health",
            "--addr",
            &running.addr.to_string(),
            "--tls-domain",
            "localhost",
        ])
        .arg("--tls-ca")
        .arg(&ca_file)
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&health.stdout).trim(),
        "SERVING",
        "{health:?}"
    );

    // Plaintext does not reach a TLS listener.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", running.addr.port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(
            TokenServiceClient::new(channel)
                .validate_token(validate)
                .await
                .is_err()
        );
    }
    running.shutdown().await.unwrap();
}

/// A service credential on a device method is told that the call needs a playback
/// token, not that its credential is bad; a role that names the device methods exactly
/// (device-proxy) acts for devices, and a `Service/*` pattern (admin) does not.
#[tokio::test]
async fn service_credentials_on_device_methods() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (session, _) = s.start("quinn", "tv").await;
    for key in [PLAYBACK_KEY, ADMIN_KEY, SUPPORT_KEY] {
        let status = s.heartbeat(&session.name, key).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{key}: {status:?}");
        assert_eq!(reason(&status), "PLAYBACK_TOKEN_REQUIRED", "{key}");
        assert!(status.message().contains("playback token"), "{status:?}");
    }
    // An unknown key is still a bad credential.
    let status = s
        .heartbeat(&session.name, "unknown-key-0123456789abcdef0123456789")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The gateway relays the device's heartbeat, and may pause and stop it too.
    let beat = s.heartbeat(&session.name, PROXY_KEY).await.unwrap();
    assert_eq!(beat.state, proto::SessionState::Active as i32);
    let stop = proto::StopSessionRequest {
        name: session.name.clone(),
        ..Default::default()
    };
    let stopped = s
        .server
        .sessions
        .stop_session(with_bearer(stop, PROXY_KEY))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(stopped.state, proto::SessionState::Stopped as i32);
    // It still may not create sessions.
    let status = s
        .server
        .sessions
        .create_session(with_bearer(create_request("quinn", "tv"), PROXY_KEY))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PERMISSION_DENIED");
    s.server.running.shutdown().await.unwrap();
}

/// RFC 7515 §4.1.11: a `crit` header naming an extension usher does not understand is
/// refused, even with a good signature. And `exp` near 2^64 is far in the future, not a
/// wrap into the past.
#[tokio::test]
async fn critical_headers_are_refused_and_time_claims_do_not_wrap() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (session, _) = s.start("ruth", "tv").await;
    let claims = claims_for(&session);
    let honest = s.sign(s.header(), &claims);
    assert!(
        s.validate(&honest, false).await.valid,
        "the control is valid"
    );
    for crit in [
        vec!["exp".to_owned()],
        vec!["x-usher-unknown".to_owned()],
        vec![],
    ] {
        let mut header = s.header();
        header.crit = Some(crit.clone());
        let token = s.sign(header, &claims);
        assert_refused(
            &mut s,
            &token,
            &session.name,
            "TOKEN_INVALID",
            &format!("crit {crit:?}"),
        )
        .await;
    }
    let mut far = claims.clone();
    far["exp"] = json!(u64::MAX - 1);
    let far = s.sign(s.header(), &far);
    let answer = s.validate(&far, false).await;
    assert!(
        answer.valid,
        "exp near 2^64 is not expired: {}",
        answer.reason
    );
    let mut last = claims.clone();
    last["exp"] = json!(u64::MAX);
    last["nbf"] = json!(u64::MAX - 5);
    let last = s.sign(s.header(), &last);
    assert_eq!(
        s.validate(&last, false).await.reason,
        "TOKEN_INVALID",
        "not yet valid"
    );
    s.server.running.shutdown().await.unwrap();
}

/// Every method that finds a session over says how it ended: RefreshToken too.
#[tokio::test]
async fn refresh_of_an_ended_session_says_its_state() {
    let mut s = secured(KeyAlgorithm::Eddsa).await;
    let (session, token) = s.start("sam", "tv").await;
    let stop = proto::StopSessionRequest {
        name: session.name.clone(),
        ..Default::default()
    };
    s.server
        .sessions
        .stop_session(with_bearer(stop, &token))
        .await
        .unwrap();
    for bearer in [token.as_str(), PLAYBACK_KEY] {
        let status = s.refresh(&token, bearer).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason(&status), "SESSION_ENDED");
        assert_eq!(
            error_metadata(&status).get("state").map(String::as_str),
            Some("SESSION_STATE_STOPPED"),
            "{status:?}"
        );
    }
    let status = s.heartbeat(&session.name, &token).await.unwrap_err();
    assert_eq!(
        error_metadata(&status).get("state").map(String::as_str),
        Some("SESSION_STATE_STOPPED")
    );
    s.server.running.shutdown().await.unwrap();
}

/// REST calls are decided by the same authentication as gRPC: none is UNAUTHENTICATED
/// (401), a key whose roles do not allow the method PERMISSION_DENIED (403), the right
/// role gets through; the device's token works on its own session's device calls.
#[tokio::test]
async fn rest_calls_meet_the_same_authentication() {
    use crate::support::http_json;
    let s = secured(KeyAlgorithm::Eddsa).await;
    let addr = s.server.running.addr;
    let body = r#"{"profileId": "p", "contentId": "c", "device": {"id": "tv", "type": "DEVICE_TYPE_TV"}, "client": {"region": "US"}}"#;
    let none = http_json(addr, "POST", "/v1/users/una/sessions", &[], body).await;
    assert_eq!(none.status, 401, "{}", none.body);
    let edge = format!("Bearer {EDGE_KEY}");
    let wrong = http_json(
        addr,
        "POST",
        "/v1/users/una/sessions",
        &[("authorization", &edge)],
        body,
    )
    .await;
    assert_eq!(wrong.status, 403, "{}", wrong.body);
    let playback = format!("Bearer {PLAYBACK_KEY}");
    let created = http_json(
        addr,
        "POST",
        "/v1/users/una/sessions",
        &[("authorization", &playback)],
        body,
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let created: serde_json::Value = serde_json::from_str(&created.body).unwrap();
    let name = created["session"]["name"].as_str().unwrap();
    let device = format!("Bearer {}", created["playbackToken"].as_str().unwrap());
    let path = format!("/v1/{name}:heartbeat");
    let beat = http_json(addr, "POST", &path, &[("authorization", &device)], "{}").await;
    assert_eq!(beat.status, 200, "{}", beat.body);
    let service_on_device =
        http_json(addr, "POST", &path, &[("authorization", &playback)], "{}").await;
    assert_eq!(service_on_device.status, 403, "{}", service_on_device.body);
    assert!(service_on_device.body.contains("PLAYBACK_TOKEN_REQUIRED"));
}

/// A token issued over REST verifies against the JWK Set served over plain HTTP, with
/// jsonwebtoken's own JWK parsing: what an edge does with nothing but the URL.
#[tokio::test]
async fn a_token_issued_over_rest_verifies_against_the_jwks_over_http() {
    use crate::support::{http, http_json};
    let s = secured(KeyAlgorithm::Eddsa).await;
    let addr = s.server.running.addr;
    let playback = format!("Bearer {PLAYBACK_KEY}");
    let body = r#"{"profileId": "p", "contentId": "c", "device": {"id": "tv", "type": "DEVICE_TYPE_TV"}, "client": {"region": "US"}}"#;
    let created = http_json(
        addr,
        "POST",
        "/v1/users/vera/sessions",
        &[("authorization", &playback)],
        body,
    )
    .await;
    let created: Value = serde_json::from_str(&created.body).unwrap();
    let token = created["playbackToken"].as_str().unwrap();
    let jwks = http(addr, "GET", "/.well-known/jwks.json", &[]).await;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks.body).unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let jwk = set.find(&kid).expect("the token's key is in the set");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["usher-playback"]);
    validation.set_issuer(&["usher"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation).unwrap();
    assert_eq!(data.claims["sid"], created["session"]["name"]);
    s.server.running.shutdown().await.unwrap();
}
