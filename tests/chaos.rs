//! Chaos: three `kinesis-host run` processes share one job (one lease table) over an 8-shard
//! stream while a producer writes numbered records per partition key, and meanwhile one host is
//! SIGKILLed and restarted, another is SIGSTOPped past `FailoverTimeMillis` and resumed, one
//! shard is split and two adjacent shards are merged. Loopback only (kinesis-local and dynalite),
//! and every wait is bounded by one deadline for the whole scenario.
//!
//! At the end: every record delivered at least once, first deliveries in order per key,
//! duplicates only on shards whose lease moved (at most one `GetRecords` worth per move, since a
//! checkpoint follows every read), checkpoints never going backwards (a stale host's write would
//! move one back) and the paused host's writes refused, and every shard owned and finished.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws::{clients, create_stream, job_properties, read_all, rt, wait_active};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use common::{guest, kinesis_host};
use kinesis_host_coordinator::aws::AwsClients;

/// The whole scenario, from the first host's start to the last host's exit.
const SCENARIO_CAP: Duration = Duration::from_secs(120);
/// `MaxRecords` of the job: the most records one read delivers, so the most a lease move can
/// deliver twice (a checkpoint follows every read: `task.commit.ms=1`).
const MAX_RECORDS: usize = 25;
const FAILOVER: Duration = Duration::from_millis(3000);
const KEYS: usize = 16;
const PER_KEY: usize = 25;
const PUT_EVERY: Duration = Duration::from_millis(100);

/// One shard as ListShards describes it.
#[derive(Debug, Clone)]
struct ShardInfo {
    id: String,
    start: u128,
    end: u128,
    open: bool,
    parents: Vec<String>,
}

fn shards(c: &AwsClients, stream: &str) -> Vec<ShardInfo> {
    rt().block_on(async {
        let out = c.kinesis.list_shards().stream_name(stream).send().await.expect("ListShards");
        let mut shards: Vec<ShardInfo> = out
            .shards()
            .iter()
            .map(|s| {
                let range = s.hash_key_range().expect("hash range");
                ShardInfo {
                    id: s.shard_id().to_owned(),
                    start: range.starting_hash_key().parse().expect("start"),
                    end: range.ending_hash_key().parse().expect("end"),
                    open: s
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_none(),
                    parents: s
                        .parent_shard_id()
                        .into_iter()
                        .chain(s.adjacent_parent_shard_id())
                        .map(str::to_owned)
                        .collect(),
                }
            })
            .collect();
        shards.sort_by_key(|s| (s.start, s.id.clone()));
        shards
    })
}

/// One lease item: key, owner, counter, checkpoint.
#[derive(Debug, Clone)]
struct LeaseRow {
    key: String,
    owner: Option<String>,
    counter: u64,
    checkpoint: String,
}

fn lease_rows(c: &AwsClients, table: &str) -> Vec<LeaseRow> {
    rt().block_on(async {
        let out = match c.dynamodb.scan().table_name(table).consistent_read(true).send().await {
            Ok(out) => out,
            // The first host has not created the table yet.
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                return Vec::new();
            }
            Err(e) => panic!("Scan: {e:?}"),
        };
        let s = |i: &HashMap<String, AttributeValue>, k: &str| {
            i.get(k).and_then(|v| v.as_s().ok()).cloned()
        };
        let mut rows: Vec<LeaseRow> = out
            .items()
            .iter()
            .map(|i| LeaseRow {
                key: s(i, "leaseKey").unwrap_or_default(),
                owner: s(i, "leaseOwner"),
                counter: i
                    .get("leaseCounter")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
                checkpoint: s(i, "checkpoint").unwrap_or_default(),
            })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        rows
    })
}

