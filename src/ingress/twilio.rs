//! Twilio's voice status, recording, transcription (`<Record transcribe>` and
//! Real-Time Transcription) and Conversational Intelligence callbacks.
//!
//! Every Twilio endpoint takes POST and GET (`StatusCallbackMethod=GET`): with
//! GET the parameters are the query string and the signature covers the full
//! URL alone. A POST is form-encoded, or JSON with `bodySHA256` in the query.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use tracing::debug;

use std::sync::OnceLock;

use super::{ApiError, Incoming, RawBody, json_object, verify_with_business_secrets};
use crate::events::transcription as tr;
use crate::events::twilio::{self as ev, Params};
use crate::events::{BusinessId, Envelope, Event};
use crate::verify::twilio as verify;

#[derive(Clone, Copy)]
enum Callback {
    CallStatus,
    Recording,
    Transcription,
    Intelligence,
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

pub fn intelligence(i: Incoming, b: RawBody) -> BoxFuture<'static, Result<Response, ApiError>> {
    Box::pin(receive(Callback::Intelligence, i, b))
}

/// How the parameters travel, which decides what was signed.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    /// GET: the query string is the parameters; the URL alone is signed.
    Query,
    /// POST, form-encoded: the URL, then the body's parameters sorted.
    Body,
    /// POST, JSON: the URL with `bodySHA256`; the body's hash is checked.
    Json,
}

async fn receive(callback: Callback, incoming: Incoming, body: RawBody) -> Result<Response, ApiError> {
    let business = incoming.business()?;
    let body = body.read(&incoming).await?;
    let uri = &incoming.uri;
    let url = format!("{}{}", incoming.state.cfg.public_base_url, uri.path_and_query().map_or("/", |p| p.as_str()));
    let signature = incoming.header(verify::SIGNATURE_HEADER)?;
    let settings = incoming.header(verify::SIGNATURE_SETTINGS_HEADER)?;
    let alg = verify::algorithm_from_settings(settings)?;
    let form = if incoming.method == Method::GET {
        Form::Query
    } else if uri.query().is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "bodySHA256")) {
        Form::Json
    } else {
        Form::Body
    };

    // A signature missing or of the wrong form is refused before the business is looked up.
    verify::check_signature_header(signature, alg)?;
    // A form body is parsed (capped, names unique) only once the business and its keys
    // are known, and once for both the cached and the fresh check.
    let parsed = OnceLock::new();
    let body = verify_with_business_secrets(&incoming, body, |keys, bytes| {
        let keys = verify::signing_keys(settings, &keys.tokens(), &keys.shared_keys())?;
        let signed = match form {
            Form::Json => return Ok(verify::verify_json(&keys, &url, bytes, signature, alg)?),
            Form::Query => &[][..],
            Form::Body => parsed.get_or_init(|| verify::parse_form(bytes)).as_ref().map_err(form_refused)?,
        };
        Ok(verify::verify_form(&keys, &url, signed, signature, alg)?)
    })
    .await?;

    // Only now, with the signature good, are the query or a JSON body read.
    let params = match form {
        Form::Body => match parsed.into_inner() {
            Some(Ok(params)) => params,
            Some(Err(e)) => return Err(form_refused(&e)),
            None => return Err(ApiError::Malformed("the form was never read".into())),
        },
        Form::Json => json_params(json_object(&body)?),
        Form::Query => form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect(),
    };
    let Some((key, event)) = parse(callback, business, &params)? else {
        // A partial real-time result: verified, valid, and adding nothing. Not carried.
        debug!(request_id = %incoming.request_id, "partial real-time transcription result; nothing to carry");
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let env = Envelope::new(key, Some(business), incoming.request_id.clone(), event);
    incoming.accept(&env).await?;
    // Twilio reads nothing from a status callback's answer; 204 is what it recommends.
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn parse(callback: Callback, b: BusinessId, params: &[(String, String)]) -> Result<Option<(String, Event)>, ApiError> {
    let p = &Params(params);
    Ok(Some(match callback {
        Callback::CallStatus => {
            let e = ev::parse_call_status(p)?;
            (ev::call_status_key(b, &e), Event::TwilioCallStatus(e))
        }
        Callback::Recording => {
            let e = ev::parse_recording(p)?;
            (ev::recording_key(b, &e), Event::TwilioRecording(e))
        }
        Callback::Transcription if tr::is_realtime(params) => {
            let e = tr::parse_realtime(params)?;
            if matches!(e.kind, tr::RealtimeKind::Content { is_final: false, .. }) {
                return Ok(None);
            }
            (tr::realtime_key(b, &e), Event::TwilioRealtime(e))
        }
        Callback::Transcription => {
            let e = ev::parse_transcription(p)?;
            (ev::transcription_key(b, &e), Event::TwilioTranscription(e))
        }
        Callback::Intelligence => {
            let e = tr::parse_intelligence(params)?;
            (tr::intelligence_key(b, &e), Event::TwilioIntelligence(e))
        }
    }))
}

/// Twilio's JSON-body variant: a flat object whose values become the parameters.
pub(crate) fn json_params(object: serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    object.into_iter().map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect()
}

fn form_refused(e: &verify::FormError) -> ApiError {
    ApiError::Malformed(e.to_string())
}
