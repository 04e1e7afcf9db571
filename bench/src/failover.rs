//! `failover`: how fast shards move between real `kinesis-host run` processes, on local
//! emulators, beside what KCL 2.x's lease protocol gives at the same `FailoverTimeMillis`.
//!
//! Per round, three scenarios, each on fresh streams and a fresh lease table, with a producer
//! writing one numbered record per input shard every ~50 ms and a reader tailing the output
//! stream (the `echo-task` guest copies every record there with the same partition key):
//!
//! 1. **SIGKILL failover** (and 4, duplicates): hosts A and B share the shards; A is killed.
//!    Two times per shard of A, from the kill: until the lease table shows B as the owner, and
//!    until the first output record of that shard that arrived after A was dead (Kinesis's
//!    `ApproximateArrivalTimestamp`). The figure is the slowest of A's shards. Duplicates are
//!    the extra deliveries in the output stream that appeared across the failover.
//! 2. **Graceful hand-over**: A gets SIGTERM; time until the lease table shows B owning every
//!    shard.
//! 3. **Rebalance**: C joins A and B; time from C's start until the holdings are the even
//!    spread (⌈N/3⌉/⌊N/3⌋) and stay so for two renewal intervals, and how many owner changes
//!    happened after the first time the spread was even. A lease in a graceful hand-off is
//!    held by its outgoing owner (`checkpointOwner`) until the hand-off completes. Also the
//!    extra deliveries from C's start until the output caught up with the producer.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use kinesis_host_coordinator::aws::{AwsClients, AwsSettings, StaticKeys};
use kinesis_host_coordinator::kpl::partition_key_hash;

use crate::guests;

/// KCL's `epsilonMillis`.
const EPSILON_MS: u64 = 25;
/// Producer period: one record per shard per tick.
const PRODUCE_EVERY: Duration = Duration::from_millis(50);
/// Lease-table poll period.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// After A is reaped, output records arriving this much later cannot be A's.
const DEAD_MARGIN: Duration = Duration::from_millis(50);

/// Options of `failover`.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Shards of the input stream.
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// `FailoverTimeMillis` of the hosts (KCL's figures are computed from it too).
    #[arg(long, default_value_t = 10_000)]
    pub failover_ms: u64,
    /// Repetitions of each scenario.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Abort the whole run (killing every process it started) after this many minutes.
    #[arg(long, default_value_t = 30)]
    pub max_minutes: u64,
    /// `task.commit.ms` of the hosts: the least time between two checkpoints of a shard.
    #[arg(long, default_value_t = 1)]
    pub commit_ms: u64,
    /// `GracefulLeaseHandoffEnabled` of the hosts (`false` steals as KCL 2.x does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub graceful_handoff: bool,
}

/// The protocol's periods at one failover time.
#[derive(Debug, Clone, Copy)]
struct Timers {
    failover: Duration,
    /// Ours and KCL's renewer period: failover/3 − ε (ours: at least 50 ms).
    renew: Duration,
    /// KCL 2.x's taker period: (failover + ε) × 2.
    kcl_taker: Duration,
}

impl Timers {
    fn new(failover_ms: u64) -> Self {
        Timers {
            failover: Duration::from_millis(failover_ms),
            renew: Duration::from_millis((failover_ms / 3).saturating_sub(EPSILON_MS).max(50)),
            kcl_taker: Duration::from_millis((failover_ms + EPSILON_MS) * 2),
        }
    }
}

/// Everything a scenario needs.
struct Bench {
    clients: AwsClients,
    kinesis_endpoint: String,
    dynamodb_endpoint: String,
    host_binary: PathBuf,
    guest: PathBuf,
    cache_dir: PathBuf,
    out_dir: PathBuf,
    shards: usize,
    timers: Timers,
    /// `GracefulLeaseHandoffEnabled` of the hosts.
    graceful_handoff: bool,
    /// `task.commit.ms` of the hosts.
    commit_ms: u64,
    /// The whole run's deadline.
    deadline: Instant,
}

/// One round's results; `None` where the measurement timed out.
#[derive(Debug, Default, Clone)]
struct Round {
    failover_lease: Option<Duration>,
    failover_output: Option<Duration>,
    duplicates: Option<u64>,
    lost: u64,
    handover: Option<Duration>,
    rebalance: Option<Duration>,
    owner_changes_after_balance: Option<u64>,
    /// Extra deliveries from C's start until everything produced by the even spread arrived.
    join_duplicates: Option<u64>,
    notes: Vec<String>,
}

