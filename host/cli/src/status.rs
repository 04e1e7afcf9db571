//! `kinesis-host status`: what a job's lease tables say, shard by shard, next to what the
//! streams hold. Read-only: it lists shards, scans the lease table and, per unfinished shard,
//! asks Kinesis how far its checkpoint is behind the tip of the shard.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use kinesis_host_coordinator::aws::AwsClients;
use kinesis_host_coordinator::checkpoint::Checkpoint;
use kinesis_host_coordinator::lease::{Lease, LeaseTable};
use kinesis_host_coordinator::reader::{self, ShardInfo};
use serde::Serialize;

use crate::run::aws_settings;
use crate::samza::{InitialPosition, InputStream};

/// Lag look-ups in flight at once, per stream.
const LAG_CONCURRENCY: usize = 8;
/// The longest a shard's lag look-up may take; after that its lag is unknown.
const LAG_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a shard is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    /// Still takes records.
    Open,
    /// Closed by a split or merge (another shard names it as parent), or read to its end.
    Closed,
    /// Its lease is in the table but the stream no longer lists the shard (past retention).
    Trimmed,
}

impl ShardState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
            Self::Trimmed => "trimmed",
        }
    }
}

/// One shard of a stream, or one lease whose shard is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardStatus {
    /// The shard id (the lease's `leaseKey`).
    pub shard_id: String,
    /// Open, closed or trimmed.
    pub state: ShardState,
    /// Whether the lease table has a lease for the shard.
    pub leased: bool,
    /// The lease's `leaseOwner`; `None` when unowned or without a lease. During a pending
    /// hand-off this is the host taking the lease over (see `handoff`).
    pub owner: Option<String>,
    /// A graceful hand-off asked for and not completed yet (KCL 3.x's mark: `checkpointOwner`
    /// set beside `leaseOwner`); `None` otherwise.
    pub handoff: Option<Handoff>,
    /// The lease's `checkpoint`: a sequence number in full or a sentinel.
    pub checkpoint: Option<String>,
    /// The lease's `checkpointSubSequenceNumber`.
    pub checkpoint_sub_sequence_number: Option<u64>,
    /// The lease's `leaseCounter`.
    pub lease_counter: Option<u64>,
    /// The lease's `ownerSwitchesSinceCheckpoint`.
    pub owner_switches_since_checkpoint: Option<u64>,
    /// The shard's parents (from the stream, else from the lease).
    pub parents: Vec<String>,
    /// The shard's children (shards naming it as parent, and the lease's `childShardIds`).
    pub children: Vec<String>,
    /// Kinesis's `MillisBehindLatest` for a read just after the checkpoint; `None` when unknown
    /// (no lease, shard end, trimmed, damaged, or the look-up failed).
    pub millis_behind_latest: Option<i64>,
    /// What is wrong with the lease item, naming the attribute, when it cannot be read as a
    /// lease (then `checkpoint` and `lease_counter` are `None`: nothing is guessed); hosts do not
    /// process the shard until it is fixed.
    pub damaged: Option<String>,
}

/// A pending graceful hand-off of a lease: `from` still processes the shard and checkpoints it,
/// `to` asked for it and takes it once `from` hands it over (or its timeout passes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Handoff {
    /// The current owner, still processing (the lease's `checkpointOwner`).
    pub from: String,
    /// The host taking the lease over (the lease's `leaseOwner`).
    pub to: String,
}

impl Handoff {
    /// The hand-off `lease` is marked for, if any: both `leaseOwner` and `checkpointOwner` set
    /// and different.
    fn of(lease: &Lease) -> Option<Self> {
        match (&lease.checkpoint_owner, &lease.owner) {
            (Some(from), Some(to)) if from != to => {
                Some(Handoff { from: from.clone(), to: to.clone() })
            }
            _ => None,
        }
    }
}

