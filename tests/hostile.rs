//! Hostile guests, each a real component: the host ends or contains every one of them, and a
//! well-behaved task in the same process keeps processing its records exactly, meanwhile.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{guest, kinesis_host, replay, run};
use kinesis_host::config::{JobConfig, RetryPolicy};
use kinesis_host::pipeline::{ShardError, ShardStats, ShardWorker, Sink};
use kinesis_host_runtime::{
    Batch, BatchOutput, CallError, Clock, InstanceSpec, Limits, Outputs, RecordRef, Runtime,
    RuntimeConfig, ShardState, SystemClock, TaskComponent, TaskInstance, TrapKind,
};

/// What a shard emitted and set aside.
#[derive(Debug, Default)]
struct Collected {
    emitted: Vec<(String, Vec<u8>)>,
    poisoned: Vec<String>,
}

impl Sink for Collected {
    fn commit(&mut self, _batch: &Batch, output: BatchOutput) {
        self.emitted.extend(output.emits.into_iter().map(|e| (e.partition_key, e.data)));
    }

    fn poison(&mut self, _shard_id: &str, record: RecordRef<'_>, _message: &str) {
        self.poisoned.push(record.sequence_number.to_owned());
    }
}

/// `n` records of `size` bytes with distinct keys; `special` replaces the data of record `at`.
fn records(n: usize, size: usize, special: Option<(usize, &[u8])>) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let data = match special {
                Some((at, data)) if at == i => data.to_vec(),
                _ => {
                    let mut d = format!("record {i:06} ").into_bytes();
                    d.resize(size, b'.');
                    d
                }
            };
            (format!("key-{i}"), data)
        })
        .collect()
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        cache_dir: Some(common::workspace().join("target/test-cache")),
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn config(limits: Limits, batch_records: usize, task_config: &[(&str, &str)]) -> JobConfig {
    let mut c = JobConfig { limits, ..JobConfig::default() };
    c.batch.max_records = batch_records;
    c.retry = RetryPolicy {
        max_attempts: Some(3),
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryPolicy::default()
    };
    c.task_config = task_config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    c
}

/// Runs `records` through `component` as one shard, the way `replay` and `run` do.
fn run_shard(
    component: &Arc<TaskComponent>,
    config: &JobConfig,
    records: &[(String, Vec<u8>)],
) -> (Result<(), ShardError>, ShardStats, Collected) {
    let spec = Arc::new(InstanceSpec {
        job: "test".into(),
        stream: "s".into(),
        shard_id: "shardId-000000000000".into(),
        outputs: Outputs::Any,
        config: config.task_config.clone(),
        limits: config.limits.clone(),
    });
    let mut worker = ShardWorker::new(component.clone(), spec, config.retry, Arc::new(SystemClock));
    let mut sink = Collected::default();
    let mut result = Ok(());
    for (n, chunk) in records.chunks(config.batch.max_records).enumerate() {
        let mut batch = Batch::new("s", "shardId-000000000000", usize::MAX, usize::MAX);
        for (i, (key, data)) in chunk.iter().enumerate() {
            let seq = (n * config.batch.max_records + i + 1).to_string();
            batch.push(&RecordRef {
                data,
                partition_key: key,
                sequence_number: &seq,
                sub_sequence_number: 0,
                explicit_hash_key: None,
                approximate_arrival_millis: 0,
            });
        }
        result = worker.run(batch, &mut sink);
        if result.is_err() {
            break;
        }
    }
    let stats = worker.stats();
    worker.shutdown();
    (result, stats, sink)
}

/// Runs `hostile` while the well-behaved echo task processes 2 000 records again and again in
/// another thread of the same process; every pass of the echo task must be exact.
fn alongside<T>(hostile: impl FnOnce(&Runtime) -> T) -> T {
    let runtime = runtime();
    let echo = runtime.load(&guest("echo-task")).expect("echo-task loads");
    let done = Arc::new(AtomicBool::new(false));
    let good = {
        let done = done.clone();
        std::thread::spawn(move || {
            let input = records(2000, 100, None);
            let config = config(Limits::default(), 100, &[]);
            let mut passes = 0;
            loop {
                let (result, stats, out) = run_shard(&echo, &config, &input);
                assert!(result.is_ok(), "the well-behaved task failed: {result:?}");
                assert_eq!(out.emitted, input, "the well-behaved task's output differs");
                assert_eq!(stats.records, 2000);
                passes += 1;
                if done.load(Ordering::Relaxed) {
                    return passes;
                }
            }
        })
    };
    let result = hostile(&runtime);
    done.store(true, Ordering::Relaxed);
    let passes = good.join().expect("the well-behaved task's thread");
    assert!(passes >= 1);
    result
}

