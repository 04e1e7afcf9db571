//! Enhanced fan-out: reading shards with `SubscribeToShard` through a registered stream
//! consumer, the way KCL 2.x's fan-out consumer does, instead of polling with `GetRecords`.
//!
//! - The consumer is registered once per stream (or found, when it exists or another host
//!   registers it at the same time) and used once it is `ACTIVE`; see [`FanOut::consumer_arn`].
//! - Each held shard gets one subscription at a time. The first one starts at the lease's
//!   checkpoint with `AT_SEQUENCE_NUMBER` (the record at the checkpoint is read again and
//!   dropped, so a checkpoint inside a KPL aggregate resumes with the aggregate's remaining user
//!   records: a sub-sequence number of 0 cannot tell a plain record from an aggregate's first
//!   one), or at the initial position when the shard has no checkpoint. Every later one starts
//!   `AFTER_SEQUENCE_NUMBER` of the last event's continuation sequence number, so no record is
//!   delivered twice or skipped across subscriptions.
//! - A subscription lives five minutes at most; this reader replaces it after the configured
//!   interval (just under that by default) and whenever Kinesis ends it or it fails.
//! - An event without a continuation sequence number is the shard's end; its child shards
//!   (or, when an event names none, the shards that list this one as a parent) go to the same
//!   child-lease logic as polling.
//! - Errors are retried with back-off: `ResourceInUseException` (the previous subscription of
//!   this shard is still alive on the service's side), `LimitExceededException`, throttling,
//!   internal failures and network errors. Others stop the shard on this host.
//!
//! Metrics (through the [`metrics`] facade, labelled with the `stream`):
//! `kinesis_host_efo_subscriptions_total` counts subscriptions that delivered their first
//! event, `kinesis_host_efo_subscription_errors_total` (also labelled `error`:
//! `resource_in_use`, `limit_exceeded`, `throttled`, `other`) the retried failures. Records and
//! `MillisBehindLatest` go through the same processor metrics as polling.
//!
//! [`Source`] is what the worker reads from: either this reader or the polling one, so that
//! de-aggregation, processing and checkpoints are one code path for both.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardOutput;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{
    ConsumerStatus, Record, ShardIteratorType, StartingPosition, SubscribeToShardEventStream,
};
use tokio::sync::Mutex;

use crate::checkpoint::Checkpoint;
use crate::reader::{ChildShard, Fetch, ReadError, ShardReader, list_shards};
use crate::sdk_error::message as sdk_message;

/// A subscription lives at most this long on Kinesis' side.
pub const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a registered consumer may take to become `ACTIVE`.
const CONSUMER_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);
/// A subscription that delivers no event for this long is taken for dead and replaced (Kinesis
/// sends an event at least every few seconds, with or without records).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// `ResourceInUseException` is retried for this long: the previous subscription of the shard
/// ends at the latest when its five minutes are over.
const IN_USE_RETRY_WINDOW: Duration = Duration::from_secs(330);
/// Other retryable failures in a row before the shard stops on this host.
const MAX_RETRIES: u32 = 10;
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why enhanced fan-out failed.
#[derive(Debug, thiserror::Error)]
pub enum EfoError {
    /// Registering or finding the stream consumer failed.
    #[error(
        "enhanced fan-out consumer {consumer} of stream {stream}: {operation} failed: {message} \
         (the host needs kinesis:DescribeStreamSummary, kinesis:DescribeStreamConsumer and \
         kinesis:RegisterStreamConsumer, or an existing consumer in ConsumerArn)"
    )]
    Consumer {
        /// The stream.
        stream: String,
        /// The consumer's name or ARN.
        consumer: String,
        /// The operation that failed.
        operation: &'static str,
        /// The SDK's error.
        message: String,
    },
    /// The consumer did not become `ACTIVE` in time.
    #[error(
        "enhanced fan-out consumer {consumer} of stream {stream} is still {status} after {} s; \
         check it with `aws kinesis describe-stream-consumer`",
        waited.as_secs()
    )]
    NotActive {
        /// The stream.
        stream: String,
        /// The consumer's name or ARN.
        consumer: String,
        /// Its last status.
        status: String,
        /// How long this host waited.
        waited: Duration,
    },
    /// Subscribing to a shard, or reading its events, failed and retrying did not help.
    #[error(
        "SubscribeToShard of stream {stream} shard {shard_id} with consumer {consumer} failed: \
         {message}"
    )]
    Subscribe {
        /// The stream.
        stream: String,
        /// The shard.
        shard_id: String,
        /// The consumer's ARN.
        consumer: String,
        /// The last error.
        message: String,
    },
    /// The polling reader failed (when the source polls), or listing the shards at a shard's
    /// end failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// A stream's enhanced fan-out settings and, once known, its consumer's ARN.