/// Orders checkpoints as positions in a shard: the start, then sequence numbers (decimal
/// strings longer than u128: by length, then digits), then `SHARD_END`.
fn position(checkpoint: &str) -> (u8, usize, String) {
    match checkpoint {
        "SHARD_END" => (2, 0, String::new()),
        cp if !cp.is_empty() && cp.bytes().all(|b| b.is_ascii_digit()) => {
            (1, cp.len(), cp.to_owned())
        }
        _ => (0, 0, String::new()),
    }
}

/// A running `kinesis-host run` logging to its own file; killed (after a SIGCONT, in case it
/// is stopped) when dropped, so no process outlives the test.
struct Host {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Host {
    fn start(name: &str, config: &Path, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(kinesis_host().get_program())
            .envs(kinesis_host().get_envs().filter_map(|(k, v)| Some((k, v?))))
            .args(["run", "--log", "info,kinesis_host_coordinator=debug"])
            .arg(guest("echo-task"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("kinesis-host starts");
        Host { child, name: name.to_owned(), log }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits (bounded by `deadline`) for the exit after a SIGTERM.
    fn wait_exit(&mut self, deadline: Instant, logs: &Logs) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop after SIGTERM{}",
                self.name,
                logs.tails()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The worker id the host writes as `leaseOwner`, from its "Starting." line.
    fn worker_id(&self, deadline: Instant, logs: &Logs) -> String {
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(id) =
                text.lines().filter(|l| l.contains("Starting.")).find_map(|l| field(l, "worker_id"))
            {
                return id;
            }
            assert!(Instant::now() < deadline, "{} never logged its worker id{}", self.name, {
                logs.tails()
            });
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The value of `name=...` in a log line, without quotes.
fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let value = rest.split(' ').next().unwrap_or_default();
    Some(value.trim_matches('"').to_owned())
}

/// The hosts' log files, for assertion messages.
#[derive(Default)]
struct Logs(Mutex<Vec<PathBuf>>);

impl Logs {
    fn add(&self, path: &Path) {
        self.0.lock().expect("logs").push(path.to_owned());
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.0.lock().expect("logs").clone()
    }

    /// The last lines of every host's log.
    fn tails(&self) -> String {
        let mut out = String::new();
        for path in self.paths() {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!("\n--- {} (last {} lines) ---\n", path.display(), tail.len()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// What the lease-table poller saw.
#[derive(Debug, Default)]
struct Observed {
    /// The furthest checkpoint seen per lease.
    furthest: BTreeMap<String, String>,
    /// The highest counter seen per lease.
    counters: BTreeMap<String, u64>,
    /// Every owner seen per lease.
    owners: BTreeMap<String, BTreeSet<String>>,
    /// Checkpoints or counters that went backwards.
    regressions: Vec<String>,
    scans: usize,
}

/// Scans the lease table every 200 ms until `stop`.
fn poll_leases(
    c: AwsClients,
    table: String,
    stop: Arc<AtomicBool>,
    observed: Arc<Mutex<Observed>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let rows = lease_rows(&c, &table);
            let mut o = observed.lock().expect("observed");
            o.scans += 1;
            for row in rows {
                if let Some(before) = o.furthest.get(&row.key)
                    && position(&row.checkpoint) < position(before)
                {
                    let msg = format!(
                        "{}: checkpoint went back from {before} to {} (owner {:?})",
                        row.key, row.checkpoint, row.owner
                    );
                    o.regressions.push(msg);
                }
                if o.furthest.get(&row.key).is_none_or(|b| position(&row.checkpoint) > position(b))
                {
                    o.furthest.insert(row.key.clone(), row.checkpoint.clone());
                }
                let counter = o.counters.entry(row.key.clone()).or_insert(0);
                if row.counter < *counter {
                    let msg = format!("{}: counter went back from {counter} to {}", row.key, {
                        row.counter
                    });
                    o.regressions.push(msg);
                } else {
                    *counter = row.counter;
                }
                if let Some(owner) = row.owner {
                    o.owners.entry(row.key).or_default().insert(owner);
                }
            }
            drop(o);
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// One record the producer put: key, data, and where Kinesis put it.
#[derive(Debug, Clone)]
struct Sent {
    key: String,
    data: String,
    shard: String,
}

/// Puts `KEYS` × `PER_KEY` records one at a time, paced, round-robin over the keys, so per-key
/// order is the put order.
fn produce(c: AwsClients, stream: String) -> std::thread::JoinHandle<Vec<Sent>> {
    std::thread::spawn(move || {
        let rt = rt();
        let mut sent = Vec::new();
        let start = Instant::now();
        for n in 0..PER_KEY {
            for k in 0..KEYS {
                let key = format!("key-{k:02}");
                let data = format!("{key} seq-{n:03}");
                let out = rt
                    .block_on(
                        c.kinesis
                            .put_record()
                            .stream_name(&stream)
                            .partition_key(&key)
                            .data(Blob::new(data.as_bytes()))
                            .send(),
                    )
                    .expect("PutRecord");
                sent.push(Sent { key, data, shard: out.shard_id().to_owned() });
                let next = start + PUT_EVERY * u32::try_from(sent.len()).expect("few records");
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
        sent
    })
}

/// Waits (bounded by `deadline`) until `ok` holds for the lease table.
fn wait_leases(
    c: &AwsClients,
    table: &str,
    deadline: Instant,
    logs: &Logs,
    what: &str,
    ok: impl Fn(&[LeaseRow]) -> bool,
) {
    loop {
        let rows = lease_rows(c, table);
        if ok(&rows) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: lease table {rows:#?}{}", logs.tails());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_log(log: &Path, pattern: &str, deadline: Instant, logs: &Logs) {
    loop {
        if std::fs::read_to_string(log).unwrap_or_default().contains(pattern) {
            return;
        }
        assert!(Instant::now() < deadline, "`{pattern}` not in {}{}", log.display(), logs.tails());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lease take from the logs: lease, new owner, previous owner ("-" when it had none).
#[derive(Debug)]
struct Take {
    lease: String,
    owner: String,
    previous: String,
}

fn takes(logs: &Logs) -> Vec<Take> {
    let mut out = Vec::new();
    for path in logs.paths() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("Took lease.")) {
            let get = |name: &str| field(line, name).unwrap_or_default();
            out.push(Take {
                lease: get("lease"),
                owner: get("owner"),
                previous: get("previous_owner"),
            });
        }
    }
    out
}

#[test]
fn three_hosts_survive_kill_pause_split_and_merge() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = ("chaos-in", "chaos-out");
    let table = "chaos-1-chaos-in";
    create_stream(&c, input, 8);
    create_stream(&c, output, 1);
    let config = job_properties(
        dir.path(),
        "chaos",
        input,
        output,
        &format!(
            "systems.kinesis.aws.kcl.FailoverTimeMillis={}\n\
             systems.kinesis.aws.kcl.MaxRecords={MAX_RECORDS}\n",
            FAILOVER.as_millis()
        ),
    );
    // Compile the component once before the clock starts (the hosts share the cache).
    let _ = guest("echo-task");
    let began = Instant::now();
    let deadline = began + SCENARIO_CAP;
    let logs = Logs::default();
    let step = |what: &str| eprintln!("chaos: {:>5.1}s {what}", began.elapsed().as_secs_f64());
    let start = |name: &str| {
        let host = Host::start(name, &config, dir.path());
        logs.add(&host.log);
        host
    };
    let mut a = start("a");
    let mut b = start("b");
    let mut c_host = start("c");
    let (id_a, id_b, id_c) = (
        a.worker_id(deadline, &logs),
        b.worker_id(deadline, &logs),
        c_host.worker_id(deadline, &logs),
    );

    let stop_poller = Arc::new(AtomicBool::new(false));
    let observed = Arc::new(Mutex::new(Observed::default()));
    let poller = poll_leases(clients(), table.to_owned(), stop_poller.clone(), observed.clone());

    // All eight leases owned, by all three hosts, before any record is written.
    wait_leases(&c, table, deadline, &logs, "three hosts share eight leases", |rows| {
        let owners: BTreeSet<&str> = rows.iter().filter_map(|r| r.owner.as_deref()).collect();
        rows.len() == 8 && rows.iter().all(|r| r.owner.is_some()) && owners.len() == 3
    });
    step("8 leases shared by 3 hosts; producing");
    let producer = produce(clients(), input.to_owned());
    let produce_began = Instant::now();
    let at = |secs: u64| {
        let when = produce_began + Duration::from_secs(secs);
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
    };
    let unfinished_owned_by = |rows: &[LeaseRow], id: &str| {
        rows.iter()
            .filter(|r| r.owner.as_deref() == Some(id) && r.checkpoint != "SHARD_END")
            .count()
    };

    // 1. SIGKILL host a (no release, no last checkpoint) and start it again; its leases expire
    //    after FailoverTimeMillis and go to the others.
    at(4);
    step("SIGKILL a");
    a.signal("KILL");
    let killed = a.wait_exit(deadline, &logs);
    assert!(!killed.success(), "{killed}");
    drop(a);
    let mut a2 = start("a2");
    wait_leases(&c, table, deadline, &logs, "the killed host's leases were taken", |rows| {
        unfinished_owned_by(rows, &id_a) == 0
    });

    // 2. Split the open shard with the lowest hash keys at its middle.
    step("a's leases taken");
    at(10);
    let before_split = shards(&c, input);
    let to_split = before_split.iter().find(|s| s.open).expect("an open shard").clone();
    rt().block_on(async {
        c.kinesis
            .split_shard()
            .stream_name(input)
            .shard_to_split(&to_split.id)
            .new_starting_hash_key((to_split.start / 2 + to_split.end / 2 + 1).to_string())
            .send()
            .await
            .expect("SplitShard");
    });
    wait_active(&c, input);
    step(&format!("split {}", to_split.id));

    // 3. SIGSTOP host b past FailoverTimeMillis, with leases held; resume it once the others
    //    took them all. Its writes must then be refused.
    at(15);
    wait_leases(&c, table, deadline, &logs, "host b holds a lease before its pause", |rows| {
        unfinished_owned_by(rows, &id_b) > 0
    });
    b.signal("STOP");
    step("SIGSTOP b");
    let paused = Instant::now();
    wait_leases(&c, table, deadline, &logs, "the paused host's leases were taken", |rows| {
        unfinished_owned_by(rows, &id_b) == 0
    });
    std::thread::sleep(
        (paused + FAILOVER + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    step("b's leases taken");
    b.signal("CONT");
    wait_for_log(&b.log, "Lost lease", deadline, &logs);
    step("SIGCONT b; b lost its leases");

    // 4. Merge the two adjacent open shards with the highest hash keys.
    at(24);
    let open: Vec<ShardInfo> = shards(&c, input).into_iter().filter(|s| s.open).collect();
    let (lower, upper) = (&open[open.len() - 2], &open[open.len() - 1]);
    assert_eq!(lower.end + 1, upper.start, "adjacent: {lower:?} {upper:?}");
    rt().block_on(async {
        c.kinesis
            .merge_shards()
            .stream_name(input)
            .shard_to_merge(&lower.id)
            .adjacent_shard_to_merge(&upper.id)
            .send()
            .await
            .expect("MergeShards");
    });
    wait_active(&c, input);
    step(&format!("merged {} and {}", lower.id, upper.id));

    let sent = producer.join().expect("the producer put every record");
    let produced_in = produce_began.elapsed();

    // Every record delivered at least once (bounded), then a graceful stop of every live host.
    let wanted: BTreeSet<(String, String)> =
        sent.iter().map(|s| (s.key.clone(), s.data.clone())).collect();
    loop {
        let got: BTreeSet<(String, String)> = read_all(&c, output).into_iter().collect();
        let missing = wanted.difference(&got).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} records never reached {output}{}",
            wanted.len(),
            logs.tails()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    step("every record delivered; SIGTERM a2, b, c");
    for host in [&a2, &b, &c_host] {
        host.signal("TERM");
    }
    for host in [&mut a2, &mut b, &mut c_host] {
        let status = host.wait_exit(deadline, &logs);
        assert!(status.success(), "{} exited with {status}{}", host.name, logs.tails());
    }
    let scenario = began.elapsed();
    stop_poller.store(true, Ordering::SeqCst);
    poller.join().expect("the poller ran");
    assert!(scenario < SCENARIO_CAP, "the scenario took {scenario:?}");
    let observed = observed.lock().expect("observed");
    let id_a2 = a2.worker_id(deadline, &logs);
    eprintln!(
        "chaos: scenario {scenario:?} (producer {produced_in:?}), {} records, {} lease scans; \
         hosts a={id_a} a2={id_a2} b={id_b} c={id_c}",
        sent.len(),
        observed.scans
    );

    // 1. Every record processed at least once, and nothing that was not sent.
    let got = read_all(&c, output);
    let mut copies: BTreeMap<(String, String), usize> = BTreeMap::new();
    for record in &got {
        *copies.entry(record.clone()).or_default() += 1;
    }
    let unknown: Vec<_> = copies.keys().filter(|r| !wanted.contains(*r)).collect();
    assert!(unknown.is_empty(), "records never sent: {unknown:?}");
    let missing: Vec<_> = wanted.iter().filter(|r| !copies.contains_key(*r)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}{}", logs.tails());

    // 2. Per partition key, first deliveries in put order (the output has one shard, so its
    //    order is the delivery order).
    let mut firsts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (key, data) in &got {
        if seen.insert((key, data)) {
            firsts.entry(key).or_default().push(data);
        }
    }
    for (key, delivered) in &firsts {
        let put: Vec<&str> =
            sent.iter().filter(|s| s.key == *key).map(|s| s.data.as_str()).collect();
        assert_eq!(delivered, &put, "first deliveries of {key} out of put order");
    }

    // 3. Duplicates only on shards whose lease moved from one live-or-dead owner to another,
    //    at most one read (MaxRecords) per move: a checkpoint follows every read, so a move
    //    repeats at most the one read its previous owner delivered but had not checkpointed.
    let takes = takes(&logs);
    let mut moves: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &takes {
        // A take from an owner (itself included: a host that let its lease expire restarts
        // the shard from the checkpoint) may repeat that owner's unrecorded read.
        if t.previous != "-" {
            *moves.entry(t.lease.as_str()).or_default() += 1;
        }
    }
    let shard_of: HashMap<(&str, &str), &str> =
        sent.iter().map(|s| ((s.key.as_str(), s.data.as_str()), s.shard.as_str())).collect();
    let mut duplicates: BTreeMap<&str, usize> = BTreeMap::new();
    for ((key, data), n) in &copies {
        if *n > 1 {
            *duplicates.entry(shard_of[&(key.as_str(), data.as_str())]).or_default() += n - 1;
        }
    }
    let mut takes_by_owner: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &takes {
        *takes_by_owner.entry(t.owner.as_str()).or_default() += 1;
    }
    let total_moves: usize = moves.values().sum();
    let total_duplicates: usize = duplicates.values().sum();
    eprintln!(
        "chaos: {} deliveries, {total_duplicates} duplicates {duplicates:?}; {} takes, \
         {total_moves} moves {moves:?}; takes by owner {takes_by_owner:?}",
        got.len(),
        takes.len()
    );
    for (id, what) in [(&id_a, "killed"), (&id_b, "paused")] {
        assert!(
            takes.iter().any(|t| &t.previous == id && &t.owner != id),
            "no lease of the {what} host {id} was taken over: {takes:#?}{}",
            logs.tails()
        );
    }
    for (shard, n) in &duplicates {
        let m = moves.get(shard).copied().unwrap_or(0);
        assert!(
            *n <= m * MAX_RECORDS,
            "{shard}: {n} duplicate deliveries but {m} lease moves (at most {MAX_RECORDS} \
             each){}",
            logs.tails()
        );
    }

    // 4. No write by a host without the lease: no checkpoint (or counter) ever went back, and
    //    the paused host was refused when it resumed.
    assert!(observed.scans >= 20, "the lease table was polled {} times", observed.scans);
    assert!(observed.regressions.is_empty(), "{:#?}{}", observed.regressions, logs.tails());
    let b_log = std::fs::read_to_string(&b.log).unwrap_or_default();
    assert!(b_log.contains("Lost lease"), "the paused host kept its leases{}", logs.tails());
    eprintln!(
        "chaos: b's refusals: {} `Lost lease` lines, {} of them `cannot checkpoint`",
        b_log.matches("Lost lease").count(),
        b_log.matches("cannot checkpoint").count()
    );
    // Per host and shard: once a host lost a lease (stolen, or expired while it was paused),
    // it writes no checkpoint of that shard until it has taken the lease again.
    for path in logs.paths() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lost: BTreeSet<String> = BTreeSet::new();
        for line in text.lines() {
            if line.contains("Lost lease") {
                if let Some(shard) = field(line, "lease").or_else(|| field(line, "shard")) {
                    lost.insert(shard);
                }
            } else if line.contains("Took lease.") {
                if let Some(shard) = field(line, "lease") {
                    lost.remove(&shard);
                }
            } else if line.contains("Checkpointed.")
                && let Some(shard) = field(line, "shard")
            {
                assert!(
                    !lost.contains(&shard),
                    "{} checkpointed {shard} after losing its lease, without taking it again{}",
                    path.display(),
                    logs.tails()
                );
            }
        }
    }

    // 5. Every shard owned and finished: each open shard's lease exists, was owned during the
    //    run and is released after the graceful stops; each closed shard reached SHARD_END (its
    //    lease says so, or it was deleted once its children started).
    let final_rows = lease_rows(&c, table);
    let row = |key: &str| final_rows.iter().find(|r| r.key == key);
    let all_logs: String =
        logs.paths().iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect();
    let stream_shards = shards(&c, input);
    assert_eq!(stream_shards.len(), 8 + 2 + 1, "{stream_shards:?}");
    for shard in &stream_shards {
        let taken = takes.iter().any(|t| t.lease == shard.id)
            || observed.owners.get(&shard.id).is_some_and(|o| !o.is_empty());
        assert!(taken, "{} was never owned{}", shard.id, logs.tails());
        if shard.open {
            let r = row(&shard.id)
                .unwrap_or_else(|| panic!("no lease for open shard {}: {final_rows:#?}", shard.id));
            assert_ne!(r.checkpoint, "SHARD_END", "{r:?}");
            assert!(r.owner.is_none(), "released at the graceful stop: {r:?}");
        } else {
            let finished = row(&shard.id).map(|r| r.checkpoint.as_str()) == Some("SHARD_END")
                || observed.furthest.get(&shard.id).map(String::as_str) == Some("SHARD_END")
                || all_logs.lines().any(|l| {
                    l.contains("Shard finished (SHARD_END).")
                        && field(l, "shard").as_deref() == Some(shard.id.as_str())
                });
            assert!(finished, "closed shard {} never reached SHARD_END{}", shard.id, logs.tails());
            if row(&shard.id).is_none() {
                // Deleted: only once every child started.
                for child in stream_shards.iter().filter(|s| s.parents.contains(&shard.id)) {
                    let r = row(&child.id).unwrap_or_else(|| panic!("no lease for {}", child.id));
                    assert_ne!(position(&r.checkpoint).0, 0, "{} deleted early: {r:?}", shard.id);
                }
            }
        }
    }
}
