//! `job.properties`: the job's settings in Samza's Java-properties format, parsed once and
//! validated into typed values. Every error names the key, the value's problem and what is
//! accepted; values of `sensitive.*` keys never appear in a message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kinesis_host_runtime::{Limits, Outputs};

/// Why a job's configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read job config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The file is not in Java properties syntax.
    #[error("{path}{}: not valid Java properties syntax: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line, when known.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A value is not acceptable.
    #[error("{path}: {key}={value} is not valid: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The value (redacted for `sensitive.*` keys).
        value: String,
        /// What is wrong and what is accepted.
        problem: String,
    },
    /// A key in one of our namespaces is not known.
    #[error("{path}: unknown key {key}{}; known keys under {prefix}: {known}", suggestion.as_deref().map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The namespace.
        prefix: &'static str,
        /// The nearest known key.
        suggestion: Option<String>,
        /// The known keys.
        known: String,
    },
}

/// How a shard's failed batches are retried, and when the host gives up on records
/// (`task.retry.*`; see [`crate::pipeline`] for how they act together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `task.retry.max.attempts`: calls of one batch (the first included) before its records are
    /// given up on; `Some(1)` = no retry, `None` (`-1`) = no limit.
    pub max_attempts: Option<u32>,
    /// First back-off.
    pub initial_backoff: Duration,
    /// Longest back-off; each failure doubles the previous one up to this.
    pub max_backoff: Duration,
    /// `task.retry.max.record.age.ms`: a failed batch's records older than this (by arrival
    /// time) are not retried but given up on; `None` (`-1`) = no limit.
    pub max_record_age: Option<Duration>,
    /// `task.retry.bisect`: split a failed batch in halves and retry each, down to one record.
    pub bisect: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Some(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_record_age: None,
            bisect: false,
        }
    }
}

impl RetryPolicy {
    /// The back-off after `failures` consecutive failures (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// Whether a batch that failed `failures` times may not be called again.
    pub fn exhausted(&self, failures: u32) -> bool {
        self.max_attempts.is_some_and(|max| failures >= max)
    }
}

/// How records are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Records per `process` call.
    pub max_records: usize,
    /// Bytes (payloads and keys) per `process` call.
    pub max_bytes: usize,
    /// Largest record's data; a larger record is an error.
    pub max_record_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { max_records: 500, max_bytes: 4 << 20, max_record_bytes: 1 << 20 }
    }
}

/// The validated job settings the task runtime needs.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// `job.name`.
    pub job_name: String,
    /// `task.config.<key>` settings, prefix removed, passed to the task's `init`.
    pub task_config: Vec<(String, String)>,
    /// `task.output.<name>`: logical output name → `<system>.<stream>`.
    pub outputs: BTreeMap<String, String>,
    /// `task.limits.*`.
    pub limits: Limits,
    /// `task.batch.*`, `task.record.max.bytes`.
    pub batch: BatchLimits,
    /// `task.retry.*`.
    pub retry: RetryPolicy,
    /// `task.dead.letter.output`: the name of the `task.output.*` that records given up on
    /// (poison records, retries exhausted, too old) are written to; `None`: a poison record is
    /// only logged, and giving up on a record stops its shard.
    pub dead_letter_output: Option<String>,
    /// `metrics.address`: the `host:port` where `run` serves `/metrics`, `/healthz` and
    /// `/readyz`; `None` (absent or empty) serves nothing.
    pub metrics_address: Option<String>,
    /// `task.limits.state.inline.bytes`: largest state snapshot stored in the lease item itself.
    pub state_inline_bytes: usize,
}

/// `task.limits.state.inline.bytes` when the file has none.
pub const DEFAULT_STATE_INLINE_BYTES: usize = 16 << 10;

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            job_name: "replay".to_owned(),
            task_config: Vec::new(),
            outputs: BTreeMap::new(),
            limits: Limits::default(),
            batch: BatchLimits::default(),
            retry: RetryPolicy::default(),
            dead_letter_output: None,
            metrics_address: None,
            state_inline_bytes: DEFAULT_STATE_INLINE_BYTES,
        }
    }
}

