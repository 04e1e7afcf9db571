//! `kinesis-host serve` end to end against kinesis-local and dynalite: several tenants in one
//! host, where the hostile ones (an endless loop, a memory bomb, panics, an emit flood, a log
//! flood, a sandbox prober) cannot keep the well-behaved ones from processing every record
//! exactly once; and jobs added, rejected, fixed, replaced, removed, failed and retried on
//! SIGHUP while the host runs; and `/readyz` following the jobs that run.

#[path = "common/aws.rs"]
mod aws;
mod common;
#[path = "common/emulators.rs"]
mod emulators;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws::*;
use common::{free_address, guest, kinesis_host, sample};

/// A running `kinesis-host serve`, killed if the test fails.
struct Serve {
    child: Child,
    log: PathBuf,
    address: String,
}

impl Serve {
    fn start(jobs: &Path, log: &Path) -> Self {
        let address = free_address();
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(kinesis_host().get_program())
            .envs(kinesis_host().get_envs().filter_map(|(k, v)| Some((k, v?))))
            .args(["serve", "--log", "info", "--debounce-ms", "200", "--jobs"])
            .arg(jobs)
            .args(["--metrics-address", &address])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("kinesis-host serve starts");
        let serve = Serve { child, log: log.to_owned(), address };
        serve.wait_until(|s| s.try_get("/healthz").is_some_and(|(code, _)| code == 200), "up");
        serve
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `done` holds.
    fn wait_until(&self, mut done: impl FnMut(&Self) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "not {what} in time; host log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn try_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.address).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }

    fn assert_healthy(&self) {
        let (code, body) = self.try_get("/healthz").expect("/healthz answers");
        assert_eq!((code, body.trim()), (200, "ok"), "host log:\n{}", self.log_text());
    }

    fn metrics(&self) -> String {
        self.try_get("/metrics").map(|(_, body)| body).unwrap_or_default()
    }

    /// Waits until `pattern` is in the log `n` times.
    fn wait_for_log(&self, pattern: &str, n: usize) {
        self.wait_until(|s| s.log_text().matches(pattern).count() >= n, pattern);
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let log = self.log_text();
                assert!(status.success(), "exit {status}; log:\n{log}");
                assert!(!log.lines().any(|l| l.starts_with("thread '")), "panicked:\n{log}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop within 60 s of SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates job folder `name` under `jobs` atomically (written aside, then renamed into place),
/// with guest `task` and job.properties reading `input` and writing `output`.
fn add_job(jobs: &Path, name: &str, task: &str, input: &str, output: &str, extra: &str) {
    let staging = jobs.join(format!(".staging-{name}"));
    std::fs::create_dir_all(&staging).expect("staging folder");
    job_properties(&staging, name, input, output, extra);
    std::fs::copy(guest(task), staging.join("task.wasm")).expect("copy the component");
    std::fs::rename(&staging, jobs.join(name)).expect("move the job into place");
}

/// Replaces the component of job folder `name` atomically.
fn replace_wasm(jobs: &Path, name: &str, task: &str) {
    let aside = jobs.join(name).join("task.wasm.new");
    std::fs::copy(guest(task), &aside).expect("copy the component");
    std::fs::rename(&aside, jobs.join(name).join("task.wasm")).expect("replace the component");
}

/// Asserts that `got` holds exactly the records `sent`, each once.
fn assert_exactly_once(got: &[(String, String)], sent: &[(String, String)], what: &str) {
    let mut got_sorted = got.to_vec();
    got_sorted.sort();
    let mut sent_sorted = sent.to_vec();
    sent_sorted.sort();
    assert_eq!(got_sorted, sent_sorted, "{what}: not every record exactly once");
}

/// Each lease's owner in `table`.
fn owners(c: &kinesis_host_coordinator::aws::AwsClients, table: &str) -> Vec<String> {
    lease_items(c, table)
        .iter()
        .filter_map(|i| i.get("leaseOwner").and_then(|v| v.as_s().ok()).cloned())
        .collect()
}

#[test]
fn hostile_tenants_cannot_hurt_the_well_behaved_ones() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).expect("jobs folder");
    let (in_a, out_a) = ("serve-h-in-a", "serve-h-out-a");
    let (shared, out_b, out_hostile) = ("serve-h-shared", "serve-h-out-b", "serve-h-out-hostile");
    create_stream(&c, in_a, 2);
    create_stream(&c, out_a, 1);
    create_stream(&c, shared, 1);
    create_stream(&c, out_b, 1);
    create_stream(&c, out_hostile, 1);
    let sent_a = numbered(4, 10, 0);
    put(&c, in_a, &sent_a);
    // The shared stream is read by a well-behaved job and by every hostile one (each with its
    // own lease table); its `spin` and `bomb` records set off the loop and the memory bomb.
    let mut sent_shared = numbered(3, 10, 0);
    sent_shared.insert(7, ("key-x".into(), "spin".into()));
    sent_shared.insert(14, ("key-x".into(), "bomb".into()));
    put(&c, shared, &sent_shared);

    add_job(&jobs, "echo-a", "echo-task", in_a, out_a, "");
    add_job(&jobs, "echo-b", "echo-task", shared, out_b, "");
    let quick = "task.retry.max.attempts=3\ntask.retry.backoff.max.ms=500\n";
    add_job(
        &jobs,
        "spin",
        "spin-task",
        shared,
        out_hostile,
        &format!("task.limits.batch.timeout.ms=500\n{quick}"),
    );
    // The same loop under a fuel budget (a second engine, which meters fuel) traps on fuel.
    add_job(
        &jobs,
        "spin-fuel",
        "spin-task",
        shared,
        out_hostile,
        &format!("task.limits.fuel.per.batch=20000000\n{quick}"),
    );
    add_job(
        &jobs,
        "bomb",
        "memory-bomb-task",
        shared,
        out_hostile,
        &format!("task.limits.memory.bytes=16777216\n{quick}"),
    );
    add_job(&jobs, "panic", "panic-task", shared, out_hostile, "task.config.panic_every=1\n");
    add_job(
        &jobs,
        "flood",
        "emit-flood-task",
        shared,
        out_hostile,
        "task.limits.emits.per.batch=20\n",
    );
    add_job(&jobs, "logs", "log-flood-task", shared, out_hostile, "");
    add_job(&jobs, "sneaky", "sneaky-task", shared, out_hostile, "");

    let log = dir.path().join("serve.log");
    let serve = Serve::start(&jobs, &log);

    // The well-behaved jobs get all their records while the others misbehave.
    let got_a = wait_for_records(&c, out_a, sent_a.len(), &log);
    let got_b = wait_for_records(&c, out_b, sent_shared.len(), &log);
    serve.assert_healthy();
    // Every kind of misbehaviour happened, was contained and is on the job's own metrics.
    serve.wait_until(
        |s| {
            let m = s.metrics();
            sample(&m, "kinesis_host_task_traps_total", &[("job", "spin"), ("trap", "deadline")])
                .is_some()
                && sample(
                    &m,
                    "kinesis_host_task_traps_total",
                    &[("job", "bomb"), ("trap", "memory_limit")],
                )
                .is_some()
                && sample(
                    &m,
                    "kinesis_host_task_traps_total",
                    &[("job", "panic"), ("trap", "panic")],
                )
                .is_some()
                && sample(
                    &m,
                    "kinesis_host_task_cpu_penalty_microseconds_total",
                    &[("job", "spin")],
                )
                .is_some_and(|v| v > 0.0)
        },
        "every hostile job seen trapping",
    );
    serve.wait_for_log("emit refused after 20 records", 1);
    serve.wait_for_log("Dropped", 1);
    let m = serve.metrics();
    assert!(
        sample(&m, "kinesis_host_records_processed_total", &[("job", "echo-a"), ("stream", in_a)])
            .is_some_and(|v| v >= sent_a.len() as f64),
        "{m}"
    );
    // The prober saw no environment, no files and no network.
    let probes: Vec<String> = read_all(&c, out_hostile)
        .into_iter()
        .filter(|(k, _)| k == "probe")
        .map(|(_, d)| d)
        .collect();
    for expected in ["env=0", "args=0", "read_etc_passwd=err", "read_dir_root=err", "tcp=err"] {
        assert!(probes.iter().any(|p| p == expected), "no probe {expected} in {probes:?}");
    }
    // (`cwd=ok`: WASI reports `/` as the current folder of an empty context, which opens nothing.)
    assert!(
        !probes.iter().any(|p| p.ends_with("=ok") && !p.starts_with("cwd=")),
        "the sandbox leaked: {probes:?}"
    );
    serve.assert_healthy();
    // No hostile job's failure stopped the host or another job.
    assert!(!serve.log_text().contains("Job failed"), "{}", serve.log_text());
    serve.stop();

    // After the stop, still exactly once: nothing was processed twice.
    assert_exactly_once(&read_all(&c, out_a), &sent_a, "echo-a");
    assert_exactly_once(&read_all(&c, out_b), &sent_shared, "echo-b");
    assert_eq!(got_a.len(), sent_a.len());
    assert_eq!(got_b.len(), sent_shared.len());
    for table in ["echo-a-1-serve-h-in-a", "echo-b-1-serve-h-shared", "spin-1-serve-h-shared"] {
        for item in lease_items(&c, table) {
            assert!(!item.contains_key("leaseOwner"), "{table}: not released: {item:?}");
        }
    }
}

#[test]
fn jobs_are_added_rejected_fixed_replaced_removed_and_retried_while_serving() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).expect("jobs folder");
    let (in_a, out_a) = ("serve-c-in-a", "serve-c-out-a");
    let (in_b, out_b) = ("serve-c-in-b", "serve-c-out-b");
    for (stream, shards) in [(in_a, 2), (out_a, 1), (in_b, 1), (out_b, 1)] {
        create_stream(&c, stream, shards);
    }
    let log = dir.path().join("serve.log");
    let serve = Serve::start(&jobs, &log);

    // An invalid job is reported and the host keeps serving.
    add_job(&jobs, "beta", "echo-task", in_b, out_b, "task.limits.memory.bytes=lots\n");
    serve.wait_for_log("Job files rejected", 1);
    serve.wait_until(
        |s| sample(&s.metrics(), "kinesis_host_serve_jobs", &[("state", "invalid")]) == Some(1.0),
        "the invalid job counted",
    );
    serve.assert_healthy();

    // Adding a job starts it.
    add_job(&jobs, "alpha", "echo-task", in_a, out_a, "");
    let first = numbered(4, 5, 0);
    put(&c, in_a, &first);
    wait_for_records(&c, out_a, first.len(), &log);
    let table_a = "alpha-1-serve-c-in-a";
    let owners_before = owners(&c, table_a);
    assert_eq!(owners_before.len(), 2, "alpha holds both leases");

    // Fixing the invalid job starts it.
    job_properties(&jobs.join("beta"), "beta", in_b, out_b, "");
    let sent_b = numbered(2, 5, 0);
    put(&c, in_b, &sent_b);
    wait_for_records(&c, out_b, sent_b.len(), &log);

    // Replacing alpha's component: the old version drains, checkpoints and releases; the new
    // one resumes after the checkpoint. Records written before, during and after the swap each
    // arrive once.
    replace_wasm(&jobs, "alpha", "spin-task");
    let second = numbered(4, 5, 5);
    put(&c, in_a, &second);
    serve.wait_for_log("Job changed", 1);
    serve.wait_for_log("Starting job.", 3);
    let third = numbered(4, 5, 10);
    put(&c, in_a, &third);
    let all: Vec<_> = first.iter().chain(&second).chain(&third).cloned().collect();
    wait_for_records(&c, out_a, all.len(), &log);
    serve.wait_until(
        |_| {
            let now = owners(&c, table_a);
            now.len() == 2 && now.iter().all(|o| !owners_before.contains(o))
        },
        "the new version holding alpha's leases",
    );
    assert_exactly_once(&read_all(&c, out_a), &all, "alpha across the swap");

    // Removing a job stops it and releases its leases; the other job goes on.
    std::fs::remove_dir_all(jobs.join("alpha")).expect("remove alpha");
    serve.wait_for_log("Job folder removed", 1);
    serve.wait_until(|_| owners(&c, table_a).is_empty(), "alpha's leases released");
    let more_b = numbered(2, 5, 5);
    put(&c, in_b, &more_b);
    wait_for_records(&c, out_b, sent_b.len() + more_b.len(), &log);
    serve.assert_healthy();

    // A job that fails (its input stream does not exist yet) is reported alone; SIGHUP retries
    // it once the stream is there.
    let (in_g, out_g) = ("serve-c-in-g", "serve-c-out-g");
    add_job(&jobs, "gamma", "echo-task", in_g, out_g, "");
    serve.wait_for_log("Job failed", 1);
    serve.wait_until(
        |s| sample(&s.metrics(), "kinesis_host_serve_jobs", &[("state", "failed")]) == Some(1.0),
        "the failed job counted",
    );
    serve.assert_healthy();
    create_stream(&c, in_g, 1);
    create_stream(&c, out_g, 1);
    let sent_g = numbered(2, 3, 0);
    put(&c, in_g, &sent_g);
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    serve.wait_for_log("Reloading the jobs folder (SIGHUP)", 1);
    wait_for_records(&c, out_g, sent_g.len(), &log);
    serve.stop();

    assert_exactly_once(&read_all(&c, out_g), &sent_g, "gamma after SIGHUP");
    assert_exactly_once(&read_all(&c, out_a), &all, "alpha after the stop");
    let all_b: Vec<_> = sent_b.iter().chain(&more_b).cloned().collect();
    assert_exactly_once(&read_all(&c, out_b), &all_b, "beta");
    assert!(owners(&c, "beta-1-serve-c-in-b").is_empty(), "beta released on SIGTERM");
}

#[test]
fn ready_once_every_valid_job_runs_whatever_the_invalid_ones() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).expect("jobs folder");
    let (in_s, out_s) = ("serve-r-in-steady", "serve-r-out-steady");
    let (in_l, out_l) = ("serve-r-in-late", "serve-r-out-late");
    for stream in [in_s, out_s] {
        create_stream(&c, stream, 1);
    }
    add_job(&jobs, "steady", "echo-task", in_s, out_s, "");
    // Its input stream does not exist yet: the job fails, and waits for SIGHUP.
    add_job(&jobs, "late", "echo-task", in_l, out_l, "");
    // Rejected files: reported, never a reason to be unready.
    add_job(&jobs, "broken", "echo-task", in_s, out_s, "task.limits.memory.bytes=lots\n");
    let log = dir.path().join("serve.log");
    let serve = Serve::start(&jobs, &log);

    // While "late" cannot run the host is not ready, whatever the moment; once "steady" runs,
    // "late" is the only reason given.
    let late_only = |s: &Serve| {
        let (code, body) = s.try_get("/readyz").expect("/readyz answers");
        assert_eq!(code, 503, "ready while a job cannot run: {body}");
        assert!(!body.contains("broken"), "the invalid job counted: {body}");
        body.lines().count() == 1 && body.starts_with("job \"late\" (folder late): failed ")
    };
    serve.wait_until(late_only, "only the failed job named by /readyz");
    let (_, body) = serve.try_get("/readyz").expect("/readyz answers");
    assert!(body.contains(in_l), "the failure names the missing stream: {body}");
    assert!(serve.log_text().contains("Job files rejected"), "{}", serve.log_text());
    serve.assert_healthy();

    // Once its stream exists, SIGHUP retries it, and the host becomes ready.
    create_stream(&c, in_l, 1);
    create_stream(&c, out_l, 1);
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    let mut last = None;
    serve.wait_until(
        |s| {
            let answer = s.try_get("/readyz");
            if answer != last {
                eprintln!("/readyz: {answer:?}");
                last = answer.clone();
            }
            answer == Some((200, "ready\n".to_owned()))
        },
        "ready",
    );
    serve.assert_healthy();
    let sent = numbered(2, 3, 0);
    put(&c, in_l, &sent);
    wait_for_records(&c, out_l, sent.len(), &log);
    serve.stop();
}

