//! The naive layout's host side: a `list<envelope>` component on an engine configured like
//! the runtime's, with WASI linked with an empty context.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::records::HostRecord;

#[allow(missing_docs, missing_debug_implementations, unused_qualifications)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "guests/bench-naive/wit",
        world: "naive-task",
    });
}

pub use bindings::exports::kinesis::bench_naive::naive::Envelope;

/// Turns a wasmtime error into an anyhow one, keeping its whole chain in the message.
fn wt<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(|e| anyhow!("{e:?}"))
}

/// The `Store` data: WASI with nothing in it.
struct NaiveHost {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for NaiveHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// One instance of the `bench-naive` component.
pub struct NaiveGuest {
    store: Store<NaiveHost>,
    task: bindings::NaiveTask,
}

impl std::fmt::Debug for NaiveGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NaiveGuest").finish_non_exhaustive()
    }
}

impl NaiveGuest {
    /// Compiles and instantiates the component at `path` on an engine set up like
    /// `kinesis_host_runtime::Runtime`'s (component model, no concurrency support, epoch
    /// interruption with a far deadline, 512 KiB wasm stack).
    ///
    /// # Errors
    /// When the engine, compilation, linking or instantiation fails.
    pub fn load(path: &Path) -> Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.concurrency_support(false);
        config.epoch_interruption(true);
        config.max_wasm_stack(512 << 10);
        let engine = wt(Engine::new(&config)).context("cannot set up the naive engine")?;
        let component = wt(Component::from_file(&engine, path))
            .with_context(|| format!("cannot compile {}", path.display()))?;
        let mut linker: Linker<NaiveHost> = Linker::new(&engine);
        wt(wasmtime_wasi::p2::add_to_linker_sync(&mut linker))
            .context("cannot link WASI for the naive guest")?;
        let host = NaiveHost { wasi: WasiCtxBuilder::new().build(), table: ResourceTable::new() };
        let mut store = Store::new(&engine, host);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(u64::MAX / 2);
        let task = wt(bindings::NaiveTask::instantiate(&mut store, &component, &linker))
            .with_context(|| format!("cannot instantiate {}", path.display()))?;
        Ok(Self { store, task })
    }

    /// Calls the guest's `process` with `batch`; returns its checksum.
    ///
    /// # Errors
    /// When the guest traps.
    #[inline]
    pub fn process(&mut self, batch: &[Envelope]) -> Result<u64> {
        wt(self.task.kinesis_bench_naive_naive().call_process(&mut self.store, batch))
            .context("the naive guest's process failed")
    }
}

/// Owned envelopes for `records`, as a host would build them from decoded records.
#[inline]
pub fn envelopes(records: &[HostRecord]) -> Vec<Envelope> {
    records
        .iter()
        .map(|r| Envelope {
            data: r.data.clone(),
            partition_key: r.partition_key.clone(),
            sequence_number: r.sequence_number.clone(),
            sub_sequence_number: r.sub_sequence_number,
            approximate_arrival_millis: r.approximate_arrival_millis,
        })
        .collect()
}
