//! `usher bench`: the hot paths measured side by side in one run, against a running usher
//! (`--target`) or one bench starts itself (this binary's `serve`, in development mode,
//! on a free loopback port, as its own process so its CPU is its own).
//!
//! Through usher: an empty unary RPC (`grpc.health.v1.Health/Check`, the floor of any
//! call), `ValidateToken` (the same token: the verified-token cache), `CreateSession`
//! (a new user each call), unary `Heartbeat` and stream heartbeats (every one written:
//! the usher bench starts does not coalesce them). Each is calls per second with p50, p99
//! and p999 latency, closed loop (`--in-flight` calls at a time) or open loop (`--rate`
//! calls started per second, latency counted from when each was due).
//!
//! Given the Redis usher uses (`--redis`, or `--store redis://…`): the same create and
//! heartbeat scripts driven straight at that Redis from this process through the store
//! client (EVALSHA on real keys, pipelined, the same number in flight), the ratio of
//! usher's rate to that ceiling, the CPU seconds per call of usher and of redis-server
//! (from /proc, when they run here), and Redis memory per created session.
//!
//! Bench sends real load: loopback only unless `--allow-remote`, and every measurement is
//! bounded by `--duration` and `--max-calls`. The keys it creates on Redis are under a
//! prefix of its own run and deleted at the end; it touches nothing else.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike as _, KeysInterface as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::{BenchArgs, StoreConfig, parse_store};
use crate::deadline::Deadline;
use crate::ids::{ContentId, DeviceId, FieldViolation, ProfileId, SessionId, SessionName, UserId};
use crate::model::{ClientInfo, Device, DeviceType, PlaybackState};
use crate::proto;
use crate::proto::playback_session_service_client::PlaybackSessionServiceClient;
use crate::proto::stream_heartbeats_request::Kind as In;
use crate::proto::stream_heartbeats_response::Kind as Out;
use crate::proto::streaming_service_client::StreamingServiceClient;
use crate::proto::token_service_client::TokenServiceClient;
use crate::store::redis::RedisStore;
use crate::store::{DeviceAction, DeviceCall, NewSession, OverLimitPolicy, Store, StoreSettings};

/// Why a bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("starting usher: {0}")]
    Start(String),
    #[error("{0}")]
    Call(String),
    #[error("redis: {0}")]
    Redis(String),
}

fn flag(flag: &'static str, message: impl Into<String>) -> BenchError {
    BenchError::Flag {
        flag,
        message: message.into(),
    }
}

