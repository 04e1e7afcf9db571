//! One shard's task, batch by batch: joins the runtime (which knows wasmtime) to whatever feeds
//! and commits records. It applies the failure policy (`task.retry.*`,
//! `task.dead.letter.output`):
//!
//! - a retryable error, a trap (which also re-creates the instance) or a call that finished no
//!   record is a *failed call*: the batch's leading records older than
//!   `task.retry.max.record.age.ms` are given up on; with `task.retry.bisect` a rest of more
//!   than one record is split in halves, each retried after the first back-off (the halves
//!   run in order, and a half that succeeds is committed once); otherwise the batch is retried
//!   after a doubling back-off until it has failed `task.retry.max.attempts` times, when its
//!   records are given up on;
//! - a poison record is set aside while the records around it go on;
//! - a fatal error, or a broken contract, stops the shard.
//!
//! A record *given up on* (and a poison record) goes to the sink's dead-letter output when it
//! has one ([`Sink::dead_letter`], an envelope from [`DeadLetter::envelope`]); without one, a
//! poison record is only logged and giving up on any other record stops the shard, as no
//! record may be dropped silently.
//!
//! It records, labelled with `job` and `stream`, `kinesis_host_task_errors_total` (one per failed
//! call, by `kind`: `retryable`, `poison_record`, `fatal`, `trap`, `instantiate`, `contract`,
//! `no_progress`), `kinesis_host_task_traps_total` (by `trap`: `deadline`,
//! `memory_limit`, `panic`, `stack_overflow`, `other`), `kinesis_host_task_retries_total`,
//! `kinesis_host_poison_records_total` and `kinesis_host_task_shard_stops_total` (by `reason`:
//! `fatal`, `retries_exhausted` or `record_too_old`), through the [`metrics`] facade: no-ops
//! unless a recorder is installed, as `run` does with `metrics.address`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use kinesis_host_runtime::{
    Batch, BatchOutput, CallError, Clock, InstanceSpec, MetricChange, RecordRef, ShardState,
    TaskComponent, TaskErrorKind, TaskInstance, TrapKind,
};

use crate::config::RetryPolicy;
use crate::fairness::CpuGate;

/// Where a shard's results go.
pub trait Sink {
    /// The records `batch` were processed; `output` is what they emitted. Called in shard order.
    fn commit(&mut self, batch: &Batch, output: BatchOutput);
    /// The task declared `record` a poison record; it will not be delivered again. Called only
    /// when the sink has no dead-letter output.
    fn poison(&mut self, shard_id: &str, record: RecordRef<'_>, message: &str);
    /// Whether the sink has a dead-letter output for records given up on. Without one, a poison
    /// record goes to [`Sink::poison`], and giving up on any other record stops the shard.
    fn has_dead_letter(&self) -> bool {
        false
    }
    /// `record` is given up on (or a poison record): it goes to the dead-letter output, and
    /// counts as done. Called in shard order, between commits, only when
    /// [`Sink::has_dead_letter`].
    fn dead_letter(&mut self, _record: RecordRef<'_>, _letter: &DeadLetter) {}
}

/// Why the host gave up on a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The task declared it a poison record.
    PoisonRecord,
    /// Its batch failed `task.retry.max.attempts` times.
    RetriesExhausted,
    /// Its batch failed when it was older than `task.retry.max.record.age.ms`.
    RecordTooOld,
    /// An output refused a record the task emitted as invalid (the envelope carries the
    /// emitted record, not a source record).
    OutputRefused,
}

impl GiveUp {
    /// Every reason, for metrics.
    pub const ALL: [GiveUp; 4] = [
        GiveUp::PoisonRecord,
        GiveUp::RetriesExhausted,
        GiveUp::RecordTooOld,
        GiveUp::OutputRefused,
    ];

    /// The name in envelopes, logs and the `reason` label of
    /// `kinesis_host_dead_letter_records_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::PoisonRecord => "poison_record",
            GiveUp::RetriesExhausted => "retries_exhausted",
            GiveUp::RecordTooOld => "record_too_old",
            GiveUp::OutputRefused => "output_refused",
        }
    }
}

/// Why a record was given up on: what its dead-letter envelope says besides the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why.
    pub reason: GiveUp,
    /// The kind of the last failure: `retryable`, `poison_record`, `trap`, `instantiate` or
    /// `no_progress` (as the `kind` label of `kinesis_host_task_errors_total`).
    pub error_kind: &'static str,
    /// The last failure's message.
    pub message: String,
    /// Failed `process` calls that included the record.
    pub attempts: u32,
    /// The job (`job.name`).
    pub job: String,
    /// The input stream.
    pub stream: String,
    /// The shard.
    pub shard_id: String,
}

/// The largest Kinesis record (data and partition key), so the largest envelope.
const MAX_KINESIS_RECORD_BYTES: usize = 1 << 20;

pub use kinesis_host_runtime::{MAX_MESSAGE_BYTES, cut_message};

