//! `kinesis-host replay` and `check` end to end: the example tasks produce exactly the expected
//! output, and every kind of bad input gets one clear error.

mod common;

use common::{file_with, guest, kinesis_host, replay, run, workspace};

fn example(name: &str, file: &str) -> std::path::PathBuf {
    workspace().join("examples").join(name).join(file)
}

#[test]
fn hello_logs_every_record_tagged_with_its_shard() {
    let (out, stdout, stderr) = run(kinesis_host()
        .args(["replay"])
        .arg(guest("hello"))
        .arg("--input")
        .arg(example("hello", "records.jsonl")));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "", "hello emits nothing");
    let logged: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split_once(" key=").map(|(_, rest)| rest))
        .map(|rest| rest.split(" job=").next().unwrap_or(rest))
        .collect();
    let seq = |n: u32| format!("{n:056}");
    let expected = [
        format!("user-1 stream=records shard=shardId-000000000000 seq={} data=hello world", seq(1)),
        format!(
            "user-3 stream=records shard=shardId-000000000000 seq={} data=samza says hi",
            seq(2)
        ),
        format!(
            "user-1 stream=records shard=shardId-000000000000 seq={} data=héllo, wörld: UTF-8 is fine",
            seq(3)
        ),
        format!(
            "user-2 stream=records shard=shardId-000000000001 seq={} data=hello from the second shard",
            seq(1)
        ),
        format!(
            "user-4 stream=records shard=shardId-000000000001 seq={} data=kinesis-host says hi too",
            seq(2)
        ),
        format!("user-2 stream=records shard=shardId-000000000001 seq={} data=goodbye", seq(3)),
    ];
    assert_eq!(logged, expected);
    assert!(
        stderr.contains(
            r#"job="replay" stream="records" shard="shardId-000000000001" source="task""#
        ),
        "log lines carry job, stream and shard: {stderr}"
    );
    assert!(stderr.contains("replay: 6 records in 2 batches from 2 shards; 0 emitted"), "{stderr}");
}

#[test]
fn filter_route_emits_exactly_the_matching_records() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let output = dir.path().join("out.jsonl");
    let input = example("filter-route", "records.jsonl");
    let config = example("filter-route", "job.properties");
    let (out, stdout, stderr) =
        run(replay("filter-route", &input, &config).arg("--output").arg(&output));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "", "with --output nothing goes to stdout");
    let written = std::fs::read_to_string(&output).expect("output file");
    let expected = concat!(
        r#"{"output":"errors","partition_key":"web-1","data":"RVJST1IgR0VUIC9jaGVja291dCA1MDA=","text":"ERROR GET /checkout 500","shard_id":"shardId-000000000000"}"#,
        "\n",
        r#"{"output":"errors","partition_key":"db-1","data":"RVJST1IgY29ubmVjdGlvbiByZWZ1c2VkIGJ5IGRiLTE6NTQzMg==","text":"ERROR connection refused by db-1:5432","shard_id":"shardId-000000000001"}"#,
        "\n",
        r#"{"output":"errors","partition_key":"worker-7","data":"RVJST1Igam9iIDQyIGZhaWxlZDogdGltZW91dA==","text":"ERROR job 42 failed: timeout","shard_id":"shardId-000000000001"}"#,
        "\n",
    );
    assert_eq!(written, expected);
    assert!(
        stderr.contains("replay: 8 records in 2 batches from 2 shards; 3 emitted;"),
        "{stderr}"
    );
}

