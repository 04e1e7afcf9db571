//! Failure policies of `kinesis-host run` against kinesis-local and dynalite: the dead-letter
//! output (`task.dead.letter.output`) for poison records and records given up on, retries
//! exhausted with and without it, `task.retry.max.record.age.ms` and `task.retry.bisect`. Each
//! test checks that every record sent ends exactly once in the output or in the dead-letter
//! stream, in order, and what the envelopes say.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::time::{Duration, Instant};

use aws::*;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{free_address, http_get, sample};
use kinesis_host_coordinator::aws::AwsClients;

/// Puts `(partition key, data)` records one by one; returns their sequence numbers.
fn put_numbered(c: &AwsClients, stream: &str, records: &[(String, String)]) -> Vec<String> {
    put(c, stream, records).into_iter().map(|(_, seq)| seq).collect()
}

fn records(data: &[&str]) -> Vec<(String, String)> {
    data.iter().map(|d| ("key-0".to_owned(), (*d).to_owned())).collect()
}

/// job.properties for `job` with a dead-letter output `dlq` (when given) and `extra` keys.
fn config(
    dir: &std::path::Path,
    job: &str,
    input: &str,
    output: &str,
    dlq: Option<&str>,
    extra: &str,
) -> std::path::PathBuf {
    let dead_letter = dlq
        .map(|dlq| {
            format!(
                "task.output.dlq=kinesis.{dlq}\n\
                 task.dead.letter.output=dlq\n\
                 systems.kinesis.streams.{dlq}.aws.accessKey=test\n\
                 sensitive.systems.kinesis.streams.{dlq}.aws.secretKey=test\n"
            )
        })
        .unwrap_or_default();
    job_properties(
        dir,
        job,
        input,
        output,
        &format!(
            "task.retry.backoff.initial.ms=20\ntask.retry.backoff.max.ms=100\n{dead_letter}{extra}"
        ),
    )
}

/// The dead-letter stream's envelopes, parsed.
fn envelopes(c: &AwsClients, dlq: &str) -> Vec<serde_json::Value> {
    read_all(c, dlq)
        .iter()
        .map(|(_, data)| serde_json::from_str(data).expect("a dead letter is JSON"))
        .collect()
}

/// An envelope's record data, decoded.
fn data_of(envelope: &serde_json::Value) -> String {
    let b64 = envelope["record"]["data"].as_str().expect("record.data is base64 text");
    String::from_utf8(BASE64.decode(b64).expect("base64")).expect("UTF-8")
}

/// Waits (bounded) until `n` records are in the output and the dead-letter stream together.
fn wait_for_total(c: &AwsClients, output: &str, dlq: &str, n: usize, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (out, dead) = (read_all(c, output).len(), read_all(c, dlq).len());
        if out + dead >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{out} records in {output} and {dead} in {dlq}, expected {n} in all; host log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each record sent is exactly once in the output or the dead-letter stream, each stream
/// keeps the order sent, and the envelopes name the records' source positions.
fn assert_each_once(
    c: &AwsClients,
    input: &str,
    output: &str,
    dlq: &str,
    sent: &[(String, String)],
    seqs: &[String],
) -> (Vec<String>, Vec<serde_json::Value>) {
    let out = data(c, output);
    let dead = envelopes(c, dlq);
    let dead_data: Vec<String> = dead.iter().map(data_of).collect();
    let mut all: Vec<&String> = out.iter().chain(&dead_data).collect();
    all.sort();
    let mut expected: Vec<&String> = sent.iter().map(|(_, d)| d).collect();
    expected.sort();
    assert_eq!(all, expected, "output {out:?}, dead letters {dead_data:?}");
    let order = |list: &[String]| {
        list.iter()
            .map(|d| sent.iter().position(|(_, s)| s == d).expect("a record sent"))
            .collect::<Vec<_>>()
    };
    for list in [&out, &dead_data] {
        let positions = order(list);
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "out of order: {list:?}");
    }
    for e in &dead {
        let at = sent.iter().position(|(_, s)| *s == data_of(e)).expect("a record sent");
        let r = &e["record"];
        assert_eq!(r["stream"], input, "{e}");
        assert_eq!(r["shard_id"], "shardId-000000000000", "{e}");
        assert_eq!(r["sequence_number"], seqs[at].as_str(), "{e}");
        assert_eq!(r["sub_sequence_number"], 0, "{e}");
        assert_eq!(r["partition_key"], sent[at].0.as_str(), "{e}");
        assert!(r["arrival_millis"].as_u64().is_some_and(|m| m > 1_600_000_000_000), "{e}");
        assert!(e["attempts"].as_u64().is_some_and(|n| n >= 1), "{e}");
    }
    (out, dead)
}

