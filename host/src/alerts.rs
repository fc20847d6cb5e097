//! Operator alerts, with the original service's settings (`ALERT_*`): when
//! more jobs than `ALERT_QUEUE_WAITING_THRESHOLD` have been waiting (ready,
//! or due again after a failure) for longer than
//! `ALERT_QUEUE_BACKLOG_MINUTES`, or when a job is dead-lettered, the host
//! logs an error, counts it in `crm_alerts_total`, and e-mails
//! `ALERT_RECIPIENTS` through the Brevo destination plugin (its
//! `operator-alert` action): at most one e-mail per
//! `ALERT_QUEUE_COOLDOWN_MINUTES`, whatever its kind; with several processes
//! on one Redis, one of them per cooldown. `docs/alerts.yml` has Prometheus
//! rules for the same conditions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::App;
use crate::event::Event;
use crate::plugins::{DeliveryRequest, Outcome, Status};
use crate::queue::QueueDepth;
use crate::store::now_ms;
use crate::telemetry::AlertLabels;

/// The destination plugin that sends alert e-mails, and its action.
const MAILER: &str = "brevo";
const ACTION: &str = "operator-alert";

/// Watch the queue until `shutdown`, alerting as configured.
pub async fn watch(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let settings = app.config.alerts.clone();
    if !settings.enabled {
        return;
    }
    if settings.recipients.is_empty() {
        tracing::warn!("ALERT_RECIPIENTS is not set: alerts are logged and counted, not e-mailed");
    }
    // Often enough to notice a backlog within a tenth of its window, and a
    // dead letter within seconds. The first look, at once, is the baseline.
    let every = (settings.backlog / 10).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut watcher = Watcher::default();
    loop {
        if let Ok(depth) = app.queue.depth().await
            && let Some(alert) = watcher.look(&settings, &depth, Instant::now())
            && app.queue.may_alert(settings.cooldown).await
        {
            raise(&app, alert).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One alert to raise.
#[derive(Debug, PartialEq)]
struct Alert {
    kind: &'static str,
    subject: String,
    text: String,
}

/// What the watcher remembers between looks.
#[derive(Default)]
struct Watcher {
    /// Since when more jobs than the threshold have been waiting.
    over_since: Option<Instant>,
    /// Dead letters already told of (or there at the first look): those
    /// above it are new, even while the cooldown holds their alert back.
    dead: Option<u64>,
    /// When the last alert went out.
    last: Option<Instant>,
}

impl Watcher {
    /// The alerts due after this look at the queue (at most one: the
    /// cooldown covers every kind).
    fn look(&mut self, settings: &crate::config::AlertSettings, depth: &QueueDepth, now: Instant) -> Option<Alert> {
        let waiting = depth.ready + depth.delayed;
        if waiting > settings.waiting_threshold {
            self.over_since.get_or_insert(now);
        } else {
            self.over_since = None;
        }
        let backlogged = self.over_since.is_some_and(|since| now.duration_since(since) >= settings.backlog);
        // Replays take dead letters away: new ones count from the fewest seen.
        let told = *self.dead.get_or_insert(depth.dead);
        let told = told.min(depth.dead);
        self.dead = Some(told);
        let new_dead = depth.dead - told;
        if self.last.is_some_and(|last| now.duration_since(last) < settings.cooldown) {
            return None;
        }
        let minutes = |d: Duration| format!("{:.1}", d.as_secs_f64() / 60.0);
        let alert = if backlogged {
            Alert {
                kind: "queue_backlog",
                subject: format!("crm-event-handler: {waiting} jobs waiting"),
                text: format!(
                    "{waiting} jobs have been waiting for delivery for {} minutes or more (ALERT_QUEUE_WAITING_THRESHOLD is {}): \
                     {} ready, {} due again after a failure, {} being delivered, {} dead letters.\n\n\
                     A destination is failing or slow: see /ready, GET /api/v1/receipts?state=retrying and the log.",
                    minutes(settings.backlog),
                    settings.waiting_threshold,
                    depth.ready,
                    depth.delayed,
                    depth.in_flight,
                    depth.dead
                ),
            }
        } else if new_dead > 0 {
            self.dead = Some(depth.dead);
            Alert {
                kind: "dead_letter",
                subject: format!("crm-event-handler: {new_dead} job(s) dead-lettered"),
                text: format!(
                    "{new_dead} job(s) failed for good and were dead-lettered ({} dead letters in all). \
                     See GET /api/v1/dead-letters for the reasons; replay them with POST /api/v1/dead-letters/replay \
                     once the cause is fixed.",
                    depth.dead
                ),
            }
        } else {
            return None;
        };
        self.last = Some(now);
        Some(alert)
    }
}

/// Log, count and e-mail one alert.
async fn raise(app: &App, alert: Alert) {
    tracing::error!(kind = alert.kind, "alert: {}", alert.text);
    let recipients = &app.config.alerts.recipients;
    let outcome = if recipients.is_empty() {
        "logged"
    } else {
        match send(app, &alert, recipients).await {
            Ok(()) => "sent",
            Err(why) => {
                tracing::error!(kind = alert.kind, reason = %why, "the alert e-mail was not sent");
                "failed"
            }
        }
    };
    app.metrics.alerts.get_or_create(&AlertLabels { kind: alert.kind, outcome }).inc();
}

/// One try, no retry: the next alert is the retry.
async fn send(app: &App, alert: &Alert, recipients: &[String]) -> Result<(), String> {
    let mailer = app.plugins.destination(MAILER).ok_or(format!("no destination plugin named {MAILER} is loaded"))?;
    let params = [
        ("to".to_string(), recipients.join(",")),
        ("subject".to_string(), alert.subject.clone()),
        ("text".to_string(), alert.text.clone()),
    ];
    let key = format!("alert:{}:{}", alert.kind, now_ms());
    let (result, _) = mailer
        .deliver(DeliveryRequest {
            event: &Event::default(),
            action: ACTION,
            params: &params,
            receipt_id: &key,
            provider: "crm-event-handler",
            attempt: 1,
            idempotency_key: &key,
        })
        .await;
    match result {
        Ok(Outcome::Delivered { .. }) => Ok(()),
        Ok(Outcome::Retryable { status, reason, .. } | Outcome::Permanent { status, reason }) => {
            Err(format!("{reason} (status {})", Status(status)))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AlertSettings;

    fn settings() -> AlertSettings {
        AlertSettings {
            enabled: true,
            waiting_threshold: 50,
            backlog: Duration::from_secs(300),
            cooldown: Duration::from_secs(1800),
            recipients: vec![],
        }
    }

    fn depth(waiting: u64, dead: u64) -> QueueDepth {
        QueueDepth { ready: waiting, dead, ..QueueDepth::default() }
    }

    #[test]
    fn a_backlog_alerts_once_it_has_lasted_the_window_then_waits_out_the_cooldown() {
        let (s, t0) = (settings(), Instant::now());
        let mut w = Watcher::default();
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(w.look(&s, &depth(51, 0), at(0)), None);
        assert_eq!(w.look(&s, &depth(51, 0), at(299)), None, "not yet the backlog window");
        let alert = w.look(&s, &depth(60, 0), at(300)).unwrap();
        assert_eq!(alert.kind, "queue_backlog");
        assert!(alert.text.starts_with("60 jobs have been waiting"), "{}", alert.text);
        assert_eq!(w.look(&s, &depth(60, 3), at(1000)), None, "in the cooldown, whatever the kind");
        assert_eq!(w.look(&s, &depth(60, 3), at(2100)).unwrap().kind, "queue_backlog");
    }

    #[test]
    fn a_backlog_that_clears_starts_its_window_again() {
        let (s, t0) = (settings(), Instant::now());
        let mut w = Watcher::default();
        let at = |secs| t0 + Duration::from_secs(secs);
        w.look(&s, &depth(51, 0), at(0));
        w.look(&s, &depth(50, 0), at(200));
        assert_eq!(w.look(&s, &depth(51, 0), at(301)), None, "over again since 301");
        assert_eq!(w.look(&s, &depth(51, 0), at(600)), None);
        assert!(w.look(&s, &depth(51, 0), at(601)).is_some());
    }

    #[test]
    fn dead_letters_held_back_by_the_cooldown_are_told_after_it() {
        let (s, t0) = (settings(), Instant::now());
        let mut w = Watcher::default();
        let at = |secs| t0 + Duration::from_secs(secs);
        w.look(&s, &depth(0, 0), at(0));
        assert_eq!(w.look(&s, &depth(0, 1), at(1)).unwrap().kind, "dead_letter");
        assert_eq!(w.look(&s, &depth(0, 3), at(60)), None, "in the cooldown");
        let alert = w.look(&s, &depth(0, 3), at(1802)).unwrap();
        assert_eq!(alert.subject, "crm-event-handler: 2 job(s) dead-lettered");
    }

    #[test]
    fn new_dead_letters_alert_but_those_there_at_start_do_not() {
        let (s, t0) = (settings(), Instant::now());
        let mut w = Watcher::default();
        assert_eq!(w.look(&s, &depth(0, 7), t0), None);
        let alert = w.look(&s, &depth(0, 9), t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((alert.kind, alert.subject.as_str()), ("dead_letter", "crm-event-handler: 2 job(s) dead-lettered"));
    }
}
