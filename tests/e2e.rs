//! End to end: the real binary on 127.0.0.1:0 in embedded mode, with local
//! Meta and Brevo stand-ins. Each test has its own DATA_DIR and plugins.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    _dir: tempfile::TempDir,
    vars: Vec<(&'static str, String)>,
    meta: StandIn,
    brevo: StandIn,
}

async fn setup(extra: &[(&'static str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi", "brevo"]);
    let meta = StandIn::meta().await;
    let brevo = StandIn::brevo().await;
    let mut vars = host_vars(&dir.path().join("data"), &plugins, &meta, &brevo);
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push((k, v.to_string()));
    }
    Setup { _dir: dir, vars, meta, brevo }
}

async fn receipt(host: &Host, id: &str) -> Value {
    get_json(&host.url, &format!("/api/v1/receipts/{id}")).await
}

/// The state of one action on a receipt.
fn action_state(receipt: &Value, destination: &str) -> (String, u64) {
    let a = receipt["actions"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["destination"] == destination))
        .unwrap_or_else(|| panic!("no {destination} action in {receipt}"));
    (a["state"].as_str().unwrap_or("").to_string(), a["attempts"].as_u64().unwrap_or(0))
}

#[tokio::test]
async fn qualified_then_committed_for_the_same_deal_each_deliver_once() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;

    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_created", &payload("D-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], false);
    eventually("the Lead event", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
    let lead = &s.meta.events()[0];
    assert_eq!(lead["event_name"], "Lead");
    assert_eq!(lead["user_data"]["em"][0], "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f");
    assert_eq!(s.meta.received()[0].path, "/v21.0/1234567890/events");
    assert_eq!(s.meta.received()[0].body["access_token"], "meta-token");

    // The same deal moving on to Committed is a new transition, not a duplicate.
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-1", "Committed")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], false);
    let committed_id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Purchase event and the e-mail", WAIT, async || {
        (s.meta.events().len() == 2 && s.brevo.sent_emails() == 1).then_some(())
    })
    .await;
    let purchase = &s.meta.events()[1];
    assert_eq!(purchase["event_name"], "Purchase");
    assert_eq!(purchase["custom_data"], json!({ "value": 12_500_000.0, "currency": "USD", "deal_id": "D-1" }));
    assert_ne!(purchase["event_id"], s.meta.events()[0]["event_id"]);
    let email = &s.brevo.received()[0];
    assert_eq!(email.headers["api-key"], "xkeysib-test");
    assert_eq!(email.body["to"][0]["email"], "john.doe@example.com");

    // The same Committed again: acknowledged as a duplicate, nothing more sent.
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-1", "Committed")).await;
    assert_eq!(status, 200);
    assert_eq!(body["duplicate"], true);
    assert_eq!(body["receipt_id"], committed_id.as_str());
    eventually("both Committed actions recorded as delivered", WAIT, async || {
        let r = receipt(&host, &committed_id).await;
        (action_state(&r, "meta-capi").0 == "delivered" && action_state(&r, "brevo").0 == "delivered").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.meta.received().len(), 2);
    assert_eq!(s.brevo.received().len(), 1);
}

