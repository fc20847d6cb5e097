//! The HTTP API: webhook intake (both the documented path and the one the
//! original service actually served), health, readiness, metrics, and the
//! operator's receipts / dead-letter / plugin endpoints behind the operator
//! key (`auth`). Every route is rate-limited per client address (`limit`);
//! `server` bounds slow clients.

mod auth;
mod destinations;
mod error;
mod limit;
pub mod server;
mod ui;
mod webhook;

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::Keys;
pub use error::ApiError;

use crate::App;
use crate::queue::DeadLetter;
use crate::store::{DeliveryState, ListQuery};

/// The whole API.
pub fn router(app: Arc<App>) -> Router {
    let (intake, _) = intake_routes().split_for_parts();
    // The webhook handler enforces MAX_BODY_BYTES itself, with a JSON 413;
    // the operator routes keep axum's default limit.
    let intake = intake.layer(axum::extract::DefaultBodyLimit::disable());
    finish(intake.merge(operations(&app)), app)
}

/// Everything but webhook intake: health, readiness, metrics, operator
/// endpoints (a workers-only process serves just these).
pub fn operations_router(app: Arc<App>) -> Router {
    finish(operations(&app), app)
}

fn finish(routes: Router<Arc<App>>, app: Arc<App>) -> Router {
    let limit = app.config.rate_limit;
    let router = routes.with_state(app);
    match limit {
        Some(config) => router.layer(from_fn_with_state(Arc::new(limit::Limiter::new(config)), limit::limit)),
        None => router,
    }
}

fn operations(app: &Arc<App>) -> Router<Arc<App>> {
    let (operator, _) = operator_routes().split_for_parts();
    let (public, _) = public_routes().split_for_parts();
    public.merge(operator.route_layer(from_fn_with_state(app.clone(), auth::require_operator)))
}

// The routes and their OpenAPI description come from the same lists (each
// handler's `#[utoipa::path]`), so the two cannot drift apart.

fn intake_routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new().routes(routes!(webhook::receive)).routes(routes!(webhook::receive_original_path))
}

fn operator_routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(list_receipts))
        .routes(routes!(get_receipt))
        .routes(routes!(replay_receipt))
        .routes(routes!(list_dead_letters))
        .routes(routes!(replay))
        .routes(routes!(list_plugins))
        .routes(routes!(destinations::list_destinations))
        .routes(routes!(destinations::pause_destination))
        .routes(routes!(destinations::resume_destination))
}

fn public_routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(ui::page))
        .routes(routes!(ui::script))
        .routes(routes!(ui::style))
}

/// The OpenAPI 3.1 description of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut spec = intake_routes().merge(operator_routes()).merge(public_routes()).into_openapi();
    spec.info.title = "crm-event-handler".into();
    spec.info.version = env!("CARGO_PKG_VERSION").into();
    spec.info.description = Some(
        "Webhooks from CRMs in, Meta Conversions API and Brevo out. Webhook routes take the webhook key \
         (x-api-key, or what the source plugin checks); operator routes take ADMIN_API_KEY in x-api-key or \
         Authorization: Bearer. Errors are {code, detail, field?}."
            .into(),
    );
    spec
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "public",
    responses((status = 200, description = "This description, as JSON")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    static SPEC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    Json(SPEC.get_or_init(openapi).clone())
}

#[utoipa::path(get, path = "/health", tag = "public",
    responses((status = 200, description = "The process answers: {\"status\": \"ok\"}")))]
async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the store and queue answer, at least one source is loaded,
/// and the process is not stopping. Paused destinations (by an operator or
/// the circuit breaker) are listed, and do not make it unready: webhooks
/// are still accepted, and their jobs wait.
#[utoipa::path(get, path = "/ready", tag = "public", responses(
    (status = 200, description = "Ready: {status, checks: {store, queue, plugins}, paused_destinations: [{destination, by}]}"),
    (status = 503, description = "Not ready, or stopping: the checks say which and why")))]
