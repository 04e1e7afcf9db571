//! Packing records into the columnar batch that crosses into the guest.
//!
//! A batch is four columns: eight `u32` spans and two `u64` numbers per record, every payload
//! back to back in one byte list, and every partition key, sequence number and hash key back to
//! back in one string. Each column is a primitive list, which the canonical ABI copies with one
//! guest allocation and one `memcpy`, whatever the record count; a `list<record>` with string
//! fields costs an allocation and a copy per field per record (see the README's performance
//! section).

use crate::bindings::kinesis::task::types::{Batch as WitBatch, BatchInfo};

/// `u32` spans per record in [`WitBatch::spans`].
const SPANS: usize = 8;
/// `u64` numbers per record in [`WitBatch::numbers`].
const NUMBERS: usize = 2;

/// One record to pack, borrowed from wherever it was decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The payload.
    pub data: &'a [u8],
    /// The partition key.
    pub partition_key: &'a str,
    /// The sequence number (decimal).
    pub sequence_number: &'a str,
    /// Position inside a KPL aggregate, 0 otherwise.
    pub sub_sequence_number: u64,
    /// The explicit hash key, if any.
    pub explicit_hash_key: Option<&'a str>,
    /// Arrival time in milliseconds since the Unix epoch.
    pub approximate_arrival_millis: u64,
}

impl RecordRef<'_> {
    /// Bytes this record takes in a batch buffer.
    pub fn packed_len(&self) -> usize {
        self.data.len()
            + self.partition_key.len()
            + self.sequence_number.len()
            + self.explicit_hash_key.map_or(0, str::len)
    }
}

/// A reusable batch: filling it again after [`Batch::clear`] allocates nothing once its buffers
/// have grown to the working size.
#[derive(Debug)]
pub struct Batch {
    inner: WitBatch,
    max_records: usize,
    max_bytes: usize,
}

impl Batch {
    /// An empty batch for one shard, holding at most `max_records` records and `max_bytes`
    /// buffer bytes (a single larger record is still accepted into an empty batch).
    pub fn new(stream_name: &str, shard_id: &str, max_records: usize, max_bytes: usize) -> Self {
        Self {
            inner: WitBatch {
                info: BatchInfo {
                    stream_name: stream_name.to_owned(),
                    shard_id: shard_id.to_owned(),
                    millis_behind_latest: None,
                },
                spans: Vec::new(),
                numbers: Vec::new(),
                data: Vec::new(),
                text: String::new(),
            },
            max_records: max_records.max(1),
            // Offsets are u32: never let a column reach 4 GiB.
            max_bytes: max_bytes.min(u32::MAX as usize / 2),
        }
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.inner.spans.clear();
        self.inner.numbers.clear();
        self.inner.data.clear();
        self.inner.text.clear();
        self.inner.info.millis_behind_latest = None;
    }

    /// Sets how far behind the tip of the shard this batch's reader was.
    pub fn set_millis_behind_latest(&mut self, millis: Option<u64>) {
        self.inner.info.millis_behind_latest = millis;
    }

    /// The shard the batch is for.
    pub fn shard_id(&self) -> &str {
        &self.inner.info.shard_id
    }

    /// The stream the batch is for.
    pub fn stream_name(&self) -> &str {
        &self.inner.info.stream_name
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.inner.numbers.len() / NUMBERS
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.inner.numbers.is_empty()
    }

    /// Bytes of data and text in the batch.
    pub fn buffer_len(&self) -> usize {
        self.inner.data.len() + self.inner.text.len()
    }

    /// Whether `record` fits: the batch is below its record count and byte limits, or empty.
    pub fn fits(&self, record: &RecordRef<'_>) -> bool {
        self.is_empty()
            || (self.len() < self.max_records
                && self.buffer_len() + record.packed_len() <= self.max_bytes)
    }

