//! Signed manifest URLs checked by peers no one here wrote.
//!
//! - `s3rver`, an S3-compatible server, serves the manifest through the presigned URL
//!   and refuses it once expired or under an unknown access key. s3rver 3.7.1 (the
//!   newest) does not compute Signature Version 4 itself (its authentication middleware:
//!   "Signature version 4 calculation is unimplemeneted"), so a wrong signature is
//!   checked by botocore, the AWS SDK for Python: the signature it computes for the
//!   URL must be the URL's, and is not for another secret or another path.
//! - An edge's check written in Python from the documented token format accepts the edge
//!   token and refuses a tampered path, a tampered token and an expired one.

use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use usher::entitlement::StaticPolicy;
use usher::ids::{ContentId, SessionId, SessionName, UserId};
use usher::manifest::edge::EdgeTokenSigner;
use usher::manifest::s3::S3Presigner;
use usher::manifest::{Grant, ManifestType, Origin, Origins, Signer};
use usher::proto;
use usher::store::memory::MemoryStore;
use usher::store::{OverLimitPolicy, Store};

use crate::e2e::create_request;
use crate::grpcurl::tool_available;
use crate::support::redis::free_port;
use crate::support::{
    Kind, TestServer, bad_fields, components, fresh_user, http, reason, serve, serve_components,
    store_of, test_config, test_settings,
};

/// s3rver's own credentials, which it checks signatures with.
const S3RVER_KEY: &str = "S3RVER";

struct S3rver {
    child: Child,
    addr: SocketAddr,
    _directory: tempfile::TempDir,
}

impl S3rver {
    /// An s3rver on a free loopback port with the bucket `titles`, or None (and a note)
    /// when it is not installed outside CI.
    fn start() -> Option<S3rver> {
        if !tool_available("s3rver", "--version", "npm install -g s3rver@3.7.1") {
            return None;
        }
        let directory = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("s3rver")
            .args(["-d", directory.path().to_str().unwrap()])
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-s"])
            .args(["--configure-bucket", "titles"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < until, "s3rver did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(S3rver {
            child,
            addr,
            _directory: directory,
        })
    }

    fn presigner(&self, secret: &str) -> S3Presigner {
        bucket_presigner(&format!("http://{}", self.addr), S3RVER_KEY, secret)
    }
}

/// A presigner of the bucket `titles` at `endpoint` (us-east-1) with these credentials.
fn bucket_presigner(endpoint: &str, key_id: &str, secret: &str) -> S3Presigner {
    S3Presigner::new(
        endpoint.into(),
        "titles".into(),
        "us-east-1".into(),
        key_id.into(),
        secret.into(),
    )
}