/// The dead-letter envelope of a record that output `output` (`(name, stream)`) refused as
/// invalid after the task emitted it while processing shard `source` (`(stream, shard)`):
///
/// ```json
/// {"reason":"output_refused","error":{"kind":"output_refused","message":"InvalidArgumentException: …"},
///  "attempts":1,"job":"orders","output":{"name":"alerts","stream":"alerts-out"},
///  "source":{"stream":"orders","shard_id":"shardId-000000000001"},
///  "record":{"partition_key":"k","data":"<base64>"}}
/// ```
///
/// `record` is what the task emitted (with `explicit_hash_key` when set); as in every envelope,
/// data that would not fit a Kinesis record is left out (`data_omitted`).
pub fn refused_envelope(
    job: &str,
    source: (&str, &str),
    output: (&str, &str),
    record: (&str, Option<&str>, &[u8]),
    message: &str,
) -> Vec<u8> {
    let (partition_key, explicit_hash_key, data) = record;
    let build = |encoded: Option<String>| {
        let mut emitted = serde_json::json!({ "partition_key": partition_key });
        if let Some(key) = explicit_hash_key {
            emitted["explicit_hash_key"] = key.into();
        }
        match encoded {
            Some(text) => emitted["data"] = text.into(),
            None => emitted["data_omitted"] = data.len().into(),
        }
        serde_json::json!({
            "reason": GiveUp::OutputRefused.as_str(),
            "error": {
                "kind": GiveUp::OutputRefused.as_str(),
                "message": cut_message(message, MAX_MESSAGE_BYTES),
            },
            "attempts": 1,
            "job": job,
            "output": { "name": output.0, "stream": output.1 },
            "source": { "stream": source.0, "shard_id": source.1 },
            "record": emitted,
        })
        .to_string()
        .into_bytes()
    };
    let json = build(Some(BASE64.encode(data)));
    // The envelope is sent with the record's partition key, which counts into the 1 MiB.
    if json.len() + partition_key.len() > MAX_KINESIS_RECORD_BYTES { build(None) } else { json }
}

impl DeadLetter {
    /// The JSON envelope written to the dead-letter stream for `record`:
    ///
    /// ```json
    /// {"reason":"retries_exhausted","error":{"kind":"retryable","message":"…"},"attempts":5,
    ///  "job":"orders","record":{"stream":"orders","shard_id":"shardId-000000000001",
    ///  "sequence_number":"4960…","sub_sequence_number":0,"partition_key":"k",
    ///  "arrival_millis":1764160000000,"data":"<base64>"}}
    /// ```
    ///
    /// `record` has the fields of a `kinesis-host replay` input line (plus `explicit_hash_key`
    /// when set), so `jq -c .record` turns dead letters into replay input. When the envelope
    /// would exceed a Kinesis record (1 MiB with the partition key), `data` is left out and
    /// `data_omitted` gives the data's length: the record is still in the source stream at that
    /// position for the stream's retention period. A message longer than
    /// [`MAX_MESSAGE_BYTES`] is cut.
    pub fn envelope(&self, record: RecordRef<'_>) -> Vec<u8> {
        let mut json = self.envelope_with(record, Some(BASE64.encode(record.data)));
        if json.len() + record.partition_key.len() > MAX_KINESIS_RECORD_BYTES {
            json = self.envelope_with(record, None);
        }
        json
    }

    fn envelope_with(&self, record: RecordRef<'_>, data: Option<String>) -> Vec<u8> {
        let mut source = serde_json::json!({
            "stream": self.stream,
            "shard_id": self.shard_id,
            "sequence_number": record.sequence_number,
            "sub_sequence_number": record.sub_sequence_number,
            "partition_key": record.partition_key,
            "arrival_millis": record.approximate_arrival_millis,
        });
        if let Some(key) = record.explicit_hash_key {
            source["explicit_hash_key"] = key.into();
        }
        match data {
            Some(data) => source["data"] = data.into(),
            None => source["data_omitted"] = record.data.len().into(),
        }
        let envelope = serde_json::json!({
            "reason": self.reason.as_str(),
            "error": {
                "kind": self.error_kind,
                "message": cut_message(&self.message, MAX_MESSAGE_BYTES),
            },
            "attempts": self.attempts,
            "job": self.job,
            "record": source,
        });
        envelope.to_string().into_bytes()
    }
}

/// How many leading records of `batch` arrived more than `max_age` before `now_millis` (both
/// in milliseconds since the Unix epoch). Records of a shard arrive in order, so these are the
/// batch's too-old records; a later one that is also too old waits for the next failure.
pub fn too_old_prefix(batch: &Batch, now_millis: u64, max_age: Duration) -> usize {
    let max = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    batch
        .iter()
        .take_while(|r| now_millis.saturating_sub(r.approximate_arrival_millis) > max)
        .count()
}

/// The halves a failed batch of `len` records (at least 2) is split into under
/// `task.retry.bisect`: the first gets the smaller half when `len` is odd.
pub fn halves(len: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let mid = len / 2;
    (0..mid, mid..len)
}

/// Milliseconds since the Unix epoch, by the system's wall clock (arrival times are wall times).
fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a shard stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The task reported a fatal error or broke the contract.
    #[error("shard {shard_id} stopped: {source}")]
    Fatal {
        /// The shard.
        shard_id: String,
        /// The task's error.
        source: CallError,
    },
    /// A batch kept failing, and there is no dead-letter output to take its records.
    #[error(
        "shard {shard_id} stopped after {attempts} failed attempts at one batch (task.retry.max.attempts; set task.dead.letter.output to go on without its records); the last: {source}"
    )]
    RetriesExhausted {
        /// The shard.
        shard_id: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        source: CallError,
    },
    /// A batch failed with records older than `task.retry.max.record.age.ms`, and there is no
    /// dead-letter output to take them.
    #[error(
        "shard {shard_id} stopped: a batch failed with record {sequence_number} older than task.retry.max.record.age.ms={max_age_ms} (set task.dead.letter.output to go on without it); the last error: {source}"
    )]
    RecordTooOld {
        /// The shard.
        shard_id: String,
        /// The first record too old.
        sequence_number: String,
        /// The limit.
        max_age_ms: u64,
        /// The last failure.
        source: Box<CallError>,
    },
    /// The shard was asked to stop (a shutdown, a hand-off) before its batch was done; the
    /// records committed before it stay committed, and the rest is delivered again to
    /// whoever processes the shard next.
    #[error("shard {shard_id} was asked to stop before its batch was done")]
    Stopped {
        /// The shard.
        shard_id: String,
    },
}

