//! `boundary`: ns/record through `process` for a native closure, our batch path and a naive
//! `list<envelope>` path, with the targets checked at 100 B.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kinesis_host_runtime::{
    Batch, InstanceSpec, Limits, MetricValue, Outputs, Runtime, RuntimeConfig, ShardState,
    TaskComponent, TaskInstance,
};

use crate::guests::{self, GuestPaths};
use crate::naive::{self, Envelope, NaiveGuest};
use crate::records::{self, HostRecord};
use crate::timing::{self, Summary};

/// The counter `bench-batch` adds each batch's checksum to.
const CHECKSUM_COUNTER: &str = "checksum";
/// Target: our path's cost over native, ns/record at 100 B.
const MAX_OVERHEAD_NS: f64 = 50.0;
/// Target: how many times cheaper than the naive layout our path is at 100 B.
const MIN_NAIVE_RATIO: f64 = 4.0;
/// The record size the targets are checked at.
const TARGET_SIZE: usize = 100;

/// Options of `boundary`.
#[derive(Debug, Clone, clap::Args)]
pub struct BoundaryArgs {
    /// Records per batch.
    #[arg(long, default_value_t = 500)]
    pub records: usize,
    /// Record payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 1024])]
    pub sizes: Vec<usize>,
    /// Repetitions; each runs every variant once (interleaved), and the median is reported.
    #[arg(long, default_value_t = 15)]
    pub reps: usize,
    /// CPU milliseconds per measurement (one variant in one repetition).
    #[arg(long, default_value_t = 200)]
    pub min_ms: u64,
    /// Exit with an error when a target at 100 B is missed.
    #[arg(long)]
    pub check: bool,
}

/// One way of running a batch through the task's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// A Rust closure over the host's records.
    Native,
    /// Pack a runtime `Batch`, then `TaskInstance::process`.
    BatchPackCall,
    /// `TaskInstance::process` on an already packed batch.
    BatchCall,
    /// Build a `Vec<Envelope>`, then call the naive guest.
    NaiveBuildCall,
    /// Call the naive guest with already built envelopes.
    NaiveCall,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Native,
        Variant::BatchPackCall,
        Variant::BatchCall,
        Variant::NaiveBuildCall,
        Variant::NaiveCall,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Native => "native",
            Variant::BatchPackCall => "batch pack+call",
            Variant::BatchCall => "batch call only",
            Variant::NaiveBuildCall => "naive build+call",
            Variant::NaiveCall => "naive call only",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Everything one record size is measured with.
struct Subject<'a> {
    records: &'a [HostRecord],
    checksum: u64,
    instance: TaskInstance,
    state: ShardState,
    /// Refilled by every `BatchPackCall` iteration.
    batch: Batch,
    /// Packed once, for `BatchCall`.
    packed: Batch,
    naive: NaiveGuest,
    /// Built once, for `NaiveCall`.
    envelopes: Vec<Envelope>,
}

/// The native variant's work, as a closure over the host's records.
fn native_closure() -> impl Fn(&[HostRecord]) -> u64 {
    |records| {
        records.iter().fold(0u64, |acc, r| {
            acc.wrapping_add(records::record_sum(&r.data, &r.partition_key, &r.sequence_number))
        })
    }
}

fn pack(batch: &mut Batch, records: &[HostRecord]) -> Result<()> {
    batch.clear();
    for record in records {
        ensure!(batch.push(&record.record_ref()), "a record does not fit in the batch");
    }
    Ok(())
}

fn new_batch(records: usize) -> Batch {
    Batch::new("bench-stream", "shardId-000000000000", records, 64 << 20)
}

impl<'a> Subject<'a> {
    fn new(
        component: &TaskComponent,
        naive_path: &Path,
        records: &'a [HostRecord],
    ) -> Result<Self> {
        let spec = Arc::new(InstanceSpec {
            job: "bench".into(),
            stream: "bench-stream".into(),
            shard_id: "shardId-000000000000".into(),
            outputs: Outputs::Any,
            config: vec![],
            limits: Limits::default(),
        });
        let instance = TaskInstance::new(component, spec)
            .context("cannot instantiate the bench-batch guest")?;
        let mut packed = new_batch(records.len());
        pack(&mut packed, records)?;
        Ok(Self {
            records,
            checksum: native_closure()(records),
            instance,
            state: ShardState::default(),
            batch: new_batch(records.len()),
            packed,
            naive: NaiveGuest::load(naive_path)?,
            envelopes: naive::envelopes(records),
        })
    }