#[derive(Debug)]
pub struct FanOut {
    /// The job reading, for metric labels.
    job: String,
    consumer_name: String,
    consumer_arn: Option<String>,
    resubscribe_interval: Duration,
    /// The consumer's ARN once found (forgotten when Kinesis no longer knows it).
    resolved: Mutex<Option<String>>,
}

impl FanOut {
    /// Fan-out through the consumer `consumer_name` (registered when missing), or through the
    /// existing consumer `consumer_arn` when given; subscriptions are replaced every
    /// `resubscribe_interval` (at most [`SUBSCRIPTION_LIFETIME`]).
    pub fn new(
        consumer_name: impl Into<String>,
        consumer_arn: Option<String>,
        resubscribe_interval: Duration,
    ) -> Self {
        Self {
            job: String::new(),
            consumer_name: consumer_name.into(),
            consumer_arn,
            resubscribe_interval: resubscribe_interval
                .clamp(Duration::from_millis(100), SUBSCRIPTION_LIFETIME),
            resolved: Mutex::new(None),
        }
    }

    /// The same settings, with `job` as the `job` label of the fan-out metrics.
    #[must_use]
    pub fn for_job(self, job: impl Into<String>) -> Self {
        Self { job: job.into(), ..self }
    }

    /// The interval after which a subscription is replaced.
    pub fn resubscribe_interval(&self) -> Duration {
        self.resubscribe_interval
    }

    /// The consumer's ARN, once it is `ACTIVE`: the configured consumer, or the one named
    /// `consumer_name` on `stream`, registered when it does not exist. A registration by
    /// another host at the same time is no error: both use the one consumer. Resolved once;
    /// later calls return the same ARN until [`forget`](Self::forget).
    ///
    /// # Errors
    /// When the consumer cannot be described or registered, or does not become `ACTIVE` within
    /// five minutes.
    pub async fn consumer_arn(&self, client: &Client, stream: &str) -> Result<String, EfoError> {
        let mut resolved = self.resolved.lock().await;
        if let Some(arn) = resolved.as_ref() {
            return Ok(arn.clone());
        }
        let arn = match &self.consumer_arn {
            Some(arn) => wait_active(client, stream, arn).await.map(|()| arn.clone())?,
            None => register(client, stream, &self.consumer_name).await?,
        };
        *resolved = Some(arn.clone());
        Ok(arn)
    }

    /// Forgets `arn` (Kinesis answered that it does not know it: the consumer was
    /// deregistered), so that the next shard to start finds or registers the consumer again.
    pub async fn forget(&self, arn: &str) {
        let mut resolved = self.resolved.lock().await;
        if resolved.as_deref() == Some(arn) {
            tracing::info!(arn, "Enhanced fan-out consumer not found; it is looked up again.");
            *resolved = None;
        }
    }
}

/// Doubles `backoff` up to [`BACKOFF_MAX`], after sleeping it.
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

