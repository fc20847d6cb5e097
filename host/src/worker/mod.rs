//! Workers: take a job, run its destination plugin, record the outcome on
//! the receipt, then acknowledge, schedule a retry, or dead-letter it.
//!
//! The order matters: the outcome is recorded before the queue is told, so
//! a crash in between only repeats a delivery (which the downstream
//! idempotency key absorbs), never loses one.
//!
//! Attempts: the queue counts an attempt durably before the worker gets the
//! job, so a job that takes the host down (a poison job) spends its budget
//! like any other and is dead-lettered, instead of taking hosts down one
//! after another. Failures that are neither the downstream's nor the
//! plugin's (the destination not loaded during a redeploy, no free plugin
//! instance, the receipt store down) give the attempt back: the job is put
//! off with backoff and spends nothing.

pub mod breaker;
pub mod limits;
pub mod retry;
pub mod shadow;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::App;
use crate::plugins::{Compared, DeliveryRequest, Outcome, PluginError, Status};
use crate::queue::{Job, Reserved, Settle};
use crate::store::{
    AttemptRecord, DeliveryState, LoggedAttempt, LoggedRequest, MAX_LOGGED_REQUESTS, StoreError, now_ms,
};
use breaker::Health;

/// How long a worker waits for a job before checking for shutdown.
const POLL: Duration = Duration::from_secs(1);
/// Back-off when the queue or store is down.
const OUTAGE_PAUSE: Duration = Duration::from_secs(1);
/// Longest wait for a destination's limit to give a job its turn.
const TURN_WAIT: Duration = Duration::from_secs(5);

/// Why no attempt was made; it does not count. (What an attempt that was
/// made came to is the plugin's `Outcome`; a plugin that failed on its own
/// counts as `Outcome::Retryable`.)
#[derive(Debug)]
enum NotMade {
    /// The host could not make it: the destination not loaded, no free
    /// plugin instance. Put off with backoff.
    Defer { reason: String },
    /// Not now: the destination's limit holds it back (or it was paused
    /// while the job waited for its turn). The queue alone is told.
    Later { reason: String, after: Duration },
}

/// Start `config.workers` workers, and the circuit breaker's prober; they
/// stop when `shutdown` turns true, the workers finishing the job in hand.
pub fn spawn(app: Arc<App>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut tasks: Vec<JoinHandle<()>> = (0..app.config.workers)
        .map(|n| {
            let app = app.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run(app, n, shutdown).await })
        })
        .collect();
    tasks.push(tokio::spawn(breaker::probe(app, shutdown)));
    tasks
}

