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
         systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n\
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
