//! `import-bomb-task`: a fixture that tries to make the host hold memory beyond the task's
//! memory cap through its imports. In `init` it fills one buffer of `task.config.mb` MiB
//! (default 32) with `x`. With `task.config.mode=bomb`, every call then hands that buffer to
//! every import: as four distinct metric names (the first byte changed), as a log line, a state
//! key and a state value, an output name and a partition key; it also registers 300 short
//! metric names and records a histogram observation that is not a number; and every second call
//! fails with a copy of the buffer as its retryable error message. With `mode=quiet` it only
//! makes the same copy every second call, so that its own memory is the same in both modes. In both modes a call that does not fail echoes every record to `out`, so the output
//! is exact either way.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit, log, metrics, state};

/// Fills a buffer and throws it at the host's imports.
#[derive(Debug)]
pub struct ImportBomb {
    buffer: Vec<u8>,
    bomb: bool,
    calls: u64,
}

impl ImportBomb {
    /// The buffer as text, its first byte replaced by `first`.
    fn text(&mut self, first: u8) -> &str {
        self.buffer[0] = first;
        // Every byte is ASCII.
        std::str::from_utf8(&self.buffer).unwrap_or_default()
    }
}

impl Task for ImportBomb {
    fn init(config: &Config) -> Result<Self, TaskError> {
        let mb: usize = config.parse("mb")?.unwrap_or(32);
        let bomb = config.get("mode") == Some("bomb");
        Ok(ImportBomb { buffer: vec![b'x'; mb << 20], bomb, calls: 0 })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        self.calls += 1;
        if self.bomb {
            for first in [b'a', b'b', b'c', b'd'] {
                metrics::counter(self.text(first), 1);
            }
            for i in 0..300 {
                metrics::counter(&format!("name_{i}"), 1);
            }
            metrics::histogram("not_a_number", f64::NAN);
            log::error(self.text(b'l'));
            let _ = state::set(self.text(b's'), b"v");
            let _ = state::set("key", &self.buffer);
            let _ = emit(self.text(b'o'), "k", b"x");
            let _ = emit("out", self.text(b'k'), b"x");
        }
        // Both modes make the same copy, so that the task's own memory is the same in both.
        if self.calls.is_multiple_of(2) {
            let message = self.text(b'e').to_owned();
            if self.bomb {
                return Err(TaskError::retryable(message));
            }
            std::hint::black_box(&message);
        }
        std::hint::black_box(&self.buffer);
        for record in batch {
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(ImportBomb);
