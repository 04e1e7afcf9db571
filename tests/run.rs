//! `kinesis-host run` end to end against kinesis-local and dynalite (started by the tests
//! themselves): exact delivery per shard, checkpoints in a KCL-shaped lease table, emits in the
//! output stream, graceful stop, and resuming after the checkpoint.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::process::Command;
use std::time::{Duration, Instant};

use aws::*;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use common::{free_address, guest, http_get, kinesis_host, sample};

#[test]
fn delivers_every_record_in_order_checkpoints_and_releases_on_stop() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-basic-in", "run-basic-out");
    create_streams(&c, &[(input, 3), (output, 1)]);
    let sent = numbered(6, 5, 0);
    put(&c, input, &sent);
    let config = job_properties(dir.path(), "basic", input, output, "");
    let log = dir.path().join("host.log");
    // Exactly the records sent, each once, in order per partition key (one output shard).
    echo_exactly_once(&c, &config, &log, output, &sent);

    // The lease table has KCL's names and types, checkpoints at the end of each shard's
    // records, and no owner after a graceful stop.
    let items = lease_items(&c, "basic-1-run-basic-in");
    assert_eq!(items.len(), 3, "{items:?}");
    for item in &items {
        let key = item.get("leaseKey").and_then(|v| v.as_s().ok()).expect("leaseKey S");
        assert!(key.starts_with("shardId-"), "{key}");
        assert!(matches!(item.get("leaseCounter"), Some(AttributeValue::N(_))), "{item:?}");
        assert!(
            matches!(item.get("checkpointSubSequenceNumber"), Some(AttributeValue::N(_))),
            "{item:?}"
        );
        assert!(
            matches!(item.get("ownerSwitchesSinceCheckpoint"), Some(AttributeValue::N(_))),
            "{item:?}"
        );
        let cp = item.get("checkpoint").and_then(|v| v.as_s().ok()).expect("checkpoint S");
        assert!(cp.bytes().all(|b| b.is_ascii_digit()) || cp == "TRIM_HORIZON", "{cp}");
        assert!(item.get("leaseOwner").is_none(), "released on stop: {item:?}");
        for name in item.keys() {
            assert!(
                [
                    "leaseKey",
                    "leaseOwner",
                    "leaseCounter",
                    "checkpoint",
                    "checkpointSubSequenceNumber",
                    "ownerSwitchesSinceCheckpoint",
                    "parentShardId",
                    "childShardIds",
                    "startingHashKey",
                    "endingHashKey",
                ]
                .contains(&name.as_str()),
                "unexpected attribute {name}"
            );
        }
    }
    let text = log_text(&log);
    assert!(text.contains("Released lease."), "{text}");

    // A restart resumes after the checkpoints: new records only, nothing again.
    let more = numbered(6, 2, 5);
    put(&c, input, &more);
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, sent.len() + more.len(), &log);
    host.stop_cleanly(&log);
    let mut expected = sent.clone();
    expected.extend(more);
    assert_eq!(by_key(&got), by_key(&expected), "each record exactly once across the restart");
}

#[test]
fn latest_skips_old_records_and_at_timestamp_starts_at_the_time() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-pos-in", "run-pos-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let old = numbered(4, 2, 0);
    put(&c, input, &old);
    // Arrival times have millisecond resolution: leave a gap around the chosen instant.
    std::thread::sleep(Duration::from_millis(50));
    let at = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_millis(50));
    let middle = numbered(4, 2, 2);
    put(&c, input, &middle);

    // LATEST: only what arrives after the host started reading.
    let config = job_properties(
        dir.path(),
        "latest",
        input,
        output,
        "systems.kinesis.streams.run-pos-in.aws.kcl.InitialPositionInStream=LATEST\n",
    );
    let log = dir.path().join("latest.log");
    let host = Host::start(&config, &log);
    wait_for_log(&log, "Reading shard.", 2);
    let new = numbered(4, 2, 4);
    put(&c, input, &new);
    let got = wait_for_records(&c, output, new.len(), &log);
    host.stop_cleanly(&log);
    assert_eq!(by_key(&got), by_key(&new));

    // AT_TIMESTAMP, in a job with its own lease table: the records after the instant.
    let output2 = "run-pos-out2";
    create_stream(&c, output2, 1);
    let millis = at.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis();
    let config = job_properties(
        dir.path(),
        "attime",
        input,
        output2,
        &format!(
            "systems.kinesis.aws.kcl.InitialPositionInStream=AT_TIMESTAMP\n\
             systems.kinesis.aws.kcl.TimestampAtInitialPositionInStream={millis}\n"
        ),
    );
    let log = dir.path().join("attime.log");
    let host = Host::start(&config, &log);
    let mut expected = middle.clone();
    expected.extend(new);
    let got = wait_for_records(&c, output2, expected.len(), &log);
    host.stop_cleanly(&log);
    assert_eq!(by_key(&got), by_key(&expected));
}

