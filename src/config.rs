//! Configuration: the one entry point. Every flag is also an `USHER_*` environment
//! variable; [`ServeArgs::into_config`] checks them once into a typed [`Config`] that is
//! passed down. Nothing else reads the environment.

use crate::progress::ResumeRules;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::entitlement::{DegradedMode, HttpSettings, MAX_SEAT_LIMIT, MissingRegion, service_url};
use crate::store::memory::MemoryLimits;
use crate::store::redis::{RedisOptions, RedisTarget};
use crate::store::{
    DEFAULT_MEMORY_MAX_SESSIONS, DEFAULT_MEMORY_MAX_USERS, HeartbeatEvents, OverLimitPolicy,
    RateLimit, StoreSettings,
};
use crate::streaming::StreamSettings;
use crate::telemetry::LogFormat;
use crate::token::TokenSettings;
use crate::token::keys::KeyAlgorithm;

/// usher: the playback control plane. Sessions, concurrency seats and heartbeats.
#[derive(Debug, Parser)]
#[command(name = "usher", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Ask a running server's grpc.health.v1 service; exit 0 only when SERVING.
    Health(HealthArgs),
    /// Manage token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Play the device's side of a session's stream: heartbeat with its playback token
    /// and print every message usher sends (one JSON line each) until usher stops it.
    Device(DeviceArgs),
    /// Run only the relays of `--relay` (no server): deliver every event of the store's
    /// logs to the sinks, sharing the work with every other relay of them. Takes the
    /// flags of `serve`; `--status` prints how far each sink is behind and exits.
    Relay(Box<RelayArgs>),
    /// Measure the hot paths side by side in one run: creates, unary and streamed
    /// heartbeats, ValidateToken and an empty RPC through usher, and (given the Redis it
    /// uses) the same store scripts driven straight at Redis, with CPU and memory per call.
    Bench(Box<BenchArgs>),
    /// A long bounded churn (creates, stream heartbeats, stops, expiries, recorded
    /// histories checked for linearizability) reporting usher's RSS, file descriptors,
    /// threads and tasks and Redis' keys at the start, the end and after the drain.
    Soak(Box<SoakArgs>),
}

/// `usher relay` flags: those of `serve` (the store, the sinks), and `--status`.
#[derive(Clone, Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub serve: ServeArgs,

    /// Print each sink's lag (events not acknowledged, in all partitions and in the
    /// partition furthest behind) as a JSON line, and exit.
    #[arg(long, env = "USHER_RELAY_STATUS")]
    pub status: bool,
}

/// `usher bench` flags.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// A running usher to measure. Without it, bench starts its own (this binary's
    /// `serve`, development mode, on a free loopback port) on `--store`.
    #[arg(long, env = "USHER_BENCH_TARGET", value_parser = server_address)]
    pub target: Option<SocketAddr>,

    /// The store of the usher bench starts: `memory` or `redis://host:port` (its keys
    /// under a prefix of this run's own, deleted at the end).
    #[arg(long, env = "USHER_BENCH_STORE", default_value = "memory")]
    pub store: String,

    /// The Redis the measured usher uses (`redis://host:port`): adds the scripts' own
    /// ceiling on it, redis-server's CPU per call (when it runs on this machine) and Redis
    /// memory per session. Defaults to `--store` when that is Redis.
    #[arg(long, env = "USHER_BENCH_REDIS")]
    pub redis: Option<String>,

    /// The process id of the `--target` usher, for its CPU per call (read from /proc).
    #[arg(long, env = "USHER_BENCH_USHER_PID")]
    pub usher_pid: Option<u32>,

    /// How long each measurement runs.
    #[arg(long, env = "USHER_BENCH_DURATION", default_value = "3s", value_parser = duration)]
    pub duration: Duration,

    /// At most this many calls per measurement.
    #[arg(long, env = "USHER_BENCH_MAX_CALLS", default_value_t = 2_000_000)]
    pub max_calls: u64,

    /// Closed loop: this many calls in flight (each starts when one ends).
    #[arg(long, env = "USHER_BENCH_IN_FLIGHT", default_value_t = 64)]
    pub in_flight: usize,

    /// Open loop instead: start this many calls per second, whatever the answers do
    /// (latency counted from when each call was due).
    #[arg(long, env = "USHER_BENCH_RATE")]
    pub rate: Option<u32>,

    /// Sessions the heartbeat measurements beat on (one stream each for streams).
    #[arg(long, env = "USHER_BENCH_SESSIONS", default_value_t = 256)]
    pub sessions: usize,

    /// Which measurements, comma-separated: health, validate, create, heartbeat, stream.
    #[arg(
        long,
        env = "USHER_BENCH_ONLY",
        value_delimiter = ',',
        default_value = "health,validate,create,heartbeat,stream"
    )]
    pub only: Vec<String>,

    /// A service key (`Bearer` credential with the admin role) for a `--target` that
    /// requires credentials; devices use the playback tokens their creates return.
    #[arg(long, env = "USHER_BENCH_SERVICE_KEY")]
    pub service_key: Option<String>,

    /// Allow a target or Redis that is not on loopback (bench sends real load).
    #[arg(long, env = "USHER_BENCH_ALLOW_REMOTE")]
    pub allow_remote: bool,

    /// Print one JSON document instead of the table.
    #[arg(long, env = "USHER_BENCH_JSON")]
    pub json: bool,
}

/// `usher soak` flags.
#[derive(Clone, Debug, Args)]
pub struct SoakArgs {
    /// A running usher to soak. Without it, soak starts its own (this binary's `serve`,
    /// development mode, on a free loopback port, 4 s heartbeat timeout, 5 s retention)
    /// on `--store`.
    #[arg(long, env = "USHER_SOAK_TARGET", value_parser = server_address)]
    pub target: Option<SocketAddr>,

    /// The process id of the `--target` usher, for its RSS, descriptors and threads.
    #[arg(long, env = "USHER_SOAK_USHER_PID")]
    pub usher_pid: Option<u32>,

    /// The store of the usher soak starts: `memory` or `redis://host:port` (its keys
    /// under a prefix of this run's own, deleted at the end).
    #[arg(long, env = "USHER_SOAK_STORE", default_value = "memory")]
    pub store: String,

    /// The Redis the soaked usher uses, to count its keys. Defaults to `--store` when
    /// that is Redis.
    #[arg(long, env = "USHER_SOAK_REDIS")]
    pub redis: Option<String>,

    /// The `--redis-key-prefix` of the `--target` usher.
    #[arg(long, env = "USHER_SOAK_REDIS_KEY_PREFIX", default_value = "usher")]
    pub redis_key_prefix: String,

    /// Where the `--target` usher serves its metrics, for its task count (default:
    /// `/metrics` on its own port; give this when it runs with `--metrics-listen`).
    #[arg(long, env = "USHER_SOAK_METRICS_URL")]
    pub metrics_url: Option<String>,

    /// How long the churn runs.
    #[arg(long, env = "USHER_SOAK_DURATION", default_value = "10m", value_parser = duration)]
    pub duration: Duration,

    /// Devices playing at once, two per user.
    #[arg(long, env = "USHER_SOAK_DEVICES", default_value_t = 200)]
    pub devices: usize,

    /// The seat limit of the usher soak starts.
    #[arg(long, env = "USHER_SOAK_SEAT_LIMIT", default_value_t = 2)]
    pub seat_limit: u32,

