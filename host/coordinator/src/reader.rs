//! Reading shards with `GetRecords`, the way KCL's polling consumer does: iterator from the
//! checkpoint, records at or below the checkpoint dropped, back-off on throttling, restart
//! after an expired iterator, and shard end detected by a null next iterator with child shards.

use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{Record, ShardIteratorType};

use crate::checkpoint::Checkpoint;
use crate::lean_decode::{DecodedRecords, LeanGetRecords};

/// A shard as `ListShards` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard id.
    pub id: String,
    /// Its parent and, after a merge, adjacent parent.
    pub parents: Vec<String>,
    /// Its hash key range (decimal strings).
    pub hash_range: (String, String),
}

/// A child shard reported at the end of its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildShard {
    /// The child's id.
    pub id: String,
    /// All of the child's parents.
    pub parents: Vec<String>,
    /// Its hash key range (decimal strings).
    pub hash_range: (String, String),
}

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A Kinesis call failed and retrying did not help.
    #[error("Kinesis {operation} on stream {stream}{} failed: {message}", shard_id.as_deref().map(|s| format!(" shard {s}")).unwrap_or_default())]
    Aws {
        /// The operation.
        operation: &'static str,
        /// The stream.
        stream: String,
        /// The shard, if one.
        shard_id: Option<String>,
        /// The SDK's error.
        message: String,
    },
}

use crate::sdk_error::message as sdk_message;

/// Every shard of `stream`, open and closed, following `ListShards` pages.
///
/// # Errors
/// When `ListShards` fails.
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<ShardInfo>, ReadError> {
    let mut shards = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let request = match next.take() {
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let out = request.send().await.map_err(|e| ReadError::Aws {
            operation: "ListShards",
            stream: stream.to_owned(),
            shard_id: None,
            message: sdk_message(&e),
        })?;
        for shard in out.shards() {
            let range = shard.hash_key_range();
            shards.push(ShardInfo {
                id: shard.shard_id().to_owned(),
                parents: shard
                    .parent_shard_id()
                    .into_iter()
                    .chain(shard.adjacent_parent_shard_id())
                    .map(str::to_owned)
                    .collect(),
                hash_range: (
                    range.map(|r| r.starting_hash_key().to_owned()).unwrap_or_default(),
                    range.map(|r| r.ending_hash_key().to_owned()).unwrap_or_default(),
                ),
            });
        }
        match out.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_owned()),
            _ => break,
        }
    }
    Ok(shards)
}

/// What one `GetRecords` call gave.
#[derive(Debug, Default)]
pub struct Fetch {
    /// The records after the checkpoint, in shard order.
    pub records: Vec<Record>,
    /// How far behind the tip the shard's reader is.
    pub millis_behind_latest: Option<i64>,
    /// At shard end, the children; the reader is then finished.
    pub shard_end: Option<Vec<ChildShard>>,
}

/// Reads one shard from a checkpoint.
#[derive(Debug)]
pub struct ShardReader {
    client: Client,
    stream: String,
    shard_id: String,
    max_records: i32,
    iterator: Option<String>,
    /// The position to restart from after an expired iterator.
    resume: Checkpoint,
    at_timestamp: Option<SystemTime>,
    finished: bool,
}

impl ShardReader {
    /// A reader positioned just after `checkpoint` (or at the sentinel it names);
    /// `at_timestamp` is the job's `TimestampAtInitialPositionInStream` for `AT_TIMESTAMP`.
    ///
    /// # Errors
    /// When `GetShardIterator` fails.
    pub async fn new(
        client: Client,
        stream: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
        at_timestamp: Option<SystemTime>,
        max_records: u32,
    ) -> Result<Self, ReadError> {
        let mut reader = Self {
            client,
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            max_records: i32::try_from(max_records.clamp(1, 10_000)).unwrap_or(10_000),
            iterator: None,
            finished: checkpoint == Checkpoint::ShardEnd,
            resume: checkpoint,
            at_timestamp,
        };
        if !reader.finished {
            reader.iterator = reader.iterator_at(&reader.resume.clone(), false).await?;
        }
        Ok(reader)
    }

