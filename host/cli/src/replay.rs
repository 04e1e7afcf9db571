//! `kinesis-host replay`: runs a task over records from a JSON Lines file, with no AWS.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kinesis_host_runtime::{Batch, BatchOutput, Clock, InstanceSpec, RecordRef, TaskComponent};
use serde::{Deserialize, Serialize};

use crate::config::JobConfig;
use crate::pipeline::{ShardError, ShardStats, ShardWorker, Sink};

/// The shard records go to when a line names none.
pub const DEFAULT_SHARD: &str = "shardId-000000000000";

/// Why the input file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A line is not a valid record.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// One line of the input file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    /// Base64 data (as the Kinesis API and CLI show it).
    #[serde(default, alias = "Data")]
    data: Option<String>,
    /// UTF-8 data.
    #[serde(default)]
    text: Option<String>,
    #[serde(alias = "PartitionKey")]
    partition_key: String,
    #[serde(default, alias = "ShardId")]
    shard_id: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default, alias = "SequenceNumber")]
    sequence_number: Option<String>,
    #[serde(default)]
    sub_sequence_number: Option<u64>,
    #[serde(default, alias = "ExplicitHashKey")]
    explicit_hash_key: Option<String>,
    #[serde(default)]
    arrival_millis: Option<u64>,
}

/// A parsed input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    /// The payload.
    pub data: Vec<u8>,
    /// The partition key.
    pub partition_key: String,
    /// The sequence number.
    pub sequence_number: String,
    /// Position inside a KPL aggregate.
    pub sub_sequence_number: u64,
    /// The explicit hash key.
    pub explicit_hash_key: Option<String>,
    /// Arrival time, ms since the Unix epoch.
    pub arrival_millis: u64,
}

/// The records of one shard, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInput {
    /// The stream.
    pub stream: String,
    /// The shard.
    pub shard_id: String,
    /// The records.
    pub records: Vec<InputRecord>,
}

/// Reads the whole input, checking every line before anything runs, and groups the records by
/// (stream, shard) in order of first appearance.
///
/// # Errors
/// The first unusable line, with its number.
pub fn read_input(
    path: &Path,
    default_stream: &str,
    max_record_bytes: usize,
    now_millis: u64,
) -> Result<Vec<ShardInput>, InputError> {
    let file = std::fs::File::open(path)
        .map_err(|source| InputError::Read { path: path.to_owned(), source })?;
    let mut shards: Vec<ShardInput> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut next_sequence: HashMap<usize, u64> = HashMap::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let number = n + 1;
        let line = line.map_err(|source| InputError::Read { path: path.to_owned(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |problem: String| InputError::Line { path: path.to_owned(), line: number, problem };
        let parsed: InputLine =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a record: {e}")))?;
        let data = match (parsed.data, parsed.text) {
            (Some(b64), None) => BASE64
                .decode(b64.trim())
                .map_err(|e| bad(format!("`data` is not valid base64: {e}")))?,
            (None, Some(text)) => text.into_bytes(),
            (Some(_), Some(_)) => {
                return Err(bad("give either `data` (base64) or `text` (UTF-8), not both".into()));
            }
            (None, None) => {
                return Err(bad(
                    "missing the record's data: give `data` (base64) or `text` (UTF-8)".into(),
                ));
            }
        };
        if data.len() > max_record_bytes {
            return Err(bad(format!(
                "record data is {} bytes, over the limit of {max_record_bytes} (task.record.max.bytes)",
                data.len()
            )));
        }
        let key_chars = parsed.partition_key.chars().count();
        if key_chars == 0 || key_chars > 256 {
            return Err(bad(format!(
                "partition_key has {key_chars} characters; Kinesis takes 1 to 256"
            )));
        }
        if let Some(key) = &parsed.explicit_hash_key
            && key.parse::<u128>().is_err()
        {
            return Err(bad(format!(
                "explicit_hash_key {key:?} is not a decimal number below 2^128"
            )));
        }
        let stream = parsed.stream.unwrap_or_else(|| default_stream.to_owned());
        let shard_id = parsed.shard_id.unwrap_or_else(|| DEFAULT_SHARD.to_owned());
        if shard_id.is_empty() {
            return Err(bad("shard_id is empty".into()));
        }
        let slot = *index.entry((stream.clone(), shard_id.clone())).or_insert_with(|| {
            shards.push(ShardInput { stream, shard_id, records: Vec::new() });
            shards.len() - 1
        });
        let sequence_number = match parsed.sequence_number {
            Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s,
            Some(s) => return Err(bad(format!("sequence_number {s:?} is not a decimal number"))),
            None => {
                let n = next_sequence.entry(slot).or_insert(0);
                *n += 1;
                format!("{:056}", *n)
            }
        };
        shards[slot].records.push(InputRecord {
            data,
            partition_key: parsed.partition_key,
            sequence_number,
            sub_sequence_number: parsed.sub_sequence_number.unwrap_or(0),
            explicit_hash_key: parsed.explicit_hash_key,
            arrival_millis: parsed.arrival_millis.unwrap_or(now_millis),
        });
    }
    Ok(shards)
}

/// One emitted record, as written to the output.
#[derive(Debug, Serialize)]
struct OutputLine<'a> {
    output: &'a str,
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    explicit_hash_key: Option<&'a str>,
    data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    shard_id: &'a str,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Totals over all shards.
    pub stats: ShardStats,
    /// Shards read.
    pub shards: usize,
    /// Shards that stopped on an error.
    pub failed: Vec<ShardError>,
    /// Wall time.
    pub elapsed: Duration,
}

struct JsonlSink<'a> {
    out: &'a mut dyn Write,
    error: Option<std::io::Error>,
    progress: &'a indicatif::ProgressBar,
}

