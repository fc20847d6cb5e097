//! Intake: one webhook request in, its events' receipts stored and their
//! jobs queued. The HTTP handler only translates HTTP around `accept`;
//! start-up recovery and replays queue jobs through `queue_jobs`, the one
//! place that does "enqueue, then mark queued".
//!
//! The flow: find the provider's source plugin → authenticate (the host's
//! `x-api-key` check, unless the source authenticates itself) → the plugin
//! parses the request into zero or more events → every event is checked →
//! per event: receipt stored (dedupe on provider, reference, status) and
//! its jobs queued. Success means every event's receipt and jobs are
//! durable; any storage failure is a 503, and the CRM's retry finishes the
//! batch (events already stored come back as duplicates).

use std::sync::Arc;

use serde::Serialize;

use crate::App;
use crate::plugins::manifest::Auth;
use crate::plugins::{IncomingRequest, LoadedPlugin, ParseFailure, PluginError, SourceLookup};
use crate::queue::{Job, QueueError, idempotency_key, order_key};
use crate::routing::ActionSpec;
use crate::store::{ActionRecord, AttemptRecord, DeliveryState, Inserted, Receipt, StoreError, StoredRequest};

/// Headers never stored, nor shown to a source the host authenticates.
pub const CREDENTIAL_HEADERS: [&str; 4] = ["x-api-key", "authorization", "cookie", "proxy-authorization"];

/// A batch's request body is stored with each of its receipts up to this
/// size, clipped beyond it (a single event keeps it whole).
const BATCH_BODY_KEPT: usize = 16 * 1024;

/// One event of an accepted webhook.
#[derive(Debug, Clone, Serialize)]
pub struct AcceptedEvent {
    pub receipt_id: String,
    /// True when this (provider, deal, status) was already received: nothing
    /// new is queued.
    pub duplicate: bool,
    pub reference: String,
    pub status: String,
    pub actions: Vec<ActionView>,
}

/// An action of an accepted event, as answered.
#[derive(Debug, Clone, Serialize)]
pub struct ActionView {
    pub destination: String,
    pub action: String,
    pub state: DeliveryState,
}