/// The largest job.properties read.
pub const MAX_PROPERTIES_BYTES: u64 = 1 << 20;

/// Reads a Java-properties file (a regular file of at most [`MAX_PROPERTIES_BYTES`]) into a
/// sorted map.
///
/// # Errors
/// When the file cannot be read or is not valid properties syntax (with the line).
pub fn read_properties(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let bytes = kinesis_host_runtime::read_regular_file(path, MAX_PROPERTIES_BYTES)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let props = java_properties::read(bytes.as_slice()).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        line: e.line_number(),
        message: e.to_string(),
    })?;
    Ok(props.into_iter().collect())
}

/// Keys under `task.limits.`, with what they set.
const LIMIT_KEYS: &[&str] = &[
    "task.limits.memory.bytes",
    "task.limits.batch.timeout.ms",
    "task.limits.init.timeout.ms",
    "task.limits.emits.per.batch",
    "task.limits.emit.bytes",
    "task.limits.emit.bytes.per.batch",
    "task.limits.state.key.bytes",
    "task.limits.state.value.bytes",
    "task.limits.state.total.bytes",
    "task.limits.state.inline.bytes",
    "task.limits.log.bytes.per.second",
    "task.limits.log.line.bytes",
    "task.limits.metric.names",
    "task.limits.fuel.per.batch",
];
const BATCH_KEYS: &[&str] = &["task.batch.max.records", "task.batch.max.bytes"];
const RETRY_KEYS: &[&str] = &[
    "task.retry.max.attempts",
    "task.retry.backoff.initial.ms",
    "task.retry.backoff.max.ms",
    "task.retry.max.record.age.ms",
    "task.retry.bisect",
];
const DEAD_LETTER_KEYS: &[&str] = &[DEAD_LETTER_OUTPUT];
/// The key naming the dead-letter output.
const DEAD_LETTER_OUTPUT: &str = "task.dead.letter.output";
/// The longest `task.retry.max.record.age.ms`: 365 days, Kinesis's longest retention.
const MAX_RECORD_AGE_MS: u64 = 365 * 24 * 3600 * 1000;

