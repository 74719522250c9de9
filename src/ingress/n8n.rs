//! Bookings pushed by a business's n8n workflow, signed with Standard Webhooks
//! (README, "Bookings from n8n", shows a sender).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::{
    ApiError, SharedState, accept, json_object, new_request_id, parse_business, read_body, refuse,
    verify_with_business_secrets,
};
use crate::events::n8n::{WebhookId, booking_key, parse_booking};
use crate::events::{BusinessId, Envelope, Event};
use crate::store::secrets::IntegrationKind;
use crate::verify::VerifyError;
use crate::verify::standard_webhooks::{self as sw, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

pub async fn bookings(
    State(state): State<SharedState>,
    Path(business): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = new_request_id();
    let business = parse_business(&business);
    let result = match &business {
        Ok(b) => receive(&state, *b, &headers, body, &request_id).await,
        Err(_) => Err(ApiError::UnknownBusiness),
    };
    match result {
        Ok(id) => {
            (StatusCode::ACCEPTED, Json(json!({"status": "accepted", "webhook_id": id.as_str()}))).into_response()
        }
        Err(e) => refuse(&request_id, "n8n", "bookings", business.ok(), e),
    }
}

async fn receive(
    state: &SharedState,
    business: BusinessId,
    headers: &HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<WebhookId, ApiError> {
    let body = read_body(body, headers, state.cfg.body_limit_bytes).await?;
    let id = header(headers, ID_HEADER).and_then(|raw| match raw {
        Some(raw) => WebhookId::parse(raw).map(Some).ok_or(VerifyError::MalformedHeader(ID_HEADER)),
        None => Ok(None),
    });
    let timestamp = header(headers, TIMESTAMP_HEADER);
    let signature = header(headers, SIGNATURE_HEADER);
    let now = Utc::now().timestamp();
    verify_with_business_secrets(state, business, IntegrationKind::N8n, |secrets| {
        // The store only hands out secrets that parse (see `IntegrationKind::check_secret`).
        let keys: Vec<sw::Secret> = secrets.iter().filter_map(|s| sw::Secret::parse(s.expose()).ok()).collect();
        let id = id.clone()?;
        sw::verify(&keys, id.as_ref().map(WebhookId::as_str), timestamp.clone()?, signature.clone()?, &body, now)
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

    // Only now, with the signature good, is the body parsed.
    let event = parse_booking(&json_object(&body)?)?.into_event(id.clone(), pushed_at);
    let env =
        Envelope::new(booking_key(business, &id), Some(business), request_id.to_string(), Event::N8nBooking(event));
    accept(state, "bookings", &env).await?;
    Ok(id)
}

/// A header's text; present but not visible ASCII is malformed, not missing.
fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, VerifyError> {
    headers.get(name).map(|v| v.to_str().map_err(|_| VerifyError::MalformedHeader(name))).transpose()
}
