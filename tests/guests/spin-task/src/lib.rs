//! `spin-task`: a fixture that never returns from a batch holding a record whose data is
//! `spin`: it loops forever on a counter the optimizer cannot remove, so only the host's
//! CPU limit (fuel or epoch interruption) can stop it. Records before it are echoed to `out`
//! first; batches without such a record are echoed to `out` and finish.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit};

/// Echoes records to `out`, and spins on `spin`.
#[derive(Debug)]
pub struct Spin;

impl Task for Spin {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(Spin)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        for record in batch {
            if record.data() == b"spin" {
                // Logged before the loop: the host writes task logs at once, so tests can see
                // that the batch is in flight.
                kinesis_task::log::info("spinning");
                spin();
            }
            emit("out", record.partition_key(), record.data())
                .map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        Ok(Done::All)
    }
}

/// Loops forever.
fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        std::hint::black_box(&mut counter);
        counter = counter.wrapping_add(1);
    }
}

kinesis_task::export_task!(Spin);
