//! The host side of the `kinesis:task` imports (`output`, `state`, `log`, `metrics`) and the
//! `Store` data they work on.
//!
//! The imports are linked by hand rather than through bindgen's traits so that a guest's strings
//! and byte lists are read where they lie in its linear memory ([`WasmStr`], [`WasmList`]) and
//! checked against the job's limits *before* the host copies anything: a refused emit, state
//! write, metric or the part of a log line over the line limit is never copied, so what a task
//! can make the host allocate is what the limits let it keep, not what it passes.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, ResourceTable, WasmList, WasmStr};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::kinesis::task::{log, output, state};
use crate::guest_io::{CapturedOutput, LogBudget, LogLevel, LogTags};
use crate::instance::{Emit, InstanceSpec, InstanceStats, Outputs, ShardState};
use crate::limits::{Limits, MemoryLimiter};
use crate::metrics::{MAX_METRIC_NAME_BYTES, Metrics, Refused};
use crate::text::{escape_control, truncate};

/// The largest Kinesis record: its data and partition key (UTF-8 bytes) together.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// The most characters of a partition key, counted as Kinesis counts them (UTF-16 code units).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;
/// The longest output name a task may emit to when the job names no outputs (`replay`).
const MAX_OUTPUT_NAME_BYTES: usize = 256;
/// How much of a refused name or key is repeated in a log line or an error returned to the task.
const SHOWN_BYTES: usize = 64;

/// The output names a task may use, each allocated once per instance.
#[derive(Debug)]
enum OutputNames {
    Any,
    Only(HashMap<String, Arc<str>>),
}

impl OutputNames {
    fn new(outputs: &Outputs) -> Self {
        match outputs {
            Outputs::Any => OutputNames::Any,
            Outputs::Only(names) => OutputNames::Only(
                names.iter().map(|n| (n.clone(), Arc::from(n.as_str()))).collect(),
            ),
        }
    }

    /// The interned name, or `None` when the task may not emit to `name`.
    fn get(&self, name: &str) -> Option<Arc<str>> {
        match self {
            OutputNames::Any => (name.len() <= MAX_OUTPUT_NAME_BYTES).then(|| name.into()),
            OutputNames::Only(names) => names.get(name).cloned(),
        }
    }

    /// Whether the name is the task's to choose, so that it counts towards its emit bytes.
    fn is_any(&self) -> bool {
        matches!(self, OutputNames::Any)
    }
}

