//! The Samza Kinesis-connector part of `job.properties`: which streams a job reads and writes,
//! how to reach AWS for each, and the KCL settings of each input, validated into a [`RunConfig`].
//! Plain data only; the AWS clients are built from it elsewhere.
//!
//! Settings live at two scopes, and the stream scope wins:
//!
//! | scope  | key                                         |
//! |--------|---------------------------------------------|
//! | system | `systems.<sys>.aws.<setting>`               |
//! | stream | `systems.<sys>.streams.<stream>.aws.<setting>` |
//!
//! `<setting>` is `region`, `accessKey`, `kinesis.endpoint`, `dynamodb.endpoint` (the endpoints
//! are this host's keys, for emulators) or `kcl.<Key>` (a KCL 1.x setter name without `with`).
//! The secret key is read from `sensitive.systems.<sys>[.streams.<stream>].aws.secretKey`.
//! AWS client settings (`systems.<sys>.aws.clientConfig.<Key>`) exist at system scope only.
//!
//! An empty value counts as no value, as in Samza. Unknown keys in these namespaces are warnings
//! (with the nearest known key), never errors; a bad value of a known key is an error naming the
//! key, the value and what is accepted. Values of `sensitive.*` keys appear in neither.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{ConfigError, nearest};

/// The one `systems.<sys>.samza.factory` this host runs.
pub const KINESIS_SYSTEM_FACTORY: &str = "org.apache.samza.system.kinesis.KinesisSystemFactory";
/// The key naming Samza's partition grouper.
pub const GROUPER_KEY: &str = "job.systemstreampartition.grouper.factory";
/// The only grouper Samza's Kinesis connector works with (KCL leases assign the shards).
pub const ALL_SSP_GROUPER_FACTORY: &str =
    "org.apache.samza.container.grouper.stream.AllSspToSingleTaskGrouperFactory";
/// `job.id` when the file has none (Samza's default).
pub const DEFAULT_JOB_ID: &str = "1";
/// `task.commit.ms` when the file has none (Samza's `TaskConfig.DEFAULT_COMMIT_MS`).
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(60_000);
/// Java's `Integer.MAX_VALUE`: the largest value of a KCL `int` setting, and KCL's "no limit".
pub const JAVA_INT_MAX: u32 = 2_147_483_647;
/// The most records one GetRecords call may ask for.
pub const GET_RECORDS_LIMIT: u32 = 10_000;
/// Lease table read and write capacity when provisioned and not configured (KCL's default).
pub const DEFAULT_LEASE_TABLE_CAPACITY: u64 = 10;

/// The longest duration a millisecond setting accepts: one day.
const MAX_MILLIS: u64 = 24 * 3600 * 1000;
const JAVA_LONG_MAX: u64 = i64::MAX.unsigned_abs();

/// Everything needed to run a job against Kinesis, apart from the task's own settings
/// ([`crate::config::JobConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// `job.name`.
    pub job_name: String,
    /// `job.id` (default `1`).
    pub job_id: String,
    /// `task.inputs`, in the order listed, each with its settings.
    pub inputs: Vec<InputStream>,
    /// `task.commit.ms`: how often processed positions are checkpointed.
    pub commit_interval: Duration,
    /// `task.output.<name>=<system>.<stream>`: logical output name → Kinesis stream.
    pub outputs: BTreeMap<String, OutputStream>,
}

/// One stream the job consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputStream {
    /// The Samza system name (`<sys>` in `task.inputs`).
    pub system: String,
    /// The Kinesis stream name.
    pub stream: String,
    /// How to reach AWS for this stream.
    pub aws: AwsSettings,
    /// Lease and polling settings.
    pub kcl: KclSettings,
}

/// One stream the job's task may emit to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputStream {
    /// The Samza system name.
    pub system: String,
    /// The Kinesis stream name.
    pub stream: String,
    /// How to reach AWS for this stream.
    pub aws: AwsSettings,
}

/// How to reach AWS (or an emulator) for one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsSettings {
    /// `aws.region` (or `aws.kcl.RegionName`); `None` leaves it to the standard AWS chain
    /// (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// `aws.accessKey` with `sensitive.….aws.secretKey`; `None` uses the standard credentials
    /// chain.
    pub credentials: Option<StaticCredentials>,
    /// `aws.kinesis.endpoint` (or `aws.kcl.KinesisEndpoint`): an http(s) URL.
    pub kinesis_endpoint: Option<String>,
    /// `aws.dynamodb.endpoint` (or `aws.kcl.DynamoDBEndpoint`): an http(s) URL.
    pub dynamodb_endpoint: Option<String>,
    /// `systems.<sys>.aws.clientConfig.*`, shared by every stream of the system.
    pub client: ClientSettings,
}

/// AWS HTTP client settings; `None` leaves the SDK's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSettings {
    /// `ProxyHost`.
    pub proxy_host: Option<String>,
    /// `ProxyPort` (only with `ProxyHost`).
    pub proxy_port: Option<u16>,
    /// `ConnectionTimeout` (milliseconds).
    pub connection_timeout: Option<Duration>,
    /// `SocketTimeout` (milliseconds): the longest wait for data on an open connection.
    pub socket_timeout: Option<Duration>,
    /// `MaxConnections`.
    pub max_connections: Option<u32>,
}

/// Static AWS credentials from the job's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    /// The access key id (not secret).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Secret,
}

/// A value that must not be shown: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for handing to the AWS SDK; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The KCL settings this host acts on, for one input stream (`aws.kcl.<Key>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KclSettings {
    /// `TableName`: the DynamoDB lease table (default `<job.name>-<job.id>-<stream>`).
    pub table_name: String,
    /// `InitialPositionInStream` (+ `TimestampAtInitialPositionInStream`): where a shard without
    /// a checkpoint starts.
    pub initial_position: InitialPosition,
    /// `MaxRecords`: the GetRecords limit, 1 to 10000.
    pub max_records: u32,
    /// `IdleTimeBetweenReadsInMillis`.
    pub idle_time_between_reads: Duration,
    /// `FailoverTimeMillis`: how long a lease lives without renewal.
    pub failover_time: Duration,
    /// `ShardSyncIntervalMillis`: the pause between shard list syncs.
    pub shard_sync_interval: Duration,
    /// `CallProcessRecordsEvenForEmptyRecordList`.
    pub call_process_records_even_for_empty_list: bool,
    /// `CleanupLeasesUponShardCompletion`: delete leases of finished shards.
    pub cleanup_leases_upon_shard_completion: bool,
    /// `MaxLeasesForWorker` ([`JAVA_INT_MAX`]: no limit).
    pub max_leases_for_worker: u32,
    /// `MaxLeasesToStealAtOneTime`.
    pub max_leases_to_steal_at_one_time: u32,
    /// `ParentShardPollIntervalMillis`: how often a child shard checks that its parents ended.
    pub parent_shard_poll_interval: Duration,
    /// `GracefulLeaseHandoffTimeoutMillis` (KCL 3.x): how long a host stealing a live lease
    /// waits for the owner to hand it over; zero steals at once.
    pub graceful_lease_handoff_timeout: Duration,
    /// `BillingMode` with `InitialLeaseTableReadCapacity` / `InitialLeaseTableWriteCapacity`:
    /// used only when this host creates the lease table.
    pub billing_mode: BillingMode,
    /// `RetrievalMode` with `ConsumerName`, `ConsumerArn` and `ResubscribeIntervalMillis`:
    /// polling (`GetRecords`) or enhanced fan-out (`SubscribeToShard`).
    pub retrieval: Retrieval,
}

impl KclSettings {
    /// The defaults, with the given lease table.
    pub fn with_defaults(table_name: impl Into<String>) -> Self {
        Self {
            table_name: table_name.into(),
            initial_position: InitialPosition::Latest,
            max_records: GET_RECORDS_LIMIT,
            idle_time_between_reads: Duration::from_millis(1000),
            failover_time: Duration::from_millis(10_000),
            shard_sync_interval: Duration::from_millis(60_000),
            call_process_records_even_for_empty_list: true,
            cleanup_leases_upon_shard_completion: true,
            max_leases_for_worker: JAVA_INT_MAX,
            max_leases_to_steal_at_one_time: 1,
            parent_shard_poll_interval: Duration::from_millis(10_000),
            graceful_lease_handoff_timeout: Duration::from_millis(30_000),
            billing_mode: BillingMode::PayPerRequest,
            retrieval: Retrieval::Polling,
        }
    }
}

/// How an input's shards are read (`RetrievalMode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retrieval {
    /// `POLLING`: `GetRecords` (the default).
    Polling,
    /// `FANOUT`: enhanced fan-out, `SubscribeToShard` through a registered stream consumer.
    FanOut {
        /// `ConsumerName` (default `<job.name>-<job.id>`): the consumer registered on the
        /// stream, or found there.
        consumer_name: String,
        /// `ConsumerArn`: an existing consumer to use instead (never registered by this host).
        consumer_arn: Option<String>,
        /// `ResubscribeIntervalMillis`: when a subscription is replaced (Kinesis ends each one
        /// after five minutes).
        resubscribe_interval: Duration,
    },
}

/// Where a shard with no checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    /// After the newest record (`LATEST`).
    Latest,
    /// At the oldest record kept (`TRIM_HORIZON`).
    TrimHorizon,
    /// At the first record that arrived at or after this time (`AT_TIMESTAMP`).
    AtTimestamp(SystemTime),
}

/// How a lease table this host creates is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingMode {
    /// On demand.
    PayPerRequest,
    /// Provisioned capacity units.
    Provisioned {
        /// Read capacity units.
        read: u64,
        /// Write capacity units.
        write: u64,
    },
}

/// KCL settings this host acts on.
const KCL_USED: &[&str] = &[
    "TableName",
    "InitialPositionInStream",
    "TimestampAtInitialPositionInStream",
    "MaxRecords",
    "IdleTimeBetweenReadsInMillis",
    "FailoverTimeMillis",
    "ShardSyncIntervalMillis",
    "CallProcessRecordsEvenForEmptyRecordList",
    "CleanupLeasesUponShardCompletion",
    "MaxLeasesForWorker",
    "MaxLeasesToStealAtOneTime",
    "ParentShardPollIntervalMillis",
    "GracefulLeaseHandoffTimeoutMillis",
    "GracefulLeaseHandoffEnabled",
    "BillingMode",
    "InitialLeaseTableReadCapacity",
    "InitialLeaseTableWriteCapacity",
    "RegionName",
    "KinesisEndpoint",
    "DynamoDBEndpoint",
    "RetrievalMode",
    "ConsumerName",
    "ConsumerArn",
    "ResubscribeIntervalMillis",
];

