//! Building and finding the benchmark's guest components.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The guest packages, with the file name cargo gives each component.
pub const GUESTS: [(&str, &str); 2] =
    [("bench-batch", "bench_batch.wasm"), ("bench-naive", "bench_naive.wasm")];

/// The built guest components.
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// `bench-batch`: the SDK task, for our batch path.
    pub batch: PathBuf,
    /// `bench-naive`: the `list<envelope>` component.
    pub naive: PathBuf,
}

/// The workspace root: the parent of this package's directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the workspace root, where
/// the guest build runs), else `target/` in the workspace root.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Builds both guests with the `guest` profile for `wasm32-wasip2` and returns their paths.
///
/// # Errors
/// When cargo cannot be run or fails, or a component is missing after the build.
pub fn build(root: &Path) -> Result<GuestPaths> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(root)
        .args(["build", "--profile", "guest", "--target", "wasm32-wasip2"])
        .args(GUESTS.iter().flat_map(|(package, _)| ["-p", package]));
    eprintln!("Building the guests: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {} to build the guests", cargo.to_string_lossy()))?;
    if !status.success() {
        bail!(
            "building the guests failed ({status}); is the target installed? \
             `rustup target add wasm32-wasip2`"
        );
    }
    let dir = target_dir(root).join("wasm32-wasip2").join("guest");
    let find = |file: &str| -> Result<PathBuf> {
        let path = dir.join(file);
        if path.is_file() {
            Ok(path)
        } else {
            bail!("the guest build succeeded but {} is missing", path.display())
        }
    };
    Ok(GuestPaths { batch: find(GUESTS[0].1)?, naive: find(GUESTS[1].1)? })
}
