//! CPU fairness between the jobs of one host (`kinesis-host serve`): a bounded, fair gate in
//! front of every wasm call.
//!
//! Two mechanisms, both per job (`job.name`):
//!
//! - **A host-wide limit on concurrent wasm calls**, by default one per CPU core, with fair
//!   queueing across jobs: when more calls wait than there are slots, the next slot goes to the
//!   waiting job that has used the least CPU so far (start-time fair queueing on a per-job
//!   virtual clock of seconds spent in calls), and no job holds more than its share of the
//!   slots (`ceil(slots / active jobs)`) while another job waits. A job with many shards thus
//!   gets no more of the CPU than a job with one, and a job that makes long calls no more than
//!   one that makes short ones, while the CPU is contended; an uncontended job may use every
//!   slot. Because no more calls run than there are cores, the wall time of a call is a fair
//!   measure of the CPU it used.
//! - **A CPU penalty for failed calls**: a call that ends in an error or a trap (the CPU deadline
//!   `task.limits.batch.timeout.ms`, fuel, memory, a panic) after burning `t` seconds makes its job
//!   wait `factor × t` (default 9×) before any of its shards may start another call, up to a cap
//!   (default 60 s) ahead of now. A tenant stuck in an endless loop can then use at most
//!   `1 / (1 + factor)` of one core (10 % by default) however often it is retried; on a 2-core
//!   host that is 5 % of the machine. Until `max_penalty` after its penalty ends, such a job
//!   runs at most one call at a time, even on an idle host. Successful calls are never
//!   penalized, however long.
//!
//! The gate is synchronous: it is entered on the blocking thread that runs the call (the
//! pipeline's wasm calls run on `spawn_blocking`), never on the async runtime.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Counter: microseconds spent in the job's wasm calls while holding a slot, per job.
pub const CPU_MICROS: &str = "kinesis_host_task_cpu_microseconds_total";
/// Counter: microseconds of penalty imposed on the job, per job.
pub const PENALTY_MICROS: &str = "kinesis_host_task_cpu_penalty_microseconds_total";

/// The longest a waiting call sleeps before it re-checks the gate by itself. Waiters are woken
/// when a slot is granted to their job, and a penalised job's waiters when the penalty ends;
/// this only bounds the cost of a missed wake-up.
const RECHECK: Duration = Duration::from_millis(100);

/// Settings of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FairnessConfig {
    /// Wasm calls running at once, host-wide (default: the number of CPU cores).
    pub max_concurrent_calls: usize,
    /// A failed call makes its job wait this many times the time it burned (default 9).
    pub penalty_factor: f64,
    /// The longest a job's penalty reaches ahead of now (default 60 s).
    pub max_penalty: Duration,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self {
            max_concurrent_calls: std::thread::available_parallelism().map_or(2, |n| n.get()),
            penalty_factor: 9.0,
            max_penalty: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct JobCpu {
    /// Virtual time: seconds of calls so far, never behind the gate's clock when it queues.
    vtime: f64,
    /// Time spent in calls so far.
    used: Duration,
    /// No call of the job starts before this.
    penalty_until: Option<Instant>,
    /// Until then the job, having failed after burning CPU, runs one call at a time.
    suspect_until: Option<Instant>,
    /// Its calls running now.
    running: usize,
    /// Tickets of the job's waiting calls, in arrival order.
    queue: VecDeque<u64>,
    /// Wakes the job's waiting calls (only theirs: a penalised job's waiters are not woken by
    /// every other call's end).
    wake: Arc<Condvar>,
}

#[derive(Debug, Default)]
struct State {
    free: usize,
    jobs: HashMap<String, JobCpu>,
    next_ticket: u64,
    granted: HashSet<u64>,
    /// The virtual time of the last call dispatched.
    vclock: f64,
    /// Jobs being stopped: they serve no penalty, so their batches in flight finish promptly.
    stopping: HashSet<String>,
    /// Jobs started and not yet stopped, whether or not they are calling now.
    registered: HashSet<String>,
    /// Jobs unregistered while calls of theirs still ran: their state goes with their last call.
    retired: HashSet<String>,
    /// Slots in all.
    slots: usize,
}

impl State {
    /// The jobs that share the slots: those started and not stopped, and any calling now.
    fn active(&self) -> usize {
        self.jobs
            .iter()
            .filter(|(name, j)| {
                j.running > 0 || !j.queue.is_empty() || self.registered.contains(*name)
            })
            .count()
    }
}

/// The gate in front of every wasm call of a host's jobs. Shared (`Arc`) by all jobs.
#[derive(Debug)]
pub struct CpuGate {
    config: FairnessConfig,
    state: Mutex<State>,
}

/// A running call's slot; give it back with [`Permit::finish`] (dropping it counts as success).
#[derive(Debug)]
pub struct Permit<'a> {
    gate: &'a CpuGate,
    job: String,
    started: Instant,
    done: bool,
}

