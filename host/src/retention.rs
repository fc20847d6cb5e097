//! Retention: the store never grows without bound. In the background, in
//! batches (one short write each, so webhooks are never held up):
//! - receipts older than `RETENTION_DAYS` whose actions are all settled
//!   (delivered or failed) and that have not changed since are removed,
//!   with their dedupe keys: the same webhook sent again after that is a new
//!   receipt; receipts still waiting to deliver are kept;
//! - dead letters older than `RETENTION_DAYS` are removed;
//! - what the CRM sent (headers, body) and the request bodies in the attempt
//!   logs, which carry customers' details, are purged after
//!   `REQUEST_BODY_RETENTION_DAYS` (default: with the receipt). The
//!   normalized event stays, so a purged receipt can still be replayed.
//!
//! Every process that delivers runs it; on shared backends the work is
//! idempotent.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::App;
use crate::store::now_ms;
use crate::telemetry::RetentionLabels;

/// Receipts or dead letters per write.
const BATCH: usize = 500;
/// Receipts are kept this much longer than their dead letters (or a tenth
/// of their age, if less).
const RECEIPT_MARGIN: Duration = Duration::from_secs(60);

/// Sweep until `shutdown`: at start, then every twentieth of the shortest
/// retention age (between a second and ten minutes).
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let settings = app.config.retention;
    let Some(shortest) = [settings.receipts, settings.request_bodies].into_iter().flatten().min() else {
        return;
    };
    let every = (shortest / 20).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = sweep(&app) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass over everything past its age.
async fn sweep(app: &App) {
    let settings = app.config.retention;
    let now = now_ms();
    let before = |age: Duration| now.saturating_sub(age.as_millis() as u64);
    // Dead letters before their receipts (a receipt is recorded just before
    // its job is dead-lettered: the margin keeps the letter from outliving
    // it); removals before the purge, which would rewrite what goes anyway.
    let work = [
        settings.receipts.map(|age| Work::RemoveDeadLetters(before(age))),
        settings.receipts.map(|age| Work::RemoveReceipts(before(age + (age / 10).min(RECEIPT_MARGIN)))),
        settings.request_bodies.map(|age| Work::PurgeRequests(before(age))),
    ];
    for work in work.into_iter().flatten() {
        let done = work.all(app).await;
        if done > 0 {
            tracing::info!(what = work.what(), done, "retention: removed or purged what is past its age");
        }
    }
}

/// One kind of retention work, for what is older than the time it holds.
#[derive(Clone, Copy)]
enum Work {
    PurgeRequests(u64),
    RemoveReceipts(u64),
    RemoveDeadLetters(u64),
}

impl Work {
    fn what(self) -> &'static str {
        match self {
            Work::PurgeRequests(_) => "request_bodies",
            Work::RemoveReceipts(_) => "receipts",
            Work::RemoveDeadLetters(_) => "dead_letters",
        }
    }

    async fn batch(self, app: &App) -> Result<usize, String> {
        match self {
            Work::PurgeRequests(before) => app.store.purge_requests(before, BATCH).await.map_err(|e| e.to_string()),
            Work::RemoveReceipts(before) => app.store.remove_expired(before, BATCH).await.map_err(|e| e.to_string()),
            Work::RemoveDeadLetters(before) => {
                app.queue.remove_dead_before(before, BATCH).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Batches until one finds nothing more, counted; how many in all. A
    /// failure is logged, and the next sweep goes on.
    async fn all(self, app: &App) -> usize {
        let mut total = 0;
        loop {
            match self.batch(app).await {
                Ok(0) => return total,
                Ok(n) => {
                    total += n;
                    app.metrics
                        .retention_removed
                        .get_or_create(&RetentionLabels { what: self.what() })
                        .inc_by(n as u64);
                    tokio::task::yield_now().await;
                }
                Err(error) => {
                    tracing::warn!(what = self.what(), %error, "retention could not finish; the next sweep goes on");
                    return total;
                }
            }
        }
    }
}
