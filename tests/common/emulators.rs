//! Local Kinesis and DynamoDB emulators for integration tests: one pair per test process.
//!
//! Include it from a test file with
//!
//! ```ignore
//! #[path = "common/emulators.rs"]
//! mod emulators;
//! ```
//!
//! and call [`emulators()`] wherever a test needs AWS endpoints. The first call runs
//! `scripts/emulators.sh start --watch-pid <this process> --dir <target>/emulators/<pid>`, which
//! installs the pinned npm packages into `.local/emulators` when needed, starts kinesis-local
//! (Kinesis) and dynalite (DynamoDB) on free ports of 127.0.0.1 and waits until both answer.
//! Later calls return the same pair. Because of `--watch-pid`, the emulators exit by themselves
//! within about a second after the test process ends, however it ends (even if it is killed), so
//! nothing leaks. Their logs stay in `<target>/emulators/<pid>/` (folders of processes that have
//! gone are removed the next time a test process starts emulators).
//!
//! Tests share the pair, so each test should use its own stream and table names.
//! Clients need static credentials (any values) and region `us-east-1`; the emulators do not
//! check signatures. Streams and tables become ACTIVE after about 100 ms.
//!
//! To reuse emulators that are already running (for example while iterating on one test), start
//! them once with `scripts/emulators.sh start` and set both
//! `KINESIS_HOST_TEST_KINESIS_ENDPOINT` and `KINESIS_HOST_TEST_DYNAMODB_ENDPOINT` to the printed
//! endpoints; nothing is started then.
//!
//! If the emulators cannot start (no node/npm, no network for the first install, ...), the
//! calling test panics with the script's output: tests fail rather than skip.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Environment variable that, together with [`DYNAMODB_ENDPOINT_VAR`], selects running emulators.
pub const KINESIS_ENDPOINT_VAR: &str = "KINESIS_HOST_TEST_KINESIS_ENDPOINT";
/// Environment variable that, together with [`KINESIS_ENDPOINT_VAR`], selects running emulators.
pub const DYNAMODB_ENDPOINT_VAR: &str = "KINESIS_HOST_TEST_DYNAMODB_ENDPOINT";

/// Endpoints of a running Kinesis emulator and DynamoDB emulator (plain HTTP on 127.0.0.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulators {
    /// For example `http://127.0.0.1:40123`.
    pub kinesis_endpoint: String,
    /// For example `http://127.0.0.1:40125`.
    pub dynamodb_endpoint: String,
}

/// The emulators of this test process, started on first use (see the module documentation).
///
/// # Panics
///
/// If the emulators cannot be started, with the start script's output; or if only one of the two
/// endpoint environment variables is set.
pub fn emulators() -> &'static Emulators {
    static EMULATORS: OnceLock<Emulators> = OnceLock::new();
    EMULATORS.get_or_init(|| from_environment().unwrap_or_else(start))
}

/// The endpoints from the environment, when a developer set both.
fn from_environment() -> Option<Emulators> {
    let get = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
    match (get(KINESIS_ENDPOINT_VAR), get(DYNAMODB_ENDPOINT_VAR)) {
        (Some(kinesis_endpoint), Some(dynamodb_endpoint)) => Some(Emulators {
            kinesis_endpoint: kinesis_endpoint.trim().to_owned(),
            dynamodb_endpoint: dynamodb_endpoint.trim().to_owned(),
        }),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => panic!(
            "set both {KINESIS_ENDPOINT_VAR} and {DYNAMODB_ENDPOINT_VAR} to use running \
             emulators, or neither to start them for this test process"
        ),
    }
}

/// The repository's root: the nearest ancestor of this crate that holds the start script.
fn repository_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .find(|dir| dir.join("scripts/emulators.sh").is_file())
        .unwrap_or_else(|| panic!("no scripts/emulators.sh in {} or above", manifest_dir.display()))
        .to_path_buf()
}

/// A fresh folder for this process's emulator logs and pid files, kept after the process ends.
fn run_dir(root: &Path) -> PathBuf {
    let parent = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("emulators");
    remove_stale_run_dirs(&parent);
    let dir = parent.join(std::process::id().to_string());
    // A leftover of an earlier process with the same pid.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Removes the run folders of test processes that have exited (Linux only: it asks /proc).
fn remove_stale_run_dirs(parent: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs the start script and parses the endpoints it prints.
fn start() -> Emulators {
    let root = repository_root();
    let dir = run_dir(&root);
    let script = root.join("scripts/emulators.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("start")
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .arg("--dir")
        .arg(&dir)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failed = |why: &str| -> ! {
        panic!(
            "starting the Kinesis/DynamoDB emulators failed: {why}\n\
             command: bash {} start --watch-pid {} --dir {}\n\
             --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            script.display(),
            std::process::id(),
            dir.display(),
        )
    };
    if !output.status.success() {
        failed(&format!("the script exited with {}", output.status));
    }
    let endpoint = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .unwrap_or_else(|| failed(&format!("no {key}=... line in the script's output")))
    };
    Emulators {
        kinesis_endpoint: endpoint("KINESIS_ENDPOINT"),
        dynamodb_endpoint: endpoint("DYNAMODB_ENDPOINT"),
    }
}
