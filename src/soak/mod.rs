//! `usher soak`: a bounded churn against a running usher (`--target`) or one it starts
//! itself, for a long time (10 minutes unless told), to show that nothing accumulates.
//!
//! - Devices (`--devices`, two per user) play over `StreamHeartbeats`: create, heartbeat
//!   at the interval usher gives, play for a random time between `--play-min` and
//!   `--play-max`, then stop, or vanish (`--vanish` of the plays: the stream is dropped
//!   with no stop, so the seat waits for its heartbeat deadline and expires).
//! - History users record unary creates, heartbeats, stops and abandonments from three
//!   clients at once, in segments of a bounded number of calls; each segment is checked
//!   for linearizability against the seat semaphore ([`history`]).
//! - At the start (after one priming play per user, so the keys a user keeps exist), at
//!   the end of the churn and after the drain, it reads usher's RSS, open file
//!   descriptors, threads and tokio tasks (`/proc`, `/metrics`) and, given the Redis,
//!   the keys under usher's prefix by kind. After the churn every seat must drain and
//!   the key count come back to the start's; the command fails if either does not, or if
//!   a history is not linearizable.
//!
//! The soak sends real load: loopback only unless `--allow-remote`; bounded by
//! `--duration` and `--devices`. A usher it starts has keys under a prefix of this run's
//! own, deleted at the end.

pub mod history;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::bench::Target;
use crate::config::SoakArgs;
use crate::proto;
use crate::proto::concurrency_service_client::ConcurrencyServiceClient;
use crate::proto::playback_session_service_client::PlaybackSessionServiceClient;
use crate::proto::stream_heartbeats_request::Kind as In;
use crate::proto::stream_heartbeats_response::Kind as Out;
use crate::proto::streaming_service_client::StreamingServiceClient;
use history::{Random, Recording};

/// Why a soak could not run, or what it found wrong.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("starting usher: {0}")]
    Start(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("{0}")]
    Call(String),
}

fn flag(flag: &'static str, message: impl Into<String>) -> SoakError {
    SoakError::Flag {
        flag,
        message: message.into(),
    }
}

/// What one look at usher and Redis found.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub seconds: f64,
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub threads: Option<u64>,
    /// Tokio tasks alive in usher (`usher_runtime_tasks`).
    pub tasks: Option<u64>,
    /// Device streams open (`usher_streams_open`).
    pub streams: Option<u64>,
    /// Seats held by the soak's users (GetConcurrency of each).
    pub seats: u64,
    /// Keys under usher's prefix, by kind (`u`, `s`, `events`, ...), when the Redis is
    /// known.
    pub keys: Option<BTreeMap<String, u64>>,
}

impl Snapshot {
    /// Keys but the health probe's short-lived write.
    fn key_total(&self) -> Option<u64> {
        self.keys.as_ref().map(|keys| {
            keys.iter()
                .filter(|(kind, _)| kind.as_str() != "probe")
                .map(|(_, count)| count)
                .sum()
        })
    }

    fn json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "rss_bytes": self.rss_bytes,
            "open_fds": self.open_fds,
            "threads": self.threads,
            "tasks": self.tasks,
            "streams": self.streams,
            "seats": self.seats,
            "keys": self.key_total(),
            "keys_by_kind": self.keys,
        })
    }
}

/// Counts of the churn.
#[derive(Debug, Default)]
pub struct Churn {
    pub plays: AtomicU64,
    pub stops: AtomicU64,
    pub vanished: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Creates refused for the seat limit (a vanished seat not yet expired).
    pub refused: AtomicU64,
    pub errors: AtomicU64,
    pub first_error: std::sync::Mutex<Option<String>>,
}

impl Churn {
    fn error(&self, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(error);
    }
}

/// The history segments checked.
#[derive(Debug, Default)]
pub struct Histories {
    pub segments: u64,
    pub calls: u64,
    pub admitted: u64,
    pub refused: u64,
    pub expiries: u64,
    /// Segments no order explains, by user.
    pub violations: Vec<String>,
    /// Segments the search gave up on (`history::MAX_STATES`), by user.
    pub undecided: Vec<String>,
    /// The most states one segment's search visited.
    pub largest_search: usize,
}