/// Finds or registers consumer `name` of `stream` and waits until it is `ACTIVE`.
async fn register(client: &Client, stream: &str, name: &str) -> Result<String, EfoError> {
    let fail = |operation, message| EfoError::Consumer {
        stream: stream.to_owned(),
        consumer: name.to_owned(),
        operation,
        message,
    };
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| fail("DescribeStreamSummary", sdk_message(&e)))?;
    let stream_arn = summary
        .stream_description_summary()
        .map(|s| s.stream_arn().to_owned())
        .filter(|arn| !arn.is_empty())
        .ok_or_else(|| fail("DescribeStreamSummary", "the answer has no stream ARN".to_owned()))?;
    let started = Instant::now();
    let mut backoff = BACKOFF_INITIAL;
    let mut status = String::from("missing");
    while started.elapsed() < CONSUMER_ACTIVE_TIMEOUT {
        let described = client
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(name)
            .send()
            .await;
        match described {
            Ok(out) => {
                if let Some(c) = out.consumer_description() {
                    if *c.consumer_status() == ConsumerStatus::Active {
                        tracing::info!(
                            stream,
                            consumer = name,
                            arn = c.consumer_arn(),
                            "Enhanced fan-out consumer is active."
                        );
                        return Ok(c.consumer_arn().to_owned());
                    }
                    status = c.consumer_status().as_str().to_owned();
                    tracing::debug!(
                        stream,
                        consumer = name,
                        status,
                        "Waiting for the consumer to become ACTIVE."
                    );
                }
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {
                let registered = client
                    .register_stream_consumer()
                    .stream_arn(&stream_arn)
                    .consumer_name(name)
                    .send()
                    .await;
                match registered {
                    Ok(_) => {
                        tracing::info!(
                            stream,
                            consumer = name,
                            "Registered the enhanced fan-out consumer."
                        );
                        status = "CREATING".to_owned();
                    }
                    // Registered (or being deleted) by someone else meanwhile: describe again.
                    Err(e)
                        if e.as_service_error().is_some_and(|s| {
                            s.is_resource_in_use_exception() || s.is_limit_exceeded_exception()
                        }) =>
                    {
                        tracing::debug!(stream, consumer = name, error = %sdk_message(&e), "RegisterStreamConsumer refused; describing again.");
                    }
                    Err(e) => return Err(fail("RegisterStreamConsumer", sdk_message(&e))),
                }
            }
            // DescribeStreamConsumer allows 20 calls per second per stream, shared by all hosts.
            Err(e) if e.as_service_error().is_some_and(|s| s.is_limit_exceeded_exception()) => {}
            Err(e) => return Err(fail("DescribeStreamConsumer", sdk_message(&e))),
        }
        back_off(&mut backoff).await;
    }
    Err(EfoError::NotActive {
        stream: stream.to_owned(),
        consumer: name.to_owned(),
        status,
        waited: started.elapsed(),
    })
}

/// Waits until the existing consumer `arn` is `ACTIVE`.
async fn wait_active(client: &Client, stream: &str, arn: &str) -> Result<(), EfoError> {
    let started = Instant::now();
    let mut backoff = BACKOFF_INITIAL;
    let mut status = String::new();
    while started.elapsed() < CONSUMER_ACTIVE_TIMEOUT {
        match client.describe_stream_consumer().consumer_arn(arn).send().await {
            Ok(out) => {
                if let Some(c) = out.consumer_description() {
                    if *c.consumer_status() == ConsumerStatus::Active {
                        tracing::info!(stream, arn, "Enhanced fan-out consumer is active.");
                        return Ok(());
                    }
                    status = c.consumer_status().as_str().to_owned();
                }
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_limit_exceeded_exception()) => {}
            Err(e) => {
                return Err(EfoError::Consumer {
                    stream: stream.to_owned(),
                    consumer: arn.to_owned(),
                    operation: "DescribeStreamConsumer",
                    message: sdk_message(&e),
                });
            }
        }
        back_off(&mut backoff).await;
    }
    Err(EfoError::NotActive {
        stream: stream.to_owned(),
        consumer: arn.to_owned(),
        status,
        waited: started.elapsed(),
    })
}

/// Where the next subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    /// The lease's checkpoint (or initial position): no event received yet.
    Checkpoint(Checkpoint),
    /// After the last event's continuation sequence number.
    After(String),
}

/// A live subscription.
#[derive(Debug)]
struct Subscription {
    output: SubscribeToShardOutput,
    /// When to replace it.
    renew_at: Instant,
    /// Whether an event arrived (an exception may come first instead).
    confirmed: bool,
}

/// How a retryable failure is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    InUse,
    LimitExceeded,
    Throttled,
    Other,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::InUse => "resource_in_use",
            Self::LimitExceeded => "limit_exceeded",
            Self::Throttled => "throttled",
            Self::Other => "other",
        }
    }
}

/// Reads one shard with `SubscribeToShard`.
#[derive(Debug)]
pub struct FanOutReader {
    client: Client,
    fan_out: Arc<FanOut>,
    stream: String,
    shard_id: String,
    consumer_arn: String,
    at_timestamp: Option<SystemTime>,
    position: Position,
    /// Everything at or below this was processed: records up to it are dropped.
    resume: Checkpoint,
    subscription: Option<Subscription>,
    finished: bool,
    /// Whether the last event had no records: the reader is at the tip, or at a closed
    /// shard's end.
    idle: bool,
    /// Retryable failures in a row, and when the first of them happened.
    failures: u32,
    failing_since: Option<Instant>,
    backoff: Duration,
}

