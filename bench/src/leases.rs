//! `leases`: how long one `kinesis-host run` takes to own every lease of a many-shard stream
//! and to start reading every shard, as a host does at start beside free leases (or after a
//! crashed host's leases expired).
//!
//! Per round and per binary, a fresh lease table in dynalite is filled directly with one free
//! lease per shard (`TRIM_HORIZON`, no owner), so the host creates none and the figure is the
//! taking alone; Kinesis is the [stand-in](crate::standin) with that many shards (one small
//! record per answer, reads once a second), so no emulator slows down with the shard count.
//! From the host's spawn, three times: the first and the last `Took lease.` line of its log
//! (stamped as they arrive on its stderr) and the moment the stand-in has been asked for an
//! iterator of every shard (every shard's reader started). A final consistent `Scan` checks
//! that every lease names an owner.
//!
//! `--dynamodb-delay-ms` puts a proxy before dynalite that holds every request that long, for
//! a round trip like real DynamoDB's (5 to 10 ms) instead of loopback's; `--baseline` measures a
//! second `kinesis-host` binary (one built before a change) in the same run, rounds
//! alternating, and prints the ratio.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, PutRequest,
    ScalarAttributeType, TableStatus, WriteRequest,
};
use kinesis_host_coordinator::aws::{AwsClients, AwsSettings, StaticKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::failover::{self, Emulators};
use crate::guests;
use crate::standin::{Shape, StandIn};

/// Arguments of `leases`.
#[derive(Debug, clap::Args)]
pub struct LeasesArgs {
    /// Shards of the stream, and free leases in the table.
    #[arg(long, default_value_t = 512)]
    pub shards: usize,
    /// Rounds per binary.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Time added to every DynamoDB request of the host (a delaying proxy before dynalite), ms.
    #[arg(long, default_value_t = 0)]
    pub dynamodb_delay_ms: u64,
    /// Another `kinesis-host` binary to measure in the same run (such as one built before a
    /// change); its rounds alternate with this build's.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Abort the whole run after this many minutes.
    #[arg(long, default_value_t = 20)]
    pub max_minutes: u64,
}

/// The times of one round, from the host's spawn.
#[derive(Debug, Clone, Copy)]
struct Times {
    first_take: Duration,
    last_take: Duration,
    all_reading: Duration,
}

/// Runs the benchmark and prints its table (also written to `target/bench/leases.txt`).
///
/// # Errors
/// When the build, the emulators or a host fail, or a round does not finish in time.
pub fn run(args: &LeasesArgs) -> Result<()> {
    if args.shards == 0 || args.rounds == 0 {
        bail!("--shards and --rounds need at least 1");
    }
    let deadline = Instant::now() + Duration::from_secs(args.max_minutes * 60);
    let root = guests::workspace_root();
    let target = guests::target_dir(&root);
    let out_dir = target.join("bench").join("leases");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let (built, guest) = failover::build(&root, &target, "bench-count")?;
    // A private copy: other worktrees sharing the target directory may rebuild the host.
    let host = out_dir.join("kinesis-host");
    std::fs::copy(&built, &host)
        .with_context(|| format!("cannot copy {} to {}", built.display(), host.display()))?;
    let mut binaries = vec![("this build", host)];
    if let Some(baseline) = &args.baseline {
        if !baseline.is_file() {
            bail!("--baseline {}: no such file", baseline.display());
        }
        binaries.insert(0, ("baseline", baseline.clone()));
    }
    let emulators = Emulators::start(&root, &target.join("bench").join("leases-emulators"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let clients = runtime.block_on(AwsClients::new(&AwsSettings {
        region: Some("us-east-1".into()),
        keys: Some(StaticKeys { access_key_id: "test".into(), secret_access_key: "test".into() }),
        kinesis_endpoint: Some(emulators.kinesis.clone()),
        dynamodb_endpoint: Some(emulators.dynamodb.clone()),
        ..AwsSettings::default()
    }));
    let host_dynamodb = if args.dynamodb_delay_ms > 0 {
        runtime.block_on(delay_proxy(
            &emulators.dynamodb,
            Duration::from_millis(args.dynamodb_delay_ms),
        ))?
    } else {
        emulators.dynamodb.clone()
    };
    let mut times: Vec<Vec<Times>> = vec![Vec::new(); binaries.len()];
    for round in 0..args.rounds {
        // Alternate which binary goes first, so neither always runs on a fresher dynalite.
        let mut order: Vec<usize> = (0..binaries.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let (label, binary) = &binaries[index];
            let name = format!("leases-{}-{round}-{index}", std::process::id());
            runtime.block_on(seed(&clients, &name, args.shards))?;
            let dir = out_dir.join(&name);
            std::fs::create_dir_all(&dir)?;
            let owners = || runtime.block_on(owned(&clients, &name));
            let (t, owned) = one_round(
                binary,
                &guest,
                &dir,
                &name,
                &host_dynamodb,
                args.shards,
                deadline,
                owners,
            )?;
            if owned != args.shards {
                bail!(
                    "{label}, round {round}: {owned} of {} leases owned after the host took them all",
                    args.shards
                );
            }
            eprintln!(
                "{label}, round {}: first take {:.2} s, last take {:.2} s, every shard reading {:.2} s",
                round + 1,
                t.first_take.as_secs_f64(),
                t.last_take.as_secs_f64(),
                t.all_reading.as_secs_f64()
            );
            times[index].push(t);
        }
    }
    drop(runtime);
    emulators.stop();
    let report = render(args, &binaries, &times);
    print!("{report}");
    let path = target.join("bench").join("leases.txt");
    std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("Written to {} (host logs in {}).", path.display(), out_dir.display());
    Ok(())
}

/// Creates lease table `table` and one free lease per shard of the stand-in.
async fn seed(clients: &AwsClients, table: &str, shards: usize) -> Result<()> {
    let key = KeySchemaElement::builder().attribute_name("leaseKey").key_type(KeyType::Hash);
    let attribute = AttributeDefinition::builder()
        .attribute_name("leaseKey")
        .attribute_type(ScalarAttributeType::S);
    clients
        .dynamodb
        .create_table()
        .table_name(table)
        .key_schema(key.build()?)
        .attribute_definitions(attribute.build()?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .with_context(|| format!("CreateTable {table}"))?;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let described = clients.dynamodb.describe_table().table_name(table).send().await;
        if described.ok().and_then(|d| d.table()?.table_status().cloned())
            == Some(TableStatus::Active)
        {
            break;
        }
        if Instant::now() > until {
            bail!("lease table {table} is not ACTIVE after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = (0..shards).map(|i| format!("shardId-{i:012}")).collect();
    for chunk in ids.chunks(25) {
        let mut writes = Vec::with_capacity(chunk.len());
        for id in chunk {
            let put = PutRequest::builder()
                .item("leaseKey", AttributeValue::S(id.clone()))
                .item("leaseCounter", AttributeValue::N("1".into()))
                .item("checkpoint", AttributeValue::S("TRIM_HORIZON".into()))
                .item("checkpointSubSequenceNumber", AttributeValue::N("0".into()))
                .item("ownerSwitchesSinceCheckpoint", AttributeValue::N("0".into()))
                .build()?;
            writes.push(WriteRequest::builder().put_request(put).build());
        }
        let mut pending = Some(writes);
        while let Some(writes) = pending.take() {
            let out = clients
                .dynamodb
                .batch_write_item()
                .request_items(table, writes)
                .send()
                .await
                .with_context(|| format!("BatchWriteItem {table}"))?;
            pending = out
                .unprocessed_items()
                .and_then(|u| u.get(table))
                .filter(|w| !w.is_empty())
                .cloned();
        }
    }
    Ok(())
}

/// How many leases of `table` name an owner (consistent scan).
async fn owned(clients: &AwsClients, table: &str) -> Result<usize> {
    let mut owned = 0;
    let mut start = None;
    loop {
        let out = clients
            .dynamodb
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .with_context(|| format!("Scan {table}"))?;
        owned += out.items().iter().filter(|i| i.contains_key("leaseOwner")).count();
        start = out.last_evaluated_key().cloned();
        if start.is_none() {
            return Ok(owned);
        }
    }
}

/// Starts `binary` on lease table `table` and a stand-in of `shards` shards; once it took every
/// lease and started every shard, counts the owned leases with `owners`, stops the host and
/// returns its times and that count.
#[allow(clippy::too_many_arguments)]
fn one_round(
    binary: &Path,
    guest: &Path,
    dir: &Path,
    table: &str,
    dynamodb: &str,
    shards: usize,
    deadline: Instant,
    owners: impl FnOnce() -> Result<usize>,
) -> Result<(Times, usize)> {
    let standin = StandIn::start(
        Shape { shards, records_per_call: 1, record_size: 16 },
        Duration::from_secs(600),
    )?;
    let config = dir.join("job.properties");
    std::fs::write(
        &config,
        standin.job_properties(
            table,
            dynamodb,
            &[
                ("TableName", table.to_owned()),
                ("IdleTimeBetweenReadsInMillis", "1000".to_owned()),
                ("FailoverTimeMillis", "10000".to_owned()),
            ],
        ),
    )?;
    let log_path = dir.join("host.log");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let spawned = Instant::now();
    let mut child = Command::new(binary)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("run")
        .arg(guest)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    // Arrival time of every `Took lease.` line.
    let takes: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let stderr = child.stderr.take().context("the host's stderr is not piped")?;
    let sink = takes.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("Took lease.") {
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(spawned.elapsed());
            }
            let _ = writeln!(log, "{line}");
        }
    });
    let limit = (Instant::now() + Duration::from_secs(180)).min(deadline);
    let mut all_reading = None;
    let result = loop {
        if all_reading.is_none()
            && standin.stats.shards_started.load(Ordering::Relaxed) as usize >= shards
        {
            all_reading = Some(spawned.elapsed());
        }
        let taken: Vec<Duration> =
            takes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let (Some(all_reading), true) = (all_reading, taken.len() >= shards) {
            break Ok(Times { first_take: taken[0], last_take: taken[shards - 1], all_reading });
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            break Err(anyhow::anyhow!(
                "the host exited after {} of {shards} takes; see {}",
                taken.len(),
                log_path.display()
            ));
        }
        if Instant::now() > limit {
            break Err(anyhow::anyhow!(
                "after {:.0} s: {} of {shards} leases taken, {} shards reading; see {}",
                spawned.elapsed().as_secs_f64(),
                taken.len(),
                standin.stats.shards_started.load(Ordering::Relaxed),
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Before the stop, which releases every lease.
    let result = result.and_then(|times| Ok((times, owners()?)));
    // SIGTERM: the host releases its leases; then it is gone either way.
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: `kill` has no memory-safety preconditions; the pid is our unreaped child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let until = Instant::now() + Duration::from_secs(60);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    result
}

/// A TCP proxy on 127.0.0.1 that forwards to `upstream` (`http://host:port`), holding every
/// chunk a client sends for `delay`: each HTTP request (one chunk on loopback) then waits that
/// long more for its answer, as over a network. Runs until the runtime stops.
async fn delay_proxy(upstream: &str, delay: Duration) -> Result<String> {
    let address: SocketAddr = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("not a host:port endpoint: {upstream}"))?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("the delaying proxy cannot listen on 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(address).await else { return };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok(format!("http://127.0.0.1:{port}"))
}

/// Median of `values` (sorted copy).
fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn render(args: &LeasesArgs, binaries: &[(&str, PathBuf)], times: &[Vec<Times>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "One host taking {} free leases (stand-in Kinesis with {} shards, leases in dynalite{}); \
         median of {} rounds, seconds from the host's spawn:\n",
        args.shards,
        args.shards,
        if args.dynamodb_delay_ms > 0 {
            format!(" behind a proxy adding {} ms per request", args.dynamodb_delay_ms)
        } else {
            String::new()
        },
        args.rounds
    );
    let _ = writeln!(
        out,
        "| binary | first lease taken | last lease taken | taking (last − first) | every shard reading |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let mut medians = Vec::new();
    for ((label, path), rounds) in binaries.iter().zip(times) {
        let first = median(&rounds.iter().map(|t| t.first_take).collect::<Vec<_>>());
        let last = median(&rounds.iter().map(|t| t.last_take).collect::<Vec<_>>());
        let span = median(&rounds.iter().map(|t| t.last_take - t.first_take).collect::<Vec<_>>());
        let reading = median(&rounds.iter().map(|t| t.all_reading).collect::<Vec<_>>());
        let _ = writeln!(
            out,
            "| {label} (`{}`) | {:.2} | {:.2} | {:.2} | {:.2} |",
            path.display(),
            first.as_secs_f64(),
            last.as_secs_f64(),
            span.as_secs_f64(),
            reading.as_secs_f64()
        );
        medians.push((last, span, reading));
    }
    if let [(base_last, base_span, base_reading), (last, span, reading)] = medians[..] {
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        let _ = writeln!(
            out,
            "\nbaseline ÷ this build: last lease taken {:.1}×, taking {:.1}×, every shard reading {:.1}×",
            ratio(base_last, last),
            ratio(base_span, span),
            ratio(base_reading, reading)
        );
    }
    out
}
