//! Borrowed views over the columnar batch the host passes to `process`.

use std::fmt;

use crate::__private::wit::kinesis::task::types::{self, RecordMeta};

/// A batch of records from one shard, in shard order.
///
/// The host passes the records as one byte buffer plus fixed-size entries that point into it;
/// a `Batch` hands them out as [`Envelope`]s that borrow from that buffer, with no copies.
pub struct Batch<'a> {
    info: &'a types::BatchInfo,
    records: &'a [RecordMeta],
    buffer: &'a [u8],
}

impl<'a> Batch<'a> {
    pub(crate) fn new(batch: &'a types::Batch) -> Self {
        Self { info: &batch.info, records: &batch.records, buffer: &batch.buffer }
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
        self.records.len()
    }

    /// Whether the batch holds no record (the host sends those only when the job asks for them).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The record at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Envelope<'a>> {
        self.records.get(index).map(|meta| Envelope { meta, buffer: self.buffer, index })
    }

    /// The records, in shard order.
    pub fn iter(&self) -> Iter<'a> {
        Iter { records: self.records.iter().enumerate(), buffer: self.buffer }
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
#[derive(Debug)]
pub struct Iter<'a> {
    records: std::iter::Enumerate<std::slice::Iter<'a, RecordMeta>>,
    buffer: &'a [u8],
}

impl<'a> Iterator for Iter<'a> {
    type Item = Envelope<'a>;

    #[inline]
    fn next(&mut self) -> Option<Envelope<'a>> {
        let (index, meta) = self.records.next()?;
        Some(Envelope { meta, buffer: self.buffer, index })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// One Kinesis record, borrowed from its batch.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    meta: &'a RecordMeta,
    buffer: &'a [u8],
    index: usize,
}

impl<'a> Envelope<'a> {
    #[inline]
    fn span(&self, offset: u32, len: u32) -> &'a [u8] {
        let start = offset as usize;
        // The host builds the spans; an out-of-range one yields an empty slice, never a panic.
        start
            .checked_add(len as usize)
            .and_then(|end| self.buffer.get(start..end))
            .unwrap_or_default()
    }

    #[inline]
    fn text(&self, offset: u32, len: u32) -> &'a str {
        std::str::from_utf8(self.span(offset, len)).unwrap_or_default()
    }

    /// The record's position in its batch; what [`TaskError::poison`](crate::TaskError::poison)
    /// and [`Done::Leading`](crate::Done::Leading) count in.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The record's data: the user payload, de-aggregated if a KPL producer wrote it.
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        self.span(self.meta.data_offset, self.meta.data_len)
    }

    /// The partition key the producer chose.
    #[inline]
    pub fn partition_key(&self) -> &'a str {
        self.text(self.meta.partition_key_offset, self.meta.partition_key_len)
    }

    /// The record's sequence number, a decimal string unique within the shard.
    pub fn sequence_number(&self) -> &'a str {
        self.text(self.meta.sequence_number_offset, self.meta.sequence_number_len)
    }

    /// The position of the record inside a KPL aggregate; 0 for a record that was not aggregated.
    pub fn sub_sequence_number(&self) -> u64 {
        self.meta.sub_sequence_number
    }

    /// The explicit hash key, when the producer set one (KPL aggregates carry them per record).
    pub fn explicit_hash_key(&self) -> Option<&'a str> {
        (self.meta.explicit_hash_key_len > 0)
            .then(|| self.text(self.meta.explicit_hash_key_offset, self.meta.explicit_hash_key_len))
    }

    /// When Kinesis accepted the record, in milliseconds since the Unix epoch.
    pub fn approximate_arrival_millis(&self) -> u64 {
        self.meta.approximate_arrival_millis
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
