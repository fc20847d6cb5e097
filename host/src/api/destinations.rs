//! Destinations as the operator steers them: list, pause, resume. A paused
//! destination's jobs wait in the queue, spending no attempts, until it is
//! resumed; the circuit breaker pauses and resumes them the same way
//! (`worker::breaker`).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::App;
use crate::queue::{Pause, PausedBy, PausedDestination};
use crate::store::now_ms;

fn queue_unavailable(e: crate::queue::QueueError) -> ApiError {
    ApiError::unavailable("queue_unavailable", "the job queue is unavailable", e)
}

/// Every destination worth showing: loaded (not a shadow candidate), routed
/// to, or paused.
fn known(app: &App, paused: &[PausedDestination]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = app.plugins.snapshot().live_destinations().map(|p| p.name().into()).collect();
    names.extend(app.routes().destinations());
    names.extend(paused.iter().map(|p| p.destination.clone()));
    names
}

/// Each destination: its plugin version if loaded, its limits, whether it
/// is paused, by whom and why, and how many jobs wait for it.
#[utoipa::path(get, path = "/api/v1/destinations", tag = "operator",
    responses(
        (status = 200, description = "{destinations: [{name, loaded, version, limits: {max_concurrency, \
            max_per_second}, paused: {by, reason, since_ms, probe_at_ms, probe_job} or null, waiting}]}"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The queue is unavailable")))]
pub(super) async fn list_destinations(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let paused = app.queue.paused().await.map_err(queue_unavailable)?;
    let plugins = app.plugins.snapshot();
    let routes = app.routes();
    let destinations: Vec<serde_json::Value> = known(&app, &paused)
        .into_iter()
        .map(|name| {
            let pause = paused.iter().find(|p| p.destination == name);
            let plugin = plugins.live_destination(&name);
            json!({
                "name": name,
                "loaded": plugin.is_some(),
                "version": plugin.map(|p| p.manifest.version.to_string()),
                "limits": routes.limits(&name),
                "paused": pause.map(|p| &p.pause),
                "waiting": pause.map_or(0, |p| p.waiting),
            })
        })
        .collect();
    Ok(Json(json!({ "destinations": destinations })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseRequest {
    reason: Option<String>,
}

/// Pause a destination: its jobs wait, spending no attempts, until it is
/// resumed (deliveries already running finish). Replaces a pause by the
/// circuit breaker, which then no longer probes it.
#[utoipa::path(post, path = "/api/v1/destinations/{name}/pause", tag = "operator",
    params(("name" = String, Path, description = "The destination (plugin name)")),
    request_body(content_type = "application/json", description = "Optional: {\"reason\": \"…\"}"),
    responses(
        (status = 200, description = "{destination, paused: {by, reason, since_ms}}"),
        (status = 400, description = "The body is malformed"),
        (status = 404, description = "No destination of that name is loaded, routed to or paused"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The queue is unavailable")))]
pub(super) async fn pause_destination(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: PauseRequest = super::optional_json(&body, "invalid_pause_request", "{\"reason\"?}")?;
    let paused = app.queue.paused().await.map_err(queue_unavailable)?;
    must_know(&app, &paused, &name)?;
    let pause = Pause {
        by: PausedBy::Operator,
        reason: request.reason.unwrap_or_else(|| "paused by an operator".into()),
        since_ms: now_ms(),
        probe_at_ms: None,
        probe_job: None,
    };
    app.queue.pause(&name, pause.clone()).await.map_err(queue_unavailable)?;
    tracing::warn!(destination = %name, reason = %pause.reason, "destination paused by an operator");
    Ok(Json(json!({ "destination": name, "paused": pause })))
}

/// Resume a destination paused by an operator or the circuit breaker: its
/// waiting jobs are due at once.
#[utoipa::path(post, path = "/api/v1/destinations/{name}/resume", tag = "operator",
    params(("name" = String, Path, description = "The destination (plugin name)")),
    responses(
        (status = 200, description = "{destination, was_paused, released}: the jobs that were waiting"),
        (status = 404, description = "No destination of that name is loaded, routed to or paused"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The queue is unavailable")))]
pub(super) async fn resume_destination(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let paused = app.queue.paused().await.map_err(queue_unavailable)?;
    must_know(&app, &paused, &name)?;
    let released = app.queue.resume(&name, None).await.map_err(queue_unavailable)?;
    if let Some(released) = released {
        tracing::warn!(destination = %name, released, "destination resumed by an operator");
    }
    Ok(Json(json!({ "destination": name, "was_paused": released.is_some(), "released": released.unwrap_or(0) })))
}

fn must_know(app: &App, paused: &[PausedDestination], name: &str) -> Result<(), ApiError> {
    let known = known(app, paused);
    if known.contains(name) {
        return Ok(());
    }
    let detail = format!(
        "no destination named {name:?} is loaded, routed to or paused; known: {}",
        known.into_iter().collect::<Vec<_>>().join(", ")
    );
    Err(ApiError::new(StatusCode::NOT_FOUND, "destination_not_found", detail).with_field("name"))
}
