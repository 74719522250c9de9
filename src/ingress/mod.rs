//! What receives: the HTTP ingress. Every webhook endpoint is one entry of
//! [`ENDPOINTS`] (provider, name, path, methods, handler); the router, the
//! OpenAPI check, the metric labels and each request's span derive from it.
//! A handler gets an [`Incoming`] (business already parsed from the path) and
//! can read the body only as [`Unverified`] bytes, which become [`Verified`]
//! only through a signature check; parsers take `&Verified`.

pub mod error;
pub mod gauges;
pub mod n8n;
pub mod stripe;
pub mod twilio;
mod verified;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, OriginalUri, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on};
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use sqlx::PgPool;
use tracing::{Instrument, info, info_span, warn};

use crate::bus::durable::Durable;
use crate::bus::{Broker, Topology};
use crate::config::Config;
use crate::events::{BusinessId, Envelope, Provider};
use crate::store::secrets::{Keys, Lookup, LookupError, SecretStore};
use crate::telemetry;
use crate::trace::{TRACEPARENT, TraceParent};
use crate::verify::VerifyError;
pub use error::ApiError;
pub use gauges::Gauges;
pub use verified::{Unverified, Verified};

pub struct AppState {
    pub cfg: Config,
    pub pool: PgPool,
    pub broker: Arc<Broker>,
    /// Publish, else outbox (and wake its relay): the one way an event is accepted.
    pub durable: Durable,
    pub topology: Topology,
    pub secrets: SecretStore,
    /// What `/metrics` reads from the broker and the outbox, shared between scrapes.
    pub gauges: Gauges,
}

pub type SharedState = Arc<AppState>;

/// A webhook endpoint's handler: an answer, or the refusal that [`ENDPOINTS`]'
/// wrapper logs, counts and answers.
pub type Handler = fn(Incoming, RawBody) -> BoxFuture<'static, Result<Response, ApiError>>;

/// One webhook endpoint, declared once in [`ENDPOINTS`].
#[derive(Debug)]
pub struct Endpoint {
    pub provider: Provider,
    /// Its short name in metric labels and logs.
    pub name: &'static str,
    /// A `{business_id}` segment is parsed before the handler runs (404 `unknown_business` if it is no id).
    pub path: &'static str,
    pub methods: &'static [Method],
    pub handler: Handler,
}

/// Twilio may be told to call any of its callbacks with GET (`StatusCallbackMethod=GET`).
const TWILIO_METHODS: &[Method] = &[Method::POST, Method::GET];

/// Every webhook endpoint. A new one is one line here, its handler, and its
/// operation in `openapi.json` (which `tests/openapi.rs` checks against this list).
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        provider: Provider::Twilio,
        name: "call-status",
        path: "/webhooks/twilio/{business_id}/call-status",
        methods: TWILIO_METHODS,
        handler: twilio::call_status,
    },
    Endpoint {
        provider: Provider::Twilio,
        name: "recording",
        path: "/webhooks/twilio/{business_id}/recording",
        methods: TWILIO_METHODS,
        handler: twilio::recording,
    },
    Endpoint {
        provider: Provider::Twilio,
        name: "transcription",
        path: "/webhooks/twilio/{business_id}/transcription",
        methods: TWILIO_METHODS,
        handler: twilio::transcription,
    },
    Endpoint {
        provider: Provider::Twilio,
        name: "intelligence",
        path: "/webhooks/twilio/{business_id}/intelligence",
        methods: TWILIO_METHODS,
        handler: twilio::intelligence,
    },
    Endpoint {
        provider: Provider::N8n,
        name: "bookings",
        path: "/webhooks/n8n/{business_id}/bookings",
        methods: &[Method::POST],
        handler: n8n::bookings,
    },
    Endpoint {
        provider: Provider::Stripe,
        name: "stripe",
        path: "/webhooks/stripe",
        methods: &[Method::POST],
        handler: stripe::webhook,
    },
];

type Operational = (&'static str, &'static str, fn() -> axum::routing::MethodRouter<SharedState>);

/// The operational endpoints (every process that listens serves them): path, name, handler.
const OPERATIONAL: &[Operational] = &[
    ("/healthz", "healthz", || get(healthz)),
    ("/readyz", "readyz", || get(readyz)),
    ("/metrics", "metrics", || get(metrics)),
    ("/openapi.json", "openapi", || get(openapi)),
];

/// One routed method and path.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    /// The sender, for metric labels; `None` for the operational endpoints.
    pub provider: Option<Provider>,
    /// The endpoint's short name in metric labels.
    pub endpoint: &'static str,
}

/// Every method and path the full router serves, derived from [`ENDPOINTS`] and the operational list.
pub fn routes() -> Vec<Route> {
    let webhooks = ENDPOINTS.iter().flat_map(|e| {
        e.methods.iter().map(|m| Route {
            method: m.as_str(),
            path: e.path,
            provider: Some(e.provider),
            endpoint: e.name,
        })
    });
    let ops = OPERATIONAL.iter().map(|(path, name, _)| Route { method: "GET", path, provider: None, endpoint: name });
    webhooks.chain(ops).collect()
}