/// The data of every record in `stream`, in order.
fn data(c: &AwsClients, stream: &str) -> Vec<String> {
    read_all(c, stream).into_iter().map(|(_, d)| d).collect()
}

/// The checkpoint of the input's one shard in lease table `table`.
fn checkpoint(c: &AwsClients, table: &str) -> Option<String> {
    checkpoints(c, table).remove("shardId-000000000000")
}

/// Waits (bounded) until the input's one shard is checkpointed at `seq`.
fn wait_for_checkpoint(c: &AwsClients, table: &str, seq: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while checkpoint(c, table).as_deref() != Some(seq) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until the metric served at `address` is at least `n`; returns it.
fn wait_for_metric(address: &str, name: &str, labels: &[(&str, &str)], n: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = sample(&http_get(address, "/metrics").2, name, labels);
        if value.is_some_and(|v| v >= n) || Instant::now() > deadline {
            return value.unwrap_or(0.0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The host serving metrics at `address` counted a stop of a shard of `input` for `reason`.
fn assert_shard_stopped(address: &str, input: &str, reason: &str) {
    let labels = [("stream", input), ("reason", reason)];
    let stops = wait_for_metric(address, "kinesis_host_task_shard_stops_total", &labels, 1.0);
    assert!(stops >= 1.0, "{stops}");
}

#[test]
fn a_poison_record_goes_to_the_dead_letter_stream_and_its_neighbours_are_processed_once() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, dlq) = ("pol-poison-in", "pol-poison-out", "pol-poison-dlq");
    create_streams(&c, &[(input, 1), (output, 1), (dlq, 1)]);
    let sent = records(&["r0", "r1", "r2", "r3", "poison", "r5", "r6", "r7", "r8"]);
    let seqs = put_numbered(&c, input, &sent);
    let address = free_address();
    let config = config(
        dir.path(),
        "poison",
        input,
        output,
        Some(dlq),
        &format!("metrics.address={address}\n"),
    );
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    wait_for_total(&c, output, dlq, sent.len(), &log);
    let labels = [("stream", input), ("reason", "poison_record")];
    let counted = wait_for_metric(&address, "kinesis_host_dead_letter_records_total", &labels, 1.0);
    host.stop_cleanly(&log);

    let (out, dead) = assert_each_once(&c, input, output, dlq, &sent, &seqs);
    assert_eq!(out, ["r0", "r1", "r2", "r3", "r5", "r6", "r7", "r8"]);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let e = &dead[0];
    assert_eq!(e["reason"], "poison_record", "{e}");
    assert_eq!(e["error"]["kind"], "poison_record", "{e}");
    assert_eq!(e["error"]["message"], "this record is poison", "{e}");
    assert_eq!(e["attempts"], 1, "{e}");
    assert_eq!(e["job"], "poison", "{e}");
    assert_eq!(e["record"]["sequence_number"], seqs[4].as_str(), "{e}");
    assert_eq!(data_of(e), "poison");
    assert_eq!(counted, 1.0);
    // Everything is done, the poison record included: the checkpoint is at the last record.
    let table = "poison-1-pol-poison-in";
    assert_eq!(checkpoint(&c, table).as_ref(), seqs.last(), "log:\n{}", log_text(&log));
}

#[test]
fn a_batch_failing_every_attempt_goes_to_the_dead_letter_stream_and_the_shard_goes_on() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, dlq) = ("pol-exhaust-in", "pol-exhaust-out", "pol-exhaust-dlq");
    create_streams(&c, &[(input, 1), (output, 1), (dlq, 1)]);
    let mut sent = records(&["ok-0", "ok-1", "fail-2", "ok-3"]);
    let mut seqs = put_numbered(&c, input, &sent);
    let config =
        config(dir.path(), "exhaust", input, output, Some(dlq), "task.retry.max.attempts=3\n");
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_records(&c, dlq, 1, &log);
    // The shard goes on after the records given up on.
    let more = records(&["ok-4", "ok-5"]);
    seqs.extend(put_numbered(&c, input, &more));
    sent.extend(more);
    wait_for_total(&c, output, dlq, sent.len(), &log);
    host.stop_cleanly(&log);

    let (out, dead) = assert_each_once(&c, input, output, dlq, &sent, &seqs);
    assert!(out.ends_with(&["ok-4".to_owned(), "ok-5".to_owned()]), "{out:?}");
    assert!(dead.iter().any(|e| data_of(e) == "fail-2"), "{dead:?}");
    for e in &dead {
        // The whole failing batch (without bisect) is given up on after its third attempt.
        assert_eq!(e["reason"], "retries_exhausted", "{e}");
        assert_eq!(e["attempts"], 3, "{e}");
        assert_eq!(e["error"]["kind"], "retryable", "{e}");
        assert_eq!(e["error"]["message"], format!("record {} asks to fail", seqs[2]), "{e}");
    }
    assert_eq!(checkpoint(&c, "exhaust-1-pol-exhaust-in").as_ref(), seqs.last());
}

