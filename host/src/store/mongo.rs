//! MongoDB receipts (official `mongodb` driver).
//!
//! Collection `DB_COLLECTION` (default `webhook_receipts`) in the URI's
//! database (default `crm_event_handler`). One document per receipt:
//!
//! ```text
//! { _id: <receipt id, UUID v7>,
//!   id, provider, event_type, reference, status,
//!   status_key: <status trimmed and lower-cased>,      // part of the dedupe key
//!   request: { headers: [[name, value], …] (x-api-key redacted), body },
//!   event: { …the normalized event… },
//!   received_at_ms, updated_at_ms, jobs_enqueued: bool,
//!   actions: [ { destination, action, params, state, attempts, last_error,
//!                last_status, detail, delivered_at_ms, updated_at_ms,
//!                log: [ { attempt, started_at_ms, outcome, requests, … } ] } ],
//!   rev: <incremented on every change to `actions`> }
//! ```
//!
//! Unique index `dedupe` on (provider, reference, status_key), created at
//! start-up. Dedupe inserts and treats duplicate key (11000) as "duplicate"
//! (find-then-insert would race). Attempts are recorded with an optimistic
//! compare-and-set on `rev`, so the Meta and Brevo jobs of one receipt (or
//! two hosts) can record concurrently without losing each other's update.
//!
//! Round trips are shared between concurrent requests: inserts go in one
//! unordered `insert_many` (a duplicate fails alone; duplicates are then
//! looked up together), "jobs queued" marks in one `update_many`, and
//! attempts are recorded with one read of all their receipts and one write
//! per receipt. So a webhook costs a fraction of a round trip to accept,
//! and a delivery outcome about one. (A single positional update per
//! outcome, `actions.$[a]` with array filters, would spare the read, but
//! the nx-27017 stand-in the tests run against does not implement it.)
//!
//! `/ready` upserts `{ _id: "ready", at_ms }` in `<DB_COLLECTION>_health`: a
//! server that answers but refuses writes is not ready.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::{self, Document, doc};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use crate::batch::Batcher;

use super::{
    AttemptRecord, Inserted, ListQuery, Page, Receipt, ReceiptStore, StoreError, apply_attempt, id_floor, now_ms,
};

const DUPLICATE_KEY: i32 = 11000;
/// Compare-and-set attempts before giving up on a contended receipt.
const CAS_ATTEMPTS: usize = 20;

/// Receipts in a MongoDB collection.
pub struct MongoStore {
    inner: Arc<Inner>,
    inserts: Batcher<(Document, Receipt), Result<Inserted, StoreError>>,
    marks: Batcher<String, Result<(), StoreError>>,
    /// A receipt changed by another host between the read and the write of
    /// a record batch is recorded again inside that batch, which then takes
    /// longer.
    records: Batcher<(String, AttemptRecord), Result<(), StoreError>>,
}

