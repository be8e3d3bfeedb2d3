//! HTTP/2 abuse against the real binary on loopback, each attack bounded in count and
//! time (`tests/python/h2_abuse.py`, raw frames from the `h2` package's frame layer),
//! while a well-behaved client on another connection keeps calling `Health/Check` with a
//! one-second deadline. usher's CPU and resident memory are read from /proc around each.
//!
//! Rapid reset, the CONTINUATION flood and an oversized header list must get the
//! connection closed; streams past `--max-concurrent-streams` must be refused (or the
//! connection closed). PING and SETTINGS floods are not limited by usher yet: they are
//! measured and reported, and must leave the other client served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::grpcurl::Usher;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn attack(addr: &str, scenario: &str) -> Value {
    attack_with(addr, scenario, &[])
}

fn attack_with(addr: &str, scenario: &str, extra: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/h2_abuse.py");
    let output = std::process::Command::new("python3")
        .args([script, "--addr", addr, "--scenario", scenario])
        .args(extra)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{scenario}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_http2_connections_are_closed_while_others_are_served() {
    if !crate::python::python_has("hpack, hyperframe", "h2") {
        return;
    }
    let usher = Usher::start(&["--handshake-timeout", "2s"]);
    let pid = usher.child.id();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", usher.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // The well-behaved client: one Check after another, each with a 1 s deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed, slowest_us) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let checker = {
        let (stop, served, failed, slowest_us) = (
            stop.clone(),
            served.clone(),
            failed.clone(),
            slowest_us.clone(),
        );
        let mut health = HealthClient::new(channel);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut request = tonic::Request::new(HealthCheckRequest::default());
                request.set_timeout(Duration::from_secs(1));
                let started = Instant::now();
                match health.check(request).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                let took = started.elapsed().as_micros() as u64;
                slowest_us.fetch_max(took, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let rss_before = rss_kib(pid);
    for scenario in [
        "rapid-reset",
        "continuation-flood",
        "oversized-headers",
        "idle-streams",
        "ping-flood",
        "settings-flood",
        "slowloris",
        "slow-body",
    ] {
        let cpu_before = usher::bench::cpu_seconds(pid).unwrap_or(0.0);
        let addr = usher.addr.clone();
        let outcome = tokio::task::spawn_blocking(move || attack(&addr, scenario))
            .await
            .unwrap();
        let cpu = usher::bench::cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
        println!(
            "{scenario}: {outcome} | usher CPU {cpu:.2} s, RSS {} KiB",
            rss_kib(pid)
        );
        match scenario {
            "rapid-reset" | "continuation-flood" | "oversized-headers" => {
                assert_eq!(outcome["closed"], true, "{scenario}: {outcome}");
                assert_eq!(outcome["responses"], 0, "{scenario}: {outcome}");
            }
            "ping-flood" | "settings-flood" => {
                // Past --http2-control-frame-burst (1000) the connection is closed: the
                // flood gets nowhere near its 100,000 frames.
                assert_eq!(outcome["closed"], true, "{scenario}: {outcome}");
            }
            "slowloris" => {
                // Every dribbling connection is closed at --handshake-timeout (2 s).
                let sent = &outcome["sent"];
                assert_eq!(sent["connections"], 200, "{outcome}");
                assert_eq!(sent["closed_by_server"], 200, "{outcome}");
                let last = sent["last_closed_after"].as_f64().unwrap();
                assert!((1.9..4.0).contains(&last), "{outcome}");
            }
            "slow-body" => {
                // The call is ended at --request-timeout (5 s) with an answer.
                let ended = outcome["sent"]["ended_after"].as_f64().unwrap();
                assert!(outcome["responses"].as_u64().unwrap() >= 1, "{outcome}");
                assert!((4.5..7.5).contains(&ended), "{outcome}");
            }
            "idle-streams" => {
                // At most --max-concurrent-streams (1024) admitted: the rest refused, and
                // a client that goes on opening them past --http2-max-error-resets is
                // cut off.
                let resets = outcome["resets"].as_u64().unwrap();
                let closed = outcome["closed"] == true;
                assert!(closed || resets >= 5_000 - 1_024, "{outcome}");
            }
            _ => {}
        }
        assert!(cpu < 10.0, "{scenario}: {cpu:.2} s of CPU");
    }
    stop.store(true, Ordering::Relaxed);
    checker.await.unwrap();
    let slowest = Duration::from_micros(slowest_us.load(Ordering::Relaxed));
    println!(
        "well-behaved client: {} served, {} failed, slowest {slowest:?}; RSS {rss_before} -> {} KiB",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        rss_kib(pid)
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 10);
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    assert!(
        rss_kib(pid) < rss_before + 200 * 1024,
        "RSS grew from {rss_before} to {} KiB",
        rss_kib(pid)
    );
    assert!(usher.terminate().success());
}

/// TLS is terminated by usher's own accept loop, so the control-frame budget reads the
/// decrypted frames: a PING flood over TLS is closed as one in plaintext is.
#[test]
fn a_ping_flood_over_tls_is_closed_too() {
    if !crate::python::python_has("hpack, hyperframe", "h2") {
        return;
    }
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let usher = Usher::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let pid = usher.child.id();
    let cpu_before = usher::bench::cpu_seconds(pid).unwrap_or(0.0);
    let outcome = attack_with(&usher.addr, "ping-flood", &["--tls"]);
    let cpu = usher::bench::cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    println!("ping-flood over TLS: {outcome} | usher CPU {cpu:.2} s");
    assert_eq!(outcome["tls"], true);
    assert_eq!(outcome["closed"], true, "{outcome}");
    assert!(
        outcome["sent"]["frames"].as_u64().unwrap() < 100_000,
        "{outcome}"
    );
    // A well-behaved TLS client is still served: a health check over the same listener.
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["health", "--addr", &usher.addr, "--tls-ca"])
        .arg(&cert)
        .args(["--tls-domain", "localhost"])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert!(usher.terminate().success());
}
