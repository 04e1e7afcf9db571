//! Durable task state: each shard's key-value state is stored with its checkpoint, so that the
//! state a host restores is always the one that matches the records up to the checkpoint.
//!
//! The conditional checkpoint of the lease (`leaseCounter` unchanged) is the one commit point.
//! A snapshot of the state is either carried inline by that same `UpdateItem` (small state), or
//! written first, in chunks, to a companion table `<lease table>-state` under a new, unique
//! version, which the checkpoint then names together with its SHA-256 digest. A version that no
//! lease names is never read, and is deleted later. See the README's "State" section.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode as DdbBillingMode, KeySchemaElement, KeyType,
    ProvisionedThroughput, ScalarAttributeType, TableStatus,
};
use sha2::{Digest, Sha256};

use crate::lease::Billing;
use crate::sdk_error::message as sdk_message;

/// One state entry: its value and when it was written (the latest arrival time, in Unix
/// milliseconds, of the records of the batch that wrote it; used to merge parents' states).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    /// The value.
    pub value: Vec<u8>,
    /// When it was written.
    pub written_millis: u64,
}

/// A shard's state, by key.
pub type StateMap = BTreeMap<String, StateEntry>;

/// One change a batch made: a value set, or (`None`) a key deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The key.
    pub key: String,
    /// The new value; `None` deletes the key.
    pub value: Option<Vec<u8>>,
    /// The latest arrival time of the batch's records, Unix milliseconds.
    pub written_millis: u64,
}

/// Applies `changes`, in order, to `map`.
pub fn apply(map: &mut StateMap, changes: impl IntoIterator<Item = StateChange>) {
    for change in changes {
        match change.value {
            Some(value) => {
                map.insert(change.key, StateEntry { value, written_millis: change.written_millis });
            }
            None => {
                map.remove(&change.key);
            }
        }
    }
}

/// The first byte of an encoded snapshot: its format.
const FORMAT: u8 = 1;

/// Encodes a snapshot: the format byte, then the entries as postcard `(key, value, written)`.
pub fn encode(map: &StateMap) -> Vec<u8> {
    let entries: Vec<(&str, &[u8], u64)> =
        map.iter().map(|(k, e)| (k.as_str(), e.value.as_slice(), e.written_millis)).collect();
    let mut out = vec![FORMAT];
    // Serializing strings, byte slices and integers into a Vec cannot fail.
    out.extend(postcard::to_allocvec(&entries).unwrap_or_default());
    out
}

/// Decodes [`encode`]'s output.
///
/// # Errors
/// A description of what is wrong, when `bytes` is not a snapshot of a known format.
pub fn decode(bytes: &[u8]) -> Result<StateMap, String> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            let entries: Vec<(String, Vec<u8>, u64)> =
                postcard::from_bytes(rest).map_err(|e| format!("cannot decode: {e}"))?;
            Ok(entries
                .into_iter()
                .map(|(k, value, written_millis)| (k, StateEntry { value, written_millis }))
                .collect())
        }
        Some((format, _)) => Err(format!("unknown state format {format}")),
        None => Err("it is empty".to_owned()),
    }
}

/// The hex SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The state a lease names, as stored on the lease item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRef {
    /// The snapshot is in the lease item itself (attribute `hostState`).
    Inline {
        /// The encoded snapshot.
        data: Vec<u8>,
        /// Its SHA-256, hex.
        digest: String,
    },
    /// The snapshot is in the companion table, under `version`.
    Stored {
        /// The version: `<leaseCounter when written, 20 digits>-<random>`.
        version: String,
        /// How many chunks it has.
        chunks: u32,
        /// Its encoded length.
        bytes: u64,
        /// Its SHA-256, hex.
        digest: String,
    },
    /// The lease item's `hostState*` attributes do not name a snapshot (edited by hand, or
    /// written by something else): only this shard fails, when its state is restored.
    Malformed {
        /// What is wrong.
        problem: String,
    },
}

/// Attribute names of the state on a lease item (unknown to KCL, which keeps them).
pub mod attr {
    /// An inline snapshot (binary).
    pub const STATE: &str = "hostState";
    /// The version of a stored snapshot (string).
    pub const STATE_VERSION: &str = "hostStateVersion";
    /// Its number of chunks.
    pub const STATE_CHUNKS: &str = "hostStateChunks";
    /// Its encoded length.
    pub const STATE_BYTES: &str = "hostStateBytes";
    /// The snapshot's SHA-256 (inline or stored).
    pub const STATE_DIGEST: &str = "hostStateDigest";
}

/// Attribute names of the companion table.
mod table_attr {
    /// Hash key: the shard id.
    pub const SHARD: &str = "shardId";
    /// Range key: `<version>#<chunk index, 5 digits>`.
    pub const PART: &str = "part";
    /// The chunk's bytes.
    pub const DATA: &str = "data";
}

