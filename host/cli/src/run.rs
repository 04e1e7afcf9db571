//! `kinesis-host run`: consumes the job's input streams with KCL-compatible leases, runs the
//! task over each shard's records and sends what it emits to the output streams.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use kinesis_host_coordinator::aws::{
    AwsClients, AwsSettings as CoordAws, HttpProxy, InvalidProxy, StaticKeys,
};
use kinesis_host_coordinator::checkpoint::Checkpoint;
use kinesis_host_coordinator::efo::FanOut;
use kinesis_host_coordinator::lease::{Billing, LeaseTable};
use kinesis_host_coordinator::output::{MAX_BYTES_PER_REQUEST, OutputRecord, Producer};
use kinesis_host_coordinator::state::{StateChange, StateMap};
use kinesis_host_coordinator::worker::{
    self, ProcessorError, ProcessorFactory, ShardProcessor, ShardRecord, WorkerConfig,
};
use kinesis_host_runtime::{
    Batch, BatchOutput, Clock, InstanceSpec, Outputs, RecordRef, ShardState, TaskComponent,
};

use crate::config::JobConfig;
use crate::fairness::CpuGate;
use crate::metrics::{
    BATCH_LATENCY, BYTES_PROCESSED, DEAD_LETTER_RECORDS, Health, MILLIS_BEHIND_LATEST,
    OUTPUT_REFUSED, RECORDS_PROCESSED,
};
use crate::pipeline::{
    DeadLetter, GiveUp, MAX_MESSAGE_BYTES, ShardError, ShardWorker, Sink, StopSignal, cut_message,
    refused_envelope,
};
use crate::samza::{AwsSettings, BillingMode, InitialPosition, InputStream, Retrieval, RunConfig};

/// Converts the job's AWS settings for the coordinator.
///
/// `ProxyHost` without `ProxyPort` means port 80, the default port of the `http://` proxy URL.
/// (The Java SDK would use no proxy then, unless the JVM's `http(s).proxyPort` is set.)
///
/// # Panics
///
/// If `ProxyHost` is no valid host, which [`crate::samza`] has already checked.
///
/// # Errors
/// When `clientConfig.ProxyHost`/`ProxyPort` do not make a proxy URL.
pub fn aws_settings(aws: &AwsSettings) -> Result<CoordAws, InvalidProxy> {
    let client = &aws.client;
    let proxy = client
        .proxy_host
        .as_deref()
        .map(|host| HttpProxy::new(host, client.proxy_port.unwrap_or(80))) // the config requires a port
        .transpose()?;
    Ok(CoordAws {
        region: aws.region.clone(),
        keys: aws.credentials.as_ref().map(|c| StaticKeys {
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.secret_access_key.expose().to_owned(),
        }),
        kinesis_endpoint: aws.kinesis_endpoint.clone(),
        dynamodb_endpoint: aws.dynamodb_endpoint.clone(),
        connect_timeout: client.connection_timeout,
        read_timeout: client.socket_timeout,
        proxy,
        max_connections: client
            .max_connections
            .and_then(|n| usize::try_from(n).ok())
            .and_then(NonZeroUsize::new),
    })
}

/// The worker settings for one input stream.
pub fn worker_config(run: &RunConfig, input: &InputStream, worker_id: &str) -> WorkerConfig {
    let kcl = &input.kcl;
    let (initial_position, at_timestamp) = match &kcl.initial_position {
        InitialPosition::Latest => (Checkpoint::Latest, None),
        InitialPosition::TrimHorizon => (Checkpoint::TrimHorizon, None),
        InitialPosition::AtTimestamp(t) => (Checkpoint::AtTimestamp, Some(*t)),
    };
    WorkerConfig {
        job: run.job_name.clone(),
        worker_id: worker_id.to_owned(),
        stream: input.stream.clone(),
        initial_position,
        at_timestamp,
        failover_time: kcl.failover_time,
        shard_sync_interval: kcl.shard_sync_interval,
        idle_time_between_reads: kcl.idle_time_between_reads,
        max_records: kcl.max_records,
        max_leases_for_worker: usize::try_from(kcl.max_leases_for_worker).unwrap_or(usize::MAX),
        max_leases_to_steal_at_one_time: usize::try_from(kcl.max_leases_to_steal_at_one_time)
            .unwrap_or(1),
        cleanup_leases_upon_shard_completion: kcl.cleanup_leases_upon_shard_completion,
        call_process_records_even_for_empty_list: kcl.call_process_records_even_for_empty_list,
        commit_interval: run.commit_interval,
        billing: match kcl.billing_mode {
            BillingMode::PayPerRequest => Billing::PayPerRequest,
            BillingMode::Provisioned { read, write } => Billing::Provisioned {
                read: i64::try_from(read).unwrap_or(i64::MAX),
                write: i64::try_from(write).unwrap_or(i64::MAX),
            },
        },
        fan_out: match &kcl.retrieval {
            Retrieval::Polling => None,
            Retrieval::FanOut { consumer_name, consumer_arn, resubscribe_interval } => {
                Some(Arc::new(
                    FanOut::new(consumer_name, consumer_arn.clone(), *resubscribe_interval)
                        .for_job(&run.job_name),
                ))
            }
        },
        state_inline_max_bytes: crate::config::DEFAULT_STATE_INLINE_BYTES,
        graceful_handoff_timeout: kcl.graceful_lease_handoff_timeout,
    }
}

