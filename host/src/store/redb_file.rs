//! One redb file of the embedded backends (`receipts.redb`, `queue.redb`),
//! kept usable through storage faults.
//!
//! After an I/O error (a full disk, say) redb refuses every later
//! transaction until the database is reopened. So a failed transaction is
//! followed by a check; if the file is faulted, the fault is recorded (and
//! reported by `ping`, which `/ready` calls), and the next use reopens the
//! file, at most once a second, which repairs it. The fault clears only when
//! a write commits again: while faulted, `ping` probes by writing (and then
//! removing) `PROBE_BYTES`, so `/ready` does not say all is well while a
//! receipt would still not fit.
//!
//! Every use holds a read lock on the open database for its duration (on a
//! blocking thread); a reopen takes the write lock, so it waits for uses in
//! progress and redb's file lock is free when the file is opened again.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, TableDefinition};

/// Least time between two attempts to reopen a faulted file.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Where a probe write goes.
const HEALTH: TableDefinition<&str, &[u8]> = TableDefinition::new("health");
/// How much a probe writes: room for about a hundred receipts, so a fault
/// that leaves only a sliver of space free is still reported.
const PROBE_BYTES: usize = 256 << 10;

/// A redb file and its fault state.
pub struct RedbFile {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    fault: Mutex<Fault>,
}

#[derive(Default)]
struct Fault {
    /// Why writes were refused; reported until a probe write of
    /// `PROBE_BYTES` goes through.
    error: Option<String>,
    /// redb refuses every transaction until the file is reopened.
    needs_reopen: bool,
    last_reopen: Option<Instant>,
}

/// The file cannot be used now; the message says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl RedbFile {
    /// Open (or create) the file; `init` runs once in a write transaction
    /// (to create tables).
    pub fn open(
        path: &Path,
        init: impl Fn(&redb::WriteTransaction) -> Result<(), Box<redb::TableError>>,
    ) -> Result<RedbFile, String> {
        let db = Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| format!("{}: {e}", path.display()))?;
        init(&txn).map_err(|e| format!("{}: {e}", path.display()))?;
        txn.commit().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(RedbFile { path: path.to_path_buf(), db: RwLock::new(Some(db)), fault: Mutex::default() })
    }

    fn fault(&self) -> std::sync::MutexGuard<'_, Fault> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why writes are refused now, if they are.
    pub fn fault_reason(&self) -> Option<String> {
        self.fault().error.clone()
    }

    /// Run a read transaction's work. Blocking.
    pub fn read<T, E: From<Unavailable>>(&self, f: impl FnOnce(&Database) -> Result<T, E>) -> Result<T, E> {
        self.run(f)
    }

    /// Run work that writes (and commits). Blocking.
    pub fn write<T, E: From<Unavailable>>(&self, f: impl FnOnce(&Database) -> Result<T, E>) -> Result<T, E> {
        self.run(f)
    }

    fn run<T, E: From<Unavailable>>(&self, f: impl FnOnce(&Database) -> Result<T, E>) -> Result<T, E> {
        self.reopen_if_needed();
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Some(db) = guard.as_ref() else {
            let why = self.fault_reason().unwrap_or_else(|| "closed".into());
            return Err(Unavailable(format!("{}: {why}", self.path.display())).into());
        };
        let result = f(db);
        if result.is_err() {
            self.check(db);
        }
        result
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
    /// REOPEN_EVERY.
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
        match Database::create(&self.path) {
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

    /// For `/ready`: Ok only if the file takes writes. While faulted, a probe
    /// write of `PROBE_BYTES` tells whether the fault has cleared; only it
    /// clears the fault.
    pub fn ping(&self) -> Result<(), Unavailable> {
        if self.fault_reason().is_none() {
            return self.read(|db| db.begin_read().map(drop).map_err(|e| Unavailable(e.to_string())));
        }
        self.write(|db| {
            let fail = |e: &dyn std::fmt::Display| Unavailable(e.to_string());
            for value in [Some(vec![0u8; PROBE_BYTES]), None] {
                let txn = db.begin_write().map_err(|e| fail(&e))?;
                {
                    let mut table = txn.open_table(HEALTH).map_err(|e| fail(&e))?;
                    match &value {
                        Some(bytes) => table.insert("probe", bytes.as_slice()).map(drop),
                        None => table.remove("probe").map(drop),
                    }
                    .map_err(|e| fail(&e))?;
                }
                txn.commit().map_err(|e| fail(&e))?;
            }
            Ok(())
        })
        .map(|()| {
            if self.fault().error.take().is_some() {
                tracing::info!(path = %self.path.display(), "storage fault cleared: writes go through again");
            }
        })
        .map_err(|Unavailable(e)| Unavailable(format!("{}: storage fault, writes refused: {e}", self.path.display())))
    }
}
