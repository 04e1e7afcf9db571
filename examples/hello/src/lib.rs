//! `hello`: the kinesis-host port of Samza's `KinesisHelloSamza` example.
//!
//! For every record it reads, the task writes one info-level log line with the record's
//! partition key, stream, shard, sequence number and data (decoded as UTF-8, invalid bytes
//! replaced):
//!
//! ```text
//! key=user-1 stream=events shard=shardId-000000000000 seq=4958... data=hello world
//! ```
//!
//! It emits nothing, keeps no state and finishes every batch.

use kinesis_task::{Batch, Config, Done, Envelope, Task, TaskError, log};

/// Logs every record it is given; needs no configuration.
#[derive(Debug, Default)]
pub struct Hello;

impl Task for Hello {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(Hello)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        for record in batch {
            log::info(&describe(batch, &record));
        }
        Ok(Done::All)
    }
}

/// The log line for one record of `batch`.
fn describe(batch: &Batch<'_>, record: &Envelope<'_>) -> String {
    format!(
        "key={} stream={} shard={} seq={} data={}",
        record.partition_key(),
        batch.stream_name(),
        batch.shard_id(),
        record.sequence_number(),
        String::from_utf8_lossy(record.data()),
    )
}

kinesis_task::export_task!(Hello);

#[cfg(test)]
mod tests {
    use kinesis_task::TaskError;
    use kinesis_task::log::Level;
    use kinesis_task::testing::{Harness, TestRecord};

    use super::Hello;

    #[test]
    fn logs_one_line_per_record_and_emits_nothing() -> Result<(), TaskError> {
        let mut harness = Harness::<Hello>::new(&[])?;
        let mut binary = TestRecord::new("user-2", b"bad \xff byte".to_vec());
        binary.sequence_number = "49590338271490256608559692538361571095921575989136588898".into();

        let out = harness.process(&[TestRecord::text("user-1", "hello world"), binary])?;

        assert_eq!(out.done, 2);
        assert!(out.emitted.is_empty());
        assert!(out.metrics.is_empty());
        assert_eq!(
            out.logs,
            vec![
                (
                    Level::Info,
                    "key=user-1 stream=test-stream shard=shardId-000000000000 \
                     seq=00000000000000000000000000000000000000000000000000000001 \
                     data=hello world"
                        .to_owned()
                ),
                (
                    Level::Info,
                    "key=user-2 stream=test-stream shard=shardId-000000000000 \
                     seq=49590338271490256608559692538361571095921575989136588898 \
                     data=bad \u{fffd} byte"
                        .to_owned()
                ),
            ]
        );
        Ok(())
    }

    #[test]
    fn empty_batch_logs_nothing() -> Result<(), TaskError> {
        let mut harness = Harness::<Hello>::new(&[])?;
        let out = harness.process(&[])?;
        assert_eq!(out.done, 0);
        assert!(out.logs.is_empty());
        Ok(())
    }
}
