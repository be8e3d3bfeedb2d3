//! The Redis store: the production store. Every state change is one Lua script
//! (`scripts/`), each a function of one Redis Functions library ([`Library`]), loaded at
//! start and called with FCALL, which loads the library again when a server lacks it, so
//! calls survive `FUNCTION FLUSH`, restarts and failovers. Scripts read time from
//! `redis.call('TIME')`, so usher instances with skewed clocks agree.
//!
//! Key layout ([`Keys`]): every key of a user carries the user's partition as hash tag,
//! `{p}` = FNV-1a(user) mod partitions, so a script touches one slot and the same scripts
//! run unchanged on Redis Cluster. Per partition there is one event stream and one sweep
//! index, so events are written in the same atomic step as the change they report.
//!
//! ```text
//! <base>:{p}:u:<user>            HASH   `g`: fencing generation counter, `r`: create rate
//!                                       cell; every other field is a seat, session id -> 1
//!                                       (no TTL while it holds a seat; then 30 days)
//! <base>:{p}:s:<session>         STRING session record (no TTL while live; ended: the
//!                                       retention)
//! <base>:{p}:req:<user>/<id>     HASH   remembered answer to a request_id (TTL)
//! <base>:{p}:prog:<user>/<prof>  HASH   watch progress: content -> "pos,dur,done,updated,device"
//! <base>:{p}:recent:<user>/<prof> ZSET  content -> last write (ms), capped (TTL: retention)
//! <base>:{p}:deadlines           ZSET   session id -> deadline, for the sweeper
//! <base>:{p}:events              STREAM capped event log (MAXLEN ~)
//! <base>:{p}:stop                sharded pub/sub channel: "<user>/<session>" ended
//! <base>:meta                    HASH   partitions and layout, recorded at first start
//! ```
//!
//! Two keys per user and session: a user's hash, sized for Redis' listpack encoding,
//! holds its counter and its few seats; a record is one string (not the id its key
//! names), because a hash with one value over 64 bytes, such as a browser's user agent,
//! leaves the listpack encoding and costs about twice the memory. A seat is only the
//! session's name; its deadline is in the record and in the sweep index, the one index
//! searched by deadline. A heartbeat writes the record and the sweep entry, each once,
//! and leaves the user hash alone. Nothing live has a TTL: the sweep index ends every
//! live session, with its event, however late the sweep runs, so a TTL would only cost
//! each key an entry in Redis' expires table and a heartbeat its refresh. A record gets
//! the retention as its session ends, and a user hash its idle TTL as its last seat goes.
//!
//! An id comes last in its key (two ids are joined with `/`, which no id contains), so
//! the `:` that ids may hold never makes two keys collide. [`LAYOUT_VERSION`] names this
//! layout; an instance refuses to start on keys written with another layout or another
//! partition count, because it would look for a user's seats in the wrong place.
//!
//! Session record fields, in this order, joined by the control character `\x1f`
//! (`record` in the prelude): `h`, what device calls change, packed as
//! `st,dl,hb,pos,ps,pt,he,dr,pw` (state, deadline ms, last heartbeat ms, position ms,
//! playback state, pause start ms, last heartbeat event ms, `p` when the deadline is the
//! pause's cap, last progress write ms; the last four empty when they do not apply);
//! `u` user, `g` generation, `ct` created ms, `du` the title's duration in ms (empty
//! until a device call gives it); then `d c p dt dn ip ua rg` (ids, device and client),
//! and `et er em eb`, empty until the session ends: end ms, end reason (stored name,
//! `EndReason::as_str`), and for a terminated one the operator's message and name. A
//! heartbeat splits only the head, up to `du`; empty fields at the end are left out. A reply
//! carries a record as one text, its id and the record as stored (`flat` in the prelude),
//! which `reply.rs` splits: a script never splits a record only to answer with it.

mod beats;
mod reply;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::broadcast;

use self::reply::{ReplyCode, beat_at, decode_event, int_at, progress_at, session_at, text_at};
use super::{
    Beat, Created, DeviceAction, DeviceCall, ENDED_FEED_CAPACITY, EndedFeed, Event,
    HeartbeatEvents, NewSession, OverLimitPolicy, ProgressCursor, ProgressKey, ProgressWrite,
    RelayLag, Seats, Store, StoreError, StoreSettings, Swept, partition_of,
};
use crate::deadline::Deadline;
use crate::ids::{ProfileId, RequestId, SessionId, SessionName, UserId};
use crate::model::{PlaybackState, Progress, Session, Termination};

/// The oldest Redis major version usher runs on.
pub const MIN_REDIS_MAJOR: u32 = 7;

/// Where the Redis store connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a primary behind a proxy): `redis://host:port`.
    Single { url: String },
    /// A primary found through Redis Sentinel, and found again after a failover:
    /// `redis-sentinel://host:port?sentinelServiceName=NAME&node=host:port`.
    Sentinel { url: String },
    /// A Redis Cluster, found from any of its nodes.
    Cluster { nodes: Vec<(String, u16)> },
}

/// How the Redis store behaves.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    pub target: RedisTarget,
    /// Every key starts with this (default `usher`); lets deployments and tests share a
    /// server without touching each other's keys.
    pub key_prefix: String,
    /// A call that has no answer within this is `Unavailable`; nothing waits longer.
    pub timeout: Duration,
    /// Run even when Redis may evict keys (`maxmemory-policy` other than `noeviction`).
    /// An evicted seat set silently breaks the seat limit, so this is off by default.
    pub allow_eviction: bool,
    /// How often the stop-channel subscriber subscribes again, to follow slot
    /// migrations ([`RESUBSCRIBE_INTERVAL`] unless a test needs it shorter).
    pub resubscribe_interval: Duration,
}

/// The version of the key layout in the module docs, recorded in `<base>:meta`.
pub const LAYOUT_VERSION: u32 = 5;

/// The layout an instance upgrades in place at start (`upgrade_layout`); any other is
/// refused.
const UPGRADES_FROM: &str = "4";

/// Sessions one upgradeLayout call looks at.
const UPGRADE_SLICE: u32 = 500;

/// The keys of one partition, built in one place.
struct Keys {
    /// `<base>:{p}:`, the prefix the scripts build further keys from.
    prefix: String,
}

impl Keys {
    fn new(base: &str, partition: u32) -> Self {
        Self {
            prefix: format!("{base}:{{{partition}}}:"),
        }
    }

    fn user(&self, user: &UserId) -> String {
        format!("{}u:{user}", self.prefix)
    }

    fn request(&self, user: &UserId, request: &RequestId) -> String {
        format!("{}req:{user}/{request}", self.prefix)
    }

    fn session(&self, session: &SessionId) -> String {
        format!("{}s:{session}", self.prefix)
    }

    /// A profile's progress (`HASH`) and its recency index (`ZSET`).
    fn progress(&self, user: &UserId, profile: &ProfileId) -> [String; 2] {
        [
            format!("{}prog:{user}/{profile}", self.prefix),
            format!("{}recent:{user}/{profile}", self.prefix),
        ]
    }

    fn deadlines(&self) -> String {
        format!("{}deadlines", self.prefix)
    }

    fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The sharded pub/sub channel the scripts publish ended sessions to.
    fn stop_channel(&self) -> String {
        format!("{}stop", self.prefix)
    }
}

