//! Shared helpers for the integration tests: guest components built once per test run, and the
//! `kinesis-host` binary.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Every guest component the tests use, by package name.
const GUESTS: &[&str] = &[
    "hello",
    "filter-route",
    "word-count",
    "echo-task",
    "spin-task",
    "memory-bomb-task",
    "panic-task",
    "emit-flood-task",
    "sneaky-task",
    "log-flood-task",
    "import-bomb-task",
    "forge-log-task",
    "partial-task",
    "policy-task",
    "not-a-task",
];

/// The workspace's root folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// The component of guest package `name`, building all guests once per test process into the
/// workspace's one target folder (a no-op when `scripts/test.sh` built them already).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target = target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace()).args([
            "build",
            "--quiet",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip2",
        ]);
        for guest in GUESTS {
            cmd.args(["-p", guest]);
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building the guest components failed: {status}");
        target.join("wasm32-wasip2/guest")
    });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "no component at {}", path.display());
    path
}

/// A `kinesis-host` command with a compiled-component cache private to the test run.
/// `KINESIS_HOST_BIN` overrides the binary (worktrees that share one target folder overwrite
/// each other's `target/debug/kinesis-host`).
pub fn kinesis_host() -> Command {
    let bin = std::env::var_os("KINESIS_HOST_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kinesis-host")), PathBuf::from);
    let mut cmd = Command::new(bin);
    cmd.env("KINESIS_HOST_CACHE_DIR", target_dir().join("test-cache"))
        .env_remove("RUST_LOG")
        .env_remove("KINESIS_HOST_LOG");
    cmd
}

/// A `kinesis-host replay --log warn` command: guest `task` on the records in `input`, with the
/// job.properties `config`.
pub fn replay(task: &str, input: &Path, config: &Path) -> Command {
    let mut cmd = kinesis_host();
    cmd.args(["replay", "--log", "warn"])
        .arg(guest(task))
        .arg("--input")
        .arg(input)
        .arg("--config")
        .arg(config);
    cmd
}

/// Runs `cmd` and returns its output, with stdout and stderr as text.
pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let output = cmd.output().expect("kinesis-host runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    // A host panic starts a line; a guest's panic arrives inside a tagged log line.
    assert!(!stderr.lines().any(|l| l.starts_with("thread '")), "kinesis-host panicked:\n{stderr}");
    (output, stdout, stderr)
}

/// Writes `text` to a fresh file in a temporary folder and returns both.
pub fn file_with(name: &str, text: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write temporary file");
    (dir, path)
}

/// A free port of 127.0.0.1, as `127.0.0.1:PORT` (for a host's `metrics.address`).
pub fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// One HTTP/1.0 `GET` of `path` from a host's `metrics.address`: status code, head and body.
pub fn http_get(address: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connect to metrics.address");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, head.to_owned(), body.to_owned())
}

/// The values of the samples of `name` whose labels include `labels`, in a Prometheus exposition.
pub fn samples<'a>(
    exposition: &'a str,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = f64> + 'a {
    exposition.lines().filter_map(move |line| {
        let (set, value) = line.strip_prefix(name)?.strip_prefix('{')?.split_once("} ")?;
        let has = |(k, v): &(&str, &str)| set.split(',').any(|l| l == format!("{k}=\"{v}\""));
        labels.iter().all(has).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The value of the first sample of `name` whose labels include `labels`.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(exposition, name, labels).next()
}
