//! End to end: the real binary on 127.0.0.1:0 in embedded mode, with local
//! Meta and Brevo stand-ins. Each test has its own DATA_DIR and plugins.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

use support::flows::{self, Flow, action_state, receipt};

struct Setup {
    _dir: tempfile::TempDir,
    flow: Flow,
}

impl std::ops::Deref for Setup {
    type Target = Flow;
    fn deref(&self) -> &Flow {
        &self.flow
    }
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
    Setup { _dir: dir, flow: Flow { vars, meta, brevo } }
}

#[tokio::test]
async fn qualified_then_committed_for_the_same_deal_each_deliver_once() {
    flows::qualified_then_committed_for_the_same_deal_each_deliver_once(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn receipts_are_listed_a_page_at_a_time_with_filters() {
    flows::receipts_are_listed_a_page_at_a_time_with_filters(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn meta_failing_twice_is_retried_and_the_email_is_sent_once() {
    flows::meta_failing_twice_is_retried_and_the_email_is_sent_once(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn a_permanent_meta_error_is_dead_lettered_with_the_reason_and_can_be_replayed() {
    flows::a_permanent_meta_error_is_dead_lettered_with_the_reason_and_can_be_replayed(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn a_job_that_keeps_killing_its_host_is_dead_lettered_once_its_budget_is_spent() {
    flows::a_job_that_keeps_killing_its_host_is_dead_lettered_once_its_budget_is_spent(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn a_later_stage_waits_for_a_retried_earlier_one() {
    flows::a_later_stage_waits_for_a_retried_earlier_one(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn a_paused_destination_waits_without_spending_attempts_until_resumed() {
    flows::a_paused_destination_waits_without_spending_attempts_until_resumed(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn failures_in_a_row_open_the_breaker_and_a_delivered_probe_closes_it() {
    flows::failures_in_a_row_open_the_breaker_and_a_delivered_probe_closes_it(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn a_destinations_concurrency_cap_from_the_routes_file_holds_the_next_delivery_back() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    let table = format!(
        "{}\n[destination.meta-capi]\nmax_concurrency = 1\n",
        std::fs::read_to_string(repo().join("host/src/routes.default.toml")).unwrap()
    );
    std::fs::write(&routes, table).unwrap();
    let s = setup(&[("ROUTES_FILE", routes.to_str().unwrap())]).await;
    // Meta leaves the first request hanging.
    s.meta.hold(1);
    let host = Host::start(&s.vars).await;
    for deal in ["D-CAP-1", "D-CAP-2"] {
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, "Qualified")).await;
    }
    eventually("the first Lead at Meta", WAIT, async || (s.meta.received().len() == 1).then_some(())).await;
    // With 64 workers and no cap, the second would be at Meta at once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.meta.received().len(), 1, "the second delivery waits for the first");
    s.meta.release();
    eventually("both Leads delivered", WAIT, async || (s.meta.unique_events().len() == 2).then_some(())).await;
    let shown = get_json(&host.url, "/api/v1/destinations").await;
    let meta = shown["destinations"].as_array().unwrap().iter().find(|d| d["name"] == "meta-capi").unwrap().clone();
    assert_eq!(meta["limits"], json!({ "max_concurrency": 1, "max_per_second": null }));
}

#[tokio::test]
async fn retention_purges_requests_then_removes_settled_receipts_and_dead_letters() {
    flows::retention_purges_requests_then_removes_settled_receipts_and_dead_letters(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn a_restart_between_accept_and_delivery_still_delivers_once() {
    flows::a_restart_between_accept_and_delivery_still_delivers_once(&setup(&[]).await.flow).await;
}

#[tokio::test]
async fn the_original_services_path_is_served_too() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;
    let (status, body) =
        post_webhook(&host.url, "/v1/webhooks/crm", "deal_created", &payload("D-old", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead event", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
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
async fn without_credentials_it_serves_and_fails_jobs_with_a_plain_reason() {
    let s = setup(&[]).await;
    let vars: Vec<_> =
        s.vars.iter().filter(|(k, _)| !k.starts_with("META_") && !k.starts_with("BREVO_")).cloned().collect();
    let host = Host::start(&vars).await;
    assert!(
        host.log_text().contains("destination meta-capi is not configured: set META_ACCESS_TOKEN and META_PIXEL_ID")
    );
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("D-6", "Committed")).await;
    assert_eq!(status, 200);
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let r = eventually("both actions to fail", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "failed" && action_state(&r, "brevo").0 == "failed").then_some(r)
    })
    .await;
    let errors: Vec<&str> =
        r["actions"].as_array().unwrap().iter().map(|a| a["last_error"].as_str().unwrap()).collect();
    assert!(errors.contains(&"Meta is not configured: set META_ACCESS_TOKEN and META_PIXEL_ID"), "{errors:?}");
    assert!(errors.contains(&"Brevo is not configured: set BREVO_API_KEY and BREVO_SENDER_EMAIL"), "{errors:?}");
}

#[tokio::test]
async fn customer_text_reaches_the_email_escaped() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;
    let body =
        payload("D-7", "Committed").replace("4509 Ocean View Dr, Suite 200", "<img src=x onerror=alert(1)> & Co");
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
    let run = async |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = cli(&args, &s.vars).await;
        assert!(ok, "{out}");
        out
    };
    let committed = repo().join("examples/payloads/committed.json").display().to_string();
    let out = run(vec!["plugin".into(), "run".into(), "brevo".into(), "--payload".into(), committed.clone()]).await;
    assert!(out.contains("== brevo action \"property-details-email\", attempt 1: 1 request(s), none sent"), "{out}");
    assert!(out.contains(&format!("POST {}/v3/smtp/email", s.brevo.url)), "{out}");
    assert!(out.contains("api-key: «redacted»"), "{out}");
    assert!(out.contains("\"idempotencyKey\""), "{out}");
    let out = run(vec![
        "plugin".into(),
        "run".into(),
        "meta-capi".into(),
        "--payload".into(),
        committed,
        "--show-secrets".into(),
    ])
    .await;
    assert!(out.contains("\"access_token\": \"meta-token\""), "{out}");
    assert!(out.contains("\"event_name\": \"Purchase\""), "{out}");
    let qualified = repo().join("examples/payloads/qualified.json").display().to_string();
    let out = run(vec![
        "plugin".into(),
        "run".into(),
        "crm".into(),
        "--payload".into(),
        qualified,
        "-H".into(),
        "x-event: deal_created".into(),
    ])
    .await;
    assert!(
        out.contains("\"event_type\": \"deal_created\"") && out.contains("\"reference\": \"D-927483-XYZ\""),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.meta.received().is_empty() && s.brevo.received().is_empty(), "the dry run sent something");

    // `plugin check` lists what the plugin reads and the grant behind each,
    // never a value.
    let folder = repo().join("plugins/meta-capi").display().to_string();
    let out = run(vec!["plugin".into(), "check".into(), folder]).await;
    assert!(out.contains("may read: META_CAPI_* (own name), META_*"), "{out}");
    assert!(out.contains("config.access_token: META_ACCESS_TOKEN (granted by META_*, set) secret required"), "{out}");
    assert!(out.contains("config.test_event_code: META_TEST_EVENT_CODE (granted by META_*, not set)"), "{out}");
    assert!(!out.contains("meta-token"), "{out}");
}

/// Run the binary with these arguments and variables: whether it
/// succeeded, and what it printed (stdout, then stderr).
async fn cli(args: &[&str], vars: &[(&str, String)]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-event-handler"))
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `plugin test` plays a script of answers, one per attempt: a 429 with
/// Retry-After, a transport failure, then a 200; the plugin's log lines and
/// each attempt's number are shown. A final answer ends the script. An
/// unset URL the allow-list names gets a placeholder origin.
#[tokio::test]
async fn plugin_test_plays_scripted_answers_attempt_by_attempt() {
    let s = setup(&[]).await;
    let committed = repo().join("examples/payloads/committed.json").display().to_string();
    let script = r#"[{"status": 429, "headers": {"Retry-After": "2"}, "body": {"error": {"message": "slow down", "code": 4}}},
                     {"error": "connection reset"},
                     {"status": 200, "body": {"events_received": 1, "fbtrace_id": "T1"}}]"#;
    let (ok, out) = cli(&["plugin", "test", "meta-capi", "--payload", &committed, "--answers", script], &s.vars).await;
    assert!(ok, "{out}");
    let attempts: Vec<&str> = out.split("== meta-capi action \"Purchase\", ").skip(1).collect();
    assert_eq!(attempts.len(), 3, "{out}");
    assert!(attempts[0].starts_with("attempt 1: 1 request(s), none sent"), "{out}");
    assert!(attempts[0].contains("log debug meta-capi: sending Purchase for deal D-927483-XYZ"), "{out}");
    assert!(
        attempts[0].contains(
            "given a 429 answer: retryable failure: Meta answered 429 (code 4): slow down; the host would try again \
             no sooner than 2000 ms"
        ),
        "{out}"
    );
    assert!(attempts[1].starts_with("attempt 2") && attempts[1].contains("could not reach Meta: connection reset"));
    assert!(
        attempts[2].starts_with("attempt 3") && attempts[2].contains("delivered (events_received=1 fbtrace_id=T1)")
    );

    // A final answer ends it, from the attempt asked for.
    let script = r#"[{"status": 400, "body": {"error": {"message": "bad", "code": 100}}}, {"status": 200}]"#;
    let (ok, out) =
        cli(&["plugin", "test", "meta-capi", "--payload", &committed, "--answers", script, "--attempt", "4"], &s.vars)
            .await;
    assert!(ok && out.contains("attempt 4:") && !out.contains("attempt 5"), "{out}");
    assert!(out.contains("permanent failure: Meta answered 400 (code 100): bad; dead-lettered"), "{out}");
    assert!(out.contains("(answers 2 and on are not used: no attempt follows)"), "{out}");
    // A required setting not set gets a placeholder, exempt from the
    // manifest's pattern for it.
    let mut no_pixel = s.vars.clone();
    no_pixel.retain(|(k, _)| *k != "META_PIXEL_ID");
    let (ok, out) = cli(&["plugin", "test", "meta-capi", "--payload", &committed], &no_pixel).await;
    assert!(ok && out.contains("/v21.0/<META_PIXEL_ID>/events"), "{out}");
    let (ok, out) = cli(&["plugin", "test", "meta-capi", "--payload", &committed, "--answers", "[{}]"], &s.vars).await;
    assert!(!ok && out.contains("answer 1: give either \"status\" or \"error\""), "{out}");

    // A destination whose URL setting has no default, and is not set.
    let dir = tempfile::tempdir().unwrap();
    let folder = plugins_dir(dir.path(), &["brevo"]).join("brevo");
    let manifest = std::fs::read_to_string(folder.join("plugin.toml")).unwrap();
    let manifest = manifest.replace("default = \"https://api.brevo.com\"\n", "required = true\n");
    std::fs::write(folder.join("plugin.toml"), manifest).unwrap();
    let mut vars = s.vars.clone();
    vars.retain(|(k, _)| *k != "BREVO_API_URL");
    let (ok, out) = cli(&["plugin", "test", folder.to_str().unwrap(), "--payload", &committed], &vars).await;
    assert!(ok, "{out}");
    assert!(out.contains("POST https://brevo-api-url.placeholder.invalid/v3/smtp/email"), "{out}");
    assert!(
        out.contains(
            "note: BREVO_API_URL is not set; using the placeholder origin https://brevo-api-url.placeholder.invalid"
        ),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(s.meta.received().is_empty() && s.brevo.received().is_empty(), "the test sent something");
}

/// `plugin test --receipt` replays what a live version sent through a
/// candidate folder: the same code shows no difference; a candidate that
/// changes one field shows exactly that field.
#[tokio::test]
async fn plugin_test_replays_a_receipt_through_a_candidate_and_shows_the_difference() {
    let s = setup(&[("PLUGIN_SHADOWS", "meta-capi-next=meta-capi")]).await;
    let host = Host::start(&s.vars).await;
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("RP-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
    eventually("the attempt logged", WAIT, async || {
        let r = get_json(&host.url, &format!("/api/v1/receipts/{id}")).await;
        (r["actions"][0]["state"] == "delivered").then_some(())
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let candidate = plugins_dir(dir.path(), &["meta-capi"]).join("meta-capi");
    let live_manifest = std::fs::read_to_string(candidate.join("plugin.toml")).unwrap();
    let as_candidate = |manifest: &str| {
        let manifest = manifest
            .replace("name = \"meta-capi\"", "name = \"meta-capi-next\"\nshadow_of = \"meta-capi\"")
            .replace("version = \"0.1.0\"", "version = \"0.2.0-rc1\"");
        std::fs::write(candidate.join("plugin.toml"), manifest).unwrap();
    };
    let replay = async || {
        let path = candidate.to_str().unwrap().to_string();
        cli(&["plugin", "test", &path, "--receipt", &id, "--url", &host.url], &s.vars).await
    };

    as_candidate(&live_manifest);
    let (ok, out) = replay().await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("== receipt {id}, meta-capi action \"Lead\", attempt 1: sent by meta-capi 0.1.0")));
    assert!(out.contains("replayed through meta-capi-next 0.2.0-rc1"), "{out}");
    assert!(out.contains("the same: 1 request(s) with the same method, URL and body, and the outcome delivered"));

    as_candidate(&live_manifest.replace("default = \"system_generated\"", "default = \"email\""));
    let (ok, out) = replay().await;
    assert!(ok, "{out}");
    assert!(out.contains("body data[0].action_source: sent \"system_generated\", replayed \"email\""), "{out}");
    assert!(!out.contains("the same:") && !out.contains("meta-token"), "{out}");

    let (ok, out) = cli(&["plugin", "test", "crm", "--receipt", &id, "--url", &host.url], &s.vars).await;
    assert!(!ok && out.contains("crm is a source; --receipt replays a destination's actions"), "{out}");
}

/// A tmpfs mounted for one test (the service's DATA_DIR), unmounted after.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test fills a small tmpfs and needs root to mount it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_path_buf())
    }

    /// Take every byte left, in a file `delete` gives back.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let mut byte = [0u8; 1];
        while f.write_all(&byte).is_ok() {
            byte[0] = 1;
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_is_reported_and_writes_resume_once_it_clears() {
    let s = setup(&[]).await;
    let root = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&root.path().join("data"), "3m");
    let mut vars = s.vars.clone();
    vars.retain(|(k, _)| *k != "DATA_DIR");
    vars.push(("DATA_DIR", disk.0.display().to_string()));
    // Compiled plugins are megabytes: keep them off the small disk.
    vars.push(("PLUGIN_CACHE_DIR", root.path().join("cache").display().to_string()));
    let host = Host::start(&vars).await;
    let mut accepted = Vec::new();
    for i in 0..5 {
        let deal = format!("F-{i}");
        let (status, _) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(&deal, "Qualified")).await;
        assert_eq!(status, 200);
        accepted.push(deal);
    }

    let filler = disk.fill();
    let mut refused = None;
    for i in 0..200 {
        let deal = format!("F-full-{i}");
        let (status, body) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(&deal, "Qualified")).await;
        match status {
            200 => accepted.push(deal),
            503 => {
                refused = Some(body);
                break;
            }
            other => panic!("{other}: {body}"),
        }
    }
    let refused = refused.expect("a full disk must refuse webhooks with 503");
    assert!(matches!(refused["code"].as_str(), Some("store_unavailable" | "queue_unavailable")), "{refused}");
    let ready = reqwest::get(format!("{}/ready", host.url)).await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "/ready must not say all is well while writes are refused; {}",
        host.log_text().lines().filter(|l| l.contains("ERROR") || l.contains("error")).collect::<Vec<_>>().join("\n")
    );
    let ready: serde_json::Value = ready.json().await.unwrap();
    let reasons = format!("{} {}", ready["checks"]["store"], ready["checks"]["queue"]);
    assert!(reasons.contains("storage fault"), "{ready}");

    std::fs::remove_file(filler).unwrap();
    let deal = "F-after".to_string();
    eventually("writes to resume", WAIT, async || {
        let (status, _) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(&deal, "Qualified")).await;
        (status == 200).then_some(())
    })
    .await;
    accepted.push(deal);
    eventually("/ready to recover", WAIT, async || {
        (reqwest::get(format!("{}/ready", host.url)).await.unwrap().status() == 200).then_some(())
    })
    .await;
    // Nothing that was answered 200 is lost.
    eventually("every accepted webhook delivered", WAIT, async || {
        let delivered: Vec<String> =
            s.meta.events().iter().filter_map(|e| e["custom_data"]["deal_id"].as_str().map(str::to_string)).collect();
        accepted.iter().all(|d| delivered.contains(d)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_delivered_action_is_sent_again_only_when_forced_and_the_answer_warns_past_the_dedupe_window() {
    let s = setup(&[]).await;
    let plugins = std::path::PathBuf::from(&s.vars.iter().find(|(k, _)| *k == "PLUGINS_DIR").unwrap().1);
    // Meta's real window is 48 h; a second here, so the test can pass it.
    let manifest = plugins.join("meta-capi/plugin.toml");
    let text =
        std::fs::read_to_string(&manifest).unwrap().replace("dedupe_window_secs = 172800", "dedupe_window_secs = 1");
    std::fs::write(&manifest, text).unwrap();
    let host = Host::start(&s.vars).await;
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("RP-1", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
    eventually("the delivery recorded", WAIT, async || {
        (action_state(&receipt(&host, &id).await, "meta-capi").0 == "delivered").then_some(())
    })
    .await;

    let replay = async |body: &str| {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/receipts/{id}/replay", host.url))
            .header("x-api-key", API_KEY)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    };
    let (status, answer) = replay("{}").await;
    assert_eq!((status, answer["code"].as_str()), (409, Some("already_delivered")), "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("meta-capi/Lead"), "{answer}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, answer) = replay(r#"{"destination": "meta-capi", "force": true}"#).await;
    assert_eq!(status, 200, "{answer}");
    let replayed = &answer["replayed"][0];
    assert_eq!(replayed["action"], "Lead");
    assert!(replayed["note"].as_str().unwrap().contains("may arrive twice"), "{answer}");
    eventually("the Lead sent again", WAIT, async || (s.meta.events().len() == 2).then_some(())).await;
    assert_eq!(s.meta.unique_events().len(), 1, "the same event_id, for Meta to deduplicate while it can");
    // The receipt shows the resend as the action's second attempt.
    eventually("the resend recorded", WAIT, async || {
        let state = action_state(&receipt(&host, &id).await, "meta-capi");
        (state == ("delivered".to_string(), 2)).then_some(())
    })
    .await;
    let (status, _) = replay(r#"{"destination": "nowhere"}"#).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn metas_transient_codes_are_retried_under_400_and_brevo_keeps_one_uuid_key() {
    let s = setup(&[]).await;
    let meta_error =
        |code: i64| Scripted::new(400, json!({ "error": { "message": "throttled", "code": code, "fbtrace_id": "t" } }));
    // 613 (calls within one hour), then 80004 (ads insights rate limit): both
    // retryable though Meta answers 400.
    s.meta.script([meta_error(613), meta_error(80004)]);
    s.brevo.script([Scripted::new(500, json!({ "code": "internal_error", "message": "try later" }))]);
    let host = Host::start(&s.vars).await;
    let (_, body) = post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("TC-1", "Committed")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    let r = eventually("both actions delivered", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "delivered" && action_state(&r, "brevo").0 == "delivered").then_some(r)
    })
    .await;
    assert_eq!(action_state(&r, "meta-capi").1, 3);
    assert_eq!(s.meta.unique_events().len(), 1, "one event_id over the three attempts");
    let keys: Vec<String> =
        s.brevo.received().iter().map(|r| r.body["headers"]["idempotencyKey"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the retry carries the same key");
    let uuid = |k: &str| {
        let parts: Vec<&str> = k.split('-').collect();
        parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
            && k.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
    };
    assert!(uuid(&keys[0]), "Brevo wants a UUID: {}", keys[0]);
}

#[tokio::test]
async fn sigterm_stops_intake_lets_the_delivery_in_flight_finish_and_exits_0() {
    let s = setup(&[]).await;
    let mut host = Host::start(&s.vars).await;
    s.meta.hold(1);
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("TERM-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead in flight", WAIT, async || (s.meta.received().len() == 1).then_some(())).await;

    host.terminate();
    // Intake stops while the delivery in hand runs: readiness goes false for
    // the load balancer, and new webhooks are refused with a reason.
    eventually("not ready", WAIT, async || {
        let ready = reqwest::get(format!("{}/ready", host.url)).await.unwrap();
        let status = ready.status();
        let body: serde_json::Value = ready.json().await.unwrap();
        (status == 503 && body["status"] == "stopping").then_some(())
    })
    .await;
    let (status, refused) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("TERM-2", "Qualified")).await;
    assert_eq!(status, 503);
    assert_eq!(refused["code"], "shutting_down", "{refused}");
    assert_eq!(host.exit_code(Duration::from_millis(500)).await, None, "it must wait for the delivery in hand");

    s.meta.release();
    assert_eq!(host.exit_code(WAIT).await, Some(0), "{}", host.log_text());
    // The outcome was recorded before it stopped: after a restart nothing
    // is sent again, and the refused webhook left no receipt.
    let host = Host::start(&s.vars).await;
    assert_eq!(action_state(&receipt(&host, &id).await, "meta-capi").0, "delivered");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.meta.received().len(), 1);
    let listed = get_json(&host.url, "/api/v1/receipts").await;
    assert!(!listed.to_string().contains("TERM-2"), "{listed}");
}

#[tokio::test]
async fn a_delivery_past_the_shutdown_timeout_is_cut_off_and_runs_again_after_the_restart() {
    let s = setup(&[("SHUTDOWN_TIMEOUT_MS", "300")]).await;
    let mut host = Host::start(&s.vars).await;
    s.meta.hold(1);
    let (_, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("TERM-3", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap().to_string();
    eventually("the Lead in flight", WAIT, async || (s.meta.received().len() == 1).then_some(())).await;
    host.terminate();
    assert_eq!(host.exit_code(Duration::from_secs(10)).await, Some(0), "{}", host.log_text());
    assert!(host.log_text().contains("were cut off"), "{}", host.log_text());
    s.meta.release();

    let host = Host::start(&s.vars).await;
    eventually("the Lead sent again", WAIT, async || (s.meta.received().len() == 2).then_some(())).await;
    let receipt = eventually("the Lead delivered", WAIT, async || {
        let r = receipt(&host, &id).await;
        (action_state(&r, "meta-capi").0 == "delivered").then_some(r)
    })
    .await;
    // The attempt cut off counts: two attempts for one delivery.
    assert_eq!(action_state(&receipt, "meta-capi").1, 2, "{receipt}");
}

#[tokio::test]
async fn the_receipt_keeps_each_attempt_with_its_request_and_answer_and_no_secret() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;
    let failure = json!({"error": {"message": "An unknown error occurred", "type": "OAuthException", "code": 1, "fbtrace_id": "Fail1"}});
    s.meta.script([Scripted::new(500, failure)]);
    let (_, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("LOG-1", "Qualified")).await;
    let id = body["receipt_id"].as_str().unwrap();
    let receipt = eventually("the Lead delivered", WAIT, async || {
        let r = receipt(&host, id).await;
        (action_state(&r, "meta-capi").0 == "delivered").then_some(r)
    })
    .await;
    let action = receipt["actions"].as_array().unwrap().iter().find(|a| a["destination"] == "meta-capi").unwrap();
    let log = action["log"].as_array().unwrap_or_else(|| panic!("no attempt log: {action}"));
    assert_eq!(log.len(), 2, "{action}");
    let (first, second) = (&log[0], &log[1]);
    assert_eq!(
        (first["attempt"].as_u64(), first["outcome"].as_str(), first["status"].as_u64()),
        (Some(1), Some("retryable"), Some(500))
    );
    assert_eq!(
        (second["attempt"].as_u64(), second["outcome"].as_str(), second["status"].as_u64()),
        (Some(2), Some("delivered"), Some(200))
    );
    for attempt in log {
        assert_eq!(attempt["plugin_version"], "0.1.0");
        assert!(attempt["duration_ms"].is_u64() && attempt["started_at_ms"].as_u64() > Some(0));
        let request = &attempt["requests"][0];
        assert_eq!(request["method"], "POST");
        assert!(request["url"].as_str().unwrap().ends_with("/1234567890/events"), "{request}");
        assert!(request["body_excerpt"].as_str().unwrap().contains("\"Lead\""), "{request}");
    }
    assert_eq!(first["requests"][0]["response_status"], 500);
    assert!(first["requests"][0]["response_excerpt"].as_str().unwrap().contains("Fail1"), "{first}");
    assert!(second["requests"][0]["response_excerpt"].as_str().unwrap().contains("fbtrace_id"), "{second}");
    // The token Meta's body carries is stored redacted, and no header is kept.
    let text = receipt.to_string();
    assert!(!text.contains("meta-token"), "{text}");
    assert!(
        first["requests"][0]["body_excerpt"].as_str().unwrap().contains(r#""access_token":"«redacted»""#),
        "{first}"
    );
    assert!(first["requests"][0].get("headers").is_none());
}

#[tokio::test]
async fn a_lasting_backlog_e_mails_the_operators_once_per_cooldown() {
    let s = setup(&[
        ("RETRY_BASE_DELAY_MS", "5000"),
        ("ALERT_QUEUE_WAITING_THRESHOLD", "2"),
        ("ALERT_QUEUE_BACKLOG_MINUTES", "0.02"),
        ("ALERT_QUEUE_COOLDOWN_MINUTES", "10"),
        ("ALERT_RECIPIENTS", "ops@example.com, oncall@example.com"),
    ])
    .await;
    s.meta.script((0..50).map(|_| Scripted::new(500, json!({"error": {"message": "down", "code": 2}}))));
    let host = Host::start(&s.vars).await;
    for deal in ["BL-1", "BL-2", "BL-3"] {
        let (status, _) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, "Qualified")).await;
        assert_eq!(status, 200);
    }
    let emails = eventually("the alert e-mail", WAIT, async || {
        let emails = s.brevo.operator_alerts();
        (!emails.is_empty()).then_some(emails)
    })
    .await;
    let email = &emails[0];
    assert_eq!(email["to"], json!([{ "email": "ops@example.com" }, { "email": "oncall@example.com" }]));
    assert_eq!(email["subject"], "crm-event-handler: 3 jobs waiting");
    assert!(email["textContent"].as_str().unwrap().contains("3 due again after a failure"), "{email}");
    // Still backlogged, but inside the cooldown: no second e-mail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.brevo.operator_alerts().len(), 1);
    assert!(host.log_text().contains("alert: 3 jobs have been waiting"), "{}", host.log_text());
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"crm_alerts_total{kind="queue_backlog",outcome="sent"} 1"#), "{metrics}");
}

#[tokio::test]
async fn a_dead_letter_e_mails_the_operators() {
    let s = setup(&[("ALERT_RECIPIENTS", "ops@example.com")]).await;
    s.meta.script([Scripted::new(400, json!({"error": {"message": "Invalid parameter", "code": 100}}))]);
    let host = Host::start(&s.vars).await;
    let (status, _) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("DL-1", "Qualified")).await;
    assert_eq!(status, 200);
    let emails = eventually("the alert e-mail", WAIT, async || {
        let emails = s.brevo.operator_alerts();
        (!emails.is_empty()).then_some(emails)
    })
    .await;
    assert_eq!(emails[0]["subject"], "crm-event-handler: 1 job(s) dead-lettered");
    assert!(emails[0]["textContent"].as_str().unwrap().contains("/api/v1/dead-letters"));
}

#[tokio::test]
async fn one_destinations_dead_letters_are_listed_and_replayed_together() {
    let s = setup(&[]).await;
    let host = Host::start(&s.vars).await;
    let refused = |message: &str| Scripted::new(400, json!({"error": {"message": message, "code": 100}}));
    // A Lead Meta refuses; then a Committed deal whose e-mail Brevo refuses.
    s.meta.script([refused("Invalid parameter")]);
    post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("DLR-1", "Qualified")).await;
    eventually("Meta's dead letter", WAIT, async || {
        (get_json(&host.url, "/api/v1/dead-letters").await["dead_letters"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    s.brevo.script([refused("invalid sender")]);
    post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("DLR-2", "Committed")).await;
    eventually("Brevo's dead letter", WAIT, async || {
        (get_json(&host.url, "/api/v1/dead-letters").await["dead_letters"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;

    assert_eq!(s.brevo.sent_emails(), 0);
    let brevo = get_json(&host.url, "/api/v1/dead-letters?destination=brevo").await;
    let listed = brevo["dead_letters"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{brevo}");
    assert_eq!(listed[0]["job"]["destination"], "brevo");
    let replayed = post_json(&host.url, "/api/v1/dead-letters/replay", &json!({ "destination": "brevo" })).await;
    assert_eq!(replayed["replayed"].as_array().unwrap().len(), 1, "{replayed}");
    eventually("the e-mail sent", WAIT, async || (s.brevo.sent_emails() == 1).then_some(())).await;
    // Meta's stays, untouched.
    let left = get_json(&host.url, "/api/v1/dead-letters").await;
    let left = left["dead_letters"].as_array().unwrap();
    assert_eq!((left.len(), left[0]["job"]["destination"].as_str()), (1, Some("meta-capi")));
}

#[tokio::test]
async fn an_empty_plugin_folder_runs_on_the_bundled_plugins_and_a_folder_overrides_one() {
    let s = setup(&[("BUNDLED_PLUGINS", "crm,meta-capi,brevo")]).await;
    let empty = tempfile::tempdir().unwrap();
    let mut vars = s.vars.clone();
    vars.retain(|(k, _)| *k != "PLUGINS_DIR");
    vars.push(("PLUGINS_DIR", empty.path().display().to_string()));
    let host = Host::start(&vars).await;
    let (status, body) =
        post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload("BU-1", "Qualified")).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Lead", WAIT, async || (s.meta.events().len() == 1).then_some(())).await;
    drop(host);
    // The dry run too, outside any build tree.
    let dry = std::process::Command::new(env!("CARGO_BIN_EXE_crm-event-handler"))
        .args(["plugin", "run", "crm", "--payload"])
        .arg(repo().join("examples/payloads/qualified.json"))
        .args(["-H", "x-event: deal_created"])
        .env("PLUGINS_DIR", empty.path())
        .current_dir(empty.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && said.contains("crm parsed the payload"),
        "{said}{}",
        String::from_utf8_lossy(&dry.stderr)
    );

    // A folder providing crm (under any folder name) takes its place.
    let over = tempfile::tempdir().unwrap();
    let copied = plugins_dir(over.path(), &["crm"]);
    std::fs::rename(copied.join("crm"), copied.join("crm-local")).unwrap();
    let manifest = copied.join("crm-local/plugin.toml");
    std::fs::write(
        &manifest,
        std::fs::read_to_string(&manifest).unwrap().replace("version = \"0.1.0\"", "version = \"0.1.1\""),
    )
    .unwrap();
    vars.retain(|(k, _)| *k != "PLUGINS_DIR");
    vars.push(("PLUGINS_DIR", copied.display().to_string()));
    let host = Host::start(&vars).await;
    let listed = get_json(&host.url, "/api/v1/plugins").await;
    let version = |name: &str| {
        listed["plugins"].as_array().unwrap().iter().find(|p| p["name"] == name).map(|p| p["version"].clone())
    };
    assert_eq!(version("crm"), Some(json!("0.1.1")), "{listed}");
    assert_eq!(version("meta-capi"), Some(json!("0.1.0")), "bundled: {listed}");
}

/// Shadow mode, from the attacker's side too: a candidate folder that
/// shadows meta-capi gets meta-capi's settings (its token included) and is
/// pointed at another server; it runs beside every Meta job, but nothing it
/// asks for is ever sent, and no secret shows in what is reported.
#[tokio::test]
async fn a_shadow_candidate_runs_beside_the_live_destination_is_compared_and_never_sent() {
    let elsewhere = StandIn::meta().await;
    // The operator lets it shadow meta-capi, and points it elsewhere (an
    // origin the operator sets is one it may reach).
    let s = setup(&[
        ("META_NEXT_GRAPH_URL", &elsewhere.url),
        ("META_NEXT_TOKEN", "next-secret-token-value"),
        ("PLUGIN_SHADOWS", "meta-capi-next=meta-capi"),
    ])
    .await;
    let plugins = std::path::PathBuf::from(&s.vars.iter().find(|(k, _)| *k == "PLUGINS_DIR").unwrap().1);
    let live_manifest = std::fs::read_to_string(plugins.join("meta-capi/plugin.toml")).unwrap();
    let candidate = plugins.join("meta-capi-next");
    std::fs::create_dir_all(&candidate).unwrap();
    std::fs::copy(plugins.join("meta-capi/meta-capi.wasm"), candidate.join("meta-capi.wasm")).unwrap();
    let write_candidate = |version: &str, changes: &[(&str, String)]| {
        let mut manifest = live_manifest
            .replace("name = \"meta-capi\"", "name = \"meta-capi-next\"\nshadow_of = \"meta-capi\"")
            .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
        for (from, to) in changes {
            assert!(manifest.contains(from), "{from}");
            manifest = manifest.replace(from, to);
        }
        std::fs::write(candidate.join("plugin.toml"), manifest).unwrap();
    };
    // The candidate reads its URL and token from other variables (so its
    // body parts from the live one inside the token), and sends another
    // action_source.
    write_candidate(
        "0.2.0-rc1",
        &[
            (
                "env = \"META_GRAPH_URL\"\ndefault = \"https://graph.facebook.com\"",
                format!("env = \"META_NEXT_GRAPH_URL\"\ndefault = \"{}\"", elsewhere.url),
            ),
            (
                "env = \"META_ACTION_SOURCE\"\ndefault = \"system_generated\"",
                "env = \"META_NEXT_ACTION_SOURCE\"\ndefault = \"email\"".into(),
            ),
            ("env = \"META_ACCESS_TOKEN\"", "env = \"META_NEXT_TOKEN\"".into()),
        ],
    );
    let host = Host::start(&s.vars).await;
    let shadow_of = async |deal: &str| {
        let (_, body) =
            post_webhook(&host.url, "/api/v1/webhook/crm", "deal_updated", &payload(deal, "Qualified")).await;
        let id = body["receipt_id"].as_str().unwrap().to_string();
        eventually("the Lead delivered", WAIT, async || {
            let r = receipt(&host, &id).await;
            (action_state(&r, "meta-capi").0 == "delivered").then(|| r["actions"][0]["log"][0]["shadow"].clone())
        })
        .await
    };

    let shadow = shadow_of("D-SH-1").await;
    assert_eq!((shadow["candidate"].as_str(), shadow["version"].as_str()), (Some("meta-capi-next"), Some("0.2.0-rc1")));
    assert_eq!((shadow["matched"].as_bool(), shadow["outcome"].as_str()), (Some(false), Some("delivered")), "{shadow}");
    let differences = shadow["differences"].to_string();
    assert!(differences.contains(&format!("candidate {}/v21.0/1234567890/events", elsewhere.url)), "{differences}");
    // Both tokens are redacted before the bodies are compared for display:
    // the first difference shown is the action_source, not the tokens.
    assert!(differences.contains("\\\"email\\\""), "{differences}");
    for secret in ["meta-token", "next-secret", "token-value"] {
        assert!(!differences.contains(secret), "a secret in the comparison: {differences}");
    }
    // Only the live request went out.
    assert_eq!(s.meta.received().len(), 1);
    assert!(elsewhere.received().is_empty(), "the candidate's request was sent");
    let plugins_listed = get_json(&host.url, "/api/v1/plugins").await;
    let listed = plugins_listed["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "meta-capi-next").unwrap();
    assert_eq!(listed["shadow_of"], "meta-capi");
    let destinations = get_json(&host.url, "/api/v1/destinations").await;
    assert!(!destinations.to_string().contains("meta-capi-next"), "a candidate is no destination: {destinations}");
    // A folder the operator did not let shadow meta-capi gets none of its settings.
    let uninvited = plugins.join("meta-capi-evil");
    std::fs::create_dir_all(&uninvited).unwrap();
    std::fs::copy(candidate.join("meta-capi.wasm"), uninvited.join("meta-capi.wasm")).unwrap();
    let evil =
        std::fs::read_to_string(candidate.join("plugin.toml")).unwrap().replace("meta-capi-next", "meta-capi-evil");
    std::fs::write(uninvited.join("plugin.toml"), evil).unwrap();
    let refused = eventually("the uninvited candidate refused", WAIT, async || {
        let listed = get_json(&host.url, "/api/v1/plugins").await;
        listed["load_errors"]
            .as_array()?
            .iter()
            .find(|e| e["dir"].as_str().is_some_and(|d| d.ends_with("meta-capi-evil")))
            .cloned()
    })
    .await;
    assert!(refused["error"].as_str().unwrap().contains("PLUGIN_SHADOWS=\"meta-capi-evil=meta-capi\""), "{refused}");
    std::fs::remove_dir_all(&uninvited).unwrap();

    // A candidate that sends what the live version sends matches.
    write_candidate("0.2.0-rc2", &[]);
    eventually("the new candidate loaded", WAIT, async || {
        let listed = get_json(&host.url, "/api/v1/plugins").await;
        listed["plugins"].as_array()?.iter().any(|p| p["version"] == "0.2.0-rc2").then_some(())
    })
    .await;
    let shadow = shadow_of("D-SH-2").await;
    assert_eq!((shadow["version"].as_str(), shadow["matched"].as_bool()), (Some("0.2.0-rc2"), Some(true)), "{shadow}");
    assert!(shadow.get("differences").is_none(), "{shadow}");
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await.unwrap().text().await.unwrap();
    let labels = "{destination=\"meta-capi\",candidate=\"meta-capi-next\"}";
    assert!(metrics.contains(&format!("crm_shadow_comparisons_total{labels} 2")), "{metrics}");
    assert!(metrics.contains(&format!("crm_shadow_mismatches_total{labels} 1")), "{metrics}");
    assert_eq!(s.meta.received().len(), 2);
}
