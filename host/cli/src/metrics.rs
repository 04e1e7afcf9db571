//! The metrics and health endpoint of `kinesis-host run` (`metrics.address`): `GET /metrics` in
//! Prometheus' text format, `GET /healthz` and `GET /readyz`.
//!
//! Metrics are recorded where things happen through the [`metrics`] facade: leases and
//! checkpoints in the coordinator's worker, records, bytes, lag and batch latency in
//! [`crate::run`]'s processor, task errors in [`crate::pipeline`]. Without `metrics.address` no
//! recorder is installed and every one of those calls is a no-op. With it, [`install`] installs a
//! Prometheus recorder that adds the label `job` (`job.name`) to every metric, and [`serve`]
//! answers HTTP requests with a deliberately small server: one request per connection (HTTP/1.0
//! and HTTP/1.1, `Connection: close`), request heads up to [`MAX_REQUEST_BYTES`], a deadline for
//! reading the request and one for writing the answer, at most [`MAX_CONNECTIONS`] connections at
//! once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

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

/// Bucket bounds of [`BATCH_LATENCY`], in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The largest request head (request line and headers) read; a longer one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
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
        "Lease renewals that failed (other than by losing the lease) and were retried."
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
        "Jobs of kinesis-host serve by state: running, invalid (files rejected) or failed (stopped with an error)."
    );
    describe_counter!(
        crate::serve::JOB_ERRORS,
        "Jobs of kinesis-host serve whose files were rejected or that stopped with an error, by job folder."
    );
}