#[test]
fn a_split_and_a_merge_during_consumption_lose_nothing_and_keep_order() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-reshard-in", "run-reshard-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let config = job_properties(
        dir.path(),
        "reshard",
        input,
        output,
        "systems.kinesis.aws.kcl.CleanupLeasesUponShardCompletion=false\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let mut sent = Vec::new();
    put_and_wait(&c, input, numbered(8, 2, 0), &mut sent, output, &log);

    let parent = split(&c, input);
    put_and_wait(&c, input, numbered(8, 2, 2), &mut sent, output, &log);

    let children = open_shards(&c, input);
    assert_eq!(children.len(), 2, "{children:?}");
    merge(&c, input, &children);
    let got = put_and_wait(&c, input, numbered(8, 2, 4), &mut sent, output, &log);
    host.stop_cleanly(&log);
    assert_eq!(got.len(), sent.len(), "each record exactly once");
    assert_eq!(by_key(&got), by_key(&sent), "per key, parents' records come before children's");

    // Lineage in the lease table: the parent and both children ended with SHARD_END and name
    // their children; the merged shard names both parents.
    let items = leases(&c, "reshard-1-run-reshard-in");
    let get = |key: &str| items.get(key).unwrap_or_else(|| panic!("no lease {key} in {items:?}"));
    let parent_item = get(&parent);
    assert_eq!(string_attr(parent_item, "checkpoint"), Some("SHARD_END"));
    let mut expected_children = children.clone();
    expected_children.sort();
    assert_eq!(string_set_attr(parent_item, "childShardIds"), Some(expected_children.clone()));
    for child in &children {
        let item = get(child);
        assert_eq!(string_attr(item, "checkpoint"), Some("SHARD_END"));
        assert_eq!(string_set_attr(item, "parentShardId"), Some(vec![parent.clone()]));
    }
    let merged = open_shards(&c, input);
    assert_eq!(merged.len(), 1);
    assert_eq!(string_set_attr(get(&merged[0]), "parentShardId"), Some(expected_children));
}

#[test]
fn kpl_aggregates_come_out_as_user_records_resuming_inside_an_aggregate() {
    use kinesis_host_coordinator::kpl::partition_key_hash;
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-kpl-in", "run-kpl-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let shards = rt().block_on(async {
        c.kinesis
            .list_shards()
            .stream_name(input)
            .send()
            .await
            .expect("ListShards")
            .shards()
            .to_vec()
    });
    let range = |i: usize| {
        let r = shards[i].hash_key_range().expect("hash range");
        (
            r.starting_hash_key().parse::<u128>().expect("start"),
            r.ending_hash_key().parse::<u128>().expect("end"),
        )
    };
    let (s0, s1) = (range(0), range(1));
    // A key that hashes into shard 0, so its aggregate lands there and passes the filter.
    let key0 = (0..).map(|i| format!("k{i}")).find(|k| {
        let h = partition_key_hash(k);
        s0.0 <= h && h <= s0.1
    });
    let key0 = key0.expect("some key hashes into shard 0");
    let users: Vec<(String, String)> =
        (0..5).map(|i| (key0.clone(), format!("user record {i}"))).collect();
    let blob = kpl_aggregate(&users);
    // The same user records, aggregated under shard 1's hash keys: what a producer re-sends
    // after resharding. Shard 1's reader must drop that aggregate whole (its user records'
    // hash keys are outside shard 1), so they come out once.
    let stray_key = s1.0.to_string();
    let put_one = |data: &[u8], ehk: Option<String>| {
        rt().block_on(async {
            c.kinesis
                .put_record()
                .stream_name(input)
                .partition_key(&key0)
                .set_explicit_hash_key(ehk)
                .data(Blob::new(data))
                .send()
                .await
                .expect("PutRecord")
                .sequence_number()
                .to_owned()
        })
    };
    let seq = put_one(&blob, None);
    put_one(&blob, Some(stray_key));

    // A table left by a Java KCL application: shard 0 checkpointed inside the aggregate, after
    // user record 2; the host must go on with records 3 and 4.
    let table = "kplapp";
    let config = job_properties(
        dir.path(),
        "kpl",
        input,
        output,
        &format!("systems.kinesis.aws.kcl.TableName={table}\n"),
    );
    rt().block_on(async {
        create_lease_table(&c, table).await;
        let (first, rest) = shards.split_first().expect("two shards");
        put_lease_of_a_gone_worker(&c, table, first.shard_id(), &seq, 2).await;
        for shard in rest {
            put_lease_of_a_gone_worker(&c, table, shard.shard_id(), "TRIM_HORIZON", 0).await;
        }
    });
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, 2, &log);
    // Once shard 1 has read (and dropped) the stray aggregate, nothing more may arrive.
    wait_for_log(&log, "Dropped a KPL aggregate", 1);
    let got_after = read_all(&c, output);
    host.stop_cleanly(&log);
    assert_eq!(got, users[3..].to_vec());
    assert_eq!(
        got_after,
        users[3..].to_vec(),
        "the stray aggregate was dropped, not delivered again"
    );
}