/// Makes one processor per shard: a task instance behind the shard worker's failure policy,
/// and producers for the job's outputs.
pub struct TaskProcessors {
    component: Arc<TaskComponent>,
    allowed: Outputs,
    job: Arc<JobConfig>,
    outputs: Arc<BTreeMap<String, Producer>>,
    clock: Arc<dyn Clock>,
    gate: Option<Arc<CpuGate>>,
}

impl std::fmt::Debug for TaskProcessors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskProcessors")
            .field("outputs", &self.outputs.keys())
            .finish_non_exhaustive()
    }
}

impl TaskProcessors {
    /// Processors running `component` under `job`'s limits, sending to `outputs`.
    pub fn new(
        component: Arc<TaskComponent>,
        job: Arc<JobConfig>,
        outputs: Arc<BTreeMap<String, Producer>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let allowed = Outputs::Only(outputs.keys().cloned().collect());
        Self { component, allowed, job, outputs, clock, gate: None }
    }

    /// Runs every wasm call through the host's CPU gate (`serve`; see [`crate::fairness`]).
    pub fn with_gate(mut self, gate: Option<Arc<CpuGate>>) -> Self {
        self.gate = gate;
        self
    }
}

impl ProcessorFactory for TaskProcessors {
    type Processor = TaskProcessor;

    fn create(&self, stream: &str, shard_id: &str) -> TaskProcessor {
        let spec = Arc::new(InstanceSpec {
            job: self.job.job_name.clone(),
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            outputs: self.allowed.clone(),
            config: self.job.task_config.clone(),
            limits: self.job.limits.clone(),
        });
        let processor = TaskProcessor {
            worker: Arc::new(Mutex::new(ShardWorker::new(
                self.component.clone(),
                spec,
                self.job.retry,
                self.clock.clone(),
            ))),
            job: self.job.clone(),
            outputs: self.outputs.clone(),
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            metrics: ProcessorMetrics::new(&self.job.job_name, stream, shard_id),
            state_changes: Vec::new(),
            stop: StopSignal::default(),
            stop_watch: None,
        };
        {
            let mut worker = processor.worker.lock().unwrap_or_else(PoisonError::into_inner);
            worker.set_stop(processor.stop.clone());
            if let Some(gate) = &self.gate {
                worker.set_gate(gate.clone());
            }
        }
        processor
    }
}

/// A shard processor's metric handles (no-ops unless `run` installed a recorder).
struct ProcessorMetrics {
    records: metrics::Counter,
    bytes: metrics::Counter,
    millis_behind_latest: metrics::Gauge,
    batch_latency: metrics::Histogram,
}

impl ProcessorMetrics {
    fn new(job: &str, stream: &str, shard_id: &str) -> Self {
        let stream = stream.to_owned();
        let job = job.to_owned();
        Self {
            records: metrics::counter!(RECORDS_PROCESSED, "job" => job.clone(), "stream" => stream.clone()),
            bytes: metrics::counter!(BYTES_PROCESSED, "job" => job.clone(), "stream" => stream.clone()),
            millis_behind_latest: metrics::gauge!(
                MILLIS_BEHIND_LATEST,
                "job" => job.clone(),
                "stream" => stream.clone(),
                "shard" => shard_id.to_owned(),
            ),
            batch_latency: metrics::histogram!(BATCH_LATENCY, "job" => job, "stream" => stream),
        }
    }
}