/// Counts of what happened on a shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Records processed and committed.
    pub records: u64,
    /// Successful `process` calls.
    pub batches: u64,
    /// Records emitted.
    pub emitted: u64,
    /// Failed calls that were retried.
    pub retries: u64,
    /// Traps (each re-created the instance).
    pub traps: u64,
    /// Poison records set aside.
    pub poison_records: u64,
    /// Records written to the dead-letter output (poison records included).
    pub dead_letters: u64,
}

/// A batch waiting for a call, with its failures so far.
struct Pending {
    batch: Batch,
    /// Failed calls of this batch.
    failures: u32,
    /// Failed calls of the larger batches it was split from (bisect).
    earlier: u32,
}

impl Pending {
    fn fresh(batch: Batch) -> Self {
        Self { batch, failures: 0, earlier: 0 }
    }
}

/// What is left of a shard's batch, in shard order.
enum Work {
    /// Records waiting for a call.
    Call(Pending),
    /// A poison record (a batch of one), reported to the sink once every record before it is
    /// committed, so the sink's done count stays a prefix of the shard.
    Poison {
        record: Batch,
        /// Its dead letter, when the sink has a dead-letter output.
        letter: Option<DeadLetter>,
        message: String,
    },
}

/// Asks a shard's worker to stop: a back-off ends at once, and [`ShardWorker::run`] returns
/// [`ShardError::Stopped`] before its next call, the records done so far committed.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<(Mutex<bool>, Condvar)>);

impl StopSignal {
    /// Asks to stop (once is enough; later calls do nothing).
    pub fn stop(&self) {
        let (stopped, wake) = &*self.0;
        *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits `duration`, or less when a stop is asked for; returns whether one was.
    fn wait(&self, duration: Duration) -> bool {
        let (stopped, wake) = &*self.0;
        let guard = stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = wake
            .wait_timeout_while(guard, duration, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }
}

/// Makes a shard's `process` calls: the task's instance, created on the first call and again
/// after one that poisoned it (a trait so the failure policy is tested without wasm).
trait Task: Send {
    fn process(&mut self, batch: &Batch, state: &mut ShardState) -> Result<BatchOutput, CallError>;
    /// Drops the instance: the next call creates a new one.
    fn reset(&mut self);
    /// Fuel burned by the current instance (0 without one).
    fn fuel_consumed(&self) -> u64;
    /// Calls the instance's `shutdown`, if there is one, and drops it.
    fn shutdown(&mut self);
    /// What changed in the task's metrics since the last call of this (none without an
    /// instance).
    fn take_metric_changes(&mut self) -> Vec<(Arc<str>, MetricChange)> {
        Vec::new()
    }
}

/// The task's instance, created on demand from its component.
struct Instance {
    component: Arc<TaskComponent>,
    spec: Arc<InstanceSpec>,
    instance: Option<TaskInstance>,
}

impl Task for Instance {
    fn process(&mut self, batch: &Batch, state: &mut ShardState) -> Result<BatchOutput, CallError> {
        let instance = match &mut self.instance {
            Some(instance) => instance,
            None => self.instance.insert(TaskInstance::new(&self.component, self.spec.clone())?),
        };
        instance.process(batch, state)
    }

    fn reset(&mut self) {
        self.instance = None;
    }

    fn fuel_consumed(&self) -> u64 {
        self.instance.as_ref().map_or(0, TaskInstance::fuel_consumed)
    }

    fn shutdown(&mut self) {
        if let Some(instance) = self.instance.take() {
            instance.shutdown();
        }
    }

    fn take_metric_changes(&mut self) -> Vec<(Arc<str>, MetricChange)> {
        self.instance.as_mut().map_or_else(Vec::new, TaskInstance::take_metric_changes)
    }
}

/// Runs one shard's batches through its task instance.
pub struct ShardWorker {
    task: Box<dyn Task>,
    spec: Arc<InstanceSpec>,
    state: ShardState,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    stats: ShardStats,
    /// The host's CPU gate (`serve`), entered around every wasm call.
    gate: Option<Arc<CpuGate>>,
    /// Set when the shard is asked to stop.
    stop: Option<StopSignal>,
}

impl std::fmt::Debug for ShardWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWorker")
            .field("shard_id", &self.spec.shard_id)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ShardWorker {
    /// A worker for one shard; the instance is created on the first batch.
    pub fn new(
        component: Arc<TaskComponent>,
        spec: Arc<InstanceSpec>,
        retry: RetryPolicy,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let task = Box::new(Instance { component, spec: spec.clone(), instance: None });
        Self::with_task(task, spec, retry, clock)
    }

    fn with_task(
        task: Box<dyn Task>,
        spec: Arc<InstanceSpec>,
        retry: RetryPolicy,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            task,
            spec,
            state: ShardState::default(),
            retry,
            clock,
            stats: ShardStats::default(),
            gate: None,
            stop: None,
        }
    }

    /// Stops [`ShardWorker::run`] early, with what is committed so far, when `stop` is asked
    /// to: a back-off waits for it rather than the clock.
    pub fn set_stop(&mut self, stop: StopSignal) {
        self.stop = Some(stop);
    }

    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(StopSignal::is_stopped)
    }

    /// Runs every wasm call (instantiation and `process`) through `gate` (see
    /// [`crate::fairness`]).
    pub fn with_gate(mut self, gate: Option<Arc<CpuGate>>) -> Self {
        self.gate = gate;
        self
    }

    /// As [`ShardWorker::with_gate`], in place.
    pub fn set_gate(&mut self, gate: Arc<CpuGate>) {
        self.gate = Some(gate);
    }