impl FanOutReader {
    /// A reader of `shard_id` through `fan_out`'s consumer, whose ARN is `consumer_arn`, from
    /// `checkpoint`. It subscribes at its first [`fetch`](Self::fetch).
    pub fn new(
        client: Client,
        fan_out: Arc<FanOut>,
        consumer_arn: &str,
        stream: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
        at_timestamp: Option<SystemTime>,
    ) -> Self {
        Self {
            client,
            fan_out,
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            consumer_arn: consumer_arn.to_owned(),
            at_timestamp,
            finished: checkpoint == Checkpoint::ShardEnd,
            position: Position::Checkpoint(checkpoint.clone()),
            resume: checkpoint,
            subscription: None,
            idle: false,
            failures: 0,
            failing_since: None,
            backoff: BACKOFF_INITIAL,
        }
    }

    /// Remembers that everything up to `checkpoint` was processed.
    pub fn processed(&mut self, checkpoint: Checkpoint) {
        if checkpoint > self.resume {
            self.resume = checkpoint;
        }
    }

    fn starting_position(&self) -> Option<StartingPosition> {
        let builder = StartingPosition::builder();
        let builder = match &self.position {
            Position::After(sequence_number) => builder
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(sequence_number),
            Position::Checkpoint(checkpoint) => match checkpoint {
                Checkpoint::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
                Checkpoint::Latest => builder.r#type(ShardIteratorType::Latest),
                Checkpoint::AtTimestamp => builder
                    .r#type(ShardIteratorType::AtTimestamp)
                    .timestamp(DateTime::from(self.at_timestamp.unwrap_or(SystemTime::UNIX_EPOCH))),
                Checkpoint::Sequence { sequence_number, .. } => builder
                    .r#type(ShardIteratorType::AtSequenceNumber)
                    .sequence_number(sequence_number),
                Checkpoint::ShardEnd => return None,
            },
        };
        builder.build().ok()
    }

    fn error(&self, message: String) -> EfoError {
        EfoError::Subscribe {
            stream: self.stream.clone(),
            shard_id: self.shard_id.clone(),
            consumer: self.consumer_arn.clone(),
            message,
        }
    }

