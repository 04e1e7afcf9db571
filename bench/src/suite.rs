//! `suite`: the benchmark suite of the whole host, one command, one table.
//!
//! 1. **Throughput** of one `kinesis-host run` process with the `bench-count` task (it only
//!    counts) over 1 KiB and 100 B records and 1, 64 and 512 shards, served by the Kinesis
//!    [stand-in](crate::standin) on 127.0.0.1; leases in dynalite with `FailoverTimeMillis` and
//!    `task.commit.ms` at ten minutes, so no lease or checkpoint write falls in the measured
//!    window. Beside each row, the floor: the `sdk-floor` process decoding the same answers with
//!    `aws-sdk-kinesis` and nothing else, measured the same way.
//! 2. **Put-to-process latency** on kinesis-local: the bench puts records whose data is their
//!    send time, `bench-count` logs each record's data, and the bench reads the host's stderr
//!    as it is written (no output stream, no second poll).
//! 3. **Cold start**: process start to the first record's log line, with the compiled-component
//!    cache warm and with `--no-cache`.
//! 4. **Boundary**: the `boundary` subcommand's table.
//!
//! It prints the report and writes it to `target/bench/suite.md`; logs of every host it ran are
//! in `target/bench/suite/`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use aws_sdk_kinesis::primitives::Blob;
use kinesis_host_coordinator::aws::{AwsClients, AwsSettings, StaticKeys};

use crate::boundary::{self, BoundaryArgs};
use crate::failover::{self, Emulators};
use crate::guests;
use crate::standin::{Shape, StandIn};

/// Records in every stand-in `GetRecords` answer.
const RECORDS_PER_CALL: usize = 1000;
/// A full Kinesis shard: 2 MB/s out.
const SHARD_MB_PER_S: f64 = 2.0;

/// Options of `suite`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Fewer shard counts (1 and 64), shorter windows, fewer samples and repetitions.
    #[arg(long)]
    pub quick: bool,
    /// Shard counts of the throughput figures (default 1,64,512; quick 1,64).
    #[arg(long, value_delimiter = ',')]
    pub shards: Option<Vec<usize>>,
    /// Skip the boundary figures.
    #[arg(long)]
    pub no_boundary: bool,
    /// Run only these parts: throughput, latency, cold, boundary (default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// `FailoverTimeMillis` of the throughput hosts (default 600000: no renewal in the window).
    #[arg(long, default_value_t = 600_000)]
    pub failover_ms: u64,
    /// Seconds of each throughput window (default 6; quick 3).
    #[arg(long)]
    pub window_secs: Option<u64>,
    /// Record sizes of the throughput figures (default 1024,100).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<usize>>,
}

