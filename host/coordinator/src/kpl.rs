//! De-aggregation of records written by the Kinesis Producer Library (KPL).
//!
//! The KPL packs several *user records* into one Kinesis record. Such a record's data is
//!
//! ```text
//! F3 89 9A C2 | protobuf AggregatedRecord | MD5 of the protobuf bytes (16 bytes)
//! ```
//!
//! [`deaggregate`] turns one Kinesis record into the user records it carries, following the
//! KCL's `AggregatorUtil.deaggregate`: anything that is not a well-formed aggregate is handed on
//! unchanged as a single, non-aggregated user record, sub-sequence numbers are positions within
//! the aggregate, and an aggregate that strays outside the shard's hash key range is dropped as
//! a whole (see [`deaggregate`] for the exact rule and the few deliberate differences).
//!
//! [`aggregate`] is the inverse, for tests and tools that need real aggregates.
//!
//! # Zero copy
//!
//! [`KinesisRecord::data`] is a [`Bytes`]: the protobuf is decoded straight out of it, so every
//! user record's [`UserRecord::data`] is a slice of the Kinesis record's buffer rather than a
//! copy, and a pass-through record shares the buffer too. The SDK's `Blob` converts for free
//! (`Bytes::from(blob.into_inner())`). The only per-record allocations are the user record's
//! own partition key and explicit hash key strings.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;

/// The four bytes every KPL aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that ends every KPL aggregate.
const DIGEST_LEN: usize = 16;

// ---------------------------------------------------------------------------------------------
// Wire messages (proto2, written by hand rather than generated).
//
// Required fields are declared `optional` so that a missing one can be told apart from a zero
// and rejected, as the Java protobuf runtime the KCL uses rejects it. Strings are decoded as
// bytes: proto2 does not require valid UTF-8 and the Java runtime does not check it, it replaces
// bad sequences when the string is read. Everything is `Bytes`, sliced from the input.
// ---------------------------------------------------------------------------------------------

/// The protobuf body of a KPL aggregate.
#[derive(Clone, PartialEq, Message)]
struct AggregatedRecord {
    /// Partition keys, referenced by index from the records.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    partition_key_table: Vec<Bytes>,
    /// Explicit hash keys (decimal strings), referenced by index from the records.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    explicit_hash_key_table: Vec<Bytes>,
    /// The user records, in order.
    #[prost(message, repeated, tag = "3")]
    records: Vec<Record>,
}

/// One user record inside an [`AggregatedRecord`].
#[derive(Clone, PartialEq, Message)]
struct Record {
    /// Index into `partition_key_table` (required).
    #[prost(uint64, optional, tag = "1")]
    partition_key_index: Option<u64>,
    /// Index into `explicit_hash_key_table`.
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    /// The user's payload (required).
    #[prost(bytes = "bytes", optional, tag = "3")]
    data: Option<Bytes>,
    /// Unused by the KPL and the KCL; decoded only so that malformed tags are rejected as the
    /// KCL rejects them.
    #[prost(message, repeated, tag = "4")]
    tags: Vec<Tag>,
}

/// A key/value tag on a [`Record`] (unused).
#[derive(Clone, PartialEq, Message)]
struct Tag {
    /// Required.
    #[prost(bytes = "bytes", optional, tag = "1")]
    key: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "2")]
    value: Option<Bytes>,
}

// ---------------------------------------------------------------------------------------------
// Public types.
// ---------------------------------------------------------------------------------------------

/// One user record out of a Kinesis record (the record itself when it was not aggregated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// The user's payload. A slice of the Kinesis record's buffer, not a copy.
    pub data: Bytes,
    /// The user record's partition key (for a pass-through record, the Kinesis record's).
    pub partition_key: String,
    /// The user record's explicit hash key, as the decimal string the producer gave.
    pub explicit_hash_key: Option<String>,
    /// Position within the aggregate, from 0; always 0 for a record that was not aggregated.
    /// Together with the Kinesis sequence number it forms the KCL's extended sequence number,
    /// which is what a checkpoint stores (`checkpointSubSequenceNumber`).
    pub sub_sequence_number: u64,
    /// Whether this user record came out of a KPL aggregate.
    pub aggregated: bool,
}

/// What [`deaggregate`] needs of a Kinesis record.
#[derive(Debug, Clone)]
pub struct KinesisRecord<'a> {
    /// The record's data. A [`Bytes`] so that the user records can share it (see the module
    /// docs).
    pub data: Bytes,
    /// The record's partition key.
    pub partition_key: &'a str,
    /// The record's explicit hash key, if known. `GetRecords` does not return one, so this is
    /// usually `None`; it is only copied onto a pass-through record.
    pub explicit_hash_key: Option<&'a str>,
}