/// One shard's processor.
pub struct TaskProcessor {
    worker: Arc<Mutex<ShardWorker>>,
    job: Arc<JobConfig>,
    outputs: Arc<BTreeMap<String, Producer>>,
    stream: String,
    shard_id: String,
    metrics: ProcessorMetrics,
    /// State changes of the records the last `process` reported done.
    state_changes: Vec<StateChange>,
    /// Told to the worker when the shard is asked to stop, so a back-off ends at once.
    stop: StopSignal,
    /// The worker's stop request (see [`ShardProcessor::watch_stop`]).
    stop_watch: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for TaskProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskProcessor").field("shard_id", &self.shard_id).finish_non_exhaustive()
    }
}

/// Emits of earlier batches of one read are sent once they hold this many bytes (a full
/// `PutRecords` request), so a shard never holds more than this plus one batch's emits (at most
/// `task.limits.emit.bytes.per.batch`) waiting for Kinesis, however many batches a read makes.
const FLUSH_BYTES: usize = MAX_BYTES_PER_REQUEST;

/// Collects what a shard's batches emitted, per output in order, and how many records are
/// done, until it is sent.
#[derive(Default)]
struct Collect {
    /// Per output, its records in the order emitted.
    emits: BTreeMap<Arc<str>, Vec<OutputRecord>>,
    /// Bytes held in `emits` and `dead_letters`.
    bytes: usize,
    done: usize,
    /// `task.dead.letter.output`, when set.
    dead_letter: Option<String>,
    /// Envelopes of the records given up on, in order, with why.
    dead_letters: Vec<(GiveUp, OutputRecord)>,
    state_changes: Vec<StateChange>,
}

impl Sink for Collect {
    fn commit(&mut self, batch: &Batch, output: BatchOutput) {
        self.done += batch.len();
        let written_millis = batch.iter().map(|r| r.approximate_arrival_millis).max().unwrap_or(0);
        self.state_changes.extend(
            output.state_changes.into_iter().map(|(key, value)| StateChange {
                key,
                value,
                written_millis,
            }),
        );
        for e in output.emits {
            let record = OutputRecord {
                partition_key: e.partition_key,
                explicit_hash_key: e.explicit_hash_key,
                data: e.data,
            };
            self.bytes += record.bytes();
            self.emits.entry(e.output).or_default().push(record);
        }
    }

    fn poison(&mut self, _shard_id: &str, _record: RecordRef<'_>, _message: &str) {
        // Set aside (logged by the pipeline); it counts as done.
        self.done += 1;
    }

    fn has_dead_letter(&self) -> bool {
        self.dead_letter.is_some()
    }

    fn dead_letter(&mut self, record: RecordRef<'_>, letter: &DeadLetter) {
        // Done once its envelope is acknowledged, which comes before any checkpoint.
        self.done += 1;
        let envelope = OutputRecord {
            partition_key: record.partition_key.to_owned(),
            explicit_hash_key: None,
            data: letter.envelope(record),
        };
        self.bytes += envelope.bytes();
        self.dead_letters.push((letter.reason, envelope));
    }
}

/// One shard's records from `start` on, through the task, batch by batch, until they are all
/// done, a batch fails for good, or the emits collected reach [`FLUSH_BYTES`]. Returns what was
/// collected, the failure if any, and the index of the first record not yet run.
fn run_records(
    worker: &mut ShardWorker,
    records: &[ShardRecord],
    start: usize,
    batch_limits: crate::config::BatchLimits,
    info: (&str, &str, Option<i64>),
    latency: &metrics::Histogram,
    dead_letter: Option<String>,
) -> (Collect, Option<ShardError>, usize) {
    let (stream, shard_id, millis_behind_latest) = info;
    let mut sink = Collect { dead_letter, ..Collect::default() };
    let new_batch = || {
        let mut batch =
            Batch::new(stream, shard_id, batch_limits.max_records, batch_limits.max_bytes);
        batch.set_millis_behind_latest(millis_behind_latest.and_then(|m| u64::try_from(m).ok()));
        batch
    };
    let run = |worker: &mut ShardWorker, batch: Batch, sink: &mut Collect| {
        let started = std::time::Instant::now();
        let result = worker.run(batch, sink);
        latency.record(started.elapsed().as_secs_f64());
        result
    };
    let mut batch = new_batch();
    let mut next = start;
    while let Some(r) = records.get(next) {
        // An empty batch takes any record, so a full one is run before the record is pushed.
        if batch.push(&record_ref(r)) {
            next += 1;
            continue;
        }
        let full = std::mem::replace(&mut batch, new_batch());
        if let Err(e) = run(worker, full, &mut sink) {
            return (sink, Some(e), next);
        }
        if sink.bytes >= FLUSH_BYTES {
            return (sink, None, next);
        }
    }
    if !batch.is_empty()
        && let Err(e) = run(worker, batch, &mut sink)
    {
        return (sink, Some(e), next);
    }
    (sink, None, next)
}

