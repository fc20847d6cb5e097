//! The embedded job queue: tables in the embedded backends' one redb file,
//! `DATA_DIR/crm.redb` (see `store::redb_file`), written by group commit,
//! plus an in-memory schedule rebuilt from them at start-up. The schedule
//! holds each live job's id, due time and order key; the job itself is read
//! from the file when it is reserved, so a backlog (a downstream outage,
//! say) grows the file, not the process.
//!
//! Layout:
//! - `jobs`: job id → `{"job": …, "due_ms": …, "running": bool}` for every
//!   live job, whether waiting, delayed or reserved, as it was queued
//! - `job_state`: job id → its counters, due time and running flag since
//!   (`JobState`, 25 bytes), once it has been reserved; it overrides those
//!   of `jobs`, so reserving and retrying rewrite 25 bytes, not the job
//! - `dead`: job id → `{"job": …, "reason": …, "failed_at_ms": …}`
//! - `paused`: destination → its `Pause`
//!
//! Reserving a job writes its state with `attempts` raised and `running`
//! set before the worker gets it, so an attempt during which the process
//! dies still counts: at start-up a job found `running` had an attempt
//! interrupted. New jobs, states and dead letters are encoded before they
//! reach the committer. Changes to the schedule in memory are made on the
//! committer once the change is committed (`RedbFile::write_then`), in
//! commit order, so a caller that stops waiting cannot leave a committed
//! job out of it. A reserved job stays in `jobs` until acknowledged, retried
//! or dead-lettered, so a crash mid-delivery leaves it to run again after
//! the restart. If settling a job fails (a storage fault), the job is due
//! again shortly, as the file says it is. One process owns the file (redb
//! locks it).
//!
//! With the embedded store on the same file, `accept` writes a receipt and
//! its jobs in one transaction, and `settle` records an attempt's outcome
//! on the receipt and acknowledges, retries or dead-letters the job in one
//! transaction; group commit puts many of either in one fsync.
//!
//! Order per deal: jobs with the same `order_key` (one deal, one
//! destination) run in the order their receipts were accepted. A due job
//! whose group has a live job from an earlier receipt is held (in memory,
//! spending nothing) until that job is acknowledged or dead-lettered.
//!
//! Paused destinations: a due job of a paused destination is set aside (in
//! memory, spending nothing) when a worker would take it, and is due again
//! when the destination is resumed; at start-up it is simply due, and set
//! aside again.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{
    DeadLetter, Job, JobQueue, Pause, PausedBy, PausedDestination, QueueDepth, QueueError, Reserved, Settle,
    destination_of,
};
use crate::store::embedded::{encode, insert_in, mark_enqueued_in, record_in};
use crate::store::now_ms;
use crate::store::redb_file::{RedbFile, Unavailable};
use crate::store::{AttemptRecord, Inserted, Receipt, StoreError};

pub(crate) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
pub(crate) const DEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("dead");
pub(crate) const JOB_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("job_state");
pub(crate) const PAUSED: TableDefinition<&str, &[u8]> = TableDefinition::new("paused");

/// How soon a job is due again after a storage fault kept it from starting
/// or settling.
const AFTER_FAULT: Duration = Duration::from_secs(1);

/// When a job a storage fault held up is due again.
fn after_fault() -> u64 {
    now_ms() + AFTER_FAULT.as_millis() as u64
}

#[derive(Serialize, Deserialize)]
struct StoredJob {
    job: Job,
    due_ms: u64,
    /// Reserved by a worker that has not settled it yet.
    #[serde(default)]
    running: bool,
}

/// What changes about a live job after it is queued.
struct JobState {
    attempts: u32,
    interrupted: u32,
    deferrals: u32,
    budget_start: u32,
    due_ms: u64,
    running: bool,
}

impl JobState {
    const LEN: usize = 25;

    fn of(job: &Job, due_ms: u64, running: bool) -> JobState {
        JobState {
            attempts: job.attempts,
            interrupted: job.interrupted,
            deferrals: job.deferrals,
            budget_start: job.budget_start,
            due_ms,
            running,
        }
    }

    fn encode(&self) -> [u8; JobState::LEN] {
        let mut out = [0u8; JobState::LEN];
        out[0..4].copy_from_slice(&self.attempts.to_le_bytes());
        out[4..8].copy_from_slice(&self.interrupted.to_le_bytes());
        out[8..12].copy_from_slice(&self.deferrals.to_le_bytes());
        out[12..16].copy_from_slice(&self.budget_start.to_le_bytes());
        out[16..24].copy_from_slice(&self.due_ms.to_le_bytes());
        out[24] = u8::from(self.running);
        out
    }

    fn decode(bytes: &[u8]) -> Result<JobState, QueueError> {
        let corrupt = || QueueError::Corrupt(format!("job state of {} bytes, expected {}", bytes.len(), JobState::LEN));
        let bytes: &[u8; JobState::LEN] = bytes.try_into().map_err(|_| corrupt())?;
        let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut due = [0u8; 8];
        due.copy_from_slice(&bytes[16..24]);
        Ok(JobState {
            attempts: u32_at(0),
            interrupted: u32_at(4),
            deferrals: u32_at(8),
            budget_start: u32_at(12),
            due_ms: u64::from_le_bytes(due),
            running: bytes[24] != 0,
        })
    }

    /// `stored` as this state says.
    fn apply(&self, stored: &mut StoredJob) {
        let job = &mut stored.job;
        (job.attempts, job.interrupted, job.deferrals, job.budget_start) =
            (self.attempts, self.interrupted, self.deferrals, self.budget_start);
        (stored.due_ms, stored.running) = (self.due_ms, self.running);
    }
}

