//! The embedded job queue: one redb file, `DATA_DIR/queue.redb`, plus an
//! in-memory schedule rebuilt from it at start-up.
//!
//! Layout:
//! - `jobs`: job id → `{"job": …, "due_ms": …}` for every live job, whether
//!   waiting, delayed or reserved (reservations live only in memory)
//! - `dead`: job id → `{"job": …, "reason": …, "failed_at_ms": …}`
//!
//! A reserved job stays in `jobs` until acknowledged, retried or
//! dead-lettered, so a crash mid-delivery leaves it to run again after the
//! restart. One process owns the file (redb locks it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{DeadLetter, Job, JobQueue, QueueDepth, QueueError};
use crate::store::now_ms;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const DEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("dead");

#[derive(Serialize, Deserialize)]
struct StoredJob {
    job: Job,
    due_ms: u64,
}

/// The in-memory schedule.
#[derive(Default)]
struct Schedule {
    /// (due, id) of jobs not reserved.
    waiting: BTreeSet<(u64, String)>,
    jobs: HashMap<String, Job>,
    reserved: HashSet<String>,
    dead: u64,
}

/// Jobs in a local redb file.
#[derive(Clone)]
pub struct EmbeddedQueue {
    db: Arc<Database>,
    schedule: Arc<Mutex<Schedule>>,
    notify: Arc<Notify>,
}

fn unavailable(e: impl Into<redb::Error>) -> QueueError {
    QueueError::Unavailable(e.into().to_string())
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(v).map_err(|e| QueueError::Corrupt(e.to_string()))
}

fn from_json<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, QueueError> {
    serde_json::from_slice(b).map_err(|e| QueueError::Corrupt(e.to_string()))
}

impl EmbeddedQueue {
    /// Open (or create) `dir/queue.redb` and load every live job: those a
    /// previous process had reserved become due again now.
    pub fn open(dir: &Path) -> Result<EmbeddedQueue, QueueError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| QueueError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("queue.redb");
        let db = Database::create(&path)
            .map_err(|e| QueueError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(JOBS).map_err(unavailable)?;
        txn.open_table(DEAD).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;

        let mut schedule = Schedule::default();
        {
            let txn = db.begin_read().map_err(unavailable)?;
            let jobs = txn.open_table(JOBS).map_err(unavailable)?;
            for entry in jobs.iter().map_err(unavailable)? {
                let (id, bytes) = entry.map_err(unavailable)?;
                let stored: StoredJob = from_json(bytes.value())?;
                schedule.waiting.insert((stored.due_ms, id.value().to_string()));
                schedule.jobs.insert(id.value().to_string(), stored.job);
            }
            schedule.dead = txn.open_table(DEAD).map_err(unavailable)?.len().map_err(unavailable)?;
        }
        Ok(EmbeddedQueue {
            db: Arc::new(db),
            schedule: Arc::new(Mutex::new(schedule)),
            notify: Arc::new(Notify::new()),
        })
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| QueueError::Unavailable(format!("queue task failed: {e}")))?
    }

    /// Take the first due job, or say when the next one is due.
    fn take_due(&self, now: u64) -> Result<Job, Option<u64>> {
        let mut s = self.schedule();
        let Some((due, id)) = s.waiting.first().cloned() else { return Err(None) };
        if due > now {
            return Err(Some(due));
        }
        s.waiting.pop_first();
        s.reserved.insert(id.clone());
        s.jobs.get(&id).cloned().ok_or(None)
    }
}

