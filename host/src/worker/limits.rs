//! Per-destination limits (`[destination.NAME]` in the routes file):
//! deliveries at once and deliveries started per second, in this process. A
//! worker waits a little for its turn before running the plugin; when the
//! turn is further off, the job is put back for later without spending its
//! attempt, so that workers do not pile up behind one destination (nor hold
//! a Redis job past its visibility timeout). The limits follow the routes
//! file as it is reloaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::routing::DestinationLimits;

/// When to try again after no concurrency slot freed within the wait.
const AFTER_FULL: Duration = Duration::from_secs(1);

/// One destination's gate, built for the limits it was made with.
struct Gate {
    limits: DestinationLimits,
    slots: Option<Arc<Semaphore>>,
    /// When the next delivery may start, under `max_per_second`.
    next_start: Mutex<Instant>,
}

/// A delivery's turn: its concurrency slot, given back when dropped.
pub struct Turn {
    _slot: Option<OwnedSemaphorePermit>,
    /// It had to wait for it (meanwhile the destination may have been
    /// paused).
    pub waited: bool,
}

/// The gates of every limited destination.
#[derive(Default)]
pub struct Limiter {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl Limiter {
    /// Wait until a delivery to `destination` may start under `limits`, or
    /// if that is more than `max_wait` away, say how soon to try again.
    pub async fn turn(
        &self,
        destination: &str,
        limits: DestinationLimits,
        max_wait: Duration,
    ) -> Result<Turn, Duration> {
        if limits == DestinationLimits::default() {
            return Ok(Turn { _slot: None, waited: false });
        }
        let asked = Instant::now();
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
            let gate = gates.entry(destination.to_string()).or_insert_with(|| Gate::new(limits));
            // Changed limits: a new gate; deliveries holding the old one's
            // slots finish under it.
            if gate.limits != limits {
                *gate = Gate::new(limits);
            }
            gate.clone()
        };
        let slot = match &gate.slots {
            Some(slots) => match tokio::time::timeout(max_wait, slots.clone().acquire_owned()).await {
                Ok(slot) => slot.ok(),
                Err(_) => return Err(AFTER_FULL),
            },
            None => None,
        };
        if let Some(rate) = limits.max_per_second {
            let spacing = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX);
            let start = {
                let mut next = gate.next_start.lock().unwrap_or_else(|e| e.into_inner());
                let start = (*next).max(Instant::now());
                if start > asked + max_wait {
                    return Err(start - Instant::now());
                }
                *next = start.checked_add(spacing).unwrap_or(start);
                start
            };
            tokio::time::sleep_until(start).await;
        }
        Ok(Turn { _slot: slot, waited: Instant::now() > asked })
    }
}

impl Gate {
    fn new(limits: DestinationLimits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            slots: limits.max_concurrency.map(|n| Arc::new(Semaphore::new(n as usize))),
            next_start: Mutex::new(Instant::now()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn deliveries_start_no_faster_than_the_rate_and_no_more_at_once_than_the_cap() {
        let limiter = Arc::new(Limiter::default());
        let limits = DestinationLimits { max_concurrency: Some(2), max_per_second: Some(10.0) };
        let t0 = Instant::now();
        let first = limiter.turn("brevo", limits, WAIT).await.unwrap();
        let second = limiter.turn("brevo", limits, WAIT).await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_millis(100), "the second waits a tenth of a second");
        assert!(second.waited && !first.waited);
        // Two running: a third waits for a slot while one frees in time.
        let third = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.turn("brevo", limits, WAIT).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!third.is_finished());
        drop(first);
        let third = third.await.unwrap().unwrap();
        // None frees in time: try again later.
        let t1 = Instant::now();
        assert_eq!(limiter.turn("brevo", limits, WAIT).await.err(), Some(AFTER_FULL));
        assert_eq!(Instant::now() - t1, WAIT);
        drop((second, third));
        // Other destinations are not held up.
        let t2 = Instant::now();
        limiter.turn("meta-capi", DestinationLimits::default(), WAIT).await.unwrap();
        limiter.turn("meta-capi", DestinationLimits::default(), WAIT).await.unwrap();
        assert_eq!(Instant::now(), t2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_further_off_than_the_wait_is_not_taken() {
        let limiter = Limiter::default();
        let slow = DestinationLimits { max_concurrency: None, max_per_second: Some(0.1) };
        limiter.turn("brevo", slow, WAIT).await.unwrap();
        // The next start is 10 s away: come back then, and the turn is still free.
        assert_eq!(limiter.turn("brevo", slow, WAIT).await.err(), Some(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(limiter.turn("brevo", slow, WAIT).await.is_ok());
    }
}