/// What one measurement saw.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    pub name: &'static str,
    pub calls: u64,
    pub errors: u64,
    /// Open loop: calls not started because `--in-flight` × 16 were outstanding.
    pub skipped: u64,
    pub elapsed: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    pub first_error: Option<String>,
    /// CPU seconds used during it, when the process is known and local.
    pub usher_cpu: Option<f64>,
    pub redis_cpu: Option<f64>,
    /// Redis' own timing of the scripts run during it (INFO commandstats): microseconds
    /// of FCALL per call measured, and of those, the Redis commands the scripts called.
    pub script_us: Option<f64>,
    pub script_commands_us: Option<f64>,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let last = self.latencies.len().checked_sub(1)?;
        Some(self.latencies[(last as f64 * q).round() as usize])
    }

    /// Adds up what `tasks` saw; the measurement began at `started`.
    async fn gather(mut self, mut tasks: tokio::task::JoinSet<Seen>, started: Instant) -> Measured {
        while let Some(seen) = tasks.join_next().await {
            let seen = seen.unwrap_or_default();
            self.calls += seen.calls;
            self.errors += seen.errors;
            self.latencies.extend(seen.latencies);
            if self.first_error.is_none() {
                self.first_error = seen.first_error;
            }
        }
        self.elapsed = started.elapsed();
        self.latencies.sort_unstable();
        self
    }

    fn per_call_us(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.map(|seconds| seconds * 1e6 / self.calls.max(1) as f64)
    }

    fn json(&self) -> Value {
        let ms = |q| self.percentile(q).map(|d| d.as_secs_f64() * 1e3);
        json!({
            "name": self.name,
            "calls": self.calls,
            "errors": self.errors,
            "skipped": self.skipped,
            "seconds": self.elapsed.as_secs_f64(),
            "per_second": self.rate(),
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "p999_ms": ms(0.999),
            "usher_cpu_us_per_call": self.per_call_us(self.usher_cpu),
            "redis_cpu_us_per_call": self.per_call_us(self.redis_cpu),
            "script_us": self.script_us,
            "script_commands_us": self.script_commands_us,
            "first_error": self.first_error,
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub mode: String,
    pub through_usher: Vec<Measured>,
    /// The store scripts straight at Redis, by the name of the usher measurement they
    /// are the ceiling of.
    pub raw: Vec<Measured>,
    /// Redis `used_memory` growth per session created through usher: its keys and sweep
    /// entry, without its started event when that is known apart.
    pub redis_bytes_per_session: Option<f64>,
    /// What one entry of the partitions' event streams costs on average (a session's
    /// started event), when bench started usher and so knows its keys. An average over
    /// the logs rather than their growth: a stream fills a preallocated node of about
    /// 4 KiB before it grows, so a short run's growth says little.
    pub redis_event_bytes_per_session: Option<f64>,
    /// The measured usher's resident memory growth per session it created (its
    /// embedded store's share, when that is where sessions live).
    pub usher_bytes_per_session: Option<f64>,
}

impl Report {
    /// `m`'s rate over its raw ceiling's, when the raw row ran without errors (a raw
    /// row that failed is no ceiling).
    fn ratio_to_raw(&self, m: &Measured) -> Option<f64> {
        let raw_name = raw_name(m.name)?;
        let raw = self.raw.iter().find(|raw| raw.name == raw_name)?;
        (raw.errors == 0).then(|| m.rate() / raw.rate().max(1e-9))
    }

    pub fn json(&self) -> Value {
        let ratios: serde_json::Map<String, Value> = self
            .through_usher
            .iter()
            .filter_map(|m| Some((m.name.to_owned(), json!(self.ratio_to_raw(m)?))))
            .collect();
        json!({
            "mode": self.mode,
            "through_usher": self.through_usher.iter().map(Measured::json).collect::<Vec<_>>(),
            "raw_redis": self.raw.iter().map(Measured::json).collect::<Vec<_>>(),
            "ratio_to_raw": ratios,
            "redis_bytes_per_session": self.redis_bytes_per_session,
            "redis_event_bytes_per_session": self.redis_event_bytes_per_session,
            "usher_bytes_per_session": self.usher_bytes_per_session,
        })
    }

    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut out = format!("usher bench ({})\n", self.mode);
        let header = [
            "calls/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "errors",
            "usher us/call",
            "redis us/call",
            "script us (cmds)",
            "vs raw",
        ];
        out.push_str(&format!("{:<22}", ""));
        for (column, width) in header.iter().zip(WIDTHS) {
            out.push_str(&format!(" {column:>width$}"));
        }
        out.push('\n');
        let row = |m: &Measured, ratio: Option<f64>| {
            let ms = |q| {
                m.percentile(q)
                    .map_or("-".to_owned(), |d| format!("{:.3}", d.as_secs_f64() * 1e3))
            };
            let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            let script = match (m.script_us, m.script_commands_us) {
                (Some(all), Some(commands)) => format!("{all:.1} ({commands:.1})"),
                _ => "-".to_owned(),
            };
            let cells = [
                format!("{:.0}", m.rate()),
                ms(0.5),
                ms(0.99),
                ms(0.999),
                m.errors.to_string(),
                us(m.per_call_us(m.usher_cpu)),
                us(m.per_call_us(m.redis_cpu)),
                script,
                ratio.map_or("-".to_owned(), |r| format!("{r:.2}x")),
            ];
            let mut line = format!("{:<22}", m.name);
            for (cell, width) in cells.iter().zip(WIDTHS) {
                line.push_str(&format!(" {cell:>width$}"));
            }
            line.push('\n');
            line
        };
        for m in &self.through_usher {
            out.push_str(&row(m, self.ratio_to_raw(m)));
        }
        for m in &self.raw {
            out.push_str(&row(m, None));
        }
        match (
            self.redis_bytes_per_session,
            self.redis_event_bytes_per_session,
        ) {
            (Some(bytes), Some(events)) => out.push_str(&format!(
                "Redis memory per session created: {bytes:.0} bytes (its keys and sweep \
                 entry), and {events:.0} bytes for its started event (the event logs' \
                 average entry)\n"
            )),
            (Some(bytes), None) => out.push_str(&format!(
                "Redis memory per session created (its keys and events): {bytes:.0} bytes\n"
            )),
            _ => {}
        }
        if let Some(bytes) = self.usher_bytes_per_session {
            out.push_str(&format!(
                "usher resident memory per session created: {bytes:.0} bytes\n"
            ));
        }
        let failed: Vec<String> = self
            .through_usher
            .iter()
            .chain(&self.raw)
            .filter_map(|m| Some(format!("{}: {}", m.name, m.first_error.as_ref()?)))
            .collect();
        for failure in failed {
            out.push_str(&format!("first error of {failure}\n"));
        }
        out
    }
}

/// The widths of the table's columns after the name.
const WIDTHS: [usize; 9] = [10, 9, 9, 9, 7, 13, 13, 16, 7];

/// The raw measurement a through-usher one is compared with.
fn raw_name(name: &str) -> Option<&'static str> {
    match name {
        "create" => Some("raw create script"),
        "heartbeat (unary)" => Some("raw heartbeat script"),
        "heartbeat (stream)" => Some("raw heartbeat script (brief)"),
        _ => None,
    }
}