    fn counter(&self) -> u64 {
        match self.instance.metrics().get(CHECKSUM_COUNTER) {
            Some(MetricValue::Counter(total)) => *total,
            _ => 0,
        }
    }

    /// Runs one batch through each path and checks that all agree with the native checksum.
    fn verify(&mut self) -> Result<()> {
        let native = native_closure()(black_box(self.records));
        let before = self.counter();
        pack(&mut self.batch, self.records)?;
        let out = self
            .instance
            .process(&self.batch, &mut self.state)
            .context("the bench-batch guest's process failed")?;
        ensure!(
            out.processed == self.records.len(),
            "bench-batch reported {} of {} records done",
            out.processed,
            self.records.len()
        );
        let batch = self.counter().checked_sub(before).context(
            "the checksum counter went down (did it saturate?); cannot read this batch's sum",
        )?;
        let naive = self.naive.process(&naive::envelopes(self.records))?;
        if native != self.checksum || batch != native || naive != native {
            bail!(
                "checksums disagree for {} B records: native {native:#x}, batch {batch:#x}, \
                 naive {naive:#x} (expected {:#x})",
                self.records.first().map_or(0, |r| r.data.len()),
                self.checksum,
            );
        }
        Ok(())
    }

    /// Runs `iters` iterations of `variant`; returns the CPU nanoseconds they took.
    fn run(&mut self, variant: Variant, iters: u64) -> Result<u64> {
        let Self { records, checksum, instance, state, batch, packed, naive, envelopes } = self;
        let records: &[HostRecord] = records;
        let checksum = *checksum;
        match variant {
            Variant::Native => {
                let native = native_closure();
                timing::cpu_time(|| {
                    for _ in 0..iters {
                        black_box(native(black_box(records)));
                    }
                    Ok(())
                })
            }
            Variant::BatchPackCall => timing::cpu_time(|| {
                for _ in 0..iters {
                    pack(batch, black_box(records))?;
                    let out = instance.process(batch, state).context("bench-batch failed")?;
                    black_box(out);
                }
                Ok(())
            }),
            Variant::BatchCall => timing::cpu_time(|| {
                for _ in 0..iters {
                    let out = instance.process(packed, state).context("bench-batch failed")?;
                    black_box(out);
                }
                Ok(())
            }),
            Variant::NaiveBuildCall => timing::cpu_time(|| {
                for _ in 0..iters {
                    let built = naive::envelopes(black_box(records));
                    let sum = naive.process(&built)?;
                    ensure!(sum == checksum, "naive checksum {sum:#x}, expected {checksum:#x}");
                    drop(black_box(built));
                }
                Ok(())
            }),
            Variant::NaiveCall => timing::cpu_time(|| {
                for _ in 0..iters {
                    let sum = naive.process(black_box(envelopes))?;
                    ensure!(sum == checksum, "naive checksum {sum:#x}, expected {checksum:#x}");
                }
                Ok(())
            }),
        }
    }
}

/// The medians for one record size.
#[derive(Debug, Clone)]
struct SizeResult {
    size: usize,
    checksum: u64,
    /// Indexed by [`Variant::index`]: ns/record.
    summaries: Vec<Summary>,
}

impl SizeResult {
    fn ns(&self, variant: Variant) -> f64 {
        self.summaries[variant.index()].median
    }

    /// The boundary's cost over native: `process` on a packed batch − native. Packing is the
    /// host's assembly of decoded records, which a native consumer does too (into its own
    /// structs); it is reported separately by [`Self::overhead_with_packing`].
    fn overhead(&self) -> f64 {
        self.ns(Variant::BatchCall) - self.ns(Variant::Native)
    }

    /// Batch pack+call − native.
    fn overhead_with_packing(&self) -> f64 {
        self.ns(Variant::BatchPackCall) - self.ns(Variant::Native)
    }

