//! A task's metrics (the `metrics` import), as one instance holds them: a bounded table of
//! names, each a counter, a gauge or a histogram with fixed buckets, plus what changed since the
//! host last took the changes (to export them under the job's labels).

use std::collections::BTreeMap;
use std::sync::Arc;

/// The longest metric name, in bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 64;

/// Upper bounds of a task histogram's buckets (a `+Inf` bucket follows): powers of ten from a
/// thousandth to a million, so that seconds, milliseconds, bytes and counts all land in a
/// bucket that says something.
pub const HISTOGRAM_BUCKETS: [f64; 10] = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

/// A histogram's observations: per bucket (the last one is `+Inf`), their count and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Observations per bucket, not cumulative: `buckets[i]` counts values at most
    /// `HISTOGRAM_BUCKETS[i]` and above the bound before; the last one counts the rest.
    pub buckets: [u64; HISTOGRAM_BUCKETS.len() + 1],
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: [0; HISTOGRAM_BUCKETS.len() + 1], count: 0, sum: 0.0 }
    }
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        let bucket =
            HISTOGRAM_BUCKETS.iter().position(|b| value <= *b).unwrap_or(HISTOGRAM_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum += value;
    }

    /// Adds `other`'s observations to these.
    pub fn add(&mut self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
    }
}

/// A metric's value as the instance holds it (since it was created).
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// A counter's total.
    Counter(u64),
    /// A gauge's last value.
    Gauge(f64),
    /// A histogram's observations.
    Histogram(Box<Histogram>),
}

/// What changed in one metric since the changes were last taken.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricChange {
    /// Added to the counter.
    Counter(u64),
    /// The gauge's last value.
    Gauge(f64),
    /// New observations.
    Histogram(Box<Histogram>),
}

/// Why a metric update was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The name is not 1 to [`MAX_METRIC_NAME_BYTES`] letters, digits or `_`, starting with a
    /// letter or `_`.
    BadName,
    /// The instance already uses `task.limits.metric.names` names.
    TooMany,
    /// The name is already a metric of another type.
    WrongType,
    /// A histogram observation that is not a finite number.
    NotFinite,
}

impl Refused {
    pub(crate) fn describe(self, limit: usize) -> String {
        match self {
            Refused::BadName => format!(
                "a metric name must be 1 to {MAX_METRIC_NAME_BYTES} ASCII letters, digits or '_', not starting with a digit"
            ),
            Refused::TooMany => {
                format!("the task already uses {limit} metric names (task.limits.metric.names)")
            }
            Refused::WrongType => "the name is already a metric of another type".to_owned(),
            Refused::NotFinite => "a histogram observation must be a finite number".to_owned(),
        }
    }
}

/// Whether `name` may name a metric: it becomes part of a Prometheus metric name.
pub(crate) fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_METRIC_NAME_BYTES
        && !bytes[0].is_ascii_digit()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

#[derive(Debug)]
struct Entry {
    value: MetricValue,
    change: Option<MetricChange>,
}

/// One instance's metrics: at most `limit` names of at most [`MAX_METRIC_NAME_BYTES`] each, so
/// what a task can make the host hold here is bounded whatever it calls.
#[derive(Debug)]
pub(crate) struct Metrics {
    limit: usize,
    entries: BTreeMap<Arc<str>, Entry>,
    /// Whether some entry has a change to take.
    changed: bool,
}

