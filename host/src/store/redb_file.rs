//! The embedded backends' one redb file, `DATA_DIR/crm.redb`: receipts
//! (`store::embedded`) and jobs (`queue::embedded`) side by side, so a
//! receipt and its jobs, or an outcome and its ack, are one transaction.
//!
//! **Group commit.** Every write is an operation sent to one committer
//! thread. It runs every operation waiting (up to `MAX_BATCH`) in one write
//! transaction and commits once: one fsync for all of them. Each caller
//! hears back only after that commit is on disk, so "200 means durable"
//! holds, and concurrent webhooks share the cost of the fsync. Operations
//! of one batch see each other's writes (two copies of a webhook in one
//! batch dedupe as they would in two). An operation that fails leaves the
//! others to commit; it must fail before it writes (they all read first).
//! Reads run on the caller's thread, on a snapshot.
//!
//! **Storage faults.** After an I/O error (a full disk, say) redb refuses
//! every later transaction until the database is reopened. So a failed
//! commit is followed by a check; if the file is faulted, the fault is
//! recorded (and reported by `ping`, which `/ready` calls), and the next
//! batch reopens the file, at most once a second, which repairs it. The
//! fault clears only when a probe write of `PROBE_BYTES` goes through, so
//! `/ready` does not say all is well while a receipt would still not fit.
//!
//! **Files of earlier versions** (`receipts.redb` and `queue.redb`) are
//! taken over at start-up: the first becomes `crm.redb`, the second's jobs
//! and dead letters are copied in, and it is renamed `queue.redb.migrated`.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

/// Least time between two attempts to reopen a faulted file.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// Most operations one commit carries.
const MAX_BATCH: usize = 1024;

/// Where a probe write goes.
const HEALTH: TableDefinition<&str, &[u8]> = TableDefinition::new("health");
/// How much a probe writes: room for about a hundred receipts, so a fault
/// that leaves only a sliver of space free is still reported.
const PROBE_BYTES: usize = 256 << 10;

/// One write of a batch.
trait Operation: Send {
    /// Run in the batch's transaction, keeping the result; false if it
    /// failed (or panicked). May run again in a new transaction when
    /// another write of the batch failed.
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Answer the caller: the kept result once committed, or why not.
    fn finish(self: Box<Self>, committed: Result<(), String>);
}

type Op = Box<dyn Operation>;

/// What runs on the committer once a write is settled: with its value if
/// it was committed, None if not. It cannot be lost to a caller that stops
/// waiting, and writes finish in commit order.
type After<T> = Box<dyn FnOnce(Option<&T>) + Send>;

/// A caller's write and where its answer goes.
struct Write<F, T, E> {
    f: F,
    result: Option<Result<T, E>>,
    after: After<T>,
    answer: tokio::sync::oneshot::Sender<Result<T, E>>,
}

impl<F, T, E> Operation for Write<F, T, E>
where
    F: Fn(&WriteTransaction) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<Unavailable> + Send + 'static,
{
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        // A bug in one write must not stop every later one.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| (self.f)(txn))).unwrap_or_else(|_| {
            tracing::error!("a storage operation panicked; it is refused, the others commit");
            Err(Unavailable("the storage operation failed unexpectedly".into()).into())
        });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), String>) {
        let Write { result, after, answer, .. } = *self;
        let result = match (result, committed) {
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Err(e)), _) => Err(e),
            (_, Err(why)) => Err(Unavailable(why).into()),
            (None, Ok(())) => Err(Unavailable("the write did not run".into()).into()),
        };
        after(result.as_ref().ok());
        let _ = answer.send(result);
    }
}