/// A shard's hash key range, inclusive at both ends, as decimal-parsed `u128`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashKeyRange {
    /// The shard's `StartingHashKey`.
    pub start: u128,
    /// The shard's `EndingHashKey`.
    pub end: u128,
}

impl HashKeyRange {
    /// Parses the decimal `StartingHashKey` / `EndingHashKey` strings of a shard's
    /// `HashKeyRange`, as `ListShards` returns them. `None` if either is not a decimal `u128`.
    pub fn parse(start: &str, end: &str) -> Option<Self> {
        Some(Self { start: parse_hash_key(start)?, end: parse_hash_key(end)? })
    }

    /// Whether `key` lies within the range, both ends included.
    pub fn contains(&self, key: u128) -> bool {
        self.start <= key && key <= self.end
    }
}

/// The outcome of [`deaggregate`] for one Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deaggregated {
    /// The user records, in order. Exactly one (the Kinesis record itself) when the record was
    /// not a well-formed aggregate; none when the aggregate was dropped by the hash range filter
    /// or, like the KCL, when a well-formed aggregate holds no records.
    pub records: Vec<UserRecord>,
    /// Whether the Kinesis record was a well-formed KPL aggregate (and so [`Self::records`] are
    /// its user records, each with [`UserRecord::aggregated`] set).
    pub was_aggregate: bool,
    /// How many user records the hash range filter dropped: 0, or every record of the aggregate.
    pub dropped_by_hash_range: usize,
    /// Why a record that started with [`MAGIC`] was nevertheless passed through unchanged.
    /// `None` for well-formed aggregates and for records without the magic.
    pub malformed: Option<MalformedAggregate>,
}

/// Why a record that starts with the KPL magic was not treated as an aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedAggregate {
    /// There is no room for a non-empty protobuf message between the magic and the digest.
    #[error("KPL aggregate too short: {len} bytes")]
    TooShort {
        /// Length of the record's data.
        len: usize,
    },
    /// The trailing 16 bytes are not the MD5 of the protobuf message.
    #[error("KPL aggregate MD5 digest mismatch")]
    DigestMismatch,
    /// The protobuf message does not decode.
    #[error("KPL aggregate protobuf does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A proto2 `required` field is absent.
    #[error("KPL aggregate record {record} lacks required field {field}")]
    MissingField {
        /// Position of the user record in the aggregate.
        record: usize,
        /// Name of the missing field.
        field: &'static str,
    },
    /// `partition_key_index` points past the end of `partition_key_table`.
    #[error("KPL aggregate record {record}: partition key index {index} out of {table_len}")]
    PartitionKeyIndex {
        /// Position of the user record in the aggregate.
        record: usize,
        /// The index found.
        index: u64,
        /// Length of the table.
        table_len: usize,
    },
    /// `explicit_hash_key_index` points past the end of `explicit_hash_key_table`.
    #[error("KPL aggregate record {record}: explicit hash key index {index} out of {table_len}")]
    ExplicitHashKeyIndex {
        /// Position of the user record in the aggregate.
        record: usize,
        /// The index found.
        index: u64,
        /// Length of the table.
        table_len: usize,
    },
    /// An explicit hash key is not a decimal integer, so the hash range filter cannot place it.
    /// Only checked when a range is given.
    #[error("KPL aggregate record {record}: explicit hash key is not a decimal integer")]
    InvalidExplicitHashKey {
        /// Position of the user record in the aggregate.
        record: usize,
    },
}

/// One user record for [`aggregate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregateEntry<'a> {
    /// The user record's partition key.
    pub partition_key: &'a str,
    /// The user record's explicit hash key (decimal), if any.
    pub explicit_hash_key: Option<&'a str>,
    /// The user record's payload.
    pub data: &'a [u8],
}

// ---------------------------------------------------------------------------------------------
// Hash keys.
// ---------------------------------------------------------------------------------------------

/// The hash key Kinesis derives from a partition key: the MD5 of its UTF-8 bytes, read as a
/// big-endian unsigned 128-bit integer.
pub fn partition_key_hash(key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(key.as_bytes()).into())
}

/// Parses a decimal hash key (an explicit hash key or a shard range bound): one or more ASCII
/// digits, leading zeros allowed, no sign, at most `u128::MAX`.
pub fn parse_hash_key(s: &str) -> Option<u128> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only digits remain, so the sole possible failure is overflow.
    s.parse().ok()
}

/// An explicit hash key as Java's `new BigInteger(String)` reads it, relative to `u128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExplicitHashKey {
    /// A value in `0..=u128::MAX`.
    Value(u128),
    /// A valid integer outside `0..=u128::MAX` (negative or too large): outside every shard.
    OutsideU128,
    /// Not an integer: `BigInteger` would throw.
    NotANumber,
}

