//! Stripe's webhook for the platform account's billing events.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use serde_json::json;

use super::{ApiError, Incoming, RawBody, json_object};
use crate::events::stripe as ev;
use crate::events::{Envelope, Event};
use crate::verify::stripe as verify;

pub fn webhook(i: Incoming, b: RawBody) -> BoxFuture<'static, Result<Response, ApiError>> {
    Box::pin(receive(i, b))
}

async fn receive(incoming: Incoming, body: RawBody) -> Result<Response, ApiError> {
    let cfg = &incoming.state.cfg;
    // Fail closed: without a secret nothing could be verified, so the endpoint does not exist.
    if cfg.stripe_webhook_secrets.is_empty() {
        return Err(ApiError::NotConfigured("no Stripe endpoint secret is set"));
    }
    let body = body.read(&incoming).await?;
    let cfg = &incoming.state.cfg;
    let secrets: Vec<&str> = cfg.stripe_webhook_secrets.iter().map(|s| s.expose()).collect();
    let header = incoming.headers.get(verify::SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    let body =
        body.verify(|bytes| verify::verify(&secrets, header, bytes, now, verify::DEFAULT_TOLERANCE_SECS).map(|_| ()))?;

    let value = serde_json::Value::Object(json_object(&body)?);
    let parsed = ev::parse(&value)?;
    let env = Envelope::new(ev::event_key(parsed.id()), None, incoming.request_id.clone(), Event::from(parsed));
    incoming.accept(&env).await?;
    // Stripe reads only the status; the body is what its own examples answer.
    Ok((StatusCode::OK, Json(json!({"received": true}))).into_response())
}
