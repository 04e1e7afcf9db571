//! `word-count`: counts words across a shard's records, in the shard's state.
//!
//! Each record's data is decoded as UTF-8 (invalid bytes replaced), split on every character
//! that is not alphanumeric, and lowercased. The running count of each word is kept in the
//! state key `count:<word>` (a little-endian `u64`, see [`kinesis_task::state::get_u64`]).
//!
//! At the end of each batch the task emits, for every distinct word the batch touched and in
//! the order the batch first saw them, one record to the output `counts` with the word as
//! partition key and `<word>=<count>` as data, the count being the total after the batch.
//!
//! A record whose data is exactly `FAIL` makes the batch fail with a retryable error, which
//! shows the all-or-nothing rule: the host discards the batch's state writes and emits.

use std::collections::BTreeMap;

use kinesis_task::{Batch, Config, Done, EmitError, StateError, Task, TaskError, emit, state};

/// The output that counts go to.
pub const OUTPUT: &str = "counts";

/// The data of a record that makes its batch fail (for demonstrations and tests).
pub const FAIL: &[u8] = b"FAIL";

/// The state key holding `word`'s count.
pub fn state_key(word: &str) -> String {
    format!("count:{word}")
}

/// The lowercased words of `text`, in order: the non-empty runs of alphanumeric characters.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// Counts words; keeps everything in the shard's state, nothing in the instance.
#[derive(Debug, Default)]
pub struct WordCount;

/// A word touched by the current batch.
#[derive(Debug)]
struct Tally {
    word: String,
    /// The count so far, including the batch's records up to the current one.
    count: u64,
    /// The index of the first record of the batch that holds the word.
    first_index: usize,
    /// Whether the current record changed `count` and it is not written yet.
    dirty: bool,
}

/// The words a batch touched, in first-seen order.
#[derive(Debug, Default)]
struct Tallies {
    tallies: Vec<Tally>,
    by_word: BTreeMap<String, usize>,
}

impl Tallies {
    /// Counts one occurrence of `word` in record `index`; returns the tally's slot when this is
    /// the first time the record changes it.
    fn add(&mut self, word: String, index: usize) -> Option<usize> {
        let slot = match self.by_word.get(&word) {
            Some(&slot) => slot,
            None => {
                let count = state::get_u64(&state_key(&word));
                let slot = self.tallies.len();
                self.by_word.insert(word.clone(), slot);
                self.tallies.push(Tally { word, count, first_index: index, dirty: false });
                slot
            }
        };
        let tally = &mut self.tallies[slot];
        tally.count = tally.count.saturating_add(1);
        if tally.dirty {
            None
        } else {
            tally.dirty = true;
            Some(slot)
        }
    }
}

impl Task for WordCount {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(WordCount)
    }

    fn process(&mut self, batch: &Batch<'_>) -> Result<Done, TaskError> {
        let mut tallies = Tallies::default();
        let mut changed = Vec::new();
        for record in batch {
            if record.data() == FAIL {
                return Err(TaskError::retryable(format!(
                    "record {} asked the batch to fail",
                    record.index()
                )));
            }
            let text = String::from_utf8_lossy(record.data());
            changed.extend(words(&text).filter_map(|word| tallies.add(word, record.index())));
            // Write each changed count once per record: the state always holds running counts.
            for slot in changed.drain(..) {
                let tally = &mut tallies.tallies[slot];
                tally.dirty = false;
                state::set_u64(&state_key(&tally.word), tally.count)
                    .map_err(|e| state_error(e, record.index()))?;
            }
        }
        for tally in &tallies.tallies {
            let data = format!("{}={}", tally.word, tally.count);
            emit(OUTPUT, &tally.word, data.as_bytes())
                .map_err(|e| emit_error(e, &tally.word, tally.first_index))?;
        }
        Ok(Done::All)
    }
}

/// What the host should do when writing a count from record `index` failed.
fn state_error(e: StateError, index: usize) -> TaskError {
    match e {
        StateError::TooLarge(_) => TaskError::poison(index, format!("cannot count a word: {e}")),
        StateError::QuotaExceeded => TaskError::fatal(format!("cannot count words: {e}")),
    }
}

