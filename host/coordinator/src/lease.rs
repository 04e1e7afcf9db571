//! The lease table: KCL 2.x's DynamoDB schema and conditional writes, so that a table written by
//! the Java KCL is continued from its checkpoints and ours can be read by KCL.
//!
//! Every write to a lease is conditional on the `leaseCounter` last seen, and increments it: a
//! matching counter proves nobody touched the lease since, and a worker that lost a lease can
//! never checkpoint it.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode as DdbBillingMode, KeySchemaElement, KeyType,
    ProvisionedThroughput, ReturnValue, ScalarAttributeType, TableStatus,
};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::state::{StateRef, StateStore, attr as state_attr};

/// KCL's attribute names.
pub mod attr {
    /// Hash key: the shard id.
    pub const LEASE_KEY: &str = "leaseKey";
    /// The worker holding the lease; absent when unassigned.
    pub const LEASE_OWNER: &str = "leaseOwner";
    /// Incremented by every write; the optimistic lock and the heartbeat.
    pub const LEASE_COUNTER: &str = "leaseCounter";
    /// The checkpoint's sequence number or sentinel.
    pub const CHECKPOINT: &str = "checkpoint";
    /// The checkpoint's KPL sub-sequence number.
    pub const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
    /// Owner changes since the last checkpoint.
    pub const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
    /// Parent shard ids (a string set).
    pub const PARENT_SHARD_ID: &str = "parentShardId";
    /// Child shard ids (a string set), written at shard end.
    pub const CHILD_SHARD_IDS: &str = "childShardIds";
    /// The shard's first hash key (decimal).
    pub const STARTING_HASH_KEY: &str = "startingHashKey";
    /// The shard's last hash key (decimal).
    pub const ENDING_HASH_KEY: &str = "endingHashKey";
    /// A two-phase checkpoint (KCL's `prepareCheckpoint`).
    pub const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
    /// Its sub-sequence number.
    pub const PENDING_CHECKPOINT_SUB: &str = "pendingCheckpointSubSequenceNumber";
    /// Its application state.
    pub const PENDING_CHECKPOINT_STATE: &str = "pendingCheckpointState";
    /// KCL 3.5 stores other entities in the lease table; leases have none or `LEASE`.
    pub const ENTITY_TYPE: &str = "entityType";
    /// KCL 3.x graceful hand-off: the current (outgoing) owner, while `leaseOwner` already
    /// names the next one.
    pub const CHECKPOINT_OWNER: &str = "checkpointOwner";
}

/// One lease: a shard and who processes it, up to where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard id.
    pub key: String,
    /// The holder's worker id.
    pub owner: Option<String>,
    /// The counter as last read or written.
    pub counter: u64,
    /// Where processing is.
    pub checkpoint: Checkpoint,
    /// Owner changes since the last checkpoint.
    pub owner_switches_since_checkpoint: u64,
    /// The shard's parents.
    pub parent_shard_ids: Vec<String>,
    /// The shard's children, known at shard end.
    pub child_shard_ids: Vec<String>,
    /// The shard's hash key range (decimal strings), when known.
    pub hash_range: Option<(String, String)>,
    /// The task state committed with the checkpoint (`hostState*` attributes), if any.
    pub state: Option<StateRef>,
    /// During a graceful hand-off, the outgoing owner (`owner` is then the next one).
    pub checkpoint_owner: Option<String>,
    /// What is wrong with the item, when an attribute is missing or not of KCL's type or form
    /// (edited by hand, or written by something else). Such a lease is never taken, renewed
    /// over or checkpointed: its shard waits, and the others go on. The other fields are then
    /// what could be read, for display only.
    pub damaged: Option<String>,
}

impl Lease {
    /// A new, unowned lease.
    pub fn new(key: &str, checkpoint: Checkpoint, parents: Vec<String>) -> Self {
        Self {
            key: key.to_owned(),
            owner: None,
            counter: 0,
            checkpoint,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: parents,
            child_shard_ids: Vec::new(),
            hash_range: None,
            state: None,
            checkpoint_owner: None,
            damaged: None,
        }
    }
}

