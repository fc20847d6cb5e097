//! The operator's web page, `/ui`: three plain files built into the binary
//! (no build step, nothing to deploy beside it). The page itself is public;
//! everything it shows comes from the operator API, which it calls with
//! the admin key the operator types in (kept in the tab's session storage).
//! Its Content-Security-Policy allows scripts, styles and requests to this
//! origin only, and no inline script: what webhooks carry is shown as text,
//! and could not run even if it reached the page as HTML.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/style.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                      form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page.
#[utoipa::path(get, path = "/ui", tag = "ui",
    responses((status = 200, description = "The operator's web page (HTML); sign in with ADMIN_API_KEY")))]
pub(super) async fn page() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// Its script.
#[utoipa::path(get, path = "/ui/app.js", tag = "ui", responses((status = 200, description = "The page's script")))]
pub(super) async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// Its style sheet.
#[utoipa::path(get, path = "/ui/style.css", tag = "ui", responses((status = 200, description = "The page's styles")))]
pub(super) async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
