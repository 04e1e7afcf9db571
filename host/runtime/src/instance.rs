//! One task instance: a `Store` with the host's imports and limits, and its calls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;

use crate::batch::Batch;
use crate::bindings::KinesisTask;
use crate::bindings::kinesis::task::types;
use crate::component::TaskComponent;
use crate::error::{CallError, TaskErrorKind, TrapKind};
use crate::guest_io::{CapturedOutput, LogBudget};
use crate::host::HostState;
use crate::limits::Limits;
use crate::metrics::{MetricChange, MetricValue};
use crate::text::{MAX_MESSAGE_BYTES, clean_message};

/// Which logical output names a task may emit to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outputs {
    /// Any name (used by `replay` when the job names no outputs).
    Any,
    /// Only these names.
    Only(BTreeSet<String>),
}

/// What an instance is for, and what it may do.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The job's name, for log lines.
    pub job: String,
    /// The input stream.
    pub stream: String,
    /// The shard.
    pub shard_id: String,
    /// Output names the task may emit to.
    pub outputs: Outputs,
    /// Task settings passed to `init`.
    pub config: Vec<(String, String)>,
    /// Resource limits.
    pub limits: Limits,
}

/// A record emitted by a task, to be sent once its batch is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// The logical output name (shared with every other emit to it).
    pub output: Arc<str>,
    /// The partition key.
    pub partition_key: String,
    /// The explicit hash key, if any.
    pub explicit_hash_key: Option<String>,
    /// The data.
    pub data: Vec<u8>,
}

/// A shard's task state: committed key-value pairs, owned by whoever owns the shard, lent to
/// an instance for each call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardState {
    entries: BTreeMap<String, Vec<u8>>,
    bytes: usize,
}

impl ShardState {
    /// The committed value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Committed entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Bytes held (keys plus values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A state holding `entries` (restored from a checkpoint, say).
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let entries: BTreeMap<String, Vec<u8>> = entries.into_iter().collect();
        let bytes = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
        Self { entries, bytes }
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn apply(&mut self, changes: &[(String, Option<Vec<u8>>)], bytes: usize) {
        for (key, value) in changes {
            match value {
                Some(value) => self.entries.insert(key.clone(), value.clone()),
                None => self.entries.remove(key),
            };
        }
        self.bytes = bytes;
    }
}

/// What a successful `process` call produced. The batch's state writes are already applied to
/// the [`ShardState`] passed in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutput {
    /// How many leading records the task finished.
    pub processed: usize,
    /// The records it emitted, in order.
    pub emits: Vec<Emit>,
    /// The state changes it made (`None` deletes), for whoever persists state.
    pub state_changes: Vec<(String, Option<Vec<u8>>)>,
}

/// Counters about what an instance was refused or had dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceStats {
    /// Emits refused (quota, size, unknown output, invalid key).
    pub emits_refused: u64,
    /// State writes refused.
    pub state_writes_refused: u64,
    /// Log lines dropped by the rate limit.
    pub log_lines_dropped: u64,
    /// Bytes of stdout/stderr dropped because the guest wrote too much between two drains.
    pub output_bytes_dropped: u64,
    /// Metric updates ignored (a bad name, too many names, a name of another type, a histogram
    /// observation that is not a finite number).
    pub metrics_refused: u64,
}

/// A live task instance for one shard. After a trap it is poisoned: drop it and create another.
pub struct TaskInstance {
    store: Store<HostState>,
    task: KinesisTask,
    tick: Duration,
    poisoned: bool,
    /// The fuel given to each call, when the job meters fuel.
    fuel: Option<u64>,
    /// Fuel burned by every call so far.
    fuel_consumed: u64,
}

