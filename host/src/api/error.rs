//! The API's one error type: a status, a stable snake_case `code`, a human
//! `detail` and, for bad input, the `field` at fault. 4xx are the caller's
//! business and are not logged as errors; 5xx get a generic detail in the
//! body and their cause in the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An API failure, rendered as `{"code", "detail", "field"?}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub field: Option<String>,
    /// For 5xx: what actually went wrong (logged, not sent).
    pub cause: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError { status, code, detail: detail.into(), field: None, cause: None }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    /// A 503: the caller should retry; `cause` goes to the log only.
    pub fn unavailable(code: &'static str, detail: &str, cause: impl ToString) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code,
            detail: detail.to_string(),
            field: None,
            cause: Some(cause.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, cause = self.cause.as_deref().unwrap_or("-"), "{}", self.detail);
        } else {
            tracing::debug!(code = self.code, detail = %self.detail, "request refused");
        }
        let body = Body { code: self.code, detail: &self.detail, field: self.field.as_deref() };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("5"));
        }
        response
    }
}