#[derive(Debug)]
pub struct SoakReport {
    pub start: Snapshot,
    pub end: Snapshot,
    pub drained: Snapshot,
    pub churn: Churn,
    pub histories: Histories,
    /// Every seat released after the churn.
    pub seats_drained: bool,
    /// The key count back to the start's (true when there is no Redis to count).
    pub keys_back: bool,
}

impl SoakReport {
    /// The soak found nothing wrong.
    pub fn passed(&self) -> bool {
        self.seats_drained
            && self.keys_back
            && self.histories.violations.is_empty()
            && self.histories.undecided.is_empty()
    }

    pub fn json(&self) -> Value {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "start": self.start.json(),
            "end_of_churn": self.end.json(),
            "drained": self.drained.json(),
            "churn": {
                "plays": load(&self.churn.plays),
                "stops": load(&self.churn.stops),
                "vanished": load(&self.churn.vanished),
                "stream_heartbeats": load(&self.churn.heartbeats),
                "refused_at_limit": load(&self.churn.refused),
                "errors": load(&self.churn.errors),
                "first_error": *self.churn.first_error.lock().unwrap(),
            },
            "histories": {
                "segments": self.histories.segments,
                "calls": self.histories.calls,
                "admitted": self.histories.admitted,
                "refused_at_limit": self.histories.refused,
                "expiries_in_segments": self.histories.expiries,
                "not_linearizable": self.histories.violations,
                "undecided": self.histories.undecided,
                "largest_search_states": self.histories.largest_search,
            },
            "seats_drained": self.seats_drained,
            "keys_back_to_start": self.keys_back,
            "passed": self.passed(),
        })
    }

    /// What a person reads.
    pub fn table(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::from("usher soak\n");
        out.push_str(&format!(
            "{:<14} {:>8} {:>10} {:>6} {:>8} {:>7} {:>8} {:>6} {:>7}\n",
            "", "seconds", "RSS MiB", "fds", "threads", "tasks", "streams", "seats", "keys"
        ));
        let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        for (name, s) in [
            ("start", &self.start),
            ("end of churn", &self.end),
            ("drained", &self.drained),
        ] {
            out.push_str(&format!(
                "{name:<14} {:>8.1} {:>10} {:>6} {:>8} {:>7} {:>8} {:>6} {:>7}\n",
                s.seconds,
                s.rss_bytes
                    .map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0)),
                show(s.open_fds),
                show(s.threads),
                show(s.tasks),
                show(s.streams),
                s.seats,
                show(s.key_total()),
            ));
        }
        out.push_str(&format!(
            "churn: {} plays ({} stopped, {} vanished), {} stream heartbeats, {} creates \
             refused at the limit, {} errors{}\n",
            load(&self.churn.plays),
            load(&self.churn.stops),
            load(&self.churn.vanished),
            load(&self.churn.heartbeats),
            load(&self.churn.refused),
            load(&self.churn.errors),
            self.churn
                .first_error
                .lock()
                .unwrap()
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})")),
        ));
        let h = &self.histories;
        out.push_str(&format!(
            "histories: {} segments, {} calls ({} admitted, {} refused at the limit, {} \
             expiries), {} not linearizable, {} undecided (largest search {} states)\n",
            h.segments,
            h.calls,
            h.admitted,
            h.refused,
            h.expiries,
            h.violations.len(),
            h.undecided.len(),
            h.largest_search,
        ));
        out.push_str(&format!(
            "seats drained: {}; keys back to the start's count: {}\n",
            self.seats_drained, self.keys_back
        ));
        out
    }
}

/// How long a usher the soak starts keeps what it no longer needs: short, so the drain
/// can be watched.
const STARTED_HEARTBEAT_TIMEOUT: &str = "4s";
const STARTED_RETENTION: &str = "5s";

