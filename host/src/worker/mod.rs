//! Workers: take a job, run its destination plugin, record the outcome on
//! the receipt, then acknowledge, schedule a retry, or dead-letter it.
//!
//! The order matters: the outcome is recorded before the queue is told, so
//! a crash in between only repeats a delivery (which the downstream
//! idempotency key absorbs), never loses one.

pub mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::App;
use crate::plugins::{DeliveryRequest, Outcome, PluginError};
use crate::queue::{Job, idempotency_key};
use crate::store::{AttemptRecord, DeliveryState, Receipt, StoreError, now_ms};

/// How long a worker waits for a job before checking for shutdown.
const POLL: Duration = Duration::from_secs(1);
/// Back-off when the queue or store is down.
const OUTAGE_PAUSE: Duration = Duration::from_secs(1);

/// What one attempt came to, before the retry policy has its say.
#[derive(Debug)]
enum Verdict {
    Delivered { status: Option<u16>, detail: String },
    Retry { status: Option<u16>, reason: String, retry_after: Option<Duration> },
    Permanent { status: Option<u16>, reason: String },
}

/// The jobs for a receipt's actions not yet attempted (a re-enqueue after a
/// lost `mark_enqueued` must not resend what was delivered meanwhile).
pub fn jobs_for(receipt: &Receipt) -> Vec<Job> {
    let status_key = receipt.event.status_key();
    receipt
        .actions
        .iter()
        .filter(|a| a.state == DeliveryState::Pending && a.attempts == 0)
        .map(|a| Job {
            id: Job::id_for(&receipt.id, &a.destination, &a.action),
            receipt_id: receipt.id.clone(),
            provider: receipt.provider.clone(),
            destination: a.destination.clone(),
            action: a.action.clone(),
            params: a.params.clone(),
            event: receipt.event.clone(),
            idempotency_key: idempotency_key(
                &receipt.provider,
                &receipt.reference,
                &status_key,
                &a.destination,
                &a.action,
            ),
            attempts: 0,
            budget_start: 0,
            enqueued_at_ms: receipt.received_at_ms,
            lease: None,
        })
        .collect()
}

/// Queue the jobs of receipts accepted but never confirmed queued (a crash
/// or queue outage between the two writes). Enqueueing is idempotent.
pub async fn recover_unqueued(app: &App) {
    let receipts = match app.store.unqueued().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "could not look for receipts with unqueued jobs");
            return;
        }
    };
    for receipt in receipts {
        match app.queue.enqueue(jobs_for(&receipt)).await {
            Ok(()) => {
                if let Err(e) = app.store.mark_enqueued(&receipt.id).await {
                    tracing::warn!(receipt_id = %receipt.id, error = %e, "jobs queued but receipt not marked");
                }
                tracing::info!(receipt_id = %receipt.id, "queued the jobs of a receipt accepted before a restart");
            }
            Err(e) => tracing::error!(receipt_id = %receipt.id, error = %e, "could not queue recovered jobs"),
        }
    }
}

/// Start `config.workers` workers; they stop when `shutdown` turns true,
/// finishing the job in hand.
pub fn spawn(app: Arc<App>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    (0..app.config.workers)
        .map(|n| {
            let app = app.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run(app, n, shutdown).await })
        })
        .collect()
}

async fn run(app: Arc<App>, worker: usize, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let reserved = tokio::select! {
            r = app.queue.reserve(POLL) => r,
            _ = shutdown.changed() => return,
        };
        match reserved {
            Ok(Some(job)) => process(&app, job).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(worker, error = %e, "cannot reserve jobs; pausing");
                tokio::time::sleep(OUTAGE_PAUSE).await;
            }
        }
    }
}

/// Run one attempt of one job and settle it.
pub async fn process(app: &App, mut job: Job) {
    let attempt = job.attempts + 1;
    let span = tracing::info_span!(
        "delivery",
        receipt_id = %job.receipt_id,
        provider = %job.provider,
        destination = %job.destination,
        action = %job.action,
        attempt
    );
    async move {
        let verdict = attempt_delivery(app, &job, attempt).await;
        job.attempts = attempt;
        settle(app, job, verdict).await;
    }
    .instrument(span)
    .await
}

async fn attempt_delivery(app: &App, job: &Job, attempt: u32) -> Verdict {
    let Some(plugin) = app.plugins.destination(&job.destination) else {
        return Verdict::Retry {
            status: None,
            reason: format!("no destination plugin named {:?} is loaded", job.destination),
            retry_after: None,
        };
    };
    let started = Instant::now();
    let (result, _requests) = plugin
        .deliver(DeliveryRequest {
            event: &job.event,
            action: &job.action,
            params: &job.params,
            receipt_id: &job.receipt_id,
            provider: &job.provider,
            attempt,
            idempotency_key: &job.idempotency_key,
        })
        .await;
    app.metrics.plugin_call(plugin.name(), started.elapsed());
    match result {
        Ok(Outcome::Delivered { status, detail }) => Verdict::Delivered { status, detail },
        Ok(Outcome::Retryable { status, reason, retry_after }) => Verdict::Retry { status, reason, retry_after },
        Ok(Outcome::Permanent { status, reason }) => Verdict::Permanent { status, reason },
        Err(e) => {
            let kind = match &e {
                PluginError::TimeLimit { .. } => "time_limit",
                PluginError::MemoryLimit { .. } => "memory_limit",
                PluginError::Trap { .. } => "trap",
                PluginError::Instantiate { .. } => "instantiate",
                PluginError::WrongKind { .. } => "wrong_kind",
            };
            app.metrics
                .plugin_failures
                .get_or_create(&crate::telemetry::PluginFailureLabels { plugin: plugin.name().to_string(), kind })
                .inc();
            Verdict::Retry { status: None, reason: e.to_string(), retry_after: None }
        }
    }
}

