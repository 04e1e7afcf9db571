//! A fast stand-in for the Kinesis API on 127.0.0.1, for throughput figures that measure the
//! host rather than an emulator (kinesis-local and kinesalite serve a few thousand records a
//! second, far below what one host decodes).
//!
//! It answers the calls `kinesis-host run` makes on an input stream — `ListShards`,
//! `GetShardIterator` and `GetRecords` — in awsJson1.1, the way Kinesis does, and anything else
//! with a 400 `UnknownOperationException` (counted, so the benchmark can tell). Every
//! `GetRecords` answer is the same prepared body of `records_per_call` records (random payloads
//! in base64, a partition key, a 56-digit sequence number, an arrival timestamp) with two fields
//! patched per call: the sequence numbers, which carry the shard and a per-shard call counter so
//! they increase along each shard as the host's checkpoint filter expects, and the
//! `NextShardIterator` (about 290 characters, like Kinesis's). The stream never ends.
//!
//! Until every shard has been asked for an iterator, `GetRecords` answers after 100 ms with no
//! records, so that the measured process starts all its shards before any runs at full speed.
//!
//! Patching costs one copy of the body per call, a small fraction of what decoding it costs the
//! client. The server runs on its own single-threaded tokio runtime (its CPU competes with the
//! measured process, as a network would not) and stops when dropped or at its deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::records::XorShift;

/// Length of a sequence number; the shard (6 digits) and the call counter (12 digits) follow
/// the leading "49".
const SEQUENCE_DIGITS: usize = 56;
/// Offset of the patched digits in a sequence number, and their count.
const PATCH_AT: usize = 2;
const PATCH_LEN: usize = 18;
/// Total length of an iterator: Kinesis's are about 290 characters.
const ITERATOR_LEN: usize = 290;

/// What the stand-in serves.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Shards of the stream.
    pub shards: usize,
    /// Records in every `GetRecords` answer.
    pub records_per_call: usize,
    /// Payload bytes of every record.
    pub record_size: usize,
}

/// What the stand-in served so far.
#[derive(Debug, Default)]
pub struct Stats {
    /// `GetRecords` answers.
    pub calls: AtomicU64,
    /// Records in them.
    pub records: AtomicU64,
    /// Payload bytes in them (decoded, not base64).
    pub bytes: AtomicU64,
    /// Requests for an operation it does not serve.
    pub unknown: AtomicU64,
    /// Shards that were asked for an iterator at least once.
    pub shards_started: AtomicU64,
}

impl Stats {
    /// (calls, records, payload bytes) now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.records.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// The prepared answers.
struct Bodies {
    shape: Shape,
    /// The `GetRecords` body up to and including `"NextShardIterator":"`.
    records_head: Vec<u8>,
    /// Offsets in `records_head` of each record's patched sequence-number digits.
    patch_offsets: Vec<usize>,
    list_shards: Bytes,
    payload_bytes: u64,
    started: Vec<AtomicBool>,
}

/// A running stand-in; stops on drop.
pub struct StandIn {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Its counters.
    pub stats: Arc<Stats>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl StandIn {
    /// Starts serving `shape` on a free port of 127.0.0.1 for at most `lifetime`.
    ///
    /// # Errors
    /// When the runtime cannot start or the port cannot be bound.
    pub fn start(shape: Shape, lifetime: Duration) -> Result<Self> {
        let bodies = Arc::new(Bodies::new(shape));
        let stats = Arc::new(Stats::default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("stand-in")
            .enable_all()
            .build()
            .context("cannot start the stand-in's runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
            .context("the stand-in cannot listen on 127.0.0.1")?;
        let port = listener.local_addr().context("the stand-in's address")?.port();
        let deadline = Instant::now() + lifetime;
        let (served, counters) = (bodies.clone(), stats.clone());
        runtime.spawn(async move {
            let until = tokio::time::Instant::from_std(deadline);
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = tokio::time::sleep_until(until) => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let (bodies, stats) = (served.clone(), counters.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (bodies, stats) = (bodies.clone(), stats.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                answer(&bodies, &stats, request).await,
                            )
                        }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout_at(until, connection).await;
                });
            }
        });
        Ok(Self { endpoint: format!("http://127.0.0.1:{port}"), stats, runtime: Some(runtime) })
    }