/// A job id or order key in the schedule, shared between its indexes.
type Key = Arc<str>;

/// A live job as the schedule holds it. The job itself stays in the file
/// and is read when it is reserved, so a backlog costs memory for its ids,
/// not for its events.
struct Live {
    /// None: not ordered.
    order_key: Option<Key>,
    /// The file counts an attempt the host could not settle (a storage
    /// fault): the next reservation does not count it again.
    uncount: bool,
    /// The file says a previous process died during an attempt: the next
    /// reservation records it.
    interrupted: bool,
}

/// The in-memory schedule.
#[derive(Default)]
struct Schedule {
    /// (due, id) of jobs not reserved.
    waiting: BTreeSet<(u64, Key)>,
    /// Every live job.
    jobs: HashMap<Key, Live>,
    reserved: HashSet<Key>,
    dead: u64,
    /// Live job ids of each order group, sorted; ids start with their
    /// receipt's id (UUID v7), so they sort in acceptance order. Most
    /// groups hold one or two.
    groups: HashMap<Key, Vec<Key>>,
    /// Due jobs waiting for an earlier job of their group.
    held: HashMap<Key, Vec<Key>>,
    /// Paused destinations.
    paused: HashMap<String, Pause>,
    /// Due jobs of each paused destination, oldest first.
    paused_jobs: HashMap<String, VecDeque<Key>>,
}

/// The receipt part of a job id (`{receipt}/{destination}/{action}`).
fn receipt_of(job_id: &str) -> &str {
    job_id.split('/').next().unwrap_or(job_id)
}

impl Schedule {
    /// A job that is live (waiting, delayed or reserved), due at `due`.
    fn add(&mut self, id: &str, order_key: &str, due: u64, interrupted: bool) {
        let id: Key = id.into();
        let order_key = (!order_key.is_empty()).then(|| {
            let key = self.groups.get_key_value(order_key).map_or_else(|| order_key.into(), |(k, _)| k.clone());
            let group = self.groups.entry(key.clone()).or_default();
            if let Err(at) = group.binary_search(&id) {
                group.insert(at, id.clone());
            }
            key
        });
        self.waiting.insert((due, id.clone()));
        self.jobs.insert(id, Live { order_key, uncount: false, interrupted });
    }

    /// Make a reserved job due again at `due`.
    fn put_back(&mut self, id: &str, due: u64) {
        if let Some(id) = self.reserved.take(id) {
            self.waiting.insert((due, id));
        }
    }

    /// A job that is no longer live (acknowledged or dead): the jobs its
    /// group held for it are due again.
    fn forget(&mut self, id: &str, now: u64) {
        self.reserved.remove(id);
        let Some((id, Live { order_key: Some(key), .. })) = self.jobs.remove_entry(id) else { return };
        if let Some(group) = self.groups.get_mut(&key) {
            if let Ok(at) = group.binary_search(&id) {
                group.remove(at);
            }
            if group.is_empty() {
                self.groups.remove(&key);
            }
        }
        for held in self.held.remove(&key).unwrap_or_default() {
            self.waiting.insert((now, held));
        }
    }

    /// Pause a destination, or resume it (`None`): its set-aside jobs are
    /// due at `now`; how many.
    fn set_pause(&mut self, destination: &str, pause: Option<Pause>, now: u64) -> u64 {
        match pause {
            Some(pause) => {
                self.paused.insert(destination.to_string(), pause);
                0
            }
            None => {
                self.paused.remove(destination);
                let jobs = self.paused_jobs.remove(destination).unwrap_or_default();
                let released = jobs.len() as u64;
                self.waiting.extend(jobs.into_iter().map(|id| (now, id)));
                released
            }
        }
    }

    /// Whether an earlier receipt's job of job `id`'s group is still live.
    fn held_back(&self, id: &str, order_key: &str) -> bool {
        let first = self.groups.get(order_key).and_then(|g| g.first());
        first.is_some_and(|first| receipt_of(first) < receipt_of(id))
    }
}

/// Jobs in the local redb file.
#[derive(Clone)]
pub struct EmbeddedQueue {
    file: Arc<RedbFile>,
    schedule: Arc<Mutex<Schedule>>,
    notify: Arc<Notify>,
    /// Held by pause, resume and probe from their look at the schedule
    /// until their write is committed, so that none decides on a state
    /// another is changing.
    control: Arc<tokio::sync::Mutex<()>>,
}

impl From<Unavailable> for QueueError {
    fn from(Unavailable(why): Unavailable) -> Self {
        QueueError::Unavailable(why)
    }
}

impl From<QueueError> for StoreError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Unavailable(why) => StoreError::Unavailable(why),
            QueueError::Corrupt(why) => StoreError::Corrupt(why),
        }
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

/// What the schedule takes of a job: the job stays in the file.
#[derive(Clone)]
struct Scheduled {
    id: String,
    order_key: String,
}

impl Scheduled {
    fn of(job: &Job) -> Scheduled {
        Scheduled { id: job.id.clone(), order_key: job.order_key.clone() }
    }
}

/// A job queued as new: its stored form, and what the schedule takes of it.
struct NewJob {
    scheduled: Scheduled,
    bytes: Vec<u8>,
}

/// Jobs queued as new, due at `now`, encoded.
fn encode_jobs(jobs: Vec<Job>, now: u64) -> Result<Vec<NewJob>, QueueError> {
    jobs.into_iter()
        .map(|job| {
            let stored = StoredJob { job, due_ms: now, running: false };
            let bytes = to_json(&stored)?;
            let Job { id, order_key, .. } = stored.job;
            Ok(NewJob { scheduled: Scheduled { id, order_key }, bytes })
        })
        .collect()
}