    /// Counts a retryable failure and backs off; an error once retrying is pointless.
    async fn retry(&mut self, failure: Failure, message: String) -> Result<(), EfoError> {
        self.subscription = None;
        metrics::counter!(
            "kinesis_host_efo_subscription_errors_total",
            "job" => self.fan_out.job.clone(),
            "stream" => self.stream.clone(),
            "error" => failure.label(),
        )
        .increment(1);
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        self.failures += 1;
        let exhausted = match failure {
            Failure::InUse => since.elapsed() > IN_USE_RETRY_WINDOW,
            _ => self.failures > MAX_RETRIES,
        };
        if exhausted {
            return Err(self.error(message));
        }
        let backoff_ms = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX);
        if failure == Failure::InUse && since.elapsed() < Duration::from_secs(10) {
            // Expected for a few seconds after this host replaced a subscription: the service
            // has not yet let go of the previous one.
            tracing::debug!(shard = %self.shard_id, attempt = self.failures, backoff_ms, message, "The previous subscription is still alive; backing off.");
        } else {
            tracing::warn!(shard = %self.shard_id, error = failure.label(), attempt = self.failures, backoff_ms, message, "SubscribeToShard failed; backing off.");
        }
        back_off(&mut self.backoff).await;
        Ok(())
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.failing_since = None;
        self.backoff = BACKOFF_INITIAL;
    }

    async fn subscribe(&mut self) -> Result<(), EfoError> {
        let Some(position) = self.starting_position() else {
            self.finished = true;
            return Ok(());
        };
        let sent = self
            .client
            .subscribe_to_shard()
            .consumer_arn(&self.consumer_arn)
            .shard_id(&self.shard_id)
            .starting_position(position)
            .send()
            .await;
        match sent {
            Ok(output) => {
                self.subscription = Some(Subscription {
                    output,
                    renew_at: Instant::now() + self.fan_out.resubscribe_interval,
                    confirmed: false,
                });
                Ok(())
            }
            Err(e) => {
                let message = sdk_message(&e);
                let failure = match e.as_service_error() {
                    Some(s) if s.is_resource_in_use_exception() => Failure::InUse,
                    Some(s) if s.is_limit_exceeded_exception() => Failure::LimitExceeded,
                    Some(s) if s.is_kms_throttling_exception() => Failure::Throttled,
                    Some(s) if s.is_internal_failure_exception() => Failure::Other,
                    // The consumer or shard is gone, access is denied, the request is wrong:
                    // stop the shard on this host (it is retried later, from the checkpoint).
                    Some(s) => {
                        if s.is_resource_not_found_exception() {
                            self.fan_out.forget(&self.consumer_arn).await;
                        }
                        return Err(self.error(message));
                    }
                    None => Failure::Other,
                };
                self.retry(failure, message).await
            }
        }
    }

    /// The next event's records (those after the processed position), its
    /// `MillisBehindLatest`, and at the shard's end its children. Subscribes and re-subscribes
    /// as needed; an event without records gives an empty [`Fetch`].
    ///
    /// # Errors
    /// When subscribing keeps failing, or fails for a reason retrying cannot fix.
    pub async fn fetch(&mut self) -> Result<Fetch, EfoError> {
        loop {
            if self.finished {
                return Ok(Fetch { shard_end: Some(Vec::new()), ..Fetch::default() });
            }
            let Some(subscription) = &mut self.subscription else {
                if let Some(children) = self.ended().await {
                    self.finished = true;
                    return Ok(Fetch { shard_end: Some(children), ..Fetch::default() });
                }
                self.subscribe().await?;
                continue;
            };
            let renew_at = subscription.renew_at;
            let deadline = renew_at.min(Instant::now() + EVENT_TIMEOUT);
            let received =
                tokio::time::timeout_at(deadline.into(), subscription.output.event_stream.recv())
                    .await;
            match received {
                Err(_elapsed) => {
                    self.subscription = None;
                    if Instant::now() >= renew_at {
                        tracing::debug!(shard = %self.shard_id, "Replacing the subscription before it expires.");
                    } else {
                        let message = format!(
                            "no event for {} s; subscribing again",
                            EVENT_TIMEOUT.as_secs()
                        );
                        self.retry(Failure::Other, message).await?;
                    }
                }
                Ok(Ok(None)) => {
                    tracing::debug!(shard = %self.shard_id, "Kinesis ended the subscription; subscribing again.");
                    self.subscription = None;
                }
                Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)))) => {
                    if !subscription.confirmed {
                        subscription.confirmed = true;
                        metrics::counter!(
                            "kinesis_host_efo_subscriptions_total",
                            "job" => self.fan_out.job.clone(),
                            "stream" => self.stream.clone(),
                        )
                        .increment(1);
                        tracing::debug!(shard = %self.shard_id, position = ?self.position, "Subscribed to shard.");
                    }
                    self.succeeded();
                    self.idle = event.records.is_empty();
                    let shard_end = if event.continuation_sequence_number.is_empty() {
                        // No continuation: the shard is closed and this was its last event.
                        self.finished = true;
                        self.subscription = None;
                        Some(self.children(event.child_shards.unwrap_or_default()).await?)
                    } else {
                        self.position = Position::After(event.continuation_sequence_number);
                        None
                    };
                    let records: Vec<Record> = event
                        .records
                        .into_iter()
                        .filter(|r| {
                            self.resume.is_before(r.sequence_number(), 0)
                                || self.resume_is_mid_aggregate(r)
                        })
                        .collect();
                    tracing::trace!(shard = %self.shard_id, records = records.len(), millis_behind_latest = event.millis_behind_latest, "Event received.");
                    return Ok(Fetch {
                        records,
                        millis_behind_latest: Some(event.millis_behind_latest),
                        shard_end,
                    });
                }
                Ok(Ok(Some(_unknown))) => {}
                Ok(Err(e)) => {
                    let message = sdk_message(&e);
                    let failure = match e.as_service_error() {
                        Some(s) if s.is_resource_in_use_exception() => Failure::InUse,
                        Some(s) if s.is_kms_throttling_exception() => Failure::Throttled,
                        Some(s) if s.is_internal_failure_exception() => Failure::Other,
                        Some(s) => {
                            self.subscription = None;
                            if s.is_resource_not_found_exception() {
                                self.fan_out.forget(&self.consumer_arn).await;
                            }
                            return Err(self.error(message));
                        }
                        None => Failure::Other,
                    };
                    self.retry(failure, message).await?;
                }
            }
        }
    }

    /// Whether the shard has ended after the last event, checked with `GetRecords` before
    /// subscribing again when that event was empty; the children when it has. Kinesis ends a
    /// subscription at a shard's end with an event without continuation; this check is a
    /// safety net for services that do not (kinesis-local keeps sending the last continuation
    /// of a closed shard). It costs one `GetShardIterator` and one `GetRecords` per idle shard
    /// and re-subscription. A failed check counts as "not ended".
    async fn ended(&mut self) -> Option<Vec<ChildShard>> {
        let Position::After(sequence_number) = &self.position else { return None };
        if !std::mem::take(&mut self.idle) {
            return None;
        }
        let iterator = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard_id)
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(sequence_number)
            .send()
            .await
            .map_err(|e| tracing::debug!(shard = %self.shard_id, error = %sdk_message(&e), "Shard end check failed."))
            .ok()?;
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator.shard_iterator()?)
            .limit(1)
            .send()
            .await
            .map_err(|e| tracing::debug!(shard = %self.shard_id, error = %sdk_message(&e), "Shard end check failed."))
            .ok()?;
        if !out.records().is_empty() || out.next_shard_iterator().is_some() {
            return None;
        }
        tracing::debug!(shard = %self.shard_id, "The shard ended (found by GetRecords).");
        self.children(out.child_shards.unwrap_or_default()).await.ok()
    }

    /// The children of this (ended) shard: those the event named, else those `ListShards`
    /// names this shard's children (kinesis-local sends `ChildShards: null`).
    async fn children(
        &self,
        named: Vec<aws_sdk_kinesis::types::ChildShard>,
    ) -> Result<Vec<ChildShard>, EfoError> {
        if !named.is_empty() {
            return Ok(named
                .into_iter()
                .map(|c| ChildShard {
                    hash_range: c
                        .hash_key_range()
                        .map(|r| (r.starting_hash_key().to_owned(), r.ending_hash_key().to_owned()))
                        .unwrap_or_default(),
                    id: c.shard_id,
                    parents: c.parent_shards,
                })
                .collect());
        }
        Ok(list_shards(&self.client, &self.stream)
            .await?
            .into_iter()
            .filter(|s| s.parents.contains(&self.shard_id))
            .map(|s| ChildShard { id: s.id, parents: s.parents, hash_range: s.hash_range })
            .collect())
    }

    /// Whether the checkpoint is inside this record (a KPL aggregate): its later user records
    /// are still to be processed (the worker filters by sub-sequence number).
    fn resume_is_mid_aggregate(&self, record: &Record) -> bool {
        matches!(&self.resume, Checkpoint::Sequence { sequence_number, .. }
            if Checkpoint::after(record.sequence_number(), 0) == Checkpoint::after(sequence_number, 0))
    }
}