/// How calls are driven.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Closed {
        in_flight: usize,
    },
    Open {
        per_second: u32,
        max_outstanding: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Bounds {
    duration: Duration,
    max_calls: u64,
}

/// Drives `call(i)` as `mode` says within `bounds`. A call answers `Err` with what
/// went wrong; it counts as an error, not as a call.
async fn drive<F, Fut>(name: &'static str, mode: Mode, bounds: Bounds, call: F) -> Measured
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let started = Instant::now();
    let until = started + bounds.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut measured = Measured {
        name,
        ..Measured::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    match mode {
        Mode::Closed { in_flight } => {
            for _ in 0..in_flight.max(1) {
                let (call, next) = (call.clone(), next.clone());
                tasks.spawn(async move {
                    let mut seen = Seen::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= bounds.max_calls || Instant::now() >= until {
                            return seen;
                        }
                        let began = Instant::now();
                        seen.record(call(i).await, began);
                    }
                });
            }
        }
        Mode::Open {
            per_second,
            max_outstanding,
        } => {
            let period = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
            let outstanding = Arc::new(AtomicU64::new(0));
            let mut due = started;
            let mut i = 0u64;
            while due < until && i < bounds.max_calls {
                tokio::time::sleep_until(due.into()).await;
                // Every call due by now starts now; latency counts from when it was due.
                while due <= Instant::now() && due < until && i < bounds.max_calls {
                    if outstanding.load(Ordering::Relaxed) >= max_outstanding as u64 {
                        measured.skipped += 1;
                    } else {
                        outstanding.fetch_add(1, Ordering::Relaxed);
                        let (call, outstanding, began) = (call.clone(), outstanding.clone(), due);
                        tasks.spawn(async move {
                            let mut seen = Seen::default();
                            seen.record(call(i).await, began);
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                            seen
                        });
                    }
                    i += 1;
                    due += period;
                }
            }
        }
    }
    measured.gather(tasks, started).await
}

#[derive(Default)]
struct Seen {
    calls: u64,
    errors: u64,
    latencies: Vec<Duration>,
    first_error: Option<String>,
}

impl Seen {
    fn record(&mut self, result: Result<(), String>, began: Instant) {
        match result {
            Ok(()) => {
                self.calls += 1;
                self.latencies.push(began.elapsed());
            }
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert(error);
            }
        }
    }
}

/// Resident memory of a local process, bytes, from /proc.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU seconds a local process has used (user + system), from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum::<Option<f64>>()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// The counters read before and after a measurement: CPU of the processes, and Redis'
/// command statistics.
#[derive(Clone)]
struct Processes {
    usher: Option<u32>,
    redis: Option<u32>,
    redis_client: Option<fred::clients::Client>,
}

/// Calls and microseconds by command, from INFO commandstats.
type CommandStats = std::collections::HashMap<String, (u64, u64)>;

impl Processes {
    fn read(&self) -> (Option<f64>, Option<f64>) {
        (
            self.usher.and_then(cpu_seconds),
            self.redis.and_then(cpu_seconds),
        )
    }

    async fn command_stats(&self) -> Option<CommandStats> {
        let info: String = self
            .redis_client
            .as_ref()?
            .info(Some(fred::types::InfoKind::CommandStats))
            .await
            .ok()?;
        Some(parse_command_stats(&info))
    }

    async fn measure(&self, run: impl Future<Output = Measured>) -> Measured {
        let stats = self.command_stats().await;
        let before = self.read();
        let mut measured = run.await;
        let after = self.read();
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        measured.usher_cpu = delta(before.0, after.0);
        measured.redis_cpu = delta(before.1, after.1);
        if let (Some(before), Some(after)) = (stats, self.command_stats().await) {
            let changed = |name: &str| {
                let (calls, usec) = after.get(name).copied().unwrap_or_default();
                let (calls0, usec0) = before.get(name).copied().unwrap_or_default();
                (calls.saturating_sub(calls0), usec.saturating_sub(usec0))
            };
            // Per call measured, not per FCALL: a create that needed a second round and
            // heartbeats that shared a batch are counted as what they cost each.
            let (scripts, script_usec) = changed("fcall");
            if scripts > 0 && measured.calls > 0 {
                let inside: u64 = after
                    .keys()
                    .filter(|name| !matches!(name.as_str(), "fcall" | "info"))
                    .map(|name| changed(name).1)
                    .sum();
                measured.script_us = Some(script_usec as f64 / measured.calls as f64);
                measured.script_commands_us = Some(inside as f64 / measured.calls as f64);
            }
        }
        measured
    }

    /// Like `measure`, for work that does not go through usher (its CPU is not asked).
    async fn measure_redis(&self, run: impl Future<Output = Measured>) -> Measured {
        Processes {
            usher: None,
            ..self.clone()
        }
        .measure(run)
        .await
    }
}

