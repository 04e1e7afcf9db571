//! `kinesis-host-bench`: benchmarks of kinesis-host.
//!
//! The only command so far is `boundary`: in one run it prints the CPU cost per record of
//! handing batches of records to a task, for several record sizes, three ways:
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

mod boundary;
mod guests;
mod naive;
mod records;
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Boundary(args) => boundary::run(&args),
    }
}
