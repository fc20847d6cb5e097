//! The end-to-end scenarios every backend must pass (embedded, and
//! MongoDB with Redis): the real binary, started with `Flow::vars`, against the Meta and
//! Brevo stand-ins. Each suite calls them with its own setup.

use std::time::Duration;

use serde_json::{Value, json};

use super::*;

const WAIT: Duration = Duration::from_secs(60);

/// What a scenario needs: the host's variables and the two stand-ins.
pub struct Flow {
    pub vars: Vec<(&'static str, String)>,
    pub meta: StandIn,
    pub brevo: StandIn,
}

pub async fn receipt(host: &Host, id: &str) -> Value {
    get_json(&host.url, &format!("/api/v1/receipts/{id}")).await
}

/// The state of one action on a receipt.
pub fn action_state(receipt: &Value, destination: &str) -> (String, u64) {
    let a = receipt["actions"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["destination"] == destination))
        .unwrap_or_else(|| panic!("no {destination} action in {receipt}"));
    (a["state"].as_str().unwrap_or("").to_string(), a["attempts"].as_u64().unwrap_or(0))
}

pub async fn qualified_then_committed_for_the_same_deal_each_deliver_once(f: &Flow) {
    let host = Host::start(&f.vars).await;

    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload("D-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], false);
    eventually("the Lead event", WAIT, async || (f.meta.events().len() == 1).then_some(())).await;
    let lead = &f.meta.events()[0];
    assert_eq!(lead["event_name"], "Lead");
    assert_eq!(lead["user_data"]["em"][0], "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f");
    assert_eq!(f.meta.received()[0].path, "/v21.0/1234567890/events");
    assert_eq!(f.meta.received()[0].body["access_token"], "meta-token");

    // The same deal moving on to Committed is a new transition, not a duplicate.
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-1", "Committed")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], false);
    let committed_id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Purchase event and the e-mail", WAIT, async || {
        (f.meta.events().len() == 2 && f.brevo.sent_emails() == 1).then_some(())
    })
    .await;
    let purchase = &f.meta.events()[1];
    assert_eq!(purchase["event_name"], "Purchase");
    assert_eq!(
        purchase["custom_data"],
        json!({
            "value": 12_500_000.0,
            "currency": "USD",
            "deal_id": "D-1",
            "event_source": "crm",
            "lead_event_source": "crm",
        })
    );
    assert_ne!(purchase["event_id"], f.meta.events()[0]["event_id"]);
    let email = &f.brevo.received()[0];
    assert_eq!(email.headers["api-key"], "xkeysib-test");
    assert_eq!(email.body["to"][0]["email"], "john.doe@example.com");

    // The same Committed again: acknowledged as a duplicate, nothing more sent.
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-1", "Committed")).await;
    assert_eq!(status, 200);
    assert_eq!(body["duplicate"], true);
    assert_eq!(body["receipt_id"], committed_id.as_str());
    eventually("both Committed actions recorded as delivered", WAIT, async || {
        let r = receipt(&host, &committed_id).await;
        (action_state(&r, "meta-capi").0 == "delivered" && action_state(&r, "brevo").0 == "delivered").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.meta.received().len(), 2);
    assert_eq!(f.brevo.received().len(), 1);
}

pub async fn meta_failing_twice_is_retried_and_the_email_is_sent_once(f: &Flow) {
    let error = json!({ "error": { "message": "Service temporarily unavailable", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "x" } });
    f.meta.script([Scripted::new(500, error.clone()), Scripted::new(500, error)]);
    let host = Host::start(&f.vars).await;

    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-2", "Committed")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let r = eventually("Meta delivered on the third attempt", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "delivered").then_some(r)
    })
    .await;
    assert_eq!(action_state(&r, "meta-capi"), ("delivered".into(), 3));
    assert_eq!(action_state(&r, "brevo"), ("delivered".into(), 1));
    // Three requests, one event as Meta counts them (same event_id).
    assert_eq!(f.meta.received().len(), 3);
    assert_eq!(f.meta.unique_events().len(), 1);
    assert_eq!(f.brevo.sent_emails(), 1);
    assert_eq!(f.brevo.received().len(), 1);
}

