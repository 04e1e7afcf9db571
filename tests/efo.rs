//! `kinesis-host run` with enhanced fan-out (`RetrievalMode=FANOUT`) against kinesis-local and
//! dynalite: the consumer is registered (also by two hosts at once), every record is delivered
//! exactly once and in order per key across forced re-subscriptions, across a split of the
//! shard being read, and across a graceful stop and restart; a checkpoint inside a KPL aggregate
//! resumes with the aggregate's next user record; a consumer deregistered under a running job
//! is registered again.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::time::Duration;

use aws::*;
use common::{free_address, http_get, samples};
use kinesis_host_coordinator::aws::AwsClients;
use kinesis_host_coordinator::efo::FanOut;

/// The keys that switch an input to enhanced fan-out, re-subscribing every `resubscribe_ms`.
fn fan_out(resubscribe_ms: u64) -> String {
    format!(
        "systems.kinesis.aws.kcl.RetrievalMode=FANOUT\n\
         systems.kinesis.aws.kcl.ResubscribeIntervalMillis={resubscribe_ms}\n"
    )
}

/// The ARN of `stream`.
fn stream_arn(c: &AwsClients, stream: &str) -> String {
    rt().block_on(async {
        let summary = c
            .kinesis
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .expect("DescribeStreamSummary");
        summary.stream_description_summary().expect("summary").stream_arn().to_owned()
    })
}

/// The consumers registered on `stream`, by name.
fn consumers(c: &AwsClients, stream: &str) -> Vec<String> {
    let arn = stream_arn(c, stream);
    rt().block_on(async {
        let out = c
            .kinesis
            .list_stream_consumers()
            .stream_arn(arn)
            .send()
            .await
            .expect("ListStreamConsumers");
        out.consumers().iter().map(|c| c.consumer_name().to_owned()).collect()
    })
}

/// Puts `rounds` rounds of one record per key, pausing between rounds, so that records keep
/// arriving while subscriptions are replaced; returns what was sent, in order.
fn put_slowly(
    c: &AwsClients,
    stream: &str,
    keys: usize,
    rounds: usize,
    from: usize,
) -> Vec<(String, String)> {
    let mut sent = Vec::new();
    for round in from..from + rounds {
        let records = numbered(keys, 1, round);
        put(c, stream, &records);
        sent.extend(records);
        std::thread::sleep(Duration::from_millis(700));
    }
    sent
}

/// The sum of the samples of metric `name` for input `stream`, from the host's `/metrics`.
fn metric(address: &str, name: &str, stream: &str) -> f64 {
    let (_, _, exposition) = http_get(address, "/metrics");
    samples(&exposition, name, &[("stream", stream)]).sum()
}

#[test]
fn every_record_once_and_in_order_across_forced_resubscriptions() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("efo-resub-in", "efo-resub-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let before = numbered(4, 2, 0);
    put(&c, input, &before);
    let address = free_address();
    let extra = format!("{}metrics.address={address}\n", fan_out(2000));
    let config = job_properties(dir.path(), "efo-resub", input, output, &extra);
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    wait_for_records(&c, output, before.len(), &log);
    // About ten seconds of records while each shard's subscription is replaced every 2 s.
    let mut sent = before.clone();
    sent.extend(put_slowly(&c, input, 4, 14, 2));
    let got = wait_for_records(&c, output, sent.len(), &log);
    // Each shard subscribed at least three times: the first and two or more replacements.
    wait_for_log(&log, "Subscribed to shard.", 6);
    let after = read_all(&c, output);
    let subscriptions = metric(&address, "kinesis_host_efo_subscriptions_total", input);
    let processed = metric(&address, "kinesis_host_records_processed_total", input);
    host.stop_cleanly(&log);
    assert_eq!(got.len(), sent.len(), "each record exactly once; log:\n{}", log_text(&log));
    assert_eq!(after.len(), sent.len(), "nothing delivered again later");
    assert_eq!(by_key(&got), by_key(&sent), "in order per key");
    assert!(subscriptions >= 6.0, "kinesis_host_efo_subscriptions_total {subscriptions}");
    assert_eq!(processed, sent.len() as f64, "kinesis_host_records_processed_total");
    assert!(
        log_text(&log).contains("Replacing the subscription before it expires."),
        "the subscriptions were replaced by the host:\n{}",
        log_text(&log)
    );
    assert_eq!(consumers(&c, input), vec!["efo-resub-1".to_owned()]);
    // Both shards checkpointed at a sequence number (not their initial position).
    for (shard, checkpoint) in checkpoints(&c, "efo-resub-1-efo-resub-in") {
        assert!(checkpoint.bytes().all(|b| b.is_ascii_digit()), "{shard} checkpoint {checkpoint}");
    }
}

