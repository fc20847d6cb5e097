//! The HTTP/1 server: accepts connections and serves the router on each,
//! with the bounds slow or abusive clients need.
//!
//! - A request head must arrive within `HTTP_HEADER_TIMEOUT_MS` (10 s); an
//!   idle keep-alive connection gets the same time to start its next
//!   request. Either way the server closes the connection.
//! - A whole request, body and answer included, must be done within
//!   `HTTP_REQUEST_TIMEOUT_MS` (30 s), or it is answered 408 and the
//!   connection closed.
//! - Each connection is a small task; thousands of half-open ones cost
//!   memory, not workers, and the timeouts reap them. Past
//!   `HTTP_MAX_CONNECTIONS` open at once, a new connection is closed as soon
//!   as it is accepted, so file descriptors never run out.
//! - The peer address goes to the router as `ConnectInfo`, for the rate
//!   limit and the operator routes' loopback rule.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::ApiError;

/// How the server bounds its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

/// Serve `router` on `listener` until `shutdown` turns true, then let
/// requests in progress finish (up to the request timeout).
pub async fn run(listener: TcpListener, router: Router, limits: Limits, mut shutdown: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut stop = std::pin::pin!(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors or similar: let others finish.
                    tracing::warn!(error = %e, "cannot accept a connection; pausing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "too many open connections; closing a new one");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let router = router.clone();
            async move {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                let response = match tokio::time::timeout(limits.request_timeout, router.oneshot(request)).await {
                    Ok(response) => response.unwrap_or_else(|never| match never {}),
                    Err(_) => {
                        let detail = format!(
                            "the request took longer than {} ms (HTTP_REQUEST_TIMEOUT_MS)",
                            limits.request_timeout.as_millis()
                        );
                        let mut r =
                            ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", detail).into_response();
                        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                        r
                    }
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running at shutdown were cut off");
    }
}