#[tokio::test]
async fn the_original_services_path_is_served_too() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;
    let (status, body) = post_webhook(&host.url, "/v1/webhooks/crm", "deal_created", &payload("D-old", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead event", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
}

#[tokio::test]
async fn meta_failing_twice_is_retried_and_the_email_is_sent_once() {
    let s = setup(&[]).await;
    let error = json!({ "error": { "message": "Service temporarily unavailable", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "x" } });
    s.meta.script([Scripted::new(500, error.clone()), Scripted::new(500, error)]);
    let host = Host::start(&s.vars).await;

    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-2", "Committed")).await;
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
    assert_eq!(s.meta.received().len(), 3);
    assert_eq!(s.meta.unique_events().len(), 1);
    assert_eq!(s.brevo.sent_emails(), 1);
    assert_eq!(s.brevo.received().len(), 1);
}

#[tokio::test]
async fn a_permanent_meta_error_is_dead_lettered_with_the_reason_and_can_be_replayed() {
    let s = setup(&[]).await;
    let invalid_token = json!({ "error": { "message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190, "fbtrace_id": "y" } });
    s.meta.script([Scripted::new(400, invalid_token)]);
    let host = Host::start(&s.vars).await;

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
    assert_eq!(s.meta.received().len(), 1);
    let r = receipt(&host, &id).await;
    assert_eq!(action_state(&r, "meta-capi"), ("failed".into(), 1));
    assert!(r["actions"][0]["last_error"].as_str().unwrap().contains("code 190"));

    // The operator fixes the token and replays: delivered, same event_id.
    let replay: Value = reqwest::Client::new()
        .post(format!("{}/api/v1/dead-letters/replay", host.url))
        .header("x-api-key", API_KEY)
        .json(&json!({ "job_id": letter["job"]["id"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replay["replayed"].as_array().map(Vec::len), Some(1));
    eventually("the replayed delivery", WAIT, async || {
        (action_state(&receipt(&host, &id).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;
    assert_eq!(s.meta.unique_events().len(), 1);
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered_after_the_configured_attempts() {
    let s = setup(&[("RETRY_MAX_ATTEMPTS", "3")]).await;
    let down = json!({ "error": { "message": "Please reduce the amount of data", "code": 1, "fbtrace_id": "z" } });
    s.meta.script((0..5).map(|_| Scripted::new(503, down.clone())));
    let host = Host::start(&s.vars).await;
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-4", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let r = eventually("the action to fail", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "failed").then_some(r)
    })
    .await;
    assert_eq!(action_state(&r, "meta-capi").1, 3);
    assert!(r["actions"][0]["last_error"].as_str().unwrap().starts_with("gave up after 3 attempts"));
    assert_eq!(s.meta.received().len(), 3);
}

#[tokio::test]
async fn a_restart_between_accept_and_delivery_still_delivers_once() {
    let s = setup(&[]).await;
    // Meta takes the first request and never answers: the host is killed
    // while the delivery is in flight.
    s.meta.hold(1);
    let host = Host::start(&s.vars).await;
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-5", "Qualified")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the delivery to be in flight", WAIT, async || (!s.meta.received().is_empty()).then_some(())).await;
    host.kill();
    s.meta.release();

    let host = Host::start(&s.vars).await;
    eventually("delivery after the restart", WAIT, async || {
        (action_state(&receipt(&host, &id).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;
    // Sent twice over the wire (the first answer was lost with the process),
    // one event as Meta counts them.
    assert_eq!(s.meta.unique_events(), vec![("Lead".to_string(), s.meta.events()[0]["event_id"].as_str().unwrap().to_string())]);
}

#[tokio::test]
async fn without_credentials_it_serves_and_fails_jobs_with_a_plain_reason() {
    let s = setup(&[]).await;
    let vars: Vec<_> = s.vars.iter().filter(|(k, _)| !k.starts_with("META_") && !k.starts_with("BREVO_")).cloned().collect();
    let host = Host::start(&vars).await;
    assert!(host.log_text().contains("destination meta-capi is not configured: set META_ACCESS_TOKEN and META_PIXEL_ID"));
    let (status, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-6", "Committed")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let r = eventually("both actions to fail", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "failed" && action_state(&r, "brevo").0 == "failed").then_some(r)
    })
    .await;
    let errors: Vec<&str> = r["actions"].as_array().unwrap().iter().map(|a| a["last_error"].as_str().unwrap()).collect();
    assert!(errors.contains(&"Meta is not configured: set META_ACCESS_TOKEN and META_PIXEL_ID"), "{errors:?}");
    assert!(errors.contains(&"Brevo is not configured: set BREVO_API_KEY and BREVO_SENDER_EMAIL"), "{errors:?}");
}

#[tokio::test]
async fn customer_text_reaches_the_email_escaped() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;
    let body = payload("D-7", "Committed").replace("4509 Ocean View Dr, Suite 200", "<img src=x onerror=alert(1)> & Co");
    let (status, _) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &body).await;
    assert_eq!(status, 200);
    eventually("the e-mail", WAIT, async || (s.brevo.sent_emails() == 1).then_some(())).await;
    let html = s.brevo.received()[0].body["htmlContent"].as_str().unwrap().to_string();
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt; &amp; Co"), "{html}");
    assert!(!html.contains("<img"));
}

#[tokio::test]
async fn plugin_run_prints_the_exact_requests_and_sends_nothing() {
    let s = setup(&[]).await;
    let run = |args: Vec<String>| {
        let vars = s.vars.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_crm-event-handler"))
                    .args(args)
                    .env_clear()
                    .envs(vars.iter().map(|(k, v)| (k.to_string(), v.clone())))
                    .current_dir(std::env::temp_dir())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8(out.stdout).unwrap()
            })
            .await
            .unwrap()
        }
    };
    let committed = repo().join("examples/payloads/committed.json").display().to_string();
    let out = run(vec!["plugin".into(), "run".into(), "brevo".into(), "--payload".into(), committed.clone()]).await;
    assert!(out.contains("== brevo action \"property-details-email\": 1 request(s), none sent"), "{out}");
    assert!(out.contains(&format!("POST {}/v3/smtp/email", s.brevo.url)), "{out}");
    assert!(out.contains("api-key: «redacted»"), "{out}");
    assert!(out.contains("\"idempotencyKey\""), "{out}");
    let out = run(vec!["plugin".into(), "run".into(), "meta-capi".into(), "--payload".into(), committed, "--show-secrets".into()]).await;
    assert!(out.contains("\"access_token\": \"meta-token\""), "{out}");
    assert!(out.contains("\"event_name\": \"Purchase\""), "{out}");
    let qualified = repo().join("examples/payloads/qualified.json").display().to_string();
    let out = run(vec!["plugin".into(), "run".into(), "crm".into(), "--payload".into(), qualified, "-H".into(), "x-event: deal_created".into()]).await;
    assert!(out.contains("\"event_type\": \"deal_created\"") && out.contains("\"reference\": \"D-927483-XYZ\""), "{out}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.meta.received().is_empty() && s.brevo.received().is_empty(), "the dry run sent something");
}
