//! The claim "plugins in any language": the HubSpot-shaped source plugin in
//! examples/hubspot-python (Python, componentize-py) is built with its one
//! documented command, loaded by the real host next to the Rust plugins, and
//! a webhook goes through it to the same Meta and Brevo destinations.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_python_source_plugin_feeds_the_rust_destinations() {
    let example = repo().join("examples/hubspot-python");
    let built = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash").arg(example.join("build.sh")).output().expect("run build.sh")
    })
    .await
    .unwrap();
    assert!(
        built.status.success(),
        "build.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["crm", "meta-capi", "brevo"]);
    let hubspot = plugins.join("hubspot");
    std::fs::create_dir_all(&hubspot).unwrap();
    for file in ["plugin.toml", "hubspot.wasm"] {
        std::fs::copy(repo().join("examples/hubspot-python").join(file), hubspot.join(file)).unwrap();
    }
    let meta = StandIn::meta().await;
    let brevo = StandIn::brevo().await;
    let vars = host_vars(&dir.path().join("data"), &plugins, &meta, &brevo);
    let host = Host::start(&vars).await;

    let body = std::fs::read_to_string(repo().join("examples/payloads/hubspot-closedwon.json")).unwrap();
    let (status, answer) = post_webhook(&host.url, "/api/v1/webhook/hubspot", "deal.propertyChange", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["provider"], "hubspot");
    assert_eq!(answer["status"], "Committed");
    eventually("the Purchase and the e-mail", WAIT, async || {
        (meta.events().len() == 1 && brevo.sent_emails() == 1).then_some(())
    })
    .await;
    let purchase = &meta.events()[0];
    assert_eq!(purchase["event_name"], "Purchase");
    assert_eq!(purchase["custom_data"]["deal_id"], answer["reference"]);
    assert_eq!(purchase["user_data"]["em"][0], "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f");
    assert_eq!(brevo.received()[0].body["to"][0]["email"], "john.doe@example.com");

    // Its errors come back as the same 400s as the Rust source's.
    let (status, answer) = post_webhook(&host.url, "/api/v1/webhook/hubspot", "x", "{\"objectType\":\"deal\"}").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["code"], "missing_field");
    assert_eq!(answer["field"], "objectId");
}