#[test]
fn a_killed_host_resumes_after_its_checkpoint_losing_nothing() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-kill-in", "run-kill-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let first = numbered(4, 3, 0);
    put(&c, input, &first);
    // A short failover time: the dead host's leases expire after 3 s.
    let config = job_properties(
        dir.path(),
        "kill",
        input,
        output,
        "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    wait_for_records(&c, output, first.len(), &log);
    drop(host); // SIGKILL: no release, no final checkpoint
    let second = numbered(4, 3, 3);
    put(&c, input, &second);
    let log2 = dir.path().join("host2.log");
    let host = Host::start(&config, &log2);
    let mut sent = first.clone();
    sent.extend(second);
    // The dead host's leases expire after FailoverTimeMillis (3 s here), then are taken.
    let got = wait_for_records(&c, output, sent.len(), &log2);
    host.stop_cleanly(&log2);
    // At least once: every record; duplicates only from the window since the last checkpoint
    // (checkpoints follow every batch here, so at most the batch in flight).
    assert_first_deliveries_in_order(&got, &sent);
}

#[test]
fn bad_run_config_values_get_one_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = "job.name=bad\ntask.inputs=kinesis.s\n\
                systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n";
    let cases = [
        (
            format!("{base}systems.kinesis.aws.kcl.InitialPositionInStream=SOMETIME\n"),
            "InitialPositionInStream",
        ),
        (format!("{base}systems.kinesis.aws.kcl.MaxRecords=20000\n"), "MaxRecords=20000"),
        (base.replace("KinesisSystemFactory", "KafkaSystemFactory"), "samza.factory"),
        (format!("{base}job.systemstreampartition.grouper.factory=x.Y\n"), "grouper.factory"),
        (format!("{base}systems.kinesis.streams.s.aws.accessKey=AKIDEXAMPLE\n"), "secretKey"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("job.properties");
        std::fs::write(&path, &text).expect("write");
        let (out, _, stderr) = common::run(
            kinesis_host().arg("run").arg(guest("echo-task")).arg("--config").arg(&path),
        );
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(expected), "{} should mention {expected}", errors[0]);
    }
}

#[test]
fn a_second_signal_exits_at_once_while_a_batch_is_in_flight() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-signal-in", "run-signal-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    // The batch spins for up to a minute: a graceful stop would wait for it.
    let config =
        job_properties(dir.path(), "signal", input, output, "task.limits.batch.timeout.ms=60000\n");
    let log = dir.path().join("host.log");
    let mut host = Host::start_with("spin-task", &config, &log, &[]);
    put(&c, input, &[("k".to_owned(), "spin".to_owned())]);
    wait_for_log(&log, "spinning", 1);
    let pid = host.pid();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    wait_for_log(&log, "Stopping: finishing the batches in flight", 1);
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = host.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the second signal did not end the host; log:\n{}",
            log_text(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "log:\n{}", log_text(&log));
    assert!(log_text(&log).contains("Second signal: exiting now."));
}

