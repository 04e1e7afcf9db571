//! `panic-task`: a fixture that panics on every `panic_every`-th call to `process` in an
//! instance (setting `task.config.panic_every`, a positive `u64`, default 3), with the message
//! `planned panic on call <n>` (calls counted from 1); the other calls echo every record to
//! `out` and finish.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit};

/// Echoes records to `out`, panicking on a schedule.
#[derive(Debug)]
pub struct Panic {
    panic_every: u64,
    calls: u64,
}

impl Task for Panic {
    fn init(config: &Config) -> Result<Self, TaskError> {
        let panic_every = config.parse("panic_every")?.unwrap_or(3);
        if panic_every == 0 {
            return Err(TaskError::fatal("task.config.panic_every must be at least 1"));
        }
        Ok(Panic { panic_every, calls: 0 })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        self.calls += 1;
        if self.calls.is_multiple_of(self.panic_every) {
            panic!("planned panic on call {}", self.calls);
        }
        for record in batch {
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(Panic);