/// Every script of `scripts/` but the prelude: its name and text. Each becomes one
/// function of the library.
const SCRIPTS: [(&str, &str); 12] = [
    ("createSession", include_str!("scripts/createSession.lua")),
    ("deviceCalls", include_str!("scripts/deviceCalls.lua")),
    (
        "terminateSession",
        include_str!("scripts/terminateSession.lua"),
    ),
    ("getSession", include_str!("scripts/getSession.lua")),
    ("sweepExpired", include_str!("scripts/sweepExpired.lua")),
    ("readSeats", include_str!("scripts/readSeats.lua")),
    ("writeProgress", include_str!("scripts/writeProgress.lua")),
    ("getProgress", include_str!("scripts/getProgress.lua")),
    ("listProgress", include_str!("scripts/listProgress.lua")),
    ("deleteProgress", include_str!("scripts/deleteProgress.lua")),
    ("relayRead", include_str!("scripts/relayRead.lua")),
    ("upgradeLayout", include_str!("scripts/upgradeLayout.lua")),
];

/// usher's scripts as one Redis Functions library: the prelude, then each script as a
/// function that starts with the prelude's `begin`. Loaded once per server (FUNCTION
/// LOAD), so a call runs only its own script; the prelude's helpers are not made again
/// on every call, as they are with EVALSHA (a heartbeat's time inside Redis falls by
/// about a fifth). The library is named after a hash of its text, so instances of two
/// usher versions sharing a Redis each call their own functions.
struct Library {
    name: String,
    code: String,
}

impl Library {
    fn new() -> Self {
        let prelude = include_str!("scripts/prelude.lua");
        let functions: String = SCRIPTS
            .iter()
            .map(|(script, text)| {
                format!(
                    "redis.register_function('@_{script}', function(keys, args)\n\
                     begin(keys, args)\n{text}\nend)\n"
                )
            })
            .collect();
        let text = format!("{prelude}\n{functions}");
        let name = format!("usher_{}", &fred::util::sha1_hash(&text)[..16]);
        let code = format!(
            "#!lua name={name}\n{}",
            text.replace("'@_", &format!("'{name}_"))
        );
        Self { name, code }
    }

    /// The FCALL name of a script of [`SCRIPTS`].
    fn function(&self, script: &str) -> String {
        format!("{}_{script}", self.name)
    }

    /// Loads the library on the server, or on every primary of a Cluster.
    async fn load(&self, client: &Client) -> Result<(), fred::error::Error> {
        if client.is_clustered() {
            client
                .function_load_cluster::<(), _>(true, self.code.as_str())
                .await
        } else {
            client
                .function_load::<(), _>(true, self.code.as_str())
                .await
        }
    }

    /// FCALL of `function`, loading the library first when the server lacks it (it
    /// restarted without persistence, or a node joined a Cluster).
    /// The keys and arguments are copied per attempt (reference-counted bytes).
    async fn call(
        &self,
        client: &Client,
        function: &str,
        keys: &[fred::types::Key],
        args: &[Value],
    ) -> Result<Value, fred::error::Error> {
        match client.fcall(function, keys.to_vec(), args.to_vec()).await {
            Err(error) if error.details().contains("Function not found") => {
                self.load(client).await?;
                client.fcall(function, keys.to_vec(), args.to_vec()).await
            }
            result => result,
        }
    }
}

/// The library and the FCALL name of each of its functions.
struct Scripts {
    library: Library,
    create: String,
    device_calls: String,
    terminate: String,
    get: String,
    sweep: String,
    read_seats: String,
    write_progress: String,
    get_progress: String,
    list_progress: String,
    delete_progress: String,
    relay_read: String,
    upgrade_layout: String,
}

impl Scripts {
    fn new() -> Self {
        let library = Library::new();
        Self {
            create: library.function("createSession"),
            device_calls: library.function("deviceCalls"),
            terminate: library.function("terminateSession"),
            get: library.function("getSession"),
            sweep: library.function("sweepExpired"),
            read_seats: library.function("readSeats"),
            write_progress: library.function("writeProgress"),
            get_progress: library.function("getProgress"),
            list_progress: library.function("listProgress"),
            delete_progress: library.function("deleteProgress"),
            relay_read: library.function("relayRead"),
            upgrade_layout: library.function("upgradeLayout"),
            library,
        }
    }
}

/// A device call's action as deviceCalls.lua names it.
fn action_arg(action: DeviceAction) -> &'static str {
    match action {
        DeviceAction::Heartbeat { .. } => "heartbeat",
        DeviceAction::Pause => "pause",
        DeviceAction::Resume => "resume",
        DeviceAction::Stop => "stop",
    }
}

/// The over-limit policy as createSession's ARGV[7] names it.
fn policy_arg(policy: OverLimitPolicy) -> &'static str {
    match policy {
        OverLimitPolicy::RejectNew => "reject_new",
        OverLimitPolicy::StopOldest => "stop_oldest",
    }
}

/// The heartbeat event mode as the device calls' ARGV[6] names it.
fn heartbeat_events_arg(mode: HeartbeatEvents) -> &'static str {
    match mode {
        HeartbeatEvents::Off => "off",
        HeartbeatEvents::Sampled => "sampled",
        HeartbeatEvents::All => "all",
    }
}

/// The subscription to the stop channels: the client, the feed's sender, and the keeper
/// task's lifeline (dropped with the store, which ends the keeper).
struct StopSubscription {
    _subscriber: SubscriberClient,
    sender: broadcast::Sender<SessionName>,
    _keeper: tokio::sync::oneshot::Sender<()>,
}

/// How often the subscriber subscribes again to every stop channel (see
/// `subscribe_stop_channels`).
pub const RESUBSCRIBE_INTERVAL: Duration = Duration::from_secs(15);

/// How many times a script is run with more records before the call gives up: each run
/// adds the records of sessions that were created since the last, so only a user whose
/// devices start sessions faster than a round trip gets this far.
const MAX_SCRIPT_ROUNDS: usize = 16;

/// A script's final reply: the success code and the reply, or the refusal's error.
fn refusal(code: ReplyCode, reply: Vec<Value>) -> Result<(ReplyCode, Vec<Value>), StoreError> {
    match code {
        ReplyCode::Done | ReplyCode::Replayed => Ok((code, reply)),
        ReplyCode::NotFound => Err(StoreError::NotFound),
        ReplyCode::SessionEnded => Err(StoreError::SessionEnded(Box::new(session_at(&reply, 1)?))),
        ReplyCode::LimitReached => Err(StoreError::LimitReached {
            limit: u32::try_from(int_at(&reply, 1)?)
                .map_err(|_| StoreError::Corrupt("negative limit".into()))?,
            holders: (2..reply.len())
                .map(|i| session_at(&reply, i))
                .collect::<Result<_, _>>()?,
        }),
        ReplyCode::StaleGeneration => Err(StoreError::StaleGeneration),
        ReplyCode::RequestIdReused => Err(StoreError::RequestIdReused),
        ReplyCode::RecordsNeeded => Err(StoreError::Corrupt("records still needed".into())),
        ReplyCode::ProfileNeeded => Err(StoreError::Corrupt("a profile still needed".into())),
        ReplyCode::RateLimited => Err(StoreError::RateLimited {
            retry_after: Duration::from_millis(int_at(&reply, 1)?.max(0) as u64),
        }),
    }
}

