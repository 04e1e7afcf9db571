//! Durable task state against kinesis-local and dynalite: the `word-count` example keeps one
//! count per word in its shard's state and emits the running count, so exact counts prove that
//! the state a host restores is the one that matches the checkpoint it resumes from: across a
//! graceful stop, a SIGKILL and a takeover by another host, a host paused past its lease, and a
//! split followed by a merge.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use aws::*;
use aws_sdk_dynamodb::types::AttributeValue;
use common::{file_with, replay, run};
use kinesis_host_coordinator::aws::AwsClients;

/// `rounds` records per word, one word per record, the word as partition key (so all records
/// of a word are in one shard at a time, and its count is exact).
fn words(n: usize, rounds: usize) -> Vec<(String, String)> {
    (0..rounds).flat_map(|_| (0..n).map(|w| (format!("w{w}"), format!("w{w}")))).collect()
}

/// Every count emitted so far, per word (`w3=5` → 5 under `w3`).
fn emitted_counts(c: &AwsClients, output: &str) -> BTreeMap<String, Vec<u64>> {
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, data) in read_all(c, output) {
        let (word, count) = data.split_once('=').expect("word=count");
        counts.entry(word.to_owned()).or_default().push(count.parse().expect("a count"));
    }
    counts
}

/// Waits (bounded) until every one of the `n` words has reached `count`.
fn wait_for_counts(c: &AwsClients, output: &str, n: usize, count: u64, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = emitted_counts(c, output);
        let reached = (0..n)
            .all(|w| got.get(&format!("w{w}")).is_some_and(|v| v.iter().any(|c| *c >= count)));
        if reached {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the words did not reach {count}: {got:?}; host log:\n{}",
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every word's highest count is `count`: no record was counted twice or lost.
fn assert_exact(c: &AwsClients, output: &str, n: usize, count: u64) {
    let got = emitted_counts(c, output);
    assert_eq!(got.len(), n, "{got:?}");
    for (word, counts) in &got {
        assert_eq!(counts.iter().max(), Some(&count), "{word}: {counts:?}");
    }
}

fn job(
    dir: &std::path::Path,
    name: &str,
    input: &str,
    output: &str,
    extra: &str,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    job_properties(
        dir,
        name,
        input,
        output,
        &format!("task.output.counts=kinesis.{output}\n{extra}"),
    )
}

fn attr<'a>(
    item: &'a std::collections::HashMap<String, AttributeValue>,
    name: &str,
) -> Option<&'a AttributeValue> {
    item.get(name)
}

/// The items of the companion state table (shard, part).
fn state_parts(c: &AwsClients, table: &str) -> Vec<(String, String)> {
    rt().block_on(async {
        let out =
            c.dynamodb.scan().table_name(table).send().await.expect("Scan of the state table");
        out.items()
            .iter()
            .map(|i| {
                let get =
                    |k: &str| i.get(k).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
                (get("shardId"), get("part"))
            })
            .collect()
    })
}

#[test]
fn counts_stay_exact_across_a_stop_a_kill_and_a_takeover_replaying_from_the_checkpoint() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("state-kill-in", "state-kill-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let n = 6;
    // Every snapshot goes to the companion table (inline at most 0 bytes), and checkpoints are
    // rare: only a stop, a shard end, or a read 10 minutes after the last one writes one.
    let rare = "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n\
                task.limits.state.inline.bytes=0\n\
                task.commit.ms=600000\n";
    let config_a = job(&dir.path().join("a"), "statekill", input, output, rare);
    let table = "statekill-1-state-kill-in";

    // Host A counts three records per word and stops: it checkpoints them with their state.
    put(&c, input, &words(n, 3));
    let log_a = dir.path().join("a.log");
    let a = Host::start_with("word-count", &config_a, &log_a, &[]);
    wait_for_counts(&c, output, n, 3, &log_a);
    a.stop_cleanly(&log_a);
    let stopped = leases(&c, table);
    for (shard, item) in &stopped {
        assert!(
            attr(item, "hostStateVersion").is_some() && attr(item, "hostStateDigest").is_some(),
            "{shard}: the checkpoint names no stored state: {item:?}"
        );
        assert!(attr(item, "hostState").is_none(), "{shard}: inline state despite the limit 0");
    }
    let parts = state_parts(&c, &format!("{table}-state"));
    assert!(!parts.is_empty(), "no snapshot in the state table");

    // Host B restores the counts, counts three more per word, and is killed before any
    // checkpoint: its progress and its state are lost together.
    let log_b = dir.path().join("b.log");
    let b = Host::start_with("word-count", &config_a, &log_b, &[]);
    put(&c, input, &words(n, 3));
    wait_for_counts(&c, output, n, 6, &log_b);
    wait_for_log(&log_b, "Restored the task state of the checkpoint.", 2);
    drop(b); // SIGKILL
    assert_eq!(
        checkpoints(&c, table),
        stopped
            .iter()
            .map(|(k, i)| (k.clone(), string_attr(i, "checkpoint").unwrap_or_default().to_owned()))
            .collect(),
        "B checkpointed although task.commit.ms had not passed"
    );

    // Host C takes the expired leases, replays B's records from A's checkpoint with A's state,
    // so counts them once, and goes on with new records.
    let config_c = job(
        &dir.path().join("c"),
        "statekill",
        input,
        output,
        "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\ntask.limits.state.inline.bytes=0\n",
    );
    let log_c = dir.path().join("c.log");
    let host_c = Host::start_with("word-count", &config_c, &log_c, &[]);
    put(&c, input, &words(n, 3));
    wait_for_counts(&c, output, n, 9, &log_c);
    host_c.stop_cleanly(&log_c);
    assert_exact(&c, output, n, 9);

    // Superseded snapshots were deleted: one version per shard is left, the one its lease names.
    let named: Vec<(String, String)> = leases(&c, table)
        .iter()
        .map(|(k, i)| {
            (k.clone(), string_attr(i, "hostStateVersion").unwrap_or_default().to_owned())
        })
        .collect();
    let mut versions: Vec<(String, String)> = state_parts(&c, &format!("{table}-state"))
        .into_iter()
        .map(|(shard, part)| (shard, part.split('#').next().unwrap_or_default().to_owned()))
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions, named, "the state table holds exactly the versions the leases name");
}