/// Why a webhook was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The host's key check failed (`x-api-key`).
    #[error("missing or invalid x-api-key")]
    KeyRefused,
    #[error("no source plugin named {provider:?} is loaded (known: {})", known.join(", "))]
    UnknownProvider { provider: String, known: Vec<String> },
    /// Loaded recently, or refused: the CRM should retry.
    #[error("{0}")]
    ProviderUnavailable(String),
    /// The source plugin refused the request (400, 401 or 503 by kind).
    #[error("{0}")]
    Refused(ParseFailure),
    /// An event the plugin produced lacks what dedupe needs.
    #[error("the {provider} plugin found no deal {field} in event {index} of the payload")]
    EmptyField { provider: String, field: &'static str, index: usize },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Accept one webhook request for `provider`. `request.headers` are all
/// the headers as received; credentials are removed here for sources the
/// host authenticates.
pub async fn accept(
    app: &App,
    provider: &str,
    mut request: IncomingRequest,
) -> Result<Vec<AcceptedEvent>, IntakeError> {
    let source: Arc<LoadedPlugin> = match app.plugins.lookup_source(provider) {
        SourceLookup::Loaded(source) => source,
        SourceLookup::Unavailable(why) => return Err(IntakeError::ProviderUnavailable(why)),
        // Without the key, an unknown provider looks like any refusal.
        SourceLookup::Unknown if !app.keys.webhook_pairs(&request.headers) => return Err(IntakeError::KeyRefused),
        SourceLookup::Unknown => {
            let known = app.plugins.snapshot().sources.keys().cloned().collect();
            return Err(IntakeError::UnknownProvider { provider: provider.to_string(), known });
        }
    };
    // Stored as received (credentials redacted), whoever authenticates.
    let stored_headers = redacted(&request.headers);
    if source.manifest.auth() == Auth::Host {
        if !app.keys.webhook_pairs(&request.headers) {
            return Err(IntakeError::KeyRefused);
        }
        request.headers.retain(|(name, _)| !CREDENTIAL_HEADERS.contains(&name.as_str()));
    }

    let started = std::time::Instant::now();
    let parsed = source.parse(&request).await;
    app.metrics.plugin_call(source.name(), started.elapsed());
    let mut events = parsed?.map_err(IntakeError::Refused)?;
    // A source plugin's bug must not create receipts that cannot be deduped.
    for (index, event) in events.iter().enumerate() {
        for (field, value) in [("reference", &event.reference), ("status", &event.status)] {
            if value.trim().is_empty() {
                return Err(IntakeError::EmptyField { provider: provider.to_string(), field, index });
            }
        }
    }

    let stored = stored_request(stored_headers, &request.body, events.len());
    let routes = app.routes();
    let mut accepted = Vec::with_capacity(events.len());
    for event in events.iter_mut() {
        // Every event of one request gets the same clock reading.
        event.received_at = request.received_at_ms / 1000;
        let actions = routes.actions_for(provider, &event.status);
        let receipt = Receipt {
            id: uuid::Uuid::now_v7().to_string(),
            provider: provider.to_string(),
            event_type: event.event_type.clone(),
            reference: event.reference.clone(),
            status: event.status.clone(),
            request: stored.clone(),
            event: event.clone(),
            received_at_ms: request.received_at_ms,
            updated_at_ms: request.received_at_ms,
            jobs_enqueued: actions.is_empty(),
            actions: actions.iter().map(|a| pending(a, request.received_at_ms)).collect(),
        };
        let inserted = match &app.joint {
            // One transaction for the receipt and its jobs.
            Some(joint) => joint.accept(receipt, jobs_for).await?,
            None => app.store.insert(receipt).await?,
        };
        let (receipt, duplicate) = match inserted {
            Inserted::New(r) => (r, false),
            Inserted::Duplicate(r) => (r, true),
        };
        if !receipt.jobs_enqueued {
            // New, or a duplicate whose first delivery never got its jobs
            // queued (we answered 503 then, and the CRM retried).
            queue_jobs(app, &receipt).await?;
        }
        accepted.push(AcceptedEvent {
            receipt_id: receipt.id,
            duplicate,
            reference: receipt.reference,
            status: receipt.status,
            actions: receipt
                .actions
                .into_iter()
                .map(|a| ActionView { destination: a.destination, action: a.action, state: a.state })
                .collect(),
        });
    }
    Ok(accepted)
}

/// The jobs for a receipt's actions not yet attempted (a re-enqueue after a
/// lost `mark_enqueued` must not resend what was delivered meanwhile).
pub fn jobs_for(receipt: &Receipt) -> Vec<Job> {
    receipt
        .actions
        .iter()
        .filter(|a| a.state == DeliveryState::Pending && a.attempts == 0)
        .map(|a| job_for(receipt, a))
        .collect()
}

/// The job that delivers one action of a receipt.
fn job_for(receipt: &Receipt, a: &ActionRecord) -> Job {
    let status_key = receipt.event.status_key();
    Job {
        id: Job::id_for(&receipt.id, &a.destination, &a.action),
        receipt_id: receipt.id.clone(),
        provider: receipt.provider.clone(),
        destination: a.destination.clone(),
        action: a.action.clone(),
        params: a.params.clone(),
        event: receipt.event.clone(),
        idempotency_key: idempotency_key(&receipt.provider, &receipt.reference, &status_key, &a.destination, &a.action),
        order_key: order_key(&receipt.provider, &receipt.reference, &a.destination),
        attempts: 0,
        budget_start: 0,
        interrupted: 0,
        deferrals: 0,
        accepted_at_ms: receipt.received_at_ms,
        replayed_at_ms: None,
    }
}

/// Queue a receipt's jobs not yet attempted, then note them queued. Safe to
/// repeat: enqueueing is idempotent per job id.
pub async fn queue_jobs(app: &App, receipt: &Receipt) -> Result<(), QueueError> {
    app.queue.enqueue(jobs_for(receipt)).await?;
    if let Err(e) = app.store.mark_enqueued(&receipt.id).await {
        // The jobs are durable; the flag only spares a re-enqueue.
        tracing::warn!(receipt_id = %receipt.id, error = %e, "jobs queued but receipt not marked");
    }
    Ok(())
}

/// Queue the jobs of receipts accepted but never confirmed queued (a crash
/// or queue outage between the two writes).
pub async fn recover_unqueued(app: &App) {
    let receipts = match app.store.unqueued().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "could not look for receipts with unqueued jobs");
            return;
        }
    };
    for receipt in receipts {
        match queue_jobs(app, &receipt).await {
            Ok(()) => {
                tracing::info!(receipt_id = %receipt.id, "queued the jobs of a receipt accepted before a restart")
            }
            Err(e) => tracing::error!(receipt_id = %receipt.id, error = %e, "could not queue recovered jobs"),
        }
    }
}