#[test]
fn one_job_consumes_several_input_streams() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b, output) = ("run-multi-a", "run-multi-b", "run-multi-out");
    create_streams(&c, &[(a, 1), (b, 2), (output, 1)]);
    let from_a: Vec<(String, String)> =
        numbered(3, 3, 0).into_iter().map(|(k, d)| (format!("a-{k}"), d)).collect();
    let from_b: Vec<(String, String)> =
        numbered(3, 3, 0).into_iter().map(|(k, d)| (format!("b-{k}"), d)).collect();
    put(&c, a, &from_a);
    put(&c, b, &from_b);
    let config = job_properties(
        dir.path(),
        "multi",
        a,
        output,
        &format!(
            "task.inputs=kinesis.{a},kinesis.{b}\n\
             systems.kinesis.streams.{b}.aws.accessKey=test\n\
             sensitive.systems.kinesis.streams.{b}.aws.secretKey=test\n"
        ),
    );
    let mut sent = from_a;
    sent.extend(from_b);
    echo_exactly_once(&c, &config, &dir.path().join("host.log"), output, &sent);
    // One lease table per input stream, as Samza names them.
    assert_eq!(lease_items(&c, "multi-1-run-multi-a").len(), 1);
    assert_eq!(lease_items(&c, "multi-1-run-multi-b").len(), 2);
}

#[test]
fn an_input_that_fails_stops_the_whole_job_and_releases_the_others() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, missing, output) = ("run-half-a", "run-half-missing", "run-half-out");
    create_streams(&c, &[(a, 2), (output, 1)]);
    put(&c, a, &numbered(2, 3, 0));
    let config = job_properties(
        dir.path(),
        "half",
        a,
        output,
        &format!(
            "task.inputs=kinesis.{a},kinesis.{missing}\n\
             systems.kinesis.streams.{missing}.aws.accessKey=test\n\
             sensitive.systems.kinesis.streams.{missing}.aws.secretKey=test\n"
        ),
    );
    let log = dir.path().join("host.log");
    let mut host = Host::start(&config, &log);
    // Without the stream, its worker fails at once; the job must not run on with half its
    // inputs (under `serve` it would never be retried): it stops and exits with the error.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = host.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", log_text(&log));
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = log_text(&log);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("error: ") && l.contains(missing)), "{text}");
    let items = lease_items(&c, "half-1-run-half-a");
    assert!(
        items.iter().all(|i| !i.contains_key("leaseOwner")),
        "the other input's leases released: {items:?}"
    );
}

#[path = "common/faults.rs"]
mod faults;
#[path = "common/http_proxy.rs"]
mod http_proxy;

#[test]
fn throttling_and_transient_faults_are_survived() {
    use faults::{Fault, FaultProxy, Rule};
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-faults-in", "run-faults-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let sent = numbered(4, 6, 0);
    put(&c, input, &sent);
    // Rules that fire on the first matching calls are certain to fire whatever the timing
    // (a run may need only a handful of calls); never more in a row than the SDK retries.
    let rule = |target_suffix, every, fault, limit| Rule {
        body_contains: None,
        target_suffix,
        every,
        fault,
        limit: Some(limit),
    };
    let kinesis = FaultProxy::start(
        &e.kinesis_endpoint,
        vec![
            rule("GetRecords", 1, Fault::Throttle, 2),
            rule("PutRecords", 1, Fault::ServerError, 2),
            rule("GetShardIterator", 1, Fault::Reset, 1),
            rule("ListShards", 1, Fault::Throttle, 1),
        ],
    );
    let dynamodb = FaultProxy::start(
        &e.dynamodb_endpoint,
        vec![rule("UpdateItem", 1, Fault::Throttle, 2), rule("Scan", 1, Fault::ServerError, 1)],
    );
    let config = job_properties(
        dir.path(),
        "faults",
        input,
        output,
        &format!(
            "systems.kinesis.aws.kinesis.endpoint={}\nsystems.kinesis.aws.dynamodb.endpoint={}\n",
            kinesis.endpoint(),
            dynamodb.endpoint()
        ),
    );
    echo_exactly_once(&c, &config, &dir.path().join("host.log"), output, &sent);
    for (proxy, target) in [
        (&kinesis, "GetRecords"),
        (&kinesis, "PutRecords"),
        (&kinesis, "GetShardIterator"),
        (&dynamodb, "UpdateItem"),
    ] {
        assert!(proxy.injected(target) > 0, "no fault was injected into {target}");
    }
}

#[test]
fn leases_are_created_despite_throttling_beyond_the_sdk_retries() {
    use faults::{Fault, FaultProxy, Rule};
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-throttled-in", "run-throttled-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let sent = numbered(2, 3, 0);
    put(&c, input, &sent);
    // Five throttled PutItems in a row: more than the SDK's three attempts, so creating the
    // new table's leases fails once and must be tried again rather than fail the job.
    let dynamodb = FaultProxy::start(
        &e.dynamodb_endpoint,
        vec![Rule {
            target_suffix: "PutItem",
            every: 1,
            fault: Fault::Throttle,
            limit: Some(5),
            body_contains: None,
        }],
    );
    let config = job_properties(
        dir.path(),
        "throttled",
        input,
        output,
        &format!("systems.kinesis.aws.dynamodb.endpoint={}\n", dynamodb.endpoint()),
    );
    let log = dir.path().join("host.log");
    echo_exactly_once(&c, &config, &log, output, &sent);
    assert_eq!(dynamodb.injected("PutItem"), 5);
    assert!(log_text(&log).contains("Creating the stream's leases failed; retrying."));
}

