//! Run task logic natively, without WebAssembly: an in-memory host with the same commit rules
//! as kinesis-host (emits and state writes of a batch count only if the batch succeeds).
//!
//! Only in native builds; see the crate example.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::__private::wit::kinesis::task::types as wit;
use crate::error::{EmitError, StateError};
use crate::log::Level;
use crate::{Config, Done, Task, TaskError};

/// A record to feed a [`Harness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRecord {
    /// The payload.
    pub data: Vec<u8>,
    /// The partition key.
    pub partition_key: String,
    /// The sequence number; the harness numbers records when empty.
    pub sequence_number: String,
    /// The position inside a KPL aggregate.
    pub sub_sequence_number: u64,
    /// The explicit hash key, if any.
    pub explicit_hash_key: Option<String>,
    /// Arrival time, milliseconds since the Unix epoch.
    pub approximate_arrival_millis: u64,
}

impl TestRecord {
    /// A record with binary data.
    pub fn new(partition_key: &str, data: impl Into<Vec<u8>>) -> Self {
        Self {
            data: data.into(),
            partition_key: partition_key.to_owned(),
            sequence_number: String::new(),
            sub_sequence_number: 0,
            explicit_hash_key: None,
            approximate_arrival_millis: 0,
        }
    }

    /// A record with UTF-8 data.
    pub fn text(partition_key: &str, data: &str) -> Self {
        Self::new(partition_key, data.as_bytes())
    }
}

/// A record emitted by a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The logical output name.
    pub output: String,
    /// The partition key.
    pub partition_key: String,
    /// The explicit hash key, if any.
    pub explicit_hash_key: Option<String>,
    /// The payload.
    pub data: Vec<u8>,
}

/// A metric update made by a task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// A counter increment.
    Counter(u64),
    /// A gauge value.
    Gauge(f64),
    /// A histogram observation.
    Histogram(f64),
}

/// What a successful batch produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// How many leading records the task finished.
    pub done: usize,
    /// The records it emitted, in order.
    pub emitted: Vec<Emitted>,
    /// The log lines it wrote.
    pub logs: Vec<(Level, String)>,
    /// The metric updates it made.
    pub metrics: Vec<(String, Metric)>,
}

/// The in-memory host behind the SDK's functions in native builds.
#[derive(Debug, Default)]
pub(crate) struct MockHost {
    committed: BTreeMap<String, Vec<u8>>,
    pending: BTreeMap<String, Option<Vec<u8>>>,
    outcome: Outcome,
    outputs: Option<Vec<String>>,
}

impl MockHost {
    pub(crate) fn emit(
        &mut self,
        output: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &[u8],
    ) -> Result<(), EmitError> {
        if let Some(outputs) = &self.outputs
            && !outputs.iter().any(|o| o == output)
        {
            return Err(EmitError::UnknownOutput(output.to_owned()));
        }
        // Kinesis's rules, as the host applies them: a partition key of 1 to 256 characters
        // counted as UTF-16 code units, an explicit hash key written as a decimal from 0 to
        // 2^128 - 1 without leading zeros, data and key within 1 MiB.
        let units = partition_key.encode_utf16().count();
        if !(1..=256).contains(&units) {
            return Err(EmitError::InvalidKey(format!(
                "the partition key is {units} characters long as Kinesis counts them (UTF-16 code units); Kinesis takes 1 to 256"
            )));
        }
        if let Some(hash) = explicit_hash_key {
            let canonical = hash == "0"
                || (!hash.starts_with('0')
                    && hash.bytes().all(|b| b.is_ascii_digit())
                    && hash.parse::<u128>().is_ok());
            if !canonical {
                return Err(EmitError::InvalidKey(format!(
                    "explicit hash key {hash:?} is not a decimal number from 0 to 2^128 - 1 without sign or leading zeros"
                )));
            }
        }
        if data.len() + partition_key.len() > 1 << 20 {
            return Err(EmitError::TooLarge(((1 << 20) - partition_key.len()) as u32));
        }
        self.outcome.emitted.push(Emitted {
            output: output.to_owned(),
            partition_key: partition_key.to_owned(),
            explicit_hash_key: explicit_hash_key.map(str::to_owned),
            data: data.to_vec(),
        });
        Ok(())
    }

    pub(crate) fn state_get(&self, key: &str) -> Option<Vec<u8>> {
        match self.pending.get(key) {
            Some(pending) => pending.clone(),
            None => self.committed.get(key).cloned(),
        }
    }

