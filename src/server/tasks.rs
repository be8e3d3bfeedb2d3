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

/// Expires overdue sessions, so their seats and events do not wait for the user's next
/// create. Each tick sweeps only the partitions that may have something due: a sweep
/// says how long until the partition's earliest deadline, and it is not looked at again
/// before then, nor later than the horizon (see `next_look`). So an idle partition costs
/// one sweep per horizon, not one per tick, and the work follows the sessions, not the
/// partition count. A partition that fails is swept again at the next tick and the others
/// are swept all the same; a partition with more than a batch overdue is swept again
/// within the tick, which ends at the next tick's time at the latest.
pub(super) fn spawn_sweeper(
    store: Arc<dyn Store>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let settings = store.settings();
        let horizon = sweep_horizon(settings.heartbeat_timeout, settings.max_pause, every);
        let partitions = settings.partitions;
        // Every partition is swept at the first tick: sessions may have been left overdue
        // while no instance ran.
        let mut due_at = vec![tokio::time::Instant::now(); partitions as usize];
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let now = tokio::time::Instant::now();
            let budget = now + every;
            let mut expired = 0;
            for partition in 0..partitions {
                let due = &mut due_at[partition as usize];
                if *due > now {
                    continue;
                }
                let (swept, next_due) = sweep_partition(store.as_ref(), partition, budget).await;
                expired += swept;
                *due = now + next_look(next_due, horizon, partition);
            }
            crate::observe::sweep(expired);
            crate::observe::sessions_ended("expired_by_sweeper", expired);
        }
    })
}

/// The longest a partition goes unswept. Every deadline written after a sweep is at
/// least this far from it: a heartbeat, a create or a resume sets `heartbeat_timeout`
/// from now, and a pause that begins now at most `max_pause` from now (earlier deadlines
/// were already in the partition when it was swept, and the sweep reported the earliest).
/// Never below the tick. An instance configured with shorter timeouts than this one's
/// may see its sessions swept up to this late; every call still finds them over on time.
fn sweep_horizon(heartbeat_timeout: Duration, max_pause: Duration, every: Duration) -> Duration {
    heartbeat_timeout.min(max_pause).max(every)
}

/// When to look at a partition again after a sweep that reported `next_due` (`None`:
/// the sweep failed, look at the next tick). A partition with nothing due within the
/// horizon is looked at between half the horizon and the horizon (spread by partition,
/// so partitions do not all come due in the same tick).
fn next_look(next_due: Option<Option<Duration>>, horizon: Duration, partition: u32) -> Duration {
    let spread = horizon / 2 + horizon / 2 * (partition.wrapping_mul(2_654_435_761) % 1024) / 1024;
    match next_due {
        None => Duration::ZERO,
        Some(Some(due)) if due < spread => due,
        Some(_) => spread,
    }
}

/// Sweeps one partition until it has nothing overdue, fails, or the budget is spent.
/// Returns how many sessions it expired, and how long until its earliest deadline left
/// (`None` when a sweep failed; `Some(None)` when it holds no deadline).
async fn sweep_partition(
    store: &dyn Store,
    partition: u32,
    budget: tokio::time::Instant,
) -> (u64, Option<Option<Duration>>) {
    let mut total = 0;
    loop {
        match store.sweep(partition, SWEEP_BATCH).await {
            Ok(swept) => {
                if swept.expired > 0 {
                    tracing::info!(partition, expired = swept.expired, "expired sessions swept");
                }
                total += u64::from(swept.expired);
                let next_due = swept.next_due_ms.map(Duration::from_millis);
                if swept.expired < SWEEP_BATCH || tokio::time::Instant::now() >= budget {
                    return (total, Some(next_due));
                }
            }
            Err(error) => {
                tracing::warn!(partition, %error, "sweep failed");
                return (total, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_looked_at_again_when_something_can_be_due() {
        let ms = Duration::from_millis;
        // Timeout, maximum pause, tick (ms): the shorter of the first two, at least the tick.
        let horizon_of = |timeout, pause, tick| sweep_horizon(ms(timeout), ms(pause), ms(tick));
        let horizon = horizon_of(60_000, 1_800_000, 1_000);
        assert_eq!(horizon, ms(60_000));
        assert_eq!(horizon_of(60_000, 20_000, 1_000), ms(20_000));
        assert_eq!(horizon_of(50, 20_000, 1_000), ms(1_000));
        // A failed sweep: the next tick. Something due soon: then.
        assert_eq!(next_look(None, horizon, 7), Duration::ZERO);
        let soon = Duration::from_millis(1500);
        assert_eq!(next_look(Some(Some(soon)), horizon, 7), soon);
        assert_eq!(
            next_look(Some(Some(Duration::ZERO)), horizon, 7),
            Duration::ZERO
        );
        // Nothing due within the horizon: between half of it and all of it, spread.
        let looks: Vec<Duration> = (0..1024)
            .map(|p| next_look(Some(None), horizon, p))
            .collect();
        assert!(looks.iter().all(|l| *l >= horizon / 2 && *l <= horizon));
        let distinct: std::collections::HashSet<_> = looks.iter().collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
        let far = Some(Some(Duration::from_secs(3600)));
        assert!(next_look(far, horizon, 7) <= horizon);
    }
}