/// Billing of a table this host creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Billing {
    /// On-demand (KCL 2.x's default).
    PayPerRequest,
    /// Provisioned capacity.
    Provisioned {
        /// Read capacity units.
        read: i64,
        /// Write capacity units.
        write: i64,
    },
}

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease changed since we last saw it: another worker took it (or it was checkpointed
    /// by one). The caller no longer holds it.
    #[error(
        "lease {lease_key} in table {table} changed since leaseCounter {counter}: another worker took it"
    )]
    Lost {
        /// The table.
        table: String,
        /// The lease.
        lease_key: String,
        /// The counter we expected.
        counter: u64,
    },
    /// A DynamoDB call failed.
    #[error("DynamoDB {operation} on table {table}{} failed: {message}", lease_key.as_deref().map(|k| format!(" (lease {k})")).unwrap_or_default())]
    Aws {
        /// The operation.
        operation: &'static str,
        /// The table.
        table: String,
        /// The lease, if one.
        lease_key: Option<String>,
        /// The SDK's error, with its service message.
        message: String,
    },
    /// A lease item has an attribute of the wrong type or form (see [`Lease::damaged`]).
    #[error(
        "lease table {table}: item {lease_key} is damaged: {problem}; its shard is not processed on this host until the item is fixed (the other shards go on)"
    )]
    Damaged {
        /// The table.
        table: String,
        /// The item's key.
        lease_key: String,
        /// What is wrong, naming the attribute.
        problem: String,
    },
    /// The lease table does not exist (any more).
    #[error(
        "lease table {table} does not exist (DynamoDB {operation}: ResourceNotFoundException): it was deleted while the job ran"
    )]
    TableGone {
        /// The table.
        table: String,
        /// The operation that found it missing.
        operation: &'static str,
    },
    /// A DynamoDB call was not answered in time.
    #[error(
        "DynamoDB {operation} on table {table} was not answered within {after:?}: DynamoDB unreachable or slow"
    )]
    Timeout {
        /// The table.
        table: String,
        /// The operation.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// An item does not look like a KCL lease.
    #[error("lease table {table}: item {lease_key} is not a valid lease: {problem}")]
    Malformed {
        /// The table.
        table: String,
        /// The item's key.
        lease_key: String,
        /// What is wrong.
        problem: String,
    },
    /// The table did not become active in time.
    #[error("lease table {table} is not ACTIVE after {waited:?}; check the table in DynamoDB")]
    NotActive {
        /// The table.
        table: String,
        /// How long we waited.
        waited: Duration,
    },
}

/// The DynamoDB lease table of one stream.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    client: Client,
    table: String,
    /// Whether the companion state table is known to exist (shared by clones).
    state_ready: std::sync::Arc<tokio::sync::OnceCell<()>>,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

use crate::sdk_error::message as sdk_message;