/// Where a shard's records come from: polling or enhanced fan-out.
#[derive(Debug)]
pub enum Source {
    /// `GetRecords`.
    Polling(ShardReader),
    /// `SubscribeToShard` (boxed: it holds the live subscription).
    FanOut(Box<FanOutReader>),
}

impl Source {
    /// Opens `shard_id` of `stream` at `checkpoint`: with fan-out through `fan_out`'s consumer
    /// (resolved at the first call), else polling with `max_records` per call.
    ///
    /// # Errors
    /// When the polling iterator cannot be had, or the consumer cannot be found or registered.
    pub async fn open(
        client: Client,
        fan_out: Option<&Arc<FanOut>>,
        stream: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
        at_timestamp: Option<SystemTime>,
        max_records: u32,
    ) -> Result<Self, EfoError> {
        Ok(match fan_out {
            Some(fan_out) => {
                let arn = fan_out.consumer_arn(&client, stream).await?;
                Self::FanOut(Box::new(FanOutReader::new(
                    client,
                    fan_out.clone(),
                    &arn,
                    stream,
                    shard_id,
                    checkpoint,
                    at_timestamp,
                )))
            }
            None => Self::Polling(
                ShardReader::new(client, stream, shard_id, checkpoint, at_timestamp, max_records)
                    .await?,
            ),
        })
    }

    /// Whether this source polls (and so pauses between reads).
    pub fn is_polling(&self) -> bool {
        matches!(self, Self::Polling(_))
    }

    /// The next records; see [`ShardReader::fetch`] and [`FanOutReader::fetch`].
    ///
    /// # Errors
    /// When reading keeps failing.
    pub async fn fetch(&mut self) -> Result<Fetch, EfoError> {
        match self {
            Self::Polling(reader) => Ok(reader.fetch().await?),
            Self::FanOut(reader) => reader.fetch().await,
        }
    }

    /// Remembers that everything up to `checkpoint` was processed.
    pub fn processed(&mut self, checkpoint: Checkpoint) {
        match self {
            Self::Polling(reader) => reader.processed(checkpoint),
            Self::FanOut(reader) => reader.processed(checkpoint),
        }
    }
}