impl JobConfig {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, the key and the problem.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_properties(path, &read_properties(path)?)
    }

    /// Validates parsed properties; `path` is only used in messages.
    ///
    /// # Errors
    /// As [`JobConfig::load`].
    pub fn from_properties(
        path: &Path,
        props: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let p = Props { path, props };
        for (prefix, known) in [
            ("task.limits.", LIMIT_KEYS),
            ("task.batch.", BATCH_KEYS),
            ("task.retry.", RETRY_KEYS),
            ("task.dead.letter.", DEAD_LETTER_KEYS),
        ] {
            p.check_known(prefix, known)?;
        }
        let defaults = Limits::default();
        let limits = Limits {
            memory_bytes: p.number(
                "task.limits.memory.bytes",
                defaults.memory_bytes,
                1 << 20,
                4 << 30,
            )?,
            batch_timeout: p.millis("task.limits.batch.timeout.ms", defaults.batch_timeout)?,
            init_timeout: p.millis("task.limits.init.timeout.ms", defaults.init_timeout)?,
            emits_per_batch: p.number(
                "task.limits.emits.per.batch",
                defaults.emits_per_batch,
                0,
                usize::MAX,
            )?,
            emit_bytes: p.number("task.limits.emit.bytes", defaults.emit_bytes, 1, 10 << 20)?,
            emit_bytes_per_batch: p.number(
                "task.limits.emit.bytes.per.batch",
                defaults.emit_bytes_per_batch,
                1,
                usize::MAX,
            )?,
            state_key_bytes: p.number(
                "task.limits.state.key.bytes",
                defaults.state_key_bytes,
                1,
                1 << 20,
            )?,
            state_value_bytes: p.number(
                "task.limits.state.value.bytes",
                defaults.state_value_bytes,
                0,
                1 << 30,
            )?,
            state_total_bytes: p.number(
                "task.limits.state.total.bytes",
                defaults.state_total_bytes,
                0,
                usize::MAX,
            )?,
            log_bytes_per_second: p.number(
                "task.limits.log.bytes.per.second",
                defaults.log_bytes_per_second,
                0,
                usize::MAX,
            )?,
            log_line_bytes: p.number(
                "task.limits.log.line.bytes",
                defaults.log_line_bytes,
                16,
                1 << 20,
            )?,
            metric_names: p.number(
                "task.limits.metric.names",
                defaults.metric_names,
                0,
                100_000,
            )?,
            fuel_per_batch: match p.props.get("task.limits.fuel.per.batch").map(|v| v.trim()) {
                None | Some("") => None,
                Some(_) => {
                    Some(p.number("task.limits.fuel.per.batch", 0u64, 1_000, u64::MAX / 2)?)
                }
            },
        };
        let batch_defaults = BatchLimits::default();
        let max_record_bytes =
            p.number("task.record.max.bytes", batch_defaults.max_record_bytes, 1, 10 << 20)?;
        let batch = BatchLimits {
            max_records: p.number(
                "task.batch.max.records",
                batch_defaults.max_records,
                1,
                10_000,
            )?,
            max_bytes: p.number("task.batch.max.bytes", batch_defaults.max_bytes, 1024, 1 << 30)?,
            max_record_bytes,
        };
        let retry_defaults = RetryPolicy::default();
        let retry = RetryPolicy {
            max_attempts: p
                .unlimited_or(
                    "task.retry.max.attempts",
                    retry_defaults.max_attempts.map(u64::from),
                    u64::from(u32::MAX),
                    "attempts at one batch, the first included: 1 = no retry",
                )?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            initial_backoff: p
                .millis("task.retry.backoff.initial.ms", retry_defaults.initial_backoff)?,
            max_backoff: p.millis("task.retry.backoff.max.ms", retry_defaults.max_backoff)?,
            max_record_age: p
                .unlimited_or(
                    "task.retry.max.record.age.ms",
                    None,
                    MAX_RECORD_AGE_MS,
                    "milliseconds since the record's arrival in Kinesis",
                )?
                .map(Duration::from_millis),
            bisect: p.boolean("task.retry.bisect", retry_defaults.bisect)?,
        };
        let mut outputs = BTreeMap::new();
        for (key, value) in p.props.range("task.output.".to_owned()..) {
            let Some(name) = key.strip_prefix("task.output.") else { break };
            let valid = value
                .split_once('.')
                .is_some_and(|(sys, stream)| !sys.is_empty() && !stream.is_empty());
            if name.is_empty() || !valid {
                return Err(p.invalid(key, "expected task.output.<name>=<system>.<stream>, such as task.output.alerts=kinesis.alerts"));
            }
            outputs.insert(name.to_owned(), value.trim().to_owned());
        }
        let dead_letter_output = match p.props.get(DEAD_LETTER_OUTPUT).map(|v| v.trim()) {
            None | Some("") => None,
            Some(name) if outputs.contains_key(name) => Some(name.to_owned()),
            Some(_) => {
                let defined = if outputs.is_empty() {
                    "none is defined".to_owned()
                } else {
                    format!(
                        "defined: {}",
                        outputs.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                    )
                };
                return Err(p.invalid(
                    DEAD_LETTER_OUTPUT,
                    format!(
                        "expected the name of an output defined with task.output.<name>=<system>.<stream> ({defined}), such as task.output.dlq=kinesis.orders-dlq with task.dead.letter.output=dlq"
                    ),
                ));
            }
        };
        let task_config = p
            .props
            .range("task.config.".to_owned()..)
            .map_while(|(k, v)| k.strip_prefix("task.config.").map(|k| (k.to_owned(), v.clone())))
            .collect();
        let metrics_address = match p.props.get(METRICS_ADDRESS).map(|v| v.trim()) {
            None | Some("") => None,
            Some(value) => Some(
                listen_address(value)
                    .map_err(|problem| p.invalid(METRICS_ADDRESS, problem))?
                    .to_owned(),
            ),
        };
        let state_inline_bytes = p.number(
            "task.limits.state.inline.bytes",
            DEFAULT_STATE_INLINE_BYTES,
            0,
            kinesis_host_coordinator::state::MAX_INLINE_BYTES,
        )?;
        Ok(Self {
            job_name: p.props.get("job.name").cloned().unwrap_or_else(|| "replay".to_owned()),
            task_config,
            outputs,
            limits,
            batch,
            retry,
            dead_letter_output,
            metrics_address,
            state_inline_bytes,
        })
    }

    /// The output names the task may emit to: any, when the job names none.
    pub fn output_policy(&self) -> Outputs {
        if self.outputs.is_empty() {
            Outputs::Any
        } else {
            Outputs::Only(self.outputs.keys().cloned().collect::<BTreeSet<_>>())
        }
    }
}

