//! The circuit breaker. A destination whose deliveries fail
//! `BREAKER_FAILURES` times in a row (retryable failures: the downstream is
//! down, slow or refusing) is paused, so its jobs wait instead of spending
//! their attempts on it. Every `BREAKER_PROBE_AFTER_MS` one waiting job is
//! let through as a probe (`JobQueue::probe`): if it is delivered the
//! destination resumes, otherwise the breaker stays open for another
//! period. The pause lives in the queue, so every process sharing it (Redis)
//! sees it; each process counts its own failures. An operator's pause wins
//! over the breaker's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::App;
use crate::queue::{Pause, PausedBy};
use crate::store::now_ms;
use crate::telemetry::DestinationLabels;

/// What one attempt said about its destination's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Delivered.
    Up,
    /// A retryable failure: down, overloaded, timing out.
    Failing,
    /// Answered but refused the job for good: the destination works.
    Answering,
}

/// Failures in a row per destination, in this process.
#[derive(Default)]
pub struct Breaker {
    failures: Mutex<HashMap<String, u32>>,
}

impl Breaker {
    /// After an attempt that ran (not one put off) to `destination`, the
    /// breaker's probe or not: count, trip, or close.
    pub async fn observe(&self, app: &App, destination: &str, probe: bool, health: Health, reason: &str) {
        let settings = app.config.breaker;
        let failures = {
            let mut all = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let count = all.entry(destination.to_string()).or_default();
            *count = if health == Health::Failing { count.saturating_add(1) } else { 0 };
            *count
        };
        match health {
            // A probe the destination answered, even refusing that one job,
            // shows it works again.
            Health::Up | Health::Answering if probe => {
                match app.queue.resume(destination, Some(PausedBy::Breaker)).await {
                    Ok(Some(released)) => {
                        tracing::info!(
                            destination,
                            released,
                            "the probe got an answer; circuit breaker closed, destination resumed"
                        )
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(destination, error = %e, "the probe got an answer, but the destination could not be resumed; the next probe tries again")
                    }
                }
            }
            Health::Failing if probe => {
                self.open(app, destination, format!("the probe failed: {reason}"), false).await;
            }
            Health::Failing if settings.failures > 0 && failures >= settings.failures => {
                let reason = format!("{failures} deliveries in a row failed; the last: {reason}");
                self.open(app, destination, reason, true).await;
            }
            _ => {}
        }
    }

    /// Pause `destination` as the breaker (unless an operator paused it);
    /// the next probe after `BREAKER_PROBE_AFTER_MS`. `trip`: it was
    /// running until now (else a probe failed).
    async fn open(&self, app: &App, destination: &str, reason: String, trip: bool) {
        let now = now_ms();
        let pause = Pause {
            by: PausedBy::Breaker,
            reason: reason.clone(),
            since_ms: now,
            probe_at_ms: Some(now + app.config.breaker.probe_after.as_millis() as u64),
            probe_job: None,
        };
        let paused = app.queue.pause(destination, pause).await;
        if trip {
            // Counted afresh, whether this tripped it or it was paused already.
            self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(destination);
        }
        match paused {
            Ok(true) if trip => {
                app.metrics.breaker_trips.get_or_create(&DestinationLabels { destination: destination.into() }).inc();
                tracing::error!(destination, %reason, "circuit breaker open: destination paused; its jobs wait");
            }
            Ok(true) => tracing::warn!(destination, %reason, "circuit breaker stays open"),
            Ok(false) => {}
            Err(e) => tracing::error!(destination, error = %e, "the circuit breaker could not pause the destination"),
        }
    }
}

/// Until `shutdown`: probe each destination the breaker paused once its
/// probe time has come; and now and then, move back jobs a resume cut short
/// left waiting (`JobQueue::drain_unpaused`).
pub async fn probe(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    const DRAIN_EVERY: Duration = Duration::from_secs(30);
    let every = (app.config.breaker.probe_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut drained = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let Ok(paused) = app.queue.paused().await else { continue };
        if drained.elapsed() >= DRAIN_EVERY {
            drained = tokio::time::Instant::now();
            for destination in app.plugins.snapshot().live_destinations().map(|p| p.name()) {
                if !paused.iter().any(|p| p.destination == destination)
                    && let Ok(moved @ 1..) = app.queue.drain_unpaused(destination).await
                {
                    tracing::warn!(%destination, moved, "moved back jobs an interrupted resume left waiting");
                }
            }
        }
        for paused in paused.iter().filter(|p| p.pause.by == PausedBy::Breaker) {
            let now = now_ms();
            let next = now + app.config.breaker.probe_after.as_millis() as u64;
            match app.queue.probe(&paused.destination, now, next).await {
                Ok(Some(job)) => {
                    tracing::info!(destination = %paused.destination, job_id = %job, "circuit breaker: probing with one job")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(destination = %paused.destination, error = %e, "circuit breaker: cannot probe")
                }
            }
        }
    }
}