#[test]
fn word_count_keeps_counts_in_state_across_batches() {
    // Batches of two records: the counts must carry over from batch to batch through state.
    let records = concat!(
        r#"{"partition_key":"a","text":"the cat"}"#,
        "\n",
        r#"{"partition_key":"b","text":"the dog"}"#,
        "\n",
        r#"{"partition_key":"c","text":"a cat, a dog"}"#,
        "\n",
        r#"{"partition_key":"d","text":"THE END"}"#,
        "\n",
        r#"{"partition_key":"e","shard_id":"shardId-000000000001","text":"the cat"}"#,
        "\n",
    );
    let (_d1, input) = file_with("records.jsonl", records.as_bytes());
    let (_d2, config) = file_with("job.properties", b"task.batch.max.records=2\n");
    let (out, stdout, stderr) = run(&mut replay("word-count", &input, &config));
    assert!(out.status.success(), "{stderr}");
    let counts: Vec<(String, String)> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            (
                v["shard_id"].as_str().unwrap_or("").to_owned(),
                v["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let shard0 = "shardId-000000000000";
    let expected: Vec<(String, String)> = [
        (shard0, "the=2"),
        (shard0, "cat=1"),
        (shard0, "dog=1"),
        (shard0, "a=2"),
        (shard0, "cat=2"),
        (shard0, "dog=2"),
        (shard0, "the=3"),
        (shard0, "end=1"),
        ("shardId-000000000001", "the=1"),
        ("shardId-000000000001", "cat=1"),
    ]
    .iter()
    .map(|(s, t)| ((*s).to_owned(), (*t).to_owned()))
    .collect();
    assert_eq!(counts, expected);
    assert!(stderr.contains("5 records in 3 batches from 2 shards"), "{stderr}");
}

#[test]
fn check_lists_exports_and_imports_and_uses_the_cache() {
    let cache = tempfile::tempdir().expect("temporary folder");
    let check = || {
        run(kinesis_host()
            .env("KINESIS_HOST_CACHE_DIR", cache.path())
            .arg("check")
            .arg(guest("word-count"))
            .arg("--config")
            .arg(example("word-count", "job.properties")))
    };
    let (out, first, stderr) = check();
    assert!(out.status.success(), "{stderr}");
    assert!(first.contains("a kinesis-host task (kinesis:task/task@0.1.0)"), "{first}");
    assert!(first.contains("machine code: compiled now (loaded in "), "{first}");
    assert!(first.contains("exports:\n  kinesis:task/task@0.1.0\n"), "{first}");
    for import in ["kinesis:task/state@0.1.0", "kinesis:task/output@0.1.0", "wasi:cli/stderr@0.2.6"]
    {
        assert!(first.contains(&format!("\n  {import}")), "{import} in {first}");
    }
    assert!(first.contains("config: "), "{first}");
    let cached: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache folder")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(cached.len(), 1, "one compiled component in the cache");
    let (_, second, _) = check();
    assert!(second.contains("machine code: taken from the cache (loaded in "), "{second}");
}

/// Runs `replay` expecting failure; returns the one `error:` line.
fn replay_error(
    task: &std::path::Path,
    input: &std::path::Path,
    config: Option<&std::path::Path>,
) -> String {
    let mut cmd = kinesis_host();
    cmd.args(["replay", "--log", "off"]).arg(task).arg("--input").arg(input);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let (out, stdout, stderr) = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line in: {stderr}");
    errors[0].to_owned()
}

fn good_input() -> (tempfile::TempDir, std::path::PathBuf) {
    file_with("records.jsonl", br#"{"partition_key":"k","text":"x"}"#)
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let (_d, input) = good_input();
    let (_t, task) = file_with("task.wasm", b"#!/bin/sh\necho not wasm\n");
    let err = replay_error(&task, &input, None);
    assert!(err.ends_with("task.wasm is not a WebAssembly file (it does not start with \\0asm); build the task with `cargo build --target wasm32-wasip2`"), "{err}");
}

#[test]
fn a_core_module_is_refused() {
    let (_d, input) = good_input();
    // The smallest valid core module: magic and version 1.
    let (_t, task) = file_with("core.wasm", b"\0asm\x01\0\0\0");
    let err = replay_error(&task, &input, None);
    assert!(err.ends_with("core.wasm is a core WebAssembly module, not a component; build it for the wasm32-wasip2 target (not wasm32-unknown-unknown or wasm32-wasip1)"), "{err}");
}

#[test]
fn a_component_missing_process_is_refused_naming_the_export() {
    let (_d, input) = good_input();
    let err = replay_error(&guest("partial-task"), &input, None);
    assert!(
        err.contains("partial_task.wasm is not a kinesis-host task: it does not export kinesis:task/task@0.1.0#process;"),
        "{err}"
    );
}

#[test]
fn a_component_of_another_world_is_refused() {
    let (_d, input) = good_input();
    let err = replay_error(&guest("not-a-task"), &input, None);
    assert!(
        err.contains("does not export the interface kinesis:task/task@0.1.0; it exports [test:greet/greet@0.1.0]"),
        "{err}"
    );
}

#[test]
fn a_missing_task_file_is_named() {
    let (_d, input) = good_input();
    let err = replay_error(std::path::Path::new("/nonexistent/task.wasm"), &input, None);
    assert_eq!(
        err,
        "error: cannot read task component /nonexistent/task.wasm: No such file or directory (os error 2)"
    );
}

#[test]
fn bad_jsonl_lines_are_reported_with_their_line_number() {
    // 129 characters outside the Basic Multilingual Plane: 258 as Kinesis counts them.
    let emoji_key =
        format!("{{\"partition_key\":\"{}\",\"text\":\"a\"}}\n", "\u{1F600}".repeat(129));
    let cases: [(&str, &str); 10] = [
        (
            "{\"partition_key\":\"k\",\"text\":\"ok\"}\nnot json\n",
            ":2: not a record: expected ident at line 1 column 2",
        ),
        (
            "{\"partition_key\":\"k\"}\n",
            ":1: missing the record's data: give `data` (base64) or `text` (UTF-8)",
        ),
        ("\n\n{\"partition_key\":\"k\",\"data\":\"%%%\"}\n", ":3: `data` is not valid base64"),
        (
            "{\"partition_key\":\"k\",\"text\":\"a\",\"data\":\"YQ==\"}\n",
            ":1: give either `data` (base64) or `text` (UTF-8), not both",
        ),
        (
            "{\"partition_key\":\"\",\"text\":\"a\"}\n",
            ":1: partition_key: the partition key is empty; Kinesis takes 1 to 256 characters",
        ),
        (
            &emoji_key,
            ":1: partition_key: the partition key is 258 characters long as Kinesis counts them \
             (UTF-16 code units); Kinesis takes 1 to 256",
        ),
        (
            "{\"partition_key\":\"k\",\"text\":\"a\",\"explicit_hash_key\":\"007\"}\n",
            ":1: explicit_hash_key: explicit hash key \"007\" is not a decimal number from 0 to \
             2^128 - 1 without sign or leading zeros",
        ),
        (
            "{\"partition_key\":\"k\",\"text\":\"a\",\"sequence_number\":\"20\"}\n\
             {\"partition_key\":\"k\",\"text\":\"b\",\"sequence_number\":\"10\"}\n",
            ":2: sequence_number 10 (sub_sequence_number 0) does not come after the one on line 1 \
             (20 sub 0) in shard shardId-000000000000 of stream records: a shard's records must be \
             in increasing order; sort them, or leave sequence_number out to have them numbered",
        ),
        (
            // The same record twice; another shard may reuse the number.
            "{\"partition_key\":\"k\",\"text\":\"a\",\"sequence_number\":\"7\"}\n\
             {\"partition_key\":\"k\",\"text\":\"a\",\"sequence_number\":\"7\",\"shard_id\":\"s2\"}\n\
             {\"partition_key\":\"k\",\"text\":\"a\",\"sequence_number\":\"007\"}\n",
            ":3: sequence_number 007 (sub_sequence_number 0) does not come after the one on line 1",
        ),
        (
            "{\"partition_key\":\"k\",\"text\":\"a\",\"colour\":1}\n",
            ":1: not a record: unknown field `colour`",
        ),
    ];
    for (input, expected) in cases {
        let (_d, path) = file_with("records.jsonl", input.as_bytes());
        let err = replay_error(&guest("echo-task"), &path, None);
        assert!(err.contains(&format!("records.jsonl{expected}")), "{err}\nexpected: {expected}");
    }
}

#[test]
fn a_line_longer_than_any_record_is_refused_without_reading_on() {
    // No line break at all: replay stops reading past the longest line a record can take.
    let input = format!("{{\"partition_key\":\"k\",\"text\":\"{}", "x".repeat(200 << 10));
    let (_d, path) = file_with("records.jsonl", input.as_bytes());
    let (_c, config) = file_with("job.properties", b"task.record.max.bytes=1024\n");
    let err = replay_error(&guest("echo-task"), &path, Some(&config));
    assert!(
        err.ends_with("records.jsonl:1: the line is longer than 71680 bytes, more than a record of task.record.max.bytes=1024 takes; the input must be JSON Lines, one record per line"),
        "{err}"
    );
}

/// Runs `cmd`, killing it if it has not exited within 60 s (a guard against a hang, not a timing
/// assertion): its status, stdout and stderr.
fn run_bounded(cmd: &mut std::process::Command) -> (std::process::ExitStatus, String) {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not exit within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    (status, stderr)
}

#[test]
fn check_refuses_devices_and_fifos_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let zero = dir.path().join("task.wasm");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let fifo = dir.path().join("fifo.wasm");
    let c_path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    for (path, kind) in [(&zero, "a character device"), (&fifo, "a FIFO (named pipe)")] {
        let (status, stderr) = run_bounded(kinesis_host().arg("check").arg(path));
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "error: cannot read task component {}: it is {kind}, not a regular file",
                path.display()
            )),
            "{stderr}"
        );
    }
    // The same for the job's settings.
    let (status, stderr) =
        run_bounded(kinesis_host().arg("check").arg(guest("echo-task")).arg("--config").arg(&fifo));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("it is a FIFO (named pipe), not a regular file"), "{stderr}");
}

