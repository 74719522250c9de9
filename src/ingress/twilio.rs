//! Twilio's voice status, recording and transcription callbacks.

use axum::body::Body;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{
    ApiError, SharedState, accept, json_object, new_request_id, parse_business, read_body, refuse,
    verify_with_business_secrets,
};
use crate::events::twilio::{self as ev, Params};
use crate::events::{BusinessId, Envelope, Event};
use crate::store::secrets::IntegrationKind;
use crate::verify::twilio as verify;

#[derive(Clone, Copy)]
enum Callback {
    CallStatus,
    Recording,
    Transcription,
}

impl Callback {
    fn endpoint(self) -> &'static str {
        match self {
            Callback::CallStatus => "call-status",
            Callback::Recording => "recording",
            Callback::Transcription => "transcription",
        }
    }
}

pub async fn call_status(s: State<SharedState>, p: Path<String>, u: OriginalUri, h: HeaderMap, b: Body) -> Response {
    handle(Callback::CallStatus, s, p, u, h, b).await
}

pub async fn recording(s: State<SharedState>, p: Path<String>, u: OriginalUri, h: HeaderMap, b: Body) -> Response {
    handle(Callback::Recording, s, p, u, h, b).await
}

pub async fn transcription(s: State<SharedState>, p: Path<String>, u: OriginalUri, h: HeaderMap, b: Body) -> Response {
    handle(Callback::Transcription, s, p, u, h, b).await
}

async fn handle(
    callback: Callback,
    State(state): State<SharedState>,
    Path(business): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = new_request_id();
    let business = parse_business(&business);
    let result = match &business {
        Ok(b) => receive(callback, &state, *b, &uri, &headers, body, &request_id).await,
        Err(_) => Err(ApiError::UnknownBusiness),
    };
    match result {
        // Twilio reads nothing from a status callback's answer; 204 is what it recommends.
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refuse(&request_id, "twilio", callback.endpoint(), business.ok(), e),
    }
}

async fn receive(
    callback: Callback,
    state: &SharedState,
    business: BusinessId,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<(), ApiError> {
    let body = read_body(body, headers, state.cfg.body_limit_bytes).await?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let url = format!("{}{}", state.cfg.public_base_url, uri.path_and_query().map_or("/", |p| p.as_str()));
    let signature = header(verify::SIGNATURE_HEADER);
    let alg = verify::algorithm_from_settings(header(verify::SIGNATURE_SETTINGS_HEADER))?;
    let json_variant =
        uri.query().is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "bodySHA256"));

    let form: Vec<(String, String)> =
        if json_variant { Vec::new() } else { form_urlencoded::parse(&body).into_owned().collect() };
    verify_with_business_secrets(state, business, IntegrationKind::Twilio, |secrets| {
        let keys: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
        if json_variant {
            verify::verify_json(&keys, &url, &body, signature, alg)
        } else {
            verify::verify_form(&keys, &url, &form, signature, alg)
        }
    })
    .await?;

    // Only now, with the signature good, is a JSON body parsed.
    let params = if json_variant { json_params(&body)? } else { form };
    let event = parse(callback, business, &Params(&params))?;
    let env = Envelope::new(event.0, Some(business), request_id.to_string(), event.1);
    accept(state, callback.endpoint(), &env).await
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
fn json_params(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    Ok(json_object(body)?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        .collect())
}