/// The hand-written OpenAPI 3.1 description of [`routes`] (checked against it by `tests/openapi.rs`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route: the webhooks and the operational endpoints.
pub fn router(state: SharedState) -> Router {
    let mut router = operational(Router::new());
    for endpoint in ENDPOINTS {
        let filter = endpoint.methods.iter().fold(None, |acc: Option<MethodFilter>, m| {
            let f = MethodFilter::try_from(m.clone()).expect("a routable method");
            Some(acc.map_or(f, |a| a.or(f)))
        });
        let filter = filter.expect("an endpoint has a method");
        router = router.route(endpoint.path, on(filter, move |State(s), r| receive(endpoint, s, r)));
    }
    router.fallback(not_found).with_state(state)
}

/// Only the operational endpoints (health, readiness, metrics), for a `work` process.
pub fn operational_router(state: SharedState) -> Router {
    operational(Router::new()).fallback(not_found).with_state(state)
}

fn operational(mut router: Router<SharedState>) -> Router<SharedState> {
    telemetry::install();
    for (path, _, handler) in OPERATIONAL {
        router = router.route(path, handler());
    }
    router
}

/// What a webhook handler is given: the request, with its id and business.
pub struct Incoming {
    pub state: SharedState,
    pub endpoint: &'static Endpoint,
    pub request_id: String,
    pub method: Method,
    /// The business the path names (endpoints with a `{business_id}` segment).
    pub business: Option<BusinessId>,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// The request body, not yet read.
pub struct RawBody(Body);

impl RawBody {
    /// Reads the whole body under the size limit; it is usable only once verified.
    /// The body must have arrived within `BODY_READ_TIMEOUT` (408 otherwise), so a
    /// client trickling it holds neither a slot nor a buffer for long.
    pub async fn read(self, incoming: &Incoming) -> Result<Unverified, ApiError> {
        let cfg = &incoming.state.cfg;
        match tokio::time::timeout(cfg.body_read_timeout, read_body(self.0, &incoming.headers, cfg.body_limit_bytes))
            .await
        {
            Ok(read) => read.map(Unverified::new),
            Err(_) => {
                metrics::counter!(telemetry::BODY_TIMEOUTS).increment(1);
                Err(ApiError::BodyTimeout(cfg.body_read_timeout.as_secs_f64()))
            }
        }
    }
}

impl Incoming {
    /// The business of the path, for endpoints that have one.
    pub fn business(&self) -> Result<BusinessId, ApiError> {
        self.business.ok_or(ApiError::UnknownBusiness)
    }

    /// A header's text; present but not visible ASCII is malformed, not missing.
    pub fn header(&self, name: &'static str) -> Result<Option<&str>, VerifyError> {
        self.headers.get(name).map(|v| v.to_str().map_err(|_| VerifyError::MalformedHeader(name))).transpose()
    }