/// `ResubscribeIntervalMillis` when not set: just under the five minutes a subscription lives,
/// so the host opens the next one before Kinesis ends the current one.
pub const DEFAULT_RESUBSCRIBE_INTERVAL: Duration = Duration::from_millis(290_000);
/// The longest `ResubscribeIntervalMillis`: Kinesis ends a subscription after five minutes.
const MAX_RESUBSCRIBE_MILLIS: u64 = 300_000;
/// Settings that only polling reads.
const POLLING_ONLY: &[&str] = &["MaxRecords", "IdleTimeBetweenReadsInMillis"];
/// Settings that only enhanced fan-out reads.
const FANOUT_ONLY: &[&str] = &["ConsumerName", "ConsumerArn", "ResubscribeIntervalMillis"];

/// The type a KCL setting has in Java, for settings accepted but not acted on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Long,
    Int,
    Bool,
    Text,
}

/// KCL settings that are valid but that this host does not act on (yet): accepted silently,
/// their values checked against their Java type.
const KCL_ACCEPTED: &[(&str, Kind)] = &[
    ("IgnoreUnexpectedChildShards", Kind::Bool),
    ("TaskBackoffTimeMillis", Kind::Long),
    ("MetricsBufferTimeMillis", Kind::Long),
    ("MetricsMaxQueueSize", Kind::Int),
    ("MetricsLevel", Kind::Text),
    ("MetricsEnabledDimensions", Kind::Text),
    ("ValidateSequenceNumberBeforeCheckpointing", Kind::Bool),
    ("SkipShardSyncAtStartupIfLeasesExist", Kind::Bool),
    ("ShardPrioritizationStrategy", Kind::Text),
    ("UserAgent", Kind::Text),
    ("MaxLeaseRenewalThreads", Kind::Int),
    ("ShutdownGraceMillis", Kind::Long),
    ("RetryGetRecordsInSeconds", Kind::Int),
    ("MaxGetRecordsThreadPool", Kind::Int),
    ("DataFetchingStrategy", Kind::Text),
    ("MaxPendingProcessRecordsInput", Kind::Int),
    ("MaxCacheByteSize", Kind::Int),
    ("MaxRecordsCount", Kind::Int),
    ("IdleMillisBetweenCalls", Kind::Long),
    ("LogWarningForTaskAfterMillis", Kind::Long),
    ("ListShardsBackoffTimeInMillis", Kind::Long),
    ("MaxListShardsRetryAttempts", Kind::Int),
    ("LeaseCleanupIntervalMillis", Kind::Long),
    ("CompletedLeaseCleanupThresholdMillis", Kind::Long),
    ("GarbageLeaseCleanupThresholdMillis", Kind::Long),
    ("LeasesRecoveryAuditorExecutionFrequencyMillis", Kind::Long),
    ("LeasesRecoveryAuditorInconsistencyConfidenceThreshold", Kind::Int),
    ("MaxInitializationAttempts", Kind::Int),
];

/// `systems.<sys>.aws.clientConfig.<Key>` settings this host reads.
const CLIENT_KEYS: &[&str] =
    &["ProxyHost", "ProxyPort", "ConnectionTimeout", "SocketTimeout", "MaxConnections"];

/// Settings directly under `aws.` (besides `kcl.*` and `clientConfig.*`).
const AWS_LEAVES: &[&str] = &["region", "accessKey", "kinesis.endpoint", "dynamodb.endpoint"];

const TABLE_RULE: &str = "3 to 255 letters, digits, '_', '-' or '.'";
const STREAM_RULE: &str = "1 to 128 letters, digits, '_', '-' or '.'";
const INPUTS_HELP: &str = "list the Kinesis streams to consume as <system>.<stream>, \
                           comma-separated, such as task.inputs=kinesis.clicks";
const TIMESTAMP_HELP: &str = "epoch milliseconds (such as 1714564800000) or an RFC 3339 time \
                              (such as 2024-05-01T12:00:00Z)";

/// Validates the Samza/KCL keys of a job's properties; `path` is only used in messages.
///
/// Returns the settings and the warnings (ignored keys, each with the nearest known key when
/// there is one close enough), each starting with `path`.
///
/// # Errors
/// A [`ConfigError::Invalid`] naming the key, its value (`<redacted>` for `sensitive.*` keys)
/// and what is accepted.
pub fn parse_run_config(
    path: &Path,
    props: &BTreeMap<String, String>,
) -> Result<(RunConfig, Vec<String>), ConfigError> {
    let mut parser = Parser { path, props, warnings: Vec::new() };
    let config = parser.run_config()?;
    Ok((config, parser.warnings))
}

/// The two places a stream's setting may be, stream scope first.
#[derive(Debug, Clone, Copy)]
struct Scope<'s> {
    system: &'s str,
    stream: &'s str,
}

impl Scope<'_> {
    fn keys(&self, setting: &str) -> [String; 2] {
        let (sys, stream) = (self.system, self.stream);
        [
            format!("systems.{sys}.streams.{stream}.aws.{setting}"),
            format!("systems.{sys}.aws.{setting}"),
        ]
    }

    fn kcl_keys(&self, name: &str) -> [String; 2] {
        self.keys(&format!("kcl.{name}"))
    }

    fn sensitive_keys(&self, setting: &str) -> [String; 2] {
        self.keys(setting).map(|k| format!("sensitive.{k}"))
    }
}

/// Where `InitialPositionInStream` points, before the timestamp is attached.
#[derive(Debug, Clone, Copy)]
enum Start {
    Latest,
    TrimHorizon,
    AtTimestamp,
}

struct Parser<'a> {
    path: &'a Path,
    props: &'a BTreeMap<String, String>,
    warnings: Vec<String>,
}

