//! The host's imports, wrapped in Rust types.
//!
//! In a WebAssembly build these call the host; in a native build (unit tests of task logic)
//! they go to the in-memory host of [`crate::testing`].

use crate::error::{EmitError, StateError};

#[cfg(target_arch = "wasm32")]
use crate::__private::wit::kinesis::task as imports;

/// Queues a record for the job's output `output` (a logical name that the job's config maps to
/// a stream). It is sent only if the current batch succeeds.
///
/// # Errors
/// When `output` is not one of the job's outputs, the data or key is too large or invalid, or
/// the batch reached its emit quota. The batch may go on.
pub fn emit(output: &str, partition_key: &str, data: &[u8]) -> Result<(), EmitError> {
    emit_with_hash_key(output, partition_key, None, data)
}

/// Like [`emit`], choosing the shard with an explicit hash key (a decimal number below 2^128)
/// instead of the partition key's hash.
///
/// # Errors
/// As [`emit`].
pub fn emit_with_hash_key(
    output: &str,
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    data: &[u8],
) -> Result<(), EmitError> {
    #[cfg(target_arch = "wasm32")]
    {
        imports::output::emit(output, partition_key, explicit_hash_key, data)
            .map_err(EmitError::from)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::with_host(|h| h.emit(output, partition_key, explicit_hash_key, data))
    }
}

/// A key-value store private to the task on the current shard.
///
/// Writes become visible to later reads at once, and are committed together with the shard's
/// checkpoint when the batch succeeds; a failed batch leaves the state as it was.
pub mod state {
    use super::*;

    /// Reads `key`.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        #[cfg(target_arch = "wasm32")]
        {
            imports::state::get(key)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::testing::with_host(|h| h.state_get(key))
        }
    }

    /// Writes `key`.
    ///
    /// # Errors
    /// When the key or value is over the job's size limit, or the shard's state is full.
    pub fn set(key: &str, value: &[u8]) -> Result<(), StateError> {
        #[cfg(target_arch = "wasm32")]
        {
            imports::state::set(key, value).map_err(StateError::from)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::testing::with_host(|h| h.state_set(key, value))
        }
    }

    /// Removes `key`.
    pub fn delete(key: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            imports::state::delete(key)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::testing::with_host(|h| h.state_delete(key))
        }
    }

    /// Reads `key` as a little-endian `u64` (0 when absent or not 8 bytes long).
    pub fn get_u64(key: &str) -> u64 {
        get(key).and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes)
    }

    /// Writes `value` as a little-endian `u64`.
    ///
    /// # Errors
    /// As [`set`].
    pub fn set_u64(key: &str, value: u64) -> Result<(), StateError> {
        set(key, &value.to_le_bytes())
    }
}

/// Log lines, written to the host's log tagged with the job, stream and shard.
pub mod log {
    /// Severity of a log line.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        /// Very detailed, off by default.
        Trace,
        /// Details for debugging.
        Debug,
        /// Normal operation.
        Info,
        /// Something unexpected that the task survived.
        Warn,
        /// Something failed.
        Error,
    }

    /// Writes one log line at `level`. The host rate-limits log bytes and drops the excess.
    pub fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::__private::wit::kinesis::task::log::{Level as L, log};
            let level = match level {
                Level::Trace => L::Trace,
                Level::Debug => L::Debug,
                Level::Info => L::Info,
                Level::Warn => L::Warn,
                Level::Error => L::Error,
            };
            log(level, message);
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::testing::with_host(|h| h.log(level, message));
        }
    }

    /// Logs at [`Level::Trace`].
    pub fn trace(message: &str) {
        log(Level::Trace, message);
    }
    /// Logs at [`Level::Debug`].
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
    /// Logs at [`Level::Info`].
    pub fn info(message: &str) {
        log(Level::Info, message);
    }
    /// Logs at [`Level::Warn`].
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
    /// Logs at [`Level::Error`].
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// Task metrics, exported by the host with the job's and shard's labels.
pub mod metrics {
    /// Adds `value` to the counter `name`.
    pub fn counter(name: &str, value: u64) {
        #[cfg(target_arch = "wasm32")]
        crate::__private::wit::kinesis::task::metrics::counter(name, value);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::with_host(|h| h.metric(name, crate::testing::Metric::Counter(value)));
    }

    /// Sets the gauge `name` to `value`.
    pub fn gauge(name: &str, value: f64) {
        #[cfg(target_arch = "wasm32")]
        crate::__private::wit::kinesis::task::metrics::gauge(name, value);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::with_host(|h| h.metric(name, crate::testing::Metric::Gauge(value)));
    }

    /// Records one observation of `value` in the histogram `name`.
    pub fn histogram(name: &str, value: f64) {
        #[cfg(target_arch = "wasm32")]
        crate::__private::wit::kinesis::task::metrics::histogram(name, value);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::with_host(|h| h.metric(name, crate::testing::Metric::Histogram(value)));
    }
}