/// Headers with credentials redacted, for storing.
fn redacted(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            let value = if CREDENTIAL_HEADERS.contains(&n.as_str()) { "«redacted»".to_string() } else { v.clone() };
            (n.clone(), value)
        })
        .collect()
}

/// One action a replay put back in the queue.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayedAction {
    pub job_id: String,
    pub receipt_id: String,
    pub destination: String,
    pub action: String,
    /// Whether the downstream will deduplicate it (within its dedupe
    /// window since it may first have been sent) or may count it twice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a receipt's actions were not replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    NotFound(String),
    /// Replaying these would send them again: that takes `force`.
    #[error("already delivered: {}; pass \"force\": true to send again", .0.join(", "))]
    Delivered(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Put dead letters back in the queue with a fresh retry budget.
pub async fn replay_dead_letters(app: &App, ids: Vec<String>) -> Result<Vec<ReplayedAction>, QueueError> {
    let mut replayed = Vec::new();
    for id in ids {
        if let Some(job) = app.queue.replay(&id).await? {
            note_replayed(app, &job, "replayed").await;
            // Its first attempt may have reached the downstream.
            replayed.push(replayed_action(app, &job, job.accepted_at_ms));
        }
    }
    Ok(replayed)
}

/// Replay a receipt's actions (all, or those of one destination and/or
/// action): dead-lettered ones come back with a fresh budget; delivered
/// ones are sent again only with `force`; those still queued are left.
pub async fn replay_receipt(
    app: &App,
    receipt_id: &str,
    destination: Option<&str>,
    action: Option<&str>,
    force: bool,
) -> Result<Vec<ReplayedAction>, ReplayError> {
    let receipt =
        app.store.get(receipt_id).await?.ok_or_else(|| ReplayError::NotFound(format!("no receipt {receipt_id}")))?;
    let chosen: Vec<&ActionRecord> = receipt
        .actions
        .iter()
        .filter(|a| destination.is_none_or(|d| a.destination == d) && action.is_none_or(|n| a.action == n))
        .collect();
    if chosen.is_empty() {
        return Err(ReplayError::NotFound(format!("receipt {receipt_id} has no such action")));
    }
    let delivered: Vec<String> = chosen
        .iter()
        .filter(|a| a.state == DeliveryState::Delivered)
        .map(|a| format!("{}/{}", a.destination, a.action))
        .collect();
    if !delivered.is_empty() && !force {
        return Err(ReplayError::Delivered(delivered));
    }
    if !receipt.jobs_enqueued {
        // Accepted, but its jobs never made it to the queue: queue them now.
        queue_jobs(app, &receipt).await?;
    }
    let mut replayed = Vec::new();
    for a in chosen {
        match a.state {
            DeliveryState::Failed => {
                if let Some(job) = app.queue.replay(&Job::id_for(&receipt.id, &a.destination, &a.action)).await? {
                    note_replayed(app, &job, "replayed").await;
                    replayed.push(replayed_action(app, &job, receipt.received_at_ms));
                }
            }
            DeliveryState::Delivered => {
                // A fresh budget; attempt numbers go on from the last one.
                let mut job = job_for(&receipt, a);
                job.attempts = a.attempts;
                job.replayed(crate::store::now_ms());
                // Dead-lettered after an earlier forced replay: back from there.
                let queued = match app.queue.replay(&job.id).await? {
                    Some(_) => true,
                    None => app.queue.enqueue(vec![job.clone()]).await? == 1,
                };
                // Not queued: it is already running again.
                if queued {
                    note_replayed(app, &job, "replayed (forced: sent again)").await;
                    replayed.push(replayed_action(app, &job, a.delivered_at_ms.unwrap_or(receipt.received_at_ms)));
                }
            }
            // Still queued: nothing to do.
            DeliveryState::Pending | DeliveryState::Retrying => {}
        }
    }
    Ok(replayed)
}

/// Show on the receipt that an action is queued again.
async fn note_replayed(app: &App, job: &Job, detail: &str) {
    let pending = AttemptRecord {
        destination: job.destination.clone(),
        action: job.action.clone(),
        state: DeliveryState::Pending,
        attempts: job.attempts,
        error: None,
        status: None,
        detail: Some(detail.into()),
        replay: true,
        log: None,
    };
    if let Err(e) = app.store.record_attempt(&job.receipt_id, pending).await {
        tracing::warn!(job_id = %job.id, error = %e, "replayed, but the receipt was not updated");
    }
    tracing::info!(job_id = %job.id, "{detail}");
}

/// The answer for one replayed action, with a note when `first_sent_ms` is
/// further back than the destination's dedupe window.
fn replayed_action(app: &App, job: &Job, first_sent_ms: u64) -> ReplayedAction {
    let window = app.plugins.destination(&job.destination).and_then(|p| p.manifest.dedupe_window_secs);
    let age_ms = crate::store::now_ms().saturating_sub(first_sent_ms);
    let note = window.map(|w| {
        if age_ms > w.saturating_mul(1000) {
            format!(
                "{} deduplicates a repeated delivery for {} only; this one may first have been sent {} ago, so it may arrive twice",
                job.destination,
                human(w),
                human(age_ms / 1000)
            )
        } else {
            format!(
                "{} deduplicates a repeated delivery for {}; this one may first have been sent {} ago, so it will count once",
                job.destination,
                human(w),
                human(age_ms / 1000)
            )
        }
    });
    ReplayedAction {
        job_id: job.id.clone(),
        receipt_id: job.receipt_id.clone(),
        destination: job.destination.clone(),
        action: job.action.clone(),
        note,
    }
}

/// A duration for people: "30 min", "48 h", "3 days".
fn human(secs: u64) -> String {
    match secs {
        s if s < 3600 => format!("{} min", s.div_ceil(60)),
        s if s < 3 * 86_400 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// The request as stored with a receipt: a batch's body clipped.
fn stored_request(headers: Vec<(String, String)>, body: &[u8], events: usize) -> StoredRequest {
    let length = body.len();
    let body = String::from_utf8_lossy(body);
    let body = if events > 1 && body.len() > BATCH_BODY_KEPT {
        format!(
            "{} («clipped»: {} bytes in all, a batch of {events} events)",
            crate::plugins::world::clip(&body, BATCH_BODY_KEPT),
            length
        )
    } else {
        body.into_owned()
    };
    StoredRequest { headers, body, purged_at_ms: None }
}

fn pending(a: &ActionSpec, now: u64) -> ActionRecord {
    let params = a.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    ActionRecord::pending(a.destination.clone(), a.action.clone(), params, now)
}
