//! The task runtime of kinesis-host: runs tasks, which are WebAssembly components of the
//! `kinesis:task@0.1.0` world, over batches of records. It knows wasmtime and nothing of AWS.
//!
//! - [`Runtime`]: one per process; one wasmtime `Engine`, the host's linker, an epoch ticker
//!   thread for CPU deadlines and an on-disk cache of compiled components.
//! - [`TaskComponent`]: a loaded, type-checked task (`InstancePre`), cheap to instantiate.
//! - [`TaskInstance`]: one `Store` per shard; `process` runs a [`Batch`] with the instance's
//!   memory cap and CPU deadline, and returns what the batch emitted and wrote to state, which
//!   the caller commits. A trap poisons the instance: drop it and create a new one.
//!
//! Guests get WASI with an empty context: no files, environment, arguments or sockets. Their
//! stdout and stderr go to the host's log, tagged with the job and shard and rate-limited.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use kinesis_host_runtime::{Batch, InstanceSpec, Limits, Outputs, RecordRef, Runtime, RuntimeConfig, ShardState, TaskInstance};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let component = runtime.load("task.wasm".as_ref())?;
//! let spec = Arc::new(InstanceSpec {
//!     job: "job".into(),
//!     stream: "events".into(),
//!     shard_id: "shardId-000000000000".into(),
//!     outputs: Outputs::Any,
//!     config: vec![],
//!     limits: Limits::default(),
//! });
//! let mut instance = TaskInstance::new(&component, spec)?;
//! let mut batch = Batch::new("events", "shardId-000000000000", 500, 4 << 20);
//! batch.push(&RecordRef {
//!     data: b"hello",
//!     partition_key: "pk",
//!     sequence_number: "1",
//!     sub_sequence_number: 0,
//!     explicit_hash_key: None,
//!     approximate_arrival_millis: 0,
//! });
//! let mut state = ShardState::default();
//! let output = instance.process(&batch, &mut state)?;
//! println!("{} records done, {} emitted", output.processed, output.emits.len());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod batch;
mod bindings;
mod clock;
mod component;
mod error;
mod files;
mod guest_io;
mod host;
mod instance;
mod limits;
mod metrics;
mod text;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

pub use batch::{Batch, RecordRef};
pub use clock::{Clock, SystemClock};
pub use component::{ComponentReport, TASK_FUNCTIONS, TASK_INTERFACE, TaskComponent};
pub use error::{BoxError, CallError, LoadError, SetupError, TaskErrorKind, TrapKind};
pub use files::{MAX_COMPONENT_BYTES, read_regular_file};
pub use guest_io::LogLevel;
pub use host::{
    MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES, explicit_hash_key_problem, partition_key_problem,
};
pub use instance::{
    BatchOutput, Emit, InstanceSpec, InstanceStats, Outputs, ShardState, TaskInstance,
};
pub use limits::Limits;
pub use metrics::{HISTOGRAM_BUCKETS, Histogram, MAX_METRIC_NAME_BYTES, MetricChange, MetricValue};
pub use text::{MAX_MESSAGE_BYTES, clean_message, cut_message, escape_control, truncate};

use host::HostState;

/// How the runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// How often the epoch ticker ticks: the resolution of CPU deadlines.
    pub epoch_tick: Duration,
    /// The clock for rate limits.
    pub clock: Arc<dyn Clock>,
    /// Whether the engine meters fuel (`Config::consume_fuel`). It applies to every instance of
    /// the engine and slows all guest code down, so only jobs with
    /// [`Limits::fuel_per_batch`] should run on such a runtime; jobs without it get a runtime
    /// without fuel.
    pub fuel: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
            clock: Arc::new(SystemClock),
            fuel: false,
        }
    }
}

pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) tick: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) fuel: bool,
    stop: Arc<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = ticker.join();
        }
    }
}

/// The process's task runtime. Cheap to clone; the epoch ticker stops when the last clone and
/// every component loaded from it are dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.inner.cache_dir)
            .field("tick", &self.inner.tick)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Sets up the engine, the linker and the epoch ticker.
    ///
    /// # Errors
    /// When wasmtime rejects the configuration or the ticker thread cannot start.
    pub fn new(config: RuntimeConfig) -> Result<Self, SetupError> {
        let mut c = Config::new();
        c.wasm_component_model(true);
        c.concurrency_support(false);
        c.epoch_interruption(true);
        c.max_wasm_stack(512 << 10);
        c.consume_fuel(config.fuel);
        let engine = Engine::new(&c).map_err(|e| SetupError::Engine(e.to_string().into()))?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(|e| SetupError::Linker(e.to_string().into()))?;
        // Rust's std on wasm32-wasip2 imports WASI; link it with an empty context (see
        // `TaskInstance::new`): no files, environment, arguments or sockets.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| SetupError::Linker(e.to_string().into()))?;

        let stop = Arc::new(AtomicBool::new(false));
        let tick = config.epoch_tick.max(Duration::from_millis(1));
        let ticker = {
            let engine = engine.weak();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("kinesis-host-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => break,
                        }
                    }
                })
                .map_err(SetupError::Ticker)?
        };
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache_dir: config.cache_dir,
                tick,
                clock: config.clock,
                fuel: config.fuel,
                stop,
                ticker: Mutex::new(Some(ticker)),
            }),
        })
    }

    /// The folder of compiled components, if any ([`RuntimeConfig::cache_dir`]).
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache_dir.as_deref()
    }

    /// Whether this runtime's engine meters fuel ([`RuntimeConfig::fuel`]).
    pub fn meters_fuel(&self) -> bool {
        self.inner.fuel
    }

    /// Loads a task component from a `.wasm` file: compiles it (or takes it from the cache),
    /// checks that it exports the task interface and that the host provides all it imports.
    ///
    /// # Errors
    /// A [`LoadError`] naming the file and what is wrong with it.
    pub fn load(&self, path: &Path) -> Result<Arc<TaskComponent>, LoadError> {
        TaskComponent::load(self.inner.clone(), path).map(Arc::new)
    }
}