async fn run(app: Arc<App>, worker: usize, shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Not cut short at shutdown: a reservation half made could leave
        // the job held, its attempt counted without having run.
        match app.queue.reserve(POLL).await {
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
pub async fn process(app: &App, reserved: Reserved) {
    let job = &reserved.job;
    let span = tracing::info_span!(
        "delivery",
        receipt_id = %job.receipt_id,
        provider = %job.provider,
        destination = %job.destination,
        action = %job.action,
        attempt = job.attempts
    );
    async move {
        let used = reserved.job.attempts.saturating_sub(reserved.job.budget_start);
        if used > app.config.retry.max_attempts {
            // The last attempt the budget allowed never finished: the host
            // stopped during it. Do not run it again.
            let reason = format!(
                "gave up after {} attempts: {} of them never finished (the host stopped while running them)",
                used - 1,
                reserved.job.interrupted
            );
            dead_letter(app, reserved, None, reason, true, None).await;
            return;
        }
        let (outcome, logged) = match attempt_delivery(app, &reserved.job).await {
            Ok(made) => made,
            Err(not_made) => return put_back(app, reserved, not_made).await,
        };
        let (health, reason) = match &outcome {
            Outcome::Delivered { .. } => (Health::Up, String::new()),
            Outcome::Retryable { reason, .. } => (Health::Failing, reason.clone()),
            Outcome::Permanent { .. } => (Health::Answering, String::new()),
        };
        let (destination, probe) = (reserved.job.destination.clone(), reserved.probe);
        settle(app, reserved, outcome, logged).await;
        app.breaker.observe(app, &destination, probe, health, &reason).await;
    }
    .instrument(span)
    .await
}

/// Make one attempt: its outcome, and the attempt as the receipt's log
/// keeps it; or why none was made.
async fn attempt_delivery(app: &App, job: &Job) -> Result<(Outcome, LoggedAttempt), NotMade> {
    // One look at what is loaded serves the whole attempt.
    let plugins = app.plugins.snapshot();
    let Some(plugin) = plugins.live_destination(&job.destination) else {
        let reason = format!("no destination plugin named {:?} is loaded", job.destination);
        return Err(NotMade::Defer { reason });
    };
    // Long enough for a slot to free, short of a Redis job's visibility timeout.
    let max_wait = TURN_WAIT.min(app.config.visibility_timeout / 4);
    let limits = app.routes().limits(&job.destination);
    let turn = match app.limiter.turn(&job.destination, limits, max_wait).await {
        Ok(turn) => turn,
        Err(after) => {
            let reason = format!("{} is at its limit ({limits:?})", job.destination);
            return Err(NotMade::Later { reason, after });
        }
    };
    if turn.waited && app.queue.paused().await.is_ok_and(|p| p.iter().any(|p| p.destination == job.destination)) {
        let reason = format!("{} was paused while the job waited for its turn", job.destination);
        return Err(NotMade::Later { reason, after: Duration::ZERO });
    }
    let started_at_ms = now_ms();
    let started = Instant::now();
    let request = || DeliveryRequest {
        event: &job.event,
        action: &job.action,
        params: &job.params,
        receipt_id: &job.receipt_id,
        provider: &job.provider,
        attempt: job.attempts,
        idempotency_key: &job.idempotency_key,
    };
    let candidate = plugins.shadow_of(&job.destination);
    let compared = if candidate.is_some() { Compared::Live } else { Compared::No };
    let (result, requests) = plugin.deliver_with(request(), compared).await;
    let took = started.elapsed();
    drop(turn);
    app.metrics.plugin_call(plugin.name(), took);
    let shadow = match candidate {
        Some(candidate) if result.as_ref().is_ok() || result.as_ref().is_err_and(PluginError::is_plugins_fault) => {
            Some(shadow::compare(app, plugin, candidate, request(), &result, &requests).await)
        }
        _ => None,
    };
    let outcome_name = shadow::outcome_name(&result);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            app.metrics
                .plugin_failures
                .get_or_create(&crate::telemetry::PluginFailureLabels {
                    plugin: plugin.name().to_string(),
                    kind: e.kind(),
                })
                .inc();
            if !e.is_plugins_fault() {
                // The host could not run it (no free instance): no attempt.
                return Err(NotMade::Defer { reason: e.to_string() });
            }
            Outcome::Retryable { status: None, reason: e.to_string(), retry_after: None }
        }
    };
    let (status, detail) = (outcome.status(), outcome.text().to_string());
    // The plugin's own text (detail, reason) is redacted already; what it
    // sent and got back is redacted here, before it is stored.
    let redact = |text: &str| plugin.config.redact_excerpt(text);
    let logged = LoggedAttempt {
        attempt: job.attempts,
        started_at_ms,
        duration_ms: took.as_millis() as u64,
        plugin_version: plugin.manifest.version.to_string(),
        plugin_digest: plugin.digest.clone(),
        outcome: outcome_name.to_string(),
        status,
        detail,
        requests_omitted: requests.len().saturating_sub(MAX_LOGGED_REQUESTS) as u32,
        requests: requests
            .into_iter()
            .take(MAX_LOGGED_REQUESTS)
            .map(|r| LoggedRequest {
                method: r.method,
                url: redact(&r.url),
                body_excerpt: redact(&r.body),
                body_bytes: r.body_bytes,
                denied: r.denied.map(|d| redact(&d)),
                response_status: r.response_status,
                response_excerpt: r.response_excerpt.map(|e| redact(&e)),
                error: r.error.map(|e| redact(&e)),
            })
            .collect(),
        shadow,
    };
    Ok((outcome, logged))
}