/// Largest chunk stored in one item (DynamoDB items are at most 400 KB).
pub const CHUNK_BYTES: usize = 256 << 10;

/// Largest inline snapshot allowed (the lease item, scanned by every worker, stays small).
pub const MAX_INLINE_BYTES: usize = 64 << 10;

/// Why state could not be stored or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A DynamoDB call failed.
    #[error("DynamoDB {operation} on state table {table} (shard {shard}) failed: {message}")]
    Aws {
        /// The operation.
        operation: &'static str,
        /// The companion table.
        table: String,
        /// The shard.
        shard: String,
        /// The SDK's error.
        message: String,
    },
    /// The version a lease names is incomplete or does not match its digest.
    #[error(
        "state of shard {shard}, version {version} in table {table}, is damaged: {problem}; restore the table from a backup, or remove the hostState* attributes from the lease to start the shard with empty state"
    )]
    Damaged {
        /// The companion table (or the lease table, for inline state).
        table: String,
        /// The shard.
        shard: String,
        /// The version (`inline` for inline state).
        version: String,
        /// What is wrong.
        problem: String,
    },
    /// The companion table did not become active.
    #[error("state table {table} is not ACTIVE after {waited:?}; check the table in DynamoDB")]
    NotActive {
        /// The table.
        table: String,
        /// How long we waited.
        waited: Duration,
    },
}

/// The companion table of one lease table, created on the first stored snapshot.
#[derive(Debug, Clone)]
pub struct StateStore {
    client: Client,
    table: String,
    lease_table: String,
    ready: Arc<tokio::sync::OnceCell<()>>,
}

impl StateStore {
    /// The companion table of `lease_table`: `<lease_table>-state`. `ready` is shared by the
    /// clones of one lease table, so the table is checked once per process.
    pub fn new(client: Client, lease_table: &str, ready: Arc<tokio::sync::OnceCell<()>>) -> Self {
        Self {
            client,
            table: format!("{lease_table}-state"),
            lease_table: lease_table.to_owned(),
            ready,
        }
    }

    /// The companion table's name.
    pub fn name(&self) -> &str {
        &self.table
    }

    fn aws(&self, operation: &'static str, shard: &str, message: String) -> StateError {
        StateError::Aws { operation, table: self.table.clone(), shard: shard.to_owned(), message }
    }

    /// Creates the table if missing (hash key `shardId`, range key `part`) and waits for it.
    async fn ensure_exists(&self, shard: &str, billing: Billing) -> Result<(), StateError> {
        self.ready
            .get_or_try_init(|| async {
                if self.status(shard).await? == Some(TableStatus::Active) {
                    return Ok(());
                }
                let key = |name: &str, key_type| {
                    KeySchemaElement::builder().attribute_name(name).key_type(key_type).build()
                };
                let def = |name: &str| {
                    AttributeDefinition::builder()
                        .attribute_name(name)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                };
                let build = |e: aws_sdk_dynamodb::error::BuildError| {
                    self.aws("CreateTable", shard, e.to_string())
                };
                let mut create = self
                    .client
                    .create_table()
                    .table_name(&self.table)
                    .key_schema(key(table_attr::SHARD, KeyType::Hash).map_err(build)?)
                    .key_schema(key(table_attr::PART, KeyType::Range).map_err(build)?)
                    .attribute_definitions(def(table_attr::SHARD).map_err(build)?)
                    .attribute_definitions(def(table_attr::PART).map_err(build)?);
                create = match billing {
                    Billing::PayPerRequest => create.billing_mode(DdbBillingMode::PayPerRequest),
                    Billing::Provisioned { read, write } => {
                        create.billing_mode(DdbBillingMode::Provisioned).provisioned_throughput(
                            ProvisionedThroughput::builder()
                                .read_capacity_units(read)
                                .write_capacity_units(write)
                                .build()
                                .map_err(build)?,
                        )
                    }
                };
                match create.send().await {
                    Ok(_) => tracing::info!(table = %self.table, "Created the state table."),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_resource_in_use_exception()) => {}
                    Err(e) => return Err(self.aws("CreateTable", shard, sdk_message(&e))),
                }
                let wait = Duration::from_secs(600);
                let started = tokio::time::Instant::now();
                while started.elapsed() < wait {
                    if self.status(shard).await? == Some(TableStatus::Active) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(StateError::NotActive { table: self.table.clone(), waited: wait })
            })
            .await
            .map(|_| ())
    }