    /// Makes the event durable before a 2xx is owed (see [`Durable`]); only when
    /// neither the broker nor the outbox holds it is the answer 503.
    pub async fn accept(&self, env: &Envelope) -> Result<(), ApiError> {
        let traceparent = crate::trace::current().map(|t| t.header());
        let provider = env.event.provider().as_str();
        let kept = self.state.durable.keep(env, traceparent.as_deref(), |bus| {
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
        });
        let via = match kept.await {
            Ok(via) => via,
            Err(e) => {
                warn!(request_id = %env.request_id, key = %env.key, error = %e.db, "outbox write failed too");
                return Err(ApiError::Unavailable("neither the broker nor the outbox took the event"));
            }
        };
        telemetry::accepted(provider, self.endpoint.name);
        info!(
            request_id = %env.request_id,
            key = %env.key,
            provider,
            kind = env.event.kind(),
            business = env.business_id.map(|b| b.0),
            call_sid = env.event.call_sid(),
            via = via.as_str(),
            "accepted"
        );
        Ok(())
    }
}

/// Around each webhook: its span, continuing the sender's W3C trace (or
/// starting one), whose hop the publisher passes on; the business of the path;
/// the handler; a refusal logged and counted; how long the answer took.
async fn receive(endpoint: &'static Endpoint, state: SharedState, request: Request) -> Response {
    let (provider, name) = (endpoint.provider.as_str(), endpoint.name);
    let incoming = request.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let span = info_span!("webhook", provider, endpoint = name, trace_id = tracing::field::Empty);
    let hop = TraceParent::of_span(&span, incoming);
    span.record("trace_id", tracing::field::display(hop.trace_id));
    let started = Instant::now();
    let response = crate::trace::scope(hop, run(endpoint, state, request).instrument(span)).await;
    telemetry::http_duration(provider, name, started.elapsed());
    response
}

async fn run(endpoint: &'static Endpoint, state: SharedState, request: Request) -> Response {
    let request_id = new_request_id();
    let (mut parts, body) = request.into_parts();
    let business = if endpoint.path.contains("{business_id}") {
        match Path::<String>::from_request_parts(&mut parts, &state).await.map(|Path(b)| parse_business(&b)) {
            Ok(Ok(b)) => Some(b),
            _ => return refuse(&request_id, endpoint, None, ApiError::UnknownBusiness),
        }
    } else {
        None
    };
    let uri = parts.extensions.get::<OriginalUri>().map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let incoming = Incoming {
        state,
        endpoint,
        request_id: request_id.clone(),
        method: parts.method,
        business,
        uri,
        headers: parts.headers,
    };
    match (endpoint.handler)(incoming, RawBody(body)).await {
        Ok(response) => response,
        Err(e) => refuse(&request_id, endpoint, business, e),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let read = state.gauges.read(&state).await;
    let pool = (state.pool.size(), u32::try_from(state.pool.num_idle()).unwrap_or(u32::MAX));
    let snapshot = telemetry::Snapshot {
        dlq: read.dlq,
        pool: Some(pool),
        outbox: read.outbox,
        storage: read.storage,
        macs: crate::verify::macs_computed(),
        notices_unsent: read.notices_unsent,
        notices_dlq: read.notices_dlq,
    };
    let text = telemetry::render(&snapshot);
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
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
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
pub fn json_object(body: &Verified) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    json_object_of(body.bytes())
}

/// [`json_object`] over plain bytes, for the fuzz targets only: handlers hold a [`Verified`].
pub(crate) fn json_object_of(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::Malformed("the JSON body must be an object".into())),
        Err(e) => Err(ApiError::Malformed(format!("the body is not JSON: {e}"))),
    }
}

/// A path segment that must be a `businesses.id`; anything else is an unknown business.
fn parse_business(raw: &str) -> Result<BusinessId, ApiError> {
    raw.parse::<i32>().ok().filter(|id| *id > 0).map(BusinessId).ok_or(ApiError::UnknownBusiness)
}

/// Checks a signature against the business's active secrets for the
/// endpoint's provider. A mismatch against cached secrets is checked once more
/// against a fresh read, so a rotation takes effect at once; only a mismatch (some
/// tag was well formed) earns that read, and only within the store's budget, so
/// refusing garbage never costs a query.
pub async fn verify_with_business_secrets<F>(
    incoming: &Incoming,
    body: Unverified,
    check: F,
) -> Result<Verified, ApiError>
where
    F: Fn(&Keys, &[u8]) -> Result<(), ApiError>,
{
    let (state, kind, business) = (&incoming.state, incoming.endpoint.provider, incoming.business()?);
    let cached = state.secrets.get(business, kind).await.map_err(lookup_failed)?;
    let refused = match check_lookup(&cached, kind, &body, &check) {
        // A key saved a moment ago (a rotated token, a first shared key) works at once.
        Err(e @ ApiError::Signature(VerifyError::Mismatch | VerifyError::NoSharedKey)) => e,
        Ok(()) => return Ok(body.verified()),
        Err(other) => return Err(other),
    };
    match state.secrets.fresh(business, kind).await {
        Ok(fresh) => check_lookup(&fresh, kind, &body, &check)?,
        // No budget for a re-check now: the cached secrets' answer stands.
        Err(LookupError::OverBudget) => return Err(refused),
        Err(e) => return Err(lookup_failed(e)),
    }
    Ok(body.verified())
}

fn check_lookup<F>(lookup: &Lookup, kind: Provider, body: &Unverified, check: &F) -> Result<(), ApiError>
where
    F: Fn(&Keys, &[u8]) -> Result<(), ApiError>,
{
    match lookup {
        Lookup::UnknownBusiness => Err(ApiError::UnknownBusiness),
        Lookup::NoActiveIntegration => Err(ApiError::NoActiveIntegration(kind.as_str())),
        Lookup::Secrets(secrets) => check(secrets, body.signed_bytes()),
    }
}

fn lookup_failed(e: LookupError) -> ApiError {
    match e {
        LookupError::OverBudget => ApiError::Unavailable("secret look-ups are over budget"),
        LookupError::Database(e) => {
            warn!(error = %e, "secret lookup failed");
            ApiError::Unavailable("the database is unreachable")
        }
    }
}

/// Logs a refusal with its reason (never the secret or the signature), counts it and answers it.
fn refuse(request_id: &str, endpoint: &Endpoint, business: Option<BusinessId>, e: ApiError) -> Response {
    let (provider, name) = (endpoint.provider.as_str(), endpoint.name);
    telemetry::rejected(provider, name, e.reason());
    warn!(
        request_id,
        provider,
        endpoint = name,
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