struct Inner {
    db: mongodb::Database,
    coll: Collection<Document>,
    trips: AtomicU64,
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn batch_failed() -> StoreError {
    StoreError::Unavailable("the MongoDB request failed unexpectedly".into())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn decode(mut d: Document) -> Result<Receipt, StoreError> {
    d.remove("_id");
    d.remove("status_key");
    d.remove("rev");
    // MongoDB returns the boolean as stored; the nx-27017 stand-in (SQLite
    // underneath) hands booleans back as 0/1. Accept both.
    if let Some(n) = d.get("jobs_enqueued").and_then(|b| b.as_i32().map(i64::from).or_else(|| b.as_i64())) {
        d.insert("jobs_enqueued", n != 0);
    }
    bson::from_document(d).map_err(corrupt)
}

impl MongoStore {
    /// Connect, check the server answers, and create the dedupe index.
    pub async fn connect(uri: &str, collection: &str) -> Result<MongoStore, StoreError> {
        let mut options = ClientOptions::parse(uri).await.map_err(unavailable)?;
        // Fail fast when the server is down: the webhook answers 503 and the
        // CRM retries, rather than holding its request for 30 s.
        options.server_selection_timeout.get_or_insert(Duration::from_secs(2));
        options.connect_timeout.get_or_insert(Duration::from_secs(2));
        options.app_name.get_or_insert_with(|| "crm-event-handler".to_string());
        let db_name = options.default_database.clone().unwrap_or_else(|| "crm_event_handler".to_string());
        let client = Client::with_options(options).map_err(unavailable)?;
        let db = client.database(&db_name);
        let coll = db.collection::<Document>(collection);
        let inner = Arc::new(Inner { db, coll, trips: AtomicU64::new(0) });
        let (a, b, c) = (inner.clone(), inner.clone(), inner.clone());
        let store = MongoStore {
            inserts: Batcher::spawn(move |batch| {
                let inner = a.clone();
                async move { inner.insert_batch(batch).await }
            }),
            marks: Batcher::spawn(move |ids| {
                let inner = b.clone();
                async move { inner.mark_batch(ids).await }
            }),
            records: Batcher::spawn(move |batch| {
                let inner = c.clone();
                async move { inner.record_batch(batch).await }
            }),
            inner,
        };
        store.ping().await?;
        let index = IndexModel::builder()
            .keys(doc! { "provider": 1, "reference": 1, "status_key": 1 })
            .options(IndexOptions::builder().unique(true).name("dedupe".to_string()).build())
            .build();
        store.inner.coll.create_index(index).await.map_err(unavailable)?;
        Ok(store)
    }
}

impl Inner {
    fn trip(&self) {
        self.trips.fetch_add(1, Ordering::Relaxed);
    }

    async fn find(&self, filter: Document) -> Result<Option<Document>, StoreError> {
        self.trip();
        self.coll.find_one(filter).await.map_err(unavailable)
    }

    /// Receipts matching `filter`, newest first.
    async fn many(&self, filter: Document, limit: Option<i64>) -> Result<Vec<Receipt>, StoreError> {
        self.documents(filter, -1, limit).await?.into_iter().map(decode).collect()
    }

    /// Documents matching `filter`, by `_id` (1: oldest first, -1: newest).
    async fn documents(&self, filter: Document, order: i32, limit: Option<i64>) -> Result<Vec<Document>, StoreError> {
        let mut find = self.coll.find(filter).sort(doc! { "_id": order });
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        self.trip();
        let mut cursor = find.await.map_err(unavailable)?;
        let mut out = Vec::new();
        while cursor.advance().await.map_err(unavailable)? {
            out.push(cursor.deserialize_current().map_err(unavailable)?);
        }
        Ok(out)
    }

    /// Insert receipts in one request (unordered, so one duplicate does not
    /// stop the others); duplicates of the dedupe key are then found in one
    /// more request, only when there are any.
    async fn insert_batch(&self, batch: Vec<(Document, Receipt)>) -> Vec<Result<Inserted, StoreError>> {
        let (docs, receipts): (Vec<Document>, Vec<Receipt>) = batch.into_iter().unzip();
        self.trip();
        let failed: HashMap<usize, (i32, String)> = match self.coll.insert_many(docs).ordered(false).await {
            Ok(_) => HashMap::new(),
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(errors),
                    write_concern_error: None,
                    ..
                }) => errors.iter().map(|w| (w.index, (w.code, w.message.clone()))).collect(),
                _ => return receipts.iter().map(|_| Err(unavailable(e.clone()))).collect(),
            },
        };
        let duplicates: Vec<&Receipt> = receipts
            .iter()
            .enumerate()
            .filter(|(i, _)| failed.get(i).is_some_and(|(code, _)| *code == DUPLICATE_KEY))
            .map(|(_, r)| r)
            .collect();
        let existing = if duplicates.is_empty() { Ok(HashMap::new()) } else { self.existing(&duplicates).await };
        receipts
            .into_iter()
            .enumerate()
            .map(|(i, receipt)| match failed.get(&i) {
                None => Ok(Inserted::New(receipt)),
                Some((DUPLICATE_KEY, _)) => {
                    let found = existing.as_ref().map_err(Clone::clone)?.get(&receipt.dedupe_key()).cloned();
                    found.map(Inserted::Duplicate).ok_or_else(|| {
                        StoreError::Unavailable("duplicate key reported, but the existing receipt was not found".into())
                    })
                }
                Some((code, message)) => Err(StoreError::Unavailable(format!("insert refused ({code}): {message}"))),
            })
            .collect()
    }

    /// The stored receipts with the dedupe keys of `receipts`, in one request.
    async fn existing(&self, receipts: &[&Receipt]) -> Result<HashMap<(String, String, String), Receipt>, StoreError> {
        let keys: Vec<Document> = receipts
            .iter()
            .map(|r| {
                let (provider, reference, status_key) = r.dedupe_key();
                doc! { "provider": provider, "reference": reference, "status_key": status_key }
            })
            .collect();
        let found = self.many(doc! { "$or": keys }, None).await?;
        Ok(found.into_iter().map(|r| (r.dedupe_key(), r)).collect())
    }

    /// Mark receipts' jobs queued, in one request.
    async fn mark_batch(&self, ids: Vec<String>) -> Vec<Result<(), StoreError>> {
        let update = doc! { "$set": { "jobs_enqueued": true, "updated_at_ms": now_ms() as i64 } };
        self.trip();
        let done = self.coll.update_many(doc! { "_id": { "$in": &ids } }, update).await.map(drop).map_err(unavailable);
        ids.iter().map(|_| done.clone()).collect()
    }

    /// Record attempts: the receipts are read in one request, then each is
    /// written once with a compare-and-set on its revision (all at once).
    /// A receipt changed meanwhile (another host recorded on it) has its
    /// attempts recorded again one by one.
    async fn record_batch(self: &Arc<Self>, batch: Vec<(String, AttemptRecord)>) -> Vec<Result<(), StoreError>> {
        let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Each receipt, or why it cannot be used: a bad one fails only its
        // own attempts.
        let mut stored: HashMap<String, Result<(i64, Receipt), StoreError>> = HashMap::new();
        self.trip();
        let read = async {
            let mut cursor = self.coll.find(doc! { "_id": { "$in": &ids } }).await.map_err(unavailable)?;
            while cursor.advance().await.map_err(unavailable)? {
                let Ok(id) = cursor.current().get_str("_id").map(str::to_string) else { continue };
                let receipt = cursor.deserialize_current().map_err(corrupt).and_then(revision);
                stored.insert(id, receipt);
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = read.await {
            return batch.iter().map(|_| Err(e.clone())).collect();
        }
        // Until written, an attempt is not recorded.
        let mut results = vec![Err(StoreError::Unavailable("the attempt was not recorded".into())); batch.len()];
        // Per receipt: its attempts in order, with their places in `results`.
        let mut changed: HashMap<String, Vec<(usize, AttemptRecord)>> = HashMap::new();
        let now = now_ms();
        for (i, (id, attempt)) in batch.into_iter().enumerate() {
            match stored.get_mut(&id) {
                None => results[i] = Err(StoreError::NotFound(id)),
                Some(Err(e)) => results[i] = Err(e.clone()),
                Some(Ok((_, receipt))) => match apply_attempt(receipt, &attempt, now) {
                    Ok(()) => changed.entry(id).or_default().push((i, attempt)),
                    Err(e) => results[i] = Err(e),
                },
            }
        }
        let mut writes = tokio::task::JoinSet::new();
        for (id, attempts) in changed {
            let Some(Ok((rev, receipt))) = stored.remove(&id) else { continue };
            let inner = self.clone();
            writes.spawn(async move {
                let written = inner.write_actions(&receipt, rev).await;
                let mut outcomes = Vec::with_capacity(attempts.len());
                for (i, attempt) in attempts {
                    outcomes.push((
                        i,
                        match &written {
                            Ok(true) => Ok(()),
                            // Changed meanwhile (another host recorded on it).
                            Ok(false) => inner.record_one(&id, &attempt).await,
                            Err(e) => Err(e.clone()),
                        },
                    ));
                }
                outcomes
            });
        }
        while let Some(written) = writes.join_next().await {
            match written {
                Ok(outcomes) => outcomes.into_iter().for_each(|(i, outcome)| results[i] = outcome),
                Err(e) => tracing::error!(error = %e, "a receipt write failed unexpectedly"),
            }
        }
        results
    }

    /// Write a receipt's actions if its revision is still `rev`; false if
    /// it changed meanwhile.
    async fn write_actions(&self, receipt: &Receipt, rev: i64) -> Result<bool, StoreError> {
        let actions = bson::to_bson(&receipt.actions).map_err(corrupt)?;
        let update = doc! {
            "$set": { "actions": actions, "updated_at_ms": receipt.updated_at_ms as i64 },
            "$inc": { "rev": 1i64 },
        };
        self.trip();
        let result =
            self.coll.update_one(doc! { "_id": &receipt.id, "rev": rev }, update).await.map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    /// Record one attempt: read, apply, compare-and-set, until it sticks.
    async fn record_one(&self, id: &str, attempt: &AttemptRecord) -> Result<(), StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(d) = self.find(doc! { "_id": id }).await? else {
                return Err(StoreError::NotFound(id.to_string()));
            };
            let (rev, mut receipt) = revision(d)?;
            apply_attempt(&mut receipt, attempt, now_ms())?;
            if self.write_actions(&receipt, rev).await? {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!("receipt {id} kept changing; attempt not recorded")))
    }
}