    /// A job.properties for `kinesis-host run` reading this stand-in's stream from
    /// `TRIM_HORIZON`, leases in the DynamoDB at `dynamodb`, no checkpoint or shard sync within
    /// a benchmark's window; `kcl` adds `systems.kinesis.aws.kcl.*` keys (name, value).
    pub fn job_properties(&self, job: &str, dynamodb: &str, kcl: &[(&str, String)]) -> String {
        let mut properties = format!(
            "job.name={job}\n\
             task.inputs=kinesis.bench\n\
             task.commit.ms=600000\n\
             systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n\
             systems.kinesis.aws.region=us-east-1\n\
             systems.kinesis.aws.accessKey=test\n\
             sensitive.systems.kinesis.aws.secretKey=test\n\
             systems.kinesis.aws.kinesis.endpoint={}\n\
             systems.kinesis.aws.dynamodb.endpoint={dynamodb}\n\
             systems.kinesis.aws.kcl.InitialPositionInStream=TRIM_HORIZON\n\
             systems.kinesis.aws.kcl.ShardSyncIntervalMillis=600000\n",
            self.endpoint,
        );
        for (key, value) in kcl {
            properties.push_str(&format!("systems.kinesis.aws.kcl.{key}={value}\n"));
        }
        properties
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Bodies {
    fn new(shape: Shape) -> Self {
        let mut rng = XorShift::new(0x5354_414E_4449_4E00 ^ shape.record_size as u64);
        let mut head =
            Vec::with_capacity(shape.records_per_call * (shape.record_size * 4 / 3 + 160));
        let mut patch_offsets = Vec::with_capacity(shape.records_per_call);
        let mut data = vec![0u8; shape.record_size];
        head.extend_from_slice(b"{\"Records\":[");
        for i in 0..shape.records_per_call {
            for chunk in data.chunks_mut(8) {
                let bits = rng.next_u64().to_le_bytes();
                chunk.copy_from_slice(&bits[..chunk.len()]);
            }
            if i > 0 {
                head.push(b',');
            }
            head.extend_from_slice(b"{\"Data\":\"");
            let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
            head.extend_from_slice(encoded.as_bytes());
            head.extend_from_slice(
                format!(
                    "\",\"PartitionKey\":\"pk-{:08x}\",\"SequenceNumber\":\"",
                    rng.next_u64() as u32
                )
                .as_bytes(),
            );
            patch_offsets.push(head.len() + PATCH_AT);
            let sequence = format!("49{:0w$}{i:08}", 0, w = PATCH_LEN);
            head.extend_from_slice(format!("{sequence:0<SEQUENCE_DIGITS$}").as_bytes());
            head.extend_from_slice(b"\",\"ApproximateArrivalTimestamp\":1.712345678123E9}");
        }
        head.extend_from_slice(b"],\"MillisBehindLatest\":0,\"NextShardIterator\":\"");
        let span = u128::MAX / shape.shards.max(1) as u128;
        let shards: Vec<String> = (0..shape.shards)
            .map(|i| {
                let start = span * i as u128;
                let end = if i + 1 == shape.shards { u128::MAX } else { span * (i as u128 + 1) - 1 };
                format!(
                    "{{\"ShardId\":\"shardId-{i:012}\",\"HashKeyRange\":{{\"StartingHashKey\":\"{start}\",\"EndingHashKey\":\"{end}\"}},\"SequenceNumberRange\":{{\"StartingSequenceNumber\":\"{:0<SEQUENCE_DIGITS$}\"}}}}",
                    "49"
                )
            })
            .collect();
        let list_shards = Bytes::from(format!("{{\"Shards\":[{}]}}", shards.join(",")));
        Bodies {
            shape,
            records_head: head,
            patch_offsets,
            list_shards,
            payload_bytes: (shape.records_per_call * shape.record_size) as u64,
            started: (0..shape.shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The `GetRecords` answer for call `counter` of `shard`.
    fn get_records(&self, shard: usize, counter: u64) -> Bytes {
        let next = iterator(shard, counter + 1);
        let mut body = Vec::with_capacity(self.records_head.len() + next.len() + 2);
        body.extend_from_slice(&self.records_head);
        let digits = format!("{shard:06}{counter:012}");
        for &at in &self.patch_offsets {
            body[at..at + PATCH_LEN].copy_from_slice(digits.as_bytes());
        }
        body.extend_from_slice(next.as_bytes());
        body.extend_from_slice(b"\"}");
        Bytes::from(body)
    }
}

/// The iterator for call `counter` of `shard`.
fn iterator(shard: usize, counter: u64) -> String {
    let mut it = format!("AAAAAAAAAAH{shard:06}c{counter:012}x");
    while it.len() < ITERATOR_LEN {
        it.push_str("Qk9HVVM");
    }
    it.truncate(ITERATOR_LEN);
    it
}

/// Parses an iterator made by [`iterator`].
fn parse_iterator(it: &str) -> Option<(usize, u64)> {
    let rest = it.strip_prefix("AAAAAAAAAAH")?;
    let shard = rest.get(..6)?.parse().ok()?;
    let counter = rest.get(7..19)?.parse().ok()?;
    Some((shard, counter))
}

/// The string value of `"<field>":"…"` in a small JSON request body.
fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = body.find(&key)? + key.len();
    let len = body[start..].find('"')?;
    Some(&body[start..start + len])
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    headers
        .insert("x-amzn-requestid", hyper::header::HeaderValue::from_static("b3c5a0e2-stand-in"));
    response
}

fn error(kind: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        Bytes::from(format!("{{\"__type\":\"{kind}\",\"message\":\"{message}\"}}")),
    )
}

async fn answer(
    bodies: &Bodies,
    stats: &Stats,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let target = request
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return error("SerializationException", "unreadable body");
    };
    let body = body.to_bytes();
    let body = std::str::from_utf8(&body).unwrap_or_default();
    match target.strip_prefix("Kinesis_20131202.") {
        Some("GetRecords") => {
            let Some((shard, counter)) = field(body, "ShardIterator").and_then(parse_iterator)
            else {
                return error("InvalidArgumentException", "bad shard iterator");
            };
            // Until every shard was asked for an iterator, answer slowly and with no records:
            // a host reading its first shards at full speed would take its other leases slowly.
            if (stats.shards_started.load(Ordering::Relaxed) as usize) < bodies.shape.shards {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let body = format!(
                    "{{\"Records\":[],\"MillisBehindLatest\":0,\"NextShardIterator\":\"{}\"}}",
                    iterator(shard, counter)
                );
                return json(StatusCode::OK, Bytes::from(body));
            }
            stats.calls.fetch_add(1, Ordering::Relaxed);
            stats.records.fetch_add(bodies.shape.records_per_call as u64, Ordering::Relaxed);
            stats.bytes.fetch_add(bodies.payload_bytes, Ordering::Relaxed);
            json(StatusCode::OK, bodies.get_records(shard, counter))
        }
        Some("GetShardIterator") => {
            let shard = field(body, "ShardId")
                .and_then(|id| id.strip_prefix("shardId-"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n < bodies.shape.shards);
            let Some(shard) = shard else {
                return error("ResourceNotFoundException", "no such shard");
            };
            if !bodies.started[shard].swap(true, Ordering::Relaxed) {
                stats.shards_started.fetch_add(1, Ordering::Relaxed);
            }
            json(
                StatusCode::OK,
                Bytes::from(format!("{{\"ShardIterator\":\"{}\"}}", iterator(shard, 0))),
            )
        }
        Some("ListShards") => json(StatusCode::OK, bodies.list_shards.clone()),
        _ => {
            stats.unknown.fetch_add(1, Ordering::Relaxed);
            error("UnknownOperationException", "not served by the benchmark's stand-in")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterators_round_trip_and_sequence_numbers_increase() {
        let it = iterator(511, 7);
        assert_eq!(it.len(), ITERATOR_LEN);
        assert_eq!(parse_iterator(&it), Some((511, 7)));
        let bodies = Bodies::new(Shape { shards: 4, records_per_call: 3, record_size: 10 });
        let seqs = |counter| {
            let body = bodies.get_records(2, counter);
            let text = String::from_utf8(body.to_vec()).unwrap_or_default();
            text.match_indices("\"SequenceNumber\":\"")
                .map(|(at, m)| text[at + m.len()..at + m.len() + SEQUENCE_DIGITS].to_owned())
                .collect::<Vec<_>>()
        };
        let (first, second) = (seqs(0), seqs(1));
        assert_eq!(first.len(), 3);
        let all: Vec<String> = first.into_iter().chain(second).collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
        assert!(all.iter().all(|s| s.len() == SEQUENCE_DIGITS && s.starts_with("49000002")));
    }
}