/// Liveness and readiness of `run`.
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

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, health: Arc<Health>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        let accept = async {
            let permit = slots.clone().acquire_owned().await;
            (permit, listener.accept().await)
        };
        tokio::select! {
            _ = upkeep.tick() => handle.run_upkeep(),
            (permit, accepted) = accept => match accepted {
                Ok((stream, _)) => {
                    let (handle, health) = (handle.clone(), health.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(error) = connection(stream, &handle, &health).await {
                            tracing::debug!(%error, "Metrics request failed.");
                        }
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

/// Reads one request head, writes the answer and closes.
async fn connection(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await;
    let response = match head {
        Err(_) => return Ok(()), // Too slow: close without an answer.
        Ok(head) => match head? {
            Head::Complete(head) => respond(&head, handle, health),
            Head::TooLarge => Response::text(431, "request head too large\n"),
            Head::Closed => return Ok(()),
        },
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.into_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "writing the answer"))?
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    Closed,
}

/// Reads until the blank line that ends the request head, so that closing the connection does
/// not reset it with unread bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // A client that sent a request line and closed its side still gets an answer.
            return Ok(if head.contains(&b'\n') { Head::Complete(head) } else { Head::Closed });
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body (sent only for `GET`; `HEAD` gets its length).
    pub body: String,
    /// Whether the body is sent.
    pub with_body: bool,
    /// An `Allow` header, for 405.
    pub allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            with_body: true,
            allow: None,
        }
    }

    /// The status line, headers and body.
    pub fn into_bytes(self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str("Allow: ");
            out.push_str(allow);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if self.with_body {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// The answer to a request head.
pub fn respond(head: &[u8], handle: &PrometheusHandle, health: &Health) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "bad request\n");
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let mut response = match path {
        "/metrics" | "/healthz" | "/readyz" if method != "GET" && method != "HEAD" => {
            let mut r = Response::text(405, "method not allowed\n");
            r.allow = Some("GET, HEAD");
            return r;
        }
        "/metrics" => {
            handle.run_upkeep();
            Response {
                content_type: PROMETHEUS_CONTENT_TYPE,
                ..Response::text(200, handle.render())
            }
        }
        "/healthz" => match health.live() {
            Ok(()) => Response::text(200, "ok\n"),
            Err(why) => Response::text(503, format!("{why}\n")),
        },
        "/readyz" => match health.ready() {
            Ok(()) => Response::text(200, "ready\n"),
            Err(why) => Response::text(503, format!("{why}\n")),
        },
        _ => Response::text(404, "not found; try /metrics, /healthz or /readyz\n"),
    };
    response.with_body = method != "HEAD";
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder;

    fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
        PrometheusBuilder::new()
            .add_global_label("job", "j")
            .set_buckets_for_metric(Matcher::Full(BATCH_LATENCY.to_owned()), LATENCY_BUCKETS)
            .expect("buckets")
            .build_recorder()
    }

    fn answer(request: &str, handle: &PrometheusHandle, health: &Health) -> String {
        String::from_utf8(respond(request.as_bytes(), handle, health).into_bytes()).expect("utf-8")
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

    #[test]
    fn routes() {
        let recorder = recorder();
        let handle = recorder.handle();
        let key =
            metrics::Key::from_parts(RECORDS_PROCESSED, vec![metrics::Label::new("stream", "s")]);
        let meta = metrics::Metadata::new("t", metrics::Level::INFO, None);
        recorder.register_counter(&key, &meta).increment(7);
        let key = metrics::Key::from_parts(BATCH_LATENCY, vec![metrics::Label::new("stream", "s")]);
        recorder.register_histogram(&key, &meta).record(0.003);
        let (stop, stopping) = watch::channel(false);
        let health = Health::new(1, stopping);

        let metrics = answer("GET /metrics HTTP/1.0\r\n\r\n", &handle, &health);
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"), "{metrics}");
        assert!(
            metrics.contains("\nkinesis_host_records_processed_total{job=\"j\",stream=\"s\"} 7\n"),
            "{metrics}"
        );
        assert!(metrics.contains("kinesis_host_batch_latency_seconds_bucket{"), "{metrics}");
        assert!(metrics.contains("kinesis_host_batch_latency_seconds_count{"), "{metrics}");
        let (head, body) = metrics.split_once("\r\n\r\n").expect("head");
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");

        let status = |request: &str| answer(request, &handle, &health)[..12].to_owned();
        assert_eq!(status("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"), "HTTP/1.1 503");
        health.worker_started();
        assert_eq!(status("GET /readyz HTTP/1.1\r\n\r\n"), "HTTP/1.1 200");
        assert_eq!(status("GET /healthz?verbose HTTP/1.1\n\n"), "HTTP/1.1 200");
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), "HTTP/1.1 404");
        assert_eq!(status("GET /metricsx HTTP/1.1\r\n\r\n"), "HTTP/1.1 404");
        assert_eq!(status("POST /metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 405");
        assert_eq!(status("GET /metrics\r\n\r\n"), "HTTP/1.1 400");
        assert_eq!(status("GET /metrics SPDY/3\r\n\r\n"), "HTTP/1.1 400");
        assert_eq!(status("\r\n\r\n"), "HTTP/1.1 400");
        let head_only = answer("HEAD /healthz HTTP/1.1\r\n\r\n", &handle, &health);
        assert!(
            head_only.ends_with(
                "Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
            ),
            "{head_only}"
        );
        stop.send_replace(true);
        assert_eq!(status("GET /healthz HTTP/1.1\r\n\r\n"), "HTTP/1.1 503");
        assert_eq!(status("GET /readyz HTTP/1.1\r\n\r\n"), "HTTP/1.1 503");
        assert_eq!(status("GET /metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 200");
    }

    #[tokio::test]
    async fn serves_over_tcp_and_bounds_the_request() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (_stop, stopping) = watch::channel(false);
        let health = Arc::new(Health::new(0, stopping));
        let server = tokio::spawn(serve(listener, recorder().handle(), health));
        let exchange = |request: Vec<u8>| async move {
            let mut stream = TcpStream::connect(address).await?;
            stream.write_all(&request).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            std::io::Result::Ok(answer)
        };
        let ok = exchange(b"GET /readyz HTTP/1.0\r\n\r\n".to_vec()).await?;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nready\n"), "{ok}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_BYTES + 100, b'a');
        let big = exchange(huge).await?;
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        server.abort();
        Ok(())
    }
}
