//! The embedded job queue: one redb file, `DATA_DIR/queue.redb`, plus an
//! in-memory schedule rebuilt from it at start-up.
//!
//! Layout:
//! - `jobs`: job id → `{"job": …, "due_ms": …, "running": bool}` for every
//!   live job, whether waiting, delayed or reserved
//! - `dead`: job id → `{"job": …, "reason": …, "failed_at_ms": …}`
//!
//! Reserving a job writes it back with `attempts` raised and `running` set
//! before the worker gets it, so an attempt during which the process dies
//! still counts: at start-up a job found `running` had an attempt
//! interrupted. A reserved job stays in `jobs` until acknowledged, retried
//! or dead-lettered, so a crash mid-delivery leaves it to run again after
//! the restart. If settling a job fails (a storage fault), the job is due
//! again shortly, as the file says it is. One process owns the file (redb
//! locks it).
//!
//! Order per deal: jobs with the same `order_key` (one deal, one
//! destination) run in the order their receipts were accepted. A due job
//! whose group has a live job from an earlier receipt is held (in memory,
//! spending nothing) until that job is acknowledged or dead-lettered.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{DeadLetter, Job, JobQueue, QueueDepth, QueueError, Reserved};
use crate::store::now_ms;
use crate::store::redb_file::{RedbFile, Unavailable};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const DEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("dead");

/// How soon a job whose settling failed is due again.
const AFTER_FAULT: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct StoredJob {
    job: Job,
    due_ms: u64,
    /// Reserved by a worker that has not settled it yet.
    #[serde(default)]
    running: bool,
}

/// The in-memory schedule.
#[derive(Default)]
struct Schedule {
    /// (due, id) of jobs not reserved.
    waiting: BTreeSet<(u64, String)>,
    /// Every live job, as the file holds it.
    jobs: HashMap<String, Job>,
    reserved: HashSet<String>,
    dead: u64,
    /// Live job ids of each order group; ids start with their receipt's
    /// id (UUID v7), so they sort in acceptance order.
    groups: HashMap<String, BTreeSet<String>>,
    /// Due jobs waiting for an earlier job of their group.
    held: HashMap<String, Vec<String>>,
}

/// The receipt part of a job id (`{receipt}/{destination}/{action}`).
fn receipt_of(job_id: &str) -> &str {
    job_id.split('/').next().unwrap_or(job_id)
}

impl Schedule {
    /// A job that is live (waiting, delayed or reserved), due at `due`.
    fn add(&mut self, job: Job, due: u64) {
        if !job.order_key.is_empty() {
            self.groups.entry(job.order_key.clone()).or_default().insert(job.id.clone());
        }
        self.waiting.insert((due, job.id.clone()));
        self.jobs.insert(job.id.clone(), job);
    }

    /// Make a reserved job due again at `due`, as `job`.
    fn put_back(&mut self, job: Job, due: u64) {
        self.reserved.remove(&job.id);
        self.waiting.insert((due, job.id.clone()));
        self.jobs.insert(job.id.clone(), job);
    }

    /// A job that is no longer live (acknowledged or dead): the jobs its
    /// group held for it are due again.
    fn forget(&mut self, id: &str, now: u64) {
        self.reserved.remove(id);
        let Some(job) = self.jobs.remove(id) else { return };
        if let Some(group) = self.groups.get_mut(&job.order_key) {
            group.remove(id);
            if group.is_empty() {
                self.groups.remove(&job.order_key);
            }
        }
        for held in self.held.remove(&job.order_key).unwrap_or_default() {
            self.waiting.insert((now, held));
        }
    }

    /// Whether an earlier receipt's job of `job`'s group is still live.
    fn held_back(&self, job: &Job) -> bool {
        let first = self.groups.get(&job.order_key).and_then(|g| g.first());
        first.is_some_and(|first| receipt_of(first) < job.receipt_id.as_str())
    }
}

/// Jobs in a local redb file.
#[derive(Clone)]
pub struct EmbeddedQueue {
    file: Arc<RedbFile>,
    schedule: Arc<Mutex<Schedule>>,
    notify: Arc<Notify>,
}