fn record_ref(r: &ShardRecord) -> RecordRef<'_> {
    RecordRef {
        data: &r.data,
        partition_key: &r.partition_key,
        sequence_number: &r.sequence_number,
        sub_sequence_number: r.sub_sequence_number,
        explicit_hash_key: r.explicit_hash_key.as_deref(),
        approximate_arrival_millis: r.arrival_millis,
    }
}

impl TaskProcessor {
    /// Sends what `collected` holds: each output's records in order, then the envelopes of the
    /// records given up on, before the checkpoint passes them. Records an output refuses as
    /// invalid go to the dead-letter output; without one, the shard stops.
    async fn send(&self, collected: &mut Collect) -> Result<(), ProcessorError> {
        let stopped = |message: String| ProcessorError { done: 0, message };
        for (name, records) in std::mem::take(&mut collected.emits) {
            let Some(producer) = self.outputs.get(&*name) else {
                return Err(stopped(format!("the task emitted to unknown output {name}")));
            };
            let refused = producer.send(&records).await.map_err(|e| stopped(e.to_string()))?;
            if refused.is_empty() {
                continue;
            }
            metrics::counter!(
                OUTPUT_REFUSED,
                "job" => self.job.job_name.clone(),
                "stream" => self.stream.clone(),
                "output" => name.to_string(),
            )
            .increment(refused.len() as u64);
            let Some(dead_letter) = &collected.dead_letter else {
                let first = &refused[0];
                let record = &records[first.index];
                return Err(stopped(format!(
                    "output {name} (stream {}) refused {} of the records the task emitted as invalid, such as one with partition key {}: {}; the valid ones were sent. Set task.dead.letter.output to go on without such records",
                    producer.stream(),
                    refused.len(),
                    kinesis_host_runtime::escape_control(kinesis_host_runtime::truncate(
                        &record.partition_key,
                        64
                    )),
                    first.message,
                )));
            };
            tracing::warn!(shard = %self.shard_id, output = %name, records = refused.len(), error = %refused[0].message, "An output refused records the task emitted as invalid: writing them to the dead-letter output.");
            for refusal in &refused {
                let record = &records[refusal.index];
                let envelope = refused_envelope(
                    &self.job.job_name,
                    (&self.stream, &self.shard_id),
                    (&name, producer.stream()),
                    (&record.partition_key, record.explicit_hash_key.as_deref(), &record.data),
                    &refusal.message,
                );
                let letter = OutputRecord {
                    partition_key: record.partition_key.clone(),
                    explicit_hash_key: None,
                    data: envelope,
                };
                collected.dead_letters.push((GiveUp::OutputRefused, letter));
            }
            if dead_letter.as_str() == &*name {
                // The dead-letter output refused them itself: nowhere left to put them.
                return Err(stopped(format!(
                    "the dead-letter output {name} (stream {}) refused records as invalid: {}",
                    producer.stream(),
                    refused[0].message
                )));
            }
        }
        if let Some(name) = &collected.dead_letter
            && !collected.dead_letters.is_empty()
        {
            send_dead_letters(
                &self.outputs,
                name,
                &self.job.job_name,
                &self.stream,
                &std::mem::take(&mut collected.dead_letters),
            )
            .await?;
        }
        Ok(())
    }
}