/// `cmdstat_<name>:calls=N,usec=U,...` lines, by command name.
fn parse_command_stats(info: &str) -> CommandStats {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |wanted: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(wanted)?.strip_prefix('='))?
                    .parse::<u64>()
                    .ok()
            };
            Some((name.to_owned(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// The usher being measured (or soaked).
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) pid: Option<u32>,
    /// The one bench started, stopped at the end.
    pub(crate) child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The host of a `scheme://[user:pass@]host:port[/db]` URL is on loopback.
pub(crate) fn redis_on_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Starts this binary's `serve` in development mode on a free loopback port, with
/// `flags` besides.
pub(crate) fn start_usher(flags: &[&str]) -> Result<Target, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["serve", "--insecure-dev", "--listen", &addr.to_string()])
        .args(flags)
        .args(["--drain-delay", "0s", "--log", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    Ok(Target {
        addr,
        pid: Some(child.id()),
        child: Some(child),
    })
}

/// A client of its own for the Redis at `url`, connected.
pub(crate) async fn redis_client(url: &str) -> Result<fred::clients::Client, fred::error::Error> {
    let config = fred::types::config::Config::from_url(url)?;
    let client = fred::types::Builder::from_config(config).build()?;
    client.init().await?;
    Ok(client)
}

/// Every key matching `pattern` (SCAN, a page at a time).
pub(crate) async fn scan_keys(
    client: &fred::clients::Client,
    pattern: &str,
) -> Result<Vec<String>, fred::error::Error> {
    let mut found = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .custom(
                fred::cmd!("SCAN"),
                vec![
                    cursor.clone(),
                    "MATCH".into(),
                    pattern.to_owned(),
                    "COUNT".into(),
                    "1000".into(),
                ],
            )
            .await?;
        found.extend(keys);
        if next == "0" {
            return Ok(found);
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix` (a run's own).
pub(crate) async fn delete_keys(client: &fred::clients::Client, prefix: &str) {
    let Ok(keys) = scan_keys(client, &format!("{prefix}:*")).await else {
        return;
    };
    for chunk in keys.chunks(1000) {
        let _: Result<i64, _> = client.unlink(chunk.to_vec()).await;
    }
}

/// A channel to `addr` once its health service answers SERVING (10 s at most); else
/// what the last attempt met, e.g. "127.0.0.1:50051 is not SERVING after 10 s
/// (connect: Connection refused (os error 111))".
pub async fn connect_serving(addr: SocketAddr) -> Result<Channel, BenchError> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(10) {
        match Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect()
            .await
        {
            Ok(channel) => {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                match health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                {
                    Ok(answer) if answer.get_ref().status == 1 => return Ok(channel),
                    Ok(answer) => last = format!("status {}", answer.get_ref().status),
                    Err(status) => last = status.message().to_owned(),
                }
            }
            Err(error) => last = format!("connect: {}", innermost(&error)),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BenchError::Call(format!(
        "{addr} is not SERVING after 10 s ({last})"
    )))
}

/// The innermost cause of an error: what a transport error wraps ("Connection refused").
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Adds `authorization: Bearer <credential>` when there is one.
fn authorized<T>(message: T, credential: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(credential) = credential
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {credential}"))
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A CreateSession of `user` on `device`, a living-room TV in the US (also what the
/// benches under `benches/` create).
pub fn create_request(user: &str, device: &str) -> proto::CreateSessionRequest {
    proto::CreateSessionRequest {
        parent: format!("users/{user}"),
        profile_id: "main".into(),
        content_id: "title-000042".into(),
        device: Some(proto::Device {
            id: device.into(),
            r#type: proto::DeviceType::Tv as i32,
            name: "Living room TV".into(),
        }),
        client: Some(proto::ClientInfo {
            ip_address: "192.0.2.10".into(),
            user_agent: "player/2.1 (smart-tv)".into(),
            region: "US".into(),
        }),
        request_id: String::new(),
        manifest_type: proto::ManifestType::Unspecified as i32,
    }
}

/// A created session: its name and playback token.
#[derive(Clone)]
struct Playing {
    name: String,
    token: String,
}

async fn create(
    channel: &Channel,
    user: &str,
    credential: Option<&str>,
) -> Result<Playing, String> {
    let answer = PlaybackSessionServiceClient::new(channel.clone())
        .create_session(authorized(
            create_request(user, "living-room-tv"),
            credential,
        ))
        .await
        .map_err(|s| format!("CreateSession: {:?} {}", s.code(), s.message()))?
        .into_inner();
    Ok(Playing {
        name: answer.session.map(|s| s.name).unwrap_or_default(),
        token: answer.playback_token,
    })
}

fn position(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn stream_heartbeat(ms: u64) -> proto::StreamHeartbeatsRequest {
    proto::StreamHeartbeatsRequest {
        kind: Some(In::Heartbeat(proto::StreamHeartbeat {
            position: position(ms),
            playback_state: proto::PlaybackState::Playing as i32,
            ..Default::default()
        })),
    }
}

/// A unique name for this run's users and keys: `kind`'s first letter and 7 base32
/// characters of the process id and the clock hashed with a random key, 8 in all. It is also the key prefix
/// of an usher the run starts, so that prefix is about as long as a deployment's
/// (`usher`) and the memory measured per session is not inflated by a long one.
pub(crate) fn run_id(kind: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut bits = RandomState::new().hash_one((std::process::id(), nanos));
    let mut id: String = kind.chars().take(1).collect();
    for _ in 0..7 {
        id.push(crate::ids::BASE32[(bits & 31) as usize] as char);
        bits >>= 5;
    }
    id
}

/// The flags that say where a load run goes (`usher bench`, `usher soak`), checked: the
/// usher it starts uses `store` (`memory` or `redis://…`); the Redis it reads is `redis`,
/// or the store when that is Redis; the target and that Redis must be on loopback unless
/// `allow_remote`. The Redis URL, or the flag that is wrong and why.
pub(crate) fn load_targets(
    target: Option<&SocketAddr>,
    store: &str,
    redis: Option<&String>,
    allow_remote: bool,
) -> Result<Option<String>, (&'static str, String)> {
    let redis_url = redis
        .cloned()
        .or_else(|| store.starts_with("redis://").then(|| store.to_owned()));
    if !allow_remote {
        if let Some(target) = target
            && !loopback(target)
        {
            return Err((
                "--target",
                format!("{target} is not on loopback (--allow-remote to send it load anyway)"),
            ));
        }
        if let Some(url) = &redis_url
            && !redis_on_loopback(url)
        {
            return Err((
                "--redis",
                "not on loopback (--allow-remote to send it load anyway)".into(),
            ));
        }
    }
    if store != "memory" && !store.starts_with("redis://") {
        return Err((
            "--store",
            format!("{store:?}: expected memory or redis://host:port"),
        ));
    }
    Ok(redis_url)
}

/// The Redis usher uses: a client of its own, its process, and the store client the raw
/// scripts are driven through (keys under `prefix`).
struct RedisSide {
    client: fred::clients::Client,
    pid: Option<u32>,
    store: Arc<RedisStore>,
    prefix: String,
}

impl RedisSide {
    async fn open(url: &str, prefix: String) -> Result<Self, BenchError> {
        let redis = |e: fred::error::Error| BenchError::Redis(e.to_string());
        let client = redis_client(url).await.map_err(redis)?;
        let info: String = client
            .info(Some(fred::types::InfoKind::Server))
            .await
            .map_err(redis)?;
        let pid = info_field(&info, "process_id")
            .and_then(|p| p.parse::<u32>().ok())
            // Only a redis-server on this machine: /proc of another host's pid is not it.
            .filter(|pid| {
                redis_on_loopback(url)
                    && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|name| name.starts_with("redis"))
            });
        let StoreConfig::Redis(options) = parse_store(url, &prefix, Duration::from_secs(2), false)
            .map_err(|e| flag("--redis", e.to_string()))?
        else {
            return Err(flag("--redis", "expected redis://host:port"));
        };
        let store = RedisStore::connect(options, StoreSettings::default())
            .await
            .map_err(|e| BenchError::Redis(e.to_string()))?;
        Ok(Self {
            client,
            pid,
            store: Arc::new(store),
            prefix,
        })
    }

    /// The memory of the event streams of the partitions under `prefix` (MEMORY USAGE,
    /// every entry counted) and how many entries they hold.
    async fn events_bytes(&self, prefix: &str) -> Option<(u64, u64)> {
        let logs = (0..StoreSettings::default().partitions).map(|partition| async move {
            let key = format!("{prefix}:{{{partition}}}:events");
            let bytes = self.client.custom::<Option<u64>, _>(
                fred::cmd!("MEMORY"),
                vec![
                    "USAGE".to_owned(),
                    key.clone(),
                    "SAMPLES".to_owned(),
                    "0".to_owned(),
                ],
            );
            let entries = self
                .client
                .custom::<u64, _>(fred::cmd!("XLEN"), vec![key.clone()]);
            let (bytes, entries) = futures::future::try_join(bytes, entries).await?;
            Ok::<_, fred::error::Error>((bytes.unwrap_or(0), entries))
        });
        let logs = futures::future::try_join_all(logs).await.ok()?;
        Some(
            logs.into_iter()
                .fold((0, 0), |(b, e), (bytes, entries)| (b + bytes, e + entries)),
        )
    }

    /// Redis' memory less its clients' buffers (`mem_clients_normal`): those grow and
    /// shrink with the connections' traffic, not with what is stored, and in a short
    /// run their shrinking alone made the growth per session negative.
    async fn used_memory(&self) -> Option<u64> {
        let info: String = self
            .client
            .info(Some(fred::types::InfoKind::Memory))
            .await
            .ok()?;
        let field = |name| info_field(&info, name)?.parse::<u64>().ok();
        Some(field("used_memory")?.saturating_sub(field("mem_clients_normal").unwrap_or(0)))
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// A session of `user` on a living-room TV in the US, created straight through a store
/// (the raw scripts here; `benches/store.rs`), under a limit of `limit` seats.
pub fn new_session(user: &str, limit: u32) -> Result<NewSession, String> {
    let id = |v: FieldViolation| format!("{}: {}", v.field, v.description);
    Ok(NewSession {
        name: SessionName {
            user: UserId::parse("user", user).map_err(id)?,
            session: SessionId::generate(),
        },
        profile: ProfileId::parse("profile", "main").map_err(id)?,
        content: ContentId::parse("content", "title-000042").map_err(id)?,
        device: Device {
            id: DeviceId::parse("device", "living-room-tv").map_err(id)?,
            kind: DeviceType::Tv,
            name: "Living room TV".into(),
        },
        client: ClientInfo {
            ip_address: "192.0.2.10".into(),
            user_agent: "player/2.1 (smart-tv)".into(),
            region: "US".into(),
        },
        request_id: None,
        limit,
        policy: OverLimitPolicy::RejectNew,
        rate: None,
    })
}

const SCENARIOS: [&str; 5] = ["health", "validate", "create", "heartbeat", "stream"];

/// Runs the measurements `args` asks for.
pub async fn run(args: BenchArgs) -> Result<Report, BenchError> {
    for name in &args.only {
        if !SCENARIOS.contains(&name.as_str()) {
            return Err(flag(
                "--only",
                format!("{name:?}: expected some of {}", SCENARIOS.join(", ")),
            ));
        }
    }
    let counts = [
        ("--sessions", args.sessions as u64),
        ("--in-flight", args.in_flight as u64),
        ("--max-calls", args.max_calls),
        ("--rate", args.rate.map_or(1, u64::from)),
    ];
    if let Some((name, _)) = counts.iter().find(|(_, count)| *count == 0) {
        return Err(flag(name, "must be more than 0"));
    }
    let redis_url = load_targets(
        args.target.as_ref(),
        &args.store,
        args.redis.as_ref(),
        args.allow_remote,
    )
    .map_err(|(name, message)| flag(name, message))?;
    let run_id = run_id("bench");
    let target = match args.target {
        Some(addr) => Target {
            addr,
            pid: args.usher_pid,
            child: None,
        },
        // Every streamed heartbeat is written, as the raw script it is compared with.
        None => start_usher(&[
            "--store",
            &args.store,
            "--redis-key-prefix",
            &run_id,
            "--stream-min-write-interval",
            "0s",
        ])
        .map_err(BenchError::Start)?,
    };
    let redis = match &redis_url {
        Some(url) => Some(RedisSide::open(url, format!("{run_id}-raw")).await?),
        None => None,
    };
    let channel = connect_serving(target.addr).await?;
    let processes = Processes {
        usher: target.pid,
        redis: redis.as_ref().and_then(|r| r.pid),
        redis_client: redis.as_ref().map(|r| r.client.clone()),
    };
    let mode = match args.rate {
        Some(per_second) => Mode::Open {
            per_second,
            max_outstanding: args.in_flight * 16,
        },
        None => Mode::Closed {
            in_flight: args.in_flight,
        },
    };
    let bounds = Bounds {
        duration: args.duration,
        max_calls: args.max_calls,
    };
    let credential: Option<Arc<str>> = args.service_key.as_deref().map(Arc::from);
    let wanted = |name: &str| args.only.iter().any(|n| n == name);
    let mut report = Report {
        mode: match mode {
            Mode::Closed { in_flight } => format!(
                "closed loop, {in_flight} in flight, {:?} or {} calls each",
                args.duration, args.max_calls
            ),
            Mode::Open { per_second, .. } => format!(
                "open loop, {per_second} calls/s, {:?} or {} calls each",
                args.duration, args.max_calls
            ),
        },
        ..Report::default()
    };

    if wanted("health") {
        let channel = channel.clone();
        report.through_usher.push(
            processes
                .measure(drive("health check", mode, bounds, move |_| {
                    let mut client =
                        tonic_health::pb::health_client::HealthClient::new(channel.clone());
                    async move {
                        client
                            .check(tonic_health::pb::HealthCheckRequest::default())
                            .await
                            .map(|_| ())
                            .map_err(|s| format!("{:?} {}", s.code(), s.message()))
                    }
                }))
                .await,
        );
    }
    if wanted("validate") {
        let playing = create(&channel, &format!("{run_id}-v"), credential.as_deref())
            .await
            .map_err(BenchError::Call)?;
        let (channel, credential) = (channel.clone(), credential.clone());
        report.through_usher.push(
            processes
                .measure(drive("validate (cached)", mode, bounds, move |_| {
                    let mut client = TokenServiceClient::new(channel.clone());
                    let request = authorized(
                        proto::ValidateTokenRequest {
                            token: playing.token.clone(),
                            check_session: false,
                        },
                        credential.as_deref(),
                    );
                    async move {
                        match client.validate_token(request).await {
                            Ok(answer) if answer.get_ref().valid => Ok(()),
                            Ok(answer) => Err(format!("not valid: {}", answer.get_ref().reason)),
                            Err(s) => Err(format!("{:?} {}", s.code(), s.message())),
                        }
                    }
                }))
                .await,
        );
    }
    if wanted("create") {
        // The event streams of the usher bench started (its keys are this run's).
        let usher_prefix = target.child.is_some().then(|| run_id.clone());
        let events = async |redis: &RedisSide| match &usher_prefix {
            Some(prefix) => redis.events_bytes(prefix).await,
            None => None,
        };
        // Creates of users named `<run>-<tag><i>`.
        let creates = |tag: &'static str| {
            let (channel, credential, users) =
                (channel.clone(), credential.clone(), run_id.clone());
            move |i| {
                let (channel, credential, user) = (
                    channel.clone(),
                    credential.clone(),
                    format!("{users}-{tag}{i}"),
                );
                async move {
                    create(&channel, &user, credential.as_deref())
                        .await
                        .map(|_| ())
                }
            }
        };
        // A warm-up first, not counted: what the first sessions of a partition allocate
        // once (its log and sweep index, the allocators' first pages) is not memory per
        // session, and the measured creates meet a store that already holds sessions.
        let warm_up = Bounds {
            duration: bounds.duration / 4,
            max_calls: bounds.max_calls / 4,
        };
        drive("create warm-up", mode, warm_up, creates("w")).await;
        let (before, events_before) = match &redis {
            Some(redis) => (redis.used_memory().await, events(redis).await),
            None => (None, None),
        };
        let resident_before = target.pid.and_then(resident_bytes);
        let measured = processes
            .measure(drive("create", mode, bounds, creates("c")))
            .await;
        if let (Some(redis), Some(before)) = (&redis, before)
            && let Some(after) = redis.used_memory().await
            && measured.calls > 0
        {
            let per_session = |bytes: f64| bytes / measured.calls as f64;
            let events_after = events(redis).await;
            let events_growth = match (events_before, events_after) {
                (Some((before, _)), Some((after, _))) => after as f64 - before as f64,
                _ => 0.0,
            };
            report.redis_bytes_per_session =
                Some(per_session(after as f64 - before as f64 - events_growth));
            report.redis_event_bytes_per_session = events_after
                .filter(|(_, entries)| *entries > 0)
                .map(|(bytes, entries)| bytes as f64 / entries as f64);
        }
        if let (Some(before), Some(after)) = (resident_before, target.pid.and_then(resident_bytes))
            && measured.calls > 0
        {
            report.usher_bytes_per_session =
                Some((after as f64 - before as f64) / measured.calls as f64);
        }
        report.through_usher.push(measured);
    }
    if wanted("heartbeat") || wanted("stream") {
        let mut pool = Vec::with_capacity(args.sessions);
        for i in 0..args.sessions {
            let user = format!("{run_id}-h{i}");
            pool.push(
                create(&channel, &user, credential.as_deref())
                    .await
                    .map_err(BenchError::Call)?,
            );
        }
        let pool = Arc::new(pool);
        if wanted("heartbeat") {
            let (channel, pool) = (channel.clone(), pool.clone());
            report.through_usher.push(
                processes
                    .measure(drive("heartbeat (unary)", mode, bounds, move |i| {
                        let playing = &pool[(i % pool.len() as u64) as usize];
                        let request = authorized(
                            proto::HeartbeatRequest {
                                name: playing.name.clone(),
                                position: position(i),
                                playback_state: proto::PlaybackState::Playing as i32,
                                ..Default::default()
                            },
                            Some(&playing.token),
                        );
                        let mut client = PlaybackSessionServiceClient::new(channel.clone());
                        async move {
                            client
                                .heartbeat(request)
                                .await
                                .map(|_| ())
                                .map_err(|s| format!("{:?} {}", s.code(), s.message()))
                        }
                    }))
                    .await,
            );
        }
        if wanted("stream") {
            // As many streams as calls in flight elsewhere, so the rows compare.
            let beating = &pool[..pool.len().min(args.in_flight)];
            report
                .through_usher
                .push(processes.measure(streams(&channel, beating, bounds)).await);
        }
    }
    if let Some(redis) = &redis {
        if wanted("create") {
            let (store, users) = (redis.store.clone(), run_id.clone());
            report.raw.push(
                processes
                    .measure_redis(drive("raw create script", mode, bounds, move |i| {
                        let (store, user) = (store.clone(), format!("{users}-rc{i}"));
                        async move {
                            store
                                .create_session(new_session(&user, 2)?, Deadline::NONE)
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        }
                    }))
                    .await,
            );
        }
        if wanted("heartbeat") || wanted("stream") {
            let mut names = Vec::with_capacity(args.sessions);
            for i in 0..args.sessions {
                let created = redis
                    .store
                    .create_session(
                        new_session(&format!("{run_id}-rh{i}"), 2).map_err(BenchError::Call)?,
                        Deadline::NONE,
                    )
                    .await
                    .map_err(|e| BenchError::Redis(e.to_string()))?;
                names.push(created.session.name);
            }
            let names = Arc::new(names);
            // The unary call answers the whole session; a stream's heartbeat only what
            // it changed (Store::device_call_brief): each is compared with its own.
            let wants = [
                ("heartbeat", "raw heartbeat script", false),
                ("stream", "raw heartbeat script (brief)", true),
            ];
            for (wanted_by, name, brief) in wants {
                if !wanted(wanted_by) {
                    continue;
                }
                let (store, names) = (redis.store.clone(), names.clone());
                report.raw.push(
                    processes
                        .measure_redis(drive(name, mode, bounds, move |i| {
                            let name = names[(i % names.len() as u64) as usize].clone();
                            let playing = DeviceAction::Heartbeat {
                                playback_state: PlaybackState::Playing,
                            };
                            let call = DeviceCall {
                                position_ms: Some(i),
                                ..DeviceCall::new(name, None, playing)
                            };
                            let store = store.clone();
                            async move {
                                // One script call each: the store's batching of
                                // heartbeats that arrive together is measured below.
                                let answer = if brief {
                                    store
                                        .beat_together(&[call], Deadline::NONE)
                                        .await
                                        .and_then(|mut answers| answers.remove(0))
                                        .map(|_| ())
                                } else {
                                    store.device_call(call, Deadline::NONE).await.map(|_| ())
                                };
                                answer.map_err(|e| e.to_string())
                            }
                        }))
                        .await,
                );
            }
        }
        if wanted("stream") {
            report
                .raw
                .push(raw_batches(redis, &processes, &run_id, mode, bounds, args.in_flight).await?);
        }
        delete_keys(&redis.client, &redis.prefix).await;
        if target.child.is_some() {
            delete_keys(&redis.client, &run_id).await;
        }
    }
    drop(target);
    Ok(report)
}

/// Heartbeats in batches of this many sessions of one partition, the most the store's
/// batching of heartbeats that arrive together puts in one script call under load.
const BATCH: u64 = 16;

/// The brief heartbeat script driven raw in batches of [`BATCH`] sessions of one
/// partition per script call (`RedisStore::beat_together`), as many batches in flight as
/// `in_flight` allows (each of its own partition): the row counts heartbeats, so its
/// rate compares with the single-call row's; its latencies are the batches'.
async fn raw_batches(
    redis: &RedisSide,
    processes: &Processes,
    run_id: &str,
    mode: Mode,
    bounds: Bounds,
    in_flight: usize,
) -> Result<Measured, BenchError> {
    let partitions = StoreSettings::default().partitions;
    let groups = in_flight.clamp(1, 64);
    let mut batches: Vec<Vec<SessionName>> = vec![Vec::new(); groups];
    let mut candidate = 0u64;
    while batches.iter().any(|batch| batch.len() < BATCH as usize) {
        candidate += 1;
        let user = format!("{run_id}-rb{candidate}");
        let id = UserId::parse("user", &user).map_err(|v| BenchError::Call(v.description))?;
        let group = crate::store::partition_of(&id, partitions) as usize;
        let Some(batch) = batches.get_mut(group).filter(|b| b.len() < BATCH as usize) else {
            continue;
        };
        let created = redis
            .store
            .create_session(
                new_session(&user, 2).map_err(BenchError::Call)?,
                Deadline::NONE,
            )
            .await
            .map_err(|e| BenchError::Redis(e.to_string()))?;
        batch.push(created.session.name);
    }
    let (store, batches) = (redis.store.clone(), Arc::new(batches));
    let mut measured = processes
        .measure_redis(drive(
            "raw heartbeat script (brief), 16 per call",
            mode,
            bounds,
            move |i| {
                let calls: Vec<DeviceCall> = batches[(i % batches.len() as u64) as usize]
                    .iter()
                    .map(|name| {
                        let playing = DeviceAction::Heartbeat {
                            playback_state: PlaybackState::Playing,
                        };
                        DeviceCall {
                            position_ms: Some(i),
                            ..DeviceCall::new(name.clone(), None, playing)
                        }
                    })
                    .collect();
                let store = store.clone();
                async move {
                    let answers = store
                        .beat_together(&calls, Deadline::NONE)
                        .await
                        .map_err(|e| e.to_string())?;
                    match answers.into_iter().find_map(Result::err) {
                        Some(error) => Err(error.to_string()),
                        None => Ok(()),
                    }
                }
            },
        ))
        .await;
    measured.calls *= BATCH;
    measured.script_us = measured.script_us.map(|us| us / BATCH as f64);
    measured.script_commands_us = measured.script_commands_us.map(|us| us / BATCH as f64);
    Ok(measured)
}

/// Stream heartbeats: one stream per session of `pool`, each sending its next heartbeat
/// when the last is acknowledged (closed loop in either mode), for `bounds`. Coalesced
/// acks (a server that does not write every heartbeat) are errors here: they are not the
/// work being measured.
async fn streams(channel: &Channel, pool: &[Playing], bounds: Bounds) -> Measured {
    let mut opened = Vec::with_capacity(pool.len());
    let mut measured = Measured {
        name: "heartbeat (stream)",
        ..Measured::default()
    };
    for playing in pool {
        let (sender, requests) = mpsc::channel(4);
        let _ = sender.send(stream_heartbeat(0)).await;
        let request = authorized(ReceiverStream::new(requests), Some(&playing.token));
        match StreamingServiceClient::new(channel.clone())
            .stream_heartbeats(request)
            .await
        {
            Ok(answer) => {
                let mut answers = answer.into_inner();
                // The first heartbeat's ack.
                let _ = answers.message().await;
                opened.push((sender, answers));
            }
            Err(status) => {
                measured.errors += 1;
                measured.first_error.get_or_insert(format!(
                    "{:?} {}",
                    status.code(),
                    status.message()
                ));
            }
        }
    }
    let started = Instant::now();
    let until = started + bounds.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (sender, mut answers) in opened {
        let next = next.clone();
        tasks.spawn(async move {
            let mut seen = Seen::default();
            let mut ms = 1000;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bounds.max_calls || Instant::now() >= until {
                    return seen;
                }
                let began = Instant::now();
                ms += 1000;
                if sender.send(stream_heartbeat(ms)).await.is_err() {
                    seen.record(Err("the stream closed".into()), began);
                    return seen;
                }
                let result = match answers.message().await {
                    Ok(Some(proto::StreamHeartbeatsResponse {
                        kind: Some(Out::Ack(ack)),
                    })) if !ack.coalesced => Ok(()),
                    Ok(Some(proto::StreamHeartbeatsResponse {
                        kind: Some(Out::Ack(_)),
                    })) => Err("coalesced: the server does not write every heartbeat".into()),
                    Ok(Some(other)) => Err(format!("not an ack: {other:?}")),
                    Ok(None) => Err("the stream ended".into()),
                    Err(s) => Err(format!("{:?} {}", s.code(), s.message())),
                };
                let failed = result.is_err();
                seen.record(result, began);
                if failed {
                    return seen;
                }
            }
        });
    }
    measured.gather(tasks, started).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_on_loopback_are_told_apart() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://localhost:6379/0",
            "redis://user:secret@[::1]:6380",
            "rediss://127.0.0.2",
        ] {
            assert!(redis_on_loopback(url), "{url}");
        }
        for url in ["redis://10.0.0.5:6379", "redis://cache.internal:6379"] {
            assert!(!redis_on_loopback(url), "{url}");
        }
    }

    #[test]
    fn command_stats_are_read_by_name() {
        let info = "# Commandstats\r\n\
            cmdstat_fcall:calls=10,usec=300,usec_per_call=30.00,rejected_calls=0\r\n\
            cmdstat_hset:calls=20,usec=40,usec_per_call=2.00,rejected_calls=0\r\n";
        let stats = parse_command_stats(info);
        assert_eq!(stats["fcall"], (10, 300));
        assert_eq!(stats["hset"], (20, 40));
        assert_eq!(stats.len(), 2);
    }

    #[test]
    fn percentiles_come_from_the_sorted_latencies() {
        let measured = Measured {
            latencies: (1..=1000).map(Duration::from_micros).collect(),
            calls: 1000,
            elapsed: Duration::from_secs(2),
            ..Measured::default()
        };
        assert_eq!(measured.percentile(0.5), Some(Duration::from_micros(501)));
        assert_eq!(measured.percentile(0.999), Some(Duration::from_micros(999)));
        assert_eq!(measured.rate(), 500.0);
        assert_eq!(Measured::default().percentile(0.5), None);
    }
}