impl From<Unavailable> for QueueError {
    fn from(Unavailable(why): Unavailable) -> Self {
        QueueError::Unavailable(why)
    }
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

/// Write `stored` under its job id, in one transaction.
fn put(db: &Database, stored: &StoredJob) -> Result<(), QueueError> {
    let bytes = to_json(stored)?;
    let txn = db.begin_write().map_err(unavailable)?;
    txn.open_table(JOBS).map_err(unavailable)?.insert(stored.job.id.as_str(), bytes.as_slice()).map_err(unavailable)?;
    txn.commit().map_err(unavailable)
}

impl EmbeddedQueue {
    /// Open (or create) `dir/queue.redb` and load every live job: those a
    /// previous process had reserved are due again now, with the attempt
    /// it was making counted as interrupted.
    pub fn open(dir: &Path) -> Result<EmbeddedQueue, QueueError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| QueueError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let file = RedbFile::open(&dir.join("queue.redb"), |txn| {
            txn.open_table(JOBS).map_err(Box::new)?;
            txn.open_table(DEAD).map_err(Box::new)?;
            Ok(())
        })
        .map_err(QueueError::Unavailable)?;

        let mut schedule = Schedule::default();
        file.read(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let jobs = txn.open_table(JOBS).map_err(unavailable)?;
            for entry in jobs.iter().map_err(unavailable)? {
                let (_, bytes) = entry.map_err(unavailable)?;
                let mut stored: StoredJob = from_json(bytes.value())?;
                if stored.running {
                    stored.job.interrupted += 1;
                }
                schedule.add(stored.job, stored.due_ms);
            }
            schedule.dead = txn.open_table(DEAD).map_err(unavailable)?.len().map_err(unavailable)?;
            Ok::<_, QueueError>(())
        })?;
        Ok(EmbeddedQueue {
            file: Arc::new(file),
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
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write(f))
            .await
            .map_err(|e| QueueError::Unavailable(format!("queue task failed: {e}")))?
    }

    /// Take the first due job not held back by an earlier one of its deal,
    /// or say when the next one is due.
    fn take_due(&self, now: u64) -> Result<Job, Option<u64>> {
        let mut s = self.schedule();
        loop {
            let Some((due, id)) = s.waiting.first().cloned() else {
                return Err(None);
            };
            if due > now {
                return Err(Some(due));
            }
            s.waiting.pop_first();
            let Some(job) = s.jobs.get(&id).cloned() else { continue };
            if s.held_back(&job) {
                s.held.entry(job.order_key.clone()).or_default().push(id);
                continue;
            }
            s.reserved.insert(id);
            return Ok(job);
        }
    }

    /// Count the attempt a taken job is for, on disk, before handing it out.
    async fn start(&self, mut job: Job) -> Result<Reserved, QueueError> {
        let before = job.clone();
        job.attempts += 1;
        let stored = StoredJob { job, due_ms: now_ms(), running: true };
        match self.blocking(move |db| put(db, &stored).map(|()| stored.job)).await {
            Ok(job) => {
                self.schedule().jobs.insert(job.id.clone(), job.clone());
                Ok(Reserved { job, lease: String::new() })
            }
            Err(e) => {
                self.schedule().put_back(before, now_ms() + AFTER_FAULT.as_millis() as u64);
                Err(e)
            }
        }
    }

    /// Settling failed: the file still holds the job as reserved, so it is
    /// due again shortly, without the attempt the host could not record.
    fn settle_failed(&self, reserved: &Reserved) {
        let mut job = reserved.job.clone();
        if let Some(on_file) = self.schedule().jobs.get(&job.id) {
            job = on_file.clone();
        }
        job.attempts = job.attempts.saturating_sub(1);
        self.schedule().put_back(job, now_ms() + AFTER_FAULT.as_millis() as u64);
        self.notify.notify_waiters();
    }
}