    /// naive build+call ÷ batch pack+call.
    fn ratio_end_to_end(&self) -> f64 {
        self.ns(Variant::NaiveBuildCall) / self.ns(Variant::BatchPackCall)
    }

    /// naive call only ÷ batch call only.
    fn ratio_call_only(&self) -> f64 {
        self.ns(Variant::NaiveCall) / self.ns(Variant::BatchCall)
    }

    /// The variant whose samples spread most, with its spread.
    fn worst_spread(&self) -> (Variant, f64) {
        Variant::ALL
            .iter()
            .map(|&v| (v, self.summaries[v.index()].spread))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((Variant::Native, 0.0))
    }
}

/// Runs the benchmark: builds the guests, measures every size, prints and writes the report,
/// and returns it.
///
/// # Errors
/// When the guests cannot be built or loaded, a call fails, the checksums disagree, the report
/// cannot be written, or (with `--check`) a target is missed.
pub fn run(args: &BoundaryArgs) -> Result<String> {
    ensure!(args.records > 0, "--records must be at least 1");
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(!args.sizes.is_empty(), "--sizes must name at least one size");
    timing::thread_cpu_ns()?;

    let root = guests::workspace_root();
    let paths = guests::build(&root)?;
    let runtime = Runtime::new(RuntimeConfig::default()).context("cannot start the runtime")?;
    let component = runtime
        .load(&paths.batch)
        .with_context(|| format!("cannot load {}", paths.batch.display()))?;

    let mut results = Vec::with_capacity(args.sizes.len());
    for &size in &args.sizes {
        results.push(measure_size(args, &component, &paths, size)?);
    }

    let report = render(args, &paths, &results);
    print!("{report}");
    let dir = guests::target_dir(&root).join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join("boundary.txt");
    std::fs::write(&file, &report).with_context(|| format!("cannot write {}", file.display()))?;
    println!("\nWritten to {}", file.display());

    if args.check {
        let target = results.iter().find(|r| r.size == TARGET_SIZE);
        let Some(target) = target else {
            bail!("--check needs {TARGET_SIZE} in --sizes");
        };
        ensure!(
            target.overhead() <= MAX_OVERHEAD_NS && target.ratio_end_to_end() >= MIN_NAIVE_RATIO,
            "a target at {TARGET_SIZE} B was missed"
        );
    }
    Ok(report)
}

fn measure_size(
    args: &BoundaryArgs,
    component: &TaskComponent,
    paths: &GuestPaths,
    size: usize,
) -> Result<SizeResult> {
    let records = records::generate(args.records, size);
    let mut subject = Subject::new(component, &paths.naive, &records)?;
    subject.verify()?;

    let target = Duration::from_millis(args.min_ms.max(1));
    let mut iters = [0u64; Variant::ALL.len()];
    for variant in Variant::ALL {
        eprint!("\r{}: calibrating {:<20}", size_label(size), variant.label());
        iters[variant.index()] = timing::calibrate(target, |n| subject.run(variant, n))?;
    }

    let per_call = args.records as f64;
    let mut samples = vec![Vec::with_capacity(args.reps); Variant::ALL.len()];
    for rep in 0..args.reps {
        eprint!("\r{}: repetition {}/{}          ", size_label(size), rep + 1, args.reps);
        // Rotate the order so that no variant always runs right after the same other one.
        for k in 0..Variant::ALL.len() {
            let variant = Variant::ALL[(rep + k) % Variant::ALL.len()];
            let n = iters[variant.index()];
            let ns = subject.run(variant, n)?;
            samples[variant.index()].push(ns as f64 / (n as f64 * per_call));
        }
    }
    eprintln!();
    subject.verify()?;

    let summaries =
        samples.iter().map(|s| timing::summarize(s)).collect::<Result<Vec<Summary>>>()?;
    Ok(SizeResult { size, checksum: subject.checksum, summaries })
}

fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// A Markdown table with padded columns (readable as plain text too).
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::from("|");
        for (cell, w) in cells.zip(&widths) {
            let pad = w - cell.chars().count();
            let _ = write!(out, " {}{cell} |", " ".repeat(pad));
        }
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    out.push('|');
    for w in &widths {
        let _ = write!(out, "{}:|", "-".repeat(w + 1));
    }
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