/// SSUBSCRIBE again to every shard channel `subscriber` tracks, pipelined. fred's own
/// `resubscribe_all` (and `manage_subscriptions`, which calls it on reconnection) sends
/// SUBSCRIBE and PSUBSCRIBE first even with no channel to name, which Redis refuses
/// ("wrong number of arguments"), so it never reached the shard channels.
async fn resubscribe(subscriber: &SubscriberClient) -> Result<(), fred::error::Error> {
    let channels = subscriber.tracked_shard_channels();
    futures::future::try_join_all(
        channels
            .iter()
            .map(|channel| subscriber.ssubscribe(channel.to_string())),
    )
    .await?;
    Ok(())
}

/// A stop channel's message, `<user>/<session>`, as a session name.
fn ended_notice(value: &Value) -> Option<SessionName> {
    let text = value.as_string()?;
    let (user, session) = text.split_once('/')?;
    Some(SessionName {
        user: UserId::parse("user", user).ok()?,
        session: SessionId::parse("session", session).ok()?,
    })
}

/// See the module docs.
pub struct RedisStore {
    core: Arc<Core>,
    /// How `client` was configured, for the subscriber connection.
    config: Config,
    /// The notification feed, made on first use: a subscriber connection (one per shard
    /// on a Cluster) on every partition's stop channel, fanned out in process.
    ended: tokio::sync::OnceCell<StopSubscription>,
}

/// What runs the scripts: shared with the tasks that send batches of heartbeats
/// (`beats`).
struct Core {
    /// Sends each command once: a script that must not run twice (a create, a stop, a
    /// termination) is not sent again after a dropped connection, nor after a Cluster
    /// redirect (MOVED, ASK) while slots move; the caller gets UNAVAILABLE and retries
    /// (a create with its request_id).
    client: Client,
    /// Follows redirects and resends after a dropped connection (up to
    /// `SAFE_ATTEMPTS`): for the scripts whose second run changes nothing the first did
    /// not (reads, heartbeats, pauses, resumes, sweeps), so moving slots between shards
    /// does not fail them.
    retrying: Client,
    settings: StoreSettings,
    options: RedisOptions,
    scripts: Scripts,
    /// Heartbeats waiting for the batch in flight to return: each partition's on a
    /// Cluster, a few lanes for all partitions on one Redis.
    lanes: beats::Lanes,
}

/// How often `RedisStore::retrying` sends a command: a redirect or a dropped connection
/// each take one.
const SAFE_ATTEMPTS: u32 = 3;

/// Whether a script may be sent again after a redirect or a dropped connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resend {
    /// A second run changes nothing the first did not.
    Safe,
    /// A second run would act again (a second session) or answer differently (a stop
    /// finding its session stopped).
    Never,
}

fn unavailable(error: &fred::error::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// Sorts a fred error into "the store is not there" and "the store said something wrong".
fn classify(error: fred::error::Error) -> StoreError {
    use fred::error::ErrorKind;
    match error.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Cluster
        | ErrorKind::Routing
        | ErrorKind::Backpressure
        | ErrorKind::Sentinel
        | ErrorKind::Auth => unavailable(&error),
        ErrorKind::Config
        | ErrorKind::InvalidCommand
        | ErrorKind::InvalidArgument
        | ErrorKind::Url
        | ErrorKind::Protocol
        | ErrorKind::Unknown
        | ErrorKind::Parse
        | ErrorKind::NotFound => {
            // Redis answers LOADING, MASTERDOWN, CLUSTERDOWN, TRYAGAIN while it is coming
            // back, OOM when it is full (maxmemory with noeviction), BUSY while a script
            // runs too long, MISCONF when it cannot persist and NOREPLICAS when too few
            // replicas follow: each is the store refusing work for now, not a bug, and a
            // retry later may succeed.
            let details = error.details();
            if [
                "LOADING",
                "MASTERDOWN",
                "CLUSTERDOWN",
                "TRYAGAIN",
                "READONLY",
                "OOM",
                "BUSY",
                "MISCONF",
                "NOREPLICAS",
                // fred gave up redirecting or reconnecting (a slot moving, a node gone).
                "Too many failed write attempts",
            ]
            .iter()
            .any(|code| details.starts_with(code))
            {
                unavailable(&error)
            } else {
                StoreError::Corrupt(error.to_string())
            }
        }
    }
}

/// A client builder with the store's timeouts and reconnect policy (both the command
/// client and the subscriber start from it).
fn builder(config: Config, timeout: Duration) -> Builder {
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|connection| {
            connection.connection_timeout = timeout;
            connection.internal_command_timeout = timeout;
        })
        .set_policy(ReconnectPolicy::new_constant(0, 100));
    builder
}

