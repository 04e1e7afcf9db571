//! Errors of the task runtime.

use std::path::PathBuf;

/// A boxed error from wasmtime or the file system, kept as the `source` of our errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a component could not be loaded or instantiated.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read task component {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The file does not start with the WebAssembly magic number.
    #[error(
        "{path} is not a WebAssembly file (it does not start with \\0asm); build the task with `cargo build --target wasm32-wasip2`"
    )]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// The file is a core WebAssembly module, not a component.
    #[error(
        "{path} is a core WebAssembly module, not a component; build it for the wasm32-wasip2 target (not wasm32-unknown-unknown or wasm32-wasip1)"
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    /// wasmtime could not compile the component.
    #[error("cannot compile {path}: {source}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// wasmtime's error.
        source: BoxError,
    },
    /// The component does not export what a task must.
    #[error(
        "{path} is not a kinesis-host task: it does not export {missing}; it exports [{exports}]. Export a type implementing kinesis_task::Task with kinesis_task::export_task!"
    )]
    MissingExport {
        /// The file.
        path: PathBuf,
        /// What is missing, such as `kinesis:task/task@0.1.0#process`.
        missing: String,
        /// What the component does export.
        exports: String,
    },
    /// The component imports something the host does not provide.
    #[error(
        "{path} cannot run in kinesis-host: {source}. A task may import only the kinesis:task interfaces and WASI 0.2"
    )]
    Link {
        /// The file.
        path: PathBuf,
        /// wasmtime's error, naming the import.
        source: BoxError,
    },
    /// The component's exports have the wrong types (built against another WIT version).
    #[error(
        "{path} does not match the kinesis:task@0.1.0 world: {source}. Rebuild it against this version of the kinesis-task SDK"
    )]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// wasmtime's error.
        source: BoxError,
    },
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The wasmtime engine could not be configured.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(BoxError),
    /// The host's imports could not be linked.
    #[error("cannot link the host's imports: {0}")]
    Linker(BoxError),
    /// The epoch ticker thread could not start.
    #[error("cannot start the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
}

/// What kind of trap ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// The call ran past its CPU deadline, or burned its fuel (`task.limits.fuel.per.batch`).
    Deadline,
    /// The instance tried to grow its memory past the limit.
    MemoryLimit,
    /// The guest panicked or hit `unreachable`.
    Panic,
    /// The guest overflowed its stack.
    StackOverflow,
    /// Any other trap.
    Other,
}

impl std::fmt::Display for TrapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrapKind::Deadline => "ran past its CPU deadline (or fuel budget)",
            TrapKind::MemoryLimit => "exceeded its memory limit",
            TrapKind::Panic => "panicked",
            TrapKind::StackOverflow => "overflowed its stack",
            TrapKind::Other => "trapped",
        })
    }
}

/// How the task asked the host to react to its failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskErrorKind {
    /// Back off and retry the batch.
    Retryable,
    /// Set the record aside and go on.
    PoisonRecord,
    /// Stop the shard.
    Fatal,
}

/// Why a call into a task failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The task returned an error.
    #[error("task on {shard_id} returned a {kind:?} error{}: {message}", record_index.map(|i| format!(" for record {i}")).unwrap_or_default())]
    Task {
        /// The shard.
        shard_id: String,
        /// What the task asked for.
        kind: TaskErrorKind,
        /// The record at fault, for poison records.
        record_index: Option<u32>,
        /// The task's message.
        message: String,
    },
    /// The instance trapped; it cannot be used again.
    #[error("task on {shard_id} {kind}{}: {message}", stderr_tail.as_deref().map(|l| format!(" (stderr: {l})")).unwrap_or_default())]
    Trap {
        /// The shard.
        shard_id: String,
        /// What kind of trap.
        kind: TrapKind,
        /// wasmtime's description.
        message: String,
        /// What the guest's stderr said last: a Rust panic's location and message.
        stderr_tail: Option<String>,
    },
    /// The task broke the contract (for example claimed more records done than it was given).
    #[error("task on {shard_id} broke the contract: {message}")]
    Contract {
        /// The shard.
        shard_id: String,
        /// What went wrong.
        message: String,
    },
    /// The instance trapped earlier and must be re-created.
    #[error(
        "task instance on {shard_id} trapped earlier and cannot be called; create a new instance"
    )]
    Poisoned {
        /// The shard.
        shard_id: String,
    },
    /// A new instance could not be created.
    #[error("cannot instantiate the task for {shard_id}: {source}")]
    Instantiate {
        /// The shard.
        shard_id: String,
        /// wasmtime's error.
        source: BoxError,
    },
}

impl CallError {
    /// Whether the instance is unusable after this error and must be re-created.
    pub fn poisons_instance(&self) -> bool {
        matches!(
            self,
            CallError::Trap { .. } | CallError::Poisoned { .. } | CallError::Instantiate { .. }
        )
    }
}
