//! Write [kinesis-host](https://github.com/) tasks in Rust.
//!
//! A task is a type that implements [`Task`]; [`export_task!`] makes it the component's entry
//! point. The host calls [`Task::process`] with batches of records from one shard, in shard
//! order; the task returns how many leading records are done, or a [`TaskError`] that says what
//! the host should do. While it runs, the task may [`emit`] records to the job's outputs, keep
//! per-shard [`state`], [`log`] and record [`metrics`]: all of it is committed only if the batch
//! succeeds.
//!
//! # Example
//!
//! ```
//! use kinesis_task::{Batch, Config, Done, Task, TaskError, emit, log};
//!
//! /// Forwards records whose data starts with a prefix taken from the job's config.
//! struct Forward {
//!     prefix: Vec<u8>,
//! }
//!
//! impl Task for Forward {
//!     fn init(config: &Config) -> Result<Self, TaskError> {
//!         let prefix = config.get("prefix").unwrap_or("!").as_bytes().to_vec();
//!         Ok(Forward { prefix })
//!     }
//!
//!     fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
//!         for record in batch {
//!             if record.data().starts_with(&self.prefix) {
//!                 emit("alerts", record.partition_key(), record.data())
//!                     .map_err(|e| TaskError::retryable(e.to_string()))?;
//!             }
//!         }
//!         log::debug(&format!("{} records from {}", batch.len(), batch.shard_id()));
//!         Ok(Done::All)
//!     }
//! }
//!
//! kinesis_task::export_task!(Forward);
//!
//! // The same logic runs natively in unit tests, against an in-memory host:
//! use kinesis_task::testing::{Harness, TestRecord};
//! let mut harness = Harness::<Forward>::new(&[("prefix", "!")]).unwrap();
//! let out = harness
//!     .process(&[TestRecord::text("pk-1", "!fire"), TestRecord::text("pk-2", "calm")])
//!     .unwrap();
//! assert_eq!(out.emitted.len(), 1);
//! assert_eq!(out.emitted[0].data, b"!fire");
//! ```
//!
//! Build the task with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`) and
//! run it with `kinesis-host replay task.wasm --input records.jsonl`.

#![deny(missing_docs)]

extern crate self as kinesis_task;

mod batch;
mod error;
mod host;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use batch::{Batch, Envelope, Iter};
pub use error::{EmitError, ErrorKind, StateError, TaskError};
pub use host::{emit, emit_with_hash_key, log, metrics, state};

/// A task: created once per shard instance, then called with that shard's batches in order.
pub trait Task: Sized + 'static {
    /// Creates the task from the job's task settings (`task.config.<key>` in job.properties).
    ///
    /// # Errors
    /// A [`TaskError`] when the settings are unusable; the host stops the shard and says why.
    fn init(config: &Config) -> Result<Self, TaskError>;

    /// Processes a batch of records from one shard.
    ///
    /// # Errors
    /// A [`TaskError`] saying whether to retry the batch, set a poison record aside, or stop.
    /// Everything the call emitted or wrote to state is discarded.
    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError>;

    /// Called when the host stops this instance gracefully.
    fn shutdown(&mut self) {}
}

/// How much of a batch a task finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Every record: the host checkpoints after the last one.
    All,
    /// Only the first `n` records: the host checkpoints after them and delivers the rest again.
    Leading(usize),
}

impl Done {
    fn count(self, len: usize) -> u32 {
        let n = match self {
            Done::All => len,
            Done::Leading(n) => n.min(len),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// The job's task settings, given to [`Task::init`].
#[derive(Debug, Clone, Default)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl Config {
    /// Settings from `(key, value)` pairs.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Self { entries }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value of `key` parsed as `T`, if set.
    ///
    /// # Errors
    /// A fatal [`TaskError`] naming the key when the value does not parse.
    pub fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, TaskError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)
            .map(|v| {
                v.parse::<T>().map_err(|e| {
                    TaskError::fatal(format!("task.config.{key}={v:?} is not valid: {e}"))
                })
            })
            .transpose()
    }

    /// Every setting, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Makes a [`Task`] type the component's entry point. Use it once per task crate.
///
/// In native builds it expands to nothing, so task crates can be unit-tested with
/// [`testing`](crate::testing).
#[macro_export]
macro_rules! export_task {
    ($task:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __KinesisTaskExport;

            impl $crate::__private::Guest for __KinesisTaskExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), $crate::__private::WitTaskError> {
                    $crate::__private::init::<$task>(config)
                }

                fn process(
                    batch: $crate::__private::WitBatch,
                ) -> ::std::result::Result<u32, $crate::__private::WitTaskError> {
                    $crate::__private::process(&batch)
                }

                fn shutdown() {
                    $crate::__private::shutdown()
                }
            }

            $crate::__private::wit::export!(__KinesisTaskExport with_types_in $crate::__private::wit);
        };
    };
}

#[doc(hidden)]
pub mod __private {
    //! Used by [`export_task!`]; not a public API.

    use std::cell::RefCell;

    use super::{Batch, Config, Task, TaskError};

    #[allow(missing_docs, missing_debug_implementations, unused_qualifications)]
    pub mod wit {
        wit_bindgen::generate!({
            path: "../wit",
            world: "kinesis-task",
            pub_export_macro: true,
            default_bindings_module: "::kinesis_task::__private::wit",
            runtime_path: "::kinesis_task::__private::wit_bindgen::rt",
        });
    }

    pub use wit::exports::kinesis::task::task::Guest;
    pub use wit::kinesis::task::types::{Batch as WitBatch, TaskError as WitTaskError};
    pub use wit_bindgen;

    trait ErasedTask {
        fn process(&mut self, batch: &Batch<'_>) -> Result<super::Done, TaskError>;
        fn shutdown(&mut self);
    }

    impl<T: Task> ErasedTask for T {
        fn process(&mut self, batch: &Batch<'_>) -> Result<super::Done, TaskError> {
            Task::process(self, batch)
        }
        fn shutdown(&mut self) {
            Task::shutdown(self);
        }
    }

    thread_local! {
        // A component instance runs one task; wasm has one thread.
        static TASK: RefCell<Option<Box<dyn ErasedTask>>> = const { RefCell::new(None) };
    }

    pub fn init<T: Task>(config: Vec<(String, String)>) -> Result<(), WitTaskError> {
        let task = T::init(&Config::new(config)).map_err(TaskError::into_wit)?;
        TASK.with(|slot| *slot.borrow_mut() = Some(Box::new(task)));
        Ok(())
    }

    pub fn process(batch: &WitBatch) -> Result<u32, WitTaskError> {
        let view = Batch::new(batch);
        TASK.with(|slot| match slot.borrow_mut().as_mut() {
            Some(task) => {
                task.process(&view).map(|done| done.count(view.len())).map_err(TaskError::into_wit)
            }
            None => Err(TaskError::fatal("process called before init").into_wit()),
        })
    }

    pub fn shutdown() {
        TASK.with(|slot| {
            if let Some(mut task) = slot.borrow_mut().take() {
                task.shutdown();
            }
        });
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn batch_view(batch: &WitBatch) -> Batch<'_> {
        Batch::new(batch)
    }
}
