//! The metrics and health endpoint of `kinesis-host run` (`metrics.address`): `GET /metrics` in
//! Prometheus' text format, `GET /healthz` and `GET /readyz`.
//!
//! Metrics are recorded where things happen through the [`metrics`] facade: leases and
//! checkpoints in the coordinator's worker, records, bytes, lag and batch latency in
//! [`crate::run`]'s processor, task errors in [`crate::pipeline`]. Without `metrics.address` no
//! recorder is installed and every one of those calls is a no-op. With it, [`install`] installs a
//! Prometheus recorder that adds the label `job` (`job.name`) to every metric, and [`serve`]
//! answers HTTP/1.0 and HTTP/1.1 requests with hyper: one request per connection (`Connection:
//! close`), request heads up to [`MAX_REQUEST_BYTES`] (431 beyond), [`READ_TIMEOUT`] to send the
//! request head and [`CONNECTION_TIMEOUT`] for the whole exchange.
//!
//! **Health stays answerable under a connection flood.** Every connection is accepted at once
//! (none waits in the listen backlog for a slot), and at most [`MAX_CONNECTIONS`] are kept, at
//! most [`MAX_CONNECTIONS_PER_PEER`] from one IP address: a connection beyond either bound closes
//! the *oldest* one (of that address, for the second), which is the one that has held its slot
//! longest without finishing. A probe, which sends its request at once and is answered in
//! microseconds, is thus never kept waiting by slow or idle connections, however many. Rendering
//! `/metrics` (the only answer that costs) runs at most [`MAX_METRICS_RENDERS`] at a time;
//! `/healthz` and `/readyz` never wait for it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::IpAddr;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

/// Records processed per stream: the task finished them (or set them aside as poison records)
/// and their outputs are acknowledged.
pub const RECORDS_PROCESSED: &str = "kinesis_host_records_processed_total";
/// Bytes of record data processed per stream (payloads only, as [`RECORDS_PROCESSED`]).
pub const BYTES_PROCESSED: &str = "kinesis_host_bytes_processed_total";
/// `MillisBehindLatest` of a shard's last read, per stream and shard.
pub const MILLIS_BEHIND_LATEST: &str = "kinesis_host_millis_behind_latest";
/// Seconds to run one batch through the task, retries and back-offs included, per stream.
pub const BATCH_LATENCY: &str = "kinesis_host_batch_latency_seconds";
/// Records written to the dead-letter output, by `stream` and `reason`.
pub const DEAD_LETTER_RECORDS: &str = "kinesis_host_dead_letter_records_total";
/// Records the task emitted that an output refused as invalid, by `stream` and `output`.
pub const OUTPUT_REFUSED: &str = "kinesis_host_output_refused_records_total";

/// Bucket bounds of [`BATCH_LATENCY`], in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The largest request head (request line and headers) read; a longer one gets 431. (hyper's
/// smallest buffer limit.)
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections kept at once; a further one closes the oldest.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections kept at once from one IP address; a further one closes that address's oldest.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;
/// `/metrics` answers rendered at once; further requests for it wait their turn.
pub const MAX_METRICS_RENDERS: usize = 4;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last in all: sending the request and reading the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How often histograms are folded into their buckets (also done before every scrape).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The content type of Prometheus' text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct InstallError(String);

/// Installs the process's Prometheus recorder, labelling every metric `job=<job>`, and describes
/// the host's metrics. Idempotent: a second call returns the recorder installed first (whose
/// `job` label stays).
///
/// # Errors
/// When another metrics recorder is installed in the process.
pub fn install(job: &str) -> Result<PrometheusHandle, InstallError> {
    install_labelled(Some(job))
}

/// Installs the process's Prometheus recorder without a process-wide `job` label, for `serve`,
/// where each metric recorded for a job carries its own `job` label. Idempotent as [`install`].
///
/// # Errors
/// As [`install`].
pub fn install_for_jobs() -> Result<PrometheusHandle, InstallError> {
    install_labelled(None)
}

