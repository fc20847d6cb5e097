//! The embedded receipt store: tables in the embedded backends' one redb
//! file, `DATA_DIR/crm.redb` (see `redb_file`), written by group commit
//! with immediate durability (a commit is on disk before the API answers
//! 200).
//!
//! Layout:
//! - `receipts`: receipt id (UUID v7, so ids sort by time) → the receipt as
//!   received, JSON, never rewritten: request, event, ids (a receipt of an
//!   earlier version, stored whole, is read as its body and head in one)
//! - `receipt_heads`: receipt id → what changes after that (`Head`: the
//!   actions' delivery records, whether the jobs are queued), JSON of a few
//!   hundred bytes, so an attempt's outcome rewrites only this. Versions
//!   before this split cannot read such receipts: going back to one means
//!   restoring a copy of `DATA_DIR` taken before the upgrade.
//! - `dedupe`:   "provider \x1f reference \x1f normalized status" → receipt id
//! - `unqueued`: receipt id → () while its jobs are not confirmed queued
//!   (only when the queue is elsewhere: with the embedded queue, a receipt
//!   and its jobs are one transaction)
//!
//! `insert` checks `dedupe` and writes in one transaction; transactions are
//! serialized, and a batch's operations see each other's writes, so two
//! concurrent copies of a webhook cannot both insert. Storage faults are
//! handled by `RedbFile`: `/ready` reports them and writes resume when they
//! clear.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::redb_file::{RedbFile, Unavailable};
use super::{
    ActionRecord, AttemptRecord, Inserted, ListQuery, MAX_LISTING_SCAN, Page, Receipt, ReceiptStore, StoreError,
    StoredRequest, apply_to_actions, id_floor, now_ms,
};
use crate::event::Event;

pub(crate) const RECEIPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("receipts");
pub(crate) const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("receipt_heads");
pub(crate) const DEDUPE: TableDefinition<&str, &str> = TableDefinition::new("dedupe");
pub(crate) const UNQUEUED: TableDefinition<&str, ()> = TableDefinition::new("unqueued");

/// Receipts in the local redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    file: Arc<RedbFile>,
    /// Where retention's scans go on from (in memory: after a restart they
    /// start over, once).
    cursors: Arc<Mutex<Cursors>>,
}

/// The receipt ids retention's last scans stopped at.
#[derive(Default)]
struct Cursors {
    /// Removal: every receipt before it was checked (None: from the start).
    removal: Option<String>,
    /// Purge: every receipt up to it is purged or gone.
    purge: Option<String>,
}

/// Receipts a retention scan reads at most per run.
const RETENTION_SCAN: usize = 5_000;

/// Whether receipt `id` still has a job in the embedded queue's tables, live
/// or dead (a replay queues it again before the receipt says so).
fn has_jobs(txn: &WriteTransaction, id: &str) -> Result<bool, StoreError> {
    use crate::queue::embedded::{DEAD, JOBS};
    let (from, to) = (format!("{id}/"), format!("{id}0"));
    for table in [JOBS, DEAD] {
        let table = txn.open_table(table).map_err(unavailable)?;
        if table.range::<&str>(from.as_str()..to.as_str()).map_err(unavailable)?.next().is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What a retention scan found.
struct Scanned {
    picked: Vec<String>,
    /// The last receipt id read.
    last: Option<String>,
    /// It read up to the floor.
    done: bool,
}

/// The ids of up to `limit` receipts after `from` (all, if None) and before
/// `floor` that `pick` takes.
fn scan(
    db: &Database,
    from: Option<&str>,
    floor: &str,
    limit: usize,
    pick: impl Fn(&Receipt) -> bool,
) -> Result<Scanned, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
    let heads = txn.open_table(HEADS).map_err(unavailable)?;
    let rows = match from {
        Some(from) => receipts.range::<&str>((std::ops::Bound::Excluded(from), std::ops::Bound::Excluded(floor))),
        None => receipts.range::<&str>(..floor),
    }
    .map_err(unavailable)?;
    let mut found = Scanned { picked: Vec::new(), last: None, done: true };
    for (scanned, entry) in rows.enumerate() {
        let (id, body) = entry.map_err(unavailable)?;
        let id = id.value();
        if pick(&assemble(body.value(), &heads, id)?) {
            found.picked.push(id.to_string());
        }
        found.last = Some(id.to_string());
        if found.picked.len() >= limit || scanned + 1 >= RETENTION_SCAN {
            found.done = false;
            break;
        }
    }
    Ok(found)
}

impl From<Unavailable> for StoreError {
    fn from(Unavailable(why): Unavailable) -> Self {
        StoreError::Unavailable(why)
    }
}

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(e.into().to_string())
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The part of a receipt that never changes, as stored.
#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    provider: &'a str,
    event_type: &'a str,
    reference: &'a str,
    status: &'a str,
    request: &'a StoredRequest,
    event: &'a Event,
    received_at_ms: u64,
}

