//! The background tasks of a running server: the store probe (readiness on a `watch`
//! channel), the sweeper, and the SIGHUP reloader.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{Authenticator, Credentials};
use crate::store::Store;
use crate::token::Tokens;

/// How many sessions one sweep of one partition expires at most.
const SWEEP_BATCH: u32 = 500;
/// How often the store is pinged for readiness.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// The seats-in-use gauge is refreshed every this many probes (about 16 s).
const SEATS_EVERY: u64 = 8;

/// Pings the store (a write: see `Store::ping`) every `HEALTH_PROBE_INTERVAL` and
/// publishes whether it is ready on a `watch` channel, which gRPC health follows (and a
/// `/readyz` will). Ends when `stop` changes.
pub(super) fn spawn_store_probe(
    store: Arc<dyn Store>,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Option<bool>>, JoinHandle<()>) {
    let (ready, readiness) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut probes = 0u64;
        loop {
            let answer = match store.ping().await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%error, "store ping failed");
                    false
                }
            };
            ready.send_if_modified(|last| {
                let changed = *last != Some(answer);
                *last = Some(answer);
                changed
            });
            // Every SEATS_EVERY probes, the seats-in-use gauge (it reads every partition).
            probes += 1;
            if answer && probes % SEATS_EVERY == 1 {
                match store.seats_in_use().await {
                    Ok(count) => crate::observe::seats_in_use(count),
                    Err(error) => tracing::warn!(%error, "counting seats in use failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(HEALTH_PROBE_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    });
    (readiness, task)
}

/// Expires overdue sessions of every partition, so their seats and events do not wait for
/// the user's next create. A partition that fails is logged and the others are swept all
/// the same; a partition with more than a batch overdue is swept again within the tick,
/// which ends at the next tick's time at the latest.
pub(super) fn spawn_sweeper(
    store: Arc<dyn Store>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let partitions = store.settings().partitions;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let budget = tokio::time::Instant::now() + every;
            let mut expired = 0;
            for partition in 0..partitions {
                expired += sweep_partition(store.as_ref(), partition, budget).await;
            }
            crate::observe::sweep(expired);
            crate::observe::sessions_ended("expired_by_sweeper", expired);
        }
    })
}

/// Sweeps one partition until it has nothing overdue, fails, or the budget is spent.
/// Returns how many sessions it expired.
async fn sweep_partition(store: &dyn Store, partition: u32, budget: tokio::time::Instant) -> u64 {
    let mut total = 0;
    loop {
        match store.sweep(partition, SWEEP_BATCH).await {
            Ok(0) => return total,
            Ok(expired) => {
                tracing::info!(partition, expired, "expired sessions swept");
                total += u64::from(expired);
                if expired < SWEEP_BATCH || tokio::time::Instant::now() >= budget {
                    return total;
                }
            }
            Err(error) => {
                tracing::warn!(partition, %error, "sweep failed");
                return total;
            }
        }
    }
}

/// Reloads what can be reloaded on SIGHUP: the token key set (when it comes from a file)
/// and the service credentials (when `--credentials` names a file). A failed reload
/// keeps what is in force. SIGHUP never stops the process: the handler is installed
/// before the server listens, whatever the configuration, so the signal's default
/// action (terminate) never applies.
pub(super) fn spawn_hangup_handler(
    tokens: Arc<Tokens>,
    authenticator: Arc<Authenticator>,
    credentials_file: Option<std::path::PathBuf>,
) -> Option<JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: keys reload on file changes only");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                if tokens.reloadable() {
                    match tokens.reload() {
                        Ok(()) => {}
                        Err(error) => tracing::error!(
                            %error,
                            "token keys not reloaded: the keys in force stay"
                        ),
                    }
                } else {
                    tracing::info!("token keys are ephemeral (no --token-keys): nothing to reload");
                }
                if let Some(path) = &credentials_file {
                    match Credentials::load(path) {
                        Ok(credentials) => {
                            authenticator.replace_credentials(credentials);
                            tracing::info!(file = %path.display(), "credentials reloaded");
                        }
                        Err(error) => tracing::error!(
                            %error,
                            "credentials not reloaded: the credentials in force stay"
                        ),
                    }
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = (tokens, authenticator, credentials_file);
        None
    }
}
