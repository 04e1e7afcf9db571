//! `kinesis-host status` against kinesis-local and dynalite (started by the tests themselves):
//! exact checkpoints, owners and lag after a real run, the text form, and a job that never ran.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::collections::BTreeMap;
use std::path::Path;

use aws::{Host, clients, create_stream, wait_for_records};
use common::kinesis_host;
use kinesis_host_coordinator::aws::AwsClients;
use serde_json::Value;

/// Puts the records one by one; returns the last sequence number put into each shard.
fn put_last(
    c: &AwsClients,
    stream: &str,
    records: &[(String, String)],
) -> BTreeMap<String, String> {
    aws::put(c, stream, records).into_iter().collect()
}

fn job_properties(dir: &Path, job: &str, input: &str, output: &str) -> std::path::PathBuf {
    let e = emulators::emulators();
    let text = format!(
        "job.name={job}\n\
         task.inputs=kinesis.{input}\n\
         task.output.out=kinesis.{output}\n\
         task.commit.ms=1\n\
         systems.kinesis.samza.factory=org.apache.samza.system.kinesis.KinesisSystemFactory\n\
         systems.kinesis.aws.region=us-east-1\n\
         systems.kinesis.aws.accessKey=test\n\
         sensitive.systems.kinesis.aws.secretKey=do-not-print-me\n\
         systems.kinesis.aws.kinesis.endpoint={}\n\
         systems.kinesis.aws.dynamodb.endpoint={}\n\
         systems.kinesis.aws.kcl.InitialPositionInStream=TRIM_HORIZON\n\
         systems.kinesis.aws.kcl.IdleTimeBetweenReadsInMillis=100\n\
         systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n",
        e.kinesis_endpoint, e.dynamodb_endpoint,
    );
    let path = dir.join(format!("{job}.properties"));
    std::fs::write(&path, text).expect("write job.properties");
    path
}

/// `kinesis-host status --config <config> [--json]`: exit code, stdout, stderr.
fn status(config: &Path, json: bool) -> (Option<i32>, String, String) {
    let mut cmd = kinesis_host();
    cmd.arg("status").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    let (output, stdout, stderr) = common::run(&mut cmd);
    assert!(!stdout.contains("do-not-print-me") && !stderr.contains("do-not-print-me"));
    (output.status.code(), stdout, stderr)
}

fn status_json(config: &Path) -> Value {
    let (code, stdout, stderr) = status(config, true);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

#[test]
fn shows_checkpoints_owners_and_lag_after_a_run() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, table) = ("status-in", "status-out", "status-1-status-in");
    create_stream(&c, input, 2);
    create_stream(&c, output, 1);
    let records: Vec<(String, String)> =
        (0..20).map(|i| (format!("key-{i}"), format!("record {i}"))).collect();
    let last = put_last(&c, input, &records);
    assert_eq!(last.len(), 2, "the records should reach both shards: {last:?}");
    let config = job_properties(dir.path(), "status", input, output);
    let log = dir.path().join("host.log");

    let host = Host::start(&config, &log);
    wait_for_records(&c, output, records.len(), &log);
    // While the host runs, it holds both leases.
    let running = status_json(&config);
    let owners: Vec<&Value> =
        running[0]["shards"].as_array().expect("shards").iter().map(|s| &s["owner"]).collect();
    assert!(owners.iter().all(|o| o.is_string()), "{running:#}");
    assert_eq!(owners[0], owners[1], "one host holds both: {running:#}");
    assert_eq!(running[0]["totals"]["owners"][owners[0].as_str().expect("owner")], 2);
    assert!(host.stop().success(), "log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());

    let doc = status_json(&config);
    let streams = doc.as_array().expect("a list of streams");
    assert_eq!(streams.len(), 1, "{doc:#}");
    let s = &streams[0];
    assert_eq!(s["stream"], input);
    assert_eq!(s["table"], table);
    assert_eq!(s["error"], Value::Null);
    let shards = s["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 2, "{doc:#}");
    for (shard, (id, sequence_number)) in shards.iter().zip(&last) {
        assert_eq!(shard["shard_id"], id.as_str(), "{doc:#}");
        assert_eq!(shard["state"], "open");
        assert_eq!(shard["leased"], true);
        assert_eq!(shard["owner"], Value::Null, "released on stop: {doc:#}");
        assert_eq!(shard["checkpoint"], sequence_number.as_str(), "in full: {doc:#}");
        assert_eq!(shard["checkpoint_sub_sequence_number"], 0);
        assert!(shard["lease_counter"].as_u64().is_some_and(|n| n > 0), "{doc:#}");
        assert_eq!(shard["parents"], serde_json::json!([]));
        assert_eq!(shard["children"], serde_json::json!([]));
        assert!(shard["millis_behind_latest"].is_i64(), "lag known: {doc:#}");
    }
    let totals = &s["totals"];
    for (name, value) in [
        ("shards", 2),
        ("open", 2),
        ("closed", 0),
        ("leased", 2),
        ("without_lease", 0),
        ("trimmed_leases", 0),
        ("leases", 2),
        ("unowned_leases", 2),
    ] {
        assert_eq!(totals[name], value, "totals.{name}: {doc:#}");
    }
    assert_eq!(totals["owners"], serde_json::json!({}));

    let (code, text, stderr) = status(&config, false);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.contains(table), "{text}");
    for (id, sequence_number) in &last {
        let line = text.lines().find(|l| l.contains(id.as_str())).unwrap_or_else(|| {
            panic!("no line for {id}:\n{text}");
        });
        let abbreviated =
            format!("{}…{}", &sequence_number[..6], &sequence_number[sequence_number.len() - 6..]);
        assert!(line.contains(&abbreviated), "{line}");
        assert!(line.contains(" open "), "{line}");
    }
}

#[test]
fn a_job_that_never_ran_is_one_clear_error() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    create_stream(&c, "status-never-in", 1);
    let config = job_properties(dir.path(), "never", "status-never-in", "status-never-out");
    for json in [false, true] {
        let (code, stdout, stderr) = status(&config, json);
        assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(
            errors,
            [
                "error: lease table never-1-status-never-in of stream status-never-in does not exist: \
              the job has not run yet, or aws.kcl.TableName (default <job.name>-<job.id>-<stream>), \
              the region or the DynamoDB endpoint is wrong"
            ],
            "stderr:\n{stderr}"
        );
        if json {
            let doc: Value = serde_json::from_str(&stdout).expect("JSON");
            assert_eq!(doc[0]["table"], "never-1-status-never-in");
            assert!(doc[0]["error"].as_str().is_some_and(|e| e.contains("has not run yet")));
        } else {
            assert_eq!(stdout, "");
        }
    }
}

