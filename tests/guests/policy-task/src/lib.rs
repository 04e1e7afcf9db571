//! `policy-task`: a fixture for the host's failure policies (`task.retry.*`,
//! `task.dead.letter.output`). It emits every record to the output `out`, with the same
//! partition key and data, except records whose data asks for a failure:
//!
//! - data starting with `fail` makes the whole batch fail with a retryable error, every time;
//! - data starting with `trap` makes the task panic (a trap);
//! - data starting with `poison` makes the batch fail with a poison-record error naming it;
//! - data starting with `fatal` makes the batch fail with a fatal error;
//! - data starting with `bad-key` is emitted with a partition key that Kinesis refuses (256
//!   characters outside the Basic Multilingual Plane: 512 as Kinesis counts them), and data
//!   starting with `bad-hash` with an explicit hash key with a leading zero; when the host
//!   refuses that emit as invalid, the task emits `refused:<data>` under the record's own key
//!   instead (and fails as fatal if the host accepted it).
//!
//! A failed call's emits are discarded by the host, so the output stream holds each record that
//! was processed as many times as a call including it succeeded.

use kinesis_task::{Batch, Config, Done, EmitError, Task, TaskError, emit, emit_with_hash_key};

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
            let bad = if data.starts_with(b"bad-key") {
                Some(emit("out", &"\u{1F600}".repeat(256), data))
            } else if data.starts_with(b"bad-hash") {
                Some(emit_with_hash_key("out", record.partition_key(), Some("0042"), data))
            } else {
                None
            };
            match bad {
                Some(Err(EmitError::InvalidKey(_))) => {
                    let refused = [b"refused:".as_slice(), data].concat();
                    emit("out", record.partition_key(), &refused)
                        .map_err(|e| TaskError::fatal(e.to_string()))?;
                }
                Some(other) => {
                    return Err(TaskError::fatal(format!(
                        "an invalid key was not refused: {other:?}"
                    )));
                }
                None => emit("out", record.partition_key(), data)
                    .map_err(|e| TaskError::fatal(e.to_string()))?,
            }
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use kinesis_task::testing::{Harness, TestRecord};

    /// The native harness refuses the keys Kinesis refuses, as the host does.
    #[test]
    fn keys_kinesis_refuses_are_refused_natively_too() -> Result<(), TaskError> {
        let mut harness = Harness::<Policy>::new(&[])?;
        let out = harness.process(&[
            TestRecord::new("k", "bad-key-1"),
            TestRecord::new("k", "ok"),
            TestRecord::new("k", "bad-hash-2"),
        ])?;
        let data: Vec<&[u8]> = out.emitted.iter().map(|e| e.data.as_slice()).collect();
        assert_eq!(data, [b"refused:bad-key-1".as_slice(), b"ok", b"refused:bad-hash-2"]);
        Ok(())
    }
}