/// Connects `client`, giving up (`Unavailable`) after three timeouts.
async fn connect_within<C: ClientLike>(client: &C, timeout: Duration) -> Result<(), StoreError> {
    match tokio::time::timeout(timeout * 3, client.init()).await {
        Ok(Ok(_connection_task)) => Ok(()),
        Ok(Err(error)) => Err(classify(error)),
        Err(_) => Err(StoreError::Unavailable(
            "no connection within the timeout".into(),
        )),
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl RedisStore {
    /// Connects, and loads every script. Fails with `Unavailable` if the store cannot be
    /// reached within the timeout.
    pub async fn connect(
        options: RedisOptions,
        settings: StoreSettings,
    ) -> Result<Self, StoreError> {
        let config = match &options.target {
            RedisTarget::Single { url } | RedisTarget::Sentinel { url } => {
                Config::from_url(url).map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
            RedisTarget::Cluster { nodes } => Config {
                server: ServerConfig::new_clustered(nodes.clone()),
                ..Config::default()
            },
        };
        let timeout = options.timeout;
        let client_with = |attempts: u32| {
            builder(config.clone(), timeout)
                .with_connection_config(|connection| connection.max_command_attempts = attempts)
                .with_performance_config(|performance| {
                    performance.default_command_timeout = timeout;
                })
                .build()
                .map_err(|e| unavailable(&e))
        };
        let client = client_with(1)?;
        connect_within(&client, timeout).await?;
        let retrying = client_with(SAFE_ATTEMPTS)?;
        connect_within(&retrying, timeout).await?;
        let store = Self {
            core: Arc::new(Core {
                client,
                retrying,
                lanes: beats::Lanes::new(
                    settings.partitions,
                    !matches!(options.target, RedisTarget::Cluster { .. }),
                ),
                settings,
                options,
                scripts: Scripts::new(),
            }),
            config,
            ended: tokio::sync::OnceCell::new(),
        };
        store.check_version().await?;
        store.check_not_a_cluster_node().await?;
        store.check_eviction_policy().await?;
        store.check_layout().await?;
        store
            .core
            .bounded(store.core.scripts.library.load(&store.core.client))
            .await?;
        Ok(store)
    }

    /// The scripts use SPUBLISH (Redis 7.0) and exclusive XRANGE cursors (6.2): refuse
    /// an older server at start rather than fail halfway through a script later.
    async fn check_version(&self) -> Result<(), StoreError> {
        let info: String = self
            .core
            .bounded(self.core.client.info(Some(fred::types::InfoKind::Server)))
            .await?;
        let version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .map(str::trim)
            .ok_or_else(|| StoreError::Corrupt("INFO server has no redis_version".into()))?;
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("unreadable redis_version {version}")))?;
        if major < MIN_REDIS_MAJOR {
            return Err(StoreError::Corrupt(format!(
                "Redis {version} is too old: usher needs Redis {MIN_REDIS_MAJOR}.0 or newer"
            )));
        }
        Ok(())
    }

    /// Refuses a Cluster node named as one Redis (`redis://` or through Sentinel): usher
    /// would send it heartbeats of many partitions in one script call, which a Cluster
    /// refuses (CROSSSLOT), and could not follow its redirects.
    async fn check_not_a_cluster_node(&self) -> Result<(), StoreError> {
        if self.core.client.is_clustered() {
            return Ok(());
        }
        let info: String = self
            .core
            .bounded(self.core.client.info(Some(fred::types::InfoKind::Cluster)))
            .await?;
        if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Err(StoreError::Refused(
                "this Redis is a Cluster node: name the Cluster with \
                 --store redis-cluster://host:port[,host:port...]"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Refuses a Redis that may evict keys: an evicted seat set or session record
    /// silently breaks the seat limit (and the fencing). Every primary of a cluster is
    /// asked. INFO, not CONFIG GET, because managed Redis services often disable CONFIG.
    async fn check_eviction_policy(&self) -> Result<(), StoreError> {
        let servers = match self.core.client.cached_cluster_state() {
            Some(state) => state.unique_primary_nodes(),
            None => Vec::new(),
        };
        let mut infos = Vec::new();
        if servers.is_empty() {
            let info: String = self
                .core
                .bounded(self.core.client.info(Some(fred::types::InfoKind::Memory)))
                .await?;
            infos.push(("redis".to_owned(), info));
        }
        for server in servers {
            let info: String = self
                .core
                .bounded(
                    self.core
                        .client
                        .with_cluster_node(&server)
                        .info(Some(fred::types::InfoKind::Memory)),
                )
                .await?;
            infos.push((server.to_string(), info));
        }
        for (server, info) in infos {
            let policy = info
                .lines()
                .find_map(|line| line.strip_prefix("maxmemory_policy:"))
                .map(str::trim)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("INFO memory of {server} has no maxmemory_policy"))
                })?;
            if policy == "noeviction" {
                continue;
            }
            if self.core.options.allow_eviction {
                tracing::warn!(
                    %server,
                    policy,
                    "redis may evict keys: a seat evicted under memory pressure lets a user \
                     exceed the seat limit (running anyway: --redis-allow-eviction)"
                );
                continue;
            }
            return Err(StoreError::Refused(format!(
                "{server} has maxmemory-policy {policy}: Redis may evict usher's keys under \
                 memory pressure, and an evicted seat set silently lets a user exceed the seat \
                 limit; set maxmemory-policy noeviction (then a full Redis refuses writes, which \
                 usher answers with UNAVAILABLE), or pass --redis-allow-eviction to accept the risk"
            )));
        }
        Ok(())
    }

    /// Heartbeats of sessions of one partition sent as one script call at once, the
    /// way the store batches heartbeats that arrive together, without waiting for
    /// others: what each changed, in order. `usher bench` drives it to measure a batch
    /// beside a single call. Calls of sessions of different partitions are refused.
    pub async fn beat_together(
        &self,
        calls: &[DeviceCall],
        deadline: Deadline,
    ) -> Result<Vec<Result<Beat, StoreError>>, StoreError> {
        let partitions = self.core.settings.partitions;
        let mut partition = calls
            .iter()
            .map(|call| partition_of(&call.name.user, partitions));
        if let Some(first) = partition.next()
            && partition.any(|other| other != first)
        {
            return Err(StoreError::Refused(
                "heartbeats sent together must be of one partition".into(),
            ));
        }
        if calls
            .iter()
            .any(|call| !matches!(call.action, DeviceAction::Heartbeat { .. }))
        {
            return Err(StoreError::Refused(
                "only heartbeats are sent together".into(),
            ));
        }
        beats::together(&self.core, calls, deadline).await
    }

    /// Records the partition count and the key layout at first start, and refuses to run
    /// on keys recorded with others: a user's seats would be looked for under another
    /// hash tag, and split between instances.
    async fn check_layout(&self) -> Result<(), StoreError> {
        let key = format!("{}:meta", self.core.options.key_prefix);
        let partitions = self.core.settings.partitions.to_string();
        let layout = LAYOUT_VERSION.to_string();
        let _: () = self
            .core
            .bounded(
                self.core
                    .client
                    .hsetnx(&key, "partitions", partitions.as_str()),
            )
            .await?;
        let _: () = self
            .core
            .bounded(self.core.client.hsetnx(&key, "layout", layout.as_str()))
            .await?;
        let (recorded_partitions, mut recorded_layout): (Option<String>, Option<String>) = self
            .core
            .bounded(self.core.client.hmget(&key, vec!["partitions", "layout"]))
            .await?;
        if recorded_layout.as_deref() == Some(UPGRADES_FROM)
            && recorded_partitions.as_deref() == Some(partitions.as_str())
        {
            self.upgrade_layout().await?;
            let _: () = self
                .core
                .bounded(self.core.client.hset(&key, ("layout", layout.as_str())))
                .await?;
            recorded_layout = Some(layout.clone());
        }
        if recorded_layout.as_deref() != Some(layout.as_str()) {
            return Err(StoreError::Refused(format!(
                "{key} records key layout {}, this usher writes layout {layout}: migrate the keys \
                 or use another --redis-key-prefix",
                recorded_layout.as_deref().unwrap_or("(none)")
            )));
        }
        if recorded_partitions.as_deref() != Some(partitions.as_str()) {
            return Err(StoreError::Refused(format!(
                "{key} records --partitions {}, this instance was started with {partitions}: \
                 instances with different counts would split users' seats; start with the \
                 recorded count (changing it needs a migration)",
                recorded_partitions.as_deref().unwrap_or("(none)")
            )));
        }
        Ok(())
    }

    /// Moves every partition's keys from key layout [`UPGRADES_FROM`] to this one
    /// (upgradeLayout.lua): live records and their users' hashes lose their TTLs. Each
    /// call looks at [`UPGRADE_SLICE`] sessions, so Redis is never held long; running it
    /// again, or beside another instance doing the same, changes nothing more.
    async fn upgrade_layout(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        for partition in 0..self.core.settings.partitions {
            let keys = Keys::new(&self.core.options.key_prefix, partition);
            let mut from = 0;
            while from >= 0 {
                let mut args = self.core.common_args(&keys);
                args.extend([from.to_string(), UPGRADE_SLICE.to_string()]);
                let (_, reply) = self
                    .core
                    .run(
                        &self.core.scripts.upgrade_layout,
                        Resend::Safe,
                        &keys,
                        vec![keys.deadlines()],
                        args,
                        Deadline::NONE,
                    )
                    .await?;
                from = int_at(&reply, 1)?;
            }
        }
        tracing::info!(
            from = UPGRADES_FROM,
            to = LAYOUT_VERSION,
            partitions = self.core.settings.partitions,
            took_ms = started.elapsed().as_millis() as u64,
            "key layout upgraded in place"
        );
        Ok(())
    }

    /// Subscribes (SSUBSCRIBE) to every partition's stop channel, on which the scripts
    /// publish `<user>/<session>` of each session they end, and forwards the notices.
    /// usher subscribes again after a reconnection ([`resubscribe`]); what is published
    /// meanwhile is missed, which the next device call covers.
    async fn subscribe_stop_channels(&self) -> Result<StopSubscription, StoreError> {
        let timeout = self.core.options.timeout;
        let subscriber = builder(self.config.clone(), timeout)
            .build_subscriber_client()
            .map_err(|e| unavailable(&e))?;
        connect_within(&subscriber, timeout).await?;
        let (sender, _) = broadcast::channel(ENDED_FEED_CAPACITY);
        let mut messages = subscriber.message_rx();
        let forward = sender.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match messages.recv().await {
                    Ok(message) => match ended_notice(&message.value) {
                        Some(name) => {
                            let _ = forward.send(name);
                        }
                        None => tracing::warn!(
                            channel = %message.channel,
                            "unreadable ended-session notice"
                        ),
                    },
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "ended-session notices missed");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        // Subscribe again after every reconnection. A slot that migrates to another shard
        // ends its shard channel's subscription with an unsolicited SUNSUBSCRIBE, which
        // fred drops: so subscribe again on every topology change fred sees, and every
        // `resubscribe_interval` (SSUBSCRIBE is idempotent; a MOVED sends it to the new
        // owner). Until then the next heartbeat still ends a stream.
        let keeper = subscriber.clone();
        let every = self.core.options.resubscribe_interval;
        let mut topology = subscriber.cluster_change_rx();
        let mut reconnections = subscriber.reconnect_rx();
        // The keeper holds a clone of the client: it stops when the store is dropped.
        let (store_alive, mut store_dropped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    _ = &mut store_dropped => return,
                    () = tokio::time::sleep(every) => {}
                    changed = topology.recv() => {
                        if matches!(changed, Err(RecvError::Closed)) {
                            return;
                        }
                    }
                    reconnected = reconnections.recv() => {
                        if matches!(reconnected, Err(RecvError::Closed)) {
                            return;
                        }
                    }
                }
                if !keeper.is_connected() {
                    continue;
                }
                let again = async {
                    // The slot map first: SSUBSCRIBE goes to the owner fred believes in.
                    if keeper.is_clustered() {
                        keeper.sync_cluster().await?;
                    }
                    resubscribe(&keeper).await
                };
                match tokio::time::timeout(timeout * 3, again).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(%error, "resubscribing the stop channels"),
                    Err(_) => tracing::warn!("resubscribing the stop channels timed out"),
                }
            }
        });
        // Every partition's channel at once (fred pipelines them), not one round trip
        // each: a thousand partitions would otherwise cost a thousand at every start.
        let subscribing = (0..self.core.settings.partitions).map(|partition| {
            subscriber
                .ssubscribe(Keys::new(&self.core.options.key_prefix, partition).stop_channel())
        });
        tokio::time::timeout(timeout * 3, futures::future::try_join_all(subscribing))
            .await
            .map_err(|_| StoreError::Unavailable("SSUBSCRIBE timed out".into()))?
            .map_err(classify)?;
        Ok(StopSubscription {
            _subscriber: subscriber,
            sender,
            _keeper: store_alive,
        })
    }
}

