//! The operator's web page, `/ui`, in a real headless Chromium (Debian's
//! `chromium`), driven by Playwright for Python (`tests/ui/drive.py`) as an
//! operator would use it. `./scripts/test.sh` installs both and sets
//! `UI_PYTHON`; the screenshots land in `$CARGO_TARGET_DIR/ui-screenshots`.

mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::flows::action_state;
use support::*;

const ADMIN_KEY: &str = "ui-admin-key-789";
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

async fn operator_get(host: &Host, path: &str) -> Value {
    let response =
        reqwest::Client::new().get(format!("{}{path}", host.url)).header("x-api-key", ADMIN_KEY).send().await.unwrap();
    response.json().await.unwrap()
}

#[tokio::test]
async fn an_operator_signs_in_finds_a_deal_sees_its_attempts_and_replays_dead_letters() {
    let python = std::env::var("UI_PYTHON")
        .expect("UI_PYTHON must name a Python with Playwright; ./scripts/test.sh installs one and sets it");
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi", "brevo"]);
    let (meta, brevo) = (StandIn::meta().await, StandIn::brevo().await);
    let mut vars = host_vars(&dir.path().join("data"), &plugins, &meta, &brevo);
    vars.push(("ADMIN_API_KEY", ADMIN_KEY.to_string()));
    let host = Host::start(&vars).await;

    // A deal whose Lead fails once (500), then goes.
    let down = json!({ "error": { "message": "Service temporarily unavailable", "type": "OAuthException", "code": 2, "is_transient": true, "fbtrace_id": "A1" } });
    meta.script([Scripted::new(500, down)]);
    let (_, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-UI-1", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead delivered on the second attempt", WAIT, async || {
        (action_state(&operator_get(&host, &format!("/api/v1/receipts/{id}")).await, "meta-capi")
            == ("delivered".into(), 2))
            .then_some(())
    })
    .await;
    // Two deals Meta refuses for good: dead letters. The second refusal's
    // message is HTML (a downstream's text reaches the page too).
    let invalid = json!({ "error": { "message": "Invalid parameter", "type": "OAuthException", "code": 100, "fbtrace_id": "B2" } });
    let hostile_reason = json!({ "error": { "message": "<img src=x id=injected>", "type": "OAuthException", "code": 100, "fbtrace_id": "B3" } });
    meta.script([Scripted::new(400, invalid), Scripted::new(400, hostile_reason)]);
    for deal in ["D-UI-2", "D-UI-3"] {
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, "Qualified")).await;
    }
    eventually("two dead letters", WAIT, async || {
        (operator_get(&host, "/api/v1/dead-letters").await["dead_letters"].as_array()?.len() == 2).then_some(())
    })
    .await;
    // A CRM (or whoever holds its key) sending HTML as a deal reference.
    let hostile = "<img src=x onerror=window.pwned=1>";
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(hostile, "Prospect")).await;
    assert_eq!(status, 200, "{body}");

    let shots = std::path::PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let run = Command::new(&python)
        .arg(repo().join("tests/ui/drive.py"))
        .env("UI_URL", &host.url)
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("DEAL", "D-UI-1")
        .env("DEAD_DEALS", "D-UI-2,D-UI-3")
        .env("HOSTILE_DEAL", hostile)
        .env("SCREENSHOTS", &shots)
        .output()
        .expect("run the browser");
    let said = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "the browser run failed:\n{said}");
    println!("{said}screenshots in {}", shots.display());

    // What the page did, as the service saw it: both dead letters replayed
    // and delivered, and brevo paused by the operator.
    eventually("the replayed Leads delivered", WAIT, async || {
        let letters = operator_get(&host, "/api/v1/dead-letters").await;
        (letters["dead_letters"].as_array()?.is_empty() && meta.unique_events().len() == 3).then_some(())
    })
    .await;
    let destinations = operator_get(&host, "/api/v1/destinations").await;
    let brevo_state = destinations["destinations"].as_array().unwrap().iter().find(|d| d["name"] == "brevo").unwrap();
    assert_eq!(brevo_state["paused"]["by"], "operator");
    assert_eq!(brevo_state["paused"]["reason"], "paused from the web page");
}