/// Counts over one stream's shards and leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Shards the stream lists, open and closed.
    pub shards: usize,
    /// Of those, open ones.
    pub open: usize,
    /// Of those, closed ones.
    pub closed: usize,
    /// Of those, ones with a lease.
    pub leased: usize,
    /// Of those, ones without a lease.
    pub without_lease: usize,
    /// Leases whose shard the stream no longer lists.
    pub trimmed_leases: usize,
    /// Leases in the table.
    pub leases: usize,
    /// Leases with no owner.
    pub unowned_leases: usize,
    /// Each owner (`leaseOwner`) and how many leases it holds; a lease in a pending hand-off
    /// counts as its taker's, as the lease protocol counts it.
    pub owners: BTreeMap<String, usize>,
    /// Leases with a graceful hand-off pending.
    pub handoffs_pending: usize,
    /// Lease items that cannot be read as leases (see [`ShardStatus::damaged`]).
    pub damaged: usize,
}

/// One input stream of the job and its lease table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStatus {
    /// The Kinesis stream.
    pub stream: String,
    /// The lease table.
    pub table: String,
    /// Why the stream could not be inspected; then `totals` is `None` and `shards` empty.
    pub error: Option<String>,
    /// Counts.
    pub totals: Option<Totals>,
    /// Every shard and every lease, by shard id.
    pub shards: Vec<ShardStatus>,
}

/// Inspects every input stream; a stream that fails carries its error (one line) and the others
/// are still inspected.
pub async fn status(inputs: &[InputStream]) -> Vec<StreamStatus> {
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        let table = input.kcl.table_name.clone();
        let status = match inspect(input).await {
            Ok((totals, shards)) => StreamStatus {
                stream: input.stream.clone(),
                table,
                error: None,
                totals: Some(totals),
                shards,
            },
            Err(error) => StreamStatus {
                stream: input.stream.clone(),
                table,
                error: Some(one_line(&error)),
                totals: None,
                shards: Vec::new(),
            },
        };
        out.push(status);
    }
    out
}

async fn inspect(input: &InputStream) -> Result<(Totals, Vec<ShardStatus>), String> {
    let (stream, table_name) = (&input.stream, &input.kcl.table_name);
    let settings = aws_settings(&input.aws).map_err(|e| e.to_string())?;
    let clients = AwsClients::new(&settings).await;
    match clients.dynamodb.describe_table().table_name(table_name).send().await {
        Ok(_) => {}
        Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
            return Err(format!(
                "lease table {table_name} of stream {stream} does not exist: the job has not run \
                 yet, or aws.kcl.TableName (default <job.name>-<job.id>-<stream>), the region or \
                 the DynamoDB endpoint is wrong"
            ));
        }
        Err(e) => {
            return Err(format!(
                "DynamoDB DescribeTable on table {table_name} (stream {stream}) failed: {}",
                chain(&e)
            ));
        }
    }
    let table = LeaseTable::new(clients.dynamodb.clone(), table_name.clone());
    let leases = table.list().await.map_err(|e| without_debug_dump(&e.to_string()))?;
    let shards = reader::list_shards(&clients.kinesis, stream).await.map_err(|e| {
        let message = without_debug_dump(&e.to_string());
        if message.contains("ResourceNotFoundException") {
            format!(
                "Kinesis stream {stream} (lease table {table_name}) does not exist: check \
                 task.inputs, the region and the Kinesis endpoint"
            )
        } else {
            message
        }
    })?;
    let (totals, mut statuses) = assemble(&shards, &leases);
    let at_timestamp = match input.kcl.initial_position {
        InitialPosition::AtTimestamp(t) => Some(t),
        InitialPosition::Latest | InitialPosition::TrimHorizon => None,
    };
    let lags = lags(&clients, stream, &statuses, at_timestamp).await;
    for (index, lag) in lags {
        statuses[index].millis_behind_latest = lag;
    }
    Ok((totals, statuses))
}