    async fn status(&self, shard: &str) -> Result<Option<TableStatus>, StateError> {
        match self.client.describe_table().table_name(&self.table).send().await {
            Ok(out) => Ok(out.table().and_then(|t| t.table_status()).cloned()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                Ok(None)
            }
            Err(e) => Err(self.aws("DescribeTable", shard, sdk_message(&e))),
        }
    }

    /// Makes the reference a checkpoint of `shard` will name for `map`: inline when its
    /// snapshot is at most `inline_max` bytes, else stored in chunks under a new version
    /// (`counter` is the lease's counter now; the version is unique either way).
    ///
    /// # Errors
    /// When writing a chunk fails.
    pub async fn prepare(
        &self,
        shard: &str,
        map: &StateMap,
        counter: u64,
        inline_max: usize,
        billing: Billing,
    ) -> Result<StateRef, StateError> {
        let data = encode(map);
        let digest = digest(&data);
        if data.len() <= inline_max.min(MAX_INLINE_BYTES) {
            return Ok(StateRef::Inline { data, digest });
        }
        self.ensure_exists(shard, billing).await?;
        let version = format!("{counter:020}-{}", uuid::Uuid::new_v4().simple());
        let mut chunks = 0u32;
        for (index, chunk) in data.chunks(CHUNK_BYTES).enumerate() {
            self.client
                .put_item()
                .table_name(&self.table)
                .item(table_attr::SHARD, AttributeValue::S(shard.to_owned()))
                .item(table_attr::PART, AttributeValue::S(format!("{version}#{index:05}")))
                .item(table_attr::DATA, AttributeValue::B(Blob::new(chunk)))
                .send()
                .await
                .map_err(|e| self.aws("PutItem", shard, sdk_message(&e)))?;
            chunks += 1;
        }
        tracing::debug!(shard, version, chunks, bytes = data.len(), "Wrote a state snapshot.");
        Ok(StateRef::Stored { version, chunks, bytes: data.len() as u64, digest })
    }

    /// Loads the state `state` names for `shard`, checking its digest.
    ///
    /// # Errors
    /// When a chunk is missing, the digest differs, or DynamoDB fails.
    pub async fn load(&self, shard: &str, state: &StateRef) -> Result<StateMap, StateError> {
        let (data, expected, version, table) = match state {
            StateRef::Inline { data, digest } => {
                (data.clone(), digest, "inline".to_owned(), self.lease_table.clone())
            }
            StateRef::Stored { version, chunks, bytes, digest } => {
                let data = self.read(shard, version, *chunks, *bytes).await?;
                (data, digest, version.clone(), self.table.clone())
            }
            StateRef::Malformed { problem } => {
                return Err(StateError::Damaged {
                    table: self.lease_table.clone(),
                    shard: shard.to_owned(),
                    version: "unknown".to_owned(),
                    problem: problem.clone(),
                });
            }
        };
        let damaged = |problem: String| StateError::Damaged {
            table: table.clone(),
            shard: shard.to_owned(),
            version: version.clone(),
            problem,
        };
        let actual = digest(&data);
        if &actual != expected {
            return Err(damaged(format!("its SHA-256 is {actual}, the lease names {expected}")));
        }
        decode(&data).map_err(damaged)
    }