    /// Whether the shard was read to its end.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The shard.
    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    async fn iterator_at(
        &self,
        position: &Checkpoint,
        after: bool,
    ) -> Result<Option<String>, ReadError> {
        let mut request =
            self.client.get_shard_iterator().stream_name(&self.stream).shard_id(&self.shard_id);
        request = match position {
            Checkpoint::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Checkpoint::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            Checkpoint::AtTimestamp => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(self.at_timestamp.unwrap_or(SystemTime::UNIX_EPOCH))),
            Checkpoint::Sequence { sequence_number, .. } => request
                .shard_iterator_type(if after {
                    ShardIteratorType::AfterSequenceNumber
                } else {
                    // AT, so that the rest of a partly checkpointed KPL aggregate is re-read;
                    // records at or below the checkpoint are dropped after reading.
                    ShardIteratorType::AtSequenceNumber
                })
                .starting_sequence_number(sequence_number),
            Checkpoint::ShardEnd => return Ok(None),
        };
        let out = request.send().await.map_err(|e| self.error("GetShardIterator", &e))?;
        Ok(out.shard_iterator().map(str::to_owned))
    }

    fn error<E, R>(
        &self,
        operation: &'static str,
        e: &aws_sdk_kinesis::error::SdkError<E, R>,
    ) -> ReadError
    where
        E: aws_sdk_kinesis::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        ReadError::Aws {
            operation,
            stream: self.stream.clone(),
            shard_id: Some(self.shard_id.clone()),
            message: sdk_message(e),
        }
    }

    /// Remembers that everything up to `checkpoint` was processed, so that a restart after an
    /// expired iterator continues after it.
    pub fn processed(&mut self, checkpoint: Checkpoint) {
        if checkpoint > self.resume {
            self.resume = checkpoint;
        }
    }

    /// Fetches the next records. Throttling is retried here with back-off (up to about ten
    /// seconds); an expired iterator is renewed after the last record handed out.
    ///
    /// # Errors
    /// When Kinesis keeps failing.
    pub async fn fetch(&mut self) -> Result<Fetch, ReadError> {
        let Some(iterator) = self.iterator.clone() else {
            self.finished = true;
            return Ok(Fetch { shard_end: Some(Vec::new()), ..Fetch::default() });
        };
        let mut backoff = Duration::from_millis(200);
        let (mut out, decoded) = loop {
            // The records are decoded by `lean_decode` rather than the SDK (about 3× cheaper).
            let decoded = DecodedRecords::default();
            match self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(self.max_records)
                .customize()
                .interceptor(LeanGetRecords::new(decoded.clone()))
                .send()
                .await
            {
                Ok(out) => break (out, decoded.take()),
                Err(e) => {
                    let service = e.as_service_error();
                    if service.is_some_and(|s| s.is_expired_iterator_exception()) {
                        tracing::info!(shard = %self.shard_id, "Shard iterator expired; renewing it.");
                        let resume = self.resume.clone();
                        self.iterator = self.iterator_at(&resume, true).await?;
                        return Ok(Fetch::default());
                    }
                    let throttled = service.is_some_and(|s| {
                        s.is_provisioned_throughput_exceeded_exception()
                            || s.is_kms_throttling_exception()
                    });
                    if backoff > Duration::from_secs(10) {
                        return Err(self.error("GetRecords", &e));
                    }
                    tracing::warn!(shard = %self.shard_id, throttled, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), error = %sdk_message(&e), "GetRecords failed; backing off.");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        };
        // Moved out of the output, not cloned: a clone copied every payload once more.
        let mut records = decoded.unwrap_or_else(|| std::mem::take(&mut out.records));
        records.retain(|r| {
            self.resume.is_before(r.sequence_number(), 0) || self.resume_is_mid_aggregate(r)
        });
        self.iterator = out.next_shard_iterator().map(str::to_owned);
        let shard_end = if self.iterator.is_none() {
            self.finished = true;
            Some(
                out.child_shards()
                    .iter()
                    .map(|c| ChildShard {
                        id: c.shard_id().to_owned(),
                        parents: c.parent_shards().to_vec(),
                        hash_range: c
                            .hash_key_range()
                            .map(|r| {
                                (r.starting_hash_key().to_owned(), r.ending_hash_key().to_owned())
                            })
                            .unwrap_or_default(),
                    })
                    .collect(),
            )
        } else {
            None
        };
        Ok(Fetch { records, millis_behind_latest: out.millis_behind_latest(), shard_end })
    }

    /// The record the checkpoint points into, when the checkpoint is inside a KPL aggregate:
    /// its later user records are still to be processed (the caller filters by sub-sequence).
    fn resume_is_mid_aggregate(&self, record: &Record) -> bool {
        matches!(&self.resume, Checkpoint::Sequence { sequence_number, .. }
            if Checkpoint::after(record.sequence_number(), 0) == Checkpoint::after(sequence_number, 0))
    }
}
