//! The job queue: one job per (receipt, destination action), delayed retries,
//! and a dead-letter list that can be replayed.
//!
//! The trait is the seam between workers and the queue backend; `embedded`
//! (redb, single node, durable) is the default. Delivery is at-least-once: a
//! job is removed only when acknowledged, after its outcome is recorded on
//! the receipt; a worker that dies leaves its job to run again (downstream
//! idempotency keys make the repeat harmless).

pub mod embedded;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::Event;

/// One delivery to perform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `{receipt_id}/{destination}/{action}`: enqueueing is idempotent on it.
    pub id: String,
    pub receipt_id: String,
    pub provider: String,
    pub destination: String,
    pub action: String,
    #[serde(default)]
    pub params: Vec<(String, String)>,
    pub event: Event,
    pub idempotency_key: String,
    /// Jobs with the same key (one deal, one destination) go in the order
    /// their receipts were accepted: a later one waits while an earlier one
    /// is live. Empty: not ordered.
    #[serde(default)]
    pub order_key: String,
    /// Attempts started so far (all time). Counted durably when a job is
    /// reserved, before its plugin runs, so an attempt that takes the host
    /// down still counts.
    pub attempts: u32,
    /// `attempts` when the job was last replayed; the retry budget counts
    /// from here.
    #[serde(default)]
    pub budget_start: u32,
    /// Attempts that never finished because the host stopped during them.
    #[serde(default)]
    pub interrupted: u32,
    /// Times the job was put off for the host's own reasons (its destination
    /// not loaded, no free plugin instance, the store down); they spend no
    /// attempts, but back off like them.
    #[serde(default)]
    pub deferrals: u32,
    /// When the webhook that made this job was accepted. Stored under its
    /// earlier name, so a host of an earlier version reads it too.
    #[serde(rename = "enqueued_at_ms")]
    pub accepted_at_ms: u64,
    /// When the job was last replayed, if it was; its delivery latency
    /// counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_at_ms: Option<u64>,
}

/// A job a worker holds. `job.attempts` already counts the attempt it is
/// about to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserved {
    pub job: Job,
    /// The backend's handle on the reservation (the stream entry, for Redis).
    pub(crate) lease: String,
    /// Let through a destination the circuit breaker paused, to see whether
    /// it works again (`JobQueue::probe`).
    pub probe: bool,
}

impl Job {
    /// When the job last went into the queue: at its accept, or at its
    /// latest replay. Delivery latency counts from here.
    pub fn queued_at_ms(&self) -> u64 {
        self.replayed_at_ms.unwrap_or(self.accepted_at_ms)
    }

    /// Back in the queue at `now_ms` with a fresh retry budget: attempt
    /// numbers go on from the last one.
    pub fn replayed(&mut self, now_ms: u64) {
        self.budget_start = self.attempts;
        self.deferrals = 0;
        self.replayed_at_ms = Some(now_ms);
    }

    /// The job id for a receipt's action.
    pub fn id_for(receipt_id: &str, destination: &str, action: &str) -> String {
        format!("{receipt_id}/{destination}/{action}")
    }
}

/// Stable across retries, replays and even a re-sent webhook: the same deal
/// transition and action always get the same key. Hex of SHA-256, 32 chars.
pub fn idempotency_key(provider: &str, reference: &str, status_key: &str, destination: &str, action: &str) -> String {
    let mut h = Sha256::new();
    for part in [provider, reference, status_key, destination, action] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The ordering key of a deal's jobs for one destination (a hash: it goes
/// into Redis key names).
pub fn order_key(provider: &str, reference: &str, destination: &str) -> String {
    let mut h = Sha256::new();
    for part in [provider, reference, destination] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// A job that will not be retried, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job: Job,
    pub reason: String,
    pub failed_at_ms: u64,
}

/// Who paused a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PausedBy {
    /// An operator (`POST /api/v1/destinations/{name}/pause`): it stays
    /// paused until resumed.
    Operator,
    /// The circuit breaker, after consecutive failures: one job at a time
    /// probes it, and the first delivered resumes it.
    Breaker,
}

