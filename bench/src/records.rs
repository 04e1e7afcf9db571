//! Realistic synthetic Kinesis records and the benchmark's per-record work.

use kinesis_host_runtime::RecordRef;

/// A decoded record as the host holds it before handing it to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    /// The payload.
    pub data: Vec<u8>,
    /// A 36-character UUID-like partition key.
    pub partition_key: String,
    /// A 56-digit decimal sequence number.
    pub sequence_number: String,
    /// Position inside a KPL aggregate (0: not aggregated).
    pub sub_sequence_number: u64,
    /// Arrival time, milliseconds since the Unix epoch.
    pub approximate_arrival_millis: u64,
}

impl HostRecord {
    /// A borrowed view for packing into a runtime [`Batch`](kinesis_host_runtime::Batch).
    pub fn record_ref(&self) -> RecordRef<'_> {
        RecordRef {
            data: &self.data,
            partition_key: &self.partition_key,
            sequence_number: &self.sequence_number,
            sub_sequence_number: self.sub_sequence_number,
            explicit_hash_key: None,
            approximate_arrival_millis: self.approximate_arrival_millis,
        }
    }
}

/// A small deterministic generator (xorshift64), so that every run sees the same records.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is replaced, since xorshift would stay at 0).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    /// The next 64 random-ish bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// `count` records with `size`-byte payloads, UUID-like partition keys and consecutive 56-digit
/// sequence numbers, the same for the same arguments.
pub fn generate(count: usize, size: usize) -> Vec<HostRecord> {
    let mut rng = XorShift::new(0x4B49_4E45_5349_5300 ^ size as u64);
    const E17: u64 = 100_000_000_000_000_000;
    // 2 + 17 + 17 = 36 digits of shard-level prefix, then a 20-digit counter: 56 digits.
    let prefix = format!("49{:017}{:017}", rng.next_u64() % E17, rng.next_u64() % E17);
    let first = rng.next_u64() % E17;
    (0..count)
        .map(|i| {
            let mut data = Vec::with_capacity(size);
            while data.len() < size {
                let bytes = rng.next_u64().to_le_bytes();
                let take = bytes.len().min(size - data.len());
                data.extend_from_slice(&bytes[..take]);
            }
            let (a, b, c) = (rng.next_u64(), rng.next_u64(), rng.next_u64());
            let partition_key = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                a >> 32,
                a & 0xffff,
                b & 0xfff,
                0x8000 | ((b >> 16) & 0x3fff),
                c & 0xffff_ffff_ffff,
            );
            HostRecord {
                data,
                partition_key,
                sequence_number: format!("{prefix}{:020}", first + i as u64),
                sub_sequence_number: 0,
                approximate_arrival_millis: 1_750_000_000_000 + i as u64 * 3,
            }
        })
        .collect()
}

/// The per-record work every variant does: a wrapping `u64` sum of the data bytes plus the
/// partition key's and the sequence number's lengths (the guests do exactly this).
#[inline]
pub fn record_sum(data: &[u8], partition_key: &str, sequence_number: &str) -> u64 {
    data.iter()
        .fold(0u64, |acc, &b| acc.wrapping_add(u64::from(b)))
        .wrapping_add(partition_key.len() as u64)
        .wrapping_add(sequence_number.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_look_like_kinesis_records() {
        let records = generate(3, 100);
        assert_eq!(records.len(), 3);
        for r in &records {
            assert_eq!(r.data.len(), 100);
            assert_eq!(r.partition_key.len(), 36, "{}", r.partition_key);
            assert_eq!(r.partition_key.matches('-').count(), 4);
            assert_eq!(r.sequence_number.len(), 56, "{}", r.sequence_number);
            assert!(r.sequence_number.bytes().all(|b| b.is_ascii_digit()));
        }
        assert_ne!(records[0].data, records[1].data);
        assert_ne!(records[0].partition_key, records[1].partition_key);
        assert!(records[0].sequence_number < records[1].sequence_number);
        assert_eq!(generate(3, 100), records, "deterministic");
        assert_eq!(generate(1, 1024)[0].data.len(), 1024);
    }

    #[test]
    fn record_sum_adds_bytes_and_lengths() {
        assert_eq!(record_sum(&[1, 2, 255], "ab", "123"), 258 + 2 + 3);
    }
}