impl ShardProcessor for TaskProcessor {
    async fn process(
        &mut self,
        records: Arc<Vec<ShardRecord>>,
        millis_behind_latest: Option<i64>,
    ) -> Result<usize, ProcessorError> {
        if let Some(millis) = millis_behind_latest {
            self.metrics.millis_behind_latest.set(millis as f64);
        }
        let mut done = 0;
        let mut next = 0;
        self.state_changes.clear();
        while next < records.len() {
            let worker = self.worker.clone();
            let (stream, shard_id) = (self.stream.clone(), self.shard_id.clone());
            let limits = self.job.batch;
            let latency = self.metrics.batch_latency.clone();
            let dead_letter = self.job.dead_letter_output.clone();
            let all = records.clone();
            let start = next;
            // The task runs on a blocking thread, so a slow task never stalls lease renewal.
            let mut task = tokio::task::spawn_blocking(move || {
                let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
                let info = (stream.as_str(), shard_id.as_str(), millis_behind_latest);
                run_records(&mut worker, &all, start, limits, info, &latency, dead_letter)
            });
            // Asked to stop while the task runs: tell the worker, so a back-off ends at once.
            let joined = match self.stop_watch.clone() {
                Some(mut watch) => {
                    tokio::select! {
                        joined = &mut task => joined,
                        _ = async { watch.wait_for(|stop| *stop).await.map(|_| ()) } => {
                            self.stop.stop();
                            task.await
                        }
                    }
                }
                None => task.await,
            };
            let (mut collected, failure, after) = joined.map_err(|e| ProcessorError {
                done,
                message: format!("the task's thread failed: {e}"),
            })?;
            // The done records' outputs go out before anything is checkpointed.
            self.send(&mut collected).await.map_err(|e| ProcessorError { done, ..e })?;
            // The outputs are acknowledged: the done records' state may be checkpointed.
            self.state_changes.append(&mut collected.state_changes);
            let finished = records.get(start..start + collected.done).unwrap_or_default();
            self.metrics.records.increment(finished.len() as u64);
            self.metrics.bytes.increment(finished.iter().map(|r| r.data.len() as u64).sum());
            done += collected.done;
            match failure {
                // Cut short by a stop: the worker checkpoints the done records and stops.
                Some(ShardError::Stopped { .. }) => return Ok(done),
                Some(error) => {
                    return Err(ProcessorError {
                        done,
                        // The task's message may be of any length.
                        message: cut_message(&error.to_string(), MAX_MESSAGE_BYTES).into_owned(),
                    });
                }
                None => next = after,
            }
        }
        Ok(done)
    }

    fn watch_stop(&mut self, stop: tokio::sync::watch::Receiver<bool>) {
        self.stop_watch = Some(stop);
    }

    fn restore_state(&mut self, state: &StateMap) {
        let restored =
            ShardState::from_entries(state.iter().map(|(k, e)| (k.clone(), e.value.clone())));
        self.worker.lock().unwrap_or_else(PoisonError::into_inner).restore_state(restored);
    }

    fn take_state_changes(&mut self) -> Vec<StateChange> {
        std::mem::take(&mut self.state_changes)
    }

    async fn close(self) {
        crate::task_metrics::forget(&self.job.job_name, &self.stream, &self.shard_id);
        let worker = self.worker;
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(worker) = Arc::try_unwrap(worker)
                .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
            {
                worker.shutdown();
            }
        })
        .await;
    }
}

/// Sends `letters` to output `name` (`task.dead.letter.output`) and counts them in
/// `kinesis_host_dead_letter_records_total` once acknowledged.
async fn send_dead_letters(
    outputs: &BTreeMap<String, Producer>,
    name: &str,
    job: &str,
    stream: &str,
    letters: &[(GiveUp, OutputRecord)],
) -> Result<(), ProcessorError> {
    let failed = |message: String| ProcessorError { done: 0, message };
    let Some(producer) = outputs.get(name) else {
        return Err(failed(format!("task.dead.letter.output={name} is not an output of the job")));
    };
    let records: Vec<OutputRecord> = letters.iter().map(|(_, r)| r.clone()).collect();
    let refused = producer.send(&records).await.map_err(|e| {
        failed(format!("cannot write dead letters to task.dead.letter.output={name}: {e}"))
    })?;
    if let Some(first) = refused.first() {
        return Err(failed(format!(
            "the dead-letter output task.dead.letter.output={name} (stream {}) refused {} envelopes as invalid: {}",
            producer.stream(),
            refused.len(),
            first.message
        )));
    }
    for reason in GiveUp::ALL {
        let n = letters.iter().filter(|(r, _)| *r == reason).count();
        if n > 0 {
            metrics::counter!(
                DEAD_LETTER_RECORDS,
                "job" => job.to_owned(),
                "stream" => stream.to_owned(),
                "reason" => reason.as_str(),
            )
            .increment(n as u64);
        }
    }
    Ok(())
}