/// Reads an explicit hash key as the KCL does (`new BigInteger(ehk)`): an optional `+` or `-`
/// then decimal digits. Java also accepts non-ASCII Unicode digits; those count as not a number
/// here.
fn read_explicit_hash_key(s: &str) -> ExplicitHashKey {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return ExplicitHashKey::NotANumber;
    }
    match digits.parse::<u128>() {
        Ok(0) => ExplicitHashKey::Value(0), // "-0" is zero
        Ok(_) if negative => ExplicitHashKey::OutsideU128,
        Ok(value) => ExplicitHashKey::Value(value),
        Err(_) => ExplicitHashKey::OutsideU128,
    }
}

// ---------------------------------------------------------------------------------------------
// De-aggregation.
// ---------------------------------------------------------------------------------------------

/// Splits one Kinesis record into its user records, as the KCL's
/// `AggregatorUtil.deaggregate(records, startingHashKey, endingHashKey)` does.
///
/// * Data shorter than 4 bytes or not starting with [`MAGIC`]: the record itself, unchanged, as
///   one user record (`aggregated == false`, sub-sequence number 0, the Kinesis record's own
///   partition key and explicit hash key).
/// * Starts with the magic but is malformed — nothing between magic and digest, MD5 mismatch,
///   protobuf that does not decode or lacks a required field, a key index outside its table, or
///   (range given) an explicit hash key that is not an integer: the same pass-through, plus a
///   `WARN` log and [`Deaggregated::malformed`] saying why. The log carries no payload bytes;
///   callers should run this inside a span naming the shard and sequence number.
/// * Otherwise: the user records in order, sub-sequence number `i` for the `i`-th.
///
/// # Hash range filter
///
/// Applied only when `range` is `Some`, and only to aggregates. Each user record's effective
/// hash key is its explicit hash key (read as a decimal integer) if it has one, else
/// [`partition_key_hash`] of its partition key. The records are visited in order and, as in the
/// KCL, **the first user record whose effective hash key lies outside `range` drops the whole
/// aggregate**: the records already accepted are discarded too, the rest are not looked at, the
/// result holds no records and [`Deaggregated::dropped_by_hash_range`] is the aggregate's record
/// count. (It is not a per-record filter.) An explicit hash key that is an integer but negative
/// or above `u128::MAX` counts as outside, as `BigInteger` comparison makes it in the KCL.
///
/// The filter exists because a KPL working from a stale shard map may put an aggregate on the
/// wrong shard; it then re-sends it to the right one, and the stray copy is a duplicate.
///
/// # Differences from the KCL
///
/// * A key index out of range, or a non-numeric explicit hash key, makes the KCL log an error
///   and keep whatever user records it had emitted before the bad one (losing the rest). Here
///   the whole Kinesis record is passed through raw instead, so nothing is lost silently. The
///   KCL also truncates indices to a Java `int` before looking them up; here an index is out of
///   range if it is, without truncation.
/// * Without a shard range the KCL still filters on the full 128-bit range, which matters only
///   for explicit hash keys that are not integers in `0..=u128::MAX`. Here `None` means no
///   filter at all and explicit hash keys are not examined.
pub fn deaggregate(record: KinesisRecord<'_>, range: Option<HashKeyRange>) -> Deaggregated {
    if record.data.len() < MAGIC.len() || record.data[..MAGIC.len()] != MAGIC {
        return pass_through(record, None);
    }
    match decode_aggregate(&record.data, range) {
        Ok(Decoded::Records(records)) => {
            Deaggregated { records, was_aggregate: true, dropped_by_hash_range: 0, malformed: None }
        }
        Ok(Decoded::OutsideRange { record_count, first_outside }) => {
            tracing::debug!(
                dropped = record_count,
                first_outside,
                "dropped KPL aggregate with a user record outside the shard's hash key range"
            );
            Deaggregated {
                records: Vec::new(),
                was_aggregate: true,
                dropped_by_hash_range: record_count,
                malformed: None,
            }
        }
        Err(error) => {
            tracing::warn!(
                %error,
                data_len = record.data.len(),
                "malformed KPL aggregate, passing the Kinesis record through as one user record"
            );
            pass_through(record, Some(error))
        }
    }
}

/// The Kinesis record as a single, non-aggregated user record.
fn pass_through(record: KinesisRecord<'_>, malformed: Option<MalformedAggregate>) -> Deaggregated {
    Deaggregated {
        records: vec![UserRecord {
            data: record.data,
            partition_key: record.partition_key.to_owned(),
            explicit_hash_key: record.explicit_hash_key.map(str::to_owned),
            sub_sequence_number: 0,
            aggregated: false,
        }],
        was_aggregate: false,
        dropped_by_hash_range: 0,
        malformed,
    }
}

