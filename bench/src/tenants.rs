//! `tenants`: CPU fairness and memory of `kinesis-host serve`'s tenants, in process.
//!
//! It drives the executor path `serve` uses for every wasm call, without AWS: each shard is a
//! thread running batches through the host's [`ShardWorker`] (failure policy, retries, back-off,
//! instance re-creation after a trap) behind one shared [`CpuGate`] (see
//! `kinesis_host::fairness`), on one shared [`Runtime`]; records come from memory, so the task
//! calls are the bottleneck, as on a host whose input is fast. Well-behaved tenants run
//! `bench-batch` (it reads every byte of every record); a hostile tenant runs `spin-task` on
//! batches holding a `spin` record, so every call loops until the CPU deadline and is retried
//! with back-off, and, when its shard gives up, the shard starts over at once (harsher than the
//! host, which leaves a failed shard alone for twice `FailoverTimeMillis`).
//!
//! Phases of `--seconds` each, in `--rounds` rounds: the well-behaved tenants alone and with the
//! hostile tenants behind the gate, then the same with the gate switched off (no fairness: a
//! gate with a slot for every thread and no penalty, which only accounts the CPU), for
//! comparison. Rounds alternate which of alone and with comes first, so that a change in the
//! machine's load weighs on both; the ratio is the sum over the rounds. Then it
//! creates `--idle-instances` instances of the well-behaved task (each initialised, never
//! called) and prints the resident-memory growth per instance.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kinesis_host::config::RetryPolicy;
use kinesis_host::fairness::{CpuGate, FairnessConfig};
use kinesis_host::pipeline::{ShardWorker, Sink};
use kinesis_host_runtime::{
    Batch, BatchOutput, Clock, InstanceSpec, Limits, Outputs, RecordRef, Runtime, RuntimeConfig,
    TaskComponent, TaskInstance,
};

use crate::guests;
use crate::records::{self, HostRecord};

/// The target: well-behaved throughput with a hostile tenant over without.
const MIN_RATIO: f64 = 0.9;

/// Options of `tenants`.
#[derive(Debug, Clone, clap::Args)]
pub struct TenantsArgs {
    /// Well-behaved tenants.
    #[arg(long, default_value_t = 2)]
    pub tenants: usize,
    /// Shards per tenant, hostile ones included (one thread each: a shard runs one batch at a
    /// time).
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Hostile tenants (an endless loop in every batch).
    #[arg(long, default_value_t = 1)]
    pub hostile: usize,
    /// Seconds per phase (four phases per round).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Rounds of four phases: gated alone and with the hostile tenants, then ungated.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The hostile tenants' CPU deadline per batch (task.limits.batch.timeout.ms); the ratio
    /// does not depend on it as long as a phase spans several penalty cycles.
    #[arg(long, default_value_t = 250)]
    pub hostile_timeout_ms: u64,
    /// Records per batch (100 bytes each).
    #[arg(long, default_value_t = 500)]
    pub records: usize,
    /// Idle instances created for the memory figure.
    #[arg(long, default_value_t = 200)]
    pub idle_instances: usize,
    /// Wasm calls at once (default: the number of CPU cores, as `serve`).
    #[arg(long)]
    pub max_concurrent_calls: Option<usize>,
    /// Exit with an error when the ratio with the gate is below 0.9.
    #[arg(long)]
    pub check: bool,
}

/// Counts records committed.
struct Count<'a>(&'a AtomicU64);

impl Sink for Count<'_> {
    fn commit(&mut self, batch: &Batch, _output: BatchOutput) {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }

    fn poison(&mut self, _shard_id: &str, _record: RecordRef<'_>, _message: &str) {}
}

/// The system clock, whose back-off sleeps end early when the phase ends.
#[derive(Debug)]
struct PhaseClock(Arc<AtomicBool>);

impl Clock for PhaseClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) {
        let until = Instant::now() + duration;
        while !self.0.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5).min(duration));
        }
    }
}

struct Guests {
    batch: Arc<TaskComponent>,
    spin: Arc<TaskComponent>,
}