/// Runs the job until `shutdown` resolves.
///
/// With `metrics.address`, it installs the Prometheus recorder and serves `/metrics`,
/// `/healthz` and `/readyz` there (see [`crate::metrics`]) until the workers have stopped.
///
/// # Errors
/// When a stream's worker cannot start (lease table, Kinesis), or the metrics address cannot be
/// listened on.
pub async fn run(
    run: RunConfig,
    job: JobConfig,
    component: Arc<TaskComponent>,
    clock: Arc<dyn Clock>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let health = Arc::new(Health::new(run.inputs.len(), shutdown.clone()));
    run_gated(run, job, component, clock, shutdown, None, health).await
}

/// [`run`], with every wasm call of the job going through `gate` and its workers reported to
/// `health` (made for `run.inputs.len()` inputs): how `serve` runs each of its jobs (with
/// `metrics.address` unset, as `serve` has one endpoint for all of them, whose `/readyz` asks
/// each job's `health`).
///
/// # Errors
/// As [`run`].
pub async fn run_gated(
    run: RunConfig,
    job: JobConfig,
    component: Arc<TaskComponent>,
    clock: Arc<dyn Clock>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    gate: Option<Arc<CpuGate>>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let worker_id = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "kinesis-host".to_owned()),
        uuid::Uuid::new_v4()
    );
    tracing::info!(worker_id, job = %run.job_name, "Starting.");
    let server = match &job.metrics_address {
        Some(address) => Some(serve_metrics(address, &run.job_name, health.clone()).await?),
        None => None,
    };
    let mut outputs = BTreeMap::new();
    for (name, output) in &run.outputs {
        let clients = AwsClients::new(&aws_settings(&output.aws)?).await;
        outputs.insert(name.clone(), Producer::new(clients.kinesis, output.stream.clone()));
    }
    let state_inline_bytes = job.state_inline_bytes;
    let factory = Arc::new(
        TaskProcessors::new(component, Arc::new(job), Arc::new(outputs), clock).with_gate(gate),
    );
    let mut workers = tokio::task::JoinSet::new();
    // A worker that fails stops the job's other workers gracefully (as Samza fails the whole
    // container): the job ends with that error instead of running half its inputs, so `run`
    // exits for its supervisor to restart, and `serve` reports the job failed and retries it.
    let (failing, failed_worker) = tokio::sync::watch::channel(false);
    let failing = Arc::new(failing);
    for input in &run.inputs {
        let clients = AwsClients::new(&aws_settings(&input.aws)?).await;
        let table = LeaseTable::new(clients.dynamodb.clone(), input.kcl.table_name.clone());
        let mut config = worker_config(&run, input, &worker_id);
        config.state_inline_max_bytes = state_inline_bytes;
        let factory = factory.clone();
        let mut stop = shutdown.clone();
        let mut other_failed = failed_worker.clone();
        let failing = failing.clone();
        let stream = input.stream.clone();
        let health = health.clone();
        workers.spawn(async move {
            let started = health.clone();
            let result = worker::run_with(
                clients.kinesis,
                table,
                config,
                factory,
                async move {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => {}
                        _ = other_failed.wait_for(|f| *f) => {}
                    }
                },
                move || started.worker_started(),
            )
            .await;
            if result.is_err() {
                health.worker_failed();
                failing.send_replace(true);
            }
            (stream, result)
        });
    }
    let mut failed = None;
    while let Some(done) = workers.join_next().await {
        match done {
            Ok((_, Ok(()))) => {}
            Ok((stream, Err(e))) => {
                tracing::error!(stream, error = %e, "Stream worker stopped; stopping the job's other input streams (checkpoint and release).");
                failed.get_or_insert(anyhow::anyhow!("stream {stream}: {e}"));
            }
            Err(e) => {
                health.worker_failed();
                failing.send_replace(true);
                failed.get_or_insert(anyhow::anyhow!("a stream worker panicked: {e}"));
            }
        }
    }
    if let Some(server) = server {
        server.abort();
    }
    failed.map_or(Ok(()), Err)
}

/// Installs the metrics recorder and serves the endpoint on `address` (`metrics.address`).
async fn serve_metrics(
    address: &str,
    job: &str,
    health: Arc<Health>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let handle = crate::metrics::install(job)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on metrics.address={address}: {e}"))?;
    let local = listener.local_addr().map_or_else(|_| address.to_owned(), |a| a.to_string());
    tracing::info!(address = %local, "Serving /metrics, /healthz and /readyz.");
    Ok(tokio::spawn(crate::metrics::serve(listener, handle, health)))
}
