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