/// A stored receipt and its revision number.
fn revision(mut d: Document) -> Result<(i64, Receipt), StoreError> {
    // Stored as a 64-bit integer; servers may hand small ones back as 32-bit.
    let rev = match d.get("rev") {
        Some(bson::Bson::Int64(n)) => *n,
        Some(bson::Bson::Int32(n)) => i64::from(*n),
        Some(bson::Bson::Double(n)) => *n as i64,
        _ => {
            let id = d.get_str("_id").unwrap_or("?");
            return Err(StoreError::Corrupt(format!("receipt {id} has no revision number")));
        }
    };
    d.remove("rev");
    Ok((rev, decode(d)?))
}

#[async_trait]
impl ReceiptStore for MongoStore {
    /// Batched with concurrent inserts: one request for many webhooks.
    async fn insert(&self, receipt: Receipt) -> Result<Inserted, StoreError> {
        let mut d = bson::to_document(&receipt).map_err(corrupt)?;
        d.insert("_id", receipt.id.clone());
        d.insert("status_key", receipt.event.status_key());
        d.insert("rev", 0i64);
        self.inserts.call((d, receipt)).await.ok_or_else(batch_failed)?
    }

    async fn mark_enqueued(&self, id: &str) -> Result<(), StoreError> {
        self.marks.call(id.to_string()).await.ok_or_else(batch_failed)?
    }

