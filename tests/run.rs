//! `kinesis-host run` end to end against kinesis-local and dynalite (started by the tests
//! themselves): exact delivery per shard, checkpoints in a KCL-shaped lease table, emits in the
//! output stream, graceful stop, and resuming after the checkpoint.

mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::ShardIteratorType;
use common::{guest, kinesis_host};
use kinesis_host_coordinator::aws::{AwsClients, AwsSettings, StaticKeys};

fn clients() -> AwsClients {
    let e = emulators::emulators();
    let settings = AwsSettings {
        region: Some("us-east-1".into()),
        keys: Some(StaticKeys { access_key_id: "test".into(), secret_access_key: "test".into() }),
        kinesis_endpoint: Some(e.kinesis_endpoint.clone()),
        dynamodb_endpoint: Some(e.dynamodb_endpoint.clone()),
        ..AwsSettings::default()
    };
    rt().block_on(AwsClients::new(&settings))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Creates a stream of `shards` shards and waits until it is active.
fn create_stream(c: &AwsClients, name: &str, shards: i32) {
    rt().block_on(async {
        c.kinesis
            .create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .expect("CreateStream");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = c
                .kinesis
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .expect("Describe");
            let status =
                d.stream_description_summary().map(|s| s.stream_status().as_str().to_owned());
            if status.as_deref() == Some("ACTIVE") {
                break;
            }
            assert!(Instant::now() < deadline, "stream {name} never became ACTIVE");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Puts `(partition key, data)` records one by one (so per-key order is the put order).
fn put(c: &AwsClients, stream: &str, records: &[(String, String)]) {
    rt().block_on(async {
        for (key, data) in records {
            c.kinesis
                .put_record()
                .stream_name(stream)
                .partition_key(key)
                .data(Blob::new(data.as_bytes()))
                .send()
                .await
                .expect("PutRecord");
        }
    });
}

/// Every record of every shard of `stream`, as (partition key, data), shard by shard.
fn read_all(c: &AwsClients, stream: &str) -> Vec<(String, String)> {
    rt().block_on(async {
        let mut out = Vec::new();
        let shards = c.kinesis.list_shards().stream_name(stream).send().await.expect("ListShards");
        for shard in shards.shards() {
            let mut it = c
                .kinesis
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(shard.shard_id())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("GetShardIterator")
                .shard_iterator()
                .map(str::to_owned);
            while let Some(iterator) = it {
                let r = c
                    .kinesis
                    .get_records()
                    .shard_iterator(iterator)
                    .send()
                    .await
                    .expect("GetRecords");
                for rec in r.records() {
                    out.push((
                        rec.partition_key().unwrap_or_default().to_owned(),
                        String::from_utf8_lossy(rec.data().as_ref()).into_owned(),
                    ));
                }
                if r.records().is_empty() {
                    break;
                }
                it = r.next_shard_iterator().map(str::to_owned);
            }
        }
        out
    })
}

fn lease_items(
    c: &AwsClients,
    table: &str,
) -> Vec<std::collections::HashMap<String, AttributeValue>> {
    rt().block_on(async {
        let out =
            c.dynamodb.scan().table_name(table).consistent_read(true).send().await.expect("Scan");
        let mut items = out.items().to_vec();
        items.sort_by_key(|i| i.get("leaseKey").and_then(|v| v.as_s().ok()).cloned());
        items
    })
}

fn job_properties(
    dir: &std::path::Path,
    job: &str,
    input: &str,
    output: &str,
    extra: &str,
) -> std::path::PathBuf {
    let e = emulators::emulators();
    let text = format!(
        "job.name={job}\n\
         job.id=1\n\
         task.inputs=kinesis.{input}\n\
         task.output.out=kinesis.{output}\n\
         task.commit.ms=1\n\
         systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n\
         systems.kinesis.aws.region=us-east-1\n\
         systems.kinesis.streams.{input}.aws.accessKey=test\n\
         sensitive.systems.kinesis.streams.{input}.aws.secretKey=test\n\
         systems.kinesis.streams.{output}.aws.accessKey=test\n\
         sensitive.systems.kinesis.streams.{output}.aws.secretKey=test\n\
         systems.kinesis.aws.kinesis.endpoint={}\n\
         systems.kinesis.aws.dynamodb.endpoint={}\n\
         systems.kinesis.aws.kcl.InitialPositionInStream=TRIM_HORIZON\n\
         systems.kinesis.aws.kcl.IdleTimeBetweenReadsInMillis=100\n\
         {extra}",
        e.kinesis_endpoint, e.dynamodb_endpoint,
    );
    let path = dir.join("job.properties");
    std::fs::write(&path, text).expect("write job.properties");
    path
}

/// A running `kinesis-host run`, stopped (SIGKILL) if the test fails.
struct Host(Child);

impl Host {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(kinesis_host().get_program())
            .envs(kinesis_host().get_envs().filter_map(|(k, v)| Some((k, v?))))
            .args(["run", "--log", "info,kinesis_host_coordinator=debug"])
            .arg(guest("echo-task"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kinesis-host starts");
        Host(child)
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "kinesis-host did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `stream` holds `n` records.
fn wait_for_records(
    c: &AwsClients,
    stream: &str,
    n: usize,
    log: &std::path::Path,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = read_all(c, stream);
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records reached {stream}; host log:\n{}",
            got.len(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn numbered(keys: usize, per_key: usize, from: usize) -> Vec<(String, String)> {
    (from..from + per_key)
        .flat_map(|i| {
            (0..keys).map(move |k| (format!("key-{k}"), format!("key-{k} record {i:03}")))
        })
        .collect()
}

/// Per partition key, the data in the order seen.
fn by_key(records: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, d) in records {
        map.entry(k.clone()).or_default().push(d.clone());
    }
    map
}

#[test]
fn delivers_every_record_in_order_checkpoints_and_releases_on_stop() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-basic-in", "run-basic-out");
    create_stream(&c, input, 3);
    create_stream(&c, output, 1);
    let sent = numbered(6, 5, 0);
    put(&c, input, &sent);
    let config = job_properties(dir.path(), "basic", input, output, "");
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, sent.len(), &log);
    let status = host.stop();
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Exactly the records sent, each once, in order per partition key (one output shard).
    assert_eq!(by_key(&got), by_key(&sent));
    assert_eq!(got.len(), sent.len());

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
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("Released lease."), "{log_text}");

    // A restart resumes after the checkpoints: new records only, nothing again.
    let more = numbered(6, 2, 5);
    put(&c, input, &more);
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, sent.len() + more.len(), &log);
    assert!(host.stop().success());
    let mut expected = sent.clone();
    expected.extend(more);
    assert_eq!(by_key(&got), by_key(&expected), "each record exactly once across the restart");
}

/// Waits (bounded) until the host log contains `pattern` at least `n` times.
fn wait_for_log(log: &std::path::Path, pattern: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(pattern).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "`{pattern}` not seen {n} times; host log:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn latest_skips_old_records_and_at_timestamp_starts_at_the_time() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-pos-in", "run-pos-out");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
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
    assert!(host.stop().success());
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
    assert!(host.stop().success());
    assert_eq!(by_key(&got), by_key(&expected));
}

/// Splits the stream's first shard at the middle of the hash range; returns the parent's id.
fn split(c: &AwsClients, stream: &str) -> String {
    rt().block_on(async {
        let shards = c.kinesis.list_shards().stream_name(stream).send().await.expect("ListShards");
        let parent = shards.shards()[0].shard_id().to_owned();
        c.kinesis
            .split_shard()
            .stream_name(stream)
            .shard_to_split(&parent)
            .new_starting_hash_key((1u128 << 127).to_string())
            .send()
            .await
            .expect("SplitShard");
        parent
    })
}

fn wait_active(c: &AwsClients, stream: &str) {
    rt().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = c
                .kinesis
                .describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
                .expect("Describe");
            if d.stream_description_summary().map(|s| s.stream_status().as_str()) == Some("ACTIVE")
            {
                return;
            }
            assert!(Instant::now() < deadline, "{stream} did not become ACTIVE");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

fn open_shards(c: &AwsClients, stream: &str) -> Vec<String> {
    rt().block_on(async {
        let shards = c.kinesis.list_shards().stream_name(stream).send().await.expect("ListShards");
        shards
            .shards()
            .iter()
            .filter(|s| {
                s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_none()
            })
            .map(|s| s.shard_id().to_owned())
            .collect()
    })
}

#[test]
fn a_split_and_a_merge_during_consumption_lose_nothing_and_keep_order() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-reshard-in", "run-reshard-out");
    create_stream(&c, input, 1);
    create_stream(&c, output, 1);
    let config = job_properties(
        dir.path(),
        "reshard",
        input,
        output,
        "systems.kinesis.aws.kcl.CleanupLeasesUponShardCompletion=false\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let first = numbered(8, 2, 0);
    put(&c, input, &first);
    wait_for_records(&c, output, first.len(), &log);

    let parent = split(&c, input);
    wait_active(&c, input);
    let second = numbered(8, 2, 2);
    put(&c, input, &second);
    let mut sent = first.clone();
    sent.extend(second.clone());
    wait_for_records(&c, output, sent.len(), &log);

    let children = open_shards(&c, input);
    assert_eq!(children.len(), 2, "{children:?}");
    rt().block_on(async {
        c.kinesis
            .merge_shards()
            .stream_name(input)
            .shard_to_merge(&children[0])
            .adjacent_shard_to_merge(&children[1])
            .send()
            .await
            .expect("MergeShards");
    });
    wait_active(&c, input);
    let third = numbered(8, 2, 4);
    put(&c, input, &third);
    sent.extend(third);
    let got = wait_for_records(&c, output, sent.len(), &log);
    assert!(host.stop().success());
    assert_eq!(got.len(), sent.len(), "each record exactly once");
    assert_eq!(by_key(&got), by_key(&sent), "per key, parents' records come before children's");

    // Lineage in the lease table: the parent and both children ended with SHARD_END and name
    // their children; the merged shard names both parents.
    let items = lease_items(&c, "reshard-1-run-reshard-in");
    let get = |key: &str| {
        items
            .iter()
            .find(|i| {
                i.get("leaseKey").and_then(|v| v.as_s().ok()).map(String::as_str) == Some(key)
            })
            .unwrap_or_else(|| panic!("no lease {key} in {items:?}"))
            .clone()
    };
    let parent_item = get(&parent);
    assert_eq!(
        parent_item.get("checkpoint").and_then(|v| v.as_s().ok()).map(String::as_str),
        Some("SHARD_END")
    );
    let mut named: Vec<String> =
        parent_item.get("childShardIds").and_then(|v| v.as_ss().ok()).cloned().unwrap_or_default();
    named.sort();
    let mut expected_children = children.clone();
    expected_children.sort();
    assert_eq!(named, expected_children);
    for child in &children {
        let item = get(child);
        assert_eq!(
            item.get("checkpoint").and_then(|v| v.as_s().ok()).map(String::as_str),
            Some("SHARD_END")
        );
        assert_eq!(
            item.get("parentShardId").and_then(|v| v.as_ss().ok()).cloned(),
            Some(vec![parent.clone()])
        );
    }
    let merged = open_shards(&c, input);
    assert_eq!(merged.len(), 1);
    let mut parents: Vec<String> = get(&merged[0])
        .get("parentShardId")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    parents.sort();
    assert_eq!(parents, expected_children);
}

#[test]
fn kpl_aggregates_come_out_as_user_records_resuming_inside_an_aggregate() {
    use kinesis_host_coordinator::kpl::{AggregateEntry, aggregate, partition_key_hash};
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-kpl-in", "run-kpl-out");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
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
    let entries: Vec<AggregateEntry<'_>> = users
        .iter()
        .map(|(k, d)| AggregateEntry {
            partition_key: k,
            explicit_hash_key: None,
            data: d.as_bytes(),
        })
        .collect();
    let blob = aggregate(&entries);
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
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        c.dynamodb
            .create_table()
            .table_name(table)
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("leaseKey")
                    .key_type(KeyType::Hash)
                    .build()
                    .expect("key"),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("leaseKey")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attr"),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .expect("CreateTable");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (i, shard) in shards.iter().enumerate() {
            let mut put = c
                .dynamodb
                .put_item()
                .table_name(table)
                .item("leaseKey", AttributeValue::S(shard.shard_id().to_owned()))
                .item("leaseOwner", AttributeValue::S("java-kcl-worker-gone".into()))
                .item("leaseCounter", AttributeValue::N("41".into()))
                .item("ownerSwitchesSinceCheckpoint", AttributeValue::N("0".into()));
            put = if i == 0 {
                put.item("checkpoint", AttributeValue::S(seq.clone()))
                    .item("checkpointSubSequenceNumber", AttributeValue::N("2".into()))
            } else {
                put.item("checkpoint", AttributeValue::S("TRIM_HORIZON".into()))
                    .item("checkpointSubSequenceNumber", AttributeValue::N("0".into()))
            };
            put.send().await.expect("PutItem");
        }
    });
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, 2, &log);
    // Once shard 1 has read (and dropped) the stray aggregate, nothing more may arrive.
    wait_for_log(&log, "Dropped a KPL aggregate", 1);
    let got_after = read_all(&c, output);
    assert!(host.stop().success());
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
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
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
    let host = Host::start(&config, &dir.path().join("host2.log"));
    let mut sent = first.clone();
    sent.extend(second);
    // The dead host's leases expire after FailoverTimeMillis (3 s here), then are taken.
    let got = wait_for_records(&c, output, sent.len(), &dir.path().join("host2.log"));
    assert!(host.stop().success());
    // At least once: every record; duplicates only from the window since the last checkpoint
    // (checkpoints follow every batch here, so at most the batch in flight).
    let delivered = by_key(&got);
    for (key, records) in by_key(&sent) {
        let seen = &delivered[&key];
        let mut first_seen: Vec<&String> = Vec::new();
        for r in seen {
            if !first_seen.contains(&r) {
                first_seen.push(r);
            }
        }
        assert_eq!(
            first_seen,
            records.iter().collect::<Vec<_>>(),
            "first deliveries in order for {key}"
        );
    }
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
    create_stream(&c, input, 1);
    create_stream(&c, output, 1);
    // The batch spins for up to a minute: a graceful stop would wait for it.
    let config =
        job_properties(dir.path(), "signal", input, output, "task.limits.batch.timeout.ms=60000\n");
    let log = dir.path().join("host.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(kinesis_host().get_program())
        .envs(kinesis_host().get_envs().filter_map(|(k, v)| Some((k, v?))))
        .arg("run")
        .arg(guest("spin-task"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("kinesis-host starts");
    put(&c, input, &[("k".to_owned(), "spin".to_owned())]);
    wait_for_log(&log, "spinning", 1);
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    wait_for_log(&log, "Stopping: finishing the batches in flight", 1);
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the second signal did not end the host; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(130),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(&log).unwrap_or_default().contains("Second signal: exiting now.")
    );
}

#[test]
fn one_job_consumes_several_input_streams() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b, output) = ("run-multi-a", "run-multi-b", "run-multi-out");
    create_stream(&c, a, 1);
    create_stream(&c, b, 2);
    create_stream(&c, output, 1);
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
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let mut sent = from_a;
    sent.extend(from_b);
    let got = wait_for_records(&c, output, sent.len(), &log);
    assert!(host.stop().success());
    assert_eq!(by_key(&got), by_key(&sent));
    // One lease table per input stream, as Samza names them.
    assert_eq!(lease_items(&c, "multi-1-run-multi-a").len(), 1);
    assert_eq!(lease_items(&c, "multi-1-run-multi-b").len(), 2);
}

