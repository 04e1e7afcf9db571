//! The guest's log lines and stdout/stderr, into the host's log: tagged with the job and shard,
//! cut to a line length, and rate-limited per instance.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::clock::Clock;

/// Bytes of stdout or stderr kept between two drains; the rest is dropped and counted.
const CAPTURE_BYTES: usize = 64 << 10;

/// Severity of a guest log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// A token bucket over log bytes: `rate` bytes per second, bursts up to one second's worth.
#[derive(Debug)]
pub(crate) struct LogBudget {
    rate: f64,
    tokens: f64,
    last: Instant,
    clock: Arc<dyn Clock>,
    /// Lines dropped since the last "dropped" notice.
    pending_dropped: u64,
}

impl LogBudget {
    pub(crate) fn new(bytes_per_second: usize, clock: Arc<dyn Clock>) -> Self {
        let rate = bytes_per_second as f64;
        Self { rate, tokens: rate, last: clock.now(), clock, pending_dropped: 0 }
    }

    /// Whether a line of `len` bytes may be logged now.
    pub(crate) fn allow(&mut self, len: usize) -> bool {
        let now = self.clock.now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        let cost = len.max(1) as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            self.pending_dropped += 1;
            false
        }
    }

    /// Lines dropped since the last call, to report them once.
    pub(crate) fn take_pending_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.pending_dropped)
    }
}

/// Where a guest line goes: the tags every line carries.
#[derive(Debug, Clone)]
pub(crate) struct LogTags {
    pub(crate) job: Arc<str>,
    pub(crate) stream: Arc<str>,
    pub(crate) shard: Arc<str>,
}

impl LogTags {
    pub(crate) fn emit(&self, level: LogLevel, source: &'static str, line: &str) {
        let (job, stream, shard) = (&*self.job, &*self.stream, &*self.shard);
        macro_rules! at {
            ($lvl:expr) => {
                tracing::event!(target: "task", $lvl, job, stream, shard, source, "{line}")
            };
        }
        match level {
            LogLevel::Trace => at!(tracing::Level::TRACE),
            LogLevel::Debug => at!(tracing::Level::DEBUG),
            LogLevel::Info => at!(tracing::Level::INFO),
            LogLevel::Warn => at!(tracing::Level::WARN),
            LogLevel::Error => at!(tracing::Level::ERROR),
        }
    }
}

#[derive(Debug, Default)]
struct Captured {
    buf: Vec<u8>,
    dropped_bytes: u64,
}

/// A guest's stdout or stderr: bytes land in a bounded buffer that the host drains into its
/// log after every call. Never blocks, never grows past [`CAPTURE_BYTES`].
#[derive(Debug, Clone, Default)]
pub(crate) struct CapturedOutput {
    inner: Arc<Mutex<Captured>>,
}

impl CapturedOutput {
    fn append(&self, bytes: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let room = CAPTURE_BYTES.saturating_sub(c.buf.len());
        let take = room.min(bytes.len());
        c.buf.extend_from_slice(&bytes[..take]);
        c.dropped_bytes += (bytes.len() - take) as u64;
    }

    /// Takes what was written since the last drain, and how many bytes were dropped.
    pub(crate) fn drain(&self) -> (Vec<u8>, u64) {
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (std::mem::take(&mut c.buf), std::mem::take(&mut c.dropped_bytes))
    }

    /// Bytes the buffer takes now (its allocation: under twice [`CAPTURE_BYTES`]).
    pub(crate) fn held_bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).buf.capacity()
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: what does not fit is dropped, so a chatty guest never blocks.
        Ok(CAPTURE_BYTES)
    }
}

#[async_trait::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug)]
    struct ManualClock(Mutex<Instant>);
    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    #[test]
    fn budget_refills_with_time_and_counts_drops() {
        let start = Instant::now();
        let clock = Arc::new(ManualClock(Mutex::new(start)));
        let mut budget = LogBudget::new(100, clock.clone());
        assert!(budget.allow(60));
        assert!(budget.allow(40));
        assert!(!budget.allow(1));
        *clock.0.lock().unwrap_or_else(PoisonError::into_inner) =
            start + Duration::from_millis(500);
        assert!(budget.allow(50));
        assert!(!budget.allow(10));
        assert_eq!(budget.take_pending_dropped(), 2);
        assert_eq!(budget.take_pending_dropped(), 0);
    }

    #[test]
    fn capture_is_bounded() {
        let out = CapturedOutput::default();
        out.append(&vec![b'a'; CAPTURE_BYTES + 10]);
        let (buf, dropped) = out.drain();
        assert_eq!((buf.len(), dropped), (CAPTURE_BYTES, 10));
        assert_eq!(out.drain(), (Vec::new(), 0));
    }
}
