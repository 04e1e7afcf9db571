//! The one source of time for the runtime, injectable so rate limits are testable.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// A monotonic clock.
pub trait Clock: Debug + Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;

    /// Blocks the calling thread for `duration` (back-off between retries).
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// The operating system's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