#[test]
fn a_split_during_consumption_hands_over_to_the_children_exactly_once() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("efo-split-in", "efo-split-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let extra = format!(
        "{}systems.kinesis.aws.kcl.CleanupLeasesUponShardCompletion=false\n",
        fan_out(3000)
    );
    let config = job_properties(dir.path(), "efo-split", input, output, &extra);
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let mut sent = Vec::new();
    put_and_wait(&c, input, numbered(8, 2, 0), &mut sent, output, &log);

    let parent = split(&c, input);
    let got = put_and_wait(&c, input, numbered(8, 2, 2), &mut sent, output, &log);
    host.stop_cleanly(&log);
    assert_eq!(got.len(), sent.len(), "each record exactly once; log:\n{}", log_text(&log));
    assert_eq!(by_key(&got), by_key(&sent), "per key, the parent's records before the children's");

    // The parent ended with SHARD_END and names both children, as with polling.
    let items = leases(&c, "efo-split-1-efo-split-in");
    let parent_item =
        items.get(&parent).unwrap_or_else(|| panic!("no lease of {parent}: {items:?}"));
    assert_eq!(string_attr(parent_item, "checkpoint"), Some("SHARD_END"));
    let mut children = open_shards(&c, input);
    children.sort();
    assert_eq!(string_set_attr(parent_item, "childShardIds"), Some(children));
}

#[test]
fn a_restart_after_a_graceful_stop_resumes_at_the_checkpoint_without_duplicates() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("efo-restart-in", "efo-restart-out");
    create_streams(&c, &[(input, 2), (output, 1)]);
    let first = numbered(6, 3, 0);
    put(&c, input, &first);
    let config = job_properties(dir.path(), "efo-restart", input, output, &fan_out(290_000));
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    wait_for_records(&c, output, first.len(), &log);
    host.stop_cleanly(&log);

    let second = numbered(6, 3, 3);
    put(&c, input, &second);
    let log2 = dir.path().join("host2.log");
    let host = Host::start(&config, &log2);
    let mut sent = first.clone();
    sent.extend(second);
    let got = wait_for_records(&c, output, sent.len(), &log2);
    // Whatever the host still had in flight is sent before a graceful stop ends: nothing more
    // may have come.
    wait_for_log(&log2, "Subscribed to shard.", 2);
    host.stop_cleanly(&log2);
    let after = read_all(&c, output);
    assert_eq!(got.len(), sent.len(), "exactly once; second log:\n{}", log_text(&log2));
    assert_eq!(after.len(), sent.len(), "exactly once; second log:\n{}", log_text(&log2));
    assert_eq!(by_key(&got), by_key(&sent));
    // The second host found the consumer the first one registered.
    assert_eq!(consumers(&c, input), vec!["efo-restart-1".to_owned()]);
}

#[test]
fn two_hosts_registering_the_consumer_at_once_share_it() {
    let c = clients();
    let stream = "efo-register";
    create_stream(&c, stream, 1);
    let (a, b) = (
        FanOut::new("shared-consumer", None, Duration::from_secs(290)),
        FanOut::new("shared-consumer", None, Duration::from_secs(290)),
    );
    let (arn_a, arn_b) = rt().block_on(async {
        let (a, b) =
            tokio::join!(a.consumer_arn(&c.kinesis, stream), b.consumer_arn(&c.kinesis, stream));
        (a, b)
    });
    let arn_a = arn_a.expect("the first registration succeeds");
    let arn_b = arn_b.expect("the concurrent registration succeeds too");
    assert_eq!(arn_a, arn_b, "one consumer");
    assert!(arn_a.contains(":stream/efo-register/consumer/shared-consumer:"), "{arn_a}");
    assert_eq!(consumers(&c, stream), vec!["shared-consumer".to_owned()]);
    // An existing consumer given by its ARN is used as it is.
    let by_arn = FanOut::new("ignored", Some(arn_a.clone()), Duration::from_secs(290));
    let arn = rt().block_on(async { by_arn.consumer_arn(&c.kinesis, stream).await });
    assert_eq!(arn.expect("an existing consumer"), arn_a);
    assert_eq!(consumers(&c, stream), vec!["shared-consumer".to_owned()]);
}

