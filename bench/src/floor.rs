//! `sdk-floor`: the reference of the suite's throughput figures, run as its own process so that
//! its CPU is measured exactly as the host's (from `/proc/<pid>/stat`).
//!
//! It does only what any Rust consumer using the AWS SDK must do: one loop per shard calling
//! `GetRecords` (limit 10000) with the previous call's `NextShardIterator`, touching every
//! record (data length, first byte, sequence number length) so nothing is optimised away. The
//! Kinesis client is built by the same code as the host's ([`AwsClients`]), on a two-worker
//! tokio runtime like the host's on this machine.

use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_kinesis::types::ShardIteratorType;
use kinesis_host_coordinator::aws::{AwsClients, AwsSettings, StaticKeys};

/// Options of `sdk-floor`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// The stand-in's endpoint.
    #[arg(long)]
    pub endpoint: String,
    /// Shards to read, one loop each.
    #[arg(long)]
    pub shards: usize,
    /// Exit after this many seconds at the latest.
    #[arg(long, default_value_t = 120)]
    pub max_secs: u64,
}

/// Reads until `max_secs` pass (the suite kills it earlier).
///
/// # Errors
/// When the runtime cannot start or a call fails.
pub fn run(args: &FloorArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        let settings = AwsSettings {
            region: Some("us-east-1".into()),
            keys: Some(StaticKeys {
                access_key_id: "test".into(),
                secret_access_key: "test".into(),
            }),
            kinesis_endpoint: Some(args.endpoint.clone()),
            ..AwsSettings::default()
        };
        let client = AwsClients::new(&settings).await.kinesis;
        let mut loops = tokio::task::JoinSet::new();
        for shard in 0..args.shards {
            let client = client.clone();
            loops.spawn(async move {
                let out = client
                    .get_shard_iterator()
                    .stream_name("bench")
                    .shard_id(format!("shardId-{shard:012}"))
                    .shard_iterator_type(ShardIteratorType::TrimHorizon)
                    .send()
                    .await
                    .context("GetShardIterator")?;
                let mut iterator = out.shard_iterator().map(str::to_owned);
                let mut touched = 0u64;
                while let Some(it) = iterator.take() {
                    let out = client
                        .get_records()
                        .shard_iterator(it)
                        .limit(10_000)
                        .send()
                        .await
                        .context("GetRecords")?;
                    for record in out.records() {
                        let data = record.data().as_ref();
                        touched = touched
                            .wrapping_add(data.len() as u64)
                            .wrapping_add(u64::from(data.first().copied().unwrap_or(0)))
                            .wrapping_add(record.sequence_number().len() as u64);
                    }
                    std::hint::black_box(touched);
                    iterator = out.next_shard_iterator().map(str::to_owned);
                }
                anyhow::Ok(())
            });
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.max_secs)) => Ok(()),
            Some(done) = loops.join_next() => done.context("a shard loop panicked")?,
        }
    })
}