impl SuiteArgs {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Settings derived from the options.
#[derive(Debug, Clone)]
struct Plan {
    shards: Vec<usize>,
    sizes: Vec<usize>,
    window: Duration,
    warmup: Duration,
    latency_samples: usize,
    cold_reps: usize,
    /// Repetitions of each throughput row (host and floor alternate).
    throughput_reps: usize,
    failover_ms: u64,
}

impl Plan {
    fn new(args: &SuiteArgs) -> Self {
        let default_shards = if args.quick { vec![1, 64] } else { vec![1, 64, 512] };
        Plan {
            shards: args.shards.clone().unwrap_or(default_shards),
            sizes: args.sizes.clone().unwrap_or_else(|| vec![1024, 100]),
            window: Duration::from_secs(args.window_secs.unwrap_or(if args.quick { 3 } else { 6 })),
            warmup: Duration::from_secs(if args.quick { 1 } else { 2 }),
            latency_samples: if args.quick { 40 } else { 150 },
            cold_reps: if args.quick { 2 } else { 4 },
            throughput_reps: if args.quick { 1 } else { 2 },
            failover_ms: args.failover_ms,
        }
    }
}

/// Everything the parts need.
struct Suite {
    plan: Plan,
    host_binary: PathBuf,
    floor_binary: PathBuf,
    guest: PathBuf,
    out_dir: PathBuf,
    dynamodb: String,
    kinesis: String,
    /// Aborts the whole run.
    deadline: Instant,
}

/// Runs the suite.
///
/// # Errors
/// When a build, the emulators or a measurement's setup fails, or the deadline passes.
pub fn run(args: &SuiteArgs) -> Result<()> {
    let plan = Plan::new(args);
    if plan.shards.is_empty() || plan.shards.contains(&0) {
        bail!("--shards needs counts of at least 1");
    }
    let started = Instant::now();
    let root = guests::workspace_root();
    let target = guests::target_dir(&root);
    let out_dir = target.join("bench").join("suite");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    // Private copies: other worktrees sharing the target directory may rebuild (replace) both
    // this benchmark and the host while it runs. `/proc/self/exe` is this very binary.
    let floor_binary = out_dir.join("kinesis-host-bench");
    std::fs::copy("/proc/self/exe", &floor_binary)
        .with_context(|| format!("cannot copy this benchmark to {}", floor_binary.display()))?;
    let (built, guest) = failover::build(&root, &target, "bench-count")?;
    let host_binary = out_dir.join("kinesis-host");
    std::fs::copy(&built, &host_binary)
        .with_context(|| format!("cannot copy {} to {}", built.display(), host_binary.display()))?;
    let emulators = Emulators::start(&root, &target.join("bench").join("suite-emulators"))?;
    let suite = Suite {
        plan: plan.clone(),
        host_binary,
        floor_binary,
        guest,
        out_dir,
        dynamodb: emulators.dynamodb.clone(),
        kinesis: emulators.kinesis.clone(),
        deadline: Instant::now() + Duration::from_secs(if args.quick { 600 } else { 1500 }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut report = String::new();
    let _ = writeln!(report, "# kinesis-host benchmark suite\n");
    let _ = writeln!(report, "{}\n", machine());
    if args.wants("throughput") {
        let throughput = suite.throughput()?;
        report.push_str(&render_throughput(&plan, &throughput));
    }
    if args.wants("latency") {
        let latency = runtime.block_on(suite.latency_all())?;
        report.push_str(&render_latency(&latency));
    }
    if args.wants("cold") {
        let cold = runtime.block_on(suite.cold_start())?;
        report.push_str(&render_cold(&cold));
    }
    drop(runtime);
    emulators.stop();
    if !args.no_boundary && args.wants("boundary") {
        let boundary = boundary::run(&BoundaryArgs {
            records: 500,
            sizes: vec![100, 1024],
            reps: if args.quick { 5 } else { 11 },
            min_ms: if args.quick { 100 } else { 200 },
            check: false,
        })?;
        let _ = writeln!(report, "## 4. Boundary (`boundary` subcommand)\n\n```\n{boundary}```\n");
    }
    let _ = writeln!(
        report,
        "Suite run time: {:.0} s (`{}`).",
        started.elapsed().as_secs_f64(),
        if args.quick { "suite --quick" } else { "suite" }
    );
    println!("\n{report}");
    let path = target.join("bench").join("suite.md");
    std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("Written to {} (host logs in {}).", path.display(), suite.out_dir.display());
    Ok(())
}

/// The machine, for the report's head.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(guests::workspace_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "Machine: {cpus} CPUs ({model}), {mem_gib:.0} GiB; commit {commit}; load average at start {load}."
    )
}

// ---------------------------------------------------------------------------------------------
// Processes

/// CPU seconds (user + system) of process `pid`, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // After ")": state is field 0; utime and stime are the 14th and 15th fields of the line.
    let (utime, stime) = (ticks(11), ticks(12));
    // SAFETY: `sysconf` has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / hz)
}

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// A child process, SIGKILLed on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn stop(mut self, grace: Duration) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: `kill` has no memory-safety preconditions; the pid is our unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines a child wrote to stderr, each with the time it was read; also copied to a log file.
type Lines = Arc<Mutex<Vec<(SystemTime, String)>>>;

/// Reads `child`'s stderr on a thread, stamping each line when it arrives.
fn capture_stderr(child: &mut Child, log: &Path) -> Result<Lines> {
    let stderr = child.stderr.take().context("the child's stderr is not piped")?;
    let mut file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let now = SystemTime::now();
            let _ = writeln!(file, "{line}");
            sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((now, line));
        }
    });
    Ok(lines)
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput

/// One measured process over one window.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    records_per_s: f64,
    mb_per_s: f64,
    cpu_s_per_gb: f64,
    cpu_us_per_call: f64,
    cores: f64,
    rss: u64,
    hwm: u64,
}