impl std::fmt::Debug for TaskInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskInstance")
            .field("shard_id", &self.store.data().spec.shard_id)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl TaskInstance {
    /// Instantiates `component` for `spec` and calls the task's `init`.
    ///
    /// # Errors
    /// [`CallError::Instantiate`] when the instance cannot be created (memory limit too low for
    /// the component, for example), or the error or trap of `init`.
    pub fn new(component: &TaskComponent, spec: Arc<InstanceSpec>) -> Result<Self, CallError> {
        let runtime = component.runtime();
        let stdout = CapturedOutput::default();
        let stderr = CapturedOutput::default();
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let budget = LogBudget::new(spec.limits.log_bytes_per_second, runtime.clock.clone());
        let state = HostState::new(spec, wasi, stdout, stderr, budget);
        let fuel = state.spec.limits.fuel_per_batch;
        if fuel.is_some() && !runtime.fuel {
            return Err(CallError::Instantiate {
                shard_id: state.spec.shard_id.clone(),
                source: "task.limits.fuel.per.batch is set, but the component was loaded by a runtime without fuel metering (RuntimeConfig::fuel)".into(),
            });
        }
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        if runtime.fuel {
            // Instantiation runs no guest code but start functions: give them the call budget.
            let _ = store.set_fuel(fuel.unwrap_or(u64::MAX));
        }
        store.epoch_deadline_trap();
        store.set_epoch_deadline(u64::MAX / 2);
        let shard_id = store.data().spec.shard_id.clone();
        let task = component.pre().instantiate(&mut store).map_err(|e| {
            let hit = store.data().limiter.hit;
            let mut source = e.to_string();
            if hit {
                source =
                    format!("{source} (the component needs more than task.limits.memory.bytes)");
            }
            CallError::Instantiate { shard_id: shard_id.clone(), source: source.into() }
        })?;
        let mut instance =
            Self { store, task, tick: runtime.tick, poisoned: false, fuel, fuel_consumed: 0 };
        let init_timeout = instance.store.data().spec.limits.init_timeout;
        let config = instance.store.data().spec.config.clone();
        instance.set_deadline(init_timeout);
        instance.refuel();
        let result = instance.task.kinesis_task_task().call_init(&mut instance.store, &config);
        instance.count_fuel();
        let stderr_tail = instance.store.data_mut().drain_output();
        match result {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(e)) => Err(instance.task_error(e)),
            Err(trap) => Err(instance.trap(&trap, stderr_tail)),
        }
    }

    /// The shard this instance serves.
    pub fn shard_id(&self) -> &str {
        &self.store.data().spec.shard_id
    }

    /// Calls `process` on `batch`, lending it the shard's `state`. On success the batch's state
    /// writes are applied to `state` and its emits returned; on any error both are discarded.
    ///
    /// # Errors
    /// The task's error, a trap (the instance is then poisoned), or a contract violation.
    pub fn process(
        &mut self,
        batch: &Batch,
        state: &mut ShardState,
    ) -> Result<BatchOutput, CallError> {
        if self.poisoned {
            return Err(CallError::Poisoned { shard_id: self.shard_id().to_owned() });
        }
        self.store.data_mut().begin_call(state);
        let timeout = self.store.data().spec.limits.batch_timeout;
        self.set_deadline(timeout);
        self.refuel();
        let result = self.task.kinesis_task_task().call_process(&mut self.store, batch.wit());
        self.count_fuel();
        let stderr_tail = self.store.data_mut().drain_output();
        let host = self.store.data_mut();
        *state = std::mem::take(&mut host.state);
        let processed = match result {
            Ok(Ok(processed)) => processed as usize,
            Ok(Err(e)) => return Err(self.task_error(e)),
            Err(trap) => return Err(self.trap(&trap, stderr_tail)),
        };
        if processed > batch.len() {
            return Err(CallError::Contract {
                shard_id: self.shard_id().to_owned(),
                message: format!(
                    "it reported {processed} records done of a batch of {}",
                    batch.len()
                ),
            });
        }
        let host = self.store.data_mut();
        let changes: Vec<_> = host.pending.drain().collect();
        state.apply(&changes, host.state_bytes);
        Ok(BatchOutput {
            processed,
            emits: std::mem::take(&mut host.emits),
            state_changes: changes,
        })
    }

    /// Calls the task's `shutdown` (bounded by the init deadline). Errors are logged, not returned:
    /// the instance is going away either way.
    pub fn shutdown(mut self) {
        if self.poisoned {
            return;
        }
        let timeout = self.store.data().spec.limits.init_timeout;
        self.set_deadline(timeout);
        self.refuel();
        let result = self.task.kinesis_task_task().call_shutdown(&mut self.store);
        self.store.data_mut().drain_output();
        if let Err(trap) = result {
            let shard = self.shard_id().to_owned();
            tracing::warn!(shard, error = %trap, "Task trapped in shutdown.");
        }
    }

    /// What the instance was refused or had dropped so far.
    pub fn stats(&self) -> InstanceStats {
        self.store.data().stats
    }

    /// The task's metrics, as this instance has recorded them since it was created.
    pub fn metrics(&self) -> BTreeMap<&str, &MetricValue> {
        self.store.data().metrics.values().collect()
    }

    /// What changed in the task's metrics since the last call of this method (after any call,
    /// whether it succeeded or not: metrics are not part of a batch's commit), for the host to
    /// export under the job's labels.
    pub fn take_metric_changes(&mut self) -> Vec<(Arc<str>, MetricChange)> {
        self.store.data_mut().metrics.take_changes()
    }

    /// Bytes the host holds for this instance beside its linear memory: between calls, the
    /// metric table and the output buffers; during a call, also its emits and state writes and
    /// the shard's state lent to it.
    pub fn host_bytes(&self) -> usize {
        self.store.data().held_bytes()
    }

    /// Fuel burned by all of this instance's calls (`init` included); 0 unless the job meters
    /// fuel ([`Limits::fuel_per_batch`]).
    pub fn fuel_consumed(&self) -> u64 {
        self.fuel_consumed
    }

    /// Gives the next call its fuel budget (a no-op unless the job meters fuel).
    fn refuel(&mut self) {
        if let Some(fuel) = self.fuel {
            let _ = self.store.set_fuel(fuel);
        }
    }

    /// Adds what the last call burned to [`TaskInstance::fuel_consumed`].
    fn count_fuel(&mut self) {
        if let Some(fuel) = self.fuel
            && let Ok(left) = self.store.get_fuel()
        {
            self.fuel_consumed = self.fuel_consumed.saturating_add(fuel.saturating_sub(left));
        }
    }

    fn set_deadline(&mut self, timeout: Duration) {
        let tick = self.tick.as_nanos().max(1);
        let ticks = timeout.as_nanos().div_ceil(tick);
        // One extra tick: the deadline counts from the next tick, never earlier than asked.
        self.store
            .set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX / 2).saturating_add(1));
    }

    fn task_error(&self, e: types::TaskError) -> CallError {
        let max = self.store.data().spec.limits.log_line_bytes.min(MAX_MESSAGE_BYTES);
        CallError::Task {
            shard_id: self.shard_id().to_owned(),
            kind: match e.kind {
                types::ErrorKind::Retryable => TaskErrorKind::Retryable,
                types::ErrorKind::PoisonRecord => TaskErrorKind::PoisonRecord,
                types::ErrorKind::Fatal => TaskErrorKind::Fatal,
            },
            record_index: e.record_index,
            // A guest string of any length, on its way into log lines and dead letters.
            message: clean_message(&e.message, max),
        }
    }

    fn trap(&mut self, error: &wasmtime::Error, stderr_tail: Option<String>) -> CallError {
        self.poisoned = true;
        let kind = if self.store.data().limiter.hit {
            TrapKind::MemoryLimit
        } else {
            match error.downcast_ref::<Trap>() {
                // Both are CPU limits: the epoch deadline and task.limits.fuel.per.batch.
                Some(Trap::Interrupt | Trap::OutOfFuel) => TrapKind::Deadline,
                Some(Trap::UnreachableCodeReached) => TrapKind::Panic,
                Some(Trap::StackOverflow) => TrapKind::StackOverflow,
                _ => TrapKind::Other,
            }
        };
        let message = match error.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            // Can name the guest's own functions, so it is the guest's text too.
            None => clean_message(&error.root_cause().to_string(), MAX_MESSAGE_BYTES),
        };
        CallError::Trap { shard_id: self.shard_id().to_owned(), kind, message, stderr_tail }
    }
}