#[test]
fn standard_aws_environment_variables_pick_endpoints_and_region() {
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-env-in", "run-env-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let sent = numbered(2, 2, 0);
    put(&c, input, &sent);
    // No region, keys or endpoints in the file: they come from the standard variables.
    let config = dir.path().join("job.properties");
    std::fs::write(
        &config,
        format!(
            "job.name=env\n\
             task.inputs=kinesis.{input}\n\
             task.output.out=kinesis.{output}\n\
             task.commit.ms=1\n\
             systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n\
             systems.kinesis.aws.kcl.InitialPositionInStream=TRIM_HORIZON\n\
             systems.kinesis.aws.kcl.IdleTimeBetweenReadsInMillis=100\n"
        ),
    )
    .expect("write job.properties");
    let log = dir.path().join("host.log");
    let host = Host::start_with(
        "echo-task",
        &config,
        &log,
        &[
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_ENDPOINT_URL_KINESIS", &e.kinesis_endpoint),
            ("AWS_ENDPOINT_URL_DYNAMODB", &e.dynamodb_endpoint),
        ],
    );
    let got = wait_for_records(&c, output, sent.len(), &log);
    host.stop_cleanly(&log);
    assert_eq!(by_key(&got), by_key(&sent));
    assert_eq!(lease_items(&c, "env-1-run-env-in").len(), 1);
}

#[test]
fn a_host_paused_past_its_lease_cannot_checkpoint_when_it_resumes() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-pause-in", "run-pause-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let first = numbered(6, 2, 0);
    put(&c, input, &first);
    // Host A checkpoints rarely, so it holds processed but unrecorded records when paused.
    let dir_a = dir.path().join("a");
    let dir_b = dir.path().join("b");
    std::fs::create_dir_all(&dir_a).expect("dir");
    std::fs::create_dir_all(&dir_b).expect("dir");
    let failover = "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n";
    let slow = job_properties(
        &dir_a,
        "pause",
        input,
        output,
        &format!("{failover}task.commit.ms=600000\n"),
    );
    let fast = job_properties(&dir_b, "pause", input, output, failover);
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let a = Host::start(&slow, &log_a);
    wait_for_records(&c, output, first.len(), &log_a);
    let pid_a = a.pid();
    let _ = Command::new("kill").args(["-STOP", &pid_a]).status();

    // B takes the expired leases, re-processes from the last checkpoint, and goes on.
    let b = Host::start(&fast, &log_b);
    let second = numbered(6, 2, 2);
    put(&c, input, &second);
    let mut sent = first.clone();
    sent.extend(second.clone());
    wait_for_every_record(&c, output, &sent, &log_b);
    wait_for_log(&log_b, "Checkpointed.", 2);
    let table = "pause-1-run-pause-in";
    let before = checkpoints(&c, table);

    // A wakes up holding stale leases and unrecorded progress: its checkpoint must be refused.
    let _ = Command::new("kill").args(["-CONT", &pid_a]).status();
    wait_for_log(&log_a, "Lost lease", 2);
    wait_for_log(&log_a, "cannot checkpoint", 1);
    let after = checkpoints(&c, table);
    for (shard, cp) in &before {
        let now = after.get(shard).cloned().unwrap_or_default();
        assert!(
            now == "SHARD_END" || decimal_at_least(&now, cp),
            "{shard}: checkpoint went back from {cp} to {now}: a host without the lease wrote it"
        );
    }
    b.stop_cleanly(&log_b);
    a.stop_cleanly(&log_a);
    // Every record was delivered, first deliveries in order per key.
    assert_first_deliveries_in_order(&read_all(&c, output), &sent);
}

#[path = "common/forward_proxy.rs"]
mod forward_proxy;