/// Runs the benchmark.
///
/// # Errors
/// When the emulators, the builds or a scenario's setup fail, or the run's deadline passes.
pub fn run(args: &FailoverArgs) -> Result<()> {
    if args.shards < 2 || args.rounds == 0 || args.failover_ms < 300 {
        bail!("need --shards ≥ 2, --rounds ≥ 1 and --failover-ms ≥ 300");
    }
    let deadline = Instant::now() + Duration::from_secs(args.max_minutes * 60);
    let root = guests::workspace_root();
    let target = guests::target_dir(&root);
    let out_dir = target.join("bench").join("failover");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let (host_binary, guest) = build(&root, &target, "echo-task")?;
    let emulators = Emulators::start(&root, &target.join("bench").join("failover-emulators"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let report = runtime.block_on(async {
        let settings = AwsSettings {
            region: Some("us-east-1".into()),
            keys: Some(StaticKeys {
                access_key_id: "test".into(),
                secret_access_key: "test".into(),
            }),
            kinesis_endpoint: Some(emulators.kinesis.clone()),
            dynamodb_endpoint: Some(emulators.dynamodb.clone()),
            ..AwsSettings::default()
        };
        let bench = Bench {
            clients: AwsClients::new(&settings).await,
            kinesis_endpoint: emulators.kinesis.clone(),
            dynamodb_endpoint: emulators.dynamodb.clone(),
            host_binary,
            guest,
            cache_dir: target.join("bench").join("failover-cache"),
            out_dir: out_dir.clone(),
            shards: args.shards,
            timers: Timers::new(args.failover_ms),
            graceful_handoff: args.graceful_handoff,
            commit_ms: args.commit_ms,
            deadline,
        };
        let mut rounds = Vec::new();
        for round in 0..args.rounds {
            eprintln!("== round {} of {}", round + 1, args.rounds);
            let mut r = Round::default();
            bench.failover(round, &mut r).await?;
            bench.handover(round, &mut r).await?;
            bench.rebalance(round, &mut r).await?;
            eprintln!("   {r:?}");
            rounds.push(r);
        }
        anyhow::Ok(report(args, &bench.timers, &rounds))
    });
    drop(runtime);
    emulators.stop();
    let report = report?;
    print!("{report}");
    let path = target.join("bench").join("failover.txt");
    std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("Written to {} (host logs in {}).", path.display(), out_dir.display());
    Ok(())
}

/// Builds `kinesis-host` (release) and the guest package `guest` (`echo-task` here); returns
/// their paths.
pub(crate) fn build(root: &Path, target: &Path, guest: &str) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for args in [
        &["build", "--release", "-p", "kinesis-host"][..],
        &["build", "--profile", "guest", "--target", "wasm32-wasip2", "-p", guest][..],
    ] {
        let mut command = Command::new(&cargo);
        command.current_dir(root).args(args);
        // `cargo run` gives this process the bench package's variables; some build scripts
        // (ring's) rerun when they change, so the nested build would rebuild them every time.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"]
                    .contains(&name.as_ref())
            {
                command.env_remove(name.as_ref());
            }
        }
        eprintln!("Building: {command:?}");
        let status = command.status().context("cannot run cargo")?;
        if !status.success() {
            bail!("{command:?} failed ({status})");
        }
    }
    let host = target.join("release").join("kinesis-host");
    let guest = target
        .join("wasm32-wasip2")
        .join("guest")
        .join(format!("{}.wasm", guest.replace('-', "_")));
    for path in [&host, &guest] {
        if !path.is_file() {
            bail!("the build succeeded but {} is missing", path.display());
        }
    }
    Ok((host, guest))
}

/// The emulators this run started; stopped on drop (and they exit with this process anyway,
/// through `--watch-pid`).
pub(crate) struct Emulators {
    script: PathBuf,
    dir: PathBuf,
    pub(crate) kinesis: String,
    pub(crate) dynamodb: String,
    stopped: bool,
}