/// The part of a receipt that changes after it is stored.
#[derive(Serialize, Deserialize)]
struct Head {
    updated_at_ms: u64,
    jobs_enqueued: bool,
    actions: Vec<ActionRecord>,
}

impl Head {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(self).map_err(corrupt)
    }
}

/// A receipt's stored form: its body and its head.
pub(crate) struct Encoded {
    body: Vec<u8>,
    head: Vec<u8>,
}

/// Encode a receipt for storing (before it reaches the committer).
pub(crate) fn encode(r: &Receipt) -> Result<Encoded, StoreError> {
    let body = Body {
        id: &r.id,
        provider: &r.provider,
        event_type: &r.event_type,
        reference: &r.reference,
        status: &r.status,
        request: &r.request,
        event: &r.event,
        received_at_ms: r.received_at_ms,
    };
    let head = Head { updated_at_ms: r.updated_at_ms, jobs_enqueued: r.jobs_enqueued, actions: r.actions.clone() };
    Ok(Encoded { body: serde_json::to_vec(&body).map_err(corrupt)?, head: head.encode()? })
}

/// Receipt `id` from its body and head.
fn read(
    receipts: &impl ReadableTable<&'static str, &'static [u8]>,
    heads: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<Receipt>, StoreError> {
    let Some(body) = receipts.get(id).map_err(unavailable)? else { return Ok(None) };
    assemble(body.value(), heads, id).map(Some)
}

/// Receipt `id` from its stored body and its head (a receipt stored whole,
/// by an earlier version, has no head).
fn assemble(
    body: &[u8],
    heads: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Receipt, StoreError> {
    let mut receipt: Receipt = serde_json::from_slice(body).map_err(corrupt)?;
    if let Some(head) = heads.get(id).map_err(unavailable)? {
        let head: Head = serde_json::from_slice(head.value()).map_err(corrupt)?;
        (receipt.updated_at_ms, receipt.jobs_enqueued, receipt.actions) =
            (head.updated_at_ms, head.jobs_enqueued, head.actions);
    }
    Ok(receipt)
}

fn dedupe_key(r: &Receipt) -> String {
    let (provider, reference, status) = r.dedupe_key();
    format!("{provider}\x1f{reference}\x1f{status}")
}

/// Insert `receipt` (stored as `encoded`) in `txn` unless one with its
/// dedupe key exists. Reads before it writes, so a failure leaves nothing
/// behind.
pub(crate) fn insert_in(txn: &WriteTransaction, receipt: Receipt, encoded: &Encoded) -> Result<Inserted, StoreError> {
    let key = dedupe_key(&receipt);
    let mut dedupe = txn.open_table(DEDUPE).map_err(unavailable)?;
    let existing = dedupe.get(key.as_str()).map_err(unavailable)?.map(|g| g.value().to_string());
    let mut receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
    let mut heads = txn.open_table(HEADS).map_err(unavailable)?;
    if let Some(id) = existing {
        let found = read(&receipts, &heads, &id)?;
        let found = found.ok_or_else(|| StoreError::Corrupt(format!("dedupe entry points at missing receipt {id}")))?;
        return Ok(Inserted::Duplicate(found));
    }
    receipts.insert(receipt.id.as_str(), encoded.body.as_slice()).map_err(unavailable)?;
    heads.insert(receipt.id.as_str(), encoded.head.as_slice()).map_err(unavailable)?;
    dedupe.insert(key.as_str(), receipt.id.as_str()).map_err(unavailable)?;
    if !receipt.jobs_enqueued {
        txn.open_table(UNQUEUED).map_err(unavailable)?.insert(receipt.id.as_str(), ()).map_err(unavailable)?;
    }
    Ok(Inserted::New(receipt))
}

/// Read-modify-write one receipt's head in `txn` (the change runs before
/// anything is written).
fn update_in(
    txn: &WriteTransaction,
    id: &str,
    change: impl FnOnce(&mut Head) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut heads = txn.open_table(HEADS).map_err(unavailable)?;
    let stored = heads.get(id).map_err(unavailable)?.map(|h| serde_json::from_slice(h.value()).map_err(corrupt));
    let mut head = match stored.transpose()? {
        Some(head) => head,
        // Stored whole by an earlier version.
        None => match read(&txn.open_table(RECEIPTS).map_err(unavailable)?, &heads, id)? {
            Some(r) => Head { updated_at_ms: r.updated_at_ms, jobs_enqueued: r.jobs_enqueued, actions: r.actions },
            None => return Err(StoreError::NotFound(id.to_string())),
        },
    };
    change(&mut head)?;
    heads.insert(id, head.encode()?.as_slice()).map_err(unavailable)?;
    if head.jobs_enqueued {
        txn.open_table(UNQUEUED).map_err(unavailable)?.remove(id).map_err(unavailable)?;
    }
    Ok(())
}

/// Note receipt `id`'s jobs queued, in `txn`.
pub(crate) fn mark_enqueued_in(txn: &WriteTransaction, id: &str) -> Result<(), StoreError> {
    update_in(txn, id, |head| {
        head.jobs_enqueued = true;
        Ok(())
    })
}

/// Record an attempt on its receipt, in `txn`.
pub(crate) fn record_in(txn: &WriteTransaction, id: &str, attempt: &AttemptRecord) -> Result<(), StoreError> {
    let now = now_ms();
    update_in(txn, id, |head| {
        if apply_to_actions(id, &mut head.actions, attempt, now)? {
            head.updated_at_ms = now;
        }
        Ok(())
    })
}

impl EmbeddedStore {
    /// The store on the embedded file (`redb_file::open_embedded`).
    pub fn new(file: Arc<RedbFile>) -> EmbeddedStore {
        EmbeddedStore { file, cursors: Arc::default() }
    }

    /// Run redb reads off the async executor.
    async fn reading<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.read(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

#[async_trait]
impl ReceiptStore for EmbeddedStore {
    async fn insert(&self, receipt: Receipt) -> Result<Inserted, StoreError> {
        let encoded = encode(&receipt)?;
        self.file.write(move |txn| insert_in(txn, receipt.clone(), &encoded)).await
    }

    async fn mark_enqueued(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.file.write(move |txn| mark_enqueued_in(txn, &id)).await
    }

    async fn record_attempt(&self, id: &str, attempt: AttemptRecord) -> Result<(), StoreError> {
        let id = id.to_string();
        self.file.write(move |txn| record_in(txn, &id, &attempt)).await
    }

    async fn get(&self, id: &str) -> Result<Option<Receipt>, StoreError> {
        let id = id.to_string();
        self.reading(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            read(&txn.open_table(RECEIPTS).map_err(unavailable)?, &txn.open_table(HEADS).map_err(unavailable)?, &id)
        })
        .await
    }

    /// Newest first from the cursor, filtered as it reads; at most
    /// MAX_LISTING_SCAN receipts read per page.
    async fn list(&self, query: ListQuery) -> Result<Page, StoreError> {
        self.reading(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let heads = txn.open_table(HEADS).map_err(unavailable)?;
            let rows = match query.before.as_deref() {
                Some(before) => receipts.range::<&str>(..before),
                None => receipts.range::<&str>(..),
            }
            .map_err(unavailable)?;
            let mut page = Page::default();
            let mut last_read = None;
            for (scanned, entry) in rows.rev().enumerate() {
                if page.receipts.len() >= query.limit || scanned >= MAX_LISTING_SCAN {
                    // More may match: the next page reads on from here.
                    page.next = last_read;
                    break;
                }
                let (id, body) = entry.map_err(unavailable)?;
                let receipt = assemble(body.value(), &heads, id.value())?;
                // Ids follow the time of receipt: well before `since`, the
                // rest are older still (a minute's slack for clock steps).
                if query.since_ms.is_some_and(|t| receipt.received_at_ms.saturating_add(60_000) < t) {
                    break;
                }
                last_read = Some(receipt.id.clone());
                if query.matches(&receipt) {
                    page.receipts.push(receipt);
                }
            }
            Ok(page)
        })
        .await
    }

    async fn unqueued(&self) -> Result<Vec<Receipt>, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let pending = txn.open_table(UNQUEUED).map_err(unavailable)?;
            let receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let heads = txn.open_table(HEADS).map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in pending.iter().map_err(unavailable)? {
                let (id, _) = entry.map_err(unavailable)?;
                out.extend(read(&receipts, &heads, id.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// Found on a snapshot, off the committer, a few thousand receipts per
    /// run; each is checked again in the write (a replay may have revived
    /// it). Its dedupe entry, head and unqueued mark go with it.
    async fn remove_expired(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let from = self.cursors.lock().unwrap_or_else(|e| e.into_inner()).removal.clone();
        let floor = id_floor(before_ms);
        let found = self.reading(move |db| scan(db, from.as_deref(), &floor, limit, |r| r.expired(before_ms))).await?;
        let doomed = found.picked;
        let removed = if doomed.is_empty() {
            0
        } else {
            self.file
                .write_then(
                    move |txn| {
                        let mut receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
                        let mut heads = txn.open_table(HEADS).map_err(unavailable)?;
                        let mut dedupe = txn.open_table(DEDUPE).map_err(unavailable)?;
                        let mut unqueued = txn.open_table(UNQUEUED).map_err(unavailable)?;
                        let mut removed = 0;
                        for id in &doomed {
                            let Some(receipt) = read(&receipts, &heads, id)? else { continue };
                            if !receipt.expired(before_ms) || has_jobs(txn, id)? {
                                continue;
                            }
                            let key = dedupe_key(&receipt);
                            let points_here =
                                dedupe.get(key.as_str()).map_err(unavailable)?.is_some_and(|v| v.value() == id);
                            if points_here {
                                dedupe.remove(key.as_str()).map_err(unavailable)?;
                            }
                            receipts.remove(id.as_str()).map_err(unavailable)?;
                            heads.remove(id.as_str()).map_err(unavailable)?;
                            unqueued.remove(id.as_str()).map_err(unavailable)?;
                            removed += 1;
                        }
                        Ok::<_, StoreError>(removed)
                    },
                    |_| {},
                )
                .await?
        };
        // Start over once the floor is reached: receipts kept for their
        // pending actions are looked at again.
        self.cursors.lock().unwrap_or_else(|e| e.into_inner()).removal = if found.done { None } else { found.last };
        Ok(removed)
    }

    async fn purge_requests(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let from = self.cursors.lock().unwrap_or_else(|e| e.into_inner()).purge.clone();
        let floor = id_floor(before_ms);
        let found = self
            .reading(move |db| scan(db, from.as_deref(), &floor, limit, |r| r.request.purged_at_ms.is_none()))
            .await?;
        let (ids, last) = (found.picked, found.last);
        let purged = if ids.is_empty() {
            0
        } else {
            let now = now_ms();
            self.file
                .write_then(
                    move |txn| {
                        let mut receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
                        let mut heads = txn.open_table(HEADS).map_err(unavailable)?;
                        let mut purged = 0;
                        for id in &ids {
                            let Some(mut receipt) = read(&receipts, &heads, id)? else { continue };
                            if receipt.purge(now) {
                                let encoded = encode(&receipt)?;
                                receipts.insert(id.as_str(), encoded.body.as_slice()).map_err(unavailable)?;
                                heads.insert(id.as_str(), encoded.head.as_slice()).map_err(unavailable)?;
                                purged += 1;
                            }
                        }
                        Ok::<_, StoreError>(purged)
                    },
                    |_| {},
                )
                .await?
        };
        if last.is_some() {
            self.cursors.lock().unwrap_or_else(|e| e.into_inner()).purge = last;
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.file.ping().await.map_err(StoreError::from)
    }
}