async fn ready(State(app): State<Arc<App>>) -> Response {
    let store = app.store.ping().await.err().map(|e| e.to_string());
    let queue = app.queue.ping().await.err().map(|e| e.to_string());
    let paused: Vec<serde_json::Value> = app
        .queue
        .paused()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|p| json!({ "destination": p.destination, "by": p.pause.by }))
        .collect();
    let plugins = app.plugins.snapshot();
    let sources = (!plugins.sources.is_empty()).then_some(()).ok_or("no source plugin loaded").err();
    let stopping = app.stopping();
    let ok = !stopping && store.is_none() && queue.is_none() && sources.is_none();
    let check = |e: Option<String>| match e {
        None => json!({ "ok": true }),
        Some(reason) => json!({ "ok": false, "reason": reason }),
    };
    let body = json!({
        "status": if ok { "ready" } else if stopping { "stopping" } else { "not_ready" },
        "checks": {
            "store": check(store),
            "queue": check(queue),
            "plugins": check(sources.map(str::to_string)),
        },
        "paused_destinations": paused,
    });
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "public",
    responses((status = 200, description = "Prometheus metrics (OpenMetrics text)")))]
async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Ok(depth) = app.queue.depth().await {
        app.metrics.set_queue_depth(depth);
    }
    if let Ok(paused) = app.queue.paused().await {
        let loaded: Vec<String> = app.plugins.snapshot().live_destinations().map(|p| p.name().into()).collect();
        app.metrics.set_paused(&loaded, paused.iter().map(|p| p.destination.as_str()));
    }
    app.metrics.set_round_trips("mongodb", app.store.round_trips());
    app.metrics.set_round_trips("redis", app.queue.round_trips());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.metrics.render())
        .into_response()
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<usize>,
    /// Only this destination's dead letters.
    destination: Option<String>,
}

/// The receipts listing's filters, as the query string gives them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptFilters {
    limit: Option<usize>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    provider: Option<String>,
    reference: Option<String>,
    status: Option<String>,
    state: Option<DeliveryState>,
    destination: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
}