#[test]
fn without_a_dead_letter_output_exhausted_retries_stop_the_shard_before_the_batch() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("pol-stop-in", "pol-stop-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let first = records(&["ok-0", "ok-1"]);
    let mut seqs = put_numbered(&c, input, &first);
    let address = free_address();
    let config = config(
        dir.path(),
        "stop",
        input,
        output,
        None,
        &format!("task.retry.max.attempts=2\nmetrics.address={address}\n"),
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_records(&c, output, 2, &log);
    seqs.extend(put_numbered(&c, input, &records(&["fail-2", "ok-3"])));
    wait_for_log(&log, "stopped after 2 failed attempts at one batch", 1);
    assert_shard_stopped(&address, input, "retries_exhausted");
    // The checkpoint stays at the last record before the failing batch (bounded wait for the
    // checkpoint of the first read, which may be written after its outputs).
    let table = "stop-1-pol-stop-in";
    wait_for_checkpoint(&c, table, &seqs[1]);
    assert_eq!(checkpoint(&c, table).as_ref(), Some(&seqs[1]), "log:\n{}", log_text(&log));
    host.stop_cleanly(&log);
    assert_eq!(data(&c, output), ["ok-0", "ok-1"]);
    assert_eq!(checkpoint(&c, table).as_ref(), Some(&seqs[1]));
    assert!(log_text(&log).contains("set task.dead.letter.output to go on without its records"));
}

#[test]
fn a_stop_ends_a_back_off_and_checkpoints_the_records_done() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("pol-backoff-in", "pol-backoff-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let mut seqs = put_numbered(&c, input, &records(&["ok-0", "ok-1"]));
    // Retried for ever, an hour apart: only a stop that ends the back-off lets the host exit
    // (Host::stop fails when it does not exit soon after SIGTERM).
    let config = config(
        dir.path(),
        "backoff",
        input,
        output,
        None,
        "task.retry.max.attempts=-1\n\
         task.retry.backoff.initial.ms=3600000\n\
         task.retry.backoff.max.ms=3600000\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_records(&c, output, 2, &log);
    seqs.extend(put_numbered(&c, input, &records(&["fail-2", "ok-3"])));
    wait_for_log(&log, "Batch failed; retrying.", 1);
    host.stop_cleanly(&log);
    let text = log_text(&log);
    assert!(text.contains("Asked to stop during a back-off"), "log:\n{text}");
    assert!(!text.contains("Shard stopped on this host"), "a stop is no failure; log:\n{text}");
    // The checkpoint is after the records done, before the failing batch.
    let table = "backoff-1-pol-backoff-in";
    assert_eq!(checkpoint(&c, table).as_ref(), Some(&seqs[1]), "log:\n{text}");
    assert_eq!(data(&c, output), ["ok-0", "ok-1"]);
}

#[test]
fn records_past_the_max_age_are_not_retried_but_dead_lettered() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, dlq) = ("pol-age-in", "pol-age-out", "pol-age-dlq");
    create_streams(&c, &[(input, 1), (output, 1), (dlq, 1)]);
    let mut sent = records(&["ok-0", "fail-1", "ok-2"]);
    let mut seqs = put_numbered(&c, input, &sent);
    // Retried without limit: only the records' age ends the retries.
    let config = config(
        dir.path(),
        "age",
        input,
        output,
        Some(dlq),
        "task.retry.max.attempts=-1\ntask.retry.max.record.age.ms=2000\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_records(&c, dlq, 1, &log);
    let more = records(&["ok-3"]);
    seqs.extend(put_numbered(&c, input, &more));
    sent.extend(more);
    wait_for_total(&c, output, dlq, sent.len(), &log);
    host.stop_cleanly(&log);

    let (out, dead) = assert_each_once(&c, input, output, dlq, &sent, &seqs);
    assert_eq!(out.last().map(String::as_str), Some("ok-3"), "{out:?}");
    assert!(dead.iter().any(|e| data_of(e) == "fail-1"), "{dead:?}");
    for e in &dead {
        assert_eq!(e["reason"], "record_too_old", "{e}");
        assert_eq!(e["error"]["kind"], "retryable", "{e}");
    }
}

#[test]
fn bisect_isolates_the_failing_records_and_processes_every_other_record_once() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, dlq) = ("pol-bisect-in", "pol-bisect-out", "pol-bisect-dlq");
    create_streams(&c, &[(input, 1), (output, 1), (dlq, 1)]);
    // 40 records: one fails with a retryable error, one traps.
    let data: Vec<String> = (0..40)
        .map(|i| match i {
            13 => format!("fail-{i:02}"),
            29 => format!("trap-{i:02}"),
            _ => format!("rec-{i:02}"),
        })
        .collect();
    let sent = records(&data.iter().map(String::as_str).collect::<Vec<_>>());
    let seqs = put_numbered(&c, input, &sent);
    let config = config(
        dir.path(),
        "bisect",
        input,
        output,
        Some(dlq),
        "task.retry.max.attempts=2\ntask.retry.bisect=true\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_total(&c, output, dlq, sent.len(), &log);
    host.stop_cleanly(&log);

    let (out, dead) = assert_each_once(&c, input, output, dlq, &sent, &seqs);
    assert_eq!(out.len(), 38, "{out:?}");
    let dead_data: Vec<String> = dead.iter().map(data_of).collect();
    assert_eq!(dead_data, ["fail-13", "trap-29"]);
    assert_eq!(dead[0]["error"]["kind"], "retryable", "{}", dead[0]);
    assert_eq!(dead[1]["error"]["kind"], "trap", "{}", dead[1]);
    for e in &dead {
        assert_eq!(e["reason"], "retries_exhausted", "{e}");
        // The failed calls of the halves that held it, then two of the record alone.
        assert!(e["attempts"].as_u64().is_some_and(|n| n >= 2), "{e}");
    }
    assert_eq!(checkpoint(&c, "bisect-1-pol-bisect-in").as_ref(), seqs.last());
}

