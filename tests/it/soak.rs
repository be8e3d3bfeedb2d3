//! `usher soak`, briefly: the binary starts its own usher on a redis-server of the
//! test's, churns for a few seconds, drains, and says whether anything was left behind.
//! (The soak proper runs for 10 minutes by a documented command, never in CI.)

use std::process::Command;

use serde_json::Value;

use crate::support::redis::RedisServer;

fn soak(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_usher"))
        .arg("soak")
        .args(args)
        .output()
        .expect("the usher binary")
}

#[test]
fn a_short_soak_drains_every_seat_and_leaves_redis_as_it_found_it() {
    let redis = RedisServer::start();
    let output = soak(&[
        "--store",
        &redis.url(),
        "--duration",
        "6s",
        "--devices",
        "12",
        "--play-min",
        "1s",
        "--play-max",
        "3s",
        "--vanish",
        "0.4",
        "--history-users",
        "1",
        "--drain-timeout",
        "40s",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("one JSON document");
    println!("{report:#}");
    let churn = &report["churn"];
    assert!(churn["plays"].as_u64().unwrap() >= 12, "{churn}");
    assert!(churn["stops"].as_u64().unwrap() > 0, "{churn}");
    assert!(churn["vanished"].as_u64().unwrap() > 0, "{churn}");
    assert!(churn["stream_heartbeats"].as_u64().unwrap() > 0, "{churn}");
    assert_eq!(churn["errors"], 0, "{churn}");
    let histories = &report["histories"];
    assert!(histories["segments"].as_u64().unwrap() >= 1, "{histories}");
    assert_eq!(histories["not_linearizable"], serde_json::json!([]));
    // The churn made keys; the drain took them back to the start's count.
    let keys = |at: &str| report[at]["keys"].as_u64().unwrap();
    assert!(keys("end_of_churn") > keys("start"), "{report}");
    assert_eq!(keys("drained"), keys("start"));
    assert_eq!(report["drained"]["seats"], 0);
    for at in ["start", "drained"] {
        for figure in ["rss_bytes", "open_fds", "threads", "tasks"] {
            assert!(report[at][figure].as_u64().unwrap() > 0, "{at} {figure}");
        }
    }
    assert_eq!(report["passed"], true);
    // The run's keys are deleted at the end: nothing of it is left on the server.
    assert_eq!(redis.cli(&["dbsize"]), "0");
}

#[test]
fn soak_flags_are_checked_before_anything_starts() {
    for (args, named) in [
        (&["--vanish", "2"][..], "--vanish"),
        (&["--devices", "0"][..], "--devices"),
        (&["--play-min", "9s", "--play-max", "1s"][..], "--play-min"),
        (&["--store", "postgres://x"][..], "--store"),
        (&["--target", "192.0.2.1:50051"][..], "--target"),
    ] {
        let output = soak(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}
