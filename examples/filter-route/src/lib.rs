//! `filter-route`: forwards the records whose data contains a substring to one output.
//!
//! Settings (in job.properties):
//!
//! - `task.config.contains` (required): the substring to look for, matched against the raw
//!   bytes of each record's data.
//! - `task.config.output` (default `matches`): the logical output that matching records go to,
//!   with their partition key and data unchanged.
//!
//! Each batch adds the number of matching records to the counter `matched`.
//!
//! When the host refuses a record because it is too large or the batch's emit quota is used up,
//! or the record's partition key is not valid for the output, the record is reported as a
//! poison record; an output name the job does not know stops the shard.

use kinesis_task::{Batch, Config, Done, EmitError, Envelope, Task, TaskError, emit, metrics};

/// The setting holding the substring to look for.
const CONTAINS: &str = "contains";
/// The setting naming the output.
const OUTPUT: &str = "output";
/// The output used when `task.config.output` is not set.
const DEFAULT_OUTPUT: &str = "matches";

/// Forwards records whose data contains [`FilterRoute::needle`] to [`FilterRoute::output`].
#[derive(Debug, Clone)]
pub struct FilterRoute {
    needle: Vec<u8>,
    output: String,
}

impl FilterRoute {
    /// The bytes a record's data must contain to be forwarded.
    pub fn needle(&self) -> &[u8] {
        &self.needle
    }

    /// The logical output that matching records go to.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// Whether `data` contains the needle.
    fn matches(&self, data: &[u8]) -> bool {
        data.windows(self.needle.len()).any(|window| window == self.needle.as_slice())
    }

    /// Forwards `record`, turning a refusal into the error the host should act on.
    fn forward(&self, record: &Envelope<'_>) -> Result<(), TaskError> {
        emit(&self.output, record.partition_key(), record.data()).map_err(|e| match e {
            EmitError::UnknownOutput(_) => TaskError::fatal(format!(
                "{e}: add it to the job's outputs or name another with task.config.{OUTPUT}"
            )),
            EmitError::TooLarge(_) | EmitError::QuotaExceeded | EmitError::InvalidKey(_) => {
                TaskError::poison(record.index(), format!("cannot forward the record: {e}"))
            }
        })
    }
}

impl Task for FilterRoute {
    fn init(config: &Config) -> Result<Self, TaskError> {
        let needle = match config.get(CONTAINS) {
            Some(needle) if !needle.is_empty() => needle.as_bytes().to_vec(),
            Some(_) => {
                return Err(TaskError::fatal(format!("task.config.{CONTAINS} must not be empty")));
            }
            None => {
                return Err(TaskError::fatal(format!(
                    "task.config.{CONTAINS} is required: the substring that records must contain"
                )));
            }
        };
        let output = config.get(OUTPUT).unwrap_or(DEFAULT_OUTPUT).to_owned();
        Ok(FilterRoute { needle, output })
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        let mut matched = 0u64;
        for record in batch.iter().filter(|r| self.matches(r.data())) {
            self.forward(&record)?;
            matched += 1;
        }
        metrics::counter("matched", matched);
        Ok(Done::All)
    }
}

kinesis_task::export_task!(FilterRoute);

#[cfg(test)]
mod tests {
    use kinesis_task::testing::{Emitted, Harness, Metric, TestRecord};
    use kinesis_task::{ErrorKind, TaskError};

    use super::FilterRoute;

    fn records() -> Vec<TestRecord> {
        vec![
            TestRecord::text("svc-a", "INFO started"),
            TestRecord::text("svc-b", "ERROR disk full"),
            TestRecord::text("svc-a", "WARN slow"),
            TestRecord::new("svc-c", b"\xff\xfe binary ERROR tail".to_vec()),
            TestRecord::text("svc-b", "error in lower case does not match"),
        ]
    }

    fn emitted(output: &str, partition_key: &str, data: &[u8]) -> Emitted {
        Emitted {
            output: output.to_owned(),
            partition_key: partition_key.to_owned(),
            explicit_hash_key: None,
            data: data.to_vec(),
        }
    }

    #[test]
    fn forwards_matching_records_to_the_configured_output() -> Result<(), TaskError> {
        let mut harness =
            Harness::<FilterRoute>::new(&[("contains", "ERROR"), ("output", "errors")])?
                .with_outputs(&["errors"]);

        let out = harness.process(&records())?;

        assert_eq!(out.done, 5);
        assert_eq!(
            out.emitted,
            vec![
                emitted("errors", "svc-b", b"ERROR disk full"),
                emitted("errors", "svc-c", b"\xff\xfe binary ERROR tail"),
            ]
        );
        assert_eq!(out.metrics, vec![("matched".to_owned(), Metric::Counter(2))]);
        Ok(())
    }

    #[test]
    fn output_defaults_to_matches() -> Result<(), TaskError> {
        let mut harness = Harness::<FilterRoute>::new(&[("contains", "WARN")])?;
        assert_eq!(harness.task().output(), "matches");

        let out = harness.process(&records())?;

        assert_eq!(out.emitted, vec![emitted("matches", "svc-a", b"WARN slow")]);
        Ok(())
    }

    #[test]
    fn counts_zero_when_nothing_matches() -> Result<(), TaskError> {
        let mut harness = Harness::<FilterRoute>::new(&[("contains", "PANIC")])?;

        let out = harness.process(&records())?;

        assert!(out.emitted.is_empty());
        assert_eq!(out.metrics, vec![("matched".to_owned(), Metric::Counter(0))]);
        Ok(())
    }

    #[test]
    fn missing_substring_is_a_fatal_init_error() {
        let err = Harness::<FilterRoute>::new(&[("output", "errors")])
            .expect_err("init must fail without task.config.contains");
        assert_eq!(err.kind(), ErrorKind::Fatal);
        assert!(err.message().contains("task.config.contains"), "{err}");
    }

    #[test]
    fn empty_substring_is_a_fatal_init_error() {
        let err = Harness::<FilterRoute>::new(&[("contains", "")])
            .expect_err("init must fail with an empty task.config.contains");
        assert_eq!(err.kind(), ErrorKind::Fatal);
        assert!(err.message().contains("task.config.contains"), "{err}");
    }

    #[test]
    fn unknown_output_is_fatal_and_emits_nothing() -> Result<(), TaskError> {
        let mut harness =
            Harness::<FilterRoute>::new(&[("contains", "ERROR")])?.with_outputs(&["errors"]);

        let err = harness.process(&records()).expect_err("`matches` is not an output");

        assert_eq!(err.kind(), ErrorKind::Fatal);
        assert!(err.message().contains("matches"), "{err}");
        Ok(())
    }

    #[test]
    fn record_with_invalid_key_is_poison() -> Result<(), TaskError> {
        let mut harness = Harness::<FilterRoute>::new(&[("contains", "ERROR")])?;

        let err = harness
            .process(&[TestRecord::text("svc-a", "ok"), TestRecord::text("", "ERROR no key")])
            .expect_err("the mock host refuses empty partition keys");

        assert_eq!(err.kind(), ErrorKind::PoisonRecord);
        assert_eq!(err.record_index(), Some(1));
        Ok(())
    }
}