/// A well-formed aggregate's fate.
enum Decoded {
    /// Its user records.
    Records(Vec<UserRecord>),
    /// Dropped by the hash range filter.
    OutsideRange {
        /// How many user records the aggregate holds.
        record_count: usize,
        /// Position of the first user record found outside the range.
        first_outside: usize,
    },
}

/// Decodes `data`, which starts with [`MAGIC`].
fn decode_aggregate(
    data: &Bytes,
    range: Option<HashKeyRange>,
) -> Result<Decoded, MalformedAggregate> {
    // The KCL requires at least one byte of message between magic and digest.
    if data.len() - MAGIC.len() <= DIGEST_LEN {
        return Err(MalformedAggregate::TooShort { len: data.len() });
    }
    let message_end = data.len() - DIGEST_LEN;
    let message = data.slice(MAGIC.len()..message_end);
    if Md5::digest(&message)[..] != data[message_end..] {
        return Err(MalformedAggregate::DigestMismatch);
    }
    let AggregatedRecord { partition_key_table, explicit_hash_key_table, records } =
        AggregatedRecord::decode(message)?;

    // Java's parser rejects a message with a missing required field before any record is read.
    for (position, record) in records.iter().enumerate() {
        let missing = if record.partition_key_index.is_none() {
            Some("partition_key_index")
        } else if record.data.is_none() {
            Some("data")
        } else if record.tags.iter().any(|tag| tag.key.is_none()) {
            Some("tags.key")
        } else {
            None
        };
        if let Some(field) = missing {
            return Err(MalformedAggregate::MissingField { record: position, field });
        }
    }

    let record_count = records.len();
    let mut user_records = Vec::with_capacity(record_count);
    for (position, record) in records.into_iter().enumerate() {
        let Record { partition_key_index, explicit_hash_key_index, data, tags: _ } = record;
        let pk_index = partition_key_index.unwrap_or_default();
        let partition_key = table_entry(&partition_key_table, pk_index).ok_or(
            MalformedAggregate::PartitionKeyIndex {
                record: position,
                index: pk_index,
                table_len: partition_key_table.len(),
            },
        )?;
        let explicit_hash_key = match explicit_hash_key_index {
            None => None,
            Some(index) => Some(table_entry(&explicit_hash_key_table, index).ok_or(
                MalformedAggregate::ExplicitHashKeyIndex {
                    record: position,
                    index,
                    table_len: explicit_hash_key_table.len(),
                },
            )?),
        };

        if let Some(range) = range {
            let inside = match &explicit_hash_key {
                Some(ehk) => match read_explicit_hash_key(ehk) {
                    ExplicitHashKey::Value(key) => range.contains(key),
                    ExplicitHashKey::OutsideU128 => false,
                    ExplicitHashKey::NotANumber => {
                        return Err(MalformedAggregate::InvalidExplicitHashKey {
                            record: position,
                        });
                    }
                },
                None => range.contains(partition_key_hash(&partition_key)),
            };
            if !inside {
                return Ok(Decoded::OutsideRange { record_count, first_outside: position });
            }
        }

        user_records.push(UserRecord {
            data: data.unwrap_or_default(),
            partition_key: partition_key.into_owned(),
            explicit_hash_key: explicit_hash_key.map(Cow::into_owned),
            sub_sequence_number: position as u64,
            aggregated: true,
        });
    }
    Ok(Decoded::Records(user_records))
}

/// The string at `index` in a key table, with invalid UTF-8 replaced as Java does when it reads
/// a proto2 string; `None` if `index` is out of range.
fn table_entry(table: &[Bytes], index: u64) -> Option<Cow<'_, str>> {
    let entry = table.get(usize::try_from(index).ok()?)?;
    Some(String::from_utf8_lossy(entry))
}

// ---------------------------------------------------------------------------------------------
// Aggregation (for tests and tools).
// ---------------------------------------------------------------------------------------------

