//! `kinesis-host`: runs tasks written as WebAssembly components over Amazon Kinesis records.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kinesis_host_runtime::{Runtime, RuntimeConfig, SystemClock, TASK_INTERFACE};

use kinesis_host::config::JobConfig;
use kinesis_host::replay;

/// Run tasks written as sandboxed WebAssembly components over Amazon Kinesis records.
#[derive(Debug, Parser)]
#[command(name = "kinesis-host", version, about)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Where compiled components are cached (default: $XDG_CACHE_HOME/kinesis-host or
    /// ~/.cache/kinesis-host).
    #[arg(long, global = true, env = "KINESIS_HOST_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile components every time instead of using the cache.
    #[arg(long, global = true)]
    no_cache: bool,
    /// Log filter, as RUST_LOG (for example `debug` or `info,task=warn`).
    #[arg(long, global = true, env = "KINESIS_HOST_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume the job's input streams with the task, checkpointing in a KCL lease table.
    Run(RunArgs),
    /// Run a task over records from a JSON Lines file, locally, with no AWS.
    Replay(ReplayArgs),
    /// Check that a component is a kinesis-host task, and list what it imports.
    Check(CheckArgs),
    /// Show the job's shards, leases, owners, checkpoints and lag, per input stream.
    Status(StatusArgs),
    /// Run every job of a folder (one sub-folder per job: job.properties and one .wasm), each
    /// sandboxed and isolated from the others; follows changes to the folder.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The jobs folder: one sub-folder per job, holding its job.properties and one .wasm file.
    #[arg(long, value_name = "DIR")]
    jobs: PathBuf,
    /// Where to serve /metrics, /healthz and /readyz for all jobs (host:port).
    #[arg(long, value_name = "ADDRESS")]
    metrics_address: Option<String>,
    /// Wasm calls running at once, over all jobs (default: the number of CPU cores).
    #[arg(long, value_name = "N")]
    max_concurrent_calls: Option<usize>,
    /// A call that fails after burning CPU makes its job wait this many times as long.
    #[arg(long, value_name = "FACTOR", default_value_t = 9.0)]
    cpu_penalty_factor: f64,
    /// The longest CPU penalty, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    cpu_penalty_max_ms: u64,
    /// Quiet time after a change in the jobs folder before it is rescanned, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    debounce_ms: u64,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The task component (.wasm).
    task: PathBuf,
    /// The job's settings: Samza's job.properties keys plus kinesis-host's own.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The task component (.wasm).
    task: PathBuf,
    /// Records, one JSON object per line: `{"partition_key": "k", "text": "…"}` or with
    /// `"data": "<base64>"`; optional `shard_id`, `stream`, `sequence_number`,
    /// `sub_sequence_number`, `explicit_hash_key`, `arrival_millis`.
    #[arg(long, short, value_name = "FILE")]
    input: PathBuf,
    /// The job's settings (task settings, outputs, limits) in job.properties format.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where to write the emitted records as JSON Lines (default: stdout).
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The stream name for records whose line names none.
    #[arg(long, default_value = "records")]
    stream: String,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The task component (.wasm).
    task: PathBuf,
    /// Also validate this job.properties.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The job's settings: Samza's job.properties keys plus kinesis-host's own.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Print one JSON document (full values) instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.global.log);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            // Errors can quote what files and tasks hold: never a control character as is.
            eprintln!("error: {}", kinesis_host_runtime::escape_control(&error_chain(&error)));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping causes that the message before already quotes (our
/// errors say what their source said).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
    }
    text
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .or_else(|_| tracing_subscriber::EnvFilter::try_new("info"))
        .unwrap_or_default()
        .add_directive("wasmtime=warn".parse().unwrap_or_default())
        .add_directive("cranelift=warn".parse().unwrap_or_default());
    tracing_subscriber::fmt()
        .fmt_fields(escaping_fields())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Formats an event's fields as tracing's default does (the message, then `name=value` with
/// values in `Debug` form), but with every control character escaped: a value can hold text a
/// task, a record or a file chose, which must never end the line or start one that looks like
/// the host's.
fn escaping_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt as _;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        let text = kinesis_host_runtime::escape_control(&text);
        match field.name() {
            "message" => write!(writer, "{text}"),
            name => write!(writer, "{}={text}", name.strip_prefix("r#").unwrap_or(name)),
        }
    })
    .delimited(" ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(&cli.global),
        ..RuntimeConfig::default()
    })?;
    match cli.command {
        Command::Run(args) => run_job(&runtime, args),
        Command::Replay(args) => replay(&runtime, args),
        Command::Check(args) => check(&runtime, args),
        Command::Status(args) => status_cmd(args),
        Command::Serve(args) => serve(runtime, cache_dir(&cli.global), args),
    }
}

fn cache_dir(global: &GlobalArgs) -> Option<PathBuf> {
    if global.no_cache {
        return None;
    }
    global.cache_dir.clone().or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(base.join("kinesis-host"))
    })
}

fn load_config(path: Option<&Path>) -> anyhow::Result<JobConfig> {
    Ok(match path {
        Some(path) => JobConfig::load(path)?,
        None => JobConfig::default(),
    })
}