/// Which way a read of a partition's log goes.
#[derive(Clone, Copy)]
enum Direction {
    Forwards,
    Backwards,
}

impl RedisStore {
    /// Up to `count` entries of `partition`'s log past `from` (exclusive; from the end
    /// the direction starts at when `None`), in `direction`.
    async fn read_log(
        &self,
        partition: u32,
        from: Option<&str>,
        count: u32,
        direction: Direction,
    ) -> Result<Vec<Event>, StoreError> {
        if let Some(from) = from {
            super::parse_event_id(from)?;
        }
        let key = Keys::new(&self.core.options.key_prefix, partition).events();
        let count = Some(u64::from(count));
        let client = &self.core.client;
        let entries: Vec<(String, Vec<(String, String)>)> = match direction {
            Direction::Forwards => {
                let start = from.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
                self.core
                    .bounded(client.xrange(key, start, "+", count))
                    .await?
            }
            Direction::Backwards => {
                let end = from.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
                self.core
                    .bounded(client.xrevrange(key, end, "-", count))
                    .await?
            }
        };
        entries
            .into_iter()
            .map(|(id, fields)| decode_event(id, fields))
            .collect()
    }
}

impl Core {
    /// A Redis command within the store's own timeout (no caller is waiting on it).
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, StoreError> {
        self.within(async { call.await.map_err(classify) }, Deadline::NONE)
            .await
    }

