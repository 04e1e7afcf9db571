//! `bench-count`: the trivial task of `kinesis-host-bench suite`.
//!
//! It only counts: at the end of each batch it adds the batch's record count to the counter
//! `records` and reports the whole batch done, so the host's own cost is what the throughput
//! figures measure. With `task.config.log=true` it also logs every record's data (as text,
//! at INFO) on its own line: the latency and cold-start figures read those lines from the
//! host's log as they are written, so no output stream or polling sits between the task and
//! the clock.

use kinesis_task::{Batch, Config, Done, Task, TaskError, log, metrics};

/// The counter that receives each batch's record count.
pub const RECORDS: &str = "records";

/// The benchmark task.
#[derive(Debug, Clone, Copy, Default)]
pub struct BenchCount {
    /// Log every record's data.
    log: bool,
}

impl Task for BenchCount {
    fn init(config: &Config) -> Result<Self, TaskError> {
        Ok(BenchCount { log: config.get("log") == Some("true") })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        if self.log {
            for record in batch.iter() {
                log::info(&String::from_utf8_lossy(record.data()));
            }
        }
        metrics::counter(RECORDS, batch.len() as u64);
        Ok(Done::All)
    }
}

kinesis_task::export_task!(BenchCount);

#[cfg(test)]
mod tests {
    use kinesis_task::TaskError;
    use kinesis_task::testing::{Harness, Metric, TestRecord};

    use super::{BenchCount, RECORDS};

    #[test]
    fn counts_and_logs_when_asked() -> Result<(), TaskError> {
        let mut harness = Harness::<BenchCount>::new(&[("log", "true")])?;
        let out = harness.process(&[TestRecord::text("a", "lat 1"), TestRecord::text("b", "x")])?;
        assert_eq!(out.done, 2);
        assert_eq!(out.metrics, vec![(RECORDS.to_owned(), Metric::Counter(2))]);
        assert_eq!(out.logs.len(), 2);
        Ok(())
    }
}
