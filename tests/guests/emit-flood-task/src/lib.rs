//! `emit-flood-task`: a fixture that, on every batch, emits `x` with partition key `k` to the
//! output `out` until the host refuses one, then logs at warn level
//! `emit refused after <n> records: <error>` and finishes the batch. The host commits the `n`
//! accepted records, so a test can check that `n` is the host's per-batch emit cap.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit, log};

/// Emits until refused.
#[derive(Debug)]
pub struct EmitFlood;

impl Task for EmitFlood {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(EmitFlood)
    }

    fn process(&mut self, _batch: &Batch<'_>) -> Result<Done, TaskError> {
        let mut accepted = 0u64;
        let refusal = loop {
            match emit("out", "k", b"x") {
                Ok(()) => accepted += 1,
                Err(e) => break e,
            }
        };
        log::warn(&format!("emit refused after {accepted} records: {refusal}"));
        Ok(Done::All)
    }
}

kinesis_task::export_task!(EmitFlood);