impl Emulators {
    pub(crate) fn start(root: &Path, dir: &Path) -> Result<Self> {
        let script = root.join("scripts").join("emulators.sh");
        // Leftovers of an earlier run that was killed: their processes are gone with it.
        let _ = Command::new("bash")
            .arg(&script)
            .arg("stop")
            .arg("--dir")
            .arg(dir)
            .stderr(Stdio::null())
            .status();
        eprintln!("Starting the emulators in {}", dir.display());
        let output = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .arg("--dir")
            .arg(dir)
            .current_dir(root)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run scripts/emulators.sh")?;
        if !output.status.success() {
            bail!("scripts/emulators.sh start failed ({})", output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let endpoint = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
                .with_context(|| format!("no {key}= line from scripts/emulators.sh start"))
        };
        Ok(Emulators {
            kinesis: endpoint("KINESIS_ENDPOINT")?,
            dynamodb: endpoint("DYNAMODB_ENDPOINT")?,
            script,
            dir: dir.to_path_buf(),
            stopped: false,
        })
    }

    pub(crate) fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = Command::new("bash")
                .arg(&self.script)
                .arg("stop")
                .arg("--dir")
                .arg(&self.dir)
                .status();
        }
    }
}

impl Drop for Emulators {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A running `kinesis-host run`, SIGKILLed on drop.
struct Host {
    name: &'static str,
    child: Child,
    started: Instant,
}

impl Host {
    fn signal(&self, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: `kill` has no memory-safety preconditions; the pid is our unreaped child.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Waits (bounded) for the process to exit.
    async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether `owner` (a `leaseOwner`) is this host: worker ids are `$HOSTNAME-<uuid>`.
    fn owns(name: &str, owner: &str) -> bool {
        owner.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One lease as read from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseRow {
    owner: Option<String>,
    counter: u64,
    /// The outgoing owner during a graceful hand-off (`owner` is then the taker).
    checkpoint_owner: Option<String>,
}

impl LeaseRow {
    /// The host processing the lease: during a hand-off still the outgoing owner.
    fn holder(&self) -> Option<&str> {
        self.checkpoint_owner.as_deref().or(self.owner.as_deref())
    }
}

/// One output record: input shard index, its number, and when Kinesis accepted it.
#[derive(Debug, Clone, Copy)]
struct OutRecord {
    shard: usize,
    number: u64,
    arrival: SystemTime,
}

/// A scenario's streams, producer and output tail; stopped on drop.
struct Traffic {
    table: String,
    config: PathBuf,
    dir: PathBuf,
    keys: Vec<String>,
    /// The input shard ids, in the order of `keys`.
    shard_ids: Vec<String>,
    produced: Arc<Mutex<u64>>,
    output: Arc<Mutex<Vec<OutRecord>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Traffic {
    /// Output records seen so far.
    fn output(&self) -> Vec<OutRecord> {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Numbers produced so far per key (the same for every key).
    fn produced(&self) -> u64 {
        self.produced.lock().map(|p| *p).unwrap_or(0)
    }
}

impl Bench {
    fn remaining(&self) -> Result<()> {
        if Instant::now() > self.deadline {
            bail!("the run's deadline (--max-minutes) passed: aborting");
        }
        Ok(())
    }

    /// Creates the streams, writes the job file, starts the producer and the output tail.
    async fn traffic(&self, name: &str) -> Result<Traffic> {
        let input = format!("{name}-in");
        let output_stream = format!("{name}-out");
        let shard_count = i32::try_from(self.shards).context("--shards")?;
        self.create_stream(&input, shard_count).await?;
        self.create_stream(&output_stream, 1).await?;
        // One partition key per input shard, hashing into it.
        let shards = self
            .clients
            .kinesis
            .list_shards()
            .stream_name(&input)
            .send()
            .await
            .context("ListShards")?;
        let mut ranges: Vec<(u128, u128, String)> = shards
            .shards()
            .iter()
            .filter_map(|s| {
                let r = s.hash_key_range()?;
                Some((
                    r.starting_hash_key().parse().ok()?,
                    r.ending_hash_key().parse().ok()?,
                    s.shard_id().to_owned(),
                ))
            })
            .collect();
        ranges.sort_unstable();
        let shard_ids: Vec<String> = ranges.iter().map(|(_, _, id)| id.clone()).collect();
        let keys: Vec<String> = ranges
            .iter()
            .enumerate()
            .map(|(i, (start, end, _))| {
                (0u64..)
                    .map(|j| format!("s{i}-k{j}"))
                    .find(|k| (*start..=*end).contains(&partition_key_hash(k)))
                    .unwrap_or_default()
            })
            .collect();
        let dir = self.out_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("job.properties");
        let f = self.timers.failover.as_millis();
        let commit_ms = self.commit_ms;
        std::fs::write(
            &config,
            format!(
                "job.name={name}\n\
                 job.id=1\n\
                 task.inputs=kinesis.{input}\n\
                 task.output.out=kinesis.{output_stream}\n\
                 task.commit.ms={commit_ms}\n\
                 systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n\
                 systems.kinesis.aws.region=us-east-1\n\
                 systems.kinesis.streams.{input}.aws.accessKey=test\n\
                 sensitive.systems.kinesis.streams.{input}.aws.secretKey=test\n\
                 systems.kinesis.streams.{output_stream}.aws.accessKey=test\n\
                 sensitive.systems.kinesis.streams.{output_stream}.aws.secretKey=test\n\
                 systems.kinesis.aws.kinesis.endpoint={}\n\
                 systems.kinesis.aws.dynamodb.endpoint={}\n\
                 systems.kinesis.aws.kcl.InitialPositionInStream=TRIM_HORIZON\n\
                 systems.kinesis.aws.kcl.IdleTimeBetweenReadsInMillis=100\n\
                 systems.kinesis.aws.kcl.FailoverTimeMillis={f}\n\
                 systems.kinesis.aws.kcl.GracefulLeaseHandoffEnabled={}\n",
                self.kinesis_endpoint, self.dynamodb_endpoint, self.graceful_handoff,
            ),
        )?;
        let produced = Arc::new(Mutex::new(0u64));
        let output = Arc::new(Mutex::new(Vec::new()));
        let producer = tokio::spawn(produce(
            self.clients.kinesis.clone(),
            input.clone(),
            keys.clone(),
            produced.clone(),
        ));
        let tail = tokio::spawn(tail(
            self.clients.kinesis.clone(),
            output_stream,
            keys.clone(),
            output.clone(),
        ));
        Ok(Traffic {
            table: format!("{name}-1-{input}"),
            config,
            dir,
            keys,
            shard_ids,
            produced,
            output,
            tasks: vec![producer, tail],
        })
    }

    async fn create_stream(&self, name: &str, shards: i32) -> Result<()> {
        self.clients
            .kinesis
            .create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .with_context(|| format!("CreateStream {name}"))?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let d = self
                .clients
                .kinesis
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .context("DescribeStreamSummary")?;
            if d.stream_description_summary().map(|s| s.stream_status().as_str()) == Some("ACTIVE")
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("stream {name} did not become ACTIVE within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_host(&self, traffic: &Traffic, name: &'static str) -> Result<Host> {
        let log = std::fs::File::create(traffic.dir.join(format!("{name}.log")))?;
        let child = Command::new(&self.host_binary)
            .env("HOSTNAME", name)
            .env("KINESIS_HOST_CACHE_DIR", &self.cache_dir)
            .env_remove("RUST_LOG")
            .env_remove("KINESIS_HOST_LOG")
            .args(["run", "--log", "info"])
            .arg(&self.guest)
            .arg("--config")
            .arg(&traffic.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.host_binary.display()))?;
        Ok(Host { name, child, started: Instant::now() })
    }

    /// The lease table, by shard id; empty while the table does not exist.
    async fn leases(&self, table: &str) -> BTreeMap<String, LeaseRow> {
        let Ok(out) =
            self.clients.dynamodb.scan().table_name(table).consistent_read(true).send().await
        else {
            return BTreeMap::new();
        };
        out.items()
            .iter()
            .filter_map(|item| {
                let key = item.get("leaseKey")?.as_s().ok()?.clone();
                let owner = item.get("leaseOwner").and_then(|v| v.as_s().ok()).cloned();
                let counter = match item.get("leaseCounter") {
                    Some(AttributeValue::N(n)) => n.parse().unwrap_or(0),
                    _ => 0,
                };
                let checkpoint_owner =
                    item.get("checkpointOwner").and_then(|v| v.as_s().ok()).cloned();
                Some((key, LeaseRow { owner, counter, checkpoint_owner }))
            })
            .collect()
    }

    /// How many leases each of `hosts` holds (hosts in the given order).
    fn holdings(leases: &BTreeMap<String, LeaseRow>, hosts: &[&Host]) -> Vec<usize> {
        hosts
            .iter()
            .map(|h| {
                leases
                    .values()
                    .filter(|l| l.holder().is_some_and(|o| Host::owns(h.name, o)))
                    .count()
            })
            .collect()
    }

    /// Waits until the holdings of `hosts` are the even spread and stay so for two renewal
    /// intervals; returns when they first became so (of the stable stretch) and the number of
    /// owner changes after the spread was first even.
    async fn wait_balanced(
        &self,
        traffic: &Traffic,
        hosts: &[&Host],
        timeout: Duration,
    ) -> Result<Result<(Instant, u64), String>> {
        let until = Instant::now() + timeout;
        let even = even_spread(self.shards, hosts.len());
        let hold = self.timers.renew * 2;
        let mut since: Option<Instant> = None;
        let mut first_even = false;
        let mut changes = 0u64;
        let mut last: Option<BTreeMap<String, LeaseRow>> = None;
        loop {
            self.remaining()?;
            let leases = self.leases(&traffic.table).await;
            if let Some(prev) = &last
                && first_even
            {
                changes += leases
                    .iter()
                    .filter(|(k, l)| prev.get(*k).is_some_and(|p| p.holder() != l.holder()))
                    .count() as u64;
            }
            let mut counts = Self::holdings(&leases, hosts);
            let all_owned = counts.iter().sum::<usize>() == self.shards;
            counts.sort_unstable();
            let now = Instant::now();
            if all_owned && counts == even {
                first_even = true;
                let start = *since.get_or_insert(now);
                if now.duration_since(start) >= hold {
                    return Ok(Ok((start, changes)));
                }
            } else {
                since = None;
            }
            if now > until {
                let counts = Self::holdings(&leases, hosts);
                return Ok(Err(format!(
                    "holdings {counts:?} (want {even:?}) after {} s",
                    timeout.as_secs()
                )));
            }
            last = Some(leases);
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Waits until every key has output numbered at least `number`.
    async fn wait_output(&self, traffic: &Traffic, number: u64, timeout: Duration) -> Result<bool> {
        let until = Instant::now() + timeout;
        loop {
            self.remaining()?;
            let out = traffic.output();
            let ok = (0..traffic.keys.len())
                .all(|s| out.iter().any(|r| r.shard == s && r.number >= number));
            if ok {
                return Ok(true);
            }
            if Instant::now() > until {
                return Ok(false);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// A and B started one after the other, sharing the shards evenly, output flowing.
    async fn two_hosts(&self, traffic: &Traffic) -> Result<(Host, Host)> {
        let setup = Duration::from_secs(60) + self.timers.renew * (4 * self.shards as u32);
        let a = self.start_host(traffic, "hostA")?;
        if let Err(why) = self.wait_balanced(traffic, &[&a], setup).await? {
            bail!("setup: host A did not take every lease: {why}; see {}", traffic.dir.display());
        }
        let b = self.start_host(traffic, "hostB")?;
        if let Err(why) = self.wait_balanced(traffic, &[&a, &b], setup).await? {
            bail!("setup: A and B did not share the leases: {why}; see {}", traffic.dir.display());
        }
        let now = traffic.produced();
        if !self.wait_output(traffic, now, setup).await? {
            bail!("setup: the output did not catch up; see {}", traffic.dir.display());
        }
        Ok((a, b))
    }

    fn measure_timeout(&self) -> Duration {
        self.timers.failover * 3 + Duration::from_secs(30)
    }

    /// Scenario 1 (and 4): SIGKILL A.
    async fn failover(&self, round: usize, r: &mut Round) -> Result<()> {
        let traffic = self.traffic(&format!("kill{round}")).await?;
        let (mut a, b) = self.two_hosts(&traffic).await?;
        let leases = self.leases(&traffic.table).await;
        let of_a: Vec<String> = leases
            .iter()
            .filter(|(_, l)| l.owner.as_deref().is_some_and(|o| Host::owns(a.name, o)))
            .map(|(k, _)| k.clone())
            .collect();
        let shard_index: HashMap<String, usize> =
            traffic.shard_ids.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
        let dups_before = duplicates(&traffic.output());
        let killed_at = Instant::now();
        let killed_wall = SystemTime::now();
        a.signal(libc::SIGKILL);
        if a.wait(Duration::from_secs(10)).await.is_none() {
            bail!("host A did not die of SIGKILL");
        }
        let dead_wall = SystemTime::now() + DEAD_MARGIN;
        eprintln!("   killed A holding {of_a:?}");
        let until = Instant::now() + self.measure_timeout();
        let mut taken: HashMap<&String, Duration> = HashMap::new();
        let mut resumed: HashMap<&String, Duration> = HashMap::new();
        let complete = loop {
            self.remaining()?;
            let leases = self.leases(&traffic.table).await;
            let now = Instant::now();
            for shard in &of_a {
                let by_b = leases
                    .get(shard)
                    .and_then(|l| l.owner.as_deref())
                    .is_some_and(|o| Host::owns(b.name, o));
                if by_b {
                    taken.entry(shard).or_insert_with(|| now.duration_since(killed_at));
                }
            }
            let out = traffic.output();
            for shard in &of_a {
                let Some(&index) = shard_index.get(shard) else { continue };
                if resumed.contains_key(shard) {
                    continue;
                }
                let first = out
                    .iter()
                    .filter(|o| o.shard == index && o.arrival >= dead_wall)
                    .map(|o| o.arrival)
                    .min();
                if let Some(at) = first {
                    let after = at.duration_since(killed_wall).unwrap_or_default();
                    resumed.insert(shard, after);
                }
            }
            if taken.len() == of_a.len() && resumed.len() == of_a.len() {
                break true;
            }
            if now > until {
                break false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        };
        if !complete {
            r.notes.push(format!(
                "SIGKILL: after {} s, B took {} and resumed {} of A's {} shards",
                self.measure_timeout().as_secs(),
                taken.len(),
                resumed.len(),
                of_a.len()
            ));
        }
        if complete {
            r.failover_lease = taken.values().max().copied();
            r.failover_output = resumed.values().max().copied();
        }
        // Let B catch up with everything produced so far, then count.
        let now = traffic.produced();
        if self.wait_output(&traffic, now, self.measure_timeout()).await? {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let out = traffic.output();
            r.duplicates = Some(duplicates(&out).saturating_sub(dups_before));
            r.lost = lost(&out, traffic.keys.len());
        } else {
            r.notes.push("SIGKILL: B did not catch up with the producer".into());
        }
        drop(b);
        Ok(())
    }

    /// Scenario 2: SIGTERM A.
    async fn handover(&self, round: usize, r: &mut Round) -> Result<()> {
        let traffic = self.traffic(&format!("term{round}")).await?;
        let (mut a, b) = self.two_hosts(&traffic).await?;
        let signalled = Instant::now();
        a.signal(libc::SIGTERM);
        let until = signalled + self.measure_timeout();
        loop {
            self.remaining()?;
            let leases = self.leases(&traffic.table).await;
            if Self::holdings(&leases, &[&b]) == [self.shards] {
                r.handover = Some(signalled.elapsed());
                break;
            }
            if Instant::now() > until {
                r.notes.push(format!(
                    "SIGTERM: B held {:?} of {} shards after {} s",
                    Self::holdings(&leases, &[&b]),
                    self.shards,
                    self.measure_timeout().as_secs()
                ));
                break;
            }
            tokio::time::sleep(POLL_EVERY / 2).await;
        }
        match a.wait(Duration::from_secs(30)).await {
            Some(status) if status.success() => {}
            Some(status) => r.notes.push(format!("SIGTERM: A exited with {status}")),
            None => r.notes.push("SIGTERM: A did not exit within 30 s".into()),
        }
        drop(b);
        Ok(())
    }

    /// Scenario 3: C joins A and B.
    async fn rebalance(&self, round: usize, r: &mut Round) -> Result<()> {
        let traffic = self.traffic(&format!("join{round}")).await?;
        let (a, b) = self.two_hosts(&traffic).await?;
        let dups_before = duplicates(&traffic.output());
        let c = self.start_host(&traffic, "hostC")?;
        let timeout = self.timers.failover * 4 + Duration::from_secs(20);
        match self.wait_balanced(&traffic, &[&a, &b, &c], timeout).await? {
            Ok((at, changes)) => {
                r.rebalance = Some(at.duration_since(c.started));
                r.owner_changes_after_balance = Some(changes);
                let now = traffic.produced();
                if self.wait_output(&traffic, now, self.measure_timeout()).await? {
                    r.join_duplicates =
                        Some(duplicates(&traffic.output()).saturating_sub(dups_before));
                } else {
                    r.notes.push("rebalance: the hosts did not catch up with the producer".into());
                }
            }
            Err(why) => r.notes.push(format!("rebalance: not even: {why}")),
        }
        Ok(())
    }
}

/// The even spread of `shards` over `hosts`, sorted.
fn even_spread(shards: usize, hosts: usize) -> Vec<usize> {
    let mut spread: Vec<usize> =
        (0..hosts).map(|i| shards / hosts + usize::from(i < shards % hosts)).collect();
    spread.sort_unstable();
    spread
}

/// Extra deliveries: occurrences of each (shard, number) beyond the first.
fn duplicates(out: &[OutRecord]) -> u64 {
    let mut seen: HashMap<(usize, u64), u64> = HashMap::new();
    for o in out {
        *seen.entry((o.shard, o.number)).or_default() += 1;
    }
    seen.values().map(|n| n - 1).sum()
}

/// Numbers missing per shard between 0 and the highest delivered.
fn lost(out: &[OutRecord], shards: usize) -> u64 {
    (0..shards)
        .map(|s| {
            let mut numbers: Vec<u64> =
                out.iter().filter(|o| o.shard == s).map(|o| o.number).collect();
            numbers.sort_unstable();
            numbers.dedup();
            numbers.last().map_or(0, |max| max + 1 - numbers.len() as u64)
        })
        .sum()
}

/// Writes one record per key every [`PRODUCE_EVERY`], numbered per key from 0.
async fn produce(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    keys: Vec<String>,
    produced: Arc<Mutex<u64>>,
) {
    let mut tick = tokio::time::interval(PRODUCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut number = 0u64;
    loop {
        tick.tick().await;
        let entries: Vec<PutRecordsRequestEntry> = keys
            .iter()
            .filter_map(|key| {
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(format!("{key} {number}")))
                    .build()
                    .ok()
            })
            .collect();
        // Retried until every record of this number is in (per-key order kept).
        let mut pending = entries;
        while !pending.is_empty() {
            match kinesis
                .put_records()
                .stream_name(&stream)
                .set_records(Some(pending.clone()))
                .send()
                .await
            {
                Ok(out) => {
                    pending = out
                        .records()
                        .iter()
                        .zip(pending)
                        .filter(|(r, _)| r.error_code().is_some())
                        .map(|(_, e)| e)
                        .collect();
                }
                Err(error) => {
                    eprintln!("   producer: PutRecords failed: {error}; retrying");
                    tokio::time::sleep(PRODUCE_EVERY).await;
                }
            }
        }
        number += 1;
        if let Ok(mut p) = produced.lock() {
            *p = number;
        }
    }
}

/// Tails the output stream's shards, recording every record.
async fn tail(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    keys: Vec<String>,
    output: Arc<Mutex<Vec<OutRecord>>>,
) {
    let index: HashMap<String, usize> =
        keys.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
    let shards = match kinesis.list_shards().stream_name(&stream).send().await {
        Ok(s) => s.shards().iter().map(|s| s.shard_id().to_owned()).collect::<Vec<_>>(),
        Err(error) => {
            eprintln!("   tail: ListShards failed: {error}");
            return;
        }
    };
    let mut iterators = Vec::new();
    for shard in &shards {
        let it = kinesis
            .get_shard_iterator()
            .stream_name(&stream)
            .shard_id(shard)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await;
        match it.ok().and_then(|o| o.shard_iterator().map(str::to_owned)) {
            Some(it) => iterators.push(it),
            None => eprintln!("   tail: no iterator for {shard}"),
        }
    }
    loop {
        let mut any = false;
        for it in &mut iterators {
            let Ok(out) = kinesis.get_records().shard_iterator(it.clone()).send().await else {
                continue;
            };
            let now = SystemTime::now();
            let records: Vec<OutRecord> = out
                .records()
                .iter()
                .filter_map(|rec| {
                    let shard = *index.get(rec.partition_key()?)?;
                    let data = std::str::from_utf8(rec.data().as_ref()).ok()?;
                    let number = data.rsplit(' ').next()?.parse().ok()?;
                    let arrival = rec
                        .approximate_arrival_timestamp()
                        .and_then(|t| SystemTime::try_from(*t).ok())
                        .unwrap_or(now);
                    Some(OutRecord { shard, number, arrival })
                })
                .collect();
            any |= !records.is_empty();
            if let Ok(mut o) = output.lock() {
                o.extend(records);
            }
            if let Some(next) = out.next_shard_iterator() {
                *it = next.to_owned();
            }
        }
        if !any {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Median, min and max.
fn stats(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some((median, v[0], v[n - 1]))
}

/// The report: one line per figure, then the raw values and notes.
fn report(args: &FailoverArgs, t: &Timers, rounds: &[Round]) -> String {
    let secs = |d: Duration| d.as_secs_f64();
    let taker = secs(t.kcl_taker);
    let moves = args.shards / 3;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "failover: {} shards, FailoverTimeMillis={}, GracefulLeaseHandoffEnabled={}, \
         task.commit.ms={}, {} round(s); renew every {} ms (ours and KCL's), KCL 2.x taker \
         every {} ms",
        args.shards,
        args.failover_ms,
        args.graceful_handoff,
        args.commit_ms,
        rounds.len(),
        t.renew.as_millis(),
        t.kcl_taker.as_millis()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<44} {:>8} {:>8} {:>8} {:>5}  KCL 2.x expected",
        "figure", "median", "min", "max", "ok"
    );
    let kcl_failover = format!("{:.2}–{:.2} s (expiry seen by a taker scan)", taker, 2.0 * taker);
    let rows: Vec<(&str, Vec<Option<f64>>, bool, String)> = vec![
        (
            "1a SIGKILL failover: lease owned by B",
            rounds.iter().map(|r| r.failover_lease.map(secs)).collect(),
            true,
            kcl_failover.clone(),
        ),
        (
            "1b SIGKILL failover: first output after",
            rounds.iter().map(|r| r.failover_output.map(secs)).collect(),
            true,
            kcl_failover.clone(),
        ),
        (
            "2  SIGTERM hand-over: B owns every shard",
            rounds.iter().map(|r| r.handover.map(secs)).collect(),
            true,
            format!("{kcl_failover}; no release in 2.x"),
        ),
        (
            "3  rebalance: C joins, even and stable",
            rounds.iter().map(|r| r.rebalance.map(secs)).collect(),
            true,
            format!(
                "≈ {:.2} s ({moves} lease(s) × one steal per taker interval)",
                moves as f64 * taker
            ),
        ),
        (
            "3b owner changes after first even spread",
            rounds.iter().map(|r| r.owner_changes_after_balance.map(|n| n as f64)).collect(),
            false,
            "0".into(),
        ),
        (
            "3c duplicates while C joins",
            rounds.iter().map(|r| r.join_duplicates.map(|n| n as f64)).collect(),
            false,
            "records since each moved lease's last checkpoint".into(),
        ),
        (
            "4  duplicates per SIGKILL failover",
            rounds.iter().map(|r| r.duplicates.map(|n| n as f64)).collect(),
            false,
            "records after the last checkpoint (app-dependent)".into(),
        ),
    ];
    for (label, values, seconds, kcl) in &rows {
        let ok: Vec<f64> = values.iter().flatten().copied().collect();
        let cell = |x: f64| if *seconds { format!("{x:.2} s") } else { format!("{x:.0}") };
        let (median, min, max) = match stats(&ok) {
            Some((a, b, c)) => (cell(a), cell(b), cell(c)),
            None => ("—".into(), "—".into(), "—".into()),
        };
        let _ = writeln!(
            out,
            "{label:<44} {median:>8} {min:>8} {max:>8} {:>5}  {kcl}",
            format!("{}/{}", ok.len(), values.len())
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "ok: rounds that finished within the measurement's timeout. 1a/1b: the slowest of A's \
         shards, from SIGKILL;"
    );
    let _ = writeln!(
        out,
        "1b uses the output record's ApproximateArrivalTimestamp. 3: a lease in a hand-off \
         counts as its outgoing owner's. Records lost (any round): {}.",
        rounds.iter().map(|r| r.lost).sum::<u64>()
    );
    for (i, r) in rounds.iter().enumerate() {
        for note in &r.notes {
            let _ = writeln!(out, "round {}: {note}", i + 1);
        }
    }
    out
}