fn install_labelled(job: Option<&str>) -> Result<PrometheusHandle, InstallError> {
    static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let mut builder = PrometheusBuilder::new();
    if let Some(job) = job {
        builder = builder.add_global_label("job", job);
    }
    let recorder = builder
        .set_buckets_for_metric(Matcher::Full(BATCH_LATENCY.to_owned()), LATENCY_BUCKETS)
        .map_err(|e| InstallError(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| InstallError(e.to_string()))?;
    crate::task_metrics::install();
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// The `# HELP` lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("kinesis_host_leases_held", "Leases this host holds.");
    describe_counter!("kinesis_host_leases_taken_total", "Leases taken (stolen ones included).");
    describe_counter!(
        "kinesis_host_leases_stolen_total",
        "Leases taken from another live host to balance the load."
    );
    describe_counter!(
        "kinesis_host_leases_lost_total",
        "Held leases that another host took or that expired on this host."
    );
    describe_counter!("kinesis_host_leases_released_total", "Leases released by this host.");
    describe_counter!(
        "kinesis_host_leases_handed_over_total",
        "Leases this host handed over to a host that asked for them, after a checkpoint."
    );
    describe_counter!(
        "kinesis_host_lease_renewal_failures_total",
        "Lease renewals that failed or were not answered in time (other than by losing the lease), retried."
    );
    describe_counter!(
        "kinesis_host_lease_scan_failures_total",
        "Lease table scans that failed or were not answered in time, retried at the next tick."
    );
    describe_gauge!(
        "kinesis_host_leases_damaged",
        "Lease items with an attribute of the wrong type or form: their shards are not processed."
    );
    describe_counter!("kinesis_host_checkpoints_total", "Checkpoints written.");
    describe_counter!(
        "kinesis_host_shards_stopped_total",
        "Shards stopped on this host by a failure, to be retried later."
    );
    describe_counter!(
        RECORDS_PROCESSED,
        "Records done (processed or set aside as poison) with their outputs acknowledged."
    );
    describe_counter!(BYTES_PROCESSED, Unit::Bytes, "Data bytes of the records processed.");
    describe_gauge!(
        MILLIS_BEHIND_LATEST,
        Unit::Milliseconds,
        "MillisBehindLatest of the shard's last read."
    );
    describe_histogram!(
        BATCH_LATENCY,
        Unit::Seconds,
        "Time to run one batch through the task, retries and back-offs included."
    );
    describe_counter!("kinesis_host_task_errors_total", "Failed task calls, by kind.");
    describe_counter!("kinesis_host_task_traps_total", "Task traps, by kind of trap.");
    describe_counter!("kinesis_host_task_retries_total", "Batches retried after a back-off.");
    describe_counter!("kinesis_host_poison_records_total", "Poison records set aside.");
    describe_counter!(
        "kinesis_host_task_shard_stops_total",
        "Shards stopped by their task (fatal error or retries exhausted)."
    );
    describe_counter!(
        DEAD_LETTER_RECORDS,
        "Records written to the dead-letter output, by reason (poison_record, retries_exhausted, record_too_old)."
    );
    describe_counter!(
        OUTPUT_REFUSED,
        "Records the task emitted that an output refused as invalid (dead-lettered, or the shard stopped)."
    );
    describe_counter!(
        "kinesis_host_task_fuel_consumed_total",
        "Fuel burned by the job's task calls (jobs with task.limits.fuel.per.batch)."
    );
    describe_counter!(
        crate::fairness::CPU_MICROS,
        Unit::Microseconds,
        "Time spent in the job's wasm calls while holding a CPU slot (serve)."
    );
    describe_counter!(
        crate::fairness::PENALTY_MICROS,
        Unit::Microseconds,
        "Waiting imposed on the job for calls that failed after burning CPU (serve)."
    );
    describe_gauge!(
        crate::serve::JOBS,
        "Jobs of kinesis-host serve by state: running, swapping (waiting for the job it replaces to drain), invalid (files rejected) or failed (stopped with an error)."
    );
    describe_counter!(
        crate::serve::JOB_ERRORS,
        "Jobs of kinesis-host serve whose files were rejected or that stopped with an error, by job folder."
    );
}

/// Liveness and readiness of `run`, and of each job of `serve` (see [`crate::serve::JobsHealth`]).
#[derive(Debug)]
pub struct Health {
    inputs: usize,
    started: AtomicUsize,
    failed: AtomicBool,
    stopping: watch::Receiver<bool>,
}

impl Health {
    /// The health of a run with `inputs` input streams, stopping once `stopping` is true.
    pub fn new(inputs: usize, stopping: watch::Receiver<bool>) -> Self {
        Self { inputs, started: AtomicUsize::new(0), failed: AtomicBool::new(false), stopping }
    }

    /// One input stream's worker has started (lease table, shard sync, first lease scan).
    pub fn worker_started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
    }

    /// One input stream's worker stopped with an error.
    pub fn worker_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// `/healthz`: `Ok` while the workers run; the reason otherwise.
    pub fn live(&self) -> Result<(), &'static str> {
        if *self.stopping.borrow() {
            Err("stopping")
        } else if self.failed.load(Ordering::Acquire) {
            Err("an input stream's worker stopped with an error")
        } else {
            Ok(())
        }
    }

    /// `/readyz`: `Ok` once every input stream's worker has started, while live.
    pub fn ready(&self) -> Result<(), String> {
        self.live().map_err(str::to_owned)?;
        let started = self.started.load(Ordering::Acquire);
        if started < self.inputs {
            return Err(format!("starting: {started} of {} input streams ready", self.inputs));
        }
        Ok(())
    }
}