#[test]
fn a_checkpoint_inside_a_kpl_aggregate_resumes_with_its_next_user_record() {
    use aws_sdk_kinesis::primitives::Blob;
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output, table) = ("efo-kpl-in", "efo-kpl-out", "efo-kpl-table");
    create_streams(&c, &[(input, 1), (output, 1)]);
    let users: Vec<(String, String)> =
        (0..5).map(|i| ("kpl-key".to_owned(), format!("user record {i}"))).collect();
    let blob = kpl_aggregate(&users);
    let (shard, seq) = rt().block_on(async {
        let out = c
            .kinesis
            .put_record()
            .stream_name(input)
            .partition_key("kpl-key")
            .data(Blob::new(blob))
            .send()
            .await
            .expect("PutRecord");
        (out.shard_id().to_owned(), out.sequence_number().to_owned())
    });
    // A lease table as a KCL application leaves it: checkpointed after user record 2 of the
    // aggregate, owned by a worker that is gone.
    rt().block_on(async {
        create_lease_table(&c, table).await;
        put_lease_of_a_gone_worker(&c, table, &shard, &seq, 2).await;
    });
    let extra = format!(
        "{}systems.kinesis.aws.kcl.TableName={table}\nsystems.kinesis.aws.kcl.FailoverTimeMillis=3000\n",
        fan_out(290_000)
    );
    let config = job_properties(dir.path(), "efo-kpl", input, output, &extra);
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let got = wait_for_records(&c, output, 2, &log);
    // A record written now comes after them, once.
    put(&c, input, &[("kpl-key".to_owned(), "plain record".to_owned())]);
    let got_after = wait_for_records(&c, output, 3, &log);
    host.stop_cleanly(&log);
    assert_eq!(got, users[3..].to_vec(), "log:\n{}", log_text(&log));
    let mut expected = users[3..].to_vec();
    expected.push(("kpl-key".to_owned(), "plain record".to_owned()));
    assert_eq!(got_after, expected, "log:\n{}", log_text(&log));
    assert!(log_text(&log).contains("Subscribed to shard."), "fan-out was used");
}

#[test]
fn a_consumer_deregistered_while_the_job_runs_is_registered_again() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("efo-dereg-in", "efo-dereg-out");
    create_streams(&c, &[(input, 1), (output, 1)]);
    // Short failover: a stopped shard is retried after twice this.
    let extra = format!("{}systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n", fan_out(2000));
    let config = job_properties(dir.path(), "efo-dereg", input, output, &extra);
    let log = dir.path().join("host.log");
    let host = Host::start(&config, &log);
    let mut sent = Vec::new();
    put_and_wait(&c, input, numbered(4, 2, 0), &mut sent, output, &log);
    let arn = stream_arn(&c, input);
    rt().block_on(async {
        c.kinesis
            .deregister_stream_consumer()
            .stream_arn(arn)
            .consumer_name("efo-dereg-1")
            .send()
            .await
            .expect("DeregisterStreamConsumer");
    });
    let got = put_and_wait(&c, input, numbered(4, 2, 2), &mut sent, output, &log);
    wait_for_log(&log, "Registered the enhanced fan-out consumer.", 2);
    host.stop_cleanly(&log);
    assert_eq!(got.len(), sent.len(), "each record exactly once; log:\n{}", log_text(&log));
    assert_eq!(by_key(&got), by_key(&sent));
    assert_eq!(consumers(&c, input), vec!["efo-dereg-1".to_owned()], "registered again");
}
