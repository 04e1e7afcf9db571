//! Errors a task reports to the host, and errors the host reports to the task.

use std::fmt;

use crate::__private::wit::kinesis::task as wit;

/// How the host should react to a failed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A passing problem: the host backs off and delivers the batch again.
    Retryable,
    /// One record can never be processed: the host sets it aside (logging its position) and
    /// goes on with the records after it.
    PoisonRecord,
    /// The task cannot go on: the host stops the shard and reports the error.
    Fatal,
}

/// A failure reported by a task from [`Task::init`](crate::Task::init) or
/// [`Task::process`](crate::Task::process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    kind: ErrorKind,
    record_index: Option<usize>,
    message: String,
}

impl TaskError {
    /// A passing failure: the host retries the batch after a back-off.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Retryable, record_index: None, message: message.into() }
    }

    /// The record at `index` in the batch can never be processed.
    pub fn poison(index: usize, message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::PoisonRecord, record_index: Some(index), message: message.into() }
    }

    /// The task cannot go on; the host stops the shard.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Fatal, record_index: None, message: message.into() }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The index of the record at fault, for [`ErrorKind::PoisonRecord`].
    pub fn record_index(&self) -> Option<usize> {
        self.record_index
    }

    /// The description given by the task.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_wit(self) -> wit::types::TaskError {
        use wit::types::ErrorKind as K;
        wit::types::TaskError {
            kind: match self.kind {
                ErrorKind::Retryable => K::Retryable,
                ErrorKind::PoisonRecord => K::PoisonRecord,
                ErrorKind::Fatal => K::Fatal,
            },
            record_index: self.record_index.map(|i| u32::try_from(i).unwrap_or(u32::MAX)),
            message: self.message,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.record_index) {
            (ErrorKind::PoisonRecord, Some(i)) => write!(f, "poison record {i}: {}", self.message),
            (kind, _) => write!(f, "{kind:?}: {}", self.message),
        }
    }
}

impl std::error::Error for TaskError {}

/// Why the host refused an [`emit`](crate::emit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmitError {
    /// The logical output name is not one of the job's outputs.
    UnknownOutput(String),
    /// The data is larger than the job allows per record (the limit in bytes).
    TooLarge(u32),
    /// The batch already emitted as many records as the job allows.
    QuotaExceeded,
    /// The partition key or explicit hash key is not valid for Kinesis.
    InvalidKey(String),
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOutput(name) => write!(f, "`{name}` is not one of the job's outputs"),
            Self::TooLarge(limit) => write!(f, "record data is over the {limit}-byte limit"),
            Self::QuotaExceeded => f.write_str("the batch emitted as many records as allowed"),
            Self::InvalidKey(why) => write!(f, "invalid key: {why}"),
        }
    }
}

impl std::error::Error for EmitError {}

impl From<wit::output::EmitError> for EmitError {
    fn from(e: wit::output::EmitError) -> Self {
        use wit::output::EmitError as E;
        match e {
            E::UnknownOutput(name) => Self::UnknownOutput(name),
            E::TooLarge(limit) => Self::TooLarge(limit),
            E::QuotaExceeded => Self::QuotaExceeded,
            E::InvalidKey(why) => Self::InvalidKey(why),
        }
    }
}

/// Why the host refused a [`state::set`](crate::state::set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The key or value is larger than the job allows (the limit in bytes).
    TooLarge(u32),
    /// The shard's state already holds as many bytes as the job allows.
    QuotaExceeded,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(limit) => write!(f, "state key or value is over the {limit}-byte limit"),
            Self::QuotaExceeded => f.write_str("the shard's state is full"),
        }
    }
}

impl std::error::Error for StateError {}

impl From<wit::state::StateError> for StateError {
    fn from(e: wit::state::StateError) -> Self {
        use wit::state::StateError as E;
        match e {
            E::TooLarge(limit) => Self::TooLarge(limit),
            E::QuotaExceeded => Self::QuotaExceeded,
        }
    }
}
