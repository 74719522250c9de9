//! Twilio's voice status, recording and transcription callbacks.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;

use super::{ApiError, Incoming, RawBody, Verified, json_object, verify_with_business_secrets};
use crate::events::twilio::{self as ev, Params};
use crate::events::{BusinessId, Envelope, Event};
use crate::verify::twilio as verify;

#[derive(Clone, Copy)]
enum Callback {
    CallStatus,
    Recording,
    Transcription,
}

pub fn call_status(i: Incoming, b: RawBody) -> BoxFuture<'static, Result<Response, ApiError>> {
    Box::pin(receive(Callback::CallStatus, i, b))
}

pub fn recording(i: Incoming, b: RawBody) -> BoxFuture<'static, Result<Response, ApiError>> {
    Box::pin(receive(Callback::Recording, i, b))
}

pub fn transcription(i: Incoming, b: RawBody) -> BoxFuture<'static, Result<Response, ApiError>> {
    Box::pin(receive(Callback::Transcription, i, b))
}

async fn receive(callback: Callback, incoming: Incoming, body: RawBody) -> Result<Response, ApiError> {
    let business = incoming.business()?;
    let body = body.read(&incoming).await?;
    let uri = &incoming.uri;
    let url = format!("{}{}", incoming.state.cfg.public_base_url, uri.path_and_query().map_or("/", |p| p.as_str()));
    let header = |name: &str| incoming.headers.get(name).and_then(|v| v.to_str().ok());
    let signature = header(verify::SIGNATURE_HEADER);
    let alg = verify::algorithm_from_settings(header(verify::SIGNATURE_SETTINGS_HEADER))?;
    let json_variant =
        uri.query().is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "bodySHA256"));

    let form: Vec<(String, String)> =
        if json_variant { Vec::new() } else { form_urlencoded::parse(body.signed_bytes()).into_owned().collect() };
    let body = verify_with_business_secrets(&incoming, body, |secrets, bytes| {
        let keys: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
        if json_variant {
            verify::verify_json(&keys, &url, bytes, signature, alg)
        } else {
            verify::verify_form(&keys, &url, &form, signature, alg)
        }
    })
    .await?;

    // The form is what was signed; a JSON body is parsed only now.
    let params = if json_variant { json_params(&body)? } else { form };
    let (key, event) = parse(callback, business, &Params(&params))?;
    let env = Envelope::new(key, Some(business), incoming.request_id.clone(), event);
    incoming.accept(&env).await?;
    // Twilio reads nothing from a status callback's answer; 204 is what it recommends.
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn parse(callback: Callback, b: BusinessId, p: &Params) -> Result<(String, Event), ApiError> {
    Ok(match callback {
        Callback::CallStatus => {
            let e = ev::parse_call_status(p)?;
            (ev::call_status_key(b, &e), Event::TwilioCallStatus(e))
        }
        Callback::Recording => {
            let e = ev::parse_recording(p)?;
            (ev::recording_key(b, &e), Event::TwilioRecording(e))
        }
        Callback::Transcription => {
            let e = ev::parse_transcription(p)?;
            (ev::transcription_key(b, &e), Event::TwilioTranscription(e))
        }
    })
}

/// Twilio's JSON-body variant: a flat object whose values become the parameters.
fn json_params(body: &Verified) -> Result<Vec<(String, String)>, ApiError> {
    Ok(json_object(body)?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        .collect())
}