#[test]
fn a_host_paused_past_its_lease_cannot_commit_state() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("state-pause-in", "state-pause-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let n = 6;
    let extra =
        "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\ntask.limits.state.inline.bytes=0\n";
    let config_a = job(&dir.path().join("a"), "statepause", input, output, extra);
    let config_b = job(&dir.path().join("b"), "statepause", input, output, extra);
    let table = "statepause-1-state-pause-in";
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));

    put(&c, input, &words(n, 2));
    let a = Host::start_with("word-count", &config_a, &log_a, &[]);
    wait_for_counts(&c, output, n, 2, &log_a);
    wait_for_log(&log_a, "Checkpointed.", 2);
    let pid_a = a.pid();
    let _ = Command::new("kill").args(["-STOP", &pid_a]).status();

    // While A sleeps, records arrive (A reads them when it wakes) and B takes over.
    put(&c, input, &words(n, 2));
    let b = Host::start_with("word-count", &config_b, &log_b, &[]);
    wait_for_counts(&c, output, n, 4, &log_b);
    wait_for_log(&log_b, "Checkpointed.", 2);
    let before: BTreeMap<String, Option<AttributeValue>> = leases(&c, table)
        .into_iter()
        .map(|(k, i)| (k, i.get("hostStateDigest").cloned()))
        .collect();

    // A wakes up with stale leases: whatever it processed and wrote, its commit is refused.
    let _ = Command::new("kill").args(["-CONT", &pid_a]).status();
    wait_for_log(&log_a, "Lost lease", 2);
    let after: BTreeMap<String, Option<AttributeValue>> = leases(&c, table)
        .into_iter()
        .map(|(k, i)| (k, i.get("hostStateDigest").cloned()))
        .collect();
    assert_eq!(before, after, "a host without the lease changed the committed state");

    put(&c, input, &words(n, 2));
    wait_for_counts(&c, output, n, 6, &log_b);
    b.stop_cleanly(&log_b);
    a.stop_cleanly(&log_a);
    assert_exact(&c, output, n, 6);
}

#[test]
fn children_start_from_their_parents_state_after_a_split_and_a_merge() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("state-reshard-in", "state-reshard-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let n = 8;
    // Snapshots inline in the lease items (the default); finished leases are kept to look at.
    let config = job(
        dir.path(),
        "statereshard",
        input,
        output,
        "systems.kinesis.aws.kcl.CleanupLeasesUponShardCompletion=false\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("word-count", &config, &log, &[]);
    put(&c, input, &words(n, 2));
    wait_for_counts(&c, output, n, 2, &log);

    // After the split, each child starts from the parent's counts: every word goes on from 2.
    let parent = split(&c, input);
    put(&c, input, &words(n, 2));
    wait_for_counts(&c, output, n, 4, &log);
    let children = open_shards(&c, input);
    assert_eq!(children.len(), 2, "{children:?}");

    // After the merge, the child starts from the union of both children's counts: for a word
    // in both (each child inherited all words), the one written last is the live count.
    merge(&c, input, &children);
    put(&c, input, &words(n, 2));
    wait_for_counts(&c, output, n, 6, &log);
    host.stop_cleanly(&log);
    assert_exact(&c, output, n, 6);

    let items = leases(&c, "statereshard-1-state-reshard-in");
    assert_eq!(items.len(), 4, "{:?}", items.keys());
    for (shard, item) in &items {
        assert!(
            attr(item, "hostState").is_some() && attr(item, "hostStateDigest").is_some(),
            "{shard}: no inline state: {item:?}"
        );
    }
    assert!(items.contains_key(&parent));
    wait_for_log(&log, "Starting from the parent shards' state.", 3);
}

#[test]
fn a_refused_state_write_names_the_shard_the_key_and_the_setting() {
    let (_d1, input) = file_with(
        "records.jsonl",
        br#"{"partition_key":"k","text":"short averyveryverylongword"}"#,
    );
    let (_d2, config) = file_with("job.properties", b"task.limits.state.key.bytes=16\n");
    let (out, stdout, stderr) = run(&mut replay("word-count", &input, &config));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("State write refused"), "{stderr}");
    assert!(stderr.contains("task.limits.state.key.bytes"), "{stderr}");
    assert!(stderr.contains("count:averyveryverylongword"), "{stderr}");
    assert!(stderr.contains("shardId-000000000000"), "{stderr}");
    // word-count sets the record aside as poison: nothing of it is counted.
    assert!(!stdout.contains("short="), "{stdout}");
}
