//! The service on MongoDB (the nx-27017 wire-protocol stand-in) and Redis
//! Streams: the end-to-end scenarios again, concurrency, several host
//! processes sharing the work, and outages. Each test starts its own
//! servers on free ports.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    redis: Server,
    mongo: Server,
    meta: StandIn,
    brevo: StandIn,
    vars: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
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
    Setup { redis, mongo, meta, brevo, vars, _dir: dir }
}

async fn action_state(host: &Host, id: &str, destination: &str) -> (String, u64) {
    let r = get_json(&host.url, &format!("/api/v1/receipts/{id}")).await;
    let a = r["actions"].as_array().and_then(|a| a.iter().find(|a| a["destination"] == destination)).cloned().unwrap_or(Value::Null);
    (a["state"].as_str().unwrap_or("").to_string(), a["attempts"].as_u64().unwrap_or(0))
}

#[tokio::test]
async fn qualified_then_committed_then_duplicate_on_mongodb_and_redis() {
    let s = setup("flow").await;
    let host = Host::start(&s.vars).await;
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload("M-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("M-1", "Committed")).await;
    assert_eq!(body["duplicate"], false);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("Purchase and e-mail", WAIT, async || (s.meta.events().len() == 2 && s.brevo.sent_emails() == 1).then_some(())).await;
    let (_, again) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("M-1", "Committed")).await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["receipt_id"], id.as_str());
    eventually("both recorded delivered", WAIT, async || {
        (action_state(&host, &id, "meta-capi").await.0 == "delivered" && action_state(&host, &id, "brevo").await.0 == "delivered")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.meta.received().len(), 2);
    assert_eq!(s.brevo.received().len(), 1);
}

#[tokio::test]
async fn retries_and_dead_letters_on_mongodb_and_redis() {
    let s = setup("retry").await;
    let transient = json!({ "error": { "message": "temporarily unavailable", "code": 2, "is_transient": true } });
    let invalid = json!({ "error": { "message": "Invalid OAuth access token.", "code": 190 } });
    s.meta.script([Scripted::new(500, transient.clone()), Scripted::new(500, transient)]);
    let host = Host::start(&s.vars).await;
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("M-2", "Committed")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("Meta delivered on the third attempt", WAIT, async || {
        (action_state(&host, &id, "meta-capi").await == ("delivered".to_string(), 3)).then_some(())
    })
    .await;
    assert_eq!(s.meta.unique_events().len(), 1);
    eventually("one e-mail", WAIT, async || (s.brevo.sent_emails() == 1).then_some(())).await;

    s.meta.script([Scripted::new(400, invalid)]);
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("M-3", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let letters = eventually("a dead letter", WAIT, async || {
        let l = get_json(&host.url, "/api/v1/dead-letters").await;
        l["dead_letters"].as_array().is_some_and(|a| !a.is_empty()).then_some(l)
    })
    .await;
    assert!(letters["dead_letters"][0]["reason"].as_str().unwrap().contains("code 190"));
    assert_eq!(action_state(&host, &id, "meta-capi").await, ("failed".to_string(), 1));
    let replay: Value = reqwest::Client::new()
        .post(format!("{}/api/v1/dead-letters/replay", host.url))
        .header("x-api-key", API_KEY)
        .json(&json!({ "all": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replay["replayed"].as_array().map(Vec::len), Some(1));
    eventually("the replay delivered", WAIT, async || (action_state(&host, &id, "meta-capi").await.0 == "delivered").then_some(())).await;
}

#[tokio::test]
async fn a_restart_between_accept_and_delivery_still_delivers_once() {
    let s = setup("restart").await;
    s.meta.hold(1);
    let host = Host::start(&s.vars).await;
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("M-4", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the delivery in flight", WAIT, async || (!s.meta.received().is_empty()).then_some(())).await;
    host.kill();
    s.meta.release();
    let host = Host::start(&s.vars).await;
    eventually("delivery after the restart", WAIT, async || {
        (action_state(&host, &id, "meta-capi").await.0 == "delivered").then_some(())
    })
    .await;
    assert_eq!(s.meta.unique_events().len(), 1);
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
    eventually("the actions", WAIT, async || (s.meta.events().len() == 1 && s.brevo.sent_emails() == 1).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.meta.received().len(), 1);
    assert_eq!(s.brevo.received().len(), 1);
    let receipts = get_json(&host.url, "/api/v1/receipts?limit=1000").await;
    assert_eq!(receipts["receipts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn two_hosts_share_the_work_and_survive_one_being_killed() {
    let s = setup("scale").await;
    let a = Host::start(&s.vars).await;
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
                if let Ok(r) = sent {
                    if r.status() == 200 {
                        accepted.lock().unwrap().push(deal);
                    }
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
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-1", "Qualified")).await;
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
async fn mongodb_down_answers_503_and_recovers_without_restart() {
    let mut s = setup("mongo-outage").await;
    let host = Host::start(&s.vars).await;
    s.mongo.stop();
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("O-2", "Qualified")).await;
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
