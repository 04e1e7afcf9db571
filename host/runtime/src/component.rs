//! Loading, checking and caching task components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, types::ComponentItem};

use crate::RuntimeInner;
use crate::bindings::KinesisTaskPre;
use crate::error::LoadError;
use crate::host::HostState;

/// The instance every task exports.
pub const TASK_INTERFACE: &str = "kinesis:task/task@0.1.0";
/// The functions of [`TASK_INTERFACE`].
pub const TASK_FUNCTIONS: [&str; 3] = ["init", "process", "shutdown"];

/// What a component imports and exports, and how it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentReport {
    /// Imported instances and functions, by name.
    pub imports: Vec<String>,
    /// Exported instances and functions, by name.
    pub exports: Vec<String>,
    /// Size of the `.wasm` file.
    pub size: usize,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
}

/// A compiled, linked and type-checked task, ready to instantiate cheaply (one per shard).
pub struct TaskComponent {
    runtime: Arc<RuntimeInner>,
    pre: KinesisTaskPre<HostState>,
    path: PathBuf,
    report: ComponentReport,
}

impl std::fmt::Debug for TaskComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskComponent")
            .field("path", &self.path)
            .field("report", &self.report)
            .finish()
    }
}

impl TaskComponent {
    pub(crate) fn load(runtime: Arc<RuntimeInner>, path: &Path) -> Result<Self, LoadError> {
        let bytes = crate::files::read_regular_file(path, crate::files::MAX_COMPONENT_BYTES)
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        check_header(path, &bytes)?;
        let (component, from_cache) = compile_cached(&runtime, path, &bytes)?;
        let engine = &runtime.engine;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(name, _)| name.to_owned()).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_owned()).collect();
        check_exports(path, engine, &ty, &exports)?;
        let pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Link { path: path.to_owned(), source: e.to_string().into() })?;
        let pre = KinesisTaskPre::new(pre).map_err(|e| LoadError::Mismatch {
            path: path.to_owned(),
            source: e.to_string().into(),
        })?;
        let report = ComponentReport { imports, exports, size: bytes.len(), from_cache };
        Ok(Self { runtime, pre, path: path.to_owned(), report })
    }

    /// The file the component came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the component imports and exports.
    pub fn report(&self) -> &ComponentReport {
        &self.report
    }

    pub(crate) fn runtime(&self) -> &RuntimeInner {
        &self.runtime
    }

    pub(crate) fn pre(&self) -> &KinesisTaskPre<HostState> {
        &self.pre
    }
}

fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.get(..4) != Some(b"\0asm") {
        return Err(LoadError::NotWasm { path: path.to_owned() });
    }
    // Bytes 4..8: version 1 with layer 0 is a core module; a component has layer 1.
    match bytes.get(6..8) {
        Some([1, 0]) => Ok(()),
        _ => Err(LoadError::CoreModule { path: path.to_owned() }),
    }
}

fn check_exports(
    path: &Path,
    engine: &wasmtime::Engine,
    ty: &wasmtime::component::types::Component,
    exports: &[String],
) -> Result<(), LoadError> {
    let missing = |missing: String| LoadError::MissingExport {
        path: path.to_owned(),
        missing,
        exports: exports.join(", "),
    };
    let Some(ComponentItem::ComponentInstance(instance)) =
        ty.get_export(engine, TASK_INTERFACE).map(|e| e.ty)
    else {
        return Err(missing(format!("the interface {TASK_INTERFACE}")));
    };
    let functions: Vec<&str> = instance.exports(engine).map(|(name, _)| name).collect();
    let absent: Vec<String> = TASK_FUNCTIONS
        .iter()
        .filter(|f| !functions.contains(f))
        .map(|f| format!("{TASK_INTERFACE}#{f}"))
        .collect();
    if absent.is_empty() { Ok(()) } else { Err(missing(absent.join(" and "))) }
}

/// Feeds `Hash` output into SHA-256, so that the engine's compatibility hash gives a cache key
/// that is stable across processes and Rust versions.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0 // unused: the digest is read from the inner hasher
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn cache_key(engine: &wasmtime::Engine, bytes: &[u8]) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    hasher.write(bytes);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn compile_cached(
    runtime: &RuntimeInner,
    path: &Path,
    bytes: &[u8],
) -> Result<(Component, bool), LoadError> {
    let engine = &runtime.engine;
    let compile = || {
        Component::new(engine, bytes).map_err(|e| LoadError::Compile {
            path: path.to_owned(),
            source: format!("{e:#}").into(),
        })
    };
    let Some(dir) = &runtime.cache_dir else {
        return Ok((compile()?, false));
    };
    let cached = dir.join(format!("{}.cwasm", cache_key(engine, bytes)));
    if cached.exists() {
        // SAFETY: the cache directory belongs to the host (never to tenants), and the file name
        // is the digest of the source plus the engine's compatibility hash, so the file is
        // wasmtime's own output for this engine configuration. A corrupt file fails to load
        // and is recompiled below.
        match unsafe { Component::deserialize_file(engine, &cached) } {
            Ok(component) => {
                tracing::debug!(path = %path.display(), cache = %cached.display(), "Loaded compiled component from cache.");
                return Ok((component, true));
            }
            Err(error) => {
                tracing::warn!(cache = %cached.display(), %error, "Ignoring unreadable compiled component; recompiling.");
            }
        }
    }
    let component = compile()?;
    if let Err(error) = write_cache(dir, &cached, &component) {
        tracing::warn!(cache = %cached.display(), %error, "Cannot write the compiled-component cache; going on without it.");
    }
    Ok((component, false))
}

fn write_cache(dir: &Path, cached: &Path, component: &Component) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize().map_err(|e| std::io::Error::other(e.to_string()))?;
    // Write then rename, so a concurrent reader never sees half a file.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        std::process::id(),
        cached.file_name().and_then(|n| n.to_str()).unwrap_or("c")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, cached)
}