/// Builds the data of a KPL aggregate holding `records`, in the exact wire format the KPL
/// writes: magic, protobuf, MD5. Partition keys and explicit hash keys are de-duplicated into
/// their tables in order of first appearance, as the KPL does; records without an explicit hash
/// key carry no index; no tags are written.
///
/// Meant for tests and tools. Unlike the KPL, which sends a lone user record un-aggregated,
/// this always produces an aggregate (even of one or zero records). The KPL puts such an
/// aggregate in a Kinesis record with partition key `"a"` and, as explicit hash key, the first
/// user record's effective hash key in decimal.
pub fn aggregate(records: &[AggregateEntry<'_>]) -> Vec<u8> {
    let mut partition_keys = KeyTable::default();
    let mut explicit_hash_keys = KeyTable::default();
    let records = records
        .iter()
        .map(|entry| Record {
            partition_key_index: Some(partition_keys.index_of(entry.partition_key)),
            explicit_hash_key_index: entry
                .explicit_hash_key
                .map(|ehk| explicit_hash_keys.index_of(ehk)),
            data: Some(Bytes::copy_from_slice(entry.data)),
            tags: Vec::new(),
        })
        .collect();
    let message = AggregatedRecord {
        partition_key_table: partition_keys.into_table(),
        explicit_hash_key_table: explicit_hash_keys.into_table(),
        records,
    };

    let mut out = Vec::with_capacity(MAGIC.len() + message.encoded_len() + DIGEST_LEN);
    out.extend_from_slice(&MAGIC);
    message.encode_raw(&mut out);
    let digest = Md5::digest(&out[MAGIC.len()..]);
    out.extend_from_slice(&digest);
    out
}

/// A key table under construction: distinct keys in order of first appearance.
#[derive(Default)]
struct KeyTable<'a> {
    keys: Vec<&'a str>,
    indices: HashMap<&'a str, u64>,
}

impl<'a> KeyTable<'a> {
    /// The index of `key`, adding it if new.
    fn index_of(&mut self, key: &'a str) -> u64 {
        *self.indices.entry(key).or_insert_with(|| {
            self.keys.push(key);
            self.keys.len() as u64 - 1
        })
    }

