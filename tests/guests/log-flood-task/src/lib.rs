//! `log-flood-task`: a fixture that, on every batch, writes 10 000 info-level log lines of
//! exactly 100 bytes each through the host's log, prints 1 000 lines to stdout, then echoes
//! every record to `out` and finishes. It checks that the host rate-limits task logs and
//! stdout without failing the batch.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit, log};

/// Log lines per batch.
const LOG_LINES: usize = 10_000;
/// Bytes per log line.
const LOG_LINE_BYTES: usize = 100;
/// Stdout lines per batch.
const STDOUT_LINES: usize = 1_000;

/// Floods the log and stdout, then echoes records to `out`.
#[derive(Debug)]
pub struct LogFlood;

impl Task for LogFlood {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(LogFlood)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        for i in 0..LOG_LINES {
            let line =
                format!("{:x<width$}", format!("log flood line {i:05} "), width = LOG_LINE_BYTES);
            log::info(&line);
        }
        for i in 0..STDOUT_LINES {
            println!("stdout flood line {i:04}");
        }
        for record in batch {
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(LogFlood);