/// The `Store` data of one instance.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) spec: Arc<InstanceSpec>,
    outputs: OutputNames,
    tags: LogTags,
    budget: LogBudget,
    stdout: CapturedOutput,
    stderr: CapturedOutput,
    pub(crate) stats: InstanceStats,
    pub(crate) metrics: Metrics,
    // Per call:
    pub(crate) emits: Vec<Emit>,
    emit_bytes: usize,
    pub(crate) state: ShardState,
    pub(crate) pending: HashMap<String, Option<Vec<u8>>>,
    pub(crate) state_bytes: usize,
    /// Whether this call already logged a refused state write or metric (one line per call each).
    state_refusal_logged: bool,
    metric_refusal_logged: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl HostState {
    pub(crate) fn new(
        spec: Arc<InstanceSpec>,
        wasi: WasiCtx,
        stdout: CapturedOutput,
        stderr: CapturedOutput,
        budget: LogBudget,
    ) -> Self {
        let tags = LogTags {
            job: spec.job.as_str().into(),
            stream: spec.stream.as_str().into(),
            shard: spec.shard_id.as_str().into(),
        };
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(spec.limits.memory_bytes),
            outputs: OutputNames::new(&spec.outputs),
            tags,
            budget,
            stdout,
            stderr,
            stats: InstanceStats::default(),
            metrics: Metrics::new(spec.limits.metric_names),
            emits: Vec::new(),
            emit_bytes: 0,
            state: ShardState::default(),
            pending: HashMap::new(),
            state_bytes: 0,
            state_refusal_logged: false,
            metric_refusal_logged: false,
            spec,
        }
    }

    fn limits(&self) -> &Limits {
        &self.spec.limits
    }

    pub(crate) fn begin_call(&mut self, state: &mut ShardState) {
        self.emits.clear();
        self.emit_bytes = 0;
        self.pending.clear();
        self.state = std::mem::take(state);
        self.state_bytes = self.state.bytes();
        self.state_refusal_logged = false;
        self.metric_refusal_logged = false;
    }

    /// Bytes the host holds for this instance now: the call's emits and state writes, the
    /// shard's state while lent to the call, the metric table and the output buffers.
    pub(crate) fn held_bytes(&self) -> usize {
        let pending: usize =
            self.pending.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        self.emit_bytes
            + self.emits.len() * size_of::<Emit>()
            + self.state.bytes()
            + pending
            + self.metrics.bytes()
            + self.stdout.held_bytes()
            + self.stderr.held_bytes()
    }

    fn current(&self, key: &str) -> Option<&[u8]> {
        match self.pending.get(key) {
            Some(pending) => pending.as_deref(),
            None => self.state.get(key),
        }
    }

    /// Logs a refused state write, once per call: the shard, the key and the setting to raise.
    fn refuse_state_write(&mut self, key: &str, problem: String, setting: &str) {
        self.stats.state_writes_refused += 1;
        if std::mem::replace(&mut self.state_refusal_logged, true) {
            return;
        }
        tracing::warn!(
            job = %self.spec.job,
            stream = %self.spec.stream,
            shard = %self.spec.shard_id,
            key = %key,
            setting,
            "State write refused: {problem}; the task got an error. Raise {setting} in job.properties if the task needs more (further refusals in this batch are only counted)."
        );
    }

    /// Counts an ignored metric update, and logs the first of each call.
    fn refuse_metric(&mut self, name: &str, why: Refused) {
        self.stats.metrics_refused += 1;
        if std::mem::replace(&mut self.metric_refusal_logged, true) {
            return;
        }
        tracing::warn!(
            job = %self.spec.job,
            stream = %self.spec.stream,
            shard = %self.spec.shard_id,
            metric = %shown(name),
            "Task metric ignored: {} (further ignored updates in this batch are only counted).",
            why.describe(self.limits().metric_names)
        );
    }

    /// Writes the guest's stdout and stderr into the log, then says how many lines the rate
    /// limit dropped during the call. Returns what stderr said last: a Rust panic's location and
    /// message, else its last line (escaped, cut to the line limit).
    pub(crate) fn drain_output(&mut self) -> Option<String> {
        let mut stderr_tail = None;
        for (capture, level, source) in [
            (self.stdout.clone(), LogLevel::Info, "stdout"),
            (self.stderr.clone(), LogLevel::Warn, "stderr"),
        ] {
            let (bytes, dropped) = capture.drain();
            self.stats.output_bytes_dropped += dropped;
            let text = String::from_utf8_lossy(&bytes);
            // `lines` splits at `\n` and drops a `\r` before it; any other control character is
            // escaped by `log_line`.
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            for line in &lines {
                self.log_line(level, source, line);
            }
            if source == "stderr" && !lines.is_empty() {
                let tail = panic_message(&lines);
                let max = self.limits().log_line_bytes;
                stderr_tail = Some(truncate(&escape_control(truncate(&tail, max)), max).to_owned());
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

    /// Logs one guest line: cut to the line limit, control characters escaped, rate-limited.
    fn log_line(&mut self, level: LogLevel, source: &'static str, line: &str) {
        let max = self.spec.limits.log_line_bytes;
        let line = escape_control(truncate(line, max));
        let line = truncate(&line, max);
        if self.budget.allow(line.len()) {
            self.tags.emit(level, source, line);
        } else {
            self.stats.log_lines_dropped += 1;
        }
    }

    /// Checks an emit against the job's outputs, Kinesis's rules and the limits; returns the
    /// interned output name and the bytes the emit will hold.
    fn check_emit(
        &self,
        name: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> Result<(Arc<str>, usize), output::EmitError> {
        let limits = self.limits();
        let Some(output) = self.outputs.get(name) else {
            return Err(output::EmitError::UnknownOutput(truncate(name, SHOWN_BYTES).to_owned()));
        };
        if data_len > limits.emit_bytes {
            return Err(output::EmitError::TooLarge(
                u32::try_from(limits.emit_bytes).unwrap_or(u32::MAX),
            ));
        }
        check_partition_key(partition_key)?;
        if data_len + partition_key.len() > MAX_RECORD_BYTES {
            // Kinesis counts the key into the record's 1 MiB: say how much data fits with it.
            let room = MAX_RECORD_BYTES - partition_key.len();
            return Err(output::EmitError::TooLarge(u32::try_from(room).unwrap_or(u32::MAX)));
        }
        if let Some(hash) = explicit_hash_key {
            check_explicit_hash_key(hash)?;
        }
        let name_bytes = if self.outputs.is_any() { name.len() } else { 0 };
        let bytes =
            data_len + partition_key.len() + explicit_hash_key.map_or(0, str::len) + name_bytes;
        if self.emits.len() >= limits.emits_per_batch
            || self.emit_bytes + bytes > limits.emit_bytes_per_batch
        {
            return Err(output::EmitError::QuotaExceeded);
        }
        Ok((output, bytes))
    }

    /// Checks a state write before anything is copied: the state's new size, or the error for
    /// the task with the problem and the setting to raise.
    fn check_state_write(
        &self,
        key: &str,
        value_len: usize,
    ) -> Result<usize, (state::StateError, String, &'static str)> {
        let limits = self.limits();
        let bytes = |limit: usize| u32::try_from(limit).unwrap_or(u32::MAX);
        if key.len() > limits.state_key_bytes {
            return Err((
                state::StateError::TooLarge(bytes(limits.state_key_bytes)),
                format!("the key has {} bytes, more than {}", key.len(), limits.state_key_bytes),
                "task.limits.state.key.bytes",
            ));
        }
        if value_len > limits.state_value_bytes {
            return Err((
                state::StateError::TooLarge(bytes(limits.state_value_bytes)),
                format!("the value has {value_len} bytes, more than {}", limits.state_value_bytes),
                "task.limits.state.value.bytes",
            ));
        }
        let old = self.current(key).map_or(0, |v| key.len() + v.len());
        let new_total = self.state_bytes - old + key.len() + value_len;
        if new_total > limits.state_total_bytes {
            return Err((
                state::StateError::QuotaExceeded,
                format!(
                    "the shard's state would hold {new_total} bytes, more than {}",
                    limits.state_total_bytes
                ),
                "task.limits.state.total.bytes",
            ));
        }
        Ok(new_total)
    }
}

/// A guest's name or key as a log line shows it: its first bytes, escaped, marked when cut.
fn shown(text: &str) -> String {
    let cut = truncate(text, SHOWN_BYTES);
    let head = escape_control(cut);
    if cut.len() < text.len() { format!("{head}…") } else { head.into_owned() }
}

/// What is wrong with `key` as a Kinesis partition key, if anything: Kinesis takes 1 to 256
/// characters, counted as UTF-16 code units (a character outside the Basic Multilingual Plane
/// counts twice).
pub fn partition_key_problem(key: &str) -> Option<String> {
    // A UTF-16 unit takes at most 3 bytes of UTF-8, so a longer key is too long uncounted.
    let units = (key.len() <= 3 * MAX_PARTITION_KEY_CHARS).then(|| key.encode_utf16().count());
    match units {
        Some(1..=MAX_PARTITION_KEY_CHARS) => None,
        Some(0) => Some(format!(
            "the partition key is empty; Kinesis takes 1 to {MAX_PARTITION_KEY_CHARS} characters"
        )),
        _ => Some(format!(
            "the partition key is {} characters long as Kinesis counts them (UTF-16 code units); Kinesis takes 1 to {MAX_PARTITION_KEY_CHARS}",
            units.map_or_else(|| format!("more than {MAX_PARTITION_KEY_CHARS}"), |n| n.to_string())
        )),
    }
}

/// What is wrong with `hash` as an explicit hash key, if anything: Kinesis takes a decimal
/// number from 0 to 2^128 - 1, written without sign or leading zeros (`0|([1-9]\d{0,38})`).
pub fn explicit_hash_key_problem(hash: &str) -> Option<String> {
    let canonical = hash == "0"
        || (hash.len() <= 39
            && hash.bytes().all(|b| b.is_ascii_digit())
            && !hash.starts_with('0')
            && hash.parse::<u128>().is_ok());
    (!canonical).then(|| {
        format!(
            "explicit hash key {:?} is not a decimal number from 0 to 2^128 - 1 without sign or leading zeros",
            truncate(hash, SHOWN_BYTES)
        )
    })
}

fn check_partition_key(key: &str) -> Result<(), output::EmitError> {
    partition_key_problem(key).map_or(Ok(()), |p| Err(output::EmitError::InvalidKey(p)))
}

fn check_explicit_hash_key(hash: &str) -> Result<(), output::EmitError> {
    explicit_hash_key_problem(hash).map_or(Ok(()), |p| Err(output::EmitError::InvalidKey(p)))
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

/// The interfaces, as the component model names them.
const OUTPUT: &str = "kinesis:task/output@0.1.0";
const STATE: &str = "kinesis:task/state@0.1.0";
const LOG: &str = "kinesis:task/log@0.1.0";
const METRICS: &str = "kinesis:task/metrics@0.1.0";
const TYPES: &str = "kinesis:task/types@0.1.0";

type Store<'a> = StoreContextMut<'a, HostState>;

/// Adds the `kinesis:task` imports to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // Types only: the instance carries no functions.
    linker.instance(TYPES)?;

    let mut output = linker.instance(OUTPUT)?;
    output.func_wrap(
        "emit",
        |mut store: Store<'_>,
         (name, key, hash, data): (WasmStr, WasmStr, Option<WasmStr>, WasmList<u8>)| {
            let checked = {
                let name = name.to_str(&store)?;
                let key = key.to_str(&store)?;
                let hash = hash.as_ref().map(|h| h.to_str(&store)).transpose()?;
                match store.data().check_emit(&name, &key, hash.as_deref(), data.len()) {
                    Ok((output, bytes)) => Ok((
                        Emit {
                            output,
                            partition_key: key.into_owned(),
                            explicit_hash_key: hash.map(std::borrow::Cow::into_owned),
                            data: data.as_le_slice(&store).to_vec(),
                        },
                        bytes,
                    )),
                    Err(error) => Err(error),
                }
            };
            let host = store.data_mut();
            Ok((match checked {
                Ok((emit, bytes)) => {
                    host.emit_bytes += bytes;
                    host.emits.push(emit);
                    Ok(())
                }
                Err(error) => {
                    host.stats.emits_refused += 1;
                    Err(error)
                }
            },))
        },
    )?;

    let mut state = linker.instance(STATE)?;
    state.func_wrap("get", |store: Store<'_>, (key,): (WasmStr,)| {
        let key = key.to_str(&store)?;
        Ok((store.data().current(&key).map(<[u8]>::to_vec),))
    })?;
    state.func_wrap("set", |mut store: Store<'_>, (key, value): (WasmStr, WasmList<u8>)| {
        // Copied only once the write is known to fit.
        let checked = {
            let key = key.to_str(&store)?;
            match store.data().check_state_write(&key, value.len()) {
                Ok(new_total) => {
                    Ok((key.into_owned(), value.as_le_slice(&store).to_vec(), new_total))
                }
                Err((error, problem, setting)) => Err((error, shown(&key), problem, setting)),
            }
        };
        let host = store.data_mut();
        Ok((match checked {
            Ok((key, value, new_total)) => {
                host.state_bytes = new_total;
                host.pending.insert(key, Some(value));
                Ok(())
            }
            Err((error, key, problem, setting)) => {
                host.refuse_state_write(&key, problem, setting);
                Err(error)
            }
        },))
    })?;
    state.func_wrap("delete", |mut store: Store<'_>, (key,): (WasmStr,)| {
        let deleted = {
            let key = key.to_str(&store)?;
            let old = store.data().current(&key).map(|v| key.len() + v.len());
            old.map(|old| (key.into_owned(), old))
        };
        if let Some((key, old)) = deleted {
            let host = store.data_mut();
            host.state_bytes -= old;
            host.pending.insert(key, None);
        }
        Ok(())
    })?;

    let mut log = linker.instance(LOG)?;
    log.func_wrap("log", |mut store: Store<'_>, (level, message): (log::Level, WasmStr)| {
        let max = store.data().limits().log_line_bytes;
        // Only the part that can be logged is copied.
        let line = truncate(&message.to_str(&store)?, max).to_owned();
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        store.data_mut().log_line(level, "task", &line);
        Ok(())
    })?;

    let mut metrics = linker.instance(METRICS)?;
    metrics.func_wrap("counter", |mut store: Store<'_>, (name, value): (WasmStr, u64)| {
        metric(&mut store, &name, |m, name| m.counter(name, value))
    })?;
    metrics.func_wrap("gauge", |mut store: Store<'_>, (name, value): (WasmStr, f64)| {
        metric(&mut store, &name, |m, name| m.gauge(name, value))
    })?;
    metrics.func_wrap("histogram", |mut store: Store<'_>, (name, value): (WasmStr, f64)| {
        metric(&mut store, &name, |m, name| m.histogram(name, value))
    })?;
    Ok(())
}