#[test]
fn client_config_proxy_carries_every_kinesis_and_dynamodb_request() {
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-proxy-in", "run-proxy-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let sent = numbered(3, 4, 0);
    put(&c, input, &sent);
    let proxy = forward_proxy::ForwardProxy::start();
    // The emulators under names that only the proxy resolves: without the proxy, nothing works.
    let port = |endpoint: &str| endpoint.rsplit(':').next().unwrap_or_default().to_owned();
    let kinesis = format!("kinesis.invalid:{}", port(&e.kinesis_endpoint));
    let dynamodb = format!("dynamodb.invalid:{}", port(&e.dynamodb_endpoint));
    let config = job_properties(
        dir.path(),
        "proxy",
        input,
        output,
        &format!(
            "systems.kinesis.aws.kinesis.endpoint=http://{kinesis}\n\
             systems.kinesis.aws.dynamodb.endpoint=http://{dynamodb}\n\
             systems.kinesis.aws.clientConfig.ProxyHost=127.0.0.1\n\
             systems.kinesis.aws.clientConfig.ProxyPort={}\n\
             systems.kinesis.aws.clientConfig.MaxConnections=2\n",
            proxy.port()
        ),
    );
    echo_exactly_once(&c, &config, &dir.path().join("host.log"), output, &sent);
    for (upstream, target) in [
        (&kinesis, "ListShards"),
        (&kinesis, "GetRecords"),
        (&kinesis, "PutRecords"),
        (&dynamodb, "UpdateItem"),
    ] {
        assert!(proxy.requests(upstream, target) > 0, "no {target} request reached {upstream}");
    }
    assert_eq!(proxy.refused(), 0, "the proxy refused requests");
    assert_eq!(lease_items(&c, "proxy-1-run-proxy-in").len(), 2);
}

#[test]
fn metrics_address_serves_prometheus_metrics_health_and_readiness() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-metrics-in", "run-metrics-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let sent = numbered(4, 5, 0);
    put(&c, input, &sent);
    let address = free_address();
    let config = job_properties(
        dir.path(),
        "metrics",
        input,
        output,
        &format!("metrics.address={address}\n"),
    );
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, sent.len(), &log);
    assert_eq!(by_key(&got), by_key(&sent));

    // The counter moves once the outputs are acknowledged, the checkpoint follows: wait (bounded)
    // until both are there.
    let records = [("job", "metrics"), ("stream", input)];
    let deadline = Instant::now() + Duration::from_secs(30);
    let (head, exposition) = loop {
        let (status, head, body) = http_get(&address, "/metrics");
        assert_eq!(status, 200, "{head}\n{body}");
        if sample(&body, "kinesis_host_records_processed_total", &records)
            .is_some_and(|n| n >= sent.len() as f64)
            && sample(&body, "kinesis_host_checkpoints_total", &records).is_some()
            || Instant::now() > deadline
        {
            break (head, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        sample(&exposition, "kinesis_host_records_processed_total", &records),
        Some(sent.len() as f64),
        "{exposition}\nlog:\n{}",
        log_text(&log)
    );
    let bytes: usize = sent.iter().map(|(_, data)| data.len()).sum();
    assert_eq!(
        sample(&exposition, "kinesis_host_bytes_processed_total", &records),
        Some(bytes as f64),
        "{exposition}"
    );
    assert_eq!(
        sample(&exposition, "kinesis_host_leases_held", &records),
        Some(2.0),
        "{exposition}"
    );
    assert!(
        sample(&exposition, "kinesis_host_leases_taken_total", &records).is_some_and(|n| n >= 2.0),
        "{exposition}"
    );
    assert!(
        sample(&exposition, "kinesis_host_batch_latency_seconds_count", &records)
            .is_some_and(|n| n >= 1.0),
        "{exposition}"
    );
    assert!(
        exposition.contains("kinesis_host_batch_latency_seconds_bucket{"),
        "a histogram, not a summary:\n{exposition}"
    );
    assert!(
        sample(&exposition, "kinesis_host_checkpoints_total", &records).is_some_and(|n| n >= 1.0),
        "{exposition}"
    );
    assert!(
        sample(&exposition, "kinesis_host_millis_behind_latest", &records).is_some(),
        "{exposition}"
    );
    assert!(!exposition.contains("kinesis_host_task_errors_total"), "{exposition}");
    // The task's own metrics, per shard, its metric name as a label: echo-task counts what it
    // echoed (and nothing was delivered twice here) and records each batch's size.
    let echoed: f64 = common::samples(
        &exposition,
        "kinesis_task_counter_total",
        &[("job", "metrics"), ("stream", input), ("name", "echoed")],
    )
    .sum();
    assert_eq!(echoed, sent.len() as f64, "{exposition}");
    let batches: f64 = common::samples(
        &exposition,
        "kinesis_task_histogram_count",
        &[("job", "metrics"), ("name", "batch_records")],
    )
    .sum();
    assert!(batches >= 2.0, "a batch per shard at least:\n{exposition}");
    assert!(exposition.contains("# TYPE kinesis_task_histogram histogram\n"), "{exposition}");

    let (status, _, body) = http_get(&address, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _, body) = http_get(&address, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, _) = http_get(&address, "/elsewhere");
    assert_eq!(status, 404);

    host.stop_cleanly(&log);
    assert!(std::net::TcpStream::connect(&address).is_err(), "the endpoint closes with the host");
}

#[test]
fn a_lease_table_deleted_mid_run_stops_the_job_loudly_and_run_exits_1() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-gone-in", "run-gone-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let sent = numbered(4, 2, 0);
    put(&c, input, &sent);
    let failover = "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n";
    let config = job_properties(dir.path(), "gone", input, output, failover);
    let log = dir.path().join("host.log");
    let mut host = Host::start(&config, &log);
    wait_for_records(&c, output, sent.len(), &log);
    let table = "gone-1-run-gone-in";
    rt().block_on(c.dynamodb.delete_table().table_name(table).send()).expect("DeleteTable");
    let status = host.wait_for_exit(Duration::from_secs(90), &log);
    let text = log_text(&log);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("The lease table was deleted while the job ran: stopping every shard"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "error: stream {input}: lease table {table} does not exist (DynamoDB Scan: ResourceNotFoundException): it was deleted while the job ran"
        )),
        "{text}"
    );
    // Nothing recreated it behind the operator's back.
    let tables = rt().block_on(c.dynamodb.list_tables().send()).expect("ListTables");
    assert!(!tables.table_names().iter().any(|t| t == table), "{tables:?}");
}