/// Builds `bench-batch` and the test guest `spin-task`.
fn build(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.current_dir(root).args([
        "build",
        "--profile",
        "guest",
        "--target",
        "wasm32-wasip2",
        "-p",
        "bench-batch",
        "-p",
        "spin-task",
    ]);
    eprintln!("Building the guests: {command:?}");
    let status = command.status().context("cannot run cargo to build the guests")?;
    if !status.success() {
        bail!("building the guests failed ({status}); `rustup target add wasm32-wasip2`?");
    }
    let dir = guests::target_dir(root).join("wasm32-wasip2").join("guest");
    Ok((dir.join("bench_batch.wasm"), dir.join("spin_task.wasm")))
}

fn spec(job: &str, shard: usize, limits: Limits) -> Arc<InstanceSpec> {
    Arc::new(InstanceSpec {
        job: job.to_owned(),
        stream: "bench".to_owned(),
        shard_id: format!("shardId-{shard:012}"),
        outputs: Outputs::Any,
        config: Vec::new(),
        limits,
    })
}

/// One phase: well-behaved records per second, and the time the hostile tenants' calls took.
fn phase(
    args: &TenantsArgs,
    guests: &Guests,
    records: &Arc<Vec<HostRecord>>,
    hostile: usize,
    gated: bool,
) -> (f64, Duration) {
    let mut config = FairnessConfig::default();
    if let Some(n) = args.max_concurrent_calls {
        config.max_concurrent_calls = n;
    }
    if !gated {
        config = FairnessConfig { max_concurrent_calls: 100_000, penalty_factor: 0.0, ..config };
    }
    let gate = Arc::new(CpuGate::new(config));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let jobs = (0..args.tenants)
        .map(|t| (format!("tenant-{t}"), false))
        .chain((0..hostile).map(|h| (format!("hostile-{h}"), true)));
    for (job, is_hostile) in jobs {
        gate.starting(&job);
        for shard in 0..args.shards {
            let (component, limits) = if is_hostile {
                let limits = Limits {
                    batch_timeout: Duration::from_millis(args.hostile_timeout_ms),
                    ..Limits::default()
                };
                (guests.spin.clone(), limits)
            } else {
                (guests.batch.clone(), Limits::default())
            };
            let (gate, stop, done, records, job) =
                (gate.clone(), stop.clone(), done.clone(), records.clone(), job.clone());
            let max_records = args.records;
            threads.push(std::thread::spawn(move || {
                let clock: Arc<dyn Clock> = Arc::new(PhaseClock(stop.clone()));
                let new_worker = || {
                    ShardWorker::new(
                        component.clone(),
                        spec(&job, shard, limits.clone()),
                        RetryPolicy::default(),
                        clock.clone(),
                    )
                    .with_gate(Some(gate.clone()))
                };
                let mut worker = new_worker();
                let ignored = AtomicU64::new(0);
                let mut sink = Count(if is_hostile { &ignored } else { &done });
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = Batch::new("bench", "shardId-0", max_records, 64 << 20);
                    for (i, record) in records.iter().enumerate() {
                        if is_hostile && i == 1 {
                            let mut spin = record.record_ref();
                            spin.data = b"spin";
                            batch.push(&spin);
                        } else {
                            batch.push(&record.record_ref());
                        }
                    }
                    if worker.run(batch, &mut sink).is_err() {
                        // The shard gave up; start it over at once.
                        worker = new_worker();
                    }
                }
            }));
        }
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let counted = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    let burned = (0..hostile).map(|h| gate.cpu_used(&format!("hostile-{h}"))).sum();
    stop.store(true, Ordering::Relaxed);
    for h in 0..hostile {
        gate.stopping(&format!("hostile-{h}"));
    }
    for thread in threads {
        let _ = thread.join();
    }
    (counted as f64 / elapsed.as_secs_f64(), burned)
}

/// Resident set size of this process, from `/proc/self/status`.
fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}