/// The file, its committer and its fault state.
pub struct RedbFile {
    shared: Arc<Shared>,
    /// `None` only while dropping.
    ops: Option<mpsc::Sender<Op>>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RedbFile {
    /// Stop the committer after the writes already sent, so the file is
    /// closed (and can be opened again) when this returns.
    fn drop(&mut self) {
        drop(self.ops.take());
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

struct Shared {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    fault: Mutex<Fault>,
}

#[derive(Default)]
struct Fault {
    /// Why writes were refused; reported until a probe write goes through.
    error: Option<String>,
    /// redb refuses every transaction until the file is reopened.
    needs_reopen: bool,
    last_reopen: Option<Instant>,
}

/// The file cannot be used now; the message says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl RedbFile {
    /// Open (or create) `path`; `init` runs once in a write transaction (to
    /// create tables). Starts the committer thread.
    pub fn open(
        path: &Path,
        init: impl Fn(&WriteTransaction) -> Result<(), Box<redb::TableError>>,
    ) -> Result<Arc<RedbFile>, String> {
        let db = create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| format!("{}: {e}", path.display()))?;
        init(&txn).map_err(|e| format!("{}: {e}", path.display()))?;
        txn.commit().map_err(|e| format!("{}: {e}", path.display()))?;
        let shared = Arc::new(Shared { path: path.to_path_buf(), db: RwLock::new(Some(db)), fault: Mutex::default() });
        let (tx, rx) = mpsc::channel::<Op>();
        let committer = shared.clone();
        let committer = std::thread::Builder::new()
            .name("redb-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| format!("cannot start the committer: {e}"))?;
        Ok(Arc::new(RedbFile { shared, ops: Some(tx), committer: Some(committer) }))
    }

    /// Why writes are refused now, if they are.
    pub fn fault_reason(&self) -> Option<String> {
        self.shared.fault().error.clone()
    }

    /// Run `f` in the next batch's write transaction; its result once the
    /// batch is durably committed. `f` may run more than once (if another
    /// write of its batch fails, the batch runs again without that one), so
    /// it takes what it needs by reference.
    pub async fn write<T, E>(&self, f: impl Fn(&WriteTransaction) -> Result<T, E> + Send + 'static) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<Unavailable> + Send + 'static,
    {
        self.write_then(f, |_| {}).await
    }

    /// `write`, then `after` on the committer once the write is settled
    /// (see `After`).
    pub async fn write_then<T, E>(
        &self,
        f: impl Fn(&WriteTransaction) -> Result<T, E> + Send + 'static,
        after: impl FnOnce(Option<&T>) + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<Unavailable> + Send + 'static,
    {
        let (answer, rx) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(Write { f, result: None, after: Box::new(after), answer });
        if let Some(Err(mpsc::SendError(op))) = self.ops.as_ref().map(|ops| ops.send(op)) {
            op.finish(Err("the committer has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| Err(Unavailable("the write was dropped".into()).into()))
    }

    /// Read on a snapshot. Blocking (cheap: mostly cached pages, but it
    /// waits while the file is reopened after a storage fault).
    pub fn read<T, E: From<Unavailable>>(&self, f: impl FnOnce(&Database) -> Result<T, E>) -> Result<T, E> {
        self.read_open(&self.shared.db.read().unwrap_or_else(|e| e.into_inner()), f)
    }

    /// `read`, or None while the file is being reopened after a storage
    /// fault, instead of waiting for it.
    pub fn try_read<T, E: From<Unavailable>>(&self, f: impl FnOnce(&Database) -> Result<T, E>) -> Option<Result<T, E>> {
        let guard = match self.shared.db.try_read() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(self.read_open(&guard, f))
    }

    fn read_open<T, E: From<Unavailable>>(
        &self,
        db: &Option<Database>,
        f: impl FnOnce(&Database) -> Result<T, E>,
    ) -> Result<T, E> {
        let Some(db) = db.as_ref() else {
            let why = self.fault_reason().unwrap_or_else(|| "closed".into());
            return Err(Unavailable(format!("{}: {why}", self.shared.path.display())).into());
        };
        f(db)
    }

    /// For `/ready`: Ok only if the file takes writes. While faulted, a probe
    /// write of `PROBE_BYTES` (then its removal) tells whether the fault has
    /// cleared; only it clears the fault.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        if self.fault_reason().is_none() {
            return self.read(|db| db.begin_read().map(drop).map_err(|e| Unavailable(e.to_string())));
        }
        let fail = |e: &dyn std::fmt::Display| Unavailable(e.to_string());
        let probe = self
            .write(move |txn| {
                txn.open_table(HEALTH)
                    .and_then(|mut t| {
                        t.insert("probe", vec![0u8; PROBE_BYTES].as_slice()).map(drop).map_err(Into::into)
                    })
                    .map_err(|e| fail(&e))
            })
            .await;
        let removed = match probe {
            Ok(()) => {
                self.write(move |txn| {
                    txn.open_table(HEALTH)
                        .and_then(|mut t| t.remove("probe").map(drop).map_err(Into::into))
                        .map_err(|e| fail(&e))
                })
                .await
            }
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {
                if self.shared.fault().error.take().is_some() {
                    tracing::info!(path = %self.shared.path.display(), "storage fault cleared: writes go through again");
                }
                Ok(())
            }
            Err(Unavailable(e)) => {
                Err(Unavailable(format!("{}: storage fault, writes refused: {e}", self.shared.path.display())))
            }
        }
    }
}

impl Shared {
    fn fault(&self) -> std::sync::MutexGuard<'_, Fault> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The committer: batches, one transaction and one commit each.
    fn run(&self, ops: mpsc::Receiver<Op>) {
        while let Ok(first) = ops.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.reopen_if_needed();
            self.commit(batch);
        }
    }

    /// Run a batch in one transaction and commit it. A write that fails
    /// is answered with its error and the transaction is abandoned: the
    /// others run again without it, so nothing of a failed write is ever
    /// committed.
    fn commit(&self, mut batch: Vec<Op>) {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Some(db) = guard.as_ref() else {
            let why = self.fault().error.clone().unwrap_or_else(|| "closed".into());
            drop(guard);
            return finish(batch, &Err(format!("{}: {why}", self.path.display())));
        };
        while !batch.is_empty() {
            let txn = match db.begin_write() {
                Ok(txn) => txn,
                Err(e) => {
                    self.check(db);
                    drop(guard);
                    return finish(batch, &Err(format!("{}: {e}", self.path.display())));
                }
            };
            let ok: Vec<bool> = batch.iter_mut().map(|op| op.run(&txn)).collect();
            if ok.iter().all(|ok| *ok) {
                let committed = txn.commit().map_err(|e| format!("{}: {e}", self.path.display()));
                if committed.is_err() {
                    self.check(db);
                }
                drop(guard);
                return finish(batch, &committed);
            }
            if let Err(e) = txn.abort() {
                tracing::warn!(path = %self.path.display(), error = %e, "could not abandon a transaction");
            }
            let (failed, rest): (Vec<_>, Vec<_>) = batch.into_iter().zip(ok).partition(|(_, ok)| !ok);
            finish(failed.into_iter().map(|(op, _)| op).collect(), &Ok(()));
            batch = rest.into_iter().map(|(op, _)| op).collect();
        }
    }

    /// After a failed transaction: is the file faulted? (redb then refuses
    /// to begin another.)
    fn check(&self, db: &Database) {
        if let Err(e) = db.begin_write().map(drop) {
            let mut fault = self.fault();
            if fault.error.is_none() {
                tracing::error!(path = %self.path.display(), error = %e, "storage fault: writes are refused until it clears");
            }
            fault.error = Some(format!("storage fault: {e}"));
            fault.needs_reopen = true;
        }
    }

    /// Reopen a file redb refuses to use (repairing it), at most once per
    /// REOPEN_EVERY. Runs on the committer, so no write is in progress.
    fn reopen_if_needed(&self) {
        {
            let mut fault = self.fault();
            if !fault.needs_reopen || fault.last_reopen.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return;
            }
            fault.last_reopen = Some(Instant::now());
        }
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Close first: redb holds a lock on the file while it is open.
        drop(guard.take());
        match create(&self.path) {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), "reopened the file after a storage fault");
                *guard = Some(db);
                self.fault().needs_reopen = false;
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen the file yet");
                self.fault().error = Some(format!("storage fault; reopening failed: {e}"));
            }
        }
    }
}

