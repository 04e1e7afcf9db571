//! `bench-batch`: the guest of `kinesis-host-bench boundary` for our columnar batch path.
//!
//! Per record it adds, with wrapping `u64` arithmetic, every data byte, the partition key's
//! length and the sequence number's length. At the end of each batch it adds the batch's sum to
//! the counter `checksum` (the host keeps the running total; the benchmark reads deltas), and
//! reports the whole batch done. `bench-naive` does the same work over `list<envelope>`.

use kinesis_task::{Batch, Config, Done, Task, TaskError, metrics};

/// The counter that receives each batch's checksum.
pub const CHECKSUM: &str = "checksum";

/// The benchmark task: stateless.
#[derive(Debug, Clone, Copy, Default)]
pub struct BenchBatch;

/// The checksum of one record: its data bytes plus the lengths of its partition key and
/// sequence number, as a wrapping `u64` sum.
#[inline]
pub fn record_sum(data: &[u8], partition_key: &str, sequence_number: &str) -> u64 {
    data.iter()
        .fold(0u64, |acc, &b| acc.wrapping_add(u64::from(b)))
        .wrapping_add(partition_key.len() as u64)
        .wrapping_add(sequence_number.len() as u64)
}

impl Task for BenchBatch {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(BenchBatch)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        let sum = batch.iter().fold(0u64, |acc, record| {
            acc.wrapping_add(record_sum(
                record.data(),
                record.partition_key(),
                record.sequence_number(),
            ))
        });
        metrics::counter(CHECKSUM, sum);
        Ok(Done::All)
    }
}

kinesis_task::export_task!(BenchBatch);

#[cfg(test)]
mod tests {
    use kinesis_task::TaskError;
    use kinesis_task::testing::{Harness, Metric, TestRecord};

    use super::{BenchBatch, CHECKSUM};

    #[test]
    fn reports_the_batch_checksum() -> Result<(), TaskError> {
        let mut harness = Harness::<BenchBatch>::new(&[])?;
        let mut first = TestRecord::new("pk", vec![1, 2, 255]);
        first.sequence_number = "1000".to_owned();
        let mut second = TestRecord::text("key", "ab");
        second.sequence_number = "1001".to_owned();
        let out = harness.process(&[first, second])?;
        assert_eq!(out.done, 2);
        let expected = (1 + 2 + 255) + 2 + 4 + (97 + 98) + 3 + 4;
        assert_eq!(out.metrics, vec![(CHECKSUM.to_owned(), Metric::Counter(expected))]);
        Ok(())
    }
}