fn start_usher(args: &SoakArgs, prefix: &str) -> Result<Target, SoakError> {
    let limit = args.seat_limit.to_string();
    crate::bench::start_usher(&[
        "--store",
        &args.store,
        "--redis-key-prefix",
        prefix,
        "--default-seat-limit",
        &limit,
        "--create-rate",
        "off",
        "--heartbeat-interval",
        "1s",
        "--heartbeat-timeout",
        STARTED_HEARTBEAT_TIMEOUT,
        "--ended-retention",
        STARTED_RETENTION,
        "--request-id-ttl",
        STARTED_RETENTION,
    ])
    .map_err(SoakError::Start)
}

/// A count from /proc/<pid>/status (`Threads:`), or of /proc/<pid>/fd.
fn proc_threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

fn proc_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// A gauge's value from the Prometheus text.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

/// The Redis whose keys are counted.
struct Keys {
    client: fred::clients::Client,
    prefix: String,
}

impl Keys {
    async fn open(url: &str, prefix: String) -> Result<Self, SoakError> {
        let client = crate::bench::redis_client(url)
            .await
            .map_err(|e| SoakError::Redis(e.to_string()))?;
        Ok(Self { client, prefix })
    }

    /// Every key under the prefix, by kind: the part after the hash tag (`u`, `s`,
    /// `prog`, `events`, ...), or after the prefix for the few without one (`meta`).
    async fn by_kind(&self) -> Option<BTreeMap<String, u64>> {
        let keys = crate::bench::scan_keys(&self.client, &format!("{}:*", self.prefix))
            .await
            .ok()?;
        let mut kinds = BTreeMap::new();
        for key in keys {
            let rest = &key[self.prefix.len() + 1..];
            let kind = match rest.split_once("}:") {
                Some((_, after)) => after.split(':').next().unwrap_or(after),
                None => rest,
            };
            *kinds.entry(kind.to_owned()).or_insert(0) += 1;
        }
        Some(kinds)
    }
}

/// Everything the soak's tasks share.
struct Soak {
    channel: Channel,
    /// Where usher's Prometheus text is (`--metrics-url`, or `/metrics` on its port).
    metrics_url: String,
    pid: Option<u32>,
    credential: Option<String>,
    users: Vec<String>,
    began: Instant,
    http: reqwest::Client,
    keys: Option<Keys>,
}

impl Soak {
    /// A unary call with a 5 s deadline and the service key (or `token`).
    fn authorized<T>(&self, message: T, token: Option<&str>) -> tonic::Request<T> {
        let mut request = self.streaming(message, token);
        request.set_timeout(Duration::from_secs(5));
        request
    }

