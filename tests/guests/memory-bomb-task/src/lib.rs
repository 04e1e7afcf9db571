//! `memory-bomb-task`: a fixture that, on a record whose data is `bomb`, allocates 1 MiB
//! buffers, writes every byte of each and keeps them all, forever: only the host's memory cap
//! stops it (the allocation fails and the instance traps). Records before it are echoed to
//! `out` first; batches without such a record are echoed to `out` and finish.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit};

/// The size of each allocation.
const CHUNK: usize = 1 << 20;

/// Echoes records to `out`, and exhausts memory on `bomb`.
#[derive(Debug)]
pub struct MemoryBomb;

impl Task for MemoryBomb {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(MemoryBomb)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        for record in batch {
            if record.data() == b"bomb" {
                explode();
            }
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

/// Allocates and touches memory until the allocator gives up, which aborts the instance.
fn explode() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // A non-zero fill writes every byte, so the memory is really used.
        hoard.push(std::hint::black_box(vec![0xA5; CHUNK]));
        std::hint::black_box(&hoard);
    }
}

kinesis_task::export_task!(MemoryBomb);