    fn into_table(self) -> Vec<Bytes> {
        self.keys.into_iter().map(|key| Bytes::copy_from_slice(key.as_bytes())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinesis(data: impl Into<Bytes>) -> KinesisRecord<'static> {
        KinesisRecord { data: data.into(), partition_key: "outer", explicit_hash_key: None }
    }

    /// Magic + `message` + MD5(`message`).
    fn frame(message: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(message);
        out.extend_from_slice(&Md5::digest(message));
        out
    }

    fn assert_raw(result: &Deaggregated, data: &[u8]) {
        assert!(!result.was_aggregate);
        assert_eq!(result.dropped_by_hash_range, 0);
        assert_eq!(
            result.records,
            vec![UserRecord {
                data: Bytes::copy_from_slice(data),
                partition_key: "outer".to_owned(),
                explicit_hash_key: None,
                sub_sequence_number: 0,
                aggregated: false,
            }]
        );
    }

    fn user(data: &[u8], pk: &str, ehk: Option<&str>, sub: u64) -> UserRecord {
        UserRecord {
            data: Bytes::copy_from_slice(data),
            partition_key: pk.to_owned(),
            explicit_hash_key: ehk.map(str::to_owned),
            sub_sequence_number: sub,
            aggregated: true,
        }
    }

    const THREE: [AggregateEntry<'static>; 3] = [
        AggregateEntry { partition_key: "alpha", explicit_hash_key: None, data: b"one" },
        AggregateEntry { partition_key: "beta", explicit_hash_key: Some("42"), data: b"two" },
        AggregateEntry { partition_key: "alpha", explicit_hash_key: None, data: b"" },
    ];

    #[test]
    fn round_trip() {
        let data = aggregate(&THREE);
        assert_eq!(data[..4], MAGIC);
        let result = deaggregate(kinesis(data), None);
        assert!(result.was_aggregate);
        assert_eq!(result.malformed, None);
        assert_eq!(result.dropped_by_hash_range, 0);
        assert_eq!(
            result.records,
            vec![
                user(b"one", "alpha", None, 0),
                user(b"two", "beta", Some("42"), 1),
                user(b"", "alpha", None, 2),
            ]
        );
    }

    #[test]
    fn user_records_share_the_input_buffer() {
        let data = Bytes::from(aggregate(&THREE));
        let range = data.as_ptr_range();
        let result = deaggregate(kinesis(data.clone()), None);
        let inner = result.records[1].data.as_ptr_range();
        assert!(range.start <= inner.start && inner.end <= range.end);
    }

    /// The protobuf of [`THREE`], assembled field by field.
    const THREE_MESSAGE: &[u8] = &[
        0x0A, 5, b'a', b'l', b'p', b'h', b'a', // partition_key_table[0] = "alpha"
        0x0A, 4, b'b', b'e', b't', b'a', // partition_key_table[1] = "beta"
        0x12, 2, b'4', b'2', // explicit_hash_key_table[0] = "42"
        0x1A, 7, // records[0], 7 bytes
        0x08, 0, // partition_key_index = 0
        0x1A, 3, b'o', b'n', b'e', // data = "one"
        0x1A, 9, // records[1], 9 bytes
        0x08, 1, // partition_key_index = 1
        0x10, 0, // explicit_hash_key_index = 0
        0x1A, 3, b't', b'w', b'o', // data = "two"
        0x1A, 4, // records[2], 4 bytes
        0x08, 0, // partition_key_index = 0
        0x1A, 0, // data = ""
    ];

    #[test]
    fn encoder_writes_the_kpl_wire_format() {
        assert_eq!(aggregate(&THREE), frame(THREE_MESSAGE));
    }

    #[test]
    fn decodes_hand_written_aggregate() {
        // Fields out of the usual order, a tag on a record and an unknown field, all of which a
        // protobuf decoder must accept.
        let message: &[u8] = &[
            0x1A, 15, // records[0], 15 bytes
            0x1A, 3, b'f', b'o', b'o', // data = "foo"
            0x22, 6, 0x0A, 1, b't', 0x12, 1, b'v', // tags[0] = { key "t", value "v" }
            0x08, 1, // partition_key_index = 1
            0x0A, 2, b'k', b'0', // partition_key_table[0] = "k0"
            0x0A, 2, b'k', b'1', // partition_key_table[1] = "k1"
            0x12, 3, b'1', b'2', b'3', // explicit_hash_key_table[0] = "123"
            0x1A, 12, // records[1], 12 bytes
            0x08, 0, // partition_key_index = 0
            0x10, 0, // explicit_hash_key_index = 0
            0x1A, 3, b'b', b'a', b'r', // data = "bar"
            0x28, 0x96, 0x01, // unknown field 5, varint 150
        ];
        let result = deaggregate(kinesis(frame(message)), None);
        assert!(result.was_aggregate);
        assert_eq!(
            result.records,
            vec![user(b"foo", "k1", None, 0), user(b"bar", "k0", Some("123"), 1)]
        );
    }

    #[test]
    fn decodes_third_party_aggregate() {
        // An aggregate of three records under partition key "p1", made by another
        // implementation of the format (found base64-encoded in public test data).
        let data: &[u8] = &[
            0xF3, 0x89, 0x9A, 0xC2, 0x0A, 0x02, 0x70, 0x31, 0x1A, 0x18, 0x08, 0x00, 0x1A, 0x14,
            0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x30, 0x31, 0x32, 0x33,
            0x34, 0x35, 0x36, 0x37, 0x5F, 0x41, 0x1A, 0x18, 0x08, 0x00, 0x1A, 0x14, 0x30, 0x31,
            0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35,
            0x36, 0x37, 0x5F, 0x42, 0x1A, 0x18, 0x08, 0x00, 0x1A, 0x14, 0x30, 0x31, 0x32, 0x33,
            0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37,
            0x5F, 0x43, 0x47, 0x8C, 0xBD, 0x36, 0x8B, 0x24, 0x64, 0xDC, 0x3F, 0xA4, 0x3B, 0x65,
            0x02, 0xD9, 0x7E, 0xAE,
        ];
        let result = deaggregate(kinesis(Bytes::from_static(data)), None);
        assert_eq!(result.malformed, None);
        assert_eq!(
            result.records,
            vec![
                user(b"012345678901234567_A", "p1", None, 0),
                user(b"012345678901234567_B", "p1", None, 1),
                user(b"012345678901234567_C", "p1", None, 2),
            ]
        );
    }

    #[test]
    fn not_magic_is_raw() {
        for data in [&b""[..], b"\xF3\x89\x9A", b"hello, world", b"\xF3\x89\x9A\xC3rest"] {
            let result =
                deaggregate(kinesis(data.to_vec()), Some(HashKeyRange { start: 0, end: 0 }));
            assert_raw(&result, data);
            assert_eq!(result.malformed, None);
        }
    }

    #[test]
    fn outer_keys_kept_on_raw() {
        let record = KinesisRecord {
            data: Bytes::from_static(b"x"),
            partition_key: "p",
            explicit_hash_key: Some("7"),
        };
        let result = deaggregate(record, None);
        assert_eq!(result.records[0].partition_key, "p");
        assert_eq!(result.records[0].explicit_hash_key.as_deref(), Some("7"));
    }

    #[test]
    fn bad_digest_is_raw() {
        let mut data = aggregate(&THREE);
        let last = data.len() - 1;
        data[last] ^= 1;
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(result.malformed, Some(MalformedAggregate::DigestMismatch));

        // A corrupted message under the original digest.
        let mut data = aggregate(&THREE);
        data[6] ^= 1;
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(result.malformed, Some(MalformedAggregate::DigestMismatch));
    }

    #[test]
    fn truncated_is_raw() {
        // Magic plus an empty message and its digest: nothing between magic and digest.
        let data = frame(b"");
        assert_eq!(data.len(), 20);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(result.malformed, Some(MalformedAggregate::TooShort { len: 20 }));

        // Cut short anywhere: the digest no longer matches (or there is no room for one).
        let full = aggregate(&THREE);
        for len in [4, 10, 20, 21, full.len() - 1] {
            let result = deaggregate(kinesis(full[..len].to_vec()), None);
            assert_raw(&result, &full[..len]);
            assert!(result.malformed.is_some(), "len {len}");
        }

        // A message truncated inside a field, with a correct digest: protobuf fails.
        let data = frame(&THREE_MESSAGE[..THREE_MESSAGE.len() - 3]);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert!(matches!(result.malformed, Some(MalformedAggregate::Decode(_))));
    }

    #[test]
    fn bad_index_is_raw() {
        // partition_key_index = 1 with a one-entry table.
        let data = frame(&[0x0A, 1, b'k', 0x1A, 4, 0x08, 1, 0x1A, 0]);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(
            result.malformed,
            Some(MalformedAggregate::PartitionKeyIndex { record: 0, index: 1, table_len: 1 })
        );

        // explicit_hash_key_index = 0 with an empty table; the first record is fine.
        let data =
            frame(&[0x0A, 1, b'k', 0x1A, 4, 0x08, 0, 0x1A, 0, 0x1A, 6, 0x08, 0, 0x10, 0, 0x1A, 0]);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(
            result.malformed,
            Some(MalformedAggregate::ExplicitHashKeyIndex { record: 1, index: 0, table_len: 0 })
        );

        // 2^32 is out of range (the KCL's int truncation would read 0).
        let data = frame(&[0x0A, 1, b'k', 0x1A, 8, 0x08, 0x80, 0x80, 0x80, 0x80, 0x10, 0x1A, 0]);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
    }

    #[test]
    fn missing_required_field_is_raw() {
        // Record without partition_key_index.
        let data = frame(&[0x0A, 1, b'k', 0x1A, 2, 0x1A, 0]);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(
            result.malformed,
            Some(MalformedAggregate::MissingField { record: 0, field: "partition_key_index" })
        );
        // Record without data.
        let data = frame(&[0x0A, 1, b'k', 0x1A, 2, 0x08, 0]);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        // Tag without key.
        let data = frame(&[0x0A, 1, b'k', 0x1A, 9, 0x08, 0, 0x1A, 0, 0x22, 3, 0x12, 1, b'v']);
        let result = deaggregate(kinesis(data.clone()), None);
        assert_raw(&result, &data);
        assert_eq!(
            result.malformed,
            Some(MalformedAggregate::MissingField { record: 0, field: "tags.key" })
        );
    }

    #[test]
    fn empty_aggregate_yields_nothing() {
        // Only a key table: well formed, no records (the KCL emits nothing either).
        let result = deaggregate(kinesis(frame(&[0x0A, 1, b'k'])), None);
        assert!(result.was_aggregate);
        assert!(result.records.is_empty());
    }

    #[test]
    fn partition_key_hash_is_big_endian_md5() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(partition_key_hash("a"), 0x0cc175b9c0f1b6a831c399e269772661);
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(partition_key_hash(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        assert_eq!(partition_key_hash("a"), 16955237001963240173058271559858726497);
    }

    #[test]
    fn parses_hash_keys() {
        assert_eq!(parse_hash_key("0"), Some(0));
        assert_eq!(parse_hash_key("00042"), Some(42));
        assert_eq!(parse_hash_key("340282366920938463463374607431768211455"), Some(u128::MAX));
        assert_eq!(parse_hash_key("340282366920938463463374607431768211456"), None);
        for bad in ["", "+1", "-1", " 1", "1 ", "0x10", "1e3"] {
            assert_eq!(parse_hash_key(bad), None, "{bad:?}");
        }
        assert_eq!(
            HashKeyRange::parse("0", "170141183460469231731687303715884105727"),
            Some(HashKeyRange { start: 0, end: u128::MAX / 2 })
        );
        assert_eq!(HashKeyRange::parse("0", "x"), None);

        assert_eq!(read_explicit_hash_key("+5"), ExplicitHashKey::Value(5));
        assert_eq!(read_explicit_hash_key("-0"), ExplicitHashKey::Value(0));
        assert_eq!(read_explicit_hash_key("-5"), ExplicitHashKey::OutsideU128);
        assert_eq!(
            read_explicit_hash_key("340282366920938463463374607431768211456"),
            ExplicitHashKey::OutsideU128
        );
        assert_eq!(read_explicit_hash_key("-"), ExplicitHashKey::NotANumber);
        assert_eq!(read_explicit_hash_key("12a"), ExplicitHashKey::NotANumber);
    }

    /// A range holding exactly `key`.
    fn only(key: u128) -> Option<HashKeyRange> {
        Some(HashKeyRange { start: key, end: key })
    }

    #[test]
    fn hash_range_keeps_aggregate_inside() {
        let a = partition_key_hash("a");
        let entries = [
            AggregateEntry { partition_key: "a", explicit_hash_key: None, data: b"1" },
            AggregateEntry { partition_key: "zzz", explicit_hash_key: Some("100"), data: b"2" },
        ];
        let range = Some(HashKeyRange { start: 100, end: a });
        let result = deaggregate(kinesis(aggregate(&entries)), range);
        assert!(result.was_aggregate);
        assert_eq!(result.dropped_by_hash_range, 0);
        assert_eq!(result.records.len(), 2);
        // Inclusive at both ends.
        let result = deaggregate(kinesis(aggregate(&entries[..1])), only(a));
        assert_eq!(result.records, vec![user(b"1", "a", None, 0)]);
    }

    #[test]
    fn hash_range_drops_whole_aggregate() {
        let a = partition_key_hash("a");
        let entries = [
            AggregateEntry { partition_key: "a", explicit_hash_key: None, data: b"in" },
            AggregateEntry { partition_key: "a", explicit_hash_key: None, data: b"in" },
            AggregateEntry { partition_key: "b", explicit_hash_key: None, data: b"out" },
            AggregateEntry { partition_key: "a", explicit_hash_key: None, data: b"in" },
        ];
        let result = deaggregate(kinesis(aggregate(&entries)), only(a));
        assert!(result.was_aggregate);
        assert!(result.records.is_empty());
        assert_eq!(result.dropped_by_hash_range, 4);
        assert_eq!(result.malformed, None);

        // Without a range nothing is filtered.
        let result = deaggregate(kinesis(aggregate(&entries)), None);
        assert_eq!(result.records.len(), 4);

        // Just past either end.
        let data = aggregate(&entries[..1]);
        for range in
            [HashKeyRange { start: a + 1, end: u128::MAX }, HashKeyRange { start: 0, end: a - 1 }]
        {
            let result = deaggregate(kinesis(data.clone()), Some(range));
            assert_eq!(result.dropped_by_hash_range, 1);
            assert!(result.records.is_empty());
        }

        // Explicit hash keys beyond u128 are outside every range.
        for ehk in ["-1", "340282366920938463463374607431768211456"] {
            let entry =
                AggregateEntry { partition_key: "a", explicit_hash_key: Some(ehk), data: b"" };
            let range = Some(HashKeyRange { start: 0, end: u128::MAX });
            let result = deaggregate(kinesis(aggregate(&[entry])), range);
            assert_eq!(result.dropped_by_hash_range, 1, "{ehk}");
        }
    }

    #[test]
    fn explicit_hash_key_takes_precedence() {
        let a = partition_key_hash("a");
        let entry = AggregateEntry { partition_key: "a", explicit_hash_key: Some("7"), data: b"x" };
        // The partition key's hash is in range, the EHK is not: dropped.
        let result = deaggregate(kinesis(aggregate(&[entry])), only(a));
        assert_eq!(result.dropped_by_hash_range, 1);
        // The EHK is in range, the partition key's hash is not: kept.
        let result = deaggregate(kinesis(aggregate(&[entry])), only(7));
        assert_eq!(result.records, vec![user(b"x", "a", Some("7"), 0)]);
    }

    #[test]
    fn non_numeric_explicit_hash_key() {
        let entry = AggregateEntry { partition_key: "a", explicit_hash_key: Some("x"), data: b"" };
        let data = aggregate(&[entry]);
        // Ignored without a range.
        let result = deaggregate(kinesis(data.clone()), None);
        assert_eq!(result.records, vec![user(b"", "a", Some("x"), 0)]);
        // Malformed with one.
        let result = deaggregate(kinesis(data.clone()), only(0));
        assert_raw(&result, &data);
        assert_eq!(
            result.malformed,
            Some(MalformedAggregate::InvalidExplicitHashKey { record: 0 })
        );
    }

    #[test]
    fn invalid_utf8_key_is_replaced() {
        let data = frame(&[0x0A, 2, b'k', 0xFF, 0x1A, 4, 0x08, 0, 0x1A, 0]);
        let result = deaggregate(kinesis(data), None);
        assert_eq!(result.records, vec![user(b"", "k\u{FFFD}", None, 0)]);
    }
}
