//! Tasks' own metrics (the `metrics` import) on `/metrics`: three metric families whose series
//! carry the task's metric name as the label `name` beside `job`, `stream` and `shard`:
//!
//! ```text
//! kinesis_task_counter_total{job="orders",stream="orders",shard="shardId-000000000000",name="alerts"} 12
//! kinesis_task_gauge{job="orders",stream="orders",shard="shardId-000000000000",name="queue_depth"} 3
//! kinesis_task_histogram_bucket{job="orders",…,name="latency_ms",le="10"} 7
//! kinesis_task_histogram_sum{…} / kinesis_task_histogram_count{…}
//! ```
//!
//! A name is a label value rather than part of the metric name so that no task's choice of
//! names can clash with another's (or with the host's metrics) and break a scrape for everyone.
//! Each shard keeps at most `task.limits.metric.names` names (over all the instances it had:
//! an instance re-created after a trap cannot bring new ones), and a shard's series are removed
//! when it stops on this host, so the series a job makes are bounded by its limit times the
//! shards this host holds.
//!
//! Nothing is recorded until [`install`] is called (by `run` with `metrics.address`, by `serve`
//! with `--metrics-address`): without an endpoint, [`record`] costs a check of a global.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use kinesis_host_runtime::{HISTOGRAM_BUCKETS, Histogram, MetricChange};

/// The counters' family.
pub const COUNTER: &str = "kinesis_task_counter_total";
/// The gauges' family.
pub const GAUGE: &str = "kinesis_task_gauge";
/// The histograms' family.
pub const HISTOGRAM: &str = "kinesis_task_histogram";

/// A shard's place among the series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ShardKey {
    job: String,
    stream: String,
    shard: String,
}

#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Box<Histogram>),
}

/// Every shard's task metrics on this host.
#[derive(Debug, Default)]
pub struct TaskMetrics {
    shards: Mutex<BTreeMap<ShardKey, BTreeMap<Arc<str>, Value>>>,
}

static INSTALLED: OnceLock<TaskMetrics> = OnceLock::new();

/// Starts keeping task metrics for `/metrics` (idempotent).
pub fn install() -> &'static TaskMetrics {
    INSTALLED.get_or_init(TaskMetrics::default)
}

/// The installed registry, if any.
pub fn installed() -> Option<&'static TaskMetrics> {
    INSTALLED.get()
}

/// Adds one call's metric changes of a shard's task (no-op unless [`install`]ed). `limit` is
/// the job's `task.limits.metric.names`.
pub fn record(
    job: &str,
    stream: &str,
    shard: &str,
    limit: usize,
    changes: Vec<(Arc<str>, MetricChange)>,
) {
    if let Some(registry) = installed()
        && !changes.is_empty()
    {
        registry.apply(job, stream, shard, limit, changes);
    }
}

/// Removes a shard's series (it stopped on this host).
pub fn forget(job: &str, stream: &str, shard: &str) {
    if let Some(registry) = installed() {
        registry.remove(job, stream, shard);
    }
}

impl TaskMetrics {
    fn apply(
        &self,
        job: &str,
        stream: &str,
        shard: &str,
        limit: usize,
        changes: Vec<(Arc<str>, MetricChange)>,
    ) {
        let key =
            ShardKey { job: job.to_owned(), stream: stream.to_owned(), shard: shard.to_owned() };
        let mut shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        let series = shards.entry(key).or_default();
        for (name, change) in changes {
            if !series.contains_key(&name) && series.len() >= limit {
                continue;
            }
            let value = series.entry(name).or_insert_with(|| match &change {
                MetricChange::Counter(_) => Value::Counter(0),
                MetricChange::Gauge(_) => Value::Gauge(0.0),
                MetricChange::Histogram(_) => Value::Histogram(Box::default()),
            });
            // A name that a re-created instance uses as another type keeps its first type.
            match (value, change) {
                (Value::Counter(total), MetricChange::Counter(added)) => {
                    *total = total.saturating_add(added);
                }
                (Value::Gauge(last), MetricChange::Gauge(now)) => *last = now,
                (Value::Histogram(all), MetricChange::Histogram(new)) => all.add(&new),
                _ => {}
            }
        }
    }

    fn remove(&self, job: &str, stream: &str, shard: &str) {
        let key =
            ShardKey { job: job.to_owned(), stream: stream.to_owned(), shard: shard.to_owned() };
        self.shards.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
    }

