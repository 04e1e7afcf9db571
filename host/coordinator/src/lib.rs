//! The AWS side of kinesis-host: KCL-compatible leases in DynamoDB, reading Kinesis shards,
//! KPL de-aggregation and producing outputs. It knows nothing of wasmtime: the pipeline in the
//! `kinesis-host` crate joins it to the task runtime.

#![deny(missing_docs)]

pub mod aws;
pub mod checkpoint;
pub mod efo;
pub mod kpl;
pub mod lean_decode;
pub mod lease;
pub mod output;
pub mod reader;
pub mod sdk_error;
pub mod state;
pub mod worker;
