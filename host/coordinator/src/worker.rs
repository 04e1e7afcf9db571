//! One host's share of a stream: takes and renews leases (KCL's protocol), runs one reader
//! task per held shard, checkpoints, follows resharding, and on shutdown finishes the batches
//! in flight, checkpoints and releases its leases so another host takes them at once.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesis::Client as KinesisClient;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinSet;

use crate::checkpoint::Checkpoint;
use crate::efo::{EfoError, FanOut, Source};
use crate::kpl;
use crate::lease::{Billing, Lease, LeaseError, LeaseTable};
use crate::reader::{ReadError, list_shards};
use crate::state::{self, StateChange, StateError, StateMap, StateRef};

/// A user record ready for a task: de-aggregated, in shard order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRecord {
    /// The Kinesis record's sequence number.
    pub sequence_number: String,
    /// The position inside a KPL aggregate, 0 otherwise.
    pub sub_sequence_number: u64,
    /// The partition key.
    pub partition_key: String,
    /// The explicit hash key, if any.
    pub explicit_hash_key: Option<String>,
    /// The data: a slice of the fetched Kinesis record, not a copy.
    pub data: bytes::Bytes,
    /// When Kinesis accepted the record, in milliseconds since the Unix epoch.
    pub arrival_millis: u64,
}

/// Why a shard's processor stopped.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProcessorError {
    /// Leading records that were done (outputs acknowledged) before the failure; the worker
    /// checkpoints after them before stopping the shard.
    pub done: usize,
    /// What went wrong.
    pub message: String,
}

/// Processes one shard's records; created when the worker takes the shard's lease.
pub trait ShardProcessor: Send + 'static {
    /// Processes `records` in order and sends their outputs. Returns how many leading records
    /// are done (their outputs acknowledged): the worker may checkpoint after them. Fewer than
    /// all, or an error, stops the shard on this host.
    fn process(
        &mut self,
        records: Arc<Vec<ShardRecord>>,
        millis_behind_latest: Option<i64>,
    ) -> impl Future<Output = Result<usize, ProcessorError>> + Send;

    /// Called once when the shard stops on this host (shutdown, lease lost, shard end).
    fn close(self) -> impl Future<Output = ()> + Send;

    /// Called once before the first `process`: the task state that matches the checkpoint the
    /// shard resumes from (restored from the lease, or inherited from the parent shards).
    fn restore_state(&mut self, state: &StateMap) {
        let _ = state;
    }

    /// The state changes of the records the last `process` call reported done (also when it
    /// returned an error with `done` > 0), in order; each call drains them. The worker stores
    /// the state with the checkpoint after those records.
    fn take_state_changes(&mut self) -> Vec<StateChange> {
        Vec::new()
    }

    /// Called once before the first `process`: `stop` turns true when the shard is asked to
    /// stop on this host (shutdown, hand-off). A processor that watches it may end a `process`
    /// call early, returning fewer than all records as done: the worker then checkpoints after
    /// them and stops the shard without counting a failure.
    fn watch_stop(&mut self, stop: watch::Receiver<bool>) {
        let _ = stop;
    }
}

/// Creates processors.
pub trait ProcessorFactory: Send + Sync + 'static {
    /// The processor type.
    type Processor: ShardProcessor;
    /// A processor for `shard_id` of `stream`.
    fn create(&self, stream: &str, shard_id: &str) -> Self::Processor;
}

/// How the worker behaves (KCL's settings).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The job's name: the `job` label of this worker's metrics.
    pub job: String,
    /// This host's worker id (the `leaseOwner` it writes).
    pub worker_id: String,
    /// The stream.
    pub stream: String,
    /// Where new shards start: `TrimHorizon`, `Latest` or `AtTimestamp`.
    pub initial_position: Checkpoint,
    /// The time for `AtTimestamp`.
    pub at_timestamp: Option<SystemTime>,
    /// A lease not renewed for this long is expired.
    pub failover_time: Duration,
    /// How often shards are listed to find new ones.
    pub shard_sync_interval: Duration,
    /// Pause between reads of one shard.
    pub idle_time_between_reads: Duration,
    /// `GetRecords` limit.
    pub max_records: u32,
    /// Most leases this host holds.
    pub max_leases_for_worker: usize,
    /// Most leases stolen in one round.
    pub max_leases_to_steal_at_one_time: usize,
    /// Delete a finished shard's lease once its children started.
    pub cleanup_leases_upon_shard_completion: bool,
    /// Call the processor even when a read returned no record.
    pub call_process_records_even_for_empty_list: bool,
    /// Least time between two checkpoints of a shard (Samza's `task.commit.ms`); shard end,
    /// shutdown and lease hand-over always checkpoint.
    pub commit_interval: Duration,
    /// Billing of the lease table, when this host creates it.
    pub billing: Billing,
    /// Enhanced fan-out (`SubscribeToShard`) instead of polling, when set.
    pub fan_out: Option<Arc<FanOut>>,
    /// Largest task state snapshot carried inline in the lease item; a larger one goes to the
    /// companion table `<lease table>-state` (capped at [`state::MAX_INLINE_BYTES`]).
    pub state_inline_max_bytes: usize,
    /// How long a host that steals a live lease waits for its owner to finish, checkpoint and
    /// hand the lease over, before it takes the lease anyway; zero steals at once.
    pub graceful_handoff_timeout: Duration,
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The lease table failed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Kinesis failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The enhanced fan-out consumer could not be found or registered.
    #[error(transparent)]
    FanOut(#[from] EfoError),
}

/// A lease this host holds, shared by the renewer and the shard's task. Both write under the
/// lock, so their conditional writes never race each other.
#[derive(Debug)]
struct Held {
    lease: Mutex<Lease>,
    /// When the lease was last written by us (renew or checkpoint).
    renewed: std::sync::Mutex<Instant>,
    stop: watch::Sender<bool>,
    /// The host this one was asked to hand the lease over to (a graceful hand-off).
    handoff: std::sync::Mutex<Option<String>>,
}

/// Lease writes (hand-off requests, takes) one lease scan has in flight at once. Issued one
/// after another, a host starting beside 512 free leases, or taking a crashed host's share,
/// waited 512 DynamoDB round trips (5 to 10 ms each) before its last shard started. 32 cut
/// that to 16 round trips while staying a modest burst for the table (KCL renews leases with a
/// pool of 20 threads) and for the client's connection pool (`MaxConnections`, when set, makes
/// the excess wait for a connection, not fail).
const CONCURRENT_LEASE_WRITES: usize = 32;

