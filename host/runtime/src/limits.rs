//! What one task instance may use, and the limiter that holds its memory to it.

use std::time::Duration;

use wasmtime::ResourceLimiter;

/// The most elements a task's table may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Limits for one task instance. Every limit is enforced by the host, never trusted to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory of the instance; growing past it traps.
    pub memory_bytes: usize,
    /// CPU deadline for one `process` call (epoch-based, so accurate to one tick).
    pub batch_timeout: Duration,
    /// CPU deadline for `init` and for `shutdown`.
    pub init_timeout: Duration,
    /// Records one batch may emit.
    pub emits_per_batch: usize,
    /// Largest data of one emitted record.
    pub emit_bytes: usize,
    /// Bytes (data and keys) one batch may emit in all.
    pub emit_bytes_per_batch: usize,
    /// Largest state key.
    pub state_key_bytes: usize,
    /// Largest state value.
    pub state_value_bytes: usize,
    /// Bytes (keys and values) the state of one shard may hold.
    pub state_total_bytes: usize,
    /// Log bytes per second (task logs and stdout/stderr together); the excess is dropped.
    pub log_bytes_per_second: usize,
    /// Longest log line; longer lines are cut.
    pub log_line_bytes: usize,
    /// Distinct metric names one instance may use; further names are ignored.
    pub metric_names: usize,
    /// Fuel (roughly, wasm instructions) one `process` call may burn, and likewise `init` and
    /// `shutdown`; running out traps like the CPU deadline. `None` meters nothing. Needs a
    /// runtime made with [`crate::RuntimeConfig::fuel`].
    pub fuel_per_batch: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            batch_timeout: Duration::from_secs(5),
            init_timeout: Duration::from_secs(5),
            emits_per_batch: 10_000,
            emit_bytes: 1 << 20,
            emit_bytes_per_batch: 64 << 20,
            state_key_bytes: 1024,
            state_value_bytes: 256 << 10,
            state_total_bytes: 64 << 20,
            log_bytes_per_second: 64 << 10,
            log_line_bytes: 4096,
            metric_names: 256,
            fuel_per_batch: None,
        }
    }
}

/// Traps any growth of an instance's linear memory past its limit, and of its tables past
/// [`MAX_TABLE_ELEMENTS`].
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    /// Whether a growth was refused: the trap that follows is the memory limit's.
    pub(crate) hit: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit, hit: false }
    }
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
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
