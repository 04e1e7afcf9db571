//! `kinesis-host-bench`: benchmarks of kinesis-host.
//!
//! `boundary`: in one run it prints the CPU cost per record of handing batches of records to a
//! task, for several record sizes, three ways:
//!
//! - **native**: a Rust closure in the host doing the task's work over the decoded records;
//! - **batch**: our path — pack a runtime [`Batch`](kinesis_host_runtime::Batch) and call
//!   [`TaskInstance::process`](kinesis_host_runtime::TaskInstance::process) on the
//!   `bench-batch` guest (written with the `kinesis-task` SDK);
//! - **naive**: build a `Vec<Envelope>` and call the `bench-naive` guest, whose WIT takes a
//!   `list<envelope>` with one `list<u8>` and two strings per record.
//!
//! It builds both guests itself (`cargo build --profile guest --target wasm32-wasip2`), checks
//! that all three agree on every batch's checksum, and writes its table to
//! `target/bench/boundary.txt`. See `bench/README.md`.
//!
//! `failover` times lease failover after SIGKILL, hand-over after SIGTERM and rebalance when a
//! third host joins, with real `kinesis-host run` processes on local emulators it starts itself,
//! beside KCL 2.x's figures at the same `FailoverTimeMillis`; it writes its table to
//! `target/bench/failover.txt`.
//!
//! `leases` times one host taking every free lease of a many-shard stream (512 by default) and
//! starting every shard, optionally beside a baseline binary; it writes
//! `target/bench/leases.txt`.
//!
//! `suite` runs the figures of the whole host in one command: throughput of one `kinesis-host
//! run` against a fast Kinesis stand-in beside the AWS SDK's decode floor, put-to-process
//! latency, cold start and `boundary`; it writes `target/bench/suite.md`.

mod boundary;
mod failover;
mod floor;
mod guests;
mod leases;
mod naive;
mod records;
mod standin;
mod suite;
mod tenants;
mod timing;

use clap::{Parser, Subcommand};

/// Benchmarks of kinesis-host.
#[derive(Debug, Parser)]
#[command(name = "kinesis-host-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
enum Command {
    /// ns/record through `process`: native closure vs our batch path vs a naive
    /// `list<envelope>` layout.
    Boundary(boundary::BoundaryArgs),
    /// Lease failover, graceful hand-over and rebalance times of real `kinesis-host run`
    /// processes on local emulators, beside KCL's figures at the same `FailoverTimeMillis`.
    Failover(failover::FailoverArgs),
    /// Time for one `kinesis-host run` to take every free lease of a many-shard stream and
    /// start reading every shard (stand-in Kinesis, dynalite, optionally a delaying proxy).
    Leases(leases::LeasesArgs),
    /// CPU fairness of `serve`'s tenants (well-behaved throughput with and without a tenant in
    /// an endless loop, as a ratio) and resident memory per idle task instance.
    Tenants(tenants::TenantsArgs),
    /// The whole host: throughput against a Kinesis stand-in beside the AWS SDK's decode floor,
    /// put-to-process latency (polling and enhanced fan-out), cold start, and `boundary`;
    /// prints one report and writes it to `target/bench/suite.md`.
    Suite(suite::SuiteArgs),
    /// The suite's throughput reference: only decode GetRecords answers with aws-sdk-kinesis
    /// (run by `suite` as a separate process).
    #[command(hide = true)]
    SdkFloor(floor::FloorArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Boundary(args) => boundary::run(&args).map(drop),
        Command::Failover(args) => failover::run(&args),
        Command::Leases(args) => leases::run(&args),
        Command::Tenants(args) => tenants::run(&args),
        Command::Suite(args) => suite::run(&args),
        Command::SdkFloor(args) => floor::run(&args),
    }
}