/// The key of the address `run` serves metrics and health checks on.
const METRICS_ADDRESS: &str = "metrics.address";

/// Checks that `value` is `host:port`: an IPv4 address, a host name or a bracketed IPv6 address,
/// then a port from 1 to 65535. Returns it unchanged; it is resolved when `run` binds it.
fn listen_address(value: &str) -> Result<&str, String> {
    const EXPECTED: &str = "expected host:port with a port from 1 to 65535, such as 127.0.0.1:9090, 0.0.0.0:9090, localhost:9090 or [::1]:9090";
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(EXPECTED.to_owned());
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        }
    };
    if host_ok && port_ok { Ok(value) } else { Err(EXPECTED.to_owned()) }
}

struct Props<'a> {
    path: &'a Path,
    props: &'a BTreeMap<String, String>,
}

impl Props<'_> {
    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        let value = if key.starts_with("sensitive.") {
            "<redacted>".to_owned()
        } else {
            self.props.get(key).cloned().unwrap_or_default()
        };
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            value,
            problem: problem.into(),
        }
    }

    fn number<T>(&self, key: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(raw) = self.props.get(key) else { return Ok(default) };
        match raw.trim().parse::<T>() {
            Ok(v) if v >= min && v <= max => Ok(v),
            _ => Err(self.invalid(key, format!("expected a whole number from {min} to {max}"))),
        }
    }

    /// A whole number from 1 to `max`, or `-1` for no limit (`None`); `0` is refused, since it
    /// is ambiguous. `what` says what the number counts.
    fn unlimited_or(
        &self,
        key: &str,
        default: Option<u64>,
        max: u64,
        what: &str,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(raw) = self.props.get(key) else { return Ok(default) };
        match raw.trim() {
            "-1" => Ok(None),
            v => match v.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.invalid(
                    key,
                    format!("expected -1 (no limit) or a whole number from 1 to {max} ({what})"),
                )),
            },
        }
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        let Some(raw) = self.props.get(key) else { return Ok(default) };
        match raw.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(self.invalid(key, "expected true or false")),
        }
    }

    fn millis(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let default_ms = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
        self.number(key, default_ms, 1, 24 * 3600 * 1000).map(Duration::from_millis)
    }

    fn check_known(&self, prefix: &'static str, known: &[&str]) -> Result<(), ConfigError> {
        for key in self.props.keys().filter(|k| k.starts_with(prefix)) {
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path: self.path.to_owned(),
                    key: key.clone(),
                    prefix,
                    suggestion: nearest(key, known).map(str::to_owned),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }
}