/// Record an attempt's outcome on the receipt, then acknowledge the job,
/// schedule its retry or dead-letter it, as the retry policy says.
async fn settle(app: &App, reserved: Reserved, outcome: Outcome, logged: LoggedAttempt) {
    let policy = app.config.retry;
    let job = &reserved.job;
    let used = job.attempts.saturating_sub(job.budget_start);
    match outcome {
        Outcome::Delivered { status, detail } => {
            let mut record = attempt_record(job, DeliveryState::Delivered, status, None, Some(detail.clone()));
            record.log = Some(logged);
            if !record_and_settle(app, &reserved, record, Settle::Ack).await {
                return;
            }
            app.metrics.delivery(&job.destination, "delivered");
            let latency = now_ms().saturating_sub(job.queued_at_ms());
            app.metrics
                .delivery_latency
                .get_or_create(&crate::telemetry::DestinationLabels { destination: job.destination.clone() })
                .observe(latency as f64 / 1000.0);
            tracing::info!(status = %Status(status), %detail, "delivered");
        }
        Outcome::Retryable { status, reason, retry_after } if policy.may_retry(used) => {
            let delay = policy.delay(used, retry_after, fastrand::f64());
            let mut record = attempt_record(job, DeliveryState::Retrying, status, Some(reason.clone()), None);
            record.log = Some(logged);
            if !record_and_settle(app, &reserved, record, Settle::Retry(delay)).await {
                return;
            }
            app.metrics.delivery(&job.destination, "retry");
            tracing::warn!(status = %Status(status), %reason, retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
        }
        Outcome::Retryable { status, reason, .. } => {
            let reason = format!("gave up after {used} attempts: {reason}");
            dead_letter(app, reserved, status, reason, false, Some(logged)).await;
        }
        Outcome::Permanent { status, reason } => {
            dead_letter(app, reserved, status, reason, false, Some(logged)).await;
        }
    }
}

/// Give back a job no attempt was made for: its attempt does not count.
async fn put_back(app: &App, reserved: Reserved, not_made: NotMade) {
    let job = &reserved.job;
    match not_made {
        NotMade::Defer { reason } => {
            let mut record = attempt_record(job, DeliveryState::Retrying, None, Some(reason.clone()), None);
            record.attempts -= 1;
            let (later, delay) = put_off(app, &reserved);
            match try_record_and_settle(app, later.clone(), record, Settle::Retry(delay)).await {
                Ok(()) => report_put_off(app, &later, delay, &reason),
                // Put off already: the queue alone is told.
                Err(StoreError::Unavailable(_)) => {
                    report_put_off(app, &later, delay, &reason);
                    tell_queue(app, later, Settle::Retry(delay)).await
                }
                Err(e) => unrecorded(app, reserved, e).await,
            }
        }
        NotMade::Later { reason, after } => {
            let mut later = reserved;
            later.job.attempts = later.job.attempts.saturating_sub(1);
            app.metrics.delivery(&later.job.destination, "deferred");
            tracing::debug!(%reason, retry_in_ms = after.as_millis() as u64, "delivery waits for its turn");
            tell_queue(app, later, Settle::Retry(after)).await;
        }
    }
}

/// The job as put off without spending its attempt, and when it is due,
/// backing off by how often it was put off.
fn put_off(app: &App, reserved: &Reserved) -> (Reserved, Duration) {
    let mut later = reserved.clone();
    let job = &mut later.job;
    job.attempts = job.attempts.saturating_sub(1);
    job.deferrals += 1;
    let delay = app.config.retry.delay(job.deferrals, None, fastrand::f64()).max(OUTAGE_PAUSE);
    (later, delay)
}

/// Count and log a job put off (once it is, not before).
fn report_put_off(app: &App, later: &Reserved, delay: Duration, reason: &str) {
    let job = &later.job;
    app.metrics.delivery(&job.destination, "deferred");
    tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, deferrals = job.deferrals, "delivery put off; the attempt does not count");
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
        replay: false,
        log: None,
    }
}

