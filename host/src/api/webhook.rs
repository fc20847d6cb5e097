//! Webhook intake: authenticate, let the provider's source plugin parse,
//! store the receipt (dedupe), queue one job per routed action, answer.
//! 200 only once the receipt and its jobs are durable.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::ApiError;
use crate::App;
use crate::plugins::{LoadedPlugin, ParseFailure, PluginError, SourceLookup};
use crate::routing::ActionSpec;
use crate::store::{ActionRecord, DeliveryState, Inserted, Receipt, StoredRequest, now_ms};
use crate::worker::jobs_for;

/// Headers never stored nor shown to plugins.
const CREDENTIAL_HEADERS: [&str; 4] = ["x-api-key", "authorization", "cookie", "proxy-authorization"];

/// The 200 answer.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub receipt_id: String,
    /// True when this (provider, deal, status) was already received: nothing
    /// new is queued.
    pub duplicate: bool,
    pub provider: String,
    pub reference: String,
    pub status: String,
    pub actions: Vec<ActionView>,
}

#[derive(Debug, Serialize)]
pub struct ActionView {
    pub destination: String,
    pub action: String,
    pub state: DeliveryState,
}

pub async fn receive(
    State(app): State<Arc<App>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let source = app.plugins.lookup_source(&provider);
    // Only known provider names become metric labels.
    let label = if matches!(source, SourceLookup::Unknown) { "unknown" } else { provider.as_str() };
    let result = accept(&app, &provider, source, &headers, body).await;
    let outcome = match &result {
        Ok(Reply::Accepted(a)) if a.duplicate => "duplicate",
        Ok(Reply::Accepted(_)) => "accepted",
        Ok(Reply::Unauthorized) => "unauthorized",
        Err(e) => e.code,
    };
    app.metrics.webhook(label, outcome);
    match result {
        Ok(Reply::Accepted(a)) => {
            tracing::info!(
                receipt_id = %a.receipt_id,
                provider = %a.provider,
                reference = %a.reference,
                status = %a.status,
                duplicate = a.duplicate,
                actions = a.actions.len(),
                "webhook accepted"
            );
            (StatusCode::OK, Json(a)).into_response()
        }
        Ok(Reply::Unauthorized) => {
            tracing::info!(provider = label, "webhook with a missing or invalid x-api-key ignored");
            let status = StatusCode::from_u16(app.config.auth_failure_status).unwrap_or(StatusCode::ACCEPTED);
            let body = json!({
                "code": "unauthorized",
                "detail": "missing or invalid x-api-key; the webhook was not processed",
            });
            (status, Json(body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

enum Reply {
    Accepted(Accepted),
    Unauthorized,
}

async fn accept(
    app: &App,
    provider: &str,
    source: SourceLookup,
    headers: &HeaderMap,
    body: Body,
) -> Result<Reply, ApiError> {
    if !app.keys.webhook(headers) {
        return Ok(Reply::Unauthorized);
    }
    let source: Arc<LoadedPlugin> = match source {
        SourceLookup::Loaded(source) => source,
        SourceLookup::Unavailable(why) => {
            return Err(ApiError::unavailable(
                "provider_unavailable",
                "this provider's plugin is not loaded right now; retry later",
                why,
            ));
        }
        SourceLookup::Unknown => {
            let known: Vec<String> = app.plugins.snapshot().sources.keys().cloned().collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!("no source plugin named {provider:?} is loaded (known: {})", known.join(", ")),
            ));
        }
    };

    let limit = app.config.max_body_bytes;
    let too_large =
        || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("the body exceeds {limit} bytes"));
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            too_large()
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", format!("could not read the body: {e}"))
        }
    })?;

    let plugin_headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !CREDENTIAL_HEADERS.contains(&n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();

    let started = std::time::Instant::now();
    let parsed = source.parse(&plugin_headers, &body).await;
    app.metrics.plugin_call(source.name(), started.elapsed());
    let mut event = match parsed {
        Ok(Ok(event)) => event,
        Ok(Err(failure)) => return Err(parse_error(failure)),
        Err(e @ PluginError::Busy { .. }) => {
            return Err(ApiError::unavailable(
                "plugins_busy",
                "every plugin instance for parsing is in use; retry later",
                e,
            ));
        }
        Err(e) => {
            return Err(ApiError::unavailable("source_plugin_failed", "the source plugin failed; retry later", e));
        }
    };
    // A source plugin's bug must not create receipts that cannot be deduped.
    for (field, value) in [("reference", &event.reference), ("status", &event.status)] {
        if value.trim().is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_field",
                format!("the {provider} plugin found no deal {field} in the payload"),
            )
            .with_field(field));
        }
    }
    let now = now_ms();
    event.received_at = now / 1000;

    let actions = app.routes().actions_for(provider, &event.status);
    let receipt = Receipt {
        id: uuid::Uuid::now_v7().to_string(),
        provider: provider.to_string(),
        event_type: event.event_type.clone(),
        reference: event.reference.clone(),
        status: event.status.clone(),
        request: StoredRequest {
            headers: headers
                .iter()
                .map(|(n, v)| {
                    let value = if CREDENTIAL_HEADERS.contains(&n.as_str()) {
                        "«redacted»".to_string()
                    } else {
                        String::from_utf8_lossy(v.as_bytes()).into_owned()
                    };
                    (n.as_str().to_string(), value)
                })
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        event,
        received_at_ms: now,
        updated_at_ms: now,
        jobs_enqueued: actions.is_empty(),
        actions: actions.iter().map(|a| pending(a, now)).collect(),
    };

    let (receipt, duplicate) = match app.store.insert(receipt).await {
        Ok(Inserted::New(r)) => (r, false),
        Ok(Inserted::Duplicate(r)) => (r, true),
        Err(e) => {
            return Err(ApiError::unavailable("store_unavailable", "the receipt could not be stored; retry later", e));
        }
    };
    if !receipt.jobs_enqueued {
        // New, or a duplicate whose first delivery never got its jobs queued
        // (we answered 503 then, and the CRM retried): queue them now.
        app.queue
            .enqueue(jobs_for(&receipt))
            .await
            .map_err(|e| ApiError::unavailable("queue_unavailable", "the jobs could not be queued; retry later", e))?;
        if let Err(e) = app.store.mark_enqueued(&receipt.id).await {
            // The jobs are durable; the flag only spares a re-enqueue.
            tracing::warn!(receipt_id = %receipt.id, error = %e, "jobs queued but receipt not marked");
        }
    }
    Ok(Reply::Accepted(Accepted {
        receipt_id: receipt.id,
        duplicate,
        provider: receipt.provider,
        reference: receipt.reference,
        status: receipt.status,
        actions: receipt
            .actions
            .into_iter()
            .map(|a| ActionView { destination: a.destination, action: a.action, state: a.state })
            .collect(),
    }))
}

fn pending(a: &ActionSpec, now: u64) -> ActionRecord {
    ActionRecord {
        destination: a.destination.clone(),
        action: a.action.clone(),
        params: a.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        state: DeliveryState::Pending,
        attempts: 0,
        last_error: None,
        last_status: None,
        detail: None,
        delivered_at_ms: None,
        updated_at_ms: now,
    }
}

fn parse_error(failure: ParseFailure) -> ApiError {
    let error = ApiError::new(StatusCode::BAD_REQUEST, failure.code(), failure.to_string());
    match failure.field() {
        Some(field) => error.with_field(field),
        None => error,
    }
}