/// A live job as the file holds it: its row in `jobs` with its `job_state`
/// applied.
fn stored_job(bytes: &[u8], state: Option<&[u8]>) -> Result<StoredJob, QueueError> {
    let mut stored: StoredJob = from_json(bytes)?;
    if let Some(state) = state {
        JobState::decode(state)?.apply(&mut stored);
    }
    Ok(stored)
}

/// Live job `id` as the file holds it; None if it is not live.
fn lookup(db: &Database, id: &str) -> Result<Option<StoredJob>, QueueError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let jobs = txn.open_table(JOBS).map_err(unavailable)?;
    let Some(bytes) = jobs.get(id).map_err(unavailable)? else { return Ok(None) };
    let state = txn.open_table(JOB_STATE).map_err(unavailable)?.get(id).map_err(unavailable)?;
    stored_job(bytes.value(), state.as_ref().map(|s| s.value())).map(Some)
}

/// Add the jobs not live or dead yet; the ones added.
fn enqueue_in(txn: &WriteTransaction, jobs: &[NewJob]) -> Result<Vec<Scheduled>, QueueError> {
    let mut table = txn.open_table(JOBS).map_err(unavailable)?;
    let dead = txn.open_table(DEAD).map_err(unavailable)?;
    let mut added = Vec::new();
    for NewJob { scheduled, bytes } in jobs {
        let id = scheduled.id.as_str();
        if table.get(id).map_err(unavailable)?.is_some() || dead.get(id).map_err(unavailable)?.is_some() {
            continue;
        }
        table.insert(id, bytes.as_slice()).map_err(unavailable)?;
        added.push(scheduled.clone());
    }
    Ok(added)
}

/// Write a live job's state.
fn put_state_in(txn: &WriteTransaction, id: &str, state: &JobState) -> Result<(), QueueError> {
    txn.open_table(JOB_STATE).map_err(unavailable)?.insert(id, state.encode().as_slice()).map_err(unavailable)?;
    Ok(())
}

/// Remove a job that is no longer live.
fn remove_in(txn: &WriteTransaction, id: &str) -> Result<(), QueueError> {
    txn.open_table(JOBS).map_err(unavailable)?.remove(id).map_err(unavailable)?;
    txn.open_table(JOB_STATE).map_err(unavailable)?.remove(id).map_err(unavailable)?;
    Ok(())
}

/// How a settle is written: what `Settle` says, with the dead letter
/// encoded beforehand.
enum SettleWrite {
    Ack,
    Retry(JobState),
    Dead(Vec<u8>),
}

impl SettleWrite {
    fn new(job: &Job, how: &Settle, now: u64) -> Result<SettleWrite, QueueError> {
        Ok(match how {
            Settle::Ack => SettleWrite::Ack,
            Settle::Retry(delay) => SettleWrite::Retry(JobState::of(job, now + delay.as_millis() as u64, false)),
            Settle::Dead(reason) => {
                SettleWrite::Dead(to_json(&DeadLetter { job: job.clone(), reason: reason.clone(), failed_at_ms: now })?)
            }
        })
    }
}

/// The queue's half of settling a job.
fn settle_in(txn: &WriteTransaction, id: &str, how: &SettleWrite) -> Result<(), QueueError> {
    match how {
        SettleWrite::Ack => remove_in(txn, id),
        SettleWrite::Retry(state) => put_state_in(txn, id, state),
        SettleWrite::Dead(letter) => {
            remove_in(txn, id)?;
            txn.open_table(DEAD).map_err(unavailable)?.insert(id, letter.as_slice()).map_err(unavailable)?;
            Ok(())
        }
    }
}

