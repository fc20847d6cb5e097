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
//!                last_status, detail, delivered_at_ms, updated_at_ms } ],
//!   rev: <incremented on every change to `actions`> }
//! ```
//!
//! Unique index `dedupe` on (provider, reference, status_key), created at
//! start-up. Dedupe inserts and treats duplicate key (11000) as "duplicate"
//! (find-then-insert would race). Attempts are recorded with an optimistic
//! compare-and-set on `rev`, so the Meta and Brevo jobs of one receipt can
//! record concurrently without losing each other's update.
//!
//! `/ready` upserts `{ _id: "ready", at_ms }` in `<DB_COLLECTION>_health`: a
//! server that answers but refuses writes is not ready.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::{self, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, IndexModel};

use super::{AttemptRecord, Inserted, ListQuery, Receipt, ReceiptStore, StoreError, apply_attempt, now_ms};

const DUPLICATE_KEY: i32 = 11000;
/// Compare-and-set attempts before giving up on a contended receipt.
const CAS_ATTEMPTS: usize = 20;

/// Receipts in a MongoDB collection.
pub struct MongoStore {
    db: mongodb::Database,
    coll: Collection<Document>,
    trips: AtomicU64,
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => e.to_string().contains("E11000"),
    }
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
        let store = MongoStore { db, coll, trips: AtomicU64::new(0) };
        store.ping().await?;
        let index = IndexModel::builder()
            .keys(doc! { "provider": 1, "reference": 1, "status_key": 1 })
            .options(IndexOptions::builder().unique(true).name("dedupe".to_string()).build())
            .build();
        store.coll.create_index(index).await.map_err(unavailable)?;
        Ok(store)
    }

    fn trip(&self) {
        self.trips.fetch_add(1, Ordering::Relaxed);
    }

    async fn find(&self, filter: Document) -> Result<Option<Document>, StoreError> {
        self.trip();
        self.coll.find_one(filter).await.map_err(unavailable)
    }

    async fn many(&self, filter: Document, limit: Option<i64>) -> Result<Vec<Receipt>, StoreError> {
        let mut find = self.coll.find(filter).sort(doc! { "_id": -1 });
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        self.trip();
        let mut cursor = find.await.map_err(unavailable)?;
        let mut out = Vec::new();
        while cursor.advance().await.map_err(unavailable)? {
            out.push(decode(cursor.deserialize_current().map_err(unavailable)?)?);
        }
        Ok(out)
    }
}

#[async_trait]
impl ReceiptStore for MongoStore {
    async fn insert(&self, receipt: Receipt) -> Result<Inserted, StoreError> {
        let mut d = bson::to_document(&receipt).map_err(corrupt)?;
        let (provider, reference, status_key) = receipt.dedupe_key();
        d.insert("_id", receipt.id.clone());
        d.insert("status_key", status_key.clone());
        d.insert("rev", 0i64);
        self.trip();
        match self.coll.insert_one(d).await {
            Ok(_) => Ok(Inserted::New(receipt)),
            Err(e) if is_duplicate_key(&e) => {
                let filter = doc! { "provider": provider, "reference": reference, "status_key": status_key };
                let existing = self.find(filter).await?.ok_or_else(|| {
                    StoreError::Unavailable("duplicate key reported, but the existing receipt was not found".into())
                })?;
                Ok(Inserted::Duplicate(decode(existing)?))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn mark_enqueued(&self, id: &str) -> Result<(), StoreError> {
        let update = doc! { "$set": { "jobs_enqueued": true, "updated_at_ms": now_ms() as i64 } };
        self.trip();
        self.coll.update_one(doc! { "_id": id }, update).await.map_err(unavailable)?;
        Ok(())
    }

    async fn record_attempt(&self, id: &str, attempt: AttemptRecord) -> Result<(), StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(mut d) = self.find(doc! { "_id": id }).await? else {
                return Err(StoreError::NotFound(id.to_string()));
            };
            // Stored as a 64-bit integer; servers may hand small ones back as 32-bit.
            let rev = match d.get("rev") {
                Some(bson::Bson::Int64(n)) => *n,
                Some(bson::Bson::Int32(n)) => i64::from(*n),
                Some(bson::Bson::Double(n)) => *n as i64,
                _ => {
                    return Err(StoreError::Corrupt(format!("receipt {id} has no revision number")));
                }
            };
            d.remove("rev");
            let mut receipt = decode(d)?;
            apply_attempt(&mut receipt, &attempt, now_ms())?;
            let actions = bson::to_bson(&receipt.actions).map_err(corrupt)?;
            let update = doc! {
                "$set": { "actions": actions, "updated_at_ms": receipt.updated_at_ms as i64 },
                "$inc": { "rev": 1i64 },
            };
            self.trip();
            let result = self.coll.update_one(doc! { "_id": id, "rev": rev }, update).await.map_err(unavailable)?;
            if result.matched_count == 1 {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(format!("receipt {id} kept changing; attempt not recorded")))
    }

    async fn get(&self, id: &str) -> Result<Option<Receipt>, StoreError> {
        self.find(doc! { "_id": id }).await?.map(decode).transpose()
    }

    async fn list(&self, query: ListQuery) -> Result<Vec<Receipt>, StoreError> {
        let filter = match query.state {
            Some(state) => doc! { "actions.state": bson::to_bson(&state).map_err(corrupt)? },
            None => doc! {},
        };
        self.many(filter, Some(query.limit as i64)).await
    }

    async fn unqueued(&self) -> Result<Vec<Receipt>, StoreError> {
        self.many(doc! { "jobs_enqueued": false }, None).await
    }

    /// A small write, not a `ping` command: a server that answers but
    /// refuses writes (disk full, a secondary) is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        let health = self.db.collection::<Document>(&format!("{}_health", self.coll.name()));
        health
            .update_one(doc! { "_id": "ready" }, doc! { "$set": { "at_ms": now_ms() as i64 } })
            .upsert(true)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn round_trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }
}