fn run_job(runtime: &Runtime, args: RunArgs) -> anyhow::Result<ExitCode> {
    let props = kinesis_host::config::read_properties(&args.config)?;
    let job = JobConfig::from_properties(&args.config, &props)?;
    let (run, warnings) = kinesis_host::samza::parse_run_config(&args.config, &props)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let runtime = &runtime_for(runtime, &job)?;
    let component = runtime.load(&args.task)?;
    let tokio = async_runtime()?;
    tokio.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        stop_on_signal(
            stop,
            "Stopping: finishing the batches in flight, then checkpointing and releasing leases (signal again to exit at once).",
        );
        kinesis_host::run::run(run, job, component, Arc::new(SystemClock), stopped).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `runtime`, or for a job with `task.limits.fuel.per.batch` a runtime whose engine meters fuel
/// (an engine-wide setting that slows every guest, so only such jobs get it).
fn runtime_for(runtime: &Runtime, job: &JobConfig) -> anyhow::Result<Runtime> {
    if job.limits.fuel_per_batch.is_none() {
        return Ok(runtime.clone());
    }
    Ok(Runtime::new(RuntimeConfig {
        cache_dir: runtime.cache_dir().map(Path::to_path_buf),
        fuel: true,
        ..RuntimeConfig::default()
    })?)
}

fn serve(
    runtime: Runtime,
    cache_dir: Option<PathBuf>,
    args: ServeArgs,
) -> anyhow::Result<ExitCode> {
    let defaults = kinesis_host::fairness::FairnessConfig::default();
    let config = kinesis_host::serve::ServeConfig {
        jobs_dir: args.jobs,
        metrics_address: args.metrics_address,
        fairness: kinesis_host::fairness::FairnessConfig {
            max_concurrent_calls: args
                .max_concurrent_calls
                .unwrap_or(defaults.max_concurrent_calls),
            penalty_factor: args.cpu_penalty_factor,
            max_penalty: std::time::Duration::from_millis(args.cpu_penalty_max_ms),
        },
        debounce: std::time::Duration::from_millis(args.debounce_ms),
        cache_dir,
    };
    let tokio = async_runtime()?;
    tokio.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let reload = Arc::new(tokio::sync::Notify::new());
        stop_on_signal(stop, "Stopping (signal again to exit at once).");
        #[cfg(unix)]
        {
            let reload = reload.clone();
            if let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        reload.notify_one();
                    }
                });
            }
        }
        kinesis_host::serve::serve(config, runtime, Arc::new(SystemClock), stopped, reload).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The multi-threaded async runtime `run` and `serve` work on (wasm calls go to its blocking
/// pool).
fn async_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// On SIGTERM or SIGINT, logs `message` and sets `stop` (a graceful stop); on a second signal,
/// exits at once with code 130.
fn stop_on_signal(stop: tokio::sync::watch::Sender<bool>, message: &'static str) {
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("{message}");
        let _ = stop.send(true);
        shutdown_signal().await;
        tracing::warn!("Second signal: exiting now.");
        std::process::exit(130);
    });
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn replay(runtime: &Runtime, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_deref())?;
    let input = replay::read_input(
        &args.input,
        &args.stream,
        config.batch.max_record_bytes,
        replay::now_millis(),
    )?;
    let runtime = &runtime_for(runtime, &config)?;
    let component = runtime.load(&args.task)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create output file {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let summary = replay::replay(&component, &config, input, Arc::new(SystemClock), &mut out)
        .context("cannot write the emitted records")?;
    drop(out);
    let s = summary.stats;
    let peak = replay::peak_resident_bytes()
        .map(|b| format!("; peak memory {} MiB", b.div_ceil(1 << 20)))
        .unwrap_or_default();
    eprintln!(
        "replay: {} records in {} batches from {} shards; {} emitted; {} poison records, {} retries, {} traps; {} shards failed; {:.1} ms{peak}",
        s.records,
        s.batches,
        summary.shards,
        s.emitted,
        s.poison_records,
        s.retries,
        s.traps,
        summary.failed.len(),
        summary.elapsed.as_secs_f64() * 1000.0,
    );
    for failure in &summary.failed {
        eprintln!("error: {}", kinesis_host_runtime::escape_control(&failure.to_string()));
    }
    Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn check(runtime: &Runtime, args: CheckArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.config {
        JobConfig::load(path)?;
    }
    let started = std::time::Instant::now();
    let component = runtime.load(&args.task)?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let report = component.report();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: a kinesis-host task ({TASK_INTERFACE}), {} bytes",
        args.task.display(),
        report.size
    )?;
    let compiled = if report.from_cache { "taken from the cache" } else { "compiled now" };
    writeln!(out, "machine code: {compiled} (loaded in {load_ms:.1} ms)")?;
    writeln!(out, "exports:")?;
    for name in &report.exports {
        writeln!(out, "  {name}")?;
    }
    writeln!(out, "imports:")?;
    for name in &report.imports {
        let note = if name.starts_with("wasi:") {
            "  (WASI, empty context: no files, environment or sockets)"
        } else {
            ""
        };
        writeln!(out, "  {name}{note}")?;
    }
    if let Some(path) = &args.config {
        writeln!(out, "config: {} is valid", path.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn status_cmd(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let props = kinesis_host::config::read_properties(&args.config)?;
    let (run, warnings) = kinesis_host::samza::parse_run_config(&args.config, &props)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let streams = tokio.block_on(kinesis_host::status::status(&run.inputs));
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &streams)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", kinesis_host::status::render_text(&streams))?;
    }
    out.flush()?;
    let mut failed = false;
    for error in streams.iter().filter_map(|s| s.error.as_deref()) {
        eprintln!("error: {}", kinesis_host_runtime::escape_control(error));
        failed = true;
    }
    for error in kinesis_host::status::damaged_items(&streams) {
        eprintln!("error: {}", kinesis_host_runtime::escape_control(&error));
        failed = true;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
