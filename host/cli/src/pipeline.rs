//! One shard's task, batch by batch: joins the runtime (which knows wasmtime) to whatever feeds
//! and commits records. It applies the failure policy: retryable errors and traps back off and
//! retry (a trap also re-creates the instance), a poison record is set aside while the records
//! around it go on, a fatal error stops the shard.
//!
//! It records, labelled with `job` and `stream`, `kinesis_host_task_errors_total` (one per failed
//! call, by `kind`: `retryable`, `poison_record`, `fatal`, `trap`, `instantiate`, `contract`,
//! `no_progress`), `kinesis_host_task_traps_total` (by `trap`: `deadline`,
//! `memory_limit`, `panic`, `stack_overflow`, `other`), `kinesis_host_task_retries_total`,
//! `kinesis_host_poison_records_total` and `kinesis_host_task_shard_stops_total` (by `reason`:
//! `fatal` or `retries_exhausted`), through the [`metrics`] facade: no-ops unless a recorder is
//! installed, as `run` does with `metrics.address`.

use std::collections::VecDeque;
use std::sync::Arc;

use kinesis_host_runtime::{
    Batch, BatchOutput, CallError, Clock, InstanceSpec, RecordRef, ShardState, TaskComponent,
    TaskErrorKind, TaskInstance, TrapKind,
};

use crate::config::RetryPolicy;
use crate::fairness::CpuGate;

/// Where a shard's results go.
pub trait Sink {
    /// The records `batch` were processed; `output` is what they emitted. Called in shard order.
    fn commit(&mut self, batch: &Batch, output: BatchOutput);
    /// The task declared `record` a poison record; it will not be delivered again.
    fn poison(&mut self, shard_id: &str, record: RecordRef<'_>, message: &str);
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
    /// A batch kept failing.
    #[error(
        "shard {shard_id} stopped after {attempts} failed attempts at one batch (task.retry.max.attempts); the last: {source}"
    )]
    RetriesExhausted {
        /// The shard.
        shard_id: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        source: CallError,
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
}

/// Runs one shard's batches through its task instance.
pub struct ShardWorker {
    component: Arc<TaskComponent>,
    spec: Arc<InstanceSpec>,
    instance: Option<TaskInstance>,
    state: ShardState,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    stats: ShardStats,
    /// The host's CPU gate (`serve`), entered around every wasm call.
    gate: Option<Arc<CpuGate>>,
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
        Self {
            component,
            spec,
            instance: None,
            state: ShardState::default(),
            retry,
            clock,
            stats: ShardStats::default(),
            gate: None,
        }
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

    /// Processes every record of `batch`, committing to `sink` as records are done.
    ///
    /// # Errors
    /// When the shard must stop: a fatal task error, or one batch failing
    /// `task.retry.max.attempts` times. Records committed before that stay committed.
    pub fn run(&mut self, batch: Batch, sink: &mut dyn Sink) -> Result<(), ShardError> {
        let shard_id = self.spec.shard_id.clone();
        let mut work = VecDeque::from([batch]);
        let mut failures = 0u32;
        while let Some(pending) = work.pop_front() {
            if pending.is_empty() {
                continue;
            }
            let gate = self.gate.clone();
            let permit = gate.as_ref().map(|g| g.enter(&self.spec.job));
            let fuel_before = self.instance.as_ref().map_or(0, TaskInstance::fuel_consumed);
            let result = match self.ensure_instance() {
                Ok(()) => match self.instance.as_mut() {
                    Some(instance) => instance.process(&pending, &mut self.state),
                    None => Err(CallError::Poisoned { shard_id: shard_id.clone() }),
                },
                Err(e) => Err(e),
            };
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
                        failures = 0;
                        continue;
                    }
                    // A partial result: commit the done prefix, deliver the rest again.
                    sink.commit(&pending.slice(0..processed), output);
                    let rest = pending.slice(processed..pending.len());
                    if processed > 0 {
                        failures = 0;
                        work.push_front(rest);
                        continue;
                    }
                    failures += 1;
                    self.count_error("no_progress");
                    let error = CallError::Contract {
                        shard_id: shard_id.clone(),
                        message: "it finished none of the batch's records".into(),
                    };
                    self.back_off(&shard_id, failures, error)?;
                    work.push_front(rest);
                    continue;
                }
                Err(error) => error,
            };
            self.count_error(error_kind(&error));
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
                    if let Some(record) = pending.get(index) {
                        tracing::warn!(shard = %shard_id, sequence_number = record.sequence_number, sub_sequence_number = record.sub_sequence_number, error = %message, "Poison record set aside.");
                        sink.poison(&shard_id, record, message);
                    }
                    self.stats.poison_records += 1;
                    metrics::counter!(
                        "kinesis_host_poison_records_total",
                        "job" => self.spec.job.clone(),
                        "stream" => self.spec.stream.clone(),
                    )
                    .increment(1);
                    failures = 0;
                    // The records before it are delivered again: their emits were discarded.
                    work.push_front(pending.slice(index + 1..pending.len()));
                    work.push_front(pending.slice(0..index));
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
                    failures += 1;
                    if error.poisons_instance() {
                        self.stats.traps += 1;
                        self.instance = None;
                    }
                    self.back_off(&shard_id, failures, error)?;
                    work.push_front(pending);
                }
            }
        }
        Ok(())
    }

    /// After the `failures`-th failure in a row of one batch: stops the shard when that was the
    /// last attempt allowed, else counts a retry and sleeps the back-off.
    fn back_off(
        &mut self,
        shard_id: &str,
        failures: u32,
        error: CallError,
    ) -> Result<(), ShardError> {
        if failures >= self.retry.max_attempts {
            self.count_stop("retries_exhausted");
            return Err(ShardError::RetriesExhausted {
                shard_id: shard_id.to_owned(),
                attempts: failures,
                source: error,
            });
        }
        self.stats.retries += 1;
        self.count_retry();
        let backoff = self.retry.backoff(failures);
        tracing::warn!(shard = %shard_id, attempt = failures, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), %error, "Batch failed; retrying.");
        self.clock.sleep(backoff);
        Ok(())
    }

    /// Calls the task's `shutdown` and drops the instance.
    pub fn shutdown(mut self) -> ShardState {
        if let Some(instance) = self.instance.take() {
            instance.shutdown();
        }
        self.state
    }

    /// Gives the CPU gate's slot back and counts the fuel the call burned
    /// (`kinesis_host_task_fuel_consumed_total`).
    fn after_call(
        &self,
        permit: Option<crate::fairness::Permit<'_>>,
        fuel_before: u64,
        failed: bool,
    ) {
        if let Some(permit) = permit {
            permit.finish(failed);
        }
        if self.spec.limits.fuel_per_batch.is_some()
            && let Some(instance) = &self.instance
        {
            let burned = instance.fuel_consumed().saturating_sub(fuel_before);
            metrics::counter!("kinesis_host_task_fuel_consumed_total", "job" => self.spec.job.clone())
                .increment(burned);
        }
    }

    fn ensure_instance(&mut self) -> Result<(), CallError> {
        if self.instance.is_none() {
            self.instance = Some(TaskInstance::new(&self.component, self.spec.clone())?);
        }
        Ok(())
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