    /// A play lasts at least this long.
    #[arg(long, env = "USHER_SOAK_PLAY_MIN", default_value = "2s", value_parser = duration)]
    pub play_min: Duration,

    /// A play lasts at most this long.
    #[arg(long, env = "USHER_SOAK_PLAY_MAX", default_value = "20s", value_parser = duration)]
    pub play_max: Duration,

    /// The share of plays that end with the device vanishing (no stop: the seat
    /// expires) instead of stopping.
    #[arg(long, env = "USHER_SOAK_VANISH", default_value_t = 0.25)]
    pub vanish: f64,

    /// Users whose calls are recorded at once (three clients each) and checked for
    /// linearizability, 40 calls per client a segment.
    #[arg(long, env = "USHER_SOAK_HISTORY_USERS", default_value_t = 2)]
    pub history_users: usize,

    /// How long to wait, before and after the churn, for every seat and record to drain.
    #[arg(long, env = "USHER_SOAK_DRAIN_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// A JSON line with the figures on standard error this often during the churn.
    #[arg(long, env = "USHER_SOAK_REPORT_EVERY", default_value = "30s", value_parser = duration)]
    pub report_every: Duration,

    /// A service key (`Bearer` credential with the admin role) for a `--target` that
    /// requires credentials; devices use the playback tokens their creates return.
    #[arg(long, env = "USHER_SOAK_SERVICE_KEY")]
    pub service_key: Option<String>,

    /// Allow a target or Redis that is not on loopback.
    #[arg(long, env = "USHER_SOAK_ALLOW_REMOTE")]
    pub allow_remote: bool,

    /// Print one JSON document instead of the table.
    #[arg(long, env = "USHER_SOAK_JSON")]
    pub json: bool,
}

/// `usher device` flags.
#[derive(Clone, Debug, Args)]
pub struct DeviceArgs {
    /// The server.
    #[arg(long, env = "USHER_DEVICE_ADDR", default_value = "127.0.0.1:50051", value_parser = server_address)]
    pub addr: SocketAddr,

    /// The session's playback token (CreateSession's playback_token).
    #[arg(long, env = "USHER_DEVICE_TOKEN")]
    pub token: String,

    /// The playback position to start at.
    #[arg(long, env = "USHER_DEVICE_POSITION", default_value = "0s", value_parser = duration)]
    pub position: Duration,

    /// Heartbeat at this interval instead of the one usher acknowledges with.
    #[arg(long, env = "USHER_DEVICE_INTERVAL", value_parser = duration)]
    pub interval: Option<Duration>,

    /// Send stop after this long (the seat is released at once).
    #[arg(long, env = "USHER_DEVICE_STOP_AFTER", value_parser = duration)]
    pub stop_after: Option<Duration>,

    /// Report the player as paused in every heartbeat.
    #[arg(long, env = "USHER_DEVICE_PAUSED")]
    pub paused: bool,

    /// The title's duration, reported with every heartbeat and the stop, so usher can
    /// mark the title completed.
    #[arg(long, env = "USHER_DEVICE_DURATION", value_parser = duration)]
    pub duration: Option<Duration>,

    /// For a TLS listener: the CA (PEM) that signed the server's certificate.
    #[arg(long, env = "USHER_DEVICE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// For a TLS listener: the name the server's certificate is for.
    #[arg(long, env = "USHER_DEVICE_TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new key set with one active key.
    Generate(KeysGenerateArgs),
    /// Add a new active key to a key set; the old one keeps verifying until its tokens
    /// have expired, then a later rotation removes it.
    Rotate(KeysRotateArgs),
}

#[derive(Clone, Debug, Args)]
pub struct KeysGenerateArgs {
    /// Where to write the key set (JSON, mode 0600).
    #[arg(long, env = "USHER_KEYS_OUT")]
    pub out: PathBuf,
    /// The signing algorithm.
    #[arg(
        long,
        env = "USHER_KEYS_ALGORITHM",
        value_enum,
        default_value = "eddsa"
    )]
    pub algorithm: KeyAlgorithm,
    /// Replace an existing file.
    #[arg(long, env = "USHER_KEYS_FORCE")]
    pub force: bool,
}

#[derive(Clone, Debug, Args)]
pub struct KeysRotateArgs {
    /// The key set to rotate, in place.
    #[arg(long, env = "USHER_KEYS_FILE")]
    pub file: PathBuf,
    /// The algorithm of the new key.
    #[arg(
        long,
        env = "USHER_KEYS_ALGORITHM",
        value_enum,
        default_value = "eddsa"
    )]
    pub algorithm: KeyAlgorithm,
    /// Remove keys retired longer ago than this; keep it above the token TTL plus the
    /// refresh grace.
    #[arg(long, env = "USHER_KEYS_KEEP_RETIRED", default_value = "1h", value_parser = duration)]
    pub keep_retired: Duration,
}

/// `usher health` flags.
#[derive(Clone, Debug, Args)]
pub struct HealthArgs {
    /// The server to ask.
    #[arg(long, env = "USHER_HEALTH_ADDR", default_value = "127.0.0.1:50051", value_parser = server_address)]
    pub addr: SocketAddr,

    /// The service to ask about; empty for the server as a whole.
    #[arg(long, env = "USHER_HEALTH_SERVICE", default_value = "")]
    pub service: String,

    /// Give up after this long.
    #[arg(long, env = "USHER_HEALTH_TIMEOUT", default_value = "3s", value_parser = duration)]
    pub timeout: Duration,

    /// For a TLS listener: the CA (PEM) that signed the server's certificate.
    #[arg(long, env = "USHER_HEALTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// For a TLS listener: the name the server's certificate is for.
    #[arg(long, env = "USHER_HEALTH_TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,
}

/// The command-line names of the domain's enums: clap stays here, so no other module
/// derives a CLI trait. Each entry is `Type { Variant => "name": "help", ... }`.
macro_rules! cli_values {
    ($($type:ty { $($variant:ident => $name:literal : $help:literal),* $(,)? })*) => {
        $(
            impl ValueEnum for $type {
                fn value_variants<'a>() -> &'a [Self] {
                    &[$(<$type>::$variant),*]
                }

                fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                    Some(match self {
                        $(<$type>::$variant => {
                            clap::builder::PossibleValue::new($name).help($help)
                        })*
                    })
                }
            }
        )*
    };
}

cli_values! {
    OverLimitPolicy {
        RejectNew => "reject-new": "refuse the new session with CONCURRENCY_LIMIT_REACHED",
        StopOldest => "stop-oldest": "evict the least recently started session to make room",
    }
    HeartbeatEvents {
        Off => "off": "no playback.heartbeat events",
        Sampled => "sampled": "at most one per session per --heartbeat-event-interval",
        All => "all": "one per heartbeat",
    }
    MissingRegion {
        Refuse => "refuse": "refused with REGION_REQUIRED (fail closed)",
        Allow => "allow": "allowed, as if the viewer were in an allowed region",
    }
    KeyAlgorithm {
        Eddsa => "eddsa": "Ed25519: the default; verifiable offline from the public JWKS",
        Hs256 => "hs256": "HMAC-SHA256 with a shared secret, for verifiers that share it",
    }
    LogFormat {
        Pretty => "pretty": "for people: one coloured line per event with its spans",
        Json => "json": "for machines: one JSON object per line, span fields included",
    }
}

fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 20s, 5m, 24h)"))
}