#[path = "common/faults.rs"]
mod faults;

#[test]
fn throttling_and_transient_faults_are_survived() {
    use faults::{Fault, FaultProxy, Rule};
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-faults-in", "run-faults-out");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
    let sent = numbered(4, 6, 0);
    put(&c, input, &sent);
    let rule = |target_suffix, every, fault| Rule { target_suffix, every, fault, limit: Some(20) };
    let kinesis = FaultProxy::start(
        &e.kinesis_endpoint,
        vec![
            rule("GetRecords", 3, Fault::Throttle),
            rule("PutRecords", 2, Fault::ServerError),
            rule("GetShardIterator", 2, Fault::Reset),
            rule("ListShards", 2, Fault::Throttle),
        ],
    );
    let dynamodb = FaultProxy::start(
        &e.dynamodb_endpoint,
        vec![rule("UpdateItem", 3, Fault::Throttle), rule("Scan", 4, Fault::ServerError)],
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
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, sent.len(), &log);
    assert!(host.stop().success(), "log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(got.len(), sent.len(), "no record lost or repeated");
    assert_eq!(by_key(&got), by_key(&sent));
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
fn standard_aws_environment_variables_pick_endpoints_and_region() {
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-env-in", "run-env-out");
    create_stream(&c, input, 1);
    create_stream(&c, output, 1);
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
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(kinesis_host().get_program())
        .envs(kinesis_host().get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_ENDPOINT_URL_KINESIS", &e.kinesis_endpoint)
        .env("AWS_ENDPOINT_URL_DYNAMODB", &e.dynamodb_endpoint)
        .env_remove("AWS_PROFILE")
        .arg("run")
        .arg(guest("echo-task"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("kinesis-host starts");
    let host = Host(child);
    let got = wait_for_records(&c, output, sent.len(), &log);
    assert!(host.stop().success());
    assert_eq!(by_key(&got), by_key(&sent));
    assert_eq!(lease_items(&c, "env-1-run-env-in").len(), 1);
}

/// Each lease's checkpoint, by shard.
fn checkpoints(c: &AwsClients, table: &str) -> BTreeMap<String, String> {
    lease_items(c, table)
        .iter()
        .map(|i| {
            let get = |k: &str| i.get(k).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
            (get("leaseKey"), get("checkpoint"))
        })
        .collect()
}

fn decimal_at_least(a: &str, b: &str) -> bool {
    // Sequence numbers are decimal strings longer than u128: compare by length, then digits.
    (a.len(), a) >= (b.len(), b)
}

#[test]
fn a_host_paused_past_its_lease_cannot_checkpoint_when_it_resumes() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-pause-in", "run-pause-out");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
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
    let pid_a = a.0.id().to_string();
    let _ = Command::new("kill").args(["-STOP", &pid_a]).status();

    // B takes the expired leases, re-processes from the last checkpoint, and goes on.
    let b = Host::start(&fast, &log_b);
    let second = numbered(6, 2, 2);
    put(&c, input, &second);
    let mut sent = first.clone();
    sent.extend(second.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = by_key(&read_all(&c, output));
        let done = by_key(&sent)
            .iter()
            .all(|(k, v)| got.get(k).is_some_and(|g| v.iter().all(|r| g.contains(r))));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B did not deliver; log:\n{}",
            std::fs::read_to_string(&log_b).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
    assert!(b.stop().success());
    assert!(a.stop().success());
    // Every record was delivered, first deliveries in order per key.
    let got = by_key(&read_all(&c, output));
    for (key, records) in by_key(&sent) {
        let mut firsts: Vec<&String> = Vec::new();
        for r in &got[&key] {
            if !firsts.contains(&r) {
                firsts.push(r);
            }
        }
        assert_eq!(firsts, records.iter().collect::<Vec<_>>(), "{key}");
    }
}

#[path = "common/forward_proxy.rs"]
mod forward_proxy;

#[test]
fn client_config_proxy_carries_every_kinesis_and_dynamodb_request() {
    let c = clients();
    let e = emulators::emulators();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-proxy-in", "run-proxy-out");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
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
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, sent.len(), &log);
    assert!(host.stop().success(), "log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(got.len(), sent.len(), "no record lost or repeated");
    assert_eq!(by_key(&got), by_key(&sent));
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

/// One HTTP/1.0 `GET` against the host's `metrics.address`: status code, head and body.
fn http_get(address: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to metrics.address");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, head.to_owned(), body.to_owned())
}

/// The value of the sample of `name` whose labels include `labels`, in a Prometheus exposition.
fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (set, value) = line.strip_prefix(name)?.strip_prefix('{')?.split_once("} ")?;
        let has = |(k, v): &(&str, &str)| set.split(',').any(|l| l == format!("{k}=\"{v}\""));
        labels.iter().all(has).then(|| value.trim().parse().ok()).flatten()
    })
}

#[test]
fn metrics_address_serves_prometheus_metrics_health_and_readiness() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("run-metrics-in", "run-metrics-out");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
    let sent = numbered(4, 5, 0);
    put(&c, input, &sent);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = format!("127.0.0.1:{port}");
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
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        sample(&exposition, "kinesis_host_records_processed_total", &records),
        Some(sent.len() as f64),
        "{exposition}\nlog:\n{}",
        log_text()
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

    let (status, _, body) = http_get(&address, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _, body) = http_get(&address, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, _) = http_get(&address, "/elsewhere");
    assert_eq!(status, 404);

    let status = host.stop();
    assert!(status.success(), "exit {status}; log:\n{}", log_text());
    assert!(std::net::TcpStream::connect(&address).is_err(), "the endpoint closes with the host");
}
