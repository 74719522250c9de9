//! What receives: the HTTP ingress. Handlers are thin: read the body once
//! under the size limit, find the secret, verify, parse, publish, answer.

pub mod error;
pub mod n8n;
pub mod stripe;
pub mod twilio;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::bus::{Broker, Publisher, Topology, outbox};
use crate::config::{Config, Secret};
use crate::events::{BusinessId, Envelope};
use crate::store::secrets::{IntegrationKind, Lookup, SecretStore};
use crate::verify::VerifyError;
pub use error::ApiError;

pub struct AppState {
    pub cfg: Config,
    pub pool: PgPool,
    pub broker: Arc<Broker>,
    pub publisher: Arc<Publisher>,
    /// Wakes the outbox relay after a row is written.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    pub topology: Topology,
    pub secrets: SecretStore,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/webhooks/twilio/{business_id}/call-status", post(twilio::call_status))
        .route("/webhooks/twilio/{business_id}/recording", post(twilio::recording))
        .route("/webhooks/twilio/{business_id}/transcription", post(twilio::transcription))
        .route("/webhooks/n8n/{business_id}/bookings", post(n8n::bookings))
        .route("/webhooks/stripe", post(stripe::webhook))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> Response {
    let body = json!({"error": "not_found", "message": "no such endpoint"});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready when both Postgres and RabbitMQ answer within a second each.
async fn readyz(State(state): State<SharedState>) -> Response {
    let limit = Duration::from_secs(1);
    let db = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&state.pool)).await;
    let db_ok = matches!(db, Ok(Ok(_)));
    let broker_ok = matches!(tokio::time::timeout(limit, state.broker.ping()).await, Ok(Ok(())));
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = json!({"postgres": word(db_ok), "rabbitmq": word(broker_ok)});
    let status = if db_ok && broker_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

/// Reads the whole body, refusing it as soon as it passes the limit.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::TooLarge(limit)),
        Err(_) => Err(ApiError::Malformed("the request body could not be read".into())),
    }
}

/// A path segment that must be a `businesses.id`; anything else is an unknown business.
pub fn parse_business(raw: &str) -> Result<BusinessId, ApiError> {
    raw.parse::<i32>().ok().filter(|id| *id > 0).map(BusinessId).ok_or(ApiError::UnknownBusiness)
}

/// Checks a signature against the business's active secrets of one kind. A
/// mismatch against cached secrets is checked once more against a fresh read,
/// so a rotation takes effect at once.
pub async fn verify_with_business_secrets<F>(
    state: &AppState,
    business: BusinessId,
    kind: IntegrationKind,
    check: F,
) -> Result<(), ApiError>
where
    F: Fn(&[Secret]) -> Result<(), VerifyError>,
{
    let cached = state.secrets.get(business, kind).await.map_err(db_unavailable)?;
    match check_lookup(&cached, kind, &check) {
        Err(ApiError::Signature(VerifyError::Mismatch)) => {}
        other => return other,
    }
    let fresh = state.secrets.fresh(business, kind).await.map_err(db_unavailable)?;
    check_lookup(&fresh, kind, &check)
}

fn check_lookup<F>(lookup: &Lookup, kind: IntegrationKind, check: &F) -> Result<(), ApiError>
where
    F: Fn(&[Secret]) -> Result<(), VerifyError>,
{
    match lookup {
        Lookup::UnknownBusiness => Err(ApiError::UnknownBusiness),
        Lookup::NoActiveIntegration => Err(ApiError::NoActiveIntegration(kind.as_str())),
        Lookup::Secrets(secrets) => Ok(check(secrets)?),
    }
}

fn db_unavailable(e: sqlx::Error) -> ApiError {
    warn!(error = %e, "secret lookup failed");
    ApiError::Unavailable("the database is unreachable".into())
}

/// Makes the event durable before a 2xx is owed: published and confirmed by
/// RabbitMQ, or, if the broker cannot confirm it, written to the Postgres
/// outbox for the relay. Only when neither holds it is the answer 503.
pub async fn accept(state: &AppState, env: &Envelope) -> Result<(), ApiError> {
    let body = env.to_json();
    let published = state.publisher.publish_envelope(&state.topology, env, &body).await;
    let route = match published {
        Ok(()) => "broker",
        Err(bus) => {
            warn!(request_id = %env.request_id, key = %env.key, error = %bus, "publish failed; keeping the event in the outbox");
            if let Err(db) = outbox::insert(&state.pool, env, &body).await {
                warn!(request_id = %env.request_id, key = %env.key, error = %db, "outbox write failed too");
                return Err(ApiError::Unavailable(format!("broker: {bus}; outbox: {db}")));
            }
            state.outbox_wake.notify_one();
            "outbox"
        }
    };
    info!(
        request_id = %env.request_id,
        key = %env.key,
        provider = env.event.provider().as_str(),
        kind = env.event.kind(),
        business = ?env.business_id.map(|b| b.0),
        call_sid = ?env.event.call_sid(),
        via = route,
        "accepted"
    );
    Ok(())
}

/// Logs a refusal with its reason (never the secret or the signature) and answers it.
pub fn refuse(request_id: &str, provider: &str, business: Option<BusinessId>, e: ApiError) -> Response {
    warn!(request_id, provider, business = ?business.map(|b| b.0), reason = e.reason(), code = e.code(), "refused: {e}");
    e.into_response()
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