fn trap_kind(error: &ShardError) -> Option<TrapKind> {
    match error {
        ShardError::RetriesExhausted { source: CallError::Trap { kind, .. }, .. } => Some(*kind),
        _ => None,
    }
}

#[test]
fn an_endless_loop_ends_at_the_deadline() {
    let (result, stats, out) = alongside(|rt| {
        let spin = rt.load(&guest("spin-task")).expect("spin-task loads");
        let limits = Limits { batch_timeout: Duration::from_millis(100), ..Limits::default() };
        run_shard(&spin, &config(limits, 10, &[]), &records(30, 10, Some((15, b"spin"))))
    });
    let error = result.expect_err("the spinning batch cannot finish");
    assert_eq!(trap_kind(&error), Some(TrapKind::Deadline), "{error}");
    assert_eq!(stats.traps, 3, "each of the 3 attempts trapped and re-created the instance");
    assert_eq!(out.emitted.len(), 10, "the batch before the spinning one was committed");
}

#[test]
fn a_memory_bomb_stops_at_the_cap() {
    let (result, stats, out) = alongside(|rt| {
        let bomb = rt.load(&guest("memory-bomb-task")).expect("memory-bomb-task loads");
        let limits = Limits { memory_bytes: 32 << 20, ..Limits::default() };
        run_shard(&bomb, &config(limits, 10, &[]), &records(20, 10, Some((12, b"bomb"))))
    });
    let error = result.expect_err("the bomb cannot finish");
    assert_eq!(trap_kind(&error), Some(TrapKind::MemoryLimit), "{error}");
    assert!(error.to_string().contains("over the 33554432-byte limit"), "{error}");
    assert_eq!(stats.traps, 3);
    assert_eq!(out.emitted.len(), 10);
}

#[test]
fn a_panic_every_third_batch_is_survived_by_re_instantiation() {
    let input = records(100, 20, None);
    let (result, stats, out) = alongside(|rt| {
        let panicky = rt.load(&guest("panic-task")).expect("panic-task loads");
        run_shard(&panicky, &config(Limits::default(), 10, &[("panic_every", "3")]), &input)
    });
    assert!(result.is_ok(), "{result:?}");
    // Calls 3, 6, 9… of each instance panic: batches 3, 5, 7 and 9 each trap once.
    assert_eq!(stats.traps, 4);
    assert_eq!(stats.retries, 4);
    assert_eq!(
        out.emitted, input,
        "every record exactly once: a trapped batch's emits are discarded"
    );
}

#[test]
fn an_emit_flood_hits_its_cap() {
    let (result, stats, out) = alongside(|rt| {
        let flood = rt.load(&guest("emit-flood-task")).expect("emit-flood-task loads");
        let limits = Limits { emits_per_batch: 500, ..Limits::default() };
        run_shard(&flood, &config(limits, 10, &[]), &records(30, 10, None))
    });
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(stats.batches, 3);
    assert_eq!(out.emitted.len(), 3 * 500, "each batch emitted exactly up to the cap");
}

#[test]
fn files_environment_arguments_and_sockets_find_nothing() {
    // The host's own environment has variables and files; the guest must see none of them.
    let (result, _, out) = alongside(|rt| {
        let sneaky = rt.load(&guest("sneaky-task")).expect("sneaky-task loads");
        run_shard(&sneaky, &config(Limits::default(), 10, &[]), &records(1, 10, None))
    });
    assert!(result.is_ok(), "{result:?}");
    let seen: Vec<String> =
        out.emitted.iter().map(|(_, d)| String::from_utf8_lossy(d).into_owned()).collect();
    assert_eq!(
        seen,
        ["env=0", "args=0", "read_etc_passwd=err", "read_dir_root=err", "cwd=ok", "tcp=err"],
        "cwd names a directory but grants nothing: reading `/` failed"
    );
}

#[test]
fn guest_stdout_and_stderr_go_to_the_log_tagged_with_the_shard() {
    let (_d, input) = common::file_with("r.jsonl", br#"{"partition_key":"k","text":"x"}"#);
    let (out, stdout, stderr) =
        run(kinesis_host().arg("replay").arg(guest("sneaky-task")).arg("--input").arg(&input));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"text\":\"env=0\""), "{stdout}");
    assert!(
        stderr.contains(r#"INFO sneaky stdout line job="replay" stream="records" shard="shardId-000000000000" source="stdout""#),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"WARN sneaky stderr line job="replay" stream="records" shard="shardId-000000000000" source="stderr""#),
        "{stderr}"
    );
}