    /// What happened so far.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Replaces the shard's state (before the first batch: the state restored with the
    /// checkpoint). A state over `task.limits.state.total.bytes` is kept, with a warning: the
    /// task's writes that grow it are refused.
    pub fn restore_state(&mut self, state: ShardState) {
        let limit = self.spec.limits.state_total_bytes;
        if state.bytes() > limit {
            tracing::warn!(shard = %self.spec.shard_id, bytes = state.bytes(), limit, "The restored task state is larger than task.limits.state.total.bytes: writes that grow it are refused; raise task.limits.state.total.bytes.");
        }
        self.state = state;
    }

    /// Processes every record of `batch`, committing to `sink` as records are done.
    ///
    /// # Errors
    /// When the shard must stop: a fatal task error, or records to give up on (a batch failing
    /// `task.retry.max.attempts` times, or failing with records older than
    /// `task.retry.max.record.age.ms`) while the sink has no dead-letter output. Records
    /// committed before that stay committed.
    pub fn run(&mut self, batch: Batch, sink: &mut dyn Sink) -> Result<(), ShardError> {
        let shard_id = self.spec.shard_id.clone();
        let mut work = VecDeque::from([Work::Call(Pending::fresh(batch))]);
        while let Some(next) = work.pop_front() {
            let Pending { batch: pending, failures, earlier } = match next {
                Work::Call(pending) => pending,
                Work::Poison { record, letter, message } => {
                    // Every record before it is committed: it may count as done now.
                    if let Some(record) = record.get(0) {
                        match &letter {
                            Some(letter) => {
                                sink.dead_letter(record, letter);
                                self.stats.dead_letters += 1;
                            }
                            None => sink.poison(&shard_id, record, &message),
                        }
                    }
                    continue;
                }
            };
            if pending.is_empty() {
                continue;
            }
            if self.stop_requested() {
                return Err(ShardError::Stopped { shard_id });
            }
            let gate = self.gate.clone();
            let permit = gate.as_ref().map(|g| g.enter(&self.spec.job));
            let fuel_before = self.task.fuel_consumed();
            let result = self.task.process(&pending, &mut self.state);
            self.after_call(permit, fuel_before, result.is_err());
            let error = match result {
                Ok(output) => {
                    let processed = output.processed;
                    tracing::debug!(shard = %shard_id, records = pending.len(), processed, emitted = output.emits.len(), "Batch processed.");
                    self.stats.batches += 1;
                    self.stats.records += processed as u64;
                    self.stats.emitted += output.emits.len() as u64;
                    if processed == pending.len() {
                        sink.commit(&pending, output);
                        continue;
                    }
                    // A partial result: commit the done prefix, deliver the rest again.
                    sink.commit(&pending.slice(0..processed), output);
                    let rest = pending.slice(processed..pending.len());
                    if processed > 0 {
                        work.push_front(Work::Call(Pending::fresh(rest)));
                        continue;
                    }
                    self.count_error("no_progress");
                    let error = CallError::Contract {
                        shard_id: shard_id.clone(),
                        message: "it finished none of the batch's records".into(),
                    };
                    let failed = Pending { batch: rest, failures: failures + 1, earlier };
                    self.failed(failed, "no_progress", error, sink, &mut work)?;
                    continue;
                }
                Err(error) => error,
            };
            let kind = error_kind(&error);
            self.count_error(kind);
            if let CallError::Trap { kind, .. } = &error {
                metrics::counter!(
                    "kinesis_host_task_traps_total",
                    "job" => self.spec.job.clone(),
                    "stream" => self.spec.stream.clone(),
                    "trap" => trap_kind(*kind),
                )
                .increment(1);
            }
            match &error {
                CallError::Task {
                    kind: TaskErrorKind::PoisonRecord,
                    record_index: Some(index),
                    message,
                    ..
                } if (*index as usize) < pending.len() => {
                    let index = *index as usize;
                    let message = cut_message(message, self.message_bytes());
                    if let Some(record) = pending.get(index) {
                        tracing::warn!(shard = %shard_id, sequence_number = record.sequence_number, sub_sequence_number = record.sub_sequence_number, error = %message, dead_letter = sink.has_dead_letter(), "Poison record set aside.");
                    }
                    self.stats.poison_records += 1;
                    metrics::counter!(
                        "kinesis_host_poison_records_total",
                        "job" => self.spec.job.clone(),
                        "stream" => self.spec.stream.clone(),
                    )
                    .increment(1);
                    // The records before it are delivered again (their emits were discarded),
                    // and it counts as done only once they are committed.
                    let letter = sink
                        .has_dead_letter()
                        .then(|| self.letter(GiveUp::PoisonRecord, kind, &error, 1));
                    work.push_front(Work::Call(Pending::fresh(
                        pending.slice(index + 1..pending.len()),
                    )));
                    work.push_front(Work::Poison {
                        record: pending.slice(index..index + 1),
                        letter,
                        message: message.into_owned(),
                    });
                    work.push_front(Work::Call(Pending::fresh(pending.slice(0..index))));
                }
                CallError::Task {
                    kind: TaskErrorKind::Fatal | TaskErrorKind::PoisonRecord,
                    ..
                }
                | CallError::Contract { .. } => {
                    self.count_stop("fatal");
                    return Err(ShardError::Fatal { shard_id, source: error });
                }
                _ => {
                    if error.poisons_instance() {
                        self.stats.traps += 1;
                        self.task.reset();
                    }
                    let failed = Pending { batch: pending, failures: failures + 1, earlier };
                    self.failed(failed, kind, error, sink, &mut work)?;
                }
            }
        }
        Ok(())
    }