/// A server to call: `host:port` (a name is resolved, its first address taken),
/// `[v6]:port`, with or without `http://`.
fn server_address(value: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let bare = value.strip_prefix("http://").unwrap_or(value);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    let hint = "host:port, e.g. 127.0.0.1:50051, localhost:50051 or [::1]:50051";
    bare.to_socket_addrs()
        .map_err(|e| format!("{e} ({hint})"))?
        .next()
        .ok_or_else(|| format!("{bare} has no address ({hint})"))
}

/// `usher serve` flags.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "USHER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// `memory` (embedded, nothing to install), `redis://host:port`,
    /// `redis-sentinel://host:port?sentinelServiceName=NAME` (the primary Sentinel names,
    /// followed through failovers), or `redis-cluster://host1:port1,host2:port2`.
    #[arg(long, env = "USHER_STORE", default_value = "memory")]
    pub store: String,

    /// Prefix of every Redis key.
    #[arg(long, env = "USHER_REDIS_KEY_PREFIX", default_value = "usher")]
    pub redis_key_prefix: String,

    /// Run on a Redis whose maxmemory-policy may evict keys. Without it usher refuses to
    /// start unless the policy is noeviction: an evicted seat breaks the seat limit.
    #[arg(long, env = "USHER_REDIS_ALLOW_EVICTION")]
    pub redis_allow_eviction: bool,

    /// Embedded store: most session records kept, live and ended; past it the oldest
    /// ended are forgotten first, and when live sessions alone fill it creates are
    /// refused with RESOURCE_EXHAUSTED / STORE_FULL.
    #[arg(long, env = "USHER_MEMORY_MAX_SESSIONS", default_value_t = DEFAULT_MEMORY_MAX_SESSIONS)]
    pub memory_max_sessions: usize,

    /// Embedded store: most users kept; past it the longest-idle users are forgotten.
    #[arg(long, env = "USHER_MEMORY_MAX_USERS", default_value_t = DEFAULT_MEMORY_MAX_USERS)]
    pub memory_max_users: usize,

    /// A store call with no answer within this fails with UNAVAILABLE.
    #[arg(long, env = "USHER_STORE_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub store_timeout: Duration,

    /// Partitions (hash tags) users are spread over. Changing it needs a migration.
    #[arg(long, env = "USHER_PARTITIONS", default_value_t = crate::store::DEFAULT_PARTITIONS)]
    pub partitions: u32,

    /// Seats of users with no plan in the entitlement file, 0 to 100 [default: the
    /// file's default_seat_limit, or 2 without one]
    #[arg(long, env = "USHER_DEFAULT_SEAT_LIMIT")]
    pub default_seat_limit: Option<u32>,

    /// TOML entitlement policy: plans, users, content and region rules.
    #[arg(long, env = "USHER_ENTITLEMENTS")]
    pub entitlements: Option<PathBuf>,

    /// The identity service asked whether a user may play (`GET {url}/entitlements`,
    /// see docs/entitlement-http.md), after the static policy. [default: none]
    #[arg(long, env = "USHER_ENTITLEMENT_IDENTITY_URL")]
    pub entitlement_identity_url: Option<String>,

    /// The content service asked whether a title may play in a region (`GET
    /// {url}/availability`), after the static policy. [default: none]
    #[arg(long, env = "USHER_ENTITLEMENT_CONTENT_URL")]
    pub entitlement_content_url: Option<String>,

    /// Each attempt at an entitlement service waits at most this long (and never past
    /// the request's deadline).
    #[arg(long, env = "USHER_ENTITLEMENT_TIMEOUT", default_value = "250ms", value_parser = duration)]
    pub entitlement_timeout: Duration,

    /// Further attempts after a failure that is safe to repeat (no connection, HTTP
    /// 502/503/504), with jittered backoff; 0 to 5.
    #[arg(long, env = "USHER_ENTITLEMENT_RETRIES", default_value_t = 1)]
    pub entitlement_retries: u32,

    /// How long an allowing answer is cached, unless the service's Cache-Control
    /// max-age says otherwise.
    #[arg(long, env = "USHER_ENTITLEMENT_CACHE_TTL", default_value = "5m", value_parser = duration)]
    pub entitlement_cache_ttl: Duration,

    /// How long a refusal is cached, unless the service's Cache-Control max-age says
    /// otherwise.
    #[arg(long, env = "USHER_ENTITLEMENT_NEGATIVE_TTL", default_value = "30s", value_parser = duration)]
    pub entitlement_negative_ttl: Duration,

    /// Answers cached per entitlement service.
    #[arg(long, env = "USHER_ENTITLEMENT_CACHE_SIZE", default_value_t = 100_000)]
    pub entitlement_cache_size: u64,

    /// Consecutive failures that open an entitlement service's circuit breaker (calls
    /// then fail fast); 0 never opens it.
    #[arg(long, env = "USHER_ENTITLEMENT_BREAKER_FAILURES", default_value_t = 5)]
    pub entitlement_breaker_failures: u32,

    /// How long an open breaker fails calls before one probe goes through.
    #[arg(long, env = "USHER_ENTITLEMENT_BREAKER_COOLDOWN", default_value = "5s", value_parser = duration)]
    pub entitlement_breaker_cooldown: Duration,

    /// When an entitlement service cannot answer: `fail-closed` (UNAVAILABLE,
    /// ENTITLEMENT_UNAVAILABLE) or `serve-stale` (its last answer, up to
    /// --entitlement-max-stale old).
    #[arg(
        long,
        env = "USHER_ENTITLEMENT_DEGRADED",
        value_enum,
        default_value = "fail-closed"
    )]
    pub entitlement_degraded: DegradedMode,

    /// The oldest answer serve-stale serves.
    #[arg(long, env = "USHER_ENTITLEMENT_MAX_STALE", default_value = "15m", value_parser = duration)]
    pub entitlement_max_stale: Duration,

    /// A streaming session's entitlement is asked again this often, with a fresh token
    /// [default: at each token push; unary sessions at each RefreshToken]
    #[arg(long, env = "USHER_ENTITLEMENT_RECHECK_INTERVAL", value_parser = duration)]
    pub entitlement_recheck_interval: Option<Duration>,

    /// TOML file of manifest origins (S3 presigned GETs or HMAC edge tokens, per title
    /// prefix): CreateSession and GetManifest then return signed manifest URLs. [default:
    /// none, no manifest URLs]
    #[arg(long, env = "USHER_MANIFEST_ORIGINS")]
    pub manifest_origins: Option<PathBuf>,

    /// A title stopped before this fraction of its duration resumes from the start.
    #[arg(long, env = "USHER_RESUME_MIN_FRACTION", default_value_t = 0.05)]
    pub resume_min_fraction: f64,

    /// Past this fraction of its duration a title is finished: marked completed, and
    /// started from the beginning next time.
    #[arg(long, env = "USHER_RESUME_COMPLETE_FRACTION", default_value_t = 0.90)]
    pub resume_complete_fraction: f64,

    /// Within this much of its end (the credits) a title is finished too.
    #[arg(long, env = "USHER_RESUME_CREDITS", default_value = "0s", value_parser = duration)]
    pub resume_credits: Duration,

    /// Titles shorter than this always start from the beginning.
    #[arg(long, env = "USHER_RESUME_MIN_DURATION", default_value = "5m", value_parser = duration)]
    pub resume_min_duration: Duration,

    /// A session's heartbeats write its title's progress at most once per this; pauses
    /// and stops always write.
    #[arg(long, env = "USHER_PROGRESS_WRITE_INTERVAL", default_value = "60s", value_parser = duration)]
    pub progress_write_interval: Duration,

    /// A profile's watch progress is forgotten this long after its last write.
    #[arg(long, env = "USHER_PROGRESS_RETENTION", default_value = "365d", value_parser = duration)]
    pub progress_retention: Duration,

    /// A profile keeps the progress of at most this many titles (its "continue
    /// watching" row); a new title beyond drops the least recently written.
    #[arg(long, env = "USHER_PROGRESS_CAP", default_value_t = 200)]
    pub progress_cap: u32,

    /// How long a signed manifest URL works.
    #[arg(long, env = "USHER_MANIFEST_URL_TTL", default_value = "5m", value_parser = duration)]
    pub manifest_url_ttl: Duration,

    /// A create for a region-restricted title that gives no client.region: `refuse`
    /// (REGION_REQUIRED) or `allow`.
    #[arg(
        long,
        env = "USHER_MISSING_REGION",
        value_enum,
        default_value = "refuse"
    )]
    pub missing_region: MissingRegion,

    /// How fast one user may create sessions: `N/s`, `N/m`, `N/h`, or `off`. A plan in
    /// the entitlement policy may set its own.
    #[arg(long, env = "USHER_CREATE_RATE", default_value = "30/m")]
    pub create_rate: String,

    /// How many creates a user may make at once before --create-rate applies, 1 to 1000.
    #[arg(long, env = "USHER_CREATE_BURST", default_value_t = 10)]
    pub create_burst: u32,

    /// What a create over the limit does.
    #[arg(
        long,
        env = "USHER_OVER_LIMIT_POLICY",
        value_enum,
        default_value = "reject-new"
    )]
    pub over_limit_policy: OverLimitPolicy,

    /// How often devices are told to heartbeat.
    #[arg(long, env = "USHER_HEARTBEAT_INTERVAL", default_value = "20s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// A session that has not heartbeated for this long expires.
    #[arg(long, env = "USHER_HEARTBEAT_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub heartbeat_timeout: Duration,

    /// A paused session expires this long after its pause began.
    #[arg(long, env = "USHER_MAX_PAUSE", default_value = "30m", value_parser = duration)]
    pub max_pause: Duration,

    /// Which heartbeats append a playback.heartbeat event.
    #[arg(
        long,
        env = "USHER_HEARTBEAT_EVENTS",
        value_enum,
        default_value = "sampled"
    )]
    pub heartbeat_events: HeartbeatEvents,

    /// With sampled heartbeat events: at most one per session per this interval.
    #[arg(long, env = "USHER_HEARTBEAT_EVENT_INTERVAL", default_value = "5m", value_parser = duration)]
    pub heartbeat_event_interval: Duration,

    /// How long ended sessions stay readable.
    #[arg(long, env = "USHER_ENDED_RETENTION", default_value = "24h", value_parser = duration)]
    pub ended_retention: Duration,

    /// How long a CreateSession request_id is remembered.
    #[arg(long, env = "USHER_REQUEST_ID_TTL", default_value = "24h", value_parser = duration)]
    pub request_id_ttl: Duration,

    /// Approximate cap of each partition's event stream.
    #[arg(long, env = "USHER_EVENT_STREAM_MAXLEN", default_value_t = 100_000)]
    pub event_stream_maxlen: u64,

    /// How often expired sessions are swept.
    #[arg(long, env = "USHER_SWEEP_INTERVAL", default_value = "1s", value_parser = duration)]
    pub sweep_interval: Duration,

    /// Upper bound of any request (a client's shorter grpc-timeout wins).
    #[arg(long, env = "USHER_REQUEST_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub request_timeout: Duration,

    /// Largest request or response message, in bytes.
    #[arg(long, env = "USHER_MAX_MESSAGE_SIZE", default_value_t = 1024 * 1024)]
    pub max_message_size: usize,

    /// Most open client connections; past it new connections are closed at once (and
    /// logged), so a flood cannot exhaust file descriptors.
    #[arg(long, env = "USHER_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// A connection that has not completed its handshake (TLS, and the HTTP/2 preface)
    /// within this is closed.
    #[arg(long, env = "USHER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// Most grpc.health.v1.Health/Watch streams open at once on this instance.
    #[arg(long, env = "USHER_MAX_HEALTH_WATCHES", default_value_t = 1024)]
    pub max_health_watches: usize,

    /// Most grpc.health.v1.Health/Watch streams open at once on one connection.
    #[arg(
        long,
        env = "USHER_MAX_HEALTH_WATCHES_PER_CONNECTION",
        default_value_t = 4
    )]
    pub max_health_watches_per_connection: usize,

    /// Most device streams (StreamingService) open at once on this instance.
    #[arg(long, env = "USHER_MAX_STREAMS", default_value_t = 100_000)]
    pub max_streams: usize,

    /// Most device streams open at once on one connection.
    #[arg(
        long,
        env = "USHER_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1_000
    )]
    pub max_streams_per_connection: usize,

    /// A device stream writes to the store at most once per this interval: faster
    /// heartbeats are acknowledged and their latest position and state written later.
    #[arg(long, env = "USHER_STREAM_MIN_WRITE_INTERVAL", default_value = "1s", value_parser = duration)]
    pub stream_min_write_interval: Duration,

    /// A device stream gets a fresh playback token this long before its token expires
    /// (shorter than --token-ttl).
    #[arg(long, env = "USHER_TOKEN_PUSH_BEFORE", default_value = "2m", value_parser = duration)]
    pub token_push_before: Duration,

    /// On SIGINT/SIGTERM device streams are told to reconnect after a delay spread at
    /// random over this window, so they do not all arrive at once elsewhere.
    #[arg(long, env = "USHER_RECONNECT_SPREAD", default_value = "5s", value_parser = duration)]
    pub reconnect_spread: Duration,

    /// HTTP/2 concurrent streams per connection.
    #[arg(long, env = "USHER_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,

    /// HTTP/2 streams a client may open and reset before they are served; past it the
    /// connection is closed (the rapid-reset attack, CVE-2023-44487).
    #[arg(long, env = "USHER_HTTP2_MAX_PENDING_RESETS", default_value_t = 20)]
    pub http2_max_pending_resets: usize,

    /// HTTP/2 streams usher may reset for a client's protocol errors before it closes
    /// the connection.
    #[arg(long, env = "USHER_HTTP2_MAX_ERROR_RESETS", default_value_t = 1024)]
    pub http2_max_error_resets: usize,

    /// The largest HTTP/2 header list accepted, bytes; a larger one (or a CONTINUATION
    /// flood) closes the connection.
    #[arg(
        long,
        env = "USHER_HTTP2_MAX_HEADER_LIST_SIZE",
        default_value_t = 16384
    )]
    pub http2_max_header_list_size: u32,

    /// HTTP/2 PING, SETTINGS and PRIORITY frames a connection may send per second, on
    /// average (0: no limit); past its budget the connection is closed (PING and
    /// SETTINGS floods).
    #[arg(long, env = "USHER_HTTP2_CONTROL_FRAME_RATE", default_value_t = 100)]
    pub http2_control_frame_rate: u32,

    /// The control frames a connection may send at once before the rate applies.
    #[arg(long, env = "USHER_HTTP2_CONTROL_FRAME_BURST", default_value_t = 1000)]
    pub http2_control_frame_burst: u32,

    /// HTTP/2 keepalive ping interval.
    #[arg(long, env = "USHER_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub keepalive_interval: Duration,

    /// HTTP/2 keepalive ping timeout.
    #[arg(long, env = "USHER_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub keepalive_timeout: Duration,

    /// On SIGINT/SIGTERM, report NOT_SERVING for this long before closing the listener,
    /// so load balancers stop sending traffic first.
    #[arg(long, env = "USHER_DRAIN_DELAY", default_value = "2s", value_parser = duration)]
    pub drain_delay: Duration,

    /// After the drain delay, wait at most this long for calls in flight. With the drain
    /// delay it stays under Docker's and Kubernetes' 10 s and 30 s stop timeouts.
    #[arg(long, env = "USHER_SHUTDOWN_TIMEOUT", default_value = "7s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// Token signing key set: a JSON file or a directory of them (`usher keys
    /// generate`). Without it, an ephemeral key is made at start.
    #[arg(long, env = "USHER_TOKEN_KEYS")]
    pub token_keys: Option<PathBuf>,

    /// `iss` of issued tokens, and the only one accepted.
    #[arg(long, env = "USHER_TOKEN_ISSUER", default_value = "usher")]
    pub token_issuer: String,

    /// `aud` of issued tokens, and the only one accepted.
    #[arg(long, env = "USHER_TOKEN_AUDIENCE", default_value = "usher-playback")]
    pub token_audience: String,

    /// Lifetime of a playback token.
    #[arg(long, env = "USHER_TOKEN_TTL", default_value = "15m", value_parser = duration)]
    pub token_ttl: Duration,

    /// Tolerated clock difference for exp, nbf and iat (at most 30s).
    #[arg(long, env = "USHER_TOKEN_LEEWAY", default_value = "10s", value_parser = duration)]
    pub token_leeway: Duration,

    /// How long after exp a token may still be refreshed.
    #[arg(long, env = "USHER_TOKEN_REFRESH_GRACE", default_value = "5m", value_parser = duration)]
    pub token_refresh_grace: Duration,

    /// Verified tokens cached.
    #[arg(long, env = "USHER_TOKEN_CACHE_SIZE", default_value_t = 100_000)]
    pub token_cache_size: u64,

    /// How often the key set is checked for changes (SIGHUP reloads at once).
    #[arg(long, env = "USHER_TOKEN_KEYS_RELOAD_INTERVAL", default_value = "5s", value_parser = duration)]
    pub token_keys_reload_interval: Duration,

    /// Service credentials (TOML): bearer keys and client certificate subjects, with roles.
    #[arg(long, env = "USHER_CREDENTIALS")]
    pub credentials: Option<PathBuf>,

    /// Development only: calls without credentials are allowed (internal calls as admin,
    /// device calls without a token). Refuses to listen on a non-loopback address.
    #[arg(long, env = "USHER_INSECURE_DEV")]
    pub insecure_dev: bool,

    /// Serve `GET /metrics` on this address instead of on the main listener (which then
    /// answers 404 for it), so the metrics need not be public.
    #[arg(long, env = "USHER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// An origin (`https://player.example.com`) whose browser pages may call the REST
    /// routes (CORS); repeat the flag, or comma-separate in the variable. None by default.
    #[arg(long, env = "USHER_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// TLS certificate chain (PEM) of the gRPC listener.
    #[arg(long, env = "USHER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of the gRPC listener.
    #[arg(long, env = "USHER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) whose client certificates are accepted (mutual TLS); their subjects are
    /// matched in the credentials file.
    #[arg(long, env = "USHER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "USHER_LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "USHER_LOG", default_value = "info")]
    pub log: String,

    /// Export the spans of calls and store operations to this OpenTelemetry collector,
    /// over OTLP/gRPC (`http://127.0.0.1:4317`). Off by default. Batching follows the
    /// standard `OTEL_BSP_*` variables; the service name is `usher` unless
    /// `OTEL_SERVICE_NAME` is set.
    #[arg(long, env = "USHER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Deliver every event, at least once, to this sink: `nats://host:port` (NATS
    /// JetStream; stream USHER_EVENTS, subjects usher.events.<type>) or
    /// `postgres://user@host:port/database` (the session history; usher applies its
    /// migrations at start). Repeat (or comma-separate) for more. [default: none]
    #[arg(long, env = "USHER_RELAY", value_delimiter = ',')]
    pub relay: Vec<String>,

    /// The CloudEvents `source` of relayed events: names this deployment.
    #[arg(long, env = "USHER_RELAY_SOURCE", default_value = "usher")]
    pub relay_source: String,

    /// A relayed batch its sink has not confirmed within this is delivered again, by
    /// whichever relay reads next (one on another instance, after a crash).
    #[arg(long, env = "USHER_RELAY_CLAIM_AFTER", default_value = "30s", value_parser = duration)]
    pub relay_claim_after: Duration,
}