/// Answer every operation of a batch: committed, or why not (a failed
/// write keeps its own error).
fn finish(batch: Vec<Op>, committed: &Result<(), String>) {
    for op in batch {
        op.finish(committed.clone());
    }
}

/// redb's page cache, in bytes. redb's default (1 GiB) lets the process
/// grow with the file; the kernel's page cache holds the rest.
const CACHE_BYTES: usize = 32 << 20;

/// Open or create the file at `path` with the service's settings.
fn create(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

/// Open the embedded backends' file in `dir`, creating every table (see
/// `store::embedded` and `queue::embedded` for their layouts) and taking
/// over the files of earlier versions (their jobs only with `embedded_queue`;
/// with Redis as the queue, an old `queue.redb` is left alone). Files of an
/// earlier version next to `crm.redb` mean that version ran here after this
/// one: that is refused, with what to do.
pub fn open_embedded(dir: &Path, embedded_queue: bool) -> Result<Arc<RedbFile>, String> {
    use crate::queue::embedded::{DEAD, JOB_STATE, JOBS, PAUSED};
    use crate::store::embedded::{DEDUPE, HEADS, RECEIPTS, UNQUEUED};
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("crm.redb");
    let old_receipts = dir.join("receipts.redb");
    let old_queue = dir.join("queue.redb");
    if path.exists() {
        for old in [&old_receipts, &old_queue] {
            if old.exists() && (old == &old_receipts || embedded_queue) {
                return Err(format!(
                    "{} holds both crm.redb and {} (an earlier version ran here after this one took its files over): \
                     move {} away, or merge by hand, then start again",
                    dir.display(),
                    old.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                    old.display()
                ));
            }
        }
    }
    if !path.exists() && old_receipts.exists() {
        std::fs::rename(&old_receipts, &path)
            .map_err(|e| format!("cannot take over {}: {e}", old_receipts.display()))?;
        tracing::info!(from = %old_receipts.display(), to = %path.display(), "took over the receipts of an earlier version");
    }
    let import = if embedded_queue && old_queue.exists() { Some(read_old_queue(&old_queue)?) } else { None };
    let file = RedbFile::open(&path, |txn| {
        txn.open_table(RECEIPTS).map_err(Box::new)?;
        txn.open_table(HEADS).map_err(Box::new)?;
        txn.open_table(DEDUPE).map_err(Box::new)?;
        txn.open_table(UNQUEUED).map_err(Box::new)?;
        txn.open_table(JOB_STATE).map_err(Box::new)?;
        txn.open_table(PAUSED).map_err(Box::new)?;
        let mut jobs = txn.open_table(JOBS).map_err(Box::new)?;
        let mut dead = txn.open_table(DEAD).map_err(Box::new)?;
        for (live, key, value) in import.iter().flatten() {
            let table = if *live { &mut jobs } else { &mut dead };
            table.insert(key.as_str(), value.as_slice()).map_err(|e| Box::new(redb::TableError::Storage(e)))?;
        }
        Ok(())
    })?;
    if import.is_some() {
        let moved = old_queue.with_extension("redb.migrated");
        std::fs::rename(&old_queue, &moved).map_err(|e| format!("cannot set {} aside: {e}", old_queue.display()))?;
        tracing::info!(from = %old_queue.display(), "took over the jobs and dead letters of an earlier version");
    }
    Ok(file)
}

/// Every (live?, id, value) of an earlier version's `queue.redb`.
fn read_old_queue(path: &Path) -> Result<Vec<(bool, String, Vec<u8>)>, String> {
    use crate::queue::embedded::{DEAD, JOBS};
    let fail = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    let db = Database::open(path).map_err(|e| fail(&e))?;
    let txn = db.begin_read().map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    for (live, def) in [(true, JOBS), (false, DEAD)] {
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(fail(&e)),
        };
        for entry in table.iter().map_err(|e| fail(&e))? {
            let (k, v) = entry.map_err(|e| fail(&e))?;
            out.push((live, k.value().to_string(), v.value().to_vec()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::JobQueue;
    use crate::queue::embedded::{DEAD, EmbeddedQueue, JOBS};
    use crate::store::embedded::{EmbeddedStore, RECEIPTS};
    use crate::store::{AttemptRecord, DeliveryState, ListQuery, ReceiptStore};

    fn write_file(path: &Path, table: TableDefinition<&str, &[u8]>, rows: &[(&str, serde_json::Value)]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            for (key, value) in rows {
                t.insert(*key, serde_json::to_vec(value).unwrap().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// A write that fails after writing, or panics, leaves nothing behind,
    /// and the writes batched with it still commit.
    #[tokio::test]
    async fn a_failed_write_in_a_batch_commits_nothing_of_its_own() {
        const T: TableDefinition<&str, &[u8]> = TableDefinition::new("t");
        let dir = tempfile::tempdir().unwrap();
        let file =
            RedbFile::open(&dir.path().join("t.redb"), |txn| txn.open_table(T).map(drop).map_err(Box::new)).unwrap();
        let put = |key: &'static str| {
            move |txn: &WriteTransaction| {
                txn.open_table(T).unwrap().insert(key, b"x".as_slice()).unwrap();
                Ok::<_, Unavailable>(())
            }
        };
        // Keep the committer busy so the next three land in one batch.
        let busy = file.write(|_txn| {
            std::thread::sleep(Duration::from_millis(200));
            Ok::<_, Unavailable>(())
        });
        let fails = file.write(move |txn| -> Result<(), Unavailable> {
            put("failed")(txn)?;
            Err(Unavailable("refused after writing".into()))
        });
        let panics = file.write(move |txn| -> Result<(), Unavailable> {
            put("panicked")(txn)?;
            panic!("a bug in a write")
        });
        let fine = file.write(put("fine"));
        let (busy, fails, panics, fine) = tokio::join!(busy, fails, panics, fine);
        assert_eq!(busy, Ok(()));
        assert_eq!(fails, Err(Unavailable("refused after writing".into())));
        assert!(panics.is_err());
        assert_eq!(fine, Ok(()));
        let stored: Vec<String> = file
            .read(|db| {
                let txn = db.begin_read().unwrap();
                let t = txn.open_table(T).unwrap();
                Ok::<_, Unavailable>(t.iter().unwrap().map(|e| e.unwrap().0.value().to_string()).collect())
            })
            .unwrap();
        assert_eq!(stored, vec!["fine".to_string()]);
    }

    #[test]
    fn an_earlier_version_run_after_the_take_over_is_refused_plainly() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_embedded(dir.path(), true).unwrap());
        write_file(&dir.path().join("receipts.redb"), RECEIPTS, &[]);
        let refused = open_embedded(dir.path(), true).err().unwrap();
        assert!(refused.contains("holds both crm.redb and receipts.redb"), "{refused}");
        // An old queue file is no business of a host whose queue is Redis.
        std::fs::remove_file(dir.path().join("receipts.redb")).unwrap();
        write_file(&dir.path().join("queue.redb"), JOBS, &[]);
        assert!(open_embedded(dir.path(), false).is_ok());
        assert!(open_embedded(dir.path(), true).err().unwrap().contains("queue.redb"));
    }

    #[tokio::test]
    async fn the_files_of_an_earlier_version_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let event = serde_json::to_value(crate::event::Event {
            event_type: "deal_updated".into(),
            reference: "D-1".into(),
            status: "Qualified".into(),
            ..Default::default()
        })
        .unwrap();
        let receipt = serde_json::json!({
            "id": "r1", "provider": "crm", "event_type": "deal_updated", "reference": "D-1",
            "status": "Qualified", "request": {"headers": [], "body": "{}"},
            "event": event,
            "received_at_ms": 1, "updated_at_ms": 1, "jobs_enqueued": true,
            "actions": [{"destination": "meta-capi", "action": "Lead", "params": [], "state": "pending",
                "attempts": 0, "last_error": null, "last_status": null, "detail": null,
                "delivered_at_ms": null, "updated_at_ms": 1}]
        });
        write_file(&dir.path().join("receipts.redb"), RECEIPTS, &[("r1", receipt)]);
        let job = |id: &str| {
            serde_json::json!({
                "id": id, "receipt_id": "r1", "provider": "crm", "destination": "meta-capi", "action": "Lead",
                "event": event,
                "idempotency_key": "k", "attempts": 1, "enqueued_at_ms": 1
            })
        };
        let queue_path = dir.path().join("queue.redb");
        write_file(
            &queue_path,
            JOBS,
            &[("r1/meta-capi/Lead", serde_json::json!({"job": job("r1/meta-capi/Lead"), "due_ms": 0}))],
        );
        {
            let db = Database::create(&queue_path).unwrap();
            let txn = db.begin_write().unwrap();
            let letter =
                serde_json::json!({"job": job("r0/brevo/Purchase"), "reason": "Brevo answered 400", "failed_at_ms": 5});
            txn.open_table(DEAD)
                .unwrap()
                .insert("r0/brevo/Purchase", serde_json::to_vec(&letter).unwrap().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }

        let file = open_embedded(dir.path(), true).unwrap();
        let store = EmbeddedStore::new(file.clone());
        assert_eq!(store.get("r1").await.unwrap().unwrap().reference, "D-1");
        // A receipt stored whole takes an outcome like any other.
        store.record_attempt("r1", AttemptRecord::delivered("meta-capi", "Lead")).await.unwrap();
        let listed = store.list(ListQuery { limit: 10, ..Default::default() }).await.unwrap().receipts;
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].reference.as_str(), listed[0].actions[0].state), ("D-1", DeliveryState::Delivered));
        assert!(listed[0].updated_at_ms > 1 && listed[0].jobs_enqueued);
        let queue = EmbeddedQueue::new(file).unwrap();
        let depth = queue.depth().await.unwrap();
        assert_eq!((depth.ready, depth.dead), (1, 1));
        assert_eq!(queue.dead_letters(10).await.unwrap()[0].reason, "Brevo answered 400");
        assert!(!queue_path.exists() && dir.path().join("queue.redb.migrated").exists());
        assert!(!dir.path().join("receipts.redb").exists());
    }
}