    /// After a failed call of `failed` (its `failures` already counting this one): gives up on
    /// its leading records that are too old, bisects the rest, gives up on it once it has failed
    /// `task.retry.max.attempts` times, or else backs off and puts it back in front of `work`.
    fn failed(
        &mut self,
        failed: Pending,
        kind: &'static str,
        error: CallError,
        sink: &mut dyn Sink,
        work: &mut VecDeque<Work>,
    ) -> Result<(), ShardError> {
        let Pending { batch, failures, earlier } = failed;
        let shard_id = self.spec.shard_id.clone();
        let attempts = earlier.saturating_add(failures);
        let mut batch = batch;
        if let Some(max_age) = self.retry.max_record_age {
            let old = too_old_prefix(&batch, wall_millis(), max_age);
            if old > 0 {
                if !sink.has_dead_letter() {
                    self.count_stop("record_too_old");
                    return Err(ShardError::RecordTooOld {
                        sequence_number: batch
                            .get(0)
                            .map(|r| r.sequence_number.to_owned())
                            .unwrap_or_default(),
                        shard_id,
                        max_age_ms: u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
                        source: Box::new(error),
                    });
                }
                let letter = self.letter(GiveUp::RecordTooOld, kind, &error, attempts);
                self.give_up(&batch.slice(0..old), &letter, sink);
                batch = batch.slice(old..batch.len());
                if batch.is_empty() {
                    return Ok(());
                }
            }
        }
        if self.retry.bisect && batch.len() > 1 {
            let (first, second) = halves(batch.len());
            self.retry_after(&shard_id, 1, batch.len(), &error)?;
            let (first, second) = (batch.slice(first), batch.slice(second));
            work.push_front(Work::Call(Pending { batch: second, failures: 0, earlier: attempts }));
            work.push_front(Work::Call(Pending { batch: first, failures: 0, earlier: attempts }));
            return Ok(());
        }
        if self.retry.exhausted(failures) {
            if !sink.has_dead_letter() {
                self.count_stop("retries_exhausted");
                return Err(ShardError::RetriesExhausted {
                    shard_id,
                    attempts: failures,
                    source: error,
                });
            }
            let letter = self.letter(GiveUp::RetriesExhausted, kind, &error, attempts);
            self.give_up(&batch, &letter, sink);
            return Ok(());
        }
        self.retry_after(&shard_id, failures, batch.len(), &error)?;
        work.push_front(Work::Call(Pending { batch, failures, earlier }));
        Ok(())
    }

    /// Counts a retry and sleeps the back-off after `failures` failures in a row.
    ///
    /// # Errors
    /// [`ShardError::Stopped`] when the shard is asked to stop during the back-off.
    fn retry_after(
        &mut self,
        shard_id: &str,
        failures: u32,
        records: usize,
        error: &CallError,
    ) -> Result<(), ShardError> {
        self.stats.retries += 1;
        self.count_retry();
        let backoff = self.retry.backoff(failures);
        let bisect = self.retry.bisect && records > 1;
        let error = error.to_string();
        let error = cut_message(&error, self.message_bytes());
        tracing::warn!(shard = %shard_id, attempt = failures, records, bisect, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), %error, "Batch failed; retrying.");
        let stopped = match &self.stop {
            Some(stop) => stop.wait(backoff),
            None => {
                self.clock.sleep(backoff);
                false
            }
        };
        if stopped {
            tracing::info!(shard = %shard_id, "Asked to stop during a back-off: stopping with the records done so far.");
            return Err(ShardError::Stopped { shard_id: shard_id.to_owned() });
        }
        Ok(())
    }

    /// The longest task message this shard repeats: `task.limits.log.line.bytes`, at most
    /// [`MAX_MESSAGE_BYTES`].
    fn message_bytes(&self) -> usize {
        self.spec.limits.log_line_bytes.min(MAX_MESSAGE_BYTES)
    }

    /// Sends every record of `batch` to the sink's dead-letter output.
    fn give_up(&mut self, batch: &Batch, letter: &DeadLetter, sink: &mut dyn Sink) {
        let first = batch.get(0).map(|r| r.sequence_number.to_owned()).unwrap_or_default();
        tracing::warn!(shard = %letter.shard_id, reason = letter.reason.as_str(), records = batch.len(), first_sequence_number = %first, attempts = letter.attempts, error = %letter.message, "Giving up on records: writing them to the dead-letter output.");
        for record in batch.iter() {
            tracing::trace!(shard = %letter.shard_id, sequence_number = record.sequence_number, sub_sequence_number = record.sub_sequence_number, "Dead letter.");
            sink.dead_letter(record, letter);
            self.stats.dead_letters += 1;
        }
    }

    fn letter(
        &self,
        reason: GiveUp,
        error_kind: &'static str,
        error: &CallError,
        attempts: u32,
    ) -> DeadLetter {
        DeadLetter {
            reason,
            error_kind,
            // The task's own words when it returned an error; else the host's description.
            message: match error {
                CallError::Task { message, .. } => {
                    cut_message(message, self.message_bytes()).into_owned()
                }
                other => cut_message(&other.to_string(), self.message_bytes()).into_owned(),
            },
            attempts,
            job: self.spec.job.clone(),
            stream: self.spec.stream.clone(),
            shard_id: self.spec.shard_id.clone(),
        }
    }

    /// Calls the task's `shutdown` and drops the instance.
    pub fn shutdown(mut self) -> ShardState {
        self.task.shutdown();
        self.state
    }

    /// Gives the CPU gate's slot back and counts the fuel the call burned
    /// (`kinesis_host_task_fuel_consumed_total`).
    fn after_call(
        &mut self,
        permit: Option<crate::fairness::Permit<'_>>,
        fuel_before: u64,
        failed: bool,
    ) {
        if let Some(permit) = permit {
            permit.finish(failed);
        }
        // Whether the call failed or not: metrics are not part of a batch's commit.
        crate::task_metrics::record(
            &self.spec.job,
            &self.spec.stream,
            &self.spec.shard_id,
            self.spec.limits.metric_names,
            self.task.take_metric_changes(),
        );
        if self.spec.limits.fuel_per_batch.is_some() {
            let burned = self.task.fuel_consumed().saturating_sub(fuel_before);
            metrics::counter!("kinesis_host_task_fuel_consumed_total", "job" => self.spec.job.clone())
                .increment(burned);
        }
    }

    /// Counts a failed `process` call (`kinesis_host_task_errors_total`).
    fn count_error(&self, kind: &'static str) {
        metrics::counter!(
            "kinesis_host_task_errors_total",
            "job" => self.spec.job.clone(),
            "stream" => self.spec.stream.clone(),
            "kind" => kind,
        )
        .increment(1);
    }

    /// Counts a batch retried after a back-off (`kinesis_host_task_retries_total`).
    fn count_retry(&self) {
        metrics::counter!(
            "kinesis_host_task_retries_total",
            "job" => self.spec.job.clone(),
            "stream" => self.spec.stream.clone(),
        )
        .increment(1);
    }

    /// Counts a shard stopped by its task (`kinesis_host_task_shard_stops_total`).
    fn count_stop(&self, reason: &'static str) {
        metrics::counter!(
            "kinesis_host_task_shard_stops_total",
            "job" => self.spec.job.clone(),
            "stream" => self.spec.stream.clone(),
            "reason" => reason,
        )
        .increment(1);
    }
}