/// What `/healthz` and `/readyz` report: a [`Health`] for `run`, the jobs' readiness for `serve`.
pub trait Probe: Send + Sync + 'static {
    /// `/healthz`: `Ok` while the process does its work; why not otherwise.
    ///
    /// # Errors
    /// The reason, for the 503's body.
    fn live(&self) -> Result<(), String>;

    /// `/readyz`: `Ok` once the process does all its work; why not otherwise.
    ///
    /// # Errors
    /// The reason, for the 503's body.
    fn ready(&self) -> Result<(), String>;
}

impl Probe for Health {
    fn live(&self) -> Result<(), String> {
        Health::live(self).map_err(str::to_owned)
    }

    fn ready(&self) -> Result<(), String> {
        Health::ready(self)
    }
}

/// The connections being served, oldest first, so that a flood closes the oldest.
#[derive(Debug, Default)]
struct Connections {
    next: u64,
    open: std::collections::BTreeMap<u64, (IpAddr, Arc<Notify>)>,
}

impl Connections {
    /// Registers a connection from `peer`; returns its id, what tells it to close, and the
    /// connections to close to stay within the bounds.
    fn admit(&mut self, peer: IpAddr) -> (u64, Arc<Notify>, Vec<Arc<Notify>>) {
        let id = self.next;
        self.next += 1;
        let close = Arc::new(Notify::new());
        self.open.insert(id, (peer, close.clone()));
        let mut evicted = Vec::new();
        let from_peer: Vec<u64> =
            self.open.iter().filter(|(_, (p, _))| *p == peer).map(|(id, _)| *id).collect();
        for old in from_peer.iter().take(from_peer.len().saturating_sub(MAX_CONNECTIONS_PER_PEER)) {
            if let Some((_, notify)) = self.open.remove(old) {
                evicted.push(notify);
            }
        }
        while self.open.len() > MAX_CONNECTIONS {
            match self.open.pop_first() {
                Some((_, (_, notify))) => evicted.push(notify),
                None => break,
            }
        }
        (id, close, evicted)
    }

    fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the future is dropped, and
/// folds histograms into their buckets every 5 s (and before every scrape).
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, probe: Arc<dyn Probe>) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let renders = Arc::new(Semaphore::new(MAX_METRICS_RENDERS));
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        // One request per connection: nothing here is worth keeping a socket open for.
        .keep_alive(false);
    loop {
        tokio::select! {
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (id, close, evicted) = connections
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .admit(peer.ip());
                    for old in evicted {
                        // notify_one keeps the wake-up for a connection not yet waiting.
                        old.notify_one();
                    }
                    let (handle, probe, renders) = (handle.clone(), probe.clone(), renders.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (handle, probe, renders) = (handle.clone(), probe.clone(), renders.clone());
                        async move {
                            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                            // Only rendering the metrics waits for a turn; probes never do.
                            let _turn = if path == "/metrics" && (method == Method::GET || method == Method::HEAD) {
                                renders.acquire_owned().await.ok()
                            } else {
                                None
                            };
                            Ok::<_, Infallible>(respond(&method, &path, &handle, &*probe))
                        }
                    });
                    let connection = http.serve_connection(TokioIo::new(stream), service);
                    let connections = connections.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            served = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => match served {
                                Ok(Ok(())) => {}
                                Ok(Err(error)) => tracing::debug!(%error, "Metrics request failed."),
                                Err(_) => tracing::debug!("Metrics connection too slow; closed."),
                            },
                            () = close.notified() => {
                                tracing::debug!(%peer, "Metrics connection closed to make room for newer ones.");
                            }
                        }
                        connections.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
                    });
                }
                Err(error) => {
                    // Such as too many open files: try again shortly rather than spin.
                    tracing::warn!(%error, "Cannot accept a metrics connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// The answer to a request for `path` (the target without its query).
fn respond(
    method: &Method,
    path: &str,
    handle: &PrometheusHandle,
    probe: &dyn Probe,
) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if known && method != Method::GET && method != Method::HEAD {
        let mut response = answer(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // hyper leaves the body out of an answer to HEAD and keeps its length.
    let probed = |outcome: Result<(), String>, ok: &'static str| match outcome {
        Ok(()) => answer(StatusCode::OK, TEXT, ok),
        Err(why) => answer(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
    };
    match path {
        "/metrics" => {
            handle.run_upkeep();
            let mut text = handle.render();
            if let Some(tasks) = crate::task_metrics::installed() {
                text.push_str(&tasks.render());
            }
            answer(StatusCode::OK, PROMETHEUS_CONTENT_TYPE, text)
        }
        "/healthz" => probed(probe.live(), "ok\n"),
        "/readyz" => probed(probe.ready(), "ready\n"),
        _ => answer(StatusCode::NOT_FOUND, TEXT, "not found; try /metrics, /healthz or /readyz\n"),
    }
}

/// The content type of every answer but `/metrics`.
const TEXT: &str = "text/plain; charset=utf-8";

/// An answer that no cache keeps.
fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
        PrometheusBuilder::new()
            .add_global_label("job", "j")
            .set_buckets_for_metric(Matcher::Full(BATCH_LATENCY.to_owned()), LATENCY_BUCKETS)
            .expect("buckets")
            .build_recorder()
    }

    /// Serves `handle` and `probe` on a free port of 127.0.0.1.
    async fn start(
        handle: PrometheusHandle,
        probe: Arc<dyn Probe>,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        Ok((address, tokio::spawn(serve(listener, handle, probe))))
    }

    /// Sends `request` as is and reads the answer until the server closes the connection.
    async fn exchange(address: SocketAddr, request: &[u8]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// The value of header `name` in the answer's head.
    fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
        let (head, _) = answer.split_once("\r\n\r\n")?;
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    #[test]
    fn health_follows_workers_and_stop() {
        let (stop, stopping) = watch::channel(false);
        let health = Health::new(2, stopping);
        assert_eq!(health.live(), Ok(()));
        assert_eq!(health.ready(), Err("starting: 0 of 2 input streams ready".to_owned()));
        health.worker_started();
        health.worker_started();
        assert_eq!(health.ready(), Ok(()));
        stop.send_replace(true);
        assert_eq!(health.live(), Err("stopping"));
        assert_eq!(health.ready(), Err("stopping".to_owned()));
        let (_stop, stopping) = watch::channel(false);
        let health = Health::new(1, stopping);
        health.worker_started();
        health.worker_failed();
        assert!(health.live().is_err() && health.ready().is_err());
    }

    #[tokio::test]
    async fn routes_over_tcp() -> std::io::Result<()> {
        let recorder = recorder();
        let key =
            metrics::Key::from_parts(RECORDS_PROCESSED, vec![metrics::Label::new("stream", "s")]);
        let meta = metrics::Metadata::new("t", metrics::Level::INFO, None);
        recorder.register_counter(&key, &meta).increment(7);
        let key = metrics::Key::from_parts(BATCH_LATENCY, vec![metrics::Label::new("stream", "s")]);
        recorder.register_histogram(&key, &meta).record(0.003);
        let (stop, stopping) = watch::channel(false);
        let health = Arc::new(Health::new(1, stopping));
        let (address, server) = start(recorder.handle(), health.clone()).await?;

        let metrics = exchange(address, b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        assert!(metrics.starts_with("HTTP/1.0 200 OK\r\n"), "{metrics}");
        assert_eq!(header(&metrics, "content-type"), Some(PROMETHEUS_CONTENT_TYPE), "{metrics}");
        assert_eq!(header(&metrics, "cache-control"), Some("no-store"), "{metrics}");
        assert!(
            metrics.contains("\nkinesis_host_records_processed_total{job=\"j\",stream=\"s\"} 7\n"),
            "{metrics}"
        );
        // The histogram was folded into its buckets before the answer (run_upkeep).
        assert!(metrics.contains("kinesis_host_batch_latency_seconds_bucket{"), "{metrics}");
        assert!(metrics.contains("kinesis_host_batch_latency_seconds_count{"), "{metrics}");
        let (_, body) = metrics.split_once("\r\n\r\n").expect("head");
        assert_eq!(header(&metrics, "content-length"), Some(body.len().to_string().as_str()));

        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        let ready = exchange(address, &get("/readyz")).await?;
        assert!(ready.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{ready}");
        assert!(ready.ends_with("\r\n\r\nstarting: 0 of 1 input streams ready\n"), "{ready}");
        assert_eq!(header(&ready, "connection"), Some("close"), "{ready}");
        health.worker_started();
        let ready = exchange(address, &get("/readyz")).await?;
        assert!(ready.starts_with("HTTP/1.1 200 OK\r\n") && ready.ends_with("\r\nready\n"));
        assert_eq!(header(&ready, "content-type"), Some("text/plain; charset=utf-8"));
        let live = exchange(address, &get("/healthz?verbose")).await?;
        assert!(live.starts_with("HTTP/1.1 200 OK\r\n") && live.ends_with("\r\n\r\nok\n"));

        for path in ["/", "/metricsx", "/readyz/"] {
            let missing = exchange(address, &get(path)).await?;
            assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{path}: {missing}");
            assert!(missing.ends_with("\r\n\r\nnot found; try /metrics, /healthz or /readyz\n"));
        }
        for request in [
            "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "DELETE /readyz HTTP/1.1\r\n\r\n",
        ] {
            let refused = exchange(address, request.as_bytes()).await?;
            assert!(refused.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{refused}");
            assert_eq!(header(&refused, "allow"), Some("GET, HEAD"), "{refused}");
            assert_eq!(header(&refused, "cache-control"), Some("no-store"), "{refused}");
        }

        // HEAD: GET's head and length, no body.
        let head_only = exchange(address, b"HEAD /healthz HTTP/1.1\r\n\r\n").await?;
        assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n"), "{head_only}");
        assert_eq!(header(&head_only, "content-length"), Some("3"), "{head_only}");
        assert_eq!(header(&head_only, "cache-control"), Some("no-store"), "{head_only}");
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");
        let metrics_head = exchange(address, b"HEAD /metrics HTTP/1.1\r\n\r\n").await?;
        assert_eq!(header(&metrics_head, "content-type"), Some(PROMETHEUS_CONTENT_TYPE));
        assert!(metrics_head.ends_with("\r\n\r\n"), "{metrics_head}");

        stop.send_replace(true);
        let live = exchange(address, &get("/healthz")).await?;
        assert!(
            live.starts_with("HTTP/1.1 503 ") && live.ends_with("\r\n\r\nstopping\n"),
            "{live}"
        );
        let ready = exchange(address, &get("/readyz")).await?;
        assert!(ready.starts_with("HTTP/1.1 503 ") && ready.ends_with("\r\n\r\nstopping\n"));
        let metrics = exchange(address, &get("/metrics")).await?;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        server.abort();
        Ok(())
    }

    #[tokio::test]
    async fn bounds_and_rejects_bad_requests() -> std::io::Result<()> {
        let (_stop, stopping) = watch::channel(false);
        let health = Arc::new(Health::new(0, stopping));
        let (address, server) = start(recorder().handle(), health).await?;
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_BYTES + 100, b'a');
        let big = exchange(address, &huge).await?;
        assert!(big.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{big}");
        for bad in ["GET /metrics\r\n\r\n", "GET /metrics SPDY/3\r\n\r\n", "GET\r\n\r\n"] {
            let answer = exchange(address, bad.as_bytes()).await?;
            assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{bad:?}: {answer}");
        }
        // A client that never finishes its request head is cut off (after READ_TIMEOUT), unanswered.
        let slow = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await?;
        assert_eq!(slow, "", "a request head never finished was answered");
        // The server still answers afterwards.
        let ok = exchange(address, b"GET /readyz HTTP/1.0\r\n\r\n").await?;
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n") && ok.ends_with("\r\n\r\nready\n"), "{ok}");
        server.abort();
        Ok(())
    }

    /// One `GET /healthz`, given `within` to be answered (a guard, not a timing assertion: a
    /// starved endpoint never answers while the flood lasts).
    async fn probe_within(address: SocketAddr, within: Duration) -> Result<String, String> {
        tokio::time::timeout(within, exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n"))
            .await
            .map_err(|_| format!("no answer within {within:?}"))?
            .map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_answers_beside_a_flood_of_idle_and_slow_connections() -> std::io::Result<()> {
        let (_stop, stopping) = watch::channel(false);
        let health = Arc::new(Health::new(0, stopping));
        let (address, server) = start(recorder().handle(), health).await?;
        // 150 connections that send nothing, and 16 that send a request head a byte at a time.
        let mut idle = Vec::new();
        for _ in 0..150 {
            idle.push(TcpStream::connect(address).await?);
        }
        let slow = tokio::spawn(async move {
            let mut streams = Vec::new();
            for _ in 0..16 {
                streams.push(TcpStream::connect(address).await?);
            }
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n".iter().take(20) {
                for s in &mut streams {
                    // The server may have closed it to make room: that is the point.
                    let _ = s.write_all(&[*byte]).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, std::io::Error>(streams)
        });
        for _ in 0..20 {
            let answer = probe_within(address, Duration::from_secs(3)).await;
            assert!(
                answer
                    .as_deref()
                    .is_ok_and(|a| a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with("ok\n")),
                "{answer:?}"
            );
        }
        // The oldest idle connections were closed to keep one address within its bound.
        let mut closed = 0;
        for stream in &mut idle {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await
            {
                closed += 1;
            }
        }
        assert!(closed >= 150 + 16 + 20 - MAX_CONNECTIONS_PER_PEER - 16, "{closed} closed");
        let _ = slow.await;
        server.abort();
        Ok(())
    }

    #[test]
    fn a_flood_closes_the_oldest_connections_first() {
        let mut c = Connections::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let (first, _, evicted) = c.admit(a);
        assert!(evicted.is_empty());
        for _ in 1..MAX_CONNECTIONS_PER_PEER {
            assert!(c.admit(a).2.is_empty());
        }
        // One more from `a` closes `a`'s oldest; `b` is not affected by `a`'s count.
        let (_, _, evicted) = c.admit(a);
        assert_eq!(evicted.len(), 1);
        assert!(!c.open.contains_key(&first));
        for i in 0..MAX_CONNECTIONS {
            let peer: IpAddr = [10, 1, (i / 200) as u8, (i % 200) as u8].into();
            c.admit(peer);
        }
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        assert!(c.open.values().all(|(p, _)| *p != a), "the oldest went first");
        let (id, _, _) = c.admit(b);
        c.remove(id);
        assert_eq!(c.open.len(), MAX_CONNECTIONS - 1);
    }
}