#[test]
fn a_slow_drain_holds_up_no_other_job() {
    let c = clients();
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).expect("jobs folder");
    let (in_s, out_s) = ("serve-d-in-slow", "serve-d-out-slow");
    let (in_o, out_o) = ("serve-d-in-other", "serve-d-out-other");
    for stream in [in_s, out_s, in_o, out_o] {
        create_stream(&c, stream, 1);
    }
    // A batch that spins until its 30 s CPU deadline: stopping this job takes that long, since
    // a graceful stop lets the batch in flight finish.
    add_job(&jobs, "slow", "spin-task", in_s, out_s, "task.limits.batch.timeout.ms=30000\n");
    let log = dir.path().join("serve.log");
    let serve = Serve::start(&jobs, &log);
    put(&c, in_s, &[("k".to_owned(), "spin".to_owned())]);
    serve.wait_for_log("spinning", 1);

    std::fs::remove_dir_all(jobs.join("slow")).expect("remove the slow job");
    serve.wait_for_log("Job folder removed", 1);
    // While it drains, a job added later starts and processes its records.
    add_job(&jobs, "other", "echo-task", in_o, out_o, "");
    let sent = numbered(2, 3, 0);
    put(&c, in_o, &sent);
    wait_for_records(&c, out_o, sent.len(), &log);
    let text = serve.log_text();
    assert!(
        !text.contains("Job stopped."),
        "the other job waited for the slow one to drain; host log:\n{text}"
    );
    serve.wait_for_log("Job stopped.", 1);
    serve.stop();
    assert_exactly_once(&read_all(&c, out_o), &sent, "the job added during the drain");
}
