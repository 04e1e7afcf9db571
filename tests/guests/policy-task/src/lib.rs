//! `policy-task`: a fixture for the host's failure policies (`task.retry.*`,
//! `task.dead.letter.output`). It emits every record to the output `out`, with the same
//! partition key and data, except records whose data asks for a failure:
//!
//! - data starting with `fail` makes the whole batch fail with a retryable error, every time;
//! - data starting with `trap` makes the task panic (a trap);
//! - data starting with `poison` makes the batch fail with a poison-record error naming it;
//! - data starting with `fatal` makes the batch fail with a fatal error.
//!
//! A failed call's emits are discarded by the host, so the output stream holds each record that
//! was processed as many times as a call including it succeeded.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit};

/// Echoes records, failing on request.
#[derive(Debug)]
pub struct Policy;

impl Task for Policy {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(Policy)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        for record in batch {
            let data = record.data();
            if data.starts_with(b"fail") {
                return Err(TaskError::retryable(format!(
                    "record {} asks to fail",
                    record.sequence_number()
                )));
            }
            if data.starts_with(b"trap") {
                panic!("record {} asks to trap", record.sequence_number());
            }
            if data.starts_with(b"poison") {
                return Err(TaskError::poison(record.index(), "this record is poison"));
            }
            if data.starts_with(b"fatal") {
                return Err(TaskError::fatal("a record asks to stop the shard"));
            }
            emit("out", record.partition_key(), data)
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(Policy);
