//! `echo-task`: a well-behaved fixture that emits every record to the output `out`, with the
//! same partition key and data.
//!
//! Two switches let tests drive the host's failure policies:
//! - a record whose data is exactly `poison` makes the batch fail with a poison-record error
//!   naming that record;
//! - `task.config.leading=N` finishes only the first N records of each batch (a partial result),
//!   so the host must deliver the rest again.
//!
//! It counts the records it echoes in the task metric `echoed` (a counter) and records each
//! batch's size in the histogram `batch_records`.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit, metrics};

/// Echoes every record to `out`.
#[derive(Debug)]
pub struct Echo {
    /// Records finished per batch, when set.
    pub leading: Option<usize>,
}

impl Task for Echo {
    fn init(config: &Config) -> Result<Self, TaskError> {
        Ok(Echo { leading: config.parse("leading")? })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        let take = self.leading.unwrap_or(usize::MAX);
        let mut echoed = 0;
        for record in batch.iter().take(take) {
            if record.data() == b"poison" {
                return Err(TaskError::poison(record.index(), "this record is poison"));
            }
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
            echoed += 1;
        }
        metrics::counter("echoed", echoed);
        metrics::histogram("batch_records", batch.len() as f64);
        Ok(self.leading.map_or(Done::All, Done::Leading))
    }
}

kinesis_task::export_task!(Echo);