    async fn record_attempt(&self, id: &str, attempt: AttemptRecord) -> Result<(), StoreError> {
        self.records.call((id.to_string(), attempt)).await.ok_or_else(batch_failed)?
    }

    async fn get(&self, id: &str) -> Result<Option<Receipt>, StoreError> {
        self.inner.find(doc! { "_id": id }).await?.map(decode).transpose()
    }

    /// One query, newest first (by `_id`, which grows with time); one more
    /// than the page is read to know whether there is a next one.
    async fn list(&self, query: ListQuery) -> Result<Page, StoreError> {
        let mut filter = doc! {};
        if let Some(before) = &query.before {
            filter.insert("_id", doc! { "$lt": before });
        }
        for (field, value) in [("provider", &query.provider), ("reference", &query.reference)] {
            if let Some(value) = value {
                filter.insert(field, value);
            }
        }
        if let Some(status) = &query.status {
            filter.insert("status_key", crate::event::normalize_status(status));
        }
        let mut action = doc! {};
        if let Some(state) = query.state {
            action.insert("state", bson::to_bson(&state).map_err(corrupt)?);
        }
        if let Some(destination) = &query.destination {
            action.insert("destination", destination);
        }
        if !action.is_empty() {
            filter.insert("actions", doc! { "$elemMatch": action });
        }
        let mut received = doc! {};
        if let Some(t) = query.since_ms {
            received.insert("$gte", t as i64);
        }
        if let Some(t) = query.until_ms {
            received.insert("$lt", t as i64);
        }
        if !received.is_empty() {
            filter.insert("received_at_ms", received);
        }
        let mut receipts = self.inner.many(filter, Some(query.limit as i64 + 1)).await?;
        let next = (receipts.len() > query.limit).then(|| {
            receipts.truncate(query.limit);
            receipts.last().map(|r| r.id.clone())
        });
        Ok(Page { receipts, next: next.flatten() })
    }