    pub(crate) fn state_set(&mut self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.pending.insert(key.to_owned(), Some(value.to_vec()));
        Ok(())
    }

    pub(crate) fn state_delete(&mut self, key: &str) {
        self.pending.insert(key.to_owned(), None);
    }

    pub(crate) fn log(&mut self, level: Level, message: &str) {
        self.outcome.logs.push((level, message.to_owned()));
    }

    pub(crate) fn metric(&mut self, name: &str, metric: Metric) {
        self.outcome.metrics.push((name.to_owned(), metric));
    }
}

thread_local! {
    static HOST: RefCell<MockHost> = RefCell::new(MockHost::default());
}

pub(crate) fn with_host<R>(f: impl FnOnce(&mut MockHost) -> R) -> R {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

/// Drives a [`Task`] natively, batch by batch, like kinesis-host does.
///
/// A harness owns the thread's in-memory host: use one harness per thread at a time.
#[derive(Debug)]
pub struct Harness<T> {
    task: T,
    shard_id: String,
    next_sequence: u64,
}

impl<T: Task> Harness<T> {
    /// Initialises the task with task settings, on shard `shardId-000000000000`, with state
    /// empty and every output name accepted.
    ///
    /// # Errors
    /// The task's own error from [`Task::init`].
    pub fn new(config: &[(&str, &str)]) -> Result<Self, TaskError> {
        with_host(|h| *h = MockHost::default());
        let config =
            Config::new(config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        let task = T::init(&config)?;
        Ok(Self { task, shard_id: "shardId-000000000000".to_owned(), next_sequence: 1 })
    }

    /// Accepts only these output names from now on, like a job with `task.outputs.*` set.
    pub fn with_outputs(self, outputs: &[&str]) -> Self {
        with_host(|h| h.outputs = Some(outputs.iter().map(|o| (*o).to_owned()).collect()));
        self
    }

    /// Runs one batch. On success the batch's state writes are committed; on error they and
    /// its emits are discarded, as the host does.
    ///
    /// # Errors
    /// The task's error.
    pub fn process(&mut self, records: &[TestRecord]) -> Result<Outcome, TaskError> {
        let batch = self.pack(records);
        with_host(|h| {
            h.pending.clear();
            h.outcome = Outcome::default();
        });
        let result = self.task.process(&crate::__private::batch_view(&batch));
        with_host(|h| {
            let outcome = std::mem::take(&mut h.outcome);
            let pending = std::mem::take(&mut h.pending);
            let done = result?;
            for (key, value) in pending {
                match value {
                    Some(value) => h.committed.insert(key, value),
                    None => h.committed.remove(&key),
                };
            }
            let done = match done {
                Done::All => records.len(),
                Done::Leading(n) => n.min(records.len()),
            };
            Ok(Outcome { done, ..outcome })
        })
    }

    /// The committed value of a state key.
    pub fn state(&self, key: &str) -> Option<Vec<u8>> {
        with_host(|h| h.committed.get(key).cloned())
    }

    /// The task, to inspect it.
    pub fn task(&self) -> &T {
        &self.task
    }

    /// Calls [`Task::shutdown`].
    pub fn shutdown(mut self) {
        self.task.shutdown();
    }

    fn pack(&mut self, records: &[TestRecord]) -> wit::Batch {
        fn len32(n: usize) -> u32 {
            u32::try_from(n).expect("test batches stay under 4 GiB")
        }
        let mut batch = wit::Batch {
            info: wit::BatchInfo {
                stream_name: "test-stream".to_owned(),
                shard_id: self.shard_id.clone(),
                millis_behind_latest: None,
            },
            spans: Vec::with_capacity(records.len() * 8),
            numbers: Vec::with_capacity(records.len() * 2),
            data: Vec::new(),
            text: String::new(),
        };
        for r in records {
            let sequence = if r.sequence_number.is_empty() {
                let n = self.next_sequence;
                self.next_sequence += 1;
                format!("{n:056}")
            } else {
                r.sequence_number.clone()
            };
            batch.spans.extend([len32(batch.data.len()), len32(r.data.len())]);
            batch.data.extend_from_slice(&r.data);
            for text in
                [&r.partition_key, &sequence, r.explicit_hash_key.as_deref().unwrap_or_default()]
            {
                batch.spans.extend([len32(batch.text.len()), len32(text.len())]);
                batch.text.push_str(text);
            }
            batch.numbers.extend([r.sub_sequence_number, r.approximate_arrival_millis]);
        }
        batch
    }
}