/// One row of the throughput table.
#[derive(Debug, Clone)]
struct ThroughputRow {
    size: usize,
    shards: usize,
    host: Option<Window>,
    floor: Option<Window>,
    /// host/floor CPU per GB of each repetition.
    ratios: Vec<f64>,
    note: Option<String>,
}

impl Window {
    /// The mean of every figure over `windows`; `None` for none. Peak RSS is the largest.
    fn mean(windows: &[Window]) -> Option<Window> {
        let n = windows.len() as f64;
        let avg = |f: fn(&Window) -> f64| windows.iter().map(f).sum::<f64>() / n;
        (!windows.is_empty()).then(|| Window {
            records_per_s: avg(|w| w.records_per_s),
            mb_per_s: avg(|w| w.mb_per_s),
            cpu_s_per_gb: avg(|w| w.cpu_s_per_gb),
            cpu_us_per_call: avg(|w| w.cpu_us_per_call),
            cores: avg(|w| w.cores),
            rss: avg(|w| w.rss as f64) as u64,
            hwm: windows.iter().map(|w| w.hwm).max().unwrap_or(0),
        })
    }
}

impl Suite {
    fn throughput(&self) -> Result<Vec<ThroughputRow>> {
        let mut rows = Vec::new();
        for &size in &self.plan.sizes {
            for &shards in &self.plan.shards {
                if Instant::now() > self.deadline {
                    bail!("the suite's deadline passed");
                }
                let mut note = None;
                let (mut hosts, mut floors) = (Vec::new(), Vec::new());
                for rep in 0..self.plan.throughput_reps {
                    eprintln!(
                        "== throughput: {size} B records, {shards} shards, repetition {}",
                        rep + 1
                    );
                    match self.throughput_host(size, shards) {
                        Ok(host) => hosts.extend(host),
                        Err(e) => note = Some(format!("host: {e:#}")),
                    }
                    match self.throughput_floor(size, shards) {
                        Ok(floor) => floors.extend(floor),
                        Err(e) => {
                            note.get_or_insert_with(String::new)
                                .push_str(&format!(" floor: {e:#}"));
                        }
                    }
                    eprintln!("   host {:?}\n   floor {:?}", hosts.last(), floors.last());
                }
                let ratios: Vec<f64> = hosts
                    .iter()
                    .zip(&floors)
                    .map(|(h, f)| h.cpu_s_per_gb / f.cpu_s_per_gb)
                    .collect();
                rows.push(ThroughputRow {
                    size,
                    shards,
                    host: Window::mean(&hosts),
                    floor: Window::mean(&floors),
                    ratios,
                    note,
                });
            }
        }
        Ok(rows)
    }

