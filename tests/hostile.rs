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
        let spec = Arc::new(InstanceSpec {
            job: "test".into(),
            stream: "s".into(),
            shard_id: "shardId-000000000000".into(),
            outputs: Outputs::Any,
            config: vec![],
            limits,
        });
        let mut instance = TaskInstance::new(&flood, spec).expect("instance");
        let mut batch = Batch::new("s", "shardId-000000000000", 10, 1 << 20);
        batch.push(&RecordRef {
            data: b"x",
            partition_key: "k",
            sequence_number: "1",
            sub_sequence_number: 0,
            explicit_hash_key: None,
            approximate_arrival_millis: 0,
        });
        let mut state = ShardState::default();
        let output = instance.process(&batch, &mut state).expect("the flood is not an error");
        assert_eq!(output.emits.len(), 1);
        // 10 000 log lines of 100 bytes and 1 000 stdout lines of 22 bytes against a budget of
        // 10 000 bytes that never refills: 100 log lines pass, and nothing else.
        assert_eq!(instance.stats().log_lines_dropped, 10_000 - 100 + 1_000);
    });
}
