//! What receives: the HTTP ingress. Handlers are thin: read the body once
//! under the size limit, find the secret, verify, parse, publish, answer.

pub mod error;
pub mod n8n;
pub mod stripe;
pub mod twilio;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use sqlx::PgPool;
use tracing::{Instrument, info, info_span, warn};

use crate::bus::{Broker, Publisher, Topology, outbox};
use crate::config::{Config, Secret};
use crate::events::{BusinessId, Envelope};
use crate::store::secrets::{IntegrationKind, Lookup, SecretStore};
use crate::telemetry;
use crate::trace::{TRACEPARENT, TraceParent};
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

/// One routed endpoint. The router is built from [`ROUTES`], and the tests check
/// the OpenAPI document against the same list, so neither can drift.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// The sender, for metric labels; `None` for the operational endpoints.
    pub provider: Option<&'static str>,
    /// The endpoint's short name in metric labels.
    pub endpoint: &'static str,
}

const fn webhook(path: &'static str, provider: &'static str, endpoint: &'static str) -> Route {
    Route { method: "POST", path, provider: Some(provider), endpoint }
}

const fn operational(path: &'static str, endpoint: &'static str) -> Route {
    Route { method: "GET", path, provider: None, endpoint }
}

pub const ROUTES: &[Route] = &[
    webhook("/webhooks/twilio/{business_id}/call-status", "twilio", "call-status"),
    webhook("/webhooks/twilio/{business_id}/recording", "twilio", "recording"),
    webhook("/webhooks/twilio/{business_id}/transcription", "twilio", "transcription"),
    webhook("/webhooks/n8n/{business_id}/bookings", "n8n", "bookings"),
    webhook("/webhooks/stripe", "stripe", "stripe"),
    operational("/healthz", "healthz"),
    operational("/readyz", "readyz"),
    operational("/metrics", "metrics"),
    operational("/openapi.json", "openapi"),
];

/// The hand-written OpenAPI 3.1 description of [`ROUTES`] (checked against it by `tests/openapi.rs`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// The handler of each entry of [`ROUTES`].
fn handler(path: &str) -> MethodRouter<SharedState> {
    match path {
        "/webhooks/twilio/{business_id}/call-status" => post(twilio::call_status),
        "/webhooks/twilio/{business_id}/recording" => post(twilio::recording),
        "/webhooks/twilio/{business_id}/transcription" => post(twilio::transcription),
        "/webhooks/n8n/{business_id}/bookings" => post(n8n::bookings),
        "/webhooks/stripe" => post(stripe::webhook),
        "/healthz" => get(healthz),
        "/readyz" => get(readyz),
        "/metrics" => get(metrics),
        "/openapi.json" => get(openapi),
        other => unreachable!("ROUTES names {other} but it has no handler"),
    }
}

/// Every route: the webhooks and the operational endpoints.
pub fn router(state: SharedState) -> Router {
    build(state, ROUTES.iter())
}

/// Only the operational endpoints (health, readiness, metrics), for a `work` process.
pub fn operational_router(state: SharedState) -> Router {
    build(state, ROUTES.iter().filter(|r| r.provider.is_none()))
}

fn build<'a>(state: SharedState, routes: impl Iterator<Item = &'a Route>) -> Router {
    telemetry::install();
    let mut router = Router::new();
    for route in routes {
        router = router.route(route.path, handler(route.path));
    }
    router.route_layer(middleware::from_fn(timed)).fallback(not_found).with_state(state)
}

/// Around each webhook: its span, continuing the sender's W3C trace (or starting
/// one), whose hop the publisher passes on; and how long the answer took.
async fn timed(path: MatchedPath, request: Request, next: Next) -> Response {
    let route = ROUTES.iter().find(|r| r.path == path.as_str()).and_then(|r| Some((r.provider?, r.endpoint)));
    let Some((provider, endpoint)) = route else { return next.run(request).await };
    let incoming = request.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let span = info_span!("webhook", provider, endpoint, trace_id = tracing::field::Empty);
    let hop = TraceParent::of_span(&span, incoming);
    span.record("trace_id", tracing::field::display(hop.trace_id));
    let started = Instant::now();
    let response = crate::trace::scope(hop, next.run(request).instrument(span)).await;
    telemetry::http_duration(provider, endpoint, started.elapsed());
    response
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let text = telemetry::render(&state.pool, &state.broker, &state.topology).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
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

/// A verified body parsed as the one JSON object every JSON webhook sends (400 otherwise).
pub fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::Malformed("the JSON body must be an object".into())),
        Err(e) => Err(ApiError::Malformed(format!("the body is not JSON: {e}"))),
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
pub async fn accept(state: &AppState, endpoint: &'static str, env: &Envelope) -> Result<(), ApiError> {
    let traceparent = crate::trace::current().map(|t| t.header());
    let body = env.to_json();
    let published = state.publisher.publish_envelope(&state.topology, env, &body, traceparent.as_deref()).await;
    let provider = env.event.provider().as_str();
    let route = match published {
        Ok(()) => "broker",
        Err(bus) => {
            warn!(
                request_id = %env.request_id,
                key = %env.key,
                provider,
                kind = env.event.kind(),
                business = env.business_id.map(|b| b.0),
                call_sid = env.event.call_sid(),
                error = %bus,
                "publish failed; keeping the event in the outbox"
            );
            if let Err(db) = outbox::insert(&state.pool, env, &body, traceparent.as_deref()).await {
                warn!(request_id = %env.request_id, key = %env.key, error = %db, "outbox write failed too");
                return Err(ApiError::Unavailable(format!("broker: {bus}; outbox: {db}")));
            }
            state.outbox_wake.notify_one();
            "outbox"
        }
    };
    telemetry::accepted(provider, endpoint);
    info!(
        request_id = %env.request_id,
        key = %env.key,
        provider,
        kind = env.event.kind(),
        business = env.business_id.map(|b| b.0),
        call_sid = env.event.call_sid(),
        via = route,
        "accepted"
    );
    Ok(())
}

/// Logs a refusal with its reason (never the secret or the signature) and answers it.
pub fn refuse(
    request_id: &str,
    provider: &'static str,
    endpoint: &'static str,
    business: Option<BusinessId>,
    e: ApiError,
) -> Response {
    telemetry::rejected(provider, endpoint, e.reason());
    warn!(
        request_id,
        provider,
        endpoint,
        business = business.map(|b| b.0),
        reason = e.reason(),
        code = e.code(),
        "refused: {e}"
    );
    e.into_response()
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