/// Receipts, newest first, a page at a time: `next` is the cursor of the
/// next page (null at the end). A page can hold fewer than `limit` when the
/// filters match few receipts; follow `next` until it is null.
#[utoipa::path(get, path = "/api/v1/receipts", tag = "operator",
    params(
        ("limit" = Option<usize>, Query, description = "Receipts per page, 1 to 1000 (50)"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next`"),
        ("provider" = Option<String>, Query, description = "The CRM (source plugin name)"),
        ("reference" = Option<String>, Query, description = "The deal's reference in the CRM"),
        ("status" = Option<String>, Query, description = "The deal status, any case"),
        ("state" = Option<String>, Query, description = "An action's state: pending, retrying, delivered, failed"),
        ("destination" = Option<String>, Query, description = "An action's destination (with state: the same action)"),
        ("since_ms" = Option<u64>, Query, description = "Received at or after, unix ms"),
        ("until_ms" = Option<u64>, Query, description = "Received before, unix ms"),
    ),
    responses(
        (status = 200, description = "{receipts: [...], next: cursor or null}; attempt logs left out"),
        (status = 400, description = "A filter is unknown or malformed: the detail names it"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The store is unavailable")))]
async fn list_receipts(
    State(app): State<Arc<App>>,
    params: Result<Query<ReceiptFilters>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(f) = params.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "{}; expected limit, cursor, provider, reference, status, state (pending, retrying, delivered, failed), \
                 destination, since_ms, until_ms",
                e.body_text()
            ),
        )
    })?;
    for (name, value) in [("since_ms", f.since_ms), ("until_ms", f.until_ms)] {
        if value.is_some_and(|t| t > i64::MAX as u64) {
            let detail = format!("{name} must be a time in unix milliseconds");
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", detail).with_field(name));
        }
    }
    let query = ListQuery {
        limit: f.limit.unwrap_or(50).clamp(1, 1000),
        before: f.cursor,
        provider: f.provider,
        reference: f.reference,
        status: f.status,
        state: f.state,
        destination: f.destination,
        since_ms: f.since_ms,
        until_ms: f.until_ms,
    };
    let mut page = app
        .store
        .list(query)
        .await
        .map_err(|e| ApiError::unavailable("store_unavailable", "the receipt store is unavailable", e))?;
    // Attempt logs are for one receipt at a time (GET /api/v1/receipts/{id}).
    page.receipts.iter_mut().flat_map(|r| r.actions.iter_mut()).for_each(|a| a.log.clear());
    Ok(Json(json!({ "receipts": page.receipts, "next": page.next })))
}

#[utoipa::path(get, path = "/api/v1/receipts/{id}", tag = "operator",
    params(("id" = String, Path, description = "The receipt's id")),
    responses(
        (status = 200, description = "The receipt: request, event, and each action with its attempt log"),
        (status = 404, description = "No such receipt"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The store is unavailable")))]
async fn get_receipt(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    match app.store.get(&id).await {
        Ok(Some(r)) => Ok(Json(json!(r))),
        Ok(None) => Err(ApiError::new(StatusCode::NOT_FOUND, "receipt_not_found", format!("no receipt {id}"))),
        Err(e) => Err(ApiError::unavailable("store_unavailable", "the receipt store is unavailable", e)),
    }
}

#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "operator",
    params(
        ("limit" = Option<usize>, Query, description = "At most this many, 1 to 10000 (100)"),
        ("destination" = Option<String>, Query, description = "Only this destination's")),
    responses(
        (status = 200, description = "{dead_letters: [{job, reason, failed_at_ms}]}"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The queue is unavailable")))]
async fn list_dead_letters(
    State(app): State<Arc<App>>,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = params.limit.unwrap_or(100).clamp(1, 10_000);
    let letters = dead_letters_of(&app, params.destination.as_deref(), limit).await?;
    Ok(Json(json!({ "dead_letters": letters })))
}

/// At most `limit` dead letters, of one destination or of all.
async fn dead_letters_of(app: &App, destination: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, ApiError> {
    match destination {
        None => app.queue.dead_letters(limit).await,
        Some(d) => app
            .queue
            .dead_letters(usize::MAX)
            .await
            .map(|all| all.into_iter().filter(|l| l.job.destination == d).take(limit).collect()),
    }
    .map_err(|e| ApiError::unavailable("queue_unavailable", "the job queue is unavailable", e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// One job by id; or
    job_id: Option<String>,
    /// every dead letter of one destination; or
    destination: Option<String>,
    /// every dead letter (must be said explicitly).
    #[serde(default)]
    all: bool,
}

/// Put dead letters back in the queue with a fresh retry budget. The body is
/// `{"job_id": "…"}`, `{"destination": "…"}` or `{"all": true}`; the key is
/// checked (by the route layer) before the body is read.
#[utoipa::path(post, path = "/api/v1/dead-letters/replay", tag = "operator",
    request_body(content_type = "application/json",
        description = "{\"job_id\": \"…\"}, {\"destination\": \"…\"} or {\"all\": true}"),
    responses(
        (status = 200, description = "The jobs queued again"),
        (status = 400, description = "Not exactly one of job_id, destination and all"),
        (status = 404, description = "No dead letter with that job_id"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The queue is unavailable")))]
async fn replay(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let bad = |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_replay_request", detail);
    let request: ReplayRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!("expected {{\"job_id\": \"…\"}}, {{\"destination\": \"…\"}} or {{\"all\": true}}: {e}"))
    })?;
    let unavailable = |e| ApiError::unavailable("queue_unavailable", "the job queue is unavailable", e);
    let one = request.job_id.is_some();
    let ReplayRequest { job_id, destination, all } = request;
    let ids: Vec<String> = match (job_id, destination.is_some(), all) {
        (Some(id), false, false) => vec![id],
        (None, true, false) | (None, false, true) => {
            dead_letters_of(&app, destination.as_deref(), usize::MAX).await?.into_iter().map(|l| l.job.id).collect()
        }
        _ => return Err(bad("give one of job_id, destination, or \"all\": true".into())),
    };
    let replayed = crate::intake::replay_dead_letters(&app, ids).await.map_err(unavailable)?;
    if one && replayed.is_empty() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "dead_letter_not_found", "no such dead letter"));
    }
    Ok(Json(json!({ "replayed": replayed })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReceiptReplayRequest {
    destination: Option<String>,
    action: Option<String>,
    /// Send actions that were delivered again.
    #[serde(default)]
    force: bool,
}

/// Replay a receipt's actions: `{}` for all of them, or name a destination
/// and/or an action; delivered actions need `"force": true`.
#[utoipa::path(post, path = "/api/v1/receipts/{id}/replay", tag = "operator",
    params(("id" = String, Path, description = "The receipt's id")),
    request_body(content_type = "application/json",
        description = "{} for every action, or {\"destination\", \"action\", \"force\"}"),
    responses(
        (status = 200, description = "The actions queued again, with a warning past a destination's dedupe window"),
        (status = 400, description = "The body is malformed"),
        (status = 404, description = "No such receipt, or no such action on it"),
        (status = 409, description = "A delivered action without \"force\": true"),
        (status = 401, description = "Missing or wrong operator key"),
        (status = 503, description = "The store or queue is unavailable")))]
async fn replay_receipt(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: ReceiptReplayRequest =
        optional_json(&body, "invalid_replay_request", "{\"destination\"?, \"action\"?, \"force\"?}")?;
    let replayed = crate::intake::replay_receipt(
        &app,
        &id,
        request.destination.as_deref(),
        request.action.as_deref(),
        request.force,
    )
    .await
    .map_err(|e| match e {
        crate::intake::ReplayError::NotFound(detail) => ApiError::new(StatusCode::NOT_FOUND, "not_found", detail),
        e @ crate::intake::ReplayError::Delivered(_) => {
            ApiError::new(StatusCode::CONFLICT, "already_delivered", e.to_string())
        }
        crate::intake::ReplayError::Store(e) => {
            ApiError::unavailable("store_unavailable", "the receipt store is unavailable", e)
        }
        crate::intake::ReplayError::Queue(e) => {
            ApiError::unavailable("queue_unavailable", "the job queue is unavailable", e)
        }
    })?;
    Ok(Json(json!({ "replayed": replayed })))
}

/// An operator's optional JSON body: empty is `T::default()`; malformed
/// answers 400 with `code` and what was `expected`.
fn optional_json<T: Default + serde::de::DeserializeOwned>(
    body: &[u8],
    code: &'static str,
    expected: &str,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, code, format!("expected {expected}: {e}")))
}

/// Loaded plugins (version, kind, digest, load time, allowed hosts, the
/// variables each reads and the grants that allow it, never values, missing
/// settings) and folders whose latest contents were refused.
#[utoipa::path(get, path = "/api/v1/plugins", tag = "operator",
    responses(
        (status = 200, description = "{plugins: [...], refused: [...]}"),
        (status = 401, description = "Missing or wrong operator key")))]
async fn list_plugins(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let set = app.plugins.snapshot();
    let grants = app.plugins.env().grants();
    let plugins: Vec<serde_json::Value> = set
        .all()
        .map(|p| {
            let loaded_at =
                p.loaded_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            json!({
                "name": p.name(),
                "version": p.manifest.version,
                "kind": p.manifest.kind.to_string(),
                "digest": p.digest,
                "loaded_at_ms": loaded_at,
                "dir": p.dir.display().to_string(),
                "allowed_outbound_hosts": p.allow.describe(),
                "config": p.config.vars,
                "grants": grants.describe(p.name()),
                "limits": {
                    "time_per_call_ms": p.manifest.limits.time_per_call_ms,
                    "memory_mb": p.manifest.limits.memory_mb,
                    "max_requests_per_call": p.manifest.limits.max_requests_per_call,
                    "max_request_bytes_per_call": p.manifest.limits.max_request_bytes_per_call,
                },
                "not_configured": p.config.missing,
                "shadow_of": p.manifest.shadow_of,
            })
        })
        .collect();
    let errors: Vec<serde_json::Value> = app
        .plugins
        .load_errors()
        .into_iter()
        .map(|(dir, error)| json!({ "dir": dir.display().to_string(), "error": error }))
        .collect();
    Ok(Json(json!({ "plugins": plugins, "load_errors": errors })))
}
