//! Heartbeats that arrive together go to Redis as one script call.
//!
//! A script call may only touch keys of one hash slot on a Cluster, so there each
//! partition has a lane; on a Redis that is not a Cluster [`ONE_REDIS_LANES`] lanes take
//! the heartbeats of every partition (a partition's lane is its number modulo theirs),
//! and a heartbeat costs a fraction of a script call and of a socket write. A lane is a
//! queue and a task, made on its first heartbeat. The task takes what the queue holds
//! (at most [`MAX_BATCH`]), sends it as one deviceCalls script call and, when it
//! returns, takes what queued meanwhile, until the queue is empty; then it waits. An
//! idle lane sends a heartbeat at once, alone; under load the batch grows by itself with
//! the lane's rate and the script's round trip, so nothing waits for a timer. Calls of
//! one lane go in order, one batch at a time.
//!
//! The task owns the batch, so a caller that gives up (its deadline, its stream closed)
//! leaves the others' calls unharmed; its heartbeat is still written, which a second
//! heartbeat would do anyway. The tasks hold the store weakly: they end with it.

use std::sync::{Arc, OnceLock, Weak};

use fred::types::Value;
use tokio::sync::{mpsc, oneshot};

use super::Core;
use super::reply::beat_at;
use crate::deadline::Deadline;
use crate::store::{Beat, DeviceCall, StoreError, partition_of};

/// At most this many heartbeats go in one script call: the script runs alone on its
/// shard, so its length is everyone's wait.
pub(super) const MAX_BATCH: usize = 64;

/// The lanes on a Redis that is not a Cluster: more than one, so that while a batch
/// makes its round trip Redis has another to run, and few, so that batches grow.
const ONE_REDIS_LANES: u32 = 4;

/// The lanes (one per partition, or a few for all), each made on first use.
pub(super) struct Lanes(Box<[OnceLock<mpsc::UnboundedSender<Waiting>>]>);

pub(super) struct Waiting {
    call: DeviceCall,
    /// A stream's heartbeat, answered with what it changed; a unary one is answered
    /// with its session.
    brief: bool,
    answer: oneshot::Sender<Result<Vec<Value>, StoreError>>,
}

impl Lanes {
    /// A lane per partition, or (`across`) [`ONE_REDIS_LANES`] for every partition.
    pub(super) fn new(partitions: u32, across: bool) -> Self {
        let lanes = if across {
            ONE_REDIS_LANES.min(partitions)
        } else {
            partitions
        };
        Self((0..lanes).map(|_| OnceLock::new()).collect())
    }

    fn of(&self, partition: u32) -> &OnceLock<mpsc::UnboundedSender<Waiting>> {
        &self.0[partition as usize % self.0.len()]
    }
}

/// A heartbeat, sent with whatever else its lane has waiting: its answer as the
/// deviceCalls script gave it (`brief`: what it changed).
pub(super) async fn beat(
    core: &Arc<Core>,
    call: DeviceCall,
    brief: bool,
    deadline: Deadline,
) -> Result<Vec<Value>, StoreError> {
    let partition = partition_of(&call.name.user, core.settings.partitions);
    let lane = core.lanes.of(partition).get_or_init(|| {
        let (sender, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_batches(Arc::downgrade(core), queue));
        sender
    });
    let (answer, answered) = oneshot::channel();
    lane.send(Waiting {
        call,
        brief,
        answer,
    })
    .map_err(|_| StoreError::Unavailable("the heartbeat lane has stopped".into()))?;
    core.within(
        async {
            answered.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the heartbeat's batch was dropped".into(),
                ))
            })
        },
        deadline,
    )
    .await
}

/// A lane's task: sends its queue as batches, for as long as the store lives. A batch
/// with both kinds of heartbeat is two script calls, sent together.
async fn send_batches(core: Weak<Core>, mut queue: mpsc::UnboundedReceiver<Waiting>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(waiting) => batch.push(waiting),
                Err(_) => break,
            }
        }
        let Some(core) = core.upgrade() else {
            return;
        };
        let (brief, full): (Vec<Waiting>, Vec<Waiting>) =
            batch.into_iter().partition(|waiting| waiting.brief);
        futures::join!(send(&core, brief, true), send(&core, full, false));
    }
}

/// One script call for `batch` (nothing when it is empty), each answer to its caller.
async fn send(core: &Core, batch: Vec<Waiting>, brief: bool) {
    if batch.is_empty() {
        return;
    }
    let (calls, answers): (Vec<DeviceCall>, Vec<_>) = batch
        .into_iter()
        .map(|waiting| (waiting.call, waiting.answer))
        .unzip();
    // Each caller waits within its own deadline; the batch within the store's.
    match core.device_calls(&calls, brief, Deadline::NONE).await {
        Ok(results) => {
            for (answer, result) in answers.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        }
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Err(error.clone()));
            }
        }
    }
}

/// Heartbeats as one script call (of one partition on a Cluster): what each changed.
pub(super) async fn together(
    core: &Core,
    calls: &[DeviceCall],
    deadline: Deadline,
) -> Result<Vec<Result<Beat, StoreError>>, StoreError> {
    let answers = core.device_calls(calls, true, deadline).await?;
    Ok(answers
        .into_iter()
        .map(|answer| answer.and_then(|reply| beat_at(&reply, 1)))
        .collect())
}
