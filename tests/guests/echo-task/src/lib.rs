//! `echo-task`: a well-behaved fixture that emits every record to the output `out`, with the
//! same partition key and data, and finishes every batch.
//!
//! It accepts the setting `task.config.fail_every` (a `u64`) so tests can pass it; an
//! unparsable value fails `init` with a fatal error, otherwise the setting changes nothing.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit};

/// Echoes every record to `out`.
#[derive(Debug)]
pub struct Echo {
    /// The parsed `fail_every` setting; kept, never acted on.
    pub fail_every: Option<u64>,
}

impl Task for Echo {
    fn init(config: &Config) -> Result<Self, TaskError> {
        Ok(Echo { fail_every: config.parse("fail_every")? })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        for record in batch {
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(Echo);
