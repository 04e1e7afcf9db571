//! Borrowed views over the columnar batch the host passes to `process`.

use std::fmt;

use crate::__private::wit::kinesis::task::types;

/// `u32` spans per record (see the WIT `batch` record).
const SPANS: usize = 8;
/// `u64` numbers per record.
const NUMBERS: usize = 2;

/// The columns of a batch, borrowed.
#[derive(Clone, Copy)]
struct Columns<'a> {
    spans: &'a [u32],
    numbers: &'a [u64],
    data: &'a [u8],
    text: &'a str,
}

/// A batch of records from one shard, in shard order.
///
/// The host passes the records in columns (spans, numbers, one byte list of payloads, one
/// string of keys and sequence numbers); a `Batch` hands them out as [`Envelope`]s that borrow
/// from those columns, with no copies and no per-record checks beyond bounds.
pub struct Batch<'a> {
    info: &'a types::BatchInfo,
    columns: Columns<'a>,
}

impl<'a> Batch<'a> {
    pub(crate) fn new(batch: &'a types::Batch) -> Self {
        Self {
            info: &batch.info,
            columns: Columns {
                spans: &batch.spans,
                numbers: &batch.numbers,
                data: &batch.data,
                text: &batch.text,
            },
        }
    }

    /// The input stream's name, as the job's `task.inputs` names it.
    pub fn stream_name(&self) -> &'a str {
        &self.info.stream_name
    }

    /// The shard the records come from, such as `shardId-000000000000`.
    pub fn shard_id(&self) -> &'a str {
        &self.info.shard_id
    }

    /// How far behind the tip of the shard the reader was, when the service said.
    pub fn millis_behind_latest(&self) -> Option<u64> {
        self.info.millis_behind_latest
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        (self.columns.spans.len() / SPANS).min(self.columns.numbers.len() / NUMBERS)
    }

    /// Whether the batch holds no record (the host sends those only when the job asks for them).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Envelope<'a>> {
        (index < self.len()).then_some(Envelope { columns: self.columns, index })
    }

    /// The records, in shard order.
    pub fn iter(&self) -> Iter<'a> {
        Iter { columns: self.columns, next: 0, len: self.len() }
    }
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("stream_name", &self.stream_name())
            .field("shard_id", &self.shard_id())
            .field("len", &self.len())
            .finish()
    }
}

impl<'a> IntoIterator for &Batch<'a> {
    type Item = Envelope<'a>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Iterator over a [`Batch`]'s records.
pub struct Iter<'a> {
    columns: Columns<'a>,
    next: usize,
    len: usize,
}

impl fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").field("next", &self.next).field("len", &self.len).finish()
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = Envelope<'a>;

    #[inline]
    fn next(&mut self) -> Option<Envelope<'a>> {
        if self.next >= self.len {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(Envelope { columns: self.columns, index })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.len - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// One Kinesis record, borrowed from its batch.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    columns: Columns<'a>,
    index: usize,
}

impl<'a> Envelope<'a> {
    /// Span `at` (0: data, 2: partition key, 4: sequence number, 6: explicit hash key) as a
    /// byte range. `index < len` was checked when the envelope was made, so the spans exist.
    #[inline]
    fn range(&self, at: usize) -> std::ops::Range<usize> {
        let base = self.index * SPANS + at;
        let (offset, len) = match self.columns.spans.get(base..base + 2) {
            Some(&[offset, len]) => (offset as usize, len as usize),
            _ => (0, 0),
        };
        offset..offset.saturating_add(len)
    }

    #[inline]
    fn text(&self, at: usize) -> &'a str {
        // `str::get` checks only that the range is in bounds and on character boundaries: the
        // component model checked the whole string once when it crossed.
        self.columns.text.get(self.range(at)).unwrap_or_default()
    }

    #[inline]
    fn number(&self, at: usize) -> u64 {
        self.columns.numbers.get(self.index * NUMBERS + at).copied().unwrap_or_default()
    }

    /// The record's position in its batch; what [`TaskError::poison`](crate::TaskError::poison)
    /// and [`Done::Leading`](crate::Done::Leading) count in.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The record's data: the user payload, de-aggregated if a KPL producer wrote it.
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        self.columns.data.get(self.range(0)).unwrap_or_default()
    }

    /// The partition key the producer chose.
    #[inline]
    pub fn partition_key(&self) -> &'a str {
        self.text(2)
    }

    /// The record's sequence number, a decimal string unique within the shard.
    #[inline]
    pub fn sequence_number(&self) -> &'a str {
        self.text(4)
    }

    /// The position of the record inside a KPL aggregate; 0 for a record that was not aggregated.
    pub fn sub_sequence_number(&self) -> u64 {
        self.number(0)
    }

    /// The explicit hash key, when the producer set one (KPL aggregates carry them per record).
    pub fn explicit_hash_key(&self) -> Option<&'a str> {
        Some(self.text(6)).filter(|k| !k.is_empty())
    }

    /// When Kinesis accepted the record, in milliseconds since the Unix epoch.
    pub fn approximate_arrival_millis(&self) -> u64 {
        self.number(1)
    }
}

impl fmt::Debug for Envelope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("index", &self.index)
            .field("partition_key", &self.partition_key())
            .field("sequence_number", &self.sequence_number())
            .field("sub_sequence_number", &self.sub_sequence_number())
            .field("data_len", &self.data().len())
            .finish()
    }
}
