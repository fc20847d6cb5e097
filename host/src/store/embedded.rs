//! The embedded receipt store: tables in the embedded backends' one redb
//! file, `DATA_DIR/crm.redb` (see `redb_file`), written by group commit
//! with immediate durability (a commit is on disk before the API answers
//! 200).
//!
//! Layout:
//! - `receipts`: receipt id (UUID v7, so ids sort by time) → receipt as JSON
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

use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::redb_file::{RedbFile, Unavailable};
use super::{AttemptRecord, Inserted, ListQuery, Receipt, ReceiptStore, StoreError, apply_attempt, now_ms};

pub(crate) const RECEIPTS: TableDefinition<&str, &[u8]> = TableDefinition::new("receipts");
pub(crate) const DEDUPE: TableDefinition<&str, &str> = TableDefinition::new("dedupe");
pub(crate) const UNQUEUED: TableDefinition<&str, ()> = TableDefinition::new("unqueued");

/// Receipts in the local redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    file: Arc<RedbFile>,
}

impl From<Unavailable> for StoreError {
    fn from(Unavailable(why): Unavailable) -> Self {
        StoreError::Unavailable(why)
    }
}

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(e.into().to_string())
}

fn decode(bytes: &[u8]) -> Result<Receipt, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A receipt's stored form.
pub(crate) fn encode(receipt: &Receipt) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(receipt).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn dedupe_key(r: &Receipt) -> String {
    let (provider, reference, status) = r.dedupe_key();
    format!("{provider}\x1f{reference}\x1f{status}")
}

/// Insert `receipt` (stored as `bytes`) in `txn` unless one with its dedupe
/// key exists. Reads before it writes, so a failure leaves nothing behind.
pub(crate) fn insert_in(txn: &WriteTransaction, receipt: Receipt, bytes: &[u8]) -> Result<Inserted, StoreError> {
    let key = dedupe_key(&receipt);
    let mut dedupe = txn.open_table(DEDUPE).map_err(unavailable)?;
    let existing = dedupe.get(key.as_str()).map_err(unavailable)?.map(|g| g.value().to_string());
    if let Some(id) = existing {
        let receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
        let found = receipts.get(id.as_str()).map_err(unavailable)?;
        let bytes = found.ok_or_else(|| StoreError::Corrupt(format!("dedupe entry points at missing receipt {id}")))?;
        return Ok(Inserted::Duplicate(decode(bytes.value())?));
    }
    txn.open_table(RECEIPTS).map_err(unavailable)?.insert(receipt.id.as_str(), bytes).map_err(unavailable)?;
    dedupe.insert(key.as_str(), receipt.id.as_str()).map_err(unavailable)?;
    if !receipt.jobs_enqueued {
        txn.open_table(UNQUEUED).map_err(unavailable)?.insert(receipt.id.as_str(), ()).map_err(unavailable)?;
    }
    Ok(Inserted::New(receipt))
}

/// Read-modify-write one receipt in `txn` (the change runs before anything
/// is written).
pub(crate) fn update_in(
    txn: &WriteTransaction,
    id: &str,
    change: impl FnOnce(&mut Receipt) -> Result<(), StoreError>,
) -> Result<Receipt, StoreError> {
    let mut table = txn.open_table(RECEIPTS).map_err(unavailable)?;
    let mut receipt = match table.get(id).map_err(unavailable)? {
        Some(bytes) => decode(bytes.value())?,
        None => return Err(StoreError::NotFound(id.to_string())),
    };
    change(&mut receipt)?;
    table.insert(id, encode(&receipt)?.as_slice()).map_err(unavailable)?;
    if receipt.jobs_enqueued {
        txn.open_table(UNQUEUED).map_err(unavailable)?.remove(id).map_err(unavailable)?;
    }
    Ok(receipt)
}

/// Record an attempt on its receipt, in `txn`.
pub(crate) fn record_in(txn: &WriteTransaction, id: &str, attempt: &AttemptRecord) -> Result<(), StoreError> {
    update_in(txn, id, |r| apply_attempt(r, attempt, now_ms())).map(drop)
}

impl EmbeddedStore {
    /// The store on the embedded file (`redb_file::open_embedded`).
    pub fn new(file: Arc<RedbFile>) -> EmbeddedStore {
        EmbeddedStore { file }
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
        let bytes = encode(&receipt)?;
        self.file.write(move |txn| insert_in(txn, receipt.clone(), &bytes)).await
    }

    async fn mark_enqueued(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.file
            .write(move |txn| {
                update_in(txn, &id, |r| {
                    r.jobs_enqueued = true;
                    Ok(())
                })
            })
            .await
            .map(drop)
    }

    async fn record_attempt(&self, id: &str, attempt: AttemptRecord) -> Result<(), StoreError> {
        let id = id.to_string();
        self.file.write(move |txn| record_in(txn, &id, &attempt)).await
    }

    async fn get(&self, id: &str) -> Result<Option<Receipt>, StoreError> {
        let id = id.to_string();
        self.reading(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let found = table.get(id.as_str()).map_err(unavailable)?;
            found.map(|b| decode(b.value())).transpose()
        })
        .await
    }

    async fn list(&self, query: ListQuery) -> Result<Vec<Receipt>, StoreError> {
        self.reading(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(unavailable)?.rev() {
                if out.len() >= query.limit {
                    break;
                }
                let (_, bytes) = entry.map_err(unavailable)?;
                let receipt = decode(bytes.value())?;
                if query.state.is_none_or(|s| receipt.actions.iter().any(|a| a.state == s)) {
                    out.push(receipt);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn unqueued(&self) -> Result<Vec<Receipt>, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let pending = txn.open_table(UNQUEUED).map_err(unavailable)?;
            let receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in pending.iter().map_err(unavailable)? {
                let (id, _) = entry.map_err(unavailable)?;
                if let Some(bytes) = receipts.get(id.value()).map_err(unavailable)? {
                    out.push(decode(bytes.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.file.ping().await.map_err(StoreError::from)
    }
}