/// Joins the stream's shards and the table's leases, by shard id.
pub fn assemble(shards: &[ShardInfo], leases: &[Lease]) -> (Totals, Vec<ShardStatus>) {
    let leases_by_id: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    let shards_by_id: BTreeMap<&str, &ShardInfo> =
        shards.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut children: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for shard in shards {
        for parent in &shard.parents {
            children.entry(parent.as_str()).or_default().insert(shard.id.clone());
        }
    }
    for lease in leases {
        children
            .entry(lease.key.as_str())
            .or_default()
            .extend(lease.child_shard_ids.iter().cloned());
    }
    let ids: BTreeSet<&str> = shards_by_id.keys().chain(leases_by_id.keys()).copied().collect();
    let mut totals = Totals { shards: shards.len(), leases: leases.len(), ..Totals::default() };
    let mut statuses = Vec::with_capacity(ids.len());
    for id in ids {
        let shard = shards_by_id.get(id);
        let lease = leases_by_id.get(id);
        let named_as_parent = children.get(id).is_some_and(|c| !c.is_empty());
        let at_end = lease.is_some_and(|l| l.checkpoint == Checkpoint::ShardEnd);
        let state = match shard {
            None => ShardState::Trimmed,
            Some(_) if named_as_parent || at_end => ShardState::Closed,
            Some(_) => ShardState::Open,
        };
        match (shard, lease) {
            (Some(_), Some(_)) => totals.leased += 1,
            (Some(_), None) => totals.without_lease += 1,
            (None, _) => totals.trimmed_leases += 1,
        }
        match state {
            ShardState::Open => totals.open += 1,
            ShardState::Closed => totals.closed += 1,
            ShardState::Trimmed => {}
        }
        if let Some(lease) = lease {
            match &lease.owner {
                Some(owner) => *totals.owners.entry(owner.clone()).or_default() += 1,
                None => totals.unowned_leases += 1,
            }
        }
        let handoff = lease.and_then(|l| Handoff::of(l));
        if handoff.is_some() {
            totals.handoffs_pending += 1;
        }
        let damaged = lease.and_then(|l| l.damaged.clone());
        if damaged.is_some() {
            totals.damaged += 1;
        }
        // What a damaged item holds is not shown as if it were its checkpoint.
        let readable = lease.filter(|l| l.damaged.is_none());
        let parents = match (shard, lease) {
            (Some(s), _) if !s.parents.is_empty() => s.parents.clone(),
            (_, Some(l)) => l.parent_shard_ids.clone(),
            _ => Vec::new(),
        };
        statuses.push(ShardStatus {
            shard_id: id.to_owned(),
            state,
            leased: lease.is_some(),
            owner: lease.and_then(|l| l.owner.clone()),
            handoff,
            checkpoint: readable.map(|l| l.checkpoint.as_str().to_owned()),
            checkpoint_sub_sequence_number: readable.map(|l| l.checkpoint.sub_sequence_number()),
            lease_counter: readable.map(|l| l.counter),
            owner_switches_since_checkpoint: readable.map(|l| l.owner_switches_since_checkpoint),
            parents,
            children: children.remove(id).unwrap_or_default().into_iter().collect(),
            millis_behind_latest: None,
            damaged,
        });
    }
    (totals, statuses)
}

/// The lag of every leased shard of the stream that is not at its end, by index into `statuses`.
async fn lags(
    clients: &AwsClients,
    stream: &str,
    statuses: &[ShardStatus],
    at_timestamp: Option<SystemTime>,
) -> Vec<(usize, Option<i64>)> {
    let mut wanted = statuses.iter().enumerate().filter_map(|(index, s)| {
        let checkpoint =
            Checkpoint::parse(s.checkpoint.as_deref()?, s.checkpoint_sub_sequence_number?).ok()?;
        (s.state != ShardState::Trimmed && checkpoint != Checkpoint::ShardEnd)
            .then(|| (index, s.shard_id.clone(), checkpoint))
    });
    let mut found = Vec::new();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < LAG_CONCURRENCY {
            let Some((index, shard_id, checkpoint)) = wanted.next() else { break };
            let (clients, stream) = (clients.clone(), stream.to_owned());
            running.spawn(async move {
                let lookup =
                    millis_behind_latest(&clients, &stream, &shard_id, &checkpoint, at_timestamp);
                let lag = tokio::time::timeout(LAG_TIMEOUT, lookup).await.unwrap_or_else(|_| {
                    tracing::debug!(stream, shard = shard_id, "Lag look-up timed out.");
                    None
                });
                (index, lag)
            });
        }
        match running.join_next().await {
            Some(Ok(done)) => found.push(done),
            Some(Err(e)) => tracing::debug!(stream, error = %e, "A lag look-up failed."),
            None => break,
        }
    }
    found
}

