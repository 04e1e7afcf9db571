//! CPU-time measurement: thread CPU time, so that time spent waiting for a CPU on a shared
//! machine does not count, and medians over interleaved repetitions.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The calling thread's CPU time in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
///
/// # Errors
/// When the clock cannot be read.
#[cfg(unix)]
pub fn thread_cpu_ns() -> Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable `timespec` that outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot read the thread CPU clock (CLOCK_THREAD_CPUTIME_ID)");
    }
    let secs = u64::try_from(ts.tv_sec).context("thread CPU clock: negative seconds")?;
    let nanos = u64::try_from(ts.tv_nsec).context("thread CPU clock: negative nanoseconds")?;
    Ok(secs * 1_000_000_000 + nanos)
}

/// Wall-clock fallback where there is no thread CPU clock: nanoseconds since first use.
///
/// # Errors
/// Never; the signature matches the Unix version.
#[cfg(not(unix))]
pub fn thread_cpu_ns() -> Result<u64> {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    Ok(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// The name of the clock [`thread_cpu_ns`] reads, for the report.
pub const CLOCK_NAME: &str =
    if cfg!(unix) { "thread CPU time (CLOCK_THREAD_CPUTIME_ID)" } else { "wall clock" };

/// Runs `run(iters)`, which must do `iters` iterations of the measured work, with more and
/// more iterations until one run takes at least a quarter of `target`; returns how many
/// iterations should take about `target`. Also serves as the warm-up.
///
/// # Errors
/// What `run` returns.
pub fn calibrate(target: Duration, mut run: impl FnMut(u64) -> Result<u64>) -> Result<u64> {
    let target_ns = u64::try_from(target.as_nanos()).unwrap_or(u64::MAX).max(1);
    let mut iters = 1u64;
    loop {
        let ns = run(iters)?.max(1);
        if ns >= target_ns / 4 || iters >= 1 << 40 {
            let scaled = u128::from(iters) * u128::from(target_ns) / u128::from(ns);
            return Ok(u64::try_from(scaled).unwrap_or(u64::MAX).max(1));
        }
        iters *= 2;
    }
}

/// The CPU nanoseconds `work` takes.
///
/// # Errors
/// What `work` returns, or a clock error.
pub fn cpu_time(work: impl FnOnce() -> Result<()>) -> Result<u64> {
    let start = thread_cpu_ns()?;
    work()?;
    let end = thread_cpu_ns()?;
    Ok(end.saturating_sub(start))
}

/// Median and relative spread of repeated samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The median.
    pub median: f64,
    /// `(max − min) / median`.
    pub spread: f64,
}

/// Median and spread of `samples`.
///
/// # Errors
/// When there are no samples.
pub fn summarize(samples: &[f64]) -> Result<Summary> {
    if samples.is_empty() {
        bail!("no samples to summarise");
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    let spread = if median > 0.0 { (sorted[n - 1] - sorted[0]) / median } else { 0.0 };
    Ok(Summary { median, spread })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() -> Result<()> {
        assert_eq!(summarize(&[3.0, 1.0, 2.0])?.median, 2.0);
        assert_eq!(summarize(&[4.0, 1.0, 3.0, 2.0])?.median, 2.5);
        assert_eq!(summarize(&[1.0, 2.0, 3.0])?.spread, 1.0);
        assert!(summarize(&[]).is_err());
        Ok(())
    }

    #[test]
    fn thread_clock_advances_with_work() -> Result<()> {
        let ns = cpu_time(|| {
            let mut x = 0u64;
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
            Ok(())
        })?;
        assert!(ns > 0);
        Ok(())
    }

    #[test]
    fn calibration_scales_to_the_target() -> Result<()> {
        // A fake run costing 1000 ns per iteration.
        let iters = calibrate(Duration::from_millis(1), |iters| Ok(iters * 1000))?;
        assert_eq!(iters, 1000);
        Ok(())
    }
}