#[async_trait]
impl JobQueue for EmbeddedQueue {
    async fn enqueue(&self, jobs: Vec<Job>) -> Result<usize, QueueError> {
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
                        let stored = StoredJob { job, due_ms: now, running: false };
                        table.insert(stored.job.id.as_str(), to_json(&stored)?.as_slice()).map_err(unavailable)?;
                        added.push(stored.job);
                    }
                }
                txn.commit().map_err(unavailable)?;
                Ok(added)
            })
            .await?;
        let count = added.len();
        {
            let mut s = self.schedule();
            for job in added {
                s.add(job, now);
            }
        }
        self.notify.notify_waiters();
        Ok(count)
    }

    async fn reserve(&self, wait: Duration) -> Result<Option<Reserved>, QueueError> {
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an enqueue between the
            // look and the wait is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            let next_due = match self.take_due(now) {
                Ok(job) => return self.start(job).await.map(Some),
                Err(next) => next,
            };
            if tokio::time::Instant::now() >= give_up {
                return Ok(None);
            }
            let mut until = give_up;
            if let Some(due) = next_due {
                until = until.min(tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now)));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, reserved: &Reserved) -> Result<(), QueueError> {
        let id = reserved.job.id.clone();
        let key = id.clone();
        let removed = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                txn.open_table(JOBS).map_err(unavailable)?.remove(key.as_str()).map_err(unavailable)?;
                txn.commit().map_err(unavailable)
            })
            .await;
        if let Err(e) = removed {
            self.settle_failed(reserved);
            return Err(e);
        }
        self.schedule().forget(&id, now_ms());
        self.notify.notify_waiters();
        Ok(())
    }

    async fn retry(&self, reserved: Reserved, delay: Duration) -> Result<(), QueueError> {
        let due = now_ms() + delay.as_millis() as u64;
        let stored = StoredJob { job: reserved.job.clone(), due_ms: due, running: false };
        match self.blocking(move |db| put(db, &stored).map(|()| stored.job)).await {
            Ok(job) => self.schedule().put_back(job, due),
            Err(e) => {
                self.settle_failed(&reserved);
                return Err(e);
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, reserved: Reserved, reason: String) -> Result<(), QueueError> {
        let letter = DeadLetter { job: reserved.job.clone(), reason, failed_at_ms: now_ms() };
        let bytes = to_json(&letter)?;
        let id = letter.job.id.clone();
        let key = id.clone();
        let moved = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                txn.open_table(JOBS).map_err(unavailable)?.remove(key.as_str()).map_err(unavailable)?;
                txn.open_table(DEAD)
                    .map_err(unavailable)?
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(unavailable)?;
                txn.commit().map_err(unavailable)
            })
            .await;
        if let Err(e) = moved {
            self.settle_failed(&reserved);
            return Err(e);
        }
        {
            let mut s = self.schedule();
            s.forget(&id, now_ms());
            s.dead += 1;
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let file = self.file.clone();
        let mut letters = tokio::task::spawn_blocking(move || {
            file.read(|db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let dead = txn.open_table(DEAD).map_err(unavailable)?;
                let mut out: Vec<DeadLetter> = Vec::new();
                for entry in dead.iter().map_err(unavailable)? {
                    let (_, bytes) = entry.map_err(unavailable)?;
                    out.push(from_json(bytes.value())?);
                }
                Ok::<_, QueueError>(out)
            })
        })
        .await
        .map_err(|e| QueueError::Unavailable(format!("queue task failed: {e}")))??;
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
                let Some(letter) = letter else {
                    return Ok(None);
                };
                let mut job = letter.job;
                job.budget_start = job.attempts;
                job.deferrals = 0;
                let stored = StoredJob { job, due_ms: now, running: false };
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
            s.add(job.clone(), now);
        }
        self.notify.notify_waiters();
        Ok(job)
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = now_ms();
        let s = self.schedule();
        let ready = s.waiting.iter().take_while(|(due, _)| *due <= now).count() as u64;
        let held: usize = s.held.values().map(Vec::len).sum();
        Ok(QueueDepth {
            ready,
            delayed: s.waiting.len() as u64 - ready + held as u64,
            in_flight: s.reserved.len() as u64,
            dead: s.dead,
        })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.ping())
            .await
            .map_err(|e| QueueError::Unavailable(format!("queue task failed: {e}")))?
            .map_err(QueueError::from)
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
                ..Event::default()
            },
            idempotency_key: "k".into(),
            order_key: String::new(),
            attempts: 0,
            budget_start: 0,
            interrupted: 0,
            deferrals: 0,
            enqueued_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn reserved_but_unacked_jobs_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = EmbeddedQueue::open(dir.path()).unwrap();
            q.enqueue(vec![job("a"), job("b")]).await.unwrap();
            let first = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
            assert_eq!(first.job.attempts, 1, "the attempt is counted when the job is handed out");
            q.ack(&first).await.unwrap();
            let second = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
            assert_ne!(first.job.id, second.job.id);
            // Dropped while `second` is reserved, as a crash would.
        }
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        let again = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
        // The attempt the crash cut short still counts, and says so.
        assert_eq!((again.job.attempts, again.job.interrupted), (2, 1));
        assert_eq!(q.reserve(Duration::from_millis(10)).await.unwrap(), None);
        assert_eq!(q.depth().await.unwrap().in_flight, 1);
        q.ack(&again).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), QueueDepth::default());
    }

    /// A job of `receipt` in order group `group`.
    fn ordered(receipt: &str, group: &str) -> Job {
        Job { id: format!("{receipt}/meta-capi/Lead"), receipt_id: receipt.into(), order_key: group.into(), ..job("x") }
    }

    #[tokio::test]
    async fn a_later_receipts_job_waits_for_the_earlier_one_of_its_deal() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        q.enqueue(vec![ordered("r1", "deal-a"), ordered("r2", "deal-a"), ordered("r3", "deal-b")]).await.unwrap();
        let first = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(first.job.receipt_id, "r1");
        // r2 waits behind r1 (in flight); r3 is another deal and goes.
        let other = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(other.job.receipt_id, "r3");
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None);
        // r1 failed and will retry: r2 still waits, spending nothing.
        q.retry(first, Duration::from_millis(50)).await.unwrap();
        let again = q.reserve(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(again.job.receipt_id, "r1");
        q.ack(&again).await.unwrap();
        let second = q.reserve(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!((second.job.receipt_id.as_str(), second.job.attempts), ("r2", 1));
    }

    #[tokio::test]
    async fn a_dead_letter_releases_the_jobs_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        q.enqueue(vec![ordered("r1", "deal-a"), ordered("r2", "deal-a")]).await.unwrap();
        let first = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None);
        q.dead_letter(first, "Meta answered 400".into()).await.unwrap();
        assert_eq!(q.reserve(Duration::from_secs(5)).await.unwrap().unwrap().job.receipt_id, "r2");
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
        let j = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        q.retry(j, Duration::from_millis(300)).await.unwrap();
        assert_eq!(q.reserve(Duration::from_millis(50)).await.unwrap(), None);
        assert_eq!(q.depth().await.unwrap().delayed, 1);
        let j = q.reserve(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!((j.job.attempts, j.job.interrupted), (2, 0));
    }

    #[tokio::test]
    async fn dead_letters_are_listed_and_replayed_with_a_fresh_budget() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path()).unwrap();
        q.enqueue(vec![job("a")]).await.unwrap();
        let mut j = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        j.job.attempts = 5;
        q.dead_letter(j, "Meta answered 400 (code 100)".into()).await.unwrap();
        // A re-sent webhook does not resurrect a dead job by itself.
        q.enqueue(vec![job("a")]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), QueueDepth { dead: 1, ..QueueDepth::default() });
        let letters = q.dead_letters(10).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "Meta answered 400 (code 100)");
        let replayed = q.replay("a").await.unwrap().unwrap();
        assert_eq!((replayed.attempts, replayed.budget_start), (5, 5));
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap().map(|j| j.job.id), Some("a".into()));
        assert!(q.replay("a").await.unwrap().is_none());
    }
}
