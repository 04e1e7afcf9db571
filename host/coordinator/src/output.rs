//! Producing the task's emits to Kinesis with `PutRecords`: requests within the service limits
//! (500 records, 5 MiB), only failed entries retried, with back-off. A request that Kinesis
//! refuses whole because a record in it is invalid is split until the invalid records stand
//! alone: the valid ones are delivered, and the invalid ones are reported, never retried.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

/// Records per `PutRecords` request.
pub const MAX_RECORDS_PER_REQUEST: usize = 500;
/// Bytes (data plus partition keys) per `PutRecords` request.
pub const MAX_BYTES_PER_REQUEST: usize = 5 << 20;

/// A record to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    /// The partition key.
    pub partition_key: String,
    /// The explicit hash key, if any.
    pub explicit_hash_key: Option<String>,
    /// The data.
    pub data: Vec<u8>,
}

impl OutputRecord {
    /// Bytes it holds: data, partition key and explicit hash key.
    pub fn bytes(&self) -> usize {
        self.data.len()
            + self.partition_key.len()
            + self.explicit_hash_key.as_ref().map_or(0, String::len)
    }
}

/// A record that Kinesis refused as invalid (`InvalidArgumentException` or
/// `ValidationException` for a request of that record alone): sending it again cannot succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its index in the records given to [`Producer::send`].
    pub index: usize,
    /// What Kinesis said.
    pub message: String,
}

/// Why records could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// Kinesis kept refusing some records.
    #[error(
        "PutRecords to stream {stream} failed for {failed} records after {attempts} attempts: {message}"
    )]
    Failed {
        /// The stream.
        stream: String,
        /// Records still not written.
        failed: usize,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        message: String,
    },
    /// The request could not be built (a record the SDK refuses).
    #[error("cannot build a PutRecords entry for stream {stream}: {message}")]
    Invalid {
        /// The stream.
        stream: String,
        /// The SDK's message.
        message: String,
    },
}

/// Sends records to one stream.
#[derive(Debug, Clone)]
pub struct Producer {
    client: Client,
    stream: String,
    max_attempts: u32,
}

impl Producer {
    /// A producer for `stream`.
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        Self { client, stream: stream.into(), max_attempts: 8 }
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Sends every record, in order, in as few requests as the limits allow; returns when all
    /// are acknowledged, or refused as invalid. A request's failed entries are retried with
    /// back-off: their order relative to later records of the same partition key in the same
    /// request is then not kept (as with any PutRecords client). A request refused whole as
    /// invalid is split in halves, and each half sent in turn, until the records Kinesis refuses
    /// are alone in their request: those are returned, and every other record is delivered.
    ///
    /// # Errors
    /// When some records still fail after the last attempt.
    pub async fn send(&self, records: &[OutputRecord]) -> Result<Vec<Refused>, ProduceError> {
        let mut refused = Vec::new();
        let mut start = 0;
        while start < records.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < records.len() && end - start < MAX_RECORDS_PER_REQUEST {
                let size = records[end].data.len() + records[end].partition_key.len();
                if end > start && bytes + size > MAX_BYTES_PER_REQUEST {
                    break;
                }
                bytes += size;
                end += 1;
            }
            // Ranges still to send, the next one last.
            let mut ranges = Vec::new();
            ranges.push(start..end);
            while let Some(range) = ranges.pop() {
                match self.send_request(&records[range.clone()]).await? {
                    Sent::All => {}
                    Sent::Invalid(message) if range.len() == 1 => {
                        tracing::debug!(stream = %self.stream, index = range.start, %message, "Kinesis refused a record as invalid.");
                        refused.push(Refused { index: range.start, message });
                    }
                    Sent::Invalid(message) => {
                        tracing::debug!(stream = %self.stream, records = range.len(), %message, "Kinesis refused a request as invalid: sending its halves apart to find the invalid records.");
                        let mid = range.start + range.len() / 2;
                        ranges.push(mid..range.end);
                        ranges.push(range.start..mid);
                    }
                }
            }
            start = end;
        }
        Ok(refused)
    }

    async fn send_request(&self, records: &[OutputRecord]) -> Result<Sent, ProduceError> {
        let mut pending: Vec<&OutputRecord> = records.iter().collect();
        let mut backoff = Duration::from_millis(100);
        let mut last_error = String::new();
        for attempt in 1..=self.max_attempts {
            let entries = pending
                .iter()
                .map(|r| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(r.data.clone()))
                        .partition_key(&r.partition_key)
                        .set_explicit_hash_key(r.explicit_hash_key.clone())
                        .build()
                        .map_err(|e| ProduceError::Invalid {
                            stream: self.stream.clone(),
                            message: e.to_string(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            match self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await
            {
                Ok(out) if out.failed_record_count().unwrap_or(0) == 0 => return Ok(Sent::All),
                Ok(out) => {
                    let results = out.records();
                    let mut still = Vec::new();
                    for (record, result) in pending.iter().zip(results) {
                        if result.error_code().is_some() {
                            last_error = format!(
                                "{}: {}",
                                result.error_code().unwrap_or_default(),
                                result.error_message().unwrap_or_default()
                            );
                            still.push(*record);
                        }
                    }
                    tracing::debug!(stream = %self.stream, failed = still.len(), attempt, "PutRecords partly failed; retrying the failed records.");
                    pending = still;
                }
                // Refused whole before any of its records was written (a retry holds only those
                // not yet written, which Kinesis took as valid before): say so, to be split.
                Err(e) if refused_as_invalid(&e) && pending.len() == records.len() => {
                    return Ok(Sent::Invalid(crate::sdk_error::message(&e)));
                }
                Err(e) => {
                    last_error = crate::sdk_error::message(&e);
                    tracing::warn!(stream = %self.stream, attempt, error = %last_error, "PutRecords failed; retrying.");
                }
            }
            if pending.is_empty() {
                return Ok(Sent::All);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        Err(ProduceError::Failed {
            stream: self.stream.clone(),
            failed: pending.len(),
            attempts: self.max_attempts,
            message: last_error,
        })
    }
}

/// How one request went.
enum Sent {
    /// Every record is acknowledged.
    All,
    /// Kinesis refused the request because of what a record in it holds.
    Invalid(String),
}

/// Whether Kinesis refused a request for its content, so that sending it again cannot succeed:
/// `InvalidArgumentException` (a partition key, hash key or size out of bounds) or a
/// `ValidationException` (a constraint of the API model).
fn refused_as_invalid<R>(
    error: &aws_sdk_kinesis::error::SdkError<
        aws_sdk_kinesis::operation::put_records::PutRecordsError,
        R,
    >,
) -> bool {
    use aws_sdk_kinesis::error::ProvideErrorMetadata;
    error.as_service_error().is_some_and(|e| {
        e.is_invalid_argument_exception() || e.code() == Some("ValidationException")
    })
}
