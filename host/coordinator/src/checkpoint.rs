//! KCL's extended sequence numbers: a checkpoint is a sentinel or a (sequence number,
//! sub-sequence number) pair, ordered as KCL orders them.

use std::cmp::Ordering;
use std::fmt;

/// A position in a shard, as stored in a lease's `checkpoint` and `checkpointSubSequenceNumber`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Checkpoint {
    /// Start from the oldest record (also every child shard's first checkpoint).
    TrimHorizon,
    /// Start after the newest record.
    Latest,
    /// Start at the job's configured timestamp (KCL stores no time in the lease).
    AtTimestamp,
    /// The shard was read to its end.
    ShardEnd,
    /// After this record (and, within a KPL aggregate, this user record).
    Sequence {
        /// The decimal sequence number, without leading zeros.
        sequence_number: String,
        /// The user record's index inside a KPL aggregate, 0 otherwise.
        sub_sequence_number: u64,
    },
}

/// Why a stored checkpoint is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "checkpoint {value:?} is neither a decimal sequence number nor one of TRIM_HORIZON, LATEST, AT_TIMESTAMP, SHARD_END"
)]
pub struct CheckpointError {
    /// The stored value.
    pub value: String,
}

impl Checkpoint {
    /// A checkpoint after a record.
    pub fn after(sequence_number: &str, sub_sequence_number: u64) -> Self {
        Self::Sequence {
            sequence_number: normalize(sequence_number).to_owned(),
            sub_sequence_number,
        }
    }

    /// Reads the stored form.
    ///
    /// # Errors
    /// When `value` is neither a sentinel nor decimal digits.
    pub fn parse(value: &str, sub_sequence_number: u64) -> Result<Self, CheckpointError> {
        Ok(match value {
            "TRIM_HORIZON" => Self::TrimHorizon,
            "LATEST" => Self::Latest,
            "AT_TIMESTAMP" => Self::AtTimestamp,
            "SHARD_END" => Self::ShardEnd,
            digits if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                Self::after(digits, sub_sequence_number)
            }
            _ => return Err(CheckpointError { value: value.to_owned() }),
        })
    }

    /// The `checkpoint` attribute's value.
    pub fn as_str(&self) -> &str {
        match self {
            Self::TrimHorizon => "TRIM_HORIZON",
            Self::Latest => "LATEST",
            Self::AtTimestamp => "AT_TIMESTAMP",
            Self::ShardEnd => "SHARD_END",
            Self::Sequence { sequence_number, .. } => sequence_number,
        }
    }

    /// The `checkpointSubSequenceNumber` attribute's value.
    pub fn sub_sequence_number(&self) -> u64 {
        match self {
            Self::Sequence { sub_sequence_number, .. } => *sub_sequence_number,
            _ => 0,
        }
    }

    /// Whether a record at (`sequence_number`, `sub_sequence_number`) comes after this
    /// checkpoint, that is, has not been processed yet.
    pub fn is_before(&self, sequence_number: &str, sub_sequence_number: u64) -> bool {
        match self {
            Self::ShardEnd => false,
            Self::Sequence { sequence_number: done, sub_sequence_number: done_sub } => {
                match compare_decimal(normalize(sequence_number), done) {
                    Ordering::Greater => true,
                    Ordering::Less => false,
                    Ordering::Equal => sub_sequence_number > *done_sub,
                }
            }
            _ => true,
        }
    }

    /// KCL's rank for sentinels: AT_TIMESTAMP < TRIM_HORIZON < LATEST < any sequence number <
    /// SHARD_END.
    fn rank(&self) -> u8 {
        match self {
            Self::AtTimestamp => 0,
            Self::TrimHorizon => 1,
            Self::Latest => 2,
            Self::Sequence { .. } => 3,
            Self::ShardEnd => 4,
        }
    }
}

impl Ord for Checkpoint {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (
                Self::Sequence { sequence_number: a, sub_sequence_number: sa },
                Self::Sequence { sequence_number: b, sub_sequence_number: sb },
            ) => compare_decimal(a, b).then(sa.cmp(sb)),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for Checkpoint {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sequence { sequence_number, sub_sequence_number: 0 } => {
                f.write_str(sequence_number)
            }
            Self::Sequence { sequence_number, sub_sequence_number } => {
                write!(f, "{sequence_number}.{sub_sequence_number}")
            }
            other => f.write_str(other.as_str()),
        }
    }
}

fn normalize(digits: &str) -> &str {
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() && !digits.is_empty() { "0" } else { trimmed }
}

/// Compares two normalized decimal numbers of any length (sequence numbers exceed u128).
fn compare_decimal(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_like_kcl() {
        let seq = |s: &str, sub| Checkpoint::after(s, sub);
        let mut all = [
            Checkpoint::ShardEnd,
            seq("49590338271490256608559692538361571095921575989136588898", 0),
            seq("9", 5),
            Checkpoint::Latest,
            seq("10", 0),
            Checkpoint::TrimHorizon,
            seq("9", 0),
            Checkpoint::AtTimestamp,
        ];
        all.sort();
        let shown: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "AT_TIMESTAMP",
                "TRIM_HORIZON",
                "LATEST",
                "9",
                "9.5",
                "10",
                "49590338271490256608559692538361571095921575989136588898",
                "SHARD_END"
            ]
        );
    }

    #[test]
    fn parses_sentinels_and_digits_and_rejects_the_rest() {
        assert_eq!(Checkpoint::parse("SHARD_END", 0), Ok(Checkpoint::ShardEnd));
        assert_eq!(Checkpoint::parse("0042", 3), Ok(Checkpoint::after("42", 3)));
        assert_eq!(Checkpoint::parse("0042", 3).map(|c| c.as_str().to_owned()), Ok("42".into()));
        assert!(Checkpoint::parse("12a", 0).is_err());
        assert!(Checkpoint::parse("", 0).is_err());
    }

    #[test]
    fn records_at_or_below_the_checkpoint_are_done() {
        let cp = Checkpoint::after("100", 2);
        assert!(!cp.is_before("99", 9));
        assert!(!cp.is_before("100", 2));
        assert!(cp.is_before("100", 3));
        assert!(cp.is_before("101", 0));
        assert!(cp.is_before("0101", 0), "leading zeros do not matter");
        assert!(Checkpoint::TrimHorizon.is_before("1", 0));
        assert!(!Checkpoint::ShardEnd.is_before("1", 0));
    }
}
