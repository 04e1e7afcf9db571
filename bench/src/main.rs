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

mod boundary;
mod failover;
mod guests;
mod naive;
mod records;
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
    /// CPU fairness of `serve`'s tenants (well-behaved throughput with and without a tenant in
    /// an endless loop, as a ratio) and resident memory per idle task instance.
    Tenants(tenants::TenantsArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Boundary(args) => boundary::run(&args),
        Command::Failover(args) => failover::run(&args),
        Command::Tenants(args) => tenants::run(&args),
    }
}