/// Dead-letter a job (`interrupted`: its last attempt never finished, so
/// the receipt shows one fewer attempt made).
async fn dead_letter(
    app: &App,
    reserved: Reserved,
    status: Option<u16>,
    reason: String,
    interrupted: bool,
    logged: Option<LoggedAttempt>,
) {
    let mut record = attempt_record(&reserved.job, DeliveryState::Failed, status, Some(reason.clone()), None);
    record.log = logged;
    if interrupted {
        record.attempts -= 1;
    }
    if record_and_settle(app, &reserved, record, Settle::Dead(reason.clone())).await {
        app.metrics.delivery(&reserved.job.destination, "dead_letter");
        tracing::error!(status = %Status(status), %reason, "delivery failed permanently; dead-lettered");
    }
}

/// Record an attempt on the receipt, then settle the job as `how` says:
/// acknowledge it, requeue it for a retry, or dead-letter it. Whether the
/// outcome was recorded: if not, `unrecorded` has put the job off or
/// dead-lettered it instead.
async fn record_and_settle(app: &App, reserved: &Reserved, attempt: AttemptRecord, how: Settle) -> bool {
    match try_record_and_settle(app, reserved.clone(), attempt, how).await {
        Ok(()) => true,
        Err(e) => {
            unrecorded(app, reserved.clone(), e).await;
            false
        }
    }
}

/// Record an attempt, then settle the job: in one transaction on the
/// embedded backends. The error is the store's; once the outcome is
/// recorded a queue fault only means the job may run again.
async fn try_record_and_settle(
    app: &App,
    reserved: Reserved,
    attempt: AttemptRecord,
    how: Settle,
) -> Result<(), StoreError> {
    if let Some(joint) = &app.joint {
        return joint.record_and_settle(reserved, attempt, how).await;
    }
    app.store.record_attempt(&reserved.job.receipt_id, attempt).await?;
    if let Err(e) = app.queue.settle(reserved, how).await {
        tracing::error!(error = %e, "the outcome is recorded, but the queue could not be told; the job may run again");
    }
    Ok(())
}

/// The outcome could not be recorded, and must not be lost: while the
/// store is down the job is put off (the host's failure, so the attempt
/// does not count) and runs again later; if the receipt is gone or
/// unreadable, no retry can help and the job is dead-lettered with the
/// reason.
async fn unrecorded(app: &App, reserved: Reserved, error: StoreError) {
    let (reserved, how) = match error {
        StoreError::NotFound(_) | StoreError::Corrupt(_) => {
            let reason = format!("the receipt cannot record this job's outcome: {error}");
            tracing::error!(%reason, "dead-lettering the job");
            (reserved, Settle::Dead(reason))
        }
        StoreError::Unavailable(_) => {
            let (later, delay) = put_off(app, &reserved);
            report_put_off(app, &later, delay, &format!("could not record the delivery outcome: {error}"));
            (later, Settle::Retry(delay))
        }
    };
    tell_queue(app, reserved, how).await;
}

/// Settle a job in the queue only (its outcome could not be recorded).
async fn tell_queue(app: &App, reserved: Reserved, how: Settle) {
    if let Err(e) = app.queue.settle(reserved, how).await {
        tracing::error!(error = %e, "could not settle the job either; it runs again when the queue recovers");
    }
}