impl PausedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            PausedBy::Operator => "operator",
            PausedBy::Breaker => "breaker",
        }
    }
}

impl Pause {
    /// Whether `self` may take the place of `current`: an operator's pause
    /// replaces any; the breaker's only a breaker's whose probe failed (one
    /// with a probe out), not one still waiting for its first probe (jobs
    /// that were in flight when it opened keep failing) nor an operator's.
    pub fn may_replace(&self, current: Option<&Pause>) -> bool {
        match (self.by, current) {
            (PausedBy::Operator, _) | (PausedBy::Breaker, None) => true,
            (PausedBy::Breaker, Some(current)) => current.by == PausedBy::Breaker && current.probe_job.is_some(),
        }
    }
}

/// A paused destination: its jobs wait, spending no attempts, until it is
/// resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    pub by: PausedBy,
    pub reason: String,
    /// When it was paused (a breaker's pause keeps it through failed probes).
    pub since_ms: u64,
    /// Breaker: the next probe may start at this time (unix ms).
    #[serde(default)]
    pub probe_at_ms: Option<u64>,
    /// Breaker: the job let through as the latest probe.
    #[serde(default)]
    pub probe_job: Option<String>,
}

/// A destination that is paused, and how many of its jobs wait for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PausedDestination {
    pub destination: String,
    #[serde(flatten)]
    pub pause: Pause,
    /// Jobs that came due while it was paused; jobs scheduled for a later
    /// retry join them when due.
    pub waiting: u64,
}

/// The destination part of a job id (`{receipt}/{destination}/{action}`).
pub fn destination_of(job_id: &str) -> &str {
    job_id.split('/').nth(1).unwrap_or_default()
}

/// Counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Due now, waiting for a worker.
    pub ready: u64,
    /// Scheduled for a later retry.
    pub delayed: u64,
    /// Reserved by a worker.
    pub in_flight: u64,
    pub dead: u64,
    /// Waiting for their destination to be resumed.
    pub paused: u64,
}

/// Queue failures. On the accept path they mean 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("job queue unavailable: {0}")]
    Unavailable(String),
    #[error("queued job is corrupt: {0}")]
    Corrupt(String),
}

/// How a reserved job leaves its worker.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Done: remove it.
    Ack,
    /// Due again after the delay, stored as the reserved job now says.
    Retry(Duration),
    /// To the dead letters, with the reason.
    Dead(String),
}

