//! Stripe's webhook for the platform account's billing events.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, SharedState, accept, json_object, new_request_id, read_body, refuse};
use crate::events::stripe as ev;
use crate::events::{Envelope, Event};
use crate::verify::stripe as verify;

pub async fn webhook(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    let request_id = new_request_id();
    match receive(&state, &headers, body, &request_id).await {
        // Stripe reads only the status; the body is what its own examples answer.
        Ok(()) => (StatusCode::OK, Json(json!({"received": true}))).into_response(),
        Err(e) => refuse(&request_id, "stripe", "stripe", None, e),
    }
}

async fn receive(state: &SharedState, headers: &HeaderMap, body: Body, request_id: &str) -> Result<(), ApiError> {
    // Fail closed: without a secret nothing could be verified, so the endpoint does not exist.
    if state.cfg.stripe_webhook_secrets.is_empty() {
        return Err(ApiError::NotConfigured("no Stripe endpoint secret is set"));
    }
    let body = read_body(body, headers, state.cfg.body_limit_bytes).await?;
    let secrets: Vec<&str> = state.cfg.stripe_webhook_secrets.iter().map(|s| s.expose()).collect();
    let header = headers.get(verify::SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    verify::verify(&secrets, header, &body, now, verify::DEFAULT_TOLERANCE_SECS)?;

    // Only now, with the signature good, is the body parsed.
    let value = serde_json::Value::Object(json_object(&body)?);
    let parsed = ev::parse(&value)?;
    let env = Envelope::new(ev::event_key(parsed.id()), None, request_id.to_string(), Event::from(parsed));
    accept(state, "stripe", &env).await
}
