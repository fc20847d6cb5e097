//! The service on MongoDB (the nx-27017 wire-protocol stand-in) and Redis
//! Streams: the end-to-end scenarios again, concurrency, several host
//! processes sharing the work, and outages. Each test starts its own
//! servers on free ports.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

use support::flows::{self, Flow, action_state, receipt};

struct Setup {
    redis: Server,
    mongo: Server,
    flow: Flow,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Setup {
    type Target = Flow;
    fn deref(&self) -> &Flow {
        &self.flow
    }
}

async fn setup(name: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi", "brevo"]);
    let redis = Server::redis();
    let mongo = Server::mongo(name);
    let meta = StandIn::meta().await;
    let brevo = StandIn::brevo().await;
    let mut vars = host_vars(&dir.path().join("data"), &plugins, &meta, &brevo);
    vars.extend([
        ("DB_URI", mongo.uri.clone()),
        ("REDIS_URI", redis.uri.clone()),
        ("REDIS_KEY_PREFIX", format!("test-{name}")),
        ("QUEUE_VISIBILITY_TIMEOUT_MS", "2000".to_string()),
    ]);
    Setup { redis, mongo, flow: Flow { vars, meta, brevo }, _dir: dir }
}

#[tokio::test]
async fn qualified_then_committed_for_the_same_deal_each_deliver_once() {
    flows::qualified_then_committed_for_the_same_deal_each_deliver_once(&setup("flow").await.flow).await;
}

#[tokio::test]
async fn receipts_are_listed_a_page_at_a_time_with_filters() {
    flows::receipts_are_listed_a_page_at_a_time_with_filters(&setup("listing").await.flow).await;
}

#[tokio::test]
async fn meta_failing_twice_is_retried_and_the_email_is_sent_once() {
    flows::meta_failing_twice_is_retried_and_the_email_is_sent_once(&setup("retry").await.flow).await;
}

#[tokio::test]
async fn a_permanent_meta_error_is_dead_lettered_with_the_reason_and_can_be_replayed() {
    flows::a_permanent_meta_error_is_dead_lettered_with_the_reason_and_can_be_replayed(&setup("dead").await.flow).await;
}

#[tokio::test]
async fn a_job_that_keeps_killing_its_host_is_dead_lettered_once_its_budget_is_spent() {
    flows::a_job_that_keeps_killing_its_host_is_dead_lettered_once_its_budget_is_spent(&setup("poison").await.flow)
        .await;
}

#[tokio::test]
async fn a_later_stage_waits_for_a_retried_earlier_one() {
    flows::a_later_stage_waits_for_a_retried_earlier_one(&setup("order").await.flow).await;
}

#[tokio::test]
async fn a_paused_destination_waits_without_spending_attempts_until_resumed() {
    flows::a_paused_destination_waits_without_spending_attempts_until_resumed(&setup("pause").await.flow).await;
}

#[tokio::test]
async fn failures_in_a_row_open_the_breaker_and_a_delivered_probe_closes_it() {
    flows::failures_in_a_row_open_the_breaker_and_a_delivered_probe_closes_it(&setup("breaker").await.flow).await;
}

#[tokio::test]
async fn retention_purges_requests_then_removes_settled_receipts_and_dead_letters() {
    flows::retention_purges_requests_then_removes_settled_receipts_and_dead_letters(&setup("retention").await.flow)
        .await;
}

#[tokio::test]
async fn a_restart_between_accept_and_delivery_still_delivers_once() {
    flows::a_restart_between_accept_and_delivery_still_delivers_once(&setup("restart").await.flow).await;
}

#[tokio::test]
async fn two_hundred_concurrent_copies_make_one_receipt_and_one_set_of_jobs() {
    let s = setup("concurrent").await;
    let host = Host::start(&s.vars).await;
    let body = payload("M-5", "Committed");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (url, body) = (host.url.clone(), body.clone());
        tasks.push(tokio::spawn(async move { post_webhook(&url, "/api/v1/webhook/crm", "deal_updated", &body).await }));
    }
    let mut ids = HashSet::new();
    let mut new = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        ids.insert(body["receipt_id"].as_str().unwrap().to_string());
        if body["duplicate"] == false {
            new += 1;
        }
    }
    assert_eq!(ids.len(), 1, "one receipt");
    assert_eq!(new, 1, "exactly one answer says new");
    eventually("the actions", WAIT, async || (s.meta.events().len() == 1 && s.brevo.sent_emails() == 1).then_some(()))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.meta.received().len(), 1);
    assert_eq!(s.brevo.received().len(), 1);
    let receipts = get_json(&host.url, "/api/v1/receipts?limit=1000").await;
    assert_eq!(receipts["receipts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn two_hosts_share_the_work_and_survive_one_being_killed() {
    let s = setup("scale").await;
    let mut a = Host::start(&s.vars).await;
    let b = Host::start(&s.vars).await;
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..10 {
        let (a_url, b_url, accepted) = (a.url.clone(), b.url.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            for i in (c..500).step_by(10) {
                let deal = format!("S-{i}");
                let url = if i % 2 == 0 { &a_url } else { &b_url };
                let sent = reqwest::Client::new()
                    .post(format!("{url}/api/v1/webhook/crm"))
                    .header("x-api-key", API_KEY)
                    .header("x-event", "deal_updated")
                    .body(payload(&deal, "Qualified"))
                    .send()
                    .await;
                if let Ok(r) = sent
                    && r.status() == 200
                {
                    accepted.lock().unwrap().push(deal);
                }
            }
        }));
    }
    eventually("a quarter of the deliveries", WAIT, async || (s.meta.events().len() >= 125).then_some(())).await;
    a.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 250, "b accepted its half ({} accepted)", accepted.len());
    let delivered = eventually("every accepted webhook delivered", Duration::from_secs(120), async || {
        let deals: HashSet<String> =
            s.meta.events().iter().filter_map(|e| e["custom_data"]["deal_id"].as_str().map(str::to_string)).collect();
        accepted.iter().all(|d| deals.contains(d)).then_some(deals)
    })
    .await;
    // None twice, as Meta counts (by event_id).
    assert_eq!(s.meta.unique_events().len(), delivered.len());
    drop(b);
}