#[test]
fn a_panic_message_reaches_the_host_log() {
    let (_d, input) = common::file_with(
        "r.jsonl",
        b"{\"partition_key\":\"k\",\"text\":\"a\"}\n{\"partition_key\":\"k\",\"text\":\"b\"}\n",
    );
    let (_c, config) = common::file_with(
        "job.properties",
        b"task.batch.max.records=1\ntask.config.panic_every=2\ntask.retry.backoff.initial.ms=1\n",
    );
    let (out, stdout, stderr) = run(&mut replay("panic-task", &input, &config));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "both records echoed once: {stdout}");
    assert!(
        stderr.contains("error=task on shardId-000000000000 panicked (stderr: panicked at tests/guests/panic-task/src/lib.rs:"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "planned panic on call 2): wasm trap: wasm `unreachable` instruction executed"
        ),
        "{stderr}"
    );
}

/// An instance of `component` on shard `shardId-000000000000` of stream `s`.
fn instance_of(
    component: &TaskComponent,
    outputs: Outputs,
    config: Vec<(String, String)>,
    limits: Limits,
) -> TaskInstance {
    let spec = Arc::new(InstanceSpec {
        job: "test".into(),
        stream: "s".into(),
        shard_id: "shardId-000000000000".into(),
        outputs,
        config,
        limits,
    });
    TaskInstance::new(component, spec).expect("instance")
}

/// A batch of one record, data `x`.
fn one_record_batch() -> Batch {
    let mut batch = Batch::new("s", "shardId-000000000000", 10, 1 << 20);
    batch.push(&RecordRef {
        data: b"x",
        partition_key: "k",
        sequence_number: "1",
        sub_sequence_number: 0,
        explicit_hash_key: None,
        approximate_arrival_millis: 0,
    });
    batch
}

/// A clock that stands still, so the log budget never refills during a test.
#[derive(Debug)]
struct FrozenClock(Instant);

impl Clock for FrozenClock {
    fn now(&self) -> Instant {
        self.0
    }
}

