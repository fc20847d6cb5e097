//! Per-destination limits (`[destination.NAME]` in the routes file):
//! deliveries at once and deliveries started per second, in this process. A
//! worker waits for its turn before running the plugin; the job stays
//! reserved meanwhile and spends no attempt. The limits follow the routes
//! file as it is reloaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::routing::DestinationLimits;

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
}

/// The gates of every limited destination.
#[derive(Default)]
pub struct Limiter {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl Limiter {
    /// Wait until a delivery to `destination` may start under `limits`.
    pub async fn turn(&self, destination: &str, limits: DestinationLimits) -> Turn {
        if limits == DestinationLimits::default() {
            return Turn { _slot: None };
        }
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
            Some(slots) => slots.clone().acquire_owned().await.ok(),
            None => None,
        };
        if let Some(rate) = limits.max_per_second {
            let start = {
                let mut next = gate.next_start.lock().unwrap_or_else(|e| e.into_inner());
                let start = (*next).max(Instant::now());
                *next = start + Duration::from_secs_f64(1.0 / rate);
                start
            };
            tokio::time::sleep_until(start).await;
        }
        Turn { _slot: slot }
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

    #[tokio::test(start_paused = true)]
    async fn deliveries_start_no_faster_than_the_rate_and_no_more_at_once_than_the_cap() {
        let limiter = Arc::new(Limiter::default());
        let limits = DestinationLimits { max_concurrency: Some(2), max_per_second: Some(10.0) };
        let t0 = Instant::now();
        let first = limiter.turn("brevo", limits).await;
        let second = limiter.turn("brevo", limits).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(100), "the second waits a tenth of a second");
        // Two running: a third waits for a slot, however long that takes.
        let third = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.turn("brevo", limits).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!third.is_finished());
        drop(first);
        third.await.unwrap();
        drop(second);
        // Other destinations are not held up.
        let t1 = Instant::now();
        limiter.turn("meta-capi", DestinationLimits::default()).await;
        limiter.turn("meta-capi", DestinationLimits::default()).await;
        assert_eq!(Instant::now(), t1);
    }
}