/// `MillisBehindLatest` of a one-record read just after `checkpoint` (or at its sentinel).
async fn millis_behind_latest(
    clients: &AwsClients,
    stream: &str,
    shard_id: &str,
    checkpoint: &Checkpoint,
    at_timestamp: Option<SystemTime>,
) -> Option<i64> {
    let request = clients.kinesis.get_shard_iterator().stream_name(stream).shard_id(shard_id);
    let request = match checkpoint {
        Checkpoint::Sequence { sequence_number, .. } => request
            .shard_iterator_type("AFTER_SEQUENCE_NUMBER".into())
            .starting_sequence_number(sequence_number),
        Checkpoint::TrimHorizon => request.shard_iterator_type("TRIM_HORIZON".into()),
        Checkpoint::Latest => request.shard_iterator_type("LATEST".into()),
        Checkpoint::AtTimestamp => {
            request.shard_iterator_type("AT_TIMESTAMP".into()).timestamp(at_timestamp?.into())
        }
        Checkpoint::ShardEnd => return None,
    };
    let iterator = match request.send().await {
        Ok(out) => out.shard_iterator()?.to_owned(),
        Err(e) => {
            let error = chain(&e);
            tracing::debug!(
                stream,
                shard = shard_id,
                error,
                "GetShardIterator failed; lag unknown."
            );
            return None;
        }
    };
    match clients.kinesis.get_records().shard_iterator(iterator).limit(1).send().await {
        Ok(out) => out.millis_behind_latest(),
        Err(e) => {
            let error = chain(&e);
            tracing::debug!(stream, shard = shard_id, error, "GetRecords failed; lag unknown.");
            None
        }
    }
}

/// An error and its sources, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    one_line(&text)
}

