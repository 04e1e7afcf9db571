//! Graceful lease hand-off against kinesis-local and dynalite: a host that steals a live lease
//! to balance the load asks its owner to hand it over (KCL 3.x's `checkpointOwner` mark); the
//! owner finishes its batch, checkpoints and hands over, so moving a shard delivers nothing twice.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws::*;
use aws_sdk_dynamodb::types::AttributeValue;
use kinesis_host_coordinator::aws::AwsClients;

/// The lease items; none while the table does not exist yet.
fn items(c: &AwsClients, table: &str) -> Vec<std::collections::HashMap<String, AttributeValue>> {
    rt().block_on(async {
        match c.dynamodb.scan().table_name(table).consistent_read(true).send().await {
            Ok(out) => out.items().to_vec(),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                Vec::new()
            }
            Err(e) => panic!("Scan of {table}: {e:?}"),
        }
    })
}

/// Leases per owner prefix (`host-a`, …): the worker id is `$HOSTNAME-<uuid>`.
fn owners(c: &AwsClients, table: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items(c, table) {
        let owner = item.get("leaseOwner").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
        let host = owner.split('-').take(2).collect::<Vec<_>>().join("-");
        *counts.entry(host).or_insert(0) += 1;
        assert!(
            !item.contains_key("checkpointOwner") || !owner.is_empty(),
            "a hand-off mark on an unowned lease: {item:?}"
        );
    }
    counts
}