    /// Waits for every shard to be read, warms up, then measures `pid` over the window.
    fn measure(&self, proc: &mut Proc, standin: &StandIn, shards: usize) -> Result<Option<Window>> {
        let started = Instant::now();
        let setup = Duration::from_secs(60) + Duration::from_millis(100 * shards as u64);
        loop {
            let reading = standin.stats.shards_started.load(std::sync::atomic::Ordering::Relaxed);
            if reading as usize >= shards && standin.stats.snapshot().0 >= shards as u64 {
                break;
            }
            if !proc.alive() {
                bail!("the process exited before reading every shard");
            }
            if started.elapsed() > setup || Instant::now() > self.deadline {
                bail!("only {reading} of {shards} shards were read after {setup:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(self.plan.warmup);
        let pid = proc.pid();
        let (cpu0, served0, t0) = (cpu_seconds(pid)?, standin.stats.snapshot(), Instant::now());
        std::thread::sleep(self.plan.window);
        let (cpu1, served1, t1) = (cpu_seconds(pid)?, standin.stats.snapshot(), Instant::now());
        if !proc.alive() {
            bail!("the process exited during the measurement");
        }
        let (rss, hwm) = memory(pid);
        let secs = (t1 - t0).as_secs_f64();
        let calls = served1.0 - served0.0;
        let records = served1.1 - served0.1;
        let bytes = served1.2 - served0.2;
        let cpu = cpu1 - cpu0;
        if bytes == 0 {
            bail!("nothing was read in the window");
        }
        Ok(Some(Window {
            records_per_s: records as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            cpu_s_per_gb: cpu / (bytes as f64 / 1e9),
            cpu_us_per_call: cpu * 1e6 / calls.max(1) as f64,
            cores: cpu / secs,
            rss,
            hwm,
        }))
    }

    fn standin(&self, size: usize, shards: usize) -> Result<StandIn> {
        StandIn::start(
            Shape { shards, records_per_call: RECORDS_PER_CALL, record_size: size },
            Duration::from_secs(300),
        )
    }

    fn throughput_host(&self, size: usize, shards: usize) -> Result<Option<Window>> {
        let standin = self.standin(size, shards)?;
        // A fresh lease table every run: a killed host's leases stay taken for ten minutes.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("tp-{size}-{shards}-{}-{run}", std::process::id());
        let dir = self.out_dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("job.properties");
        std::fs::write(
            &config,
            standin.job_properties(
                &name,
                &self.dynamodb,
                &[
                    ("IdleTimeBetweenReadsInMillis", "1".to_owned()),
                    ("FailoverTimeMillis", self.plan.failover_ms.to_string()),
                ],
            ),
        )?;
        let log = std::fs::File::create(dir.join("host.log"))?;
        let child = Command::new(&self.host_binary)
            .arg("--cache-dir")
            .arg(self.out_dir.join("cache"))
            .arg("run")
            .arg(&self.guest)
            .arg("--config")
            .arg(&config)
            .env("HOSTNAME", "bench")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start kinesis-host")?;
        let mut proc = Proc { child };
        let window = self.measure(&mut proc, &standin, shards);
        drop(proc);
        let unknown = standin.stats.unknown.load(std::sync::atomic::Ordering::Relaxed);
        if unknown > 0 {
            eprintln!("   note: the host made {unknown} calls the stand-in does not serve");
        }
        window
    }

    fn throughput_floor(&self, size: usize, shards: usize) -> Result<Option<Window>> {
        let standin = self.standin(size, shards)?;
        let child = Command::new(&self.floor_binary)
            .args(["sdk-floor", "--endpoint", &standin.endpoint, "--shards", &shards.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start sdk-floor")?;
        let mut proc = Proc { child };
        self.measure(&mut proc, &standin, shards)
    }
}

fn render_throughput(plan: &Plan, rows: &[ThroughputRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## 1. Throughput: one `kinesis-host run`, task `bench-count`, Kinesis stand-in on loopback\n"
    );
    let _ = writeln!(
        out,
        "{RECORDS_PER_CALL} records per GetRecords answer, IdleTimeBetweenReadsInMillis=1, leases in dynalite \
         (FailoverTimeMillis={}, task.commit.ms=600000; at the default 600000 no lease write falls in the window). \
         Window {} s after all shards \
         were read and {} s of warm-up; {} repetition(s), host and floor alternating, means shown (host/floor: of the means, \
         and the range over repetitions). CPU is user+system of the process from /proc/<pid>/stat; GB = 10^9 payload \
         bytes; floor = `sdk-floor`, aws-sdk-kinesis decoding the same answers and nothing else.\n",
        plan.failover_ms,
        plan.window.as_secs(),
        plan.warmup.as_secs(),
        plan.throughput_reps
    );
    let _ = writeln!(
        out,
        "| record | shards | host rec/s | host MB/s | host cores | host CPU-s/GB | floor CPU-s/GB | host/floor | floor µs/call | floor MB/s | peak RSS | RSS/shard |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1 << 20) as f64);
    for row in rows {
        let one = rows
            .iter()
            .find(|r| r.size == row.size && r.shards == 1)
            .and_then(|r| r.host)
            .map(|h| h.rss);
        let h = row.host;
        let f = row.floor;
        let per_shard = match (h, one) {
            (Some(h), Some(one)) if row.shards > 1 => {
                format!(
                    "{:.2} MiB",
                    (h.rss as f64 - one as f64) / (row.shards - 1) as f64 / (1 << 20) as f64
                )
            }
            _ => "—".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            if row.size >= 1024 {
                format!("{} KiB", row.size / 1024)
            } else {
                format!("{} B", row.size)
            },
            row.shards,
            h.map_or("—".into(), |h| format!("{:.0} k", h.records_per_s / 1e3)),
            h.map_or("—".into(), |h| format!("{:.0}", h.mb_per_s)),
            h.map_or("—".into(), |h| format!("{:.2}", h.cores)),
            h.map_or("—".into(), |h| format!("{:.2}", h.cpu_s_per_gb)),
            f.map_or("—".into(), |f| format!("{:.2}", f.cpu_s_per_gb)),
            match (h, f) {
                (Some(h), Some(f)) if row.ratios.len() > 1 => format!(
                    "**{:.2}×** ({:.2}–{:.2})",
                    h.cpu_s_per_gb / f.cpu_s_per_gb,
                    row.ratios.iter().copied().fold(f64::INFINITY, f64::min),
                    row.ratios.iter().copied().fold(0.0, f64::max)
                ),
                (Some(h), Some(f)) => format!("**{:.2}×**", h.cpu_s_per_gb / f.cpu_s_per_gb),
                _ => "—".into(),
            },
            f.map_or("—".into(), |f| format!("{:.0}", f.cpu_us_per_call)),
            f.map_or("—".into(), |f| format!("{:.0}", f.mb_per_s)),
            h.map_or("—".into(), |h| mib(h.hwm)),
            per_shard,
        );
    }
    let _ = writeln!(out);
    for row in rows.iter().filter(|r| r.note.is_some()) {
        let _ = writeln!(
            out,
            "- {} B × {} shards: {}",
            row.size,
            row.shards,
            row.note.as_deref().unwrap_or_default()
        );
    }
    // Largest shard count at 2 MB/s: measured (the best aggregate rate ÷ 2 MB/s, the stand-in
    // sharing the two cores) and from CPU alone (all cores ÷ the CPU one full shard costs).
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    for &size in &plan.sizes {
        let best = rows
            .iter()
            .filter(|r| r.size == size)
            .filter_map(|r| r.host.map(|h| (r.shards, h)))
            .max_by(|a, b| a.1.mb_per_s.total_cmp(&b.1.mb_per_s));
        if let Some((shards, h)) = best {
            let measured = (h.mb_per_s / SHARD_MB_PER_S).floor();
            let by_cpu = (cores / (h.cpu_s_per_gb * SHARD_MB_PER_S / 1e3)).floor();
            let _ = writeln!(
                out,
                "- {} B records: at most **{measured:.0} shards at 2 MB/s** each on this {cores:.0}-CPU machine \
                 (best aggregate {:.0} MB/s, at {shards} shards, with the stand-in on the same CPUs); \
                 {by_cpu:.0} from the host's CPU cost alone ({cores:.0} cores ÷ {:.2} CPU-s/GB × 2 MB/s).",
                size, h.mb_per_s, h.cpu_s_per_gb
            );
        }
    }
    let _ = writeln!(out, "- Target: host/floor ≤ 1.5×.\n");
    out
}

// ---------------------------------------------------------------------------------------------
// 2. Latency

/// One latency row.
#[derive(Debug, Clone)]
struct LatencyRow {
    mode: &'static str,
    idle_ms: u64,
    result: Result<(Duration, Duration, Duration, usize), String>,
}

impl Suite {
    fn settings(&self) -> AwsSettings {
        AwsSettings {
            region: Some("us-east-1".into()),
            keys: Some(StaticKeys {
                access_key_id: "test".into(),
                secret_access_key: "test".into(),
            }),
            kinesis_endpoint: Some(self.kinesis.clone()),
            dynamodb_endpoint: Some(self.dynamodb.clone()),
            ..AwsSettings::default()
        }
    }

    async fn create_stream(&self, clients: &AwsClients, stream: &str) -> Result<()> {
        clients
            .kinesis
            .create_stream()
            .stream_name(stream)
            .shard_count(1)
            .send()
            .await
            .with_context(|| format!("CreateStream {stream}"))?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let out = clients.kinesis.describe_stream_summary().stream_name(stream).send().await;
            if out
                .ok()
                .and_then(|o| o.stream_description_summary)
                .is_some_and(|s| s.stream_status == aws_sdk_kinesis::types::StreamStatus::Active)
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("stream {stream} did not become active in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A job file on the emulators for `stream`, with `bench-count` logging every record.
    fn job_file(&self, dir: &Path, name: &str, stream: &str, extra: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("job.properties");
        std::fs::write(
            &config,
            format!(
                "job.name={name}\n\
                 task.inputs=kinesis.{stream}\n\
                 task.commit.ms=1000\n\
                 task.config.log=true\n\
                 systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n\
                 systems.kinesis.aws.region=us-east-1\n\
                 systems.kinesis.aws.accessKey=test\n\
                 sensitive.systems.kinesis.aws.secretKey=test\n\
                 systems.kinesis.aws.kinesis.endpoint={}\n\
                 systems.kinesis.aws.dynamodb.endpoint={}\n\
                 systems.kinesis.aws.kcl.InitialPositionInStream=TRIM_HORIZON\n\
                 {extra}",
                self.kinesis, self.dynamodb,
            ),
        )?;
        Ok(config)
    }

    fn spawn_logging_host(
        &self,
        config: &Path,
        log: &Path,
        cache: Option<&Path>,
    ) -> Result<(Proc, Lines)> {
        let mut command = Command::new(&self.host_binary);
        match cache {
            Some(dir) => command.arg("--cache-dir").arg(dir),
            None => command.arg("--no-cache"),
        };
        let mut child = command
            .arg("run")
            .arg(&self.guest)
            .arg("--config")
            .arg(config)
            .env("HOSTNAME", "bench")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start kinesis-host")?;
        let lines = capture_stderr(&mut child, log)?;
        Ok((Proc { child }, lines))
    }

    async fn latency_all(&self) -> Result<Vec<LatencyRow>> {
        let clients = AwsClients::new(&self.settings()).await;
        let mut rows = Vec::new();
        for (mode, idle_ms) in [("POLLING", 1000), ("POLLING", 200), ("FANOUT", 1000)] {
            eprintln!("== latency: {mode}, IdleTimeBetweenReadsInMillis={idle_ms}");
            let result = self.latency(&clients, mode, idle_ms).await.map_err(|e| format!("{e:#}"));
            eprintln!("   {result:?}");
            rows.push(LatencyRow { mode, idle_ms, result });
        }
        Ok(rows)
    }

    async fn latency(
        &self,
        clients: &AwsClients,
        mode: &str,
        idle_ms: u64,
    ) -> Result<(Duration, Duration, Duration, usize)> {
        let name = format!("lat-{}-{idle_ms}-{}", mode.to_lowercase(), std::process::id());
        self.create_stream(clients, &name).await?;
        let mut extra = format!("systems.kinesis.aws.kcl.IdleTimeBetweenReadsInMillis={idle_ms}\n");
        if mode == "FANOUT" {
            extra.push_str(
                "systems.kinesis.aws.kcl.RetrievalMode=FANOUT\nsystems.kinesis.aws.kcl.ConsumerName=bench-latency\n",
            );
        }
        let dir = self.out_dir.join(&name);
        let config = self.job_file(&dir, &name, &name, &extra)?;
        let (host, lines) = self.spawn_logging_host(
            &config,
            &dir.join("host.log"),
            Some(&self.out_dir.join("cache")),
        )?;
        let ignored = |lines: &Lines| {
            lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|(_, l)| l.contains("RetrievalMode is ignored"))
        };
        let put = |data: String| {
            clients
                .kinesis
                .put_record()
                .stream_name(&name)
                .partition_key("k")
                .data(Blob::new(data))
                .send()
        };
        // Warm-up: until the host processes records at all.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            put("warm".to_owned()).await.context("PutRecord")?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if mode == "FANOUT" && ignored(&lines) {
                bail!(
                    "not available: this build of kinesis-host ignores RetrievalMode (no enhanced fan-out)"
                );
            }
            if lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|(_, l)| l.contains("warm"))
            {
                break;
            }
            if Instant::now() > until {
                bail!("the host processed no record within 60 s (see {})", dir.display());
            }
        }
        if mode == "FANOUT" {
            let consumers = clients
                .kinesis
                .describe_stream_summary()
                .stream_name(&name)
                .send()
                .await
                .ok()
                .and_then(|o| o.stream_description_summary)
                .and_then(|s| s.consumer_count)
                .unwrap_or(0);
            if consumers == 0 {
                bail!(
                    "not available: the host registered no stream consumer, so it is polling, not using enhanced fan-out"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(idle_ms + 200)).await;
        let samples = self.plan.latency_samples;
        for i in 0..samples {
            let sent = unix_nanos(SystemTime::now());
            put(format!("lat {sent} {i}")).await.context("PutRecord")?;
            tokio::time::sleep(Duration::from_millis(67)).await;
        }
        let until = Instant::now() + Duration::from_millis(idle_ms * 3) + Duration::from_secs(10);
        let latencies = loop {
            let latencies: Vec<Duration> = lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .filter_map(|(at, line)| {
                    let rest = &line[line.find("lat ")? + 4..];
                    let sent: u128 = rest.split_whitespace().next()?.parse().ok()?;
                    let at = unix_nanos(*at);
                    Some(Duration::from_nanos(u64::try_from(at.saturating_sub(sent)).ok()?))
                })
                .collect();
            if latencies.len() >= samples || Instant::now() > until {
                break latencies;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        host.stop(Duration::from_secs(10));
        if latencies.is_empty() {
            bail!("no sample arrived");
        }
        let mut sorted = latencies;
        sorted.sort();
        let pick =
            |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
        Ok((pick(0.5), pick(0.99), sorted[sorted.len() - 1], sorted.len()))
    }
}

fn render_latency(rows: &[LatencyRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## 2. Put-to-process latency on kinesis-local (1 shard)\n");
    let _ = writeln!(
        out,
        "From just before PutRecord (the send time is the record's data) to the moment the bench reads the task's log \
         line of that record from the host's stderr pipe; one record every ~67 ms after a warm-up.\n"
    );
    let _ = writeln!(out, "| mode | IdleTimeBetweenReadsInMillis | samples | p50 | p99 | max |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    for row in rows {
        match &row.result {
            Ok((p50, p99, max, n)) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {n} | {} | {} | {} |",
                    row.mode,
                    row.idle_ms,
                    ms(*p50),
                    ms(*p99),
                    ms(*max)
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | — | {} | | |",
                    row.mode,
                    row.idle_ms,
                    e.replace('|', "/")
                );
            }
        }
    }
    let _ = writeln!(out);
    out
}

// ---------------------------------------------------------------------------------------------
// 3. Cold start

impl Suite {
    async fn cold_start(&self) -> Result<Vec<(bool, Vec<Duration>)>> {
        eprintln!("== cold start");
        let clients = AwsClients::new(&self.settings()).await;
        let name = format!("cold-{}", std::process::id());
        self.create_stream(&clients, &name).await?;
        let dir = self.out_dir.join(&name);
        let config = self.job_file(
            &dir,
            &name,
            &name,
            "systems.kinesis.aws.kcl.IdleTimeBetweenReadsInMillis=200\n",
        )?;
        let cache = self.out_dir.join("cold-cache");
        let mut results = vec![(true, Vec::new()), (false, Vec::new())];
        // Round 0 creates the lease table and fills the cache; it is not counted.
        for round in 0..=self.plan.cold_reps {
            for (cached, times) in &mut results {
                let marker = format!("cold-{round}-{cached}");
                clients
                    .kinesis
                    .put_record()
                    .stream_name(&name)
                    .partition_key("k")
                    .data(Blob::new(marker.clone()))
                    .send()
                    .await
                    .context("PutRecord")?;
                let log = dir.join(format!("host-{round}-{cached}.log"));
                let start = Instant::now();
                let (host, lines) =
                    self.spawn_logging_host(&config, &log, cached.then_some(cache.as_path()))?;
                let until = start + Duration::from_secs(60);
                let took = loop {
                    if let Some((at, _)) = lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .find(|(_, l)| l.contains(&marker))
                    {
                        let wall = SystemTime::now().duration_since(*at).unwrap_or_default();
                        break start.elapsed().saturating_sub(wall);
                    }
                    if Instant::now() > until {
                        bail!("no record processed within 60 s of start (see {})", log.display());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                // SIGTERM: the host checkpoints and releases the lease for the next round.
                host.stop(Duration::from_secs(15));
                if round > 0 {
                    times.push(took);
                }
            }
        }
        Ok(results)
    }
}

fn render_cold(results: &[(bool, Vec<Duration>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## 3. Cold start: process start to first record processed\n");
    let _ = writeln!(
        out,
        "kinesis-local + dynalite; the lease table exists and the lease is free (the previous run stopped with SIGTERM); \
         one new record waits after the checkpoint. Time from spawning `kinesis-host run` to reading the task's log line \
         of that record.\n"
    );
    let _ = writeln!(out, "| compiled-component cache | runs | median | min | max |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    for (cached, times) in results {
        let mut sorted = times.clone();
        sorted.sort();
        if sorted.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            if *cached { "warm (`--cache-dir`)" } else { "none (`--no-cache`)" },
            sorted.len(),
            ms(sorted[sorted.len() / 2]),
            ms(sorted[0]),
            ms(sorted[sorted.len() - 1])
        );
    }
    let _ = writeln!(out);
    out
}
