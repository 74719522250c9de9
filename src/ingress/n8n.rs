//! Bookings pushed by a business's n8n workflow, signed with Standard Webhooks
//! (README, "Bookings from n8n", shows a sender).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::json;

use super::{ApiError, Incoming, RawBody, json_object, verify_with_business_secrets};
use crate::events::n8n::{WebhookId, booking_key, parse_booking};
use crate::events::{Envelope, Event};
use crate::verify::VerifyError;
use crate::verify::standard_webhooks::{self as sw, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

pub fn bookings(i: Incoming, b: RawBody) -> BoxFuture<'static, Result<Response, ApiError>> {
    Box::pin(receive(i, b))
}

async fn receive(incoming: Incoming, body: RawBody) -> Result<Response, ApiError> {
    let business = incoming.business()?;
    let body = body.read(&incoming).await?;
    let id = incoming.header(ID_HEADER).and_then(|raw| match raw {
        Some(raw) => WebhookId::parse(raw).map(Some).ok_or(VerifyError::MalformedHeader(ID_HEADER)),
        None => Ok(None),
    });
    let timestamp = incoming.header(TIMESTAMP_HEADER);
    let signature = incoming.header(SIGNATURE_HEADER);
    let now = Utc::now().timestamp();
    let verify = |keys: &[sw::Secret], bytes: &[u8]| {
        let id = id.clone()?;
        sw::verify(keys, id.as_ref().map(WebhookId::as_str), timestamp.clone()?, signature.clone()?, bytes, now)
    };
    // Headers missing, malformed or stale, or without one well-formed tag: refused
    // before the business is looked up, at the cost of no query and no MAC.
    match verify(&[], &[]) {
        Err(VerifyError::Mismatch) => {}
        other => other?,
    }
    let body = verify_with_business_secrets(&incoming, body, |secrets, bytes| {
        // The store only hands out secrets that parse (see `providers::PROVIDERS`).
        let keys: Vec<sw::Secret> = secrets.iter().filter_map(|s| sw::Secret::parse(s.expose()).ok()).collect();
        Ok(verify(&keys, bytes)?)
    })
    .await?;
    // Verified: the three headers are present and well-formed.
    let id = id.ok().flatten().ok_or(VerifyError::MissingHeader(ID_HEADER))?;
    let pushed_at = timestamp
        .ok()
        .flatten()
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(|t| DateTime::from_timestamp(t, 0))
        .ok_or(VerifyError::MalformedHeader(TIMESTAMP_HEADER))?;

    let event = parse_booking(&json_object(&body)?)?.into_event(id.clone(), pushed_at);
    let env = Envelope::new(
        booking_key(business, &id),
        Some(business),
        incoming.request_id.clone(),
        Event::N8nBooking(event),
    );
    incoming.accept(&env).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"status": "accepted", "webhook_id": id.as_str()}))).into_response())
}
