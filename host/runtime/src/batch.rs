//! Packing records into the columnar batch that crosses into the guest.
//!
//! A batch is one byte buffer with every payload, partition key, sequence number and hash key,
//! plus a fixed-size entry per record pointing into it. The canonical ABI copies it into guest
//! memory with three allocations, whatever the record count; a `list<record>` with strings
//! would cost three allocations per record (see `wasm-perf` in the README).

use crate::bindings::kinesis::task::types::{Batch as WitBatch, BatchInfo, RecordMeta};

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
                records: Vec::new(),
                buffer: Vec::new(),
            },
            max_records: max_records.max(1),
            // Offsets are u32: never let the buffer reach 4 GiB.
            max_bytes: max_bytes.min(u32::MAX as usize / 2),
        }
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.inner.records.clear();
        self.inner.buffer.clear();
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
        self.inner.records.len()
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.inner.records.is_empty()
    }

    /// Bytes in the batch's buffer.
    pub fn buffer_len(&self) -> usize {
        self.inner.buffer.len()
    }

    /// Whether `record` fits: the batch is below its record count and byte limits, or empty.
    pub fn fits(&self, record: &RecordRef<'_>) -> bool {
        self.is_empty()
            || (self.len() < self.max_records
                && self.buffer_len() + record.packed_len() <= self.max_bytes)
    }

    /// Appends `record` if it [fits](Self::fits); returns whether it did.
    pub fn push(&mut self, record: &RecordRef<'_>) -> bool {
        if !self.fits(record) {
            return false;
        }
        let buffer = &mut self.inner.buffer;
        let mut span = |bytes: &[u8]| {
            // In range: `fits` keeps the buffer below `max_bytes` < u32::MAX, except for a
            // single record in an empty batch, which the caller bounds by the record size limit.
            let offset = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
            buffer.extend_from_slice(bytes);
            (offset, u32::try_from(bytes.len()).unwrap_or(u32::MAX))
        };
        let (data_offset, data_len) = span(record.data);
        let (partition_key_offset, partition_key_len) = span(record.partition_key.as_bytes());
        let (sequence_number_offset, sequence_number_len) = span(record.sequence_number.as_bytes());
        let (explicit_hash_key_offset, explicit_hash_key_len) =
            span(record.explicit_hash_key.unwrap_or_default().as_bytes());
        self.inner.records.push(RecordMeta {
            data_offset,
            data_len,
            partition_key_offset,
            partition_key_len,
            sequence_number_offset,
            sequence_number_len,
            explicit_hash_key_offset,
            explicit_hash_key_len,
            sub_sequence_number: record.sub_sequence_number,
            approximate_arrival_millis: record.approximate_arrival_millis,
        });
        true
    }

    /// The record at `index`.
    pub fn get(&self, index: usize) -> Option<RecordRef<'_>> {
        let meta = self.inner.records.get(index)?;
        let buffer = &self.inner.buffer;
        let bytes = |offset: u32, len: u32| -> &[u8] {
            buffer.get(offset as usize..offset as usize + len as usize).unwrap_or_default()
        };
        // Strings were pushed from `&str`, so they are valid UTF-8.
        let text = |offset, len| std::str::from_utf8(bytes(offset, len)).unwrap_or_default();
        Some(RecordRef {
            data: bytes(meta.data_offset, meta.data_len),
            partition_key: text(meta.partition_key_offset, meta.partition_key_len),
            sequence_number: text(meta.sequence_number_offset, meta.sequence_number_len),
            sub_sequence_number: meta.sub_sequence_number,
            explicit_hash_key: (meta.explicit_hash_key_len > 0)
                .then(|| text(meta.explicit_hash_key_offset, meta.explicit_hash_key_len)),
            approximate_arrival_millis: meta.approximate_arrival_millis,
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