#[test]
fn without_a_dead_letter_output_records_past_the_max_age_stop_the_shard() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("pol-age-stop-in", "pol-age-stop-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let seqs = put_numbered(&c, input, &records(&["fail-0", "ok-1"]));
    let address = free_address();
    let config = config(
        dir.path(),
        "agestop",
        input,
        output,
        None,
        &format!(
            "task.retry.max.attempts=-1\ntask.retry.max.record.age.ms=1000\nmetrics.address={address}\n"
        ),
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_log(&log, &format!("a batch failed with record {} older than", seqs[0]), 1);
    assert_shard_stopped(&address, input, "record_too_old");
    host.stop_cleanly(&log);
    assert!(read_all(&c, output).is_empty());
    // Nothing was done, so nothing was checkpointed past the start.
    assert_eq!(
        checkpoint(&c, "agestop-1-pol-age-stop-in").as_deref(),
        Some("TRIM_HORIZON"),
        "log:\n{}",
        log_text(&log)
    );
}

#[test]
fn a_fatal_error_stops_the_shard_and_is_not_dead_lettered() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, dlq) = ("pol-fatal-in", "pol-fatal-out", "pol-fatal-dlq");
    create_streams(&c, &[(input, 1), (output, 1), (dlq, 1)]);
    let first = records(&["ok-0"]);
    let mut seqs = put_numbered(&c, input, &first);
    let address = free_address();
    let config = config(
        dir.path(),
        "fatal",
        input,
        output,
        Some(dlq),
        &format!("metrics.address={address}\n"),
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_records(&c, output, 1, &log);
    seqs.extend(put_numbered(&c, input, &records(&["fatal-1", "ok-2"])));
    wait_for_log(&log, "a record asks to stop the shard", 1);
    assert_shard_stopped(&address, input, "fatal");
    let table = "fatal-1-pol-fatal-in";
    wait_for_checkpoint(&c, table, &seqs[0]);
    host.stop_cleanly(&log);
    assert_eq!(data(&c, output), ["ok-0"]);
    assert!(read_all(&c, dlq).is_empty(), "a fatal error dead-letters nothing");
    assert_eq!(checkpoint(&c, table).as_ref(), Some(&seqs[0]));
}