/// Puts one record into each shard of `stream` (by its starting hash key), data `shard-<i>`;
/// returns the shard ids in order.
fn one_record_per_shard(
    c: &kinesis_host_coordinator::aws::AwsClients,
    stream: &str,
) -> Vec<String> {
    let rt = rt();
    let shards = rt
        .block_on(c.kinesis.list_shards().stream_name(stream).send())
        .expect("ListShards")
        .shards()
        .to_vec();
    for (i, shard) in shards.iter().enumerate() {
        let start =
            shard.hash_key_range().map(|r| r.starting_hash_key().to_owned()).unwrap_or_default();
        rt.block_on(
            c.kinesis
                .put_record()
                .stream_name(stream)
                .partition_key(format!("key-{i}"))
                .explicit_hash_key(start)
                .data(Blob::new(format!("shard-{i}")))
                .send(),
        )
        .expect("PutRecord");
    }
    shards.iter().map(|s| s.shard_id().to_owned()).collect()
}

#[test]
fn damaged_lease_items_fail_their_own_shard_alone_and_loudly() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-damaged-in", "run-damaged-out");
    create_streams(&c, &[(input, 5), (output, 1)]);
    let shards = one_record_per_shard(&c, input);
    let table = "damaged-1-run-damaged-in";
    let rt = rt();
    rt.block_on(create_lease_table(&c, table));
    let n = |v: &str| AttributeValue::N(v.into());
    let s = |v: &str| AttributeValue::S(v.into());
    // Shards 0 to 3 each have one attribute KCL would not read; shard 4's lease is the host's.
    let damage: [(&str, AttributeValue); 4] = [
        ("checkpoint", n("49000")),
        ("checkpoint", s("banana")),
        ("leaseCounter", s("7")),
        ("leaseOwner", n("12")),
    ];
    for (shard, (name, value)) in shards.iter().zip(damage) {
        let mut put = c
            .dynamodb
            .put_item()
            .table_name(table)
            .item("leaseKey", s(shard))
            .item("leaseCounter", n("1"))
            .item("checkpoint", s("TRIM_HORIZON"))
            .item("checkpointSubSequenceNumber", n("0"))
            .item("ownerSwitchesSinceCheckpoint", n("0"));
        put = put.item(name, value);
        rt.block_on(put.send()).expect("PutItem");
    }
    let failover = "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n";
    let config = job_properties(dir.path(), "damaged", input, output, failover);
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    wait_for_records(&c, output, 1, &log);
    for (shard, problem) in shards.iter().zip([
        "checkpoint is a number (49000), not a string",
        "checkpoint \"banana\" is not a sequence number or sentinel",
        "leaseCounter is a string (\"7\"), not a number",
        "leaseOwner is a number (12), not a string",
    ]) {
        wait_for_log(&log, &format!("lease table {table}: item {shard} is damaged: {problem}"), 1);
    }
    // Only the healthy shard was processed: nothing was read from a checkpoint guessed (the end
    // of the test checks it again, after many more scans).
    assert_eq!(
        read_all(&c, output).into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
        ["shard-4"],
        "{}",
        log_text(&log)
    );
    // Each item is reported once, not at every scan.
    assert_eq!(log_text(&log).matches("Damaged lease item").count(), 4, "{}", log_text(&log));

    // `status` shows every shard, the damaged ones as such, and exits 1.
    let (out, stdout, stderr) =
        common::run(kinesis_host().arg("status").arg("--config").arg(&config));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("{}: damaged lease item: leaseOwner is a number (12)", shards[3])),
        "{stdout}"
    );
    assert_eq!(stdout.matches("DAMAGED").count(), 4, "{stdout}");
    assert_eq!(
        stderr.matches("error: lease table damaged-1-run-damaged-in: item").count(),
        4,
        "{stderr}"
    );

    // An item fixed is taken and processed from its checkpoint.
    let update = |key: &str, expression: &str, value: AttributeValue| {
        rt.block_on(
            c.dynamodb
                .update_item()
                .table_name(table)
                .key("leaseKey", s(key))
                .update_expression(expression)
                .expression_attribute_values(":v", value)
                .send(),
        )
        .expect("UpdateItem");
    };
    update(&shards[0], "SET checkpoint = :v", s("TRIM_HORIZON"));
    wait_for_log(&log, "The lease item is readable again.", 1);
    wait_for_records(&c, output, 2, &log);
    // A held lease damaged under the host: its shard stops at the next renewal, named; a
    // counter that is no longer a number is not mistaken for another host's write.
    update(&shards[4], "SET leaseOwner = :v", n("5"));
    wait_for_log(
        &log,
        &format!("item {} is damaged: leaseOwner is a number (5), not a string", shards[4]),
        2,
    );
    update(&shards[0], "SET leaseCounter = :v", s("9"));
    wait_for_log(
        &log,
        &format!("item {} is damaged: leaseCounter is a string (\"9\")", shards[0]),
        2,
    );
    let text = log_text(&log);
    assert!(text.contains("Lease item damaged: stopping its shard."), "{text}");
    assert!(!text.contains("another worker took it"), "{text}");
    host.stop_cleanly(&log);
    let got: Vec<String> = read_all(&c, output).into_iter().map(|(_, d)| d).collect();
    assert_eq!(got, ["shard-4", "shard-0"]);
}

