//! `forge-log-task`: a fixture that tries to write log lines that look like the host's own,
//! through every guest string that reaches the host's log: its log lines, stdout and stderr, a
//! state key and a metric name that the host refuses (and names in a warning), and the message
//! of a retryable error (the first call of each instance fails with it). Each carries a line
//! break followed by a forged line, a carriage return, an ANSI escape sequence and a
//! right-to-left override. Then it echoes every record to `out`.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit, log, metrics, state};

/// A line break, then what a host line looks like.
pub const FORGED: &str =
    "\n2026-12-04T00:00:00.000000Z ERROR kinesis_host: FORGED all jobs stopped\r\u{1b}[2K\u{202e}";

/// Tries to forge host log lines, then echoes records to `out`.
#[derive(Debug)]
pub struct ForgeLog {
    calls: u64,
}

impl Task for ForgeLog {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(ForgeLog { calls: 0 })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        self.calls += 1;
        log::error(&format!("log{FORGED}"));
        println!("stdout{FORGED}");
        eprintln!("stderr{FORGED}");
        // Over the key limit (1 KiB by default): refused, and named in the host's warning.
        let _ = state::set(&format!("key{FORGED}{}", "k".repeat(2048)), b"v");
        metrics::counter(&format!("metric{FORGED}"), 1);
        if self.calls == 1 {
            return Err(TaskError::retryable(format!("error{FORGED}")));
        }
        for record in batch {
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

kinesis_task::export_task!(ForgeLog);