/// What the host should do when emitting the count of `word`, first seen in record `index`,
/// failed.
fn emit_error(e: EmitError, word: &str, index: usize) -> TaskError {
    match e {
        EmitError::TooLarge(_) | EmitError::InvalidKey(_) => {
            TaskError::poison(index, format!("cannot emit the count of {word:?}: {e}"))
        }
        EmitError::UnknownOutput(_) | EmitError::QuotaExceeded => {
            TaskError::fatal(format!("cannot emit word counts: {e}"))
        }
    }
}

kinesis_task::export_task!(WordCount);

#[cfg(test)]
mod tests {
    use kinesis_task::testing::{Harness, TestRecord};
    use kinesis_task::{ErrorKind, TaskError};

    use super::{OUTPUT, WordCount, state_key, words};

    /// The emitted records as `(partition key, data)`, checking that all go to `counts`.
    fn counts(out: &kinesis_task::testing::Outcome) -> Vec<(String, String)> {
        out.emitted
            .iter()
            .map(|e| {
                assert_eq!(e.output, OUTPUT);
                (e.partition_key.clone(), String::from_utf8_lossy(&e.data).into_owned())
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn stored(harness: &Harness<WordCount>, word: &str) -> Option<u64> {
        harness
            .state(&state_key(word))
            .map(|v| u64::from_le_bytes(v.try_into().expect("counts are 8 bytes")))
    }

    #[test]
    fn splits_on_non_alphanumerics_and_lowercases() {
        let got: Vec<String> = words("Hello, WORLD!! it's 42-ish…Ünïcode_ok").collect();
        assert_eq!(got, ["hello", "world", "it", "s", "42", "ish", "ünïcode", "ok"]);
    }

    #[test]
    fn counts_across_batches() -> Result<(), TaskError> {
        let mut harness = Harness::<WordCount>::new(&[])?.with_outputs(&[OUTPUT]);

        let out = harness.process(&[
            TestRecord::text("a", "Hello, world!"),
            TestRecord::text("b", "hello again"),
            TestRecord::new("c", b"\xffWORLD\xfe".to_vec()),
        ])?;
        assert_eq!(out.done, 3);
        assert_eq!(
            counts(&out),
            pairs(&[("hello", "hello=2"), ("world", "world=2"), ("again", "again=1")])
        );

        let out = harness.process(&[TestRecord::text("a", "again and AGAIN, hello")])?;
        assert_eq!(
            counts(&out),
            pairs(&[("again", "again=3"), ("and", "and=1"), ("hello", "hello=3")])
        );

        assert_eq!(stored(&harness, "hello"), Some(3));
        assert_eq!(stored(&harness, "world"), Some(2));
        assert_eq!(stored(&harness, "again"), Some(3));
        assert_eq!(stored(&harness, "and"), Some(1));
        Ok(())
    }

    #[test]
    fn records_without_words_emit_nothing() -> Result<(), TaskError> {
        let mut harness = Harness::<WordCount>::new(&[])?;
        let out = harness.process(&[TestRecord::text("a", " ,.; !"), TestRecord::text("b", "")])?;
        assert_eq!(out.done, 2);
        assert!(out.emitted.is_empty());
        Ok(())
    }

    #[test]
    fn failed_batch_leaves_state_unchanged() -> Result<(), TaskError> {
        let mut harness = Harness::<WordCount>::new(&[])?;
        harness.process(&[TestRecord::text("a", "red green red")])?;

        // The first record's counts are written to state before the `FAIL` record.
        let err = harness
            .process(&[TestRecord::text("a", "red blue"), TestRecord::text("b", "FAIL")])
            .expect_err("a FAIL record fails the batch");
        assert_eq!(err.kind(), ErrorKind::Retryable);
        assert_eq!(stored(&harness, "red"), Some(2));
        assert_eq!(stored(&harness, "green"), Some(1));
        assert_eq!(stored(&harness, "blue"), None);

        // Redelivered without the failing record, the batch counts from the committed state.
        let out = harness.process(&[TestRecord::text("a", "red blue")])?;
        assert_eq!(counts(&out), pairs(&[("red", "red=3"), ("blue", "blue=1")]));
        Ok(())
    }

    #[test]
    fn fail_only_matches_the_exact_data() -> Result<(), TaskError> {
        let mut harness = Harness::<WordCount>::new(&[])?;
        let out = harness.process(&[TestRecord::text("a", "FAIL ")])?;
        assert_eq!(counts(&out), pairs(&[("fail", "fail=1")]));
        Ok(())
    }
}