impl CpuGate {
    /// A gate with `config`.
    pub fn new(config: FairnessConfig) -> Self {
        let config = FairnessConfig {
            max_concurrent_calls: config.max_concurrent_calls.max(1),
            penalty_factor: config.penalty_factor.max(0.0),
            ..config
        };
        Self {
            config,
            state: Mutex::new(State {
                free: config.max_concurrent_calls,
                slots: config.max_concurrent_calls,
                ..State::default()
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> FairnessConfig {
        self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits (blocking the calling thread) until `job` may start a call: its penalty, if any,
    /// is over and a slot is free and its turn.
    pub fn enter(&self, job: &str) -> Permit<'_> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let vclock = state.vclock;
        let entry = state.jobs.entry(job.to_owned()).or_default();
        entry.vtime = entry.vtime.max(vclock);
        entry.queue.push_back(ticket);
        let wake = entry.wake.clone();
        loop {
            let now = Instant::now();
            Self::dispatch(&mut state, now);
            if state.granted.remove(&ticket) {
                break;
            }
            let timeout = state.jobs.get(job).and_then(|j| j.penalty_until).map_or(RECHECK, |t| {
                t.saturating_duration_since(now).clamp(Duration::from_millis(1), RECHECK)
            });
            state = wake.wait_timeout(state, timeout).unwrap_or_else(PoisonError::into_inner).0;
        }
        drop(state);
        Permit { gate: self, job: job.to_owned(), started: Instant::now(), done: false }
    }

    /// Hands free slots to the waiting calls, job with the least virtual time first: first
    /// among the jobs below their share of the slots, then (so no slot idles while calls wait)
    /// among the others. Jobs serving a penalty get nothing; suspect jobs one call at a time.
    fn dispatch(state: &mut State, now: Instant) {
        while state.free > 0 {
            let active = state.active().max(1);
            let share = state.slots.div_ceil(active).max(1);
            let eligible = |j: &JobCpu| {
                !j.queue.is_empty()
                    && j.penalty_until.is_none_or(|t| t <= now)
                    && (j.running == 0 || j.suspect_until.is_none_or(|t| t <= now))
            };
            let pick = |below_share: bool| {
                state
                    .jobs
                    .iter()
                    .filter(|(_, j)| eligible(j) && (!below_share || j.running < share))
                    .min_by(|(_, a), (_, b)| a.vtime.total_cmp(&b.vtime))
                    .map(|(name, _)| name.clone())
            };
            let Some(name) = pick(true).or_else(|| pick(false)) else { return };
            let Some(job) = state.jobs.get_mut(&name) else { return };
            let Some(ticket) = job.queue.pop_front() else { return };
            job.penalty_until = job.penalty_until.filter(|t| *t > now);
            job.running += 1;
            let vtime = job.vtime;
            state.vclock = state.vclock.max(vtime);
            job.wake.notify_all();
            state.granted.insert(ticket);
            state.free -= 1;
        }
    }

    fn leave(&self, job: &str, burned: Duration, failed: bool) {
        let penalty;
        {
            let mut state = self.lock();
            penalty = if failed && !state.stopping.contains(job) && !state.retired.contains(job) {
                burned.mul_f64(self.config.penalty_factor).min(self.config.max_penalty)
            } else {
                Duration::ZERO
            };
            state.free += 1;
            let now = Instant::now();
            let cap = now + self.config.max_penalty;
            let entry = state.jobs.entry(job.to_owned()).or_default();
            entry.vtime += burned.as_secs_f64();
            entry.used += burned;
            entry.running = entry.running.saturating_sub(1);
            if !penalty.is_zero() {
                let from = entry.penalty_until.filter(|t| *t > now).unwrap_or(now);
                let until = (from + penalty).min(cap);
                entry.penalty_until = Some(until);
                entry.suspect_until = Some(until + self.config.max_penalty);
                tracing::info!(
                    job,
                    burned_ms = burned.as_millis(),
                    penalty_ms = penalty.as_millis(),
                    "Task call failed after burning CPU; the job waits before its next call."
                );
            }
            let idle = entry.running == 0 && entry.queue.is_empty();
            if idle && state.retired.contains(job) {
                // Unregistered while this call ran: forget it now.
                state.retired.remove(job);
                state.jobs.remove(job);
            }
            Self::dispatch(&mut state, now);
        }
        metrics::counter!(CPU_MICROS, "job" => job.to_owned()).increment(burned.as_micros() as u64);
        if !penalty.is_zero() {
            metrics::counter!(PENALTY_MICROS, "job" => job.to_owned())
                .increment(penalty.as_micros() as u64);
        }
    }

    /// `job` is stopping: its penalty is lifted and it gets no new one, so its shards finish
    /// their batches in flight (each call still bounded by the CPU deadline) without waiting.
    pub fn stopping(&self, job: &str) {
        let mut state = self.lock();
        state.stopping.insert(job.to_owned());
        state.registered.remove(job);
        if let Some(entry) = state.jobs.get_mut(job) {
            entry.penalty_until = None;
            entry.suspect_until = None;
            entry.wake.notify_all();
        }
        Self::dispatch(&mut state, Instant::now());
    }

    /// `job` (re)starts: penalties apply to it again. Its CPU history is kept, so restarting a
    /// job does not buy it a bigger share.
    pub fn starting(&self, job: &str) {
        let mut state = self.lock();
        state.stopping.remove(job);
        state.retired.remove(job);
        state.registered.insert(job.to_owned());
    }

    /// `job` is gone (its folder removed, or its run ended by itself): it no longer counts
    /// among the active jobs that share the slots, and the gate forgets it (its CPU history and
    /// any penalty) once its last call, if one still runs, ends. A job started again under the
    /// same name later begins afresh, at the gate's current virtual time.
    pub fn unregister(&self, job: &str) {
        let mut state = self.lock();
        state.registered.remove(job);
        state.stopping.remove(job);
        match state.jobs.get_mut(job) {
            Some(entry) if entry.running > 0 || !entry.queue.is_empty() => {
                // Let what is left finish without waiting, as for a stopping job.
                entry.penalty_until = None;
                entry.suspect_until = None;
                entry.wake.notify_all();
                state.retired.insert(job.to_owned());
            }
            Some(_) => {
                state.jobs.remove(job);
            }
            None => {}
        }
        Self::dispatch(&mut state, Instant::now());
    }

    /// The time `job`'s calls have taken so far (calls running now not included).
    pub fn cpu_used(&self, job: &str) -> Duration {
        self.lock().jobs.get(job).map_or(Duration::ZERO, |j| j.used)
    }

    /// How long `job` must still wait before its next call (zero if it need not).
    pub fn penalty_remaining(&self, job: &str) -> Duration {
        let state = self.lock();
        state
            .jobs
            .get(job)
            .and_then(|j| j.penalty_until)
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()))
    }
}

impl Permit<'_> {
    /// Gives the slot back; `failed` says the call ended in an error or a trap, which makes the
    /// job serve a penalty proportional to the time the call took.
    pub fn finish(mut self, failed: bool) {
        self.done = true;
        self.gate.leave(&self.job, self.started.elapsed(), failed);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate.leave(&self.job, self.started.elapsed(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn gate(slots: usize) -> CpuGate {
        CpuGate::new(FairnessConfig {
            max_concurrent_calls: slots,
            penalty_factor: 9.0,
            max_penalty: Duration::from_secs(60),
        })
    }

    #[test]
    fn a_failed_call_penalizes_only_its_job() {
        let gate = gate(2);
        let permit = gate.enter("spin");
        std::thread::sleep(Duration::from_millis(30));
        permit.finish(true);
        let penalty = gate.penalty_remaining("spin");
        assert!(penalty > Duration::ZERO && penalty <= Duration::from_secs(60), "{penalty:?}");
        assert_eq!(gate.penalty_remaining("echo"), Duration::ZERO);
        // The other job is not held up by it.
        gate.enter("echo").finish(false);
        gate.stopping("spin");
        assert_eq!(gate.penalty_remaining("spin"), Duration::ZERO);
        // A stopping job's failures cost it nothing more; once restarted, they do again.
        gate.enter("spin").finish(true);
        assert_eq!(gate.penalty_remaining("spin"), Duration::ZERO);
        gate.starting("spin");
        let permit = gate.enter("spin");
        std::thread::sleep(Duration::from_millis(5));
        permit.finish(true);
        assert!(gate.penalty_remaining("spin") > Duration::ZERO);
    }

    #[test]
    fn a_job_unregistered_no_longer_counts_and_is_forgotten() {
        let gate = gate(4);
        for job in ["a", "b", "gone"] {
            gate.starting(job);
            gate.enter(job).finish(false);
        }
        assert_eq!(gate.lock().active(), 3);
        // Gone with nothing running: it no longer lowers the others' share, and its state goes.
        gate.unregister("gone");
        assert_eq!(gate.lock().active(), 2);
        assert!(!gate.lock().jobs.contains_key("gone"));
        assert_eq!(gate.cpu_used("gone"), Duration::ZERO);
        // Gone while a (failing) call still runs: counted until that call ends, never penalised,
        // then forgotten.
        let permit = gate.enter("b");
        gate.unregister("b");
        assert_eq!(gate.lock().active(), 2);
        std::thread::sleep(Duration::from_millis(5));
        permit.finish(true);
        assert_eq!(gate.penalty_remaining("b"), Duration::ZERO);
        assert_eq!(gate.lock().active(), 1);
        let state = gate.lock();
        assert!(!state.jobs.contains_key("b") && state.retired.is_empty());
        assert_eq!(state.registered, HashSet::from(["a".to_owned()]));
    }

    #[test]
    fn successful_calls_are_never_penalized() {
        let gate = gate(1);
        let permit = gate.enter("slow");
        std::thread::sleep(Duration::from_millis(5));
        permit.finish(false);
        assert_eq!(gate.penalty_remaining("slow"), Duration::ZERO);
    }

    #[test]
    fn a_job_that_failed_runs_one_call_at_a_time() {
        let gate = Arc::new(CpuGate::new(FairnessConfig {
            max_concurrent_calls: 2,
            penalty_factor: 0.001,
            max_penalty: Duration::from_secs(60),
        }));
        let permit = gate.enter("spin");
        std::thread::sleep(Duration::from_millis(2));
        permit.finish(true);
        while gate.penalty_remaining("spin") > Duration::ZERO {
            std::thread::sleep(Duration::from_millis(1));
        }
        let first = gate.enter("spin");
        let entered = Arc::new(AtomicUsize::new(0));
        let second = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let permit = gate.enter("spin");
                entered.store(1, Ordering::SeqCst);
                permit.finish(false);
            })
        };
        // A slot is free, but the suspect job already runs a call: the second one waits...
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(entered.load(Ordering::SeqCst), 0);
        // ...while other jobs still get the free slot.
        gate.enter("echo").finish(false);
        first.finish(false);
        second.join().expect("thread");
        assert_eq!(entered.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_penalty_is_capped() {
        let gate = CpuGate::new(FairnessConfig {
            max_concurrent_calls: 1,
            penalty_factor: 1e9,
            max_penalty: Duration::from_secs(2),
        });
        gate.enter("spin").finish(true);
        gate.enter("spin2").finish(false);
        assert!(gate.penalty_remaining("spin") <= Duration::from_secs(2));
    }

    #[test]
    fn never_more_calls_than_slots_and_the_lighter_job_goes_first() {
        let gate = Arc::new(gate(1));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        // `heavy` has used a lot of CPU already.
        let permit = gate.enter("heavy");
        std::thread::sleep(Duration::from_millis(20));
        permit.finish(false);
        let held = gate.enter("other");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for job in ["heavy", "light", "heavy", "light"] {
            let (gate, running, most, order) =
                (gate.clone(), running.clone(), most.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let permit = gate.enter(job);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                order.lock().unwrap_or_else(PoisonError::into_inner).push(job);
                running.fetch_sub(1, Ordering::SeqCst);
                permit.finish(false);
            }));
        }
        // Let all four queue behind the held slot.
        while gate.lock().jobs.values().map(|j| j.queue.len()).sum::<usize>() < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        held.finish(false);
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        let order = order.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(order.first(), Some(&"light"), "{order:?}");
    }
}