impl LeaseTable {
    /// The table `table`, reached with `client`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into(), state_ready: std::sync::Arc::default() }
    }

    /// The companion table holding the task state snapshots too large to be inline.
    pub fn state_store(&self) -> StateStore {
        StateStore::new(self.client.clone(), &self.table, self.state_ready.clone())
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.table
    }

    fn aws(&self, operation: &'static str, lease_key: Option<&str>, message: String) -> LeaseError {
        LeaseError::Aws {
            operation,
            table: self.table.clone(),
            lease_key: lease_key.map(str::to_owned),
            message,
        }
    }

    /// The error for a failed call: [`LeaseError::TableGone`] when DynamoDB says the table does
    /// not exist, else [`LeaseError::Aws`] with the service's message.
    fn failed<E, R>(
        &self,
        operation: &'static str,
        lease_key: Option<&str>,
        error: &aws_sdk_dynamodb::error::SdkError<E, R>,
    ) -> LeaseError
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        if error.as_service_error().and_then(|e| e.code()) == Some("ResourceNotFoundException") {
            return LeaseError::TableGone { table: self.table.clone(), operation };
        }
        self.aws(operation, lease_key, sdk_message(error))
    }

    /// Times out `call` after `after`: a DynamoDB that does not answer (paused, cut off) would
    /// otherwise hold the caller for as long as the connection lasts.
    ///
    /// # Errors
    /// [`LeaseError::Timeout`], or the call's own error.
    pub async fn within<T>(
        &self,
        operation: &'static str,
        after: Duration,
        call: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        tokio::time::timeout(after, call).await.map_err(|_| LeaseError::Timeout {
            table: self.table.clone(),
            operation,
            after,
        })?
    }

    fn damaged(&self, key: &str, problem: String) -> LeaseError {
        LeaseError::Damaged { table: self.table.clone(), lease_key: key.to_owned(), problem }
    }

    /// Why a write conditional on `lease`'s counter failed: another host wrote it
    /// ([`LeaseError::Lost`]), unless the item is now damaged (a `leaseCounter` that is no longer
    /// a number fails every condition), which is said as such.
    async fn explain_lost(&self, lease: &Lease) -> LeaseError {
        match self.get(&lease.key).await {
            Ok(Some(Lease { damaged: Some(problem), .. })) => self.damaged(&lease.key, problem),
            Err(error @ LeaseError::Damaged { .. }) => error,
            _ => self.lost(lease),
        }
    }

    fn lost(&self, lease: &Lease) -> LeaseError {
        LeaseError::Lost {
            table: self.table.clone(),
            lease_key: lease.key.clone(),
            counter: lease.counter,
        }
    }

    /// Creates the table if it does not exist (KCL's key schema), and waits until it is active.
    ///
    /// # Errors
    /// When DynamoDB refuses, or the table stays inactive for `wait`.
    pub async fn ensure_exists(&self, billing: Billing, wait: Duration) -> Result<(), LeaseError> {
        if self.status().await? == Some(TableStatus::Active) {
            return Ok(());
        }
        let mut create = self
            .client
            .create_table()
            .table_name(&self.table)
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(attr::LEASE_KEY)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| self.aws("CreateTable", None, e.to_string()))?,
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(attr::LEASE_KEY)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| self.aws("CreateTable", None, e.to_string()))?,
            );
        create = match billing {
            Billing::PayPerRequest => create.billing_mode(DdbBillingMode::PayPerRequest),
            Billing::Provisioned { read, write } => {
                create.billing_mode(DdbBillingMode::Provisioned).provisioned_throughput(
                    ProvisionedThroughput::builder()
                        .read_capacity_units(read)
                        .write_capacity_units(write)
                        .build()
                        .map_err(|e| self.aws("CreateTable", None, e.to_string()))?,
                )
            }
        };
        match create.send().await {
            Ok(_) => tracing::info!(table = %self.table, "Created the lease table."),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()) => {}
            Err(e) => return Err(self.aws("CreateTable", None, sdk_message(&e))),
        }
        let started = tokio::time::Instant::now();
        while started.elapsed() < wait {
            if self.status().await? == Some(TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(LeaseError::NotActive { table: self.table.clone(), waited: wait })
    }

    /// Whether the table exists (in any state).
    ///
    /// # Errors
    /// When `DescribeTable` fails otherwise than by not finding it.
    pub async fn exists(&self) -> Result<bool, LeaseError> {
        Ok(self.status().await?.is_some())
    }

    async fn status(&self) -> Result<Option<TableStatus>, LeaseError> {
        match self.client.describe_table().table_name(&self.table).send().await {
            Ok(out) => Ok(out.table().and_then(|t| t.table_status()).cloned()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                Ok(None)
            }
            Err(e) => Err(self.aws("DescribeTable", None, sdk_message(&e))),
        }
    }

    /// Every lease in the table (consistent read), skipping KCL 3.5's non-lease entities.
    ///
    /// # Errors
    /// When a scan fails or an item is not a valid lease.
    pub async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.failed("Scan", None, &e))?;
            for item in out.items() {
                if let Some(lease) = self.parse_item(item)? {
                    leases.push(lease);
                }
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        leases.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(leases)
    }

    /// One lease (consistent read).
    ///
    /// # Errors
    /// When the read fails or the item is not a valid lease.
    pub async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(attr::LEASE_KEY, s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.failed("GetItem", Some(key), &e))?;
        match out.item() {
            Some(item) => self.parse_item(item),
            None => Ok(None),
        }
    }

    /// Creates `lease` unless a lease for its shard exists; returns whether it created it.
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn create_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(attr::LEASE_KEY, s(&lease.key))
            .item(attr::LEASE_COUNTER, n(lease.counter))
            .item(attr::CHECKPOINT, s(lease.checkpoint.as_str()))
            .item(attr::CHECKPOINT_SUB, n(lease.checkpoint.sub_sequence_number()))
            .item(attr::OWNER_SWITCHES, n(lease.owner_switches_since_checkpoint))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", attr::LEASE_KEY);
        if let Some(owner) = &lease.owner {
            put = put.item(attr::LEASE_OWNER, s(owner));
        }
        if !lease.parent_shard_ids.is_empty() {
            put =
                put.item(attr::PARENT_SHARD_ID, AttributeValue::Ss(lease.parent_shard_ids.clone()));
        }
        if let Some((start, end)) = &lease.hash_range {
            put = put.item(attr::STARTING_HASH_KEY, s(start)).item(attr::ENDING_HASH_KEY, s(end));
        }
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.failed("PutItem", Some(&lease.key), &e)),
        }
    }

    /// Runs a conditional update on `lease` (condition: the counter is unchanged; the update
    /// increments it) and returns the lease as written.
    async fn update(
        &self,
        operation: &'static str,
        lease: &Lease,
        set: &str,
        values: Vec<(&str, AttributeValue)>,
        updated: Lease,
    ) -> Result<Lease, LeaseError> {
        self.update_where(operation, lease, set, None, values, updated).await
    }

    /// [`update`](Self::update), also conditional on `extra` (ANDed with the counter check).
    async fn update_where(
        &self,
        operation: &'static str,
        lease: &Lease,
        set: &str,
        extra: Option<&str>,
        values: Vec<(&str, AttributeValue)>,
        updated: Lease,
    ) -> Result<Lease, LeaseError> {
        let condition = match extra {
            Some(extra) => format!("#counter = :counter AND {extra}"),
            None => "#counter = :counter".to_owned(),
        };
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(attr::LEASE_KEY, s(&lease.key))
            .update_expression(set)
            .condition_expression(&condition)
            .expression_attribute_names("#counter", attr::LEASE_COUNTER)
            .expression_attribute_values(":counter", n(lease.counter))
            .expression_attribute_values(":next", n(lease.counter + 1));
        for (name, value) in values {
            request = request.expression_attribute_values(name, value);
        }
        for (placeholder, name) in [
            ("#owner", attr::LEASE_OWNER),
            ("#cp", attr::CHECKPOINT),
            ("#cpsub", attr::CHECKPOINT_SUB),
            ("#switches", attr::OWNER_SWITCHES),
            ("#pending", attr::PENDING_CHECKPOINT),
            ("#pendingsub", attr::PENDING_CHECKPOINT_SUB),
            ("#pendingstate", attr::PENDING_CHECKPOINT_STATE),
            ("#children", attr::CHILD_SHARD_IDS),
            ("#hsinline", state_attr::STATE),
            ("#hsversion", state_attr::STATE_VERSION),
            ("#hschunks", state_attr::STATE_CHUNKS),
            ("#hsbytes", state_attr::STATE_BYTES),
            ("#hsdigest", state_attr::STATE_DIGEST),
            ("#ckptowner", attr::CHECKPOINT_OWNER),
        ] {
            if set.contains(placeholder) || condition.contains(placeholder) {
                request = request.expression_attribute_names(placeholder, name);
            }
        }
        match request.return_values(ReturnValue::AllNew).send().await {
            Ok(out) => {
                // The owner fields as they are now: a graceful hand-off may have named the next
                // owner without moving the counter. An item damaged since is never held on.
                let mut updated = updated;
                if let Some(item) = out.attributes() {
                    if let Some(Lease { damaged: Some(problem), .. }) = self.parse_item(item)? {
                        return Err(self.damaged(&lease.key, problem));
                    }
                    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
                    updated.owner = text(attr::LEASE_OWNER);
                    updated.checkpoint_owner = text(attr::CHECKPOINT_OWNER);
                }
                Ok(updated)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(self.explain_lost(lease).await)
            }
            Err(e) => Err(self.failed(operation, Some(&lease.key), &e)),
        }
    }

    /// Takes `lease` (as last seen) for `owner`.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when someone else wrote it first.
    pub async fn take(&self, lease: &Lease, owner: &str) -> Result<Lease, LeaseError> {
        // A lease marked for a hand-off to us already names us as owner, but changes hands.
        let switched = lease.owner.as_deref() != Some(owner) || lease.checkpoint_owner.is_some();
        let mut updated = lease.clone();
        updated.owner = Some(owner.to_owned());
        updated.checkpoint_owner = None;
        updated.counter += 1;
        let mut values = vec![(":me", s(owner))];
        let set = if switched {
            updated.owner_switches_since_checkpoint += 1;
            values.push((":one", n(1)));
            "SET #counter = :next, #owner = :me REMOVE #ckptowner ADD #switches :one"
        } else {
            "SET #counter = :next, #owner = :me REMOVE #ckptowner"
        };
        let taken = self.update("UpdateItem (take)", lease, set, values, updated).await?;
        tracing::info!(table = %self.table, lease = %lease.key, owner, counter = taken.counter, previous_owner = lease.checkpoint_owner.as_deref().or(lease.owner.as_deref()).unwrap_or("-"), "Took lease.");
        Ok(taken)
    }

    /// Renews `lease` (bumps its counter), proving we still hold it.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when someone else wrote it since.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let mut updated = lease.clone();
        updated.counter += 1;
        self.update("UpdateItem (renew)", lease, "SET #counter = :next", vec![], updated).await
    }

    /// Checkpoints `lease` at `checkpoint`.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease changed since we last wrote it: the caller lost it
    /// and must stop processing the shard.
    pub async fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: Checkpoint,
    ) -> Result<Lease, LeaseError> {
        self.checkpoint_with_state(lease, checkpoint, None).await
    }

    /// Checkpoints `lease` at `checkpoint` and, with `state`, names the task state that matches
    /// it, in the same conditional write: the one commit point of checkpoint and state.
    ///
    /// # Errors
    /// As [`LeaseTable::checkpoint`].
    pub async fn checkpoint_with_state(
        &self,
        lease: &Lease,
        checkpoint: Checkpoint,
        state: Option<StateRef>,
    ) -> Result<Lease, LeaseError> {
        let mut updated = lease.clone();
        updated.counter += 1;
        updated.owner_switches_since_checkpoint = 0;
        let mut values = vec![
            (":cp", s(checkpoint.as_str())),
            (":cpsub", n(checkpoint.sub_sequence_number())),
            (":zero", n(0)),
        ];
        updated.checkpoint = checkpoint;
        let set = "SET #counter = :next, #cp = :cp, #cpsub = :cpsub, #switches = :zero";
        let remove = "REMOVE #pending, #pendingsub, #pendingstate";
        let expression = match &state {
            // A malformed reference is never written: it only comes from reading an item.
            None | Some(StateRef::Malformed { .. }) => format!("{set} {remove}"),
            Some(StateRef::Inline { data, digest }) => {
                values.push((":hs", AttributeValue::B(data.clone().into())));
                values.push((":hsdigest", s(digest)));
                format!(
                    "{set}, #hsinline = :hs, #hsdigest = :hsdigest \
                     {remove}, #hsversion, #hschunks, #hsbytes"
                )
            }
            Some(StateRef::Stored { version, chunks, bytes, digest }) => {
                values.push((":hsversion", s(version)));
                values.push((":hschunks", n(u64::from(*chunks))));
                values.push((":hsbytes", n(*bytes)));
                values.push((":hsdigest", s(digest)));
                format!(
                    "{set}, #hsversion = :hsversion, #hschunks = :hschunks, #hsbytes = :hsbytes, \
                     #hsdigest = :hsdigest {remove}, #hsinline"
                )
            }
        };
        if state.is_some() {
            updated.state = state;
        }
        self.update("UpdateItem (checkpoint)", lease, &expression, values, updated).await
    }

    /// Records a shard's children on its lease (at shard end).
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease changed since.
    pub async fn set_children(
        &self,
        lease: &Lease,
        children: Vec<String>,
    ) -> Result<Lease, LeaseError> {
        let mut updated = lease.clone();
        updated.counter += 1;
        updated.child_shard_ids.clone_from(&children);
        self.update(
            "UpdateItem (children)",
            lease,
            "SET #counter = :next, #children = :children",
            vec![(":children", AttributeValue::Ss(children))],
            updated,
        )
        .await
    }

    /// Gives `lease` up: removes the owner, so any worker (ours or KCL's) may take it at once.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease changed since.
    pub async fn release(&self, lease: &Lease) -> Result<(), LeaseError> {
        let mut updated = lease.clone();
        updated.counter += 1;
        updated.owner = None;
        updated.checkpoint_owner = None;
        self.update(
            "UpdateItem (release)",
            lease,
            "SET #counter = :next REMOVE #owner, #ckptowner",
            vec![],
            updated,
        )
        .await?;
        tracing::info!(table = %self.table, lease = %lease.key, "Released lease.");
        Ok(())
    }

    /// Asks the live owner of `lease` to hand it over to `taker` (KCL 3.x's graceful hand-off):
    /// names `taker` as `leaseOwner` and the current owner as `checkpointOwner`, without moving
    /// the counter, so the owner's renewals and checkpoints go on until it hands the lease over.
    /// Returns whether the mark was written (not when the owner changed or another hand-off is
    /// pending).
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn request_handoff(&self, lease: &Lease, taker: &str) -> Result<bool, LeaseError> {
        let Some(owner) = &lease.owner else {
            return Ok(false);
        };
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(attr::LEASE_KEY, s(&lease.key))
            .update_expression("SET #owner = :taker, #ckptowner = :owner")
            .condition_expression("#owner = :owner AND attribute_not_exists(#ckptowner)")
            .expression_attribute_names("#owner", attr::LEASE_OWNER)
            .expression_attribute_names("#ckptowner", attr::CHECKPOINT_OWNER)
            .expression_attribute_values(":taker", s(taker))
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.table, lease = %lease.key, owner, taker, "Asked the owner to hand the lease over.");
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.failed("UpdateItem (hand-off request)", Some(&lease.key), &e)),
        }
    }

    /// Withdraws a hand-off that `taker` asked for and that is still pending: names the
    /// current owner (`checkpointOwner`) as `leaseOwner` again. Returns whether it did.
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn cancel_handoff(&self, key: &str, taker: &str) -> Result<bool, LeaseError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(attr::LEASE_KEY, s(key))
            .update_expression("SET #owner = #ckptowner REMOVE #ckptowner")
            .condition_expression("#owner = :taker AND attribute_exists(#ckptowner)")
            .expression_attribute_names("#owner", attr::LEASE_OWNER)
            .expression_attribute_names("#ckptowner", attr::CHECKPOINT_OWNER)
            .expression_attribute_values(":taker", s(taker))
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.table, lease = %key, "Withdrew the hand-off request.");
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.failed("UpdateItem (hand-off withdrawal)", Some(key), &e)),
        }
    }

    /// Hands `lease` (as last written by us, its outgoing owner) over to `next`, after the last
    /// checkpoint: names `next` as owner, removes `checkpointOwner` and moves the counter.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] when the lease changed since, or `next` is no longer the one asking
    /// (it withdrew its request, or the mark is gone).
    pub async fn hand_over(&self, lease: &Lease, next: &str) -> Result<(), LeaseError> {
        let mut updated = lease.clone();
        updated.counter += 1;
        updated.owner = Some(next.to_owned());
        updated.checkpoint_owner = None;
        updated.owner_switches_since_checkpoint += 1;
        // Only to a taker still asking (it may have withdrawn, or another host asked since):
        // otherwise the lease would name an owner that never starts it.
        self.update_where(
            "UpdateItem (hand over)",
            lease,
            "SET #counter = :next, #owner = :taker REMOVE #ckptowner ADD #switches :one",
            Some("#owner = :taker AND attribute_exists(#ckptowner)"),
            vec![(":taker", s(next)), (":one", n(1))],
            updated,
        )
        .await?;
        tracing::info!(table = %self.table, lease = %lease.key, next, "Handed lease over.");
        Ok(())
    }

    /// Deletes a lease (after its shard ended and its children started).
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn delete(&self, key: &str) -> Result<(), LeaseError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key(attr::LEASE_KEY, s(key))
            .send()
            .await
            .map_err(|e| self.failed("DeleteItem", Some(key), &e))?;
        Ok(())
    }

    /// Reads a lease item. An attribute of the wrong type or form makes the lease
    /// [`Lease::damaged`] (naming the attribute), not an error, so that one bad item stops only
    /// its own shard; only an item without a `leaseKey` string (which the table's key schema
    /// rules out) is an error.
    fn parse_item(
        &self,
        item: &HashMap<String, AttributeValue>,
    ) -> Result<Option<Lease>, LeaseError> {
        let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str);
        let key = text(attr::LEASE_KEY).unwrap_or_default().to_owned();
        if key.is_empty() {
            return Err(LeaseError::Malformed {
                table: self.table.clone(),
                lease_key: key,
                problem: "it has no leaseKey string".into(),
            });
        }
        if text(attr::ENTITY_TYPE).is_some_and(|t| t != "LEASE") {
            return Ok(None);
        }
        let mut problems = Vec::new();
        let mut problem = |p: String| problems.push(p);
        let string = |name: &str, problem: &mut dyn FnMut(String)| match item.get(name) {
            None => None,
            Some(AttributeValue::S(v)) => Some(v.clone()),
            Some(other) => {
                problem(format!("{name} is {}, not a string", describe(other)));
                None
            }
        };
        let number = |name: &str, required: bool, problem: &mut dyn FnMut(String)| -> u64 {
            match item.get(name) {
                None if required => {
                    problem(format!("{name} is missing"));
                    0
                }
                None => 0,
                Some(AttributeValue::N(v)) => v.parse().unwrap_or_else(|_| {
                    problem(format!("{name} is {v:?}, not a whole number"));
                    0
                }),
                Some(other) => {
                    problem(format!("{name} is {}, not a number", describe(other)));
                    0
                }
            }
        };
        let set = |name: &str, problem: &mut dyn FnMut(String)| -> Vec<String> {
            match item.get(name) {
                None => Vec::new(),
                Some(AttributeValue::Ss(v)) => v.clone(),
                Some(AttributeValue::S(v)) => vec![v.clone()],
                Some(other) => {
                    problem(format!("{name} is {}, not a string set", describe(other)));
                    Vec::new()
                }
            }
        };
        let owner = string(attr::LEASE_OWNER, &mut problem);
        let counter = number(attr::LEASE_COUNTER, true, &mut problem);
        let sub = number(attr::CHECKPOINT_SUB, false, &mut problem);
        // A placeholder when unreadable: a damaged lease is never processed from it.
        let checkpoint = match item.get(attr::CHECKPOINT) {
            Some(AttributeValue::S(v)) => {
                Checkpoint::parse(v, sub).unwrap_or_else(|CheckpointError { value }| {
                    problem(format!(
                        "{} {value:?} is not a sequence number or sentinel",
                        attr::CHECKPOINT
                    ));
                    Checkpoint::TrimHorizon
                })
            }
            None => {
                problem(format!("{} is missing", attr::CHECKPOINT));
                Checkpoint::TrimHorizon
            }
            Some(other) => {
                problem(format!("{} is {}, not a string", attr::CHECKPOINT, describe(other)));
                Checkpoint::TrimHorizon
            }
        };
        let owner_switches_since_checkpoint = number(attr::OWNER_SWITCHES, false, &mut problem);
        let parent_shard_ids = set(attr::PARENT_SHARD_ID, &mut problem);
        let child_shard_ids = set(attr::CHILD_SHARD_IDS, &mut problem);
        let starting = string(attr::STARTING_HASH_KEY, &mut problem);
        let ending = string(attr::ENDING_HASH_KEY, &mut problem);
        let checkpoint_owner = string(attr::CHECKPOINT_OWNER, &mut problem);
        Ok(Some(Lease {
            owner,
            counter,
            checkpoint,
            owner_switches_since_checkpoint,
            parent_shard_ids,
            child_shard_ids,
            hash_range: starting.zip(ending),
            state: Self::parse_state(item),
            checkpoint_owner,
            damaged: (!problems.is_empty()).then(|| problems.join("; ")),
            key,
        }))
    }

    /// The `hostState*` attributes of a lease item. Attributes that name no snapshot give
    /// [`StateRef::Malformed`], so that only that shard fails (when its state is restored), not
    /// every read of the table.
    fn parse_state(item: &HashMap<String, AttributeValue>) -> Option<StateRef> {
        Self::state_ref(item).unwrap_or_else(|problem| Some(StateRef::Malformed { problem }))
    }

    fn state_ref(item: &HashMap<String, AttributeValue>) -> Result<Option<StateRef>, String> {
        let digest = item.get(state_attr::STATE_DIGEST).and_then(|v| v.as_s().ok()).cloned();
        let number = |name: &str| -> Result<u64, String> {
            match item.get(name) {
                Some(AttributeValue::N(v)) => {
                    v.parse().map_err(|_| format!("{name} is {v:?}, not a whole number"))
                }
                other => Err(format!("{name} is {other:?}, not a number")),
            }
        };
        let Some(digest) = digest else {
            return Ok(None);
        };
        if let Some(AttributeValue::B(data)) = item.get(state_attr::STATE) {
            return Ok(Some(StateRef::Inline { data: data.clone().into_inner(), digest }));
        }
        let Some(version) = item.get(state_attr::STATE_VERSION).and_then(|v| v.as_s().ok()) else {
            return Err(format!(
                "it has {} but neither {} nor {}",
                state_attr::STATE_DIGEST,
                state_attr::STATE,
                state_attr::STATE_VERSION
            ));
        };
        Ok(Some(StateRef::Stored {
            version: version.clone(),
            chunks: u32::try_from(number(state_attr::STATE_CHUNKS)?)
                .map_err(|_| format!("{} is too large", state_attr::STATE_CHUNKS))?,
            bytes: number(state_attr::STATE_BYTES)?,
            digest,
        }))
    }
}