#[tokio::test]
async fn redis_down_answers_503_and_recovers_without_restart() {
    let mut s = setup("redis-outage").await;
    let host = Host::start(&s.vars).await;
    s.redis.stop();
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-1", "Qualified")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "queue_unavailable");
    let ready = reqwest::get(format!("{}/ready", host.url)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["queue"]["ok"], false);
    assert_eq!(ready["checks"]["store"]["ok"], true);

    s.redis.start();
    // The CRM retries the same webhook: now accepted and delivered once.
    let (status, _) = eventually("the webhook accepted again", WAIT, async || {
        let r = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-1", "Qualified")).await;
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!(status, 200);
    eventually("the Lead", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
    assert_eq!(reqwest::get(format!("{}/ready", host.url)).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_job_settles_once_even_when_redis_lost_its_scripts_during_the_delivery() {
    let s = setup("script-flush").await;
    let host = Host::start(&s.vars).await;
    s.meta.hold(1);
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-3", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead in flight", WAIT, async || (s.meta.received().len() == 1).then_some(())).await;
    // As after a Redis restart or failover: the ack's script is unknown.
    let mut redis =
        redis::Client::open(s.redis.uri.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut redis).await.unwrap();
    s.meta.release();

    let id = body["receipt_id"].as_str().unwrap();
    eventually("the Lead delivered", WAIT, async || {
        (action_state(&receipt(&host, id).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;
    // An unsettled job would be taken over and sent again after the 2 s
    // visibility timeout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(s.meta.received().len(), 1, "the Lead was sent again: its ack was lost");
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"crm_queue_depth{queue="jobs",state="in_flight"} 0"#), "{metrics}");
}

/// The setup with a visibility timeout far longer than the tests wait.
async fn setup_slow_takeover(name: &str, extra: &[(&'static str, &str)]) -> Setup {
    let mut s = setup(name).await;
    for (k, v) in [("QUEUE_VISIBILITY_TIMEOUT_MS", "120000")].iter().chain(extra) {
        s.flow.vars.retain(|(name, _)| name != k);
        s.flow.vars.push((k, v.to_string()));
    }
    s
}

#[tokio::test]
async fn a_host_restarted_after_a_kill_takes_back_its_jobs_at_once() {
    let s = setup_slow_takeover("take-back", &[("WORKER_ID", "host-a")]).await;
    let mut host = Host::start(&s.vars).await;
    s.meta.hold(1);
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("K-1", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead in flight", WAIT, async || (s.meta.received().len() == 1).then_some(())).await;
    host.kill();
    s.meta.release();

    // Same WORKER_ID: its held job comes back once the dead process's lease
    // (15 s) lapses, not after the 120 s visibility timeout.
    let started = std::time::Instant::now();
    let host = Host::start(&s.vars).await;
    let receipt = eventually("the Lead delivered", Duration::from_secs(40), async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "delivered").then_some(r)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(40));
    assert_eq!(s.meta.received().len(), 2);
    assert_eq!(action_state(&receipt, "meta-capi").1, 2, "the attempt cut off by the kill counts: {receipt}");
    assert!(host.log_text().contains("they run again at once"), "{}", host.log_text());
}

#[tokio::test]
async fn a_second_running_process_cannot_take_a_worker_id_in_use() {
    let s = setup_slow_takeover("worker-id", &[("WORKER_ID", "host-b")]).await;
    let _first = Host::start(&s.vars).await;
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_crm-event-handler"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .envs(s.vars.iter().map(|(k, v)| (k, v)))
        .env("DATA_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("WORKER_ID host-b is in use by another running process"), "{said}");
}

#[tokio::test]
async fn a_host_stopped_past_its_timeout_hands_its_job_to_another_host_at_once() {
    let s = setup_slow_takeover("hand-back", &[("SHUTDOWN_TIMEOUT_MS", "300")]).await;
    let mut a = Host::start(&s.vars).await;
    s.meta.hold(1);
    let (_, body) = post_webhook(&a.url, "/api/v1/webhook/crm", "deal_updated", &payload("K-2", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead in flight", WAIT, async || (s.meta.received().len() == 1).then_some(())).await;
    let b = Host::start(&s.vars).await;
    a.terminate();
    assert_eq!(a.exit_code(Duration::from_secs(10)).await, Some(0), "{}", a.log_text());
    assert!(a.log_text().contains("handed back"), "{}", a.log_text());
    s.meta.release();

    let receipt = eventually("the Lead delivered by the other host", Duration::from_secs(20), async || {
        let r = receipt(&b, &id).await;
        (action_state(&r, "meta-capi").0 == "delivered").then_some(r)
    })
    .await;
    assert_eq!(s.meta.received().len(), 2);
    assert_eq!(action_state(&receipt, "meta-capi").1, 2, "{receipt}");
}

#[tokio::test]
async fn two_hosts_send_one_backlog_alert_per_cooldown_between_them() {
    let s = setup_slow_takeover(
        "alerts",
        &[
            ("RETRY_BASE_DELAY_MS", "5000"),
            ("ALERT_QUEUE_WAITING_THRESHOLD", "2"),
            ("ALERT_QUEUE_BACKLOG_MINUTES", "0.02"),
            ("ALERT_QUEUE_COOLDOWN_MINUTES", "10"),
            ("ALERT_RECIPIENTS", "ops@example.com"),
        ],
    )
    .await;
    s.meta.script((0..50).map(|_| Scripted::new(500, serde_json::json!({"error": {"message": "down", "code": 2}}))));
    let (a, _b) = (Host::start(&s.vars).await, Host::start(&s.vars).await);
    for deal in ["AL-1", "AL-2", "AL-3"] {
        let (status, _) =
            post_webhook(&a.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, "Qualified")).await;
        assert_eq!(status, 200);
    }
    eventually("the alert e-mail", WAIT, async || (!s.brevo.operator_alerts().is_empty()).then_some(())).await;
    // Both hosts see the backlog; one e-mail goes out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.brevo.operator_alerts().len(), 1);
}

/// A Meta Lead job of receipt `receipt`, as intake queues it.
fn lead_job(receipt: &str) -> crm_event_handler::queue::Job {
    use crm_event_handler::queue::Job;
    Job {
        id: Job::id_for(receipt, "meta-capi", "Lead"),
        receipt_id: receipt.into(),
        provider: "crm".into(),
        destination: "meta-capi".into(),
        action: "Lead".into(),
        params: vec![],
        event: test_event(),
        idempotency_key: format!("{receipt}/meta-capi/Lead"),
        order_key: String::new(),
        attempts: 0,
        budget_start: 0,
        interrupted: 0,
        deferrals: 0,
        accepted_at_ms: 0,
        replayed_at_ms: None,
    }
}

/// A duplicate webhook that read its receipt before the first one's "jobs
/// queued" mark may queue the jobs again, after they were delivered.
#[tokio::test]
async fn a_job_delivered_and_queued_again_is_not_run_again() {
    use crm_event_handler::queue::{Job, JobQueue, redis::RedisQueue};
    let redis = Server::redis();
    let queue = RedisQueue::connect(&redis.uri, "done-test", None, Duration::from_secs(60)).await.unwrap();
    let job = lead_job("r-1");
    assert_eq!(queue.enqueue(vec![job.clone()]).await.unwrap(), 1);
    let reserved = queue.reserve(Duration::from_secs(2)).await.unwrap().expect("the job");
    queue.ack(&reserved).await.unwrap();
    assert_eq!(queue.enqueue(vec![job.clone()]).await.unwrap(), 0, "queued again after its delivery");
    assert_eq!(queue.reserve(Duration::from_millis(500)).await.unwrap(), None);
    // An operator's forced replay (a fresh budget past the attempts made) runs.
    let forced = Job { attempts: 1, budget_start: 1, ..job };
    assert_eq!(queue.enqueue(vec![forced]).await.unwrap(), 1);
    assert!(queue.reserve(Duration::from_secs(2)).await.unwrap().is_some());
}

/// A dead letter replayed on Redis gets a fresh budget, and its delivery
/// latency counts from the replay, not from the original accept.
#[tokio::test]
async fn a_dead_letter_replayed_on_redis_counts_from_the_replay() {
    use crm_event_handler::queue::{JobQueue, redis::RedisQueue};
    let redis = Server::redis();
    let queue = RedisQueue::connect(&redis.uri, "replay-test", None, Duration::from_secs(60)).await.unwrap();
    queue.enqueue(vec![lead_job("r-1")]).await.unwrap();
    let reserved = queue.reserve(Duration::from_secs(2)).await.unwrap().expect("the job");
    queue.dead_letter(reserved, "Meta answered 400".into()).await.unwrap();
    let before = crm_event_handler::store::now_ms();
    let id = crm_event_handler::queue::Job::id_for("r-1", "meta-capi", "Lead");
    queue.replay(&id).await.unwrap().expect("replayed");
    let again = queue.reserve(Duration::from_secs(2)).await.unwrap().expect("the replayed job").job;
    assert_eq!((again.attempts, again.budget_start, again.accepted_at_ms), (2, 1, 0));
    assert!(again.queued_at_ms() >= before, "{again:?}");
}

#[tokio::test]
async fn mongodb_down_answers_503_and_recovers_without_restart() {
    let mut s = setup("mongo-outage").await;
    let host = Host::start(&s.vars).await;
    s.mongo.stop();
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-2", "Qualified")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "store_unavailable");
    let ready: Value = reqwest::get(format!("{}/ready", host.url)).await.unwrap().json().await.unwrap();
    assert_eq!(ready["checks"]["store"]["ok"], false);

    s.mongo.start();
    eventually("the webhook accepted again", WAIT, async || {
        let r = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-2", "Qualified")).await;
        (r.0 == 200).then_some(())
    })
    .await;
    eventually("the Lead", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
}

/// Pause, probe and resume on Redis, where a resume takes several requests
/// and can be cut short.
#[tokio::test]
async fn a_paused_destinations_jobs_wait_in_redis_and_a_resume_cut_short_loses_none() {
    use crm_event_handler::queue::{JobQueue, Pause, PausedBy, redis::RedisQueue};
    let redis = Server::redis();
    let queue = RedisQueue::connect(&redis.uri, "pause-test", None, Duration::from_secs(60)).await.unwrap();
    let job = |n: u32| lead_job(&format!("r-{n}"));
    let pause = |by, probe_at_ms| Pause { by, reason: "test".into(), since_ms: 1, probe_at_ms, probe_job: None };
    assert!(queue.pause("meta-capi", pause(PausedBy::Breaker, Some(0))).await.unwrap());
    queue.enqueue((1..=3).map(job).collect()).await.unwrap();
    assert_eq!(queue.reserve(Duration::from_millis(300)).await.unwrap(), None, "all three wait");
    assert_eq!(queue.depth().await.unwrap().paused, 3);

    // The breaker's probe: the oldest waiting job, and only it.
    let probe = queue.probe("meta-capi", 1, 60_000).await.unwrap().expect("a probe");
    let reserved = queue.reserve(Duration::from_secs(2)).await.unwrap().expect("the probe job");
    assert_eq!((reserved.job.id.as_str(), reserved.probe, reserved.job.attempts), (probe.as_str(), true, 1));
    assert_eq!(queue.probe("meta-capi", 2, 60_000).await.unwrap(), None, "the next probe is not due");
    assert_eq!(queue.reserve(Duration::from_millis(300)).await.unwrap(), None);
    queue.ack(&reserved).await.unwrap();
    // The breaker does not replace an operator's pause.
    assert!(queue.pause("meta-capi", pause(PausedBy::Operator, None)).await.unwrap());
    assert!(!queue.pause("meta-capi", pause(PausedBy::Breaker, Some(0))).await.unwrap());
    assert_eq!(queue.resume("meta-capi", Some(PausedBy::Breaker)).await.unwrap(), None);

    // A resume cut short after it lifted the pause: its jobs are still in
    // the destination's list, and are moved back, none lost.
    let mut c = redis::Client::open(redis.uri.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("HDEL").arg("pause-test:paused").arg("meta-capi").query_async(&mut c).await.unwrap();
    assert!(queue.paused().await.unwrap().is_empty());
    assert_eq!(queue.reserve(Duration::from_millis(300)).await.unwrap(), None, "left waiting");
    assert_eq!(queue.drain_unpaused("meta-capi").await.unwrap(), 2);
    for _ in 0..2 {
        let j = queue.reserve(Duration::from_secs(2)).await.unwrap().expect("a job moved back");
        assert_eq!((j.job.attempts, j.probe), (1, false));
        queue.ack(&j).await.unwrap();
    }
    assert_eq!(queue.depth().await.unwrap().paused, 0);
}
