//! The kinesis-host library behind the `kinesis-host` binary: job configuration, the per-shard
//! pipeline that joins record sources to the task runtime, and `replay`.

pub mod config;
pub mod fairness;
pub mod metrics;
pub mod pipeline;
pub mod replay;
pub mod run;
pub mod samza;
pub mod serve;
pub mod status;
pub mod task_metrics;