#[test]
fn a_log_flood_is_cut_to_the_rate_limit() {
    alongside(|_| {
        let rt = Runtime::new(RuntimeConfig {
            clock: Arc::new(FrozenClock(Instant::now())),
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let flood = rt.load(&guest("log-flood-task")).expect("log-flood-task loads");
        let limits = Limits { log_bytes_per_second: 10_000, ..Limits::default() };
        let mut instance = instance_of(&flood, Outputs::Any, vec![], limits);
        let batch = one_record_batch();
        let mut state = ShardState::default();
        let output = instance.process(&batch, &mut state).expect("the flood is not an error");
        assert_eq!(output.emits.len(), 1);
        // 10 000 log lines of 100 bytes and 1 000 stdout lines of 22 bytes against a budget of
        // 10 000 bytes that never refills: 100 log lines pass, and nothing else.
        assert_eq!(instance.stats().log_lines_dropped, 10_000 - 100 + 1_000);
    });
}

/// The `peak memory N MiB` that `replay` reports.
fn peak_mib(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("replay: ")?
                .split("; peak memory ")
                .nth(1)?
                .strip_suffix(" MiB")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no peak memory in the summary:\n{stderr}"))
}

#[test]
fn a_metric_name_bomb_and_every_other_import_make_the_host_hold_only_what_is_documented() {
    // The same task twice over the same records, holding the same 32 MiB of its own memory:
    // once quiet, once handing that buffer to every import (four 32 MiB metric names and 300
    // more names per call, a 32 MiB log line, state key, value, output name and partition key,
    // and every second call a 32 MiB error message). Whatever the host holds for the second
    // beyond the first is what a task can make the host hold beyond its cap: the README says at
    // most one copy of a failed call's message (here 32 MiB) and the small limits set here.
    let records: String =
        (0..20).map(|i| format!("{{\"partition_key\":\"k{i}\",\"text\":\"r{i}\"}}\n")).collect();
    let (_d, input) = common::file_with("r.jsonl", records.as_bytes());
    let run_mode = |mode: &str| {
        let (_c, config) = common::file_with(
            "job.properties",
            format!(
                "task.batch.max.records=2\ntask.limits.memory.bytes={}\ntask.config.mb=32\n\
                 task.config.mode={mode}\ntask.limits.emit.bytes.per.batch=1048576\n\
                 task.limits.state.total.bytes=1048576\ntask.retry.backoff.initial.ms=1\n\
                 task.retry.backoff.max.ms=1\n",
                80 << 20
            )
            .as_bytes(),
        );
        let (out, stdout, stderr) = run(&mut replay("import-bomb-task", &input, &config));
        assert!(out.status.success(), "{mode}: {stderr}");
        (stdout, stderr)
    };
    let (quiet_out, quiet_log) = run_mode("quiet");
    let (bomb_out, bomb_log) = run_mode("bomb");
    assert_eq!(quiet_out.lines().count(), 20, "{quiet_out}");
    assert_eq!(bomb_out, quiet_out, "every record echoed exactly once in both modes");
    assert!(bomb_log.contains("Task metric ignored: a metric name must be 1 to 64"), "{bomb_log}");
    assert!(bomb_log.contains("9 retries"), "every second call failed: {bomb_log}");
    let (quiet, bomb) = (peak_mib(&quiet_log), peak_mib(&bomb_log));
    assert!(
        bomb <= quiet + 32 + 16,
        "the bomb made the host hold {} MiB more than the quiet run ({quiet} MiB)",
        bomb.saturating_sub(quiet)
    );
}

#[test]
fn an_instance_keeps_at_most_its_metric_names_and_holds_little_between_calls() {
    let rt = runtime();
    let bomb = rt.load(&guest("import-bomb-task")).expect("import-bomb-task loads");
    let limits = Limits { memory_bytes: 40 << 20, metric_names: 100, ..Limits::default() };
    let config = vec![("mode".into(), "bomb".into()), ("mb".into(), "4".into())];
    let outputs = Outputs::Only(["out".to_owned()].into());
    let mut instance = instance_of(&bomb, outputs, config, limits);
    let batch = one_record_batch();
    let mut state = ShardState::default();
    let mut names = std::collections::BTreeSet::new();
    for call in 1..=5 {
        let result = instance.process(&batch, &mut state);
        assert_eq!(result.is_err(), call % 2 == 0, "call {call}: {result:?}");
        if let Err(CallError::Task { message, .. }) = &result {
            assert!(message.len() < (8 << 10) + 64, "the message is cut: {}", message.len());
            assert!(
                message.ends_with("(cut: 4194304 bytes in all)"),
                "{}",
                &message[message.len() - 40..]
            );
        }
        names.extend(instance.take_metric_changes().into_iter().map(|(name, _)| name.to_string()));
        assert!(instance.metrics().len() <= 100, "{}", instance.metrics().len());
        assert!(
            instance.host_bytes() < 256 << 10,
            "{} bytes held between calls",
            instance.host_bytes()
        );
        assert!(state.is_empty(), "the 4 MiB key and value were refused");
    }
    assert_eq!(names.len(), 100, "the first 100 valid names, and nothing else");
    assert!(names.iter().all(|n| n.len() < 16), "{names:?}");
    let stats = instance.stats();
    // Per call: four 4 MiB names, 200 names over the limit, a histogram of NaN.
    assert_eq!(stats.metrics_refused, 5 * (4 + 200 + 1), "{stats:?}");
    assert!(stats.emits_refused >= 10 && stats.state_writes_refused >= 10, "{stats:?}");
}

#[test]
fn a_task_cannot_forge_host_log_lines() {
    let (_d, input) = common::file_with("r.jsonl", b"{\"partition_key\":\"k\",\"text\":\"a\"}\n");
    let (_c, config) = common::file_with("job.properties", b"task.retry.backoff.initial.ms=1\n");
    let (out, stdout, stderr) = run(kinesis_host()
        .args(["replay", "--log", "info"])
        .arg(guest("forge-log-task"))
        .arg("--input")
        .arg(&input)
        .arg("--config")
        .arg(&config));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "the record echoed once: {stdout}");
    // Every line of the log is the host's: its own time stamp and level, never the task's.
    for line in stderr.lines() {
        assert!(!line.starts_with("2026-12-04T00:00:00.000000Z"), "a forged line:\n{stderr}");
        assert!(!line.contains(['\r', '\u{1b}', '\u{202e}']), "a raw control character: {line:?}");
    }
    // Each way in was tried, and shows escaped: the task's log line, the refused state key and
    // metric name, the retried error's message (stdout and stderr lines are split at their line
    // breaks, each a tagged line of its own).
    let escaped = "\\n2026-12-04T00:00:00.000000Z ERROR kinesis_host: FORGED";
    for (what, prefix) in [
        ("log line", "ERROR log"),
        ("state key", "key=key"),
        ("metric name", "metric=metric"),
        ("error message", "Retryable error: error"),
    ] {
        assert!(stderr.contains(&format!("{prefix}{escaped}")), "{what} not escaped:\n{stderr}");
    }
    assert!(stderr.contains("FORGED all jobs stopped\\r\\u{1b}[2K\\u{202e}"), "{stderr}");
    for source in ["stdout", "stderr"] {
        assert!(stderr.contains(&format!("source=\"{source}\"")), "{stderr}");
    }
}