/// Resident bytes per idle, initialised instance.
fn idle_instance_bytes(guests: &Guests, count: usize) -> Result<f64> {
    // One first, so that code and lazily set-up runtime state are not counted.
    let warm = TaskInstance::new(&guests.batch, spec("idle", 0, Limits::default()))?;
    let before = rss_bytes()?;
    let mut instances = Vec::with_capacity(count);
    for i in 0..count {
        instances.push(TaskInstance::new(&guests.batch, spec("idle", i + 1, Limits::default()))?);
    }
    let after = rss_bytes()?;
    drop(instances);
    drop(warm);
    Ok(after.saturating_sub(before) as f64 / count as f64)
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// When the guests cannot be built or loaded, or with `--check`, when the ratio misses 0.9.
pub fn run(args: &TenantsArgs) -> Result<()> {
    ensure!(args.tenants > 0 && args.shards > 0, "--tenants and --shards must be at least 1");
    ensure!(args.records > 1, "--records must be at least 2");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let root = guests::workspace_root();
    let (batch, spin) = build(&root)?;
    let runtime = Runtime::new(RuntimeConfig::default()).context("cannot start the runtime")?;
    let guests = Guests {
        batch: runtime.load(&batch).with_context(|| format!("cannot load {}", batch.display()))?,
        spin: runtime.load(&spin).with_context(|| format!("cannot load {}", spin.display()))?,
    };
    let records = Arc::new(records::generate(args.records, 100));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "{} well-behaved and {} hostile tenants, {} shards each, {} s per phase, {cores} cores",
        args.tenants, args.hostile, args.shards, args.seconds
    );
    // Per mode (gated, ungated): summed records/s alone, with the hostile tenants, and the
    // hostile tenants' CPU. Rounds alternate the order (alone first, then with first), so a
    // change in the machine's load over the run weighs on both sides alike.
    let mut sums = [[0.0f64; 3]; 2];
    for round in 0..args.rounds {
        for (mode, gated) in [(0, true), (1, false)] {
            let order = if round % 2 == 0 { [0, args.hostile] } else { [args.hostile, 0] };
            for hostile in order {
                let (rate, hostile_cpu) = phase(args, &guests, &records, hostile, gated);
                let name = if gated { "gated" } else { "no gate" };
                let with = if hostile > 0 { "with hostile" } else { "alone" };
                eprintln!(
                    "  round {round}, {name}, {with}: {rate:.0} records/s; hostile calls took {:.2} s",
                    hostile_cpu.as_secs_f64()
                );
                sums[mode][usize::from(hostile > 0)] += rate;
                sums[mode][2] += hostile_cpu.as_secs_f64();
            }
        }
    }
    let rounds = args.rounds as f64;
    let alone = sums[0][0] / rounds;
    let with = sums[0][1] / rounds;
    let gated = sums[0][1] / sums[0][0];
    let ungated = sums[1][1] / sums[1][0];
    let burned = [sums[0][2] / rounds, sums[1][2] / rounds];
    let per_instance = idle_instance_bytes(&guests, args.idle_instances.max(1))?;

    let mut table = String::new();
    writeln!(table, "| figure | value |")?;
    writeln!(table, "|---|---|")?;
    writeln!(table, "| well-behaved throughput, alone (gated) | {alone:.0} records/s |")?;
    writeln!(table, "| with {} hostile tenant(s) (gated) | {with:.0} records/s |", args.hostile)?;
    writeln!(table, "| **ratio with the CPU gate** (target ≥ {MIN_RATIO}) | **{gated:.3}** |")?;
    writeln!(
        table,
        "| CPU the hostile tenant burned, with the gate | {:.1} s in {} s |",
        burned[0], args.seconds
    )?;
    writeln!(table, "| ratio without the gate (for comparison) | {ungated:.3} |")?;
    writeln!(
        table,
        "| CPU the hostile tenant burned, without the gate | {:.1} s in {} s |",
        burned[1], args.seconds
    )?;
    writeln!(
        table,
        "| resident memory per idle task instance ({} instances) | {:.0} KiB |",
        args.idle_instances,
        per_instance / 1024.0
    )?;
    print!("{table}");
    let out = guests::target_dir(&root).join("bench");
    if std::fs::create_dir_all(&out).is_ok() {
        let _ = std::fs::write(out.join("tenants.txt"), &table);
    }
    if args.check && gated < MIN_RATIO {
        bail!("the ratio with the CPU gate, {gated:.3}, is below {MIN_RATIO}");
    }
    Ok(())
}