impl Metrics {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit, entries: BTreeMap::new(), changed: false }
    }

    pub(crate) fn counter(&mut self, name: &str, value: u64) -> Result<(), Refused> {
        let entry = self.entry(name, || MetricValue::Counter(0))?;
        let MetricValue::Counter(total) = &mut entry.value else { return Err(Refused::WrongType) };
        *total = total.saturating_add(value);
        match &mut entry.change {
            Some(MetricChange::Counter(added)) => *added = added.saturating_add(value),
            change => *change = Some(MetricChange::Counter(value)),
        }
        self.changed = true;
        Ok(())
    }

    pub(crate) fn gauge(&mut self, name: &str, value: f64) -> Result<(), Refused> {
        let entry = self.entry(name, || MetricValue::Gauge(0.0))?;
        let MetricValue::Gauge(last) = &mut entry.value else { return Err(Refused::WrongType) };
        *last = value;
        entry.change = Some(MetricChange::Gauge(value));
        self.changed = true;
        Ok(())
    }

    pub(crate) fn histogram(&mut self, name: &str, value: f64) -> Result<(), Refused> {
        if !value.is_finite() {
            return Err(Refused::NotFinite);
        }
        let entry = self.entry(name, || MetricValue::Histogram(Box::default()))?;
        let MetricValue::Histogram(all) = &mut entry.value else { return Err(Refused::WrongType) };
        all.observe(value);
        match &mut entry.change {
            Some(MetricChange::Histogram(new)) => new.observe(value),
            change => {
                let mut new = Box::<Histogram>::default();
                new.observe(value);
                *change = Some(MetricChange::Histogram(new));
            }
        }
        self.changed = true;
        Ok(())
    }

    /// The entry of `name`, created with `initial` while there is room.
    fn entry(
        &mut self,
        name: &str,
        initial: impl FnOnce() -> MetricValue,
    ) -> Result<&mut Entry, Refused> {
        if !self.entries.contains_key(name) {
            if !valid_name(name) {
                return Err(Refused::BadName);
            }
            if self.entries.len() >= self.limit {
                return Err(Refused::TooMany);
            }
            self.entries.insert(name.into(), Entry { value: initial(), change: None });
        }
        self.entries.get_mut(name).ok_or(Refused::TooMany)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = (&str, &MetricValue)> {
        self.entries.iter().map(|(name, e)| (&**name, &e.value))
    }

    /// What changed since the last call, by name.
    pub(crate) fn take_changes(&mut self) -> Vec<(Arc<str>, MetricChange)> {
        if !std::mem::take(&mut self.changed) {
            return Vec::new();
        }
        self.entries
            .iter_mut()
            .filter_map(|(name, e)| e.change.take().map(|c| (name.clone(), c)))
            .collect()
    }

    /// Bytes the table holds (names and values), for the host's accounting.
    pub(crate) fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(name, e)| {
                let histogram = matches!(e.value, MetricValue::Histogram(_));
                name.len() + 64 + if histogram { 2 * size_of::<Histogram>() } else { 0 }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_bounded() {
        assert!(valid_name("records_seen") && valid_name("_x9") && valid_name(&"a".repeat(64)));
        for bad in
            ["", "9lives", "with space", "dash-ed", "dot.ted", "ünï", "a\nb", &"a".repeat(65)]
        {
            assert!(!valid_name(bad), "{bad:?}");
        }
        let mut m = Metrics::new(2);
        assert_eq!(m.counter("a", 1), Ok(()));
        assert_eq!(m.gauge("b", 1.5), Ok(()));
        assert_eq!(m.counter("c", 1), Err(Refused::TooMany));
        assert_eq!(m.gauge("a", 1.0), Err(Refused::WrongType));
        assert_eq!(m.counter(&"x".repeat(1 << 20), 1), Err(Refused::BadName));
        assert_eq!(m.histogram("a", f64::NAN), Err(Refused::NotFinite));
        assert!(m.bytes() < 1024, "{}", m.bytes());
    }

    #[test]
    fn changes_accumulate_until_taken() {
        let mut m = Metrics::new(10);
        m.counter("n", 2).ok();
        m.counter("n", 3).ok();
        m.gauge("g", 1.0).ok();
        m.gauge("g", 7.0).ok();
        for v in [0.0005, 0.5, 2e6] {
            m.histogram("h", v).ok();
        }
        let changes: BTreeMap<_, _> = m.take_changes().into_iter().collect();
        assert_eq!(changes.get("n"), Some(&MetricChange::Counter(5)));
        assert_eq!(changes.get("g"), Some(&MetricChange::Gauge(7.0)));
        let Some(MetricChange::Histogram(h)) = changes.get("h") else { panic!("{changes:?}") };
        assert_eq!((h.count, h.buckets[0], h.buckets[3], h.buckets[10]), (3, 1, 1, 1));
        assert!(m.take_changes().is_empty());
        m.counter("n", 1).ok();
        assert_eq!(m.take_changes(), vec![("n".into(), MetricChange::Counter(1))]);
        let totals: BTreeMap<_, _> = m.values().collect();
        assert_eq!(totals.get("n"), Some(&&MetricValue::Counter(6)));
    }
}