/// The coordinator's AWS errors end with the SDK error's `Debug` form in parentheses (the
/// whole HTTP response); the message before it says everything a person needs.
fn without_debug_dump(message: &str) -> String {
    const DUMPS: [&str; 5] = [
        " (ServiceError(",
        " (DispatchFailure(",
        " (TimeoutError(",
        " (ResponseError(",
        " (ConstructionFailure(",
    ];
    let end = DUMPS.iter().filter_map(|d| message.find(d)).min().unwrap_or(message.len());
    message[..end].to_owned()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A sequence number as its first and last six digits; sentinels as they are.
pub fn abbreviate(checkpoint: &str) -> String {
    let digits = checkpoint.bytes().all(|b| b.is_ascii_digit());
    if digits && checkpoint.len() > 15 {
        format!("{}…{}", &checkpoint[..6], &checkpoint[checkpoint.len() - 6..])
    } else {
        checkpoint.to_owned()
    }
}

/// A lag for people: `0 ms`, `850 ms`, `4.2 s`, `3 min 20 s`, `2 h 5 min`.
pub fn human_millis(millis: i64) -> String {
    let ms = millis.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{}.{} s", ms / 1000, ms % 1000 / 100),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn list_or_dash(ids: &[String]) -> String {
    if ids.is_empty() { "-".to_owned() } else { ids.join(",") }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The text form of the streams that could be inspected (errors are reported separately).
pub fn render_text(streams: &[StreamStatus]) -> String {
    let mut out = String::new();
    for status in streams {
        let Some(t) = &status.totals else { continue };
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(out, "stream {}  (lease table {})", status.stream, status.table);
        let _ = writeln!(
            out,
            "  {}: {} open, {} closed; {} leased, {} without a lease; {}",
            plural(t.shards, "shard", "shards"),
            t.open,
            t.closed,
            t.leased,
            t.without_lease,
            plural(t.trimmed_leases, "lease of a trimmed shard", "leases of trimmed shards"),
        );
        let owners = if t.owners.is_empty() {
            "none".to_owned()
        } else {
            t.owners
                .iter()
                .map(|(owner, n)| format!("{owner} ({})", plural(*n, "lease", "leases")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let handoffs = match t.handoffs_pending {
            0 => String::new(),
            n => format!("; {} pending", plural(n, "hand-off", "hand-offs")),
        };
        let _ = writeln!(out, "  owners: {owners}; unowned leases: {}{handoffs}", t.unowned_leases);
        let mut rows = vec![[
            "SHARD".to_owned(),
            "STATE".to_owned(),
            "OWNER".to_owned(),
            "CHECKPOINT".to_owned(),
            "COUNTER".to_owned(),
            "LAG".to_owned(),
            "PARENTS".to_owned(),
            "CHILDREN".to_owned(),
        ]];
        for s in &status.shards {
            let checkpoint = match &s.checkpoint {
                None if s.damaged.is_some() => "DAMAGED".to_owned(),
                None => "no lease".to_owned(),
                Some(cp) => match s.checkpoint_sub_sequence_number {
                    Some(sub) if sub > 0 => format!("{}.{sub}", abbreviate(cp)),
                    _ => abbreviate(cp),
                },
            };
            rows.push([
                s.shard_id.clone(),
                s.state.as_str().to_owned(),
                match (&s.handoff, &s.owner) {
                    (Some(h), _) => format!("{} → {} (hand-off pending)", h.from, h.to),
                    (None, Some(owner)) => owner.clone(),
                    (None, None) => "-".to_owned(),
                },
                checkpoint,
                s.lease_counter.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                s.millis_behind_latest.map_or_else(|| "-".to_owned(), human_millis),
                list_or_dash(&s.parents),
                list_or_dash(&s.children),
            ]);
        }
        let mut widths = [0usize; 8];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = String::from(" ");
            for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
                line.push(' ');
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = width - cell.chars().count() + 1;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        for s in status.shards.iter().filter(|s| s.damaged.is_some()) {
            let problem = s.damaged.as_deref().unwrap_or_default();
            let _ = writeln!(out, "  {}: damaged lease item: {problem}", s.shard_id);
        }
    }
    out
}

/// One line per damaged lease item of every stream, for the exit status's `error:` lines.
pub fn damaged_items(streams: &[StreamStatus]) -> Vec<String> {
    streams
        .iter()
        .flat_map(|status| {
            status.shards.iter().filter_map(|s| {
                let problem = s.damaged.as_deref()?;
                Some(format!(
                    "lease table {}: item {} is damaged: {problem}; no host processes shard {} until the item is fixed",
                    status.table, s.shard_id, s.shard_id
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str]) -> ShardInfo {
        ShardInfo {
            id: id.to_owned(),
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
            hash_range: ("0".into(), "1".into()),
        }
    }

    fn lease(id: &str, owner: Option<&str>, checkpoint: Checkpoint, counter: u64) -> Lease {
        let mut lease = Lease::new(id, checkpoint, Vec::new());
        lease.owner = owner.map(str::to_owned);
        lease.counter = counter;
        lease
    }

    #[test]
    fn abbreviates_sequence_numbers_only() {
        assert_eq!(
            abbreviate("49590338271490256608559692538361571095921575989136588898"),
            "495903…588898"
        );
        assert_eq!(abbreviate("12345"), "12345");
        for sentinel in ["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "SHARD_END"] {
            assert_eq!(abbreviate(sentinel), sentinel);
        }
    }

    #[test]
    fn sdk_debug_dumps_are_cut() {
        assert_eq!(
            without_debug_dump(
                "DynamoDB Scan on table t failed: service error: ThrottlingException: slow down \
                 (ServiceError(ServiceError { source: Throttling, raw: Response { .. } }))"
            ),
            "DynamoDB Scan on table t failed: service error: ThrottlingException: slow down"
        );
        assert_eq!(without_debug_dump("no dump (here)"), "no dump (here)");
    }

    #[test]
    fn lags_read_at_a_glance() {
        assert_eq!(human_millis(0), "0 ms");
        assert_eq!(human_millis(999), "999 ms");
        assert_eq!(human_millis(4_250), "4.2 s");
        assert_eq!(human_millis(200_000), "3 min 20 s");
        assert_eq!(human_millis(7_500_000), "2 h 5 min");
    }

    #[test]
    fn joins_shards_and_leases() {
        let shards = [
            shard("shardId-000000000000", &[]),
            shard("shardId-000000000001", &["shardId-000000000000"]),
            shard("shardId-000000000002", &["shardId-000000000000"]),
            shard("shardId-000000000003", &[]),
        ];
        let mut parent = lease("shardId-000000000000", None, Checkpoint::ShardEnd, 9);
        parent.child_shard_ids = vec!["shardId-000000000001".into()];
        let leases = [
            parent,
            lease("shardId-000000000001", Some("a"), Checkpoint::after("42", 3), 5),
            lease("shardId-000000000002", Some("a"), Checkpoint::TrimHorizon, 1),
            lease("shardId-00000000000x", Some("b"), Checkpoint::after("7", 0), 2),
        ];
        let (totals, statuses) = assemble(&shards, &leases);
        assert_eq!(
            totals,
            Totals {
                shards: 4,
                open: 3,
                closed: 1,
                leased: 3,
                without_lease: 1,
                trimmed_leases: 1,
                leases: 4,
                unowned_leases: 1,
                owners: [("a".to_owned(), 2), ("b".to_owned(), 1)].into(),
                handoffs_pending: 0,
                damaged: 0,
            }
        );
        let summary: Vec<(&str, ShardState, bool)> =
            statuses.iter().map(|s| (s.shard_id.as_str(), s.state, s.leased)).collect();
        assert_eq!(
            summary,
            [
                ("shardId-000000000000", ShardState::Closed, true),
                ("shardId-000000000001", ShardState::Open, true),
                ("shardId-000000000002", ShardState::Open, true),
                ("shardId-000000000003", ShardState::Open, false),
                ("shardId-00000000000x", ShardState::Trimmed, true),
            ]
        );
        assert_eq!(statuses[0].children, ["shardId-000000000001", "shardId-000000000002"]);
        assert_eq!(statuses[1].parents, ["shardId-000000000000"]);
        assert_eq!(statuses[1].checkpoint.as_deref(), Some("42"));
        assert_eq!(statuses[1].checkpoint_sub_sequence_number, Some(3));
        assert_eq!(statuses[3].owner, None);
        assert_eq!(statuses[3].checkpoint, None);
    }

    #[test]
    fn renders_a_table_per_stream() {
        let shards = [shard("shardId-000000000000", &[])];
        let leases = [lease(
            "shardId-000000000000",
            Some("host-1"),
            Checkpoint::after("49590338271490256608559692538361571095921575989136588898", 0),
            12,
        )];
        let (totals, mut statuses) = assemble(&shards, &leases);
        statuses[0].millis_behind_latest = Some(0);
        let text = render_text(&[
            StreamStatus {
                stream: "clicks".into(),
                table: "job-1-clicks".into(),
                error: None,
                totals: Some(totals),
                shards: statuses,
            },
            StreamStatus {
                stream: "gone".into(),
                table: "job-1-gone".into(),
                error: Some("lease table job-1-gone does not exist".into()),
                totals: None,
                shards: Vec::new(),
            },
        ]);
        assert_eq!(
            text,
            "stream clicks  (lease table job-1-clicks)\n\
             \x20 1 shard: 1 open, 0 closed; 1 leased, 0 without a lease; 0 leases of trimmed shards\n\
             \x20 owners: host-1 (1 lease); unowned leases: 0\n\
             \x20 SHARD                 STATE  OWNER   CHECKPOINT     COUNTER  LAG   PARENTS  CHILDREN\n\
             \x20 shardId-000000000000  open   host-1  495903…588898  12       0 ms  -        -\n"
        );
    }

    #[test]
    fn a_pending_hand_off_reads_at_a_glance() {
        let shards = [shard("shardId-000000000000", &[]), shard("shardId-000000000001", &[])];
        // KCL 3.x's mark: the taker in `leaseOwner`, the owner still processing in
        // `checkpointOwner`.
        let mut marked =
            lease("shardId-000000000000", Some("host-b"), Checkpoint::after("7", 0), 3);
        marked.checkpoint_owner = Some("host-a".into());
        let leases =
            [marked, lease("shardId-000000000001", Some("host-a"), Checkpoint::after("9", 0), 4)];
        let (totals, statuses) = assemble(&shards, &leases);
        assert_eq!(totals.handoffs_pending, 1);
        assert_eq!(
            statuses[0].handoff,
            Some(Handoff { from: "host-a".into(), to: "host-b".into() })
        );
        assert_eq!(statuses[1].handoff, None);
        let status = StreamStatus {
            stream: "clicks".into(),
            table: "job-1-clicks".into(),
            error: None,
            totals: Some(totals),
            shards: statuses,
        };
        let json = serde_json::to_value(&status).expect("JSON");
        assert_eq!(json["shards"][0]["owner"], "host-b");
        assert_eq!(
            json["shards"][0]["handoff"],
            serde_json::json!({"from": "host-a", "to": "host-b"})
        );
        assert_eq!(json["shards"][1]["handoff"], serde_json::Value::Null);
        assert_eq!(json["totals"]["handoffs_pending"], 1);
        assert_eq!(
            render_text(&[status]),
            "stream clicks  (lease table job-1-clicks)\n\
             \x20 2 shards: 2 open, 0 closed; 2 leased, 0 without a lease; 0 leases of trimmed shards\n\
             \x20 owners: host-a (1 lease), host-b (1 lease); unowned leases: 0; 1 hand-off pending\n\
             \x20 SHARD                 STATE  OWNER                               CHECKPOINT  COUNTER  LAG  PARENTS  CHILDREN\n\
             \x20 shardId-000000000000  open   host-a → host-b (hand-off pending)  7           3        -    -        -\n\
             \x20 shardId-000000000001  open   host-a                              9           4        -    -        -\n"
        );
    }

    #[test]
    fn a_damaged_item_shows_alone_and_guesses_nothing() {
        let shards = [shard("shardId-000000000000", &[]), shard("shardId-000000000001", &[])];
        let mut bad = lease("shardId-000000000001", None, Checkpoint::TrimHorizon, 0);
        bad.damaged = Some("checkpoint is a number (42), not a string".into());
        let good = lease("shardId-000000000000", Some("a"), Checkpoint::after("42", 0), 5);
        let (totals, statuses) = assemble(&shards, &[good, bad]);
        assert_eq!(totals.damaged, 1);
        assert_eq!(statuses[0].checkpoint.as_deref(), Some("42"));
        assert_eq!((statuses[1].checkpoint.as_deref(), statuses[1].lease_counter), (None, None));
        let stream = StreamStatus {
            stream: "s".into(),
            table: "t".into(),
            error: None,
            totals: Some(totals),
            shards: statuses,
        };
        let text = render_text(std::slice::from_ref(&stream));
        assert!(text.contains("shardId-000000000001  open   -      DAMAGED"), "{text}");
        assert!(
            text.ends_with("  shardId-000000000001: damaged lease item: checkpoint is a number (42), not a string\n"),
            "{text}"
        );
        assert_eq!(
            damaged_items(&[stream]),
            [
                "lease table t: item shardId-000000000001 is damaged: checkpoint is a number (42), not a string; no host processes shard shardId-000000000001 until the item is fixed"
            ]
        );
    }
}