    /// A call with no deadline (a stream that lives as long as its play).
    fn streaming<T>(&self, message: T, token: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(credential) = token.or(self.credential.as_deref())
            && let Ok(value) = MetadataValue::try_from(format!("Bearer {credential}"))
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    async fn seats(&self) -> u64 {
        let mut client = ConcurrencyServiceClient::new(self.channel.clone());
        let mut held = 0;
        for user in &self.users {
            let request = self.authorized(
                proto::GetConcurrencyRequest {
                    name: format!("users/{user}/concurrency"),
                },
                None,
            );
            if let Ok(answer) = client.get_concurrency(request).await {
                held += answer
                    .into_inner()
                    .concurrency
                    .map_or(0, |c| c.in_use.max(0) as u64);
            }
        }
        held
    }

    async fn snapshot(&self) -> Snapshot {
        let metrics = match self.http.get(&self.metrics_url).send().await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        Snapshot {
            seconds: self.began.elapsed().as_secs_f64(),
            rss_bytes: self.pid.and_then(crate::bench::resident_bytes),
            open_fds: self.pid.and_then(proc_fds),
            threads: self.pid.and_then(proc_threads),
            tasks: gauge(&metrics, "usher_runtime_tasks"),
            streams: gauge(&metrics, "usher_streams_open"),
            seats: self.seats().await,
            keys: match &self.keys {
                Some(keys) => keys.by_kind().await,
                None => None,
            },
        }
    }

    async fn create(
        &self,
        user: &str,
        device: &str,
    ) -> Result<proto::CreateSessionResponse, tonic::Status> {
        let request = self.authorized(crate::bench::create_request(user, device), None);
        PlaybackSessionServiceClient::new(self.channel.clone())
            .create_session(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

fn heartbeat_message() -> proto::StreamHeartbeatsRequest {
    proto::StreamHeartbeatsRequest {
        kind: Some(In::Heartbeat(proto::StreamHeartbeat {
            playback_state: proto::PlaybackState::Playing as i32,
            ..Default::default()
        })),
    }
}

/// One play over a stream: heartbeats until `length`, then stop or vanish.
async fn play(
    soak: &Soak,
    churn: &Churn,
    user: &str,
    device: &str,
    length: Duration,
    vanish: bool,
) {
    let created = match soak.create(user, device).await {
        Ok(created) => created,
        Err(status) if status.code() == Code::ResourceExhausted => {
            churn.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
        Err(status) => {
            churn.error(format!(
                "CreateSession: {:?} {}",
                status.code(),
                status.message()
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
    };
    churn.plays.fetch_add(1, Ordering::Relaxed);
    let interval = created
        .heartbeat
        .and_then(|h| h.interval)
        .and_then(|i| Duration::try_from(i).ok())
        .filter(|i| !i.is_zero())
        .unwrap_or(Duration::from_secs(1));
    let (sender, requests) = mpsc::channel(4);
    let _ = sender.send(heartbeat_message()).await;
    let request = soak.streaming(ReceiverStream::new(requests), Some(&created.playback_token));
    let mut answers = match StreamingServiceClient::new(soak.channel.clone())
        .stream_heartbeats(request)
        .await
    {
        Ok(answer) => answer.into_inner(),
        Err(status) => {
            churn.error(format!(
                "StreamHeartbeats: {:?} {}",
                status.code(),
                status.message()
            ));
            return;
        }
    };
    let until = Instant::now() + length;
    // One heartbeat every interval, whatever arrives between them.
    let mut next_beat = Instant::now() + interval;
    loop {
        if Instant::now() >= until {
            break;
        }
        let wait = tokio::time::sleep_until(next_beat.min(until).into());
        tokio::select! {
            () = wait => {
                if Instant::now() < until && sender.send(heartbeat_message()).await.is_err() {
                    churn.error("the stream closed".into());
                    return;
                }
                next_beat += interval;
            }
            message = answers.message() => match message {
                Ok(Some(proto::StreamHeartbeatsResponse { kind: Some(Out::Ack(_)) })) => {
                    churn.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(proto::StreamHeartbeatsResponse { kind: Some(Out::Stop(stop)) })) => {
                    churn.error(format!("stopped by usher: {:?}", stop.reason));
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    churn.error("the stream ended".into());
                    return;
                }
                Err(status) => {
                    churn.error(format!("stream: {:?} {}", status.code(), status.message()));
                    return;
                }
            }
        }
    }
    if vanish {
        // Gone without a word: the seat waits for its deadline.
        churn.vanished.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let stop = proto::StreamHeartbeatsRequest {
        kind: Some(In::Stop(proto::StreamStop::default())),
    };
    if sender.send(stop).await.is_err() {
        churn.error("the stream closed before stop".into());
        return;
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match answers.message().await {
                Ok(Some(proto::StreamHeartbeatsResponse {
                    kind: Some(Out::Stop(_)),
                })) => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    if stopped == Ok(true) {
        churn.stops.fetch_add(1, Ordering::Relaxed);
    } else {
        churn.error("no stop after StreamStop".into());
    }
}

/// A device's plays until `until`.
async fn device(soak: Arc<Soak>, churn: Arc<Churn>, index: usize, args: SoakArgs, until: Instant) {
    let mut random = Random(0x2545_f491_4f6c_dd1d ^ (index as u64 + 1));
    let user = soak.users[index / 2].clone();
    let mut n = 0u64;
    // Spread the first creates over a second.
    tokio::time::sleep(Duration::from_millis(random.next() % 1000)).await;
    while Instant::now() < until {
        let length = random
            .between(args.play_min, args.play_max)
            .min(until.saturating_duration_since(Instant::now()));
        let vanish = random.chance(args.vanish);
        // A vanished device comes back as another (its old seat must expire on its own).
        let device = format!("soak-{index}-{n}");
        n += 1;
        play(&soak, &churn, &user, &device, length, vanish).await;
        tokio::time::sleep(Duration::from_millis(random.next() % 500)).await;
    }
}

/// History segments until `until`, on users taken in turn from `users`.
async fn histories(
    soak: Arc<Soak>,
    users: Vec<String>,
    limit: usize,
    timeout: Duration,
    until: Instant,
) -> Histories {
    let mut found = Histories::default();
    let servers = vec![PlaybackSessionServiceClient::new(soak.channel.clone())];
    let plan = Recording {
        calls: 40,
        devices: 4,
        pause: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
        credential: soak.credential.as_deref().map(Arc::from),
    };
    let mut turn = 0usize;
    while Instant::now() < until {
        let user = &users[turn % users.len()];
        turn += 1;
        // Begin from no seats: what an earlier segment left must have expired.
        let mut concurrency = ConcurrencyServiceClient::new(soak.channel.clone());
        let wait_until = Instant::now() + timeout * 3;
        loop {
            let request = soak.authorized(
                proto::GetConcurrencyRequest {
                    name: format!("users/{user}/concurrency"),
                },
                None,
            );
            let in_use = match concurrency.get_concurrency(request).await {
                Ok(answer) => answer.into_inner().concurrency.map_or(0, |c| c.in_use),
                Err(_) => -1,
            };
            if in_use == 0 || Instant::now() > wait_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let recorded = history::record(&servers, user, 3, turn as u64, plan.clone(), timeout).await;
        let (admitted, refused, expiries) = recorded.counts();
        found.segments += 1;
        found.calls += recorded.ops.len() as u64;
        found.admitted += admitted as u64;
        found.refused += refused as u64;
        found.expiries += expiries as u64;
        let ops = recorded.ops;
        let checked = tokio::task::spawn_blocking(move || history::check(&ops, limit))
            .await
            .unwrap_or(history::Checked {
                verdict: None,
                states: 0,
            });
        found.largest_search = found.largest_search.max(checked.states);
        match checked.verdict {
            Some(true) => {}
            Some(false) => found.violations.push(format!("{user} (segment {turn})")),
            None => found.undecided.push(format!("{user} (segment {turn})")),
        }
    }
    found
}

/// Runs the soak `args` asks for.
pub async fn run(args: SoakArgs) -> Result<SoakReport, SoakError> {
    if args.devices == 0 {
        return Err(flag("--devices", "must be more than 0"));
    }
    if args.play_min > args.play_max {
        return Err(flag("--play-min", "must be at most --play-max"));
    }
    if !(0.0..=1.0).contains(&args.vanish) {
        return Err(flag("--vanish", "must be between 0 and 1"));
    }
    let redis_url = crate::bench::load_targets(
        args.target.as_ref(),
        &args.store,
        args.redis.as_ref(),
        args.allow_remote,
    )
    .map_err(|(name, message)| flag(name, message))?;
    let run = crate::bench::run_id("soak");
    let (target, prefix) = match args.target {
        Some(addr) => {
            let target = Target {
                addr,
                pid: args.usher_pid,
                child: None,
            };
            (target, args.redis_key_prefix.clone())
        }
        None => (start_usher(&args, &run)?, run.clone()),
    };
    let keys = match &redis_url {
        Some(url) => Some(Keys::open(url, prefix).await?),
        None => None,
    };
    let channel = crate::bench::connect_serving(target.addr)
        .await
        .map_err(|e| SoakError::Call(e.to_string()))?;
    let device_users = args.devices.div_ceil(2);
    let history_users: Vec<String> = (0..args.history_users * 2)
        .map(|i| format!("{run}-h{i}"))
        .collect();
    let mut users: Vec<String> = (0..device_users).map(|i| format!("{run}-u{i}")).collect();
    users.extend(history_users.iter().cloned());
    // reqwest (for /metrics) uses the process's crypto provider, as in the entitlement
    // client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let soak = Arc::new(Soak {
        channel,
        metrics_url: args
            .metrics_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/metrics", target.addr)),
        pid: target.pid,
        credential: args.service_key.clone(),
        users,
        began: Instant::now(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| SoakError::Start(e.to_string()))?,
        keys,
    });

    // Priming: one play per user, stopped, so the keys a user keeps (its generation
    // counter, its progress) exist before the start is read.
    let mut timeout = Duration::from_secs(4);
    let mut limit = args.seat_limit as usize;
    for user in &soak.users {
        let created = soak.create(user, "priming").await.map_err(|s| {
            SoakError::Call(format!(
                "priming CreateSession: {:?} {}",
                s.code(),
                s.message()
            ))
        })?;
        if let Some(t) = created
            .heartbeat
            .and_then(|h| h.timeout)
            .and_then(|t| Duration::try_from(t).ok())
        {
            timeout = t;
        }
        let name = created.session.map(|s| s.name).unwrap_or_default();
        // A device call: the session's own playback token.
        let request = soak.authorized(
            proto::StopSessionRequest {
                name,
                ..Default::default()
            },
            Some(&created.playback_token),
        );
        PlaybackSessionServiceClient::new(soak.channel.clone())
            .stop_session(request)
            .await
            .map_err(|s| {
                SoakError::Call(format!(
                    "priming StopSession: {:?} {}",
                    s.code(),
                    s.message()
                ))
            })?;
    }
    if let Ok(answer) = ConcurrencyServiceClient::new(soak.channel.clone())
        .get_concurrency(soak.authorized(
            proto::GetConcurrencyRequest {
                name: format!("users/{}/concurrency", soak.users[0]),
            },
            None,
        ))
        .await
        && let Some(concurrency) = answer.into_inner().concurrency
    {
        limit = concurrency.limit.max(1) as usize;
    }
    // The start: the priming plays' records gone, so what is left is what users keep.
    let start = settle(&soak, None, args.drain_timeout).await;

    let until = Instant::now() + args.duration;
    let churn = Arc::new(Churn::default());
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.devices {
        tasks.spawn(device(
            soak.clone(),
            churn.clone(),
            index,
            args.clone(),
            until,
        ));
    }
    let recorder = tokio::spawn(histories(
        soak.clone(),
        history_users,
        limit,
        timeout,
        until,
    ));
    let progress = {
        let soak = soak.clone();
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let every = args.report_every;
        let task = tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let s = soak.snapshot().await;
                eprintln!("{}", s.json());
            }
        });
        (done, task)
    };
    while tasks.join_next().await.is_some() {}
    let histories = recorder.await.unwrap_or_default();
    progress.0.store(true, Ordering::Relaxed);
    progress.1.abort();
    let end = soak.snapshot().await;

    // The drain: every seat released (vanished ones by expiry), the records gone.
    let drained = settle(&soak, start.key_total(), args.drain_timeout).await;
    let seats_drained = drained.seats == 0;
    let keys_back = match (start.key_total(), drained.key_total()) {
        (Some(start), Some(now)) => start == now,
        _ => true,
    };
    if target.child.is_some()
        && let Some(keys) = &soak.keys
    {
        crate::bench::delete_keys(&keys.client, &keys.prefix).await;
    }
    drop(target);
    let churn = Arc::try_unwrap(churn).unwrap_or_default();
    Ok(SoakReport {
        start,
        end,
        drained,
        churn,
        histories,
        seats_drained,
        keys_back,
    })
}

/// Waits (up to `within`) until no seat is held and no session record is left (and,
/// given `baseline`, the key count is back to it): the snapshot then, or at the limit.
async fn settle(soak: &Soak, baseline: Option<u64>, within: Duration) -> Snapshot {
    let deadline = Instant::now() + within;
    loop {
        let now = soak.snapshot().await;
        let records = now
            .keys
            .as_ref()
            .map_or(0, |keys| keys.get("s").copied().unwrap_or(0));
        let keys_back = baseline.is_none_or(|b| now.key_total() == Some(b));
        if (now.seats == 0 && records == 0 && keys_back) || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