/// An attribute value's type, as DynamoDB names it, for a message.
fn describe(value: &AttributeValue) -> String {
    match value {
        AttributeValue::S(v) => format!("a string ({v:?})"),
        AttributeValue::N(v) => format!("a number ({v})"),
        AttributeValue::B(_) => "binary".to_owned(),
        AttributeValue::Bool(v) => format!("a boolean ({v})"),
        AttributeValue::Null(_) => "null".to_owned(),
        AttributeValue::Ss(_) => "a string set".to_owned(),
        AttributeValue::Ns(_) => "a number set".to_owned(),
        AttributeValue::Bs(_) => "a binary set".to_owned(),
        AttributeValue::L(_) => "a list".to_owned(),
        AttributeValue::M(_) => "a map".to_owned(),
        _ => "of an unknown type".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LeaseTable {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .build();
        LeaseTable::new(Client::from_conf(config), "t")
    }

    fn item(extra: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        let mut item: HashMap<String, AttributeValue> = [
            (attr::LEASE_KEY.to_owned(), s("shardId-000000000001")),
            (attr::LEASE_COUNTER.to_owned(), n(7)),
            (attr::CHECKPOINT.to_owned(), s("42")),
        ]
        .into();
        item.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        item
    }

    #[test]
    fn reads_the_state_a_lease_names_and_the_hand_off_mark() {
        let t = table();
        let plain = t.parse_item(&item(&[])).ok().flatten().expect("a lease");
        assert_eq!((plain.state, plain.checkpoint_owner), (None, None));

        let inline = t
            .parse_item(&item(&[
                (state_attr::STATE, AttributeValue::B(vec![1, 0].into())),
                (state_attr::STATE_DIGEST, s("d")),
                (attr::CHECKPOINT_OWNER, s("a")),
                (attr::LEASE_OWNER, s("b")),
            ]))
            .ok()
            .flatten()
            .expect("a lease");
        assert_eq!(inline.state, Some(StateRef::Inline { data: vec![1, 0], digest: "d".into() }));
        assert_eq!(inline.checkpoint_owner.as_deref(), Some("a"));
        assert_eq!(inline.owner.as_deref(), Some("b"));

        let stored = t
            .parse_item(&item(&[
                (state_attr::STATE_VERSION, s("v")),
                (state_attr::STATE_CHUNKS, n(3)),
                (state_attr::STATE_BYTES, n(600_000)),
                (state_attr::STATE_DIGEST, s("d")),
            ]))
            .ok()
            .flatten()
            .expect("a lease");
        assert_eq!(
            stored.state,
            Some(StateRef::Stored {
                version: "v".into(),
                chunks: 3,
                bytes: 600_000,
                digest: "d".into()
            })
        );

        // A digest that names no snapshot fails that shard's restore only, not the table scan.
        let lease = t.parse_item(&item(&[(state_attr::STATE_DIGEST, s("d"))])).ok().flatten();
        match lease.and_then(|l| l.state) {
            Some(StateRef::Malformed { problem }) => assert!(problem.contains("hostStateVersion")),
            other => panic!("expected a malformed state reference, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_item_names_its_attribute_and_fails_only_its_lease() {
        let t = table();
        let damaged = |extra: &[(&str, AttributeValue)], remove: &[&str]| {
            let mut it = item(extra);
            for name in remove {
                it.remove(*name);
            }
            t.parse_item(&it).ok().flatten().and_then(|l| l.damaged)
        };
        assert_eq!(damaged(&[], &[]), None);
        for (extra, remove, expected) in [
            (vec![(attr::CHECKPOINT, n(42))], vec![], "checkpoint is a number (42), not a string"),
            (
                vec![(attr::CHECKPOINT, s("banana"))],
                vec![],
                "checkpoint \"banana\" is not a sequence number or sentinel",
            ),
            (vec![], vec![attr::CHECKPOINT], "checkpoint is missing"),
            (
                vec![(attr::LEASE_COUNTER, s("7"))],
                vec![],
                "leaseCounter is a string (\"7\"), not a number",
            ),
            (vec![], vec![attr::LEASE_COUNTER], "leaseCounter is missing"),
            (vec![(attr::LEASE_OWNER, n(3))], vec![], "leaseOwner is a number (3), not a string"),
            (
                vec![(attr::PARENT_SHARD_ID, n(1))],
                vec![],
                "parentShardId is a number (1), not a string set",
            ),
            (
                vec![(attr::OWNER_SWITCHES, s("x"))],
                vec![],
                "ownerSwitchesSinceCheckpoint is a string (\"x\"), not a number",
            ),
        ] {
            assert_eq!(damaged(&extra, &remove).as_deref(), Some(expected));
        }
        // Several problems are all named.
        let both = damaged(&[(attr::LEASE_OWNER, n(3)), (attr::CHECKPOINT, n(1))], &[]);
        assert_eq!(
            both.as_deref(),
            Some(
                "leaseOwner is a number (3), not a string; checkpoint is a number (1), not a string"
            )
        );
    }
}