#[test]
fn emits_that_kinesis_would_refuse_are_refused_to_the_task_and_the_others_delivered() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("pol-badkey-in", "pol-badkey-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    // The emulator refuses both, as Kinesis does: the host must never send them.
    let rt = rt();
    let refused = |key: String, hash: Option<&str>| {
        let entry = aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
            .data(aws_sdk_kinesis::primitives::Blob::new(b"x".to_vec()))
            .partition_key(key)
            .set_explicit_hash_key(hash.map(str::to_owned))
            .build()
            .expect("an entry");
        let sent = rt.block_on(c.kinesis.put_records().stream_name(output).records(entry).send());
        sent.map_err(|e| format!("{:?}", e.into_service_error())).expect_err("refused")
    };
    let error = refused("\u{1F600}".repeat(256), None);
    assert!(error.contains("Partition key must be between 1 and 256"), "{error}");
    let error = refused("k".into(), Some("0042"));
    assert!(error.contains("InvalidArgumentException"), "{error}");

    let sent = records(&["a", "bad-key-1", "b", "bad-hash-2", "c"]);
    put(&c, input, &sent);
    let config = config(dir.path(), "badkey", input, output, None, "");
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_records(&c, output, sent.len(), &log);
    host.stop_cleanly(&log);
    assert_eq!(data(&c, output), ["a", "refused:bad-key-1", "b", "refused:bad-hash-2", "c"]);
    assert!(!log_text(&log).contains("PutRecords failed"), "{}", log_text(&log));
}

