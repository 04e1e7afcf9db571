//! `bench-naive`: the guest of `kinesis-host-bench boundary` for the naive layout, a
//! `list<envelope>` where every record carries its own `list<u8>` and strings, so the canonical
//! ABI allocates three times per record in guest memory.
//!
//! Same work as `bench-batch`: per record, a wrapping `u64` sum of every data byte plus the
//! partition key's and sequence number's lengths; `process` returns the batch's sum.

#[allow(missing_docs, missing_debug_implementations, unused_qualifications)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "naive-task",
    });
}

use bindings::exports::kinesis::bench_naive::naive::{Envelope, Guest};

/// The exported `naive` interface.
#[derive(Debug)]
pub struct BenchNaive;

/// The checksum of one record: its data bytes plus the lengths of its partition key and
/// sequence number, as a wrapping `u64` sum.
#[inline]
pub fn record_sum(data: &[u8], partition_key: &str, sequence_number: &str) -> u64 {
    data.iter()
        .fold(0u64, |acc, &b| acc.wrapping_add(u64::from(b)))
        .wrapping_add(partition_key.len() as u64)
        .wrapping_add(sequence_number.len() as u64)
}

impl Guest for BenchNaive {
    fn process(batch: Vec<Envelope>) -> u64 {
        batch.iter().fold(0u64, |acc, r| {
            acc.wrapping_add(record_sum(&r.data, &r.partition_key, &r.sequence_number))
        })
    }
}

// Export only in the component: natively, the component-model export names (`kinesis:…#process`)
// are not valid in a linker version script, so the `cdylib` would not link.
#[cfg(target_arch = "wasm32")]
bindings::export!(BenchNaive with_types_in bindings);
