//! `usher bench` runs, briefly, as an operator would run it: on the embedded store, on a
//! redis-server of the test's own (with the raw script ceiling, CPU and memory, and
//! nothing left behind), open loop, and its refusals. Timings are never asserted: only
//! that every measurement ran and reported.

use std::process::Command;

use serde_json::Value;

use crate::support::redis::RedisServer;

/// `usher bench --json` with `args`: its report.
fn bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_usher"))
        .arg("bench")
        .args(["--json", "--duration", "300ms", "--sessions", "4"])
        .args(["--in-flight", "4"])
        .args(args)
        .output()
        .expect("the usher binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect()
}

/// Every measurement made calls without an error, with latencies.
fn all_ran(list: &Value) {
    for m in list.as_array().unwrap() {
        assert!(m["calls"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(m["errors"], 0, "{m}");
        assert!(m["p50_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["p999_ms"].as_f64() >= m["p50_ms"].as_f64(), "{m}");
    }
}

#[test]
fn bench_measures_every_hot_path_on_the_embedded_store() {
    let report = bench(&[]);
    let through = &report["through_usher"];
    assert_eq!(
        names(through),
        [
            "health check",
            "validate (cached)",
            "create",
            "heartbeat (unary)",
            "heartbeat (stream)"
        ]
    );
    all_ran(through);
    // The usher it started is its own process: its CPU is known.
    for m in through.as_array().unwrap() {
        assert!(m["usher_cpu_us_per_call"].as_f64().is_some(), "{m}");
    }
    assert_eq!(report["raw_redis"], serde_json::json!([]));
    assert!(report["usher_bytes_per_session"].as_f64().is_some());
}

#[test]
fn bench_on_redis_compares_with_the_raw_scripts_and_leaves_nothing_behind() {
    let redis = RedisServer::start();
    let report = bench(&["--store", &redis.url(), "--only", "create,heartbeat,stream"]);
    all_ran(&report["through_usher"]);
    all_ran(&report["raw_redis"]);
    assert_eq!(
        names(&report["raw_redis"]),
        [
            "raw create script",
            "raw heartbeat script",
            "raw heartbeat script (brief)",
            "raw heartbeat script (brief), 16 per call"
        ]
    );
    // Redis' own time in the functions, read from INFO commandstats for every raw row.
    for m in report["raw_redis"].as_array().unwrap() {
        assert!(m["script_us"].as_f64().unwrap() > 0.0, "{m}");
    }
    for name in ["create", "heartbeat (unary)", "heartbeat (stream)"] {
        assert!(
            report["ratio_to_raw"][name].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
    for m in report["through_usher"].as_array().unwrap() {
        assert!(m["redis_cpu_us_per_call"].as_f64().is_some(), "{m}");
    }
    assert!(report["redis_bytes_per_session"].as_f64().unwrap() > 0.0);
    // Its started event apart: bench started this usher, so it knows its streams.
    assert!(report["redis_event_bytes_per_session"].as_f64().unwrap() > 0.0);
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "bench deletes its keys");
}

#[test]
fn bench_runs_open_loop_at_a_fixed_rate() {
    let report = bench(&["--rate", "200", "--only", "health,create"]);
    all_ran(&report["through_usher"]);
    for m in report["through_usher"].as_array().unwrap() {
        // 200/s for 300 ms: 60 due; none started once the time is up.
        assert!(m["calls"].as_u64().unwrap() <= 61, "{m}");
    }
    assert!(report["mode"].as_str().unwrap().starts_with("open loop"));
}

#[test]
fn bench_refuses_remote_targets_and_unknown_measurements() {
    for (args, named) in [
        (&["--target", "192.0.2.1:50051"][..], "--target"),
        (&["--redis", "redis://192.0.2.1:6379"][..], "--redis"),
        (&["--only", "health,teleport"][..], "--only"),
        (&["--rate", "0"][..], "--rate"),
        (&["--in-flight", "0"][..], "--in-flight"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_usher"))
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

/// A `--target` with nothing listening is not an usher bench started: it says what the
/// last attempt met, within its 10 s.
#[test]
fn bench_says_why_a_target_does_not_answer() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(["bench", "--target", &format!("127.0.0.1:{port}")])
        .args(["--only", "health"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not SERVING after 10 s (connect: Connection refused")
            && !stderr.contains("starting usher"),
        "{stderr}"
    );
}