impl EmbeddedQueue {
    /// The queue on the embedded file (`redb_file::open_embedded`), with
    /// every live job loaded: those a previous process had reserved are due
    /// again now, with the attempt it was making counted as interrupted.
    pub fn new(file: Arc<RedbFile>) -> Result<EmbeddedQueue, QueueError> {
        let mut schedule = Schedule::default();
        file.read(|db: &Database| {
            let txn = db.begin_read().map_err(unavailable)?;
            let jobs = txn.open_table(JOBS).map_err(unavailable)?;
            let states = txn.open_table(JOB_STATE).map_err(unavailable)?;
            for entry in jobs.iter().map_err(unavailable)? {
                let (id, bytes) = entry.map_err(unavailable)?;
                let state = states.get(id.value()).map_err(unavailable)?;
                let stored = stored_job(bytes.value(), state.as_ref().map(|s| s.value()))?;
                schedule.add(&stored.job.id, &stored.job.order_key, stored.due_ms, stored.running);
            }
            schedule.dead = txn.open_table(DEAD).map_err(unavailable)?.len().map_err(unavailable)?;
            for entry in txn.open_table(PAUSED).map_err(unavailable)?.iter().map_err(unavailable)? {
                let (destination, bytes) = entry.map_err(unavailable)?;
                let destination = destination.value().to_string();
                match from_json(bytes.value()) {
                    Ok(pause) => {
                        schedule.paused.insert(destination, pause);
                    }
                    Err(e) => {
                        tracing::error!(%destination, error = %e, "a stored pause is unreadable; the destination runs")
                    }
                }
            }
            Ok::<_, QueueError>(())
        })?;
        Ok(EmbeddedQueue {
            file,
            schedule: Arc::new(Mutex::new(schedule)),
            notify: Arc::new(Notify::new()),
            control: Arc::default(),
        })
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the first due job not held back by an earlier one of its deal
    /// or by its destination's pause (and whether it is that destination's
    /// probe), or say when the next one is due.
    fn take_due(&self, now: u64) -> Result<(String, bool), Option<u64>> {
        let mut s = self.schedule();
        loop {
            let Some((due, id)) = s.waiting.first().cloned() else {
                return Err(None);
            };
            if due > now {
                return Err(Some(due));
            }
            s.waiting.pop_first();
            let Some(live) = s.jobs.get(&id) else { continue };
            let order_key = live.order_key.clone();
            let destination = destination_of(&id);
            let probe = match s.paused.get(destination) {
                None => false,
                Some(pause) if pause.probe_job.as_deref() == Some(&*id) => true,
                Some(_) => {
                    let destination = destination.to_string();
                    s.paused_jobs.entry(destination).or_default().push_back(id);
                    continue;
                }
            };
            if let Some(key) = order_key
                && s.held_back(&id, &key)
            {
                s.held.entry(key).or_default().push(id);
                continue;
            }
            s.reserved.insert(id.clone());
            return Ok((id.to_string(), probe));
        }
    }

    /// Read a taken job from the file and count the attempt it is for, on
    /// disk, before handing it out. None: the job is no longer in the file.
    async fn start(&self, id: String, probe: bool) -> Result<Option<Reserved>, QueueError> {
        // On the executor (two lookups, mostly in cache), unless the file is
        // being reopened after a storage fault: then off it.
        let found = match self.file.try_read(|db| lookup(db, &id)) {
            Some(found) => found,
            None => {
                let (file, id) = (self.file.clone(), id.clone());
                tokio::task::spawn_blocking(move || file.read(|db| lookup(db, &id)))
                    .await
                    .unwrap_or_else(|e| Err(QueueError::Unavailable(format!("queue task failed: {e}"))))
            }
        };
        let mut job = match found {
            Ok(Some(stored)) => stored.job,
            Ok(None) => {
                // Jobs its group held may be due now.
                self.schedule().forget(&id, now_ms());
                self.notify.notify_waiters();
                return Ok(None);
            }
            Err(e) => {
                self.schedule().put_back(&id, after_fault());
                return Err(e);
            }
        };
        if let Some(live) = self.schedule().jobs.get(id.as_str()) {
            job.attempts -= u32::from(live.uncount).min(job.attempts);
            job.interrupted += u32::from(live.interrupted);
        }
        job.attempts += 1;
        let state = JobState::of(&job, now_ms(), true);
        let queue = self.clone();
        let job = self
            .file
            .write_then(
                move |txn| put_state_in(txn, &job.id, &state).map(|()| job.clone()),
                move |started| {
                    let mut s = queue.schedule();
                    match started {
                        Some(_) => {
                            if let Some(live) = s.jobs.get_mut(id.as_str()) {
                                (live.uncount, live.interrupted) = (false, false);
                            }
                        }
                        None => s.put_back(&id, after_fault()),
                    }
                },
            )
            .await?;
        Ok(Some(Reserved { job, lease: String::new(), probe }))
    }

    /// Settling failed: the file still holds the job as reserved, so it is
    /// due again shortly, without the attempt the host could not record.
    fn settle_failed(&self, reserved: &Reserved) {
        {
            let mut s = self.schedule();
            if let Some(live) = s.jobs.get_mut(reserved.job.id.as_str()) {
                live.uncount = true;
            }
            s.put_back(&reserved.job.id, after_fault());
        }
        self.notify.notify_waiters();
    }

    /// The schedule after a committed settle.
    fn settled(&self, id: &str, how: &Settle, now: u64) {
        {
            let mut s = self.schedule();
            match how {
                Settle::Ack => s.forget(id, now),
                Settle::Retry(delay) => s.put_back(id, now + delay.as_millis() as u64),
                Settle::Dead(_) => {
                    s.forget(id, now);
                    s.dead += 1;
                }
            }
        }
        self.notify.notify_waiters();
    }

    /// Store a receipt (on the embedded store's tables of the same file)
    /// and queue its jobs, in one transaction. A duplicate whose jobs were
    /// never queued gets them queued now.
    pub async fn accept(
        &self,
        mut receipt: Receipt,
        jobs_for: fn(&Receipt) -> Vec<Job>,
    ) -> Result<Inserted, StoreError> {
        receipt.jobs_enqueued = true;
        let encoded = encode(&receipt)?;
        let now = now_ms();
        let jobs = encode_jobs(jobs_for(&receipt), now)?;
        let queue = self.clone();
        let (inserted, _) = self
            .file
            .write_then(
                move |txn| {
                    let mut inserted = insert_in(txn, receipt.clone(), &encoded)?;
                    let added = match &mut inserted {
                        Inserted::New(_) => enqueue_in(txn, &jobs)?,
                        Inserted::Duplicate(r) if !r.jobs_enqueued => {
                            let added = enqueue_in(txn, &encode_jobs(jobs_for(r), now)?)?;
                            r.jobs_enqueued = true;
                            mark_enqueued_in(txn, &r.id)?;
                            added
                        }
                        Inserted::Duplicate(_) => Vec::new(),
                    };
                    Ok::<_, StoreError>((inserted, added))
                },
                move |accepted| {
                    if let Some((_, added)) = accepted {
                        queue.added(added, now);
                    }
                },
            )
            .await?;
        Ok(inserted)
    }

    /// The schedule after jobs were committed as added.
    fn added(&self, jobs: &[Scheduled], now: u64) {
        if !jobs.is_empty() {
            let mut s = self.schedule();
            for job in jobs {
                s.add(&job.id, &job.order_key, now, false);
            }
        }
        self.notify.notify_waiters();
    }

    /// Record an attempt on its receipt and settle the job, in one
    /// transaction. On an error nothing is written and the job is still the
    /// worker's to settle.
    pub async fn record_and_settle(
        &self,
        reserved: Reserved,
        attempt: AttemptRecord,
        how: Settle,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let write = SettleWrite::new(&reserved.job, &how, now)?;
        let (receipt_id, job_id) = (reserved.job.receipt_id.clone(), reserved.job.id.clone());
        let queue = self.clone();
        self.file
            .write_then(
                move |txn| {
                    record_in(txn, &receipt_id, &attempt)?;
                    settle_in(txn, &job_id, &write)?;
                    Ok::<_, StoreError>(())
                },
                move |settled| {
                    if settled.is_some() {
                        queue.settled(&reserved.job.id, &how, now);
                    }
                },
            )
            .await
    }

    /// Write a destination's pause (None: remove it), and once committed
    /// set it in the schedule; the jobs a removed pause released.
    async fn write_pause(&self, destination: &str, pause: Option<Pause>) -> Result<u64, QueueError> {
        let bytes = pause.as_ref().map(to_json).transpose()?;
        let (key, destination) = (destination.to_string(), destination.to_string());
        let (queue, now) = (self.clone(), now_ms());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.file
            .write_then(
                move |txn| {
                    let mut table = txn.open_table(PAUSED).map_err(unavailable)?;
                    match &bytes {
                        Some(bytes) => table.insert(key.as_str(), bytes.as_slice()).map(drop),
                        None => table.remove(key.as_str()).map(drop),
                    }
                    .map_err(unavailable)
                },
                move |written| {
                    if written.is_some() {
                        let released = queue.schedule().set_pause(&destination, pause, now);
                        queue.notify.notify_waiters();
                        let _ = tx.send(released);
                    }
                },
            )
            .await?;
        Ok(rx.await.unwrap_or(0))
    }
}

#[async_trait]
impl JobQueue for EmbeddedQueue {
    async fn enqueue(&self, jobs: Vec<Job>) -> Result<usize, QueueError> {
        let now = now_ms();
        let jobs = encode_jobs(jobs, now)?;
        let queue = self.clone();
        let added = self
            .file
            .write_then(
                move |txn| enqueue_in(txn, &jobs),
                move |added| {
                    if let Some(added) = added {
                        queue.added(added, now);
                    }
                },
            )
            .await?;
        Ok(added.len())
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
                Ok((id, probe)) => match self.start(id, probe).await? {
                    Some(reserved) => return Ok(Some(reserved)),
                    None => continue,
                },
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
        self.settle(reserved.clone(), Settle::Ack).await
    }