/// The job queue.
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Queue jobs, due now. A job whose id is already queued (live or dead)
    /// is left as it is. Returns how many were added.
    async fn enqueue(&self, jobs: Vec<Job>) -> Result<usize, QueueError>;
    /// Take the next due job, waiting up to `wait` for one, and count the
    /// attempt it is for, durably, before handing it out. Attempts a host
    /// stopped during are added to `attempts` and `interrupted`.
    async fn reserve(&self, wait: Duration) -> Result<Option<Reserved>, QueueError>;
    /// Done with a job: remove it.
    async fn ack(&self, job: &Reserved) -> Result<(), QueueError>;
    /// Put a reserved job back, due after `delay`, stored as `job.job` says
    /// (a worker lowers `attempts` for an attempt that does not count).
    async fn retry(&self, job: Reserved, delay: Duration) -> Result<(), QueueError>;
    /// Move a reserved job to the dead-letter list.
    async fn dead_letter(&self, job: Reserved, reason: String) -> Result<(), QueueError>;
    /// Acknowledge, retry or dead-letter a reserved job.
    async fn settle(&self, job: Reserved, how: Settle) -> Result<(), QueueError> {
        match how {
            Settle::Ack => self.ack(&job).await,
            Settle::Retry(delay) => self.retry(job, delay).await,
            Settle::Dead(reason) => self.dead_letter(job, reason).await,
        }
    }
    /// Dead letters, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError>;
    /// Move a dead letter back to the queue with a fresh retry budget.
    async fn replay(&self, job_id: &str) -> Result<Option<Job>, QueueError>;
    async fn depth(&self) -> Result<QueueDepth, QueueError>;
    /// Pause a destination: from now on its jobs wait when they come due,
    /// spending nothing. Unless `Pause::may_replace` says no (then false);
    /// a breaker's pause replacing a breaker's keeps its `since_ms`.
    async fn pause(&self, destination: &str, pause: Pause) -> Result<bool, QueueError>;
    /// Resume a destination paused (by anyone, or only by `by`): its
    /// waiting jobs are due at once. How many there were; None if it was
    /// not paused so.
    async fn resume(&self, destination: &str, by: Option<PausedBy>) -> Result<Option<u64>, QueueError>;
    /// Retention: remove up to `limit` dead letters that failed before
    /// `before_ms`; how many went.
    async fn remove_dead_before(&self, before_ms: u64, limit: usize) -> Result<usize, QueueError>;
    /// Jobs left waiting for a destination that is no longer paused (a
    /// resume cut short by an outage), moved back: how many. Only the Redis
    /// queue, whose resume takes several requests, can leave any.
    async fn drain_unpaused(&self, _destination: &str) -> Result<u64, QueueError> {
        Ok(0)
    }
    /// The paused destinations.
    async fn paused(&self) -> Result<Vec<PausedDestination>, QueueError>;
    /// If the breaker paused `destination` and its probe time has come, let
    /// its oldest waiting job through as the probe; the next probe may
    /// start at `next_ms`. The job let through, if any.
    async fn probe(&self, destination: &str, now_ms: u64, next_ms: u64) -> Result<Option<String>, QueueError>;
    async fn ping(&self) -> Result<(), QueueError>;
    /// At shutdown, after the workers stopped: make the jobs this process
    /// still holds (deliveries cut off) available to others at once. The
    /// embedded queue has no others: at the next start it finds them
    /// running and counts the attempt cut off.
    async fn release_held(&self) -> Result<usize, QueueError> {
        Ok(0)
    }
    /// Whether this process may send an operator alert now: where several
    /// processes share the queue, one of them per cooldown. Only the Redis
    /// queue is shared.
    async fn may_alert(&self, _cooldown: Duration) -> bool {
        true
    }
    /// Requests sent to a queue server so far (0 for the embedded queue).
    fn round_trips(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_replaces_only_its_own_pause_after_a_failed_probe() {
        let pause = |by, probe_job: Option<&str>| Pause {
            by,
            reason: String::new(),
            since_ms: 1,
            probe_at_ms: None,
            probe_job: probe_job.map(String::from),
        };
        let (operator, breaker) = (pause(PausedBy::Operator, None), pause(PausedBy::Breaker, None));
        let probing = pause(PausedBy::Breaker, Some("r/meta-capi/Lead"));
        assert!(operator.may_replace(Some(&breaker)) && operator.may_replace(Some(&probing)));
        assert!(breaker.may_replace(None));
        assert!(!breaker.may_replace(Some(&operator)), "an operator's pause stays");
        assert!(!breaker.may_replace(Some(&breaker)), "jobs in flight when it opened do not open it again");
        assert!(breaker.may_replace(Some(&probing)), "a failed probe opens it for another period");
    }

    #[test]
    fn idempotency_key_is_stable_and_distinct_per_action() {
        let a = idempotency_key("crm", "D-1", "committed", "meta-capi", "Purchase");
        assert_eq!(a, idempotency_key("crm", "D-1", "committed", "meta-capi", "Purchase"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, idempotency_key("crm", "D-1", "committed", "brevo", "Purchase"));
        assert_ne!(a, idempotency_key("crm", "D-1", "qualified", "meta-capi", "Purchase"));
        // Separators keep ("ab","c") and ("a","bc") apart.
        assert_ne!(idempotency_key("ab", "c", "", "", ""), idempotency_key("a", "bc", "", "", ""));
    }
}
