//! Heartbeats of one partition that arrive together go to Redis as one script call.
//!
//! Each partition has a lane. A heartbeat joins its lane's queue; when no batch of the
//! lane is in flight, a task sends the queue (at most [`MAX_BATCH`]) as one
//! deviceCalls script call and, when it returns, the calls that queued meanwhile, until
//! the queue is empty. An idle lane sends a heartbeat at once, alone; under load the
//! batch grows by itself with the partition's rate and the script's round trip, so
//! nothing waits for a timer. Calls of one partition go in order, one batch at a time.
//!
//! The task owns the batch, so a caller that gives up (its deadline, its stream closed)
//! leaves the others' calls unharmed; its heartbeat is still written, which a second
//! heartbeat would do anyway.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::Core;
use super::reply::beat_at;
use crate::deadline::Deadline;
use crate::store::{Beat, DeviceCall, StoreError, partition_of};

/// At most this many heartbeats go in one script call: the script runs alone on its
/// shard, so its length is everyone's wait.
pub(super) const MAX_BATCH: usize = 64;

/// One lane per partition.
pub(super) struct Lanes(Box<[Mutex<Lane>]>);

#[derive(Default)]
struct Lane {
    /// A task is sending this lane's batches.
    busy: bool,
    waiting: Vec<Waiting>,
}

struct Waiting {
    call: DeviceCall,
    answer: oneshot::Sender<Result<Beat, StoreError>>,
}

impl Lanes {
    pub(super) fn new(partitions: u32) -> Self {
        Self((0..partitions).map(|_| Mutex::default()).collect())
    }

    fn lane(&self, partition: u32) -> std::sync::MutexGuard<'_, Lane> {
        // A lane holds no invariant a panic could break halfway: keep using it.
        self.0[partition as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A heartbeat, sent with whatever else its partition has waiting: what it changed.
pub(super) async fn beat(
    core: &Arc<Core>,
    call: DeviceCall,
    deadline: Deadline,
) -> Result<Beat, StoreError> {
    let partition = partition_of(&call.name.user, core.settings.partitions);
    let (answer, answered) = oneshot::channel();
    let start = {
        let mut lane = core.lanes.lane(partition);
        lane.waiting.push(Waiting { call, answer });
        !std::mem::replace(&mut lane.busy, true)
    };
    if start {
        tokio::spawn(send_batches(core.clone(), partition));
    }
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

/// Sends the lane's queue as batches until it is empty.
async fn send_batches(core: Arc<Core>, partition: u32) {
    loop {
        let batch: Vec<Waiting> = {
            let mut lane = core.lanes.lane(partition);
            if lane.waiting.is_empty() {
                lane.busy = false;
                return;
            }
            let count = lane.waiting.len().min(MAX_BATCH);
            lane.waiting.drain(..count).collect()
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