/// Record the verdict on the receipt, then tell the queue.
async fn settle(app: &App, job: Job, verdict: Verdict) {
    let policy = app.config.retry;
    let used = job.attempts.saturating_sub(job.budget_start);
    match verdict {
        Verdict::Delivered { status, detail } => {
            if !recorded(app, &job, attempt_record(&job, DeliveryState::Delivered, status, None, Some(detail.clone())))
                .await
            {
                return;
            }
            if let Err(e) = app.queue.ack(&job).await {
                tracing::warn!(error = %e, "delivered and recorded, but the ack failed; the job may run again");
            }
            app.metrics.delivery(&job.destination, "delivered");
            let latency = now_ms().saturating_sub(job.enqueued_at_ms);
            app.metrics
                .delivery_latency
                .get_or_create(&crate::telemetry::DestinationLabels { destination: job.destination.clone() })
                .observe(latency as f64 / 1000.0);
            tracing::info!(?status, %detail, "delivered");
        }
        Verdict::Retry { status, reason, retry_after } if policy.may_retry(used) => {
            let delay = policy.delay(used, retry_after, fastrand::f64());
            if !recorded(app, &job, attempt_record(&job, DeliveryState::Retrying, status, Some(reason.clone()), None))
                .await
            {
                return;
            }
            app.metrics.delivery(&job.destination, "retry");
            tracing::warn!(?status, %reason, retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
            if let Err(e) = app.queue.retry(job, delay).await {
                tracing::error!(error = %e, "could not schedule the retry; the job will run again when the queue recovers");
            }
        }
        Verdict::Retry { status, reason, .. } => {
            let reason = format!("gave up after {used} attempts: {reason}");
            dead_letter(app, job, status, reason).await;
        }
        Verdict::Permanent { status, reason } => {
            dead_letter(app, job, status, reason).await;
        }
    }
}

fn attempt_record(
    job: &Job,
    state: DeliveryState,
    status: Option<u16>,
    error: Option<String>,
    detail: Option<String>,
) -> AttemptRecord {
    AttemptRecord {
        destination: job.destination.clone(),
        action: job.action.clone(),
        state,
        attempts: job.attempts,
        error,
        status,
        detail,
    }
}

async fn dead_letter(app: &App, job: Job, status: Option<u16>, reason: String) {
    if !recorded(app, &job, attempt_record(&job, DeliveryState::Failed, status, Some(reason.clone()), None)).await {
        return;
    }
    app.metrics.delivery(&job.destination, "dead_letter");
    tracing::error!(?status, %reason, "delivery failed permanently; dead-lettered");
    if let Err(e) = app.queue.dead_letter(job, reason).await {
        tracing::error!(error = %e, "could not dead-letter the job; it will run again when the queue recovers");
    }
}

/// Record an attempt. If that fails the outcome must not be lost: while the
/// store is down the job runs again later on its retry schedule (the attempt
/// counts, so an outage is not a tight loop of repeated deliveries); if the
/// receipt is gone or unreadable, no retry can help and the job is
/// dead-lettered with the reason. Reports whether it was recorded.
async fn recorded(app: &App, job: &Job, attempt: AttemptRecord) -> bool {
    let error = match app.store.record_attempt(&job.receipt_id, attempt).await {
        Ok(()) => return true,
        Err(e) => e,
    };
    match error {
        StoreError::NotFound(_) | StoreError::Corrupt(_) => {
            let reason = format!("the receipt cannot record this job's outcome: {error}");
            tracing::error!(%reason, "dead-lettering the job");
            if let Err(e) = app.queue.dead_letter(job.clone(), reason).await {
                tracing::error!(error = %e, "could not dead-letter the job either");
            }
        }
        StoreError::Unavailable(_) => {
            let policy = app.config.retry;
            let used = job.attempts.saturating_sub(job.budget_start);
            let delay = policy.delay(used, None, fastrand::f64()).max(OUTAGE_PAUSE);
            tracing::error!(error = %error, retry_in_ms = delay.as_millis() as u64, "could not record the delivery outcome; the job will run again");
            if let Err(e) = app.queue.retry(job.clone(), delay).await {
                tracing::error!(error = %e, "could not put the job back either; it runs again when the queue recovers");
            }
        }
    }
    false
}