/// The known key closest to `key` by edit distance, if reasonably close.
pub fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min()
        .filter(|(d, _)| *d <= key.len().max(3) / 3)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<JobConfig, ConfigError> {
        let props = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        JobConfig::from_properties(Path::new("job.properties"), &props)
    }

    #[test]
    fn fuel_is_off_unless_set() {
        assert_eq!(parse(&[]).expect("valid").limits.fuel_per_batch, None);
        assert_eq!(
            parse(&[("task.limits.fuel.per.batch", "")]).expect("valid").limits.fuel_per_batch,
            None
        );
        let config = parse(&[("task.limits.fuel.per.batch", "5000000")]).expect("valid");
        assert_eq!(config.limits.fuel_per_batch, Some(5_000_000));
        let err = parse(&[("task.limits.fuel.per.batch", "10")]).expect_err("too little");
        assert!(err.to_string().contains("task.limits.fuel.per.batch"), "{err}");
    }

    #[test]
    fn defaults_and_task_settings() -> Result<(), ConfigError> {
        let c = parse(&[
            ("job.name", "wc"),
            ("task.config.contains", "ERROR"),
            ("task.config.output", "errors"),
            ("task.output.errors", "kinesis.error-stream"),
        ])?;
        assert_eq!(c.job_name, "wc");
        assert_eq!(
            c.task_config,
            [
                ("contains".to_owned(), "ERROR".to_owned()),
                ("output".to_owned(), "errors".to_owned())
            ]
        );
        assert_eq!(c.outputs.get("errors").map(String::as_str), Some("kinesis.error-stream"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.batch, BatchLimits::default());
        Ok(())
    }

    #[test]
    fn bad_values_name_the_key_and_the_range() {
        let err = parse(&[("task.limits.memory.bytes", "lots")])
            .map(|_| ())
            .expect_err("invalid")
            .to_string();
        assert_eq!(
            err,
            "job.properties: task.limits.memory.bytes=lots is not valid: expected a whole number from 1048576 to 4294967296"
        );
        let err =
            parse(&[("task.batch.max.records", "0")]).map(|_| ()).expect_err("invalid").to_string();
        assert!(err.contains("task.batch.max.records=0"), "{err}");
        let err =
            parse(&[("task.output.x", "nodot")]).map(|_| ()).expect_err("invalid").to_string();
        assert!(err.contains("task.output.<name>=<system>.<stream>"), "{err}");
    }

    #[test]
    fn state_inline_bytes_is_bounded_by_the_lease_item() -> Result<(), ConfigError> {
        assert_eq!(parse(&[])?.state_inline_bytes, DEFAULT_STATE_INLINE_BYTES);
        assert_eq!(parse(&[("task.limits.state.inline.bytes", "0")])?.state_inline_bytes, 0);
        let err = parse(&[("task.limits.state.inline.bytes", "65537")])
            .map(|_| ())
            .expect_err("too large for a lease item")
            .to_string();
        assert!(err.contains("task.limits.state.inline.bytes=65537") && err.contains("65536"));
        Ok(())
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let err = parse(&[("task.limits.memory.byte", "1")])
            .map(|_| ())
            .expect_err("invalid")
            .to_string();
        assert!(err.contains("did you mean task.limits.memory.bytes?"), "{err}");
    }

    #[test]
    fn metrics_address_is_host_and_port() -> Result<(), ConfigError> {
        assert_eq!(parse(&[])?.metrics_address, None);
        assert_eq!(parse(&[("metrics.address", " ")])?.metrics_address, None);
        for good in
            ["127.0.0.1:9090", "0.0.0.0:1", "localhost:65535", "metrics.internal:80", "[::1]:9090"]
        {
            let c = parse(&[("metrics.address", good)])?;
            assert_eq!(c.metrics_address.as_deref(), Some(good));
        }
        assert_eq!(
            parse(&[("metrics.address", " 127.0.0.1:9090 ")])?.metrics_address.as_deref(),
            Some("127.0.0.1:9090")
        );
        for bad in [
            "9090",
            ":9090",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            "::1:9090",
            "[::1]",
            "[nope]:9090",
            "http://127.0.0.1:9090",
            "host name:9090",
            "-bad:9090",
        ] {
            let err = parse(&[("metrics.address", bad)]).map(|_| ()).expect_err(bad).to_string();
            assert_eq!(
                err,
                format!(
                    "job.properties: metrics.address={bad} is not valid: expected host:port with a port from 1 to 65535, such as 127.0.0.1:9090, 0.0.0.0:9090, localhost:9090 or [::1]:9090"
                )
            );
        }
        Ok(())
    }

    #[test]
    fn failure_policy_keys() -> Result<(), ConfigError> {
        let c = parse(&[])?;
        assert_eq!(c.retry, RetryPolicy::default());
        assert_eq!(c.retry.max_attempts, Some(5));
        assert_eq!(c.retry.max_record_age, None);
        assert!(!c.retry.bisect);
        assert_eq!(c.dead_letter_output, None);
        let c = parse(&[
            ("task.retry.max.attempts", "-1"),
            ("task.retry.max.record.age.ms", "60000"),
            ("task.retry.bisect", " TRUE "),
            ("task.output.out", "kinesis.out"),
            ("task.output.dlq", "kinesis.orders-dlq"),
            ("task.dead.letter.output", "dlq"),
        ])?;
        assert_eq!(c.retry.max_attempts, None);
        assert_eq!(c.retry.max_record_age, Some(Duration::from_secs(60)));
        assert!(c.retry.bisect);
        assert_eq!(c.dead_letter_output.as_deref(), Some("dlq"));
        let c = parse(&[("task.retry.max.attempts", "1"), ("task.retry.max.record.age.ms", "-1")])?;
        assert_eq!(c.retry.max_attempts, Some(1));
        assert_eq!(c.retry.max_record_age, None);
        Ok(())
    }

    #[test]
    fn bad_failure_policy_values_name_the_key_and_what_is_accepted() {
        let err =
            |pairs: &[(&str, &str)]| parse(pairs).map(|_| ()).expect_err("invalid").to_string();
        assert_eq!(
            err(&[("task.retry.max.attempts", "0")]),
            "job.properties: task.retry.max.attempts=0 is not valid: expected -1 (no limit) or a whole number from 1 to 4294967295 (attempts at one batch, the first included: 1 = no retry)"
        );
        assert!(err(&[("task.retry.max.attempts", "-2")]).contains("task.retry.max.attempts=-2"));
        assert_eq!(
            err(&[("task.retry.max.record.age.ms", "0")]),
            "job.properties: task.retry.max.record.age.ms=0 is not valid: expected -1 (no limit) or a whole number from 1 to 31536000000 (milliseconds since the record's arrival in Kinesis)"
        );
        assert_eq!(
            err(&[("task.retry.bisect", "yes")]),
            "job.properties: task.retry.bisect=yes is not valid: expected true or false"
        );
        assert_eq!(
            err(&[("task.output.out", "kinesis.out"), ("task.dead.letter.output", "dlq")]),
            "job.properties: task.dead.letter.output=dlq is not valid: expected the name of an output defined with task.output.<name>=<system>.<stream> (defined: out), such as task.output.dlq=kinesis.orders-dlq with task.dead.letter.output=dlq"
        );
        assert!(err(&[("task.dead.letter.output", "kinesis.dlq")]).contains("(none is defined)"),);
        assert!(
            err(&[("task.dead.letter.outpt", "dlq")])
                .contains("did you mean task.dead.letter.output?")
        );
        assert!(err(&[("task.retry.bisekt", "true")]).contains("did you mean task.retry.bisect?"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..RetryPolicy::default()
        };
        let b: Vec<_> = (1..=4).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(b, [100, 200, 350, 350]);
        assert_eq!(p.backoff(200), Duration::from_millis(350));
    }
}