impl Drop for S3rver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request to `url` (on `addr`), with `body` when it is a PUT: status and body.
async fn fetch(addr: SocketAddr, method: &str, url: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = url
        .strip_prefix(&format!("http://{addr}"))
        .unwrap_or_else(|| panic!("{url} is not on {addr}"));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {raw}"));
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn session() -> SessionName {
    SessionName {
        user: UserId::parse("user", "u1").unwrap(),
        session: SessionId::parse("session", "0e6f4a52-8a36-4d0b-9f9b-0d4d3d6b1e11").unwrap(),
    }
}

const PLAYLIST: &str = "#EXTM3U\n#EXT-X-VERSION:7\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3rver_serves_a_presigned_manifest_and_refuses_what_it_should() {
    let Some(s3) = S3rver::start() else { return };
    let presigner = s3.presigner(S3RVER_KEY);
    let now = SystemTime::now();
    // The titles, uploaded with presigned PUTs.
    for title in ["42", "43"] {
        let put = presigner
            .presign(
                "PUT",
                &format!("/{title}/master.m3u8"),
                now,
                Duration::from_secs(60),
            )
            .unwrap();
        let (status, body) = fetch(s3.addr, "PUT", &put, PLAYLIST).await;
        assert_eq!(status, 200, "{body}");
    }

    let origins = Origins::new(
        vec![Origin {
            name: "s3rver".into(),
            content_prefix: String::new(),
            hls_path: "/{content}/master.m3u8".into(),
            dash_path: "/{content}/manifest.mpd".into(),
            signer: Box::new(s3.presigner(S3RVER_KEY)),
        }],
        Duration::from_secs(300),
    );
    let content = ContentId::parse("content", "42").unwrap();
    let manifest = origins
        .manifest(&session(), &content, ManifestType::Hls, None, now)
        .unwrap();
    assert_eq!(
        fetch(s3.addr, "GET", &manifest.url, "").await,
        (200, PLAYLIST.into())
    );

    // Signed ten minutes ago for one minute.
    let expired = presigner
        .presign(
            "GET",
            "/42/master.m3u8",
            now - Duration::from_secs(600),
            Duration::from_secs(60),
        )
        .unwrap();
    let (status, body) = fetch(s3.addr, "GET", &expired, "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("expired"), "{body}");

    // Under a key the server does not have.
    let stranger = bucket_presigner(&format!("http://{}", s3.addr), "STRANGER", S3RVER_KEY)
        .presign("GET", "/42/master.m3u8", now, Duration::from_secs(60))
        .unwrap();
    let (status, body) = fetch(s3.addr, "GET", &stranger, "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("InvalidAccessKeyId"), "{body}");
}

/// botocore's verdict on a presigned URL checked with s3rver's credentials at `now`.
fn botocore_check(url: &str, secret: &str, now: SystemTime) -> String {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let output = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/s3_presign_verify.py"
        ))
        .args([url, S3RVER_KEY, secret, "us-east-1", &now])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn botocore_computes_the_presigned_signature_and_refuses_forgeries() {
    let has_botocore = Command::new("python3")
        .args(["-c", "import botocore"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_botocore {
        assert!(
            std::env::var_os("CI").is_none(),
            "botocore is required under CI (pip install botocore)"
        );
        eprintln!("skipped: botocore not installed (pip install botocore)");
        return;
    }
    const ENDPOINT: &str = "http://127.0.0.1:4568";
    let now = SystemTime::now();
    let url = bucket_presigner(ENDPOINT, S3RVER_KEY, S3RVER_KEY)
        .sign(&Grant {
            session: &session(),
            path: "/titles-dir/42/master.m3u8",
            now,
            ttl: Duration::from_secs(300),
        })
        .unwrap();
    assert_eq!(botocore_check(&url, S3RVER_KEY, now), "ok");
    // What a server with the real secret makes of a URL signed with another.
    let forged = bucket_presigner(ENDPOINT, S3RVER_KEY, "not-the-secret")
        .presign(
            "GET",
            "/titles-dir/42/master.m3u8",
            now,
            Duration::from_secs(300),
        )
        .unwrap();
    assert_eq!(botocore_check(&forged, S3RVER_KEY, now), "bad signature");
    // The signature of one title on another's path.
    let moved = url.replacen("/42/", "/43/", 1);
    assert_eq!(botocore_check(&moved, S3RVER_KEY, now), "bad signature");
    // Its lifetime stretched in the query.
    let stretched = url.replacen("X-Amz-Expires=300", "X-Amz-Expires=3000", 1);
    assert_ne!(stretched, url);
    assert_eq!(botocore_check(&stretched, S3RVER_KEY, now), "bad signature");
    // And after it expired.
    assert_eq!(
        botocore_check(&url, S3RVER_KEY, now + Duration::from_secs(301)),
        "expired"
    );
}

#[test]
fn an_independent_edge_check_accepts_the_token_and_refuses_tampering() {
    if !tool_available("python3", "--version", "apt-get install python3") {
        return;
    }
    let secret = "8f".repeat(32);
    // The URL of title 42's manifest, signed with a secret of 32 `byte`s.
    let signed_with = |byte: u8| {
        EdgeTokenSigner::new("https://cdn.example.com".into(), vec![byte; 32])
            .sign(&Grant {
                session: &session(),
                path: "/titles/42/master.m3u8",
                now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                ttl: Duration::from_secs(300),
            })
            .unwrap()
    };
    let url = signed_with(0x8f);
    let check = |url: &str, at: u64| {
        let output = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/edge_verify.py"
            ))
            .args([url, &secret, &at.to_string()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(check(&url, 1_800_000_000), "ok");
    // A segment beside the manifest is covered; the last second still is.
    let segment = url.replacen("master.m3u8", "seg-00001.ts", 1);
    assert_eq!(check(&segment, 1_800_000_300), "ok");
    assert_eq!(check(&url, 1_800_000_301), "expired");
    assert_eq!(
        check(
            &url.replacen("/titles/42/", "/titles/43/", 1),
            1_800_000_000
        ),
        "path outside acl"
    );
    // The token's own ACL widened: its HMAC no longer matches.
    let widened = url.replacen("acl%3D%2Ftitles%2F42%2F%2A", "acl%3D%2F%2A", 1);
    assert_ne!(widened, url);
    assert_eq!(check(&widened, 1_800_000_000), "bad hmac");
    // Signed with another secret than the edge's.
    assert_eq!(check(&signed_with(0x11), 1_800_000_000), "bad hmac");
}

const DASH: &str = "<?xml version=\"1.0\"?><MPD/>";

/// A server (on the embedded store, two seats each) whose one origin is `s3`, serving
/// the titles whose ids start with `title-`; title-1's manifests are uploaded.
async fn server_on(s3: &S3rver) -> TestServer {
    server_with_store(s3, Arc::new(MemoryStore::new(test_settings()))).await
}

/// [`server_on`], on `store`.
async fn server_with_store(s3: &S3rver, store: Arc<dyn Store>) -> TestServer {
    let presigner = s3.presigner(S3RVER_KEY);
    let now = SystemTime::now();
    for (path, body) in [
        ("/title-1/master.m3u8", PLAYLIST),
        ("/title-1/manifest.mpd", DASH),
    ] {
        let put = presigner
            .presign("PUT", path, now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(fetch(s3.addr, "PUT", &put, body).await.0, 200);
    }
    let origins = Origins::new(
        vec![Origin {
            name: "s3rver".into(),
            content_prefix: "title-".into(),
            hls_path: "/{content}/master.m3u8".into(),
            dash_path: "/{content}/manifest.mpd".into(),
            signer: Box::new(s3.presigner(S3RVER_KEY)),
        }],
        Duration::from_secs(300),
    );
    let mut components = components(store, Arc::new(StaticPolicy::open(2).unwrap()));
    components.manifests = Some(Arc::new(origins));
    serve_components(&test_config(OverLimitPolicy::RejectNew), components).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_come_with_signed_manifests_that_end_with_them() {
    signed_manifests_end_with_their_sessions(|| store_of(Kind::Memory, test_settings())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_manifests_end_with_their_sessions_on_redis() {
    signed_manifests_end_with_their_sessions(|| store_of(Kind::Redis, test_settings())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_manifests_end_with_their_sessions_on_a_cluster() {
    signed_manifests_end_with_their_sessions(|| store_of(Kind::Cluster, test_settings())).await;
}

/// Through the server on the store `open` makes (only when s3rver is there): a create
/// answers a manifest the origin serves, HLS or DASH, over gRPC and REST, and an ended
/// session gets none.
async fn signed_manifests_end_with_their_sessions<F: Future<Output = Arc<dyn Store>>>(
    open: impl FnOnce() -> F,
) {
    let Some(s3) = S3rver::start() else { return };
    let mut server = server_with_store(&s3, open().await).await;
    let user = fresh_user();
    let before = SystemTime::now();

    // CreateSession answers the title's HLS manifest, which the origin serves.
    let created = server
        .sessions
        .create_session(create_request(user.as_str(), "tv"))
        .await
        .unwrap()
        .into_inner();
    let manifest = created.manifest.expect("a manifest");
    assert_eq!(manifest.r#type, proto::ManifestType::Hls as i32);
    assert_eq!(
        fetch(s3.addr, "GET", &manifest.url, "").await,
        (200, PLAYLIST.into())
    );
    let expires = SystemTime::try_from(manifest.expire_time.unwrap()).unwrap();
    let lifetime = expires.duration_since(before).unwrap();
    assert!((Duration::from_secs(299)..=Duration::from_secs(301)).contains(&lifetime));

    // DASH when asked, at create and from GetManifest.
    let mut request = create_request(user.as_str(), "phone");
    request.manifest_type = proto::ManifestType::Dash as i32;
    let phone = server
        .sessions
        .create_session(request)
        .await
        .unwrap()
        .into_inner();
    let dash = phone.manifest.unwrap();
    assert_eq!(dash.r#type, proto::ManifestType::Dash as i32);
    assert_eq!(
        fetch(s3.addr, "GET", &dash.url, "").await,
        (200, DASH.into())
    );
    let name = created.session.unwrap().name;
    let fresh = server
        .sessions
        .get_manifest(proto::GetManifestRequest {
            name: name.clone(),
            manifest_type: proto::ManifestType::Dash as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .manifest
        .unwrap();
    assert_eq!(
        fetch(s3.addr, "GET", &fresh.url, "").await,
        (200, DASH.into())
    );

    // Over REST too.
    let rest = http(
        server.running.addr,
        "GET",
        &format!("/v1/{name}/manifest"),
        &[],
    )
    .await;
    assert_eq!(rest.status, 200, "{}", rest.body);
    let body: serde_json::Value = serde_json::from_str(&rest.body).unwrap();
    assert_eq!(body["manifest"]["type"], "MANIFEST_TYPE_HLS");
    let url = body["manifest"]["url"].as_str().unwrap();
    assert_eq!(fetch(s3.addr, "GET", url, "").await, (200, PLAYLIST.into()));

    // None for an ended session.
    server.stop(&name).await.unwrap();
    let ended = server
        .sessions
        .get_manifest(proto::GetManifestRequest {
            name,
            manifest_type: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&ended), "SESSION_ENDED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_title_no_origin_serves_takes_no_seat_and_bad_types_are_named() {
    let Some(s3) = S3rver::start() else { return };
    let mut server = server_on(&s3).await;
    let mut request = create_request("noa", "tv");
    request.content_id = "clip-1".into();
    let refused = server.sessions.create_session(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused), "MANIFEST_UNAVAILABLE");
    assert!(
        refused.message().contains("clip-1"),
        "{}",
        refused.message()
    );
    let seats = server
        .concurrency
        .get_concurrency(proto::GetConcurrencyRequest {
            name: "users/noa/concurrency".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seats.concurrency.unwrap().in_use, 0, "nothing was taken");

    let mut request = create_request("noa", "tv");
    request.manifest_type = 9;
    let refused = server.sessions.create_session(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(bad_fields(&refused), ["manifest_type"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_origins_there_is_no_manifest() {
    let mut server = serve(
        Arc::new(MemoryStore::new(test_settings())),
        2,
        OverLimitPolicy::RejectNew,
    )
    .await;
    let created = server
        .sessions
        .create_session(create_request("ada", "tv"))
        .await
        .unwrap()
        .into_inner();
    assert!(created.manifest.is_none());
    let refused = server
        .sessions
        .get_manifest(proto::GetManifestRequest {
            name: created.session.unwrap().name,
            manifest_type: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&refused), "MANIFEST_UNAVAILABLE");
}
