//! `kinesis-host replay`: runs a task over records from a JSON Lines file, with no AWS.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kinesis_host_coordinator::checkpoint::Checkpoint;
use kinesis_host_runtime::{
    Batch, BatchOutput, Clock, InstanceSpec, RecordRef, TaskComponent, explicit_hash_key_problem,
    partition_key_problem,
};
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
    let mut reader = BufReader::new(file);
    // The longest line a record of `max_record_bytes` can take (its data as JSON text with every
    // byte escaped, and its other fields), so that a file with no line breaks (or a device)
    // cannot make replay read without end.
    let max_line = max_record_bytes.saturating_mul(6).saturating_add(64 << 10);
    let mut shards: Vec<ShardInput> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut next_sequence: HashMap<usize, u64> = HashMap::new();
    // Per shard, the last record's position and line, which the next one must come after.
    let mut last: HashMap<usize, (Checkpoint, usize)> = HashMap::new();
    let mut buffer = Vec::new();
    for number in 1.. {
        buffer.clear();
        let read = (&mut reader)
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut buffer)
            .map_err(|source| InputError::Read { path: path.to_owned(), source })?;
        if read == 0 {
            break;
        }
        let bad =
            |problem: String| InputError::Line { path: path.to_owned(), line: number, problem };
        if buffer.len() > max_line {
            return Err(bad(format!(
                "the line is longer than {max_line} bytes, more than a record of task.record.max.bytes={max_record_bytes} takes; the input must be JSON Lines, one record per line"
            )));
        }
        let line = std::str::from_utf8(&buffer)
            .map_err(|e| bad(format!("the line is not UTF-8 text: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: InputLine =
            serde_json::from_str(line).map_err(|e| bad(format!("not a record: {e}")))?;
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
        if let Some(problem) = partition_key_problem(&parsed.partition_key) {
            return Err(bad(format!("partition_key: {problem}")));
        }
        if let Some(problem) =
            parsed.explicit_hash_key.as_deref().and_then(explicit_hash_key_problem)
        {
            return Err(bad(format!("explicit_hash_key: {problem}")));
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
        let sub_sequence_number = parsed.sub_sequence_number.unwrap_or(0);
        // Kinesis numbers a shard's records in increasing order (the user records of a KPL
        // aggregate share its number and count up their sub-sequence numbers); the host relies
        // on it, as checkpoints do.
        let position = Checkpoint::after(&sequence_number, sub_sequence_number);
        if let Some((previous, previous_line)) = last.get(&slot)
            && position <= *previous
        {
            return Err(bad(format!(
                "sequence_number {sequence_number} (sub_sequence_number {sub_sequence_number}) does not come after the one on line {previous_line} ({} sub {}) in shard {} of stream {}: a shard's records must be in increasing order; sort them, or leave sequence_number out to have them numbered",
                previous.as_str(),
                previous.sub_sequence_number(),
                shards[slot].shard_id,
                shards[slot].stream,
            )));
        }
        last.insert(slot, (position, number));
        shards[slot].records.push(InputRecord {
            data,
            partition_key: parsed.partition_key,
            sequence_number,
            sub_sequence_number,
            explicit_hash_key: parsed.explicit_hash_key,
            arrival_millis: parsed.arrival_millis.unwrap_or(now_millis),
        });
    }
    Ok(shards)
}

/// The most memory this process has had resident so far (its peak RSS), in bytes, when the
/// system says.
pub fn peak_resident_bytes() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `usage` is a valid place for getrusage to write a `rusage` into.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: getrusage succeeded and filled it in.
        let max = unsafe { usage.assume_init() }.ru_maxrss;
        let max = u64::try_from(max).ok()?;
        // Linux counts KiB, macOS bytes.
        Some(if cfg!(target_os = "macos") { max } else { max * 1024 })
    }
    #[cfg(not(unix))]
    {
        None
    }
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