#[test]
fn a_record_over_the_size_limit_is_refused() {
    let big = "x".repeat(1025);
    let input = format!(
        "{{\"partition_key\":\"k\",\"text\":\"a\"}}\n{{\"partition_key\":\"k\",\"text\":\"{big}\"}}\n"
    );
    let (_d, path) = file_with("records.jsonl", input.as_bytes());
    let (_c, config) = file_with("job.properties", b"task.record.max.bytes=1024\n");
    let err = replay_error(&guest("echo-task"), &path, Some(&config));
    assert!(
        err.ends_with("records.jsonl:2: record data is 1025 bytes, over the limit of 1024 (task.record.max.bytes)"),
        "{err}"
    );
}

#[test]
fn bad_config_values_get_one_clear_error() {
    let (_d, input) = good_input();
    let cases = [
        (
            "task.limits.batch.timeout.ms=soon\n",
            "task.limits.batch.timeout.ms=soon is not valid: expected a whole number from 1 to 86400000",
        ),
        (
            "task.limits.memry.bytes=1\n",
            "unknown key task.limits.memry.bytes (did you mean task.limits.memory.bytes?)",
        ),
        (
            "task.output.alerts=nostream\n",
            "task.output.alerts=nostream is not valid: expected task.output.<name>=<system>.<stream>",
        ),
    ];
    for (text, expected) in cases {
        let (_c, config) = file_with("job.properties", text.as_bytes());
        let err = replay_error(&guest("echo-task"), &input, Some(&config));
        assert!(err.contains(expected), "{err}\nexpected: {expected}");
    }
}