    /// `work` within the store's timeout, or less when the caller's deadline is nearer.
    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
        deadline: Deadline,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(deadline.budget(self.options.timeout), work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable("timed out".into())),
        }
    }

    fn keys(&self, user: &UserId) -> Keys {
        Keys::new(
            &self.options.key_prefix,
            partition_of(user, self.settings.partitions),
        )
    }

    /// ARGV[1..3], shared by every script.
    fn common_args(&self, keys: &Keys) -> Vec<String> {
        vec![
            keys.prefix.clone(),
            self.settings.event_stream_maxlen.to_string(),
            ms(self.settings.ended_retention),
        ]
    }

    /// Runs device calls of sessions of one partition (of any partitions on a Redis that
    /// is not a Cluster) in one script call (deviceCalls.lua): each call's answer, in
    /// order (a brief heartbeat's is what it changed). A refused call is its error; the
    /// others are done all the same. A call whose progress write needed a profile it was
    /// not given (it wrote nothing) is sent again with it, once.
    async fn device_calls(
        &self,
        calls: &[DeviceCall],
        brief: bool,
        deadline: Deadline,
    ) -> Result<Vec<Result<Vec<Value>, StoreError>>, StoreError> {
        let mut answers = self.device_calls_once(calls, brief, deadline).await?;
        let mut again = Vec::new();
        for (i, answer) in answers.iter().enumerate() {
            if let Ok(reply) = answer
                && ReplyCode::try_from(int_at(reply, 0)?)? == ReplyCode::ProfileNeeded
            {
                let id = text_at(reply, 1)?;
                let profile = ProfileId::parse("profile", &id)
                    .map_err(|_| StoreError::Corrupt(format!("bad profile id {id:?}")))?;
                let mut call = calls[i].clone();
                call.profile = Some(profile);
                again.push((i, call));
            }
        }
        if again.is_empty() {
            return Ok(answers);
        }
        let calls: Vec<DeviceCall> = again.iter().map(|(_, call)| call.clone()).collect();
        let second = self.device_calls_once(&calls, brief, deadline).await?;
        for ((i, _), answer) in again.into_iter().zip(second) {
            answers[i] = match answer {
                Ok(reply) if int_at(&reply, 0)? == -7 => Err(StoreError::Corrupt(
                    "a device call needed its profile twice".into(),
                )),
                other => other,
            };
        }
        Ok(answers)
    }

    /// One deviceCalls script call: each call's answer, a `ProfileNeeded` one as it is.
    async fn device_calls_once(
        &self,
        calls: &[DeviceCall],
        brief: bool,
        deadline: Deadline,
    ) -> Result<Vec<Result<Vec<Value>, StoreError>>, StoreError> {
        let Some(first) = calls.first() else {
            return Ok(Vec::new());
        };
        let keys = self.keys(&first.name.user);
        let call_keys: Vec<Keys> = calls
            .iter()
            .map(|call| self.keys(&call.name.user))
            .collect();
        // Each partition's sweep index and event log, once, in the order of the calls.
        let mut key_list = Vec::with_capacity(calls.len() * 2 + 2);
        for (i, keys) in call_keys.iter().enumerate() {
            if call_keys[..i].iter().all(|seen| seen.prefix != keys.prefix) {
                key_list.extend([keys.deadlines(), keys.events()]);
            }
        }
        let mut args = self.common_args(&keys);
        let resume = &self.settings.resume;
        args.extend([
            ms(self.settings.heartbeat_timeout),
            ms(self.settings.max_pause),
            heartbeat_events_arg(self.settings.heartbeat_events).to_owned(),
            ms(self.settings.heartbeat_event_interval),
            if brief { "brief" } else { "" }.to_owned(),
            ms(self.settings.progress_write_interval),
            resume.complete_fraction.to_string(),
            ms(resume.credits),
            self.settings.progress_cap.to_string(),
            ms(self.settings.progress_retention),
        ]);
        for (call, keys) in calls.iter().zip(call_keys) {
            key_list.push(keys.session(&call.name.session));
            key_list.push(keys.user(&call.name.user));
            if let Some(profile) = &call.profile {
                key_list.extend(keys.progress(&call.name.user, profile));
            }
            let playback_state = match call.action {
                DeviceAction::Heartbeat { playback_state } => playback_state,
                _ => PlaybackState::Unspecified,
            };
            args.extend([
                action_arg(call.action).to_owned(),
                call.name.user.to_string(),
                call.name.session.to_string(),
                call.generation.unwrap_or(0).to_string(),
                call.position_ms.map(|p| p.to_string()).unwrap_or_default(),
                playback_state.code().to_string(),
                call.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
                call.profile
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                keys.prefix,
            ]);
        }
        // A stop found done by a second run would answer differently: sent once.
        let resend = if calls.iter().any(|call| call.action == DeviceAction::Stop) {
            Resend::Never
        } else {
            Resend::Safe
        };
        let (_, reply) = self
            .run(
                &self.scripts.device_calls,
                resend,
                &keys,
                key_list,
                args,
                deadline,
            )
            .await?;
        if reply.len() != calls.len() + 1 {
            return Err(StoreError::Corrupt(format!(
                "{} answers to {} device calls",
                reply.len().saturating_sub(1),
                calls.len()
            )));
        }
        Ok(reply
            .into_iter()
            .skip(1)
            .map(|answer| {
                let Value::Array(answer) = answer else {
                    return Err(StoreError::Corrupt(format!(
                        "device call answered {answer:?}"
                    )));
                };
                let code = ReplyCode::try_from(int_at(&answer, 0)?)?;
                if code == ReplyCode::ProfileNeeded {
                    return Ok(answer);
                }
                refusal(code, answer).map(|(_, answer)| answer)
            })
            .collect())
    }

    /// One device call's answer.
    async fn device_call_alone(
        &self,
        call: DeviceCall,
        brief: bool,
        deadline: Deadline,
    ) -> Result<Vec<Value>, StoreError> {
        self.device_calls(std::slice::from_ref(&call), brief, deadline)
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Corrupt("no answer to a device call".into())))
    }

    /// Runs a script: its success code and its reply array (the code first). A refusal
    /// code becomes its error. A script that replies `RecordsNeeded` (it found sessions
    /// in the user's seat set whose records it was not given) is run again with those
    /// records added to its KEYS, within the same time budget.
    async fn run(
        &self,
        function: &str,
        resend: Resend,
        keys: &Keys,
        key_list: Vec<String>,
        args: Vec<String>,
        deadline: Deadline,
    ) -> Result<(ReplyCode, Vec<Value>), StoreError> {
        // Converted once: a further round clones reference-counted bytes, not strings.
        let mut key_list: Vec<fred::types::Key> = key_list.into_iter().map(Into::into).collect();
        let args: Vec<Value> = args.into_iter().map(Value::from).collect();
        let rounds = async {
            for _ in 0..MAX_SCRIPT_ROUNDS {
                let client = match resend {
                    Resend::Safe => &self.retrying,
                    Resend::Never => &self.client,
                };
                let reply = self
                    .scripts
                    .library
                    .call(client, function, &key_list, &args)
                    .await
                    .map_err(classify)?;
                let Value::Array(reply) = reply else {
                    return Err(StoreError::Corrupt(format!("script replied {reply:?}")));
                };
                let code = ReplyCode::try_from(int_at(&reply, 0)?)?;
                if code != ReplyCode::RecordsNeeded {
                    return refusal(code, reply);
                }
                for i in 1..reply.len() {
                    let id = text_at(&reply, i)?;
                    let session = SessionId::parse("session", &id)
                        .map_err(|_| StoreError::Corrupt(format!("bad session id {id}")))?;
                    key_list.push(keys.session(&session).into());
                }
            }
            Err(StoreError::Unavailable(format!(
                "the seat set changed under {MAX_SCRIPT_ROUNDS} runs in a row"
            )))
        };
        self.within(rounds, deadline).await
    }

    /// Runs a progress function on the keys of `user`'s `profile` (both are given to
    /// every one; `getProgress` reads the first), `extra` after the common ARGV. Every
    /// one may run twice: a second write is the same write, stamped later.
    async fn run_progress(
        &self,
        function: &str,
        user: &UserId,
        profile: &ProfileId,
        extra: Vec<String>,
        deadline: Deadline,
    ) -> Result<Vec<Value>, StoreError> {
        let keys = self.keys(user);
        let mut args = self.common_args(&keys);
        args.extend(extra);
        let key_list = keys.progress(user, profile).into();
        let (_, reply) = self
            .run(function, Resend::Safe, &keys, key_list, args, deadline)
            .await?;
        Ok(reply)
    }

    fn session_keys(&self, name: &SessionName) -> (Keys, Vec<String>) {
        let keys = self.keys(&name.user);
        let list = vec![
            keys.session(&name.session),
            keys.user(&name.user),
            keys.deadlines(),
            keys.events(),
        ];
        (keys, list)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_session(
        &self,
        new: NewSession,
        deadline: Deadline,
    ) -> Result<Created, StoreError> {
        let user = &new.name.user;
        let keys = self.core.keys(user);
        let request_key = match &new.request_id {
            Some(request) => keys.request(user, request),
            None => keys.user(user),
        };
        let [progress_key, _] = keys.progress(user, &new.profile);
        let key_list = vec![
            keys.user(user),
            keys.session(&new.name.session),
            keys.deadlines(),
            keys.events(),
            request_key,
            progress_key,
        ];
        let mut args = self.core.common_args(&keys);
        args.extend([
            user.to_string(),
            new.name.session.to_string(),
            new.limit.to_string(),
            policy_arg(new.policy).to_owned(),
            ms(self.core.settings.heartbeat_timeout),
            new.request_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            ms(self.core.settings.request_id_ttl),
            new.fingerprint(),
            new.profile.to_string(),
            new.content.to_string(),
            new.device.id.to_string(),
            new.device.kind.code().to_string(),
            new.device.name.clone(),
            new.client.ip_address.clone(),
            new.client.user_agent.clone(),
            new.client.region.clone(),
            self.core.settings.max_evictions_per_call.to_string(),
            new.rate
                .map_or_else(|| "0".to_owned(), |rate| ms(rate.interval)),
            new.rate
                .map_or_else(|| "0".to_owned(), |rate| ms(rate.tolerance())),
        ]);
        let (code, reply) = self
            .core
            .run(
                &self.core.scripts.create,
                Resend::Never,
                &keys,
                key_list,
                args,
                deadline,
            )
            .await?;
        let replaced = (3..reply.len())
            .map(|i| {
                let id = text_at(&reply, i)?;
                SessionId::parse("replaced", &id)
                    .map(|session| SessionName {
                        user: user.clone(),
                        session,
                    })
                    .map_err(|_| StoreError::Corrupt(format!("bad session id {id}")))
            })
            .collect::<Result<_, _>>()?;
        let progress = match reply.get(2) {
            Some(Value::Array(entry)) if entry.is_empty() => None,
            _ => Some(progress_at(&reply, 2, user, &new.profile)?),
        };
        Ok(Created {
            session: session_at(&reply, 1)?,
            replaced,
            replayed: code == ReplyCode::Replayed,
            progress,
        })
    }

    async fn get_session(
        &self,
        name: &SessionName,
        deadline: Deadline,
    ) -> Result<Option<Session>, StoreError> {
        let (keys, key_list) = self.core.session_keys(name);
        let mut args = self.core.common_args(&keys);
        args.extend([name.user.to_string(), name.session.to_string()]);
        match self
            .core
            .run(
                &self.core.scripts.get,
                Resend::Safe,
                &keys,
                key_list,
                args,
                deadline,
            )
            .await
        {
            Ok((_, reply)) => session_at(&reply, 1).map(Some),
            Err(StoreError::NotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn seats(&self, user: &UserId, deadline: Deadline) -> Result<Seats, StoreError> {
        let keys = self.core.keys(user);
        let mut args = self.core.common_args(&keys);
        args.push(user.to_string());
        let (_, reply) = self
            .core
            .run(
                &self.core.scripts.read_seats,
                Resend::Safe,
                &keys,
                vec![keys.user(user)],
                args,
                deadline,
            )
            .await?;
        Ok(Seats {
            now_ms: u64::try_from(int_at(&reply, 1)?)
                .map_err(|_| StoreError::Corrupt("negative time".into()))?,
            holders: (2..reply.len())
                .map(|i| session_at(&reply, i))
                .collect::<Result<_, _>>()?,
        })
    }

    async fn device_call(
        &self,
        call: DeviceCall,
        deadline: Deadline,
    ) -> Result<Session, StoreError> {
        let answer = if matches!(call.action, DeviceAction::Heartbeat { .. }) {
            beats::beat(&self.core, call, false, deadline).await?
        } else {
            self.core.device_call_alone(call, false, deadline).await?
        };
        session_at(&answer, 1)
    }

    async fn device_call_brief(
        &self,
        call: DeviceCall,
        deadline: Deadline,
    ) -> Result<Beat, StoreError> {
        if matches!(call.action, DeviceAction::Heartbeat { .. }) {
            return beat_at(&beats::beat(&self.core, call, true, deadline).await?, 1);
        }
        let answer = self.core.device_call_alone(call, true, deadline).await?;
        session_at(&answer, 1).map(|session| Beat::of(&session))
    }

    async fn terminate(
        &self,
        name: &SessionName,
        termination: &Termination,
        deadline: Deadline,
    ) -> Result<Session, StoreError> {
        let (keys, key_list) = self.core.session_keys(name);
        let mut args = self.core.common_args(&keys);
        args.extend([
            name.user.to_string(),
            name.session.to_string(),
            termination.message.clone(),
            termination.by.clone(),
        ]);
        let (_, reply) = self
            .core
            .run(
                &self.core.scripts.terminate,
                Resend::Never,
                &keys,
                key_list,
                args,
                deadline,
            )
            .await?;
        session_at(&reply, 1)
    }

    async fn sweep(&self, partition: u32, max: u32) -> Result<Swept, StoreError> {
        let keys = Keys::new(&self.core.options.key_prefix, partition);
        let mut args = self.core.common_args(&keys);
        args.push(max.to_string());
        let (_, reply) = self
            .core
            .run(
                &self.core.scripts.sweep,
                Resend::Safe,
                &keys,
                vec![keys.deadlines(), keys.events()],
                args,
                Deadline::NONE,
            )
            .await?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("sweep {what}"));
        Ok(Swept {
            expired: u32::try_from(int_at(&reply, 1)?).map_err(|_| corrupt("count"))?,
            next_due_ms: match int_at(&reply, 2)? {
                -1 => None,
                due => Some(u64::try_from(due).map_err(|_| corrupt("next due"))?),
            },
        })
    }

    async fn read_events(
        &self,
        partition: u32,
        after: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.read_log(partition, after, count, Direction::Forwards)
            .await
    }

    async fn read_events_back(
        &self,
        partition: u32,
        before: Option<&str>,
        count: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.read_log(partition, before, count, Direction::Backwards)
            .await
    }

    async fn relay_events(
        &self,
        partition: u32,
        group: &str,
        consumer: &str,
        count: u32,
        claim_after: Duration,
    ) -> Result<Vec<Event>, StoreError> {
        let keys = Keys::new(&self.core.options.key_prefix, partition);
        let mut args = self.core.common_args(&keys);
        args.extend([
            group.to_owned(),
            consumer.to_owned(),
            count.to_string(),
            ms(claim_after),
        ]);
        // Run once only: a second run would give out more entries than were answered.
        let (_, reply) = self
            .core
            .run(
                &self.core.scripts.relay_read,
                Resend::Never,
                &keys,
                vec![keys.events()],
                args,
                Deadline::NONE,
            )
            .await?;
        reply
            .into_iter()
            .skip(1)
            .map(|entry| {
                let Value::Array(mut pair) = entry else {
                    return Err(StoreError::Corrupt("a relayed entry is not a pair".into()));
                };
                let (Some(Value::Array(flat)), Some(id)) = (pair.pop(), pair.pop()) else {
                    return Err(StoreError::Corrupt("a relayed entry is not a pair".into()));
                };
                let id = id
                    .as_string()
                    .ok_or_else(|| StoreError::Corrupt("an entry id is not text".into()))?;
                let fields = flat
                    .chunks(2)
                    .map(|pair| match pair {
                        [field, value] => Ok((
                            field.as_string().unwrap_or_default(),
                            value.as_string().unwrap_or_default(),
                        )),
                        _ => Err(StoreError::Corrupt("an odd entry".into())),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                decode_event(id, fields)
            })
            .collect()
    }

    async fn relay_lag(&self, partition: u32, group: &str) -> Result<RelayLag, StoreError> {
        let keys = Keys::new(&self.core.options.key_prefix, partition);
        let key = keys.events();
        let length: u64 = self.core.bounded(self.core.client.xlen(&key)).await?;
        let groups: Value = match self
            .core
            .within(
                async { self.core.client.xinfo_groups(&key).await.map_err(classify) },
                Deadline::NONE,
            )
            .await
        {
            Ok(groups) => groups,
            // No log yet: nothing behind.
            Err(StoreError::Corrupt(_)) if length == 0 => return Ok(RelayLag::default()),
            Err(error) => return Err(error),
        };
        let Value::Array(groups) = groups else {
            return Ok(RelayLag {
                pending: 0,
                unread: length,
            });
        };
        for info in groups {
            let fields: Vec<Value> = match info {
                Value::Array(fields) => fields,
                Value::Map(map) => map
                    .inner()
                    .into_iter()
                    .flat_map(|(k, v)| [Value::from(k.as_str().unwrap_or_default().to_owned()), v])
                    .collect(),
                _ => continue,
            };
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|pair| pair[0].as_str().is_some_and(|n| n == name))
                    .and_then(|pair| pair.get(1).cloned())
            };
            if field("name").and_then(|v| v.as_string()).as_deref() != Some(group) {
                continue;
            }
            let pending = field("pending").and_then(|v| v.as_u64()).unwrap_or(0);
            // `lag` is unknown (nil) after entries were deleted from the middle of the
            // log; then everything is counted unread, an overestimate.
            let unread = field("lag").and_then(|v| v.as_u64()).unwrap_or(length);
            return Ok(RelayLag { pending, unread });
        }
        Ok(RelayLag {
            pending: 0,
            unread: length,
        })
    }

    async fn ack_events(
        &self,
        partition: u32,
        group: &str,
        ids: &[String],
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        for id in ids {
            super::parse_event_id(id)?;
        }
        let keys = Keys::new(&self.core.options.key_prefix, partition);
        self.core
            .bounded(self.core.client.xack(keys.events(), group, ids.to_vec()))
            .await
    }

    async fn write_progress(
        &self,
        write: ProgressWrite,
        deadline: Deadline,
    ) -> Result<Progress, StoreError> {
        let key = &write.key;
        let reply = self
            .core
            .run_progress(
                &self.core.scripts.write_progress,
                &key.user,
                &key.profile,
                vec![
                    key.content.to_string(),
                    write.position_ms.to_string(),
                    write.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
                    if write.completed { "1" } else { "0" }.to_owned(),
                    write.device.to_string(),
                    self.core.settings.progress_cap.max(1).to_string(),
                    ms(self.core.settings.progress_retention),
                ],
                deadline,
            )
            .await?;
        progress_at(&reply, 1, &key.user, &key.profile)
    }

    async fn get_progress(
        &self,
        key: &ProgressKey,
        deadline: Deadline,
    ) -> Result<Option<Progress>, StoreError> {
        let reply = self
            .core
            .run_progress(
                &self.core.scripts.get_progress,
                &key.user,
                &key.profile,
                vec![key.content.to_string()],
                deadline,
            )
            .await;
        match reply {
            Ok(reply) => progress_at(&reply, 1, &key.user, &key.profile).map(Some),
            Err(StoreError::NotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn list_progress(
        &self,
        user: &UserId,
        profile: &ProfileId,
        after: Option<&ProgressCursor>,
        limit: usize,
        deadline: Deadline,
    ) -> Result<Vec<Progress>, StoreError> {
        let reply = self
            .core
            .run_progress(
                &self.core.scripts.list_progress,
                user,
                profile,
                vec![
                    after.map(|a| a.updated_ms.to_string()).unwrap_or_default(),
                    after.map(|a| a.content.to_string()).unwrap_or_default(),
                    limit.to_string(),
                ],
                deadline,
            )
            .await?;
        (1..reply.len())
            .map(|i| progress_at(&reply, i, user, profile))
            .collect()
    }

    async fn delete_progress(
        &self,
        key: &ProgressKey,
        deadline: Deadline,
    ) -> Result<bool, StoreError> {
        let reply = self
            .core
            .run_progress(
                &self.core.scripts.delete_progress,
                &key.user,
                &key.profile,
                vec![key.content.to_string()],
                deadline,
            )
            .await?;
        Ok(int_at(&reply, 1)? == 1)
    }

    async fn ended_sessions(&self) -> Result<EndedFeed, StoreError> {
        let subscription = self
            .ended
            .get_or_try_init(|| self.subscribe_stop_channels())
            .await?;
        Ok(EndedFeed::new(subscription.sender.subscribe()))
    }

    async fn seats_in_use(&self) -> Result<u64, StoreError> {
        let counts = (0..self.core.settings.partitions).map(|partition| {
            let key = Keys::new(&self.core.options.key_prefix, partition).deadlines();
            self.core.client.zcard::<u64, _>(key)
        });
        let counts = self
            .core
            .bounded(futures::future::try_join_all(counts))
            .await?;
        Ok(counts.into_iter().sum())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A write, not PING: a Redis out of memory (OOM) or unable to persist (MISCONF)
        // still answers PING but refuses every state change.
        let key = format!("{}:probe", self.core.options.key_prefix);
        self.core
            .bounded(self.core.client.set::<(), _, _>(
                key,
                "1",
                Some(Expiration::PX(10_000)),
                None,
                false,
            ))
            .await
    }

    fn settings(&self) -> &StoreSettings {
        &self.core.settings
    }
}

#[cfg(test)]
mod tests {
    use super::reply::{LIVE_FIELDS, RECORD_FIELDS};
    use super::{HeartbeatEvents, OverLimitPolicy, heartbeat_events_arg, policy_arg};
    use crate::model::{EndReason, PlaybackState, SessionState};
    use crate::store::GENERATION_IDLE_TTL;

    /// Every script's text, the prelude first.
    fn all_scripts() -> String {
        [
            include_str!("scripts/prelude.lua"),
            include_str!("scripts/createSession.lua"),
            include_str!("scripts/deviceCalls.lua"),
            include_str!("scripts/readSeats.lua"),
            include_str!("scripts/sweepExpired.lua"),
            include_str!("scripts/terminateSession.lua"),
        ]
        .concat()
    }

    /// The names Rust sends in ARGV are the ones the scripts compare with, and every
    /// `EndReason` is written by some script under its stored name (one the scripts write
    /// that `EndReason` does not read fails the conformance suite as `Corrupt`).
    #[test]
    fn the_scripts_use_the_names_rust_sends_and_reads() {
        let scripts = all_scripts();
        let quoted = |name: &str| scripts.contains(&format!("'{name}'"));
        // Any other policy name is refused over the limit, as reject_new is.
        assert!(quoted(policy_arg(OverLimitPolicy::StopOldest)));
        for mode in [HeartbeatEvents::Sampled, HeartbeatEvents::All] {
            assert!(quoted(heartbeat_events_arg(mode)), "{mode:?}");
        }
        for reason in EndReason::ALL {
            assert!(quoted(reason.as_str()), "{reason:?} is never written");
        }
    }

    /// The prelude writes a record's fields in the order reply.rs reads them.
    #[test]
    fn the_prelude_writes_records_in_the_order_replies_are_read() {
        let prelude = include_str!("scripts/prelude.lua");
        assert_eq!(RECORD_FIELDS[..6], ["id", "h", "u", "g", "ct", "du"]);
        let head = "local out = {packed(s), s.u, s.g, s.ct, s.du or ''}";
        assert!(prelude.contains(head), "{head}");
        let tail = RECORD_FIELDS[6..]
            .iter()
            .map(|name| format!("'{name}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let tail = format!("local TAIL = {{{tail}}}");
        assert!(prelude.contains(&tail), "{tail}");
        let live = LIVE_FIELDS
            .iter()
            .enumerate()
            .map(|(i, name)| match i {
                0..5 => format!("s.{name}"),
                _ => format!("s.{name} or ''"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let live = format!("local out = {{{live}}}");
        assert!(prelude.contains(&live), "{live}");
    }

    /// The prelude restates the stored codes of the states and the user hash's idle TTL;
    /// they must be model.rs's and store/mod.rs's.
    #[test]
    fn the_prelude_uses_the_stored_codes() {
        let prelude = include_str!("scripts/prelude.lua");
        let states = [
            SessionState::Active,
            SessionState::Paused,
            SessionState::Stopped,
            SessionState::Terminated,
            SessionState::Expired,
            SessionState::Evicted,
        ]
        .map(|state| state.code().to_string())
        .join(", ");
        let line =
            format!("local ACTIVE, PAUSED, STOPPED, TERMINATED, EXPIRED, EVICTED = {states}");
        assert!(prelude.contains(&line), "{line}");
        let playback = format!(
            "local PLAYBACK_PLAYING, PLAYBACK_PAUSED = {}, {}",
            PlaybackState::Playing.code(),
            PlaybackState::Paused.code()
        );
        assert!(prelude.contains(&playback), "{playback}");
        let idle = format!(
            "local GENERATION_IDLE_TTL_MS = {}",
            GENERATION_IDLE_TTL.as_millis()
        );
        assert!(prelude.contains(&idle), "{idle}");
    }
}