    /// Appends `record` if it [fits](Self::fits); returns whether it did.
    #[inline]
    pub fn push(&mut self, record: &RecordRef<'_>) -> bool {
        if !self.fits(record) {
            return false;
        }
        // In range: `fits` keeps the columns below `max_bytes` < u32::MAX / 2, except for a single
        // record in an empty batch, which callers bound by the record size limit (10 MiB at most).
        let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let b = &mut self.inner;
        let (pk, seq, ehk) = (
            record.partition_key,
            record.sequence_number,
            record.explicit_hash_key.unwrap_or_default(),
        );
        let data_offset = len32(b.data.len());
        let pk_offset = len32(b.text.len());
        let seq_offset = pk_offset.saturating_add(len32(pk.len()));
        let ehk_offset = seq_offset.saturating_add(len32(seq.len()));
        b.data.extend_from_slice(record.data);
        b.text.reserve(pk.len() + seq.len() + ehk.len());
        b.text.push_str(pk);
        b.text.push_str(seq);
        b.text.push_str(ehk);
        b.spans.extend_from_slice(&[
            data_offset,
            len32(record.data.len()),
            pk_offset,
            len32(pk.len()),
            seq_offset,
            len32(seq.len()),
            ehk_offset,
            len32(ehk.len()),
        ]);
        b.numbers
            .extend_from_slice(&[record.sub_sequence_number, record.approximate_arrival_millis]);
        true
    }

    /// The record at `index`.
    pub fn get(&self, index: usize) -> Option<RecordRef<'_>> {
        let b = &self.inner;
        let spans = b.spans.get(index * SPANS..(index + 1) * SPANS)?;
        let numbers = b.numbers.get(index * NUMBERS..(index + 1) * NUMBERS)?;
        let range = |at: usize| spans[at] as usize..spans[at] as usize + spans[at + 1] as usize;
        let text = |at: usize| b.text.get(range(at)).unwrap_or_default();
        let explicit_hash_key = text(6);
        Some(RecordRef {
            data: b.data.get(range(0)).unwrap_or_default(),
            partition_key: text(2),
            sequence_number: text(4),
            sub_sequence_number: numbers[0],
            explicit_hash_key: (!explicit_hash_key.is_empty()).then_some(explicit_hash_key),
            approximate_arrival_millis: numbers[1],
        })
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// A new batch with the records in `range` of this one (used to deliver the rest of a
    /// batch again, or to set one record aside).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        let mut out = Batch::new(self.stream_name(), self.shard_id(), usize::MAX, usize::MAX);
        out.max_records = self.max_records;
        out.max_bytes = self.max_bytes;
        out.inner.info.millis_behind_latest = self.inner.info.millis_behind_latest;
        for record in range.filter_map(|i| self.get(i)) {
            out.force_push(&record);
        }
        out
    }

    fn force_push(&mut self, record: &RecordRef<'_>) {
        let (max_records, max_bytes) = (self.max_records, self.max_bytes);
        self.max_records = usize::MAX;
        self.max_bytes = usize::MAX;
        self.push(record);
        self.max_records = max_records;
        self.max_bytes = max_bytes;
    }

    pub(crate) fn wit(&self) -> &WitBatch {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(pk: &'a str, seq: &'a str, data: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            data,
            partition_key: pk,
            sequence_number: seq,
            sub_sequence_number: 0,
            explicit_hash_key: None,
            approximate_arrival_millis: 7,
        }
    }

    #[test]
    fn packs_and_reads_back_records() {
        let mut b = Batch::new("s", "shardId-1", 10, 1 << 20);
        assert!(b.push(&rec("a", "1", b"hello")));
        let mut with_key = rec("bb", "2", b"");
        with_key.explicit_hash_key = Some("42");
        with_key.sub_sequence_number = 3;
        assert!(b.push(&with_key));
        assert_eq!(b.len(), 2);
        assert_eq!(b.get(0), Some(rec("a", "1", b"hello")));
        assert_eq!(b.get(1), Some(with_key));
        assert_eq!(b.get(2), None);
    }

    #[test]
    fn respects_record_and_byte_limits_but_takes_one_oversized_record() {
        let mut b = Batch::new("s", "sh", 2, 10);
        let big = [0u8; 64];
        assert!(b.push(&rec("k", "1", &big)), "an empty batch takes any record");
        assert!(!b.push(&rec("k", "2", b"x")), "over the byte limit");
        b.clear();
        assert!(b.push(&rec("k", "1", b"x")));
        assert!(b.push(&rec("k", "2", b"y")));
        assert!(!b.push(&rec("k", "3", b"z")), "over the record limit");
    }

    #[test]
    fn slice_copies_a_range() {
        let mut b = Batch::new("s", "sh", 10, 100);
        for (i, seq) in ["1", "2", "3"].iter().enumerate() {
            b.push(&rec("k", seq, &[i as u8]));
        }
        let tail = b.slice(1..3);
        let seqs: Vec<_> = tail.iter().map(|r| r.sequence_number).collect();
        assert_eq!(seqs, ["2", "3"]);
        assert_eq!(tail.get(0).map(|r| r.data), Some(&[1u8][..]));
    }
}