#[test]
fn dynamodb_unreachable_past_the_failover_time_is_said_in_logs_and_metrics_and_loses_nothing() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-ddbdown-in", "run-ddbdown-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let first = numbered(4, 2, 0);
    put(&c, input, &first);
    let e = emulators::emulators();
    let dynamodb = faults::FaultProxy::start(&e.dynamodb_endpoint, Vec::new());
    let address = free_address();
    let extra = format!(
        "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\nsystems.kinesis.aws.dynamodb.endpoint={}\nmetrics.address={address}\n",
        dynamodb.endpoint()
    );
    let config = job_properties(dir.path(), "ddbdown", input, output, &extra);
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    wait_for_records(&c, output, first.len(), &log);
    // DynamoDB stops answering for more than twice the failover time.
    dynamodb.pause(true);
    wait_for_log(&log, "Lease renewals failed; retrying at the next tick.", 1);
    wait_for_log(&log, "Lost lease: not renewed within FailoverTimeMillis", 2);
    wait_for_log(&log, "Lease scan failed; retrying at the next tick.", 1);
    let (_, _, metrics) = http_get(&address, "/metrics");
    let labels = [("job", "ddbdown"), ("stream", input)];
    assert!(
        sample(&metrics, "kinesis_host_lease_renewal_failures_total", &labels)
            .is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
    assert!(sample(&metrics, "kinesis_host_leases_lost_total", &labels).is_some_and(|n| n >= 2.0));
    assert!(
        sample(&metrics, "kinesis_host_lease_scan_failures_total", &labels)
            .is_some_and(|n| n >= 1.0)
    );
    dynamodb.pause(false);
    // Back: the leases are taken again and every record is delivered (at least once, in order).
    let second = numbered(4, 2, 2);
    put(&c, input, &second);
    let mut sent = first;
    sent.extend(second);
    wait_for_every_record(&c, output, &sent, &log);
    host.stop_cleanly(&log);
    assert_first_deliveries_in_order(&read_all(&c, output), &sent);
}