/// A fault proxy in front of the output stream that refuses, as Kinesis refuses an invalid
/// record, every `PutRecords` request holding the data `refuse-me` (base64 `cmVmdXNlLW1l`).
fn refusing_proxy() -> faults::FaultProxy {
    let e = emulators::emulators();
    faults::FaultProxy::start(
        &e.kinesis_endpoint,
        vec![faults::Rule {
            target_suffix: "PutRecords",
            every: 1,
            fault: faults::Fault::Invalid,
            limit: None,
            body_contains: Some("cmVmdXNlLW1l"),
        }],
    )
}

#[path = "common/faults.rs"]
mod faults;
#[path = "common/http_proxy.rs"]
mod http_proxy;

#[test]
fn a_record_an_output_refuses_is_dead_lettered_and_the_rest_of_its_request_delivered() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, dlq) = ("pol-refused-in", "pol-refused-out", "pol-refused-dlq");
    create_streams(&c, &[(input, 1), (output, 1), (dlq, 1)]);
    let proxy = refusing_proxy();
    let sent = records(&["a", "b", "refuse-me", "c", "d"]);
    put(&c, input, &sent);
    let address = free_address();
    let extra = format!(
        "systems.kinesis.streams.{output}.aws.kinesis.endpoint={}\nmetrics.address={address}\n",
        proxy.endpoint()
    );
    let config = config(dir.path(), "refused", input, output, Some(dlq), &extra);
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_total(&c, output, dlq, sent.len(), &log);
    let labels = [("stream", input), ("output", "out")];
    let counted =
        wait_for_metric(&address, "kinesis_host_output_refused_records_total", &labels, 1.0);
    host.stop_cleanly(&log);

    assert_eq!(data(&c, output), ["a", "b", "c", "d"], "log:\n{}", log_text(&log));
    assert!(proxy.injected("PutRecords") >= 2, "the request and the halves holding the record");
    let dead = envelopes(&c, dlq);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let e = &dead[0];
    assert_eq!(e["reason"], "output_refused", "{e}");
    assert_eq!(e["error"]["kind"], "output_refused", "{e}");
    assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("InvalidArgumentException")));
    assert_eq!(e["output"], serde_json::json!({"name": "out", "stream": output}), "{e}");
    assert_eq!(
        e["source"],
        serde_json::json!({"stream": input, "shard_id": "shardId-000000000000"})
    );
    assert_eq!(e["record"]["partition_key"], "key-0", "{e}");
    assert_eq!(data_of(e), "refuse-me");
    assert_eq!(counted, 1.0);
}

#[test]
fn without_a_dead_letter_output_a_refused_record_stops_the_shard_after_sending_the_others() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("pol-refused-nodlq-in", "pol-refused-nodlq-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let proxy = refusing_proxy();
    let sent = records(&["a", "refuse-me", "b"]);
    let seqs = put_numbered(&c, input, &sent);
    let extra =
        format!("systems.kinesis.streams.{output}.aws.kinesis.endpoint={}\n", proxy.endpoint());
    let config = config(dir.path(), "refusednodlq", input, output, None, &extra);
    let log = dir.path().join("host.log");
    let host = Host::start_with("policy-task", &config, &log, &[]);
    wait_for_log(&log, "Set task.dead.letter.output to go on without such records", 1);
    wait_for_records(&c, output, 2, &log);
    host.stop_cleanly(&log);
    let text = log_text(&log);
    assert!(
        text.contains("output out (stream pol-refused-nodlq-out) refused 1 of the records the task emitted as invalid, such as one with partition key key-0: InvalidArgumentException: a record is invalid (injected); the valid ones were sent"),
        "{text}"
    );
    let out = data(&c, output);
    assert_eq!(&out[..2], ["a", "b"], "the valid records of the request were delivered: {out:?}");
    assert!(!out.iter().any(|d| d == "refuse-me"), "{out:?}");
    // Nothing is checkpointed past the record before the refused one.
    let at = checkpoint(&c, "refusednodlq-1-pol-refused-nodlq-in");
    assert!(
        at.as_deref() == Some("TRIM_HORIZON") || at.as_ref() == Some(&seqs[0]),
        "checkpoint {at:?}, records {seqs:?}"
    );
}
