//! Helpers for the tests that drive `kinesis-host run` against the emulators: AWS clients,
//! streams, records, lease tables, job.properties, and host processes.
//!
//! Include it after `mod common;` and the emulators module:
//!
//! ```ignore
//! mod common;
//! #[path = "common/emulators.rs"]
//! mod emulators;
//! #[path = "common/aws.rs"]
//! mod aws;
//! ```

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::ShardIteratorType;
use kinesis_host_coordinator::aws::{AwsClients, AwsSettings, StaticKeys};

use super::common::{guest, kinesis_host};
use super::emulators;

pub fn clients() -> AwsClients {
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

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Creates a stream of `shards` shards and waits until it is active.
pub fn create_stream(c: &AwsClients, name: &str, shards: i32) {
    rt().block_on(async {
        c.kinesis
            .create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .expect("CreateStream");
    });
    wait_active(c, name);
}

/// Creates each `(stream, shards)` with [`create_stream`].
pub fn create_streams(c: &AwsClients, streams: &[(&str, i32)]) {
    for (name, shards) in streams {
        create_stream(c, name, *shards);
    }
}

/// Puts `(partition key, data)` records one by one (so per-key order is the put order);
/// returns each record's `(shard id, sequence number)`.
pub fn put(c: &AwsClients, stream: &str, records: &[(String, String)]) -> Vec<(String, String)> {
    rt().block_on(async {
        let mut placed = Vec::new();
        for (key, data) in records {
            let out = c
                .kinesis
                .put_record()
                .stream_name(stream)
                .partition_key(key)
                .data(Blob::new(data.as_bytes()))
                .send()
                .await
                .expect("PutRecord");
            placed.push((out.shard_id().to_owned(), out.sequence_number().to_owned()));
        }
        placed
    })
}

/// Every record of every shard of `stream`, as (partition key, data), shard by shard.
pub fn read_all(c: &AwsClients, stream: &str) -> Vec<(String, String)> {
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

/// One item of a lease table, by attribute name.
pub type LeaseItem = std::collections::HashMap<String, AttributeValue>;

/// Every item of lease table `table`, in lease key order.
pub fn lease_items(c: &AwsClients, table: &str) -> Vec<LeaseItem> {
    rt().block_on(async {
        let out =
            c.dynamodb.scan().table_name(table).consistent_read(true).send().await.expect("Scan");
        let mut items = out.items().to_vec();
        items.sort_by_key(|i| string_attr(i, "leaseKey").map(str::to_owned));
        items
    })
}

/// The leases in `table`, by lease key (the shard id).
pub fn leases(c: &AwsClients, table: &str) -> BTreeMap<String, LeaseItem> {
    lease_items(c, table)
        .into_iter()
        .map(|i| (string_attr(&i, "leaseKey").unwrap_or_default().to_owned(), i))
        .collect()
}

/// Attribute `name` of a lease item, when it is a string.
pub fn string_attr<'a>(item: &'a LeaseItem, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

/// Attribute `name` of a lease item, when it is a string set, sorted.
pub fn string_set_attr(item: &LeaseItem, name: &str) -> Option<Vec<String>> {
    let mut set = item.get(name).and_then(|v| v.as_ss().ok()).cloned()?;
    set.sort();
    Some(set)
}

pub fn job_properties(
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
pub struct Host(pub Child);

impl Host {
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        Self::start_with("echo-task", config, log, &[])
    }

    /// Runs guest `task` with `config`, its log in `log`, with extra environment variables.
    pub fn start_with(
        task: &str,
        config: &std::path::Path,
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(kinesis_host().get_program())
            .envs(kinesis_host().get_envs().filter_map(|(k, v)| Some((k, v?))))
            .envs(env.iter().copied())
            .args(["run", "--log", "info,kinesis_host_coordinator=debug"])
            .arg(guest(task))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kinesis-host starts");
        Host(child)
    }

    /// The process id, for signals.
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }

    /// [`Host::stop`], asserting that the host exited successfully (showing its `log` if not).
    pub fn stop_cleanly(self, log: &std::path::Path) {
        let status = self.stop();
        assert!(status.success(), "exit {status}; log:\n{}", log_text(log));
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.wait_for_exit(Duration::from_secs(30), std::path::Path::new(""))
    }

    /// Waits (bounded by `within`) for the host to exit; its exit status. `log`, when it names
    /// a file, is shown if it does not exit.
    pub fn wait_for_exit(
        &mut self,
        within: Duration,
        log: &std::path::Path,
    ) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kinesis-host did not exit within {within:?}; log:\n{}",
                log_text(log)
            );
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
pub fn wait_for_records(
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
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Puts `records` into `input` (see [`put`]), adds them to `sent`, and waits (bounded) until
/// `output` holds as many records as `sent`; returns what `output` holds.
pub fn put_and_wait(
    c: &AwsClients,
    input: &str,
    records: Vec<(String, String)>,
    sent: &mut Vec<(String, String)>,
    output: &str,
    log: &std::path::Path,
) -> Vec<(String, String)> {
    put(c, input, &records);
    sent.extend(records);
    wait_for_records(c, output, sent.len(), log)
}

/// Runs `echo-task` with `config` (its log in `log`) until `output` holds as many records as were
/// `sent`, stops it cleanly, and asserts that each record sent came out exactly once, in order per
/// partition key (with one output shard). Returns what came out.
pub fn echo_exactly_once(
    c: &AwsClients,
    config: &std::path::Path,
    log: &std::path::Path,
    output: &str,
    sent: &[(String, String)],
) -> Vec<(String, String)> {
    let host = Host::start(config, log);
    let got = wait_for_records(c, output, sent.len(), log);
    host.stop_cleanly(log);
    assert_eq!(by_key(&got), by_key(sent), "each record once, in order per key");
    got
}

pub fn numbered(keys: usize, per_key: usize, from: usize) -> Vec<(String, String)> {
    (from..from + per_key)
        .flat_map(|i| {
            (0..keys).map(move |k| (format!("key-{k}"), format!("key-{k} record {i:03}")))
        })
        .collect()
}

/// Per partition key, the data in the order seen.
pub fn by_key(records: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, d) in records {
        map.entry(k.clone()).or_default().push(d.clone());
    }
    map
}

/// The host log's text so far (empty when there is none yet).
pub fn log_text(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits (bounded) until the host log contains `pattern` at least `n` times.
pub fn wait_for_log(log: &std::path::Path, pattern: &str, n: usize) {
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

/// Splits the stream's first shard at the middle of the hash range and waits until the stream is
/// active again; returns the parent's id.
pub fn split(c: &AwsClients, stream: &str) -> String {
    let parent = rt().block_on(async {
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
    });
    wait_active(c, stream);
    parent
}

/// Merges the two adjacent shards `shards` of `stream` and waits until it is active again.
pub fn merge(c: &AwsClients, stream: &str, shards: &[String]) {
    let [a, b] = shards else { panic!("merge takes two shards, not {shards:?}") };
    rt().block_on(async {
        c.kinesis
            .merge_shards()
            .stream_name(stream)
            .shard_to_merge(a)
            .adjacent_shard_to_merge(b)
            .send()
            .await
            .expect("MergeShards");
    });
    wait_active(c, stream);
}

/// Waits (bounded) until `stream` is `ACTIVE`.
pub fn wait_active(c: &AwsClients, stream: &str) {
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

pub fn open_shards(c: &AwsClients, stream: &str) -> Vec<String> {
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

/// Creates `table` with the KCL lease table's key (`leaseKey`, a string), as a Java KCL
/// application would have left it, and waits until it is `ACTIVE`.
pub async fn create_lease_table(c: &AwsClients, table: &str) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        TableStatus,
    };
    let key = KeySchemaElement::builder().attribute_name("leaseKey").key_type(KeyType::Hash);
    let attribute = AttributeDefinition::builder()
        .attribute_name("leaseKey")
        .attribute_type(ScalarAttributeType::S);
    c.dynamodb
        .create_table()
        .table_name(table)
        .key_schema(key.build().expect("key schema"))
        .attribute_definitions(attribute.build().expect("attribute definition"))
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("CreateTable");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = c.dynamodb.describe_table().table_name(table).send().await;
        if status.ok().and_then(|d| d.table()?.table_status().cloned()) == Some(TableStatus::Active)
        {
            return;
        }
        assert!(Instant::now() < deadline, "table {table} never became ACTIVE");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each lease's checkpoint, by shard.
pub fn checkpoints(c: &AwsClients, table: &str) -> BTreeMap<String, String> {
    leases(c, table)
        .into_iter()
        .map(|(shard, i)| (shard, string_attr(&i, "checkpoint").unwrap_or_default().to_owned()))
        .collect()
}

/// Writes the lease of `shard` into `table` as a Java KCL worker that is gone leaves it: owned
/// by that worker, and checkpointed at `(checkpoint, sub_sequence)`.
pub async fn put_lease_of_a_gone_worker(
    c: &AwsClients,
    table: &str,
    shard: &str,
    checkpoint: &str,
    sub_sequence: u64,
) {
    c.dynamodb
        .put_item()
        .table_name(table)
        .item("leaseKey", AttributeValue::S(shard.to_owned()))
        .item("leaseOwner", AttributeValue::S("java-kcl-worker-gone".into()))
        .item("leaseCounter", AttributeValue::N("41".into()))
        .item("ownerSwitchesSinceCheckpoint", AttributeValue::N("0".into()))
        .item("checkpoint", AttributeValue::S(checkpoint.to_owned()))
        .item("checkpointSubSequenceNumber", AttributeValue::N(sub_sequence.to_string()))
        .send()
        .await
        .expect("PutItem");
}

/// A KPL aggregate of `(partition key, data)` user records, as a producer puts it.
pub fn kpl_aggregate(users: &[(String, String)]) -> Vec<u8> {
    use kinesis_host_coordinator::kpl::{AggregateEntry, aggregate};
    let entries: Vec<AggregateEntry<'_>> = users
        .iter()
        .map(|(k, d)| AggregateEntry {
            partition_key: k,
            explicit_hash_key: None,
            data: d.as_bytes(),
        })
        .collect();
    aggregate(&entries)
}

pub fn decimal_at_least(a: &str, b: &str) -> bool {
    // Sequence numbers are decimal strings longer than u128: compare by length, then digits.
    (a.len(), a) >= (b.len(), b)
}

/// Waits (bounded, 90 s) until `output` holds every record of `sent` at least once.
pub fn wait_for_every_record(
    c: &AwsClients,
    output: &str,
    sent: &[(String, String)],
    log: &std::path::Path,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let wanted = by_key(sent);
    loop {
        let got = by_key(&read_all(c, output));
        let all =
            wanted.iter().all(|(k, v)| got.get(k).is_some_and(|g| v.iter().all(|r| g.contains(r))));
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "not every record delivered; log:\n{}", log_text(log));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// At-least-once delivery with order: every sent record was delivered, and per partition key
/// the first delivery of each record comes in the order it was sent (duplicates may follow).
pub fn assert_first_deliveries_in_order(got: &[(String, String)], sent: &[(String, String)]) {
    let delivered = by_key(got);
    for (key, records) in by_key(sent) {
        let mut firsts: Vec<&String> = Vec::new();
        for r in delivered.get(&key).into_iter().flatten() {
            if !firsts.contains(&r) {
                firsts.push(r);
            }
        }
        assert_eq!(firsts, records.iter().collect::<Vec<_>>(), "first deliveries for {key}");
    }
}