/// Applies one metric update; a refused one is counted and logged once per call.
fn metric(
    store: &mut Store<'_>,
    name: &WasmStr,
    update: impl FnOnce(&mut Metrics, &str) -> Result<(), Refused>,
) -> wasmtime::Result<()> {
    let name = name.to_str(&*store)?;
    // A name is at most MAX_METRIC_NAME_BYTES: only a short one is worth copying.
    let name = truncate(&name, MAX_METRIC_NAME_BYTES + 1).to_owned();
    let host = store.data_mut();
    if let Err(why) = update(&mut host.metrics, &name) {
        host.refuse_metric(&name, why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys_are_counted_as_kinesis_counts_them() {
        assert!(check_partition_key("k").is_ok());
        assert!(check_partition_key(&"a".repeat(256)).is_ok());
        assert!(check_partition_key(&"é".repeat(256)).is_ok(), "2 bytes, one unit each");
        assert!(check_partition_key(&"😀".repeat(128)).is_ok(), "4 bytes, two units each");
        for bad in [String::new(), "a".repeat(257), "😀".repeat(129), "😀".repeat(256)] {
            assert!(
                matches!(check_partition_key(&bad), Err(output::EmitError::InvalidKey(_))),
                "{} bytes",
                bad.len()
            );
        }
    }

    #[test]
    fn explicit_hash_keys_must_be_canonical_decimals_below_2_128() {
        let max = u128::MAX.to_string();
        for good in ["0", "1", "42", max.as_str()] {
            assert!(check_explicit_hash_key(good).is_ok(), "{good}");
        }
        let over = "340282366920938463463374607431768211456"; // 2^128
        for bad in ["", "00", "042", "+1", "-1", "1.0", " 1", "1e3", over, &"9".repeat(40)] {
            assert!(check_explicit_hash_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shown_names_are_short_and_escaped() {
        assert_eq!(shown("ok"), "ok");
        assert_eq!(shown("a\nb"), "a\\nb");
        let long = "x".repeat(1000);
        assert_eq!(shown(&long), format!("{}…", "x".repeat(64)));
    }
}
