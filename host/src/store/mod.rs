//! Receipts: one per accepted (provider, deal reference, deal status), with
//! the request as received and the delivery state of each action.
//!
//! The trait is the seam between the service and its storage; `embedded`
//! (redb, single node, durable) is the default. Dedupe is the store's job:
//! `insert` must be atomic with respect to the dedupe key, so concurrent
//! copies of one webhook yield exactly one receipt.

pub mod embedded;
pub mod mongo;
pub(crate) mod redb_file;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// The request as received. Credentials are redacted before storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRequest {
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When the headers and body were purged (`REQUEST_BODY_RETENTION_DAYS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at_ms: Option<u64>,
}

/// Where one action's delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Queued, not yet attempted.
    Pending,
    /// Failed at least once; another attempt is scheduled.
    Retrying,
    Delivered,
    /// Gave up: permanent failure or attempts exhausted (dead-lettered).
    Failed,
}

/// One downstream action of a receipt and its delivery record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub destination: String,
    pub action: String,
    #[serde(default)]
    pub params: Vec<(String, String)>,
    pub state: DeliveryState,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub last_status: Option<u16>,
    pub detail: Option<String>,
    pub delivered_at_ms: Option<u64>,
    pub updated_at_ms: u64,
    /// The latest attempts (at most `MAX_LOGGED_ATTEMPTS`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<LoggedAttempt>,
}

/// Attempts kept per action; older ones are dropped (their count stays in
/// `attempts`).
pub const MAX_LOGGED_ATTEMPTS: usize = 20;
/// Requests kept per logged attempt (a plugin may make many): with the
/// excerpts' bounds, an action's log stays under about 0.5 MB.
pub const MAX_LOGGED_REQUESTS: usize = 5;

/// One delivery attempt in an action's attempt log. Secrets are redacted
/// and excerpts bounded before it is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedAttempt {
    /// The attempt's number (1 for the first).
    pub attempt: u32,
    pub started_at_ms: u64,
    pub duration_ms: u64,
    /// The destination plugin's version and component digest.
    pub plugin_version: String,
    pub plugin_digest: String,
    /// `delivered`, `retryable`, `permanent` or `plugin_error`.
    pub outcome: String,
    pub status: Option<u16>,
    /// The plugin's detail or reason, or the host's error.
    pub detail: String,
    /// The first requests the plugin made, in order...
    pub requests: Vec<LoggedRequest>,
    /// ...and how many more it made.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests_omitted: u32,
    /// A shadow candidate's run beside this attempt, compared with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowComparison>,
}

/// How a shadow candidate's run compared with the live attempt it shadowed
/// (`worker::shadow`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowComparison {
    /// The candidate plugin, its version and component digest.
    pub candidate: String,
    pub version: String,
    pub digest: String,
    /// Same requests (method, URL, headers, body) and the same outcome.
    pub matched: bool,
    /// What differed, redacted: header names, never their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// The candidate's outcome: `delivered`, `retryable`, `permanent` or
    /// `plugin_error`.
    pub outcome: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One outbound request of a logged attempt: no headers (they carry the
/// credentials), the body and answer in excerpts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedRequest {
    pub method: String,
    pub url: String,
    pub body_excerpt: String,
    pub body_bytes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_excerpt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ActionRecord {
    /// An action queued, not yet attempted.
    pub fn pending(destination: String, action: String, params: Vec<(String, String)>, now: u64) -> ActionRecord {
        ActionRecord {
            destination,
            action,
            params,
            state: DeliveryState::Pending,
            attempts: 0,
            last_error: None,
            last_status: None,
            detail: None,
            delivered_at_ms: None,
            updated_at_ms: now,
            log: Vec::new(),
        }
    }
}

/// A stored receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub id: String,
    pub provider: String,
    pub event_type: String,
    pub reference: String,
    pub status: String,
    pub request: StoredRequest,
    pub event: Event,
    pub received_at_ms: u64,
    // The fields below change after a receipt is stored (the embedded store
    // keeps them apart, and reads a receipt stored without them).
    #[serde(default)]
    pub updated_at_ms: u64,
    /// False until the receipt's jobs are durably queued. A receipt left
    /// false (crash or queue outage between the two writes) is finished by
    /// the CRM's retry or the start-up sweep.
    #[serde(default)]
    pub jobs_enqueued: bool,
    #[serde(default)]
    pub actions: Vec<ActionRecord>,
}

impl Receipt {
    /// The dedupe key: provider, reference and normalized status.
    pub fn dedupe_key(&self) -> (String, String, String) {
        (self.provider.clone(), self.reference.clone(), self.event.status_key())
    }

    /// Retention may remove it: every action delivered or failed for good,
    /// and nothing changed since `before_ms` (so its dead letters, if any,
    /// are as old, and go too).
    pub fn expired(&self, before_ms: u64) -> bool {
        self.updated_at_ms < before_ms
            && self.received_at_ms < before_ms
            && self.actions.iter().all(|a| matches!(a.state, DeliveryState::Delivered | DeliveryState::Failed))
    }

    /// Drop what the CRM sent (headers, body) and the request bodies in the
    /// attempt log, which carry the customer's details; the normalized event
    /// stays, so actions can still be replayed. False if already purged.
    pub fn purge(&mut self, now_ms: u64) -> bool {
        if self.request.purged_at_ms.is_some() {
            return false;
        }
        self.request = StoredRequest { headers: Vec::new(), body: String::new(), purged_at_ms: Some(now_ms) };
        for logged in self.actions.iter_mut().flat_map(|a| a.log.iter_mut()) {
            logged.requests.iter_mut().for_each(|r| r.body_excerpt.clear());
            // Differences quote request bodies.
            if let Some(shadow) = &mut logged.shadow {
                shadow.differences.clear();
            }
        }
        true
    }
}

/// The smallest receipt id (UUID v7) of a receipt received at `ms` or later:
/// ids sort by the time they were made, so `id < id_floor(t)` means
/// received before `t`.
pub fn id_floor(ms: u64) -> String {
    format!("{:08x}-{:04x}-7000-8000-000000000000", (ms >> 16) & 0xffff_ffff, ms & 0xffff)
}

/// Result of an insert.
#[derive(Debug, Clone)]
pub enum Inserted {
    New(Receipt),
    /// A receipt for this (provider, reference, status) already existed.
    Duplicate(Receipt),
}

/// A delivery attempt's result, to record on the receipt.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub destination: String,
    pub action: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub error: Option<String>,
    pub status: Option<u16>,
    pub detail: Option<String>,
    /// An operator's replay: it may turn a delivered action back to pending.
    pub replay: bool,
    /// The attempt as made, for the action's log (none when no attempt was
    /// made: a replay, a job put off, a dead letter without a call).
    pub log: Option<LoggedAttempt>,
}

#[cfg(test)]
impl AttemptRecord {
    /// A first attempt that delivered `destination`'s `action` (200).
    pub(crate) fn delivered(destination: &str, action: &str) -> AttemptRecord {
        AttemptRecord {
            destination: destination.into(),
            action: action.into(),
            state: DeliveryState::Delivered,
            attempts: 1,
            error: None,
            status: Some(200),
            detail: None,
            replay: false,
            log: None,
        }
    }
}

/// Filter for listings, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub limit: usize,
    /// Only receipts older than this one (the cursor: the last id of the
    /// previous page; ids grow with time).
    pub before: Option<String>,
    pub provider: Option<String>,
    /// The deal's reference in the CRM.
    pub reference: Option<String>,
    /// The deal status, compared as dedupe does (trimmed, any case).
    pub status: Option<String>,
    /// Only receipts with an action in this state...
    pub state: Option<DeliveryState>,
    /// ...and for this destination (both: the same action).
    pub destination: Option<String>,
    /// Received at or after / before, unix ms.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

/// Receipts a listing reads past the cursor at most, for filters that
/// match few: the page then ends early, with a cursor to read on.
pub const MAX_LISTING_SCAN: usize = 20_000;

impl ListQuery {
    /// Whether `receipt` passes the filters (the cursor aside).
    pub fn matches(&self, receipt: &Receipt) -> bool {
        let action = |a: &ActionRecord| {
            self.state.is_none_or(|s| a.state == s) && self.destination.as_ref().is_none_or(|d| &a.destination == d)
        };
        self.provider.as_ref().is_none_or(|p| &receipt.provider == p)
            && self.reference.as_ref().is_none_or(|r| &receipt.reference == r)
            && self.status.as_ref().is_none_or(|s| receipt.event.status_key() == crate::event::normalize_status(s))
            && self.since_ms.is_none_or(|t| receipt.received_at_ms >= t)
            && self.until_ms.is_none_or(|t| receipt.received_at_ms < t)
            && ((self.state.is_none() && self.destination.is_none()) || receipt.actions.iter().any(action))
    }
}

/// One page of a listing, newest first; `next` is the cursor for the next
/// page (None: there is no more).
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub receipts: Vec<Receipt>,
    pub next: Option<String>,
}

/// Storage failures. All mean "could not be stored now": the API answers 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("receipt store unavailable: {0}")]
    Unavailable(String),
    #[error("receipt {0} not found")]
    NotFound(String),
    #[error("stored receipt is corrupt: {0}")]
    Corrupt(String),
}

/// Receipt storage.
#[async_trait]
pub trait ReceiptStore: Send + Sync {
    /// Insert unless a receipt with the same dedupe key exists (atomically).
    async fn insert(&self, receipt: Receipt) -> Result<Inserted, StoreError>;
    /// Note that the receipt's jobs are queued.
    async fn mark_enqueued(&self, id: &str) -> Result<(), StoreError>;
    /// Record an attempt's result on the matching action.
    async fn record_attempt(&self, id: &str, attempt: AttemptRecord) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Receipt>, StoreError>;
    async fn list(&self, query: ListQuery) -> Result<Page, StoreError>;
    /// Receipts whose jobs were never confirmed queued.
    async fn unqueued(&self) -> Result<Vec<Receipt>, StoreError>;
    /// Retention: remove up to `limit` of the receipts received before
    /// `before_ms` that have `expired`; how many went. Their dedupe keys go
    /// with them: the same webhook sent again is a new receipt.
    async fn remove_expired(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError>;
    /// Retention: `purge` up to `limit` receipts received before
    /// `before_ms`; how many were purged.
    async fn purge_requests(&self, before_ms: u64, limit: usize) -> Result<usize, StoreError>;
    /// Cheap health check for `/ready`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Requests sent to a database server so far (0 for the embedded
    /// store).
    fn round_trips(&self) -> u64 {
        0
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Apply an attempt to a receipt in memory (the MongoDB store's way).
pub fn apply_attempt(receipt: &mut Receipt, attempt: &AttemptRecord, now: u64) -> Result<(), StoreError> {
    if apply_to_actions(&receipt.id, &mut receipt.actions, attempt, now)? {
        receipt.updated_at_ms = now;
    }
    Ok(())
}

/// Apply an attempt to the matching one of receipt `id`'s actions (shared
/// by the backends). False when it changed nothing: a late, out-of-order
/// report must not undo a delivery (a replay may).
pub fn apply_to_actions(
    id: &str,
    actions: &mut [ActionRecord],
    attempt: &AttemptRecord,
    now: u64,
) -> Result<bool, StoreError> {
    let action = actions
        .iter_mut()
        .find(|a| a.destination == attempt.destination && a.action == attempt.action)
        .ok_or_else(|| StoreError::NotFound(format!("{id} (action {}/{})", attempt.destination, attempt.action)))?;
    if action.state == DeliveryState::Delivered && attempt.state != DeliveryState::Delivered && !attempt.replay {
        return Ok(false);
    }
    action.state = attempt.state;
    action.attempts = action.attempts.max(attempt.attempts);
    action.last_status = attempt.status.or(action.last_status);
    if attempt.error.is_some() {
        action.last_error = attempt.error.clone();
    }
    action.detail = attempt.detail.clone().or(action.detail.take());
    if attempt.state == DeliveryState::Delivered {
        action.delivered_at_ms = Some(now);
    }
    if let Some(logged) = &attempt.log {
        if action.log.len() >= MAX_LOGGED_ATTEMPTS {
            action.log.remove(0);
        }
        action.log.push(logged.clone());
    }
    action.updated_at_ms = now;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_floor_splits_receipt_ids_at_the_time_they_were_made() {
        let ms = 1_733_323_312_345u64;
        let made_at = |ms: u64| {
            uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000))
                .to_string()
        };
        let id = made_at(ms);
        assert!(id_floor(ms) <= id && id < id_floor(ms + 1), "{} <= {id} < {}", id_floor(ms), id_floor(ms + 1));
        assert!(made_at(ms - 1) < id_floor(ms));
    }
}