    async fn retry(&self, reserved: Reserved, delay: Duration) -> Result<(), QueueError> {
        self.settle(reserved, Settle::Retry(delay)).await
    }

    async fn dead_letter(&self, reserved: Reserved, reason: String) -> Result<(), QueueError> {
        self.settle(reserved, Settle::Dead(reason)).await
    }

    /// If the write fails, the job is due again shortly, as the file still
    /// holds it (reserved), without the attempt the host could not record.
    async fn settle(&self, reserved: Reserved, how: Settle) -> Result<(), QueueError> {
        let now = now_ms();
        let write = SettleWrite::new(&reserved.job, &how, now)?;
        let id = reserved.job.id.clone();
        let queue = self.clone();
        self.file
            .write_then(
                move |txn| settle_in(txn, &id, &write),
                move |settled| match settled {
                    Some(()) => queue.settled(&reserved.job.id, &how, now),
                    None => queue.settle_failed(&reserved),
                },
            )
            .await
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
        let queue = self.clone();
        self.file
            .write_then(
                move |txn| {
                    let letter: Option<DeadLetter> = {
                        let dead = txn.open_table(DEAD).map_err(unavailable)?;
                        let found = dead.get(key.as_str()).map_err(unavailable)?;
                        found.map(|b| from_json(b.value())).transpose()?
                    };
                    let Some(letter) = letter else { return Ok(None) };
                    let mut job = letter.job;
                    job.replayed(now);
                    let stored = StoredJob { job, due_ms: now, running: false };
                    let bytes = to_json(&stored)?;
                    txn.open_table(DEAD).map_err(unavailable)?.remove(key.as_str()).map_err(unavailable)?;
                    txn.open_table(JOBS)
                        .map_err(unavailable)?
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(unavailable)?;
                    Ok::<_, QueueError>(Some(stored.job))
                },
                move |replayed| {
                    if let Some(Some(job)) = replayed {
                        {
                            let mut s = queue.schedule();
                            s.dead = s.dead.saturating_sub(1);
                        }
                        queue.added(&[Scheduled::of(job)], now);
                    }
                },
            )
            .await
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
            paused: s.paused_jobs.values().map(|jobs| jobs.len() as u64).sum(),
        })
    }

    /// Found on a snapshot, off the committer (dead letters are keyed by
    /// job id, not time, so all are read); removed in one write.
    async fn remove_dead_before(&self, before_ms: u64, limit: usize) -> Result<usize, QueueError> {
        let file = self.file.clone();
        let old: Vec<String> = tokio::task::spawn_blocking(move || {
            file.read(|db| {
                let txn = db.begin_read().map_err(unavailable)?;
                let dead = txn.open_table(DEAD).map_err(unavailable)?;
                let mut old = Vec::new();
                for entry in dead.iter().map_err(unavailable)? {
                    let (id, bytes) = entry.map_err(unavailable)?;
                    if from_json::<DeadLetter>(bytes.value())?.failed_at_ms < before_ms {
                        old.push(id.value().to_string());
                        if old.len() >= limit {
                            break;
                        }
                    }
                }
                Ok::<_, QueueError>(old)
            })
        })
        .await
        .map_err(|e| QueueError::Unavailable(format!("queue task failed: {e}")))??;
        if old.is_empty() {
            return Ok(0);
        }
        let queue = self.clone();
        self.file
            .write_then(
                move |txn| {
                    let mut dead = txn.open_table(DEAD).map_err(unavailable)?;
                    let mut removed = 0;
                    for id in &old {
                        // Replayed and dead again meanwhile: it stays.
                        let still_old = match dead.get(id.as_str()).map_err(unavailable)? {
                            Some(letter) => from_json::<DeadLetter>(letter.value())?.failed_at_ms < before_ms,
                            None => false,
                        };
                        if still_old {
                            dead.remove(id.as_str()).map_err(unavailable)?;
                            removed += 1;
                        }
                    }
                    Ok::<_, QueueError>(removed)
                },
                move |removed| {
                    if let Some(removed) = removed {
                        let mut s = queue.schedule();
                        s.dead = s.dead.saturating_sub(*removed as u64);
                    }
                },
            )
            .await
    }

    async fn pause(&self, destination: &str, pause: Pause) -> Result<bool, QueueError> {
        let _control = self.control.lock().await;
        let mut pause = pause;
        {
            let s = self.schedule();
            let current = s.paused.get(destination);
            if !pause.may_replace(current) {
                return Ok(false);
            }
            if let Some(current) = current.filter(|c| c.by == PausedBy::Breaker && pause.by == PausedBy::Breaker) {
                pause.since_ms = current.since_ms;
            }
        }
        self.write_pause(destination, Some(pause)).await?;
        Ok(true)
    }

    async fn resume(&self, destination: &str, by: Option<PausedBy>) -> Result<Option<u64>, QueueError> {
        let _control = self.control.lock().await;
        let paused = self.schedule().paused.get(destination).map(|p| p.by);
        match paused {
            Some(was) if by.is_none_or(|by| by == was) => self.write_pause(destination, None).await.map(Some),
            _ => Ok(None),
        }
    }

    async fn paused(&self) -> Result<Vec<PausedDestination>, QueueError> {
        let s = self.schedule();
        let mut out: Vec<PausedDestination> = s
            .paused
            .iter()
            .map(|(destination, pause)| PausedDestination {
                destination: destination.clone(),
                pause: pause.clone(),
                waiting: s.paused_jobs.get(destination).map_or(0, |jobs| jobs.len() as u64),
            })
            .collect();
        out.sort_by(|a, b| a.destination.cmp(&b.destination));
        Ok(out)
    }

    async fn probe(&self, destination: &str, now_ms: u64, next_ms: u64) -> Result<Option<String>, QueueError> {
        let _control = self.control.lock().await;
        let (pause, job) = {
            let s = self.schedule();
            let Some(pause) = s.paused.get(destination) else { return Ok(None) };
            let Some(job) = s.paused_jobs.get(destination).and_then(|jobs| jobs.front()) else { return Ok(None) };
            if pause.by != PausedBy::Breaker || pause.probe_at_ms.is_some_and(|at| at > now_ms) {
                return Ok(None);
            }
            (Pause { probe_at_ms: Some(next_ms), probe_job: Some(job.to_string()), ..pause.clone() }, job.clone())
        };
        self.write_pause(destination, Some(pause)).await?;
        {
            let mut s = self.schedule();
            if let Some(jobs) = s.paused_jobs.get_mut(destination) {
                jobs.retain(|id| *id != job);
            }
            s.waiting.insert((now_ms, job.clone()));
        }
        self.notify.notify_waiters();
        Ok(Some(job.to_string()))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.file.ping().await.map_err(QueueError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Customer, Deal, Event};
    use crate::store::redb_file::open_embedded;

    fn open(dir: &std::path::Path) -> EmbeddedQueue {
        EmbeddedQueue::new(open_embedded(dir, true).unwrap()).unwrap()
    }

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
            accepted_at_ms: 0,
            replayed_at_ms: None,
        }
    }

    #[tokio::test]
    async fn reserved_but_unacked_jobs_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = open(dir.path());
            q.enqueue(vec![job("a"), job("b")]).await.unwrap();
            let first = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
            assert_eq!(first.job.attempts, 1, "the attempt is counted when the job is handed out");
            q.ack(&first).await.unwrap();
            let second = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
            assert_ne!(first.job.id, second.job.id);
            // Dropped while `second` is reserved, as a crash would.
        }
        let q = open(dir.path());
        let again = q.reserve(Duration::from_millis(10)).await.unwrap().unwrap();
        // The attempt the crash cut short still counts, and says so.
        assert_eq!((again.job.attempts, again.job.interrupted), (2, 1));
        assert_eq!(q.reserve(Duration::from_millis(10)).await.unwrap(), None);
        assert_eq!(q.depth().await.unwrap().in_flight, 1);
        q.ack(&again).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), QueueDepth::default());
    }

    /// A job is read from the file when it is reserved: a retried job comes
    /// back whole, with the counters its settle wrote.
    #[tokio::test]
    async fn a_retried_job_comes_back_whole_with_its_counters() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let mut queued = job("a");
        queued.event.customer.email = Some("jane@example.com".into());
        q.enqueue(vec![queued.clone()]).await.unwrap();
        let mut first = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        // Put off by the host: the attempt does not count.
        first.job.attempts -= 1;
        first.job.deferrals += 1;
        q.retry(first, Duration::ZERO).await.unwrap();
        let again = q.reserve(Duration::from_millis(100)).await.unwrap().unwrap();
        assert_eq!((again.job.attempts, again.job.deferrals), (1, 1));
        assert_eq!(again.job.event, queued.event);
    }

    /// A job of `receipt` in order group `group`.
    fn ordered(receipt: &str, group: &str) -> Job {
        Job { id: format!("{receipt}/meta-capi/Lead"), receipt_id: receipt.into(), order_key: group.into(), ..job("x") }
    }

    #[tokio::test]
    async fn a_later_receipts_job_waits_for_the_earlier_one_of_its_deal() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
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

    fn paused_by(by: PausedBy, probe_at_ms: Option<u64>) -> Pause {
        Pause { by, reason: "test".into(), since_ms: 1, probe_at_ms, probe_job: None }
    }

    #[tokio::test]
    async fn a_paused_destinations_jobs_wait_spending_nothing_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let email = Job { id: "r2/brevo/Email".into(), destination: "brevo".into(), ..job("x") };
        {
            let q = open(dir.path());
            assert!(q.pause("meta-capi", paused_by(PausedBy::Operator, None)).await.unwrap());
            q.enqueue(vec![ordered("r1", ""), email]).await.unwrap();
            // Brevo is not paused: its job goes; Meta's waits.
            let sent = q.reserve(Duration::ZERO).await.unwrap().unwrap();
            assert_eq!(sent.job.destination, "brevo");
            q.ack(&sent).await.unwrap();
            assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None);
            assert_eq!(q.depth().await.unwrap().paused, 1);
            let paused = q.paused().await.unwrap();
            assert_eq!((paused.len(), paused[0].destination.as_str(), paused[0].waiting), (1, "meta-capi", 1));
            // The breaker neither replaces an operator's pause nor probes it.
            assert!(!q.pause("meta-capi", paused_by(PausedBy::Breaker, Some(0))).await.unwrap());
            assert_eq!(q.probe("meta-capi", u64::MAX - 1, u64::MAX).await.unwrap(), None);
        }
        let q = open(dir.path());
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None, "still paused after a restart");
        assert_eq!(q.resume("meta-capi", Some(PausedBy::Breaker)).await.unwrap(), None, "an operator paused it");
        assert_eq!(q.resume("meta-capi", None).await.unwrap(), Some(1));
        let j = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((j.job.id.as_str(), j.job.attempts, j.probe), ("r1/meta-capi/Lead", 1, false));
        assert_eq!(q.resume("meta-capi", None).await.unwrap(), None, "no longer paused");
        assert!(q.paused().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_breaker_lets_one_job_through_as_a_probe_when_its_time_comes() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![ordered("r1", ""), ordered("r2", "")]).await.unwrap();
        assert!(q.pause("meta-capi", paused_by(PausedBy::Breaker, Some(1000))).await.unwrap());
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None);
        assert_eq!(q.probe("meta-capi", 999, 5000).await.unwrap(), None, "not yet");
        assert_eq!(q.probe("meta-capi", 1000, 5000).await.unwrap().as_deref(), Some("r1/meta-capi/Lead"));
        let probe = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((probe.job.receipt_id.as_str(), probe.probe), ("r1", true));
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None, "one probe at a time");
        assert_eq!(q.probe("meta-capi", 2000, 6000).await.unwrap(), None, "the next probe is due at 5000");
        let paused = q.paused().await.unwrap();
        assert_eq!(paused[0].pause.probe_job.as_deref(), Some("r1/meta-capi/Lead"));
        assert_eq!(paused[0].waiting, 1);
        // An operator's pause replaces the breaker's.
        assert!(q.pause("meta-capi", paused_by(PausedBy::Operator, None)).await.unwrap());
        assert_eq!(q.resume("meta-capi", Some(PausedBy::Breaker)).await.unwrap(), None);
        assert_eq!(q.resume("meta-capi", Some(PausedBy::Operator)).await.unwrap(), Some(1));
        let rest = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!((rest.job.receipt_id.as_str(), rest.probe), ("r2", false));
    }

    #[tokio::test]
    async fn a_dead_letter_releases_the_jobs_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![ordered("r1", "deal-a"), ordered("r2", "deal-a")]).await.unwrap();
        let first = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(q.reserve(Duration::ZERO).await.unwrap(), None);
        q.dead_letter(first, "Meta answered 400".into()).await.unwrap();
        assert_eq!(q.reserve(Duration::from_secs(5)).await.unwrap().unwrap().job.receipt_id, "r2");
    }

    #[tokio::test]
    async fn enqueue_is_idempotent_per_job_id() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        q.enqueue(vec![job("a")]).await.unwrap();
        q.enqueue(vec![job("a")]).await.unwrap();
        assert_eq!(q.depth().await.unwrap().ready, 1);
    }

    #[tokio::test]
    async fn delayed_retry_is_not_due_early_and_wakes_a_waiting_worker() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
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
        let q = open(dir.path());
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
        let before = now_ms();
        let replayed = q.replay("a").await.unwrap().unwrap();
        assert_eq!((replayed.attempts, replayed.budget_start), (5, 5));
        // Its delivery latency counts from the replay, not the accept.
        let again = q.reserve(Duration::ZERO).await.unwrap().unwrap().job;
        assert_eq!((again.id.as_str(), again.accepted_at_ms), ("a", 0));
        assert!(again.queued_at_ms() >= before, "{again:?}");
        assert!(q.replay("a").await.unwrap().is_none());
    }

    fn receipt(id: &str, reference: &str) -> Receipt {
        use crate::store::{ActionRecord, StoredRequest};
        let event = Event { reference: reference.into(), ..job("x").event };
        Receipt {
            id: id.into(),
            provider: "crm".into(),
            event_type: event.event_type.clone(),
            reference: reference.into(),
            status: event.status.clone(),
            request: StoredRequest { headers: vec![], body: String::new(), purged_at_ms: None },
            event,
            received_at_ms: 1,
            updated_at_ms: 1,
            jobs_enqueued: false,
            actions: vec![ActionRecord::pending("meta-capi".into(), "Lead".into(), vec![], 1)],
        }
    }

    #[tokio::test]
    async fn retention_keeps_a_settled_receipt_while_it_has_a_job_live_or_dead() {
        use crate::store::{DeliveryState, ReceiptStore};
        let dir = tempfile::tempdir().unwrap();
        let file = open_embedded(dir.path(), true).unwrap();
        let (q, store) = (EmbeddedQueue::new(file.clone()).unwrap(), crate::store::embedded::EmbeddedStore::new(file));
        let id = "00000000-0001-7000-8000-000000000001";
        q.accept(receipt(id, "D-1"), crate::intake::jobs_for).await.unwrap();
        let fail = async |q: &EmbeddedQueue| {
            let job = q.reserve(Duration::ZERO).await.unwrap().unwrap();
            let failed = AttemptRecord {
                destination: "meta-capi".into(),
                action: "Lead".into(),
                state: DeliveryState::Failed,
                attempts: job.job.attempts,
                error: Some("Meta answered 400".into()),
                status: Some(400),
                detail: None,
                replay: false,
                log: None,
            };
            q.record_and_settle(job, failed, Settle::Dead("Meta answered 400".into())).await.unwrap();
        };
        fail(&q).await;
        let later = now_ms() + 1_000;
        // Settled and old, but its dead letter can still be replayed.
        assert_eq!(store.remove_expired(later, 10).await.unwrap(), 0);
        // Replayed: the job is live before the receipt says so.
        q.replay(&format!("{id}/meta-capi/Lead")).await.unwrap().unwrap();
        assert_eq!(store.remove_expired(later, 10).await.unwrap(), 0);
        fail(&q).await;
        let later = now_ms() + 1_000;
        assert_eq!(q.remove_dead_before(later, 10).await.unwrap(), 1);
        assert_eq!(store.remove_expired(later, 10).await.unwrap(), 1);
        assert!(store.get(id).await.unwrap().is_none());
        assert_eq!(q.depth().await.unwrap(), QueueDepth::default());
    }

    #[tokio::test]
    async fn copies_of_a_webhook_accepted_together_make_one_receipt_with_its_jobs() {
        use crate::store::ReceiptStore;
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        // Concurrent accepts share commits; copies in one batch still dedupe.
        let accepts: Vec<_> = (0..40)
            .map(|n| {
                let q = q.clone();
                let reference = if n % 2 == 0 { "D-1" } else { "D-2" };
                tokio::spawn(
                    async move { q.accept(receipt(&format!("r{n:02}"), reference), crate::intake::jobs_for).await },
                )
            })
            .collect();
        let mut new = Vec::new();
        for accept in accepts {
            if let Inserted::New(r) = accept.await.unwrap().unwrap() {
                assert!(r.jobs_enqueued);
                new.push(r.id);
            }
        }
        assert_eq!(new.len(), 2, "one receipt per deal and status: {new:?}");
        assert_eq!(q.depth().await.unwrap().ready, 2);
        drop(q);
        // After a restart: the receipts say their jobs are queued, and are.
        let file = open_embedded(dir.path(), true).unwrap();
        let store = crate::store::embedded::EmbeddedStore::new(file.clone());
        assert!(store.unqueued().await.unwrap().is_empty());
        for id in &new {
            assert!(store.get(id).await.unwrap().unwrap().jobs_enqueued);
        }
        let q = EmbeddedQueue::new(file).unwrap();
        assert_eq!(q.depth().await.unwrap().ready, 2);
    }

    #[tokio::test]
    async fn an_outcome_is_recorded_with_its_ack_or_not_at_all() {
        use crate::store::{DeliveryState, ReceiptStore};
        let dir = tempfile::tempdir().unwrap();
        let file = open_embedded(dir.path(), true).unwrap();
        let store = crate::store::embedded::EmbeddedStore::new(file.clone());
        let q = EmbeddedQueue::new(file).unwrap();
        q.accept(receipt("r1", "D-1"), crate::intake::jobs_for).await.unwrap();
        let reserved = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        let delivered = AttemptRecord::delivered("meta-capi", "Lead");
        q.record_and_settle(reserved, delivered.clone(), Settle::Ack).await.unwrap();
        assert_eq!(store.get("r1").await.unwrap().unwrap().actions[0].state, DeliveryState::Delivered);
        assert_eq!(q.depth().await.unwrap(), QueueDepth::default());

        // A job whose receipt is gone: nothing is written, the job is still
        // the worker's.
        q.enqueue(vec![job("orphan")]).await.unwrap();
        let orphan = q.reserve(Duration::ZERO).await.unwrap().unwrap();
        let refused = q.record_and_settle(orphan.clone(), delivered, Settle::Ack).await;
        assert!(matches!(refused, Err(StoreError::NotFound(_))), "{refused:?}");
        assert_eq!(q.depth().await.unwrap().in_flight, 1);
        q.dead_letter(orphan, "the receipt is gone".into()).await.unwrap();
        assert_eq!(q.depth().await.unwrap().dead, 1);
    }
}