/// The pause before the first shard sync is retried after a lease-table error; it doubles up to
/// [`FIRST_SYNC_LAST_PAUSE`] (four tries in about 7 s).
const FIRST_SYNC_FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The last pause before the first shard sync gives up.
const FIRST_SYNC_LAST_PAUSE: Duration = Duration::from_secs(4);

/// Shards whose processing failed on this host, and until when this host leaves them to others
/// (doubling from the failover time up to five minutes).
type Cooldown = Arc<std::sync::Mutex<HashMap<String, (Instant, u32)>>>;

/// Runs the worker until `shutdown` completes, then stops gracefully.
///
/// # Errors
/// When the lease table cannot be created or read at start.
pub async fn run<F: ProcessorFactory>(
    kinesis: KinesisClient,
    table: LeaseTable,
    config: WorkerConfig,
    factory: Arc<F>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    run_with(kinesis, table, config, factory, shutdown, || {}).await
}

/// [`run`], calling `started` once the worker has started: the lease table exists (created or
/// verified), the first shard sync created the missing leases, and the first lease scan
/// succeeded (whether or not it took leases). A readiness probe waits for this. `started` is
/// never called when the worker fails before that, or is stopped first.
///
/// The worker records metrics through the [`metrics`] facade (a no-op unless the process
/// installed a recorder), each labelled with the `stream`:
///
/// - `kinesis_host_leases_held` (gauge): leases this host holds, updated at every lease scan;
/// - `kinesis_host_leases_taken_total`: leases taken, stolen ones included;
/// - `kinesis_host_leases_stolen_total`: leases taken from a live owner to balance the load;
/// - `kinesis_host_leases_lost_total`: held leases another host took (or that expired here);
/// - `kinesis_host_leases_released_total`: leases released (at a stop, or when a shard failed);
/// - `kinesis_host_leases_handed_over_total`: leases handed over, after a checkpoint, to a host
///   that asked for them (a graceful hand-off);
/// - `kinesis_host_lease_renewal_failures_total`: renewals that failed for a reason other than
///   a lost lease (the renewal is retried at the next tick);
/// - `kinesis_host_checkpoints_total` (also labelled `shard`): checkpoints written;
/// - `kinesis_host_shards_stopped_total`: shards stopped on this host by a failure (task, read
///   or lease error), to be retried later.
///
/// # Errors
/// As [`run`].
pub async fn run_with<F: ProcessorFactory>(
    kinesis: KinesisClient,
    table: LeaseTable,
    config: WorkerConfig,
    factory: Arc<F>,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(),
) -> Result<(), WorkerError> {
    let mut started = Some(started);
    let leases_held = metrics::gauge!("kinesis_host_leases_held", "job" => config.job.clone(), "stream" => config.stream.clone());
    table.ensure_exists(config.billing, Duration::from_secs(600)).await?;
    // The worker starts only once every shard has a lease. Creating hundreds of them can meet
    // throttling on a provisioned table beyond what the SDK retries, so a lease-table error gets
    // a few more tries (creation is conditional: repeating it is harmless); Kinesis errors, such
    // as a stream that does not exist, fail at once.
    let mut pause = FIRST_SYNC_FIRST_PAUSE;
    loop {
        match sync_shards(&kinesis, &table, &config).await {
            Err(WorkerError::Lease(error)) if pause <= FIRST_SYNC_LAST_PAUSE => {
                tracing::warn!(stream = %config.stream, %error, retry_in = ?pause, "Creating the stream's leases failed; retrying.");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            done => break done?,
        }
    }
    if let Some(fan_out) = &config.fan_out {
        fan_out.consumer_arn(&kinesis, &config.stream).await?;
    }
    let config = Arc::new(config);
    let held: Arc<std::sync::Mutex<HashMap<String, Arc<Held>>>> = Arc::default();
    let wake = Arc::new(Notify::new());
    let cooldown: Cooldown = Arc::default();
    let mut tasks = JoinSet::new();
    let mut seen: HashMap<String, (u64, Instant)> = HashMap::new();
    // Leases this host asked their owners to hand over, and since when.
    let mut handoffs: HashMap<String, Instant> = HashMap::new();
    let tick = (config.failover_time / 3)
        .saturating_sub(Duration::from_millis(25))
        .max(Duration::from_millis(50));
    let mut last_sync = Instant::now();
    tokio::pin!(shutdown);
    // Damaged lease items reported so far, and how: each is logged once (again if it changes).
    let mut damaged: HashMap<String, String> = HashMap::new();
    let mut failure = None;
    loop {
        renew_all(&table, &held, &config).await;
        match take_leases(
            &kinesis,
            &table,
            &config,
            &factory,
            &held,
            &wake,
            &cooldown,
            &mut tasks,
            &mut seen,
            &mut handoffs,
            &mut damaged,
        )
        .await
        {
            Ok(()) => {
                if let Some(started) = started.take() {
                    started();
                }
            }
            Err(error @ LeaseError::TableGone { .. }) if !table.exists().await.unwrap_or(true) => {
                // Recreating it would start every shard again from InitialPositionInStream
                // without a word (re-processing or skipping records): stop instead, loudly.
                tracing::error!(stream = %config.stream, table = %table.name(), "The lease table was deleted while the job ran: stopping every shard of the stream. Started again, the job creates a new, empty table and every shard starts at InitialPositionInStream.");
                failure = Some(WorkerError::Lease(error));
                break;
            }
            Err(error) => {
                count("kinesis_host_lease_scan_failures_total", &config);
                tracing::warn!(stream = %config.stream, %error, "Lease scan failed; retrying at the next tick.");
            }
        }
        leases_held.set(held_count(&held) as f64);
        if last_sync.elapsed() >= config.shard_sync_interval {
            last_sync = Instant::now();
            let synced =
                tokio::time::timeout(config.failover_time, sync_shards(&kinesis, &table, &config));
            match synced.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "Shard sync failed; retrying later."),
                Err(_) => {
                    tracing::warn!(after = ?config.failover_time, "Shard sync was not done within the failover time (DynamoDB or Kinesis unreachable or slow?); retrying later.")
                }
            }
        }
        while let Some(done) = tasks.try_join_next() {
            if let Err(error) = done {
                tracing::error!(%error, "A shard task panicked.");
            }
        }
        // Sleep one renewal interval, or less: until the next lease of another host would
        // expire if its counter stays still, so a crashed host's shards are taken at expiry
        // rather than up to one interval after it.
        let pause = {
            let mine: HashSet<String> = held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned()
                .collect();
            let now = Instant::now();
            seen.iter()
                .filter(|(key, _)| !mine.contains(*key))
                .map(|(_, (_, changed))| {
                    *changed + config.failover_time + Duration::from_millis(25)
                })
                .filter(|expiry| *expiry > now)
                .min()
                .map_or(tick, |expiry| (expiry - now).min(tick))
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
    if let Some(failure) = failure {
        // The leases are gone with the table: stop the shards (their checkpoints fail), release
        // nothing.
        for h in held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values() {
            let _ = h.stop.send(true);
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(error) = done {
                tracing::error!(%error, "A shard task panicked.");
            }
        }
        leases_held.set(0.0);
        return Err(failure);
    }
    tracing::info!(stream = %config.stream, "Shutting down: finishing batches in flight.");
    // Hand-offs asked for and not completed: give the leases back to their owners, so they do
    // not hand them over to a host that is going away.
    for key in handoffs.keys() {
        let cancel = table.cancel_handoff(key, &config.worker_id);
        if let Err(error) =
            table.within("UpdateItem (hand-off withdrawal)", config.failover_time, cancel).await
        {
            tracing::warn!(lease = %key, %error, "Could not withdraw the hand-off request; the lease is taken by another host when it expires.");
        }
    }
    for h in held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values() {
        let _ = h.stop.send(true);
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(error) = done {
            tracing::error!(%error, "A shard task panicked.");
        }
    }
    let remaining: Vec<Arc<Held>> = held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drain()
        .map(|(_, h)| h)
        .collect();
    for h in remaining {
        let lease = h.lease.lock().await;
        match table
            .within("UpdateItem (release)", config.failover_time, table.release(&lease))
            .await
        {
            Ok(()) => {
                count("kinesis_host_leases_released_total", &config);
            }
            Err(error) => {
                if matches!(error, LeaseError::Lost { .. }) {
                    count("kinesis_host_leases_lost_total", &config);
                }
                tracing::warn!(lease = %lease.key, %error, "Could not release lease; it will expire.");
            }
        }
    }
    leases_held.set(0.0);
    Ok(())
}

/// Adds one to the counter `name` of the worker's job and stream.
fn count(name: &'static str, config: &WorkerConfig) {
    metrics::counter!(name, "job" => config.job.clone(), "stream" => config.stream.clone())
        .increment(1);
}

/// How many leases this host holds, for the `kinesis_host_leases_held` gauge.
fn held_count(held: &std::sync::Mutex<HashMap<String, Arc<Held>>>) -> usize {
    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
}

/// Creates leases for shards that have none, KCL-style: the initial position for shards whose
/// ancestors have no lease, `TRIM_HORIZON` for descendants (so nothing is skipped).
async fn sync_shards(
    kinesis: &KinesisClient,
    table: &LeaseTable,
    config: &WorkerConfig,
) -> Result<(), WorkerError> {
    let shards = list_shards(kinesis, &config.stream).await?;
    let leases: HashSet<String> = table.list().await?.into_iter().map(|l| l.key).collect();
    let ids: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    let closed: HashSet<&str> =
        shards.iter().flat_map(|s| s.parents.iter().map(String::as_str)).collect();
    let mut to_create = Vec::new();
    for shard in &shards {
        if leases.contains(&shard.id) {
            continue;
        }
        let known_parents: Vec<String> =
            shard.parents.iter().filter(|p| ids.contains(p.as_str())).cloned().collect();
        let parent_leased = shard.parents.iter().any(|p| leases.contains(p));
        let checkpoint = if parent_leased {
            Checkpoint::TrimHorizon
        } else if known_parents.is_empty() || config.initial_position == Checkpoint::Latest {
            if config.initial_position == Checkpoint::Latest && closed.contains(shard.id.as_str()) {
                continue; // LATEST starts at the open shards only
            }
            config.initial_position.clone()
        } else {
            Checkpoint::TrimHorizon
        };
        let parents = if config.initial_position == Checkpoint::Latest && !parent_leased {
            Vec::new()
        } else {
            known_parents
        };
        let mut lease = Lease::new(&shard.id, checkpoint, parents);
        lease.hash_range = Some(shard.hash_range.clone());
        to_create.push(lease);
    }
    // A new table for a 512-shard stream is 512 conditional puts: sent together, bounded as the
    // takes are, but a parent's lease always before its children's. A host scanning the table
    // meanwhile treats a child whose parent has no lease as ready to start, so a child created
    // first could be read before its parent. After an error no new put starts; those in flight
    // finish (a put is conditional: creating a lease twice is harmless) and the first error
    // fails the sync.
    for generation in parents_first(&to_create) {
        let mut leases = generation.into_iter();
        let mut creates = FuturesUnordered::new();
        let mut first_error = None;
        loop {
            while first_error.is_none() && creates.len() < CONCURRENT_LEASE_WRITES {
                let Some(lease) = leases.next() else { break };
                creates.push(async move { (lease, table.create_if_not_exists(lease).await) });
            }
            let Some((lease, created)) = creates.next().await else { break };
            match created {
                Ok(true) => {
                    tracing::info!(lease = %lease.key, checkpoint = %lease.checkpoint, "Created lease.");
                }
                Ok(false) => {}
                Err(error) => keep_first(&mut first_error, lease, error),
            }
        }
        if let Some(error) = first_error {
            return Err(error.into());
        }
    }
    Ok(())
}

/// `leases` in generations: the first has the leases none of whose parents is among `leases`,
/// each next one the leases whose parents are all in earlier generations.
fn parents_first(leases: &[Lease]) -> Vec<Vec<&Lease>> {
    let mut placed: HashSet<&str> = HashSet::new();
    let pending: HashSet<&str> = leases.iter().map(|l| l.key.as_str()).collect();
    let mut rest: Vec<&Lease> = leases.iter().collect();
    let mut generations = Vec::new();
    while !rest.is_empty() {
        let (now, later): (Vec<&Lease>, Vec<&Lease>) = rest.into_iter().partition(|lease| {
            lease
                .parent_shard_ids
                .iter()
                .all(|p| !pending.contains(p.as_str()) || placed.contains(p.as_str()))
        });
        if now.is_empty() {
            // A cycle cannot come from Kinesis; create the rest rather than loop.
            generations.push(later);
            break;
        }
        placed.extend(now.iter().map(|l| l.key.as_str()));
        generations.push(now);
        rest = later;
    }
    generations
}

/// Renews every held lease, all at once: when the runtime is saturated by reading (hundreds of
/// shards decoding full answers), every await waits a round of the run queue, and renewing
/// 512 leases one after another overran the failover time (the benchmark suite saw the host
/// drop its own leases). KCL renews on a thread pool for the same reason.
async fn renew_all(
    table: &LeaseTable,
    held: &Arc<std::sync::Mutex<HashMap<String, Arc<Held>>>>,
    config: &Arc<WorkerConfig>,
) {
    // Half the failover time: a renewal later than that cannot be relied on to land before
    // the lease expires, and one that timed out is retried at the next tick.
    let bound = config.failover_time / 2;
    let all: Vec<(String, Arc<Held>)> = held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let total = all.len();
    let mut renewals = JoinSet::new();
    for (key, h) in all {
        let (table, held, config) = (table.clone(), held.clone(), config.clone());
        renewals.spawn(async move {
            // The lease lock may be held by a checkpoint waiting for DynamoDB: the renewal gets
            // `bound` in all, then counts as failed.
            let renewal = async {
                let lease = h.lease.lock().await;
                let since = h.renewed.lock().map(|r| r.elapsed()).unwrap_or(Duration::MAX);
                let result = if since > config.failover_time {
                    Err(None)
                } else {
                    table.renew(&lease).await.map_err(Some)
                };
                (lease, since, result)
            };
            let Ok((mut lease, since, result)) = tokio::time::timeout(bound, renewal).await else {
                count("kinesis_host_lease_renewal_failures_total", &config);
                let error = format!("not answered within {} ms", bound.as_millis());
                tracing::debug!(lease = %key, %error, "Lease renewal failed.");
                return Some(error);
            };
            match result {
                Ok(renewed) => {
                    // Another host asked for the lease (KCL 3.x's mark): finish the batch in
                    // flight, checkpoint and hand it over (see `shard_task`).
                    let next = renewed
                        .owner
                        .as_ref()
                        .filter(|_| renewed.checkpoint_owner.as_deref() == Some(&config.worker_id))
                        .filter(|next| **next != config.worker_id);
                    if let Some(next) = next {
                        let mut handoff =
                            h.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if handoff.is_none() {
                            tracing::info!(lease = %key, next, "Handing the lease over: finishing the batch in flight and checkpointing.");
                            *handoff = Some(next.clone());
                            let _ = h.stop.send(true);
                        }
                    }
                    *lease = renewed;
                    if let Ok(mut r) = h.renewed.lock() {
                        *r = Instant::now();
                    }
                    None
                }
                Err(Some(
                    error @ (LeaseError::Aws { .. }
                    | LeaseError::Timeout { .. }
                    | LeaseError::TableGone { .. }),
                )) => {
                    count("kinesis_host_lease_renewal_failures_total", &config);
                    tracing::debug!(lease = %key, %error, "Lease renewal failed.");
                    Some(error.to_string())
                }
                Err(error) => {
                    count("kinesis_host_leases_lost_total", &config);
                    match error {
                        None => tracing::warn!(lease = %key, not_renewed_for_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX), failover_time_ms = u64::try_from(config.failover_time.as_millis()).unwrap_or(u64::MAX), "Lost lease: not renewed within FailoverTimeMillis (DynamoDB unreachable or slow?); stopping its shard, which any host may take now."),
                        Some(error @ LeaseError::Damaged { .. }) => tracing::error!(lease = %key, %error, "Lease item damaged: stopping its shard."),
                        Some(error) => tracing::info!(lease = %key, %error, "Lost lease."),
                    }
                    let _ = h.stop.send(true);
                    held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
                    None
                }
            }
        });
    }
    let (mut failed, mut first) = (0usize, None);
    while let Some(done) = renewals.join_next().await {
        match done {
            Ok(Some(error)) => {
                failed += 1;
                first.get_or_insert(error);
            }
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "A lease renewal panicked."),
        }
    }
    if let Some(first) = first {
        tracing::warn!(stream = %config.stream, failed, held = total, error = %first, "Lease renewals failed; retrying at the next tick. A lease not renewed within FailoverTimeMillis is given up.");
    }
}