/// Where state is kept.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    Memory,
    Redis(RedisOptions),
}

/// Everything `usher serve` needs, checked.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreConfig,
    pub store_settings: StoreSettings,
    pub memory_limits: MemoryLimits,
    pub default_seat_limit: Option<u32>,
    pub missing_region: MissingRegion,
    pub entitlements: Option<PathBuf>,
    /// The HTTP entitlement services, when any is configured.
    pub entitlement_http: Option<HttpSettings>,
    pub manifest_origins: Option<PathBuf>,
    pub manifest_url_ttl: Duration,
    pub resume: ResumeRules,
    pub over_limit_policy: OverLimitPolicy,
    /// The create rate limit per user; `None`: off.
    pub create_rate: Option<RateLimit>,
    pub heartbeat_interval: Duration,
    pub sweep_interval: Duration,
    pub limits: ServerLimits,
    pub streams: StreamSettings,
    pub tokens: TokenSettings,
    pub credentials: Option<PathBuf>,
    pub insecure_dev: bool,
    pub cors_origins: Vec<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub log_format: LogFormat,
    pub log: String,
    pub otlp_endpoint: Option<String>,
    pub relay: RelayConfig,
}

/// The relay's sinks and how it runs (`--relay`).
#[derive(Clone, Debug, Default)]
pub struct RelayConfig {
    /// `nats://host:port` and `postgres://...` URLs.
    pub sinks: Vec<String>,
    pub source: String,
    pub claim_after: Duration,
}