fn machine_note() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{cpu}, {cpus} CPUs, load average {load}")
}

fn render(args: &BoundaryArgs, paths: &GuestPaths, results: &[SizeResult]) -> String {
    let mut out = String::new();
    let sizes: Vec<String> = args.sizes.iter().map(|&s| size_label(s)).collect();
    let file_size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let _ = writeln!(
        out,
        "kinesis-host-bench boundary: {} records per batch, sizes {}; median of {} repetitions \
         of ≥ {} ms each, variants interleaved; {}",
        args.records,
        sizes.join(", "),
        args.reps,
        args.min_ms,
        timing::CLOCK_NAME,
    );
    let _ = writeln!(out, "machine: {}", machine_note());
    let _ = writeln!(
        out,
        "guests: {} ({} B), {} ({} B)",
        paths.batch.display(),
        file_size(&paths.batch),
        paths.naive.display(),
        file_size(&paths.naive),
    );
    let _ = writeln!(out, "\nns/record through `process` (lower is better):\n");

    let mut header = vec!["size"];
    header.extend(Variant::ALL.iter().map(|v| v.label()));
    header.extend([
        "overhead (call only − native)",
        "naive/batch (end-to-end)",
        "naive/batch (call only)",
    ]);
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let mut row = vec![size_label(r.size)];
            row.extend(Variant::ALL.iter().map(|&v| format!("{:.1}", r.ns(v))));
            row.push(format!("{:.1}", r.overhead()));
            row.push(format!("{:.2}×", r.ratio_end_to_end()));
            row.push(format!("{:.2}×", r.ratio_call_only()));
            row
        })
        .collect();
    out.push_str(&table(&header, &rows));

    let _ = writeln!(
        out,
        "\nbatch pack+call = clear + push every record into a reused runtime Batch + \
         TaskInstance::process; naive build+call = clone the records into a Vec<Envelope> + \
         call process(list<envelope>). overhead = batch call only − native (the boundary); \
         packing adds what the pack+call column shows."
    );
    for r in results {
        let (variant, spread) = r.worst_spread();
        let _ = writeln!(
            out,
            "{}: checksums agree (native = batch = naive = {:#x}); largest spread \
             (max − min)/median {:.0}% ({})",
            size_label(r.size),
            r.checksum,
            spread * 100.0,
            variant.label(),
        );
    }

    let _ = writeln!(out);
    match results.iter().find(|r| r.size == TARGET_SIZE) {
        None => {
            let _ = writeln!(
                out,
                "targets: not checked; they are at {TARGET_SIZE} B (add {TARGET_SIZE} to --sizes)"
            );
        }
        Some(r) => {
            let overhead = r.overhead();
            let _ = writeln!(
                out,
                "host→guest overhead at 100 B: {overhead:.1} ns/record (target ≤ 50): {}   \
                 [batch call only − native]",
                pass(overhead <= MAX_OVERHEAD_NS),
            );
            let _ = writeln!(
                out,
                "  with packing the batch: {:.1} ns/record   [batch pack+call − native]",
                r.overhead_with_packing(),
            );
            let ratio = r.ratio_end_to_end();
            let _ = writeln!(
                out,
                "naive/batch at 100 B: {ratio:.2}× (target ≥ 4×): {}   \
                 [end-to-end: naive build+call ÷ batch pack+call]",
                pass(ratio >= MIN_NAIVE_RATIO),
            );
            let _ = writeln!(
                out,
                "  call only: {:.2}×   [naive call only ÷ batch call only]",
                r.ratio_call_only(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        assert_eq!(size_label(100), "100 B");
        assert_eq!(size_label(1024), "1 KiB");
        assert_eq!(size_label(1500), "1500 B");
    }

    #[test]
    fn table_pads_columns() {
        let t = table(&["a", "bb"], &[vec!["123".into(), "4".into()]]);
        assert_eq!(t, "|   a | bb |\n|----:|---:|\n| 123 |  4 |\n");
    }
}