    async fn unqueued(&self) -> Result<Vec<Receipt>, StoreError> {
        self.inner.many(doc! { "jobs_enqueued": false }, None).await
    }

    /// The oldest candidates are read and checked here too, then deleted
    /// unless they changed meanwhile (a replay moves `updated_at_ms`).
    async fn remove_expired(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let filter = doc! {
            "_id": { "$lt": id_floor(before_ms) },
            "updated_at_ms": { "$lt": before_ms as i64 },
            "actions.state": { "$nin": ["pending", "retrying"] },
        };
        let mut ids = Vec::new();
        for d in self.inner.documents(filter.clone(), 1, Some(limit as i64)).await? {
            match decode(d) {
                Ok(r) if r.expired(before_ms) => ids.push(r.id),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "retention: a stored receipt is unreadable; left as it is"),
            }
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let mut filter = filter;
        filter.insert("_id", doc! { "$in": ids });
        self.inner.trip();
        let deleted = self.inner.coll.delete_many(filter).await.map_err(unavailable)?;
        Ok(deleted.deleted_count as usize)
    }

    /// Each receipt with a compare-and-set on its revision; one that changed
    /// meanwhile is purged on the next run.
    async fn purge_requests(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let filter = doc! { "_id": { "$lt": id_floor(before_ms) }, "request.purged_at_ms": { "$exists": false } };
        let mut purged = 0;
        for d in self.inner.documents(filter, 1, Some(limit as i64)).await? {
            let (rev, mut receipt) = match revision(d) {
                Ok(found) => found,
                Err(e) => {
                    tracing::error!(error = %e, "retention: a stored receipt is unreadable; its request is not purged");
                    continue;
                }
            };
            if !receipt.purge(now_ms()) {
                continue;
            }
            let update = doc! {
                "$set": {
                    "request": bson::to_bson(&receipt.request).map_err(corrupt)?,
                    "actions": bson::to_bson(&receipt.actions).map_err(corrupt)?,
                },
                "$inc": { "rev": 1i64 },
            };
            self.inner.trip();
            let done = self.inner.coll.update_one(doc! { "_id": &receipt.id, "rev": rev }, update).await;
            purged += usize::from(done.map_err(unavailable)?.modified_count == 1);
        }
        Ok(purged)
    }

    /// A small write, not a `ping` command: a server that answers but
    /// refuses writes (disk full, a secondary) is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        let health = self.inner.db.collection::<Document>(&format!("{}_health", self.inner.coll.name()));
        health
            .update_one(doc! { "_id": "ready" }, doc! { "$set": { "at_ms": now_ms() as i64 } })
            .upsert(true)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn round_trips(&self) -> u64 {
        self.inner.trips.load(Ordering::Relaxed)
    }
}