/// The listener's TLS material.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Transport limits of the gRPC listener.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// HTTP/2 control frames per connection; `None`: no limit.
    pub http2_control_frames: Option<crate::net::FrameBudget>,
    pub max_health_watches: usize,
    pub max_health_watches_per_connection: usize,
    pub max_message_size: usize,
    pub max_concurrent_streams: u32,
    pub http2_max_pending_resets: usize,
    pub http2_max_error_resets: usize,
    pub http2_max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
}

/// A flag (or a combination of flags) that does not make a valid configuration: the flag
/// and what is wrong with its value, so the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(flag: &'static str, problem: impl Into<String>) -> Self {
        Self {
            flag,
            problem: problem.into(),
        }
    }
}

fn parse_host_port(value: &str) -> Result<(String, u16), ConfigError> {
    let bad = |problem: &str| ConfigError::new("--store", format!("{value:?} {problem}"));
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| bad("is not host:port"))?;
    let port = port.parse().map_err(|_| bad("has no valid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((host.to_owned(), port))
}

/// `memory`, `redis://…`, `rediss://…`, `redis-sentinel://…`, `rediss-sentinel://…` or
/// `redis-cluster://h1:p1,h2:p2`.
pub fn parse_store(
    value: &str,
    key_prefix: &str,
    timeout: Duration,
    allow_eviction: bool,
) -> Result<StoreConfig, ConfigError> {
    let options = |target| {
        StoreConfig::Redis(RedisOptions {
            target,
            key_prefix: key_prefix.to_owned(),
            timeout,
            allow_eviction,
            resubscribe_interval: crate::store::redis::RESUBSCRIBE_INTERVAL,
        })
    };
    if value == "memory" {
        return Ok(StoreConfig::Memory);
    }
    if let Some(nodes) = value.strip_prefix("redis-cluster://") {
        let nodes = nodes
            .split(',')
            .map(parse_host_port)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(options(RedisTarget::Cluster { nodes }));
    }
    if value.starts_with("redis-sentinel://") || value.starts_with("rediss-sentinel://") {
        // fred reads the URL: the sentinels (the host and every `node=`), the primary's
        // name (`sentinelServiceName`), credentials and database.
        fred::types::config::Config::from_url(value)
            .map_err(|e| ConfigError::new("--store", format!("{value:?}: {}", e.details())))?;
        return Ok(options(RedisTarget::Sentinel {
            url: value.to_owned(),
        }));
    }
    if value.starts_with("redis://") || value.starts_with("rediss://") {
        return Ok(options(RedisTarget::Single {
            url: value.to_owned(),
        }));
    }
    Err(ConfigError::new(
        "--store",
        format!(
            "{value:?}: expected memory, redis://host:port, \
             redis-sentinel://host:port?sentinelServiceName=NAME or \
             redis-cluster://host:port,host:port"
        ),
    ))
}

impl ServeArgs {
    /// The HTTP entitlement provider's settings, when a service URL is given.
    fn entitlement_http(&self) -> Result<Option<HttpSettings>, ConfigError> {
        let url = |flag: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|value| {
                    service_url(flag, value).map_err(|problem| ConfigError::new(flag, problem))
                })
                .transpose()
        };
        let identity_url = url("--entitlement-identity-url", &self.entitlement_identity_url)?;
        let content_url = url("--entitlement-content-url", &self.entitlement_content_url)?;
        let positive = [
            ("--entitlement-timeout", self.entitlement_timeout),
            (
                "--entitlement-breaker-cooldown",
                self.entitlement_breaker_cooldown,
            ),
            ("--entitlement-max-stale", self.entitlement_max_stale),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::new(flag, "must be more than 0"));
        }
        if self.entitlement_retries > 5 {
            return Err(ConfigError::new(
                "--entitlement-retries",
                "must be at most 5",
            ));
        }
        if self.entitlement_cache_size == 0 {
            return Err(ConfigError::new(
                "--entitlement-cache-size",
                "must be more than 0",
            ));
        }
        if self
            .entitlement_recheck_interval
            .is_some_and(|every| every < Duration::from_secs(1))
        {
            return Err(ConfigError::new(
                "--entitlement-recheck-interval",
                "must be at least 1s",
            ));
        }
        if identity_url.is_none() && content_url.is_none() {
            return Ok(None);
        }
        Ok(Some(HttpSettings {
            identity_url,
            content_url,
            timeout: self.entitlement_timeout,
            retries: self.entitlement_retries,
            positive_ttl: self.entitlement_cache_ttl,
            negative_ttl: self.entitlement_negative_ttl,
            cache_size: self.entitlement_cache_size,
            breaker_failures: self.entitlement_breaker_failures,
            breaker_cooldown: self.entitlement_breaker_cooldown,
            degraded: self.entitlement_degraded,
            max_stale: self.entitlement_max_stale,
        }))
    }

    /// Checks the flags together and builds the typed config. Errors name the flag.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let positive = [
            ("--heartbeat-interval", self.heartbeat_interval),
            ("--heartbeat-timeout", self.heartbeat_timeout),
            ("--max-pause", self.max_pause),
            ("--store-timeout", self.store_timeout),
            ("--sweep-interval", self.sweep_interval),
            ("--request-timeout", self.request_timeout),
            ("--ended-retention", self.ended_retention),
            ("--request-id-ttl", self.request_id_ttl),
            ("--token-ttl", self.token_ttl),
            ("--manifest-url-ttl", self.manifest_url_ttl),
            ("--progress-write-interval", self.progress_write_interval),
            ("--progress-retention", self.progress_retention),
            (
                "--token-keys-reload-interval",
                self.token_keys_reload_interval,
            ),
        ];
        for (flag, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::new(flag, "must be more than 0"));
            }
        }
        for (flag, fraction) in [
            ("--resume-min-fraction", self.resume_min_fraction),
            ("--resume-complete-fraction", self.resume_complete_fraction),
        ] {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(ConfigError::new(flag, "must be between 0 and 1"));
            }
        }
        if self.resume_min_fraction >= self.resume_complete_fraction {
            return Err(ConfigError::new(
                "--resume-min-fraction",
                "must be below --resume-complete-fraction",
            ));
        }
        if self.progress_cap == 0 {
            return Err(ConfigError::new("--progress-cap", "must be at least 1"));
        }
        if self.heartbeat_interval >= self.heartbeat_timeout {
            return Err(ConfigError::new(
                "--heartbeat-interval",
                "must be shorter than --heartbeat-timeout",
            ));
        }
        for origin in &self.cors_origin {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            if rest.is_none_or(|host| host.is_empty() || host.contains(['/', '*', ' '])) {
                return Err(ConfigError::new(
                    "--cors-origin",
                    format!("{origin:?} is not an origin like https://player.example.com"),
                ));
            }
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let host = endpoint
                .strip_prefix("http://")
                .map(|rest| rest.trim_end_matches('/'));
            if host.is_none_or(|host| host.is_empty() || host.contains(['/', ' '])) {
                return Err(ConfigError::new(
                    "--otlp-endpoint",
                    format!(
                        "{endpoint:?} is not a collector's OTLP/gRPC address like \
                         http://127.0.0.1:4317 (plain gRPC: run the collector beside usher)"
                    ),
                ));
            }
        }
        for sink in &self.relay {
            let nats = sink
                .strip_prefix("nats://")
                .is_some_and(|host| !host.is_empty() && !host.contains(['/', ' ']));
            let postgres = ["postgres://", "postgresql://"].iter().any(|scheme| {
                sink.strip_prefix(scheme)
                    .is_some_and(|rest| !rest.is_empty())
            });
            if !nats && !postgres {
                return Err(ConfigError::new(
                    "--relay",
                    format!(
                        "{sink:?} is not a sink usher relays to: nats://host:port or \
                         postgres://user@host:port/database"
                    ),
                ));
            }
        }
        let window = crate::relay::nats::DUPLICATE_WINDOW;
        if self.relay_claim_after.is_zero() || self.relay_claim_after >= window {
            return Err(ConfigError::new(
                "--relay-claim-after",
                format!(
                    "must be more than 0 and less than JetStream's duplicate window ({}s)",
                    window.as_secs()
                ),
            ));
        }
        if self.token_push_before >= self.token_ttl {
            return Err(ConfigError::new(
                "--token-push-before",
                "must be shorter than --token-ttl",
            ));
        }
        if self.ended_retention < self.request_id_ttl {
            // A replayed request_id must find its session's record.
            return Err(ConfigError::new(
                "--ended-retention",
                "must be at least --request-id-ttl",
            ));
        }
        if self.store_timeout >= self.request_timeout {
            return Err(ConfigError::new(
                "--store-timeout",
                "must be shorter than --request-timeout",
            ));
        }
        if !(1..=16384).contains(&self.partitions) {
            return Err(ConfigError::new(
                "--partitions",
                "must be between 1 and 16384",
            ));
        }
        if let Some(limit) = self.default_seat_limit
            && limit > MAX_SEAT_LIMIT
        {
            return Err(ConfigError::new(
                "--default-seat-limit",
                format!("must be at most {MAX_SEAT_LIMIT}"),
            ));
        }
        let entitlement_http = self.entitlement_http()?;
        let create_rate = RateLimit::parse(&self.create_rate, self.create_burst)
            .map_err(|problem| ConfigError::new("--create-rate", problem))?;
        if self.event_stream_maxlen == 0 {
            return Err(ConfigError::new(
                "--event-stream-maxlen",
                "must be more than 0",
            ));
        }
        if self.redis_key_prefix.is_empty()
            || !self
                .redis_key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(ConfigError::new(
                "--redis-key-prefix",
                "must be letters, digits, _ - or .",
            ));
        }
        // Token times are whole seconds (JWT NumericDate).
        if self.token_ttl < Duration::from_secs(1) || self.token_ttl.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "--token-ttl",
                "must be whole seconds, at least 1s",
            ));
        }
        if self.token_leeway > Duration::from_secs(30) {
            return Err(ConfigError::new("--token-leeway", "must be at most 30s"));
        }
        if self.token_issuer.is_empty() || self.token_audience.is_empty() {
            return Err(ConfigError::new(
                "--token-issuer",
                "and --token-audience must not be empty",
            ));
        }
        if self.insecure_dev && !self.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "--insecure-dev",
                format!(
                    "refuses to listen on {}: use a loopback address",
                    self.listen
                ),
            ));
        }
        let store = parse_store(
            &self.store,
            &self.redis_key_prefix,
            self.store_timeout,
            self.redis_allow_eviction,
        )?;
        let at_least_one = [
            ("--memory-max-sessions", self.memory_max_sessions),
            ("--memory-max-users", self.memory_max_users),
            ("--max-connections", self.max_connections),
            ("--max-health-watches", self.max_health_watches),
            ("--max-streams", self.max_streams),
            (
                "--max-streams-per-connection",
                self.max_streams_per_connection,
            ),
            (
                "--max-health-watches-per-connection",
                self.max_health_watches_per_connection,
            ),
        ];
        for (flag, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::new(flag, "must be at least 1"));
            }
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::new(
                "--handshake-timeout",
                "must be more than 0",
            ));
        }
        if self.http2_control_frame_rate > 0 && self.http2_control_frame_burst == 0 {
            return Err(ConfigError::new(
                "--http2-control-frame-burst",
                "must be at least 1 while --http2-control-frame-rate is on",
            ));
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            _ => None,
        };
        let resume = ResumeRules {
            min_fraction: self.resume_min_fraction,
            complete_fraction: self.resume_complete_fraction,
            credits: self.resume_credits,
            min_duration: self.resume_min_duration,
        };
        Ok(Config {
            listen: self.listen,
            store,
            store_settings: StoreSettings {
                partitions: self.partitions,
                heartbeat_timeout: self.heartbeat_timeout,
                max_pause: self.max_pause,
                ended_retention: self.ended_retention,
                request_id_ttl: self.request_id_ttl,
                heartbeat_events: self.heartbeat_events,
                heartbeat_event_interval: self.heartbeat_event_interval,
                event_stream_maxlen: self.event_stream_maxlen,
                progress_write_interval: self.progress_write_interval,
                progress_retention: self.progress_retention,
                progress_cap: self.progress_cap,
                resume,
                ..StoreSettings::default()
            },
            memory_limits: MemoryLimits {
                max_sessions: self.memory_max_sessions,
                max_users: self.memory_max_users,
            },
            default_seat_limit: self.default_seat_limit,
            missing_region: self.missing_region,
            entitlements: self.entitlements,
            entitlement_http,
            manifest_origins: self.manifest_origins,
            manifest_url_ttl: self.manifest_url_ttl,
            resume,
            over_limit_policy: self.over_limit_policy,
            create_rate,
            heartbeat_interval: self.heartbeat_interval,
            sweep_interval: self.sweep_interval,
            limits: ServerLimits {
                request_timeout: self.request_timeout,
                max_connections: self.max_connections,
                handshake_timeout: self.handshake_timeout,
                http2_control_frames: (self.http2_control_frame_rate > 0).then_some(
                    crate::net::FrameBudget {
                        per_second: self.http2_control_frame_rate,
                        burst: self.http2_control_frame_burst,
                    },
                ),
                max_health_watches: self.max_health_watches,
                max_health_watches_per_connection: self.max_health_watches_per_connection,
                max_message_size: self.max_message_size,
                max_concurrent_streams: self.max_concurrent_streams,
                http2_max_pending_resets: self.http2_max_pending_resets,
                http2_max_error_resets: self.http2_max_error_resets,
                http2_max_header_list_size: self.http2_max_header_list_size,
                keepalive_interval: self.keepalive_interval,
                keepalive_timeout: self.keepalive_timeout,
                drain_delay: self.drain_delay,
                shutdown_timeout: self.shutdown_timeout,
            },
            streams: StreamSettings {
                heartbeat_interval: self.heartbeat_interval,
                heartbeat_timeout: self.heartbeat_timeout,
                min_write_interval: self.stream_min_write_interval,
                max_streams: self.max_streams,
                max_streams_per_connection: self.max_streams_per_connection,
                token_push_before: self.token_push_before,
                reconnect_spread: self.reconnect_spread,
                call_timeout: self.request_timeout,
                entitlement_recheck: self.entitlement_recheck_interval,
            },
            tokens: TokenSettings {
                issuer: self.token_issuer,
                audience: self.token_audience,
                ttl: self.token_ttl,
                leeway: self.token_leeway,
                refresh_grace: self.token_refresh_grace,
                cache_capacity: self.token_cache_size,
                keys: self.token_keys,
                reload_interval: self.token_keys_reload_interval,
            },
            credentials: self.credentials,
            insecure_dev: self.insecure_dev,
            cors_origins: self.cors_origin,
            metrics_listen: self.metrics_listen,
            tls,
            log_format: self.log_format,
            log: self.log,
            otlp_endpoint: self.otlp_endpoint,
            relay: RelayConfig {
                sinks: self.relay,
                source: self.relay_source,
                claim_after: self.relay_claim_after,
            },
        })
    }
}