impl Sink for JsonlSink<'_> {
    fn commit(&mut self, batch: &Batch, output: BatchOutput) {
        self.progress.inc(batch.len() as u64);
        for emit in &output.emits {
            let line = OutputLine {
                output: &emit.output,
                partition_key: &emit.partition_key,
                explicit_hash_key: emit.explicit_hash_key.as_deref(),
                data: BASE64.encode(&emit.data),
                text: std::str::from_utf8(&emit.data).ok(),
                shard_id: batch.shard_id(),
            };
            let written = serde_json::to_writer(&mut *self.out, &line)
                .map_err(std::io::Error::other)
                .and_then(|()| self.out.write_all(b"\n"));
            if let Err(e) = written {
                self.error.get_or_insert(e);
            }
        }
    }

    fn poison(&mut self, _shard_id: &str, _record: RecordRef<'_>, _message: &str) {
        self.progress.inc(1);
    }
}

/// Runs `component` over every shard of `input`, writing emits to `out`.
///
/// # Errors
/// Only when writing the output fails; shard failures are in the summary.
pub fn replay(
    component: &Arc<TaskComponent>,
    config: &JobConfig,
    input: Vec<ShardInput>,
    clock: Arc<dyn Clock>,
    out: &mut dyn Write,
) -> std::io::Result<Summary> {
    let started = Instant::now();
    let total: usize = input.iter().map(|s| s.records.len()).sum();
    let progress = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} records {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut sink = JsonlSink { out, error: None, progress: &progress };
    let mut summary = Summary { shards: input.len(), ..Summary::default() };
    for shard in input {
        let spec = Arc::new(InstanceSpec {
            job: config.job_name.clone(),
            stream: shard.stream.clone(),
            shard_id: shard.shard_id.clone(),
            outputs: config.output_policy(),
            config: config.task_config.clone(),
            limits: config.limits.clone(),
        });
        let mut worker = ShardWorker::new(component.clone(), spec, config.retry, clock.clone());
        let mut batch = Batch::new(
            &shard.stream,
            &shard.shard_id,
            config.batch.max_records,
            config.batch.max_bytes,
        );
        let mut result = Ok(());
        for record in &shard.records {
            let r = RecordRef {
                data: &record.data,
                partition_key: &record.partition_key,
                sequence_number: &record.sequence_number,
                sub_sequence_number: record.sub_sequence_number,
                explicit_hash_key: record.explicit_hash_key.as_deref(),
                approximate_arrival_millis: record.arrival_millis,
            };
            if !batch.push(&r) {
                let full = std::mem::replace(
                    &mut batch,
                    Batch::new(
                        &shard.stream,
                        &shard.shard_id,
                        config.batch.max_records,
                        config.batch.max_bytes,
                    ),
                );
                result = worker.run(full, &mut sink);
                if result.is_err() {
                    break;
                }
                batch.push(&r);
            }
        }
        if result.is_ok() && !batch.is_empty() {
            result = worker.run(batch, &mut sink);
        }
        let stats = worker.stats();
        add(&mut summary.stats, stats);
        worker.shutdown();
        if let Err(e) = result {
            tracing::error!(shard = %shard.shard_id, error = %e, "Shard stopped.");
            summary.failed.push(e);
        }
        if let Some(e) = sink.error.take() {
            return Err(e);
        }
    }
    progress.finish_and_clear();
    sink.out.flush()?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn add(total: &mut ShardStats, s: ShardStats) {
    total.records += s.records;
    total.batches += s.batches;
    total.emitted += s.emitted;
    total.retries += s.retries;
    total.traps += s.traps;
    total.poison_records += s.poison_records;
}

/// Milliseconds since the Unix epoch now (the default arrival time of input records).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
