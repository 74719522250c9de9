//! The HTTP server under the router, with the bounds a public listener needs
//! (docs/adr/0012-hostile-input.md):
//! - a connection must finish a request's headers within `HEADER_READ_TIMEOUT`,
//!   which also closes a keep-alive connection left idle that long (hyper's
//!   header timer runs from the moment it waits for a request's first byte);
//! - a request's body must arrive within `BODY_READ_TIMEOUT` (see `RawBody::read`);
//! - at most `MAX_REQUESTS_IN_FLIGHT` requests are handled at once; one more is
//!   answered 503 with `Retry-After` at once rather than queued (tower's global
//!   concurrency limit with load shedding).
//!
//! hyper's own builder is used instead of `axum::serve`, which sets no timer and so
//! disables the header timeout.

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tracing::{debug, warn};

use crate::ingress::ApiError;
use crate::telemetry;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    pub max_requests_in_flight: usize,
}

/// Wraps the router so that requests beyond the bound are refused at once.
pub fn bounded(app: Router, max_in_flight: usize) -> Router {
    app.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async { overloaded() }))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::new(max_in_flight)),
    )
}

fn overloaded() -> Response {
    telemetry::shed();
    ApiError::Unavailable("the service is at its limit of requests in flight").into_response()
}

/// Serves `app` on `listener` until `shutdown`, then lets the connections finish
/// their requests (the caller bounds how long).
pub async fn serve(listener: TcpListener, app: Router, limits: ServeLimits, shutdown: CancellationToken) {
    let app = bounded(app, limits.max_requests_in_flight);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection closed");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