#[test]
fn a_pending_hand_off_shows_both_hosts() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, table) = ("status-handoff-in", "handoff-1-status-handoff-in");
    create_stream(&c, input, 2);
    let shards = aws::open_shards(&c, input);
    assert_eq!(shards.len(), 2, "{shards:?}");
    // host-b asked host-a for the first lease (KCL 3.x's mark: the taker in `leaseOwner`, the
    // owner still processing in `checkpointOwner`); host-a holds the second one plainly.
    aws::rt().block_on(async {
        aws::create_lease_table(&c, table).await;
        for (shard, owner, checkpoint_owner) in
            [(&shards[0], "host-b", Some("host-a")), (&shards[1], "host-a", None)]
        {
            let mut put = c
                .dynamodb
                .put_item()
                .table_name(table)
                .item("leaseKey", AttributeValue::S(shard.clone()))
                .item("leaseOwner", AttributeValue::S(owner.into()))
                .item("leaseCounter", AttributeValue::N("7".into()))
                .item("checkpoint", AttributeValue::S("TRIM_HORIZON".into()))
                .item("checkpointSubSequenceNumber", AttributeValue::N("0".into()))
                .item("ownerSwitchesSinceCheckpoint", AttributeValue::N("0".into()));
            if let Some(from) = checkpoint_owner {
                put = put.item("checkpointOwner", AttributeValue::S(from.into()));
            }
            put.send().await.expect("PutItem");
        }
    });
    let config = job_properties(dir.path(), "handoff", input, "status-handoff-out");

    let doc = status_json(&config);
    let s = &doc[0];
    assert_eq!(s["error"], Value::Null, "{doc:#}");
    let rows = s["shards"].as_array().expect("shards");
    assert_eq!(rows.len(), 2, "{doc:#}");
    assert_eq!(rows[0]["shard_id"], shards[0].as_str());
    assert_eq!(rows[0]["owner"], "host-b", "leaseOwner as written: {doc:#}");
    assert_eq!(rows[0]["handoff"], serde_json::json!({"from": "host-a", "to": "host-b"}));
    assert_eq!(rows[1]["owner"], "host-a");
    assert_eq!(rows[1]["handoff"], Value::Null, "{doc:#}");
    assert_eq!(s["totals"]["handoffs_pending"], 1, "{doc:#}");

    let (code, text, stderr) = status(&config, false);
    assert_eq!(code, Some(0), "{stderr}");
    let line = |id: &str| {
        text.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        line(&shards[0]).starts_with(&format!(
            "{} open host-a → host-b (hand-off pending) TRIM_HORIZON 7",
            shards[0]
        )),
        "{text}"
    );
    assert!(
        line(&shards[1]).starts_with(&format!("{} open host-a TRIM_HORIZON 7", shards[1])),
        "{text}"
    );
    assert!(
        text.contains(
            "owners: host-a (1 lease), host-b (1 lease); unowned leases: 0; 1 hand-off pending"
        ),
        "{text}"
    );
}