/// The `kind` label of `kinesis_host_task_errors_total` for a failed call: the kind the task
/// returned (`retryable`, `poison_record`, `fatal`), `trap` (the instance trapped or was
/// unusable), `instantiate` (no new instance could be created) or `contract` (the task broke the
/// contract). A call that returned ok but finished none of its records counts as `no_progress`.
fn error_kind(error: &CallError) -> &'static str {
    match error {
        CallError::Task { kind: TaskErrorKind::Retryable, .. } => "retryable",
        CallError::Task { kind: TaskErrorKind::PoisonRecord, .. } => "poison_record",
        CallError::Task { kind: TaskErrorKind::Fatal, .. } => "fatal",
        CallError::Trap { .. } | CallError::Poisoned { .. } => "trap",
        CallError::Instantiate { .. } => "instantiate",
        CallError::Contract { .. } => "contract",
    }
}

/// The `trap` label of `kinesis_host_task_traps_total`.
fn trap_kind(kind: TrapKind) -> &'static str {
    match kind {
        TrapKind::Deadline => "deadline",
        TrapKind::MemoryLimit => "memory_limit",
        TrapKind::Panic => "panic",
        TrapKind::StackOverflow => "stack_overflow",
        TrapKind::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(seq: &'a str, arrival: u64, data: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            data,
            partition_key: "key-1",
            sequence_number: seq,
            sub_sequence_number: 0,
            explicit_hash_key: None,
            approximate_arrival_millis: arrival,
        }
    }

    fn batch(arrivals: &[u64]) -> Batch {
        let seqs: Vec<String> = (0..arrivals.len()).map(|i| format!("{}", 100 + i)).collect();
        let mut b = Batch::new("s", "shardId-000000000000", 100, 1 << 20);
        for (seq, arrival) in seqs.iter().zip(arrivals) {
            assert!(b.push(&record(seq, *arrival, b"x")));
        }
        b
    }

    #[test]
    fn too_old_records_are_the_leading_ones_past_the_age() {
        let max = Duration::from_millis(1000);
        let b = batch(&[1000, 1500, 2000, 2999, 3000, 1200]);
        // At 3000, records that arrived before 2000 are older than 1000 ms; 2000 is exactly
        // 1000 ms old, not older.
        assert_eq!(too_old_prefix(&b, 3000, max), 2);
        assert_eq!(too_old_prefix(&b, 1000, max), 0);
        // The prefix stops at the first young record even if a later one is old.
        assert_eq!(too_old_prefix(&b, 4000, max), 4);
        assert_eq!(too_old_prefix(&b, 10_000, max), 6);
        assert_eq!(too_old_prefix(&batch(&[]), 10_000, max), 0);
        // An arrival in the future (clock skew) is not old.
        assert_eq!(too_old_prefix(&batch(&[5000]), 3000, max), 0);
    }

    #[test]
    fn bisecting_halves_cover_the_batch_in_order_down_to_one_record() {
        assert_eq!(halves(2), (0..1, 1..2));
        assert_eq!(halves(5), (0..2, 2..5));
        // Isolating one record of 500 by halving the part that holds it: every level has a
        // non-empty half on each side, and it takes ceil(log2(500)) = 9 splits.
        for bad in [0, 1, 249, 250, 498, 499] {
            let (mut start, mut end, mut splits) = (0usize, 500usize, 0);
            while end - start > 1 {
                let (a, b) = halves(end - start);
                assert!(!a.is_empty() && !b.is_empty());
                assert_eq!((a.start, a.end, b.end), (0, b.start, end - start));
                if bad - start < a.end {
                    end = start + a.end;
                } else {
                    start += b.start;
                }
                splits += 1;
            }
            assert_eq!(start, bad);
            assert!(splits <= 9, "{splits}");
        }
    }

    #[test]
    fn envelope_carries_the_error_and_the_source_position() -> Result<(), serde_json::Error> {
        let letter = DeadLetter {
            reason: GiveUp::RetriesExhausted,
            error_kind: "retryable",
            message: "downstream \"db\" unavailable".into(),
            attempts: 5,
            job: "orders".into(),
            stream: "orders-in".into(),
            shard_id: "shardId-000000000001".into(),
        };
        let mut r =
            record("49590338271490256608559692538361571095921575989136588898", 1234, b"\x00hi");
        r.sub_sequence_number = 3;
        let v: serde_json::Value = serde_json::from_slice(&letter.envelope(r))?;
        assert_eq!(
            v,
            serde_json::json!({
                "reason": "retries_exhausted",
                "error": { "kind": "retryable", "message": "downstream \"db\" unavailable" },
                "attempts": 5,
                "job": "orders",
                "record": {
                    "stream": "orders-in",
                    "shard_id": "shardId-000000000001",
                    "sequence_number": "49590338271490256608559692538361571095921575989136588898",
                    "sub_sequence_number": 3,
                    "partition_key": "key-1",
                    "arrival_millis": 1234,
                    "data": "AGhp",
                }
            })
        );
        r.explicit_hash_key = Some("42");
        let v: serde_json::Value = serde_json::from_slice(&letter.envelope(r))?;
        assert_eq!(v["record"]["explicit_hash_key"], "42");
        Ok(())
    }

    #[test]
    fn an_envelope_too_large_for_kinesis_leaves_the_data_out() -> Result<(), serde_json::Error> {
        let letter = DeadLetter {
            reason: GiveUp::PoisonRecord,
            error_kind: "poison_record",
            message: "bad".into(),
            attempts: 1,
            job: "j".into(),
            stream: "s".into(),
            shard_id: "shardId-000000000000".into(),
        };
        let data = vec![7u8; 1 << 20];
        let envelope = letter.envelope(record("1", 0, &data));
        assert!(envelope.len() < 4096, "{}", envelope.len());
        let v: serde_json::Value = serde_json::from_slice(&envelope)?;
        assert_eq!(v["record"]["data_omitted"], 1 << 20);
        assert!(v["record"].get("data").is_none());
        // Just under the limit, the data stays.
        let data = vec![7u8; 700_000];
        let v: serde_json::Value = serde_json::from_slice(&letter.envelope(record("1", 0, &data)))?;
        assert!(v["record"]["data"].is_string());
        Ok(())
    }

    #[test]
    fn attempts_limit_minus_one_means_none() {
        let unlimited = RetryPolicy { max_attempts: None, ..RetryPolicy::default() };
        assert!(!unlimited.exhausted(u32::MAX));
        let once = RetryPolicy { max_attempts: Some(1), ..RetryPolicy::default() };
        assert!(once.exhausted(1));
        let five = RetryPolicy::default();
        assert!(!five.exhausted(4));
        assert!(five.exhausted(5));
    }

    /// A fake task: a batch with a record whose data starts with `poison` fails on it as a
    /// poison record (checked first, as a task validating its batch would); else the first
    /// record starting with `fatal` fails the call as fatal, and one starting with `fail`
    /// fails it as retryable, or finishes the records before it when there are some.
    struct Fake {
        /// The sequence numbers of every call, in order.
        calls: std::sync::mpsc::Sender<Vec<String>>,
        /// The message of its errors.
        message: String,
    }

    impl Task for Fake {
        fn process(
            &mut self,
            batch: &Batch,
            _state: &mut ShardState,
        ) -> Result<BatchOutput, CallError> {
            let _ = self.calls.send(batch.iter().map(|r| r.sequence_number.to_owned()).collect());
            let error = |kind, record_index| CallError::Task {
                shard_id: "shardId-000000000000".into(),
                kind,
                record_index,
                message: self.message.clone(),
            };
            let records: Vec<&[u8]> = batch.iter().map(|r| r.data).collect();
            if let Some(i) = records.iter().position(|d| d.starts_with(b"poison")) {
                return Err(error(TaskErrorKind::PoisonRecord, Some(i as u32)));
            }
            for (i, data) in records.iter().enumerate() {
                if data.starts_with(b"fatal") {
                    return Err(error(TaskErrorKind::Fatal, None));
                }
                if data.starts_with(b"fail") {
                    if i == 0 {
                        return Err(error(TaskErrorKind::Retryable, None));
                    }
                    return Ok(BatchOutput { processed: i, ..BatchOutput::default() });
                }
            }
            Ok(BatchOutput { processed: batch.len(), ..BatchOutput::default() })
        }

        fn reset(&mut self) {}

        fn fuel_consumed(&self) -> u64 {
            0
        }

        fn shutdown(&mut self) {}
    }

    /// A sink that counts done records as `run.rs`'s does and logs what it was told.
    #[derive(Default)]
    struct Log {
        dead_letter: bool,
        done: usize,
        events: Vec<String>,
        letters: Vec<DeadLetter>,
    }

    impl Sink for Log {
        fn commit(&mut self, batch: &Batch, _output: BatchOutput) {
            self.done += batch.len();
            let seqs: Vec<&str> = batch.iter().map(|r| r.sequence_number).collect();
            self.events.push(format!("commit {}", seqs.join(",")));
        }

        fn poison(&mut self, _shard_id: &str, record: RecordRef<'_>, _message: &str) {
            self.done += 1;
            self.events.push(format!("poison {}", record.sequence_number));
        }

        fn has_dead_letter(&self) -> bool {
            self.dead_letter
        }

        fn dead_letter(&mut self, record: RecordRef<'_>, letter: &DeadLetter) {
            self.done += 1;
            self.events.push(format!("dead letter {}", record.sequence_number));
            self.letters.push(letter.clone());
        }
    }

    fn worker(
        retry: RetryPolicy,
        message: &str,
    ) -> (ShardWorker, std::sync::mpsc::Receiver<Vec<String>>) {
        let (calls, seen) = std::sync::mpsc::channel();
        let spec = Arc::new(InstanceSpec {
            job: "j".into(),
            stream: "s".into(),
            shard_id: "shardId-000000000000".into(),
            outputs: kinesis_host_runtime::Outputs::Any,
            config: Vec::new(),
            limits: kinesis_host_runtime::Limits::default(),
        });
        let task = Box::new(Fake { calls, message: message.into() });
        let clock: Arc<dyn Clock> = Arc::new(kinesis_host_runtime::SystemClock);
        (ShardWorker::with_task(task, spec, retry, clock), seen)
    }

    /// Records with sequence numbers 100, 101, … and the given data.
    fn batch_of(data: &[&str]) -> Batch {
        let seqs: Vec<String> = (0..data.len()).map(|i| format!("{}", 100 + i)).collect();
        let mut b = Batch::new("s", "shardId-000000000000", 100, 1 << 20);
        for (seq, data) in seqs.iter().zip(data) {
            assert!(b.push(&record(seq, 0, data.as_bytes())));
        }
        b
    }

    #[test]
    fn a_poison_record_is_done_only_after_the_records_before_it() {
        for dead_letter in [false, true] {
            let (mut w, _calls) = worker(RetryPolicy::default(), "bad");
            let mut sink = Log { dead_letter, ..Log::default() };
            assert!(w.run(batch_of(&["a", "b", "poison", "c"]), &mut sink).is_ok());
            let set_aside = if dead_letter { "dead letter 102" } else { "poison 102" };
            assert_eq!(sink.events, ["commit 100,101", set_aside, "commit 103"]);
            assert_eq!(sink.done, 4);

            // The records before the poison record then fail for good: none is done, so the
            // checkpoint stays before them all (the poison record comes again with them).
            let (mut w, _calls) = worker(RetryPolicy::default(), "bad");
            let mut sink = Log { dead_letter, ..Log::default() };
            let result = w.run(batch_of(&["a", "fatal", "poison"]), &mut sink);
            assert!(matches!(result, Err(ShardError::Fatal { .. })), "{result:?}");
            assert_eq!(sink.done, 0, "{:?}", sink.events);
            assert!(sink.events.is_empty(), "{:?}", sink.events);
        }
    }

    #[test]
    fn a_poison_record_waits_for_the_records_retried_before_it() {
        // Without a dead-letter output, records that fail until the attempts run out stop the
        // shard: the poison record after them is not done either.
        let retry = RetryPolicy {
            max_attempts: Some(2),
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            ..RetryPolicy::default()
        };
        let (mut w, _calls) = worker(retry, "bad");
        let mut sink = Log::default();
        let result = w.run(batch_of(&["a", "fail", "poison"]), &mut sink);
        assert!(matches!(result, Err(ShardError::RetriesExhausted { .. })), "{result:?}");
        assert_eq!(sink.events, ["commit 100"]);
        assert_eq!(sink.done, 1);
    }

    #[test]
    fn a_long_task_message_is_cut_in_dead_letters() -> Result<(), serde_json::Error> {
        let long = "é".repeat(1 << 20);
        let (mut w, _calls) = worker(RetryPolicy::default(), &long);
        let mut sink = Log { dead_letter: true, ..Log::default() };
        assert!(w.run(batch_of(&["poison"]), &mut sink).is_ok());
        let [letter] = sink.letters.as_slice() else { panic!("{:?}", sink.events) };
        let limit = kinesis_host_runtime::Limits::default().log_line_bytes;
        assert!(letter.message.len() < limit + 64, "{}", letter.message.len());
        assert!(letter.message.starts_with("éé"));
        assert!(
            letter.message.ends_with("(cut: 2097152 bytes in all)"),
            "{}",
            &letter.message[limit - 8..]
        );

        // Even a letter built with a long message makes an envelope Kinesis takes.
        let letter = DeadLetter { message: long.clone(), ..letter.clone() };
        let envelope = letter.envelope(record("1", 0, b"x"));
        assert!(envelope.len() < MAX_MESSAGE_BYTES + 1024, "{}", envelope.len());
        let v: serde_json::Value = serde_json::from_slice(&envelope)?;
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.ends_with("(cut: 2097152 bytes in all)"));
        assert_eq!(v["record"]["data"], "eA==");
        Ok(())
    }

    #[test]
    fn a_stop_ends_a_back_off_with_the_records_done() {
        // Retried for ever, an hour apart: only the stop ends it.
        let retry = RetryPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(3600),
            ..RetryPolicy::default()
        };
        let (mut w, calls) = worker(retry, "down");
        let stop = StopSignal::default();
        w.set_stop(stop.clone());
        let (done, result) = std::sync::mpsc::channel();
        let running = std::thread::spawn(move || {
            let mut sink = Log::default();
            let outcome = w.run(batch_of(&["a", "b", "fail", "c"]), &mut sink);
            let _ = done.send((outcome, sink.done, sink.events));
        });
        // The first call finishes two records; the second fails and backs off.
        assert_eq!(
            calls.recv().ok(),
            Some(vec!["100".into(), "101".into(), "102".into(), "103".into()])
        );
        assert_eq!(calls.recv().ok(), Some(vec!["102".into(), "103".into()]));
        stop.stop();
        // A guard against a hang, not a timing assertion: the back-off is an hour.
        let (outcome, done, events) =
            result.recv_timeout(Duration::from_secs(600)).expect("run returns once stopped");
        assert!(matches!(outcome, Err(ShardError::Stopped { .. })), "{outcome:?}");
        assert_eq!(done, 2);
        assert_eq!(events, ["commit 100,101"]);
        assert!(running.join().is_ok());
        // No call after the stop.
        assert!(calls.try_recv().is_err());
    }
}