pub async fn a_permanent_meta_error_is_dead_lettered_with_the_reason_and_can_be_replayed(f: &Flow) {
    let invalid_token = json!({ "error": { "message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190, "fbtrace_id": "y" } });
    f.meta.script([Scripted::new(400, invalid_token)]);
    let host = Host::start(&f.vars).await;

    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-3", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let letters = eventually("a dead letter", WAIT, async || {
        let l = get_json(&host.url, "/api/v1/dead-letters").await;
        (l["dead_letters"].as_array().is_some_and(|a| !a.is_empty())).then_some(l)
    })
    .await;
    let letter = &letters["dead_letters"][0];
    assert_eq!(letter["job"]["receipt_id"], id.as_str());
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("code 190") && reason.contains("Invalid OAuth access token"), "{reason}");
    // Permanent: one attempt only.
    assert_eq!(f.meta.received().len(), 1);
    let r = receipt(&host, &id).await;
    assert_eq!(action_state(&r, "meta-capi"), ("failed".into(), 1));
    assert!(r["actions"][0]["last_error"].as_str().unwrap().contains("code 190"));

    // The operator fixes the token and replays: delivered, same event_id.
    let replay = post_json(&host.url, "/api/v1/dead-letters/replay", &json!({ "job_id": letter["job"]["id"] })).await;
    assert_eq!(replay["replayed"].as_array().map(Vec::len), Some(1));
    eventually("the replayed delivery", WAIT, async || {
        (action_state(&receipt(&host, &id).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;
    assert_eq!(f.meta.unique_events().len(), 1);
}

pub async fn a_restart_between_accept_and_delivery_still_delivers_once(f: &Flow) {
    // Meta takes the first request and never answers: the host is killed
    // while the delivery is in flight.
    f.meta.hold(1);
    let mut host = Host::start(&f.vars).await;
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-5", "Qualified")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the delivery to be in flight", WAIT, async || (!f.meta.received().is_empty()).then_some(())).await;
    host.kill();
    f.meta.release();

    let host = Host::start(&f.vars).await;
    eventually("delivery after the restart", WAIT, async || {
        (action_state(&receipt(&host, &id).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;
    // Sent twice over the wire (the first answer was lost with the process),
    // one event as Meta counts them.
    assert_eq!(
        f.meta.unique_events(),
        vec![("Lead".to_string(), f.meta.events()[0]["event_id"].as_str().unwrap().to_string())]
    );
}

/// A job that takes its host down (here: the host is killed during each of
/// its attempts) spends its attempts and is dead-lettered, instead of taking
/// down every host that picks it up.
pub async fn a_job_that_keeps_killing_its_host_is_dead_lettered_once_its_budget_is_spent(f: &Flow) {
    let mut vars = f.vars.clone();
    vars.push(("RETRY_MAX_ATTEMPTS", "2".to_string()));
    f.meta.hold(10);
    let mut host = Host::start(&vars).await;
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("P-1", "Qualified")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    for attempt in 1..=2 {
        eventually("the attempt to be under way", WAIT, async || (f.meta.received().len() == attempt).then_some(()))
            .await;
        host.kill();
        host = Host::start(&vars).await;
    }
    let r = eventually("the job to be dead-lettered", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "failed").then_some(r)
    })
    .await;
    assert_eq!(
        r["actions"][0]["last_error"],
        "gave up after 2 attempts: 2 of them never finished (the host stopped while running them)"
    );
    let dead = get_json(&host.url, "/api/v1/dead-letters").await;
    assert_eq!(dead["dead_letters"].as_array().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.meta.received().len(), 2, "the job did not run a third time");
    f.meta.release();
}

/// For one deal and destination, a later status waits while an earlier one
/// is being retried (Meta wants a deal's stages in order); other deals and
/// other destinations are not held back.
pub async fn a_later_stage_waits_for_a_retried_earlier_one(f: &Flow) {
    let down = json!({ "error": { "message": "Service temporarily unavailable", "code": 2, "is_transient": true } });
    let mut busy = Scripted::new(503, down);
    busy.headers.push(("retry-after".into(), "2".into()));
    f.meta.script([busy]);
    let host = Host::start(&f.vars).await;
    let post = async |deal: &str, status: &str| {
        let (code, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, status)).await;
        assert_eq!(code, 200, "{body}");
    };
    post("O-1", "Qualified").await;
    eventually("the Lead's first attempt", WAIT, async || (!f.meta.received().is_empty()).then_some(())).await;
    // While the Lead waits out Meta's Retry-After, the deal moves on, and
    // another deal comes in.
    post("O-1", "Committed").await;
    post("O-2", "Qualified").await;
    eventually("everything delivered", WAIT, async || {
        (f.meta.unique_events().len() == 3 && f.brevo.sent_emails() == 1).then_some(())
    })
    .await;
    let sent: Vec<(String, String)> = f
        .meta
        .received()
        .iter()
        .flat_map(|r| r.body["data"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (e["custom_data"]["deal_id"].as_str().unwrap().to_string(), e["event_name"].as_str().unwrap().to_string())
        })
        .collect();
    let at = |deal: &str, name: &str| sent.iter().rposition(|(d, n)| d == deal && n == name).unwrap();
    let lead = at("O-1", "Lead");
    assert_eq!(sent.iter().filter(|(d, n)| d == "O-1" && n == "Lead").count(), 2, "{sent:?}");
    assert!(at("O-1", "Purchase") > lead, "the Purchase went out only after the Lead: {sent:?}");
    assert!(at("O-2", "Lead") < lead, "another deal was not held back: {sent:?}");
}

/// The receipts listing's answer for a query string (status, body).
async fn listing(host: &Host, query: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/receipts?{query}", host.url))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn references(page: &Value) -> Vec<String> {
    page["receipts"].as_array().unwrap().iter().map(|r| format!("{}/{}", r["reference"], r["status"])).collect()
}

pub async fn receipts_are_listed_a_page_at_a_time_with_filters(f: &Flow) {
    let host = Host::start(&f.vars).await;
    let mut received = Vec::new();
    for (deal, status) in [("LS-1", "Qualified"), ("LS-1", "Committed"), ("LS-2", "Qualified")] {
        let (code, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, status)).await;
        assert_eq!(code, 200, "{body}");
        received.push(receipt(&host, body["receipt_id"].as_str().unwrap()).await["received_at_ms"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually("every action delivered", WAIT, async || {
        let (_, page) = listing(&host, "limit=10").await;
        let receipts = page["receipts"].as_array().unwrap();
        let done = receipts.iter().flat_map(|r| r["actions"].as_array().unwrap()).all(|a| a["state"] == "delivered");
        (receipts.len() == 3 && done).then_some(())
    })
    .await;

    // Two pages, newest first, then the end.
    let (_, first) = listing(&host, "limit=2").await;
    assert_eq!(references(&first), [r#""LS-2"/"Qualified""#, r#""LS-1"/"Committed""#]);
    let cursor = first["next"].as_str().expect("a cursor to the next page");
    let (_, second) = listing(&host, &format!("limit=2&cursor={cursor}")).await;
    assert_eq!(references(&second), [r#""LS-1"/"Qualified""#]);
    assert!(second["next"].is_null(), "{second}");

    // Filters, alone and together.
    assert_eq!(references(&listing(&host, "reference=LS-1").await.1).len(), 2);
    assert_eq!(references(&listing(&host, "status=COMMITTED&provider=crm").await.1), [r#""LS-1"/"Committed""#]);
    assert_eq!(references(&listing(&host, "destination=brevo&state=delivered").await.1), [r#""LS-1"/"Committed""#]);
    assert!(references(&listing(&host, "state=failed").await.1).is_empty());
    assert!(references(&listing(&host, "provider=hubspot").await.1).is_empty());
    let window = format!("since_ms={}&until_ms={}", received[1], received[2]);
    assert_eq!(references(&listing(&host, &window).await.1), [r#""LS-1"/"Committed""#]);
    // Filters hold across pages, and the listing leaves attempt logs out.
    let (_, first) = listing(&host, "reference=LS-1&limit=1").await;
    assert_eq!(references(&first), [r#""LS-1"/"Committed""#]);
    assert!(first["receipts"][0]["actions"][0].get("log").is_none(), "{first}");
    let cursor = first["next"].as_str().unwrap();
    let (_, second) = listing(&host, &format!("reference=LS-1&limit=1&cursor={cursor}")).await;
    assert_eq!(references(&second), [r#""LS-1"/"Qualified""#]);

    // Bad filters are named.
    let (code, body) = listing(&host, "state=sideways").await;
    assert_eq!((code, body["code"].as_str()), (400, Some("invalid_query")), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("state"), "{body}");
    let (code, body) = listing(&host, "since_ms=99999999999999999999").await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = listing(&host, "colour=red").await;
    assert_eq!(code, 400);
    assert!(body["detail"].as_str().unwrap().contains("colour"), "{body}");
}

/// One destination as `GET /api/v1/destinations` shows it.
async fn destination(host: &Host, name: &str) -> Value {
    let all = get_json(&host.url, "/api/v1/destinations").await;
    all["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no destination {name} in {all}"))
}

pub async fn a_paused_destination_waits_without_spending_attempts_until_resumed(f: &Flow) {
    let host = Host::start(&f.vars).await;
    let paused =
        post_json(&host.url, "/api/v1/destinations/meta-capi/pause", &json!({ "reason": "Meta maintenance" })).await;
    assert_eq!(paused["paused"]["by"], "operator", "{paused}");

    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-P1", "Committed")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    // Brevo is not paused: the e-mail goes. Meta's job waits, unattempted.
    eventually("the e-mail", WAIT, async || (f.brevo.sent_emails() == 1).then_some(())).await;
    let meta = eventually("Meta's job waiting", WAIT, async || {
        let d = destination(&host, "meta-capi").await;
        (d["waiting"] == 1).then_some(d)
    })
    .await;
    assert_eq!(meta["paused"]["reason"], "Meta maintenance");
    assert_eq!(action_state(&receipt(&host, &id).await, "meta-capi"), ("pending".into(), 0));
    assert!(f.meta.received().is_empty());
    let ready = get_json(&host.url, "/ready").await;
    assert_eq!(ready["status"], "ready", "webhooks are still accepted: {ready}");
    assert_eq!(ready["paused_destinations"], json!([{ "destination": "meta-capi", "by": "operator" }]));
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("crm_destination_paused{destination=\"meta-capi\"} 1"), "{metrics}");
    assert!(metrics.contains("crm_queue_depth{queue=\"jobs\",state=\"paused\"} 1"), "{metrics}");

    let resumed = post_json(&host.url, "/api/v1/destinations/meta-capi/resume", &json!({})).await;
    assert_eq!((resumed["was_paused"].clone(), resumed["released"].clone()), (json!(true), json!(1)));
    eventually("Meta delivered after the resume", WAIT, async || {
        (action_state(&receipt(&host, &id).await, "meta-capi") == ("delivered".into(), 1)).then_some(())
    })
    .await;
    assert_eq!(f.meta.received().len(), 1);
    assert_eq!(destination(&host, "meta-capi").await["paused"], Value::Null);

    let unknown = reqwest::Client::new()
        .post(format!("{}/api/v1/destinations/slack/pause", host.url))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!((body["code"].as_str(), body["field"].as_str()), (Some("destination_not_found"), Some("name")));
    assert!(body["detail"].as_str().unwrap().contains("meta-capi"), "{body}");
}

pub async fn failures_in_a_row_open_the_breaker_and_a_delivered_probe_closes_it(f: &Flow) {
    const PROBE_AFTER: Duration = Duration::from_millis(1500);
    let mut vars = f.vars.clone();
    vars.extend([
        ("WORKERS", "1".to_string()),
        ("BREAKER_FAILURES", "3".to_string()),
        ("BREAKER_PROBE_AFTER_MS", PROBE_AFTER.as_millis().to_string()),
    ]);
    let down = json!({ "error": { "message": "Service temporarily unavailable", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "z" } });
    // Three failures open the breaker; the first probe fails too.
    f.meta.script(std::iter::repeat_n(Scripted::new(503, down), 4));
    let host = Host::start(&vars).await;
    // Five Lead jobs, due together.
    post_json(&host.url, "/api/v1/destinations/meta-capi/pause", &json!({})).await;
    let mut ids = Vec::new();
    for n in 1..=5 {
        let (_, body) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(&format!("D-B{n}"), "Qualified"))
                .await;
        ids.push(body["receipt_id"].as_str().unwrap().to_string());
    }
    post_json(&host.url, "/api/v1/destinations/meta-capi/resume", &json!({})).await;

    let open = eventually("the breaker open", WAIT, async || {
        let d = destination(&host, "meta-capi").await;
        (d["paused"]["by"] == "breaker").then_some(d)
    })
    .await;
    let reason = open["paused"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("3 deliveries in a row failed; the last:") && reason.contains("503"), "{reason}");
    assert_eq!(f.meta.received().len(), 3);
    // While it is open, the jobs not yet tried wait with no attempt spent.
    let untried = eventually("jobs waiting for the breaker", WAIT, async || {
        let mut untried = 0;
        for id in &ids {
            if action_state(&receipt(&host, id).await, "meta-capi") == ("pending".into(), 0) {
                untried += 1;
            }
        }
        (destination(&host, "meta-capi").await["waiting"].as_u64() >= Some(2)).then_some(untried)
    })
    .await;
    assert_eq!(untried, 2, "two jobs never ran");
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("crm_breaker_trips_total{destination=\"meta-capi\"} 1"), "{metrics}");

    eventually("every Lead delivered after a probe got through", WAIT, async || {
        let mut delivered = 0;
        for id in &ids {
            delivered += usize::from(action_state(&receipt(&host, id).await, "meta-capi").0 == "delivered");
        }
        (delivered == 5).then_some(())
    })
    .await;
    assert_eq!(destination(&host, "meta-capi").await["paused"], Value::Null, "resumed");
    // 3 failures, a failed probe, a delivered probe, then the other four.
    let sent = f.meta.received();
    assert_eq!(sent.len(), 9);
    // Meta heard nothing between the breaker opening and each probe.
    let quiet = PROBE_AFTER.mul_f64(0.9);
    assert!(sent[3].at - sent[2].at >= quiet, "the first probe came {:?} after the trip", sent[3].at - sent[2].at);
    assert!(sent[4].at - sent[3].at >= quiet, "the second probe came {:?} after the first", sent[4].at - sent[3].at);
}

pub async fn retention_purges_requests_then_removes_settled_receipts_and_dead_letters(f: &Flow) {
    // In days: requests purged after 1 s, receipts and dead letters removed after 5 s.
    let mut vars = f.vars.clone();
    vars.extend([
        ("RETENTION_DAYS", (5.0 / 86_400.0).to_string()),
        ("REQUEST_BODY_RETENTION_DAYS", (1.0 / 86_400.0).to_string()),
    ]);
    let invalid = json!({ "error": { "message": "Invalid parameter", "type": "OAuthException", "code": 100, "fbtrace_id": "r" } });
    f.meta.script([Scripted::new(400, invalid)]);
    let host = Host::start(&vars).await;
    let accept = async |deal: &str| {
        let (status, body) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, "Qualified")).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    // A dead letter, a delivered Lead, and a Lead waiting for its paused destination.
    let dead = accept("D-R1").await["receipt_id"].as_str().unwrap().to_string();
    eventually("a dead letter", WAIT, async || {
        (get_json(&host.url, "/api/v1/dead-letters").await["dead_letters"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let delivered = accept("D-R2").await["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead delivered", WAIT, async || {
        (action_state(&receipt(&host, &delivered).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;
    post_json(&host.url, "/api/v1/destinations/meta-capi/pause", &json!({})).await;
    let waiting = accept("D-R3").await["receipt_id"].as_str().unwrap().to_string();

    // First what the CRM sent goes; the receipt and its event stay.
    let purged = eventually("the delivered receipt's request purged", WAIT, async || {
        let r = receipt(&host, &delivered).await;
        r["request"]["purged_at_ms"].is_u64().then_some(r)
    })
    .await;
    assert_eq!((purged["request"]["body"].as_str(), purged["request"]["headers"].clone()), (Some(""), json!([])));
    let logged = &purged["actions"][0]["log"][0]["requests"][0];
    assert_eq!(logged["body_excerpt"], "", "the attempt log's request body is purged too: {logged}");
    assert_eq!(logged["response_status"], 200);
    assert_eq!(purged["event"]["reference"], "D-R2");

    // Then settled receipts and dead letters; the one still waiting stays.
    eventually("settled receipts and the dead letter removed", WAIT, async || {
        let gone = |r: Value| r["code"] == "receipt_not_found";
        let letters = get_json(&host.url, "/api/v1/dead-letters").await;
        (gone(receipt(&host, &dead).await)
            && gone(receipt(&host, &delivered).await)
            && letters["dead_letters"].as_array()?.is_empty())
        .then_some(())
    })
    .await;
    let kept = receipt(&host, &waiting).await;
    assert_eq!(action_state(&kept, "meta-capi"), ("pending".into(), 0), "{kept}");
    assert!(kept["request"]["purged_at_ms"].is_u64());
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("crm_retention_total{what=\"receipts\"} 2"), "{metrics}");
    assert!(metrics.contains("crm_retention_total{what=\"dead_letters\"} 1"), "{metrics}");
    // Its dedupe key went with it: the same webhook again is a new receipt.
    assert_eq!(accept("D-R2").await["duplicate"], false);
}
