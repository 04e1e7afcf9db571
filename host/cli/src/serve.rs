//! `kinesis-host serve --jobs DIR`: one host process running many users' jobs, each as
//! `kinesis-host run` would run it, side by side and isolated from each other.
//!
//! **Layout.** Every folder directly under `DIR` whose name does not start with `.` is one job:
//! it holds the job's `job.properties` and exactly one `.wasm` file, its task. Other files are
//! ignored. The folder's name identifies the job in logs and in
//! `kinesis_host_serve_job_errors_total`; `job.name` labels its metrics and must be unique among
//! the jobs, as must the lease tables of their inputs.
//!
//! **Changes.** The folder is watched (debounced: rescanned once the changed files have been quiet
//! for [`ServeConfig::debounce`]), and `SIGHUP` rescans it too; the scan runs off the async
//! runtime. A job whose two files are unchanged (by content; a component whose size, times and
//! inode are unchanged since it was digested is not read again) keeps running untouched. A new
//! folder starts a job; a folder removed stops its job gracefully (batches in flight finished,
//! checkpoints written, leases released). A changed job is first validated (its properties parsed,
//! its component loaded and type-checked); only then is the old version stopped gracefully and the
//! new one started, which takes the released leases at once and resumes after the checkpoints, so
//! no record is lost or processed again. Invalid files are reported (an error log line, the counter
//! and the `invalid` state of the jobs gauge) while the previous version, if any, keeps running;
//! they are tried again when the folder's files change, or on `SIGHUP`. A job that stops on its own
//! with an error (a stream that does not exist, for example) is reported the same way and also
//! retried on the next change or `SIGHUP`. Stopping jobs drain in the background while the
//! supervisor goes on (a slow drain holds up only the version that replaces it, or a job taking
//! over its name or lease tables), and a job removed or ended by itself leaves the CPU gate, so
//! it no longer lowers the others' share.
//!
//! **Sharing.** All jobs share one wasmtime [`Runtime`] (one engine, one epoch ticker, one
//! compiled-code cache); jobs with `task.limits.fuel.per.batch` share a second runtime whose
//! engine meters fuel, since fuel metering is an engine-wide setting that slows every guest.
//! All jobs share one metrics endpoint and one CPU gate ([`crate::fairness`]). Everything else
//! is the job's own: AWS clients and credentials, lease workers, task instances and limits.
//!
//! **Health.** `/healthz` is 200 while the host serves; `/readyz` is 200 once every job that
//! runs has started all its input streams' workers, and 503 naming the jobs that are not there
//! yet or no longer (validating, swapping, starting, failed): see [`JobsHealth`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use kinesis_host_runtime::{Clock, LoadError, Runtime, RuntimeConfig, SetupError, TaskComponent};
use notify_debouncer_mini::{DebounceEventResult, DebouncedEventKind};
use tokio::sync::{Notify, mpsc, watch};

use crate::config::{ConfigError, JobConfig};
use crate::fairness::{CpuGate, FairnessConfig};
use crate::metrics::{Health, Probe};
use crate::samza::RunConfig;

/// The gauge of jobs by `state`: `running`, `swapping`, `invalid` or `failed`.
pub const JOBS: &str = "kinesis_host_serve_jobs";
/// The counter of rejected or failed jobs, by job `folder`.
pub const JOB_ERRORS: &str = "kinesis_host_serve_job_errors_total";

/// The name of a job's settings file in its folder.
pub const PROPERTIES: &str = "job.properties";

/// Settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The folder of job folders.
    pub jobs_dir: PathBuf,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` for all jobs.
    pub metrics_address: Option<String>,
    /// The CPU gate's settings.
    pub fairness: FairnessConfig,
    /// How long the folder must be quiet after a change before it is rescanned.
    pub debounce: Duration,
    /// The compiled-code cache of the fuel-metering runtime (as the shared runtime's).
    pub cache_dir: Option<PathBuf>,
}

/// Why `serve` cannot run at all. (A job's own problems never stop `serve`: see
/// [`JobFilesError`].)
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The jobs folder is missing or unreadable.
    #[error("cannot read the jobs folder {path}: {source}; create it (one sub-folder per job)")]
    JobsDir {
        /// The folder.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The folder cannot be watched.
    #[error("cannot watch the jobs folder {path} for changes: {source}")]
    Watch {
        /// The folder.
        path: PathBuf,
        /// What the watcher said.
        source: notify_debouncer_mini::notify::Error,
    },
    /// The metrics endpoint cannot be set up.
    #[error("cannot serve metrics on {address}: {message}")]
    Metrics {
        /// `--metrics-address`.
        address: String,
        /// What went wrong.
        message: String,
    },
}

/// Why one job's files cannot be run; reported, and tried again on the next change.
#[derive(Debug, thiserror::Error)]
pub enum JobFilesError {
    /// The folder or one of its files cannot be read.
    #[error("job folder {folder}: cannot read {path}: {source}")]
    Read {
        /// The job folder.
        folder: String,
        /// The file or folder.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// No `job.properties`.
    #[error("job folder {folder}: no {PROPERTIES}; put the job's settings there")]
    NoProperties {
        /// The job folder.
        folder: String,
    },
    /// Not exactly one `.wasm` file.
    #[error(
        "job folder {folder}: {found} .wasm files ({names}); put exactly one task component there"
    )]
    Wasm {
        /// The job folder.
        folder: String,
        /// How many there are.
        found: usize,
        /// Their names.
        names: String,
    },
    /// `job.properties` is invalid.
    #[error("job folder {folder}: {source}")]
    Config {
        /// The job folder.
        folder: String,
        /// What is wrong (names the file and key).
        source: Box<ConfigError>,
    },
    /// Another job already uses the job name or a lease table.
    #[error(
        "job folder {folder}: {what} is already used by job folder {other}; give each job its own job.name (and aws.kcl.TableName, if set)"
    )]
    Clash {
        /// The job folder.
        folder: String,
        /// The name in conflict.
        what: String,
        /// The job folder using it.
        other: String,
    },
    /// The component is not a usable task.
    #[error("job folder {folder}: {source}")]
    Load {
        /// The job folder.
        folder: String,
        /// What is wrong with the component (names the file).
        source: LoadError,
    },
    /// The fuel-metering runtime cannot be set up.
    #[error("job folder {folder}: cannot set up the fuel-metering runtime: {source}")]
    FuelRuntime {
        /// The job folder.
        folder: String,
        /// What wasmtime said.
        source: SetupError,
    },
}

/// How long after its last change a file must have been digested for its digest to be reused
/// while its size, times and inode stay the same: file systems with coarse timestamps could
/// otherwise hide a write made in the same tick as the digest.
const RACY: Duration = Duration::from_secs(2);

/// The digests of the components last read, by path, so an unchanged component (by size,
/// modification and change times, and inode) is not read and hashed again on every rescan.
#[derive(Debug)]
struct Digests {
    racy: Duration,
    entries: HashMap<PathBuf, Digested>,
    used: HashSet<PathBuf>,
}

#[derive(Debug)]
struct Digested {
    stamp: Stamp,
    digest: u64,
    /// When the file was read (taken before reading it).
    read_at: SystemTime,
}

/// What identifies a file's version without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// The last change of the file or its metadata (ctime where there is one: `touch -d` or
    /// `cp -p` can set the modification time back, not that).
    changed: Option<SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (changed, inode) = {
            use std::os::unix::fs::MetadataExt;
            let changed = u64::try_from(meta.ctime())
                .ok()
                .zip(u32::try_from(meta.ctime_nsec()).ok())
                .map(|(secs, nanos)| SystemTime::UNIX_EPOCH + Duration::new(secs, nanos));
            (changed, meta.ino())
        };
        #[cfg(not(unix))]
        let (changed, inode) = (meta.modified().ok(), 0);
        Self { len: meta.len(), modified: meta.modified().ok(), changed, inode }
    }
}

impl Default for Digests {
    fn default() -> Self {
        Self::new(RACY)
    }
}

impl Digests {
    fn new(racy: Duration) -> Self {
        Self { racy, entries: HashMap::new(), used: HashSet::new() }
    }

    /// The digest of `path`'s contents, read only if the file may have changed since last time.
    fn digest(&mut self, path: &Path) -> std::io::Result<u64> {
        let stamp = Stamp::of(&std::fs::metadata(path)?);
        self.used.insert(path.to_owned());
        if let Some(known) = self.entries.get(path)
            && known.stamp == stamp
            && stamp.changed.is_some_and(|changed| changed + self.racy <= known.read_at)
        {
            return Ok(known.digest);
        }
        let read_at = SystemTime::now();
        let mut hasher = DefaultHasher::new();
        kinesis_host_runtime::read_regular_file(path, kinesis_host_runtime::MAX_COMPONENT_BYTES)?
            .hash(&mut hasher);
        let digest = hasher.finish();
        // The stamp taken before reading: a write during the read changes it, so the next scan
        // reads the file again.
        self.entries.insert(path.to_owned(), Digested { stamp, digest, read_at });
        Ok(digest)
    }

    /// Forgets the files not asked for since the last call.
    fn prune(&mut self) {
        let used = std::mem::take(&mut self.used);
        self.entries.retain(|path, _| used.contains(path));
    }
}

/// What a scan of the jobs folder found: each job folder's files, or why they cannot be used.
type Scan = BTreeMap<String, Result<JobFiles, JobFilesError>>;

/// Lists the job folders and reads (or recalls) their files' digests. Blocking: run it on
/// `spawn_blocking`.
fn scan(dir: &Path, digests: &mut Digests) -> std::io::Result<Scan> {
    let scan = job_folders(dir)?
        .into_iter()
        .map(|(folder, path)| {
            let files = read_job_files(&folder, &path, digests);
            (folder, files)
        })
        .collect();
    digests.prune();
    Ok(scan)
}

/// A job folder's files, read.
#[derive(Debug)]
struct JobFiles {
    properties: PathBuf,
    wasm: PathBuf,
    /// A digest of both files' contents and the component's name.
    fingerprint: u64,
}

/// The job name and lease tables a job folder's job holds.
type Claim = (String, BTreeSet<String>);

/// Reads and parses a job's settings. Blocking: run it on `spawn_blocking`.
fn parse_job(folder: &str, properties: &Path) -> Result<(JobConfig, RunConfig), JobFilesError> {
    let config_err =
        |source| JobFilesError::Config { folder: folder.to_owned(), source: Box::new(source) };
    let props = crate::config::read_properties(properties).map_err(config_err)?;
    let job = JobConfig::from_properties(properties, &props).map_err(config_err)?;
    let (run, warnings) = crate::samza::parse_run_config(properties, &props).map_err(config_err)?;
    for warning in warnings {
        tracing::warn!(folder, "{warning}");
    }
    Ok((job, run))
}

/// A job ready to start.
#[derive(Debug)]
struct Prepared {
    run: RunConfig,
    job: JobConfig,
    component: Arc<TaskComponent>,
    tables: BTreeSet<String>,
}

/// A job as `serve` last saw it.
#[derive(Debug)]
struct Slot {
    /// The fingerprint of the files last acted on (started, waiting to start, or rejected).
    seen: u64,
    /// The version running, if any.
    running: Option<Running>,
    /// The version that starts once the jobs it takes over from have drained, if any.
    waiting: Option<Prepared>,
    /// Why the files last seen were rejected, or why the job stopped.
    problem: Option<Problem>,
}

impl Slot {
    fn empty() -> Self {
        Self { seen: 0, running: None, waiting: None, problem: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    Invalid,
    Failed,
}

#[derive(Debug)]
struct Running {
    job_name: String,
    tables: BTreeSet<String>,
    generation: u64,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

/// A job's run ended: folder, generation, outcome.
type Ended = (String, u64, Result<(), String>);

/// A job told to stop, draining its batches in flight: until it has checkpointed and released
/// its leases, no job that takes over its folder, job name or lease tables starts.
#[derive(Debug)]
struct Draining {
    folder: String,
    job_name: String,
    tables: BTreeSet<String>,
}

/// `/healthz` and `/readyz` of `serve`, over all its jobs.
///
/// Live while the host serves (until it is told to stop): one job's failure is that job's, and
/// must not get the host that serves the others restarted. Ready once the jobs folder has been
/// scanned and every job whose files are valid runs with all its input streams' workers started;
/// not while a job is being validated, waits for its previous version to stop, starts, or has
/// ended (failed) and waits for a change or `SIGHUP`. Folders whose files are rejected count for
/// nothing (they are reported by the log and `kinesis_host_serve_jobs{state="invalid"}`); when a
/// previous version of such a job runs, that version counts.
#[derive(Debug)]
pub struct JobsHealth {
    stopping: watch::Receiver<bool>,
    state: Mutex<JobsState>,
}

#[derive(Debug, Default)]
struct JobsState {
    /// Whether the first scan of the jobs folder is done.
    scanned: bool,
    /// By job folder.
    jobs: BTreeMap<String, JobState>,
}

/// Where one job folder's job stands, for `/readyz`.
#[derive(Debug, Clone)]
pub enum JobState {
    /// The folder's files are being validated (no version of the job runs).
    Validating,
    /// The job's new version waits for its previous version, or a job whose name or lease table
    /// it takes, to stop.
    Swapping {
        /// `job.name`.
        job: String,
    },
    /// A version runs: ready once `health` is.
    Running {
        /// `job.name`.
        job: String,
        /// Its workers.
        health: Arc<Health>,
    },
    /// The job ended without being asked to: with an error, or `None` when it stopped by itself.
    Ended {
        /// `job.name`.
        job: String,
        /// Why.
        error: Option<String>,
    },
}

impl JobsHealth {
    /// The health of a host that stops once `stopping` is true; not ready until [`Self::scanned`].
    pub fn new(stopping: watch::Receiver<bool>) -> Self {
        Self { stopping, state: Mutex::new(JobsState::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, JobsState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The jobs folder has been scanned and every job in it validated and started (or rejected).
    pub fn scanned(&self) {
        self.state().scanned = true;
    }

    /// Where the job of `folder` stands now.
    pub fn set(&self, folder: &str, state: JobState) {
        self.state().jobs.insert(folder.to_owned(), state);
    }

    /// The folder is gone, or its files are rejected while no version of it runs.
    pub fn forget(&self, folder: &str) {
        self.state().jobs.remove(folder);
    }
}

impl Probe for JobsHealth {
    fn live(&self) -> Result<(), String> {
        if *self.stopping.borrow() { Err("stopping".to_owned()) } else { Ok(()) }
    }

    fn ready(&self) -> Result<(), String> {
        self.live()?;
        let state = self.state();
        if !state.scanned {
            return Err("starting: scanning the jobs folder".to_owned());
        }
        let waiting: Vec<String> = state
            .jobs
            .iter()
            .filter_map(|(folder, job)| {
                let (name, why) = match job {
                    JobState::Validating => {
                        return Some(format!("job folder {folder}: validating its files"));
                    }
                    JobState::Swapping { job } => (
                        job,
                        "swapping: waiting for a stopping job to release its leases".to_owned(),
                    ),
                    JobState::Running { job, health } => (job, health.ready().err()?),
                    JobState::Ended { job, error: Some(error) } => (
                        job,
                        format!(
                            "failed (retried when its files change or on SIGHUP): {}",
                            error.replace('\n', " ")
                        ),
                    ),
                    JobState::Ended { job, error: None } => (
                        job,
                        "stopped by itself (restarts when its files change or on SIGHUP)"
                            .to_owned(),
                    ),
                };
                Some(format!("job {name:?} (folder {folder}): {why}"))
            })
            .collect();
        if waiting.is_empty() { Ok(()) } else { Err(waiting.join("\n")) }
    }
}

/// The supervisor: the jobs, the shared runtimes and the CPU gate.
struct Supervisor {
    config: ServeConfig,
    runtime: Runtime,
    fuel_runtime: Mutex<Option<Runtime>>,
    clock: Arc<dyn Clock>,
    gate: Arc<CpuGate>,
    slots: BTreeMap<String, Slot>,
    next_generation: u64,
    ended: mpsc::UnboundedSender<Ended>,
    digests: Digests,
    health: Arc<JobsHealth>,
    /// Jobs stopping, by the task in `drains` that waits for each.
    draining: HashMap<tokio::task::Id, Draining>,
    drains: tokio::task::JoinSet<()>,
}

/// Runs every job of `config.jobs_dir` until `shutdown` becomes true, then stops them all
/// gracefully. `reload` (SIGHUP) rescans the folder and retries rejected or failed jobs.
///
/// # Errors
/// When the jobs folder cannot be read or watched, or the metrics endpoint cannot be set up.
/// A job's own problems are reported and never end `serve`.
pub async fn serve(
    config: ServeConfig,
    runtime: Runtime,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
    reload: Arc<Notify>,
) -> Result<(), ServeError> {
    let dir = config.jobs_dir.clone();
    std::fs::read_dir(&dir).map_err(|source| ServeError::JobsDir { path: dir.clone(), source })?;
    let health = Arc::new(JobsHealth::new(shutdown.clone()));
    let server = match &config.metrics_address {
        Some(address) => Some(serve_metrics(address, health.clone()).await?),
        None => None,
    };
    // File changes, debounced, wake the loop like SIGHUP does (but retry nothing unchanged).
    let changed = Arc::new(Notify::new());
    let _watcher = {
        let changed = changed.clone();
        let mut debouncer = notify_debouncer_mini::new_debouncer(
            config.debounce,
            move |events: DebounceEventResult| {
                if quiet_again(&events) {
                    changed.notify_one();
                }
            },
        )
        .map_err(|source| ServeError::Watch { path: dir.clone(), source })?;
        debouncer
            .watcher()
            .watch(&dir, notify_debouncer_mini::notify::RecursiveMode::Recursive)
            .map_err(|source| ServeError::Watch { path: dir.clone(), source })?;
        debouncer
    };
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let mut supervisor = Supervisor {
        gate: Arc::new(CpuGate::new(config.fairness)),
        config,
        runtime,
        fuel_runtime: Mutex::new(None),
        clock,
        slots: BTreeMap::new(),
        next_generation: 0,
        ended: ended_tx,
        digests: Digests::default(),
        health,
        draining: HashMap::new(),
        drains: tokio::task::JoinSet::new(),
    };
    let gate = supervisor.gate.config();
    tracing::info!(jobs = %dir.display(), max_concurrent_calls = gate.max_concurrent_calls, penalty_factor = gate.penalty_factor, "Serving jobs.");
    supervisor.reconcile(false).await;
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = shutdown.changed() => {}
            () = changed.notified() => supervisor.reconcile(false).await,
            () = reload.notified() => {
                tracing::info!("Reloading the jobs folder (SIGHUP).");
                supervisor.reconcile(true).await;
            }
            Some((folder, generation, outcome)) = ended.recv() => {
                supervisor.job_ended(&folder, generation, outcome);
            }
            Some(drained) = supervisor.drains.join_next_with_id() => supervisor.drained(drained),
        }
    }
    tracing::info!(
        "Stopping every job: finishing the batches in flight, then checkpointing and releasing leases."
    );
    supervisor.stop_all().await;
    if let Some(server) = server {
        server.abort();
    }
    Ok(())
}

async fn serve_metrics(
    address: &str,
    health: Arc<JobsHealth>,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let failed = |message: String| ServeError::Metrics { address: address.to_owned(), message };
    let handle = crate::metrics::install_for_jobs().map_err(|e| failed(e.to_string()))?;
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|e| failed(e.to_string()))?;
    let local = listener.local_addr().map_or_else(|_| address.to_owned(), |a| a.to_string());
    tracing::info!(address = %local, "Serving /metrics, /healthz and /readyz.");
    Ok(tokio::spawn(crate::metrics::serve(listener, handle, health)))
}

/// Whether the watcher's `events` call for a rescan: only once a changed path has been quiet
/// for the debounce time (`Any`), never on the `AnyContinuous` events sent while writes keep
/// coming, lest a half-written file be acted on.
fn quiet_again(events: &DebounceEventResult) -> bool {
    match events {
        Ok(events) => events.iter().any(|event| event.kind == DebouncedEventKind::Any),
        Err(error) => {
            tracing::warn!(%error, "Watching the jobs folder failed; rescanning.");
            true
        }
    }
}

/// The job folders under `dir`, by name.
fn job_folders(dir: &Path) -> std::io::Result<BTreeMap<String, PathBuf>> {
    let mut folders = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type()?.is_dir() {
            continue;
        }
        folders.insert(name, entry.path());
    }
    Ok(folders)
}

/// Finds a job folder's two files and digests them (the component only if it may have changed).
fn read_job_files(
    folder: &str,
    path: &Path,
    digests: &mut Digests,
) -> Result<JobFiles, JobFilesError> {
    let read_err = |path: &Path, source| JobFilesError::Read {
        folder: folder.to_owned(),
        path: path.to_owned(),
        source,
    };
    let mut wasm = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| read_err(path, e))? {
        let entry = entry.map_err(|e| read_err(path, e))?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "wasm") && p.is_file() {
            wasm.push(p);
        }
    }
    wasm.sort();
    let properties = path.join(PROPERTIES);
    if !properties.is_file() {
        return Err(JobFilesError::NoProperties { folder: folder.to_owned() });
    }
    let [wasm] = <[PathBuf; 1]>::try_from(wasm).map_err(|all| JobFilesError::Wasm {
        folder: folder.to_owned(),
        found: all.len(),
        names: all
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let mut hasher = DefaultHasher::new();
    kinesis_host_runtime::read_regular_file(&properties, crate::config::MAX_PROPERTIES_BYTES)
        .map_err(|e| read_err(&properties, e))?
        .hash(&mut hasher);
    digests.digest(&wasm).map_err(|e| read_err(&wasm, e))?.hash(&mut hasher);
    wasm.file_name().hash(&mut hasher);
    Ok(JobFiles { properties, wasm, fingerprint: hasher.finish() })
}

impl Supervisor {
    /// Brings the running jobs in line with the folder. With `retry`, jobs rejected or failed
    /// before are tried again even if their files did not change.
    ///
    /// The jobs that must stop (removed, or replaced by a valid new version) are stopped
    /// together, not one after the other; new jobs that share nothing with them start at once,
    /// the others once they have stopped.
    async fn reconcile(&mut self, retry: bool) {
        if self.rescan(retry).await {
            // Ready can mean something only once the folder has been read.
            self.health.scanned();
        }
    }

    /// [`Self::reconcile`]; whether the folder could be read.
    async fn rescan(&mut self, retry: bool) -> bool {
        let dir = self.config.jobs_dir.clone();
        let mut digests = std::mem::take(&mut self.digests);
        let scanned = tokio::task::spawn_blocking(move || {
            let scan = scan(&dir, &mut digests);
            (scan, digests)
        })
        .await;
        let folders = match scanned {
            Ok((Ok(folders), digests)) => {
                self.digests = digests;
                folders
            }
            Ok((Err(error), digests)) => {
                self.digests = digests;
                tracing::error!(jobs = %self.config.jobs_dir.display(), %error, "Cannot read the jobs folder; keeping the jobs as they are.");
                return false;
            }
            Err(error) => {
                tracing::error!(jobs = %self.config.jobs_dir.display(), %error, "Scanning the jobs folder failed; keeping the jobs as they are.");
                return false;
            }
        };
        // Jobs to stop, with their folders.
        let mut stopping: Vec<(String, Running)> = Vec::new();
        let gone: Vec<String> =
            self.slots.keys().filter(|f| !folders.contains_key(*f)).cloned().collect();
        for folder in gone {
            self.health.forget(&folder);
            if let Some(slot) = self.slots.remove(&folder) {
                if let Some(running) = slot.running {
                    tracing::info!(folder, job = %running.job_name, "Job folder removed: stopping the job.");
                    stopping.push((folder, running));
                } else {
                    // Never started, or ended by itself (and then unregistered from the gate).
                    tracing::info!(folder, "Job folder removed.");
                }
            }
        }
        // The job name and lease tables each folder's job holds, or will hold once started.
        let mut claims: BTreeMap<String, Claim> = self
            .slots
            .iter()
            .filter_map(|(folder, slot)| {
                let (job_name, tables) = match (&slot.running, &slot.waiting) {
                    (Some(r), _) => (&r.job_name, &r.tables),
                    (None, Some(w)) => (&w.job.job_name, &w.tables),
                    (None, None) => return None,
                };
                Some((folder.clone(), (job_name.clone(), tables.clone())))
            })
            .collect();
        for (folder, files) in folders {
            let files = match files {
                Ok(files) => files,
                Err(error) => {
                    // Files being written are often briefly incomplete: report, keep what runs.
                    // The same problem is reported once, a different one again.
                    let mut hasher = DefaultHasher::new();
                    error.to_string().hash(&mut hasher);
                    self.reject(&folder, hasher.finish(), &error);
                    continue;
                }
            };
            let slot = self.slots.get(&folder);
            let unchanged = slot.is_some_and(|s| s.seen == files.fingerprint);
            let healthy = slot.is_some_and(|s| s.problem.is_none());
            if unchanged && (healthy || !retry) {
                continue;
            }
            if slot.is_none_or(|s| s.running.is_none() && s.waiting.is_none()) {
                self.health.set(&folder, JobState::Validating);
            }
            match self.prepare(&folder, &files, &claims).await {
                Ok(prepared) => {
                    claims.insert(
                        folder.clone(),
                        (prepared.job.job_name.clone(), prepared.tables.clone()),
                    );
                    let slot = self.slots.entry(folder.clone()).or_insert_with(Slot::empty);
                    if let Some(running) = slot.running.take() {
                        tracing::info!(folder, job = %running.job_name, "Job changed: stopping the running version (checkpoint and release), then starting the new one.");
                        stopping.push((folder.clone(), running));
                    }
                    // The files acted on; a version still waiting is superseded by this one.
                    *slot = Slot {
                        seen: files.fingerprint,
                        running: None,
                        waiting: Some(prepared),
                        problem: None,
                    };
                }
                Err(error) => self.reject(&folder, files.fingerprint, &error),
            }
        }
        self.stop(stopping);
        self.start_waiting();
        true
    }

    /// Starts every waiting version that no draining job holds up: a new version waits for its
    /// old one, and a job taking a name or a lease table that a stopping job still holds waits
    /// for that job to release it. The others stay in [`JobState::Swapping`].
    fn start_waiting(&mut self) {
        let blocked = |folder: &str, prepared: &Prepared| {
            self.draining.values().any(|d| {
                d.folder == folder
                    || d.job_name == prepared.job.job_name
                    || !d.tables.is_disjoint(&prepared.tables)
            })
        };
        let mut ready = Vec::new();
        for (folder, slot) in &self.slots {
            let Some(prepared) = &slot.waiting else { continue };
            if blocked(folder, prepared) {
                self.health.set(folder, JobState::Swapping { job: prepared.job.job_name.clone() });
            } else {
                ready.push(folder.clone());
            }
        }
        for folder in ready {
            if let Some(slot) = self.slots.get_mut(&folder)
                && let Some(prepared) = slot.waiting.take()
            {
                self.start(&folder, prepared);
            }
        }
        self.publish_counts();
    }

    /// Reports `error` for `folder`, keeping whatever version of it runs.
    fn reject(&mut self, folder: &str, fingerprint: u64, error: &JobFilesError) {
        let slot = self.slots.entry(folder.to_owned()).or_insert_with(Slot::empty);
        if slot.running.is_none() && slot.waiting.is_none() {
            // Readiness concerns the jobs that run; this one is reported (below, or before).
            self.health.forget(folder);
        }
        if slot.seen == fingerprint && slot.problem == Some(Problem::Invalid) {
            return; // reported already
        }
        slot.seen = fingerprint;
        slot.problem = Some(Problem::Invalid);
        let running = slot.running.as_ref().map(|r| r.job_name.clone());
        let waiting = slot.waiting.as_ref().map(|w| w.job.job_name.clone());
        match (running, waiting) {
            (Some(job), _) => {
                tracing::error!(folder, %error, running = %job, "Job files rejected; the previous version keeps running. Fix the files to retry.")
            }
            (None, Some(job)) => {
                tracing::error!(folder, %error, waiting = %job, "Job files rejected; the version validated before still starts once the job it replaces has stopped. Fix the files to retry.")
            }
            (None, None) => {
                tracing::error!(folder, %error, "Job files rejected; the job does not run. Fix the files to retry.")
            }
        }
        metrics::counter!(JOB_ERRORS, "folder" => folder.to_owned()).increment(1);
    }

    /// Parses and checks a job's files (against the other folders' `claims`) and loads its
    /// component.
    async fn prepare(
        &self,
        folder: &str,
        files: &JobFiles,
        claims: &BTreeMap<String, Claim>,
    ) -> Result<Prepared, JobFilesError> {
        let properties = files.properties.clone();
        let owned_folder = folder.to_owned();
        let (mut job, run) =
            tokio::task::spawn_blocking(move || parse_job(&owned_folder, &properties))
                .await
                .map_err(|e| JobFilesError::Read {
                    folder: folder.to_owned(),
                    path: files.properties.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
        if job.metrics_address.take().is_some() {
            tracing::warn!(
                folder,
                "metrics.address is ignored under serve: every job's metrics are on serve's --metrics-address."
            );
        }
        let tables: BTreeSet<String> =
            run.inputs.iter().map(|input| input.kcl.table_name.clone()).collect();
        for (other, (job_name, other_tables)) in claims {
            if other == folder {
                continue;
            }
            let clash = |what: String| JobFilesError::Clash {
                folder: folder.to_owned(),
                what,
                other: other.clone(),
            };
            if *job_name == job.job_name {
                return Err(clash(format!("job.name {}", job.job_name)));
            }
            if let Some(table) = other_tables.intersection(&tables).next() {
                return Err(clash(format!("the lease table {table}")));
            }
        }
        let runtime = if job.limits.fuel_per_batch.is_some() {
            self.fuel_runtime(folder)?
        } else {
            self.runtime.clone()
        };
        let wasm = files.wasm.clone();
        let component = tokio::task::spawn_blocking(move || runtime.load(&wasm))
            .await
            .map_err(|e| JobFilesError::Read {
                folder: folder.to_owned(),
                path: files.wasm.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| JobFilesError::Load { folder: folder.to_owned(), source })?;
        Ok(Prepared { run, job, component, tables })
    }

    /// The runtime for jobs that meter fuel, made on first use.
    fn fuel_runtime(&self, folder: &str) -> Result<Runtime, JobFilesError> {
        let mut fuel = self.fuel_runtime.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(runtime) = fuel.as_ref() {
            return Ok(runtime.clone());
        }
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: self.config.cache_dir.clone(),
            fuel: true,
            ..RuntimeConfig::default()
        })
        .map_err(|source| JobFilesError::FuelRuntime { folder: folder.to_owned(), source })?;
        tracing::info!(
            "Started the fuel-metering runtime for jobs with task.limits.fuel.per.batch."
        );
        *fuel = Some(runtime.clone());
        Ok(runtime)
    }

    /// Starts `prepared` as the running version of `folder`'s job.
    fn start(&mut self, folder: &str, prepared: Prepared) {
        let Prepared { run, job, component, tables } = prepared;
        let generation = self.next_generation;
        self.next_generation += 1;
        let job_name = job.job_name.clone();
        self.gate.starting(&job_name);
        let (stop, stopped) = watch::channel(false);
        let health = Arc::new(Health::new(run.inputs.len(), stopped.clone()));
        self.health
            .set(folder, JobState::Running { job: job_name.clone(), health: health.clone() });
        let (clock, gate, ended) = (self.clock.clone(), self.gate.clone(), self.ended.clone());
        let folder_name = folder.to_owned();
        tracing::info!(folder, job = %job_name, component = %component.path().display(), "Starting job.");
        let handle = tokio::spawn(async move {
            // Run in a task of its own, so that a panic is reported as the job's failure too.
            let run =
                crate::run::run_gated(run, job, component, clock, stopped, Some(gate), health);
            let outcome = match tokio::spawn(run).await {
                Ok(outcome) => outcome.map_err(|e| format!("{e:#}")),
                Err(panic) => Err(format!("the job's task panicked: {panic}")),
            };
            let _ = ended.send((folder_name, generation, outcome));
        });
        let running = Running { job_name, tables, generation, stop, handle };
        // `problem` stays: files rejected while this version waited are still to be reported.
        self.slots.entry(folder.to_owned()).or_insert_with(Slot::empty).running = Some(running);
    }

    /// Tells jobs to stop gracefully, all at once, without waiting: each drains its batches in
    /// flight, checkpoints and releases its leases while the others, and the supervisor, go on
    /// (one slow drain must not hold up other jobs' changes). [`Self::drained`] follows.
    fn stop(&mut self, running: Vec<(String, Running)>) {
        for (folder, r) in running {
            let Running { job_name, tables, stop, handle, .. } = r;
            let _ = stop.send(true);
            // A penalty must not hold up the batches in flight.
            self.gate.stopping(&job_name);
            let job = job_name.clone();
            let task = self.drains.spawn(async move {
                // The job's stop signal stays set (and its sender alive) until it has stopped.
                let _stop = stop;
                if let Err(error) = handle.await {
                    tracing::error!(job, %error, "The job's task panicked while stopping.");
                }
            });
            let draining = Draining { folder, job_name, tables };
            self.draining.insert(task.id(), draining);
        }
    }

    /// A stopping job has drained (or its task failed): what waited for it starts.
    fn drained(&mut self, outcome: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match outcome {
            Ok((id, ())) => id,
            Err(error) => {
                tracing::error!(%error, "Waiting for a stopping job failed.");
                error.id()
            }
        };
        let Some(draining) = self.draining.remove(&id) else { return };
        tracing::info!(folder = %draining.folder, job = %draining.job_name, "Job stopped.");
        // The gate forgets the name unless a version of a job goes on under it (decided now:
        // what replaces a job may have changed or gone while it drained).
        let name = draining.job_name.as_str();
        let in_use = self.slots.values().any(|s| {
            s.running.as_ref().is_some_and(|r| r.job_name == name)
                || s.waiting.as_ref().is_some_and(|w| w.job.job_name == name)
        }) || self.draining.values().any(|d| d.job_name == name);
        if !in_use {
            self.gate.unregister(name);
        }
        self.start_waiting();
    }

    /// All jobs, in parallel, and waits until every one (and every one already stopping) has
    /// drained.
    async fn stop_all(&mut self) {
        let running: Vec<(String, Running)> = self
            .slots
            .iter_mut()
            .filter_map(|(folder, s)| Some((folder.clone(), s.running.take()?)))
            .collect();
        self.stop(running);
        while let Some(outcome) = self.drains.join_next_with_id().await {
            let id = outcome.as_ref().map_or_else(tokio::task::JoinError::id, |(id, ())| *id);
            if let Some(draining) = self.draining.remove(&id) {
                tracing::info!(folder = %draining.folder, job = %draining.job_name, "Job stopped.");
            }
        }
    }

    /// A job's run ended without being asked to stop (asked-for stops end in [`Self::drained`]).
    fn job_ended(&mut self, folder: &str, generation: u64, outcome: Result<(), String>) {
        let Some(slot) = self.slots.get_mut(folder) else { return };
        if slot.running.as_ref().is_none_or(|r| r.generation != generation) {
            return;
        }
        let running = slot.running.take();
        let job = running.map(|r| r.job_name).unwrap_or_default();
        // It no longer shares the CPU gate's slots with the others.
        self.gate.unregister(&job);
        let error = outcome.as_ref().err().cloned();
        self.health.set(folder, JobState::Ended { job: job.clone(), error });
        match outcome {
            Ok(()) => {
                tracing::warn!(
                    folder,
                    job,
                    "Job stopped by itself; it restarts when its files change or on SIGHUP."
                );
            }
            Err(error) => {
                tracing::error!(folder, job, %error, "Job failed; the other jobs go on. It restarts when its files change or on SIGHUP.");
                metrics::counter!(JOB_ERRORS, "folder" => folder.to_owned()).increment(1);
            }
        }
        slot.problem = Some(Problem::Failed);
        self.publish_counts();
    }

    fn publish_counts(&self) {
        let mut running = 0;
        let mut swapping = 0;
        let mut invalid = 0;
        let mut failed = 0;
        for slot in self.slots.values() {
            if slot.running.is_some() {
                running += 1;
            } else if slot.waiting.is_some() {
                swapping += 1;
            }
            match slot.problem {
                Some(Problem::Invalid) => invalid += 1,
                Some(Problem::Failed) => failed += 1,
                None => {}
            }
        }
        metrics::gauge!(JOBS, "state" => "running").set(f64::from(running));
        metrics::gauge!(JOBS, "state" => "swapping").set(f64::from(swapping));
        metrics::gauge!(JOBS, "state" => "invalid").set(f64::from(invalid));
        metrics::gauge!(JOBS, "state" => "failed").set(f64::from(failed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_running_job_has_started_all_its_inputs() {
        let (stop, stopping) = watch::channel(false);
        let jobs = JobsHealth::new(stopping);
        assert_eq!(jobs.live(), Ok(()));
        assert_eq!(jobs.ready(), Err("starting: scanning the jobs folder".to_owned()));
        jobs.scanned();
        // No job at all: the host does all it has to.
        assert_eq!(jobs.ready(), Ok(()));

        jobs.set("new", JobState::Validating);
        assert_eq!(jobs.ready(), Err("job folder new: validating its files".to_owned()));
        // Rejected files: the folder no longer counts.
        jobs.forget("new");
        assert_eq!(jobs.ready(), Ok(()));

        let (_job_stop, job_stopping) = watch::channel(false);
        let orders = Arc::new(Health::new(2, job_stopping.clone()));
        let users = Arc::new(Health::new(1, job_stopping));
        jobs.set("orders-dir", JobState::Running { job: "orders".into(), health: orders.clone() });
        jobs.set("users", JobState::Running { job: "users".into(), health: users.clone() });
        assert_eq!(
            jobs.ready(),
            Err("job \"orders\" (folder orders-dir): starting: 0 of 2 input streams ready\n\
                 job \"users\" (folder users): starting: 0 of 1 input streams ready"
                .to_owned())
        );
        users.worker_started();
        orders.worker_started();
        assert_eq!(
            jobs.ready(),
            Err("job \"orders\" (folder orders-dir): starting: 1 of 2 input streams ready"
                .to_owned())
        );
        orders.worker_started();
        assert_eq!(jobs.ready(), Ok(()));

        // A new version waiting for the old one to stop is not ready.
        jobs.set("users", JobState::Swapping { job: "users".into() });
        assert_eq!(
            jobs.ready(),
            Err("job \"users\" (folder users): swapping: waiting for a stopping job to release its leases"
                .to_owned())
        );
        jobs.set("users", JobState::Running { job: "users".into(), health: users.clone() });
        assert_eq!(jobs.ready(), Ok(()));

        // A worker that failed: the job is not ready, the host stays live for the others.
        users.worker_failed();
        assert_eq!(
            jobs.ready(),
            Err("job \"users\" (folder users): an input stream's worker stopped with an error"
                .to_owned())
        );
        jobs.set(
            "users",
            JobState::Ended { job: "users".into(), error: Some("stream s:\nnot found".into()) },
        );
        let why = jobs.ready().expect_err("a failed job");
        assert_eq!(
            why,
            "job \"users\" (folder users): failed (retried when its files change or on SIGHUP): stream s: not found"
        );
        assert_eq!(jobs.live(), Ok(()));
        jobs.set("users", JobState::Ended { job: "users".into(), error: None });
        assert!(jobs.ready().is_err_and(|why| why.contains("stopped by itself")));
        // Its folder removed: ready again.
        jobs.forget("users");
        assert_eq!(jobs.ready(), Ok(()));

        stop.send_replace(true);
        assert_eq!(jobs.live(), Err("stopping".to_owned()));
        assert_eq!(jobs.ready(), Err("stopping".to_owned()));
    }

    #[test]
    fn a_job_folder_needs_properties_and_exactly_one_component() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let job = dir.path().join("a");
        std::fs::create_dir(&job).expect("mkdir");
        let digests = &mut Digests::default();
        let err = read_job_files("a", &job, digests).expect_err("empty");
        assert!(matches!(err, JobFilesError::NoProperties { .. }), "{err}");
        std::fs::write(job.join(PROPERTIES), "job.name=a\n").expect("write");
        let err = read_job_files("a", &job, digests).expect_err("no wasm");
        assert!(matches!(err, JobFilesError::Wasm { found: 0, .. }), "{err}");
        std::fs::write(job.join("one.wasm"), b"\0asm").expect("write");
        std::fs::write(job.join("two.wasm"), b"\0asm").expect("write");
        let err = read_job_files("a", &job, digests).expect_err("two");
        assert!(err.to_string().contains("one.wasm, two.wasm"), "{err}");
        std::fs::remove_file(job.join("two.wasm")).expect("rm");
        let first = read_job_files("a", &job, digests).expect("valid").fingerprint;
        assert_eq!(read_job_files("a", &job, digests).expect("valid").fingerprint, first);
        std::fs::write(job.join("one.wasm"), b"\0asm\x01").expect("write");
        assert_ne!(read_job_files("a", &job, digests).expect("valid").fingerprint, first);
    }

    #[test]
    fn an_unchanged_component_is_not_read_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let wasm = dir.path().join("task.wasm");
        std::fs::write(&wasm, b"\0asm-one").expect("write");
        // With the default margin a file just written is read again each time, as a write in
        // the same timestamp tick could hide behind an unchanged stamp.
        let mut digests = Digests::default();
        let first = digests.digest(&wasm).expect("digest");
        let read_at = digests.entries[&wasm].read_at;
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(digests.digest(&wasm).expect("digest"), first);
        assert_ne!(digests.entries[&wasm].read_at, read_at, "a fresh file is read again");
        // Without the margin, an unchanged file's digest is reused without reading it...
        let mut digests = Digests::new(Duration::ZERO);
        let first = digests.digest(&wasm).expect("digest");
        let read_at = digests.entries[&wasm].read_at;
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(digests.digest(&wasm).expect("digest"), first);
        assert_eq!(digests.entries[&wasm].read_at, read_at, "an unchanged file is not read");
        // ...but a rewrite of the same size is noticed, even with its modification time reset.
        let modified = std::fs::metadata(&wasm).and_then(|m| m.modified()).expect("mtime");
        std::fs::write(&wasm, b"\0asm-two").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&wasm)
            .and_then(|f| f.set_modified(modified))
            .expect("set mtime");
        assert_ne!(digests.digest(&wasm).expect("digest"), first);
        // Files no longer asked for are forgotten.
        digests.prune();
        assert_eq!(digests.entries.len(), 1);
        digests.prune();
        assert!(digests.entries.is_empty());
    }

    #[test]
    fn only_a_quiet_folder_is_rescanned() {
        use notify_debouncer_mini::DebouncedEvent;
        let event = |kind| DebouncedEvent::new(PathBuf::from("jobs/a/job.properties"), kind);
        // Writes still coming: not yet.
        assert!(!quiet_again(&Ok(vec![event(DebouncedEventKind::AnyContinuous)])));
        assert!(!quiet_again(&Ok(Vec::new())));
        // A path quiet for the debounce time: rescan.
        assert!(quiet_again(&Ok(vec![event(DebouncedEventKind::Any)])));
        assert!(quiet_again(&Ok(vec![
            event(DebouncedEventKind::AnyContinuous),
            event(DebouncedEventKind::Any)
        ])));
        // The watcher failing: rescan, as events may have been missed.
        assert!(quiet_again(&Err(notify_debouncer_mini::notify::Error::generic("lost"))));
    }

    #[test]
    fn hidden_folders_and_plain_files_are_not_jobs() {
        let dir = tempfile::tempdir().expect("temporary folder");
        std::fs::create_dir(dir.path().join(".tmp")).expect("mkdir");
        std::fs::create_dir(dir.path().join("job-1")).expect("mkdir");
        std::fs::write(dir.path().join("README"), "x").expect("write");
        let folders = job_folders(dir.path()).expect("read");
        assert_eq!(folders.keys().collect::<Vec<_>>(), ["job-1"]);
    }
}