impl Config {
    /// The defaults of `usher serve` with no flags, for embedding and tests.
    pub fn defaults() -> Config {
        match Cli::parse_from(["usher", "serve"]).command {
            Command::Serve(args) => args
                .into_config()
                .unwrap_or_else(|e| unreachable!("the defaults are valid: {e}")),
            Command::Health(_)
            | Command::Keys(_)
            | Command::Device(_)
            | Command::Bench(_)
            | Command::Soak(_)
            | Command::Relay(_) => {
                unreachable!("parsed `usher serve`")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_to_call_may_be_named_and_may_carry_its_scheme() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 50051));
        assert_eq!(server_address("127.0.0.1:50051"), Ok(loopback));
        assert_eq!(server_address("http://127.0.0.1:50051/"), Ok(loopback));
        assert!(server_address("localhost:50051").is_ok_and(|addr| addr.ip().is_loopback()));
        assert_eq!(
            server_address("[::1]:7"),
            Ok(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7)))
        );
        for bad in ["localhost", "127.0.0.1", "https://127.0.0.1:50051", ""] {
            let error = server_address(bad).unwrap_err();
            assert!(error.contains("host:port"), "{bad}: {error}");
        }
        let Err(error) = Cli::try_parse_from(["usher", "bench", "--target", "localhost"]) else {
            panic!("a target without a port is refused");
        };
        assert!(error.to_string().contains("--target"), "{error}");
    }

    fn serve(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["usher", "serve"];
        argv.extend(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Serve(args) => args.into_config().map_err(|e| e.to_string()),
            Command::Health(_)
            | Command::Keys(_)
            | Command::Device(_)
            | Command::Bench(_)
            | Command::Soak(_)
            | Command::Relay(_) => Err("parsed another command".into()),
        }
    }

    #[test]
    fn defaults_are_the_embedded_store_on_loopback() {
        let config = Config::defaults();
        assert!(matches!(config.store, StoreConfig::Memory));
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(
            config.store_settings.heartbeat_timeout,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn entitlement_services_are_checked_and_named() {
        assert!(serve(&[]).unwrap().entitlement_http.is_none());
        let http = serve(&[
            "--entitlement-identity-url",
            "http://identity.internal/v1",
            "--entitlement-degraded",
            "serve-stale",
            "--entitlement-cache-ttl",
            "1m",
        ])
        .unwrap()
        .entitlement_http
        .expect("an identity URL turns the HTTP provider on");
        assert_eq!(
            http.identity_url.unwrap().as_str(),
            "http://identity.internal/v1"
        );
        assert!(http.content_url.is_none());
        assert_eq!(http.degraded, DegradedMode::ServeStale);
        assert_eq!(http.positive_ttl, Duration::from_secs(60));
        assert_eq!(http.negative_ttl, Duration::from_secs(30));
        for (args, named) in [
            (
                &["--entitlement-content-url", "ftp://content"][..],
                "--entitlement-content-url",
            ),
            (
                &["--entitlement-timeout", "0s"][..],
                "--entitlement-timeout",
            ),
            (&["--entitlement-retries", "9"][..], "--entitlement-retries"),
            (
                &["--entitlement-recheck-interval", "10ms"][..],
                "--entitlement-recheck-interval",
            ),
        ] {
            let refused = serve(args).unwrap_err();
            assert!(refused.contains(named), "{refused}");
        }
    }

    #[test]
    fn resume_rules_are_checked_and_named() {
        let rules = serve(&["--resume-credits", "90s"]).unwrap().resume;
        assert_eq!(rules.credits, Duration::from_secs(90));
        assert_eq!(rules.complete_fraction, 0.9);
        for (args, named) in [
            (
                &["--resume-min-fraction", "1.5"][..],
                "--resume-min-fraction",
            ),
            (
                &["--resume-complete-fraction", "1.2"][..],
                "--resume-complete-fraction",
            ),
            (
                &[
                    "--resume-min-fraction",
                    "0.5",
                    "--resume-complete-fraction",
                    "0.4",
                ][..],
                "--resume-min-fraction",
            ),
        ] {
            let error = serve(args).unwrap_err();
            assert!(error.contains(named), "{args:?}: {error}");
        }
    }

    #[test]
    fn store_urls_parse() {
        let cluster = serve(&["--store", "redis-cluster://127.0.0.1:7000,[::1]:7001"]).unwrap();
        let StoreConfig::Redis(options) = cluster.store else {
            panic!("not redis")
        };
        assert_eq!(
            options.target,
            RedisTarget::Cluster {
                nodes: vec![("127.0.0.1".into(), 7000), ("::1".into(), 7001)]
            }
        );
        let sentinel = serve(&[
            "--store",
            "redis-sentinel://127.0.0.1:26379?sentinelServiceName=seats&node=127.0.0.1:26380",
        ])
        .unwrap();
        let StoreConfig::Redis(options) = sentinel.store else {
            panic!("not redis")
        };
        assert!(matches!(options.target, RedisTarget::Sentinel { .. }));
        // Without the primary's name there is nothing to ask the sentinels for.
        let error = serve(&["--store", "redis-sentinel://127.0.0.1:26379"]).unwrap_err();
        assert!(error.contains("--store"), "{error}");
        assert!(
            serve(&["--store", "postgres://x"])
                .unwrap_err()
                .to_string()
                .contains("--store")
        );
    }

    #[test]
    fn inconsistent_flags_name_the_flag() {
        let error = serve(&["--heartbeat-interval", "90s"]).unwrap_err();
        assert!(error.contains("--heartbeat-interval"), "{error}");
        assert!(
            serve(&["--partitions", "0"])
                .unwrap_err()
                .to_string()
                .contains("--partitions")
        );
        assert!(serve(&["--heartbeat-timeout", "soon"]).is_err());
        assert!(
            serve(&["--token-leeway", "45s"])
                .unwrap_err()
                .to_string()
                .contains("--token-leeway")
        );
    }

    /// Client authors read the limits in `--help`: the seat limit's default and range
    /// among them, though the flag has no fixed default.
    #[test]
    fn help_states_the_limits() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let serve = command.find_subcommand_mut("serve").expect("serve");
        let help = serve.render_long_help().to_string();
        let seat_limit = help
            .split("--default-seat-limit")
            .nth(1)
            .and_then(|rest| rest.split("\n      --").next())
            .expect("the flag's help");
        assert!(seat_limit.contains("0 to 100"), "{seat_limit}");
        assert!(seat_limit.contains("default: the file's"), "{seat_limit}");
        for flag in [
            "--memory-max-sessions",
            "--max-connections",
            "--handshake-timeout",
        ] {
            let text = help.split(flag).nth(1).unwrap_or_default();
            assert!(text.contains("[default:"), "{flag}: {text}");
        }
    }

    #[test]
    fn insecure_dev_refuses_a_public_address() {
        assert!(serve(&["--insecure-dev"]).is_ok());
        let error = serve(&["--insecure-dev", "--listen", "0.0.0.0:50051"]).unwrap_err();
        assert!(error.contains("--insecure-dev"), "{error}");
        assert!(
            serve(&["--tls-cert", "c.pem"]).is_err(),
            "a certificate needs its key"
        );
    }
}

#[cfg(test)]
mod readme {
    use clap::CommandFactory;

    use super::Cli;

    /// The README's configuration table names every flag and its environment variable.
    #[test]
    fn every_flag_is_documented() {
        let readme = include_str!("../README.md");
        let command = Cli::command();
        let keys = command.find_subcommand("keys").expect("keys");
        let subcommands = [
            command.find_subcommand("serve"),
            command.find_subcommand("health"),
            command.find_subcommand("device"),
            command.find_subcommand("bench"),
            command.find_subcommand("soak"),
            keys.find_subcommand("generate"),
            keys.find_subcommand("rotate"),
        ];
        for sub in subcommands {
            let sub = sub.expect("subcommand");
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if long == "help" {
                    continue;
                }
                assert!(
                    readme.contains(&format!("`--{long}`")),
                    "README lacks --{long}"
                );
                let env = arg.get_env().expect("every flag has an env var");
                let env = env.to_string_lossy();
                assert!(readme.contains(&format!("`{env}`")), "README lacks {env}");
            }
        }
    }
}