    async fn read(
        &self,
        shard: &str,
        version: &str,
        chunks: u32,
        bytes: u64,
    ) -> Result<Vec<u8>, StateError> {
        let mut data = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0).min(1 << 30));
        let mut found = 0u32;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#s = :s AND begins_with(#p, :v)")
                .expression_attribute_names("#s", table_attr::SHARD)
                .expression_attribute_names("#p", table_attr::PART)
                .expression_attribute_values(":s", AttributeValue::S(shard.to_owned()))
                .expression_attribute_values(":v", AttributeValue::S(format!("{version}#")))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.aws("Query", shard, sdk_message(&e)))?;
            for item in out.items() {
                let part = item.get(table_attr::PART).and_then(|v| v.as_s().ok());
                if part != Some(&format!("{version}#{found:05}")) {
                    break;
                }
                if let Some(AttributeValue::B(blob)) = item.get(table_attr::DATA) {
                    data.extend_from_slice(blob.as_ref());
                    found += 1;
                }
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        if found != chunks || data.len() as u64 != bytes {
            return Err(StateError::Damaged {
                table: self.table.clone(),
                shard: shard.to_owned(),
                version: version.to_owned(),
                problem: format!(
                    "found {found} of {chunks} chunks, {} of {bytes} bytes",
                    data.len()
                ),
            });
        }
        Ok(data)
    }

    /// Every item key (`part`) of `shard` in the companion table; none when it does not exist.
    async fn parts(&self, shard: &str) -> Result<Vec<String>, StateError> {
        let mut parts = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = match self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#s = :s")
                .projection_expression("#p")
                .expression_attribute_names("#s", table_attr::SHARD)
                .expression_attribute_names("#p", table_attr::PART)
                .expression_attribute_values(":s", AttributeValue::S(shard.to_owned()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
            {
                Ok(out) => out,
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_resource_not_found_exception()) =>
                {
                    return Ok(Vec::new());
                }
                Err(e) => return Err(self.aws("Query", shard, sdk_message(&e))),
            };
            parts.extend(
                out.items().iter().filter_map(|i| i.get(table_attr::PART)?.as_s().ok().cloned()),
            );
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(parts)
    }

    /// Deletes the versions of `shard` that no lease can name any more: those written before
    /// the lease's counter reached `committed_counter`, except `keep` (the committed one).
    /// Versions of a later owner (written at a higher counter) are left alone.
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn collect_garbage(
        &self,
        shard: &str,
        keep: Option<&str>,
        committed_counter: u64,
    ) -> Result<usize, StateError> {
        let mut deleted = 0;
        for part in self.parts(shard).await? {
            let version = part.split('#').next().unwrap_or_default();
            let counter =
                version.split('-').next().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
            if Some(version) == keep || counter >= committed_counter {
                continue;
            }
            self.delete_part(shard, &part).await?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Deletes every version of `shard` (its lease was deleted).
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn delete_all(&self, shard: &str) -> Result<(), StateError> {
        for part in self.parts(shard).await? {
            self.delete_part(shard, &part).await?;
        }
        Ok(())
    }

    async fn delete_part(&self, shard: &str, part: &str) -> Result<(), StateError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key(table_attr::SHARD, AttributeValue::S(shard.to_owned()))
            .key(table_attr::PART, AttributeValue::S(part.to_owned()))
            .send()
            .await
            .map_err(|e| self.aws("DeleteItem", shard, sdk_message(&e)))?;
        Ok(())
    }
}

/// The state a child shard starts from: the union of its parents' states (one parent after a
/// split, two after a merge). For a key in both parents, the entry written last wins; on a tie,
/// the parent with the lower starting hash key. `parents` are (starting hash key, state).
pub fn merge_parents(mut parents: Vec<(u128, StateMap)>) -> StateMap {
    parents.sort_by_key(|(start, _)| *start);
    let mut merged = StateMap::new();
    for (_, state) in parents {
        for (key, entry) in state {
            match merged.get(&key) {
                Some(old) if old.written_millis >= entry.written_millis => {}
                _ => {
                    merged.insert(key, entry);
                }
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str, written_millis: u64) -> StateEntry {
        StateEntry { value: value.as_bytes().to_vec(), written_millis }
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_detected() {
        let mut map = StateMap::new();
        map.insert("a".into(), entry("1", 5));
        map.insert("é".into(), StateEntry { value: vec![0, 255, 7], written_millis: u64::MAX });
        let data = encode(&map);
        assert_eq!(decode(&data), Ok(map));
        assert_eq!(decode(&encode(&StateMap::new())), Ok(StateMap::new()));
        assert!(decode(&[]).is_err());
        assert!(matches!(decode(&[9, 0]), Err(e) if e.contains("unknown state format 9")));
        assert!(decode(&data[..data.len() - 1]).is_err());
        assert_ne!(digest(&data), digest(&data[..data.len() - 1]));
        assert_eq!(digest(b"").len(), 64);
    }

    #[test]
    fn changes_apply_in_order() {
        let mut map = StateMap::new();
        let change = |k: &str, v: Option<&str>, t| StateChange {
            key: k.into(),
            value: v.map(|v| v.as_bytes().to_vec()),
            written_millis: t,
        };
        apply(
            &mut map,
            [change("a", Some("1"), 1), change("b", Some("2"), 1), change("a", None, 2)],
        );
        assert_eq!(map.keys().collect::<Vec<_>>(), ["b"]);
        apply(&mut map, [change("a", Some("3"), 3)]);
        assert_eq!(map.get("a"), Some(&entry("3", 3)));
    }

    #[test]
    fn a_merge_keeps_the_newest_entry_and_the_lower_parent_on_ties() {
        let low: StateMap =
            [("both".into(), entry("low", 10)), ("tie".into(), entry("low", 7))].into();
        let high: StateMap = [
            ("both".into(), entry("high", 20)),
            ("tie".into(), entry("high", 7)),
            ("only".into(), entry("high", 1)),
        ]
        .into();
        // The order given does not matter: parents are ordered by their hash ranges.
        let merged = merge_parents(vec![(1 << 100, high), (0, low)]);
        assert_eq!(merged.get("both"), Some(&entry("high", 20)));
        assert_eq!(merged.get("tie"), Some(&entry("low", 7)));
        assert_eq!(merged.get("only"), Some(&entry("high", 1)));
    }
}