#[async_trait]
impl JobQueue for EmbeddedQueue {
    async fn enqueue(&self, jobs: Vec<Job>) -> Result<(), QueueError> {
        let now = now_ms();
        let added = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                let mut added = Vec::new();
                {
                    let mut table = txn.open_table(JOBS).map_err(unavailable)?;
                    let dead = txn.open_table(DEAD).map_err(unavailable)?;
                    for job in jobs {
                        let exists = table.get(job.id.as_str()).map_err(unavailable)?.is_some()
                            || dead.get(job.id.as_str()).map_err(unavailable)?.is_some();
                        if exists {
                            continue;
                        }
                        let stored = StoredJob { job, due_ms: now };
                        table.insert(stored.job.id.as_str(), to_json(&stored)?.as_slice()).map_err(unavailable)?;
                        added.push(stored.job);
                    }
                }
                txn.commit().map_err(unavailable)?;
                Ok(added)
            })
            .await?;
        {
            let mut s = self.schedule();
            for job in added {
                s.waiting.insert((now, job.id.clone()));
                s.jobs.insert(job.id.clone(), job);
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn reserve(&self, wait: Duration) -> Result<Option<Job>, QueueError> {
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an enqueue between the
            // look and the wait is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            let next_due = match self.take_due(now) {
                Ok(job) => return Ok(Some(job)),
                Err(next) => next,
            };
            let mut until = give_up;
            if let Some(due) = next_due {
                until = until.min(tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now)));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            if tokio::time::Instant::now() >= give_up {
                return Ok(self.take_due(now_ms()).ok());
            }
        }
    }

    async fn ack(&self, job: &Job) -> Result<(), QueueError> {
        let id = job.id.clone();
        let key = id.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(JOBS).map_err(unavailable)?.remove(key.as_str()).map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await?;
        let mut s = self.schedule();
        s.reserved.remove(&id);
        s.jobs.remove(&id);
        Ok(())
    }

    async fn retry(&self, job: Job, delay: Duration) -> Result<(), QueueError> {
        let due = now_ms() + delay.as_millis() as u64;
        let stored = StoredJob { job, due_ms: due };
        let bytes = to_json(&stored)?;
        let key = stored.job.id.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(JOBS).map_err(unavailable)?.insert(key.as_str(), bytes.as_slice()).map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await?;
        {
            let mut s = self.schedule();
            let id = stored.job.id.clone();
            s.reserved.remove(&id);
            s.waiting.insert((due, id.clone()));
            s.jobs.insert(id, stored.job);
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, job: Job, reason: String) -> Result<(), QueueError> {
        let letter = DeadLetter { job, reason, failed_at_ms: now_ms() };
        let bytes = to_json(&letter)?;
        let id = letter.job.id.clone();
        let key = id.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(JOBS).map_err(unavailable)?.remove(key.as_str()).map_err(unavailable)?;
            txn.open_table(DEAD).map_err(unavailable)?.insert(key.as_str(), bytes.as_slice()).map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await?;
        let mut s = self.schedule();
        s.reserved.remove(&id);
        s.jobs.remove(&id);
        s.dead += 1;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut letters = self
            .blocking(|db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let dead = txn.open_table(DEAD).map_err(unavailable)?;
                let mut out: Vec<DeadLetter> = Vec::new();
                for entry in dead.iter().map_err(unavailable)? {
                    let (_, bytes) = entry.map_err(unavailable)?;
                    out.push(from_json(bytes.value())?);
                }
                Ok(out)
            })
            .await?;
        letters.sort_by_key(|l| l.failed_at_ms);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn replay(&self, job_id: &str) -> Result<Option<Job>, QueueError> {
        let now = now_ms();
        let key = job_id.to_string();
        let job = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                let letter: Option<DeadLetter> = {
                    let mut dead = txn.open_table(DEAD).map_err(unavailable)?;
                    let removed = dead.remove(key.as_str()).map_err(unavailable)?;
                    removed.map(|b| from_json(b.value())).transpose()?
                };
                let Some(letter) = letter else { return Ok(None) };
                let mut job = letter.job;
                job.budget_start = job.attempts;
                let stored = StoredJob { job, due_ms: now };
                txn.open_table(JOBS)
                    .map_err(unavailable)?
                    .insert(key.as_str(), to_json(&stored)?.as_slice())
                    .map_err(unavailable)?;
                txn.commit().map_err(unavailable)?;
                Ok(Some(stored.job))
            })
            .await?;
        if let Some(job) = &job {
            let mut s = self.schedule();
            s.dead = s.dead.saturating_sub(1);
            s.waiting.insert((now, job.id.clone()));
            s.jobs.insert(job.id.clone(), job.clone());
        }
        self.notify.notify_waiters();
        Ok(job)
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = now_ms();
        let s = self.schedule();
        let ready = s.waiting.iter().take_while(|(due, _)| *due <= now).count() as u64;
        Ok(QueueDepth {
            ready,
            delayed: s.waiting.len() as u64 - ready,
            in_flight: s.reserved.len() as u64,
            dead: s.dead,
        })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.blocking(|db| db.begin_read().map(drop).map_err(unavailable)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Customer, Deal, Event};

    fn job(id: &str) -> Job {
        Job {
            id: id.into(),
            receipt_id: "r".into(),
            provider: "crm".into(),
            destination: "meta-capi".into(),
            action: "Lead".into(),
            params: vec![],
            event: Event {
                event_type: "deal_updated".into(),
                reference: "D-1".into(),
                status: "Qualified".into(),
                customer: Customer::default(),
                deal: Deal::default(),
                property: None,
                received_at: 0,
            },
            idempotency_key: "k".into(),
            attempts: 0,
            budget_start: 0,
            enqueued_at_ms: 0,
            lease: None,
        }
    }

    #[tokio::test]
    async fn reserved_but_unacked_jobs_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = EmbeddedQueue::open(dir.path()).unwrap();
            q.enqueue(vec![job("a"), job("b")]).await.unwrap();
            let first = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
            q.ack(&first).await.unwrap();
            let second = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
            assert_ne!(first.id, second.id);
            // Dropped while `second` is reserved, as a crash would.
        }
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let again = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
        assert_eq!(q.reserve(Duration::from_millis(10)).await.unwrap(), None);
        assert_eq!(q.depth().await.unwrap().in_flight, 1);
        q.ack(&again).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), QueueDepth::default());
    }

    #[tokio::test]
    async fn enqueue_is_idempotent_per_job_id() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        q.enqueue(vec![job("a")]).await.unwrap();
        q.enqueue(vec![job("a")]).await.unwrap();
        assert_eq!(q.depth().await.unwrap().ready, 1);
    }

    #[tokio::test]
    async fn delayed_retry_is_not_due_early_and_wakes_a_waiting_worker() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        q.enqueue(vec![job("a")]).await.unwrap();
        let mut j = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        j.attempts = 1;
        q.retry(j, Duration::from_millis(300)).await.unwrap();
        assert_eq!(q.reserve(Duration::from_millis(50)).await.unwrap(), None);
        assert_eq!(q.depth().await.unwrap().delayed, 1);
        let j = q.reserve(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(j.attempts, 1);
    }

    #[tokio::test]
    async fn dead_letters_are_listed_and_replayed_with_a_fresh_budget() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        q.enqueue(vec![job("a")]).await.unwrap();
        let mut j = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        j.attempts = 5;
        q.dead_letter(j, "Meta answered 400 (code 100)".into()).await.unwrap();
        // A re-sent webhook does not resurrect a dead job by itself.
        q.enqueue(vec![job("a")]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), QueueDepth { dead: 1, ..QueueDepth::default() });
        let letters = q.dead_letters(10).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "Meta answered 400 (code 100)");
        let replayed = q.replay("a").await.unwrap().unwrap();
        assert_eq!((replayed.attempts, replayed.budget_start), (5, 5));
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap().map(|j| j.id), Some("a".into()));
        assert!(q.replay("a").await.unwrap().is_none());
    }
}