#[test]
fn an_output_not_in_the_config_is_refused_to_the_task() {
    // echo-task emits to `out`; a job that names only `other` makes that a fatal task error.
    let (_d, input) = good_input();
    let (_c, config) = file_with("job.properties", b"task.output.other=kinesis.other-stream\n");
    let err = replay_error(&guest("echo-task"), &input, Some(&config));
    assert!(err.contains("shard shardId-000000000000 stopped"), "{err}");
    assert!(err.contains("Fatal"), "{err}");
}

#[test]
fn poison_records_are_set_aside_and_partial_results_delivered_again() {
    // Shard 0: a poison record between good ones; shard 1: the task finishes two records per
    // call, so the host must deliver the rest of each batch again, in order.
    let mut input = String::new();
    for (i, data) in ["a", "b", "poison", "c", "d"].iter().enumerate() {
        input.push_str(&format!("{{\"partition_key\":\"p{i}\",\"text\":\"{data}\"}}\n"));
    }
    let (_d, path) = file_with("records.jsonl", input.as_bytes());
    let (out, stdout, stderr) = run(kinesis_host()
        .args(["replay", "--log", "warn"])
        .arg(guest("echo-task"))
        .arg("--input")
        .arg(&path));
    assert!(out.status.success(), "{stderr}");
    let texts: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON")["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(texts, ["a", "b", "c", "d"]);
    assert!(stderr.contains("Poison record set aside."), "{stderr}");
    assert!(stderr.contains(&format!("sequence_number=\"{:056}\"", 3)), "{stderr}");
    assert!(
        stderr.contains("4 records in 2 batches from 1 shards; 4 emitted; 1 poison records"),
        "{stderr}"
    );

    let (_c, config) = file_with("job.properties", b"task.config.leading=2\n");
    let input = example("hello", "records.jsonl");
    let (out, stdout, stderr) = run(&mut replay("echo-task", &input, &config));
    assert!(out.status.success(), "{stderr}");
    let keys: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON")["partition_key"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(keys, ["user-1", "user-3", "user-1", "user-2", "user-4", "user-2"]);
    assert!(
        stderr.contains(
            "6 records in 4 batches from 2 shards; 6 emitted; 0 poison records, 0 retries"
        ),
        "{stderr}"
    );
}
