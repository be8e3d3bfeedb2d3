//! Heartbeats of one partition that arrive together go to Redis as one script call.
//!
//! Each partition has a lane: a queue and a task, made on the partition's first
//! heartbeat. The task takes what the queue holds (at most [`MAX_BATCH`]), sends it as
//! one deviceCalls script call and, when it returns, takes what queued meanwhile, until
//! the queue is empty; then it waits. An idle lane sends a heartbeat at once, alone;
//! under load the batch grows by itself with the partition's rate and the script's round
//! trip, so nothing waits for a timer. Calls of one partition go in order, one batch at a
//! time.
//!
//! The task owns the batch, so a caller that gives up (its deadline, its stream closed)
//! leaves the others' calls unharmed; its heartbeat is still written, which a second
//! heartbeat would do anyway. The tasks hold the store weakly: they end with it.

use std::sync::{Arc, OnceLock, Weak};

use tokio::sync::{mpsc, oneshot};

use super::Core;
use super::reply::beat_at;
use crate::deadline::Deadline;
use crate::store::{Beat, DeviceCall, StoreError, partition_of};

/// At most this many heartbeats go in one script call: the script runs alone on its
/// shard, so its length is everyone's wait.
pub(super) const MAX_BATCH: usize = 64;

/// One lane per partition, each made on first use.
pub(super) struct Lanes(Box<[OnceLock<mpsc::UnboundedSender<Waiting>>]>);

pub(super) struct Waiting {
    call: DeviceCall,
    answer: oneshot::Sender<Result<Beat, StoreError>>,
}

impl Lanes {
    pub(super) fn new(partitions: u32) -> Self {
        Self((0..partitions).map(|_| OnceLock::new()).collect())
    }
}

/// A heartbeat, sent with whatever else its partition has waiting: what it changed.
pub(super) async fn beat(
    core: &Arc<Core>,
    call: DeviceCall,
    deadline: Deadline,
) -> Result<Beat, StoreError> {
    let partition = partition_of(&call.name.user, core.settings.partitions);
    let lane = core.lanes.0[partition as usize].get_or_init(|| {
        let (sender, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_batches(Arc::downgrade(core), queue));
        sender
    });
    let (answer, answered) = oneshot::channel();
    lane.send(Waiting { call, answer })
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

/// A lane's task: sends its queue as batches, for as long as the store lives.
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
        let (calls, answers): (Vec<DeviceCall>, Vec<_>) = batch
            .into_iter()
            .map(|waiting| (waiting.call, waiting.answer))
            .unzip();
        // Each caller waits within its own deadline; the batch within the store's.
        match together(&core, &calls, Deadline::NONE).await {
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
}

/// Heartbeats of sessions of one partition as one script call: what each changed.
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