#[allow(clippy::too_many_arguments)]
async fn take_leases<F: ProcessorFactory>(
    kinesis: &KinesisClient,
    table: &LeaseTable,
    config: &Arc<WorkerConfig>,
    factory: &Arc<F>,
    held: &Arc<std::sync::Mutex<HashMap<String, Arc<Held>>>>,
    wake: &Arc<Notify>,
    cooldown: &Cooldown,
    tasks: &mut JoinSet<()>,
    seen: &mut HashMap<String, (u64, Instant)>,
    handoffs: &mut HashMap<String, Instant>,
    damaged: &mut HashMap<String, String>,
) -> Result<(), LeaseError> {
    let now = Instant::now();
    let resting: HashSet<String> = cooldown
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|(_, (until, _))| *until > now)
        .map(|(k, _)| k.clone())
        .collect();
    let leases = table.within("Scan", config.failover_time, table.list()).await?;
    report_damaged(table, config, &leases, damaged);
    let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    let mine: HashSet<String> =
        held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect();
    // Expiry is judged on our own clock by watching each counter change (KCL's rule).
    let mut available = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    counts.insert(config.worker_id.clone(), mine.len());
    let mut active = 0usize;
    for lease in &leases {
        // A damaged lease is nobody's to take or count: its shard waits until it is fixed.
        if lease.checkpoint == Checkpoint::ShardEnd || lease.damaged.is_some() {
            continue;
        }
        active += 1;
        let entry = seen.entry(lease.key.clone()).or_insert((lease.counter, now));
        if entry.0 != lease.counter {
            *entry = (lease.counter, now);
        }
        if mine.contains(&lease.key) {
            continue;
        }
        let expired = now.duration_since(entry.1) > config.failover_time;
        match &lease.owner {
            Some(owner) if !expired => *counts.entry(owner.clone()).or_default() += 1,
            _ => available.push(lease),
        }
    }
    seen.retain(|k, _| by_key.contains_key(k.as_str()));
    // Hand-offs this host asked for: take the lease once its owner handed it over, or as a
    // plain steal when it has not within the timeout; forget it when the lease went elsewhere.
    let me = Some(config.worker_id.as_str());
    let mut adopt: Vec<&Lease> = Vec::new();
    handoffs.retain(|key, since| {
        let Some(lease) = by_key.get(key.as_str()) else { return false };
        let pending = lease.owner.as_deref() == me
            && lease.checkpoint != Checkpoint::ShardEnd
            && lease.damaged.is_none()
            && !mine.contains(key);
        if pending
            && lease.checkpoint_owner.is_some()
            && since.elapsed() >= config.graceful_handoff_timeout
        {
            tracing::info!(lease = %key, owner = lease.checkpoint_owner.as_deref().unwrap_or("-"), "The owner did not hand the lease over in time: taking it.");
            adopt.push(lease);
        }
        pending
    });
    // Leases that name this host as owner, no hand-off pending, but that it does not hold:
    // handed over to it (by one of ours or a KCL 3.x worker), or left by a failed release.
    adopt.extend(leases.iter().filter(|l| {
        l.owner.as_deref() == me
            && l.checkpoint_owner.is_none()
            && l.damaged.is_none()
            && l.checkpoint != Checkpoint::ShardEnd
            && !mine.contains(&l.key)
            && !resting.contains(&l.key)
            && l.parent_shard_ids.iter().all(|p| {
                by_key.get(p.as_str()).is_none_or(|pl| pl.checkpoint == Checkpoint::ShardEnd)
            })
    }));
    if config.cleanup_leases_upon_shard_completion {
        cleanup(table, &leases, &by_key).await;
    }
    if active == 0 {
        return Ok(());
    }
    let workers = counts.len();
    let target = if workers >= active { 1 } else { active.div_ceil(workers) }
        .min(config.max_leases_for_worker);
    let needed = target.saturating_sub(mine.len());
    if needed == 0 && adopt.is_empty() {
        return Ok(());
    }
    // A child waits until all its parents finished (a missing parent lease does not block).
    let ready = |lease: &Lease| {
        lease
            .parent_shard_ids
            .iter()
            .all(|p| by_key.get(p.as_str()).is_none_or(|pl| pl.checkpoint == Checkpoint::ShardEnd))
    };
    let mut to_take: Vec<&Lease> = available
        .into_iter()
        .filter(|l| ready(l) && !resting.contains(&l.key))
        .take(needed)
        .collect();
    let mut stealing = false;
    let mut to_mark: Vec<&Lease> = Vec::new();
    if to_take.is_empty() && handoffs.is_empty() {
        // Steal from the most loaded worker, bounded per round.
        let victim = counts
            .iter()
            .filter(|(w, _)| **w != config.worker_id)
            .max_by_key(|(_, c)| **c)
            .filter(|(_, count)| **count >= target);
        // KCL's rule: take the excess over the target from the most loaded worker; when it
        // holds exactly the target but this host needs more than one, take one anyway, so a
        // joining host is not left empty (4 leases, 3 hosts: 2, 2, 0 becomes 2, 1, 1).
        let steal = |count: usize| {
            let n = needed.min(count - target);
            let n = if n == 0 && needed > 1 { 1 } else { n };
            n.min(config.max_leases_to_steal_at_one_time)
        };
        if let Some((victim, n)) = victim.map(|(v, c)| (v, steal(*c))).filter(|(_, n)| *n > 0) {
            to_take = leases
                .iter()
                .filter(|l| {
                    l.owner.as_deref() == Some(victim.as_str())
                        && l.checkpoint != Checkpoint::ShardEnd
                        && l.damaged.is_none()
                        && l.checkpoint_owner.is_none()
                        && ready(l)
                })
                .take(n)
                .collect();
            stealing = true;
        }
        if stealing && !config.graceful_handoff_timeout.is_zero() {
            to_mark = std::mem::take(&mut to_take);
        }
    }
    // Hand-off requests and takes are conditional writes on distinct leases, independent of
    // each other: they go out together, at most `CONCURRENT_LEASE_WRITES` at a time.
    // After an error other than a lost race no new write starts, but those in flight finish
    // and what they achieved is kept: a mark that landed is remembered in `handoffs` (so it
    // is timed and withdrawn at a stop), a lease that was taken is held and its shard
    // started, never left written as ours without a reader. The first error then fails the
    // round as before (the next scan retries).
    let mut failed = false;
    let mut first_error = None;
    let mut to_mark = to_mark.into_iter();
    let mut marks = FuturesUnordered::new();
    loop {
        while !failed && marks.len() < CONCURRENT_LEASE_WRITES {
            let Some(lease) = to_mark.next() else { break };
            let worker_id = config.worker_id.as_str();
            marks.push(async move { (lease, table.request_handoff(lease, worker_id).await) });
        }
        let Some((lease, marked)) = marks.next().await else { break };
        match marked {
            Ok(true) => {
                handoffs.insert(lease.key.clone(), Instant::now());
            }
            Ok(false) => {}
            Err(error) => {
                failed = true;
                keep_first(&mut first_error, lease, error);
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    // Adopted leases (handed over to this host, or a hand-off that timed out) count as stolen.
    let adopted = adopt.len();
    let mut to_take = adopt.into_iter().chain(to_take).enumerate();
    let mut takes = FuturesUnordered::new();
    loop {
        while !failed && takes.len() < CONCURRENT_LEASE_WRITES {
            let Some((index, lease)) = to_take.next() else { break };
            let stolen = stealing || index < adopted;
            let worker_id = config.worker_id.as_str();
            takes.push(async move { (lease, stolen, table.take(lease, worker_id).await) });
        }
        let Some((lease, stolen, result)) = takes.next().await else { break };
        match result {
            Ok(taken) => {
                handoffs.remove(&lease.key);
                count("kinesis_host_leases_taken_total", config);
                if stolen {
                    count("kinesis_host_leases_stolen_total", config);
                }
                let (stop, stopped) = watch::channel(false);
                let h = Arc::new(Held {
                    lease: Mutex::new(taken),
                    renewed: std::sync::Mutex::new(Instant::now()),
                    stop,
                    handoff: std::sync::Mutex::new(None),
                });
                held.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(lease.key.clone(), h.clone());
                let processor = factory.create(&config.stream, &lease.key);
                tasks.spawn(shard_task(
                    kinesis.clone(),
                    table.clone(),
                    config.clone(),
                    h,
                    processor,
                    stopped,
                    held.clone(),
                    wake.clone(),
                    cooldown.clone(),
                ));
            }
            Err(LeaseError::Lost { .. }) => {
                tracing::debug!(lease = %lease.key, "Another worker took the lease first.");
            }
            Err(error) => {
                failed = true;
                keep_first(&mut first_error, lease, error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Logs each damaged lease item once (again when its problem changes, and when it is fixed), and
/// sets `kinesis_host_leases_damaged`: the shard of such an item is not processed here, and
/// nothing about it is guessed (a checkpoint that cannot be read is never taken as
/// `TRIM_HORIZON`, which would process the shard again, or as `LATEST`, which would skip it).
fn report_damaged(
    table: &LeaseTable,
    config: &WorkerConfig,
    leases: &[Lease],
    reported: &mut HashMap<String, String>,
) {
    let mut now: HashMap<String, String> = HashMap::new();
    for lease in leases {
        if let Some(problem) = &lease.damaged {
            if reported.get(&lease.key) != Some(problem) {
                let error = LeaseError::Damaged {
                    table: table.name().to_owned(),
                    lease_key: lease.key.clone(),
                    problem: problem.clone(),
                };
                tracing::error!(stream = %config.stream, lease = %lease.key, %error, "Damaged lease item: its shard is not processed until the item is fixed.");
            }
            now.insert(lease.key.clone(), problem.clone());
        }
    }
    for key in reported.keys().filter(|k| !now.contains_key(*k)) {
        tracing::info!(stream = %config.stream, lease = %key, "The lease item is readable again.");
    }
    metrics::gauge!("kinesis_host_leases_damaged", "job" => config.job.clone(), "stream" => config.stream.clone())
        .set(now.len() as f64);
    *reported = now;
}

/// Keeps the first error of a round of lease writes, to fail the round with; later ones are
/// only logged, with their lease.
fn keep_first(first: &mut Option<LeaseError>, lease: &Lease, error: LeaseError) {
    if first.is_none() {
        *first = Some(error);
    } else {
        tracing::warn!(lease = %lease.key, %error, "Another lease write of the same round failed too.");
    }
}

/// Deletes finished leases whose children have all started and whose own parents are gone
/// (KCL's rule: the tombstone stays until nothing can need it).
async fn cleanup(table: &LeaseTable, leases: &[Lease], by_key: &HashMap<&str, &Lease>) {
    for lease in
        leases.iter().filter(|l| l.checkpoint == Checkpoint::ShardEnd && l.damaged.is_none())
    {
        let children_started = !lease.child_shard_ids.is_empty()
            && lease.child_shard_ids.iter().all(|c| {
                by_key.get(c.as_str()).is_some_and(|child| {
                    !matches!(child.checkpoint, Checkpoint::TrimHorizon | Checkpoint::AtTimestamp)
                })
            });
        let parents_gone = lease.parent_shard_ids.iter().all(|p| !by_key.contains_key(p.as_str()));
        if children_started && parents_gone {
            match table.delete(&lease.key).await {
                Ok(()) => {
                    tracing::info!(lease = %lease.key, "Deleted the finished shard's lease.");
                    // Its children committed their own state at their first checkpoint.
                    if let Err(error) = table.state_store().delete_all(&lease.key).await {
                        tracing::warn!(lease = %lease.key, %error, "Could not delete the finished shard's state snapshots.");
                    }
                }
                Err(error) => {
                    tracing::warn!(lease = %lease.key, %error, "Could not delete a finished lease.")
                }
            }
        }
    }
}

/// What a shard task achieved.
enum Ended {
    Stopped,
    ShardEnd,
    Lost,
}

#[allow(clippy::too_many_arguments)]
async fn shard_task<P: ShardProcessor>(
    kinesis: KinesisClient,
    table: LeaseTable,
    config: Arc<WorkerConfig>,
    held: Arc<Held>,
    mut processor: P,
    mut stop: watch::Receiver<bool>,
    registry: Arc<std::sync::Mutex<HashMap<String, Arc<Held>>>>,
    wake: Arc<Notify>,
    cooldown: Cooldown,
) {
    let key = held.lease.lock().await.key.clone();
    let ended = match consume(&kinesis, &table, &config, &held, &mut processor, &mut stop).await {
        Ok(ended) => ended,
        Err(error) => {
            let mut rest = cooldown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let failures = rest.get(&key).map_or(0, |(_, n)| *n) + 1;
            let pause = config
                .failover_time
                .saturating_mul(1 << failures.min(8))
                .min(Duration::from_secs(300));
            rest.insert(key.clone(), (Instant::now() + pause, failures));
            count("kinesis_host_shards_stopped_total", &config);
            tracing::error!(shard = %key, %error, retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "Shard stopped on this host; its lease is released, and this host retries it later.");
            Ended::Stopped
        }
    };
    processor.close().await;
    match ended {
        Ended::ShardEnd => {
            registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
            if config.cleanup_leases_upon_shard_completion {
                tracing::debug!(shard = %key, "Shard finished; its lease is deleted once its children started.");
            }
            wake.notify_one();
        }
        Ended::Lost => {}
        Ended::Stopped => {
            let next =
                held.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            // Released by the worker at shutdown; after an error, released now so another
            // host (or this one, later) retries from the checkpoint.
            if let Some(next) = next.filter(|_| *stop.borrow()) {
                // Asked to hand the lease over: the last batch is checkpointed, so the next
                // owner starts right after it.
                registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
                let lease = held.lease.lock().await;
                let handed = table.hand_over(&lease, &next);
                match table.within("UpdateItem (hand over)", config.failover_time, handed).await {
                    Ok(()) => count("kinesis_host_leases_handed_over_total", &config),
                    // The taker withdrew or another host asked since: release the lease so that
                    // whoever is free takes it at once (fails too if the counter moved).
                    Err(error) => match table
                        .within("UpdateItem (release)", config.failover_time, table.release(&lease))
                        .await
                    {
                        Ok(()) => {
                            count("kinesis_host_leases_released_total", &config);
                            tracing::info!(shard = %key, next, %error, "The hand-off request changed; released the lease instead.");
                        }
                        Err(_) => {
                            count("kinesis_host_leases_lost_total", &config);
                            tracing::info!(shard = %key, %error, "Could not hand the lease over; the other host takes it when its wait ends.");
                        }
                    },
                }
                wake.notify_one();
            } else if !*stop.borrow() {
                registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
                let lease = held.lease.lock().await;
                match table
                    .within("UpdateItem (release)", config.failover_time, table.release(&lease))
                    .await
                {
                    Ok(()) => {
                        count("kinesis_host_leases_released_total", &config);
                    }
                    Err(error) => {
                        tracing::warn!(shard = %key, %error, "Could not release lease; it will expire.");
                    }
                }
            }
        }
    }
}

/// Checkpoints under the lease lock; a lost lease means this host must stop the shard.
/// `stream` only labels the `kinesis_host_checkpoints_total` metric.
async fn checkpoint(
    table: &LeaseTable,
    held: &Held,
    at: Checkpoint,
    config: &WorkerConfig,
    task_state: &mut TaskState,
) -> Result<bool, ShardTaskError> {
    let stream = config.stream.as_str();
    // A changed state is written first (to the state table when large, outside the lease lock
    // so renewals go on); the conditional checkpoint below then names it, or fails and nobody
    // ever reads it.
    let prepared = if task_state.dirty {
        let (key, counter, current) = {
            let lease = held.lease.lock().await;
            (lease.key.clone(), lease.counter, lease.checkpoint.clone())
        };
        if current >= at && at != Checkpoint::ShardEnd {
            return Ok(true);
        }
        Some(
            table
                .state_store()
                .prepare(
                    &key,
                    &task_state.map,
                    counter,
                    config.state_inline_max_bytes,
                    config.billing,
                )
                .await?,
        )
    } else {
        None
    };
    let mut lease = held.lease.lock().await;
    if lease.checkpoint >= at && at != Checkpoint::ShardEnd {
        return Ok(true);
    }
    // A lease this host has not renewed for the failover time may already be another host's:
    // never checkpoint it, even if the conditional write would still succeed (KCL's rule, and
    // what makes a host paused past its lease stop at once).
    if held.renewed.lock().map(|r| r.elapsed() > config.failover_time).unwrap_or(true) {
        tracing::info!(shard = %lease.key, "Lost lease: not renewed within the failover time, so it cannot checkpoint; stopping the shard.");
        return Ok(false);
    }
    let previous_stored = matches!(lease.state, Some(StateRef::Stored { .. }));
    let write = table.checkpoint_with_state(&lease, at, prepared.clone());
    match table.within("UpdateItem (checkpoint)", config.failover_time, write).await {
        Ok(updated) => {
            let shard = updated.key.clone();
            metrics::counter!(
                "kinesis_host_checkpoints_total",
                "job" => config.job.clone(),
                "stream" => stream.to_owned(),
                "shard" => shard,
            )
            .increment(1);
            tracing::debug!(shard = %updated.key, checkpoint = %updated.checkpoint, "Checkpointed.");
            let committed_counter = updated.counter;
            *lease = updated;
            if let Ok(mut r) = held.renewed.lock() {
                *r = Instant::now();
            }
            let key = lease.key.clone();
            drop(lease);
            if let Some(prepared) = prepared {
                task_state.dirty = false;
                let keep = match &prepared {
                    StateRef::Stored { version, .. } => Some(version.as_str()),
                    StateRef::Inline { .. } | StateRef::Malformed { .. } => None,
                };
                // Older versions can no longer be named by anyone: the lease names `keep`,
                // and a later owner writes versions numbered above `committed_counter`.
                if previous_stored || keep.is_some() {
                    match table.state_store().collect_garbage(&key, keep, committed_counter).await {
                        Ok(deleted) => {
                            tracing::debug!(shard = %key, deleted, "Deleted superseded state snapshots.");
                        }
                        Err(error) => {
                            tracing::warn!(shard = %key, %error, "Could not delete superseded state snapshots; the next checkpoint tries again.");
                        }
                    }
                }
            }
            Ok(true)
        }
        Err(LeaseError::Lost { .. }) => {
            tracing::info!(shard = %lease.key, "Lost lease: cannot checkpoint; stopping the shard.");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// A shard's task state as this host holds it: the state matching the records processed so
/// far, and whether the lease does not name it yet.
#[derive(Debug, Default)]
struct TaskState {
    map: StateMap,
    dirty: bool,
}

/// The task state a shard resumes with: the state its lease names (committed with its
/// checkpoint); for a child shard that has not checkpointed yet, its parents' final states
/// merged (see [`state::merge_parents`]); otherwise none.
async fn restore_state(table: &LeaseTable, lease: &Lease) -> Result<TaskState, ShardTaskError> {
    let store = table.state_store();
    if let Some(named) = &lease.state {
        let map = store.load(&lease.key, named).await?;
        tracing::info!(shard = %lease.key, keys = map.len(), checkpoint = %lease.checkpoint, "Restored the task state of the checkpoint.");
        return Ok(TaskState { map, dirty: false });
    }
    let fresh = matches!(lease.checkpoint, Checkpoint::TrimHorizon | Checkpoint::AtTimestamp);
    if !fresh || lease.parent_shard_ids.is_empty() {
        return Ok(TaskState::default());
    }
    let mut parents = Vec::new();
    for parent in &lease.parent_shard_ids {
        match table.get(parent).await? {
            Some(p) => {
                let start =
                    p.hash_range.as_ref().and_then(|(a, _)| kpl::parse_hash_key(a)).unwrap_or(0);
                let map = match &p.state {
                    Some(named) => store.load(parent, named).await?,
                    None => StateMap::new(),
                };
                parents.push((start, map));
            }
            None => {
                tracing::warn!(shard = %lease.key, parent, "The parent shard's lease is gone: the shard starts without the parent's state.");
            }
        }
    }
    let map = state::merge_parents(parents);
    tracing::info!(shard = %lease.key, parents = ?lease.parent_shard_ids, keys = map.len(), "Starting from the parent shards' state.");
    let dirty = !map.is_empty();
    Ok(TaskState { map, dirty })
}

#[derive(Debug, thiserror::Error)]
enum ShardTaskError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    FanOut(#[from] EfoError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the task stopped: {0}")]
    Processor(#[from] ProcessorError),
    #[error(transparent)]
    State(#[from] StateError),
}

async fn consume<P: ShardProcessor>(
    kinesis: &KinesisClient,
    table: &LeaseTable,
    config: &WorkerConfig,
    held: &Held,
    processor: &mut P,
    stop: &mut watch::Receiver<bool>,
) -> Result<Ended, ShardTaskError> {
    let (key, start, range, taken) = {
        let lease = held.lease.lock().await;
        let range = lease.hash_range.as_ref().and_then(|(a, b)| {
            Some(kpl::HashKeyRange { start: kpl::parse_hash_key(a)?, end: kpl::parse_hash_key(b)? })
        });
        (lease.key.clone(), lease.checkpoint.clone(), range, lease.clone())
    };
    let mut task_state = restore_state(table, &taken).await?;
    processor.restore_state(&task_state.map);
    processor.watch_stop(stop.clone());
    // Leases written by KCL 1.x carry no hash range: take it from the stream (KCL back-fills
    // it the same way), since the de-aggregation filter needs it after resharding.
    let range = match range {
        Some(range) => Some(range),
        None => list_shards(kinesis, &config.stream)
            .await?
            .into_iter()
            .find(|s| s.id == key)
            .and_then(|s| kpl::HashKeyRange::parse(&s.hash_range.0, &s.hash_range.1)),
    };
    tracing::info!(shard = %key, checkpoint = %start, "Processing shard.");
    let mut reader = Source::open(
        kinesis.clone(),
        config.fan_out.as_ref(),
        &config.stream,
        &key,
        start.clone(),
        config.at_timestamp,
        config.max_records,
    )
    .await?;
    tracing::info!(shard = %key, "Reading shard.");
    let mut done = start;
    let mut last_commit = Instant::now();
    let mut dirty = false;
    loop {
        if *stop.borrow() {
            if dirty && !checkpoint(table, held, done.clone(), config, &mut task_state).await? {
                return Ok(Ended::Lost);
            }
            return Ok(Ended::Stopped);
        }
        // A fetch waits for Kinesis (a fan-out event, a back-off): a stop does not wait for it.
        let fetch = tokio::select! {
            _ = stop.changed() => continue,
            fetch = reader.fetch() => fetch?,
        };
        let fetched = !fetch.records.is_empty();
        let mut records = Vec::with_capacity(fetch.records.len());
        for record in fetch.records {
            let arrival_millis = record
                .approximate_arrival_timestamp()
                .and_then(|t| u64::try_from(t.to_millis().ok()?).ok())
                .unwrap_or(0);
            // Moved out of the record, not copied.
            let mut sequence_number = record.sequence_number;
            let partition_key = record.partition_key.unwrap_or_default();
            let user = kpl::deaggregate(
                kpl::KinesisRecord {
                    // Owned: the user records are slices of it, not copies.
                    data: bytes::Bytes::from(record.data.into_inner()),
                    partition_key: &partition_key,
                    explicit_hash_key: None,
                },
                range,
            );
            if user.dropped_by_hash_range > 0 {
                tracing::debug!(shard = %key, sequence_number, dropped = user.dropped_by_hash_range, "Dropped a KPL aggregate whose records belong to another shard (a resharding duplicate).");
            }
            let mut users = user.records.into_iter().peekable();
            while let Some(u) = users.next() {
                if done.is_before(&sequence_number, u.sub_sequence_number) {
                    records.push(ShardRecord {
                        // The last (usually the only) user record takes the string itself.
                        sequence_number: if users.peek().is_some() {
                            sequence_number.clone()
                        } else {
                            std::mem::take(&mut sequence_number)
                        },
                        sub_sequence_number: u.sub_sequence_number,
                        partition_key: u.partition_key,
                        explicit_hash_key: u.explicit_hash_key,
                        data: u.data,
                        arrival_millis,
                    });
                }
            }
        }
        if !records.is_empty() || config.call_process_records_even_for_empty_list {
            let count = records.len();
            let records = Arc::new(records);
            let (processed, failure, stopping) =
                match processor.process(records.clone(), fetch.millis_behind_latest).await {
                    Ok(processed) if processed >= count => (count, None, false),
                    // Cut short by a stop: not a failure of the shard.
                    Ok(processed) if *stop.borrow() => (processed, None, true),
                    Ok(processed) => (
                        processed,
                        Some(ProcessorError {
                            done: processed,
                            message: format!("the task finished {processed} of {count} records"),
                        }),
                        false,
                    ),
                    Err(e) => (e.done.min(count), Some(e), false),
                };
            let changes = processor.take_state_changes();
            if !changes.is_empty() {
                state::apply(&mut task_state.map, changes);
                task_state.dirty = true;
            }
            if let Some(last) = processed.checked_sub(1).and_then(|i| records.get(i)) {
                done = Checkpoint::after(&last.sequence_number, last.sub_sequence_number);
                reader.processed(done.clone());
                dirty = true;
            }
            if let Some(failure) = failure {
                // Keep what was done, then stop the shard on this host.
                if dirty && !checkpoint(table, held, done.clone(), config, &mut task_state).await? {
                    return Ok(Ended::Lost);
                }
                return Err(failure.into());
            }
            if stopping {
                tracing::info!(shard = %key, done = processed, records = count, "Asked to stop in the middle of a batch: checkpointing the records done.");
                if dirty && !checkpoint(table, held, done.clone(), config, &mut task_state).await? {
                    return Ok(Ended::Lost);
                }
                return Ok(Ended::Stopped);
            }
        }
        if let Some(children) = fetch.shard_end {
            if dirty && !checkpoint(table, held, done.clone(), config, &mut task_state).await? {
                return Ok(Ended::Lost);
            }
            for child in &children {
                let mut lease =
                    Lease::new(&child.id, Checkpoint::TrimHorizon, child.parents.clone());
                lease.hash_range = Some(child.hash_range.clone());
                if table.create_if_not_exists(&lease).await? {
                    tracing::info!(lease = %child.id, parent = %key, "Created child lease.");
                }
            }
            {
                let mut lease = held.lease.lock().await;
                if !children.is_empty() {
                    match table
                        .set_children(&lease, children.iter().map(|c| c.id.clone()).collect())
                        .await
                    {
                        Ok(updated) => *lease = updated,
                        Err(LeaseError::Lost { .. }) => return Ok(Ended::Lost),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if !checkpoint(table, held, Checkpoint::ShardEnd, config, &mut task_state).await? {
                return Ok(Ended::Lost);
            }
            tracing::info!(shard = %key, "Shard finished (SHARD_END).");
            return Ok(Ended::ShardEnd);
        }
        if dirty && last_commit.elapsed() >= config.commit_interval {
            if !checkpoint(table, held, done.clone(), config, &mut task_state).await? {
                return Ok(Ended::Lost);
            }
            dirty = false;
            last_commit = Instant::now();
        }
        // Fan-out pushes events as Kinesis has them: no pause between them.
        if reader.is_polling() && (!fetched || config.idle_time_between_reads > Duration::ZERO) {
            tokio::select! {
                _ = stop.changed() => {}
                () = tokio::time::sleep(config.idle_time_between_reads) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, parents: &[&str]) -> Lease {
        let parents = parents.iter().map(|p| (*p).to_owned()).collect();
        Lease::new(key, Checkpoint::TrimHorizon, parents)
    }

    fn keys(generations: &[Vec<&Lease>]) -> Vec<Vec<String>> {
        generations.iter().map(|g| g.iter().map(|l| l.key.clone()).collect()).collect()
    }

    #[test]
    fn parents_are_created_before_their_children() {
        // 0 split into 2 and 3, which merged into 4; 1 untouched; 5's parent 9 has a lease
        // already (not among those created), so 5 need not wait.
        let leases = [
            lease("4", &["2", "3"]),
            lease("2", &["0"]),
            lease("5", &["9"]),
            lease("0", &[]),
            lease("3", &["0"]),
            lease("1", &[]),
        ];
        assert_eq!(
            keys(&parents_first(&leases)),
            vec![vec!["5", "0", "1"], vec!["2", "3"], vec!["4"]]
        );
        assert!(parents_first(&[]).is_empty());
    }
}