    /// The series in Prometheus' text format, to follow the host's own metrics.
    pub fn render(&self) -> String {
        let shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut counters, mut gauges, mut histograms) =
            (String::new(), String::new(), String::new());
        for (shard, series) in shards.iter() {
            for (name, value) in series {
                let labels = format!(
                    "job=\"{}\",stream=\"{}\",shard=\"{}\",name=\"{}\"",
                    escape(&shard.job),
                    escape(&shard.stream),
                    escape(&shard.shard),
                    escape(name)
                );
                match value {
                    Value::Counter(total) => {
                        let _ = writeln!(counters, "{COUNTER}{{{labels}}} {total}");
                    }
                    Value::Gauge(last) => {
                        let _ = writeln!(gauges, "{GAUGE}{{{labels}}} {}", number(*last));
                    }
                    Value::Histogram(h) => {
                        let mut cumulative = 0u64;
                        for (i, count) in h.buckets.iter().enumerate() {
                            cumulative = cumulative.saturating_add(*count);
                            let le =
                                HISTOGRAM_BUCKETS.get(i).map_or("+Inf".to_owned(), |b| number(*b));
                            let _ = writeln!(
                                histograms,
                                "{HISTOGRAM}_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                            );
                        }
                        let _ =
                            writeln!(histograms, "{HISTOGRAM}_sum{{{labels}}} {}", number(h.sum));
                        let _ = writeln!(histograms, "{HISTOGRAM}_count{{{labels}}} {}", h.count);
                    }
                }
            }
        }
        let mut out = String::new();
        for (family, kind, help, body) in [
            (
                COUNTER,
                "counter",
                "Counters of the tasks (the metrics import), by task metric name.",
                counters,
            ),
            (
                GAUGE,
                "gauge",
                "Gauges of the tasks (the metrics import), by task metric name.",
                gauges,
            ),
            (
                HISTOGRAM,
                "histogram",
                "Histograms of the tasks (the metrics import), by task metric name.",
                histograms,
            ),
        ] {
            if body.is_empty() {
                continue;
            }
            // The counter family's name carries the `_total` suffix of its samples.
            let _ = writeln!(out, "# HELP {family} {help}");
            let _ = writeln!(out, "# TYPE {family} {kind}");
            out.push_str(&body);
            out.push('\n');
        }
        out
    }
}

/// A label value escaped as the text format wants it.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as the text format writes it.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() }
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_bounded_and_rendered_per_family() {
        let m = TaskMetrics::default();
        let mut h = Histogram::default();
        h.buckets[0] = 1;
        h.buckets[3] = 2;
        h.count = 3;
        h.sum = 1.5;
        m.apply(
            "j\"x",
            "s",
            "shardId-000000000000",
            3,
            vec![
                ("hits".into(), MetricChange::Counter(2)),
                ("depth".into(), MetricChange::Gauge(7.5)),
                ("lat".into(), MetricChange::Histogram(Box::new(h))),
                ("more".into(), MetricChange::Counter(1)),
            ],
        );
        // Counters add up; a name of another type and a fourth name are ignored.
        m.apply(
            "j\"x",
            "s",
            "shardId-000000000000",
            3,
            vec![
                ("hits".into(), MetricChange::Counter(3)),
                ("depth".into(), MetricChange::Counter(1)),
            ],
        );
        let text = m.render();
        let labels = r#"job="j\"x",stream="s",shard="shardId-000000000000""#;
        assert!(text.contains(&format!("# TYPE {COUNTER} counter\n")), "{text}");
        assert!(text.contains(&format!("{COUNTER}{{{labels},name=\"hits\"}} 5\n")), "{text}");
        assert!(!text.contains("name=\"more\""), "{text}");
        assert!(text.contains(&format!("{GAUGE}{{{labels},name=\"depth\"}} 7.5\n")), "{text}");
        assert!(
            text.contains(&format!("{HISTOGRAM}_bucket{{{labels},name=\"lat\",le=\"0.001\"}} 1\n"))
        );
        assert!(
            text.contains(&format!("{HISTOGRAM}_bucket{{{labels},name=\"lat\",le=\"1\"}} 3\n"))
        );
        assert!(
            text.contains(&format!("{HISTOGRAM}_bucket{{{labels},name=\"lat\",le=\"+Inf\"}} 3\n"))
        );
        assert!(text.contains(&format!("{HISTOGRAM}_count{{{labels},name=\"lat\"}} 3\n")));
        m.remove("j\"x", "s", "shardId-000000000000");
        assert_eq!(m.render(), "");
    }
}