impl<'a> Parser<'a> {
    /// The value of `key`, if it has a non-blank one.
    fn value(&self, key: &str) -> Option<&'a str> {
        self.props.get(key).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    /// The value of `key` as messages may show it.
    fn shown(&self, key: &str) -> String {
        if key.starts_with("sensitive.") {
            "<redacted>".to_owned()
        } else {
            self.props.get(key).cloned().unwrap_or_default()
        }
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            value: self.shown(key),
            problem: problem.into(),
        }
    }

    fn warn(&mut self, message: String) {
        let message = format!("{}: {message}", self.path.display());
        if !self.warnings.contains(&message) {
            self.warnings.push(message);
        }
    }

    fn required(&self, key: &str, help: &str) -> Result<&'a str, ConfigError> {
        self.value(key).ok_or_else(|| self.invalid(key, format!("not set; {help}")))
    }

    /// Checks the value of every key of `keys` that has one, and returns the first of them
    /// (`keys` are in order of precedence) with its key.
    fn first<T>(
        &self,
        keys: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<(String, T)>, ConfigError> {
        let mut found = None;
        for key in keys {
            if let Some(raw) = self.value(key) {
                let value = parse(raw).map_err(|problem| self.invalid(key, problem))?;
                found = found.or(Some((key.clone(), value)));
            }
        }
        Ok(found)
    }

    /// [`Parser::first`] without the key.
    fn get<T>(
        &self,
        keys: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        Ok(self.first(keys, parse)?.map(|(_, v)| v))
    }

    fn run_config(&mut self) -> Result<RunConfig, ConfigError> {
        let job_name = self
            .required(
                "job.name",
                "a job needs a name to run; it is part of the default lease table name",
            )?
            .trim()
            .to_owned();
        let job_id = self.value("job.id").map_or(DEFAULT_JOB_ID, str::trim).to_owned();
        if let Some(grouper) = self.value(GROUPER_KEY)
            && grouper.trim() != ALL_SSP_GROUPER_FACTORY
        {
            return Err(self.invalid(
                GROUPER_KEY,
                format!(
                    "expected {ALL_SSP_GROUPER_FACTORY} (or no setting): KCL leases, not a Samza \
                     grouper, assign Kinesis shards to workers"
                ),
            ));
        }
        if self.value("task.broadcast.inputs").is_some() {
            return Err(self.invalid(
                "task.broadcast.inputs",
                "Kinesis streams cannot be broadcast inputs; remove this key",
            ));
        }
        let inputs = self.inputs()?;
        let outputs = self.outputs()?;
        for (system, _) in &inputs {
            self.check_factory(system, "task.inputs")?;
        }
        for (name, (system, _)) in &outputs {
            self.check_factory(system, &format!("task.output.{name}"))?;
        }
        for (system, stream) in &inputs {
            let key = format!("systems.{system}.streams.{stream}.samza.bootstrap");
            if self.get(std::slice::from_ref(&key), boolean)? == Some(true) {
                return Err(self.invalid(
                    &key,
                    "Kinesis streams cannot be bootstrap streams; expected false or no setting",
                ));
            }
        }
        let commit_interval = self
            .get(&["task.commit.ms".to_owned()], |v| millis(v, 1, MAX_MILLIS))?
            .unwrap_or(DEFAULT_COMMIT_INTERVAL);

        let mut used: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (system, stream) in inputs.iter().chain(outputs.values()) {
            used.entry(system.as_str()).or_default().insert(stream.as_str());
        }
        self.scan(&used);

        let mut tables: BTreeMap<String, String> = BTreeMap::new();
        let mut input_streams = Vec::with_capacity(inputs.len());
        for (system, stream) in &inputs {
            let scope = Scope { system, stream };
            let aws = self.aws(scope)?;
            let (kcl, table_key) = self.kcl(scope, &job_name, &job_id)?;
            let this = format!("{system}.{stream}");
            if let Some(other) = tables.insert(kcl.table_name.clone(), this.clone()) {
                let key = table_key.unwrap_or_else(|| "task.inputs".to_owned());
                return Err(self.invalid(
                    &key,
                    format!(
                        "inputs {other} and {this} would share the lease table {}; each input \
                         stream needs its own (leases are keyed by shard id, which repeats across \
                         streams): set {} to another name",
                        kcl.table_name,
                        scope.kcl_keys("TableName")[0]
                    ),
                ));
            }
            input_streams.push(InputStream {
                system: system.clone(),
                stream: stream.clone(),
                aws,
                kcl,
            });
        }
        let mut output_streams = BTreeMap::new();
        for (name, (system, stream)) in &outputs {
            let aws = self.aws(Scope { system, stream })?;
            output_streams.insert(
                name.clone(),
                OutputStream { system: system.clone(), stream: stream.clone(), aws },
            );
        }
        Ok(RunConfig {
            job_name,
            job_id,
            inputs: input_streams,
            commit_interval,
            outputs: output_streams,
        })
    }

    /// `task.inputs`, duplicates dropped.
    fn inputs(&mut self) -> Result<Vec<(String, String)>, ConfigError> {
        const KEY: &str = "task.inputs";
        let raw = self.required(KEY, INPUTS_HELP)?;
        let mut inputs: Vec<(String, String)> = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (system, stream) = system_stream(item)
                .map_err(|problem| self.invalid(KEY, format!("{problem}; {INPUTS_HELP}")))?;
            if inputs.contains(&(system.clone(), stream.clone())) {
                self.warn(format!("{KEY} lists {item} more than once; it is consumed once"));
            } else {
                inputs.push((system, stream));
            }
        }
        if inputs.is_empty() {
            return Err(self.invalid(KEY, format!("no stream listed; {INPUTS_HELP}")));
        }
        Ok(inputs)
    }

    /// `task.output.<name>=<system>.<stream>`.
    fn outputs(&self) -> Result<BTreeMap<String, (String, String)>, ConfigError> {
        const PREFIX: &str = "task.output.";
        let mut outputs = BTreeMap::new();
        for (key, raw) in self.props.range(PREFIX.to_owned()..) {
            let Some(name) = key.strip_prefix(PREFIX) else { break };
            let parsed = if name.is_empty() {
                Err("the output has no name".to_owned())
            } else {
                system_stream(raw.trim())
            };
            let stream = parsed.map_err(|problem| {
                self.invalid(
                    key,
                    format!(
                        "{problem}; expected task.output.<name>=<system>.<stream>, such as \
                         task.output.alerts=kinesis.alerts"
                    ),
                )
            })?;
            outputs.insert(name.to_owned(), stream);
        }
        Ok(outputs)
    }

    fn check_factory(&self, system: &str, used_by: &str) -> Result<(), ConfigError> {
        let key = format!("systems.{system}.samza.factory");
        match self.value(&key).map(str::trim) {
            Some(KINESIS_SYSTEM_FACTORY) => Ok(()),
            None => Err(self.invalid(
                &key,
                format!(
                    "not set; {used_by} uses system {system}, which must be defined as a Kinesis \
                     system: {key}={KINESIS_SYSTEM_FACTORY}"
                ),
            )),
            Some(_) => Err(self.invalid(
                &key,
                format!(
                    "expected {KINESIS_SYSTEM_FACTORY}: {used_by} uses system {system}, and this \
                     host reads and writes Kinesis systems only"
                ),
            )),
        }
    }

    /// Warns about every key under the systems in use that this host would ignore.
    fn scan(&mut self, used: &BTreeMap<&str, BTreeSet<&str>>) {
        let props = self.props;
        for (system, streams) in used {
            for sensitive in [false, true] {
                let prefix =
                    format!("{}systems.{system}.", if sensitive { "sensitive." } else { "" });
                for key in props.range(prefix.clone()..).map(|(k, _)| k) {
                    let Some(rest) = key.strip_prefix(prefix.as_str()) else { break };
                    if let Some(setting) = rest.strip_prefix("aws.") {
                        self.check_setting(key, system, setting, sensitive, false);
                    } else if let Some((stream, setting)) =
                        rest.strip_prefix("streams.").and_then(|r| r.split_once(".aws."))
                    {
                        if streams.contains(stream) {
                            self.check_setting(key, system, setting, sensitive, true);
                        } else {
                            let known: Vec<&str> = streams.iter().copied().collect();
                            let hint = nearest(stream, &known)
                                .map(|s| {
                                    let start = key.len() - setting.len() - ".aws.".len();
                                    let end = start - stream.len();
                                    format!(" (did you mean {}{s}{}?)", &key[..end], &key[start..])
                                })
                                .unwrap_or_default();
                            self.warn(format!(
                                "{key} is ignored: stream {stream} is not in task.inputs or any \
                                 task.output.*{hint}"
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Warns if `setting` (the part of `key` after `aws.`) is not one this host reads.
    fn check_setting(
        &mut self,
        key: &str,
        system: &str,
        setting: &str,
        sensitive: bool,
        stream_scope: bool,
    ) {
        let suggest = |name: &str, known: &[&str]| {
            nearest(name, known)
                .map(|s| format!(" (did you mean {}{s}?)", &key[..key.len() - name.len()]))
                .unwrap_or_default()
        };
        if sensitive {
            if setting != "secretKey" {
                let hint = suggest(setting, &["secretKey"]);
                self.warn(format!("{key} is ignored: not a setting this host reads{hint}"));
            }
        } else if let Some(name) = setting.strip_prefix("kcl.") {
            let known: Vec<&str> =
                KCL_USED.iter().copied().chain(KCL_ACCEPTED.iter().map(|(k, _)| *k)).collect();
            if !known.contains(&name) {
                let hint = suggest(name, &known);
                self.warn(format!("{key} is ignored: {name} is not a KCL setting{hint}"));
            }
        } else if let Some(name) = setting.strip_prefix("clientConfig.") {
            if stream_scope {
                self.warn(format!(
                    "{key} is ignored: AWS client settings apply to a whole system; use \
                     systems.{system}.aws.clientConfig.{name}"
                ));
            } else if !CLIENT_KEYS.contains(&name) {
                let hint = suggest(name, CLIENT_KEYS);
                self.warn(format!(
                    "{key} is ignored: {name} is not a supported AWS client setting (supported: \
                     {}){hint}",
                    CLIENT_KEYS.join(", ")
                ));
            }
        } else if setting == "secretKey" {
            self.warn(format!(
                "{key} is ignored: secret keys are read only under the sensitive. prefix, which \
                 keeps them out of logs: sensitive.{key}"
            ));
        } else if !AWS_LEAVES.contains(&setting) {
            let hint = suggest(setting, AWS_LEAVES);
            self.warn(format!("{key} is ignored: not a setting this host reads{hint}"));
        }
    }

    fn aws(&self, scope: Scope<'_>) -> Result<AwsSettings, ConfigError> {
        Ok(AwsSettings {
            region: self.aliased(scope, "region", "RegionName", region)?,
            credentials: self.credentials(scope)?,
            kinesis_endpoint: self.aliased(
                scope,
                "kinesis.endpoint",
                "KinesisEndpoint",
                endpoint,
            )?,
            dynamodb_endpoint: self.aliased(
                scope,
                "dynamodb.endpoint",
                "DynamoDBEndpoint",
                endpoint,
            )?,
            client: self.client(scope.system)?,
        })
    }

    /// A setting that is both `aws.<setting>` and the KCL's `aws.kcl.<name>`: within one scope
    /// the two must agree; the stream scope wins.
    fn aliased(
        &self,
        scope: Scope<'_>,
        setting: &str,
        kcl_name: &str,
        parse: fn(&str) -> Result<String, String>,
    ) -> Result<Option<String>, ConfigError> {
        let plain = scope.keys(setting);
        let kcl = scope.kcl_keys(kcl_name);
        // The KCL's endpoint setters take a bare host name as https.
        let parse_kcl = |raw: &str| {
            let raw = raw.trim();
            if setting.ends_with("endpoint") && !raw.contains("://") {
                parse(&format!("https://{raw}")).map_err(|_| {
                    "expected a host name (https is assumed) or an http:// or https:// URL, \
                     such as http://localhost:4566"
                        .to_owned()
                })
            } else {
                parse(raw)
            }
        };
        let mut found = [None, None];
        for (i, slot) in found.iter_mut().enumerate() {
            let ours = self.first(std::slice::from_ref(&plain[i]), parse)?;
            let theirs = self.first(std::slice::from_ref(&kcl[i]), parse_kcl)?;
            if let (Some((a_key, a)), Some((b_key, b))) = (&ours, &theirs)
                && a != b
            {
                return Err(self.invalid(
                    b_key,
                    format!("conflicts with {a_key}={}; set one of the two", self.shown(a_key)),
                ));
            }
            *slot = ours.or(theirs).map(|(_, v)| v);
        }
        let [stream, system] = found;
        Ok(stream.or(system))
    }

    fn credentials(&self, scope: Scope<'_>) -> Result<Option<StaticCredentials>, ConfigError> {
        let access_keys = scope.keys("accessKey");
        let secret_keys = scope.sensitive_keys("secretKey");
        let access = self.first(&access_keys, word)?;
        let secret = self.first(&secret_keys, word)?;
        match (access, secret) {
            (None, None) => Ok(None),
            (Some((_, access_key_id)), Some((_, secret))) => {
                Ok(Some(StaticCredentials { access_key_id, secret_access_key: Secret(secret) }))
            }
            (Some((key, _)), None) => Err(self.invalid(
                &key,
                format!(
                    "an access key needs its secret key: set {} (or {} for the whole system), or \
                     remove the access key to use the standard AWS credentials chain",
                    secret_keys[0], secret_keys[1]
                ),
            )),
            (None, Some((key, _))) => Err(self.invalid(
                &key,
                format!(
                    "a secret key needs its access key id: set {} (or {} for the whole system), \
                     or remove the secret key to use the standard AWS credentials chain",
                    access_keys[0], access_keys[1]
                ),
            )),
        }
    }

    fn client(&self, system: &str) -> Result<ClientSettings, ConfigError> {
        let key = |name: &str| [format!("systems.{system}.aws.clientConfig.{name}")];
        let proxy_host = self.get(&key("ProxyHost"), proxy_host)?;
        let proxy_port = self.first(&key("ProxyPort"), |v| whole(v, 1, 65_535))?;
        if let Some((port_key, _)) = &proxy_port
            && proxy_host.is_none()
        {
            let [host_key] = key("ProxyHost");
            return Err(self.invalid(port_key, format!("a proxy port needs {host_key}")));
        }
        if proxy_host.is_some() && proxy_port.is_none() {
            let ([host_key], [port_key]) = (key("ProxyHost"), key("ProxyPort"));
            return Err(self.invalid(&host_key, format!("a proxy host needs {port_key}")));
        }
        Ok(ClientSettings {
            proxy_host,
            proxy_port: proxy_port.and_then(|(_, p)| u16::try_from(p).ok()),
            connection_timeout: self
                .get(&key("ConnectionTimeout"), |v| millis(v, 1, MAX_MILLIS))?,
            socket_timeout: self.get(&key("SocketTimeout"), |v| millis(v, 1, MAX_MILLIS))?,
            max_connections: self
                .get(&key("MaxConnections"), |v| whole(v, 1, JAVA_INT_MAX.into()))?
                .map(narrow),
        })
    }

    /// The KCL settings of one input, and the key that named its table (if any).
    fn kcl(
        &mut self,
        scope: Scope<'_>,
        job_name: &str,
        job_id: &str,
    ) -> Result<(KclSettings, Option<String>), ConfigError> {
        for (name, kind) in KCL_ACCEPTED {
            self.get(&scope.kcl_keys(name), |v| kind.check(v))?;
        }
        let (table_name, table_key) = match self.first(&scope.kcl_keys("TableName"), table_name)? {
            Some((key, table)) => (table, Some(key)),
            None => {
                let table = format!("{job_name}-{job_id}-{}", scope.stream);
                if table_name(&table).is_err() {
                    return Err(self.invalid(
                        culprit(job_name, job_id),
                        format!(
                            "the default lease table name of input {}.{}, {table}, is not a \
                             DynamoDB table name ({TABLE_RULE}); change job.name or job.id, or \
                             set {}",
                            scope.system,
                            scope.stream,
                            scope.kcl_keys("TableName")[0]
                        ),
                    ));
                }
                (table, None)
            }
        };
        let mut kcl = KclSettings::with_defaults(table_name);
        kcl.initial_position = self.initial_position(scope)?;
        kcl.billing_mode = self.billing_mode(scope)?;
        let num = |name: &str, min: u64, max: u64| {
            self.get(&scope.kcl_keys(name), |v| whole(v, min, max)).map(|v| v.map(narrow))
        };
        let int_max = u64::from(JAVA_INT_MAX);
        let limit = GET_RECORDS_LIMIT.into();
        kcl.max_records = num("MaxRecords", 1, limit)?.unwrap_or(kcl.max_records);
        kcl.max_leases_for_worker =
            num("MaxLeasesForWorker", 1, int_max)?.unwrap_or(kcl.max_leases_for_worker);
        kcl.max_leases_to_steal_at_one_time = num("MaxLeasesToStealAtOneTime", 1, int_max)?
            .unwrap_or(kcl.max_leases_to_steal_at_one_time);
        let ms =
            |name: &str, min: u64| self.get(&scope.kcl_keys(name), |v| millis(v, min, MAX_MILLIS));
        kcl.idle_time_between_reads =
            ms("IdleTimeBetweenReadsInMillis", 1)?.unwrap_or(kcl.idle_time_between_reads);
        // Leases are renewed every failover/3 - 25 ms, which must stay positive.
        kcl.failover_time = ms("FailoverTimeMillis", 100)?.unwrap_or(kcl.failover_time);
        kcl.shard_sync_interval =
            ms("ShardSyncIntervalMillis", 1)?.unwrap_or(kcl.shard_sync_interval);
        kcl.parent_shard_poll_interval =
            ms("ParentShardPollIntervalMillis", 1)?.unwrap_or(kcl.parent_shard_poll_interval);
        kcl.graceful_lease_handoff_timeout = ms("GracefulLeaseHandoffTimeoutMillis", 0)?
            .unwrap_or(kcl.graceful_lease_handoff_timeout);
        let flag = |name: &str| self.get(&scope.kcl_keys(name), boolean);
        kcl.call_process_records_even_for_empty_list =
            flag("CallProcessRecordsEvenForEmptyRecordList")?
                .unwrap_or(kcl.call_process_records_even_for_empty_list);
        kcl.cleanup_leases_upon_shard_completion = flag("CleanupLeasesUponShardCompletion")?
            .unwrap_or(kcl.cleanup_leases_upon_shard_completion);
        // KCL 3.x's switch: off means a steal takes the lease at once, as KCL 2.x does.
        if flag("GracefulLeaseHandoffEnabled")? == Some(false) {
            kcl.graceful_lease_handoff_timeout = Duration::ZERO;
        }
        kcl.retrieval = self.retrieval(scope, job_name, job_id)?;
        Ok((kcl, table_key))
    }

    /// `RetrievalMode` and the fan-out settings; settings of the mode not in use are warned
    /// about, since they do nothing.
    fn retrieval(
        &mut self,
        scope: Scope<'_>,
        job_name: &str,
        job_id: &str,
    ) -> Result<Retrieval, ConfigError> {
        let fan_out = self.get(&scope.kcl_keys("RetrievalMode"), retrieval_mode)?.unwrap_or(false);
        let name = self.first(&scope.kcl_keys("ConsumerName"), consumer_name)?;
        let arn = self.first(&scope.kcl_keys("ConsumerArn"), |v| consumer_arn(v, scope.stream))?;
        let interval = self.get(&scope.kcl_keys("ResubscribeIntervalMillis"), |v| {
            millis(v, 1000, MAX_RESUBSCRIBE_MILLIS)
        })?;
        let unused = if fan_out { POLLING_ONLY } else { FANOUT_ONLY };
        for setting in unused {
            let set: Vec<String> =
                scope.kcl_keys(setting).into_iter().filter(|k| self.value(k).is_some()).collect();
            for key in set {
                let mode = if fan_out { "FANOUT" } else { "POLLING" };
                self.warn(format!(
                    "{key} is ignored: {setting} does not apply to RetrievalMode {mode}{}",
                    if fan_out { "" } else { " (the default; set RetrievalMode=FANOUT)" }
                ));
            }
        }
        if !fan_out {
            return Ok(Retrieval::Polling);
        }
        if let (Some((name_key, _)), Some((arn_key, _))) = (&name, &arn) {
            self.warn(format!("{name_key} is ignored: {arn_key} names the consumer to use"));
        }
        let consumer_name = match name {
            Some((_, name)) => name,
            None => {
                let name = format!("{job_name}-{job_id}");
                consumer_name(&name).map_err(|problem| {
                    self.invalid(
                        culprit(job_name, job_id),
                        format!(
                            "the default enhanced fan-out consumer name of input {}.{}, {name}, is \
                             not valid ({problem}); change job.name or job.id, or set {}",
                            scope.system,
                            scope.stream,
                            scope.kcl_keys("ConsumerName")[0]
                        ),
                    )
                })?
            }
        };
        Ok(Retrieval::FanOut {
            consumer_name,
            consumer_arn: arn.map(|(_, arn)| arn),
            resubscribe_interval: interval.unwrap_or(DEFAULT_RESUBSCRIBE_INTERVAL),
        })
    }

    fn initial_position(&mut self, scope: Scope<'_>) -> Result<InitialPosition, ConfigError> {
        let start = self.first(&scope.kcl_keys("InitialPositionInStream"), start)?;
        let at = self.first(&scope.kcl_keys("TimestampAtInitialPositionInStream"), timestamp)?;
        match (start, at) {
            (Some((_, Start::AtTimestamp)), Some((at_key, (time, from_millis)))) => {
                if from_millis && time < UNIX_EPOCH + Duration::from_secs(1_000_000_000) {
                    self.warn(format!(
                        "{at_key} is read as milliseconds since 1970, which is before September \
                         2001; if it is in seconds, multiply it by 1000"
                    ));
                }
                Ok(InitialPosition::AtTimestamp(time))
            }
            (Some((start_key, Start::AtTimestamp)), None) => {
                let at_key = start_key
                    .replace("InitialPositionInStream", "TimestampAtInitialPositionInStream");
                Err(self
                    .invalid(&start_key, format!("AT_TIMESTAMP needs {at_key}: {TIMESTAMP_HELP}")))
            }
            (start, at) => {
                if let Some((at_key, _)) = at {
                    self.warn(format!(
                        "{at_key} is ignored: the initial position is not AT_TIMESTAMP (set {}=\
                         AT_TIMESTAMP to use it)",
                        at_key.replace(
                            "TimestampAtInitialPositionInStream",
                            "InitialPositionInStream"
                        )
                    ));
                }
                Ok(match start.map(|(_, s)| s) {
                    Some(Start::TrimHorizon) => InitialPosition::TrimHorizon,
                    _ => InitialPosition::Latest,
                })
            }
        }
    }

    /// `BillingMode` and the capacities. Without `BillingMode`, a capacity setting means
    /// provisioned, as the KCL that Samza runs always provisions the table.
    fn billing_mode(&mut self, scope: Scope<'_>) -> Result<BillingMode, ConfigError> {
        let mode = self.get(&scope.kcl_keys("BillingMode"), billing)?;
        let capacity =
            |name: &str| self.first(&scope.kcl_keys(name), |v| whole(v, 1, JAVA_INT_MAX.into()));
        let read = capacity("InitialLeaseTableReadCapacity")?;
        let write = capacity("InitialLeaseTableWriteCapacity")?;
        let provisioned =
            |read: Option<(String, u64)>, write: Option<(String, u64)>| BillingMode::Provisioned {
                read: read.map_or(DEFAULT_LEASE_TABLE_CAPACITY, |(_, v)| v),
                write: write.map_or(DEFAULT_LEASE_TABLE_CAPACITY, |(_, v)| v),
            };
        match mode {
            Some(true) => Ok(provisioned(read, write)),
            Some(false) => {
                for (key, _) in read.into_iter().chain(write) {
                    self.warn(format!(
                        "{key} is ignored: the lease table's BillingMode is PAY_PER_REQUEST"
                    ));
                }
                Ok(BillingMode::PayPerRequest)
            }
            None if read.is_some() || write.is_some() => Ok(provisioned(read, write)),
            None => Ok(BillingMode::PayPerRequest),
        }
    }
}

impl Kind {
    fn check(self, raw: &str) -> Result<(), String> {
        match self {
            Self::Long => whole(raw, 0, JAVA_LONG_MAX).map(|_| ()),
            Self::Int => whole(raw, 0, JAVA_INT_MAX.into()).map(|_| ()),
            Self::Bool => boolean(raw).map(|_| ()),
            Self::Text => Ok(()),
        }
    }
}

fn narrow(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn whole(raw: &str, min: u64, max: u64) -> Result<u64, String> {
    match raw.trim().parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

fn millis(raw: &str, min: u64, max: u64) -> Result<Duration, String> {
    whole(raw, min, max)
        .map(Duration::from_millis)
        .map_err(|_| format!("expected a whole number of milliseconds from {min} to {max}"))
}

fn boolean(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

/// One word, not trimmed: credentials are used exactly as written.
fn word(raw: &str) -> Result<String, String> {
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("expected a single word without spaces or control characters (look for a trailing \
             space)"
            .to_owned())
    } else {
        Ok(raw.to_owned())
    }
}

fn region(raw: &str) -> Result<String, String> {
    let r = raw.trim();
    let valid = r.starts_with(|c: char| c.is_ascii_lowercase())
        && !r.ends_with('-')
        && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(r.to_owned())
    } else {
        Err("expected an AWS region name such as us-east-1 (lowercase letters, digits and '-')"
            .to_owned())
    }
}

fn endpoint(raw: &str) -> Result<String, String> {
    let url = raw.trim();
    if is_http_url(url) {
        Ok(url.to_owned())
    } else {
        Err("expected an http:// or https:// URL, such as http://localhost:4566".to_owned())
    }
}

fn proxy_host(raw: &str) -> Result<String, String> {
    let host = raw.trim();
    if is_host_name(host) || is_ipv6_literal(host) {
        Ok(host.to_owned())
    } else {
        Err("expected a host name or IP address, with no scheme or port (the port goes in \
             ProxyPort)"
            .to_owned())
    }
}

/// Which of `job.name` and `job.id` to blame for a default name (of a lease table or consumer)
/// that is not valid: the one with a character no AWS name takes, else `job.name` (too long).
fn culprit(job_name: &str, job_id: &str) -> &'static str {
    if !job_id.chars().all(is_name_char) && job_name.chars().all(is_name_char) {
        "job.id"
    } else {
        "job.name"
    }
}

fn table_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if (3..=255).contains(&name.len()) && name.chars().all(is_name_char) {
        Ok(name.to_owned())
    } else {
        Err(format!("expected a DynamoDB table name: {TABLE_RULE}"))
    }
}

fn start(raw: &str) -> Result<Start, String> {
    match raw.trim().to_ascii_uppercase().as_str() {
        "LATEST" => Ok(Start::Latest),
        "TRIM_HORIZON" => Ok(Start::TrimHorizon),
        "AT_TIMESTAMP" => Ok(Start::AtTimestamp),
        _ => Err("expected LATEST, TRIM_HORIZON or AT_TIMESTAMP".to_owned()),
    }
}

/// `true` for enhanced fan-out.
fn retrieval_mode(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_uppercase().as_str() {
        "POLLING" => Ok(false),
        "FANOUT" => Ok(true),
        _ => Err("expected POLLING or FANOUT".to_owned()),
    }
}

/// A stream consumer's name, as Kinesis accepts it.
fn consumer_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if (1..=128).contains(&name.len()) && name.chars().all(is_name_char) {
        Ok(name.to_owned())
    } else {
        Err(format!("expected a stream consumer name: {STREAM_RULE}"))
    }
}

/// A consumer ARN of `stream`:
/// `arn:<partition>:kinesis:<region>:<account>:stream/<stream>/consumer/<name>:<created>`.
fn consumer_arn(raw: &str, stream: &str) -> Result<String, String> {
    let arn = raw.trim();
    let help = format!(
        "expected the ARN of a consumer of stream {stream}, such as \
         arn:aws:kinesis:us-east-1:123456789012:stream/{stream}/consumer/my-consumer:1700000000"
    );
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let resource = match parts.as_slice() {
        ["arn", partition, "kinesis", region, account, resource]
            if !partition.is_empty() && !region.is_empty() && !account.is_empty() =>
        {
            *resource
        }
        _ => return Err(help),
    };
    match resource.strip_prefix("stream/").and_then(|r| r.split_once("/consumer/")) {
        Some((named, consumer)) if named == stream && !consumer.is_empty() => Ok(arn.to_owned()),
        Some((named, _)) if !named.is_empty() && named != stream => {
            Err(format!("the consumer belongs to stream {named}, not to {stream}; {help}"))
        }
        _ => Err(help),
    }
}

/// `true` for provisioned.
fn billing(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_uppercase().as_str() {
        "PAY_PER_REQUEST" => Ok(false),
        "PROVISIONED" => Ok(true),
        _ => Err("expected PAY_PER_REQUEST or PROVISIONED".to_owned()),
    }
}

/// The time, and whether it was given as epoch milliseconds.
fn timestamp(raw: &str) -> Result<(SystemTime, bool), String> {
    let raw = raw.trim();
    let parsed = if raw.bytes().all(|b| b.is_ascii_digit()) {
        raw.parse::<u64>()
            .ok()
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            .map(|t| (t, true))
    } else {
        rfc3339(raw).map(|t| (t, false))
    };
    parsed.ok_or_else(|| format!("expected {TIMESTAMP_HELP}"))
}

/// `<system>.<stream>`, split at the first dot, with a valid Kinesis stream name.
fn system_stream(item: &str) -> Result<(String, String), String> {
    match item.split_once('.') {
        Some((system, stream)) if !system.is_empty() && !stream.is_empty() => {
            if (1..=128).contains(&stream.len()) && stream.chars().all(is_name_char) {
                Ok((system.to_owned(), stream.to_owned()))
            } else {
                Err(format!("{stream} is not a Kinesis stream name ({STREAM_RULE})"))
            }
        }
        _ => Err(format!("{item} is not <system>.<stream>")),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// `[…]` around hex digits, colons and dots.
fn is_ipv6_literal(host: &str) -> bool {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).is_some_and(|inner| {
        inner.contains(':')
            && inner.chars().all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
    })
}

/// `http(s)://host[:port][/path…]`.
fn is_http_url(url: &str) -> bool {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .and_then(|_| url.get(scheme.len()..))
    });
    let Some(rest) = rest else { return false };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    (is_host_name(host) || is_ipv6_literal(host))
        && port.is_none_or(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n > 0)
        })
}

/// An RFC 3339 date-time (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.5+02:00`), from 1970 on.
fn rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let digits = |from: usize, to: usize| -> Option<u32> {
        let part = s.get(from..to)?;
        if part.bytes().all(|c| c.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 7)?, digits(8, 10)?);
    let (hour, minute, second) = (digits(11, 13)?, digits(14, 16)?, digits(17, 19)?);
    let mut i = 19;
    let mut nanos = 0;
    if at(i, b".") {
        let start = i + 1;
        i = start;
        while at(i, b"0123456789") {
            i += 1;
        }
        let count = i - start;
        if !(1..=9).contains(&count) {
            return None;
        }
        nanos = digits(start, i)? * 10u32.pow(u32::try_from(9 - count).ok()?);
    }
    let offset_secs: i64 = match s.get(i..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && at(i + 3, b":") => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = (digits(i + 1, i + 3)?, digits(i + 4, i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * i64::from(h * 3600 + m * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given (proleptic Gregorian) date.
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[(&str, &str)] = &[
        ("job.name", "clicks-job"),
        ("task.inputs", "kinesis.clicks"),
        ("systems.kinesis.samza.factory", KINESIS_SYSTEM_FACTORY),
    ];

    /// `BASE` with `extra` on top (a later pair replaces an earlier one; "" removes a key).
    fn parse(extra: &[(&str, &str)]) -> Result<(RunConfig, Vec<String>), ConfigError> {
        let props =
            BASE.iter().chain(extra).map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        parse_run_config(Path::new("job.properties"), &props)
    }

    fn error(extra: &[(&str, &str)]) -> ConfigError {
        parse(extra).map(|_| ()).expect_err("the config should be rejected")
    }

    fn warnings(extra: &[(&str, &str)]) -> Result<Vec<String>, ConfigError> {
        parse(extra).map(|(_, w)| w)
    }

    fn at(millis: u64) -> InitialPosition {
        InitialPosition::AtTimestamp(UNIX_EPOCH + Duration::from_millis(millis))
    }

    #[test]
    fn the_samza_docs_example_parses() -> Result<(), ConfigError> {
        // The keys of the connector page's examples, with its placeholders filled in.
        let props: BTreeMap<String, String> = [
            ("job.name", "kinesis-hello-samza"),
            ("systems.kinesis-system.samza.factory", KINESIS_SYSTEM_FACTORY),
            (GROUPER_KEY, ALL_SSP_GROUPER_FACTORY),
            ("task.inputs", "kinesis-system.input0"),
            ("systems.kinesis-system.streams.input0.aws.region", "us-west-2"),
            ("systems.kinesis-system.streams.input0.aws.accessKey", "AKIDEXAMPLEACCESSKEY"),
            ("sensitive.systems.kinesis-system.streams.input0.aws.secretKey", "example/Secret+key"),
            ("systems.kinesis-system.streams.input0.aws.kcl.TableName", "my-app-table-name"),
            ("systems.kinesis-system.streams.input0.aws.kcl.InitialPositionInStream", "LATEST"),
            ("systems.kinesis-system.aws.clientConfig.ProxyHost", "my-proxy-host.com"),
            ("systems.kinesis-system.aws.clientConfig.ProxyPort", "3128"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let (config, warnings) = parse_run_config(Path::new("job.properties"), &props)?;
        let expected = RunConfig {
            job_name: "kinesis-hello-samza".to_owned(),
            job_id: "1".to_owned(),
            inputs: vec![InputStream {
                system: "kinesis-system".to_owned(),
                stream: "input0".to_owned(),
                aws: AwsSettings {
                    region: Some("us-west-2".to_owned()),
                    credentials: Some(StaticCredentials {
                        access_key_id: "AKIDEXAMPLEACCESSKEY".to_owned(),
                        secret_access_key: Secret::new("example/Secret+key"),
                    }),
                    kinesis_endpoint: None,
                    dynamodb_endpoint: None,
                    client: ClientSettings {
                        proxy_host: Some("my-proxy-host.com".to_owned()),
                        proxy_port: Some(3128),
                        ..ClientSettings::default()
                    },
                },
                kcl: KclSettings::with_defaults("my-app-table-name"),
            }],
            commit_interval: Duration::from_secs(60),
            outputs: BTreeMap::new(),
        };
        assert_eq!(config, expected);
        assert_eq!(warnings, Vec::<String>::new());
        Ok(())
    }

    #[test]
    fn defaults_and_the_default_table_name() -> Result<(), ConfigError> {
        let (config, warnings) = parse(&[])?;
        assert_eq!(
            config,
            RunConfig {
                job_name: "clicks-job".to_owned(),
                job_id: "1".to_owned(),
                inputs: vec![InputStream {
                    system: "kinesis".to_owned(),
                    stream: "clicks".to_owned(),
                    aws: AwsSettings::default(),
                    kcl: KclSettings::with_defaults("clicks-job-1-clicks"),
                }],
                commit_interval: DEFAULT_COMMIT_INTERVAL,
                outputs: BTreeMap::new(),
            }
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        let kcl = &config.inputs[0].kcl;
        assert_eq!(kcl.initial_position, InitialPosition::Latest);
        assert_eq!(kcl.max_records, 10_000);
        assert_eq!(kcl.idle_time_between_reads, Duration::from_millis(1000));
        assert_eq!(kcl.failover_time, Duration::from_millis(10_000));
        assert_eq!(kcl.shard_sync_interval, Duration::from_millis(60_000));
        assert!(kcl.call_process_records_even_for_empty_list);
        assert!(kcl.cleanup_leases_upon_shard_completion);
        assert_eq!(kcl.max_leases_for_worker, 2_147_483_647);
        assert_eq!(kcl.max_leases_to_steal_at_one_time, 1);
        assert_eq!(kcl.parent_shard_poll_interval, Duration::from_millis(10_000));
        assert_eq!(kcl.billing_mode, BillingMode::PayPerRequest);

        let (config, _) = parse(&[("job.id", "7"), ("task.commit.ms", "5000")])?;
        assert_eq!(config.inputs[0].kcl.table_name, "clicks-job-7-clicks");
        assert_eq!(config.commit_interval, Duration::from_secs(5));
        let (config, _) =
            parse(&[("systems.kinesis.streams.clicks.aws.kcl.TableName", "reset-2")])?;
        assert_eq!(config.inputs[0].kcl.table_name, "reset-2");
        Ok(())
    }

    #[test]
    fn graceful_lease_handoff_timeout_defaults_to_kcl_3s_and_zero_turns_it_off()
    -> Result<(), ConfigError> {
        let (config, _) = parse(&[])?;
        let kcl = &config.inputs[0].kcl;
        assert_eq!(kcl.graceful_lease_handoff_timeout, Duration::from_secs(30));
        let (config, warnings) =
            parse(&[("systems.kinesis.aws.kcl.GracefulLeaseHandoffTimeoutMillis", "0")])?;
        assert_eq!(config.inputs[0].kcl.graceful_lease_handoff_timeout, Duration::ZERO);
        assert!(warnings.is_empty(), "{warnings:?}");
        let (config, warnings) = parse(&[
            ("systems.kinesis.aws.kcl.GracefulLeaseHandoffTimeoutMillis", "5000"),
            ("systems.kinesis.aws.kcl.GracefulLeaseHandoffEnabled", "false"),
        ])?;
        assert_eq!(config.inputs[0].kcl.graceful_lease_handoff_timeout, Duration::ZERO);
        assert!(warnings.is_empty(), "{warnings:?}");
        Ok(())
    }

    #[test]
    fn stream_scope_overrides_system_scope() -> Result<(), ConfigError> {
        let (config, warnings) = parse(&[
            ("task.inputs", "kinesis.a, kinesis.b"),
            ("task.output.alerts", "kinesis.alerts"),
            ("systems.kinesis.aws.region", "us-east-1"),
            ("systems.kinesis.streams.b.aws.region", "eu-west-1"),
            ("systems.kinesis.streams.alerts.aws.kcl.RegionName", "ap-south-1"),
            ("systems.kinesis.aws.accessKey", "AKIDSYSTEM"),
            ("sensitive.systems.kinesis.aws.secretKey", "system-secret"),
            ("systems.kinesis.streams.b.aws.accessKey", "AKIDSTREAM"),
            ("sensitive.systems.kinesis.streams.b.aws.secretKey", "stream-secret"),
            ("systems.kinesis.aws.kinesis.endpoint", "http://localhost:4567"),
            ("systems.kinesis.streams.b.aws.kcl.DynamoDBEndpoint", "localhost:8000"),
            ("systems.kinesis.aws.kcl.MaxRecords", "500"),
            ("systems.kinesis.streams.b.aws.kcl.MaxRecords", "100"),
            ("systems.kinesis.aws.kcl.InitialPositionInStream", "TRIM_HORIZON"),
            ("systems.kinesis.streams.b.aws.kcl.InitialPositionInStream", "latest"),
            ("systems.kinesis.aws.kcl.CallProcessRecordsEvenForEmptyRecordList", "FALSE"),
            ("systems.kinesis.streams.a.aws.kcl.FailoverTimeMillis", "30000"),
            ("systems.kinesis.aws.clientConfig.ConnectionTimeout", "2000"),
        ])?;
        assert!(warnings.is_empty(), "{warnings:?}");
        let [a, b] = &config.inputs[..] else { panic!("two inputs: {:?}", config.inputs) };
        let client = ClientSettings {
            connection_timeout: Some(Duration::from_secs(2)),
            ..ClientSettings::default()
        };
        let system_keys = StaticCredentials {
            access_key_id: "AKIDSYSTEM".to_owned(),
            secret_access_key: Secret::new("system-secret"),
        };
        assert_eq!(
            a.aws,
            AwsSettings {
                region: Some("us-east-1".to_owned()),
                credentials: Some(system_keys.clone()),
                kinesis_endpoint: Some("http://localhost:4567".to_owned()),
                dynamodb_endpoint: None,
                client: client.clone(),
            }
        );
        assert_eq!(
            b.aws,
            AwsSettings {
                region: Some("eu-west-1".to_owned()),
                credentials: Some(StaticCredentials {
                    access_key_id: "AKIDSTREAM".to_owned(),
                    secret_access_key: Secret::new("stream-secret"),
                }),
                kinesis_endpoint: Some("http://localhost:4567".to_owned()),
                dynamodb_endpoint: Some("https://localhost:8000".to_owned()),
                client: client.clone(),
            }
        );
        assert_eq!((a.kcl.max_records, b.kcl.max_records), (500, 100));
        assert_eq!(a.kcl.initial_position, InitialPosition::TrimHorizon);
        assert_eq!(b.kcl.initial_position, InitialPosition::Latest);
        assert!(!a.kcl.call_process_records_even_for_empty_list);
        assert!(!b.kcl.call_process_records_even_for_empty_list);
        assert_eq!(a.kcl.failover_time, Duration::from_secs(30));
        assert_eq!(b.kcl.failover_time, Duration::from_secs(10));
        assert_eq!(
            (a.kcl.table_name.as_str(), b.kcl.table_name.as_str()),
            ("clicks-job-1-a", "clicks-job-1-b")
        );
        let alerts = config.outputs.get("alerts").expect("the alerts output");
        assert_eq!((alerts.system.as_str(), alerts.stream.as_str()), ("kinesis", "alerts"));
        assert_eq!(alerts.aws.region.as_deref(), Some("ap-south-1"));
        assert_eq!(alerts.aws.credentials, Some(system_keys));
        assert_eq!(alerts.aws.client, client);
        Ok(())
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_what_is_accepted() {
        const S: &str = "systems.kinesis.streams.clicks.aws";
        let cases: &[(&[(&str, &str)], String)] = &[
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.MaxRecords", "0")],
                format!(
                    "{S}.kcl.MaxRecords=0 is not valid: expected a whole number from 1 to 10000"
                ),
            ),
            (
                &[("systems.kinesis.aws.kcl.MaxRecords", "10001")],
                "systems.kinesis.aws.kcl.MaxRecords=10001 is not valid: expected a whole number \
                 from 1 to 10000"
                    .to_owned(),
            ),
            (
                // A bad system-scope value is an error even when the stream scope overrides it.
                &[
                    ("systems.kinesis.aws.kcl.MaxLeasesForWorker", "many"),
                    ("systems.kinesis.streams.clicks.aws.kcl.MaxLeasesForWorker", "4"),
                ],
                "systems.kinesis.aws.kcl.MaxLeasesForWorker=many is not valid: expected a whole \
                 number from 1 to 2147483647"
                    .to_owned(),
            ),
            (
                &[(
                    "systems.kinesis.streams.clicks.aws.kcl.CleanupLeasesUponShardCompletion",
                    "yes",
                )],
                format!(
                    "{S}.kcl.CleanupLeasesUponShardCompletion=yes is not valid: expected true or \
                     false"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.FailoverTimeMillis", "50")],
                format!(
                    "{S}.kcl.FailoverTimeMillis=50 is not valid: expected a whole number of \
                     milliseconds from 100 to 86400000"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.IdleTimeBetweenReadsInMillis", "1s")],
                format!(
                    "{S}.kcl.IdleTimeBetweenReadsInMillis=1s is not valid: expected a whole number \
                     of milliseconds from 1 to 86400000"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.InitialPositionInStream", "EARLIEST")],
                format!(
                    "{S}.kcl.InitialPositionInStream=EARLIEST is not valid: expected LATEST, \
                     TRIM_HORIZON or AT_TIMESTAMP"
                ),
            ),
            (
                &[(
                    "systems.kinesis.streams.clicks.aws.kcl.InitialPositionInStream",
                    "AT_TIMESTAMP",
                )],
                format!(
                    "{S}.kcl.InitialPositionInStream=AT_TIMESTAMP is not valid: AT_TIMESTAMP needs \
                     {S}.kcl.TimestampAtInitialPositionInStream: epoch milliseconds (such as \
                     1714564800000) or an RFC 3339 time (such as 2024-05-01T12:00:00Z)"
                ),
            ),
            (
                &[("systems.kinesis.aws.kcl.TimestampAtInitialPositionInStream", "yesterday")],
                "systems.kinesis.aws.kcl.TimestampAtInitialPositionInStream=yesterday is not \
                 valid: expected epoch milliseconds (such as 1714564800000) or an RFC 3339 time \
                 (such as 2024-05-01T12:00:00Z)"
                    .to_owned(),
            ),
            (
                &[(
                    "systems.kinesis.aws.kcl.TimestampAtInitialPositionInStream",
                    "2023-02-29T00:00:00Z",
                )],
                "systems.kinesis.aws.kcl.TimestampAtInitialPositionInStream=2023-02-29T00:00:00Z \
                 is not valid: expected epoch milliseconds (such as 1714564800000) or an RFC 3339 \
                 time (such as 2024-05-01T12:00:00Z)"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.TableName", "ab")],
                format!(
                    "{S}.kcl.TableName=ab is not valid: expected a DynamoDB table name: 3 to 255 \
                     letters, digits, '_', '-' or '.'"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.BillingMode", "ON_DEMAND")],
                format!(
                    "{S}.kcl.BillingMode=ON_DEMAND is not valid: expected PAY_PER_REQUEST or \
                     PROVISIONED"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.InitialLeaseTableReadCapacity", "0")],
                format!(
                    "{S}.kcl.InitialLeaseTableReadCapacity=0 is not valid: expected a whole number \
                     from 1 to 2147483647"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.kcl.TaskBackoffTimeMillis", "soon")],
                format!(
                    "{S}.kcl.TaskBackoffTimeMillis=soon is not valid: expected a whole number from \
                     0 to 9223372036854775807"
                ),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.region", "YOUR-STREAM-REGION")],
                format!(
                    "{S}.region=YOUR-STREAM-REGION is not valid: expected an AWS region name such \
                     as us-east-1 (lowercase letters, digits and '-')"
                ),
            ),
            (
                &[
                    ("systems.kinesis.streams.clicks.aws.region", "us-east-1"),
                    ("systems.kinesis.streams.clicks.aws.kcl.RegionName", "eu-west-1"),
                ],
                format!(
                    "{S}.kcl.RegionName=eu-west-1 is not valid: conflicts with \
                     {S}.region=us-east-1; set one of the two"
                ),
            ),
            (
                &[("systems.kinesis.aws.kinesis.endpoint", "localhost:4566")],
                "systems.kinesis.aws.kinesis.endpoint=localhost:4566 is not valid: expected an \
                 http:// or https:// URL, such as http://localhost:4566"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.aws.kcl.KinesisEndpoint", "bad host:99999")],
                "systems.kinesis.aws.kcl.KinesisEndpoint=bad host:99999 is not valid: expected a \
                 host name (https is assumed) or an http:// or https:// URL, such as \
                 http://localhost:4566"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.streams.clicks.aws.accessKey", "AKID EXAMPLE")],
                format!(
                    "{S}.accessKey=AKID EXAMPLE is not valid: expected a single word without \
                     spaces or control characters (look for a trailing space)"
                ),
            ),
            (
                &[
                    ("systems.kinesis.aws.clientConfig.ProxyHost", "my-proxy-host.com"),
                    ("systems.kinesis.aws.clientConfig.ProxyPort", "my-proxy-port"),
                ],
                "systems.kinesis.aws.clientConfig.ProxyPort=my-proxy-port is not valid: expected \
                 a whole number from 1 to 65535"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.aws.clientConfig.ProxyPort", "3128")],
                "systems.kinesis.aws.clientConfig.ProxyPort=3128 is not valid: a proxy port needs \
                 systems.kinesis.aws.clientConfig.ProxyHost"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.aws.clientConfig.ProxyHost", "http://proxy:3128")],
                "systems.kinesis.aws.clientConfig.ProxyHost=http://proxy:3128 is not valid: \
                 expected a host name or IP address, with no scheme or port (the port goes in \
                 ProxyPort)"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.aws.clientConfig.SocketTimeout", "0")],
                "systems.kinesis.aws.clientConfig.SocketTimeout=0 is not valid: expected a whole \
                 number of milliseconds from 1 to 86400000"
                    .to_owned(),
            ),
            (
                &[("task.commit.ms", "-1")],
                "task.commit.ms=-1 is not valid: expected a whole number of milliseconds from 1 \
                 to 86400000"
                    .to_owned(),
            ),
            (
                &[("job.name", "")],
                "job.name= is not valid: not set; a job needs a name to run; it is part of the \
                 default lease table name"
                    .to_owned(),
            ),
            (
                &[("job.name", "my job")],
                "job.name=my job is not valid: the default lease table name of input \
                 kinesis.clicks, my job-1-clicks, is not a DynamoDB table name (3 to 255 letters, \
                 digits, '_', '-' or '.'); change job.name or job.id, or set \
                 systems.kinesis.streams.clicks.aws.kcl.TableName"
                    .to_owned(),
            ),
            (
                &[("job.id", "1/2")],
                "job.id=1/2 is not valid: the default lease table name of input \
                 kinesis.clicks, clicks-job-1/2-clicks, is not a DynamoDB table name (3 to 255 \
                 letters, digits, '_', '-' or '.'); change job.name or job.id, or set \
                 systems.kinesis.streams.clicks.aws.kcl.TableName"
                    .to_owned(),
            ),
            (
                &[("task.inputs", " , ")],
                "task.inputs= ,  is not valid: no stream listed; list the Kinesis streams to \
                 consume as <system>.<stream>, comma-separated, such as task.inputs=kinesis.clicks"
                    .to_owned(),
            ),
            (
                &[("task.inputs", "clicks")],
                "task.inputs=clicks is not valid: clicks is not <system>.<stream>; list the \
                 Kinesis streams to consume as <system>.<stream>, comma-separated, such as \
                 task.inputs=kinesis.clicks"
                    .to_owned(),
            ),
            (
                &[("task.inputs", "kinesis.bad/name")],
                "task.inputs=kinesis.bad/name is not valid: bad/name is not a Kinesis stream name \
                 (1 to 128 letters, digits, '_', '-' or '.'); list the Kinesis streams to consume \
                 as <system>.<stream>, comma-separated, such as task.inputs=kinesis.clicks"
                    .to_owned(),
            ),
            (
                &[("task.output.alerts", "nodot")],
                "task.output.alerts=nodot is not valid: nodot is not <system>.<stream>; expected \
                 task.output.<name>=<system>.<stream>, such as task.output.alerts=kinesis.alerts"
                    .to_owned(),
            ),
            (
                &[("systems.kinesis.streams.clicks.samza.bootstrap", "true")],
                "systems.kinesis.streams.clicks.samza.bootstrap=true is not valid: Kinesis \
                 streams cannot be bootstrap streams; expected false or no setting"
                    .to_owned(),
            ),
            (
                &[("task.broadcast.inputs", "kinesis.clicks#0")],
                "task.broadcast.inputs=kinesis.clicks#0 is not valid: Kinesis streams cannot be \
                 broadcast inputs; remove this key"
                    .to_owned(),
            ),
            (
                &[
                    ("task.inputs", "kinesis.a,kinesis.b"),
                    ("systems.kinesis.aws.kcl.TableName", "shared"),
                ],
                "systems.kinesis.aws.kcl.TableName=shared is not valid: inputs kinesis.a and \
                 kinesis.b would share the lease table shared; each input stream needs its own \
                 (leases are keyed by shard id, which repeats across streams): set \
                 systems.kinesis.streams.b.aws.kcl.TableName to another name"
                    .to_owned(),
            ),
            (
                &[
                    ("task.inputs", "kinesis.clicks,west.clicks"),
                    ("systems.west.samza.factory", KINESIS_SYSTEM_FACTORY),
                ],
                "task.inputs=kinesis.clicks,west.clicks is not valid: inputs kinesis.clicks and \
                 west.clicks would share the lease table clicks-job-1-clicks; each input stream \
                 needs its own (leases are keyed by shard id, which repeats across streams): set \
                 systems.west.streams.clicks.aws.kcl.TableName to another name"
                    .to_owned(),
            ),
        ];
        for (extra, expected) in cases {
            let err = error(extra).to_string();
            assert_eq!(err, format!("job.properties: {expected}"), "for {extra:?}");
        }
    }

    #[test]
    fn a_bad_grouper_is_an_error() -> Result<(), ConfigError> {
        let err = error(&[(
            GROUPER_KEY,
            "org.apache.samza.container.grouper.stream.GroupByPartitionFactory",
        )]);
        assert_eq!(
            err.to_string(),
            "job.properties: job.systemstreampartition.grouper.factory=\
             org.apache.samza.container.grouper.stream.GroupByPartitionFactory is not valid: \
             expected org.apache.samza.container.grouper.stream.AllSspToSingleTaskGrouperFactory \
             (or no setting): KCL leases, not a Samza grouper, assign Kinesis shards to workers"
        );
        parse(&[(GROUPER_KEY, ALL_SSP_GROUPER_FACTORY)])?;
        Ok(())
    }

    #[test]
    fn every_system_in_use_must_be_a_kinesis_system() {
        let err = error(&[("systems.kinesis.samza.factory", "")]);
        assert_eq!(
            err.to_string(),
            "job.properties: systems.kinesis.samza.factory= is not valid: not set; task.inputs \
             uses system kinesis, which must be defined as a Kinesis system: \
             systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory"
        );
        let err = error(&[
            ("task.output.audit", "kafka.audit"),
            ("systems.kafka.samza.factory", "org.apache.samza.system.kafka.KafkaSystemFactory"),
        ]);
        assert_eq!(
            err.to_string(),
            "job.properties: systems.kafka.samza.factory=\
             org.apache.samza.system.kafka.KafkaSystemFactory is not valid: expected \
             org.apache.samza.system.kinesis.KinesisSystemFactory: task.output.audit uses system \
             kafka, and this host reads and writes Kinesis systems only"
        );
    }

    #[test]
    fn credentials_come_in_pairs() {
        let err = error(&[("systems.kinesis.streams.clicks.aws.accessKey", "AKIDEXAMPLE")]);
        assert_eq!(
            err.to_string(),
            "job.properties: systems.kinesis.streams.clicks.aws.accessKey=AKIDEXAMPLE is not \
             valid: an access key needs its secret key: set \
             sensitive.systems.kinesis.streams.clicks.aws.secretKey (or \
             sensitive.systems.kinesis.aws.secretKey for the whole system), or remove the access \
             key to use the standard AWS credentials chain"
        );
        let err = error(&[("sensitive.systems.kinesis.aws.secretKey", "only-the-secret")]);
        assert_eq!(
            err.to_string(),
            "job.properties: sensitive.systems.kinesis.aws.secretKey=<redacted> is not valid: a \
             secret key needs its access key id: set \
             systems.kinesis.streams.clicks.aws.accessKey (or systems.kinesis.aws.accessKey for \
             the whole system), or remove the secret key to use the standard AWS credentials chain"
        );
    }

    #[test]
    fn sensitive_values_never_appear() -> Result<(), ConfigError> {
        const SECRET: &str = "Zx9-very-secret-Value";
        let padded = format!("{SECRET} ");
        let tabbed = format!("{SECRET}\t");
        let stream_secret = "sensitive.systems.kinesis.streams.clicks.aws.secretKey";
        let access = ("systems.kinesis.streams.clicks.aws.accessKey", "AKIDEXAMPLE");
        let bad: &[&[(&str, &str)]] = &[
            &[access, (stream_secret, &padded)],
            &[access, ("sensitive.systems.kinesis.aws.secretKey", &tabbed)],
            &[(stream_secret, SECRET)],
            &[access, (stream_secret, SECRET), ("systems.kinesis.aws.kcl.MaxRecords", "x")],
        ];
        for extra in bad {
            let err = error(extra);
            for shown in [err.to_string(), format!("{err:?}")] {
                assert!(!shown.contains(SECRET), "{shown}");
            }
        }
        let err = error(&[access, (stream_secret, &padded)]);
        assert!(err.to_string().contains("secretKey=<redacted> is not valid"), "{err}");

        let (config, warnings) = parse(&[
            access,
            (stream_secret, SECRET),
            ("sensitive.systems.kinesis.aws.secretKye", SECRET),
            ("systems.kinesis.aws.secretKey", SECRET),
        ])?;
        let keys = config.inputs[0].aws.credentials.as_ref().expect("static credentials");
        assert_eq!(keys.secret_access_key.expose(), SECRET);
        assert_eq!(keys.secret_access_key.to_string(), "<redacted>");
        assert!(!format!("{config:?}").contains(SECRET));
        assert_eq!(
            warnings,
            [
                "job.properties: systems.kinesis.aws.secretKey is ignored: secret keys are read \
                 only under the sensitive. prefix, which keeps them out of logs: \
                 sensitive.systems.kinesis.aws.secretKey",
                "job.properties: sensitive.systems.kinesis.aws.secretKye is ignored: not a \
                 setting this host reads (did you mean sensitive.systems.kinesis.aws.secretKey?)",
            ]
        );
        assert!(warnings.iter().all(|w| !w.contains(SECRET)));
        Ok(())
    }

    #[test]
    fn retrieval_mode_fanout_with_its_consumer_settings() -> Result<(), ConfigError> {
        const K: &str = "systems.kinesis.aws.kcl";
        const S: &str = "systems.kinesis.streams.clicks.aws.kcl";
        assert_eq!(parse(&[])?.0.inputs[0].kcl.retrieval, Retrieval::Polling);
        let polling = parse(&[(&format!("{K}.RetrievalMode"), "polling")])?;
        assert_eq!(polling.0.inputs[0].kcl.retrieval, Retrieval::Polling);

        // FANOUT: the consumer is named after the job unless ConsumerName says otherwise.
        let (config, warnings) =
            parse(&[(&format!("{K}.RetrievalMode"), "FANOUT"), ("job.id", "7")])?;
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            config.inputs[0].kcl.retrieval,
            Retrieval::FanOut {
                consumer_name: "clicks-job-7".to_owned(),
                consumer_arn: None,
                resubscribe_interval: DEFAULT_RESUBSCRIBE_INTERVAL,
            }
        );
        let arn = "arn:aws:kinesis:us-east-1:123456789012:stream/clicks/consumer/mine:1700000000";
        let (config, warnings) = parse(&[
            (&format!("{K}.RetrievalMode"), "fanout"),
            (&format!("{S}.ConsumerName"), "my-app"),
            (&format!("{S}.ResubscribeIntervalMillis"), "60000"),
        ])?;
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            config.inputs[0].kcl.retrieval,
            Retrieval::FanOut {
                consumer_name: "my-app".to_owned(),
                consumer_arn: None,
                resubscribe_interval: Duration::from_secs(60),
            }
        );
        let (config, warnings) = parse(&[
            (&format!("{K}.RetrievalMode"), "FANOUT"),
            (&format!("{K}.ConsumerName"), "my-app"),
            (&format!("{S}.ConsumerArn"), arn),
            (&format!("{K}.MaxRecords"), "100"),
        ])?;
        assert!(matches!(
            &config.inputs[0].kcl.retrieval,
            Retrieval::FanOut { consumer_arn: Some(a), .. } if a == arn
        ));
        let expected = [
            format!("{K}.MaxRecords is ignored: MaxRecords does not apply to RetrievalMode FANOUT"),
            format!("{K}.ConsumerName is ignored: {S}.ConsumerArn names the consumer to use"),
        ]
        .map(|w| format!("job.properties: {w}"));
        assert_eq!(warnings, expected);

        // Fan-out settings without FANOUT do nothing, and say so.
        let warnings = self::warnings(&[(&format!("{K}.ConsumerName"), "my-app")])?;
        assert_eq!(
            warnings,
            [format!(
                "job.properties: {K}.ConsumerName is ignored: ConsumerName does not apply to \
                 RetrievalMode POLLING (the default; set RetrievalMode=FANOUT)"
            )]
        );
        // A misspelt key gets the nearest one.
        let warnings = self::warnings(&[(&format!("{K}.RetreivalMode"), "FANOUT")])?;
        assert!(
            warnings.iter().any(|w| w.contains(&format!("did you mean {K}.RetrievalMode?"))),
            "{warnings:?}"
        );

        // Bad values name the key, the value and what is accepted.
        let bad = |pairs: &[(&str, &str)], expected: &str| {
            let message = error(pairs).to_string();
            assert!(message.contains(expected), "{message}");
        };
        bad(
            &[(&format!("{K}.RetrievalMode"), "PUSH")],
            "RetrievalMode=PUSH is not valid: expected POLLING or FANOUT",
        );
        bad(
            &[
                (&format!("{K}.RetrievalMode"), "FANOUT"),
                (&format!("{K}.ResubscribeIntervalMillis"), "300001"),
            ],
            "ResubscribeIntervalMillis=300001 is not valid: expected a whole number of milliseconds from 1000 to 300000",
        );
        bad(&[(&format!("{K}.ConsumerName"), "my app")], "expected a stream consumer name");
        bad(
            &[(&format!("{K}.ConsumerArn"), "mine")],
            "expected the ARN of a consumer of stream clicks",
        );
        bad(
            &[(
                &format!("{K}.ConsumerArn"),
                "arn:aws:kinesis:us-east-1:123456789012:stream/orders/consumer/mine:1700000000",
            )],
            "the consumer belongs to stream orders, not to clicks",
        );
        let long = "j".repeat(130);
        bad(
            &[(&format!("{K}.RetrievalMode"), "FANOUT"), ("job.name", &long)],
            &format!(
                "the default enhanced fan-out consumer name of input kinesis.clicks, {long}-1, is \
                 not valid"
            ),
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_warn_with_the_nearest_known_key() -> Result<(), ConfigError> {
        let warnings = warnings(&[
            ("systems.kinesis.streams.clicks.aws.kcl.FailoverTimeMilis", "20000"),
            ("systems.kinesis.aws.kcl.failoverTimeMillis", "20000"),
            ("systems.kinesis.aws.kcl.Nonsense", "1"),
            ("systems.kinesis.aws.clientConfig.ProxyHots", "proxy"),
            ("systems.kinesis.aws.clientConfig.UserAgent", "me"),
            ("systems.kinesis.streams.clicks.aws.clientConfig.MaxConnections", "5"),
            ("systems.kinesis.streams.clikcs.aws.region", "us-east-1"),
            ("systems.kinesis.aws.regoin", "us-east-1"),
            // Not ours to check: other systems and non-AWS Samza keys.
            ("systems.kafka.aws.kcl.Whatever", "1"),
            ("systems.kinesis.samza.msg.serde", "json"),
        ])?;
        let expected = [
            "systems.kinesis.aws.clientConfig.ProxyHots is ignored: ProxyHots is not a supported \
             AWS client setting (supported: ProxyHost, ProxyPort, ConnectionTimeout, \
             SocketTimeout, MaxConnections) (did you mean \
             systems.kinesis.aws.clientConfig.ProxyHost?)",
            "systems.kinesis.aws.clientConfig.UserAgent is ignored: UserAgent is not a supported \
             AWS client setting (supported: ProxyHost, ProxyPort, ConnectionTimeout, \
             SocketTimeout, MaxConnections)",
            "systems.kinesis.aws.kcl.Nonsense is ignored: Nonsense is not a KCL setting",
            "systems.kinesis.aws.kcl.failoverTimeMillis is ignored: failoverTimeMillis is not a \
             KCL setting (did you mean systems.kinesis.aws.kcl.FailoverTimeMillis?)",
            "systems.kinesis.aws.regoin is ignored: not a setting this host reads (did you mean \
             systems.kinesis.aws.region?)",
            "systems.kinesis.streams.clicks.aws.clientConfig.MaxConnections is ignored: AWS \
             client settings apply to a whole system; use \
             systems.kinesis.aws.clientConfig.MaxConnections",
            "systems.kinesis.streams.clicks.aws.kcl.FailoverTimeMilis is ignored: \
             FailoverTimeMilis is not a KCL setting (did you mean \
             systems.kinesis.streams.clicks.aws.kcl.FailoverTimeMillis?)",
            "systems.kinesis.streams.clikcs.aws.region is ignored: stream clikcs is not in \
             task.inputs or any task.output.* (did you mean \
             systems.kinesis.streams.clicks.aws.region?)",
        ]
        .map(|w| format!("job.properties: {w}"));
        assert_eq!(warnings, expected);
        Ok(())
    }

    #[test]
    fn valid_kcl_keys_we_do_not_act_on_are_accepted_silently() -> Result<(), ConfigError> {
        let mut extra: Vec<(String, String)> = KCL_ACCEPTED
            .iter()
            .map(|(name, kind)| {
                let value = match kind {
                    Kind::Bool => "true",
                    Kind::Long | Kind::Int => "500",
                    Kind::Text => "DETAILED",
                };
                (format!("systems.kinesis.aws.kcl.{name}"), value.to_owned())
            })
            .collect();
        extra.push(("systems.kinesis.streams.clicks.aws.kcl.MetricsLevel".into(), "NONE".into()));
        let extra: Vec<(&str, &str)> =
            extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(warnings(&extra)?, Vec::<String>::new());
        Ok(())
    }

    #[test]
    fn at_timestamp_takes_epoch_millis_or_rfc_3339() -> Result<(), ConfigError> {
        const POS: &str = "systems.kinesis.streams.clicks.aws.kcl.InitialPositionInStream";
        const TS: &str =
            "systems.kinesis.streams.clicks.aws.kcl.TimestampAtInitialPositionInStream";
        let position = |extra: &[(&str, &str)]| -> Result<_, ConfigError> {
            let (config, warnings) = parse(extra)?;
            Ok((config.inputs[0].kcl.initial_position, warnings))
        };
        let none = Vec::<String>::new();
        assert_eq!(
            position(&[(POS, "AT_TIMESTAMP"), (TS, "1714564800000")])?,
            (at(1_714_564_800_000), none.clone())
        );
        assert_eq!(
            position(&[(POS, "at_timestamp"), (TS, "2024-05-01T12:00:00Z")])?,
            (at(1_714_564_800_000), none.clone())
        );
        assert_eq!(
            position(&[(POS, "AT_TIMESTAMP"), (TS, "2024-05-01T14:00:00.25+02:00")])?,
            (at(1_714_564_800_250), none.clone())
        );
        // System-scope position, stream-scope time.
        assert_eq!(
            position(&[
                ("systems.kinesis.aws.kcl.InitialPositionInStream", "AT_TIMESTAMP"),
                (TS, "2024-05-01 07:00:00-05:00"),
            ])?,
            (at(1_714_564_800_000), none)
        );
        let (start, warnings) = position(&[(POS, "AT_TIMESTAMP"), (TS, "1714564800")])?;
        assert_eq!(start, at(1_714_564_800));
        assert_eq!(
            warnings,
            [format!(
                "job.properties: {TS} is read as milliseconds since 1970, which is before \
                 September 2001; if it is in seconds, multiply it by 1000"
            )]
        );
        let (start, warnings) = position(&[(TS, "1714564800000")])?;
        assert_eq!(start, InitialPosition::Latest);
        assert_eq!(
            warnings,
            [format!(
                "job.properties: {TS} is ignored: the initial position is not AT_TIMESTAMP (set \
                 {POS}=AT_TIMESTAMP to use it)"
            )]
        );
        Ok(())
    }

    #[test]
    fn billing_follows_the_capacity_keys() -> Result<(), ConfigError> {
        const K: &str = "systems.kinesis.streams.clicks.aws.kcl";
        let billing = |extra: &[(&str, &str)]| -> Result<_, ConfigError> {
            let (config, warnings) = parse(extra)?;
            Ok((config.inputs[0].kcl.billing_mode, warnings))
        };
        let read = format!("{K}.InitialLeaseTableReadCapacity");
        let mode = format!("{K}.BillingMode");
        assert_eq!(
            billing(&[(&mode, "provisioned")])?.0,
            BillingMode::Provisioned { read: 10, write: 10 }
        );
        assert_eq!(billing(&[(&read, "25")])?.0, BillingMode::Provisioned { read: 25, write: 10 });
        let (mode, warnings) = billing(&[(&mode, "PAY_PER_REQUEST"), (&read, "25")])?;
        assert_eq!(mode, BillingMode::PayPerRequest);
        assert_eq!(
            warnings,
            [format!(
                "job.properties: {read} is ignored: the lease table's BillingMode is \
                 PAY_PER_REQUEST"
            )]
        );
        Ok(())
    }

    #[test]
    fn duplicate_inputs_are_consumed_once() -> Result<(), ConfigError> {
        let (config, warnings) = parse(&[("task.inputs", "kinesis.clicks,kinesis.clicks,")])?;
        assert_eq!(config.inputs.len(), 1);
        assert_eq!(
            warnings,
            ["job.properties: task.inputs lists kinesis.clicks more than once; it is consumed \
                 once"]
        );
        Ok(())
    }

    #[test]
    fn rfc_3339_times() {
        let secs = |s: &str| rfc3339(s).and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        assert_eq!(secs("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(secs("2000-02-29T00:00:00Z"), Some(Duration::from_secs(951_782_400)));
        assert_eq!(
            secs("2024-12-31T23:59:59.123456789z"),
            Some(Duration::new(1_735_689_599, 123_456_789))
        );
        assert_eq!(secs("2024-01-01T00:30:00+00:30"), Some(Duration::from_secs(1_704_067_200)));
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+2:00",
            "2024-05-01T12:00:00+02:60",
            "1969-12-31T23:59:59Z",
            "2024-5-1T12:00:00Z",
            "2024-05-01T12:00:00.1234567890Z",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoint_urls() {
        for good in [
            "http://localhost:4566",
            "https://kinesis.us-east-1.amazonaws.com",
            "http://127.0.0.1:4567/",
            "http://[::1]:4566",
            "HTTP://LOCALHOST",
        ] {
            assert!(is_http_url(good), "{good}");
        }
        for bad in [
            "localhost:4566",
            "ftp://host",
            "http://",
            "http://:80",
            "http://host:0",
            "http://host:99999",
            "http://host:+80",
            "http://a b",
            "http://user@host",
            "http://[::1",
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }
}