/// Waits (bounded) until the leases are spread as `expected` and no hand-off is pending.
fn wait_for_owners(
    c: &AwsClients,
    table: &str,
    expected: &[(&str, usize)],
    logs: &[&std::path::Path],
) {
    let expected: BTreeMap<String, usize> =
        expected.iter().map(|(h, n)| ((*h).to_owned(), *n)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = owners(c, table);
        let pending = items(c, table).iter().any(|i| i.contains_key("checkpointOwner"));
        if got == expected && !pending {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leases are spread {got:?} (hand-off pending: {pending}), not {expected:?}; logs:\n{}",
            logs.iter()
                .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_third_host_joining_two_busy_hosts_moves_a_shard_without_duplicates() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("handoff-in", "handoff-out");
    create_stream(&c, input, 4);
    create_stream(&c, output, 1);
    // Checkpoints only at a stop or a hand-off: a plain steal would deliver again every record
    // the moved shard's owner had processed.
    let config = job_properties(
        dir.path(),
        "handoff",
        input,
        output,
        "task.commit.ms=600000\nsystems.kinesis.aws.kcl.FailoverTimeMillis=3000\n",
    );
    let table = "handoff-1-handoff-in";
    let log = |h: &str| dir.path().join(format!("{h}.log"));
    let (log_a, log_b, log_c) = (log("a"), log("b"), log("c"));
    let a = Host::start_with("echo-task", &config, &log_a, &[("HOSTNAME", "host-a")]);
    let b = Host::start_with("echo-task", &config, &log_b, &[("HOSTNAME", "host-b")]);
    wait_for_owners(&c, table, &[("host-a", 2), ("host-b", 2)], &[&log_a, &log_b]);

    let first = numbered(8, 3, 0);
    put(&c, input, &first);
    wait_for_records(&c, output, first.len(), &log_a);

    // C joins: it asks A or B for one lease, and gets it handed over.
    let host_c = Host::start_with("echo-task", &config, &log_c, &[("HOSTNAME", "host-c")]);
    let second = numbered(8, 3, 3);
    put(&c, input, &second);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = owners(&c, table);
        let pending = items(&c, table).iter().any(|i| i.contains_key("checkpointOwner"));
        if got.get("host-c") == Some(&1) && got.values().sum::<usize>() == 4 && !pending {
            break;
        }
        assert!(Instant::now() < deadline, "C got no lease: {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let third = numbered(8, 3, 6);
    put(&c, input, &third);
    let mut sent = first;
    sent.extend(second);
    sent.extend(third);
    wait_for_records(&c, output, sent.len(), &log_c);
    assert!(host_c.stop().success());
    assert!(b.stop().success());
    assert!(a.stop().success());
    // Exactly once: the moved shard went on right after its owner's last record.
    let got = read_all(&c, output);
    assert_eq!(
        got.len(),
        sent.len(),
        "records delivered twice: {:?}",
        got.len() - sent.len().min(got.len())
    );
    assert_eq!(by_key(&got), by_key(&sent));
    // The move to C went through a hand-off (so did A's share when A and B started).
    let handed = [&log_a, &log_b]
        .iter()
        .flat_map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("Handed lease over.") && l.contains("next=\"host-c-"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .count();
    let lease_lines: String = [&log_a, &log_b, &log_c]
        .iter()
        .flat_map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("lease"))
                .map(|l| format!("{l}\n"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(handed, 1, "one lease was handed over to C:\n{lease_lines}");
    let c_log = std::fs::read_to_string(&log_c).unwrap_or_default();
    assert!(!c_log.contains("did not hand the lease over in time"), "{c_log}");
}

/// A simulated KCL 2.x worker `kcl2-worker` holding every lease of its own table (see
/// [`kcl2_renewer`]).
struct Kcl2Worker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Kcl2Worker {
    /// Creates streams `input` (2 shards) and `output`, and lease table `table` as the KCL 2.x
    /// worker's, and starts renewing its leases.
    fn start(c: &AwsClients, input: &str, output: &str, table: &str) -> Self {
        create_stream(c, input, 2);
        create_stream(c, output, 1);
        let shards = kcl2_table(c, table, input);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread =
            kcl2_renewer(clients(), table.to_owned(), shards, stop.clone(), dropped.clone());
        Self { stop, dropped, thread }
    }

    /// The leases it lost so far.
    fn dropped(&self) -> Vec<String> {
        self.dropped.lock().expect("lock").clone()
    }

    /// Stops it; the leases it lost.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the KCL 2.x renewer");
        self.dropped.lock().expect("lock").clone()
    }
}

/// A KCL 2.x worker's lease loop for the leases it holds: renews each every 300 ms with
/// `leaseCounter` conditional on its last value, knows nothing of `checkpointOwner`, and drops
/// a lease whose renewal fails (another worker took it). Stops when `stop` is set.
fn kcl2_renewer(
    c: AwsClients,
    table: String,
    leases: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut held: BTreeMap<String, u64> = leases.into_iter().map(|l| (l, 1)).collect();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (lease, counter) in held.clone() {
                let renewed = rt().block_on(
                    c.dynamodb
                        .update_item()
                        .table_name(&table)
                        .key("leaseKey", AttributeValue::S(lease.clone()))
                        .update_expression("SET leaseCounter = :next")
                        .condition_expression("leaseCounter = :c")
                        .expression_attribute_values(":c", AttributeValue::N(counter.to_string()))
                        .expression_attribute_values(
                            ":next",
                            AttributeValue::N((counter + 1).to_string()),
                        )
                        .send(),
                );
                match renewed {
                    Ok(_) => {
                        held.insert(lease, counter + 1);
                    }
                    Err(_) => {
                        held.remove(&lease);
                        dropped.lock().expect("lock").push(lease);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// Creates lease table `table` as a KCL 2.x worker `kcl2-worker` would, holding a lease on
/// every open shard of `stream`; returns the shards.
fn kcl2_table(c: &AwsClients, table: &str, stream: &str) -> Vec<String> {
    let shards = open_shards(c, stream);
    // The KCL 2.x worker's table: both leases its own.
    rt().block_on(async {
        create_lease_table(c, table).await;
        for shard in &shards {
            c.dynamodb
                .put_item()
                .table_name(table)
                .item("leaseKey", AttributeValue::S(shard.clone()))
                .item("leaseOwner", AttributeValue::S("kcl2-worker".into()))
                .item("leaseCounter", AttributeValue::N("1".into()))
                .item("checkpoint", AttributeValue::S("TRIM_HORIZON".into()))
                .item("checkpointSubSequenceNumber", AttributeValue::N("0".into()))
                .item("ownerSwitchesSinceCheckpoint", AttributeValue::N("0".into()))
                .send()
                .await
                .expect("PutItem");
        }
    });
    shards
}

#[test]
fn a_kcl_2_worker_that_ignores_the_mark_loses_the_lease_after_the_timeout() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("handoff-kcl2-in", "handoff-kcl2-out");
    let table = "handoffkcl2-1-handoff-kcl2-in";
    let kcl2 = Kcl2Worker::start(&c, input, output, table);

    // Our host needs one of the two leases: it marks one, the KCL 2.x worker renews on, and
    // after the (short) timeout our host steals it, fencing the KCL worker out.
    let config = job_properties(
        dir.path(),
        "handoffkcl2",
        input,
        output,
        "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n\
         systems.kinesis.aws.kcl.GracefulLeaseHandoffTimeoutMillis=2000\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("echo-task", &config, &log, &[("HOSTNAME", "host-c")]);
    wait_for_log(&log, "did not hand the lease over in time", 1);
    wait_for_owners(&c, table, &[("host-c", 1), ("kcl2-worker", 1)], &[&log]);
    // The KCL 2.x worker's next renewal of the stolen lease fails: it is fenced out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while kcl2.dropped().is_empty() {
        assert!(Instant::now() < deadline, "the KCL 2.x worker still renews the stolen lease");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_owners(&c, table, &[("host-c", 1), ("kcl2-worker", 1)], &[&log]);
    let dropped = kcl2.stop();
    assert_eq!(dropped.len(), 1, "the KCL 2.x worker lost exactly the stolen lease: {dropped:?}");
    assert!(host.stop().success());
}

#[test]
fn a_host_that_stops_before_the_hand_off_withdraws_its_request() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("handoff-withdraw-in", "handoff-withdraw-out");
    let table = "handoffwithdraw-1-handoff-withdraw-in";
    let kcl2 = Kcl2Worker::start(&c, input, output, table);
    // The owner ignores the mark and the wait is long: the request is still pending at the stop.
    let config = job_properties(
        dir.path(),
        "handoffwithdraw",
        input,
        output,
        "systems.kinesis.aws.kcl.FailoverTimeMillis=3000\n\
         systems.kinesis.aws.kcl.GracefulLeaseHandoffTimeoutMillis=600000\n",
    );
    let log = dir.path().join("host.log");
    let host = Host::start_with("echo-task", &config, &log, &[("HOSTNAME", "host-c")]);
    wait_for_log(&log, "Asked the owner to hand the lease over.", 1);
    assert!(host.stop().success());
    wait_for_log(&log, "Withdrew the hand-off request.", 1);
    // Both leases are the KCL 2.x worker's again, unmarked, and it never lost one.
    let items = items(&c, table);
    assert_eq!(items.len(), 2);
    for item in &items {
        assert_eq!(
            item.get("leaseOwner").and_then(|v| v.as_s().ok()).map(String::as_str),
            Some("kcl2-worker"),
            "{item:?}"
        );
        assert!(!item.contains_key("checkpointOwner"), "{item:?}");
    }
    assert!(kcl2.stop().is_empty(), "the KCL 2.x worker lost a lease");
}
