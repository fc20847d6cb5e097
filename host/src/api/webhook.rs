//! The webhook route: HTTP in, `intake::accept`, HTTP out. Reads the body
//! (413 past `MAX_BODY_BYTES`), hands the whole request to intake, and maps
//! what comes back to an answer. 200 only once every event's receipt and
//! jobs are durable.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiError;
use crate::App;
use crate::intake::{self, AcceptedEvent, IntakeError};
use crate::plugins::{IncomingRequest, ParseFailure, PluginError};
use crate::store::now_ms;

#[utoipa::path(post, path = "/api/v1/webhook/{provider}", tag = "webhooks",
    params(("provider" = String, Path, description = "The source plugin's name, e.g. crm")),
    request_body(content_type = "application/json", description = "The CRM's payload, as its source plugin reads it"),
    responses(
        (status = 200, description = "Durably accepted: {receipt_id, duplicate, events: [...]}"),
        (status = 202, description = "Missing or wrong x-api-key, as the original answered (AUTH_FAILURE_STATUS)"),
        (status = 400, description = "The payload is malformed or lacks a field: {code, detail, field}"),
        (status = 401, description = "The source plugin could not authenticate the request"),
        (status = 404, description = "No source plugin by that name"),
        (status = 413, description = "The body is larger than MAX_BODY_BYTES"),
        (status = 503, description = "Not stored, or stopping: retry")))]
pub async fn receive(
    State(app): State<Arc<App>>,
    Path(provider): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received_at_ms = now_ms();
    let result = match read_body(&app, &headers, body).await {
        Ok(_) if app.stopping() => Err(ApiError::unavailable(
            "shutting_down",
            "this instance is shutting down and takes no more webhooks; retry",
            "intake stopped (SIGTERM)",
        )),
        Ok(body) => {
            let request = IncomingRequest {
                method: method.to_string(),
                url: signed_url(&app, &headers, &uri),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect(),
                body,
                received_at_ms,
            };
            intake::accept(&app, &provider, request).await.map_err(|e| answer_error(&app, &provider, e))
        }
        Err(e) => Err(e),
    };
    let known = app.plugins.source(&provider).is_some();
    // Only loaded provider names become metric labels.
    let label = if known { provider.as_str() } else { "unknown" };
    match result {
        Ok(events) => {
            let outcome =
                if !events.is_empty() && events.iter().all(|e| e.duplicate) { "duplicate" } else { "accepted" };
            app.metrics.webhook(label, outcome);
            for e in &events {
                tracing::info!(
                    receipt_id = %e.receipt_id,
                    provider = %provider,
                    reference = %e.reference,
                    status = %e.status,
                    duplicate = e.duplicate,
                    actions = e.actions.len(),
                    "webhook event accepted"
                );
            }
            (StatusCode::OK, Json(accepted_body(&provider, events))).into_response()
        }
        Err(e) => {
            app.metrics.webhook(label, e.code);
            e.into_response()
        }
    }
}

/// The original service's path, answered the same way.
#[utoipa::path(post, path = "/v1/webhooks/{provider}", tag = "webhooks",
    params(("provider" = String, Path, description = "The source plugin's name, e.g. crm")),
    request_body(content_type = "application/json", description = "As for /api/v1/webhook/{provider}"),
    responses((status = 200, description = "As for /api/v1/webhook/{provider}")))]
pub async fn receive_original_path(
    app: State<Arc<App>>,
    provider: Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    receive(app, provider, method, uri, headers, body).await
}

/// The 200 answer: every event, and for a webhook of exactly one event its
/// fields at the top level too (the original single-event shape).
fn accepted_body(provider: &str, events: Vec<AcceptedEvent>) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    if let [only] = events.as_slice()
        && let serde_json::Value::Object(fields) = json!(only)
    {
        body.extend(fields);
    }
    body.insert("provider".into(), json!(provider));
    body.insert("events".into(), json!(events));
    serde_json::Value::Object(body)
}

/// The URL the sender called: `BASE_URL` (else `http://` and the `host`
/// header) plus the path and query as received.
fn signed_url(app: &App, headers: &HeaderMap, uri: &Uri) -> String {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match &app.config.base_url {
        Some(base) => format!("{}{path}", base.trim_end_matches('/')),
        None => {
            let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            format!("http://{host}{path}")
        }
    }
}

async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let limit = app.config.max_body_bytes;
    let too_large =
        || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("the body exceeds {limit} bytes"));
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map(|b| b.to_vec()).map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            too_large()
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", format!("could not read the body: {e}"))
        }
    })
}

fn answer_error(app: &App, provider: &str, error: IntakeError) -> ApiError {
    match error {
        IntakeError::KeyRefused => {
            tracing::info!(provider, "webhook with a missing or invalid x-api-key ignored");
            let status = StatusCode::from_u16(app.config.auth_failure_status).unwrap_or(StatusCode::ACCEPTED);
            ApiError::new(status, "unauthorized", "missing or invalid x-api-key; the webhook was not processed")
        }
        e @ IntakeError::UnknownProvider { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_provider", e.to_string())
        }
        IntakeError::ProviderUnavailable(why) => ApiError::unavailable(
            "provider_unavailable",
            "this provider's plugin is not loaded right now; retry later",
            why,
        ),
        IntakeError::Refused(ParseFailure::Unauthenticated(why)) => {
            tracing::info!(provider, reason = %why, "webhook refused by its source plugin: not authenticated");
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the request could not be authenticated")
        }
        IntakeError::Refused(ParseFailure::Unavailable(why)) => {
            ApiError::unavailable("source_unavailable", "the source cannot take this webhook now; retry later", why)
        }
        IntakeError::Refused(failure) => {
            let error = ApiError::new(StatusCode::BAD_REQUEST, failure.code(), failure.to_string());
            match failure.field() {
                Some(field) => error.with_field(field),
                None => error,
            }
        }
        e @ IntakeError::EmptyField { field, .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "missing_field", e.to_string()).with_field(field)
        }
        IntakeError::Plugin(e @ PluginError::Busy { .. }) => {
            ApiError::unavailable("plugins_busy", "every plugin instance for parsing is in use; retry later", e)
        }
        IntakeError::Plugin(e) => {
            ApiError::unavailable("source_plugin_failed", "the source plugin failed; retry later", e)
        }
        IntakeError::Store(e) => {
            ApiError::unavailable("store_unavailable", "the receipt could not be stored; retry later", e)
        }
        IntakeError::Queue(e) => {
            ApiError::unavailable("queue_unavailable", "the jobs could not be queued; retry later", e)
        }
    }
}
