//! One task instance: a `Store` with the host's imports, limits and per-batch buffers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::batch::Batch;
use crate::bindings::KinesisTask;
use crate::bindings::kinesis::task::{log, metrics, output, state, types};
use crate::component::TaskComponent;
use crate::error::{CallError, TaskErrorKind, TrapKind};
use crate::guest_io::{CapturedOutput, LogBudget, LogLevel, LogTags, truncate};
use crate::limits::Limits;

/// Which logical output names a task may emit to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outputs {
    /// Any name (used by `replay` when the job names no outputs).
    Any,
    /// Only these names.
    Only(BTreeSet<String>),
}

impl Outputs {
    fn allows(&self, name: &str) -> bool {
        match self {
            Outputs::Any => true,
            Outputs::Only(names) => names.contains(name),
        }
    }
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
    /// The logical output name.
    pub output: String,
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

/// A metric's latest value as seen by the host.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// A counter's total.
    Counter(u64),
    /// A gauge's last value.
    Gauge(f64),
    /// A histogram's observation count and sum.
    Histogram {
        /// Observations.
        count: u64,
        /// Their sum.
        sum: f64,
    },
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
}

#[derive(Debug)]
struct MemoryLimiter {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            wasmtime::bail!(
                "memory would grow to {desired} bytes, over the {}-byte limit",
                self.limit
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The `Store` data of one instance.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    spec: Arc<InstanceSpec>,
    tags: LogTags,
    budget: LogBudget,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    stats: InstanceStats,
    metrics: BTreeMap<String, MetricValue>,
    // Per call:
    emits: Vec<Emit>,
    emit_bytes: usize,
    state: ShardState,
    pending: HashMap<String, Option<Vec<u8>>>,
    state_bytes: usize,
    /// Whether this call already logged a refused state write (one line per call).
    state_refusal_logged: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl HostState {
    fn limits(&self) -> &Limits {
        &self.spec.limits
    }

    fn begin_call(&mut self, state: &mut ShardState) {
        self.emits.clear();
        self.emit_bytes = 0;
        self.pending.clear();
        self.state = std::mem::take(state);
        self.state_bytes = self.state.bytes;
        self.state_refusal_logged = false;
    }

    /// Logs a refused state write, once per call: the shard, the key and the setting to raise.
    fn refuse_state_write(&mut self, key: &str, problem: String, setting: &str) {
        self.stats.state_writes_refused += 1;
        if std::mem::replace(&mut self.state_refusal_logged, true) {
            return;
        }
        let shown: String = key.chars().take(64).collect();
        let cut = if shown.len() < key.len() { "…" } else { "" };
        tracing::warn!(
            job = %self.spec.job,
            stream = %self.spec.stream,
            shard = %self.spec.shard_id,
            key = %format!("{shown}{cut}"),
            setting,
            "State write refused: {problem}; the task got an error. Raise {setting} in job.properties if the task needs more (further refusals in this batch are only counted)."
        );
    }

    fn current(&self, key: &str) -> Option<&[u8]> {
        match self.pending.get(key) {
            Some(pending) => pending.as_deref(),
            None => self.state.get(key),
        }
    }

    /// Writes the guest's stdout and stderr into the log, then says how many lines the rate
    /// limit dropped during the call. Returns what stderr said last: a Rust panic's location and
    /// message, else its last line.
    fn drain_output(&mut self) -> Option<String> {
        let mut stderr_tail = None;
        for (capture, level, source) in [
            (self.stdout.clone(), LogLevel::Info, "stdout"),
            (self.stderr.clone(), LogLevel::Warn, "stderr"),
        ] {
            let (bytes, dropped) = capture.drain();
            self.stats.output_bytes_dropped += dropped;
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            for line in &lines {
                self.log_line(level, source, line);
            }
            if source == "stderr" && !lines.is_empty() {
                stderr_tail =
                    Some(truncate(&panic_message(&lines), self.limits().log_line_bytes).to_owned());
            }
        }
        let dropped = self.budget.take_pending_dropped();
        if dropped > 0 {
            let rate = self.limits().log_bytes_per_second;
            self.tags.emit(
                LogLevel::Warn,
                "host",
                &format!("Dropped {dropped} task log lines over the rate limit of {rate} bytes/s (task.limits.log.bytes.per.second)."),
            );
        }
        stderr_tail
    }

    fn log_line(&mut self, level: LogLevel, source: &'static str, line: &str) {
        let line = truncate(line, self.spec.limits.log_line_bytes);
        if self.budget.allow(line.len()) {
            self.tags.emit(level, source, line);
        } else {
            self.stats.log_lines_dropped += 1;
        }
    }
}

/// From a guest's stderr lines, the panic location and message when Rust panicked (std prints
/// `thread '…' panicked at FILE:LINE:COL:`, the message, then a note about backtraces).
fn panic_message(lines: &[&str]) -> String {
    match lines.iter().rposition(|l| l.contains(" panicked at ")) {
        Some(at) => {
            let location = lines[at].split(" panicked at ").nth(1).unwrap_or(lines[at]);
            match lines.get(at + 1).filter(|l| !l.starts_with("note: run with")) {
                Some(message) => format!("panicked at {location} {message}"),
                None => format!("panicked at {location}"),
            }
        }
        None => lines.last().copied().unwrap_or_default().to_owned(),
    }
}

impl types::Host for HostState {}

impl output::Host for HostState {
    fn emit(
        &mut self,
        name: String,
        partition_key: String,
        explicit_hash_key: Option<String>,
        data: Vec<u8>,
    ) -> Result<(), output::EmitError> {
        let result = self.check_emit(&name, &partition_key, explicit_hash_key.as_deref(), &data);
        if result.is_err() {
            self.stats.emits_refused += 1;
            return result;
        }
        self.emit_bytes += data.len() + partition_key.len();
        self.emits.push(Emit { output: name, partition_key, explicit_hash_key, data });
        Ok(())
    }
}

impl HostState {
    fn check_emit(
        &self,
        name: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &[u8],
    ) -> Result<(), output::EmitError> {
        let limits = self.limits();
        if !self.spec.outputs.allows(name) {
            return Err(output::EmitError::UnknownOutput(name.to_owned()));
        }
        if data.len() > limits.emit_bytes {
            return Err(output::EmitError::TooLarge(
                u32::try_from(limits.emit_bytes).unwrap_or(u32::MAX),
            ));
        }
        let key_chars = partition_key.chars().count();
        if key_chars == 0 || key_chars > 256 {
            return Err(output::EmitError::InvalidKey(format!(
                "the partition key has {key_chars} characters; Kinesis takes 1 to 256"
            )));
        }
        if let Some(hash) = explicit_hash_key
            && (hash.is_empty()
                || !hash.bytes().all(|b| b.is_ascii_digit())
                || hash.parse::<u128>().is_err())
        {
            return Err(output::EmitError::InvalidKey(format!(
                "explicit hash key {:?} is not a decimal number below 2^128",
                truncate(hash, 64)
            )));
        }
        if self.emits.len() >= limits.emits_per_batch
            || self.emit_bytes + data.len() + partition_key.len() > limits.emit_bytes_per_batch
        {
            return Err(output::EmitError::QuotaExceeded);
        }
        Ok(())
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.current(&key).map(<[u8]>::to_vec)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), state::StateError> {
        let limits = self.spec.limits.clone();
        if key.len() > limits.state_key_bytes {
            self.refuse_state_write(
                &key,
                format!("the key has {} bytes, more than {}", key.len(), limits.state_key_bytes),
                "task.limits.state.key.bytes",
            );
            return Err(state::StateError::TooLarge(
                u32::try_from(limits.state_key_bytes).unwrap_or(u32::MAX),
            ));
        }
        if value.len() > limits.state_value_bytes {
            self.refuse_state_write(
                &key,
                format!(
                    "the value has {} bytes, more than {}",
                    value.len(),
                    limits.state_value_bytes
                ),
                "task.limits.state.value.bytes",
            );
            return Err(state::StateError::TooLarge(
                u32::try_from(limits.state_value_bytes).unwrap_or(u32::MAX),
            ));
        }
        let old = self.current(&key).map_or(0, |v| key.len() + v.len());
        let new_total = self.state_bytes - old + key.len() + value.len();
        if new_total > limits.state_total_bytes {
            self.refuse_state_write(
                &key,
                format!(
                    "the shard's state would hold {new_total} bytes, more than {}",
                    limits.state_total_bytes
                ),
                "task.limits.state.total.bytes",
            );
            return Err(state::StateError::QuotaExceeded);
        }
        self.state_bytes = new_total;
        self.pending.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: String) {
        if let Some(old) = self.current(&key).map(|v| key.len() + v.len()) {
            self.state_bytes -= old;
            self.pending.insert(key, None);
        }
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        self.log_line(level, "task", &message);
    }
}

impl HostState {
    fn metric(
        &mut self,
        name: String,
        update: impl FnOnce(Option<&mut MetricValue>) -> Option<MetricValue>,
    ) {
        let at_cap = self.metrics.len() >= self.limits().metric_names;
        match self.metrics.get_mut(&name) {
            Some(value) => {
                update(Some(value));
            }
            None if !at_cap => {
                if let Some(value) = update(None) {
                    self.metrics.insert(name, value);
                }
            }
            None => {}
        }
    }
}

impl metrics::Host for HostState {
    fn counter(&mut self, name: String, value: u64) {
        self.metric(name, |m| match m {
            Some(MetricValue::Counter(total)) => {
                *total = total.saturating_add(value);
                None
            }
            Some(_) => None,
            None => Some(MetricValue::Counter(value)),
        });
    }

    fn gauge(&mut self, name: String, value: f64) {
        self.metric(name, |m| match m {
            Some(MetricValue::Gauge(last)) => {
                *last = value;
                None
            }
            Some(_) => None,
            None => Some(MetricValue::Gauge(value)),
        });
    }

    fn histogram(&mut self, name: String, value: f64) {
        self.metric(name, |m| match m {
            Some(MetricValue::Histogram { count, sum }) => {
                *count += 1;
                *sum += value;
                None
            }
            Some(_) => None,
            None => Some(MetricValue::Histogram { count: 1, sum: value }),
        });
    }
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
        let tags = LogTags {
            job: spec.job.as_str().into(),
            stream: spec.stream.as_str().into(),
            shard: spec.shard_id.as_str().into(),
        };
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter { limit: spec.limits.memory_bytes, hit: false },
            budget: LogBudget::new(spec.limits.log_bytes_per_second, runtime.clock.clone()),
            tags,
            stdout,
            stderr,
            stats: InstanceStats::default(),
            metrics: BTreeMap::new(),
            emits: Vec::new(),
            emit_bytes: 0,
            state: ShardState::default(),
            pending: HashMap::new(),
            state_bytes: 0,
            state_refusal_logged: false,
            spec,
        };
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

    /// The task's metrics as last updated.
    pub fn metrics(&self) -> &BTreeMap<String, MetricValue> {
        &self.store.data().metrics
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
        CallError::Task {
            shard_id: self.shard_id().to_owned(),
            kind: match e.kind {
                types::ErrorKind::Retryable => TaskErrorKind::Retryable,
                types::ErrorKind::PoisonRecord => TaskErrorKind::PoisonRecord,
                types::ErrorKind::Fatal => TaskErrorKind::Fatal,
            },
            record_index: e.record_index,
            message: e.message,
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
            None => error.root_cause().to_string(),
        };
        CallError::Trap { shard_id: self.shard_id().to_owned(), kind, message, stderr_tail }
    }
}
